"""Progressive (upscale-and-refine) SD-XL generation (gspn_lightning.models.sdxl_progressive) on the tiny
SD-XL folder at 32 -> 64 -> 128 pixels."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from gspn_lightning.cli.generate import main
from gspn_lightning.models.sdxl_generate import build_pipeline, generate
from gspn_lightning.models.sdxl_progressive import (
    Stage,
    parse_size,
    plan_stages,
    refine_pipeline,
    run_stages,
    upscale,
)

pytestmark = pytest.mark.usefixtures("torch_one_thread")
PROMPTS = ["a photo of a cat on the table", "a red apple"]


def pixels(path):
    return np.asarray(Image.open(path))


@pytest.fixture(scope="module")
def original(tiny_sdxl_dir):
    return build_pipeline(tiny_sdxl_dir)


def test_stage_sizes_files_and_seeds(tiny_sdxl_dir, original, tmp_path):
    kw = dict(
        progressive=[32, 64, 128],
        stage_steps=[3, 2, 4],
        strength=[0.5, 0.25],
        progress=False,
        pipeline=original,
    )
    paths = generate(tiny_sdxl_dir, PROMPTS, tmp_path / "a", seed=5, batch_size=2, save_stages=True, **kw)
    assert [p.name for p in paths] == ["00000_5.png", "00001_6.png"]
    assert all(Image.open(p).size == (128, 128) for p in paths)
    for k, seed in ((0, 5), (1, 6)):
        for i, size in ((0, 32), (1, 64)):
            assert Image.open(tmp_path / "a" / f"{k:05d}_{seed}_stage{i}_{size}x{size}.png").size == (
                size,
                size,
            )
    info = json.loads((tmp_path / "a" / "generation.json").read_text())
    assert (info["width"], info["height"], info["vae_tiling"]) == (128, 128, True)
    assert info["progressive"] == [
        {"width": 32, "height": 32, "steps": 3, "strength": 1.0},
        {"width": 64, "height": 64, "steps": 2, "strength": 0.5},
        {"width": 128, "height": 128, "steps": 4, "strength": 0.25},
    ]
    assert info["images"][1]["stages"] == ["00001_6_stage0_32x32.png", "00001_6_stage1_64x64.png"]
    assert not original[0].vae.use_tiling  # switched on for the run only
    # deterministic under a seed: exactly when run again, to a unit of 8-bit rounding in another batch
    # composition (and without saving the stages); other seeds differ
    same = generate(tiny_sdxl_dir, PROMPTS, tmp_path / "s", seed=5, batch_size=2, **kw)
    assert all(np.array_equal(pixels(a), pixels(b)) for a, b in zip(same, paths))
    alone = generate(tiny_sdxl_dir, PROMPTS[1:], tmp_path / "b", seeds=[6], **kw)
    assert np.abs(pixels(alone[0]).astype(int) - pixels(paths[1])).max() <= 1
    other = generate(tiny_sdxl_dir, PROMPTS[1:], tmp_path / "c", seeds=[7], **kw)
    assert np.abs(pixels(other[0]).astype(int) - pixels(paths[1])).max() > 10
    assert not list((tmp_path / "s").glob("*stage*"))
    # non-square, the default strength and --steps for every stage
    wide = generate(tiny_sdxl_dir, PROMPTS[:1], tmp_path / "w", progressive=["64x32", (128, 64)], steps=3,
                    progress=False, pipeline=original)  # fmt: skip
    assert Image.open(wide[0]).size == (128, 64)
    info = json.loads((tmp_path / "w" / "generation.json").read_text())
    assert [(s["steps"], s["strength"]) for s in info["progressive"]] == [(3, 1.0), (3, 0.4)]


class _VaeSpy:
    """Records what the VAE's encoder and decoder modules see and the latent the refinement starts from."""

    def __init__(self, vae, monkeypatch):
        self.encoder_in, self.decoder_in, self.encode_in, self.samples, self.decode_in = [], [], [], [], []
        vae.encoder.register_forward_pre_hook(lambda m, a: self.encoder_in.append(tuple(a[0].shape[-2:])))
        vae.decoder.register_forward_pre_hook(lambda m, a: self.decoder_in.append(tuple(a[0].shape[-2:])))
        encode, decode = vae.encode, vae.decode

        def spy_encode(x, *args, **kwargs):
            self.encode_in.append(x.clone())
            out = encode(x, *args, **kwargs)
            sample = out.latent_dist.sample

            def spy_sample(*a, **k):
                z = sample(*a, **k)
                self.samples.append(z.clone())
                return z

            out.latent_dist.sample = spy_sample
            return out

        def spy_decode(z, *args, **kwargs):
            self.decode_in.append(z.clone())
            return decode(z, *args, **kwargs)

        monkeypatch.setattr(vae, "encode", spy_encode)
        monkeypatch.setattr(vae, "decode", spy_decode)

    def remove_hooks(self, vae):
        vae.encoder._forward_pre_hooks.clear()
        vae.decoder._forward_pre_hooks.clear()


