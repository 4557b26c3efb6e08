"""``UnlearnConfig``: every setting of an unlearning run, on top of ``TrainingArguments``.

YAML files map onto it key by key (unknown keys are an error) and command-line flags override
YAML. Defaults follow the ICML 2024 reference code (Barbulescu & Triantafillou 2024).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path

from transformers import TrainingArguments

from ..core import distributed as D
from ..core.data import DEFAULT_ID_FIELD, DEFAULT_PROMPT_FIELD, PROMPT_HELP, SCORE_TURNS
from ..core.errors import InputError, param
from ..core.memorization import MEMORIZED_MA, OVER_UNLEARNED_MA
from ..core.scorer import DEFAULT_BATCH_SIZE, DEFAULT_EXTRACT_K
from ..core.seeds import seed_problem
from ..core.verdict import CALIBRATION_QUANTILE, MAX_QUANTILE, check_holdout_size, parse_band_on
from .audit import COMPANIONS
from .methods import METHOD_SETTINGS, METHODS, Method, method_help, methods_reading

STOP_RULES = ("band", "per_sequence", "mean", "match")
MATCH_TARGETS = ("loss", "tokens", "tokens_z", "undial_z", "reference")  # what match drives a forget row to
AUDIT_CHOICES = ("both", "after", "none")  # which models the end-of-run audit covers
# Method settings with their own rule: the selection's (not read under the band rule) and the
# task vector's (None means "the method's default").
# Fields outside the method and stopping groups that report.json lists too.
REPORTED = ("model", "learning_rate", "per_device_train_batch_size", "el_every", "deepspeed")
_CHECKED_ELSEWHERE = ("sga_gamma", "select_on", "tv_coefficient", "tv_switch_ma")


# The field groups, in the order ``--help``, the docs and the docstring show them.
GROUPS = {
    "data": "What to unlearn, from what: the model, the sets and how rows are read",
    "method": "The algorithm and its settings (each method's are declared in unlearn/methods.py)",
    "lora": "LoRA adapters (peft; Hu et al. 2021): train low-rank adapters on a frozen base",
    "stopping": "When it is done: the per-sequence verdict, its thresholds and the stop rule",
    "scoring": "Scoring, outputs and exit status",
    "training": "TrainingArguments defaults that suit unlearning (every other TrainingArguments field works too)",
}


def _help(group: str, text: str, **kwargs):
    """A config field with its ``--help`` text and its group (``GROUPS``) as metadata."""
    assert group in GROUPS, group
    return field(metadata={"help": text, "group": group}, **kwargs)


def _defaulting_to(stop_rule: str) -> list[str]:
    return [m.name for m in METHODS.values() if m.stop_rule == stop_rule]


def _bad(name: str, why: str):
    """A setting the user must fix: one line naming the field."""
    raise InputError(f"{name}: {why}")


@dataclass
class UnlearnConfig(TrainingArguments):
    """Every setting of an unlearning run: the sets, the method, the per-sequence verdict and
    stop rule, LoRA, scoring, and the ``TrainingArguments`` it extends (any of whose fields is a
    setting too, e.g. ``bf16``, ``deepspeed``, ``gradient_accumulation_steps``).

    Building one validates it (``validate``: one ``InputError`` line naming the field) and reads
    no file but the ``deepspeed`` JSON; ``check_files`` checks the paths it names when the run
    starts. From the command line every field is a flag and ``--config FILE.yaml`` gives them
    from a file (``parse_config``); each method's own settings are declared in
    ``unlearn/methods.py``.

    Example (the bundled model, offline)::

        from ds_unlearn.unlearn.config import UnlearnConfig
        from ds_unlearn.unlearn.run import run_unlearning

        config = UnlearnConfig(
            model="smollm2",
            forget="forget.jsonl",
            holdout="holdout.jsonl",
            method="sga",
            output_dir="out/sga",
        )
        result = run_unlearning(config)
        print(result.report["after"]["memorized"])

    Fields, by group (generated from each field's help):
    """

    # -- data (GROUPS) --
    model: str | None = _help(
        "data", "Hugging Face checkpoint directory, Hub model id, or 'smollm2'. Never written to.", default=None
    )
    forget: str | None = _help("data", "Forget set (JSONL/CSV/Parquet; `input_ids` or a text field).", default=None)
    retain: str | None = _help(
        "data", "Optional retain set: memorization we want to keep, measured before/after.", default=None
    )
    holdout: str | None = _help(
        "data", "Optional holdout set the model never saw: utility (loss) and threshold calibration.", default=None
    )
    audit_holdout: str | None = _help(
        "data",
        "Non-members for the end-of-run membership-inference audit: text like the forget set's that the model "
        "never saw (default: holdout).",
        default=None,
    )
    match_holdout: str | None = _help(
        "data",
        "match: non-members drawn like the forget set (never trained on; best not the audit's own), scored under "
        "the current weights every epoch: each forget row's loss is driven to theirs at its own rank "
        "(default: holdout).",
        default=None,
    )
    audit: str = _help(
        "data",
        "What the end-of-run audit covers: 'both' (the input checkpoint and the unlearned model), 'after' (the "
        "unlearned model only: the input checkpoint's audit is already known, e.g. from `ds-unlearn audit` or "
        "an earlier run from it), or 'none'.",
        default="both",
    )
    reference: str | None = _help(
        "data",
        "A reference model for the end-of-run audit (same tokenizer; commonly the model before fine-tuning): "
        "adds the 'ref' attack, loss minus the reference's loss (MIMIR).",
        default=None,
    )
    retrained: str | None = _help(
        "data",
        "A model trained the same way without the forget set, for the end-of-run audit: each attack's AUC under "
        "it, AUC - AUC_retrained with a paired bootstrap interval, PrivLeak (MUSE) and forget quality (TOFU: "
        "KS-test p-value of the forget set's losses).",
        default=None,
    )
    text_field: str = _help("data", "Field holding a row's text.", default="text")
    id_field: str = _help(
        "data",
        "Field holding a row's id (rows without 'id' are numbered; any other field named must exist).",
        default=DEFAULT_ID_FIELD,
    )
    max_length: int | None = _help(
        "data", "Truncate every sequence to this many tokens (the papers use 200).", default=None
    )
    prompt_field: str = _help("data", PROMPT_HELP["prompt_field"], default=DEFAULT_PROMPT_FIELD)
    mixed_prompts: bool = _help("data", PROMPT_HELP["mixed_prompts"], default=False)
    chat_template: bool = _help("data", PROMPT_HELP["chat_template"], default=False)
    score_turns: str = _help("data", PROMPT_HELP["score_turns"] + f" ({' or '.join(SCORE_TURNS)})", default="last")

    # -- method (GROUPS) --
    method: str = _help(
        "method", "The unlearning method (unlearn/methods.py declares each): " + method_help(), default="ga"
    )
    retain_weight: float = _help(
        "method",
        "graddiff/npo/kl: weight of a retain row's term (NLL, or KL for kl) against a forget row's.",
        default=1.0,
    )
    npo_beta: float = _help(
        "method", "npo: beta of (2/beta) log(1 + (pi_theta/pi_ref)^beta) (Zhang et al. 2024: 0.1).", default=0.1
    )
    undial_gamma: float = _help(
        "method",
        "undial: how far the true token's logit is lowered in the original model's distribution the forget "
        "rows are distilled toward (Dong et al. 2024); larger forgets harder.",
        default=10.0,
    )
    match_margin: float = _help(
        "method",
        "match: its stop rule holds once the loss attack's AUC, forget set against match_holdout under the "
        "current weights, is within this of 0.5 (a model that never saw either) and the band rule holds.",
        default=0.05,
    )
    match_weight: float = _help(
        "method",
        "match: weight of the KL term that keeps each match_holdout row at the input model's token "
        "distributions (ascending the forget set lowers the likelihood of all text like it; this holds the "
        "non-members where a model that never saw the forget set would); 0: no such term.",
        default=1.0,
    )
    match_token_quantile: float = _help(
        "method",
        "match: a forget token is ascended only while its NLL is below this quantile of the match_holdout "
        "rows' token NLLs under the input model, so no token ends less likely than unseen text makes it "
        "(1: the whole NLL).",
        default=0.95,
    )
    match_entropy_quantile: float = _help(
        "method",
        "match: an ascended forget row also spreads each position where the model now guesses a wrong token "
        "with less entropy than this quantile of the match_holdout rows' entropies at their wrong guesses under "
        "the input model, up to it (a peaked wrong guess is what Min-K%++ reads); 0: off.",
        default=0.0,
    )
    match_z_quantile: float = _help(
        "method",
        "match: an ascended forget row also lifts each token whose Min-K%++ score is below this quantile of the "
        "match_holdout rows' token scores under the input model, up to it (log-compressed; what that attack "
        "reads is a record's lowest scores); 0: off.",
        default=0.0,
    )
    match_target: str = _help(
        "method",
        "match: what each forget row is driven to. 'loss': the non-members' loss at its rank (its tokens ascended up "
        "to match_token_quantile); 'tokens': the sorted token NLLs of the non-member at its rank (each row's "
        "token-loss profile, so as many of its tokens end mispredicted and as few far below unseen text as that "
        "non-member's); 'tokens_z': those and the profile of its Min-K%++ token scores too (how unlikely each "
        "token is for how peaked the model's next-token distribution is there); 'undial_z': KL toward the input "
        "model's distributions with each true token's logit lowered (UNDIAL, gamma per token) until its Min-K%++ "
        "token score reaches its rank in that non-member's profile, and the token's NLL driven to the lowered "
        "one; 'reference': KL toward --reference's "
        "distributions (a model that never saw the forget set, e.g. the checkpoint before fine-tuning).",
        default="loss",
    )
    match_judge: str = _help(
        "method",
        "match: what its stop rule and best epoch judge the forget set against. 'input': match_holdout's scores "
        "under the input model (the run's thresholds, the loss AUC against its losses then); 'current': its scores "
        "under each epoch's weights (thresholds recalibrated on them, the AUC against them): what the audit asks, "
        "each record among the unlearned model's own scores of text it never saw. The targets follow "
        "match_targets_under.",
        default="input",
    )
    match_targets_under: str = _help(
        "method",
        "match (match_target loss): whose match_holdout losses the forget rows' rank-matched loss targets are "
        "drawn from. 'input': the input model's, fixed for the run; 'current': each epoch's, rescored under the "
        "current weights (what match_judge current and the audit compare against: when the retain rows' descent "
        "lowers the non-members' losses, fixed targets leave the forget set above them).",
        default="input",
    )
    match_retain: str = _help(
        "method",
        "match: the retain rows' term. 'descend': their NLL (a retrained model was trained on them; keeps "
        "memorized records the model should keep, as the demo's are); 'kl': held at the input model's token "
        "distributions (for general text: descending it would fine-tune the model on it).",
        default="descend",
    )
    kl_reference_max_gib: float = _help(
        "method",
        "kl / undial / match: the original model's log-probabilities over the retain (kl; match with "
        "match_retain kl), forget (undial) or match_holdout (match) rows are "
        "computed once and kept in host memory (rows x tokens x vocabulary x 4 bytes, on every rank); refuse "
        "to start above this size.",
        default=8.0,
    )
    min_lr_fraction: float = _help(
        "method",
        "Ascent steps run at learning_rate x (fraction of the forget set still ascended), never below this "
        "fraction: smaller steps as sequences reach the band. 1.0 turns the shrinking off.",
        default=1.0,
    )
    sga_gamma: float = _help(
        "method",
        "SGA/TAU ascent under stop_rule per_sequence or mean: ascend only on sequences scoring at least this "
        "(plus the most memorized one). The band rule selects by memorized_threshold instead (a non-default "
        "value with it is an error).",
        default=0.70,
    )
    select_on: str = _help(
        "method",
        "SGA/TAU's selection score (as sga_gamma): 'ma' or 'el10' (EL_10 needs score_refresh=epoch).",
        default="ma",
    )
    score_refresh: str = _help(
        "method",
        "'epoch': re-score the forget set with the distributed scorer every epoch (the paper's way); "
        "'step': reuse each training forward pass's per-sequence MA (free, one update stale).",
        default="epoch",
    )
    tv_coefficient: float | None = _help(
        "method", "TA/TAU: lambda in theta_base - lambda * tau (default 3.0 TA, 1.0 TAU).", default=None
    )
    tv_switch_ma: float | None = _help(
        "method",
        "TA/TAU: ascend until the forget set's mean MA drops below this, then build the task vector "
        "(default 0.9 TA, 0.5 TAU; 1.0 or more skips the ascent).",
        default=None,
    )

    # -- lora (GROUPS) --
    lora_r: int = _help(
        "lora",
        "LoRA rank: train peft LoRA adapters of this rank on the frozen base (0: off, full fine-tuning). Works with "
        "every method; TA/TAU's task vector is then the adapters' delta (docs/lora.md).",
        default=0,
    )
    lora_alpha: float | None = _help(
        "lora", "LoRA alpha: the adapter delta is (alpha / r) B A (default 2 r).", default=None
    )
    lora_dropout: float = _help(
        "lora", "Dropout on the adapters' input while training (judging never drops).", default=0.0
    )
    lora_target_modules: str | None = _help(
        "lora",
        "Modules that get adapters: comma-separated names (q_proj,v_proj) or 'all-linear' (default: peft's "
        "choice for the architecture, else all-linear).",
        default=None,
    )
    adapter: str | None = _help(
        "lora",
        "A peft LoRA adapter directory on --model to unlearn from: its adapters are trained (base frozen), "
        "with the adapter's own settings (no --lora_r).",
        default=None,
    )
    merge_adapter: bool = _help(
        "lora",
        "With LoRA: also write output_dir/model, a plain Hugging Face checkpoint with the adapter merged "
        "(needs a local safetensors checkpoint as --model).",
        default=False,
    )

    # -- stopping (GROUPS) --
    stop_rule: str | None = _help(
        "stopping",
        "'band': every epoch ascend the memorized sequences, leave those inside the band alone, descend the "
        "over-unlearned ones back, and stop when none is memorized and at most max_over_unlearned are "
        f"over-unlearned (default for {', '.join(_defaulting_to('band'))}); 'per_sequence': stop when no forget "
        f"sequence is memorized (default for {', '.join(_defaulting_to('per_sequence'))}); 'mean': when the mean "
        "MA is below mean_threshold; 'match' (match only, its default): the band rule holds and the forget set's "
        "loss is as likely as match_holdout's (AUC within match_margin of 0.5).",
        default=None,
    )
    max_over_unlearned: int = _help(
        "stopping", "The band rule's tolerance: over-unlearned sequences allowed at the end.", default=0
    )
    memorized_threshold: float | None = _help(
        "stopping",
        "A sequence with MA at or above this counts as memorized (default: calibrated on the holdout when one "
        f"is given, else {MEMORIZED_MA}).",
        default=None,
    )
    over_unlearned_threshold: float | None = _help(
        "stopping",
        "A sequence with MA at or below this counts as over-unlearned (default: calibrated on the holdout when "
        f"one is given, else {OVER_UNLEARNED_MA}).",
        default=None,
    )
    mean_threshold: float | None = _help(
        "stopping",
        "The 'mean' rule's MA level (Jang et al.: 0.2994 for GPT-Neo 125M); default: the holdout's mean MA.",
        default=None,
    )
    calibrate_thresholds: bool | None = _help(
        "stopping",
        "Derive the thresholds not set explicitly from the holdout set's MA distribution (default: yes when a "
        "holdout is given).",
        default=None,
    )
    calibration_quantile: float = _help(
        "stopping",
        "With calibrate_thresholds: memorized beyond the holdout's (1-q) mid-rank position (ties count half), "
        "over-unlearned below its q position; the holdout needs at least ceil(k/q) rows for k band_on scores "
        "(each is cut at q/k).",
        default=CALIBRATION_QUANTILE,
    )
    band_on: str = _help(
        "stopping",
        "Comma list of the per-sequence scores a forget sequence is judged on (ma, loss, zlib, min_k, min_k++): "
        "in band only when each sits inside the holdout's central range; outside on the member side it is "
        "unlearned, on the other side pulled back. All come from one teacher-forced pass; beyond ma they need "
        "a holdout.",
        default="ma",
    )
    max_holdout_loss_increase: float | None = _help(
        "stopping",
        "Utility guard: stop and keep the last good weights once holdout loss exceeds its starting value "
        "by this fraction.",
        default=None,
    )

    # -- scoring (GROUPS) --
    extract_k: int = _help("scoring", "K of the k-extractability reported per sequence.", default=DEFAULT_EXTRACT_K)
    score_batch_size: int = _help(
        "scoring", "Sequences / continuations per forward pass when scoring.", default=DEFAULT_BATCH_SIZE
    )
    el_every: int = _help(
        "scoring",
        "Also compute EL_10 (greedy generation) every N epochs; 0: only before the first and after the last "
        "epoch. Per-epoch verdicts use MA from one teacher-forced pass, as the ICML code does.",
        default=0,
    )
    overwrite: bool = _help("scoring", "Replace the results of an earlier run in output_dir.", default=False)
    allow_divergence: bool = _help(
        "scoring",
        "Exit 0 even when divergence ended the run: a non-finite loss, score or weight, or a holdout loss "
        "that reached a uniform guess's ln(vocab) (the last good weights are "
        "saved either way and the report says so); by default such a run exits 1.",
        default=False,
    )

    # -- training (GROUPS) --
    learning_rate: float = _help("training", "Adam learning rate (the paper: 5e-5).", default=5e-5)
    adam_beta2: float = _help("training", "Adam beta2 (the paper: 0.98).", default=0.98)
    num_train_epochs: float = _help(
        "training", "Upper bound on epochs; the stop rule usually ends the run earlier.", default=30
    )
    lr_scheduler_type: str = _help(
        "training", "Constant: the stopping epoch is unknown in advance.", default="constant"
    )
    logging_steps: float = _help(
        "training", "Log train/loss every optimizer step (one per epoch in the paper's setting).", default=1
    )
    save_strategy: str = _help(
        "training",
        "'no': save the final model only, plus one resumable checkpoint when the run ends at its epoch limit "
        "before the stop rule held (see save_resumable); 'epoch': also a checkpoint every epoch "
        "(see save_total_limit).",
        default="no",
    )
    save_total_limit: int | None = _help(
        "training", "With save_strategy=epoch: keep only this many newest checkpoints.", default=1
    )
    save_resumable: bool = _help(
        "training",
        "When the epoch limit ends the run before the stop rule held, save output_dir/checkpoint-STEP to "
        "resume from (model, optimizer state and the run's own state: about 4x the model's size on disk). "
        "False: the final model only (the demo's choice).",
        default=True,
    )
    report_to: None | str | list[str] = _help("training", "TensorBoard by default.", default="tensorboard")
    ignore_data_skip: bool = _help(
        "training",
        "Resume at the next whole epoch (checkpoints are only taken at epoch ends, and an epoch may "
        "have fewer steps than the Trainer's nominal count: SGA trains only its selection).",
        default=True,
    )
    remove_unused_columns: bool = _help(
        "training", "Keep every column: the collator needs row indices and weights.", default=False
    )

    def __post_init__(self):
        # No side effects here: the process entry (commands/, launch/) sets up the environment
        # and accelerate's state before building the config (commands.process).
        self.validate()
        super().__post_init__()

    def _check_report_to(self) -> None:
        """Names transformers knows and whose package is installed; the Trainer would otherwise
        raise only after the model has loaded."""
        from transformers.integrations.integration_utils import (
            INTEGRATION_TO_CALLBACK,
            get_available_reporting_integrations,
        )

        reporters = [self.report_to] if isinstance(self.report_to, str) else list(self.report_to or [])
        available = set(get_available_reporting_integrations())
        for name in reporters:
            if name in ("none", "all"):
                continue
            if name not in INTEGRATION_TO_CALLBACK:
                _bad(
                    "report_to",
                    f"unknown reporter {name!r}: one of none, all, {', '.join(sorted(INTEGRATION_TO_CALLBACK))}",
                )
            if name not in available:
                _bad(
                    "report_to", f"{name} is not installed here (pip install {name.replace('_', '-')}, or pick another)"
                )

    def validate(self) -> None:
        """One clear line per problem, naming the field (InputError), group by group. Reads no
        file: the paths are checked by ``check_files`` when the run starts. (TrainingArguments
        itself parses the ``deepspeed`` JSON while the config is built, so that one file is read
        here, to name it in one line if it is missing or malformed.)"""
        self._check_numbers()
        self._check_data()
        self._check_method()
        self._check_stop()
        self._check_training()
        self._check_lora()
        self._check_scoring()

    def _check_numbers(self) -> None:
        # NaN passes every `x <= 0` check below and inf overflows the Trainer's step count; no
        # setting (ours or TrainingArguments') means anything as a non-finite number.
        for f in fields(self):
            value = getattr(self, f.name, None)
            if isinstance(value, float) and not math.isfinite(value):
                _bad(f.name, f"must be a finite number, got {value}")

    def _check_data(self) -> None:
        if not self.model:
            _bad("model", "required (a checkpoint directory or 'smollm2')")
        if not self.forget:
            _bad("forget", "required (the forget set file)")
        if not self.output_dir:  # TrainingArguments would write to ./trainer_output
            _bad("output_dir", "required (where the unlearned model, scores and report go)")
        if self.audit not in AUDIT_CHOICES:
            _bad("audit", f"must be one of {', '.join(AUDIT_CHOICES)}, got {self.audit!r}")

    def _check_method(self) -> None:
        if self.method not in METHODS:
            _bad("method", f"must be one of {', '.join(METHODS)}, got {self.method!r}")
        declared = self.declared
        if not 0.0 <= self.sga_gamma <= 1.0:
            _bad("sga_gamma", f"must lie in [0, 1], got {self.sga_gamma}")
        if self.select_on not in ("ma", "el10"):
            _bad("select_on", f"must be 'ma' or 'el10', got {self.select_on!r}")
        if self.score_refresh not in ("epoch", "step"):
            _bad("score_refresh", f"must be 'epoch' or 'step', got {self.score_refresh!r}")
        if declared.matches and self.score_refresh == "step":
            _bad(
                "score_refresh",
                f"method {self.method} plans each epoch from its rows' losses: needs score_refresh=epoch",
            )
        if self.select_on == "el10" and self.score_refresh == "step":
            _bad("select_on", "el10 needs score_refresh=epoch (a training pass gives MA only)")
        if declared.needs_retain and not self.retain:
            _bad("retain", f"method {self.method} trains on the retain set: pass {param('retain')}")
        if self.retain_weight < 0:
            _bad("retain_weight", f"must be 0 or more, got {self.retain_weight}")
        if self.npo_beta <= 0:
            _bad("npo_beta", f"must be positive, got {self.npo_beta}")
        if not self.undial_gamma > 0:
            _bad("undial_gamma", f"must be positive, got {self.undial_gamma}")
        if declared.matches and not 0.0 <= self.match_entropy_quantile < 1.0:
            _bad("match_entropy_quantile", f"must lie in [0, 1), got {self.match_entropy_quantile}")
        if declared.matches and not 0.0 <= self.match_z_quantile < 1.0:
            _bad("match_z_quantile", f"must lie in [0, 1), got {self.match_z_quantile}")
        if declared.matches and self.match_judge not in ("input", "current"):
            _bad("match_judge", f"must be 'input' or 'current', got {self.match_judge!r}")
        if declared.matches and self.match_targets_under not in ("input", "current"):
            _bad("match_targets_under", f"must be 'input' or 'current', got {self.match_targets_under!r}")
        if declared.matches and self.match_target not in MATCH_TARGETS:
            _bad("match_target", f"must be one of {', '.join(MATCH_TARGETS)}, got {self.match_target!r}")
        if declared.matches and self.match_targets_under == "current" and self.match_target != "loss":
            _bad(
                "match_targets_under",
                "'current' needs match_target loss (the other targets are token profiles or distributions, "
                f"not losses to rescore), got {self.match_target!r}",
            )
        if declared.matches and self.match_target == "reference" and not self.reference:
            _bad(
                "match_target",
                f"'reference' distils the forget rows toward a model that never saw them: pass {param('reference')}",
            )
        if declared.matches and self.match_retain not in ("descend", "kl"):
            _bad("match_retain", f"must be 'descend' or 'kl', got {self.match_retain!r}")
        if declared.matches and not 0.0 < self.match_token_quantile <= 1.0:
            _bad("match_token_quantile", f"must lie in (0, 1], got {self.match_token_quantile}")
        if declared.matches and self.match_weight < 0:
            _bad("match_weight", f"must be 0 or more, got {self.match_weight}")
        if declared.matches and not 0.0 < self.match_margin < 0.5:
            _bad("match_margin", f"must lie in (0, 0.5), got {self.match_margin}")
        if declared.matches and not (self.match_holdout or self.holdout):
            _bad(
                "match_holdout",
                f"method {self.method} drives the forget set to non-members' losses: pass {param('match_holdout')} "
                f"(text drawn like the forget set that the model never saw) or {param('holdout')}",
            )
        # A setting the method never reads is a mistake the run would hide (report.json shows them as null).
        for name in METHOD_SETTINGS:
            if name in _CHECKED_ELSEWHERE or name in declared.settings:
                continue
            if getattr(self, name) != type(self).__dataclass_fields__[name].default:
                _bad(name, f"only applies to {'/'.join(methods_reading(name))}, not {self.method}")
        if not 0.0 < self.min_lr_fraction <= 1.0:
            _bad("min_lr_fraction", f"must lie in (0, 1], got {self.min_lr_fraction}")
        if self.kl_reference_max_gib <= 0:
            _bad("kl_reference_max_gib", "must be positive")
        if declared.task_vector is not None:
            coefficient, switch = declared.task_vector
            self.tv_coefficient = coefficient if self.tv_coefficient is None else self.tv_coefficient
            self.tv_switch_ma = switch if self.tv_switch_ma is None else self.tv_switch_ma
            if self.tv_coefficient <= 0:
                _bad("tv_coefficient", "must be positive")
        elif self.tv_coefficient is not None or self.tv_switch_ma is not None:
            _bad("tv_coefficient", f"only applies to {'/'.join(methods_reading('tv_coefficient'))}, not {self.method}")

    def _check_stop(self) -> None:
        if self.stop_rule is None:
            self.stop_rule = self.declared.stop_rule
        if self.stop_rule not in STOP_RULES:
            _bad("stop_rule", f"must be one of {', '.join(STOP_RULES)}, got {self.stop_rule!r}")
        if self.stop_rule == "match" and not self.declared.matches:
            _bad("stop_rule", f"'match' judges the match method's targets; {self.method} has none")
        # SGA's selection (and TAU's ascent) reads gamma and its score only outside the band rule: the band
        # ascends every sequence at or above memorized_threshold. A setting nothing reads is an error.
        for name in ("sga_gamma", "select_on"):
            if getattr(self, name) == type(self).__dataclass_fields__[name].default:
                continue
            if not self.declared.selects:
                _bad(name, f"only applies to {'/'.join(methods_reading(name))}, not {self.method}")
            if self.stop_rule == "band":
                _bad(
                    name,
                    "not read under stop_rule band (it ascends every sequence with MA >= memorized_threshold); "
                    f"pass {param('stop_rule')} per_sequence or mean to select by it",
                )
        if self.max_over_unlearned < 0:
            _bad("max_over_unlearned", f"must be 0 or more, got {self.max_over_unlearned}")
        memorized = MEMORIZED_MA if self.memorized_threshold is None else self.memorized_threshold
        over = OVER_UNLEARNED_MA if self.over_unlearned_threshold is None else self.over_unlearned_threshold
        if not 0.0 <= over < memorized <= 1.0:
            _bad("memorized_threshold", "need 0 <= over_unlearned_threshold < memorized_threshold <= 1")
        if self.calibrate_thresholds is None:
            self.calibrate_thresholds = bool(self.holdout)
        if self.calibrate_thresholds and not self.holdout:
            _bad("calibrate_thresholds", f"needs a holdout set ({param('holdout')})")
        if not 0.0 < self.calibration_quantile <= MAX_QUANTILE:
            _bad("calibration_quantile", f"must lie in (0, {MAX_QUANTILE}], got {self.calibration_quantile}")
        self._check_band_on()
        if self.stop_rule == "mean" and self.mean_threshold is None and not self.holdout:
            _bad("mean_threshold", "the 'mean' stop rule needs mean_threshold or a holdout set to calibrate it")
        if self.max_holdout_loss_increase is not None:
            if self.max_holdout_loss_increase <= 0:
                _bad("max_holdout_loss_increase", "must be positive")
            if not self.holdout:
                _bad("max_holdout_loss_increase", f"the utility guard needs a holdout set ({param('holdout')})")

    def _check_training(self) -> None:
        if not self.num_train_epochs > 0:
            _bad("num_train_epochs", f"must be positive, got {self.num_train_epochs:g}")
        if self.num_train_epochs != int(self.num_train_epochs):  # a fraction would run a whole extra epoch
            _bad("num_train_epochs", f"must be whole epochs (judged at epoch ends), got {self.num_train_epochs:g}")
        if not self.learning_rate > 0:
            _bad("learning_rate", f"must be positive, got {self.learning_rate:g}")
        for name in ("per_device_train_batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                _bad(name, f"must be at least 1, got {getattr(self, name)}")
        if seed_problem(self.seed):
            _bad("seed", seed_problem(self.seed))
        self._check_report_to()
        if isinstance(self.deepspeed, str):
            from ..core.ds_config import load_ds_config

            load_ds_config(self.deepspeed)  # one line naming the file if it is missing or not JSON

    def _check_scoring(self) -> None:
        if self.el_every < 0:
            _bad("el_every", f"must be 0 (before and after only) or a positive number of epochs, got {self.el_every}")
        if self.extract_k < 1:
            _bad("extract_k", "must be at least 1")
        if self.score_batch_size < 1:
            _bad("score_batch_size", "must be at least 1")
        if self.max_length is not None and self.max_length < max(11, self.extract_k + 1):
            _bad("max_length", f"must leave room for EL_10 and extract_k={self.extract_k}")

    def check_files(self) -> None:
        """What the settings name on disk, checked when the run starts (``run_unlearning``),
        before anything loads or is written: the audit's companion models, the sets' files
        against the forget set's, the checkpoint to resume and the adapter to train. Raises
        InputError naming the field."""
        for name in COMPANIONS:  # the end-of-run audit's reference / retrained models
            if getattr(self, name):
                from .audit import companion_problem

                problem = companion_problem(self, getattr(self, name), name)
                if problem:
                    _bad(name, problem)
        for name in ("holdout", "retain", "audit_holdout", "match_holdout"):
            other = getattr(self, name, None)
            if other and Path(other).resolve() == Path(self.forget).resolve():
                _bad(name, f"is the forget set's own file ({other}); it must hold other sequences")
        resume = self.resume_from_checkpoint
        if isinstance(resume, str) and resume.lower() not in ("true", "false"):
            if not (Path(resume) / "unlearn_state.json").is_file():
                _bad(
                    "resume_from_checkpoint",
                    f"{resume} is not a checkpoint of an unlearning run (no unlearn_state.json)",
                )
            self._check_resume_launch(Path(resume))
        if self.adapter and not (Path(self.adapter) / "adapter_config.json").is_file():
            _bad("adapter", f"{self.adapter} is not a peft adapter directory (no adapter_config.json)")

    def _check_resume_launch(self, checkpoint: Path) -> None:
        """A checkpoint resumes only under the launch that wrote it: it holds one run-state shard per
        rank, and under DeepSpeed (``global_step*/``) an optimizer partitioned over those ranks."""
        # Each rank checks its own shard (on nodes without a shared file system a node holds only its
        # ranks' shards), and that no shard belongs to a rank this run does not have.
        ranks = (p.stem.removeprefix("unlearn_shards_rank") for p in checkpoint.glob("unlearn_shards_rank*.pt"))
        shards = {int(r) for r in ranks if r.isdigit()}
        if not shards:
            _bad("resume_from_checkpoint", f"{checkpoint} has no unlearn_shards_rank*.pt (an incomplete checkpoint)")
        saved = (max(shards) + 1, any(checkpoint.glob("global_step*")))
        now = (D.world_size_from_env(), bool(self.deepspeed))
        if D.rank_from_env() not in shards or saved[0] > now[0] or saved[1] != now[1]:

            def launch(n: int, deepspeed: bool) -> str:
                return f"{n} rank{'s' * (n != 1)} {'with' if deepspeed else 'without'} DeepSpeed"

            _bad(
                "resume_from_checkpoint",
                f"{checkpoint} was saved by {launch(*saved)} and this run has {launch(*now)}; "
                "resume it the way it was launched",
            )
        try:
            done = json.loads((checkpoint / "unlearn_state.json").read_text()).get("epochs", 0)
        except (ValueError, AttributeError):
            _bad("resume_from_checkpoint", f"{checkpoint}/unlearn_state.json is not a JSON object")
        if self.num_train_epochs <= done:  # the Trainer would train nothing, rewrite the outputs and exit 0
            _bad(
                "num_train_epochs",
                f"{checkpoint} already ran {done} epochs: pass more than {done} to continue it",
            )

    def _check_band_on(self) -> None:
        try:
            scores = parse_band_on(self.band_on)
        except InputError as e:
            _bad("band_on", str(e).removeprefix("band_on: "))
        explicit = self.memorized_threshold is not None or self.over_unlearned_threshold is not None
        if explicit and "ma" not in scores:
            _bad("memorized_threshold", "MA levels are read only when band_on includes ma")
        if scores != ("ma",) and not (self.holdout and self.calibrate_thresholds):
            _bad(
                "band_on", f"{self.band_on!r} is judged by position among the holdout's scores: pass {param('holdout')}"
            )
        if scores != ("ma",) and self.score_refresh == "step":
            _bad("band_on", "score_refresh=step judges MA only (a training pass gives no membership scores)")

    def check_holdout(self, rows: int, match_rows: int | None = None) -> None:
        """Before compute: a holdout that calibrates a verdict must place a sequence at the quantile
        asked (``core.verdict.check_holdout_size``), and so must match_holdout (``match_rows``) when
        match judges by it (``match_judge current``). Raises InputError naming the set."""
        if self.calibrate_thresholds and self.holdout and self.calibration_quantile_used:
            check_holdout_size(rows, self.calibration_quantile / len(self.band_on_scores), "holdout")
            if self.declared.matches and self.match_judge == "current" and match_rows is not None:
                check_holdout_size(
                    match_rows,
                    self.calibration_quantile / len(self.band_on_scores),
                    "match_holdout (match_judge current)",
                )

    @property
    def calibration_quantile_used(self) -> bool:
        """Whether any verdict is judged by holdout position (an MA side left unset, or band_on beyond ma)."""
        explicit = self.memorized_threshold is not None and self.over_unlearned_threshold is not None
        return not explicit or self.band_on_scores != ("ma",)

    @property
    def band_on_scores(self) -> tuple[str, ...]:
        """``band_on`` as score names."""
        return parse_band_on(self.band_on)

    def _check_lora(self) -> None:
        if self.lora_r < 0:
            _bad("lora_r", f"must be a positive rank, or 0 for full fine-tuning, got {self.lora_r}")
        if self.adapter and self.lora_r:
            _bad("lora_r", f"{param('adapter')} trains that adapter with its rank and targets; drop {param('lora_r')}")
        if not self.uses_lora:
            given = [
                name
                for name, off in (("lora_alpha", None), ("lora_target_modules", None), ("merge_adapter", False))
                if getattr(self, name) != off
            ]
            if self.lora_dropout:
                given.append("lora_dropout")
            if given:
                _bad(given[0], f"only applies with LoRA ({param('lora_r')} R > 0, or {param('adapter')})")
            return
        if self.lora_r:
            self.lora_alpha = 2.0 * self.lora_r if self.lora_alpha is None else self.lora_alpha
            if not self.lora_alpha > 0:
                _bad("lora_alpha", f"must be positive, got {self.lora_alpha:g}")
            if not 0.0 <= self.lora_dropout < 1.0:
                _bad("lora_dropout", f"must lie in [0, 1), got {self.lora_dropout:g}")
            if self.lora_target_modules is not None and not self.target_modules:
                _bad("lora_target_modules", "names no module (comma-separated names, or 'all-linear')")

    @property
    def uses_lora(self) -> bool:
        """Whether the run trains LoRA adapters (new ones, or an --adapter's) on a frozen base."""
        return self.lora_r > 0 or bool(self.adapter)

    @property
    def target_modules(self) -> str | list[str] | None:
        """lora_target_modules as peft takes it: None (peft's default), 'all-linear', or names."""
        if self.lora_target_modules is None or self.lora_target_modules.strip() == "all-linear":
            return None if self.lora_target_modules is None else "all-linear"
        return [name.strip() for name in self.lora_target_modules.split(",") if name.strip()]

    def reported_settings(self) -> dict:
        """The settings ``report.json`` lists, from the field metadata: every field of the
        ``method`` and ``stopping`` groups (a method setting this method does not read is null)
        and ``REPORTED``, in field order."""
        settings = {}
        for f in fields(self):
            if f.metadata.get("group") in ("method", "stopping") or f.name in REPORTED:
                unread = f.name in METHOD_SETTINGS and f.name not in self.declared.settings
                settings[f.name] = None if unread else getattr(self, f.name)
        return settings

    @property
    def declared(self) -> Method:
        """The method's declaration (``unlearn/methods.py``)."""
        return METHODS[self.method]

    @property
    def selects(self) -> bool:
        """Whether the ascent trains on a selection (SGA, and TAU's ascent) or on everything."""
        return self.declared.selects

    @property
    def retain_term(self) -> str | None:
        """The loss term of a retain row: the method's (``Method.retain_term``), or match's
        ``match_retain``."""
        return self.match_retain if self.declared.matches else self.declared.retain_term

    @property
    def uses_retain(self) -> bool:
        """Whether retain rows are trained on (GradDiff, KL; NPO when a retain set is given)."""
        return self.declared.uses_retain_set and bool(self.retain) and self.retain_weight > 0


def fields_doc(cls=None) -> str:
    """``cls``'s own fields (default ``UnlearnConfig``) by group, each with its type, default and
    help, as the class docstring and the docs' configuration page list them."""
    cls = cls or UnlearnConfig
    own = [f for f in fields(cls) if "group" in f.metadata]
    lines = []
    for group, title in GROUPS.items():
        members = [f for f in own if f.metadata["group"] == group]
        if not members:
            continue
        lines += ["", f"    {title}:"]
        for f in members:
            lines.append(f"        {f.name} (default {f.default!r}): {f.metadata['help']}")
    return "\n".join(lines)


UnlearnConfig.__doc__ += fields_doc() + "\n"
UnlearnConfig.GROUP_TITLES = GROUPS  # --help lists the fields under these titles (commands/parsing.py)
