"""
A full disk, and a filesystem turned read-only, under a real server: the
most common storage incident of a mail server, made for real on a small
tmpfs (or a loop-mounted ext4 image) that holds the SQLite database, the
way Postfix and Dovecot are expected to take it.

What the clients must see: SMTP and LMTP DATA answered C{452 4.3.1} (RFC
3463's "mail system full"), never a 250 for mail that is not stored,
never a traceback; POP3 logins and RETR working (reads need no room); a
DELE+QUIT that cannot commit answered -ERR with every message kept;
C{mailgate deliver} exiting C{EX_TEMPFAIL} (75) so the MTA defers; an
import stopping with a clear message, resumable.  What the administrator
must see: one log event when writes start failing (not one per client:
the log may be on the full disk), a health check and a metric an alert
can use, and everything working again once there is room, without a
restart.

Mounting needs root: without it those tests skip.  Every mount is
unmounted when its test ends, whatever happened (the servers on it are
stopped first).  The tests before them need no mount: SQLite's own
C{max_page_count} makes it answer "database or disk is full" as a full
disk does, and PostgreSQL's class 53 errors are classified as the engine
receives them.
"""

import base64
import contextlib
import errno
import json
import os
import poplib
import secrets
import smtplib
import sqlite3
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from twisted.logger import LogLevel

from e2e import DEADLINE, MAILGATE, AdminCommand, ServerProcess, databaseURL, popLogin, runCommand, waitFor
from mailgate.errors import StorageFull, TemporaryFailure
from mailgate.message import spoolBytes
from mailgate.testing import POP3Session, SMTPSession, addUser, memoryStore, resultOf

needsRoot = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small filesystem needs root")

ALICE = "alice@example.org"
PASSWORD = "wonderland"
SENDER = "sender@remote.test"
FILLER = "filler"
# More than an SQLite write-ahead log reuses of what it already holds: a
# message this size needs new room on the disk.
LARGE = b"Subject: large\r\n\r\n" + (b"x" * 78 + b"\r\n") * 2000


def _run(argv):
    return subprocess.run(argv, capture_output=True, text=True, timeout=DEADLINE)


@contextlib.contextmanager
def mounted(argv, where):
    """
    Mount with C{argv} (C{mount ... where}) for the block, and unmount
    C{where} after it, whatever happened (lazily if something still holds
    it, so the test run never leaves a mount behind).
    """
    where.mkdir(exist_ok=True)
    done = _run([*argv, str(where)])
    if done.returncode != 0:
        pytest.skip(f"cannot mount here: {done.stderr.strip()}")
    try:
        yield where
    finally:
        if _run(["umount", str(where)]).returncode != 0:
            _run(["umount", "-l", str(where)])


