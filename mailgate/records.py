"""
Plain records that cross the interfaces of L{mailgate.interfaces}: what
the stores hand out and the policy and protocols read.  They carry data,
never a connection, and depend on nothing of mailgate's, so every layer
may use them.
"""

import attr


@attr.s(frozen=True, slots=True, repr=False)
class UserRecord:
    """
    A user as the authentication layer sees it.

    This is also the avatar id the credential checkers return, so the realm
    can open the maildrop without looking the user up again.
    """

    userId = attr.ib()
    address = attr.ib()
    passwordHash = attr.ib()
    scramSha256 = attr.ib(default=None)
    apopSecret = attr.ib(default=None)
    #: the HMAC-MD5 states keyed with the password, in hex, as Dovecot's
    #: C{{CRAM-MD5}} hash holds them (the user's CRAM-MD5 secret when it
    #: came from Dovecot; see L{mailgate.auth.passwords.StoredCredentials})
    cramMD5 = attr.ib(default=None)

    def __repr__(self):
        # Never let password material reach a log line.
        return f"<UserRecord {self.userId} {self.address}>"


@attr.s(frozen=True, slots=True)
class UserSummary:
    """
    A line of C{mailgate user list}.
    """

    address = attr.ib()
    messages = attr.ib()
    octets = attr.ib()
    apop = attr.ib()
    #: the user's own limits: C{None} for the server's default, C{-1} for
    #: none (for C{expireDays}: never)
    quotaOctets = attr.ib(default=None)
    quotaMessages = attr.ib(default=None)
    expireDays = attr.ib(default=None)
    #: whether the password hash is still one imported from another server
    #: (the user has not logged in with it since)
    passwordImported = attr.ib(default=False)
    #: whether the user keeps the HMAC-MD5 states of a C{{CRAM-MD5}} hash
    #: imported from Dovecot, for CRAM-MD5 (as users with APOP can)
    cramMD5 = attr.ib(default=False)
    #: the start of the user's last POP3 session, seconds since the epoch,
    #: or C{None} (none yet)
    lastLogin = attr.ib(default=None)
    #: when an administrator disabled the user (C{mailgate user disable}),
    #: seconds since the epoch, or C{None}: the user may log in
    disabledAt = attr.ib(default=None)
    #: the reason given then, or C{None}
    disabledReason = attr.ib(default=None)
    #: the networks the user may log in from (C{mailgate user networks}),
    #: comma-separated, or C{None}: anywhere
    allowedNetworks = attr.ib(default=None)


@attr.s(frozen=True, slots=True)
class AliasRecord:
    """
    An alias (L{mailgate.interfaces.ILifecycleStore.addAlias}): another
    address of a user.
    """

    alias = attr.ib()
    #: the address of the user it is an alias of; C{None} for a user
    #: removed by hand (not with C{mailgate user del}): no mail reaches it
    address = attr.ib()


@attr.s(frozen=True, slots=True, repr=False)
class MasterUserRecord:
    """
    A master user (L{mailgate.interfaces.ILifecycleStore.addMasterUser}):
    a name and password that log in to any user's maildrop, as Dovecot's
    master users do (for a helpdesk, a backup, a migration tool).  Not a
    mailbox: it has no address and receives no mail.
    """

    #: the name, normalised (L{mailgate.address.masterName})
    name = attr.ib()
    passwordHash = attr.ib()
    #: when it was added, in seconds since the epoch
    createdAt = attr.ib(default=None)
    #: the networks it may log in from, as the canonical text of
    #: L{mailgate.networks.parseAllowedNetworks}, or C{None}: anywhere
    allowedNetworks = attr.ib(default=None)

    def __repr__(self):
        # Never let password material reach a log line.
        return f"<MasterUserRecord {self.name}>"


class AlreadyDelivered(str):
    """
    The unique id a recipient's copy of a message got when it was first
    delivered, answering a delivery of the same message again (a client's
    retry, see L{mailgate.interfaces.IMessageSource.deliveryKey}): it was
    not stored twice.  A C{str}, so that what counts unique ids as
    delivered copies answers the retry as delivered.
    """

    __slots__ = ()


class WarnedOfQuota(str):
    """
    The unique id a recipient's copy of a message got, where its delivery
    brought the user's use to a warning percentage of the quota and a
    warning was put into the maildrop after it: L{crossing} says which
    (a L{mailgate.store.limits.QuotaCrossing}), for the log.  A C{str},
    so that it answers the delivery as any unique id does.
    """

    def __new__(cls, uniqueId, crossing):
        self = super().__new__(cls, uniqueId)
        self.crossing = crossing
        return self


@attr.s(frozen=True, slots=True)
class MessageInfo:
    """
    A line of C{mailgate mailbox list}: a message as POP3 will number it.
    """

    number = attr.ib()
    size = attr.ib()
    uniqueId = attr.ib()
    arrived = attr.ib()  # seconds since the epoch


