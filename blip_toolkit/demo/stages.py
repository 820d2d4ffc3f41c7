"""The stages of `blip demo` (see demo/run.py): each takes the run's state dict, does its part through
the library functions the commands call, and returns its metrics (with a one-line "summary")."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from blip_toolkit.data.images import InputItem
from blip_toolkit.demo.data import (
    CANONICAL_CAPTIONS,
    CORPUS,
    IMAGE_PATTERN,
    DemoData,
    digits_in,
    write_dataset,
)
from blip_toolkit.dit.sample import SampleConfig, run_sample, set_sample_defaults
from blip_toolkit.dit.train import run_train_dit
from blip_toolkit.dit.train_config import load_train_config
from blip_toolkit.errors import InputError
from blip_toolkit.jobs.eval_caption import evaluate_caption
from blip_toolkit.jobs.eval_recall import RecallConfig, evaluate_recall, tuned_defaults
from blip_toolkit.jobs.eval_retrieval import evaluate_retrieval
from blip_toolkit.jobs.eval_vqa import evaluate_vqa
from blip_toolkit.jobs.evaluate import CaptionEvalConfig, RetrievalEvalConfig, VqaEvalConfig
from blip_toolkit.jobs.extract import extract_embeddings
from blip_toolkit.jobs.extract_config import ExtractConfig
from blip_toolkit.jobs.inference import OutputJob, run_to_file
from blip_toolkit.jobs.predict import Prediction, answering, captioning, rank_texts
from blip_toolkit.log import verbosity
from blip_toolkit.models.loading import open_runner
from blip_toolkit.models.scratch.checkpoints import ModelSize, build_checkpoint
from blip_toolkit.models.spec import LoadSpec
from blip_toolkit.pipeline.outputs import read_output
from blip_toolkit.pipeline.sources import open_inputs
from blip_toolkit.predictors.options import CaptionOptions, GenerationOptions, RetrievalOptions, VqaOptions
from blip_toolkit.training.config import FinetuneConfig
from blip_toolkit.training.finetune import run_finetune

logger = logging.getLogger("blip")

# Small enough to train in minutes on two CPU cores. Initialisation: BLIP's vision default (1e-10)
# cannot learn from scratch; 0.02 learns but VQA (whose image signal must cross two cross-attention
# hops) sits on a plateau for many epochs; 0.05 does not.
MODEL_SIZE = dict(
    image_size=32,
    patch_size=8,
    hidden=128,
    layers=3,
    heads=4,
    intermediate=256,
    projection=64,
    text_layers=2,
    initializer_range=0.05,
)
FINETUNE = dict(batch_size=32, learning_rate=1e-3, warmup_steps=20, weight_decay=0.01, max_length=16)
# The DiT's recipe (docs/dit-recipes.md says why): the repository's configs/, as data/ holds the digits.
DIT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "dit-demo.toml"
SAFETENSORS_FILE = "model.safetensors"
VISION_PREFIX = "vision_model."
GRID = 16  # test pairs shown in the report's grid
GUIDANCE_SWEEP = (1.0, 2.0, 3.0, 4.0)  # classifier-free guidance scales tried on held-out pairs


def stage_data(state: dict) -> dict:
    plan = state["plan"]
    data = write_dataset(
        state["out"] / "data",
        train=plan.train_pairs,
        val=plan.val_pairs,
        test_per_combo=plan.test_per_combo,
        seed=state["seed"],
    )
    state["data"] = data
    sizes = {name: len(pairs) for name, pairs in data.pairs.items()}
    return {"pairs": sizes, "summary": ", ".join(f"{n} {name}" for name, n in sizes.items()) + " pairs"}


def stage_build(state: dict) -> dict:
    size = ModelSize(**MODEL_SIZE)
    models = state["out"] / "models"
    state["initial"] = {
        task: build_checkpoint(
            kind, models / f"{task}-init", size=size, corpus=CORPUS, seed=state["seed"] + i
        )
        for i, (task, kind) in enumerate(
            [("caption", "blip-caption"), ("vqa", "blip-vqa"), ("retrieval", "blip-itm")]
        )
    }
    return {"model_size": MODEL_SIZE}


def _finetune(state: dict, task: str, epochs: int, **recipe: Any) -> Any:
    """`blip finetune` of `task` for `epochs` with FINETUNE and `recipe` (e.g. augment_shift, freeze)."""
    data: DemoData = state["data"]
    out = state["out"] / "models" / task
    config = FinetuneConfig(
        manifest=str(data.manifests["train"][task]),
        val_manifest=str(data.manifests["val"][task]),
        task=task,
        model=str(state["initial"][task]),
        output_dir=str(out),
        epochs=epochs,
        seed=state["seed"],
        log_every=10_000,
        **{**FINETUNE, **recipe},
    )
    with QuietLibraryLogs():
        result = run_finetune(config)
    state.setdefault("history", {})[task] = result.history
    state.setdefault("trained", {})[task] = out
    return result


def _start_from_captioner(state: dict, task: str) -> None:
    """Give the `task` model's initial checkpoint the trained captioner's vision tower, as BLIP's VQA
    and retrieval models start from a pretrained image encoder: the digits are learned once, by the
    stage that learns them fastest."""
    init = Path(state["initial"][task]) / SAFETENSORS_FILE
    tensors = load_file(init)
    trained = load_file(Path(state["trained"]["caption"]) / SAFETENSORS_FILE)
    vision = {k: v for k, v in trained.items() if k.startswith(VISION_PREFIX)}
    missing = [k for k in tensors if k.startswith(VISION_PREFIX) and k not in vision]
    if not vision or missing:
        raise RuntimeError(
            f"the captioner's vision tower does not fit the {task} model ({len(missing)} missing)"
        )
    tensors.update({k: vision[k] for k in tensors if k.startswith(VISION_PREFIX)})
    save_file(tensors, init, metadata={"format": "pt"})


def _predict(state: dict, prediction: Prediction, source, name: str) -> list[dict]:
    """Dataset inference as `blip caption|vqa ... --output predictions/NAME.jsonl` runs it."""
    path = state["out"] / "predictions" / f"{name}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    load = LoadSpec(model=str(state["trained"][prediction.task]), device="cpu")
    with QuietLibraryLogs():
        run_to_file(prediction, source, load, OutputJob(str(path)))
    return read_output(path)


def stage_caption(state: dict) -> dict:
    data: DemoData = state["data"]
    plan = state["plan"]
    _finetune(state, "caption", plan.caption_epochs, augment_shift=plan.augment_shift)
    options = CaptionOptions(batch_size=64, generation=GenerationOptions(max_new_tokens=16), num_workers=0)
    source = open_inputs([str(p) for p in data.images("test")])
    records = _predict(state, captioning(options), source, "captions")
    truth = [(p.left, p.right) for p in data.pairs["test"]]
    in_order = sum(digits_in(r.get("caption", ""))[:2] == [a, b] for r, (a, b) in zip(records, truth)) / len(
        truth
    )
    report = evaluate_caption(
        CaptionEvalConfig(
            annotations=str(data.eval_files["test"]["captions"]),
            images=str(data.root / "images"),
            predictions=str(state["out"] / "predictions" / "captions.jsonl"),
            java=state.get("java", True),
        )
    )
    state["captions"] = [r.get("caption", "") for r in records[:GRID]]
    metrics = report["metrics"]
    return {
        "both_digits_in_order": in_order,
        "eval": metrics,
        "test_pairs": len(truth),
        "summary": f"both digits right and in order {in_order:.1%}; CIDEr {metrics['CIDEr']:.1f}, "
        f"BLEU-4 {metrics['Bleu_4']:.1f}",
    }


def stage_vqa(state: dict) -> dict:
    data: DemoData = state["data"]
    _start_from_captioner(state, "vqa")
    # The captioner's tower stays frozen: the digits are read as the captioner reads them, and only
    # the question encoder and answer decoder learn (half the time per step; with the tower trained
    # along, "which digit is larger?" sat at chance for most of the run).
    _finetune(state, "vqa", state["plan"].vqa_epochs, freeze=["vision"])
    options = VqaOptions(batch_size=64, generation=GenerationOptions(max_new_tokens=4), num_workers=0)
    source = open_inputs(None, data.manifests["test"]["vqa"], manifest_schema="questions")
    records = _predict(state, answering(options), source, "answers")
    files = data.eval_files["test"]
    report = evaluate_vqa(
        VqaEvalConfig(
            questions=str(files["vqa_questions"]),
            annotations=str(files["vqa_annotations"]),
            images=str(data.root / "images"),
            image_pattern=IMAGE_PATTERN,
            predictions=str(state["out"] / "predictions" / "answers.jsonl"),
        )
    )
    state["answers"] = [[r.get("answer", "") for r in records[5 * i : 5 * i + 5]] for i in range(GRID)]
    metrics = report["metrics"]
    return {
        "eval": metrics,
        "questions": len(records),
        "summary": f"VQA accuracy {metrics['overall']:.1f} (official metric, x100); "
        + ", ".join(f"{k} {v:.0f}" for k, v in metrics.get("per_question_type", {}).items()),
    }


def stage_retrieval(state: dict) -> dict:
    data: DemoData = state["data"]
    _start_from_captioner(state, "retrieval")
    # Trained along (not frozen): the DiT translates the captioner's tower into this one, which must
    # be another encoder.
    plan = state["plan"]
    _finetune(state, "retrieval", plan.retrieval_epochs, augment_shift=plan.augment_shift)
    report = evaluate_retrieval(
        RetrievalEvalConfig(
            annotations=str(data.eval_files["test"]["retrieval"]),
            images=str(data.root / "images"),
            model=str(state["trained"]["retrieval"]),
            k_test=16,
            device="cpu",
            dedupe_captions=True,
        )
    )
    runner = open_runner(str(state["trained"]["retrieval"]), "retrieval", device="cpu")
    items = [InputItem(str(p)) for p in data.images("test")[:GRID]]
    ranked = list(rank_texts(runner, items, list(CANONICAL_CAPTIONS), RetrievalOptions(batch_size=16)))
    state["retrieved"] = [r["results"][0]["text"] if "results" in r else "" for r in ranked]
    metrics = report["metrics"]
    return {
        "eval": metrics,
        "texts": report["scored"]["texts"],
        "summary": f"image-to-text R@1 {metrics['txt_r1']:.1f}%, text-to-image R@1 {metrics['img_r1']:.1f}% "
        f"among {report['scored']['texts']} captions",
    }


def stage_embeddings(state: dict) -> dict:
    data: DemoData = state["data"]
    dirs = {}
    # val: the pairs of the validation digit images, on which the DiT's guidance scale is chosen.
    for split in ("train", "val", "test"):
        out = state["out"] / "embeddings" / split
        with QuietLibraryLogs():
            extract_embeddings(
                ExtractConfig(
                    source=[str(data.manifests[split]["retrieval"])],
                    out=str(out),
                    cond_encoder=str(state["trained"]["caption"]),
                    target_encoder=str(state["trained"]["retrieval"]),
                    tokens="cls+patch",
                    head_pool="cls",
                    dtype="float32",
                    device="cpu",
                    batch_size=128,
                    shard_size=512,
                    num_workers=0,
                )
            )
        dirs[split] = out
    state["embeddings"] = dirs
    return {"tokens": "cls+patch", "summary": "train, val and test shards written"}


def stage_dit(state: dict) -> dict:
    plan, out, emb = state["plan"], state["out"], state["embeddings"]
    run_dir = out / "dit"
    if not DIT_CONFIG.is_file():
        raise InputError(
            f"{DIT_CONFIG}: the demo's DiT preset is missing (it ships in the repository's configs/)"
        )
    # The recipe (model, objective, optimisation) is configs/dit-demo.toml's, so `blip train-dit -c
    # configs/dit-demo.toml` on the demo's shards trains the same DiT; the plan sets its length.
    config = load_train_config(
        DIT_CONFIG,
        {
            "output_dir": str(run_dir),
            "data.dir": str(emb["train"]),
            "data.split_seed": state["seed"],
            "train.max_steps": plan.dit_steps,
            "train.seed": state["seed"],
            "eval.every": max(plan.dit_steps // 2, 1),
            "eval.steps": plan.sample_steps,
            "sample.steps": plan.sample_steps,
        },
    )
    with QuietLibraryLogs():
        trained = run_train_dit(config)
        # Guidance tuned on held-out recall, as a user does: sweep the validation pairs (digit images
        # no model trained on, like the test pairs': the DiT's own held-out pairs reuse training digit
        # images, on which every scale scored alike), make the best setting the run's default
        # (`eval-recall --update-run`), then sample the test pairs with it.
        sweep = run_sample(
            SampleConfig(
                checkpoint=str(run_dir),
                data=str(emb["val"]),
                out=str(out / "guidance-sweep"),
                cfg_scale=list(GUIDANCE_SWEEP),
                seed=state["seed"],
                device="cpu",
            )
        )
        tuning = evaluate_recall(
            RecallConfig(dir=str(emb["val"]), generated=sweep.path, ks=[1, 5], dedupe_captions=True)
        )
        checkpoint, steps, scale, evidence = tuned_defaults(tuning)
        set_sample_defaults(checkpoint, steps=steps, cfg_scale=scale, evidence=evidence)
        sampled = run_sample(
            SampleConfig(
                checkpoint=str(run_dir),
                data=str(emb["test"]),
                out=str(out / "generated.safetensors"),
                seed=state["seed"],
                device="cpu",
            )
        )
        report = evaluate_recall(
            RecallConfig(dir=str(emb["test"]), generated=sampled.path, ks=[1, 5, 10], dedupe_captions=True)
        )
    state["dit_history"] = trained.history
    recall = dict(report["features"])
    recall["cosine"] = report.get("cosine", {})
    base, generated = recall["baseline"]["i2t"]["R@1"], recall["generated"]["i2t"]["R@1"]
    recall["generated_over_baseline_r1"] = generated / base if base else 0.0
    state["recall"] = recall
    images = report["num_images"]
    return {
        "train_steps": trained.steps,
        "parameters": trained.num_parameters,
        "sample_steps": sampled.steps,
        "cfg_scale": sampled.cfg_scale,
        "guidance_sweep": [
            {"cfg_scale": row["cfg_scale"], "i2t_r1": row["i2t"]["R@1"], "i2t_r5": row["i2t"]["R@5"]}
            for row in tuning["sweep"]
        ],
        "sweep_images": tuning["num_images"],
        "recall": recall,
        "texts": report["num_texts"],
        # the ratio to three places and the counts: the margin can be a couple of test pairs
        "summary": f"generated R@1 {generated:.1%} vs the target encoder's own {base:.1%} "
        f"({recall['generated_over_baseline_r1']:.3f}x: {round(generated * images)} vs {round(base * images)} of "
        f"{images} test pairs) among {report['num_texts']} captions; "
        f"guidance {sampled.cfg_scale:g} chosen on {tuning['num_images']} validation pairs",
    }


class QuietLibraryLogs:
    """Keep the library's per-step log lines out of the demo's console (warnings still show)."""

    def __enter__(self):
        self._level = logger.level
        if verbosity() <= 0:
            logger.setLevel(logging.WARNING)
        return self

    def __exit__(self, *exc):
        logger.setLevel(self._level)
