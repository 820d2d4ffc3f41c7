"""The checkpoint format of CheckpointManager: every piece of training state (a model with tied
weights and a frozen part, an extra module, AdamW with fused or amsgrad groups, LambdaLR, python /
numpy / torch RNGs, a generator, Accelerate's micro-batch counter) comes back exactly in fresh
objects, from safetensors and JSON only; what the format cannot hold is refused with a clear error."""

from __future__ import annotations

import copy
import json
import random
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from blip_toolkit.engine import checkpoint as engine_checkpoint
from blip_toolkit.engine import state
from blip_toolkit.engine.checkpoint import COMPLETE_MARKER, CheckpointManager
from blip_toolkit.engine.optim import warmup_cosine_schedule
from blip_toolkit.errors import TrainingError

PACKAGE = Path(engine_checkpoint.__file__).resolve().parents[1]


def tiny_blip(seed: int):
    """A BLIP captioning model small enough to build in a fraction of a second. Its decoder's output
    layer is tied to its word embeddings; the vision tower is frozen (as BLIP-2 runs freeze parts)."""
    from transformers import BlipConfig, BlipForConditionalGeneration

    layers = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    text = dict(
        layers,
        vocab_size=40,
        max_position_embeddings=16,
        encoder_hidden_size=16,
        pad_token_id=0,
        bos_token_id=1,
        sep_token_id=2,
    )
    vision = dict(layers, image_size=16, patch_size=8)
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(
        BlipConfig(text_config=text, vision_config=vision, projection_dim=8, image_text_hidden_size=8)
    )
    model.vision_model.requires_grad_(False)
    return model


def tied(model) -> bool:
    decoder = model.text_decoder
    return decoder.cls.predictions.decoder.weight is decoder.bert.embeddings.word_embeddings.weight


def make_optimizer(model, fused: bool):
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if p.ndim >= 2], "weight_decay": 0.05},
        {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0, "lr": 2e-3},
    ]
    options = {"fused": True} if fused else {"amsgrad": True, "foreach": False, "maximize": True}
    return torch.optim.AdamW(groups, lr=1e-3, betas=(0.8, 0.95), eps=1e-7, **options)


def train_step(accelerator, model, optimizer, scheduler) -> None:
    with accelerator.accumulate(model):
        loss = sum((p * torch.randn_like(p)).sum() for p in model.parameters() if p.requires_grad)
        accelerator.backward(loss)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()


def draws(generator) -> list:
    """Something from every RNG the checkpoint holds, including numpy's and python's cached gaussians."""
    return [
        random.random(),
        random.gauss(0, 1),
        np.random.standard_normal(),
        float(np.random.rand()),
        torch.rand(3).tolist(),
        torch.rand(3, generator=generator).tolist(),
    ]