def test_refinement_starts_from_the_upscaled_previous_stage(original, monkeypatch):
    pipe = original[0]
    spy = _VaeSpy(pipe.vae, monkeypatch)
    try:
        moved = {}
        for strength in (0.05, 1.0):  # a 20-step schedule: 1 step of it, then all 20
            outs, before = [], len(spy.samples)
            stages = plan_stages([32, 64], strength, 20)
            final = run_stages(pipe, stages, PROMPTS[:1], [torch.Generator().manual_seed(0)],
                               on_stage=lambda k, s, im, outs=outs: outs.append(im), progress=False)  # fmt: skip
            assert final.shape == (1, 3, 64, 64) and torch.equal(final, outs[-1])
            # the refinement encodes exactly the previous stage's image upscaled (in [-1, 1])
            assert len(spy.samples) == before + 1
            expected = 2 * upscale(outs[0], 64, 64) - 1
            assert spy.encode_in[-1].shape == expected.shape
            torch.testing.assert_close(spy.encode_in[-1], expected, rtol=0, atol=1e-6)
            # and its denoised latent (what is decoded, unscaled) moves from that encoding as far as asked
            moved[strength] = (spy.decode_in[-1] - spy.samples[-1]).abs().mean().item()
        scale = spy.samples[-1].abs().mean().item()
        assert moved[0.05] < 0.5 * scale and moved[0.05] < moved[1.0] / 20, (moved, scale)
    finally:
        spy.remove_hooks(pipe.vae)


def test_tiled_vae_at_the_large_stage(original, monkeypatch):
    pipe = original[0]
    monkeypatch.setattr(pipe.vae, "tile_sample_min_size", 64)  # force small tiles: 64 pixels, 8 latents
    monkeypatch.setattr(pipe.vae, "tile_latent_min_size", 8)
    spy = _VaeSpy(pipe.vae, monkeypatch)
    try:
        stages = [Stage(32, 32, 2), Stage(64, 64, 2, 0.5), Stage(128, 128, 2, 0.5)]
        final = run_stages(pipe, stages, PROMPTS[:1], [torch.Generator().manual_seed(0)], progress=False,
                           guidance_scale=1.0)  # fmt: skip
    finally:
        spy.remove_hooks(pipe.vae)
    assert final.shape == (1, 3, 128, 128)
    # the 32- and 64-pixel stages run whole; at 128 pixels the encoder and decoder see only tiles
    assert spy.decoder_in[:2] == [(4, 4), (8, 8)] and spy.encoder_in[0] == (64, 64)
    assert len(spy.decoder_in[2:]) >= 4 and max(max(s) for s in spy.decoder_in[2:]) <= 8
    assert len(spy.encoder_in[1:]) >= 4 and max(max(s) for s in spy.encoder_in[1:]) <= 64
    assert not pipe.vae.use_tiling


def test_gspn_swapped_unet(tiny_sdxl_dir, original, tmp_path):
    swapped = build_pipeline(tiny_sdxl_dir, gspn_options={"d_state": 2, "chunk_size": 4})
    refiner = refine_pipeline(swapped[0])  # the refinements run the same modules, nothing copied
    assert all(
        getattr(refiner, n) is getattr(swapped[0], n) for n in ("unet", "vae", "text_encoder_2", "scheduler")
    )
    kw = dict(progressive=[32, 64], stage_steps=[2, 2], strength=0.5, seed=1, progress=False)
    gspn = generate(tiny_sdxl_dir, PROMPTS[:1], tmp_path / "g", pipeline=swapped, **kw)
    again = generate(tiny_sdxl_dir, PROMPTS[:1], tmp_path / "g2", pipeline=swapped, **kw)
    teacher = generate(tiny_sdxl_dir, PROMPTS[:1], tmp_path / "t", pipeline=original, **kw)
    assert Image.open(gspn[0]).size == (64, 64)
    assert np.array_equal(pixels(gspn[0]), pixels(again[0]))
    assert not np.array_equal(pixels(gspn[0]), pixels(teacher[0]))  # the swapped UNet is the one running
    assert json.loads((tmp_path / "g" / "generation.json").read_text())["gspn_layers"] == 11


