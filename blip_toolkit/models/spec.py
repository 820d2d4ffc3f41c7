"""`LoadSpec`: which checkpoint to load and how. The one loading spec that every command, `blip eval`,
the UI and the demo pass around (models/loading.py opens it). No torch here: the CLI derives its
--model / --device / --dtype / --quantize / --trust-remote-code options from these fields."""

from __future__ import annotations

from dataclasses import dataclass

from blip_toolkit.config import Quantize, setting

# The checkpoint of each task when --model is not given.
DEFAULT_MODELS = {
    "caption": "Salesforce/blip-image-captioning-base",
    "vqa": "Salesforce/blip-vqa-base",
    "retrieval": "Salesforce/blip-itm-base-coco",
}


@dataclass
class LoadSpec:
    model: str | None = setting(
        None, help="Hub id (org/name) or local checkpoint directory. [default: per task]", flags=("-m",)
    )
    device: str = setting("auto", help="auto, cpu, cuda or cuda:N.")
    dtype: str = setting(
        "auto",
        help="auto, float32, float16 or bfloat16 (auto: float16 on CUDA; on CPU bfloat16 where the CPU "
        "computes it fast and the model is wide enough, else float32).",
    )
    quantize: Quantize | None = setting(
        None,
        help="Quantized weights: int8 or 4bit (CUDA: bitsandbytes; CPU: int8 = torch dynamic int8, "
        "4bit = bitsandbytes' CPU backend). Needs the quantize extra for bitsandbytes.",
    )
    trust_remote_code: bool = setting(
        False, help="Allow a checkpoint's own Python code to run (off by default)."
    )

    def source(self, task: str) -> str:
        """The checkpoint: --model, or the task's default."""
        return self.model or DEFAULT_MODELS[task]
