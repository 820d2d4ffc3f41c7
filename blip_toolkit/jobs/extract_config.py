"""The options of `blip extract-embeddings` (`ExtractConfig`, checked on construction), the settings
that define the data (`DATA_KEYS`: a resumed run must use the same ones) and what a run produced
(`ExtractSummary`). No torch import."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

from blip_toolkit.data.image_defaults import DEFAULT_MAX_PIXELS
from blip_toolkit.embeddings.format import (
    CROP_MODES,
    DEFAULT_COND,
    DEFAULT_TARGET,
    HEAD_POOLINGS,
    STORAGE_DTYPES,
    TOKEN_LAYOUTS,
)
from blip_toolkit.errors import UsageError

# Settings that define the data: a resumed run must use the same ones.
DATA_KEYS = (
    "cond_encoder",
    "target_encoder",
    "tokens",
    "pool",
    "cond_tokens",
    "cond_pool",
    "head_pool",
    "dtype",
    "encoder_dtype",
    "quantize",
    "shard_size",
    "max_pixels",
    "crop",
    "image_column",
    "key_column",
    "text_column",
)


@dataclass
class ExtractConfig:
    """Options of `extract-embeddings` (see the command's help for each)."""

    source: list[str]
    out: str
    cond_encoder: str = DEFAULT_COND
    target_encoder: str = DEFAULT_TARGET
    tokens: str = "patch"  # target token layout: patch | cls+patch
    pool: int | None = None  # average-pool the target's patch grid to pool x pool
    cond_tokens: str | None = None  # None: same as tokens
    cond_pool: int | None = None  # None: same as pool; 0: no pooling
    head_pool: str | None = None  # cls | mean | map; None: cls for cls+patch, mean for patch (SigLIP: map)
    crop: str = "center"  # center: both encoders see the image's centred square; none: each its own view
    dtype: str = "float16"  # storage
    encoder_dtype: str = "auto"
    quantize: str | None = None  # int8 | 4bit: quantized encoders (models/quantize.py)
    device: str = "auto"
    batch_size: int = 32
    shard_size: int = 256
    num_workers: int = 2
    max_pixels: int = DEFAULT_MAX_PIXELS
    allow_pipe: bool = False
    image_column: str = "image"  # Parquet / Arrow inputs: the image column
    key_column: str | None = None  # ... the key column (default: the row number within its file)
    text_column: str | None = None  # ... the captions column (a string or a list of strings)
    resume: bool = False
    overwrite: bool = False
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.source, str):
            self.source = [self.source]
        if self.tokens not in TOKEN_LAYOUTS:
            raise UsageError(f"--tokens {self.tokens!r}: use one of {', '.join(TOKEN_LAYOUTS)}")
        if self.cond_tokens is not None and self.cond_tokens not in TOKEN_LAYOUTS:
            raise UsageError(f"--cond-tokens {self.cond_tokens!r}: use one of {', '.join(TOKEN_LAYOUTS)}")
        if self.pool is not None and self.pool < 1:
            raise UsageError("--pool must be at least 1")
        if self.cond_pool is not None and self.cond_pool < 0:
            raise UsageError("--cond-pool must be 0 (no pooling) or more")
        if self.head_pool is not None and self.head_pool not in HEAD_POOLINGS:
            raise UsageError(f"--head-pool {self.head_pool!r}: use one of {', '.join(HEAD_POOLINGS)}")
        if self.crop not in CROP_MODES:
            raise UsageError(f"--crop {self.crop!r}: use one of {', '.join(CROP_MODES)}")
        if self.dtype not in STORAGE_DTYPES:
            raise UsageError(f"--dtype {self.dtype!r}: use one of {', '.join(STORAGE_DTYPES)}")
        if self.batch_size < 1 or self.shard_size < 1:
            raise UsageError("--batch-size and --shard-size must be at least 1")
        if self.num_workers < 0:
            raise UsageError("--num-workers must be 0 or more")
        if self.resume and self.overwrite:
            raise UsageError("--resume and --overwrite exclude each other")
        if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", str(self.out)):
            raise UsageError(
                f"--out {self.out}: embedding shards are written to a local directory (train-dit, sample "
                "and eval-recall memory-map them); copy the finished directory to object storage afterwards"
            )


@dataclass
class ExtractSummary:
    """What a run produced (read back from index.json on the main process)."""

    out: str
    samples: int
    captions: int
    shards: int
    errors: int
    skipped_shards: int = 0  # finished by an earlier run (--resume)
    seconds: float = 0.0
    is_main: bool = True
    errors_file: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
