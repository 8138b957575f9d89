"""
The contracts between mailgate's layers.

Protocol code (POP3, SMTP, LMTP) talks to storage only through these
interfaces, so the SQLite and PostgreSQL stores are interchangeable and
neither protocol knows which one it runs on.  Every storage method returns a
L{Deferred}: the work runs off the reactor thread, or on database
connections the reactor drives without ever waiting on them.

Failures are reported with the exceptions of L{mailgate.errors}:
L{TemporaryFailure} when the store cannot answer now (the client should retry),
L{MaildropInUse} when another session holds a maildrop.
"""

from zope.interface import Attribute, Interface


class _Keep:
    """
    The type of L{KEEP}, named so in a signature.
    """

    def __repr__(self):
        return "KEEP"


#: A limit given to L{ILifecycleStore.setQuota} as not to change: its
#: default, which a caller may pass too.  Here, not in the store, which
#: uses it: the contract says what an argument not given means, and
#: imports no store.  (C{None} is a value: the server's default.)
KEEP = _Keep()


class IMessageSource(Interface):
    """
    A message ready to be stored: its octets with CRLF line ends, exactly as
    a POP3 client will count them (before dot-stuffing).

    Stores read it from their own worker threads, in chunks, so a large
    message never has to be held in memory whole.
    """

    size = Attribute("The message's length in octets.")
    headerSize = Attribute(
        "Octets of the header section, including the empty line that ends it "
        "(the whole message if it has no body).  TOP reads only this far."
    )
    dotLines = Attribute(
        "Whether some line of the message starts with \".\" (POP3 must "
        "dot-stuff it), or C{None} if not known."
    )
    dotOffsets = Attribute(
        "Where the lines that start with \".\" begin (ascending offsets), "
        "or C{None} if not known; optional (a source without it is not "
        "measured)."
    )

    deliveryKey = Attribute(
        "Optional: C{None}, or octets that only this message, as the client "
        "sent it, has (a digest of its envelope sender and of the octets "
        "received, before the trace fields the server adds): a delivery "
        "with the key of one a recipient got within the store's duplicate "
        "window is a client's retry (it lost the reply to a committed "
        "message), answered with the first delivery's unique id "
        "(L{mailgate.records.AlreadyDelivered}) and not stored again."
    )

    def chunks(chunkSize):
        """
        Iterate over the message's octets in pieces of at most C{chunkSize}.
        May be called from any thread, more than once.
        """


class IMessageBody(Interface):
    """
    One message opened for reading by a POP3 session: one recipient's
    copy, its own fields (its C{Return-Path:} and C{Delivered-To:}, where
    it has them) and the body it shares with the other recipients' copies
    together, every attribute the copy's.
    """

    size = Attribute("Length in octets (CRLF line ends, before dot-stuffing).")
    headerSize = Attribute("Octets of the header section, blank line included.")
    needsStuffing = Attribute(
        "Whether a line of the message may start with \".\": C{False} only "
        "when the store knows none does, so the message goes out as it is."
    )
    dotOffsets = Attribute(
        "Where the lines that start with \".\" begin (ascending offsets, "
        "empty if none do), so that POP3 stuffs by copying slices; or "
        "C{None} if the store does not know, and POP3 searches."
    )
    whole = Attribute(
        "The entire message as L{bytes} if it was read in one piece when "
        "opened (then L{read} need not be called), else C{None}."
    )

    def read():
        """
        Return a L{Deferred} firing with the next piece of the message, or
        with C{b""} once the whole message has been read (and again at
        every call after that).  The pieces add up to L{size} octets.

        The caller asks for the next piece only once the previous one has
        arrived: a body keeps no queue of reads.  Fails with
        L{mailgate.errors.TemporaryFailure} when the store cannot read the
        message now.
        """


class IMessageReads(Interface):
    """
    Where a store's POP3 sessions read messages from: the statements of
    L{mailgate.store.reads}, run as the engine runs them best (on the
    database's reader threads, or on connections the reactor drives).
    Each fails with L{mailgate.errors.TemporaryFailure} when the database
    cannot answer.
    """

    def openMessages(userId, uids, headerOnly, budget):
        """
        Open the first of C{uids} (the user's message uids, ascending, or
        descending for a client going from the newest back) and read the
        others ahead while what is read of them adds up to at most
        C{budget} octets: a L{Deferred} of what
        L{mailgate.store.reads.openedMessages} returns.  Whole messages
        come as their first chunks (a long one's header); for
        C{headerOnly}, the headers' octets only.
        """

    def readChunks(owner, bodyId, seq, count):
        """
        A L{Deferred} of a body's chunks from C{seq}, at most C{count}, a
        list in order (see L{mailgate.store.reads.chunksInOrder}).
        """

    def close():
        """
        Let go of any connection; reads asked for after this fail.  May
        return a L{Deferred} that fires once they are closed.
        """


class IMaildrop(Interface):
    """
    A POP3 session's view of one user's maildrop: the avatar the realm
    hands to the POP3 protocol.

    It is a snapshot taken at login under the maildrop's exclusive lock:
    message numbers (0-based here, 1-based on the wire) stay fixed for the
    whole session, and mail that arrives meanwhile appears at the next login.
    Deletion marks are session state kept by the protocol; the maildrop only
    applies them, all at once, in L{expunge}.
    """

    address = Attribute("The owner's address.")
    sizes = Attribute(
        "A sequence of the sizes of the snapshot's messages, in octets, "
        "indexed by message number minus one."
    )

    def uniqueIds(first, count):
        """
        The persistent unique ids (RFC 1939 section 7) of C{count} messages
        starting at index C{first}, as a L{Deferred} list of L{str}: fewer
        where the snapshot ends first.  A message's id is the same in every
        session, and never another message's in the same maildrop.  Fails
        with L{mailgate.errors.TemporaryFailure} when the store cannot
        answer now.
        """

    def openMessage(index, headerOnly=False):
        """
        Open a message for reading: a L{Deferred} L{IMessageBody}.  Each
        call gives a body of its own, read from the start; a message may
        be opened again (a client's second RETR).  Fails with
        L{mailgate.errors.TemporaryFailure} when the store cannot read it
        now.

        @param index: a message number minus one, within L{sizes}.
        @param headerOnly: read only the header section (for C{TOP n 0});
            the body then reports the header's size as its size.
        """

    expireDays = Attribute(
        "The owner's retention in days (RFC 2449 EXPIRE, as CAPA shows it "
        "after login), or C{None} for never."
    )

    def sessionStarted(peer, end, lockLost=None, master=None):
        """
        The POP3 session working on this maildrop has begun (called once,
        at login; synchronous).

        @param peer: the client's address, C{"host:port"}: shown by
            C{mailgate who}, and recorded with what the session deletes.
        @param end: a callable that ends the session without applying its
            deletions (C{mailgate kick}), or C{None}.
        @param lockLost: a callable that ends the session without applying
            its deletions because the maildrop's lock was lost under it
            (see L{IMaildropLocks.whenLost}), or C{None}.
        @param master: the name of the master user who logged in to the
            owner's maildrop (a helpdesk, a backup tool), or C{None} for
            the owner's own login: like C{peer}, shown by C{mailgate who}
            and recorded with what the session deletes, so that an
            administrator asked who deleted a user's mail can answer.
        """

    def expunge(indexes, peer=None):
        """
        Remove the given messages, all in one transaction (the RFC 1939
        UPDATE state).  The L{Deferred} fires once the removal is durable.
        If it fails, nothing was removed, except with
        L{mailgate.errors.CommitUncertain}: the connection was lost during
        the commit, and the removal may or may not have happened (the
        client is told so, not that none were removed).

        @param peer: the client's address, C{"host:port"}, recorded with
            the messages where the store keeps deleted mail for recovery
            (by default the one given to L{sessionStarted}); the master
            user given to L{sessionStarted}, if one, is recorded too.
        """

    def release():
        """
        Release the maildrop's lock.  Idempotent; called at logout, whether
        the session ended with QUIT, a timeout or a dropped connection.

        @return: a L{Deferred} that fires once the lock is free for others.
        """


