"""bfloat16 on CPU: `--dtype bfloat16` loads and runs every task, and gives what float32 gives where the
model is decided (trained tiny models: the same captions and answers; retrieval and embeddings within
bfloat16's precision); `--mixed-precision bf16` fine-tuning (Accelerate's CPU autocast) learns as
float32 does; `--dtype auto` chooses by the CPU's flags, and BLIP_CPU_AUTO_DTYPE overrides it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from blip_toolkit.data.images import InputItem
from blip_toolkit.errors import UsageError
from blip_toolkit.jobs.predict import answer_questions, caption_images, rank_texts
from blip_toolkit.models.device import (
    BF16_MIN_WIDTH,
    CPU_AUTO_DTYPE_ENV,
    auto_cpu_dtype,
    model_width,
    resolve_dtype,
)
from blip_toolkit.models.loading import load_model, open_runner
from blip_toolkit.predictors.options import CaptionOptions, GenerationOptions, RetrievalOptions, VqaOptions

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "data" / "samples"


def rows(name: str) -> list[list[str]]:
    lines = (SAMPLES / name).read_text(encoding="utf-8").splitlines()
    return [line.split("\t") for line in lines if line.strip() and not line.startswith("#")]


CAPTIONS, VQA = rows("captions.tsv"), rows("vqa.tsv")
CORPUS = [r[1] for r in CAPTIONS] + [r[1] for r in VQA] + [r[2] for r in VQA]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Tiny caption and VQA models fine-tuned on the sample manifests until they reproduce them
    (float32 training), and the caption model fine-tuned the same way with bf16 autocast."""
    from blip_toolkit.training.config import FinetuneConfig
    from blip_toolkit.training.finetune import run_finetune
    from tests.builders import ModelSize, build_checkpoint

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is fastest (and steady on a shared machine)
    root = tmp_path_factory.mktemp("bf16")
    caption_init = build_checkpoint("blip-caption", root / "caption-init", size=ModelSize(), corpus=CORPUS)
    vqa_init = build_checkpoint(
        "blip-vqa", root / "vqa-init", size=ModelSize(initializer_range=0.1), corpus=CORPUS
    )
    out = {}
    recipes = {
        "caption": (
            "captions.tsv",
            "caption",
            caption_init,
            dict(epochs=40, batch_size=4, learning_rate=1e-2),
        ),
        "caption-bf16": (
            "captions.tsv",
            "caption",
            caption_init,
            dict(epochs=40, batch_size=4, learning_rate=1e-2, mixed_precision="bf16"),
        ),
        "vqa": ("vqa.tsv", "vqa", vqa_init, dict(epochs=60, batch_size=4, learning_rate=3e-3)),
    }
    for name, (manifest, task, init, settings) in recipes.items():
        out[name] = root / name
        run_finetune(
            FinetuneConfig(
                manifest=str(SAMPLES / manifest),
                task=task,
                model=str(init),
                output_dir=str(out[name]),
                weight_decay=0.0,
                save_every=100_000,
                log_every=100_000,
                cpu=True,
                **settings,
            )
        )
    torch.set_num_threads(threads)
    return out


def _captions(model, dtype: str) -> list[str]:
    runner = open_runner(str(model), "caption", device="cpu", dtype=dtype)
    items = [InputItem(str(SAMPLES / r[0])) for r in CAPTIONS]
    options = CaptionOptions(generation=GenerationOptions(max_new_tokens=12))
    return [r["caption"] for r in caption_images(runner, items, options)]


def test_bf16_loads_in_bf16(tiny_models):
    loaded = load_model(str(tiny_models["blip-caption"]), "caption", dtype=torch.bfloat16)
    assert loaded.dtype == torch.bfloat16
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    runner = open_runner(str(tiny_models["blip-caption"]), "caption", device="cpu", dtype="bfloat16")
    assert runner.dtype == torch.bfloat16 and runner.loaded.dtype == torch.bfloat16


def test_bf16_captions_of_a_trained_model_equal_float32(trained):
    expected = [r[1] for r in CAPTIONS]
    assert _captions(trained["caption"], "float32") == expected  # the model is decided
    assert _captions(trained["caption"], "bfloat16") == expected


def test_bf16_answers_of_a_trained_model_equal_float32(trained):
    answers = {}
    for dtype in ("float32", "bfloat16"):
        runner = open_runner(str(trained["vqa"]), "vqa", device="cpu", dtype=dtype)
        items = [InputItem(str(SAMPLES / r[0])) for r in VQA]
        options = VqaOptions(generation=GenerationOptions(max_new_tokens=8))
        answers[dtype] = [r["answer"] for r in answer_questions(runner, items, [r[1] for r in VQA], options)]
    assert answers["float32"] == [r[2] for r in VQA]
    assert answers["bfloat16"] == answers["float32"]


