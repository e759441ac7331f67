"""The kernel cache cannot crash a process: a compiled library is verified against the size and sha256
recorded at its build before it is loaded, and rebuilt with a warning when it does not match."""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from gspn_lightning.ops import _build


def _fake_build(monkeypatch, tmp_path):
    """_build._load with cpp_extension.load replaced by one that writes a small 'library' and
    torch.ops.load_library by one that records its argument: the cache logic without a compiler."""
    from torch.utils import cpp_extension

    calls = {"build": 0, "load": []}

    def fake_load(name, build_directory, **kw):
        calls["build"] += 1
        Path(build_directory, f"{name}.so").write_bytes(b"\x7fELF" + bytes(range(256)) * 64)
        calls["load"].append(str(Path(build_directory, f"{name}.so")))

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    monkeypatch.setattr(torch.ops, "load_library", lambda path: calls["load"].append(path))
    monkeypatch.setenv("GSPN_EXTENSIONS_DIR", str(tmp_path))
    return calls


def _library(tmp_path) -> Path:
    (lib,) = tmp_path.glob("gspn_lightning_cpu-*/gspn_lightning_cpu.so")
    return lib


def test_library_record_written_and_verified(monkeypatch, tmp_path, recwarn):
    calls = _fake_build(monkeypatch, tmp_path)
    _build._load("gspn_lightning_cpu", _build._CPU_SOURCES, cuda=False, verbose=False)
    lib = _library(tmp_path)
    assert calls["build"] == 1
    assert _build.library_record(lib).is_file() and _build.library_problem(lib) is None
    # a later process loads the verified library without building
    _build._load("gspn_lightning_cpu", _build._CPU_SOURCES, cuda=False, verbose=False)
    assert calls["build"] == 1 and calls["load"][-1] == str(lib)
    assert not [w for w in recwarn if "rebuilding" in str(w.message)]


@pytest.mark.parametrize("damage", ["truncate", "overwrite", "no-record", "bad-record"])
def test_damaged_library_is_rebuilt_with_a_warning(monkeypatch, tmp_path, damage):
    calls = _fake_build(monkeypatch, tmp_path)
    _build._load("gspn_lightning_cpu", _build._CPU_SOURCES, cuda=False, verbose=False)
    lib = _library(tmp_path)
    good = lib.read_bytes()
    if damage == "truncate":
        lib.write_bytes(good[: len(good) // 2])
        expect = "bytes but was built with"
    elif damage == "overwrite":  # same size, other content
        lib.write_bytes(bytes(reversed(good)))
        expect = "sha256"
    elif damage == "no-record":  # a cache written before the records existed
        _build.library_record(lib).unlink()
        expect = "no record"
    else:
        _build.library_record(lib).write_text("{not json")
        expect = "unreadable record"
    assert _build.library_problem(lib) is not None
    n_loads = len(calls["load"])
    with pytest.warns(RuntimeWarning, match=f"(?s){expect}.*rebuilding"):
        _build._load("gspn_lightning_cpu", _build._CPU_SOURCES, cuda=False, verbose=False)
    assert calls["build"] == 2
    # only the rebuilt library was loaded, never the damaged one
    assert len(calls["load"]) == n_loads + 1
    assert lib.read_bytes() == good and _build.library_problem(lib) is None


@pytest.mark.slow
@pytest.mark.build
def test_truncated_library_in_the_cache_is_rebuilt_not_loaded(tmp_path):
    """A real compiled library cut in half: loading it would kill the process with SIGBUS (status
    135, no message); the import rebuilds it with a warning and the kernel works."""
    cache = tmp_path / "cache"
    code = """
        import warnings
        warnings.simplefilter("always")
        import torch
        from gspn_lightning.ops import gspn_scan, scan_reference
        ins = [torch.randn(1, 2, 5, 4, dtype=torch.float64) for _ in range(5)]
        out = gspn_scan(*ins, direction="l2r", backend="kernel")
        torch.testing.assert_close(out, scan_reference(*ins, direction="l2r"))
        print("KERNEL-OK")
    """
    env = dict(os.environ, GSPN_EXTENSIONS_DIR=str(cache), GSPN_VERBOSE_BUILD="")

    def run(extra=None):
        return subprocess.run(
            [sys.executable, "-c", textwrap.dedent(code)], env={**env, **(extra or {})},
            capture_output=True, text=True, timeout=900,
        )  # fmt: skip

    # seed the cache with this machine's finished build when there is one (one compile, not two)
    shared = _build.cache_dir()
    seeded = sorted(shared.glob("gspn_lightning_cpu-*/DONE")) if shared != cache else []
    for done in seeded:
        cache.mkdir(exist_ok=True)
        target = cache / done.parent.name
        shutil.copytree(done.parent, target, dirs_exist_ok=True)
        lib = target / "gspn_lightning_cpu.so"
        if lib.is_file() and not _build.library_record(lib).exists():
            _build.record_library(lib)
    r = run({"CXX": str(tmp_path / "no-such-c++")}) if seeded else None
    if r is None or "KERNEL-OK" not in r.stdout:  # no usable build to seed from: build one
        shutil.rmtree(cache, ignore_errors=True)
        r = run()
    assert "KERNEL-OK" in r.stdout, r.stdout + r.stderr
    libs = sorted(cache.glob("gspn_lightning_cpu-*/gspn_lightning_cpu.so"))
    assert libs
    for lib in libs:  # (the seed may hold builds for other instruction sets: cut them all)
        with open(lib, "r+b") as f:
            f.truncate(lib.stat().st_size // 2)
    r = run()
    assert r.returncode == 0 and "KERNEL-OK" in r.stdout, (r.returncode, r.stdout + r.stderr)
    assert "rebuilding it" in r.stderr and "truncated" in r.stderr, r.stderr
    assert any(_build.library_problem(lib) is None for lib in libs)
    # the rebuilt library is recorded: a later process loads it without a compiler and without a warning
    r = run({"CXX": str(tmp_path / "no-such-c++")})
    assert "KERNEL-OK" in r.stdout and "rebuilding" not in r.stderr, r.stdout + r.stderr
