"""This rank's own share of the trainable weights, read and written where they really live.

TA/TAU's theta_base, the edited weights theta_base - lambda (theta - theta_base), the best-epoch
snapshot and its restore all go through ``OwnedWeights``. Under DeepSpeed the weights that count
are the optimizer's fp32 master partitions (the next ``engine.step()`` copies them over the
working copy), so every read comes from the masters and every write goes to the
masters *and* the working copy, through DeepSpeed's own accessors:

- ZeRO-3: ``deepspeed.utils.safe_get_local_fp32_param`` / ``safe_set_local_fp32_param`` on each
  parameter's local partition, then the partition ``param.ds_tensor``; parameters DeepSpeed keeps
  whole on every rank (``ds_persist``) are re-assembled from the partitions by an all-gather.
- ZeRO-1/2 and DeepSpeed's bf16 optimizer: the fp32 fragment this rank owns
  (``param._hp_mapping``, what ``safe_get_full_fp32_param`` assembles from), then the working copy
  rebuilt from every rank's fragment by one all-reduce per parameter.
- Without DeepSpeed (or ZeRO-0 in fp32): the parameters themselves.

A snapshot is a list of fp32 tensors of this rank's own elements only (about 1/world of the
model under ZeRO), never a full state dict, and its shapes never depend on whether a parameter
happens to be gathered at that moment.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from .losses import negated_task_vector

Snapshot = list[torch.Tensor]


def _collective_device() -> torch.device:
    # NCCL reduces device tensors only; gloo (CPU ranks) host tensors.
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _kind(param) -> str:
    if hasattr(param, "ds_id"):
        return "zero3"
    if hasattr(param, "_hp_mapping"):
        return "fragments"
    return "plain"


class OwnedWeights:
    """Read and write this rank's share of a model's trainable weights in fp32 (see module doc).

    Build it after the DeepSpeed engine and its optimizer exist (inside ``Trainer.train``). Every
    method that writes is collective under ZeRO (all ranks call it, in the same order)."""

    def __init__(self, model):
        # parameters() is deterministic, so every rank walks the same list in the same order.
        self.params = [p for p in model.parameters() if p.requires_grad]
        kinds = {_kind(p) for p in self.params}
        if len(kinds) > 1:
            raise RuntimeError(f"mixed parameter kinds {sorted(kinds)}: cannot tell where the weights live")
        self.kind = kinds.pop() if kinds else "plain"

    # -- reading ----------------------------------------------------------------------------
    def _read_one(self, param) -> torch.Tensor | None:
        if self.kind == "zero3":
            from deepspeed.utils import safe_get_local_fp32_param

            return safe_get_local_fp32_param(param)
        if self.kind == "fragments":
            mapping = param._hp_mapping
            return None if mapping is None else mapping.get_hp_fragment()
        return param.data

    @torch.no_grad()
    def snapshot(self, into: Snapshot | None = None) -> Snapshot:
        """fp32 copies of this rank's own elements; ``into`` reuses an earlier snapshot's buffers
        instead of holding two copies at once. A parameter this rank owns no element of gives an
        empty tensor."""
        values = [self._read_one(p) for p in self.params]
        if into is None:
            return [torch.empty(0) if v is None else v.detach().float().clone() for v in values]
        for buffer, value in zip(into, values, strict=True):
            if value is not None:
                buffer.copy_(value)
        return into

    # -- writing ----------------------------------------------------------------------------
    @torch.no_grad()
    def write(self, values: Snapshot) -> None:
        """Set this rank's own elements to ``values`` (fp32) in the masters and the working copy."""
        self.update(lambda i, current: values[i])

    @torch.no_grad()
    def update(self, new_value: Callable[[int, torch.Tensor], torch.Tensor]) -> None:
        """``own[i] = new_value(i, own[i])`` for every parameter (fp32 in, fp32 out), then make the
        working copy agree (collective under ZeRO)."""
        if self.kind == "zero3":
            self._update_zero3(new_value)
        elif self.kind == "fragments":
            self._update_fragments(new_value)
        else:
            for i, param in enumerate(self.params):
                param.data.copy_(new_value(i, param.data.float()).to(param.dtype))

    def _update_zero3(self, new_value) -> None:
        from deepspeed.utils import safe_get_local_fp32_param, safe_set_local_fp32_param

        persistent = []
        for i, param in enumerate(self.params):
            value = new_value(i, safe_get_local_fp32_param(param).float())
            safe_set_local_fp32_param(param, value)
            param.ds_tensor.data.copy_(value.view_as(param.ds_tensor).to(param.ds_tensor.dtype))
            if getattr(param, "ds_persist", False):
                persistent.append(param)
        self._rebuild_persistent(persistent)

    @staticmethod
    def _rebuild_persistent(persistent: list) -> None:
        # Persistent parameters stay whole on every rank: rebuild them from the new partitions.
        device = _collective_device()
        for param in persistent:
            local = param.ds_tensor.data.to(device)
            parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, local)
            # Released at this moment (no forward so far, or a whole-model gather re-partitioned it): the next
            # forward fetches it from the partitions just written, so there is nothing to refresh.
            if param.data.numel() == param.ds_numel:
                param.data.copy_(torch.cat(parts)[: param.ds_numel].view(param.ds_shape))

    def _update_fragments(self, new_value) -> None:
        for i, param in enumerate(self.params):
            mapping = param._hp_mapping
            # Every element of a parameter lies in exactly one rank's fragment: summing the
            # fragments (zeros elsewhere) over ranks rebuilds the whole parameter on each rank.
            full = torch.zeros(param.numel(), dtype=torch.float32, device=_collective_device())
            if mapping is not None:
                fragment = mapping.get_hp_fragment()
                fragment.data.copy_(new_value(i, fragment.data.float()).to(fragment.dtype))
                address = mapping.lp_fragment_address
                full[address.start : address.start + address.numel] = fragment.data.float()
            if dist.is_initialized() and dist.get_world_size() > 1:
                dist.all_reduce(full)
            param.data.copy_(full.view(param.shape).to(param.dtype))

    @torch.no_grad()
    def write_into(self, targets: list, values: Snapshot) -> None:
        """Copy a snapshot of these weights into ``targets``: frozen parameters of the same shapes,
        partitioned the same way (TA/TAU's frozen theta_base adapter). Frozen parameters have no
        optimizer masters, so only their working copy is written, in its own dtype. Collective
        under ZeRO."""
        if len(targets) != len(self.params):
            raise ValueError(f"{len(targets)} targets for {len(self.params)} weights")
        if self.kind == "zero3":
            persistent = []
            for target, value in zip(targets, values):
                target.ds_tensor.data.copy_(value.view_as(target.ds_tensor).to(target.ds_tensor.dtype))
                if getattr(target, "ds_persist", False):
                    persistent.append(target)
            self._rebuild_persistent(persistent)
        elif self.kind == "fragments":
            for param, target, value in zip(self.params, targets, values):
                full = torch.zeros(param.numel(), dtype=torch.float32, device=_collective_device())
                mapping = param._hp_mapping
                if mapping is not None:
                    address = mapping.lp_fragment_address
                    full[address.start : address.start + address.numel] = value.to(full.device)
                if dist.is_initialized() and dist.get_world_size() > 1:
                    dist.all_reduce(full)
                target.data.copy_(full.view(target.shape).to(target.dtype))
        else:
            for target, value in zip(targets, values):
                target.data.copy_(value.view(target.shape).to(target.dtype))

    @torch.no_grad()
    def apply_negated_task_vector(self, base: Snapshot, coefficient: float) -> None:
        """In place: own weights become ``base - coefficient * (theta - base)`` (Ilharco et al.
        2023 task arithmetic; TAU, Barbulescu & Triantafillou 2024), computed in fp32."""
        self.update(lambda i, current: negated_task_vector(current, base[i], coefficient))

    @torch.no_grad()
    def all_finite(self) -> bool:
        """Whether every own weight is finite (one reduction per parameter; a host sync at the
        end, once per call: it runs at epoch boundaries only). Not collective."""
        flags = [torch.isfinite(v).all() for v in (self._read_one(p) for p in self.params) if v is not None]
        return bool(torch.stack(flags).all().item()) if flags else True
