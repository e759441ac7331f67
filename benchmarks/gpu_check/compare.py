"""compare: the results of one tree against others' (an A/B of two revisions on the same GPU).  Run
``scripts/gpu_check.sh`` in each tree into its own folder (``GPU_CHECK_OUT``, and ``GPU_CHECK_SECTIONS``
to keep to, say, ``build scan mixer``), then

    python -m benchmarks.gpu_check compare --out DIR --trees main=DIR_A branch=DIR_B [...]
"""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.gpu_check.harness import fmt_value
from benchmarks.gpu_check.report import load_section, parse_junit


def compare(out: Path, trees: list[tuple[str, Path]]) -> str:
    """Side by side, the first tree against each other: build, tests, the scan's correctness checks and
    timings (ms per case and direction, and the first tree's time over the other's: above 1 is faster),
    and the GSPN mixer's timings.  Writes ``out/compare.{json,md}`` and returns the markdown."""
    data = {}
    for name, folder in trees:
        xml, log = folder / "tests.xml", folder / "tests.log"
        data[name] = {
            "folder": str(folder),
            "build": load_section(folder, "build"),
            "scan": load_section(folder, "scan"),
            "mixer": load_section(folder, "mixer"),
            "tests": parse_junit(xml, log) if xml.exists() or log.exists() else None,
        }
    (out / "compare.json").write_text(json.dumps(data, indent=1, default=str))
    names = [n for n, _ in trees]
    base = names[0]
    rehearsal = any(d[s].get("rehearsal") for d in data.values() for s in ("scan", "mixer"))
    lines = [f"# {base} against {', '.join(names[1:])}", ""]
    info = load_section(trees[0][1], "env").get("info", {})
    lines += [
        f"- device: {info.get('gpu', 'cpu')}; torch {info.get('torch')} (CUDA {info.get('torch_cuda')})",
        "",
    ]
    if rehearsal:
        lines += ["**CPU rehearsal: tiny sizes on the CPU; none of these figures describes a GPU.**", ""]
    lines += ["| tree | build | tests | scan checks (worst rel. err) |", "|---|---|---|---|"]
    for n in names:
        d = data[n]
        build = d["build"].get("results", [])
        b = (
            ", ".join(f"{r['extension']} {'ok' if r['ok'] else 'FAILED'} {r['seconds']} s" for r in build)
            or "-"
        )
        checks = [r for r in d["scan"].get("results", []) if r.get("kind") == "check"]
        c = (f"{sum(r['ok'] for r in checks)}/{len(checks)} ok ({max(r['rel_err'] for r in checks):.1e})"
             if checks else "-")  # fmt: skip
        t = d["tests"]["summary"] if d["tests"] else "not run"
        lines.append(f"| {n} | {b} | {t} | {c} |")
    for n in names:
        for section in ("build", "scan", "mixer"):
            for e in data[n][section].get("errors", []):
                lines.append(f"- error, {n} / {section} / {e['case']}: {e['error'][:300]}")
        if data[n]["tests"]:
            for f in data[n]["tests"].get("failures", [])[:10]:
                lines.append(f"- FAILED ({n}) {f}")

    def rows(name, section, kind, key):
        return {key(r): r for r in data[name][section].get("results", []) if r.get("kind") == kind}

    others = names[1:]

    def side_by_side(title, cols, per_tree, show, keep=lambda k: True):
        """One table: a row per key of the base tree, its cell, then each other tree's cell and the base's
        time over that tree's."""
        if not per_tree[base] or not any(per_tree[n] for n in others):
            return
        head = " | ".join(f"{n} ms | {base} / {n}" for n in others)
        lines.extend(["", title, "", f"| {' | '.join(cols)} | {base} ms | {head} |",
                      "|" + "---|" * len(cols) + "---:|" + "---:|---:|" * len(others)])  # fmt: skip
        for k, r in per_tree[base].items():
            if not keep(k):
                continue
            cells = []
            for n in others:
                o = per_tree[n].get(k)
                cells += [show(o), f"{r['ms'] / o['ms']:.2f}x"] if o else ["-", "-"]
            lines.append(f"| {' | '.join(map(str, k))} | {show(r)} | " + " | ".join(cells) + " |")

    scan_key = lambda r: ("x".join(map(str, r["shape"])), r["dtype"], r["chunk"] or "global", r["phase"],  # noqa: E731
                          r["direction"])  # fmt: skip
    side_by_side("**Scan** (ms, median; fraction of the copy bandwidth in brackets)",
                 ("case", "dtype", "chunk", "phase", "dir"), {n: rows(n, "scan", "scan", scan_key) for n in names},
                 lambda r: f"{r['ms']:.3g} ({r['frac_of_copy']:.0%})")  # fmt: skip
    mix_key = lambda r: (r["layer"], f"{r['grid']}x{r['grid']}", r["phase"])  # noqa: E731
    side_by_side("**Mixer** (ms, median; peak MiB in brackets)", ("layer", "grid", "phase"),
                 {n: rows(n, "mixer", "layer", mix_key) for n in names},
                 lambda r: f"{r['ms']:.3g} ({fmt_value(r['peak_mib'], 0)})", keep=lambda k: k[0].startswith("gspn"))  # fmt: skip
    text = "\n".join(lines) + "\n"
    (out / "compare.md").write_text(text)
    return text
