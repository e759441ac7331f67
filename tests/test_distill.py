"""SD-XL distillation (gspn_lightning.tasks.distill) on the tiny SD-XL folder: what trains and what is
saved, the loss terms against an independent computation, gradient checkpointing, precomputed prompt
embeddings, caption dropout, the folder errors, the GSPN export, the configs, and (slow) fit / resume /
export through cli.py."""

from __future__ import annotations

import copy
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from gspn_lightning.data.captions import DecodeCaption, collate_captions
from gspn_lightning.data.write_shards import write_shards
from gspn_lightning.models.sdxl import (
    GSPNSelfAttention,
    example_inputs,
    load_gspn_weights,
    swap_self_attention,
)
from gspn_lightning.models.sdxl_pipeline import encode_prompt, load_sdxl
from gspn_lightning.tasks.base import param_groups
from gspn_lightning.tasks.checkpointing import CheckpointMismatchError
from gspn_lightning.tasks.distill import DistillationTask
from tests.cli_helpers import ONE_THREAD, run_cli_chain, scalar_series

ROOT = Path(__file__).resolve().parents[1]
SIZES = [(96, 64), (64, 112)]  # portrait and landscape sources, cropped to 64x64


def _png(rng, h, w) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _samples(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    for i in range(n):
        h, w = SIZES[i % 2]
        yield {"__key__": f"s{seed}_{i}", "png": _png(rng, h, w), "txt": f"a photo of thing {i}".encode()}


def _batch(n: int = 2, seed: int = 0) -> dict:
    dec = DecodeCaption((64, 64))
    batch = collate_captions([dec(s) for s in _samples(n, seed)])
    assert (batch["label"] == 0).all()
    return batch


def _task(folder, **kwargs) -> DistillationTask:
    torch.manual_seed(0)
    ema = {"ema_decay": kwargs.pop("ema_decay", 0.9)}
    kwargs = {"mixer": {"d_state": 4}, "optim": ema, **kwargs}
    return DistillationTask(str(folder), **kwargs)


@pytest.fixture(scope="module")
def task(tiny_sdxl_dir):
    return _task(tiny_sdxl_dir)


def _gspn_param_ids(model) -> set[int]:
    return {id(p) for m in model.modules() if isinstance(m, GSPNSelfAttention) for p in m.parameters()}


def test_only_gspn_trains_and_checkpoints_hold_only_what_trains(task, tiny_sdxl_dir):
    student, teacher = task.model, task.teacher
    assert len(task.gspn_names) == 11 and all(n.endswith(".attn1") for n in task.gspn_names)
    trainable = {id(p) for p in task.parameters() if p.requires_grad}
    assert trainable == _gspn_param_ids(student) and trainable
    assert not any(p.requires_grad for p in teacher.parameters())
    assert not any(isinstance(m, GSPNSelfAttention) for m in teacher.modules())  # the teacher is the original
    # one copy of the frozen weights: the student's frozen parameters are the teacher's own tensors
    frozen = [(n, p) for n, p in student.named_parameters() if not p.requires_grad]
    assert frozen and all(p is teacher.get_parameter(n) for n, p in frozen)
    assert task.shared_with_teacher == sum(p.numel() for _, p in frozen)
    in_optimizer = {id(p) for group in param_groups(task.model, 0.0) for p in group["params"]}
    assert in_optimizer == trainable
    # the checkpoint's state dict: the GSPN modules and their EMA, nothing frozen
    checkpoint = {"state_dict": task.state_dict()}
    task.on_save_checkpoint(checkpoint)
    saved = checkpoint["state_dict"]
    gspn_keys = {f"model.{n}.{k}" for n in task.gspn_names for k in student.get_submodule(n).state_dict()}
    ema_keys = {"ema.module." + k[len("model.") :] for k in gspn_keys}
    assert set(saved) == gspn_keys | ema_keys
    full = sum(v.numel() for v in task.state_dict().values())
    assert sum(v.numel() for v in saved.values()) < 0.2 * full
    task.on_load_checkpoint(checkpoint)  # complete: accepted
    del saved[sorted(gspn_keys)[0]]
    with pytest.raises(ValueError, match="does not match this DistillationTask.*missing"):
        task.on_load_checkpoint(checkpoint)
    # trainable: all trains the whole student (and still never the teacher)
    everything = _task(tiny_sdxl_dir, trainable="all", ema_decay=None)
    assert {id(p) for p in everything.parameters() if p.requires_grad} == {
        id(p) for p in everything.model.parameters()
    }


def _independent_terms(task, batch, draws, alpha=0.5, beta=0.5):
    """The three terms recomputed here: own text encoding, own time ids, own hooks on every attn1."""
    parts_te = [task.text_encoder, task.text_encoder_2]
    with torch.no_grad():
        embeds, pooled = encode_prompt(task.tokenizers, parts_te, list(batch["caption"]))
    rows = [
        [*batch["original_size"][i].tolist(), *batch["crop_top_left"][i].tolist(), 64, 64]
        for i in range(len(batch["caption"]))
    ]
    time_ids = torch.tensor(rows, dtype=torch.float32)
    sched = task.noise_scheduler
    abar = sched.alphas_cumprod[draws["t"]].view(-1, 1, 1, 1)
    noisy = abar.sqrt() * draws["latents"] + (1 - abar).sqrt() * draws["noise"]

    def run(unet):
        names = [n for n, m in unet.named_modules() if n.endswith("attn1")]
        feats = {}
        hooks = [
            unet.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: feats.__setitem__(n, o))
            for n in names
        ]
        try:
            cond = {"text_embeds": pooled, "time_ids": time_ids}
            eps = unet(noisy, draws["t"], encoder_hidden_states=embeds, added_cond_kwargs=cond).sample
        finally:
            for h in hooks:
                h.remove()
        return eps, feats

    with torch.no_grad():
        eps_t, f_t = run(task.teacher)
        eps_s, f_s = run(task.model)
    assert sorted(f_t) == sorted(f_s) == sorted(task.gspn_names)
    noise = F.mse_loss(eps_s, draws["noise"])
    distill = F.mse_loss(eps_s, eps_t)
    layer = sum(F.mse_loss(f_s[n], f_t[n]) for n in f_t) / len(f_t)
    loss = noise + alpha * distill + beta * layer
    return {
        "noise": noise,
        "distill": distill,
        "layer": layer,
        "loss": loss,
        "teacher_noise": F.mse_loss(eps_t, draws["noise"]),
    }


