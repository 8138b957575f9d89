# -*- test-case-name: tests.test_smtp_protocol -*-
"""
Factories for SMTP and LMTP listeners.
"""

from mailgate.hostname import machineName
from mailgate.networks import coversEveryAddress, parseNetwork, peerOnNetworks
from mailgate.session import SessionFactory
from mailgate.smtp.protocol import LMTPServer, SMTPServer

#: Every network: mail is taken without TLS from anyone (RFC 3207 section 4:
#: a publicly referenced SMTP server must not require TLS).  Networks that
#: split the space between them are every network too (L{coversEveryAddress},
#: re-exported here for L{mailgate.config}).
EVERY_NETWORK = ("0.0.0.0/0", "::/0")


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
    @param cleartextNetworks: networks (L{ipaddress} objects or CIDR text)
        from which a mail transaction is taken without TLS; from elsewhere
        MAIL, RCPT, DATA, BDAT (and VRFY, EXPN, HELP) are refused with
        C{530 5.7.0} until STARTTLS, as Postfix's
        C{smtpd_tls_security_level = encrypt}.  Unix socket peers need no
        TLS.  Anything short of every network needs C{tls}.
    @param xclientNetworks: networks (L{ipaddress} objects or CIDR text)
        of the MTAs and proxies in front (Postfix, a content filter,
        Dovecot's LMTP proxy) whose C{XFORWARD} and C{XCLIENT} name the
        client they relay: EHLO and LHLO offer both to them only.  None by
        default (C{--xclient-network}, as for POP3's C{XCLIENT}).
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
        cleartextNetworks=EVERY_NETWORK,
        xclientNetworks=(),
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
        self.takeCleartextFrom(cleartextNetworks)
        self.xclientNetworks = tuple(parseNetwork(n) for n in xclientNetworks)

    def takeCleartextFrom(self, networks):
        """
        Take mail without TLS from C{networks} (see C{cleartextNetworks}),
        in the sessions built from now on (a reload): each asks once, so
        one under way keeps what it was told.

        @raise ValueError: some networks are to start TLS first, and there
            is no TLS to offer; the networks in service stay.
        """
        networks = tuple(parseNetwork(n) for n in networks)
        requiresTLS = not coversEveryAddress(networks)
        if requiresTLS and self.tls is None:
            # Every client outside the networks refused, none able to start TLS.
            raise ValueError("TLS required from some networks, but no TLS to offer (no certificate)")
        self.cleartextNetworks, self.requiresTLS = networks, requiresTLS

    def buildProtocol(self, addr):
        protocol = self.protocol()
        protocol.factory = self
        protocol.maxMessageSize = self.maxMessageSize
        protocol.maxRecipients = self.maxRecipients
        protocol.maxLineLength = self.maxLineLength
        protocol.idleTimeout = self.idleTimeout
        protocol.minDataRate = self.minDataRate
        return protocol

    def takesCleartext(self, address):
        """
        Whether a peer may send mail without TLS: on a network of
        L{cleartextNetworks}, or a local (Unix socket) peer, whose mail
        crosses no network; an address whose form is unknown only if it
        is not IP.
        """
        if not self.requiresTLS:
            return True
        return peerOnNetworks(address, self.cleartextNetworks)

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

