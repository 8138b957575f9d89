"""
POP3 against a model of RFC 1939's maildrop, generated: Hypothesis runs
sequences of deliveries, imports, logins (USER/PASS, APOP, SASL PLAIN)
and commands (STAT, LIST, UIDL,
RETR, TOP, DELE, RSET, NOOP, QUIT, a dropped connection, a second login
while the maildrop is held, recovery of deleted mail, a quota near the
use, copies for a second user sharing the bodies), and every reply is
compared with what the model says a client must see, octet for octet for
the multi-line ones; after every step, the quota's count of the user's
use is what the maildrop holds.

The messages are what the store's fast paths are built around, so that
those paths meet their edges together rather than one at a time: small
messages read ahead many to a trip, messages longer than a stored chunk
(128 KiB) and than one read (four chunks), lines starting with "." on
either side of a chunk's edge, more such lines than a message's dot
offsets keep (10,000), a header longer than a chunk, messages without a
body or without a final line end, LF line ends, a copy's own fields
before the shared body (as LMTP stores C{Return-Path:} and
C{Delivered-To:}), and messages imported under a unique id of their own.
Clients read in order (RETR after RETR, the read-ahead's run), skip, go
back and pick; TOP's line counts fall inside, at and past a body's end.

On each backend: SQLite's private in-memory database, a real SQLite file
and PostgreSQL, through the in-memory session (L{POP3Session}, the
store's calls answered at once); and a real C{twistd mailgate} over
loopback TCP on a SQLite file and on PostgreSQL, over TLS (at once, and
after STLS), and as two nodes sharing one PostgreSQL database, for what
only a running server does (the store's threads, back-pressure, the TLS
layer, the lock let go after a session, and held across nodes).  A
second machine begins with about a thousand messages, where a login
stops carrying the unique ids and LIST goes out in batches.  The
examples are derandomised, the same on every run
(C{MAILGATE_MODEL_EXAMPLES} runs more of them, at random, for a longer
search: 300 to 1,500 a combination found nothing more than the one
defect below).

Found by it: a +OK written without the one-line reply's method (CAPA,
LIST, UIDL, RETR, TOP) did not forgive the refusals before it, so a
client refused once before each download was cut off at its twentieth.
"""

import base64
import hashlib
import os
import random
import re
import secrets
import socket
import ssl
import time

import attr
import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from mailgate.errors import QuotaExceeded
from mailgate.message import spoolBytes
from mailgate.pop3.protocol import POP3Server
from mailgate.store.reads import CHUNK_SIZE
from mailgate.store.snapshot import SNAPSHOT_UNIQUE_IDS
from mailgate.testing import POP3Session, addUser, memoryStore, resultOf

from e2e import DEADLINE, mailgate_server, postgresOnly, sqliteOnly  # noqa: F401 (a fixture)

PASSWORD = "model-Passw0rd"
MAX_BAD_COMMANDS = 20
# The name tests/certs.py's certificate (conftest's pair) is for.
TLS_NAME = "mail.example.test"
TOO_MANY = b"-ERR too many bad commands; closing the connection\r\n"
NOW = 1_796_000_000

