"""ds_unlearn: measure, unlearn and study memorized sequences in causal language models.

The public API, importable from here (heavy modules load on first use):

    score_sequences, summarize_scores, Thresholds, MEMORIZED_MA, OVER_UNLEARNED_MA   (core)
    audit, AuditSettings                                                              (core)
    UnlearnConfig, UnlearnTrainer, run_unlearning                                     (unlearn)
    LabConfig                                                                         (lab)
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "score_sequences": "ds_unlearn.core.scorer",
    "summarize_scores": "ds_unlearn.core.summary",
    "Thresholds": "ds_unlearn.core.verdict",
    "MEMORIZED_MA": "ds_unlearn.core.memorization",
    "OVER_UNLEARNED_MA": "ds_unlearn.core.memorization",
    "InputError": "ds_unlearn.core.errors",
    "audit": "ds_unlearn.core.audit",
    "AuditSettings": "ds_unlearn.core.audit",
    "UnlearnConfig": "ds_unlearn.unlearn.config",
    "UnlearnTrainer": "ds_unlearn.unlearn.trainer",
    "run_unlearning": "ds_unlearn.unlearn.run",
    "LabConfig": "ds_unlearn.lab.config",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    # Lazy: `import ds_unlearn` stays cheap and free of side effects; the Trainer and its
    # dependencies load only when asked for.
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'ds_unlearn' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
