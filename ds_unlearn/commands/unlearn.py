"""``ds-unlearn unlearn``: remove a forget set from a model and prove it per sequence.

One process:  ds-unlearn unlearn --model DIR --forget forget.jsonl --method sga --output_dir out/run
A paper's settings (bf16: on a GPU):
              ds-unlearn unlearn --config configs/paper/gpt_neo_125m_sga.yaml --output_dir out/run
Many ranks:   deepspeed --num_gpus N launch/unlearn.py --config FILE.yaml --deepspeed configs/ds/zero3.json
Any UnlearnConfig / TrainingArguments field is a flag (--method sga --learning_rate 1e-5 ...), and
--config FILE.yaml gives them from a file (flags override it).
"""

from __future__ import annotations

from ..core import distributed as D
from ..unlearn.config import UnlearnConfig
from ..unlearn.report import report_lines
from ..unlearn.run import run_unlearning
from . import process
from .parsing import parse_config as parse_dataclass_config
from .parsing import print_help

PROG = "ds-unlearn unlearn"


def parse_config(argv: list[str], before_build=None) -> UnlearnConfig:
    """``[--config FILE.yaml] [--flag value ...]`` into a validated UnlearnConfig.

    ``before_build(values)`` may adjust the merged settings (and the process) just before the
    config is constructed; ``main`` uses it for DeepSpeed's process setup."""
    return parse_dataclass_config(UnlearnConfig, argv, prog=PROG, before_build=before_build)


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print_help(UnlearnConfig, PROG, __doc__)
        return 0
    config = parse_config(argv, before_build=process.configure_process_for_trainer)
    result = run_unlearning(config)
    if D.is_main():
        print(report_lines(result.report))
    if not result.report.get("guard", {}).get("ok", True):
        return 1  # the written model is not the one judged: its line was printed (unlearn/guard.py)
    return 1 if result.report.get("diverged") and not config.allow_divergence else 0
