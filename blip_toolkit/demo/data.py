"""The demo dataset: UCI handwritten digits (data/digits/digits.csv.gz, 1,797 images of 8x8 pixels,
values 0..16) turned into PNG files and TSV manifests for every task, with a fixed-seed stratified
train / val / test split."""

from __future__ import annotations

import gzip
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from blip_toolkit.data.manifests import write_manifest
from blip_toolkit.errors import InputError

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
QUESTION = "what digit is this?"
DATA_FILE = Path(__file__).resolve().parents[2] / "data" / "digits" / "digits.csv.gz"


def caption_for(label: int) -> str:
    return f"a handwritten digit {DIGIT_WORDS[label]}"


CAPTIONS = tuple(caption_for(i) for i in range(10))
# Every word the demo's tokenizers must spell (the tiny WordPiece vocabulary is built from it).
CORPUS = [*CAPTIONS, QUESTION, *DIGIT_WORDS]


def load_digits(path: Path = DATA_FILE):
    """Return (images uint8 [n, 8, 8] with values 0..16, labels int64 [n])."""
    if not path.is_file():
        raise InputError(
            f"{path}: the bundled digits data is missing (it ships in the repository's data/ folder)"
        )
    with gzip.open(path, "rt", encoding="ascii") as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.int64)
    return table[:, :64].reshape(-1, 8, 8).astype(np.uint8), table[:, 64]


@dataclass
class DemoData:
    """Where the demo's files are. `manifests[task][split]` is a TSV path."""

    root: Path
    image_size: int
    splits: dict[str, list[int]]  # split -> indices into the dataset
    labels: list[int]
    images: list[Path]
    manifests: dict[str, dict[str, Path]] = field(default_factory=dict)
    captions_file: Path | None = None

    def split_images(self, split: str) -> list[Path]:
        return [self.images[i] for i in self.splits[split]]

    def split_labels(self, split: str) -> list[int]:
        return [self.labels[i] for i in self.splits[split]]


def stratified_split(labels, fractions=(0.7, 0.1, 0.2), seed: int = 0) -> dict[str, list[int]]:
    """Per class, shuffle with `seed` and cut into train / val / test by `fractions`."""
    rng = np.random.RandomState(seed)
    splits: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for label in sorted(set(int(x) for x in labels)):
        members = np.flatnonzero(np.asarray(labels) == label)
        rng.shuffle(members)
        n_train = int(round(len(members) * fractions[0]))
        n_val = int(round(len(members) * fractions[1]))
        splits["train"] += members[:n_train].tolist()
        splits["val"] += members[n_train : n_train + n_val].tolist()
        splits["test"] += members[n_train + n_val :].tolist()
    for name in splits:
        order = rng.permutation(len(splits[name]))
        splits[name] = [splits[name][i] for i in order]
    return splits


def write_dataset(
    root: str | Path, *, image_size: int = 32, seed: int = 0, limit: int | None = None
) -> DemoData:
    """Write the digits as `image_size` px greyscale PNGs (bilinear upscaling of the 8x8 grid) and the
    manifests: caption (image, caption), vqa (image, question, answer), retrieval (image, caption).
    `limit` keeps only the first N images of each split (quick runs)."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    pixels, labels = load_digits()
    splits = stratified_split(labels, seed=seed)
    if limit is not None:
        splits = {name: idx[:limit] for name, idx in splits.items()}
    keep = sorted(i for idx in splits.values() for i in idx)
    paths: list[Path] = [Path()] * len(labels)
    for i in keep:
        grey = (pixels[i].astype(np.float32) * (255.0 / 16.0)).round().astype(np.uint8)
        path = root / "images" / f"digit-{i:04d}.png"
        Image.fromarray(grey, mode="L").resize((image_size, image_size), Image.BILINEAR).save(path)
        paths[i] = path

    data = DemoData(
        root=root, image_size=image_size, splits=splits, labels=[int(x) for x in labels], images=paths
    )
    for task in ("caption", "vqa", "retrieval"):
        data.manifests[task] = {}
        for split, indices in splits.items():
            rows = []
            for i in indices:
                image = paths[i].relative_to(root).as_posix()
                caption = caption_for(int(labels[i]))
                if task == "vqa":
                    rows.append((image, QUESTION, DIGIT_WORDS[int(labels[i])]))
                else:
                    rows.append((image, caption))
            path = root / f"{task}-{split}.tsv"
            write_manifest(path, rows)
            data.manifests[task][split] = path
    data.captions_file = root / "captions.txt"
    data.captions_file.write_text("\n".join(CAPTIONS) + "\n", encoding="utf-8")
    return data
