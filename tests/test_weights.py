"""Starting a task from existing weights (``init_from``, every task) and the training switches shared
by the tasks: ``activation_checkpointing``, ``compile`` and the EMA warm-up (gspn_lightning.tasks.base)."""

from __future__ import annotations

import sys

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from gspn_lightning.models import save_pretrained
from gspn_lightning.tasks import ClassificationTask, DiffusionTask
from gspn_lightning.tasks.base import OptimSettings
from gspn_lightning.tasks.ema import ModelEMA

pytestmark = pytest.mark.usefixtures("torch_one_thread")

TINY_GSPN = {"embed_dim": 8, "depths": [1, 1, 1, 1], "mixer": {"d_state": 2, "dw_kernel": 3}}
#: no mixing, no scaling by the batch, a constant lr: a step is a plain AdamW step
PLAIN = {"base_batch_size": None, "warmup_epochs": 0.0, "schedule": "constant", "lr": 1e-2, "ema_decay": 0.9}


def classifier(num_classes=10, **kwargs) -> ClassificationTask:
    kwargs.setdefault("optim", PLAIN)
    model_kwargs = {**TINY_GSPN, **kwargs.pop("model_kwargs", {})}
    return ClassificationTask(
        model="gspn_t", model_kwargs=model_kwargs, num_classes=num_classes, in_chans=1,
        mixup_alpha=0.0, cutmix_alpha=0.0, label_smoothing=0.0, **kwargs,
    )  # fmt: skip


def digits_loader(n=8, num_classes=10, seed=0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 1, 32, 32, generator=g), torch.randint(0, num_classes, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=4)


def trainer(max_steps: int) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
    )  # fmt: skip


def same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def trained_ckpt(tmp_path_factory):
    """A real checkpoint of a short classification run (3 steps: raw weights and EMA differ)."""
    torch.manual_seed(0)
    task = classifier()
    t = trainer(3)
    t.fit(task, digits_loader())
    path = tmp_path_factory.mktemp("src") / "src.ckpt"
    t.save_checkpoint(path)
    return path, task


# --------------------------------------------------------------------------------------------------
# init_from
# --------------------------------------------------------------------------------------------------


def test_classification_init_from_a_checkpoint_starts_fresh_from_its_weights(trained_ckpt, capsys):
    path, src = trained_ckpt
    assert not same(src.model, src.ema.module)
    torch.manual_seed(1)
    task = classifier(init_from=str(path))
    assert not same(task.model, src.ema.module)  # nothing is read before the trainer configures the model
    t = trainer(1)
    seen = {}

    class Before(L.Callback):
        def on_train_start(self, trainer, pl_module):
            seen["model"] = {k: v.clone() for k, v in pl_module.model.state_dict().items()}
            seen["ema"] = {k: v.clone() for k, v in pl_module.ema.module.state_dict().items()}
            seen["optimizer_state"] = len(trainer.optimizers[0].state)

    t.callbacks.append(Before())
    t.fit(task, digits_loader(seed=1))
    out = capsys.readouterr().out
    assert f"init_from {path} (ema weights of step 3): loaded {len(src.model.state_dict())} tensors" in out
    # the EMA weights of the source (its default), in the model and as the EMA's start
    source = src.ema.module.state_dict()
    assert all(torch.equal(seen["model"][k], source[k]) for k in source)
    assert all(torch.equal(seen["ema"][k], source[k]) for k in source)
    # weights only: a fresh optimiser and step count (the source had taken 3 steps)
    assert seen["optimizer_state"] == 0 and t.global_step == 1

    raw = classifier(init_from=str(path), init_weights="raw")
    raw.load_init_weights()
    assert same(raw.model, src.model) and same(raw.ema.module, src.model)


