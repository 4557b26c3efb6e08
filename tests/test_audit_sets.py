"""``ds-unlearn audit`` with a forget or holdout set too small for what is asked: a
bootstrap interval of an AUC from a one-row set is one line, exit 2, nothing written, before any
model loads; ``--bootstrap 0`` (the AUC alone) lets the same sets through."""

import pytest

from ds_unlearn.cli import main
from ds_unlearn.core.toy import random_sequences, save_model, tiny_model

from .conftest import VOCAB, write_jsonl


class ModelLoaded(Exception):
    """Raised in place of loading a model: every check before compute has passed."""


@pytest.fixture()
def no_model(monkeypatch):
    def refuse(*_args, **_kwargs):
        raise ModelLoaded

    monkeypatch.setattr("ds_unlearn.commands.audit.load_for_inference", refuse)


def audit_argv(tmp_path, n_forget, n_holdout, *extra):
    model = save_model(tiny_model("llama", seed=0, vocab_size=VOCAB), tmp_path / "model")
    rows = random_sequences(n_forget + n_holdout, 30, VOCAB, seed=3)
    forget = write_jsonl(tmp_path / "f.jsonl", [{"id": f"f{i}", "input_ids": s} for i, s in enumerate(rows[:n_forget])])
    holdout = write_jsonl(
        tmp_path / "h.jsonl", [{"id": f"h{i}", "input_ids": s} for i, s in enumerate(rows[n_forget:])]
    )
    argv = ["audit", "--model", model, "--forget", forget, "--holdout", holdout, "--out", tmp_path / "out"]
    argv += ["--prefix_length", 8, "--suffix_length", 16, "--extract_k", 8, "--el_n", 5]
    argv += ["--memorized_threshold", 0.6, "--over_unlearned_threshold", 0.15, *extra]
    return list(map(str, argv))


@pytest.mark.parametrize(("n_forget", "n_holdout", "name"), [(1, 3, "--forget"), (3, 1, "--holdout")])
def test_a_one_row_set_cannot_bound_an_auc(tmp_path, capsys, no_model, n_forget, n_holdout, name):
    argv = audit_argv(tmp_path, n_forget, n_holdout, "--bootstrap", 100)
    capsys.readouterr()
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err == [
        f"ds-unlearn audit: error: {name}: 1 row, but the AUCs' bootstrap intervals (--bootstrap 100) resample "
        "each set within itself, and every resample of one row is that row (give 2 or more, or --bootstrap 0)"
    ]
    assert not (tmp_path / "out").exists()
    # The AUC alone (no interval), or two rows each, pass every check and reach the model.
    with pytest.raises(ModelLoaded):
        main(audit_argv(tmp_path, n_forget, n_holdout, "--bootstrap", 0))
    with pytest.raises(ModelLoaded):
        main(audit_argv(tmp_path, 2, 2, "--bootstrap", 100))
