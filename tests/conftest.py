"""Shared fixtures: tiny models trained in seconds to memorize known token sequences."""

import json
import os
from pathlib import Path

import pytest
import torch

from ds_unlearn.core.toy import memorize, random_sequences, save_model, tiny_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(2)

VOCAB = 64
REPO = Path(__file__).resolve().parents[1]


def mutate(seq, positions, vocab=VOCAB):
    """A copy of ``seq`` with the tokens at ``positions`` replaced by different ids."""
    out = list(seq)
    for p in positions:
        out[p] = 1 + (out[p] % (vocab - 1))
    return out


@pytest.fixture(scope="session")
def token_sets():
    """Memorized, partly memorized (memorized with a few tokens changed), unseen and repetitive
    sequences of mixed lengths."""
    memorized = random_sequences(3, [40, 30, 48], VOCAB, seed=11)
    partial = [mutate(memorized[0], [12]), mutate(memorized[2], [5, 30]), memorized[1][:20] + memorized[0][:18]]
    unseen = random_sequences(3, [40, 25, 33], VOCAB, seed=12)
    repetitive = random_sequences(2, [30, 36], 4, seed=13)  # ids 1..3: n-grams repeat often
    return {"memorized": memorized, "partial": partial, "unseen": unseen, "repetitive": repetitive}


@pytest.fixture(scope="session", params=["llama", "gpt_neo"])
def memorized_model(request, token_sets):
    """A tiny model of each architecture that memorized the ``memorized`` set (and the
    repetitive one), in float64 so fast and reference agree to the last bit."""
    model = tiny_model(request.param, seed=0, vocab_size=VOCAB)
    memorize(model, token_sets["memorized"] + token_sets["repetitive"][:1], steps=120)
    return model.double().eval()


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, token_sets):
    """A saved float32 Llama checkpoint that memorized the ``memorized`` set."""
    model = memorize(tiny_model("llama", seed=0, vocab_size=VOCAB), token_sets["memorized"], steps=120)
    return save_model(model, tmp_path_factory.mktemp("ckpt") / "model")


def write_jsonl(path, rows):
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return Path(path)


@pytest.fixture()
def ids_file(tmp_path, token_sets):
    rows = [
        {"id": f"{name}-{i}", "input_ids": seq}
        for name in ("memorized", "partial", "unseen")
        for i, seq in enumerate(token_sets[name])
    ]
    return write_jsonl(tmp_path / "data.jsonl", rows)


@pytest.fixture(scope="session")
def unlearn_case(tmp_path_factory):
    """A tiny Llama that memorized 8 sequences of 24 tokens: 4 to forget, 4 to retain, plus 4
    unseen holdout sequences, as files an unlearning run takes."""
    root = tmp_path_factory.mktemp("unlearn_case")
    seqs = random_sequences(8, 24, VOCAB, seed=21)
    model = memorize(tiny_model("llama", seed=1, vocab_size=VOCAB), seqs, steps=150)
    save_model(model, root / "model")
    files = {}
    for name, rows in {
        "forget": seqs[:4],
        "retain": seqs[4:],
        "holdout": random_sequences(4, 24, VOCAB, seed=22),
    }.items():
        files[name] = write_jsonl(
            root / f"{name}.jsonl", [{"id": f"{name}-{i}", "input_ids": s} for i, s in enumerate(rows)]
        )
    return {"model": root / "model", **files}


@pytest.fixture(scope="session")
def random_case(tmp_path_factory):
    """A tiny Llama that memorized 16 random 24-token strings: 12 to forget, 4 to retain, and 24
    unseen random strings as the holdout (enough for the default quantile 0.05: 20), which score
    MA 0 mostly (ties); ``unseen`` is 24 more, never trained on either."""
    root = tmp_path_factory.mktemp("random_case")
    seqs = random_sequences(16, 24, VOCAB, seed=62)
    save_model(memorize(tiny_model("llama", seed=5, vocab_size=VOCAB), seqs, steps=150), root / "model")
    sets = {
        "forget": seqs[:12],
        "retain": seqs[12:],
        "holdout": random_sequences(24, 24, VOCAB, seed=162),
        "unseen": random_sequences(24, 24, VOCAB, seed=163),
    }
    for name, rows in sets.items():
        write_jsonl(root / f"{name}.jsonl", [{"id": f"{name}-{i}", "input_ids": s} for i, s in enumerate(rows)])
    return root


def unlearn_args(case, output_dir, *extra):
    """Flags of a small, fast unlearning run on ``unlearn_case``."""
    return [
        "--model",
        str(case["model"]),
        "--forget",
        str(case["forget"]),
        "--retain",
        str(case["retain"]),
        "--holdout",
        str(case["holdout"]),
        "--output_dir",
        str(output_dir),
        "--extract_k",
        "8",
        "--learning_rate",
        "3e-3",
        "--per_device_train_batch_size",
        "4",
        "--score_batch_size",
        "64",
        "--save_strategy",
        "no",
        "--seed",
        "0",
        # The ICML code's fixed verdicts: the random holdout of this tiny model scores near 0, and
        # a band calibrated on it would leave nothing between "unseen" and "destroyed".
        "--memorized_threshold",
        "0.6",
        "--over_unlearned_threshold",
        "0.15",
        *map(str, extra),
    ]


SHM = Path("/dev/shm")


@pytest.fixture(autouse=True)
def _no_leaked_deepspeed_buffers():
    """DeepSpeed's CPU all-reduce leaves a shared-memory buffer per rank in /dev/shm (tens of MB
    each) when a rank does not exit through its cleanup, as the fault tests make them do; remove
    the ones a test created so a long suite does not fill the machine's memory."""
    before = set(SHM.glob("deepspeed_allreduce_buffer_*")) if SHM.is_dir() else set()
    yield
    # An in-process test must not leave this process looking like a launched rank (that would
    # start the launcher watchdog and the rank failure path in later tests).
    from ds_unlearn.core import distributed as D

    assert not D.launched_by_launcher(), "a test left launcher variables in the environment"
    if SHM.is_dir():
        for leaked in set(SHM.glob("deepspeed_allreduce_buffer_*")) - before:
            leaked.unlink(missing_ok=True)
