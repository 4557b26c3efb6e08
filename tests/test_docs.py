"""docs/ stays true to the code: the configuration tables are the dataclasses' own field metadata,
every page is reachable from the README, every link lands, and no page keeps a count by hand."""

import dataclasses
import importlib.util
import re

import yaml

from .conftest import REPO

DOCS = REPO / "docs"
PAGES = [REPO / "README.md", REPO / "CONTRIBUTING.md", REPO / "CHANGELOG.md", *sorted(DOCS.glob("*.md"))]


def generator():
    spec = importlib.util.spec_from_file_location("docs_generate", DOCS / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_configuration_page_is_generated_from_the_field_metadata():
    page = (DOCS / "configuration.md").read_text()
    assert generator().render(page) == page, "docs/configuration.md is out of date: run python docs/generate.py"


def test_every_own_field_of_each_config_has_a_row_and_help():
    gen = generator()
    page = (DOCS / "configuration.md").read_text()
    for name, target in gen.TABLES.items():
        section = page.split(f"<!-- fields:{name}:start -->")[1].split(f"<!-- fields:{name}:end -->")[0]
        fields = gen.own_fields(gen.load(target))
        assert len(fields) > 10, target
        for f in fields:
            assert f"| `{f.name}` |" in section, (target, f.name)
            assert f.metadata.get("help"), f"{target}.{f.name} has no help text"


def test_fields_with_a_group_get_one_table_per_group():
    @dataclasses.dataclass
    class Grouped:
        a: int = dataclasses.field(default=1, metadata={"help": "first", "group": "Data"})
        b: str = dataclasses.field(default="x", metadata={"help": "second | piped", "group": "Method"})
        c: float = dataclasses.field(default=0.5, metadata={"help": "third", "group": "Data"})
        d: list = dataclasses.field(default_factory=list, metadata={"help": "no group"})

    Grouped.__module__ = "ds_unlearn.fake"
    gen = generator()
    gen.load = lambda target: Grouped
    text = gen.section("ds_unlearn.fake:Grouped")
    headings = re.findall(r"^#### (.+)$", text, re.M)
    assert headings == ["Data", "Method", gen.UNGROUPED]
    data = text.split("#### Data")[1].split("#### Method")[0]
    assert "| `a` | `int` | `1` | first |" in data and "| `c` |" in data
    assert "second \\| piped" in text and "| `d` | `list` | `[]` |" in text


def test_every_docs_page_is_linked_from_the_readme():
    readme = (REPO / "README.md").read_text()
    for page in DOCS.glob("*.md"):
        assert f"(docs/{page.name})" in readme, page.name


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lowercase, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {slug(h) for h in re.findall(r"^#{1,6} (.+)$", text, re.M)}


def test_every_relative_link_lands_on_a_file_and_heading():
    broken = []
    for page in PAGES:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):  # http(s):, mailto:
                continue
            file, _, anchor = target.partition("#")
            path = (page.parent / file).resolve() if file else page
            if not path.exists():
                broken.append(f"{page.name}: {target}: no such file")
            elif anchor and path.suffix == ".md" and anchor not in anchors(path):
                broken.append(f"{page.name}: {target}: no such heading")
    assert not broken, "\n".join(broken)


def test_no_page_keeps_a_test_count():
    """A count kept by hand goes stale with the next test (it took commits of its own)."""
    for page in PAGES:
        counts = re.findall(r"\b\d[\d,]*\s+(?:tests|test cases|passing)\b", page.read_text())
        assert not counts, (page.name, counts)


def test_readme_is_a_front_page():
    assert len((REPO / "README.md").read_text().splitlines()) <= 200


def test_pre_commit_runs_the_ci_checks_with_the_pinned_ruff():
    config = yaml.safe_load((REPO / ".pre-commit-config.yaml").read_text())
    hooks = {hook["id"]: (repo, hook) for repo in config["repos"] for hook in repo["hooks"]}
    assert {"ruff", "ruff-format", "lint-imports"} <= set(hooks)
    ruff_pin = re.search(r'"ruff==([^"]+)"', (REPO / "pyproject.toml").read_text()).group(1)
    assert hooks["ruff"][0]["rev"] == f"v{ruff_pin}"
    lint_imports = hooks["lint-imports"][1]
    assert lint_imports["language"] == "system" and lint_imports["pass_filenames"] is False


def test_license_is_the_one_pyproject_names():
    assert re.search(r'^license = (\{ ?text = )?"Apache-2.0"', (REPO / "pyproject.toml").read_text(), re.M)
    text = (REPO / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text
