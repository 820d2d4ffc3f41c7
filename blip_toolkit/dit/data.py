"""The training data of `train-dit`: the train / held-out split, the global sample order, memory-mapped
row reads from the embedding shards, the per-batch noise, and the normaliser fit.

Design (see docs/formats.md, "DiT runs"):

- **One global order, independent of the number of processes.** `IndexStream` turns the training
  indices into an endless sequence of epochs: per epoch the shards are visited in a seeded order,
  each shard's rows are permuted, and the indices pass through a shuffle buffer (webdataset style,
  but over integers, so it costs a few hundred nanoseconds per sample and no tensor memory). Every
  process and DataLoader worker computes the same sequence; global micro-batch k is the indices
  [k G, (k + 1) G). Process r of W loads only rows [r G/W, (r + 1) G/W) of each global batch, and
  worker w of K only global batches k = w mod K. So a 2-process run sees exactly the samples a
  1-process run with the same global batch sees, and resuming is "start at batch k" (nothing before
  it is read).
- **Noise is per global batch.** x_0, t and the condition-dropout mask of global batch k come from a
  generator seeded by (seed, k) and are sliced per process like the data: every process draws the
  whole global batch's noise (a [G, N, Dt] randn, cheap next to the model) so the slice a process
  gets does not depend on how many there are.
- **Memory bounded whatever the number of shards.** Rows are read from zero-copy memory maps of the
  shard files (`EmbeddingShards.rows`): only the rows of a batch are copied, and at most `max_open` shards are
  mapped at once (an LRU; a mapped shard's touched pages count in the resident set until it is
  unmapped). The shuffle buffer holds integers only.

Nothing here writes files. Tensors come out as float32.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from blip_toolkit.dit.config import FlowConfig
from blip_toolkit.dit.flow import sample_t
from blip_toolkit.dit.normalize import LayoutStatistics, TokenNormalizer
from blip_toolkit.embeddings.shard_reader import EmbeddingShards
from blip_toolkit.engine.seeding import mix_seed
from blip_toolkit.errors import ConfigError, InputError

logger = logging.getLogger("blip")

# Stream ids mixed into the seeds, so the training noise, the evaluation loss noise and the sampling
# noise never share a generator state whatever the seeds and counters.
STREAM_TRAIN = 1
STREAM_EVAL_LOSS = 2
STREAM_SAMPLE = 3
STREAM_ORDER = 4
STREAM_SPLIT = 5
STREAM_TEXT = 6

# ----------------------------------------------------------------------------------------------------
# The split


# The held-out share when a run names none: enough images for the evaluation of typical datasets
# (train-dit evaluates at most eval.max_samples of them), few enough to cost little training data.
DEFAULT_EVAL_FRACTION = 0.05


@dataclass
class DataSplit:
    """train / eval: sorted global image indices [n] int64. kind: "held-out" (eval_shards or
    eval_fraction, given or the default), "none" (eval_fraction = 0: nothing held out, eval empty) or
    "overfit" (eval = the overfit samples themselves). settings: the keyword arguments of
    `split_indices` that give this split again (with the default fraction written out), as recorded in
    the run."""

    train: np.ndarray
    eval: np.ndarray
    kind: str
    settings: dict[str, Any] = field(default_factory=dict)
    default: bool = False  # held out by DEFAULT_EVAL_FRACTION, not by the run's config


def split_indices(
    shards: EmbeddingShards,
    *,
    eval_shards: int = 0,
    eval_fraction: float | None = None,
    split_seed: int = 0,
    overfit: int = 0,
) -> DataSplit:
    """The training and evaluation images of a run (the same function is used by `sample --split`).

    eval_shards = k: the last k shards are held out. eval_fraction = f: each image is held out with
    probability f (seeded by `split_seed`, at least one image each side). Neither: f =
    DEFAULT_EVAL_FRACTION (with `overfit` alone: 0). eval_fraction = 0: nothing is held out.
    overfit = N: train on the first N training images and evaluate on those same images (a
    memorisation check)."""
    n = len(shards)
    if n == 0:
        raise InputError(f"{shards.root}: the embeddings hold no images")
    if eval_shards and eval_fraction is not None:
        raise ConfigError("data.eval_shards and data.eval_fraction cannot both be set")
    default = not eval_shards and eval_fraction is None
    if default:
        eval_fraction = 0.0 if overfit else DEFAULT_EVAL_FRACTION
    settings = {
        "eval_shards": int(eval_shards),
        "eval_fraction": None if eval_shards else float(eval_fraction),
        "split_seed": int(split_seed),
        "overfit": int(overfit),
    }
    everything = np.arange(n, dtype=np.int64)
    train, held, kind = everything, np.zeros(0, dtype=np.int64), "none"
    if eval_shards:
        if eval_shards >= len(shards.shards):
            raise ConfigError(
                f"data.eval_shards = {eval_shards} leaves no training shard ({shards.root} has "
                f"{len(shards.shards)} shard(s))",
                hint="use data.eval_fraction to hold out part of every shard",
            )
        first = shards.shards[len(shards.shards) - eval_shards].offset
        train, held, kind = everything[:first], everything[first:], "held-out"
    elif eval_fraction:
        if n < 2:
            raise ConfigError(
                f"{shards.root} holds 1 image: none can be held out for evaluation",
                hint="set data.eval_fraction = 0 (no evaluation) or use --overfit 1",
            )
        rng = np.random.default_rng([split_seed, STREAM_SPLIT])
        mask = rng.random(n) < eval_fraction
        if not mask.any():
            mask[rng.integers(n)] = True
        if mask.all():
            raise ConfigError(f"data.eval_fraction = {eval_fraction} holds out all {n} image(s)")
        train, held, kind = everything[~mask], everything[mask], "held-out"
    if overfit:
        if overfit > len(train):
            raise ConfigError(f"--overfit {overfit}: only {len(train)} training image(s)")
        train = train[:overfit]
        return DataSplit(train, train.copy(), "overfit", settings, default)
    return DataSplit(train, held, kind, settings, default)


# ----------------------------------------------------------------------------------------------------
# The global order


class IndexStream:
    """The endless global sequence of training indices (see the module docstring).

    groups: the training indices of each shard (a list of int64 arrays, in shard order); seed; buffer:
    shuffle-buffer size in indices (0 or 1 = shard order shuffled and rows permuted, no buffer).
    Epoch e is a permutation of all training indices; epochs follow each other without a gap, so
    position p of the stream is index p mod n of epoch p // n."""

    def __init__(self, groups: Sequence[np.ndarray], *, seed: int, buffer: int):
        self.groups = [np.asarray(g, dtype=np.int64) for g in groups if len(g)]
        self.size = int(sum(len(g) for g in self.groups))
        if self.size == 0:
            raise InputError("no training images")
        self.seed = seed
        self.buffer = max(int(buffer), 0)

    def epoch(self, epoch: int) -> Iterator[int]:
        """The indices of one epoch, in order."""
        rng = np.random.default_rng([self.seed, STREAM_ORDER, epoch])
        order = rng.permutation(len(self.groups))
        rows = (rng.permutation(self.groups[g]) for g in order)
        if self.buffer <= 1:
            for chunk in rows:
                yield from chunk.tolist()
            return
        buffer: list[int] = []
        size = self.buffer
        for chunk in rows:
            values = chunk.tolist()
            fill = min(size - len(buffer), len(values))
            buffer.extend(values[:fill])
            if fill == len(values):
                continue
            # Draw the slots of the whole chunk at once: one numpy call instead of one per index.
            slots = rng.integers(0, size, len(values) - fill).tolist()
            for value, slot in zip(values[fill:], slots):
                yield buffer[slot]
                buffer[slot] = value
        rng.shuffle(buffer)
        yield from buffer

    def iterate(self, position: int = 0) -> Iterator[int]:
        """The stream from `position` on (earlier positions are skipped without loading anything)."""
        epoch, skip = divmod(int(position), self.size)
        for e in itertools.count(epoch):
            stream = self.epoch(e)
            if skip:
                stream = itertools.islice(stream, skip, None)
                skip = 0
            yield from stream

    def batches(self, size: int, *, start: int = 0) -> Iterator[np.ndarray]:
        """Global batches [size] of indices: batch k is stream positions [k size, (k + 1) size),
        starting with batch `start`."""
        stream = self.iterate(start * size)
        while True:
            yield np.fromiter(stream, dtype=np.int64, count=size)


