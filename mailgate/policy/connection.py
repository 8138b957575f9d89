# -*- test-case-name: tests.test_policy -*-
"""
L{ConnectionPolicy}: mailgate's connection policy, the parts of this
package put together behind L{mailgate.interfaces.IConnectionPolicy}.

  - L{mailgate.policy.limits}: connections in all and per client address;
  - L{mailgate.policy.penalty}: the authentication penalty, per address
    and per login name;
  - L{mailgate.policy.bans}: the bans enforced;
  - L{mailgate.policy.failures}: the recent failures they are worked out
    from;
  - L{mailgate.policy.repeats}: failures that repeat one already counted
    (the same wrong password again), not counted twice;
  - L{mailgate.policy.verifications}: password verifications in progress
    at once per address, the others waiting their turn;
  - L{mailgate.policy.refresh}: the shared store, read and written in the
    background;
  - L{mailgate.policy.addresses}: client addresses and the exempt networks.

SMTP recipients refused as unknown (address harvesting) go through the
same failures, store and bans, counted apart under C{rcpt:ADDRESS}
(L{ConnectionPolicy.unknownRecipient}, L{ConnectionPolicy.recipientErrorDelay}).

Every method the session core calls is synchronous and answers from
memory: a connection is refused, or a login delayed, without a database
trip and without hashing a password.
"""

import math
import secrets

from twisted.logger import Logger
from zope.interface import implementer

from mailgate.address import loginAddress
from mailgate.errors import InvalidAddress
from mailgate.interfaces import IConnectionPolicy
from mailgate.metrics import Metrics
from mailgate.policy.addresses import ExemptNetworks, clientIP, clientKey
from mailgate.policy.bans import BanList
from mailgate.policy.failures import FailureLog
from mailgate.policy.limits import STRESS_UNTIL, ConnectionLimits
from mailgate.policy.penalty import AuthPenalty, failuresToReach, penaltyDelay
from mailgate.policy.refresh import REFRESH_INTERVAL, StoreSync
from mailgate.policy.repeats import RepeatedCredentials
from mailgate.policy.settings import PolicySettings
from mailgate.policy.verifications import VerificationSlots
from mailgate.records import REASON_FAILURES, REASON_RECIPIENTS, AuthFailure, BanRecord, recipientsAddress
from mailgate.timers import wallClock
from mailgate.plural import noun

BANNED = "banned"
TOO_MANY = "too many connections"

MAX_LOGIN = 255

#: The longest wait of an SMTP error reply to an address that has had
#: many recipients refused as unknown (see recipientErrorDelay): the
#: authentication penalty's default maximum.
RECIPIENT_DELAY_MAX = 15.0

#: hosts whose policy key is kept (L{ConnectionPolicy._key}); all are
#: forgotten when there are more
_KEYS_KEPT = 4096


def loginKey(login, defaultRealm=None):
    """
    The form a login name is counted under: the address it logs in as
    (L{mailgate.address.loginAddress}: case, a trailing dot, a domain in
    Unicode, the default realm of a bare name), so that every spelling of
    one user's login counts against the one name; a name that is no
    address case-folded and trimmed.  At most L{MAX_LOGIN} characters;
    C{None} for none.

    Counted as sent, the spellings that log in as one user (alice@, with
    a trailing dot, the bare name under C{--auth-default-realm}, her
    domain in Unicode in any of its forms) were names of their own, each
    with its own count: guessers from many addresses, each spelling her
    name its own way, never slowed her account.
    """
    if login is None:
        return None
    if isinstance(login, bytes):
        login = login.decode("utf-8", "replace")
    login = str(login)
    try:
        return loginAddress(login, defaultRealm)
    except InvalidAddress:
        pass
    login = login.strip().lower()[:MAX_LOGIN]
    return login or None


