"""Names and choices of the embedding-shard format (docs/formats.md, "Embedding shards"), declared
once for the writer, the reader, the extraction config and the CLI. No torch import."""

from __future__ import annotations

import typing
from typing import Literal

FORMAT = "blip-embeddings"
VERSION = 1
SHARD_FORMAT = "blip-embeddings-shard"
GENERATED_FORMAT = "blip-generated"
GENERATED_VERSION = 1
# A guidance / steps sweep of `blip sample`: a directory of generated-features files listed in sweep.json.
SWEEP_FORMAT = "blip-generated-sweep"
SWEEP_VERSION = 1
SWEEP_FILE = "sweep.json"
INDEX_FILE = "index.json"
HEAD_FILE = "target_head.safetensors"
ERRORS_FILE = "errors.jsonl"
RUN_KIND = "blip-extract-embeddings"
# The toolkit's defaults (not BLIP3-o's, whose DiT is conditioned on a language model's hidden states
# and generates EVA-CLIP features): EVA ViT-g/14 (BLIP-2's vision tower, 1408-d) conditions, CLIP
# ViT-L/14 is the target.
DEFAULT_COND = "Salesforce/blip2-opt-2.7b"
DEFAULT_TARGET = "openai/clip-vit-large-patch14"

# Per shard: cond [n, M, Dc], target [n, N, Dt], target_global [n, E], text_emb [c, E], caption_image [c].
TENSORS = ("cond", "target", "target_global", "text_emb", "caption_image")
IMAGE_TENSORS = ("cond", "target", "target_global")  # one row per image
SAMPLE_FIELDS = ("cond", "target", "target_global", "text_emb", "key", "image", "captions", "index")

StorageDtype = Literal["float16", "bfloat16", "float32"]
STORAGE_DTYPES: tuple[str, ...] = typing.get_args(StorageDtype)
TokenLayoutName = Literal["patch", "cls+patch"]
TOKEN_LAYOUTS: tuple[str, ...] = typing.get_args(TokenLayoutName)
HeadPooling = Literal["cls", "mean", "map"]
HEAD_POOLINGS: tuple[str, ...] = typing.get_args(HeadPooling)
CropMode = Literal["center", "none"]
CROP_MODES: tuple[str, ...] = typing.get_args(CropMode)
VerifyMode = Literal["lazy", "open", "none"]
VERIFY_MODES: tuple[str, ...] = typing.get_args(VerifyMode)
