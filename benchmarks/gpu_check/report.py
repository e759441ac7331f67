"""report: ``gpu_check.json`` (every section's record, the exit codes and wall times of
``sections.tsv``, the tests' counts) and the short table ``gpu_check.md`` of them."""

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
    merged = {"sections": sections, "exits": exits, "tests": tests}
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
