"""What the stand-in's answers look like on the wire: Graph's error shape, JSON, times."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

API_VERSION = "v1.0"

JSON_CONTENT_TYPE = (
    "application/json;odata.metadata=minimal;odata.streaming=true;"
    "IEEE754Compatible=false;charset=utf-8"
)

#: The error code an injected status carries unless the test names one.
ERROR_CODES = {
    400: "BadRequest",
    403: "Authorization_RequestDenied",
    404: "Request_ResourceNotFound",
    405: "Request_BadRequest",
    410: "syncStateNotFound",
    429: "TooManyRequests",
    500: "InternalServerError",
    502: "BadGateway",
    503: "serviceNotAvailable",
    504: "GatewayTimeout",
}


@dataclass(frozen=True)
class Response:
    """One answer: status, serialised JSON body (empty for 204), extra headers."""

    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()


class GraphError(Exception):
    """Raised by an endpoint; becomes a response with Graph's error body."""

    def __init__(
        self, status: int, code: str, message: str, headers: tuple[tuple[str, str], ...] = ()
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers


def not_found(object_id: str) -> GraphError:
    """Graph's 404 for a directory object it does not (yet) know."""
    return GraphError(
        404,
        "Request_ResourceNotFound",
        f"Resource '{object_id}' does not exist or one of its queried reference-property "
        "objects are not present.",
    )


def dumps(body: object) -> bytes:
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def json_response(body: bytes, status: int = 200) -> Response:
    return Response(status, body)


def error_body(code: str, message: str, request_id: str) -> bytes:
    return dumps(
        {
            "error": {
                "code": code,
                "message": message,
                "innerError": {
                    "date": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()),
                    "request-id": request_id,
                    "client-request-id": request_id,
                },
            }
        }
    )


def json_body(body: bytes) -> dict[str, Any]:
    """A request's JSON object body, or Graph's 400 for anything else."""
    try:
        data = json.loads(body) if body else None
    except (ValueError, UnicodeDecodeError):
        data = None
    if not isinstance(data, dict):
        raise GraphError(400, "BadRequest", "Empty Payload. JSON content expected.")
    return data


def utc_now() -> datetime:
    return datetime.now(UTC)


def graph_time(when: datetime) -> str:
    """Graph's timestamp form: UTC, seven fractional digits, ``Z``."""
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f") + "0Z"
