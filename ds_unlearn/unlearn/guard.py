"""The end-of-run guard: the model a run wrote is the model it judged.

After the outputs are saved, ``run_unlearning`` loads each written model the way a user will (the
merged or full checkpoint ``model/`` with ``from_pretrained``; the adapter ``adapter/`` with
``peft.PeftModel.from_pretrained`` on the input checkpoint) and re-scores the forget set with one
teacher-forced pass (``score_sequences`` with ``el_n=()``, sharded over ranks like every score).
Every sequence's MA and loss must match the run's own final judgement (``scores_after.jsonl``)
within float tolerance, or the run fails (exit 1) naming the sequence and both values, and
``report.json``'s ``guard`` says so. Its cost: one load and one forward over the forget set per
written model.
"""

from __future__ import annotations

import gc
from pathlib import Path

import torch

from ..core.ds_config import load_ds_config, zero_stage
from ..core.errors import InputError
from ..core.models import load_for_inference
from ..core.scorer import score_sequences
from .lora import ADAPTER_DIR

# (atol, rtol) on a sequence's mean loss (nats/token): the same weights through another load path
# agree to ~1e-6 in fp32; half precision rounds every activation.
LOSS_TOLERANCE = {"fp32": (1e-4, 1e-4), "half": (5e-2, 2e-2)}


def written_models(config, model_dir, out: Path) -> list[tuple[str, Path, Path | None]]:
    """What the run wrote that a user will load: (name, checkpoint, adapter or None)."""
    written = []
    if config.uses_lora:
        written.append((ADAPTER_DIR, Path(model_dir), out / ADAPTER_DIR))
    if (out / "model").is_dir():
        written.append(("model", out / "model", None))
    return written


def mismatch(judged: dict, rescored: dict, half: bool) -> str | None:
    """Why two scores of one sequence disagree beyond float tolerance, or None. MA may differ by
    one predicted token (a near-tie argmax flipped by rounding); the loss by ``LOSS_TOLERANCE``."""
    atol, rtol = LOSS_TOLERANCE["half" if half else "fp32"]
    one_token = 1.0 / max(1, int(judged.get("n_tokens", 2)) - 1)
    if not abs(float(judged["ma"]) - float(rescored["ma"])) <= one_token + 1e-9:
        return "ma"
    if not abs(float(judged["loss"]) - float(rescored["loss"])) <= atol + rtol * abs(float(judged["loss"])):
        return "loss"
    return None


def check_written(config, model_dir, out: Path, forget, judged: list[dict], dtype: torch.dtype) -> dict:
    """Re-score the forget set on every written model and compare with ``judged`` (the run's
    final per-sequence scores, forget-set order). Collective (every rank calls it; each scores
    its shard). Returns report.json's ``guard``: ``ok``, what was ``checked``, the largest
    differences, and on failure ``error`` (one line naming the model, the sequence id and both
    values). ``dtype``: the precision the run judged in (the written model loads in it)."""
    ds_config = load_ds_config(config.deepspeed) if config.deepspeed else None
    ds_config = ds_config if zero_stage(ds_config) == 3 else None
    half = dtype in (torch.bfloat16, torch.float16)
    entry: dict = {"ok": True, "checked": [], "max_abs_ma_diff": 0.0, "max_abs_loss_diff": 0.0}
    for name, checkpoint, adapter in written_models(config, model_dir, out):
        try:
            model = load_for_inference(checkpoint, dtype, ds_config, adapter=adapter)
        except InputError as err:
            entry.update(ok=False, error=f"the written {name} does not load: {err}")
            return entry
        scores = score_sequences(
            model,
            forget.sequences,
            el_n=(),
            extract_k=(config.extract_k,),
            batch_size=config.score_batch_size,
            prompt_lengths=forget.prompt_lengths,  # the response only, as the run judged it
        )
        del model
        gc.collect()
        entry["checked"].append(name)
        for seq_id, run, written in zip(forget.ids, judged, scores):
            entry["max_abs_ma_diff"] = max(entry["max_abs_ma_diff"], abs(float(run["ma"]) - float(written["ma"])))
            entry["max_abs_loss_diff"] = max(
                entry["max_abs_loss_diff"], abs(float(run["loss"]) - float(written["loss"]))
            )
            what = mismatch(run, written, half)
            if what is not None and entry["ok"]:
                entry.update(
                    ok=False,
                    sequence=seq_id,
                    error=(
                        f"the written {name} is not the model the run judged: forget sequence {seq_id!r} has "
                        f"{what} {float(written[what]):.6g} as written, {float(run[what]):.6g} as judged "
                        f"(ma {float(written['ma']):.4f} vs {float(run['ma']):.4f}, "
                        f"loss {float(written['loss']):.6f} vs {float(run['loss']):.6f})"
                    ),
                )
    return entry