class IMaildropLocks(Interface):
    """
    The RFC 1939 exclusive-access lock: at most one POP3 session per maildrop.

    An implementation decides how far the lock reaches: one process for the
    embedded SQLite store, every node sharing the database for PostgreSQL.
    """

    def acquire(userId):
        """
        Lock a maildrop: a L{Deferred} that fires when the lock is held, or
        fails with L{MaildropInUse} at once (it never waits for another
        session to end).
        """

    def acquireAndSnapshot(userId, passwordHash, address=None, peer=None):
        """
        Lock a maildrop and, with the lock held, read the snapshot a POP3
        session works on (see L{mailgate.store.snapshot}), in as few trips
        to the database as the implementation can manage: on PostgreSQL
        both run on the lock's own connection.

        @param passwordHash: the password hash the login was verified
            against, or C{None}; if given and no longer the user's stored
            hash (or the user is gone), the lock is given back and this
            fails with L{mailgate.errors.CredentialsChanged}.
        @param address: the address the login was made under, or C{None};
            with C{passwordHash}, if the user no longer has that address
            (renamed), this fails the same way.
        @param peer: the client's address (an C{IAddress}), or C{None}:
            if given and on none of the user's allowed networks, the lock
            is given back and this fails with
            L{mailgate.errors.NetworkRefused}.
        @return: a L{Deferred} of C{(uids, sizes, uniqueIds)}: the
            maildrop's message uids in order and their sizes, two
            C{array("q")}, and their unique ids (a list in the same order)
            if the maildrop is small enough to read them with the rest
            (see L{mailgate.store.snapshot.SNAPSHOT_UNIQUE_IDS}), else
            C{None}; fails with L{MaildropInUse} if another session holds
            the lock.
        """

    def release(userId):
        """
        Unlock a maildrop this process holds.  Unlocking one that is not held
        does nothing.

        @return: a L{Deferred} that fires once the lock is free for others.
        """

    def whenLost(userId, lost):
        """
        Call C{lost()} (once, on the reactor thread) if this process learns
        that the lock it holds on C{userId}'s maildrop is lost, which a
        lock shared between nodes can be with the connection holding it
        (soon, if it is known lost already); never after L{release}.
        Another process may then take the lock and change the maildrop, so
        the session that held it can neither apply its deletions nor trust
        its snapshot: it is to end.  Does nothing for a lock not held, or
        one that cannot be lost.
        """

    def writeGuard(userId):
        """
        What the transaction applying a session's deletions runs first,
        so that it commits only while this process holds the lock: a
        callable taking the transaction's cursor and returning whether the
        lock is still held (if not, the transaction must not go on), or
        C{None} if the lock is already known lost (a broken connection to
        a shared database) or not held.

        Where other processes share the lock, the guard also keeps any of
        them that takes the lock after it was lost from reading its
        snapshot until the transaction has ended: that session sees the
        deletions committed, or none of them.
        """

    def close():
        """
        Forget every lock this process holds and give back what holds them
        (connections, threads): a L{Deferred} that fires when done.
        """


