# -*- test-case-name: tests.test_lifecycle -*-
"""
The registry of POP3 sessions in progress, kept in the database so that
every node's sessions can be listed (C{mailgate who}) and ended
(C{mailgate kick}) from anywhere.

Each node (each store of a running server) writes its own rows: a heartbeat
in C{mailgate_nodes}, and one row per POP3 session in C{pop3_sessions}.
Logins and logouts are not each a write of their own: the registry
collects them in memory and writes them out together with the heartbeat,
about once a second while anything changed (a POP3 login must not wait
for a commit, nor cost one), so the database's view lags behind by about
that.  A node whose heartbeat stopped (killed, or its machine gone) is
dead: its rows are no longer shown, and are removed after a while by any
other node.

C{mailgate kick} marks a session's row; its node finds the mark when it
next looks (about once a second) and ends the session the way the POP3
protocol asked to be ended (without the UPDATE state: nothing it marked
deleted is deleted), which releases the maildrop's lock.
"""

import itertools
import json
import os
import secrets
import socket

import attr
from twisted.internet import defer

from mailgate.records import NodeInfo, SessionInfo
from mailgate.store.database import updatesMailboxes

#: seconds between heartbeats of a node
HEARTBEAT = 10
#: a node whose heartbeat is older than this is dead
STALE_AFTER = 3 * HEARTBEAT
#: the rows of nodes dead this long are removed
FORGET_AFTER = 600
#: how long after its last heartbeat a node's announced settings still
#: hold back what the others remove (and are compared with theirs): as
#: long as its row is kept.  Each node writes its heartbeat by its own
#: clock, so one whose clock lags the others' by more than STALE_AFTER
#: looks dead to them; retention errs on keeping mail, and a node that
#: stopped holds it back a few minutes longer at most.
SETTINGS_COUNT_FOR = FORGET_AFTER
#: seconds between a node's clock and the database server's beyond which
#: the node warns (L{ClockOffset}): heartbeats are written by each node's
#: clock, and two nodes STALE_AFTER apart take each other for dead
CLOCK_SKEW = 5.0
#: ... and within which it says they agree again (a second less, so that
#: an offset near the limit does not warn at every look)
CLOCK_AGREES = CLOCK_SKEW - 1.0
#: seconds this node's clock may run ahead of the database server's
#: before it stops removing what it judges by the times other nodes wrote
#: (L{SessionRegistry.clockAhead}): well above NTP's noise, well below
#: L{FORGET_AFTER}, beyond which the others' heartbeats look old enough
#: to forget them, and their settings no longer count
CLOCK_AHEAD_LIMIT = 60.0


@attr.s(frozen=True)
class ClockOffset:
    """
    This node's clock minus the database server's, measured around one
    statement: positive when this node's clock runs ahead.

    @ivar seconds: the offset, from the middle of the round trip.
    @ivar uncertainty: half the round trip: the offset is known within it.
    """

    seconds = attr.ib()
    uncertainty = attr.ib()

    @property
    def skewed(self):
        """
        Surely more than L{CLOCK_SKEW} apart (however the round trip split).
        """
        return abs(self.seconds) - self.uncertainty > CLOCK_SKEW

    @property
    def ahead(self):
        """
        Surely more than L{CLOCK_AHEAD_LIMIT} ahead.
        """
        return self.seconds - self.uncertainty > CLOCK_AHEAD_LIMIT

    @property
    def agrees(self):
        """
        Surely within L{CLOCK_AGREES}.
        """
        return abs(self.seconds) + self.uncertainty < CLOCK_AGREES


@attr.s(eq=False)
class Session:
    sessionId = attr.ib()
    userId = attr.ib()
    peer = attr.ib()
    since = attr.ib()
    end = attr.ib(repr=False)
    # The master user who logged in to the user's maildrop, or None.
    master = attr.ib(default=None)


# -- the settings a node works on shared data with -----------------------------

#: The settings that change what a node does to data every node shares,
#: by the name they have in C{mailgate_nodes.settings}: the defaults of
#: L{mailgate.store.limits.StoreLimits}, -1 for none (never).
SHARED_SETTINGS = {
    "quota_octets": ("--default-quota", "quotaOctets"),
    "expire_days": ("--expire-days", "expireDays"),
    "keep_deleted_days": ("--keep-deleted-days", "keepDeletedDays"),
    "quota_warnings": ("--quota-warning", "quotaWarnings"),
    "duplicate_window": ("--duplicate-window", "duplicateWindow"),
    # Not the store's, the SMTP and LMTP listeners': given to the registry.
    "quota_exceeded": ("--quota-exceeded", None),
    "recipient_delimiter": ("--recipient-delimiter", None),
}


