"""blip_toolkit.pipeline.remote against real servers on 127.0.0.1: moto's S3 server (IAM enforced, so a
denied key is a real 403 AccessDenied) behind a proxy that can reset a response half way, and a static
HTTP server. References: the objects as boto3 lists and returns them, the local files, glob.glob."""

from __future__ import annotations

import errno
import glob
import importlib
import io
import os
import random
import socket
import subprocess
import sys
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from blip_toolkit.errors import InputError
from blip_toolkit.pipeline import remote
from blip_toolkit.pipeline.remote import TrackedFile, TransportError


def payload(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def tar_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def read_tar(fileobj) -> dict[str, bytes]:
    """Members of a tar read as a stream, as webdataset does."""
    with tarfile.open(fileobj=fileobj, mode="r|") as tar:
        return {member.name: tar.extractfile(member).read() for member in tar if member.isfile()}


def parquet_bytes(rows: int = 10_000, row_group_size: int = 2_000) -> tuple[pa.Table, bytes]:
    table = pa.table({"x": list(range(rows)), "s": [str(i) * 5 for i in range(rows)]})
    buffer = io.BytesIO()
    pq.write_table(table, buffer, row_group_size=row_group_size)
    return table, buffer.getvalue()


def messages_of(*errors: BaseException) -> str:
    return "\n".join(str(error) for error in errors)


# ----------------------------------------------------------------------------- names (no server)


def test_is_url():
    assert remote.is_url("s3://bucket/key")
    assert remote.is_url("hf://datasets/org/name/data.parquet")
    assert remote.is_url("https://host/x.tar")
    assert not remote.is_url("file:///tmp/x.tar")
    assert not remote.is_url("pipe:curl -s https://host/x.tar")
    assert not remote.is_url("data/x.tar")
    assert not remote.is_url("/abs/x.tar")


def test_join_resolves_against_a_directory():
    assert remote.join("s3://bkt/data", "img/1.jpg") == "s3://bkt/data/img/1.jpg"
    assert remote.join("s3://bkt/data/", "../other/1.jpg") == "s3://bkt/other/1.jpg"
    assert remote.join("s3://bkt", "1.jpg") == "s3://bkt/1.jpg"
    assert remote.join("hf://datasets/org/name/data", "img/1.jpg") == "hf://datasets/org/name/data/img/1.jpg"
    assert remote.join("https://host/a/b", "../c.jpg") == "https://host/a/c.jpg"
    assert remote.join("data/parquet", "img/1.jpg") == os.path.join("data", "parquet", "img", "1.jpg")
    assert remote.join("/srv/data", "./img/../1.jpg") == "/srv/data/1.jpg"
    # absolute paths and URLs are taken as they are
    assert remote.join("s3://bkt/data", "/srv/1.jpg") == "/srv/1.jpg"
    assert remote.join("/srv/data", "s3://other/1.jpg") == "s3://other/1.jpg"
    assert remote.join("/srv/data", "https://host/1.jpg?v=2") == "https://host/1.jpg?v=2"


def test_redact_url_strips_credentials():
    assert remote.redact_url("https://user:pa55word@host/x.tar") == "https://host/x.tar"
    signed = "https://bkt.s3.amazonaws.com/x.tar?X-Amz-Algorithm=AWS4&X-Amz-Credential=AKIA%2F&X-Amz-Signature=abc123"
    assert remote.redact_url(signed) == "https://bkt.s3.amazonaws.com/x.tar"
    assert remote.redact_url("https://host/x.tar?token=abc#frag") == "https://host/x.tar#frag"
    assert remote.redact_url("https://host/x.tar?page=2") == "https://host/x.tar?page=2"
    assert remote.redact_url("s3://bkt/a?b/c") == "s3://bkt/a?b/c"  # a "?" inside an S3 key stays
    assert remote.redact_url("s3://bkt/k?versionId=3") == "s3://bkt/k?versionId=3"
    assert remote.redact_url("data/x.tar") == "data/x.tar"


def test_expand_local_patterns_stay_as_typed(tmp_path, monkeypatch):
    for name in ["a-000.tar", "a-001.tar", "a-002.tar", "b.tar", ".hidden.tar"]:
        (tmp_path / name).write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    assert remote.expand("a-{000..001}.tar") == ["a-000.tar", "a-001.tar"]
    assert remote.expand("*.tar") == sorted(glob.glob("*.tar"))
    assert remote.expand("a-00[02].tar::b.tar") == ["a-000.tar", "a-002.tar", "b.tar"]
    assert remote.expand(f"file://{tmp_path}/b.tar") == [f"{tmp_path}/b.tar"]
    assert remote.expand("missing.tar") == ["missing.tar"]
    assert remote.expand("missing-*.tar") == []


def test_list_files_local_skips_hidden_and_filters_suffixes(tmp_path):
    for name in ["b/2.JPG", "b/1.png", "a.jpg", "notes.txt", ".hidden.jpg", ".cache/x.jpg", "b/.x/y.jpg"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    reference = sorted(
        os.path.join(folder, name)
        for folder, _, names in os.walk(tmp_path)
        for name in names
        if not any(
            part.startswith(".")
            for part in os.path.relpath(os.path.join(folder, name), tmp_path).split(os.sep)
        )
    )
    assert remote.list_files(str(tmp_path)) == reference
    assert remote.list_files(str(tmp_path), suffixes=[".jpg"]) == [
        str(tmp_path / "a.jpg"),
        str(tmp_path / "b/2.JPG"),
    ]
    with pytest.raises(InputError, match="no such directory"):
        remote.list_files(str(tmp_path / "missing"))


# ----------------------------------------------------------------------------- S3: reading


def test_expand_brace_and_glob_patterns_on_s3(s3):
    bucket = s3.create_bucket()
    for i in range(5):
        s3.upload(bucket, f"shards/data-{i:03d}.tar", b"x")
    s3.upload(bucket, "shards/other.tar", b"x")
    s3.upload(bucket, "shards/data-000.idx", b"x")
    tars = [f"s3://{bucket}/{key}" for key in s3.keys(bucket, "shards/") if key.endswith(".tar")]
    data_tars = [url for url in tars if "/data-" in url]

    assert remote.expand(f"s3://{bucket}/shards/data-{{000..004}}.tar") == data_tars
    assert remote.expand(f"s3://{bucket}/shards/*.tar") == tars
    assert remote.expand(f"s3://{bucket}/shards/data-00[13].tar") == [data_tars[1], data_tars[3]]
    assert remote.expand(f"s3://{bucket}/shards/data-00?.tar") == data_tars
    # braces first, then a glob per alternative; each alternative sorted, the given order kept
    assert remote.expand(f"s3://{bucket}/shards/{{other,data-*}}.tar") == [tars[-1], *data_tars]
    assert remote.expand(f"s3://{bucket}/shards/none-*.tar") == []
    assert remote.expand(f"s3://{bucket}/shards/plain.tar") == [f"s3://{bucket}/shards/plain.tar"]


def test_open_input_and_read_bytes_equal_the_uploaded_object(s3):
    bucket = s3.create_bucket()
    data = payload(300_000, seed=1)
    url = s3.upload(bucket, "blobs/a.bin", data)

    assert remote.read_bytes(url) == data
    with remote.open_input(url) as handle:
        assert isinstance(handle, TrackedFile)
        assert handle.read(1000) == data[:1000]
        handle.seek(123_456)
        assert handle.read(10_000) == data[123_456:133_456]
        assert handle.tell() == 133_456
        buffer = bytearray(5000)
        assert handle.readinto(buffer) == 5000 and bytes(buffer) == data[133_456:138_456]
        handle.seek(0)
        assert handle.read() == data
        assert handle.transport_error is None

    table, parquet = parquet_bytes()
    parquet_url = s3.upload(bucket, "tables/t.parquet", parquet)
    assert pq.ParquetFile(remote.open_input(parquet_url)).read().equals(table)
    members = {f"{i:04d}.jpg": payload(3000, seed=i) for i in range(20)}
    tar_url = s3.upload(bucket, "shards/s.tar", tar_bytes(members))
    assert read_tar(remote.open_input(tar_url)) == members


def test_exists_is_dir_is_file_size_and_list_files_on_s3(s3):
    bucket = s3.create_bucket()
    names = [
        "img/a.jpg",
        "img/sub/b.JPG",
        "img/sub/c.png",
        "img/notes.txt",
        "img/.hidden.jpg",
        "img/.cache/d.jpg",
    ]
    sizes = {name: 100 + i for i, name in enumerate(names)}
    for name in names:
        s3.upload(bucket, name, payload(sizes[name]))
    s3.upload(bucket, "elsewhere/e.jpg", b"x")

    assert remote.exists(f"s3://{bucket}/img/a.jpg") and remote.exists(f"s3://{bucket}/img")
    assert not remote.exists(f"s3://{bucket}/img/none.jpg")
    assert remote.is_dir(f"s3://{bucket}/img") and remote.is_dir(f"s3://{bucket}")
    assert not remote.is_dir(f"s3://{bucket}/img/a.jpg")
    assert remote.is_file(f"s3://{bucket}/img/a.jpg") and not remote.is_file(f"s3://{bucket}/img")
    listed = s3.client.head_object(Bucket=bucket, Key="img/sub/c.png")["ContentLength"]
    assert remote.size(f"s3://{bucket}/img/sub/c.png") == listed == sizes["img/sub/c.png"]

    visible = [
        f"s3://{bucket}/{key}"
        for key in s3.keys(bucket, "img/")
        if not any(part.startswith(".") for part in key.split("/"))
    ]
    assert remote.list_files(f"s3://{bucket}/img") == visible
    assert remote.list_files(f"s3://{bucket}/img/") == visible
    assert remote.list_files(f"s3://{bucket}/img", suffixes=(".jpg", ".png")) == [
        f"s3://{bucket}/img/a.jpg",
        f"s3://{bucket}/img/sub/b.JPG",
        f"s3://{bucket}/img/sub/c.png",
    ]
    with pytest.raises(InputError, match=r"no such object or prefix"):
        remote.list_files(f"s3://{bucket}/nothing-here")


def test_one_line_errors_for_missing_bucket_missing_key_and_denied_key(s3):
    bucket = s3.create_bucket()
    s3.upload(bucket, "ok/a.tar", b"fine")
    s3.upload(bucket, "private/b.tar", payload(1000))
    s3.deny(bucket, "private/b.tar")
    # the denial is moto's own IAM evaluation, answered as S3 answers it
    with pytest.raises(s3.client.exceptions.ClientError) as raw:
        s3.client.get_object(Bucket=bucket, Key="private/b.tar")
    assert raw.value.response["Error"]["Code"] == "AccessDenied"
    assert raw.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403

    cases = {
        "s3://no-such-bucket-here/x.tar": "s3://no-such-bucket-here/x.tar: no such bucket",
        f"s3://{bucket}/missing.tar": f"s3://{bucket}/missing.tar: no such object",
        f"s3://{bucket}/private/b.tar": f"s3://{bucket}/private/b.tar: access denied",
    }
    errors = []
    for url, line in cases.items():
        with pytest.raises(InputError) as checked:
            remote.check_readable(url)
        assert str(checked.value) == line
        with pytest.raises(TransportError) as opened:
            remote.open_input(url)
        assert str(opened.value) == line and opened.value.url == url
        with pytest.raises(TransportError) as read:
            remote.read_bytes(url)
        assert str(read.value) == line
        assert remote.describe(read.value.__cause__, url) == line
        errors += [checked.value, opened.value, read.value]
    # a readable object and a listable prefix pass
    remote.check_readable(f"s3://{bucket}/ok/a.tar")
    remote.check_readable(f"s3://{bucket}/ok/")
    remote.check_readable(f"s3://{bucket}")
    # listing the bucket is allowed, reading the denied key is not: check_readable reads a byte
    assert f"s3://{bucket}/private/b.tar" in remote.list_files(f"s3://{bucket}")

    text = messages_of(*errors)
    assert "\n" not in "".join(str(error) for error in errors)
    assert s3.secret_access_key not in text and s3.access_key_id not in text


def test_wrong_credentials_are_one_line_without_the_secret(s3, monkeypatch):
    bucket = s3.create_bucket()
    url = s3.upload(bucket, "a.bin", b"data")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret-" + "x" * 25)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    try:
        with pytest.raises(InputError) as checked:
            remote.check_readable(url)
        assert (
            str(checked.value)
            == f"{url}: invalid credentials (the secret key does not match the access key id)"
        )
        assert "not-the-secret" not in str(checked.value)
        with pytest.raises(TransportError) as opened:
            remote.open_input(url)
        assert str(opened.value) == str(checked.value)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAUNKNOWNKEY000000")
        s3fs.S3FileSystem.clear_instance_cache()
        with pytest.raises(InputError) as unknown:
            remote.check_readable(url)
        assert (
            str(unknown.value) == f"{url}: invalid credentials (the server does not know the access key id)"
        )
    finally:
        s3fs.S3FileSystem.clear_instance_cache()


def test_no_credentials_is_one_line(s3, monkeypatch):
    bucket = s3.create_bucket()
    url = s3.upload(bucket, "a.bin", b"data")
    # the fixture's AWS_CONFIG_FILE / AWS_SHARED_CREDENTIALS_FILE do not exist and IMDS is off
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    try:
        with pytest.raises(InputError) as checked:
            remote.check_readable(url)
        assert str(checked.value) == (
            f"{url}: no credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)"
        )
    finally:
        s3fs.S3FileSystem.clear_instance_cache()


# ----------------------------------------------------------------------------- S3: a read cut half way


def test_a_read_cut_half_way_is_recorded_as_a_transport_error_and_works_again_when_switched_off(s3):
    bucket = s3.create_bucket()
    data = payload(256 * 1024, seed=2)
    url = s3.upload(bucket, "cut/a.bin", data)
    s3.proxy.cut(r"/cut/a\.bin", after=64 * 1024)

    handle = remote.open_input(url)
    with pytest.raises(Exception) as failed:
        handle.read()
    # every attempt s3fs made was cut: its retries ran and could not hide the failure
    assert s3.proxy.cut_count >= 2
    assert isinstance(handle.transport_error, TransportError)
    assert handle.transport_error.__cause__ is failed.value
    assert (
        str(handle.transport_error) == f"{url}: connection lost mid-transfer (received 65536 of 262144 bytes)"
    )
    with pytest.raises(TransportError, match="connection lost mid-transfer"):
        remote.read_bytes(url)

    s3.proxy.clear()
    cuts = s3.proxy.cut_count
    assert remote.open_input(url).read() == data
    assert remote.read_bytes(url) == data
    assert s3.proxy.cut_count == cuts


def test_a_single_cut_is_absorbed_by_the_s3fs_retry(s3):
    """What `times=` is for: one transient reset is retried by s3fs and the read succeeds, so a test
    that wants the pipeline to see a failure must keep the switch on (above)."""
    bucket = s3.create_bucket()
    data = payload(200_000, seed=3)
    url = s3.upload(bucket, "blip/a.bin", data)
    s3.proxy.cut(r"/blip/a\.bin", after=1000, times=1)
    handle = remote.open_input(url)
    assert handle.read() == data
    assert s3.proxy.cut_targets == [f"/{bucket}/blip/a.bin"] and handle.transport_error is None


def test_transport_error_is_told_from_a_data_error_through_tarfile_and_pyarrow(s3):
    bucket = s3.create_bucket()
    members = {f"{i:04d}.bin": payload(4000, seed=i) for i in range(30)}
    whole = tar_bytes(members)
    tar_url = s3.upload(bucket, "tars/good.tar", whole)
    truncated_url = s3.upload(bucket, "tars/truncated.tar", whole[: len(whole) // 2 + 100])
    table, parquet = parquet_bytes()
    parquet_url = s3.upload(bucket, "tables/good.parquet", parquet)
    corrupt = bytearray(parquet)
    offset = pq.ParquetFile(io.BytesIO(parquet)).metadata.row_group(1).column(0).data_page_offset
    corrupt[offset : offset + 16] = b"\xff" * 16
    corrupt_url = s3.upload(bucket, "tables/corrupt.parquet", bytes(corrupt))

    # data errors: the bytes arrived, they are wrong; nothing recorded
    handle = remote.open_input(truncated_url)
    with pytest.raises(tarfile.ReadError):
        read_tar(handle)
    assert handle.transport_error is None
    handle = remote.open_input(corrupt_url)
    reader = pq.ParquetFile(handle)
    assert reader.read_row_group(0).equals(table.slice(0, 2000))
    with pytest.raises(OSError, match="thrift"):
        reader.read_row_group(1)
    assert handle.transport_error is None

    # transport errors: the same readers over a connection cut half way
    s3.proxy.cut(r"/tars/good\.tar", after=len(whole) // 2)
    handle = remote.open_input(tar_url)
    with pytest.raises(Exception):  # noqa: B017 - whatever tarfile makes of it
        read_tar(handle)
    assert isinstance(handle.transport_error, TransportError)
    assert str(handle.transport_error).startswith(f"{tar_url}: connection lost mid-transfer")

    s3.proxy.cut(r"/tables/good\.parquet", after=1000)
    handle = remote.open_input(parquet_url)
    with pytest.raises(Exception):  # noqa: B017 - whatever pyarrow makes of it
        pq.ParquetFile(handle).read()
    assert isinstance(handle.transport_error, TransportError)
    assert str(handle.transport_error).startswith(f"{parquet_url}: connection lost mid-transfer")


def test_an_object_that_vanishes_or_is_denied_after_open_is_a_transport_error(s3):
    bucket = s3.create_bucket()
    data = payload(300_000, seed=4)
    gone_url = s3.upload(bucket, "v/gone.bin", data)
    denied_url = s3.upload(bucket, "v/denied.bin", data)
    gone, denied = remote.open_input(gone_url), remote.open_input(denied_url)
    s3.delete(bucket, "v/gone.bin")
    s3.deny(bucket, "v/denied.bin")
    with pytest.raises(OSError):
        gone.read(10)
    with pytest.raises(OSError):
        denied.read(10)
    assert str(gone.transport_error) == f"{gone_url}: no such object"
    assert str(denied.transport_error) == f"{denied_url}: access denied"


# ----------------------------------------------------------------------------- writing


def test_atomic_output_local(tmp_path):
    target = tmp_path / "out" / "records.jsonl"
    with remote.atomic_output(str(target)) as tmp:
        assert os.path.dirname(tmp) == str(target.parent) and tmp.endswith(".jsonl")
        with open(tmp, "w") as handle:
            handle.write("one\n")
        assert not target.exists()
    assert target.read_text() == "one\n"
    assert sorted(os.listdir(target.parent)) == ["records.jsonl"]

    with pytest.raises(RuntimeError), remote.atomic_output(str(target)) as tmp:
        with open(tmp, "w") as handle:
            handle.write("two\n")
        raise RuntimeError("writer failed")
    assert target.read_text() == "one\n"  # the old file is untouched
    assert sorted(os.listdir(target.parent)) == ["records.jsonl"]

    new = tmp_path / "out" / "new.jsonl"
    with pytest.raises(OSError) as full, remote.atomic_output(str(new)) as tmp:
        with open(tmp, "w") as handle:
            handle.write("half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), tmp)  # what a full disk raises
    assert full.value.errno == errno.ENOSPC and not isinstance(full.value, InputError)
    assert not new.exists() and sorted(os.listdir(target.parent)) == ["records.jsonl"]


def test_atomic_output_s3_appears_only_when_complete(s3):
    bucket = s3.create_bucket()
    url = f"s3://{bucket}/runs/out.parquet"
    table, _ = parquet_bytes(rows=500)
    with remote.atomic_output(url) as tmp:
        assert tmp.endswith("out.parquet")
        pq.write_table(table, tmp)
        assert s3.get(bucket, "runs/out.parquet") is None
        assert s3.keys(bucket) == []
    assert pq.read_table(io.BytesIO(s3.get(bucket, "runs/out.parquet"))).equals(table)
    assert not os.path.exists(tmp)

    failed_url = f"s3://{bucket}/runs/failed.parquet"
    with pytest.raises(RuntimeError), remote.atomic_output(failed_url) as tmp:
        pq.write_table(table, tmp)
        raise RuntimeError("writer failed")
    assert s3.get(bucket, "runs/failed.parquet") is None and not os.path.exists(tmp)
    assert s3.keys(bucket) == ["runs/out.parquet"]

    s3.deny(bucket, "runs/denied.parquet")
    with (
        pytest.raises(TransportError) as denied,
        remote.atomic_output(f"s3://{bucket}/runs/denied.parquet") as tmp,
    ):
        pq.write_table(table, tmp)
    assert str(denied.value) == f"s3://{bucket}/runs/denied.parquet: access denied"
    assert not os.path.exists(tmp)


# ----------------------------------------------------------------------------- HTTP


def test_http_reads_ranges_and_reports_404(http_server):
    data = payload(200_000, seed=5)
    (http_server.root / "x.bin").write_bytes(data)
    url = http_server.url_for("x.bin")

    assert remote.read_bytes(url) == data
    assert remote.size(url) == len(data)
    with remote.open_input(url) as handle:
        handle.seek(150_000)
        assert handle.read(1000) == data[150_000:151_000]
    remote.check_readable(url)
    assert remote.expand(url) == [url]

    missing = http_server.url_for("missing.tar")
    with pytest.raises(InputError) as checked:
        remote.check_readable(missing)
    assert str(checked.value) == f"{missing}: HTTP 404"
    with pytest.raises(TransportError) as read:
        remote.read_bytes(missing)
    assert str(read.value) == f"{missing}: HTTP 404"


def test_no_credential_appears_in_any_message(http_server, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secretvalue123456")
    port = int(http_server.url.rsplit(":", 1)[1])
    url = (
        f"http://alice:pa55word@127.0.0.1:{port}/missing.tar?X-Amz-Credential=AKIA&X-Amz-Signature=deadbeef99"
    )
    with pytest.raises(InputError) as checked:
        remote.check_readable(url)
    assert str(checked.value) == f"http://127.0.0.1:{port}/missing.tar: HTTP 404"
    leaked = remote.describe(RuntimeError(f"request to {url} failed with token hf_secretvalue123456"), url)
    for secret in ("alice", "pa55word", "deadbeef99", "hf_secretvalue123456"):
        assert secret not in str(checked.value) and secret not in leaked
    assert leaked.startswith(
        f"http://127.0.0.1:{port}/missing.tar: RuntimeError: request to http://127.0.0.1:"
    )


def test_connection_refused_is_one_line():
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/x.tar"
    with pytest.raises(InputError) as checked:
        remote.check_readable(url)
    assert str(checked.value).startswith(f"{url}: connection failed (")
    assert "\n" not in str(checked.value)


def test_missing_remote_extra_names_the_install_command(monkeypatch):
    # What fsspec meets when s3fs is not installed: the import fails (fsspec imports an implementation
    # on first use and keeps it in its registry, so the registered class is removed for the test).
    registry = importlib.import_module("fsspec.registry")  # the module (fsspec.registry is its mapping)
    monkeypatch.setitem(sys.modules, "s3fs", None)
    monkeypatch.delitem(registry._registry, "s3", raising=False)
    with pytest.raises(InputError) as missing:
        remote.url_to_fs("s3://bkt/x.tar")
    assert (
        str(missing.value) == "s3://bkt/x.tar: reading s3:// needs s3fs: pip install 'blip-toolkit[remote]'"
    )
    with pytest.raises(InputError, match=r"unknown protocol nosuchproto://"):
        remote.url_to_fs("nosuchproto://x/y")


def test_a_process_started_by_a_test_reaches_the_server_through_the_environment(s3):
    """The CLI tests run `blip` in subprocesses: the fixture's environment alone must lead them to the
    server (through the proxy, so their reads can be cut too)."""
    bucket = s3.create_bucket()
    data = payload(50_000, seed=6)
    url = s3.upload(bucket, "sub/a.bin", data)
    code = "import sys, fsspec; sys.stdout.write(fsspec.open(sys.argv[1], 'rb').open().read().hex())"
    out = subprocess.run([sys.executable, "-c", code, url], capture_output=True, text=True, check=True)
    assert bytes.fromhex(out.stdout) == data
    assert s3.proxy.endpoint == os.environ["AWS_ENDPOINT_URL_S3"]
