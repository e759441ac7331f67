"""``python -m benchmarks.gpu_check SECTION|report|compare --out DIR ...``: one section of the GPU check
in this process (``scripts/gpu_check.sh`` runs each in its own), or the report of the sections' files,
or the comparison of several trees' results."""

from __future__ import annotations

import argparse
import importlib
import os
import traceback
from pathlib import Path

import torch

from benchmarks.gpu_check import SECTIONS
from benchmarks.gpu_check import __doc__ as DESCRIPTION
from benchmarks.gpu_check.harness import Record


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_check",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("section", choices=[*SECTIONS, "report", "compare"])
    parser.add_argument("--out", type=Path, required=True, help="folder for the section's JSON")
    parser.add_argument("--budget", type=float, default=60.0, help="seconds this section may take")
    parser.add_argument("--rehearsal", action="store_true", help="CPU dry run with tiny sizes")
    parser.add_argument("--junit", type=Path, help="report: the test run's junit XML")
    parser.add_argument("--test-log", type=Path, help="report: the test run's log (if it has no junit XML)")
    parser.add_argument("--test-files", default="", help="report: which test files ran")
    parser.add_argument("--sections", default=None, help="report: the sections asked for (space-separated)")
    parser.add_argument("--trees", nargs="+", default=[], metavar="NAME=DIR",
                        help="compare: result folders, the first one the base")  # fmt: skip
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(min(4, os.cpu_count() or 1) if not args.rehearsal else 1)
    if args.section == "compare":
        from benchmarks.gpu_check.compare import compare

        if len(args.trees) < 2 or any("=" not in t for t in args.trees):
            parser.error("compare needs --trees NAME=DIR NAME=DIR [...]")
        trees = [(name, Path(folder)) for name, folder in (t.split("=", 1) for t in args.trees)]
        print(compare(args.out, trees))
        return 0
    if args.section == "report":
        from benchmarks.gpu_check.report import parse_junit, report

        tests = None
        if args.junit is not None:
            tests = parse_junit(args.junit, args.test_log)
            tests["files"] = args.test_files
        print(report(args.out, tests, None if args.sections is None else args.sections.split()))
        return 0
    rec = Record(args.out, args.section, args.budget, args.rehearsal)
    module = None
    try:
        module = importlib.import_module(f"benchmarks.gpu_check.{args.section}")
        module.run(args, rec)
    except Exception as exc:  # noqa: BLE001 - the section's record says what went wrong
        rec.error(args.section, exc)
        traceback.print_exc()
    rec.finish()
    if module is not None and hasattr(module, "table"):  # the section's table, beside its JSON
        try:
            text = "\n".join(module.table(rec.data)).strip()
            (args.out / f"{args.section}.md").write_text(text + "\n" if text else "")
            print(text)
        except Exception:  # noqa: BLE001 - the JSON is what counts; the report retries the table
            traceback.print_exc()
    print(f"[{args.section}] {rec.data['status']} in {rec.elapsed():.1f} s: {len(rec.data['results'])} rows, "
          f"{len(rec.data['skipped'])} skipped, {len(rec.data['errors'])} errors")  # fmt: skip
    return 0 if rec.data["status"] == "ok" else 1


if __name__ == "__main__":
    raise SystemExit(main())
