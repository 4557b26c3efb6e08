"""One parser for every command (commands/parsing.py): score and audit parse config dataclasses
from flags and --config YAML like unlearn and memorize; the audit's settings are declared once,
in AuditSettings; library errors name parameters and the CLI renders them as flags."""

from dataclasses import fields

import pytest

from ds_unlearn.cli import main
from ds_unlearn.commands.audit import AuditConfig
from ds_unlearn.commands.parsing import parse_config
from ds_unlearn.commands.score import ScoreConfig
from ds_unlearn.core.audit import AuditSettings, check_sets
from ds_unlearn.core.errors import InputError, flag, param

SCORE = ["--model", "m", "--data", "d.jsonl", "--out", "o.jsonl"]
AUDIT = ["--model", "m", "--forget", "f.jsonl", "--holdout", "h.jsonl", "--out", "o"]


def test_the_audit_config_takes_every_audit_setting_from_its_one_declaration():
    settings = {f.name: f for f in fields(AuditSettings)}
    config = {f.name: f for f in fields(AuditConfig) if f.init}
    assert set(settings) - set(config) == {"greedy"}  # the command audits greedily; not a flag
    for name, declared in settings.items():
        if name in ("greedy", "seed", "suffix_length"):
            continue
        assert config[name] is declared or config[name].metadata == declared.metadata, name
    built = parse_config(AuditConfig, AUDIT)
    defaults = AuditSettings()
    assert built.settings() == AuditSettings(**{**vars(defaults), "seed": 42})  # TrainingArguments' seed
    parsed = parse_config(AuditConfig, [*AUDIT, "--el_n", "5", "7", "--suffix_length", "rest", "--top_k", "3"])
    assert (parsed.el_n, parsed.suffix_length, parsed.top_k) == ((5, 7), None, 3)
    assert parsed.settings().el_n == (5, 7) and type(parsed.settings()) is AuditSettings


def test_help_shows_the_settings_help_and_one_spelling_per_flag(capsys):
    assert main(["audit", "--help"]) == 0
    out = capsys.readouterr().out
    assert "fraction of tokens Min-K% and Min-K%++ average" in out  # AuditSettings' own help text
    assert "--suffix_length" in out and "or 'rest'" in out and "--greedy" not in out
    assert out.index("--model MODEL") < out.index("--el_n")  # the command's own fields first
    assert main(["score", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--batch_size" in out and "--batch-size" not in out and "--config" in out


def test_yaml_settings_flags_override_them_and_special_words_work(tmp_path):
    path = tmp_path / "score.yaml"
    path.write_text("batch_size: auto\nel_n: [5, 6]\nmethod: reference\nmemorized_threshold: 0.7\n")
    config = parse_config(ScoreConfig, [*SCORE, "--config", str(path), "--el_n", "4"])
    assert (config.batch_size, config.el_n, config.method, config.memorized_threshold) == (
        "auto",
        [4],
        "reference",
        0.7,
    )
    path.write_text("batch_size: 8\n")
    assert parse_config(ScoreConfig, [*SCORE, "--config", str(path)]).batch_size == 8
    path = tmp_path / "audit.yaml"
    path.write_text("suffix_length: rest\nseed: 7\nextract_k: [8]\n")
    config = parse_config(AuditConfig, [*AUDIT, "--config", str(path)])
    assert (config.suffix_length, config.seed, config.extract_k) == (None, 7, (8,))
    path.write_text("suffix_length: 12\n")
    assert parse_config(AuditConfig, [*AUDIT, "--config", str(path)]).suffix_length == 12
    # The launcher's --local_rank is not a setting of either command.
    assert parse_config(ScoreConfig, [*SCORE, "--local_rank=1"]).model == "m"
    assert parse_config(AuditConfig, ["--local_rank", "0", *AUDIT]).model == "m"


@pytest.mark.parametrize(
    "command, yaml, message",
    [
        ("score", "dtype: float8\n", "key 'dtype': invalid choice 'float8' (choose from bfloat16, float16, float32"),
        ("score", "batch_size: 0\n", "argument --batch_size: expected a positive integer or 'auto', got '0'"),
        ("score", "el_n: 10\n", "key 'el_n': expected a list of integers, got 10"),
        ("score", "bach_size: 4\n", "unknown key 'bach_size'"),
        ("audit", "suffix_length: all\n", "argument --suffix_length: invalid suffix_length value: 'all'"),
        ("audit", "seed: -1\n", "argument --seed: must lie in [0, 4294967295], got -1"),
        ("audit", "top_p: 1.5\n", "--top_p: must lie in (0, 1]"),
        ("audit", "zero3_gather: once\n", "unknown key 'zero3_gather'"),
    ],
)
def test_a_bad_yaml_value_is_one_line_exit_2(command, yaml, message, tmp_path, capsys):
    path = tmp_path / f"{command}.yaml"
    path.write_text(yaml)
    argv = [command, *(SCORE if command == "score" else AUDIT), "--out", str(tmp_path / "out"), "--config", str(path)]
    assert main(argv) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_library_errors_name_the_parameter_and_the_cli_renders_its_flag():
    with pytest.raises(InputError) as caught:
        check_sets([[1, 2, 3, 4]], [[5, 6, 7, 8], [1, 2, 3, 4]], min_tokens=2)
    err = caught.value
    assert str(err) == "holdout row 1: same text as forget row 0 (a sequence cannot be both forgotten and never seen)"
    assert err.field == "holdout"
    assert err.render(flag).startswith("--holdout row 1: same text as --forget row 0 ")
    with pytest.raises(InputError) as caught:
        AuditSettings(temperature=0.0).validate()
    assert caught.value.field == "temperature" and str(caught.value).startswith("temperature: must be")
    plain = InputError(f"see {param('max_length')}")
    assert plain.field is None and str(plain) == "see max_length" and plain.render(flag) == "see --max_length"


class _Writes:
    """A stderr that records each write call."""

    def __init__(self):
        self.calls: list[str] = []

    def write(self, text: str) -> int:
        self.calls.append(text)
        return len(text)

    def flush(self) -> None:
        pass


@pytest.mark.parametrize("rank, prefix", [("0", ""), ("1", "[rank 1] ")])
def test_an_error_line_is_one_write_with_its_newline(rank, prefix, monkeypatch):
    """Ranks share the launcher's stderr: a line written in two parts (text, then newline) can run
    into another rank's line, so each error line, prefix and newline included, is one write."""
    from ds_unlearn.commands import process

    monkeypatch.setenv("LOCAL_RANK", rank)
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", "2")
    stderr = _Writes()
    monkeypatch.setattr("sys.stderr", stderr)
    process.report_error("ds-unlearn unlearn: error: output_dir: in use")
    assert stderr.calls == [f"{prefix}ds-unlearn unlearn: error: output_dir: in use\n"]
