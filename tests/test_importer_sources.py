"""
Importing from the old servers an administrator really has: what their
leave-on-server clients stored must be what mailgate serves after the
move, and what cannot be moved is said clearly, with the exit status the
README documents.

  - unique ids longer than RFC 1939's 70 octets (Dovecot's C{%f} with a
    long host name serves them): kept, not refused;
  - unique ids with every legal character: kept octet for octet;
  - a UIDL line whose id has spaces: imported under its first word, what
    clients (fetchmail, Thunderbird) read and keep;
  - a server without UIDL: refused before anything is imported (69), not
    "run it again" (75), which would never help;
  - a maildrop another client holds (C{[IN-USE]}, C{[LOGIN-DELAY]}): a
    temporary failure (75), said so.

The POP3 servers are scripted ones on 127.0.0.1 (tests/test_importer_faults.py)
that answer C{-ERR} to CAPA, as RFC 1939-only servers do.
"""

import hashlib
import socket

import pytest

from mailgate.importers import ImportFailed, validUidl
from mailgate.importers.maildir import importMaildir
from mailgate.importers.pop3 import importPOP3
from test_importer_faults import ScriptedPOP3, message, source, threeMessages  # noqa: F401 (fixture)
from test_importers import ALICE, PASSWORD, cli, pop3, store, target, writeMaildir  # noqa: F401 (fixture)

LEGAL = "".join(chr(c) for c in range(0x21, 0x7F))
LONG_NAME = "1700000000.M7P12345Q1R2345abcdef.mx-01.mailstore.eu-west-3.hosting-provider.example.com,S=23"


def test_idsLongerThan70OctetsAreKept(store, tmp_path):
    """
    A maildir file name past 70 octets is the id Dovecot serves with
    C{pop3_uidl_format = %f} (the suite's real Dovecot does, see
    test_dovecot_migration.py); mailgate serves it the same after the move.
    """
    assert len(LONG_NAME) > 70
    directory = writeMaildir(tmp_path / "Maildir", [("cur", LONG_NAME + ":2,S", b"Subject: long\n\nbody\n")])
    report = importMaildir(store, directory, ALICE, uidlFormat="%f")
    assert (report.messages, report.failures) == (1, [])
    assert pop3(store)[0] == [LONG_NAME]


def test_pop3IdsOfEveryLegalCharacterAndLengthAreKept(store, source):
    server = source(threeMessages((LEGAL, "L" * 200, "short")))
    report = importPOP3(store, server.url, ALICE, PASSWORD)
    assert (report.messages, report.failures) == (3, [])
    assert pop3(store)[0] == [LEGAL, "L" * 200, "short"]


def test_overlongAndIllegalIdsAreStillFailures(store, source):
    assert validUidl("x" * 1000) and not validUidl("x" * 1001)
    # A line break at the end is no more a unique id than one inside.
    assert not validUidl("abc\n") and not validUidl("a\nb")
    server = source(threeMessages(("x" * 1001, "ok", "caf\u00e9")))
    report = importPOP3(store, server.url, ALICE, PASSWORD)
    assert report.messages == 1
    assert [failure.split(":")[0] for failure in report.failures] == ["message 1", "message 3"]
    assert pop3(store)[0] == ["ok"]


def test_anIdWithSpacesIsImportedUnderItsFirstWord(store, source):
    server = source(threeMessages())
    server.uidlLines = [b"1 U1 extra words", b"2\tU2", b"3  U3\t"]
    warnings = []
    report = importPOP3(store, server.url, ALICE, PASSWORD, warn=warnings.append)
    assert (report.messages, report.failures) == (3, [])
    assert warnings == [
        "message 1: unique id 'U1 extra words' has a space; imported as 'U1', its first word, which clients keep"
    ]
    assert pop3(store)[0] == ["U1", "U2", "U3"]


