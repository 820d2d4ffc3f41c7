"""Shared helpers for the benchmarks. Each bench_*.py is runnable alone
(`python bench/bench_x.py [--quick]`), prints its tables as Markdown and writes
bench/results/<name>.json (<name>.quick.json for a --quick run).

Targets are ratios against a reference measured in the same process (these machines are noisy),
never absolute times. Timed ratios come from interleaved rounds (`interleaved_rounds`): every round
runs the measured work and its reference one after the other, so a burst of load from other work on
the machine falls on both; the target compares the median of each over the rounds, and the spread
of the per-round ratio is reported beside it (`ratio_target`)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path

from tabulate import tabulate

# OpenMP threads sleep at the end of a parallel region instead of spinning, as blip's CLI sets it
# (cli/main.py passive_thread_waits; it must be set before torch loads OpenMP). A benchmark and its
# reference run in one process and share it; bench_caption.py measures the setting itself in child
# processes (BLIP_BENCH_OMP_DEFAULT=1 leaves OpenMP's default).
if os.environ.get("BLIP_BENCH_OMP_DEFAULT") != "1":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent
BLIP_VOCAB = 30524  # Salesforce/blip-*'s tokenizer: BERT's 30,522 + [DEC], [ENC]
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
STARTED = time.perf_counter()
QUICK_NOTE = "QUICK run: small sizes, checks that the script works; not comparable with a full run"


def parse_args(
    description: str, extra: Callable[[argparse.ArgumentParser], None] | None = None
) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="Small sizes: checks the script works in seconds; numbers are not comparable.",
    )
    if extra:
        extra(parser)
    args = parser.parse_args()
    print(machine_line(), flush=True)  # every figure below comes from this machine
    return args


# ----------------------------------------------------------------------------------------------------
# Timing


class MatmulProbe:
    """A fixed amount of square matmul work (on all threads), calibrated to take about `seconds` now;
    call it to run it. Timed in the same rounds as the work it is compared with, it gives this
    machine's matmul rate (the ceiling of achieved FLOP/s) under the same load.

    `kernel`: "torch" is `a @ b` (float32: MKL's sgemm in torch's x86 builds; bfloat16: oneDNN);
    "onednn" is the same product through oneDNN with the right-hand side packed once, the kernel
    blip_toolkit/runtime/fast_linear.py uses (on AMD CPUs MKL's float32 reaches about half of it).
    `dtype`: torch.float32 (default) or torch.bfloat16."""

    def __init__(self, size: int = 1024, seconds: float = 1.0, *, kernel: str = "torch", dtype=None):
        import torch

        dtype = dtype or torch.float32
        self.kernel, self.dtype = kernel, dtype
        self.a = torch.randn(size, size).to(dtype)
        self.b = torch.randn(size, size).to(dtype)
        if kernel == "onednn":
            packed = torch.ops.mkldnn._reorder_linear_weight(self.b.t().contiguous(), batch_size=8)
            self._product = lambda: torch.ops.mkldnn._linear_pointwise(self.a, packed, None, "none", [], "")
        elif kernel == "torch":
            self._product = lambda: self.a @ self.b
        else:
            raise ValueError(f"unknown matmul kernel {kernel!r}")
        for _ in range(3):  # warm-up
            self._product()
        once = float("inf")
        for _ in range(3):  # the fastest of 3 (a burst of load would make the probe too short)
            start = time.perf_counter()
            self._product()
            once = min(once, time.perf_counter() - start)
        self.count = max(1, round(seconds / max(once, 1e-6)))
        self.flops = 2 * size**3 * self.count

    def __call__(self) -> None:
        for _ in range(self.count):
            self._product()

    def rate(self, seconds: float) -> float:
        """FLOP/s of a run that took `seconds`."""
        return self.flops / seconds


def matmul_rate(size: int = 1024, seconds: float = 2.0) -> float:
    """This machine's float32 matmul rate in FLOP/s, measured once, now (no rounds: for figures that
    have no target)."""
    probe = MatmulProbe(size, seconds)
    return probe.rate(timed(probe))


def timed(fn: Callable[[], object]) -> float:
    """Wall time of one call (seconds)."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved_rounds(
    functions: dict[str, Callable[[], object]], rounds: int, *, warmup: int = 1
) -> dict[str, list[float]]:
    """Wall times (s) of each function in each of `rounds` rounds, a round running every function
    once, in turn (after `warmup` untimed runs of each)."""
    for _ in range(warmup):
        for fn in functions.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(rounds):
        for name, fn in functions.items():
            times[name].append(timed(fn))
    return times


