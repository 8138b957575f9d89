"""
XFORWARD and XCLIENT in SMTP and LMTP, over the protocol without sockets
(an L{SMTPSession} on a StringTransport, a real SQLite file): the MTA or
proxy in front, on --xclient-network, names the client it relays, and
the Received field (read back by POP3 RETR) and the log lines name that
client.  Offered and taken from those networks only; syntax and state
errors answered with the reason; XFORWARD's attributes hold for one mail
transaction; after XCLIENT the session starts over as the named client's,
its policy (a ban, unknown recipients) that client's, its connection
still counted against the proxy.  Each command is counted by how it
ended (mailgate_xclient_commands_total).  With a real Postfix and a real
Dovecot: test_postfix_xforward.py, test_dovecot_lmtp_xclient.py.
"""

import re

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure

from mailgate.smtp.forwarding import (
    ForwardingSyntaxError,
    RelayedClient,
    decodeXtext,
    parseXCLIENT,
    parseXFORWARD,
    updated,
)
from mailgate.testing import SMTPSession, addUser
from test_smtp_protocol import retr
from test_xclient import RecordingPolicy, counted

ALICE = "alice@example.org"
PASSWORD = "secret"
SENDER = "sender@remote.test"
#: the MTA in front, on --xclient-network
RELAY = IPv4Address("TCP", "127.0.0.1", 40000)
ELSEWHERE = IPv4Address("TCP", "127.0.0.9", 40000)
NETWORKS = ["127.0.0.1/32"]
XFORWARD = "XFORWARD NAME=mail.example.net ADDR=192.0.2.7 PORT=4711 PROTO=ESMTP HELO=client.example.net SOURCE=REMOTE"
MESSAGE = b"Subject: relayed\r\n\r\nhello\r\n"


@pytest.fixture
def alice(store):
    addUser(store, ALICE, PASSWORD)
    return store


def session(store, lmtp=False, peer=RELAY, networks=NETWORKS, hello=True, **options):
    s = SMTPSession(store, lmtp=lmtp, peer=peer, xclientNetworks=networks, **options)
    if hello:
        reply = s.command(("LHLO" if lmtp else "EHLO") + " relay.example.org")
        assert reply.startswith("250"), reply
    return s


def transaction(s, recipient=ALICE, message=MESSAGE):
    """
    MAIL, RCPT, DATA and the message: every reply, as one text.
    """
    out = [s.command(f"MAIL FROM:<{SENDER}>"), s.command(f"RCPT TO:<{recipient}>"), s.command("DATA")]
    out.append(s.send(message + b".\r\n").decode())
    return "".join(out)


def receivedField(store, number):
    """
    The Received field mailgate wrote at the top of the user's message
    C{number}, unfolded.
    """
    _, message = retr(store, ALICE, number)
    match = re.search(rb"^Received: (.*?)\r\n(?=\S)", message, re.MULTILINE | re.DOTALL)
    assert match, message[:400]
    return re.sub(rb"\r\n\t", b" ", match.group(1)).decode()


def end(s):
    """
    The client went away (after QUIT, or closed on): the session's end
    line is written.
    """
    s.protocol.connectionLost(Failure(ConnectionDone()))


def lines(logEvents, event):
    return [e["line"] for e in logEvents if e.get("event") == event]


# -- the offer ---------------------------------------------------------------


@pytest.mark.parametrize("lmtp", [False, True])
def test_offeredToTheNetworksOnly(store, lmtp):
    offered = session(store, lmtp=lmtp, hello=False).command(("LHLO" if lmtp else "EHLO") + " relay.example.org")
    assert "250-XCLIENT NAME ADDR PORT PROTO HELO\r\n" in offered
    assert offered.endswith("250 XFORWARD NAME ADDR PORT PROTO HELO IDENT SOURCE\r\n")
    for s in (session(store, lmtp=lmtp, peer=ELSEWHERE, hello=False), session(store, lmtp=lmtp, networks=(), hello=False)):
        reply = s.command(("LHLO" if lmtp else "EHLO") + " relay.example.org")
        assert reply.startswith("250-") and "XFORWARD" not in reply and "XCLIENT" not in reply, reply