def test_anIdCutOnlyAtTheSpacesClientsCutAt(store, source):
    """
    A control character or a Unicode space inside an id does not end its
    first word, as it does not for fetchmail: such an id is one POP3 cannot
    carry, reported, not imported under a part of it no client knows it by.
    """
    server = source(threeMessages())
    server.uidlLines = [b"1 U1\x1cmore", "2 U2\u00a0x".encode(), b"3 U3\x0b"]
    warnings = []
    report = importPOP3(store, server.url, ALICE, PASSWORD, warn=warnings.append)
    assert report.messages == 1
    assert report.failures == [
        "message 1: unique id 'U1\\x1cmore' is not one POP3 can carry",
        "message 2: unique id 'U2\\xa0x' is not one POP3 can carry",
    ]
    assert (warnings, pop3(store)[0]) == ([], ["U3"])


class OldServer(ScriptedPOP3):
    """
    A scripted server that refuses UIDL, or refuses the login with a
    response code, or takes APOP only.
    """

    refuseUIDL = False
    uidlRefusal = b"-ERR unknown command"
    loginRefusal = None
    apopOnly = False
    stamp = "<1896.697170952@dbc.mtview.ca.us>"

    def _answer(self, verb, argument, marked):
        if verb == "UIDL" and self.refuseUIDL:
            return self.uidlRefusal + b"\r\n"
        if self.apopOnly and verb in ("USER", "PASS"):
            return b"-ERR [AUTH] this user logs in with APOP only\r\n"
        if verb == "APOP":
            digest = hashlib.md5((self.stamp + PASSWORD).encode()).hexdigest()
            self.apopAnswered = argument == f"alice {digest}"
            return b"+OK maildrop locked\r\n" if self.apopAnswered else b"-ERR [AUTH] no\r\n"
        if verb == "PASS" and self.loginRefusal is not None:
            return self.loginRefusal + b"\r\n"
        return super()._answer(verb, argument, marked)


@pytest.fixture
def oldServer():
    servers = []

    def start(**quirks):
        server = OldServer(threeMessages())
        for name, value in quirks.items():
            setattr(server, name, value)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def test_aServerWithoutUIDLIsRefusedAndNothingImported(oldServer, store, tmp_path):
    server = oldServer(refuseUIDL=True)
    with pytest.raises(ImportFailed) as failed:
        importPOP3(store, server.url, ALICE, PASSWORD, delete=True)
    assert "refused UIDL: -ERR unknown command: without UIDL the messages have no unique ids" in str(failed.value)
    assert (pop3(store)[0], server.deleted) == ([], [])
    url, target_ = target(tmp_path, (ALICE, PASSWORD))
    target_.close()
    code, out, err = cli(url, "import", "pop3", server.url, ALICE, "--password-stdin", stdin=PASSWORD + "\n")
    assert code == 69, (out, err)
    assert "nothing was imported" in err and "run it again" not in err


@pytest.mark.parametrize("refusal", [b"-ERR [IN-USE] Mailbox is locked by another POP3 session",
                                     b"-ERR [LOGIN-DELAY] wait 15 minutes"])
def test_aMaildropInUseIsATemporaryFailure(oldServer, store, tmp_path, refusal):
    server = oldServer(loginRefusal=refusal)
    with pytest.raises(ImportFailed) as failed:
        importPOP3(store, server.url, ALICE, PASSWORD)
    assert getattr(failed.value, "code", None) == 75
    url, target_ = target(tmp_path, (ALICE, PASSWORD))
    target_.close()
    code, out, err = cli(url, "import", "pop3", server.url, ALICE, "--password-stdin", stdin=PASSWORD + "\n")
    assert code == 75, (out, err)
    assert refusal.decode() in err and "run the import again later" in err


