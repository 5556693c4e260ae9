"""Receiving a multipart upload straight to disk.

The file part is written, hashed and counted as it arrives, so an upload over the limit is
refused (413) after at most `limit` bytes: it is never held in memory, nor spooled whole to a
temporary file first as FastAPI's `UploadFile` would. Text fields beside the file are small
and kept in memory; a field the form does not know is refused by name.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PureWindowsPath
from typing import Any, BinaryIO

from fastapi import Request
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from app.errors import Problem, validation_problem

FILE_FIELD = "file"
MAX_FIELD_BYTES = 64 * 1024  # a text field (name, config)
MAX_HEADER_BYTES = 16 * 1024  # the headers of one part


@dataclass
class Upload:
    path: Path  # where the file part was written
    filename: str  # as the client named it, without any folder
    bytes: int = 0
    sha256: str = ""
    fields: dict[str, str] = field(default_factory=dict)


def too_large(limit: int, what: str = "the upload") -> Problem:
    detail = f"{what} is larger than the limit of {limit:,} bytes (QFORGE_MAX_UPLOAD_BYTES)"
    return Problem(413, "upload-too-large", "Upload too large", detail, limit_bytes=limit)


def form_schema(file_description: str, **fields: str) -> dict[str, Any]:
    """OpenAPI `requestBody` of a form read by `receive` (routes pass it as `openapi_extra`)."""
    properties = {FILE_FIELD: {"type": "string", "format": "binary", "description": file_description}}
    properties |= {name: {"type": "string", "description": text} for name, text in fields.items()}
    schema = {"type": "object", "required": [FILE_FIELD], "properties": properties}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}


async def receive(
    request: Request,
    dest: Path,
    limit: int,
    fields: frozenset[str],
    check_filename: Callable[[str], None] | None = None,
) -> Upload:
    """Write the form's `file` part to `dest` (creating its folder) and collect the text
    `fields`. `check_filename` may refuse the file by its name before any of it is written.
    When this raises, `dest` may be left partly written: the caller removes its folder."""
    content_type, params = parse_options_header(request.headers.get("content-type"))
    if content_type != b"multipart/form-data" or b"boundary" not in params:
        detail = f"send a multipart/form-data body with a '{FILE_FIELD}' part (got {content_type.decode('latin-1')!r})"
        raise Problem(415, "unsupported-media-type", "Unsupported media type", detail)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit + (len(fields) + 1) * (MAX_FIELD_BYTES + MAX_HEADER_BYTES):
        raise too_large(limit)  # refused before reading anything
    dest.parent.mkdir(parents=True, exist_ok=True)
    form = _Form(dest, limit, fields, check_filename)
    try:
        parser = MultipartParser(params[b"boundary"], form.callbacks())
        async for chunk in request.stream():
            # The callbacks write to disk: off the event loop, as UploadFile does.
            await run_in_threadpool(parser.write, chunk)
        parser.finalize()
    except ClientDisconnect:  # no one is left to answer; a problem (not a 500) keeps the log quiet
        detail = "the client closed the connection before the upload was complete"
        raise Problem(400, "upload-interrupted", "Upload interrupted", detail) from None
    except FormParserError as exc:
        detail = f"the form cannot be read: {exc}"
        raise Problem(400, "malformed-multipart", "Malformed multipart body", detail) from None
    finally:
        form.close()
    if not form.ended:
        raise Problem(400, "malformed-multipart", "Malformed multipart body", "the body ended before the form did")
    if form.upload is None:
        raise validation_problem([{"loc": ["body", FILE_FIELD], "msg": "Field required", "type": "missing"}])
    form.upload.fields = form.fields
    return form.upload


class _Form:
    """python-multipart callbacks: one part at a time, the file to disk, text fields to memory."""

    def __init__(self, dest: Path, limit: int, allowed: frozenset[str], check_filename) -> None:
        self.dest, self.limit, self.allowed, self.check_filename = dest, limit, allowed, check_filename
        self.upload: Upload | None = None
        self.fields: dict[str, str] = {}
        self.ended = False
        self._file: BinaryIO | None = None  # open while the file part is being received
        self._hash = hashlib.sha256()
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._header_bytes = 0
        self._disposition = b""
        self._field: str | None = None  # the text field being received
        self._value = bytearray()

    def callbacks(self) -> dict[str, Callable[..., None]]:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda data, start, end: self._header(self._header_name, data[start:end]),
            "on_header_value": lambda data, start, end: self._header(self._header_value, data[start:end]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_end": self._end,
        }

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _part_begin(self) -> None:
        self._disposition, self._field, self._header_bytes = b"", None, 0
        self._value = bytearray()

    def _header(self, into: bytearray, data: bytes) -> None:
        self._header_bytes += len(data)
        if self._header_bytes > MAX_HEADER_BYTES:
            detail = f"the headers of a part are longer than {MAX_HEADER_BYTES} bytes"
            raise Problem(400, "malformed-multipart", "Malformed multipart body", detail)
        into.extend(data)

    def _header_end(self) -> None:
        if bytes(self._header_name).strip().lower() == b"content-disposition":
            self._disposition = bytes(self._header_value)
        self._header_name.clear()
        self._header_value.clear()

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        if b"name" not in options:
            detail = "a part has no Content-Disposition header with a name"
            raise Problem(400, "malformed-multipart", "Malformed multipart body", detail)
        name = options[b"name"].decode("utf-8", "replace")
        filename = options[b"filename"].decode("utf-8", "replace") if b"filename" in options else None
        if name == FILE_FIELD:
            self._start_file(filename)
        elif name in self.allowed:
            if filename is not None or name in self.fields:
                raise _bad_field(name, "must be sent once, as a text field")
            self._field = name
        else:
            expected = ", ".join([FILE_FIELD, *sorted(self.allowed)])
            raise _bad_field(name, f"unexpected form field; this form takes {expected}", "extra_forbidden")

    def _start_file(self, filename: str | None) -> None:
        if filename is None or self.upload is not None:
            raise _bad_field(FILE_FIELD, "must be sent once, as a file part (with a filename)")
        filename = PureWindowsPath(filename).name  # some clients send a whole path, either way of slashes
        if self.check_filename is not None:
            self.check_filename(filename)
        self.upload = Upload(self.dest, filename)
        self._file = open(self.dest, "xb")  # noqa: SIM115 - closed in _part_end or close()

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if self._file is not None:
            assert self.upload is not None
            self.upload.bytes += len(chunk)
            if self.upload.bytes > self.limit:
                raise too_large(self.limit)
            self._hash.update(chunk)
            self._file.write(chunk)
        elif self._field is not None:
            self._value.extend(chunk)
            if len(self._value) > MAX_FIELD_BYTES:
                raise _bad_field(self._field, f"longer than {MAX_FIELD_BYTES} bytes")

    def _part_end(self) -> None:
        if self._file is not None:
            assert self.upload is not None
            self._file.flush()
            os.fsync(self._file.fileno())  # on disk before anything records it
            self.close()
            self.upload.sha256 = self._hash.hexdigest()
        elif self._field is not None:
            try:
                self.fields[self._field] = self._value.decode("utf-8")
            except UnicodeDecodeError:
                raise _bad_field(self._field, "not UTF-8 text") from None

    def _end(self) -> None:
        self.ended = True


def _bad_field(name: str, msg: str, kind: str = "value_error") -> Problem:
    return validation_problem([{"loc": ["body", name], "msg": msg, "type": kind}])
