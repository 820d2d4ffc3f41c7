"""extract-embeddings --quantize: the encoders' tower layers are int8 on CPU, the target's projection
(from which the target head is built) is not, so the saved head equals the float one exactly, and the
tokens stay close to the float encoder's."""

from __future__ import annotations

import json

import torch
from torch import nn
from torch.nn import functional as F

from blip_toolkit.embeddings.shard_reader import EmbeddingShards
from blip_toolkit.models.adapters import load_encoder


def test_quantized_encoders_keep_the_target_head_in_float(enc, sample_images):
    from blip_toolkit.data.images import open_image

    images = [open_image(p) for p in sample_images[:4]]
    for source, role in ((enc["blip2-opt"], "cond"), (enc["clip"], "target")):
        plain = load_encoder(str(source), role)
        quantized = load_encoder(str(source), role, quantize="int8")
        kinds = {type(m) for m in quantized.vision.modules()}
        assert torch.ao.nn.quantized.dynamic.Linear in kinds and nn.Linear not in kinds
        pixels = plain.image_processor(images, return_tensors="pt")["pixel_values"]
        similarity = F.cosine_similarity(plain.tokens(pixels), quantized.tokens(pixels), dim=-1)
        assert float(similarity.min()) > 0.98
    assert type(quantized.model.visual_projection) is nn.Linear
    head_plain = plain.head("cls", has_cls=True).state_dict()
    head_quantized = quantized.head("cls", has_cls=True).state_dict()
    assert all(torch.equal(head_plain[k], head_quantized[k]) for k in head_plain)


def test_extract_embeddings_with_quantize(cli, enc, photo_tsv, tmp_path):
    out = tmp_path / "emb"
    result = cli(
        "extract-embeddings", photo_tsv, "--out", out, "--cond-encoder", enc["blip2-opt"],
        "--target-encoder", enc["clip"], "--quantize", "int8", "--num-workers", "0", "--shard-size", "4",
    )  # fmt: skip
    assert result.code == 0, result.stderr
    assert json.loads((out / "blip_run.json").read_text())["config"]["quantize"] == "int8"
    shards = EmbeddingShards(out)
    assert len(shards) > 0