@pytest.mark.parametrize(
    "greeting, code, why",
    [
        # A server at its connection limit: the next run gets in.
        (b"-ERR [SYS/TEMP] Too many connections", 75,
         "127.0.0.1 refused the connection: -ERR [SYS/TEMP] Too many connections: the server takes no "
         "connection now; run the import again later"),
        (b"-ERR go away", 69, "127.0.0.1 refused the connection: -ERR go away"),
        # The server's words reach the administrator's terminal: its
        # escape sequences (a window title, a cleared screen) do not.
        (b"-ERR \x1b]2;owned\x07go away\x1b[2J", 69,
         "127.0.0.1 refused the connection: -ERR ?]2;owned?go away?[2J"),
        # The URL's port mistyped: an IMAP server's greeting.
        (b"* OK [CAPABILITY IMAP4rev1] Dovecot ready.", 69,
         "does not answer as a POP3 server (it greets with '* OK [CAPABILITY IMAP4rev1] Dovecot ready.'): "
         "check the URL's port"),
    ],
)
def test_aGreetingThatIsNoWelcomeSaysWhy(source, tmp_path, greeting, code, why):
    """
    A server that greets with C{-ERR}, or with no POP3 greeting at all,
    is said to have refused the connection (not "refused command"), with
    the exit status of what it means: 75 for a response code that says
    it passes, as for a login, else 69.
    """
    server = source(threeMessages())
    server.greeting = greeting
    url, store = target(tmp_path, (ALICE, PASSWORD))
    store.close()
    result, out, err = cli(url, "import", "pop3", server.url, ALICE, "--password-stdin", stdin=PASSWORD + "\n")
    assert (result, out) == (code, ""), err
    assert err.startswith("mailgate: ") and err.endswith(why + "\n") and err.count("\n") == 1, err


def test_aSourceThatCannotBeReachedIsATemporaryFailureWithOrWithoutUsers(tmp_path):
    """
    Nothing listening on the source's port (the old server restarting, a
    network down): exit 75, run it again, for one import as for a user of
    C{--users} (one import said 69, "cannot be used", while the README
    and C{--users} said 75).
    """
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    url, store_ = target(tmp_path, (ALICE, PASSWORD))
    store_.close()
    source = f"pop3://127.0.0.1:{port}"
    code, out, err = cli(url, "import", "pop3", source, ALICE, "--password-stdin", "--insecure", stdin=PASSWORD + "\n")
    assert (code, out) == (75, ""), err
    assert err == f"mailgate: cannot connect to 127.0.0.1:{port}: Connection refused\n"
    users = tmp_path / "users.txt"
    users.write_text(f"{ALICE} {PASSWORD}\n")
    code, out, err = cli(url, "import", "pop3", source, "--users", str(users), "--insecure")
    assert code == 75, (out, err)
    assert f"mailgate: {ALICE}: cannot connect to 127.0.0.1:{port}: Connection refused" in err


def test_aServerThatRefusesTheConnectionForGoodIsNotRetriedWithUsers(source, tmp_path):
    """
    A greeting C{-ERR} without a code that says it passes (an access rule)
    is refused again next time: with C{--users}, 65 as for a refused
    login, not 75 (a script retrying on 75 would retry for ever); one
    import says 69.
    """
    server = source(threeMessages())
    server.greeting = b"-ERR go away"
    url, store_ = target(tmp_path, (ALICE, PASSWORD))
    store_.close()
    users = tmp_path / "users.txt"
    users.write_text(f"{ALICE} {PASSWORD}\n")
    code, out, err = cli(url, "import", "pop3", f"pop3://127.0.0.1:{server.port}", "--users", str(users))
    assert code == 65, (out, err)
    assert f"mailgate: {ALICE}: 127.0.0.1 refused the connection: -ERR go away\n" in err


