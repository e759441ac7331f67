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
