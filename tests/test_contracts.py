"""
The contracts between the store's layers, checked against every
implementation: the engines (L{IEngine}), the databases (L{IDatabase}), the
maildrop locks (L{IMaildropLocks}) and the batchable delivery write
(L{IBatchableWrite}); and the lock-and-snapshot path they share, on both
backends.
"""

import pytest
from twisted.internet.task import Clock
from zope.interface.verify import verifyClass, verifyObject

from mailgate.errors import CredentialsChanged, MaildropInUse
from mailgate.interfaces import IBatchableWrite, IDatabase, IEngine, IMaildropLocks
from mailgate.store import engineFromURL
from mailgate.store.database import Database, SynchronousDatabase
from mailgate.store.snapshot import unpackSnapshot
from mailgate.store.sql import _deliver
from mailgate.testing import addUser, deliver, memoryStore, resultOf

ALICE = "alice@example.org"


@pytest.fixture
def postgresEngine(postgresURL):
    return engineFromURL(postgresURL)


def test_sqliteEngineProvidesIEngine(tmp_path):
    for url in (f"sqlite:///{tmp_path / 'mail.sqlite3'}", "sqlite:///:memory:"):
        engine = engineFromURL(url)
        assert verifyObject(IEngine, engine)
    assert engineFromURL("sqlite:///:memory:").ephemeral
    assert not engineFromURL(f"sqlite:///{tmp_path / 'mail.sqlite3'}").ephemeral


def test_postgresEngineProvidesIEngine(postgresEngine):
    assert verifyObject(IEngine, postgresEngine)
    assert not postgresEngine.ephemeral


def test_databasesProvideIDatabase(databaseURL):
    engine = engineFromURL(databaseURL)
    synchronous = SynchronousDatabase(engine)
    try:
        assert verifyObject(IDatabase, synchronous)
        assert synchronous.reactor is None
    finally:
        synchronous.close()
    clock = Clock()
    clock.callWhenRunning = lambda f, *a: None
    threaded = Database(engine, clock)
    assert verifyObject(IDatabase, threaded)
    assert threaded.reactor is clock
    threaded.close()


def test_theDeliveryWriteIsDeclaredBatchable():
    """
    Deliveries are what the group-commit writer batches and pipelines: the
    declaration it reads, not a function attribute it probes for.
    """
    assert verifyObject(IBatchableWrite, _deliver)
    assert _deliver.pipelined
    assert verifyClass(IBatchableWrite, type(_deliver))


def test_synchronousStoresLocksProvideIMaildropLocks(databaseURL):
    store = memoryStore(databaseURL)
    try:
        assert verifyObject(IMaildropLocks, store.locks)
    finally:
        store.close()


def test_reactorDrivenLocksProvideIMaildropLocks(postgresEngine):
    from mailgate.store.postgres import AdvisoryLocks

    locks = AdvisoryLocks(postgresEngine, Clock())
    assert verifyObject(IMaildropLocks, locks)
    resultOf(locks.close())


@pytest.mark.parametrize("databaseURL", ["sqlite", "postgres", "memory"], indirect=True)
def test_lockAndSnapshot(databaseURL):
    """
    The one snapshot statement, on each backend: the uids and sizes in uid
    order, large values included; the lock held; a changed password, or an
    address the user no longer has (renamed), gives the lock back.
    """
    store = memoryStore(databaseURL)
    try:
        user = addUser(store, ALICE, "pw")
        empty = resultOf(store.locks.acquireAndSnapshot(user.userId, user.passwordHash))
        assert [list(part) for part in empty] == [[], [], []]
        resultOf(store.locks.release(user.userId))
        bodies = [b"x" * n + b"\r\n" for n in (10, 0, 300000, 7)]
        for body in bodies:
            deliver(store, [ALICE], body)
        uids, sizes, uniqueIds = resultOf(store.locks.acquireAndSnapshot(user.userId, user.passwordHash))
        assert list(sizes) == [len(b) for b in bodies]
        assert list(uids) == sorted(uids) and len(set(uids)) == 4
        # ... and, the maildrop being small, their unique ids with them.
        assert uniqueIds == [m.uniqueId for m in resultOf(store.listMessages(ALICE))] and len(set(uniqueIds)) == 4
        # Held: a second session is refused.
        with pytest.raises(MaildropInUse):
            resultOf(store.locks.acquireAndSnapshot(user.userId, user.passwordHash))
        resultOf(store.locks.release(user.userId))
        with pytest.raises(CredentialsChanged):
            resultOf(store.locks.acquireAndSnapshot(user.userId, "$scrypt$not-the-stored-one"))
        # ... and the lock was given back.
        assert store.locks.writeGuard(user.userId) is None
        resultOf(store.locks.acquireAndSnapshot(user.userId, user.passwordHash, ALICE))
        resultOf(store.locks.release(user.userId))
        with pytest.raises(CredentialsChanged):
            resultOf(store.locks.acquireAndSnapshot(user.userId, user.passwordHash, "old@example.org"))
        assert store.locks.writeGuard(user.userId) is None
        resultOf(store.locks.acquireAndSnapshot(user.userId, None))
        resultOf(store.locks.release(user.userId))
    finally:
        store.close()


