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
every record is redacted before any handler sees it (:class:`RedactingFilter`
on our handlers and on the OpenTelemetry one, and the formatter again):

* the value of any field whose name looks like a secret (password, secret,
  token, client state, authorization, credential, code, key), at any depth:
  extras are walked into dicts, lists, tuples and sets, and an exception given
  as a value becomes its type and its (redacted) args;
* bytes (a raw body) become their length;
* in text (the message, string values, an exception's traceback) the value of
  ``name=value`` / ``name: value`` pairs with such a name (``password=...``,
  ``AccountKey=...``, ``'client_state': '...'``), URL query parameters such as
  ``?code=`` and ``&sig=``, and ``Bearer``/``SharedAccessSignature`` tokens.

When an exception's text held a secret, the record keeps only the redacted
traceback (as text) and drops the exception object, so no exporter formats the
original again.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
import traceback
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, TextIO

from writeback.config import load_logging_settings

__all__ = ["JsonFormatter", "RedactingFilter", "configure_logging", "redact_text", "redacted"]

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
_MAX_DEPTH = 6
_MAX_ITEMS = 200
_SENSITIVE_WORDS = (
    r"pass(?:word|wd)?|pwd|secret|token|client_?state|credential|authori[sz]ation|sig(?:nature)?|"
    r"(?:account|access|shared_?access|api|caller|listen|send|host|function|master)_?key"
)
#: ``name=value``, ``name: value``, ``'name': 'value'`` with a secret-looking name.
_SECRET_PAIR = re.compile(
    rf"(?P<name>\b[\w.-]*?(?:{_SENSITIVE_WORDS}))(?P<sep>['\"]?\s*[=:]\s*)"
    r"(?P<value>\"[^\"]*\"|'[^']*'|(?:Bearer|Basic|SharedAccessSignature)\s+\S+|[^\s;&,'\"}\]]+)",
    re.IGNORECASE,
)
#: URL query parameters that carry keys and signatures.
_SECRET_QUERY = re.compile(
    r"(?P<name>[?&](?:code|sig|signature|key|token|access_token|client_secret|password)=)"
    r"(?P<value>[^&#\s'\"]+)",
    re.IGNORECASE,
)
_SECRET_SCHEME = re.compile(
    r"\b(?P<name>Bearer|Basic|SharedAccessSignature)\s+(?P<value>[^\s'\",]+)", re.IGNORECASE
)

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
            "msg": redact_text(record.getMessage()),
        }
        for key, value in vars(record).items():
            if key in _RECORD_FIELDS or key.startswith("_") or key in document:
                continue
            document[key] = redacted(key, value)
        if record.exc_info or record.exc_text:
            text = record.exc_text or self.formatException(record.exc_info)  # type: ignore[arg-type]
            document["exc"] = redact_text(text, limit=_MAX_FIELD * 4, keep="end")
        return json.dumps(document, default=str, ensure_ascii=False, separators=(",", ":"))


