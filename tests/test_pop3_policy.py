"""
POP3 logins and the connection policy: the authentication penalty is
waited out (on this session only) before any credential is checked, a
banned address never gets in (a correct password included), and every
outcome is reported to the policy, for every way of logging in.
"""

import hashlib

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure

from mailgate.testing import POP3Session, addUser, pop3Factory

from test_admission import RecordingPolicy
from saslclients import cramMD5Response
from test_sasl import b64, challenge, plain, scramExchange

ALICE = "alice@example.org"
PASSWORD = "wonderland"
CLIENT = IPv4Address("TCP", "127.0.0.5", 4711)
INVALID = "-ERR [AUTH] invalid user name or password\r\n"


class PenaltyPolicy(RecordingPolicy):
    """
    Delays every authentication by C{delay}; bans C{banned} (a set of
    hosts that may grow while a session waits).
    """

    def __init__(self, delay=0.0):
        super().__init__()
        self.delay = delay
        self.banned = set()

    def isBanned(self, address):
        super().isBanned(address)
        return address.host in self.banned

    def authenticationDelay(self, address, login):
        super().authenticationDelay(address, login)
        return self.delay


@pytest.fixture
def alice(store):
    addUser(store, ALICE, PASSWORD, apop=True)
    return ALICE


def session(store, policy, **options):
    factory = pop3Factory(store, policy=policy, **options)
    return POP3Session(store, factory=factory, clock=factory.reactor, peer=CLIENT)


def apop(s, password=PASSWORD):
    digest = hashlib.md5(s.challenge.encode() + password.encode()).hexdigest()
    return s.command(f"APOP {ALICE} {digest}")


def userPass(s, password=PASSWORD):
    assert s.command(f"USER {ALICE}") == "+OK send PASS\r\n"
    return s.command(f"PASS {password}")


def authPlain(s, password=PASSWORD):
    return s.command(f"AUTH PLAIN {plain(ALICE, password)}")


def authPlainContinued(s, password=PASSWORD):
    assert s.command("AUTH PLAIN") == "+ \r\n"
    return s.command(plain(ALICE, password))


def scram(s, password=PASSWORD):
    return scramExchange(s, ALICE, password)[2]


LOGINS = {"user": userPass, "apop": apop, "plain": authPlain, "plain-continued": authPlainContinued, "scram": scram}


def checks(policy):
    return [call for call in policy.calls if call[0].startswith("authentication") and call[0] != "authenticationDelay"]


@pytest.mark.parametrize("login", LOGINS)
def test_thePenaltyIsWaitedOutBeforeTheCredentialsAreChecked(store, alice, login):
    policy = PenaltyPolicy(delay=4.0)
    s = session(store, policy)
    reply = LOGINS[login](s)
    assert reply == ""
    assert ("authenticationDelay", CLIENT, ALICE) in policy.calls
    assert checks(policy) == []
    assert s.advance(3.9) == b""
    assert checks(policy) == []
    out = s.advance(0.1).decode()
    if login == "scram":
        # The server's own proof first (RFC 5034's additional data).
        assert out.startswith("+ "), out
        out = s.command("")
    assert out.startswith(f"+OK {ALICE} has 0 messages"), out
    assert checks(policy) == [("authenticationSucceeded", CLIENT, ALICE)]


def test_thePenaltyHoldsOnlyThisSession(store, alice):
    policy = PenaltyPolicy(delay=30.0)
    waiting = session(store, policy)
    assert userPass(waiting) == ""
    other = POP3Session(store, clock=waiting.clock, factory=pop3Factory(store, clock=waiting.clock))
    assert other.login(ALICE, PASSWORD).startswith("+OK")
    assert other.command("QUIT").startswith("+OK")
    # The waiting session's pipelined commands wait their turn.
    assert waiting.command("STAT") == ""
    out = waiting.advance(30).decode()
    assert out.startswith(f"+OK {ALICE} has 0 messages") and out.endswith("+OK 0 0\r\n")


