"""DiT training and sampling throughput on CPU, side by side with diffusers' LuminaNextDiT2DModel (the
head BLIP3-o uses) at matched width, depth, heads and token count.

Training: samples/s of one step (forward + backward + AdamW) at batch 8, float32, and the achieved
FLOP/s (FLOPs of a step counted with FlopCounterMode / step time) as a fraction of this machine's
float32 matmul rate. Timed in 5 rounds, each running our step, Lumina's step and a fixed amount of
square matmuls (the rate's probe) one after the other, so load from other work on the machine falls
on all three; the ratios compare medians over the rounds, with the per-round spread reported.
Sampling: samples/s of 50 Euler steps without and with classifier-free guidance (3.0), 3 rounds.

    python bench/bench_dit.py [--quick] [--rounds 5] [--sample-batch 4] [--threads N]
"""

from __future__ import annotations

import statistics

from _common import (
    MatmulProbe,
    interleaved_rounds,
    parse_args,
    peak_rss_mb,
    rate_range,
    ratio_target,
    report,
    target,
)

FULL = {
    "preset": "small",
    "tokens": 256,
    "target_dim": 1024,
    "cond_tokens": 256,
    "cond_dim": 1408,
    "batch": 8,
    "layers": None,
    "sample_steps": 50,
    "train_rounds": 5,
    "sample_rounds": 3,
    "matmul": (1024, 1.5),  # size, seconds per round
}
QUICK = {
    "preset": "tiny",
    "tokens": 16,
    "target_dim": 64,
    "cond_tokens": 16,
    "cond_dim": 88,
    "batch": 2,
    "layers": 2,
    "sample_steps": 4,
    "train_rounds": 3,
    "sample_rounds": 3,
    "matmul": (256, 0.1),
}


def cpu_flash_attention_flops():
    """FlopCounterMode counts the CUDA SDPA kernels only; count the CPU flash-attention kernel (which
    both models use on CPU) with the same formulas."""
    import torch
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten

    def forward(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    def backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
        return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)

    return {
        aten._scaled_dot_product_flash_attention_for_cpu: forward,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: backward,
    }


def count_flops(step) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False, custom_mapping=cpu_flash_attention_flops()) as counter:
        step()
    return counter.get_total_flops()


def build_ours(sizes):
    import torch

    from blip_toolkit.dit.config import DiTConfig, FlowConfig
    from blip_toolkit.dit.flow import flow_loss
    from blip_toolkit.dit.model import DiT

    config = DiTConfig(
        preset=sizes["preset"],
        num_layers=sizes["layers"],
        target_dim=sizes["target_dim"],
        cond_dim=sizes["cond_dim"],
        num_tokens=sizes["tokens"],
        num_cond_tokens=sizes["cond_tokens"],
    )
    model = DiT(config)
    gen = torch.Generator().manual_seed(0)
    x_1 = torch.randn(sizes["batch"], sizes["tokens"], sizes["target_dim"], generator=gen)
    cond = torch.randn(sizes["batch"], sizes["cond_tokens"], sizes["cond_dim"], generator=gen)
    # fused AdamW: one kernel per parameter tensor (on CPU too), for both models
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    flow = FlowConfig(
        cond_dropout=0.0, contrastive_weight=0.0
    )  # Lumina has no dropout path nor a contrastive term: same work for both

    def forward_backward():
        loss, _ = flow_loss(model, x_1, cond, flow, generator=gen)
        loss.backward()

    def step():
        forward_backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return model, step, forward_backward, cond


