"""The summary of the digits generation demo (``scripts/demo_dit.sh``) over its seeds.

    python scripts/digits_summary.py runs/digits --out runs/digits_summary

reads ``runs/digits/seed<S>/<model>/`` (``train_wall_s.txt``, ``checkpoints/last.ckpt`` and the two
scorings ``time/report.json`` (equal time: the last checkpoint) and ``steps/report.json`` (equal
steps)) and writes ``<out>.md`` (a table, each figure the median over the seeds with its range) and
``<out>.json`` (every seed's figures).  Checkpoints are read as plain data (``weights_only``).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

MODELS = (("gspn_dit", "GSPN-DiT"), ("dit", "DiT"))
COMPARISONS = (("steps", "equal steps"), ("time", "equal time"))
#: (report key, column, format, scale)
METRICS = (
    ("fid", "FID", "{:.1f}", 1.0),
    ("kid_mean", "KID", "{:.4f}", 1.0),
    ("class_accuracy", "class accuracy %", "{:.1f}", 100.0),
    ("sfid", "sFID", "{:.1f}", 1.0),
    ("precision", "precision", "{:.3f}", 1.0),
    ("recall", "recall", "{:.3f}", 1.0),
)


def _checkpoint_facts(path: Path) -> dict:
    import torch

    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    params = sum(v.numel() for k, v in ckpt["state_dict"].items() if k.startswith("model."))
    return {"step": int(ckpt["global_step"]), "params": int(params)}


def collect(root: Path) -> list[dict]:
    """One record per (seed, model, comparison) that has a report; a model is a folder of a seed
    folder, its scorings ``time/`` and ``steps/`` (the checkpoint scored is read from the samples'
    ``protocol.json``; the training's wall time from ``train_wall_s.txt`` where the run has one)."""
    records = []
    for seed_dir in sorted(root.glob("seed*")):
        seed = seed_dir.name[len("seed") :]
        for run in sorted(p for p in seed_dir.iterdir() if p.is_dir()):
            wall_file = run / "train_wall_s.txt"
            last = run / "checkpoints" / "last.ckpt"
            trained = _checkpoint_facts(last) if last.is_file() else None
            for key, _ in COMPARISONS:
                report_path = run / key / "report.json"
                if not report_path.is_file():
                    continue
                report = json.loads(report_path.read_text())
                protocol = json.loads((run / key / "samples" / "protocol.json").read_text())
                facts = _checkpoint_facts(Path(protocol["checkpoint"]))
                wall = float(wall_file.read_text()) if wall_file.is_file() and trained else None
                records.append(
                    {
                        "seed": seed,
                        "model": run.name,
                        "comparison": key,
                        "params": facts["params"],
                        "train_steps": trained["step"] if trained else None,
                        "train_wall_s": wall,
                        "s_per_step": wall / max(trained["step"], 1) if wall is not None else None,
                        "step": facts["step"],
                        **{m: report.get(m) for m, *_ in METRICS},
                    }
                )
    return records


def _cell(values: list, fmt: str, scale: float) -> str:
    vals = [float(v) * scale for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return "-"
    med = fmt.format(statistics.median(vals))
    if len(vals) == 1:
        return med
    return f"{med} [{fmt.format(min(vals))}-{fmt.format(max(vals))}]"


def table(records: list[dict]) -> str:
    seeds = sorted({r["seed"] for r in records})
    lines = [
        f"Median [min-max] over seeds {', '.join(seeds)}; s/step = wall time of the 12-minute training "
        "(with start-up, validation and sample grids) / its steps (- where not timed).",
        "",
        "| comparison | model | params | steps | s/step | " + " | ".join(m[1] for m in METRICS) + " |",
        "|---|---|---:|---:|---:|" + "---:|" * len(METRICS),
    ]
    names = [n for n, _ in MODELS] + sorted({r["model"] for r in records} - {n for n, _ in MODELS})
    labels = dict(MODELS)
    for key, comp in COMPARISONS:
        for name in names:
            label = labels.get(name, name)
            rows = [r for r in records if r["model"] == name and r["comparison"] == key]
            if not rows:
                continue
            cells = [
                comp,
                label,
                f"{rows[0]['params'] / 1e6:.2f}M",
                _cell([r["step"] for r in rows], "{:.0f}", 1.0),
                _cell([r["s_per_step"] for r in rows], "{:.3f}", 1.0),
                *(_cell([r[m] for r in rows], fmt, scale) for m, _, fmt, scale in METRICS),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", type=Path, help="the demo's runs folder (runs/digits)")
    p.add_argument("--out", type=Path, required=True, help="output stem: <out>.md and <out>.json")
    args = p.parse_args(argv)
    records = collect(args.root)
    if not records:
        raise SystemExit(f"no scored runs under {args.root}")
    text = table(records)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(text + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(records, indent=1) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
