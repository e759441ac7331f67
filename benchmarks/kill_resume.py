"""Kill-and-resume trials: does a 2-node DDP run that loses a rank to SIGKILL resume to the same result?

Each trial launches a config (``--config``, by default the tiny classification one,
``configs/classification/debug_mnist.yaml``; any task's config works) on data the benchmark writes
itself (the MNIST demo shards for classification; random images encoded to latent shards by a tiny
random VAE for diffusion; the tiny random SD-XL folder and captioned random images for distillation),
on the CPU with gloo, as two torchrun "nodes" of one process each over 127.0.0.1 (the torchrun line of
docs/multinode.md, read from the page: :func:`node_command`),
SIGKILLs the training process of one rank (chosen at random) at a random moment of training, waits
for the job to go down, then relaunches both nodes with ``--ckpt_path last`` and lets them finish.
Half the trials kill at a random moment of training (after a random checkpointed step but the last,
within the time the reference took for the steps to the next checkpoint: a moment of training
whatever the machine's load); the other half kill the moment a checkpoint write has begun (its
temporary file appears), to hit the write window. A reference run of the same seed is never
interrupted.

A trial passes when its final ``last.ckpt`` has the reference's step, learning rate (optimiser
param groups and scheduler state), model weights, EMA weights and optimiser state (AdamW's moments
and step counts), compared bit for bit. A watcher
thread loads (``torch.load``) every checkpoint file version that appears in the checkpoint folder,
during and between runs, and counts those that cannot be loaded.

    python benchmarks/kill_resume.py                  # 10 trials, ~10-15 min on 2 cores
    python benchmarks/kill_resume.py --trials 2 --out /tmp/kr
    python benchmarks/kill_resume.py --config configs/dit/tiny.yaml --max-steps 8 --every 2
    python benchmarks/kill_resume.py --config configs/sdxl/tiny.yaml --max-steps 8 --every 2

Writes ``<out>/kill_resume_cpu_<machine>.{json,md}`` for the default config and
``<out>/kill_resume_<folder>_<name>_cpu_<machine>.{json,md}`` for another (``kill_resume_dit_tiny_...``
for ``configs/dit/tiny.yaml``); default ``<out>``: ``benchmarks/results``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from multinode import torchrun_command  # noqa: E402
from scan import machine_info  # noqa: E402

CONFIG = REPO / "configs" / "classification" / "debug_mnist.yaml"


def data_class(config: Path) -> str:
    """The config's datamodule class name (the last part of ``data.class_path``)."""
    import yaml

    return yaml.safe_load(config.read_text())["data"]["class_path"].rsplit(".", 1)[-1]