@attr.s(frozen=True, slots=True)
class ExportedMessage:
    """
    A message of C{mailgate mailbox export}: what POP3 serves for it, and
    its octets to read (an L{mailgate.interfaces.IMessageBody}).
    """

    number = attr.ib()
    size = attr.ib()
    uniqueId = attr.ib()
    arrived = attr.ib()  # seconds since the epoch
    body = attr.ib(repr=False)


@attr.s(frozen=True, slots=True)
class QuotaStatus:
    """
    A user's storage use and the limits that apply to it now (the user's
    own, or the server's defaults), in octets and messages; C{None}: no
    limit.

    @ivar ownOctets: the user's own storage quota as kept (C{None}: the
        server's default, -1: none), which C{quotaOctets} alone cannot
        tell apart from a default of no limit.
    @ivar ownMessages: the same for the quota in messages.
    """

    userId = attr.ib()
    usedOctets = attr.ib()
    usedMessages = attr.ib()
    quotaOctets = attr.ib()
    quotaMessages = attr.ib()
    ownOctets = attr.ib(default=None)
    ownMessages = attr.ib(default=None)

    def fits(self, octets, messages=1):
        """
        Whether C{messages} more messages of C{octets} in all stay within
        the limits.
        """
        if self.quotaOctets is not None and self.usedOctets + octets > self.quotaOctets:
            return False
        if self.quotaMessages is not None and self.usedMessages + messages > self.quotaMessages:
            return False
        return True


class ExpiryPass(tuple):
    """
    What one pass of the retention task did
    (L{mailgate.interfaces.ILifecycleStore.expireMessages}): the pair
    C{(messages removed, maildrops skipped because busy)}, and
    L{examined}, how many maildrops it worked on, those in which it found
    nothing to remove included; L{removedFrom}, C{(address, messages
    removed, the retention in days gone by)} for each maildrop it removed
    messages from, for the log.

    A maildrop is a candidate by the oldest arrival kept for it, a lower
    bound that a POP3 deletion leaves behind; a pass that finds nothing
    older than the retention there makes it exact, so the next pass goes
    on to other maildrops.  A pass that removed nothing but examined some
    is therefore no sign that the task is done.

    L{failure}: why the pass ended before its last maildrop (a write that
    failed: the database away), or C{None}; what it removed until then
    was committed, and is told all the same.
    """

    def __new__(cls, removed, busy, examined, removedFrom=(), failure=None):
        self = super().__new__(cls, (removed, busy))
        self.examined = examined
        self.removedFrom = list(removedFrom)
        self.failure = failure
        return self


@attr.s(frozen=True, slots=True)
class DeletedMessage:
    """
    A line of C{mailgate mailbox deleted}: a message a POP3 session deleted,
    kept for recovery.
    """

    number = attr.ib()
    size = attr.ib()
    uniqueId = attr.ib()
    deletedAt = attr.ib()  # seconds since the epoch
    deletedBy = attr.ib()  # the client's address, "host:port", or None
    arrived = attr.ib()
    # The master user whose session deleted it (a helpdesk's, a backup
    # tool's login to the user's maildrop), or None: the user's own
    # session, an import, or a deletion from before mailgate kept it.
    deletedByMaster = attr.ib(default=None)


@attr.s(frozen=True, slots=True)
class NodeInfo:
    """
    A line of C{mailgate nodes}: a live node and the settings its
    heartbeat announces (L{mailgate.store.registry.nodeSettings}: names
    to values, -1 for none; C{None} for a node of a version that announces
    none).
    """

    name = attr.ib()
    started = attr.ib()  # seconds since the epoch
    seen = attr.ib()  # its last heartbeat, seconds since the epoch
    settings = attr.ib()


@attr.s(frozen=True, slots=True)
class SessionInfo:
    """
    A line of C{mailgate who}: a POP3 session in progress.
    """

    address = attr.ib()
    node = attr.ib()
    peer = attr.ib()
    since = attr.ib()  # seconds since the epoch
    # Its node has gone, and the maildrop's lock with it, where the locks
    # tell (PostgreSQL): the registry still shows it until the node's
    # heartbeat is old, but it serves nothing.
    gone = attr.ib(default=False)
    # The master user who logged in to the user's maildrop, or None for
    # the user's own login (or a session of a node of a version before).
    master = attr.ib(default=None)


@attr.s(frozen=True, slots=True)
class AuthFailure:
    """
    One failed authentication, as every node sharing the store sees it.

    @ivar failureId: a random id made by the node that saw it, unique
        across nodes (so a node reading failures back can tell which it
        already knows).
    @ivar address: the client's address, normalised (see
        L{mailgate.policy.addresses.addressText}).
    @ivar login: the login name tried, normalised, or C{None}.
    @ivar at: when, in seconds since the epoch.
    """

    failureId = attr.ib()
    address = attr.ib()
    login = attr.ib()
    at = attr.ib()


