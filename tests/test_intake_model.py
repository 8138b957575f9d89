"""
SMTP and LMTP intake against a model of RFC 5321's transaction (and RFC
2033's replies), generated: Hypothesis runs sequences of EHLO/HELO/LHLO,
MAIL, RCPT (to users, to an unknown local name, to another domain, the
same user twice, a user's address in other case), DATA, BDAT (in chunks
cut anywhere, refused before MAIL or without a recipient and then refused
until RSET), RSET and NOOP, and checks every reply against the model's;
then each user downloads its mail by POP3, and what a 250 after the data
promised is there, once per distinct recipient, octet for octet after the
trace fields, and nothing a refused transaction sent.

Transactions are sent command by command, and pipelined as RFC 2920
clients send them (MAIL, the RCPTs and DATA in one write; with BDAT, the
whole message too).  The messages are those of L{test_pop3_model} (lines
starting with ".", chunk edges, more than one chunk).  Refusals are kept
below the soft error limit (10): the limits themselves have tests of
their own.  On SQLite in memory, a SQLite file and PostgreSQL through the
in-memory session, and against a real C{twistd mailgate} over loopback
TCP on a SQLite file and PostgreSQL (and SMTP over STARTTLS); derandomised as L{test_pop3_model}
is (C{MAILGATE_MODEL_EXAMPLES} for a longer search: 300 a combination
found nothing).
"""

import re
import secrets
import socket
import ssl

import attr
import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, precondition, rule, run_state_machine_as_test

from mailgate.testing import POP3Session, SMTPSession, addUser, memoryStore

from e2e import DEADLINE, mailgate_server, sqliteOnly  # noqa: F401 (a fixture)
from test_pop3_model import MODEL, PASSWORD, SERVER_MODEL, TLS_NAME, buildMessage, messages, openStore, stuffed

SENDERS = ["<>", "<sender@far.test>", "<Mixed.Case@far.test>"]
#: what a whole transaction is drawn from: its sender, recipients (a
#: user, one in other case, an unknown local name, another domain),
#: message, and whether it goes by BDAT (in pieces cut where) or DATA
TRANSACTIONS = dict(
    sender=st.sampled_from(SENDERS),
    recipients=st.lists(st.sampled_from(["alice", "bob", "ALICE", "nobody", "foreign"]), min_size=1, max_size=4),
    recipe=messages,
    chunked=st.booleans(),
    cuts=st.lists(st.integers(0, 200_000), max_size=3),
)
# Below the soft error limit, from which an error reply may be held back.
MAX_REFUSALS = 8

_OK = re.compile(rb"250 2\.0\.0 OK: message accepted as [0-9A-F]+\r\n\Z")
_CHUNK = re.compile(rb"250 2\.0\.0 (\d+) octets received\r\n\Z")
_TRACE = re.compile(
    rb"\AReturn-Path: (<[^>\r\n]*>)\r\n(?:Delivered-To: [^\r\n]*\r\n)?Received: from [^\r\n]*\r\n(?:\t[^\r\n]*\r\n)+"
)


def cutAt(content, cuts):
    """
    C{content} in pieces cut at the offsets C{cuts} (past its end: at its
    end; an empty piece where two cuts meet).
    """
    edges = sorted(min(cut, len(content)) for cut in cuts)
    return [content[a:b] for a, b in zip([0] + edges, edges + [len(content)])]


