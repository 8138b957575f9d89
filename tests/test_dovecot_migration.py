"""
Moving from Dovecot, against a real one: Debian's Dovecot 2.3, private on
loopback (tests/dovecotserver.py), its maildir filled the way an MTA fills
it (through its own LMTP) plus files dropped in by hand (which Dovecot
numbers only when it next looks).

What a user must see: after the switch, mailgate answers UIDL and LIST
exactly as Dovecot did and serves the same octets, whether the maildir
was imported from its files or through Dovecot's POP3; and a client that
left its mail on the server (Python's poplib with its saved UIDL list,
and fetchmail with keep and uidl) downloads nothing again, and then
exactly the one message that is really new.
"""

import concurrent.futures
import gzip
import os
import subprocess
import time
from contextlib import contextmanager

import pytest

from dovecotserver import PrivateDovecot, answers, requireDovecot
from e2e import DEADLINE, MAILGATE, childEnvironment, mailgate_server, mailgateHere, sqliteOnly  # noqa: F401
from mailgate.testing import POP3Session, addUser, deliver, memoryStore, resultOf

pytestmark = requireDovecot

ALICE = "alice@example.org"
PASSWORD = "wonder land"


def lmtpMessages():
    """
    What an MTA hands Dovecot: awkward content included (dot lines, 8-bit
    octets, a long line, a body over mailgate's 128 KiB chunk).
    """
    return [
        b"Subject: plain\r\n\r\nhello\r\n",
        b"Subject: dots\r\n\r\n.\r\n..two\r\n.leading\r\nend\r\n",
        b"Subject: =?utf-8?q?=C3=A9t=C3=A9?=\r\nContent-Type: text/plain; charset=latin-1\r\n\r\n\xe9t\xe9 \xff\r\n",
        b"Subject: long line\r\n\r\n" + b"L" * 1900 + b"\r\n",
        b"Subject: big\r\n\r\n" + b"".join(b"line %06d of a big message\r\n" % n for n in range(12000)),
    ]


def droppedFiles(now):
    """
    Files put into new/ by hand (as another delivery agent would): in an
    order only Dovecot's own sorting explains, LF and CRLF line ends, one
    without a final line end.
    """
    return [
        (f"{now}.M500000P1.drop", b"Subject: dropped late in the second\n\nbody\n"),
        (f"{now}.M40P1.drop", b"Subject: dropped early in the second\n\nbody\n"),
        (f"{now - 100}.P1.earlier", b"Subject: dropped, older, no microseconds\r\n\r\nCRLF body\r\n"),
        (f"{now}.M40P1.drop2", b"Subject: no final line end\n\nlast line"),
    ]


@pytest.fixture
def dovecot():
    server = PrivateDovecot()
    try:
        server.addUsers([ALICE], PASSWORD)
        server.start()
        yield server
        assert server.errorsLogged() == []
    finally:
        server.cleanup()


def cli(database, *argv, input=b""):
    done = subprocess.run(
        [MAILGATE, "--database", database, *argv],
        input=input, capture_output=True, timeout=DEADLINE * 3, env=childEnvironment(),
    )
    return done.returncode, done.stdout.decode(), done.stderr.decode()


def fetchmail(directory, port, out):
    """
    Run fetchmail once (keep, uidl) against 127.0.0.1:port; its ids file
    lives in C{directory}; every message it fetches becomes a file in
    C{out}.  Returns how many it fetched this time.
    """
    rc = os.path.join(directory, "fetchmailrc")
    with open(rc, "w") as f:
        f.write(
            "set no syslog\n"
            f"poll 127.0.0.1 with proto POP3 port {port} uidl\n"
            f'  user "{ALICE}" there with password "{PASSWORD}" is root here\n'
            "  keep\n"
            # Plain POP3 on loopback: neither server here has TLS.
            '  sslproto ""\n'
            f"  mda \"/bin/sh -c 'cat > $(mktemp -p {out} msg.XXXXXX)'\"\n"
        )
    os.chmod(rc, 0o600)
    before = len(os.listdir(out))
    # A lock file of its own: run as root, fetchmail otherwise takes
    # /var/run/fetchmail.pid, and a fetchmail of another test running at
    # the same time (test_clients.py) would make it refuse to start.
    pidfile = os.path.join(directory, "fetchmail.pid")
    done = subprocess.run(
        ["fetchmail", "-f", rc, "-i", os.path.join(directory, "fetchids"), "--pidfile", pidfile, "--nodetach"],
        capture_output=True, text=True, timeout=DEADLINE * 3, env=dict(childEnvironment(), HOME=directory),
    )
    # 0: mail fetched; 1: no new mail.
    assert done.returncode in (0, 1), done.stdout + done.stderr
    return len(os.listdir(out)) - before


def mailgateAnswers(port):
    import poplib

    client = poplib.POP3("127.0.0.1", port, timeout=DEADLINE)
    try:
        client.user(ALICE)
        client.pass_(PASSWORD)
        return answers(client)
    finally:
        client.quit()


def newDatabase(tmp_path, name):
    url = f"sqlite:///{tmp_path / name}"
    store = memoryStore(url)
    try:
        addUser(store, ALICE, PASSWORD)
    finally:
        store.close()
    return url


def startWithMail(server, count):
    """
    Start the private Dovecot C{server} with ALICE as its user and the
    first C{count} of L{lmtpMessages} delivered to her through its LMTP.
    """
    server.addUsers([ALICE], PASSWORD)
    server.start()
    for message in lmtpMessages()[:count]:
        server.deliver(ALICE, message)


def servedFrom(database):
    """
    L{servedByMailgate} from the database at C{database}, opened and
    closed for it.
    """
    store = memoryStore(database)
    try:
        return servedByMailgate(store)
    finally:
        store.close()


def servedByMailgate(store):
    """
    The UIDL and LIST listings (their lines) mailgate serves ALICE from
    C{store}, for comparing with what Dovecot served.
    """
    session = POP3Session(store)
    session.login(ALICE, PASSWORD)
    return (
        session.command("UIDL").split("\r\n")[1:-2],
        session.command("LIST").split("\r\n")[1:-2],
    )



def servedBy(server, user):
    """
    What a Dovecot C{server} serves C{user} (L{answers}: UIDL, LIST and
    the messages), over a POP3 session of its own, ended with QUIT.
    """
    client = server.pop3(user, PASSWORD)
    try:
        return answers(client)
    finally:
        client.quit()


@contextmanager
def aliceStore():
    """
    A store in memory with ALICE in it (her password PASSWORD), closed at
    the end: where each test imports a maildrop and serves it back.
    """
    store = memoryStore()
    try:
        addUser(store, ALICE, PASSWORD)
        yield store
    finally:
        store.close()


