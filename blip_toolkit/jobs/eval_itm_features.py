"""ITC features and ITM scores of a BLIP / BLIP-2 ITM checkpoint, for the retrieval protocol.

Every model call goes through the per-family ops shared with training and validation
(`ITM_OPS[family.name]`: `image`, `text`, `similarity`, `itm`), imported here and nowhere else in
`eval/` (the ops are moving to `models/itm.py`; re-point this one import).

Inputs as LAVIS prepares them for its retrieval evaluation:

- Texts: LAVIS's `blip_caption` text processor (`pre_caption`: lower-case, `.!"()*#:;~` to spaces,
  whitespace collapsed, at most 50 words), then the tokenizer with truncation at 35 tokens.
- BLIP's ITM input starts with the `[ENC]` token instead of `[CLS]` (LAVIS `compute_sim_matrix`:
  `text_ids[:, 0] = tokenizer.enc_token_id`; BLIP's ITM head was trained that way) when the tokenizer
  has one, as the Salesforce/blip-* tokenizers do. BLIP-2's ITM takes the tokens as they are.
- Images: the checkpoint's processor (resize to the model's size, normalise), as `blip retrieval`.

Image patch embeddings (what ITM cross-attends to: [P, D] per image) are kept in CPU memory when
they fit `cache_bytes`; otherwise they are computed again, image block by image block, when their
pairs are re-ranked (one extra vision pass per image instead of holding e.g. 9 GB for COCO 5k).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from blip_toolkit.data.batching import prefetched
from blip_toolkit.data.images import DEFAULT_MAX_PIXELS, ImageLoadError, open_image
from blip_toolkit.errors import InputError, TaskNotSupportedError
from blip_toolkit.log import track
from blip_toolkit.models.itm import ITM_OPS, itm_input_ids

logger = logging.getLogger("blip")

MAX_WORDS = 50  # LAVIS blip_caption processor default (its retrieval configs keep it)
MAX_TEXT_TOKENS = 35  # LAVIS compute_sim_matrix: tokenizer(..., truncation=True, max_length=35)


def pre_caption(caption: str, max_words: int = MAX_WORDS) -> str:
    """LAVIS's BlipCaptionProcessor.pre_caption (lavis/processors/blip_processors.py)."""
    caption = re.sub(r"([.!\"()*#:;~])", " ", caption.lower())
    caption = re.sub(r"\s{2,}", " ", caption)
    caption = caption.rstrip("\n").strip(" ")
    words = caption.split(" ")
    if len(words) > max_words:
        caption = " ".join(words[:max_words])
    return caption


def itm_ops(family):
    """The ITC/ITM ops of a family, or TaskNotSupportedError for checkpoints without an ITM head."""
    ops = ITM_OPS.get(family.name)
    if ops is None:
        raise TaskNotSupportedError(
            f"{family.label} checkpoints have no ITC/ITM heads; the retrieval protocol needs a BLIP "
            "image-text matching (blip-itm) or BLIP-2 retrieval (blip2-itm) checkpoint, such as "
            "Salesforce/blip-itm-base-coco or Salesforce/blip2-itm-vit-g"
        )
    return ops


@dataclass
class EncodedTexts:
    feat: torch.Tensor  # [T, E] normalised, on the model device
    input_ids: torch.Tensor  # [T, L] for ITM (first token [ENC] for BLIP when available)
    attention_mask: torch.Tensor  # [T, L]


@dataclass
class EncodedImages:
    feat: torch.Tensor  # [I, E] (BLIP) or [I, Q, E] (BLIP-2), normalised, on the model device
    failed: dict[int, str] = field(default_factory=dict)  # index -> error of images that did not load
    embeds: torch.Tensor | None = None  # [I, P, D] on the CPU, or None (recomputed when needed)


