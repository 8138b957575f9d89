"""
The admin commands that work under a user's maildrop lock (C{mailgate
user del}, C{user rename}, C{mailbox expunge}) when the address changes
hands between their first look-up and their write: another node (another
store on the same database) deletes the user and gives the address to
another user, whose lock the command does not hold.

The interleaving is made deterministic by a hook on the first store's
look-up: the other store's steps run right after it, before the lock is
taken.
"""

import pytest

from mailgate.errors import NoSuchUser, UserChanged
from mailgate.testing import addUser, deliver, memoryStore, resultOf

ALICE = "alice@example.org"
BOB = "bob@example.org"
CAROL = "carol@example.org"


@pytest.fixture
def stores(databaseURL):
    """
    Two stores on one database: the admin command's and another node's.
    """
    admin = memoryStore(databaseURL)
    other = memoryStore(databaseURL)
    addUser(admin, ALICE, "wonderland")
    addUser(admin, BOB, "builder")
    deliver(admin, [ALICE], b"Subject: alice's\r\n\r\nbody\r\n")
    deliver(admin, [BOB], b"Subject: bob's\r\n\r\nbody\r\n")
    yield admin, other
    other.close()
    admin.close()


def afterLookUp(store, steps):
    """
    Have C{steps()} run once C{store}'s next look-up of a user has been
    answered, before anything else the caller does with its answer.
    """
    findUser = store.findUser

    def hooked(address):
        store.findUser = findUser
        d = findUser(address)
        steps()
        return d

    store.findUser = hooked


def failureOf(d):
    box = []
    d.addBoth(box.append)
    assert box and hasattr(box[0], "check"), box
    return box[0]


def addressTakenOver(other, by):
    """
    The other node's steps: Alice is deleted, and her address given to
    another user (C{by}: Bob renamed, or a new user added).
    """

    def steps():
        resultOf(other.deleteUser(ALICE))
        if by == "rename":
            resultOf(other.renameUser(BOB, ALICE))
        else:
            addUser(other, ALICE, "another")
            deliver(other, [ALICE], b"Subject: the new alice's\r\n\r\nbody\r\n")

    return steps


def messagesOf(store, address):
    return len(resultOf(store.listMessages(address)))


@pytest.mark.parametrize("by", ["rename", "add"])
def test_deleteUserActsOnlyOnTheUserItLocked(stores, by):
    """
    C{user del} refuses, as a temporary failure (exit 75: run it again),
    rather than delete the user who now has the address.
    """
    admin, other = stores
    afterLookUp(admin, addressTakenOver(other, by))
    failure = failureOf(admin.deleteUser(ALICE))
    assert failure.check(UserChanged), failure
    assert "changed meanwhile" in str(failure.value)
    assert messagesOf(admin, ALICE) == 1
    # Nothing left locked: the command, run again, does what it says.
    resultOf(admin.deleteUser(ALICE))
    assert failureOf(admin.listMessages(ALICE)).check(NoSuchUser)


def test_renameUserActsOnlyOnTheUserItLocked(stores):
    admin, other = stores
    afterLookUp(admin, addressTakenOver(other, "rename"))
    assert failureOf(admin.renameUser(ALICE, CAROL)).check(UserChanged)
    assert messagesOf(admin, ALICE) == 1
    assert failureOf(admin.listMessages(CAROL)).check(NoSuchUser)
    resultOf(admin.renameUser(ALICE, CAROL))
    assert messagesOf(admin, CAROL) == 1


def test_expungeActsOnlyOnTheUserItLocked(stores):
    admin, other = stores
    afterLookUp(admin, addressTakenOver(other, "add"))
    assert failureOf(admin.expungeMessages(ALICE)).check(UserChanged)
    assert messagesOf(admin, ALICE) == 1
    assert resultOf(admin.expungeMessages(ALICE)) == (1, 0)
