"""
A bounded soak: real C{twistd mailgate} nodes (two on one PostgreSQL
database, keeping deleted mail; one on an SQLite file) under concurrent
SMTP and LMTP senders (DATA and BDAT, some cut off mid-message, some sent
again as an MTA retries), POP3 clients on every node (RETR, TOP, DELE,
then QUIT, RSET and QUIT, or a dropped connection) and an administrator
kicking sessions, for a few seconds, with one user's quota always nearly
full; then, once the load stopped, what the clients saw is checked
against what the nodes hold.

Races show as broken invariants rather than as crashes: a message a
client was told was stored and that is gone, one a confirmed QUIT
removed that is back, a unique id that named two messages, a copy stored
twice, a use that disagrees with the maildrop, a lock left held.  Every
client records what it was told, and only what it was told counts: a
reply that never arrived (a QUIT whose answer was lost, a 250 cut off
with its connection) leaves the outcome open, both ways, and is checked
as such.

Every loop is bounded by the load's duration and every socket operation
by a timeout; nothing asserts a time.  The seed of the run is in every
failure message, and C{MAILGATE_SOAK_SEED=N} runs with it again: the
clients' choices repeat, not the scheduling.

The PostgreSQL case runs on the suite's shared server: a test elsewhere
that stops it (test_multinode's restart) while this one runs fails it
with a storm of 451s and [SYS/TEMP]s, rightly.
"""

import hashlib
import json
import os
import poplib
import random
import re
import smtplib
import socket
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor

import pytest

from e2e import (  # noqa: F401 (mailgate_server, mailgate_cli are fixtures)
    LineReader,
    connect,
    mailgate_cli,
    mailgate_server,
    pop,
    retrieve,
    waitFor,
)

#: Seconds of load per case (MAILGATE_SOAK_SECONDS for a longer hunt by hand).
LOAD_SECONDS = float(os.environ.get("MAILGATE_SOAK_SECONDS") or 10)
#: Seconds any one client operation may take (a socket timeout).
CLIENT_TIMEOUT = 10.0
#: Seconds after the load for the sessions it left to end (dropped
#: connections, kicks under way) before a locked maildrop is a violation.
SETTLE_SECONDS = 8.0

DOMAIN = "example.org"
USERS = {f"user{i}@{DOMAIN}": f"password {i}" for i in range(4)}
SENDER = "sender@example.net"
#: One user is given a quota her mail reaches in the first seconds (and
#: one message in twenty exceeds on its own): her deliveries race for the
#: room her POP3 sessions make, on both nodes.
FULL = f"user3@{DOMAIN}"
QUOTA = 40_000

_TRACE = re.compile(
    rb"Return-Path: <[^\r\n]*>\r\nDelivered-To: [^\r\n]*\r\nReceived: from [^\r\n]*\r\n(?:\t[^\r\n]*\r\n)*\Z"
)
_MESSAGE_ID = re.compile(rb"^Message-ID: <([^>\r\n]+)>\r$", re.M | re.I)
_CHECKSUM = re.compile(rb"\r\nSHA256=([0-9a-f]{64})\r\n\Z")
_LMTP_DELIVERED = re.compile(r"<([^>]+)> (?:already )?delivered as (\S+)")
_BAD_LOG_LINE = re.compile(
    r"^.*(?:Traceback \(most recent call last\)|Unhandled|#critical\]|#error\]).*$", re.M
)