def test_manyUsersSayWhetherRunningItAgainHelps(oldServer, tmp_path):
    """
    import pop3 --users: a user who cannot be imported for a reason a run
    again meets again (no such user in mailgate, a refused password) makes
    the run exit 65, not 75, which a script retrying on 75 would retry
    for ever; a user whose maildrop is busy makes it 75, naming the
    others as needing a fix first.
    """
    ghost = "ghost@example.org"
    server = oldServer()
    url, target_ = target(tmp_path, (ALICE, PASSWORD))
    target_.close()
    users = tmp_path / "users.txt"
    users.write_text(f"{ALICE} {PASSWORD}\n{ghost} {PASSWORD}\n")
    command = ["import", "pop3", f"pop3://127.0.0.1:{server.port}", "--users", str(users)]
    code, out, err = cli(url, *command)
    assert code == 65, (out, err)
    assert f"mailgate: {ghost}: no such user: {ghost}" in err
    assert err.splitlines()[-1] == (
        f"mailgate: the import of {ghost} did not complete (see above), for reasons that running it again "
        f"does not change"
    )
    server.loginRefusal = b"-ERR [IN-USE] Mailbox is locked by another POP3 session"
    code, out, err = cli(url, *command)
    assert code == 75, (out, err)
    assert err.splitlines()[-1] == (
        f"mailgate: the import of {ALICE} did not complete; run it again to finish (for {ghost}, once what "
        f"is said above is fixed)"
    )
    server.loginRefusal = b"-ERR [AUTH] Authentication failed."
    code, out, err = cli(url, *command)
    assert code == 65, (out, err)
    assert err.splitlines()[-1].startswith(f"mailgate: the import of {ALICE}, {ghost} did not complete (see above)")


class TLSPOP3(ScriptedPOP3):
    """
    A scripted server over TLS from the first octet (pop3s), with the
    certificate of C{context}, set before a client connects.
    """

    context = None

    def _session(self, connection, reader):
        secure = self.context.wrap_socket(connection, server_side=True)
        with secure:
            super()._session(secure, secure.makefile("rb"))


def test_manyUsersFromAServerThatCannotBeUsedSafelyIsNotTemporary(tmp_path, monkeypatch):
    """
    import pop3 --users from a server whose certificate cannot be verified:
    every user is refused until the administrator says otherwise
    (--insecure), so the run exits 65, not 75, which a script retrying
    on 75 would retry for ever.
    """
    import ssl

    from certs import makeCertificate

    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    certificate, key = makeCertificate(tmp_path)
    server = TLSPOP3(threeMessages())
    server.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.context.load_cert_chain(certificate, key)
    try:
        url, target_ = target(tmp_path, (ALICE, PASSWORD))
        target_.close()
        users = tmp_path / "users.txt"
        users.write_text(f"{ALICE} {PASSWORD}\n")
        command = ["import", "pop3", f"pop3s://127.0.0.1:{server.port}", "--users", str(users)]
        code, out, err = cli(url, *command)
        assert code == 65, (out, err)
        assert "cannot be verified" in err and "--insecure skips the check" in err
        code, out, err = cli(url, *command, "--insecure")
        assert code == 0, (out, err)
        assert out.startswith(f"{ALICE}: 3 messages imported")
    finally:
        server.stop()


def test_aWrongPasswordIsStillNotTemporary(oldServer, store):
    server = oldServer(loginRefusal=b"-ERR [AUTH] invalid credentials")
    with pytest.raises(ImportFailed) as failed:
        importPOP3(store, server.url, ALICE, PASSWORD)
    assert getattr(failed.value, "code", None) is None


def test_aTwoLineMessageKeepsItsLastEmptyLineWhenLISTCountsLFs(store, source):
    """
    A server whose LIST counts LF line ends lists a two-line message two
    octets short, as if it had added the final line break itself; but a
    message ending with an empty line did end with a line break, so
    nothing is taken off.  (A message without a final line break, from a
    server that adds one, still loses it: see test_importers.py.)
    """
    headersOnly = b"Subject: y\r\n\r\n"
    server = source({1: ("U1", headersOnly), 2: ("U2", message(2))})
    server.listSizes = {n: len(data.replace(b"\r\n", b"\n")) for n, (_, data) in server.messages.items()}
    report = importPOP3(store, server.url, ALICE, PASSWORD)
    assert (report.messages, report.failures) == (2, [])
    assert pop3(store)[2] == [headersOnly, message(2)]