def smallTmpfs(where, size="4m"):
    return mounted(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs"], where)


def fill(directory):
    """
    Fill the filesystem of C{directory} with a file of zeros until it has
    no room left; return the file's path.  Bounded: a tmpfs of a few
    megabytes fills in a few hundred writes.
    """
    path = os.path.join(directory, FILLER)
    block = b"\0" * 4096
    with open(path, "wb", buffering=0) as f:
        for _ in range(1 << 16):
            try:
                f.write(block)
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
                return path
    pytest.fail(f"{directory} did not fill up")


@contextlib.contextmanager
def server(database, cwd, *options, env=None):
    """
    A running C{twistd mailgate} with POP3, SMTP, LMTP and metrics
    listeners, stopped when the block ends.
    """
    process = ServerProcess(
        database,
        [
            "--smtp", "tcp:0:interface=127.0.0.1",
            "--lmtp", "tcp:0:interface=127.0.0.1",
            "--metrics", "tcp:0:interface=127.0.0.1",
            "--no-apop",
            *options,
        ],
        cwd=cwd,
        env=env,
    )
    try:
        process.start()
        yield process
    finally:
        process.stop()
        assert "Traceback" not in process.stdout + process.stderr, process.log()


_sent = iter(range(1 << 30))


def send(process, message=None, lmtp=False):
    """
    One message to Alice over SMTP (or LMTP): the reply to its data, as
    C{(code, text)}.  Without C{message}, a small one unlike any other
    (the store takes a retry of the same message as one already stored).
    """
    if message is None:
        message = b"Subject: small %d\r\n\r\nhello\r\n" % next(_sent)
    if lmtp:
        client = smtplib.LMTP("127.0.0.1", process.portOf("LMTP"), timeout=DEADLINE)
    else:
        client = smtplib.SMTP("127.0.0.1", process.portOf("SMTP"), timeout=DEADLINE)
    try:
        client.ehlo("client.test")
        client.mail(SENDER)
        assert client.rcpt(ALICE)[0] == 250
        code, text = client.data(message)
        return code, text.decode()
    except smtplib.SMTPDataError as e:
        return e.smtp_code, e.smtp_error.decode()
    finally:
        client.close()


def get(process, path):
    """
    C{GET path} from the metrics listener: C{(status, body)}.
    """
    url = f"http://127.0.0.1:{process.portOf('METRICS')}{path}"
    try:
        with urllib.request.urlopen(url, timeout=DEADLINE) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def curl(process, path):
    """
    C{GET path} from the metrics listener with curl, the way an operator
    (and HAProxy's C{option httpchk}) asks it: C{(status, body)}.
    """
    url = f"http://127.0.0.1:{process.portOf('METRICS')}{path}"
    done = subprocess.run(
        ["curl", "-sS", "--max-time", str(DEADLINE), "-w", "%{http_code}", url],
        capture_output=True, text=True, timeout=DEADLINE + 5,
    )
    assert done.returncode == 0, done.stderr
    return int(done.stdout[-3:]), done.stdout[:-3]


def writesFailing(process):
    """
    C{mailgate_database_writes_failing} by reason, as scraped.
    """
    values = {}
    for line in get(process, "/metrics")[1].splitlines():
        if line.startswith("mailgate_database_writes_failing{"):
            labels, value = line.rsplit(" ", 1)
            values[labels.split('"')[1]] = float(value)
    return values


def freeOctets(directory):
    found = os.statvfs(directory)
    return found.f_bfree * found.f_frsize


def storedSizes(admin):
    return [octets for _, octets, _ in admin.mailbox(ALICE)]


# -- without a mount -------------------------------------------------------------


def deliverTo(store, message):
    """
    Deliver C{message} to Alice: its unique id.  Its spool is closed at
    once, failed or not (one left to the garbage collector would give its
    memory back in the middle of another test).
    """
    spool = spoolBytes(message)
    try:
        return resultOf(store.deliver([ALICE], spool))[ALICE]
    finally:
        spool.close()


def _pagesLeft(store, pages):
    """
    Let SQLite's database grow by at most C{pages} pages more: past them,
    it answers SQLITE_FULL, as it does on a full disk.
    """
    conn = store.database.connection
    used = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count = {used + pages}")


@pytest.mark.parametrize("lmtp", [False, True])
def test_aDatabaseWithNoRoomAnswers452AndStoresNothing(store, lmtp):
    """
    SQLITE_FULL is L{StorageFull}, and SMTP and LMTP answer it 452 4.3.1
    (insufficient system storage), not 451 4.3.0; nothing is stored.
    """
    addUser(store, ALICE, PASSWORD)
    _pagesLeft(store, 2)
    with pytest.raises(StorageFull):
        deliverTo(store, LARGE)
    session = SMTPSession(store, lmtp=lmtp)
    replies = session.sendMail(SENDER, [ALICE], LARGE + b".\r\n", hello="LHLO client.test" if lmtp else "EHLO client.test")
    final = replies.splitlines()[-1]
    assert final.startswith("452 4.3.1 "), replies
    assert "insufficient system storage" in final
    assert resultOf(store.listMessages(ALICE)) == []


#: SQLite's page size for the database of the I/O error test: small pages
#: make a transaction of a few megabytes write more than the 4062 frames
#: past which the write-ahead log's index (the -shm file) must grow by
#: 32 KiB
SMALL_PAGE = 512
#: free room made at a time while looking for the write that fails: less
#: than the 32 KiB the -shm grows by, so that one attempt finds the log's
#: frames written and the -shm without room to grow
STEP = 16 * 1024


def _storageError(error):
    """
    SQLite's own error under C{error} (a L{TemporaryFailure} made of it),
    or C{None}.
    """
    cause = error.__cause__
    return cause if isinstance(cause, sqlite3.Error) else None


@needsRoot
def test_aDiskIOErrorOnAFullDiskIsStorageFull(tmp_path):
    """
    On a full tmpfs SQLite reports some writes that find no room as
    SQLITE_IOERR ("disk I/O error"), not SQLITE_FULL: here, growing the
    -shm file for a write-ahead log longer than its first index
    (SQLITE_IOERR_SHMSIZE).  A delivery failing so is StorageFull (SMTP's
    452 4.3.1, counted as storage full), as for SQLITE_FULL; the same I/O
    error once the filesystem has room again is a temporary failure only
    (a failing disk), 451.

    The disk is filled, then room given back 16 KiB at a time: every
    attempt that finds no room for the log's frames fails with SQLITE_FULL
    (and its log keeps the room it took), until one writes them all and
    the -shm is what finds no room.
    """
    from mailgate.store.database import _translate

    with smallTmpfs(tmp_path / "disk", size="16m") as where:
        path = where / "mail.sqlite3"
        made = sqlite3.connect(path)
        made.execute(f"PRAGMA page_size = {SMALL_PAGE}")
        made.execute("PRAGMA journal_mode = WAL")
        made.close()
        store = memoryStore(f"sqlite:///{path}")
        try:
            addUser(store, ALICE, PASSWORD)
            assert store.database.connection.execute("PRAGMA page_size").fetchone()[0] == SMALL_PAGE
            # 3 MB that no compression makes smaller: the log's frames
            # for it take at least as much room.
            body = base64.encodebytes(os.urandom(3 * 1024 * 1024 * 3 // 4)).replace(b"\n", b"\r\n")
            message = b"Subject: large\r\n\r\n" + body
            logged = os.path.getsize(f"{path}-wal")
            filler = fill(where)
            size = os.path.getsize(filler)
            # Less room than the frames surely need, then a step at a time
            # (SQLite writes them all, then grows the -shm to index them).
            size -= max(0, len(message) - logged - 256 * 1024)
            error = None
            for _ in range(1000):
                os.truncate(filler, size)
                with pytest.raises(TemporaryFailure) as failed:
                    deliverTo(store, message)
                cause = _storageError(failed.value)
                assert cause is not None, failed.value
                if cause.sqlite_errorcode & 0xFF != 13:  # not SQLITE_FULL
                    error = failed.value
                    break
                assert isinstance(failed.value, StorageFull)
                size -= STEP
            else:
                pytest.fail("no write failed but for SQLITE_FULL")
            cause = _storageError(error)
            assert cause.sqlite_errorname.startswith("SQLITE_IOERR"), cause.sqlite_errorname
            assert "disk I/O error" in str(cause)
            assert isinstance(error, StorageFull), error
            engine = store.database.engine
            assert engine.isStorageFull(cause)
            # SMTP's answer and the metric follow StorageFull (see
            # test_aDatabaseWithNoRoomAnswers452AndStoresNothing and
            # test_aFullDiskRefusesMailWith452AndServesWhatIsStored).
            os.unlink(filler)
            assert not engine.isStorageFull(cause)
            translated = _translate(engine, cause)
            assert isinstance(translated, TemporaryFailure) and not isinstance(translated, StorageFull)
        finally:
            store.close()


def test_onlyADiskFullIsStorageFullOnPostgreSQL():
    """
    PostgreSQL's class 53 (insufficient resources) is temporary, every
    code of it: a client retries.  53100 (disk_full) alone is a full
    storage (452 4.3.1); out of memory or of connection slots is a store
    unavailable for now (451 4.3.0).  Errors as psycopg raises them, given
    to the engine's own classification (a full tablespace is made for
    real in test_aFullTablespaceIsStorageFullOnPostgreSQL).
    """
    psycopg = pytest.importorskip("psycopg")
    from mailgate.store.database import _translate
    from mailgate.store.postgres import PostgresEngine

    engine = PostgresEngine.__new__(PostgresEngine)
    full = _translate(engine, psycopg.errors.DiskFull("could not extend file: No space left on device"))
    assert isinstance(full, StorageFull)
    for error in (psycopg.errors.OutOfMemory, psycopg.errors.TooManyConnections,
                  psycopg.errors.ConfigurationLimitExceeded, psycopg.errors.InsufficientResources):
        translated = _translate(engine, error("no"))
        assert isinstance(translated, TemporaryFailure) and not isinstance(translated, StorageFull), error


def test_aPostgreSQLThatTakesNoWritesIsATemporaryFailure(postgresURL):
    """
    A PostgreSQL server that reads but takes no writes answers 25006
    (read_only_sql_transaction): a standby a node reached before its
    promotion, or a server set default_transaction_read_only while its
    disk is made room on (the usual first aid).  It is a temporary
    failure, as for any database that may take writes again: SMTP answers
    451 4.3.0 and nothing is stored, a POP3 QUIT removes nothing and says
    so; not an internal error.
    """
    store = memoryStore(postgresURL)
    try:
        addUser(store, ALICE, PASSWORD)
        deliverTo(store, b"Subject: before\r\n\r\nx\r\n")
    finally:
        store.close()
    readOnly = memoryStore(_withOption(postgresURL, "-c default_transaction_read_only=on"))
    try:
        with pytest.raises(TemporaryFailure, match="read-only transaction"):
            deliverTo(readOnly, b"Subject: refused\r\n\r\nx\r\n")
        replies = SMTPSession(readOnly).sendMail(SENDER, [ALICE], b"Subject: smtp\r\n\r\nx\r\n.\r\n")
        assert replies.splitlines()[-1].startswith("451 4.3.0 temporary failure storing"), replies
        session = POP3Session(readOnly)
        assert session.login(ALICE, PASSWORD).startswith("+OK")
        assert session.command("DELE 1").startswith("+OK")
        assert session.command("QUIT").startswith("-ERR [SYS/TEMP]")
        assert len(resultOf(readOnly.listMessages(ALICE))) == 1
    finally:
        readOnly.close()


def test_aPostgreSQLThatTakesWritesAgainGetsThemWithoutARestart(postgresURL):
    """
    default_transaction_read_only set on the role (or the database: ALTER
    ... SET, the first aid while room is made on a disk) is what a session
    starts with, and lifting it (RESET) changes nothing for the sessions
    already made.  A write refused so (25006) gives its connection up, so
    the next one reads the setting as it is then.  Before, a node whose
    connections were made meanwhile (after a restart of PostgreSQL, say)
    kept refusing every delivery with 451 once the database took writes
    again, until the node was restarted.
    """
    import psycopg

    from conftest import _requirePostgres
    from mailgate.store import openStore
    from pumped import PumpedReactor

    setup = memoryStore(postgresURL)
    try:
        addUser(setup, ALICE, PASSWORD)
    finally:
        setup.close()
    role = "mgro_" + secrets.token_hex(4)

    def admin(sql):
        with psycopg.connect(_requirePostgres(), autocommit=True) as conn:
            conn.execute(sql)

    admin(f"CREATE ROLE {role} LOGIN SUPERUSER PASSWORD 'pw'")
    reactor = PumpedReactor()
    store = None
    try:
        admin(f"ALTER ROLE {role} SET default_transaction_read_only = on")
        parts = urllib.parse.urlsplit(postgresURL)
        url = urllib.parse.urlunsplit(parts._replace(netloc=f"{role}:pw@{parts.netloc.rpartition('@')[2]}"))
        store = openStore(url, reactor=reactor)
        refused = reactor.wait(store.deliver([ALICE], spoolBytes(b"Subject: refused\r\n\r\nx\r\n")))
        assert refused.check(TemporaryFailure) and "read-only" in str(refused.value)
        admin(f"ALTER ROLE {role} RESET default_transaction_read_only")
        delivered = reactor.wait(store.deliver([ALICE], spoolBytes(b"Subject: taken\r\n\r\nx\r\n")))
        assert list(delivered) == [ALICE]
        assert len(reactor.wait(store.listMessages(ALICE))) == 1
    finally:
        if store is not None:
            reactor.resultOf(store.close())
        admin(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{role}'")
        admin(f"DROP OWNED BY {role}")
        admin(f"DROP ROLE {role}")


# -- on a small filesystem ---------------------------------------------------------


@contextlib.contextmanager
def smallTablespace(base, size="4m"):
    """
    A PostgreSQL tablespace on a tmpfs of C{size} for the block: its name
    and the mount.  The mount point is made outside the test's directory,
    which the server's account may not enter; the tablespace must be empty
    again when the block ends (it is dropped, then the tmpfs unmounted).
    """
    import tempfile

    import psycopg

    with psycopg.connect(base, autocommit=True) as conn:
        dataDirectory = conn.execute("SHOW data_directory").fetchone()[0]
    try:
        account = os.stat(dataDirectory)
    except OSError:
        pytest.skip(f"the PostgreSQL server's data directory {dataDirectory} is not on this machine")
    top = tempfile.mkdtemp(prefix="mailgate-tablespace-")
    try:
        os.chmod(top, 0o711)
        with mounted(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0711", "tmpfs"], Path(top) / "disk") as disk:
            os.chmod(disk, 0o711)
            location = disk / "pg"
            location.mkdir(mode=0o700)
            os.chown(location, account.st_uid, account.st_gid)
            name = "mailgate_test_" + secrets.token_hex(4)
            with psycopg.connect(base, autocommit=True) as conn:
                conn.execute(f"CREATE TABLESPACE {name} LOCATION '{location}'")
            try:
                yield name, disk
            finally:
                with psycopg.connect(base, autocommit=True) as conn:
                    conn.execute(f"DROP TABLESPACE {name}")
    finally:
        with contextlib.suppress(OSError):
            os.rmdir(Path(top) / "disk")
            os.rmdir(top)


def _withOption(url, option):
    """
    C{url} with C{option} (C{-c name=value}) added to its C{options}.
    """
    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.parse_qsl(parts.query)
    options = " ".join([value for key, value in query if key == "options"] + [option])
    query = [(key, value) for key, value in query if key != "options"] + [("options", options)]
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query, quote_via=urllib.parse.quote)))


@needsRoot
def test_aFullTablespaceIsStorageFullOnPostgreSQL(postgresURL):
    """
    A PostgreSQL tablespace (on a small tmpfs) that fills up: the server
    answers SQLSTATE 53100, could not extend file, and mailgate makes it
    L{StorageFull}: SMTP answers 452 4.3.1; nothing is half-stored; with
    room again the same store delivers.
    """
    import psycopg

    schema = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(postgresURL).query))["options"].split("=")[-1]
    base = postgresURL.split("?")[0]
    with smallTablespace(base) as (tablespace, disk):
        store = memoryStore(_withOption(postgresURL, f"-c default_tablespace={tablespace}"))
        try:
            with psycopg.connect(base, autocommit=True) as conn:
                places = conn.execute(
                    "SELECT DISTINCT tablespace FROM pg_tables WHERE schemaname = %s", (schema,)
                ).fetchall()
            assert places == [(tablespace,)]
            addUser(store, ALICE, PASSWORD)
            # Room for a few messages only.
            filler = os.path.join(disk, FILLER)
            with open(filler, "wb") as f:
                f.truncate(0)
            while freeOctets(disk) > 1 << 20:
                with open(filler, "ab") as f:
                    f.write(b"\0" * (256 << 10))
            stored = 0
            for n in range(200):
                try:
                    deliverTo(store, b"Subject: %d\r\n\r\n" % n + os.urandom(60000).hex().encode())
                except StorageFull as e:
                    assert getattr(e.__cause__, "sqlstate", None) == "53100", repr(e.__cause__)
                    assert "No space left on device" in str(e), e
                    break
                stored += 1
            else:
                pytest.fail("the tablespace never filled up")
            assert len(resultOf(store.listMessages(ALICE))) == stored
            session = SMTPSession(store)
            replies = session.sendMail(SENDER, [ALICE], LARGE + b".\r\n")
            assert replies.splitlines()[-1].startswith("452 4.3.1 "), replies
            assert len(resultOf(store.listMessages(ALICE))) == stored

            os.unlink(filler)
            deliverTo(store, b"Subject: room again\r\n\r\nyes\r\n")
            assert len(resultOf(store.listMessages(ALICE))) == stored + 1
        finally:
            store.close()
            # The tablespace is dropped only once empty.
            with psycopg.connect(base, autocommit=True) as conn:
                conn.execute(f"DROP SCHEMA {schema} CASCADE")
                conn.execute(f"CREATE SCHEMA {schema}")