class IMailStore(Interface):
    """
    Users, maildrops and messages.

    Addresses passed in are already normalised (see
    L{mailgate.address.normalizeAddress}).  Password material arrives already
    hashed: the store keeps what it is given and never sees a password.
    """

    def findUser(address):
        """
        Look up a user: a L{Deferred} L{mailgate.records.UserRecord},
        or C{None} if there is no such user.
        """

    def findUsers(addresses):
        """
        Look up several users at once (C{mailgate user import} looks up a
        batch of lines in one statement): a L{Deferred} dict of each
        address there is a user for to its L{mailgate.records.UserRecord};
        the others are not in it.
        """

    def findAlias(address):
        """
        Look up an alias (L{ILifecycleStore.addAlias}): a L{Deferred} of
        the address of the user C{address} is an alias of, or C{None}.
        SMTP, LMTP and C{mailgate deliver} ask it of a recipient that is
        no user's address.
        """

    def findAliases(addresses):
        """
        Look up several aliases in one statement (an alias and its
        domain's catch-all, C{@domain}): a L{Deferred} dict of each of
        C{addresses} that is an alias of a user to the address of that
        user; the others are not in it.
        """

    def findMasterUser(name):
        """
        Look up a master user (L{ILifecycleStore.addMasterUser}) by its
        normalised name (L{mailgate.address.masterName}): a L{Deferred}
        L{mailgate.records.MasterUserRecord}, or C{None}.
        """

    def hasDomain(domain):
        """
        Whether any user's address, or any alias, is in C{domain}: a
        L{Deferred} L{bool}.
        """

    def hasAPOPUsers():
        """
        Whether any user has APOP enabled: a L{Deferred} L{bool}.
        """

    def digestLoginUsers():
        """
        Whether any user has APOP enabled, and whether any has the HMAC-MD5
        states of a C{{CRAM-MD5}} hash imported from Dovecot: a
        L{Deferred} pair of L{bool}s, C{(apop, cramMD5)}, asked in one
        query (every node asks every L{mailgate.service.APOP_REFRESH}
        seconds).
        """

    def sharedSecret(name):
        """
        The deployment's random secret named C{name} (a L{Deferred} of 32
        octets): made by the first caller, then the same for every node
        sharing the database, and after restarts.  For keys whose output
        must agree across nodes, such as the SCRAM salt made up for
        unknown users.
        """

    def scramParameters():
        """
        How many users have SCRAM-SHA-256 keys of each iteration count and
        salt length: a L{Deferred} dict C{{(iterations, salt length in
        octets): users}}, read in one query (keys that do not parse are
        left out).  SCRAM gives a name that is no user parameters drawn
        from these (L{mailgate.auth.sasl.ScramParameters}).
        """

    def addUser(address, credentials):
        """
        Create a user with the given L{mailgate.auth.passwords.StoredCredentials}:
        a L{Deferred} that fires once the user is durably committed.  Fails
        with L{mailgate.errors.UserExists} if the address is taken, or
        L{mailgate.errors.AliasExists} if it is an alias of a user.
        """

    def addUsers(users):
        """
        Create users in one transaction (C{mailgate user import} adds a
        few hundred a commit: L{mailgate.store.sql.IMPORT_BATCH}).

        @param users: C{(address, credentials, quota)} each: the
            L{mailgate.auth.passwords.StoredCredentials}, and a dict that
            may hold their own C{octets} and C{messages} limits (as
            L{ILifecycleStore.setQuota} takes them) and, for a user added
            disabled (L{ILifecycleStore.disableUser}; a passwd-file's
            C{nologin}), C{disabled}: the reason, C{""} for none.
        @return: a L{Deferred} list, in order, C{True} for each user
            added, C{False} for each whose address is taken, by a user or
            an alias (nothing changed for them), once durably committed.
        """

    def setCredentials(address, credentials):
        """
        Replace a user's stored password material (hash, SCRAM keys, APOP
        secret, CRAM-MD5 states): a L{Deferred} that fires once committed.  A POP3 session
        opened after that must use the new password (see L{openMaildrop}).
        Fails with L{mailgate.errors.NoSuchUser}.
        """

    def upgradeCredentials(address, oldHash, credentials, hashOnly=False):
        """
        Replace a user's stored password material only if their password
        hash is still C{oldHash}: a hash imported from another server,
        replaced by mailgate's own at a successful login.  A L{Deferred}
        L{bool}: whether it was replaced (not if the password was changed,
        or the user deleted, meanwhile).

        @param hashOnly: replace only the hash and the SCRAM-SHA-256 keys,
            leaving the APOP secret and CRAM-MD5 states as they are now (a
            login's replacement, which means to keep them, must not put
            back what C{mailgate user apop} changed meanwhile).
        """

    def deleteUser(address, progress=None):
        """
        Remove a user and their maildrop: a L{Deferred} that fires once
        committed.  The maildrop is emptied a bounded number of messages
        per transaction first (C{progress(removed, kept)} called after
        each commit with the running totals), then the user removed in
        one transaction with what is left.  Message bodies still referenced by
        other maildrops stay.  Fails with L{mailgate.errors.NoSuchUser}, or
        L{mailgate.errors.MaildropInUse} while the user is in a POP3 session
        (which would go on answering for mail that is gone).
        """

    def userSummary(address):
        """
        One user as C{mailgate user list} shows them: a L{Deferred}
        L{mailgate.records.UserSummary} (their use, limits, whether they
        are disabled and the networks they may log in from), or C{None} if
        there is no such user.  For an administrator's command that looks
        at one user (C{mailgate user test} says why their logins would be
        refused) without reading every user's row as L{listUsers} does.
        """

    def listUsers(page=None):
        """
        All users: a L{Deferred} list of
        L{mailgate.records.UserSummary}, ordered by address.

        @param page: with a number of rows, a L{Deferred} iterable
            instead that reads that many users at a time as it is
            iterated (L{mailgate.store.paging.PagedListing}), in code
            point order of the addresses whatever the database's
            collation: with C{async for} on any store (each later page
            awaited), with C{for} on a synchronous store only (the admin
            command's; a threaded store's, a service's, raises
            L{RuntimeError} past the first page).
        """

    def listMessages(address, page=None):
        """
        A user's maildrop as the administrator sees it: a L{Deferred} list of
        L{mailgate.records.MessageInfo} in POP3 order; with C{page}, an
        iterable of them read C{page} at a time as it is iterated, the
        messages delivered after the call not in it (iterated again, read
        again).  Its pages after the first are read while it is iterated:
        with C{async for} on any store, the threaded one of C{openStore}
        (a service's) too, each page awaited; with C{for} on a synchronous
        store only (L{mailgate.store.openSynchronousStore}, the admin
        command's): a threaded store's raises L{RuntimeError} past the
        first page.  A later page's failure is raised where it is iterated
        (L{mailgate.errors.NoSuchUser} once the user is gone).
        """

    def deliver(addresses, source, partial=True):
        """
        Store one message for several local recipients: the octets once, one
        maildrop entry each, in one transaction.

        @param addresses: recipient addresses.
        @param source: an L{IMessageSource}.
        @param partial: if C{False}, an address without a user fails the
            whole delivery with L{mailgate.errors.NoSuchUser} and nothing is
            stored.
        @return: a L{Deferred} that fires once the delivery is durably
            committed, with a dict mapping each address to its new unique id
            (or, for a recipient who already got this message, see
            L{IMessageSource.deliveryKey}, the L{mailgate.records.AlreadyDelivered}
            id of that copy; for the copy that brought its user's use to a
            quota warning, a L{mailgate.records.WarnedOfQuota} id), or to a
            L{mailgate.errors.NoSuchUser}
            instance for an address that has no user (those get no copy;
            the others still do).  A failure means nothing was stored,
            except with L{mailgate.errors.CommitUncertain} (a temporary
            failure too): the message may have been stored, and a retry
            is then recognised by its delivery key (without one, it is
            stored twice, as with any MTA).
        """

    def openMaildrop(identity, peer=None):
        """
        Lock a user's maildrop and take the snapshot a POP3 session works on.

        @param identity: the L{mailgate.records.UserRecord} a credential
            checker authenticated.  Its password hash must still be the
            user's (a checker may answer from a cache of verified
            passwords); otherwise this fails with
            L{mailgate.errors.CredentialsChanged}.  A user disabled
            (L{ILifecycleStore.disableUser}) fails it with
            L{mailgate.errors.UserDisabled}, read in the same trip to the
            database.
        @param peer: the client's address (a Twisted C{IAddress}, the
            PROXY-told one if a trusted balancer told it), or C{None} for
            no client to check.  On none of the user's allowed networks
            (L{ILifecycleStore.setAllowedNetworks}), this fails with
            L{mailgate.errors.NetworkRefused}, read in that same trip.
        @return: a L{Deferred} L{IMaildrop}; fails with L{MaildropInUse} if
            another session holds it.
        """

    def recordLogin(identity, minimumInterval):
        """
        Enforce a minimum interval between a user's POP3 logins (RFC 2449
        LOGIN-DELAY): record this login unless the previous one was less
        than C{minimumInterval} seconds ago.  The check and the record are
        one step: of two logins racing (on two nodes), one proceeds.  Only
        a completed login counts: one whose maildrop is released before
        its session began (L{IMaildrop.sessionStarted}; a login refused
        or cancelled after its credentials were checked) is taken back
        before the maildrop's lock is released.

        @return: a L{Deferred} firing with L{True} if the login may proceed
            (it is recorded), L{False} if it came too soon (nothing is).
        """

    def close():
        """
        Release connections and locks: a L{Deferred} that fires when done.
        """


