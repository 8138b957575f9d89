"""
mailgate on a PostgreSQL primary with a streaming standby, as
administrators deploy it for high availability: the nodes given a URL
naming both servers (libpq's multi-host URL), the primary lost, the standby
promoted.  Each test runs its own private servers (tests/pgcluster.py),
never the suite's shared cluster.

What must hold: a node works on the primary alone, whichever server the
URL names first, and never takes a maildrop lock on a standby (where it
excludes no session of the nodes on the primary); while there is no
primary, clients hear temporary failures; once the standby is promoted
the nodes serve again on their own, and nothing a node accepted (its 250)
is lost.
"""

import poplib
import smtplib
import socket
import threading
import urllib.error
import urllib.request

import psycopg
import pytest
from psycopg import pq

from e2e import DEADLINE, ServerStarter, waitFor
from mailgate.errors import TemporaryFailure
from mailgate.store import engineFromURL
from mailgate.store import pgreactor, postgres
from mailgate.store.pghosts import HostOrder, hostAttempts
from mailgate.store.postgres import AdvisoryLocks
from mailgate.testing import addUser, memoryStore, resultOf
from iterated import IteratedReactor
from pgcluster import BlackHole, ReplicatedCluster
from pgserver import serverBinaries

pytestmark = [
    pytest.mark.skipif(serverBinaries() is None, reason="no PostgreSQL server binaries"),
    # One worker for them all (the module's cluster fixture puts those that
    # use it there, tests/conftest.py): initdb, the template every cluster
    # copies, then runs once.
    pytest.mark.xdist_group(__name__),
]

ALICE = "alice@example.org"
PASSWORD = "wonder land"


@pytest.fixture(scope="module")
def cluster():
    with ReplicatedCluster() as cluster:
        store = memoryStore(cluster.primary.url())
        try:
            addUser(store, ALICE, PASSWORD)
        finally:
            store.close()
        cluster.caughtUp()
        yield cluster


def _onPrimary(engine):
    conn = engine.connect()
    try:
        return conn.info.port, conn.execute("SELECT pg_is_in_recovery()").fetchone()[0]
    finally:
        conn.close()


def test_aURLNamingTheStandbyFirstWorksOnThePrimary(cluster):
    """
    A URL naming the standby first, with no C{target_session_attrs} (a
    node's list of servers in no particular order, or the old primary
    now a standby): every connection of a node, its maildrop locks
    included, is made to the primary.  Before, libpq took the first server
    that answered, the standby: every write failed as a read-only
    transaction, and the schema check at start with it.
    """
    url = cluster.url(cluster.standby, cluster.primary)
    engine = engineFromURL(url)
    assert _onPrimary(engine) == (cluster.primary.port, False)
    store = memoryStore(url)
    try:
        addUser(store, "bob@example.org", "builder")
    finally:
        store.close()
    locks = AdvisoryLocks.blocking(engine)
    try:
        assert resultOf(locks.acquire(5151)) == 5151
        with psycopg.connect(cluster.primary.url(), autocommit=True) as conn:
            held = conn.execute(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 1 AND granted"
            ).fetchone()[0]
        assert held >= 1
    finally:
        resultOf(locks.close())


def test_aNodeGivenTheStandbyAloneTakesNoMaildropLock(cluster):
    """
    A node whose URL names only the standby: its lock connection is
    refused, a temporary failure naming the standby, and no POP3 session
    starts there.  Before, the lock was taken on the standby, where it
    excluded nothing: a maildrop locked by a node on the primary was
    served by this one too, two sessions at once.
    """
    onPrimary = AdvisoryLocks.blocking(engineFromURL(cluster.primary.url()))
    onStandby = AdvisoryLocks.blocking(engineFromURL(cluster.standby.url()))
    try:
        assert resultOf(onPrimary.acquire(4242)) == 4242
        with pytest.raises(TemporaryFailure) as refused:
            resultOf(onStandby.acquire(4242))
        assert "hot standby" in str(refused.value)
        assert f"port {cluster.standby.port}" in str(refused.value)
    finally:
        resultOf(onStandby.close())
        resultOf(onPrimary.close())


@pytest.mark.parametrize("argv, shown", [
    (["db", "check"], "/mail: sound (12 checks)\n"),
    (["db", "version"], "schema version "),
    (["user", "list"], f"\n{ALICE:<40}        0 "),
    (["mailbox", "list", ALICE], "in use: 0 messages, 0 octets"),
    (["who"], "USER "),
    (["nodes"], "NODE "),
    (["ban", "list"], "ADDRESS "),
])
def test_aStandbyAloneServesTheCommandsThatOnlyRead(cluster, argv, shown):
    """
    The commands that only read (a monitoring host's) work through a URL
    naming only a standby: their connections take any server.  Since
    every connection asked for the primary (d70683e), each was refused,
    exit 75 "server is in hot standby mode", unless the URL said
    C{target_session_attrs=any}.
    """
    from e2e import mailgateHere

    code, out, err = mailgateHere(cluster.url(cluster.standby), *argv)
    assert (code, err) == (0, ""), err
    assert shown in out


