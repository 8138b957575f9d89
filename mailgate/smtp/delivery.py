# -*- test-case-name: tests.test_smtp_protocol -*-
"""
Local delivery policy: which recipients mailgate accepts, and committing
accepted mail to the store.

The protocol asks; this module answers.  mailgate is never an open relay:
a recipient must be a user of the store, in an accepted domain.
"""

from twisted.internet import defer

from mailgate.address import normalizeAddress
from mailgate.errors import InvalidAddress
from mailgate.smtp.envelope import SMTPReply


class LocalDelivery:
    """
    @param store: the L{mailgate.interfaces.IMailStore}.
    @param domains: the domains to accept mail for; C{None} accepts the
        domains of existing users.
    """

    def __init__(self, store, domains=None):
        self._store = store
        self.domains = None if domains is None else frozenset(d.lower() for d in domains)

    def _acceptsDomain(self, domain):
        if self.domains is not None:
            return defer.succeed(domain in self.domains)
        return self._store.hasDomain(domain)

    @defer.inlineCallbacks
    def checkRecipient(self, mailbox):
        """
        Accept or refuse a RCPT TO mailbox.

        @return: a L{Deferred} firing with the normalised address; fails
            with L{SMTPReply} for a refusal, or with the store's
            L{mailgate.errors.TemporaryFailure}.
        """
        domain = mailbox.rpartition("@")[2].lower()
        if not (yield self._acceptsDomain(domain)):
            raise SMTPReply(550, "5.7.1", f"<{mailbox}>: relay access denied")
        try:
            address = normalizeAddress(mailbox)
        except InvalidAddress:
            raise SMTPReply(550, "5.1.1", f"<{mailbox}>: no such user here") from None
        user = yield self._store.findUser(address)
        if user is None:
            raise SMTPReply(550, "5.1.1", f"<{mailbox}>: no such user here")
        return address

    def deliver(self, envelope, source, partial=True):
        """
        Commit a message for the envelope's recipients; see
        L{mailgate.interfaces.IMailStore.deliver}.

        @param partial: deliver to the recipients that still exist even if
            one has vanished since RCPT (LMTP reports each recipient); with
            C{False}, a vanished recipient fails the whole delivery, so an
            SMTP client retries and nobody gets two copies.
        """
        return self._store.deliver(envelope.recipients, source, partial=partial)
