"""`blip eval-recall`: recall@K of image features against the target encoder's text embeddings.

Image features that can be scored (each against the same texts and positive pairs):

- `baseline`: the target encoder's own global image embedding (`target_global` in the shards).
- `gt-pooled`: the stored ground-truth target tokens through the run's TargetHead, i.e. pooled and
  projected exactly like generated tokens are. Compared with `baseline` it shows what the token
  layout and pooling cost before any generator is involved.
- `generated`: tokens written by `blip sample` (a generated-features file), through the same head,
  or the file's own `global` embeddings when it has them. A sweep directory of `blip sample` (several
  --steps / --cfg-scale values) is scored setting by setting: one row each in `sweep`, the best one
  in `best` and as `generated`.

Recall uses `eval.recall.retrieval_recall` (CLIP_benchmark / LAVIS convention: image-to-text is a
hit when any of the image's captions is in the top K; pessimistic ties). With a generated file
covering a subset of the images, every feature is scored on that subset and its captions. Images
without captions are left out (recall is undefined for them). `dedupe_captions` merges identical
caption strings into one text, positive for every image that has it.

Also reported: mean cosine of generated vs ground-truth tokens, standardised (each dimension minus
the mean, over the std, of the compared ground-truth tokens, the CLS token with statistics of its own)
and raw; and of generated globals vs `baseline` and vs `gt-pooled` (and `gt-pooled` vs `baseline`).
The raw token cosine says little: CLIP's pre-layernorm tokens have a few dimensions of huge
magnitude shared by every token, so any two tokens have a raw cosine near 1.

Generated features of the DiT's own training images are not a held-out measurement: the file's
metadata (`training_images`, written by `blip sample`) says how many it holds and a warning says so.

The features, texts and cosines are read and computed by jobs/eval_recall_features.py.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from blip_toolkit.config import parse_bytes
from blip_toolkit.embeddings.format import SWEEP_FILE, SWEEP_FORMAT, SWEEP_VERSION
from blip_toolkit.embeddings.shard_reader import EmbeddingShards
from blip_toolkit.errors import InputError, UsageError
from blip_toolkit.jobs.eval_recall_features import (
    GeneratedFile,
    evaluated_texts,
    generated_features,
    open_generated,
    reference_features,
)
from blip_toolkit.jobs.recall_config import FEATURES, RecallConfig
from blip_toolkit.metrics.recall import mean_cosine, retrieval_recall

logger = logging.getLogger("blip")

# How the best setting of a sweep is chosen: image-to-text recall at the smallest K first.
BEST_RULE = (
    "highest i2t R@K (smallest K first), then t2i R@K; among equal recall the cheapest setting "
    "(fewest model evaluations: steps, doubled by guidance != 1), then the guidance closest to 1"
)


def evaluate_recall(config: RecallConfig) -> dict[str, Any]:
    """Score the requested features; returns the report dict (every number; JSON-ready)."""
    budget = parse_bytes(config.max_memory)
    features = (
        list(config.features)
        if config.features
        else [f for f in FEATURES if f != "generated" or config.generated]
    )
    root = Path(config.dir)
    shards = EmbeddingShards(root, verify="open")  # a corrupt shard fails here, naming the file
    if shards.num_samples == 0:
        raise InputError(f"{root}: the embeddings hold no images")
    head = shards.head() if ("gt-pooled" in features or config.generated) else None
    keys = shards.keys()
    sweep = read_sweep(config.generated) if config.generated and Path(config.generated).is_dir() else None
    files = (
        [s["path"] for s in sweep["settings"]] if sweep else [config.generated] if config.generated else []
    )
    generated = [open_generated(f, shards, keys) for f in files]
    if len(generated) > 1 and any(not torch.equal(g.indices, generated[0].indices) for g in generated[1:]):
        raise InputError(f"{config.generated}: the sweep's files hold different images")
    # The evaluated images: every image, or the generated file's subset (in its order).
    selection = generated[0].indices if generated else torch.arange(shards.num_samples)
    texts = evaluated_texts(shards, keys, selection, config.dedupe_captions)
    image_features, cosine, reference = reference_features(
        shards, keys, head, selection, features, generated, config.batch_size, budget
    )

    def score(name: str, emb: torch.Tensor) -> dict[str, Any]:
        logger.info("recall of %s: %d images x %d texts", name, len(texts.scored), texts.emb.shape[0])
        return retrieval_recall(
            emb[texts.scored],
            texts.emb,
            texts.pair_image,
            texts.pair_text,
            config.ks,
            normalize=True,
            max_memory_bytes=budget,
            device=config.device,
        ).to_dict()

    # Every generated file is read (and checked) before any recall is computed.
    read = [generated_features(gen, shards, head, reference, config.batch_size, budget) for gen in generated]
    results = {name: score(name, image_features[name]) for name in features if name != "generated"}
    rows = []
    for gen, (gen_global, gen_cosine) in zip(generated, read, strict=True):
        gen_cosine["generated_global_vs_baseline"] = mean_cosine(
            gen_global, image_features["baseline"], max_memory_bytes=budget
        )
        gen_cosine["generated_global_vs_gt_pooled"] = mean_cosine(
            gen_global, image_features["gt-pooled"], max_memory_bytes=budget
        )
        label = "generated" if sweep is None else f"generated ({_setting_label(gen.metadata)})"
        result = score(label, gen_global) if "generated" in features else {}
        rows.append({**_setting(gen), "file": str(gen.path), **result, "cosine": gen_cosine})
    report: dict[str, Any] = {
        "dir": str(root),
        "index_sha256": shards.index_sha256,
        "generated": str(config.generated) if config.generated else None,
        "target_encoder": shards.encoders["target"].get("source"),
        "head_pooling": head.pooling if head is not None else shards.index.get("head", {}).get("pooling"),
        "ks": sorted(set(config.ks)),
        "dedupe_captions": config.dedupe_captions,
        "num_images": int(len(texts.scored)),
        "num_texts": int(texts.emb.shape[0]),
        "num_captions": texts.num_captions,
        "num_pairs": texts.num_pairs,
        "images_without_captions": texts.without,
        "features": results,
        "cosine": cosine,
    }
    if generated:
        report["generated_training_images"] = _training_images(generated[0], config.generated)
        best = best_setting(rows, report["ks"]) if "generated" in features else rows[0]
        report["features"]["generated"] = {
            k: v for k, v in best.items() if k not in _SETTING_KEYS + ("file", "cosine")
        }
        if "generated" not in features:
            del report["features"]["generated"]
        report["cosine"] = {**best["cosine"], **cosine}
        if sweep is not None:
            report["sweep"] = rows
            report["best"] = {k: best[k] for k in _SETTING_KEYS + ("file",)}
            report["best_rule"] = BEST_RULE
            report["checkpoint"] = sweep.get("checkpoint")
    return report


_SETTING_KEYS = ("steps", "cfg_scale", "solver", "shift")


def _setting(gen: GeneratedFile) -> dict[str, Any]:
    """The sampling setting a generated file records (None where it does not say)."""
    meta = gen.metadata

    def number(key: str, cast):
        try:
            return cast(meta[key])
        except (KeyError, ValueError):
            return None

    return {
        "steps": number("steps", int),
        "cfg_scale": number("cfg_scale", float),
        "solver": meta.get("solver"),
        "shift": number("shift", float),
    }


def _setting_label(meta: dict[str, str]) -> str:
    return f"steps {meta.get('steps', '?')}, cfg {meta.get('cfg_scale', '?')}"


def best_setting(rows: list[dict[str, Any]], ks: list[int]) -> dict[str, Any]:
    """The best row of a sweep (BEST_RULE)."""

    def key(row: dict[str, Any]):
        recall = [row["i2t"][f"R@{k}"] for k in ks] + [row["t2i"][f"R@{k}"] for k in ks]
        steps = row["steps"] or 0
        cfg = row["cfg_scale"] if row["cfg_scale"] is not None else 1.0
        cost = steps * (1 if cfg == 1.0 else 2)
        return (*recall, -cost, -abs(cfg - 1.0))

    return max(rows, key=key)


def read_sweep(path: str | Path) -> dict[str, Any]:
    """The sweep.json of a `blip sample` sweep directory, with each setting's file as an absolute
    "path"; refuses an unfinished or foreign directory."""
    directory = Path(path)
    manifest = directory / SWEEP_FILE
    if not manifest.is_file():
        raise InputError(
            f"{directory}: not a blip sample sweep (no {SWEEP_FILE}; an interrupted sweep has none)",
            hint="pass a generated-features file, or a directory written by blip sample with several settings",
        )
    try:
        sweep = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{manifest}: unreadable ({exc})") from exc
    if not isinstance(sweep, dict) or sweep.get("format") != SWEEP_FORMAT:
        raise InputError(
            f"{manifest}: not a sweep manifest (format {sweep.get('format') if isinstance(sweep, dict) else None!r})"
        )
    if int(sweep.get("version", 0)) > SWEEP_VERSION:
        raise InputError(f"{manifest}: version {sweep['version']} is newer than this toolkit reads")
    settings = sweep.get("settings")
    if not isinstance(settings, list) or not settings:
        raise InputError(f"{manifest}: lists no settings")
    for setting in settings:
        if not isinstance(setting, dict) or "file" not in setting:
            raise InputError(f"{manifest}: a setting without its file")
        setting["path"] = str(directory / setting["file"])
    return sweep


def tuned_defaults(report: dict[str, Any]) -> tuple[str, int, float, dict[str, Any]]:
    """(checkpoint, steps, cfg_scale, evidence) to make a sweep's best setting the run's sampling
    default (`dit.sample.set_sample_defaults`). Refused unless the report scored a sweep of held-out
    images."""
    if "sweep" not in report:
        raise UsageError(
            "--update-run needs a sweep: --generated DIR written by blip sample with several --steps / --cfg-scale"
        )
    training = report.get("generated_training_images")
    if training is None or training > 0:
        raise UsageError(
            f"--update-run: the sweep holds {'possibly ' if training is None else f'{training} '}training images "
            "of the run; tune on held-out images",
            hint="sample the run's held-out split (the default on its own embeddings) or other embeddings",
        )
    best = report["best"]
    if best["steps"] is None or best["cfg_scale"] is None:
        raise InputError(f"{best['file']}: records no steps / cfg_scale")
    ks = report["ks"]
    evidence = {
        "by": "eval-recall",
        "data": report["dir"],
        "index_sha256": report["index_sha256"],
        "sweep": report["generated"],
        "rule": BEST_RULE,
        "num_images": report["num_images"],
        "table": [
            {
                "steps": row["steps"],
                "cfg_scale": row["cfg_scale"],
                **{f"i2t R@{k}": row["i2t"][f"R@{k}"] for k in ks},
                **{f"t2i R@{k}": row["t2i"][f"R@{k}"] for k in ks},
            }
            for row in report["sweep"]
        ],
    }
    return report["checkpoint"], int(best["steps"]), float(best["cfg_scale"]), evidence


def _training_images(gen: GeneratedFile, where: str) -> int | None:
    """How many of the file's images trained the DiT that generated them (0: none; None: cannot
    tell), with a warning when some may have."""
    meta = gen.metadata
    if "training_images" in meta:
        count = int(meta["training_images"])
        if count:
            logger.warning(
                "%s: %d of its %d image(s) are training images of the DiT (blip sample --split %s): their recall "
                "is not a held-out number",
                where,
                count,
                gen.file.num,
                meta.get("split", "?"),
            )
        return count
    # A file from before blip sample recorded it: compare with the run's record, if it is readable.
    record = None
    checkpoint = Path(meta.get("checkpoint", ""))
    for name in ("config.json", "trainer_state.json"):
        try:
            loaded = json.loads((checkpoint / name).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        record = loaded.get("export", loaded) if name == "trainer_state.json" else loaded
        break
    if not isinstance(record, dict) or not meta.get("checkpoint"):
        return None
    data = record.get("data", {})
    if data.get("index_sha256") != gen.file.index_sha256:
        return 0  # generated for other embeddings than the run's training data
    if meta.get("split") == "eval" and data.get("eval_kind") == "held-out":
        return 0
    logger.warning(
        "%s: generated from the DiT's own training embeddings (split %s of a run holding out %s): it may "
        "hold training images, whose recall is not a held-out number",
        where,
        meta.get("split", "?"),
        data.get("eval_kind", "?"),
    )
    return None
