# -*- test-case-name: tests.test_proxy -*-
"""
The PROXY protocol header (HAProxy's, versions 1 and 2) in front of a
session: the client's real address, told by the balancer that relays it.

Twisted's own C{haproxy:} wrapper connects the wrapped protocol as soon as
the TCP connection is made, before the header has been read: the session
would greet, be admitted, check its trusted networks and log with the
balancer's address.  L{ProxyHeaderProtocol} connects the session only once
the header is read, so that everything the session does sees the real
client address.  The header is bounded in size and must arrive within
L{ProxyHeaderFactory.headerTimeout} seconds; anything else closes the
connection.

A C{LOCAL} header (version 2, the balancer's own health checks), an
C{UNKNOWN} one (version 1) and one naming Unix sockets or no addresses
(version 2) keep the connection's own addresses, as the PROXY
specification says: the balancer's, which for a balancer on this machine
is a loopback address, local to every policy.  Such headers come from the
balancer's own checks, or from clients it took on other than by TCP
(README: relay only TCP clients).

Whoever sends the header chooses the address every policy sees: one
claiming a loopback client is allowed plaintext passwords and exempt from
limits, penalties and bans.  So only the balancers' networks
(C{--proxy-network}, Dovecot's C{haproxy_trusted_networks}; by default
this machine's loopback, where a local HAProxy connects from) may send
one: a connection from anywhere else is closed before a byte of it is
read.
"""

#: The balancers believed unless others are named: a HAProxy on this
#: machine.
DEFAULT_BALANCER_NETWORKS = ("127.0.0.0/8", "::1/128")

import ipaddress
import struct
from typing import NamedTuple

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IHalfCloseableProtocol, IStreamServerEndpoint
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from zope.interface import directlyProvides, implementer, providedBy

from mailgate.networks import parseNetwork, unmapped
from mailgate.session.ids import describeAddress
from mailgate.session.refusals import RefusalLog
from mailgate.timers import cancelled

V1_PREFIX = b"PROXY "
V1_MAX = 107
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


class InvalidProxyHeader(Exception):
    """
    What the connection began with is not a PROXY protocol header.
    """


def parseProxyHeader(data, maxLength=4096):
    """
    Read a PROXY protocol header at the start of C{data}.

    @param maxLength: the most octets a header may take.
    @return: C{None} if more octets are needed; else C{(source,
        destination, length, tls)}: the client's and the server's addresses
        as Twisted address objects (both C{None} for a LOCAL, UNKNOWN or
        Unix socket header: the connection's own addresses apply), the
        length of the header, and whether the client reached the balancer
        over TLS (L{clientTLS}).
    @raise InvalidProxyHeader: if C{data} does not begin with a valid
        header of at most C{maxLength} octets.
    """
    header = readProxyHeader(data, maxLength)
    if header is None:
        return None
    source, destination, length, told = header
    return source, destination, length, told is not None


def readProxyHeader(data, maxLength=4096):
    """
    L{parseProxyHeader}, with what the balancer told of the client's TLS
    in place of whether it had any: a L{BalancerTLS}, or C{None} for a
    client that reached the balancer in the clear (or a header that says
    nothing of it).
    """
    if data[:1] == b"P":
        if not V1_PREFIX.startswith(data[: len(V1_PREFIX)]):
            raise InvalidProxyHeader("not a PROXY header")
        return _parseV1(data)
    if data[:1] == b"\r":
        if not V2_SIGNATURE.startswith(data[: len(V2_SIGNATURE)]):
            raise InvalidProxyHeader("not a PROXY header")
        return _parseV2(data, maxLength)
    if data:
        raise InvalidProxyHeader("not a PROXY header")
    return None