class ILifecycleStore(Interface):
    """
    A maildrop's life besides delivery and POP3 (see
    L{mailgate.store.lifecycle}): storage quotas, retention (RFC 2449
    EXPIRE), deleted mail kept for recovery, moving mail in from another
    server, renaming, expunging, and the registry of POP3 sessions every
    node shares (C{mailgate who}, C{mailgate kick}).  The SQL store
    provides it beside L{IMailStore}; the admin commands, the importers,
    SMTP/LMTP intake (quotas at RCPT) and the service's background tasks
    use it.

    Limits a user sets are a number, L{mailgate.store.limits.UNLIMITED}
    (-1: none, or NEVER) or L{mailgate.store.limits.DEFAULT} (C{None}:
    the server's).
    """

    limits = Attribute(
        "The server's defaults, a L{mailgate.store.limits.StoreLimits} "
        "(quota, retention, days deleted mail is kept); the service sets them "
        "from its configuration."
    )
    retention = Attribute(
        "The L{mailgate.store.retention.Retention}: what POP3 advertises as "
        "EXPIRE, answered from memory and refreshed by L{Retention.refresh}."
    )
    sessions = Attribute(
        "This node's L{mailgate.store.registry.SessionRegistry}: the POP3 "
        "sessions it serves, written out with its heartbeat."
    )

    def setQuota(address, octets=KEEP, messages=KEEP):
        """
        Set a user's own quota in octets and in messages: each a limit as
        above, or L{KEEP} (an argument not given) to leave it as it is.
        Mail already stored stays.

        @return: a L{Deferred}; fails with L{mailgate.errors.NoSuchUser}.
        """

    def setExpire(address, days):
        """
        Set a user's own retention in days.

        @return: a L{Deferred}; fails with L{mailgate.errors.NoSuchUser}.
        """

    def quotaOf(address):
        """
        A user's storage use and the limits that apply to it now: a
        L{Deferred} L{mailgate.records.QuotaStatus}, or C{None} if
        there is no such user.
        """

    def expireMessages(users=100, messagesPerTransaction=500):
        """
        One pass of the retention task: remove messages older than their
        user's retention, under each maildrop's POP3 lock taken without
        waiting (busy maildrops are skipped).

        @return: a L{Deferred} of C{(messages removed, maildrops
            skipped)}, a L{mailgate.records.ExpiryPass} that also says how
            many maildrops were examined; a write that fails ends the pass
            with its C{failure} set, what was removed until then told.
        """

    def purgeDeleted(limit=500):
        """
        Remove kept deleted mail past its time, at most C{limit} messages:
        a L{Deferred} of how many.
        """

    def forgetDeliveries(limit=500):
        """
        Forget, at most C{limit}, the recent deliveries kept to know a
        client's retry (see L{IMessageSource.deliveryKey}) once they are
        older than the duplicate window: a L{Deferred} of how many.
        """

    def listDeleted(address, page=None):
        """
        A user's kept deleted messages: a L{Deferred} list of
        L{mailgate.records.DeletedMessage}; with C{page}, an iterable of
        them read C{page} at a time as it is iterated (C{async for} on any
        store, C{for} on a synchronous one, as L{IMailStore.listMessages}).
        """

    def exportMessages(address, page=None):
        """
        A user's maildrop to copy out (C{mailgate mailbox export}), read
        without the maildrop's lock, so while the user is in a POP3
        session too: a L{Deferred} iterable of
        L{mailgate.records.ExportedMessage} in POP3 order, each with a
        body not read yet (a message deleted before it is read fails its
        read with L{mailgate.errors.TemporaryFailure}), listed C{page}
        messages at a time as it is iterated (the messages delivered
        after the call are not in it; C{page} is
        L{mailgate.store.sql.EXPORT_PAGE} when not given): C{async for} on
        any store, C{for} on a synchronous one, as
        L{IMailStore.listMessages} (a threaded store's listing of more
        messages iterated with C{for} raises L{RuntimeError} past its
        first page).  Fails with L{mailgate.errors.NoSuchUser}.
        """

    def restoreDeleted(address, uidls=None, since=None, asNew=False, progress=None):
        """
        Bring kept deleted messages back (all, or those with the unique ids
        C{uidls}; deleted at or after C{since}), under their own unique ids
        or, with C{asNew}, new ones.  All of them come back a bounded
        number at a time, C{progress(count)} called after each commit with
        how many are back so far.  A transaction that brings the user's
        use to a warning percentage of the quota warns as a delivery does.

        @return: a L{Deferred} of C{(restored, missing)}: C{restored} a
            list of C{(old unique id, unique id now)}, the latter a
            L{mailgate.records.WarnedOfQuota} for the last message of a
            transaction that warned; C{missing} the unique ids asked for
            that are not kept.
        """

    def listSessions(address=None, kicked=False):
        """
        The POP3 sessions in progress on every live node (of C{address}
        only, if given; with C{kicked}, only those L{kickSessions} marked
        and not yet ended): a L{Deferred} list of
        L{mailgate.records.SessionInfo}.
        """

    def listNodes():
        """
        The live nodes sharing the database (those whose heartbeat is
        recent) and the settings each announces: a L{Deferred} list of
        L{mailgate.records.NodeInfo}.
        """

    def kickSessions(address):
        """
        Ask the nodes serving C{address}'s POP3 sessions to end them
        without applying their deletions: a L{Deferred} of how many.
        """

    def importMessages(address, items, source=None):
        """
        Add messages from another server keeping their unique ids, in one
        transaction; ids already present with the same content are
        skipped, ids present with other content (or given twice) are
        conflicts and not added.

        @param items: C{(uidl, message, arrived)} per message.
        @param source: the identity of the source (old server, maildir)
            they come from, remembered with their ids.
        @return: a L{Deferred} of C{(imported, skipped, conflicts)}: unique
            ids, unique ids, and C{(uidl, reason)}.
        """

    def claimImported(address, source, uidls):
        """
        Record C{source} as where the unique ids of C{uidls} came from
        (ids it lists, with the content the maildrop holds or held under
        them), for those imported before mailgate recorded sources: a
        L{Deferred} of how many; fails with L{mailgate.errors.NoSuchUser}.
        """

    def forgetImported(address, uidls=None):
        """
        Forget the unique ids imported for a user (those of C{uidls}, or
        all), so that a later import brings such a message in again where
        the maildrop no longer holds it: a L{Deferred} of how many; fails
        with L{mailgate.errors.NoSuchUser}.
        """

    def existingUidls(address, uidls):
        """
        Which of C{uidls} a user's maildrop holds (or keeps deleted): a
        L{Deferred} dict, unique id to the set of sizes held under it.
        """

    def removeImportedGone(address, source, listed, soleSource=False):
        """
        Take out of a user's maildrop the messages an import from
        C{source} brought in whose unique id the source no longer lists
        (C{listed}: all it lists now), kept for recovery; refused while the
        user is in a POP3 session.  What other sources brought in stays;
        so do messages imported before mailgate recorded sources, unless
        C{soleSource}, as is what another source brought in where it
        also brought in some of what this one lists (this source by
        another name, perhaps).

        @return: a L{Deferred} of C{(unique ids taken out, how many
            imported without a recorded source were left, (source, how
            many left) of each other source some of whose ids this one
            lists)}; fails with L{mailgate.errors.NoSuchUser} or
            L{MaildropInUse}.
        """

    def disableUser(address, reason=None):
        """
        Disable a user (Dovecot's C{nologin}): from now on every POP3
        login of theirs, on every node and by every mechanism, fails with
        L{mailgate.errors.UserDisabled} once the credentials are verified
        (L{IMailStore.openMaildrop}), telling C{reason}; mail is still
        delivered.  A session in progress is not ended here
        (L{kickSessions} does).  Disabled already: the reason replaced.

        @return: a L{Deferred} of whether the user was disabled already;
            fails with L{mailgate.errors.NoSuchUser}.
        """

    def enableUser(address):
        """
        Let a user disabled by L{disableUser} log in again, with the
        password they had.

        @return: a L{Deferred} of whether the user was disabled; fails
            with L{mailgate.errors.NoSuchUser}.
        """

    def setAllowedNetworks(address, networks):
        """
        Restrict where a user may log in from (Dovecot's C{allow_nets}):
        from now on, on every node and by every mechanism, a POP3 login
        from a client on none of C{networks} fails with
        L{mailgate.errors.NetworkRefused} once the credentials are
        verified (L{IMailStore.openMaildrop}).  A session in progress goes
        on; mail is still delivered.

        @param networks: the canonical text
            L{mailgate.networks.parseAllowedNetworks} makes (comma-separated
            CIDR networks and C{local}), or C{None} to lift the
            restriction.
        @return: a L{Deferred} of the networks the user had (C{None}:
            anywhere); fails with L{mailgate.errors.NoSuchUser}.
        """

    def addAlias(alias, address):
        """
        Make C{alias} another address of the user C{address} (Postfix's
        C{virtual_alias_maps}, for mail received directly): SMTP, LMTP and
        C{mailgate deliver} take mail to it as mail to the user, quota and
        all, from the next RCPT on, on every node; POP3 logins do not take
        it.  An alias names one user; an address is a user's or an alias,
        never both (L{IMailStore.addUser} and L{renameUser} refuse an
        alias with L{mailgate.errors.AliasExists}).  The user's rename
        takes the aliases along; the user's deletion removes them.
        C{alias} C{@domain} (L{mailgate.address.CATCH_ALL}) is the domain's
        catch-all, asked last, for an address no user or alias has.

        @return: a L{Deferred} of C{True}, or C{False} if it was that
            user's alias already; fails with L{mailgate.errors.NoSuchUser},
            L{mailgate.errors.UserExists} (C{alias} is a user's address) or
            L{mailgate.errors.AliasExists} (another user's alias).
        """

    def addAliases(pairs):
        """
        Add aliases in one transaction, each C{(alias, address)} as
        L{addAlias} adds it (C{mailgate alias import} adds a few hundred
        a commit: L{mailgate.store.sql.IMPORT_BATCH}).

        @return: a L{Deferred} list, in order, of C{True} (added), C{False}
            (that user's alias already) or the L{mailgate.errors.NoSuchUser},
            L{mailgate.errors.UserExists} or L{mailgate.errors.AliasExists}
            that refused it (the others are added all the same), once
            durably committed.
        """

    def removeAlias(alias):
        """
        Remove an alias: mail to it is refused from the next RCPT on.

        @return: a L{Deferred} of the address of the user it was an alias
            of (C{None}: a user removed by hand, not by
            L{IMailStore.deleteUser}); fails with
            L{mailgate.errors.NoSuchAlias}.
        """

    def listAliases(address=None):
        """
        The aliases of the user C{address}, or all of them.

        @return: a L{Deferred} list of L{mailgate.records.AliasRecord} in
            the code point order of the aliases; fails with
            L{mailgate.errors.NoSuchUser} if C{address} is no user's.
        """

    def addMasterUser(name, passwordHash, networks=None):
        """
        Add a master user: a name (normalised, L{mailgate.address.masterName})
        and a password hash that log in to any user's maildrop, as
        Dovecot's master users do, where the server allows master logins.
        Master users are not users: they have no maildrop, and their names
        are apart from the users' addresses.

        @param networks: the networks it may log in from (see
            L{setMasterUserNetworks}), or C{None}: anywhere.

        @return: a L{Deferred} of C{None} once durably committed; fails with
            L{mailgate.errors.MasterUserExists}.
        """

    def setMasterUserPassword(name, passwordHash):
        """
        Replace a master user's password hash: the old password fails at
        once on every node.

        @return: a L{Deferred} of C{None}; fails with
            L{mailgate.errors.NoSuchMasterUser}.
        """

    def setMasterUserNetworks(name, networks):
        """
        Restrict the networks a master user may log in from (C{None}:
        anywhere), as Dovecot's C{allow_nets} of a master passdb: from the
        next login on, on every node, a client elsewhere is refused as a
        wrong password.

        @param networks: their canonical text
            (L{mailgate.networks.parseAllowedNetworks}), or C{None}.
        @return: a L{Deferred} of the networks it had; fails with
            L{mailgate.errors.NoSuchMasterUser}.
        """

    def removeMasterUser(name):
        """
        Remove a master user: its logins fail from then on, on every node
        (sessions it opened go on to their end).

        @return: a L{Deferred} of C{None}; fails with
            L{mailgate.errors.NoSuchMasterUser}.
        """

    def listMasterUsers():
        """
        Every master user.

        @return: a L{Deferred} list of L{mailgate.records.MasterUserRecord}
            in the code point order of their names.
        """

    def renameUser(old, new):
        """
        Give a user a new address, keeping the maildrop and the aliases;
        refused while the user is in a POP3 session.  One of the user's
        own aliases may be the new address (the alias goes).

        @return: a L{Deferred}; fails with L{mailgate.errors.NoSuchUser},
            L{mailgate.errors.UserExists}, L{mailgate.errors.AliasExists}
            (another user's alias) or L{MaildropInUse}.
        """

    def expungeMessages(address, olderThanDays=None, progress=None):
        """
        Remove a user's messages for good (all, or those older than
        C{olderThanDays}), those deleted by POP3 and kept for recovery
        included; refused while the user is in a POP3 session.  Committed
        a bounded number at a time, C{progress(removed, kept)} called
        after each commit with the running totals.

        @return: a L{Deferred} of C{(messages removed from the maildrop,
            kept deleted messages removed)}.
        """

    def recountUsage(address):
        """
        Count a user's storage use again from the messages in the
        maildrop, and keep that (as Dovecot's C{doveadm quota recalc}):
        for use kept wrong, by nodes of a mailgate from before quotas
        delivering after the upgrade, or by hand.

        @return: a L{Deferred} of C{(before, after)}, each C{(messages,
            octets)}; fails with L{mailgate.errors.NoSuchUser}.
        """


