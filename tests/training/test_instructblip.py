"""InstructBLIP fine-tuning: the Q-Former reads the instruction (and only it), the labels cover the
target and its eos, the loss is the one transformers' model computes for the same inputs, and a
caption run learns the pairs so that `blip caption` (default instruction) reproduces them."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from blip_toolkit.data.images import open_image
from blip_toolkit.models.loading import DEFAULT_INSTRUCTION, load_model
from blip_toolkit.training.config import FinetuneConfig
from blip_toolkit.training.data import Collator, make_examples
from blip_toolkit.training.finetune import run_finetune
from blip_toolkit.training.modules import build_module

from .helpers import CAPTIONS, SAMPLES, VQA

KINDS = ["instructblip-t5", "instructblip-vicuna"]


def batch_for(loaded, task, rows):
    examples = make_examples(rows, task, loaded.family, prompt=None, template="Question: {} Answer:")
    collate = Collator(task, loaded.family, loaded.processor, max_length=40)
    items = [{"example": e, "image": open_image(e.image), "error": None} for e in examples]
    return examples, collate(items)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("task", ["caption", "vqa"])
def test_qformer_reads_the_instruction_and_the_loss_is_the_models_own(checkpoint, kind, task):
    loaded = load_model(str(checkpoint(kind)), None)
    source = CAPTIONS[:3] if task == "caption" else VQA[:3]
    rows = [
        {
            "image": str(SAMPLES / r[0]),
            "line": i,
            **({"caption": r[1]} if task == "caption" else {"question": r[1], "answer": r[2]}),
        }
        for i, r in enumerate(source)
    ]
    examples, batch = batch_for(loaded, task, rows)
    prefixes = [e.prefix for e in examples]
    if task == "caption":
        assert prefixes == [DEFAULT_INSTRUCTION] * 3  # no --prompt: the default instruction
    else:
        assert prefixes == [f"Question: {r[1]} Answer:" for r in source]
    qformer = loaded.processor.qformer_tokenizer(prefixes, padding="longest", return_tensors="pt")
    assert torch.equal(batch["qformer_input_ids"], qformer["input_ids"])

    # What is predicted is the target and its eos, nothing of the instruction or the image tokens.
    tokenizer = loaded.processor.tokenizer
    targets = [r[1] if task == "caption" else r[2] for r in source]
    for row, target in zip(batch["labels"], targets):
        ids = row[row != -100].tolist()
        assert ids[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(ids, skip_special_tokens=True).strip() == target

    module = build_module(
        task, loaded.model, loaded.family, frozen_parts=[], label_smoothing=0.0, temperature=0.07
    ).eval()
    with torch.no_grad():
        out = module({k: v for k, v in batch.items() if isinstance(v, torch.Tensor)})
        reference = loaded.model(
            pixel_values=batch["pixel_values"],
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            qformer_input_ids=batch["qformer_input_ids"],
            qformer_attention_mask=batch["qformer_attention_mask"],
            labels=batch["labels"],
        ).loss
    ours = out["example_loss"].sum() / out["example_count"].sum()
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


def test_instructblip_caption_learns_the_pairs(cli, checkpoint, tmp_path):
    # Vicuna's tiny LLaMA is random, so the language model trains too (only the vision tower frozen).
    source = checkpoint("instructblip-vicuna", initializer_range=0.1)
    out = tmp_path / "run"
    result = run_finetune(
        FinetuneConfig(
            manifest=str(SAMPLES / "captions.tsv"),
            task="caption",
            model=str(source),
            output_dir=str(out),
            val_manifest=str(SAMPLES / "captions.tsv"),
            save_every=1000,  # validate once, at the end
            epochs=60,
            batch_size=8,
            learning_rate=1e-2,
            weight_decay=0.0,
            freeze=["vision"],
        )
    )
    assert result.family == "instructblip-vicuna" and result.val_metrics["val_accuracy"] == 1.0
    captions = cli("caption", "--manifest", SAMPLES / "captions.tsv", "--model", out, "--format", "jsonl")
    assert captions.code == 0, captions.stderr
    assert [json.loads(line)["caption"] for line in captions.stdout.splitlines()] == [r[1] for r in CAPTIONS]
    # The frozen vision tower, bit for bit.
    before = transformers.InstructBlipForConditionalGeneration.from_pretrained(
        source
    ).vision_model.state_dict()
    after = transformers.InstructBlipForConditionalGeneration.from_pretrained(out).vision_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