def test_loss_terms_against_an_independent_computation(task):
    batch = _batch()
    assert batch["original_size"].tolist() == [[96, 64], [64, 112]]
    assert batch["crop_top_left"].tolist() == [[16, 0], [0, 24]]
    draws = task.draw(batch, torch.Generator().manual_seed(3), train=False)
    assert not draws["drop"].any()
    with torch.no_grad():
        got = task.losses(task.model, batch, draws=draws)
    want = _independent_terms(task, batch, draws)
    for k in got:
        assert got[k].item() == pytest.approx(want[k].item(), rel=1e-5), k
    assert got["distill"] > 0 and got["layer"] > 0
    # the student made equal to the teacher: both distillation terms vanish, the denoising term is the teacher's
    twin = copy.deepcopy(task)
    for name in twin.gspn_names:
        parent, _, leaf = name.rpartition(".")
        setattr(twin.model.get_submodule(parent), leaf, copy.deepcopy(twin.teacher.get_submodule(name)))
    with torch.no_grad():
        same = twin.losses(twin.model, batch, draws=draws)
    assert (
        same["distill"].item() < 1e-6 * got["distill"].item()
        and same["layer"].item() < 1e-6 * got["layer"].item()
    )
    assert same["noise"].item() == pytest.approx(want["teacher_noise"].item(), rel=1e-5)
    assert same["noise"].item() != pytest.approx(got["noise"].item(), rel=1e-3)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_sdxl_dir):
    batch = _batch()
    grads = []
    for checkpointing in (False, True):
        t = _task(tiny_sdxl_dir, gradient_checkpointing=checkpointing, ema_decay=None)
        assert t.model.is_gradient_checkpointing == checkpointing
        draws = t.draw(batch, torch.Generator().manual_seed(1), train=True)
        t.losses(t.model, batch, draws=draws)["loss"].backward()
        grads.append([p.grad for p in t.model.parameters() if p.requires_grad])
    assert all(g is not None for g in grads[1]) and any(g.abs().sum() > 0 for g in grads[1])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_precomputed_embeddings_and_caption_dropout(task, tiny_sdxl_dir):
    batch = _batch()
    with torch.no_grad():
        embeds, pooled = encode_prompt(
            task.tokenizers, [task.text_encoder, task.text_encoder_2], batch["caption"]
        )
    stored = dict(batch, prompt_embeds=embeds.half().float(), pooled_prompt_embeds=pooled.half().float())
    no_text = _task(tiny_sdxl_dir, text_encoders=False)
    assert no_text.text_encoder is None
    draws = task.draw(batch, torch.Generator().manual_seed(5), train=False)
    with torch.no_grad():
        a = task.losses(task.model, batch, draws=draws)
        b = no_text.losses(no_text.model, stored, draws=draws)
    assert b["loss"].item() == pytest.approx(a["loss"].item(), rel=1e-2)  # float16 storage
    with pytest.raises(ValueError, match="no prompt_embeds.*text_encoders"):
        no_text.losses(no_text.model, batch, draws=draws)
    # dropout: zeros (default) or the empty prompt, only in the dropped rows
    drop = torch.tensor([True, False])
    e, p = task.text_conditioning(batch, drop)
    assert e[0].abs().sum() == 0 and p[0].abs().sum() == 0
    torch.testing.assert_close(e[1], embeds[1]) and torch.testing.assert_close(p[1], pooled[1])
    empty = _task(tiny_sdxl_dir, uncond="empty", ema_decay=None)
    e, p = empty.text_conditioning(batch, drop)
    with torch.no_grad():
        e0, p0 = encode_prompt(task.tokenizers, [task.text_encoder, task.text_encoder_2], [""])
    torch.testing.assert_close(e[0], e0[0]) and torch.testing.assert_close(e[1], embeds[1])
    # in training about caption_dropout of the rows are dropped
    half = _task(tiny_sdxl_dir, caption_dropout=0.5, ema_decay=None)
    big = collate_captions([DecodeCaption((64, 64))(s) for s in _samples(2)] * 100)
    g = torch.Generator().manual_seed(0)
    frac = half.draw(big, g, train=True)["drop"].float().mean().item()
    assert 0.4 < frac < 0.6


