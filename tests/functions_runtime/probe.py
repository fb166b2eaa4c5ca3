"""Index a Function app the way the Functions Python worker does at start-up; print JSON.

Run with the interpreter of ``.venv-functions`` (Python 3.13, made by
``scripts/functions-runtime``), whose ``azure-functions-runtime`` package is the
worker's own indexing and validation code:

    .venv-functions/bin/python tests/functions_runtime/probe.py APP_DIRECTORY

It drives that package through its public entry points in the order the proxy
worker (azure-functions-python-worker, ``proxy_worker/dispatcher.py``) does when
the host starts it: the app directory is appended to ``sys.path`` (the
dependency manager's "customer working directory"), then
``worker_init_request`` (which indexes ``function_app.py`` and validates every
binding against its annotation; one failing function fails the whole
response, and the host then loads no function of the app), then
``functions_metadata_request`` (the metadata the host registers the functions
from). It prints one JSON object: ``ok``, the error the worker would report,
and per function its name and bindings (name, type, direction, data type, and
the raw binding JSON the host reads), and the files ``function_app`` and
``azure.functions`` were imported from. Exit status 0 when the
app loads, 1 when the worker refuses it.

The worker talks to the host over gRPC with message classes generated from the
host's protobuf files, which are not published on PyPI. :class:`Protos` stands
in for them: the message constructors the indexing path calls, keyword fields
kept as attributes, enum values as the .proto defines them (an unset field
reads as its default, as in protobuf). It records what the worker would send
to the host; it does not check field types as protobuf would.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import sys
import traceback
from types import SimpleNamespace
from typing import Any, ClassVar


class _Message:
    """A protobuf message stand-in: keyword fields become attributes, None means unset."""

    _defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, **fields: Any) -> None:
        for name, value in self._defaults.items():
            setattr(self, name, value)
        for name, value in fields.items():
            if value is not None:
                setattr(self, name, value)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return None


class _BindingInfo(_Message):
    # enum Direction { in = 0; out = 1; inout = 2; }  ("in" is set below: a keyword)
    out: ClassVar[int] = 1
    inout: ClassVar[int] = 2
    # enum DataType { undefined = 0; string = 1; binary = 2; stream = 3; }
    undefined: ClassVar[int] = 0
    string: ClassVar[int] = 1
    binary: ClassVar[int] = 2
    stream: ClassVar[int] = 3
    _defaults: ClassVar[dict[str, Any]] = {"direction": 0, "data_type": 0, "type": ""}


setattr(_BindingInfo, "in", 0)  # "in" is a Python keyword: no class attribute syntax


class _StatusResult(_Message):
    # enum Status { Failure = 0; Success = 1; Cancelled = 2; }
    Failure: ClassVar[int] = 0
    Success: ClassVar[int] = 1
    Cancelled: ClassVar[int] = 2
    _defaults: ClassVar[dict[str, Any]] = {"status": 0}


class Protos:
    """Stands in for the worker's generated protobuf module (``protos`` in the worker)."""

    BindingInfo = _BindingInfo
    StatusResult = _StatusResult

    class RpcFunctionMetadata(_Message):
        pass

    class RpcRetryOptions(_Message):
        pass

    class RpcException(_Message):
        pass

    class WorkerMetadata(_Message):
        pass

    class WorkerInitResponse(_Message):
        pass

    class FunctionMetadataResponse(_Message):
        pass


DIRECTIONS = {0: "in", 1: "out", 2: "inout"}
DATA_TYPES = {0: "undefined", 1: "string", 2: "binary", 3: "stream"}


def _request(app_directory: str) -> SimpleNamespace:
    """The dispatcher's WorkerRequest around the host's WorkerInitRequest."""
    init = SimpleNamespace(
        function_app_directory=app_directory,
        capabilities={},
        host_version="4.1000.0",
        worker_directory="",
    )
    return SimpleNamespace(
        name="WorkerInitRequest",
        request=SimpleNamespace(worker_init_request=init),
        properties={"protos": Protos, "host": "127.0.0.1"},
    )


def _function(metadata: Any) -> dict[str, Any]:
    raw = [json.loads(text) for text in metadata.raw_bindings or []]
    by_name = {binding.get("name"): binding for binding in raw}
    bindings = []
    for name, info in (metadata.bindings or {}).items():
        bindings.append(
            {
                "name": name,
                "type": info.type,
                "direction": DIRECTIONS.get(info.direction, str(info.direction)),
                "data_type": DATA_TYPES.get(info.data_type, str(info.data_type)),
                "raw": by_name.get(name),
            }
        )
    return {
        "name": metadata.name,
        "function_id": metadata.function_id,
        "entry_point": metadata.entry_point,
        "script_file": metadata.script_file,
        "language": metadata.language,
        "properties": dict(metadata.properties or {}),
        "retry": None if metadata.retry_options is None else vars(metadata.retry_options),
        "bindings": bindings,
    }


def _loaded_from(*names: str) -> dict[str, str | None]:
    """Where the app's modules were imported from (None: not imported)."""
    found: dict[str, str | None] = {}
    for name in names:
        module = sys.modules.get(name)
        found[name] = getattr(module, "__file__", None) if module is not None else None
    return found


async def index(app_directory: str) -> dict[str, Any]:
    runtime = importlib.import_module("azure_functions_runtime")
    if app_directory not in sys.path:
        sys.path.append(app_directory)  # the worker's "customer working directory"
    os.chdir(app_directory)
    request = _request(app_directory)
    start = getattr(runtime, "start_threadpool_executor", None)
    if callable(start):
        start()
    try:
        init = await runtime.worker_init_request(request)
        result: dict[str, Any] = {
            "ok": init.result.status == Protos.StatusResult.Success,
            "runtime_version": getattr(
                importlib.import_module("azure_functions_runtime.version"), "VERSION", None
            ),
            "worker_metadata": vars(init.worker_metadata) if init.worker_metadata else None,
            "capabilities": dict(init.capabilities or {}),
            "error": None,
            "functions": [],
        }
        if not result["ok"]:
            exception = init.result.exception
            result["error"] = exception.message if exception is not None else "unknown failure"
            result["stack_trace"] = exception.stack_trace if exception is not None else ""
            return result
        metadata = await runtime.functions_metadata_request(
            SimpleNamespace(name="WorkerMetadataRequest", request=SimpleNamespace())
        )
        if metadata.result.status != Protos.StatusResult.Success:
            result["ok"] = False
            result["error"] = "the metadata request failed"
            return result
        result["functions"] = [_function(m) for m in metadata.function_metadata_results or []]
        result["loaded_from"] = _loaded_from("function_app", "azure.functions")
        return result
    finally:
        stop = getattr(runtime, "stop_threadpool_executor", None)
        if callable(stop):
            stop()


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(f"usage: {argv[0]} APP_DIRECTORY", file=sys.stderr)
        return 2
    try:
        result = asyncio.run(index(os.path.abspath(argv[1])))
    except Exception as error:  # a probe failure, not the worker's answer
        result = {
            "ok": False,
            "error": f"probe failed: {type(error).__name__}: {error}",
            "stack_trace": traceback.format_exc(),
            "functions": [],
        }
    print(json.dumps(result, indent=2, default=str))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
