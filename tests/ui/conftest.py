"""One `blip ui` server for all UI tests (tiny checkpoints, a free port on 127.0.0.1), and the bad
inputs the page and the API must refuse with a readable message."""

from __future__ import annotations

import socket
import struct
import zlib
from pathlib import Path

import pytest

GRADIO_MISSING = "the ui extra is not installed (pip install 'blip-toolkit[ui]')"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def one_torch_thread():
    """Torch on one thread while the UI tests run: tiny models gain nothing from two, and on a
    shared machine two OpenMP threads competing for cores made each caption ~20x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def ui_server(tiny_models, one_torch_thread):
    """The app on a BLIP caption, a BLIP-2 (OPT) VQA and a BLIP ITM tiny checkpoint. The batcher
    waits 0.05 s for company after a first request, so concurrent test requests reliably batch."""
    pytest.importorskip("gradio", reason=GRADIO_MISSING)
    from blip_toolkit.models.spec import LoadSpec
    from blip_toolkit.ui.app import start
    from blip_toolkit.ui.service import InferenceService, ServiceConfig

    config = ServiceConfig(
        LoadSpec(model=str(tiny_models["blip-caption"]), device="cpu"),
        vqa_model=str(tiny_models["blip2-opt"]),
        retrieval_model=str(tiny_models["blip-itm"]),
        max_batch_size=8,
        batch_wait=0.05,
    )
    server = start(InferenceService(config), host="127.0.0.1", port=free_port())
    yield server
    server.close()


@pytest.fixture(scope="session")
def client(ui_server):
    from gradio_client import Client

    return Client(ui_server.url, verbose=False)


def png_bomb(path: Path, width: int = 100_000, height: int = 100_000) -> Path:
    """A valid PNG header claiming width x height pixels (10 G by default) with almost no data: the
    guard must refuse it from the header, before anything is decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)
    return path


@pytest.fixture(scope="session")
def bad_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bad-uploads")
    text = folder / "notes.jpg"
    text.write_text("this is a text file, not a JPEG\n")
    return {"text": text, "bomb": png_bomb(folder / "bomb.png")}