def test_bad_plans():
    assert (
        parse_size("2048x1024") == (2048, 1024)
        and parse_size(" 64 ") == (64, 64)
        and parse_size(32) == (32, 32)
    )
    for bad in ("abc", "64x", 1.5, True, (64,)):
        with pytest.raises(ValueError, match="N or WxH"):
            parse_size(bad)
    cases = [
        (dict(sizes=[64]), "at least two sizes"),
        (dict(sizes="64"), "at least two sizes"),
        (dict(sizes=[64, 100]), "size 1 .100x100.: width must be a positive multiple of 8"),
        (dict(sizes=[64, 32]), "sizes must increase: size 1 .32x32."),
        (dict(sizes=[64, 64]), "sizes must increase"),
        (dict(sizes=["64x32", "128x16"]), "sizes must increase"),
        (dict(strength=0.0), r"strength must be in \(0, 1\]"),
        (dict(strength=1.5), r"strength must be in \(0, 1\]"),
        (dict(sizes=[32, 64, 128], strength=[0.5, 0.0]), r"strength must be in \(0, 1\]"),
        (dict(strength=[0.5, 0.5]), "strength has 2 entries for 1 refinements"),
        (dict(stage_steps=[4]), "stage_steps has 1 entries for 2 progressive sizes"),
        (dict(stage_steps=[4, 0]), r"stage_steps\[1\] must be an integer >= 1"),
        (dict(stage_steps=[4, 1]), r"stage 1 runs no step: int\(steps 1 x strength 0.5\) = 0"),
    ]
    for kw, message in cases:
        with pytest.raises(ValueError, match=message):
            plan_stages(**{"sizes": [32, 64], "strength": 0.5, "steps": 30, **kw})
    assert plan_stages([32, "64x64"], 1.0, 1) == [Stage(32, 32, 1), Stage(64, 64, 1, 1.0)]  # 1 is allowed
    assert plan_stages([32, 64, 128], [0.5, 0.25], 8)[1:] == [Stage(64, 64, 8, 0.5), Stage(128, 128, 8, 0.25)]


def test_bad_options_fail_before_loading(tmp_path):
    missing = tmp_path / "no-sdxl"  # never read: every one of these fails first
    for kw, message in (
        (dict(progressive=[32, 64], width=64), "width/height or progressive sizes, not both"),
        (dict(strength=0.5), "strength is an option of progressive generation"),
        (dict(stage_steps=[2, 2]), "stage_steps is an option of progressive generation"),
        (dict(save_stages=True), "save_stages is an option of progressive generation"),
        (dict(progressive=[64, 32]), "sizes must increase"),
    ):
        with pytest.raises(ValueError, match=message):
            generate(missing, PROMPTS, tmp_path / "out", progress=False, **kw)
    with pytest.raises(SystemExit, match="--stage-steps takes comma-separated values"):
        main(["--sdxl", str(missing), "--prompt", "a", "--out", str(tmp_path), "--progressive", "32,64",
              "--stage-steps", "2,x"])  # fmt: skip
    with pytest.raises(SystemExit, match="--strength takes comma-separated values"):
        main(["--sdxl", str(missing), "--prompt", "a", "--out", str(tmp_path), "--progressive", "32,64",
              "--strength", "half"])  # fmt: skip
    with pytest.raises(SystemExit, match="not both"):
        main(["--sdxl", str(missing), "--prompt", "a", "--out", str(tmp_path), "--progressive", "32,64",
              "--height", "64"])  # fmt: skip


def test_command_line(tiny_sdxl_dir, tmp_path, capfd):
    out = tmp_path / "out"
    paths = main(["--sdxl", str(tiny_sdxl_dir), "--prompt", "the sun", "--out", str(out), "--seed", "3",
                  "--progressive", "32x32,64x32,128x64", "--stage-steps", "2,2,2", "--strength", "0.5,0.5",
                  "--save-stages"])  # fmt: skip
    assert [p.name for p in paths] == ["00000_3.png"] and Image.open(paths[0]).size == (128, 64)
    assert sorted(p.name for p in out.glob("*stage*.png")) == [
        "00000_3_stage0_32x32.png",
        "00000_3_stage1_64x32.png",
    ]
    err = capfd.readouterr().err
    for desc in ("stage 1/3 32x32", "stage 2/3 64x32", "stage 3/3 128x64"):  # a progress bar per stage
        assert desc in err
