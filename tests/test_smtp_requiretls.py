"""
TLS required for SMTP and LMTP intake (C{--smtp-cleartext-network},
C{--lmtp-cleartext-network}), without sockets: an L{SMTPSession} over a
L{TLSStringTransport} (TLS in name only) from a peer on or off the
networks mail is taken from in the clear, against a real SQLite file.

Before STARTTLS a client outside them gets RFC 3207's C{530 5.7.0} to
MAIL, RCPT, DATA and BDAT (whose chunk is read and dropped, never run as
commands); EHLO, LHLO, NOOP, RSET, QUIT and STARTTLS work.  After STARTTLS,
and from the networks, mail goes in as it always did.  The end-to-end
tests with smtplib and Postfix are in C{test_e2e_requiretls}.
"""

import sqlite3

import pytest
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.logger import Logger

from mailgate import config as settings
from mailgate.config import MailgateConfig, checkConfig
from mailgate.errors import ConfigurationError
from mailgate.smtp.factory import SMTPFactory
from mailgate.testing import SMTPSession, addUser
from test_tap import noEnvironmentDatabase, parse  # noqa: F401 (autouse fixture)

ALICE = "alice@example.org"
SENDER = "postfix@relay.example.org"
TLS_FIRST = "530 5.7.0 Must issue a STARTTLS command first\r\n"
# Postfix on another machine.
REMOTE = IPv4Address("TCP", "192.0.2.25", 40000)
LOOPBACK_ONLY = ("127.0.0.0/8", "::1/128")


@pytest.fixture
def alice(store):
    addUser(store, ALICE, "secret")
    return ALICE


def session(store, tls, peer=REMOTE, lmtp=False, networks=LOOPBACK_ONLY, **options):
    s = SMTPSession(store, lmtp=lmtp, peer=peer, tls=tls, cleartextNetworks=networks, **options)
    s.events = []
    s.protocol.log = Logger(observer=s.events.append)
    return s


def hello(s, lmtp=False):
    reply = s.command("LHLO relay.example.org" if lmtp else "EHLO relay.example.org")
    assert reply.startswith("250-") and reply.endswith("250 STARTTLS\r\n"), reply
    return reply


def stored(dbpath):
    """
    How many messages the SQLite file holds, read by a connection of its own.
    """
    with sqlite3.connect(dbpath) as db:
        return db.execute("SELECT count(*) FROM maildrop").fetchone()[0]


@pytest.mark.parametrize("lmtp", [False, True], ids=["smtp", "lmtp"])
def test_aTransactionInTheClearIsRefusedUntilSTARTTLS(store, dbpath, alice, tls, lmtp):
    s = session(store, tls, lmtp=lmtp)
    hello(s, lmtp)
    # Every command of a transaction, and those that tell about users.
    for command in (f"MAIL FROM:<{SENDER}>", f"RCPT TO:<{ALICE}>", "DATA", "VRFY alice", "HELP", "EXPN list"):
        assert s.command(command) == TLS_FIRST, command
    # What carries no mail still works.
    assert s.command("NOOP").startswith("250 ")
    assert s.command("RSET").startswith("250 ")
    hello(s, lmtp)
    assert s.command("STARTTLS").startswith("220 ")
    assert s.transport.tlsStarted is tls
    # Over TLS the mail goes in.
    reply = s.command("LHLO relay.example.org" if lmtp else "EHLO relay.example.org")
    assert "STARTTLS" not in reply
    assert s.command(f"MAIL FROM:<{SENDER}>").startswith("250 ")
    assert s.command(f"RCPT TO:<{ALICE}>").startswith("250 ")
    assert s.command("DATA").startswith("354 ")
    assert s.send(b"Subject: over TLS\r\n\r\nbody\r\n.\r\n").startswith(b"250 ")
    assert stored(dbpath) == 1


def test_theRefusedMailIsLoggedAsARefusedSender(store, alice, tls):
    s = session(store, tls)
    hello(s)
    assert s.command(f"MAIL FROM:<{SENDER}> SIZE=100") == TLS_FIRST
    refused = [e for e in s.events if e.get("event") == "smtp.sender_refused"]
    assert len(refused) == 1, s.events
    event = refused[0]
    assert (event["sender"], event["code"], event["enhanced"], event["reason"]) == (
        SENDER, 530, "5.7.0", "TLS required",
    )