# ----------------------------------------------------------------------------------------------------
# Normaliser


def token_statistics(
    shards: EmbeddingShards,
    indices: np.ndarray,
    *,
    has_cls: bool = False,
    max_samples: int = 0,
    part: int = 0,
    parts: int = 1,
    chunk: int = 256,
) -> LayoutStatistics:
    """Streaming statistics of the target tokens of `indices` (sorted; the first `max_samples` when
    > 0), read in chunks of `chunk` rows: memory = one chunk plus the open maps, whatever the dataset
    size. `has_cls`: the CLS token (position 0) gets statistics of its own. `part` / `parts`: only
    every parts-th image from the part-th (a process's share)."""
    indices = np.sort(np.asarray(indices, dtype=np.int64))
    if max_samples:
        indices = indices[:max_samples]
    indices = indices[part::parts]
    stats = LayoutStatistics(shards.dims["target_dim"], has_cls)
    for start in range(0, len(indices), chunk):
        stats.update(shards.rows(indices[start : start + chunk], "target"))
    return stats


def pack_statistics(stats: LayoutStatistics) -> torch.Tensor:
    """[count, norm_sum, mean (D), m2 (D)] float64 per position class (patch, then cls), concatenated:
    one row for a collective."""
    rows = [
        torch.cat([torch.tensor([float(c.count), c.norm_sum], dtype=torch.float64), c.mean, c.m2])
        for c in stats.classes()
    ]
    return torch.cat(rows)


