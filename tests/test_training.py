"""SequenceTrainer: an epoch runs exactly the optimizer steps that train real rows, so a
selection gives the same weights whatever the batch size or the world size (no step of
zero-weight fillers moves Adam), checked against a hand-written AdamW."""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from ds_unlearn.core.toy import random_sequences, tiny_model

from .launcher import REPO, deepspeed_run, launcher_env, tail

SCRIPT = "tests/scripts/sequence_trainer_adamw.py"


def hand_written_adamw(steps_rows, lr=1e-2, betas=(0.9, 0.999), eps=1e-8):
    """The weights after one AdamW step (weight decay 0) per entry of ``steps_rows``, each on the
    mean per-sequence NLL of its rows, written out (no torch.optim)."""
    model = tiny_model("llama", seed=0, vocab_size=64)
    data = random_sequences(4, 12, 64, seed=5)
    params = dict(model.named_parameters())
    m = {k: torch.zeros_like(p) for k, p in params.items()}
    v = {k: torch.zeros_like(p) for k, p in params.items()}
    for t, rows in enumerate(steps_rows, start=1):
        model.zero_grad()
        losses = []
        for r in rows:
            ids = torch.tensor([data[r]])
            logits = model(input_ids=ids).logits[0, :-1]
            losses.append(F.cross_entropy(logits, ids[0, 1:]))
        torch.stack(losses).mean().backward()
        with torch.no_grad():
            for k, p in params.items():
                g = p.grad
                m[k] = betas[0] * m[k] + (1 - betas[0]) * g
                v[k] = betas[1] * v[k] + (1 - betas[1]) * g * g
                m_hat, v_hat = m[k] / (1 - betas[0] ** t), v[k] / (1 - betas[1] ** t)
                p -= lr * m_hat / (v_hat.sqrt() + eps)
    return {k: v.detach() for k, v in model.state_dict().items()}


def assert_same(state, expected, atol=2e-6):
    for k, value in expected.items():
        torch.testing.assert_close(state[k].float(), value, rtol=0, atol=atol, msg=k)


@pytest.mark.parametrize("batch", [1, 2, 4])
def test_a_selection_trains_the_same_whatever_the_batch_size(batch, tmp_path):
    # Two selected rows of four: batch 1 -> 2 steps of one row (the other 2 nominal steps are
    # empty and skipped); batch 2 and 4 -> one step of both rows (the rest skipped).
    out = tmp_path / "w.pt"
    env = launcher_env()
    result = subprocess.run(
        [sys.executable, str(REPO / SCRIPT), str(out), str(batch)], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    saved = torch.load(out)
    per_epoch = [[2], [0]] if batch == 1 else [[2, 0]]
    assert saved["steps"] == 3 * len(per_epoch)  # no step without a real row
    assert_same(saved["state"], hand_written_adamw(per_epoch * 3))


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_train_as_one_process(tmp_path):
    # 2 ranks x batch 1 = one step of both rows per epoch, as one process with batch 2.
    out = tmp_path / "w.pt"
    result = deepspeed_run(SCRIPT, out, 1, REPO / "configs" / "ds" / "zero2.json", timeout=420)
    assert result.returncode == 0, tail(result)
    saved = torch.load(out)
    assert saved["steps"] == 3
    assert_same(saved["state"], hand_written_adamw([[2, 0]] * 3), atol=1e-5)
