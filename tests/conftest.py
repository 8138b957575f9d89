"""
Shared fixtures: real databases, and a real TCP connection.

  - C{store}: a synchronous store on a SQLite file in a temporary directory.
  - C{databaseURL}: the URL of an empty database, once for SQLite and once
    for PostgreSQL; tests that use it run on both backends.
  - C{postgresURL}: an empty PostgreSQL database only.
  - C{tcpConnection}: Twisted's own server-side TCP transport around one
    end of a loopback connection, and the client's socket.

PostgreSQL comes from C{MAILGATE_TEST_POSTGRES}, which C{make test} sets
(see tests/pgserver.py).  Each test gets a schema of its own, dropped
afterwards.  Without the variable the PostgreSQL tests skip, saying why,
only on a machine with no PostgreSQL server binaries; where the binaries
exist they fail instead, so a broken set-up cannot pass unnoticed.
"""

import glob
import os
import secrets
import shutil
import socket
import sys
from urllib.parse import quote

import attr
import hypothesis
import pytest
from twisted.internet import tcp
from twisted.internet.protocol import Protocol

from mailgate.testing import memoryStore

POSTGRES = os.environ.get("MAILGATE_TEST_POSTGRES")

# pytest keeps the test modules it rewrote for its assertion messages in
# tests/__pycache__ (checked against each file's time and size), unless
# bytecode is not to be written: under PYTHONDONTWRITEBYTECODE every one of
# make test's collections (the serial phase's and each parallel worker's)
# rewrote the 10,000 asserts of every module again, 14 of a collection's 17
# CPU-s.  Written, the serial phase's collection serves the workers'.  Only
# this process: the servers and commands the tests start keep the setting.
sys.dont_write_bytecode = False

# No time limit on a Hypothesis example: by default one that takes over
# 250 ms fails the test ("Unreliable test timings"), which on a loaded CI
# machine a descheduled process can reach with any example.  What the
# examples assert is unchanged, and their number bounds the time.
hypothesis.settings.register_profile(
    "mailgate", deadline=None, suppress_health_check=[hypothesis.HealthCheck.too_slow]
)
hypothesis.settings.load_profile("mailgate")

# The admin command's audit lines (mailgate.cli.audit) never reach the
# host's syslog from a test: turned off for the commands tests spawn, and
# with nowhere to go for those run in this process, which are given an
# environment of their own (tests/test_cli_audit.py gives its commands a
# /dev/log of the test's).
os.environ["MAILGATE_AUDIT"] = "off"


@pytest.fixture(autouse=True)
def noAuditLinesToTheHostsSyslog(monkeypatch):
    monkeypatch.setattr("mailgate.cli.audit.SYSLOG_SOCKET", "/nonexistent/mailgate-tests/dev-log")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """
    Under C{make test}'s parallel workers (pytest-xdist, C{--dist
    loadgroup}), the tests of a module that use one of its module-scoped
    fixtures (a private Dovecot, an editable install, imports waiting out
    a lock) go to one worker, which sets the fixture up once, rather than
    once on every worker that gets some of them.  Without xdist the mark
    means nothing.  First among the hooks: xdist's worker reads the marks
    in a hook of its own, which must run after this one (see
    L{pytest_collection_finish} for the check that it grouped them).
    """
    for item in items:
        fixtureInfo = getattr(item, "_fixtureinfo", None)
        if fixtureInfo is None or getattr(item, "module", None) is None:
            continue
        for definitions in fixtureInfo.name2fixturedefs.values():
            if definitions and definitions[-1].scope == "module":
                item.add_marker(pytest.mark.xdist_group(item.module.__name__))
                break


#: Why this worker's grouped tests fail (see pytest_collection_finish); empty if they may run.
_UNGROUPED = []


def pytest_collection_finish(session):
    """
    On a worker of C{--dist loadgroup}, every test marked xdist_group must
    carry its group in its node id, which is what xdist's scheduler
    groups by (xdist's worker adds it, after the hook above).  With
    pytest 9.2 and pytest-xdist 3.8 it does not (pytest keeps the node id
    elsewhere than where xdist writes it): the tests sharing a costly
    module fixture were spread over the workers, each setting it up
    (13 s each for test_dovecot_migration's), while the suite passed.
    Here they fail instead, saying so (the Makefile installs a pytest
    below 9.2).
    """
    config = session.config
    if not hasattr(config, "workerinput") or not config.getvalue("loadgroup"):
        return
    for item in session.items:
        if item.get_closest_marker("xdist_group") is not None and "@" not in item.nodeid:
            _UNGROUPED.append(
                f"pytest-xdist's --dist loadgroup did not group {item.nodeid} (pytest "
                f"{pytest.__version__}: the group is not in the node id): use the pytest the Makefile installs"
            )
            return


def pytest_runtest_setup(item):
    if _UNGROUPED and item.get_closest_marker("xdist_group") is not None:
        pytest.fail(_UNGROUPED[0], pytrace=False)


def _postgresBinariesPresent():
    return bool(glob.glob("/usr/lib/postgresql/*/bin/postgres") or shutil.which("postgres"))


def _requirePostgres():
    if POSTGRES:
        return POSTGRES
    if _postgresBinariesPresent():
        pytest.fail(
            "PostgreSQL server binaries are installed but MAILGATE_TEST_POSTGRES is not "
            "set: run the suite with `make test` (it starts PostgreSQL)",
            pytrace=False,
        )
    pytest.skip("no PostgreSQL server binaries on this machine")


