"""
The quota-status service (C{--quota-status}) fed what Postfix sends and
what it never would, generated: requests as Postfix's smtpd sends them at
RCPT (users over quota, with room, without a quota, unknown, other
domains; declared sizes or none), empty requests, and lines that are no
attribute, in whatever pieces a connection delivers them.

Each request is answered as it is answered alone, in order, until a line
that is no attribute, after which nothing is answered and the connection
is closed; whatever the octets, what goes back is only C{action=...} and
an empty line, and the same whatever the pieces, and whether the store
answers at once or after more pieces came.
"""

import copy
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import defer

from mailgate.testing import memoryStore

from test_quota_status import FREE, FULL, ROOMY, Connection, addQuotaUsers, factoryFor, request_
from fuzzing import fuzzSettings

FUZZ = fuzzSettings(200)
_ANSWER = re.compile(rb"action=[^\n]+\n\n")


@pytest.fixture(scope="module")
def quotaStore():
    """
    One store for every example: requests read it and never change it.
    """
    store = addQuotaUsers(memoryStore())
    yield store
    store.close()


recipients = st.sampled_from([FULL, ROOMY, FREE, "nobody@example.org", "someone@elsewhere.test", ""])
sizes = st.one_of(st.none(), st.sampled_from([0, 10, 5000, 9000, 20000, 10**12, "lots", "-5"]))
requests = st.tuples(recipients, sizes, st.sampled_from(["smtpd_access_policy", "other"]))
# A line that is no attribute: no "=" in it (nor a line end), and not
# empty once a CR before its LF is left out (an empty line ends a request).
garbage = st.binary(min_size=1, max_size=300).map(
    lambda b: b.replace(b"\n", b"").replace(b"=", b"").rstrip(b"\r") or b"x"
).map(lambda b: b + b"\n")
items = st.lists(st.one_of(requests, st.just(b"\n"), garbage), max_size=8)
cuts = st.lists(st.integers(min_value=1, max_value=200), max_size=40)


def _octets(item):
    if isinstance(item, tuple):
        recipient, size, request = item
        return request_(recipient, size, request)
    return item


def _sent(factory, data, pieces, later=False):
    """
    What goes back for C{data} sent in C{pieces}; C{later}: each check is
    answered only after the piece that asked it was read (as a database
    answers), the newest asked first.
    """
    pending = []
    if later:
        check = factory.check

        def checkLater(recipient, size, attributes):
            d = defer.Deferred()
            pending.append((d, (recipient, size, attributes)))
            return d

        factory = copy.copy(factory)
        factory.check = checkLater
    c = Connection(factory)
    position = 0
    for size in pieces + [len(data)]:
        if position >= len(data):
            break
        c.send(data[position : position + size])
        position += size
        # Each answer may let the next request of the buffer be asked:
        # at most one a request sent.
        for _ in range(data.count(b"\n") + 1):
            if not pending:
                break
            d, asked = pending.pop()
            defer.maybeDeferred(check, *asked).chainDeferred(d)
    assert not pending
    return c.read().encode("utf-8"), c.closed


def _alone(factory, item):
    """
    The answer to one request on a connection of its own.
    """
    c = Connection(factory)
    c.send(_octets(item))
    return c.read().encode("utf-8")


@FUZZ
@given(items, cuts, st.booleans())
def test_eachRequestIsAnsweredAsAloneUntilALineThatIsNoAttribute(quotaStore, sent, pieces, later):
    factory = factoryFor(quotaStore)
    expected, closes = b"", False
    for item in sent:
        if isinstance(item, bytes) and item != b"\n":
            # A line that is no attribute begins the next request: closed.
            closes = True
            break
        expected += _alone(factory, item)
    data = b"".join(_octets(item) for item in sent)
    out, closed = _sent(factory, data, pieces, later)
    assert out == expected
    assert closed == closes


@FUZZ
@given(st.binary(max_size=2000), cuts)
def test_anyOctetsGetOnlyAnswersAndTheSameWhateverThePieces(quotaStore, data, pieces):
    factory = factoryFor(quotaStore)
    whole = _sent(factory, data, [])
    assert _sent(factory, data, pieces) == whole
    out, closed = whole
    assert _ANSWER.sub(b"", out) == b""
    # A request is answered only at its empty line.
    assert out.count(b"\n\n") <= data.count(b"\n")
