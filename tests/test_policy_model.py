"""
The connection policy (mailgate/policy/) against a model of what it
promises an administrator, generated: Hypothesis runs sequences of
connections and their ends, failed logins (new passwords, the same wrong
one again, digests that reveal none, one login name spelt several ways),
successful logins, SMTP recipients refused as unknown, the admin
command's C{ban add} and C{ban del}, time passing and nodes refreshing
from the store, on two nodes sharing one store; after every step, every
node is asked what it answers for every client address and login name,
and compared with the model:

  - a connection is refused as banned, or as one too many (in all, or from
    its address; an IPv6 client counted with its /64), or admitted, and
    the node is under stress from 80 % of its limit until it falls below
    70 %;
  - an address is banned at the C{banAfter}th failure within the window
    counted by every node (its unknown recipients at their own
    threshold), on the node that made it at once, on the others at their
    next refresh, and until it ends; a ban added by the admin is enforced
    and listed likewise, and one lifted is gone everywhere at the next
    refresh, with the failures that made it: a fresh start;
  - a login waits Dovecot's doubling delay for its address's failures
    since its last success on that node, and the same for its name once
    more than two addresses failed against it, at most the maximum;
  - an SMTP error reply waits for the address's unknown recipients;
  - exempt networks are never counted, delayed, limited per address or
    banned;
  - a reload's numbers (limits, thresholds, the ban's time, the longest
    delay) apply to what happens next, and leave in force what is.

The store is each of L{MemoryPolicyStore} and the SQL one on a SQLite file
and on PostgreSQL, each node with its own connection, the admin command
with a third, as two nodes and C{mailgate ban} share a database.  The
settings are drawn for each example (bans and the recipients' thresholds
on or off, windows shorter and longer than a ban).  Each example has
addresses, login names and a clock of its own in the one database.  The
examples are derandomised, the same on every run; C{MAILGATE_MODEL_EXAMPLES}
runs more of them at random.

Found by it: C{ban del} did not reach every node.  Its record of an
address's failures forgotten was a row of the bans table, which a ban made
before the nodes read it replaced (they went on counting what the store
had forgotten); and a node forgot the failures of a lifted ban only if it
had seen the ban, so one that had not read it yet (or saw it end) banned
the address again at its next failure.  The forgetting is now a marker
among the failures (L{mailgate.records.FORGOTTEN_PREFIX}).
"""

import itertools
import os
from collections import deque

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.task import Clock

from mailgate.policy.connection import BANNED, TOO_MANY, ConnectionPolicy
from mailgate.policy.memory import MemoryPolicyStore
from mailgate.policy.settings import PolicySettings
from mailgate.store import openSynchronousStore
from mailgate.store.policy import SQLPolicyStore
from mailgate.testing import resultOf

from test_pop3_model import MODEL as PROTOCOL_MODEL

# The protocol models' settings, with more examples than their 60: a step
# here is a few calls in memory (about 60 ms an example on PostgreSQL),
# and 60 missed a client whose old password is recognised only one
# failure back.
MODEL = settings(
    PROTOCOL_MODEL, max_examples=int(os.environ.get("MAILGATE_MODEL_EXAMPLES", "200")), stateful_step_count=40
)

START = 1_790_000_000
EXEMPT_NETWORK = "198.51.100.0/24"
NODES = 2
# Failed logins an address remembers, to recognise the same wrong
# password again (Dovecot's ten).
REMEMBERED = 10
# The longest wait of an SMTP error reply for unknown recipients.
RECIPIENT_DELAY_MAX = 15
# Different addresses failing against one name before the name is slowed.
NAME_ADDRESSES = 3
# Seconds before its previous read that a node's read of the failures
# begins (for clocks out of step).
OVERLAP = 12

_examples = itertools.count(1)

#: The settings an example starts with, and a reload may change (all but
#: the window, whose change a node applies as its failures are read and
#: pruned, on its own timer).
SETTINGS = st.fixed_dictionaries(
    {
        "banAfter": st.sampled_from([0, 3, 5]),
        "banTime": st.sampled_from([10, 60]),
        "authPenaltyMax": st.sampled_from([0, 5, 16]),
        "maxConnections": st.sampled_from([0, 3, 6]),
        "maxConnectionsPerAddress": st.sampled_from([0, 2]),
        "unknownRecipientSlowAfter": st.sampled_from([0, 2]),
        "unknownRecipientBanAfter": st.sampled_from([0, 3, 8]),
    }
)