def round_stats(values: Sequence[float]) -> dict:
    """{"median", "min", "max", "rounds"} of per-round values."""
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "rounds": len(values),
    }


def median_range(values: Sequence[float], scale: float = 1.0) -> str:
    """'median (min-max)' of per-round values times `scale`, for a table cell."""
    s = round_stats([v * scale for v in values])
    if s["rounds"] == 1:
        return _fmt(s["median"])
    return f"{_fmt(s['median'])} ({_fmt(s['min'])}-{_fmt(s['max'])})"


def rate_range(seconds: Sequence[float], amount: float) -> str:
    """'rate (min-max)' of `amount` per second from per-round times: amount / median time (what the
    targets use, whatever the number of rounds), then the slowest and the fastest round."""
    rate = amount / statistics.median(seconds)
    if len(seconds) == 1:
        return _fmt(rate)
    return f"{_fmt(rate)} ({_fmt(amount / max(seconds))}-{_fmt(amount / min(seconds))})"


def ratio_target(
    description: str,
    numerator: Sequence[float],
    denominator: Sequence[float],
    required: str,
    ok: Callable[[float], bool],
    *,
    scale: float = 1.0,
) -> dict:
    """A target on scale x median(numerator) / median(denominator) over paired rounds, with the min
    and max of the per-round ratio as its spread. For a ratio of rates pass the times the other way
    round (the rate of A over the rate of B for equal work = median time of B / median time of A)."""
    if len(numerator) != len(denominator) or not numerator:
        raise ValueError("ratio_target needs the same, non-zero number of rounds on both sides")
    measured = scale * statistics.median(numerator) / statistics.median(denominator)
    per_round = [scale * n / d for n, d in zip(numerator, denominator, strict=True)]
    return target(
        description,
        measured,
        required,
        ok(measured),
        spread=(min(per_round), max(per_round)),
        rounds=len(per_round),
    )


def target(
    description: str,
    measured: float,
    required: str,
    ok: bool,
    *,
    spread: tuple[float, float] | None = None,
    rounds: int | None = None,
) -> dict:
    """A pass/fail target. `spread`: (min, max) of the measure over the `rounds` timed rounds."""
    out = {"target": description, "measured": measured, "required": required, "ok": bool(ok)}
    if spread is not None:
        out["spread"] = [float(spread[0]), float(spread[1])]
    if rounds is not None:
        out["rounds"] = rounds
    return out


