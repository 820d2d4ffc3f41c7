"""`blip demo`: every command of the toolkit, end to end, offline, on the bundled handwritten digits.

No pretrained weights can be downloaded, so the demo trains small models from scratch and measures
what they learned on held-out test images, through the same library functions the commands call:

1. data        digits -> PNG files and TSV manifests (fixed-seed train / val / test split)
2. build       small BLIP captioning, VQA and ITM checkpoints, random weights (save_pretrained)
3. caption     finetune --task caption, then caption the test images: accuracy = the right digit word
4. vqa         finetune --task vqa, then "what digit is this?": exact-match answer accuracy
5. retrieval   finetune --task retrieval, then rank the ten captions per test image: top-1 accuracy
6. embeddings  extract-embeddings: conditioning = the captioning model's vision tower, target = the
               retrieval model (its vision tokens, projected image embedding, text embeddings)
7. dit         train-dit on the training images' shards, sample the test images' target tokens
8. recall      eval-recall --dedupe-captions: recall@1/5 of the generated features next to the
               target encoder's own (baseline) and the pooled ground truth
then a report (report.md, report.json, PNG figures).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from blip_toolkit.data.images import InputItem
from blip_toolkit.demo.data import CAPTIONS, CORPUS, DIGIT_WORDS, QUESTION, write_dataset
from blip_toolkit.demo.report import write_report
from blip_toolkit.dit.sample import SampleConfig, run_sample
from blip_toolkit.dit.train import run_train_dit
from blip_toolkit.dit.train_config import load_train_config
from blip_toolkit.embeddings.extract import ExtractConfig, extract_embeddings
from blip_toolkit.embeddings.recall_report import RecallConfig, evaluate_recall
from blip_toolkit.engine.outputs import prepare_output_dir
from blip_toolkit.fsutil import write_json
from blip_toolkit.log import verbosity
from blip_toolkit.runtime.caption import CaptionOptions, caption_images
from blip_toolkit.runtime.generation import GenerationOptions
from blip_toolkit.runtime.loading import open_runner
from blip_toolkit.runtime.retrieval import RetrievalOptions, rank_texts
from blip_toolkit.runtime.vqa import VqaOptions, answer_questions
from blip_toolkit.scratch.checkpoints import ModelSize, build_checkpoint
from blip_toolkit.training.finetune import FinetuneConfig, run_finetune

logger = logging.getLogger("blip")

RUN_FILE = "blip_run.json"


@dataclass(frozen=True)
class Plan:
    """How much training each stage gets. Sizes were chosen on this project's 2-core CPU: the full
    plan reaches >= 90% on every task in about 4.5 minutes, the quick plan runs in about 1.5."""

    caption_epochs: int
    vqa_epochs: int
    retrieval_epochs: int
    dit_steps: int
    limit: int | None = None  # images per split (None: all)
    sample_steps: int = 20


PLANS = {
    "full": Plan(caption_epochs=20, vqa_epochs=30, retrieval_epochs=14, dit_steps=600),
    "quick": Plan(caption_epochs=6, vqa_epochs=10, retrieval_epochs=4, dit_steps=200, sample_steps=10),
}

# Small enough to train in a minute on two CPU cores, wide enough to reach >= 90% on the digits.
# Initialisation: BLIP's vision default (1e-10) cannot learn from scratch; 0.02 learns but VQA (whose
# image signal must cross two cross-attention hops) sits on a plateau for many epochs; 0.05 does not.
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
FINETUNE = dict(batch_size=32, learning_rate=1e-3, warmup_steps=20, weight_decay=0.01, max_length=12)
DIT = dict(hidden=128, layers=4, heads=4, kv_heads=2, batch_size=64, learning_rate=2e-3, warmup_steps=50)


@dataclass
class DemoConfig:
    out: str = "demo-output"
    quick: bool = False
    seed: int = 0
    overwrite: bool = False
    plan: Plan | None = None  # Python API only: a custom plan (tests use a tiny one)


@dataclass
class StageResult:
    name: str
    seconds: float
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class DemoResult:
    out: str
    mode: str
    stages: list[StageResult]
    metrics: dict[str, Any]
    report_md: str
    report_json: str
    figures: dict[str, str]
    total_seconds: float

    def summary_rows(self) -> list[tuple[str, str, str]]:
        """(stage, key result, seconds) for the console table."""
        m = self.metrics
        results = {
            "caption": f"test accuracy {m['caption']['accuracy']:.1%}",
            "vqa": f"test accuracy {m['vqa']['accuracy']:.1%}",
            "retrieval": f"test top-1 {m['retrieval']['top1']:.1%}",
            "dit": (
                f"generated R@1 {m['recall']['generated']['i2t']['R@1']:.1%} vs baseline "
                f"{m['recall']['baseline']['i2t']['R@1']:.1%} "
                f"({m['recall']['generated_over_baseline_r1']:.0%} of it)"
            ),
        }
        return [(s.name, results.get(s.name, ""), f"{s.seconds:.1f}") for s in self.stages]


def run_demo(config: DemoConfig, *, progress: Callable[[str], None] | None = None) -> DemoResult:
    """Run every stage into `config.out` and write the report. Deterministic for a given seed (and
    the same torch thread count)."""
    say = progress or (lambda text: logger.info(text))
    mode = "quick" if config.quick else "full"
    plan = config.plan or PLANS[mode]
    if config.plan is not None:
        mode = "custom"
    out = prepare_output_dir(config.out, overwrite=config.overwrite, resumable=False)
    write_json(
        out / RUN_FILE,
        {"command": "demo", "config": asdict(config), "plan": asdict(plan), "status": "running"},
    )
    torch.manual_seed(config.seed)
    stages: list[StageResult] = []
    state: dict[str, Any] = {"out": out, "plan": plan, "seed": config.seed}
    steps = [
        ("data", _stage_data),
        ("build", _stage_build),
        ("caption", _stage_caption),
        ("vqa", _stage_vqa),
        ("retrieval", _stage_retrieval),
        ("embeddings", _stage_embeddings),
        ("dit", _stage_dit),
    ]
    start = time.perf_counter()
    for number, (name, stage) in enumerate(steps, start=1):
        say(f"[{number}/{len(steps) + 1}] {STAGE_TITLES[name]}")
        began = time.perf_counter()
        metrics = stage(state) or {}
        stages.append(StageResult(name, time.perf_counter() - began, metrics))
        if metrics.get("summary"):
            say(f"      {metrics['summary']}")

    say(f"[{len(steps) + 1}/{len(steps) + 1}] writing the report")

    began = time.perf_counter()
    metrics = {s.name: {k: v for k, v in s.metrics.items() if k != "summary"} for s in stages}
    metrics["recall"] = state["recall"]
    report = write_report(out, mode=mode, seed=config.seed, stages=stages, metrics=metrics, state=state)
    stages.append(StageResult("report", time.perf_counter() - began))
    total = time.perf_counter() - start
    result = DemoResult(
        out=str(out),
        mode=mode,
        stages=stages,
        metrics=metrics,
        report_md=report["md"],
        report_json=report["json"],
        figures=report["figures"],
        total_seconds=total,
    )
    report["finalize"](stages, total)
    write_json(
        out / RUN_FILE,
        {
            "command": "demo",
            "config": asdict(config),
            "plan": asdict(plan),
            "status": "done",
            "total_seconds": total,
        },
    )
    return result


STAGE_TITLES = {
    "data": "preparing the digits (PNG files and manifests)",
    "build": "building small BLIP captioning, VQA and ITM checkpoints from scratch",
    "caption": "fine-tuning captioning, then captioning the test images",
    "vqa": "fine-tuning VQA, then answering 'what digit is this?' on the test images",
    "retrieval": "fine-tuning retrieval (ITC + ITM), then ranking the ten captions per test image",
    "embeddings": "extracting embedding shards (conditioning: captioning tower; target: retrieval model)",
    "dit": "training the DiT, sampling the test images' features, measuring recall",
}


# ----------------------------------------------------------------------------- stages


def _stage_data(state: dict) -> dict:
    data = write_dataset(state["out"] / "data", seed=state["seed"], limit=state["plan"].limit)
    state["data"] = data
    sizes = {name: len(idx) for name, idx in data.splits.items()}
    return {"splits": sizes, "summary": ", ".join(f"{n} {name}" for name, n in sizes.items()) + " images"}


def _stage_build(state: dict) -> dict:
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


def _finetune(state: dict, task: str, epochs: int) -> Any:
    data = state["data"]
    out = state["out"] / "models" / task
    config = FinetuneConfig(
        manifest=str(data.manifests[task]["train"]),
        val_manifest=str(data.manifests[task]["val"]),
        task=task,
        model=str(state["initial"][task]),
        output_dir=str(out),
        epochs=epochs,
        seed=state["seed"],
        log_every=10_000,
        **FINETUNE,
    )
    with _quiet():
        result = run_finetune(config)
    state.setdefault("history", {})[task] = result.history
    state.setdefault("trained", {})[task] = out
    return result


def _test_items(state: dict):
    data = state["data"]
    return [InputItem(str(p)) for p in data.split_images("test")], data.split_labels("test")


def _write_predictions(state: dict, task: str, records: list[dict]) -> None:
    path = state["out"] / "predictions" / f"{task}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")


def _stage_caption(state: dict) -> dict:
    _finetune(state, "caption", state["plan"].caption_epochs)
    items, labels = _test_items(state)
    runner = open_runner(str(state["trained"]["caption"]), "caption", device="cpu")
    records = list(
        caption_images(
            runner, items, CaptionOptions(batch_size=64, generation=GenerationOptions(max_new_tokens=8))
        )
    )
    correct = [DIGIT_WORDS[label] in r.get("caption", "").split() for r, label in zip(records, labels)]
    _write_predictions(state, "caption", records)
    state["captions"] = [r.get("caption", "") for r in records]
    accuracy = sum(correct) / len(correct)
    return {"accuracy": accuracy, "test_images": len(correct), "summary": f"test accuracy {accuracy:.1%}"}


def _stage_vqa(state: dict) -> dict:
    _finetune(state, "vqa", state["plan"].vqa_epochs)
    items, labels = _test_items(state)
    runner = open_runner(str(state["trained"]["vqa"]), "vqa", device="cpu")
    records = list(
        answer_questions(
            runner,
            items,
            [QUESTION] * len(items),
            VqaOptions(batch_size=64, generation=GenerationOptions(max_new_tokens=4)),
        )
    )
    correct = [r.get("answer") == DIGIT_WORDS[label] for r, label in zip(records, labels)]
    _write_predictions(state, "vqa", records)
    state["answers"] = [r.get("answer", "") for r in records]
    accuracy = sum(correct) / len(correct)
    return {"accuracy": accuracy, "test_images": len(correct), "summary": f"test accuracy {accuracy:.1%}"}


def _stage_retrieval(state: dict) -> dict:
    _finetune(state, "retrieval", state["plan"].retrieval_epochs)
    items, labels = _test_items(state)
    runner = open_runner(str(state["trained"]["retrieval"]), "retrieval", device="cpu")
    records = list(rank_texts(runner, items, list(CAPTIONS), RetrievalOptions(batch_size=32)))
    correct = [r["results"][0]["text"] == CAPTIONS[label] for r, label in zip(records, labels)]
    _write_predictions(state, "retrieval", records)
    state["retrieved"] = [r["results"][0]["text"] for r in records]
    top1 = sum(correct) / len(correct)
    return {
        "top1": top1,
        "test_images": len(correct),
        "candidates": len(CAPTIONS),
        "summary": f"test top-1 {top1:.1%}",
    }


def _stage_embeddings(state: dict) -> dict:
    data = state["data"]
    dirs = {}
    for split in ("train", "test"):
        out = state["out"] / "embeddings" / split
        with _quiet():
            extract_embeddings(
                ExtractConfig(
                    source=[str(data.manifests["retrieval"][split])],
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
    return {"tokens": "cls+patch", "summary": "train and test shards written"}


def _stage_dit(state: dict) -> dict:
    plan, out, emb = state["plan"], state["out"], state["embeddings"]
    run_dir = out / "dit"
    config = load_train_config(
        None,
        {
            "output_dir": str(run_dir),
            "data.dir": str(emb["train"]),
            "data.eval_fraction": 0.1,
            "data.split_seed": state["seed"],
            "model.preset": "tiny",
            "model.hidden_size": DIT["hidden"],
            "model.num_layers": DIT["layers"],
            "model.num_heads": DIT["heads"],
            "model.num_kv_heads": DIT["kv_heads"],
            "flow.target_norm": "standardize",
            "flow.cond_dropout": 0.1,
            "train.max_steps": plan.dit_steps,
            "train.batch_size": DIT["batch_size"],
            "train.learning_rate": DIT["learning_rate"],
            "train.warmup_steps": DIT["warmup_steps"],
            "train.weight_decay": 0.01,
            "train.ema_decay": 0.99,
            "train.seed": state["seed"],
            "train.log_every": 10,
            "train.save_every": 0,
            "eval.every": max(plan.dit_steps // 4, 1),
            "eval.steps": plan.sample_steps,
            "eval.max_samples": 128,
            "sample.steps": plan.sample_steps,
        },
    )
    with _quiet():
        trained = run_train_dit(config)
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
            RecallConfig(dir=str(emb["test"]), generated=sampled.path, ks=[1, 5], dedupe_captions=True)
        )
    state["dit_history"] = trained.history
    recall = dict(report["features"])
    recall["cosine"] = report.get("cosine", {})
    base, generated = recall["baseline"]["i2t"]["R@1"], recall["generated"]["i2t"]["R@1"]
    recall["generated_over_baseline_r1"] = generated / base if base else 0.0
    state["recall"] = recall
    return {
        "train_steps": trained.steps,
        "parameters": trained.num_parameters,
        "sample_steps": sampled.steps,
        "summary": f"generated R@1 {generated:.1%} vs baseline {base:.1%} "
        f"({recall['generated_over_baseline_r1']:.0%} of it)",
    }


class _quiet:
    """Keep the library's per-step log lines out of the demo's console (warnings still show)."""

    def __enter__(self):
        self._level = logger.level
        if verbosity() <= 0:
            logger.setLevel(logging.WARNING)
        return self

    def __exit__(self, *exc):
        logger.setLevel(self._level)
