"""The relay path for tests: the Relay stand-in, agents listening on it, and the
cloud side's directory reaching AD through them.

Everything is the real code: the stand-in speaks the published Hybrid Connections
protocol over TLS, the agents are :class:`AgentService` behind the real listener,
and the cloud side is :class:`RelayDirectory` over the real sender.
"""

from __future__ import annotations

import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from writeback.adapters.agent_state import AgentStateStore
from writeback.adapters.hybrid_connection import (
    HybridConnectionListener,
    HybridConnectionSender,
    RelayEndpoint,
)
from writeback.adapters.relay import RelayDirectory
from writeback.agent_protocol import MEMBER_PAGE, audience
from writeback.domain.policy import AgentPolicy
from writeback.hosting.agent import AgentDirectory, AgentService, relay_handler
from writeback_sandbox.relay_standin import RelayStandIn, SasRule

PATH = "writeback-agent"
SEND = SasRule("send", secrets.token_urlsafe(32), frozenset({"Send"}))
LISTEN = SasRule("listen", secrets.token_urlsafe(32), frozenset({"Listen"}))
#: The mail domains the tests' groups use (and the sample tenant's).
MAIL_DOMAINS = frozenset({"contoso.com", "contoso.onmicrosoft.com"})


@dataclass
class Agent:
    service: AgentService
    listener: HybridConnectionListener
    state: AgentStateStore

    def stop(self) -> None:
        self.listener.close()
        self.service.close()
        self.state.close()


@dataclass
class RelayRig:
    standin: RelayStandIn
    caller_key: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    agents: list[Agent] = field(default_factory=list)
    senders: list[HybridConnectionSender] = field(default_factory=list)
    #: Where the agents keep their state files (one per host: see start_agent).
    state_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="agent-state-")))

    @property
    def endpoint(self) -> RelayEndpoint:
        return self.standin.endpoint(PATH)

    def policy(self, target_ou: str, **rules: Any) -> AgentPolicy:
        """The agent policy the tests run with: the sample tenants' mail domains."""
        return AgentPolicy(target_ou=target_ou, mail_domains=MAIL_DOMAINS, **rules)

    def start_agent(
        self,
        directory: Callable[[], AgentDirectory],
        target_ou: str,
        *,
        host: str = "host-1",
        member_page: int = MEMBER_PAGE,
        policy: AgentPolicy | None = None,
        **rules: Any,
    ) -> Agent:
        """An agent listening on the hybrid connection, with 4 shards (LDAP connections).

        Agents started with the same ``host`` share one state file, as agents on one
        machine configured alike do; ``rules`` are AgentPolicy fields (delete_limit...).
        """
        state = AgentStateStore(self.state_dir / f"{host}.sqlite3")
        service = AgentService(
            directory,
            policy or self.policy(target_ou, **rules),
            self.caller_key,
            audience=self.audience,
            state=state,
            member_page=member_page,
        )
        listener = HybridConnectionListener(
            self.endpoint, LISTEN.name, LISTEN.key, relay_handler(service), backoff_max=0.5
        )
        agent = Agent(service, listener, state)
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

    @property
    def audience(self) -> str:
        return audience(self.standin.namespace, PATH)

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
        shutil.rmtree(self.state_dir, ignore_errors=True)


@contextmanager
def relay_rig() -> Iterator[RelayRig]:
    with RelayStandIn({PATH: [SEND, LISTEN]}) as standin:
        rig = RelayRig(standin)
        try:
            yield rig
        finally:
            rig.close()
