"""Training-image augmentation (`augment_shift`): a zero-filled shift by whole pixels, drawn per
(seed, epoch, example); the validation images are never shifted."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from blip_toolkit.errors import UsageError
from blip_toolkit.training.config import FinetuneConfig
from blip_toolkit.training.data import Example, ManifestDataset, shift_image
from blip_toolkit.training.finetune import run_finetune

from .helpers import CAPTIONS, SAMPLES


def reference_shift(pixels: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """pixels [H, W, C] moved right by dx, down by dy, the uncovered border zero (numpy slicing)."""
    h, w = pixels.shape[:2]
    out = np.zeros_like(pixels)
    out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = pixels[
        max(-dy, 0) : h - max(dy, 0), max(-dx, 0) : w - max(dx, 0)
    ]
    return out


@pytest.mark.parametrize("dx, dy", [(0, 0), (1, 0), (0, -2), (-3, 2), (2, 2)])
def test_shift_moves_the_pixels_and_fills_black(dx, dy):
    pixels = np.random.default_rng(0).integers(1, 256, (7, 9, 3), dtype=np.uint8)
    shifted = np.asarray(shift_image(Image.fromarray(pixels), dx, dy))
    assert shifted.shape == pixels.shape
    np.testing.assert_array_equal(shifted, reference_shift(pixels, dx, dy))


def dataset(shift: int, seed: int = 0) -> ManifestDataset:
    examples = [
        Example(index=i, image=str(SAMPLES / image), line=i + 2, image_id=i, prefix="", target=caption)
        for i, (image, caption) in enumerate(CAPTIONS)
    ]
    return ManifestDataset(examples, "captions.tsv", augment_shift=shift, seed=seed)


def test_dataset_shifts_each_example_per_epoch_from_the_seed():
    plain, augmented = dataset(0), dataset(2, seed=5)
    shifts = {}
    for epoch in range(6):
        augmented.set_epoch(epoch)
        for i in range(len(augmented)):
            dx, dy = augmented.shift_of(i)
            assert -2 <= dx <= 2 and -2 <= dy <= 2
            shifts[(epoch, i)] = (dx, dy)
            original = np.asarray(plain[i]["image"])
            np.testing.assert_array_equal(
                np.asarray(augmented[i]["image"]), reference_shift(original, dx, dy)
            )
    assert len(set(shifts.values())) > 5  # the draws vary over examples and epochs
    assert [shifts[(e, 0)] for e in range(6)] != [shifts[(0, 0)]] * 6
    again = dataset(2, seed=5)
    again.set_epoch(3)
    assert [again.shift_of(i) for i in range(len(again))] == [shifts[(3, i)] for i in range(len(again))]
    other = dataset(2, seed=6)
    other.set_epoch(3)
    assert [other.shift_of(i) for i in range(len(other))] != [shifts[(3, i)] for i in range(len(other))]


def test_negative_shift_is_refused():
    with pytest.raises(UsageError, match="augment_shift"):
        FinetuneConfig(augment_shift=-1)


def test_finetuning_with_shifts_is_repeatable_and_trains_on_other_pixels(checkpoint, tmp_path):
    source = checkpoint("blip-caption")
    weights = {}
    for name, shift in (("a", 1), ("b", 1), ("plain", 0)):
        out = tmp_path / name
        run_finetune(
            FinetuneConfig(
                manifest=str(SAMPLES / "captions.tsv"),
                task="caption",
                model=str(source),
                output_dir=str(out),
                max_steps=2,
                batch_size=4,
                learning_rate=1e-3,
                seed=1,
                augment_shift=shift,
            )
        )
        weights[name] = load_file(str(out / "model.safetensors"))
    patch = "vision_model.embeddings.patch_embedding.weight"
    assert all(torch.equal(weights["a"][k], weights["b"][k]) for k in weights["a"])
    assert not torch.equal(weights["a"][patch], weights["plain"][patch])
