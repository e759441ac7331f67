"""The digits demo's summary over seeds (scripts/digits_summary.py) on a fake runs folder."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("digits_summary", ROOT / "scripts" / "digits_summary.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _fake_run(root: Path, seed: int, name: str, steps: int, equal: int, fid_time: float, fid_steps: float):
    run = root / f"seed{seed}" / name
    (run / "checkpoints").mkdir(parents=True)
    n = 10 if name == "dit" else 7
    sd = {"model.w": torch.zeros(n), "ema.w": torch.zeros(n)}
    torch.save({"global_step": steps, "state_dict": sd}, run / "checkpoints" / "last.ckpt")
    torch.save({"global_step": equal, "state_dict": sd}, run / "checkpoints" / f"step={equal}.ckpt")
    (run / "train_wall_s.txt").write_text("720\n")
    ckpts = {"time": run / "checkpoints" / "last.ckpt", "steps": run / "checkpoints" / f"step={equal}.ckpt"}
    for key, fid in (("time", fid_time), ("steps", fid_steps)):
        (run / key / "samples").mkdir(parents=True)
        (run / key / "samples" / "protocol.json").write_text(json.dumps({"checkpoint": str(ckpts[key])}))
        report = {"fid": fid, "kid_mean": fid / 1000, "class_accuracy": 0.9, "precision": 0.5, "recall": 0.4}
        (run / key / "report.json").write_text(json.dumps(report))


def test_summary_medians_ranges_and_steps(tmp_path):
    mod = _load()
    root = tmp_path / "digits"
    _fake_run(root, 0, "gspn_dit", 900, 750, 50.0, 60.0)
    _fake_run(root, 0, "dit", 1800, 750, 40.0, 90.0)
    _fake_run(root, 1, "gspn_dit", 1000, 1000, 70.0, 80.0)
    _fake_run(root, 1, "dit", 2000, 1000, 44.0, 100.0)
    records = mod.collect(root)
    assert len(records) == 8
    rec = {(r["seed"], r["model"], r["comparison"]): r for r in records}
    assert rec[("0", "dit", "steps")]["step"] == 750 and rec[("0", "dit", "time")]["step"] == 1800
    assert rec[("1", "gspn_dit", "time")]["s_per_step"] == pytest.approx(0.72)
    assert rec[("0", "gspn_dit", "time")]["params"] == 7  # model.* only, not the EMA copy
    text = mod.table(records)
    lines = {tuple(c.strip() for c in line.strip("|").split("|")[:2]): line for line in text.splitlines()}
    # equal steps, GSPN-DiT: FIDs 60 and 80 -> median 70 [60-80]; DiT equal time: 40, 44 -> 42
    assert "70.0 [60.0-80.0]" in lines[("equal steps", "GSPN-DiT")]
    assert "42.0 [40.0-44.0]" in lines[("equal time", "DiT")]
    assert "875 [750-1000]" in lines[("equal steps", "DiT")]
    assert "90.0 [90.0-90.0]" in lines[("equal time", "GSPN-DiT")]  # class accuracy in %


def test_summary_cli_writes_files_and_refuses_empty(tmp_path):
    root = tmp_path / "digits"
    _fake_run(root, 0, "gspn_dit", 900, 750, 50.0, 60.0)
    out = tmp_path / "summary"
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "digits_summary.py"), str(root), "--out", str(out)],
        check=True, capture_output=True, text=True,
    )
    assert "GSPN-DiT" in out.with_suffix(".md").read_text()
    assert len(json.loads(out.with_suffix(".json").read_text())) == 2
    empty = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "digits_summary.py"), str(tmp_path / "none"), "--out", str(out)],
        capture_output=True, text=True,
    )
    assert empty.returncode != 0 and "no scored runs" in empty.stderr


def test_summary_of_variants_scored_from_another_run(tmp_path):
    """A variant folder holding only a scoring (its checkpoint lives in the demo's run) is read from
    the checkpoint its protocol names, labelled by its folder and shown untimed."""
    mod = _load()
    demo = tmp_path / "digits"
    _fake_run(demo, 0, "gspn_dit", 900, 250, 50.0, 60.0)
    variants = tmp_path / "variants"
    scored = variants / "seed0" / "release" / "steps"
    (scored / "samples").mkdir(parents=True)
    ckpt = demo / "seed0" / "gspn_dit" / "checkpoints" / "step=250.ckpt"
    (scored / "samples" / "protocol.json").write_text(json.dumps({"checkpoint": str(ckpt)}))
    (scored / "report.json").write_text(json.dumps({"fid": 12.5, "kid_mean": 0.01, "class_accuracy": 0.5}))
    _fake_run(variants, 0, "full_width", 250, 250, 20.0, 30.0)
    (rec_release,) = [r for r in mod.collect(variants) if r["model"] == "release"]
    assert rec_release["step"] == 250 and rec_release["s_per_step"] is None and rec_release["params"] == 7
    text = mod.table(mod.collect(variants))
    (row,) = [line for line in text.splitlines() if "| release |" in line]
    assert "| 250 | - | 12.5 |" in row