def test_anAPOPOnlyServer(oldServer, store):
    """
    A server that keeps a user to APOP (qpopper can) refuses USER: the
    greeting's timestamp is used for APOP instead.
    """
    server = oldServer(apopOnly=True)
    server.greeting = f"+OK POP3 server ready {server.stamp}".encode()
    report = importPOP3(store, server.url, ALICE, PASSWORD)
    assert (report.messages, report.failures) == (3, [])
    assert server.apopAnswered
    # Without a timestamp, the refusal is the one USER got.
    other = oldServer(apopOnly=True)
    with pytest.raises(ImportFailed) as failed:
        importPOP3(store, other.url, ALICE, PASSWORD)
    assert str(failed.value) == "127.0.0.1 refused the user name: -ERR [AUTH] this user logs in with APOP only"


def test_aGreetingOfSeveralLines(source, store):
    """
    A banner of several lines (a quirk of some old servers and proxies):
    its other lines are not taken for the answer to the first command,
    which would shift every answer after it.
    """
    server = source(threeMessages())
    server.greeting = b"+OK hello\r\nWelcome to the mail service.\r\nUnauthorised use is forbidden."
    report = importPOP3(store, server.url, ALICE, PASSWORD)
    assert (report.messages, report.failures) == (3, [])
    assert pop3(store)[0] == ["U1", "U2", "U3"]


class HeldLogins(ScriptedPOP3):
    """
    A scripted server that holds the login of C{held} until C{release} is
    set (for DEADLINE at most).
    """

    held = None

    def __init__(self, messages):
        import threading

        self.release = threading.Event()
        self._user = None
        super().__init__(messages)

    def _answer(self, verb, argument, marked):
        if verb == "USER":
            self._user = argument
        if verb == "PASS" and self._user == self.held:
            from e2e import DEADLINE

            self.release.wait(DEADLINE)
        return super()._answer(verb, argument, marked)


def test_manyUsersShowTheirProgressAsTheyGo(tmp_path):
    """
    C{import pop3 --users} through a pipe (C{| tee migration.log}), as an
    administrator runs a long migration: each user's line comes out when
    that user is done, not all at the end (nor never, after a kill).
    """
    import os
    import selectors
    import subprocess

    from e2e import DEADLINE, MAILGATE, childEnvironment

    bob = "bob@example.org"
    server = HeldLogins(threeMessages())
    server.held = bob
    try:
        url, target_ = target(tmp_path, (ALICE, PASSWORD), (bob, PASSWORD))
        target_.close()
        users = tmp_path / "users.txt"
        users.write_text(f"{ALICE} {PASSWORD}\n{bob} {PASSWORD}\n")
        environment = childEnvironment()
        del environment["PYTHONUNBUFFERED"]
        command = [MAILGATE, "--database", url, "import", "pop3", f"pop3://127.0.0.1:{server.port}", "--users", str(users)]
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=environment) as child:
            try:
                selector = selectors.DefaultSelector()
                selector.register(child.stdout, selectors.EVENT_READ)
                ready = selector.select(DEADLINE)
                first = os.read(child.stdout.fileno(), 4096).decode() if ready else ""
                server.release.set()
                rest, err = child.communicate(timeout=DEADLINE * 3)
            finally:
                server.release.set()
                if child.poll() is None:
                    child.kill()
        assert first.startswith(f"{ALICE}: 3 messages imported ("), (first, err)
        assert (child.returncode, err) == (0, b"")
        lines = (first + rest.decode()).splitlines()
        assert lines[1].startswith(f"{bob}: 3 messages imported (")
        assert lines[2].startswith("2 users: 6 messages imported (") and "not complete" not in lines[2]
    finally:
        server.stop()


