"""Logging set-up shared by every expertmesh process, with the request and trace on every line.

Environment:

``EXPERTMESH_LOG_LEVEL``
    DEBUG, INFO (default), WARNING, ERROR.
``EXPERTMESH_LOG_FORMAT``
    ``text`` (default): ``time LEVEL logger: message``, followed by
    ``[request_id=... trace_id=...]`` while a request is being served.
    ``json``: one JSON object per line with ``time`` (ISO 8601, UTC), ``level``, ``logger``, ``message``,
    ``request_id`` and ``trace_id`` (null outside a request), and ``exc_info`` when there is one.

The request id and trace id come from :func:`request_context` (set by the servicers for the
duration of a request) or, failing that, from the current OpenTelemetry span.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from contextvars import ContextVar
from pathlib import Path

from opentelemetry import trace
from pythonjsonlogger.json import JsonFormatter

LEVEL_ENV = "EXPERTMESH_LOG_LEVEL"
FORMAT_ENV = "EXPERTMESH_LOG_FORMAT"
FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_request_id: ContextVar[str | None] = ContextVar("expertmesh_request_id", default=None)
_trace_id: ContextVar[str | None] = ContextVar("expertmesh_trace_id", default=None)


@contextmanager
def request_context(request_id: str | None, trace_id: str | None = None) -> Iterator[None]:
    """Tag every log line written inside the block with this request id and trace id."""
    tokens = (_request_id.set(request_id or None), _trace_id.set(trace_id or None))
    try:
        yield
    finally:
        for var, token in zip((_request_id, _trace_id), tokens, strict=True):
            # ValueError: closed from another context (an abandoned async generator finalised by
            # the loop); the request's own context, where the value lives, is gone with its task.
            with suppress(ValueError):
                var.reset(token)


def current_request_id() -> str | None:
    """The request id of the request being served, if any."""
    return _request_id.get()


def current_trace_id() -> str | None:
    """The trace id of the request being served, else of the current span, if any."""
    trace_id = _trace_id.get()
    if trace_id:
        return trace_id
    span_context = trace.get_current_span().get_span_context()
    return format(span_context.trace_id, "032x") if span_context.is_valid else None


class RequestContextFilter(logging.Filter):
    """Adds ``request_id`` and ``trace_id`` (None outside a request) to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = current_request_id()
        record.trace_id = current_trace_id()
        return True


class TextFormatter(logging.Formatter):
    """The plain format, with ``[request_id=... trace_id=...]`` appended while they are known."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        request_id = getattr(record, "request_id", None)
        trace_id = getattr(record, "trace_id", None)
        if not (request_id or trace_id):
            return line
        tag = f" [request_id={request_id or '-'} trace_id={trace_id or '-'}]"
        head, sep, rest = line.partition("\n")  # keep a traceback below the tagged first line
        return head + tag + sep + rest


def make_formatter(fmt: str) -> logging.Formatter:
    """The formatter for ``text`` or ``json``."""
    if fmt == "json":
        return JsonFormatter(
            ["levelname", "name", "message", "request_id", "trace_id"],
            rename_fields={"levelname": "level", "name": "logger"},
            timestamp="time",
        )
    if fmt == "text":
        return TextFormatter(TEXT_FORMAT)
    raise ValueError(f"{FORMAT_ENV} must be one of {', '.join(FORMATS)}, got {fmt!r}")


def setup_logging(level: str | None = None) -> None:
    """Log to stderr; level from ``level`` or EXPERTMESH_LOG_LEVEL, format from EXPERTMESH_LOG_FORMAT."""
    handler = logging.StreamHandler()
    handler.setFormatter(make_formatter(os.environ.get(FORMAT_ENV, "text").strip().lower() or "text"))
    handler.addFilter(RequestContextFilter())
    logging.basicConfig(level=(level or os.environ.get(LEVEL_ENV, "INFO")).upper(), handlers=[handler])


def log_tail(path: Path, lines: int) -> str:
    """The last ``lines`` lines of a process's log file ("" when it cannot be read)."""
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])
