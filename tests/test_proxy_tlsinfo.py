"""
What a balancer that ended the client's TLS tells of it in its PROXY v2
header: the TLS version (PP2_SUBTYPE_SSL_VERSION) and cipher
(PP2_SUBTYPE_SSL_CIPHER) inside the PP2_TYPE_SSL field, shown in the
session's end line as mailgate's own TLS is (C{tls_version=},
C{tls_cipher=}, JSON C{tlsVersion}, C{tlsCipher}) and counted in
C{mailgate_tls_sessions_total{protocol,version}}.  Before, such a session
said C{tls=yes} and nothing more, and the counter the README sends an
administrator to before raising a minimum TLS version counted none of
them.

Measured with HAProxy 2.6 ending the client's TLS: C{send-proxy-v2-ssl}
sends the version (C{TLSv1.2}, C{TLSv1.3}, as OpenSSL and mailgate name
them), and C{proxy-v2-options ssl-cipher} adds the cipher (OpenSSL's
names, C{ECDHE-ECDSA-AES256-GCM-SHA384}, C{TLS_AES_256_GCM_SHA384}); the
values carry no NUL.  The parsing, in memory.
"""

import socket
import struct

import pytest
from twisted.internet.address import IPv4Address

from mailgate.session.proxy import (
    MAX_TLS_NAME,
    BalancerTLS,
    clientTLS,
    parseProxyHeader,
    readProxyHeader,
)


TLS13 = ("TLSv1.3", "TLS_AES_256_GCM_SHA384")
TLS12 = ("TLSv1.2", "ECDHE-ECDSA-AES256-GCM-SHA384")

#: The PP2_TYPE_SSL field of a real HAProxy 2.6 (send-proxy-v2-ssl,
#: proxy-v2-options ssl-cipher) for a TLS 1.3 client, as it sent it.
HAPROXY_TLS13 = bytes.fromhex(
    "2000280100000000210007544c5376312e33230016544c535f4145535f3235365f47434d5f534841333834"
)
#: The same for a TLS 1.2 client, with cert-sig and cert-key too
#: (PP2_SUBTYPE_SSL_SIG_ALG, _KEY_ALG), which come before the cipher.
HAPROXY_TLS12_MORE = bytes.fromhex(
    "20004b0100000000210007544c5376312e32250005454332353624001165636473612d776974682d534841323536"
    "23001d45434448452d45434453412d4145533235362d47434d2d534841333834"
)


def sub(kind, value):
    """
    A field inside PP2_TYPE_SSL: type, length, value.
    """
    return bytes([kind]) + struct.pack("!H", len(value)) + value


def version(value):
    return sub(0x21, value)


def cipher(value):
    return sub(0x23, value)


def sslField(fields=b"", client=0x01, size=None):
    """
    A PP2_TYPE_SSL field: C{client}'s bits, verify 0, C{fields}; its
    length C{size} if given (for one that lies).
    """
    value = bytes([client]) + b"\x00\x00\x00\x00" + fields
    return b"\x20" + struct.pack("!H", len(value) if size is None else size) + value


def v2(tlvs=b"", source="203.0.113.9", destination="192.0.2.1", destinationPort=110):
    body = (
        socket.inet_aton(source) + socket.inet_aton(destination) + struct.pack("!HH", 40001, destinationPort) + tlvs
    )
    return b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, 0x11]) + struct.pack("!H", len(body)) + body


# -- parsing ---------------------------------------------------------------------


def test_whatARealHAProxySendsIsRead():
    assert clientTLS(HAPROXY_TLS13) == BalancerTLS(*TLS13)
    assert clientTLS(HAPROXY_TLS12_MORE) == BalancerTLS(*TLS12)
    header = v2(HAPROXY_TLS13)
    source, _, length, told = readProxyHeader(header + b"CAPA\r\n")
    assert (source, length, told) == (IPv4Address("TCP", "203.0.113.9", 40001), len(header), BalancerTLS(*TLS13))
    # parseProxyHeader still says only whether there was TLS.
    assert parseProxyHeader(header)[3] is True


def test_theVersionAloneAsSendProxyV2SSLSendsIt():
    assert clientTLS(sslField(version(b"TLSv1.2"))) == BalancerTLS("TLSv1.2", None)
    assert clientTLS(sslField(cipher(b"TLS_AES_128_GCM_SHA256"))) == BalancerTLS(None, "TLS_AES_128_GCM_SHA256")


