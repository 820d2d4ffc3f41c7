"""models/mapped_pages.py: the checkpoint pages of a released weight leave the resident set, and
what is read afterwards is still the checkpoint's content; quantized loading (CPU) releases the
float weights of every quantized layer, where a float32 run keeps the whole checkpoint resident."""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file

from blip_toolkit.data.images import open_image
from blip_toolkit.models.loading import load_model
from blip_toolkit.models.mapped_pages import CheckpointMappings, release
from blip_toolkit.models.quantize import linear_layers
from blip_toolkit.models.scratch.checkpoints import ModelSize, build_checkpoint
from blip_toolkit.predictors.generation import generate
from blip_toolkit.predictors.options import GenerationOptions

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")


def resident_bytes(path: Path) -> int:
    """Resident bytes of this process's mappings of `path` (/proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps", encoding="utf-8", errors="replace") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5 and ":" not in fields[0]:
                inside = len(fields) == 6 and fields[5] == str(path)
            elif inside and fields[0] == "Rss:":
                total += int(fields[1]) * 1024
    return total


def test_released_pages_leave_the_resident_set_and_read_back_as_the_file(tmp_path):
    big = torch.arange(4 * 2**20, dtype=torch.float32)  # 16 MB
    small = torch.linspace(-1, 1, 1000)
    file = tmp_path / "weights.safetensors"
    save_file({"big": big, "small": small}, str(file))
    handle = safe_open(str(file), framework="pt", device="cpu", backend="mmap")
    mapped_big, mapped_small = handle.get_slice("big")[:], handle.get_slice("small")[:]
    assert float(mapped_big.sum()) == float(big.sum()) and torch.equal(mapped_small, small)
    before = resident_bytes(file)
    assert before >= big.nbytes  # every page of it was read

    released = release([mapped_big], CheckpointMappings.current())
    assert big.nbytes - 2 * 4096 <= released <= big.nbytes
    assert resident_bytes(file) <= before - released
    # A page read again comes back from the file: nothing of either tensor is lost.
    assert torch.equal(mapped_small, small) and torch.equal(mapped_big, big)


def test_tensors_outside_a_checkpoint_mapping_are_left_alone():
    plain = torch.ones(2**20)
    assert release([plain], CheckpointMappings.current()) == 0
    assert bool((plain == 1).all())


@pytest.fixture(scope="module")
def small_captioner(tmp_path_factory) -> Path:
    """A BLIP captioner whose Linear weights span many pages (64 kB to 256 kB each)."""
    size = ModelSize(image_size=64, patch_size=16, hidden=128, layers=2, heads=4, intermediate=512)
    return build_checkpoint("blip-caption", tmp_path_factory.mktemp("mapped") / "model", size=size)


@pytest.mark.parametrize("mode", ["int8", "4bit"])
def test_quantized_loading_keeps_no_float_weight_of_a_quantized_layer_resident(
    small_captioner, sample_images, mode, one_thread
):
    if mode == "4bit":
        pytest.importorskip("bitsandbytes")
    file = small_captioner / "model.safetensors"
    config = transformers.AutoConfig.from_pretrained(small_captioner)
    with torch.device("meta"):
        names = linear_layers(transformers.BlipForConditionalGeneration(config))
    with safe_open(str(file), framework="pt") as handle:
        shapes = [handle.get_slice(f"{name}.weight").get_shape() for name in names]
    quantized_bytes = sum(4 * rows * cols for rows, cols in shapes)
    images = [open_image(p) for p in sample_images[:2]]
    options = GenerationOptions(max_new_tokens=3)

    floats = load_model(str(small_captioner), "caption")
    generate(floats, images, None, options)
    # The measure sees a float32 run: the weights it read (all of them) are resident.
    assert resident_bytes(file) >= 0.9 * file.stat().st_size
    del floats
    gc.collect()
    assert resident_bytes(file) == 0  # that mapping is gone with the model

    loaded = load_model(str(small_captioner), "caption", quantize=mode)
    generate(loaded, images, None, options)
    page_slack = 2 * 4096 * len(names)  # the pages a weight shares with its neighbours
    assert resident_bytes(file) <= file.stat().st_size - quantized_bytes + page_slack
