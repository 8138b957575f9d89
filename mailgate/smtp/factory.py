# -*- test-case-name: tests.test_smtp_protocol -*-
"""
Factories for SMTP and LMTP listeners.
"""

from mailgate.hostname import machineName
from mailgate.session import SessionFactory
from mailgate.smtp.protocol import LMTPServer, SMTPServer


class SMTPFactory(SessionFactory):
    """
    @param delivery: the policy deciding recipients and committing mail
        (L{mailgate.smtp.delivery.LocalDelivery}).
    @param hostname: the name in the greeting and in trace headers.
    @param maxMessageSize: octets of content accepted (advertised as SIZE).
    @param maxRecipients: recipients per transaction.
    @param maxLineLength: octets in a line of message text beyond which a
        message is refused; C{None}: any length (L{SMTPServer.maxLineLength}).
    @param idleTimeout: seconds of silence before a session is closed.
    @param minDataRate: octets per second a message's data must average
        beyond an allowance of C{idleTimeout} (L{SMTPServer.minDataRate});
        C{0}: no limit.
    @param reactor: the reactor (or a clock, in tests) for timers; required,
        as for Twisted's endpoints.
    @param tls: a L{mailgate.tls.ServerTLS} to offer STARTTLS with.
    @param policy: the L{mailgate.interfaces.IConnectionPolicy} admitting
        connections; admits everyone if not given.
    @param metrics: the L{mailgate.metrics.Metrics} to count with.
    @param tracker: the L{mailgate.session.SessionTracker} of the server,
        for a graceful shutdown.
    @param spoolDirectory: where messages being received are spooled once
        they outgrow memory; C{None}: the system's temporary directory.
    """

    protocol = SMTPServer

    def __init__(
        self,
        delivery,
        reactor,
        hostname=None,
        maxMessageSize=SMTPServer.maxMessageSize,
        maxRecipients=SMTPServer.maxRecipients,
        maxLineLength=SMTPServer.maxLineLength,
        idleTimeout=SMTPServer.idleTimeout,
        minDataRate=SMTPServer.minDataRate,
        tls=None,
        policy=None,
        metrics=None,
        tracker=None,
        spoolDirectory=None,
    ):
        super().__init__(reactor, policy=policy, metrics=metrics, tracker=tracker)
        self.delivery = delivery
        self.spoolDirectory = spoolDirectory
        self.hostname = hostname or machineName()
        self.maxMessageSize = maxMessageSize
        self.maxRecipients = maxRecipients
        self.maxLineLength = maxLineLength
        self.idleTimeout = idleTimeout
        self.minDataRate = minDataRate
        self.tls = tls

    def buildProtocol(self, addr):
        protocol = self.protocol()
        protocol.factory = self
        protocol.maxMessageSize = self.maxMessageSize
        protocol.maxRecipients = self.maxRecipients
        protocol.maxLineLength = self.maxLineLength
        protocol.idleTimeout = self.idleTimeout
        protocol.minDataRate = self.minDataRate
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
