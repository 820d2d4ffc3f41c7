"""Recall@K over embeddings: the blocked `retrieval_recall` versus the naive full-matrix computation.

Data: random 768-d embeddings stored as float16 (as shards hold them), 5 captions per image
(image i <-> texts 5i..5i+4), each caption = its image + noise so that recall is neither 0 nor 1.

- Small size, 5,000 x 25,000, where the naive one fits: blocked versus naive time (median of 5 rounds,
  each running both in turn in one process so that load from other work on the machine hits both
  alike, with the spread of the per-round ratio), whether
  both give the same hits item by item, and the peak RSS of each in a process of its own (the blocked
  one also under a 64 MiB budget).
- Full size, 50,000 images x 250,000 texts: the blocked pass (time, peak RSS, achieved FLOP/s versus
  this machine's matmul rate) and the naive one, which needs a 50 GB [I, T] float32 matrix: it runs in
  its own process under an address-space limit (so it fails cleanly instead of waking the OOM killer
  of a shared machine) and we report whether it ran out of memory and its peak RSS.

Peak RSS is reported over the worker's RSS once its inputs exist (torch and the inputs excluded).
`--quick` runs the small size only, at 1,000 x 5,000, 3 rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from _common import matmul_rate, parse_args, peak_rss_mb, ratio_target, report, target

DIM = 768
CAPTIONS = 5
NOISE = 8.0  # caption = image + NOISE * N(0, I): cosine ~0.12, R@1 in the middle at the small size
KS = (1, 5, 10)
SMALL = 5_000  # images (5x as many texts)
QUICK_SMALL = 1_000
FULL = 50_000
RSS_SLACK_MB = 64  # vectors of length I + T + P, allocator slack, MKL's packing buffers


def extra_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--budget-mb", type=int, default=1024, help="max_memory_bytes of the blocked runs (MiB)"
    )
    parser.add_argument("--worker", choices=["blocked", "naive", "compare"], help=argparse.SUPPRESS)
    parser.add_argument("--images", type=int, help=argparse.SUPPRESS)


# --- workers: one measured run per process --------------------------------------------------------------


def make_data(num_images: int, seed: int = 0):
    """image [I, 768] fp16, text [5I, 768] fp16, pair_image and pair_text [5I]. Generated in chunks so
    the float32 temporaries stay out of the worker's peak RSS."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    image = torch.empty(num_images, DIM, dtype=torch.float16)
    text = torch.empty(num_images * CAPTIONS, DIM, dtype=torch.float16)
    chunk = 256  # small, so generating the data does not set the worker's peak RSS
    for start in range(0, num_images, chunk):
        stop = min(num_images, start + chunk)
        img = torch.randn(stop - start, DIM, generator=gen)
        image[start:stop] = img
        captions = img.repeat_interleave(CAPTIONS, dim=0)
        captions += NOISE * torch.randn(captions.shape, generator=gen)
        text[start * CAPTIONS : stop * CAPTIONS] = captions
    pair_image = torch.arange(num_images).repeat_interleave(CAPTIONS)
    pair_text = torch.arange(num_images * CAPTIONS)
    return image, text, pair_image, pair_text


def naive_hits(image, text, pair_image, pair_text, ks=KS):
    """What evaluation scripts usually do (CLIP_benchmark's shape): the full similarity matrix in
    float32, a dense positive mask, topk in both directions. Returns {direction: {k: hits [N] bool}}."""
    import torch

    a = torch.nn.functional.normalize(image.float(), dim=-1)
    b = torch.nn.functional.normalize(text.float(), dim=-1)
    sim = a @ b.T  # [I, T]
    positive = torch.zeros(sim.shape, dtype=torch.bool)
    positive[pair_image, pair_text] = True
    k_max = max(ks)
    top_text = sim.topk(min(k_max, sim.shape[1]), dim=1).indices  # [I, k]
    top_image = sim.topk(min(k_max, sim.shape[0]), dim=0).indices  # [k, T]
    return {
        "i2t": {k: positive.gather(1, top_text[:, :k]).any(dim=1) for k in ks},
        "t2i": {k: positive.gather(0, top_image[:k]).any(dim=0) for k in ks},
    }


def blocked_hits(image, text, pair_image, pair_text, budget: int, ks=KS):
    from blip_toolkit.metrics.recall import retrieval_recall

    r = retrieval_recall(image, text, pair_image, pair_text, ks, max_memory_bytes=budget)
    return {"i2t": {k: r.ranks_i2t <= k for k in ks}, "t2i": {k: r.ranks_t2i <= k for k in ks}}