@pytest.fixture
def disk(tmp_path):
    """
    A 4 MB tmpfs holding a database with Alice and two small messages.
    """
    with smallTmpfs(tmp_path / "disk") as where:
        admin = AdminCommand(databaseURL(where / "mail.sqlite3"), cwd=tmp_path)
        admin.addUser(ALICE, PASSWORD)
        for n in range(2):
            admin.deliver(ALICE, b"Subject: before %d\n\nbefore the disk filled\n" % n)
        yield where, admin


@needsRoot
def test_aFullDiskRefusesMailWith452AndServesWhatIsStored(disk, tmp_path):
    """
    While the database's disk is full: SMTP and LMTP answer 452 4.3.1 and
    store nothing, POP3 reads, a QUIT that cannot remove says so and keeps
    everything, the pipe transport's command exits 75; the log says it
    once, the health check and a gauge say it while it lasts; once there is
    room, mail is accepted again by the same process.
    """
    where, admin = disk
    with server(admin.database, tmp_path) as process:
        assert send(process)[0] == 250
        before = storedSizes(admin)
        filler = fill(where)

        for lmtp in (False, True, False):
            code, text = send(process, LARGE, lmtp=lmtp)
            assert (code, text.split()[0]) == (452, "4.3.1"), (lmtp, code, text)
            assert "insufficient system storage" in text
        status, body = get(process, "/healthz")
        assert status == 503 and "full" in body, (status, body)
        assert writesFailing(process) == {"storage_full": 1.0, "other": 0.0}
        # Per backend: the POP3 one keeps the node (logins and RETR work,
        # below), the SMTP and LMTP ones do not (every delivery is 452).
        assert curl(process, "/healthz/pop3") == (200, "ok, but database writes fail (storage full)\n")
        assert curl(process, "/healthz/smtp") == (503, "unavailable: database writes fail (storage full)\n")
        assert get(process, "/healthz/lmtp") == (503, "unavailable: database writes fail (storage full)\n")

        client = popLogin(process, ALICE, PASSWORD)
        try:
            assert len(client.list()[1]) == len(before)
            assert client.retr(1)[0].startswith(b"+OK")
            assert len(client.uidl()[1]) == len(before)
            assert client.dele(1).startswith(b"+OK")
            with pytest.raises(
                poplib.error_proto, match=r"-ERR \[SYS/TEMP\].*none were removed"
            ):
                client.quit()
        finally:
            client.close()

        code, out, err = runCommand([MAILGATE, "--database", admin.database, "deliver", ALICE], b"Subject: pipe\n\nx\n")
        assert code == 75, (code, out, err)
        assert "full" in err and "Traceback" not in err

        # One event for the incident, however many clients met it.
        failing = waitFor(lambda: process.stdout.count("database writes fail"), "the writes_failed event")
        assert failing == 1, process.log()
        assert "(its storage is full)" in process.stdout

        os.unlink(filler)
        assert send(process)[0] == 250
        assert send(process, lmtp=True)[0] == 250
        assert writesFailing(process) == {"storage_full": 0.0, "other": 0.0}
        assert get(process, "/healthz")[0] == 200
        assert curl(process, "/healthz/pop3") == curl(process, "/healthz/smtp") == (200, "ok\n")
        # The line may reach the test (a thread reads the server's output)
        # after the replies above.
        waitFor(lambda: "database writes work again" in process.stdout, "the writes-work-again line")
        client = popLogin(process, ALICE, PASSWORD)
        try:
            client.dele(1)
            assert client.quit().startswith(b"+OK")
        finally:
            client.close()
    # Nothing half-stored: what was there, less the one removed, and the
    # two accepted once there was room.
    assert storedSizes(admin)[: len(before) - 1] == before[1:]
    assert len(storedSizes(admin)) == len(before) - 1 + 2


