"""scripts/apply_patch.py, the fallback that scripts/gpu_pending.sh uses where neither git nor patch is
installed: it must write what ``git apply`` writes, and refuse (writing nothing) what does not fit."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("apply_patch", ROOT / "scripts" / "apply_patch.py")
apply_patch = importlib.util.module_from_spec(spec)
spec.loader.exec_module(apply_patch)


def _tree(tmp_path: Path, name: str, files: list[str]) -> Path:
    d = tmp_path / name
    for f in files:
        (d / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / f, d / f)
    return d


def _touched(patch: str) -> list[str]:
    return sorted({line[6:].strip() for line in patch.splitlines() if line.startswith("+++ b/")})


@pytest.mark.skipif(shutil.which("git") is None, reason="compares with git apply")
@pytest.mark.parametrize("name", ["cuda-scan-in-place-tiles", "cuda-propagate-stage-per-direction"])
def test_pending_patches_as_git_applies_them(tmp_path, name):
    patch = (ROOT / "docs" / "pending" / f"{name}.patch").read_text()
    files = _touched(patch)
    ours, gits = _tree(tmp_path, "ours", files), _tree(tmp_path, "git", files)
    assert sorted(apply_patch.apply(ours, patch)) == sorted(ours / f for f in files)
    subprocess.run(["git", "apply", str(ROOT / "docs" / "pending" / f"{name}.patch")], cwd=gits, check=True)
    for f in files:
        assert (ours / f).read_bytes() == (gits / f).read_bytes(), f
        assert (ours / f).read_bytes() != (ROOT / f).read_bytes(), f


def test_new_deleted_and_unterminated_files(tmp_path):
    (tmp_path / "keep.txt").write_text("one\ntwo\nthree")  # no newline at the end
    (tmp_path / "gone.txt").write_text("bye\n")
    patch = (
        "diff --git a/keep.txt b/keep.txt\n--- a/keep.txt\n+++ b/keep.txt\n"
        "@@ -1,3 +1,4 @@\n one\n+one and a half\n two\n-three\n\\ No newline at end of file\n+three\n"
        "diff --git a/new/file.txt b/new/file.txt\nnew file mode 100644\n--- /dev/null\n+++ b/new/file.txt\n"
        "@@ -0,0 +1,2 @@\n+--- not a header\n+hello\n"
        "diff --git a/gone.txt b/gone.txt\ndeleted file mode 100644\n--- a/gone.txt\n+++ /dev/null\n"
        "@@ -1 +0,0 @@\n-bye\n"
    )
    apply_patch.apply(tmp_path, patch)
    assert (tmp_path / "keep.txt").read_text() == "one\none and a half\ntwo\nthree\n"
    assert (tmp_path / "new" / "file.txt").read_text() == "--- not a header\nhello\n"
    assert not (tmp_path / "gone.txt").exists()


def test_a_stale_patch_writes_nothing(tmp_path):
    (tmp_path / "a.txt").write_text("1\n2\n3\n")
    (tmp_path / "b.txt").write_text("x\ny\n")
    patch = (
        "--- a/a.txt\n+++ b/a.txt\n@@ -1,2 +1,2 @@\n 1\n-2\n+two\n"
        "--- a/b.txt\n+++ b/b.txt\n@@ -1,2 +1,2 @@\n x\n-z\n+zed\n"
    )
    with pytest.raises(apply_patch.PatchError, match=r"b.txt: hunk at line 1 does not match"):
        apply_patch.apply(tmp_path, patch)
    assert (tmp_path / "a.txt").read_text() == "1\n2\n3\n"  # checked before anything was written
    assert apply_patch.main([str(tmp_path), str(tmp_path / "missing.patch")]) == 1
    with pytest.raises(apply_patch.PatchError, match="ends inside a hunk"):
        apply_patch.parse("--- a/a.txt\n+++ b/a.txt\n@@ -1,2 +1,2 @@\n 1\n")