EXAMPLES = int(os.environ.get("MAILGATE_MODEL_EXAMPLES", "60"))
MODEL = settings(
    max_examples=EXAMPLES,
    stateful_step_count=30,
    deadline=None,
    derandomize="MAILGATE_MODEL_EXAMPLES" not in os.environ,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
# Against a real server: each step a round trip or more.
SERVER_MODEL = settings(MODEL, max_examples=max(1, EXAMPLES // 2))


# -- messages -----------------------------------------------------------------

_WORDS = b"the of and mail to in is that dot line pop for it as was with be by on not".split()


def _textLines(rng, count):
    """
    C{count} lines of words, a few of them ".", "..", ".word" or empty.
    """
    lines = []
    for _ in range(count):
        kind = rng.random()
        if kind < 0.06:
            lines.append(b".")
        elif kind < 0.09:
            lines.append(b"..")
        elif kind < 0.16:
            lines.append(b"." + rng.choice(_WORDS))
        elif kind < 0.22:
            lines.append(b"")
        else:
            lines.append(b" ".join(rng.choice(_WORDS) for _ in range(rng.randint(1, 14))))
    return lines


def _padTo(lines, position, target):
    """
    Lines of filler from C{position} (octets, CRLF line ends) so that the
    next line starts exactly at C{target}; the new position.
    """
    gap = target - position
    assert gap >= 2
    while gap > 902:
        lines.append(b"p" * 900)
        gap -= 902
    lines.append(b"p" * (gap - 2))
    return target


def buildMessage(recipe):
    """
    The octets to deliver for C{recipe} (a draw of L{messages}), and the
    octets the store must keep and serve for them (CRLF line ends, a final
    one added where there was none).
    """
    rng = random.Random(recipe["seed"])
    lines = [b"Subject: model %d" % recipe["seed"]] if recipe["subject"] else []
    lines += [b"X-Line: " + line for line in _textLines(rng, recipe["headerLines"]) if line]
    if recipe["bigHeader"]:
        lines.append(b"X-Big: start")
        size = sum(len(line) + 2 for line in lines)
        while size < recipe["bigHeader"]:
            lines.append(b"\t" + b"h" * 70)
            size += 73
    if recipe["separator"]:
        lines.append(b"")
        for part in recipe["body"]:
            kind = part[0]
            if kind == "text":
                lines += _textLines(random.Random(part[1]), part[2])
            elif kind == "bulk":
                lines += [b"bulk line %06d of a long message, for more than one chunk" % n for n in range(part[1])]
            elif kind == "dots":
                lines += [b"." if n % 2 else b".d" for n in range(part[1])]
            else:
                # A chosen line (".", "..", ".x", ...) starting a few octets
                # from the next chunk's edge, or on it.
                _, offset, line = part
                position = sum(len(item) + 2 for item in lines)
                target = (position // CHUNK_SIZE + 1) * CHUNK_SIZE + offset
                while target - position < 2:
                    target += CHUNK_SIZE
                _padTo(lines, position, target)
                lines.append(line)
    elif not lines:
        lines = [b"Subject: header only"]
    kept = b"".join(line + b"\r\n" for line in lines)
    end = recipe["lineEnd"]
    sent = end.join(lines)
    # A message whose last line is empty has that line's end however it
    # was sent (without it, the line is not there).
    if recipe["finalEnd"] or lines[-1] == b"":
        sent += end
    return sent, kept


bodyParts = st.one_of(
    st.tuples(st.just("text"), st.integers(0, 2**32), st.integers(0, 30)),
    st.tuples(st.just("bulk"), st.sampled_from([5, 1700, 1800, 3700, 7500])),
    st.tuples(st.just("dots"), st.sampled_from([3, 10_001])),
    st.tuples(st.just("edge"), st.integers(-3, 3), st.sampled_from([b".", b"..", b".x", b"x", b""])),
)

messages = st.fixed_dictionaries({
    "seed": st.integers(0, 2**32),
    "subject": st.booleans(),
    "headerLines": st.integers(0, 4),
    "bigHeader": st.sampled_from([0, 0, 0, 0, 0, CHUNK_SIZE + 5000]),
    "separator": st.sampled_from([True, True, True, False]),
    "body": st.lists(bodyParts, max_size=4),
    "lineEnd": st.sampled_from([b"\r\n", b"\n"]),
    "finalEnd": st.sampled_from([True, True, False]),
})


def _sizeEvent(what, content):
    """
    Say in Hypothesis's statistics (C{--hypothesis-show-statistics}) which
    of the store's paths C{content} takes, so that a change of the
    strategies that stops reaching one shows.
    """
    if len(content) > 4 * CHUNK_SIZE:
        event(f"{what}: more than one read (4 chunks)")
    elif len(content) > CHUNK_SIZE:
        event(f"{what}: more than one chunk")
    else:
        event(f"{what}: one chunk")
    if content.count(b"\r\n.") > 10_000:
        event(f"{what}: more dot lines than offsets kept")


def stuffed(content):
    """
    C{content} as a multi-line POP3 reply carries it: lines starting with
    "." get another, then the terminating line.
    """
    lines = content.split(b"\r\n")
    assert lines[-1] == b""
    return b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines[:-1]) + b".\r\n"


def topOf(content, count):
    """
    What C{TOP n count} returns of C{content}: the header, the empty line
    after it, and C{count} lines of the body (the whole message if it has
    no empty line).
    """
    lines = content.split(b"\r\n")[:-1]
    if b"" not in lines:
        return content
    end = lines.index(b"") + 1 + count
    return b"".join(line + b"\r\n" for line in lines[:end])


class Message:
    def __init__(self, content, uidl):
        self.content = content
        self.uidl = uidl


# -- sessions: in memory, or a real server's over a socket ---------------------


def logIn(session, method, address, password):
    """
    Log in on C{session} by C{method}: USER and PASS, APOP (with the
    greeting's timestamp), SASL PLAIN with its initial response, or
    without it (the response after the server's empty challenge).

    @return: the last reply, as L{str}.
    """
    if method == "user":
        session.command(f"USER {address}")
        return session.command(f"PASS {password}")
    if method == "apop":
        stamp = re.search(r"<[^>]*>", session.greeting).group(0)
        return session.command(f"APOP {address} {hashlib.md5((stamp + password).encode()).hexdigest()}")
    response = base64.b64encode(f"\0{address}\0{password}".encode()).decode("ascii")
    if method == "plain":
        return session.command(f"AUTH PLAIN {response}")
    assert session.command("AUTH PLAIN") == "+ \r\n"
    return session.command(response)


#: how a client logs in (see L{logIn})
LOGINS = st.sampled_from(["user", "apop", "plain", "plain-continued"])


class MemorySession:
    """
    A session over a L{StringTransport} (L{POP3Session}), the store's
    calls answered at once.
    """

    def __init__(self, store):
        self._session = POP3Session(store)

    @property
    def greeting(self):
        return self._session.greeting

    def login(self, address, password, method="user", held=False):
        return logIn(self, method, address, password)

    def command(self, line):
        return self._session.command(line)

    def exchange(self, data, expected):
        """
        Send C{data} (lines) and return all of what the server wrote
        (C{expected}, what the model says, is for a socket's reads).
        """
        return self._session.send(data)

    def drop(self):
        self._session.protocol.connectionLost(None)

    @property
    def disconnected(self):
        return self._session.disconnected


class MemorySessions:
    def __init__(self, store):
        self.store = store

    def open(self):
        return MemorySession(self.store)


class SocketSession:
    """
    A session with a real server, over loopback TCP: a reply is read for
    as many octets as the model expects (within L{DEADLINE}), so that a
    shorter one fails the comparison and a longer one the next.
    """

    def __init__(self, port, context=None, starttls=False):
        self._port = port
        self._context = context
        self._starttls = starttls
        self._connect()

    def _connect(self):
        self._socket = socket.create_connection(("127.0.0.1", self._port), timeout=DEADLINE)
        if self._context is not None and not self._starttls:
            self._socket = self._context.wrap_socket(self._socket, server_hostname=TLS_NAME)
        self._buffer = b""
        self.greeting = self._line().decode("ascii")
        if self._starttls:
            # RFC 2595: the session goes on over TLS, from the same state.
            assert self.command("STLS").startswith("+OK")
            assert not self._buffer
            self._socket = self._context.wrap_socket(self._socket, server_hostname=TLS_NAME)

    def _fill(self):
        try:
            data = self._socket.recv(1 << 16)
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            data = b""
        if not data:
            raise EOFError("the server closed the connection")
        self._buffer += data

    def _line(self):
        while b"\r\n" not in self._buffer:
            self._fill()
        line, _, self._buffer = self._buffer.partition(b"\r\n")
        return line + b"\r\n"

    def _take(self, count):
        try:
            while len(self._buffer) < count:
                self._fill()
        except (EOFError, socket.timeout):
            pass
        taken, self._buffer = self._buffer[:count], self._buffer[count:]
        return taken

    def login(self, address, password, method="user", held=False):
        """
        L{logIn}.  A maildrop the server has not let go of yet (its last
        session ended a moment ago: the lock goes after the reply) is
        asked for again on a new connection, within L{DEADLINE}, unless the
        model says a session holds it (C{held}).
        """
        deadline = time.monotonic() + DEADLINE
        while True:
            reply = logIn(self, method, address, password)
            if held or "[IN-USE]" not in reply or time.monotonic() > deadline:
                return reply
            self._socket.close()
            time.sleep(0.01)
            self._connect()

    def command(self, line):
        self._socket.sendall(line.encode("ascii") + b"\r\n")
        return self._line().decode("utf-8", "replace")

    def exchange(self, data, expected):
        self._socket.sendall(data)
        return self._take(len(expected))

    def drop(self):
        self._socket.close()

    @property
    def disconnected(self):
        """
        Whether the server closes the connection (waited for, within
        L{DEADLINE}) with nothing more written.
        """
        try:
            while True:
                self._fill()
        except EOFError:
            return not self._buffer
        except socket.timeout:
            return False


class SocketSessions:
    """
    @param port: the server's port, or a list of several servers' (nodes
        sharing one database), each session opened on the next in turn.
    @param context: an C{ssl.SSLContext} for TLS, or C{None}.
    @param starttls: TLS begun by STLS (RFC 2595) rather than at once
        (POP3S).
    """

    def __init__(self, port, context=None, starttls=False):
        self.ports = port if isinstance(port, list) else [port]
        self.context = context
        self.starttls = starttls
        self._next = 0

    def open(self):
        port = self.ports[self._next % len(self.ports)]
        self._next += 1
        return SocketSession(port, self.context, self.starttls)


# -- the machine ----------------------------------------------------------------


class POP3Model(RuleBasedStateMachine):
    """
    One user's maildrop: L{present} is what a login finds, in order; a
    session's L{listing} is its snapshot, each message with whether the
    session marked it deleted.
    """

    def __init__(self, store, sessions):
        super().__init__()
        self.store = store
        self.sessions = sessions
        self.address = f"m{secrets.token_hex(5)}@model.test"
        # With an APOP secret too (the user's opt-in), for APOP logins.
        addUser(store, self.address, PASSWORD, apop=True)
        # A second user, given copies of some messages: its copies share
        # their bodies with the first user's, and stay whatever the first
        # user does with theirs.
        self.other = f"o{secrets.token_hex(5)}@model.test"
        addUser(store, self.other, PASSWORD)
        self.others = []
        self.present = []
        # Each message's place in the maildrop's order (its uid's): the
        # order of arrival, and restored mail takes a new one, after every
        # other message.
        self.places = {}
        self.removed = []
        self.session = None
        self.listing = None
        self.imported = 0
        # The message numbers a client read last, for reads in order.
        self.last = 0
        # The user's own quota: (octets, messages), None for no limit.
        self.quota = (None, None)
        # Within pipelined: the lines to send at once, with their replies.
        self.batch = None
        # The reason the user is disabled for ("" for none), or None.
        self.disabled = None

    def teardown(self):
        if self.session is not None:
            self.session.drop()
            self.session = None

    @invariant()
    def useIsWhatIsStored(self):
        """
        The quota's count of the user's use is the messages the user has
        (those a session marked deleted too, until its QUIT), each with
        its own fields.
        """
        status = resultOf(self.store.quotaOf(self.address))
        assert (status.usedMessages, status.usedOctets) == (len(self.present), sum(len(m.content) for m in self.present))

    def _fits(self, octets):
        used = sum(len(m.content) for m in self.present)
        maxOctets, maxMessages = self.quota
        return (maxOctets is None or used + octets <= maxOctets) and (
            maxMessages is None or len(self.present) + 1 <= maxMessages
        )

    # -- what arrives ----------------------------------------------------

    @rule(recipe=messages, ownFields=st.booleans(), copy=st.booleans())
    def deliver(self, recipe, ownFields, copy):
        sent, kept = buildMessage(recipe)
        source = spoolBytes(sent)
        recipients = [self.address, self.other] if copy else [self.address]
        prefixes = {}
        if ownFields:
            prefixes = {r: b"Return-Path: <s@model.test>\r\nDelivered-To: " + r.encode() + b"\r\n" for r in recipients}
            source.copyPrefixes = prefixes
        fits = self._fits(len(prefixes.get(self.address, b"") + kept))
        try:
            result = resultOf(self.store.deliver(recipients, source))
        finally:
            source.close()
        if copy:
            assert isinstance(result[self.other], str)
            self._otherArrives(prefixes.get(self.other, b"") + kept)
        if not fits:
            assert isinstance(result[self.address], QuotaExceeded), result
            return
        # A session's snapshot does not see it; the next login does.
        self._arrive(Message(prefixes.get(self.address, b"") + kept, result[self.address]))

    @rule(octets=st.one_of(st.none(), st.integers(-2000, 300_000)), messages=st.one_of(st.none(), st.integers(-1, 3)))
    def setQuota(self, octets, messages):
        """
        A quota near the use: a delivery after it fits or does not.
        """
        if octets is not None:
            octets = max(0, sum(len(m.content) for m in self.present) + octets)
        if messages is not None:
            messages = max(0, len(self.present) + messages)
        resultOf(self.store.setQuota(self.address, -1 if octets is None else octets, -1 if messages is None else messages))
        self.quota = (octets, messages)

    @precondition(lambda self: self.others)
    @rule(deleting=st.integers(0, 2))
    def otherDownloads(self, deleting):
        """
        The other user downloads its copies, and deletes the first few.
        """
        # Each user's maildrop has a lock of its own: whether the first
        # user's session is open or not, this one logs in.
        session = self.sessions.open()
        assert session.login(self.other, PASSWORD).startswith("+OK")
        for number, content in enumerate(self.others, 1):
            expected = b"+OK %d octets\r\n" % len(content) + stuffed(content)
            assert session.exchange(b"RETR %d\r\n" % number, expected) == expected
        for number in range(1, min(deleting, len(self.others)) + 1):
            assert session.command(f"DELE {number}") == f"+OK message {number} deleted\r\n"
        assert session.command("QUIT").startswith("+OK")
        self._othersDeleted(deleting)

    @rule(recipe=messages)
    def importOne(self, recipe):
        sent, kept = buildMessage(recipe)
        self.imported += 1
        uidl = f"imported-{self.imported}"
        source = spoolBytes(sent)
        try:
            imported, skipped, conflicts = resultOf(
                self.store.importMessages(self.address, [(uidl, source, self._importedAt())])
            )
        finally:
            source.close()
        assert (imported, skipped, conflicts) == ([uidl], [], [])
        self._arrive(Message(kept, uidl))

    # What a machine built on this one (test_lifecycle_model's) hooks into:
    # a message arriving, a copy arriving for the second user, copies
    # deleted by them, an import's arrival time, deleted mail restored,
    # and the end of a session with what it deleted (L{_gone}).

    def _arrive(self, message):
        self.present.append(message)
        self.places[message.uidl] = len(self.places)

    def _otherArrives(self, content):
        self.others.append(content)

    def _othersDeleted(self, count):
        del self.others[:count]

    def _importedAt(self):
        return NOW

    def _restored(self, restored):
        pass

    @precondition(lambda self: self.session is None and self.removed)
    @rule()
    def restoreDeleted(self):
        restored, missing = resultOf(self.store.restoreDeleted(self.address))
        assert missing == []
        assert sorted(old for old, _ in restored) == sorted(m.uidl for m in self.removed)
        assert all(old == new for old, new in restored)
        # After every other message, as new mail, in the order they had
        # (their uids'), each given a new place.
        restored = sorted(self.removed, key=lambda m: self.places[m.uidl])
        for message in restored:
            self.places[message.uidl] = len(self.places)
        self.present += restored
        self.removed = []
        self._restored(restored)

    # -- sessions --------------------------------------------------------

    @precondition(lambda self: self.session is None)
    @rule(method=LOGINS)
    def login(self, method):
        session = self.sessions.open()
        count, octets = len(self.present), sum(len(m.content) for m in self.present)
        reply = session.login(self.address, PASSWORD, method)
        if self.disabled is not None:
            # The right password, and the user disabled: told why (or
            # Dovecot's words without a reason), at once, on the server
            # that remembers the password too.
            assert reply.startswith("-ERR [AUTH] ") and reply.endswith(f"{self.disabled}\r\n"), reply
            session.drop()
            return
        self.session = session
        assert reply == f"+OK {self.address} has {count} messages ({octets} octets)\r\n"
        self.listing = [[message, False] for message in self.present]
        self.last = 0
        self.refusals = 0

    @rule(reason=st.sampled_from(["moved to the new server", ""]))
    def disable(self, reason):
        """
        The administrator disables the user (C{mailgate user disable}): a
        session open goes on; the next login is refused.
        """
        resultOf(self.store.disableUser(self.address, reason or None))
        self.disabled = reason

    @precondition(lambda self: self.disabled is not None)
    @rule()
    def enable(self):
        resultOf(self.store.enableUser(self.address))
        self.disabled = None

    @precondition(lambda self: self.session is not None)
    @rule(method=LOGINS)
    def secondLogin(self, method):
        other = self.sessions.open()
        reply = other.login(self.address, PASSWORD, method, held=True)
        assert reply.startswith("-ERR [IN-USE] "), reply
        other.drop()

    @precondition(lambda self: self.session is not None)
    @rule()
    def quit(self):
        reply = self.session.command("QUIT")
        assert reply.startswith("+OK "), reply
        assert self.session.disconnected
        self._gone([message for message, deleted in self.listing if deleted])

    @precondition(lambda self: self.session is not None)
    @rule()
    def dropConnection(self):
        # The client goes away without QUIT: nothing it marked is deleted.
        self.session.drop()
        self._gone([])

    def _gone(self, deleted):
        self.removed += deleted
        self.present = [message for message in self.present if message not in deleted]
        self.session = None
        self.listing = None

    # -- commands --------------------------------------------------------

    def _visible(self):
        return [(n, message) for n, (message, deleted) in enumerate(self.listing, 1) if not deleted]

    def _number(self, data):
        """
        A message number to ask for: one of the listing's, read in order,
        or one no message has (0, past the end, a deleted one).
        """
        size = len(self.listing)
        how = data.draw(st.sampled_from(["next", "same", "any", "any", "outside"]))
        if size and how == "next" and self.last < size:
            return self.last + 1
        if size and how == "same" and self.last:
            return self.last
        if size and how != "outside":
            return data.draw(st.integers(1, size))
        return data.draw(st.sampled_from([0, size + 1, size + 7]))

    def _missing(self, number):
        """
        The -ERR for a message number that names no message, or C{None}.
        """
        if not 1 <= number <= len(self.listing):
            return b"-ERR no such message: %d\r\n" % number
        if self.listing[number - 1][1]:
            return b"-ERR message %d is deleted\r\n" % number
        return None

    def _expect(self, line, expected, refused=None):
        """
        Send C{line} and check its reply: C{expected} (octets), or the
        refusal C{refused} if given.  Refusals one after the other are
        counted, as the server does (and Dovecot): the twentieth also
        closes the session, and what it marked is not deleted.  Within
        L{pipelined}, the line and its reply are kept to be sent and
        checked with the others.

        @return: whether the session is still open.
        """
        want = expected if refused is None else refused
        closes = False
        if refused is None:
            self.refusals = 0
        else:
            self.refusals += 1
            closes = self.refusals >= MAX_BAD_COMMANDS
        session = self.session
        if closes:
            want += TOO_MANY
            self._gone([])
        if self.batch is not None:
            self.batch.append((line, want, closes))
            return not closes
        self._check(session, [(line, want, closes)])
        return not closes

    def _check(self, session, exchanges):
        """
        Send the lines of C{exchanges} in one write, and check that the
        replies are theirs, in order (and the session closed after the
        last, if it closes it).
        """
        wire = b"".join(line.encode("ascii") + b"\r\n" for line, _, _ in exchanges)
        want = b"".join(reply for _, reply, _ in exchanges)
        assert session.exchange(wire, want) == want
        if exchanges and exchanges[-1][2]:
            assert session.disconnected

    def _lines(self, status, items):
        return (status + "\r\n" + "".join(f"{n} {item}\r\n" for n, item in items) + ".\r\n").encode("ascii")

    @precondition(lambda self: self.session is not None)
    @rule()
    def stat(self):
        visible = self._visible()
        octets = sum(len(m.content) for _, m in visible)
        self._expect("STAT", b"+OK %d %d\r\n" % (len(visible), octets))

    @precondition(lambda self: self.session is not None)
    @rule(one=st.booleans(), data=st.data())
    def listMessages(self, one, data):
        if one:
            number = self._number(data)
            missing = self._missing(number)
            size = 0 if missing else len(self.listing[number - 1][0].content)
            self._expect(f"LIST {number}", b"+OK %d %d\r\n" % (number, size), missing)
            return
        visible = self._visible()
        octets = sum(len(m.content) for _, m in visible)
        # "messages" whatever the count, as in RFC 1939's examples.
        status = f"+OK {len(visible)} messages ({octets} octets)"
        self._expect("LIST", self._lines(status, [(n, len(m.content)) for n, m in visible]))

    @precondition(lambda self: self.session is not None)
    @rule(one=st.booleans(), data=st.data())
    def uidl(self, one, data):
        if one:
            number = self._number(data)
            missing = self._missing(number)
            uidl = "" if missing else self.listing[number - 1][0].uidl
            self._expect(f"UIDL {number}", f"+OK {number} {uidl}\r\n".encode("ascii"), missing)
            return
        self._expect("UIDL", self._lines("+OK unique-id listing follows", [(n, m.uidl) for n, m in self._visible()]))

    def _read(self, number, lines=None):
        """
        RETR C{number}, or with C{lines} TOP C{number} C{lines}, checked
        octet for octet; whether the session is still open.
        """
        missing = self._missing(number)
        content = b"" if missing else self.listing[number - 1][0].content
        if lines is None:
            command, expected = f"RETR {number}", b"+OK %d octets\r\n" % len(content) + stuffed(content)
        else:
            command, expected = f"TOP {number} {lines}", b"+OK top of message follows\r\n" + stuffed(topOf(content, lines))
        if not missing:
            _sizeEvent(command.split()[0], content)
            self.last = number
        return self._expect(command, expected, missing)

    @precondition(lambda self: self.session is not None)
    @rule(data=st.data())
    def retr(self, data):
        self._read(self._number(data))

    @precondition(lambda self: self.session is not None)
    @rule(data=st.data(), lines=st.sampled_from([0, 0, 1, 2, 5, 40, 2000, 10**6]))
    def top(self, data, lines):
        self._read(self._number(data), lines)

    @precondition(lambda self: self.session is not None)
    @rule(headers=st.booleans(), lines=st.sampled_from([0, 0, 3]), start=st.integers(0, 3), stride=st.sampled_from([1, 1, 2, 6]))
    def downloadAll(self, headers, lines, start, stride):
        """
        What a client that downloads its mail does: RETR (or TOP n 0, the
        headers of all) of the messages in order, from some message on,
        every one or skipping some; the deleted ones refused.
        """
        for number in range(start + 1, len(self.listing) + 1, stride):
            if not self._read(number, lines if headers else None):
                return

    @precondition(lambda self: self.session is not None)
    @rule(data=st.data(), count=st.integers(2, 8))
    def pipelined(self, data, count):
        """
        Commands sent in one write (RFC 2449's PIPELINING): the replies
        come in order, each what it would be alone; a long message's
        streaming holds the commands after it back.
        """
        session = self.session
        self.batch = []
        try:
            for _ in range(count):
                if self.session is None:
                    # The last refusal closed it: nothing more is sent.
                    break
                step = data.draw(st.sampled_from(["stat", "list", "uidl", "retr", "top", "dele", "rset", "noop"]))
                if step in ("list", "uidl"):
                    getattr(self, "listMessages" if step == "list" else "uidl")(data.draw(st.booleans()), data)
                elif step == "top":
                    self.top(data, data.draw(st.sampled_from([0, 1, 40])))
                elif step in ("retr", "dele"):
                    getattr(self, step)(data)
                else:
                    getattr(self, step)()
        finally:
            batch, self.batch = self.batch, None
        self._check(session, batch)

    @precondition(lambda self: self.session is not None)
    @rule(data=st.data())
    def dele(self, data):
        number = self._number(data)
        missing = self._missing(number)
        if self._expect(f"DELE {number}", b"+OK message %d deleted\r\n" % number, missing) and not missing:
            self.listing[number - 1][1] = True

    @precondition(lambda self: self.session is not None)
    @rule()
    def rset(self):
        count = len(self.listing)
        octets = sum(len(m.content) for m, _ in self.listing)
        self._expect("RSET", b"+OK maildrop has %d messages (%d octets)\r\n" % (count, octets))
        for entry in self.listing:
            entry[1] = False

    @precondition(lambda self: self.session is not None)
    @rule()
    def noop(self):
        self._expect("NOOP", b"+OK\r\n")


class LargeMaildropModel(POP3Model):
    """
    The same, from a maildrop of about a thousand messages: where a
    login's snapshot stops carrying the unique ids (a larger maildrop's
    are read when asked for: L{SNAPSHOT_UNIQUE_IDS}) and a LIST goes out
    in batches (L{POP3Server.listBatch}).
    """

    @initialize(count=st.sampled_from([SNAPSHOT_UNIQUE_IDS - 1, SNAPSHOT_UNIQUE_IDS, SNAPSHOT_UNIQUE_IDS + 1, 1500]))
    def manyMessages(self, count):
        assert POP3Server.listBatch == SNAPSHOT_UNIQUE_IDS
        items = []
        for n in range(count):
            content = b"Subject: %d\r\n\r\n%sbody %d\r\n" % (n, b".dot\r\n" if n % 7 == 0 else b"", n)
            items.append((f"bulk-{n}", content))
        spools = [(uidl, spoolBytes(content), NOW) for uidl, content in items]
        try:
            imported, skipped, conflicts = resultOf(self.store.importMessages(self.address, spools))
        finally:
            for _, spool, _ in spools:
                spool.close()
        assert (len(imported), skipped, conflicts) == (count, [], [])
        for uidl, content in items:
            self._arrive(Message(content, uidl))

    @precondition(lambda self: self.session is not None)
    @rule(data=st.data())
    def listings(self, data):
        """
        The listings whose paths change at this size, more often than the
        other rules would ask for them: LIST, UIDL, and one message's.
        """
        self.listMessages(False, data)
        self.uidl(False, data)
        self.uidl(True, data)


# A few examples: each begins with a thousand messages.
LARGE_MODEL = settings(MODEL, max_examples=max(1, EXAMPLES // 3), stateful_step_count=20)


# -- the tests --------------------------------------------------------------------


def openStore(request, tmp_path, **limits):
    """
    A synchronous store on the backend C{request.param} names (C{"memory"},
    C{"sqlite"}: a file, C{"postgres"}: a fresh schema), with C{limits}
    changed from the defaults.
    """
    if request.param == "memory":
        url = "sqlite:///:memory:"
    elif request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'model.sqlite3'}"
    else:
        url = request.getfixturevalue("postgresURL")
    store = memoryStore(url)
    store.limits = attr.evolve(store.limits, **limits)
    return store


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def modelStore(request, tmp_path):
    # Deleted mail kept, for the restores.
    store = openStore(request, tmp_path, keepDeletedDays=30)
    yield store
    store.close()


def test_pop3AnswersAsTheModelSays(modelStore):
    """
    Every reply of every generated sequence is the model's (each example a
    user of its own in the one database).
    """
    run_state_machine_as_test(lambda: POP3Model(modelStore, MemorySessions(modelStore)), settings=MODEL)


def test_aRealServerAnswersAsTheModelSays(mailgate_server):
    """
    The same against a real C{twistd mailgate} over loopback TCP (the
    store's threads, PostgreSQL's connections on the reactor, a long
    message's streaming under back-pressure), the mail delivered into its
    database by this process.
    """
    # --apop: the greeting's timestamp from the start (by default, once
    # the server has seen a user with APOP enabled).
    server = mailgate_server("--keep-deleted-days", "30", "--apop")
    store = memoryStore(mailgate_server.database)
    store.limits = attr.evolve(store.limits, keepDeletedDays=30)
    try:
        run_state_machine_as_test(lambda: POP3Model(store, SocketSessions(server.port)), settings=SERVER_MODEL)
    finally:
        store.close()


@postgresOnly
def test_twoNodesAnswerAsTheModelSays(mailgate_server):
    """
    The same against two nodes sharing one PostgreSQL database, each
    session on the other node than the last: a maildrop held on one is
    in use on the other, a disabled user is refused by the node that
    remembers the password, and each node serves what the other's
    sessions left.
    """
    nodes = [
        mailgate_server("--hostname", f"{name}.test", "--keep-deleted-days", "30", "--apop") for name in ("a", "b")
    ]
    store = memoryStore(mailgate_server.database)
    try:
        sessions = SocketSessions([node.port for node in nodes])
        run_state_machine_as_test(lambda: POP3Model(store, sessions), settings=SERVER_MODEL)
    finally:
        store.close()


def test_aLargeMaildropAnswersAsTheModelSays(modelStore):
    run_state_machine_as_test(lambda: LargeMaildropModel(modelStore, MemorySessions(modelStore)), settings=LARGE_MODEL)


@sqliteOnly
def test_aRealServerWithALargeMaildropAnswersAsTheModelSays(mailgate_server):
    server = mailgate_server("--keep-deleted-days", "30", "--apop")
    store = memoryStore(mailgate_server.database)
    try:
        sessions = SocketSessions(server.port)
        run_state_machine_as_test(lambda: LargeMaildropModel(store, sessions), settings=LARGE_MODEL)
    finally:
        store.close()


@sqliteOnly
@pytest.mark.parametrize("starttls", [False, True], ids=["pop3s", "stls"])
def test_aRealServerOverTLSAnswersAsTheModelSays(mailgate_server, pair, starttls):
    """
    The same over TLS (TLS 1.3 by the ssl module), at once (POP3S) or
    after STLS: a long message's streaming and pipelined replies through
    the TLS layer.
    """
    certificate, key = pair
    server = mailgate_server(
        "--keep-deleted-days", "30", "--apop", "--tls-cert", str(certificate), "--tls-key", str(key),
        "--pop3s", "tcp:0:interface=127.0.0.1",
    )
    context = ssl.create_default_context(cafile=str(certificate))
    store = memoryStore(mailgate_server.database)
    try:
        port = server.portOf("POP3") if starttls else server.portOf("POP3S")
        sessions = SocketSessions(port, context, starttls)
        run_state_machine_as_test(lambda: POP3Model(store, sessions), settings=SERVER_MODEL)
    finally:
        store.close()
