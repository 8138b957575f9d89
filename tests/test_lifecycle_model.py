"""
A maildrop's life over days, against a model: the POP3 model of
L{test_pop3_model} (deliveries, imports, copies for a second user, quotas,
sessions and every command, deletions at QUIT, recovery of deleted mail),
with time passing in days on the store's clock, each user's retention
(days, never, or the server's) and the server's default changed, and the
retention task run: its expiry of old messages (RFC 2449 EXPIRE) and its
purge of the deleted mail kept for recovery.

What the model holds to, after every step and at every login and command:

  - the retention task removes exactly the messages that arrived more
    than the user's retention ago (the server's default for a user
    without one; none for never), from both users, and nothing of a
    maildrop a session holds (it is skipped until the session ends);
  - a message comes back by recovery after every other, in the order it
    had, dated at its restore: its retention counts from then (dated as
    it first arrived, one older than the retention would go at the next
    run, minutes after the restore said it was back);
  - deleted mail is kept for recovery C{keepDeletedDays} after its
    deletion, then purged: a recovery brings back exactly the messages
    deleted within them, never an expired one;
  - the quota's count of the use is what the maildrop holds throughout.

On SQLite in memory, a SQLite file and PostgreSQL, through the in-memory
session (the store's clock is the test's: a real server's is not).
"""

import os

import attr
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import precondition, rule, run_state_machine_as_test

from mailgate.store.limits import DAY, DEFAULT, UNLIMITED
from mailgate.testing import resultOf

from test_pop3_model import MODEL, MemorySessions, POP3Model, openStore

KEEP_DELETED_DAYS = 3
RETENTIONS = [DEFAULT, UNLIMITED, 1, 3, 7]

# The store's clock, shared by the examples of a run: each begins where
# the last ended, so that what earlier examples left in the database is
# only ever older.
_clock = {"now": 1_700_000_000}

LIFECYCLE = settings(
    MODEL, max_examples=int(os.environ.get("MAILGATE_MODEL_EXAMPLES", "60")), stateful_step_count=50
)


