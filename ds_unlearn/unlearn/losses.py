"""Loss math of sequence-level training, as pure functions of logits and labels."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def per_sequence_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean next-token NLL of each row, and each row's teacher-forced accuracy (MA).

    ``labels`` are the input ids with IGNORE at padding; position j predicts ``labels[j+1]``.
    Every sequence counts once, whatever its length (unlearning is judged per sequence).
    """
    logits = logits[:, :-1].float() if logits.dtype in (torch.float16, torch.bfloat16) else logits[:, :-1]
    targets = labels[:, 1:]
    valid = targets != IGNORE
    token_nll = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), targets.clamp(min=0).reshape(-1), reduction="none"
    ).view_as(targets)
    counts = valid.sum(-1).clamp(min=1)
    nll = (token_nll * valid).sum(-1) / counts
    hits = ((logits.argmax(-1) == targets) & valid).sum(-1)
    return nll, hits.float().detach() / counts


def weighted_objective(nll: torch.Tensor, weights: torch.Tensor, ascend: bool) -> torch.Tensor:
    """``sum(weights * nll)``, negated for gradient ascent. The weights (see
    ``selection.plan_epoch``) already hold the normalization over ranks and micro-batches."""
    loss = (weights.to(nll.dtype) * nll).sum()
    return -loss if ascend else loss


def negated_task_vector(current: torch.Tensor, base: torch.Tensor, coefficient: float) -> torch.Tensor:
    """``base - coefficient * (current - base)``: subtract what fine-tuning on the forget set added."""
    return base - coefficient * (current - base)
