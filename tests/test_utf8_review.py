"""
A review of UTF-8 user names (c05fd1c) as an administrator would make it:
every spelling of one name reaches one user, whichever way the name comes
in, and what no user can have is refused clearly.

The unit tests hold L{mailgate.address.normalizeAddress}'s case mapping
(the Turkish dotted I{İ}, the Greek final sigma, letters whose capital is
another's); the end-to-end ones run the C{mailgate} command and a real
C{twistd mailgate} with Python's poplib and smtplib.
"""

import poplib
import smtplib
import unicodedata

import pytest

from e2e import DEADLINE, AdminCommand, mailgate_server  # noqa: F401 (fixtures)
from mailgate.address import normalizeAddress
from mailgate.auth.saslprep import preparedName
from mailgate.errors import InvalidAddress
from mailgate.importers.passwdfile import PasswdAccount, RefusedLine, readPasswdFile
from mailgate.testing import memoryStore

PASSWORD = "καλημέρα"
LOOPBACK_TCP = "tcp:0:interface=127.0.0.1"


# -- case mapping ---------------------------------------------------------------


@pytest.mark.parametrize(
    "spellings, canonical",
    [
        # A Greek writes a final ς at the end of each word: str.lower()
        # made σ of the Σ before a dot, so the name in capitals was another.
        (["ΝΙΚΟΣ.ΠΑΠΑΣ", "Νικος.Παπας", "νικος.παπας", "νικοσ.παπασ"], "νικος.παπας"),
        (["ΝΊΚΟΣ.ΠΑΠΆΣ", "Νίκος.Παπάς", "νίκοσ.παπάσ"], "νίκος.παπάς"),
        (["ΟΔΥΣΣΕΥΣ", "Οδυσσευς", "οδυσσευσ", "οδυςςευς"], "οδυσσευς"),
        (["ΣΑΣ-ΣΟΣ", "σας-σος"], "σας-σος"),
        # İ lowered by str.lower() is i and a combining dot above, a name
        # that ilker, as a Turk writes İLKER in lower case, did not reach.
        (["İLKER", "İlker", "ilker", "ILKER", "i\u0307lker"], "ilker"),
        (["ŞİŞLİ", "şişli", "ŞIŞLI".lower().replace("ı", "i")], "şişli"),
        # Cherokee lowers to its lower-case letters, whatever case is typed.
        (["ᏣᎳᎩ", "ꮳꮃꭹ", "ᏣꮃᎩ"], "ꮳꮃꭹ"),
    ],
)
def test_everySpellingOfANameIsOneUser(spellings, canonical):
    """
    A name written in capitals, in lower case as it is spelt, decomposed,
    or prepared as SCRAM prepares it, is the one user, stored in one form
    that every spelling reaches (and none that no login reaches).
    """
    results = set()
    for spelling in spellings:
        for written in [spelling, spelling.upper(), spelling.lower(), unicodedata.normalize("NFD", spelling)]:
            for name in [written, preparedName(written)]:
                results.add(normalizeAddress(f"{name}@example.org"))
    assert len(results) == 1, results
    [address] = results
    assert normalizeAddress(address) == address
    assert normalizeAddress(address.upper()) == address
    if canonical is not None:
        assert address == f"{canonical}@example.org"


def test_scramAndPlainTakeEveryCompatibilityIdeographToOneUser():
    """
    A name holding a CJK compatibility ideograph (which a user's address
    holds composed, as its unified ideograph) names the one user whether
    it comes by SCRAM (prepared as SASLprep does, on Unicode 3.2) or by
    PLAIN/USER (composed by the running Python's Unicode).  Five of them
    decomposed otherwise in Unicode 3.2 (Unicode 4.0's corrigendum), and
    their SCRAM logins named another user.
    """
    blocks = [*range(0xF900, 0xFB00), *range(0x2F800, 0x2FA20)]
    differing = {}
    for codePoint in blocks:
        written = f"a{chr(codePoint)}@example.org"
        try:
            plain = normalizeAddress(written)
        except InvalidAddress:
            plain = None
        try:
            scram = normalizeAddress(preparedName(written))
        except InvalidAddress:
            scram = None
        if plain != scram:
            differing[f"U+{codePoint:04X}"] = (plain, scram)
    assert differing == {}


def test_dotlessIAndSharpSAreLettersOfTheirOwn():
    """
    The Turkish ı and the German ß are letters of their own, as RFC 8265's
    user names keep them (yıldız is not yildiz, Maße not Masse): written
    so, in any case that keeps them, they are the one user; their capitals
    I and SS are another name's, and say so.
    """
    for written in ["yıldız", "YıLDıZ", "Yıldız"]:
        assert normalizeAddress(f"{written}@example.org") == "yıldız@example.org"
    assert normalizeAddress("YILDIZ@example.org") == "yildiz@example.org"
    for written in ["straße", "STRAẞE", "Straße"]:
        assert normalizeAddress(f"{written}@example.org") == "straße@example.org"
    assert normalizeAddress("STRASSE@example.org") == "strasse@example.org"


