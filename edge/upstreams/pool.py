"""The agent pool: which workstation serves a request (DESIGN.md §7.2).

Each workstation is an `Agent` (its forward's URL, monitor, slots, models, speed, cooldown). In
embedded mode the SSH server adds one the first time an agent key connects and tells the pool
when its forward comes and goes (`attach`, `detach`); in system-sshd mode the operator lists
them (`upstreams` in edge.toml, or the one `upstream` URL: a pool of one).

Routing, in the order the best LLM routers use (../shared/research/turn2-scale-anchors.md §1):
1. Candidates: agents that serve the model. None: 404 `model_not_found`. None reachable (absent,
   tunnel silent): 503 `agent_unavailable` with `Retry-After`. Among the reachable, the healthy
   ones not cooling down; when there are none, the others, as a last resort (a model server
   that failed a probe may only have blinked; its answer says more than a refusal would).
2. A free slot first (the gate's `pick`): a request waits in the pool's fair queue only when
   every candidate is full, and takes the first slot any of them frees.
3. Among free agents: the model already loaded (no load time), then the conversation's own
   agent (`edge.upstreams.affinity`), then the lowest `(in_flight + 1) x seconds per token`
   (an agent with no sample yet counts as the pool's median, never as 0), then chance.

The failover contract (retry before the first byte only, at most `MAX_RETRIES`) is the request
path's (`edge.proxy.handler.forward`); the pool says which errors allow it (`RETRYABLE`).
"""

from __future__ import annotations

import asyncio
import itertools
import random
import statistics
import time
from collections.abc import Iterable
from typing import Any

import aiohttp
import structlog