@pytest.mark.parametrize("lmtp", [False, True], ids=["smtp", "lmtp"])
def test_refusedSendersAreCountedByReason(store, alice, tls, lmtp):
    """
    Each MAIL refused (each an C{smtp.sender_refused} or
    C{lmtp.sender_refused} line) is counted in
    C{mailgate_senders_refused_total} by why: TLS required, the size it
    declares, a sender or parameters that do not parse.  Before, a MAIL
    refusal showed in no metric: an MTA whose every message was refused
    in the clear never reached RCPT or DATA, where refusals are counted.
    """
    from mailgate.metrics import Metrics
    from test_metrics import value

    metrics = Metrics()
    protocol = "lmtp" if lmtp else "smtp"

    def refused(reason):
        return value(metrics, "mailgate_senders_refused_total", protocol=protocol, reason=reason)

    s = session(store, tls, lmtp=lmtp, metrics=metrics)
    hello(s, lmtp)
    assert s.command(f"MAIL FROM:<{SENDER}>") == TLS_FIRST
    assert s.command(f"MAIL FROM:<{SENDER}>") == TLS_FIRST
    assert s.command(f"RCPT TO:<{ALICE}>") == TLS_FIRST
    assert s.command("STARTTLS").startswith("220 ")
    assert s.command("LHLO relay.example.org" if lmtp else "EHLO relay.example.org").startswith("250")
    assert s.command(f"MAIL FROM:<{SENDER}> SIZE=999999999999").startswith("552 5.3.4 ")
    assert s.command(f"MAIL FROM:<{SENDER}> FOO=BAR").startswith("555 5.5.4 ")
    assert s.command(f"MAIL FROM:<{SENDER}>").startswith("250 ")
    assert (refused("tls_required"), refused("too_large"), refused("bad_syntax"), refused("other")) == (2, 1, 1, 0)
    other = "smtp" if lmtp else "lmtp"
    assert value(metrics, "mailgate_senders_refused_total", protocol=other, reason="tls_required") == 0


def test_theRefusalsCountAsErrors(store, alice, tls):
    """
    A client that goes on in the clear is cut off as one making any other
    error is (SMTPServer.maxBadCommands).
    """
    s = session(store, tls)
    hello(s)
    s.protocol.maxBadCommands = 3
    replies = [s.command(f"MAIL FROM:<{SENDER}>") for _ in range(3)]
    assert replies[:2] == [TLS_FIRST] * 2
    assert replies[2].startswith(TLS_FIRST + "421 4.7.0 ")
    assert s.transport.disconnecting


def test_aRefusedChunkIsReadAndDroppedNotRunAsCommands(store, dbpath, alice, tls):
    """
    BDAT in the clear: its octets are read whatever the reply (RFC 3030
    section 2), so a MAIL, RCPT or BDAT in them is never obeyed.
    """
    s = session(store, tls)
    hello(s)
    chunk = f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{ALICE}>\r\nBDAT 5 LAST\r\nhello".encode()
    out = s.send(b"BDAT %d LAST\r\n" % len(chunk) + chunk + b"NOOP\r\n")
    assert out.decode() == TLS_FIRST + "250 2.0.0 OK\r\n"
    assert stored(dbpath) == 0
    # A chunk that is not the last, in several pieces.
    assert s.send(b"BDAT 12\r\nMAIL ") == b""
    assert s.send(b"FROM:\r\nNOOP\r\n").decode() == TLS_FIRST + "250 2.0.0 OK\r\n"


def test_aMessageSentAfterARefusedDATAEndsTheSession(store, dbpath, alice, tls):
    """
    A client that sends its message without waiting for the reply to
    DATA: what follows is no command (SMTP smuggling), and the session
    ends, as after every refused DATA.
    """
    s = session(store, tls)
    hello(s)
    out = s.send(f"DATA\r\nSubject: x\r\n\r\nMAIL FROM:<{SENDER}>\r\nRCPT TO:<{ALICE}>\r\n.\r\n".encode())
    assert out.decode().startswith(TLS_FIRST + "421 4.5.0 ")
    assert s.transport.disconnecting
    assert stored(dbpath) == 0


@pytest.mark.parametrize(
    "peer",
    [
        IPv4Address("TCP", "127.0.0.1", 40000),
        IPv6Address("TCP", "::1", 40000, 0, 0),
        # An IPv4 client on a dual-stack listener.
        IPv6Address("TCP", "::ffff:127.0.0.2", 40000, 0, 0),
        UNIXAddress(None),
    ],
    ids=["127.0.0.1", "::1", "mapped", "unix"],
)
def test_aClientOnTheNetworksSendsInTheClear(store, dbpath, alice, tls, peer):
    s = session(store, tls, peer=peer)
    replies = s.sendMail(SENDER, [ALICE], b"Subject: clear\r\n\r\nbody\r\n").splitlines()
    assert [line[:3] for line in replies if not line.startswith("250-")] == ["250", "250", "250", "354", "250"]
    assert stored(dbpath) == 1


