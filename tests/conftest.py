"""Shared fixtures: an aiohttp client session for the servers in tests/support/servers.py."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


@pytest.fixture(autouse=True)
def _collect_garbage() -> Iterator[None]:
    """Collect after each test, so a leaked socket's ResourceWarning names its own test."""
    yield
    gc.collect()