@pytest.mark.parametrize("argv", [
    ["user", "add", "carol@example.org", "--password-stdin"],
    ["user", "del", ALICE],
    ["ban", "add", "192.0.2.1"],
])
def test_aCommandThatWritesIsRefusedByAStandbyInOneLine(cluster, argv):
    """
    A command that writes (or may: a schema upgrade, a node's heartbeat)
    still needs the primary: through a URL naming only a standby it is
    refused, one line saying the server is a standby, exit 75 (a
    temporary failure: the standby may be promoted), and nothing changed.
    """
    from e2e import mailgateHere

    code, out, err = mailgateHere(cluster.url(cluster.standby), *argv, stdin="builder\n")
    assert (code, out) == (75, ""), err
    assert err.startswith("mailgate: temporary failure, try again: ") and err.count("\n") == 1, err
    assert err.endswith(f"port {cluster.standby.port} failed: server is in hot standby mode\n"), err
    code, out, err = mailgateHere(cluster.primary.url(), "user", "list")
    assert code == 0, err
    assert f"\n{ALICE} " in out and "carol@" not in out


def test_readsTakeTheFirstServerThatAnswersAndTheURLsChoiceWins(cluster):
    """
    Of a URL naming the primary first and then the standby, what only
    reads goes to the primary while it answers (so that a command reading
    just after another's change finds it: a standby shows only what it
    has replayed), and to the standby while it does not; the rest goes
    to the primary whatever the order, and fails without it; a URL's own
    C{target_session_attrs} is kept.
    """
    from types import SimpleNamespace

    from e2e import mailgateHere

    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        gone = SimpleNamespace(port=closed.getsockname()[1])
    primaryFirst = cluster.url(cluster.primary, cluster.standby)
    assert _onPrimary(engineFromURL(primaryFirst, readsOnly=True)) == (cluster.primary.port, False)
    primaryGone = cluster.url(gone, cluster.standby)
    assert _onPrimary(engineFromURL(primaryGone, readsOnly=True)) == (cluster.standby.port, True)
    with pytest.raises(TemporaryFailure):
        engineFromURL(primaryGone).connect()
    for url in (primaryFirst, cluster.url(cluster.standby, cluster.primary)):
        assert _onPrimary(engineFromURL(url)) == (cluster.primary.port, False)
    both = cluster.url(cluster.standby, cluster.primary)
    assert _onPrimary(engineFromURL(f"{both}?target_session_attrs=primary", readsOnly=True)) == (
        cluster.primary.port, False
    )
    code, out, err = mailgateHere(f"{cluster.url(cluster.standby)}?target_session_attrs=primary", "db", "version")
    assert (code, out) == (75, ""), err
    assert "hot standby mode" in err


def test_loginsWithNoPrimaryEachTryOnceAndSayNothingWasLost(cluster, logEvents):
    """
    A node whose lock connections cannot be made (its URL's servers a
    standby alone, or the database away): each login makes one attempt
    and fails [SYS/TEMP] with why.  Before, each login's failure to
    connect was taken for a connection lost under it: a second attempt,
    and a "maildrop lock connection lost during a login; trying again"
    line, at every login for as long as it lasted.
    """
    engine = engineFromURL(cluster.standby.url())
    attempts = []
    connectPrepared = engine.connectPrepared

    def counted(statements):
        attempts.append(1)
        return connectPrepared(statements)

    engine.connectPrepared = counted
    reactor = IteratedReactor()
    locks = AdvisoryLocks(engine, reactor)
    try:
        for login in range(1, 4):
            failure = reactor.wait(locks.acquireAndSnapshot(4242, None))
            assert failure.check(TemporaryFailure) and "hot standby" in str(failure.value)
            assert len(attempts) == login
    finally:
        reactor.resultOf(locks.close())
        reactor.close()
    assert [e for e in logEvents if e.get("event") == "lock.retried"] == []


def test_aFirstServerThatDoesNotAnswerIsPassedOver(cluster, monkeypatch):
    """
    The URL's first server does not answer at all (its machine gone in the
    failover, the old primary): each connection of the node waits for it
    its connect timeout, then reaches the primary named after it.  Before,
    the lock and read connections (libpq's non-blocking connect) spent
    the whole timeout on the first server and failed, at every attempt:
    no POP3 login on such a node until its URL was changed.
    """
    monkeypatch.setattr(postgres, "CONNECT_TIMEOUT", 1)
    with BlackHole() as gone:
        engine = engineFromURL(
            f"postgresql://mailgate:mailgate@127.0.0.1:{gone.port},127.0.0.1:{cluster.primary.port}/mail"
        )
        pg = engine.connectPrepared([])
        try:
            assert pg.port == str(cluster.primary.port).encode()
        finally:
            pg.finish()