@pytest.mark.parametrize("command", [XFORWARD, "XCLIENT ADDR=192.0.2.7 PORT=4711"])
@pytest.mark.parametrize("peer, networks", [(ELSEWHERE, NETWORKS), (RELAY, ())])
def test_refusedFromElsewhere(alice, command, peer, networks):
    s = session(alice, peer=peer, networks=networks)
    assert s.command(command) == "550 5.7.0 insufficient authorization\r\n"
    # Nothing changed: the message names the connection's own client.
    assert "250 2.0.0" in transaction(s)
    assert receivedField(alice, 1).startswith(f"from relay.example.org ([{peer.host}]) by mailgate.test ")


# -- XFORWARD ----------------------------------------------------------------


@pytest.mark.parametrize("lmtp", [False, True])
def test_theReceivedFieldNamesTheForwardedClient(alice, lmtp, logEvents):
    s = session(alice, lmtp=lmtp)
    assert s.command(XFORWARD) == "250 2.0.0 OK\r\n"
    # A second command adds to the first (Postfix sends IDENT apart).
    assert s.command("XFORWARD IDENT=3CF6B2AAE8") == "250 2.0.0 OK\r\n"
    assert "250 2.0.0" in transaction(s)
    s.command("QUIT")
    end(s)
    received = receivedField(alice, 1)
    assert received.startswith("from client.example.net (mail.example.net [192.0.2.7]) by mailgate.test (mailgate) ")
    protocol = "lmtp" if lmtp else "smtp"
    [delivered] = lines(logEvents, f"{protocol}.delivered")
    assert delivered.endswith(
        " peer=192.0.2.7:4711 helo=<client.example.net> relay=127.0.0.1:40000 orig_queue_id=3CF6B2AAE8"
    ), delivered
    [event] = [e for e in logEvents if e.get("event") == f"{protocol}.delivered"]
    assert (event["peer"], event["relay"], event["clientName"], event["origQueueId"]) == (
        "192.0.2.7:4711", "127.0.0.1:40000", "mail.example.net", "3CF6B2AAE8",
    )
    # The session's own lines name the MTA it is.
    [disconnect] = lines(logEvents, f"{protocol}.disconnect")
    assert disconnect.startswith(f"{protocol} disconnect peer=127.0.0.1:40000 helo=<relay.example.org> ")


def test_theAttributesHoldForOneTransaction(alice, logEvents):
    s = session(alice)
    s.command(XFORWARD)
    transaction(s)
    # The next message over the same connection is the MTA's own again
    # (XFORWARD_README: reset at the end of the transaction).
    transaction(s)
    assert receivedField(alice, 1).startswith("from client.example.net (mail.example.net [192.0.2.7]) ")
    assert receivedField(alice, 2).startswith("from relay.example.org ([127.0.0.1]) ")
    second = lines(logEvents, "smtp.delivered")[1]
    assert second.endswith(" peer=127.0.0.1:40000"), second


@pytest.mark.parametrize("between", ["RSET", "EHLO relay.example.org"])
def test_rsetOrEhloForgetsThem(alice, between):
    s = session(alice)
    s.command(XFORWARD)
    assert s.command(between).startswith("250")
    transaction(s)
    assert receivedField(alice, 1).startswith("from relay.example.org ([127.0.0.1]) ")


def test_aRefusedMailKeepsThemForTheNextOne(alice, logEvents):
    s = session(alice)
    s.command("XFORWARD ADDR=192.0.2.7 HELO=client.example.net")
    assert s.command("MAIL FROM:<a@@b>").startswith("501 5.1.7")
    [refused] = lines(logEvents, "smtp.sender_refused")
    assert " peer=192.0.2.7 helo=<client.example.net> relay=127.0.0.1:40000: 501 5.1.7 " in refused, refused
    transaction(s)
    assert receivedField(alice, 1).startswith("from client.example.net ([192.0.2.7]) ")


def test_refusedInATransaction(alice):
    s = session(alice)
    s.command(f"MAIL FROM:<{SENDER}>")
    assert s.command(XFORWARD) == "503 5.5.1 mail transaction in progress\r\n"
    assert s.command("XCLIENT ADDR=192.0.2.7") == "503 5.5.1 mail transaction in progress\r\n"
    assert s.command(f"RCPT TO:<{ALICE}>").startswith("250")
    assert s.command("DATA").startswith("354")
    assert s.send(MESSAGE + b".\r\n").startswith(b"250")
    # Once it ended, they may come again.
    assert s.command(XFORWARD) == "250 2.0.0 OK\r\n"


