# -*- test-case-name: tests.test_smtp_protocol -*-
"""
Local delivery policy: which recipients mailgate accepts, and committing
accepted mail to the store.

The protocol asks; this module answers.  mailgate is never an open relay:
a recipient must be a user of the store, in an accepted domain.

Recipients known to exist are remembered for a short while, so a busy
intake does not query the database for every RCPT.  Only positive answers
are remembered: a user created a moment ago is never refused.  A user
deleted within that while is caught when the message is committed (the
delivery transaction checks every recipient again).
"""

import time

from twisted.internet import defer

from mailgate.address import normalizeAddress
from mailgate.errors import InvalidAddress, NoSuchUser
from mailgate.smtp.envelope import SMTPReply


class LocalDelivery:
    """
    @param store: the L{mailgate.interfaces.IMailStore}.
    @param domains: the domains to accept mail for; C{None} accepts the
        domains of existing users.
    @param clock: a monotonic clock, for the recipient cache.
    @cvar knownLifetime: seconds a recipient (or domain) found in the store
        is accepted without asking it again.
    @cvar maxKnown: the bound on remembered recipients.
    """

    knownLifetime = 30.0
    maxKnown = 100000

    def __init__(self, store, domains=None, clock=time.monotonic):
        self._store = store
        self.domains = None if domains is None else frozenset(d.lower() for d in domains)
        self._clock = clock
        self._known = {}

    def _remembered(self, key):
        expires = self._known.get(key)
        if expires is None:
            return False
        if expires < self._clock():
            del self._known[key]
            return False
        return True

    def _remember(self, key):
        if len(self._known) >= self.maxKnown:
            now = self._clock()
            self._known = {k: e for k, e in self._known.items() if e >= now}
            if len(self._known) >= self.maxKnown:
                self._known.clear()
        self._known[key] = self._clock() + self.knownLifetime

    def _acceptsDomain(self, domain):
        if self.domains is not None:
            return defer.succeed(domain in self.domains)
        key = "@" + domain
        if self._remembered(key):
            return defer.succeed(True)

        def found(exists):
            if exists:
                self._remember(key)
            return exists

        return self._store.hasDomain(domain).addCallback(found)

    def checkRecipient(self, mailbox):
        """
        Accept or refuse a RCPT TO mailbox.

        @return: a L{Deferred} firing with the normalised address; fails
            with L{SMTPReply} for a refusal, or with the store's
            L{mailgate.errors.TemporaryFailure}.
        """
        domain = mailbox.rpartition("@")[2].lower()
        try:
            address = normalizeAddress(mailbox)
        except InvalidAddress:
            address = None
        if address is not None and self._remembered(address):
            return defer.succeed(address)
        d = self._acceptsDomain(domain)

        def domainChecked(accepted):
            if not accepted:
                raise SMTPReply(550, "5.7.1", f"<{mailbox}>: relay access denied")
            if address is None:
                raise SMTPReply(550, "5.1.1", f"<{mailbox}>: no such user here")
            return self._store.findUser(address).addCallback(userChecked)

        def userChecked(user):
            if user is None:
                raise SMTPReply(550, "5.1.1", f"<{mailbox}>: no such user here")
            self._remember(address)
            return address

        return d.addCallback(domainChecked)

    def deliver(self, envelope, source, partial=True):
        """
        Commit a message for the envelope's recipients; see
        L{mailgate.interfaces.IMailStore.deliver}.

        @param partial: deliver to the recipients that still exist even if
            one has vanished since RCPT (LMTP reports each recipient); with
            C{False}, a vanished recipient fails the whole delivery, so an
            SMTP client retries and nobody gets two copies.
        """
        d = self._store.deliver(envelope.recipients, source, partial=partial)

        def delivered(results):
            for address, result in results.items():
                if isinstance(result, NoSuchUser):
                    self._known.pop(address, None)
            return results

        def failed(failure):
            if failure.check(NoSuchUser):
                # Someone vanished since RCPT: ask the store again next time.
                for address in envelope.recipients:
                    self._known.pop(address, None)
            return failure

        return d.addCallbacks(delivered, failed)
