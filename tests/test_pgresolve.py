"""
The PostgreSQL server's host name, looked up by mailgate
(L{mailgate.store.pgresolve}) before the reactor's connections are made,
not by libpq.

Tried for real first: a C{twistd mailgate} whose URL named its server
by a host name, in a mount namespace of its own whose resolv.conf pointed
at a DNS server that never answered (the resolver waiting 4 s, twice):
as its connections were made again, a POP3 C{CAPA} (no database in it)
waited 8 s for its reply, the whole node stopped while libpq's
C{getaddrinfo} kept Python's lock.  Here a resolver is put in place of
C{socket.getaddrinfo} at the Python level: before the change libpq never
asked it (the names below end in C{.invalid}, which no DNS resolves).

The worker threads' connections (psycopg's, L{PostgresEngine.connect}:
every read and write of a node, every C{mailgate} command) are looked up
by the same code, within the same time: tried for real too, a
C{mailgate user list} whose DNS server never answered (C{options
timeout:15 attempts:2}) failed after 40 s, psycopg's own lookup having
waited as long as the resolver did.
"""

import socket
import threading
from urllib.parse import urlsplit

import pytest

from mailgate.errors import DatabaseRefused, TemporaryFailure
from mailgate.store import pgreactor, postgres
from test_cli import CLI

NAME = "db.resolve-test.invalid"
DEADLINE = 30


class Resolver:
    """
    In place of C{socket.getaddrinfo} for names ending in C{.invalid}:
    each answer taken in turn from C{answers} (a list of addresses, or an
    exception), once L{proceed} is set; other names go to the real one.
    """

    def __init__(self, monkeypatch, *answers, wait=False):
        self.answers = list(answers)
        self.asked = []
        # The thread each lookup was made on.
        self.threads = []
        self.proceed = threading.Event()
        self.waiting = threading.Event()
        if not wait:
            self.proceed.set()
        real = socket.getaddrinfo

        def getaddrinfo(host, port, *args, **kwargs):
            if not str(host).endswith(".invalid"):
                return real(host, port, *args, **kwargs)
            self.asked.append(host)
            self.threads.append(threading.current_thread().name)
            self.waiting.set()
            self.proceed.wait(DEADLINE)
            answer = self.answers.pop(0)
            if isinstance(answer, Exception):
                raise answer
            return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (address, 0)) for address in answer]

        monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


def _named(url, hosts):
    """
    C{url} with C{hosts} in place of its C{127.0.0.1}.
    """
    assert "@127.0.0.1:" in url, "the shared PostgreSQL is reached at 127.0.0.1"
    port = url.split("@127.0.0.1:", 1)[1].split("/", 1)[0]
    return url.replace(f"127.0.0.1:{port}", ",".join(f"{host}:{port}" for host in hosts))


def test_theServersNameIsLookedUpByMailgateAndLibpqGivenItsAddress(postgresURL, monkeypatch):
    """
    The name is looked up with Python's C{getaddrinfo}, which lets the
    node's other threads run while it waits (the lookup is seen waiting
    while the connecting thread is inside it); libpq is given the address
    beside the name, which it keeps as the host (TLS checks the
    certificate against it).  Before, libpq looked the name up itself.
    """
    resolver = Resolver(monkeypatch, ["127.0.0.1"], wait=True)
    made = {}

    def connecting():
        try:
            made["pg"] = pgreactor.connect(_named(postgresURL, [NAME]), [], [], 5)
        except Exception as e:
            made["error"] = e

    thread = threading.Thread(target=connecting)
    thread.start()
    try:
        # Until the lookup is seen waiting, or the connection ends without it.
        for _ in range(DEADLINE * 20):
            if resolver.waiting.wait(0.05) or not thread.is_alive():
                break
        assert resolver.waiting.is_set(), made.get("error")
        assert thread.is_alive()
    finally:
        resolver.proceed.set()
        thread.join(DEADLINE)
    assert "error" not in made, made.get("error")
    pg = made["pg"]
    try:
        assert (pg.host, pg.hostaddr) == (NAME.encode(), b"127.0.0.1")
    finally:
        pg.finish()


def test_aNameWhoseLookUpDoesNotAnswerIsATemporaryFailure(postgresURL, monkeypatch):
    """
    A resolver that does not answer: the connection fails once the
    connect timeout has passed, temporarily (a DNS failure), saying which
    name did not resolve.
    """
    resolver = Resolver(monkeypatch, ["127.0.0.1"], wait=True)
    try:
        with pytest.raises(TemporaryFailure) as failed:
            pgreactor.connect(_named(postgresURL, [NAME]), [], [], 0.2, where="the test's server")
    finally:
        resolver.proceed.set()
    assert f'could not resolve host name "{NAME}": no answer from DNS in 0.2 seconds' in str(failed.value)
    assert type(failed.value) is TemporaryFailure


