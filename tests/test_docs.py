"""The user documentation stays what it promises: a short README with the two set-up commands and no
logbook, links that resolve, commands that exist, code that imports, and one result file per
benchmark and machine."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

from gspn_lightning.cli import COMMANDS, LIGHTNING_COMMANDS

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, ROOT / "data" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RESULTS = ROOT / "benchmarks" / "results"

# The `gspn` subcommands the documentation may name.
SUBCOMMANDS = set(LIGHTNING_COMMANDS) | set(COMMANDS)  # the door's own list: a renamed tool fails here


def _code_blocks(text: str, lang: str | None = None) -> list[str]:
    blocks = re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.M | re.S)
    return [body for tag, body in blocks if lang is None or tag == lang]


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation other than '-' and '_' dropped, spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S)
    return {_slug(h) for h in re.findall(r"^#+ (.+)$", text, flags=re.M)}


def test_readme_is_a_short_guide_with_the_two_setup_commands_and_no_logbook():
    text = README.read_text()
    assert len(text.splitlines()) <= 150
    first_block = _code_blocks(text)[0]
    assert "bash scripts/demo.sh" in first_block and "bash scripts/test.sh" in first_block
    assert not re.findall(r"\b(?:19|20)\d\d-\d\d-\d\d\b", text), "dates belong in result files"
    hashes = [w for w in re.findall(r"\b[0-9a-f]{7,40}\b", text) if re.search(r"\d", w) and re.search(r"[a-f]", w)]
    assert not hashes, f"commit hashes in README.md: {hashes}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_and_their_anchors_resolve(page):
    text = page.read_text()
    assert "DESIGN.md" not in text, "users do not have the steering folder's design card"
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        assert resolved.exists(), f"{page.name}: link to a missing {target}"
        if anchor:
            assert anchor in _anchors(resolved), f"{page.name}: no heading for #{anchor} in {path or page.name}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_named_result_files_and_configs_exist(page):
    text = page.read_text()
    for name in re.findall(r"`((?:configs|benchmarks|scripts)/[\w./-]+?)`", text):
        if "*" in name or "{" in name or name.endswith("/gpu_check/"):
            continue  # patterns, and the GPU check's default output folder
        assert (ROOT / name).exists(), f"{page.name} names a missing {name}"
    for name in re.findall(r"[\w-]+_2core-[\w-]+\.(?:md|json)", text):
        assert (RESULTS / name).exists(), f"{page.name} quotes a missing result file {name}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_commands_are_gspn_subcommands(page):
    for block in _code_blocks(page.read_text()):
        for line in block.splitlines():
            for sub in re.findall(r"(?:^|[\s\"])gspn\"?\s+([a-z][\w-]*)", line):
                assert sub in SUBCOMMANDS, f"{page.name}: `gspn {sub}` is not a subcommand: {line!r}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_python_imports_in_the_docs_resolve(page):
    for block in _code_blocks(page.read_text(), "python"):
        for module, names in re.findall(r"^from (gspn_lightning[\w.]*) import \(?([^)\n]+)", block, flags=re.M):
            mod = importlib.import_module(module)
            for name in (n.strip() for n in names.split(",")):
                if name:
                    assert hasattr(mod, name), f"{page.name}: {module} has no {name}"


def test_one_result_file_per_benchmark_and_machine():
    """A benchmark run beside an existing result writes `<name>-2.*`; the repository keeps only the current
    one (older runs live in git history), and each result has its table and its data."""
    stems = {}
    for path in RESULTS.iterdir():
        if path.is_dir():
            assert any(path.glob("*.md")), f"{path.name}: a result folder without its report"
            continue
        assert not re.search(r"-\d+$", path.stem), f"{path.name}: a second run of one benchmark and machine"
        stems.setdefault(path.stem, set()).add(path.suffix)
    for stem, suffixes in stems.items():
        assert suffixes == {".json", ".md"}, f"{stem}: expected its .json and .md, found {sorted(suffixes)}"