def penalty(failures, maximum):
    """
    Dovecot's authentication penalty: 2 seconds after the first failure,
    twice as long after each further one, at most C{maximum} (0: none).
    """
    if failures <= 0 or maximum <= 0:
        return 0.0
    return float(min(2 * 2 ** (failures - 1), maximum))


def failuresFor(maximum):
    """
    How many failures make L{penalty} reach C{maximum}.
    """
    failures = 1
    while penalty(failures, maximum) < maximum:
        failures += 1
    return failures


class Failure:
    """
    One failure the model knows: counted under C{counted} (an address's
    key, or C{rcpt:} and the key for an unknown recipient), against the
    login name C{login} (its canonical form; C{None} for none), at C{at}.
    Known by identity, as the policy knows a failure by its id.
    """

    def __init__(self, counted, login, at):
        self.counted = counted
        self.login = login
        self.at = at


def recipients(key):
    return "rcpt:" + key


class StoreModel:
    """
    What the shared store holds: the failures counted, the bans (key to
    their end), and the addresses whose failures the admin forgot without
    a ban.
    """

    def __init__(self):
        self.failures = []
        self.bans = {}

    def count(self, counted, at, window):
        return sum(1 for f in self.failures if f.counted == counted and f.at > at - window)

    def forget(self, key):
        self.failures = [f for f in self.failures if f.counted not in (key, recipients(key))]


class NodeModel:
    """
    What one node knows and enforces.
    """

    def __init__(self):
        self.known = set()
        # Key to the time of its last successful login here.
        self.succeeded = {}
        # Key to its last failures' (login, password) here.
        self.recent = {}
        # The failed logins tried here: (address, login, password) indexes.
        self.tried = []
        # The store's bans in force at the last read (key to end), and
        # the bans made here since (enforced at once).
        self.read = {}
        self.made = {}
        # The store's bans changed since this node last read them.
        self.behind = True
        # When its last read began (None: it has not read yet).
        self.lastRead = None
        # What ban del forgot since this node's last read: (key, up to
        # when).
        self.toForget = []
        # The connections open: (address, the key it was counted under).
        self.open = []
        self.stressed = False

    def enforced(self, now):
        bans = {k: end for k, end in self.read.items() if end > now}
        for key, end in self.made.items():
            if end > max(now, bans.get(key, 0)):
                bans[key] = end
        return bans

    def banned(self, key, now):
        return key is not None and self.enforced(now).get(key, 0) > now

    def forget(self, key, upTo=None):
        self.known = {
            f for f in self.known if f.counted not in (key, recipients(key)) or (upTo is not None and f.at > upTo)
        }

    def count(self, counted, now, window, after=None):
        after = now - window if after is None else max(after, now - window)
        return sum(1 for f in self.known if f.counted == counted and f.at > after)


