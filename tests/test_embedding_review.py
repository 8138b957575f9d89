"""
mailgate as an application that embeds it uses it (README, Embedding):
C{makeService} over a store of the embedder's (L{mailgate.testing}'s
L{FaultInjectingStore}), and the whole hierarchy on a reactor of the
embedder's, in a process of its own, the global reactor out of reach.
"""

import subprocess
import sys
import textwrap

import pytest
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

from mailgate.config import MailgateConfig
from mailgate.service import makeService
from mailgate.testing import FaultInjectingStore, SMTPSession, addUser, memoryStore, resultOf

from e2e import DEADLINE

ALICE = "alice@example.org"
MESSAGE = b"Subject: hi\r\n\r\nhello\r\n"


def test_aFaultInjectingStoreServesUnderMakeService():
    """
    C{makeService(config, store=...)} takes any store, as its docstring
    and the protocols (which see it through L{mailgate.interfaces}) do: a
    test of the embedder's whole service over a store that fails on
    demand.  It raised AttributeError ('FaultInjectingStore' object has no
    attribute 'engine'): the service read the SQL store's engine for its
    database file's permission warnings.
    """
    store = FaultInjectingStore(memoryStore())
    addUser(store, ALICE, "secret")
    reactor = MemoryReactorClock()
    root = makeService(
        MailgateConfig(pop3=["tcp:0"], smtp=["tcp:0"], domains=["example.org"], postmaster=ALICE),
        reactor=reactor,
        store=store,
    )
    root.startService()
    smtp = root.listeners["SMTP"][0].factory

    def send():
        session = SMTPSession(store, factory=smtp)
        last = session.sendMail("bob@example.net", [ALICE], MESSAGE).splitlines()[-1]
        assert session.command("QUIT").startswith("221 ")
        session.protocol.connectionLost(Failure(ConnectionDone()))
        return last

    assert send().startswith("250 ")
    store.fail("deliver")
    assert send().startswith("451 ")
    assert resultOf(root.stopService()) is None
    assert ("close", ()) in store.calls


# The host application of README's Embedding, as a script of its own: two
# mailgate services (two databases) on a reactor the host made and never
# installed, the global one replaced by one that raises at any use.
HOST = textwrap.dedent('''
    import json, os, poplib, smtplib, sys, threading, traceback

    from twisted.internet import main

    used = []

    class NoGlobalReactor:
        def __getattr__(self, name):
            used.append(name + ": " + "".join(traceback.format_stack(limit=6)))
            raise RuntimeError("the global reactor was used: " + name)

    main.installReactor(NoGlobalReactor())
    if sys.argv[1] == "asyncio":
        import asyncio

        from twisted.internet.asyncioreactor import AsyncioSelectorReactor

        reactor = AsyncioSelectorReactor(asyncio.new_event_loop())
    else:
        from twisted.internet.epollreactor import EPollReactor

        reactor = EPollReactor()

    from twisted.internet import defer, threads

    from mailgate.auth.passwords import makeCredentials
    from mailgate.service import MailgateConfig, makeService

    LOOPBACK = "tcp:0:interface=127.0.0.1"
    services = [
        makeService(MailgateConfig(
            database="sqlite:///" + os.path.abspath(f"host{n}.sqlite3"), pop3=[LOOPBACK], smtp=[LOOPBACK],
            lmtp=[LOOPBACK], domains=[f"example{n}.org"], postmaster=f"alice@example{n}.org",
        ), reactor=reactor)
        for n in (1, 2)
    ]
    seen = {}

    def clients(n, pop3, smtp, lmtp):
        address = f"alice@example{n}.org"
        with smtplib.SMTP("127.0.0.1", smtp, timeout=20) as client:
            client.sendmail("bob@example.net", [address], f"Subject: smtp {n}\\r\\n\\r\\nto {n}\\r\\n")
        with smtplib.LMTP("127.0.0.1", lmtp, timeout=20) as client:
            client.sendmail("bob@example.net", [address], f"Subject: lmtp {n}\\r\\n\\r\\nto {n}\\r\\n")
        client = poplib.POP3("127.0.0.1", pop3, timeout=20)
        client.user(address)
        client.pass_("secret")
        count = client.stat()[0]
        bodies = [client.retr(i)[1][-1].decode() for i in range(1, count + 1)]
        client.quit()
        return bodies

    @defer.inlineCallbacks
    def run():
        try:
            for n, service in enumerate(services, 1):
                service.startService()
                yield service.store.addUser(f"alice@example{n}.org", makeCredentials("secret", logN=10))
            for n, service in enumerate(services, 1):
                yield service.whenListening()
                ports = [service.listeners[name][0].port.getHost().port for name in ("POP3", "SMTP", "LMTP")]
                pool = reactor.getThreadPool()
                seen[n] = yield threads.deferToThreadPool(reactor, pool, clients, n, *ports)
            yield defer.gatherResults([service.stopService() for service in services])
        except Exception:
            traceback.print_exc()
        finally:
            reactor.stop()

    reactor.callWhenRunning(run)
    reactor.run(installSignalHandlers=False)
    held = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            held.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass
    print(json.dumps({
        "seen": seen,
        "globalReactorUsed": used,
        "threads": sorted(t.name for t in threading.enumerate()),
        "databaseFilesOpen": [path for path in held if ".sqlite3" in path],
        "listening": [s.listeners[name][0].port for s in services for name in ("POP3", "SMTP", "LMTP")],
    }, default=repr))
''')