def test_aGreekNameIsStoredAsAGreekWritesIt():
    assert normalizeAddress("ΝΙΚΟΣ.ΠΑΠΑΣ@example.org") == "νικος.παπας@example.org"
    assert normalizeAddress("ΑΣ2@example.org") == "ας2@example.org"
    # A sigma alone, or before a letter, is σ.
    assert normalizeAddress("Σ.ΣΑ@example.org") == "σ.σα@example.org"


@pytest.mark.parametrize(
    "name, message",
    [
        (
            "\u1c80asya@example.org",
            "invalid local part in '\u1c80asya@example.org': U+1C80 CYRILLIC SMALL LETTER ROUNDED VE "
            "has the capital of 'в': write that instead",
        ),
        (
            "\u1fb3x@example.org",
            "invalid local part in '\u1fb3x@example.org': U+1FB3 GREEK SMALL LETTER ALPHA WITH YPOGEGRAMMENI "
            "has the capital of 'αι': write that instead",
        ),
    ],
)
def test_aLetterWhoseCapitalIsAnothersIsRefused(name, message):
    """
    A letter whose capital is another letter's (the Cyrillic rounded ve,
    В; ᾳ, ΑΙ) would make a user whose name in capitals is another's.
    """
    with pytest.raises(InvalidAddress) as e:
        normalizeAddress(name)
    assert str(e.value) == message


# -- end to end -------------------------------------------------------------------


def _pop3Login(server, name, password):
    client = poplib.POP3("127.0.0.1", server.port, timeout=DEADLINE)
    client.encoding = "utf-8"
    try:
        client.user(name)
        return client.pass_(password).decode("utf-8")
    except poplib.error_proto as e:
        return e.args[0].decode("utf-8")
    finally:
        client.quit()


def test_aGreekAndATurkishUserAreReachedAsTheyWriteTheirNames(mailgate_server):
    """
    The administrator adds ΝΙΚΟΣ.ΠΑΠΑΣ and İLKER in capitals; each logs in
    by POP3 and gets mail by SMTP with SMTPUTF8 under the name as written
    in lower case (νικος.παπας, ilker).  Before, they were νικοσ.παπας and
    i̇lker (a combining dot above): -ERR [AUTH] and 550 5.1.1.
    """
    cli = AdminCommand(mailgate_server.database, cwd=mailgate_server.tmp_path)
    assert cli.check("user", "add", "ΝΙΚΟΣ.ΠΑΠΑΣ@example.org", "--password-stdin", input=PASSWORD + "\n") == (
        "added νικος.παπας@example.org\n"
    )
    assert cli.check("user", "add", "İLKER@example.org", "--password-stdin", input=PASSWORD + "\n") == (
        "added ilker@example.org\n"
    )
    # One user, whatever its spelling: the second is refused as existing.
    code, out, err = cli("user", "add", "ilker@example.org", "--password-stdin", input=PASSWORD + "\n")
    assert code != 0 and out == "" and "ilker@example.org" in err and err.count("\n") == 1
    server = mailgate_server("--smtp", LOOPBACK_TCP, "--domain", "example.org")
    for name in ["νικος.παπας@example.org", "Νικος.Παπας@example.org", "ΝΙΚΟΣ.ΠΑΠΑΣ@example.org"]:
        assert _pop3Login(server, name, PASSWORD).startswith("+OK νικος.παπας@example.org has "), name
    for name in ["ilker@example.org", "İlker@example.org"]:
        assert _pop3Login(server, name, PASSWORD).startswith("+OK ilker@example.org has "), name
    smtp = smtplib.SMTP("127.0.0.1", server.portOf("SMTP"), timeout=DEADLINE, local_hostname="client.test")
    try:
        message = "Subject: γεια\r\n\r\nγεια\r\n".encode("utf-8")
        refused = smtp.sendmail("a@remote.test", ["νικος.παπας@example.org", "ilker@example.org"], message,
                                mail_options=["SMTPUTF8"])
        assert refused == {}
    finally:
        smtp.quit()


# -- Dovecot's passwd-file ---------------------------------------------------------


