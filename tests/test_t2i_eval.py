"""``gspn t2i-eval``: a caption set through the tiny SD-XL over 2 ranks, resumed, then FID against real
images and the CLIP score of a tiny CLIP built from a config (saved into a local folder: nothing is
downloaded), held to a direct computation with the CLIP model."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gspn_lightning.cli.t2i_eval import main, read_captions
from tests.test_metrics import photo_crops, save_pngs, weights  # noqa: F401 - weights is a fixture

ROOT = Path(__file__).resolve().parents[1]
CAPTIONS = ["a photo of a cat on the table", "a red apple", "a blue house by the lake", "green trees"]
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from gspn_lightning.testing import make_tiny_clip

    return make_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


def test_read_captions_text_and_coco_json(tmp_path):
    (tmp_path / "c.txt").write_text("a cat\n\n  a dog  \n")
    assert read_captions(tmp_path / "c.txt") == ["a cat", "a dog"]
    coco = {"images": [], "annotations": [{"image_id": 1, "caption": "A cat\n on a mat."}, {"caption": "a dog"}]}
    (tmp_path / "c.json").write_text(json.dumps(coco))
    assert read_captions(tmp_path / "c.json") == ["A cat on a mat.", "a dog"]
    (tmp_path / "l.json").write_text(json.dumps(["x", "y"]))
    assert read_captions(tmp_path / "l.json") == ["x", "y"]
    (tmp_path / "bad.json").write_text(json.dumps({"annotations": [{"text": "x"}]}))
    with pytest.raises(KeyError):
        read_captions(tmp_path / "bad.json")
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(ValueError, match="no captions"):
        read_captions(tmp_path / "empty.txt")


def two_ranks(args: list[str]):
    """``gspn t2i-eval ARGS`` as ranks 0 and 1 of 2 (gloo on this machine): the processes and their
    (stdout, stderr)."""
    port = str(_free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "gspn_lightning.cli", "t2i-eval", *args],
            cwd=ROOT,
            env={**os.environ, **ONE_THREAD, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": "0",
                 "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port},  # fmt: skip
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    return procs, [p.communicate(timeout=900) for p in procs]


@pytest.mark.slow
def test_two_ranks_resume_fid_and_clip_score(tiny_sdxl_dir, tiny_clip, weights, tmp_path, monkeypatch, capsys):  # noqa: F811
    captions = tmp_path / "captions.json"
    captions.write_text(json.dumps({"annotations": [{"id": i, "caption": c} for i, c in enumerate(CAPTIONS)]}))
    reference = save_pngs(photo_crops(4, size=64), tmp_path / "real")
    out = tmp_path / "t2i"
    args = ["--sdxl", str(tiny_sdxl_dir), "--captions", str(captions), "--out", str(out), "--width", "64",
            "--height", "64", "--steps", "2", "--seed", "5", "--reference", str(reference), "--clip", str(tiny_clip),
            "--weights", str(weights), "--device", "cpu", "--no-progress", "--metrics", "fid,sfid"]  # fmt: skip
    procs, outs = two_ranks(args)
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    report = json.loads(outs[0][0])
    assert report["ranks"] == 2 and report["drew_on_rank_0"] == 2 and report["num_images"] == 4
    assert report == json.loads((out / "report.json").read_text())
    index = json.loads((out / "captions.json").read_text())
    assert [(e["file"], e["caption"], e["seed"]) for e in index] == [
        (f"{i:06d}.png", c, 5 + i) for i, c in enumerate(CAPTIONS)
    ]
    files = [out / "images" / e["file"] for e in index]
    images = np.stack([np.asarray(Image.open(f)) for f in files])
    assert images.shape == (4, 64, 64, 3)
    assert report["num_real"] == report["num_fake"] == 4 and report["fid"] > 1.0 and report["sfid"] > 1.0
    assert report["metrics"] == ["fid", "sfid"] and report["skipped"] == {}

    # the CLIP score, computed directly with the local CLIP model: 100 * cos, averaged, floored at 0
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(tiny_clip, local_files_only=True).eval()
    processor = CLIPProcessor.from_pretrained(tiny_clip, local_files_only=True)
    batch = processor(text=CAPTIONS, images=list(torch.from_numpy(images).permute(0, 3, 1, 2)),
                      return_tensors="pt", padding=True)  # fmt: skip
    with torch.no_grad():
        direct = model(**batch)
    cos = torch.nn.functional.cosine_similarity(direct.image_embeds, direct.text_embeds)
    assert report["clip_score"] == pytest.approx(max(float(100 * cos.mean()), 0.0), rel=1e-4)
    assert report["clip_score"] > 0.5  # (the random tiny CLIP happens to score these pairs above 0)

    # caption 2 alone through the pipeline in this process, with its seed: the same image
    from gspn_lightning.models.sdxl_generate import build_pipeline, draw_images

    pipe, _ = build_pipeline(tiny_sdxl_dir)
    again = draw_images(pipe, [CAPTIONS[2]], [5 + 2], 64, 64, 2, 5.0)[0]
    assert np.abs((again * 255).round().astype(int) - images[2].astype(int)).max() <= 1

    # a restart draws nothing that is there, and rescoring gives the same report
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    before = [f.stat().st_mtime_ns for f in files]
    (out / "images" / files[3].name).unlink()  # one image lost: only it is drawn again
    capsys.readouterr()
    assert main(args) == 0
    rerun = json.loads(capsys.readouterr().out)
    assert rerun["drew_on_rank_0"] == 1 and rerun["ranks"] == 1
    assert [f.stat().st_mtime_ns for f in files[:3]] == before[:3]
    assert np.abs(np.asarray(Image.open(files[3])).astype(int) - images[3].astype(int)).max() <= 1
    assert rerun["clip_score"] == pytest.approx(report["clip_score"], abs=0.05)
    # other settings into the same folder are refused, naming the difference, on one rank or on all
    with pytest.raises(SystemExit, match="steps: 2 there, 3 now"):
        main([*args[:-2], "--steps", "3"] + args[-2:])
    procs, outs = two_ranks([*args[:-2], "--steps", "3"] + args[-2:])
    assert [p.returncode for p in procs] == [1, 1]
    assert all("steps: 2 there, 3 now" in err for _, err in outs), outs[1][1][-2000:]
    assert len(list((out / "images").glob("*.png"))) == 4  # nothing drawn


def test_missing_clip_folder_or_reference_fails_before_drawing(tiny_sdxl_dir, tmp_path):
    (tmp_path / "c.txt").write_text("a cat\n")
    common = ["--sdxl", str(tiny_sdxl_dir), "--captions", str(tmp_path / "c.txt"), "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit, match="not a local CLIP folder"):
        main([*common, "--clip", str(tmp_path / "no-clip")])
    with pytest.raises(SystemExit, match="--reference .* does not exist"):
        main([*common, "--reference", str(tmp_path / "nothing")])
    assert not (tmp_path / "o").exists()