def test_absentSubfieldsLeaveTheSessionSecuredWithoutNames():
    """
    A balancer that sends the client bit and nothing else: a TLS client,
    its version and cipher unknown.  Other fields inside are skipped.
    """
    assert clientTLS(sslField()) == BalancerTLS(None, None)
    assert clientTLS(sslField(sub(0x22, b"client.example") + sub(0x24, b"sha256WithRSA"))) == BalancerTLS(None, None)
    assert parseProxyHeader(v2(sslField()))[3] is True


def test_noClientBitNoTLSWhateverTheSubfieldsSay():
    assert clientTLS(sslField(version(b"TLSv1.3") + cipher(b"TLS_AES_256_GCM_SHA384"), client=0x00)) is None
    assert clientTLS(b"") is None
    assert clientTLS(b"\x04\x00\x02\x00\x00") is None
    assert readProxyHeader(v2())[3] is None


@pytest.mark.parametrize(
    "fields, told",
    [
        (version(b"TLSv1.3") + b"\x23", ("TLSv1.3", None)),
        (version(b"TLSv1.3") + b"\x23\x00", ("TLSv1.3", None)),
        (version(b"TLSv1.3") + b"\x23\x00\x20TLS_AES", ("TLSv1.3", None)),
        (b"\x21\xff\xffTLSv1.3", (None, None)),
        (b"\x21\x00\x08TLSv1.3", (None, None)),
        (cipher(b"TLS_AES_256_GCM_SHA384") + b"\x21\x00\x09TLSv1", (None, "TLS_AES_256_GCM_SHA384")),
    ],
    ids=["type alone", "length cut", "cipher past its parent", "length 65535", "one past", "cipher, version cut"],
)
def test_subfieldsWithBadLengthsAreIgnored(fields, told):
    """
    A field inside PP2_TYPE_SSL cut short, or longer than what is left of
    its parent, is ignored, with whatever follows it; those before it
    stand; the client's TLS (its bit) stands too, and the header is read.
    """
    assert clientTLS(sslField(fields)) == BalancerTLS(*told)
    header = v2(sslField(fields))
    assert parseProxyHeader(header + b"CAPA\r\n") == (
        IPv4Address("TCP", "203.0.113.9", 40001), IPv4Address("TCP", "192.0.2.1", 110), len(header), True
    )


def test_aSubfieldSizedPastItsParentDoesNotReadTheNextField():
    """
    A version whose length would take in the field after PP2_TYPE_SSL
    (a PP2_TYPE_NOOP here, then a TLS field of a second client): read as
    nothing, not as the octets of the next field, which is still read as
    a field of its own (the header stays well formed).
    """
    noop = b"\x04\x00\x04" + b"TLSv"
    inner = b"\x21\x00\x07" + b"TLS"
    field = b"\x20" + struct.pack("!H", 5 + len(inner)) + b"\x01\x00\x00\x00\x00" + inner
    tlvs = field + noop
    assert clientTLS(tlvs) == BalancerTLS(None, None)
    assert readProxyHeader(v2(tlvs))[3] == BalancerTLS(None, None)


@pytest.mark.parametrize(
    "value",
    [b"", b"TLSv1.3\x00", b"TLSv1.3\n", b"TLSv1.3\r\nX", b"TLS v1.3", b"\x1b[31mTLSv1.3", b"TLSv1.3\x7f",
     "TLSv1.3é".encode(), b"\xff\xfe", b"A" * (MAX_TLS_NAME + 1)],
    ids=["empty", "NUL", "line feed", "CRLF", "space", "escape", "DEL", "UTF-8", "not UTF-8", "too long"],
)
def test_valuesThatAreNoNamesAreIgnored(value):
    """
    A version or cipher that is not 1 to 64 octets of printable ASCII
    without spaces is not shown (it would break the log line, or forge
    one); the other, good, one is, and the client's TLS stands.
    """
    assert clientTLS(sslField(version(value) + cipher(b"TLS_AES_256_GCM_SHA384"))) == BalancerTLS(
        None, "TLS_AES_256_GCM_SHA384"
    )
    assert clientTLS(sslField(version(b"TLSv1.3") + cipher(value))) == BalancerTLS("TLSv1.3", None)


def test_theLongestNameAllowedIsKept():
    name = b"X" * MAX_TLS_NAME
    assert clientTLS(sslField(cipher(name))) == BalancerTLS(None, name.decode())


def test_theFirstGoodNameOfEachKindIsKept():
    fields = version(b"bad version") + version(b"TLSv1.2") + version(b"TLSv1.3") + cipher(b"A") + cipher(b"B")
    assert clientTLS(sslField(fields)) == BalancerTLS("TLSv1.2", "A")
