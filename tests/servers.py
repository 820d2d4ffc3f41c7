"""Real servers on 127.0.0.1 for tests of remote inputs and outputs: a local S3 (moto's server mode)
behind a fault-injecting TCP proxy, and a static HTTP server with Range requests.

    with moto_s3() as s3:            # env set for s3fs / botocore; restored afterwards
        bucket = s3.create_bucket()
        url = s3.upload(bucket, "a.tar", data)        # "s3://<bucket>/a.tar"
        s3.proxy.cut(r"/a\\.tar", after=4096)          # every GET of a.tar is reset after 4 KiB
        s3.deny(bucket, "a.tar")                      # IAM now answers 403 AccessDenied for that key

Everything binds to 127.0.0.1 on a port the kernel picks (port 0): a server is listening before its
context is entered, so no test waits or sleeps for one. Clients reach moto only through the proxy
(the endpoint in the environment is the proxy's), so any request of any process started by a test can
be cut.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import logging
import mimetypes
import os
import queue
import re
import secrets
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

LOOPBACK = "127.0.0.1"
REGION = "us-east-1"


def wait_for_port(host: str, port: int, timeout: float = 10.0) -> None:
    """Return once something accepts TCP connections on host:port (retried connects, bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            threading.Event().wait(0.02)


@contextlib.contextmanager
def patched_environ(values: dict[str, str | None]) -> Iterator[None]:
    """Set (or, for None, remove) environment variables; restore every one of them afterwards."""
    saved = {name: os.environ.get(name) for name in values}
    try:
        for name, value in values.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


# ----------------------------------------------------------------------------- the fault-injecting proxy


class _Stream:
    """Buffered reads from a socket. Not socket.makefile: a file object keeps the descriptor open after
    socket.close(), and the proxy must be able to drop a connection at once."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buffer = bytearray()

    def _fill(self) -> bool:
        data = self.sock.recv(1 << 16)
        if not data:
            return False
        self.buffer += data
        return True

    def head(self) -> bytes:
        """The next message head (start line + headers + blank line); b"" at a clean end of stream."""
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end >= 0:
                head = bytes(self.buffer[: end + 4])
                del self.buffer[: end + 4]
                return head
            if not self._fill():
                if self.buffer:
                    raise ConnectionError("end of stream inside a message head")
                return b""

    def line(self) -> bytes:
        while (end := self.buffer.find(b"\r\n")) < 0:
            if not self._fill():
                raise ConnectionError("end of stream inside a line")
        line = bytes(self.buffer[: end + 2])
        del self.buffer[: end + 2]
        return line

    def copy(self, count: int, send: Callable[[bytes], object]) -> None:
        while count > 0:
            if not self.buffer and not self._fill():
                raise ConnectionError("end of stream inside a body")
            chunk = bytes(self.buffer[:count])
            del self.buffer[: len(chunk)]
            send(chunk)
            count -= len(chunk)

    def copy_chunked(self, send: Callable[[bytes], object]) -> None:
        while True:
            line = self.line()
            send(line)
            if int(line.split(b";")[0].strip(), 16) == 0:
                while (trailer := self.line()) != b"\r\n":
                    send(trailer)
                send(trailer)
                return
            self.copy(int(line.split(b";")[0].strip(), 16) + 2, send)

    def copy_to_end(self, send: Callable[[bytes], object]) -> None:
        while self.buffer or self._fill():
            send(bytes(self.buffer))
            self.buffer.clear()


def _parse_head(head: bytes) -> tuple[list[str], dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    return lines[0].split(" ", 2), headers


@dataclass
class _CutRule:
    pattern: re.Pattern
    after: int
    method: str | None
    times: int | None  # None: every matching response while the rule is on


@dataclass
class FlakyProxy:
    """A TCP proxy on 127.0.0.1 in front of an HTTP/1.1 server that can cut responses half way.

    Bytes pass through unchanged (so SigV4 signatures stay valid); the proxy only follows the HTTP
    framing of both directions (Content-Length, chunked, 100-continue, keep-alive) to know which
    request each response answers. `cut(pattern, after=N)` makes every response to a request whose
    target (path and query) matches `pattern` stop after N bytes of its body, and the connection to
    the client is reset (RST), as when a network path dies mid-transfer. Only responses with more than
    N body bytes are cut. `times=k` cuts only the next k such responses (a transient blip);
    `clear()` switches every rule off. `cut_targets` lists the request targets cut so far.
    """

    upstream: tuple[str, int]
    port: int = 0
    cut_targets: list[str] = field(default_factory=list)
    _rules: list[_CutRule] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _listener: socket.socket | None = None
    _threads: list[threading.Thread] = field(default_factory=list)
    _sockets: set[socket.socket] = field(default_factory=set)
    _stopping: threading.Event = field(default_factory=threading.Event)

    @property
    def endpoint(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def start(self) -> FlakyProxy:
        listener = socket.create_server((LOOPBACK, 0))
        listener.settimeout(0.1)  # the accept loop checks for stop() this often
        self._listener = listener
        self.port = listener.getsockname()[1]
        thread = threading.Thread(target=self._accept_loop, name="flaky-proxy", daemon=True)
        thread.start()
        self._threads.append(thread)
        return self

    def stop(self) -> None:
        self._stopping.set()
        with self._lock:
            live = list(self._sockets)
        for sock in live:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in list(self._threads):
            thread.join(timeout=5)
        if self._listener is not None:
            self._listener.close()

    def cut(self, pattern: str, *, after: int, method: str | None = "GET", times: int | None = None) -> None:
        """Cut the responses to requests matching `pattern` (re.search on the request target) after
        `after` body bytes; `method=None` matches every method."""
        with self._lock:
            self._rules.append(_CutRule(re.compile(pattern), after, method, times))

    def clear(self) -> None:
        with self._lock:
            self._rules.clear()

    @property
    def cut_count(self) -> int:
        with self._lock:
            return len(self.cut_targets)

    # -- internals

    def _take_rule(self, method: str, target: str, length: int | None) -> _CutRule | None:
        with self._lock:
            for rule in self._rules:
                if rule.method not in (None, method) or not rule.pattern.search(target):
                    continue
                if length is not None and length <= rule.after:
                    continue
                if rule.times is not None:
                    if rule.times <= 0:
                        continue
                    rule.times -= 1
                self.cut_targets.append(target)
                return rule
        return None

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            thread = threading.Thread(target=self._serve, args=(client,), daemon=True)
            thread.start()
            with self._lock:
                self._threads[:] = [t for t in self._threads if t.is_alive()]
                self._threads.append(thread)

    def _track(self, *socks: socket.socket) -> None:
        with self._lock:
            self._sockets.update(socks)

    def _untrack(self, *socks: socket.socket) -> None:
        with self._lock:
            self._sockets.difference_update(socks)

    def _serve(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.upstream)
        except OSError:
            client.close()
            return
        self._track(client, upstream)
        pending: queue.Queue[tuple[str, str]] = queue.Queue()
        requests = threading.Thread(
            target=self._relay_requests, args=(client, upstream, pending), daemon=True
        )
        requests.start()
        aborted = False
        try:
            aborted = self._relay_responses(client, upstream, pending)
        except (OSError, ValueError, queue.Empty):
            pass
        finally:
            if not aborted:
                for sock in (client, upstream):
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)
                    sock.close()
            requests.join(timeout=5)
            self._untrack(client, upstream)

    @staticmethod
    def _relay_requests(client: socket.socket, upstream: socket.socket, pending: queue.Queue) -> None:
        source = _Stream(client)
        try:
            while head := source.head():
                (method, target, *_), headers = _parse_head(head)
                pending.put((method, target))  # before forwarding: its response cannot come earlier
                upstream.sendall(head)
                if "chunked" in headers.get("transfer-encoding", "").lower():
                    source.copy_chunked(upstream.sendall)
                elif int(headers.get("content-length", "0") or 0) > 0:
                    source.copy(int(headers["content-length"]), upstream.sendall)
        except (OSError, ValueError):
            pass
        finally:
            with contextlib.suppress(OSError):
                upstream.shutdown(socket.SHUT_WR)

    def _relay_responses(self, client: socket.socket, upstream: socket.socket, pending: queue.Queue) -> bool:
        """Forward responses in order; True when the connection was cut (both sockets closed)."""
        source = _Stream(upstream)
        while head := source.head():
            (_, status, *_), headers = _parse_head(head)
            client.sendall(head)
            if 100 <= int(status) < 200:  # 100 Continue: the final response follows
                continue
            method, target = pending.get(timeout=30)
            if method == "HEAD" or int(status) in (204, 304):
                continue
            chunked = "chunked" in headers.get("transfer-encoding", "").lower()
            length = None if chunked or "content-length" not in headers else int(headers["content-length"])
            rule = self._take_rule(method, target, length)
            if rule is not None:
                source.copy(rule.after, client.sendall)
                self._reset(client, upstream)
                return True
            if chunked:
                source.copy_chunked(client.sendall)
            elif length is not None:
                source.copy(length, client.sendall)
            else:
                source.copy_to_end(client.sendall)
                return False
        return False

    def _reset(self, client: socket.socket, upstream: socket.socket) -> None:
        # SHUT_RD wakes the request relay blocked in recv on this socket without sending anything;
        # SO_LINGER 0 makes close() send RST, as a dead network path would.
        with contextlib.suppress(OSError):
            client.shutdown(socket.SHUT_RD)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()
        with contextlib.suppress(OSError):
            upstream.shutdown(socket.SHUT_RDWR)
        upstream.close()


# ----------------------------------------------------------------------------- S3 (moto server mode)


def _clear_fsspec_s3_cache() -> None:
    """s3fs caches file-system instances (and their clients, endpoint included) per arguments, not per
    environment: a cached instance would keep talking to a server that is gone."""
    with contextlib.suppress(ImportError):
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()


@dataclass
class MotoS3:
    """A running moto S3 server, the proxy in front of it, and helpers. Access is checked by moto's IAM
    emulation: requests are signed with the access key of an IAM user whose policy allows everything,
    except the keys passed to `deny` (an explicit Deny, answered with a real 403 AccessDenied)."""

    moto_endpoint: str
    proxy: FlakyProxy
    access_key_id: str
    secret_access_key: str
    env: dict[str, str | None]
    client: object  # boto3 S3 client, straight to moto (not through the proxy)
    iam: object  # boto3 IAM client, straight to moto
    user: str = "blip-tests"
    _denied: set[str] = field(default_factory=set)
    _counter: itertools.count = field(default_factory=itertools.count)

    @property
    def endpoint(self) -> str:
        """The endpoint clients use (the proxy's), also in AWS_ENDPOINT_URL_S3."""
        return self.proxy.endpoint

    def create_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a fresh unique name when none is given) and return its name."""
        name = name or f"blip-test-{os.getpid()}-{next(self._counter)}"
        self.client.create_bucket(Bucket=name)
        return name

    def upload(self, bucket: str, key: str, data: bytes | str | Path) -> str:
        """Put an object (bytes, or the content of a local file) and return its s3:// URL."""
        body = Path(data).read_bytes() if isinstance(data, str | Path) else data
        self.client.put_object(Bucket=bucket, Key=key, Body=body)
        return f"s3://{bucket}/{key}"

    def upload_tree(self, bucket: str, prefix: str, folder: Path) -> list[str]:
        """Upload every file under a local folder to bucket/prefix/<relative path>; sorted URLs."""
        urls = []
        for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
            key = f"{prefix.rstrip('/')}/{path.relative_to(folder).as_posix()}".lstrip("/")
            urls.append(self.upload(bucket, key, path))
        return urls

    def get(self, bucket: str, key: str) -> bytes | None:
        """The object's bytes, None when it does not exist."""
        try:
            return self.client.get_object(Bucket=bucket, Key=key)["Body"].read()
        except self.client.exceptions.NoSuchKey:
            return None

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))

    def delete(self, bucket: str, key: str) -> None:
        self.client.delete_object(Bucket=bucket, Key=key)

    def deny(self, bucket: str, key: str) -> None:
        """From now on every request of the test user on bucket/key is refused (403 AccessDenied)."""
        self._denied.add(f"arn:aws:s3:::{bucket}/{key}")
        self._write_policy()

    def allow_all(self) -> None:
        self._denied.clear()
        self._write_policy()

    def _write_policy(self) -> None:
        statements = [{"Effect": "Allow", "Action": ["s3:*", "iam:*"], "Resource": "*"}]
        if self._denied:
            statements.append({"Effect": "Deny", "Action": "s3:*", "Resource": sorted(self._denied)})
        document = json.dumps({"Version": "2012-10-17", "Statement": statements})
        self.iam.put_user_policy(UserName=self.user, PolicyName="tests", PolicyDocument=document)


