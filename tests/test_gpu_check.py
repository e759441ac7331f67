"""The prepared GPU check (scripts/gpu_check.sh): its CPU rehearsal runs end to end (the default
sections, issue 24's check, as on the GPU machine without webdataset, diffusers, jsonargparse,
omegaconf; the older sections when named), its report says what failed or was cut short and judges
issue 24's acceptance rows, and the package imports on the GPU machine, which lacks webdataset,
diffusers, jsonargparse, omegaconf and torch-fidelity."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest

from benchmarks.common import log_slope
from benchmarks.gpu_check import DEFAULT_SECTIONS, OTHER_SECTIONS, sdxl
from benchmarks.gpu_check.compare import compare
from benchmarks.gpu_check.harness import Record
from benchmarks.gpu_check.report import acceptance, parse_junit, report

ROOT = Path(__file__).resolve().parents[1]

# torch-fidelity is missing there too, but torchmetrics probes it by its installed metadata and then
# imports it, so hiding the module alone cannot imitate its absence; the package must not import it
# either (metrics/ is imported only by the tasks that compute FID).
MISSING_ON_GPU_MACHINE = ("webdataset", "diffusers", "jsonargparse", "omegaconf", "braceexpand")

# Python code that makes those packages look uninstalled: find_spec and import both fail.
HIDE = f"""
import sys

class Hide:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {MISSING_ON_GPU_MACHINE!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)

sys.meta_path.insert(0, Hide())
"""


def test_package_imports_without_the_packages_the_gpu_machine_lacks():
    code = HIDE + textwrap.dedent("""
        import gspn_lightning, gspn_lightning.ops, gspn_lightning.nn, gspn_lightning.models
        import gspn_lightning.tasks, gspn_lightning.data
        from gspn_lightning.models import create_model
        m = create_model("gspn_t", num_classes=3, embed_dim=8, depths=(1, 1, 1, 1))
        import torch
        assert m(torch.randn(1, 3, 32, 32)).shape == (1, 3)
        print("IMPORT-OK")
    """)
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert "IMPORT-OK" in r.stdout, r.stdout + r.stderr


def test_hiding_packages_works(tmp_path):
    """The stand-in for the GPU machine's missing packages, as the default rehearsal below installs it
    (a ``sitecustomize`` on PYTHONPATH), does hide them in a fresh interpreter (else that rehearsal
    would prove nothing)."""
    (tmp_path / "sitecustomize.py").write_text(HIDE)
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    for name in MISSING_ON_GPU_MACHINE[:4]:
        r = subprocess.run([sys.executable, "-c", f"import {name}"], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=120)  # fmt: skip
        assert r.returncode != 0 and f"No module named '{name}'" in r.stderr, (name, r.stderr[-2000:])


def test_a_section_runs_from_a_plain_checkout(tmp_path):
    """As scripts/gpu_check.sh runs a section on the GPU machine: ``python -m benchmarks.gpu_check`` from
    the repository root, nothing on PYTHONPATH; the section's record is written and says it ran."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", "env", "--out", str(tmp_path), "--budget", "20", "--rehearsal"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert "[env] ok" in r.stdout
    data = json.loads((tmp_path / "env.json").read_text())
    assert data["status"] == "ok" and data["rehearsal"] is True and data["info"]["torch"]


def test_report_marks_killed_and_missing_sections(tmp_path):
    (tmp_path / "env.json").write_text(json.dumps({"section": "env", "status": "ok", "info": {"torch": "x"}}))
    (tmp_path / "scan.json").write_text(
        json.dumps({"section": "scan", "status": "running", "results": [], "errors": []})
    )
    (tmp_path / "sections.tsv").write_text("env\t0\t1.0\nscan\t124\t70.0\n")
    log = tmp_path / "tests.log"
    log.write_text("....F.s.       [ 80%]\n..\nFAILED tests/test_ops.py::test_a[cuda-t2b] - boom\n")
    tests = parse_junit(tmp_path / "tests.xml", log)
    assert not tests["finished"]
    assert "8 passed, 1 failed, 1 skipped" in tests["summary"]
    text = report(tmp_path, tests)
    assert "| scan | running (killed at its time limit) | 124 |" in text
    assert "| train | missing |" in text
    assert "FAILED tests/test_ops.py::test_a[cuda-t2b]" in text
    merged = json.loads((tmp_path / "gpu_check.json").read_text())
    assert merged["exits"]["scan"]["exit"] == 124
    # GPU_CHECK_SECTIONS="env scan": the others were not asked for, which is not the same as missing
    text = report(tmp_path, None, requested=["env", "scan", "train"])
    assert "| train | missing |" in text and "| gen | not requested |" in text