class IntakeModel(RuleBasedStateMachine):
    """
    One session at a time (a new one after QUIT), the users' mail as the
    model says it must be stored: for each user, C{(sender, content)} of
    every message accepted for it, in order.
    """

    def __init__(self, store, lmtp, port=None, unknown=True, context=None):
        """
        @param port: a real server's SMTP (or LMTP) port to talk to, or
            C{None} for an in-memory session on C{store}.
        @param unknown: whether recipients include an unknown local name.
        @param context: an C{ssl.SSLContext} to begin TLS with by
            STARTTLS (on a real server), or C{None}.
        """
        super().__init__()
        self.store = store
        self.lmtp = lmtp
        self.port = port
        self.unknown = unknown
        self.context = context
        tag = secrets.token_hex(4)
        self.domain = f"i{tag}.test"
        self.users = [f"alice@{self.domain}", f"bob@{self.domain}"]
        for user in self.users:
            addUser(store, user, PASSWORD)
        self.stored = {user: [] for user in self.users}
        self.session = None
        self._newSession()

    def _newSession(self):
        if self.port is None:
            self.session = MemorySession(SMTPSession(self.store, lmtp=self.lmtp, domains=[self.domain]))
        else:
            self.session = SocketSession(self.port, self.context)
        self.hello = self.extended = False
        self.refusals = 0
        self._resetTransaction()

    def _resetTransaction(self):
        self.sender = None
        self.recipients = []
        # BDAT: the chunks taken so far (None: none sent), and whether a
        # chunk was refused (every BDAT is, until RSET).
        self.chunks = None
        self.chunkFailed = False

    def _send(self, data, replies=1):
        """
        Send C{data}; the C{replies} replies it gets (a multi-line one
        counts once).
        """
        return self.session.send(data, replies)

    def _refused(self, reply, code):
        assert reply.startswith(b"%d " % code), reply
        assert reply.count(b"\r\n") == 1, reply
        self.refusals += 1

    # -- the session's commands ------------------------------------------

    @rule(verb=st.sampled_from(["EHLO", "HELO"]))
    def hello_(self, verb):
        verb = "LHLO" if self.lmtp else verb
        reply = self._send(f"{verb} client.test\r\n".encode())
        if verb == "HELO":
            assert reply == b"250 mailgate.test greets client.test\r\n"
        else:
            assert reply.startswith(b"250-mailgate.test greets client.test\r\n")
            assert reply.endswith(b"250 CHUNKING\r\n")
        # A greeting ends the transaction, as RSET (RFC 5321 4.1.4).
        self.hello = True
        # CHUNKING is an extension: BDAT needs EHLO (or LHLO).
        self.extended = verb != "HELO"
        self._resetTransaction()

    @precondition(lambda self: self.refusals < MAX_REFUSALS)
    @rule(sender=st.sampled_from(SENDERS))
    def mail(self, sender):
        reply = self._send(f"MAIL FROM:{sender}\r\n".encode())
        if not self.hello or self.sender is not None:
            return self._refused(reply, 503)
        assert reply == b"250 2.1.0 sender %s OK\r\n" % sender.encode()
        self.sender = sender

    @precondition(lambda self: self.refusals < MAX_REFUSALS and len(self.recipients) < 12)
    @rule(who=st.sampled_from(["alice", "bob", "ALICE", "nobody", "foreign"]))
    def rcpt(self, who):
        address, known = self._recipient(who)
        reply = self._send(f"RCPT TO:<{address}>\r\n".encode())
        if self.sender is None or self.chunks is not None:
            # No MAIL, or the message's chunks have begun to arrive.
            return self._refused(reply, 503)
        if not known:
            # No such user here, or another domain (relaying).
            return self._refused(reply, 550)
        assert reply == b"250 2.1.5 recipient <%s> OK\r\n" % address.encode()
        self.recipients.append(address)

    def _recipient(self, who):
        """
        The address C{who} names (a user, one in other case, C{"nobody"}
        of this domain, or C{"foreign"}: another domain's), and whether
        it is a user's.  Without unknown recipients, C{"nobody"} is the
        foreign one.
        """
        if who == "nobody" and not self.unknown:
            who = "foreign"
        if who == "foreign":
            return "alice@elsewhere.test", False
        return f"{who}@{self.domain}", who != "nobody"

    def _delivered(self, reply, content):
        """
        Check the replies to a message's end (one, or in LMTP one per
        accepted RCPT, in their order) and record it for its distinct
        recipients.
        """
        if self.lmtp:
            lines = reply.split(b"\r\n")[:-1]
            assert len(lines) == len(self.recipients), reply
            for line, address in zip(lines, self.recipients):
                assert re.fullmatch(rb"250 2\.0\.0 <%s> delivered as \S+" % re.escape(address.encode()), line), line
        else:
            assert _OK.match(reply), reply
        for user in dict.fromkeys(address.lower() for address in self.recipients):
            self.stored[user].append((self.sender, content))
        # Delivered: the transaction is over, the errors before it forgiven.
        self.refusals = 0
        self._resetTransaction()

    @precondition(lambda self: self.chunks is None and not self.chunkFailed and self.refusals < MAX_REFUSALS)
    @rule(recipe=messages)
    def data(self, recipe):
        _, content = buildMessage(recipe)
        reply = self._send(b"DATA\r\n")
        if self.sender is None:
            return self._refused(reply, 503)
        if not self.recipients:
            return self._refused(reply, 503 if self.lmtp else 554)
        assert reply.startswith(b"354 "), reply
        self._delivered(self._send(stuffed(content), self._finalReplies()), content)

    def _finalReplies(self):
        # LMTP answers a message's end once per accepted recipient.
        return len(self.recipients) if self.lmtp else 1

    @precondition(lambda self: self.refusals < MAX_REFUSALS)
    @rule(recipe=messages, cuts=st.lists(st.integers(0, 200_000), max_size=3), last=st.booleans())
    def bdat(self, recipe, cuts, last):
        """
        The message in chunks cut anywhere (an empty one too), the last
        with LAST, or (C{last} false) only the first of them for now.
        """
        _, content = buildMessage(recipe)
        pieces = cutAt(content, cuts)
        if not last:
            pieces = pieces[:1]
        for n, piece in enumerate(pieces):
            final = last and n == len(pieces) - 1
            delivers = final and self.sender is not None and self.extended and not self.chunkFailed and self.recipients
            reply = self._send(
                b"BDAT %d%s\r\n" % (len(piece), b" LAST" if final else b"") + piece,
                self._finalReplies() if delivers else 1,
            )
            if self.sender is None or not self.extended:
                return self._refused(reply, 503)
            if self.chunkFailed:
                return self._refused(reply, 503)
            if not self.recipients:
                # The chunk is read, and the message failed: each BDAT
                # after it is refused until RSET.
                self.chunkFailed = True
                return self._refused(reply, 503 if self.lmtp else 554)
            taken = (self.chunks or []) + [piece]
            if final:
                self._delivered(reply, b"".join(taken))
            else:
                match = _CHUNK.match(reply)
                assert match and int(match.group(1)) == len(piece), reply
                self.chunks = taken

    @precondition(lambda self: self.chunks is None and not self.chunkFailed and self.refusals < MAX_REFUSALS - 4)
    @rule(**TRANSACTIONS)
    def transaction(self, sender, recipients, recipe, chunked, cuts):
        """
        A whole transaction, as a client sends one: what the session
        lacks of greeting and MAIL, the recipients, and the message by
        DATA or BDAT (the commands one at a time, checked as above).
        """
        if not self.hello:
            self.hello_("EHLO")
        if self.sender is None:
            self.mail(sender)
        for who in recipients:
            self.rcpt(who)
        if chunked:
            self.bdat(recipe, cuts, True)
        else:
            self.data(recipe)

    @precondition(
        lambda self: self.hello and self.sender is None and not self.chunkFailed and self.refusals < MAX_REFUSALS - 4
    )
    @rule(**TRANSACTIONS)
    def pipelinedTransaction(self, sender, recipients, recipe, chunked, cuts):
        """
        A transaction as a client that uses PIPELINING (RFC 2920) sends
        it: MAIL, the RCPTs and DATA in one write, the message once DATA
        is answered with 354; with BDAT, all of it in one write.  The
        replies come in order, each what it would be alone (the RCPTs'
        lookups in the store do not reorder them).
        """
        chunked = chunked and self.extended
        named = [self._recipient(who) for who in recipients]
        addresses = [address for address, _ in named]
        accepted = [address for address, known in named if known]
        _, content = buildMessage(recipe)
        wire = b"MAIL FROM:%s\r\n" % sender.encode() + b"".join(b"RCPT TO:<%s>\r\n" % a.encode() for a in addresses)
        expected = [b"250 2.1.0 sender %s OK\r\n" % sender.encode()] + [
            b"250 2.1.5 recipient <%s> OK\r\n" % a.encode() if a in accepted else b"550" for a in addresses
        ]
        noRecipients = b"503" if self.lmtp else b"554"
        if chunked:
            pieces = cutAt(content, cuts)
            for n, piece in enumerate(pieces):
                wire += b"BDAT %d%s\r\n" % (len(piece), b" LAST" if n == len(pieces) - 1 else b"") + piece
            if accepted:
                expected += [b"250 2.0.0 %d octets received\r\n" % len(piece) for piece in pieces[:-1]]
            else:
                # The first chunk finds no recipient; those after it, the
                # message failed.
                expected += [noRecipients] + [b"503"] * (len(pieces) - 1)
        else:
            wire += b"DATA\r\n"
            expected.append(b"354 " if accepted else noRecipients)
        count = len(expected)
        if chunked and accepted:
            # The last chunk's: one, or in LMTP one per accepted RCPT.
            count += len(accepted) if self.lmtp else 1
        replies = self._split(self._send(wire, count))
        assert len(replies) == count, replies
        # What the write got: each command's reply (a refusal by its code).
        for reply, want in zip(replies, expected):
            if want.endswith(b"\r\n"):
                assert reply == want
            else:
                assert reply.startswith(want), (reply, want)
        self.refusals += sum(1 for want in expected if not want.startswith((b"250", b"354")))
        self.sender = sender
        self.recipients = accepted
        if chunked:
            if accepted:
                self._delivered(b"".join(replies[len(expected):]), content)
            else:
                self.chunkFailed = True
            return
        if accepted:
            self._delivered(self._send(stuffed(content), self._finalReplies()), content)

    @staticmethod
    def _split(data):
        """
        The replies in C{data}, each whole (a multi-line one is one).
        """
        replies, current = [], b""
        for line in data.split(b"\r\n")[:-1]:
            current += line + b"\r\n"
            if line[3:4] != b"-":
                replies.append(current)
                current = b""
        assert not current, data
        return replies

    @rule()
    def rset(self):
        assert self._send(b"RSET\r\n") == b"250 2.0.0 OK\r\n"
        self._resetTransaction()

    @rule()
    def noop(self):
        assert self._send(b"NOOP\r\n") == b"250 2.0.0 OK\r\n"

    @rule()
    def quit(self):
        # What an unfinished transaction sent is dropped.
        assert self._send(b"QUIT\r\n").startswith(b"221 ")
        assert self.session.disconnected
        self._newSession()

    # -- what was stored -------------------------------------------------

    @precondition(lambda self: any(self.stored.values()))
    @rule(user=st.sampled_from([0, 1]))
    def download(self, user):
        """
        The user's mail by POP3, all of it and nothing else, each message
        its trace fields and then what was sent; deleted after.
        """
        address = self.users[user]
        expected = self.stored[address]
        pop3 = POP3Session(self.store)
        assert pop3.login(address, PASSWORD).startswith(f"+OK {address} has {len(expected)} messages")
        for number, (sender, content) in enumerate(expected, 1):
            reply = pop3.send(b"RETR %d\r\n" % number)
            status, _, body = reply.partition(b"\r\n")
            trace = _TRACE.match(body)
            assert trace, body[:300]
            assert trace.group(1) == sender.encode()
            # The trace fields start no line with ".": the rest is the
            # content as sent, stuffed again for POP3.
            assert body[trace.end():] == stuffed(content)
            assert status == b"+OK %d octets" % (trace.end() + len(content))
            assert pop3.command(f"DELE {number}") == f"+OK message {number} deleted\r\n"
        assert pop3.command("QUIT").startswith("+OK")
        self.stored[address] = []

    def teardown(self):
        self.session.drop()


