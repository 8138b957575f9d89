"""
Plain records the store hands out.  They carry data, never a connection.
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
class QuotaStatus:
    """
    A user's storage use and the limits that apply to it now (the user's
    own, or the server's defaults), in octets and messages; C{None}: no
    limit.
    """

    userId = attr.ib()
    usedOctets = attr.ib()
    usedMessages = attr.ib()
    quotaOctets = attr.ib()
    quotaMessages = attr.ib()

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


@attr.s(frozen=True, slots=True)
class SessionInfo:
    """
    A line of C{mailgate who}: a POP3 session in progress.
    """

    address = attr.ib()
    node = attr.ib()
    peer = attr.ib()
    since = attr.ib()  # seconds since the epoch