@contextlib.contextmanager
def moto_s3(scratch: Path) -> Iterator[MotoS3]:
    """Start moto's S3 server and the proxy on 127.0.0.1, set the environment s3fs / botocore read
    (see ENVIRONMENT below), yield a MotoS3, then stop everything and restore the environment.

    `scratch` is a directory for the empty AWS config files (the user's ~/.aws is never read)."""
    import boto3
    import requests
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address=LOOPBACK, port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    moto_endpoint = f"http://{host}:{port}"
    proxy = None
    try:
        wait_for_port(host, port)
        # moto keeps its state in module globals, shared by every server of this process: start clean,
        # with authentication off while the IAM user is created.
        requests.post(f"{moto_endpoint}/moto-api/reset", timeout=10).raise_for_status()
        requests.post(f"{moto_endpoint}/moto-api/reset-auth", data=b"inf", timeout=10).raise_for_status()
        bootstrap = {"aws_access_key_id": "bootstrap", "aws_secret_access_key": "bootstrap"}
        iam = boto3.client("iam", endpoint_url=moto_endpoint, region_name=REGION, **bootstrap)
        iam.create_user(UserName="blip-tests")
        key = iam.create_access_key(UserName="blip-tests")["AccessKey"]
        credentials = {
            "aws_access_key_id": key["AccessKeyId"],
            "aws_secret_access_key": key["SecretAccessKey"],
        }
        proxy = FlakyProxy(upstream=(host, port)).start()
        scratch.mkdir(parents=True, exist_ok=True)
        no_proxy = ",".join(filter(None, [os.environ.get("NO_PROXY"), LOOPBACK, "localhost"]))
        env: dict[str, str | None] = {
            "AWS_ENDPOINT_URL_S3": proxy.endpoint,
            "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
            "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
            "AWS_DEFAULT_REGION": REGION,
            "AWS_REGION": REGION,
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": str(scratch / "aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(scratch / "aws-credentials"),
            "NO_PROXY": no_proxy,
            "no_proxy": no_proxy,
            "AWS_PROFILE": None,
            "AWS_DEFAULT_PROFILE": None,
            "AWS_SESSION_TOKEN": None,
            "AWS_SECURITY_TOKEN": None,
            "AWS_ENDPOINT_URL": None,
        }
        s3 = MotoS3(
            moto_endpoint=moto_endpoint,
            proxy=proxy,
            access_key_id=key["AccessKeyId"],
            secret_access_key=key["SecretAccessKey"],
            env=env,
            client=boto3.client("s3", endpoint_url=moto_endpoint, region_name=REGION, **credentials),
            iam=boto3.client("iam", endpoint_url=moto_endpoint, region_name=REGION, **credentials),
        )
        s3.allow_all()
        # From here on moto checks every signature and the user's policy.
        requests.post(f"{moto_endpoint}/moto-api/reset-auth", data=b"0", timeout=10).raise_for_status()
        with patched_environ(env):
            _clear_fsspec_s3_cache()
            try:
                yield s3
            finally:
                _clear_fsspec_s3_cache()
    finally:
        with contextlib.suppress(Exception):
            requests.post(f"{moto_endpoint}/moto-api/reset-auth", data=b"inf", timeout=10)
            requests.post(f"{moto_endpoint}/moto-api/reset", timeout=10)
        if proxy is not None:
            proxy.stop()
        server.stop()


