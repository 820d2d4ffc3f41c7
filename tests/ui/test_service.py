"""The service without the web layer: which checkpoint serves which task, loading once, and load
failures as one-line errors."""

from __future__ import annotations

import threading

import pytest

from blip_toolkit.errors import ModelLoadError, TaskNotSupportedError
from blip_toolkit.models.spec import DEFAULT_MODELS, LoadSpec
from blip_toolkit.ui.service import InferenceService, ServiceConfig


@pytest.fixture
def service_for():
    made = []

    def make(model=None, **kwargs):
        service = InferenceService(ServiceConfig(LoadSpec(model=model, device="cpu"), **kwargs))
        made.append(service)
        return service

    yield make
    for service in made:
        service.close()


def test_a_blip2_model_serves_every_task_from_one_load(service_for, tiny_models, sample_images):
    model = str(tiny_models["blip2-opt"])
    service = service_for(model=model)
    assert [service.models.source(t) for t in ("caption", "vqa", "retrieval")] == [model] * 3
    holders = set()
    threads = [
        threading.Thread(target=lambda t=t: holders.add(service.models.holder(t)))
        for t in ("caption", "vqa") * 3
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(holders) == 1  # one checkpoint, loaded once, shared by the tasks
    assert service.caption(str(sample_images[0]), max_new_tokens=5)
    ranked = service.rank(str(sample_images[0]), ["a cat", "a dog"])
    assert [r["rank"] for r in ranked] == [1, 2]
    assert sum(r["probability"] for r in ranked) == pytest.approx(1.0)


def test_a_task_the_model_cannot_do_falls_back_to_its_default(service_for, tiny_models):
    service = service_for(model=str(tiny_models["blip-caption"]))
    assert service.models.source("vqa") == DEFAULT_MODELS["vqa"]
    assert service.models.source("retrieval") == DEFAULT_MODELS["retrieval"]
    explicit = service_for(
        model=str(tiny_models["blip-caption"]), retrieval_model=str(tiny_models["blip-vqa"])
    )
    with pytest.raises(TaskNotSupportedError, match="cannot do retrieval"):
        explicit.rank("unused.jpg", ["a cat"])


def test_a_model_that_cannot_load_is_a_one_line_error_for_each_request(service_for, tmp_path, sample_images):
    service = service_for(model=str(tmp_path / "missing"))
    for _ in range(2):  # not cached as loaded: each request says why
        with pytest.raises(ModelLoadError, match="missing: no such directory"):
            service.caption(str(sample_images[0]))