def test_missing_or_incomplete_folder_is_one_clear_error(tiny_sdxl_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="SD-XL folder not found"):
        DistillationTask(str(tmp_path / "nowhere"))
    broken = tmp_path / "broken"
    shutil.copytree(tiny_sdxl_dir, broken)
    for f in (broken / "vae").glob("diffusion_pytorch_model*"):
        f.unlink()
    shutil.rmtree(broken / "tokenizer_2")
    with pytest.raises(FileNotFoundError, match="(?s)vae/diffusion_pytorch_model.*tokenizer_2"):
        DistillationTask(str(broken))
    # without the text encoders, the text side of the folder is not needed
    shutil.copytree(tiny_sdxl_dir / "vae", broken / "vae", dirs_exist_ok=True)
    DistillationTask(str(broken), text_encoders=False, optim={"ema_decay": None})
    with pytest.raises(ValueError, match="trainable"):
        DistillationTask(str(tiny_sdxl_dir), trainable="gates")
    with pytest.raises(ValueError, match="optim.ema_scope must be trainable"):
        DistillationTask(str(tiny_sdxl_dir), optim={"ema_scope": "all"})


@pytest.mark.filterwarnings("ignore:Found keys that are in the model state dict")  # the frozen ones
def test_local_by_default_and_an_old_checkpoint_stays_global(task, tiny_sdxl_dir, tmp_path):
    """``mixer`` without ``chunk_size`` swaps local (chunk 4), recorded in the hyper-parameters; a
    checkpoint that records no ``chunk_size`` (written when the default was global) is global: refused
    by a local run, naming the difference, and rebuilt global by ``load_from_checkpoint``."""
    import lightning

    assert task.hparams.mixer == {"chunk_size": 4, "d_state": 4}
    assert {task.model.get_submodule(n).chunk_size for n in task.gspn_names} == {4}
    checkpoint = {"state_dict": task.state_dict(), "hyper_parameters": copy.deepcopy(dict(task.hparams)),
                  "pytorch-lightning_version": lightning.__version__}  # fmt: skip
    task.on_save_checkpoint(checkpoint)
    task.on_load_checkpoint(copy.deepcopy(checkpoint))  # its own: accepted
    old = copy.deepcopy(checkpoint)
    old["hyper_parameters"]["mixer"] = {"d_state": 4}
    with pytest.raises(CheckpointMismatchError, match="mixer.chunk_size: checkpoint None, this run 4"):
        task.on_load_checkpoint(copy.deepcopy(old))
    path = tmp_path / "old.ckpt"
    torch.save(old, path)
    loaded = DistillationTask.load_from_checkpoint(path, map_location="cpu")
    assert loaded.hparams.mixer == {"chunk_size": None, "d_state": 4}
    assert {loaded.model.get_submodule(n).chunk_size for n in loaded.gspn_names} == {None}
    torch.save(checkpoint, path)  # a current one: as recorded
    loaded = DistillationTask.load_from_checkpoint(path, map_location="cpu")
    assert {loaded.model.get_submodule(n).chunk_size for n in loaded.gspn_names} == {4}


