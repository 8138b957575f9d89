"""
The PROXY protocol header, generated (mailgate.session.proxy): whatever a
peer on the balancers' networks sends first, whole or in pieces, the
header is read as the whole would be read, or the connection is dropped
unanswered; nothing but L{InvalidProxyHeader} is raised, and no more than
the longest header allowed is ever held waiting for its end.

The headers are real ones (version 1 and 2, every address family and
command, optional fields), the same cut short, with an octet changed or
their length field changed, and octets of any kind, each followed by what
the client sends next.
"""

import struct

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from mailgate.session.proxy import (
    V1_MAX,
    V2_SIGNATURE,
    InvalidProxyHeader,
    ProxyHeaderFactory,
    readProxyHeader,
)

from fuzzing import fuzzSettings

FUZZ = fuzzSettings(300)
MAX_LENGTH = ProxyHeaderFactory.maxHeaderLength
BALANCER = IPv4Address("TCP", "127.0.0.1", 50000)

ipv4 = st.ip_addresses(v=4)
ipv6 = st.ip_addresses(v=6)
ports = st.integers(0, 65535)


@st.composite
def v1Headers(draw):
    if draw(st.booleans()):
        return b"PROXY UNKNOWN" + draw(st.sampled_from([b"", b" ffff::1 ffff::2 1 2"])) + b"\r\n"
    family, addresses = draw(st.sampled_from([(b"TCP4", ipv4), (b"TCP6", ipv6)]))
    source, destination = draw(addresses), draw(addresses)
    return b"PROXY %s %s %s %d %d\r\n" % (
        family, str(source).encode(), str(destination).encode(), draw(ports), draw(ports)
    )


@st.composite
def v2Headers(draw):
    command = draw(st.sampled_from([0, 1]))
    kind = draw(st.sampled_from(["inet", "inet6", "unix", "unspec"]))
    if kind in ("inet", "inet6"):
        addresses = ipv4 if kind == "inet" else ipv6
        family = 0x11 if kind == "inet" else 0x21
        body = draw(addresses).packed + draw(addresses).packed + struct.pack("!HH", draw(ports), draw(ports))
    elif kind == "unix":
        family = 0x31
        body = draw(st.binary(min_size=216, max_size=216))
    else:
        family = 0x00
        body = b""
    # Optional fields (TLVs): the client's TLS among them, or any.
    for _ in range(draw(st.integers(0, 3))):
        kindOfField = draw(st.sampled_from([0x20, 0x04, 0x05, 0x30]))
        # The client's TLS: its client and verify octets (5), then its own
        # fields (which, malformed, are ignored); the others any octets.
        value = draw(st.binary(min_size=5 if kindOfField == 0x20 else 0, max_size=40))
        body += struct.pack("!BH", kindOfField, len(value)) + value
    return V2_SIGNATURE + bytes([0x20 | command, family]) + struct.pack("!H", len(body)) + body


@st.composite
def damaged(draw, headers):
    """
    A header changed as a broken balancer or a hostile peer would send it:
    cut short, an octet changed, or (version 2) its length field changed.
    """
    header = bytearray(draw(headers))
    how = draw(st.sampled_from(["cut", "octet", "length"]))
    if how == "cut":
        return bytes(header[: draw(st.integers(0, len(header)))])
    if how == "octet" or header[:1] != b"\r":
        at = draw(st.integers(0, len(header) - 1))
        header[at] = draw(st.integers(0, 255))
        return bytes(header)
    header[14:16] = struct.pack("!H", draw(st.integers(0, 65535)))
    return bytes(header)


firstOctets = st.one_of(
    v1Headers(),
    v2Headers(),
    damaged(v1Headers()),
    damaged(v2Headers()),
    st.binary(max_size=200).map(lambda b: b"PROXY " + b),
    st.binary(max_size=200).map(lambda b: V2_SIGNATURE + b),
    st.binary(max_size=200),
)
following = st.one_of(st.just(b""), st.just(b"CAPA\r\n"), st.binary(max_size=100))
cuts = st.lists(st.integers(min_value=1, max_value=80), max_size=30)


def outcome(data):
    try:
        return readProxyHeader(data, MAX_LENGTH)
    except InvalidProxyHeader:
        return InvalidProxyHeader


