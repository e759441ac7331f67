"""The fused propagation op of two revisions side by side, in alternating processes.

    python benchmarks/revisions.py BASE [NEW] [--pairs 5] [--reps 5] [--threads 1] [--cases ...]

BASE and NEW are git revisions; NEW defaults to ``.``, the working tree as it is.  Each revision is
extracted with ``git archive`` into a temporary folder (``.`` is used in place) and its kernels are
built into an extension cache (a temporary one unless ``--cache DIR``, which keeps the builds for the
next run; builds are keyed by their sources, so two revisions with the same kernels share one).

Two builds of the same operators cannot live in one process (both register ``gspn_lightning::*``), so
every measurement is a child process that imports one revision and times
``gspn_propagate_proj`` (four directions, d_state 8, float32) on each case: the forward (no grad) and
the forward + backward, ``--reps`` times each (thread CPU time at one thread, wall time at more),
median.  Children run in pairs, BASE then NEW, then NEW then BASE in the next pair, and so on, so that
neither revision always runs first;
the ratio BASE / NEW is formed per pair (above 1: NEW is faster) and reported as median [min-max].
Both revisions must compute the same function: the sums of y and of every gradient are compared
(relative 1e-4) and a disagreement fails the run.  Results go to a new
``benchmarks/results/revisions_<base>_vs_<new>_<machine>[-N].{json,md}`` unless ``--replace``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import torch  # noqa: E402

from benchmarks.common import RESULTS, fmt, machine_info, new_result_path, ratios, write_results  # noqa: E402

# (B, C, H, W, chunk): the mixer benchmark's three layers, then global planes of a GSPN-T-width layer
CASES = {
    "gspn_t_stage1": (8, 144, 56, 56, 2),
    "global_14x14": (8, 576, 14, 14, None),
    "dit_digits_8x8": (64, 128, 8, 8, 2),
    "global_64x64": (1, 144, 64, 64, None),
    "global_128x128": (1, 144, 128, 128, None),
    "tiny": (2, 3, 9, 7, 4),  # for the smoke test
}
DEFAULT_CASES = [c for c in CASES if c != "tiny"]
D_STATE = 8
DIRECTIONS = ("t2b", "b2t", "l2r", "r2l")


def time_case(op, name: str, reps: int, clock) -> dict:
    """Forward and forward + backward of ``op`` (a revision's ``gspn_propagate_proj``) on one case."""
    B, C, H, W, chunk = CASES[name]
    K = len(DIRECTIONS)
    g = torch.Generator().manual_seed(0)
    ins = [
        torch.randn(B, C, H, W, generator=g),
        torch.randn(B, D_STATE, H, W, generator=g),
        torch.randn(K * 6 * C, D_STATE, generator=g) * 0.3,
        torch.randn(K * 6 * C, generator=g) * 0.3,
        torch.softmax(torch.randn(K, C, generator=g), 0),
    ]
    ins = [t.requires_grad_() for t in ins]
    go = torch.randn(B, C, H, W, generator=g)

    def forward():
        with torch.no_grad():
            return op(*ins, DIRECTIONS, chunk, backend="kernel")

    def forward_backward():
        y = op(*ins, DIRECTIONS, chunk, backend="kernel")
        return y, torch.autograd.grad(y, ins, go)

    y, grads = forward_backward()  # warm-up, and the values both revisions must agree on
    if not all(bool(torch.isfinite(t).all()) for t in (y, *grads)):
        raise RuntimeError(f"{name}: non-finite output or gradient")
    forward()
    fwd, fwdbwd = [], []
    for _ in range(reps):
        t = clock()
        forward()
        fwd.append(clock() - t)
        t = clock()
        forward_backward()
        fwdbwd.append(clock() - t)
    return {
        "fwd_ms": statistics.median(fwd) * 1e3,
        "fwdbwd_ms": statistics.median(fwdbwd) * 1e3,
        "sums": [float(t.double().sum()) for t in (y, *grads)],
        "abs_sums": [float(t.double().abs().sum()) for t in (y, *grads)],
    }


def child(src: str, cases: list[str], reps: int, threads: int) -> dict:
    """Time the op of the revision at ``src`` (run in a fresh process: one revision per process)."""
    sys.path.insert(0, src)
    from gspn_lightning.ops import _build, gspn_propagate_proj

    loaded = Path(sys.modules["gspn_lightning"].__file__).resolve()
    if not loaded.is_relative_to(Path(src).resolve()):
        raise RuntimeError(f"imported gspn_lightning from {loaded}, not from {src}")
    _build.load_cpu()
    if _build.build_error("cpu"):
        raise RuntimeError(f"the CPU kernels of {src} did not build: {_build.build_error('cpu')}")
    torch.set_num_threads(threads)
    # one thread: its CPU time (what the machine's other load disturbs least); more: wall time, since
    # the calling thread's CPU time leaves out the other threads' work
    clock = time.thread_time if threads == 1 else time.perf_counter
    rows = {name: time_case(gspn_propagate_proj, name, reps, clock) for name in cases}
    return {"isa": _build.cpu_isa(), "rows": rows}


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *args], check=True, capture_output=True, text=True).stdout.strip()


