"""Structured logs: context fields (job_id, tenant_id, request_id, …) carried by every log
line written while they are bound, and the two line formats (`QFORGE_LOG_FORMAT`).

    from app.logctx import bind, bound

    with bound(job_id=job_id):        # a scope: the worker's task, the API's request
        log.info("started")           # ... job_id=<id>
    bind(tenant_id=tenant.id)         # add to the scope already open (e.g. from a dependency)

The API's request middleware (app/middleware.py) opens one scope per request, holding its
request_id and the ids in its path (job_id, dataset_id, model_id); the worker's task opens
one per job. `bind` adds fields to the scope in place, so a field bound by a FastAPI
dependency is seen by the route and by the request's own log line, even though FastAPI runs
sync dependencies in a worker thread (with a copy of the context: a new ContextVar value
set there would be lost when it returns, a change to the shared dict is not).

Only the standard library: quantcore's loggers are formatted by it too, but never import it.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Literal

LogFormat = Literal["text", "json"]

_fields: ContextVar[dict[str, Any] | None] = ContextVar("qforge_log_fields", default=None)


def bind(**fields: Any) -> None:
    """Add fields to every log line of the current scope (the request or job being handled).
    Outside any scope they stay bound for the rest of the current context."""
    current = _fields.get()
    if current is None:
        _fields.set(dict(fields))
    else:
        current.update(fields)


@contextmanager
def bound(**fields: Any) -> Iterator[None]:
    """A new scope holding the enclosing scope's fields and these; gone when the block ends."""
    token = _fields.set({**(_fields.get() or {}), **fields})
    try:
        yield
    finally:
        _fields.reset(token)


def fields() -> dict[str, Any]:
    """The fields bound now (a copy)."""
    return dict(_fields.get() or {})


# What a LogRecord holds by itself; anything else on a record came from `extra=`.
_RECORD_ATTRIBUTES = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}
_DROPPED_EXTRAS = {"color_message"}  # uvicorn's colored copy of the message


class JsonFormatter(logging.Formatter):
    """One JSON object a line: timestamp (UTC, ISO 8601), level, logger, message, then the
    bound context fields, the record's `extra=` fields, and the traceback if any."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "timestamp": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update(fields())
        for key, value in vars(record).items():
            if key not in _RECORD_ATTRIBUTES and key not in _DROPPED_EXTRAS and key not in line:
                line[key] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exception"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """`time LEVEL logger: message key=value …`, the bound context fields after the message
    (the `extra=` fields are for machines: only the JSON lines carry them)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        context = fields()
        if not context:
            return text
        pairs = " ".join(f"{key}={value}" for key, value in context.items())
        first, newline, rest = text.partition("\n")  # after the message, before a traceback
        return f"{first} {pairs}{newline}{rest}"


def formatter(log_format: LogFormat) -> logging.Formatter:
    return JsonFormatter() if log_format == "json" else TextFormatter()


def configure(log_format: LogFormat, level: int = logging.INFO) -> None:
    """Log to stderr in `log_format`: the root logger's console handler (logging.basicConfig's,
    or one added here) takes the format; other handlers (a test's capture) are left alone."""
    root = logging.getLogger()
    root.setLevel(level)
    consoles = [h for h in root.handlers if type(h) is logging.StreamHandler]
    if not consoles:
        consoles = [logging.StreamHandler()]
        root.addHandler(consoles[0])
    for handler in consoles:
        handler.setFormatter(formatter(log_format))