def test_aMaildirFileNamedTwiceIsNotDropped(store, tmp_path):
    """
    Two files of one base name, one in cur/ and one in new/ (a message
    put back by hand, a crashed move): both are imported, the second
    after the others, as Dovecot numbers it once it has renamed it; two
    names of one file (a link) are one message.
    """
    import os

    name = "1700000000.M1P1.h"
    directory = writeMaildir(tmp_path / "Maildir", [
        ("cur", name + ":2,S", b"Subject: first\n\nx\n"),
        ("new", name, b"Subject: the other\n\ny\n"),
        ("cur", "1700000001.M1P1.h:2,S", b"Subject: linked\n\nz\n"),
    ])
    os.link(tmp_path / "Maildir" / "cur" / "1700000001.M1P1.h:2,S", tmp_path / "Maildir" / "new" / "1700000001.M1P1.h")
    lines = []
    report = importMaildir(store, directory, ALICE, "%f", progress=lines.append)
    assert (report.messages, report.failures) == (3, [])
    assert lines == [f"{directory}/new/{name}: unique id {name} appears twice; imported as {name}-2"]
    uidl, _, bodies = pop3(store)
    assert uidl == [name, "1700000001.M1P1.h", name + "-2"]
    assert bodies == [b"Subject: first\r\n\r\nx\r\n", b"Subject: linked\r\n\r\nz\r\n", b"Subject: the other\r\n\r\ny\r\n"]


def test_aLaterRunDoesNotBringBackWhatUsersDeletedWhileItIsKept(store, source):
    """
    The final run of a move, after the switch, for what reached the old
    server meanwhile: with deleted mail kept (--keep-deleted-days, as the
    README advises while moving), what a user deleted in mailgate since
    the first run is skipped, not imported again (its client would
    download it once more).
    """
    from mailgate.store.limits import StoreLimits

    store.limits = StoreLimits(keepDeletedDays=30)
    server = source(threeMessages())
    assert importPOP3(store, server.url, ALICE, PASSWORD).messages == 3
    from mailgate.testing import POP3Session

    session = POP3Session(store)
    session.login(ALICE, PASSWORD)
    assert session.command("DELE 1").startswith("+OK")
    session.command("QUIT")
    server.messages[4] = ("U4", message(4))
    report = importPOP3(store, server.url, ALICE, PASSWORD)
    assert (report.messages, report.skipped, report.failures) == (1, 3, [])
    assert pop3(store)[0] == ["U2", "U3", "U4"]


def deleteInMailgate(store, *numbers):
    """
    A POP3 session of Alice's that deletes messages C{numbers} and quits.
    """
    from mailgate.testing import POP3Session

    session = POP3Session(store)
    session.login(ALICE, PASSWORD)
    for number in numbers:
        assert session.command(f"DELE {number}").startswith("+OK")
    assert session.command("QUIT").startswith("+OK")


def test_aLaterRunDoesNotBringBackWhatUsersDeletedSince(store, source):
    """
    The same without deleted mail kept (the default): mailgate remembers
    the ids it imported, with each message's size and digest, after the
    user deletes the message, so the run after the switch skips it.  Under
    a remembered id, another message (the old server reused the id) is a
    failure, not skipped and not imported.
    """
    server = source(threeMessages())
    assert importPOP3(store, server.url, ALICE, PASSWORD).messages == 3
    deleteInMailgate(store, 1, 2)
    assert pop3(store)[0] == ["U3"]
    server.messages[4] = ("U4", message(4))
    report = importPOP3(store, server.url, ALICE, PASSWORD)
    assert (report.messages, report.skipped, report.failures) == (1, 3, [])
    assert pop3(store)[0] == ["U3", "U4"]
    # U2 given to other octets of the same size (the old server reused the
    # id): with --delete, which compares octets, a failure, and the source
    # keeps it.
    uidl, octets = server.messages[2]
    server.messages[2] = (uidl, octets.replace(b"body of", b"BODY of"))
    report = importPOP3(store, server.url, ALICE, PASSWORD, delete=True)
    assert report.messages == 0
    [failure] = report.failures
    assert "unique id U2: an earlier import brought in another message" in failure, failure
    assert 2 not in server.deleted and sorted(server.deleted) == [1, 3, 4]
    assert pop3(store)[0] == ["U3", "U4"]


