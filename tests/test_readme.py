"""The README's Quickstart and CI stay in step, and every command the README and docs/ show runs
what exists: a real subcommand or script, flags its parser accepts, repository files that are there."""

import functools
import re

import pytest

from ds_unlearn.cli import SUBCOMMANDS

from .conftest import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "CONTRIBUTING.md"]
# Top-level folders of this repository: a command token starting with one names a file to check.
REPO_DIRS = ("bench/", "configs/", "docs/", "launch/", "tests/")
# `deepspeed launch/X.py` runs command X.
LAUNCHED = {f"launch/{name}.py": name for name in ("score", "unlearn", "audit", "memorize")}


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


# --- the commands shown on every page -------------------------------------------------------------


def shell_blocks(text: str) -> list[str]:
    """Command lines of a page's ```bash blocks: continuations joined, comments dropped."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.split(r"\s#\s", " " + line, maxsplit=1)[0].strip()
            if line:
                lines.append(line)
    return lines


def code_spans(text: str) -> list[str]:
    """Inline `code` outside the fenced blocks, a span wrapped over lines joined into one."""
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    return [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", prose)]


def inline_commands(text: str) -> list[str]:
    """`ds-unlearn ...`, `deepspeed ...` and `python bench/...` written inline in the prose."""
    return [s for s in code_spans(text) if re.match(r"(ds-unlearn \w+(\s|$)|deepspeed |python (bench|docs)/)", s)]


def page_commands():
    for page in PAGES:
        text = page.read_text()
        for line in shell_blocks(text) + inline_commands(text):
            for command in line.split("&&"):
                yield page.relative_to(REPO).as_posix(), command.strip()


@functools.cache
def command_flags(name: str) -> frozenset[str]:
    """The flags `ds-unlearn NAME --help` lists (its options, not flags quoted in its prose)."""
    import contextlib
    import io

    from ds_unlearn.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main([name, "--help"]) == 0
    flags = set()
    for line in out.getvalue().splitlines():
        if line.lstrip().startswith("-") or line.startswith("usage:"):
            flags.update(re.findall(r"--\w[\w+-]*", re.split(r"\s{2,}", line.strip())[0]))
    return frozenset(flags)


def script_flags(path) -> set[str]:
    return set(re.findall(r"""["'](--\w[\w+-]*)["']""", path.read_text()))


def words(command: str) -> list[str]:
    """Tokens with the docs' optional-argument brackets taken off (`[--el_n 10 5]`)."""
    return [w.strip("[]") for w in command.split() if w.strip("[]")]


def problems(command: str) -> list[str]:
    """What in one documented command does not exist: its subcommand or script, a flag, a file."""
    tokens = words(command)
    found = []
    for token in tokens:
        path = token.split("=", 1)[-1]
        if path.startswith(REPO_DIRS) and not re.search(r"[{}<>*]|\.\.\.", path):
            if not (REPO / path).exists():
                found.append(f"no file {path}")
    flags, known = [], None
    if tokens[0] == "ds-unlearn":
        if tokens[1].isupper():  # `ds-unlearn COMMAND --help`
            return found
        if tokens[1] not in SUBCOMMANDS:
            return found + [f"no command ds-unlearn {tokens[1]}"]
        flags, known = tokens[2:], command_flags(tokens[1])
    elif tokens[0] == "deepspeed":
        script = next((t for t in tokens if t.endswith(".py")), None)
        if script in LAUNCHED:
            flags, known = tokens[tokens.index(script) + 1 :], command_flags(LAUNCHED[script])
    elif tokens[0] == "python" and tokens[1].endswith(".py"):
        flags, known = tokens[2:], script_flags(REPO / tokens[1]) | {"--help"}
    if known is not None:
        found += [f"{f} is not a flag of it" for f in flags if f.startswith("--") and f.split("=")[0] not in known]
    return found


def test_every_documented_command_exists_with_its_flags_and_files():
    """A renamed flag, a moved config or a dropped script breaks the page that shows it."""
    checked = {page: 0 for page in (p.relative_to(REPO).as_posix() for p in PAGES)}
    broken = []
    for page, command in page_commands():
        checked[page] += command.startswith(("ds-unlearn", "deepspeed", "python"))
        broken += [f"{page}: {command[:90]}: {p}" for p in problems(command)]
    assert not broken, "\n".join(broken)
    assert checked["README.md"] >= 3 and checked["docs/scoring.md"] and checked["docs/unlearning.md"], checked


def test_every_command_has_a_docs_page_showing_it():
    shown = {command.split()[1] for _, command in page_commands() if command.startswith("ds-unlearn ")}
    assert set(SUBCOMMANDS) <= shown


# The deepspeed launcher's own flags the docs use (before the script, not ours to check).
LAUNCHER_FLAGS = {"--num_gpus", "--num_accelerators", "--hostfile", "--no_ssh", "--node_rank", "--master_addr"}
LAUNCHER_FLAGS |= {"--master_port", "--num_nodes"}


def test_every_flag_named_in_the_prose_exists():
    """`--band_on ma,loss` in a sentence names a flag of some command, a script or the launcher."""
    known = set().union(*(command_flags(name) for name in SUBCOMMANDS), LAUNCHER_FLAGS, {"--dist_timeout_s"})
    for script in [*(REPO / "bench").glob("*.py"), REPO / "docs" / "generate.py"]:
        known |= script_flags(script)
    unknown = []
    for page in PAGES:
        for span in code_spans(page.read_text()):
            if not re.match(r"\[?--|ds-unlearn |deepspeed |python ", span):  # `tensorboard --logdir DIR`
                continue
            named = re.findall(r"(?:^|\s|\[)(--\w[\w+-]*)", span)
            unknown += [f"{page.name}: {flag} in `{span}`" for flag in named if flag not in known]
    assert not unknown, "\n".join(unknown)


@pytest.mark.parametrize(
    "command, problem",
    [
        ("ds-unlearn scrub --model DIR", "no command ds-unlearn scrub"),
        ("ds-unlearn score --model DIR [--el-n 10]", "--el-n is not a flag of it"),
        ("deepspeed --num_gpus 8 launch/unlearn.py --config configs/paper/nope.yaml", "no file configs/paper/nope"),
        ("python bench/score_speed.py --skip_everything", "--skip_everything is not a flag of it"),
    ],
)
def test_the_command_check_sees_what_is_wrong(command, problem):
    assert any(p.startswith(problem) for p in problems(command)), problems(command)
