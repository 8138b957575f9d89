"""
Aliases in the store (L{mailgate.store.aliases}) and in the recipient
look-up SMTP, LMTP and C{mailgate deliver} share
(L{mailgate.smtp.delivery.LocalDelivery}), on SQLite and PostgreSQL.
"""

import pytest

from mailgate.auth.passwords import makeCredentials
from mailgate.errors import AliasExists, NoSuchAlias, NoSuchUser, UserExists
from mailgate.records import AliasRecord
from mailgate.smtp.delivery import LocalDelivery
from mailgate.smtp.envelope import SMTPReply
from mailgate.store.limits import StoreLimits
from mailgate.testing import TEST_HASH_COST, addUser, deliver, memoryStore, resultOf

ALICE = "alice@example.org"
BOB = "bob@example.org"
ABUSE = "abuse@example.org"
INFO = "info@other.example"


@pytest.fixture
def store(databaseURL):
    store = memoryStore(databaseURL)
    addUser(store, ALICE, "pw")
    addUser(store, BOB, "pw")
    yield store
    store.close()


def _refusal(d):
    failures = []
    d.addErrback(failures.append)
    assert failures, "accepted"
    failures[0].trap(SMTPReply)
    return failures[0].value


def test_anAliasIsAddedListedAndRemoved(store):
    assert resultOf(store.addAlias(ABUSE, BOB)) is True
    # Again for the same user: nothing changes, and it says so.
    assert resultOf(store.addAlias(ABUSE, BOB)) is False
    assert resultOf(store.addAlias(INFO, ALICE)) is True
    assert resultOf(store.findAlias(ABUSE)) == BOB
    assert resultOf(store.findAlias("nobody@example.org")) is None
    # A user's own address is no alias of theirs.
    assert resultOf(store.findAlias(BOB)) is None
    assert resultOf(store.listAliases()) == [AliasRecord(ABUSE, BOB), AliasRecord(INFO, ALICE)]
    assert resultOf(store.listAliases(BOB)) == [AliasRecord(ABUSE, BOB)]
    assert resultOf(store.removeAlias(ABUSE)) == BOB
    assert resultOf(store.findAlias(ABUSE)) is None
    with pytest.raises(NoSuchAlias):
        resultOf(store.removeAlias(ABUSE))
    with pytest.raises(NoSuchUser):
        resultOf(store.listAliases("nobody@example.org"))


def test_anAddressIsAUsersOrAnAliasNeverBoth(store):
    resultOf(store.addAlias(ABUSE, BOB))
    with pytest.raises(UserExists):
        resultOf(store.addAlias(ALICE, BOB))
    with pytest.raises(AliasExists) as taken:
        resultOf(store.addAlias(ABUSE, ALICE))
    assert (taken.value.address, taken.value.target) == (ABUSE, BOB)
    with pytest.raises(NoSuchUser):
        resultOf(store.addAlias("x@example.org", "nobody@example.org"))
    credentials = makeCredentials("pw", logN=TEST_HASH_COST)
    with pytest.raises(AliasExists):
        resultOf(store.addUser(ABUSE, credentials))
    # An import's batch: the alias's line is refused as taken, the others added.
    added = resultOf(store.addUsers([(ABUSE, credentials, {}), ("carol@example.org", credentials, {})]))
    assert added == [False, True]
    assert resultOf(store.findUser(ABUSE)) is None
    assert resultOf(store.findAlias(ABUSE)) == BOB
    with pytest.raises(AliasExists):
        resultOf(store.renameUser(ALICE, ABUSE))
    assert resultOf(store.findUser(ALICE)) is not None


def test_aliasesFollowTheirUser(store):
    """
    A rename takes the user's aliases along; renamed to one of their own
    aliases, the alias is the address and no longer an alias; deleted,
    the user's aliases go with them.
    """
    resultOf(store.addAlias(ABUSE, BOB))
    resultOf(store.addAlias(INFO, BOB))
    resultOf(store.renameUser(BOB, "robert@example.org"))
    assert resultOf(store.findAlias(ABUSE)) == "robert@example.org"
    resultOf(store.renameUser("robert@example.org", INFO))
    assert resultOf(store.findUser(INFO)) is not None
    assert resultOf(store.listAliases()) == [AliasRecord(ABUSE, INFO)]
    resultOf(store.deleteUser(INFO))
    assert resultOf(store.listAliases()) == []
    # Free again, for anyone.
    assert resultOf(store.addAlias(ABUSE, ALICE)) is True


