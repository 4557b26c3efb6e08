"""Weights a rank owns, copied and edited shard by shard (TA/TAU, last-good snapshots).

Under ZeRO-3 a rank owns ``param.ds_tensor`` (its flat partition); small "persistent" parameters
are also kept whole in ``param.data`` on every rank, so both are edited. Elsewhere (no DeepSpeed,
ZeRO-1/2) the rank holds ``param.data`` whole. No rank ever gathers a full state dict.
"""

from __future__ import annotations

import torch

from .losses import negated_task_vector


def owned_tensors(model) -> list[torch.Tensor]:
    tensors = []
    for param in model.parameters():
        if hasattr(param, "ds_tensor"):
            tensors.append(param.ds_tensor)
            if getattr(param, "ds_persist", False):
                tensors.append(param.data)
        else:
            tensors.append(param.data)
    return tensors


@torch.no_grad()
def snapshot(model, into: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """fp32 copies of this rank's own weights (theta_base, or the last good weights); ``into``
    reuses an earlier snapshot's buffers instead of holding two copies at once."""
    if into is None:
        return [t.detach().float().clone() for t in owned_tensors(model)]
    for buffer, tensor in zip(into, owned_tensors(model), strict=True):
        buffer.copy_(tensor)
    return into


@torch.no_grad()
def restore(model, saved: list[torch.Tensor]) -> None:
    for tensor, value in zip(owned_tensors(model), saved, strict=True):
        tensor.copy_(value.to(tensor.dtype))


@torch.no_grad()
def apply_negated_task_vector(model, base: list[torch.Tensor], coefficient: float) -> None:
    """In place: each owned tensor becomes ``base - coefficient * (tensor - base)``."""
    for tensor, b in zip(owned_tensors(model), base, strict=True):
        tensor.copy_(negated_task_vector(tensor.float(), b, coefficient).to(tensor.dtype))
