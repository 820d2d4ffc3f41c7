"""LoRA fine-tuning (peft): only the adapters train; the output directory holds the merged model
(base weights + B A * alpha / r, checked against the closed form from the adapter file) and, with
--keep-adapter, the adapter alone, which `--model DIR/adapter` loads on top of its base; --resume is
exact and checkpoints stay pickle-free."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from blip_toolkit.data.images import InputItem
from blip_toolkit.jobs.predict import caption_images
from blip_toolkit.models.loading import load_model, open_runner, resolve_source
from blip_toolkit.predictors.options import CaptionOptions, GenerationOptions
from blip_toolkit.training.config import FinetuneConfig
from blip_toolkit.training.finetune import run_finetune
from blip_toolkit.training.lora import (
    DEFAULT_TARGETS,
    apply_lora,
    resolve_targets,
    store_frozen_language_model,
)

from .helpers import SAMPLES

R, ALPHA = 4, 8.0


class Killed(Exception):
    pass


def config(source, out, **changes):
    # LoRA dropout and the language model's own dropout draw from the global RNG: resume must
    # restore it. 8 examples, micro-batches of 2, 2-step accumulation: step 3 is mid-epoch 2.
    values = dict(
        manifest=str(SAMPLES / "captions.tsv"),
        task="caption",
        model=str(source),
        output_dir=str(out),
        max_steps=6,
        batch_size=2,
        grad_accum=2,
        learning_rate=2e-2,
        save_every=3,
        seed=3,
        lora=True,
        lora_r=R,
        lora_alpha=ALPHA,
        lora_dropout=0.1,
        keep_adapter=True,
    )
    values.update(changes)
    return FinetuneConfig(**values)


@pytest.fixture(scope="module")
def straight(checkpoint, tmp_path_factory):
    torch.set_num_threads(1)
    source = checkpoint("instructblip-vicuna", initializer_range=0.1)
    out = tmp_path_factory.mktemp("lora") / "run"
    return source, out, run_finetune(config(source, out))


def target_linears(source, family) -> dict[str, torch.nn.Linear]:
    model = load_model(str(source), None).model
    suffixes = DEFAULT_TARGETS[family]
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and any(name.endswith("." + s) for s in suffixes)
    }


def test_only_the_adapters_train_and_the_export_is_the_merged_model(straight):
    source, out, result = straight
    targets = target_linears(source, "instructblip-vicuna")
    assert any(n.startswith("language_model.") for n in targets) and any(
        n.startswith("qformer.") for n in targets
    )
    assert not any(n.startswith("vision_model.") for n in targets)
    # LoRA of rank r on a Linear(in, out): A is r x in, B is out x r.
    assert result.trainable_parameters == sum(R * (m.in_features + m.out_features) for m in targets.values())
    assert result.frozen_parts == []

    base, merged = load_file(str(source / "model.safetensors")), load_file(str(out / "model.safetensors"))
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert set(merged) == set(base)
    changed = 0
    for key, value in base.items():
        layer = key.removesuffix(".weight")
        if layer in targets:
            a = adapter[f"base_model.model.{layer}.lora_A.weight"]
            b = adapter[f"base_model.model.{layer}.lora_B.weight"]
            expected = value + (b @ a) * (ALPHA / R)
            torch.testing.assert_close(merged[key], expected, rtol=0, atol=1e-6)
            changed += not torch.equal(merged[key], value)
        else:
            assert torch.equal(merged[key], value), f"{key} changed"
    assert changed == len(targets)  # every adapter learned something

    adapter_config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(source.resolve())
    assert adapter_config["r"] == R and adapter_config["lora_alpha"] == ALPHA
    assert sorted(adapter_config["target_modules"]) == sorted(DEFAULT_TARGETS["instructblip-vicuna"])
    record = json.loads((out / "blip_run.json").read_text())
    assert record["lora"]["targets"] == list(DEFAULT_TARGETS["instructblip-vicuna"])


def test_the_adapter_directory_works_as_model_on_top_of_its_base(straight, sample_images):
    _, out, _ = straight
    resolved = resolve_source(str(out / "adapter"))
    assert resolved.adapter == str(out / "adapter") and resolved.config["model_type"] == "instructblip"
    items = [InputItem(str(p)) for p in sample_images[:4]]
    options = CaptionOptions(generation=GenerationOptions(max_new_tokens=6))

    def captions(model):
        runner = open_runner(str(model), "caption", device="cpu")
        return [r["caption"] for r in caption_images(runner, items, options)]

    assert captions(out / "adapter") == captions(out)


@pytest.mark.parametrize("mode", ["int8", "4bit"])
def test_a_quantized_adapter_directory_is_the_quantized_merged_model(straight, mode):
    """On CPU the adapter is merged before quantizing: the quantized weights equal those of the
    merged checkpoint quantized."""
    if mode == "4bit":
        pytest.importorskip("bitsandbytes")
    _, out, _ = straight
    merged = quantized_weights(load_model(str(out), "caption", quantize=mode).model)
    from_adapter = quantized_weights(load_model(str(out / "adapter"), "caption", quantize=mode).model)
    assert merged.keys() == from_adapter.keys() and any("quantized" in k for k in merged)
    for key, value in merged.items():
        assert torch.equal(from_adapter[key], value), key


def quantized_weights(model) -> dict[str, torch.Tensor]:
    """Every weight of `model` as stored: int8 values and scales of torch's dynamic int8 layers, packed
    4-bit values and block scales of bitsandbytes' layers, and the plain parameters."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.ao.nn.quantized.dynamic.Linear):
            weight = module.weight()
            out[f"{name} quantized int8"] = weight.int_repr()
            out[f"{name} quantized scales"] = weight.q_per_channel_scales()
        elif type(module).__name__ == "Linear4bit":
            out[f"{name} quantized 4bit"] = module.weight.data
            out[f"{name} quantized absmax"] = module.weight.quant_state.absmax
    for name, param in model.named_parameters():
        out.setdefault(name, param.detach())
    return out