def test_aNameWithoutAddressIsATemporaryFailureAndTheNextServerIsTried(postgresURL, monkeypatch):
    """
    A server whose name does not resolve (C{EAI_NONAME}) is passed over
    for the next of the URL's servers, in the URL's order; alone, it
    is a temporary failure saying so.
    """
    gone = "gone.resolve-test.invalid"
    resolver = Resolver(
        monkeypatch,
        socket.gaierror(socket.EAI_NONAME, "Name or service not known"), ["127.0.0.1"],
        socket.gaierror(socket.EAI_NONAME, "Name or service not known"),
    )
    pg = pgreactor.connect(_named(postgresURL, [gone, NAME]), [], [], 5)
    try:
        assert pg.host == NAME.encode()
    finally:
        pg.finish()
    with pytest.raises(TemporaryFailure) as failed:
        pgreactor.connect(_named(postgresURL, [gone]), [], [], 5, where="the test's server")
    assert resolver.asked == [gone, NAME, gone]
    assert type(failed.value) is TemporaryFailure
    assert f'could not resolve host name "{gone}": Name or service not known' in str(failed.value)


def test_theNameIsLookedUpAtEveryConnection(postgresURL, monkeypatch):
    """
    Each connection looks the name up again, and tries each of its
    addresses in the resolver's order: a failover made by giving the name
    the new primary's address is followed.
    """
    resolver = Resolver(monkeypatch, ["127.0.0.1"], ["127.0.0.3", "127.0.0.1"])
    for _ in range(2):
        pgreactor.connect(_named(postgresURL, [NAME]), [], [], 5).finish()
    assert resolver.asked == [NAME, NAME]


def test_aRefusalIsExplainedWithoutLibpqLookingTheNameUp(postgresURL, monkeypatch):
    """
    A refusal (here a wrong password) is asked about once more, traced
    (L{pgrefusal.askWhy}), through libpq's blocking lookup before: the
    node tried for real (above) still stopped for 8 s with only the
    reactor's connections changed, until this lookup was made here too.
    The answer names the configuration error; before, the name did not
    resolve and the refusal went for a temporary failure.
    """
    Resolver(monkeypatch, ["127.0.0.1"], ["127.0.0.1"])
    parts = urlsplit(_named(postgresURL, [NAME]))
    wrong = parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":not-the-password@")).geturl()
    with pytest.raises(DatabaseRefused) as refused:
        pgreactor.connect(wrong, [], [], 5, where="the test's server")
    assert "SQLSTATE 28P01" in str(refused.value)


def test_aWorkerThreadsConnectionIsGivenTheAddressMailgateLookedUp(postgresURL, monkeypatch):
    """
    A worker thread's connection (psycopg's) is given the address that
    mailgate looked the name up for, on a thread of its own whose answer
    it waits for a bounded time, as the reactor's connections are; before,
    psycopg looked it up itself, on the connecting thread, for as long as
    the resolver took.
    """
    resolver = Resolver(monkeypatch, ["127.0.0.1"])
    conn = postgres.PostgresEngine(_named(postgresURL, [NAME])).connect()
    try:
        assert (conn.info.host, conn.info.hostaddr) == (NAME, "127.0.0.1")
    finally:
        conn.close()
    assert resolver.threads == [f"resolving {NAME}"]


def test_aCommandWaitsForANameThatDoesNotResolveAsLongAsTheReactorAtMost(postgresURL, monkeypatch, tmp_path):
    """
    A C{mailgate} command whose DNS server does not answer fails once the
    connect timeout has passed (here made 0.2 s), temporarily, in one line
    naming the name that did not resolve; before, psycopg's lookup waited
    for the resolver (here until the test let it answer, and the command
    then succeeded).
    """
    resolver = Resolver(monkeypatch, ["127.0.0.1"], ["127.0.0.1"], wait=True)
    monkeypatch.setattr(postgres, "CONNECT_TIMEOUT", 0.2)
    try:
        result = CLI(tmp_path / "unused.sqlite3")("user", "list", database=_named(postgresURL, [NAME]))
    finally:
        resolver.proceed.set()
    assert result.code == 75, result
    assert result.err.splitlines() == [
        f"mailgate: temporary failure, try again: cannot connect to PostgreSQL at postgresql://{NAME}/"
        f"{urlsplit(postgresURL).path.lstrip('/')}: could not resolve host name \"{NAME}\": no answer from DNS in "
        "0.2 seconds"
    ], result


def test_aWorkerThreadsConnectionPassesOverANameWithoutAddress(postgresURL, monkeypatch):
    """
    As the reactor's: a server whose name does not resolve is passed over
    for the next of the URL's servers; alone, it is a temporary failure
    saying so.
    """
    gone = "gone.resolve-test.invalid"
    resolver = Resolver(
        monkeypatch,
        socket.gaierror(socket.EAI_NONAME, "Name or service not known"), ["127.0.0.1"],
        socket.gaierror(socket.EAI_NONAME, "Name or service not known"),
    )
    conn = postgres.PostgresEngine(_named(postgresURL, [gone, NAME])).connect()
    try:
        assert conn.info.host == NAME
    finally:
        conn.close()
    with pytest.raises(TemporaryFailure) as failed:
        postgres.PostgresEngine(_named(postgresURL, [gone])).connect()
    assert resolver.asked == [gone, NAME, gone]
    assert type(failed.value) is TemporaryFailure
    assert f'could not resolve host name "{gone}": Name or service not known' in str(failed.value)