def _parseV1(data):
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX:
            raise InvalidProxyHeader("PROXY v1 header too long")
        return None
    fields = data[:end].split(b" ")
    if len(fields) >= 2 and fields[1] == b"UNKNOWN":
        return None, None, end + 2, None
    if len(fields) != 6 or fields[1] not in (b"TCP4", b"TCP6"):
        raise InvalidProxyHeader("malformed PROXY v1 header")
    _, family, source, destination, sourcePort, destinationPort = fields
    # An address as inet_ntop writes it: no "%scope" suffix, which Python
    # would take with any octets in it (a line break into the Received
    # field, an escape sequence into the logs).
    if b"%" in source or b"%" in destination:
        raise InvalidProxyHeader("malformed PROXY v1 header")
    try:
        version = 4 if family == b"TCP4" else 6
        hosts = [ipaddress.ip_address(h.decode("ascii")) for h in (source, destination)]
        ports = [_port(p) for p in (sourcePort, destinationPort)]
    except (ValueError, UnicodeDecodeError):
        raise InvalidProxyHeader("malformed PROXY v1 header") from None
    if any(h.version != version for h in hosts):
        raise InvalidProxyHeader("PROXY v1 addresses do not match their family")
    make = IPv4Address if version == 4 else IPv6Address
    return (
        make("TCP", _hostText(hosts[0]), ports[0]),
        make("TCP", _hostText(hosts[1]), ports[1]),
        end + 2,
        None,
    )


def _hostText(ip):
    """
    The text of an address as the kernel gives a connection's (inet_ntop):
    an IPv4 client of a balancer's dual-stack listener as
    C{::ffff:192.0.2.1}, which the logs show and an administrator greps
    for, not in Python's hexadecimal form (C{::ffff:c000:201}).
    """
    mapped = getattr(ip, "ipv4_mapped", None)
    return str(ip) if mapped is None else f"::ffff:{mapped}"


def _port(text):
    if not text.isdigit() or len(text) > 5 or (len(text) > 1 and text[:1] == b"0"):
        raise ValueError(text)
    port = int(text)
    if port > 65535:
        raise ValueError(text)
    return port


#: PROXY v2 address families of IP: octets per address, name, the Twisted
#: address type and the parser of the packed address
_INET_FAMILIES = {
    1: (4, "IPv4", IPv4Address, ipaddress.IPv4Address),
    2: (16, "IPv6", IPv6Address, ipaddress.IPv6Address),
}


def _parseV2(data, maxLength):
    if len(data) < 16:
        return None
    versionCommand, family, length = struct.unpack("!BBH", data[12:16])
    if versionCommand >> 4 != 2:
        raise InvalidProxyHeader("unsupported PROXY header version")
    command = versionCommand & 0x0F
    if command not in (0, 1):
        raise InvalidProxyHeader("unsupported PROXY v2 command")
    total = 16 + length
    if total > maxLength:
        raise InvalidProxyHeader("PROXY v2 header too long")
    if len(data) < total:
        return None
    body = data[16:total]
    if command == 0:
        # LOCAL: the balancer speaking for itself (a health check).
        return None, None, total, None
    transport = family & 0x0F
    if transport != 1:
        # Only stream connections are relayed; UNSPEC means "no address".
        if family == 0:
            return None, None, total, None
        raise InvalidProxyHeader("unsupported PROXY v2 transport")
    addressFamily = family >> 4
    inet = _INET_FAMILIES.get(addressFamily)
    if inet is not None:
        width, name, addressType, parse = inet
        if len(body) < 2 * width + 4:
            raise InvalidProxyHeader(f"short PROXY v2 {name} addresses")
        source, destination = body[0:width], body[width : 2 * width]
        sourcePort, destinationPort = struct.unpack("!HH", body[2 * width : 2 * width + 4])
        return (
            addressType("TCP", _hostText(parse(source)), sourcePort),
            addressType("TCP", _hostText(parse(destination)), destinationPort),
            total,
            clientTLS(body[2 * width + 4 :]),
        )
    if addressFamily == 3:
        # Socket paths on the balancer's machine, which no policy can
        # weigh: the connection's own addresses (the balancer's) apply, as
        # for LOCAL.  For a balancer on loopback that makes the client a
        # local one (see the module's docstring).
        if len(body) < 216:
            raise InvalidProxyHeader("short PROXY v2 UNIX addresses")
        return None, None, total, None
    if addressFamily == 0:
        return None, None, total, None
    raise InvalidProxyHeader("unsupported PROXY v2 address family")


#: PROXY v2's TLV of the client's TLS (PP2_TYPE_SSL), and the bit of its
#: first octet saying the client connected over TLS (PP2_CLIENT_SSL)
PP2_TYPE_SSL = 0x20
PP2_CLIENT_SSL = 0x01
#: fields inside PP2_TYPE_SSL: the TLS version (C{"TLSv1.3"}) and cipher
#: (C{"TLS_AES_256_GCM_SHA384"}) the client negotiated with the balancer,
#: as OpenSSL names them (HAProxy's C{send-proxy-v2-ssl} sends the
#: version; C{proxy-v2-options ssl-cipher} adds the cipher)
PP2_SUBTYPE_SSL_VERSION = 0x21
PP2_SUBTYPE_SSL_CIPHER = 0x23
#: the most octets a version or cipher name told may take (OpenSSL's
#: longest, and the IANA names, are under 50)
MAX_TLS_NAME = 64