@pytest.mark.parametrize(
    "argument, reason",
    [
        ("", "syntax: XFORWARD attribute=value ..."),
        ("NAME", "attribute=value expected, not NAME"),
        ("NAME=", "attribute=value expected, not NAME="),
        ("COLOUR=blue", "bad XFORWARD attribute name: COLOUR"),
        ("ADDR=192.0.2.300", "bad ADDR syntax: 192.0.2.300"),
        ("ADDR=IPV6:192.0.2.7x", "bad ADDR syntax: IPV6:192.0.2.7x"),
        # A zone: any octets after its "%", a line break into the Received
        # field and the log (xtext's +0D+0A) among them.
        ("ADDR=IPV6:fe80::1%eth0", "bad ADDR syntax: IPV6:fe80::1%eth0 (an address without a %zone)"),
        (
            "ADDR=IPV6:fe80::1%+0D+0AX-Injected:+20yes",
            "bad ADDR syntax: IPV6:fe80::1%??X-Injected: yes (an address without a %zone)",
        ),
        ("PORT=65536", "bad PORT syntax: 65536"),
        ("PORT=-1", "bad PORT syntax: -1"),
        ("SOURCE=NEARBY", "bad SOURCE syntax: NEARBY (LOCAL or REMOTE)"),
        ("PROTO=E.SMTP", "bad PROTO syntax: E.SMTP"),
        ("HELO=a+2", "malformed xtext in the value of HELO"),
        ("HELO=a+zz", "malformed xtext in the value of HELO"),
        ("HELO=" + "a" * 256, "HELO value too long (the limit is 255 characters)"),
    ],
)
def test_badSyntaxIsAnsweredWithTheReason(alice, argument, reason):
    s = session(alice)
    assert s.command(f"XFORWARD {argument}".rstrip()) == f"501 5.5.4 {reason}\r\n"
    # Nothing of it was taken, and the session goes on.
    transaction(s)
    assert receivedField(alice, 1).startswith("from relay.example.org ([127.0.0.1]) ")


def test_valuesAreXtextAndUnavailableErases(alice):
    s = session(alice)
    # xtext: +2B is "+", +3D "="; IPv6 with Postfix's prefix.
    assert s.command("XFORWARD ADDR=IPv6:2001:db8::7 HELO=a+2Bb+3Dc.example NAME=[TEMPUNAVAIL]") == "250 2.0.0 OK\r\n"
    transaction(s)
    assert receivedField(alice, 1).startswith("from a+b=c.example ([IPv6:2001:db8::7]) ")
    s.command(XFORWARD)
    assert s.command("XFORWARD NAME=[unavailable] HELO=[UNAVAILABLE]") == "250 2.0.0 OK\r\n"
    transaction(s)
    assert receivedField(alice, 2).startswith("from unknown ([192.0.2.7]) ")


def test_aForwardedLocalSubmissionNamesNoClient(alice):
    # ADDR=[UNAVAILABLE]: the message was submitted on the MTA's own host.
    s = session(alice)
    s.command("XFORWARD NAME=[UNAVAILABLE] ADDR=[UNAVAILABLE] HELO=[UNAVAILABLE] SOURCE=LOCAL")
    transaction(s)
    assert receivedField(alice, 1).startswith("by mailgate.test (mailgate) with ESMTP id ")


def test_aNameThatIsNoHostNameIsLeftOut(alice):
    s = session(alice)
    s.command("XFORWARD NAME=evil+28name+29 ADDR=192.0.2.7 HELO=x+3Bdate")
    transaction(s)
    # Nothing the client chose turns the field round.
    assert receivedField(alice, 1).startswith("from x?date ([192.0.2.7]) by mailgate.test ")


# -- XCLIENT -----------------------------------------------------------------