# Why an address is banned (L{BanRecord.reason}).
REASON_FAILURES = "auth-failures"
REASON_ADMIN = "admin"
REASON_RECIPIENTS = "unknown-rcpt"
# Not a ban: the marker an earlier mailgate's C{ban del} left in the bans
# table when it forgot the failures of an address that had none (a ban
# made after it replaced it, and the nodes that had not read it yet never
# forgot).  Ended as it was written, so nothing enforces or lists it; it
# is kept out of every listing and expired (mailgate.store.policy).  The
# nodes now learn of a forgetting from FORGOTTEN_PREFIX.
REASON_FORGOTTEN = "forgotten"

#: The prefix of the address an L{AuthFailure} is recorded under when it
#: is an SMTP recipient refused as unknown (C{550 5.1.1}) rather than a
#: failed login: C{rcpt:192.0.2.7} counts those of C{192.0.2.7}, apart
#: from its failed logins (a mail server with stale addresses on a list
#: must not come closer to a login ban), in the same table, read back and
#: expired by the same statements.  A node of an earlier mailgate reads
#: them as the failures of an address no client has, which nothing
#: counts.
RECIPIENTS_PREFIX = "rcpt:"


#: The prefix of the address of the marker C{ban del} records among the
#: failures when it forgets an address's failures (lifting its ban or
#: not): C{forget:192.0.2.7} at time T tells every node, at its next
#: read of the failures, to forget those of C{192.0.2.7} (and
#: C{rcpt:192.0.2.7}) up to T, as the store did.  Among the failures, it
#: reaches every node whatever happens to the address's ban meanwhile, and
#: is expired with them; a node of an earlier mailgate reads it as the
#: failure of an address no client has, which nothing counts.
FORGOTTEN_PREFIX = "forget:"


def forgettingOf(address):
    """
    The L{AuthFailure} address of the marker that forgets the failures of
    C{address} (a policy key).
    """
    return FORGOTTEN_PREFIX + address


def forgottenBy(address):
    """
    The policy key whose failures the marker recorded under C{address}
    forgets, or C{None} if C{address} is no such marker.
    """
    if address.startswith(FORGOTTEN_PREFIX):
        return address[len(FORGOTTEN_PREFIX):]
    return None


def recipientsAddress(address):
    """
    The address under which refused unknown recipients from C{address}
    (a policy key) are recorded.
    """
    return RECIPIENTS_PREFIX + address


def banTarget(address):
    """
    The address a ban made from the failures recorded under C{address}
    is for, and its reason: C{rcpt:KEY} bans C{KEY} for unknown
    recipients, any other address itself for failed logins.
    """
    if address.startswith(RECIPIENTS_PREFIX):
        return address[len(RECIPIENTS_PREFIX):], REASON_RECIPIENTS
    return address, REASON_FAILURES


@attr.s(frozen=True, slots=True)
class BanRecord:
    """
    A banned client address: a line of C{mailgate ban list}.

    @ivar reason: C{"auth-failures"} (made by a node after too many failed
        logins), C{"unknown-rcpt"} (after too many SMTP recipients refused
        as unknown) or C{"admin"} (C{mailgate ban add}).
    @ivar failures: the failed logins (or unknown recipients) within the
        window when it was made.
    @ivar created: when it was made, in seconds since the epoch.
    @ivar expires: when it ends, in seconds since the epoch.
    """

    address = attr.ib()
    reason = attr.ib()
    failures = attr.ib()
    created = attr.ib()
    expires = attr.ib()


@attr.s(frozen=True, slots=True)
class FailureOutcome:
    """
    What recording a failed authentication did.

    @ivar failures: the address's failures within the ban window, this one
        included.
    @ivar ban: the L{BanRecord} this failure made, or C{None}.
    @ivar banned: whether the address is banned now (by this failure or
        an earlier ban).
    @ivar version: the store's ban version after the write (see
        L{mailgate.interfaces.IPolicyStore.changes}).
    """

    failures = attr.ib()
    ban = attr.ib()
    banned = attr.ib()
    version = attr.ib()


@attr.s(frozen=True, slots=True)
class PolicyChanges:
    """
    What a node's refresh read from the store.

    @ivar version: the ban version read (before the bans).
    @ivar bans: every ban in force, as L{BanRecord}s, or C{None} when the
        version is the one the node already had.
    @ivar failures: the L{AuthFailure}s recorded since the time asked for,
        and the markers of failures forgotten (L{FORGOTTEN_PREFIX}).
    """

    version = attr.ib()
    bans = attr.ib()
    failures = attr.ib()


@attr.s(frozen=True, slots=True)
class Forgotten:
    """
    What L{mailgate.interfaces.IPolicyStore.forgetFailures} forgot.

    @ivar logins: the address's failed logins.
    @ivar recipients: its SMTP recipients refused as unknown.
    """

    logins = attr.ib()
    recipients = attr.ib()
