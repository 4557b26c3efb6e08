"""What the lab's epoch records say, as pure functions of them: phases per string, forgetting
and relearning under sequential exposure, and whether unlearning retraces memorisation.

An epoch record (``lab.measure``) holds per string ``accuracy``, ``loss`` and the correctness
row ``positions``, plus ``control_accuracy`` / ``control_loss`` of unseen strings; record e is
the model after e epochs (record 0: before training).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ..core.summary import calibrate_thresholds
from ..core.verdict import IN_BAND, MAX_QUANTILE, MEMORIZED, OVER_UNLEARNED, min_holdout_rows, quantile_for
from .dynamics import (
    detect_phases,
    first_epoch,
    first_wrong_at,
    guessing_band_entry,
    learned_at,
    rank_correlation,
)

FULL = 0.99  # accuracy that counts as fully memorised


def _curve(history: Sequence[dict], key: str, i: int | None = None) -> list[float]:
    return [r[key] if i is None else r[key][i] for r in history]


def position_rows(history: Sequence[dict], i: int) -> np.ndarray:
    """Epochs x positions correctness of string ``i`` (bool)."""
    return np.array([r["positions"][i] for r in history], dtype=bool)


def exposure_phases(history: Sequence[dict], predicted: int, margin: float, shared: Sequence[Sequence[bool]]) -> dict:
    """Guessing and memorisation phases of every string, and of the strings' mean accuracy;
    with the loss where memorisation starts (the paper: the guessing phase ends near the
    strings' entropy) and ``unique_full_at``, the first epoch every position whose context no
    other string shares (``shared``, see ``dynamics.shared_contexts``) is right."""
    epochs, control = _curve(history, "epoch"), _curve(history, "control_accuracy")
    strings = []
    for i, shared_row in enumerate(shared):
        phases = detect_phases(epochs, _curve(history, "accuracy", i), control, predicted, margin, FULL)
        start = phases["memorisation_start"]
        phases["loss_at_memorisation_start"] = None if start is None else history[start]["loss"][i]
        unique = ~np.asarray(shared_row, dtype=bool)
        phases["unique_full_at"] = first_epoch(epochs, position_rows(history, i)[:, unique].all(axis=1))
        strings.append(phases)
    mean = [float(np.mean(r["accuracy"])) for r in history]
    return {"strings": strings, "mean": detect_phases(epochs, mean, control, predicted * len(strings), margin, FULL)}


def median_epoch(values: Sequence[int | None]) -> float | None:
    """Median over strings, a string that never got there counting as later than any epoch
    (a censored median); None when the median string did not get there."""
    ordered = sorted(values, key=lambda v: math.inf if v is None else v)
    middle = ordered[(len(ordered) - 1) // 2 : len(ordered) // 2 + 1]
    return None if not ordered or None in middle else float(np.mean(middle))


def sequential_summary(
    history: Sequence[dict], stages: Sequence[tuple[str, int]], stage_epochs: int, predicted: int, margin: float
) -> dict:
    """``stages[s] = (name, string)`` trained in epochs s*E+1 .. (s+1)*E (E = ``stage_epochs``);
    the first stage's string is A and the last stage shows A again. Stage epochs count from the
    record before the stage (0 = already there)."""
    out = []
    for s, (name, i) in enumerate(stages):
        window = range(s * stage_epochs, (s + 1) * stage_epochs + 1)
        accuracy = [history[e]["accuracy"][i] for e in window]
        control = [history[e]["control_accuracy"] for e in window]
        phases = detect_phases(list(range(len(window))), accuracy, control, predicted, margin, FULL)
        out.append(
            {
                "name": name,
                "string": i,
                "epochs": [window[1], window[-1]],
                "accuracy_before": accuracy[0],
                "accuracy_after": accuracy[-1],
                "memorisation_start": phases["memorisation_start"],
                "epochs_to_full": phases["full_at"],
            }
        )
    a = stages[0][1]
    own = history[stage_epochs]["accuracy"][a]
    later_ends = [history[(s + 1) * stage_epochs]["accuracy"][a] for s in range(1, len(stages) - 1)]
    while_others = [history[e]["accuracy"][a] for e in range(stage_epochs + 1, (len(stages) - 1) * stage_epochs + 1)]
    return {
        "stages": out,
        "forgetting": {
            "a_after_own_stage": own,
            "a_after_each_later_stage": later_ends,
            "a_lowest_while_others_learned": min(while_others),
            "a_forgotten": own - later_ends[-1],
        },
        "relearning": {
            "a_when_shown_again": later_ends[-1],
            "first_exposure_epochs_to_full": out[0]["epochs_to_full"],
            "relearn_epochs_to_full": out[-1]["epochs_to_full"],
        },
    }


def unlearning_summary(
    history: Sequence[dict], exposure: Sequence[dict], predicted: int, margin: float, entropy_nats: float
) -> dict:
    """Memorisation in reverse: per string, the epoch accuracy leaves full memorisation and the
    epoch it is back in the guessing band (with the loss then, against the loss of unseen strings
    and the distribution's entropy); per position, when it was learned and when it first went."""
    epochs, control = _curve(history, "epoch"), _curve(history, "control_accuracy")
    exposure_epochs = _curve(exposure, "epoch")
    strings, learned, forgotten = [], [], []
    for i in range(len(history[0]["accuracy"])):
        accuracy, loss = _curve(history, "accuracy", i), _curve(history, "loss", i)
        back = guessing_band_entry(epochs, accuracy, control, predicted, margin)
        strings.append(
            {
                "accuracy_before": accuracy[0],
                "accuracy_after": accuracy[-1],
                "leaves_full_at": first_epoch(epochs, [a < FULL for a in accuracy]) if accuracy[0] >= FULL else None,
                "guessing_again_at": back,
                "loss_then": None if back is None else loss[back],
                "control_loss_then": None if back is None else history[back]["control_loss"],
            }
        )
        learned.append(learned_at(exposure_epochs, position_rows(exposure, i)))
        forgotten.append(first_wrong_at(epochs, position_rows(history, i)))
    flat_learned = [v for row in learned for v in row]
    flat_forgotten = [v for row in forgotten for v in row]
    flat_position = [j for row in forgotten for j in range(len(row))]
    return {
        "entropy_nats": entropy_nats,
        "strings": strings,
        "positions": {
            "learned_at": learned,
            "first_wrong_at": forgotten,
            # > 0: first learned, first forgotten; < 0: last learned, first forgotten.
            "rank_correlation_learned_vs_forgotten": rank_correlation(flat_learned, flat_forgotten),
            # > 0: early positions hold out longer; < 0: late positions hold out longer.
            "rank_correlation_position_vs_forgotten": rank_correlation(flat_position, flat_forgotten),
            "first_to_go": [_earliest(row) for row in forgotten],
        },
    }


def _earliest(first_wrong: Sequence[int | None]) -> list[int]:
    """The positions that went wrong first (at the earliest epoch after the start)."""
    went = [e for e in first_wrong if e is not None and e > 0]
    return [] if not went else [j for j, e in enumerate(first_wrong) if e == min(went)]


def string_verdicts(record: dict) -> dict | None:
    """The one verdict (``core.verdict``) of each training string at one epoch ``record``: its
    accuracy placed among the unseen control strings' by mid-rank position (quantile 0.05, or
    1/n for n control strings, at most 0.25). None when the record has no per-control accuracies
    or too few control strings (under 4)."""
    control = record.get("control_accuracies")
    if not control or len(control) < min_holdout_rows(MAX_QUANTILE):
        return None
    t = calibrate_thresholds([{"ma": a} for a in control], quantile_for(len(control)))
    sides = t.sides([{"ma": a} for a in record["accuracy"]]).tolist()
    names = {MEMORIZED: "memorized", IN_BAND: "unseen-like", OVER_UNLEARNED: "over-unlearned"}
    verdicts = [names[s] for s in sides]
    return {"verdicts": verdicts, "counts": {v: verdicts.count(v) for v in names.values()}, "rule": t.describe()}


def summarize(results: dict, entropy_bits: float) -> dict:
    """The few numbers a table needs (medians over strings)."""
    summary: dict = {"entropy_bits": entropy_bits, "entropy_nats": entropy_bits * math.log(2)}
    if "exposure" in results:
        phases = results["exposure"]["phases"]
        last = results["exposure"]["epochs"][-1]
        summary.update(
            {
                # Medians over strings (a string that never got there counts as latest), and how
                # many strings got there at all: a median is not "every string by then".
                "median_memorisation_start": median_epoch([p["memorisation_start"] for p in phases["strings"]]),
                "median_full_at": median_epoch([p["full_at"] for p in phases["strings"]]),
                "median_unique_full_at": median_epoch([p["unique_full_at"] for p in phases["strings"]]),
                "strings_full": sum(p["full_at"] is not None for p in phases["strings"]),
                "strings": len(phases["strings"]),
                "final_accuracy": float(np.mean(last["accuracy"])),
                "final_control_accuracy": last["control_accuracy"],
                "final_verdicts": string_verdicts(last),
            }
        )
    if "local_prefix" in results:
        summary["local_prefix_k90"] = results["local_prefix"]["k_90"]
    if "sequential" in results:
        seq = results["sequential"]
        summary.update(
            {
                "a_forgotten": seq["forgetting"]["a_forgotten"],
                "a_after_own_stage": seq["forgetting"]["a_after_own_stage"],
                "relearn_epochs_to_full": seq["relearning"]["relearn_epochs_to_full"],
                "first_exposure_epochs_to_full": seq["relearning"]["first_exposure_epochs_to_full"],
            }
        )
    if "unlearning" in results:
        unl = results["unlearning"]
        summary.update(
            {
                "unlearning_epochs": len(unl["epochs"]) - 1,
                "unlearned_accuracy": float(np.mean(unl["epochs"][-1]["accuracy"])),
                "unlearned_verdicts": string_verdicts(unl["epochs"][-1]),
            }
        )
    return summary
