"""The reconnect arithmetic and the failure table, without a network."""

from __future__ import annotations

import asyncssh
import pytest

from agent.backoff import Backoff
from agent.errors import (
    AuthRefused,
    ConnectFailed,
    ConnectionDropped,
    ForwardRefused,
    HostKeyRejected,
    LocalConfigError,
    Replaced,
    classify,
)
from shared.errors import ConfigError
from shared.protocol import REPLACED_REASON


def test_full_jitter_doubles_up_to_the_cap():
    top = Backoff(initial=1.0, cap=30.0, stable_after=60.0, rng=lambda: 0.999999)
    ceilings = [round(top.next_delay()) for _ in range(8)]
    assert ceilings == [1, 2, 4, 8, 16, 30, 30, 30]
    bottom = Backoff(initial=1.0, cap=30.0, stable_after=60.0, rng=lambda: 0.0)
    assert [bottom.next_delay() for _ in range(3)] == [0.0, 0.0, 0.0]


def test_jitter_spreads_over_the_whole_range():
    draws = iter([0.25, 0.5, 0.75])
    b = Backoff(initial=2.0, cap=30.0, stable_after=10.0, rng=lambda: next(draws))
    assert [b.next_delay() for _ in range(3)] == [0.5, 2.0, 6.0]


def test_reset_only_after_a_stable_session_and_first_retry_still_jittered():
    b = Backoff(initial=1.0, cap=30.0, stable_after=10.0, rng=lambda: 0.5)
    for _ in range(5):
        b.next_delay()
    b.session_ended(uptime=9.9)  # flapping: keep backing off
    assert b.next_delay() == 15.0
    b.session_ended(uptime=10.0)  # healthy: start again, but not at zero delay
    assert b.next_delay() == 0.5
    assert b.bound() == 2.0


def test_permanent_failures_wait_in_the_upper_half_of_the_cap():
    low = Backoff(initial=1.0, cap=30.0, stable_after=10.0, rng=lambda: 0.0)
    high = Backoff(initial=1.0, cap=30.0, stable_after=10.0, rng=lambda: 0.999)
    assert low.at_cap() == 15.0
    assert 29.9 < high.at_cap() <= 30.0


def test_channel_listen_error_is_not_an_asyncssh_error_and_is_still_classified():
    exc = asyncssh.ChannelListenError("Failed to create remote TCP listener")
    assert not isinstance(exc, asyncssh.Error)  # the gotcha the table exists for
    assert isinstance(classify(exc, {}), ForwardRefused)


@pytest.mark.parametrize(
    ("exc", "expected", "kind"),
    [
        (asyncssh.HostKeyNotVerifiable("Host key is not trusted"), HostKeyRejected, "permanent"),
        (asyncssh.PermissionDenied("Permission denied"), AuthRefused, "permanent"),
        (ConfigError("cannot read the agent key"), LocalConfigError, "permanent"),
        (ConnectionRefusedError(111, "Connection refused"), ConnectFailed, "transient"),
        (TimeoutError(), ConnectFailed, "transient"),
        (
            asyncssh.ConnectionLost("Server not responding to keepalive"),
            ConnectionDropped,
            "transient",
        ),
        (asyncssh.ProtocolError("bad packet"), ConnectionDropped, "transient"),
        (asyncssh.DisconnectError(11, REPLACED_REASON), Replaced, "permanent"),
    ],
)
def test_the_table(exc: BaseException, expected: type, kind: str):
    err = classify(exc, {expected: "the fix"})
    assert type(err) is expected
    assert err.kind == kind
    assert err.fix == "the fix"


def test_unknown_exceptions_are_bugs_not_retries():
    with pytest.raises(KeyError):
        classify(KeyError("x"), {})
