"""Smoke tests of benchmark scripts that nothing else runs: tiny sizes, results into a temporary folder."""

import json
import shutil

import pytest

from benchmarks import strided_reads


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