@pytest.mark.parametrize("login", LOGINS)
def test_aBannedAddressDoesNotGetInWithTheRightPassword(store, alice, login):
    policy = PenaltyPolicy()
    policy.banned.add(CLIENT.host)
    s = session(store, policy)
    reply = LOGINS[login](s)
    assert reply == "-ERR [SYS/TEMP] banned\r\n"
    assert s.disconnected
    assert checks(policy) == []
    # Nothing was locked: the user gets in from elsewhere.
    assert POP3Session(store).login(ALICE, PASSWORD).startswith("+OK")


def test_aBanLandingDuringThePenaltyRefusesTheLogin(store, alice):
    policy = PenaltyPolicy(delay=2.0)
    s = session(store, policy)
    assert userPass(s) == ""
    policy.banned.add(CLIENT.host)
    assert s.advance(2) == b"-ERR [SYS/TEMP] banned\r\n"
    assert s.disconnected
    assert checks(policy) == []


class BannedWhileChecked(PenaltyPolicy):
    """
    Bans the client while its credentials are being checked: the two
    questions asked before the check (the login's, then the check's own)
    are answered no, every later one yes, as when the address's other
    sessions, whose wrong passwords were checked at the same time, make
    the ban.
    """

    asked = 0

    def isBanned(self, address):
        self.asked += 1
        return self.asked > 2


@pytest.mark.parametrize("login", LOGINS)
@pytest.mark.parametrize("password", [PASSWORD, "wrong"], ids=["right", "wrong"])
def test_aBanLandingWhileTheCredentialsAreCheckedAnswersBannedWhateverTheyWere(store, alice, login, password):
    """
    A guesser sends a password on every session it may open at once: the
    checks in flight when the ban lands are not answered as they come
    (each would be one more guess past --ban-after, and a right password
    would log in, banned), but all alike: banned, as late as a wrong
    password is answered, and closed.
    """
    policy = BannedWhileChecked()
    s = session(store, policy, authFailureDelay=1.0)
    assert LOGINS[login](s, password=password) == ""
    assert s.advance(0.9) == b""
    assert s.advance(0.1) == b"-ERR [SYS/TEMP] banned\r\n"
    assert s.disconnected
    # Neither counted (the address is banned already) nor a success that
    # clears its penalty.
    assert checks(policy) == []
    # No login: the maildrop is free.
    assert POP3Session(store).login(ALICE, PASSWORD).startswith("+OK")


def test_aMaildropInUseIsAnsweredBannedWhenTheBanLandedDuringTheCheck(store, alice):
    """
    [IN-USE] is answered only to the right password: to a banned address
    it would say which of its guesses was right.
    """
    holder = POP3Session(store)
    assert holder.login(ALICE, PASSWORD).startswith("+OK")
    s = session(store, BannedWhileChecked(), authFailureDelay=1.0)
    assert userPass(s) == ""
    assert s.advance(1) == b"-ERR [SYS/TEMP] banned\r\n"


class HeldPortal:
    """
    A portal whose logins are answered only when the test says so: the
    checks of several sessions under way at once, as on a thread pool.
    """

    def __init__(self, portal):
        self.portal = portal
        self.held = []

    def login(self, *args):
        d = defer.Deferred()
        self.held.append((d, args))
        return d

    def answer(self, index):
        d, args = self.held[index]
        self.portal.login(*args).chainDeferred(d)


