"""The bundled sample manifests as rows, and a corpus for the tiny tokenizers."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "data" / "samples"


def _rows(name: str) -> list[list[str]]:
    lines = (SAMPLES / name).read_text(encoding="utf-8").splitlines()
    return [line.split("\t") for line in lines if line.strip() and not line.startswith("#")]


CAPTIONS = _rows("captions.tsv")
VQA = _rows("vqa.tsv")
CORPUS = (
    [r[1] for r in CAPTIONS]
    + [r[1] for r in VQA]
    + [r[2] for r in VQA]
    + [
        "Question: what is it? Answer: a photo",
        "a photo of",
    ]
)
