"""train-dit: memory bounded whatever the number of shards, and the trainer's per-step overhead.

Memory: the same training run (same steps, batch and model) on synthetic embeddings of S shards and of
10 S shards, each in its own process; the peak resident set (VmHWM from /proc/self/status, read by the
child at its end: ru_maxrss of the parent would include its children) of the 10x run must stay within
1.25x of the 1x run. The run streams an epoch of the 10x data and fits the standardize statistics over
all of it, so every shard is mapped at some point.

Overhead: samples/s of `run_train_dit` (data stream, noise, EMA, clipping, scheduler, Accelerate
wrappers, deterministic kernels, loss checks, logging) vs the best plain PyTorch step (forward + MSE +
backward + fused AdamW from `build_optimizer`, no host sync) on batches of the same stream held in
memory, in the same process and threads, at the size of the demo's tiny DiT (hidden 128, 4 layers, 16
tokens). The two alternate window by window (the trainer's callback runs the bare steps between its
log windows), so load from other work on the machine falls on both; the target compares the medians
over the windows (10 steps each; the same ratio in CPU time, which other processes on the machine
hardly change, is in the notes). Target: the trainer within 15% of the bare step.

    python bench/bench_train_dit.py [--quick] [--threads 1]
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import parse_args, peak_rss_mb, rate_range, ratio_target, report, target

HERE = Path(__file__).resolve().parent

FULL = {
    "shards": 4,
    "shard_size": 256,
    "mem_dims": {"cond_tokens": 64, "cond_dim": 256, "target_tokens": 64, "target_dim": 128, "embed_dim": 64},
    "mem_batch": 64,
    "speed_steps": 400,
    "speed_window": 10,  # 40 windows: 39 timed rounds
}
QUICK = {
    "shards": 2,
    "shard_size": 64,
    "mem_dims": {"cond_tokens": 16, "cond_dim": 64, "target_tokens": 16, "target_dim": 32, "embed_dim": 16},
    "mem_batch": 32,
    "speed_steps": 30,
    "speed_window": 5,  # 5 timed rounds
}
# The demo's tiny DiT (hidden ~128, 4 layers, 17 tokens); 16 = a 4x4 grid here.
SPEED_DIMS = {"cond_tokens": 16, "cond_dim": 64, "target_tokens": 16, "target_dim": 64, "embed_dim": 32}
SPEED_MODEL = {
    "model.preset": "tiny",
    "model.hidden_size": 128,
    "model.num_layers": 4,
    "model.num_heads": 4,
    "model.num_kv_heads": 2,
}
MEM_MODEL = {"model.preset": "tiny", "model.hidden_size": 64, "model.num_layers": 2, "model.num_heads": 2}


def extra(parser) -> None:
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared).")
    parser.add_argument("--child", nargs=3, metavar=("DATA", "OUT", "STEPS"), help=argparse_hidden())
    parser.add_argument("--batch", type=int, default=64, help=argparse_hidden())


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


def write_data(root: Path, shards: int, shard_size: int, dims: dict) -> Path:
    from tests.builders.embeddings import write_embeddings

    return write_embeddings(root, samples=shards * shard_size, shard_size=shard_size, dims=dims)


def child(data: str, out: str, steps: int, batch: int, threads: int) -> None:
    """One memory run: train, then report this process's peak resident set."""
    import torch

    from blip_toolkit.dit.train import run_train_dit
    from blip_toolkit.dit.train_config import load_train_config

    torch.set_num_threads(threads)
    config = load_train_config(
        None,
        {
            **MEM_MODEL,
            "data.dir": data,
            "output_dir": out,
            "train.max_steps": steps,
            "train.batch_size": batch,
            "train.save_every": 0,
            "eval.every": 0,
            "flow.target_norm": "standardize",
            "data.max_open_shards": 4,
            "data.shuffle_buffer": 2048,
            "train.log_every": 1000,
        },
    )
    result = run_train_dit(config)
    print(json.dumps({"vmhwm_mb": peak_rss_mb(), "samples_per_second": result.train_samples_per_second}))


def memory_run(data: Path, out: Path, steps: int, batch: int, threads: int) -> dict:
    done = subprocess.run(
        [
            sys.executable,
            __file__,
            "--child",
            str(data),
            str(out),
            str(steps),
            "--batch",
            str(batch),
            "--threads",
            str(threads),
        ],
        capture_output=True,
        text=True,
        timeout=3600,
    )
    if done.returncode != 0:
        raise RuntimeError(done.stderr)
    return json.loads(done.stdout.strip().splitlines()[-1])


