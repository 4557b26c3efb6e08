"""The report of an unlearning run, built from what the run holds in memory."""

from __future__ import annotations

from ..core import distributed as D
from ..core.summary import summarize_scores

REPORT = "report.json"


def build_report(config, trainer, after: list[dict], holdout_after, retain_after, seconds: float) -> dict:
    """``report.json``: settings, thresholds, epochs, stop reason, the forget set's summary
    before and after (``core.summary.summarize_scores``), holdout loss, retain MA, history."""
    run = trainer.run
    t = trainer.thresholds
    return {
        "method": config.method,
        "settings": {
            **config.reported_settings(),
            "forget_size": len(trainer.forget),
            "max_epochs": config.num_train_epochs,
            "world_size": D.world_size(),
            "lora": _lora_settings(config),
        },
        "thresholds": t.summary(),
        "thresholds_source": run.thresholds_source,
        "epochs": run.epochs,
        # The output model is this epoch's, not necessarily the last one's (selection.epoch_rank).
        "best_epoch": {"epoch": run.best_epoch, "why": run.best_why},
        "switched_to_task_vector_at_epoch": run.switched_at_epoch,
        "stop_reason": run.stop_reason or "trainer finished its epochs",
        "diverged": run.diverged,
        "before": summarize_scores(run.scores_before, t),
        "after": summarize_scores(after, t),
        "holdout_loss": {"before": run.holdout_loss_before, "after": holdout_after},
        "retain_ma": {"before": run.retain_ma_before, "after": retain_after},
        "history": run.history,
        "wall_seconds": round(seconds, 2),
        "peak_device_memory_gib": _peak_device_memory_gib(),
    }


def _lora_settings(config) -> dict | None:
    if not config.uses_lora:
        return None
    return {
        "r": config.lora_r or None,
        "alpha": config.lora_alpha,
        "dropout": config.lora_dropout,
        "target_modules": config.lora_target_modules,
        "adapter": config.adapter,
        "merged": config.merge_adapter,
    }


def _peak_device_memory_gib() -> float | None:
    """This rank's peak accelerator memory (GiB), None on CPU."""
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 3) if torch.cuda.is_available() else None


def _loss(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def report_lines(report: dict) -> str:
    """What a run did, in three lines for stdout (counts and means only), and a fourth naming the
    resumable checkpoint when the epoch limit ended the run before its stop rule."""
    b, a = report["before"], report["after"]
    return "\n".join(
        [
            f"{report['method']}: {report['epochs']} epoch{'s' * (report['epochs'] != 1)}; {report['stop_reason']}; "
            f"output = epoch "
            f"{report['best_epoch']['epoch']} ({report['best_epoch']['why']})",
            f"memorized {b['memorized']} -> {a['memorized']}, over-unlearned {b['over_unlearned']} -> "
            f"{a['over_unlearned']}, mean ma {b['means']['ma']:.3f} -> {a['means']['ma']:.3f}, "
            f"mean el_10 {b['means']['el_10']:.3f} -> {a['means']['el_10']:.3f}",
            f"holdout loss {_loss(report['holdout_loss']['before'])} -> {_loss(report['holdout_loss']['after'])}; "
            f"wall {report['wall_seconds']} s; details in report.json",
        ]
        + (
            [
                f"resumable checkpoint: {report['resumable_checkpoint']} (--resume_from_checkpoint it with a "
                "higher --num_train_epochs to carry on)"
            ]
            if report.get("resumable_checkpoint")
            else []
        )
    )