# ----------------------------------------------------------------------------- static HTTP


class _RangeRequestHandler(SimpleHTTPRequestHandler):
    """http.server's static files plus single-range requests (fsspec's HTTP files read by range and
    refuse a server that answers a range request with the whole file)."""

    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        pass

    def send_head(self):
        self._range_left = None
        header = self.headers.get("Range")
        path = self.translate_path(self.path)
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", header.strip()) if header else None
        if match is None or not os.path.isfile(path) or match.group(1) == match.group(2) == "":
            return super().send_head()
        size = os.path.getsize(path)
        if match.group(1) == "":
            start, end = max(0, size - int(match.group(2))), size - 1
        else:
            start = int(match.group(1))
            end = min(int(match.group(2)), size - 1) if match.group(2) else size - 1
        if start >= size or start > end:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{size}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        handle = open(path, "rb")  # noqa: SIM115 - closed by the base class after copyfile
        handle.seek(start)
        self.send_response(206)
        self.send_header("Content-Type", mimetypes.guess_type(path)[0] or "application/octet-stream")
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        self._range_left = end - start + 1
        return handle

    def copyfile(self, source, outputfile):
        if self._range_left is None:
            return super().copyfile(source, outputfile)
        left = self._range_left
        while left > 0:
            chunk = source.read(min(left, 1 << 16))
            if not chunk:
                break
            outputfile.write(chunk)
            left -= len(chunk)