class BalancerTLS(NamedTuple):
    """
    What a balancer that ended the client's TLS told of it: the version and
    cipher negotiated, each C{None} where it was not told, or not as a
    name can be (see L{_tlsName}).  Shown in the session's end line as
    mailgate's own TLS is (L{mailgate.tls.negotiated}), and counted in
    C{mailgate_tls_sessions_total}: the clients a higher minimum version
    would turn away, be it raised at the balancer or by moving TLS to
    mailgate.
    """

    version: str | None = None
    cipher: str | None = None


def clientTLS(tlvs):
    """
    Whether a PROXY v2 header's fields (type-length-value, after the
    addresses) say the client reached the balancer over TLS: the balancer
    ended the client's TLS (HAProxy's C{send-proxy-v2-ssl}), and relays
    in the clear what crossed the network encrypted.  Such a session is a
    TLS session to every policy (plaintext logins allowed, no STLS
    offered).  Fields of other types are skipped.

    @return: a L{BalancerTLS}, with the version and cipher the field told
        (L{_sslSubfields}), or C{None} if the client did not use TLS.
    @raise InvalidProxyHeader: if a field runs past the header.
    """
    offset, end = 0, len(tlvs)
    while offset < end:
        if end - offset < 3:
            raise InvalidProxyHeader("malformed PROXY v2 field")
        kind = tlvs[offset]
        size = int.from_bytes(tlvs[offset + 1 : offset + 3], "big")
        value = tlvs[offset + 3 : offset + 3 + size]
        if len(value) < size:
            raise InvalidProxyHeader("malformed PROXY v2 field")
        if kind == PP2_TYPE_SSL:
            # client (1 octet), verify (4), then fields of its own
            if size < 5:
                raise InvalidProxyHeader("malformed PROXY v2 TLS field")
            if not value[0] & PP2_CLIENT_SSL:
                return None
            return BalancerTLS(*_sslSubfields(value[5:]))
        offset += 3 + size
    return None


def _sslSubfields(fields):
    """
    The version and cipher among the fields of a PP2_TYPE_SSL field, each
    C{None} if absent or not a name.  Only the balancer's word on what it
    logs, never a reason to turn the client away (whose TLS the client bit
    vouches for): a field cut short, or running past the end of its
    parent, ends the reading (those before it stand); one that is not a
    name (L{_tlsName}) is skipped.
    """
    told = {PP2_SUBTYPE_SSL_VERSION: None, PP2_SUBTYPE_SSL_CIPHER: None}
    offset, end = 0, len(fields)
    while end - offset >= 3:
        kind = fields[offset]
        size = int.from_bytes(fields[offset + 1 : offset + 3], "big")
        if size > end - offset - 3:
            # Past the end of its parent: nothing after it can be placed.
            break
        if kind in told and told[kind] is None:
            told[kind] = _tlsName(fields[offset + 3 : offset + 3 + size])
        offset += 3 + size
    return told[PP2_SUBTYPE_SSL_VERSION], told[PP2_SUBTYPE_SSL_CIPHER]


def _tlsName(value):
    """
    A version's or cipher's name as the balancer wrote it, if it can be
    one: 1 to L{MAX_TLS_NAME} octets of printable ASCII without spaces
    (OpenSSL's names are letters, digits, C{-}, C{_} and C{.}), so that it
    stays one C{key=value} of a log line; else C{None}.
    """
    if not 0 < len(value) <= MAX_TLS_NAME or any(octet < 0x21 or octet > 0x7E for octet in value):
        return None
    return value.decode("ascii")


