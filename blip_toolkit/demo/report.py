"""The demo's report: report.md, report.json and PNG figures (training curves, recall bars, a grid of
test pairs with what each model said about them)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
from PIL import Image

from blip_toolkit import __version__
from blip_toolkit.demo.data import QUESTIONS, answer, canonical_caption, digits_in
from blip_toolkit.fsutil import atomic_path, write_json

matplotlib.use("Agg")

TASK_METRIC = {
    "caption": ("val_accuracy", "val accuracy"),
    "vqa": ("val_accuracy", "val accuracy"),
    "retrieval": ("val_recall@1", "val recall@1"),
}
GRID = 16
CAPTION_METRICS = {
    "Bleu_1": "BLEU-1",
    "Bleu_2": "BLEU-2",
    "Bleu_3": "BLEU-3",
    "Bleu_4": "BLEU-4",
    "METEOR": "METEOR",
    "ROUGE_L": "ROUGE-L",
    "CIDEr": "CIDEr",
}


def write_report(out: Path, *, mode: str, seed: int, metrics: dict[str, Any], state: dict) -> dict:
    """Write the figures now; report.md / report.json are written by `finalize` once the report
    stage's own time is known."""
    figures_dir = out / "figures"
    figures_dir.mkdir(exist_ok=True)
    figures = {
        "curves": str(_curves(figures_dir / "training_curves.png", state)),
        "recall": str(_recall_bars(figures_dir / "recall.png", state["recall"])),
        "samples": str(_sample_grid(figures_dir / "test_samples.png", state)),
    }
    md_path, json_path = out / "report.md", out / "report.json"

    def finalize(all_stages, total_seconds: float) -> None:
        document = {
            "toolkit_version": __version__,
            "mode": mode,
            "seed": seed,
            "total_seconds": round(total_seconds, 2),
            "stage_seconds": {s.name: round(s.seconds, 2) for s in all_stages},
            "summaries": {s.name: s.metrics.get("summary", "") for s in all_stages},
            "metrics": metrics,
            "figures": {k: str(Path(v).relative_to(out)) for k, v in figures.items()},
        }
        write_json(json_path, document)
        with atomic_path(md_path) as tmp:
            tmp.write_text(markdown(document), encoding="utf-8")

    return {"md": str(md_path), "json": str(json_path), "figures": figures, "finalize": finalize}


