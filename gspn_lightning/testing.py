"""Builders of tiny, randomly initialised models for the tests and the tiny demos (no pretrained
weights exist on the machines this project is tested on, and nothing downloads).

    from gspn_lightning.testing import make_tiny_sdxl, tiny_vae

    make_tiny_sdxl("/tmp/tiny-sdxl")          # a complete SD-XL-shaped diffusers folder in about a second
    tiny_vae().save_pretrained("/tmp/vae")    # a small AutoencoderKL folder for the latent-diffusion path

The tiny SD-XL runs the same loading path (:func:`gspn_lightning.models.sdxl_pipeline.load_sdxl`) as
a real checkout: ``text_time`` micro-conditioning, two CLIP text encoders whose penultimate hidden
states are concatenated, a pooled projection, a 4-channel VAE with 8x downsampling, SD-XL's Euler
scheduler config. diffusers and transformers are imported inside the builders.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

__all__ = ["SDXL_SCHEDULER_CONFIG", "TINY_UNET_CONFIG", "make_tiny_clip", "make_tiny_sdxl", "tiny_vae"]


#: configs/sdxl/tiny_unet_config.json (a test checks they agree): SD-XL's UNet structure at toy widths
TINY_UNET_CONFIG = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 1,
    "block_out_channels": [16, 32, 64],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "transformer_layers_per_block": [1, 1, 2],
    "attention_head_dim": [2, 4, 8],
    "cross_attention_dim": 32,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 64,
    "use_linear_projection": True,
    "norm_num_groups": 8,
}

#: the tiny text encoders' widths: 16 + 16 = cross_attention_dim, pooled 16 = 64 - 6 * 8
_TINY_TEXT = ({"hidden_size": 16, "hidden_act": "quick_gelu"}, {"hidden_size": 16, "hidden_act": "gelu"})

#: SD-XL base 1.0's scheduler config (EulerDiscreteScheduler, scaled-linear betas, "leading" spacing)
SDXL_SCHEDULER_CONFIG = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
    "clip_sample": False,
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
}

# A hand-written byte-level BPE vocabulary in CLIP's format: single characters, the same characters
# ending a word (``</w>``), a few merges of common English pieces, then the two special tokens (last, as
# in CLIP, so their ids are the largest).  It covers printable ASCII; anything else becomes the
# unknown token (``<|endoftext|>``).  Lower case only: CLIP's tokenizer lower-cases its input.
_CHARS = "!\"#$%&'()*+,-./0123456789:;<=>?@[\\]^_`abcdefghijklmnopqrstuvwxyz{|}~"
_MERGES = (
    "t h", "th e</w>", "a n", "an d</w>", "o f</w>", "i n", "in g</w>", "e r", "o n</w>", "a t</w>",
    "o r", "e n", "a r", "e d</w>", "t o</w>", "i s</w>", "p h", "ph o", "pho t", "phot o</w>",
    "c a", "ca t</w>", "d o", "do g</w>", "r e", "re d</w>", "b l", "bl u", "blu e</w>", "t r", "tr e",
    "tre e</w>", "s k", "sk y</w>", "h o", "ho u", "hou s", "hous e</w>", "a p", "ap p", "app l",
    "appl e</w>", "t a", "ta b", "tab l", "tabl e</w>", "w i", "wi t", "wit h</w>", "m o", "mo u",
    "mou n", "moun t", "mount a", "mounta i", "mountai n</w>", "s u", "su n</w>", "l a", "la k",
    "lak e</w>", "g r", "gr e", "gre e", "gree n</w>", "s e", "se a</w>",
)  # fmt: skip
_SPECIALS = ("<|startoftext|>", "<|endoftext|>")


def _tiny_bpe() -> tuple[dict[str, int], list[str]]:
    vocab: dict[str, int] = {}
    for token in [*_CHARS, *(c + "</w>" for c in _CHARS)]:
        vocab[token] = len(vocab)
    for merge in _MERGES:
        a, b = merge.split(" ")
        assert a in vocab and b in vocab, merge  # a merge only joins tokens that exist
        vocab.setdefault(a + b, len(vocab))
    for token in _SPECIALS:
        vocab[token] = len(vocab)
    return vocab, list(_MERGES)


def _write_tokenizer(folder: Path, vocab: dict[str, int], merges: list[str], pad_token: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, indent=1, ensure_ascii=False) + "\n")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": pad_token,
        "do_lower_case": True,
        "clean_up_tokenization_spaces": True,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    specials = {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")


def make_tiny_sdxl(path: str | Path, seed: int = 0) -> Path:
    """Write a complete tiny SD-XL-shaped folder (diffusers layout, random weights from ``seed``) to ``path``.

    - ``unet/``: :data:`TINY_UNET_CONFIG` (``text_time`` conditioning, 11 ``attn1``: 3 at 32 channels, 8
      at 64; cross-attention 32 = 16 + 16 text channels, pooled 16);
    - ``vae/``: an ``AutoencoderKL`` with 4 latent channels and SD-XL's 8x downsampling (four blocks, 8-16
      channels), SD-XL's ``scaling_factor`` 0.13025;
    - ``text_encoder/`` (``CLIPTextModel``, 16 wide, quick-GELU) and ``text_encoder_2/``
      (``CLIPTextModelWithProjection``, 16 wide, projection 16), two layers each (SD-XL reads the
      penultimate one), 77 positions;
    - ``tokenizer/``, ``tokenizer_2/``: a hand-written BPE vocabulary (about 200 entries, printable ASCII),
      ``model_max_length`` 77; the second pads with ``!`` as SD-XL's does;
    - ``scheduler/``: SD-XL base's Euler scheduler config; ``model_index.json``.

    Returns ``Path(path)``.  Takes about a second on a CPU.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    root = Path(path).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    vocab, merges = _tiny_bpe()
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG as it was
        torch.manual_seed(seed)
        UNet2DConditionModel(**TINY_UNET_CONFIG).save_pretrained(root / "unet")
        AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 16, 16, 16),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=128,
            scaling_factor=0.13025,
            force_upcast=False,
        ).save_pretrained(root / "vae")
        for part, cls, width in (
            ("text_encoder", CLIPTextModel, _TINY_TEXT[0]),
            ("text_encoder_2", CLIPTextModelWithProjection, _TINY_TEXT[1]),
        ):
            config = CLIPTextConfig(
                vocab_size=len(vocab),
                intermediate_size=2 * width["hidden_size"],
                num_hidden_layers=2,
                num_attention_heads=2,
                max_position_embeddings=77,
                projection_dim=width["hidden_size"],
                bos_token_id=vocab["<|startoftext|>"],
                eos_token_id=vocab["<|endoftext|>"],
                pad_token_id=vocab["<|endoftext|>"] if part == "text_encoder" else vocab["!"],
                **width,
            )
            cls(config).eval().save_pretrained(root / part)
    _write_tokenizer(root / "tokenizer", vocab, merges, pad_token="<|endoftext|>")
    _write_tokenizer(root / "tokenizer_2", vocab, merges, pad_token="!")
    (root / "scheduler").mkdir(exist_ok=True)
    (root / "scheduler" / "scheduler_config.json").write_text(
        json.dumps(SDXL_SCHEDULER_CONFIG, indent=2) + "\n"
    )
    index = {
        "_class_name": "StableDiffusionXLPipeline",
        "force_zeros_for_empty_prompt": True,
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (root / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return root


def tiny_vae(in_channels: int = 3, latent_channels: int = 4, width: int = 16, scaling_factor: float = 0.5):
    """A small random ``AutoencoderKL`` (downsampling 2x per extra block; two blocks: 2x)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=in_channels,
        out_channels=in_channels,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(width, 2 * width),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=32,
        scaling_factor=scaling_factor,
    ).eval()


def make_tiny_clip(path: str | Path, seed: int = 0, image_size: int = 32) -> Path:
    """Write a tiny random CLIP folder (``CLIPModel`` + ``CLIPProcessor``) that
    :func:`gspn_lightning.metrics.clip_score.load_local_clip` reads like a real one, to ``path``.

    One layer of width 16 in each tower, projection 16, a ``image_size`` vision input (patch 8), and
    the tiny SD-XL's hand-written BPE vocabulary (77 positions). Random weights: for testing the
    plumbing, not for judging images. Returns ``Path(path)``.
    """
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    root = Path(path).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    vocab, merges = _tiny_bpe()
    tower = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(vocab), max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"], **tower,
        ),
        vision_config=dict(image_size=image_size, patch_size=8, **tower),
        projection_dim=16,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG as it was
        torch.manual_seed(seed)
        CLIPModel(config).eval().save_pretrained(root)
    _write_tokenizer(root / "_tokenizer", vocab, merges, pad_token="<|endoftext|>")
    tokenizer = CLIPTokenizer.from_pretrained(root / "_tokenizer", local_files_only=True)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(root)
    return root