@sqliteOnly
def test_movingFromDovecot(dovecot, mailgate_server, tmp_path):
    for message in lmtpMessages():
        dovecot.deliver(ALICE, message)
    now = int(time.time())
    new = os.path.join(dovecot.maildir(ALICE), "new")
    for name, data in droppedFiles(now):
        with open(os.path.join(new, name), "wb") as f:
            f.write(data)
    dovecot.own(dovecot.maildir(ALICE))
    # The maildir as it is on disk before Dovecot has seen the dropped
    # files: they are not in its dovecot-uidlist yet.
    files = dovecot.copyMaildir(ALICE, tmp_path / "Maildir")

    # What Dovecot serves, and what a leave-on-server client has seen.
    expected = servedBy(dovecot, ALICE)
    uidl, listing, messages = expected
    assert len(uidl) == len(listing) == 9
    seenByClient = {line.split()[1] for line in uidl}
    fetched = tmp_path / "fetched"
    fetched.mkdir()
    assert fetchmail(str(tmp_path), dovecot.pop3Port, fetched) == 9

    # Both ways into mailgate: the files, and Dovecot's POP3.
    fromFiles = newDatabase(tmp_path, "files.sqlite3")
    code, out, err = cli(fromFiles, "import", "maildir", files, ALICE)
    # The dropped files, which Dovecot had not numbered: their uids said.
    assert code == 0 and err.count("\n") == 1, (out, err)
    assert err.startswith("mailgate: 4 files that Dovecot has not numbered yet (dropped in by another program"), err
    assert out.startswith("9 messages imported (")
    fromPOP3 = newDatabase(tmp_path, "pop3.sqlite3")
    source = f"pop3://alice%40example.org@127.0.0.1:{dovecot.pop3Port}"
    code, out, err = cli(fromPOP3, "import", "pop3", source, ALICE, "--password-stdin", input=PASSWORD.encode() + b"\n")
    assert (code, err) == (0, ""), out
    assert out.startswith("9 messages imported (")
    # The maildir once Dovecot has worked on it (files moved to cur/,
    # flags added, every file in dovecot-uidlist) imports the same way.
    synced = memoryStore()
    try:
        addUser(synced, ALICE, PASSWORD)
        from mailgate.importers.maildir import importMaildir

        assert importMaildir(synced, dovecot.maildir(ALICE), ALICE).messages == 9
        assert servedByMailgate(synced) == (uidl, listing)
    finally:
        synced.close()

    # The switch: mailgate answers exactly as Dovecot did.
    servers = [mailgate_server(database=database) for database in (fromFiles, fromPOP3)]
    for server in servers:
        assert mailgateAnswers(server.port) == expected

    # The leave-on-server clients: nothing new...
    server = servers[0]
    import poplib

    client = poplib.POP3("127.0.0.1", server.port, timeout=DEADLINE)
    client.user(ALICE)
    client.pass_(PASSWORD)
    assert {line.split()[1].decode() for line in client.uidl()[1]} - seenByClient == set()
    client.quit()
    assert fetchmail(str(tmp_path), server.port, fetched) == 0
    # ...until something is.
    store = memoryStore(fromFiles)
    try:
        deliver(store, [ALICE], b"Subject: the first after the switch\r\n\r\nnew\r\n")
    finally:
        store.close()
    assert fetchmail(str(tmp_path), server.port, fetched) == 1
    assert fetchmail(str(tmp_path), server.port, fetched) == 0


def test_maildirWithoutUidListLikeDovecotsFileNameIds(tmp_path):
    """
    A maildir Dovecot has never seen (no dovecot-uidlist): imported with
    file-name ids, in the order Dovecot numbers such files, as a Dovecot
    with pop3_uidl_format = %f serves them.
    """
    server = PrivateDovecot(uidlFormat="%f")
    try:
        server.addUsers([ALICE], PASSWORD)
        now = int(time.time())
        maildir = server.maildir(ALICE)
        for sub, (name, data) in zip(["new", "cur", "new", "cur"], droppedFiles(now)):
            with open(os.path.join(maildir, sub, name + (":2,S" if sub == "cur" else "")), "wb") as f:
                f.write(data)
        server.own(maildir)
        files = server.copyMaildir(ALICE, tmp_path / "Maildir")
        assert not os.path.exists(os.path.join(files, "dovecot-uidlist"))
        server.start()
        uidl, listing, messages = servedBy(server, ALICE)
        assert server.errorsLogged() == []
    finally:
        server.cleanup()
    assert [line.split()[1] for line in uidl][0] == f"{now - 100}.P1.earlier"

    with aliceStore() as store:
        from mailgate.importers.maildir import importMaildir

        assert importMaildir(store, files, ALICE).messages == 4
        assert servedByMailgate(store) == (uidl, listing)


def test_savedUidlsWinOverTheFormat(tmp_path):
    """
    Dovecot with pop3_save_uidl keeps the ids it served in
    dovecot-uidlist (P fields): after its format changes it still serves
    them, and so does mailgate after the import.
    """
    server = PrivateDovecot(uidlFormat="%f", extra="pop3_save_uidl = yes")
    try:
        startWithMail(server, 3)
        before = servedBy(server, ALICE)
        server.stop()
        server.uidlFormat = "%08Xu%08Xv"
        server.start()
        after = servedBy(server, ALICE)
        assert after == before  # the saved ids, not the new format
        assert server.errorsLogged() == []
        with open(os.path.join(server.maildir(ALICE), "dovecot-uidlist")) as f:
            assert " P" in f.read()
        files = server.copyMaildir(ALICE, tmp_path / "Maildir")
    finally:
        server.cleanup()
    with aliceStore() as store:
        from mailgate.importers.maildir import importMaildir

        assert importMaildir(store, files, ALICE).messages == 3
        assert servedByMailgate(store) == (before[0], before[1])


#: A maildir file name as Dovecot makes it on a host with a long name:
#: past RFC 1939's 70 octets, and served so by %f and %g.
LONG_NAME = "{now}.M7P12345Q1R2345abcdef.mx-01.mailstore.eu-west-3.hosting-provider.example.com,S=23"


@pytest.mark.parametrize(
    "uidlFormat, importedAs",
    [(f, f) for f in ["%f", "%g", "%v.%u", "%v-%u", "%08Xv%08Xu", "%u", "%Mf"]]
    + [
        # The same formats in Dovecot 2.4's spelling (this Dovecot is 2.3
        # and serves the 2.3 one): what a site moving from Dovecot 2.4
        # gives --uidl-format, from its `doveconf -h pop3_uidl_format`.
        ("%08Xu%08Xv", "%{uid | hex(8)}%{uidvalidity | hex(8)}"),
        ("%08Xv%08Xu", "%{uidvalidity | hex(8)}%{uid | hex(8)}"),
        ("%Mf", "%{filename | md5}"),
    ],
)
def test_everyFormatServesWhatDovecotServed(tmp_path, uidlFormat, importedAs):
    """
    For each pop3_uidl_format of the README's list: the ids and sizes
    mailgate serves after the move, from the files (before and after
    Dovecot has seen them, the format given as C{importedAs}) and through
    Dovecot's POP3, are Dovecot's.
    """
    from mailgate.importers.maildir import importMaildir
    from mailgate.importers.pop3 import importPOP3

    server = PrivateDovecot(uidlFormat=uidlFormat)
    try:
        startWithMail(server, 3)
        name = LONG_NAME.format(now=int(time.time()))
        with open(os.path.join(server.maildir(ALICE), "new", name), "wb") as f:
            f.write(b"Subject: dropped\n\nbody\n")
        server.own(server.maildir(ALICE))
        files = server.copyMaildir(ALICE, tmp_path / "Maildir")
        uidl, listing, _ = servedBy(server, ALICE)
        assert len(uidl) == 4
        imports = [
            lambda store: importMaildir(store, files, ALICE, importedAs),
            lambda store: importMaildir(store, server.maildir(ALICE), ALICE, importedAs),
            lambda store: importPOP3(store, f"pop3://alice%40example.org@127.0.0.1:{server.pop3Port}", ALICE, PASSWORD),
        ]
        for how in imports:
            with aliceStore() as store:
                report = how(store)
                assert (report.messages, report.failures) == (4, [])
                assert servedByMailgate(store) == (uidl, listing)
        assert server.errorsLogged() == []
    finally:
        server.cleanup()


