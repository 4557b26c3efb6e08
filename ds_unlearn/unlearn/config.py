"""``UnlearnConfig``: every setting of an unlearning run, on top of ``TrainingArguments``.

YAML files map onto it key by key (unknown keys are an error) and command-line flags override
YAML. Defaults follow the ICML 2024 reference code (REFERENCE §3).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path

from transformers import TrainingArguments

from ..core import distributed as D
from ..core.data import DEFAULT_ID_FIELD, DEFAULT_PROMPT_FIELD, PROMPT_HELP, SCORE_TURNS
from ..core.errors import InputError
from ..core.memorization import MEMORIZED_MA, OVER_UNLEARNED_MA
from ..core.scorer import DEFAULT_BATCH_SIZE, DEFAULT_EXTRACT_K
from ..core.seeds import seed_problem
from ..core.verdict import CALIBRATION_QUANTILE, MAX_QUANTILE, check_holdout_size, parse_band_on

METHODS = ("ga", "sga", "ta", "tau", "graddiff", "npo", "kl", "undial")
STOP_RULES = ("band", "per_sequence", "mean")
AUDIT_CHOICES = ("both", "after", "none")  # which models the end-of-run audit covers
# Methods that train on the retain set too (GradDiff and KL need it; NPO uses it when given).
RETAIN_METHODS = ("graddiff", "npo", "kl")
# Per method: (ascent with selection?, task-vector coefficient, mean MA that ends the ascent).
TASK_VECTOR_DEFAULTS = {"ta": (3.0, 0.9), "tau": (1.0, 0.5)}


def _help(text: str, **kwargs):
    return field(metadata={"help": text}, **kwargs)


@dataclass
class UnlearnConfig(TrainingArguments):
    # What to unlearn, from what.
    model: str | None = _help(
        "Hugging Face checkpoint directory, Hub model id, or 'smollm2'. Never written to.", default=None
    )
    forget: str | None = _help("Forget set (JSONL/CSV/Parquet; `input_ids` or a text field).", default=None)
    retain: str | None = _help(
        "Optional retain set: memorization we want to keep, measured before/after.", default=None
    )
    holdout: str | None = _help(
        "Optional holdout set the model never saw: utility (loss) and threshold calibration.", default=None
    )
    audit_holdout: str | None = _help(
        "Non-members for the end-of-run membership-inference audit: text like the forget set's that the model "
        "never saw (default: holdout).",
        default=None,
    )
    audit: str = _help(
        "What the end-of-run audit covers: 'both' (the input checkpoint and the unlearned model), 'after' (the "
        "unlearned model only: the input checkpoint's audit is already known, e.g. from `ds-unlearn audit` or "
        "an earlier run from it), or 'none'.",
        default="both",
    )
    reference: str | None = _help(
        "A reference model for the end-of-run audit (same tokenizer; commonly the model before fine-tuning): "
        "adds the 'ref' attack, loss minus the reference's loss (MIMIR).",
        default=None,
    )
    retrained: str | None = _help(
        "A model trained the same way without the forget set, for the end-of-run audit: each attack's AUC under "
        "it, PrivLeak (MUSE) and forget quality (TOFU: KS-test p-value of the forget set's losses).",
        default=None,
    )
    text_field: str = _help("Field holding a row's text.", default="text")
    id_field: str = _help(
        "Field holding a row's id (rows without 'id' are numbered; any other field named must exist).",
        default=DEFAULT_ID_FIELD,
    )
    max_length: int | None = _help("Truncate every sequence to this many tokens (the papers use 200).", default=None)
    prompt_field: str = _help(PROMPT_HELP["prompt_field"], default=DEFAULT_PROMPT_FIELD)
    mixed_prompts: bool = _help(PROMPT_HELP["mixed_prompts"], default=False)
    chat_template: bool = _help(PROMPT_HELP["chat_template"], default=False)
    score_turns: str = _help(PROMPT_HELP["score_turns"] + f" ({' or '.join(SCORE_TURNS)})", default="last")

    # The algorithm.
    method: str = _help(
        "ga (gradient ascent), sga (selective GA), ta (task arithmetic), tau (TA for unlearning), graddiff "
        "(ascent on forget + descent on retain), npo (Negative Preference Optimization, plus descent on retain "
        "when a retain set is given), kl (ascent on forget + KL to the original model on retain).",
        default="ga",
    )
    retain_weight: float = _help(
        "graddiff/npo/kl: weight of a retain row's term (NLL, or KL for kl) against a forget row's.", default=1.0
    )
    npo_beta: float = _help(
        "npo: beta of (2/beta) log(1 + (pi_theta/pi_ref)^beta) (Zhang et al. 2024: 0.1).", default=0.1
    )
    undial_gamma: float = _help(
        "undial: how far the true token's logit is lowered in the original model's distribution the forget "
        "rows are distilled toward (Dong et al. 2024); larger forgets harder.",
        default=10.0,
    )
    kl_reference_max_gib: float = _help(
        "kl / undial: the original model's log-probabilities over the retain (kl) or forget (undial) rows are "
        "computed once and kept in host memory (rows x tokens x vocabulary x 4 bytes, on every rank); refuse "
        "to start above this size.",
        default=8.0,
    )
    min_lr_fraction: float = _help(
        "Ascent steps run at learning_rate x (fraction of the forget set still ascended), never below this "
        "fraction: smaller steps as sequences reach the band. 1.0 turns the shrinking off.",
        default=1.0,
    )
    sga_gamma: float = _help(
        "SGA/TAU ascent under stop_rule per_sequence or mean: ascend only on sequences scoring at least this "
        "(plus the most memorized one). The band rule selects by memorized_threshold instead (a non-default "
        "value with it is an error).",
        default=0.70,
    )
    select_on: str = _help(
        "SGA/TAU's selection score (as sga_gamma): 'ma' or 'el10' (EL_10 needs score_refresh=epoch).", default="ma"
    )
    score_refresh: str = _help(
        "'epoch': re-score the forget set with the distributed scorer every epoch (the paper's way); "
        "'step': reuse each training forward pass's per-sequence MA (free, one update stale).",
        default="epoch",
    )
    tv_coefficient: float | None = _help(
        "TA/TAU: lambda in theta_base - lambda * tau (default 3.0 TA, 1.0 TAU).", default=None
    )
    tv_switch_ma: float | None = _help(
        "TA/TAU: ascend until the forget set's mean MA drops below this, then build the task vector "
        "(default 0.9 TA, 0.5 TAU; 1.0 or more skips the ascent).",
        default=None,
    )

    # LoRA adapters (peft; Hu et al. 2021): train low-rank adapters on a frozen base instead of every weight.
    lora_r: int = _help(
        "LoRA rank: train peft LoRA adapters of this rank on the frozen base (0: off, full fine-tuning). Works with "
        "every method; TA/TAU's task vector is then the adapters' delta (README, 'LoRA adapters').",
        default=0,
    )
    lora_alpha: float | None = _help("LoRA alpha: the adapter delta is (alpha / r) B A (default 2 r).", default=None)
    lora_dropout: float = _help("Dropout on the adapters' input while training (judging never drops).", default=0.0)
    lora_target_modules: str | None = _help(
        "Modules that get adapters: comma-separated names (q_proj,v_proj) or 'all-linear' (default: peft's "
        "choice for the architecture, else all-linear).",
        default=None,
    )
    adapter: str | None = _help(
        "A peft LoRA adapter directory on --model to unlearn from: its adapters are trained (base frozen), "
        "with the adapter's own settings (no --lora_r).",
        default=None,
    )
    merge_adapter: bool = _help(
        "With LoRA: also write output_dir/model, a plain Hugging Face checkpoint with the adapter merged "
        "(needs a local safetensors checkpoint as --model).",
        default=False,
    )

    # When it is done.
    stop_rule: str | None = _help(
        "'band': every epoch ascend the memorized sequences, leave those inside the band alone, descend the "
        "over-unlearned ones back, and stop when none is memorized and at most max_over_unlearned are "
        "over-unlearned (default for sga, graddiff, npo, kl); 'per_sequence': stop when no forget sequence is "
        "memorized (default for ga, ta, tau); 'mean': when the mean MA is below mean_threshold.",
        default=None,
    )
    max_over_unlearned: int = _help(
        "The band rule's tolerance: over-unlearned sequences allowed at the end.", default=0
    )
    memorized_threshold: float | None = _help(
        "A sequence with MA at or above this counts as memorized (default: calibrated on the holdout when one "
        f"is given, else {MEMORIZED_MA}).",
        default=None,
    )
    over_unlearned_threshold: float | None = _help(
        "A sequence with MA at or below this counts as over-unlearned (default: calibrated on the holdout when "
        f"one is given, else {OVER_UNLEARNED_MA}).",
        default=None,
    )
    mean_threshold: float | None = _help(
        "The 'mean' rule's MA level (Jang et al.: 0.2994 for GPT-Neo 125M); default: the holdout's mean MA.",
        default=None,
    )
    calibrate_thresholds: bool | None = _help(
        "Derive the thresholds not set explicitly from the holdout set's MA distribution (default: yes when a "
        "holdout is given).",
        default=None,
    )
    calibration_quantile: float = _help(
        "With calibrate_thresholds: memorized beyond the holdout's (1-q) mid-rank position (ties count half), "
        "over-unlearned below its q position; the holdout needs at least ceil(1/q) rows.",
        default=CALIBRATION_QUANTILE,
    )
    band_on: str = _help(
        "Comma list of the per-sequence scores a forget sequence is judged on (ma, loss, zlib, min_k, min_k++): "
        "in band only when each sits inside the holdout's central range; outside on the member side it is "
        "unlearned, on the other side pulled back. All come from one teacher-forced pass; beyond ma they need "
        "a holdout.",
        default="ma",
    )
    max_holdout_loss_increase: float | None = _help(
        "Utility guard: stop and keep the last good weights once holdout loss exceeds its starting value "
        "by this fraction.",
        default=None,
    )

    # Scoring.
    extract_k: int = _help("K of the k-extractability reported per sequence.", default=DEFAULT_EXTRACT_K)
    score_batch_size: int = _help(
        "Sequences / continuations per forward pass when scoring.", default=DEFAULT_BATCH_SIZE
    )
    el_every: int = _help(
        "Also compute EL_10 (greedy generation) every N epochs; 0: only before the first and after the last "
        "epoch. Per-epoch verdicts use MA from one teacher-forced pass, as the ICML code does.",
        default=0,
    )
    overwrite: bool = _help("Replace the results of an earlier run in output_dir.", default=False)
    allow_divergence: bool = _help(
        "Exit 0 even when divergence ended the run: a non-finite loss, score or weight, or a holdout loss "
        "that reached a uniform guess's ln(vocab) (the last good weights are "
        "saved either way and the report says so); by default such a run exits 1.",
        default=False,
    )

    # TrainingArguments defaults that suit unlearning (still overridable).
    learning_rate: float = _help("Adam learning rate (the paper: 5e-5).", default=5e-5)
    adam_beta2: float = _help("Adam beta2 (the paper: 0.98).", default=0.98)
    num_train_epochs: float = _help("Upper bound on epochs; the stop rule usually ends the run earlier.", default=30)
    lr_scheduler_type: str = _help("Constant: the stopping epoch is unknown in advance.", default="constant")
    logging_steps: float = _help(
        "Log train/loss every optimizer step (one per epoch in the paper's setting).", default=1
    )
    save_strategy: str = _help(
        "'no': save the final model only, plus one resumable checkpoint when the run ends at its epoch limit "
        "before the stop rule held (see save_resumable); 'epoch': also a checkpoint every epoch "
        "(see save_total_limit).",
        default="no",
    )
    save_total_limit: int | None = _help("With save_strategy=epoch: keep only this many newest checkpoints.", default=1)
    save_resumable: bool = _help(
        "When the epoch limit ends the run before the stop rule held, save output_dir/checkpoint-STEP to "
        "resume from (model, optimizer state and the run's own state: about 4x the model's size on disk). "
        "False: the final model only (the demo's choice).",
        default=True,
    )
    report_to: None | str | list[str] = _help("TensorBoard by default.", default="tensorboard")
    ignore_data_skip: bool = _help(
        "Resume at the next whole epoch (checkpoints are only taken at epoch ends, and an epoch may "
        "have fewer steps than the Trainer's nominal count: SGA trains only its selection).",
        default=True,
    )
    remove_unused_columns: bool = _help("Keep every column: the collator needs row indices and weights.", default=False)

    def __post_init__(self):
        # No side effects here: the process entry (commands/, launch/) sets up the environment
        # and accelerate's state before building the config (core.distributed).
        self.validate()
        super().__post_init__()

    def _validate_report_to(self, bad) -> None:
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
                bad(
                    "report_to",
                    f"unknown reporter {name!r}: one of none, all, {', '.join(sorted(INTEGRATION_TO_CALLBACK))}",
                )
            if name not in available:
                bad(
                    "report_to", f"{name} is not installed here (pip install {name.replace('_', '-')}, or pick another)"
                )

    def validate(self) -> None:
        """One clear line per problem, naming the field; runs before anything is loaded."""

        def bad(name, why):
            raise InputError(f"{name}: {why}")

        # NaN passes every `x <= 0` check below and inf overflows the Trainer's step count; no
        # setting (ours or TrainingArguments') means anything as a non-finite number.
        for f in fields(self):
            value = getattr(self, f.name, None)
            if isinstance(value, float) and not math.isfinite(value):
                bad(f.name, f"must be a finite number, got {value}")
        if not self.model:
            bad("model", "required (a checkpoint directory or 'smollm2')")
        if not self.forget:
            bad("forget", "required (the forget set file)")
        if not self.output_dir:  # TrainingArguments would write to ./trainer_output
            bad("output_dir", "required (where the unlearned model, scores and report go)")
        if self.method not in METHODS:
            bad("method", f"must be one of {', '.join(METHODS)}, got {self.method!r}")
        if not 0.0 <= self.sga_gamma <= 1.0:
            bad("sga_gamma", f"must lie in [0, 1], got {self.sga_gamma}")
        if self.audit not in AUDIT_CHOICES:
            bad("audit", f"must be one of {', '.join(AUDIT_CHOICES)}, got {self.audit!r}")
        for name in ("reference", "retrained"):  # the end-of-run audit's companion models (issue 24)
            if getattr(self, name):
                from .audit import companion_problem

                problem = companion_problem(self, getattr(self, name), name)
                if problem:
                    bad(name, problem)
        if self.select_on not in ("ma", "el10"):
            bad("select_on", f"must be 'ma' or 'el10', got {self.select_on!r}")
        if self.score_refresh not in ("epoch", "step"):
            bad("score_refresh", f"must be 'epoch' or 'step', got {self.score_refresh!r}")
        if self.select_on == "el10" and self.score_refresh == "step":
            bad("select_on", "el10 needs score_refresh=epoch (a training pass gives MA only)")
        if self.stop_rule is None:
            self.stop_rule = "band" if self.method in ("sga", "undial", *RETAIN_METHODS) else "per_sequence"
        if self.stop_rule not in STOP_RULES:
            bad("stop_rule", f"must be one of {', '.join(STOP_RULES)}, got {self.stop_rule!r}")
        # SGA's selection (and TAU's ascent) reads gamma and its score only outside the band rule: the band
        # ascends every sequence at or above memorized_threshold. A setting nothing reads is an error.
        for name in ("sga_gamma", "select_on"):
            if getattr(self, name) == type(self).__dataclass_fields__[name].default:
                continue
            if self.method not in ("sga", "tau"):
                bad(name, f"only applies to sga/tau, not {self.method}")
            if self.stop_rule == "band":
                bad(
                    name,
                    "not read under stop_rule band (it ascends every sequence with MA >= memorized_threshold); "
                    "pass --stop_rule per_sequence or mean to select by it",
                )
        if self.max_over_unlearned < 0:
            bad("max_over_unlearned", f"must be 0 or more, got {self.max_over_unlearned}")
        memorized = MEMORIZED_MA if self.memorized_threshold is None else self.memorized_threshold
        over = OVER_UNLEARNED_MA if self.over_unlearned_threshold is None else self.over_unlearned_threshold
        if not 0.0 <= over < memorized <= 1.0:
            bad("memorized_threshold", "need 0 <= over_unlearned_threshold < memorized_threshold <= 1")
        if self.method in ("graddiff", "kl") and not self.retain:
            bad("retain", f"method {self.method} trains on the retain set: pass --retain")
        if self.retain_weight < 0:
            bad("retain_weight", f"must be 0 or more, got {self.retain_weight}")
        if self.npo_beta <= 0:
            bad("npo_beta", f"must be positive, got {self.npo_beta}")
        # A setting the method never reads is a mistake the run would hide (report.json shows them as null).
        if not self.undial_gamma > 0:
            bad("undial_gamma", f"must be positive, got {self.undial_gamma}")
        for name, methods in (("npo_beta", ("npo",)), ("undial_gamma", ("undial",)), ("retain_weight", RETAIN_METHODS)):
            if self.method not in methods and getattr(self, name) != type(self).__dataclass_fields__[name].default:
                bad(name, f"only applies to {'/'.join(methods)}, not {self.method}")
        if not 0.0 < self.min_lr_fraction <= 1.0:
            bad("min_lr_fraction", f"must lie in (0, 1], got {self.min_lr_fraction}")
        if self.kl_reference_max_gib <= 0:
            bad("kl_reference_max_gib", "must be positive")
        if self.calibrate_thresholds is None:
            self.calibrate_thresholds = bool(self.holdout)
        if self.calibrate_thresholds and not self.holdout:
            bad("calibrate_thresholds", "needs a holdout set (--holdout)")
        if not 0.0 < self.calibration_quantile <= MAX_QUANTILE:
            bad("calibration_quantile", f"must lie in (0, {MAX_QUANTILE}], got {self.calibration_quantile}")
        self._validate_band_on(bad)
        if self.stop_rule == "mean" and self.mean_threshold is None and not self.holdout:
            bad("mean_threshold", "the 'mean' stop rule needs mean_threshold or a holdout set to calibrate it")
        if self.max_holdout_loss_increase is not None:
            if self.max_holdout_loss_increase <= 0:
                bad("max_holdout_loss_increase", "must be positive")
            if not self.holdout:
                bad("max_holdout_loss_increase", "the utility guard needs a holdout set (--holdout)")
        if self.method in TASK_VECTOR_DEFAULTS:
            coefficient, switch = TASK_VECTOR_DEFAULTS[self.method]
            self.tv_coefficient = coefficient if self.tv_coefficient is None else self.tv_coefficient
            self.tv_switch_ma = switch if self.tv_switch_ma is None else self.tv_switch_ma
            if self.tv_coefficient <= 0:
                bad("tv_coefficient", "must be positive")
        elif self.tv_coefficient is not None or self.tv_switch_ma is not None:
            bad("tv_coefficient", f"only applies to ta/tau, not {self.method}")
        if not self.num_train_epochs > 0:
            bad("num_train_epochs", f"must be positive, got {self.num_train_epochs:g}")
        if self.num_train_epochs != int(self.num_train_epochs):  # a fraction would run a whole extra epoch
            bad("num_train_epochs", f"must be whole epochs (judged at epoch ends), got {self.num_train_epochs:g}")
        if not self.learning_rate > 0:
            bad("learning_rate", f"must be positive, got {self.learning_rate:g}")
        for name in ("per_device_train_batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                bad(name, f"must be at least 1, got {getattr(self, name)}")
        if seed_problem(self.seed):
            bad("seed", seed_problem(self.seed))
        for name in ("holdout", "retain", "audit_holdout"):
            other = getattr(self, name, None)
            if other and Path(other).resolve() == Path(self.forget).resolve():
                bad(name, f"is the forget set's own file ({other}); it must hold other sequences")
        self._validate_report_to(bad)
        if isinstance(self.deepspeed, str):
            from ..core.ds_config import load_ds_config

            load_ds_config(self.deepspeed)  # one line naming the file if it is missing or not JSON
        resume = self.resume_from_checkpoint
        if isinstance(resume, str) and resume.lower() not in ("true", "false"):
            if not (Path(resume) / "unlearn_state.json").is_file():
                bad(
                    "resume_from_checkpoint",
                    f"{resume} is not a checkpoint of an unlearning run (no unlearn_state.json)",
                )
            self._check_resume_launch(bad, Path(resume))
        self._validate_lora(bad)
        if self.el_every < 0:
            bad("el_every", f"must be 0 (before and after only) or a positive number of epochs, got {self.el_every}")
        if self.extract_k < 1:
            bad("extract_k", "must be at least 1")
        if self.score_batch_size < 1:
            bad("score_batch_size", "must be at least 1")
        if self.max_length is not None and self.max_length < max(11, self.extract_k + 1):
            bad("max_length", f"must leave room for EL_10 and extract_k={self.extract_k}")

    def _check_resume_launch(self, bad, checkpoint: Path) -> None:
        """A checkpoint resumes only under the launch that wrote it: it holds one run-state shard per
        rank, and under DeepSpeed (``global_step*/``) an optimizer partitioned over those ranks."""
        # Each rank checks its own shard (on nodes without a shared file system a node holds only its
        # ranks' shards), and that no shard belongs to a rank this run does not have.
        ranks = (p.stem.removeprefix("unlearn_shards_rank") for p in checkpoint.glob("unlearn_shards_rank*.pt"))
        shards = {int(r) for r in ranks if r.isdigit()}
        if not shards:
            bad("resume_from_checkpoint", f"{checkpoint} has no unlearn_shards_rank*.pt (an incomplete checkpoint)")
        saved = (max(shards) + 1, any(checkpoint.glob("global_step*")))
        now = (D.world_size_from_env(), bool(self.deepspeed))
        if D.rank_from_env() not in shards or saved[0] > now[0] or saved[1] != now[1]:

            def launch(n: int, deepspeed: bool) -> str:
                return f"{n} rank{'s' * (n != 1)} {'with' if deepspeed else 'without'} DeepSpeed"

            bad(
                "resume_from_checkpoint",
                f"{checkpoint} was saved by {launch(*saved)} and this run has {launch(*now)}; "
                "resume it the way it was launched",
            )
        try:
            done = json.loads((checkpoint / "unlearn_state.json").read_text()).get("epochs", 0)
        except (ValueError, AttributeError):
            bad("resume_from_checkpoint", f"{checkpoint}/unlearn_state.json is not a JSON object")
        if self.num_train_epochs <= done:  # the Trainer would train nothing, rewrite the outputs and exit 0
            bad(
                "num_train_epochs",
                f"{checkpoint} already ran {done} epochs: pass more than {done} to continue it",
            )

    def _validate_band_on(self, bad) -> None:
        try:
            scores = parse_band_on(self.band_on)
        except InputError as e:
            bad("band_on", str(e).removeprefix("band_on: "))
        explicit = self.memorized_threshold is not None or self.over_unlearned_threshold is not None
        if explicit and "ma" not in scores:
            bad("memorized_threshold", "MA levels are read only when band_on includes ma")
        if scores != ("ma",) and not (self.holdout and self.calibrate_thresholds):
            bad("band_on", f"{self.band_on!r} is judged by position among the holdout's scores: pass --holdout")
        if scores != ("ma",) and self.score_refresh == "step":
            bad("band_on", "score_refresh=step judges MA only (a training pass gives no membership scores)")

    def check_holdout(self, rows: int) -> None:
        """Before compute: a holdout that calibrates a verdict must place a sequence at the quantile
        asked (``core.verdict.check_holdout_size``). Raises InputError naming the holdout."""
        if self.calibrate_thresholds and self.holdout and self.calibration_quantile_used:
            check_holdout_size(rows, self.calibration_quantile / len(self.band_on_scores), "holdout")

    @property
    def calibration_quantile_used(self) -> bool:
        """Whether any verdict is judged by holdout position (an MA side left unset, or band_on beyond ma)."""
        explicit = self.memorized_threshold is not None and self.over_unlearned_threshold is not None
        return not explicit or self.band_on_scores != ("ma",)

    @property
    def band_on_scores(self) -> tuple[str, ...]:
        """``band_on`` as score names."""
        return parse_band_on(self.band_on)

    def _validate_lora(self, bad) -> None:
        if self.lora_r < 0:
            bad("lora_r", f"must be a positive rank, or 0 for full fine-tuning, got {self.lora_r}")
        if self.adapter:
            if self.lora_r:
                bad("lora_r", "--adapter trains that adapter with its own rank and targets; drop --lora_r")
            if not (Path(self.adapter) / "adapter_config.json").is_file():
                bad("adapter", f"{self.adapter} is not a peft adapter directory (no adapter_config.json)")
        if not self.uses_lora:
            given = [
                name
                for name, off in (("lora_alpha", None), ("lora_target_modules", None), ("merge_adapter", False))
                if getattr(self, name) != off
            ]
            if self.lora_dropout:
                given.append("lora_dropout")
            if given:
                bad(given[0], "only applies with LoRA (--lora_r R > 0, or --adapter)")
            return
        if self.lora_r:
            self.lora_alpha = 2.0 * self.lora_r if self.lora_alpha is None else self.lora_alpha
            if not self.lora_alpha > 0:
                bad("lora_alpha", f"must be positive, got {self.lora_alpha:g}")
            if not 0.0 <= self.lora_dropout < 1.0:
                bad("lora_dropout", f"must lie in [0, 1), got {self.lora_dropout:g}")
            if self.lora_target_modules is not None and not self.target_modules:
                bad("lora_target_modules", "names no module (comma-separated names, or 'all-linear')")

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

    @property
    def selects(self) -> bool:
        """Whether the ascent trains on a selection (SGA, and TAU's ascent) or on everything."""
        return self.method in ("sga", "tau")

    @property
    def uses_retain(self) -> bool:
        """Whether retain rows are trained on (GradDiff, KL; NPO when a retain set is given)."""
        return self.method in RETAIN_METHODS and bool(self.retain) and self.retain_weight > 0
