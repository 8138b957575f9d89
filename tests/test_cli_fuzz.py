"""
The admin command given what an administrator (or a script with an unset
variable, or a pasted line) might type, generated: every command that
changes or lists users, aliases, master users, bans and maildrops, with
arguments of every kind (addresses well formed or not, in Unicode, with
escape sequences; numbers in every spelling, huge, negative, not numbers;
networks and addresses with zones or host bits; empty strings), run one
after the other on one SQLite database.

Each run ends with an exit status of sysexits(3) (or argparse's usage
error, 64), never 70 ("internal error", a defect of mailgate's), never a
traceback; its error is one line naming the command; and nothing it
prints holds a terminal's escape sequence or another control character
but the line ends and the tabs of its tables.
"""

import functools
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailgate.auth.passwords import makeCredentials
from mailgate.cli import masterusers, users
from mailgate.testing import TEST_HASH_COST

from e2e import runHere
from fuzzing import fuzzSettings

FUZZ = fuzzSettings(100)
ALICE = "alice@example.org"
#: what the command may end with (sysexits(3)); 70 is not among them
STATUSES = {0, 1, 64, 65, 66, 67, 68, 69, 73, 74, 75, 76, 77, 78}
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\x85\u2028\u2029]")

addresses = st.sampled_from(
    [ALICE, "bob@example.org", "new@example.net", "", " ", "alice", "ALICE@EXAMPLE.ORG", "a@b@example.org",
     "é@bücher.example", "x" * 300 + "@example.org", "\x1b[2J@example.org", "a b@example.org",
     "alice@example.org\n", "@example.org", "alice@", "alice@[192.0.2.1]", "info@example.org", "-", "%"]
)
numbers = st.sampled_from(
    ["0", "1", "7", "-1", "never", "default", "none", "10M", "1.5G", "1024T", "2048T", "99999999999999999999999",
     "nan", "inf", "1e3", "", "x", "\u0663", "0x10", " 5", "5 ", "1_000"]
)
networks = st.sampled_from(
    ["127.0.0.1/32", "::1", "any", "local", "none", "", ",", "10.0.0.0/33", "192.0.2.7/8", "fe80::1%eth0",
     "192.0.2.0/24,2001:db8::/32", "example.org", "\x1b"]
)
hosts = st.sampled_from(
    ["192.0.2.7", "2001:db8::1", "fe80::1%eth0", "", "300.1.1.1", "::ffff:192.0.2.7", "example.org", "local",
     "192.0.2.0/24", "\x1b[2J"]
)
texts = st.sampled_from(["", "moved to the new server", "\x1b[31mred", "2026-12-07", "yesterday", "1 day", "é" * 300])
passwords = st.sampled_from(["secret", "", "\x00", "é" * 10, "a" * 5000, "{PLAIN}secret", "$6$salt$hash"])
names = st.sampled_from(["admin", "", "ad min", "admin@example.org", "\x1b", "é"])

commands = st.one_of(
    st.tuples(st.just(["user", "add", "--password-stdin"]), addresses, passwords).map(lambda t: (t[0] + [t[1]], t[2])),
    st.tuples(st.just(["user", "passwd", "--password-stdin"]), addresses, passwords).map(
        lambda t: (t[0] + [t[1]], t[2])
    ),
    st.tuples(addresses, numbers).map(lambda t: (["user", "quota", *t], "")),
    st.tuples(numbers, addresses, numbers).map(lambda t: (["user", "quota", "--messages", *t], "")),
    st.tuples(addresses, numbers).map(lambda t: (["user", "expire", *t], "")),
    st.tuples(addresses, networks).map(lambda t: (["user", "networks", *t], "")),
    st.tuples(addresses, addresses).map(lambda t: (["user", "rename", *t], "")),
    st.tuples(addresses, st.sampled_from(["on", "off", "maybe"]), passwords).map(
        lambda t: (["user", "apop", "--password-stdin", t[0], t[1]], t[2])
    ),
    st.tuples(texts, addresses).map(lambda t: (["user", "disable", "--reason", *t], "")),
    st.tuples(addresses).map(lambda t: (["user", "enable", *t], "")),
    st.tuples(hosts, addresses, passwords).map(
        lambda t: (["user", "test", "--from", t[0], "--password-stdin", t[1]], t[2])
    ),
    st.tuples(addresses).map(lambda t: (["user", "del", *t], "")),
    st.sampled_from([(["user", "list"], ""), (["user", "list", "--json"], ""), (["alias", "list"], ""),
                     (["ban", "list"], ""), (["master", "list"], ""), (["who"], ""), (["db", "version"], "")]),
    st.tuples(addresses, addresses).map(lambda t: (["alias", "add", *t], "")),
    st.tuples(addresses).map(lambda t: (["alias", "del", *t], "")),
    st.tuples(numbers, hosts).map(lambda t: (["ban", "add", "--for", *t], "")),
    st.tuples(hosts).map(lambda t: (["ban", "del", *t], "")),
    st.tuples(networks, names, passwords).map(
        lambda t: (["master", "add", "--password-stdin", "--networks", t[0], t[1]], t[2])
    ),
    st.tuples(names).map(lambda t: (["master", "del", *t], "")),
    st.tuples(addresses).map(lambda t: (["mailbox", "list", *t], "")),
    st.tuples(addresses).map(lambda t: (["mailbox", "deleted", "--json", *t], "")),
    st.tuples(texts, addresses).map(lambda t: (["mailbox", "restore", "--since", *t], "")),
    st.tuples(addresses, texts).map(lambda t: (["mailbox", "restore", *t], "")),
    st.tuples(numbers, addresses).map(lambda t: (["mailbox", "expunge", "--older-than", *t], "")),
    st.tuples(numbers, addresses).map(lambda t: (["kick", "--wait", *t], "")),
)