def test_sessionsCheckedAtOnceLearnNothingPastTheBan(store, alice):
    """
    The real policy, --ban-after 2: a guesser's three sessions from one
    address send their passwords at once.  The first two checks fail and
    ban the address; the third, the right password, checked meanwhile,
    does not log in, and is answered as a wrong one would be once banned.
    """
    from twisted.internet.task import Clock

    from mailgate.policy.connection import ConnectionPolicy
    from mailgate.policy.memory import MemoryPolicyStore
    from mailgate.policy.settings import PolicySettings

    clock = Clock()
    clock.advance(1_000_000)
    policy = ConnectionPolicy(
        MemoryPolicyStore(), clock, PolicySettings(exemptNetworks=["none"], banAfter=2, authPenaltyMax=15)
    )
    factory = pop3Factory(store, clock=clock, policy=policy, authFailureDelay=1.0)
    portal = factory.portal = HeldPortal(factory.portal)
    sessions = [POP3Session(store, factory=factory, clock=clock, peer=CLIENT) for _ in range(3)]
    for s, password in zip(sessions, ["wrong 1", "wrong 2", PASSWORD]):
        assert userPass(s, password) == ""
    for index in range(3):
        portal.answer(index)
    assert [s.advance(0) for s in sessions] == [b""] * 3
    clock.advance(1)
    assert [s.send(b"") for s in sessions] == [INVALID.encode(), INVALID.encode(), b"-ERR [SYS/TEMP] banned\r\n"]
    assert sessions[2].disconnected
    assert POP3Session(store).login(ALICE, PASSWORD).startswith("+OK")


def endSession(s):
    s.protocol.connectionLost(Failure(ConnectionDone()))


@pytest.mark.parametrize("login", LOGINS)
def test_failuresAreReported(store, alice, login):
    policy = PenaltyPolicy()
    s = session(store, policy, authFailureDelay=1.0)
    assert LOGINS[login](s, password="wrong") == ""
    if login == "apop":
        # Held until the session fails again or ends: see
        # test_aFailedDigestLoginIsForgivenOnlyByThatUsersOwnLogin.
        assert checks(policy) == []
        assert s.advance(1).decode() == INVALID
        endSession(s)
        assert checks(policy) == [("authenticationFailed", CLIENT, ALICE)]
        return
    assert checks(policy) == [("authenticationFailed", CLIENT, ALICE)]
    # The password goes with the failure where the mechanism carried it,
    # so that the policy can recognise the same one tried again.
    assert policy.passwords == [None if login == "scram" else b"wrong"]
    # The fixed failure delay keeps its meaning, after the check.
    assert s.advance(1).decode() == INVALID


def cramMD5(s, name, secret):
    data = challenge(s.command("AUTH CRAM-MD5"))
    return s.command(b64(cramMD5Response(name, secret, data)))


BOB = "bob@example.org"


@pytest.mark.parametrize("digestLogin", ["apop", "cram-md5"])
@pytest.mark.parametrize("user", [ALICE, BOB], ids=["with-apop", "without-apop"])
def test_aFailedDigestLoginIsForgivenOnlyByThatUsersOwnLogin(store, alice, digestLogin, user):
    """
    fetchmail (auth any) tries CRAM-MD5 whenever it is offered, then
    USER/PASS: a failed APOP or CRAM-MD5 login followed, in the same
    session, by that user's own login counts nothing, so polling does not
    get the address banned.  A guesser cannot log in as the user; another
    user's login, a further failure or the end of the session counts it.
    """
    addUser(store, BOB, PASSWORD)

    def failDigest(s):
        if digestLogin == "apop":
            digest = hashlib.md5(s.challenge.encode() + b"wrong").hexdigest()
            return s.command(f"APOP {user} {digest}")
        return cramMD5(s, user, "wrong")

    policy = PenaltyPolicy()
    s = session(store, policy, apop=True)
    assert failDigest(s) == INVALID
    assert s.command(f"USER {user}") == "+OK send PASS\r\n"
    assert s.command(f"PASS {PASSWORD}").startswith(f"+OK {user} has 0 messages")
    assert checks(policy) == [("authenticationSucceeded", CLIENT, user)]

    other = ALICE if user == BOB else BOB
    policy = PenaltyPolicy()
    s = session(store, policy, apop=True)
    assert failDigest(s) == INVALID
    assert s.command(f"USER {other}") == "+OK send PASS\r\n"
    assert s.command(f"PASS {PASSWORD}").startswith(f"+OK {other} has 0 messages")
    assert checks(policy) == [("authenticationFailed", CLIENT, user), ("authenticationSucceeded", CLIENT, other)]

    policy = PenaltyPolicy()
    s = session(store, policy, apop=True)
    assert failDigest(s) == INVALID
    assert userPass(s, "also wrong") == INVALID
    assert checks(policy) == [("authenticationFailed", CLIENT, user), ("authenticationFailed", CLIENT, ALICE)]


