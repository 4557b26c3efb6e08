"""Config fields more than one command takes, declared once: each command's config dataclass
inherits the groups it reads (``ScoreConfig``, ``AuditConfig``). Frozen and keyword-only, so a
group mixes into any config, including one that extends a frozen library dataclass."""

from __future__ import annotations

from dataclasses import dataclass

from ..core.data import DEFAULT_ID_FIELD, DEFAULT_PROMPT_FIELD, PROMPT_HELP, SCORE_TURNS
from ..core.memorization import MEMORIZED_MA, OVER_UNLEARNED_MA
from ..core.models import DTYPES
from ..core.summary import CALIBRATION_QUANTILE, Thresholds, thresholds_for
from .parsing import option


@dataclass(frozen=True, kw_only=True)
class DataOptions:
    """How a data file's rows become sequences (``core.data.to_sequence_set``)."""

    max_length: int | None = option(None, "truncate sequences to this many tokens")
    text_field: str = option("text", "field holding the text of a row")
    id_field: str = option(DEFAULT_ID_FIELD, "field holding a row's id (rows without 'id' are numbered)")
    prompt_field: str = option(DEFAULT_PROMPT_FIELD, PROMPT_HELP["prompt_field"])
    mixed_prompts: bool = option(False, PROMPT_HELP["mixed_prompts"])
    chat_template: bool = option(False, PROMPT_HELP["chat_template"])
    score_turns: str = option("last", PROMPT_HELP["score_turns"], choices=list(SCORE_TURNS))


@dataclass(frozen=True, kw_only=True)
class ModelOptions:
    """How the model loads."""

    dtype: str = option("float32", "dtype to load the model in", choices=sorted(DTYPES))
    deepspeed: str | None = option(None, "DeepSpeed JSON config (ZeRO-3 loads partitioned)")


@dataclass(frozen=True, kw_only=True)
class ThresholdOptions:
    """The MA levels of the verdicts (``core.summary.thresholds_for``)."""

    memorized_threshold: float | None = option(
        None, f"MA at or above which: memorized (default: calibrated on a holdout, else {MEMORIZED_MA})"
    )
    over_unlearned_threshold: float | None = option(
        None, f"MA at or below which: over-unlearned (default: calibrated on a holdout, else {OVER_UNLEARNED_MA})"
    )

    def thresholds(self) -> Thresholds:
        """The verdict thresholds; raises InputError naming the setting (``thresholds_for``)."""
        return thresholds_for(self.memorized_threshold, self.over_unlearned_threshold)


@dataclass(frozen=True, kw_only=True)
class CalibrationOptions(ThresholdOptions):
    """Verdicts judged by position among a holdout: a side without an explicit level is
    calibrated on the holdout's scores."""

    band_on: str = option(
        "ma", "comma list of scores judged by position among the holdout (ma, loss, zlib, min_k, min_k++)"
    )
    calibration_quantile: float = option(
        CALIBRATION_QUANTILE,
        "per side: outside the holdout's central 1-2q by mid-rank position (needs ceil(1/q) holdout rows)",
    )

    def thresholds(self) -> Thresholds:
        return thresholds_for(
            self.memorized_threshold,
            self.over_unlearned_threshold,
            self.band_on,
            self.calibration_quantile,
            calibrate=True,
        )
