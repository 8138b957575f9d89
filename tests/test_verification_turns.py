"""
Password verifications per client address (mailgate.policy.verifications):
only a few of one address's logins have their password hashed at once,
the others wait their turn in order, with nothing refused or counted;
other addresses are not held back; a login that goes (its connection
lost, the server stopping, its login timeout) while it waits has nothing
checked and leaves no place behind.

POP3 sessions in memory, with the real connection policy and a portal
whose checks the test answers (HeldPortal): a check started is one in
the portal's hands.
"""

import hashlib

import pytest
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.task import Clock

from mailgate.errors import TemporaryFailure
from mailgate.policy.connection import ConnectionPolicy
from mailgate.policy.memory import MemoryPolicyStore
from mailgate.policy.settings import PolicySettings
from mailgate.policy.verifications import PER_ADDRESS, VerificationSlots
from mailgate.session import SessionTracker
from mailgate.testing import POP3Session, addUser, pop3Factory

from test_pop3_policy import INVALID, HeldPortal, endSession
from test_sasl import plain

ALICE = "alice@example.org"
PASSWORD = "wonderland"
# Trusted (plaintext allowed), and not exempt from the policy below.
GUESSER = IPv4Address("TCP", "127.0.0.5", 4711)
OTHER = IPv4Address("TCP", "127.0.0.6", 4711)


class Server:
    """
    The real policy (no network exempt), sessions sharing one clock,
    tracker and portal whose checks wait for the test.
    """

    def __init__(self, store, exempt=("none",), banAfter=10, **options):
        addUser(store, ALICE, PASSWORD, apop=True)
        self.store = store
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.tracker = SessionTracker(self.clock)
        self.policy = ConnectionPolicy(MemoryPolicyStore(), self.clock, PolicySettings(exemptNetworks=list(exempt), banAfter=banAfter)
        )
        self.factory = pop3Factory(
            store, clock=self.clock, policy=self.policy, tracker=self.tracker,
            authFailureDelay=1.0, trustedNetworks=["127.0.0.0/8", "2001:db8::/32"], **options
        )
        self.portal = self.factory.portal = HeldPortal(self.factory.portal)

    def session(self, peer=GUESSER):
        return POP3Session(self.store, factory=self.factory, clock=self.clock, peer=peer)

    def checked(self):
        """
        The passwords whose checks have started, in order.
        """
        return [args[0].password.decode() for _, args in self.portal.held]


@pytest.fixture
def server(store):
    return Server(store)


def userPass(s, password):
    assert s.command(f"USER {ALICE}") == "+OK send PASS\r\n"
    return s.command(f"PASS {password}")


def guesses(server, count, peer=GUESSER):
    sessions = [server.session(peer) for _ in range(count)]
    for index, s in enumerate(sessions):
        assert userPass(s, f"guess {index}") == ""
    return sessions


def test_onlyAFewOfOneAddressesPasswordsAreCheckedAtOnceTheRestInOrder(server):
    sessions = guesses(server, PER_ADDRESS + 2)
    assert server.checked() == [f"guess {index}" for index in range(PER_ADDRESS)]
    # Another address is not held back.
    other = server.session(OTHER)
    assert userPass(other, PASSWORD) == ""
    assert server.checked()[-1] == PASSWORD
    # The next waiting login starts once a check has its answer (before
    # the failure delay), in the order they came.
    server.portal.answer(0)
    assert server.checked()[-1] == f"guess {PER_ADDRESS}"
    server.portal.answer(1)
    assert server.checked()[-1] == f"guess {PER_ADDRESS + 1}"
    assert len(server.checked()) == PER_ADDRESS + 3
    for index in range(2, len(server.portal.held)):
        server.portal.answer(index)
    assert other.advance(0).decode().startswith(f"+OK {ALICE} has 0 messages")
    # Waiting was no refusal: each guess is answered as a wrong password.
    server.clock.advance(1)
    assert [s.send(b"") for s in sessions] == [INVALID.encode()] * len(sessions)
    assert len(server.policy.verifications) == 0


def test_anIPv6ClientWaitsWithTheRestOfItsSlash64(server):
    first, second, elsewhere = (
        IPv6Address("TCP", "2001:db8:1:2::1", 4711),
        IPv6Address("TCP", "2001:db8:1:2:ffff::9", 4711),
        IPv6Address("TCP", "2001:db8:1:3::1", 4711),
    )
    guesses(server, PER_ADDRESS, first)
    assert userPass(server.session(second), "from the same /64") == ""
    assert userPass(server.session(elsewhere), "from the next /64") == ""
    assert server.checked()[PER_ADDRESS:] == ["from the next /64"]


def test_theExemptNetworksAreNotHeld(store):
    server = Server(store, exempt=("127.0.0.0/8",))
    guesses(server, PER_ADDRESS + 2)
    assert len(server.checked()) == PER_ADDRESS + 2


def test_digestAndSCRAMLoginsDoNotWaitForAHash(server):
    guesses(server, PER_ADDRESS + 1)
    s = server.session()
    digest = hashlib.md5(s.challenge.encode() + PASSWORD.encode()).hexdigest()
    assert s.command(f"APOP {ALICE} {digest}") == ""
    assert type(server.portal.held[-1][1][0]).__name__ == "APOPCredentials"


