# -*- test-case-name: tests.test_lifecycle_cli -*-
"""
Listings the admin command prints a page at a time (C{mailbox list},
C{mailbox deleted}): read from the database a page of rows per read
transaction as they are printed, so that the command holds a page of a
maildrop of 100,000 messages, not all of them (56 and 68 MB for those two
listings, read whole).
"""

from twisted.python.failure import Failure

#: Rows a listing reads at a time.
LISTING_PAGE = 1000


class PagedListing:
    """
    The rows of a listing, read a page at a time from a synchronous store
    (the admin command's) as they are iterated; iterated again, read
    again.

    @ivar _read: an interaction C{read(cursor, *args, position, limit)}
        returning C{(position, rows)}: C{position} C{None} for the first
        page, else what the page before returned, so that the next one
        goes on after it.
    """

    def __init__(self, database, read, args, page, first):
        self._database = database
        self._read = read
        self._args = args
        self._page = page
        self._first = first

    def __iter__(self):
        position, rows = self._first
        while rows:
            yield from rows
            if len(rows) < self._page:
                return
            fired = []
            self._database.runInteraction(self._read, *self._args, position, self._page).addBoth(fired.append)
            if not fired:
                raise RuntimeError("a paged listing is read from a synchronous store")
            if isinstance(fired[0], Failure):
                fired[0].raiseException()
            position, rows = fired[0]


def pagedListing(database, read, args, page=None):
    """
    A L{Deferred} L{PagedListing} of C{read}'s rows (see there), its first
    page read already: a failure of that (no such user) is the
    L{Deferred}'s.
    """
    page = LISTING_PAGE if page is None else page
    d = database.runInteraction(read, *args, None, page)
    return d.addCallback(lambda first: PagedListing(database, read, args, page, first))


def numbered(listing, make):
    """
    C{make(number, *row)} for each row of C{listing}, numbered from 1, as
    it is iterated (again from 1 each time).
    """

    class Numbered:
        def __iter__(self):
            for number, row in enumerate(listing, 1):
                yield make(number, *row)

    return Numbered()
