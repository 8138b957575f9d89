# -*- test-case-name: tests.test_policy -*-
"""
Client addresses as the policy counts them, and the networks it exempts.

A connection's address arrives as a Twisted address object; the policy
keys everything on one text form of the client's address, so that the
same client is one client whatever the listener: an IPv4 client reaching a
dual-stack IPv6 listener (C{::ffff:192.0.2.1}) is C{192.0.2.1}.  Peers
without an IP address (Unix sockets: an MTA's LMTP, a local webmail) have
no key and are never counted, penalised or banned per address.

An IPv6 client is keyed by its /64 network (C{2001:db8:1:2::/64}), not by
its address: a /64 is the smallest network a provider gives a subscriber
or a virtual server, and its owner has 2**64 addresses to choose from, so
failures counted and bans made per address would cost an attacker nothing
to evade.  (Dovecot's authentication penalty counts IPv6 clients by /48 for
the same reason.)  The exempt networks, on the other hand, are matched
against the client's own address.
"""

import functools
import ipaddress

from mailgate.networks import IPV6_PREFIX, clientNetwork, parseNetwork, unmapped

# Loopback, as fail2ban's ignoreip default and Postfix's mynetworks: local
# webmail or monitoring never locks itself out.
DEFAULT_EXEMPT_NETWORKS = ("127.0.0.0/8", "::1/128")

# What --exempt-network takes to exempt nothing.
NO_NETWORKS = "none"


def parseAddress(text):
    """
    The normalised form of an IP address given as text.

    @raise ValueError: if C{text} is not an IP address.
    """
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    return unmapped(ipaddress.ip_address(text.split("%", 1)[0]))


def addressText(text):
    """
    The key the policy and the store use for an address given as text
    (e.g. on the admin command line): an IPv4 address as it is, an IPv6
    address as its /64 network.  The /64 network itself, written as such,
    is its own key.

    @raise ValueError: if C{text} is neither an IP address nor an IPv6
        network of prefix length L{IPV6_PREFIX}.
    """
    if "/" in text:
        address, _, prefix = text.strip().rpartition("/")
        if address.startswith("[") and address.endswith("]"):
            # [2001:db8::]/64, as [2001:db8::1] is taken for an address.
            address = address[1:-1]
        network = ipaddress.ip_network(f"{address}/{prefix}", strict=False)
        if network.version != 6 or network.prefixlen != IPV6_PREFIX:
            raise ValueError(f"not an IP address or an IPv6 /{IPV6_PREFIX}: {text!r}")
        return str(network)
    return _keyOfIP(parseAddress(text))


_keyOfIP = clientNetwork


def storedKey(text):
    """
    The key of an address the store holds: bans stored by an earlier
    mailgate name a single IPv6 address, enforced now for its whole /64.
    Text that is not an address is kept as it is.
    """
    try:
        return addressText(text)
    except ValueError:
        return text


def clientKey(address):
    """
    The key of a connection's address, or C{None} if it has no IP address
    (a Unix socket peer, or an address of a form the policy does not know).

    @param address: a Twisted address (C{IPv4Address}, C{IPv6Address},
        C{UNIXAddress}) or C{None}.
    """
    host = getattr(address, "host", None)
    if not isinstance(host, str):
        return None
    return _ofHost(host)[0]


def clientIP(address):
    """
    The normalised text of a connection's IP address (an IPv4 client on a
    dual-stack listener in its IPv4 form), or C{None} if it has none:
    what the exempt networks are matched against.
    """
    host = getattr(address, "host", None)
    if not isinstance(host, str):
        return None
    return _ofHost(host)[1]


@functools.lru_cache(maxsize=4096)
def _ofHost(host):
    # Each connection's address is asked for its key several times (the
    # limits, the penalty, the bans), and clients come back: parsing it
    # once per client is most of what admitting a connection costs.
    try:
        ip = parseAddress(host)
    except ValueError:
        return None, None
    return _keyOfIP(ip), str(ip)


class ExemptNetworks:
    """
    The networks never penalised, banned or limited per address.

    @ivar networks: the L{ipaddress} networks.
    """

    def __init__(self, networks=DEFAULT_EXEMPT_NETWORKS):
        self.networks = tuple(parseNetworks(networks))
        self._cache = {}

    def __contains__(self, address):
        """
        Whether the client at C{address} (normalised IP text, see
        L{clientIP}) is exempt.
        """
        if address is None or not self.networks:
            return False
        exempt = self._cache.get(address)
        if exempt is None:
            ip = ipaddress.ip_address(address)
            exempt = any(ip in network for network in self.networks)
            if len(self._cache) >= 4096:
                self._cache.clear()
            self._cache[address] = exempt
        return exempt

    def __repr__(self):
        return f"<ExemptNetworks {', '.join(map(str, self.networks)) or NO_NETWORKS}>"


def parseNetworks(specs):
    """
    Networks from their CIDR texts; C{"none"} (alone) stands for no network.

    @raise ValueError: for a text that is not a network, or C{"none"} given
        with networks.
    """
    specs = list(specs)
    if any(spec.strip().lower() == NO_NETWORKS for spec in specs):
        if len(specs) > 1:
            raise ValueError(f"{NO_NETWORKS!r} exempts nothing: it cannot be combined with networks")
        return []
    # Clients are keyed by their IPv4 form: so are their networks.
    return [parseNetwork(spec.strip()) for spec in specs]
