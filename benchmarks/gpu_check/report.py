"""report: ``gpu_check.json`` (every section's record, the exit codes and wall times of
``sections.tsv``, the tests' counts) and the short table ``gpu_check.md`` of them."""

from __future__ import annotations

import json
import re
import statistics
import xml.etree.ElementTree as ET
from pathlib import Path

from benchmarks.gpu_check import SECTIONS


def fmt_value(v, nd=2):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def load_section(folder: Path, name: str, absent: str = "missing") -> dict:
    """A section's JSON in ``folder``, or a stand-in whose status says it is ``absent``."""
    p = folder / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() else {"section": name, "status": absent}


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
    build = sections["build"].get("results", [])
    if build:
        lines += ["", "**Build**: " + ", ".join(f"{r['extension']} {'ok' if r['ok'] else 'FAILED'} in {r['seconds']} s"
                                              for r in build)]  # fmt: skip
    errors = [(n, e) for n, s in sections.items() for e in s.get("errors", [])]
    if errors:
        lines += ["", "**Errors**:"] + [f"- {n} / {e['case']}: {e['error'][:300]}" for n, e in errors]

    scan = [r for r in sections["scan"].get("results", []) if r.get("kind") == "scan"]
    checks = [r for r in sections["scan"].get("results", []) if r.get("kind") == "check"]
    if checks:
        worst = max(r["rel_err"] for r in checks)
        lines += ["", f"**Scan correctness** (kernel vs float64 reference, realistic gates, {len(checks)} cases): "
                      f"worst relative error {worst:.2e}, all finite: {all(r['finite'] for r in checks)}"]  # fmt: skip
    if scan:
        lines += ["", "**Scan** (fraction of the measured copy bandwidth; ms median)", "",
                  "| case | dtype | chunk | phase | t2b | b2t | l2r | r2l |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        keys = []
        for r in scan:
            k = (tuple(r["shape"]), r["dtype"], r["chunk"], r["phase"])
            if k not in keys:
                keys.append(k)
        for shape, dtype, chunk, phase in keys:
            cells = []
            for d in ("t2b", "b2t", "l2r", "r2l"):
                m = [r for r in scan if (tuple(r["shape"]), r["dtype"], r["chunk"], r["phase"], r["direction"])
                     == (shape, dtype, chunk, phase, d)]  # fmt: skip
                cells.append(f"{m[0]['frac_of_copy']:.0%} ({m[0]['ms']:.3g})" if m else "-")
            lines.append(
                f"| {'x'.join(map(str, shape))} | {dtype} | {chunk or 'global'} | {phase} | "
                + " | ".join(cells)
                + " |"
            )
        lines.append(
            f"\ncopy bandwidth: {statistics.median(r['copy_gb_s'] for r in scan):.0f} GB/s (median over groups)"
        )

    base = sections["baseline"]
    if base.get("results"):
        lines += ["", "**Per-line baseline** (t2b forward, float32)", "", "| impl | ms | GB/s | of copy |",
                  "|---|---:|---:|---:|"]  # fmt: skip
        for r in base["results"]:
            if r.get("kind") == "timing":
                lines.append(f"| {r['impl']} | {r['ms']:.3g} | {r['gb_s']:.0f} | {r['frac_of_copy']:.0%} |")
        if "speedup_vs_best_baseline" in base:
            lines.append(
                f"\nkernel speed-up over the fastest baseline: {base['speedup_vs_best_baseline']:.1f}x"
            )

    mix = sections["mixer"]
    rows = mix.get("results", [])
    if rows:
        lines += ["", f"**Mixer vs SDPA** (width {mix.get('dim')}, {mix.get('heads')} heads, batch {mix.get('batch')}, "
                      f"bf16; {mix.get('sdpa_backend')}): ms / peak MiB", "",
                  "| grid | gspn fwd | sdpa fwd | gspn fwd+bwd | sdpa fwd+bwd |", "|---|---|---|---|---|"]  # fmt: skip
        for g in sorted({r["grid"] for r in rows}):
            cells = []
            for phase in ("fwd", "fwd+bwd"):
                for layer in ("gspn", "sdpa"):
                    m = [r for r in rows if (r["grid"], r["layer"], r["phase"]) == (g, layer, phase)]
                    cells.append(f"{m[0]['ms']:.3g} / {fmt_value(m[0]['peak_mib'], 0)}" if m else "-")
            lines.append(f"| {g}x{g} | {cells[0]} | {cells[1]} | {cells[2]} | {cells[3]} |")
        fits = mix.get("time_exponents", {})
        lines.append("\ntime ~ tokens^p: " + ", ".join(f"{k} p={fmt_value(v)}" for k, v in fits.items()))

    tr = sections["train"].get("results", [])
    if tr:
        r = tr[0]
        lines += ["", f"**Training step** gspn_t ({r['params_m']:.1f}M), batch {r['batch']} at {r['image']}², "
                      f"bf16 autocast: {r['images_per_s']:.0f} img/s ({r['ms']:.1f} ms/step), "
                      f"peak {fmt_value(r['peak_mib'], 0)} MiB"]  # fmt: skip
    gen = sections["gen"].get("results", [])
    if gen:
        lines += ["", "**Generation training step** (bf16 autocast, AdamW, DiT's hybrid loss)", "",
                  "| model | image | batch | ms/step | img/s | peak MiB |", "|---|---|---:|---:|---:|---:|"]  # fmt: skip
        for r in gen:
            lines.append(f"| {r['model']} ({r['params_m']:.0f}M) | {r['image']}² | {r['batch']} | {r['ms']:.1f} | "
                         f"{r['images_per_s']:.1f} | {fmt_value(r['peak_mib'], 0)} |")  # fmt: skip
    sd = sections["sdxl"]
    if sd.get("skipped_reason"):
        lines += ["", f"**SD-XL UNet step**: not measured: {sd['skipped_reason']}"]
    elif sd.get("results"):
        rows = sd["results"]
        lines += ["", f"**SD-XL UNet step** (width {sd.get('channels')}, {sd.get('self_attention_layers')} "
                      f"self-attention layers, bf16, batch 1, inference forward; teacher "
                      f"{sd.get('teacher_attention')}): ms / peak MiB", "",
                  "| latent | pixels | SDPA | GSPN | SDPA / GSPN time |", "|---|---|---|---|---:|"]  # fmt: skip
        for size in sorted({r["latent"] for r in rows}):
            m = {r["variant"]: r for r in rows if r["latent"] == size}
            cells = [
                f"{m[v]['ms']:.4g} / {fmt_value(m[v]['peak_mib'], 0)}" if v in m else "-"
                for v in ("sdpa", "gspn")
            ]
            ratio = f"{m['sdpa']['ms'] / m['gspn']['ms']:.2f}" if len(m) == 2 else "-"
            lines.append(f"| {size}² | {8 * size}² | {cells[0]} | {cells[1]} | {ratio} |")
    for r in sections["profile"].get("results", []):
        lines += ["", f"**Profile** of one training step, {r['case']} (bf16 autocast): {r['device_ms']:.1f} ms "
                      "of kernels; the top ones by self time", "", "| kernel | ms | share | calls |",
                  "|---|---:|---:|---:|"]  # fmt: skip
        for k in r["top"]:
            lines.append(
                f"| `{k['name']}` | {k['ms']:.2f} | {fmt_value(k['share'] and 100 * k['share'], 1)} % | {k['calls']} |"
            )
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