def test_classifier_with_a_new_head_is_strict_unless_told(trained_ckpt, capsys):
    path, src = trained_ckpt
    with pytest.raises(
        ValueError,
        match=r"init_strict: false.*shape mismatch \(2, .*head\.bias \(source \(10,\), model \(5,\)\)",
    ):
        classifier(num_classes=5, init_from=str(path)).load_init_weights()
    torch.manual_seed(2)
    fresh = classifier(num_classes=5)
    torch.manual_seed(2)
    task = classifier(num_classes=5, init_from=str(path), init_strict=False)
    report = task.load_init_weights()
    assert [k for k, _, _ in report.mismatched] == ["head.bias", "head.weight"]
    assert not report.missing and not report.unexpected
    out = capsys.readouterr().out
    assert "shape mismatch (2, keep their fresh values): head.bias (source (10,), model (5,))" in out
    own, source = task.model.state_dict(), src.ema.module.state_dict()
    for k in own:
        expected = fresh.model.state_dict()[k] if k.startswith("head.") else source[k]
        assert torch.equal(own[k], expected), k
    # keys the model does not have are listed as unexpected, and refused when strict
    deeper = classifier(model_kwargs={"depths": [1, 1, 1, 2]})
    shallower_path = path.parent / "shallow.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in deeper.model.state_dict().items()}, str(shallower_path))
    with pytest.raises(
        ValueError, match=r"unexpected \(\d+, not loaded\): stages\.3\.blocks\.1\..* \(not in this model\)"
    ):
        classifier(init_from=str(shallower_path)).load_init_weights()
    with pytest.raises(ValueError, match="init_weights: ema chooses between a checkpoint's weights"):
        classifier(init_from=str(shallower_path), init_weights="ema").load_init_weights()
    with pytest.raises(FileNotFoundError, match="init_from: no such file"):
        classifier(init_from=str(path.parent / "nowhere.ckpt")).load_init_weights()


def test_a_resume_restores_its_checkpoint_over_init_from(trained_ckpt, tmp_path, capsys):
    path, src = trained_ckpt
    other = classifier()  # other weights, as a save_pretrained folder
    folder = save_pretrained(other.model, tmp_path / "other")
    task = classifier(init_from=str(folder))
    t = trainer(3)  # the checkpoint is at step 3: nothing more to train
    t.fit(task, digits_loader(), ckpt_path=str(path))
    assert "whose weights replace those of init_from" in capsys.readouterr().out
    assert same(task.model, src.model) and same(task.ema.module, src.ema.module)


def test_init_from_takes_a_code_free_file_only(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("ran",))

    bad = tmp_path / "bad.ckpt"
    torch.save({"state_dict": {"model.x": torch.zeros(1)}, "evil": Evil()}, bad)
    from gspn_lightning.tasks.checkpointing import UnsafeCheckpointError

    with pytest.raises(UnsafeCheckpointError, match="nothing in it was executed"):
        classifier(init_from=str(bad)).load_init_weights()


def dit_task(**kwargs) -> DiffusionTask:
    kwargs.setdefault("optim", PLAIN)
    model_kwargs = {
        "hidden_size": 16,
        "depth": 2,
        "mixer": {"dw_kernel": 3},
        **kwargs.pop("model_kwargs", {}),
    }
    model_kwargs = {k: v for k, v in model_kwargs.items() if v is not None}  # (DiT has no mixer)
    kwargs.setdefault("num_classes", 3)
    return DiffusionTask(model=kwargs.pop("model", "gspn_dit_s_2"), model_kwargs=model_kwargs, in_chans=2,
                         image_size=8, **kwargs)  # fmt: skip


def test_diffusion_init_from_a_save_pretrained_folder(tmp_path, capsys):
    torch.manual_seed(0)
    src = dit_task()
    folder = save_pretrained(src.model, tmp_path / "gspn_dit")
    torch.manual_seed(1)
    task = dit_task(init_from=str(folder))
    task.configure_model()  # what the trainer calls before the optimiser and any step
    assert same(task.model, src.model) and same(task.ema.module, src.model)
    assert f"init_from {folder}: loaded {len(src.model.state_dict())} tensors" in capsys.readouterr().out
    # another number of classes: the label table differs, named
    with pytest.raises(
        ValueError,
        match=r"shape mismatch \(1, .*y_embed\.table\.weight \(source \(4, 16\), model \(6, 16\)\)",
    ):
        dit_task(num_classes=5, init_from=str(folder)).load_init_weights()
    # the DiT baseline from GSPN-DiT weights, not strict: the conditioning and output layers they share
    dit = dit_task(
        model="dit_s_2",
        model_kwargs={"num_heads": 2, "mixer": None},
        init_from=str(folder),
        init_strict=False,
    )
    report = dit.load_init_weights()
    assert report.loaded and all(
        k.split(".")[0] in ("patch_embed", "t_embed", "y_embed", "final") for k in report.loaded
    )
    assert report.missing and all(k.startswith("blocks.") for k in report.missing)
    assert "(not in this model)" in capsys.readouterr().out
    # nothing in common (a classifier's weights) is an error even when not strict
    classifier_folder = save_pretrained(classifier().model, tmp_path / "classifier")
    with pytest.raises(ValueError, match="loaded 0; .*nothing in common|loaded 0"):
        dit_task(init_from=str(classifier_folder), init_strict=False).load_init_weights()


