"""Log redaction at every depth (issue 12, item 8).

On main the formatter looked only at top-level extra names: a secret inside a
dict or a list in ``extra``, in an exception's args, or in the message text went
out as it was. These records go through the real formatter and the filter that
sits on every handler (the OpenTelemetry one included), and the secrets must not
appear anywhere in what a handler receives.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from writeback import logging_setup
from writeback.logging_setup import JsonFormatter, RedactingFilter, redact_text, redacted

PASSWORD = "hunter2-Sup3r-secret"
KEY = "c2VjcmV0LWtleS1ieXRlcy1mb3ItdGVzdHM="
CLIENT_STATE = "client-state-value-0123456789abcdef"


def record(msg: str = "event", *args: object, **extra: object) -> logging.LogRecord:
    made = logging.LogRecord("writeback.test", logging.WARNING, __file__, 1, msg, args, None)
    for name, value in extra.items():
        setattr(made, name, value)
    return made


def formatted(made: logging.LogRecord) -> str:
    return JsonFormatter().format(made)


def assert_clean(text: str) -> None:
    for secret in (PASSWORD, KEY, CLIENT_STATE):
        assert secret not in text, text


def test_nested_dicts_and_lists_in_extra_are_redacted_by_name() -> None:
    made = record(
        settings={"ldap": {"user": "svc", "password": PASSWORD}, "relay": [{"caller_key": KEY}]},
        subscriptions=[{"id": "s1", "clientState": CLIENT_STATE}],
        pairs=(("ok", 1), {"token": KEY}),
        tags={"a", "b"},
    )
    line = json.loads(formatted(made))
    assert line["settings"] == {
        "ldap": {"user": "svc", "password": "[redacted]"},
        "relay": [{"caller_key": "[redacted]"}],
    }
    assert line["subscriptions"] == [{"id": "s1", "clientState": "[redacted]"}]
    assert line["pairs"] == [["ok", 1], {"token": "[redacted]"}]
    assert sorted(line["tags"]) == ["a", "b"]


def test_an_exception_in_extra_keeps_its_type_and_loses_its_secrets() -> None:
    error = ValueError("bind refused", {"password": PASSWORD}, f"password={PASSWORD}")
    line = json.loads(formatted(record(error=error)))
    assert line["error"]["type"] == "ValueError"
    assert line["error"]["args"][0] == "bind refused"
    assert line["error"]["args"][1] == {"password": "[redacted]"}
    assert_clean(json.dumps(line))


@pytest.mark.parametrize(
    "text",
    [
        f"connecting with password={PASSWORD} failed",
        f"settings {{'ldap_password': '{PASSWORD}', 'user': 'svc'}}",
        f'body {{"clientState": "{CLIENT_STATE}"}}',
        f"Endpoint=sb://x.servicebus.windows.net/;SharedAccessKeyName=send;SharedAccessKey={KEY}",
        f"DefaultEndpointsProtocol=https;AccountName=st;AccountKey={KEY};EndpointSuffix=x",
        f"POST https://app.azurewebsites.net/api/notifications?code={KEY}&x=1",
        f"SharedAccessSignature sr=https%3a%2f%2fns&sig={KEY}&se=1&skn=send",
        f"Authorization: Bearer {KEY}",
        f"WRITEBACK_RELAY_CALLER_KEY: {KEY}",
    ],
)
def test_secrets_in_text_are_redacted(text: str) -> None:
    clean = redact_text(text)
    assert_clean(clean)
    assert "[redacted]" in clean


def test_text_without_secrets_is_left_as_it_is() -> None:
    for text in (
        "group 1f0e... modified: 3 members added",
        "SharedAccessKeyName=send",
        "LDAP modify of 'CN=x': insufficientAccessRights (50)",
        "3 tokens left in the bucket",
    ):
        assert redact_text(text) == text
    assert redacted("count", 3) == 3 and redacted("body", b"abc") == "[3 bytes]"


def test_message_arguments_and_tracebacks_are_redacted() -> None:
    try:
        raise RuntimeError(f"could not bind: password={PASSWORD}", {"secret": KEY})
    except RuntimeError:
        import sys

        made = logging.LogRecord(
            "writeback.test",
            logging.ERROR,
            __file__,
            1,
            "settings %s",
            ({"password": PASSWORD},),
            sys.exc_info(),
        )
    text = formatted(made)
    assert_clean(text)
    line = json.loads(text)
    assert "RuntimeError" in line["exc"] and "[redacted]" in line["exc"]


def test_the_filter_redacts_the_record_before_any_exporter_sees_it() -> None:
    """The Application Insights handler exports record attributes as they are, without
    our formatter: the filter on it must leave nothing secret on the record."""
    try:
        raise ConnectionError(f"AccountKey={KEY}")
    except ConnectionError:
        import sys

        made = record("dsn %s", f"password={PASSWORD}", nested={"x": [{"password": PASSWORD}]})
        made.exc_info = sys.exc_info()
    assert RedactingFilter().filter(made)
    assert_clean(made.getMessage())
    assert made.nested == {"x": [{"password": "[redacted]"}]}  # type: ignore[attr-defined]
    assert made.exc_info is None and made.exc_text is not None
    assert "ConnectionError" in made.exc_text
    assert_clean(repr(vars(made)))


def test_an_exception_without_secrets_keeps_its_object() -> None:
    try:
        raise KeyError("group-id")
    except KeyError:
        import sys

        made = record("lookup failed")
        made.exc_info = sys.exc_info()
    RedactingFilter().filter(made)
    assert made.exc_info is not None  # exporters still see a real exception


@pytest.fixture
def configured(monkeypatch: pytest.MonkeyPatch) -> Iterator[io.StringIO]:
    monkeypatch.delenv("FUNCTIONS_WORKER_RUNTIME", raising=False)
    monkeypatch.delenv("APPLICATIONINSIGHTS_CONNECTION_STRING", raising=False)
    stream = io.StringIO()
    root = logging.getLogger()
    before = list(root.handlers)
    logging_setup._reset_for_tests()
    logging_setup.configure_logging(stream=stream)
    try:
        yield stream
    finally:
        for handler in root.handlers[:]:
            if handler not in before:
                root.removeHandler(handler)
        logging_setup._reset_for_tests()


def test_configured_logging_puts_the_filter_on_its_handler(configured: io.StringIO) -> None:
    logging.getLogger("writeback.test").warning(
        "relay %s", f"sig={KEY}", extra={"request": {"headers": {"Authorization": KEY}}}
    )
    text = configured.getvalue()
    assert_clean(text)
    assert json.loads(text.splitlines()[-1])["request"] == {
        "headers": {"Authorization": "[redacted]"}
    }