def test_theAliasOfAUserRemovedByHandReachesNobody(store):
    """
    A user deleted with SQL, not with user del, leaves their aliases: they
    are listed without a user, reach no one (not a new user given the same
    id by a counter set back) and may be given again.
    """
    resultOf(store.addAlias(ABUSE, BOB))
    bob = resultOf(store.findUser(BOB))

    def removeByHand(cursor):
        cursor.execute("DELETE FROM mailboxes WHERE user_id = ?", (bob.userId,))
        cursor.execute("DELETE FROM users WHERE user_id = ?", (bob.userId,))

    resultOf(store.database.runWrite(removeByHand))
    assert resultOf(store.listAliases()) == [AliasRecord(ABUSE, None)]
    assert resultOf(store.findAlias(ABUSE)) is None
    addUser(store, "carol@example.org", "pw")
    assert resultOf(store.findUser("carol@example.org")).userId != bob.userId
    assert resultOf(store.findAlias(ABUSE)) is None
    assert resultOf(store.addAlias(ABUSE, ALICE)) is True
    assert resultOf(store.findAlias(ABUSE)) == ALICE


def test_aDomainWithAliasesOnlyTakesMail(store):
    assert resultOf(store.hasDomain("other.example")) is False
    resultOf(store.addAlias(INFO, ALICE))
    assert resultOf(store.hasDomain("other.example")) is True
    delivery = LocalDelivery(store)
    assert resultOf(delivery.checkRecipient(INFO)) == ALICE
    refusal = _refusal(delivery.checkRecipient("sales@other.example"))
    assert (refusal.code, refusal.enhanced) == (550, "5.1.1")
    resultOf(store.removeAlias(INFO))
    refusal = _refusal(LocalDelivery(store).checkRecipient(INFO))
    assert (refusal.code, refusal.enhanced) == (550, "5.7.1")


def test_mailToAnAliasIsItsUsersQuotaAndAll(store):
    resultOf(store.addAlias(ABUSE, BOB))
    delivery = LocalDelivery(store, ["example.org"], recipientDelimiter="+")
    assert resultOf(delivery.checkRecipient(ABUSE)) == BOB
    # A detail of an alias, as Postfix looks up user+detail's user.
    assert resultOf(delivery.checkRecipient("abuse+spam@example.org")) == BOB
    assert resultOf(delivery.checkRecipient("Abuse@Example.ORG")) == BOB
    deliver(store, [BOB], b"Subject: one\r\n\r\nhello\r\n")
    resultOf(store.setQuota(BOB, messages=1))
    refusal = _refusal(delivery.checkRecipient(ABUSE))
    assert refusal.code in (452, 552) and refusal.enhanced.endswith("2.2"), refusal
    assert ABUSE in refusal.text


def test_anAliasOfAUserGoneIsNoSuchUser(store):
    resultOf(store.addAlias(ABUSE, BOB))
    delivery = LocalDelivery(store, ["example.org"])
    resultOf(store.deleteUser(BOB))
    refusal = _refusal(delivery.checkRecipient(ABUSE))
    assert (refusal.code, refusal.enhanced) == (550, "5.1.1")


def test_anAliasOfPostmasterIsTakenBeforeTheConfiguredOne(store):
    """
    postmaster@ a domain is --postmaster's mail where no user has it; an
    alias of that name says whose it is for that domain.
    """
    delivery = LocalDelivery(store, ["example.org", "other.example"], postmaster=ALICE)
    assert resultOf(delivery.checkRecipient("postmaster@other.example")) == ALICE
    resultOf(store.addAlias("postmaster@other.example", BOB))
    assert resultOf(delivery.checkRecipient("postmaster@other.example")) == BOB
    assert resultOf(delivery.checkRecipient("postmaster@example.org")) == ALICE