def _doc_yaml(page: str) -> dict:
    """The first YAML block of a docs page after its "Starting from weights" text, parsed."""
    import re

    import yaml

    text = (REPO / "docs" / page).read_text()
    text = text[text.index("init_from") :]
    import textwrap

    block = re.search(r"```yaml\n(.*?)^\s*```", text, flags=re.S | re.M).group(1)
    return yaml.safe_load(textwrap.dedent(block))


REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "page, config", [("classification.md", "configs/classification/debug_mnist.yaml"), ("generation.md", "configs/dit/tiny.yaml")]
)
def test_the_documented_yaml_configures_the_task_as_written(page, config, tmp_path, monkeypatch):
    """The docs' YAML block, as a second --config over a shipped one (only the path made real)."""
    from gspn_lightning.cli.lightning import main

    overlay = _doc_yaml(page)
    args = overlay["model"]["init_args"]
    assert {"init_from", "compile", "activation_checkpointing", "optim"} <= set(args)
    source = tmp_path / __import__("pathlib").Path(args["init_from"]).name  # the documented kind of source
    args["init_from"] = str(source)
    (tmp_path / "overlay.yaml").write_text(__import__("yaml").safe_dump(overlay))
    monkeypatch.setattr(sys, "argv", ["cli.py"])
    cli = main(args=["--config", str(REPO / config), "--config", str(tmp_path / "overlay.yaml")], run=False)
    task = cli.model
    assert task._init_from == (str(source), args.get("init_strict", True), args.get("init_weights"))
    flags = [m.grad_checkpointing for m in task.model.modules() if hasattr(m, "grad_checkpointing")]
    assert task._compile and flags and all(flags)
    assert task.optim.ema_warmup and task.ema.warmup_power == pytest.approx(2 / 3)
    # the source the page names (a run's .ckpt, or an export folder) loads with the page's keys
    if source.suffix == ".ckpt":
        torch.save({"state_dict": task.state_dict(), "global_step": 0}, source)
    else:
        save_pretrained(task.model, source)
    assert task.load_init_weights().exact


def test_task_configs_take_init_from_on_the_command_line(trained_ckpt, monkeypatch):
    from gspn_lightning.cli.lightning import main

    path, _ = trained_ckpt
    monkeypatch.setattr(sys, "argv", ["cli.py"])
    config = "configs/classification/debug_mnist.yaml"
    cli = main(args=["--config", config, f"--model.init_args.init_from={path}", "--model.init_args.init_strict=false",
                     "--model.init_args.init_weights=raw", "--model.init_args.activation_checkpointing=true",
                     "--model.init_args.compile=true", "--model.init_args.optim.ema_warmup=true"], run=False)  # fmt: skip
    task = cli.model
    assert task._init_from == (str(path), False, "raw") and task._compile
    assert all(stage.grad_checkpointing for stage in task.model.stages)
    assert task.optim.ema_warmup and task.ema.warmup_power == pytest.approx(2 / 3)


# --------------------------------------------------------------------------------------------------
# activation checkpointing and compile
# --------------------------------------------------------------------------------------------------


def classification_loss_and_grads(task, x, y):
    task.model.train()
    torch.manual_seed(5)  # drop path draws from the global RNG: the same draws in both runs
    loss = F.cross_entropy(task.model(x), y)
    grads = torch.autograd.grad(loss, list(task.model.parameters()))
    return loss.detach(), grads


def diffusion_loss_and_grads(task, x, y):
    task.model.train()
    g = torch.Generator().manual_seed(3)
    model = lambda *a, **k: task.model(*a, generator=torch.Generator().manual_seed(4), **k)  # noqa: E731
    loss = task.diffusion.training_losses(model, x, y, generator=g)["loss"].mean()
    grads = torch.autograd.grad(loss, list(task.model.parameters()))
    return loss.detach(), grads


