"""`blip demo`: every command of the toolkit, end to end, offline, on a compositional task built from the
bundled handwritten digits: two digits side by side, which the models must name in order, answer
questions about (each digit, their sum, same or not, which is larger) and match among the 100
captions of all ordered pairs.

No pretrained weights can be downloaded, so the demo trains small models from scratch and measures
what they learned on held-out test pairs (whose digit images no training pair contains), through the
same library functions the commands call, and scores them with `blip eval`:

1. data        pairs -> PNG files, TSV manifests, COCO / VQAv2 / Karpathy evaluation files
2. build       small BLIP captioning, VQA and ITM checkpoints, random weights (scratch/)
3. caption     finetune --task caption, caption the test pairs, `blip eval caption` (BLEU, METEOR,
               ROUGE-L, CIDEr) and the share of captions naming both digits in order
4. vqa         finetune --task vqa, answer the test questions, `blip eval vqa` (official accuracy,
               per question type)
5. retrieval   finetune --task retrieval, `blip eval retrieval` among the 100 canonical captions
               (ITC shortlist + ITM re-rank, R@1/5/10 both ways)
               (the VQA and retrieval models start from the trained captioner's vision tower, as
               BLIP's task models start from a pretrained image encoder)
6. embeddings  extract-embeddings: conditioning = the captioning model's vision tower, target = the
               retrieval model (its vision tokens, projected image embedding, text embeddings)
7. dit         train-dit on the training pairs' shards (5% held out), a guidance sweep on the held-out
               pairs (sample --cfg-scale ..., eval-recall --update-run), sample the test pairs' target
               tokens with the chosen scale, eval-recall --dedupe-captions among the 100 captions
then a report (report.md, report.json, PNG figures).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
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
from blip_toolkit.demo.report import write_report
from blip_toolkit.dit.sample import SampleConfig, run_sample, set_sample_defaults
from blip_toolkit.dit.train import run_train_dit
from blip_toolkit.dit.train_config import load_train_config
from blip_toolkit.embeddings.extract import extract_embeddings
from blip_toolkit.embeddings.extract_config import ExtractConfig
from blip_toolkit.embeddings.recall_report import RecallConfig, evaluate_recall, tuned_defaults
from blip_toolkit.engine.outputs import RunRecord, prepare_output_dir
from blip_toolkit.eval.caption_eval import evaluate_caption
from blip_toolkit.eval.evaluate import CaptionEvalConfig, RetrievalEvalConfig, VqaEvalConfig
from blip_toolkit.eval.retrieval_eval import evaluate_retrieval
from blip_toolkit.eval.vqa_eval import evaluate_vqa
from blip_toolkit.log import verbosity
from blip_toolkit.runtime.caption import CaptionOptions, caption_task
from blip_toolkit.runtime.datasets import open_inputs
from blip_toolkit.runtime.generation import GenerationOptions
from blip_toolkit.runtime.inference import OutputJob, run_to_file
from blip_toolkit.runtime.loading import open_runner
from blip_toolkit.runtime.records import read_output
from blip_toolkit.runtime.retrieval import RetrievalOptions, rank_texts
from blip_toolkit.runtime.vqa import VqaOptions, vqa_task
from blip_toolkit.scratch.checkpoints import ModelSize, build_checkpoint
from blip_toolkit.training.config import FinetuneConfig
from blip_toolkit.training.finetune import run_finetune

logger = logging.getLogger("blip")

RUN_KIND = "blip-demo"


@dataclass(frozen=True)
class Plan:
    """How much data and training each stage gets. Sizes were chosen on this project's 2-core CPU."""

    train_pairs: int
    test_per_combo: int  # test pairs of every ordered class combination (x5 for same-class pairs)
    caption_epochs: int
    vqa_epochs: int
    retrieval_epochs: int
    dit_steps: int
    val_pairs: int = 100
    sample_steps: int = 20


PLANS = {
    "full": Plan(
        train_pairs=4000, test_per_combo=4, caption_epochs=8, vqa_epochs=3, retrieval_epochs=4, dit_steps=800
    ),
    "quick": Plan(
        train_pairs=1500,
        test_per_combo=1,
        caption_epochs=4,
        vqa_epochs=1,
        retrieval_epochs=2,
        dit_steps=150,
        val_pairs=40,
        sample_steps=10,
    ),
}

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
DIT = dict(hidden=128, layers=4, heads=4, kv_heads=2, batch_size=64, learning_rate=2e-3, warmup_steps=50)
SAFETENSORS_FILE = "model.safetensors"
VISION_PREFIX = "vision_model."
GRID = 16  # test pairs shown in the report's grid
GUIDANCE_SWEEP = (1.0, 1.5, 2.0, 3.0)  # classifier-free guidance scales tried on held-out pairs


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
        results = {s.name: s.metrics.get("summary", "") for s in self.stages}
        return [(s.name, results.get(s.name, ""), f"{s.seconds:.1f}") for s in self.stages]


STAGE_TITLES = {
    "data": "composing digit pairs (PNG files, manifests, COCO / VQAv2 / Karpathy evaluation files)",
    "build": "building small BLIP captioning, VQA and ITM checkpoints from scratch",
    "caption": "fine-tuning captioning, captioning the test pairs, blip eval caption",
    "vqa": "fine-tuning VQA, answering five kinds of question per test pair, blip eval vqa",
    "retrieval": "fine-tuning retrieval (ITC + ITM), blip eval retrieval among the 100 captions",
    "embeddings": "extracting embedding shards (conditioning: captioning tower; target: retrieval model)",
    "dit": "training the DiT, sampling the test pairs' features, measuring recall",
}