def test_aUidListDovecotKeepsElsewhere(tmp_path):
    """
    mail_location with CONTROL= keeps dovecot-uidlist out of the maildir
    (its index stays in it): import maildir refuses to guess file-name
    ids, which would all differ from the ones Dovecot served, and with
    --uidlist serves Dovecot's.
    """
    server = PrivateDovecot(extra="mail_location = maildir:~/Maildir:CONTROL=~/control")
    try:
        startWithMail(server, 3)
        uidl, listing, _ = servedBy(server, ALICE)
        files = server.copyMaildir(ALICE, tmp_path / "Maildir")
        uidList = os.path.join(os.path.dirname(server.maildir(ALICE)), "control", ".INBOX", "dovecot-uidlist")
        assert not os.path.exists(os.path.join(files, "dovecot-uidlist")) and os.path.exists(uidList)
        assert server.errorsLogged() == []
        database = newDatabase(tmp_path, "target.sqlite3")
        code, out, err = cli(database, "import", "maildir", files, ALICE)
        assert code == 66, (out, err)
        assert "has Dovecot's index (dovecot.index" in err and "give it with --uidlist" in err
        code, out, err = cli(database, "import", "maildir", files, ALICE, "--uidlist", uidList)
        assert (code, err) == (0, ""), out
    finally:
        server.cleanup()
    assert servedFrom(database) == (uidl, listing)


BOB = "bob@example.org"
GHOST = "ghost@example.org"


@pytest.fixture(scope="module")
def importsOfAHeldMaildrop(tmp_path_factory):
    """
    One Dovecot with pop3_lock_session and a master user, alice's maildrop
    held by a client throughout, and the two imports that find it so, run
    side by side: C{import pop3} as alice, and C{import pop3 --users}
    through the master user for alice, ghost (not there) and bob (one
    message).  Each waits out Dovecot's POP3 session lock, a fixed 10 s in
    its code (pop3-client.c, no setting shortens it), before [IN-USE]: at
    once, the two cost one wait rather than two.  Neither import changes
    what the other finds (each writes its own database).

    @return: each import's (exit status, stdout, stderr), by how it logs in.
    """
    tmp_path = tmp_path_factory.mktemp("held")
    server = PrivateDovecot(extra="pop3_lock_session = yes")
    master = os.path.join(server.directory, "master-users")
    server.extra += (
        "\nauth_master_user_separator = *\n"
        f"passdb {{\n  driver = passwd-file\n  args = {master}\n  master = yes\n  result_success = continue\n}}\n"
    )
    try:
        server.addUsers([ALICE, BOB], PASSWORD)
        with open(master, "w") as f:
            f.write("migrator:{PLAIN}master key\n")
        os.chmod(master, 0o644)
        server.start()
        server.deliver(ALICE, lmtpMessages()[0])
        server.deliver(BOB, lmtpMessages()[0])
        asTheUser = newDatabase(tmp_path, "as-the-user.sqlite3")
        throughMaster = newDatabase(tmp_path, "through-master.sqlite3")
        for user in (GHOST, BOB):
            code, out, err = cli(throughMaster, "user", "add", user, "--password-stdin", input=b"x\n")
            assert code == 0, err
        addresses = tmp_path / "addresses"
        addresses.write_text(f"{ALICE}\n{GHOST}\n{BOB}\n")
        source = f"pop3://127.0.0.1:{server.pop3Port}"
        holder = server.pop3(ALICE, PASSWORD)
        try:
            with concurrent.futures.ThreadPoolExecutor(2) as pool:
                runs = {
                    "as the user": pool.submit(
                        cli, asTheUser, "import", "pop3", f"pop3://alice%40example.org@127.0.0.1:{server.pop3Port}",
                        ALICE, "--password-stdin", input=PASSWORD.encode() + b"\n",
                    ),
                    "through a master user": pool.submit(
                        cli, throughMaster, "import", "pop3", source, "--users", str(addresses),
                        "--master-user", "migrator", "--password-stdin", input=b"master key\n",
                    ),
                }
                results = {name: run.result() for name, run in runs.items()}
        finally:
            holder.quit()
    finally:
        server.cleanup()
    return results


def test_aUserOnTwoLinesInEitherCaseKeepsThePasswordDovecotTook(tmp_path):
    """
    A passwd-file with a user twice, Alice@Example.org and then
    alice@example.org (an old entry never cleaned up): Dovecot looks up
    the login lower-cased and logs her in with the second line's password
    only.  user import keeps that line, and she logs in to mailgate with
    the password she had.  (Before, the first line was kept: her password
    was refused, the other one taken.)
    """
    import poplib

    server = PrivateDovecot()
    try:
        server.addUsers([ALICE], PASSWORD)
        server.start()
        path = os.path.join(server.directory, "passwd")
        with open(path) as f:
            rest = f.read().splitlines()[0].split(":", 2)[2]
        lines = f"Alice@Example.org:{{PLAIN}}never hers:{rest}\nalice@example.org:{{PLAIN}}{PASSWORD}:{rest}\n"
        with open(path, "w") as f:
            f.write(lines)
        for password, answer in ((PASSWORD, "+OK"), ("never hers", "-ERR [AUTH]")):
            client = poplib.POP3("127.0.0.1", server.pop3Port, timeout=DEADLINE)
            try:
                client.user("Alice@Example.org")
                try:
                    said = client.pass_(password).decode()
                except poplib.error_proto as e:
                    said = e.args[0].decode()
                assert said.startswith(answer), (password, said)
            finally:
                client.close()
    finally:
        server.cleanup()
    passwd = tmp_path / "users.passwd"
    passwd.write_text(lines)
    database = f"sqlite:///{tmp_path / 'users.sqlite3'}"
    code, out, err = cli(database, "user", "import", str(passwd))
    assert code == 65 and out.splitlines()[0] == f"added {ALICE}", (out, err)
    assert f"{passwd} line 1: {ALICE} is on line 2 too, in lower case" in err
    assert cli(database, "user", "test", ALICE, "--password-stdin", input=PASSWORD.encode() + b"\n")[0] == 0
    assert cli(database, "user", "test", ALICE, "--password-stdin", input=b"never hers\n")[0] == 77


def test_aMaildropAnotherClientHoldsIsATemporaryFailure(importsOfAHeldMaildrop):
    """
    Dovecot with pop3_lock_session answers -ERR [IN-USE] while a client
    polls: import pop3 says to run it again later, and exits 75.
    """
    code, out, err = importsOfAHeldMaildrop["as the user"]
    assert code == 75, (out, err)
    assert "-ERR [IN-USE]" in err and "run the import again later" in err


