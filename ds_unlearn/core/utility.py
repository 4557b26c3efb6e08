"""Utility benchmarks through lm-evaluation-harness (``lm-eval``, the optional ``[eval]`` extra).

``check_eval_request`` validates the task names (lm-eval's own, or YAMLs under an include path)
before any model loads; ``run_eval`` wraps the already-loaded model in lm-eval's ``HFLM`` and
calls ``lm_eval.simple_evaluate``. Under several ranks every rank runs the same evaluation on its
own (lm-eval's data parallelism needs to load the model itself; a ZeRO-3 model needs every rank
in each forward call) and the results are those of rank 0.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, redirect_stderr
from pathlib import Path

from .errors import InputError, param

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
        raise InputError(f"{param('eval_tasks')} needs lm-evaluation-harness: {INSTALL_HINT}") from None
    if include_path is not None and not Path(include_path).is_dir():
        raise InputError(f"{include_path} is not a directory", field="eval_include_path")
    return TaskManager(include_path=str(include_path) if include_path else None, include_defaults=include_defaults)


def check_eval_request(
    tasks: Sequence[str],
    include_path: str | Path | None,
    tokenizer,
    *,
    model_config=None,
    limit: int | float | None = None,
) -> object:
    """Every task resolvable, its documents loadable (a task YAML's relative ``data_files`` are
    relative to the working directory) and a tokenizer present; with ``model_config`` (the
    checkpoint's config) also every request lm-eval will send, built as it builds them (``limit``
    documents per task, lm-eval's meaning), fits this tokenizer and model (``check_requests``).
    Returns the TaskManager for ``run_eval``. Raises InputError (one line) otherwise, before any
    model loads."""
    if include_path and not tasks:
        raise InputError(f"{param('eval_include_path')} given without {param('eval_tasks')}")
    manager = None
    if include_path:  # the user's own tasks alone: skips indexing lm-eval's thousands of YAMLs (~10 s)
        manager = task_manager(include_path, include_defaults=False)
        if not all(manager.match_tasks([t]) for t in tasks):
            manager = None
    manager = manager or task_manager(include_path)
    unknown = [t for t in tasks if not manager.match_tasks([t])]
    if unknown:
        raise InputError(
            f"{param('eval_tasks')}: unknown task {unknown[0]!r} (lm-eval names, or YAMLs in "
            f"{param('eval_include_path')})"
        )
    if tokenizer is None:
        raise InputError("the model directory has no tokenizer, which lm-eval needs", field="eval_tasks")
    from lm_eval.tasks import get_task_dict

    try:  # build the tasks now (their documents load and are cached): a missing data file is input
        with _quiet():
            task_dict = get_task_dict(list(tasks), manager)
    except Exception as err:  # noqa: BLE001 - any failure here is the task's data or YAML, said in one line
        raise InputError(f"cannot load the task data ({_first_line(err)})", field="eval_tasks") from None
    if model_config is not None:
        check_requests(task_dict, tokenizer, model_config, limit)
    return manager


@contextmanager
def _quiet() -> Iterator[None]:
    """No progress bars (datasets', lm-eval's tqdm) on stderr while checking: a refusal is one line."""
    with redirect_stderr(io.StringIO()):
        yield


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def _leaf_tasks(task_dict: dict) -> Iterator[tuple[str, object]]:
    """(name, Task) of every task in lm-eval's (possibly nested, for groups) task dict."""
    for key, value in task_dict.items():
        if isinstance(value, dict):
            yield from _leaf_tasks(value)
        else:
            yield str(key), value


def check_requests(task_dict: dict, tokenizer, model_config, limit: int | float | None = None) -> None:
    """What lm-eval's ``HFLM`` would otherwise fail on after the whole audit, checked on the
    requests as lm-eval builds them (``Task.build_all_requests``, the first ``limit`` documents):

    - the tokenizer has more tokens than the model's embedding (ids with no row);
    - a ``generate_until`` task without the tokenizer's EOS (HFLM stops generation and pads at it),
      or one asking to generate ``max_gen_toks`` tokens, no fewer than the model's context;
    - an empty context (``loglikelihood_rolling``, or an empty ``doc_to_text``) without a BOS or EOS
      token to condition on;
    - a target that tokenizes to nothing, or is longer than the model's context by itself.

    The context length is lm-eval's own (``resolve_max_length`` on the config and tokenizer).
    Raises InputError naming the task and document."""
    from lm_eval.evaluator_utils import get_sample_size
    from lm_eval.models.utils import resolve_max_length

    vocab = getattr(model_config, "vocab_size", None)
    if vocab is not None and len(tokenizer) > vocab:
        raise InputError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's embedding only {vocab} rows", field="eval_tasks"
        )
    context = resolve_max_length(model_config, tokenizer)
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id

    def encode(text: str) -> list[int]:  # HFLM.tok_encode of a causal model
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    for name, task in _leaf_tasks(task_dict):
        try:
            with _quiet():
                task.build_all_requests(limit=get_sample_size(task, limit))
        except Exception as err:  # noqa: BLE001 - a task's prompt templates or few-shot split, said in one line
            raise InputError(f"{name}: cannot build its requests ({_first_line(err)})", field="eval_tasks") from None
        for instance in task.instances:
            where = f"{param('eval_tasks')}: {name} document {instance.doc_id}"
            kind, args = instance.request_type, instance.arguments
            if kind == "generate_until":
                if tokenizer.eos_token_id is None:
                    raise InputError(f"{where}: generate_until needs the tokenizer's EOS token, and it has none")
                wanted = int((args[1] or {}).get("max_gen_toks", 256))
                if wanted >= context:
                    raise InputError(
                        f"{where}: asks for {wanted} generated tokens, no fewer than the model's context of {context}"
                    )
                continue
            text, target = (args[0], "") if kind == "loglikelihood_rolling" else (args[0], args[1])
            if kind == "loglikelihood_rolling" or text == "":
                if prefix is None:
                    raise InputError(f"{where}: an empty context needs a BOS or EOS token to start from; it has none")
                if kind == "loglikelihood_rolling":
                    continue
                target_ids = encode(target)
            else:
                spaces = len(text) - len(text.rstrip())  # HFLM moves them into the target
                text, target = (text[:-spaces], text[-spaces:] + target) if spaces else (text, target)
                target_ids = encode(text + target)[len(encode(text)) :]
            if not target_ids:
                raise InputError(f"{where}: its target {target!r} is no token at all with this tokenizer")
            if len(target_ids) > context:
                raise InputError(
                    f"{where}: its target is {len(target_ids)} tokens, more than the model's context of {context}"
                )


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
