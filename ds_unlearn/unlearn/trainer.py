"""``UnlearnTrainer``: every method of ``unlearn/methods.py`` on DeepSpeed ranks, judged per
sequence every epoch.

The training loop is the upstream Trainer's (see loop.SequenceTrainer). This class adds the
run's state machine, driven by ``UnlearnMonitor`` at epoch boundaries:

    ascent   -- unlearn the forget set: GA/GradDiff/KL ascend, NPO minimizes its loss, on every
                forget sequence or on a selection (SGA; under the ``band`` rule the memorized
                ones, while the over-unlearned ones are descended back); retain rows, where the
                method has them, are descended (GradDiff, NPO) or pulled to the original model (KL)
    finetune -- TA/TAU only: descend on the forget set from theta_base; every epoch judge the
                edited weights theta_base - lambda * (theta - theta_base), kept shard by shard
    done     -- the stop rule holds, a guard fired, or epochs ran out

Every judged epoch (epoch 0 is the input model) is a candidate output: the run keeps this rank's
fp32 shards of the best one (``selection.epoch_rank``: stop rule holds, then fewest outliers,
then lowest holdout loss) and outputs those, not the last epoch's.
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
from ..core.errors import InputError, NonFiniteLogitsError
from ..core.files import write_jsonl
from ..core.memorization import MEMORIZED_MA, OVER_UNLEARNED_MA
from ..core.mia import SIGMA_FLOOR, roc_auc
from ..core.passes import PAD_ID, logprob_moments, model_device
from ..core.scorer import score_sequences, scored_tokens
from ..core.verdict import Thresholds, needs_membership
from .loop import SequenceTrainer
from .lora import AdapterEdit
from .losses import (
    IGNORE,
    TERM_CODE,
    npo_loss,
    on_rows,
    per_sequence_capped_nll,
    per_sequence_entropy_shortfall,
    per_sequence_kl,
    per_sequence_profile_gap,
    per_sequence_true_token_gap,
    per_sequence_z_shortfall,
    predicted_tokens,
    undial_targets,
    z_matched_gamma,
)
from .reporting import log_histograms
from .selection import (
    ASCEND,
    PULL_BACK,
    band_directions,
    collapsed,
    epoch_rank,
    match_plan,
    profile_targets,
    rank_matched_sources,
    rank_matched_targets,
    sga_selection,
    step_scale,
    stop_satisfied,
)
from .weights import OwnedWeights

STATE_FILE = "unlearn_state.json"
# match_target: the token statistics whose profiles a forget row is driven to (losses.token_surprise)
PROFILE_STATISTICS = {"loss": (), "tokens": ("nll",), "tokens_z": ("nll", "z"), "reference": (), "undial_z": ("z",)}
# match_target: those whose forget rows take a KL term toward fixed targets (_compute_references)
KL_TARGETS = ("reference", "undial_z")


@dataclass
class RunState:
    """Everything needed to judge, report and resume a run (weights excepted)."""

    phase: str = "ascent"
    ma: list[float] = field(default_factory=list)  # latest per-sequence MA of the forget set
    judged: list[dict] = field(default_factory=list)  # latest per-sequence band_on scores (and MA) it is judged on
    el10: list[float] | None = None
    selected: list[int] = field(default_factory=list)  # forget rows the next epoch trains on
    pulled_back: list[int] = field(default_factory=list)  # band rule: over-unlearned rows descended back
    match_scales: list[float] = field(default_factory=list)  # match: per forget row |loss - target| (nats)
    match_reference: list[float] | None = None  # match: match_holdout's per-sequence losses under the input model
    match_auc: float | None = None  # match: loss-attack AUC, forget set now vs match_reference
    token_cap: float = float("inf")  # match: a forget token ascends only while its NLL is below this (nats)
    entropy_floor: float = 0.0  # match: confidently wrong forget positions are spread up to this entropy (nats)
    z_floor: float | None = None  # match: forget tokens' Min-K%++ scores are lifted up to this (unitless)
    match_auc_current: float | None = None  # ... and vs match_holdout's losses under the current weights
    match_sources: list[int] = field(default_factory=list)  # match_target tokens: per forget row, its non-member
    match_gamma: dict = field(default_factory=dict)  # undial_z: mean logit lowering (nats), share of tokens lowered
    epochs: int = 0
    stop_reason: str | None = None
    switched_at_epoch: int | None = None
    thresholds: dict = field(default_factory=dict)
    thresholds_source: str = ""
    holdout_loss_before: float | None = None
    retain_ma_before: float | None = None
    history: list[dict] = field(default_factory=list)
    scores_before: list[dict] = field(default_factory=list)  # the forget set as the run found it
    diverged: bool = False  # a non-finite loss, score or weight ended the run (best good weights kept)
    best_epoch: int | None = None  # the judged epoch whose weights the run outputs
    best_rank: list | None = None  # its selection.epoch_rank key
    best_why: str = ""
    best_edited: bool = False  # TA/TAU on adapters: the best epoch was judged with the edit on (its scales)


class UnlearnTrainer(SequenceTrainer):
    """A ``transformers.Trainer`` that unlearns a forget set and judges every sequence each epoch.

    Each row's loss term comes from the method's declaration (``unlearn/methods.py``); the
    training loop, DeepSpeed and ``report_to`` are the upstream Trainer's. At each epoch end
    (``end_epoch``, driven by ``UnlearnMonitor``) the forget set is re-scored with one
    teacher-forced pass, each sequence is judged against the thresholds (``core.verdict``), and
    the run stops, restores the best epoch, switches TA/TAU to fine-tuning, or goes on.
    ``self.run`` (``RunState``) holds the verdicts, history and stop reason ``report.json`` is
    built from. Collective: every rank builds it and runs every hook in the same order.

    Args:
        forget: the forget set, as token ids (``core.data.SequenceSet``).
        retain: rows trained on by the methods with a retain term (GradDiff, NPO, KL) and
            measured before and after for all.
        holdout: text the model never saw: calibrates the verdict and guards utility.
        *args, **kwargs: ``transformers.Trainer``'s, with ``args`` an ``UnlearnConfig``.

    ``run_unlearning`` (``unlearn/run.py``) builds it from an ``UnlearnConfig``, validates the
    inputs and saves what it judged; use that rather than this class directly::

        result = run_unlearning(UnlearnConfig(model="smollm2", forget="f.jsonl", output_dir="out"))
    """

    def __init__(
        self,
        *args,
        forget: SequenceSet,
        retain: SequenceSet | None = None,
        holdout: SequenceSet | None = None,
        match: SequenceSet | None = None,
        **kwargs,
    ):
        config = kwargs.get("args")
        # Retain rows (GradDiff, NPO, KL) follow the forget rows in one dataset: index >= len(forget).
        trains_retain = retain is not None and config is not None and config.uses_retain
        sequences = forget.sequences + (retain.sequences if trains_retain else [])
        # Prompt tokens (prompt/response rows) condition each row but no loss term covers them.
        prompts = forget.prompts() + (retain.prompts() if trains_retain else [])
        n_train = len(sequences)
        # match: its non-members follow, kept at the input model's distributions (match_weight > 0).
        if match is not None and config is not None and config.match_weight > 0:
            sequences, prompts = sequences + match.sequences, prompts + match.prompts()
        super().__init__(*args, train_sequences=sequences, train_prompts=prompts, **kwargs)
        self.forget, self.retain, self.holdout = forget, retain, holdout
        self.match = match  # the match method's non-members, scored every epoch under the current weights
        self.n_forget = len(forget)
        self.retain_rows = list(range(self.n_forget, n_train))
        self.match_rows = list(range(n_train, len(sequences)))
        self.run = RunState()
        self.base: list[torch.Tensor] | None = None  # theta_base, this rank's own fp32 elements
        self.best: list[torch.Tensor] | None = None  # the best judged epoch's own fp32 elements
        self.previous: list[torch.Tensor] | None = None  # score_refresh=step: the weights its scores describe
        self.reference_logp: torch.Tensor | None = None  # npo: [n_forget] log pi_ref(y), float64
        # kl / undial: per dataset row (retain rows / forget rows) its target log-probs [T-1, V] fp32
        self.reference_logprobs: dict[int, torch.Tensor] | None = None
        # match tokens: per token statistic, each non-member's sorted values under the input model, float64
        # (tensors, so a resume's torch.load reads them back)
        self.match_profiles: dict[str, list[torch.Tensor]] = {}
        # match_judge current: thresholds calibrated on match_holdout's scores under the epoch's weights
        self.match_thresholds: Thresholds | None = None
        self.weights: OwnedWeights | None = None  # built once the engine and its optimizer exist
        # TA/TAU on LoRA adapters: the edit is made by the adapters' scales (unlearn/lora.py).
        self.adapter_edit = (
            AdapterEdit(self.model, self.args.tv_coefficient) if AdapterEdit.applies(self.model) else None
        )
        self.resume_dir: Path | None = None
        self.given_thresholds: Thresholds | None = None  # run_unlearning(thresholds=): judge by these
        self.started = time.time()
        self.clock = EpochClock()
        self.add_callback(UnlearnMonitor(self))

    # -- SequenceTrainer hooks ----------------------------------------------------------------
    def epoch_rows(self) -> list[int]:
        if self.run.phase == "done":
            return []
        if self.run.phase == "finetune":
            return self.run.selected
        return self.run.selected + self.run.pulled_back + self.retain_rows + self.match_rows

    def row_terms(self, rows: list[int]) -> tuple[list[str], list[float]]:
        """Ascent: selected forget rows take the method's forget term (NPO's loss, else minus
        NLL), pulled-back ones descend, retain rows take the method's retain term (descend, or KL
        toward the input model: KL, match) at ``retain_weight``. Fine-tuning (TA/TAU) descends on every forget row."""
        if self.run.phase != "ascent":
            return ["descend"] * len(rows), [1.0] * len(rows)
        forget_term = self.args.declared.forget_term
        retain_term = self.args.retain_term
        pulled = set(self.run.pulled_back)
        terms, scales = [], []
        for row in rows:
            if self.match_rows and row >= self.match_rows[0]:
                terms.append("kl")
                scales.append(self.args.match_weight)
            elif row >= self.n_forget:
                terms.append(retain_term)
                scales.append(self.args.retain_weight)
            elif self.args.declared.matches and self.args.match_target == "reference":
                terms.append("kl")  # toward the reference model's distributions (_compute_references)
                scales.append(1.0)
            elif self.args.declared.matches and self.args.match_target == "undial_z":
                terms.append("kl_gap")  # toward the z-matched distributions, the true token in log space
                scales.append(1.0)
            elif self.args.declared.matches and self.args.match_target != "loss":
                terms.append("match_profile")  # its own gradient is the gap, token by token
                scales.append(1.0)
            else:
                terms.append("descend" if row in pulled else forget_term)
                # match: each row weighted by its distance to its target (the squared gap's gradient)
                scales.append(self.run.match_scales[row] if self.args.declared.matches else 1.0)
        return terms, scales

    def extra_row_losses(self, rows, terms, logits, labels, nll) -> dict:
        extra = {}
        size = len(terms)
        if bool((terms == TERM_CODE["npo"]).any()):
            seq_logp = -nll * predicted_tokens(labels).to(nll.dtype)
            reference = self.reference_logp[rows.clamp(max=self.n_forget - 1).cpu()].to(nll.device)
            extra["npo"] = npo_loss(seq_logp, reference, self.args.npo_beta)
        # Each term below on the rows that take it only (losses.on_rows): match's step mixes
        # ascended forget rows with KL rows, and a [B, T, V] pass of every term over every row
        # would double the memory and cost the rest of the loss (measured on the demo's match).
        kl_rows = ((terms == TERM_CODE["kl"]) | (terms == TERM_CODE["kl_gap"])).nonzero()[:, 0]
        if len(kl_rows):
            index = kl_rows.to(logits.device)
            reference = self._reference_batch(rows.index_select(0, kl_rows.to(rows.device)), logits)
            extra["kl"] = on_rows(lambda x, y: per_sequence_kl(x, reference, y), index, size, logits, labels)
            if bool((terms == TERM_CODE["kl_gap"]).any()):
                gap = on_rows(lambda x, y: per_sequence_true_token_gap(x, reference, y), index, size, logits, labels)
                extra["kl_gap"] = extra["kl"] + gap
        capped_rows = (terms == TERM_CODE["ascend_capped"]).nonzero()[:, 0]
        if len(capped_rows):
            extra["capped"] = on_rows(self._capped_ascent, capped_rows.to(logits.device), size, logits, labels)
        # One read-back per step (which rows, and below their lengths): the targets are built on the host.
        profiled = (terms == TERM_CODE["match_profile"]).nonzero()[:, 0]
        if len(profiled):
            sources = rows[profiled]

            def profile_gap(part_logits, part_labels):
                return sum(
                    per_sequence_profile_gap(
                        part_logits, part_labels, self._profile_batch(sources, part_labels, stat), stat
                    )
                    for stat in PROFILE_STATISTICS[self.args.match_target]
                )

            extra["profile"] = on_rows(profile_gap, profiled.to(logits.device), size, logits, labels)
        return extra

    def _profile_batch(self, rows, labels, statistic: str) -> torch.Tensor:
        """[B, T-1] targets of match_profile rows (forget rows ``rows``, their ``labels``) for one
        token statistic: the profile of the row's non-member (``run.match_sources``) resampled to
        the row's predicted positions, ascending (zeros after). Host-side, a few hundred numbers
        per step (the count of predicted positions is read back once per batch)."""
        counts = (labels[:, 1:] != IGNORE).sum(-1).tolist()
        batch = torch.zeros(labels.shape[0], labels.shape[1] - 1, dtype=torch.float32)
        for i, (row, n) in enumerate(zip(rows.tolist(), counts)):
            if n:
                profile = self.match_profiles[statistic][self.run.match_sources[row]]
                batch[i, :n] = torch.from_numpy(profile_targets(profile.numpy(), n))
        return batch.to(labels.device)

    def _capped_ascent(self, logits, labels) -> torch.Tensor:
        """[k] the capped NLL of ascended rows (``logits`` [k, T, V], ``labels`` [k, T]) less their
        floors' shortfalls: what their ascent raises (``ascend_capped``)."""
        capped = per_sequence_capped_nll(logits, labels, self.run.token_cap)
        if self.run.entropy_floor > 0:  # confidently wrong positions spread their mass
            capped = capped - per_sequence_entropy_shortfall(logits, labels, self.run.entropy_floor).to(capped.dtype)
        if self.run.z_floor is not None:  # ... and tokens scored below unseen text's low tail are lifted
            capped = capped - per_sequence_z_shortfall(logits, labels, self.run.z_floor).to(capped.dtype)
        return capped

    def _reference_batch(self, rows, logits) -> torch.Tensor:
        """[k, T-1, V] reference log-probabilities of the batch's KL rows (``rows``: their [k] set
        rows; zeros past each row's length; ``logits`` [B, T, V] gives the shape and device)."""
        batch = torch.zeros(len(rows), logits.shape[1] - 1, logits.shape[2], dtype=torch.float32)
        for i, row in enumerate(rows.tolist()):
            ref = self.reference_logprobs[row]
            batch[i, : ref.shape[0]] = ref
        return batch.to(logits.device)

    def lr_factor(self) -> float:
        """Ascent steps shrink with the share of the forget set still ascended (``min_lr_fraction``)."""
        if self.run.phase != "ascent" or self.args.min_lr_fraction >= 1.0 or self.args.declared.matches:
            return 1.0  # match: its rows' weights already shrink with their distance to the targets
        return step_scale(len(self.run.selected), self.n_forget, self.args.min_lr_fraction)

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
            # band_on beyond MA and loss: the Min-K%++ / zlib scores of the same teacher-forced pass.
            membership=needs_membership(self.band_on),
            prompt_lengths=data.prompt_lengths,  # scores of the response only, as training sees it
        )

    def holdout_loss(self, scores: list[dict] | None = None) -> float | None:
        """Mean per-sequence NLL of the holdout (nats/token); NaN when any is non-finite."""
        if self.holdout is None:
            return None
        scores = self.score_set(self.holdout, el=False) if scores is None else scores
        return float(np.mean([r["loss"] for r in scores]))

    def match_scores(self) -> list[dict] | None:
        """The match non-members' per-sequence scores under the current weights (None: no match set)."""
        if self.match is None:
            return None
        return self.score_set(self.match, el=False)

    def _judge(self) -> tuple:
        """What the stop rule and the best epoch judge the forget set by: the thresholds and the
        match AUC. ``match_judge current``: those recalibrated on match_holdout's scores under the
        current weights and the AUC against them; else the run's thresholds and the AUC against
        the input model's losses."""
        if self.args.declared.matches and self.args.match_judge == "current" and self.match_thresholds is not None:
            return self.match_thresholds, self.run.match_auc_current
        return self.thresholds, self.run.match_auc

    def match_target_losses(self, current: list[float] | None) -> list[float]:
        """The non-member losses the match targets are rank-matched to: match_holdout's under the input
        model, or under this epoch's weights (``match_targets_under current``; ``current`` [m] nats)."""
        if self.args.match_targets_under == "current" and current is not None:
            return current
        return self.run.match_reference

    def el_due(self) -> bool:
        """Whether this epoch's judging also computes EL_10 (generation): every epoch when SGA
        selects on it, every ``el_every`` epochs when asked, otherwise only before and after."""
        if self.args.select_on == "el10":
            return True
        every = self.args.el_every
        return bool(every) and self.run.epochs % every == 0

    @property
    def band_on(self) -> tuple[str, ...]:
        """The scores each forget sequence is judged on (``core.verdict``)."""
        given = self.given_thresholds
        return given.band_on if given is not None else self.args.band_on_scores

    @property
    def thresholds(self) -> Thresholds:
        # Rebuilt only when the run state's thresholds change (they hold the holdout's values).
        cached = getattr(self, "_thresholds", None)
        if cached is None or cached[0] is not self.run.thresholds:
            self._thresholds = (self.run.thresholds, Thresholds(**self.run.thresholds))
        return self._thresholds[1]

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
        if self.given_thresholds is not None:
            thresholds, self.run.thresholds_source = self.given_thresholds, "given"
            if any(score not in thresholds.holdout for score in thresholds.positional()):
                thresholds = thresholds.calibrated(holdout_scores or [])
        else:
            thresholds, self.run.thresholds_source = resolve_thresholds(args, holdout_scores)
        self.run.thresholds = asdict(thresholds)
        self.run.holdout_loss_before = self.holdout_loss(holdout_scores)
        if self.retain is not None:
            self.run.retain_ma_before = float(np.mean([r["ma"] for r in self.score_set(self.retain, el=False)]))
        self._compute_references(scores)
        self.best = self.weights.snapshot()
        if args.score_refresh == "step":
            self.previous = self.weights.snapshot()
        self._absorb_scores(scores, self.match_scores())
        self._log_epoch(holdout_loss=self.run.holdout_loss_before, trained=0)
        holds = self._stop_holds()
        self._consider_best(0, holds, self.run.holdout_loss_before, candidate=None)
        if holds:
            self._finish("nothing to unlearn: the stop rule already holds")
        else:
            self._maybe_switch_to_finetune()

    def _stop_holds(self) -> bool:
        thresholds, match_auc = self._judge()
        return stop_satisfied(
            self.run.judged,
            self.args.stop_rule,
            thresholds,
            self.args.max_over_unlearned,
            match_auc=match_auc,
            match_margin=self.args.match_margin,
        )

    def _compute_references(self, forget_scores: list[dict]) -> None:
        """What NPO and KL compare against, computed once from the input model so that no second
        model stays in memory: NPO's sequence log-likelihoods of the forget set (from the scoring
        pass that already ran), KL's log-probabilities over the retain set (one teacher-forced
        pass, kept in host memory on every rank; collective: every rank runs the same batches)."""
        reference = self.args.declared.reference
        if reference == "forget_logp":
            self.reference_logp = torch.tensor(
                [-r["loss"] * scored_tokens(r) for r in forget_scores], dtype=torch.float64
            )
        # Which rows take a KL term toward the input model: retain rows whose term is KL (KL; match
        # with match_retain kl), forget rows under UNDIAL, match's non-members.
        blocks = []
        if self.retain_rows and self.args.retain_term == "kl":
            blocks.append(("retain", self.retain_rows, self.retain.sequences))
        if self.args.declared.matches and self.match is not None:
            # Also at match_weight 0 (no KL rows): the non-members' token NLLs set the cap and profiles.
            blocks.append(("match", self.match_rows, self.match.sequences))
        z_matched = self.args.declared.matches and self.args.match_target == "undial_z"
        if reference == "forget_logprobs" or z_matched:  # after match's: undial_z reads its profiles
            blocks.append(("forget", list(range(self.n_forget)), self.forget.sequences))
        vocab = self.model.config.vocab_size
        gib = sum(len(s) - 1 for _, _, sequences in blocks for s in sequences) * vocab * 4 / 2**30
        if gib > self.args.kl_reference_max_gib:
            which = " + ".join(name for name, _, _ in blocks)
            raise InputError(
                f"kl_reference_max_gib: the original model's {which} log-probabilities need {gib:.1f} GiB "
                f"per rank (limit {self.args.kl_reference_max_gib}); use smaller sets or raise the limit"
            )
        self.reference_logprobs = {} if blocks else None
        for which, kl_rows, sequences in blocks:
            targets = reference_logprobs(self.model, sequences, self.args.score_batch_size)
            if which == "match":
                # The non-members' token NLLs under the input model, over what is scored (a prompt's
                # positions are not): the cap is their quantile, and each is a token_profile target.
                starts = [max(p - 1, 0) for p in self.match.prompts()]
                token_nll = [
                    -t[torch.arange(len(s) - 1), torch.as_tensor(s[1:])][start:]
                    for t, s, start in zip(targets, sequences, starts)
                ]
                self.run.token_cap = float(np.quantile(torch.cat(token_nll).numpy(), self.args.match_token_quantile))
                if self.args.match_entropy_quantile > 0:
                    self.run.entropy_floor = wrong_position_entropy_quantile(
                        targets, sequences, starts, self.args.match_entropy_quantile
                    )
                if self.args.match_z_quantile > 0:
                    self.run.z_floor = token_z_quantile(targets, token_nll, starts, self.args.match_z_quantile)
                self.match_profiles = {"nll": [torch.sort(t.double()).values for t in token_nll]}
                if "z" in PROFILE_STATISTICS[self.args.match_target]:
                    z = []
                    for t, nll, start in zip(targets, token_nll, starts):
                        mu, sigma = logprob_moments(t[start:].double())
                        z.append(torch.sort((nll.double() + mu) / sigma.clamp(min=SIGMA_FLOOR)).values)
                    self.match_profiles["z"] = z
            if which == "forget" and z_matched:
                targets = self._z_matched_targets(targets, forget_scores, token_nll)
            elif which == "forget":  # UNDIAL: the true token's logit lowered by gamma
                gamma = self.args.undial_gamma
                targets = [undial_targets(t, torch.as_tensor(s[1:]), gamma) for t, s in zip(targets, sequences)]
            self.reference_logprobs.update(zip(kl_rows, targets))
        if self.args.declared.matches and self.args.match_target == "reference":
            self.reference_logprobs.update(enumerate(self._reference_model_logprobs(self.forget.sequences)))

    def _z_matched_targets(self, logprobs, forget_scores, match_token_nll) -> list[torch.Tensor]:
        """``match_target undial_z``: each forget row's targets are the input model's distributions
        with every true token's logit lowered (``losses.z_matched_gamma``) until its Min-K%++ token
        score reaches its rank in the profile of the row's non-member (rank-matched by loss, as
        ``tokens``; both over the scored positions). ``logprobs``: the forget rows' input
        log-probabilities [T-1, V]; ``match_token_nll``: the non-members' scored token NLLs.
        Host-side, once. Sets ``run.match_sources`` and the ``match/gamma`` summary."""
        losses = [float(r["loss"]) for r in forget_scores]
        sources = rank_matched_sources(losses, [float(t.double().mean()) for t in match_token_nll])
        starts = [max(p - 1, 0) for p in self.forget.prompts()]
        targets, gammas = [], []
        for row, (t, start) in enumerate(zip(logprobs, starts)):
            tokens = torch.as_tensor(self.forget.sequences[row][1:])
            mu, sigma = logprob_moments(t[start:].double())
            scored = tokens[start:]
            surprise = (-t[start:].double()[torch.arange(len(scored)), scored] + mu) / sigma.clamp(min=SIGMA_FLOOR)
            profile = torch.from_numpy(profile_targets(self.match_profiles["z"][sources[row]].numpy(), len(scored)))
            target = torch.empty_like(surprise)
            target[torch.argsort(surprise, stable=True)] = profile  # rank j of the row gets the profile's j-th
            gamma = torch.zeros(len(tokens), dtype=torch.float64)
            gamma[start:] = z_matched_gamma(t[start:], scored, -target)  # a score is minus the surprise
            targets.append(undial_targets(t, tokens, gamma.to(t.dtype)))
            gammas.append(gamma[start:])
        self.run.match_sources = sources.tolist()
        every = torch.cat(gammas)
        self.run.match_gamma = {"mean": float(every.mean()), "lowered": float((every > 0).double().mean())}
        return targets

    def _reference_model_logprobs(self, sequences) -> list[torch.Tensor]:
        """``reference_logprobs`` of ``--reference`` (a model that never saw the forget set, e.g.
        the checkpoint before fine-tuning) over ``sequences``: loaded, used once and freed, like
        the audit's (partitioned under ZeRO-3); collective."""
        import gc

        from ..core.ds_config import load_ds_config, zero_stage
        from ..core.models import load_for_inference, resolve_model_dir

        ds_config = load_ds_config(self.args.deepspeed) if self.args.deepspeed else None
        model = load_for_inference(
            resolve_model_dir(self.args.reference, "reference"),
            torch.float32,
            ds_config if zero_stage(ds_config) == 3 else None,
        )
        if zero_stage(ds_config) != 3:
            model.to(model_device(self.model))
        targets = reference_logprobs(model, sequences, self.args.score_batch_size)
        del model
        gc.collect()
        return targets

    def end_epoch(self, control) -> None:
        """Judge the epoch's weights per sequence and decide: stop, restore, switch or go on.

        Costs one teacher-forced pass over the forget set (none with ``score_refresh=step``) and
        one over the holdout; EL_10 only when ``el_due``. Collective: every rank runs it."""
        if self.run.phase == "done":
            return
        self.run.epochs += 1
        trained = len(self.run.selected)
        if any(D.all_gather_objects(self.nonfinite_loss)):
            self._restore_best(f"non-finite loss in epoch {self.run.epochs}")
            control.should_training_stop = True
            return

        editing = self.run.phase == "finetune"
        self.clock.start_judging()
        if editing:  # judge the edited weights, then train on from the unedited ones
            trained_weights = self._edit()
        try:
            scores = self._epoch_scores(fresh=editing)
            holdout_loss = self.holdout_loss()
            match_scores = self.match_scores()
        except NonFiniteLogitsError:
            # Raised on every rank alike (the bad rows are gathered before the raise). From the
            # weights this run made, it is divergence, not bad input: keep the best good epoch.
            self.clock.end_judging()
            self._restore_best(f"non-finite logits in epoch {self.run.epochs}")
            control.should_training_stop = True
            return
        self.clock.end_judging()
        self._absorb_scores(scores, match_scores)
        self.write_scores(f"scores_epoch{self.run.epochs}.jsonl", scores)
        self._log_epoch(holdout_loss, trained)

        problem = self._nonfinite(scores, holdout_loss)
        if not problem and collapsed(self.run.holdout_loss_before, holdout_loss, self.model.config.vocab_size):
            problem = f"holdout loss {holdout_loss:.4f} reached a uniform guess's ln(vocab) (the weights collapsed)"
        guard = self.args.max_holdout_loss_increase
        limit = None if guard is None else self.run.holdout_loss_before * (1 + guard)
        if problem:
            self._restore_best(f"{problem} in epoch {self.run.epochs}")
        elif limit is not None and not holdout_loss <= limit:  # fails safe on NaN
            self._restore_best(
                f"utility guard: holdout loss {holdout_loss:.4f} rose more than {guard:.2%} "
                f"over {self.run.holdout_loss_before:.4f}",
                diverged=False,
            )
        elif self._judge_epoch(holdout_loss, editing):
            self._finish(f"{self.args.stop_rule} stop rule holds after epoch {self.run.epochs}")
        else:
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

    def _write_best(self) -> None:
        """Make the model the best judged epoch's. Full weights: the snapshot is that model (edited
        if it was). Adapters: the snapshot is the trained adapter; the edit is made by the scales."""
        self.weights.write(self.best)
        if self.adapter_edit is not None:
            if self.run.best_edited:
                self.adapter_edit.on()
            else:
                self.adapter_edit.off()

    def _restore_best(self, reason: str, diverged: bool = True) -> None:
        self._write_best()
        self.run.diverged = self.run.diverged or diverged
        self._finish(f"{reason}: kept the weights of the best good epoch ({self.run.best_epoch})")

    def _judge_epoch(self, holdout_loss: float | None, editing: bool) -> bool:
        """Offer this epoch's weights as the best so far; True when the stop rule holds.

        With ``score_refresh=step`` the forget scores come from the epoch's training forward
        passes, i.e. from the weights *before* its update: they are paired with those weights
        (the previous snapshot) and that epoch's holdout loss, so the output always is the model
        that was judged. Collective under ZeRO (snapshots)."""
        holds = self._stop_holds()
        if self.args.score_refresh == "step" and not editing:
            previous_loss = self.run.history[-2].get("holdout/loss") if len(self.run.history) > 1 else None
            self._consider_best(self.run.epochs - 1, holds, previous_loss, candidate=self.previous)
            self.previous = self.weights.snapshot(into=self.previous)
        else:
            self._consider_best(self.run.epochs, holds, holdout_loss, candidate=None)
        return holds

    def _consider_best(self, epoch: int, holds: bool, holdout_loss: float | None, candidate) -> None:
        """Keep ``candidate`` (a snapshot; None: the current weights) if it beats the best so far."""
        thresholds, match_auc = self._judge()
        counts = thresholds.counts(self.run.judged)
        distance = abs(match_auc - 0.5) if match_auc is not None else 0.0
        rank = list(epoch_rank(counts["memorized"], counts["over_unlearned"], holds, holdout_loss, distance))
        if self.run.best_rank is not None and tuple(rank) >= tuple(self.run.best_rank):
            return
        if candidate is None:
            self.best = self.weights.snapshot(into=self.best)
        elif candidate is not self.best:
            for buffer, value in zip(self.best, candidate, strict=True):
                buffer.copy_(value)
        loss = "n/a" if holdout_loss is None else f"{holdout_loss:.4f}"
        self.run.best_epoch, self.run.best_rank = epoch, rank
        self.run.best_edited = candidate is None and self.adapter_edit is not None and self.adapter_edit.active
        self.run.best_why = (
            f"{'stop rule holds' if holds else 'stop rule not met'}; {counts['memorized']} memorized + "
            f"{counts['over_unlearned']} over-unlearned; holdout loss {loss}"
        )

    def _epoch_scores(self, fresh: bool) -> list[dict]:
        if fresh or self.args.score_refresh == "epoch":
            return self.score_set(self.forget, el=self.el_due())
        # score_refresh=step: each trained row's MA as its last training forward pass saw it.
        seen: dict[int, float] = {}
        for part in D.all_gather_objects(self.forward_ma):
            seen.update(part)
        return [{"ma": seen.get(i, self.run.ma[i])} for i in range(len(self.forget))]

    def _absorb_scores(self, scores: list[dict], match_scores: list[dict] | None = None) -> None:
        """Take an epoch's forget scores (and the match non-members' losses) into the run state and
        plan the next epoch's rows from them."""
        self.run.ma = [float(r["ma"]) for r in scores]
        keys = dict.fromkeys(("ma", *self.band_on))
        self.run.judged = [{k: float(r[k]) for k in keys} for r in scores]
        # EL_10 is judged when it was computed this time; the report keeps its latest values.
        self.run.el10 = [float(r["el_10"]) for r in scores] if "el_10" in scores[0] else None
        key = self.run.el10 if self.args.select_on == "el10" else self.run.ma
        self.run.pulled_back = []
        match_losses = None if match_scores is None else [float(r["loss"]) for r in match_scores]
        if match_scores is not None and self.args.match_judge == "current":
            self.match_thresholds = self.thresholds.calibrated(match_scores)
        if match_losses is not None:
            # By default the targets stay where the input model puts text it never saw. Under the current
            # weights the non-members' losses rise with the forget set's when only the forget set is
            # ascended (they share its templates): chasing them would erase what the model knows of every
            # such text. With retain rows descended they fall instead, and fixed targets then leave the
            # forget set above them; match_targets_under current follows them.
            if self.run.match_reference is None:
                self.run.match_reference = match_losses
            losses = [float(r["loss"]) for r in scores]
            self.run.match_auc = roc_auc(losses, self.run.match_reference)
            self.run.match_auc_current = roc_auc(losses, match_losses)
        if self.run.phase != "ascent":
            self.run.selected = list(range(self.n_forget))
        elif self.args.declared.matches:
            losses = [float(r["loss"]) for r in scores]
            targets = rank_matched_targets(losses, self.match_target_losses(match_losses))
            self.run.selected, self.run.pulled_back, self.run.match_scales = match_plan(losses, targets)
            if (
                self.args.match_target != "loss"
            ):  # every row trains toward its fixed targets or its non-member's profile
                if self.args.match_target not in KL_TARGETS:
                    self.run.match_sources = rank_matched_sources(losses, self.run.match_reference).tolist()
                self.run.selected, self.run.pulled_back = list(range(self.n_forget)), []
        elif self.args.stop_rule == "band":
            # Two-sided control: ascend the memorized, leave the band, pull the over-unlearned back.
            directions = band_directions(self.run.judged, self.thresholds)
            self.run.selected = [i for i, d in enumerate(directions) if d == ASCEND]
            self.run.pulled_back = [i for i, d in enumerate(directions) if d == PULL_BACK]
        elif self.args.selects:
            self.run.selected = sga_selection(key, self.args.sga_gamma)
        else:
            self.run.selected = list(range(self.n_forget))

    def _edit(self) -> list[torch.Tensor] | None:
        """Make the model theta_base - lambda (theta - theta_base); returns what ``_unedit`` needs.
        Full weights: edited in place (the trained ones kept aside). Adapters: by their scales, so
        the best snapshot keeps the trained adapter and ``_write_best`` sets the scales."""
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
        if self.args.declared.task_vector is not None and self.run.phase == "ascent":
            if float(np.mean(self.run.ma)) < self.args.tv_switch_ma:
                self.base = self.weights.snapshot()
                if self.adapter_edit is not None:
                    self.adapter_edit.set_base(self.weights, self.base)
                self.run.phase = "finetune"
                self.run.switched_at_epoch = self.run.epochs
                self.run.selected = list(range(self.n_forget))
                self.run.pulled_back = []

    def finalize_weights(self) -> None:
        """After train(): the output is the best judged epoch's weights (for TA/TAU in their
        fine-tuning phase, the edited weights that epoch was judged on)."""
        self._write_best()

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
        counts = self.thresholds.counts(self.run.judged)
        metrics = {
            "forget/ma_mean": float(np.mean(self.run.ma)),
            "forget/memorized": counts["memorized"],
            "forget/over_unlearned": counts["over_unlearned"],
            "sga/selected": trained,
        }
        if self.args.stop_rule == "band" and self.run.phase == "ascent":
            metrics["band/pulled_back"] = len(self.run.pulled_back)
        if self.run.match_auc is not None:
            metrics["match/auc"] = self.run.match_auc
            metrics["match/auc_current"] = self.run.match_auc_current
            metrics["match/descended"] = len(self.run.pulled_back)
            metrics["match/mean_gap"] = float(np.mean(self.run.match_scales)) if self.run.match_scales else 0.0
            metrics["match/token_cap"] = self.run.token_cap
            metrics["match/entropy_floor"] = self.run.entropy_floor
            if self.run.z_floor is not None:
                metrics["match/z_floor"] = self.run.z_floor
            if self.match_thresholds is not None:  # match_judge current: among the model's own non-members
                own = self.match_thresholds.counts(self.run.judged)
                metrics["match/memorized_current"] = own["memorized"]
                metrics["match/over_unlearned_current"] = own["over_unlearned"]
            for key, value in self.run.match_gamma.items():  # undial_z's logit lowering (fixed targets)
                metrics[f"match/gamma_{key}"] = value
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

    def log_saved_model_scores(self, scores: list[dict]) -> None:
        """EL_10 of the model as saved (after the last epoch; TA/TAU's edit or the last good weights
        applied), at the final step: the epoch logs carry it only where an epoch computed it."""
        if not scores or "el_10" not in scores[0]:
            return
        el10 = [float(r["el_10"]) for r in scores]
        self.log({"forget/el10_mean": float(np.mean(el10))})
        log_histograms(self, {"forget/el10": el10})

    def save_resumable_checkpoint(self) -> Path:
        """A full checkpoint (model, optimizer, our run state) at the current step, whatever
        save_strategy says; collective under DeepSpeed. Returns its directory,
        ``output_dir/checkpoint-STEP``."""
        checkpoint = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
        if not (checkpoint / STATE_FILE).exists():  # save_strategy=epoch may have written it already
            self._save_checkpoint(self.model, trial=None)
            self.save_run_state(checkpoint)
        return checkpoint

    def save_run_state(self, checkpoint_dir: Path) -> None:
        torch.save(
            {
                "base": self.base,
                "best": self.best,
                "previous": self.previous,
                "kl_reference": self.reference_logprobs,
                "match_profiles": self.match_profiles,
            },
            checkpoint_dir / f"unlearn_shards_rank{D.rank()}.pt",
        )
        if D.is_main():
            (checkpoint_dir / STATE_FILE).write_text(json.dumps(asdict(self.run)))

    def _load_run_state(self, checkpoint_dir: Path) -> None:
        self.run = RunState(**json.loads((checkpoint_dir / STATE_FILE).read_text()))
        shards = torch.load(checkpoint_dir / f"unlearn_shards_rank{D.rank()}.pt")
        self.base, self.best, self.previous = shards["base"], shards["best"], shards["previous"]
        self.weights = OwnedWeights(self.model)
        if self.args.declared.reference == "forget_logp":
            self._compute_references(self.run.scores_before)  # the input model's, kept in the run state
        self.reference_logprobs = shards.get("kl_reference")
        self.match_profiles = shards.get("match_profiles") or {}
        if self.adapter_edit is not None and self.base is not None:
            self.adapter_edit.set_base(self.weights, self.base)  # frozen, so not in the Trainer's checkpoint
            if self.run.phase == "done" and self.run.best_edited:
                self.adapter_edit.on()


