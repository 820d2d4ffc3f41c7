from transformers.utils import logging as hf_logging

from blip_toolkit.models.scratch.checkpoints import build_checkpoint


def test_building_a_checkpoint_draws_no_transformers_progress_bar(tmp_path, capfd):
    # transformers' save_pretrained draws a "Writing model shards" bar on stderr unless its progress
    # bars are off; the demo and the tests build checkpoints before loading anything.
    hf_logging.enable_progress_bar()
    try:
        build_checkpoint("blip-caption", tmp_path / "model", corpus=["a photo of a cat"])
        assert "Writing model shards" not in capfd.readouterr().err
    finally:
        hf_logging.disable_progress_bar()