@implementer(IConnectionPolicy)
class ConnectionPolicy:
    """
    @param store: where failures and bans are shared, an
        L{mailgate.interfaces.IPolicyStore}.
    @param reactor: the reactor (a L{twisted.internet.task.Clock} in
        tests): the time, and the refresh timer.
    @param settings: L{PolicySettings}.
    @param metrics: a L{Metrics}.
    @param refreshInterval: seconds between refreshes from the store.
    @param defaultRealm: the domain of a login name without one
        (C{--auth-default-realm}), or C{None}.

    @ivar limits: the L{ConnectionLimits}.
    @ivar bans: the L{BanList}.
    @ivar failures: the L{FailureLog}.
    @ivar penalty: the L{AuthPenalty}.
    @ivar repeats: the L{RepeatedCredentials}: failures not counted again.
    @ivar verifications: the L{VerificationSlots}: password verifications
        in progress per address.
    @ivar sync: the L{StoreSync}.
    """

    log = Logger(namespace="mailgate.policy")

    def __init__(
        self, store, reactor, settings=None, metrics=None, refreshInterval=REFRESH_INTERVAL, defaultRealm=None
    ):
        settings = PolicySettings() if settings is None else settings
        # The domain of a bare login name (--auth-default-realm): its
        # failures count against the user's address (see loginKey).
        self._defaultRealm = defaultRealm
        self.settings = settings
        self._clock = reactor
        # Times shared with the database: the wall clock's (see wallClock).
        self._wall = wallClock(reactor)
        self.exempt = ExemptNetworks(settings.exemptNetworks)
        # host to its key, or None (L{_key})
        self._keys = {}
        # An admitted connection's address to the keys it was counted
        # under (one each): uncounted under the same one when it closes,
        # though a reload changed the exempt networks meanwhile.
        self._counted = {}
        self.limits = ConnectionLimits(settings.maxConnections, settings.maxConnectionsPerAddress)
        self.failures = FailureLog(settings.banWindow)
        self.penalty = AuthPenalty(self.failures, settings.authPenaltyMax, reactor)
        self.repeats = RepeatedCredentials()
        self.verifications = VerificationSlots()
        self.bans = BanList(reactor, Metrics() if metrics is None else metrics)
        self.sync = StoreSync(
            store, reactor, settings, self.failures, self.bans, self.penalty, interval=refreshInterval
        )

    def reconfigure(self, settings):
        """
        Apply other L{PolicySettings} (a reload) to what happens from now
        on: the next connections are admitted under the new limits, the
        next failures counted over the new window and banned at the new
        threshold for the new time, the next logins delayed at most the
        new maximum, the next clients judged by the new exempt networks.
        Nothing in force is lost: the connections open stay open (and
        counted), the failures known still count, the bans in force last
        as long as they were made for.
        """
        stressed = self.limits.stressed
        self.settings = settings
        self.exempt = ExemptNetworks(settings.exemptNetworks)
        self._keys = {}
        self.limits.resize(settings.maxConnections, settings.maxConnectionsPerAddress)
        self.failures.window = settings.banWindow
        self.penalty.maximum = settings.authPenaltyMax
        self.sync.reconfigure(settings)
        if self.limits.stressed and not stressed:
            self._noteStress()
        self._noteStressOver(stressed)

    def start(self):
        """
        Start refreshing from the store (at once, then on the timer).
        """
        self.sync.start()

    def stop(self):
        self.sync.stop()

    def whenLoaded(self):
        """
        A L{Deferred} that fires once the first refresh from the store has
        ended (see L{StoreSync.whenLoaded}): until then, the bans in the
        store are not known here.
        """
        return self.sync.whenLoaded()

    def _key(self, address):
        """
        The key of C{address} if the policy applies to it per address:
        C{None} for exempt networks and peers without an IP address.

        Asked five or six times in every login (the ban, the penalty, the
        turn, the success, twice for a ban made meanwhile): kept per host,
        as the exempt networks change only at L{reconfigure} (which forgets
        them), rather than worked out through the address's parse and the exempt
        networks' cache each time.
        """
        host = getattr(address, "host", None)
        keys = self._keys
        try:
            return keys[host]
        except (KeyError, TypeError):
            pass
        key = None if clientIP(address) in self.exempt else clientKey(address)
        if isinstance(host, str):
            if len(keys) >= _KEYS_KEPT:
                keys.clear()
            keys[host] = key
        return key

    # IConnectionPolicy

    def admit(self, protocol, address):
        # No key for an exempt client: neither banned nor limited per
        # address, nor counted against the rest of its IPv6 /64 (a webmail's
        # connections had its neighbours refused at their first).
        key = self._key(address)
        if key is not None and self.bans.isBanned(key):
            return BANNED
        stressed = self.limits.stressed
        if not self.limits.open(key):
            return TOO_MANY
        self._counted.setdefault(address, []).append(key)
        if self.limits.stressed and not stressed:
            self._noteStress()
        return None

    def _noteStress(self):
        """
        Log the start of the stress.
        """
        self.log.warn(
            "{total} " + noun(self.limits.staying, "connection") + " of at most {limit}: "
            "clients that have not logged in are "
            "closed after a few seconds of idleness until fewer than {until} remain (stress)",
            total=self.limits.staying,
            limit=self.limits.maxConnections,
            # Rounded up: the stress ends below the share, at 11 of 16
            # (11.2), which "fewer than 11" did not say.
            until=math.ceil(self.limits.maxConnections * STRESS_UNTIL),
            event="limits.stress",
        )

    def connectionClosing(self, protocol, address):
        stressed = self.limits.stressed
        self.limits.leave()
        self._noteStressOver(stressed)

    def connectionClosed(self, protocol, address):
        stressed = self.limits.stressed
        keys = self._counted.get(address)
        if keys:
            key = keys.pop()
            if not keys:
                del self._counted[address]
        else:
            key = self._key(address)
        self.limits.close(key)
        self._noteStressOver(stressed)

    def _noteStressOver(self, stressed):
        """
        Log the end of the stress if it was on (C{stressed}) and is no more.
        The connections counted are those staying: the sessions closing
        are gone for the stress.
        """
        if stressed and not self.limits.stressed:
            self.log.info(
                "{total} " + noun(self.limits.staying, "connection") + " of at most {limit}: "
                "idle timeouts as usual again",
                total=self.limits.staying,
                limit=self.limits.maxConnections,
                event="limits.stress_over",
            )

    def underStress(self):
        return self.limits.stressed

    def isBanned(self, address):
        key = self._key(address)
        return key is not None and self.bans.isBanned(key)

    def authenticationDelay(self, address, login):
        key = self._key(address)
        if key is None:
            return 0.0
        return self.penalty.delay(key, loginKey(login, self._defaultRealm))

    def verificationTurn(self, address):
        # Exempt as the penalty exempts: loopback's webmail is not held.
        return self.verifications.turn(self._key(address))

    def authenticationFailed(self, address, login, password=None):
        try:
            self._failed(self._key(address), loginKey(login, self._defaultRealm), password)
        except Exception:
            self.log.failure("connection policy: recording a failed login", event="policy.record_failed")

    def _failed(self, key, login, password):
        if key is None or self.bans.isBanned(key):
            # Exempt, local, or already banned: nothing to count.
            return
        if self.repeats.repeated(key, login, password):
            # The same wrong password again (a client with an old one):
            # it guesses nothing, and is not counted again.
            self.log.debug(
                "connection policy: a repeated failed login from {address} not counted",
                address=key,
                event="policy.repeat_not_counted",
            )
            return
        settings = self.settings
        now = self._wall()
        failure = AuthFailure(secrets.token_hex(8), key, login, now)
        self.failures.add(failure)
        count = self.failures.fromAddress(key, now - settings.banWindow)
        ban = bool(settings.banAfter) and count >= settings.banAfter
        if ban:
            self.bans.made(BanRecord(key, REASON_FAILURES, count, now, now + settings.banTime))
        d = self.sync.record(failure, ban)
        d.addErrback(
            lambda f: self.log.failure("connection policy: recording a failed login", f, event="policy.record_failed")
        )

    def authenticationSucceeded(self, address, login):
        key = self._key(address)
        if key is not None:
            self.penalty.succeeded(key)

    # -- address harvesting over SMTP -------------------------------------

    def unknownRecipient(self, address):
        """
        SMTP refused a recipient from C{address} as unknown (C{550 5.1.1}).

        Counted per address (an IPv6 client's /64; never an exempt network
        or a Unix socket peer) through the store, across sessions and
        nodes, under C{rcpt:ADDRESS} (L{mailgate.records.RECIPIENTS_PREFIX}):
        apart from its failed logins, which it must not bring closer to a
        login ban.  The C{unknownRecipientSlowAfter}th within the ban window
        makes the address's SMTP error replies wait (L{recipientErrorDelay});
        the C{unknownRecipientBanAfter}th (if set) bans it.  Once an address
        has as many as that takes, no more are recorded: a harvester goes on
        guessing at no cost to the store.  But a ban that ended while they
        are still within the window (a C{banTime} shorter than the window)
        is made again by the next, as a login ban is by the next failed
        login: it was not, and the harvester guessed on unbanned until its
        count left the window.
        """
        try:
            self._unknownRecipient(self._key(address))
        except Exception:
            self.log.failure(
                "connection policy: recording an unknown recipient", event="policy.record_failed"
            )

    def _unknownRecipient(self, key):
        settings = self.settings
        slowAfter, banAfter = settings.unknownRecipientSlowAfter, settings.unknownRecipientBanAfter
        if key is None or not (slowAfter or banAfter) or self.bans.isBanned(key):
            return
        counted = recipientsAddress(key)
        now = self._wall()
        count = self.failures.fromAddress(counted, now - settings.banWindow)
        enough = max(banAfter, slowAfter - 1 + failuresToReach(RECIPIENT_DELAY_MAX) if slowAfter else 0)
        if count >= enough and not banAfter:
            return
        failure = AuthFailure(secrets.token_hex(8), counted, None, now)
        self.failures.add(failure)
        count += 1
        ban = bool(banAfter) and count >= banAfter
        if ban:
            self.bans.made(BanRecord(key, REASON_RECIPIENTS, count, now, now + settings.banTime))
        elif count == slowAfter:
            self.log.info(
                "connection policy: {address} had {count} unknown recipients refused within {window} s: "
                "its SMTP error replies wait from now on",
                address=key,
                count=count,
                window=settings.banWindow,
                event="policy.recipients_slowed",
            )
        d = self.sync.record(failure, ban, banAfter)
        d.addErrback(
            lambda f: self.log.failure(
                "connection policy: recording an unknown recipient", f, event="policy.record_failed"
            )
        )

    def recipientErrorDelay(self, address):
        """
        Seconds each SMTP error reply to C{address} waits, from its
        sessions' first error, for the recipients refused to it as unknown
        (every node's, within the ban window): none below
        C{unknownRecipientSlowAfter}, then 2 seconds, twice as long for
        each further one, at most L{RECIPIENT_DELAY_MAX}, as the
        authentication penalty grows.  A mail server delivering a list
        with stale addresses loses nothing by it (its 550s come later);
        a harvester's 20 guesses a session take minutes.
        """
        slowAfter = self.settings.unknownRecipientSlowAfter
        key = self._key(address)
        if key is None or not slowAfter:
            return 0.0
        count = self.failures.fromAddress(recipientsAddress(key), self._wall() - self.settings.banWindow)
        return penaltyDelay(count - slowAfter + 1, RECIPIENT_DELAY_MAX)
