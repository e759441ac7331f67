"""Smoke tests of benchmark scripts that nothing else runs: tiny sizes, results into a temporary folder."""

import json
import shutil

import pytest

from benchmarks import compact, dit_vs_gspn_step, strided_reads


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
def test_strided_reads_reads_every_element_and_writes_results(tmp_path):
    """The C reader sums every element once for tile widths that do and do not divide the row (it
    raises otherwise), and a run writes both result files without overwriting an earlier one."""
    args = ["--size", "40", "--planes", "2", "--widths", "16", "24", "--rounds", "1", "--out", str(tmp_path)]
    assert strided_reads.main(args) == 0
    assert strided_reads.main(args) == 0
    first = json.loads(
        (tmp_path / next(p.name for p in tmp_path.glob("*.json") if "-2" not in p.name)).read_text()
    )
    assert [r["width"] for r in first["reads"]] == [16, 24, 40, 16, 24, 40]
    assert all(r["GBps"]["median"] > 0 for r in first["reads"])
    assert len(list(tmp_path.glob("*.md"))) == 2


def test_compact_times_every_width_of_both_blocks(tmp_path):
    """benchmarks/compact.py: every block at full width and each d_prop, fewer gate maps and ratios to
    full width, written to both result files."""
    assert compact.main(["--rounds", "1", "--reps", "1", "--cases", "digits", "--d-prop", "32", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("*.json")
    rows = json.loads(path.read_text())["cases"]["digits"]["variants"]
    assert set(rows) == {"release/full", "release/32", "compact/full", "compact/32"}
    assert rows["release/32"]["gate_maps_per_pixel"] * 4 == rows["release/full"]["gate_maps_per_pixel"] == 3072
    assert rows["compact/full"]["fwd_bwd_vs_full"]["median"] == 1.0 and rows["compact/32"]["fwd_ms"]["median"] > 0
    assert len(list(tmp_path.glob("*.md"))) == 1


def test_dit_vs_gspn_step_times_the_demo_models_and_overlays(tmp_path):
    """benchmarks/dit_vs_gspn_step.py: the demo's GSPN-DiT, its DiT and an overlay variant built from
    the configs, a ratio to DiT per GSPN variant, the profiles of the two demo models."""
    args = ["--rounds", "1", "--steps", "1", "--batch", "2", "--profile-steps", "1", "--profile-rows", "3"]
    assert dit_vs_gspn_step.main([*args, "--gspn-overlays", "full_width", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("*.json")
    result = json.loads(path.read_text())
    assert set(result["models"]) == {"gspn_dit", "dit", "gspn_dit+full_width"}
    assert result["models"]["gspn_dit+full_width"]["params"] > result["models"]["gspn_dit"]["params"]
    assert set(result["ratios_vs_dit"]) == {"gspn_dit", "gspn_dit+full_width"}
    assert set(result["profile"]) == {"gspn_dit", "dit"} and result["profile"]["dit"]["top"]
    with pytest.raises(SystemExit):
        dit_vs_gspn_step.main([*args, "--gspn-overlays", "nonesuch", "--out", str(tmp_path)])


@pytest.mark.slow
def test_revisions_times_head_against_the_working_tree(tmp_path):
    """HEAD (extracted with git archive) against the working tree, one pair on a tiny case: both
    children load their own copy of the package, and a run writes both result files. With the kernels
    of HEAD and the working tree alike, both load the build already in the test's extension cache."""
    from benchmarks import revisions
    from gspn_lightning.ops import _build

    args = ["HEAD", ".", "--pairs", "1", "--reps", "1", "--cases", "tiny", "--cache", str(_build.cache_dir())]
    assert revisions.main([*args, "--out", str(tmp_path)]) == 0
    (result,) = [json.loads(p.read_text()) for p in tmp_path.glob("*.json")]
    assert result["base"] == revisions.git("rev-parse", "--short", "HEAD")
    assert result["new"].startswith(result["base"])
    assert [(r["case"], r["metric"]) for r in result["rows"]] == [("tiny", "fwd_ms"), ("tiny", "fwdbwd_ms")]
    assert all(len(r["base_ms"]) == len(r["new_ms"]) == 1 and r["ratio"]["median"] > 0 for r in result["rows"])
    assert len(list(tmp_path.glob("*.md"))) == 1


def test_revisions_refuses_revisions_that_disagree():
    from benchmarks import revisions

    a = {"rows": {"tiny": {"sums": [1.0, 2.0], "abs_sums": [3.0, 4.0]}}}
    revisions.check_agreement(a, {"rows": {"tiny": {"sums": [1.0, 2.0 + 1e-5], "abs_sums": [3.0, 4.0]}}}, ("a", "b"))
    with pytest.raises(RuntimeError, match="sum of dx differs"):
        revisions.check_agreement(a, {"rows": {"tiny": {"sums": [1.0, 2.01], "abs_sums": [3.0, 4.0]}}}, ("a", "b"))