CASES = {
    "gspn_t": (lambda **k: classifier(model_kwargs={"drop_path_rate": 0.3}, **k), classification_loss_and_grads,
               (torch.randn(2, 1, 32, 32), torch.tensor([1, 7]))),
    "gspn_dit": (lambda **k: dit_task(model_kwargs={"drop_path_rate": 0.3}, **k), diffusion_loss_and_grads,
                 (torch.randn(2, 2, 8, 8), torch.tensor([0, 2]))),
    "dit": (lambda **k: dit_task(model="dit_s_2", model_kwargs={"num_heads": 2, "mixer": None}, **k),
            diffusion_loss_and_grads, (torch.randn(2, 2, 8, 8), torch.tensor([0, 2]))),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_activation_checkpointing_gives_the_same_loss_and_gradients(case, monkeypatch):
    import gspn_lightning.nn.checkpointing as mod

    build, loss_and_grads, inputs = CASES[case]
    calls = []
    original = mod.checkpoint

    def counting(fn, *a, **k):  # every block goes through torch.utils.checkpoint (counted)
        calls.append(type(fn).__name__)
        return original(fn, *a, **k)

    monkeypatch.setattr(mod, "checkpoint", counting)
    results = []
    for on in (False, True):
        torch.manual_seed(0)
        task = build(activation_checkpointing=on)
        results.append(loss_and_grads(task, *inputs))
        blocks = [
            m for m in task.model.modules() if type(m).__name__ in ("GSPNBlock", "GSPNDiTBlock", "DiTBlock")
        ]
        assert len(calls) == (len(blocks) if on else 0) and len(blocks) >= 2, calls
    assert all("Block" in c for c in calls)
    (loss0, grads0), (loss1, grads1) = results
    assert torch.equal(loss0, loss1)
    assert any(g.abs().sum() > 0 for g in grads0)
    for a, b in zip(grads0, grads1):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["gspn_t", "dit"])
def test_compile_gives_the_same_loss_and_gradients(case):
    build, loss_and_grads, inputs = CASES[case]
    torch.manual_seed(0)
    plain = build()
    torch.manual_seed(0)
    compiled = build(compile=True)
    compiled.configure_model()
    assert compiled.model._compiled_call_impl is not None
    assert compiled.model.state_dict().keys() == plain.model.state_dict().keys()  # checkpoints unchanged
    loss0, grads0 = loss_and_grads(plain, *inputs)
    loss1, grads1 = loss_and_grads(compiled, *inputs)
    torch.testing.assert_close(loss1, loss0, rtol=1e-4, atol=1e-5)
    for a, b in zip(grads0, grads1):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# EMA warm-up
# --------------------------------------------------------------------------------------------------


def test_ema_warmup_decay_grows_with_the_steps():
    model = torch.nn.Linear(2, 2)
    assert ModelEMA(model, 0.999).decay_at(1) == 0.999  # off by default: a fixed decay
    ema = ModelEMA(model, 0.999, warmup_power=2 / 3, warmup_gamma=1.0)
    decays = [ema.decay_at(s) for s in (1, 2, 3, 10, 100, 10**6)]
    expected = [min(0.999, 1 - (1 + (s - 1)) ** (-2 / 3)) for s in (1, 2, 3, 10, 100, 10**6)]
    assert decays == pytest.approx(expected) and decays[0] == 0.0 and decays[-1] == 0.999
    assert all(a < b for a, b in zip(decays[:-1], decays[1:-1] + [1.0]))
    # one update at step 3: ema = d * ema + (1 - d) * model with that step's decay
    before = ema.module.weight.clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model, step=3)
    d = ema.decay_at(3)
    torch.testing.assert_close(ema.module.weight, d * before + (1 - d) * model.weight)
    assert OptimSettings().ema_warmup is False
    with pytest.raises(ValueError, match="ema_warmup_power"):
        OptimSettings(ema_warmup_power=0.0)


