"""Two fine-tuning runs with the same seed on two CPU threads end with the same weights, bit for bit.
Retrieval is the hard case: gathering the ITM hard negatives by index back-propagates through
index_put_(accumulate=True), which torch adds with parallel atomics on CPU unless deterministic
algorithms are on (training/common.deterministic_on_cpu)."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from blip_toolkit.training.config import FinetuneConfig
from blip_toolkit.training.finetune import run_finetune

from .helpers import SAMPLES


def test_retrieval_finetuning_is_deterministic_on_two_threads(checkpoint, tmp_path):
    # Wide enough that torch splits the index_put_ work over both threads.
    source = checkpoint("blip-itm", hidden=128, intermediate=256, image_size=64, initializer_range=0.1)
    torch.set_num_threads(2)  # the autouse fixture restores the count afterwards
    before = torch.are_deterministic_algorithms_enabled()
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        run_finetune(
            FinetuneConfig(
                manifest=str(SAMPLES / "captions.tsv"),
                task="retrieval",
                model=str(source),
                output_dir=str(out),
                max_steps=3,
                batch_size=8,
                learning_rate=1e-3,
                seed=5,
            )
        )
        runs.append(load_file(str(out / "model.safetensors")))
    assert torch.are_deterministic_algorithms_enabled() == before  # the setting is scoped to the run
    first, second = runs
    assert first.keys() == second.keys()
    different = [key for key in first if not torch.equal(first[key], second[key])]
    assert not different, different[:5]