@dataclass
class HttpServer:
    root: Path
    url: str  # http://127.0.0.1:<port>

    def url_for(self, name: str) -> str:
        return f"{self.url}/{name}"


@contextlib.contextmanager
def http_files(root: Path) -> Iterator[HttpServer]:
    """Serve the files under `root` on http://127.0.0.1:<free port> (GET, HEAD, single Range)."""
    root.mkdir(parents=True, exist_ok=True)
    handler = functools.partial(_RangeRequestHandler, directory=str(root))
    server = ThreadingHTTPServer((LOOPBACK, 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="http-files", daemon=True)
    thread.start()
    try:
        yield HttpServer(root=root, url=f"http://{LOOPBACK}:{server.server_address[1]}")
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


# ----------------------------------------------------------------------------------- a Ray cluster


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RayCluster:
    """A local Ray head started with `ray start` on 127.0.0.1 (`address`), for the --engine ray tests."""

    def __init__(self, address: str, temp_dir: Path):
        self.address, self.temp_dir = address, temp_dir

    def actor_pids(self, class_fragment: str = "ModelActor") -> list[int]:
        """The PIDs of the live actors whose class name contains `class_fragment`: Ray titles an
        actor's process `ray::<class>...` (the state API would need the dashboard)."""
        import psutil

        pids = []
        for process in psutil.process_iter(["pid", "cmdline"]):
            title = " ".join(process.info["cmdline"] or [])
            if title.startswith("ray::") and class_fragment in title:
                pids.append(process.info["pid"])
        return sorted(pids)


def ray_token() -> dict[str, str | None]:
    """This process's Ray token (Ray's token authentication), made once: ~/.ray/auth_token is shared
    by every Ray started on the machine and another one may replace it while ours runs. Ray reads it
    when imported, so the processes that use it set it first (tests/conftest.py, bench/bench_ray.py)."""
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
    return {
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": os.environ["RAY_AUTH_TOKEN"],
        "RAY_AUTH_TOKEN_PATH": None,
    }


@contextlib.contextmanager
def ray_head(scratch: Path, *, num_cpus: int = 2) -> Iterator[RayCluster]:
    """`ray start --head` with `num_cpus` CPUs, every Ray server on 127.0.0.1 (Ray's single-machine
    mode, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: without it the GCS and the raylet listen on every
    interface and the driver reaches the GCS through the host's own address), for this process and
    the drivers it starts. At the end the driver here is shut down and the head's processes (found by
    its temp dir) and their workers are stopped: not `ray stop`, which stops every Ray on the machine."""
    ray_bin = Path(sys.executable).with_name("ray")
    port = _free_port()
    temp_dir = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # Ray's socket paths must stay short
    quiet = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", **ray_token()}
    with patched_environ(quiet):
        command = [
            str(ray_bin), "start", "--head", "--port", str(port), "--num-cpus", str(num_cpus),
            "--node-ip-address", "127.0.0.1", "--include-dashboard", "false", "--disable-usage-stats",
            "--temp-dir", str(temp_dir),
        ]  # fmt: skip
        started = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy(), timeout=120)
        if started.returncode != 0:
            raise RuntimeError(f"ray start failed: {started.stderr[-2000:]}")
        try:
            yield RayCluster(f"127.0.0.1:{port}", temp_dir)
        finally:
            try:
                import ray

                if ray.is_initialized():
                    ray.shutdown()
            finally:
                _stop_processes_of(temp_dir)
                shutil.rmtree(temp_dir, ignore_errors=True)


def _stop_processes_of(temp_dir: Path) -> None:
    """Terminate the processes whose command line names `temp_dir` (the head's GCS, raylet, agents)
    and their children (workers, actors); kill what is left after 10 s."""
    import psutil

    mine = [p for p in psutil.process_iter(["cmdline"]) if str(temp_dir) in " ".join(p.info["cmdline"] or [])]
    family = {p.pid: p for p in mine}
    for process in mine:
        with contextlib.suppress(psutil.Error):
            family.update({child.pid: child for child in process.children(recursive=True)})
    for process in family.values():
        with contextlib.suppress(psutil.Error):
            process.terminate()
    _, alive = psutil.wait_procs(list(family.values()), timeout=10)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()