def merge_statistics(packed: torch.Tensor, *, has_cls: bool = False) -> LayoutStatistics:
    """One LayoutStatistics from packed rows [P, K (2 + 2D)] (`pack_statistics` of each part; K = 2
    classes with `has_cls`), each class merged in row order with Chan et al.'s pairwise update (exact
    up to float64 rounding)."""
    classes = 2 if has_cls else 1
    width = packed.shape[1] // classes
    dim = (width - 2) // 2
    merged = LayoutStatistics(dim, has_cls)
    for k, total in enumerate(merged.classes()):
        for row in packed[:, k * width : (k + 1) * width].double().cpu():
            count = int(row[0])
            if count == 0:
                continue
            mean, m2 = row[2 : 2 + dim], row[2 + dim :]
            both = total.count + count
            delta = mean - total.mean
            total.mean = total.mean + delta * (count / both)
            total.m2 = total.m2 + m2 + delta.square() * (total.count * count / both)
            total.count = both
            total.norm_sum += float(row[1])
    return merged


def normalizer_from_statistics(method: str, stats: LayoutStatistics, *, where: str = "") -> TokenNormalizer:
    """The fitted normaliser; refuses statistics that hold NaN or Inf (a corrupt embedding)."""
    if method == "none":
        return TokenNormalizer("none")
    if stats.patch.count == 0:
        raise InputError(f"{method} normalisation: no training tokens to fit on")
    finite = all(
        bool(torch.isfinite(c.mean).all() and torch.isfinite(c.m2).all()) and math.isfinite(c.norm_sum)
        for c in stats.classes()
    )
    if not finite:
        raise InputError(
            f"{where or 'the embeddings'}: the target tokens hold NaN or Inf values (normaliser statistics)"
        )
    return TokenNormalizer.from_statistics(method, stats)


