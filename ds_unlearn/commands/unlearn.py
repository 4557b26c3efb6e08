"""``ds-unlearn unlearn``: remove a forget set from a model and prove it per sequence.

One process:  ds-unlearn unlearn --config configs/quickstart.yaml --output_dir out/run
Many ranks:   deepspeed --num_gpus N launch/unlearn.py --config FILE.yaml --deepspeed configs/ds/zero3.json
Any UnlearnConfig / TrainingArguments field is a flag (--method sga --learning_rate 1e-5 ...).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from .. import distributed as D
from ..data import SequenceSet, needs_tokenizer, read_rows, to_sequence_set
from ..errors import InputError
from ..files import write_json
from ..memorization import verdict_counts
from ..models import load_causal_lm, load_config, load_tokenizer, report_partition, resolve_model_dir
from ..unlearn_config import UnlearnConfig, parse_config

REPORT = "report.json"


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        from transformers import HfArgumentParser

        HfArgumentParser(UnlearnConfig).print_help()
        return 0
    config = parse_config(argv)
    try:
        return run(config)
    finally:
        D.finalize()


def check_paths(config: UnlearnConfig, model_dir: Path) -> None:
    """The input checkpoint is never written to, and earlier results are not clobbered."""
    out, src = Path(config.output_dir).resolve(), model_dir.resolve()
    if out == src or src in out.parents:
        raise InputError(f"output_dir: {config.output_dir} lies inside the input checkpoint {model_dir}")
    if (out / REPORT).exists() and not (config.overwrite_output_dir or config.resume_from_checkpoint):
        raise InputError(f"output_dir: {config.output_dir} holds an earlier run (pass --overwrite_output_dir)")


def load_sets(config: UnlearnConfig, model_dir: Path):
    """Forget, retain and holdout sets as token ids, validated before any model loads."""
    vocab_size = load_config(model_dir).vocab_size
    need = max(11, config.extract_k + 1)  # EL_10 and k-extractability must be defined
    files = {"forget": config.forget, "retain": config.retain, "holdout": config.holdout}
    rows = {name: read_rows(path, f"--{name}") for name, path in files.items() if path}
    tokenizer = load_tokenizer(model_dir) if any(needs_tokenizer(r) for r in rows.values()) else None
    sets: dict[str, SequenceSet | None] = {name: None for name in files}
    for name, table in rows.items():
        data = to_sequence_set(table, tokenizer=tokenizer, text_field=config.text_field, id_field=config.id_field,
                               max_length=config.max_length, vocab_size=vocab_size, option=f"--{name}")
        short = next((i for i, s in enumerate(data.sequences) if len(s) < need), None)
        if short is not None:
            raise InputError(f"--{name} row {short}: {len(data.sequences[short])} tokens, but EL_10 and "
                             f"extract_k={config.extract_k} need at least {need}")
        sets[name] = data
    return sets, tokenizer


def run(config: UnlearnConfig) -> int:
    started = time.time()
    model_dir = resolve_model_dir(config.model)
    check_paths(config, model_dir)
    sets, tokenizer = load_sets(config, model_dir)

    from ..trainer import UnlearnTrainer

    # Built after UnlearnConfig: under ZeRO-3 its DeepSpeed config makes this load partitioned.
    model = load_causal_lm(model_dir)
    report_partition(model)
    trainer = UnlearnTrainer(model=model, args=config, processing_class=tokenizer,
                             forget=sets["forget"], retain=sets["retain"], holdout=sets["holdout"])
    trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    trainer.finalize_weights()

    out = Path(config.output_dir)
    trainer.save_model(str(out / "model"))
    after = trainer.score_set(sets["forget"])
    trainer.write_scores("scores_after.jsonl", after)
    holdout_after = trainer.holdout_loss()
    retain_after = (float(np.mean([r["ma"] for r in trainer.score_set(sets["retain"], el=False)]))
                    if sets["retain"] is not None else None)
    if D.is_main():
        report = build_report(config, trainer, after, holdout_after, retain_after, time.time() - started)
        write_json(out / REPORT, report)
        print(report_lines(report))
    return 0


def _means(scores: list[dict]) -> dict:
    return {k: float(np.mean([float(s[k]) for s in scores])) for k in ("ma", "el_10", "max_verbatim", "loss")}


def build_report(config, trainer, after, holdout_after, retain_after, seconds) -> dict:
    from ..files import read_jsonl

    run = trainer.run
    before = [{k: v for k, v in r.items() if k != "id"} for r in read_jsonl(Path(config.output_dir) / "scores_before.jsonl")]
    t = trainer.thresholds
    counts = lambda scores: verdict_counts([s["ma"] for s in scores], t.memorized_ma, t.over_unlearned_ma)
    return {
        "method": config.method,
        "settings": {
            "model": config.model, "forget_size": len(trainer.forget), "learning_rate": config.learning_rate,
            "sga_gamma": config.sga_gamma, "select_on": config.select_on, "score_refresh": config.score_refresh,
            "tv_coefficient": config.tv_coefficient, "tv_switch_ma": config.tv_switch_ma,
            "stop_rule": config.stop_rule, "max_epochs": config.num_train_epochs,
            "world_size": D.world_size(), "deepspeed": config.deepspeed,
        },
        "thresholds": run.thresholds,
        "epochs": run.epochs,
        "switched_to_task_vector_at_epoch": run.switched_at_epoch,
        "stop_reason": run.stop_reason or "trainer finished its epochs",
        "before": {**counts(before), "means": _means(before)},
        "after": {**counts(after), "means": _means(after)},
        "holdout_loss": {"before": run.holdout_loss_before, "after": holdout_after},
        "retain_ma": {"before": run.retain_ma_before, "after": retain_after},
        "history": run.history,
        "wall_seconds": round(seconds, 2),
    }


def report_lines(report: dict) -> str:
    b, a = report["before"], report["after"]
    return "\n".join([
        f"{report['method']}: {report['epochs']} epochs; {report['stop_reason']}",
        f"memorized {b['memorized']} -> {a['memorized']}, over-unlearned {b['over_unlearned']} -> "
        f"{a['over_unlearned']}, mean ma {b['means']['ma']:.3f} -> {a['means']['ma']:.3f}, "
        f"mean el_10 {b['means']['el_10']:.3f} -> {a['means']['el_10']:.3f}",
        f"report: {json.dumps(report['holdout_loss'])} holdout loss; wall {report['wall_seconds']} s",
    ])



