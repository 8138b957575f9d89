"""
Databases that old releases of mailgate made, upgraded by today's: each
was made by running that release (its mailgate commands and its server;
tests/fixtures/make_old_databases.py says how, and is how to make
another), with what its server then served recorded beside it.  Today's
mailgate must serve the same octets under the same unique ids, sizes and
numbers, and keep the users, passwords, APOP secrets, quotas, retention,
kept deleted mail and bans that release stored.

The versions: 1, the earliest schema today's mailgate upgrades; 3, the
last before migration 4 rewrote SQLite's message chunks; 11, the last
before migration 12.  (tests/test_schema.py holds the same for PostgreSQL
from a version-3 schema written out in the test.)
"""

import gzip
import hashlib
import json
import shutil
from pathlib import Path

import pytest

from mailgate.policy.addresses import storedKey
from mailgate.store import openSynchronousStore
from mailgate.store.limits import UNLIMITED
from mailgate.store.policy import SQLPolicyStore
from mailgate.store.schema import LATEST, currentVersion
from mailgate.testing import POP3Session, deliver, resultOf

FIXTURES = Path(__file__).parent / "fixtures"
PASSWORD = "secret"
ALICE, BOB, CAROL = "alice@example.org", "bob@example.org", "carol@example.org"


@pytest.fixture(params=[1, 3, 11], ids=lambda version: f"version{version}")
def old(request, tmp_path):
    """
    C{(version, store, expected)}: today's store on a copy of the database
    that release made (migrated as it opens), and what that release's
    server served.
    """
    version = request.param
    path = tmp_path / "mail.sqlite3"
    with gzip.open(FIXTURES / f"schema-v{version}.sqlite3.gz", "rb") as source, open(path, "wb") as target:
        shutil.copyfileobj(source, target)
    expected = json.loads((FIXTURES / f"schema-v{version}.json").read_text())
    store = openSynchronousStore(f"sqlite:///{path}")
    try:
        yield version, store, expected
    finally:
        store.close()


def _reply(session, command):
    """
    The octets of a reply: its status line as text, and what follows it.
    """
    status, _, rest = session.send(command.encode() + b"\r\n").partition(b"\r\n")
    return status.decode(), rest


def _served(store, user):
    """
    What today's server serves C{user}, as the fixture recorded it.
    """
    session = POP3Session(store, apop=False)
    assert session.login(user, PASSWORD).startswith("+OK"), user
    status, _ = _reply(session, "STAT")
    count = int(status.split()[1])
    served = {
        "stat": status.split()[1:3],
        "uidl": _reply(session, "UIDL")[1].decode().splitlines(),
        "list": _reply(session, "LIST")[1].decode().splitlines(),
        "retr": [hashlib.sha256(_reply(session, f"RETR {n}")[1]).hexdigest() for n in range(1, count + 1)],
        "top": [hashlib.sha256(_reply(session, f"TOP {n} 0")[1]).hexdigest() for n in range(1, count + 1)],
    }
    assert session.command("QUIT").startswith("+OK")
    return served


def test_everyMessageIsServedAsTheOldReleaseServedIt(old):
    """
    Every message under its number, unique id and size, RETR and TOP
    octet for octet (a message of two chunks of 8-bit lines among them,
    one stored for two users, lines to dot-stuff), after the password the
    old release hashed; the storage use kept for quotas is the maildrop's.
    """
    version, store, expected = old
    assert store.database.run(currentVersion) == LATEST
    for user in (ALICE, BOB, CAROL):
        assert _served(store, user) == expected["served"][user], user
    usage = resultOf(store.quotaOf(ALICE))
    assert [str(usage.usedMessages), str(usage.usedOctets)] == expected["served"][ALICE]["stat"]


def test_apopSecretsQuotasRetentionAndBansAreKept(old):
    """
    The APOP secret and SCRAM-SHA-256 keys the old release kept log in
    with APOP and AUTH SCRAM-SHA-256; quotas,
    retention and bans set with its commands are in force.
    """
    from saslclients import ScramClient, b64, unb64

    version, store, expected = old
    session = POP3Session(store, apop=True)
    digest = hashlib.md5((session.challenge + PASSWORD).encode()).hexdigest()
    assert session.command(f"APOP {CAROL} {digest}").startswith("+OK")
    # The SCRAM-SHA-256 keys it kept, and the server's proof of them.
    session = POP3Session(store)
    client = ScramClient(ALICE, PASSWORD)
    serverFirst = session.command("AUTH SCRAM-SHA-256 " + b64(client.first()))
    assert serverFirst.startswith("+ "), serverFirst
    serverFinal = session.command(b64(client.final(unb64(serverFirst[2:].strip()))))
    assert serverFinal.startswith("+ ") and client.verify(unb64(serverFinal[2:].strip())), serverFinal
    assert session.command("").startswith("+OK")
    users = {user.address: user for user in resultOf(store.listUsers())}
    assert set(users) == {ALICE, BOB, CAROL}
    # An IPv6 ban made before bans covered a /64 covers its /64 now.
    bans = {storedKey(ban.address) for ban in resultOf(SQLPolicyStore(store.database).listBans(0))}
    if version < 3:
        assert bans == set()
        return
    alice = resultOf(store.quotaOf(ALICE))
    assert (alice.quotaOctets, alice.quotaMessages, users[ALICE].expireDays) == (10 * 1024 * 1024, 100, 365)
    assert resultOf(store.quotaOf(BOB)).ownOctets == UNLIMITED
    assert bans == {"192.0.2.7", "2001:db8::/64"}


def test_keptDeletedMailIsRestoredAndNewMailTakesANewId(old):
    """
    The message the old release's server deleted over POP3 is kept (from
    version 3) and comes back under its unique id with its octets; mail
    delivered after the upgrade gets a unique id none of the old ones has.
    """
    version, store, expected = old
    oldIds = [line.split()[1] for line in expected["served"][ALICE]["uidl"][:-1]]
    kept = resultOf(store.listDeleted(ALICE))
    if version >= 3:
        ((number, octets, uniqueId, _, peer),) = [line.split() for line in expected["deleted"]]
        assert [(m.uniqueId, m.size, m.deletedBy) for m in kept] == [(uniqueId, int(octets), peer)]
        resultOf(store.restoreDeleted(ALICE, [uniqueId]))
        served = _served(store, ALICE)
        ids = [line.split()[1] for line in served["uidl"][:-1]]
        # Where it comes back among the others is the restore's business.
        assert sorted(ids) == sorted([uniqueId] + oldIds)
        # carol's message is the same octets, delivered the same way.
        assert served["retr"][ids.index(uniqueId)] == expected["served"][CAROL]["retr"][0]
        oldIds.append(uniqueId)
    else:
        assert kept == []
    deliver(store, [ALICE], b"Subject: new\r\n\r\nafter the upgrade\r\n")
    ids = [line.split()[1] for line in _served(store, ALICE)["uidl"][:-1]]
    assert len(ids) == len(oldIds) + 1 and ids[-1] not in oldIds
