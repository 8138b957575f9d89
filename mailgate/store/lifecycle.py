# -*- test-case-name: tests.test_lifecycle -*-
"""
A maildrop's life besides delivery and POP3, as the store's methods
(L{LifecycleStore}, which L{mailgate.store.sql.SQLMailStore} inherits):
quotas (L{mailgate.store.limits}), retention (L{mailgate.store.retention}),
deleted mail kept for recovery (L{mailgate.store.recovery}), messages
imported from another server (L{mailgate.store.imported}), renaming and
expunging a user, and the registry of POP3 sessions in progress
(L{mailgate.store.registry}).

The statements run, like those of L{mailgate.store.sql}, on a cursor
inside a transaction, handed to the L{Database} by the methods here.
"""

from twisted.internet import defer
from twisted.python.failure import Failure

from mailgate.errors import MaildropInUse, MaildropLockLost, NoSuchUser, UserExists
from mailgate.records import DeletedMessage, ExpiryPass, QuotaStatus
from mailgate.store.guarded import Guarded, _inSession, lockedOutOfSession, lockedUserId
from mailgate.store.imported import (
    _claimImported,
    _existingUidls,
    _forgetImported,
    _importMessages,
    _removeImportedGone,
)
from mailgate.store.limits import DAY, UNLIMITED, _KEEP, _quotaOf, _recountUsage, _setLimits
from mailgate.store import paging
from mailgate.store.aliases import _addAlias, _addAliases, _listAliases, _removeAlias, refuseAlias
from mailgate.store.masterusers import (
    _addMasterUser, _listMasterUsers, _removeMasterUser, _setMasterUserNetworks, _setMasterUserPassword,
)
from mailgate.store.recovery import (
    _deletedPage,
    _dropKept,
    _listDeleted,
    _restoreBound,
    _restoreDeleted,
    _restoreSome,
)
from mailgate.store.registry import SETTINGS_COUNT_FOR, STALE_AFTER, SessionRegistry, _kick, _nodes, _sessions
from mailgate.store.retention import Retention, _expirePass, _expireUser, _forgetDeliveries, _purgeKept
from mailgate.store.rows import exactOldestArrival, releaseBodies, removeMessages


def _forgetUser(cursor, userId):
    """
    What a user's deletion removes besides the maildrop: kept deleted
    mail (releasing its bodies) and the registry's sessions.
    """
    cursor.execute(
        "DELETE FROM deleted_mail WHERE user_id = ? RETURNING body_owner, body_id", (userId,)
    )
    references = {}
    for owner, bodyId in cursor.fetchall():
        references[(owner, bodyId)] = references.get((owner, bodyId), 0) + 1
    releaseBodies(cursor, references)
    cursor.execute("DELETE FROM pop3_sessions WHERE user_id = ?", (userId,))
    cursor.execute("DELETE FROM imported_ids WHERE user_id = ?", (userId,))
    cursor.execute("DELETE FROM recent_deliveries WHERE user_id = ?", (userId,))
    cursor.execute("DELETE FROM aliases WHERE user_id = ?", (userId,))


def _renameUser(cursor, engine, old, new, aliveSince, lockedId=None):
    """
    Give a user a new address: the maildrop, its unique ids, quota and
    retention stay with the user (they hang on the user id).

    @param lockedId: the id of the user whose maildrop lock is held (see
        L{lockedUserId}).
    @raise NoSuchUser: if there is no C{old}.
    @raise UserChanged: if C{old} is no longer C{lockedId}'s.
    @raise UserExists: if C{new} is taken.
    @raise AliasExists: if C{new} is another user's alias (one of the
        user's own becomes the address, the alias gone).
    @raise MaildropInUse: if the user is in a POP3 session.
    """
    userId = lockedUserId(cursor, old, lockedId)
    cursor.execute("SELECT 1 FROM users WHERE address = ?", (new,))
    if cursor.fetchone() is not None:
        raise UserExists(new)
    cursor.execute("SELECT user_id FROM aliases WHERE address = ?", (new,))
    row = cursor.fetchone()
    if row is not None and row[0] == userId:
        # Renamed to an alias of their own: the alias is the address now.
        cursor.execute("DELETE FROM aliases WHERE address = ?", (new,))
    else:
        refuseAlias(cursor, new)
    if _inSession(cursor, userId, aliveSince):
        raise MaildropInUse(old)
    try:
        cursor.execute(
            "UPDATE users SET address = ?, domain = ? WHERE user_id = ?",
            (new, new.rpartition("@")[2], userId),
        )
    except Exception as e:
        if engine.isUniqueViolation(e):
            raise UserExists(new) from None
        raise