def markdown(doc: dict) -> str:
    m = doc["metrics"]
    pairs = m["data"]["pairs"]
    lines = [
        f"# blip demo report ({doc['mode']} mode)",
        "",
        f"blip {doc['toolkit_version']}, seed {doc['seed']}, {doc['total_seconds']:.0f} s in total. Data: pairs of UCI "
        f"handwritten digits side by side (32x32 px), {pairs['train']} train / {pairs['val']} val / {pairs['test']} "
        "test pairs; a pair of a split is made only of that split's digit images, so no test digit image was "
        "seen in training. Every number below is measured on the test pairs.",
        "",
        "| stage | result | seconds |",
        "| --- | --- | ---: |",
    ]
    for name, seconds in doc["stage_seconds"].items():
        lines.append(f"| {name} | {doc['summaries'].get(name, '')} | {seconds:.1f} |")
    caption, vqa, retrieval = m["caption"], m["vqa"]["eval"], m["retrieval"]["eval"]
    shown = [k for k in CAPTION_METRICS if k in caption["eval"]]
    lines += [
        "",
        "## Captioning (`blip eval caption`, pycocoevalcap, x100)"
        + ("" if "METEOR" in caption["eval"] else ", without Java: not comparable to published numbers"),
        "",
        "| " + " | ".join(CAPTION_METRICS[k] for k in shown) + " | both digits right, in order |",
        "| " + " | ".join("---:" for _ in shown) + " | ---: |",
        "| "
        + " | ".join(f"{caption['eval'][k]:.1f}" for k in shown)
        + f" | {caption['both_digits_in_order']:.1%} |",
        "",
        "## Visual question answering (`blip eval vqa`, the official VQAv2 accuracy, x100)",
        "",
        "| overall | " + " | ".join(vqa.get("per_question_type", {})) + " | exact match |",
        "| ---: | " + " | ".join("---:" for _ in vqa.get("per_question_type", {})) + " | ---: |",
        f"| {vqa['overall']:.1f} | "
        + " | ".join(f"{v:.1f}" for v in vqa.get("per_question_type", {}).values())
        + f" | {vqa['exact_match']:.1f} |",
        "",
        f"## Retrieval (`blip eval retrieval --dedupe-captions`, {m['retrieval']['texts']} captions, recall in %)",
        "",
        "| image-to-text R@1 | R@5 | R@10 | text-to-image R@1 | R@5 | R@10 |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
        "| "
        + " | ".join(
            f"{retrieval[k]:.1f}" for k in ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10")
        )
        + " |",
    ]
    recall = m["dit"]["recall"]
    lines += [
        "",
        f"## CLIP-feature diffusion (`eval-recall --dedupe-captions`, {m['dit']['texts']} captions)",
        "",
        "Image-to-text (i2t) and text-to-image (t2i) recall of three sets of test-pair features against the "
        "target encoder's text embeddings of the distinct captions: the target encoder's own image embedding "
        "(baseline), its ground-truth tokens pooled and projected by the target head (gt-pooled), and the tokens "
        "the DiT generated from the conditioning encoder's tokens (generated).",
        "",
        "| features | i2t R@1 | i2t R@5 | i2t R@10 | t2i R@1 | t2i R@5 | t2i R@10 |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in ("baseline", "gt-pooled", "generated"):
        r = recall[name]
        cells = [f"{r[d][f'R@{k}']:.1%}" for d in ("i2t", "t2i") for k in (1, 5, 10)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if recall.get("cosine"):
        lines += [
            "",
            "Mean cosine similarity: " + ", ".join(f"{k} {v:.3f}" for k, v in recall["cosine"].items()) + ".",
        ]
    dit = m["dit"]
    if dit.get("guidance_sweep"):
        lines += [
            "",
            f"Guidance scale chosen before the test pairs were sampled: `blip sample --cfg-scale ...` on the "
            f"{dit['sweep_images']} validation pairs (digit images no model trained on), `eval-recall --update-run` "
            f"({dit['sample_steps']} Euler steps; the test pairs were then sampled at {dit['cfg_scale']:g}):",
            "",
            "| cfg scale | i2t R@1 | i2t R@5 |",
            "| ---: | ---: | ---: |",
            *(
                f"| {row['cfg_scale']:g} | {row['i2t_r1']:.1%} | {row['i2t_r5']:.1%} |"
                for row in dit["guidance_sweep"]
            ),
        ]
    lines += [
        "",
        "## Figures",
        "",
        f"![training curves]({doc['figures']['curves']})",
        "",
        f"![recall]({doc['figures']['recall']})",
        "",
        f"![test samples]({doc['figures']['samples']})",
        "",
    ]
    return "\n".join(lines)


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)
    return path


def _curves(path: Path, state: dict) -> Path:
    history = state.get("history", {})
    panels = [t for t in ("caption", "vqa", "retrieval") if t in history] + (
        ["dit"] if "dit_history" in state else []
    )
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, name in zip(axes[0], panels):
        if name == "dit":
            records = state["dit_history"]
            metric_key, metric_label, title = "est_r@1", "EstR@1 (held out)", "DiT (flow matching)"
        else:
            records = history[name]
            metric_key, metric_label = TASK_METRIC[name]
            title = f"fine-tuning: {name}"
        train = [(r["step"], r["loss"]) for r in records if r.get("type") == "train" and "loss" in r]
        evals = [r for r in records if r.get("type") == "eval"]
        if train:
            steps, losses = zip(*train)
            ax.plot(steps, losses, color="#9bbbd4", linewidth=0.8, label="train loss")
            ax.plot(steps, _smooth(losses), color="#1f5f8b", linewidth=1.4, label="train loss (smoothed)")
        val = [(r["step"], r["val_loss"]) for r in evals if r.get("val_loss") is not None]
        if val:
            ax.plot(*zip(*val), color="#d1495b", marker="o", markersize=2.5, linewidth=1.2, label="val loss")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(title, fontsize=10)
        metric = [(r["step"], r[metric_key]) for r in evals if r.get(metric_key) is not None]
        if metric:
            twin = ax.twinx()
            twin.plot(
                *zip(*metric), color="#2e8b57", marker="s", markersize=2.5, linewidth=1.2, label=metric_label
            )
            twin.set_ylim(0, 1.02)
            twin.set_ylabel(metric_label, color="#2e8b57", fontsize=8)
        ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    return _save(fig, path)


def _smooth(values, weight: float = 0.9) -> list[float]:
    out, current = [], None
    for v in values:
        current = v if current is None else weight * current + (1 - weight) * v
        out.append(current)
    return out


def _recall_bars(path: Path, recall: dict) -> Path:
    names = ["baseline", "gt-pooled", "generated"]
    colors = {"baseline": "#1f5f8b", "gt-pooled": "#9bbbd4", "generated": "#d1495b"}
    groups = [("i2t", "R@1"), ("i2t", "R@5"), ("t2i", "R@1"), ("t2i", "R@5")]
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    width = 0.26
    for i, name in enumerate(names):
        values = [recall[name][d][k] for d, k in groups]
        bars = ax.bar(
            [g + (i - 1) * width for g in range(len(groups))], values, width, label=name, color=colors[name]
        )
        for bar, value in zip(bars, values):
            ax.text(bar.get_x() + bar.get_width() / 2, value + 0.01, f"{value:.0%}", ha="center", fontsize=7)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{d} {k}" for d, k in groups])
    ax.set_ylim(0, 1.12)
    ax.set_ylabel("recall (test pairs, distinct captions)")
    ax.set_title("Generated CLIP-space features vs the target encoder's own", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return _save(fig, path)


def _sample_grid(path: Path, state: dict) -> Path:
    data = state["data"]
    pairs = data.pairs["test"][:GRID]
    columns = 4
    rows = (len(pairs) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 3.0, rows * 3.1), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    kinds = list(QUESTIONS)
    for i, pair in enumerate(pairs):
        ax = axes.flat[i]
        ax.imshow(Image.open(data.root / pair.file), cmap="gray", interpolation="nearest")
        caption = state.get("captions", [""] * GRID)[i]
        answers = state.get("answers", [[""] * len(kinds)] * GRID)[i]
        retrieved = state.get("retrieved", [""] * GRID)[i]
        lines = [(f"caption: {caption}", digits_in(caption)[:2] == [pair.left, pair.right])]
        for kind, given in zip(kinds, answers):
            lines.append((f"{kind}: {given}", given == answer(kind, pair.left, pair.right)))
        lines.append((f"top text: {retrieved}", retrieved == canonical_caption(pair.left, pair.right)))
        ax.set_title(f"truth: {pair.left} {pair.right}", fontsize=8)
        for row, (text, ok) in enumerate(lines):
            ax.text(
                0.5,
                -0.1 - 0.1 * row,
                text,
                transform=ax.transAxes,
                ha="center",
                fontsize=6,
                color="#2e8b57" if ok else "#d1495b",
            )
    fig.suptitle("Test pairs: what each fine-tuned model said (green right, red wrong)", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def load_report(out: str | Path) -> dict:
    return json.loads((Path(out) / "report.json").read_text(encoding="utf-8"))