def assert_same(got, expected, where: str = "state") -> None:
    """Equal values of the same types: tensors of the same dtype and shape, tuples still tuples."""
    assert type(got) is type(expected), f"{where}: {type(got).__name__} != {type(expected).__name__}"
    if isinstance(expected, torch.Tensor):
        assert got.dtype == expected.dtype and got.shape == expected.shape, where
        assert torch.equal(got, expected), where
    elif isinstance(expected, dict):
        assert set(got) == set(expected), where
        for key in expected:
            assert_same(got[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(got) == len(expected), where
        for i, (a, b) in enumerate(zip(got, expected)):
            assert_same(a, b, f"{where}.{i}")
    else:
        assert got == expected, where


def build(accelerator, seed: int, fused: bool):
    model = tiny_blip(seed)
    optimizer = make_optimizer(model, fused)
    scheduler = warmup_cosine_schedule(optimizer, warmup_steps=2, total_steps=10)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    return model, optimizer, scheduler


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "amsgrad-maximize"])
def test_state_comes_back_exactly_in_fresh_objects(tmp_path, accelerator, fused):
    random.seed(5)
    np.random.seed(5)
    model, optimizer, scheduler = build(accelerator, 0, fused)
    ema = torch.nn.Linear(3, 2)
    sampler = torch.Generator().manual_seed(11)
    for _ in range(3):
        train_step(accelerator, model, optimizer, scheduler)
        draws(sampler)
    # An odd number of gaussians leaves the second of a pair cached, a part of the state too.
    assert random.getstate()[2] is not None and np.random.get_state()[3] == 1
    with torch.no_grad():
        ema.weight.mul_(0.5)
    objects = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "ema": ema}
    expected = {name: copy.deepcopy(obj.state_dict()) for name, obj in objects.items()}
    assert expected["optimizer"]["state"]
    assert expected["optimizer"]["param_groups"][0]["fused"] is (fused or None)
    micro_batches = accelerator.step
    manager = CheckpointManager(tmp_path / "checkpoints")
    path = manager.save(
        accelerator,
        3,
        {"epoch": 1, "note": "x"},
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        modules={"ema": ema},
        generators={"timesteps": sampler},
    )
    # What the uninterrupted run does next.
    train_step(accelerator, model, optimizer, scheduler)
    next_weights = copy.deepcopy(model.state_dict())
    next_draws = draws(sampler)

    # A new run: other initial weights, other RNG positions, counters at 0.
    random.seed(99)
    np.random.seed(99)
    fresh_model, fresh_optimizer, fresh_scheduler = build(accelerator, 1, fused)
    fresh_ema, fresh_sampler = torch.nn.Linear(3, 2), torch.Generator()
    accelerator.step = 0
    state = manager.load(
        accelerator,
        path,
        model=fresh_model,
        optimizer=fresh_optimizer,
        scheduler=fresh_scheduler,
        modules={"ema": fresh_ema},
        generators={"timesteps": fresh_sampler},
    )

    assert state["step"] == 3 and state["epoch"] == 1 and state["note"] == "x"
    assert accelerator.step == micro_batches
    assert tied(fresh_model)  # the tie survives, and both names hold the saved values
    assert_same(fresh_model.state_dict(), expected["model"], "model")
    assert_same(fresh_optimizer.state_dict(), expected["optimizer"], "optimizer")
    assert fresh_optimizer.param_groups[0]["betas"] == (0.8, 0.95)
    assert_same(fresh_scheduler.state_dict(), expected["scheduler"], "scheduler")
    assert fresh_scheduler.get_last_lr() == expected["scheduler"]["_last_lr"]
    assert_same(fresh_ema.state_dict(), expected["ema"], "ema")
    # The restored run continues bit for bit: the same update and the same random numbers.
    train_step(accelerator, fresh_model, fresh_optimizer, fresh_scheduler)
    assert_same(fresh_model.state_dict(), next_weights, "model after one more step")
    assert draws(fresh_sampler) == next_draws


def test_a_checkpoint_holds_only_safetensors_and_json(tmp_path, accelerator):
    model, optimizer, scheduler = build(accelerator, 0, True)
    train_step(accelerator, model, optimizer, scheduler)
    path = CheckpointManager(tmp_path).save(
        accelerator,
        1,
        {},
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        modules={"ema": torch.nn.Linear(2, 2)},
        generators={"timesteps": torch.Generator()},
    )
    names = sorted(p.name for p in path.iterdir())
    assert names == sorted(
        [
            COMPLETE_MARKER,
            "model.safetensors",
            "ema.safetensors",
            "optimizer.safetensors",
            "optimizer.json",
            "scheduler.json",
            "rng-0.safetensors",
            "rng-0.json",
            "trainer_state.json",
        ]
    )
    optimizer_json = json.loads((path / "optimizer.json").read_text())
    assert optimizer_json["param_groups"][0]["betas"] == {"__tuple__": [0.8, 0.95]}
    from safetensors import safe_open

    with safe_open(str(path / "optimizer.safetensors"), "pt") as handle:
        assert {"state.0.exp_avg", "state.0.exp_avg_sq", "state.0.step"} <= set(handle.keys())
    with safe_open(str(path / "model.safetensors"), "pt") as handle:
        keys = set(handle.keys())
    # The tied output layer is stored once, under one of its two names.
    tied_names = {
        "text_decoder.cls.predictions.decoder.weight",
        "text_decoder.bert.embeddings.word_embeddings.weight",
    }
    assert len(keys & tied_names) == 1


def test_a_model_that_does_not_fit_is_refused(tmp_path, accelerator):
    first, second = torch.nn.Linear(4, 3), torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(first.parameters())
    path = CheckpointManager(tmp_path).save(accelerator, 1, {}, model=first, optimizer=optimizer)
    with pytest.raises(TrainingError, match="model.safetensors does not fit the model"):
        CheckpointManager(tmp_path).load(
            accelerator, path, model=second, optimizer=torch.optim.AdamW(second.parameters())
        )
    other_groups = torch.optim.AdamW([{"params": [first.weight]}, {"params": [first.bias]}])
    with pytest.raises(TrainingError, match="optimizer.json does not fit"):
        CheckpointManager(tmp_path).load(accelerator, path, model=first, optimizer=other_groups)