def test_bf16_training_learns_as_float32_does(trained):
    """Accelerate's bf16 on CPU autocasts the matmuls; the model still learns every caption (and is
    saved in float32, loadable as usual)."""
    assert _captions(trained["caption-bf16"], "float32") == [r[1] for r in CAPTIONS]
    from safetensors import safe_open

    with safe_open(str(trained["caption-bf16"] / "model.safetensors"), "pt") as weights:
        assert {weights.get_slice(k).get_dtype() for k in weights.keys()} == {"F32"}


@pytest.mark.parametrize("kind", ["blip-itm", "blip2-itm"])
def test_bf16_retrieval_scores_within_bf16_precision(tiny_models, sample_images, kind):
    texts = ["a photo of a cat", "a dog", "two cats laying on a couch", "a red car parked next to a tree"]
    items = [InputItem(str(p)) for p in sample_images[:4]]
    scores = {}
    for dtype in ("float32", "bfloat16"):
        runner = open_runner(str(tiny_models[kind]), "retrieval", device="cpu", dtype=dtype)
        records = list(rank_texts(runner, items, texts, RetrievalOptions()))
        scores[dtype] = torch.tensor(
            [[next(r["score"] for r in rec["results"] if r["text"] == t) for t in texts] for rec in records]
        )
    error = (scores["bfloat16"] - scores["float32"]).abs().max()
    # bf16 keeps 8 bits of mantissa: a few roundings through a tiny model stay within a few percent
    assert error <= 0.05 * scores["float32"].abs().max() + 0.02, error
    assert error > 0  # it did run in bfloat16


def test_bf16_extract_embeddings_within_bf16_precision(tiny_models, tmp_path, sample_images):
    from blip_toolkit.embeddings.shard_reader import EmbeddingShards
    from blip_toolkit.jobs.extract import extract_embeddings
    from blip_toolkit.jobs.extract_config import ExtractConfig

    folder = tmp_path / "photos"
    folder.mkdir()
    for image in sample_images[:4]:
        (folder / image.name).write_bytes(image.read_bytes())
        (folder / image.name).with_suffix(".txt").write_text("a photo of a cat\n")
    shards = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / dtype
        extract_embeddings(
            ExtractConfig(
                source=[str(folder)],
                out=str(out),
                cond_encoder=str(tiny_models["blip2-opt"]),
                target_encoder=str(tiny_models["clip"]),
                dtype="float32",
                encoder_dtype=dtype,
                num_workers=0,
                device="cpu",
            )
        )
        shards[dtype] = EmbeddingShards(out)
        assert shards[dtype].encoders["cond"]["encoder_dtype"] == dtype
    for name in ("cond", "target", "target_global"):
        a, b = shards["float32"][0][name].float(), shards["bfloat16"][0][name].float()
        assert (b - a).norm() <= 0.05 * a.norm(), name


def test_auto_dtype_follows_the_cpu_flags_and_the_override(monkeypatch):
    monkeypatch.delenv(CPU_AUTO_DTYPE_ENV, raising=False)
    assert auto_cpu_dtype(frozenset({"avx2", "avx512f"})) == torch.float32
    amx = frozenset({"avx2", "avx512f", "amx_bf16", "amx_tile"})
    assert auto_cpu_dtype(amx) == torch.bfloat16
    # narrow models stay float32 even there (bench/bench_bf16.py measures where bf16 starts to pay)
    assert auto_cpu_dtype(amx, width=BF16_MIN_WIDTH - 1) == torch.float32
    assert auto_cpu_dtype(amx, width=BF16_MIN_WIDTH) == torch.bfloat16
    assert model_width({"text_config": {"hidden_size": 768}, "vision_config": {"hidden_size": 1408}}) == 1408
    assert model_width({"model_type": "x"}) is None
    assert resolve_dtype("auto", torch.device("cpu")) == auto_cpu_dtype()
    monkeypatch.setenv(CPU_AUTO_DTYPE_ENV, "bfloat16")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.bfloat16
    assert resolve_dtype("float32", torch.device("cpu")) == torch.float32  # explicit wins
    monkeypatch.setenv(CPU_AUTO_DTYPE_ENV, "float16")
    with pytest.raises(UsageError, match=CPU_AUTO_DTYPE_ENV):
        resolve_dtype("auto", torch.device("cpu"))