@sqliteOnly
def test_movingEveryUserWithTheirPasswordsThroughAMasterUser(mailgate_server, tmp_path):
    """
    The whole move without knowing any user's password: the users come
    from Dovecot's own passwd-file (SHA512-CRYPT hashes), their mail
    through Dovecot's POP3 as each of them by a master user
    (C{alice@example.org*migrator}); then each logs in to mailgate with
    the password they had and finds what Dovecot served, under the same
    unique ids.
    """
    server = PrivateDovecot()
    master = os.path.join(server.directory, "master-users")
    server.extra = (
        "auth_master_user_separator = *\n"
        f"passdb {{\n  driver = passwd-file\n  args = {master}\n  master = yes\n  result_success = continue\n}}\n"
    )
    try:
        server.addUsers([ALICE, BOB], PASSWORD)
        with open(master, "w") as f:
            f.write("migrator:{PLAIN}master key\n")
        os.chmod(master, 0o644)
        server.start(scheme="SHA512-CRYPT")
        for n, message in enumerate(lmtpMessages()):
            server.deliver(ALICE if n % 2 else BOB, message)
        expected = {}
        for user in (ALICE, BOB):
            expected[user] = servedBy(server, user)

        database = f"sqlite:///{tmp_path / 'mail.sqlite3'}"
        code, out, err = cli(database, "user", "import", os.path.join(server.directory, "passwd"))
        assert (code, err) == (0, ""), out
        assert out.splitlines()[-1] == "2 added, 0 already there, 0 failed"
        addresses = tmp_path / "addresses"
        addresses.write_text(f"# everyone\n{ALICE}\n{BOB}\n")
        source = f"pop3://127.0.0.1:{server.pop3Port}"
        argv = ["import", "pop3", source, "--users", str(addresses), "--master-user", "migrator", "--password-stdin"]
        code, out, err = cli(database, *argv, input=b"master key\n")
        assert (code, err) == (0, ""), out
        assert out.splitlines()[-1].startswith("2 users: 5 messages imported")
        # A wrong master password or separator would have every login
        # refused, each after a growing delay where Dovecot's anti-guessing
        # delays are on (they are off in this private one): the first
        # refusal stops it.
        for wrong, password in ((argv, b"wrong key\n"), (argv + ["--master-separator", "+"], b"master key\n")):
            code, out, err = cli(database, *wrong, input=password)
            assert code == 77 and "refused the login: -ERR [AUTH]" in err, (code, out, err)
            assert "no login through the master user migrator has worked yet" in err
            assert BOB not in out + err, (out, err)
        withPassword = tmp_path / "with-password"
        withPassword.write_text(f"{ALICE} {PASSWORD}\n")
        code, _, err = cli(database, "import", "pop3", source, "--users", str(withPassword), "--master-user", "migrator")
        assert code == 65 and "expected an ADDRESS alone" in err
        assert server.errorsLogged() == []
    finally:
        server.cleanup()

    mailgate = mailgate_server(database=database)
    import poplib

    for user in (ALICE, BOB):
        client = poplib.POP3("127.0.0.1", mailgate.port, timeout=DEADLINE)
        client.user(user)
        client.pass_(PASSWORD)
        assert answers(client) == expected[user]
        client.quit()


def test_aMaildropInUseShowsTheMasterUserWorks(importsOfAHeldMaildrop):
    """
    Through a master user, the first user's maildrop is held by a client
    (Dovecot answers [IN-USE], after the login was right): the master user
    works, so a later user the source refuses (not there) is one failure
    of the run, which goes on to the next, rather than ending it as a
    wrong master password would.
    """
    code, out, err = importsOfAHeldMaildrop["through a master user"]
    assert code == 75, (code, out, err)
    assert f"{ALICE}: " in err and "[IN-USE]" in err
    assert f"{GHOST}: 127.0.0.1 refused the login" in err
    assert "no login through the master user" not in err
    assert out.splitlines()[-1].startswith("3 users: 1 message imported"), out


def test_importThroughPOP3KeepsFirstLinesThatStartWithADot(dovecot):
    """
    Dovecot 2.3 does not dot-stuff the first line of a message: a first
    line ".x" comes as ".x" (x for a reader that undoes stuffing), "..x"
    as "..x" (.x), and a lone "." ends the response at once, the rest of
    the message following as if it were the next reply.  import pop3
    keeps every such message whole and the ones after it: imported
    before, the second was cut by a dot, the fourth was an empty message
    and the two after it failed.
    """
    from mailgate.importers.pop3 import importPOP3

    messages = [
        b"Subject: before\r\n\r\nbody\r\n",
        b".first: x\r\n\r\nbody\r\n",
        b"Subject: between\r\n\r\nbody\r\n",
        b".\r\nrest\r\n",
        b"..two\r\n",
        b".\r\n",
        b".no line end",
        b"Subject: after\r\n\r\nbody\r\n",
    ]
    now = int(time.time())
    for n, message in enumerate(messages):
        with open(os.path.join(dovecot.maildir(ALICE), "new", f"{now}.M{n:03d}P1.dots"), "wb") as f:
            f.write(message)
    dovecot.own(dovecot.maildir(ALICE))
    with aliceStore() as store:
        report = importPOP3(store, f"pop3://alice%40example.org@127.0.0.1:{dovecot.pop3Port}", ALICE, PASSWORD)
        assert (report.messages, report.failures) == (len(messages), [])
        session = POP3Session(store)
        session.login(ALICE, PASSWORD)
        for n, message in enumerate(messages, 1):
            # Sized as Dovecot sized it (without the line end it sends
            # after ".no line end", as mailgate does then).
            sent = message if message.endswith(b"\r\n") else message + b"\r\n"
            stuffed = b"".join(b"." + line if line.startswith(b".") else line for line in sent.splitlines(True))
            assert session.command(f"RETR {n}").encode() == b"+OK %d octets\r\n%s.\r\n" % (len(message), stuffed)


#: Messages of a maildir whose Dovecot has pop3_reuse_xuidl = yes (a site
#: that came from a server writing X-UIDL fields, qpopper's mbox): the id
#: Dovecot serves for each, as a client keeps it.
X_UIDL_MESSAGES = [
    (b"X-UIDL: plain1\n\nbody\n", "plain1"),
    (b"X-UIDL:   \tleading2\n\nbody\n", "leading2"),
    (b"x-uidl: lower3\r\n\r\nCRLF body\r\n", "lower3"),
    (b"Subject: s\nX-UIDL : spaced4\nX-UIDL: second\n\nbody\n", "spaced4"),
    # Served as "trailing5   ", and "two words6": clients keep one word.
    (b"X-UIDL: trailing5   \n\nbody\n", "trailing5"),
    (b"X-UIDL: two words6\n\nbody\n", "two"),
    # In the body, or a folded line's continuation: no such field.
    (b"Subject: s\n\nX-UIDL: inbody\n", None),
    (b"Subject: s\n X-UIDL: folded\n\nbody\n", None),
    (b"Subject: no field\n\nbody\n", None),
]


#: The maildrops of the X-UIDL tests' Dovecot (L{reuseXuidlDovecot}), a user
#: of its own for each test: (message, seen) in maildir order, the seen ones
#: in cur/, the others in new/.
X_UIDL_MAILDROPS = {
    # test_aMessagesXUIDLFieldWhereDovecotReusesIt: every other one seen.
    "fields@example.org": [(message, n % 2 == 1) for n, (message, _) in enumerate(X_UIDL_MESSAGES)],
    # test_aFoldedXUIDLFieldDovecotServesOnTwoLines
    "folded@example.org": [
        (b"X-UIDL: folded1\n more\nSubject: s\n\nbody\n", False),
        (b"Subject: no field\n\nbody\n", False),
        (b"X-UIDL: tabbed3\r\n\tmore\r\n\r\nbody\r\n", False),
        (b"X-UIDL: plain4\n\nbody\n", False),
    ],
    # test_aFoldedXUIDLWhoseNextLineBeginsWithANumberIsStillItsFirstLines
    "numbered@example.org": [
        (b"X-UIDL: folded1\n 2 more\nSubject: s\n\nbody\n", False),
        (b"Subject: no field\n\nbody\n", False),
        (b"X-UIDL: tabbed3\r\n\t9 more\r\n\r\nbody\r\n", False),
    ],
}


@pytest.fixture(scope="module")
def reuseXuidlDovecot():
    """
    One Dovecot with pop3_reuse_xuidl = yes for the tests of the X-UIDL
    fields it serves, with L{X_UIDL_MAILDROPS} put in its maildirs before
    it starts: each test reads and imports its own user's, which no other
    test touches.  (Each test started an identical Dovecot of its own.)
    """
    server = PrivateDovecot(extra="pop3_reuse_xuidl = yes")
    try:
        server.addUsers(list(X_UIDL_MAILDROPS), PASSWORD)
        now = int(time.time())
        for user, messages in X_UIDL_MAILDROPS.items():
            for n, (message, seen) in enumerate(messages):
                sub = "cur" if seen else "new"
                name = f"{now - 100 + n}.M{n}P1.host" + (":2,S" if seen else "")
                with open(os.path.join(server.maildir(user), sub, name), "wb") as f:
                    f.write(message)
            server.own(server.maildir(user))
        server.start()
        yield server
    finally:
        server.cleanup()