from edge.errors import (
    AgentUnavailable,
    EdgeError,
    ModelNotFound,
    UpstreamBusy,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from edge.record import RequestRecord
from edge.settings import EdgeSettings
from edge.upstreams.affinity import Affinity
from edge.upstreams.agent import SERVING, Agent
from edge.upstreams.gate import Gate, Pick, Seat
from edge.upstreams.monitor import UpstreamMonitor

log = structlog.get_logger(__name__)

# Other agents a request is sent to after its first fails before any byte reached the client.
MAX_RETRIES = 2
# Failures after which another agent may be tried: nothing reached the client, and the model
# server either never had the request or gave it up (refused or reset connection, its 503 busy,
# no answer in time, the agent's connection lost).
RETRYABLE = (AgentUnavailable, UpstreamUnavailable, UpstreamBusy, UpstreamTimeout)
# Seconds a request whose agent's connection was lost waits for a candidate to come back (the
# same agent reconnecting takes well under a second) before it is answered 503.
_RETURN_WAIT_S = 2.0
# Where a sample-less pool puts an agent's speed: any positive figure orders them equally.
_NO_SAMPLES_S_PER_TOKEN = 0.02


class Pool:
    """The agents, the gate they share, and the affinity table."""

    def __init__(self, settings: EdgeSettings) -> None:
        self._settings = settings
        self.agents: dict[str, Agent] = {}
        self.gate = Gate(
            settings.max_inflight, settings.queue_max, settings.queue_timeout, settings.retry_after
        )
        self.affinity = Affinity()
        self.affinity_on = settings.pool_affinity
        self.retry_after = str(settings.retry_after)
        self._added = asyncio.Event()  # run() starts the new agents' probe loops
        self._changed = asyncio.Event()  # set, then replaced, when an agent may have come back

    # Membership.

    def add(self, name: str, url: str, capacity: int | None = None) -> Agent:
        """A new member; its probe loop starts in `run()`."""
        s = self._settings
        monitor = UpstreamMonitor(url, s.probe_interval, s.probe_timeout, s.retry_after, name)
        agent = Agent(name, url, monitor, capacity or s.max_inflight)
        self.agents[name] = agent
        self._added.set()
        log.info("pool.agent_added", agent=name, url=url, capacity=agent.capacity)
        return agent

    def expect(self, name: str) -> None:
        """Agent `name` may connect (embedded mode: its key is authorized): a member, absent
        until it does, so a request for it meanwhile is 503, not 404."""
        if name not in self.agents:
            self.add(name, "").monitor.absent_at_start()

    def attach(self, name: str, url: str) -> Agent:
        """Agent `name`'s forward is bound at `url` (embedded mode): it is present."""
        agent = self.agents.get(name) or self.add(name, url)
        if agent.url != url:
            agent.url = url
            agent.monitor.rebase(url)
        agent.monitor.set_agent_present(True)
        self.changed()
        return agent

    def detach(self, name: str) -> None:
        """Agent `name`'s connection ended (embedded mode): it is absent until it returns."""
        agent = self.agents.get(name)
        if agent is not None:
            agent.monitor.set_agent_present(False)
            self.changed()

    def changed(self) -> None:
        """An agent's state, models or slots changed: waiting requests may go now."""
        self.gate.wake()
        self._changed.set()
        self._changed = asyncio.Event()

    async def run(self, session: aiohttp.ClientSession) -> None:
        """Run every agent's probe loop (`Agent.run`), starting each as it is added."""
        started: set[str] = set()
        try:
            async with asyncio.TaskGroup() as group:
                while True:
                    self._added.clear()
                    for name, agent in list(self.agents.items()):
                        if name not in started:
                            started.add(name)
                            probe = agent.run(session, self.changed)
                            group.create_task(probe, name=f"probe:{name}")
                    await self._added.wait()
        except BaseExceptionGroup as failed:  # one agent's loop failed: that failure, as itself
            if len(failed.exceptions) == 1:
                raise failed.exceptions[0] from None
            raise

    # Routing.

    def candidates(self, model: str | None, avoid: Iterable[Agent] = ()) -> list[Agent]:
        """The agents a request for `model` (canonical; None: any) may go to now, best-kept
        first; the error to answer when there is none.

        Error handling: raises `ModelNotFound` when no agent serves the model, and
        `AgentUnavailable` when none that does is reachable (or each was in `avoid`).
        """
        if not self.agents:
            raise self.unavailable("no workstation has connected to this edge yet")
        # One pass (it is on every request's path): who serves it, who of those is reachable,
        # who of those is healthy and not cooling down.
        avoided = set(avoid) if avoid else ()
        now = time.monotonic()
        serving: list[Agent] = []
        reachable: list[Agent] = []
        healthy: list[Agent] = []
        for agent in self.agents.values():
            if not agent.serves(model):
                continue
            serving.append(agent)
            monitor = agent.monitor
            if not monitor.reachable or agent in avoided:
                continue
            reachable.append(agent)
            if agent.looked and monitor.state in SERVING and agent.cool_until <= now:
                healthy.append(agent)
        if healthy:
            return healthy
        if reachable:
            return sorted(reachable, key=lambda agent: agent.cool_until)
        if not serving:
            raise ModelNotFound(f"model '{model}' is not served by any workstation")
        return self._unreachable(serving)

    def _unreachable(self, serving: list[Agent]) -> list[Agent]:
        if len(serving) == 1:  # its own monitor's words (absent, or its tunnel silent)
            refusal = serving[0].monitor.refusal()
            if refusal is not None:
                raise refusal
        raise self.unavailable("no workstation that serves this model is connected")

    def unavailable(self, why: str) -> AgentUnavailable:
        return AgentUnavailable(
            f"the model server is offline: {why}", headers={"Retry-After": self.retry_after}
        )

    def picker(self, candidates: list[Agent], model: str | None, conversation: str | None) -> Pick:
        """The gate's `pick` for one request: the best of `candidates` with a free slot."""
        sticky = self.affinity.get(conversation) if self.affinity_on else None
        if len(candidates) == 1:  # a pool of one, or one agent with the model: nothing to rank
            only = candidates[0]
            return lambda: only if only.free and only.monitor.reachable else None
        unsampled = any(agent.s_per_token is None for agent in candidates)
        median = self._median_s_per_token() if unsampled else 0.0

        def pick() -> Seat | None:
            best: Agent | None = None
            best_rank: tuple[bool, bool, float] | None = None
            # Ties go to the first seen, from a random start: chance without a draw per agent.
            start = random.randrange(len(candidates))  # noqa: S311  # a tie-break, not a secret
            for agent in itertools.chain(candidates[start:], candidates[:start]):
                if not agent.free or not agent.monitor.reachable:
                    continue
                rank = (
                    model is not None and model not in agent.loaded,
                    agent.name != sticky,
                    (agent.inflight + 1) * (agent.s_per_token or median),
                )
                if best_rank is None or rank < best_rank:
                    best, best_rank = agent, rank
            return best

        return pick

    def _median_s_per_token(self) -> float:
        samples = [a.s_per_token for a in self.agents.values() if a.s_per_token is not None]
        return statistics.median(samples) if samples else _NO_SAMPLES_S_PER_TOKEN

    def served(self, agent: Agent, conversation: str | None, record: RequestRecord) -> None:
        """`agent` answered (`record`): its speed, its tokens, its conversation."""
        agent.succeeded(record.tok_per_s)
        agent.tokens += record.tokens or 0
        if self.affinity_on:
            self.affinity.put(conversation, agent.name)

    def failed(self, agent: Agent, reason: str) -> None:
        """`agent` failed a request (an error `type`, or `upstream_broken` mid-stream)."""
        agent.failed(reason)
        self.changed()

    async def wait_reachable(self, model: str | None) -> None:
        """Return once an agent that serves `model` is reachable, or after a short while."""
        try:
            async with asyncio.timeout(_RETURN_WAIT_S):
                while not any(a.monitor.reachable for a in self.agents.values() if a.serves(model)):
                    await self._changed.wait()
        except TimeoutError:
            pass

    # What operators see.

    def openai_only(self, model: str | None) -> bool:
        """Whether a request for `model` may reach a server without Ollama's API (llama.cpp,
        vLLM): then only the OpenAI routes, which Ollama serves too, reach every candidate."""
        return any(
            agent.monitor.openai_only for agent in self.agents.values() if agent.serves(model)
        )

    def unready(self) -> EdgeError | None:
        """Why `/readyz` is not ready: no agent would serve a request now."""
        if not self.agents:
            return self.unavailable("no workstation has connected to this edge yet")
        errors = [agent.monitor.unready() for agent in self.agents.values()]
        if any(a.looked and e is None for a, e in zip(self.agents.values(), errors, strict=True)):
            return None
        first = next((e for e in errors if e is not None), None)
        return first or self.unavailable("no workstation has told its models yet")

    def snapshot(self) -> list[dict[str, Any]]:
        """Every agent as operators read it (`/agents`, `backhaul-edge agents`)."""
        now = time.monotonic()
        rows = []
        for agent in self.agents.values():
            status = agent.monitor.status
            rows.append(
                {
                    "name": agent.name,
                    "state": status.state.value,
                    "reason": status.reason,
                    "present": status.agent_present,
                    "since": status.since,
                    "url": agent.url,
                    "models": agent.listed,
                    "loaded": sorted(agent.loaded),
                    "in_flight": agent.inflight,
                    "capacity": agent.capacity,
                    "tok_per_s": round(1.0 / agent.s_per_token, 2) if agent.s_per_token else None,
                    "tokens": agent.tokens,
                    "failures": agent.failures,
                    "cooling_s": round(max(0.0, agent.cool_until - now), 1),
                }
            )
        return rows


def build_pool(settings: EdgeSettings) -> Pool:
    """The pool the settings describe: the operator's `upstreams`, else the one `upstream` in
    system-sshd mode; empty in embedded mode, where agents join as they connect."""
    pool = Pool(settings)
    if settings.upstreams:
        for upstream in settings.upstreams:
            pool.add(upstream.name, upstream.url.rstrip("/"), upstream.max_inflight)
    elif not settings.ssh_port:
        pool.add(DEFAULT_NAME, settings.upstream)
    return pool


# The name of the one upstream of a pool of one (`upstream`, system-sshd mode).
DEFAULT_NAME = "default"
