"""SD-XL generation (gspn_lightning.models.sdxl_generate) end to end on the tiny SD-XL folder."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gspn_lightning.cli.generate import main
from gspn_lightning.models.sdxl import (
    GSPNSelfAttention,
    gspn_state_dict,
    save_gspn_weights,
    saved_gspn_options,
    swap_self_attention,
)
from gspn_lightning.models.sdxl_generate import build_pipeline, generate, read_prompts
from gspn_lightning.models.sdxl_pipeline import load_sdxl

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("torch_one_thread")
PROMPTS = ["a photo of a cat on the table", "a red apple"]


def pixels(path):
    return np.asarray(Image.open(path))


@pytest.fixture(scope="module")
def gspn_file(tiny_sdxl_dir, tmp_path_factory):
    """An adapter as training would leave it: swapped with per-layer chunks, weights moved off their init."""
    unet = load_sdxl(tiny_sdxl_dir, parts=("unet",)).unet
    swap_self_attention(unet, d_state=4, chunk_size={"up_blocks.*": 2})
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for t in gspn_state_dict(unet).values():
            t.add_(0.05 * torch.randn(t.shape, generator=gen))
    path = tmp_path_factory.mktemp("adapter") / "gspn.safetensors"
    save_gspn_weights(unet, path)
    return path, unet


@pytest.fixture(scope="module")
def original(tiny_sdxl_dir):
    return build_pipeline(tiny_sdxl_dir)


def test_non_square_pngs_and_seeds(tiny_sdxl_dir, original, tmp_path):
    kw = dict(width=128, height=64, steps=2, progress=False, pipeline=original)
    paths = generate(
        tiny_sdxl_dir, PROMPTS, tmp_path / "a", seed=7, num_images_per_prompt=2, batch_size=3, **kw
    )
    assert [p.name for p in paths] == ["00000_7.png", "00001_8.png", "00002_9.png", "00003_10.png"]
    for p in paths:
        image = Image.open(p)
        assert image.size == (128, 64) and image.mode == "RGB"  # PIL: (width, height)
    info = json.loads((tmp_path / "a" / "generation.json").read_text())
    assert [r["prompt"] for r in info["images"]] == [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2
    assert info["gspn_layers"] == 0 and (info["width"], info["height"]) == (128, 64)
    # the same seed gives the same image: exactly when run again, and up to floating-point reordering
    # (a unit of 8-bit rounding) in another batch composition; other seeds differ
    same = generate(
        tiny_sdxl_dir, PROMPTS, tmp_path / "s", seed=7, num_images_per_prompt=2, batch_size=3, **kw
    )
    assert all(np.array_equal(pixels(a), pixels(b)) for a, b in zip(same, paths))
    again = generate(tiny_sdxl_dir, PROMPTS[:1], tmp_path / "b", seeds=[8, 7], num_images_per_prompt=2, **kw)
    for new, old in ((again[0], paths[1]), (again[1], paths[0])):
        assert np.abs(pixels(new).astype(int) - pixels(old)).max() <= 1
    assert np.abs(pixels(paths[0]).astype(int) - pixels(paths[1])).max() > 10
    assert pixels(paths[0]).std() > 0
    tall = generate(tiny_sdxl_dir, PROMPTS[:1], tmp_path / "c", width=64, height=128, steps=2, progress=False,
                    pipeline=original)  # fmt: skip
    assert Image.open(tall[0]).size == (64, 128)


def test_gspn_weights_load_and_generate(tiny_sdxl_dir, original, gspn_file, tmp_path):
    path, trained = gspn_file
    assert saved_gspn_options(path)["d_state"] == 4
    pipe, names = build_pipeline(tiny_sdxl_dir, gspn_weights=path)
    assert len(names) == 11 and sum(isinstance(m, GSPNSelfAttention) for m in pipe.unet.modules()) == 11
    assert {pipe.unet.get_submodule(n).chunk_size for n in names} == {None, 2}  # options read from the file
    loaded, saved = gspn_state_dict(pipe.unet), gspn_state_dict(trained)
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)
    kw = dict(width=128, height=64, steps=2, seed=1, progress=False)
    gspn = generate(tiny_sdxl_dir, PROMPTS[:1], tmp_path / "gspn", pipeline=(pipe, names), **kw)
    teacher = generate(tiny_sdxl_dir, PROMPTS[:1], tmp_path / "teacher", pipeline=original, **kw)
    assert Image.open(gspn[0]).size == Image.open(teacher[0]).size == (128, 64)
    assert not np.array_equal(pixels(gspn[0]), pixels(teacher[0]))  # the swapped UNet is the one running
    # loading the weights afresh reproduces the images exactly
    again = generate(tiny_sdxl_dir, PROMPTS[:1], tmp_path / "again", gspn_weights=path, device="cpu", **kw)
    assert np.array_equal(pixels(again[0]), pixels(gspn[0]))
    assert json.loads((tmp_path / "again" / "generation.json").read_text())["gspn_layers"] == 11


def test_chunk_size_comes_from_the_adapter_unless_overridden(tiny_sdxl_dir, gspn_file):
    """Generation rebuilds the layers the adapter records (above); ``gspn_options`` override it
    (``{"chunk_size": null}``: global), and a fresh swap takes the swap's default, local chunk 4."""
    path, _ = gspn_file
    pipe, names = build_pipeline(tiny_sdxl_dir, gspn_weights=path, gspn_options={"chunk_size": None})
    assert {pipe.unet.get_submodule(n).chunk_size for n in names} == {None}
    pipe, names = build_pipeline(tiny_sdxl_dir, gspn_options={"d_state": 2})
    assert {pipe.unet.get_submodule(n).chunk_size for n in names} == {4}