def test_AUTHPLAINWaitsItsTurnToo(server):
    guesses(server, PER_ADDRESS)
    s = server.session()
    assert s.command(f"AUTH PLAIN {plain(ALICE, PASSWORD)}") == ""
    assert len(server.checked()) == PER_ADDRESS
    server.portal.answer(0)
    assert server.checked()[-1] == PASSWORD
    server.portal.answer(PER_ADDRESS)
    assert s.advance(0).decode().startswith(f"+OK {ALICE} has 0 messages")


def test_aLoginWhoseConnectionIsLostWhileItWaitsIsNotChecked(server):
    sessions = guesses(server, PER_ADDRESS + 1)
    waiting = sessions[-1]
    endSession(waiting)
    for index in range(PER_ADDRESS):
        server.portal.answer(index)
    assert len(server.checked()) == PER_ADDRESS
    assert waiting.advance(10) == b""
    # No place was left behind: the address is back to no verification,
    # and its next login is checked at once.
    assert len(server.policy.verifications) == 0
    again = server.session()
    assert userPass(again, PASSWORD) == ""
    again.advance(15)  # the penalty of the failures answered
    assert server.checked()[-1] == PASSWORD


def test_aLoginWaitingItsTurnAtTheShutdownIsToldAtOnceUnchecked(server):
    sessions = guesses(server, PER_ADDRESS + 1)
    waiting = sessions[-1]
    server.tracker.shutdown(30)
    assert waiting.advance(0) == b"-ERR [SYS/TEMP] service temporarily unavailable: server shutting down; try again later\r\n"
    assert waiting.disconnected
    endSession(waiting)
    for index in range(PER_ADDRESS):
        server.portal.answer(index)
    assert len(server.checked()) == PER_ADDRESS
    assert len(server.policy.verifications) == 0


def test_theLoginTimeoutEndsALoginWaitingItsTurn(store):
    server = Server(store, loginTimeout=60)
    sessions = guesses(server, PER_ADDRESS + 1)
    waiting = sessions[-1]
    assert waiting.advance(60).startswith(b"-ERR no login within 60 seconds")
    endSession(waiting)
    assert server.policy.verifications.waiting("127.0.0.5") == 0
    for index in range(PER_ADDRESS):
        server.portal.answer(index)
    assert len(server.checked()) == PER_ADDRESS
    assert len(server.policy.verifications) == 0


def test_aBanLandingWhileALoginWaitsRefusesItUnchecked(store):
    # --ban-after as many as are checked at once: each answered check
    # starts the next, until the last failure bans the address.
    server = Server(store, banAfter=PER_ADDRESS)
    sessions = guesses(server, 2 * PER_ADDRESS)
    for index in range(PER_ADDRESS):
        server.portal.answer(index)
    assert sessions[-1].advance(0) == b"-ERR [SYS/TEMP] banned\r\n"
    assert len(server.checked()) == 2 * PER_ADDRESS - 1
    for index in range(PER_ADDRESS, 2 * PER_ADDRESS - 1):
        server.portal.answer(index)
    assert len(server.policy.verifications) == 0


def test_aCheckEndingInAStoreFailureOrAnInternalErrorHandsItsTurnOver(server):
    """
    A check that ends in no answer about the password (the store down, a
    bug) still ends its verification: the next login waiting its turn is
    checked, the clients are told, and no place is left behind (else the
    address's logins would wait for ever once two checks had failed so).
    """
    sessions = guesses(server, PER_ADDRESS + 2)
    server.portal.held[0][0].errback(TemporaryFailure("the database is down"))
    server.portal.held[1][0].errback(RuntimeError("a bug"))
    assert server.checked()[PER_ADDRESS:] == [f"guess {PER_ADDRESS}", f"guess {PER_ADDRESS + 1}"]
    assert [s.advance(0) for s in sessions[:PER_ADDRESS]] == [
        b"-ERR [SYS/TEMP] service temporarily unavailable: the mail store is unavailable; try again later\r\n",
        b"-ERR [SYS/TEMP] service temporarily unavailable: internal server error; try again later\r\n",
    ]
    for index in range(PER_ADDRESS, PER_ADDRESS + 2):
        server.portal.held[index][0].errback(TemporaryFailure("the database is down"))
    assert len(server.policy.verifications) == 0


def test_turnsHandedOverInALoopNotByRecursion():
    """
    A check that ends as soon as it starts (answered from a cache) hands
    the turn over inside the handing over: a long queue must neither
    overflow the stack nor run more at once than allowed.
    """
    slots = VerificationSlots(perAddress=1)
    running = []
    peak = []

    def check(release):
        running.append(release)
        peak.append(len(running))
        running.remove(release)
        release()

    first = []
    slots.turn("192.0.2.1").addCallback(first.append)
    for _ in range(5000):
        slots.turn("192.0.2.1").addCallback(check)
    assert slots.waiting("192.0.2.1") == 5000
    first[0]()
    first[0]()  # again: nothing more
    assert len(peak) == 5000 and max(peak) == 1
    assert len(slots) == 0