@pytest.mark.parametrize("warmup", [False, True])
def test_ema_warmup_in_training_follows_the_optimizer_steps(warmup):
    """With the warm-up the first step's EMA is the weights (decay 0), the second's 1 - 2^(-2/3) of
    the way; without it the EMA moves by 1 - ema_decay."""
    torch.manual_seed(0)
    task = classifier(optim={**PLAIN, "ema_decay": 0.99, "ema_warmup": warmup})
    history = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            history.append(
                (pl_module.model.head.weight.detach().clone(), pl_module.ema.module.head.weight.clone())
            )

    start = task.ema.module.head.weight.clone()
    t = trainer(2)
    t.callbacks.append(Record())
    t.fit(task, digits_loader())
    (w1, e1), (w2, e2) = history
    d1, d2 = (0.0, 1 - 2 ** (-2 / 3)) if warmup else (0.99, 0.99)
    torch.testing.assert_close(e1, d1 * start + (1 - d1) * w1)
    torch.testing.assert_close(e2, d2 * e1 + (1 - d2) * w2)


# --------------------------------------------------------------------------------------------------
# distillation: from an exported adapter or another run's checkpoint
# --------------------------------------------------------------------------------------------------


def distill_task(folder, **kwargs):
    from gspn_lightning.tasks.distill import DistillationTask

    torch.manual_seed(0)
    kwargs = {"mixer": {"d_state": 4}, "optim": {"ema_decay": 0.9}, "text_encoders": False, **kwargs}
    return DistillationTask(str(folder), **kwargs)


def trained(task):
    return {n: p for n, p in task.model.named_parameters() if p.requires_grad}


def test_distillation_starts_from_an_exported_adapter_or_a_checkpoint(tiny_sdxl_dir, tmp_path, capsys):
    src = distill_task(tiny_sdxl_dir)
    with torch.no_grad():  # a "trained" adapter: raw and EMA apart from the swap's initialisation
        for p in trained(src).values():
            p.add_(0.01 * torch.randn_like(p))
        src.ema.update(src.model)
    raw_file, ema_file = src.export_gspn(tmp_path / "export")  # what `gspn distill-export` writes
    ckpt = {"state_dict": src.state_dict(), "global_step": 7}
    src.on_save_checkpoint(ckpt)  # what a distillation checkpoint holds: the trained part and its EMA
    torch.save(ckpt, tmp_path / "distill.ckpt")

    src_ema = dict(src.ema.module.named_parameters())
    for init_from, weights, expected in (
        (ema_file, None, src_ema),
        (tmp_path / "distill.ckpt", None, src_ema),
        (tmp_path / "distill.ckpt", "raw", trained(src)),
    ):
        task = distill_task(tiny_sdxl_dir, init_from=str(init_from), init_weights=weights)
        task.configure_model()
        mine = trained(task)
        assert mine and all(torch.equal(p, expected[n]) for n, p in mine.items()), init_from
        assert all(torch.equal(p, dict(task.ema.module.named_parameters())[n]) for n, p in mine.items())
        # the frozen weights are still the SD-XL folder's, shared with the teacher (never written)
        frozen = [(n, p) for n, p in task.model.named_parameters() if not p.requires_grad]
        assert frozen and all(p is task.teacher.get_parameter(n) for n, p in frozen)
        assert f"loaded {len(mine)} tensors" in capsys.readouterr().out

    # an adapter swapped with other options: strict, naming the shapes
    with pytest.raises(ValueError, match=r"shape mismatch .*attn1\..* \(source .*, model .*\)"):
        distill_task(tiny_sdxl_dir, mixer={"d_state": 2}, init_from=str(raw_file)).load_init_weights()
    # trainable: all from an adapter: the rest of the UNet is missing from it (strict), or keeps the
    # folder's weights (not strict)
    everything = distill_task(tiny_sdxl_dir, trainable="all", optim={"ema_decay": None}, init_from=str(raw_file))
    with pytest.raises(ValueError, match=r"missing from the source \(\d+, keep their fresh values\): .*conv_in\.bias"):
        everything.load_init_weights()
    everything = distill_task(
        tiny_sdxl_dir, trainable="all", optim={"ema_decay": None}, init_from=str(raw_file), init_strict=False
    )
    report = everything.load_init_weights()
    assert len(report.loaded) == len(trained(src)) and report.missing and not report.unexpected
    # a trainable-gspn run from a trainable-all checkpoint: its frozen weights are not loaded (strict: refused)
    full = {"state_dict": everything.state_dict(), "global_step": 1}
    everything.on_save_checkpoint(full)
    torch.save(full, tmp_path / "all.ckpt")
    with pytest.raises(ValueError, match=r"unexpected \(\d+, not loaded\): .*conv_in\.bias \(a frozen weight of this run\)"):
        distill_task(tiny_sdxl_dir, init_from=str(tmp_path / "all.ckpt"), init_weights="raw").load_init_weights()


