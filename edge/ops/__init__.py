"""Operator commands (stats, tail, keys); never imported by the server."""
