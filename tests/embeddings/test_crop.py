"""--crop center: both encoders see the same pixels, so token (i, j) of the conditioning grid and token
(i, j) of the target grid cover the same region of a non-square image.

The image encodes its own coordinates (red = x, green = y of the source pixel), so the mean colour of
the pixels behind a token, decoded from each processor's pixel_values, says which part of the source
image that token sees. The processors are the two kinds the hub checkpoints configure: BLIP / BLIP-2
(resize to a square: "squash") and CLIP (resize the shortest edge, then centre-crop), once as the tiny
checkpoints of the tests ship them (what extraction loads) and once with the hub checkpoints' settings
(224 px, bicubic; Salesforce/blip2-opt-2.7b and openai/clip-vit-large-patch14 preprocessor configs)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from blip_toolkit.embeddings.shard_reader import EmbeddingShards
from blip_toolkit.errors import UsageError
from blip_toolkit.jobs.extract import extract_embeddings
from blip_toolkit.jobs.extract_config import ExtractConfig
from blip_toolkit.jobs.extract_preprocess import Preprocess, center_square, square_coverage

WIDTH, HEIGHT = 240, 90  # 8:3, far from square


def coordinate_image(width: int = WIDTH, height: int = HEIGHT) -> Image.Image:
    """RGB image whose pixel (x, y) is (x, y, 0)."""
    x = np.broadcast_to(np.arange(width, dtype=np.uint8)[None, :], (height, width))
    y = np.broadcast_to(np.arange(height, dtype=np.uint8)[:, None], (height, width))
    return Image.fromarray(np.stack([x, y, np.zeros_like(x)], axis=-1), "RGB")


def token_centres(pixels: torch.Tensor, processor, grid: int) -> torch.Tensor:
    """pixel_values [3, S, S] -> [grid, grid, 2]: the mean source (x, y) behind each token's patch."""
    mean = torch.tensor(processor.image_mean).view(3, 1, 1)
    std = torch.tensor(processor.image_std).view(3, 1, 1)
    values = (pixels * std + mean) * 255  # undo normalize and rescale: the resampled source colours
    side = pixels.shape[-1]
    patch = side // grid
    xy = values[:2].reshape(2, grid, patch, grid, patch).mean(dim=(2, 4))  # [2, grid, grid]
    return xy.permute(1, 2, 0)  # [row, column, (x, y)]


def expected_centres(grid: int, left: float, top: float, side_x: float, side_y: float) -> torch.Tensor:
    """Closed form: token (i, j) of a region [left, left + side_x) x [top, top + side_y) sees the
    source pixels whose values average to the centre of its cell, minus half a pixel (pixel x holds
    the value x but covers [x, x + 1))."""
    cell = torch.arange(grid, dtype=torch.float64) + 0.5
    x = left + cell * side_x / grid - 0.5
    y = top + cell * side_y / grid - 0.5
    return torch.stack(torch.meshgrid(y, x, indexing="ij")[::-1], dim=-1).float()


