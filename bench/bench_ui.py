"""`blip ui` under load: 16 concurrent clients (gradio_client, one thread each) captioning through the
API of a `blip ui` server in its own process, with batching (--max-batch-size 8, the default)
against the same server with batching off (--max-batch-size 1). Same BLIP-base-sized model as
bench_caption (transformers' default BlipConfig, random weights, ~224M parameters), same 640x480
photos, greedy decoding of 20 new tokens.

Reports images/s, their ratio, the latency percentiles (p50 / p95) seen by the clients, the batch
sizes the server ran (from its debug log), and whether both servers gave the same captions.
"""

from __future__ import annotations

import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _common import build_blip, make_photos, parse_args, report, target

CLIENTS = 16
MAX_NEW_TOKENS = 20
BATCH_LOG = re.compile(r"^caption: (\d+) request\(s\) in (\d+) model pass")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: Path, max_batch_size: int, log: Path):
    """`blip -v ui` in its own process (debug logging gives one line per batch it runs)."""
    from gradio_client import Client

    port = free_port()
    command = [sys.executable, "-m", "blip_toolkit", "-v", "ui", "--model", str(model_dir), "--device", "cpu"]
    command += ["--port", str(port), "--max-batch-size", str(max_batch_size)]
    stderr = open(log, "w")  # noqa: SIM115 - closed with the process
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr)
    deadline = time.monotonic() + 180
    while True:
        try:
            client = Client(f"http://127.0.0.1:{port}/", verbose=False)
            break
        except Exception:  # noqa: BLE001 - not up yet
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"blip ui did not start:\n{log.read_text()}") from None
            time.sleep(0.5)
    return process, stderr, client


def caption(client, photo: Path) -> str:
    from gradio_client import handle_file

    return client.predict(
        handle_file(str(photo)), "", 1, MAX_NEW_TOKENS, False, 0.9, 1.0, api_name="/caption"
    )


def run_load(client, photos: list[Path], per_client: int):
    """CLIENTS threads, each sending `per_client` requests one after another (closed loop)."""
    latencies: list[float] = []
    captions: dict[tuple[int, int], str] = {}
    lock = threading.Lock()
    start_gate = threading.Barrier(CLIENTS)

    def client_loop(number: int) -> None:
        start_gate.wait()
        for k in range(per_client):
            photo = photos[(number * per_client + k) % len(photos)]
            begin = time.perf_counter()
            text = caption(client, photo)
            elapsed = time.perf_counter() - begin
            with lock:
                latencies.append(elapsed)
                captions[(number, k)] = text

    threads = [threading.Thread(target=client_loop, args=(n,)) for n in range(CLIENTS)]
    begin = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - begin, latencies, captions


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def measure(model_dir: Path, photos: list[Path], max_batch_size: int, per_client: int, tmp: Path) -> dict:
    log = tmp / f"server-{max_batch_size}.log"
    process, stderr, client = start_server(model_dir, max_batch_size, log)
    try:
        caption(client, photos[0])  # loads the model
        mark = len(log.read_text().splitlines())
        seconds, latencies, captions = run_load(client, photos, per_client)
    finally:
        process.terminate()
        process.wait(timeout=60)
        stderr.close()
    sizes = [int(m.group(1)) for line in log.read_text().splitlines()[mark:] if (m := BATCH_LOG.match(line))]
    requests = CLIENTS * per_client
    return {
        "row": {
            "server": f"--max-batch-size {max_batch_size}",
            "requests": requests,
            "images/s": requests / seconds,
            "seconds": seconds,
            "latency p50 (s)": percentile(latencies, 50),
            "latency p95 (s)": percentile(latencies, 95),
            "mean batch": statistics.mean(sizes) if sizes else float("nan"),
            "largest batch": max(sizes, default=0),
        },
        "captions": captions,
        "batches": sizes,
    }


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    per_client = 1 if args.quick else 2
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        photos_dir = tmp / "photos"
        photos_dir.mkdir()
        photos = make_photos(photos_dir, 32)
        model_dir = build_blip(tmp, "BlipForConditionalGeneration", args.quick)
        batched = measure(model_dir, photos, 8, per_client, tmp)
        single = measure(model_dir, photos, 1, per_client, tmp)

    ratio = batched["row"]["images/s"] / single["row"]["images/s"]
    same = batched["captions"] == single["captions"]
    report(
        "ui",
        [batched["row"], single["row"]],
        quick=args.quick,
        targets=[
            target("images/s, batched / batching off", ratio, ">= 1.2", ratio >= 1.2),
            target("captions identical with and without batching", float(same), "1", same),
            target(
                "requests really batched (largest batch)",
                batched["row"]["largest batch"],
                "> 1",
                batched["row"]["largest batch"] > 1,
            ),
        ],
        notes={
            "clients": CLIENTS,
            "requests per client": per_client,
            "model": "BLIP-base (default BlipConfig)" if not args.quick else "small BLIP (quick)",
            "batch sizes run (batched server)": batched["batches"],
        },
    )
    print(f"batched / batching off: {ratio:.2f}x; captions identical: {same}")
    print(f"batch sizes run by the batched server: {batched['batches']}")


if __name__ == "__main__":
    main()