def test_forgottenIdsAreImportedAgainOnPurpose(store, source):
    """
    What the user deleted since the first run comes back once its ids are
    forgotten (all of them, or those named): mailgate import forget, for
    an administrator who wants the old server's copy back.  What the
    maildrop still holds stays skipped.
    """
    from mailgate.errors import NoSuchUser
    from mailgate.testing import resultOf

    server = source(threeMessages())
    assert importPOP3(store, server.url, ALICE, PASSWORD).messages == 3
    deleteInMailgate(store, 1, 2)
    assert resultOf(store.forgetImported(ALICE, ["U2", "nothing-like-it"])) == 1
    report = importPOP3(store, server.url, ALICE, PASSWORD)
    assert (report.messages, report.skipped, report.failures) == (1, 2, [])
    assert pop3(store)[0] == ["U3", "U2"]
    assert resultOf(store.forgetImported(ALICE)) == 3
    report = importPOP3(store, server.url, ALICE, PASSWORD)
    assert (report.messages, report.skipped, report.failures) == (1, 2, [])
    assert sorted(pop3(store)[0]) == ["U1", "U2", "U3"]
    with pytest.raises(NoSuchUser):
        resultOf(store.forgetImported("nobody@example.org"))


def test_theIdsImportedForAUserGoWithTheUser(store, source):
    """
    Deleting a user forgets what was imported for them: the same address
    added again starts afresh, and an import brings everything in.
    """
    from mailgate.testing import addUser, resultOf

    server = source(threeMessages())
    assert importPOP3(store, server.url, ALICE, PASSWORD).messages == 3
    resultOf(store.deleteUser(ALICE))
    addUser(store, ALICE, PASSWORD)
    assert importPOP3(store, server.url, ALICE, PASSWORD).messages == 3
    assert pop3(store)[0] == ["U1", "U2", "U3"]


def test_aWrongPasswordIsNotTriedAgainWithAPOP(oldServer, store):
    """
    A refused PASS that says nothing of APOP is a wrong password: trying
    it again with APOP would count twice against the source's limits.
    """
    server = oldServer(loginRefusal=b"-ERR [AUTH] invalid credentials")
    server.greeting = f"+OK POP3 server ready {server.stamp}".encode()
    with pytest.raises(ImportFailed):
        importPOP3(store, server.url, ALICE, PASSWORD)
    assert not hasattr(server, "apopAnswered")