def _setDisabled(cursor, userId, disabledAt, reason=None):
    """
    Disable the user C{userId} since C{disabledAt} (with C{reason}), or,
    with C{disabledAt} C{None}, enable them.
    """
    cursor.execute(
        "UPDATE users SET disabled_at = ?, disabled_reason = ? WHERE user_id = ?",
        (disabledAt, None if disabledAt is None else reason, userId),
    )


def _disableUser(cursor, address, now, reason):
    """
    Disable the user C{address} (C{now}, or since when they were disabled
    already, the reason replaced), or with C{now} C{None}, enable them.

    @return: whether the user was disabled before.
    @raise NoSuchUser: if there is no such user.
    """
    cursor.execute("SELECT user_id, disabled_at FROM users WHERE address = ?", (address,))
    row = cursor.fetchone()
    if row is None:
        raise NoSuchUser(address)
    userId, since = row
    _setDisabled(cursor, userId, None if now is None else (now if since is None else since), reason)
    return since is not None


def _setAllowedNetworks(cursor, address, networks):
    """
    Set the networks the user C{address} may log in from (C{None}:
    anywhere).

    @return: the networks they had.
    @raise NoSuchUser: if there is no such user.
    """
    cursor.execute("SELECT user_id, allowed_nets FROM users WHERE address = ?", (address,))
    row = cursor.fetchone()
    if row is None:
        raise NoSuchUser(address)
    userId, previous = row
    cursor.execute("UPDATE users SET allowed_nets = ? WHERE user_id = ?", (networks, userId))
    return previous


#: Messages (and kept deleted messages) an administrator's expunge removes
#: in one transaction.  Each transaction holds SQLite's one write lock:
#: 100,000 messages removed in one held it some 6 s (10 s beside a
#: running server's deliveries, each of which waited for it, as long as
#: SQLite's busy timeout), and a larger maildrop would have had every
#: delivery to every user fail.  500 take some tens of milliseconds.
EXPUNGE_PER_TRANSACTION = 500


#: Kept deleted messages C{mailbox restore} brings back in one
#: transaction (as L{EXPUNGE_PER_TRANSACTION}): 100,000 in one held
#: SQLite's write lock 1.7-2.8 s.
RESTORE_PER_TRANSACTION = 500


def _expungeUser(cursor, address, before, aliveSince, lockedId=None):
    """
    Remove a user's messages for good in one transaction: all of them, or
    those that arrived before C{before}, with those kept for recovery;
    see L{_expungeSome}.

    @return: C{(messages removed from the maildrop, kept deleted messages
        removed)}.
    """
    removed, kept, _, _ = _expungeSome(cursor, address, before, None, None, aliveSince, lockedId)
    return removed, kept


