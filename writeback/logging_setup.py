"""Structured logging for every entry point, and Application Insights when configured.

``configure_logging()`` is idempotent and cheap after its first call, so each
Function entry point calls it (nothing happens at import, which keeps a cold
start short). It does two things:

* Log records are rendered as one JSON object per line: time, level, logger,
  message, and every ``extra=`` field the code passed (group id, operation,
  outcome, latency...). Under the Azure Functions Python worker the records
  already go to the host through the worker's handler on the root logger; our
  formatter is put on that handler, so the host (console, log stream, the
  classic Application Insights traces) receives the JSON line. Elsewhere (the
  CLI, single-machine mode) a stderr handler with the same formatter is added
  when ``stream_handler=True``.
* When ``APPLICATIONINSIGHTS_CONNECTION_STRING`` is set, OpenTelemetry export
  through ``azure-monitor-opentelemetry`` (``configure_azure_monitor``) is
  switched on for the ``writeback`` loggers: each record's ``extra=`` fields
  become custom dimensions in Application Insights, queryable without parsing.
  The distro is imported only then (it costs a few hundred milliseconds).

Secrets never reach a log line by construction (settings keep them out of
``repr``, the webhook logs counts, not bodies). As a second line of defence
the formatter drops the value of any extra field whose name looks like a
secret (password, secret, token, client state, authorization, code, key) and
any value that is bytes (a raw body).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
from datetime import UTC, datetime
from typing import Any, TextIO

__all__ = ["JsonFormatter", "configure_logging", "redacted"]

#: Attributes every LogRecord has; anything else on a record came from ``extra=``.
_RECORD_FIELDS = frozenset(
    vars(logging.LogRecord("", logging.INFO, "", 0, "", None, None)).keys()
) | {"message", "asctime", "taskName"}
_SECRET_NAME = re.compile(
    r"pass(word)?|secret|token|client_?state|authori[sz]ation|(^|_)code$|(^|_)key$|credential",
    re.IGNORECASE,
)
_REDACTED = "[redacted]"
_MAX_FIELD = 2000

_lock = threading.Lock()


class _State:
    configured = False
    monitor_configured = False


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts, level, logger, msg, extras, exception."""

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key in _RECORD_FIELDS or key.startswith("_") or key in document:
                continue
            document[key] = redacted(key, value)
        if record.exc_info:
            document["exc"] = self.formatException(record.exc_info)[-_MAX_FIELD * 4 :]
        return json.dumps(document, default=str, ensure_ascii=False, separators=(",", ":"))


def redacted(key: str, value: object) -> object:
    """The value to log for an extra field (secret-looking names and bytes are dropped)."""
    if _SECRET_NAME.search(key):
        return _REDACTED
    if isinstance(value, bytes | bytearray | memoryview):
        return f"[{len(value)} bytes]"
    if isinstance(value, str) and len(value) > _MAX_FIELD:
        return value[:_MAX_FIELD] + "..."
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)[:_MAX_FIELD]


def configure_logging(
    *,
    level: int | str | None = None,
    stream_handler: bool | None = None,
    stream: TextIO | None = None,
) -> None:
    """Set up structured logging once per process (later calls return at once).

    ``level`` defaults to ``WRITEBACK_LOG_LEVEL`` or INFO, for the ``writeback``
    loggers. ``stream_handler`` defaults to True outside the Functions host.
    """
    if _State.configured:
        return
    with _lock:
        if _State.configured:
            return
        in_functions = _under_functions_host()
        chosen = level or os.environ.get("WRITEBACK_LOG_LEVEL", "").strip().upper() or "INFO"
        logging.getLogger("writeback").setLevel(chosen)
        formatter = JsonFormatter()
        root = logging.getLogger()
        if in_functions and root.handlers:
            # The worker's handler forwards to the host: let it carry JSON lines.
            for handler in root.handlers:
                handler.setFormatter(formatter)
        elif stream_handler if stream_handler is not None else not in_functions:
            handler = logging.StreamHandler(stream) if stream else _StderrHandler()
            handler.setFormatter(formatter)
            root.addHandler(handler)
            if root.level > logging.INFO or root.level == logging.NOTSET:
                root.setLevel(logging.INFO)
        _configure_azure_monitor()
        _State.configured = True


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at the time (it may be replaced later)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        pass


def _under_functions_host() -> bool:
    return bool(os.environ.get("FUNCTIONS_WORKER_RUNTIME")) or "azure_functions_worker" in (
        sys.modules
    )


def _configure_azure_monitor() -> None:
    """OpenTelemetry export to Application Insights, when its connection string is set."""
    if _State.monitor_configured or not os.environ.get("APPLICATIONINSIGHTS_CONNECTION_STRING"):
        return
    log = logging.getLogger("writeback.logging")
    try:
        from azure.monitor.opentelemetry import configure_azure_monitor
    except ImportError:
        log.warning(
            "APPLICATIONINSIGHTS_CONNECTION_STRING is set but azure-monitor-opentelemetry "
            "is not installed; logs stay local"
        )
        return
    try:
        # The connection string is read from the environment by the distro itself.
        configure_azure_monitor(logger_name="writeback")
    except Exception as error:  # a telemetry problem must never stop the app
        log.warning("Application Insights export not enabled: %s", type(error).__name__)
        return
    _State.monitor_configured = True
    log.info("Application Insights export enabled through OpenTelemetry")


def _reset_for_tests() -> None:
    """Forget that logging was configured (tests configure it more than once)."""
    with _lock:
        _State.configured = False
