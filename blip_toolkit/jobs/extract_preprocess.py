"""What both encoders of `blip extract-embeddings` are fed: the decoded image, cut once to its centred
square (crop "center", the default), then each encoder's own processor.

Image processors disagree on non-square images (BLIP / BLIP-2 squash the whole image to a square,
CLIP resizes the short side and centre-crops), so without the crop token (i, j) of one grid and token
(i, j) of the other cover different parts of the image. On a square image both processors keep all
of it (`square_coverage` says when one does not).
"""

from __future__ import annotations

from blip_toolkit.embeddings.format import CROP_MODES


def center_square(image):
    """The centred square of a PIL image, side min(width, height); the offsets round down as
    transformers' `center_crop` rounds them. A square image is returned as it is."""
    width, height = image.size
    side = min(width, height)
    if width == height:
        return image
    left, top = (width - side) // 2, (height - side) // 2
    return image.crop((left, top, left + side, top + side))


def _field(size, name: str):
    """A field of a processor's size dict (a transformers SizeDict or a plain dict)."""
    return size.get(name) if isinstance(size, dict) else getattr(size, name, None)


def square_coverage(processor) -> float:
    """The fraction of a square image's side that `processor` keeps: 1.0 unless it centre-crops a
    smaller square out of its resize (e.g. a CLIP processor with shortest_edge 256 and crop 224)."""
    if not getattr(processor, "do_center_crop", False):
        return 1.0
    size, crop = getattr(processor, "size", None), getattr(processor, "crop_size", None)
    if size is None or crop is None:
        return 1.0
    edge = _field(size, "shortest_edge") or min(
        (v for v in (_field(size, "height"), _field(size, "width")) if v), default=0
    )
    kept = min((v for v in (_field(crop, "height"), _field(crop, "width")) if v), default=0)
    return min(kept / edge, 1.0) if edge and kept else 1.0


class Preprocess:
    """Decoded image -> the pixel values of both encoders (picklable, runs in DataLoader workers).

    crop "center": the image is cut to its centred square once, then every processor sees that same
    square (see the module docstring); "none": each processor gets the whole image."""

    def __init__(self, processors, crop: str = "center"):
        if crop not in CROP_MODES:
            raise ValueError(f"crop must be one of {', '.join(CROP_MODES)}, got {crop!r}")
        self.processors = tuple(processors)
        self.crop = crop

    def __call__(self, image, text=None) -> dict:
        """The pipeline's encoder: {"cond_pixels": [1, 3, H, W], "target_pixels": [1, 3, H', W']}."""
        if self.crop == "center":
            image = center_square(image)
        cond, target = (p(images=[image], return_tensors="pt")["pixel_values"] for p in self.processors)
        return {"cond_pixels": cond, "target_pixels": target}
