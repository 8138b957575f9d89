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
values carry no NUL.  Parsing in memory first, then a session behind the
wrapper, then a real HAProxy in front of a real twistd.
"""

import json
import poplib
import re
import socket
import ssl
import struct

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.logger import formatEvent

from mailgate.logs import eventAsRecord
from mailgate.session.proxy import (
    MAX_TLS_NAME,
    BalancerTLS,
    clientTLS,
    parseProxyHeader,
    readProxyHeader,
)
from mailgate.testing import addUser, pop3Factory, smtpFactory

from e2e import DEADLINE, sqliteOnly, waitFor
from e2e import mailgate_cli, mailgate_server  # noqa: F401 (fixtures)
from test_pairings import HAPROXY_CFG, haproxy  # noqa: F401 (fixture)
from test_proxy import wrapped

ALICE = "alice@example.org"
PASSWORD = "wonderland"
BALANCER = IPv4Address("TCP", "127.0.0.1", 50000)
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


# -- a session behind the wrapper, in memory -------------------------------------



def tlsSessions(factory, version):
    found = factory.metrics.registry.get_sample_value(
        "mailgate_tls_sessions_total", {"protocol": factory.protocol.protocolName, "version": version}
    )
    return 0.0 if found is None else found


def endLines(logEvents, name):
    return [(formatEvent(e), eventAsRecord(e)) for e in logEvents if e.get("event") == name]


def test_aPOP3SessionShowsAndCountsWhatTheBalancerTold(store, logEvents):
    """
    Behind HAProxy ending the client's TLS, the end line of a session that
    logged in (pop3.logout) and of one that did not (pop3.disconnect) name
    the version and cipher, in the text and the JSON record, and
    mailgate_tls_sessions_total counts each session by its version.
    """
    addUser(store, ALICE, PASSWORD)
    clock = Clock()
    factory = pop3Factory(store, clock)
    assert tlsSessions(factory, "TLSv1.3") == tlsSessions(factory, "TLSv1.2") == 0
    protocol, transport = wrapped(factory, clock)
    protocol.dataReceived(v2(HAPROXY_TLS13) + f"USER {ALICE}\r\nPASS {PASSWORD}\r\nQUIT\r\n".encode())
    assert f"+OK {ALICE} has 0 messages (0 octets)\r\n+OK".encode() in transport.value()
    protocol.connectionLost(None)
    protocol, transport = wrapped(factory, clock)
    protocol.dataReceived(v2(HAPROXY_TLS12_MORE) + b"QUIT\r\n")
    protocol.connectionLost(None)
    [(text, record)] = endLines(logEvents, "pop3.logout")
    assert text.endswith(" tls_version=TLSv1.3 tls_cipher=TLS_AES_256_GCM_SHA384"), text
    assert (record["tlsVersion"], record["tlsCipher"]) == TLS13, record
    [(text, record)] = endLines(logEvents, "pop3.disconnect")
    assert " tls=yes tls_version=TLSv1.2 tls_cipher=ECDHE-ECDSA-AES256-GCM-SHA384 seconds=" in text, text
    assert (record["tlsVersion"], record["tlsCipher"]) == TLS12, record
    assert json.loads(json.dumps(record))["tls"] is True
    assert tlsSessions(factory, "TLSv1.3") == tlsSessions(factory, "TLSv1.2") == 1


def test_anSMTPSessionShowsAndCountsWhatTheBalancerTold(store, logEvents):
    clock = Clock()
    factory = smtpFactory(store, clock)
    protocol, transport = wrapped(factory, clock)
    protocol.dataReceived(v2(sslField(version(b"TLSv1.2")), destinationPort=25) + b"EHLO client.example\r\nQUIT\r\n")
    assert b"221 " in transport.value()
    protocol.connectionLost(None)
    [(text, record)] = endLines(logEvents, "smtp.disconnect")
    assert " tls=yes tls_version=TLSv1.2 seconds=" in text and "tls_cipher" not in text, text
    assert record["tlsVersion"] == "TLSv1.2" and "tlsCipher" not in record, record
    assert tlsSessions(factory, "TLSv1.2") == 1


def test_badSubfieldsLeaveASecuredSessionWithoutNames(store, logEvents):
    """
    Subfields that are not names, or run past their parent: the session
    goes on as a TLS one (no traceback, no refusal), its end line says
    C{tls=yes} with no version or cipher, and it is counted under
    C{other}, no version a minimum could be set to.
    """
    clock = Clock()
    factory = pop3Factory(store, clock)
    protocol, transport = wrapped(factory, clock)
    protocol.dataReceived(v2(sslField(version(b"TLSv1.3\r\nX") + b"\x23\x00\x40TLS")) + b"CAPA\r\nQUIT\r\n")
    out = transport.value()
    assert out.startswith(b"+OK mailgate POP3 server ready") and b"STLS" not in out
    protocol.connectionLost(None)
    [(text, record)] = endLines(logEvents, "pop3.disconnect")
    assert " tls=yes seconds=" in text and "tls_version" not in text, text
    assert "tlsVersion" not in record and "tlsCipher" not in record
    assert not [e for e in logEvents if e.get("log_failure") is not None]
    assert tlsSessions(factory, "TLSv1.2") == tlsSessions(factory, "TLSv1.3") == 0
    assert tlsSessions(factory, "other") == 1


def test_onlyTheClientBitMakesWhatIsToldShown(store, logEvents):
    """
    A PP2_TYPE_SSL field without the client bit (the client came in the
    clear) names no TLS, whatever its subfields say: the end line says
    C{tls=no} and nothing is counted; the same subfields with the bit set
    are shown and counted.
    """
    clock = Clock()
    factory = pop3Factory(store, clock)
    for client in (0x00, 0x01):
        protocol, transport = wrapped(factory, clock)
        protocol.dataReceived(v2(sslField(version(b"TLSv1.3"), client=client)) + b"QUIT\r\n")
        protocol.connectionLost(None)
    [(clear, _), (secured, record)] = endLines(logEvents, "pop3.disconnect")
    assert " tls=no seconds=" in clear and "tls_version" not in clear, clear
    assert " tls=yes tls_version=TLSv1.3 seconds=" in secured and record["tlsVersion"] == "TLSv1.3", secured
    assert tlsSessions(factory, "TLSv1.3") == 1 and tlsSessions(factory, "other") == 0


def test_onlyATrustedBalancerIsBelieved(store, logEvents):
    """
    A header from outside --proxy-network is never read: its TLS field is
    neither shown nor counted, as its client bit is not believed; the same
    header from a balancer on those networks is.
    """
    clock = Clock()
    factory = pop3Factory(store, clock)
    protocol, transport = wrapped(
        factory, clock, balancers=["127.0.0.0/8"], peer=IPv4Address("TCP", "198.51.100.1", 50000)
    )
    protocol.dataReceived(v2(HAPROXY_TLS13) + b"QUIT\r\n")
    assert transport.value() == b"" and transport.disconnecting
    assert protocol.wrappedProtocol.transport is None  # never connected
    assert endLines(logEvents, "pop3.disconnect") == []
    assert tlsSessions(factory, "TLSv1.3") == 0
    protocol, transport = wrapped(factory, clock, balancers=["127.0.0.0/8"])
    protocol.dataReceived(v2(HAPROXY_TLS13) + b"QUIT\r\n")
    protocol.connectionLost(None)
    [(text, _)] = endLines(logEvents, "pop3.disconnect")
    assert " tls=yes tls_version=TLSv1.3 tls_cipher=TLS_AES_256_GCM_SHA384 seconds=" in text, text
    assert tlsSessions(factory, "TLSv1.3") == 1


# -- a real HAProxy in front of a real twistd ------------------------------------


HAPROXY_TLS_CIPHER_CFG = HAPROXY_CFG.replace(
    "bind 127.0.0.1:{frontPort}", "bind 127.0.0.1:{frontPort} ssl crt {certificate}"
).replace("send-proxy-v2 source", "send-proxy-v2-ssl proxy-v2-options ssl-cipher source")


def popOverTLS(port, certificate, tlsVersion):
    """
    A POP3 client speaking TLS C{tlsVersion} (and only it) to HAProxy, from
    127.0.0.2 (HAProxy's own connection comes from 127.0.0.1).
    """
    context = ssl.create_default_context(cafile=str(certificate))
    context.minimum_version = context.maximum_version = tlsVersion
    raw = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE, source_address=("127.0.0.2", 0))
    client = poplib.POP3.__new__(poplib.POP3)
    client.host, client.port = "127.0.0.1", port
    client._tls_established = True
    client.sock = context.wrap_socket(raw, server_hostname="mail.example.test")
    client.file = client.sock.makefile("rb")
    client._debugging = 0
    client.welcome = client._getresp()
    return client


@sqliteOnly
def test_aRealHAProxyEndingTLS12And13(mailgate_server, mailgate_cli, haproxy, tmp_path):  # noqa: F811
    """
    HAProxy 2.6 ends the clients' TLS (send-proxy-v2-ssl, proxy-v2-options
    ssl-cipher) in front of twistd: a client at TLS 1.2 that logs in, one
    at TLS 1.3 that does not; each end line names the version and cipher
    the client negotiated with HAProxy, and /metrics counts one session
    of each version.
    """
    from certs import makeCertificate
    from test_metrics import promtoolCheck, sample, scrape

    certificate, key = makeCertificate(tmp_path, "mail.example.test")
    combined = tmp_path / "haproxy.pem"
    combined.write_bytes(certificate.read_bytes() + key.read_bytes())
    description = "haproxy:tcp:0:interface=127.0.0.1"
    server = mailgate_server(
        "--pop3", description, "--no-apop", "--auth-failure-delay", "0",
        "--metrics", "tcp:0:interface=127.0.0.1", "--log-format", "json",
    )
    mailgate_cli.addUser(ALICE, PASSWORD)
    backPort = int(re.search(rf"POP3 listening on 127\.0\.0\.1:(\d+) \({description}\)", server.stdout).group(1))
    front = haproxy(backPort, HAPROXY_TLS_CIPHER_CFG, certificate=combined)

    def counted():
        _, text = scrape(server)
        promtoolCheck(text)
        return [sample(text, "mailgate_tls_sessions_total", protocol="pop3", version=v) for v in ("TLSv1.2", "TLSv1.3")]

    assert counted() == [0, 0]
    negotiated = {}
    client = popOverTLS(front, certificate, ssl.TLSVersion.TLSv1_2)
    negotiated["logout"] = (client.sock.version(), client.sock.cipher()[0])
    client.user(ALICE)
    client.pass_(PASSWORD)
    assert client.quit().startswith(b"+OK")
    client = popOverTLS(front, certificate, ssl.TLSVersion.TLSv1_3)
    negotiated["disconnect"] = (client.sock.version(), client.sock.cipher()[0])
    assert client.quit().startswith(b"+OK")
    assert [negotiated[k][0] for k in ("logout", "disconnect")] == ["TLSv1.2", "TLSv1.3"]

    def records(event):
        found = [json.loads(line) for line in server.stdout.splitlines() if line.startswith("{")]
        return [record for record in found if record.get("event") == event] or None

    for event, key in (("pop3.logout", "logout"), ("pop3.disconnect", "disconnect")):
        [record] = waitFor(lambda event=event: records(event), f"the {event} line")
        version, cipherName = negotiated[key]
        assert record["peer"].startswith("127.0.0.2:"), record
        assert (record.get("tlsVersion"), record.get("tlsCipher")) == (version, cipherName), record
        shown = f" tls_version={version} tls_cipher={cipherName}"
        if event == "pop3.logout":
            assert record["text"].endswith(shown), record["text"]
        else:
            assert f" tls=yes{shown} seconds=" in record["text"], record["text"]
    assert counted() == [1, 1]
