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
delivery transaction checks every recipient again), and the recipient is
looked up again there: its address may be another user's alias now.

Quotas are checked twice.  At RCPT, with the size the client declared
(C{MAIL FROM ... SIZE=}) when it did, and the trace fields the message
will be stored with (the protocol adds them): a recipient already over quota, or
whom the message would put over it, is refused there, before any data is
sent (recipients with a quota are therefore never answered from memory).
At the end of DATA, the store checks again with the real size, inside
the delivery's transaction, which is exact however many deliveries to
the same user run at once on however many nodes.  Either refusal is RFC
3463's "mailbox full": C{452 4.2.2} (temporary: the MTA retries after the
user made room), or C{552 5.2.2} when configured permanent; a message
larger than the whole quota, which no room made will ever fit, is
C{552 5.2.3} either way, by its declared size at RCPT and by its real
size at the end of DATA (a client that declared none).  An SMTP
message refused at the end of DATA for some of its recipients is refused
temporarily whatever the setting, so the others never see it bounced.
"""

import time

from twisted.internet import defer
from twisted.logger import Logger

from mailgate.address import CATCH_ALL, asciiDomain, normalizeAddress, userOfADetail, withoutDetail
from mailgate.errors import InvalidAddress, NoSuchUser, QuotaExceeded, TemporaryFailure
from mailgate.interfaces import ILifecycleStore
from mailgate.smtp.envelope import SMTPReply


class MailboxFull(SMTPReply):
    """
    The refusal of a recipient over quota (RFC 3463 "mailbox full"): a
    client's fair request, not a bad command, and, at the end of DATA, a
    delivery that ended as L{outcome}.
    """

    @property
    def outcome(self):
        """
        How the metrics count the refused delivery: C{"tempfail"} for
        C{452 4.2.2}, C{"rejected"} for C{552 5.2.2}.
        """
        return "tempfail" if self.code < 500 else "rejected"


_log = Logger()


#: the local part (and the whole of RFC 5321's domainless form) of the
#: address every SMTP server accepts mail for
POSTMASTER = "postmaster"


class LocalDelivery:
    """
    @param store: the L{mailgate.interfaces.IMailStore}.
    @param domains: the domains to accept mail for; C{None} accepts the
        domains of existing users.
    @param clock: a monotonic clock, for the recipient cache.
    @param quotaExceeded: C{"temporary"} (the default) to refuse a
        recipient over quota with C{452 4.2.2}, C{"permanent"} for
        C{552 5.2.2}.
    @param postmaster: the address (a user's) that mail to postmaster
        goes to: C{<postmaster>} and C{postmaster@} an accepted domain
        without a user of that name (RFC 5321 section 4.5.1); C{None}
        refuses them.
    @param recipientDelimiter: the characters that separate a user from
        a detail in a recipient's local part (Postfix's and Dovecot's
        C{recipient_delimiter}): with C{"+"}, C{bob+lists@example.org} is
        bob@example.org's mail when there is no user of that whole name.
        C{None}: addresses are taken whole.
    @param deliveredTo: C{--delivered-to}: C{"final"} gives each
        recipient's copy its own C{Delivered-To:} field (see
        L{mailgate.smtp.envelope.copyPrefixes}), C{"none"} none.
    @cvar knownLifetime: seconds a recipient (or domain) found in the store
        is accepted without asking it again.
    @cvar maxKnown: the bound on remembered recipients.
    """

    knownLifetime = 30.0
    maxKnown = 100000

    def __init__(self, store, domains=None, clock=time.monotonic, quotaExceeded="temporary", postmaster=None,
                 recipientDelimiter=None, deliveredTo="none"):
        if quotaExceeded not in ("temporary", "permanent"):
            raise ValueError(f"quotaExceeded must be 'temporary' or 'permanent', not {quotaExceeded!r}")
        self._store = store
        self.domains = None if domains is None else frozenset(d.lower() for d in domains)
        self._clock = clock
        self._known = {}
        # Which forgetting the lookups under way began after (see
        # forgetRecipients): one that began before remembers nothing.
        self._generation = 0
        self.quotaExceeded = quotaExceeded
        self.postmaster = postmaster
        self.recipientDelimiter = recipientDelimiter or ""
        self.deliveredTo = deliveredTo

    def mailboxFull(self, mailbox):
        """
        The reply refusing C{mailbox} for its quota.
        """
        if self.quotaExceeded == "permanent":
            return MailboxFull(552, "5.2.2", f"<{mailbox}>: mailbox full")
        return MailboxFull(452, "4.2.2", f"<{mailbox}>: mailbox full")

    def tooLargeForQuota(self, mailbox, quotaOctets):
        """
        The reply refusing C{mailbox} a message larger than its whole quota
        (by the size the client declared): permanent whatever
        L{quotaExceeded} says, as no room the user makes will ever fit it,
        and a temporary refusal would have the MTA retry for days before it
        bounced.  RFC 3463's "message length exceeds administrative limit".
        """
        return MailboxFull(
            552, "5.2.3", f"<{mailbox}>: message larger than the mailbox's whole quota ({quotaOctets} octets)"
        )

    def _quotaRefusals(self, addresses, size, names):
        """
        The replies refusing C{addresses}, which the store found over quota
        for a message of C{size} octets (as it counted them): for one
        whose whole quota is smaller than that, L{tooLargeForQuota}, as at
        RCPT for a declared size (a temporary refusal had the MTA retry
        for days what no room made would ever fit); else L{mailboxFull}.

        @param names: address to the recipients as the client named them
            (L{_namesOf}): each reply names those, as RCPT's refusal does.
        @return: a L{Deferred} of address to reply.
        """
        if not ILifecycleStore.providedBy(self._store):
            return defer.succeed({a: self.mailboxFull(names.get(a, a)) for a in addresses})

        def replyFor(status, address):
            named = names.get(address, address)
            if status is not None and status.quotaOctets is not None and size > status.quotaOctets:
                return self.tooLargeForQuota(named, status.quotaOctets)
            return self.mailboxFull(named)

        def notAsked(failure, address):
            # The reply it had before it was asked: the message is
            # committed (or refused) already, whatever this lookup does.
            if not failure.check(TemporaryFailure):
                _log.failure("quota lookup of a full mailbox failed", failure, event="smtp.quota_lookup_failed")
            return self.mailboxFull(names.get(address, address))

        def ask(address):
            d = self._store.quotaOf(address)
            d.addCallback(replyFor, address)
            d.addErrback(notAsked, address)
            return d

        d = defer.gatherResults([ask(a) for a in addresses])
        return d.addCallback(lambda replies: dict(zip(addresses, replies)))

    def forgetRecipients(self):
        """
        Forget the recipients remembered (see L{_remember}): the server's
        defaults changed (a reload), and a user remembered without a quota
        may have one now, to be checked at the next RCPT.  A lookup
        under way then remembers nothing when it ends: it was asked under
        the old defaults.
        """
        self._known = {}
        self._generation += 1

    def _remembered(self, key):
        expires = self._known.get(key)
        if expires is None:
            return False
        if expires < self._clock():
            del self._known[key]
            return False
        return True

    def _remember(self, key, generation):
        """
        Remember C{key} for L{knownLifetime}, if it was looked up since the
        last L{forgetRecipients} (C{generation}, the one its lookup began
        in).
        """
        if generation != self._generation:
            return
        if len(self._known) >= self.maxKnown:
            now = self._clock()
            self._known = {k: e for k, e in self._known.items() if e >= now}
            if len(self._known) >= self.maxKnown:
                self._known.clear()
        self._known[key] = self._clock() + self.knownLifetime

    def _toPostmaster(self, mailbox, size):
        """
        Mail to postmaster with no user of that name: to L{postmaster}, as
        that user's mail (quota and all).
        """
        if self.postmaster is None:
            return defer.fail(
                SMTPReply(550, "5.1.1", f"<{mailbox}>: no postmaster mailbox here (the server has no --postmaster)")
            )
        if self._remembered(self.postmaster):
            return defer.succeed(self.postmaster)
        return self._checkUser(mailbox, self.postmaster, size)

    def _acceptsDomain(self, domain):
        if self.domains is not None:
            return defer.succeed(domain in self.domains)
        key = "@" + domain
        if self._remembered(key):
            return defer.succeed(True)
        generation = self._generation

        def found(exists):
            if exists:
                self._remember(key, generation)
            return exists

        return self._store.hasDomain(domain).addCallback(found)

    def checkRecipient(self, mailbox, size=None):
        """
        Accept or refuse a RCPT TO mailbox.

        @param size: the size the message will be stored with, if the
            client declared one with C{SIZE=} (that, and the trace fields
            put before it): a recipient whose quota it would exceed is
            refused.
        @return: a L{Deferred} firing with the normalised address; fails
            with L{SMTPReply} for a refusal, or with the store's
            L{mailgate.errors.TemporaryFailure}.
        """
        local, _, domain = mailbox.rpartition("@")
        domain = domain.lower()
        if mailbox.lower() == POSTMASTER:
            # RFC 5321's <postmaster>, of no domain: the server's own.
            return self._toPostmaster(mailbox, size)
        # A domain in Unicode (SMTPUTF8) is the domain its A-labels name:
        # refused as another domain, the mail of an SMTPUTF8 sender who
        # wrote it so bounced ("relay access denied").
        domain = asciiDomain(domain) or domain
        try:
            address = normalizeAddress(f"{local}@{domain}")
        except InvalidAddress:
            # No address as a whole (bob+café@, "bob+x y"@): the user it
            # names with a detail, if it does, as Dovecot and Postfix
            # deliver it.
            address = userOfADetail(f"{local}@{domain}", self.recipientDelimiter)
        if address is not None:
            # The domain of the address it names (alice@example.org. is
            # alice's, as her login and Postfix take it): checked as sent,
            # the trailing dot's was another domain, relay access denied,
            # unless the address was remembered, which skips this check.
            domain = address.rpartition("@")[2]
        if address is not None and self._remembered(address):
            return defer.succeed(address)

        def domainChecked(accepted):
            if not accepted:
                raise SMTPReply(550, "5.7.1", f"<{mailbox}>: relay access denied")
            # The catch-all answers each look-up of an alias brought along
            # (one statement for both), for _toCatchAll.
            looked = {}
            if address is None:
                d = defer.fail(SMTPReply(550, "5.1.1", f"<{mailbox}>: no such user here"))
            else:
                d = self._checkUser(
                    mailbox, address, size, postmasterIfMissing=local.lower() == POSTMASTER, looked=looked
                )
            return d.addErrback(self._toCatchAll, mailbox, domain, size, looked)

        return self._acceptsDomain(domain).addCallback(domainChecked)

    def _toCatchAll(self, failure, mailbox, domain, size, looked):
        """
        A recipient of C{domain} refused as no one's (C{5.1.1}: no user,
        alias or detail of either has it, nor C{--postmaster} for
        postmaster@) is the mail of the domain's catch-all alias
        (C{@domain}, as Postfix's C{virtual_alias_maps} has it), if there
        is one: looked up last, so that every address someone has stays
        theirs.  Any other refusal (a full mailbox) stands.

        @param looked: catch-all address to its target (or C{None}), as
            the look-ups of aliases found them: not asked again.
        """
        failure.trap(SMTPReply)
        if failure.value.enhanced != "5.1.1":
            return failure

        def found(target):
            if target is None:
                return failure
            return self._checkUser(mailbox, target, size, aliased=True)

        catchAll = CATCH_ALL + domain
        if catchAll in looked:
            return found(looked[catchAll])
        return self._store.findAlias(catchAll).addCallback(found)

    def withoutDetail(self, address):
        """
        The address of the user that C{address} names with a detail, by
        L{recipientDelimiter} (see L{mailgate.address.withoutDetail}), or
        C{None}.
        """
        return withoutDetail(address, self.recipientDelimiter)

    def _checkUser(self, mailbox, address, size, postmasterIfMissing=False, aliased=False, looked=None):
        """
        Accept C{address} if it is a user's, or an alias of a user's
        (L{mailgate.interfaces.ILifecycleStore.addAlias}), with room for
        C{size} octets.

        @param aliased: C{address} is the user an alias named: no alias or
            detail of it is looked for (a user removed meanwhile is no
            such user).
        @param looked: where the domain's catch-all found with an alias is
            kept (see L{_toCatchAll}), or C{None}.
        """
        # Quotas are checked here where the store keeps them; any store
        # still checks what it keeps when the message is committed.
        quotas = ILifecycleStore.providedBy(self._store)
        generation = self._generation

        def userChecked(status):
            if status is None:
                if aliased:
                    raise SMTPReply(550, "5.1.1", f"<{mailbox}>: no such user here")
                # No user of the whole name: an alias of that name, as
                # Postfix looks the whole address up first, and in the same
                # statement the domain's catch-all, asked last of all
                # (_toCatchAll): an unknown recipient costs one look-up of
                # aliases, not two.
                catchAll = CATCH_ALL + address.rpartition("@")[2]
                return self._store.findAliases([address, catchAll]).addCallback(aliasesFound, catchAll)
            if not quotas or (status.quotaOctets is None and status.quotaMessages is None):
                self._remember(address, generation)
            elif not status.fits(max(size or 0, 1)):
                if size is not None and status.quotaOctets is not None and size > status.quotaOctets:
                    raise self.tooLargeForQuota(mailbox, status.quotaOctets)
                raise self.mailboxFull(mailbox)
            return address

        def aliasesFound(found, catchAll):
            if looked is not None:
                looked[catchAll] = found.get(catchAll)
            return aliasChecked(found.get(address))

        def aliasChecked(target):
            if target is not None:
                # The user's mail, quota and all.
                return self._checkUser(mailbox, target, size, aliased=True)
            # No user or alias of the whole name: the user (or alias) it
            # names with a detail, if it does (--postmaster's is taken
            # whole).
            user = self.withoutDetail(address) if address != self.postmaster else None
            if user is not None:
                return self._checkUser(
                    mailbox, user, size, postmasterIfMissing=user.rpartition("@")[0] == POSTMASTER, looked=looked
                )
            if postmasterIfMissing:
                return self._toPostmaster(mailbox, size)
            raise SMTPReply(550, "5.1.1", f"<{mailbox}>: no such user here")

        if not quotas:
            return self._store.findUser(address).addCallback(userChecked)
        return self._store.quotaOf(address).addCallback(userChecked)

    def deliver(self, envelope, source, partial=True):
        """
        Commit a message for the envelope's recipients; see
        L{mailgate.interfaces.IMailStore.deliver}.

        @param partial: deliver to the recipients that still exist even if
            one has vanished since RCPT (LMTP reports each recipient); with
            C{False}, a vanished recipient fails the whole delivery, so an
            SMTP client retries and nobody gets two copies.
        @return: a L{Deferred} of address to unique id, L{NoSuchUser}, or
            the L{MailboxFull} refusing a recipient over quota (with
            C{partial}); without C{partial}, a recipient over quota fails
            the whole delivery with a L{MailboxFull} (a temporary one when
            other recipients had room).
        """
        d = self._store.deliver(envelope.recipients, source, partial=partial)
        if partial:
            d.addCallback(self._redeliverVanished, envelope, source)
        else:
            d.addErrback(self._redeliverAllVanished, envelope, source)

        def delivered(results):
            full = []
            for address, result in results.items():
                if isinstance(result, NoSuchUser):
                    self._known.pop(address, None)
                elif isinstance(result, QuotaExceeded):
                    full.append(address)
            if not full:
                return results
            # A recipient's own reply (LMTP answers per recipient).
            d = self._quotaRefusals(full, source.size, _namesOf(envelope))
            d.addCallback(lambda replies: results.update(replies) or results)
            return d

        def failed(failure):
            if failure.check(NoSuchUser):
                # Someone vanished since RCPT: ask the store again next time.
                for address in envelope.recipients:
                    self._known.pop(address, None)
            if failure.check(QuotaExceeded):
                # Nothing was stored: refuse the message with the reply
                # for a full mailbox.
                full = list(failure.value.addresses)
                names = _namesOf(envelope)
                return self._quotaRefusals(full, source.size, names).addCallback(refuse, full, names)
            return failure

        def refuse(replies, full, names):
            named = ", ".join(names.get(a, a) for a in full)
            if not set(envelope.recipients) - set(full) and all(r.enhanced == "5.2.3" for r in replies.values()):
                # Too large for every recipient's whole quota: refused
                # for good, as each alone would be.
                if len(full) == 1:
                    raise replies[full[0]]
                raise MailboxFull(552, "5.2.3", f"<{named}>: message larger than each mailbox's whole quota")
            refusal = self.mailboxFull(named)
            if refusal.code >= 500 and set(envelope.recipients) - set(full):
                # One reply answers every recipient (SMTP): a permanent
                # one would bounce the message for those with room too.
                # A temporary one makes the MTA try again, and then the
                # full recipient is refused at RCPT (by the size its
                # MAIL command declares) while the others get it.
                refusal = MailboxFull(452, "4.2.2", f"<{named}>: mailbox full; try the others again")
            raise refusal

        return d.addCallbacks(delivered, failed)

    def _lookUpAgain(self, envelope, vanished):
        """
        Look the recipients of C{envelope} that were C{vanished} users'
        addresses at commit up again, as RCPT would now (none answered
        from memory), by the names the client gave them; put each one
        that now names another user's address in its place in
        C{envelope.recipients}.

        A recipient accepted as a user's address (remembered for
        L{knownLifetime}, or looked up at its RCPT) whose user has since
        been renamed or removed, the address made an alias of another
        user (C{mailgate user rename bob@ robert@}, then C{mailgate
        alias add bob@ robert@}) or falling to the domain's catch-all, is
        that user's mail now: it was refused (LMTP: C{550 5.1.1}, a bounce)
        though its next RCPT was taken.

        @return: a L{Deferred} firing with whether any recipient was put
            in another's place.
        """
        for address in vanished:
            self._known.pop(address, None)
        named = list(namedRecipients(envelope))
        places = [i for i, address in enumerate(envelope.recipients) if address in vanished]

        def refused(failure):
            # Refused now too (or the store failing): as it was.
            failure.trap(SMTPReply, TemporaryFailure)
            return None

        def again(i):
            return self.checkRecipient(named[i]).addErrback(refused)

        def found(addresses):
            moved = False
            for i, address in zip(places, addresses):
                if address is not None and address not in vanished:
                    envelope.recipients[i] = address
                    moved = True
            return moved

        return defer.gatherResults([again(i) for i in places]).addCallback(found)

    def _redeliverVanished(self, results, envelope, source):
        """
        A partial delivery's (LMTP's) recipients that vanished (see
        L{_lookUpAgain}) and now name another user: delivered that user's
        copy (the one the message gave them already, if it named them
        too), or the reply of the user's quota.
        """
        vanished = {a for a, r in results.items() if isinstance(r, NoSuchUser)}
        if not vanished:
            return results

        def moved(anyMoved):
            if not anyMoved:
                return results
            others = [a for a in dict.fromkeys(envelope.recipients) if a not in results]
            if not others:
                return results
            d = self._store.deliver(others, source, partial=True)
            d.addErrback(notStored, others)
            return d.addCallback(lambda more: results.update(more) or results)

        def notStored(failure, others):
            # The others have their copies: these are told to try again.
            if not failure.check(TemporaryFailure):
                _log.failure("delivery to a recipient looked up again failed", failure, event="smtp.redelivery_failed")
            names = _namesOf(envelope)
            text = "temporary failure storing the message; try again later"
            return {a: SMTPReply(451, "4.3.0", f"<{names.get(a, a)}> {text}") for a in others}

        return self._lookUpAgain(envelope, vanished).addCallback(moved)

    def _redeliverAllVanished(self, failure, envelope, source):
        """
        An all-or-nothing delivery (SMTP's) that failed, nothing stored,
        for recipients that vanished (see L{_lookUpAgain}): delivered
        again, once, if each of them now names another user.
        """
        failure.trap(NoSuchUser)
        vanished = set(failure.value.addresses)
        if not vanished:
            return failure

        def moved(anyMoved):
            if not anyMoved or vanished & set(envelope.recipients):
                return failure
            return self._store.deliver(envelope.recipients, source, partial=False)

        return self._lookUpAgain(envelope, vanished).addCallback(moved)


def _namesOf(envelope):
    """
    Each of C{envelope}'s recipients (a user's address) to the recipients
    as the client named them at RCPT (its forward-paths: an alias, a
    detail), those of one user joined by commas: a refusal at the end of
    DATA names what the client sent, as RCPT's does.  Naming the user's
    own address told a sender of mail to C{abuse@example.org} (in the
    bounce) whose mailbox the alias is.
    """
    names = {}
    for address, named in zip(envelope.recipients, namedRecipients(envelope)):
        names.setdefault(address, {})[named] = None
    return {address: ", ".join(named) for address, named in names.items()}


def namedRecipients(envelope):
    """
    The envelope's recipients as the client named them at RCPT (its
    forward-paths), in their order: what a reply about one names (LMTP's
    at the end of DATA too).
    """
    return envelope.forwardPaths or envelope.recipients