class Record:
    """
    Everything the clients were told, shared by their threads.

    @ivar sent: Message-ID -> the octets sent.
    @ivar outcomes: (Message-ID, address) -> [state, when, detail]: state
        C{"accepted"} (250; C{when} the time it was read), C{"refused"}
        (another reply), C{"unknown"} (no reply: the connection failed or
        timed out after the data was sent), C{"aborted"} (the client cut
        the message off before its end).
    @ivar sessions: one dict per POP3 session that logged in.
    @ivar uids: (address, unique id) -> Message-ID, as a RETR, a TOP or an
        LMTP reply showed it.
    @ivar sizes: (address, unique id) -> octets, as LIST showed them.
    @ivar kicks: (address, start, end, exit status).
    @ivar lingering: slow POP3 client to the user it is logged in as.
    @ivar retries: messages that may be sent again (as an MTA retries
        one whose reply it did not get), by protocol (LMTP or not): their
        Message-ID and recipients.
    @ivar violations: what broke, as text.
    """

    def __init__(self, seed):
        self.seed = seed
        self.lock = threading.Lock()
        self.sent = {}
        self.outcomes = {}
        self.sessions = []
        self.uids = {}
        self.sizes = {}
        self.kicks = []
        self.violations = []
        self.counts = Counter()
        self.retries = {False: [], True: []}
        self.lingering = {}
        self._next = 0

    def messageId(self):
        with self.lock:
            self._next += 1
            return f"soak.{self.seed}.{self._next}@client.test"

    def violation(self, text):
        with self.lock:
            self.violations.append(text)

    def count(self, what, n=1):
        with self.lock:
            self.counts[what] += n

    def outcome(self, msgid, address, state, detail=""):
        """
        What a client was told of a copy.  A copy once accepted stays
        accepted, from the first 250: what a retry of it is told does not
        change that.
        """
        with self.lock:
            known = self.outcomes.get((msgid, address))
            if known is None or known[0] != "accepted":
                self.outcomes[(msgid, address)] = [state, time.monotonic(), detail]

    def identify(self, address, uid, msgid, where):
        """
        Unique id C{uid} of C{address} was seen naming C{msgid}: it must
        never name another one.
        """
        with self.lock:
            known = self.uids.setdefault((address, uid), msgid)
        if known != msgid:
            self.violation(f"{address}: unique id {uid} named {known} and, {where}, {msgid}")

    def listed(self, address, uid, octets, where):
        with self.lock:
            known = self.sizes.setdefault((address, uid), octets)
        if known != octets:
            self.violation(f"{address}: unique id {uid} was {known} octets and, {where}, {octets}")


# -- the messages ------------------------------------------------------------


def makeMessage(rnd, msgid, recipients):
    """
    A message with a unique Message-ID and, as its last line, the SHA-256
    of the lines before it in its body: lines beginning with dots (and a
    lone "."), 8-bit octets, empty lines; now and then one larger than a
    storage chunk (128 KiB).
    """
    lines = []
    count = rnd.randint(1500, 2500) if rnd.random() < 0.05 else rnd.randint(1, 60)
    for i in range(count):
        kind = rnd.random()
        if kind < 0.1:
            line = b"." * rnd.randint(1, 3) + b"dotted %d" % i
        elif kind < 0.12:
            line = b"."
        elif kind < 0.15:
            line = b""
        elif kind < 0.2:
            line = bytes(rnd.randint(0xA0, 0xFF) for _ in range(rnd.randint(1, 40)))
        else:
            line = b"line %d " % i + b"x" * rnd.randint(0, 120)
        lines.append(line + b"\r\n")
    payload = b"".join(lines)
    header = (
        f"From: <{SENDER}>\r\nTo: {', '.join(recipients)}\r\nSubject: soak\r\n"
        f"Message-ID: <{msgid}>\r\n\r\n"
    ).encode()
    return header + payload + b"SHA256=" + hashlib.sha256(payload).hexdigest().encode() + b"\r\n"


def checkRetrieved(record, address, data, where):
    """
    A message as RETR gave it: its checksum holds, and it is the octets
    sent after the trace fields the receiving node prepends.  Returns its
    Message-ID (None if it is not one of ours).
    """
    match = _MESSAGE_ID.search(data)
    if not match:
        record.violation(f"{address}: {where}: a message without our Message-ID: {data[:300]!r}")
        return None
    msgid = match.group(1).decode()
    headerEnd = data.find(b"\r\n\r\n")
    checksum = _CHECKSUM.search(data)
    body = data[headerEnd + 4 : checksum.start() + 2] if checksum and headerEnd >= 0 else None
    if body is None or hashlib.sha256(body).hexdigest().encode() != checksum.group(1):
        record.violation(f"{address}: {where}: {msgid} fails its checksum ({len(data)} octets)")
    sent = record.sent.get(msgid)
    if sent is None:
        record.violation(f"{address}: {where}: {msgid} was never sent")
    elif not data.endswith(sent) or not _TRACE.match(data[: -len(sent)]):
        record.violation(
            f"{address}: {where}: {msgid} differs from what was sent beyond the trace fields: "
            f"{len(data)} octets retrieved, {len(sent)} sent; first 300 retrieved: {data[:300]!r}"
        )
    return msgid


# -- senders -----------------------------------------------------------------