def test_exported_gspn_weights_reload_to_identical_outputs(task, tiny_sdxl_dir, tmp_path):
    with torch.no_grad():  # move the weights away from their initialisation first
        for p in task.model.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
        task.ema.update(task.model)
    raw, ema = task.export_gspn(tmp_path)
    assert raw.name == "gspn.safetensors" and ema.name == "gspn_ema.safetensors"
    sample, t, kwargs = example_inputs(task.model, 8, 16, batch=2, generator=torch.Generator().manual_seed(2))
    outputs = {}
    for path, net in ((raw, task.model), (ema, task.ema.module)):
        fresh = load_sdxl(tiny_sdxl_dir, parts=("unet",)).unet
        swap_self_attention(fresh, d_state=4)  # local (chunk 4), as the task's default
        load_gspn_weights(fresh, path)
        with torch.no_grad():
            outputs[path.name] = net(sample, t, **kwargs).sample
            assert torch.equal(fresh(sample, t, **kwargs).sample, outputs[path.name])
    assert not torch.equal(outputs["gspn.safetensors"], outputs["gspn_ema.safetensors"])


# --------------------------------------------------------------------------------------------------
# configs and cli
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def caption_shards(tmp_path_factory):
    """Two captioned images (one portrait, one landscape) as both training and validation shards, so
    every training batch is the same fixed batch."""
    root = tmp_path_factory.mktemp("captions")
    write_shards(_samples(2), root / "train", maxcount=2, progress=False, labelled=False)
    write_shards(_samples(2), root / "val", maxcount=1, progress=False, labelled=False)
    return root


#: the SD-XL configs the tests below instantiate (tests/test_cli.py checks every shipped one is covered)
SDXL_CONFIGS = ["tiny.yaml", "distill.yaml"]
SDXL_OVERLAYS = ["overlays/fsdp.yaml"]


@pytest.mark.parametrize("config", SDXL_CONFIGS)
def test_sdxl_configs_instantiate(config, tiny_sdxl_dir, caption_shards, monkeypatch):
    from gspn_lightning.cli.lightning import main

    monkeypatch.setattr(sys, "argv", ["cli.py"])
    args = [
        "--config", str(ROOT / "configs/sdxl" / config), f"--model.init_args.pretrained={tiny_sdxl_dir}",
        f"--data.init_args.train_shards={caption_shards / 'train'}",
        f"--data.init_args.val_shards={caption_shards / 'val'}",
        "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.strategy=auto",
        "--model.init_args.mixer.chunk_size", "2",  # a command-line value arrives as a string
        "--model.init_args.optim.lr", "3e-4",
    ]  # fmt: skip
    cli = main(args=args, run=False)
    task, dm = cli.model, cli.datamodule
    assert task.hparams.mixer["chunk_size"] == 2  # read as YAML, typed in the checkpoint
    assert {task.model.get_submodule(n).chunk_size for n in task.gspn_names} == {2}
    # the config itself says the swap's default, local chunk 4 (the command line above overrides it)
    raw = __import__("yaml").safe_load((ROOT / "configs/sdxl" / config).read_text())
    assert raw["model"]["init_args"]["mixer"]["chunk_size"] == 4
    # the optim group: the command line's lr over the config's, the task's defaults under both
    assert task.optim.lr == 3e-4 and task.optim.ema_scope == "trainable" and task.hparams.optim["lr"] == 3e-4
    assert type(task).__name__ == "DistillationTask" and type(dm).__name__ == "CaptionWebDataModule"
    assert (task.hparams.alpha, task.hparams.beta, task.hparams.trainable) == (0.5, 0.5, "gspn")
    if config == "distill.yaml":  # the real recipe: 1024^2, bf16-mixed, gradient checkpointing, DDP
        raw = __import__("yaml").safe_load((ROOT / "configs/sdxl/distill.yaml").read_text())
        assert raw["trainer"]["precision"] == "bf16-mixed" and raw["trainer"]["strategy"] == "ddp"
        assert dm.resolution == (1024, 1024) and task.hparams.gradient_checkpointing
        assert task.model.is_gradient_checkpointing


