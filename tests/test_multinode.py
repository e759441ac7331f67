"""The multi-node recipes of docs/multinode.md, checked as written: the torchrun line run on one "node"
as two CPU processes (the tiny DiT config: fit, then the same line again resumes), the SLURM script
linted and its command line read by Lightning as inside a 2 x 8 allocation, and kill_resume's launch
taken from the same page."""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.multinode import DOC, placeholders, recipe, torchrun_command
from tests.cli_helpers import ONE_THREAD, last_scalars
from tests.test_dit_task import latent_data  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parents[1]
SBATCH = ROOT / "scripts" / "slurm_fit.sbatch"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_recipe_is_one_gspn_fit_line():
    line = recipe("torchrun")
    assert placeholders(line) == {"NNODES", "NPROC_PER_NODE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "CONFIG"}
    values = {"NNODES": 2, "NPROC_PER_NODE": 8, "NODE_RANK": 1, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": 29500,
              "CONFIG": "configs/dit/imagenet.yaml"}  # fmt: skip
    cmd = torchrun_command(values)
    assert cmd[:6] == ["torchrun", "--nnodes=2", "--nproc-per-node=8", "--node-rank=1", "--master-addr=10.0.0.1",
                       "--master-port=29500"]  # fmt: skip
    assert cmd[6:10] == ["-m", "gspn_lightning.cli", "fit", "--config"]
    assert "--trainer.num_nodes=2" in cmd and "--trainer.devices=8" in cmd and cmd[-2:] == ["--ckpt_path", "last"]
    with pytest.raises(KeyError, match="CONFIG"):
        torchrun_command({k: v for k, v in values.items() if k != "CONFIG"})
    # the doc's example values name files that exist
    text = DOC.read_text()
    for config in re.findall(r"configs/[\w/]+\.yaml", text):
        assert (ROOT / config).is_file(), config


def test_kill_resume_launches_the_docs_line():
    """The one full multi-node launch command lives in docs/multinode.md; the benchmark reads it."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from benchmarks import kill_resume

    args = type("Args", (), {"config": ROOT / "configs/dit/tiny.yaml", "max_steps": 8, "every": 2, "seed": 3})()
    cmd = kill_resume.node_command(Path("/tmp/run"), ["--data.init_args.train_shards=x"], args, node=1, port=1234)
    values = {"NNODES": 2, "NPROC_PER_NODE": 1, "NODE_RANK": 1, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": 1234,
              "CONFIG": args.config}  # fmt: skip
    doc_line = torchrun_command(values, python=sys.executable)
    assert cmd[: len(doc_line)] == doc_line
    assert "--data.init_args.train_shards=x" in cmd and "--trainer.max_steps=8" in cmd
    source = (ROOT / "benchmarks/kill_resume.py").read_text()
    assert "--nnodes" not in source and "torch.distributed.run" not in source  # no second copy


@pytest.mark.slow
def test_torchrun_recipe_runs_two_processes_and_resumes(latent_data, tmp_path):  # noqa: F811
    """The docs' line as written, on one node with two CPU processes (gloo), for the tiny DiT config as
    shipped (its validation interval included): 2 steps; then the same line again, as after a kill,
    resumes from the step-2 checkpoint to step 4."""
    run = tmp_path / "run"

    def launch(max_steps: int) -> str:
        values = {"NNODES": 1, "NPROC_PER_NODE": 2, "NODE_RANK": 0, "MASTER_ADDR": "127.0.0.1",
                  "MASTER_PORT": _free_port(), "CONFIG": "configs/dit/tiny.yaml"}  # fmt: skip
        cmd = torchrun_command(values, python=sys.executable) + [
            f"--data.init_args.train_shards={latent_data / 'lat/train'}",
            f"--data.init_args.val_shards={latent_data / 'lat/val'}", f"--trainer.default_root_dir={run}",
            f"--trainer.max_steps={max_steps}", "--trainer.enable_progress_bar=false",
        ]  # fmt: skip
        env = {**os.environ, **ONE_THREAD, "PYTHONUNBUFFERED": "1",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}  # fmt: skip
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)  # fmt: skip
        try:
            out, _ = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            pytest.fail(f"torchrun still running after 300 s:\n{out[-4000:]}")
        assert proc.returncode == 0, out[-6000:]
        return out

    launch(2)
    first = torch.load(run / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert first["global_step"] == 2
    out = launch(4)
    assert "Restoring states from the checkpoint" in out, out[-3000:]
    last = torch.load(run / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 4
    # both runs validated over both ranks (every sample of the 6-sample split once)
    assert last_scalars(run)["val/samples"] == 6


def _sbatch_options(text: str) -> dict[str, str]:
    options = {}
    for line in text.splitlines():
        if line.startswith("#SBATCH "):
            key, _, value = line[len("#SBATCH ") :].partition("=")
            options[key] = value
    return options


def _srun_line(text: str) -> str:
    joined = text.replace("\\\n", " ")
    (line,) = [ln.strip() for ln in joined.splitlines() if ln.strip().startswith("srun ")]
    return line


def test_sbatch_script_is_the_docs_and_lints():
    text = SBATCH.read_text()
    assert recipe("sbatch") == text  # the page shows the shipped script, verbatim
    r = subprocess.run(["bash", "-n", str(SBATCH)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert text.startswith("#!/bin/bash\n") and os.access(SBATCH, os.X_OK)
    options = _sbatch_options(text)
    assert options["--nodes"] == "2" and options["--ntasks-per-node"] == options["--gpus-per-node"] == "8"
    assert options["--signal"].startswith("SIGUSR1@") and "--requeue" in options
    # every #SBATCH line precedes the first command (sbatch stops reading them there)
    lines = text.splitlines()
    first_command = next(i for i, ln in enumerate(lines) if ln and not ln.startswith("#"))
    assert all(i < first_command for i, ln in enumerate(lines) if ln.startswith("#SBATCH"))
    # srun runs a real gspn subcommand with a config that exists
    from gspn_lightning.cli import COMMANDS

    args = shlex.split(_srun_line(text))
    assert args[:4] == ["srun", ".venv/bin/python", "-m", "gspn_lightning.cli"] and args[4] in COMMANDS
    default = re.search(r'CONFIG="\$\{1:-([^}]+)\}"', text).group(1)
    assert (ROOT / default).is_file()


@pytest.fixture
def process_state():
    """Building a Trainer as rank 11 of 16 sets process-wide state that outlives the test: Lightning's
    ``rank_zero_only.rank`` (which would silence every later ``rank_zero_warn`` and rank-0 log in this
    worker) and environment variables such as ``MASTER_ADDR`` (which a later DDP subprocess would
    inherit, and wait on a node that does not exist).  Both are restored afterwards."""
    from lightning_utilities.core.rank_zero import rank_zero_only

    env, rank = dict(os.environ), getattr(rank_zero_only, "rank", None)
    yield
    os.environ.clear()
    os.environ.update(env)
    rank_zero_only.rank = rank


def test_sbatch_command_line_inside_a_slurm_allocation(monkeypatch, process_state):
    """The script's ``gspn fit`` line as Lightning reads it in task 11 of a 2 x 8 allocation: SLURM
    detected, 16 ranks, this one rank 11 (node 1, local 3), the master on the first node, the log
    version the job id. (On the CPU: this machine has no GPUs; the ranks are what is checked.)"""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    from gspn_lightning.cli.lightning import main

    text = SBATCH.read_text()
    slurm = {"SLURM_NTASKS": "16", "SLURM_JOB_NAME": "gspn-fit", "SLURM_NODELIST": "gpu[01-02]",
             "SLURM_PROCID": "11", "SLURM_LOCALID": "3", "SLURM_NODEID": "1", "SLURM_JOB_NUM_NODES": "2",
             "SLURM_NTASKS_PER_NODE": "8", "SLURM_JOB_ID": "777", "SLURM_CPUS_PER_TASK": "10"}  # fmt: skip
    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    default = re.search(r'CONFIG="\$\{1:-([^}]+)\}"', text).group(1)
    line = _srun_line(text).replace('"$CONFIG"', str(ROOT / default)).replace(' "$@"', "")
    args = shlex.split(os.path.expandvars(line))
    fit = args.index("fit")
    rest = args[fit + 1 :]
    i = rest.index("--ckpt_path")  # (a fit option: the instantiation below runs no subcommand)
    assert rest[i + 1] == "last"
    del rest[i : i + 2]
    monkeypatch.setattr(sys, "argv", ["gspn"])
    with torch.device("meta"):
        cli = main(args=rest + ["--trainer.accelerator=cpu", "--trainer.precision=32-true"], run=False)
    trainer = cli.trainer
    env = trainer._accelerator_connector.cluster_environment
    assert isinstance(env, SLURMEnvironment)
    assert (trainer.world_size, trainer.global_rank, trainer.node_rank, trainer.local_rank) == (16, 11, 1, 3)
    assert env.main_address == "gpu01" and trainer.logger.version == 777