class MemorySession:
    """
    An in-memory session (L{SMTPSession}): all of what the server wrote
    comes back from each write.
    """

    def __init__(self, session):
        self._session = session

    def send(self, data, replies):
        return self._session.send(data)

    def drop(self):
        if not self._session.disconnected:
            self._session.protocol.connectionLost(None)

    @property
    def disconnected(self):
        return self._session.disconnected


class SocketSession:
    """
    A session with a real server over loopback TCP: each write reads as
    many replies as the model expects (within L{DEADLINE}); a reply more
    shows in the next comparison.
    """

    def __init__(self, port, context=None):
        """
        @param context: an C{ssl.SSLContext} to begin TLS with by
            STARTTLS (RFC 3207) after the greeting, or C{None}.  The
            session is then as new: the model's first command is a greeting
            again, as RFC 3207 asks.
        """
        self._socket = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
        self._buffer = b""
        self.greeting = self._reply()
        if context is not None:
            assert self.send(b"EHLO client.test\r\n", 1).endswith(b"250 STARTTLS\r\n")
            assert self.send(b"STARTTLS\r\n", 1).startswith(b"220 ")
            assert not self._buffer
            self._socket = context.wrap_socket(self._socket, server_hostname=TLS_NAME)

    def _reply(self):
        lines = []
        while True:
            while b"\r\n" not in self._buffer:
                try:
                    data = self._socket.recv(1 << 16)
                except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                    data = b""
                if not data:
                    return b"".join(lines)
                self._buffer += data
            line, _, self._buffer = self._buffer.partition(b"\r\n")
            lines.append(line + b"\r\n")
            if line[3:4] != b"-":
                return b"".join(lines)

    def send(self, data, replies):
        self._socket.sendall(data)
        return b"".join(self._reply() for _ in range(replies))

    def drop(self):
        self._socket.close()

    @property
    def disconnected(self):
        try:
            more = self._socket.recv(1)
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            more = b""
        except OSError:
            return True
        return more == b"" and not self._buffer


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def intakeStore(request, tmp_path):
    # No duplicate suppression across examples' deliveries of the same
    # message: each one the model sends is a message of its own.
    store = openStore(request, tmp_path, duplicateWindow=0)
    yield store
    store.close()