class PolicyModel(RuleBasedStateMachine):
    """
    Two nodes' L{ConnectionPolicy} on one store, against L{NodeModel}s and
    a L{StoreModel}.

    @param stores: a callable giving a new policy store on the shared
        database, each with a connection of its own.
    """

    def __init__(self, stores):
        super().__init__()
        self.stores = stores
        n = next(_examples)
        self.clock = Clock()
        # Far enough from the others' (an example lasts less than an hour).
        self.clock.advance(START + n * 10_000)
        self.store = StoreModel()
        self.models = [NodeModel() for _ in range(NODES)]
        # Addresses of this example's own: the keys in the shared database
        # are no other example's.
        a, b = n % 250, n // 250
        self.addresses = [
            IPv4Address("TCP", f"10.{a}.{b}.1", 50001),
            IPv4Address("TCP", f"10.{a}.{b}.2", 50002),
            # Two clients in one IPv6 /64: one key.
            IPv6Address("TCP", f"2001:db8:{n:x}:1::10", 50003),
            IPv6Address("TCP", f"2001:db8:{n:x}:1::20", 50004),
            IPv4Address("TCP", "198.51.100.7", 50005),
        ]
        self.keys = [f"10.{a}.{b}.1", f"10.{a}.{b}.2", f"2001:db8:{n:x}:1::/64", f"2001:db8:{n:x}:1::/64", None]
        # Login names as clients send them, each with the name the model
        # counts it under: one user's spellings are one name.
        self.logins = [
            (f"alice{n}@example.org", "alice"),
            (f"Alice{n}@EXAMPLE.org.", "alice"),
            (f"bob{n}@example.org", "bob"),
            (f"carol{n}@example.org", "carol"),
            (f"dave{n}@example.org", "dave"),
            (f"Zed{n}", "zed"),
            (None, None),
        ]
        self.nodes = None

    @initialize(banWindow=st.sampled_from([20, 90]), numbers=SETTINGS)
    def start(self, banWindow, numbers):
        self.settings = PolicySettings(banWindow=banWindow, exemptNetworks=[EXEMPT_NETWORK], **numbers)
        self.admin = self.stores()
        self.nodes = [ConnectionPolicy(self.stores(), self.clock, self.settings) for _ in range(NODES)]
        for node in range(NODES):
            self.nodes[node].start()
            self._read(node)

    def teardown(self):
        for node in self.nodes or ():
            node.stop()

    @property
    def now(self):
        return self.clock.seconds()

    # -- the model's store --------------------------------------------------

    def _record(self, model, failure, banAfter, ban):
        """
        A node (C{model}) has the store record a failure (and the ban it
        made, if C{ban}): the store counts every node's failures, and a ban
        it makes holds on the node at once.
        """
        settings = self.settings
        key = failure.counted.removeprefix("rcpt:")
        if self.store.bans.get(key, 0) > failure.at:
            # Banned already: nothing more is counted.
            return
        self.store.failures.append(failure)
        count = self.store.count(failure.counted, failure.at, settings.banWindow)
        if ban or (banAfter and count >= banAfter):
            end = failure.at + settings.banTime
            self._storeBan(key, end)
            if key not in model.made and not model.banned(key, self.now):
                model.made[key] = end

    def _storeBan(self, key, end):
        self.store.bans[key] = end
        for model in self.models:
            model.behind = True

    def _read(self, node):
        """
        What a node's refresh does: read the store's failures, and its
        bans if they changed; a ban gone from the store before its end is
        lifted, and the failures of its address forgotten.
        """
        model, now = self.models[node], self.now
        # The failures since the last read began, and the 12 seconds
        # before it (for clocks out of step; refresh.OVERLAP); at the first
        # read, those of the window.  A failure this node forgot (a ban
        # lifted, ban del in the second it came) and the store keeps is
        # read again only within that overlap.
        since = now - self.settings.banWindow if model.lastRead is None else model.lastRead - OVERLAP
        model.lastRead = now
        model.known.update(f for f in self.store.failures if f.at >= since and f.at > now - self.settings.banWindow)
        for key, upTo in model.toForget:
            model.forget(key, upTo)
        model.toForget = []
        if model.behind:
            before = model.enforced(now)
            model.read = {k: end for k, end in self.store.bans.items() if end > now}
            model.made = {}
            model.behind = False
            for key in before:
                if key not in model.enforced(now):
                    model.forget(key)

    # -- connections ----------------------------------------------------------

    @rule(node=st.integers(0, NODES - 1), which=st.integers(0, 4))
    def connect(self, node, which):
        address, key = self.addresses[which], self.keys[which]
        model, settings = self.models[node], self.settings
        if model.banned(key, self.now):
            expected = BANNED
        elif settings.maxConnections and len(model.open) >= settings.maxConnections:
            expected = TOO_MANY
        elif (
            key is not None
            and settings.maxConnectionsPerAddress
            and [k for _, k in model.open].count(key) >= settings.maxConnectionsPerAddress
        ):
            expected = TOO_MANY
        else:
            expected = None
            model.open.append((address, key))
            if settings.maxConnections and len(model.open) >= settings.maxConnections * 0.8:
                model.stressed = True
        assert self.nodes[node].admit("pop3", address) == expected

    @precondition(lambda self: any(m.open for m in self.models))
    @rule(data=st.data())
    def disconnect(self, data):
        node = data.draw(st.sampled_from([i for i, m in enumerate(self.models) if m.open]))
        model = self.models[node]
        address, _ = model.open.pop(data.draw(st.integers(0, len(model.open) - 1)))
        if len(model.open) < self.settings.maxConnections * 0.7:
            model.stressed = False
        self.nodes[node].connectionClosing("pop3", address)
        self.nodes[node].connectionClosed("pop3", address)

    # -- logins -----------------------------------------------------------------

    @rule(
        node=st.integers(0, NODES - 1),
        which=st.integers(0, 4),
        login=st.integers(0, 6),
        password=st.sampled_from(["guess-1", "guess-2", "guess-3", None]),
    )
    def loginFails(self, node, which, login, password):
        sent, name = self.logins[login]
        key, model, settings, now = self.keys[which], self.models[node], self.settings, self.now
        self.nodes[node].authenticationFailed(self.addresses[which], sent, password)
        model.tried.append((which, login, password))
        if key is None or model.banned(key, now):
            return
        if password is not None:
            # A login without a name (an OAUTHBEARER token without an
            # authorisation identity) is the same by its password alone.
            recent = model.recent.setdefault(key, deque(maxlen=REMEMBERED))
            if (name or "", password) in recent:
                # The same wrong password again: it guesses nothing.
                return
            recent.append((name or "", password))
        failure = Failure(key, name, now)
        model.known.add(failure)
        ban = bool(settings.banAfter) and model.count(key, now, settings.banWindow) >= settings.banAfter
        if ban:
            model.made[key] = now + settings.banTime
        self._record(model, failure, settings.banAfter, ban)

    @precondition(lambda self: any(m.tried for m in self.models))
    @rule(data=st.data())
    def loginFailsAgain(self, data):
        """
        A failed login as one of the node's last few again: a client with
        an old password polling, or a guesser coming back to a guess.
        """
        node = data.draw(st.sampled_from([i for i, m in enumerate(self.models) if m.tried]))
        tried = self.models[node].tried
        self.loginFails(node, *data.draw(st.sampled_from(tried[-2 * REMEMBERED:])))

    @rule(node=st.integers(0, NODES - 1), which=st.integers(0, 4), login=st.integers(0, 6))
    def loginSucceeds(self, node, which, login):
        self.nodes[node].authenticationSucceeded(self.addresses[which], self.logins[login][0])
        if self.keys[which] is not None:
            self.models[node].succeeded[self.keys[which]] = self.now

    # -- SMTP's unknown recipients -------------------------------------------------

    @rule(node=st.integers(0, NODES - 1), which=st.integers(0, 4))
    def unknownRecipient(self, node, which):
        key, model, settings, now = self.keys[which], self.models[node], self.settings, self.now
        self.nodes[node].unknownRecipient(self.addresses[which])
        slowAfter, banAfter = settings.unknownRecipientSlowAfter, settings.unknownRecipientBanAfter
        if key is None or not (slowAfter or banAfter) or model.banned(key, now):
            return
        count = model.count(recipients(key), now, settings.banWindow)
        # Once the replies wait their longest, more are not counted; with
        # bans, one past a ban that ended bans again (as a failed login
        # does).
        enough = max(banAfter, slowAfter - 1 + failuresFor(RECIPIENT_DELAY_MAX) if slowAfter else 0)
        if count >= enough and not banAfter:
            return
        failure = Failure(recipients(key), None, now)
        model.known.add(failure)
        ban = bool(banAfter) and count + 1 >= banAfter
        if ban:
            model.made[key] = now + settings.banTime
        self._record(model, failure, banAfter, ban)

    # -- the admin command ---------------------------------------------------------

    @rule(which=st.integers(0, 3), duration=st.sampled_from([5, 300]))
    def banAdd(self, which, duration):
        key = self.keys[which]
        resultOf(self.admin.addBan(key, self.now, duration))
        self._storeBan(key, self.now + duration)

    @rule(which=st.integers(0, 3))
    def banDel(self, which):
        """
        C{mailgate ban del}: the ban lifted, or without one, the address's
        failures forgotten; either way a fresh start on every node at its
        next refresh.
        """
        key, now = self.keys[which], self.now
        removed = resultOf(self.admin.removeBan(key, now))
        forgot = False
        if not removed:
            forgotten = resultOf(self.admin.forgetFailures(key, now))
            forgot = bool(forgotten.logins or forgotten.recipients)
        # A ban that ended may be gone from the store already (its expiry).
        if self.store.bans.get(key, 0) > now:
            assert removed
        elif key not in self.store.bans:
            assert not removed
        if removed:
            del self.store.bans[key]
            for model in self.models:
                model.behind = True
        if removed or forgot:
            self.store.forget(key)
            for model in self.models:
                model.toForget.append((key, now))

    # -- a reload -------------------------------------------------------------------

    @rule(numbers=SETTINGS)
    def reload(self, numbers):
        """
        SIGHUP with other numbers: what happens from now on follows them;
        the connections open stay open and counted, the bans in force last
        as long as they were made for, the failures known still count.
        """
        self.settings = PolicySettings(
            banWindow=self.settings.banWindow, exemptNetworks=[EXEMPT_NETWORK], **numbers
        )
        limit = self.settings.maxConnections
        for node, model in zip(self.nodes, self.models):
            node.reconfigure(self.settings)
            # The stress is judged again against the new limit.
            if not limit:
                model.stressed = False
            elif len(model.open) >= limit * 0.8:
                model.stressed = True
            elif len(model.open) < limit * 0.7:
                model.stressed = False

    # -- time -----------------------------------------------------------------------

    @rule(seconds=st.sampled_from([1, 2, 5, 9, 20, 61]))
    def timePasses(self, seconds):
        """
        Time passes: every node refreshes from the store on its timer.
        """
        self.clock.advance(seconds)
        for node in range(NODES):
            self._read(node)

    @rule(node=st.integers(0, NODES - 1))
    def refresh(self, node):
        """
        One node refreshes before the other, at the same time.
        """
        self.nodes[node].sync.refresh()
        self._read(node)

    # -- what every node answers ------------------------------------------------------

    @invariant()
    def answersAsTheModelSays(self):
        if self.nodes is None:
            return
        settings, now = self.settings, self.now
        for node, model in zip(self.nodes, self.models):
            assert node.underStress() == model.stressed
            for address, key in zip(self.addresses, self.keys):
                assert node.isBanned(address) == model.banned(key, now), (address.host, node)
                assert node.recipientErrorDelay(address) == self._recipientDelay(model, key), address.host
                for sent, name in self.logins:
                    assert node.authenticationDelay(address, sent) == self._loginDelay(model, key, name), (
                        address.host,
                        sent,
                    )

    @invariant()
    def theAdminListsTheBansInForce(self):
        if self.nodes is None:
            return
        now = self.now
        mine = {k for k in self.keys if k is not None}
        listed = {(b.address, b.expires) for b in resultOf(self.admin.listBans(now)) if b.address in mine}
        assert listed == {(k, end) for k, end in self.store.bans.items() if end > now}

    def _loginDelay(self, model, key, name):
        settings, now = self.settings, self.now
        if key is None:
            return 0.0
        delay = penalty(model.count(key, now, settings.banWindow, model.succeeded.get(key)), settings.authPenaltyMax)
        if name is not None:
            addresses = {f.counted for f in model.known if f.login == name and f.at > now - settings.banWindow}
            delay = max(delay, penalty(len(addresses) - NAME_ADDRESSES + 1, settings.authPenaltyMax))
        return delay

    def _recipientDelay(self, model, key):
        slowAfter = self.settings.unknownRecipientSlowAfter
        if key is None or not slowAfter:
            return 0.0
        count = model.count(recipients(key), self.now, self.settings.banWindow)
        return penalty(count - slowAfter + 1, RECIPIENT_DELAY_MAX)