class IEngine(Interface):
    """
    A database dialect: how mailgate connects to one kind of database,
    runs transactions on it and reads its errors.  L{mailgate.store.sqlite.
    SQLiteEngine} and L{mailgate.store.postgres.PostgresEngine} provide it;
    L{mailgate.store.database} and L{mailgate.store.schema} use nothing
    else of them.

    An interface rather than a base class (the way Synapse's
    C{BaseDatabaseEngine} is one): the two engines share no code, every
    member is a dialect decision, so a base class would hold only abstract
    methods; as an interface the contract sits with the others, and
    C{verifyObject} checks each engine against it.  What only one engine
    has (SQLite's C{path}, PostgreSQL's lock connections and lock
    namespace) stays its own.

    Methods taking a connection or cursor run on a worker thread.
    """

    name = Attribute("A short name for the dialect (C{sqlite}, C{postgres}): thread names, logs.")
    readers = Attribute(
        "How many reader connections (and threads) a L{mailgate.store.database."
        "Database} opens; 0 runs reads on the writer's connection."
    )
    types = Attribute(
        "The dialect's SQL fragments by placeholder name, filled into the SQL "
        "that is written once for both engines (the schema's column types, "
        "the snapshot's packing of uids and sizes and its list of unique ids)."
    )
    ephemeral = Attribute(
        "Whether each connection is a database of its own that ends with it "
        "(SQLite's C{:memory:}): its schema is made as it connects, not upgraded "
        "ahead."
    )
    damageRepairedWhileServing = Attribute(
        "Whether damage to the database (L{damage}) is repaired while the "
        "servers using it go on (PostgreSQL's C{REINDEX}, a table restored, "
        "in the database every node shares), rather than with the server "
        "stopped (an SQLite file restored): the health check then does not "
        "keep failing once it was met, which no repair could clear but a "
        "restart of every node."
    )

    def connect():
        """
        A new DB-API connection, set up by L{onConnect}.

        @raise mailgate.errors.TemporaryFailure: the server cannot be reached
            now (it may come back).
        @raise mailgate.errors.ConfigurationError: the database cannot be
            used as configured.
        """

    def onConnect(conn):
        """
        Per-connection settings (timeouts, durability, keepalives).
        """

    def begin(conn, write):
        """
        Start a transaction on C{conn}, a read or a write one, and return the
        cursor to run it with.  Cursors take C{?} placeholders, and name
        their engine (C{cursor.engine}): what a function written once for
        both dialects asks of the one it runs on (L{dropBodyReferences}).
        """

    def commit(conn):
        """
        Commit the transaction L{begin} started.
        """

    def rollback(conn):
        """
        Roll the transaction back; harmless when none is open.
        """

    def pipeline(conn):
        """
        A context manager inside which statements whose answers are not
        needed yet may be sent without waiting for them (PostgreSQL's
        pipeline mode; nothing for an in-process database).
        """

    def lockSchema(cursor):
        """
        Serialise schema upgrades started at the same time (several nodes),
        and bound how long the migration's statements wait for a table's
        lock where a waiting one holds up everyone else's (PostgreSQL).
        """

    def tableNames(cursor):
        """
        The names of the tables of the database (PostgreSQL: of the schema
        mailgate's tables go in, the search path's first), whoever's they
        are.
        """

    def isLockTimeout(exc):
        """
        Whether C{exc} is a migration's statement giving up waiting for a
        table's lock (see L{lockSchema}): the upgrade tries again.
        """

    def missingPrivileges(cursor, tables):
        """
        What the connection's database role may not do to mailgate's
        tables, where the database grants privileges per table
        (PostgreSQL): C{(table, privileges, schema, role)} for each of
        C{tables} (a mapping of table name to the privileges mailgate
        needs on it, such as C{("SELECT", "INSERT")}) lacking some, or an
        empty list.  SQLite grants nothing per table: always empty.
        """

    def lockDeliveries(cursor, pairs):
        """
        Make this write transaction wait, before it looks up whether a
        user already has a message (the duplicate check), for any other
        transaction delivering the same message to the same user to
        commit or roll back, and hold it off in turn until this one ends.
        Without it, two nodes handed the same retry at the same moment
        both look before either has committed, find nothing, and both
        store it.  Nothing to do where one transaction writes at a time
        (SQLite).

        @param pairs: the C{(user id, delivery key)} pairs about to be
            looked up in C{recent_deliveries}, in any order.
        """

    def lockMailboxes(cursor, userIds):
        """
        Lock the C{mailboxes} rows of C{userIds} for this write
        transaction, in the order of their ids, before it runs the writes
        of its batch (see L{mailgate.store.database.updatesMailboxes}):
        two transactions that each update several of the same rows then
        never hold one the other waits for while waiting for one the other
        holds.  Nothing to do where one transaction writes at a time
        (SQLite), nor for fewer than two rows.
        """

    def dropBodyReferences(cursor, owner, count, bodyIds):
        """
        Take C{count} references from each of C{owner}'s C{bodyIds}
        (sorted, up to 500: L{mailgate.store.rows.releaseBodies}) in this
        write transaction, in one statement, and return C{(body id,
        references left)} for each found.  Where transactions write side
        by side (PostgreSQL), the statement locks the rows in the order
        of their ids: a plain UPDATE locks them in its plan's order (a
        small table's sequential scan: the table's), so that two
        transactions releasing some of the same shared bodies in runs cut
        differently each held one the other waited for.
        """

    def administrativeRead(cursor, timeout):
        """
        Make the read transaction L{begin} just started refuse writes, and
        let each of its statements take C{timeout} seconds (C{None}: as
        long as it takes) rather than the bound a node's statements have:
        an administrator's command reading the whole database (C{mailgate
        db check}), which a role that may only read runs too.
        """

    def isStatementTimeout(exc):
        """
        Whether the driver error C{exc} is a statement ended by the time
        bound L{administrativeRead} gave it (C{False} where the engine
        bounds no statement's time): a check that needs longer, not a
        database unavailable.
        """

    def resetIdentity(cursor, table, column, past=0):
        """
        After rows were inserted with explicit ids, make C{table}'s generated
        C{column} continue after the largest, and after C{past} (an id
        other tables still hold: mail of a user removed by hand, which a
        new user given that id would read).
        """

    def isTransient(exc):
        """
        Whether the driver error C{exc} may heal (server down, lock timeout,
        disk full): reported as L{mailgate.errors.TemporaryFailure}.
        """

    def isStorageFull(exc):
        """
        Whether the driver error C{exc}, a transient one, says the database
        has no room left to write (a full disk, a full tablespace):
        reported as L{mailgate.errors.StorageFull}.
        """

    def damage(exc):
        """
        What the driver error C{exc} says of a damaged database, in one
        line naming it and what to do (reported as
        L{mailgate.errors.DatabaseDamaged}), or C{None} if it says no
        such thing.
        """

    def isRetryable(exc):
        """
        Whether C{exc} failed a transaction before it changed anything and
        it may simply be run again (a deadlock, a serialisation failure).
        """

    def isDisconnect(exc):
        """
        Whether C{exc} means the connection itself is lost (rather than one
        statement failed).
        """

    def isBroken(conn):
        """
        Whether C{conn} can no longer be used and must be replaced.
        """

    def isUniqueViolation(exc):
        """
        Whether C{exc} is a unique constraint violation.
        """

    def withoutRowValues(exc):
        """
        The driver error C{exc} without the values of a row it may quote
        (PostgreSQL's C{DETAIL: Failing row contains (...)}: a password
        hash, a message's octets), which would reach a log with it:
        C{exc} itself, its message changed where it quoted one.
        """

    def serverClock(cursor):
        """
        The database server's clock, in seconds since the epoch (a
        L{float}), or C{None} where it is no clock apart from the nodes'
        own (embedded SQLite: one server on one machine).  Nodes sharing
        the database tell by it whether their clocks agree.
        """

    def urlProblem():
        """
        What in the database URL the database's client would refuse only as
        it connects, in the words of a server it cannot reach (PostgreSQL:
        a port past 65535, a mistyped C{sslmode}), or C{None}: checked
        without connecting, so that C{mailgate config --check} refuses what
        a start would refuse.
        """

    def claimServer():
        """
        Claim the database for this server process where the engine allows
        one server per database (embedded SQLite); raise
        L{mailgate.errors.ConfigurationError} if another has it.
        """

    def releaseServer():
        """
        Give back what L{claimServer} took.
        """

    def refuseReadOnly():
        """
        Raise L{mailgate.errors.ConfigurationError} if this process may
        read the database but not write it, where opening it does not
        fail then (an SQLite file the user may only read opens read-only,
        and every write failed as if for a moment), naming why.
        """

    def makeLocks(database):
        """
        The L{IMaildropLocks} for a store on C{database} (an L{IDatabase}):
        driven by the database's C{reactor}, or inline when it has none.
        """

    def makeMessageReads(database):
        """
        The L{IMessageReads} for a store on C{database} (an L{IDatabase}):
        how its POP3 sessions read messages.
        """


