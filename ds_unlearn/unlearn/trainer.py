"""``UnlearnTrainer``: GA, SGA, TA and TAU on DeepSpeed ranks, judged per sequence every epoch.

The training loop is the upstream Trainer's (see training.SequenceTrainer). This class adds the
run's state machine, driven by ``UnlearnMonitor`` at epoch boundaries:

    ascent   -- GA on every forget sequence, or SGA on the selected ones
    finetune -- TA/TAU only: descend on the forget set from theta_base; every epoch judge the
                edited weights theta_base - lambda * (theta - theta_base), kept shard by shard
    done     -- the stop rule holds, a guard fired, or epochs ran out
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import TrainerCallback

from ..core import distributed as D
from ..core.data import SequenceSet
from ..core.files import write_jsonl
from ..core.memorization import verdict_counts
from ..core.scorer import score_sequences
from ..core.summary import Thresholds, calibrate_thresholds
from .loop import SequenceTrainer
from .lora import AdapterEdit
from .reporting import log_histograms
from .selection import sga_selection, stop_satisfied
from .weights import OwnedWeights

STATE_FILE = "unlearn_state.json"


@dataclass
class RunState:
    """Everything needed to judge, report and resume a run (weights excepted)."""

    phase: str = "ascent"
    ma: list[float] = field(default_factory=list)  # latest per-sequence scores of the forget set
    el10: list[float] | None = None
    selected: list[int] = field(default_factory=list)  # rows the next epoch trains on
    epochs: int = 0
    stop_reason: str | None = None
    switched_at_epoch: int | None = None
    thresholds: dict = field(default_factory=dict)
    holdout_loss_before: float | None = None
    retain_ma_before: float | None = None
    history: list[dict] = field(default_factory=list)
    scores_before: list[dict] = field(default_factory=list)  # the forget set as the run found it
    diverged: bool = False  # a non-finite loss, score or weight ended the run (last good weights kept)


class UnlearnTrainer(SequenceTrainer):
    def __init__(
        self,
        *args,
        forget: SequenceSet,
        retain: SequenceSet | None = None,
        holdout: SequenceSet | None = None,
        **kwargs,
    ):
        super().__init__(*args, train_sequences=forget.sequences, **kwargs)
        self.forget, self.retain, self.holdout = forget, retain, holdout
        self.run = RunState()
        self.base: list[torch.Tensor] | None = None  # theta_base, this rank's own fp32 elements
        self.last_good: list[torch.Tensor] | None = None
        self.weights: OwnedWeights | None = None  # built once the engine and its optimizer exist
        # TA/TAU on LoRA adapters: the edit is made by the adapters' scales (unlearn/lora.py).
        self.adapter_edit = (
            AdapterEdit(self.model, self.args.tv_coefficient) if AdapterEdit.applies(self.model) else None
        )
        self.resume_dir: Path | None = None
        self.started = time.time()
        self.clock = EpochClock()
        self.add_callback(UnlearnMonitor(self))

    # -- SequenceTrainer hooks ----------------------------------------------------------------
    def epoch_rows(self) -> list[int]:
        return [] if self.run.phase == "done" else self.run.selected

    @property
    def ascending(self) -> bool:
        return self.run.phase == "ascent"

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        # Our run state lives beside the Trainer's checkpoint; remember where to read it.
        if resume_from_checkpoint is True:
            from transformers.trainer_utils import get_last_checkpoint

            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
        self.resume_dir = Path(resume_from_checkpoint) if resume_from_checkpoint else None
        return super().train(
            resume_from_checkpoint=resume_from_checkpoint,
            trial=trial,
            ignore_keys_for_eval=ignore_keys_for_eval,
            **kwargs,
        )

    # -- measurements (collective: every rank calls them) ------------------------------------
    def score_set(self, data: SequenceSet, el: bool = True) -> list[dict]:
        """Per-sequence scores; ``el=False`` is one teacher-forced pass (MA, loss, runs), ``el=True``
        adds EL_10, which costs greedy generation."""
        return score_sequences(
            self.model,
            data.sequences,
            el_n=(10,) if el else (),
            extract_k=(self.args.extract_k,),
            batch_size=self.args.score_batch_size,
        )

    def holdout_loss(self, scores: list[dict] | None = None) -> float | None:
        """Mean per-sequence NLL of the holdout (nats/token); NaN when any is non-finite."""
        if self.holdout is None:
            return None
        scores = self.score_set(self.holdout, el=False) if scores is None else scores
        return float(np.mean([r["loss"] for r in scores]))

    def el_due(self) -> bool:
        """Whether this epoch's judging also computes EL_10 (generation): every epoch when SGA
        selects on it, every ``el_every`` epochs when asked, otherwise only before and after."""
        if self.args.select_on == "el10":
            return True
        every = self.args.el_every
        return bool(every) and self.run.epochs % every == 0

    @property
    def thresholds(self) -> Thresholds:
        return Thresholds(**self.run.thresholds)

    # -- the state machine ----------------------------------------------------------------------
    def begin_run(self, control) -> None:
        if self.resume_dir is not None and (self.resume_dir / STATE_FILE).exists():
            self._load_run_state(self.resume_dir)
        else:
            self._start_fresh()
        if self.run.phase == "done":
            control.should_training_stop = True

    def _start_fresh(self) -> None:
        args = self.args
        self.weights = OwnedWeights(self.model)
        scores = self.score_set(self.forget)
        self.run.scores_before = scores
        self.write_scores("scores_before.jsonl", scores)
        holdout_scores = self.score_set(self.holdout, el=False) if self.holdout is not None else None
        thresholds = Thresholds(args.memorized_threshold, args.over_unlearned_threshold, args.mean_threshold)
        if holdout_scores is not None and (args.calibrate_thresholds or args.mean_threshold is None):
            calibrated = calibrate_thresholds([r["ma"] for r in holdout_scores], args.calibration_quantile)
            thresholds = (
                calibrated
                if args.calibrate_thresholds
                else Thresholds(thresholds.memorized_ma, thresholds.over_unlearned_ma, calibrated.mean_ma)
            )
        self.run.thresholds = asdict(thresholds)
        self.run.holdout_loss_before = self.holdout_loss(holdout_scores)
        if self.retain is not None:
            self.run.retain_ma_before = float(np.mean([r["ma"] for r in self.score_set(self.retain, el=False)]))
        self.last_good = self.weights.snapshot()
        self._absorb_scores(scores)
        self._log_epoch(holdout_loss=self.run.holdout_loss_before, trained=0)
        if stop_satisfied(self.run.ma, args.stop_rule, thresholds):
            self._finish("nothing to unlearn: the stop rule already holds")
        else:
            self._maybe_switch_to_finetune()

    def end_epoch(self, control) -> None:
        """Judge the epoch's weights per sequence and decide: stop, restore, switch or go on.

        Costs one teacher-forced pass over the forget set (none with ``score_refresh=step``) and
        one over the holdout; EL_10 only when ``el_due``. Collective: every rank runs it."""
        if self.run.phase == "done":
            return
        self.run.epochs += 1
        trained = len(self.run.selected)
        if any(D.all_gather_objects(self.nonfinite_loss)):
            self._restore_last_good(f"non-finite loss in epoch {self.run.epochs}")
            control.should_training_stop = True
            return

        editing = self.run.phase == "finetune"
        self.clock.start_judging()
        if editing:  # judge the edited weights, then train on from the unedited ones
            trained_weights = self._edit()
        scores = self._epoch_scores(fresh=editing)
        holdout_loss = self.holdout_loss()
        self.clock.end_judging()
        self._absorb_scores(scores)
        self.write_scores(f"scores_epoch{self.run.epochs}.jsonl", scores)
        self._log_epoch(holdout_loss, trained)

        problem = self._nonfinite(scores, holdout_loss)
        guard = self.args.max_holdout_loss_increase
        limit = None if guard is None else self.run.holdout_loss_before * (1 + guard)
        if problem:
            self._restore_last_good(f"{problem} in epoch {self.run.epochs}")
        elif limit is not None and not holdout_loss <= limit:  # fails safe on NaN
            self._restore_last_good(
                f"utility guard: holdout loss {holdout_loss:.4f} rose more than {guard:.2%} "
                f"over {self.run.holdout_loss_before:.4f}",
                diverged=False,
            )
        elif stop_satisfied(self.run.ma, self.args.stop_rule, self.thresholds):
            self._finish(f"{self.args.stop_rule} stop rule holds after epoch {self.run.epochs}")
        else:
            self.last_good = self.weights.snapshot(into=self.last_good)
            if editing:
                self._unedit(trained_weights)
            self._maybe_switch_to_finetune()
            if self.run.epochs >= self.args.num_train_epochs:
                # Not "done": a resumed run with a higher limit carries on from here. Our count
                # decides, not the Trainer's (which infers epochs from steps, and SGA's epochs
                # may have fewer steps than its nominal count).
                self.run.stop_reason = f"epoch limit ({self.args.num_train_epochs:g}) reached before the stop rule held"
                control.should_training_stop = True
        if self.run.phase == "done":
            control.should_training_stop = True

    def log_epoch_time(self) -> None:
        """After end_epoch: the epoch's wall time (training, judging, snapshots, edits), its mean
        optimizer step time and its judging time, in the history and to every reporter."""
        if not self.run.history or self.run.history[-1]["epoch"] != self.run.epochs or self.run.epochs == 0:
            return
        times = self.clock.epoch_times()
        if "time/epoch_s" in self.run.history[-1]:
            return
        self.run.history[-1].update(times)
        self.log(times)

    def _nonfinite(self, scores: list[dict], holdout_loss: float | None) -> str | None:
        """What is non-finite after this epoch, if anything (all ranks agree: scores are
        gathered, and the weight check is reduced over ranks)."""
        if "loss" in scores[0] and not np.all(np.isfinite([r["loss"] for r in scores])):
            return "non-finite forget-set loss"
        if holdout_loss is not None and not np.isfinite(holdout_loss):
            return "non-finite holdout loss"
        if not all(D.all_gather_objects(self.weights.all_finite())):
            return "non-finite weights"
        return None

    def _restore_last_good(self, reason: str, diverged: bool = True) -> None:
        self.weights.write(self.last_good)
        self.run.diverged = self.run.diverged or diverged
        self._finish(f"{reason}: kept the weights of the last good epoch")

    def _epoch_scores(self, fresh: bool) -> list[dict]:
        if fresh or self.args.score_refresh == "epoch":
            return self.score_set(self.forget, el=self.el_due())
        # score_refresh=step: each trained row's MA as its last training forward pass saw it.
        seen: dict[int, float] = {}
        for part in D.all_gather_objects(self.forward_ma):
            seen.update(part)
        return [{"ma": seen.get(i, self.run.ma[i])} for i in range(len(self.forget))]

    def _absorb_scores(self, scores: list[dict]) -> None:
        self.run.ma = [float(r["ma"]) for r in scores]
        # EL_10 is judged when it was computed this time; the report keeps its latest values.
        self.run.el10 = [float(r["el_10"]) for r in scores] if "el_10" in scores[0] else None
        key = self.run.el10 if self.args.select_on == "el10" else self.run.ma
        self.run.selected = (
            sga_selection(key, self.args.sga_gamma)
            if self.args.selects and self.run.phase == "ascent"
            else list(range(len(self.forget)))
        )

    def _edit(self) -> list[torch.Tensor] | None:
        """Make the model theta_base - lambda (theta - theta_base); returns what ``_unedit`` needs.
        Full weights: edited in place (the trained ones kept aside). Adapters: by their scales, so
        last_good keeps the trained adapter and a restore stays edited (AdapterEdit.on)."""
        if self.adapter_edit is not None:
            self.adapter_edit.on()
            return None
        trained = self.weights.snapshot()
        self.weights.apply_negated_task_vector(self.base, self.args.tv_coefficient)
        return trained

    def _unedit(self, trained: list[torch.Tensor] | None) -> None:
        if self.adapter_edit is not None:
            self.adapter_edit.off()
        else:
            self.weights.write(trained)

    def _maybe_switch_to_finetune(self) -> None:
        """TA/TAU: once the ascent brought the mean MA below tv_switch_ma, snapshot theta_base."""
        if self.args.method in ("ta", "tau") and self.run.phase == "ascent":
            if float(np.mean(self.run.ma)) < self.args.tv_switch_ma:
                self.base = self.weights.snapshot()
                if self.adapter_edit is not None:
                    self.adapter_edit.set_base(self.weights, self.base)
                self.run.phase = "finetune"
                self.run.switched_at_epoch = self.run.epochs
                self.run.selected = list(range(len(self.forget)))

    def finalize_weights(self) -> None:
        """After train(): a TA/TAU run that ran out of epochs outputs its edited weights (a run
        that finished already holds its final weights)."""
        if self.run.phase == "finetune":
            self._edit()

    def _finish(self, reason: str) -> None:
        self.run.phase = "done"
        self.run.stop_reason = reason

    # -- outputs ------------------------------------------------------------------------------------
    def write_scores(self, name: str, scores: list[dict]) -> None:
        """Per-sequence scores by id (never the text)."""
        if D.is_main():
            Path(self.args.output_dir).mkdir(parents=True, exist_ok=True)
            write_jsonl(Path(self.args.output_dir) / name, ({"id": i, **s} for i, s in zip(self.forget.ids, scores)))

    def _log_epoch(self, holdout_loss: float | None, trained: int) -> None:
        t = self.thresholds
        counts = verdict_counts(self.run.ma, t.memorized_ma, t.over_unlearned_ma)
        metrics = {
            "forget/ma_mean": float(np.mean(self.run.ma)),
            "forget/memorized": counts["memorized"],
            "forget/over_unlearned": counts["over_unlearned"],
            "sga/selected": trained,
        }
        if self.run.el10 is not None:
            metrics["forget/el10_mean"] = float(np.mean(self.run.el10))
        if holdout_loss is not None:
            metrics["holdout/loss"] = holdout_loss
        self.run.history.append({"epoch": self.run.epochs, "phase": self.run.phase, **metrics})
        # Through Trainer.log, so every --report_to reporter gets the scalars; histograms go to
        # the reporters that have them (ours for TensorBoard keeps the slash names as tags).
        self.log(metrics)
        histograms = {"forget/ma": self.run.ma}
        if self.run.el10 is not None:
            histograms["forget/el10"] = self.run.el10
        log_histograms(self, histograms)

    def save_resumable_checkpoint(self) -> None:
        """A full checkpoint (model, optimizer, our run state) at the current step, whatever
        save_strategy says; collective under DeepSpeed. Returns nothing; the directory is
        ``output_dir/checkpoint-STEP``."""
        checkpoint = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
        if not (checkpoint / STATE_FILE).exists():  # save_strategy=epoch may have written it already
            self._save_checkpoint(self.model, trial=None)
            self.save_run_state(checkpoint)

    def save_run_state(self, checkpoint_dir: Path) -> None:
        torch.save(
            {"base": self.base, "last_good": self.last_good}, checkpoint_dir / f"unlearn_shards_rank{D.rank()}.pt"
        )
        if D.is_main():
            (checkpoint_dir / STATE_FILE).write_text(json.dumps(asdict(self.run)))

    def _load_run_state(self, checkpoint_dir: Path) -> None:
        self.run = RunState(**json.loads((checkpoint_dir / STATE_FILE).read_text()))
        shards = torch.load(checkpoint_dir / f"unlearn_shards_rank{D.rank()}.pt")
        self.base, self.last_good = shards["base"], shards["last_good"]
        self.weights = OwnedWeights(self.model)
        if self.adapter_edit is not None and self.base is not None:
            self.adapter_edit.set_base(self.weights, self.base)  # frozen, so not in the Trainer's checkpoint
            if self.run.phase == "done":
                self.adapter_edit.on()


class EpochClock:
    """Wall seconds of each epoch, of its optimizer steps and of its judging, so users see what
    an epoch costs next to a training step (``time/*`` in the history and every reporter)."""

    def __init__(self):
        self.epoch_start = self.step_start = self.judge_start = 0.0
        self.steps: list[float] = []
        self.judge = 0.0

    @staticmethod
    def _now() -> float:
        # On a GPU the host runs ahead of the device: wait for it at these few boundaries (once
        # per optimizer step, already paid by the Trainer's loss logging) so the times are real.
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def start_epoch(self) -> None:
        self.steps, self.judge, self.epoch_start = [], 0.0, self._now()

    def start_step(self) -> None:
        self.step_start = self._now()

    def end_step(self) -> None:
        self.steps.append(self._now() - self.step_start)

    def start_judging(self) -> None:
        self.judge_start = self._now()

    def end_judging(self) -> None:
        self.judge = self._now() - self.judge_start

    def epoch_times(self) -> dict[str, float]:
        return {
            "time/epoch_s": self._now() - self.epoch_start,
            "time/step_s": float(np.mean(self.steps)) if self.steps else 0.0,
            "time/judge_s": self.judge,
        }


class UnlearnMonitor(TrainerCallback):
    """Hands the Trainer's epoch boundaries and checkpoints to the run's state machine."""

    def __init__(self, trainer: UnlearnTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer.begin_run(control)

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.trainer.clock.start_epoch()

    def on_step_begin(self, args, state, control, **kwargs):
        self.trainer.clock.start_step()

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer.clock.end_step()

    def on_epoch_end(self, args, state, control, **kwargs):
        self.trainer.end_epoch(control)
        self.trainer.log_epoch_time()

    def on_save(self, args, state, control, **kwargs):
        self.trainer.save_run_state(Path(args.output_dir) / f"checkpoint-{state.global_step}")