# -- the tests ------------------------------------------------------------------------


class SharedStores:
    """
    New policy stores on one shared database, for one example at a time:
    one L{MemoryPolicyStore} for every caller, or SQL stores each with a
    connection of its own, on a SQLite file or PostgreSQL.
    """

    def __init__(self, url=None):
        self.url = url
        self.opened = []
        self.memory = None

    def __call__(self):
        if self.url is None:
            if self.memory is None:
                self.memory = MemoryPolicyStore()
            return self.memory
        store = openSynchronousStore(self.url)
        self.opened.append(store)
        return SQLPolicyStore(store.database)

    def close(self):
        """
        The example is over: close its connections (the next one opens its
        own; the database stays).
        """
        self.memory = None
        for store in self.opened:
            store.close()
        self.opened = []


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def sharedStores(request, tmp_path):
    if request.param == "memory":
        url = None
    elif request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'policy.sqlite3'}"
    else:
        url = request.getfixturevalue("postgresURL")
    stores = SharedStores(url)
    yield stores
    stores.close()


def test_theConnectionPolicyAnswersAsTheModelSays(sharedStores):
    def machine():
        sharedStores.close()
        return PolicyModel(sharedStores)

    # On PostgreSQL, fewer: each step is a few round trips there (24 s
    # for 200), and what is PostgreSQL's own (the connections, the
    # statements' dialect) is met by the first examples.
    postgres = (sharedStores.url or "").startswith("postgres")
    examples = MODEL.max_examples if "MAILGATE_MODEL_EXAMPLES" in os.environ or not postgres else 80
    run_state_machine_as_test(machine, settings=settings(MODEL, max_examples=examples))
