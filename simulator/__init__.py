"""The Ollama stand-in (`backhaul-agent simulate`); imports only `shared`."""