def test_theServerThatLastTookAConnectionIsTriedFirst(cluster, monkeypatch):
    """
    Once a connection has reached the primary past a server that does not
    answer, the next ones go to the primary first.  Before, every
    connection tried the URL's first server and waited out its timeout:
    a node so started took 32 seconds to listen (each of the engines it
    makes as it starts learning anew), and its first login 25, waiting
    for its lock and read connections, made one after another.
    """
    monkeypatch.setattr(postgres, "CONNECT_TIMEOUT", 1)
    tried = []
    connected = pgreactor._connected

    def spied(info, timeout):
        tried.append(int(psycopg.conninfo.conninfo_to_dict(info.decode())["port"]))
        return connected(info, timeout)

    monkeypatch.setattr(pgreactor, "_connected", spied)
    with BlackHole() as gone:
        url = f"postgresql://mailgate:mailgate@127.0.0.1:{gone.port},127.0.0.1:{cluster.primary.port}/mail"
        engine = engineFromURL(url)
        for _ in range(2):
            engine.connectPrepared([]).finish()
        # Another engine of the same URL in the process (a node makes
        # several as it starts) knows it too.
        engineFromURL(url).connectPrepared([]).finish()
        assert tried == [gone.port, cluster.primary.port, cluster.primary.port, cluster.primary.port]
        conn = engine.connect()
        try:
            assert conn.info.port == cluster.primary.port
        finally:
            conn.close()


def test_theOrderOfServersFollowsTheLastConnection():
    """
    L{HostOrder}: the URL's order until a connection is made to another of
    its servers, which then comes first, the others after it in turn;
    each server keeps its port and address.
    """
    order = HostOrder("postgresql://u@db1:5433,db2,db3:5434/mail")
    assert order.parameters() == {}
    order.connected("db3", "5434")
    assert order.parameters() == {"host": "db3,db1,db2", "port": "5434,5433,"}
    order.connected("db2", "5432")
    assert order.parameters() == {"host": "db2,db3,db1", "port": ",5434,5433"}
    order.connected("db1", "5433")
    assert order.parameters() == {}
    order.connected("elsewhere", "5432")
    assert order.parameters() == {}
    withAddresses = HostOrder("host=a,b hostaddr=10.0.0.1,10.0.0.2 port=5432 dbname=mail")
    withAddresses.connected("b", "5432")
    assert withAddresses.parameters() == {"host": "b,a", "port": "5432,5432", "hostaddr": "10.0.0.2,10.0.0.1"}
    assert HostOrder("postgresql://u@db1/mail").parameters() == {}



def _portOf(conninfo):
    """
    The port libpq goes to first for C{conninfo}, as it reads it (the
    environment included); nothing is sent.
    """
    pg = pq.PGconn.connect_start(conninfo.encode())
    try:
        return pg.port.decode()
    finally:
        pg.finish()


def test_eachServerIsTriedOnThePortLibpqGivesIt(monkeypatch):
    """
    A multi-host URL without ports (C{port=,} as libpq reads it) is on
    libpq's compiled port, 5432, whatever C{PGPORT} says, as every
    connection psycopg makes goes; the lock and read connections, tried
    one server at a time (L{hostAttempts}), went to C{PGPORT}'s: checked
    with a real primary on PGPORT's port, a node's locks there and its
    writes on 5432, two servers.  A URL that gives no port at all leaves
    C{PGPORT} to apply, also once the servers are reordered.
    """
    monkeypatch.setenv("PGPORT", "1")
    url = "postgresql://u@127.0.0.2,127.0.0.3/mail"
    assert _portOf(url) == "5432"
    assert [_portOf(attempt) for attempt in hostAttempts(url)] == ["5432", "5432"]
    order = HostOrder(url)
    order.connected("127.0.0.3", "5432")
    reordered = psycopg.conninfo.make_conninfo(url, **order.parameters())
    assert [_portOf(attempt) for attempt in hostAttempts(reordered)] == ["5432", "5432"]
    noPort = "postgresql:///mail?host=127.0.0.2,127.0.0.3"
    assert [_portOf(attempt) for attempt in hostAttempts(noPort)] == ["1", "1"]
    order = HostOrder(noPort)
    order.connected("127.0.0.3", "1")
    assert order.parameters() == {"host": "127.0.0.3,127.0.0.2"}

