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


@attr.s(frozen=True, slots=True)
class MessageInfo:
    """
    A line of C{mailgate mailbox list}: a message as POP3 will number it.
    """

    number = attr.ib()
    size = attr.ib()
    uniqueId = attr.ib()
    arrived = attr.ib()  # seconds since the epoch
