"""The options of `blip extract-embeddings` (`ExtractConfig`, checked on construction), the settings
that define the data (`DATA_KEYS`: a resumed run must use the same ones) and what a run produced
(`ExtractSummary`). No torch import."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

from blip_toolkit.config import Quantize, setting
from blip_toolkit.data.image_defaults import DEFAULT_MAX_PIXELS
from blip_toolkit.embeddings.format import (
    CROP_MODES,
    DEFAULT_COND,
    DEFAULT_TARGET,
    HEAD_POOLINGS,
    STORAGE_DTYPES,
    TOKEN_LAYOUTS,
    CropMode,
    HeadPooling,
    StorageDtype,
    TokenLayoutName,
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
    """Options of `extract-embeddings`: each field is also its command-line option (cli/derive.py),
    with the help below. `out` comes first because it is required and `source` is the command's
    positional argument (the command fills it in)."""

    out: str = setting(
        help="Output directory, local (train-dit memory-maps the shards; see docs/formats.md, 'Embedding shards').",
        flags=("-o",),
    )
    source: list[str] = setting(factory=list, cli=False)
    cond_encoder: str = setting(
        DEFAULT_COND,
        help="Conditioning encoder: CLIP, SigLIP, BLIP, BLIP-2 or a bare vision tower (only its vision tower is loaded).",
    )
    target_encoder: str = setting(
        DEFAULT_TARGET,
        help="Target encoder: CLIP, SigLIP or BLIP ITM (gives text embeddings and its own image embedding).",
    )
    tokens: TokenLayoutName = setting("patch", help="Tokens stored: the patch grid, or CLS + patch grid.")
    pool: int | None = setting(
        None,
        help="Average-pool the patch grid to NxN (8 -> 64 tokens, as BLIP3-o pools its target features); "
        "the CLS token is not pooled. [default: no pooling]",
        min=1,
    )
    cond_tokens: TokenLayoutName | None = setting(
        None, help="Token layout of the conditioning encoder. [default: --tokens]"
    )
    cond_pool: int | None = setting(
        None, help="Pooling of the conditioning grid (0: none). [default: --pool]", min=0
    )
    head_pool: HeadPooling | None = setting(
        None,
        help="How the target head pools tokens to the global embedding. "
        "[default: cls for cls+patch, mean for patch; SigLIP: map]",
    )
    crop: CropMode = setting(
        "center",
        help="center: cut every image to its centred square once, before both processors, so token (i, j) "
        "of both encoders sees the same pixels (BLIP / BLIP-2 processors squash, CLIP's crop). none: each "
        "processor gets the whole image.",
    )
    dtype: StorageDtype = setting("float16", help="Storage dtype of the embeddings.")
    encoder_dtype: str = setting(
        "auto",
        help="Dtype the encoders run in: auto (float32 on CPU, float16 on CUDA), float32, float16, bfloat16.",
    )
    quantize: Quantize | None = setting(
        None,
        help="Quantized weights: int8 or 4bit (CUDA: bitsandbytes; CPU: int8 = torch dynamic int8, "
        "4bit = bitsandbytes' CPU backend). Needs the quantize extra for bitsandbytes.",
    )
    device: str = setting("auto", help="auto, cpu, cuda or cuda:N.")
    batch_size: int = setting(32, help="Images per forward pass.", flags=("-b",), min=1)
    shard_size: int = setting(
        256, help="Images per output shard (also the memory bound: one shard of outputs).", min=1
    )
    num_workers: int = setting(2, help="DataLoader processes decoding images while the encoders run.", min=0)
    max_pixels: int = setting(
        DEFAULT_MAX_PIXELS,
        help="Refuse images with more pixels than this (decompression-bomb guard).",
        min=1,
    )
    allow_pipe: bool = setting(False, help="Accept 'pipe:' webdataset URLs (they run shell commands).")
    image_column: str = setting(
        "image",
        help="Parquet / Arrow inputs: the column holding each image (bytes, datasets' {bytes, path} "
        "struct, or a path / URL relative to the file).",
    )
    key_column: str | None = setting(
        None,
        help="Parquet / Arrow inputs: the column naming each row (default: its row number in the file).",
    )
    text_column: str | None = setting(
        None, help="Parquet / Arrow inputs: the column of captions (a string or a list of strings)."
    )
    resume: bool = setting(False, help="Continue an interrupted run in the same output.")
    overwrite: bool = setting(False, help="Replace existing outputs.")
    trust_remote_code: bool = setting(
        False, help="Allow a checkpoint's own Python code to run (off by default)."
    )

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
