"""The memorisation lab: the pure math against hand-derived values, and ``ds-unlearn memorize``
end to end on a tiny Llama with a character tokenizer (exposure, sequential, unlearning), plus
every bad input (exit 2, one line, nothing written)."""

import json
import math
import struct

import numpy as np
import pytest
import torch
import yaml

from ds_unlearn.cli import main
from ds_unlearn.commands.memorize import parse_config
from ds_unlearn.core.data import load_sequence_set
from ds_unlearn.core.errors import InputError
from ds_unlearn.core.files import read_jsonl
from ds_unlearn.core.toy import save_model, tiny_model
from ds_unlearn.lab import dynamics as dyn
from ds_unlearn.lab.config import LabConfig
from ds_unlearn.lab.results import (
    exposure_phases,
    median_epoch,
    sequential_summary,
    string_verdicts,
    unlearning_summary,
)

from .conftest import REPO

LETTERS = "abcdefghijklmnopqrstuvwxyz"
# Small enough for a 2-layer width-64 Llama to memorise in tens of one-step epochs.
RUN = ["--alphabet_size", "4", "--string_length", "12", "--learning_rate", "3e-3", "--seed", "0"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny matrices: a second thread only adds contention on a shared 2-core machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def char_tokenizer():
    """Every lowercase letter is one token (ids 3..28); anything longer is one token per letter."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "<unk>": 2, **{c: 3 + i for i, c in enumerate(LETTERS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex("."), "isolated")]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", pad_token="<pad>")


@pytest.fixture(scope="module")
def char_model(tmp_path_factory):
    path = save_model(
        tiny_model("llama", seed=0, vocab_size=32, hidden_size=64), tmp_path_factory.mktemp("lab") / "char_llama"
    )
    char_tokenizer().save_pretrained(path)
    return path


class SpaceTokenizer:
    """A GPT-2-like stand-in: a bare letter splits in two, a letter after a space is one token."""

    unk_token_id = None

    def __call__(self, text, add_special_tokens=False):
        if text.startswith(" ") and len(text) == 2:
            return {"input_ids": [100 + ord(text[1]) % 7]}  # 'a' and 'h' collide
        return {"input_ids": [1] * (len(text) + 1)}


# -- pure math ---------------------------------------------------------------------------------
def test_entropy_and_chance_level():
    assert dyn.entropy_bits(dyn.character_distribution(4, "uniform", None)) == pytest.approx(2.0)
    assert dyn.entropy_bits([0.5, 0.25, 0.25]) == pytest.approx(1.5)
    assert dyn.entropy_bits([1.0, 0.0]) == 0.0
    # Binary entropy 0.5 bits at p = 0.110: -0.11 log2 0.11 - 0.89 log2 0.89 = 0.4999.
    p = dyn.skewed_probabilities(2, 0.5)
    assert p == pytest.approx([0.8900, 0.1100], abs=2e-4)
    skewed = dyn.skewed_probabilities(26, 3.0)
    assert dyn.entropy_bits(skewed) == pytest.approx(3.0, abs=1e-9)
    assert np.all(np.diff(skewed) < 0) and skewed.sum() == pytest.approx(1.0)
    assert dyn.skewed_probabilities(4, 2.0) == pytest.approx([0.25] * 4)  # log2 l: uniform
    for bad in (0.0, 2.01, -1.0):
        with pytest.raises(InputError, match="target_entropy"):
            dyn.skewed_probabilities(4, bad)
    assert dyn.chance_level([0, 0, 1, 2]) == 0.5
    assert dyn.string_entropy_bits([0, 0, 1, 1]) == pytest.approx(1.0)
    assert dyn.string_entropy_bits([3, 3, 3]) == 0.0
    # The 'different' distribution of the global-context probe.
    assert dyn.entropy_bits(dyn.different_distribution(np.full(4, 0.25))) == pytest.approx(1.0)
    assert dyn.different_distribution(p) == pytest.approx([0.5, 0.5])


def test_sampled_strings_follow_the_distribution():
    p = dyn.skewed_probabilities(4, 1.5)
    strings = dyn.sample_strings(p, 500, 8, np.random.default_rng(0))
    assert len(strings) == 8 and all(len(s) == 500 for s in strings)
    counts = np.bincount(np.ravel(strings), minlength=4) / 4000
    assert counts == pytest.approx(p, abs=0.02)


def test_symbols_map_to_single_tokens():
    tok = char_tokenizer()
    assert dyn.map_symbols(tok, list("abz")) == ([3, 4, 28], False)
    with pytest.raises(InputError, match=r"character 'xy' is 2 tokens \[26, 27\]"):
        dyn.map_symbols(tok, ["a", "xy"])
    with pytest.raises(InputError, match="character 'é' is the unknown token"):
        dyn.map_symbols(tok, ["a", "é"])
    # A tokenizer that needs the leading space gets it, for the whole alphabet.
    assert dyn.map_symbols(SpaceTokenizer(), list("abc")) == ([106, 100, 101], True)
    with pytest.raises(
        InputError,
        match=r"character 'h' is token 106, the same as 'a'.* with a leading space, "
        r"and 'a' is 2 tokens \[1, 1\] without one; every character",
    ):
        dyn.map_symbols(SpaceTokenizer(), list("abh"))


def test_phases_on_hand_made_curves():
    epochs = list(range(7))
    control = [0.25] * 7
    # 100 positions: two standard errors of 0.25 are 0.087, so the 0.1 floor decides.
    assert dyn.clear_margin(0.25, 100, 0.1) == 0.1
    assert dyn.clear_margin(0.5, 16, 0.1) == pytest.approx(0.25)  # short binary strings: luck is large
    rising = [0.2, 0.25, 0.3, 0.6, 0.9, 1.0, 1.0]
    assert dyn.detect_phases(epochs, rising, control, 100, 0.1) == {
        "guessing": [0, 2],
        "memorisation_start": 3,
        "full_at": 5,
    }
    # One lucky epoch is not the start: accuracy must stay clearly above the control.
    spiky = [0.2, 0.5, 0.25, 0.6, 0.9, 1.0, 1.0]
    assert dyn.detect_phases(epochs, spiky, control, 100, 0.1)["memorisation_start"] == 3
    flat = [0.2, 0.3, 0.25, 0.3, 0.5, 0.2, 0.3]
    assert dyn.detect_phases(epochs, flat, control, 100, 0.1) == {
        "guessing": [0, 6],
        "memorisation_start": None,
        "full_at": None,
    }
    falling = [1.0, 0.9, 0.5, 0.3, 0.2, 0.4, 0.2]
    assert dyn.guessing_band_entry(epochs, falling, control, 100, 0.1) == 3


def test_positions_learned_and_forgotten():
    rows = np.array([[0, 1, 0], [1, 1, 0], [1, 0, 1], [1, 1, 1]], dtype=bool)
    assert dyn.learned_at(range(4), rows) == [1, 3, 2]
    assert dyn.first_wrong_at(range(4), rows) == [0, 2, 0]
    assert dyn.settled_epoch(range(3), [True, True, False]) is None
    assert dyn.rank_correlation([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert dyn.rank_correlation([1, 2, 3, None], [3, 2, 1, 0]) == pytest.approx(-1.0)
    assert dyn.rank_correlation([1, 1, 2, 3], [5, 6, 7, 8]) == pytest.approx(0.9486833)  # ties: mean ranks
    assert dyn.rank_correlation([1, 2], [1, 2]) is None


def test_probe_contexts_on_hand_made_sequences():
    seq = [10, 11, 12, 13, 14]  # position j predicts seq[j+1] from seq[:j+1]
    assert dyn.local_windows(seq, 2, keep=0) == {2: [11, 12, 13], 3: [12, 13, 14]}
    assert dyn.local_windows(seq, 4, keep=0) == {}
    bos = [1, 10, 11, 12, 13]  # BOS stays in front of every probe and does not count towards k
    assert dyn.local_windows(bos, 2, keep=1) == {3: [1, 11, 12, 13]}
    fresh = [90, 91, 92, 93]
    assert dyn.replaced_contexts(seq, 1, 0, fresh) == {1: [90, 11, 12], 2: [90, 91, 12, 13], 3: [90, 91, 92, 13, 14]}
    assert dyn.replaced_contexts(bos, 2, 1, fresh) == {3: [1, 90, 11, 12, 13]}
    assert dyn.smallest_k([1, 2, 4, 8], [0.2, 0.5, 0.86, 0.9], full=0.95) == 4
    assert dyn.smallest_k([1, 2], [0.2, 0.5], full=0.95) is None
    assert dyn.default_ks(20) == [*range(1, 17), 19]
    assert dyn.default_ks(31) == [*range(1, 17), 20, 24, 28, 30]  # 32-character strings: 17..30 bracketed
    assert dyn.default_ks(100) == [*range(1, 17), 20, 24, 28, 32, 64, 99]
    assert dyn.default_ks(2) == [1]


def test_shared_contexts_cap_what_can_be_memorised():
    strings = [[0, 1, 0], [0, 0, 1], [1, 1, 1]]
    # Without BOS, position 0 predicts the second character from the first: strings 0 and 1
    # both open with 0 and go on differently, so no model gets both right.
    assert dyn.shared_contexts(strings, keep=0) == [[True, False], [True, False], [False, False]]
    # With BOS, position 0 predicts the first character from BOS alone: shared by every string.
    assert dyn.shared_contexts(strings, keep=1) == [[True, True, False], [True, True, False], [True, False, False]]
    assert dyn.shared_contexts([[0, 1, 0], [0, 1, 1]], keep=0) == [[False, True], [False, True]]


def test_exposure_phases_count_only_positions_a_model_can_get():
    # Position 0 is shared with another string: the string is "full" once positions 1-2 are right.
    rows = [[0, 0, 0], [0, 1, 0], [0, 1, 1], [1, 1, 1]]
    history = [_record(e, [float(np.mean(r))], positions=[r]) for e, r in enumerate(rows)]
    phases = exposure_phases(history, 3, 0.1, [[True, False, False]])
    assert phases["strings"][0]["unique_full_at"] == 2 and phases["strings"][0]["full_at"] == 3


def test_median_epoch_counts_strings_that_never_got_there_as_latest():
    assert median_epoch([6, None, 15, 15]) == 15.0
    assert median_epoch([None, 12, 12, 8]) == 12.0
    assert median_epoch([None, 20, 12, None]) is None  # the median string never got there
    assert median_epoch([3, None, 5]) == 5.0 and median_epoch([]) is None


def _record(epoch, accuracy, control=0.25, loss=None, positions=None):
    return {
        "epoch": epoch,
        "accuracy": accuracy,
        "loss": loss or [1.0] * len(accuracy),
        "control_accuracy": control,
        "control_loss": 2.0,
        "positions": positions or [[1, 1]] * len(accuracy),
    }


def test_string_verdicts_place_strings_among_the_control_strings():
    # 4 control strings: quantile 1/4; accuracy 0 ties with three of them (position 0.375).
    record = {"accuracy": [0.0, 0.1, 0.5], "control_accuracies": [0.0, 0.0, 0.0, 0.1]}
    out = string_verdicts(record)
    assert out["verdicts"] == ["unseen-like", "memorized", "memorized"]
    assert out["counts"] == {"memorized": 2, "unseen-like": 1, "over-unlearned": 0}
    assert string_verdicts({"accuracy": [0.5], "control_accuracies": [0.0] * 3}) is None  # too few to place
    assert string_verdicts({"accuracy": [0.5]}) is None


def test_sequential_summary_on_hand_made_records():
    # Two epochs per stage: A (epochs 1-2), B (3-4), A again (5-6).
    a = [0.2, 0.6, 1.0, 0.8, 0.5, 0.9, 1.0]
    b = [0.2, 0.2, 0.2, 0.7, 1.0, 0.9, 0.8]
    history = [_record(e, [a[e], b[e]]) for e in range(7)]
    out = sequential_summary(history, [("A", 0), ("B", 1), ("A again", 0)], 2, 100, 0.1)
    assert [s["epochs"] for s in out["stages"]] == [[1, 2], [3, 4], [5, 6]]
    assert [s["epochs_to_full"] for s in out["stages"]] == [2, 2, 2]
    assert out["forgetting"] == {
        "a_after_own_stage": 1.0,
        "a_after_each_later_stage": [0.5],
        "a_lowest_while_others_learned": 0.5,
        "a_forgotten": 0.5,
    }
    assert out["relearning"]["a_when_shown_again"] == 0.5


def test_unlearning_summary_on_hand_made_records():
    exposure = [
        _record(0, [0.0], positions=[[0, 0, 0]]),
        _record(1, [0.3], positions=[[1, 0, 0]]),
        _record(2, [0.7], positions=[[1, 1, 0]]),
        _record(3, [1.0], positions=[[1, 1, 1]]),
    ]
    unlearning = [
        _record(0, [1.0], loss=[0.1], positions=[[1, 1, 1]]),
        _record(1, [0.7], loss=[0.9], positions=[[1, 1, 0]]),
        _record(2, [0.3], loss=[1.5], positions=[[1, 0, 0]]),
        _record(3, [0.0], loss=[3.0], positions=[[0, 0, 0]]),
    ]
    out = unlearning_summary(unlearning, exposure, 3, 0.1, math.log(4))
    s = out["strings"][0]
    assert s["leaves_full_at"] == 1
    # 3 positions: the margin is two standard errors of 0.25, 0.5; 0.3 <= 0.75 at epoch 1 already.
    assert s["guessing_again_at"] == 1 and s["loss_then"] == 0.9
    pos = out["positions"]
    assert pos["learned_at"] == [[1, 2, 3]] and pos["first_wrong_at"] == [[3, 2, 1]]
    assert pos["rank_correlation_learned_vs_forgotten"] == pytest.approx(-1.0)  # last in, first out
    assert pos["first_to_go"] == [[2]]


# -- configuration ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"alphabet_size": 27}, "alphabet_size: must lie in"),
        ({"symbols": ["a", "b"], "alphabet_size": 3}, "alphabet_size: 3 disagrees"),
        ({"symbols": ["a", "a"]}, "symbols: must be distinct"),
        ({"distribution": "skewed"}, "target_entropy: skewed strings need"),
        ({"distribution": "skewed", "target_entropy": 2.5}, "target_entropy"),
        ({"target_entropy": 1.0}, "target_entropy: only applies"),
        ({"distribution": "zipf"}, "distribution: must be"),
        ({"experiment": ["exposure", "memorise"]}, "experiment: must be one or more"),
        ({"experiment": ["sequential", "local_prefix"]}, "sequential trains its own schedule"),
        ({"experiment": ["sequential"], "num_strings": 1}, "num_strings: sequential"),
        ({"experiment": ["unlearning"], "string_length": 8}, "string_length: the unlearning experiment"),
        ({"experiment": ["unlearning"], "unlearn_method": "tau"}, "unlearn_method"),
        ({"local_prefix_ks": [0, 4], "experiment": ["local_prefix"]}, "local_prefix_ks: each k must lie in"),
        ({"local_prefix_ks": [4]}, "^local_prefix_ks: only applies with experiment local_prefix or global_context"),
        ({"unlearn_method": "sga"}, "^unlearn_method: only applies with experiment unlearning"),
        ({"unlearn_learning_rate": 1e-3, "experiment": ["local_prefix"]}, "unlearn_learning_rate: only applies"),
        ({"seed": -1}, r"seed: must lie in \[0, 4294967295\], got -1"),
        ({"epochs": 0}, "epochs: must be at least 1"),
        ({"deepspeed": "/nope.json"}, "deepspeed: no such file"),
    ],
)
def test_config_errors_name_the_field(kwargs, message):
    with pytest.raises(InputError, match=message):
        LabConfig(model="m", output_dir="o", **kwargs)


def test_config_defaults_and_hyphens():
    config = LabConfig(model="m", output_dir="o", experiment=["local-prefix", "global_context"])
    assert config.symbols == list("abcd") and config.alphabet_size == 4
    assert config.experiment == ["local_prefix", "global_context"] and config.trains_exposure
    assert LabConfig(model="m", output_dir="o", symbols=list("xyz")).alphabet_size == 3


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "dynamics").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_parse_and_open_with_their_command(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ds-unlearn memorize --config configs/dynamics/")
    config = parse_config(["--config", str(path)])
    assert config.model == "smollm2" and path.stem in config.experiment


def test_flags_override_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": "m", "output_dir": "o", "epochs": 7, "experiment": "sequential"}))
    config = parse_config(["--config", str(path), "--epochs", "9"])
    assert config.epochs == 9 and config.experiment == ["sequential"]


# -- the command, end to end --------------------------------------------------------------------------
def is_png(path):
    data = path.read_bytes()
    width, height = struct.unpack(">II", data[16:24])
    return data[:8] == b"\x89PNG\r\n\x1a\n" and width > 100 and height > 100


def test_exposure_memorises_and_writes_every_output(char_model, tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        main(
            [
                "memorize",
                "--model",
                str(char_model),
                *RUN,
                "--num_strings",
                "4",
                "--epochs",
                "60",
                "--experiment",
                "exposure",
                "local_prefix",
                "global_context",
                "--local_prefix_ks",
                "1",
                "2",
                "4",
                "8",
                "--save_model",
                "--output_dir",
                str(out),
            ]
        )
        == 0
    )
    assert "memorize (exposure, local_prefix, global_context" in capsys.readouterr().out
    d = json.loads((out / "dynamics.json").read_text())
    epochs = d["exposure"]["epochs"]
    assert [r["epoch"] for r in epochs] == list(range(61))
    first, last = epochs[0], epochs[-1]
    assert len(last["accuracy"]) == len(last["loss"]) == 4 and len(last["positions"][0]) == 11
    assert last["accuracy"][0] == pytest.approx(np.mean(last["positions"][0]))
    # It memorises: well above the unseen control, whose accuracy stays near chance (1/4).
    assert np.mean(last["accuracy"]) > last["control_accuracy"] + 0.5
    assert np.mean(last["loss"]) < np.mean(first["loss"]) / 3
    assert 0.0 <= last["control_accuracy"] <= 0.5
    phases = d["exposure"]["phases"]
    for p in phases["strings"]:
        assert p["memorisation_start"] is not None and p["guessing"][0] == 0
        assert p["full_at"] is None or p["full_at"] >= p["memorisation_start"]
        assert p["unique_full_at"] is not None and p["unique_full_at"] <= (p["full_at"] or 10**6)
    strings = d["strings"]
    assert strings["distribution"]["entropy_bits"] == pytest.approx(2.0)
    assert strings["token_ids"] == [3, 4, 5, 6] and strings["leading_space"] is False
    for s in strings["train"]:
        assert len(s["text"]) == 12 and set(s["text"]) <= set("abcd")
        assert s["chance_level"] == max(s["text"].count(c) for c in "abcd") / 12
        assert s["entropy_bits"] <= 2.0 and 0 <= s["shared_context_positions"] <= 11
    lp = d["local_prefix"]
    assert lp["ks"] == [1, 2, 4, 8] and len(lp["accuracy"]) == 4
    assert lp["full_accuracy"] == pytest.approx(np.mean(last["accuracy"]))
    assert lp["k_90"] is None or lp["accuracy"][lp["ks"].index(lp["k_90"])] >= 0.9 * lp["full_accuracy"]
    gc = d["global_context"]["by_k"]
    assert [r["k"] for r in gc] == [1, 2, 4, 8] and gc[0]["positions"] == 4 * 10
    assert set(gc[0]) >= {"full", "local_only", "same_distribution", "different_distribution"}
    assert d["summary"]["median_memorisation_start"] is not None
    full = [p["full_at"] is not None for p in d["exposure"]["phases"]["strings"]]
    assert d["summary"]["strings_full"] == sum(full) and d["summary"]["strings"] == len(full)
    # The one verdict: each string's accuracy by mid-rank position among the 8 control strings (q = 1/8).
    control = last["control_accuracies"]
    assert len(control) == 8 and np.mean(control) == pytest.approx(last["control_accuracy"])
    position = [(sum(c < a for c in control) + 0.5 * sum(c == a for c in control)) / 8 for a in last["accuracy"]]
    expected = ["memorized" if p > 7 / 8 else "over-unlearned" if p < 1 / 8 else "unseen-like" for p in position]
    assert d["summary"]["final_verdicts"]["verdicts"] == expected
    assert all(v == "memorized" for v, f in zip(expected, full) if f)
    for name in ("exposure_curves.png", "exposure_positions.png", "local_prefix.png", "global_context.png"):
        assert is_png(out / name), name
    assert sorted(d["plots"]) == sorted(p.name for p in out.glob("*.png"))
    assert list((out / "tensorboard").rglob("events.out.tfevents*"))
    canaries = load_sequence_set(out / "canaries.jsonl", vocab_size=32)
    assert canaries.ids == [f"canary-{i:03d}" for i in range(4)]
    assert [len(s) for s in canaries.sequences] == [12] * 4
    assert [r["text"] for r in read_jsonl(out / "canaries.jsonl")] == [s["text"] for s in strings["train"]]
    assert (out / "model" / "config.json").exists() and (out / "model" / "tokenizer.json").exists()


def test_sequential_exposure_forgets_a_while_b_is_learned(char_model, tmp_path):
    out = tmp_path / "seq"
    assert (
        main(
            [
                "memorize",
                "--model",
                str(char_model),
                *RUN,
                "--num_strings",
                "2",
                "--epochs",
                "40",
                "--experiment",
                "sequential",
                "--output_dir",
                str(out),
            ]
        )
        == 0
    )
    d = json.loads((out / "dynamics.json").read_text())
    seq = d["sequential"]
    assert [s["name"] for s in seq["stages"]] == ["A", "B", "A again"]
    assert len(seq["epochs"]) == 3 * 40 + 1
    a_stage, b_stage, _ = seq["stages"]
    assert a_stage["accuracy_after"] >= 0.9 and b_stage["accuracy_after"] >= 0.9
    assert seq["forgetting"]["a_after_own_stage"] >= 0.9
    assert seq["forgetting"]["a_forgotten"] > 0.2  # A faded while B was learned
    assert is_png(out / "sequential.png")
    assert "exposure" not in d and not (out / "canaries.jsonl").exists()


def test_unlearning_reverses_memorisation(char_model, tmp_path):
    out = tmp_path / "unl"
    assert (
        main(
            [
                "memorize",
                "--model",
                str(char_model),
                *RUN,
                "--num_strings",
                "4",
                "--epochs",
                "60",
                "--experiment",
                "unlearning",
                "--unlearn_learning_rate",
                "1e-3",
                "--unlearn_epochs",
                "25",
                "--output_dir",
                str(out),
            ]
        )
        == 0
    )
    d = json.loads((out / "dynamics.json").read_text())
    unl = d["unlearning"]
    start, end = unl["epochs"][0], unl["epochs"][-1]
    assert np.mean(start["accuracy"]) == pytest.approx(np.mean(d["exposure"]["epochs"][-1]["accuracy"]))
    assert np.mean(end["accuracy"]) < np.mean(start["accuracy"]) - 0.4
    assert unl["stop_threshold"] == d["exposure"]["epochs"][-1]["control_accuracy"]
    assert unl["stop_reason"].startswith("mean stop rule holds")
    # The mean rule stops once the average is low, so a string may still sit above the guessing band
    # (one of four here at accuracy 0.45 on one machine, none on another): what per-sequence judging
    # is for. Most are back; one that is not still scores above the unseen strings.
    back = [s["guessing_again_at"] for s in unl["strings"]]
    assert sum(b is not None for b in back) >= len(back) // 2, back
    for s in unl["strings"]:
        assert (s["loss_then"] is None) == (s["guessing_again_at"] is None)
        if s["guessing_again_at"] is None:
            assert s["accuracy_after"] > end["control_accuracy"], s
    assert len(unl["positions"]["first_wrong_at"][0]) == 11
    assert (out / "unlearn" / "scores_before.jsonl").exists()
    assert is_png(out / "unlearning_curves.png") and is_png(out / "unlearning_positions.png")


def test_bad_input_exits_2_with_one_line_and_writes_nothing(char_model, tmp_path, capsys):
    out = tmp_path / "never"
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("x")
    yaml_bad = tmp_path / "bad.yaml"
    yaml_bad.write_text("model: m\nepoch: 3\n")
    cases = {
        "two-token symbol": (["--symbols", "a", "xy"], "character 'xy' is 2 tokens"),
        "no model": (["--model", str(tmp_path / "none")], "is not a model directory"),
        "unknown yaml key": (["--config", str(yaml_bad)], "unknown key 'epoch'"),
        "skewed, no target": (["--distribution", "skewed"], "target_entropy"),
        "inside the model": (["--output_dir", str(char_model / "out")], "lies inside the input"),
        "occupied": (["--output_dir", str(occupied)], "holds an earlier run (keep.txt); pass --overwrite"),
    }
    for name, (args, message) in cases.items():
        argv = ["memorize", "--model", str(char_model), "--output_dir", str(out), *args]
        assert main(argv) == 2, name
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (name, err)
        assert not out.exists() and not (char_model / "out").exists(), name
    assert [p.name for p in occupied.iterdir()] == ["keep.txt"]


@pytest.mark.distributed
@pytest.mark.slow
def test_zero3_two_ranks_match_one_process(char_model, tmp_path):
    """The real launcher, 2 CPU ranks, ZeRO-3: training, per-epoch measures, the probe and the
    unlearning run (a second Trainer in the same process) give the one-process records."""
    from .launcher import deepspeed_run, tail

    args = [
        "--model",
        str(char_model),
        *RUN,
        "--num_strings",
        "3",
        "--epochs",
        "20",
        "--experiment",
        "local_prefix",
        "unlearning",
        "--local_prefix_ks",
        "1",
        "2",
        "4",
        "--unlearn_learning_rate",
        "1e-3",
        "--unlearn_epochs",
        "4",
    ]
    assert main(["memorize", *args, "--output_dir", str(tmp_path / "one")]) == 0
    script = tmp_path / "memorize.py"  # the launcher runs a script and passes --local_rank=N first
    script.write_text("import sys\nfrom ds_unlearn.cli import main\nsys.exit(main(['memorize', *sys.argv[1:]]))\n")
    result = deepspeed_run(
        script, *args, "--deepspeed", REPO / "configs/ds/zero3.json", "--output_dir", tmp_path / "two"
    )
    assert result.returncode == 0, tail(result)
    one, two = (json.loads((tmp_path / name / "dynamics.json").read_text()) for name in ("one", "two"))
    assert two["world_size"] == 2
    for part in ("exposure", "unlearning"):
        assert len(one[part]["epochs"]) == len(two[part]["epochs"])
        for a, b in zip(one[part]["epochs"], two[part]["epochs"]):
            assert b["loss"] == pytest.approx(a["loss"], abs=2e-3), (part, a["epoch"])
            assert b["control_loss"] == pytest.approx(a["control_loss"], abs=2e-3), (part, a["epoch"])
    assert two["local_prefix"]["ks"] == one["local_prefix"]["ks"]
    assert (tmp_path / "two" / "canaries.jsonl").read_text() == (tmp_path / "one" / "canaries.jsonl").read_text()
