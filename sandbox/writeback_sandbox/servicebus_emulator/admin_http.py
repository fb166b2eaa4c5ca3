"""The administration API's queue read (``GET https://<namespace>/<queue>``), over TLS.

What ``ServiceBusAdministrationClient.get_queue_properties`` and
``get_queue_runtime_properties`` call: an ATOM entry holding a
``QueueDescription`` with its ``CountDetails``. Like the service it needs a
token whose rule has Manage (401 "Manage claim is required" otherwise) and
answers a queue that does not exist with an empty feed (the SDK raises
ResourceNotFoundError). Nothing else of the administration API is served:
other paths answer 404 and other methods 405.
"""

from __future__ import annotations

import contextlib
import ssl
import threading
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit
from xml.sax.saxutils import escape

from writeback_sandbox.servicebus_emulator import auth
from writeback_sandbox.servicebus_emulator.model import BrokerError, Entity

if TYPE_CHECKING:
    from writeback_sandbox.servicebus_emulator import ServiceBusEmulator

_ATOM = "http://www.w3.org/2005/Atom"
_CONNECT = "http://schemas.microsoft.com/netservices/2010/10/servicebus/connect"
_COUNTS = "http://schemas.microsoft.com/netservices/2011/06/servicebus"


def _duration(seconds: float) -> str:
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    return f"P{days}DT{hours}H{minutes}M{secs}S"


def queue_entry(queue: Entity, base: str, now: datetime) -> str:
    settings = queue.settings
    counts = queue.counts()
    dead = queue.dead_letters.counts()["active"] if queue.dead_letters is not None else 0
    stamp = now.isoformat().replace("+00:00", "Z")
    window = settings.duplicate_detection_window
    total = counts["active"] + counts["scheduled"] + counts["deferred"] + dead
    return (
        f'<entry xmlns="{_ATOM}"><id>{escape(base)}/{escape(queue.path)}?api-version=2021-05</id>'
        f'<title type="text">{escape(queue.path)}</title>'
        f"<published>{stamp}</published><updated>{stamp}</updated>"
        f"<author><name>emulator</name></author>"
        f'<link rel="self" href="{escape(base)}/{escape(queue.path)}?api-version=2021-05"/>'
        f'<content type="application/xml">'
        f'<QueueDescription xmlns="{_CONNECT}" '
        f'xmlns:i="http://www.w3.org/2001/XMLSchema-instance">'
        f"<LockDuration>{_duration(settings.lock_duration)}</LockDuration>"
        f"<MaxSizeInMegabytes>1024</MaxSizeInMegabytes>"
        f"<RequiresDuplicateDetection>{str(window is not None).lower()}"
        f"</RequiresDuplicateDetection>"
        f"<RequiresSession>{str(settings.requires_session).lower()}</RequiresSession>"
        f"<DefaultMessageTimeToLive>{_duration(settings.default_message_ttl)}"
        f"</DefaultMessageTimeToLive>"
        f"<DeadLetteringOnMessageExpiration>"
        f"{str(settings.dead_lettering_on_message_expiration).lower()}"
        f"</DeadLetteringOnMessageExpiration>"
        f"<DuplicateDetectionHistoryTimeWindow>{_duration(window or 600)}"
        f"</DuplicateDetectionHistoryTimeWindow>"
        f"<MaxDeliveryCount>{settings.max_delivery_count}</MaxDeliveryCount>"
        f"<EnableBatchedOperations>true</EnableBatchedOperations>"
        f"<SizeInBytes>{queue.size_in_bytes()}</SizeInBytes>"
        f"<MessageCount>{total}</MessageCount>"
        f"<IsAnonymousAccessible>false</IsAnonymousAccessible>"
        f"<Status>Active</Status>"
        f"<CreatedAt>{stamp}</CreatedAt><UpdatedAt>{stamp}</UpdatedAt>"
        f"<AccessedAt>{stamp}</AccessedAt>"
        f"<SupportOrdering>true</SupportOrdering>"
        f'<CountDetails xmlns:d2p1="{_COUNTS}">'
        f"<d2p1:ActiveMessageCount>{counts['active'] + counts['deferred']}"
        f"</d2p1:ActiveMessageCount>"
        f"<d2p1:DeadLetterMessageCount>{dead}</d2p1:DeadLetterMessageCount>"
        f"<d2p1:ScheduledMessageCount>{counts['scheduled']}</d2p1:ScheduledMessageCount>"
        f"<d2p1:TransferMessageCount>0</d2p1:TransferMessageCount>"
        f"<d2p1:TransferDeadLetterMessageCount>0</d2p1:TransferDeadLetterMessageCount>"
        f"</CountDetails>"
        f"<AutoDeleteOnIdle>P10675199DT2H48M5.4775807S</AutoDeleteOnIdle>"
        f"<EnablePartitioning>false</EnablePartitioning>"
        f"<EntityAvailabilityStatus>Available</EntityAvailabilityStatus>"
        f"<EnableExpress>false</EnableExpress>"
        f"<MaxMessageSizeInKilobytes>{settings.max_message_size // 1024}"
        f"</MaxMessageSizeInKilobytes>"
        f"</QueueDescription></content></entry>"
    )


