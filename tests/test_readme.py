"""The README's Quickstart and CI stay in step."""

import re

from ds_unlearn.cli import SUBCOMMANDS

from .conftest import REPO


def quickstart_commands():
    text = (REPO / "README.md").read_text()
    section = text.split("## Quickstart", 1)[1]
    block = re.search(r"```(?:bash)?\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_quickstart_has_two_commands_the_main_job_then_the_tests():
    main_job, tests = quickstart_commands()
    assert main_job.startswith("python3.11 -m venv") and "pip install torch==2.13.0" in main_job
    assert main_job.endswith("ds-unlearn demo --output_dir out/demo")
    assert tests.startswith("python3.11 -m venv") and "pip install torch==2.13.0" in tests


def test_ci_runs_the_readme_test_command():
    test_command = quickstart_commands()[1].rsplit("&& ", 1)[1]
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert test_command in ci
    assert "pip install -q torch==2.13.0" in ci  # torch first, pinned


def test_every_command_is_documented():
    text = (REPO / "README.md").read_text()
    for name in SUBCOMMANDS:
        assert f"ds-unlearn {name}" in text


def test_every_command_help_names_itself_and_the_shared_flag(capsys):
    from ds_unlearn.cli import main

    for name in SUBCOMMANDS:
        assert main([name, "--help"]) == 0, name
        out = capsys.readouterr().out
        assert f"usage: ds-unlearn {name}" in out, out[:300]
        assert "--dist_timeout_s" in out, name
    main(["unlearn", "--help"])
    assert "--config" in capsys.readouterr().out  # YAML settings: the paper configs' way in
