"""blip: BLIP / BLIP-2 inference and fine-tuning, and CLIP-feature diffusion (a flow-matching DiT that generates CLIP-space features, the idea of BLIP3-o's image head).

Importing this package is cheap: torch and transformers load only when a command needs them.
"""

__version__ = "0.1.0"
