"""Learning is real: on small from-scratch checkpoints and the 8 bundled photos, every task's loss
falls far below its start, and the fine-tuned directory, given as --model to `blip caption`, `blip
vqa` and `blip retrieval`, reproduces the training pairs. BLIP-2 runs keep their frozen parts
bit-identical to the source checkpoint.

High learning rates and small models keep each run to a few seconds. The tiny BLIP-2 language
models are random, so the reproduction runs train them (`--freeze vision`); the BLIP-2 default
(vision and language model frozen, Q-Former trained) is exercised on a language model that was
trained first, with a freshly initialised Q-Former, as in the BLIP-2 recipe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from .helpers import CAPTIONS, SAMPLES, VQA


def finetune(cli, manifest, task, model, out, *extra):
    result = cli(
        "finetune",
        manifest,
        "--task",
        task,
        "--model",
        model,
        "--output-dir",
        out,
        "--weight-decay",
        "0",
        # One checkpoint and one validation at the end, not one per epoch: what is proved is learning.
        "--save-every",
        "100000",
        "--format",
        "json",
        *extra,
    )
    assert result.code == 0, result.stderr
    summary = json.loads(result.stdout)
    history = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in history if r["type"] == "train"]
    return summary, losses


def assert_learned(losses, factor=0.25):
    first = sum(losses[:2]) / 2
    last = sum(losses[-3:]) / 3
    assert last < factor * first, f"loss {first:.3f} -> {last:.3f}"


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def assert_frozen(source: Path, tuned: Path, prefixes: tuple[str, ...], changed: tuple[str, ...]):
    before, after = tensors(source), tensors(tuned)
    frozen = [k for k in before if k.startswith(prefixes)]
    assert frozen
    for key in frozen:
        assert torch.equal(before[key], after[key]), f"{key} changed"
    for prefix in changed:
        keys = [k for k in before if k.startswith(prefix)]
        assert any(not torch.equal(before[k], after[k]) for k in keys), f"{prefix} did not train"


def captions_of(cli, model, *extra):
    result = cli(
        "caption", "--manifest", SAMPLES / "captions.tsv", "--model", model, "--format", "jsonl", *extra
    )
    assert result.code == 0, result.stderr
    return [json.loads(line)["caption"] for line in result.stdout.splitlines()]


def answers_of(cli, model):
    result = cli("vqa", "--manifest", SAMPLES / "vqa.tsv", "--model", model, "--format", "jsonl")
    assert result.code == 0, result.stderr
    return [json.loads(line)["answer"] for line in result.stdout.splitlines()]


def assert_retrieves_own_text(cli, model, tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(r[1] for r in CAPTIONS) + "\n")
    images = [SAMPLES / r[0] for r in CAPTIONS]
    result = cli("retrieval", *images, "--texts-file", texts, "--model", model, "--format", "jsonl")
    assert result.code == 0, result.stderr
    best = [json.loads(line)["results"][0]["text"] for line in result.stdout.splitlines()]
    assert best == [r[1] for r in CAPTIONS]


@pytest.mark.parametrize("prompt", [None, "a photo of"])
def test_blip_caption(cli, checkpoint, tmp_path, prompt):
    source = checkpoint("blip-caption")
    out = tmp_path / "run"
    extra = ["--prompt", prompt] if prompt else []
    summary, losses = finetune(
        cli,
        SAMPLES / "captions.tsv",
        "caption",
        source,
        out,
        "--epochs",
        "40",
        "--batch-size",
        "4",
        "--lr",
        "1e-2",
        "--val-manifest",
        SAMPLES / "captions.tsv",
        *extra,
    )
    assert_learned(losses)
    assert summary["val_metrics"]["val_accuracy"] == 1.0
    # The same --prompt at inference: the model continues it with the training caption.
    assert captions_of(cli, out, *extra) == [r[1] for r in CAPTIONS]
    assert captions_of(cli, out / "best", *extra) == [r[1] for r in CAPTIONS]


def test_blip_vqa(cli, checkpoint, tmp_path):
    out = tmp_path / "run"
    _, losses = finetune(
        cli,
        SAMPLES / "vqa.tsv",
        "vqa",
        checkpoint("blip-vqa", initializer_range=0.1),
        out,
        "--epochs",
        "60",
        "--batch-size",
        "4",
        "--lr",
        "3e-3",
    )
    assert_learned(losses)
    assert answers_of(cli, out) == [r[2] for r in VQA]


def test_blip_itm_retrieval(cli, checkpoint, tmp_path):
    out = tmp_path / "run"
    source = checkpoint("blip-itm", initializer_range=0.1)
    _, losses = finetune(
        cli,
        SAMPLES / "captions.tsv",
        "retrieval",
        source,
        out,
        "--epochs",
        "100",
        "--batch-size",
        "8",
        "--lr",
        "3e-3",
    )
    assert_learned(losses)
    assert_retrieves_own_text(cli, out, tmp_path)
    assert validation_recall(out) == 1.0  # the validation metric agrees with `blip retrieval`


def validation_recall(path) -> float:
    from blip_toolkit.data.images import open_image
    from blip_toolkit.models.loading import load_model
    from blip_toolkit.training.data import make_examples
    from blip_toolkit.training.validation import recall_at_1

    loaded = load_model(str(path), "retrieval")
    rows = [{"image": str(SAMPLES / r[0]), "text": r[1], "line": i} for i, r in enumerate(CAPTIONS)]
    examples = make_examples(rows, "retrieval", loaded.family, prompt=None, template="{}")
    return recall_at_1(
        loaded.model,
        loaded.processor,
        loaded.family,
        examples,
        lambda e: open_image(e.image),
        batch_size=3,
        device=loaded.device,
        rerank=4,
    )


@pytest.fixture(scope="module")
def blip2_opt_caption(checkpoint, tmp_path_factory):
    """BLIP-2 OPT trained on the captions with only the vision encoder frozen (the tiny OPT is random)."""
    from blip_toolkit.training.config import FinetuneConfig
    from blip_toolkit.training.finetune import run_finetune

    source = checkpoint("blip2-opt", initializer_range=0.1)
    out = tmp_path_factory.mktemp("blip2-opt") / "run"
    torch.set_num_threads(1)
    result = run_finetune(
        FinetuneConfig(
            manifest=str(SAMPLES / "captions.tsv"),
            task="caption",
            model=str(source),
            output_dir=str(out),
            epochs=60,
            batch_size=4,
            learning_rate=1e-2,
            weight_decay=0.0,
            freeze=["vision"],
            save_every=100000,
        )
    )
    return source, out, result


def test_blip2_opt_caption(cli, blip2_opt_caption):
    source, out, result = blip2_opt_caption
    assert_learned([r["loss"] for r in result.history if r["type"] == "train"])
    assert result.frozen_parts == ["vision"]
    assert_frozen(
        source, out, ("vision_model.",), changed=("qformer.", "language_model.", "language_projection.")
    )
    # The eos appended in training makes greedy decoding stop after the caption.
    assert captions_of(cli, out) == [r[1] for r in CAPTIONS]


def test_blip2_default_freeze_trains_only_the_qformer(cli, blip2_opt_caption, tmp_path):
    """The BLIP-2 recipe: vision encoder and language model frozen; a new Q-Former learns to prompt
    the (already trained) language model with the image."""
    import transformers

    _, trained, _ = blip2_opt_caption
    source = tmp_path / "fresh-qformer"
    model = transformers.Blip2ForConditionalGeneration.from_pretrained(trained)
    torch.manual_seed(1)
    for module in (model.qformer, model.language_projection):
        for param in module.parameters():
            if param.ndim >= 2:
                torch.nn.init.normal_(param, std=0.02)
    torch.nn.init.normal_(model.query_tokens, std=0.02)
    model.save_pretrained(source)
    transformers.AutoProcessor.from_pretrained(trained, backend="pil").save_pretrained(source)

    out = tmp_path / "run"
    summary, losses = finetune(
        cli,
        SAMPLES / "captions.tsv",
        "caption",
        source,
        out,
        "--epochs",
        "40",
        "--batch-size",
        "4",
        "--lr",
        "1e-2",
    )
    assert summary["frozen_parts"] == ["vision", "language-model"]
    assert_learned(losses, factor=0.5)
    assert_frozen(
        source,
        out,
        ("vision_model.", "language_model."),
        changed=("qformer.", "query_tokens", "language_projection."),
    )


def test_blip2_t5_vqa(cli, checkpoint, tmp_path):
    import transformers

    # T5's dropout (0.1 everywhere) is too much noise for a 32-wide model to memorise 8 answers
    # in a few steps; the tiny source has it off.
    source = tmp_path / "source"
    model = transformers.Blip2ForConditionalGeneration.from_pretrained(checkpoint("blip2-t5"))
    model.config.text_config.dropout_rate = 0.0
    model.save_pretrained(source)
    transformers.AutoProcessor.from_pretrained(checkpoint("blip2-t5"), backend="pil").save_pretrained(source)
    out = tmp_path / "run"
    _, losses = finetune(
        cli,
        SAMPLES / "vqa.tsv",
        "vqa",
        source,
        out,
        "--epochs",
        "50",
        "--batch-size",
        "4",
        "--lr",
        "3e-3",
        "--freeze",
        "vision",
    )
    assert_learned(losses)
    assert_frozen(source, out, ("vision_model.",), changed=("qformer.", "language_model."))
    assert answers_of(cli, out) == [r[2] for r in VQA]


def test_blip2_itm_retrieval(cli, checkpoint, tmp_path):
    source = checkpoint("blip2-itm", initializer_range=0.1)
    out = tmp_path / "run"
    summary, losses = finetune(
        cli,
        SAMPLES / "captions.tsv",
        "retrieval",
        source,
        out,
        "--epochs",
        "100",
        "--batch-size",
        "8",
        "--lr",
        "5e-3",
        "--warmup-steps",
        "10",
    )
    assert summary["frozen_parts"] == ["vision"]
    assert_learned(losses, factor=0.4)
    assert_frozen(source, out, ("vision_model.",), changed=("qformer.", "query_tokens", "itm_head."))
    assert_retrieves_own_text(cli, out, tmp_path)
    assert validation_recall(out) == 1.0


def test_bf16_runs_on_cpu(cli, checkpoint, tmp_path):
    summary, losses = finetune(
        cli,
        SAMPLES / "captions.tsv",
        "caption",
        checkpoint("blip-caption"),
        tmp_path / "run",
        "--max-steps",
        "2",
        "--batch-size",
        "4",
        "--mixed-precision",
        "bf16",
    )
    assert len(losses) == 2 and all(0 < loss < 20 for loss in losses)
    assert captions_of(cli, tmp_path / "run")  # float32 weights, loadable as usual


def test_dataloader_workers_do_not_change_the_weights(checkpoint, tmp_path):
    from blip_toolkit.training.config import FinetuneConfig
    from blip_toolkit.training.finetune import run_finetune

    runs = []
    for workers in (0, 2):
        out = tmp_path / f"workers{workers}"
        run_finetune(
            FinetuneConfig(
                manifest=str(SAMPLES / "vqa.tsv"),
                task="vqa",
                model=str(checkpoint("blip-vqa")),
                output_dir=str(out),
                max_steps=3,
                batch_size=3,
                num_workers=workers,
                learning_rate=1e-3,
            )
        )
        runs.append(tensors(out))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