def _startUntilExit(admin, tmp_path):
    """
    Start a server on the test's database and wait for it to exit (it
    cannot start here): the L{ServerProcess} and its exit status.
    """
    process = ServerProcess(admin.database, ["--no-apop"], cwd=tmp_path)
    process.spawn()
    try:
        return process, process.wait()
    finally:
        process.stop()


@needsRoot
def test_aServerStartingOnAFullDiskStopsWithTempfailInOneLine(disk, tmp_path):
    """
    With no room for SQLite's shared-memory file, the database cannot be
    opened: start-up stops with EX_TEMPFAIL (75, which the systemd unit
    restarts; 78 is never restarted) and one line saying why, no
    traceback; the admin command says to try again.  With room, the same
    database serves.
    """
    where, admin = disk
    filler = fill(where)
    process, status = _startUntilExit(admin, tmp_path)
    output = process.stdout + process.stderr
    assert status == 75, process.log()
    assert "Traceback" not in output and "no space left" in output, process.log()

    code, out, err = admin("mailbox", "list", ALICE)
    assert code == 75 and "no space left" in err, (code, out, err)

    os.unlink(filler)
    with server(admin.database, tmp_path) as process:
        assert send(process)[0] == 250


@needsRoot
def test_anImportOnAFullDiskStopsAndARerunImportsTheRestOnce(disk, tmp_path):
    """
    C{mailgate import maildir} on a full disk stops with EX_TEMPFAIL and
    says to run it again; the rerun imports what is missing and nothing
    twice.
    """
    where, admin = disk
    maildir = tmp_path / "Maildir"
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(parents=True)

    def add(first, count):
        for n in range(first, first + count):
            body = b"Subject: imported %d\n\n" % n + b"y" * 40000 + b"\n"
            (maildir / "cur" / f"{1700000000 + n}.M{n}P1.host:2,S").write_bytes(body)

    add(0, 5)
    admin.check("import", "maildir", str(maildir), ALICE)
    existing = len(admin.mailbox(ALICE))
    add(5, 5)
    # As the import runs beside a server at work, which keeps the files
    # SQLite needs beside the database open.
    with server(admin.database, tmp_path) as process:
        assert send(process)[0] == 250
        filler = fill(where)
        code, out, err = admin("import", "maildir", str(maildir), ALICE)
        assert code == 75, (code, out, err)
        assert "run it again" in err and "storage full" in err and "Traceback" not in err, err

        os.unlink(filler)
        out = admin.check("import", "maildir", str(maildir), ALICE)
        assert "5 messages imported" in out and "5 skipped" in out, out
    assert len(admin.mailbox(ALICE)) == existing + 1 + 5


