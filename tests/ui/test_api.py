"""The API (through gradio_client, as the README shows it) gives what the CLI gives for the same
checkpoint, image and options; concurrent requests give the same answers as sequential ones and
really run as batches; `blip ui` itself serves on 127.0.0.1 with and without --auth."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.ui.conftest import GRADIO_MISSING, free_port

QUESTIONS = ["what is this?", "is it red?", "how many things are in the picture?", "where?"]
TEXTS = ["a photo of a cat", "an astronaut in space", "a cup of coffee", "grass"]


def _file(path):
    from gradio_client import handle_file

    return handle_file(str(path))


def cli_json(cli, *args) -> list[dict]:
    result = cli(*args, "--format", "json", "--device", "cpu")
    assert result.code == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"num_beams": 3, "max_new_tokens": 12},
        {"prompt": "a picture of", "max_new_tokens": 8},
    ],
    ids=["greedy", "beams", "prompt"],
)
def test_caption_equals_blip_caption(client, cli, tiny_models, sample_images, options):
    flags = []
    if "num_beams" in options:
        flags += ["--num-beams", str(options["num_beams"])]
    if "max_new_tokens" in options:
        flags += ["--max-new-tokens", str(options["max_new_tokens"])]
    if "prompt" in options:
        flags += ["--prompt", options["prompt"]]
    images = sample_images[:2]
    expected = cli_json(cli, "caption", *map(str, images), "--model", tiny_models["blip-caption"], *flags)
    got = [client.predict(_file(p), **options, api_name="/caption") for p in images]
    assert got == [r["caption"] for r in expected]
    assert all(got)


def test_vqa_equals_blip_vqa(client, cli, tiny_models, sample_images):
    image = sample_images[0]
    for question in QUESTIONS[:2]:
        expected = cli_json(cli, "vqa", str(image), question, "--model", tiny_models["blip2-opt"])
        assert client.predict(_file(image), question, api_name="/vqa") == expected[0]["answer"]


def test_retrieval_equals_blip_retrieval(client, cli, tiny_models, sample_images):
    image = sample_images[1]
    expected = cli_json(cli, "retrieval", str(image), *TEXTS, "--model", tiny_models["blip-itm"])[0][
        "results"
    ]
    table = client.predict(_file(image), "\n".join(TEXTS), "auto", api_name="/retrieval")
    assert table["headers"] == ["rank", "text", "score", "probability"]
    rows = table["data"]
    assert [(r[0], r[1]) for r in rows] == [(e["rank"], e["text"]) for e in expected]
    assert [r[2] for r in rows] == pytest.approx([e["score"] for e in expected], rel=1e-5, abs=1e-6)
    assert [r[3] for r in rows] == pytest.approx([e["probability"] for e in expected], rel=1e-5, abs=1e-6)
    assert sum(r[3] for r in rows) == pytest.approx(1.0)


def test_concurrent_requests_are_batched_and_equal_sequential_ones(client, ui_server, sample_images):
    service = ui_server.service
    images = [sample_images[i % len(sample_images)] for i in range(16)]
    sequential = [client.predict(_file(p), max_new_tokens=12, api_name="/caption") for p in images]
    service.calls.clear()
    jobs = [client.submit(_file(p), max_new_tokens=12, api_name="/caption") for p in images]
    concurrent = [job.result(timeout=120) for job in jobs]
    assert concurrent == sequential
    calls = [c for c in service.calls if c.task == "caption"]
    assert sum(c.requests for c in calls) == 16
    assert service.max_batch("caption") > 1, calls
    # A batch of requests with equal options is one model pass (one generate call).
    assert all(c.model_runs == 1 for c in calls), calls
    assert max(c.requests for c in calls) <= service.config.max_batch_size

    # VQA: questions of different token lengths batch by length; answers stay the same.
    pairs = [(sample_images[i % 3], QUESTIONS[i % len(QUESTIONS)]) for i in range(8)]
    sequential = [client.predict(_file(p), q, api_name="/vqa") for p, q in pairs]
    jobs = [client.submit(_file(p), q, api_name="/vqa") for p, q in pairs]
    assert [job.result(timeout=120) for job in jobs] == sequential
    assert service.max_batch("vqa") > 1


def test_server_listens_on_loopback_only(ui_server):
    port = int(ui_server.url.rstrip("/").rsplit(":", 1)[1])
    assert _listening_addresses(port) == {"127.0.0.1"}


def _listening_addresses(port: int) -> set[str]:
    """Addresses with a socket in LISTEN state on `port`, from /proc/net/tcp{,6}."""
    found = set()
    for name in ("tcp", "tcp6"):
        table = Path(f"/proc/net/{name}")
        if not table.exists():
            continue
        for line in table.read_text().splitlines()[1:]:
            fields = line.split()
            address, hex_port = fields[1].split(":")
            if int(hex_port, 16) == port and fields[3] == "0A":
                raw = bytes.fromhex(address)
                if len(raw) == 4:
                    found.add(".".join(str(b) for b in reversed(raw)))
                else:
                    found.add(raw.hex())
    return found


def test_no_auth_warns(tiny_models, caplog):
    pytest.importorskip("gradio", reason=GRADIO_MISSING)
    from blip_toolkit.models.spec import LoadSpec
    from blip_toolkit.ui.app import start
    from blip_toolkit.ui.service import InferenceService, ServiceConfig

    caplog.set_level("WARNING", logger="blip")
    server = start(
        InferenceService(ServiceConfig(LoadSpec(model=str(tiny_models["blip-caption"])))), port=free_port()
    )
    server.close()
    assert any("no authentication" in r.getMessage() for r in caplog.records)


def test_blip_ui_command_serves_with_auth(cli, tiny_models, sample_images, one_torch_thread):
    """The real command (in a thread; it serves until its app is closed): --auth is required by the
    API, the caption is the library's, it listens on 127.0.0.1 only, gives no "no authentication"
    warning, prints nothing on stdout, and exits 0 when the app stops."""
    gr = pytest.importorskip("gradio", reason=GRADIO_MISSING)
    from gradio_client import Client

    from blip_toolkit.data.images import InputItem
    from blip_toolkit.jobs.predict import caption_images
    from blip_toolkit.models.loading import open_runner
    from blip_toolkit.predictors.options import CaptionOptions

    port = free_port()
    args = ["ui", "--model", str(tiny_models["blip-caption"]), "--port", str(port)]
    args += ["--auth", "alice:s3cret", "--max-batch-size", "4", "--device", "cpu"]
    results = []
    command = threading.Thread(target=lambda: results.append(cli(*args)))
    command.start()
    url = f"http://127.0.0.1:{port}/"
    try:
        client = _wait_for(lambda: Client(url, auth=("alice", "s3cret"), verbose=False), command)
        got = client.predict(_file(sample_images[0]), api_name="/caption")
        runner = open_runner(str(tiny_models["blip-caption"]), "caption", device="cpu")
        expected = next(caption_images(runner, [InputItem(str(sample_images[0]))], CaptionOptions()))
        assert got == expected["caption"]
        with pytest.raises(ValueError, match="login"):
            Client(url, verbose=False)
        assert _listening_addresses(port) == {"127.0.0.1"}
    finally:
        for demo in gr.Blocks.get_instances():
            if demo.is_running and demo.server_port == port:
                demo.close()  # what Ctrl-C does: the command's wait ends, it closes the app
        command.join(timeout=60)
    (result,) = results
    assert result.code == 0
    assert result.stdout == ""
    assert f"serving on http://127.0.0.1:{port}/" in result.stderr
    assert "no authentication" not in result.stderr
    assert "Traceback" not in result.stderr


def _wait_for(connect, command, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            return connect()
        except Exception:
            if not command.is_alive() or time.monotonic() > deadline:
                raise AssertionError("blip ui did not start") from None
            time.sleep(0.2)


def test_missing_gradio_is_one_line(cli, monkeypatch):
    monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` now fails as when not installed
    monkeypatch.delitem(sys.modules, "blip_toolkit.ui.app", raising=False)
    result = cli("ui", "--port", str(free_port()))
    assert result.code == 1
    assert result.stderr.strip().splitlines() == [
        "error: blip ui needs the ui extra: pip install 'blip-toolkit[ui]'"
    ]


def test_bad_auth_is_a_usage_error(cli):
    pytest.importorskip("gradio", reason=GRADIO_MISSING)
    result = cli("ui", "--auth", "alice", "--port", str(free_port()))
    assert result.code == 2
    assert result.stderr.strip() == "error: --auth must be user:password (both non-empty)"


def test_a_busy_port_is_one_line(cli, tiny_models):
    pytest.importorskip("gradio", reason=GRADIO_MISSING)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = cli("ui", "--model", str(tiny_models["blip-caption"]), "--port", str(port))
    assert result.code == 1
    assert result.stderr.strip().splitlines() == [
        f"error: cannot listen on 127.0.0.1:{port}: the port is in use or the address is not this "
        "machine's (choose another --port or --host)"
    ]


def test_help_does_not_import_gradio():
    code = (
        "import sys; from blip_toolkit.cli.main import main; main(['--help']); print('gradio' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "False"
    assert " ui " in out


def test_plain_http_as_the_readme_shows(ui_server, client, sample_images):
    """The curl calls of the README (upload, then call, then read the event stream) over httpx."""
    import httpx

    base = ui_server.url
    image = sample_images[4]
    with open(image, "rb") as f:
        uploaded = httpx.post(f"{base}gradio_api/upload", files={"files": f}).json()[0]
    data = [{"path": uploaded, "meta": {"_type": "gradio.FileData"}}, "", 1, 30, False, 0.9, 1.0]
    event = httpx.post(f"{base}gradio_api/call/caption", json={"data": data}).json()["event_id"]
    stream = httpx.get(f"{base}gradio_api/call/caption/{event}", timeout=60).text
    assert stream.splitlines()[0] == "event: complete"
    assert json.loads(stream.splitlines()[1].removeprefix("data: ")) == [
        client.predict(_file(image), api_name="/caption")
    ]
    # A refusal arrives as an error event with the one-line message.
    data = [{"path": uploaded, "meta": {"_type": "gradio.FileData"}}, "", 1, 10]
    event = httpx.post(f"{base}gradio_api/call/vqa", json={"data": data}).json()["event_id"]
    stream = httpx.get(f"{base}gradio_api/call/vqa/{event}", timeout=60).text
    assert stream.splitlines()[0] == "event: error"
    assert json.loads(stream.splitlines()[1].removeprefix("data: "))["error"] == "the question is empty"