def test_aUsersOwnAddressIsNotAskedOfTheAliases(store):
    """
    A user's address is looked up once and remembered as before: no alias
    look-up for it.  An unknown recipient costs one look-up of aliases:
    the alias of that name and the domain's catch-all together; with a
    detail, one more for the user it names.
    """
    asked = []
    for name in ("findAlias", "findAliases"):
        def asking(argument, name=name, call=getattr(store, name)):
            asked.append((name, argument))
            return call(argument)

        setattr(store, name, asking)
    store.limits = StoreLimits()
    delivery = LocalDelivery(store, ["example.org"], recipientDelimiter="+")
    assert resultOf(delivery.checkRecipient(BOB)) == BOB
    assert resultOf(delivery.checkRecipient(BOB)) == BOB
    assert asked == []
    _refusal(delivery.checkRecipient("nobody@example.org"))
    assert asked == [("findAliases", ["nobody@example.org", "@example.org"])]
    del asked[:]
    _refusal(delivery.checkRecipient("nobody+x@example.org"))
    assert asked == [
        ("findAliases", ["nobody+x@example.org", "@example.org"]),
        ("findAliases", ["nobody@example.org", "@example.org"]),
    ]


def test_aCatchAllTakesWhatNoOneElseHas(store):
    """
    @example.org, the domain's catch-all, takes mail to an address of the
    domain that no user, alias, or detail of either has, as Postfix's
    virtual_alias_maps looks @domain up last; every address someone has
    stays theirs, and a full mailbox's refusal stands.
    """
    resultOf(store.addAlias("@example.org", ALICE))
    resultOf(store.addAlias(ABUSE, BOB))
    delivery = LocalDelivery(store, recipientDelimiter="+", postmaster=BOB)
    assert resultOf(delivery.checkRecipient("random@example.org")) == ALICE
    assert resultOf(delivery.checkRecipient('"no such one"@example.org')) == ALICE
    assert resultOf(delivery.checkRecipient(BOB)) == BOB
    assert resultOf(delivery.checkRecipient(ABUSE)) == BOB
    assert resultOf(delivery.checkRecipient("bob+lists@example.org")) == BOB
    assert resultOf(delivery.checkRecipient("abuse+x@example.org")) == BOB
    assert resultOf(delivery.checkRecipient("postmaster@example.org")) == BOB
    # Another domain has none.
    addUser(store, "carol@other.example", "pw")
    refusal = _refusal(delivery.checkRecipient("random@other.example"))
    assert (refusal.code, refusal.enhanced) == (550, "5.1.1")
    deliver(store, [BOB], b"Subject: one\r\n\r\nhello\r\n")
    resultOf(store.setQuota(BOB, messages=1))
    refusal = _refusal(LocalDelivery(store, recipientDelimiter="+", postmaster=BOB).checkRecipient(BOB))
    assert refusal.enhanced.endswith("2.2"), refusal


def test_aCatchAllTakesPostmasterWithoutAConfiguredOne(store):
    resultOf(store.addAlias("@example.org", ALICE))
    assert resultOf(LocalDelivery(store).checkRecipient("postmaster@example.org")) == ALICE


def test_aCatchAllsDomainTakesMail(store):
    resultOf(store.addAlias("@other.example", ALICE))
    assert resultOf(store.hasDomain("other.example")) is True
    assert resultOf(LocalDelivery(store).checkRecipient("anyone@other.example")) == ALICE
    # Not where --domain lists the domains without it.
    refusal = _refusal(LocalDelivery(store, ["example.org"]).checkRecipient("anyone@other.example"))
    assert (refusal.code, refusal.enhanced) == (550, "5.7.1")


def test_aDomainOfAliasesWhoseUserIsGoneTakesNoMail(store):
    """
    A domain whose only aliases lost their user (removed by hand, with
    SQL) is another domain again: relay access denied, not no such user.
    """
    resultOf(store.addAlias(INFO, ALICE))
    alice = resultOf(store.findUser(ALICE))

    def removeByHand(cursor):
        cursor.execute("DELETE FROM mailboxes WHERE user_id = ?", (alice.userId,))
        cursor.execute("DELETE FROM users WHERE user_id = ?", (alice.userId,))

    resultOf(store.database.runWrite(removeByHand))
    assert resultOf(store.hasDomain("other.example")) is False
    refusal = _refusal(LocalDelivery(store).checkRecipient(INFO))
    assert (refusal.code, refusal.enhanced) == (550, "5.7.1")