def _expungeSome(cursor, address, before, below, limit, aliveSince, lockedId=None):
    """
    One transaction of an expunge: remove at most C{limit} (C{None}: no
    limit) of a user's messages for good, all of them or those that
    arrived before C{before}, and once none of those is left in the
    maildrop, those of them deleted by POP3 and kept for recovery too (an
    administrator erasing a user's mail means all of it; expunged
    messages are not kept).

    @param below: the maildrop's next uid when the expunge began (C{None}
        in its first transaction, which reads it): messages delivered
        or restored meanwhile are not the expunge's.
    @param lockedId: the id of the user whose maildrop lock is held (see
        L{lockedUserId}).
    @return: C{(messages removed from the maildrop, kept deleted messages
        removed, below, whether there may be more to remove)}.
    @raise UserChanged: if C{address} is no longer C{lockedId}'s.
    @raise MaildropInUse: if the user is in a POP3 session.
    """
    userId = lockedOutOfSession(cursor, address, lockedId, aliveSince)
    # Locked first, as in _expireUser: a delivery committing meanwhile is
    # in the oldest arrival written at the end.
    cursor.execute(
        "UPDATE mailboxes SET oldest_arrival = oldest_arrival WHERE user_id = ? RETURNING next_uid", (userId,)
    )
    nextUid = cursor.fetchone()[0]
    below = nextUid if below is None else below
    where, params = "user_id = ? AND uid < ?", [userId, below]
    if before is not None:
        where += " AND arrived_at < ?"
        params.append(before)
    bound = "" if limit is None else f" ORDER BY uid LIMIT {int(limit)}"
    cursor.execute(f"SELECT uid FROM maildrop WHERE {where}{bound}", params)
    uids = [row[0] for row in cursor.fetchall()]
    removed = removeMessages(cursor, userId, uids) if uids else 0
    exactOldestArrival(cursor, userId)
    if limit is not None and len(uids) >= limit:
        return removed, 0, below, True
    where, params = "user_id = ?", [userId]
    if before is not None:
        where += " AND arrived_at < ?"
        params.append(before)
    bound = "" if limit is None else f" ORDER BY uid LIMIT {int(limit) - len(uids)}"
    cursor.execute(f"SELECT uid FROM deleted_mail WHERE {where}{bound}", params)
    kept = [row[0] for row in cursor.fetchall()]
    more = limit is not None and len(uids) + len(kept) >= limit
    return removed, _dropKept(cursor, {userId: kept}) if kept else 0, below, more