def test_log_slope():
    assert log_slope([10, 100, 1000], [3.0, 300.0, 30000.0]) == pytest.approx(2.0)
    assert log_slope([10], [1.0]) is None


def test_sdxl_section_records_why_it_skips_without_diffusers(tmp_path, monkeypatch):
    import argparse

    # as on the GPU machine: import diffusers -> ImportError
    monkeypatch.setitem(sys.modules, "diffusers", None)
    rec = Record(tmp_path, "sdxl", budget=10, rehearsal=True)
    sdxl.run(argparse.Namespace(rehearsal=True), rec)
    rec.finish()
    data = json.loads((tmp_path / "sdxl.json").read_text())
    assert data["status"] == "ok" and data["results"] == []
    assert "diffusers cannot be imported" in data["skipped_reason"]
    assert data["skipped"][0]["case"] == "sdxl"
    text = report(tmp_path, None)
    assert "**SD-XL UNet step**: not measured: diffusers cannot be imported" in text


def _rehearsal(tmp_path, sections: str | None, hide: bool):
    """``bash scripts/gpu_check.sh --cpu-rehearsal`` into ``tmp_path`` with ``OUT`` (the lent machine's
    return folder, at most 8 files) set to ``tmp_path/back``; ``sections`` as GPU_CHECK_SECTIONS (None:
    the default); ``hide``: every Python process without the packages the GPU machine lacks."""
    env = dict(os.environ, GPU_CHECK_OUT=str(tmp_path), OUT=str(tmp_path / "back"), PYTHON=sys.executable)
    env.pop("GPU_CHECK_SECTIONS", None)
    if sections is not None:
        env["GPU_CHECK_SECTIONS"] = sections
    if hide:
        site = tmp_path / "hide"
        site.mkdir()
        (site / "sitecustomize.py").write_text(HIDE)
        env["PYTHONPATH"] = str(site)  # the sections run from the repository root, which is on sys.path
    r = subprocess.run(
        ["bash", "scripts/gpu_check.sh", "--cpu-rehearsal"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    merged = json.loads((tmp_path / "gpu_check.json").read_text())
    assert all(e["exit"] == 0 for e in merged["exits"].values()), merged["exits"]
    text = (tmp_path / "gpu_check.md").read_text()
    assert "CPU rehearsal" in text
    assert text.strip().splitlines()[-1] in r.stdout  # the short table is printed last
    back = tmp_path / "back"
    assert sorted(p.name for p in back.iterdir()) == ["gpu_check.json", "gpu_check.md", "gpu_check.tgz"]
    with tarfile.open(back / "gpu_check.tgz") as archive:  # the results, not the return folder itself
        names = archive.getnames()
    assert "./gpu_check.md" in names and not any(n.startswith("./back") for n in names), names
    return r, merged, text


@pytest.mark.slow
def test_cpu_rehearsal_of_the_default_check(tmp_path):
    """The default run (issue 24's check: env build correct profile mixer directions), on the CPU with
    tiny sizes and without the packages the GPU machine lacks: every section runs and records what it
    should, the report opens with the acceptance table, and $OUT gets the results packed."""
    import tarfile

    r, merged, text = _rehearsal(tmp_path, None, hide=True)
    assert list(merged["exits"]) == list(DEFAULT_SECTIONS)
    sections = merged["sections"]
    for name in DEFAULT_SECTIONS:
        assert sections[name]["status"] == "ok", (name, sections[name].get("errors"))
        assert sections[name]["rehearsal"] is True
        assert name == "env" or (tmp_path / f"{name}.md").exists()
    for name in OTHER_SECTIONS:
        assert sections[name]["status"] == "not requested"
    # correct: every case in both dtypes and both backends, all within the error budget on the CPU
    checks = [r for r in sections["correct"]["results"] if not r["case"].startswith("layer_norm_grn")]
    cases = {r["case"] for r in checks}
    assert len(cases) == 3 and len(checks) == 3 * 2 * 2
    # ... and the fused LayerNorm + GRN op, both dtypes, its output and five gradients
    norms = [r for r in sections["correct"]["results"] if r["case"].startswith("layer_norm_grn")]
    assert {(r["dtype"], r["backend"]) for r in norms} == {("float32", "kernel"), ("bfloat16", "kernel")}
    assert all(r["ok"] and set(r["errors"]) == {"out", "dy", "dweight", "dbias", "dgamma", "dbeta"}
               for r in norms), norms  # fmt: skip
    assert {(r["dtype"], r["backend"]) for r in checks} == {
        (d, b) for d in ("float32", "bfloat16") for b in ("kernel", "planes")
    }
    assert all(r["ok"] and r["finite"] and set(r["errors"]) == {"y", "dx", "dproxy", "dweight", "dbias", "dmerge"}
               for r in checks), [r for r in checks if not r["ok"]]  # fmt: skip
    assert all(r["max_error"] <= 1e-5 for r in checks if r["dtype"] == "float32")
    assert all(r["max_ratio"] > 0 for r in checks if r["dtype"] == "bfloat16")
    # profile: both backends at both grids, with their top kernels and launch counts
    profiled = sections["profile"]["results"]
    assert {(r["backend"], r["grid"]) for r in profiled} == {
        (b, g) for b in ("planes", "kernel") for g in (8, 12)
    }
    assert all(
        r["device_ms"] > 0 and r["launches"] > 0 and r["top"] and r["top"][0]["ms"] > 0 for r in profiled
    )
    # mixer: old, new and SDPA, fwd+bwd and fwd, at both grids
    layers = {(row["layer"], row["phase"], row["grid"]) for row in sections["mixer"]["results"]}
    assert layers == {(n, p, g) for n in ("gspn_planes", "gspn_kernel", "sdpa") for p in ("fwd+bwd", "fwd")
                      for g in (8, 12)}  # fmt: skip
    # directions: each single direction and all four, old and new, and the ratios to t2b
    ops = sections["directions"]["results"]
    assert {(r["backend"], r["variant"]) for r in ops} == {
        (b, v) for b in ("planes", "kernel") for v in ("t2b", "b2t", "l2r", "r2l", "all")
    }
    assert all(v > 0 for v in sections["directions"]["ratios_to_t2b"].values())
    # the acceptance table: the speed rows need the GPU's sizes, the error rows are judged
    verdicts = {row["check"]: row["verdict"] for row in merged["acceptance"]}
    assert len(verdicts) == 8
    assert [v for c, v in verdicts.items() if "error" not in c] == ["not measured"] * 6
    assert [v for c, v in verdicts.items() if "error" in c] == ["pass", "pass"]
    assert "## Issue 24 acceptance" in text and "**Correctness**" in text and "**Op per direction**" in text
    assert "**Mixer vs SDPA**" in text and "**Profile**, mixer fwd+bwd" in text
    with tarfile.open(tmp_path / "back" / "gpu_check.tgz") as tar:
        names = {n.lstrip("./") for n in tar.getnames()}
    assert {f"{name}.json" for name in DEFAULT_SECTIONS} | {"sections.tsv", "gpu_check.md"} <= names


@pytest.mark.slow
def test_cpu_rehearsal_of_the_older_sections(tmp_path):
    """The sections outside the default run when named: the tests (pytest), the scan against the
    reference and the copy roofline, the Triton per-line baseline (in Triton's interpreter), the
    training steps, the SD-XL step, the training-step profile and the tile kernels against the lanes."""
    import tarfile

    names = ("env", "build", *OTHER_SECTIONS)
    r, merged, text = _rehearsal(tmp_path, " ".join(("env", "build", "tests", *OTHER_SECTIONS)), hide=False)
    sections = merged["sections"]
    for name in names:
        assert sections[name]["status"] == "ok", (name, sections[name].get("errors"))
        assert sections[name]["rehearsal"] is True
    assert merged["tests"]["finished"] and merged["tests"]["counts"]["passed"] > 0
    assert merged["tests"]["counts"]["failures"] == 0
    checks = [row for row in sections["scan"]["results"] if row["kind"] == "check"]
    assert len(checks) == 8 and all(row["ok"] and row["finite"] for row in checks)
    scans = [row for row in sections["scan"]["results"] if row["kind"] == "scan"]
    assert {row["direction"] for row in scans} == {"t2b", "b2t", "l2r", "r2l"}
    assert all(row["finite"] and row["ms"] > 0 and row["copy_gb_s"] > 0 for row in scans)
    base = sections["baseline"]
    assert base["results"][0]["ok"], base["results"][0]
    assert base["speedup_vs_best_baseline"] > 0
    assert sections["train"]["results"][0]["loss_finite"]
    gen = sections["gen"]["results"]
    assert {(r["model"], r["latent"]) for r in gen} == {
        (m, s) for m in ("gspn_dit_xl_2", "dit_xl_2") for s in (8, 16)
    }
    assert all(r["loss_finite"] and r["images_per_s"] > 0 for r in gen)
    sdxl = sections["sdxl"]["results"]
    assert {(r["variant"], r["latent"]) for r in sdxl} == {
        (v, s) for v in ("sdpa", "gspn_global", "gspn_local", "no_attn1") for s in (8, 16)
    }
    assert all(r["finite"] and r["ms"] > 0 for r in sdxl)
    assert sections["sdxl"]["self_attention_layers"] == 11
    assert "Per-line baseline" in text and "SD-XL UNet step" in text
    profiled = sections["train_profile"]["results"]
    assert [r["case"].split()[0] for r in profiled] == ["gspn_dit_xl_2", "gspn_t"]
    assert all(
        r["device_ms"] > 0 and r["launches"] > 0 and r["top"] and r["top"][0]["ms"] > 0 for r in profiled
    )
    assert "**Profile** of one training step" in text
    tile = sections["tile"]["results"]
    correct = [r for r in tile if r["kind"] == "correct"]
    assert {(r["op"], r["dtype"], r["kernel"]) for r in correct} == {
        (o, d, k)
        for o in ("proj", "proj-bwd", "attention")
        for d in ("float32", "bfloat16")
        for k in ("tile", "lanes")
    }
    assert all(r["ok"] for r in correct)
    assert {(r["op"], r["kernel"]) for r in tile if r["kind"] == "time"} == {
        (o, k) for o in ("proj", "proj fwd+bwd", "attention") for k in ("tile", "lanes")
    }
    assert "**Tile kernels**" in text
    for name in DEFAULT_SECTIONS[2:]:
        assert sections[name]["status"] == "not requested"
    with tarfile.open(tmp_path / "back" / "gpu_check.tgz") as tar:
        packed = {n.lstrip("./") for n in tar.getnames()}
    assert {f"{name}.json" for name in names} | {"tests.xml", "sections.tsv"} <= packed


@pytest.mark.slow
def test_a_failed_build_stops_the_measuring_sections(tmp_path):
    """No compiler: the build section fails, the sections after it are not started (each would try to
    build again in its own time), and the report still says what happened."""
    env = dict(os.environ, GPU_CHECK_OUT=str(tmp_path / "out"), PYTHON=sys.executable,
               GPU_CHECK_SECTIONS="env build correct", GSPN_EXTENSIONS_DIR=str(tmp_path / "cache"),
               CXX=str(tmp_path / "no-such-c++"))  # fmt: skip
    r = subprocess.run(["bash", "scripts/gpu_check.sh", "--cpu-rehearsal"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)  # fmt: skip
    assert "== [correct] not run: the build failed" in r.stdout, r.stdout[-4000:] + r.stderr[-4000:]
    exits = (tmp_path / "out" / "sections.tsv").read_text().splitlines()
    assert [line.split("\t")[:2] for line in exits] == [["env", "0"], ["build", "1"]]
    text = (tmp_path / "out" / "gpu_check.md").read_text()
    assert "| correct | missing |" in text and "cpu FAILED" in text


def _measured(tmp_path, *, kernel_ms, planes_ms, sdpa_ms, peak_mib, ratios, op_ms, errors):
    """Section records at the acceptance's sizes, as a GPU run would write them."""
    mixer = [{"kind": "layer", "layer": layer, "grid": g, "tokens": g * g, "phase": "fwd+bwd", "ms": ms[g],
              "peak_mib": peak_mib if g == 256 else 100.0}
             for layer, ms in (("gspn_kernel", kernel_ms), ("gspn_planes", planes_ms), ("sdpa", sdpa_ms))
             for g in ms]  # fmt: skip
    ops = [{"kind": "op", "backend": b, "variant": "all", "ms": op_ms[b], "peak_mib": 900.0} for b in op_ms]
    correct = [{"case": "c", "dtype": dtype, "backend": b, "max_error": err, "max_ratio": ratio, "ok": ok}
               for (dtype, b), (err, ratio, ok) in errors.items()]  # fmt: skip
    records = {
        "mixer": {"dim": 256, "batch": 2, "results": mixer},
        "directions": {"grid": 256, "E": 384, "batch": 2, "results": ops, "ratios_to_t2b": ratios},
        "correct": {"results": correct},
    }
    for name, data in records.items():
        (tmp_path / f"{name}.json").write_text(json.dumps({"section": name, "status": "ok", **data}))


def test_acceptance_rows_judge_what_was_measured(tmp_path):
    """Each of issue 24's acceptance rows: pass, FAIL, or not measured, from the new op's figures."""
    ok = {("float32", "kernel"): (3e-6, None, True), ("bfloat16", "kernel"): (8e-3, 1.1, True),
          ("float32", "planes"): (2e-6, None, True), ("bfloat16", "planes"): (9e-3, 1.3, True)}  # fmt: skip
    _measured(tmp_path, kernel_ms={64: 0.5, 128: 1.0, 256: 8.0}, planes_ms={64: 8.0, 128: 38.0, 256: 150.0},
              sdpa_ms={64: 0.9, 128: 7.0, 256: 105.0}, peak_mib=1500.0,
              ratios={"kernel l2r/t2b": 1.1, "kernel r2l/t2b": 1.2, "planes l2r/t2b": 5.0, "planes r2l/t2b": 5.1},
              op_ms={"kernel": 3.5, "planes": 130.0}, errors=ok)  # fmt: skip
    text = report(tmp_path, None)
    rows = json.loads((tmp_path / "gpu_check.json").read_text())["acceptance"]
    assert [r["verdict"] for r in rows] == ["pass"] * 8, rows
    assert (
        "| mixer fwd+bwd >= 10x faster than flash SDPA at 256² | 256²: 13.12x | 256²: 0.70x | pass |" in text
    )
    assert "l2r: 1.10x, r2l: 1.20x" in text and "256²: 1.46 GiB" in text
    # slower than SDPA at 64², 4x at 128², too much memory, l2r 1.4x t2b, 4.5 ms, a failed bf16 case
    bad = dict(ok)
    bad[("bfloat16", "kernel")] = (3e-2, 2.5, False)
    _measured(tmp_path, kernel_ms={64: 1.0, 128: 1.75, 256: 8.0}, planes_ms={}, sdpa_ms={64: 0.9, 128: 7.0, 256: 105.0},
              peak_mib=2100.0, ratios={"kernel l2r/t2b": 1.4, "kernel r2l/t2b": 1.0},
              op_ms={"kernel": 4.5}, errors=bad)  # fmt: skip
    report(tmp_path, None)
    rows = json.loads((tmp_path / "gpu_check.json").read_text())["acceptance"]
    assert [r["verdict"] for r in rows] == ["FAIL", "FAIL", "pass", "FAIL", "FAIL", "FAIL", "pass", "FAIL"], (
        rows
    )
    # nothing measured, or only part of a row
    empty = tmp_path / "empty"
    empty.mkdir()
    assert {r["verdict"] for r in acceptance({})} == {"not measured"}
    _measured(empty, kernel_ms={64: 0.5}, planes_ms={}, sdpa_ms={64: 0.9}, peak_mib=0.0, ratios={},
              op_ms={}, errors={})  # fmt: skip
    report(empty, None)
    rows = json.loads((empty / "gpu_check.json").read_text())["acceptance"]
    assert rows[0]["verdict"] == "not measured (partly)" and rows[1]["verdict"] == "not measured"


def test_sdxl_step_configs():
    """The SD-XL UNet the sdxl section and benchmarks/sdxl_step.py time: real width, or narrowed with
    SD-XL's block structure (70 self-attention layers) kept."""
    import torch
    from diffusers import UNet2DConditionModel

    from benchmarks.sdxl_step import VARIANTS, NoSelfAttention, build_models, sdxl_config

    full = sdxl_config()
    assert full == json.loads((ROOT / "configs/sdxl/unet_config.json").read_text())  # heads 5/10/20 = 64 wide
    narrow = sdxl_config(divisor=10)
    assert narrow["block_out_channels"] == [32, 64, 128] and narrow["attention_head_dim"] == [2, 4, 8]
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(narrow)
    assert sum(n.endswith(".attn1") for n, _ in unet.named_modules()) == 70
    with pytest.raises(ValueError, match="divisor 7"):
        sdxl_config(divisor=7)
    models = build_models(sdxl_config(divisor=10, layers=[1, 1, 1]), "meta", torch.float32)
    assert list(models) == list(VARIANTS) == ["sdpa", "gspn_global", "gspn_local", "no_attn1"]
    assert len({id(m) for m in models.values()}) == 4  # four UNets, the same weights

    def attn1(name):
        return [m for n, m in models[name].named_modules() if n.endswith(".attn1")]

    assert len(attn1("sdpa")) == 11 and all(type(m).__name__ == "Attention" for m in attn1("sdpa"))
    assert [m.chunk_size for m in attn1("gspn_global")] == [None] * 11
    assert [m.chunk_size for m in attn1("gspn_local")] == [4] * 11
    assert len(attn1("no_attn1")) == 11 and all(isinstance(m, NoSelfAttention) for m in attn1("no_attn1"))
    assert list(build_models(sdxl_config(divisor=10, layers=[1, 1, 1]), "meta", torch.float32,
                             variants=("no_attn1", "sdpa"))) == ["sdpa", "no_attn1"]  # fmt: skip
    with pytest.raises(ValueError, match="unknown variant"):
        build_models(sdxl_config(divisor=10), "meta", torch.float32, variants=("flash",))


def test_sdxl_section_times_the_four_variants(tmp_path):
    """The sdxl section (rehearsal: SD-XL narrowed, one transformer layer per level, CPU) times SDPA,
    GSPN global, GSPN local and no attn1 at each size, and its table puts them side by side."""
    import argparse

    rec = Record(tmp_path, "sdxl", budget=120, rehearsal=True)
    sdxl.run(argparse.Namespace(rehearsal=True), rec)
    rec.finish()
    data = json.loads((tmp_path / "sdxl.json").read_text())
    assert data["status"] == "ok" and data["variants"] == ["sdpa", "gspn_global", "gspn_local", "no_attn1"]
    assert {(r["variant"], r["latent"]) for r in data["results"]} == {
        (v, s) for v in data["variants"] for s in (8, 16)
    }
    assert all(r["finite"] and r["ms"] > 0 for r in data["results"])
    text = "\n".join(sdxl.table(data))
    assert "| latent | pixels | SDPA | GSPN global | GSPN local | no attn1 | SDPA / GSPN global |" in text
    assert text.count("| 8² | 64² |") == 1 and text.count("| 16² | 128² |") == 1


def test_training_diffusion_without_diffusers_is_dits(monkeypatch):
    """The gen and profile sections train without diffusers (the lent GPU machine lacks it) on the same
    noise schedule as DiT's diffusers scheduler."""
    import torch

    from gspn_lightning.diffusion import GaussianDiffusion, dit_scheduler

    reference = GaussianDiffusion(scheduler=dit_scheduler())
    monkeypatch.setitem(sys.modules, "diffusers", None)
    d = GaussianDiffusion()
    torch.testing.assert_close(d.alphas_cumprod, reference.alphas_cumprod)
    assert d.learn_sigma and d.num_timesteps == 1000
    with pytest.raises(ImportError):
        d.scheduler  # noqa: B018 - the diffusers object itself is only made on request


def test_compare_puts_trees_side_by_side(tmp_path):
    """``python -m benchmarks.gpu_check compare``: the base tree's scan and mixer times against each
    other tree's, as the base's time over the other's, with what is missing shown as '-'."""

    def tree(name, scan_ms, mixer_ms):
        d = tmp_path / name
        d.mkdir()
        scan = [{"kind": "check", "rel_err": 1e-7, "ok": True, "finite": True}]
        scan += [{"kind": "scan", "shape": [2, 3, 8, 8], "dtype": "float32", "chunk": None, "phase": "fwd",
                  "direction": d_, "ms": ms, "frac_of_copy": 0.5} for d_, ms in scan_ms.items()]  # fmt: skip
        (d / "scan.json").write_text(json.dumps({"section": "scan", "status": "ok", "results": scan}))
        mixer = [
            {"kind": "layer", "layer": "gspn", "grid": 32, "phase": "fwd", "ms": mixer_ms, "peak_mib": 10.0}
        ]
        (d / "mixer.json").write_text(json.dumps({"section": "mixer", "status": "ok", "results": mixer}))
        return name, d

    trees = [tree("main", {"t2b": 2.0, "l2r": 8.0}, 4.0), tree("tiles", {"t2b": 2.0, "l2r": 2.0}, 2.0)]
    text = compare(tmp_path, trees)
    assert "| 2x3x8x8 | float32 | global | fwd | l2r | 8 (50%) | 2 (50%) | 4.00x |" in text
    assert "| 2x3x8x8 | float32 | global | fwd | t2b | 2 (50%) | 2 (50%) | 1.00x |" in text
    assert "| gspn | 32x32 | fwd | 4 (10) | 2 (10) | 2.00x |" in text
    assert "| tiles | - | not run | 1/1 ok (1.0e-07) |" in text
    assert json.loads((tmp_path / "compare.json").read_text())["tiles"]["scan"]["status"] == "ok"