def nodeSettings(limits, quotaExceeded=None, recipientDelimiter=None):
    """
    What a node announces in its heartbeat: C{limits} (a
    L{mailgate.store.limits.StoreLimits}) as C{SHARED_SETTINGS}' names
    to values, -1 for none (the quota warnings a list); how its SMTP and
    LMTP refuse a recipient over quota (C{"temporary"} or C{"permanent"})
    where it is given: a node that refuses permanently bounces mail the
    others would have had the MTA retry; and its recipient delimiter
    (C{""} for none): a node without bounces the mail for C{bob+lists@}
    the others deliver to bob.
    """
    values = {}
    for name, (_, attribute) in SHARED_SETTINGS.items():
        if attribute is not None:
            value = getattr(limits, attribute)
            values[name] = -1 if value is None else list(value) if isinstance(value, tuple) else value
    if quotaExceeded is not None:
        values["quota_exceeded"] = quotaExceeded
    values["recipient_delimiter"] = recipientDelimiter or ""
    return values


def settingsDiffer(own, others):
    """
    Where other live nodes announce other settings than C{own}.

    @param own: this node's L{nodeSettings}.
    @param others: C{(name, settings)} of the other live nodes.
    @return: a sorted list of C{(option, own value, node name, its value)},
        values as L{nodeSettings} gives them.
    """
    found = []
    for nodeName, theirs in others:
        for name, (option, _) in SHARED_SETTINGS.items():
            if name in theirs and name in own and theirs[name] != own[name]:
                found.append((option, own[name], nodeName, theirs[name]))
    return sorted(found)


def _nodes(cursor, aliveSince):
    """
    The live nodes, by name, as L{mailgate.records.NodeInfo}.
    """
    cursor.execute(
        "SELECT name, started_at, seen_at, settings FROM mailgate_nodes WHERE seen_at >= ? ORDER BY name, started_at",
        (aliveSince,),
    )
    return [NodeInfo(name, started, seen, _settings(text)) for name, started, seen, text in cursor.fetchall()]


def _settings(text):
    """
    A node's announced settings, or C{None} if it announced none or
    something unreadable.
    """
    if text is None:
        return None
    try:
        settings = json.loads(text)
    except (ValueError, RecursionError):
        # Written by hand (nodes write a flat object): not read.
        return None
    return settings if isinstance(settings, dict) else None


def _announced(cursor, since, exceptNode):
    """
    The L{nodeSettings} of the nodes other than C{exceptNode} seen since
    C{since}, as C{(name, seen, settings)}; nodes of a version that
    announced none, or announced something unreadable, are left out.
    """
    cursor.execute(
        "SELECT name, seen_at, settings FROM mailgate_nodes WHERE seen_at >= ? AND node_id <> ? "
        "AND settings IS NOT NULL ORDER BY name",
        (since, exceptNode),
    )
    announced = []
    for name, seen, text in cursor.fetchall():
        settings = _settings(text)
        if settings is not None:
            announced.append((name, seen, settings))
    return announced


def _liveSettings(cursor, aliveSince, exceptNode):
    """
    L{_announced}'s nodes as C{(name, settings)}.
    """
    return [(name, settings) for name, _, settings in _announced(cursor, aliveSince, exceptNode)]


def _otherSettings(cursor, engine, now, exceptNode, clock):
    """
    The C{(name, settings)} of the nodes other than C{exceptNode} whose
    settings still count (L{SETTINGS_COUNT_FOR}), and of those alive
    (L{STALE_AFTER}): one statement for both; and this node's clock
    against the database server's (L{IEngine.serverClock}), a
    L{ClockOffset} or C{None}.

    The node's clock (C{clock}) is read here, on the worker thread, just
    before and after the statement that reads the server's: read on the
    reactor thread, the offset took in the time the interaction waited
    for a thread and its answer for the reactor, and a node whose reads
    queued a second showed an offset of half a second (the metric an
    alert watches) with clocks in step.
    """
    announced = _announced(cursor, now - SETTINGS_COUNT_FOR, exceptNode)
    counting = [(name, settings) for name, _, settings in announced]
    alive = [(name, settings) for name, seen, settings in announced if seen >= now - STALE_AFTER]
    before = clock()
    serverClock = engine.serverClock(cursor)
    after = clock()
    if serverClock is None:
        return counting, alive, None
    return counting, alive, ClockOffset((before + after) / 2 - serverClock, (after - before) / 2)