def test_noneRequiresTLSFromLoopbackButNotFromAUnixSocket(store, alice, tls):
    loopback = session(store, tls, peer=IPv4Address("TCP", "127.0.0.1", 40000), networks=())
    hello(loopback)
    assert loopback.command(f"MAIL FROM:<{SENDER}>") == TLS_FIRST
    unix = session(store, tls, peer=UNIXAddress(None), networks=())
    hello(unix)
    assert unix.command(f"MAIL FROM:<{SENDER}>").startswith("250 ")


def test_byDefaultMailIsTakenInTheClearFromAnyone(store, dbpath, alice, tls):
    s = SMTPSession(store, peer=REMOTE, tls=tls)
    hello(s)
    assert s.command(f"MAIL FROM:<{SENDER}>").startswith("250 ")
    s = SMTPSession(store, peer=REMOTE)
    s.command("EHLO relay.example.org")
    assert s.command(f"MAIL FROM:<{SENDER}>").startswith("250 ")


def test_aFactoryRequiringTLSWithoutTLSIsRefused(store):
    with pytest.raises(ValueError, match="no TLS to offer"):
        SMTPFactory(None, reactor=None, cleartextNetworks=LOOPBACK_ONLY)
    # Every address of both families: nothing is required.
    SMTPFactory(None, reactor=None, cleartextNetworks=("::/0", "0.0.0.0/0", "10.0.0.0/8"))


# -- the settings --------------------------------------------------------------


def test_theSettingsAreOptionsAndKeys(tmp_path, pair):
    certificate, key = map(str, pair)
    options = parse(
        "--tls-cert", certificate, "--tls-key", key,
        "--lmtp-cleartext-network", "127.0.0.0/8", "--lmtp-cleartext-network", "::1",
        "--smtp-cleartext-network", "none",
    )
    assert options["lmtp-cleartext-network"] == ["127.0.0.0/8", "::1/128"]
    assert options["smtp-cleartext-network"] == ["none"]
    path = tmp_path / "mailgate.toml"
    path.write_text(
        f'tls-cert = "{certificate}"\ntls-key = "{key}"\nlmtp-cleartext-network = ["10.1.0.0/16"]\n'
    )
    options = parse("--config", str(path))
    assert options["lmtp-cleartext-network"] == ["10.1.0.0/16"]
    assert options["smtp-cleartext-network"] == ["0.0.0.0/0", "::/0"]


@pytest.mark.parametrize(
    "key, value",
    [("lmtpCleartextNetworks", ["127.0.0.0/8", "::1/128"]), ("smtpCleartextNetworks", ["none"]),
     ("smtpCleartextNetworks", ["0.0.0.0/0"])],
)
def test_requiringTLSWithoutACertificateIsRefused(key, value):
    with pytest.raises(ConfigurationError) as e:
        checkConfig(MailgateConfig(**{key: value}))
    name = "lmtp" if key.startswith("lmtp") else "smtp"
    assert str(e.value) == (
        f"{name}-cleartext-network asks for STARTTLS from other networks, which needs tls-cert and tls-key "
        "(not set): without them all their mail would be refused"
    )
    checkConfig(MailgateConfig(**{key: ["0.0.0.0/0", "::/0"]}))


@pytest.mark.parametrize(
    "networks",
    [["0.0.0.0/1", "128.0.0.0/1", "::/0"], ["0.0.0.0/0", "::/1", "8000::/1"],
     ["::ffff:0:0/97", "::ffff:128.0.0.0/97", "::/1", "8000::/1"]],
)
def test_networksThatSplitTheSpaceNeedNoCertificate(networks):
    """
    Networks that hold every address between them take mail in the clear
    from everyone, as 0.0.0.0/0 and ::/0 do: nothing asks for STARTTLS, so
    no certificate is needed, and no client is refused in the clear.
    """
    for key in ("smtpCleartextNetworks", "lmtpCleartextNetworks"):
        checkConfig(MailgateConfig(**{key: networks}))
    factory = SMTPFactory(None, reactor=None, cleartextNetworks=networks)
    assert not factory.requiresTLS
    assert factory.takesCleartext(IPv4Address("TCP", "203.0.113.9", 25))


def test_noneCannotBeCombinedWithNetworks(tmp_path):
    path = tmp_path / "mailgate.toml"
    path.write_text('smtp-cleartext-network = ["none", "127.0.0.0/8"]\n')
    with pytest.raises(SystemExit) as e:
        parse("--config", str(path))
    assert e.value.code == 78
    assert str(e.value) == (
        f"mailgate: {path}: key 'smtp-cleartext-network': 'none' takes mail in the clear from no network: "
        "it cannot be combined with networks"
    )


def test_theExampleFileListsThem():
    example = settings.exampleFile()
    assert '#smtp-cleartext-network = ["0.0.0.0/0", "::/0"]\n' in example
    assert '#lmtp-cleartext-network = ["0.0.0.0/0", "::/0"]\n' in example