class LifecycleStore:
    """
    The lifecycle half of L{mailgate.store.sql.SQLMailStore}.

    @ivar limits: the server's L{mailgate.store.limits.StoreLimits}; the service sets them from
        its configuration.
    """

    def setQuota(self, address, octets=_KEEP, messages=_KEEP):
        """
        Set a user's own quota: a number, L{mailgate.store.limits.UNLIMITED} or L{mailgate.store.limits.DEFAULT} (the
        server's), for octets and for messages; an argument not given is
        left as it is.  Mail already stored stays, whatever the new quota.

        @return: a L{Deferred}; fails with L{NoSuchUser}.
        """
        return self.database.runWrite(_setLimits, address, quotaOctets=octets, quotaMessages=messages)

    def setExpire(self, address, days):
        """
        Set a user's own retention: days, L{mailgate.store.limits.UNLIMITED} (never) or
        L{mailgate.store.limits.DEFAULT}.

        @return: a L{Deferred}; fails with L{NoSuchUser}.
        """
        return self.database.runWrite(_setLimits, address, expireDays=days)

    def quotaOf(self, address):
        """
        A user's storage use and the limits that apply to it now: a
        L{Deferred} L{mailgate.records.QuotaStatus}, or C{None} if
        there is no such user.
        """
        def status(row):
            if row is None:
                return None
            userId, octets, messages, quotaOctets, quotaMessages = row
            return QuotaStatus(
                userId,
                octets,
                messages,
                self.limits.effective(quotaOctets, self.limits.quotaOctets),
                self.limits.effective(quotaMessages, self.limits.quotaMessages),
                quotaOctets,
                quotaMessages,
            )

        return self.database.runInteraction(_quotaOf, address).addCallback(status)

    @property
    def retention(self):
        """
        The store's L{Retention}: what POP3 advertises as EXPIRE.
        """
        retention = self.__dict__.get("_retention")
        if retention is None:
            retention = self.__dict__["_retention"] = Retention(self)
        return retention

    def expireMessages(self, users=100, messagesPerTransaction=500):
        """
        One pass of the retention task: remove messages older than their
        user's retention from at most C{users} maildrops, a transaction
        of at most C{messagesPerTransaction} removals at a time, skipping
        every maildrop a POP3 session holds (its lock is taken without
        waiting, through the store's locks, so this is safe on several
        nodes at once).

        @return: a L{Deferred} L{ExpiryPass}: C{(messages removed,
            maildrops skipped because busy)}, and how many maildrops were
            examined; C{(0, 0)} while this node's clock runs ahead of the
            database server's (L{SessionRegistry.clockAhead}).
        """
        if self.sessions.clockAhead:
            return defer.succeed(ExpiryPass(0, 0, 0))
        now = self._now()

        @defer.inlineCallbacks
        def run():
            default, candidates = yield self.database.runInteraction(
                _expirePass, now, self._ownRetention(), now - SETTINGS_COUNT_FOR, self.sessions.nodeId, users
            )
            removed = busy = examined = 0
            removedFrom = []
            for userId, address in candidates:
                try:
                    yield self.locks.acquire(userId)
                except MaildropInUse:
                    busy += 1
                    continue
                except Exception:
                    # The database away: what the pass removed so far is
                    # still told (see ExpiryPass.failure).
                    return ExpiryPass(removed, busy, examined, removedFrom, Failure())
                fromThis = 0
                failure = None
                try:
                    more = True
                    while more:
                        # Each transaction guarded, as a QUIT's is: should
                        # the lock be lost, a node that takes it reads the
                        # maildrop after the removals, not before.
                        count, more, days = yield self.database.runWrite(
                            Guarded.under(self.locks, userId, _expireUser), userId, now, default,
                            messagesPerTransaction,
                        )
                        fromThis += count
                    examined += 1
                except MaildropLockLost:
                    # Another session may have the maildrop now.
                    busy += 1
                except Exception:
                    # A write failed (the database away): the pass ends
                    # here, and the removals committed before it, in this
                    # maildrop and the others, are still told, for the log
                    # and the metrics.
                    failure = Failure()
                finally:
                    removed += fromThis
                    if fromThis:
                        removedFrom.append((address, fromThis, days))
                    yield self.locks.release(userId)
                if failure is not None:
                    return ExpiryPass(removed, busy, examined, removedFrom, failure)
            return ExpiryPass(removed, busy, examined, removedFrom)

        return run()

    def purgeDeleted(self, limit=500):
        """
        Remove kept deleted mail older than L{mailgate.store.limits.StoreLimits.keepDeletedDays}
        (all of it when that is 0), or than a live node keeps it (see
        L{mailgate.store.retention._keptLongest}), at most C{limit} messages.

        @return: a L{Deferred} of how many were removed (none while this
            node's clock runs ahead: L{SessionRegistry.clockAhead}).
        """
        if self.sessions.clockAhead:
            return defer.succeed(0)
        now = self._now()
        return self.database.runWrite(
            _purgeKept, now, self._ownRetention(), now - SETTINGS_COUNT_FOR, self.sessions.nodeId, limit
        )

    def forgetDeliveries(self, limit=500):
        """
        Forget at most C{limit} recent deliveries older than the duplicate
        window (L{mailgate.store.limits.StoreLimits.duplicateWindow}, or a live node's longer
        one): a message sent again after that is stored again.

        @return: a L{Deferred} of how many were forgotten (none while this
            node's clock runs ahead: L{SessionRegistry.clockAhead}).
        """
        if self.sessions.clockAhead:
            return defer.succeed(0)
        now = self._now()
        return self.database.runWrite(
            _forgetDeliveries, now, self.limits.duplicateWindow, now - SETTINGS_COUNT_FOR,
            self.sessions.nodeId, limit,
        )

    def _ownRetention(self):
        """
        This node's retention defaults, as L{mailgate.store.retention._keptLongest} takes them.
        """
        expireDays = UNLIMITED if self.limits.expireDays is None else self.limits.expireDays
        return expireDays, self.limits.keepDeletedDays

    def listDeleted(self, address, page=None):
        """
        A user's kept deleted messages: a L{Deferred} list of
        L{mailgate.records.DeletedMessage}, in their maildrop order; with
        C{page}, an iterable of them read C{page} at a time as it is
        iterated (L{mailgate.store.paging}).  Fails with L{NoSuchUser}.
        """
        if page is None:
            return self.database.runInteraction(_listDeleted, address)
        return paging.pagedListing(self.database, _deletedPage, (address,), page, paging.numbered(DeletedMessage))

    def restoreDeleted(self, address, uidls=None, since=None, asNew=False, perTransaction=None, progress=None):
        """
        Bring kept deleted messages back; see L{_restoreSome}.  All of
        them (C{uidls} C{None}) come back C{perTransaction} at a time
        (L{RESTORE_PER_TRANSACTION}), in their order, those deleted
        before the restore began (L{_restoreBound}, whatever this host's
        clock says of the nodes'): one transaction for all held SQLite's
        write lock, which every delivery waits for, as long as the whole
        restore.  Unique ids given come back in one transaction.  A
        transaction that brings the user's use to a warning percentage of
        the quota (L{mailgate.store.limits.StoreLimits.quotaWarnings})
        warns the user as a delivery does.

        @param uidls: the unique ids to restore; C{None} for all.
        @param since: only those deleted at or after this time (seconds).
        @param progress: called after each committed transaction with
            how many messages are back so far.
        @return: a L{Deferred} of C{(restored, missing)}.
        """
        now = self._now()
        quota = self.limits.deliveryQuota()
        if uidls is not None:
            return self.database.runWrite(_restoreDeleted, address, list(uidls), since, asNew, now, quota)
        perTransaction = RESTORE_PER_TRANSACTION if perTransaction is None else perTransaction

        @defer.inlineCallbacks
        def run():
            until = yield self.database.runInteraction(_restoreBound, address, now)
            restored = []
            more = True
            while more:
                some, _, more = yield self.database.runWrite(
                    _restoreSome, address, None, since, asNew, now, perTransaction, until, quota
                )
                restored += some
                if progress is not None:
                    progress(len(restored))
            return restored, []

        return run()

    @property
    def sessions(self):
        """
        This store's part of the registry of POP3 sessions
        (L{mailgate.store.registry.SessionRegistry}).
        """
        sessions = self.__dict__.get("_sessions")
        if sessions is None:
            sessions = self.__dict__["_sessions"] = SessionRegistry(self)
        return sessions

    def listSessions(self, address=None, kicked=False):
        """
        The POP3 sessions in progress on every live node (of C{address}
        only, if given; with C{kicked}, only those a kick marked): a
        L{Deferred} list of L{mailgate.records.SessionInfo}, oldest first,
        those whose maildrop's lock went with their killed node C{gone}
        where the locks tell (PostgreSQL).
        """
        heldAmong = getattr(self.locks, "heldAmong", None)
        return self.database.runInteraction(_sessions, self._now() - STALE_AFTER, address, kicked, heldAmong)

    def listNodes(self):
        """
        The live nodes and the settings they announce: a L{Deferred} list
        of L{mailgate.records.NodeInfo}, by name.
        """
        return self.database.runInteraction(_nodes, self._now() - STALE_AFTER)

    def kickSessions(self, address):
        """
        Ask the nodes serving C{address}'s POP3 sessions to end them
        (without applying their deletions): a L{Deferred} of how many were
        marked.
        """
        now = self._now()
        return self.database.runWrite(_kick, address, now, now - STALE_AFTER)

    def importMessages(self, address, items, source=None):
        """
        Add messages from another server, keeping their unique ids; see
        L{_importMessages}.  One transaction: all of C{items} or none.

        @param source: the identity of the source they come from.
        @return: a L{Deferred} of C{(imported, skipped, conflicts)}; fails
            with L{NoSuchUser}.
        """
        return self.database.runWrite(_importMessages, address, list(items), source)

    def claimImported(self, address, source, uidls):
        """
        Record C{source} as where the ids of C{uidls} (which it lists, with
        the content the maildrop has under them) came from, for those
        imported before mailgate recorded sources: see L{_claimImported}.
        A L{Deferred} of how many; fails with L{NoSuchUser}.
        """
        return self.database.runWrite(_claimImported, address, source, list(uidls))

    def forgetImported(self, address, uidls=None):
        """
        Forget the unique ids imported for a user (C{uidls}, or all): see
        L{_forgetImported}.  A L{Deferred} of how many; fails with
        L{NoSuchUser}.
        """
        return self.database.runWrite(_forgetImported, address, None if uidls is None else list(uidls))

    def existingUidls(self, address, uidls):
        """
        Which of C{uidls} a user's maildrop already holds (or keeps
        deleted): a L{Deferred} dict, unique id to the set of sizes of
        what it holds under it.
        """
        return self.database.runInteraction(_existingUidls, address, list(uidls))

    def removeImportedGone(self, address, source, listed, soleSource=False):
        """
        Take out of a user's maildrop what an import from C{source} brought
        in and the source no longer lists (see L{_removeImportedGone}),
        kept for recovery; not while a POP3 session holds the maildrop.

        @param listed: every unique id the source lists now.
        @param soleSource: whether ids imported before mailgate recorded
            sources, or by another source that brought in some of what
            this one lists, count as this source's.
        @return: a L{Deferred} of C{(unique ids taken out, how many
            imported without a recorded source were left, (source, how
            many left) of each other source some of whose ids this one
            lists)}; fails with L{NoSuchUser} or L{MaildropInUse}.
        """
        now = self._now()
        return self._underLock(
            address, _removeImportedGone, address, source, frozenset(listed), soleSource, now,
            self._registryAliveSince(now),
        )

    def _registryAliveSince(self, now):
        """
        For the writes made under a maildrop's lock, which also look for
        the user's sessions in the session registry where the locks do not
        reach every process (L{_inSession}): the oldest heartbeat of a
        live node, or C{None} (no such look) where they do, PostgreSQL's
        advisory locks.  There the registry adds only the sessions of
        nodes killed less than L{STALE_AFTER} ago, whose locks went with
        them: C{user rename}, C{user del} and C{mailbox expunge} were
        refused for 30 seconds after a node's crash while the user could
        log in on another node.
        """
        if getattr(self.locks, "seenByEveryNode", False):
            return None
        return now - STALE_AFTER

    def _underLock(self, address, write, *args):
        """
        Write, C{write(cursor, *args)}, holding the maildrop's POP3 lock,
        taken without waiting: fails with L{MaildropInUse} if a session
        holds it.  (Where locks are per process, as with the embedded
        SQLite store, the session registry is checked as well, inside the
        write's transaction.)  The write is guarded (L{Guarded}): it fails
        with L{MaildropLockLost}, having changed nothing, if the lock was
        lost on the way.

        The write is given the id of the user whose lock is held, last,
        and must act on that user only (L{lockedUserId}): the address
        may be another user's by the time it runs, whose lock is not held.
        """
        return self._holdingLock(
            address, lambda userId: self.database.runWrite(Guarded.under(self.locks, userId, write), *args, userId)
        )

    @defer.inlineCallbacks
    def _holdingLock(self, address, locked):
        """
        C{locked(userId)}, a L{Deferred}, run holding the maildrop lock of
        the user C{address} names, taken without waiting, and released
        however it ends.  One home for what renaming, deleting and
        expunging a user (L{_underLock}, L{expungeMessages},
        L{mailgate.store.sql.SQLMailStore.deleteUser}) each did, so that
        none of them forgets the release or looks the user up otherwise.

        @return: a L{Deferred} of what C{locked} gave; fails with
            L{NoSuchUser} if there is no such user, or L{MaildropInUse} if
            a session holds the lock.
        """
        user = yield self.findUser(address)
        if user is None:
            raise NoSuchUser(address)
        yield self.locks.acquire(user.userId)
        try:
            result = yield locked(user.userId)
        finally:
            yield self.locks.release(user.userId)
        return result

    def disableUser(self, address, reason=None):
        """
        Disable a user: their POP3 logins are refused from now on, on
        every node, at the next login (a password a node remembered too:
        the snapshot every login reads says so, L{mailgate.store.snapshot}),
        with C{reason} told to a client whose password was right.  A
        session in progress goes on: C{mailgate user disable} ends it
        (L{kickSessions}).  Mail is still delivered.  A user disabled
        already keeps the time they were disabled, with the new reason.

        @return: a L{Deferred} of whether the user was disabled already;
            fails with L{NoSuchUser}.
        """
        return self.database.runWrite(_disableUser, address, int(self._now()), reason or None)

    def enableUser(self, address):
        """
        Let a disabled user log in again, with the password they had.

        @return: a L{Deferred} of whether the user was disabled; fails
            with L{NoSuchUser}.
        """
        return self.database.runWrite(_disableUser, address, None, None)

    def setAllowedNetworks(self, address, networks):
        """
        Restrict the networks a user may log in from (C{None}: anywhere):
        from now on, at the next login on every node (a password a node
        remembered too: the snapshot every login reads says so), a client
        elsewhere is refused as a wrong password.  A session in progress
        goes on.  Mail is still delivered.

        @param networks: their canonical text
            (L{mailgate.networks.parseAllowedNetworks}), or C{None}.
        @return: a L{Deferred} of the networks the user had; fails with
            L{NoSuchUser}.
        """
        return self.database.runWrite(_setAllowedNetworks, address, networks)

    def addAlias(self, alias, address):
        """
        Make C{alias} an alias of the user C{address}: mail to it is
        theirs from the next RCPT on, on every node (a recipient no user
        has is never remembered).

        @return: a L{Deferred} of C{True}, or C{False} if it was theirs
            already; fails with L{NoSuchUser}, L{UserExists} (C{alias} is
            a user's address) or L{mailgate.errors.AliasExists} (another
            user's alias).
        """
        return self.database.runWrite(_addAlias, alias, address, int(self._now()))

    def addAliases(self, pairs):
        """
        Add aliases in one transaction, each as L{addAlias} adds it.

        @return: a L{Deferred} list, in order, of C{True} (added), C{False}
            (theirs already) or the L{NoSuchUser}, L{UserExists} or
            L{mailgate.errors.AliasExists} that refused it.
        """
        return self.database.runWrite(_addAliases, list(pairs), int(self._now()))

    def removeAlias(self, alias):
        """
        Remove an alias: mail to it is refused from the next RCPT on.

        @return: a L{Deferred} of the address of the user it was an alias
            of (C{None} for a user removed by hand); fails with
            L{mailgate.errors.NoSuchAlias}.
        """
        return self.database.runWrite(_removeAlias, alias)

    def listAliases(self, address=None):
        """
        The aliases of the user C{address}, or all.

        @return: a L{Deferred} list of L{mailgate.records.AliasRecord}, in
            the code point order of the aliases; fails with L{NoSuchUser}
            for a C{address} no user has.
        """
        return self.database.runInteraction(_listAliases, address)

    def addMasterUser(self, name, passwordHash, networks=None):
        """
        Add a master user (L{mailgate.store.masterusers}): its logins work
        from the next one on, on every node.

        @param networks: the networks it may log in from (canonical text),
            or C{None}: anywhere.
        @return: a L{Deferred} of C{None} once durably committed; fails with
            L{mailgate.errors.MasterUserExists}.
        """
        return self.database.runWrite(_addMasterUser, name, passwordHash, int(self._now()), networks)

    def setMasterUserNetworks(self, name, networks):
        """
        Restrict the networks a master user may log in from (C{None}:
        anywhere), from the next login on, on every node.

        @return: a L{Deferred} of the networks it had; fails with
            L{mailgate.errors.NoSuchMasterUser}.
        """
        return self.database.runWrite(_setMasterUserNetworks, name, networks)

    def setMasterUserPassword(self, name, passwordHash):
        """
        Replace a master user's password hash: the old password fails from
        the next login on, on every node.

        @return: a L{Deferred} of C{None}; fails with
            L{mailgate.errors.NoSuchMasterUser}.
        """
        return self.database.runWrite(_setMasterUserPassword, name, passwordHash)

    def removeMasterUser(self, name):
        """
        Remove a master user: its logins fail from the next one on, on
        every node (sessions it opened go on to their end).

        @return: a L{Deferred} of C{None}; fails with
            L{mailgate.errors.NoSuchMasterUser}.
        """
        return self.database.runWrite(_removeMasterUser, name)

    def listMasterUsers(self):
        """
        Every master user.

        @return: a L{Deferred} list of L{mailgate.records.MasterUserRecord}
            in the code point order of their names.
        """
        return self.database.runInteraction(_listMasterUsers)

    def renameUser(self, old, new):
        """
        Rename a user; refused (L{MaildropInUse}) while the user is in a
        POP3 session.  The next login must use the new address, also on a
        running server: a password remembered for the old one no longer
        opens the maildrop (see L{mailgate.store.snapshot}).

        @return: a L{Deferred}; fails with L{NoSuchUser}, L{UserExists} or
            L{MaildropInUse}.
        """
        return self._underLock(old, _renameUser, self.engine, old, new, self._registryAliveSince(self._now()))

    def expungeMessages(self, address, olderThanDays=None, perTransaction=None, progress=None):
        """
        Remove a user's messages for good (all of them, or those older
        than C{olderThanDays}), those kept for recovery included, not
        while a POP3 session holds the maildrop.  The maildrop's lock is
        held throughout; the removals are committed C{perTransaction} at
        a time (L{EXPUNGE_PER_TRANSACTION}), so that the deliveries and
        sessions of other users (on SQLite, every write) wait for one
        such transaction at most, not for the whole maildrop.  An expunge
        stopped half-way (interrupted, the database lost) has removed
        what its committed transactions removed, and no more: run again,
        it removes the rest.

        @param progress: called after each committed transaction with
            the running totals C{(messages removed, kept deleted messages
            removed)}: what an expunge stopped half-way has done.
        @return: a L{Deferred} of C{(messages removed from the maildrop,
            kept deleted messages removed)}; fails with L{NoSuchUser} or
            L{MaildropInUse}.
        """
        now = self._now()
        before = None if olderThanDays is None else now - olderThanDays * DAY

        return self._holdingLock(
            address, lambda userId: self._expungeLocked(address, userId, before, now, perTransaction, progress)
        )

    @defer.inlineCallbacks
    def _expungeLocked(self, address, userId, before, now, perTransaction=None, progress=None):
        """
        Remove C{userId}'s messages (those that arrived before C{before},
        or all) and kept deleted mail, C{perTransaction} at a time, its
        maildrop lock held by the caller; see L{expungeMessages}.

        @return: a L{Deferred} of C{(messages removed, kept deleted
            messages removed)}.
        """
        perTransaction = EXPUNGE_PER_TRANSACTION if perTransaction is None else perTransaction
        removed = kept = 0
        below = None
        more = True
        while more:
            fromMaildrop, fromKept, below, more = yield self.database.runWrite(
                Guarded.under(self.locks, userId, _expungeSome),
                address, before, below, perTransaction, self._registryAliveSince(now), userId,
            )
            removed += fromMaildrop
            kept += fromKept
            if progress is not None:
                progress(removed, kept)
        return removed, kept

    def recountUsage(self, address):
        """
        Count a user's storage use again from the maildrop's messages.

        @return: a L{Deferred} of C{(before, after)}, each C{(messages,
            octets)}; fails with L{NoSuchUser}.
        """
        return self.database.runWrite(_recountUsage, address)