class IDatabase(Interface):
    """
    SQL interactions run for the store: a function of a cursor, run in one
    transaction.  L{mailgate.store.database.Database} runs them on worker
    threads; L{mailgate.store.database.SynchronousDatabase} inline.
    """

    engine = Attribute("The L{IEngine}.")
    reactor = Attribute(
        "The reactor results are delivered on, or C{None} when interactions "
        "run inline and every L{Deferred} has fired on return."
    )
    writeFailure = Attribute(
        "Why the latest write transaction failed, or C{None} once one has "
        "committed since (or none failed): the health check's view of writes."
    )
    writeFailureKind = Attribute(
        "What kind of failure L{writeFailure} is, without its text "
        "(L{mailgate.errors.errorKind}), or C{None}: what the health check "
        "answers with."
    )
    damage = Attribute(
        "The L{mailgate.errors.DatabaseDamaged} the running server first "
        "met, or C{None}: the health check fails with it until a restart."
    )

    def runInteraction(function, *args, **kwargs):
        """
        Run C{function(cursor, *args, **kwargs)} as one read transaction: a
        L{Deferred} of its result.
        """

    def runWrite(function, *args, **kwargs):
        """
        Run a write transaction; the L{Deferred} fires once it is durably
        committed.  It fails with L{mailgate.errors.CommitUncertain} when
        the connection was lost while the commit was on its way (the
        change may have taken effect), with another exception when nothing
        changed.  C{function} is a function of a cursor, or an
        L{IBatchableWrite}, which the database may run together with other
        calls of it and in a pipeline.
        """

    def close():
        """
        Close the connections: a L{Deferred} that fires when done.
        """