@pytest.mark.parametrize("digestLogin", ["apop", "cram-md5"])
def test_aFailedDigestLoginThenTheSamePasswordByUSERIsOneFailure(store, alice, digestLogin):
    """
    fetchmail (auth any) left with an old password tries it with CRAM-MD5,
    where offered, then with USER/PASS, at every poll: the digest failure
    is counted as the USER/PASS failure that tried the same password for
    the same user, once, so that the policy's rule for a password tried
    again (not counted again) holds for it too; counted apart, every
    poll counted a failure and the address was banned.  It is only
    dropped when the digest is exactly what that password gives: another
    password, or another user, counts both.
    """
    addUser(store, BOB, PASSWORD)

    def failDigest(s, name, password):
        if digestLogin == "apop":
            digest = hashlib.md5(s.challenge.encode() + password.encode()).hexdigest()
            return s.command(f"APOP {name} {digest}")
        return cramMD5(s, name, password)

    policy = PenaltyPolicy()
    s = session(store, policy, apop=True)
    assert failDigest(s, ALICE, "old password") == INVALID
    assert userPass(s, "old password") == INVALID
    assert checks(policy) == [("authenticationFailed", CLIENT, ALICE)]

    for name, password in ((ALICE, "older password"), (BOB, "old password")):
        policy = PenaltyPolicy()
        s = session(store, policy, apop=True)
        assert failDigest(s, name, password) == INVALID
        assert userPass(s, "old password") == INVALID
        assert checks(policy) == [("authenticationFailed", CLIENT, name), ("authenticationFailed", CLIENT, ALICE)]


@pytest.mark.parametrize("name", [ALICE, "bob@example.org", "nobody@example.org"])
def test_aFailedAPOPLoginWeighsTheSameWhoeverItNames(store, alice, name):
    """
    A wrong APOP digest for a user with APOP (alice), for a user without
    (bob) and for no user at all hold the address's next attempt alike:
    were the last two not counted, the next attempt's penalty would tell
    anyone which users have APOP.
    """
    from twisted.internet.task import Clock

    from mailgate.policy.connection import ConnectionPolicy
    from mailgate.policy.memory import MemoryPolicyStore
    from mailgate.policy.settings import PolicySettings

    addUser(store, "bob@example.org", PASSWORD)
    clock = Clock()
    clock.advance(1_000_000)
    policy = ConnectionPolicy(
        MemoryPolicyStore(), clock, PolicySettings(exemptNetworks=["none"], banAfter=10, authPenaltyMax=15)
    )

    def connect():
        factory = pop3Factory(store, clock=clock, policy=policy, apop=True, authFailureDelay=0)
        return POP3Session(store, factory=factory, clock=clock, peer=CLIENT)

    s = connect()
    digest = hashlib.md5(s.challenge.encode() + b"wrong").hexdigest()
    assert s.command(f"APOP {name} {digest}") == INVALID
    endSession(s)
    s = connect()
    assert s.command("USER nobody@example.org") == "+OK send PASS\r\n"
    assert s.command("PASS x") == ""
    assert s.advance(1.9) == b""
    assert s.advance(0.2) == INVALID.encode()


