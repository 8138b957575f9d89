"""
Moving users between installations, C{mailgate mailbox export} then
C{mailgate import maildir}, or C{mailgate db copy}, with the installed
command on real SQLite files and the shared PostgreSQL: what a POP3
client sees (STAT, LIST, UIDL, RETR and TOP, octet for octet) is the same
on both sides for messages that are hard to carry (NUL, bare CR and LF,
long lines, 8-bit headers, no header/body separator, no final line break,
dot lines, an empty message, a large one); what a Maildir cannot carry
(deleted messages kept for recovery, the user's own quota) the export
says it leaves behind instead of dropping it unseen.
"""

import subprocess

from e2e import MAILGATE, childEnvironment
from mailgate.message import spoolBytes
from mailgate.testing import POP3Session, addUser, memoryStore, resultOf

ALICE = "alice@example.org"
BOB = "bob@xn--bcher-kva.example"
PASSWORD = "round trip"
ARRIVED = 1_700_000_000

HARD = [
    b"Subject: nul\r\n\r\na\x00b\r\n",
    b"Subject: bare cr\r\n\r\na\rb\r\n",
    b"Subject: bare lf\r\n\r\na\nb\r\n",
    b"Subject: long\r\n\r\n" + b"x" * 5000 + b"\r\n",
    b"Subject: \xe9t\xe9\r\nX-Not-UTF8: \xff\xfe\r\n\r\nbody\r\n",
    b"Subject: no separator\r\nX-A: b\r\n",
    b"Subject: no final line break\r\n\r\nno end",
    b"Subject: a dot\r\n\r\n.\r\nafter\r\n",
    b"Subject: dots\r\n\r\n.a\r\n..b\r\n...\r\n",
    b"",
    b"Subject: large\r\n\r\n" + (b"y" * 76 + b"\r\n") * 30000,
]


def mailgate(*argv, input=b""):
    done = subprocess.run(
        [MAILGATE, *argv], input=input, capture_output=True, timeout=60, env=childEnvironment()
    )
    return done.returncode, done.stdout.decode(), done.stderr.decode()


def populate(url):
    store = memoryStore(url)
    try:
        addUser(store, ALICE, PASSWORD, apop=True)
        addUser(store, BOB, PASSWORD)
        resultOf(store.setQuota(ALICE, octets=50_000_000, messages=100))
        items = [(f"id-{n}", spoolBytes(m), ARRIVED + n) for n, m in enumerate(HARD)]
        imported, failures, _ = resultOf(store.importMessages(ALICE, items))
        assert (len(imported), failures) == (len(HARD), [])
        resultOf(store.importMessages(BOB, [("b-1", spoolBytes(b"Subject: 1\r\n\r\none\r\n"), ARRIVED),
                                            ("b-2", spoolBytes(b"Subject: 2\r\n\r\ntwo\r\n"), ARRIVED)]))
        # Bob deletes his first message; it is kept for recovery.
        store.limits.keepDeletedDays = 7
        session = POP3Session(store)
        assert session.login(BOB, PASSWORD).startswith("+OK")
        assert session.command("DELE 1").startswith("+OK")
        assert session.command("QUIT").startswith("+OK")
    finally:
        store.close()


def served(url, address):
    """
    Everything a POP3 client sees of C{address}'s mailbox at C{url}.
    """
    store = memoryStore(url)
    try:
        session = POP3Session(store)
        assert session.login(address, PASSWORD).startswith("+OK")
        seen = [session.send(b"STAT\r\n"), session.send(b"LIST\r\n"), session.send(b"UIDL\r\n")]
        count = int(seen[0].split()[1])
        for n in range(1, count + 1):
            seen += [session.send(b"RETR %d\r\n" % n), session.send(b"TOP %d 1\r\n" % n)]
        session.send(b"QUIT\r\n")
        return seen
    finally:
        store.close()


def test_hardMessagesAreServedAlikeAfterACopyAndAfterAnExport(tmp_path, postgresURL):
    source = f"sqlite:///{tmp_path / 'source.sqlite3'}"
    populate(source)
    before = {who: served(source, who) for who in (ALICE, BOB)}

    code, out, err = mailgate("db", "copy", "--from", source, "--to", postgresURL)
    assert (code, err) == (0, ""), out
    for who in (ALICE, BOB):
        assert served(postgresURL, who) == before[who]
    for what in (("mailbox", "deleted", BOB), ("user", "list", "--json")):
        assert mailgate("--database", postgresURL, *what) == mailgate("--database", source, *what)

    target = f"sqlite:///{tmp_path / 'target.sqlite3'}"
    for who in (ALICE, BOB):
        assert mailgate("--database", target, "user", "add", who, "--password-stdin",
                        input=PASSWORD.encode() + b"\n")[0] == 0
        directory = str(tmp_path / who)
        assert mailgate("--database", source, "mailbox", "export", who, directory)[0] == 0
        code, out, err = mailgate("--database", target, "import", "maildir", directory, who)
        assert code == 0, err
        assert served(target, who) == before[who]


def test_theExportSaysWhatTheMaildirLeavesBehind(tmp_path):
    """
    Bob's deleted message kept for recovery and Alice's quota do not fit
    in a Maildir: the export names them on standard error (it wrote
    nothing of them before, exit 0 and not a word).
    """
    source = f"sqlite:///{tmp_path / 'source.sqlite3'}"
    populate(source)
    code, out, err = mailgate("--database", source, "mailbox", "export", BOB, str(tmp_path / "bob"))
    assert code == 0
    assert out == f"exported 1 message (19 octets) of {BOB} to {tmp_path / 'bob'}\n"
    assert err == (
        f"mailgate: {BOB}: not in the export: 1 deleted message kept for recovery "
        f"(mailbox restore {BOB} before exporting takes them along)\n"
    )
    code, out, err = mailgate("--database", source, "mailbox", "export", ALICE, str(tmp_path / "alice"))
    assert code == 0
    assert err == f"mailgate: {ALICE}: not in the export: its own quota (user quota {ALICE} ... on the new server)\n"
