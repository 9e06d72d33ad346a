"""What the edge and the agent must agree on, written once (bore's `shared.rs`).

The two programs run on different machines and import nothing from each other; everything they
exchange goes over SSH. A fact both sides act on lives here, so a change to one side cannot
leave the other behind: the text the edge's SSH server disconnects a replaced agent with, which
the agent reads to stop retrying at once, and the port the tunnel ends on, on the VPS.
"""

from __future__ import annotations

# The disconnect reason the edge's embedded SSH server sends an agent when a newer connection
# with the same key takes the tunnel over (edge.upstreams.sshd). The agent matches it in the
# reason text (agent.errors.classify) and treats the end as permanent (`Replaced`): two agents
# sharing a key would otherwise take the tunnel from each other forever.
REPLACED_REASON = "replaced by a newer connection with the same key"

# The VPS loopback port the reverse forward listens on: the agent's default `remote_bind` and the
# edge's default `upstream`. Ollama's own port, so a tool on the VPS that looks for Ollama finds
# the tunnel.
TUNNEL_PORT = 11434
