"""
A failed login is answered as long after it was asked whatever its check
cost: an unknown user (one dummy scrypt hash), a mailgate user's wrong
password (their scrypt hash) and an imported user's wrong password (the
hash Dovecot made, an Argon2 one dearer than scrypt, then the dummy) all
get their -ERR at the same moment, so the timing of a refusal does not
tell an attacker which addresses exist.

The hashes' cost is played by the thread runner advancing the session's
clock, so that the moments compared are the clock's, not the machine's.
"""

import pytest
from twisted.internet.task import Clock

from mailgate.auth import checkers
from mailgate.auth.passwords import StoredCredentials
from mailgate.auth.realm import makePortal
from mailgate.pop3 import POP3Factory
from mailgate.testing import POP3Session, addUser, memoryStore, resultOf, runInline

#: what each hash costs, in the clock's seconds
HASH = 0.3
DELAY = 1.0
REFUSED = b"-ERR [AUTH] invalid user name or password\r\n"
#: an Argon2id hash as Dovecot makes it (doveadm pw -s ARGON2ID -p secret)
ARGON2 = (
    "{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=1$"
    "c2FsdHNhbHRzYWx0c2FsdA$QxSXBOgbp5hG1PhCmoMRAjzqJ/J3Dq9ZkP0LdN5bDKg"
)


@pytest.fixture
def store():
    s = memoryStore()
    addUser(s, "alice@example.org", "wonderland")
    resultOf(s.addUser("bob@example.org", StoredCredentials(passwordHash=ARGON2)))
    yield s
    s.close()


def session(store, clock):
    hashes = []

    def slowHashes(function, *args):
        # Each hash the check runs (the dummy one too) takes HASH seconds.
        counted = []
        original = checkers.verifyPassword

        def counting(*a):
            counted.append(a)
            clock.advance(HASH)
            return original(*a)

        checkers.verifyPassword = counting
        try:
            return runInline(function, *args)
        finally:
            checkers.verifyPassword = original
            hashes.append(len(counted))

    factory = POP3Factory(makePortal(store, slowHashes), reactor=clock, apop=False, authFailureDelay=DELAY)
    s = POP3Session(store, clock=clock, factory=factory)
    s.hashes = hashes
    return s


@pytest.mark.parametrize("login, hashes", [
    ("nobody@example.org", 1),
    ("alice@example.org", 1),
    ("bob@example.org", 2),
])
def test_aFailedLoginIsAnsweredTheDelayAfterItWasAsked(store, login, hashes):
    clock = Clock()
    s = session(store, clock)
    s.command(f"USER {login}")
    asked = clock.seconds()
    assert s.command("PASS wrong") == ""
    assert s.hashes == [hashes]
    assert s.advance(asked + DELAY - clock.seconds() - 0.01) == b""
    assert s.advance(0.01) == REFUSED


def test_aCheckLongerThanTheDelayIsAnsweredWhenItEnds(store):
    clock = Clock()
    s = session(store, clock)
    s.factory.authFailureDelay = s.protocol.authFailureDelay = 0.5
    s.command("USER bob@example.org")
    # Two hashes, 0.6 s: past the delay, answered at once.
    assert s.command("PASS wrong").encode() == REFUSED
