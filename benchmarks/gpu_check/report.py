"""report: ``gpu_check.json`` (every section's record, the exit codes and wall times of
``sections.tsv``, the tests' counts, issue 24's acceptance rows) and ``gpu_check.md``: the acceptance
table first (each row measured pass / FAIL, or not measured), then each section's table."""

from __future__ import annotations

import importlib
import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

from benchmarks.gpu_check import SECTIONS
from benchmarks.gpu_check.harness import fmt_value


def load_section(folder: Path, name: str, absent: str = "missing") -> dict:
    """A section's JSON in ``folder``, or a stand-in whose status says it is ``absent``."""
    p = folder / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() else {"section": name, "status": absent}


def table_of(section: str, data: dict) -> list[str]:
    """The report's lines for one section's record, made by its module's ``table``."""
    return importlib.import_module(f"benchmarks.gpu_check.{section}").table(data)


GIB_MIB = 1024.0


def _verdict(values: list[bool | None]) -> str:
    """FAIL if any measured value fails, pass if all were measured and pass, else not measured."""
    if any(v is False for v in values):
        return "FAIL"
    if values and all(v is True for v in values):
        return "pass"
    return "not measured" if not any(v is not None for v in values) else "not measured (partly)"


def acceptance(sections: dict) -> list[dict]:
    """Issue 24's acceptance rows from the sections' records: ``check``, ``new`` (the op behind
    ``backend="kernel"``) and ``old`` (``backend="planes"``) as text, and ``verdict`` (the new one's)."""
    from benchmarks.gpu_check import correct, directions, mixer

    rows = []
    # only the acceptance's configurations count (a rehearsal's tiny sizes are "not measured")
    m = sections.get("mixer", {})
    mix = m.get("results", []) if (m.get("dim"), m.get("batch")) == (256, 2) else []
    d = sections.get("directions", {})
    measured_op = (d.get("grid"), d.get("E"), d.get("batch")) == (256, 384, 2)

    def speedup(layer, g):
        gspn, sdpa = mixer.find(mix, layer, g), mixer.find(mix, "sdpa", g)
        return sdpa["ms"] / gspn["ms"] if gspn and sdpa else None

    def show(values, unit="x", nd=2):
        return ", ".join(f"{k}: {fmt_value(v, nd)}{unit if v is not None else ''}" for k, v in values.items())

    grids = (64, 128, 256)
    new = {f"{g}²": speedup("gspn_kernel", g) for g in grids}
    old = {f"{g}²": speedup("gspn_planes", g) for g in grids}
    rows.append({"check": "mixer fwd+bwd faster than flash SDPA from 64² (SDPA ms / GSPN ms > 1)",
                 "new": show(new), "old": show(old),
                 "verdict": _verdict([None if v is None else v > 1 for v in new.values()])})  # fmt: skip
    for g, target in ((128, 5), (256, 10)):
        n, o = speedup("gspn_kernel", g), speedup("gspn_planes", g)
        rows.append({"check": f"mixer fwd+bwd >= {target}x faster than flash SDPA at {g}²",
                     "new": show({f"{g}²": n}), "old": show({f"{g}²": o}),
                     "verdict": _verdict([None if n is None else n >= target])})  # fmt: skip
    peak = {k: mixer.find(mix, k, 256) for k in ("gspn_kernel", "gspn_planes")}
    peak = {
        k: r["peak_mib"] / GIB_MIB if r and r.get("peak_mib") is not None else None for k, r in peak.items()
    }
    rows.append({"check": "mixer fwd+bwd peak memory at 256² <= 2 GiB", "new": show({"256²": peak["gspn_kernel"]}, " GiB"),
                 "old": show({"256²": peak["gspn_planes"]}, " GiB"),
                 "verdict": _verdict([None if peak["gspn_kernel"] is None else peak["gspn_kernel"] <= 2.0])})  # fmt: skip
    ratios = d.get("ratios_to_t2b", {}) if measured_op else {}
    new = {d: ratios.get(f"kernel {d}/t2b") for d in ("l2r", "r2l")}
    old = {d: ratios.get(f"planes {d}/t2b") for d in ("l2r", "r2l")}
    rows.append({"check": "op fwd+bwd (256², E=384, B=2, bf16): l2r and r2l within 1.3x of t2b",
                 "new": show(new), "old": show(old),
                 "verdict": _verdict([None if v is None else v <= 1.3 for v in new.values()])})  # fmt: skip
    ops = d.get("results", []) if measured_op else []
    all4 = {b: directions.find(ops, b, "all") for b in ("kernel", "planes")}
    ms = {b: r["ms"] if r else None for b, r in all4.items()}
    rows.append({"check": "op fwd+bwd, all four directions (256², E=384, B=2, bf16) <= 4 ms",
                 "new": show({"ms": ms["kernel"]}, ""), "old": show({"ms": ms["planes"]}, ""),
                 "verdict": _verdict([None if ms["kernel"] is None else ms["kernel"] <= 4.0])})  # fmt: skip
    checks = sections.get("correct", {}).get("results", [])
    for dtype, what in (("float32", f"fp32 error <= {correct.FP32_MAX:g} of the float64 reference"),
                        ("bfloat16", f"bf16 error <= {correct.BF16_RATIO_MAX:g}x PyTorch's own in bf16 (+{correct.BF16_SLACK:g})")):  # fmt: skip
        cells, verdict = {}, "not measured"
        for backend in ("kernel", "planes"):
            m = [r for r in checks if r["dtype"] == dtype and r["backend"] == backend]
            key = "max_ratio" if dtype == "bfloat16" else "max_error"
            worst = max((r[key] for r in m), default=None)
            unit = "x" if dtype == "bfloat16" else ""
            cells[backend] = (f"{sum(r['ok'] for r in m)}/{len(m)} cases pass, worst {fmt_value(worst, 3)}{unit}"
                              if m else "-")  # fmt: skip
            if backend == "kernel" and m:
                verdict = _verdict([r["ok"] for r in m])
        rows.append({"check": what, "new": cells["kernel"], "old": cells["planes"], "verdict": verdict})
    return rows


