# -*- test-case-name: tests.test_lifecycle_cli,tests.test_paged_listings_async -*-
"""
Listings read a page at a time as they are iterated (C{mailbox list},
C{mailbox deleted}, C{mailbox export}, an embedder's own listings): a
page of rows per read transaction, so that whoever iterates holds a page
of a maildrop of 100,000 messages, not all of them (56 and 68 MB for the
first two, read whole).
"""

from twisted.internet import defer
from twisted.python.failure import Failure

from mailgate.errors import NoSuchUser

#: Rows a listing reads at a time.
LISTING_PAGE = 1000


class PagedListing:
    """
    The items of a listing, read a page at a time as they are iterated;
    iterated again, read again (after its first page, read when it was
    made).  C{async for} reads each later page with the store's
    C{runInteraction} and awaits it, on any store; C{for} takes it as
    read, so from a synchronous store only (the admin command's), whose
    reads have fired on return: a threaded store's (a service's) cannot
    be waited for without blocking the reactor.

    @ivar _read: an interaction C{read(cursor, *args, position, limit)}
        returning C{(position, rows)}: C{position} C{None} for the first
        page, else what the page before returned, so that the next one
        goes on after it.
    @ivar _make: C{make(rows, before)}, the items of a page of C{rows}
        with C{before} items before it.
    """

    def __init__(self, database, read, args, page, first, make):
        self._database = database
        self._read = read
        self._args = args
        self._page = page
        self._first = first
        self._make = make

    def _following(self, page):
        """
        The page after C{page} (a C{(position, rows, before)}): a
        L{Deferred} of the same, or of C{None} after the last.
        """
        position, rows, before = page
        if len(rows) < self._page:
            return defer.succeed(None)
        d = self._database.runInteraction(self._read, *self._args, position, self._page)
        return d.addCallback(lambda read: (*read, before + len(rows)))

    def __iter__(self):
        page = (*self._first, 0)
        while page is not None:
            yield from self._make(*page[1:])
            page = _readAlready(self._following(page))

    async def __aiter__(self):
        page = (*self._first, 0)
        while page is not None:
            for item in self._make(*page[1:]):
                yield item
            page = await self._following(page)


def _readAlready(d):
    """
    The result of the read C{d}, which a synchronous store's has on
    return; a threaded store's is refused.
    """
    read = []
    d.addBoth(read.append)
    if not read:
        raise RuntimeError(
            "a paged listing is read past its first page with async for on a threaded store "
            "(for: from a synchronous store only)"
        )
    if isinstance(read[0], Failure):
        read[0].raiseException()
    return read[0]


def _asRead(rows, before):
    return rows


def pagedListing(database, read, args, page=None, make=_asRead):
    """
    A L{Deferred} L{PagedListing} of C{read}'s rows (see there), each
    page's items C{make(rows, before)} (the rows as read by default), its
    first page read already: a failure of that (no such user) is the
    L{Deferred}'s.
    """
    page = LISTING_PAGE if page is None else page
    d = database.runInteraction(read, *args, None, page)
    return d.addCallback(lambda first: PagedListing(database, read, args, page, first, make))


def numbered(make):
    """
    A L{PagedListing}'s C{make} of C{make(number, *row)} for each row,
    numbered from 1.
    """
    return lambda rows, before: (make(number, *row) for number, row in enumerate(rows, before + 1))


def stillListed(cursor, address, userId):
    """
    Raise L{NoSuchUser} if the user whose listing a later page goes on
    with (by id, whatever address she has since) is gone: her rows are,
    and the listing would end as if it were whole.
    """
    cursor.execute("SELECT 1 FROM users WHERE user_id = ?", (userId,))
    if cursor.fetchone() is None:
        raise NoSuchUser(address)