@pytest.mark.parametrize("lmtp", [False, True], ids=["smtp", "lmtp"])
def test_intakeAnswersAndStoresAsTheModelSays(intakeStore, lmtp):
    run_state_machine_as_test(lambda: IntakeModel(intakeStore, lmtp), settings=MODEL)


@pytest.mark.parametrize("lmtp", [False, True], ids=["smtp", "lmtp"])
def test_aRealServersIntakeAnswersAndStoresAsTheModelSays(mailgate_server, lmtp):
    """
    The same against a real C{twistd mailgate} over loopback TCP (its
    store's threads and group commits), without unknown recipients: a
    server counts those by client address across sessions (address
    harvesting) and slows its answers, as it should.
    """
    server = mailgate_server(
        "--smtp", "tcp:0:interface=127.0.0.1", "--lmtp", "tcp:0:interface=127.0.0.1", "--duplicate-window", "0"
    )
    store = memoryStore(mailgate_server.database)
    port = server.portOf("LMTP" if lmtp else "SMTP")
    try:
        run_state_machine_as_test(lambda: IntakeModel(store, lmtp, port, unknown=False), settings=SERVER_MODEL)
    finally:
        store.close()


@sqliteOnly
def test_aRealServersIntakeOverSTARTTLSAnswersAndStoresAsTheModelSays(mailgate_server, pair):
    """
    The same by SMTP over TLS begun by STARTTLS: BDAT's chunks and
    DATA's lines through the TLS layer.
    """
    certificate, key = pair
    server = mailgate_server(
        "--smtp", "tcp:0:interface=127.0.0.1", "--duplicate-window", "0",
        "--tls-cert", str(certificate), "--tls-key", str(key),
    )
    context = ssl.create_default_context(cafile=str(certificate))
    store = memoryStore(mailgate_server.database)
    try:
        run_state_machine_as_test(
            lambda: IntakeModel(store, False, server.portOf("SMTP"), unknown=False, context=context),
            settings=SERVER_MODEL,
        )
    finally:
        store.close()
