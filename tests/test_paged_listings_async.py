"""
The paged listings of a store (C{listUsers}, C{listMessages},
C{listDeleted} with C{page=N}, C{exportMessages}) as an application
embedding mailgate reads them from the store it has, the threaded one of
L{mailgate.store.openStore} (a service's): C{async for}, each later page
read on the store's worker threads while the reactor (here the test's
L{PumpedReactor}) goes on.  Past the first page, a plain C{for} works on
a synchronous store only; on a threaded store it raised L{RuntimeError}
and there was no other way through (an export of more than 1,000
messages, its default page, failed there).
"""

import gc
import importlib
import sqlite3
from contextlib import contextmanager

import pytest
from twisted.internet.defer import ensureDeferred
from twisted.python.failure import Failure

from mailgate.errors import NoSuchUser
from mailgate.message import spoolBytes
from mailgate.records import ExportedMessage
from mailgate.store import openStore
from mailgate.testing import POP3Session, addUser, deliver, memoryStore, readWhole, resultOf
from pumped import PumpedReactor

ALICE = "alice@example.org"
PAGE = 3
#: users: 11 (3 + 3 + 3 + 2 a page); Alice's kept deleted messages 10,
#: and messages 10 (3 + 3 + 3 + 1)
USERS = [f"user{n:02d}@example.org" for n in range(10)]
MESSAGES = 10

#: each listing, and the table its pages are read from
LISTINGS = {
    "listUsers": (lambda store: store.listUsers(page=PAGE), "users"),
    "listMessages": (lambda store: store.listMessages(ALICE, page=PAGE), "maildrop"),
    "listDeleted": (lambda store: store.listDeleted(ALICE, page=PAGE), "deleted_mail"),
    "exportMessages": (lambda store: store.exportMessages(ALICE, page=PAGE), "maildrop"),
}
OF_A_USER = ["listMessages", "listDeleted", "exportMessages"]


def _populated(url):
    """
    Fill the database at C{url} (through a synchronous store): users,
    Alice's kept deleted messages and her maildrop.
    """
    store = memoryStore(url)
    try:
        store.limits.keepDeletedDays = 3
        addUser(store, ALICE, "pw")
        for address in USERS:
            addUser(store, address, "pw")
        for n in range(MESSAGES):
            deliver(store, [ALICE], b"Subject: deleted %d\r\n\r\nbody %d\r\n" % (n, n))
        session = POP3Session(store)
        assert session.login(ALICE, "pw").startswith("+OK")
        for n in range(1, MESSAGES + 1):
            assert session.command(f"DELE {n}").startswith("+OK")
        assert session.command("QUIT").startswith("+OK")
        for n in range(MESSAGES):
            deliver(store, [ALICE], b"Subject: kept %d\r\n\r\n%s\r\n" % (n, b"x" * 100 * n))
    finally:
        store.close()


def _synchronously(url, name):
    """
    What C{for} gives of listing C{name} on a synchronous store of C{url}.
    """
    store = memoryStore(url)
    try:
        return [
            (m.number, m.size, m.uniqueId, m.arrived, readWhole(m.body)) if isinstance(m, ExportedMessage) else m
            for m in resultOf(LISTINGS[name][0](store))
        ]
    finally:
        store.close()


@contextmanager
def _threaded(url):
    """
    The threaded store an embedder has (L{openStore}), on a reactor the
    test drives.
    """
    reactor = PumpedReactor()
    store = openStore(url, reactor)
    try:
        yield store, reactor
    finally:
        reactor.wait(store.close())


def _asynchronously(reactor, listing, betweenPages=None):
    """
    What C{async for} gives of C{listing} (a message's body read too), or
    the L{Failure} it ends with; C{betweenPages()} awaited after the first
    page.
    """

    async def listed():
        rows = []
        async for item in listing:
            if isinstance(item, ExportedMessage):
                pieces = []
                while piece := await item.body.read():
                    pieces.append(piece)
                item = (item.number, item.size, item.uniqueId, item.arrived, b"".join(pieces))
            rows.append(item)
            if len(rows) == PAGE and betweenPages is not None:
                await betweenPages()
        return rows

    return reactor.wait(ensureDeferred(listed()))


def _loud(events):
    gc.collect()
    return [event for event in events if "log_failure" in event or event.get("isError")]


@pytest.mark.parametrize("name", list(LISTINGS))
def test_asyncForOnAThreadedStoreListsWhatForDoesOnASynchronousOne(databaseURL, name, logEvents):
    """
    C{async for} over a listing of the threaded store gives the rows, in
    order, that C{for} gives on a synchronous store of the same
    database, page after page (and an export's bodies); iterated again,
    the same again.  A message delivered while it is iterated is not in
    it.
    """
    _populated(databaseURL)
    expected = _synchronously(databaseURL, name)
    assert len(expected) == (len(USERS) + 1 if name == "listUsers" else MESSAGES)
    with _threaded(databaseURL) as (store, reactor):

        async def deliverOne():
            await store.deliver([ALICE], spoolBytes(b"Subject: late\r\n\r\nlate\r\n"))

        listing = reactor.wait(LISTINGS[name][0](store))
        assert _asynchronously(reactor, listing, deliverOne) == expected
        assert _asynchronously(reactor, listing) == expected
    assert _loud(logEvents) == []