def wrong_position_entropy_quantile(logprobs, sequences, starts, quantile: float) -> float:
    """The ``quantile`` of the next-token entropies (nats) at the positions where the input model's
    argmax is not the true token, over text it never saw: ``logprobs`` per sequence [T-1, V] (its
    log-softmax), ``sequences`` the token ids, ``starts`` the first scored position of each. How
    spread a wrong guess on unseen text is: the floor match's entropy term lifts a confidently
    wrong forget position to. 0.0 when no position is wrong."""
    values = []
    for t, s, start in zip(logprobs, sequences, starts):
        t = t[start:].double()
        wrong = t.argmax(-1) != torch.as_tensor(s[1:])[start:]
        values.append((-(t.exp() * t).sum(-1))[wrong])
    every = torch.cat(values)
    return float(np.quantile(every.numpy(), quantile)) if len(every) else 0.0


def token_z_quantile(logprobs, token_nll, starts, quantile: float, sigma_floor: float = 1e-2) -> float:
    """The ``quantile`` of the Min-K%++ token scores ``z_t`` (unitless; ``losses.per_sequence_z_shortfall``,
    sigma floored as there) over text the model never saw: ``logprobs`` per sequence [T-1, V] (the
    input model's log-softmax), ``token_nll`` per sequence its scored positions' NLLs, ``starts``
    the first scored position of each. The floor match lifts a forget token's score to."""
    values = []
    for t, nll, start in zip(logprobs, token_nll, starts):
        mu, sigma = logprob_moments(t[start:].double())
        values.append(-(nll.double() + mu) / sigma.clamp(min=sigma_floor))
    return float(np.quantile(torch.cat(values).numpy(), quantile))