def hub_processors():
    """The two processors as the hub checkpoints configure them (224 px, bicubic = resample 3)."""
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    blip2 = BlipImageProcessorPil(
        size={"height": 224, "width": 224},
        resample=3,
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    clip = CLIPImageProcessorPil(
        size={"shortest_edge": 224},
        crop_size={"height": 224, "width": 224},
        resample=3,
        do_center_crop=True,
    )
    return blip2, clip, 16  # ViT-g/14 and ViT-L/14 at 224 px: 16 x 16 patches


def tiny_processors(enc):
    """The processors extraction loads for the tiny BLIP-2 and CLIP checkpoints (32 px, 8 px patches)."""
    from blip_toolkit.models.adapters import load_encoder

    cond = load_encoder(str(enc["blip2-opt"]), "cond")
    target = load_encoder(str(enc["clip"]), "target")
    assert cond.grid == target.grid == 4
    return cond.image_processor, target.image_processor, 4


@pytest.mark.parametrize("which", ["tiny", "hub"])
def test_center_crop_gives_both_encoders_the_same_region_per_token(which, enc):
    squash, clip, grid = tiny_processors(enc) if which == "tiny" else hub_processors()
    # The two kinds really differ: one squashes, the other crops.
    assert not getattr(squash, "do_center_crop", False) and clip.do_center_crop
    image = coordinate_image()
    side = min(WIDTH, HEIGHT)
    left = (WIDTH - side) // 2

    pixels = Preprocess((squash, clip), "center")(image)
    cond_px, target_px = pixels["cond_pixels"][0], pixels["target_pixels"][0]
    cond_xy, target_xy = token_centres(cond_px, squash, grid), token_centres(target_px, clip, grid)
    # Every token of both grids sees the same place, and that place is the token's cell of the
    # image's centred square (resampling moves a patch's mean by well under a source pixel).
    torch.testing.assert_close(cond_xy, target_xy, atol=0.6, rtol=0)
    torch.testing.assert_close(cond_xy, expected_centres(grid, left, 0, side, side), atol=0.6, rtol=0)

    # Without the crop the grids disagree: the squashing processor spreads the whole width over its
    # columns, CLIP's keeps the central square. Column 0 of one is ~60 source pixels from the other's.
    pixels = Preprocess((squash, clip), "none")(image)
    cond_px, target_px = pixels["cond_pixels"][0], pixels["target_pixels"][0]
    cond_xy, target_xy = token_centres(cond_px, squash, grid), token_centres(target_px, clip, grid)
    torch.testing.assert_close(cond_xy, expected_centres(grid, 0, 0, WIDTH, HEIGHT), atol=0.6, rtol=0)
    # CLIP's own crop of the resized image rounds its offset to whole pixels of the resize (85 px wide at
    # 32 px: offset 26, i.e. 73 source pixels instead of 75): close to the central square, not exactly.
    torch.testing.assert_close(target_xy, expected_centres(grid, left, 0, side, side), atol=2.5, rtol=0)
    assert float((cond_xy[..., 0] - target_xy[..., 0]).abs().max()) > 50


def test_center_square_is_transformers_center_crop():
    from transformers.image_transforms import center_crop

    for width, height in [(240, 90), (91, 240), (101, 100), (64, 64)]:
        image = coordinate_image(min(width, 255), min(height, 255)).resize((width, height))
        side = min(width, height)
        reference = center_crop(np.asarray(image), (side, side), input_data_format="channels_last")
        assert np.array_equal(np.asarray(center_square(image)), reference)


def test_square_coverage_reads_the_processor_settings():
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    squash, clip, _ = hub_processors()
    assert square_coverage(squash) == 1.0 and square_coverage(clip) == 1.0
    narrower = CLIPImageProcessorPil(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224})
    assert square_coverage(narrower) == 224 / 256


def test_extraction_records_the_crop_and_stores_the_cropped_images_tokens(cli, enc, tmp_path):
    """A non-square image extracted with --crop center gives the tokens of its centred square
    extracted with --crop none; the crop is in index.json and a --resume must keep it."""
    folder, square_folder = tmp_path / "wide", tmp_path / "square"
    folder.mkdir()
    square_folder.mkdir()
    image = coordinate_image()
    image.save(folder / "wide.png")
    (folder / "wide.txt").write_text("a photo of a cat\n")
    side, left = HEIGHT, (WIDTH - HEIGHT) // 2
    image.crop((left, 0, left + side, side)).save(square_folder / "wide.png")
    (square_folder / "wide.txt").write_text("a photo of a cat\n")

    def run(source, out, **kwargs):
        config = dict(cond_encoder=str(enc["blip2-opt"]), target_encoder=str(enc["clip"]), dtype="float32")
        config.update(num_workers=0, **kwargs)
        extract_embeddings(ExtractConfig(source=[str(source)], out=str(out), **config))
        return EmbeddingShards(out)

    centre = run(folder, tmp_path / "centre")  # the default
    cropped_by_hand = run(square_folder, tmp_path / "by-hand", crop="none")
    result = cli(
        "extract-embeddings",
        folder,
        "--out",
        tmp_path / "whole",
        "--crop",
        "none",
        "--dtype",
        "float32",
        "--cond-encoder",
        enc["blip2-opt"],
        "--target-encoder",
        enc["clip"],
        "--num-workers",
        "0",
    )
    assert result.code == 0, result.stderr
    whole = EmbeddingShards(tmp_path / "whole")
    for name in ("cond", "target", "target_global"):
        torch.testing.assert_close(centre[0][name], cropped_by_hand[0][name])
    assert not torch.allclose(centre[0]["target"], whole[0]["target"], atol=1e-3)
    assert json.loads((tmp_path / "centre" / "index.json").read_text())["crop"] == "center"
    assert json.loads((tmp_path / "whole" / "index.json").read_text())["crop"] == "none"

    with pytest.raises(UsageError, match="crop: 'none' -> 'center'"):
        run(folder, tmp_path / "whole", resume=True)
    # A directory written before --crop existed (no crop in its run record) was extracted uncropped.
    record_file = tmp_path / "whole" / "blip_run.json"
    record = json.loads(record_file.read_text())
    del record["config"]["crop"]
    record_file.write_text(json.dumps(record))
    with pytest.raises(UsageError, match="crop"):
        run(folder, tmp_path / "whole", resume=True)
    run(folder, tmp_path / "whole", resume=True, crop="none")
    with pytest.raises(UsageError, match="--crop"):
        ExtractConfig(source=[str(folder)], out=str(tmp_path / "x"), crop="letterbox")
