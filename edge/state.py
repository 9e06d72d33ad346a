"""The edge's app-wide objects and the typed keys they live under (`app[SETTINGS]`, ...).

They are created and closed in `edge.app`'s cleanup context; handlers only read them.
"""

from __future__ import annotations

import aiohttp
from aiohttp import web

from edge.exchange import ClientAddress
from edge.proxy.body_limits import BodyLimits
from edge.proxy.body_policy import BodyPolicy
from edge.proxy.ollama import ModelPolicy
from edge.settings import EdgeSettings
from edge.telemetry import TelemetryWriter
from edge.upstreams.connections import Sessions
from edge.upstreams.gate import Gate
from edge.upstreams.monitor import UpstreamMonitor

SETTINGS = web.AppKey("settings", EdgeSettings)
SESSION = web.AppKey("session", aiohttp.ClientSession)  # the pooled one of SESSIONS
SESSIONS = web.AppKey("sessions", Sessions)
TELEMETRY = web.AppKey("telemetry", TelemetryWriter)
UPSTREAM = web.AppKey("upstream", UpstreamMonitor)
GATE = web.AppKey("gate", Gate)
MODELS = web.AppKey("models", ModelPolicy)
BODY_POLICY = web.AppKey("body_policy", BodyPolicy)
BODY_LIMITS = web.AppKey("body_limits", BodyLimits)
CLIENTS = web.AppKey("clients", ClientAddress)
