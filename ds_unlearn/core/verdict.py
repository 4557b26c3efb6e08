"""The one verdict of a sequence: still memorized, where text the model never saw sits, or pushed
past it (over-unlearned). ``score``, ``unlearn`` (band, stop rule, best epoch), ``audit``, the demo
and the lab all judge through ``Thresholds.sides``.

Two rules, per side and per score:

- **Levels** (explicit settings, or the ICML 2024 code's fixed MA 0.60 / 0.15 when there is no
  holdout): memorized if ``ma >= memorized_ma``, over-unlearned if ``ma <= over_unlearned_ma``.
- **Holdout position** (calibrated): a sequence's score is placed among the holdout's (text the
  model never saw) by its mid-rank percentile, ties counting half::

      position(x) = (#{h < x} + #{h == x} / 2) / n          in [0, 1]

  and it is outside the band on a side when its position is beyond ``quantile`` on that side
  (strictly). Plain ``>= q95`` / ``<= q05`` cuts collapse on discrete scores: MA takes values
  k / (T-1), and unseen random strings all score 0, so the holdout itself was "over-unlearned".
  With mid-rank positions a value shared by a whole holdout sits at 0.5, inside the band, so the
  band can never have zero width, and text drawn like the holdout is flagged on each side with
  probability below ``2 * quantile`` whatever the distribution (continuous: about ``quantile``;
  an atom of mass p is flagged only when the mass beyond it is under ``quantile - p/2``).

``band_on`` names the per-sequence scores judged (``ma`` and the membership scores of one
teacher-forced pass: ``loss``, ``zlib``, ``min_k``, ``min_k++``). A sequence is in band only
when every named score is; it is memorized when any score is outside on the member side (high MA,
low loss-like score), otherwise over-unlearned when any is outside on the other side. So that k
scores together still flag unseen text at no more than the nominal rate, each is judged at
``quantile / k`` per side (Bonferroni), and the holdout needs ceil(k / quantile) rows.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from .errors import InputError
from .memorization import MEMORIZED_MA, OVER_UNLEARNED_MA

CALIBRATION_QUANTILE = 0.05  # per side: memorized beyond the holdout's 95th position, over-unlearned below its 5th
# Which way each judged score points when a sequence is member-like (True: higher; MIA scores are
# oriented like a loss, core/mia.py).
MEMBER_HIGH = {"ma": True, "loss": False, "zlib": False, "min_k": False, "min_k++": False}
BAND_SCORES = tuple(MEMBER_HIGH)
MEMORIZED, IN_BAND, OVER_UNLEARNED = 1, 0, -1
# Up to 1/4 per side the holdout value holding its median is always in band (its mid-rank position
# lies in [1/4, 3/4]): the band cannot have zero width. Beyond, two equal atoms could fill both sides.
MAX_QUANTILE = 0.25
LEVEL_EPS = 1e-9  # how far past a holdout value an equivalent MA level sits (``Thresholds.ma_levels``)


def parse_band_on(value: str | Sequence[str]) -> tuple[str, ...]:
    """``"ma,loss"`` or ``["ma", "loss"]`` as a tuple of distinct ``BAND_SCORES`` names, in the
    order given. Raises InputError naming ``band_on`` for an unknown or empty list."""
    names = [v.strip() for v in value.split(",")] if isinstance(value, str) else [str(v).strip() for v in value]
    names = [n for n in names if n]
    unknown = [n for n in names if n not in MEMBER_HIGH]
    if unknown or not names:
        raise InputError(f"band_on: must be a comma list of {', '.join(BAND_SCORES)}, got {value!r}")
    return tuple(dict.fromkeys(names))


def needs_membership(band_on: Sequence[str]) -> bool:
    """Whether judging ``band_on`` needs the membership scores beyond MA and loss (Min-K%, Min-K%++,
    zlib), which the teacher-forced pass computes only when asked."""
    return any(s not in ("ma", "loss") for s in band_on)


def min_holdout_rows(quantile: float) -> int:
    """Holdout rows needed to place a sequence at ``quantile`` per side: ceil(1 / quantile) (below
    it, the single most extreme draw of unseen text alone is flagged more often than 2 * quantile)."""
    return math.ceil(1.0 / quantile - 1e-9)


def midrank_position(values: Sequence[float], reference: Sequence[float]) -> np.ndarray:
    """Mid-rank position of each of ``values`` among ``reference`` (module docstring): float64
    array in [0, 1], shape of ``values``. ``reference`` must be non-empty. NaN sorts above all."""
    ref = np.sort(np.asarray(reference, dtype=np.float64))
    x = np.asarray(values, dtype=np.float64)
    below = np.searchsorted(ref, x, side="left")
    at_or_below = np.searchsorted(ref, x, side="right")
    return (below + at_or_below) / (2.0 * ref.size)


@dataclass(frozen=True)
class Thresholds:
    """How a sequence is judged (module docstring).

    ``memorized_ma`` / ``over_unlearned_ma``: MA levels (fraction in [0, 1]) of each side, or None
    where that side of MA is judged by holdout position. ``mean_ma``: the level of the papers'
    ``mean`` stop rule (Jang et al. 2023), None when unused. ``band_on``: the judged scores.
    ``quantile``: the per-side share of the holdout's positions outside the band, in (0, 0.25].
    ``holdout``: per score judged by position, the holdout's values (sorted; filled by
    ``calibrated``). ``Thresholds()`` is the ICML code's fixed 0.60 / 0.15 on MA."""

    memorized_ma: float | None = MEMORIZED_MA
    over_unlearned_ma: float | None = OVER_UNLEARNED_MA
    mean_ma: float | None = None
    band_on: tuple[str, ...] = ("ma",)
    quantile: float = CALIBRATION_QUANTILE
    holdout: Mapping[str, tuple[float, ...]] = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "band_on", parse_band_on(self.band_on))
        object.__setattr__(self, "holdout", {k: tuple(sorted(map(float, v))) for k, v in dict(self.holdout).items()})
        if not 0.0 < self.quantile <= MAX_QUANTILE:
            raise InputError(f"calibration_quantile: must lie in (0, {MAX_QUANTILE}], got {self.quantile}")
        levels = [v for v in (self.memorized_ma, self.over_unlearned_ma) if v is not None]
        if any(not math.isfinite(v) or not 0.0 <= v <= 1.0 for v in levels):
            raise InputError("memorized_threshold: need 0 <= over_unlearned_threshold < memorized_threshold <= 1")
        if len(levels) == 2 and not self.over_unlearned_ma < self.memorized_ma:
            raise InputError("memorized_threshold: need 0 <= over_unlearned_threshold < memorized_threshold <= 1")
        if levels and "ma" not in self.band_on:
            raise InputError("memorized_threshold: MA levels are read only when band_on includes ma")

    # -- what needs the holdout ------------------------------------------------------------------
    def positional(self) -> tuple[str, ...]:
        """The scores judged (on at least one side) by holdout position."""
        return tuple(
            s for s in self.band_on if s != "ma" or self.memorized_ma is None or self.over_unlearned_ma is None
        )

    @property
    def score_quantile(self) -> float:
        """The per-side quantile each judged score is cut at: ``quantile / len(band_on)``."""
        return self.quantile / len(self.band_on)

    @property
    def calibrated_on(self) -> int | None:
        """Holdout rows the positions come from (None: levels only)."""
        return len(next(iter(self.holdout.values()))) if self.holdout else None

    def calibrated(self, holdout_rows: Sequence[Mapping[str, float]]) -> Thresholds:
        """These thresholds with the holdout's values of every positional score filled in, and the
        mean rule's level defaulting to the holdout's mean MA. ``holdout_rows``: per-sequence score
        dicts of text the model never saw (``score_sequences`` rows, ``audit`` rows). Raises
        InputError when the holdout has fewer than ``min_holdout_rows(quantile)`` rows or lacks a
        judged score."""
        need = self.positional()
        mean = self.mean_ma
        if mean is None and holdout_rows and "ma" in holdout_rows[0]:
            mean = float(np.mean([r["ma"] for r in holdout_rows]))
        if not need:
            return Thresholds(self.memorized_ma, self.over_unlearned_ma, mean, self.band_on, self.quantile)
        check_holdout_size(len(holdout_rows), self.score_quantile)
        missing = [s for s in need if s not in holdout_rows[0]]
        if missing:
            raise ValueError(f"holdout rows lack the judged score(s) {missing}")
        values = {s: [float(r[s]) for r in holdout_rows] for s in need}
        return Thresholds(self.memorized_ma, self.over_unlearned_ma, mean, self.band_on, self.quantile, values)

    # -- the verdict --------------------------------------------------------------------------------
    def score_sides(self, rows: Sequence[Mapping[str, float]]) -> dict[str, np.ndarray]:
        """Per judged score, each row's side: ``MEMORIZED`` (1, outside on the member side),
        ``IN_BAND`` (0) or ``OVER_UNLEARNED`` (-1). int64 arrays of len(rows). Raises ValueError
        when a positional score has no holdout values (call ``calibrated`` first)."""
        out = {}
        for score in self.band_on:
            x = np.asarray([float(r[score]) for r in rows], dtype=np.float64)
            member = np.zeros(x.shape, dtype=bool)
            other = np.zeros(x.shape, dtype=bool)
            position = None
            if score in self.positional():
                if score not in self.holdout:
                    raise ValueError(f"Thresholds on {score!r} need the holdout's values: call calibrated() first")
                position = midrank_position(x, self.holdout[score])
                q = self.score_quantile
                high, low = position > 1.0 - q, position < q
                member, other = (high, low) if MEMBER_HIGH[score] else (low, high)
            if score == "ma":
                if self.memorized_ma is not None:
                    member = x >= self.memorized_ma
                if self.over_unlearned_ma is not None:
                    other = x <= self.over_unlearned_ma
            out[score] = np.where(member, MEMORIZED, np.where(other, OVER_UNLEARNED, IN_BAND)).astype(np.int64)
        return out

    def sides(self, rows: Sequence[Mapping[str, float]]) -> np.ndarray:
        """Each row's verdict side over every judged score: ``MEMORIZED`` when any score is outside
        on the member side, else ``OVER_UNLEARNED`` when any is outside on the other, else ``IN_BAND``
        (int64 array of len(rows)). ``rows``: dicts holding every ``band_on`` score."""
        if not len(rows):
            return np.zeros(0, dtype=np.int64)
        stacked = np.stack(list(self.score_sides(rows).values()))
        return np.where(
            (stacked == MEMORIZED).any(0),
            MEMORIZED,
            np.where((stacked == OVER_UNLEARNED).any(0), OVER_UNLEARNED, IN_BAND),
        ).astype(np.int64)

    def counts(self, rows: Sequence[Mapping[str, float]]) -> dict[str, int]:
        """``{"memorized": m, "over_unlearned": o}`` over ``rows``."""
        s = self.sides(rows)
        return {"memorized": int(np.sum(s == MEMORIZED)), "over_unlearned": int(np.sum(s == OVER_UNLEARNED))}

    def ma_levels(self) -> tuple[float, float]:
        """The MA levels this verdict on MA is equivalent to: (m, o) such that, for every MA value,
        memorized <=> ma >= m and over-unlearned <=> ma <= o (MA's side of ``score_sides``). A
        positional side's level is found from the holdout: the mid-rank position only changes at
        or between holdout values, so a boundary strictly between two of them is written one
        ``LEVEL_EPS`` past the lower (MA values are multiples of 1/(T-1), far coarser)."""
        memorized, over = self.memorized_ma, self.over_unlearned_ma
        if "ma" in self.holdout:
            values, counts = np.unique(np.asarray(self.holdout["ma"], dtype=np.float64), return_counts=True)
            n = counts.sum()
            below = np.concatenate([[0], np.cumsum(counts)[:-1]])
            at = (below + counts / 2) / n  # position of each distinct holdout value
            above = (below + counts) / n  # position just above it (before the next)
            if memorized is None:
                memorized = float(values[-1] + LEVEL_EPS)  # above every holdout value: position 1
                for v, p_at, p_above in zip(values, at, above):
                    if p_at > 1 - self.score_quantile:
                        memorized = float(v)
                        break
                    if p_above > 1 - self.score_quantile:
                        memorized = float(v + LEVEL_EPS)
                        break
            if over is None:
                over = float(values[0] - LEVEL_EPS)  # below every holdout value: position 0
                for v, p_at, p_below in zip(values[::-1], at[::-1], (below / n)[::-1]):
                    if p_at < self.score_quantile:
                        over = float(v)
                        break
                    if p_below < self.score_quantile:
                        over = float(v - LEVEL_EPS)
                        break
        return memorized, over

    # -- reporting ----------------------------------------------------------------------------------
    def band(self) -> dict[str, list[float]]:
        """Per positional score, the lowest and highest holdout value that is itself in band."""
        out = {}
        for score, values in self.holdout.items():
            position = midrank_position(values, values)
            q = self.score_quantile
            inside = [v for v, p in zip(values, position) if q <= p <= 1.0 - q]
            out[score] = [min(inside), max(inside)] if inside else [float(np.median(values))] * 2
        return out

    def summary(self) -> dict:
        """The thresholds as reports show them (no holdout values, just their count and band)."""
        memorized, over = self.ma_levels() if "ma" in self.band_on else (None, None)
        # A level no MA in [0, 1] reaches is shown as None: that side never flags on MA.
        memorized = memorized if memorized is not None and memorized <= 1.0 else None
        over = over if over is not None and over >= 0.0 else None
        return {
            "rule": "holdout" if self.positional() else "levels",
            "band_on": list(self.band_on),
            # On MA, the equivalent levels (memorized at ma >= it, over-unlearned at ma <= it).
            "memorized_ma": memorized,
            "over_unlearned_ma": over,
            "quantile": self.quantile if self.positional() else None,
            "score_quantile": self.score_quantile if self.positional() else None,
            "holdout_rows": self.calibrated_on,
            "band": self.band(),
        }

    def describe(self) -> str:
        """One human line: what memorized and over-unlearned mean here."""
        parts = []
        for score in self.band_on:
            if score == "ma" and score not in self.positional():
                parts.append(f"ma >= {self.memorized_ma:g} memorized, <= {self.over_unlearned_ma:g} over-unlearned")
                continue
            level = ""
            if score == "ma" and self.memorized_ma is not None:
                level = f" (memorized at ma >= {self.memorized_ma:g})"
            if score == "ma" and self.over_unlearned_ma is not None:
                level = f" (over-unlearned at ma <= {self.over_unlearned_ma:g})"
            parts.append(f"{score} within the holdout's central {100 * (1 - 2 * self.score_quantile):g}%{level}")
        n = self.calibrated_on
        return "; ".join(parts) + (f" (mid-rank positions among {n} holdout rows)" if n else "")


def quantile_for(rows: int, quantile: float = CALIBRATION_QUANTILE) -> float:
    """``quantile``, or 1/``rows`` where so few unseen sequences cannot place one at it, at most
    ``MAX_QUANTILE`` (the demo's never-planted records, the lab's control strings)."""
    return min(max(quantile, 1.0 / rows), MAX_QUANTILE)


def check_holdout_size(rows: int, quantile: float, what: str = "holdout") -> None:
    """Raise InputError unless ``rows`` unseen sequences can place a sequence at ``quantile`` (the
    per-score one, ``Thresholds.score_quantile``)."""
    need = min_holdout_rows(quantile)
    if rows < need:
        raise InputError(
            f"{what}: {rows} row(s) cannot calibrate verdicts at quantile {quantile:.4g} per side and score: it needs "
            "at least "
            f"{need} (add rows, raise calibration_quantile, or give memorized/over_unlearned thresholds)"
        )