def test_aMessagesXUIDLFieldWhereDovecotReusesIt(reuseXuidlDovecot, tmp_path):
    """
    Dovecot with pop3_reuse_xuidl = yes serves a message's X-UIDL header
    field as its unique id: import maildir --reuse-xuidl serves the same
    ids (the first word of one with spaces, with a warning), and the
    format's for the messages without one.  Before, every such message
    got the format's id, and leave-on-server clients downloaded it again.
    """
    server = reuseXuidlDovecot
    uidl, listing, _ = servedBy(server, "fields@example.org")
    assert server.errorsLogged() == []
    files = server.copyMaildir("fields@example.org", tmp_path / "Maildir")
    kept = [" ".join(line.split()[:2]) for line in uidl]
    assert [line.split()[1] for line in kept] == [
        expected or line.split()[1] for line, (_, expected) in zip(kept, X_UIDL_MESSAGES)
    ]
    database = newDatabase(tmp_path, "target.sqlite3")
    code, out, err = mailgateHere(database, "import", "maildir", files, ALICE, "--reuse-xuidl")
    assert code == 0, (out, err)
    assert out.startswith(f"{len(X_UIDL_MESSAGES)} messages imported (")
    assert [line.split(": ", 2)[2] for line in err.splitlines()] == [
        "unique id 'trailing5   ' has a space; imported as 'trailing5', its first word, which clients keep",
        "unique id 'two words6' has a space; imported as 'two', its first word, which clients keep",
    ]
    assert servedFrom(database) == (kept, listing)


def test_aFoldedXUIDLFieldDovecotServesOnTwoLines(reuseXuidlDovecot, tmp_path):
    """
    Dovecot with pop3_reuse_xuidl = yes serves a folded X-UIDL field as it
    is, its line break in the UIDL listing ("1 folded", then " more"):
    clients read the listing line by line, the id being the first line's.
    import pop3 takes that listing so, as import maildir --reuse-xuidl
    reads the field, and both serve the ids and sizes clients saw.
    (Before, import pop3 refused the user's whole listing as malformed,
    exit 65, nothing imported, the same on every run.)
    """
    from mailgate.importers.pop3 import importPOP3

    server = reuseXuidlDovecot
    uidl, listing, _ = servedBy(server, "folded@example.org")
    assert [line.split()[1] for line in uidl if line[0].isdigit()] == [
        "folded1", uidl[2].split()[1], "tabbed3", "plain4",
    ]
    assert len(uidl) == 6
    kept = [line for line in uidl if line[0].isdigit()]
    with aliceStore() as store:
        report = importPOP3(store, f"pop3://folded%40example.org@127.0.0.1:{server.pop3Port}", ALICE, PASSWORD)
        assert (report.messages, report.failures) == (4, [])
        assert servedByMailgate(store) == (kept, listing)
    assert server.errorsLogged() == []
    files = server.copyMaildir("folded@example.org", tmp_path / "Maildir")
    database = newDatabase(tmp_path, "target.sqlite3")
    code, out, err = mailgateHere(database, "import", "maildir", files, ALICE, "--reuse-xuidl")
    assert (code, err) == (0, ""), out
    assert servedFrom(database) == (kept, listing)


def test_aFoldedXUIDLWhoseNextLineBeginsWithANumberIsStillItsFirstLines(reuseXuidlDovecot):
    """
    Dovecot (pop3_reuse_xuidl = yes) serves a folded X-UIDL field as it is,
    the field's next line in the UIDL listing as a line of its own.  Where
    that line begins with a number after its fold (" 2 more"), it is still
    the rest of the id before it, not message 2's: clients take the first
    line's id, and so does import pop3.  It took it for a listing naming
    message 2 twice and refused the user's whole listing, exit 65, on
    every run (the field is the sender's to write), or, for a number no
    message has (" 9 more"), a message 9 to fetch.
    """
    from mailgate.importers.pop3 import importPOP3

    server = reuseXuidlDovecot
    uidl, listing, _ = servedBy(server, "numbered@example.org")
    # As Dovecot serves it: each field's second line a line of its own.
    assert [line for line in uidl if not line[:1].isdigit()] == [" 2 more", "\t9 more"]
    kept = [line for line in uidl if line[:1].isdigit()]
    assert [line.split()[1] for line in kept][::2] == ["folded1", "tabbed3"]
    with aliceStore() as store:
        report = importPOP3(store, f"pop3://numbered%40example.org@127.0.0.1:{server.pop3Port}", ALICE, PASSWORD)
        assert (report.messages, report.failures) == (3, [])
        assert servedByMailgate(store) == (kept, listing)
    assert server.errorsLogged() == []


def test_messagesPOP3ClientsDeletedWhereDovecotKeptThem(tmp_path):
    """
    Dovecot with pop3_deleted_flag (IMAP and POP3 on one mailbox) keeps
    what a POP3 client deletes, with that keyword, and no longer lists it
    over POP3: import maildir --deleted-flag leaves such messages out
    too.  Before, they were all imported, and the leave-on-server client
    that had deleted them (and forgotten their ids) downloaded them again.
    """
    server = PrivateDovecot(extra="pop3_deleted_flag = POP3Deleted")
    try:
        startWithMail(server, 4)
        client = server.pop3(ALICE, PASSWORD)
        client.dele(2)
        client.dele(4)
        client.quit()
        uidl, listing, _ = servedBy(server, ALICE)
        assert len(uidl) == 2
        assert server.errorsLogged() == []
        files = server.copyMaildir(ALICE, tmp_path / "Maildir")
    finally:
        server.cleanup()
    assert len(os.listdir(os.path.join(files, "cur"))) == 4
    database = newDatabase(tmp_path, "target.sqlite3")
    code, out, err = mailgateHere(database, "import", "maildir", files, ALICE, "--deleted-flag", "pop3deleted")
    assert code == 0, (out, err)
    assert out.startswith("2 messages imported (")
    assert err.endswith(
        "2 of the messages have the keyword pop3deleted (pop3_deleted_flag: deleted by POP3 clients, "
        "no longer listed by Dovecot): not imported\n"
    )
    assert servedFrom(database) == (uidl, listing)


