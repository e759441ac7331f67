"""What the end-to-end tests share for running the ``gspn`` command (:mod:`gspn_lightning.cli`) in subprocesses."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# One torch thread per subprocess (and per rank): the tests' models are tiny, and OpenMP barriers
# between two threads on a busy 2-core machine made a 32-batch test run take 50 s instead of 18 s.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}

# Runs several gspn commands one after another in one interpreter: each process start imports
# lightning (~12 s on the 2-core CI machine), which dwarfs a debug-config command's own work.
_CHAIN = """
import json, sys
sys.path.insert(0, sys.argv[1])
from gspn_lightning.cli import main
for args in json.loads(sys.argv[2]):
    print("=== gspn " + " ".join(args), flush=True)
    assert main(args) == 0, args
"""


def run_cli_chain(*commands, cwd, timeout=900):
    """Run each command (a list of ``gspn`` arguments, e.g. ``["fit", "--config", ...]``) in turn in one fresh process; their outputs
    (stdout and stderr together), in order."""
    commands = [[str(a) for a in c] for c in commands]
    r = subprocess.run(
        [sys.executable, "-c", _CHAIN, str(REPO), json.dumps(commands)],
        cwd=cwd,
        env=dict(os.environ, PYTHONUNBUFFERED="1", **ONE_THREAD),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )
    assert r.returncode == 0, f"gspn chain {commands} failed:\n{r.stdout[-8000:]}"
    outs = r.stdout.split("=== gspn ")[1:]
    assert len(outs) == len(commands), r.stdout[-8000:]
    return outs


def run_dirs(root, version: int | None = None) -> list[Path]:
    """The log folders ``<root>/lightning_logs/version_*`` of the runs under ``root`` (or only run
    ``version``), oldest first."""
    pattern = f"lightning_logs/version_{'*' if version is None else version}"
    return sorted((p for p in Path(root).glob(pattern) if p.is_dir()), key=lambda p: p.stat().st_mtime)


def logged(run_dir) -> "EventAccumulator":  # noqa: F821
    """The TensorBoard events of one run folder (the default logger's), every scalar and image kept."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


def scalar_series(root, name: str) -> list[float]:
    """Every value of the scalar ``name`` logged by the runs under ``root``, runs oldest first."""
    values: list[float] = []
    for run in run_dirs(root):
        events = logged(run)
        if name in events.Tags()["scalars"]:
            values += [e.value for e in events.Scalars(name)]
    return values


def last_scalars(root, version: int | None = None, merge_runs: bool = False) -> dict[str, float]:
    """The last value of every scalar logged to TensorBoard by the newest run under ``root`` (or by
    run ``version``; with ``merge_runs`` by all runs, later runs winning)."""
    runs = run_dirs(root, version)
    assert runs, f"no lightning_logs/version_{'*' if version is None else version} under {root}"
    merged: dict[str, float] = {}
    for run in runs if merge_runs else runs[-1:]:
        events = logged(run)
        for tag in events.Tags()["scalars"]:
            merged[tag] = events.Scalars(tag)[-1].value
    return merged