@FUZZ
@given(firstOctets, following)
def test_aHeaderIsReadAsItsWholeWouldBe(header, rest):
    """
    Each longer prefix of what the peer sent reads as "more needed", as a
    refusal, or as the header the whole holds: never a header the whole
    does not hold, never "more needed" past the longest header allowed, and
    a refusal or a header, once read, stays what it is as more octets come.
    """
    data = header + rest
    whole = outcome(data + b"\x00" * (MAX_LENGTH + 1))
    settled = None
    for length in range(len(data) + 1):
        read = outcome(data[:length])
        if settled is not None:
            assert read == settled, (data[:length], read, settled)
            continue
        if read is None:
            assert length < MAX_LENGTH
            continue
        settled = read
        assert read == whole, (data[:length], read, whole)
        if read is not InvalidProxyHeader:
            source, destination, headerLength, told = read
            assert headerLength <= length and headerLength <= MAX_LENGTH
    if settled is None:
        # Never settled within what was sent: it is a beginning the whole
        # settles later, and within the longest header allowed.
        assert whole is not None


@FUZZ
@given(st.one_of(v1Headers(), v2Headers()), following)
def test_aWholeHeaderIsReadAtItsLastOctet(header, rest):
    """
    A header a balancer sends is read as soon as its last octet is in, not
    one octet later (a client that waits for the greeting sends nothing
    more), and only what follows it goes to the session.
    """
    assert outcome(header[:-1]) is None
    source, destination, length, told = readProxyHeader(header, MAX_LENGTH)
    assert length == len(header)
    assert readProxyHeader(header + rest, MAX_LENGTH)[2] == length
    # The client the header names: an address of the family it says.
    if header.startswith((b"PROXY TCP4", V2_SIGNATURE + b"\x21\x11")):
        assert source.type == "TCP" and source.host.count(".") == 3
    elif header.startswith((b"PROXY TCP6", V2_SIGNATURE + b"\x21\x21")):
        assert ":" in source.host
    else:
        assert source is None and destination is None


def test_theLongestVersion1HeaderIsReadAndOneLongerRefused():
    # The specification's longest version 1 header (107 octets with its
    # CRLF) is read; one octet longer is refused, not waited for.
    longest = b"PROXY UNKNOWN " + b"x" * (V1_MAX - len(b"PROXY UNKNOWN ") - 2) + b"\r\n"
    assert len(longest) == V1_MAX
    assert readProxyHeader(longest)[2] == V1_MAX
    assert outcome(longest[:-2] + b"x\r\n") is InvalidProxyHeader


class Recorder(Protocol):
    """
    The session behind the wrapper: what it was told and given.
    """

    def __init__(self):
        self.received = b""
        self.peer = None

    def connectionMade(self):
        self.peer = self.transport.getPeer()

    def dataReceived(self, data):
        self.received += data


@FUZZ
@given(firstOctets, following, cuts)
def test_theSessionGetsTheHeadersClientAndEverythingAfterItOrNothing(header, rest, pieces):
    """
    Through the wrapper, in pieces as TCP may deliver them: the session is
    connected once, with the client the header names, and gets every octet
    after the header; or the connection is dropped and the session never
    connected; or, the header not yet whole, nothing happens yet.
    """
    data = header + rest
    recorders = []

    def build():
        recorders.append(Recorder())
        return recorders[-1]

    clock = Clock()
    proxy = ProxyHeaderFactory(Factory.forProtocol(build), clock)
    protocol = proxy.buildProtocol(BALANCER)
    transport = StringTransport(peerAddress=BALANCER, hostAddress=IPv4Address("TCP", "127.0.0.1", 110))
    protocol.makeConnection(transport)
    position = 0
    for size in pieces + [len(data)]:
        if position >= len(data) or transport.disconnecting:
            break
        protocol.dataReceived(data[position : position + size])
        position += size
        assert len(protocol._header) < MAX_LENGTH
    # Nothing is ever written back to the balancer by the wrapper.
    assert transport.value() == b""
    expected = outcome(data)
    if expected is InvalidProxyHeader:
        assert transport.disconnecting and [r for r in recorders if r.peer is not None] == []
    elif expected is None:
        assert not transport.disconnecting and all(r.peer is None for r in recorders)
        # The balancer's time runs out: dropped, the session never connected.
        clock.advance(ProxyHeaderFactory.headerTimeout)
        assert transport.disconnecting and all(r.peer is None for r in recorders)
    else:
        source, destination, length, told = expected
        [session] = [r for r in recorders if r.peer is not None]
        assert not transport.disconnecting
        assert session.peer == (source if source is not None else BALANCER)
        assert session.received == data[length:]
