"""backhaul-edge: the VPS side. Proxies inference through the tunnel; keys, limits, telemetry."""
