# -*- test-case-name: tests.test_policy -*-
"""
IP networks and client addresses compared the one way every part of
mailgate compares them: an IPv4 client reaching a dual-stack listener
arrives as C{::ffff:192.0.2.1}, and is C{192.0.2.1}.  So is a network
written in that form (C{::ffff:10.0.0.0/104} is C{10.0.0.0/8}), or it
could never contain the clients it names.

The PROXY header's trusted balancers (L{mailgate.session.proxy}), the
policy's exempt networks (L{mailgate.policy.addresses}) and POP3's trusted
networks (L{mailgate.pop3.factory}) all read them here.
"""

import ipaddress


def unmapped(ip):
    """
    C{ip}, an L{ipaddress} address, in its IPv4 form if it is an
    IPv4-mapped IPv6 address.
    """
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip if mapped is None else mapped


def parseNetwork(network):
    """
    An L{ipaddress} network from CIDR text (host bits allowed) or from an
    L{ipaddress} network, in its IPv4 form if it is an IPv4-mapped IPv6
    network of prefix length 96 or more.

    @raise ValueError: if C{network} is not a network.
    """
    network = ipaddress.ip_network(network, strict=False)
    mapped = getattr(network.network_address, "ipv4_mapped", None)
    if mapped is not None and network.prefixlen >= 96:
        network = ipaddress.ip_network(f"{mapped}/{network.prefixlen - 96}")
    return network
