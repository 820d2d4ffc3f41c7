"""The predictors' settings, declared once: decoding (`GenerationOptions`, shared by caption, vqa,
`blip eval`, the UI and the demo) and each predictor's own options. Each field carries its
command-line help (config.setting), from which `blip caption | vqa | retrieval | eval` derive their
options. No torch here: the CLI reads these classes for --help."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from blip_toolkit.config import setting
from blip_toolkit.data.image_defaults import DEFAULT_MAX_PIXELS
from blip_toolkit.errors import UsageError

if TYPE_CHECKING:
    from blip_toolkit.pipeline.stream import RunSettings

DEFAULT_TEMPLATE = "Question: {} Answer:"
ITM_SCORES = ("itm+itc", "itm", "itc")


@dataclass
class GenerationOptions:
    """Decoding: greedy by default, beam search with num_beams > 1, nucleus sampling with `sample`."""

    max_new_tokens: int = setting(30, help="Maximum length in new tokens.", min=1)
    min_new_tokens: int = setting(0, help="Generate at least this many tokens.", min=0)
    num_beams: int = setting(1, help="Beam search width (1 = greedy).", min=1)
    sample: bool = setting(False, help="Sample instead of greedy / beam decoding.")
    top_p: float = setting(0.9, help="Nucleus sampling mass (with --sample).", min=0.0, max=1.0)
    temperature: float = setting(1.0, help="Sampling temperature (with --sample).", min=0.0)
    seed: int | None = setting(None, help="Seed for --sample (same batch size = same output).")

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise UsageError("--max-new-tokens must be at least 1")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise UsageError("--min-new-tokens must be between 0 and --max-new-tokens")
        if self.num_beams < 1:
            raise UsageError("--num-beams must be at least 1")
        if not 0 < self.top_p <= 1:
            raise UsageError("--top-p must be in (0, 1]")
        if self.temperature <= 0:
            raise UsageError("--temperature must be positive")

    def fingerprint(self) -> dict[str, Any]:
        """The decoding options that change the text (sampling ones only when sampling)."""
        out: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "min_new_tokens": self.min_new_tokens,
            "num_beams": self.num_beams,
            "sample": self.sample,
        }
        if self.sample:
            out.update(top_p=self.top_p, temperature=self.temperature, seed=self.seed)
        return out

    def generate_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "num_beams": self.num_beams}
        if self.min_new_tokens:
            kwargs["min_new_tokens"] = self.min_new_tokens
        if self.sample:
            kwargs.update(do_sample=True, top_p=self.top_p, temperature=self.temperature)
        else:
            kwargs["do_sample"] = False
        return kwargs


@dataclass
class BatchOptions:
    """How a predictor runs over its inputs (none of these changes the results)."""

    batch_size: int = setting(8, help="Images per forward pass.", flags=("-b",), min=1)
    max_pixels: int = setting(
        DEFAULT_MAX_PIXELS, help="Refuse images with more pixels than this (decompression-bomb guard).", min=1
    )
    num_workers: int | None = setting(
        0, help="DataLoader processes decoding images while the model runs (unset: per the machine).", min=0
    )

    def settings(self) -> RunSettings:
        from blip_toolkit.pipeline.stream import RunSettings

        return RunSettings(self.batch_size, self.num_workers, self.max_pixels)


@dataclass
class CaptionOptions(BatchOptions):
    prompt: str | None = setting(
        None,
        help="Conditional captioning: the caption continues this text (which is not repeated in the "
        "output); InstructBLIP: the instruction [default: 'A short image caption.'].",
    )
    generation: GenerationOptions = setting(factory=GenerationOptions, cli=False)

    def fingerprint(self) -> dict:
        """The options that change the captions (a resumed run must keep them)."""
        return {"task": "caption", "prompt": self.prompt or None, **self.generation.fingerprint()}


@dataclass
class VqaOptions(BatchOptions):
    template: str = setting(
        DEFAULT_TEMPLATE,
        help="BLIP-2 prompt; {} is replaced by the question. BLIP VQA checkpoints take the bare question.",
    )
    generation: GenerationOptions = setting(factory=lambda: GenerationOptions(max_new_tokens=10), cli=False)

    def __post_init__(self) -> None:
        if self.template.count("{}") != 1:
            raise UsageError(f"--template {self.template!r} must contain exactly one {{}} for the question")

    def fingerprint(self) -> dict:
        return {"task": "vqa", "template": self.template, **self.generation.fingerprint()}


@dataclass
class RetrievalOptions(BatchOptions):
    score: str | None = setting(
        None,
        help="itm, itc or itm+itc for ITM checkpoints [default: itm+itc]; generative BLIP-2 uses likelihood.",
    )
    top: int | None = setting(None, help="Keep only the best N texts per image.", min=1)
    # LAVIS's k_test: only each image's `shortlist` texts of highest ITC are re-scored by the ITM head.
    shortlist: int | None = setting(
        None,
        help="ITM checkpoints: re-score only each image's N texts of highest ITC with the ITM head, and "
        "list only those (default: every text).",
        min=1,
    )

    def __post_init__(self) -> None:
        if self.top is not None and self.top < 1:
            raise UsageError("--top must be at least 1")
        if self.shortlist is not None and self.shortlist < 1:
            raise UsageError("--shortlist must be at least 1")
        if self.score is not None and self.score not in ITM_SCORES + ("likelihood",):
            raise UsageError(f"--score {self.score!r}: use one of {', '.join(ITM_SCORES)} or likelihood")

    def fingerprint(self, texts: list[str]) -> dict:
        digest = hashlib.sha256("\n".join(texts).encode("utf-8")).hexdigest()
        out = {
            "task": "retrieval",
            "score": self.score,
            "top": self.top,
            "texts": len(texts),
            "texts_sha256": digest,
        }
        if self.shortlist is not None:  # only when set: fingerprints of earlier runs stay valid
            out["shortlist"] = self.shortlist
        return out