def test_aLaterRunWithMirrorTakesOutWhatTheSourceNoLongerHas(tmp_path):
    """
    Between a first import and the switch, clients go on using Dovecot:
    a leave-on-server client deletes a message there (by its rule, "remove
    from the server after 14 days") and forgets its id once Dovecot no
    longer lists it.  A later run with --mirror takes that message out of
    mailgate too (kept for recovery), from the files and through POP3, so
    that mailgate serves what Dovecot serves, plus the mail delivered to
    mailgate itself.  Before, the message stayed, and the client
    downloaded it again after the switch.
    """
    from mailgate.importers.maildir import importMaildir
    from mailgate.importers.pop3 import importPOP3

    server = PrivateDovecot()
    try:
        startWithMail(server, 3)
        url = f"pop3://alice%40example.org@127.0.0.1:{server.pop3Port}"
        fromFiles = newDatabase(tmp_path, "files.sqlite3")
        fromPOP3 = newDatabase(tmp_path, "pop3.sqlite3")
        firstRuns = {
            fromFiles: lambda store: importMaildir(store, server.maildir(ALICE), ALICE),
            fromPOP3: lambda store: importPOP3(store, url, ALICE, PASSWORD),
        }
        for database, firstRun in firstRuns.items():
            store = memoryStore(database)
            try:
                report = firstRun(store)
                assert (report.messages, report.failures) == (3, [])
                deliver(store, [ALICE], b"Subject: delivered to mailgate\r\n\r\nkept\r\n")
            finally:
                store.close()
        client = server.pop3(ALICE, PASSWORD)
        deleted = (client.uidl(1).split()[2].decode(), int(client.list(1).split()[2]))
        client.dele(1)
        client.quit()
        server.deliver(ALICE, lmtpMessages()[3])
        uidl, listing, _ = servedBy(server, ALICE)

        code, out, err = mailgateHere(fromFiles, "import", "maildir", server.maildir(ALICE), ALICE, "--mirror")
        assert (code, err) == (0, ""), out
        assert out.endswith(", 2 skipped as already present, 1 taken out as gone from the source\n")
        store = memoryStore(fromPOP3)
        try:
            report = importPOP3(store, url, ALICE, PASSWORD, mirror=True)
            assert (report.messages, report.skipped, report.removed, report.failures) == (1, 2, 1, [])
        finally:
            store.close()
        assert server.errorsLogged() == []
    finally:
        server.cleanup()
    for database in (fromFiles, fromPOP3):
        store = memoryStore(database)
        try:
            served = [[line.split()[1] for line in lines] for lines in servedByMailgate(store)]
            # Dovecot's, the one delivered to mailgate among them, in the
            # order they came.
            assert [lines[:2] + lines[3:] for lines in served] == [
                [line.split()[1] for line in lines] for lines in (uidl, listing)
            ]
            kept = resultOf(store.listDeleted(ALICE))
            assert [(m.uniqueId, m.size, m.deletedBy) for m in kept] == [(*deleted, "import")]
        finally:
            store.close()


@pytest.mark.parametrize("last", ["4 :{name}", "4 W12"])
def test_uidListLinesAsDovecotReadsThem(tmp_path, last):
    """
    Dovecot reads dovecot-uidlist by lines ended with LF only: a file
    name may hold U+2028 (which Python's splitlines also splits at), and
    a last line without its LF (an append Dovecot has not finished, or
    never did) is not read, its message numbered as a new one (after the
    header's next uid).  import maildir reads it alike: before, such a
    last line gave its message the uid in it (another unique id than
    Dovecot's), or refused the whole maildir ("no file name"), and the
    U+2028 name refused it too.
    """
    from mailgate.importers.maildir import importMaildir

    server = PrivateDovecot()
    try:
        server.addUsers([ALICE], PASSWORD)
        now = int(time.time())
        names = [f"{now - 10 + n}.M{n}P1.host" for n in range(4)]
        names[1] += ".line\u2028separator"
        for n, name in enumerate(names):
            with open(os.path.join(server.maildir(ALICE), "cur", name + ":2,S"), "wb") as f:
                f.write(b"Subject: %d\n\nbody\n" % n)
        lines = ["3 V1234 N10 G0123456789abcdef0123456789abcdef"] + [f"{n + 1} :{names[n]}" for n in range(3)]
        with open(os.path.join(server.maildir(ALICE), "dovecot-uidlist"), "wb") as f:
            f.write("\n".join(lines + [last.format(name=names[3])]).encode())
        server.own(server.maildir(ALICE))
        files = server.copyMaildir(ALICE, tmp_path / "Maildir")
        server.start()
        uidl, listing, _ = servedBy(server, ALICE)
        assert server.errorsLogged() == []
    finally:
        server.cleanup()
    assert [line.split()[1] for line in uidl] == ["00000001000004d2", "00000002000004d2", "00000003000004d2",
                                                 "0000000a000004d2"]
    with aliceStore() as store:
        report = importMaildir(store, files, ALICE)
        assert (report.messages, report.failures) == (4, [])
        assert servedByMailgate(store) == (uidl, listing)


def test_importThroughDovecotsTLS(tmp_path, monkeypatch):
    """
    import pop3 from a Dovecot with TLS: through STLS on its POP3 port and
    on its POP3S port, the certificate verified (the test's own, trusted
    through SSL_CERT_FILE), serving what Dovecot served.
    """
    from certs import makeCertificate

    from mailgate.importers.pop3 import importPOP3

    certificate, key = makeCertificate(tmp_path, "localhost")
    server = PrivateDovecot()
    server.tls = (str(certificate), str(key))
    try:
        startWithMail(server, 3)
        uidl, listing, _ = servedBy(server, ALICE)
        monkeypatch.setenv("SSL_CERT_FILE", str(certificate))
        for url in (f"pop3://alice%40example.org@localhost:{server.pop3Port}",
                    f"pop3s://alice%40example.org@localhost:{server.pop3sPort}"):
            with aliceStore() as store:
                report = importPOP3(store, url, ALICE, PASSWORD)
                assert (report.messages, report.failures) == (3, []), url
                assert servedByMailgate(store) == (uidl, listing)
        assert server.errorsLogged() == []
        logins = [line for line in server.log().splitlines() if "Login: user=<alice@example.org>" in line]
        # poplib's in the clear, then the two imports' over TLS.
        assert [", TLS" in line for line in logins] == [False, True, True], logins
    finally:
        server.cleanup()


def test_importFromADovecotThatTakesAPOPOnly(tmp_path):
    """
    A Dovecot whose auth_mechanisms has APOP only (sites that kept
    passwords off the wire without TLS) answers PASS "-ERR [AUTH]
    Unsupported authentication mechanism." for the right password and a
    wrong one alike: import pop3 logs in with APOP, with the greeting's
    timestamp, and serves what Dovecot served.  (Before: exit 69, the
    refusal of PASS, nothing imported.)  A wrong password is refused,
    by APOP too.
    """
    import poplib

    server = PrivateDovecot(extra="auth_mechanisms = apop")
    try:
        startWithMail(server, 3)
        client = poplib.POP3("127.0.0.1", server.pop3Port, timeout=DEADLINE)
        client.apop(ALICE, PASSWORD)
        try:
            uidl, listing, _ = answers(client)
        finally:
            client.quit()
        url = f"pop3://alice%40example.org@127.0.0.1:{server.pop3Port}"
        database = newDatabase(tmp_path, "target.sqlite3")
        code, out, err = cli(database, "import", "pop3", url, ALICE, "--password-stdin", input=b"not hers\n")
        assert code == 69 and out == "", (out, err)
        assert err.count("Authentication failed") + err.count("Unsupported authentication mechanism") == 2, err
        password = PASSWORD.encode() + b"\n"
        code, out, err = cli(database, "import", "pop3", url, ALICE, "--password-stdin", input=password)
        assert (code, err) == (0, ""), out
        assert out.startswith("3 messages imported (")
        assert server.errorsLogged() == []
    finally:
        server.cleanup()
    assert servedFrom(database) == (uidl, listing)


