"""
Users whose local part is UTF-8 (RFC 6531 and 6532: C{jörg@example.org}), as
Dovecot takes UTF-8 user names.

C{mailgate user add 'jörg@example.org'} was refused (exit 65, invalid local
part): SMTP with SMTPUTF8 and LMTP took the address's syntax, but no user
could have it, so its mail was refused and its POP3 and SASL logins failed.

The unit tests hold the rules of L{mailgate.address.normalizeAddress} (NFC,
lower case, octets of UTF-8, the characters refused); the end-to-end ones
run the C{mailgate} command (the installed script where its arguments
are the point) and C{twistd mailgate} with Python's smtplib
(SMTPUTF8), smtplib.LMTP and poplib (USER and PASS in UTF-8, AUTH PLAIN).
"""

import hashlib
import json
import poplib
import smtplib
import unicodedata

import pytest
from twisted.internet.task import Clock

from e2e import (  # noqa: F401 (fixtures)
    DEADLINE,
    AdminCommand,
    InstalledCommand,
    mailgate_server,
    mailgateHere,
    retrieve,
    sqliteOnly,
)
from mailgate.address import loginAddress, normalizeAddress, userAddress, userOfADetail, withoutDetail
from mailgate.errors import InvalidAddress
from mailgate.smtp.delivery import LocalDelivery
from mailgate.smtp.factory import LMTPFactory, SMTPFactory
from mailgate.testing import POP3Session, SMTPSession, addUser, resultOf
from saslclients import ScramClient, b64, unb64

JOERG = "jörg@example.org"
JOERG_NFD = unicodedata.normalize("NFD", "Jörg@example.org")
PASSWORD = "grüße aus köln"
SENDER = "sender@remote.test"
LOOPBACK_TCP = "tcp:0:interface=127.0.0.1"


# -- normalisation -------------------------------------------------------------


def test_composedAndDecomposedNamesAreOneUser():
    """
    NFC (a precomposed ö, as most keyboards type it) and NFD (o and a
    combining diaeresis, as macOS and some MTAs send it) are one user, in
    one case, given as text or as UTF-8 octets.
    """
    assert JOERG_NFD != "Jörg@example.org" and unicodedata.is_normalized("NFD", JOERG_NFD)
    for written in [JOERG, "JÖRG@Example.ORG", JOERG_NFD, JOERG_NFD.upper(), JOERG.encode("utf-8")]:
        assert normalizeAddress(written) == JOERG
        assert loginAddress(written) == JOERG
    assert loginAddress("Jörg", "example.org") == JOERG
    assert userAddress("Jörg@Bücher.example") == "jörg@xn--bcher-kva.example"
    # ASCII addresses are what they were, stored databases hold them so.
    assert normalizeAddress(" Alice.Smith+x@Example.ORG. ") == "alice.smith+x@example.org"
    assert normalizeAddress(b"O'Brien@example.org") == "o'brien@example.org"


@pytest.mark.parametrize(
    "written, stored",
    [
        ("ΟΔΥΣΣΕΥΣ@example.gr", "οδυσσευς@example.gr"),
        ("日本語@example.jp", "日本語@example.jp"),
        ("דוד@example.il", "דוד@example.il"),
        ("Zoë.Ünal@example.org", "zoë.ünal@example.org"),
        ("😀@example.org", "😀@example.org"),
        # KELVIN SIGN is canonically K (its NFC): the ASCII user.
        ("\u212aate@example.org", "kate@example.org"),
    ],
)
def test_localPartsOfOtherScripts(written, stored):
    assert normalizeAddress(written) == stored
    # One form: normalised again, it is itself; printable as it is.
    assert normalizeAddress(stored) == stored and stored.isprintable()


def test_lengthsAreOctetsOfUTF8():
    """
    RFC 6531 section 3.3: 64 octets of local part, 254 of address, in UTF-8
    and in the form kept (NFC): 32 ö are 64 octets (96 written as NFD).
    """
    assert normalizeAddress("ö" * 32 + "@example.org") == "ö" * 32 + "@example.org"
    assert normalizeAddress(unicodedata.normalize("NFD", "Ö" * 32) + "@example.org") == "ö" * 32 + "@example.org"
    with pytest.raises(InvalidAddress, match=r"local part too long in .* \(66 octets of UTF-8, at most 64\)"):
        normalizeAddress("ö" * 33 + "@example.org")
    domain = "a" * 63 + "." + "b" * 63 + "." + "c" * 63 + "." + "d" * 59
    assert len(domain) == 251
    assert normalizeAddress("ö@" + domain) == "ö@" + domain
    with pytest.raises(InvalidAddress, match=r"address too long: .* \(255 octets of UTF-8, at most 254\)"):
        normalizeAddress("öa@" + domain)


