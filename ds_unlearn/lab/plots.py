"""The lab's PNG plots, drawn from the results dict that ``dynamics.json`` holds (Agg backend:
no display needed). ``write_plots`` draws whatever the run produced and returns the file names."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

GUESSING, MEMORISING = "#f2d7a6", "#b9dcb4"


def subplots(*args, figsize, **kwargs):
    """A figure outside pyplot (no global backend switch, nothing to close): (figure, axes)."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(*args, **kwargs)


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path.name


def curves(
    path: Path, title: str, history: list[dict], phases: dict | None, entropy_nats: float, boundaries: list[int] = ()
) -> str:
    """Accuracy and loss per string (thin) and their mean (thick) against the unseen control;
    the mean curve's guessing and memorisation phases shaded, the entropy drawn on the loss."""
    epochs = [r["epoch"] for r in history]
    accuracy, loss = np.array([r["accuracy"] for r in history]), np.array([r["loss"] for r in history])
    fig, (top, bottom) = subplots(2, 1, figsize=(7, 6), sharex=True)
    for ax, values, control, name in (
        (top, accuracy, "control_accuracy", "accuracy"),
        (bottom, loss, "control_loss", "loss (nats)"),
    ):
        if phases is not None:
            start, last = phases["memorisation_start"], epochs[-1]
            ax.axvspan(epochs[0], last if start is None else start, color=GUESSING, label="guessing")
            if start is not None:
                ax.axvspan(start, last, color=MEMORISING, label="memorisation")
        ax.plot(epochs, values, color="tab:blue", alpha=0.3, lw=0.8)
        ax.plot(epochs, values.mean(1), color="tab:blue", lw=2, label="strings (mean)")
        ax.plot(epochs, [r[control] for r in history], "k--", lw=1.5, label="unseen control")
        for b in boundaries:
            ax.axvline(b, color="grey", lw=0.8, ls=":")
        ax.set_ylabel(name)
    if phases is not None and phases["full_at"] is not None:
        top.axvline(phases["full_at"], color="tab:green", lw=1, label="accuracy 0.99")
    bottom.axhline(entropy_nats, color="tab:red", lw=1, ls="-.", label="entropy")
    top.set_ylim(-0.02, 1.02)
    top.legend(fontsize=7, loc="lower right")
    bottom.legend(fontsize=7, loc="upper right")
    bottom.set_xlabel("epoch")
    top.set_title(title)
    return _save(fig, path)


def position_map(path: Path, title: str, history: list[dict], first_char: int) -> str:
    """Epoch x position map: the share of strings whose character at that position is predicted."""
    grid = np.array([np.mean(r["positions"], axis=0) for r in history])
    fig, ax = subplots(figsize=(7, 4.5))
    image = ax.imshow(
        grid,
        aspect="auto",
        origin="lower",
        cmap="viridis",
        vmin=0,
        vmax=1,
        extent=(first_char - 0.5, first_char + grid.shape[1] - 0.5, -0.5, len(history) - 0.5),
    )
    fig.colorbar(image, ax=ax, label="share of strings correct")
    ax.set_xlabel("position (predicted character)")
    ax.set_ylabel("epoch")
    ax.set_title(title)
    return _save(fig, path)


def local_prefix(path: Path, result: dict) -> str:
    fig, ax = subplots(figsize=(6, 4))
    ax.plot(result["ks"], result["accuracy"], "o-", label="last k characters only")
    ax.axhline(result["full_accuracy"], color="k", ls="--", label="full context")
    ax.axhline(0.9 * result["full_accuracy"], color="grey", ls=":", label="90% of full")
    if result["k_90"] is not None:
        ax.axvline(result["k_90"], color="tab:green", lw=1, label=f"k = {result['k_90']}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("local prefix k")
    ax.set_ylabel("recollection accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8)
    ax.set_title("Local prefix")
    return _save(fig, path)


def global_context(path: Path, result: dict) -> str:
    rows = result["by_k"]
    ks = [r["k"] for r in rows]
    fig, ax = subplots(figsize=(6, 4))
    for key, style in (
        ("full", "k--"),
        ("same_distribution", "o-"),
        ("different_distribution", "s-"),
        ("local_only", "^:"),
    ):
        ax.plot(ks, [r[key] for r in rows], style, label=key.replace("_", " "))
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k kept characters (the context before them replaced)")
    ax.set_ylabel("accuracy at positions with longer contexts")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8)
    ax.set_title("Global context")
    return _save(fig, path)


def sequential(path: Path, result: dict) -> str:
    """Each string's accuracy through the stages, stage boundaries marked."""
    history, stages = result["epochs"], result["stages"]
    epochs = [r["epoch"] for r in history]
    fig, ax = subplots(figsize=(8, 4))
    for i in sorted({s["string"] for s in stages}):
        name = next(s["name"] for s in stages if s["string"] == i)
        ax.plot(epochs, [r["accuracy"][i] for r in history], lw=2 if i == 0 else 1, label=f"string {name}")
    ax.plot(epochs, [r["control_accuracy"] for r in history], "k--", lw=1, label="unseen control")
    for s in stages:
        ax.axvline(s["epochs"][0] - 1, color="grey", lw=0.8, ls=":")
        ax.text(s["epochs"][0] - 0.5, 1.01, s["name"], fontsize=8, va="bottom")
    ax.set_ylim(-0.02, 1.08)
    ax.set_xlabel("epoch")
    ax.set_ylabel("recollection accuracy")
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("Sequential exposure")
    return _save(fig, path)


def write_plots(results: dict, out: Path, entropy_nats: float, first_char: int) -> list[str]:
    """Every plot the results support, into ``out``; returns the file names written."""
    written = []
    if "exposure" in results:
        exposure = results["exposure"]
        written.append(
            curves(
                out / "exposure_curves.png", "Exposure", exposure["epochs"], exposure["phases"]["mean"], entropy_nats
            )
        )
        written.append(
            position_map(out / "exposure_positions.png", "Exposure: epoch x position", exposure["epochs"], first_char)
        )
    if "local_prefix" in results:
        written.append(local_prefix(out / "local_prefix.png", results["local_prefix"]))
    if "global_context" in results:
        written.append(global_context(out / "global_context.png", results["global_context"]))
    if "sequential" in results:
        written.append(sequential(out / "sequential.png", results["sequential"]))
    if "unlearning" in results:
        history = results["unlearning"]["epochs"]
        written.append(
            curves(
                out / "unlearning_curves.png",
                f"Unlearning ({results['unlearning']['method']})",
                history,
                None,
                entropy_nats,
            )
        )
        written.append(
            position_map(out / "unlearning_positions.png", "Unlearning: epoch x position", history, first_char)
        )
    return written


PLOT_FILES = (
    "exposure_curves.png",
    "exposure_positions.png",
    "local_prefix.png",
    "global_context.png",
    "sequential.png",
    "unlearning_curves.png",
    "unlearning_positions.png",
)
