"""The options of `blip eval-recall` (`RecallConfig`), checked on construction. No torch import: the
CLI derives its options from these fields (cli/derive.py) when it builds the command."""

from __future__ import annotations

from dataclasses import dataclass

from blip_toolkit.config import setting
from blip_toolkit.errors import UsageError

FEATURES = ("baseline", "gt-pooled", "generated")


@dataclass
class RecallConfig:
    """Options of `eval-recall`. `dir` is the command's argument; `ks` its `--k` (which also takes
    "1,5,10" spellings the command parses); `batch_size` has no flag."""

    dir: str = setting(cli=False)
    features: list[str] | None = setting(
        None,
        help="Comma-separated: baseline, gt-pooled, generated. [default: all available]",
    )  # None: every feature available; "a,b" entries are split
    generated: str | None = setting(
        None,
        help="Generated target tokens: a safetensors file written by blip sample, or its sweep directory "
        "(several --steps / --cfg-scale values: every setting is scored, the best one reported).",
    )
    ks: list[int] = setting(factory=lambda: [1, 5, 10], cli=False)
    dedupe_captions: bool = setting(
        False, help="Treat identical caption strings as one text (positive for every image that has it)."
    )
    # A size ("2GB", "512MiB") or a number of bytes (int; the command line gives strings).
    max_memory: str = setting("2GB", help="Memory budget of the similarity computation, e.g. 2GB or 512MiB.")
    device: str = setting("cpu", help="Where the similarity blocks are computed (cpu, cuda, cuda:N).")
    batch_size: int = setting(1024, cli=False)  # rows per head pass

    def __post_init__(self) -> None:
        if self.features is not None:
            self.features = [
                part.strip() for item in self.features for part in item.split(",") if part.strip()
            ]
            unknown = [f for f in self.features if f not in FEATURES]
            if unknown:
                raise UsageError(f"--features {','.join(unknown)}: unknown (use {', '.join(FEATURES)})")
            if not self.features:
                raise UsageError("--features is empty")
            if "generated" in self.features and not self.generated:
                raise UsageError("--features generated needs --generated FILE")
        if not self.ks or any(k < 1 for k in self.ks):
            raise UsageError("--k takes positive integers (e.g. --k 1,5,10)")