def recalls(hits) -> dict:
    return {d: {k: float(v.double().mean()) for k, v in per_k.items()} for d, per_k in hits.items()}


def mismatches(data, blocked, naive) -> tuple[int, int]:
    """(hits that differ, those not explained by a near-tie). By design the blocked rank counts a
    negative within the tie tolerance of the best positive as tied (topk orders the two), so a
    difference is explained when the item has a negative within tolerance + rounding of its best
    positive; any other difference would be a bug."""
    import torch

    from blip_toolkit.metrics.recall import DEFAULT_TIE_TOLERANCE

    image, text, _, _ = data
    a = torch.nn.functional.normalize(image.double(), dim=-1)  # [I, D]
    b = torch.nn.functional.normalize(text.double(), dim=-1)  # [T, D]
    total, unexplained = 0, 0
    for direction in ("i2t", "t2i"):
        differ = torch.zeros_like(blocked[direction][KS[0]])
        for k in KS:
            diff = blocked[direction][k] != naive[direction][k]
            total += int(diff.sum())
            differ |= diff
        for item in differ.nonzero().flatten().tolist():
            if direction == "i2t":
                scores, positives = b @ a[item], list(range(CAPTIONS * item, CAPTIONS * item + CAPTIONS))
            else:
                scores, positives = a @ b[item], [item // CAPTIONS]
            best = float(scores[positives].max())
            negative = torch.ones_like(scores, dtype=torch.bool)
            negative[positives] = False
            gap = best - scores[negative]
            if not bool(((gap >= -1e-6) & (gap <= DEFAULT_TIE_TOLERANCE + 1e-6)).any()):
                unexplained += 1
    return total, unexplained


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(args: argparse.Namespace) -> dict:
    data = make_data(args.images)
    result = {"images": data[0].shape[0], "texts": data[1].shape[0], "baseline_rss_mb": current_rss_mb()}
    # The ceiling for achieved FLOP/s, measured right before the run: the load from other work on a
    # shared machine changes from minute to minute.
    result["matmul_rate"] = matmul_rate(512, 0.3) if args.quick else matmul_rate()
    budget = args.budget_mb * 2**20
    if args.worker == "compare":
        # Interleaved so that other work on the machine slows both alike; the median of each is compared.
        times = {"blocked": [], "naive": []}
        out = {}
        for _ in range(3 if args.quick else 5):
            for name, fn in (("blocked", blocked_hits), ("naive", naive_hits)):
                start = time.perf_counter()
                out[name] = fn(*data, budget) if name == "blocked" else fn(*data)
                times[name].append(time.perf_counter() - start)
        result["blocked_rounds"], result["naive_rounds"] = times["blocked"], times["naive"]
        result["blocked_seconds"] = statistics.median(times["blocked"])
        result["naive_seconds"] = statistics.median(times["naive"])
        result["mismatches"], result["unexplained"] = mismatches(data, out["blocked"], out["naive"])
        result["recall"] = recalls(out["blocked"])
    elif args.worker == "blocked":
        start = time.perf_counter()
        result["recall"] = recalls(blocked_hits(*data, budget))
        result["seconds"] = time.perf_counter() - start
    else:
        # Fail with a RuntimeError rather than swap or wake the OOM killer on a shared machine.
        with open("/proc/meminfo") as f:
            total = int(f.readline().split()[1]) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (int(total * 0.8), resource.RLIM_INFINITY))
        start = time.perf_counter()
        try:
            result["recall"] = recalls(naive_hits(*data))
            result["oom"] = False
        except RuntimeError as exc:  # "DefaultCPUAllocator: can't allocate memory: you tried to allocate ..."
            result["oom"] = True
            result["error"] = str(exc).splitlines()[0][:160]
        result["seconds"] = time.perf_counter() - start
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def spawn(kind: str, num_images: int, budget_mb: int, quick: bool) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        kind,
        "--images",
        str(num_images),
        "--budget-mb",
        str(budget_mb),
        *(["--quick"] if quick else []),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:  # killed (OOM killer despite the limit) or crashed: report it, go on
        last = proc.stderr.strip().splitlines()[-1:] if proc.stderr else []
        return {"failed": f"exit code {proc.returncode}: {' '.join(last)}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- driver ---------------------------------------------------------------------------------------------


def flops_of(num_images: int) -> float:
    return 2.0 * num_images * num_images * CAPTIONS * DIM  # the one [I, T] x D matmul


def row(label: str, num_images: int, r: dict, seconds_key: str = "seconds") -> dict:
    """A table row from a worker's result `r` (time under `seconds_key`, FLOP/s against the matmul
    rate the worker measured just before)."""
    out = {"run": label, "images x texts": f"{num_images} x {num_images * CAPTIONS}"}
    seconds, rate = r.get(seconds_key), r.get("matmul_rate")
    if "failed" in r:
        out["note"] = r["failed"]
        return out
    if seconds is not None:
        out["seconds"] = seconds
    if seconds is not None and not r.get("oom"):
        out["GFLOP/s"] = flops_of(num_images) / seconds / 1e9
        if rate:
            out["of matmul rate"] = flops_of(num_images) / seconds / rate
    if "peak_rss_mb" in r:
        out["peak RSS MB"] = r["peak_rss_mb"]
        out["over inputs MB"] = r["peak_rss_mb"] - r["baseline_rss_mb"]
    if r.get("oom"):
        out["note"] = f"out of memory: {r['error']}"
    elif "recall" in r:
        rec = r["recall"]
        out["i2t R@1/5/10 %"] = "/".join(f"{100 * rec['i2t'][str(k)]:.1f}" for k in KS)
        out["t2i R@1/5/10 %"] = "/".join(f"{100 * rec['t2i'][str(k)]:.1f}" for k in KS)
    return out


def rss_target(label: str, r: dict, budget_mb: int) -> list[dict]:
    if "failed" in r:
        return []
    over = r["peak_rss_mb"] - r["baseline_rss_mb"]
    required = f"<= {budget_mb} + {RSS_SLACK_MB}"
    return [
        target(
            f"blocked peak RSS over inputs (MB), {label}", over, required, over <= budget_mb + RSS_SLACK_MB
        )
    ]


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], extra_args)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    budget_mb = args.budget_mb
    rows: list[dict] = []
    targets: list[dict] = []
    notes: dict = {"budget_mb": budget_mb, "input_dtype": "float16"}

    size = QUICK_SMALL if args.quick else SMALL
    small = f"{size} x {size * CAPTIONS}"
    compare = spawn("compare", size, budget_mb, args.quick)
    blocked = spawn("blocked", size, budget_mb, args.quick)
    tight = spawn("blocked", size, 64, args.quick)
    naive = spawn("naive", size, budget_mb, args.quick)
    # The compare process ran both: its times are comparable, its peak RSS is nobody's.
    timing = {k: v for k, v in compare.items() if k not in ("peak_rss_mb", "recall")}
    rows.append(
        row(
            "blocked (median of the interleaved rounds)",
            size,
            {**timing, "recall": compare.get("recall")},
            "blocked_seconds",
        )
    )
    rows.append(row("naive full matrix (same process)", size, timing, "naive_seconds"))
    rows.append(row("blocked (own process: memory)", size, blocked))
    rows.append(row("blocked, 64 MiB budget", size, tight))
    rows.append(row("naive full matrix (own process)", size, naive))
    if "failed" not in compare:
        targets.append(
            ratio_target(
                f"blocked / naive time, {small}",
                compare["blocked_rounds"],
                compare["naive_rounds"],
                "<= 1.5",
                lambda r: r <= 1.5,
            )
        )
        targets.append(
            target(
                "hits differing from naive, not near-ties (items x 3 K x 2 directions)",
                compare["unexplained"],
                "0",
                compare["unexplained"] == 0,
            )
        )
        notes["hits_differing_from_naive"] = (
            f"{compare['mismatches']}, of which {compare['unexplained']} not explained by a negative within "
            "the tie tolerance of the best positive"
        )
    targets += rss_target(small, blocked, budget_mb)
    targets += rss_target(f"{small}, 64 MiB budget", tight, 64)

    if not args.quick:
        full = f"{FULL} x {FULL * CAPTIONS}"
        blocked = spawn("blocked", FULL, budget_mb, False)
        naive = spawn("naive", FULL, budget_mb, False)
        rows.append(row("blocked", FULL, blocked))
        rows.append(row("naive full matrix", FULL, naive))
        targets += rss_target(full, blocked, budget_mb)
        notes["full_naive_out_of_memory"] = bool(naive.get("oom") or "failed" in naive)
    notes["machine"] = "2 cores, shared with other work when measured: times are noisy, ratios less so"
    report("recall", rows, targets=targets, notes=notes, quick=args.quick)


if __name__ == "__main__":
    main()
