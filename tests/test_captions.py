"""Image + caption shards (gspn_lightning.data.captions): the crop and its micro-conditioning record,
txt/json captions, stored prompt embeddings, corrupt rows, the writer from a folder, and the data module
(resampled training, exactly-once evaluation) over them."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from gspn_lightning.cli.write_captions import main
from gspn_lightning.data.captions import (
    CaptionWebDataModule,
    DecodeCaption,
    caption_folder_samples,
    crop_box,
    write_caption_shards,
)
from gspn_lightning.data.write_shards import ShardsExistError, read_index, write_shards


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _coordinate_image(h: int, w: int) -> np.ndarray:
    """Red channel = row index, green = column index (mod 256): a crop tells where it came from."""
    rows, cols = np.mgrid[0:h, 0:w]
    return np.stack([rows % 256, cols % 256, np.zeros_like(rows)], axis=-1).astype(np.uint8)


def _pixels_to_uint8(pixels: torch.Tensor) -> np.ndarray:
    return ((pixels + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()


@pytest.mark.parametrize(
    "size, target, resized, top_left",
    [
        ((40, 100), (20, 20), (20, 50), (0, 15)),  # landscape: height becomes 20, centre of the width
        ((100, 40), (20, 20), (50, 20), (15, 0)),  # portrait: width becomes 20, centre of the height
        ((30, 30), (16, 24), (24, 24), (4, 0)),  # non-square target: cover it, crop the excess
        ((16, 24), (16, 24), (16, 24), (0, 0)),  # already the target
    ],
)
def test_crop_box_centre(size, target, resized, top_left):
    assert crop_box(*size, target) == (resized, top_left)


def test_crop_box_random_covers_every_position_and_stays_inside():
    torch.manual_seed(0)
    seen = set()
    for _ in range(200):
        (rh, rw), (top, left) = crop_box(40, 100, (20, 20), random_crop=True)
        assert (rh, rw) == (20, 50) and top == 0 and 0 <= left <= 30
        seen.add(left)
    assert seen == set(range(31))


@pytest.mark.parametrize("hw", [(20, 44), (44, 20)])
def test_decoder_records_the_crop_it_took(hw):
    h, w = hw
    raw = {"__key__": "a", "png": _png(_coordinate_image(h, w)), "txt": b" a red square \n"}
    row = DecodeCaption((10, 10), interpolation="nearest")(raw)
    assert row["caption"] == "a red square" and row["label"] == 0
    assert row["pixels"].shape == (3, 10, 10) and row["pixels"].min() >= -1 and row["pixels"].max() <= 1
    assert row["original_size"].tolist() == [h, w]
    top, left = row["crop_top_left"].tolist()
    # the image was halved (shorter side 20 -> 10): crop pixel (0, 0) is resized pixel (top, left),
    # i.e. original pixel (2 top, 2 left) with nearest-neighbour resampling
    img = _pixels_to_uint8(row["pixels"])
    assert (top, left) == ((h // 2 - 10) // 2, (w // 2 - 10) // 2)
    assert abs(int(img[0, 0, 0]) - 2 * top) <= 1 and abs(int(img[0, 0, 1]) - 2 * left) <= 1
    assert abs(int(img[9, 9, 0]) - 2 * (top + 9)) <= 1 and abs(int(img[9, 9, 1]) - 2 * (left + 9)) <= 1


def test_json_captions_and_corrupt_rows():
    dec = DecodeCaption((8, 8))
    image = _png(_coordinate_image(8, 8))
    assert dec({"png": image, "json": json.dumps({"text": "from text"}).encode()})["caption"] == "from text"
    both = {"png": image, "json": json.dumps({"caption": "first", "prompt": "second"}).encode()}
    assert dec(both)["caption"] == "first"
    assert dec({"png": image, "txt": b""})["label"] == 0  # an empty caption is a caption
    for bad in (
        {"png": image},  # no caption
        {"png": image, "json": b'{"url": "x"}'},  # json without a caption field
        {"png": b"not an image", "txt": b"x"},
        {"txt": b"no image"},
    ):
        row = dec(bad)
        assert row["label"] == -1 and row["pixels"].abs().sum() == 0 and row["pixels"].shape == (3, 8, 8)


def test_stored_embeddings_are_decoded_and_checked():
    shapes = {"prompt_embeds": (5, 6), "pooled_prompt_embeds": (4,)}
    dec = DecodeCaption((8, 8), embeddings=shapes)
    e, p = np.arange(30, dtype=np.float16).reshape(5, 6), np.ones(4, np.float16)
    buf = {}
    for name, arr in (("prompt_embeds", e), ("pooled_prompt_embeds", p)):
        b = io.BytesIO()
        np.save(b, arr)
        buf[name] = b.getvalue()
    raw = {"png": _png(_coordinate_image(8, 8)), "txt": b"x"} | {f"{k}.npy": v for k, v in buf.items()}
    row = dec(raw)
    assert row["label"] == 0 and torch.equal(row["prompt_embeds"], torch.from_numpy(e.astype(np.float32)))
    wrong = dict(raw)
    wrong["pooled_prompt_embeds.npy"] = buf["prompt_embeds"]
    row = dec(wrong)
    assert row["label"] == -1 and row["pooled_prompt_embeds"].shape == (4,)


def _folder(root, n=7):
    rng = np.random.default_rng(0)
    (root / "sub").mkdir(parents=True)
    for i in range(n):
        h, w = (12, 20) if i % 2 else (20, 12)
        folder = root / "sub" if i % 3 == 0 else root
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"img.{i}.png")
        if i != 5:
            (folder / f"img.{i}.txt").write_text(f"caption {i}\n")
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / "sub" / "img.1.bmp")
    (root / "sub" / "img.1.txt").write_text("a bitmap")


def test_writer_from_a_folder_with_sidecars(tmp_path):
    _folder(tmp_path / "src")
    with pytest.warns(UserWarning, match="no caption"):
        index = write_caption_shards(tmp_path / "src", tmp_path / "out", maxcount=3, progress=False)
    assert index["total"] == 7 and len(index["shards"]) == 3 and "classes" not in index  # img.5 skipped
    assert read_index(tmp_path / "out") == index
    with pytest.raises(ShardsExistError, match="--overwrite"):
        write_caption_shards(tmp_path / "src", tmp_path / "out", progress=False)
    dm = CaptionWebDataModule(
        val_shards=str(tmp_path / "out"), resolution=[8, 12], batch_size=4, num_workers=0
    )
    batches = list(dm.val_dataloader())
    captions = sorted(c for b in batches for c in b["caption"])
    assert captions == sorted(["a bitmap"] + [f"caption {i}" for i in (0, 1, 2, 3, 4, 6)])
    b = batches[0]
    assert b["pixels"].shape == (4, 3, 8, 12) and b["label"].tolist() == [0] * 4
    assert b["original_size"].shape == (4, 2) and b["crop_top_left"].dtype == torch.long
    # the command line: refuses, then overwrites
    assert main([str(tmp_path / "src"), str(tmp_path / "out"), "--quiet"]) == 1
    assert (
        main([str(tmp_path / "src"), str(tmp_path / "out"), "--quiet", "--overwrite", "--allow-empty"]) == 0
    )
    assert read_index(tmp_path / "out")["total"] == 8
    # the shard-writing options (shared with `gspn write-shards`) reach the writer
    args = [str(tmp_path / "src"), str(tmp_path / "out"), "--quiet", "--overwrite", "--allow-empty"]
    assert main([*args, "--maxcount", "3", "--prefix", "cap", "--no-shuffle"]) == 0
    index = read_index(tmp_path / "out")
    assert [s["name"] for s in index["shards"]] == [f"cap-{i:06d}.tar" for i in range(3)]
    assert [s["count"] for s in index["shards"]] == [3, 3, 2]


def test_writer_with_a_captions_file(tmp_path):
    _folder(tmp_path / "src")
    rows = [{"file": "img.2.png", "caption": "two"}, {"file": "sub/img.3.png", "caption": "three"}]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "c.csv").write_text('file,caption\nimg.2.png,two\nsub/img.3.png,"three, with a comma"\n')
    with pytest.warns(UserWarning):
        pairs, skipped = caption_folder_samples(tmp_path / "src", tmp_path / "c.jsonl", shuffle_seed=None)
    assert [(p.name, c) for p, c in pairs] == [("img.2.png", "two"), ("img.3.png", "three")] and skipped == 6
    with pytest.warns(UserWarning):
        pairs, _ = caption_folder_samples(tmp_path / "src", tmp_path / "c.csv", shuffle_seed=None)
    assert [c for _, c in pairs] == ["two", "three, with a comma"]
    (tmp_path / "bad.jsonl").write_text('{"file": "img.2.png"}\n')
    with pytest.raises(ValueError, match="record 1 needs string fields"):
        caption_folder_samples(tmp_path / "src", tmp_path / "bad.jsonl")


def test_training_stream_random_crops_reproducibly(tmp_path):
    samples = [
        {"__key__": f"k{i}", "png": _png(_coordinate_image(16, 40)), "json": json.dumps({"caption": f"c{i}"})}
        for i in range(6)
    ]
    write_shards(samples, tmp_path / "s", maxcount=2, progress=False, labelled=False)
    kwargs = dict(train_shards=str(tmp_path / "s"), resolution=8, batch_size=3, num_workers=0, seed=5)
    first = next(iter(CaptionWebDataModule(random_crop=True, **kwargs).train_dataloader()))
    again = next(iter(CaptionWebDataModule(random_crop=True, **kwargs).train_dataloader()))
    assert torch.equal(first["pixels"], again["pixels"]) and first["caption"] == again["caption"]
    assert torch.equal(first["crop_top_left"], again["crop_top_left"])
    lefts = set()
    for seed in range(4):
        dm = CaptionWebDataModule(random_crop=True, **{**kwargs, "seed": seed})
        lefts |= set(next(iter(dm.train_dataloader()))["crop_top_left"][:, 1].tolist())
    assert len(lefts) > 3  # the crop position varies from sample to sample
    assert (first["crop_top_left"][:, 0] == 0).all() and (first["crop_top_left"][:, 1] <= 12).all()
    centre = next(iter(CaptionWebDataModule(**kwargs).train_dataloader()))
    assert centre["crop_top_left"].tolist() == [[0, 6]] * 3


def test_unlabelled_writer_rejects_labels_and_unknown_members(tmp_path):
    image = _png(_coordinate_image(4, 4))
    with pytest.raises(ValueError, match="take no 'cls'"):
        write_shards(
            [{"__key__": "a", "png": image, "cls": 0}], tmp_path / "a", progress=False, labelled=False
        )
    with pytest.raises(ValueError, match="unknown member 'caption'"):
        write_shards(
            [{"__key__": "a", "png": image, "caption": b"x"}], tmp_path / "b", progress=False, labelled=False
        )
    with pytest.raises(ValueError, match="embeddings is true"):
        write_shards(
            [{"__key__": "a", "png": image, "txt": "x"}], tmp_path / "c", progress=False, labelled=False
        )
        CaptionWebDataModule(val_shards=str(tmp_path / "c"), embeddings=True, num_workers=0).val_dataloader()
    with pytest.raises(ValueError, match="data.init_args.resolution"):
        CaptionWebDataModule(resolution=[8, 8, 8])


def test_writer_stores_prompt_embeddings_of_the_sdxl_folder(tmp_path, tiny_sdxl_dir):
    from gspn_lightning.models.sdxl_pipeline import encode_prompt, load_sdxl

    _folder(tmp_path / "src", n=3)
    args = [
        str(tmp_path / "src"),
        str(tmp_path / "out"),
        "--embed-with",
        str(tiny_sdxl_dir),
        "--batch-size",
        "3",
    ]
    assert main([*args, "--quiet"]) == 0
    assert main([*args, "--quiet"]) == 1  # refused before loading anything
    meta = read_index(tmp_path / "out")["meta"]["embeddings"]
    assert meta["prompt_embeds"] == [77, 32] and meta["pooled_prompt_embeds"] == [16]
    assert meta["sdxl"] == str(tiny_sdxl_dir.resolve())
    dm = CaptionWebDataModule(val_shards=str(tmp_path / "out"), resolution=8, batch_size=8, num_workers=0)
    assert dm.embedded_with == meta["sdxl"]
    (batch,) = list(dm.val_dataloader())
    assert batch["prompt_embeds"].shape == (4, 77, 32) and batch["pooled_prompt_embeds"].shape == (4, 16)
    parts = load_sdxl(tiny_sdxl_dir, parts=("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"))
    with torch.no_grad():
        embeds, pooled = encode_prompt(parts.tokenizers, parts.text_encoders, batch["caption"])
    # The shards were encoded in batches of 3, this check in one of 4: float32 sums in another order
    # can round to the neighbouring float16 value (seen on an AMD EPYC host), so one float16 ulp.
    ulp = dict(rtol=2.0**-10, atol=1e-6)
    torch.testing.assert_close(batch["prompt_embeds"], embeds.half().float(), **ulp)
    torch.testing.assert_close(batch["pooled_prompt_embeds"], pooled.half().float(), **ulp)
    off = CaptionWebDataModule(
        val_shards=str(tmp_path / "out"), resolution=8, embeddings=False, num_workers=0
    )
    assert "prompt_embeds" not in next(iter(off.val_dataloader()))
