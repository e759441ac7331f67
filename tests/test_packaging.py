"""The wheel carries every subpackage and the kernel sources, and an installed (non-editable) copy
finds its kernel sources without the checkout."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_ships_packages_and_kernel_sources(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q", "-w",
         str(tmp_path / "dist")],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("gspn_lightning-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for init in (ROOT / "gspn_lightning").rglob("__init__.py"):
        rel = init.relative_to(ROOT).as_posix()
        assert rel in names, f"{rel} missing from the wheel: add its package to pyproject.toml"
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    scripts = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "[console_scripts]" in scripts and "gspn = gspn_lightning.cli:main" in scripts, scripts
    sources = [p.relative_to(ROOT / "csrc").as_posix() for p in (ROOT / "csrc").rglob("*") if p.is_file()]
    assert sources
    for rel in sources:
        assert f"gspn_lightning/csrc/{rel}" in names, f"kernel source {rel} missing from the wheel"
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = "from gspn_lightning.ops import _build; print(_build.CSRC)"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=site, env={**env, "PYTHONPATH": str(site)}, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert Path(r.stdout.strip()) == site / "gspn_lightning" / "csrc"


_SAMPLE_TESTS = """
import pytest

def test_quick():
    pass

@pytest.mark.slow
def test_end_to_end():
    pass
"""


def _collected(out: str) -> set[str]:
    return {line.split("::")[1] for line in out.splitlines() if "::" in line}


def test_default_run_leaves_slow_tests_out_and_the_test_script_runs_them(tmp_path):
    """A plain ``pytest`` (the repository's pyproject.toml) deselects the tests marked slow; the real
    ``scripts/test.sh`` (CI's command) selects them too, and an -m given to it still wins."""
    (tmp_path / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_sample.py").write_text(_SAMPLE_TESTS)
    # test.sh with its set-up and linter stubbed out (they would reinstall the environment)
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "test.sh").write_text((ROOT / "scripts" / "test.sh").read_text())
    (tmp_path / "scripts" / "setup.sh").write_text("true\n")
    venv_bin = tmp_path / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "ruff").write_text("#!/bin/sh\ntrue\n")
    (venv_bin / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    for f in venv_bin.iterdir():
        f.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "GSPN_TEST"))}

    def run(*cmd):
        r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        return _collected(r.stdout)

    collect = ("--collect-only", "-p", "no:cacheprovider")  # test.sh adds -q: one test id a line
    assert run(sys.executable, "-m", "pytest", "-q", *collect) == {"test_quick"}
    assert run("bash", "scripts/test.sh", *collect) == {"test_quick", "test_end_to_end"}
    assert run("bash", "scripts/test.sh", *collect, "-m", "slow") == {"test_end_to_end"}