def test_resumed_lora_run_equals_uninterrupted_run(straight, tmp_path):
    source, straight_out, _ = straight
    out = tmp_path / "run"

    def kill_after_step_3_checkpoint(record):
        if record["type"] == "checkpoint" and record["step"] == 3:
            raise Killed

    with pytest.raises(Killed):
        run_finetune(config(source, out), callback=kill_after_step_3_checkpoint)
    checkpoint = out / "checkpoints" / "step-3"
    assert {p.suffix for p in checkpoint.iterdir()} <= {".json", ".safetensors", ""}  # "" = COMPLETE
    saved = load_file(str(checkpoint / "model.safetensors"))
    assert any(".lora_A." in k for k in saved) and any(".base_layer." in k for k in saved)

    resumed = run_finetune(config(source, out, resume=True))
    assert resumed.resumed_from_step == 3 and resumed.steps == 6
    for name in ("model.safetensors", "adapter/adapter_model.safetensors"):
        expected, got = load_file(str(straight_out / name)), load_file(str(out / name))
        assert expected.keys() == got.keys()
        for key in expected:
            assert torch.equal(expected[key], got[key]), f"{name}: {key}"


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--lora-targets", "q_proj"], "--lora-targets need --lora"),
        (["--keep-adapter"], "--keep-adapter need --lora"),
        (["--lora", "--freeze", "vision"], "--freeze does not apply with --lora"),
        (["--lora", "--lora-r", "0"], "--lora-r must be at least 1"),
    ],
)
def test_lora_option_errors(cli, checkpoint, tmp_path, flags, message):
    result = cli(
        "finetune", SAMPLES / "captions.tsv", "--task", "caption", "--model", checkpoint("blip2-opt"),
        "-o", tmp_path / "run", *flags,
    )  # fmt: skip
    assert result.code == 2 and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_unknown_targets_are_one_usage_line(cli, checkpoint, tmp_path):
    result = cli(
        "finetune", SAMPLES / "captions.tsv", "--task", "caption", "--model", checkpoint("blip2-opt"),
        "-o", tmp_path / "run", "--lora", "--lora-targets", "no_such_layer", "--max-steps", "1",
    )  # fmt: skip
    assert result.code == 2 and "--lora-targets no_such_layer" in result.stderr
    assert "Traceback" not in result.stderr


def test_default_targets_cover_every_family(checkpoint):
    from blip_toolkit.models.loading import FAMILIES
    from blip_toolkit.training.modules import TRAINABLE

    trainable = {name for names in TRAINABLE.values() for name in names}
    assert trainable <= set(DEFAULT_TARGETS)
    assert resolve_targets(FAMILIES["blip2-opt"], ["q_proj, v_proj", "q_proj"]) == [
        "q_proj, v_proj",
        "q_proj",
    ]


def test_half_precision_keeps_the_vision_tower_and_adapters_in_float32(checkpoint):
    loaded = load_model(str(checkpoint("blip2-opt")), None)
    store_frozen_language_model(loaded.model, loaded.family, "bf16")
    peft_model = apply_lora(
        loaded.model, loaded.family, r=2, alpha=4, dropout=0.0, targets=resolve_targets(loaded.family, None)
    )
    dtypes = {}
    for name, param in peft_model.named_parameters():
        part = "lora" if ".lora_" in name else name.split(".")[2]  # base_model.model.<part>...
        dtypes.setdefault(part, set()).add(param.dtype)
    assert dtypes["language_model"] == {torch.bfloat16}
    assert dtypes["vision_model"] == dtypes["qformer"] == dtypes["lora"] == {torch.float32}


@pytest.mark.parametrize("kind", ["blip2-t5", "blip-caption"])
def test_merged_state_dict_is_what_merge_and_unload_gives(checkpoint, kind):
    """The export's merge (tensor by tensor, the live model untouched) against peft's own
    merge_and_unload() of a copy, with non-zero adapters."""
    import copy

    from blip_toolkit.training.lora import merged_state_dict

    loaded = load_model(str(checkpoint(kind)), None)
    peft_model = apply_lora(
        loaded.model, loaded.family, r=2, alpha=6, dropout=0.0, targets=resolve_targets(loaded.family, None)
    )
    torch.manual_seed(0)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.1)
    before = {k: v.clone() for k, v in peft_model.state_dict().items()}
    reference = copy.deepcopy(peft_model).merge_and_unload().state_dict()
    merged = merged_state_dict(peft_model)
    assert merged.keys() == reference.keys()
    for key, value in reference.items():
        assert torch.equal(merged[key], value.float()), key
    assert all(torch.equal(before[k], v) for k, v in peft_model.state_dict().items())  # untouched