def resolve_thresholds(args, holdout_scores: list[dict] | None) -> tuple[Thresholds, str]:
    """The verdict thresholds of a run and where they came from (``core.verdict``). Per side of MA,
    an explicit level wins; an unset side is judged by mid-rank position among the holdout's scores
    when ``calibrate_thresholds`` (on by default when a holdout is given), else by the ICML code's
    fixed 0.60 / 0.15. Every other ``band_on`` score is judged by holdout position. The mean rule's
    level: explicit, else the holdout's mean MA. Raises InputError for a holdout too small for the
    quantile (checked before compute too, ``UnlearnConfig.check_holdout``)."""
    calibrate = bool(args.calibrate_thresholds) and holdout_scores is not None
    memorized, over = args.memorized_threshold, args.over_unlearned_threshold
    if not calibrate:
        memorized = MEMORIZED_MA if memorized is None else memorized
        over = OVER_UNLEARNED_MA if over is None else over
    explicit = args.memorized_threshold is not None and args.over_unlearned_threshold is not None
    thresholds = Thresholds(memorized, over, args.mean_threshold, args.band_on_scores, args.calibration_quantile)
    if holdout_scores is not None:
        thresholds = thresholds.calibrated(holdout_scores)
    source = "holdout" if thresholds.positional() else ("explicit" if explicit else "fixed")
    return thresholds, source


@torch.no_grad()
def reference_logprobs(model, sequences, batch_size: int) -> list[torch.Tensor]:
    """The model's log-softmax at every predicted position of each sequence, on the host in fp32:
    one [len-1, V] tensor per sequence. Every rank runs the same batches (ZeRO-3 gathers weights
    collectively in each forward) in eval mode, so dropout does not enter the reference."""
    was_training = model.training
    model.eval()
    device = model_device(model)
    out = []
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start : start + batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), PAD_ID, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, seq in enumerate(chunk):
            ids[i, : len(seq)] = torch.as_tensor(seq)
            mask[i, : len(seq)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
        logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1).cpu()
        out.extend(logprobs[i, : len(seq) - 1].clone() for i, seq in enumerate(chunk))
    model.train(was_training)
    return out


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
