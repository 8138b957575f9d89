"""
Recipients with a detail (C{--recipient-delimiter}, Postfix's and Dovecot's
C{recipient_delimiter}): C{bob+lists@example.org} is bob's mail.

The protocol tests drive an L{SMTPSession} against a real SQLite file; the
end-to-end one runs C{twistd mailgate} with the option and hands mail over
with Python's C{smtplib.LMTP}, as an MTA does.
"""

import re
import smtplib

import pytest
from twisted.internet.task import Clock
from twisted.python import usage

from e2e import DEADLINE, mailgate_cli, mailgate_server, sqliteOnly  # noqa: F401 (fixtures)
from mailgate import tap
from mailgate.smtp.delivery import LocalDelivery
from mailgate.smtp.factory import LMTPFactory, SMTPFactory
from mailgate.testing import POP3Session, SMTPSession, addUser, resultOf

ALICE = "alice@example.org"
BOB = "bob@example.org"
PASSWORD = "secret"
SENDER = "sender@remote.test"


@pytest.fixture
def users(store):
    for address in (ALICE, BOB):
        addUser(store, address, PASSWORD)
    return store


def session(store, delimiter="+", lmtp=False, postmaster=None):
    clock = Clock()
    factoryClass = LMTPFactory if lmtp else SMTPFactory
    delivery = LocalDelivery(store, postmaster=postmaster, recipientDelimiter=delimiter)
    s = SMTPSession(store, factory=factoryClass(delivery, hostname="mailgate.test", reactor=clock), clock=clock)
    assert s.command("LHLO client.test" if lmtp else "EHLO client.test").startswith("250")
    return s


def sizes(store, address):
    return [m.size for m in resultOf(store.listMessages(address))]


def send(s, recipients, body=b"Subject: detail\r\n\r\nhello\r\n"):
    """
    One transaction: the replies to the RCPTs, and those to the final dot.
    """
    assert s.command(f"MAIL FROM:<{SENDER}>").startswith("250 ")
    replies = [s.command(f"RCPT TO:<{r}>").rstrip("\r\n") for r in recipients]
    if not any(r.startswith("250 ") for r in replies):
        s.command("RSET")
        return replies, []
    assert s.command("DATA").startswith("354 ")
    return replies, s.send(body + b".\r\n").decode().split("\r\n")[:-1]


@pytest.mark.parametrize("lmtp", [False, True], ids=["smtp", "lmtp"])
def test_anAddressWithADetailIsTheUsersMail(users, lmtp):
    s = session(users, "+-", lmtp=lmtp)
    replies, final = send(s, ["bob+lists@example.org", "Bob-Work+x@Example.Org", "alice+@example.org"])
    assert replies == [
        "250 2.1.5 recipient <bob+lists@example.org> OK",
        "250 2.1.5 recipient <Bob-Work+x@Example.Org> OK",
        "250 2.1.5 recipient <alice+@example.org> OK",
    ]
    assert all(line.startswith("250 2.0.0 ") for line in final), final
    assert len(sizes(users, BOB)) == 1 and len(sizes(users, ALICE)) == 1


def test_aUserOfTheWholeNameGetsItsOwnMail(users):
    addUser(users, "bob+lists@example.org", PASSWORD)
    s = session(users)
    send(s, ["bob+lists@example.org"])
    assert len(sizes(users, "bob+lists@example.org")) == 1
    assert sizes(users, BOB) == []


def test_whatNamesNoUserIsStillRefused(users):
    s = session(users)
    replies, _ = send(s, ["nobody+lists@example.org", "+bob@example.org", "bob.lists@example.org"])
    assert [r[:10] for r in replies] == ["550 5.1.1 "] * 3, replies


@pytest.mark.parametrize("lmtp", [False, True], ids=["smtp", "lmtp"])
def test_aDetailThatIsNoAddresssOwnIsStillTheUsersMail(users, lmtp):
    """
    The detail is the sender's to choose: in UTF-8 (SMTPUTF8), or quoted
    with a space in it, bob+café@ and "bob+x y"@ are bob's mail, as
    Dovecot's LMTP delivers "bob+x y"@ and Postfix's local delivery both.
    They were 550 5.1.1 no such user: the whole local part, being no
    address's, was never cut at the delimiter.
    """
    s = session(users, lmtp=lmtp)
    assert s.command(f"MAIL FROM:<{SENDER}> SMTPUTF8").startswith("250 ")
    for recipient in ["bob+caf\u00e9@example.org", '"bob+x y"@example.org', '"Bob+\\"q\\""@Example.org']:
        assert s.command(f"RCPT TO:<{recipient}>") == f"250 2.1.5 recipient <{recipient}> OK\r\n"
    assert s.command("DATA").startswith("354 ")
    assert s.send(b"Subject: d\r\n\r\n.\r\n").startswith(b"250 2.0.0 ")
    assert len(sizes(users, BOB)) == 1
    # A detail of nobody, or one before any user's name, is nobody's.
    assert s.command(f"MAIL FROM:<{SENDER}> SMTPUTF8").startswith("250 ")
    for recipient in ["nobody+caf\u00e9@example.org", '"+bob x"@example.org', "j\u00f6rg+x@example.org"]:
        assert s.command(f"RCPT TO:<{recipient}>").startswith("550 5.1.1 ")


