# -*- test-case-name: tests.test_pop3_protocol -*-
"""
The POP3 server factory: one per set of listeners, holding the portal and
the per-listener policy every session reads.
"""

import socket

from twisted.internet.protocol import ServerFactory

from mailgate.pop3.protocol import POP3Server


class POP3Factory(ServerFactory):
    """
    @param portal: a L{Portal} whose realm provides
        L{mailgate.interfaces.IMaildrop} avatars (see
        L{mailgate.auth.realm.makePortal}).
    @param hostname: the name in the greeting and APOP timestamp.
    @param apop: offer APOP: put a timestamp in the greeting.  Switch it off
        when no user has an APOP secret, so clients never try it.
    @param idleTimeout: seconds before an idle session is logged out.
    @param authFailureDelay: seconds before a failed login is answered.
    @param reactor: the reactor (or a clock, in tests) for timers.
    @param loginDelay: the LOGIN-DELAY the realm enforces, to advertise.
    """

    protocol = POP3Server
    noisy = False

    def __init__(
        self,
        portal,
        hostname=None,
        apop=True,
        idleTimeout=POP3Server.idleTimeout,
        authFailureDelay=POP3Server.authFailureDelay,
        reactor=None,
        greeting="mailgate POP3 server ready",
        loginDelay=None,
    ):
        if reactor is None:
            from twisted.internet import reactor
        self.portal = portal
        self.hostname = hostname or socket.getfqdn()
        self.apop = apop
        self.idleTimeout = idleTimeout
        self.authFailureDelay = authFailureDelay
        self.reactor = reactor
        self.greeting = greeting
        self.loginDelay = loginDelay

    def buildProtocol(self, addr):
        protocol = self.protocol()
        protocol.factory = self
        protocol.idleTimeout = self.idleTimeout
        protocol.authFailureDelay = self.authFailureDelay
        return protocol

    def extraCapabilities(self):
        """
        CAPA lines that depend on configuration (RFC 2449 section 6).
        """
        # mailgate never deletes mail on its own: only clients do, with DELE.
        lines = ["EXPIRE NEVER"]
        if self.loginDelay:
            lines.append(f"LOGIN-DELAY {self.loginDelay}")
        return lines
