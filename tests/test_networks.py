"""
mailgate.networks: a dual-stack listener sees an IPv4 client as
C{::ffff:192.0.2.1}; the PROXY header's balancers, the policy's exempt
networks and POP3's trusted networks all compare it in its IPv4 form,
and read a network written in the mapped form as the IPv4 network it is.
"""

import ipaddress

import pytest
from twisted.internet.address import IPv6Address

from mailgate.networks import coversEveryAddress, parseNetwork, unmapped
from mailgate.policy.addresses import ExemptNetworks, clientIP
from mailgate.session.proxy import isBalancer, parseBalancers


def test_aMappedNetworkIsItsIPv4Network():
    assert parseNetwork("::ffff:10.0.0.0/104") == ipaddress.ip_network("10.0.0.0/8")
    assert parseNetwork("::ffff:192.0.2.7/128") == ipaddress.ip_network("192.0.2.7/32")
    # Host bits are allowed, as administrators write them.
    assert parseNetwork("10.1.2.3/8") == ipaddress.ip_network("10.0.0.0/8")
    assert parseNetwork(ipaddress.ip_network("2001:db8::/32")) == ipaddress.ip_network("2001:db8::/32")
    # Shorter than the mapped prefix: not an IPv4 network, kept as IPv6.
    assert parseNetwork("::/64").version == 6


def test_aMappedAddressIsItsIPv4Address():
    assert unmapped(ipaddress.ip_address("::ffff:192.0.2.1")) == ipaddress.ip_address("192.0.2.1")
    assert unmapped(ipaddress.ip_address("2001:db8::1")) == ipaddress.ip_address("2001:db8::1")


def test_aDualStackClientIsFoundOnANetworkWrittenEitherWay():
    client = IPv6Address("TCP", "::ffff:10.1.2.3", 40000)
    for written in ("10.0.0.0/8", "::ffff:10.0.0.0/104"):
        assert isBalancer(client, parseBalancers([written])), written
        assert clientIP(client) in ExemptNetworks([written]), written
    assert not isBalancer(client, parseBalancers(["192.0.2.0/24"]))
    assert clientIP(client) not in ExemptNetworks(["::ffff:192.0.2.0/120"])


def test_aTrustedNetworkWrittenMappedTrustsItsDualStackClients(store):
    """
    C{--trusted-network ::ffff:10.0.0.0/104} names 10.0.0.0/8 as the
    exempt and balancer networks read it: a client there, on a dual-stack
    listener, may log in with USER/PASS without TLS.
    """
    from mailgate.testing import POP3Session, addUser

    addUser(store, "alice@example.org", "wonderland")
    for written in ("10.0.0.0/8", "::ffff:10.0.0.0/104"):
        s = POP3Session(
            store, peer=IPv6Address("TCP", "::ffff:10.1.2.3", 40000), trustedNetworks=[written]
        )
        assert s.command("USER alice@example.org").startswith("+OK"), written
        assert s.command("PASS wonderland").startswith("+OK alice@example.org has 0 messages"), written
        assert s.command("QUIT").startswith("+OK")


#: Every IPv6 address but the IPv4-mapped ones, in 96 networks.
_IPV6_BUT_MAPPED = tuple(ipaddress.ip_network("::/0").address_exclude(ipaddress.ip_network("::ffff:0:0/96")))


@pytest.mark.parametrize(
    "networks",
    [
        ("0.0.0.0/0", "::/0"),
        ("0.0.0.0/1", "128.0.0.0/1", "::/0"),
        ("0.0.0.0/0", "::/1", "8000::/1"),
        ("0.0.0.0/1", "128.0.0.0/1", "::/1", "8000::/1"),
        # IPv4-mapped, read as 0.0.0.0/1 and 128.0.0.0/1.
        ("::ffff:0:0/97", "::ffff:128.0.0.0/97", "::/0"),
        ("::ffff:0:0/96", "::/0"),
        # A mapped address is an IPv4 client: IPv6 networks need not hold it.
        ("0.0.0.0/0", *_IPV6_BUT_MAPPED),
        ("10.0.0.0/8", "0.0.0.0/0", "::/0", "2001:db8::/32"),
    ],
)
def test_networksSplittingTheSpaceCoverEveryAddress(networks):
    assert coversEveryAddress(networks)
    assert coversEveryAddress([ipaddress.ip_network(n) for n in networks])


@pytest.mark.parametrize(
    "networks",
    [
        (),
        ("0.0.0.0/0",),
        ("::/0",),
        ("0.0.0.0/1", "::/0"),
        ("0.0.0.0/1", "128.0.0.0/2", "192.0.0.0/3", "::/0"),
        ("0.0.0.0/0", "::/1", "8000::/2"),
        # ::/0 holds the mapped addresses, but their clients are IPv4 ones.
        ("::ffff:0:0/97", "::/0"),
        ("0.0.0.0/0", *_IPV6_BUT_MAPPED[1:]),
        ("0.0.0.0/1", *_IPV6_BUT_MAPPED),
    ],
)
def test_networksLeavingAnAddressOutDoNot(networks):
    assert not coversEveryAddress(networks)