# -- interactions ----------------------------------------------------------------


def _loggedIn(position):
    """
    The users whose last logins a registry write records (for
    L{updatesMailboxes}): its C{logins} argument, passed by name or as the
    argument at C{position}.
    """

    def users(cursor, *args, **kwargs):
        logins = kwargs["logins"] if "logins" in kwargs else args[position] if len(args) > position else ()
        return [userId for userId, _ in logins]

    return users


@updatesMailboxes(_loggedIn(5))
def _sync(cursor, node, now, added, removed, forgetBefore, logins=()):
    """
    One write of a node's registry: its heartbeat (and the settings it
    works with), the sessions that began and ended since the last one,
    the users' last logins; and the rows of long-dead nodes.
    """
    nodeId, name, started, settings = node
    cursor.execute(
        "INSERT INTO mailgate_nodes (node_id, name, started_at, seen_at, settings) VALUES (?, ?, ?, ?, ?) "
        "ON CONFLICT (node_id) DO UPDATE SET name = excluded.name, seen_at = excluded.seen_at, "
        "settings = excluded.settings",
        (nodeId, name, started, now, settings),
    )
    for start in range(0, len(added), 100):
        part = added[start : start + 100]
        # A session may have been written already, by a write whose COMMIT
        # took effect though the node was told it failed (its answer lost):
        # written again, it must not fail every heartbeat from then on.
        cursor.execute(
            "INSERT INTO pop3_sessions (user_id, session_id, node_id, peer, since, master) VALUES "
            + ",".join(["(?, ?, ?, ?, ?, ?)"] * len(part))
            + " ON CONFLICT (user_id, session_id) DO NOTHING",
            [v for s in part for v in (s.userId, s.sessionId, nodeId, s.peer, s.since, s.master)],
        )
    _recordLastLogins(cursor, logins)
    for session in removed:
        cursor.execute(
            "DELETE FROM pop3_sessions WHERE user_id = ? AND session_id = ?",
            (session.userId, session.sessionId),
        )
    if forgetBefore is not None:
        cursor.execute(
            "DELETE FROM pop3_sessions WHERE node_id IN "
            "(SELECT node_id FROM mailgate_nodes WHERE seen_at < ?)",
            (forgetBefore,),
        )
        cursor.execute("DELETE FROM mailgate_nodes WHERE seen_at < ?", (forgetBefore,))


def _recordLastLogins(cursor, logins):
    """
    Each user's last POP3 login (C{mailgate user list}, as Dovecot's
    last_login plugin keeps it), C{(user id, time)}: written with the
    registry's heartbeat, not by the login itself, so a login costs no
    write of its own.  Never moved back (a node's older login written
    after another's newer one).
    """
    rows = sorted((userId, int(since)) for userId, since in logins)
    for start in range(0, len(rows), 100):
        part = rows[start : start + 100]
        cursor.execute(
            "UPDATE mailboxes SET last_login = v.column2 "
            f"FROM (VALUES {','.join(['(?, ?)'] * len(part))}) AS v "
            "WHERE mailboxes.user_id = v.column1 "
            "AND (mailboxes.last_login IS NULL OR mailboxes.last_login < v.column2)",
            [value for row in part for value in row],
        )


@updatesMailboxes(_loggedIn(1))
def _leave(cursor, nodeId, logins=()):
    _recordLastLogins(cursor, logins)
    cursor.execute("DELETE FROM pop3_sessions WHERE node_id = ?", (nodeId,))
    cursor.execute("DELETE FROM mailgate_nodes WHERE node_id = ?", (nodeId,))


def _kicked(cursor, nodeId):
    cursor.execute(
        "SELECT session_id FROM pop3_sessions WHERE node_id = ? AND kick_at IS NOT NULL", (nodeId,)
    )
    return [row[0] for row in cursor.fetchall()]


def _sessions(cursor, aliveSince, address=None, kicked=False, heldAmong=None):
    """
    The sessions of live nodes as L{mailgate.records.SessionInfo}, oldest
    first; with C{heldAmong} (the locks' C{heldAmong}, where a maildrop's
    lock reaches every node), those whose maildrop no backend holds are
    C{gone}: their node was killed, its heartbeat not yet old.
    """
    where = "WHERE n.seen_at >= ?"
    params = [aliveSince]
    if address is not None:
        where += " AND u.address = ?"
        params.append(address)
    if kicked:
        where += " AND s.kick_at IS NOT NULL"
    cursor.execute(
        "SELECT u.address, n.name, s.peer, s.since, s.user_id, s.master FROM pop3_sessions s "
        "JOIN users u ON u.user_id = s.user_id JOIN mailgate_nodes n ON n.node_id = s.node_id "
        f"{where} ORDER BY s.since, u.address",
        params,
    )
    rows = cursor.fetchall()
    held = None if heldAmong is None else heldAmong(cursor, [row[4] for row in rows])
    return [SessionInfo(*row[:4], gone=held is not None and row[4] not in held, master=row[5]) for row in rows]