def test_unpackSnapshot():
    """
    The packing both engines produce: big-endian 64-bit pairs, as binary
    (PostgreSQL) or as hexadecimal text (SQLite).
    """
    packed = bytes.fromhex("0000000000000001" "000000012a05f200" "0000000000000009" "0000000000000000")
    for form in (packed, packed.hex()):
        row = ("h", form, "a@example.org", "u1 u9", None, None)
        uids, sizes, uniqueIds = unpackSnapshot([row], 1, "h", "a@example.org")
        assert (list(uids), list(sizes), uniqueIds) == ([1, 9], [5000000000, 0], ["u1", "u9"])
    # Fewer unique ids than messages (the snapshot carries those of a small
    # maildrop only): the session reads them when asked.
    assert unpackSnapshot([("h", packed, "a@example.org", b"u1", None, None)], 1, "h")[2] is None
    assert [list(a) for a in unpackSnapshot([(b"h", None, b"a@example.org", None, None, None)], 1, "h")] == [[], [], []]
    with pytest.raises(CredentialsChanged):
        unpackSnapshot([], 1, None)
    with pytest.raises(CredentialsChanged):
        unpackSnapshot([(b"other", None, b"a@example.org", None, None, None)], 1, "h")
    # The address is checked with the password hash: a renamed user's old
    # name no longer opens the maildrop.
    with pytest.raises(CredentialsChanged):
        unpackSnapshot([(b"h", None, b"new@example.org", None, None, None)], 1, "h", "a@example.org")
    renamed = [(b"h", None, b"new@example.org", None, None, None)]
    assert [list(a) for a in unpackSnapshot(renamed, 1, None, "a@example.org")] == [[], [], []]


def test_consecutiveCallsOfABatchableWriteAreMadeAsOne(tmp_path):
    """
    The group-commit writer hands consecutive calls of a L{BatchableWrite}
    to its C{together} at once, runs a plain function alone, and enters
    the engine's pipeline only when every write of the batch allows it.
    """
    from mailgate.store.database import BatchableWrite, runBatch

    engine = engineFromURL(f"sqlite:///{tmp_path / 'batch.sqlite3'}")
    conn = engine.connect()
    made = []
    pipelines = []
    realPipeline = engine.pipeline

    def pipeline(connection):
        pipelines.append(connection)
        return realPipeline(connection)

    engine.pipeline = pipeline

    def one(cursor, n):
        made.append(("one", n))
        return n

    def together(cursor, calls):
        made.append(("together", [args[0] for args, _ in calls]))
        return [args[0] * 10 for args, _ in calls]

    def plain(cursor, n):
        made.append(("plain", n))
        return -n

    write = BatchableWrite(one, together, pipelined=True)
    try:
        batch = [(write, (1,), {}), (write, (2,), {}), (write, (3,), {}), (plain, (4,), {}), (write, (5,), {})]
        results = runBatch(engine, conn, batch)
        assert results == [(True, 10), (True, 20), (True, 30), (True, -4), (True, 5)]
        assert made == [("together", [1, 2, 3]), ("plain", 4), ("one", 5)]
        assert pipelines == []
        made.clear()
        assert runBatch(engine, conn, batch[:3]) == [(True, 10), (True, 20), (True, 30)]
        assert pipelines == [conn]
    finally:
        conn.close()


def test_noGlobalReactorBelowTheService():
    """
    Below L{mailgate.service} the reactor is an argument, as in Twisted's
    endpoints: no module reaches for the global one (only the wiring on
    top, service.py, tap.py and the cli package, may).
    """
    import pathlib

    import mailgate

    root = pathlib.Path(mailgate.__file__).parent
    top = {"service.py", "tap.py"}
    reaching = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root).as_posix()
        if relative in top or relative.startswith("cli/"):
            continue
        text = path.read_text()
        if "import reactor" in text or "internet.reactor" in text:
            reaching.append(path.relative_to(root).as_posix())
    assert reaching == []


