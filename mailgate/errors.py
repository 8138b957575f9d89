# -*- test-case-name: tests.test_store -*-
"""
Exceptions shared by the storage, authentication and protocol layers.

Protocol code turns these into replies (C{-ERR [SYS/TEMP]}, C{451 4.3.0},
...) without knowing which backend raised them, so each one says what kind of
failure it is rather than where it came from.
"""


class MailgateError(Exception):
    """
    Base class of mailgate's own exceptions.
    """


class ShuttingDown(MailgateError):
    """
    The service is stopping: not healthy, whatever the database says (and
    not the database's failure either).
    """


class TemporaryFailure(MailgateError):
    """
    The operation failed for a reason that may go away: the database is
    unreachable, locked or out of space.  POP3 answers C{[SYS/TEMP]} and SMTP
    answers 451, so clients retry; nothing was changed.
    """


class CommitUncertain(TemporaryFailure):
    """
    The connection to the database was lost while a write's COMMIT was on
    its way: the change may or may not have taken effect, and only asking
    the database again can tell.  Unlike other temporary failures, it is
    not certain that nothing changed, so replies must not say so (POP3's
    QUIT says the deleted messages may or may not have been removed; a
    client that retries a delivery may store it twice, as with any MTA).
    """


class StorageFull(TemporaryFailure):
    """
    The database has no room left to write: the disk (or the filesystem,
    or PostgreSQL's tablespace) it writes to is full.  Nothing was
    changed, as for any temporary failure, but the reply says what it is:
    SMTP and LMTP answer C{452 4.3.1} (RFC 3463's "mail system full", RFC
    5321's "insufficient system storage"), as Dovecot's LMTP does, so the
    sending MTA keeps the message and its log tells the administrator why.
    """


class MaildropLockLost(TemporaryFailure):
    """
    A session's deletions were not applied: its maildrop lock was lost on
    the way (its connection to a shared database broke), and another
    session may have the maildrop now.  Nothing was removed.  A temporary
    failure for the client; not a failure of the database that was
    written to.
    """


class DatabaseRefused(TemporaryFailure):
    """
    The database server answered and refused the connection for a reason
    only a change of configuration ends: a wrong password, an unknown role
    or database, no C{pg_hba.conf} entry (see
    L{mailgate.store.pgrefusal}).  While mailgate runs it is a temporary
    failure like any other (sessions get C{[SYS/TEMP]} or 451, and the
    next operation connects again: the password may be put back), but
    start-up and the C{mailgate} command stop with C{EX_CONFIG} (78), so
    that neither a supervisor nor an administrator retries it for ever.
    """


class MaildropInUse(MailgateError):
    """
    Another session holds the maildrop's exclusive lock (RFC 1939 section 8,
    C{[IN-USE]} of RFC 2449).
    """


class NoSuchUser(MailgateError):
    """
    The address names no user of this gateway.
    """


class UserExists(MailgateError):
    """
    A user with this address already exists.
    """


class InvalidAddress(MailgateError, ValueError):
    """
    The text is not a mailbox address mailgate accepts.
    """


class ConfigurationError(MailgateError):
    """
    The configuration cannot work: a bad database URL, an unusable option.
    Start-up reports it in one line and stops.
    """


class UnavailableAtStart(ConfigurationError):
    """
    Start-up cannot go on because the database cannot be reached for now
    (the server down, starting up, out of connection slots), not because
    the configuration is wrong: it stops all the same, as for any
    L{ConfigurationError} (a server that would fail every session is
    worse), but C{twistd mailgate} exits C{EX_TEMPFAIL} (75) rather than
    C{EX_CONFIG} (78), so that a supervisor starts it again.
    """


class LoginDelayed(MailgateError):
    """
    The user logged in again sooner than the configured LOGIN-DELAY allows
    (RFC 2449 section 8.1.2).
    """


class CredentialsChanged(MailgateError):
    """
    The password a login was verified with is no longer the user's (it was
    changed, or the user deleted, since it was verified and remembered).
    The login fails like a wrong password.
    """


class QuotaExceeded(MailgateError):
    """
    The message would take a recipient's maildrop over its quota (RFC 3463
    "mailbox full": SMTP and LMTP answer C{452 4.2.2}, or C{552 5.2.2}
    where over-quota refusals are configured to be permanent).  Nothing was
    stored for that recipient.

    @ivar addresses: the recipients that are over quota.
    """

    def __init__(self, *addresses):
        super().__init__(*addresses)
        self.addresses = addresses

    def __str__(self):
        return "mailbox full: " + ", ".join(self.addresses)
