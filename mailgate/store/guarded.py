# -*- test-case-name: tests.test_lifecycle -*-
"""
Writes made under a maildrop's POP3 lock, by the admin commands and the
retention task: the guard that commits them only while the lock is held,
and the look-ups that make sure they act on the user whose lock it is.

Each runs, like the statements of L{mailgate.store.sql}, on a cursor
inside a transaction.
"""

from mailgate.errors import MaildropInUse, MaildropLockLost, NoSuchUser, UserChanged


def _userId(cursor, address):
    cursor.execute("SELECT user_id FROM users WHERE address = ?", (address,))
    row = cursor.fetchone()
    if row is None:
        raise NoSuchUser(address)
    return row[0]


def lockedUserId(cursor, address, lockedId):
    """
    The id of the user C{address} names, which must be C{lockedId}: the
    user whose maildrop lock an admin command took after looking the
    address up (L{mailgate.store.lifecycle.LifecycleStore._underLock}).  Between that look-up and
    this write, the user may have been deleted and the address given to
    another user (renamed or added), whose lock the command does not
    hold: acting on them could remove mail under a POP3 session's feet.

    @raise NoSuchUser: if no user has C{address} (now).
    @raise UserChanged: if another user has it now.
    """
    userId = _userId(cursor, address)
    if lockedId is not None and userId != lockedId:
        raise UserChanged(
            f"the user {address} changed meanwhile (deleted or renamed, and the address given to another "
            "user); nothing was changed"
        )
    return userId


def lockedOutOfSession(cursor, address, lockedId, aliveSince):
    """
    L{lockedUserId}, refused while a live node's registry shows the user
    in a POP3 session (L{_inSession}): the first check of every write that
    removes what a session may be serving (an expunge's transaction, a
    user's deletion, imported ids forgotten), which each of them wrote
    out before.

    @raise NoSuchUser: if no user has C{address} (now).
    @raise UserChanged: if another user has it now.
    @raise MaildropInUse: if the user is in a POP3 session.
    """
    userId = lockedUserId(cursor, address, lockedId)
    if _inSession(cursor, userId, aliveSince):
        raise MaildropInUse(address)
    return userId


LOCK_LOST = "the maildrop lock was lost; nothing removed"


class Guarded:
    """
    A write made under a maildrop's lock, C{write(cursor, *args)}, in a
    transaction that first runs the lock's guard (see
    L{IMaildropLocks.writeGuard}): it commits only while the lock is held,
    and another node that takes the lock once it is lost reads the
    maildrop after it.  Measured under C{write}'s name.
    """

    def __init__(self, guard, write):
        self._guard = guard
        self._write = write
        self.__name__ = write.__name__

    def __call__(self, cursor, *args):
        if not self._guard(cursor):
            raise MaildropLockLost(LOCK_LOST)
        return self._write(cursor, *args)

    def mailboxes(self, cursor, *args):
        """
        The C{mailboxes} rows C{write} declares it updates
        (L{mailgate.store.database.updatesMailboxes}).
        """
        declared = getattr(self._write, "mailboxes", None)
        return () if declared is None else declared(cursor, *args)

    @classmethod
    def under(cls, locks, userId, write):
        """
        C{write} guarded by this process's lock on C{userId}'s maildrop.

        @raise MaildropLockLost: if the lock is not held, or known lost.
        """
        guard = locks.writeGuard(userId)
        if guard is None:
            raise MaildropLockLost(LOCK_LOST)
        return cls(guard, write)


def _inSession(cursor, userId, aliveSince):
    """
    Whether a live node's registry shows a POP3 session of the user
    (C{aliveSince}: the oldest heartbeat of a live node); never when
    C{aliveSince} is C{None}, where the maildrop's lock alone tells (see
    L{mailgate.store.lifecycle.LifecycleStore._registryAliveSince}).
    """
    if aliveSince is None:
        return False
    cursor.execute(
        "SELECT 1 FROM pop3_sessions s JOIN mailgate_nodes n ON n.node_id = s.node_id "
        "WHERE s.user_id = ? AND n.seen_at >= ? LIMIT 1",
        (userId, aliveSince),
    )
    return cursor.fetchone() is not None
