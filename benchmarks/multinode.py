"""The multi-node launch lines of docs/multinode.md, read from the page itself: the one copy that the
users' recipe, ``benchmarks/kill_resume.py`` and ``tests/test_multinode.py`` share.

A recipe is the fenced code block after a ``<!-- recipe: NAME -->`` line of the page. The torchrun
line's ``$NAME`` placeholders are filled from a dict (a missing one is an error, never an empty string).
"""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "multinode.md"


def recipe(name: str, doc: Path = DOC) -> str:
    """The text of the fenced block that follows ``<!-- recipe: name -->`` in ``doc``."""
    text = doc.read_text()
    m = re.search(rf"<!-- recipe: {re.escape(name)} -->\s*```[a-z]*\n(.*?)\n```", text, re.S)
    if m is None:
        raise ValueError(f"{doc} has no recipe {name!r}")
    return m.group(1) + "\n"


def placeholders(command: str) -> set[str]:
    """The ``$NAME`` placeholders of a recipe line."""
    return set(re.findall(r"\$([A-Z_][A-Z0-9_]*)", command))


def torchrun_command(values: dict[str, object], python: str | None = None) -> list[str]:
    """The docs' torchrun line as an argument list, its placeholders filled from ``values``; with
    ``python``, ``torchrun`` becomes ``python -m torch.distributed.run`` (the same program)."""
    line = recipe("torchrun").replace("\\\n", " ")
    missing = placeholders(line) - set(values)
    if missing:
        raise KeyError(f"the torchrun recipe needs {sorted(missing)}")
    line = re.sub(r"\$([A-Z_][A-Z0-9_]*)", lambda m: shlex.quote(str(values[m.group(1)])), line)
    args = shlex.split(line)
    assert args[0] == "torchrun", args
    return ([python, "-m", "torch.distributed.run"] if python else ["torchrun"]) + args[1:]


if __name__ == "__main__":  # print the filled-in line: python benchmarks/multinode.py NNODES=2 ...
    values = dict(arg.split("=", 1) for arg in sys.argv[1:])
    print(shlex.join(torchrun_command(values)))
