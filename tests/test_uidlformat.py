"""
Dovecot's pop3_uidl_format in Dovecot 2.4's spelling
(L{mailgate.importers.uidlformat}): the ids a maildir imported with a 2.4
format gets are the ones that Dovecot serves.

Where this Debian's Dovecot (2.3) cannot serve a 2.4 format, the expected
values are Dovecot 2.4's own, from its var-expand test suite (the inputs
given here by literal(), since a UIDL format has only the five POP3
variables), and a 2.4 spelling must give what its 2.3 spelling gives (the
real Dovecot of tests/test_dovecot_migration.py serves the 2.3 ones).
"""

import random

import pytest

from mailgate.importers.maildir import importMaildir
from mailgate.importers.uidlformat import MAX_ROUNDS, checkUidlFormat, formatUidl, isDovecot24, usesVariable
from mailgate.testing import addUser, memoryStore
from test_importers import ALICE, MESSAGES, UIDLIST, cli, writeMaildir

VALUES = {"u": "26", "v": "1700000000", "f": "1700000000.M1P2.host,S=20", "g": "abc", "m": None}

#: Dovecot 2.4's own expectations (src/lib/test-var-expand.c), with
#: %{first} = 'hello', %{uidvalidity} = 1727121943.
DOVECOTS_OWN = [
    ("%{literal('hello') | upper}", "HELLO"),
    ("%{literal('hello') | upper | lower}", "hello"),
    ("%{literal('hello') | substr(1, 2)}", "el"),
    ("%{literal('hello') | substr(-2, 2)}", "lo"),
    ("%{literal('hello') | substr(2, -2)}", "l"),
    ("%{literal('hello') | substr(0, -1)}", "hell"),
    ("%{literal('hello') | substr(-1)}", "o"),
    ("%{literal('hello') | substr(5, 0)}", ""),
    ("%{literal('hello') | reverse}", "olleh"),
    ("%{literal('hello') | concat(' ', 'world')}", "hello world"),
    ("%{literal('hello') | sha1}", "aaf4c61ddcc5e8a2dabede0f3b482cd9aea9434d"),
    ("%{literal('hello') | sha1(rounds=1000)}", "c0ddea212ee1af8d6401947d29c8bfab31f8ad93"),
    ("%{literal('hello') | sha1(salt='world')}", "5715790a892990382d98858c4aa38d0617151575"),
    ("%{literal('hello') | sha1(rounds=1000,salt='world')}", "a314ec3ef5103223a4c5bd285dbe4ea5534d4334"),
    ("%{literal('1724925643') | hex}", "66d046cb"),
    ("%{literal('68656c6c6f') | unhexlify | text}", "hello"),
    ("%{literal('68656c6c6f') | unhexlify}", "68656c6c6f"),
    ("%{literal('3') | hexlify(4)}", "0033"),
    ("%{literal('3') | hex | unhex}", "3"),
    ("%{literal('3') | hex(2)}", "03"),
    ("%{literal('1727121943') | hex(2)}", "17"),
    ("%{literal('1727121943') | hex(-2)}", "66"),
    ("%{literal('1727121943') | hex }", "66f1ca17"),
    ("%{literal('hello') | base64}", "aGVsbG8="),
    ("%{literal('hello') | base64(pad=0)}", "aGVsbG8"),
    ("%{literal('hello') | truncate(3)}", "hel"),
    ("%{literal('hello') | truncate(bits=7)}", "4"),
    ("%{literal('1') | rfill(3)}", "100"),
    ("%{literal('1') | lfill(3)}", "001"),
    ("%{literal('1') | lfill(3, ' ')}", "  1"),
    ("%{literal('hello') | md5 | hexlify(8)}", "5d41402a"),
    ("%{literal('hello') | md5 | substr(4,4) }", "bc4b2a76"),
    ("%{literal('hello') | md5 | substr(0,8) % 256 | hex}", "76"),
    ("%{literal('hello') | md5 | substr(0,8) % 30 | hex }", "c"),
    ("%{literal('hello') | md5 % 256 | hex}", "92"),
    ("%{literal('hello') | sha512 % 256 | hex }", "43"),
    ("%{literal('hello') | md5 % 30 | hex(4) }", "0016"),
    ("%{literal('hello') | md5 % 30 | hex(-4) }", "1600"),
    ("%{literal('1') + 1}", "2"),
    ("%{literal('143') % 5}", "3"),
    ("%{literal('31') | unhex * 5}", "245"),
    ("%{literal('31') | unhexlify | text * 5}", "5"),
    ("%{literal('') | default('nonempty')}", "nonempty"),
    ("%{literal('hello') | default('world')}", "hello"),
    ("cn=%{literal('x')},%%{text}%%", "cn=x,%{text}%%"),
]


