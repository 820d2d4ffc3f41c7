"""Local and remote paths through fsspec: s3://, gs://, hf://, https:// and plain local paths.

Everything the pipeline reads or writes goes through this module, so that

- a URL and a local path are used the same way (`expand`, `list_files`, `open_input`, `atomic_output`);
- a storage failure is one line naming the URL (`describe`): "s3://b/k: access denied",
  "s3://nobucket/x: no such bucket", "https://host/x.tar: HTTP 404", never a botocore traceback;
- no credential is ever printed: user:pass@ and signed query strings are stripped from every URL we
  print, and the values of the usual secret environment variables are masked in every message;
- a transport failure (network cut, object gone, access denied mid-run) can be told from a data error
  even after pyarrow or tarfile re-wrapped it: files come back as a `TrackedFile`, which records the
  exception its underlying file raised (`transport_error`).

Credentials are found the usual way by each backend (AWS environment variables, profiles and
~/.aws for s3fs; HF_TOKEN or the cached login for hf://; gcsfs' own chain for gs://): nothing here
configures them. s3:// and https:// need the `remote` extra (s3fs, aiohttp).
"""

from __future__ import annotations

import contextlib
import errno
import glob as local_glob
import io
import os
import posixpath
import re
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import fsspec
from fsspec.implementations.local import LocalFileSystem
from webdataset.shardlists import expand_urls

from blip_toolkit.errors import InputError
from blip_toolkit.fsutil import fsync_path

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_GLOB_CHARS = ("*", "?", "[")
# A URL inside free text (exception messages); it ends at whitespace or a quote.
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")
# Query parameters that carry a credential (S3 / GCS presigned URLs, SAS tokens, API keys).
_SECRET_PARAM = re.compile(r"sig|signature|token|credential|secret|passw|pwd|auth|key|session|policy", re.I)
# Environment variables whose values must never appear in a message, whatever printed them.
_SECRET_ENV = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ACCESS_KEY_ID",
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "GOOGLE_APPLICATION_CREDENTIALS_JSON",
    "AZURE_STORAGE_KEY",
    "AZURE_STORAGE_SAS_TOKEN",
)
# The package each protocol needs when fsspec cannot import its implementation.
_REMOTE_EXTRA = "pip install 'blip-toolkit[remote]'"
_PROTOCOL_PACKAGES = {
    "s3": ("s3fs", _REMOTE_EXTRA),
    "s3a": ("s3fs", _REMOTE_EXTRA),
    "http": ("aiohttp", _REMOTE_EXTRA),
    "https": ("aiohttp", _REMOTE_EXTRA),
    "gs": ("gcsfs", "pip install gcsfs"),
    "gcs": ("gcsfs", "pip install gcsfs"),
    "hf": ("huggingface_hub", "pip install huggingface_hub"),
}
_MAX_MESSAGE = 300
# Exceptions that are bugs in the caller, not storage failures: never re-labelled as transport errors.
_PROGRAMMING_ERRORS = (TypeError, AttributeError, NameError, AssertionError, NotImplementedError)


