"""
mailgate.networks: a dual-stack listener sees an IPv4 client as
C{::ffff:192.0.2.1}; the PROXY header's balancers, the policy's exempt
networks and POP3's trusted networks all compare it in its IPv4 form,
and read a network written in the mapped form as the IPv4 network it is.
"""

import ipaddress

from twisted.internet.address import IPv6Address

from mailgate.networks import parseNetwork, unmapped
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