@needsRoot
def test_aFullTemporaryDirectoryRefusesLargeMailWith452(tmp_path):
    """
    A message too large to keep in memory is spooled to a temporary file
    as it arrives: when the temporary directory is full, the message is
    refused with 452 4.3.1 and nothing is stored; with room again it is
    accepted.
    """
    admin = AdminCommand(databaseURL(tmp_path / "mail.sqlite3"), cwd=tmp_path)
    admin.addUser(ALICE, PASSWORD)
    # Larger than what a spool keeps in memory (1 MB).
    def large(n):
        return b"Subject: spooled %d\r\n\r\n" % n + (b"z" * 78 + b"\r\n") * 20000

    with smallTmpfs(tmp_path / "spool", size="8m") as spool:
        os.chmod(spool, 0o1777)
        with server(admin.database, tmp_path, env={"TMPDIR": str(spool)}) as process:
            # The first spool to spill picks the temporary directory (Python
            # takes the first one it can write to, once).
            assert send(process, large(1))[0] == 250
            # Its spool file is closed once the reply is on its way.
            waitFor(lambda: freeOctets(spool) > 7 << 20, "the first message's spool file to be removed")
            filler = fill(spool)
            code, text = send(process, large(2))
            assert (code, text.split()[0]) == (452, "4.3.1"), (code, text)
            assert len(admin.mailbox(ALICE)) == 1
            os.unlink(filler)
            assert send(process, large(2))[0] == 250
    assert len(admin.mailbox(ALICE)) == 2