def _random_pngs(n: int, seed: int, captions: bool):
    """``n`` random images (portrait and landscape), labelled with one of 3 classes or captioned."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(n):
        h, w = (24, 20) if i % 2 else (20, 24)
        if captions:
            h, w = 4 * h, 4 * w
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buffer, format="PNG")
        sample = {"__key__": f"k{seed}_{i}", "png": buffer.getvalue()}
        sample.update({"txt": f"a picture of thing {i % 3}".encode()} if captions else {"cls": i % 3})
        yield sample


def prepare_data(config: Path, work: Path) -> list[str]:
    """Write the data ``config``'s task trains on under ``work`` (once); the command-line overrides that
    point the config at it. Nothing is downloaded."""
    from gspn_lightning.data.write_shards import write_shards

    kind = data_class(config)
    data = work / "data"
    done = data / "done"
    if kind == "ImageWebDataModule":  # classification: the MNIST demo shards
        if not done.exists():
            from gspn_lightning.data.mnist_demo import build_mnist_demo

            build_mnist_demo(data)
        train, val, extra = data / "train", data / "val", []
    elif kind == "LatentWebDataModule":  # diffusion: random images -> latents by a tiny random VAE
        if not done.exists():
            from gspn_lightning.data.latents import encode_shards
            from gspn_lightning.testing import tiny_vae

            classes = ["a", "b", "c"]
            for split, n, seed in (("train", 32, 0), ("val", 8, 1)):
                write_shards(_random_pngs(n, seed, False), data / "img" / split, maxcount=8, progress=False,
                             classes=classes)  # fmt: skip
            tiny_vae().save_pretrained(data / "vae")
            for split in ("train", "val"):
                encode_shards(
                    str(data / "img" / split), data / "lat" / split, str(data / "vae"), image_size=16,
                    batch_size=8, num_workers=0, devices=1, accelerator="cpu", progress=False,
                )  # fmt: skip
        train, val, extra = data / "lat" / "train", data / "lat" / "val", []
    elif kind == "CaptionWebDataModule":  # distillation: the tiny random SD-XL and captioned images
        if not done.exists():
            from gspn_lightning.testing import make_tiny_sdxl

            make_tiny_sdxl(data / "tiny-sdxl", seed=0)
            for split, n, seed in (("train", 16, 0), ("val", 4, 1)):
                write_shards(_random_pngs(n, seed, True), data / split, maxcount=8, progress=False,
                             labelled=False)  # fmt: skip
        train, val = data / "train", data / "val"
        extra = [f"--model.init_args.pretrained={data / 'tiny-sdxl'}"]
    else:
        raise SystemExit(f"{config}: no test data for a {kind} (classification, latent or caption shards)")
    done.parent.mkdir(parents=True, exist_ok=True)
    done.touch()
    return [f"--data.init_args.train_shards={train}", f"--data.init_args.val_shards={val}", *extra]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children(pid: int) -> list[int]:
    """Direct child processes of ``pid`` (from /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


class Watcher(threading.Thread):
    """Loads every new version (path, mtime, size) of every ``*.ckpt`` in ``folder``; counts failures."""

    def __init__(self, folder: Path, interval: float = 0.05):
        super().__init__(daemon=True)
        self.folder, self.interval = folder, interval
        self.seen: set[tuple[str, int, int]] = set()
        self.unloadable: list[dict] = []
        self.loaded = 0
        self.stop = threading.Event()

    def scan(self) -> None:
        for path in sorted(self.folder.glob("*.ckpt")):
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            version = (path.name, st.st_mtime_ns, st.st_size)
            if version in self.seen:
                continue
            self.seen.add(version)
            try:
                with open(path, "rb") as f:  # an open file survives a rename over its name
                    ckpt = torch.load(f, map_location="cpu", weights_only=True)
                if "global_step" not in ckpt or "state_dict" not in ckpt:
                    raise ValueError("not a full checkpoint")
                self.loaded += 1
            except FileNotFoundError:
                continue
            except Exception as exc:
                self.unloadable.append({"file": path.name, "size": st.st_size, "error": repr(exc)[:200]})

    def run(self) -> None:
        while not self.stop.is_set():
            self.scan()
            time.sleep(self.interval)
        self.scan()


def node_command(root: Path, data: list[str], args, node: int, port: int) -> list[str]:
    """Node ``node``'s command: the torchrun line of docs/multinode.md (read from the page by
    :mod:`multinode`, the one copy) as 2 nodes x 1 process over 127.0.0.1, then this benchmark's data
    and schedule. The line always carries ``--ckpt_path last``: the first launch starts fresh (no
    checkpoint yet), a relaunch resumes."""
    values = {
        "NNODES": 2, "NPROC_PER_NODE": 1, "NODE_RANK": node, "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": port, "CONFIG": args.config,
    }  # fmt: skip
    return torchrun_command(values, python=sys.executable) + [
        *data, f"--trainer.default_root_dir={root}", "--trainer.accelerator=cpu",
        f"--trainer.max_steps={args.max_steps}", "--trainer.max_epochs=1000",
        "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false",
        f"--checkpoint.every_n_train_steps={args.every}",
        "--checkpoint.monitor=null", "--checkpoint.save_top_k=1",
        "--data.init_args.num_workers=1",
        f"--seed_everything={args.seed}",
    ]  # fmt: skip


def launch(root: Path, data: list[str], args, resume: bool, log_prefix: Path) -> list[subprocess.Popen]:
    """Both nodes of a job (``resume``: a relaunch, which the docs' line resumes by itself)."""
    port = free_port()
    procs = []
    for node in range(2):
        cmd = node_command(root, data, args, node, port)
        # `-m gspn_lightning.cli` imports this checkout's package, as cli.py from it did
        pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=pythonpath)
        log = open(f"{log_prefix}-node{node}.log", "w")
        procs.append(
            subprocess.Popen(
                cmd, cwd=root.parent, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        )
    return procs


def wait_all(procs, timeout: float) -> list[int | None]:
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    codes = [p.poll() for p in procs]
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    return codes


def final_state(path: Path) -> dict:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    return {
        "step": ckpt["global_step"],
        "lr": [g["lr"] for g in ckpt["optimizer_states"][0]["param_groups"]],
        "sched": ckpt["lr_schedulers"][0],
        "model": {k: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")},
        "ema": {k: v for k, v in ckpt["state_dict"].items() if k.startswith("ema.")},
        "optim": {
            f"{i}.{k}": v.detach()
            for i, state in ckpt["optimizer_states"][0]["state"].items()
            for k, v in state.items()
            if isinstance(v, torch.Tensor)
        },
    }


def compare(ref: dict, got: dict) -> dict:
    def max_diff(a, b):
        if a.keys() != b.keys():
            return float("inf")
        return max(
            ((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].numel()), default=0.0
        )

    out = {
        "step": got["step"] == ref["step"],
        "lr": got["lr"] == ref["lr"] and got["sched"] == ref["sched"],
        "model_max_abs_diff": max_diff(ref["model"], got["model"]),
        "ema_max_abs_diff": max_diff(ref["ema"], got["ema"]),
        "optim_max_abs_diff": max_diff(ref["optim"], got["optim"]),
    }
    out["weights"] = out["model_max_abs_diff"] == 0.0
    out["ema"] = out["ema_max_abs_diff"] == 0.0
    out["optim"] = out["optim_max_abs_diff"] == 0.0
    out["pass"] = out["step"] and out["lr"] and out["weights"] and out["ema"] and out["optim"]
    return out


def run_job(root, data, args, resume, log_prefix, timeout) -> list[int | None]:
    return wait_all(launch(root, data, args, resume, log_prefix), timeout)


def wait_until(predicate, procs, timeout: float, poll: float = 0.01) -> bool:
    """Poll ``predicate`` until it holds (True), a process exits or ``timeout`` passes (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and all(p.poll() is None for p in procs):
        if predicate():
            return True
        time.sleep(poll)
    return False


def has_checkpoint(folder: Path) -> bool:
    return folder.is_dir() and any(n.endswith(".ckpt") and not n.startswith(".") for n in os.listdir(folder))


def latest_step(folder: Path) -> int:
    """The highest step in the names of the checkpoints in ``folder`` (``...-step=N.ckpt``), or -1."""
    steps = [int(m.group(1)) for n in os.listdir(folder) if (m := re.search(r"step=(\d+)\.ckpt$", n))]
    return max(steps, default=-1)


def writing(folder: Path) -> set[str]:
    """Names of checkpoint temp files (a write in progress) in ``folder``."""
    return {n for n in os.listdir(folder) if ".ckpt.tmp-" in n} if folder.is_dir() else set()


def trial(i: int, work: Path, data: list[str], args, ref: dict, rng: random.Random, step_s: float) -> dict:
    root = work / f"trial{i:02d}"
    folder = root / "checkpoints"
    folder.mkdir(parents=True)
    watcher = Watcher(folder)
    watcher.start()
    mode = "during-write" if i % 2 else "random-time"
    victim_rank = rng.randrange(2)
    procs = launch(root, data, args, False, work / f"trial{i:02d}-run1")
    start = time.monotonic()
    # training has started once the run's first checkpoint exists
    wait_until(lambda: has_checkpoint(folder), procs, args.timeout)
    if mode == "random-time":
        # a random point of training, whatever the machine's load: after a random checkpointed step
        # (not the last), within the reference's time for the steps to the next checkpoint
        target = args.every * rng.randrange(1, max(2, args.max_steps // args.every))
        wait_until(lambda: latest_step(folder) >= target, procs, args.timeout)
        time.sleep(rng.uniform(0.0, 1.0) * args.every * step_s)
    else:  # let a random number of writes pass, then kill while the next one is under way
        skip, seen = rng.randrange(4), set()

        def write_started() -> bool:
            new = writing(folder) - seen
            seen.update(new)
            return bool(new) and len(seen) > skip

        wait_until(write_started, procs, args.timeout, poll=0.0005)
    workers = children(procs[victim_rank].pid) if procs[victim_rank].poll() is None else []
    for w in workers:
        os.kill(w, signal.SIGKILL)
    killed_at = round(time.monotonic() - start, 2)
    in_write = bool(writing(folder))
    codes1 = wait_all(procs, 120)
    steps_on_disk = sorted(
        torch.load(p, map_location="cpu", weights_only=True)["global_step"] for p in folder.glob("*.ckpt")
    )
    codes2 = run_job(root, data, args, True, work / f"trial{i:02d}-run2", args.timeout)
    watcher.stop.set()
    watcher.join()
    result = {"trial": i, "mode": mode, "killed_rank": victim_rank, "killed": bool(workers)}
    result.update(killed_at_s=killed_at, temp_file_present_at_kill=in_write)
    result.update(
        exit_codes_killed_run=codes1, exit_codes_resumed_run=codes2, steps_on_disk_after_kill=steps_on_disk
    )
    last = folder / "last.ckpt"
    if codes2 == [0, 0] and last.exists():
        result.update(compare(ref, final_state(last)))
    else:
        result["pass"] = False
    result.update(
        checkpoint_versions_loaded=watcher.loaded,
        unloadable=len(watcher.unloadable),
        unloadable_files=watcher.unloadable,
    )
    return result


def write_results(results: dict, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"kill_resume_{results['config']['tag']}cpu_{results['machine']['name']}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    s = results["summary"]
    lines = [
        f"# Kill-and-resume trials on {results['machine']['cpu']} ({results['machine']['cores']} cores)",
        "",
        f"{s['trials']} trials of `{results['config']['config']}`, 2 nodes x 1 process (torchrun, 127.0.0.1, gloo), "
        f"max_steps={results['config']['max_steps']}, checkpoint every {results['config']['every']} steps, "
        f"seed {results['config']['seed']}; {results['date']}. Command: `{results['command']}`.",
        "",
        f"**{s['passed']}/{s['trials']}** reached max_steps with the reference's step, lr, weights, EMA "
        "and optimiser state "
        f"(bit for bit); **{s['unloadable']}** of {s['checkpoint_versions_seen']} checkpoint file versions "
        "seen on disk were unloadable.",
        "",
        "Columns: how the kill was timed, the rank whose training process got SIGKILL, seconds after launch,"
        " whether a checkpoint temp file existed at that moment, the steps of the checkpoints left on disk,"
        " then the comparison of the resumed run's final last.ckpt with the reference (max abs difference"
        " in brackets).",
        "",
        "| trial | kill | rank | at (s) | in write | steps on disk after kill | step | lr | weights | EMA "
        "| optimiser | pass | unloadable |",
        "|---|---|---|---:|---|---|---|---|---|---|---|---|---:|",
    ]
    for r in results["trials"]:
        lines.append(
            f"| {r['trial']} | {r['mode']} | {r['killed_rank']} | {r['killed_at_s']} | "
            f"{r['temp_file_present_at_kill']} | "
            f"{r['steps_on_disk_after_kill']} | {r.get('step')} | {r.get('lr')} | "
            f"{r.get('weights')} ({r.get('model_max_abs_diff')}) | {r.get('ema')} ({r.get('ema_max_abs_diff')}) | "
            f"{r.get('optim')} ({r.get('optim_max_abs_diff')}) | {r['pass']} | {r['unloadable']} |"
        )
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return stem


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=CONFIG, help="the config to train (any task's)")
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--max-steps", type=int, default=24)
    p.add_argument("--every", type=int, default=3, help="checkpoint every N training steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rng-seed", type=int, default=1, help="seed of the kill schedule")
    p.add_argument("--timeout", type=float, default=600, help="seconds allowed for one launch")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--workdir", type=Path, default=None, help="kept when given; a temp folder otherwise")
    args = p.parse_args(argv)

    args.config = args.config.resolve()
    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="kill_resume_")
        args.workdir = Path(tmp.name)
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    data = prepare_data(args.config, work)

    t0 = time.monotonic()
    ref_root = work / "reference"
    procs = launch(ref_root, data, args, False, work / "reference")
    wait_until(lambda: has_checkpoint(ref_root / "checkpoints"), procs, args.timeout)
    first_ckpt = time.monotonic()
    # the time per training step: from the first checkpoint (step `every`) to the last step's
    wait_until(lambda: latest_step(ref_root / "checkpoints") >= args.max_steps, procs, args.timeout)
    step_s = (time.monotonic() - first_ckpt) / max(1, args.max_steps - args.every)
    codes = wait_all(procs, args.timeout)
    ref_time, train_span = time.monotonic() - t0, time.monotonic() - first_ckpt
    if codes != [0, 0]:
        print(f"reference run failed: exit codes {codes}; logs in {work}", file=sys.stderr)
        return 1
    ref = final_state(ref_root / "checkpoints" / "last.ckpt")
    print(
        f"reference: step {ref['step']} in {ref_time:.1f}s ({train_span:.1f}s after its first checkpoint, "
        f"{step_s:.2f}s a step)",
        flush=True,
    )

    def report(trials: list[dict]) -> tuple[dict, Path]:
        """Write the results of ``trials`` (after each one: a stopped benchmark keeps what it did)."""
        summary = {
            "trials": len(trials),
            "passed": sum(bool(r["pass"]) for r in trials),
            "unloadable": sum(r["unloadable"] for r in trials),
            "checkpoint_versions_seen": sum(r["checkpoint_versions_loaded"] + r["unloadable"] for r in trials),
            "seconds": round(time.monotonic() - t0, 1),
        }
        results = {
            "benchmark": "kill_resume",
            "command": "python benchmarks/kill_resume.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
            "machine": machine_info(torch.device("cpu")),
            "config": {
                "config": str(args.config.relative_to(REPO) if args.config.is_relative_to(REPO) else args.config),
                "tag": "" if args.config == CONFIG else f"{args.config.parent.name}_{args.config.stem}_",
                "max_steps": args.max_steps,
                "every": args.every,
                "seed": args.seed,
                "rng_seed": args.rng_seed,
            },
            "reference_seconds": round(ref_time, 1),
            "reference_seconds_after_first_checkpoint": round(train_span, 1),
            "reference_seconds_per_step": round(step_s, 2),
            "summary": summary,
            "trials": trials,
        }
        return summary, write_results(results, args.out)

    rng = random.Random(args.rng_seed)
    trials = []
    for i in range(args.trials):
        r = trial(i, work, data, args, ref, rng, step_s)
        trials.append(r)
        print(
            f"trial {i}: {r['mode']}, rank {r['killed_rank']} killed at {r['killed_at_s']}s "
            f"(temp file present: {r['temp_file_present_at_kill']}), on disk "
            f"{r['steps_on_disk_after_kill']}, pass={r['pass']}, unloadable={r['unloadable']}",
            flush=True,
        )
        summary, stem = report(trials)
    if not trials:
        summary, stem = report(trials)
    print(
        f"{summary['passed']}/{summary['trials']} passed, {summary['unloadable']} unloadable; wrote {stem}.md"
    )
    if tmp is not None:
        tmp.cleanup()
    return 0 if summary["passed"] == summary["trials"] and summary["unloadable"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