class ItmModel:
    """A loaded ITM checkpoint (`runtime.loading.LoadedModel`) seen as ITC features and an ITM scorer.

    `itm_pairs` counts the (image, text) pairs passed through the ITM head."""

    def __init__(
        self,
        loaded,
        *,
        batch_size: int = 8,
        itm_batch_size: int = 32,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        cache_bytes: int = 1 << 32,
    ):
        self.loaded = loaded
        self.ops = itm_ops(loaded.family)
        self.batch_size = batch_size
        self.itm_batch_size = itm_batch_size
        self.max_pixels = max_pixels
        self.cache_bytes = cache_bytes
        self.itm_pairs = 0
        self.vision_passes = 0  # images through the vision tower (counting recomputation)
        self._paths: list[str] = []
        self._texts: EncodedTexts | None = None
        self._images: EncodedImages | None = None

    @property
    def model(self):
        return self.loaded.model

    @property
    def device(self):
        return self.loaded.device

    def similarity(self, image_feat: torch.Tensor, text_feat: torch.Tensor) -> torch.Tensor:
        return self.ops.similarity(image_feat, text_feat)

    @property
    def image_feat(self) -> torch.Tensor:
        """[I, E] or [I, Q, E] ITC features of the encoded (and kept) images."""
        return self._images.feat

    @property
    def text_feat(self) -> torch.Tensor:
        """[T, E] ITC features of the encoded (and kept) texts."""
        return self._texts.feat

    @property
    def scores_per_pair(self) -> int:
        """Floats per ITC score while computing it (BLIP-2's einsum holds one per query)."""
        feat = self._images.feat if self._images is not None else None
        return int(feat.shape[1]) + 1 if feat is not None and feat.ndim == 3 else 1

    # ------------------------------------------------------------------------ texts

    def encode_texts(self, texts: Sequence[str]) -> EncodedTexts:
        """Preprocess (pre_caption), tokenize and encode every text, `4 * batch_size` at a time."""
        tokenizer = self.loaded.tokenizer
        prepared = [pre_caption(t) for t in texts]
        encoded = tokenizer(
            prepared, padding="longest", truncation=True, max_length=MAX_TEXT_TOKENS, return_tensors="pt"
        )
        ids = encoded["input_ids"].to(self.device)
        mask = encoded["attention_mask"].to(self.device)
        chunk = self.batch_size * 4
        feats = []
        with torch.inference_mode():
            for start in track(range(0, len(prepared), chunk), description="texts"):
                stop = start + chunk
                length = int(mask[start:stop].sum(dim=1).max())
                feats.append(self.ops.text(self.model, ids[start:stop, :length], mask[start:stop, :length]))
        itm_ids = itm_input_ids(self.loaded.family.name, tokenizer, ids)
        self._texts = EncodedTexts(torch.cat(feats).float(), itm_ids, mask)
        return self._texts

    # ------------------------------------------------------------------------ images

    def encode_images(self, paths: Sequence[str]) -> EncodedImages:
        """ITC features of every image (and the patch embeddings, cached while they fit). Images that
        fail to load are reported in `failed` and get zero features; callers drop them."""
        self._paths = list(paths)
        feats: list[torch.Tensor | None] = [None] * len(paths)
        failed: dict[int, str] = {}
        cache: list[torch.Tensor] | None = []
        cached_bytes = 0
        batches = [
            list(range(s, min(len(paths), s + self.batch_size)))
            for s in range(0, len(paths), self.batch_size)
        ]
        for indices, images, errors in track(
            prefetched(batches, self._load), total=len(batches), description="images"
        ):
            failed.update(errors)
            if not images:
                continue
            embeds, feat = self._vision(images)
            for row, index in enumerate(indices):
                feats[index] = feat[row]
            if cache is not None:
                cpu = embeds.cpu()
                cached_bytes += cpu.numel() * cpu.element_size()
                if cached_bytes > self.cache_bytes:
                    logger.info(
                        "image embeddings exceed the cache budget (%.1f GB): recomputing them for ITM",
                        self.cache_bytes / 1e9,
                    )
                    cache = None
                else:
                    cache.append((indices, cpu))
        template = next((f for f in feats if f is not None), None)
        if template is None:
            raise InputError(
                f"none of the {len(paths)} images could be read (first: {next(iter(failed.values()))})"
            )
        feat = torch.stack([f if f is not None else torch.zeros_like(template) for f in feats]).float()
        embeds = None
        if cache is not None:
            first = cache[0][1]
            embeds = torch.zeros(len(paths), *first.shape[1:], dtype=first.dtype)
            for indices, block in cache:
                embeds[indices] = block
        self._images = EncodedImages(feat, failed, embeds)
        return self._images

    def _load(self, indices: list[int]):
        """(indices that loaded, their images, {index: error})."""
        good, images, errors = [], [], {}
        for index in indices:
            try:
                images.append(open_image(self._paths[index], max_pixels=self.max_pixels))
                good.append(index)
            except ImageLoadError as exc:
                errors[index] = str(exc)
        return good, images, errors

    def _vision(self, images) -> tuple[torch.Tensor, torch.Tensor]:
        pixel_values = self.loaded.processor(images=images, return_tensors="pt")["pixel_values"]
        pixel_values = pixel_values.to(self.device, self.loaded.dtype)
        self.vision_passes += len(images)
        with torch.inference_mode():
            return self.ops.image(self.model, pixel_values)

    def restrict(self, keep_images: torch.Tensor, keep_texts: torch.Tensor) -> None:
        """Keep only these images and texts (boolean masks) for the ITM stage (after dropping failures)."""
        images, texts = self._images, self._texts
        self._paths = [p for p, k in zip(self._paths, keep_images.tolist()) if k]
        embeds = images.embeds[keep_images] if images.embeds is not None else None
        self._images = EncodedImages(images.feat[keep_images.to(images.feat.device)], {}, embeds)
        t = keep_texts.to(texts.feat.device)
        self._texts = EncodedTexts(texts.feat[t], texts.input_ids[t], texts.attention_mask[t])

    # ------------------------------------------------------------------------ ITM

    def itm_scores(self, image_index: torch.Tensor, text_index: torch.Tensor) -> torch.Tensor:
        """ITM "match" logits of the pairs (image_index[n], text_index[n]), sorted by image."""
        image_index = image_index.cpu()
        text_index = text_index.to(self.device)
        out = torch.empty(len(image_index), dtype=torch.float32)
        if len(image_index) == 0:
            return out
        # Pairs are sorted by image: walk the images in blocks, getting each block's embeddings once.
        bounds = torch.searchsorted(
            image_index, torch.arange(0, len(self._paths) + self.batch_size, self.batch_size)
        )
        blocks = [
            (lo, int(bounds[b]), int(bounds[b + 1]))
            for b, lo in enumerate(range(0, len(self._paths), self.batch_size))
            if int(bounds[b + 1]) > int(bounds[b])
        ]
        with torch.inference_mode():
            for first_image, lo, hi in track(blocks, description="ITM re-ranking"):
                embeds = self._block_embeds(first_image, min(len(self._paths), first_image + self.batch_size))
                for start in range(lo, hi, self.itm_batch_size):
                    stop = min(hi, start + self.itm_batch_size)
                    local = (image_index[start:stop] - first_image).to(embeds.device)
                    texts = text_index[start:stop]
                    ids, mask = self._texts.input_ids[texts], self._texts.attention_mask[texts]
                    length = int(mask.sum(dim=1).max())
                    logits = self.ops.itm(self.model, embeds[local], ids[:, :length], mask[:, :length])
                    out[start:stop] = logits[:, 1].float().cpu()
                    self.itm_pairs += stop - start
        return out

    def _block_embeds(self, start: int, stop: int) -> torch.Tensor:
        """[stop - start, P, D] patch embeddings of images start..stop on the model device."""
        if self._images.embeds is not None:
            return self._images.embeds[start:stop].to(self.device)
        indices = list(range(start, stop))
        _, images, errors = self._load(indices)
        if errors:
            index, error = next(iter(errors.items()))
            raise InputError(f"image {self._paths[index]} could be read before but not now: {error}")
        embeds, _ = self._vision(images)
        return embeds