class IBatchableWrite(Interface):
    """
    A write that the group-commit writer may batch: consecutive calls of
    it waiting for the same commit are made as one call, and it may run in
    the engine's pipeline.  Plain functions run one by one, outside the
    pipeline.
    """

    pipelined = Attribute(
        "Whether it may run in the engine's pipeline: it waits for the answers "
        "it needs itself (fetching them), so a failure is noticed in time."
    )

    def __call__(cursor, *args, **kwargs):
        """
        Run one call.
        """

    def together(cursor, calls):
        """
        Run several calls as one.

        @param calls: a list of C{(args, kwargs)}, one per call.
        @return: their results, in order.
        @raise Exception: if one of them fails (the writer then runs each
            alone, so that only that one fails).
        """


class IConnectionPolicy(Interface):
    """
    Who may connect and how hard they may try: connection limits, the
    authentication penalty and bans (see L{mailgate.policy}).

    Every protocol session consults it through the session core, so POP3,
    SMTP and LMTP are limited alike.  Addresses are Twisted address objects
    (C{IPv4Address}, C{IPv6Address}, C{UNIXAddress}): the client's real
    address, read after a PROXY header where the listener has one.  The
    methods called per connection or per command are synchronous and never
    wait for the database: shared state (bans, failure counts) is kept in
    memory and refreshed from the store in the background.
    """

    def admit(protocol, address):
        """
        A new connection: admit it, or say why not.

        @param protocol: C{"pop3"}, C{"smtp"} or C{"lmtp"}.
        @return: C{None} to admit (then L{connectionClosing} and
            L{connectionClosed} are each called exactly once, in this order,
            when it ends), or a short reason for the refusal, one of
            C{"too many connections"} and C{"banned"}.
        """

    def connectionClosing(protocol, address):
        """
        An admitted connection is going: its session asked to close it (or
        it was lost).  It is told at once, where L{connectionClosed} comes
        only once the transport has let the connection go, a reactor turn
        or more later: from now on it does not count towards the stress
        (L{underStress}), so that the idle sessions closed for it stop
        when enough have gone, not all of those whose timers come due
        before the first connection is closed.
        """

    def connectionClosed(protocol, address):
        """
        An admitted connection has ended.
        """

    def isBanned(address):
        """
        Whether C{address} is banned now (a ban can land while a session is
        open: its next login must fail).
        """

    def authenticationDelay(address, login):
        """
        Seconds to hold an authentication attempt from C{address} for
        C{login} (a user name as the client gave it, or C{None} if not known
        yet) before checking it: the penalty for recent failures.
        """

    def verificationTurn(address):
        """
        Wait for the turn of a password verification (a hash) from
        C{address}: only a few run at once per address, the others wait in
        order (nothing is refused or counted).

        @return: a L{twisted.internet.defer.Deferred} firing, once the
            verification may start, with a callable to call when it has
            ended (calling it again does nothing).  Cancelling it before it
            fires gives the place up.
        """

    def authenticationFailed(address, login, password=None):
        """
        Record a failed authentication (unknown user and wrong password
        alike).  May ban the address; never raises.

        @param password: the password tried, when the mechanism carried it
            (USER/PASS, SASL PLAIN and LOGIN), else C{None}: a failure that
            repeats one of the address's last few, name and password alike,
            is not counted again (a client with an old password guesses
            nothing).  The policy keeps only a keyed digest of it, in
            memory.
        """

    def authenticationSucceeded(address, login):
        """
        Record a successful authentication.
        """

    def underStress():
        """
        Whether the server is near its limit on connections in all (as
        Postfix's stress mode): the sessions of clients that have not
        logged in are then closed after a few seconds of idleness rather
        than minutes, so that idle connections cannot keep the rest out.
        Connections closing (L{connectionClosing}) are not counted.
        """

    def unknownRecipient(address):
        """
        Record an SMTP recipient refused as unknown (C{550 5.1.1}) to the
        client at C{address}, towards L{recipientErrorDelay} and a ban
        (address harvesting).  LMTP's are not recorded.
        """

    def recipientErrorDelay(address):
        """
        Seconds each error reply to the client at C{address} waits in its
        SMTP sessions, from their first error, for the recipients refused
        to it as unknown: 0.0 for none.
        """