def checkout(rev: str, tmp: Path) -> tuple[Path, str]:
    """The source folder of ``rev`` and its label (short hash; ``.``: HEAD's, plus ``+dirty`` where the
    working tree differs from it)."""
    if rev == ".":
        dirty = git("status", "--porcelain", "--untracked-files=no")
        return ROOT, git("rev-parse", "--short", "HEAD") + ("+dirty" if dirty else "")
    sha = git("rev-parse", "--short", f"{rev}^{{commit}}")
    dest = tmp / sha
    if not dest.exists():
        dest.mkdir(parents=True)
        cmd = ["git", "-C", str(ROOT), "archive", "--format=tar", sha]
        archive = subprocess.run(cmd, check=True, capture_output=True)
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest, sha


def run_child(src: Path, cache: Path, args: argparse.Namespace) -> dict:
    env = dict(os.environ, GSPN_EXTENSIONS_DIR=str(cache), OMP_NUM_THREADS=str(args.threads))
    cmd = [sys.executable, __file__, "--child", str(src), "--threads", str(args.threads), "--reps", str(args.reps)]
    r = subprocess.run([*cmd, "--cases", *args.cases], env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"the child for {src} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def check_agreement(a: dict, b: dict, labels: tuple[str, str]) -> None:
    names = ("y", "dx", "dproxy", "dweight", "dbias", "dmerge")
    for case in a["rows"]:
        for name, sa, sb, scale in zip(
            names, a["rows"][case]["sums"], b["rows"][case]["sums"], a["rows"][case]["abs_sums"]
        ):
            if abs(sa - sb) > 1e-4 * max(scale, 1e-30):
                raise RuntimeError(f"{case}: sum of {name} differs between {labels[0]} ({sa}) and {labels[1]} ({sb})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("base", nargs="?")
    p.add_argument("new", nargs="?", default=".")
    p.add_argument("--pairs", type=int, default=5)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cases", nargs="+", choices=sorted(CASES), default=DEFAULT_CASES)
    p.add_argument("--cache", type=Path, help="extension cache for both revisions (default: a temporary one)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--replace", action="store_true", help="overwrite the results file of these revisions")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.cases, args.reps, args.threads)))
        return 0
    if args.base is None:
        p.error("give the base revision (e.g. HEAD~1 or a commit hash)")

    info = machine_info(torch.device("cpu"))
    with tempfile.TemporaryDirectory(prefix="gspn-revisions-") as tmp:
        tmp = Path(tmp)
        cache = args.cache or tmp / "extensions"
        (src_a, label_a), (src_b, label_b) = checkout(args.base, tmp), checkout(args.new, tmp)
        print(f"base {label_a} ({src_a}), new {label_b} ({src_b}); building / loading both")
        # keyed by role, not label: a clean working tree has HEAD's label
        runs = {"base": [], "new": []}
        first = {"base": run_child(src_a, cache, args), "new": run_child(src_b, cache, args)}
        check_agreement(first["base"], first["new"], (label_a, label_b))
        for i in range(args.pairs):
            order = [("base", src_a), ("new", src_b)]
            for role, src in order if i % 2 == 0 else order[::-1]:
                runs[role].append(run_child(src, cache, args))
            print(f"pair {i + 1}/{args.pairs} done", flush=True)

    rows = []
    md = [
        f"# gspn_propagate_proj: {label_a} (base) against {label_b} (new), CPU, {args.threads} thread(s), "
        f"on {info['cpu']} ({time.strftime('%Y-%m-%d %H:%M')})",
        "",
        f"`python benchmarks/revisions.py {args.base} {args.new} --pairs {args.pairs} --reps {args.reps} "
        f"--threads {args.threads}`: {args.pairs} pairs of processes, the revisions' order alternating; "
        f"each process times every case's forward and forward + backward {args.reps} times ("
        f"{'thread CPU time' if args.threads == 1 else 'wall time'}, median). Four directions, d_state "
        f"{D_STATE}, float32. Kernels built for "
        f"{first['base']['isa']} / {first['new']['isa']}. Ratio: base / new per pair (above 1: new is "
        f"faster). Outputs and gradients agree (sums within 1e-4 relative).",
        "",
        "| case (B, C, H, W, chunk) | metric | base ms (median of pairs) | new ms | base / new per pair |",
        "|---|---|---:|---:|---:|",
    ]
    for case in args.cases:
        for metric in ("fwd_ms", "fwdbwd_ms"):
            a = [r["rows"][case][metric] for r in runs["base"]]
            b = [r["rows"][case][metric] for r in runs["new"]]
            ratio = ratios(a, b)
            row = {"case": case, "shape": CASES[case], "metric": metric, "base_ms": a, "new_ms": b, "ratio": ratio}
            rows.append(row)
            md.append(
                f"| {case} {CASES[case]} | {metric[:-3].replace('fwdbwd', 'fwd+bwd')} | {statistics.median(a):.1f} | "
                f"{statistics.median(b):.1f} | {fmt(ratio)} |"
            )
    result = {
        "machine": info,
        "base": label_a,
        "new": label_b,
        "threads": args.threads,
        "pairs": args.pairs,
        "reps": args.reps,
        "rows": rows,
    }
    stem = f"revisions_{label_a}_vs_{label_b}_{info['name']}".replace("+", "-")
    write_results(new_result_path(args.out, stem, args.replace), result, md)
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
