"""blip: BLIP / BLIP-2 inference and fine-tuning, and BLIP3-o style CLIP-feature diffusion.

Importing this package is cheap: torch and transformers load only when a command needs them.
"""

__version__ = "0.1.0"