def test_fsdp_overlay_parses(tiny_sdxl_dir, caption_shards, monkeypatch):
    from gspn_lightning.cli.lightning import main

    monkeypatch.setattr(sys, "argv", ["cli.py"])
    args = [
        "--config", str(ROOT / "configs/sdxl/distill.yaml"), "--config", str(ROOT / "configs/sdxl" / SDXL_OVERLAYS[0]),
        f"--model.init_args.pretrained={tiny_sdxl_dir}", f"--data.init_args.train_shards={caption_shards / 'train'}",
    ]  # fmt: skip
    if torch.cuda.is_available():
        cli = main(args=args + ["--trainer.devices=1"], run=False)
        assert type(cli.trainer.strategy).__name__ == "FSDPStrategy"
    else:  # parsed and the strategy built: only the accelerator check refuses it on a CPU machine
        with pytest.raises(ValueError, match="fsdp.*requires a GPU"):
            main(args=args + ["--trainer.accelerator=cpu", "--trainer.devices=1"], run=False)


def _run(args, timeout=900):
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env=dict(os.environ, **ONE_THREAD),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _metric(run: Path, name: str) -> list[float]:
    return scalar_series(run, name)


@pytest.mark.slow
def test_fit_lowers_the_loss_resume_continues_exactly_and_exports(tiny_sdxl_dir, caption_shards, tmp_path):
    """Pure distillation from the tiny random teacher (noise_weight 0: its own denoising is meaningless)
    on one fixed batch: the validation loss (a fixed draw) after 8 steps is below the step-0 loss. A run
    resumed from the step-4 checkpoint ends with bit-identical GSPN weights to the uninterrupted run."""
    common = [
        "--config", "configs/sdxl/tiny.yaml", f"--model.init_args.pretrained={tiny_sdxl_dir}",
        f"--data.init_args.train_shards={caption_shards / 'train'}",
        f"--data.init_args.val_shards={caption_shards / 'val'}", "--data.init_args.epoch_samples=8",
        "--model.init_args.noise_weight=0", "--model.init_args.caption_dropout=0",
        "--trainer.max_steps=8", "--trainer.val_check_interval=4", "--checkpoint.every_n_train_steps=4",
        "--checkpoint.save_top_k=-1",
    ]  # fmt: skip
    run = tmp_path / "run"
    # the step-0 validation and the fit in one process (one interpreter start-up fewer); the resumed
    # fit below runs in its own
    run_cli_chain(
        ["validate", *common, f"--trainer.default_root_dir={run / 'step0'}"],
        ["fit", *common, f"--trainer.default_root_dir={run}"],
        cwd=ROOT,
    )
    (initial,) = _metric(run / "step0", "val/loss")
    val = _metric(run, "val/loss")
    assert len(val) == 2 and val[-1] < 0.97 * initial, (initial, val)
    assert len(_metric(run, "train/layer_step")) == 8 and len(_metric(run, "val_ema/loss")) == 2
    ckpt = torch.load(run / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 8
    assert not any(k.startswith(("teacher.", "vae.", "text_encoder")) for k in ckpt["state_dict"])
    assert all(".attn1." in k for k in ckpt["state_dict"])

    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    (step4,) = (run / "checkpoints").glob("*step=4.ckpt")
    shutil.copy(step4, resumed / "checkpoints" / step4.name)
    r = _run(["cli.py", "fit", *common, f"--trainer.default_root_dir={resumed}", "--ckpt_path=last"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resolved to" in r.stdout + r.stderr
    again = torch.load(resumed / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert again["global_step"] == 8 and set(again["state_dict"]) == set(ckpt["state_dict"])
    for k, v in ckpt["state_dict"].items():
        assert torch.equal(v, again["state_dict"][k]), k

    from safetensors.torch import load_file

    a, b = load_file(run / "gspn/gspn_ema.safetensors"), load_file(resumed / "gspn/gspn_ema.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the export command rebuilds the task from the checkpoint (the folder in its hyper-parameters)
    r = _run(
        [
            "-m",
            "gspn_lightning.cli",
            "distill-export",
            str(run / "checkpoints/last.ckpt"),
            str(tmp_path / "x"),
        ]
    )
    assert r.returncode == 0, r.stderr[-3000:]
    c = load_file(tmp_path / "x/gspn_ema.safetensors")
    assert all(torch.equal(a[k], c[k]) for k in a)