@pytest.mark.parametrize("lmtp", [False, True])
def test_xclientStartsTheSessionOverAsTheNamedClients(alice, lmtp, logEvents):
    policy = RecordingPolicy()
    s = session(alice, lmtp=lmtp, policy=policy)
    hello = "LHLO" if lmtp else "EHLO"
    kind = "LMTP" if lmtp else "ESMTP"
    protocol = kind.lower().lstrip("e")
    # What Dovecot's LMTP proxy sends, in two commands as it may.
    assert s.command("XCLIENT HELO=mta.example.net PROTO=ESMTP TTL=4 TIMEOUT=125") == (
        f"220 mailgate.test {kind} mailgate ready\r\n"
    )
    assert s.command("XCLIENT PORT=4711 ADDR=192.0.2.7") == f"220 mailgate.test {kind} mailgate ready\r\n"
    # A new greeting: EHLO (LHLO) again before mail.
    assert s.command(f"MAIL FROM:<{SENDER}>") == f"503 5.5.1 send {hello} first\r\n"
    assert s.command(f"{hello} dovecot.example.org").startswith("250-")
    assert "250 2.0.0" in transaction(s)
    s.command("QUIT")
    end(s)
    # The proxy's own LHLO does not replace the HELO it gave.
    assert receivedField(alice, 1).startswith("from mta.example.net ([192.0.2.7]) by mailgate.test ")
    assert lines(logEvents, f"{protocol}.xclient") == [
        f"{protocol} xclient peer=127.0.0.1:40000 proxy=127.0.0.1:40000 helo=mta.example.net",
        f"{protocol} xclient peer=192.0.2.7:4711 proxy=127.0.0.1:40000 helo=mta.example.net",
    ]
    [delivered] = lines(logEvents, f"{protocol}.delivered")
    assert delivered.endswith(" peer=192.0.2.7:4711"), delivered
    [disconnect] = lines(logEvents, f"{protocol}.disconnect")
    assert disconnect.startswith(
        f"{protocol} disconnect peer=192.0.2.7:4711 proxy=127.0.0.1:40000 helo=<dovecot.example.org> "
    ), disconnect
    # Counted against the proxy, whose connection it is.
    assert policy.calls == [("admit", "127.0.0.1"), ("closed", "127.0.0.1")]


def test_theNamedClientsUnknownRecipientsAreItsOwn(alice):
    policy = RecordingPolicy()
    s = session(alice, policy=policy)
    s.command("XCLIENT ADDR=192.0.2.7 NAME=mail.example.net")
    s.command("EHLO mail.example.net")
    s.command(f"MAIL FROM:<{SENDER}>")
    assert s.command("RCPT TO:<nobody@example.org>").startswith("550 5.1.1")
    assert ("unknown", "192.0.2.7") in policy.calls
    s.command(f"RCPT TO:<{ALICE}>")
    s.command("DATA")
    s.send(MESSAGE + b".\r\n")
    assert receivedField(alice, 1).startswith("from mail.example.net (mail.example.net [192.0.2.7]) ")


def test_aBannedNamedClientIsRefused(alice, logEvents):
    s = session(alice, policy=RecordingPolicy(banned={"192.0.2.66"}))
    reply = s.command("XCLIENT ADDR=192.0.2.66 PORT=4711")
    assert reply == "421 4.7.0 mailgate.test the client's address is banned, closing connection\r\n"
    assert s.transport.disconnecting
    end(s)
    [disconnect] = lines(logEvents, "smtp.disconnect")
    assert "reason='banned'" in disconnect, disconnect


def test_xclientOfUnavailableAddressKeepsTheAddress(alice):
    s = session(alice)
    assert s.command("XCLIENT ADDR=[UNAVAILABLE] HELO=client.example.net LOGIN=someone").startswith("220 ")
    s.command("EHLO relay.example.org")
    transaction(s)
    assert receivedField(alice, 1).startswith("from client.example.net ([127.0.0.1]) ")


@pytest.mark.parametrize(
    "argument, reason",
    [
        ("", "syntax: XCLIENT attribute=value ..."),
        ("ADDR=not-an-address", "bad ADDR syntax: not-an-address"),
        ("ADDR=fe80::1%+0D+0A", "bad ADDR syntax: fe80::1%?? (an address without a %zone)"),
        ("ADDR=192.0.2.7 PORT=x", "bad PORT syntax: x"),
        ("ADDR", "attribute=value expected, not ADDR"),
        ("COLOUR=blue", "bad XCLIENT attribute name: COLOUR"),
    ],
)
def test_xclientSyntaxErrors(alice, argument, reason, logEvents):
    s = session(alice)
    assert s.command(f"XCLIENT {argument}".rstrip()) == f"501 5.5.4 {reason}\r\n"
    # The session goes on as it was: no new greeting, EHLO still stands.
    assert "250 2.0.0" in transaction(s)
    assert lines(logEvents, "smtp.xclient") == []


def test_tlsIsTheProxysLinksToDecide(store, tls):
    # Mail in the clear from loopback only: the proxy is there, the
    # client it names is not, and the proxy's link is what carries it.
    s = session(store, tls=tls, cleartextNetworks=("127.0.0.0/8",))
    s.command("XCLIENT ADDR=192.0.2.7")
    s.command("EHLO client.example.net")
    assert s.command(f"MAIL FROM:<{SENDER}>").startswith("250")


