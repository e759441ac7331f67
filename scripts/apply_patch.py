"""Apply a unified diff (as ``git diff`` writes one) to a folder, exactly: each hunk's context and removed
lines must all match, where its header says or at the nearest offset (as ``git apply`` does, without
fuzz), or nothing is written.  For machines without git or patch (the lent GPU
machine's image is not guaranteed to have either); ``scripts/gpu_pending.sh`` falls back to it.

    python scripts/apply_patch.py DIR PATCH

Handles modified, new (``--- /dev/null``) and deleted (``+++ /dev/null``) text files and
``\\ No newline at end of file``; no renames, modes or binary diffs (it refuses them).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

HUNK = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")


class PatchError(RuntimeError):
    pass


def _lines(text: str) -> list[str]:
    """Lines with their ends, split at "\\n" only (as git does: a form feed or a lone "\\r" is text)."""
    parts = text.split("\n")
    return [p + "\n" for p in parts[:-1]] + ([parts[-1]] if parts[-1] else [])


def _strip(path: str) -> str | None:
    path = path.split("\t")[0].strip()
    if path == "/dev/null":
        return None
    return path[2:] if path[:2] in ("a/", "b/") else path


def parse(text: str) -> list[dict]:
    """The patch's files: old and new path, and hunks of (old start, [(tag, line), ...])."""
    files, cur, hunk = [], None, None
    left = [0, 0]  # old and new lines the current hunk still has to come
    lines = _lines(text)
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if hunk is not None and line.startswith("\\"):  # no newline at the end of the previous line
            tag, prev = hunk[1][-1]
            hunk[1][-1] = (tag, prev.rstrip("\n"))
            continue
        if hunk is not None and left != [0, 0]:
            tag = line[:1]
            if tag not in (" ", "-", "+"):
                raise PatchError(f"hunk of {cur['old']} ends early at patch line {i}: {line.rstrip()!r}")
            hunk[1].append((tag, line[1:]))
            left[0] -= tag != "+"
            left[1] -= tag != "-"
            if min(left) < 0:
                raise PatchError(f"hunk of {cur['old']} is longer than its header says (patch line {i})")
            continue
        if line.startswith(
            ("rename from", "rename to", "Binary files", "GIT binary patch", "old mode", "new mode")
        ):
            raise PatchError(f"unsupported patch line: {line.strip()}")
        if line.startswith("--- ") and i < len(lines) and lines[i].startswith("+++ "):
            cur = {"old": _strip(line[4:]), "new": _strip(lines[i][4:]), "hunks": []}
            files.append(cur)
            hunk = None
            i += 1
            continue
        m = HUNK.match(line)
        if m and cur is not None:
            hunk = (int(m.group(1)), [])
            left = [int(m.group(2) or 1), int(m.group(4) or 1)]
            cur["hunks"].append(hunk)
    if hunk is not None and left != [0, 0]:
        raise PatchError(f"the patch ends inside a hunk of {cur['old']}")
    return files


def _locate(old: list[str], want: list[str], at: int, lo: int, name: str) -> int:
    """Where the hunk's old lines ``want`` stand in ``old``: at line ``at`` as its header says, else the
    nearest place at or after ``lo`` where they all match (the file moved on since the patch was made;
    as git apply, an offset but no fuzz)."""
    hi = len(old) - len(want)
    for d in range(max(at - lo, hi - at, 0) + 1):
        for p in (at - d, at + d) if d else (at,):
            if lo <= p <= hi and old[p : p + len(want)] == want:
                return p
    first = want[0].rstrip("\n") if want else ""
    raise PatchError(f"{name}: hunk at line {at + 1} does not match (it starts {first!r})")


def apply(root: Path, text: str) -> list[Path]:
    """Apply the patch under ``root``; all files are checked before any is written."""
    out: dict[Path, str | None] = {}
    for f in parse(text):
        src = root / f["old"] if f["old"] else None
        if src is not None and not src.exists():
            raise PatchError(f"{f['old']}: no such file")
        old = _lines(src.read_bytes().decode("utf-8")) if src is not None else []
        new: list[str] = []
        pos = 0
        for start, body in f["hunks"]:
            want = [line for tag, line in body if tag != "+"]
            at = max(start - 1, 0) if want else start
            at = _locate(old, want, at, pos, f["old"])
            new += old[pos:at]
            pos = at
            for tag, line in body:
                if tag != "-":
                    new.append(line)
                if tag != "+":
                    pos += 1
        new += old[pos:]
        if f["new"] is None:
            out[src] = None
        else:
            out[root / f["new"]] = "".join(new)
    for path, content in out.items():
        if content is None:
            path.unlink()
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content.encode("utf-8"))
    return list(out)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        changed = apply(Path(argv[0]), Path(argv[1]).read_bytes().decode("utf-8"))
    except (PatchError, OSError) as exc:
        print(f"apply_patch: {exc}", file=sys.stderr)
        return 1
    print(f"apply_patch: {len(changed)} files")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
