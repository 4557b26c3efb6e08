"""Utility benchmarks through lm-evaluation-harness (``lm-eval``, the optional ``[eval]`` extra).

``check_eval_request`` validates the task names (lm-eval's own, or YAMLs under an include path)
before any model loads; ``run_eval`` wraps the already-loaded model in lm-eval's ``HFLM`` and
calls ``lm_eval.simple_evaluate``. Under several ranks every rank runs the same evaluation on its
own (lm-eval's data parallelism needs to load the model itself; a ZeRO-3 model needs every rank
in each forward call) and the results are those of rank 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .errors import InputError

INSTALL_HINT = "pip install 'ds_unlearn[eval]'"


def parse_tasks(text: str | Sequence[str] | None) -> list[str]:
    """``"a,b"`` or ``["a", "b,c"]`` -> ``["a", "b", "c"]``."""
    if not text:
        return []
    parts = [text] if isinstance(text, str) else list(text)
    return [t.strip() for part in parts for t in part.split(",") if t.strip()]


def task_manager(include_path: str | Path | None = None, include_defaults: bool = True):
    """lm-eval's ``TaskManager`` with the user's task YAMLs added; InputError without lm-eval."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise InputError(f"--eval_tasks needs lm-evaluation-harness: {INSTALL_HINT}") from None
    if include_path is not None and not Path(include_path).is_dir():
        raise InputError(f"--eval_include_path: {include_path} is not a directory")
    return TaskManager(include_path=str(include_path) if include_path else None, include_defaults=include_defaults)


def check_eval_request(tasks: Sequence[str], include_path: str | Path | None, tokenizer) -> object:
    """Every task resolvable, its documents loadable (a task YAML's relative ``data_files`` are
    relative to the working directory) and a tokenizer present; returns the TaskManager for
    ``run_eval``. Raises InputError (one line) otherwise, before any model loads."""
    if include_path and not tasks:
        raise InputError("--eval_include_path given without --eval_tasks")
    manager = None
    if include_path:  # the user's own tasks alone: skips indexing lm-eval's thousands of YAMLs (~10 s)
        manager = task_manager(include_path, include_defaults=False)
        if not all(manager.match_tasks([t]) for t in tasks):
            manager = None
    manager = manager or task_manager(include_path)
    unknown = [t for t in tasks if not manager.match_tasks([t])]
    if unknown:
        raise InputError(f"--eval_tasks: unknown task {unknown[0]!r} (lm-eval names, or YAMLs in --eval_include_path)")
    if tokenizer is None:
        raise InputError("--eval_tasks: the model directory has no tokenizer, which lm-eval needs")
    from lm_eval.tasks import get_task_dict

    try:  # build the tasks now (their documents load and are cached): a missing data file is input
        get_task_dict(list(tasks), manager)
    except Exception as err:  # noqa: BLE001 - any failure here is the task's data or YAML, said in one line
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise InputError(f"--eval_tasks: cannot load the task data ({type(err).__name__}: {first})") from None
    return manager


def run_eval(
    model,
    tokenizer,
    tasks: Sequence[str],
    manager,
    *,
    limit: int | float | None = None,
    batch_size: int = 8,
    seed: int = 0,
) -> dict[str, dict]:
    """``lm_eval.simple_evaluate`` on ``model`` (already loaded, any device); returns lm-eval's
    ``results`` dict: task name -> {metric,filter: value}. ``limit``: documents per task (lm-eval's
    meaning: an int count, or a fraction below 1)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(model.device))
    out = simple_evaluate(
        model=lm,
        tasks=list(tasks),
        task_manager=manager,
        limit=limit,
        bootstrap_iters=0,
        log_samples=False,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    return {task: {k: v for k, v in metrics.items() if k != "alias"} for task, metrics in out["results"].items()}
