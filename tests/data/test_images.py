"""Opening images: every bad file fails with a clear per-file error, every unusual but valid mode
is converted correctly (checked against the pixel values it must give)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from blip_toolkit.data.images import ImageLoadError, collect_inputs, open_image


def _save(img: Image.Image, path, **kwargs):
    img.save(path, **kwargs)
    return path


def test_missing_zero_byte_and_not_an_image(tmp_path):
    with pytest.raises(ImageLoadError, match="no such file"):
        open_image(tmp_path / "missing.jpg")
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ImageLoadError, match="empty file"):
        open_image(tmp_path / "empty.jpg")
    (tmp_path / "text.jpg").write_text("this is not a jpeg\n")
    with pytest.raises(ImageLoadError, match="not an image"):
        open_image(tmp_path / "text.jpg")
    with pytest.raises(ImageLoadError, match="is a directory"):
        open_image(tmp_path)


def test_truncated_jpeg_and_corrupt_png(tmp_path, sample_images):
    data = sample_images[0].read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match="corrupt or truncated"):
        open_image(tmp_path / "truncated.jpg")

    png = io.BytesIO()
    Image.fromarray(np.random.RandomState(0).randint(0, 255, (40, 40, 3), dtype=np.uint8)).save(
        png, format="PNG"
    )
    raw = bytearray(png.getvalue())
    idat = raw.index(b"IDAT")
    raw[idat + 10 : idat + 30] = b"\x00" * 20  # damage the compressed pixel data (CRC no longer matches)
    (tmp_path / "corrupt.png").write_bytes(bytes(raw))
    with pytest.raises(ImageLoadError, match="corrupt|cannot read"):
        open_image(tmp_path / "corrupt.png")


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    # A 1-bit 20000x20000 PNG is tiny on disk but 400 M pixels decoded.
    path = _save(Image.new("1", (20000, 20000)), tmp_path / "bomb.png", optimize=True)
    assert path.stat().st_size < 200_000
    with pytest.raises(ImageLoadError, match="over the limit"):
        open_image(path)
    # A smaller limit refuses ordinary images; a larger one lets them through.
    ordinary = _save(Image.new("RGB", (100, 100)), tmp_path / "ordinary.png")
    with pytest.raises(ImageLoadError, match="10000 pixels is over the limit of 9999"):
        open_image(ordinary, max_pixels=9999)
    assert open_image(ordinary, max_pixels=10_000).size == (100, 100)


def test_cmyk_becomes_the_same_rgb_pil_gives(tmp_path):
    rgb = Image.fromarray(np.random.RandomState(1).randint(0, 255, (16, 16, 3), dtype=np.uint8))
    cmyk = rgb.convert("CMYK")
    path = _save(cmyk, tmp_path / "cmyk.tiff")
    out = open_image(path)
    assert out.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(out), np.asarray(cmyk.convert("RGB")))


def test_rgba_and_palette_transparency_are_composited_on_white(tmp_path):
    array = np.zeros((4, 4, 4), dtype=np.uint8)
    array[..., 0] = 200  # red channel under the alpha
    array[:2, :, 3] = 255  # top half opaque, bottom half fully transparent
    path = _save(Image.fromarray(array, "RGBA"), tmp_path / "rgba.png")
    out = np.asarray(open_image(path))
    np.testing.assert_array_equal(out[:2], np.broadcast_to([200, 0, 0], (2, 4, 3)))
    np.testing.assert_array_equal(out[2:], np.full((2, 4, 3), 255))

    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([10, 20, 30] + [0, 0, 0] * 255)
    palette.info["transparency"] = 0
    path = _save(palette, tmp_path / "palette.png", transparency=0)
    assert np.all(np.asarray(open_image(path)) == 255)
    palette_opaque = Image.new("P", (4, 4), 0)
    palette_opaque.putpalette([10, 20, 30] + [0, 0, 0] * 255)
    path = _save(palette_opaque, tmp_path / "palette-opaque.png")
    np.testing.assert_array_equal(np.asarray(open_image(path))[0, 0], [10, 20, 30])


def test_16_bit_greyscale_is_rescaled_not_clipped(tmp_path):
    values = np.array([[0, 257 * 100, 65535, 257 * 50]], dtype=np.uint16)
    path = _save(Image.fromarray(values), tmp_path / "deep.png")
    opened = Image.open(path)
    assert opened.mode.startswith("I")
    out = np.asarray(open_image(path))
    np.testing.assert_array_equal(out[0, :, 0], [0, 100, 255, 50])
    assert out.shape == (1, 4, 3)


def test_exif_orientation_is_applied(tmp_path):
    array = np.zeros((2, 3, 3), dtype=np.uint8)
    array[0, 0] = [255, 0, 0]  # red top-left pixel of the stored (landscape) image
    img = Image.fromarray(array)
    exif = img.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 CW to display
    path = _save(img, tmp_path / "rotated.png", exif=exif)
    out = open_image(path)
    assert out.size == (2, 3)  # displayed as portrait
    expected = np.asarray(img.transpose(Image.Transpose.ROTATE_270))
    np.testing.assert_array_equal(np.asarray(out), expected)


def test_open_from_bytes(sample_images):
    data = sample_images[0].read_bytes()
    assert open_image(data).size == Image.open(sample_images[0]).size
    with pytest.raises(ImageLoadError, match="empty"):
        open_image(b"")


def test_collect_inputs_files_directories_globs_stdin(tmp_path, sample_images):
    folder = tmp_path / "photos"
    (folder / "nested").mkdir(parents=True)
    for i, src in enumerate(sample_images[:3]):
        target = folder / ("nested" if i == 2 else "") / src.name
        target.write_bytes(src.read_bytes())
    (folder / "notes.txt").write_text("not an image")
    (tmp_path / "empty").mkdir()

    items = collect_inputs([str(folder)])
    assert [i.error for i in items] == [None, None, None]
    assert sorted(p.split("/")[-1] for p in (i.path for i in items)) == sorted(
        s.name for s in sample_images[:3]
    )

    items = collect_inputs([str(tmp_path / "empty"), str(tmp_path / "missing.jpg"), str(folder / "*.jpg")])
    assert "directory has no images" in items[0].error
    assert "no such file" in items[1].error
    assert len([i for i in items if i.error is None]) == 2

    assert collect_inputs([str(tmp_path / "*.png")])[0].error.endswith("pattern matches no files")

    stdin = [f"{sample_images[0]}\n", "\n", f"{sample_images[1]}\n"]
    items = collect_inputs(["-"], stdin=stdin)
    assert [i.path for i in items] == [str(sample_images[0]), str(sample_images[1])]

    # The same file given twice is captioned once.
    assert len(collect_inputs([str(sample_images[0]), str(sample_images[0])])) == 1
