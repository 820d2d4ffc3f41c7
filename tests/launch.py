"""Running `blip` in fresh processes: one plain process, or N CPU processes under `accelerate launch`
(gloo). Shared by the distributed tests of finetune, extract-embeddings and train-dit."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

ACCELERATE = Path(sys.executable).with_name("accelerate")


def cpu_env() -> dict[str, str]:
    """The environment of a multi-process CPU run. ACCELERATE_USE_CPU with --multi_gpu starts N gloo
    processes (`--cpu --num_processes 2` starts one); one thread each, as torchrun gives every rank."""
    return {
        **os.environ,
        "ACCELERATE_USE_CPU": "1",
        "GLOO_SOCKET_IFNAME": "lo",
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_command(processes: int) -> list[str]:
    """`accelerate launch` for `processes` CPU processes; append `-m blip_toolkit ...` or a script."""
    return [
        str(ACCELERATE),
        "launch",
        "--multi_gpu",
        "--num_processes",
        str(processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
    ]


def run_blip(*args, processes: int = 1, timeout: int = 300) -> subprocess.CompletedProcess:
    """`blip ARGS...` in 1 plain process or `processes` launched ones, with `cpu_env()`."""
    module = ["-m", "blip_toolkit", *map(str, args)]
    command = [sys.executable, *module] if processes == 1 else [*launch_command(processes), *module]
    return subprocess.run(command, capture_output=True, text=True, env=cpu_env(), timeout=timeout)


def run_script(script, *args, processes: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    """A Python script under `accelerate launch` with `processes` CPU processes."""
    command = [*launch_command(processes), str(script), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=cpu_env(), timeout=timeout)
