import contextvars
import json
import logging
import sys
import threading

from app import logctx
from app.logctx import JsonFormatter, TextFormatter


def record(message: str = "job started", level: int = logging.INFO, exc_info=None, **extra) -> logging.LogRecord:
    return logging.getLogger("worker.tasks").makeRecord("worker.tasks", level, __file__, 1, message, (), exc_info, extra=extra)


def test_a_json_line_has_time_level_logger_message_bound_fields_and_extras():
    with logctx.bound(job_id="j1", tenant_id="t1"):
        line = json.loads(JsonFormatter().format(record(status=200, route="/v1/jobs/{job_id}")))
    assert line.pop("timestamp").endswith("+00:00")
    assert line == {"level": "info", "logger": "worker.tasks", "message": "job started", "job_id": "j1",
                    "tenant_id": "t1", "status": 200, "route": "/v1/jobs/{job_id}"}


def test_a_json_line_with_a_traceback_is_still_one_line():
    try:
        raise ValueError("bad\nvalue")
    except ValueError:
        text = JsonFormatter().format(record("failed", logging.ERROR, exc_info=sys.exc_info()))
    assert "\n" not in text
    line = json.loads(text)
    assert line["level"] == "error" and "ValueError: bad" in line["exception"]


def test_a_text_line_puts_the_bound_fields_after_the_message_and_before_a_traceback():
    try:
        raise ValueError("bad")
    except ValueError:
        with logctx.bound(job_id="j1"):
            text = TextFormatter().format(record("failed", logging.ERROR, exc_info=sys.exc_info()))
    first, traceback = text.split("\n", 1)
    assert first.endswith(" ERROR worker.tasks: failed job_id=j1")
    assert traceback.startswith("Traceback") and "job_id" not in traceback


def test_bound_scopes_nest_and_end():
    assert logctx.fields() == {}
    with logctx.bound(request_id="r1"):
        with logctx.bound(job_id="j1"):
            assert logctx.fields() == {"request_id": "r1", "job_id": "j1"}
        assert logctx.fields() == {"request_id": "r1"}
    assert logctx.fields() == {}


def test_bind_in_a_copied_context_reaches_the_scope_that_opened_it():
    """As FastAPI runs a sync dependency: in a thread, with a copy of the request's context.
    A field it binds must still reach the request's other log lines."""
    with logctx.bound(request_id="r1"):
        context = contextvars.copy_context()
        thread = threading.Thread(target=context.run, args=(logctx.bind,), kwargs={"tenant_id": "t1"})
        thread.start()
        thread.join()
        assert logctx.fields() == {"request_id": "r1", "tenant_id": "t1"}
    assert logctx.fields() == {}


def test_configure_formats_the_console_handler_and_leaves_others(monkeypatch):
    root = logging.getLogger()
    other, console = logging.Handler(), logging.StreamHandler()
    monkeypatch.setattr(root, "handlers", [other, console])
    monkeypatch.setattr(root, "level", root.level)
    logctx.configure("json")
    assert isinstance(console.formatter, JsonFormatter) and other.formatter is None
    logctx.configure("text")
    assert isinstance(console.formatter, TextFormatter) and root.handlers == [other, console]