def report(out: Path, tests: dict | None, requested: list[str] | None = None) -> str:
    """gpu_check.{json,md} from the sections' JSON in ``out``; a section without one is 'missing', or
    'not requested' when ``requested`` (GPU_CHECK_SECTIONS) leaves it out."""
    sections = {}
    for name in SECTIONS:
        absent = "missing" if requested is None or name in requested else "not requested"
        sections[name] = load_section(out, name, absent)
    status_file = out / "sections.tsv"
    exits = {}
    if status_file.exists():
        for line in status_file.read_text().splitlines():
            name, code, secs = line.split("\t")
            exits[name] = {"exit": int(code), "wall_s": float(secs)}
    accept = acceptance(sections)
    merged = {"sections": sections, "exits": exits, "tests": tests, "acceptance": accept}
    (out / "gpu_check.json").write_text(json.dumps(merged, indent=1, default=str))

    info = sections["env"].get("info", {})
    lines = ["# GSPN GPU check", ""]
    rehearsal = any(s.get("rehearsal") for s in sections.values())
    if rehearsal:
        lines += ["**CPU rehearsal: tiny sizes on the CPU; none of these figures describes a GPU.**", ""]
    lines += [
        f"- device: {info.get('gpu', 'cpu')} (capability {info.get('capability', '-')}); nvidia-smi: "
        f"{info.get('nvidia_smi', '-')}",
        f"- torch {info.get('torch')} (CUDA {info.get('torch_cuda')}), Python {info.get('python')}, "
        f"{info.get('nvcc', '-')}",
        "",
        "## Issue 24 acceptance"
        + (" (CPU rehearsal: the speed and memory rows say nothing about a GPU)" if rehearsal else ""),
        "",
        "| check | new (backend=kernel) | old (backend=planes) | verdict |",
        "|---|---|---|---|",
        *(f"| {r['check']} | {r['new']} | {r['old']} | {r['verdict']} |" for r in accept),
        "",
        "| section | status | exit | wall s |",
        "|---|---|---:|---:|",
    ]
    for name in SECTIONS:
        s = sections[name]
        e = exits.get(name, {})
        status = s.get("status", "?")
        if e.get("exit") in (124, 137):
            status += " (killed at its time limit)"
        lines.append(f"| {name} | {status} | {fmt_value(e.get('exit'))} | {fmt_value(e.get('wall_s'), 1)} |")
    if tests:
        lines += ["", f"**Tests** ({tests.get('files')}): {tests.get('summary')}"]
        for f in tests.get("failures", [])[:20]:
            lines.append(f"- FAILED {f}")
    lines += table_of("build", sections["build"])
    errors = [(n, e) for n, s in sections.items() for e in s.get("errors", [])]
    if errors:
        lines += ["", "**Errors**:"] + [f"- {n} / {e['case']}: {e['error'][:300]}" for n, e in errors]
    for name in SECTIONS[SECTIONS.index("build") + 1 :]:
        lines += table_of(name, sections[name])
    text = "\n".join(lines) + "\n"
    (out / "gpu_check.md").write_text(text)
    return text


def parse_junit(path: Path, log: Path | None = None) -> dict:
    """Pass/fail counts from pytest's junit XML, or, when pytest was killed before writing it, from the
    progress characters of its ``-q`` log."""
    if not path.exists():
        text = log.read_text(errors="replace") if log is not None and log.exists() else ""
        marks = "".join(re.findall(r"^([.FEsx]+)\s*(?:\[\s*\d+%\])?$", text, flags=re.M))
        failures = re.findall(r"^(?:FAILED|ERROR) (\S+)", text, flags=re.M)
        summary = (f"no junit report (pytest did not finish); its log shows {marks.count('.')} passed, "
                   f"{marks.count('F') + marks.count('E')} failed, {marks.count('s')} skipped")  # fmt: skip
        return {"summary": summary, "failures": failures, "finished": False}
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    failures = []
    for case in root.iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            failures.append(f"{case.get('classname')}::{case.get('name')}")
    cuda_cases = sum(1 for c in root.iter("testcase") if "cuda" in (c.get("name") or ""))
    counts["cuda_cases"] = cuda_cases
    summary = (f"{counts['passed']} passed, {counts['failures'] + counts['errors']} failed, "
               f"{counts['skipped']} skipped ({cuda_cases} CUDA-parametrised cases)")  # fmt: skip
    return {"summary": summary, "counts": counts, "failures": failures, "finished": True}
