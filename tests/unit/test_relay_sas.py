"""SAS tokens and endpoint rules of the hybrid relay adapter, and the stand-in's checks."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from urllib.parse import unquote

import pytest

from writeback.adapters.hybrid_connection import RelayEndpoint, sas_token
from writeback.errors import ConfigError
from writeback_sandbox.relay_standin import SasRule, _check_token, _Denied, _HybridConnection

NAMESPACE = "contoso.servicebus.windows.net"
KEY = "c2VjcmV0LWtleS1ub3QtZGVjb2RlZA=="


def _fields(token: str) -> dict[str, str]:
    scheme, _, rest = token.partition(" ")
    assert scheme == "SharedAccessSignature"
    return dict(part.split("=", 1) for part in rest.split("&"))


def test_token_fields_and_signature_follow_the_documented_recipe() -> None:
    token = sas_token(f"http://{NAMESPACE}/agent", "send", KEY, ttl=600, now=1_700_000_000)
    fields = _fields(token)
    assert fields["sr"] == "http%3A%2F%2Fcontoso.servicebus.windows.net%2Fagent"
    assert fields["se"] == "1700000600"
    assert fields["skn"] == "send"
    # HMAC-SHA256, keyed with the key's UTF-8 bytes (not base64-decoded), over the
    # URL-encoded resource URI, a newline and the expiry.
    signed = f"{fields['sr']}\n1700000600".encode()
    expected = base64.b64encode(hmac.new(KEY.encode(), signed, hashlib.sha256).digest())
    assert unquote(fields["sig"]).encode() == expected
    assert "+" not in fields["sig"] and "/" not in fields["sig"]  # URL-encoded


def _hc() -> _HybridConnection:
    rules = [
        SasRule("listen", KEY, frozenset({"Listen"})),
        SasRule("root", KEY, frozenset({"Manage"})),
    ]
    return _HybridConnection("agent", {rule.name: rule for rule in rules})


def test_standin_accepts_another_encoder_of_the_resource_uri() -> None:
    # .NET's HttpUtility.UrlEncode writes lower-case escapes and a trailing slash: the
    # signature covers the sr exactly as written, so that token must be accepted.
    sr, expiry = "http%3a%2f%2fcontoso.servicebus.windows.net%2fagent%2f", int(time.time()) + 600
    digest = hmac.new(KEY.encode(), f"{sr}\n{expiry}".encode(), hashlib.sha256).digest()
    sig = base64.b64encode(digest).decode().replace("+", "%2B").replace("/", "%2F")
    token = f"SharedAccessSignature sr={sr}&sig={sig.replace('=', '%3D')}&se={expiry}&skn=listen"
    assert _check_token(_hc(), NAMESPACE, token, "Listen") == expiry


@pytest.mark.parametrize(
    "case",
    [
        ("http://contoso.servicebus.windows.net/agent", "listen", "wrong", "Listen", 600, 401),
        ("http://contoso.servicebus.windows.net/agent", "nobody", KEY, "Listen", 600, 401),
        ("http://contoso.servicebus.windows.net/agent", "listen", KEY, "Listen", -5, 401),
        ("http://contoso.servicebus.windows.net/agent", "listen", KEY, "Listen", 50, 401),
        ("http://contoso.servicebus.windows.net/other", "listen", KEY, "Listen", 600, 403),
        ("http://contoso.servicebus.windows.net:444/agent", "listen", KEY, "Listen", 600, 403),
        ("http://contoso.servicebus.windows.net/agent", "listen", KEY, "Send", 600, 403),
    ],
)
def test_standin_refuses_bad_tokens(case: tuple[str, str, str, str, float, int]) -> None:
    resource, key_name, key, right, ttl, status = case
    token = sas_token(resource, key_name, key, ttl=ttl)
    with pytest.raises(_Denied) as denied:
        _check_token(_hc(), NAMESPACE, token, right)
    assert denied.value.status == status


def test_standin_refuses_tokens_with_under_a_minute_left() -> None:
    token = sas_token(f"http://{NAMESPACE}/agent", "listen", KEY, ttl=59)
    with pytest.raises(_Denied, match="less than a minute"):
        _check_token(_hc(), NAMESPACE, token, "Listen")
    assert _check_token(_hc(), NAMESPACE, token, "Listen", min_lifetime=0) > time.time()


def test_standin_takes_the_default_port_in_a_token_audience() -> None:
    # hyco-https's createRelayToken keeps the :443 of createRelayListenUri in sr.
    for resource in (f"http://{NAMESPACE}:443/agent", f"http://{NAMESPACE.upper()}:443/"):
        token = sas_token(resource, "root", KEY, ttl=600)
        assert _check_token(_hc(), NAMESPACE, token, "Listen") > time.time()


def test_manage_grants_listen_and_send_and_a_namespace_token_covers_its_entities() -> None:
    token = sas_token(f"https://{NAMESPACE}/", "root", KEY)
    for right in ("Listen", "Send"):
        assert _check_token(_hc(), NAMESPACE, token, right) > time.time()


def test_endpoint_addresses_and_rendezvous_trust() -> None:
    endpoint = RelayEndpoint(NAMESPACE, "agent")
    assert endpoint.websocket_url("listen", "id-1") == (
        f"wss://{NAMESPACE}/$hc/agent?sb-hc-action=listen&sb-hc-id=id-1"
    )
    assert endpoint.http_url("/groups/x?y=1") == f"https://{NAMESPACE}/agent/groups/x?y=1"
    assert endpoint.trusts_address("wss://g7-prod-xyz.servicebus.windows.net/$hc/agent?a=1")
    assert not endpoint.trusts_address("ws://g7-prod-xyz.servicebus.windows.net/$hc/agent")
    assert not endpoint.trusts_address("wss://evil.example.com/$hc/agent")
    loopback = RelayEndpoint("127.0.0.1:9000", "agent", secure=False)
    assert loopback.trusts_address("ws://127.0.0.1:9000/$hc/agent")
    assert not loopback.trusts_address("ws://10.0.0.1:9000/$hc/agent")
    with pytest.raises(ConfigError):
        endpoint.http_url("https://elsewhere.example.com/")
    with pytest.raises(ConfigError):
        RelayEndpoint(NAMESPACE, "agent?x=1")