def test_anUnknownUserIsReportedLikeAWrongPassword(store, alice):
    policy = PenaltyPolicy()
    s = session(store, policy)
    s.command("USER nobody@example.org")
    assert s.command("PASS x") == INVALID
    assert checks(policy) == [("authenticationFailed", CLIENT, "nobody@example.org")]


def test_penaltyAndFailureDelayAddUp(store, alice):
    policy = PenaltyPolicy(delay=2.0)
    s = session(store, policy, authFailureDelay=1.0)
    assert userPass(s, "wrong") == ""
    assert s.advance(2) == b""
    assert s.advance(0.9) == b""
    assert s.advance(0.1).decode() == INVALID


def test_aMalformedSASLExchangeChecksNothing(store, alice):
    policy = PenaltyPolicy()
    s = session(store, policy)
    assert s.command(f"AUTH PLAIN {b64(b'no-nuls')}").startswith("-ERR [AUTH] ")
    assert checks(policy) == []


def test_theRealPenaltyHoldsTheNextLoginFromThatAddress(store, alice):
    """
    The real connection policy, not a stand-in: after failed logins from
    an address, its next attempt waits Dovecot's doubling penalty (2 s
    after one failure, 4 s after two) before the password is looked at,
    on this session only; another address logs in at once.
    """
    from twisted.internet.task import Clock

    from mailgate.policy.connection import ConnectionPolicy
    from mailgate.policy.memory import MemoryPolicyStore
    from mailgate.policy.settings import PolicySettings

    clock = Clock()
    clock.advance(1_000_000)
    policy = ConnectionPolicy(
        MemoryPolicyStore(), clock, PolicySettings(exemptNetworks=["none"], banAfter=10, authPenaltyMax=15)
    )

    def connect(peer):
        factory = pop3Factory(store, clock=clock, policy=policy)
        return POP3Session(store, factory=factory, clock=clock, peer=peer)

    s = connect(CLIENT)
    # The first attempt is not delayed.
    assert userPass(s, "wrong") == INVALID
    # The second waits 2 s: nothing is answered before.
    assert s.command(f"USER {ALICE}") == "+OK send PASS\r\n"
    assert s.command("PASS another wrong one") == ""
    assert s.advance(1.9) == b""
    assert s.advance(0.2) == INVALID.encode()
    # The third waits 4 s, even with the right password.
    assert s.command(f"USER {ALICE}") == "+OK send PASS\r\n"
    assert s.command(f"PASS {PASSWORD}") == ""
    assert s.advance(3.9) == b""
    assert s.advance(0.2).startswith(b"+OK")
    assert s.command("QUIT").startswith("+OK")

    # Another address is not held up.
    other = connect(IPv4Address("TCP", "127.0.0.6", 4712))
    assert userPass(other).startswith("+OK")


@pytest.mark.parametrize(
    "name, user",
    [("bob", BOB), ("bob@b\u00fccher.example", "bob@xn--bcher-kva.example")],
    ids=["default-realm", "unicode-domain"],
)
def test_aFailedDigestLoginIsForgivenByThatUsersLoginUnderAnyOfItsNames(store, alice, name, user):
    """
    fetchmail's CRAM-MD5 before USER/PASS, with the name the user was
    given (the bare name under --auth-default-realm, her domain in
    Unicode): her own login forgives the failed digest, as it does with
    the name spelt as her address.  The held name was compared as sent
    with the address she logged in as, so every poll counted a failure and
    the tenth got her address banned.
    """
    addUser(store, user, PASSWORD)
    policy = PenaltyPolicy()
    s = session(store, policy, apop=True, defaultRealm="example.org")
    assert cramMD5(s, name, "wrong") == INVALID
    assert s.command(f"USER {name}") == "+OK send PASS\r\n"
    assert s.command(f"PASS {PASSWORD}").startswith(f"+OK {user} has 0 messages")
    assert checks(policy) == [("authenticationSucceeded", CLIENT, name)]