@implementer(IHalfCloseableProtocol)
class ProxyHeaderProtocol(ProtocolWrapper):
    """
    Reads the PROXY header, then connects the wrapped protocol, to which
    it is the transport: its C{getPeer} and C{getHost} are the addresses
    the header gave.
    """

    def __init__(self, factory, wrappedProtocol):
        super().__init__(factory, wrappedProtocol)
        self._header = b""
        self._source = None
        self._destination = None
        self._relaying = False
        self._timeout = None
        #: The header named no client (LOCAL, UNKNOWN, Unix or unspecified
        #: addresses, or the balancer's own connection: L{_sameEndpoint}):
        #: the balancer speaking for itself, as its health checks do every
        #: few seconds.  A session that then does nothing
        #: is such a check, which SMTP does not log (see
        #: L{mailgate.smtp.protocol.SMTPServer.sessionEnded}).
        self.namedNoClient = False
        #: what the balancer told of the client's TLS (L{BalancerTLS}), if
        #: it ended the client's TLS
        self.balancerTLS = None

    @property
    def relayedTransport(self):
        """
        The connection beneath: writes to this wrapper go straight to it.
        """
        return self.transport

    def makeConnection(self, transport):
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)
        # The wrapped protocol is connected once the header has been read.

    def connectionMade(self):
        factory = self.factory
        self._timeout = factory.clock.callLater(factory.headerTimeout, self._tooSlow)
        if not isBalancer(self.transport.getPeer(), factory.balancers):
            # Its header would choose the address every policy sees.
            self._drop("not from a balancer's network (--proxy-network)", "not a balancer")

    def _tooSlow(self):
        self._timeout = None
        self._drop("no PROXY header in time")

    def _drop(self, reason, counted="bad PROXY header"):
        """
        Close the connection unanswered, counted as refused for C{counted}
        (a reason of L{mailgate.metrics.REFUSAL_REASONS}) and logged a line
        a minute per address and reason.
        """
        self.factory.countRefusal(counted)
        peer = self.transport.getPeer()
        # Something that is no balancer hammering the port: a line a minute
        # per address and reason (see RefusalLog).
        skipped = self.factory.refusals.note(getattr(peer, "host", None), reason)
        if skipped is not None:
            self.factory.log.info(
                "PROXY header refused from {balancer}: {reason}"
                + (" ({unlogged} more since the last line)" if skipped else ""),
                balancer=describeAddress(peer),
                reason=reason,
                unlogged=skipped,
                event="session.proxy_refused",
            )
        self._cancelTimeout()
        self.transport.abortConnection()

    def _cancelTimeout(self):
        self._timeout = cancelled(self._timeout)

    def dataReceived(self, data):
        if self._relaying:
            self.wrappedProtocol.dataReceived(data)
            return
        if self._timeout is None:
            # Refused or lost already.
            return
        self._header += data
        try:
            parsed = readProxyHeader(self._header, self.factory.maxHeaderLength)
        except InvalidProxyHeader as e:
            self._header = b""
            self._drop(str(e))
            return
        if parsed is None:
            return
        self._source, self._destination, length, told = parsed
        self.namedNoClient = self._source is None or _sameEndpoint(self._source, self.transport.getPeer())
        if told is not None:
            # What L{mailgate.tls.isSecure} asks of a transport, and what
            # L{mailgate.tls.versionAndCipher} reads of it.
            self.TLS = True
            self.balancerTLS = told
        rest, self._header = self._header[length:], b""
        self._cancelTimeout()
        self._relaying = True
        self.wrappedProtocol.makeConnection(self)
        if rest and self.wrappedProtocol is not None:
            self.wrappedProtocol.dataReceived(rest)

    def getPeer(self):
        return self._source or self.transport.getPeer()

    def getHost(self):
        return self._destination or self.transport.getHost()

    def readConnectionLost(self):
        """
        The client (through the balancer) has closed its side: the session
        answers what it was sent, if it can (see
        L{mailgate.session.core.CommandSession.readConnectionLost}); a
        connection still without its whole header is closed.
        """
        halfCloseable = IHalfCloseableProtocol(self.wrappedProtocol, None) if self._relaying else None
        if halfCloseable is None:
            self.transport.loseConnection()
        else:
            halfCloseable.readConnectionLost()

    def writeConnectionLost(self):
        pass

    def connectionLost(self, reason):
        self._cancelTimeout()
        self.factory.unregisterProtocol(self)
        if self._relaying:
            self.wrappedProtocol.connectionLost(reason)
        self.wrappedProtocol = None