@pytest.mark.parametrize("template, expected", DOVECOTS_OWN)
def test_filtersGiveWhatDovecotsOwnTestsExpect(template, expected):
    assert formatUidl(template, VALUES) == expected


#: Each format of the README's list, spelled for Dovecot 2.3 and for 2.4.
SPELLINGS = [
    ("%08Xu%08Xv", "%{uid | hex(8)}%{uidvalidity | hex(8)}"),  # the defaults
    ("%08Xv%08Xu", "%{uidvalidity | hex(8)}%{uid | hex(8)}"),  # UW
    ("%v-%u", "%{uidvalidity}-%{uid}"),  # Courier
    ("%v.%u", "%{uidvalidity}.%{uid}"),  # Cyrus
    ("%f", "%{filename}"),
    ("%g", "%{guid}"),
    ("%Mf", "%{filename | md5}"),  # tpop3d
    ("%Uf", "%{filename | upper}"),
    ("%.4f-%2.3f", "%{filename | substr(0, 4)}-%{filename | substr(2, 3)}"),
]


@pytest.mark.parametrize("old, new", SPELLINGS)
def test_aFormatSpelledForDovecot24GivesWhatItsDovecot23SpellingGives(old, new):
    # (A bare long name, as %{uid}, reads the same in both spellings.)
    assert not isDovecot24(old)
    chooser = random.Random(2033)
    for _ in range(200):
        values = {
            "u": str(chooser.randrange(1, 2**32)),
            "v": str(chooser.randrange(1, 2**32)),
            "f": f"{chooser.randrange(10**9, 2 * 10**9)}.M{chooser.randrange(10**6)}P{chooser.randrange(10**5)}.mx",
            "g": "%032x" % chooser.getrandbits(128),
            "m": None,
        }
        assert formatUidl(new, values) == formatUidl(old, values)
    for letter in "uvfgm":
        assert usesVariable(new, letter) == usesVariable(old, letter), letter


def test_theSpellingIsToldByItsExpressions():
    """
    A bare long name reads the same in both; anything more in braces is
    Dovecot 2.4's, where a % that starts no %{ is text.
    """
    assert not isDovecot24("%{uid}%{uidvalidity}")
    assert not isDovecot24("%%{uid | hex}")
    assert formatUidl("%{uid}.%{uidvalidity}", VALUES) == "26.1700000000"
    assert isDovecot24("%{ uid }")
    assert formatUidl("%{ uid }%u", VALUES) == "26%u"
    assert formatUidl("%{uid}%u", VALUES) == "2626"


def test_theHeaderMD5IsAVariableFirstAndAFilterAfter():
    """
    As in Dovecot, a pipeline's first name is a variable when there is
    one: %{md5} is the header's MD5, | md5 hashes what comes before.
    """
    assert usesVariable("%{md5}", "m") and not usesVariable("%{filename | md5}", "m")
    assert formatUidl("%{md5}", dict(VALUES, m="0123abcd")) == "0123abcd"
    assert formatUidl("%{uid | md5}", VALUES) == "4e732ced3463d06de0ca9a15b6153677"


