"""The client address: one spelling per address, one group per IPv6 /64, and whom to believe."""

from __future__ import annotations

import pytest

from edge.exchange import address_group, canonical_address


@pytest.mark.parametrize(
    ("address", "canonical", "group"),
    [
        ("203.0.113.9", "203.0.113.9", "203.0.113.9"),
        ("::ffff:203.0.113.9", "203.0.113.9", "203.0.113.9"),  # IPv4-mapped: the same client
        ("2001:DB8::1", "2001:db8::1", "2001:db8::/64"),
        ("2001:db8:0:0:ffff::9", "2001:db8::ffff:0:0:9", "2001:db8::/64"),  # same /64
        ("2001:db8:0:1::1", "2001:db8:0:1::1", "2001:db8:0:1::/64"),  # the next /64
        ("fe80::1%eth0", "fe80::1", "fe80::/64"),  # a zone is no part of the address
        (" 198.51.100.7 ", "198.51.100.7", "198.51.100.7"),
        ("unix:", "unix:", "unix:"),  # not an IP address: unchanged
    ],
)
def test_addresses_have_one_spelling_and_ipv6_groups_by_64(
    address: str, canonical: str, group: str
) -> None:
    assert canonical_address(address) == canonical
    assert address_group(address) == group