def test_distillation_compile_and_checkpointing_are_the_shared_switches(tiny_sdxl_dir):
    task = distill_task(tiny_sdxl_dir, compile=True, gradient_checkpointing=True, optim={"ema_decay": None})
    assert task.model.is_gradient_checkpointing and task.model._compiled_call_impl is None
    task.configure_model()  # compiled when the trainer configures the model, in place
    assert task.model._compiled_call_impl is not None
    assert all(k.startswith(("down_blocks", "up_blocks", "mid_block", "conv", "time", "add")) for k in task.model.state_dict())


def test_export_model_writes_a_folder_that_rebuilds_by_name(trained_ckpt, tmp_path, capsys):
    from gspn_lightning.cli import main
    from gspn_lightning.models import create_model, from_pretrained

    path, src = trained_ckpt
    assert main(["export-model", str(path), str(tmp_path / "ema")]) == 0
    assert main(["export-model", str(path), str(tmp_path / "raw"), "--raw-weights"]) == 0
    assert "(EMA weights of gspn_t)" in capsys.readouterr().out
    assert same(from_pretrained(tmp_path / "ema"), src.ema.module)
    assert same(create_model("gspn_t", pretrained=tmp_path / "raw"), src.model)
    # and a task starts from it
    task = classifier(init_from=str(tmp_path / "raw"))
    assert task.load_init_weights().exact and same(task.model, src.model)
    torch.save({"state_dict": {}, "gspn_task": "gspn_lightning.tasks.distill.DistillationTask"}, tmp_path / "d.ckpt")
    assert main(["export-model", str(tmp_path / "d.ckpt"), str(tmp_path / "x")]) == 1
    assert "use gspn distill-export" in capsys.readouterr().err


@pytest.mark.slow
def test_fine_tuning_from_another_run_end_to_end(mnist_shards, tmp_path):
    """`gspn fit` of the debug config, then a second run started from its checkpoint with init_from
    (and activation checkpointing): the report is printed, the step count restarts. (The data fix
    num_classes here; a new head is tested above, in process.)"""
    from tests.cli_helpers import run_cli_chain

    data = [f"--data.init_args.train_shards={mnist_shards / 'train'}", f"--data.init_args.val_shards={mnist_shards / 'val'}",
            "--trainer.max_epochs=100", "--trainer.max_steps=2", "--trainer.limit_val_batches=1"]  # fmt: skip
    config = str(REPO / "configs/classification/debug_mnist.yaml")
    first = tmp_path / "first" / "checkpoints" / "last.ckpt"
    _, out = run_cli_chain(
        ["fit", "--config", config, *data, f"--trainer.default_root_dir={tmp_path / 'first'}"],
        ["fit", "--config", config, *data, f"--trainer.default_root_dir={tmp_path / 'second'}",
         f"--model.init_args.init_from={first}", "--model.init_args.activation_checkpointing=true"],
        cwd=tmp_path,
    )  # fmt: skip
    source = torch.load(first, map_location="cpu", weights_only=True)
    n = sum(k.startswith("model.") for k in source["state_dict"])
    assert f"init_from {first} (ema weights of step 2): loaded {n} tensors\n" in out
    assert "missing from the source" not in out and "unexpected (" not in out
    second = torch.load(tmp_path / "second" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert second["global_step"] == 2  # a fresh run from those weights, not a resume at step 2
    assert second["hyper_parameters"]["init_from"] == str(first)
    # trained on from the loaded weights: close to the source, far from a fresh initialisation
    w0, w1 = source["state_dict"]["ema.module.stem.0.weight"], second["state_dict"]["model.stem.0.weight"]
    assert (w1 - w0).abs().max() < 0.1 * w0.abs().max()
