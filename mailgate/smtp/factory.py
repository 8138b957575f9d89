# -*- test-case-name: tests.test_smtp_protocol -*-
"""
Factories for SMTP and LMTP listeners.
"""

import socket

from twisted.internet.protocol import ServerFactory

from mailgate.policy import OpenPolicy
from mailgate.smtp.protocol import LMTPServer, SMTPServer


class SMTPFactory(ServerFactory):
    """
    @param delivery: the policy deciding recipients and committing mail
        (L{mailgate.smtp.delivery.LocalDelivery}).
    @param hostname: the name in the greeting and in trace headers.
    @param maxMessageSize: octets of content accepted (advertised as SIZE).
    @param maxRecipients: recipients per transaction.
    @param idleTimeout: seconds of silence before a session is closed.
    @param reactor: the reactor (or a clock, in tests) for timers.
    @param tls: a L{mailgate.tls.ServerTLS} to offer STARTTLS with.
    @param policy: the L{mailgate.interfaces.IConnectionPolicy} sessions
        consult (limits, penalty, bans); L{OpenPolicy} by default.
    """

    protocol = SMTPServer
    noisy = False

    def __init__(
        self,
        delivery,
        hostname=None,
        maxMessageSize=SMTPServer.maxMessageSize,
        maxRecipients=SMTPServer.maxRecipients,
        idleTimeout=SMTPServer.idleTimeout,
        reactor=None,
        tls=None,
        policy=None,
    ):
        if reactor is None:
            from twisted.internet import reactor
        self.delivery = delivery
        self.hostname = hostname or socket.getfqdn()
        self.maxMessageSize = maxMessageSize
        self.maxRecipients = maxRecipients
        self.idleTimeout = idleTimeout
        self.reactor = reactor
        self.tls = tls
        self.policy = OpenPolicy() if policy is None else policy

    def buildProtocol(self, addr):
        protocol = self.protocol()
        protocol.factory = self
        protocol.maxMessageSize = self.maxMessageSize
        protocol.maxRecipients = self.maxRecipients
        protocol.idleTimeout = self.idleTimeout
        return protocol

    def extraExtensions(self, protocol):
        """
        Extensions that depend on configuration or on the session (TLS,
        AUTH); none yet.
        """
        return []


class LMTPFactory(SMTPFactory):
    """
    The same, speaking LMTP: what Postfix's C{lmtp:} transport talks to.
    """

    protocol = LMTPServer
