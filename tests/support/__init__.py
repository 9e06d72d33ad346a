"""Test scaffolding: servers, fixtures, clients; the specifications are tests/test_*.py."""