class RedactingFilter(logging.Filter):
    """Redacts a record in place before a handler formats or exports it.

    Put on handlers (a filter on a logger is not consulted for records of its
    child loggers): ours, and the OpenTelemetry handler of Application Insights,
    which exports extras as custom dimensions without our formatter.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "_writeback_redacted", False):
            return True
        try:
            message = record.getMessage()
        except Exception:  # a bad format string must not raise at the logging call
            message = f"{record.msg} {record.args}"
        record.msg, record.args = redact_text(message, limit=None), None
        for key, value in list(vars(record).items()):
            if key in _RECORD_FIELDS or key.startswith("_"):
                continue
            setattr(record, key, redacted(key, value))
        if record.exc_info and record.exc_info[1] is not None:
            text = "".join(traceback.format_exception(*record.exc_info))
            clean = redact_text(text, limit=None)
            if clean != text:  # a secret in the exception: keep only the redacted text
                record.exc_info, record.exc_text = None, clean
        elif record.exc_text:
            record.exc_text = redact_text(record.exc_text, limit=None)
        record._writeback_redacted = True
        return True


def redacted(key: str, value: object, _depth: int = 0) -> object:
    """The value to log for a field named ``key``: secret-looking names are dropped at
    any depth, bytes become their length, text is scrubbed (:func:`redact_text`)."""
    if _SECRET_NAME.search(key):
        return _REDACTED
    if isinstance(value, bytes | bytearray | memoryview):
        return f"[{len(value)} bytes]"
    if isinstance(value, str):
        return redact_text(value)
    if value is None or isinstance(value, bool | int | float):
        return value
    return _redacted_structure(key, value, _depth)


def _redacted_structure(key: str, value: object, depth: int) -> object:
    """Dicts, sequences, sets and exceptions, walked to :data:`_MAX_DEPTH`."""
    if depth >= _MAX_DEPTH:
        return "[nested too deep]"
    if isinstance(value, Mapping):
        items = list(value.items())[:_MAX_ITEMS]
        return {str(k): redacted(str(k), v, depth + 1) for k, v in items}
    if isinstance(value, list | tuple | set | frozenset):
        return [redacted(key, item, depth + 1) for item in list(value)[:_MAX_ITEMS]]
    if isinstance(value, BaseException):
        return {"type": type(value).__name__, "args": redacted(key, list(value.args), depth + 1)}
    return redact_text(str(value))


def redact_text(text: str, *, limit: int | None = _MAX_FIELD, keep: str = "start") -> str:
    """``text`` with secret values in it replaced (module docstring), cut to ``limit``."""
    text = _SECRET_QUERY.sub(lambda m: m["name"] + _REDACTED, text)
    text = _SECRET_SCHEME.sub(lambda m: f"{m['name']} {_REDACTED}", text)
    text = _SECRET_PAIR.sub(_redact_pair, text)
    if limit is not None and len(text) > limit:
        return text[:limit] + "..." if keep == "start" else "..." + text[-limit:]
    return text


def _redact_pair(match: re.Match[str]) -> str:
    value = match["value"]
    if value.startswith(_REDACTED) or value.endswith(_REDACTED):
        return match[0]
    quote = value[0] if value[:1] in "'\"" else ""
    return f"{match['name']}{match['sep']}{quote}{_REDACTED}{quote}"


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
        settings = load_logging_settings()
        in_functions = settings.under_functions_host or "azure_functions_worker" in sys.modules
        chosen = level or settings.level
        logging.getLogger("writeback").setLevel(chosen)
        # The HTTP clients log every request with its full URL (delta and skip tokens,
        # ids) at INFO: one line per Graph call is noise, and the URLs are not ours to log.
        for chatty in _CHATTY:
            logging.getLogger(chatty).setLevel(logging.WARNING)
        formatter = JsonFormatter()
        root = logging.getLogger()
        if in_functions and root.handlers:
            # The worker's handler forwards to the host: let it carry JSON lines.
            for handler in root.handlers:
                handler.setFormatter(formatter)
                _add_redaction(handler)
        elif stream_handler if stream_handler is not None else not in_functions:
            handler = logging.StreamHandler(stream) if stream else _StderrHandler()
            handler.setFormatter(formatter)
            _add_redaction(handler)
            root.addHandler(handler)
            if root.level > logging.INFO or root.level == logging.NOTSET:
                root.setLevel(logging.INFO)
        _configure_azure_monitor()
        _State.configured = True


#: Libraries whose request-by-request INFO lines are kept out of the logs.
_CHATTY = ("httpx", "httpcore", "azure", "msal", "websockets")


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


def _add_redaction(handler: logging.Handler) -> None:
    if not any(isinstance(existing, RedactingFilter) for existing in handler.filters):
        handler.addFilter(RedactingFilter())


def _configure_azure_monitor() -> None:
    """OpenTelemetry export to Application Insights, when its connection string is set."""
    if _State.monitor_configured or not load_logging_settings().application_insights:
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
    for handler in logging.getLogger("writeback").handlers:
        _add_redaction(handler)  # the OpenTelemetry handler exports extras as they are
    _State.monitor_configured = True
    log.info("Application Insights export enabled through OpenTelemetry")


def _reset_for_tests() -> None:
    """Forget that logging was configured (tests configure it more than once)."""
    with _lock:
        _State.configured = False
