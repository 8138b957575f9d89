"""
User names as an administrator types them into C{mailgate}: in any case,
too long, with an '@' too many; through L{mailgate.cli.run} on a real
SQLite file.
"""


import pytest

from e2e import mailgateHere as mailgate
from mailgate.cli import EX_DATAERR, EX_USAGE

# The command's new passwords are hashed cheaply here (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("cheapCommandHashes")


@pytest.fixture
def url(tmp_path):
    return f"sqlite:///{tmp_path / 'mail.sqlite3'}"


@pytest.mark.parametrize(
    "address, reason",
    [
        ("a" * 65 + "@example.org", "local part too long in 'aaaa"),
        ("a" * 65 + "@example.org", "(65 characters, at most 64)"),
        ("a" * 64 + "@" + "b" * 63 + "." + "c" * 63 + "." + "d" * 62, "address too long: 'aaaa"),
        ("a" * 64 + "@" + "b" * 63 + "." + "c" * 63 + "." + "d" * 62, "(255 characters, at most 254)"),
        ("a" * 10000 + "@example.org", "(10012 characters, at most 254)"),
        ("a@b@example.org", "not an address of the form local@domain: 'a@b@example.org'"),
    ],
)
def test_anAddressThatIsTooLongSaysSo(url, address, reason):
    """
    An address past RFC 5321's lengths is refused as too long, with its
    length and the limit, and without repeating all of a huge one.
    """
    code, out, err = mailgate(url, "user", "add", address, "--password-stdin", stdin="pw\n")
    assert (code, out) == (EX_DATAERR, "")
    assert reason in err and err.count("\n") == 1 and len(err) < 200, err


def test_anAddressAtTheLimitsIsAUser(url):
    local = "a" * 64
    address = local + "@" + "b" * 63 + "." + "c" * 63 + "." + "d" * 61
    assert len(address) == 254
    code, out, err = mailgate(url, "user", "add", address, "--password-stdin", stdin="pw\n")
    assert (code, err) == (0, "")
    assert mailgate(url, "mailbox", "list", address.upper())[0] == 0


def test_anAddressInAnyCaseIsTheSameUser(url):
    """
    As Dovecot's C{auth_username_format = %Lu}: every command takes the
    address in any case, and a rename to the same address in another case
    renames nothing.
    """
    assert mailgate(url, "user", "add", "Alice@Example.ORG", "--password-stdin", stdin="pw\n")[:2] == (
        0, "added alice@example.org\n"
    )
    code, out, err = mailgate(url, "user", "add", "ALICE@example.org", "--password-stdin", stdin="pw\n")
    assert (code, err) == (73, "mailgate: user alice@example.org already exists\n")
    assert mailgate(url, "user", "quota", "aLiCe@EXAMPLE.org", "1M")[0] == 0
    code, out, err = mailgate(url, "user", "rename", "alice@example.org", "ALICE@EXAMPLE.ORG")
    assert code == EX_USAGE and "same address" in err
    code, out, err = mailgate(url, "user", "del", "ALICE@EXAMPLE.ORG")
    assert (code, out) == (0, "deleted alice@example.org and their maildrop\n")
