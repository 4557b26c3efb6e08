"""Metrics to whatever ``--report_to`` names, with slash names kept as TensorBoard tags.

Every metric goes through ``Trainer.log`` so TensorBoard, W&B, MLflow (or none) all receive it.
The upstream TensorBoard callback files every key under ``train/``; ours writes keys that are
already grouped (``forget/ma_mean``, ``lab/accuracy``) as they are, and also takes per-sequence
histograms, which only TensorBoard shows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from transformers.integrations import TensorBoardCallback


class GroupedTensorBoardCallback(TensorBoardCallback):
    """``TensorBoardCallback`` that keeps ``group/name`` keys as tags and writes histograms."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = dict(logs or {})
        grouped = {k: v for k, v in logs.items() if "/" in k and isinstance(v, (int, float))}
        rest = {k: v for k, v in logs.items() if k not in grouped}
        if rest:
            super().on_log(args, state, control, logs=rest, **kwargs)
        if not grouped or not state.is_world_process_zero:
            return
        if self.tb_writer is None:
            self._init_summary_writer(args)
        if self.tb_writer is not None:
            for tag, value in grouped.items():
                self.tb_writer.add_scalar(tag, value, state.global_step)
            self.tb_writer.flush()

    def histograms(self, args, state, values: Mapping[str, Sequence[float]]) -> None:
        """One histogram per tag (rank 0 only, like every reporter)."""
        if not state.is_world_process_zero:
            return
        if self.tb_writer is None:
            self._init_summary_writer(args)
        if self.tb_writer is not None:
            for tag, data in values.items():
                self.tb_writer.add_histogram(tag, np.asarray(data, dtype=np.float64), state.global_step)
            self.tb_writer.flush()


def use_grouped_tensorboard(trainer) -> None:
    """Swap the Trainer's TensorBoard callback (present when report_to names tensorboard) for ours."""
    for callback in list(trainer.callback_handler.callbacks):
        if type(callback) is TensorBoardCallback:
            trainer.callback_handler.remove_callback(callback)
            trainer.callback_handler.add_callback(GroupedTensorBoardCallback(tb_writer=callback.tb_writer))


def log_histograms(trainer, values: Mapping[str, Sequence[float]]) -> None:
    """Per-sequence histograms to the reporters that support them."""
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, GroupedTensorBoardCallback):
            callback.histograms(trainer.args, trainer.state, values)
