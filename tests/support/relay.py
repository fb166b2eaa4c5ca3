"""The relay path for tests: the Relay stand-in, agents listening on it, and the
cloud side's directory reaching AD through them.

Everything is the real code: the stand-in speaks the published Hybrid Connections
protocol over TLS, the agents are :class:`AgentService` behind the real listener,
and the cloud side is :class:`RelayDirectory` over the real sender.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from writeback.adapters.hybrid_connection import (
    HybridConnectionListener,
    HybridConnectionSender,
    RelayEndpoint,
)
from writeback.adapters.relay import RelayDirectory
from writeback.adapters.thread_local import ThreadLocalDirectory
from writeback.agent_protocol import MEMBER_PAGE
from writeback.domain.policy import AgentPolicy
from writeback.hosting.agent import AgentDirectory, AgentService, relay_handler
from writeback_sandbox.relay_standin import RelayStandIn, SasRule

PATH = "writeback-agent"
SEND = SasRule("send", secrets.token_urlsafe(32), frozenset({"Send"}))
LISTEN = SasRule("listen", secrets.token_urlsafe(32), frozenset({"Listen"}))


@dataclass
class Agent:
    service: AgentService
    listener: HybridConnectionListener
    directory: ThreadLocalDirectory

    def stop(self) -> None:
        self.listener.close()
        self.directory.close()


@dataclass
class RelayRig:
    standin: RelayStandIn
    caller_key: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    agents: list[Agent] = field(default_factory=list)
    senders: list[HybridConnectionSender] = field(default_factory=list)

    @property
    def endpoint(self) -> RelayEndpoint:
        return self.standin.endpoint(PATH)

    def start_agent(
        self,
        directory: Callable[[], AgentDirectory],
        target_ou: str,
        *,
        delete_limit: int = 500,
        member_page: int = MEMBER_PAGE,
    ) -> Agent:
        """An agent listening on the hybrid connection, one LDAP connection per thread."""
        local = ThreadLocalDirectory(directory)
        service = AgentService(
            local,
            AgentPolicy(target_ou=target_ou, delete_limit=delete_limit),
            self.caller_key,
            member_page=member_page,
        )
        listener = HybridConnectionListener(
            self.endpoint, LISTEN.name, LISTEN.key, relay_handler(service), backoff_max=0.5
        )
        agent = Agent(service, listener, local)
        before = self.standin.listener_count(PATH)
        self.agents.append(agent)
        listener.start()
        # 30 s: now and then (about one connect in a hundred, under load) the handshake
        # gets no answer from the stand-in, and the listener tries again after its
        # open timeout.
        assert listener.connected.wait(30), "the agent did not connect to the relay"
        # The relay registers a listener just after its handshake: wait for that too.
        assert self.standin.wait_for_listeners(PATH, before + 1), "the relay did not register it"
        return agent

    def sender(self, *, key: str = SEND.key, timeout: float = 10.0) -> HybridConnectionSender:
        sender = HybridConnectionSender(self.endpoint, SEND.name, key, timeout=timeout)
        self.senders.append(sender)
        return sender

    def directory(self, target_ou: str, *, caller_key: str | None = None) -> RelayDirectory:
        """The cloud side's view of AD, through the relay."""
        return RelayDirectory(
            HybridConnectionSender(self.endpoint, SEND.name, SEND.key, timeout=10.0),
            caller_key or self.caller_key,
            target_ou=target_ou,
        )

    def close(self) -> None:
        for agent in self.agents:
            agent.stop()
        for sender in self.senders:
            sender.close()


@contextmanager
def relay_rig() -> Iterator[RelayRig]:
    with RelayStandIn({PATH: [SEND, LISTEN]}) as standin:
        rig = RelayRig(standin)
        try:
            yield rig
        finally:
            rig.close()
