"""Fixtures of the pipeline tests: a local S3 (moto server mode, behind a fault-injecting proxy) and a
static HTTP server, both on 127.0.0.1 (tests/servers.py)."""

from __future__ import annotations

import pytest

from tests.servers import http_files, moto_s3


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    """A MotoS3 (tests/servers.py) for the module; the AWS environment points at its proxy meanwhile.
    Tests use `s3`, which switches the proxy off and allows every key again afterwards."""
    with moto_s3(tmp_path_factory.mktemp("aws")) as s3:
        yield s3


@pytest.fixture
def s3(s3_server):
    """The module's S3 server, with the proxy's faults and denied keys reset after the test."""
    yield s3_server
    s3_server.proxy.clear()
    s3_server.proxy.cut_targets.clear()
    s3_server.allow_all()


@pytest.fixture(scope="module")
def http_server(tmp_path_factory):
    """An HttpServer serving a fresh directory (`.root`) on http://127.0.0.1:<port> (`.url`)."""
    with http_files(tmp_path_factory.mktemp("www")) as server:
        yield server