@pytest.mark.parametrize(
    "local, refusal",
    [
        ("a\u202eb", "U+202E RIGHT-TO-LEFT OVERRIDE is an invisible format character"),
        ("jö\u200drg", "U+200D ZERO WIDTH JOINER is an invisible format character"),
        ("jö\u00a0rg", "U+00A0 NO-BREAK SPACE is a space"),
        ("jö\u3000rg", "U+3000 IDEOGRAPHIC SPACE is a space"),
        ("jö\u0085rg", "U+0085 is a control character"),
        ("jö\u2028rg", "U+2028 LINE SEPARATOR is a line separator"),
        ("jö\u0378rg", "U+0378 is not an assigned character"),
        ("jö\ue000rg", "U+E000 is a private-use character"),
        ("jö\ufe0frg", "U+FE0F VARIATION SELECTOR-16 is an invisible character"),
        ("jö\u3164rg", "U+3164 HANGUL FILLER is an invisible character"),
        ("jö\ufffdrg", "U+FFFD REPLACEMENT CHARACTER is what stands for octets that are not UTF-8"),
        ("\u0301jörg", "U+0301 COMBINING ACUTE ACCENT is a combining mark with no letter before it"),
        ("ｊörg", "U+FF4A FULLWIDTH LATIN SMALL LETTER J has a compatibility form, 'j': write that instead"),
        ("ﬁnö", "U+FB01 LATIN SMALL LIGATURE FI has a compatibility form, 'fi': write that instead"),
    ],
)
def test_refusedCharactersAreNamed(local, refusal):
    """
    What cannot be seen, or looks like another name, is refused, the
    refusal naming the character; the address is shown escaped (repr), so
    that the refusal itself carries no override or line break.
    """
    with pytest.raises(InvalidAddress) as refused:
        normalizeAddress(f"{local}@example.org")
    message = str(refused.value)
    assert message.endswith(": " + refusal), message
    assert message.startswith("invalid local part in ") and message.isprintable(), message


@pytest.mark.parametrize("local", ["jö..rg", ".jörg", "jörg.", "jö rg", 'jö"rg', "jö(rg)", "jö\nrg", "é.ü."])
def test_theDotAtomRulesHoldForUTF8(local):
    """
    A UTF-8 local part is a dot-atom as an ASCII one is: its dots between
    atoms, no specials, no white space.
    """
    assert normalizeAddress("Jö.Rg@example.org") == "jö.rg@example.org"
    with pytest.raises(InvalidAddress, match="invalid local part"):
        normalizeAddress(f"{local}@example.org")


def test_aUTF8DetailOfAUTF8User(store):
    """
    With --recipient-delimiter, jörg+détail@ is jörg's mail, by SMTP with
    SMTPUTF8 and by LMTP, as bob+lists@ is bob's.
    """
    assert withoutDetail(normalizeAddress("Jörg+Détail@example.org"), "+") == JOERG
    assert userOfADetail('"Jörg+x y"@example.org', "+") == JOERG
    addUser(store, JOERG, PASSWORD)
    for factoryClass, hello in [(SMTPFactory, "EHLO"), (LMTPFactory, "LHLO")]:
        clock = Clock()
        delivery = LocalDelivery(store, recipientDelimiter="+")
        factory = factoryClass(delivery, hostname="mailgate.test", reactor=clock)
        s = SMTPSession(store, factory=factory, clock=clock)
        assert s.command(f"{hello} client.test").startswith("250")
        assert s.command(f"MAIL FROM:<{SENDER}> SMTPUTF8").startswith("250 ")
        recipient = unicodedata.normalize("NFD", "Jörg+Détail@example.org")
        assert s.command(f"RCPT TO:<{recipient}>") == f"250 2.1.5 recipient <{recipient}> OK\r\n"
        assert s.command("DATA").startswith("354 ")
        assert s.send(b"Subject: detail\r\n\r\nhallo\r\n.\r\n").startswith(b"250 2.0.0 ")
    assert len(resultOf(store.listMessages(JOERG))) == 2


# -- the protocols, in process ----------------------------------------------------------