def build_lumina(sizes):
    """LuminaNextDiT2DModel with the same width / depth / heads / GQA, 2x2 patches over a latent whose
    token count equals ours and whose tokens carry about target_dim values (in_channels = Dt / 4),
    cross-attending to the same conditioning tokens."""
    import math

    import torch
    import torch.nn.functional as F
    from diffusers import LuminaNextDiT2DModel
    from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina

    from blip_toolkit.dit.config import DiTConfig

    ours = DiTConfig(preset=sizes["preset"], num_layers=sizes["layers"])
    side = math.isqrt(sizes["tokens"])  # tokens per side
    model = LuminaNextDiT2DModel(
        sample_size=2 * side,
        patch_size=2,
        in_channels=sizes["target_dim"] // 4,
        hidden_size=ours.resolved_hidden_size,
        num_layers=ours.resolved_num_layers,
        num_attention_heads=ours.resolved_num_heads,
        num_kv_heads=ours.resolved_num_kv_heads,
        learn_sigma=False,  # a velocity only, like ours
        qk_norm=True,
        cross_attention_dim=sizes["cond_dim"],
    )
    gen = torch.Generator().manual_seed(0)
    batch = sizes["batch"]
    x_1 = torch.randn(batch, sizes["target_dim"] // 4, 2 * side, 2 * side, generator=gen)
    cond = torch.randn(batch, sizes["cond_tokens"], sizes["cond_dim"], generator=gen)
    cond_mask = torch.ones(batch, sizes["cond_tokens"], dtype=torch.long)
    rotary = get_2d_rotary_pos_embed_lumina(ours.head_dim, side, side)
    # fused AdamW: one kernel per parameter tensor (on CPU too), for both models
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def forward_backward():
        x_0 = torch.randn(x_1.shape, generator=gen)
        t = torch.rand(batch, generator=gen)
        x_t = torch.lerp(x_0, x_1, t[:, None, None, None])
        velocity = model(x_t, t, cond, cond_mask, rotary, cross_attention_kwargs={}, return_dict=False)[0]
        F.mse_loss(velocity, x_1 - x_0).backward()

    def step():
        forward_backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return model, step, forward_backward


def training_row(name, model, flops, seconds, batch):
    """A table row from the per-round step times `seconds` (medians, and the spread of samples/s)."""
    step_s = statistics.median(seconds)
    return {
        "model": name,
        "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
        "step_s": step_s,
        "samples_per_s": batch / step_s,
        "samples_per_s (slowest-fastest round)": rate_range(seconds, batch),
        "gflop_per_sample": flops / batch / 1e9,
        "achieved_gflop_s": flops / step_s / 1e9,
    }


def main() -> None:
    def options(parser):
        parser.add_argument("--sample-batch", type=int, default=4, help="Samples per batch when sampling.")
        parser.add_argument(
            "--rounds", type=int, default=None, help="Timed training rounds (default 5, quick 3)."
        )
        parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores).")

    args = parse_args(__doc__.splitlines()[0], extra=options)
    import torch

    from blip_toolkit.dit.solver import generate

    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = QUICK if args.quick else FULL
    rounds = args.rounds or sizes["train_rounds"]
    torch.manual_seed(0)
    probe = MatmulProbe(*sizes["matmul"])

    # Training: FLOPs of one step of each (forward + backward; AdamW adds no matmuls), then the two
    # models' steps and the matmul probe timed in the same rounds, one after the other.
    model, step, forward_backward, cond = build_ours(sizes)
    lumina_model, lumina_step, lumina_fb = build_lumina(sizes)
    flops = {"ours": count_flops(forward_backward), "lumina": count_flops(lumina_fb)}
    model.zero_grad(set_to_none=True)
    lumina_model.zero_grad(set_to_none=True)
    times = interleaved_rounds({"ours": step, "lumina": lumina_step, "matmul": probe}, rounds)
    batch = sizes["batch"]
    ours = training_row("blip DiT", model, flops["ours"], times["ours"], batch)
    lumina = training_row("LuminaNextDiT2DModel", lumina_model, flops["lumina"], times["lumina"], batch)
    del lumina_model, lumina_step, lumina_fb
    matmul = probe.flops / statistics.median(times["matmul"])
    for row in (ours, lumina):
        row["fraction_of_matmul_rate"] = row["achieved_gflop_s"] * 1e9 / matmul

    # Sampling: the plain conditional model and classifier-free guidance at 3.0, in alternation.
    model.eval()
    sample_cond = cond[: min(args.sample_batch, cond.shape[0])]
    steps = sizes["sample_steps"]

    def sampler(cfg_scale):
        return lambda: generate(model, sample_cond, steps=steps, cfg_scale=cfg_scale)

    sample_times = interleaved_rounds({"1": sampler(1.0), "3": sampler(3.0)}, sizes["sample_rounds"])

    rows = [ours, lumina]
    for cfg_scale, seconds in sample_times.items():
        rows.append(
            {
                "model": f"blip DiT sampling, {steps} Euler steps, cfg {cfg_scale}",
                "samples_per_s": sample_cond.shape[0] / statistics.median(seconds),
                "samples_per_s (slowest-fastest round)": rate_range(seconds, sample_cond.shape[0]),
                "step_s": statistics.median(seconds) / steps,
            }
        )
    targets = [
        ratio_target(
            "training samples/s, ours / Lumina", times["lumina"], times["ours"], ">= 1", lambda r: r >= 1
        ),
        # (flops / t_ours) / (probe flops / t_matmul), median times over the same rounds
        ratio_target(
            "achieved FLOP/s / float32 matmul rate",
            times["matmul"],
            times["ours"],
            ">= 0.70",
            lambda r: r >= 0.70,
            scale=flops["ours"] / probe.flops,
        ),
        target(
            "FLOPs per sample, ours / Lumina",
            ours["gflop_per_sample"] / lumina["gflop_per_sample"],
            "< 1",
            ours["gflop_per_sample"] < lumina["gflop_per_sample"],
        ),
        ratio_target(
            "sampling time with cfg 3.0 / without",
            sample_times["3"],
            sample_times["1"],
            "<= 2.1",
            lambda r: r <= 2.1,
        ),
    ]
    notes = {
        "sizes": sizes,
        "sample_batch": sample_cond.shape[0],
        "rounds": f"training: {rounds} (ours, Lumina, matmul probe in turn), sampling: {sizes['sample_rounds']}",
        "threads": torch.get_num_threads(),
        "matmul GFLOP/s (slowest-fastest round)": rate_range(times["matmul"], probe.flops / 1e9),
        "matmul probe": f"{probe.count} x {sizes['matmul'][0]}^2 float32 matmuls per round",
        "peak_rss_mb": peak_rss_mb(),
        "flops": "FlopCounterMode over forward + backward (matmuls and attention); CPU flash attention counted "
        "with torch's SDPA formulas",
        "training": "rectified-flow MSE step + fused AdamW on random data; no condition dropout, so both models "
        "do the same work on every step",
        "fraction of the matmul rate": "achieved FLOP/s at the median step time over the rounds / matmul "
        "rate at the median probe time over the same rounds",
    }
    report("dit", rows, targets=targets, notes=notes, quick=args.quick)


if __name__ == "__main__":
    main()