def _full(address, code, reply):
    """
    Whether a refusal is the quota's, for the user who has one: her
    mailbox full, or (at the end of the data, no size having been
    declared) the message larger than her whole quota.
    """
    return address == FULL and (
        (code == 452 and b"4.2.2 " in reply and b"mailbox full" in reply)
        or (code == 552 and b"5.2.3 " in reply and b"whole quota" in reply)
    )


def stuffed(message):
    return re.sub(rb"(?m)^\.", b"..", message) + b".\r\n"


def _chunks(rnd, message):
    cuts = sorted(rnd.sample(range(1, len(message)), min(rnd.randint(0, 2), len(message) - 1)))
    bounds = [0, *cuts, len(message)]
    return [message[a:b] for a, b in zip(bounds, bounds[1:])]


def _bdat(client, chunk, last):
    client.send(b"BDAT %d%s\r\n" % (len(chunk), b" LAST" if last else b"") + chunk)


class Client:
    """
    One client thread of the load: L{once} again and again until the load
    stops, with choices of its own (from the seed and its name); anything
    it raises is a violation, and ends the thread.
    """

    def __init__(self, record, name, stop):
        self.record = record
        self.name = name
        self.stop = stop
        self.rnd = random.Random(f"{record.seed}-{name}")

    def run(self):
        while not self.stop.is_set():
            try:
                self.once()
            except Exception as e:  # noqa: BLE001 (recorded: the check decides)
                self.record.violation(f"{self.name}: {e!r}")
                return