def fit_normalizer(
    shards: EmbeddingShards,
    indices: np.ndarray,
    method: str,
    *,
    has_cls: bool = False,
    max_samples: int = 0,
    chunk: int = 256,
    part: int = 0,
    parts: int = 1,
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> TokenNormalizer:
    """Fit the target normaliser on the target tokens of `indices` (see `token_statistics`) in one
    streaming pass. With several processes each reads its `part` of `parts`; `gather` collects every
    process's packed statistics [1, K] into [P, K] in rank order, which are merged the same way on
    every process (with one process the merge of the one row is exact)."""
    if method == "none":
        return TokenNormalizer("none")
    stats = token_statistics(
        shards, indices, has_cls=has_cls, max_samples=max_samples, chunk=chunk, part=part, parts=parts
    )
    packed = pack_statistics(stats)[None]  # [1, K (2 + 2D)]
    merged = merge_statistics(gather(packed) if gather is not None else packed, has_cls=has_cls)
    return normalizer_from_statistics(method, merged, where=str(shards.root))


# ----------------------------------------------------------------------------------------------------
# The training stream


def global_noise(
    micro_batch: int, size: int, shape: tuple[int, int], flow: FlowConfig, *, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(t [G], drop [G] bool or None, x_0 [G, N, Dt]) of global micro-batch `micro_batch`: the same on
    every process (slice them per process)."""
    generator = torch.Generator().manual_seed(mix_seed(seed, STREAM_TRAIN, micro_batch))
    t = sample_t(size, flow, generator=generator)  # [G]
    drop = torch.rand(size, generator=generator) < flow.cond_dropout if flow.cond_dropout > 0 else None
    x_0 = torch.randn((size, *shape), generator=generator)  # [G, N, Dt]
    return t, drop, x_0


def sample_noise(indices, seed: int, shape: tuple[int, ...], *, dtype=None, device=None) -> torch.Tensor:
    """x_0 [B, *shape] ~ N(0, I) for sampling, row b drawn from a generator seeded by (seed,
    indices[b]): an image's tokens do not depend on the batch size or on the other images sampled
    (`blip sample --seed` and the train-dit evaluation with eval.seed draw the same noise)."""
    out = torch.empty((len(indices), *shape))
    generator = torch.Generator()
    for row, index in enumerate(indices.tolist() if hasattr(indices, "tolist") else indices):
        generator.manual_seed(mix_seed(seed, STREAM_SAMPLE, int(index)))
        torch.randn(shape, generator=generator, out=out[row])
    return out.to(device=device or "cpu", dtype=dtype or torch.float32)


class CaptionIndex:
    """Where each image's captions are: `first` [n] (global caption index of its first caption) and
    `count` [n] (how many; 0 for an image without captions), from the shards' caption_image columns
    (integers only: no text embedding is read). A shard stores its captions image by image, in row
    order, so an image's captions are one contiguous run."""

    def __init__(self, shards: EmbeddingShards):
        self.shards = shards
        count = np.zeros(shards.num_samples, dtype=np.int64)
        for info in shards.shards:
            if info.captions:
                owners = shards.views(info.index)["caption_image"].numpy()
                count[info.offset : info.offset + info.samples] = np.bincount(owners, minlength=info.samples)
        self.count = count
        self.first = np.concatenate([[0], np.cumsum(count)[:-1]]).astype(np.int64)
        self.caption_offsets = np.array([info.caption_offset for info in shards.shards], dtype=np.int64)
        if shards.num_captions == 0:
            raise InputError(
                f"{shards.root}: the embeddings hold no captions; flow.contrastive_positive = 'text' needs them",
                hint="extract with captions (a manifest with a text column), or set contrastive_positive = 'auto' (no contrastive term without captions) or 'image'",
            )

    def draw(self, indices: np.ndarray, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(text [B, E] float32: one caption per image, drawn uniformly with `generator`, zeros for an
        image without captions; has_text [B] bool)."""
        u = torch.rand(len(indices), generator=generator, dtype=torch.float64).numpy()
        count = self.count[indices]
        caption = self.first[indices] + np.minimum((u * count).astype(np.int64), np.maximum(count - 1, 0))
        has_text = count > 0
        out = torch.zeros(len(indices), self.shards.dims["embed_dim"], dtype=torch.float32)
        shard = np.searchsorted(self.caption_offsets, caption, side="right") - 1
        for j in np.unique(shard[has_text]).tolist():
            picked = np.flatnonzero((shard == j) & has_text)
            rows = torch.from_numpy(caption[picked] - self.caption_offsets[j])
            out[torch.from_numpy(picked)] = self.shards.views(j)["text_emb"].index_select(0, rows).float()
        return out, torch.from_numpy(has_text)


class TrainStream(torch.utils.data.IterableDataset):
    """This process's (and DataLoader worker's) micro-batches, from global batch `start` on.

    Yields dicts: cond [b, M, Dc], x_1 [b, N, Dt] (normalised targets), x_0 [b, N, Dt], t [b],
    drop [b] bool or None, index [b] (global image indices), batch (global micro-batch number), and
    target [b, N, Dt] (the raw target tokens, for the contrastive term) when `with_target`, text [b, E]
    and has_text [b] (one caption embedding per image, drawn per global batch from (seed, batch), for
    the text-positive contrastive term) when `with_text`. b = global_batch / world_size."""

    def __init__(
        self,
        shards: EmbeddingShards,
        order: IndexStream,
        *,
        flow: FlowConfig,
        normalizer: TokenNormalizer,
        global_batch: int,
        rank: int,
        world_size: int,
        seed: int,
        start: int = 0,
        with_target: bool = False,
        with_text: bool = False,
    ):
        super().__init__()
        if global_batch % world_size:
            raise ConfigError(
                f"train.batch_size {global_batch} (the global batch) is not divisible by the {world_size} processes"
            )
        self.shards, self.order, self.flow, self.normalizer = shards, order, flow, normalizer
        self.global_batch, self.rank, self.world_size, self.seed = global_batch, rank, world_size, seed
        self.start, self.with_target = start, with_target
        self.captions = CaptionIndex(shards) if with_text else None
        dims = shards.dims
        self.shape = (dims["target_tokens"], dims["target_dim"])

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker = torch.utils.data.get_worker_info()
        workers, worker_id = (worker.num_workers, worker.id) if worker is not None else (1, 0)
        local = self.global_batch // self.world_size
        lo, hi = self.rank * local, (self.rank + 1) * local
        for k, indices in enumerate(self.order.batches(self.global_batch, start=self.start)):
            number = self.start + k
            if number % workers != worker_id:
                continue  # another worker's batch: its indices were computed, nothing was read
            mine = indices[lo:hi]
            t, drop, x_0 = global_noise(number, self.global_batch, self.shape, self.flow, seed=self.seed)
            target = self.shards.rows(mine, "target")  # [b, N, Dt]
            batch = {
                "cond": self.shards.rows(mine, "cond"),  # [b, M, Dc]
                "x_1": self.normalizer.encode(target),  # [b, N, Dt]
                "x_0": x_0[lo:hi],
                "t": t[lo:hi],
                "drop": drop[lo:hi] if drop is not None else None,
                "index": torch.from_numpy(mine),
                "batch": number,
            }
            if self.with_target:
                batch["target"] = target
            if self.captions is not None:
                # The whole global batch's draws (then sliced), so they do not depend on the processes.
                generator = torch.Generator().manual_seed(mix_seed(self.seed, STREAM_TEXT, number))
                text, has_text = self.captions.draw(indices, generator)
                batch["text"], batch["has_text"] = text[lo:hi], has_text[lo:hi]
            yield batch


def batch_iterator(stream: TrainStream, *, num_workers: int = 0) -> Iterator[dict[str, Any]]:
    """Iterate `stream` in this process (num_workers = 0: no DataLoader machinery per step) or with
    DataLoader workers, which return the batches round robin, i.e. in global order."""
    if num_workers <= 0:
        return iter(stream)

    def collate(batch):
        return batch

    loader = torch.utils.data.DataLoader(
        stream,
        batch_size=None,
        num_workers=num_workers,
        collate_fn=collate,
        persistent_workers=False,
        prefetch_factor=2,
    )
    return iter(loader)


# ----------------------------------------------------------------------------------------------------
# The evaluation set


@dataclass
class EvalSet:
    """Held-out samples in memory (float32): cond [n, M, Dc], target [n, N, Dt], index [n] (global),
    text_emb [C, E], caption_image [C] (position in this set) and captions [C] (the strings) of their
    captions, keys [n]."""

    cond: torch.Tensor
    target: torch.Tensor
    index: torch.Tensor
    text_emb: torch.Tensor
    caption_image: torch.Tensor
    keys: list[str]
    captions: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.index.shape[0])


def load_eval_set(shards: EmbeddingShards, indices: np.ndarray, *, max_samples: int) -> EvalSet:
    """The first `max_samples` of `indices` (sorted) with their captions."""
    indices = np.sort(np.asarray(indices, dtype=np.int64))[:max_samples]
    cond = shards.rows(indices, "cond")
    target = shards.rows(indices, "target")
    shard_of, rows = shards.locate(indices)
    position = {int(i): p for p, i in enumerate(indices.tolist())}
    texts, owners, strings, keys = [], [], [], [""] * len(indices)
    for j in np.unique(shard_of).tolist():
        info = shards.shards[j]
        part = shards.read_shard(j, ("text_emb", "caption_image"))
        for row in rows[shard_of == j].tolist():
            keys[position[info.offset + row]] = part["rows"][row]["key"]
        caption_image = part["caption_image"] + info.offset  # [c] global
        wanted = torch.tensor([position.get(int(i), -1) for i in caption_image.tolist()], dtype=torch.int64)
        keep = wanted >= 0
        # A shard stores its captions image by image, in row order: the same order as text_emb.
        shard_strings = [caption for row in part["rows"] for caption in row["captions"]]
        strings.extend(caption for caption, kept in zip(shard_strings, keep.tolist(), strict=True) if kept)
        texts.append(part["text_emb"][keep].float())
        owners.append(wanted[keep])
    embed = shards.dims["embed_dim"]
    return EvalSet(
        cond=cond,
        target=target,
        index=torch.from_numpy(indices.copy()),
        text_emb=torch.cat(texts) if texts else torch.empty(0, embed),
        caption_image=torch.cat(owners) if owners else torch.empty(0, dtype=torch.int64),
        keys=keys,
        captions=strings,
    )