#: bob with a detail of 60 characters: a local part of 64 octets and more,
#: as a service's per-sign-up token or a tracking tag makes it
LONG_DETAIL = "bob+" + "t0k3n-" * 10 + "@example.org"


@pytest.mark.parametrize("lmtp", [False, True], ids=["smtp", "lmtp"])
def test_aDetailLongerThanALocalPartIsStillTheUsersMail(users, lmtp):
    """
    A detail may make the local part longer than RFC 5321's 64 octets
    (which section 4.5.3.1 asks receivers not to insist on): bob+ and a
    token of 60 characters is bob's mail, as Postfix and Dovecot's LMTP
    deliver it.  It was refused at RCPT (501 5.1.3 local part too long),
    so an MTA in front bounced it.  Without a user it names, such an
    address is no user's (550 5.1.1).
    """
    assert len(LONG_DETAIL.partition("@")[0]) == 64
    s = session(users, lmtp=lmtp)
    replies, final = send(s, [LONG_DETAIL, "Bob+" + "x" * 200 + "@example.org"])
    assert [r[:10] for r in replies] == ["250 2.1.5 "] * 2, replies
    assert final and all(line.startswith("250 2.0.0 ") for line in final), final
    assert len(sizes(users, BOB)) == 1
    replies, _ = send(s, ["nobody+" + "x" * 60 + "@example.org", "b" * 65 + "@example.org"])
    assert [r[:10] for r in replies] == ["550 5.1.1 "] * 2, replies


def test_withoutADelimiterAddressesAreTakenWhole(users):
    s = session(users, delimiter=None)
    replies, _ = send(s, ["bob+lists@example.org"])
    assert replies == ["550 5.1.1 <bob+lists@example.org>: no such user here"]


def test_postmasterWithADetailGoesToThePostmaster(users):
    s = session(users, postmaster=ALICE)
    replies, final = send(s, ["postmaster+abuse@example.org"])
    assert replies[0].startswith("250 ") and final[0].startswith("250 "), (replies, final)
    assert len(sizes(users, ALICE)) == 1


def receivedFor(store, address):
    """
    The address in the C{for} clause of the Received field of each message
    in C{address}'s maildrop, read by POP3.
    """
    pop = POP3Session(store)
    assert pop.login(address, PASSWORD).startswith("+OK")
    count = int(pop.command("STAT").split()[1])
    found = [re.search(r"\r\n\tfor <([^>]*)>; ", pop.command(f"RETR {n}")) for n in range(1, count + 1)]
    pop.command("QUIT")
    return [match and match.group(1) for match in found]


@pytest.mark.parametrize("lmtp", [False, True], ids=["smtp", "lmtp"])
def test_theReceivedFieldNamesTheAddressWithItsDetail(users, lmtp):
    """
    The Received field's C{for} clause names the recipient as the client
    did (RFC 5321 section 4.4), detail and all, as Postfix and Dovecot
    write it: it named the user (bob@example.org), and the only trace of
    the address the mail was sent to, which a POP3 user's client filters
    on, was lost.  Checked as addresses are (nothing else reaches the
    field), the domain in lower case; the local part in the client's case,
    which RFC 5321 section 2.4 has SMTP preserve (Postfix and Dovecot
    write it so).
    """
    s = session(users, lmtp=lmtp, postmaster=ALICE)
    for recipient in ("Bob+Lists@Example.Org", BOB, "postmaster"):
        replies, final = send(s, [recipient])
        assert final and final[0].startswith("250 "), (replies, final)
    assert receivedFor(users, BOB) == ["Bob+Lists@example.org", BOB]
    # RFC 5321's <postmaster> names no domain: the address it went to.
    assert receivedFor(users, ALICE) == [ALICE]


@pytest.mark.parametrize(
    "value, accepted",
    [("+", True), ("+-_", True), ("", False), (".", False), ("@", False), ("++", False), ("+ ", False)],
)
def test_theOptionTakesLocalPartSpecials(value, accepted):
    options = tap.Options()
    if accepted:
        options.parseOptions(["--recipient-delimiter", value])
        assert options.toConfig().recipientDelimiter == value
    else:
        with pytest.raises(usage.UsageError, match="recipient-delimiter"):
            options.parseOptions(["--recipient-delimiter", value])


@sqliteOnly
def test_anMTAHandsOverMailForAUserWithADetail(mailgate_server, mailgate_cli):
    """
    twistd mailgate --recipient-delimiter +: an LMTP client's mail for
    bob+lists@example.org lands in bob's maildrop.
    """
    server = mailgate_server("--lmtp", "tcp:0:interface=127.0.0.1", "--domain", "example.org",
                             "--recipient-delimiter", "+")
    mailgate_cli.addUser(BOB, PASSWORD)
    client = smtplib.LMTP(timeout=DEADLINE)
    client.connect("127.0.0.1", server.portOf("LMTP"))
    client.ehlo("mta.test")
    assert client.sendmail(SENDER, ["bob+lists@example.org"], b"Subject: lists\r\n\r\nhello\r\n") == {}
    # A detail that makes the local part over 64 octets too.
    assert client.sendmail(SENDER, [LONG_DETAIL], b"Subject: long detail\r\n\r\nhello\r\n") == {}
    client.quit()
    assert len(mailgate_cli.mailbox(BOB)) == 2