def test_ofAUTF8NameOnTwoLinesTheOneDovecotReachesIsKept():
    """
    Dovecot's %Lu lowers ASCII letters alone and its passwd-file compares
    octets (2.3.19, with auth_username_chars emptied, which UTF-8 names
    need: JÖRG logged in as the line jÖrg@, not jörg@; jörg decomposed did
    not reach jörg precomposed).  Of lines mailgate reads as one user, the
    one whose password that user logged in with is kept: jÖrg@, not the
    first, Jörg@, which no login reached (str.lower took both for
    capitals); the precomposed jörg@, as keyboards type it, not the
    decomposed one before it.
    """
    nfd = unicodedata.normalize("NFD", "jörg@example.org")
    lines = [
        "Jörg@example.org:{PLAIN}unreached:::::",
        "jÖrg@example.org:{PLAIN}reached:::::",
        f"{nfd.replace('jo', 'zo')}:{{PLAIN}}decomposed:::::",
        "zörg@example.org:{PLAIN}composed:::::",
    ]
    accounts = list(readPasswdFile(lines))
    assert [isinstance(a, RefusedLine) for a in accounts] == [True, False, True, False]
    assert accounts[1] == PasswdAccount(2, "jörg@example.org", "{PLAIN}reached", {})
    assert accounts[3] == PasswdAccount(4, "zörg@example.org", "{PLAIN}composed", {})
    assert accounts[0].reason.startswith("jörg@example.org is on line 2 too")


@pytest.mark.parametrize(
    "typed, named",
    [
        ("ＡＢ", "U+FF21 FULLWIDTH LATIN CAPITAL LETTER A has a compatibility form, 'A': write that instead"),
        ("ǅemal", "U+01C5 LATIN CAPITAL LETTER D WITH SMALL LETTER Z WITH CARON has a compatibility form, 'Dž': "
                  "write that instead"),
        ("Ⅻx", "U+216B ROMAN NUMERAL TWELVE has a compatibility form, 'XII': write that instead"),
    ],
)
def test_aRefusalNamesTheCharacterAsTyped(typed, named):
    """
    A capital refused names the character the administrator typed, not
    the small letter it lowers to (U+FF41 for a typed U+FF21, U+01C6 for a
    typed ǅ: nowhere in what was typed).
    """
    with pytest.raises(InvalidAddress) as e:
        normalizeAddress(f"{typed}@example.org")
    assert str(e.value) == f"invalid local part in '{typed}@example.org': {named}"


# -- names stored in an older form ---------------------------------------------------


def _storedAs(url, address, older):
    """
    Make the user C{address} stored as C{older}, as a mailgate whose
    normal form was another stored it (c05fd1c's: str.lower alone).
    """
    store = memoryStore(url)
    try:
        def update(cursor):
            cursor.execute("UPDATE users SET address = ? WHERE address = ?", (older, address))

        store.database.run(update)
    finally:
        store.close()


def test_aNameStoredInAnOlderFormIsListedByDbCheckAndCanBeRenamedOrDeleted(databaseURL, tmp_path):
    """
    A user stored by c05fd1c's mailgate as νικοσ.παπας@ (or i̇lker@, an i
    and a combining dot), which no login, mail or command reaches since
    names are lowered as they are spelt, not even user del: db check
    names them with the form they should have (it said the database was
    sound), and user rename and user del take the name as stored.
    """
    cli = AdminCommand(databaseURL, cwd=tmp_path)
    for address in ["νικος.παπας@example.org", "ilker@example.org", "jörg@example.org"]:
        cli.addUser(address, "pw")
    _storedAs(databaseURL, "νικος.παπας@example.org", "νικοσ.παπας@example.org")
    _storedAs(databaseURL, "ilker@example.org", "i\u0307lker@example.org")
    code, out, err = cli("db", "check")
    assert code == 65, (out, err)
    lines = out.splitlines()
    at = lines.index(
        "users' UTF-8 addresses: stored in a form names are no longer read in (by an older mailgate): no login, "
        "mail or command naming them reaches them; give each the form shown, mailgate user rename 'OLD' NEW "
        "(or mailgate user del 'OLD')"
    )
    assert lines[at + 1 : at + 3] == [
        "  i\u0307lker@example.org: now ilker@example.org",
        "  νικοσ.παπας@example.org: now νικος.παπας@example.org",
    ]
    assert cli.check("user", "rename", "νικοσ.παπας@example.org", "νικος.παπας@example.org") == (
        "renamed νικοσ.παπας@example.org to νικος.παπας@example.org; the maildrop, its unique ids and quota follow\n"
    )
    assert cli.check("user", "del", "i\u0307lker@example.org") == (
        "deleted i\u0307lker@example.org and their maildrop\n"
    )
    assert sorted(cli.users()) == ["jörg@example.org", "νικος.παπας@example.org"]
    checked = cli.check("db", "check").splitlines()
    assert "users' UTF-8 addresses: ok" in checked, checked
    # A name in its normal form is what it was: no such user is no such user.
    code, out, err = cli("user", "del", "i\u0307lker@example.org")
    assert (code, err) == (67, "mailgate: no such user: ilker@example.org\n")
