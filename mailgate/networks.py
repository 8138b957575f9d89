# -*- test-case-name: tests.test_policy -*-
"""
IP networks and client addresses compared the one way every part of
mailgate compares them: an IPv4 client reaching a dual-stack listener
arrives as C{::ffff:192.0.2.1}, and is C{192.0.2.1}.  So is a network
written in that form (C{::ffff:10.0.0.0/104} is C{10.0.0.0/8}), or it
could never contain the clients it names.

The PROXY header's trusted balancers (L{mailgate.session.proxy}), the
policy's exempt networks (L{mailgate.policy.addresses}), POP3's trusted
networks (L{mailgate.pop3.factory}) and SMTP's and LMTP's cleartext
networks (L{mailgate.smtp.factory}) all read them here.

And one client is one client whatever address of its own it takes: an
IPv6 client is its /64 (L{IPV6_PREFIX}, L{clientNetwork}), for the
policy's counts and bans and for the refusals logged a line a minute.
"""

import functools
import ipaddress

#: The prefix length an IPv6 client is known by: a /64 is the smallest
#: network a provider gives a subscriber or a virtual server, and its owner
#: has 2**64 addresses to choose from (see L{mailgate.policy.addresses}).
IPV6_PREFIX = 64


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


#: Every address of each version; the IPv6 addresses that are IPv4 ones
#: (L{unmapped}), whose clients are matched against IPv4 networks.
_EVERY = {4: ipaddress.ip_network("0.0.0.0/0"), 6: ipaddress.ip_network("::/0")}
_MAPPED = ipaddress.ip_network("::ffff:0:0/96")


def coversEveryAddress(networks):
    """
    Whether C{networks} (L{ipaddress} networks or CIDR text) hold every
    client address, IPv4 and IPv6, together: C{0.0.0.0/0} and C{::/0}, or
    networks that split the space between them (C{0.0.0.0/1} and
    C{128.0.0.0/1}; C{::/1} and C{8000::/1}; C{::ffff:0:0/97} and
    C{::ffff:128.0.0.0/97}, read as IPv4 by L{parseNetwork}).  An IPv4
    client, even one arriving as C{::ffff:192.0.2.1}, is held by IPv4
    networks only (L{peerOnNetworks}): C{::/0} alone does not hold it,
    and the IPv6 networks need not cover C{::ffff:0:0/96}.
    """
    byVersion = {4: [], 6: [_MAPPED]}
    for network in networks:
        network = parseNetwork(network)
        byVersion[network.version].append(network)
    return all(
        list(ipaddress.collapse_addresses(held)) == [_EVERY[version]] for version, held in byVersion.items()
    )


def clientNetwork(ip):
    """
    The text one client is known by, from its L{ipaddress} address (in its
    IPv4 form if mapped, see L{unmapped}): an IPv4 address as it is, an
    IPv6 one as its /64 network (C{2001:db8:1:2::/64}).
    """
    if ip.version == 6:
        return str(ipaddress.IPv6Network((ip, IPV6_PREFIX), strict=False))
    return str(ip)


@functools.lru_cache(maxsize=4096)
def clientOfHost(host):
    """
    L{clientNetwork} of a connection's host text (C{::ffff:192.0.2.1} is
    C{192.0.2.1}), or C{host} itself if it is not an IP address.
    """
    try:
        ip = unmapped(ipaddress.ip_address(host.split("%", 1)[0]))
    except (ValueError, AttributeError):
        return host
    return clientNetwork(ip)


def peerOnNetworks(address, networks):
    """
    Whether a connection's peer C{address} is on one of C{networks} (a
    tuple of L{ipaddress} networks, as L{parseNetwork} makes them).  A
    local (Unix socket) peer is; an address whose form is unknown only if
    it is not IP.
    """
    host = getattr(address, "host", None)
    if host is None:
        return getattr(address, "type", None) != "TCP"
    return hostOnNetworks(host, networks)


@functools.lru_cache(maxsize=4096)
def hostOnNetworks(host, networks):
    """
    Whether the IP address C{host} (text; an IPv4-mapped IPv6 one taken as
    IPv4) is on one of C{networks}; never for text that is no IP address.
    The one test of an address against configured networks, for
    L{peerOnNetworks} and for the session trace (L{mailgate.session.trace}),
    which had a copy of it.
    """
    # Clients come back (an MTA for every message): the answer is kept per
    # address and networks, not worked out at every login or transaction.
    try:
        ip = unmapped(ipaddress.ip_address(host))
    except ValueError:
        return False
    return any(ip in network for network in networks)


#: The word a user's allowed networks name the clients without an IP
#: address by (a Unix socket's: a local proxy, a webmail on the host), as
#: Dovecot's C{allow_nets=local} does.
LOCAL = "local"


def parseAllowedNetworks(text):
    """
    A user's allowed networks (C{mailgate user networks}, Dovecot's
    C{allow_nets}) from comma-separated CIDR networks or addresses and
    L{LOCAL}: their canonical text, networks as L{parseNetwork} makes them
    (C{192.0.2.7} is C{192.0.2.7/32}, C{::ffff:10.0.0.0/104} is
    C{10.0.0.0/8}), in the order given, each once; what the store keeps.
    C{any} (alone), or nothing, is C{None}: from anywhere.

    @raise ValueError: naming the first item that is no network.
    """
    items = [item.strip() for item in text.split(",")]
    items = [item for item in items if item]
    if not items or [item.lower() for item in items] == ["any"]:
        return None
    kept = []
    for item in items:
        if item.lower() == LOCAL:
            canonical = LOCAL
        else:
            try:
                canonical = str(parseNetwork(item))
            except ValueError:
                raise ValueError(f"not a network or address: {item!r}") from None
        if canonical not in kept:
            kept.append(canonical)
    return ",".join(kept)


@functools.lru_cache(maxsize=1024)
def _allowedNetworks(text):
    """
    The L{ipaddress} networks of stored allowed networks C{text}, and
    whether it holds L{LOCAL}; parsed once per text, not at every login.
    An item that is no network (written by hand) matches no client: the
    user is refused rather than let in from anywhere.
    """
    networks, local = [], False
    for item in text.split(","):
        if item == LOCAL:
            local = True
        elif item:
            try:
                networks.append(parseNetwork(item))
            except ValueError:
                pass
    return tuple(networks), local


def peerAllowed(address, allowed):
    """
    Whether a client whose connection's peer (PROXY-told, if a trusted
    balancer told it) is C{address} may log in as a user whose allowed
    networks are C{allowed} (stored text, L{parseAllowedNetworks}; C{None}
    for anywhere).  An IP client (an IPv4-mapped IPv6 one as its IPv4
    address) must be on one of them; a client with no IP address (a Unix
    socket) only if they hold L{LOCAL}.
    """
    if allowed is None:
        return True
    networks, local = _allowedNetworks(allowed)
    host = getattr(address, "host", None)
    if host is None or getattr(address, "type", "TCP") not in ("TCP", "UDP"):
        return local
    return hostOnNetworks(host.split("%", 1)[0], networks)