@pytest.mark.parametrize("reactorName", ["epoll", "asyncio"])
def test_twoServicesOnTheHostsOwnReactorServeAndStopCleanly(tmp_path, reactorName):
    """
    README (Embedding): C{makeService(config, reactor=...)} runs
    everything on the reactor given, and C{stopService()} stops it all.
    Two services with a database each, on a reactor the host made (epoll,
    or asyncio's) while the global one raises at any use: both serve
    SMTP, LMTP and POP3 to smtplib and poplib on 127.0.0.1, nothing of
    mailgate reaches for the global reactor, and once both have stopped
    the process has no thread but its own, no database file open and no
    port listening, and ends by itself.
    """
    import json

    script = tmp_path / "host.py"
    script.write_text(HOST)
    # Run from the scratch directory: the installed mailgate, not the tree's.
    done = subprocess.run(
        [sys.executable, str(script), reactorName], cwd=tmp_path, capture_output=True, text=True,
        timeout=6 * DEADLINE,
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    report = json.loads(done.stdout.splitlines()[-1])
    assert report["seen"] == {"1": ["to 1", "to 1"], "2": ["to 2", "to 2"]}
    assert report["globalReactorUsed"] == []
    assert report["threads"] == ["MainThread"]
    assert report["databaseFilesOpen"] == []
    assert report["listening"] == [None] * 6


# -- the store an embedder's tests get, against the one its service gets --------


def _transcript(store, wait):
    """
    What a client of L{IMailStore} and L{ILifecycleStore} sees of C{store}
    over one life of two users, their mail and a POP3 session: each
    operation's result (or the class of its failure), with what differs
    by nature between two databases (unique ids, times, row ids) masked.
    """
    import re

    from mailgate.auth.passwords import makeCredentials
    from mailgate.message import spoolBytes
    from mailgate.testing import TEST_HASH_COST

    bob = "bob@example.org"
    message = b"Subject: x\r\n\r\n.dot\r\nbody\r\n"
    credentials = makeCredentials("pw", apop=True, logN=TEST_HASH_COST)
    seen = []

    def call(name, d):
        result = wait(d)
        if isinstance(result, Failure):
            result = ("failed", result.type.__name__)
        text = re.sub(r"\b[0-9a-f]{16}\b", "UID", repr(result))
        text = re.sub(r"\b1[6-9]\d{8}\b", "TIME", text)
        seen.append((name, re.sub(r"userId=\d+", "userId=N", text)))
        return result

    call("addUser", store.addUser(ALICE, credentials))
    call("addUser taken", store.addUser(ALICE, credentials))
    call("addUsers", store.addUsers([(bob, makeCredentials("pw2", logN=TEST_HASH_COST), {}), (ALICE, credentials, {})]))
    alice = call("findUser", store.findUser(ALICE))
    call("findUser none", store.findUser("nobody@example.org"))
    call("findUsers", store.findUsers([ALICE, "nobody@example.org"]).addCallback(sorted))
    call("hasDomain", store.hasDomain("example.org"))
    call("hasDomain not", store.hasDomain("example.net"))
    call("hasAPOPUsers", store.hasAPOPUsers())
    call("digestLoginUsers", store.digestLoginUsers())
    secret = wait(store.sharedSecret("k"))
    call("sharedSecret", store.sharedSecret("k").addCallback(lambda again: (len(again), again == secret)))
    call("scramParameters", store.scramParameters())
    call("deliver", store.deliver([ALICE, bob, "nobody@example.org"], spoolBytes(message)).addCallback(sorted))
    call("deliver whole", store.deliver([ALICE, "nobody@example.org"], spoolBytes(message), partial=False))
    call("listUsers", store.listUsers())
    call("listMessages", store.listMessages(ALICE))
    call("listMessages page", store.listMessages(ALICE, page=10).addCallback(list))
    call("listMessages none", store.listMessages("nobody@example.org"))
    call("recordLogin", store.recordLogin(alice, 0))
    maildrop = wait(store.openMaildrop(alice))
    seen.append(("maildrop", (maildrop.address, list(maildrop.sizes), maildrop.expireDays)))
    call("openMaildrop held", store.openMaildrop(alice))
    call("uniqueIds", maildrop.uniqueIds(0, 5))
    body = wait(maildrop.openMessage(0))
    seen.append(("body", (body.size, body.headerSize, body.needsStuffing, list(body.dotOffsets or []))))
    whole = body.whole if body.whole is not None else b"".join(iter(lambda: wait(body.read()), b""))
    seen.append(("read", whole))
    header = wait(maildrop.openMessage(0, headerOnly=True))
    seen.append(("header", (header.size, header.whole if header.whole is not None else wait(header.read()))))
    maildrop.sessionStarted("127.0.0.1:40000", lambda *args: None)
    call("deleteUser in session", store.deleteUser(ALICE))
    call("renameUser in session", store.renameUser(ALICE, "carol@example.org"))
    call("expunge", maildrop.expunge([0]))
    call("release", maildrop.release())
    call("listMessages after", store.listMessages(ALICE))
    call("listDeleted", store.listDeleted(ALICE))
    call("restoreDeleted", store.restoreDeleted(ALICE))
    call("setQuota", store.setQuota(ALICE, 1000, 10))
    call("setQuota messages", store.setQuota(ALICE, messages=5))
    call("setQuota none", store.setQuota("nobody@example.org", 1, 1))
    call("quotaOf", store.quotaOf(ALICE))
    call("quotaOf none", store.quotaOf("nobody@example.org"))
    call("setExpire", store.setExpire(ALICE, 30))
    call("expireMessages", store.expireMessages())
    call("purgeDeleted", store.purgeDeleted())
    call("forgetDeliveries", store.forgetDeliveries())
    call("exportMessages", store.exportMessages(bob).addCallback(lambda ms: [(m.number, m.size) for m in ms]))
    call("kickSessions", store.kickSessions(ALICE))
    imported = [("imp1", spoolBytes(b"Subject: i\r\n\r\nimp\r\n"), 1700000000)]
    call("importMessages", store.importMessages(bob, imported, source="old"))
    call("existingUidls", store.existingUidls(bob, ["imp1", "zzz"]))
    call("claimImported", store.claimImported(bob, "old", ["imp1"]))
    call("removeImportedGone", store.removeImportedGone(bob, "old", []))
    call("forgetImported", store.forgetImported(bob))
    call("renameUser", store.renameUser(bob, "carol@example.org"))
    call("expungeMessages", store.expungeMessages(ALICE))
    call("recountUsage", store.recountUsage(ALICE))
    call("setCredentials", store.setCredentials(ALICE, makeCredentials("new", logN=TEST_HASH_COST)))
    call("openMaildrop stale", store.openMaildrop(alice))
    call("upgradeCredentials stale", store.upgradeCredentials(ALICE, alice.passwordHash, credentials))
    call("deleteUser", store.deleteUser(ALICE))
    call("deleteUser none", store.deleteUser(ALICE))
    call("close", store.close())
    return seen


def _fired(d):
    box = []
    d.addBoth(box.append)
    assert box, f"{d!r} has not fired"
    return box[0]


@pytest.mark.parametrize("kind", ["file", "faultInjecting", "threaded"])
def test_theInMemoryStoreBehavesAsTheServicesStore(tmp_path, kind):
    """
    What L{mailgate.testing.memoryStore} (an embedder's tests' store)
    answers, operation by operation, is what the store of a running
    service answers: a synchronous store on an SQLite file, the
    L{FaultInjectingStore} wrapping it (with no fault asked for), and the
    threaded store C{makeService} opens (L{mailgate.store.openStore}, its
    worker threads handing results to the reactor's thread).
    """
    from pumped import PumpedReactor

    from mailgate.store import openStore

    expected = _transcript(memoryStore(), _fired)
    if kind == "threaded":
        reactor = PumpedReactor()
        store, wait = openStore(f"sqlite:///{tmp_path / 'threaded.sqlite3'}", reactor), reactor.wait
    elif kind == "faultInjecting":
        store, wait = FaultInjectingStore(memoryStore()), _fired
    else:
        store, wait = memoryStore(f"sqlite:///{tmp_path / 'file.sqlite3'}"), _fired
    assert _transcript(store, wait) == expected


# -- mailgate.testing's own examples ----------------------------------------------


def _indentedExamples(text):
    """
    The blocks of code in C{text} (a docstring): lines indented by four
    spaces after an empty line, in order, dedented.
    """
    blocks, current, previous = [], [], ""
    for line in text.splitlines() + [""]:
        if line.startswith("    ") and (current or not previous.strip()):
            current.append(line)
        elif current and not line.strip():
            current.append(line)
        elif current:
            blocks.append(textwrap.dedent("\n".join(current)))
            current = []
        previous = line
    if current:
        blocks.append(textwrap.dedent("\n".join(current)))
    return blocks


def test_theExamplesOfMailgateTestingRunAsWritten():
    """
    The module's docstring (what C{help(mailgate.testing)} shows an
    embedder) runs as written, each example after the ones before it.
    Its failing-store example stopped at C{...} and used a session it
    never made (NameError), and the first example's import came after it.
    """
    import mailgate.testing

    examples = _indentedExamples(mailgate.testing.__doc__)
    namespace = {}
    for example in examples:
        exec(compile(example, "mailgate.testing's docstring", "exec"), namespace)
    assert len(examples) == 2


# -- a start that fails under twistd -----------------------------------------------


EXITING_TAC = textwrap.dedent('''
    import os

    from twisted.application import service

    from mailgate.service import MailgateConfig, makeService

    application = service.Application("host-application")
    config = MailgateConfig(
        database=os.environ["MAILGATE_DATABASE"], pop3=[os.environ["POP3"]], domains=["example.org"],
    )
    mailgate = makeService(config)
    mailgate.exitOnStartupError = True
    mailgate.setServiceParent(application)
''')


@pytest.mark.parametrize("how", ["tac", "plugin"])
def test_aStartThatExitsForAListenerLeavesNoPidFile(tmp_path, how):
    """
    README (Embedding): with C{exitOnStartupError = True}, a listener that
    cannot bind ends twistd with mailgate's one line and its exit status,
    as C{twistd mailgate} does.  Both also left twistd's pid file behind
    (twistd removes it for a start that failed with an exception, and
    mailgate's exit is no C{Exception}): the next start under the same
    pid (a container's twistd is PID 1 at every restart) was refused for
    good, "Another twistd server is running, PID 1".
    """
    import socket

    from e2e import TWISTD, childEnvironment, databaseURL

    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    busy = f"tcp:{held.getsockname()[1]}:interface=127.0.0.1"
    database = databaseURL(tmp_path / "mail.sqlite3")
    pidfile = tmp_path / "twistd.pid"
    if how == "tac":
        (tmp_path / "host.tac").write_text(EXITING_TAC)
        command = [TWISTD, "-n", "--pidfile", str(pidfile), "-y", str(tmp_path / "host.tac")]
    else:
        command = [TWISTD, "-n", "--pidfile", str(pidfile), "mailgate", "--database", database, "--pop3", busy]
    environment = dict(childEnvironment(), MAILGATE_DATABASE=database, POP3=busy)
    try:
        done = subprocess.run(
            command, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=3 * DEADLINE
        )
    finally:
        held.close()
    assert done.returncode == 1, done.stderr
    assert done.stderr.splitlines() == [
        f"mailgate: cannot listen for POP3 on {busy}: Couldn't listen on 127.0.0.1:{busy.split(':')[1]}: "
        "[Errno 98] Address already in use."
    ]
    assert not pidfile.exists()