def _ext4Image(tmp_path):
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(16 << 20)
    done = _run(["mkfs.ext4", "-q", "-F", str(image)])
    if done.returncode != 0:
        pytest.skip(f"cannot make an ext4 image: {done.stderr.strip()}")
    return image


@needsRoot
def test_aFilesystemTurnedReadOnlyRefusesMailTemporarilyAndServesWhatIsStored(tmp_path):
    """
    An ext4 filesystem remounted read-only after an error (errors=remount-ro,
    the kernel's own answer to a failing disk, made here with ext4's
    trigger_fs_error): mail is refused with a 4xx, POP3 still reads, a QUIT
    that cannot remove says so and keeps everything, the pipe transport's
    command exits 75, the health check says why.
    """
    image = _ext4Image(tmp_path)
    with mounted(["mount", "-o", "loop,errors=remount-ro", str(image)], tmp_path / "disk") as where:
        device = os.path.basename(_run(["findmnt", "-n", "-o", "SOURCE", str(where)]).stdout.strip())
        trigger = f"/sys/fs/ext4/{device}/trigger_fs_error"
        if not os.path.exists(trigger):
            pytest.skip(f"no {trigger} to turn the filesystem read-only with")
        os.chmod(where, 0o700)
        admin = AdminCommand(databaseURL(where / "mail.sqlite3"), cwd=tmp_path)
        admin.addUser(ALICE, PASSWORD)
        admin.deliver(ALICE, b"Subject: before\n\nbefore\n")
        with server(admin.database, tmp_path) as process:
            assert send(process)[0] == 250
            with open(trigger, "w") as f:
                f.write("mailgate test\n")
            assert "emergency_ro" in _run(["findmnt", "-n", "-o", "OPTIONS", str(where)]).stdout or (
                "ro" in _run(["findmnt", "-n", "-o", "OPTIONS", str(where)]).stdout.split(",")
            )
            for lmtp in (False, True):
                code, text = send(process, lmtp=lmtp)
                assert 400 <= code < 500 and text.startswith("4."), (lmtp, code, text)
            client = popLogin(process, ALICE, PASSWORD)
            try:
                assert len(client.list()[1]) == 2
                assert client.retr(2)[0].startswith(b"+OK")
                client.dele(1)
                with pytest.raises(poplib.error_proto, match=r"-ERR \[SYS/TEMP\]"):
                    client.quit()
            finally:
                client.close()
            code, out, err = admin("deliver", ALICE, input=b"Subject: pipe\n\nx\n")
            assert code == 75, (code, out, err)
            status, body = get(process, "/healthz")
            assert status == 503, (status, body)
            assert writesFailing(process)["other"] == 1.0
        # What the server left beside the database is enough to read it.
        assert len(admin.mailbox(ALICE)) == 2