def test_whyNoServerAnsweredIsAskedWithinTheTimeout(monkeypatch):
    """
    Neither server takes the connection, the first not answering, the
    second refusing: the failure is reported within the connect timeouts.
    Before, asking the second why it refused (pgrefusal) sent libpq's
    first packet to the first before its connection was made, in blocking
    mode, and waited until the kernel gave up on it, some two minutes,
    holding up every connection attempt of the node meanwhile.
    """
    monkeypatch.setattr(postgres, "CONNECT_TIMEOUT", 1)
    with BlackHole() as gone, socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        engine = engineFromURL(
            f"postgresql://mailgate:mailgate@127.0.0.1:{gone.port},127.0.0.1:{closed.getsockname()[1]}/mail"
        )
        outcome = []
        attempt = threading.Thread(target=lambda: outcome.append(_failureOf(engine.connectPrepared, [])))
        attempt.start()
        attempt.join(DEADLINE)
        assert not attempt.is_alive(), "the connection attempt did not end within 20 s"
    [failure] = outcome
    assert isinstance(failure, TemporaryFailure) and "timeout expired" in str(failure), failure


def _failureOf(function, *args):
    try:
        function(*args)
    except Exception as e:
        return e
    return None


def _login(port):
    """
    A POP3 login of alice: her message count, or the -ERR line it got.
    """
    client = poplib.POP3("127.0.0.1", port, timeout=DEADLINE)
    try:
        client.user(ALICE)
        try:
            client.pass_(PASSWORD)
        except poplib.error_proto as e:
            return e.args[0]
        count = client.stat()[0]
        client.quit()
        return count
    finally:
        client.close()


def _send(port, subject):
    """
    One message to alice: the reply to its DATA, or to its RCPT where that
    refused her (a look-up the database did not answer).
    """
    client = smtplib.SMTP("127.0.0.1", port, timeout=DEADLINE)
    try:
        client.ehlo("client.test")
        client.mail("sender@example.net")
        code = client.rcpt(ALICE)[0]
        if code != 250:
            return code
        return client.data(f"Subject: {subject}\r\n\r\nhello\r\n".encode())[0]
    finally:
        client.close()


def _endedWith(session):
    """
    The -ERR a NOOP of C{session} got, or C{None} if it was answered +OK
    (the loss of its lock not yet seen).
    """
    try:
        session.noop()
    except poplib.error_proto as e:
        return e.args[0]
    return None


def _health(port):
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=DEADLINE).status
    except urllib.error.HTTPError as e:
        return e.code


def test_nodesFollowAFailoverLosingNothing(tmp_path):
    """
    Two nodes on a URL naming the primary and its standby.  With the
    primary gone and the standby not yet promoted, logins answer -ERR
    [SYS/TEMP], mail 451 and /healthz 503 (before, the nodes reconnected
    to the standby and logged users in there, their maildrop locks on the
    standby), and a session logged in is ended, its lock lost; once it is promoted both serve again, without a restart,
    with every message they had answered 250 to.
    """
    with ReplicatedCluster() as cluster:
        url = cluster.url(cluster.primary, cluster.standby)
        store = memoryStore(cluster.primary.url())
        try:
            addUser(store, ALICE, PASSWORD)
        finally:
            store.close()
        starter = ServerStarter(tmp_path, url)
        nodes = []
        try:
            nodes += [
                starter(
                    "--hostname", f"{name}.test", "--smtp", "tcp:0:interface=127.0.0.1",
                    "--metrics", "tcp:0:interface=127.0.0.1",
                )
                for name in ("node-a", "node-b")
            ]
            for i, node in enumerate(nodes):
                assert _send(node.portOf("SMTP"), f"before {i}") == 250
            assert [_login(node.port) for node in nodes] == [2, 2]
            session = poplib.POP3("127.0.0.1", nodes[0].port, timeout=DEADLINE)
            session.user(ALICE)
            session.pass_(PASSWORD)

            cluster.primary.stop()
            # Its lock went with the old primary: ended, not left to answer
            # "try again" while another node may take the maildrop.
            said = waitFor(lambda: _endedWith(session), "the session to be ended")
            assert said.startswith(b"-ERR [SYS/TEMP]") and b"lock was lost" in said, said
            session.close()
            for node in nodes:
                said = _login(node.port)
                assert isinstance(said, bytes) and said.startswith(b"-ERR [SYS/TEMP]"), said
                assert _send(node.portOf("SMTP"), "meanwhile") == 451
                waitFor(lambda: _health(node.portOf("METRICS")) == 503, "/healthz to fail")

            cluster.promote()
            for i, node in enumerate(nodes):
                waitFor(lambda: isinstance(_login(node.port), int), f"{node} to serve again")
                assert _send(node.portOf("SMTP"), f"after {i}") == 250
            assert _login(nodes[0].port) == 4
            waitFor(lambda: _health(nodes[0].portOf("METRICS")) == 200, "/healthz to pass")
        finally:
            starter.stopAll()
        for node in nodes:
            assert "Traceback" not in node.stdout + node.stderr, node.log()