def test_pop3AndSASLLoginsOfAUTF8User(store):
    """
    USER and PASS, APOP, AUTH PLAIN, LOGIN and SCRAM-SHA-256 log a UTF-8
    user in, the name written composed or not, in any case.
    """
    addUser(store, JOERG, PASSWORD, apop=True)
    s = POP3Session(store)
    assert s.command(f"USER {JOERG_NFD}").startswith("+OK")
    assert s.command(f"PASS {PASSWORD}") == f"+OK {JOERG} has 0 messages (0 octets)\r\n"
    s.command("QUIT")
    s = POP3Session(store)
    reply = s.command("AUTH PLAIN " + b64(f"\0JÖRG@example.org\0{PASSWORD}"))
    assert reply == f"+OK {JOERG} has 0 messages (0 octets)\r\n"
    s.command("QUIT")
    s = POP3Session(store, apop=True)
    digest = hashlib.md5(s.challenge.encode() + PASSWORD.encode("utf-8")).hexdigest()
    assert s.command(f"APOP {JOERG_NFD} {digest}") == f"+OK {JOERG} has 0 messages (0 octets)\r\n"
    s.command("QUIT")
    s = POP3Session(store)
    assert s.command(f"AUTH LOGIN {b64('Jörg@example.org')}") == f"+ {b64('Password:')}\r\n"
    assert s.command(b64(PASSWORD)) == f"+OK {JOERG} has 0 messages (0 octets)\r\n"
    s.command("QUIT")
    assert _scramLogin(store, JOERG_NFD) == f"+OK {JOERG} has 0 messages (0 octets)\r\n"


def test_scramPreparesTheUserNameAsSASLprepDoes(store):
    """
    SCRAM's user name is prepared as SASLprep prepares it (RFC 5802 section
    5.1 has the server do so): a full-width J, which a client that prepares
    names sends as J, is jörg's from a client that does not, too.
    """
    addUser(store, JOERG, PASSWORD)
    assert _scramLogin(store, "\uff2aörg@example.org") == f"+OK {JOERG} has 0 messages (0 octets)\r\n"


def _scramLogin(store, name):
    """
    A SCRAM-SHA-256 exchange as C{name} with L{PASSWORD}: the reply to its
    end, the server's signature checked.
    """
    s = POP3Session(store)
    client = ScramClient(name, PASSWORD)
    serverFirst = s.command(f"AUTH SCRAM-SHA-256 {b64(client.first())}")
    assert serverFirst.startswith("+ "), serverFirst
    serverFinal = s.command(b64(client.final(unb64(serverFirst[2:-2]))))
    assert serverFinal.startswith("+ "), serverFinal
    assert client.verify(unb64(serverFinal[2:-2]))
    reply = s.command("")
    s.command("QUIT")
    return reply


# -- end to end ------------------------------------------------------------------


def _message(subject):
    return (
        f"From: {SENDER}\r\nTo: {JOERG}\r\nSubject: {subject}\r\n\r\nGrüße, {subject}\r\n"
    ).encode("utf-8")


def _utf8Pop(server):
    client = poplib.POP3("127.0.0.1", server.port, timeout=DEADLINE)
    client.encoding = "utf-8"
    return client


def test_aUTF8UserGetsMailBySMTPUTF8AndLMTPAndReadsItByPOP3(mailgate_server):
    """
    The installed command adds jörg (written as macOS writes it); mail
    reaches him by SMTP with SMTPUTF8 and by LMTP (which takes UTF-8
    unannounced), each naming him in another form; he reads it by POP3 with
    USER and PASS in UTF-8 and with AUTH PLAIN.  Without SMTPUTF8, SMTP
    still refuses the address with 553 5.6.7.
    """
    cli = InstalledCommand(mailgate_server.database, cwd=mailgate_server.tmp_path)
    assert cli.check("user", "add", JOERG_NFD, "--password-stdin", input=PASSWORD + "\n") == f"added {JOERG}\n"
    assert JOERG in cli.users()
    server = mailgate_server("--smtp", LOOPBACK_TCP, "--lmtp", LOOPBACK_TCP, "--domain", "example.org")

    smtp = smtplib.SMTP("127.0.0.1", server.portOf("SMTP"), timeout=DEADLINE, local_hostname="client.test")
    try:
        viaSMTP = _message("smtp")
        assert smtp.sendmail(SENDER, ["JÖRG@example.org"], viaSMTP, mail_options=["SMTPUTF8"]) == {}
        assert smtp.mail(SENDER) == (250, b"2.1.0 sender <sender@remote.test> OK")
        smtp.command_encoding = "utf-8"
        assert smtp.rcpt(JOERG) == (553, b"5.6.7 bad recipient address: non-ASCII address without SMTPUTF8")
        smtp.rset()
    finally:
        smtp.quit()

    lmtp = smtplib.LMTP("127.0.0.1", server.portOf("LMTP"), timeout=DEADLINE, local_hostname="client.test")
    try:
        viaLMTP = _message("lmtp")
        lmtp.ehlo("client.test")
        lmtp.command_encoding = "utf-8"
        assert lmtp.mail(SENDER)[0] == 250
        assert lmtp.rcpt(JOERG_NFD)[0] == 250
        assert lmtp.data(viaLMTP)[0] == 250
    finally:
        lmtp.quit()

    client = _utf8Pop(server)
    assert client.user("Jörg@Example.org").startswith(b"+OK")
    assert client.pass_(PASSWORD).startswith(f"+OK {JOERG} has 2 messages".encode("utf-8"))
    assert client.stat()[0] == 2
    first, second = retrieve(client, 1), retrieve(client, 2)
    client.quit()
    assert first.endswith(viaSMTP) and second.endswith(viaLMTP)
    assert b"for <J\xc3\x96RG@example.org>" in first

    client = _utf8Pop(server)
    reply = client._shortcmd("AUTH PLAIN " + b64(f"\0{JOERG_NFD}\0{PASSWORD}"))
    assert reply.startswith(f"+OK {JOERG} has 2 messages".encode("utf-8")), reply
    client.quit()