def test_importFromADovecotThatTakesCramMD5Only(tmp_path):
    """
    A Dovecot whose auth_mechanisms has CRAM-MD5 only (no PLAIN, no APOP:
    passwords kept off the wire without TLS) refuses PASS as it does with
    APOP only, and has no APOP timestamp: import pop3 logs in with AUTH
    CRAM-MD5, which its CAPA offers, and serves what Dovecot served.
    (Before: exit 69, the refusal of PASS, nothing imported.)  A wrong
    password is refused, by CRAM-MD5 too.
    """
    import base64
    import poplib

    from saslclients import cramMD5Response

    server = PrivateDovecot(extra="auth_mechanisms = cram-md5")
    try:
        startWithMail(server, 3)
        client = poplib.POP3("127.0.0.1", server.pop3Port, timeout=DEADLINE)
        challenge = base64.b64decode(client._shortcmd("AUTH CRAM-MD5")[2:])
        client._shortcmd(base64.b64encode(cramMD5Response(ALICE, PASSWORD, challenge)).decode())
        try:
            uidl, listing, _ = answers(client)
        finally:
            client.quit()
        url = f"pop3://alice%40example.org@127.0.0.1:{server.pop3Port}"
        database = newDatabase(tmp_path, "target.sqlite3")
        code, out, err = cli(database, "import", "pop3", url, ALICE, "--password-stdin", input=b"not hers\n")
        assert code == 69 and out == "", (out, err)
        assert "Unsupported authentication mechanism.; 127.0.0.1 refused AUTH CRAM-MD5: -ERR [AUTH]" in err, err
        password = PASSWORD.encode() + b"\n"
        code, out, err = cli(database, "import", "pop3", url, ALICE, "--password-stdin", input=password)
        assert (code, err) == (0, ""), out
        assert out.startswith("3 messages imported (")
        assert server.errorsLogged() == []
    finally:
        server.cleanup()
    assert servedFrom(database) == (uidl, listing)


def test_aFileNameWithASpaceServedAsTheId(tmp_path):
    """
    Dovecot with pop3_uidl_format = %f serves a file name with a space in
    it as it is; clients keep its first word, as import pop3 does.  import
    maildir imports the message under that word too (with a warning):
    before, it refused it (exit 65), and the message did not move.
    """
    from mailgate.importers.maildir import importMaildir
    from mailgate.importers.pop3 import importPOP3

    server = PrivateDovecot(uidlFormat="%f")
    try:
        server.addUsers([ALICE], PASSWORD)
        now = int(time.time())
        for n, name in enumerate([f"{now - 10}.M1P1.host name", f"{now - 9}.M2P1.host"]):
            with open(os.path.join(server.maildir(ALICE), "new", name), "wb") as f:
                f.write(b"Subject: %d\n\nbody\n" % n)
        server.own(server.maildir(ALICE))
        files = server.copyMaildir(ALICE, tmp_path / "Maildir")
        server.start()
        uidl, listing, _ = servedBy(server, ALICE)
        assert uidl[0] == f"1 {now - 10}.M1P1.host name"
        kept = [" ".join(line.split()[:2]) for line in uidl]
        for how in (
            lambda store, warn: importMaildir(store, files, ALICE, progress=warn),
            lambda store, warn: importPOP3(
                store, f"pop3://alice%40example.org@127.0.0.1:{server.pop3Port}", ALICE, PASSWORD, warn=warn,
            ),
        ):
            with aliceStore() as store:
                warnings = []
                report = how(store, warnings.append)
                assert (report.messages, report.failures) == (2, [])
                assert servedByMailgate(store) == (kept, listing)
                assert [w.split(": ", 1)[1] for w in warnings if "has a space" in w] == [
                    f"unique id '{now - 10}.M1P1.host name' has a space; imported as '{now - 10}.M1P1.host', "
                    f"its first word, which clients keep"
                ]
        assert server.errorsLogged() == []
    finally:
        server.cleanup()


def test_compressedMessagesAsDovecotServesThem(tmp_path):
    """
    Dovecot with its zlib plugin (zlib_save = gz) stores what its LMTP
    delivers as gzip files, and files dropped in as bzip2 and xz it
    serves decompressed too (it tells them by their first octets, not
    their names): import maildir serves the very UIDL, LIST and RETR
    Dovecot served.  (Before, the compressed octets were imported as the
    messages.)
    """
    import bz2
    import lzma

    from mailgate.importers.maildir import importMaildir

    server = PrivateDovecot(extra="mail_plugins = $mail_plugins zlib\nplugin {\n  zlib_save = gz\n}\n")
    try:
        startWithMail(server, 5)
        now = int(time.time())
        dropped = [
            (f"{now}.M1P1.host", bz2.compress(b"Subject: bzip2\n\n.\nbody\n")),
            (f"{now}.M2P1.host", lzma.compress(b"Subject: xz\n\nbody\n")),
        ]
        maildir = server.maildir(ALICE)
        for name, data in dropped:
            with open(os.path.join(maildir, "new", name), "wb") as f:
                f.write(data)
        server.own(maildir)
        files = server.copyMaildir(ALICE, tmp_path / "Maildir")
        delivered = [name for name in os.listdir(os.path.join(files, "new")) if "host" not in name]
        assert len(delivered) == 5
        for name in delivered:
            with open(os.path.join(files, "new", name), "rb") as f:
                assert f.read(2) == b"\x1f\x8b", name
        uidl, listing, messages = servedBy(server, ALICE)
        assert len(uidl) == 7
        assert server.errorsLogged() == []
    finally:
        server.cleanup()
    with aliceStore() as store:
        said = []
        report = importMaildir(store, files, ALICE, progress=said.append)
        assert (report.messages, report.failures) == (7, [])
        # The S= and W= Dovecot wrote in the names are the decompressed
        # message's: nothing said of them.
        assert [line for line in said if "sizes in its name" in line] == []
        session = POP3Session(store)
        assert session.login(ALICE, PASSWORD).startswith("+OK")
        for number, served in enumerate(messages, 1):
            reply = session.send(b"RETR %d\r\n" % number)
            assert reply.startswith(b"+OK")
            body = reply.split(b"\r\n", 1)[1]
            assert body.endswith(b"\r\n.\r\n")
            lines = body[: -len(b"\r\n.\r\n")].split(b"\r\n")
            assert b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines) == served
        session.command("QUIT")
        assert servedByMailgate(store) == (uidl, listing)


#: Message files that begin with the octets Dovecot tells compressed
#: data by: binary junk behind gzip's two, a header-less message beginning
#: with bzip2's ten, a real gzip file, and one cut short.
LOOKALIKES = [
    ("M1P1.gz-lookalike", b"\x1f\x8bnot gzip at all\nSubject: x\n\nbody\n"),
    ("M2P1.bz2-lookalike", b"BZh91AY&SY is how this header-less message begins\n\nbody\n"),
    ("M3P1.gzip", gzip.compress(b"Subject: gzip\n\nbody\n")),
    ("M4P1.gzip-cut-short", gzip.compress(b"Subject: cut\n\n" + b"line\n" * 200)[:-30]),
]


def dropLookalikes(server, names):
    """
    Put the L{LOOKALIKES} C{names} into ALICE's new/ on C{server}, and
    return the paths of their copies in the maildir copy the caller makes.
    """
    now = int(time.time())
    maildir = server.maildir(ALICE)
    dropped = []
    for name, data in LOOKALIKES:
        if name in names:
            with open(os.path.join(maildir, "new", f"{now}.{name}"), "wb") as f:
                f.write(data)
            dropped.append(f"{now}.{name}")
    server.own(maildir)
    return dropped


