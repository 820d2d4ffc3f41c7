"""Fixtures for the fine-tuning tests: small checkpoints whose tokenizers know the sample manifests'
words (short token sequences, so 8 pairs are learned in a few seconds), and one CPU thread (tiny
matrices are slower on two threads, badly so when the machine is shared)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from .helpers import CORPUS, SAMPLES


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """checkpoint(kind, **size) -> path of a small checkpoint built once per session for that key."""
    from tests.builders import ModelSize, build_checkpoint

    root = tmp_path_factory.mktemp("finetune-models")
    cache: dict[tuple, Path] = {}

    def make(kind: str, **size) -> Path:
        key = (kind, tuple(sorted(size.items())))
        if key not in cache:
            name = kind + "".join(f"-{k}{v}" for k, v in key[1])
            cache[key] = build_checkpoint(kind, root / name, size=ModelSize(**size), corpus=CORPUS)
        return cache[key]

    return make


@pytest.fixture
def samples_copy(tmp_path) -> Path:
    """A writable copy of data/samples (for manifests with problems)."""
    target = tmp_path / "samples"
    shutil.copytree(SAMPLES, target)
    return target