@pytest.mark.parametrize("name", OF_A_USER)
def test_aUserRemovedBetweenPagesFailsTheIteration(databaseURL, name, logEvents):
    """
    The user removed after the first page was read: the next page's read
    fails, and C{async for} raises the store's L{NoSuchUser} (as the
    first page's read does for an address without a user), rather than
    ending as if the listing were whole; nothing is logged.
    """
    _populated(databaseURL)
    with _threaded(databaseURL) as (store, reactor):

        async def removeAlice():
            # As C{mailgate user delete} does meanwhile, from a process of its own.
            admin = memoryStore(databaseURL)
            try:
                resultOf(admin.deleteUser(ALICE))
            finally:
                admin.close()

        outcome = _asynchronously(reactor, reactor.wait(LISTINGS[name][0](store)), removeAlice)
    assert isinstance(outcome, Failure) and outcome.check(NoSuchUser), outcome
    assert _loud(logEvents) == []


def _renameTable(url, table):
    """
    Take C{table} away from the database behind the store's back, as a
    failing database would fail the store's next read of it.
    """
    statement = f"ALTER TABLE {table} RENAME TO {table}_gone"
    if url.startswith("sqlite:///"):
        with sqlite3.connect(url[len("sqlite:///"):]) as conn:
            conn.execute(statement)
    else:
        import psycopg

        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(statement)


@pytest.mark.parametrize("name", list(LISTINGS))
def test_aLaterPageTheDatabaseFailsFailsTheIteration(databaseURL, name, logEvents):
    """
    The database failing a later page's read: C{async for} raises what
    the store's read failed with (what an unpaged listing fails with
    too), without hanging or logging a traceback.
    """
    _populated(databaseURL)
    table = LISTINGS[name][1]
    with _threaded(databaseURL) as (store, reactor):

        async def failTheDatabase():
            _renameTable(databaseURL, table)

        outcome = _asynchronously(reactor, reactor.wait(LISTINGS[name][0](store)), failTheDatabase)
        unpaged = reactor.wait(store.listUsers() if table == "users" else store.listMessages(ALICE))
        if table == "deleted_mail":
            unpaged = reactor.wait(store.listDeleted(ALICE))
    assert isinstance(outcome, Failure) and isinstance(unpaged, Failure), (outcome, unpaged)
    # The same error, but for the statement PostgreSQL quotes.
    assert (outcome.type, outcome.getErrorMessage().split("\n")[0]) == (
        unpaged.type,
        unpaged.getErrorMessage().split("\n")[0],
    )
    assert _loud(logEvents) == []


@pytest.mark.parametrize("name", list(LISTINGS))
def test_forOnAThreadedStoreStillRefusesPastTheFirstPage(tmp_path, name, logEvents):
    """
    A plain C{for} past the first page cannot wait for the worker
    threads without blocking the reactor: it raises L{RuntimeError},
    which says to iterate with C{async for}; its read's result, which
    comes later, is not logged as unhandled.
    """
    url = f"sqlite:///{tmp_path / 'mail.sqlite3'}"
    _populated(url)
    with _threaded(url) as (store, reactor):
        listing = reactor.wait(LISTINGS[name][0](store))
        with pytest.raises(RuntimeError, match="async for"):
            list(listing)
    assert _loud(logEvents) == []


@pytest.mark.parametrize(
    "command, read",
    [("list", "mailgate.store.sql._messagePage"), ("deleted", "mailgate.store.lifecycle._deletedPage")],
)
def test_theCommandSaysTheUserWentAwayWhileItsListingPrinted(tmp_path, monkeypatch, command, read):
    """
    C{mailgate user delete} run while C{mailbox list} or C{deleted}
    prints a listing of the same user, between two of its pages: the
    command ends with C{no such user} (exit 67, one line), not with the
    listing cut short as if it were whole (exit 0).  (C{mailbox export}
    said so already, looking for what it left behind.)
    """
    from test_cli import CLI

    cli = CLI(tmp_path / "mail.sqlite3")
    _populated(cli.url)
    monkeypatch.setattr("mailgate.cli.mailboxes.LISTING_PAGE", PAGE)
    where, name = read.rsplit(".", 1)
    readPage = getattr(importlib.import_module(where), name)

    def racing(cursor, address, position, limit):
        if position is not None:
            admin = memoryStore(cli.url)
            try:
                resultOf(admin.deleteUser(ALICE))
            finally:
                admin.close()
        return readPage(cursor, address, position, limit)

    monkeypatch.setattr(read, racing)
    result = cli("mailbox", command, ALICE)
    assert (result.code, result.err) == (67, f"mailgate: no such user: {ALICE}\n"), result