@sqliteOnly
def test_filesThatBeginLikeCompressedDataAsEachDovecotServesThem(mailgate_server, tmp_path):
    """
    Files that begin with the octets Dovecot tells compressed data by.  A
    Dovecot without its zlib plugin serves each as it is stored, a real
    gzip file too: import maildir --decompress=never serves the very
    UIDL, LIST and RETR.  A Dovecot with the plugin cannot read the ones
    that are no compressed data, and then serves nothing of the INBOX
    (its POP3 answers -ERR [SYS/TEMP] right after the login, "Couldn't
    init INBOX" in its log): the default import refuses just those, by
    name, naming --decompress=never, and imports the others (exit 65).
    (Before: "damaged gz data", and no way to import them.)
    """
    import poplib

    server = PrivateDovecot()
    try:
        startWithMail(server, 2)
        dropLookalikes(server, [name for name, _ in LOOKALIKES])
        files = server.copyMaildir(ALICE, tmp_path / "Maildir")
        expected = servedBy(server, ALICE)
        assert len(expected[0]) == 6
        assert expected[2][2:] == [data.replace(b"\n", b"\r\n").rstrip(b"\r\n") for _, data in LOOKALIKES]
        assert server.errorsLogged() == []
    finally:
        server.cleanup()
    database = newDatabase(tmp_path, "plain.sqlite3")
    code, out, err = cli(database, "import", "maildir", "--decompress=never", files, ALICE)
    assert code == 0, (out, err)
    assert out.startswith("6 messages imported (")
    assert "4 files beginning like compressed data (bz2, gz; the first " in err
    assert mailgateAnswers(mailgate_server(database=database).port) == expected

    server = PrivateDovecot(extra="mail_plugins = $mail_plugins zlib\n")
    try:
        startWithMail(server, 1)
        lookalikes = dropLookalikes(server, ["M1P1.gz-lookalike", "M2P1.bz2-lookalike", "M3P1.gzip"])[:2]
        files = server.copyMaildir(ALICE, tmp_path / "zlib")
        client = server.pop3(ALICE, PASSWORD)
        with pytest.raises(poplib.error_proto, match=r"-ERR \[SYS/TEMP\]"):
            client.uidl()
        client.close()
        # Dovecot's log process writes it a moment later.
        deadline = time.monotonic() + DEADLINE
        while not any("Couldn't init INBOX" in line for line in server.errorsLogged()):
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.05)
    finally:
        server.cleanup()
    database = newDatabase(tmp_path, "zlib.sqlite3")
    code, out, err = cli(database, "import", "maildir", files, ALICE)
    assert code == 65, (out, err)
    assert out.startswith("2 messages imported (")
    refusals = [line for line in err.splitlines() if "starts like" in line]
    assert [line.split(": ", 2)[1].rsplit("/", 1)[1] for line in refusals] == lookalikes
    for line, kind in zip(refusals, ["gz", "bz2"]):
        assert f"starts like {kind} data but is not valid {kind} data (" in line
        assert line.endswith("if Dovecot served this maildir without that plugin (each file as it is stored), "
                             "import it with --decompress=never")


def test_anSdboxIsRefusedAndTheWayTheRefusalGivesServesDovecotsIds(tmp_path):
    """
    A real Dovecot's sdbox given to import maildir: refused (exit 65),
    saying it is an sdbox and what to do; and what it says to do, doveadm
    backup into a maildir, keeps the uids and uidvalidity, so that the
    import of that maildir serves the ids Dovecot served from the sdbox.
    """
    import io
    import shutil

    from mailgate.cli import run

    server = PrivateDovecot(extra="mail_location = sdbox:~/sdbox")
    try:
        startWithMail(server, 3)
        uidl, listing, _ = servedBy(server, ALICE)
        database = newDatabase(tmp_path, "target.sqlite3")
        sdbox = os.path.join(server.home(ALICE), "sdbox")
        out, err = io.StringIO(), io.StringIO()
        code = run(["--database", database, "import", "maildir", sdbox, ALICE], stdout=out, stderr=err, environ={})
        assert code == 65, (out.getvalue(), err.getvalue())
        assert err.getvalue().startswith(f"mailgate: {sdbox} is an sdbox (Dovecot's single-dbox format")
        advice = "doveadm backup -u USER maildir:/PATH/Maildir:LAYOUT=fs"
        assert advice in err.getvalue()
        # Where the mail account (doveadm runs as it) may write.
        backedUp = os.path.join(server.home(ALICE), "Converted")
        backup = subprocess.run(
            ["doveadm", "-c", server.configPath, "backup", "-u", ALICE, f"maildir:{backedUp}:LAYOUT=fs"],
            capture_output=True, text=True, timeout=DEADLINE,
        )
        assert backup.returncode == 0, backup.stderr
        converted = str(tmp_path / "Maildir")
        shutil.copytree(backedUp, converted)
        assert server.errorsLogged() == []
    finally:
        server.cleanup()
    out, err = io.StringIO(), io.StringIO()
    code = run(["--database", database, "import", "maildir", converted, ALICE], stdout=out, stderr=err, environ={})
    assert (code, err.getvalue()) == (0, ""), out.getvalue()
    assert servedFrom(database) == (uidl, listing)


def test_messagesDovecotNumbersWhileTheMaildirIsListedGetItsUids(tmp_path, monkeypatch):
    """
    An import of a maildir a live Dovecot serves: while the import lists
    it, Dovecot numbers a message a client then deletes (its uid used up,
    dovecot-uidlist rewritten) and another arrives, unnumbered.  The
    import numbers that one as Dovecot does next, after the uid used up,
    so that the id mailgate serves for it is Dovecot's: it reads the
    list again after the listing, and lists again while the list changed.
    (Before, the list read before the listing gave it the used-up uid: a
    leave-on-server client would have downloaded it again after the
    switch.)
    """
    from mailgate.importers import maildir as module

    server = PrivateDovecot()
    try:
        startWithMail(server, 2)
        client = server.pop3(ALICE, PASSWORD)
        client.quit()  # Dovecot numbers the two (uids 1 and 2)
        listing = module.listMaildir
        calls = []

        def meanwhile(directory, uidList=None):
            if not calls:
                server.deliver(ALICE, b"Subject: deleted at once\r\n\r\nbody\r\n")
                client = server.pop3(ALICE, PASSWORD)
                client.dele(3)
                client.quit()
                name = f"{int(time.time())}.M1P1.dropped"
                with open(os.path.join(server.maildir(ALICE), "new", name), "wb") as f:
                    f.write(b"Subject: arrived meanwhile\n\nbody\n")
                server.own(server.maildir(ALICE))
            calls.append(max(record.uid for record in uidList.records.values()))
            return listing(directory, uidList)

        monkeypatch.setattr(module, "listMaildir", meanwhile)
        with aliceStore() as store:
            report = module.importMaildir(store, server.maildir(ALICE), ALICE)
            assert (report.messages, report.failures) == (3, [])
            assert calls == [2, 3]
            uidl, listed, _ = servedBy(server, ALICE)
            assert uidl[2].startswith("3 00000004")
            assert servedByMailgate(store) == (uidl, listed)
        assert server.errorsLogged() == []
    finally:
        server.cleanup()


def test_theUidOfAnExpungedMessageIsNotGivenAgain(tmp_path):
    """
    Dovecot keeps an expunged message's record in dovecot-uidlist (until
    it rewrites it), and its header's next uid stays behind the records
    it appends: a file it has not numbered yet gets the uid after every
    record, files or not.  So does the import (before, the uid after the
    last file's: the expunged message's, another id than Dovecot's).
    """
    from mailgate.importers.maildir import importMaildir

    server = PrivateDovecot()
    try:
        startWithMail(server, 3)
        client = server.pop3(ALICE, PASSWORD)
        client.dele(3)
        client.quit()
        with open(os.path.join(server.maildir(ALICE), "dovecot-uidlist")) as f:
            assert f.read().splitlines()[-1].startswith("3 ")  # the expunged message's record
        with open(os.path.join(server.maildir(ALICE), "new", f"{int(time.time())}.M1P1.dropped"), "wb") as f:
            f.write(b"Subject: not numbered yet\n\nbody\n")
        server.own(server.maildir(ALICE))
        files = server.copyMaildir(ALICE, tmp_path / "Maildir")
        uidl, listing, _ = servedBy(server, ALICE)
        assert uidl[2].startswith("3 00000004")
        assert server.errorsLogged() == []
    finally:
        server.cleanup()
    with aliceStore() as store:
        assert importMaildir(store, files, ALICE).messages == 3
        assert servedByMailgate(store) == (uidl, listing)