def speed(data: Path, tmp: Path, steps: int, window: int) -> dict:
    """Seconds per window of `window` steps of the trainer and of the bare step, interleaved window by
    window in one process (same threads): `run_train_dit` flushes its train records every `window` steps and
    its callback runs `window` bare steps (timed) before the loop goes on (the records of a window are
    handed over together after its last step).

    Trainer: the wall (and CPU) time between two callbacks, i.e. everything the loop does for those steps (data,
    noise, EMA, clipping, scheduler, loss check, the record and its log line), with torch's
    deterministic algorithms on as `run_train_dit` has them on CPU. The first window is left out (the
    first steps warm up). Bare step: the best plain PyTorch step on the same model (a second DiT of the
    same config, built before the run), the same optimizer (`build_optimizer`: fused AdamW with the
    run's settings) and batches of the trainer's own stream preloaded in memory (64, cycled): forward,
    MSE, backward, step, nothing else (no host sync, no deterministic algorithms), warmed up before
    the run."""
    import itertools

    import numpy as np
    import torch
    import torch.nn.functional as F

    from blip_toolkit.dit.data import IndexStream, TrainStream
    from blip_toolkit.dit.flow import interpolate, target_velocity
    from blip_toolkit.dit.model import DiT
    from blip_toolkit.dit.normalize import TokenNormalizer
    from blip_toolkit.dit.train import run_train_dit
    from blip_toolkit.dit.train_config import load_train_config
    from blip_toolkit.embeddings.shard_reader import EmbeddingShards
    from blip_toolkit.engine.optim import build_optimizer

    batch = 32
    values = {
        **SPEED_MODEL,
        "data.dir": str(data),
        "output_dir": str(tmp / "speed-run"),
        "train.max_steps": steps,
        "train.batch_size": batch,
        "train.save_every": 0,
        "eval.every": 0,
        "train.log_every": window,
        "train.warmup_steps": 10,
        "flow.target_norm": "none",  # the bare step's batches are not normalised (standardize is the default)
        "flow.contrastive_weight": 0.0,  # the bare step is the flow-matching MSE alone
    }
    config = load_train_config(None, values)
    if config.flow.target_norm != "none":
        raise SystemExit("the bare step's batches assume flow.target_norm = none")
    # The bare step's batches: the trainer's own stream (same flow settings: noise, t, dropped conditions).
    shards = EmbeddingShards(data)
    stream = TrainStream(
        shards,
        IndexStream([np.arange(len(shards))], seed=0, buffer=1000),
        flow=config.flow,
        normalizer=TokenNormalizer("none"),
        global_batch=batch,
        rank=0,
        world_size=1,
        seed=0,
    )
    batches = list(itertools.islice(iter(stream), 64))
    dims = shards.dims
    model_config = config.model.with_data_dims(
        target_dim=dims["target_dim"],
        cond_dim=dims["cond_dim"],
        num_tokens=dims["target_tokens"],
        num_cond_tokens=dims["cond_tokens"],
    )
    torch.manual_seed(0)
    model = DiT(model_config).train()
    train = config.train
    optimizer = build_optimizer(
        model,
        learning_rate=train.learning_rate,
        weight_decay=train.weight_decay,
        betas=(train.beta1, train.beta2),
    )
    cycle = itertools.cycle(batches)

    def bare_step() -> None:
        b = next(cycle)
        x_t = interpolate(b["x_0"], b["x_1"], b["t"])
        loss = F.mse_loss(
            model(x_t, b["t"], b["cond"], None, drop=b["drop"]), target_velocity(b["x_0"], b["x_1"])
        )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(5):  # warm-up
        bare_step()

    # wall and CPU seconds of each window: {"trainer": [(wall, cpu), ...], "bare": [...]}
    windows: dict[str, list[tuple[float, float]]] = {"trainer": [], "bare": []}
    last = {"end": None, "step": 0}

    def clocks() -> tuple[float, float]:
        return time.perf_counter(), time.process_time()

    def since(start: tuple[float, float]) -> tuple[float, float]:
        now = clocks()
        return now[0] - start[0], now[1] - start[1]

    def on_record(record: dict) -> None:
        # The trainer records every step, and hands the records over every `window` steps.
        if record["type"] != "train" or record["step"] % window:
            return
        if last["end"] is not None:
            if record["step"] - last["step"] != window:
                raise SystemExit(f"train records every {window} steps expected, got step {record['step']}")
            windows["trainer"].append(since(last["end"]))
        last["step"] = record["step"]
        if record["step"] < steps:  # the next trainer window follows: time a bare one before it
            deterministic = torch.are_deterministic_algorithms_enabled()
            warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
            torch.use_deterministic_algorithms(False)
            try:
                start = clocks()
                for _ in range(window):
                    bare_step()
                windows["bare"].append(since(start))
            finally:
                torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        last["end"] = clocks()

    result = run_train_dit(config, callback=on_record)
    # The same model: the config the trainer resolved (its blip_run.json) and the parameter count.
    trained = json.loads((Path(config.output_dir) / "blip_run.json").read_text())["config"]["model"]
    if trained != model_config.resolved().to_dict() or result.num_parameters != model.num_parameters:
        raise SystemExit(f"the bare step's model differs from the trainer's: {trained}")
    return {
        "trainer_seconds": [wall for wall, _ in windows["trainer"]],
        "bare_seconds": [wall for wall, _ in windows["bare"]],
        "trainer_cpu_seconds": [cpu for _, cpu in windows["trainer"]],
        "bare_cpu_seconds": [cpu for _, cpu in windows["bare"]],
        "samples_per_window": window * batch,
        "params": result.num_parameters,
        "trainer_reported_samples_per_s": result.train_samples_per_second,
    }