class TransportError(InputError):
    """A read (or upload) that failed because of the storage or the network, not because of the data:
    the network was cut, the object vanished, access was denied. One line naming the URL; the
    original exception is the `__cause__`. Transient for the pipeline: the unit is left for --resume."""

    def __init__(self, message: str, *, url: str, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.url = redact_url(url)

    @classmethod
    def from_exception(cls, exc: BaseException, url: str) -> TransportError:
        error = cls(describe(exc, url), url=url)
        error.__cause__ = exc
        return error


# ----------------------------------------------------------------------------- names and file systems


def is_url(spec: str) -> bool:
    """Whether `spec` names a remote location (scheme://...), other than file://. `pipe:` is not a URL
    (the caller handles it)."""
    return bool(_SCHEME.match(spec)) and not spec.startswith("file://")


def _scheme(url: str) -> str:
    return url.split("://", 1)[0].lower()


def _local(spec: str) -> str:
    return spec[len("file://") :] if spec.startswith("file://") else spec


def url_to_fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(file system, path inside it) for a URL or a local path (fsspec.core.url_to_fs). Local paths
    come back unchanged on the local file system; a protocol whose package is missing is one line
    saying what to install."""
    if not is_url(url):
        return LocalFileSystem(), _local(url)
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as exc:
        scheme = _scheme(url)
        package, install = _PROTOCOL_PACKAGES.get(scheme, (None, None))
        if install is None:
            raise InputError(
                f"{redact_url(url)}: {scheme}:// needs a package fsspec could not import ({exc})"
            ) from exc
        raise InputError(f"{redact_url(url)}: reading {scheme}:// needs {package}: {install}") from exc
    except ValueError as exc:
        if "protocol not known" in str(exc).lower():
            raise InputError(f"{redact_url(url)}: unknown protocol {_scheme(url)}://") from exc
        raise InputError(describe(exc, url)) from exc


def _unstrip(scheme: str, path: str) -> str:
    """A path of a remote file system as a full URL again, with the scheme the user gave (s3a:// stays
    s3a://; fsspec's unstrip_protocol would give its first protocol name)."""
    return path if "://" in path else f"{scheme}://{path}"


def join(base: str, relative: str) -> str:
    """`relative` resolved against the directory `base` (a local path or a URL); `relative` that is
    already absolute or a URL is returned as is. `..` is resolved within the URL's path."""
    if is_url(relative) or relative.startswith("file://") or relative.startswith("/"):
        return relative
    if not is_url(base):
        return os.path.normpath(os.path.join(_local(base), relative))
    scheme = _scheme(base)
    if scheme in ("http", "https"):
        parts = urlsplit(base)
        path = posixpath.normpath(posixpath.join(parts.path or "/", relative))
        return urlunsplit((parts.scheme, parts.netloc, path, "", ""))
    # s3://bucket/dir, hf://datasets/org/name/dir: not parsed as URLs, since keys may contain ? and #.
    rest = base.split("://", 1)[1]
    head, _, tail = rest.partition("/")
    path = posixpath.normpath(posixpath.join("/" + tail, relative)).lstrip("/")
    return f"{base.split('://', 1)[0]}://{head}/{path}"


def _has_glob(path: str) -> bool:
    return any(char in path for char in _GLOB_CHARS)


def expand(spec: str) -> list[str]:
    """The locations a pattern names, in order: brace patterns and `::` lists first (webdataset's
    expand_urls, as the tar reader always did), then glob characters (* ? [) through the file
    system's glob, sorted per pattern. Remote results keep their scheme (s3://bucket/key), local
    results stay paths as typed (relative stays relative). A plain path or URL comes back as is, even
    if it does not exist (the caller checks). http(s):// has no listing: only braces are expanded."""
    out: list[str] = []
    for url in expand_urls(spec):
        if not is_url(url):
            local = _local(url)
            out.extend(sorted(local_glob.glob(local)) if _has_glob(local) else [local])
            continue
        scheme = _scheme(url)
        if scheme in ("http", "https") or not _has_glob(url.split("://", 1)[1]):
            out.append(url)
            continue
        fs, path = url_to_fs(url)
        matches = _storage_call(url, fs.glob, path)
        out.extend(_unstrip(scheme, match) for match in sorted(matches))
    return out


# ----------------------------------------------------------------------------- queries


def _storage_call(url: str, function, *args, **kwargs):
    """Call a file-system method; a storage failure becomes a TransportError naming `url`."""
    try:
        return function(*args, **kwargs)
    except _PROGRAMMING_ERRORS:
        raise
    except Exception as exc:
        raise TransportError.from_exception(exc, url) from exc


def exists(url: str) -> bool:
    """Whether `url` names an existing file or directory (prefix). A denied location raises
    TransportError rather than answering False."""
    fs, path = url_to_fs(url)
    return bool(_storage_call(url, fs.exists, path))


def is_dir(url: str) -> bool:
    """Whether `url` is a directory (a bucket or a non-empty prefix on object stores)."""
    fs, path = url_to_fs(url)
    return bool(_storage_call(url, fs.isdir, path))


def is_file(url: str) -> bool:
    """Whether `url` is a file (an object)."""
    fs, path = url_to_fs(url)
    return bool(_storage_call(url, fs.isfile, path))


def size(url: str) -> int | None:
    """The size of a file in bytes (None when the server does not say, e.g. HTTP without length)."""
    fs, path = url_to_fs(url)
    return _storage_call(url, fs.size, path)


def _suffix_filter(suffixes: Iterable[str] | None):
    if suffixes is None:
        return lambda name: True
    wanted = tuple(suffix.lower() for suffix in suffixes)
    return lambda name: name.lower().endswith(wanted)


def list_files(url: str, suffixes: Iterable[str] | None = None) -> list[str]:
    """Every file under the directory (prefix) `url`, recursively, sorted, as full URLs (remote) or
    paths (local, in the form given). Hidden files and folders (a name starting with '.') below `url`
    are skipped; `suffixes` keeps only names ending with one of them (case-insensitive). A file `url`
    gives itself; a missing location raises InputError."""
    keep = _suffix_filter(suffixes)
    if not is_url(url):
        root = _local(url)
        if os.path.isfile(root):
            return [root] if keep(root) else []
        if not os.path.isdir(root):
            raise InputError(f"{root}: no such directory")
        found = []
        for folder, dirnames, filenames in os.walk(root):
            dirnames[:] = [name for name in dirnames if not name.startswith(".")]
            found.extend(
                os.path.join(folder, name) for name in filenames if not name.startswith(".") and keep(name)
            )
        return sorted(found)
    scheme = _scheme(url)
    fs, path = url_to_fs(url)
    root = path.rstrip("/")
    found = []
    for name in _storage_call(url, fs.find, root, withdirs=False):
        relative = name[len(root) :].lstrip("/") if name.startswith(root) else name
        if relative and any(part.startswith(".") for part in relative.split("/")):
            continue
        if keep(name):
            found.append(_unstrip(scheme, name))
    if not found and not exists(url):
        raise InputError(f"{redact_url(url)}: no such object or prefix")
    return sorted(found)


# ----------------------------------------------------------------------------- reading


class TrackedFile:
    """A read-only file object that remembers how its underlying file failed.

    pyarrow and tarfile re-wrap the exceptions of the file they read (tarfile.ReadError, OSError
    "Unexpected end of stream", ...), so the caller cannot tell a cut connection from a corrupt row
    group by the exception it sees. The proxy records the first exception the underlying file raised in
    read / readinto / read1 / readline / seek as `transport_error` (a TransportError naming the URL)
    before re-raising it unchanged: `transport_error is not None` means the storage failed, not the
    data. Every other attribute is the underlying file's.
    """

    def __init__(self, raw: IO[bytes], url: str):
        self._raw = raw
        self.url = url
        self.transport_error: TransportError | None = None

    def _guard(self, method, *args):
        try:
            return method(*args)
        except Exception as exc:
            if self.transport_error is None:
                self.transport_error = TransportError.from_exception(exc, self.url)
            raise

    def read(self, size: int = -1) -> bytes:
        return self._guard(self._raw.read, size)

    def read1(self, size: int = -1) -> bytes:
        method = getattr(self._raw, "read1", self._raw.read)
        return self._guard(method, size)

    def readinto(self, buffer) -> int:
        if hasattr(self._raw, "readinto"):
            return self._guard(self._raw.readinto, buffer)
        view = memoryview(buffer).cast("B")
        data = self._guard(self._raw.read, len(view))
        view[: len(data)] = data
        return len(data)

    def readline(self, size: int = -1) -> bytes:
        # fsspec's buffered files take no size in readline()
        return self._guard(self._raw.readline) if size == -1 else self._guard(self._raw.readline, size)

    def readlines(self, hint: int = -1) -> list[bytes]:
        return self._guard(self._raw.readlines, hint)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._guard(self._raw.seek, offset, whence)

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        line = self.readline()
        if not line:
            raise StopIteration
        return line

    def __enter__(self) -> TrackedFile:
        return self

    def __exit__(self, *exc_info) -> None:
        self._raw.close()

    def __getattr__(self, name: str) -> Any:
        # Only called for attributes not defined above: tell, close, closed, seekable, size, ...
        return getattr(self._raw, name)

    def __repr__(self) -> str:
        return f"TrackedFile({redact_url(self.url)!r})"


def open_input(url: str, mode: str = "rb") -> TrackedFile:
    """A file object for reading `url` (local path or URL), as a TrackedFile. mode is "rb" ("r" gives a
    UTF-8 text wrapper over the TrackedFile, reachable as `.buffer`). Failing to open (no such object,
    access denied, no connection) raises TransportError with one line naming the URL."""
    if mode not in ("rb", "r"):
        raise ValueError(f"open_input reads only: mode {mode!r}")
    fs, path = url_to_fs(url)
    try:
        raw = fs.open(path, "rb")
    except _PROGRAMMING_ERRORS:
        raise
    except Exception as exc:
        cause = _refine(fs, path, exc)
        raise TransportError.from_exception(cause, url) from cause
    tracked = TrackedFile(raw, url)
    if mode == "r":
        return io.TextIOWrapper(tracked, encoding="utf-8")  # type: ignore[return-value]
    return tracked


def read_bytes(url: str) -> bytes:
    """The whole content of `url`; a storage failure raises TransportError naming it."""
    fs, path = url_to_fs(url)
    return _storage_call(url, fs.cat_file, path)


def check_readable(url: str) -> None:
    """Raise InputError with one line when `url` cannot be read: missing (file, object, bucket), access
    denied, unreachable. A file must give its first byte and a directory must list: a key that may be
    listed but not read is caught here, before any model loads."""
    fs, path = url_to_fs(url)
    try:
        if is_url(url) and "/" not in path.strip("/"):
            # A bucket (container) root: a listing names a missing bucket; a HEAD only says "not found".
            fs.ls(path.strip("/"), detail=False)
            return
        try:
            info = fs.info(path)
        except PermissionError as exc:
            raise _refine(fs, path, exc)  # noqa: B904 - the refined exception keeps its own cause
        if info.get("type") == "directory":
            fs.ls(path, detail=False)
        elif info.get("size") != 0:
            fs.cat_file(path, start=0, end=1)
    except _PROGRAMMING_ERRORS:
        raise
    except Exception as exc:
        raise InputError(describe(exc, url)) from exc


def _refine(fs: fsspec.AbstractFileSystem, path: str, exc: BaseException) -> BaseException:
    """A better exception for a refusal seen on a HEAD request. A HEAD answer has no body, so S3's 403
    to it says "Forbidden" whatever the reason; a one-byte GET gets the error code (AccessDenied,
    SignatureDoesNotMatch, InvalidAccessKeyId, ...). Returns `exc` when the GET tells nothing more."""
    if not isinstance(exc, PermissionError):
        return exc
    try:
        fs.cat_file(path, start=0, end=1)
    except _PROGRAMMING_ERRORS:
        raise
    except Exception as better:
        return better
    return exc


# ----------------------------------------------------------------------------- writing


@contextlib.contextmanager
def atomic_output(url: str) -> Iterator[str]:
    """Yield a local temporary path to write the output to; on success it appears at `url` whole.

    Local: a hidden sibling of the target, fsynced and renamed over it (os.replace), then the directory
    fsynced. Remote: a file in a temporary directory with the target's name, uploaded with one
    `put_file` (S3 creates the object only when the upload completes, multipart or not). On an
    exception inside the block nothing appears at `url` and the temporary file is removed. OSError
    (ENOSPC among them) propagates unchanged; a failed upload raises TransportError.
    """
    if not is_url(url):
        target = Path(_local(url))
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(
            prefix=f".{target.name}.", suffix=f".tmp{target.suffix}", dir=target.parent
        )
        os.close(fd)
        try:
            yield tmp
            _fsync_file(tmp)
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        fsync_path(target.parent)  # the rename is durable once the directory entry is
        return
    fs, path = url_to_fs(url)
    folder = tempfile.mkdtemp(prefix="blip-upload-")
    try:
        tmp = os.path.join(folder, posixpath.basename(path.rstrip("/")) or "output")
        Path(tmp).touch()
        yield tmp
        try:
            fs.put_file(tmp, path)
        except _PROGRAMMING_ERRORS:
            raise
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise
            raise TransportError.from_exception(exc, url) from exc
        except Exception as exc:
            raise TransportError.from_exception(exc, url) from exc
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _fsync_file(path: str) -> None:
    # Unlike a directory's (fsync_path), a file's fsync must not fail quietly: ENOSPC can show here.
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


# ----------------------------------------------------------------------------- messages


def redact_url(url: str) -> str:
    """`url` without user:pass@ and without a query string that carries a signature, token or key."""
    if not _SCHEME.match(url):
        return url
    scheme, rest = url.split("://", 1)
    authority, slash, remainder = rest.partition("/")
    if "@" in authority:
        authority = authority.rsplit("@", 1)[1]
    path, question, query = remainder.partition("?")
    if question:
        fragment = ""
        if "#" in query:
            query, fragment = query.split("#", 1)
            fragment = "#" + fragment
        keys = [key for key, _ in parse_qsl(query, keep_blank_values=True)]
        if any(_SECRET_PARAM.search(key) for key in keys) or not keys:
            query = ""
        remainder = path + (f"?{query}" if query else "") + fragment
    return f"{scheme}://{authority}{slash}{remainder}"


def _scrub(text: str) -> str:
    """One line of text with URLs redacted and secret environment values masked."""
    text = " ".join(str(text).split())
    text = _URL_IN_TEXT.sub(lambda match: redact_url(match.group(0)), text)
    for name in _SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 6:
            text = text.replace(value, "***")
    if len(text) > _MAX_MESSAGE:
        text = text[: _MAX_MESSAGE - 3] + "..."
    return text


def _chain(exc: BaseException) -> list[BaseException]:
    """`exc` and the exceptions it was raised from (cause, else context), outermost first."""
    chain: list[BaseException] = []
    while exc is not None and all(exc is not seen for seen in chain):
        chain.append(exc)
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    return chain


def _client_error_reason(response: dict) -> str:
    error = response.get("Error") or {}
    code = str(error.get("Code", ""))
    status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
    if code == "NoSuchBucket":
        return "no such bucket"
    if code in ("NoSuchKey", "404", "NotFound"):
        return "no such object"
    if code in ("AccessDenied", "403", "Forbidden", "AllAccessDisabled", "AccountProblem"):
        return "access denied"
    if code == "InvalidAccessKeyId":
        return "invalid credentials (the server does not know the access key id)"
    if code == "SignatureDoesNotMatch":
        return "invalid credentials (the secret key does not match the access key id)"
    if code in ("ExpiredToken", "InvalidToken", "TokenRefreshRequired"):
        return "credentials expired or invalid (session token)"
    if code in ("SlowDown", "503", "ServiceUnavailable", "RequestLimitExceeded", "Throttling"):
        return f"throttled by the server ({code})"
    return f"{code or 'error'} (HTTP {status})" if status else (code or "error")


def _classify(exc: BaseException, url: str) -> tuple[int, str]:
    """(specificity, reason) of one exception of the chain; the most specific reason is reported."""
    botocore = sys.modules.get("botocore.exceptions")
    aiohttp = sys.modules.get("aiohttp")
    fsspec_exceptions = sys.modules.get("fsspec.exceptions")
    message = _scrub(str(exc))
    remote = is_url(url)
    if botocore is not None:
        if isinstance(exc, botocore.ClientError):
            return 3, _client_error_reason(getattr(exc, "response", {}) or {})
        if isinstance(exc, botocore.NoCredentialsError):
            return 3, "no credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)"
        if isinstance(exc, botocore.PartialCredentialsError):
            return 3, f"incomplete credentials ({message})"
        if isinstance(exc, botocore.ReadTimeoutError | botocore.ConnectTimeoutError):
            return 3, f"timed out ({message})"
        if isinstance(exc, botocore.EndpointConnectionError | botocore.ConnectionClosedError):
            return 3, f"connection failed ({message})"
        if isinstance(exc, botocore.HTTPClientError):
            return 3, f"connection failed ({message})"
    if aiohttp is not None:
        if isinstance(exc, aiohttp.ClientPayloadError):
            received = re.search(r"received \d+ of \d+ bytes", message)
            detail = f" ({received.group(0)})" if received else ""
            return 3, f"connection lost mid-transfer{detail}"
        if isinstance(exc, aiohttp.ClientResponseError):
            return 3, f"HTTP {exc.status}"
        if isinstance(exc, aiohttp.ServerDisconnectedError):
            return 3, "connection lost (the server disconnected)"
        if isinstance(exc, aiohttp.ServerTimeoutError):
            return 3, f"timed out ({message})"
        if isinstance(exc, aiohttp.ClientError):
            return 3, f"connection failed ({message})"
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return 3, "no space left on device"
    if fsspec_exceptions is not None and isinstance(exc, fsspec_exceptions.FSTimeoutError):
        return 2, "timed out"
    if isinstance(exc, FileNotFoundError):
        if "bucket does not exist" in message.lower():
            return 3, "no such bucket"
        if not remote:
            return 2, "no such file or directory"
        return 2, "HTTP 404" if _scheme(url) in ("http", "https") else "no such object"
    if isinstance(exc, PermissionError):
        return 2, "access denied" if remote else "permission denied"
    if isinstance(exc, IsADirectoryError):
        return 2, "is a directory"
    if isinstance(exc, NotADirectoryError):
        return 2, "not a directory"
    if isinstance(exc, ConnectionResetError):
        return 2, "connection reset"
    if isinstance(exc, ConnectionError):
        return 2, f"connection failed ({message})" if message else "connection failed"
    if isinstance(exc, TimeoutError):
        return 2, "timed out"
    if isinstance(exc, TransportError | InputError):
        # Already one of our lines: keep its reason (the part after "url: ").
        return 1, exc.message.split(": ", 1)[-1]
    return 0, f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def describe(exc: BaseException, url: str) -> str:
    """One line for a storage failure: "<url>: <reason>", e.g. "s3://b/k: access denied",
    "s3://nobucket/x: no such bucket", "https://host/x.tar: HTTP 404",
    "s3://b/k: connection failed (...)". The exception chain is searched for the most specific cause
    (s3fs turns a botocore ClientError into PermissionError; fsspec's HTTP file system turns any failed
    request into FileNotFoundError from the real one). No credential is ever included."""
    best = (-1, "")
    for link in _chain(exc):
        found = _classify(link, url)
        if found[0] > best[0]:
            best = found
    return f"{redact_url(url)}: {_scrub(best[1])}"