@needsRoot
def test_aDatabaseOnAReadOnlyFilesystemIsNamedAsSuch(disk, tmp_path):
    """
    SQLite cannot open a database without making its C{-shm} file beside
    it, and says only "unable to open database file": on a filesystem
    mounted read-only, an admin command that writes and the server's
    start-up say that it is (EX_CONFIG: it takes an administrator to
    remount it).  A command that only reads reads it (f9a6da9: opened
    read-only, as a snapshot is).
    """
    where, admin = disk
    done = _run(["mount", "-o", "remount,ro", str(where)])
    assert done.returncode == 0, done.stderr
    code, out, err = admin("user", "quota", ALICE, "500M")
    assert code == 78 and "mounted read-only" in err, (code, out, err)
    code, out, err = admin("mailbox", "list", ALICE)
    assert code == 0 and "in use: 2 messages" in out, (code, out, err)
    process, status = _startUntilExit(admin, tmp_path)
    assert status == 78 and "Read-only file system" in process.stdout + process.stderr, process.log()
    assert "Traceback" not in process.stdout + process.stderr, process.log()


@needsRoot
@pytest.mark.parametrize("logFormat", ["text", "json"])
def test_linesTheLogsFullDiskTookNotAreCountedOnceThereIsRoom(tmp_path, logFormat):
    """
    The log's own filesystem full: a line that cannot be written is lost
    without an exception (the server serves on), and the first line that
    can be written again comes after one, in the log's format, saying how
    many were lost and why; a line the disk cut short is ended first.
    Reopening the file (SIGHUP, logrotate) works on the full disk too: it
    said "log file not reopened, still writing to the old one: No space
    left on device" while the new file was already in use (the old one's
    buffer failed to flush as it was closed).
    """
    from mailgate.logs import LogStream, observerFor

    with smallTmpfs(tmp_path / "logdisk", size="64k") as where:
        path = where / "mailgate.log"
        stream = LogStream(path=str(path))
        observer = observerFor(logFormat, stream)

        def line(text):
            observer({"log_format": "{line}", "line": text, "log_level": LogLevel.info,
                      "log_namespace": "test", "log_time": time.time()})

        line("before")
        filler = fill(where)
        for n in range(3):
            line(f"lost {n} " + "x" * 5000)
        assert stream.reopen()
        line("lost 3")
        os.unlink(filler)
        line("after")
        stream.close()

        lines = path.read_text().splitlines()
    if logFormat == "json":
        # A line cut short is no JSON: the whole ones are.
        records = [json.loads(text) for text in lines if text.endswith("}")]
        assert [r["text"] for r in records] == ["before", records[1]["text"], "after"], lines
        assert records[1]["event"] == "log.lines_lost" and records[1]["level"] == "warn", records
        assert records[1]["lost"] == 4 and records[1]["error"] == "No space left on device", records
        assert all(text.startswith('{"time"') for text in lines), lines
    else:
        assert lines[0].endswith(" before"), lines
        assert lines[-1].endswith(" after"), lines
        assert lines[-2].endswith(f"4 log lines lost, not written to {path}: No space left on device"), lines
        # Nothing but (at most) the start of the first line lost between.
        assert all(" lost 0 " in text for text in lines[1:-2]), lines