def _kick(cursor, address, now, aliveSince):
    """
    Mark every live session of C{address} to be ended: how many.
    """
    cursor.execute(
        "UPDATE pop3_sessions SET kick_at = ? WHERE user_id IN (SELECT user_id FROM users WHERE address = ?) "
        "AND node_id IN (SELECT node_id FROM mailgate_nodes WHERE seen_at >= ?)",
        (now, address, aliveSince),
    )
    return cursor.rowcount


class SessionRegistry:
    """
    One store's part of the registry: the POP3 sessions this process
    serves, written out by L{flush} (the node's heartbeat), and ended when
    L{poll} finds them marked by C{mailgate kick}.

    @ivar nodeId: this node's id, unique across nodes and restarts.
    @ivar name: what C{mailgate who} shows for this node.
    @ivar others: C{(name, settings)} of the other live nodes, as
        L{otherSettings} last read them.
    @ivar quotaExceeded: how this node's SMTP and LMTP refuse a recipient
        over quota, announced with the store's limits (C{None}: not
        announced).
    @ivar clockOffset: the L{ClockOffset} L{otherSettings} last measured,
        or C{None} (not yet, or the database has no clock of its own);
        announced with the settings, as C{clock_offset}.
    """

    quotaExceeded = None
    recipientDelimiter = None

    def __init__(self, store, name=None):
        self._store = store
        self.nodeId = secrets.token_hex(8)
        # A session's id is the node's and its number here: unique across
        # nodes and restarts as the node's id is, without drawing random
        # octets from the kernel at every login.
        self._sessionNumbers = itertools.count(1)
        self.name = name or f"{socket.gethostname()}[{os.getpid()}]"
        self._started = None
        self._sessions = {}
        self._added = {}
        self._removed = {}
        # User id to the start of its latest session since the last write
        # (sessions that begin and end between two writes are never
        # written, their logins are).
        self._logins = {}
        self._lastBeat = None
        # (name, settings) of the other live nodes, as last read.
        self.others = []
        self.clockOffset = None
        # The settings changed (a reload): written at the next flush.
        self._announce = False

    def started(self, maildrop, peer, end, master=None):
        """
        A POP3 session began on C{maildrop}, by the master user C{master}
        (its name) or the user's own login (C{None}); returns its
        L{Session}.
        """
        now = self._store._now()
        if self._started is None:
            self._started = now
        userId = maildrop.userId
        session = Session(f"{self.nodeId}.{next(self._sessionNumbers)}", userId, peer, now, end, master)
        self._sessions[session.sessionId] = session
        self._added[session.sessionId] = session
        self._logins[userId] = max(now, self._logins.get(userId, now))
        return session

    def ended(self, session):
        """
        The session has ended (its maildrop was released).
        """
        self._sessions.pop(session.sessionId, None)
        if self._added.pop(session.sessionId, None) is None:
            self._removed[session.sessionId] = session

    @property
    def local(self):
        """
        The sessions of this process, by id.
        """
        return dict(self._sessions)

    def due(self):
        """
        Whether L{flush} has something to write: sessions came or went,
        or the heartbeat is due.
        """
        now = self._store._now()
        # Logins alone wait for the heartbeat (or the next session written):
        # a stream of short sessions, none written, costs no write a second.
        return bool(
            self._added or self._removed or self._announce or self._lastBeat is None
            or now - self._lastBeat >= HEARTBEAT
        )

    def announceSoon(self):
        """
        Write this node's settings at the next L{flush}, not at the next
        heartbeat: a reload changed them, and the other nodes compare
        theirs with what is written (C{mailgate nodes} shows it).
        """
        self._announce = True

    def flush(self):
        """
        Write the heartbeat and the sessions that came and went.

        @return: a L{Deferred} that fires once written; on failure the
            changes are kept for the next flush.
        """
        now = self._store._now()
        if self._started is None:
            self._started = now
        added, self._added = self._added, {}
        removed, self._removed = self._removed, {}
        logins, self._logins = self._logins, {}
        announcing, self._announce = self._announce, False
        forget = None
        if (self._lastBeat is None or now - self._lastBeat >= HEARTBEAT) and not self.clockAhead:
            forget = now - FORGET_AFTER
        announced = nodeSettings(self._store.limits, self.quotaExceeded, self.recipientDelimiter)
        if self.clockOffset is not None:
            # For C{mailgate nodes}; not a setting the nodes compare.
            announced["clock_offset"] = round(self.clockOffset.seconds, 1)
        settings = json.dumps(announced, sort_keys=True)
        d = self._store.database.runWrite(
            _sync,
            (self.nodeId, self.name, self._started, settings),
            now,
            list(added.values()),
            list(removed.values()),
            forget,
            list(logins.items()),
        )

        def written(_):
            self._lastBeat = now

        def failed(failure):
            # Try again with the next flush: what is still current.  A
            # failed write may all the same have committed (its COMMIT's
            # answer lost), so a session it added that has ended since is
            # removed all the same: otherwise its row could stay for as
            # long as this node runs.
            for sessionId, session in added.items():
                if sessionId in self._sessions:
                    self._added.setdefault(sessionId, session)
                else:
                    self._removed.setdefault(sessionId, session)
            for sessionId, session in removed.items():
                self._removed.setdefault(sessionId, session)
            for userId, since in logins.items():
                self._logins[userId] = max(since, self._logins.get(userId, since))
            self._announce = self._announce or announcing
            return failure

        return d.addCallbacks(written, failed)

    def otherSettings(self):
        """
        Read the settings the other nodes announce (kept in L{others}:
        those that still count, L{SETTINGS_COUNT_FOR}), and say where the
        live ones' (L{STALE_AFTER}, the nodes C{mailgate nodes} lists)
        differ from this node's: a L{Deferred} of what L{settingsDiffer}
        gives.  The same transaction reads the database server's clock
        (kept in L{clockOffset}).
        """
        clock = self._store._clock
        d = self._store.database.runInteraction(
            _otherSettings, self._store.engine, int(clock()), self.nodeId, clock
        )

        def read(found):
            counting, live, offset = found
            self.others = counting
            if offset is not None:
                self.clockOffset = offset
            return settingsDiffer(
                nodeSettings(self._store.limits, self.quotaExceeded, self.recipientDelimiter), live
            )

        return d.addCallback(read)

    @property
    def clockAhead(self):
        """
        Whether this node's clock was found, at the last comparison
        (L{otherSettings}, PostgreSQL only), to run more than
        L{CLOCK_AHEAD_LIMIT} ahead of the database server's.  The other
        nodes' heartbeats then look older to it than they are: past
        L{FORGET_AFTER} it took the nodes for gone, forgot their rows and
        sessions and left their settings out, and by a year it took the
        mail they delivered today for a year old.  Until the clocks agree
        again this node removes nothing it judges by their times: its
        retention task skips its passes, its heartbeat forgets no node,
        and its sessions keep what they delete, for the nodes with right
        clocks to purge in their time.
        """
        offset = self.clockOffset
        return offset is not None and offset.ahead

    def othersKeepDeleted(self):
        """
        Whether another live node keeps deleted mail for recovery, as last
        read (L{otherSettings}): then this node keeps what its sessions
        delete too, whatever its own C{--keep-deleted-days}, as that node
        would not want it gone at once.  So it does while its clock runs
        ahead (L{clockAhead}): which nodes live, it cannot tell.
        """
        if self.clockAhead:
            return True
        return any(type(s.get("keep_deleted_days")) is int and s["keep_deleted_days"] > 0 for _, s in self.others)

    def poll(self):
        """
        End the sessions of this node that C{mailgate kick} marked.

        @return: a L{Deferred} of how many were ended.
        """
        if not self._sessions:
            return defer.succeed(0)
        d = self._store.database.runInteraction(_kicked, self.nodeId)

        def kick(sessionIds):
            ended = 0
            for sessionId in sessionIds:
                session = self._sessions.get(sessionId)
                if session is not None and session.end is not None:
                    session.end()
                    ended += 1
            return ended

        return d.addCallback(kick)

    def leave(self):
        """
        This node stops: its rows go (a clean shutdown needs no timeout),
        and the logins not written yet are.  Nothing to do for a node that
        never wrote any and had no login.
        """
        self._added.clear()
        self._removed.clear()
        logins, self._logins = self._logins, {}
        wrote, self._lastBeat = self._lastBeat is not None, None
        if not wrote and not logins:
            return defer.succeed(None)
        return self._store.database.runWrite(_leave, self.nodeId, list(logins.items()))
