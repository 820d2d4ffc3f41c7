"""Model loading: family detection, task checks, offline failures, devices, and the CUDA-fault
fallback (the fault is injected, since there is no GPU here)."""

from __future__ import annotations

import json
import logging
import time

import pytest
import torch

from blip_toolkit.data.images import InputItem
from blip_toolkit.errors import ModelLoadError, TaskNotSupportedError, UsageError
from blip_toolkit.jobs.predict import caption_images
from blip_toolkit.models import loading
from blip_toolkit.models.device import FallbackRunner, is_cuda_fault, resolve_device, resolve_dtype
from blip_toolkit.models.loading import inspect_source, load_model, open_runner
from blip_toolkit.predictors.options import CaptionOptions, GenerationOptions

EXPECTED = {
    "blip-caption": ("blip-caption", ("caption",)),
    "blip-vqa": ("blip-vqa", ("vqa",)),
    "blip-itm": ("blip-itm", ("retrieval",)),
    "blip2-opt": ("blip2-opt", ("caption", "vqa", "retrieval")),
    "blip2-t5": ("blip2-t5", ("caption", "vqa", "retrieval")),
    "blip2-itm": ("blip2-itm", ("retrieval",)),
    "clip": ("clip", ()),
}


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_family_is_detected_from_the_checkpoint_config(tiny_models, kind):
    _, family = inspect_source(str(tiny_models[kind]))
    assert (family.name, family.tasks) == EXPECTED[kind]


def test_wrong_task_names_what_the_checkpoint_can_do(tiny_models):
    with pytest.raises(
        TaskNotSupportedError, match=r"BLIP VQA checkpoint and cannot do caption; it can do: vqa"
    ):
        load_model(str(tiny_models["blip-vqa"]), "caption")
    with pytest.raises(TaskNotSupportedError, match="encoder"):
        open_runner(str(tiny_models["clip"]), "retrieval")


def test_unknown_architecture_and_bad_directories(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    with pytest.raises(ModelLoadError, match="unsupported checkpoint.*bert"):
        inspect_source(str(tmp_path))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        inspect_source(str(empty))
    with pytest.raises(ModelLoadError, match="no such directory"):
        inspect_source(str(tmp_path / "nope" / "model"))
    with pytest.raises(ModelLoadError, match="is a file"):
        inspect_source(str(tmp_path / "config.json"))


@pytest.mark.parametrize("offline", ["1", ""])
def test_uncached_hub_id_fails_fast_offline(monkeypatch, offline):
    """No network here (nor in CI): the error must come well within 10 s, not after the hub
    client's ~25 s of retries, and say how to pass a local directory."""
    monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    monkeypatch.setenv("HF_HOME", "/nonexistent-hf-home")
    start = time.monotonic()
    with pytest.raises(ModelLoadError) as info:
        inspect_source("Salesforce/blip-image-captioning-base")
    assert time.monotonic() - start < 10
    message = str(info.value)
    assert "Salesforce/blip-image-captioning-base" in message and "--model DIR" in message


def test_hub_unreachable_is_reported_without_network(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "")
    monkeypatch.setenv("HF_HOME", "/nonexistent-hf-home")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: connection refused
    with pytest.raises(ModelLoadError, match="cannot reach the Hugging Face Hub"):
        inspect_source("org/model")


def test_device_and_dtype_resolution():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(UsageError):
        resolve_dtype("float64", torch.device("cpu"))
    with pytest.raises(UsageError):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="CUDA is not available"):
            resolve_device("cuda:0")


def test_cuda_fault_classification():
    assert is_cuda_fault(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_cuda_fault(RuntimeError("CUDA error: device-side assert triggered"))
    assert is_cuda_fault(RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED when calling cublasSgemm"))
    assert not is_cuda_fault(RuntimeError("shape mismatch"))
    assert not is_cuda_fault(ValueError("CUDA"))


@pytest.mark.parametrize(
    "fault",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB"),
        RuntimeError("CUDA error: device-side assert triggered\nCompile with TORCH_USE_CUDA_DSA"),
    ],
)
def test_cuda_fault_reloads_on_cpu_and_retries_the_batch(tiny_models, sample_images, caplog, fault):
    source = str(tiny_models["blip-caption"])
    items = [InputItem(str(p)) for p in sample_images[:5]]
    options = CaptionOptions(batch_size=2, generation=GenerationOptions(max_new_tokens=5))
    clean = [
        r["caption"] for r in caption_images(open_runner(source, "caption", device="cpu"), items, options)
    ]

    loads = []

    def load(device, dtype):
        loaded = load_model(source, "caption", device=device, dtype=dtype)
        loads.append(loaded)
        if len(loads) == 1:  # the "GPU" model fails on its second batch
            calls = {"n": 0}
            real_generate = loaded.model.generate

            def faulty_generate(*args, **kwargs):
                calls["n"] += 1
                if calls["n"] == 2:
                    raise fault
                return real_generate(*args, **kwargs)

            loaded.model.generate = faulty_generate
        return loaded

    runner = FallbackRunner(load, torch.device("cpu"), torch.float32)
    with caplog.at_level(logging.WARNING, logger="blip"):
        got = [r["caption"] for r in caption_images(runner, items, options)]
    assert got == clean
    assert len(loads) == 2 and runner.fell_back and runner.device.type == "cpu"
    warnings = [r for r in caplog.records if "reloading the model on CPU" in r.getMessage()]
    assert len(warnings) == 1


def test_non_cuda_errors_are_not_swallowed(tiny_models):
    runner = open_runner(str(tiny_models["blip-caption"]), "caption", device="cpu")
    with pytest.raises(ValueError, match="boom"):
        runner.run(lambda model: (_ for _ in ()).throw(ValueError("boom")))
    assert not runner.fell_back


def test_a_second_cuda_fault_after_falling_back_is_raised(tiny_models):
    runner = open_runner(str(tiny_models["blip-caption"]), "caption", device="cpu")

    def always_fails(model):
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(torch.OutOfMemoryError):
        runner.run(always_fails)
    assert runner.fell_back


def test_loaded_model_is_float32_in_eval_mode(tiny_models):
    loaded = loading.load_model(str(tiny_models["blip2-opt"]), "caption")
    assert loaded.dtype == torch.float32 and not loaded.model.training
    assert next(loaded.model.parameters()).dtype == torch.float32