def test_fresh_swap_and_vae_tiling(tiny_sdxl_dir, tmp_path):
    pipe, names = build_pipeline(tiny_sdxl_dir, gspn_options={"d_state": 2, "chunk_size": 4}, vae_tiling=True)
    assert len(names) == 11 and pipe.vae.use_tiling
    assert {pipe.unet.get_submodule(n).d_state for n in names} == {2}
    # 256x128 pixels exceeds the tiny VAE's 128-pixel tile, so the decoder really tiles
    assert pipe.vae.tile_sample_min_size < 256
    paths = generate(tiny_sdxl_dir, PROMPTS[1:], tmp_path, width=256, height=128, steps=1, progress=False,
                     pipeline=(pipe, names), guidance_scale=1.0)  # fmt: skip
    assert Image.open(paths[0]).size == (256, 128)
    assert json.loads((tmp_path / "generation.json").read_text())["vae_tiling"] is True


def test_bad_arguments(tiny_sdxl_dir, original, tmp_path):
    with pytest.raises(ValueError, match="width must be a positive multiple of 8"):
        generate(tiny_sdxl_dir, PROMPTS, tmp_path, width=100, pipeline=original, progress=False)
    with pytest.raises(ValueError, match="seeds has 1 entries for 2 images"):
        generate(tiny_sdxl_dir, PROMPTS, tmp_path, seeds=[1], pipeline=original, progress=False)
    with pytest.raises(SystemExit, match="incomplete SD-XL folder|SD-XL folder not found"):
        main(["--sdxl", str(tmp_path / "none"), "--prompt", "a cat", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="no prompts"):
        main(["--sdxl", str(tiny_sdxl_dir), "--out", str(tmp_path)])
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n\n  a dog  \n")
    assert read_prompts(["first"], prompts) == ["first", "a cat", "a dog"]


@pytest.mark.slow
def test_command_line(tiny_sdxl_dir, gspn_file, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\na blue house with a tree\n")
    out = tmp_path / "out"
    cmd = [
        sys.executable, "-m", "gspn_lightning.cli", "generate", "--sdxl", str(tiny_sdxl_dir),
        "--prompts-file", str(prompts), "--prompt", "the sun", "--width", "192", "--height", "64",
        "--steps", "2", "--seed", "3", "--gspn-weights", str(gspn_file[0]), "--out", str(out),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "wrote 3 images" in run.stdout
    assert "192x64" in run.stderr  # the progress bar
    pngs = sorted(out.glob("*.png"))
    assert [p.name for p in pngs] == ["00000_3.png", "00001_4.png", "00002_5.png"]
    assert all(Image.open(p).size == (192, 64) for p in pngs)
    info = json.loads((out / "generation.json").read_text())
    assert [r["prompt"] for r in info["images"]] == [
        "the sun",
        "a photo of a cat",
        "a blue house with a tree",
    ]
    assert info["gspn_layers"] == 11