def test_theAdminCommandsTakeAUTF8User(mailgate_server, tmp_path):
    """
    deliver, mailbox list and export (its directory named by the address),
    import maildir, quota, expire, rename, passwd, test and del, each given
    the name in another form.
    """
    cli = AdminCommand(mailgate_server.database)
    cli.addUser("Jörg@example.org", PASSWORD)
    cli.addUser("zoë@example.org", PASSWORD)
    cli.deliver(JOERG_NFD, _message("one"))
    assert len(cli.mailbox("JÖRG@example.org")) == 1
    cli.check("user", "quota", JOERG_NFD, "10M")
    cli.check("user", "expire", "JÖRG@example.org", "30")
    listed = cli.check("user", "list")
    assert [line.split()[4:7] for line in listed.splitlines() if line.startswith(JOERG)] == [["10M", "default", "30"]]
    cli.check("mailbox", "export", "--all", str(tmp_path / "out"))
    exported = tmp_path / "out" / JOERG
    assert len(list((exported / "cur").iterdir())) == 1
    cli.check("import", "maildir", str(exported), "ZOË@example.org")
    assert len(cli.mailbox("zoë@example.org")) == 1
    cli.check("user", "passwd", JOERG_NFD, "--password-stdin", input="neu\n")
    assert cli("user", "test", "Jörg@example.org", "--password-stdin", input="neu\n")[0] == 0
    cli.check("user", "rename", JOERG_NFD, "jürgen@example.org")
    assert set(cli.users()) == {"jürgen@example.org", "zoë@example.org"}
    cli.check("user", "del", "JÜRGEN@example.org")
    assert set(cli.users()) == {"zoë@example.org"}
    # A name no user can have is refused with its reason, on one line.
    code, out, err = cli("user", "add", "jö\u202erg@example.org", "--password-stdin", input="x\n")
    assert (code, out) == (65, "")
    assert err == (
        "mailgate: invalid local part in 'jö\\u202erg@example.org': "
        "U+202E RIGHT-TO-LEFT OVERRIDE is an invisible format character\n"
    )


@sqliteOnly
def test_aUTF8UserInTheJSONLogAndImportedByPOP3(mailgate_server, tmp_path):
    """
    The JSON log names the user as the name it is (one JSON string); import
    pop3 --users moves a UTF-8 user's maildrop, logging in to the source
    with its name in UTF-8.
    """
    cli = AdminCommand(mailgate_server.database)
    cli.addUser(JOERG, PASSWORD)
    cli.deliver(JOERG, _message("moved"))
    server = mailgate_server("--log-format", "json")
    users = tmp_path / "users.txt"
    users.write_text(f"{JOERG_NFD} {PASSWORD}\n", encoding="utf-8")
    target = "sqlite:///" + str(tmp_path / "target.sqlite3")
    target_cli = AdminCommand(target)
    target_cli.addUser(JOERG, PASSWORD)
    code, out, err = mailgateHere(target, "import", "pop3", f"pop3://127.0.0.1:{server.port}", "--users", str(users))
    assert code == 0, (out, err)
    assert len(target_cli.mailbox(JOERG)) == 1
    logins = [
        record for record in map(json.loads, server.stdout.splitlines()) if record["event"] == "pop3.login"
    ]
    assert [record["user"] for record in logins] == [JOERG], logins
