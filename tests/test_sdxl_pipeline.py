"""SD-XL folder loading, text conditioning and the tiny SD-XL folder (gspn_lightning.models.sdxl_pipeline)."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from gspn_lightning.models.sdxl import GSPNSelfAttention, swap_self_attention
from gspn_lightning.models.sdxl_pipeline import (
    PARTS,
    added_cond_kwargs,
    check_sdxl_folder,
    encode_prompt,
    load_sdxl,
    time_ids,
    tokenize,
)
from gspn_lightning.testing import TINY_UNET_CONFIG, make_tiny_sdxl

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("torch_one_thread")
CAPTIONS = ["a photo of a cat on the table", "a red apple, with the blue sky!", ""]


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl_dir):
    return load_sdxl(tiny_sdxl_dir)


def test_tiny_unet_config_matches_the_shipped_json():
    shipped = json.loads((ROOT / "configs/sdxl/tiny_unet_config.json").read_text())
    shipped = {k: v for k, v in shipped.items() if not k.startswith("_")}
    assert shipped == TINY_UNET_CONFIG


def test_folder_check_names_everything_missing(tiny_sdxl_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_sdxl_dir, broken)
    (broken / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    (broken / "tokenizer_2" / "merges.txt").unlink()
    (broken / "text_encoder" / "config.json").unlink()
    shutil.rmtree(broken / "scheduler")
    with pytest.raises(FileNotFoundError) as err:
        check_sdxl_folder(broken)
    msg = str(err.value)
    for missing in (
        "vae/diffusion_pytorch_model.safetensors",
        "tokenizer_2/vocab.json + tokenizer_2/merges.txt",
        "text_encoder/config.json",
        "scheduler/ (the whole folder)",
    ):
        assert missing in msg, msg
    for present in ("unet/", "text_encoder_2/", "tokenizer/"):
        assert f"- {present}" not in msg
    with pytest.raises(FileNotFoundError, match="text_encoder/config.json"):  # load_sdxl checks first too
        load_sdxl(broken, parts=("text_encoder", "unet"))
    # only the parts asked for are checked
    assert check_sdxl_folder(broken, parts=("unet", "text_encoder_2", "tokenizer")) == broken
    with pytest.raises(FileNotFoundError, match="SD-XL folder not found"):
        check_sdxl_folder(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="parts"):
        check_sdxl_folder(broken, parts=("unet", "refiner"))


def test_load_round_trips_the_tiny_folder(tiny_sdxl_dir, sdxl, tmp_path):
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    assert isinstance(sdxl.unet, UNet2DConditionModel) and isinstance(sdxl.vae, AutoencoderKL)
    assert type(sdxl.text_encoder) is CLIPTextModel
    assert type(sdxl.text_encoder_2) is CLIPTextModelWithProjection
    assert all(isinstance(t, CLIPTokenizer) and t.model_max_length == 77 for t in sdxl.tokenizers)
    assert isinstance(sdxl.scheduler, EulerDiscreteScheduler)
    assert sdxl.scheduler.config.timestep_spacing == "leading" and sdxl.force_zeros_for_empty_prompt
    loaded = {k: list(v) if isinstance(v, tuple) else v for k, v in sdxl.unet.config.items()}
    assert {k: loaded[k] for k in TINY_UNET_CONFIG} == TINY_UNET_CONFIG
    assert 2 ** (len(sdxl.vae.config.block_out_channels) - 1) == 8  # SD-XL's VAE scale
    # the weights written are the weights read: a second folder from the same seed loads identically,
    # another seed differs; only the asked-for parts load, in the asked-for dtype
    again = load_sdxl(make_tiny_sdxl(tmp_path / "again", seed=0), parts=("unet", "text_encoder_2"))
    assert again.vae is None and again.tokenizer is None
    for a, b in ((sdxl.unet, again.unet), (sdxl.text_encoder_2, again.text_encoder_2)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    other = load_sdxl(make_tiny_sdxl(tmp_path / "other", seed=1), parts=("unet",))
    assert not torch.equal(other.unet.conv_in.weight, sdxl.unet.conv_in.weight)
    half = load_sdxl(tiny_sdxl_dir, parts=("vae", "text_encoder"), dtype=torch.bfloat16)
    assert half.vae.dtype == torch.bfloat16 and half.text_encoder.dtype == torch.bfloat16


def test_weight_variant_is_found(tiny_sdxl_dir, tmp_path):
    folder = tmp_path / "fp16"
    shutil.copytree(tiny_sdxl_dir / "unet", folder / "unet")
    (folder / "unet" / "diffusion_pytorch_model.safetensors").rename(
        folder / "unet" / "diffusion_pytorch_model.fp16.safetensors"
    )
    unet = load_sdxl(folder, parts=("unet",)).unet
    ref = load_sdxl(tiny_sdxl_dir, parts=("unet",)).unet
    assert torch.equal(unet.conv_in.weight, ref.conv_in.weight)


def test_tokenizers(sdxl):
    ids1, ids2 = tokenize(sdxl.tokenizer, CAPTIONS), tokenize(sdxl.tokenizer_2, CAPTIONS)
    assert ids1.shape == ids2.shape == (3, 77)
    bos, eos = sdxl.tokenizer.bos_token_id, sdxl.tokenizer.eos_token_id
    assert (ids1[:, 0] == bos).all()
    n = 1 + len(sdxl.tokenizer.tokenize(CAPTIONS[0]))
    assert ids1[0, n] == eos and (ids1[0, n:] == eos).all()  # tokenizer pads with <|endoftext|>
    assert ids2[0, n] == eos and (ids2[0, n + 1 :] == sdxl.tokenizer_2.convert_tokens_to_ids("!")).all()
    assert sdxl.tokenizer.unk_token_id not in ids1[0, 1:n]  # every caption character is in the vocabulary
    assert sdxl.tokenizer.tokenize("the cat")[0] == "the</w>"  # a hand-written merge applies
    long = tokenize(sdxl.tokenizer, ["cat " * 200])
    assert long.shape == (1, 77) and long[0, -1] == eos  # truncated to model_max_length


def test_encode_prompt(sdxl):
    with torch.no_grad():
        embeds, pooled = encode_prompt(sdxl.tokenizers, sdxl.text_encoders, CAPTIONS)
        assert embeds.shape == (3, 77, 32) and pooled.shape == (3, 16)
        assert embeds.shape[-1] == sdxl.unet.config.cross_attention_dim
        # penultimate hidden states of both encoders, concatenated; pooled = encoder 2's projection
        out1 = sdxl.text_encoder(tokenize(sdxl.tokenizer, CAPTIONS), output_hidden_states=True)
        out2 = sdxl.text_encoder_2(tokenize(sdxl.tokenizer_2, CAPTIONS), output_hidden_states=True)
        torch.testing.assert_close(embeds[..., :16], out1.hidden_states[-2], rtol=0, atol=0)
        torch.testing.assert_close(embeds[..., 16:], out2.hidden_states[-2], rtol=0, atol=0)
        torch.testing.assert_close(pooled, out2.text_embeds, rtol=0, atol=0)
        assert not torch.allclose(embeds[0], embeds[1]) and not torch.allclose(pooled[0], pooled[2])
        one, one_pooled = encode_prompt(sdxl.tokenizers, sdxl.text_encoders, CAPTIONS[1])
        torch.testing.assert_close(one[0], embeds[1], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(one_pooled[0], pooled[1], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="projection"):
        encode_prompt(sdxl.tokenizers[:1], sdxl.text_encoders[:1], ["a cat"])
    with pytest.raises(ValueError, match="pair up"):
        encode_prompt(sdxl.tokenizers, sdxl.text_encoders[:1], ["a cat"])


def test_time_ids():
    ids = time_ids((1024, 768), (0, 32), (1024, 1024))
    assert ids.tolist() == [[1024, 768, 0, 32, 1024, 1024]] and ids.dtype == torch.float32
    per_sample = time_ids(torch.tensor([[512, 512], [600, 800]]), (0, 0), (512, 512))
    assert per_sample.shape == (2, 6) and per_sample[1].tolist() == [600, 800, 0, 0, 512, 512]
    assert time_ids((8, 16), (0, 0), (8, 16), batch=3).shape == (3, 6)
    with pytest.raises(ValueError, match="crop_top_left"):
        time_ids((8, 16), (0, 0, 0), (8, 16))
    with pytest.raises(ValueError, match=r"\[2, 1, 3\] rows"):
        time_ids(torch.zeros(2, 2), (0, 0), torch.zeros(3, 2))
    pooled = torch.zeros(2, 16, dtype=torch.bfloat16)
    cond = added_cond_kwargs(pooled, original_size=(256, 512))
    assert cond["text_embeds"] is pooled and cond["time_ids"].dtype == torch.bfloat16
    assert cond["time_ids"].tolist() == [[256, 512, 0, 0, 256, 512]] * 2


@pytest.mark.parametrize("pixels", [(256, 512), (512, 256)])
def test_unet_with_text_time_conditioning_before_and_after_swap(sdxl, pixels):
    import copy

    h, w = pixels
    with torch.no_grad():
        embeds, pooled = encode_prompt(sdxl.tokenizers, sdxl.text_encoders, CAPTIONS[:2])
        cond = added_cond_kwargs(pooled, original_size=(h, w))
        latents = torch.randn(2, 4, h // 8, w // 8, generator=torch.Generator().manual_seed(0))
        t = torch.tensor([999, 20])
        before = sdxl.unet(latents, t, encoder_hidden_states=embeds, added_cond_kwargs=cond).sample
        student = copy.deepcopy(sdxl.unet)
        names = swap_self_attention(student, d_state=4)
        after = student(latents, t, encoder_hidden_states=embeds, added_cond_kwargs=cond).sample
    assert before.shape == after.shape == (2, 4, h // 8, w // 8)
    assert torch.isfinite(after).all() and not torch.equal(before, after)
    assert len(names) == 11 == sum(isinstance(m, GSPNSelfAttention) for m in student.modules())
    assert {m.spatial_size for m in student.modules() if isinstance(m, GSPNSelfAttention)} == {
        (h // 16, w // 16),
        (h // 32, w // 32),
    }
    # the conditioning is used: another micro-conditioning changes the prediction
    with torch.no_grad():
        other = added_cond_kwargs(pooled, original_size=(h // 2, w // 2), crop_top_left=(16, 0))
        moved = student(latents, t, encoder_hidden_states=embeds, added_cond_kwargs=other).sample
    assert not torch.allclose(moved, after)


def test_load_all_parts_default(tiny_sdxl_dir):
    assert check_sdxl_folder(tiny_sdxl_dir) == tiny_sdxl_dir
    assert sorted(p.name for p in tiny_sdxl_dir.iterdir() if p.is_dir()) == sorted(PARTS)