def run_demo(config: DemoConfig, *, progress: Callable[[str], None] | None = None) -> DemoResult:
    """Run every stage into `config.out` and write the report. Deterministic for a given seed (and
    the same torch thread count)."""
    say = progress or logger.info
    mode = "custom" if config.plan is not None else "quick" if config.quick else "full"
    plan = config.plan or PLANS[mode]
    out = prepare_output_dir(
        config.out, overwrite=config.overwrite, kind=RUN_KIND, flag="--out", resumable=False
    )
    record = RunRecord(out, RUN_KIND)
    record.start({"config": {**asdict(config), "plan": asdict(plan)}})
    torch.manual_seed(config.seed)
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
    stages: list[StageResult] = []
    start = time.perf_counter()
    try:
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
        report = write_report(out, mode=mode, seed=config.seed, metrics=metrics, state=state)
        stages.append(StageResult("report", time.perf_counter() - began))
        total = time.perf_counter() - start
        report["finalize"](stages, total)
    except BaseException as exc:
        record.fail(exc)
        raise
    record.finish(total_seconds=total)
    return DemoResult(
        out=str(out),
        mode=mode,
        stages=stages,
        metrics=metrics,
        report_md=report["md"],
        report_json=report["json"],
        figures=report["figures"],
        total_seconds=total,
    )


# ----------------------------------------------------------------------------- stages


def _stage_data(state: dict) -> dict:
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
        **FINETUNE,
    )
    with _quiet():
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


def _predict(state: dict, task: str, source, options, make_task, name: str) -> list[dict]:
    """Dataset inference as `blip caption|vqa ... --output predictions/NAME.jsonl` runs it."""
    path = state["out"] / "predictions" / f"{name}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    job = OutputJob(str(path), device="cpu")
    with _quiet():
        run_to_file(
            task, source, options, make_task, options.fingerprint(), job, model=str(state["trained"][task])
        )
    return read_output(path)


def _stage_caption(state: dict) -> dict:
    data: DemoData = state["data"]
    _finetune(state, "caption", state["plan"].caption_epochs)
    options = CaptionOptions(batch_size=64, generation=GenerationOptions(max_new_tokens=16), num_workers=0)
    source = open_inputs([str(p) for p in data.images("test")])
    records = _predict(
        state, "caption", source, options, lambda runner: caption_task(runner, options), "captions"
    )
    truth = [(p.left, p.right) for p in data.pairs["test"]]
    in_order = sum(digits_in(r.get("caption", ""))[:2] == [a, b] for r, (a, b) in zip(records, truth)) / len(
        truth
    )
    report = evaluate_caption(
        CaptionEvalConfig(
            annotations=str(data.eval_files["test"]["captions"]),
            images=str(data.root / "images"),
            predictions=str(state["out"] / "predictions" / "captions.jsonl"),
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


def _stage_vqa(state: dict) -> dict:
    data: DemoData = state["data"]
    _start_from_captioner(state, "vqa")
    _finetune(state, "vqa", state["plan"].vqa_epochs)
    options = VqaOptions(batch_size=64, generation=GenerationOptions(max_new_tokens=4), num_workers=0)
    source = open_inputs(None, data.manifests["test"]["vqa"], manifest_schema="questions")
    records = _predict(state, "vqa", source, options, lambda runner: vqa_task(runner, options), "answers")
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


def _stage_retrieval(state: dict) -> dict:
    data: DemoData = state["data"]
    _start_from_captioner(state, "retrieval")
    _finetune(state, "retrieval", state["plan"].retrieval_epochs)
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


def _stage_embeddings(state: dict) -> dict:
    data: DemoData = state["data"]
    dirs = {}
    for split in ("train", "test"):
        out = state["out"] / "embeddings" / split
        with _quiet():
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
    return {"tokens": "cls+patch", "summary": "train and test shards written"}


def _stage_dit(state: dict) -> dict:
    plan, out, emb = state["plan"], state["out"], state["embeddings"]
    run_dir = out / "dit"
    config = load_train_config(
        None,
        {
            "output_dir": str(run_dir),
            "data.dir": str(emb["train"]),
            "data.eval_fraction": 0.05,
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
        # Guidance tuned on held-out recall, as a user does: sweep the run's held-out training images
        # (`blip sample` defaults to them), make the best setting the run's default
        # (`eval-recall --update-run`), then sample the test pairs with it.
        sweep = run_sample(
            SampleConfig(
                checkpoint=str(run_dir),
                data=str(emb["train"]),
                out=str(out / "guidance-sweep"),
                cfg_scale=list(GUIDANCE_SWEEP),
                seed=state["seed"],
                device="cpu",
            )
        )
        tuning = evaluate_recall(
            RecallConfig(dir=str(emb["train"]), generated=sweep.path, ks=[1, 5], dedupe_captions=True)
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
        "summary": f"generated R@1 {generated:.1%} vs the target encoder's own {base:.1%} "
        f"({recall['generated_over_baseline_r1']:.0%} of it) among {report['num_texts']} captions; "
        f"guidance {sampled.cfg_scale:g} chosen on {tuning['num_images']} held-out training pairs",
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