def test_other_process_count_missing_module_and_bad_names_are_refused(tmp_path, accelerator):
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    manager = CheckpointManager(tmp_path)
    path = manager.save(accelerator, 1, {}, model=model, optimizer=optimizer)
    with pytest.raises(TrainingError, match="has no saved modules ema"):
        manager.load(accelerator, path, model=model, optimizer=optimizer, modules={"ema": model})
    with pytest.raises(TrainingError, match="has no saved generators timesteps"):
        manager.load(
            accelerator, path, model=model, optimizer=optimizer, generators={"timesteps": torch.Generator()}
        )
    for name in ("model", "optimizer", "rng-0", "../ema", ""):
        with pytest.raises(TrainingError, match="name .* is not allowed"):
            manager.save(accelerator, 2, {}, model=model, optimizer=optimizer, modules={name: model})
    record = json.loads((path / "trainer_state.json").read_text())
    (path / "trainer_state.json").write_text(json.dumps({**record, "num_processes": 2}))
    with pytest.raises(TrainingError, match="written by 2 process"):
        manager.load(accelerator, path, model=model, optimizer=optimizer)


def test_accelerates_pickled_checkpoints_are_not_loaded(tmp_path, accelerator):
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    old = tmp_path / "step-3"
    old.mkdir()
    for name in ("model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl"):
        (old / name).write_bytes(b"\x80\x04")  # never opened
    (old / "trainer_state.json").write_text(json.dumps({"step": 3, "num_processes": 1}))
    (old / COMPLETE_MARKER).write_text("{}\n")
    with pytest.raises(TrainingError, match="torch.save files .*optimizer.bin.*random_states_0.pkl"):
        CheckpointManager(tmp_path).load(accelerator, old, model=model, optimizer=optimizer)


def test_state_without_a_json_form_fails_the_save_and_leaves_no_checkpoint(tmp_path, accelerator):
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = SimpleNamespace(state_dict=lambda: {"lr_lambdas": [{"fn": object()}]})
    manager = CheckpointManager(tmp_path)
    with pytest.raises(TrainingError, match="cannot store a object at lr_lambdas.0.fn"):
        manager.save(accelerator, 1, {}, model=model, optimizer=optimizer, scheduler=scheduler)
    assert manager.latest() is None


def test_json_encoding_keeps_tuples_int_keys_and_tensor_dtypes(tmp_path):
    tensors = {"step": torch.tensor(3.0), "half": torch.ones(2, dtype=torch.bfloat16)}
    value = {
        "state": {0: tensors, 7: {"n": 1}},
        "betas": (0.9, (1, None)),
        "flags": [True, None, "a", np.int64(4)],
        "empty": {},
    }
    state.write_state(tmp_path, "x", value)
    back = state.read_state(tmp_path, "x")
    assert_same(back, {**value, "flags": [True, None, "a", 4]})
    with pytest.raises(TrainingError, match="cannot store the key"):
        state.write_state(tmp_path, "y", {"__tensor__": 1})


@pytest.mark.parametrize("kind", ["DEEPSPEED", "FSDP", "MEGATRON_LM", "XLA"])
def test_sharded_setups_are_refused(kind, tmp_path):
    from accelerate.utils import DistributedType

    fake = SimpleNamespace(distributed_type=DistributedType[kind], parallelism_config=None)
    with pytest.raises(TrainingError, match="checkpoints support single-process and DDP training"):
        CheckpointManager.check_supported(fake)
    with pytest.raises(TrainingError, match="single-process and DDP"):
        CheckpointManager(tmp_path).save(fake, 1, {}, model=None, optimizer=None)
    assert not any(tmp_path.iterdir())


def test_ddp_is_accepted_but_tensor_parallelism_is_not():
    from accelerate.utils import DistributedType

    CheckpointManager.check_supported(
        SimpleNamespace(distributed_type=DistributedType.MULTI_GPU, parallelism_config=None)
    )
    tensor_parallel = SimpleNamespace(tp_enabled=True, cp_enabled=False)
    with pytest.raises(TrainingError, match="parallelism tp"):
        CheckpointManager.check_supported(
            SimpleNamespace(distributed_type=DistributedType.MULTI_GPU, parallelism_config=tensor_parallel)
        )


def test_the_package_never_unpickles():
    """Our security standard: no pickle for data or checkpoints, torch.load only with weights_only=True."""
    forbidden = re.compile(
        r"^\s*(import|from)\s+(pickle|dill|cloudpickle|joblib)\b|\bpickle\.\w+\("
        r"|torch\.save\(|\.save_state\(|\.load_state\(|allow_pickle\s*=\s*True"
    )
    problems = []
    for file in sorted(PACKAGE.rglob("*.py")):
        for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("#", 1)[0]
            if forbidden.search(code) or ("torch.load(" in code and "weights_only=True" not in code):
                problems.append(f"{file.relative_to(PACKAGE.parent)}:{number}: {line.strip()}")
    assert not problems, "\n".join(problems)