def _sameEndpoint(told, peer):
    """
    Whether the client a header names is the connection's own peer, address
    and port: the balancer naming itself.  HAProxy's C{check} on a
    C{send-proxy} (version 1) server sends no C{UNKNOWN} but a C{TCP4}
    header of the check's own connection (C{PROXY TCP4 10.0.0.2 10.0.0.5
    36568 25}, measured with HAProxy 2.6), which no relayed client can
    send: the balancer's connection to the node leaves from a port of its
    own, not the client's.
    """
    if told.port != getattr(peer, "port", None):
        return False
    try:
        return unmapped(ipaddress.ip_address(told.host)) == unmapped(
            ipaddress.ip_address(peer.host.split("%", 1)[0])
        )
    except (ValueError, AttributeError):
        return False


def parseBalancers(networks):
    """
    The networks allowed to send PROXY headers, from their CIDR texts (or
    L{ipaddress} networks); IPv4-mapped IPv6 networks in their IPv4 form,
    as peers are compared in theirs.
    """
    return tuple(parseNetwork(network) for network in networks)


def isBalancer(address, balancers):
    """
    Whether the peer C{address} may send a PROXY header: any peer when no
    C{balancers} are given (an embedder's choice); else an IP peer on one
    of them, or a Unix socket peer (the socket's permissions say who may
    connect).
    """
    if not balancers:
        return True
    host = getattr(address, "host", None)
    if host is None:
        return getattr(address, "type", None) != "TCP"
    try:
        ip = unmapped(ipaddress.ip_address(host.split("%", 1)[0]))
    except ValueError:
        return False
    return any(ip in network for network in balancers)


class ProxyHeaderFactory(WrappingFactory):
    """
    Wraps a factory's protocols in L{ProxyHeaderProtocol}s.

    @cvar headerTimeout: seconds the balancer has to send the header.
    @cvar maxHeaderLength: the most octets a header may take (version 2
        headers carry optional fields after the addresses).
    @ivar balancers: the networks connections may come from (see
        L{isBalancer}); empty for any.
    """

    protocol = ProxyHeaderProtocol
    headerTimeout = 10.0
    maxHeaderLength = 4096
    log = Logger()
    # A wrapping factory is noisy by default: every start and stop logged
    # "Starting factory <...ProxyHeaderFactory object at 0x...>", beside
    # the listener's own line (as the metrics site's, cb58c86).
    noisy = False

    def __init__(self, wrappedFactory, clock, balancers=()):
        super().__init__(wrappedFactory)
        self.clock = clock
        self.balancers = parseBalancers(balancers)
        #: which refused connections are logged
        self.refusals = RefusalLog(clock)

    def logPrefix(self):
        return f"{super().logPrefix()} (PROXY)"

    def countRefusal(self, reason):
        """
        Count a connection dropped before its session began in the wrapped
        factory's metrics, under its protocol: without it, a balancer
        misconfigured (or something that is not one) would be turned away
        in no series at all.
        """
        # The session's factory, under the TLS layer of an implicit TLS
        # listener (POP3S behind a balancer) if there is one: that layer
        # has no metrics of its own.
        factory = self.wrappedFactory
        while getattr(factory, "metrics", None) is None and getattr(factory, "wrappedFactory", None) is not None:
            factory = factory.wrappedFactory
        metrics = getattr(factory, "metrics", None)
        if metrics is not None:
            protocol = getattr(factory.protocol, "protocolName", None)
            metrics.connectionRefused(protocol, reason)


@implementer(IStreamServerEndpoint)
class ProxyHeaderEndpoint:
    """
    A listening endpoint whose connections begin with a PROXY header.

    @param clock: the reactor, for the header timeout.
    @param wrapped: the endpoint that really listens.
    @param balancers: the networks connections may come from; empty for
        any (see L{isBalancer}).
    """

    def __init__(self, clock, wrapped, balancers=()):
        self._clock = clock
        self._wrapped = wrapped
        self._balancers = balancers
        self._factories = []

    def listen(self, protocolFactory):
        factory = ProxyHeaderFactory(protocolFactory, self._clock, self._balancers)
        self._factories.append(factory)
        return self._wrapped.listen(factory)

    def setBalancers(self, balancers):
        """
        Believe the PROXY headers of C{balancers} (a reload), from the next
        connection on: one whose header was read keeps its client address.
        """
        parsed = parseBalancers(balancers)
        self._balancers = balancers
        for factory in self._factories:
            factory.balancers = parsed
