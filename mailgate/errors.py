# -*- test-case-name: tests.test_store -*-
"""
Exceptions shared by the storage, authentication and protocol layers.

Protocol code turns these into replies (C{-ERR [SYS/TEMP]}, C{451 4.3.0},
...) without knowing which backend raised them, so each one says what kind of
failure it is rather than where it came from.
"""

import re

#: a SQLSTATE (PostgreSQL's error code), and the name of an SQLite result
#: code: fixed vocabularies, safe to show
_SQLSTATE = re.compile(r"[0-9A-Z]{5}")
_SQLSTATE_IN_TEXT = re.compile(r"\bSQLSTATE ([0-9A-Z]{5})\b")
_SQLITE_CODE = re.compile(r"SQLITE_[A-Z_]{1,40}")


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


class DatabaseDamaged(TemporaryFailure):
    """
    The database's file is damaged (SQLite's "database disk image is
    malformed", "file is not a database": a failing disk, a file copied
    while it was written or without its C{-wal}, one truncated by a full
    disk): what reads or writes the damaged pages fails until the
    administrator restores it, while the rest may still be served.

    A temporary failure for clients all the same (C{-ERR [SYS/TEMP]},
    C{451}): the mail a sending MTA holds must stay queued until the
    restore, not bounce, and a POP3 client loses nothing by trying again
    later, which is what a restore needs it to do.  Not an internal error
    either: mailgate did not make the damage, and a traceback at every
    session said nothing an administrator could act on.  Its message
    names the file and what to do; the store logs it once as an error
    (C{database.damaged}), the line to alert on.  The C{mailgate}
    command exits 78 (75 for C{deliver}): a retry does not repair it.
    """


class WritesFailing(TemporaryFailure):
    """
    The health check's verdict on a database that may still read but whose
    latest write transaction failed (a full disk, a filesystem turned
    read-only, a standby): mail cannot be stored until a write commits.

    @ivar kind: what kind of failure it is, in words that carry none of
        the error's text (L{errorKind}).
    """

    def __init__(self, message, kind):
        super().__init__(message)
        self.kind = kind


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


class UserChanged(TemporaryFailure):
    """
    An admin command's write found the address it was given held by
    another user than the one whose maildrop lock it took (the user
    deleted and the address given to another, or renamed away,
    meanwhile): nothing was changed, and the command is to be run again,
    which looks the address up afresh.
    """


class MaildropInUse(MailgateError):
    """
    Another session holds the maildrop's exclusive lock (RFC 1939 section 8,
    C{[IN-USE]} of RFC 2449).
    """


class NoSuchUser(MailgateError):
    """
    The address names no user of this gateway.

    @ivar addresses: where a delivery to several recipients failed for
        those of them that have no user (L{mailgate.interfaces.IMailStore.deliver}
        without C{partial}), those addresses; else empty.
    """

    addresses = ()


class UserExists(MailgateError):
    """
    A user with this address already exists.
    """


class AliasExists(MailgateError):
    """
    The address is an alias of a user (L{mailgate.interfaces.ILifecycleStore.addAlias}):
    it cannot be given to a user, nor made an alias again, until the alias
    is removed.

    @ivar address: the alias.
    @ivar target: the address of the user it is an alias of.
    """

    def __init__(self, address, target):
        super().__init__(address, target)
        self.address = address
        self.target = target

    def __str__(self):
        return f"{self.address} is an alias of {self.target}"


class NoSuchAlias(MailgateError):
    """
    The address is no alias of any user.
    """


class MasterUserExists(MailgateError):
    """
    A master user of this name already exists.
    """


class NoSuchMasterUser(MailgateError):
    """
    There is no master user of this name.
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


class DatabaseInUse(ConfigurationError):
    """
    A mailgate server runs on the database, which the work asked for
    cannot be done under: a second server on an embedded SQLite file
    (start-up stops, as for any L{ConfigurationError}), or C{mailgate db
    restored} while a node serves the database (exit 75: stop it, then
    run it again).
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


class UserDisabled(MailgateError):
    """
    The user's password was right, but an administrator has disabled the
    user (C{mailgate user disable}, Dovecot's C{nologin}): no POP3 login,
    by any mechanism, until C{mailgate user enable}.  Mail is still
    delivered.  Raised only once the credentials are verified, so a wrong
    password for a disabled user fails as any wrong password does.

    @ivar reason: the administrator's reason, told to the client, or
        C{None} for none.
    """

    #: The most characters of a reason (C{mailgate user disable --reason}),
    #: kept and told to the client.
    REASON_MAX = 200

    def __init__(self, userId, reason=None):
        super().__init__(userId, reason)
        self.userId = userId
        self.reason = reason or None

    def __str__(self):
        return self.reason or "the account is disabled"


class NetworkRefused(MailgateError):
    """
    The user's credentials were verified, but the client's address is on
    none of the networks the user may log in from (C{mailgate user
    networks}, Dovecot's C{allow_nets}).  Answered as a wrong password
    (as Dovecot answers it): the client is not told that the password was
    right.
    """

    def __init__(self, userId):
        super().__init__(userId)
        self.userId = userId

    def __str__(self):
        return "the client's address is not on the user's allowed networks"


class MasterNetworkRefused(NetworkRefused):
    """
    A master user's password was verified, but the client's address is on
    none of the networks the master user may log in from (C{mailgate
    master networks}, the C{allow_nets} of Dovecot's master passdb):
    answered as a wrong password, as the user's own networks are.
    """

    def __str__(self):
        return "the client's address is not on the master user's allowed networks"


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


def errorKind(error):
    """
    What kind of failure C{error} is, in words that carry none of its text:
    C{"storage full"} for L{StorageFull}, otherwise the class of the error
    at the bottom of its chain (the driver's, beneath mailgate's own),
    after mailgate's own class when it says more than a temporary failure
    (L{DatabaseRefused}), and the SQLSTATE or SQLite result code when
    there is one (the driver's, or the one L{mailgate.store.pgrefusal}
    wrote into the message), e.g. C{"OperationalError, SQLSTATE 57P01"},
    C{"DatabaseRefused, OperationalError, SQLSTATE 28P01"} or
    C{"OperationalError, SQLITE_READONLY"}.

    What answers anyone who asks (the health endpoint) says this and no
    more: a database error's text can name hosts, users, databases and
    paths (libpq's C{connection to server at "db.internal" (10.0.0.5)
    ... password authentication failed for user "mailgate"}), which
    belong in the log only.
    """
    if isinstance(error, StorageFull):
        return "storage full"
    if isinstance(error, WritesFailing):
        return error.kind
    chain = [error]
    for _ in range(8):
        above = chain[-1]
        beneath = above.__cause__
        if beneath is None and not above.__suppress_context__:
            beneath = above.__context__
        if beneath is None:
            break
        chain.append(beneath)
    bottom = chain[-1]
    parts = []
    if bottom is not error and isinstance(error, MailgateError) and type(error) is not TemporaryFailure:
        parts.append(type(error).__name__)
    parts.append(type(bottom).__name__)
    sqlstate = getattr(bottom, "sqlstate", None)
    if not (isinstance(sqlstate, str) and _SQLSTATE.fullmatch(sqlstate)):
        found = (_SQLSTATE_IN_TEXT.search(str(each)) for each in chain)
        sqlstate = next((match.group(1) for match in found if match), None)
    if sqlstate is not None:
        parts.append(f"SQLSTATE {sqlstate}")
    code = getattr(bottom, "sqlite_errorname", None)
    if isinstance(code, str) and _SQLITE_CODE.fullmatch(code):
        parts.append(code)
    return ", ".join(parts)