class IPolicyStore(Interface):
    """
    Where the connection policy keeps what every node sharing a database
    must see: failed authentications and bans (see L{mailgate.policy}).

    The policy never waits for these calls: it records failures in the
    background and refreshes its in-memory view with L{changes} on a timer,
    so every method may take a database trip.  Times are seconds since the
    epoch from the caller's clock (nodes are expected to keep their clocks
    in sync, as NTP does).  Addresses are normalised text
    (L{mailgate.policy.addresses.addressText}); the records are those of
    L{mailgate.records}.
    """

    def recordFailure(failure, banAfter, banWindow, banTime, ban=False):
        """
        Record one failed authentication and, if it is the C{banAfter}th
        from its address within C{banWindow} seconds (counting every node's
        failures), ban the address for C{banTime} seconds.  Failures from an
        address already banned are not recorded (they cannot add anything).
        A failure recorded under C{rcpt:ADDRESS}
        (L{mailgate.records.recipientsAddress}) is an SMTP recipient refused
        as unknown, counted apart: the ban it makes is C{ADDRESS}'s, with
        reason C{unknown-rcpt} (L{mailgate.records.banTarget}), and
        L{removeBan} of C{ADDRESS} forgets those failures too.

        @param failure: an L{AuthFailure}.
        @param banAfter: failures that make a ban; 0 for no bans.
        @param ban: ban the address whatever the count (the caller's own
            view already reached the threshold).
        @return: a L{Deferred} L{FailureOutcome}.
        """

    def addBan(address, at, duration, reason="admin"):
        """
        Ban an address from C{at} for C{duration} seconds, replacing a ban
        it may have.

        @return: a L{Deferred} of the new L{BanRecord}.
        """

    def removeBan(address, at):
        """
        Lift an address's ban, and forget its failures as L{forgetFailures}
        does, so that it starts afresh on every node (also those that had
        not read the ban yet, or whose view of it had ended).  Without a
        ban, nothing changes (L{forgetFailures} is that case).

        @return: a L{Deferred} L{bool}: whether there was a ban in force or
            expired but not yet swept away.
        """

    def forgetFailures(address, at):
        """
        Forget the failed logins and unknown recipients counted for an
        address, so that it is no longer slowed.  If there were any, a
        marker is recorded among the failures, under C{forget:ADDRESS}
        (L{mailgate.records.forgettingOf}) at C{at} rounded up: every
        node's next L{changes} reads it with the failures, and the node
        forgets the address's failures up to then.

        @return: a L{Deferred} L{mailgate.records.Forgotten}: how many of
            each were forgotten (none: nothing changed).
        """

    def listBans(at):
        """
        The bans in force at C{at}: a L{Deferred} list of L{BanRecord}s,
        ordered by address.
        """

    def changes(version, failuresSince, at):
        """
        What a node needs to refresh its view, in one cheap read: the ban
        version, the bans in force at C{at} if the version differs from
        C{version}, and the failures recorded at or after C{failuresSince}.

        Every change to the set of bans (made, replaced, lifted) raises the
        version, so an unchanged version means unchanged bans (expired ones
        aside, which the node sees from their times).

        @param version: the version the node has, or C{None} for none yet.
        @return: a L{Deferred} L{PolicyChanges}.
        """

    def expire(at, failuresBefore):
        """
        Remove the failures recorded before C{failuresBefore} and the bans
        ended by C{at}, so that the tables stay bounded under attack.

        @return: a L{Deferred} of the number of rows removed.
        """