# -- counted ------------------------------------------------------------------


@pytest.mark.parametrize("lmtp", [False, True])
@pytest.mark.parametrize(
    "command, line, taken",
    [("XFORWARD", XFORWARD, "250 2.0.0 OK\r\n"), ("XCLIENT", "XCLIENT ADDR=192.0.2.7 PORT=4711", "220 ")],
)
def test_eachOutcomeIsCounted(alice, lmtp, command, line, taken):
    """
    README: mailgate_xclient_commands_total counts each XFORWARD and
    XCLIENT by protocol, command and result: refused from a peer outside
    --xclient-network (what a misconfigured option shows), refused in a
    mail transaction, refused for its syntax, and taken.
    """
    protocol = "lmtp" if lmtp else "smtp"
    outside = session(alice, lmtp=lmtp, peer=ELSEWHERE)
    assert outside.command(line) == "550 5.7.0 insufficient authorization\r\n"
    assert counted(outside) == {(protocol, command, "refused_network"): 1}

    s = session(alice, lmtp=lmtp)
    assert s.command(f"MAIL FROM:<{SENDER}>").startswith("250")
    assert s.command(line) == "503 5.5.1 mail transaction in progress\r\n"
    assert s.command("RSET").startswith("250")
    assert s.command(f"{command} COLOUR=blue") == f"501 5.5.4 bad {command} attribute name: COLOUR\r\n"
    assert counted(s) == {(protocol, command, "refused_sequence"): 1, (protocol, command, "refused_syntax"): 1}
    assert s.command(line).startswith(taken)
    assert counted(s) == {
        (protocol, command, "refused_sequence"): 1, (protocol, command, "refused_syntax"): 1,
        (protocol, command, "accepted"): 1,
    }


def test_anXclientNamingABannedClientIsCountedTaken(alice):
    """
    The proxy's XCLIENT was taken; the ban is the named client's, told
    by the 421 and the session's end line, not a refusal of the proxy.
    """
    s = session(alice, policy=RecordingPolicy(banned={"192.0.2.66"}))
    assert s.command("XCLIENT ADDR=192.0.2.66").startswith("421 4.7.0")
    assert counted(s) == {("smtp", "XCLIENT", "accepted"): 1}


# -- the attributes' parser ---------------------------------------------------


def test_xtext():
    assert decodeXtext("plain") == "plain"
    assert decodeXtext("a+2Bb+3d") == "a+b="
    for bad in ("+", "a+1", "+G0"):
        with pytest.raises(ForwardingSyntaxError):
            decodeXtext(bad)


def test_parsedAttributes():
    attributes = parseXFORWARD("name=Mail.Example.NET addr=::ffff:192.0.2.7 port=25 proto=esmtp source=remote")
    client = updated(None, attributes)
    assert client == RelayedClient(
        name="mail.example.net", address=client.address, port=25, proto="ESMTP", source="REMOTE"
    )
    assert str(client.address) == "192.0.2.7" and client.describe() == "192.0.2.7:25"
    assert updated(client, {"PORT": None}).describe() == "192.0.2.7"
    assert RelayedClient().describe() == "unknown" and RelayedClient().localSubmission
    # XCLIENT: what grants nothing here is taken and left out.
    assert parseXCLIENT("LOGIN=bob TTL=4 DESTADDR=192.0.2.1 ADDR=IPV6:2001:db8::1") == {
        "ADDR": parseXFORWARD("ADDR=2001:db8::1")["ADDR"]
    }
    with pytest.raises(ForwardingSyntaxError, match="bad XFORWARD attribute name: LOGIN"):
        parseXFORWARD("LOGIN=bob")


def test_aReloadGivesTheNetworksToSMTPAndLMTP():
    """
    --xclient-network applies at SIGHUP to the SMTP and LMTP sessions
    opened after it, as to POP3's.
    """
    from types import SimpleNamespace

    from mailgate.reload import _applyNetworks
    from mailgate.testing import smtpFactory

    for factory in (smtpFactory(None, xclientNetworks=NETWORKS), smtpFactory(None, lmtp=True)):
        _applyNetworks(factory, SimpleNamespace(xclientNetworks=["192.0.2.0/24"]), {"xclient-network"})
        assert factory.acceptsXCLIENT(IPv4Address("TCP", "192.0.2.9", 25))
        assert not factory.acceptsXCLIENT(RELAY)