class LifecycleModel(POP3Model):
    """
    L{POP3Model} over days, with the retention task.

    @ivar arrivals: unique id to arrival time, the user's messages (and
        those kept deleted).
    @ivar deletedAt: unique id to deletion time, the user's messages kept
        deleted.
    @ivar otherArrivals: the arrival time of each of the second user's
        copies, in the order of L{others}.
    """

    def __init__(self, store, sessions):
        store._clock = lambda: _clock["now"]
        _clock["now"] += DAY
        # Each example as the first: what an earlier one set is not left.
        store.limits = attr.evolve(store.limits, expireDays=UNLIMITED)
        super().__init__(store, sessions)
        self.arrivals = {}
        self.deletedAt = {}
        self.otherArrivals = []
        self.expireDays = DEFAULT

    @property
    def now(self):
        return _clock["now"]

    # -- hooks of the POP3 model -------------------------------------------

    def _arrive(self, message):
        super()._arrive(message)
        self.arrivals[message.uidl] = self.now

    def _importedAt(self):
        return self.now

    def _gone(self, deleted):
        for message in deleted:
            self.deletedAt[message.uidl] = self.now
        super()._gone(deleted)

    def _otherArrives(self, content):
        super()._otherArrives(content)
        self.otherArrivals.append(self.now)

    def _othersDeleted(self, count):
        super()._othersDeleted(count)
        del self.otherArrivals[:count]

    def _restored(self, restored):
        # Dated at their restore: their retention counts from it.
        for message in restored:
            self.arrivals[message.uidl] = self.now
        self.deletedAt = {}

    # -- time and retention ---------------------------------------------------

    @rule(days=st.sampled_from([0.25, 1, 2, 3, 5]))
    def daysPass(self, days):
        _clock["now"] += int(days * DAY)

    @rule(days=st.sampled_from(RETENTIONS))
    def setExpire(self, days):
        """
        C{mailgate user expire}: the user's own retention, or the server's
        again (C{DEFAULT}).
        """
        resultOf(self.store.setExpire(self.address, days))
        self.expireDays = days

    @rule(days=st.sampled_from([UNLIMITED, 2, 5]))
    def setServerExpire(self, days):
        """
        The server's retention (C{--expire-days}): for every user without
        one of their own, the second user's copies too.
        """
        self.store.limits.expireDays = days

    @rule()
    def retentionRuns(self):
        """
        The retention task's passes: expiry, then the purge of deleted
        mail kept past its days.  Run until they find nothing more (the
        store holds the maildrops of earlier examples too, which count in
        what a pass takes).
        """
        for _ in range(20):
            expired = resultOf(self.store.expireMessages())
            if not expired[0]:
                break
        else:
            raise AssertionError("the retention task did not end")
        for _ in range(20):
            if not resultOf(self.store.purgeDeleted()):
                break
        else:
            raise AssertionError("the purge did not end")
        default = self.store.limits.expireDays
        ours = default if self.expireDays is DEFAULT else self.expireDays
        if self.session is None and ours >= 0:
            cutoff = self.now - ours * DAY
            self.present = [m for m in self.present if self.arrivals[m.uidl] >= cutoff]
        if default >= 0:
            # The second user's maildrop is never held between its
            # downloads.
            cutoff = self.now - default * DAY
            kept = [i for i, at in enumerate(self.otherArrivals) if at >= cutoff]
            self.others = [self.others[i] for i in kept]
            self.otherArrivals = [self.otherArrivals[i] for i in kept]
        # Deleted mail kept for recovery its days, then gone for good.
        keptSince = self.now - KEEP_DELETED_DAYS * DAY
        self.removed = [m for m in self.removed if self.deletedAt[m.uidl] >= keptSince]

    @rule(days=st.sampled_from([1, 2, 4]), restore=st.booleans())
    def aDayOfRetention(self, days, restore):
        """
        Days pass, and the task runs, as it does every day (the days and
        the task are rules of their own too, for what happens between);
        then, maybe, the user's deleted mail is restored: what is back is
        what was still kept.
        """
        self.daysPass(days)
        self.retentionRuns()
        if restore and self.session is None:
            self.restoreDeleted()

    @precondition(lambda self: self.session is None and self.disabled is None)
    @rule(count=st.integers(1, 3))
    def aClientDeletesItsFirstMessages(self, count):
        """
        A client logs in, deletes its first messages and quits: mail kept
        for recovery from then on.
        """
        self.login("user")
        for number in range(1, min(count, len(self.listing)) + 1):
            self._expect(f"DELE {number}", b"+OK message %d deleted\r\n" % number)
            self.listing[number - 1][1] = True
        self.quit()

    @precondition(lambda self: self.session is None and self.disabled is None)
    @rule(count=st.integers(1, 2), days=st.sampled_from([2.5, 3.5]))
    def deletedMailIsRecoveredDaysLater(self, count, days):
        """
        A client deletes, and its user asks for the mail back days later,
        just within the days it is kept or just past them, the task
        having run between: the one sequence that tells a purge a day
        early (or late) from the right one, too long for the rules above
        to reach often.
        """
        self.aClientDeletesItsFirstMessages(count)
        self.aDayOfRetention(days, restore=True)

    @precondition(lambda self: self.session is None)
    @rule()
    def retentionRunsAndAUserLogsIn(self):
        """
        What a client sees after the task ran: a login's count and octets.
        """
        self.retentionRuns()
        self.login("user")
        if self.session is not None:
            self.quit()


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def lifecycleStore(request, tmp_path):
    store = openStore(request, tmp_path, keepDeletedDays=KEEP_DELETED_DAYS, expireDays=UNLIMITED)
    store.backend = request.param
    yield store
    store.close()


def test_aMaildropOverDaysIsAsTheModelSays(lifecycleStore):
    # On PostgreSQL, fewer (23 s of a loaded worker for 60): the retention
    # statements are the same SQL on every store, and what is PostgreSQL's
    # own (the dialect, the connections) is met by the first examples.
    examples = LIFECYCLE.max_examples
    if lifecycleStore.backend == "postgres" and "MAILGATE_MODEL_EXAMPLES" not in os.environ:
        examples = 25
    run_state_machine_as_test(
        lambda: LifecycleModel(lifecycleStore, MemorySessions(lifecycleStore)),
        settings=settings(LIFECYCLE, max_examples=examples),
    )