def withSchema(url, schema):
    """
    C{url} with C{search_path} set to C{schema}.
    """
    separator = "&" if "?" in url else "?"
    return f"{url}{separator}options={quote(f'-c search_path={schema}')}"


@pytest.fixture
def postgresURL():
    """
    The URL of an empty PostgreSQL schema, dropped after the test.
    """
    import psycopg

    base = _requirePostgres()
    schema = "t_" + secrets.token_hex(6)
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        yield withSchema(base, schema)
    finally:
        with psycopg.connect(base, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture(params=["sqlite", "postgres"])
def databaseURL(request, tmp_path):
    """
    An empty database, on each backend in turn.

    A test module may also ask for C{"memory"}, SQLite's private in-memory
    database, by parametrising this fixture indirectly.
    """
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'mail.sqlite3'}"
    elif request.param == "memory":
        yield "sqlite:///:memory:"
    else:
        yield request.getfixturevalue("postgresURL")


@pytest.fixture
def cheapCommandHashes(monkeypatch):
    """
    The admin command, run in this process, hashes new passwords with the
    suite's cheap scrypt cost (L{mailgate.testing.TEST_HASH_COST}) instead
    of the production one, which costs about 0.1 s a hash and as much for
    every check of it: for tests of what the command does, not of what a
    hash costs (tests/test_auth.py checks that).  A hash carries its own
    cost, so whatever checks it works as with a production hash.
    """
    import functools

    from mailgate.auth.passwords import makeCredentials
    from mailgate.cli import users
    from mailgate.testing import TEST_HASH_COST

    monkeypatch.setattr(users, "makeCredentials", functools.partial(makeCredentials, logN=TEST_HASH_COST))


@pytest.fixture
def dbpath(tmp_path):
    return tmp_path / "mail.sqlite3"


@pytest.fixture
def store(dbpath):
    """
    A synchronous store on a real SQLite file (WAL, synchronous=FULL).
    """
    s = memoryStore(f"sqlite:///{dbpath}")
    yield s
    s.close()


class WriterRecordingReactor:
    """
    The part of a reactor a TCP transport uses (C{IReactorFDSet}),
    recording the descriptors it would watch, so a test plays the reactor;
    its timed calls wait on C{clock} (a L{Clock}) for the test to advance.
    """

    def __init__(self):
        from twisted.internet.task import Clock

        self.readers = set()
        self.writers = set()
        self.clock = Clock()

    def callLater(self, delay, function, *args, **kwargs):
        return self.clock.callLater(delay, function, *args, **kwargs)

    def addReader(self, reader):
        self.readers.add(reader)

    def removeReader(self, reader):
        self.readers.discard(reader)

    def addWriter(self, writer):
        self.writers.add(writer)

    def removeWriter(self, writer):
        self.writers.discard(writer)


@attr.s
class TCPConnection:
    transport = attr.ib()
    protocol = attr.ib()
    client = attr.ib()
    reactor = attr.ib()

    def receive(self, count):
        """
        Exactly C{count} octets from the client's socket (blocking, with the
        socket's timeout).
        """
        data = b""
        while len(data) < count:
            piece = self.client.recv(count - len(data))
            assert piece, "connection closed early"
            data += piece
        return data


@pytest.fixture
def tcpConnection():
    """
    A L{TCPConnection}: Twisted's C{tcp.Server} transport for one end of a
    loopback connection (its protocol a plain L{Protocol}, its reactor a
    L{WriterRecordingReactor}), and the client's socket.
    """
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    client = socket.create_connection(listener.getsockname(), timeout=10)
    accepted, peer = listener.accept()
    listener.close()
    accepted.setblocking(False)
    reactor = WriterRecordingReactor()
    protocol = Protocol()
    transport = tcp.Server(accepted, protocol, peer, None, 1, reactor)
    protocol.makeConnection(transport)
    yield TCPConnection(transport, protocol, client, reactor)
    client.close()
    accepted.close()


@pytest.fixture
def pair(tmp_path):
    """
    A self-signed certificate for mail.example.test (and 127.0.0.1) and
    its key, as paths (tests/certs.py); its own trust anchor.
    """
    from certs import makeCertificate

    return makeCertificate(tmp_path, "mail.example.test")


@pytest.fixture
def tls(pair):
    """
    A L{mailgate.tls.ServerTLS} from L{pair}.
    """
    from mailgate.tls import ServerTLS

    return ServerTLS(str(pair[0]), str(pair[1]))


@pytest.fixture
def logEvents():
    """
    Every log event published while the test runs (twisted.logger's
    global publisher), in order.
    """
    from twisted.logger import globalLogPublisher

    captured = []
    globalLogPublisher.addObserver(captured.append)
    try:
        yield captured
    finally:
        globalLogPublisher.removeObserver(captured.append)



@pytest.fixture
def tripsTo(monkeypatch):
    """
    C{tripsTo(store)}: count the read trips C{store} makes to its database
    from then on; the returned list gets the name of each interaction run.
    """

    def start(store):
        trips = []
        realInteraction = store.database.runInteraction

        def counted(function, *args, **kwargs):
            trips.append(function.__name__)
            return realInteraction(function, *args, **kwargs)

        monkeypatch.setattr(store.database, "runInteraction", counted)
        return trips

    return start