def test_anImportTheDatabaseInterruptedIsATemporaryFailure(databaseURL, store, tmp_path, monkeypatch):
    """
    import maildir: a batch the database fails to write (a PostgreSQL
    restart, a full disk) is a temporary failure, 75, like import pop3's,
    not 65, which says the maildir holds messages that cannot be taken;
    the next run finishes it.
    """
    import mailgate.cli
    from twisted.internet import defer

    from mailgate.errors import TemporaryFailure
    from mailgate.importers import BatchWriter

    monkeypatch.setattr(BatchWriter, "maxMessages", 2)
    messages = [("new", f"17000000{n:02d}.M1P1.h", b"Subject: %d\n\nx\n" % n) for n in range(5)]
    directory = writeMaildir(tmp_path / "Maildir", messages)
    opened = []
    realOpen = mailgate.cli.openSynchronousStore

    def failingSecondBatch(url, **kwargs):
        target_ = realOpen(url, **kwargs)
        write = target_.importMessages

        def importMessages(address, items, source=None):
            opened.append(len(items))
            if len(opened) == 2:
                return defer.fail(TemporaryFailure("the database went away"))
            return write(address, items, source)

        target_.importMessages = importMessages
        return target_

    monkeypatch.setattr(mailgate.cli, "openSynchronousStore", failingSecondBatch)
    code, out, err = cli(databaseURL, "import", "maildir", directory, ALICE, "--uidl-format", "%f")
    assert code == 75, (out, err)
    assert "the database went away" in err and err.endswith("the import did not complete; run it again to finish\n")
    monkeypatch.undo()
    code, out, err = cli(databaseURL, "import", "maildir", directory, ALICE, "--uidl-format", "%f")
    assert (code, err) == (0, "")
    assert out.startswith("3 messages imported") and "2 skipped as already present" in out


def test_aUIDLThatFailsIsNotAMissingUIDL(oldServer, store, tmp_path):
    """
    Dovecot answers UIDL with C{-ERR [SYS/TEMP]} when it cannot read the
    maildrop (a broken size in a file name does it): the server has UIDL,
    so the import is a temporary failure to run again, not a refusal
    saying the server has none.
    """
    server = oldServer(refuseUIDL=True, uidlRefusal=b"-ERR [SYS/TEMP] Internal error occurred.")
    url, target_ = target(tmp_path, (ALICE, PASSWORD))
    target_.close()
    code, out, err = cli(url, "import", "pop3", server.url, ALICE, "--password-stdin", stdin=PASSWORD + "\n")
    assert code == 75, (out, err)
    assert "refused UIDL: -ERR [SYS/TEMP] Internal error occurred." in err and "without UIDL" not in err


def test_aMaildirWithoutUidListSaysWhichIdsItGets(databaseURL, store, tmp_path):
    """
    A maildir without dovecot-uidlist (nor Dovecot's index) is imported
    with file-name ids, and the command says so, naming --uidlist for a
    uid list kept elsewhere; a --uidlist that is not there is refused.
    """
    directory = writeMaildir(tmp_path / "Maildir", [("cur", "1700000000.M1P1.h:2,S", b"Subject: x\n\ny\n")])
    code, out, err = cli(databaseURL, "import", "maildir", directory, ALICE)
    assert code == 0 and out.startswith("1 message imported")
    assert err == (
        f"mailgate: {directory} has no dovecot-uidlist: the unique ids are the file names (%f); if Dovecot "
        f"keeps its dovecot-uidlist elsewhere (CONTROL= in mail_location), give it with --uidlist\n"
    )
    missing = str(tmp_path / "control" / "dovecot-uidlist")
    code, out, err = cli(databaseURL, "import", "maildir", directory, ALICE, "--uidlist", missing)
    assert (code, err) == (66, f"mailgate: no such file: {missing}\n")


def test_manyUsersWarningsNameTheirUser(source, tmp_path):
    """
    import pop3 --users: a warning (an id renamed, an id cut at a space)
    names the user it is about, as a failure does; out of fifty users, a
    bare "message 2: ..." says nothing of whose message.
    """
    bob = "bob@example.org"
    server = source(threeMessages(("X", "X", "U3")))
    url, target_ = target(tmp_path, (ALICE, PASSWORD), (bob, PASSWORD))
    target_.close()
    users = tmp_path / "users.txt"
    users.write_text(f"{ALICE} {PASSWORD}\n{bob} {PASSWORD}\n")
    code, out, err = cli(url, "import", "pop3", f"pop3://127.0.0.1:{server.port}", "--users", str(users))
    assert code == 0, (out, err)
    assert err.splitlines() == [
        f"mailgate: {who}: message 2: unique id X appears twice; imported as X-2" for who in (ALICE, bob)
    ]
