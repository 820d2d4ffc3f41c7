"""`--engine ray` on a real local Ray cluster (`ray start --head` on 127.0.0.1 with 2 CPUs, started and
stopped by the module): the same records as the local engine for caption, vqa, retrieval and the same
shards for extract-embeddings; a bad image is an item's error (exit 3); a killed actor is restarted and
its chunk retried (no item missing or doubled); a killed driver resumes on Ray and locally, to the same
file; stdout holds results only."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from blip_toolkit.pipeline.journal import journal_files
from blip_toolkit.pipeline.outputs import read_output, run_directory

from ..launch import cpu_env
from ..servers import ray_head

pytest.importorskip("ray")

GEN = ["--max-new-tokens", "5", "--batch-size", "2"]
# Long beam-searched captions, one image a batch: slow enough to kill something in the middle.
SLOW = ["--max-new-tokens", "24", "--min-new-tokens", "24", "--num-beams", "2", "--batch-size", "1"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with ray_head(tmp_path_factory.mktemp("ray")) as head:
        yield head


def on_ray(cluster, actors: int = 2) -> list[str]:
    # Two actors of half a CPU each leave a CPU of the 2-CPU cluster to the read tasks.
    return [
        "--engine",
        "ray",
        "--ray-address",
        cluster.address,
        "--num-actors",
        str(actors),
        "--cpus-per-actor",
        "0.5",
    ]


@pytest.fixture
def photos(tmp_path, sample_images):
    root = tmp_path / "photos"
    root.mkdir()
    for image in sample_images:
        shutil.copy(image, root / image.name)
    (root / "zz-broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    return root


def test_caption_on_ray_equals_local_and_stdout_is_results_only(
    cli, tiny_models, photos, cluster, tmp_path, one_thread
):
    model = tiny_models["blip-caption"]
    local = cli("caption", photos, "-m", model, *GEN, "-f", "jsonl")
    ray = cli("caption", photos, "-m", model, *GEN, "-f", "jsonl", *on_ray(cluster))
    assert local.code == ray.code == 3, ray.stderr  # the broken image: an item's error, not a failed job
    assert f"on Ray at {cluster.address}: 2 model actor(s)" in ray.stderr
    assert [json.loads(line) for line in ray.stdout.splitlines()] == [
        json.loads(line) for line in local.stdout.splitlines()
    ]
    out = tmp_path / "ray.parquet"
    to_file = cli("caption", photos, "-m", model, *GEN, "--output", out, *on_ray(cluster))
    assert to_file.code == 3 and "1 of 9 image(s) failed" in to_file.stderr
    assert read_output(out) == [json.loads(line) for line in local.stdout.splitlines()]


def test_ray_paths_addresses_and_resources(
    cli, tiny_models, photos, cluster, tmp_path, monkeypatch, one_thread
):
    """Relative paths mean what they mean to the driver (its folder, on the actors and read tasks too);
    RAY_ADDRESS is the cluster when --ray-address is not given; an address nobody answers and an actor
    the cluster cannot place are one line each, at once."""
    model = tiny_models["blip-caption"]
    shutil.copytree(model, tmp_path / "model")
    monkeypatch.chdir(tmp_path)
    expected = cli("caption", "photos", "-m", "model", *GEN, "-f", "jsonl")
    monkeypatch.setenv("RAY_ADDRESS", cluster.address)
    relative = cli(
        "caption",
        "photos",
        "-m",
        "model",
        *GEN,
        "-f",
        "jsonl",
        "--engine",
        "ray",
        "--num-actors",
        "1",
        "--cpus-per-actor",
        "0.5",
    )
    assert relative.code == expected.code == 3, relative.stderr
    assert f"on Ray at {cluster.address}" in relative.stderr
    assert relative.stdout == expected.stdout

    import ray

    ray.shutdown()  # the checks below connect anew
    started = time.monotonic()
    nobody = cli("caption", "photos", "-m", "model", "--engine", "ray", "--ray-address", "127.0.0.1:9")
    assert (
        nobody.code == 1
        and "no Ray cluster answers there" in nobody.stderr
        and time.monotonic() - started < 60
    )
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")  # a dashboard URL, as Ray's job docs export
    dashboard = cli("caption", "photos", "-m", "model", "--engine", "ray")
    assert dashboard.code == 2 and "RAY_ADDRESS http://127.0.0.1:8265: a dashboard" in dashboard.stderr
    monkeypatch.delenv("RAY_ADDRESS")
    no_gpu = cli(
        "caption",
        "photos",
        "-m",
        "model",
        "--engine",
        "ray",
        "--ray-address",
        cluster.address,
        "--gpus-per-actor",
        "1",
    )
    assert no_gpu.code == 2 and "has 0 GPU(s)" in no_gpu.stderr


def test_without_ray_the_option_says_how_to_install_it(cli, tiny_models, photos, monkeypatch):
    import importlib

    real = importlib.import_module

    def no_ray(name, *args, **kwargs):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("No module named 'ray'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", no_ray)
    result = cli("caption", photos, "-m", tiny_models["blip-caption"], "--engine", "ray")
    assert result.code == 2 and "blip-toolkit[ray]" in result.stderr and "Traceback" not in result.stderr
    refused = cli("caption", photos, "-m", tiny_models["blip-caption"], "--num-actors", "2")
    assert refused.code == 2 and "--engine ray" in refused.stderr


@pytest.mark.e2e
def test_vqa_retrieval_and_extract_on_ray_equal_local(
    cli, tiny_models, photos, cluster, tmp_path, one_thread
):
    (photos / "zz-broken.jpg").unlink()
    vqa = ["vqa", photos, "--question", "what is this?", "-m", tiny_models["blip-vqa"], *GEN]
    assert cli(*vqa, "--output", tmp_path / "vqa-local.jsonl").code == 0
    on = cli(*vqa, "--output", tmp_path / "vqa-ray.jsonl", *on_ray(cluster))
    assert on.code == 0 and "on Ray at" in on.stderr
    assert read_output(tmp_path / "vqa-ray.jsonl") == read_output(tmp_path / "vqa-local.jsonl")

    texts = ["a photo of a cat", "a red car parked next to a tree", "a bowl of fruit on a table"]
    (tmp_path / "texts.txt").write_text("\n".join(texts))
    retrieval = [
        "retrieval",
        photos,
        "--texts-file",
        tmp_path / "texts.txt",
        "-m",
        tiny_models["blip-itm"],
        "--batch-size",
        "2",
    ]
    assert cli(*retrieval, "--output", tmp_path / "r-local.jsonl").code == 0
    on = cli(*retrieval, "--output", tmp_path / "r-ray.jsonl", *on_ray(cluster))
    assert on.code == 0 and "on Ray at" in on.stderr
    assert read_output(tmp_path / "r-ray.jsonl") == read_output(tmp_path / "r-local.jsonl")

    extract = [
        "extract-embeddings", photos, "--cond-encoder", tiny_models["blip2-opt"], "--target-encoder",
        tiny_models["clip"], "--shard-size", "3", "--batch-size", "2", "--num-workers", "0",
    ]  # fmt: skip
    assert cli(*extract, "--out", tmp_path / "emb-local").code == 0
    on = cli(*extract, "--out", tmp_path / "emb-ray", *on_ray(cluster))
    assert on.code == 0 and "on Ray at" in on.stderr, on.stderr
    local_files = sorted(p.name for p in (tmp_path / "emb-local").iterdir())
    assert local_files == sorted(p.name for p in (tmp_path / "emb-ray").iterdir())
    for name in local_files:
        if name.endswith((".safetensors", ".jsonl")) or name == "index.json":
            assert (tmp_path / "emb-ray" / name).read_bytes() == (
                tmp_path / "emb-local" / name
            ).read_bytes(), name


def _records(run_dir: Path) -> int:
    return sum(
        line.startswith(b'{"pos"')
        for f in journal_files(run_dir)
        for line in f.read_bytes().split(b"\n")[:-1]
    )


def _start(args: list, out: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "blip_toolkit", *map(str, args), "--output", str(out)]
    return subprocess.Popen(command, env=cpu_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _wait_for(process: subprocess.Popen, run_dir: Path, records: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while _records(run_dir) < records:
        assert process.poll() is None, process.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.02)


@pytest.fixture
def many_photos(tmp_path, sample_images):
    """24 images (the samples three times)."""
    root = tmp_path / "many"
    root.mkdir()
    for copy in range(3):
        for image in sample_images:
            shutil.copy(image, root / f"{copy}-{image.name}")
    return root


@pytest.mark.e2e
def test_a_killed_actor_is_replaced_and_nothing_is_lost(
    cli, tiny_models, many_photos, cluster, tmp_path, one_thread
):
    args = ["caption", many_photos, "-m", tiny_models["blip-caption"], *SLOW]
    reference = tmp_path / "reference.jsonl"
    assert cli(*args, "--output", reference).code == 0
    expected = read_output(reference)
    for trial, kill_at in enumerate((2, 8, 14)):
        out = tmp_path / f"actor-{trial}.jsonl"
        process = _start([*args, *on_ray(cluster)], out)
        try:
            _wait_for(process, run_directory(out), kill_at)
            pids = cluster.actor_pids()
            assert pids, "no model actor found"
            os.kill(pids[0], signal.SIGKILL)
            assert process.wait(timeout=300) == 0, process.stderr.read().decode()[-3000:]
        finally:
            if process.poll() is None:
                process.kill()
        assert read_output(out) == expected, trial  # none missing, none doubled, in input order


@pytest.mark.e2e
def test_a_killed_driver_resumes_on_ray_and_locally(
    cli, tiny_models, tmp_path, sample_images, cluster, one_thread
):
    root = tmp_path / "photos"
    root.mkdir()
    for copy in range(8):  # 64 images, one actor: the run lasts long enough to be killed in the middle
        for image in sample_images:
            shutil.copy(image, root / f"{copy}-{image.name}")
    args = ["caption", root, "-m", tiny_models["blip-caption"], *SLOW]
    reference = tmp_path / "reference.jsonl"
    assert cli(*args, "--output", reference).code == 0
    expected = read_output(reference)
    # Killed on Ray, resumed on Ray; then killed on Ray, resumed locally; then killed locally, resumed on Ray.
    plans = [(on_ray(cluster, 1), on_ray(cluster)), (on_ray(cluster, 1), []), ([], on_ray(cluster))]
    for trial, (first, then) in enumerate(plans):
        out = tmp_path / f"driver-{trial}.jsonl"
        process = _start([*args, *first], out)
        try:
            _wait_for(process, run_directory(out), 3 + 4 * trial)
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait()
        done = _records(run_directory(out))
        assert not out.exists() and done < len(expected), (trial, done)
        resumed = cli(*args, "--output", out, "--resume", *then)
        assert resumed.code == 0, resumed.stderr
        assert f"{done} from earlier runs" in resumed.stderr
        assert read_output(out) == expected, trial
