"""What the edge and the agent both import: settings, logging, errors, telemetry, usage figures."""