def empty_feed(base: str, now: datetime) -> str:
    stamp = now.isoformat().replace("+00:00", "Z")
    return (
        f'<feed xmlns="{_ATOM}"><title type="text">Publicly Listed Services</title>'
        f'<subtitle type="text">This is the list of publicly-listed services currently '
        f"available.</subtitle><id>uuid:0</id><updated>{stamp}</updated>"
        f"<generator>Service Bus 1.1</generator></feed>"
    )


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, emulator: ServiceBusEmulator, context: ssl.SSLContext) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.emulator = emulator
        self.context = context

    def get_request(self) -> tuple[Any, Any]:
        sock, address = super().get_request()
        sock.settimeout(10)  # a client that stalls in the handshake cannot hold the server
        return self.context.wrap_socket(sock, server_side=True), address

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client hanging up mid-handshake is not a server error


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        emulator = self.server.emulator
        path = unquote(urlsplit(self.path).path).strip("/")
        now = datetime.now(UTC)
        base = f"https://{emulator.host}:{emulator.admin_port}"
        with emulator.broker.lock:
            try:
                grant = auth.check_token(
                    self.headers.get("Authorization") or "",
                    emulator.rules,
                    emulator.host,
                    emulator.broker.clock(),
                )
                if not grant.covers(emulator.host, path, auth.MANAGE, emulator.broker.clock()):
                    raise BrokerError(
                        "amqp:unauthorized-access",
                        "Unauthorized access. 'Manage' claim(s) are required to perform this "
                        "operation.",
                        401,
                    )
                queue = emulator.broker.queues.get(path.lower()) if "/" not in path else None
                body = queue_entry(queue, base, now) if queue else empty_feed(base, now)
                self._reply(200, body, "application/atom+xml;type=entry;charset=utf-8")
            except BrokerError as error:
                detail = escape(f"SubCode=40100. {error.description}")
                self._reply(
                    error.status,
                    f"<Error><Code>{error.status}</Code><Detail>{detail}</Detail></Error>",
                )

    def do_PUT(self) -> None:
        self._reply(405, "<Error><Code>405</Code><Detail>Not served here.</Detail></Error>")

    do_DELETE = do_PUT
    do_POST = do_PUT

    def _reply(self, status: int, body: str, content_type: str = "application/xml") -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        with contextlib.suppress(OSError):
            self.wfile.write(data)


class AdminEndpoint:
    def __init__(self, emulator: ServiceBusEmulator, context: ssl.SSLContext) -> None:
        self._server = _Server(emulator, context)
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