@pytest.mark.parametrize(
    "template, why",
    [
        ("%{uid | hex(8)", "unterminated %{"),
        ("%{uid | frob}", "no such filter 'frob'"),
        ("%{uidd | hex}", "unknown variable %{uidd}"),
        ("%{user | username}", "unknown variable %{user}"),
        ("%{uid | regexp('1', '2')}", "'regexp' filter has no meaning"),
        ("%{literal('x)}", "unterminated string"),
        ("%{env:HOME}", "a Dovecot provider"),
        ("%{uid | md5(fail=1)}", "unsupported key 'fail'"),
        ("%{uid | hex(8) hex}", "'|' or '}' expected"),
        ("%{uid | hex(100000)}", "over 1000"),
        ("%{uid | lfill(5000)}", "over 1000"),
        (f"%{{uid | sha256(rounds={MAX_ROUNDS + 1})}}", "rounds must be"),
        ("%{uid | hex(8) + 'x'}", "a number or a variable expected"),
        # No variable: one id for every message (an empty format, an unset
        # shell variable, was taken and then failed every message).
        ("", "names no variable"),
        ("uidl-", "names no variable"),
        ("%%u", "names no variable"),
        ("%{literal('x')}", "names no variable"),
    ],
)
def test_aMalformedOrUnusableFormatIsRefusedWithTheReason(template, why):
    with pytest.raises(ValueError) as raised:
        checkUidlFormat(template)
    assert why in str(raised.value)


def test_aFilterThatFailsLeavesItsErrorForADefault():
    """
    As Dovecot: a filter that refuses its input leaves no value; a
    default() after it gives one, and a second failure ends the
    expression with the first error.
    """
    assert formatUidl("%{filename | hex | default(uid)}", VALUES) == "26"
    with pytest.raises(ValueError) as raised:
        formatUidl("%{filename | hex | upper}", VALUES)
    assert str(raised.value) == "hex: input is not a number"


def test_aMessageTheFormatCannotNameFailsAloneInTheImport(tmp_path):
    """
    A 2.4 format whose filter refuses one message's values (here a file
    name that is not a number, where the others' are): that message is a
    failure of the import, with the reason; the others come in under the
    ids the format gives them.
    """
    directory = writeMaildir(tmp_path / "Maildir", MESSAGES, UIDLIST)
    odd = tmp_path / "Maildir" / "cur" / "notanumber.host:2,S"
    odd.write_bytes(b"Subject: odd\n\nbody\n")
    store = memoryStore()
    try:
        addUser(store, ALICE, "pw")
        report = importMaildir(store, directory, ALICE, "%{filename | substr(0, 10) | hex(8)}")
        assert report.messages == len(MESSAGES)
        [failure] = report.failures
        assert failure.startswith(str(odd)) and "hex: input is not a number" in failure
    finally:
        store.close()


def test_theCommandRefusesABadDovecot24FormatUpFront(databaseURL, tmp_path):
    directory = writeMaildir(tmp_path / "Maildir", MESSAGES, UIDLIST)
    store = memoryStore(databaseURL)
    try:
        addUser(store, ALICE, "pw")
    finally:
        store.close()
    code, out, err = cli(databaseURL, "import", "maildir", directory, ALICE, "--uidl-format", "%{uid | frob}")
    assert (code, out) == (64, "")
    assert err == "mailgate: bad --uidl-format '%{uid | frob}': no such filter 'frob'\n"
    code, out, err = cli(databaseURL, "import", "maildir", directory, ALICE, "--uidl-format", "")
    assert (code, out) == (64, "")
    assert err == (
        "mailgate: bad --uidl-format '': it names no variable, so every message would get the same unique id "
        "(Dovecot's default is %08Xu%08Xv)\n"
    )
    code, out, err = cli(
        databaseURL, "import", "maildir", directory, ALICE, "--uidl-format", "%{uid | hex(8)}%{uidvalidity | hex(8)}"
    )
    # Said alone: the uid given to the file dovecot-uidlist does not list.
    assert (code, err.count("\n")) == (0, 1), err
    assert err.startswith("mailgate: 1 file that Dovecot has not numbered yet")
    assert out.startswith("4 messages imported")
