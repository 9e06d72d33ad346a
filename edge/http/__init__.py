"""The aiohttp front door: middleware, CORS, probes, wire hygiene, the demo page."""