@pytest.fixture
def database(tmp_path, monkeypatch):
    """
    One SQLite file for the whole run, with alice and a message of hers;
    passwords hashed at the suite's cheap cost.
    """
    cheap = functools.partial(makeCredentials, logN=TEST_HASH_COST)
    monkeypatch.setattr(users, "makeCredentials", cheap)
    monkeypatch.setattr(masterusers, "makeCredentials", cheap, raising=False)
    url = f"sqlite:///{tmp_path / 'fuzz.sqlite3'}"
    assert runHere(["--database", url, "user", "add", "--password-stdin", ALICE], "secret\n")[0] == 0
    assert runHere(["--database", url, "deliver", ALICE], b"Subject: hi\r\n\r\nhello\r\n")[0] == 0
    return url


@FUZZ
@given(st.lists(commands, min_size=1, max_size=4))
def test_everyCommandEndsWithAStatusAndOneLineOfWhy(database, run):
    for argv, password in run:
        code, out, err = runHere(["--database", database, *argv], password + "\n" if password else "")
        shown = f"mailgate {argv!r} exited {code}\nstdout: {out[:2000]}\nstderr: {err[:2000]}"
        assert code in STATUSES, shown
        assert "Traceback" not in err and "internal error" not in err, shown
        assert not _CONTROL.search(out) and not _CONTROL.search(err), shown
        if code not in (0, 64):
            # One line of why (a usage error adds the command's usage).
            lines = err.rstrip("\n").splitlines()
            assert lines and lines[-1].startswith("mailgate"), shown


#: what deliver may end with, as its --help says (an MTA's pipe acts on it)
DELIVER_STATUSES = {0, 64, 65, 67, 75, 77}

messages = st.one_of(
    st.binary(max_size=400),
    st.lists(st.sampled_from([b"Subject: x", b"", b".", b"..", b"From x", b"\x00", b"\xff", b"a\rb", b"x" * 1500]),
             max_size=6).map(lambda lines: b"\n".join(lines)),
    st.just(b""),
)
senders = st.one_of(st.none(), st.sampled_from(["", "MAILER-DAEMON", "bounce@example.net", "a@b@c", "\x1b@x.org",
                                                "é@bücher.example", "<x@y.org>", " "]))


@FUZZ
# alice alone half the time, so that a good share of the runs deliver.
@given(messages, st.one_of(st.just([ALICE]), st.lists(addresses, min_size=1, max_size=3)), senders)
def test_deliverEndsWithAStatusItsMTAActsOn(database, message, recipients, sender):
    """
    C{mailgate deliver}, an MTA's pipe transport, given any octets, any
    recipients and any sender: an exit status of those its help names
    (never 70, never a traceback), and a message delivered (0) is in each
    recipient's maildrop, one more than before; refused, in none.
    """
    before = _counts(database, recipients)
    argv = ["deliver"] + ([] if sender is None else ["-f", sender]) + ["--", *recipients]
    code, out, err = runHere(["--database", database, *argv], message)
    shown = f"mailgate {argv!r} exited {code}\nstdout: {out[:2000]}\nstderr: {err[:2000]}"
    assert code in DELIVER_STATUSES, shown
    assert "Traceback" not in err and "internal error" not in err, shown
    assert not _CONTROL.search(out) and not _CONTROL.search(err), shown
    after = _counts(database, recipients)
    for recipient in set(before) & set(after):
        assert after[recipient] == before[recipient] + (1 if code == 0 else 0), (shown, before, after)


def _counts(database, recipients):
    """
    How many messages each recipient that is a user has (by mailbox list).
    """
    counts = {}
    for recipient in set(recipients):
        code, out, _ = runHere(["--database", database, "mailbox", "list", "--json", recipient])
        if code == 0:
            counts[recipient] = out.count('"unique_id"')
    return counts