class Sender(Client):
    """
    One SMTP or LMTP client thread: connections of one to three
    transactions each, to one or two random users, by DATA or by BDAT in
    one to three chunks; one message in twenty is cut off (the socket
    closed) before its end.
    """

    def __init__(self, record, server, lmtp, name, stop):
        super().__init__(record, name, stop)
        self.port = server.portOf("LMTP" if lmtp else "SMTP")
        self.lmtp = lmtp

    def once(self):
        self.connection()

    def connection(self):
        cls = smtplib.LMTP if self.lmtp else smtplib.SMTP
        client = cls("127.0.0.1", self.port, timeout=CLIENT_TIMEOUT)
        try:
            code, reply = client.ehlo("client.test")
            if code != 250 or not client.has_extn("chunking"):
                self.record.violation(f"{self.name}: EHLO/LHLO: {code} {reply!r}")
                return
            for _ in range(self.rnd.randint(1, 3)):
                if self.stop.is_set():
                    break
                if not self.transaction(client):
                    return  # the connection is gone
            client.quit()
        except (OSError, smtplib.SMTPException) as e:
            self.record.violation(f"{self.name}: outside a message: {e!r}")
        finally:
            client.close()

    def transaction(self, client):
        """
        One message; False once the connection is no longer usable.
        """
        rnd, record = self.rnd, self.record
        earlier = record.retries[self.lmtp]
        retry = bool(earlier) and rnd.random() < 0.05
        if retry:
            # The same octets from the same sender by the same protocol to
            # the same recipients: answered 250 again, stored once.
            with record.lock:
                msgid, recipients = rnd.choice(earlier)
                message = record.sent[msgid]
        else:
            recipients = rnd.sample(sorted(USERS), rnd.choice((1, 1, 2)))
            msgid = record.messageId()
            message = makeMessage(rnd, msgid, recipients)
            with record.lock:
                record.sent[msgid] = message
        code, reply = client.mail(SENDER, ["BODY=8BITMIME"])
        if code != 250:
            record.violation(f"{self.name}: MAIL: {code} {reply!r}")
            return False
        accepted = []
        for address in recipients:
            code, reply = client.rcpt(address)
            if code == 250:
                accepted.append(address)
            else:
                record.outcome(msgid, address, "refused", f"RCPT {code} {reply!r}")
                if _full(address, code, reply):
                    record.count("quota: refused at RCPT")
                else:
                    record.violation(f"{self.name}: RCPT {address}: {code} {reply!r}")
        if not accepted:
            client.rset()
            return True
        mode = rnd.choice(("data", "bdat"))
        abort = not retry and rnd.random() < 0.05
        record.count(f"{'lmtp' if self.lmtp else 'smtp'} {mode}{' aborted' if abort else ''}{' retry' if retry else ''}")
        if abort:
            for address in accepted:
                record.outcome(msgid, address, "aborted")
            if mode == "data":
                code, reply = client.docmd("DATA")
                assert code == 354, (code, reply)
                data = stuffed(message)
                client.send(data[: len(data) // 2])
            else:
                _bdat(client, message[: len(message) // 2], last=False)
                code, reply = client.getreply()
                assert code == 250, (code, reply)
            client.sock.shutdown(socket.SHUT_RDWR)
            return False
        for address in accepted:
            record.outcome(msgid, address, "unknown")
        if not retry and accepted == recipients:
            with record.lock:
                record.retries[self.lmtp].append((msgid, recipients))
        try:
            if mode == "data":
                code, reply = client.docmd("DATA")
                if code != 354:
                    record.violation(f"{self.name}: DATA: {code} {reply!r}")
                    for address in accepted:
                        record.outcome(msgid, address, "refused", f"DATA {code}")
                    return False
                client.send(stuffed(message))
            else:
                chunks = _chunks(rnd, message)
                for chunk in chunks[:-1]:
                    _bdat(client, chunk, last=False)
                    code, reply = client.getreply()
                    if code != 250:
                        record.violation(f"{self.name}: BDAT: {code} {reply!r}")
                        for address in accepted:
                            record.outcome(msgid, address, "refused", f"BDAT {code}")
                        return False
                _bdat(client, chunks[-1], last=True)
            for address in accepted if self.lmtp else accepted[:1]:
                code, reply = client.getreply()
                text = reply.decode("utf-8", "replace")
                if self.lmtp:
                    match = _LMTP_DELIVERED.search(text)
                    if code != 250 or not match or match.group(1) != address:
                        record.outcome(msgid, address, "refused", f"{code} {text}")
                        if _full(address, code, reply):
                            record.count("quota: refused at the end of data")
                        else:
                            record.violation(f"{self.name}: end of data for {address}: {code} {text}")
                        continue
                    record.identify(address, match.group(2), msgid, f"the LMTP reply to {self.name}")
                    record.outcome(msgid, address, "accepted")
                else:
                    for each in accepted:
                        record.outcome(msgid, each, "accepted" if code == 250 else "refused", f"{code} {text}")
                    if code != 250 and FULL in accepted and _full(FULL, code, reply):
                        record.count("quota: refused at the end of data")
                    elif code != 250:
                        record.violation(f"{self.name}: end of data: {code} {text}")
        except (OSError, smtplib.SMTPServerDisconnected) as e:
            # What was not answered stays "unknown": stored or not.
            record.count("send replies lost")
            record.violation(f"{self.name}: the reply to a message was lost: {e!r}")
            return False
        return True


# -- POP3 clients ------------------------------------------------------------


_KICKED = b"session ended by the administrator"


def _reply(error):
    """
    The server's line a poplib error carries (bytes), or poplib's own
    words (a str: "-ERR EOF" for a connection closed).
    """
    reply = error.args[0]
    return reply if isinstance(reply, bytes) else reply.encode()


class Reader(Client):
    """
    One POP3 client thread: sessions of random users on one node.  In each
    it lists, retrieves or reads the header of a few messages (checking
    each), marks some of those it identified, and ends with QUIT, with
    RSET and QUIT, or by closing its socket.  A slow one waits about three
    seconds before it ends each session.
    """

    def __init__(self, record, server, name, stop, slow=False):
        super().__init__(record, name, stop)
        self.server = server
        self.slow = slow

    def once(self):
        self.session(self.rnd.choice(sorted(USERS)))

    def session(self, address):
        record = self.record
        client = pop(self.server, timeout=CLIENT_TIMEOUT)
        session = {"user": address, "node": self.name, "marked": {}, "end": None}
        try:
            client.user(address)
            session["pass"] = time.monotonic()
            try:
                client.pass_(USERS[address])
            except poplib.error_proto as e:
                reply = _reply(e)
                if reply.startswith(b"-ERR [IN-USE]"):
                    record.count("pop3 in use")
                else:
                    record.violation(f"{self.name}: PASS {address}: {reply!r}")
                return
            session["in"] = time.monotonic()
            record.count("pop3 sessions")
            with record.lock:
                record.sessions.append(session)
            self.work(client, address, session)
        except poplib.error_proto as e:
            session["end"] = "kicked" if _KICKED in _reply(e) else f"error {_reply(e)!r}"
            session["ended"] = time.monotonic()
        except OSError as e:
            session["end"] = f"error {e!r}"
            session["ended"] = time.monotonic()
        finally:
            client.close()

    def work(self, client, address, session):
        record, rnd = self.record, self.rnd
        count, octets = client.stat()
        uidl = {int(n): uid.decode() for n, uid in (line.split() for line in client.uidl()[1])}
        sizes = {int(n): int(size) for n, size in (line.split() for line in client.list()[1])}
        session["uids"] = set(uidl.values())
        if sorted(uidl) != list(range(1, count + 1)) or sorted(sizes) != sorted(uidl):
            record.violation(f"{address}: STAT {count}, UIDL numbers {sorted(uidl)}, LIST numbers {sorted(sizes)}")
        if len(session["uids"]) != len(uidl):
            record.violation(f"{address}: one UIDL listing shows a unique id twice: {uidl}")
        if sum(sizes.values()) != octets:
            record.violation(f"{address}: STAT says {octets} octets, LIST adds up to {sum(sizes.values())}")
        if address == FULL and octets > QUOTA:
            record.violation(f"{address}: a session on {self.name} finds {octets} octets, over her quota of {QUOTA}")
        for n, uid in uidl.items():
            record.listed(address, uid, sizes.get(n), f"in a session on {self.name}")
        identified = {}
        for n in rnd.sample(sorted(uidl), min(len(uidl), rnd.randint(0, 6))):
            if rnd.random() < 0.6:
                data = retrieve(client, n)
                record.count("pop3 retr")
                if len(data) != sizes[n]:
                    record.violation(f"{address}: message {n} ({uidl[n]}): LIST {sizes[n]} octets, RETR {len(data)}")
                msgid = checkRetrieved(record, address, data, f"RETR on {self.name}")
            else:
                _, lines, _ = client.top(n, 0)
                record.count("pop3 top")
                match = _MESSAGE_ID.search(b"".join(line + b"\r\n" for line in lines))
                msgid = match.group(1).decode() if match else None
                if msgid is None:
                    record.violation(f"{address}: TOP {n} 0 shows no Message-ID: {lines[:8]!r}")
            if msgid is not None:
                record.identify(address, uidl[n], msgid, f"in a session on {self.name}")
                identified[n] = msgid
        for n in rnd.sample(sorted(identified), rnd.randint(0, len(identified))):
            assert client.dele(n).startswith(b"+OK")
            session["marked"][uidl[n]] = identified[n]
        if self.slow:
            # A slow client, which the kicker aims at, to catch it with its
            # deletions marked: the session shows in the registry within
            # a second or two, and its node looks for kicks about once a
            # second.
            record.lingering[self.name] = address
            self.stop.wait(rnd.uniform(2.5, 3.5))
            record.lingering.pop(self.name, None)
            client.noop()
        ending = rnd.choice(("quit", "quit", "rset", "drop"))
        if ending == "rset":
            assert client.rset().startswith(b"+OK")
            session["marked"] = {}
            ending = "quit"
        if ending == "drop":
            session["end"] = "dropped"
            record.count("pop3 dropped")
            return
        session["quit"] = time.monotonic()
        try:
            reply = client.quit()
        except poplib.error_proto as e:
            reply = _reply(e)
        except OSError as e:
            reply = repr(e).encode()
        session["ended"] = time.monotonic()
        if reply.startswith(b"+OK"):
            session["end"] = "quit"
            record.count("pop3 quit")
        elif _KICKED in reply:
            session["end"] = "kicked"
        elif b"may or may not" in reply:
            session["end"] = "ambiguous"
        else:
            # No answer (lost, or a failure): whether the marked
            # messages are gone is not known.
            session["end"] = f"quit unanswered: {reply!r}"


# -- the administrator ---------------------------------------------------------


def kicker(record, cli, stop):
    rnd = random.Random(f"{record.seed}-kicker")
    while not stop.wait(rnd.uniform(0.5, 1.5)):
        # Mostly a user a slow client holds; else anyone.
        lingering = sorted(record.lingering.values())
        address = rnd.choice(lingering if lingering and rnd.random() < 0.8 else sorted(USERS))
        start = time.monotonic()
        code, out, err = cli("kick", address, "--wait", "5")
        with record.lock:
            record.kicks.append((address, start, time.monotonic(), code))
        if code not in (0, 1):
            record.violation(f"mailgate kick {address} exited {code}: {out}{err}")
        record.count(f"kick exit {code}")


# -- the check -----------------------------------------------------------------


def finalSweep(record, servers):
    """
    Every user logs in (through the nodes in turn): no lock is left held.
    Every message is retrieved and checked.  Returns
    {address: {unique id: (Message-ID, octets)}}.
    """
    held = {}
    for i, address in enumerate(sorted(USERS)):
        server = servers[i % len(servers)]

        def login():
            client = pop(server, timeout=CLIENT_TIMEOUT)
            client.user(address)
            try:
                client.pass_(USERS[address])
            except poplib.error_proto as e:
                client.close()
                if _reply(e).startswith(b"-ERR [IN-USE]"):
                    return None
                raise
            return client

        client = waitFor(login, f"{address}'s maildrop lock to be free", timeout=SETTLE_SECONDS)
        uidl = {int(n): uid.decode() for n, uid in (line.split() for line in client.uidl()[1])}
        sizes = {int(n): int(size) for n, size in (line.split() for line in client.list()[1])}
        held[address] = {}
        for n, uid in sorted(uidl.items()):
            data = retrieve(client, n)
            assert len(data) == sizes[n], (address, n, len(data), sizes[n])
            record.listed(address, uid, sizes[n], "at the end")
            msgid = checkRetrieved(record, address, data, "at the end")
            if msgid is not None:
                record.identify(address, uid, msgid, "at the end")
            if uid in held[address]:
                record.violation(f"{address}: unique id {uid} listed twice at the end")
            held[address][uid] = (msgid, sizes[n])
        assert client.quit().startswith(b"+OK")
    return held


def _overlapsKick(record, session):
    """
    Whether a kick of the session's user ran while it did (the kick's
    mark may have been what ended it).
    """
    start = session["pass"]
    end = session.get("ended") or time.monotonic()
    return any(
        address == session["user"] and kStart <= end + 1 and start <= kEnd + 2
        for address, kStart, kEnd, _ in record.kicks
    )


def checkInvariants(record, held):
    v = record.violation
    # The deletions each ended session stands for.
    confirmed = {}  # (address, msgid) -> time of the +OK to QUIT
    maybe = set()
    for s in record.sessions:
        end = s["end"]
        if end is not None and end not in ("quit", "dropped") and not _overlapsKick(record, s):
            # Kicked, failed, or its QUIT not answered +OK (the database
            # is never lost here): only a kick may end a session so.
            v(f"{s['user']}: a POP3 session on {s['node']} ended with no kick under way: {end}")
        if end is None:
            v(f"{s['user']}: a POP3 session on {s['node']} never ended")
        for uid, msgid in s["marked"].items():
            if end == "quit":
                confirmed[(s["user"], msgid)] = s["ended"]
            elif end == "ambiguous" or (end or "").startswith("quit unanswered"):
                maybe.add((s["user"], msgid))
    for (address, msgid), t in confirmed.items():
        for uid, (heldId, _) in held[address].items():
            if heldId == msgid:
                v(f"{address}: {msgid} ({uid}) was deleted by a QUIT answered +OK and is still there")
    # Every message in a maildrop was sent to that user, once, and was
    # not refused or cut off.
    for address, messages in held.items():
        counts = Counter(msgid for msgid, _ in messages.values())
        for msgid, n in counts.items():
            if n > 1:
                v(f"{address}: {msgid} is stored {n} times")
            state = record.outcomes.get((msgid, address), ["never sent to this user"])[0]
            if state not in ("accepted", "unknown"):
                v(f"{address}: {msgid} is stored, but its delivery was {state}")
    # Every message accepted is there or was deleted by a QUIT that was sent.
    for (msgid, address), (state, when, detail) in record.outcomes.items():
        if state != "accepted":
            continue
        present = any(heldId == msgid for heldId, _ in held[address].values())
        if not present and (address, msgid) not in confirmed and (address, msgid) not in maybe:
            v(f"{address}: {msgid}, accepted with 250, is gone and no QUIT deleted it")
    # Session by session, in time: a message accepted before a login (its
    # PASS sent) is in its listing unless a QUIT sent before the login was
    # answered deleted it (the PASS waits for the lock, and the snapshot
    # is taken once it has it); one a QUIT deleted (answered +OK) before a
    # login is not.
    uidOf = {(address, msgid): uid for (address, uid), msgid in record.uids.items()}
    deletions = defaultdict(list)  # (address, msgid) -> times QUIT was sent
    for s in record.sessions:
        for msgid in s["marked"].values():
            if "quit" in s:
                deletions[(s["user"], msgid)].append(s["quit"])
    accepted = defaultdict(list)
    for (msgid, address), (state, when, _) in record.outcomes.items():
        if state == "accepted":
            accepted[address].append((when, msgid))
    for s in record.sessions:
        if "uids" not in s:
            continue
        address, start = s["user"], s["pass"]
        for when, msgid in accepted[address]:
            if when >= start:
                continue
            uid = uidOf.get((address, msgid))
            if uid is None or uid in s["uids"]:
                continue
            if not any(t < s["in"] for t in deletions.get((address, msgid), ())):
                markedBy = [
                    (d["node"], d["end"], *(_since(d.get(k), start) for k in ("pass", "in", "quit", "ended")))
                    for d in record.sessions if d["user"] == address and msgid in d["marked"].values()
                ]
                stillThere = any(heldId == msgid for heldId, _ in held[address].values())
                v(
                    f"{address}: {msgid} ({uid}), accepted {start - when:.3f} s before a login on {s['node']}, "
                    f"is not in its listing (held at the end: {stillThere}; marked by (node, end, PASS sent, "
                    f"answered, QUIT sent, answered, seconds from this PASS): {markedBy}; this session: {s['end']})"
                )
        for (a, msgid), t in confirmed.items():
            if a == address and t < start and uidOf.get((address, msgid)) in s["uids"]:
                v(f"{address}: {msgid} is listed by a login on {s['node']} after a QUIT deleted it (+OK)")


def _since(moment, start):
    return None if moment is None else round(moment - start, 3)


def checkUse(record, cli, held, keepsDeleted):
    """
    C{user list --json} agrees with C{mailbox list --json}, and both with
    what POP3 showed at the end.  Where deleted mail is kept, C{mailbox
    deleted --json} lists every message a QUIT answered +OK deleted, none
    still in the maildrop, and none no QUIT was sent for.
    """
    commands = [("user", "list")] + [
        (*command, address) for address in sorted(USERS)
        for command in ([("mailbox", "list")] + ([("mailbox", "deleted")] if keepsDeleted else []))
    ]
    with ThreadPoolExecutor(len(commands)) as pool:
        outputs = dict(zip(commands, pool.map(lambda c: cli.check(*c, "--json"), commands)))

    def rows(*command):
        return [json.loads(line) for line in outputs[command].splitlines()]

    users = {row["address"]: row for row in rows("user", "list")}
    for address in sorted(USERS):
        if keepsDeleted:
            kept = {row["unique_id"] for row in rows("mailbox", "deleted", address)}
            quits = [s for s in record.sessions if s["user"] == address and "quit" in s]
            for s in quits:
                if s["end"] == "quit":
                    for uid in set(s["marked"]) - kept:
                        record.violation(f"{address}: {uid}, deleted by a QUIT answered +OK, is not kept")
            for uid in kept & set(held[address]):
                record.violation(f"{address}: {uid} is both kept as deleted and in the maildrop")
            for uid in kept - {uid for s in quits for uid in s["marked"]}:
                record.violation(f"{address}: {uid} is kept as deleted, but no QUIT was sent for it")
        listing = rows("mailbox", "list", address)
        listed = (len(listing), sum(r["octets"] for r in listing))
        if address == FULL and (users[address]["quota_octets"] != QUOTA or listed[1] > QUOTA):
            record.violation(f"{address}: {listed[1]} octets at the end, quota {users[address]['quota_octets']}")
        kept = (users[address]["messages"], users[address]["octets"])
        if kept != listed:
            record.violation(f"{address}: user list says {kept} (messages, octets), mailbox list {listed}")
        shown = {r["unique_id"]: r["octets"] for r in listing}
        popShown = {uid: octets for uid, (_, octets) in held[address].items()}
        if shown != popShown:
            record.violation(f"{address}: mailbox list shows {shown}, POP3 showed {popShown}")


def checkNodes(record, servers):
    for server in servers:
        client = smtplib.SMTP("127.0.0.1", server.portOf("SMTP"), timeout=CLIENT_TIMEOUT)
        code, _ = client.noop()
        client.quit()
        if code != 250:
            record.violation(f"node {server.portOf('SMTP')}: NOOP answered {code} after the load")
        with connect(server.port, timeout=CLIENT_TIMEOUT) as sock:
            reader = LineReader(sock)
            if not reader.line().startswith(b"+OK"):
                record.violation(f"node {server.port}: no POP3 greeting after the load")
            sock.sendall(b"QUIT\r\n")
        if not server.running():
            record.violation(f"node {server.port} is no longer running")
        for line in _BAD_LOG_LINE.findall(server.stdout + server.stderr):
            record.violation(f"node {server.port} logged: {line}")


# -- the test ------------------------------------------------------------------


@pytest.mark.parametrize("databaseURL", ["postgres", "sqlite"], indirect=True)
def test_soak(mailgate_server, mailgate_cli, databaseURL):
    """
    Two nodes on one PostgreSQL database (one node on SQLite, which one
    process serves) under concurrent load; then the invariants.
    """
    seed = int(os.environ.get("MAILGATE_SOAK_SEED") or random.SystemRandom().randrange(10**6))
    record = Record(seed)
    for address, password in USERS.items():
        mailgate_cli.addUser(address, password)
    mailgate_cli.check("user", "quota", FULL, str(QUOTA))
    # Two nodes on PostgreSQL, keeping deleted mail (the QUITs' other
    # write); one on SQLite, removing it.
    keepsDeleted = mailgate_server.backend == "postgres"
    names = ["node-a", "node-b"] if keepsDeleted else ["node-a"]
    servers = [
        mailgate_server(
            "--hostname", f"{name}.test", "--domain", DOMAIN,
            "--smtp", "tcp:0:interface=127.0.0.1", "--lmtp", "tcp:0:interface=127.0.0.1",
            "--auth-failure-delay", "0.2", "--keep-deleted-days", "1" if keepsDeleted else "0",
        )
        for name in names
    ]
    stop = threading.Event()
    threads = []
    for server, name in zip(servers, names):
        workers = [
            Sender(record, server, False, f"{name}/smtp1", stop),
            Sender(record, server, False, f"{name}/smtp2", stop),
            Sender(record, server, True, f"{name}/lmtp", stop),
            Reader(record, server, f"{name}/pop1", stop),
            Reader(record, server, f"{name}/pop2", stop),
            Reader(record, server, f"{name}/slow-pop", stop, slow=True),
        ]
        threads += [threading.Thread(target=w.run, name=w.name, daemon=True) for w in workers]
    threads.append(threading.Thread(target=kicker, args=(record, mailgate_cli, stop), daemon=True))
    for t in threads:
        t.start()
    started = time.monotonic()
    stop.wait(LOAD_SECONDS)
    stop.set()
    for t in threads:
        t.join(CLIENT_TIMEOUT * 2)
    hung = [t.name for t in threads if t.is_alive()]
    assert not hung, f"seed {seed}: client threads still running after the load: {hung}"

    phases = [("load", time.monotonic() - started)]
    held = {}
    try:
        held = finalSweep(record, servers)
        phases.append(("sweep", time.monotonic() - started))
        checkInvariants(record, held)
        phases.append(("invariants", time.monotonic() - started))
        checkUse(record, mailgate_cli, held, keepsDeleted)
        phases.append(("use", time.monotonic() - started))
        checkNodes(record, servers)
    except (Exception, pytest.fail.Exception) as e:
        # Reported with what the clients saw before.
        record.violation(f"the checks stopped: {e!r}"[:2000])

    summary = (
        f"seed {seed} ({mailgate_server.backend}, {len(servers)} node(s)): "
        f"{dict(sorted(record.counts.items()))}; POP3 sessions ended: "
        f"{dict(Counter(str(x['end']).split(':')[0][:20] for x in record.sessions))}; "
        f"{sum(1 for o in record.outcomes.values() if o[0] == 'accepted')} copies accepted, "
        f"{sum(len(m) for m in held.values())} held at the end; "
        f"seconds: {', '.join(f'{name} {t:.1f}' for name, t in phases)}"
    )
    print(summary)
    if record.violations:
        kinds = Counter(re.sub(r"\S*\d\S*", "#", text)[:80] for text in record.violations)
        pytest.fail(
            f"{len(record.violations)} violations; {summary}\n"
            + "\n".join(record.violations[:30])
            + "\nby kind:\n"
            + "\n".join(f"{n} x {kind}" for kind, n in kinds.most_common(10)),
            pytrace=False,
        )
    # The load did happen: every part of it was exercised.
    for what in ("pop3 sessions", "pop3 retr", "pop3 top", "pop3 quit", "pop3 dropped", "smtp data", "smtp bdat",
                 "lmtp data", "lmtp bdat"):
        assert record.counts[what] > 0, f"no {what!r}: {summary}"
    assert any(s["end"] == "quit" and s["marked"] for s in record.sessions), f"no confirmed deletion: {summary}"
