"""The Graph stand-in in a child process, shared by the benchmarks.

Graph is another machine in production: serving it from a forked child keeps its
JSON encoding off the GIL of the process under test, and its CPU apart.
"""

from __future__ import annotations

import gc
import multiprocessing
import resource
import threading
from multiprocessing.connection import Connection
from typing import Any

from writeback_sandbox.graph_standin import GraphStandIn, Tenant


def cpu_seconds() -> float:
    """User plus system CPU time of this process, every thread."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class RemoteStandIn:
    """A GraphStandIn serving ``tenant`` from a forked child process.

    ``tenant(name, ...)`` calls a Tenant method there, ``standin(name, ...)`` a
    GraphStandIn method (or reads an attribute), ``cpu()`` is the child's CPU time.
    """

    def __init__(self, tenant: Tenant, **options: Any) -> None:
        context = multiprocessing.get_context("fork")
        self._conn, child = context.Pipe()
        self._lock = threading.Lock()
        self._process = context.Process(
            target=_serve_standin, args=(tenant, options, child), daemon=True
        )
        self._process.start()
        self.url: str = self._conn.recv()

    def _call(self, target: str, name: str, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            self._conn.send((target, name, args, kwargs))
            ok, value = self._conn.recv()
        if not ok:
            raise RuntimeError(f"stand-in {target}.{name} failed: {value}")
        return value

    def tenant(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return self._call("tenant", name, *args, **kwargs)

    def standin(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return self._call("standin", name, *args, **kwargs)

    def cpu(self) -> float:
        return float(self._call("process", "cpu"))

    def add_members_each(self, changes: list[tuple[str, str]]) -> None:
        """One new member for each group, made in the child in one call: the
        tenant's changes are not made in the measured process, nor paced by it."""
        self._call("changes", "", changes)

    def set(self, name: str, value: Any) -> None:
        """Set a GraphStandIn attribute there (``latency``, ``lag``)."""
        self._call("set", name, value)

    def close(self) -> None:
        with self._lock:
            self._conn.send(None)
        self._process.join(10)


def _serve_standin(tenant: Tenant, options: dict[str, Any], conn: Connection) -> None:
    # What the fork brought (the tenant above all) lives as long as the child:
    # out of the collector's sight, its full collections stay as cheap as Graph's
    # serving would be on Microsoft's machines, not this one's.
    gc.freeze()
    with GraphStandIn(tenant, **options) as standin:
        conn.send(standin.url)
        while (message := conn.recv()) is not None:
            target, name, args, kwargs = message
            try:
                if target == "process":
                    value: Any = cpu_seconds()
                elif target == "changes":  # a burst: (group, new member) pairs, made here
                    for group_id, member_id in args[0]:
                        standin.tenant.add_members(group_id, [member_id])
                    value = None
                elif target == "set":
                    setattr(standin, name, *args)
                    value = None
                else:
                    thing = getattr(standin.tenant if target == "tenant" else standin, name)
                    value = thing(*args, **kwargs) if callable(thing) else thing
            except Exception as error:
                conn.send((False, repr(error)))
            else:
                conn.send((True, value))
