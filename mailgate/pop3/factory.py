# -*- test-case-name: tests.test_pop3_protocol -*-
"""
The POP3 server factory: one per set of listeners, holding the portal and
the per-listener policy every session reads.
"""

import ipaddress
import socket

from twisted.internet.protocol import ServerFactory

from mailgate.policy import OpenPolicy
from mailgate.pop3.protocol import POP3Server

DEFAULT_TRUSTED_NETWORKS = ("127.0.0.0/8", "::1/128")


class APOPAdvertiser:
    """
    The default APOP policy: greetings carry an APOP timestamp only while
    at least one user has APOP enabled.  Clients that prefer APOP whenever
    a timestamp is offered (curl, Twisted's own client) then never try it
    on a server where it cannot work.

    @ivar enabled: the current answer, refreshed by L{refresh} (the service
        calls it periodically; it starts as C{True} until the first answer).
    """

    def __init__(self, store):
        self._store = store
        self.enabled = True

    def refresh(self):
        d = self._store.hasAPOPUsers()

        def got(enabled):
            self.enabled = bool(enabled)

        return d.addCallbacks(got, lambda failure: None)


class POP3Factory(ServerFactory):
    """
    @param portal: a L{Portal} whose realm provides
        L{mailgate.interfaces.IMaildrop} avatars (see
        L{mailgate.auth.realm.makePortal}).
    @param hostname: the name in the greeting and APOP timestamp.
    @param apop: offer APOP: put a timestamp in the greeting.  C{True} or
        C{False}, or an L{APOPAdvertiser} that decides from the store.
    @param idleTimeout: seconds before an idle session is logged out.
    @param authFailureDelay: seconds before a failed login is answered.
    @param reactor: the reactor (or a clock, in tests) for timers.
    @param loginDelay: the LOGIN-DELAY the realm enforces, to advertise.
    @param tls: a L{mailgate.tls.ServerTLS} to offer STLS with, or C{None}.
    @param sasl: a L{mailgate.auth.sasl.SASLServer} for AUTH, or C{None}.
    @param trustedNetworks: networks (L{ipaddress} objects or CIDR text)
        from which plaintext passwords are accepted without TLS.
    @param policy: the L{mailgate.interfaces.IConnectionPolicy} sessions
        consult (limits, penalty, bans); L{OpenPolicy} by default.
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
        tls=None,
        sasl=None,
        trustedNetworks=DEFAULT_TRUSTED_NETWORKS,
        policy=None,
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
        self.tls = tls
        self.sasl = sasl
        self.trustedNetworks = [ipaddress.ip_network(n) for n in trustedNetworks]
        self.policy = OpenPolicy() if policy is None else policy

    def buildProtocol(self, addr):
        protocol = self.protocol()
        protocol.factory = self
        protocol.idleTimeout = self.idleTimeout
        protocol.authFailureDelay = self.authFailureDelay
        return protocol

    def offersAPOP(self):
        """
        Whether greetings carry an APOP timestamp now.
        """
        apop = self.apop
        return apop.enabled if isinstance(apop, APOPAdvertiser) else bool(apop)

    def isTrusted(self, address):
        """
        Whether a peer is on a trusted network.  Local (Unix socket) peers
        are; so is an address whose form is unknown only if it is not IP.
        """
        host = getattr(address, "host", None)
        if host is None:
            return getattr(address, "type", None) != "TCP"
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return False
        if getattr(ip, "ipv4_mapped", None) is not None:
            ip = ip.ipv4_mapped
        return any(ip in network for network in self.trustedNetworks)

    def extraCapabilities(self):
        """
        CAPA lines that depend on configuration (RFC 2449 section 6).
        """
        # mailgate never deletes mail on its own: only clients do, with DELE.
        lines = ["EXPIRE NEVER"]
        if self.loginDelay:
            lines.append(f"LOGIN-DELAY {self.loginDelay}")
        return lines