def peak_rss_mb() -> float:
    """Peak resident set size of this process image so far, in MB: VmHWM from /proc/self/status.
    Not ru_maxrss where VmHWM exists: Linux keeps ru_maxrss across execve, so a child started from a
    large benchmark process would report at least the parent's size at fork time."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


# ----------------------------------------------------------------------------------------------------
# Reporting


def machine() -> dict:
    import torch

    return {
        "cpu": cpu_model(),
        "cpu flags": cpu_flag_summary(),
        "torch cpu capability": torch.backends.cpu.get_cpu_capability(),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "(OpenMP's default)"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load average (1, 5, 15 min)": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def cpu_flag_summary() -> str:
    """The CPU flags that decide matmul speed, each present or absent: 'avx2 yes, ..., amx_tile no'."""
    from blip_toolkit.models.device import CPU_FLAGS, cpu_flags

    flags = cpu_flags()
    return ", ".join(f"{flag} {'yes' if flag in flags else 'no'}" for flag in CPU_FLAGS)


def machine_line(info: dict | None = None) -> str:
    """One line naming the machine a figure comes from (figures of different CPUs differ)."""
    info = info or machine()
    return (
        f"CPU {info.get('cpu', '?')} ({info.get('cpus', '?')} cores; {info.get('cpu flags', 'flags ?')}; "
        f"torch CPU capability {info.get('torch cpu capability', '?')}), torch {info.get('torch', '?')}, "
        f"{info.get('threads', '?')} threads, OMP_WAIT_POLICY {info.get('OMP_WAIT_POLICY', '?')}"
    )


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def results_path(name: str, quick: bool) -> Path:
    return RESULTS / (f"{name}.quick.json" if quick else f"{name}.json")


def report(
    name: str,
    rows: list[dict],
    *,
    quick: bool,
    targets: list[dict] | None = None,
    notes: dict | None = None,
    tables: dict[str, list[dict]] | None = None,
) -> dict:
    """Print rows and pass/fail targets as Markdown tables (full width, whatever stdout is) and write
    the results JSON (`results_path`). A quick run is flagged in both. `tables`: further tables by
    title (a profile, levers), printed after the notes and kept in the JSON."""
    info = machine()
    print(f"\n## {name}" + (f" ({QUICK_NOTE})" if quick else "") + "\n")
    print(f"Measured on: {machine_line(info)}.\n")
    if rows:
        print(markdown_table(rows) + "\n")
    if targets:
        print(markdown_table(target_rows(targets)) + "\n")
    if notes:
        print("\n".join(note_lines(notes)) + "\n")
    for title, table in (tables or {}).items():
        print(f"### {title}\n\n{markdown_table(table)}\n")
    result = {
        "name": name,
        "quick": quick,
        "machine": info,
        "rows": rows,
        "targets": targets or [],
        "notes": notes or {},
        "tables": tables or {},
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "wall_seconds": round(time.perf_counter() - STARTED, 1),
    }
    RESULTS.mkdir(exist_ok=True)
    path = results_path(name, quick)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")
    tmp.replace(path)
    return result


def target_rows(targets: list[dict], benchmark: str | None = None) -> list[dict]:
    """Table rows of targets: measured value, spread over the rounds, requirement, pass/fail."""
    rows = []
    for t in targets:
        row = {"benchmark": benchmark} if benchmark else {}
        row["target"] = t["target"]
        row["measured"] = t["measured"]
        lo_hi = t.get("spread")
        row["per-round min-max"] = f"{_fmt(lo_hi[0])}-{_fmt(lo_hi[1])}" if lo_hi else ""
        row["rounds"] = t.get("rounds", "")
        row["required"] = t["required"]
        row["pass"] = "yes" if t["ok"] else "**NO**"
        rows.append(row)
    return rows


def note_lines(notes: dict) -> list[str]:
    """Markdown bullets 'key: value' (dicts and lists as inline JSON)."""
    lines = []
    for key, value in notes.items():
        if isinstance(value, (dict, list)):
            text = "`" + json.dumps(value, default=str) + "`"
        else:
            text = _fmt(value)
        lines.append(f"- {key}: {text}")
    return lines


def markdown_table(rows: list[dict], columns: list[str] | None = None) -> str:
    """A GitHub Markdown table of `rows` (dicts; columns = every key in order of appearance). Cells
    are never cut: '|' is escaped and line breaks become spaces."""
    columns = columns or list(dict.fromkeys(k for row in rows for k in row))
    body = [[_cell(row.get(k, "")) for k in columns] for row in rows]
    return tabulate(body, headers=[_cell(c) for c in columns], tablefmt="github", disable_numparse=True)


def _cell(value) -> str:
    return " ".join(_fmt(value).split()).replace("|", "\\|")


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, default=str)
    return str(value)


# ----------------------------------------------------------------------------------------------------
# Inputs and models shared by the BLIP benchmarks


def make_photos(folder: Path, count: int) -> list[Path]:
    """640x480 JPEGs cut from the bundled sample photos (upscaled, varied crops)."""
    from PIL import Image

    sources = sorted((REPO / "data" / "samples").glob("*.jpg"))
    paths = []
    for i in range(count):
        image = Image.open(sources[i % len(sources)]).convert("RGB").resize((960, 720), Image.BICUBIC)
        left, top = (i * 37) % 320, (i * 53) % 240
        path = folder / f"photo-{i:02d}.jpg"
        image.crop((left, top, left + 640, top + 480)).save(path, quality=90)
        paths.append(path)
    return paths


def blip_tokenizer(vocab_size: int | None = None):
    """A local WordPiece tokenizer with BLIP's special tokens and `vocab_size` tokens (the corpus's
    words plus filler words w0, w1, ...), so a random model's captions decode to words."""
    from blip_toolkit.models.scratch.tokenizers import DEFAULT_CORPUS, wordpiece_tokenizer

    vocab_size = vocab_size or BLIP_VOCAB
    base = len(wordpiece_tokenizer())
    tokenizer = wordpiece_tokenizer(DEFAULT_CORPUS + [f"w{i}" for i in range(max(0, vocab_size - base))])
    assert len(tokenizer) == vocab_size or vocab_size < base, (len(tokenizer), vocab_size)
    return tokenizer


