"""Results on stdout in text, json or jsonl. Records are written as they arrive so a long batch run
streams (json streams one array)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any, TextIO

from blip_toolkit.fsutil import json_safe


def dumps(record: Any) -> str:
    return json.dumps(json_safe(record), ensure_ascii=False)


class Emitter:
    """Write result records to stdout in the chosen format.

    text: `text_line(record)` per record (it may return None to print nothing);
    jsonl: one JSON object per line; json: one JSON array of all records (or the single object
    when `single=True`)."""

    def __init__(
        self,
        fmt: str,
        text_line: Callable[[dict], str | None] | None = None,
        *,
        single: bool = False,
        stream: TextIO | None = None,
    ):
        self.fmt = fmt
        self.text_line = text_line or (lambda r: "\t".join(str(v) for v in r.values()))
        self.single = single
        self.stream = stream or sys.stdout
        self._count = 0

    def emit(self, record: dict) -> None:
        if self.fmt == "jsonl":
            self.stream.write(dumps(record) + "\n")
        elif self.fmt == "json":
            if self.single:
                self.stream.write(json.dumps(json_safe(record), ensure_ascii=False, indent=2) + "\n")
            else:
                self.stream.write(("[\n  " if self._count == 0 else ",\n  ") + dumps(record))
        else:
            line = self.text_line(record)
            if line is not None:
                self.stream.write(line + "\n")
        self._count += 1
        self.stream.flush()

    def close(self) -> None:
        if self.fmt == "json" and not self.single:
            self.stream.write("[]\n" if self._count == 0 else "\n]\n")
            self.stream.flush()

    def __enter__(self) -> Emitter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