def test_everyInterfaceHasAnInMemoryImplementation():
    """
    Each contract of L{mailgate.interfaces} has an implementation a test
    or an embedder can use without a database server or a reactor, and it
    provides the whole contract: a new interface without one fails here.
    """
    from zope.interface.interface import InterfaceClass

    from mailgate import interfaces
    from mailgate.message import spoolBytes
    from mailgate.session import OpenPolicy
    from mailgate.policy.memory import MemoryPolicyStore

    store = memoryStore()
    try:
        addUser(store, ALICE, "pw")
        deliver(store, [ALICE], b"Subject: x\r\n\r\nbody\r\n")
        maildrop = resultOf(store.openMaildrop(resultOf(store.findUser(ALICE))))
        inMemory = {
            interfaces.IMessageSource: spoolBytes(b"Subject: x\n\nbody\n"),
            interfaces.IMessageBody: resultOf(maildrop.openMessage(0)),
            interfaces.IMessageReads: store.reads,
            interfaces.IMaildrop: maildrop,
            interfaces.IMaildropLocks: store.locks,
            interfaces.IMailStore: store,
            interfaces.ILifecycleStore: store,
            interfaces.IEngine: store.database.engine,
            interfaces.IDatabase: store.database,
            interfaces.IBatchableWrite: _deliver,
            interfaces.IConnectionPolicy: OpenPolicy(),
            interfaces.IPolicyStore: MemoryPolicyStore(),
        }
        declared = {
            value for value in vars(interfaces).values()
            if isinstance(value, InterfaceClass) and value.__module__ == interfaces.__name__
        }
        assert set(inMemory) == declared
        for interface, provider in inMemory.items():
            assert verifyObject(interface, provider), interface
        assert store.database.engine.ephemeral and store.database.reactor is None
        resultOf(maildrop.release())
    finally:
        store.close()


def _importsOf(package):
    """
    The mailgate modules each module of C{package} imports (at the top or
    inside a function), read from its source: C{{module: {imported}}}.
    """
    import ast
    import pathlib

    import mailgate

    root = pathlib.Path(mailgate.__file__).parent
    found = {}
    for path in sorted((root / package).rglob("*.py") if (root / package).is_dir() else [root / package]):
        parts = ("mailgate",) + path.relative_to(root).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        here = parts[:-1]
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = ".".join(here[: len(here) - node.level + 1]) if node.level else ""
                module = ".".join(filter(None, [base, node.module]))
                imported.update(f"{module}.{alias.name}" for alias in node.names)
        found[name] = {m for m in imported if m.startswith("mailgate.")}
    return found


def test_importsPointOneWay():
    """
    Protocols -> interfaces <- store: the protocols, the session core, the
    policy and the importers know no storage module (they see the store
    through L{mailgate.interfaces}); the store knows no protocol; and
    nothing below the wiring imports it (service.py, tap.py, cli/) or
    the test helpers (testing.py).
    """
    wiring = ("mailgate.service", "mailgate.tap", "mailgate.cli", "mailgate.testing")
    protocols = ("mailgate.pop3", "mailgate.smtp", "mailgate.auth", "mailgate.session")
    forbidden = {
        "pop3": ("mailgate.store", "mailgate.smtp", "mailgate.config") + wiring,
        "smtp": ("mailgate.store", "mailgate.pop3", "mailgate.config") + wiring,
        "auth": ("mailgate.store", "mailgate.pop3", "mailgate.smtp", "mailgate.config") + wiring,
        "session": ("mailgate.store", "mailgate.policy", "mailgate.config") + protocols[:3] + wiring,
        "policy": ("mailgate.store", "mailgate.config") + protocols + wiring,
        "importers": ("mailgate.store", "mailgate.config") + protocols + wiring,
        "store": ("mailgate.policy", "mailgate.importers", "mailgate.config") + protocols + wiring,
        "interfaces.py": ("mailgate.store", "mailgate.policy", "mailgate.importers") + protocols + wiring,
    }
    wrong = sorted(
        f"{module} imports {imported}"
        for package, refused in forbidden.items()
        for module, imports in _importsOf(package).items()
        for imported in imports
        if any(imported == r or imported.startswith(r + ".") for r in refused)
    )
    assert wrong == []


def _cycles(graph):
    """
    The strongly connected components of more than one module in
    C{graph} (C{{module: {module}}}), each as a sorted list (Tarjan).
    """
    index, low, stack, onStack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        onStack.add(node)
        for other in sorted(graph.get(node, ())):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in onStack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                onStack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_noModulesImportEachOther():
    """
    No two mailgate modules depend on each other, even through a third or
    by an import inside a function: a cycle means neither can be read,
    tested or moved without the other, and one of them holds what belongs
    in a module of its own.  (A package's C{__init__} that gathers its
    modules' names, and those modules importing a sibling, are no cycle.)
    """
    imports = _importsOf("")
    modules = set(imports)

    def moduleOf(name):
        while name not in modules:
            name = name.rpartition(".")[0]
        return name

    graph = {}
    for module, imported in imports.items():
        targets = {moduleOf(name) for name in imported} - {module}
        # a module importing its own package's face for a sibling's name
        # is an import of that sibling, which the face holds: not a cycle
        graph[module] = {t for t in targets if not module.startswith(t + ".")}
    assert _cycles(graph) == []