def build_blip(folder: Path, class_name: str, quick: bool) -> Path:
    """A BLIP-base-sized checkpoint of `class_name` (BlipForConditionalGeneration,
    BlipForQuestionAnswering or BlipForImageTextRetrieval) with transformers' default BlipConfig
    (ViT-B/16 at 384 px, BERT-base text transformer), random weights, and a tokenizer of BLIP's size
    (`blip_tokenizer`); quick: 2 layers of 128 at 96 px and a small vocabulary."""
    import torch
    import transformers
    from transformers import BlipConfig, BlipProcessor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    from blip_toolkit.log import quiet_transformers

    quiet_transformers()  # no "Writing model shards" bar on stderr
    tokenizer = blip_tokenizer(2000 if quick else None)
    text = dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        sep_token_id=tokenizer.sep_token_id,
        pad_token_id=0,
    )
    vision = {"initializer_range": 0.02}
    image_processor = BlipImageProcessorPil()
    if quick:
        small = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256)
        text.update(small, encoder_hidden_size=128)
        vision.update(small, image_size=96, patch_size=16)
        image_processor = BlipImageProcessorPil(size={"height": 96, "width": 96})
    torch.manual_seed(0)
    model = getattr(transformers, class_name)(BlipConfig(text_config=text, vision_config=vision))
    out = folder / class_name
    model.save_pretrained(out)
    BlipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    return out


def shares(paths: list[str], rounds: int):
    """An iterator over `rounds` consecutive shares of `paths` (one per round)."""
    per = len(paths) // rounds
    return iter([paths[i * per : (i + 1) * per] for i in range(rounds)])


def agreement(captions: dict, base: dict) -> float:
    return sum(captions.get(k) == v for k, v in base.items()) / max(1, len(base))


@contextmanager
def environment(**values):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update({k: v for k, v in values.items() if v is not None})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextmanager
def timed_calls(module, sink: list):
    """Append the wall time of every forward call of `module` to `sink`."""
    starts = []
    pre = module.register_forward_pre_hook(lambda *_: starts.append(time.perf_counter()))
    post = module.register_forward_hook(lambda *_: sink.append(time.perf_counter() - starts.pop()))
    try:
        yield
    finally:
        pre.remove()
        post.remove()


def demo_caption_task(root: Path, quick: bool) -> dict:
    """The demo's caption task (its pairs of digits, from-scratch model size, recipe and epochs):
    {"manifest", "init", "images", "truth" [(left, right)], "epochs", "finetune"}; --quick shrinks it."""
    from blip_toolkit.demo.data import CORPUS, write_dataset
    from blip_toolkit.demo.run import PLANS
    from blip_toolkit.demo.stages import FINETUNE, MODEL_SIZE
    from blip_toolkit.models.scratch.checkpoints import ModelSize, build_checkpoint

    plan = PLANS["full"]
    pairs, epochs = (200, 1) if quick else (plan.train_pairs, plan.caption_epochs)
    data = write_dataset(root / "digits", train=pairs, val=10, test_per_combo=1, seed=0)
    init = build_checkpoint("blip-caption", root / "digits-init", size=ModelSize(**MODEL_SIZE), corpus=CORPUS)
    return {
        "manifest": str(data.manifests["train"]["caption"]),
        "init": str(init),
        "images": [str(p) for p in data.images("test")],
        "truth": [(p.left, p.right) for p in data.pairs["test"]],
        "epochs": epochs,
        "finetune": dict(FINETUNE),
    }


def caption_in_order(model_dir: str, images: list[str], truth: list, quantize: str | None = None) -> list:
    """Caption the demo's test pairs; per pair the caption, or None for an error, and whether it names
    both digits in order (the demo's caption measure)."""
    from blip_toolkit.data.images import InputItem
    from blip_toolkit.demo.data import digits_in
    from blip_toolkit.jobs.predict import caption_images
    from blip_toolkit.models.loading import open_runner
    from blip_toolkit.predictors.options import CaptionOptions, GenerationOptions

    runner = open_runner(model_dir, "caption", device="cpu", quantize=quantize)
    options = CaptionOptions(batch_size=64, generation=GenerationOptions(max_new_tokens=16), num_workers=0)
    records = caption_images(runner, [InputItem(p) for p in images], options)
    texts = [r.get("caption") for r in records]
    return [(t, t is not None and digits_in(t)[:2] == list(pair)) for t, pair in zip(texts, truth)]
