"""Fixtures of the embedding tests: a tiny SigLIP (the shared builders have none), small sources
(folder with .txt captions, TSV with several captions per image, webdataset tars written with
tarfile), and one reference extraction reused by several tests."""

from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path

import pytest

# Captions the tiny tokenizers can spell (see blip_toolkit.models.scratch.tokenizers.DEFAULT_CORPUS).
CAPTIONS = {
    "astronaut.jpg": ["a photo of a cat", "a man riding a bike down a street"],
    "cat.jpg": ["a photo of a cat", "two cats laying on a couch"],
    "coffee.jpg": ["a bowl of fruit on a table"],
    "rocket.jpg": [
        "a child is flying a kite in a park",
        "a red car parked next to a tree",
        "a photo of a dog",
    ],
    "camera.jpg": ["a picture of"],
    "coins.jpg": ["an image of"],
    "brick.jpg": ["the quick brown fox jumps over the lazy dog"],
    "grass.jpg": ["a photo of a dog"],
}


@pytest.fixture(scope="session")
def enc(tiny_models, tmp_path_factory) -> dict[str, Path]:
    """Checkpoints for the encoder tests: the shared tiny models plus a tiny SigLIP."""
    import torch
    from transformers import SiglipConfig, SiglipModel, SiglipProcessor
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    from blip_toolkit.models.scratch import tokenizers as toks

    out = tmp_path_factory.mktemp("siglip")
    tokenizer = toks.clip_tokenizer(None)
    tokenizer.model_max_length = 16
    config = SiglipConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=16,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
    )
    torch.manual_seed(7)
    SiglipModel(config).save_pretrained(out)
    SiglipProcessor(
        image_processor=SiglipImageProcessorPil(size={"height": 32, "width": 32}), tokenizer=tokenizer
    ).save_pretrained(out)
    return {**tiny_models, "siglip": out}


@pytest.fixture(scope="session")
def photo_tsv(tmp_path_factory, sample_images) -> Path:
    """TSV manifest: the 8 sample photos, several captions for some (one row per caption)."""
    root = tmp_path_factory.mktemp("tsv")
    lines = []
    for image in sample_images:
        shutil.copy(image, root / image.name)
        for caption in CAPTIONS[image.name]:
            lines.append(f"{image.name}\t{caption}")
    (root / "captions.tsv").write_text("\n".join(lines) + "\n")
    return root / "captions.tsv"


@pytest.fixture
def photo_folder(tmp_path, sample_images) -> Path:
    """A folder of the sample photos (one in a subfolder), captions in same-name .txt files for most."""
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    for image in sample_images:
        dest = root / ("sub" if image.name == "cat.jpg" else "") / image.name
        shutil.copy(image, dest)
        if image.name != "grass.jpg":  # one image without captions
            dest.with_suffix(".txt").write_text("\n".join(CAPTIONS[image.name]) + "\n\n")
    return root


def write_tar(path: Path, samples: list[dict]) -> Path:
    """A webdataset tar: each sample {"__key__": k, "jpg": bytes, "txt": str, "json": obj, ...}."""
    import json

    with tarfile.open(path, "w") as tar:
        for sample in samples:
            for ext, value in sample.items():
                if ext == "__key__":
                    continue
                data = (
                    value
                    if isinstance(value, bytes)
                    else (value.encode() if isinstance(value, str) else json.dumps(value).encode())
                )
                info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def wds_dir(tmp_path, sample_images) -> Path:
    """Three tars: 3 + 3 + 2 samples; captions from txt, json {"caption"}, json list; a png."""
    from PIL import Image

    root = tmp_path / "wds"
    root.mkdir()
    images = list(sample_images)

    def png(path: Path) -> bytes:
        buffer = io.BytesIO()
        Image.open(path).save(buffer, format="PNG")
        return buffer.getvalue()

    samples = []
    for i, image in enumerate(images):
        caption = CAPTIONS[image.name]
        sample = {"__key__": f"{i:04d}"}
        if i == 4:
            sample["png"] = png(image)
        else:
            sample["jpg"] = image.read_bytes()
        if i % 3 == 0:
            sample["txt"] = "\n".join(caption)
        elif i % 3 == 1:
            sample["json"] = {"caption": caption[0], "width": 1}
        else:
            sample["json"] = caption
        samples.append(sample)
    write_tar(root / "part-000.tar", samples[0:3])
    write_tar(root / "part-001.tar", samples[3:6])
    write_tar(root / "part-002.tar", samples[6:8])
    return root


def wds_expected_captions(sample_images) -> list[list[str]]:
    out = []
    for i, image in enumerate(sample_images):
        caption = CAPTIONS[image.name]
        out.append(caption if i % 3 != 1 else caption[:1])
    return out


@pytest.fixture(scope="session")
def reference_run(enc, photo_tsv, tmp_path_factory) -> Path:
    """One float32 extraction (TSV source, cls+patch, no pooling, shard size 3, batch 2), reused by
    the reader and eval tests."""
    from blip_toolkit.jobs.extract import extract_embeddings
    from blip_toolkit.jobs.extract_config import ExtractConfig

    out = tmp_path_factory.mktemp("ref") / "emb"
    extract_embeddings(
        ExtractConfig(
            source=[str(photo_tsv)],
            out=str(out),
            cond_encoder=str(enc["blip2-opt"]),
            target_encoder=str(enc["clip"]),
            tokens="cls+patch",
            dtype="float32",
            shard_size=3,
            batch_size=2,
            num_workers=0,
        )
    )
    return out