def main() -> None:
    args = parse_args("train-dit memory and per-step overhead", extra)
    if args.child:
        child(args.child[0], args.child[1], int(args.child[2]), args.batch, args.threads)
        return
    import torch

    torch.set_num_threads(args.threads)
    sizes = QUICK if args.quick else FULL
    rows, targets = [], []
    with tempfile.TemporaryDirectory(prefix="bench-train-dit-") as tmp:
        tmp = Path(tmp)
        # memory: 1x and 10x shards, the same run (an epoch of the 10x data)
        small = write_data(tmp / "emb-1x", sizes["shards"], sizes["shard_size"], sizes["mem_dims"])
        large = write_data(tmp / "emb-10x", 10 * sizes["shards"], sizes["shard_size"], sizes["mem_dims"])
        data_mb = {
            name: sum(p.stat().st_size for p in path.glob("*.safetensors")) / 1e6
            for name, path in (("1x", small), ("10x", large))
        }
        steps = 10 * sizes["shards"] * sizes["shard_size"] // sizes["mem_batch"]
        peaks = {}
        for name, path in (("1x", small), ("10x", large)):
            run = memory_run(path, tmp / f"mem-{name}", steps, sizes["mem_batch"], args.threads)
            peaks[name] = run["vmhwm_mb"]
            rows.append(
                {
                    "measure": f"memory {name}: {sizes['shards'] * (10 if name == '10x' else 1)} shards",
                    "data_MB": round(data_mb[name], 1),
                    "steps": steps,
                    "peak_rss_MB": round(run["vmhwm_mb"], 1),
                    "samples_per_s": round(run["samples_per_second"], 1),
                }
            )
        ratio = peaks["10x"] / peaks["1x"]
        targets.append(target("peak RSS 10x shards / 1x shards", ratio, "<= 1.25", ratio <= 1.25))

        # overhead: the trainer vs the bare model step, interleaved window by window
        data = write_data(tmp / "emb-speed", 4, 256, SPEED_DIMS)
        measured = speed(data, tmp, sizes["speed_steps"], sizes["speed_window"])
    samples = measured["samples_per_window"]
    for label, seconds in (
        (f"trainer ({measured['params'] / 1e6:.2f}M params, batch 32)", measured["trainer_seconds"]),
        ("bare step (forward + backward + fused AdamW)", measured["bare_seconds"]),
    ):
        rows.append(
            {
                "measure": label,
                "samples_per_s": samples / statistics.median(seconds),
                "samples_per_s (slowest-fastest window)": rate_range(seconds, samples),
            }
        )
    targets.append(
        ratio_target(
            "trainer samples/s / bare step samples/s",
            measured["bare_seconds"],
            measured["trainer_seconds"],
            ">= 0.85",
            lambda r: r >= 0.85,
        )
    )
    # The same ratio in CPU seconds of this (1-thread) process: what the steps cost whatever else the
    # machine runs (wall time counts the time other processes held the core).
    cpu = ratio_target("", measured["bare_cpu_seconds"], measured["trainer_cpu_seconds"], "", lambda r: True)
    report(
        "train_dit",
        rows,
        targets=targets,
        quick=args.quick,
        notes={
            "threads": args.threads,
            "sizes": sizes,
            "speed_dims": SPEED_DIMS,
            "speed_model": SPEED_MODEL,
            "trainer samples/s / bare step samples/s in CPU time (median, min-max over the windows)": (
                f"{cpu['measured']:.4g} ({cpu['spread'][0]:.4g}-{cpu['spread'][1]:.4g})"
            ),
            "overhead rounds": f"{len(measured['trainer_seconds'])} windows of {sizes['speed_window']} steps, trainer and bare "
            "step alternating; samples/s = median over the windows",
            "trainer's own samples/s (run_train_dit result: first window included, logging excluded)": (
                measured["trainer_reported_samples_per_s"]
            ),
        },
    )


if __name__ == "__main__":
    main()
