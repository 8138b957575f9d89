"""
C{mailgate ban list|add|del}, through L{mailgate.cli.run} on both
backends: what the administrator sees, and that a running server's policy
(here one on a L{Clock}) follows the change at its next refresh.
"""

import datetime
import io
import json
import re
import time

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock

from mailgate.cli import EX_DATAERR, EX_USAGE, run
from mailgate.policy.connection import BANNED, ConnectionPolicy
from mailgate.policy.refresh import REFRESH_INTERVAL
from mailgate.policy.settings import PolicySettings
from mailgate.store import openSynchronousStore
from mailgate.store.policy import SQLPolicyStore
from mailgate.records import AuthFailure
from mailgate.testing import resultOf

_LINE = re.compile(r"^(\S+)\s+(\S+)\s+(\d+)\s+(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ)$")


class Result:
    def __init__(self, code, out, err):
        self.code, self.out, self.err = code, out, err

    def __repr__(self):
        return f"<exit {self.code} out={self.out!r} err={self.err!r}>"


@pytest.fixture
def cli(databaseURL):
    def call(*argv):
        out, err = io.StringIO(), io.StringIO()
        code = run(["--database", databaseURL, *argv], stdin=io.StringIO(""), stdout=out, stderr=err, environ={})
        result = Result(code, out.getvalue(), err.getvalue())
        assert "Traceback" not in result.err, result
        return result

    call.url = databaseURL
    # The database exists, as a server's start makes it: ban commands do
    # not create one (see test_cli.test_missingDatabaseFileIsNotCreated).
    assert call("db", "upgrade").code == 0
    return call


def banList(cli):
    result = cli("ban", "list")
    assert result.code == 0, result
    lines = result.out.splitlines()
    assert lines[0].split() == ["ADDRESS", "REASON", "FAILURES", "EXPIRES"], result
    rows = []
    for line in lines[1:]:
        match = _LINE.match(line)
        assert match, line
        address, reason, failures, expires = match.groups()
        at = datetime.datetime.strptime(expires, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.timezone.utc)
        rows.append((address, reason, int(failures), at.timestamp()))
    return rows


def test_noBans(cli):
    assert banList(cli) == []


def test_addListDelete(cli):
    before = time.time()
    result = cli("ban", "add", "192.0.2.7", "--for", "120")
    assert result.code == 0, result
    assert result.out.startswith("banned 192.0.2.7 until ")
    cli("ban", "add", "2001:DB8::0:1")
    rows = banList(cli)
    # An IPv6 address is banned with its /64 network.
    assert [(a, r, f) for a, r, f, _ in rows] == [("192.0.2.7", "admin", 0), ("2001:db8::/64", "admin", 0)]
    assert before + 120 - 1 <= rows[0][3] <= time.time() + 121
    # --for defaults to --ban-time's default, an hour.
    assert before + 3600 - 1 <= rows[1][3] <= time.time() + 3601
    result = cli("ban", "del", "192.0.2.7")
    assert result.code == 0, result
    assert "lifted the ban of 192.0.2.7" in result.out
    assert [a for a, _, _, _ in banList(cli)] == ["2001:db8::/64"]
    # Any address of the network, or the network itself, names the ban.
    result = cli("ban", "del", "2001:db8::ffff")
    assert result.code == 0, result
    assert "lifted the ban of 2001:db8::/64" in result.out
    assert cli("ban", "add", "2001:db8:1:2::/64").code == 0
    assert [a for a, _, _, _ in banList(cli)] == ["2001:db8:1:2::/64"]
    assert cli("ban", "del", "2001:db8:1:2::/64").code == 0
    assert banList(cli) == []


def test_aSingleIPv6AddressBannedByAnEarlierVersionIsLifted(cli):
    store = openSynchronousStore(cli.url)
    try:
        resultOf(SQLPolicyStore(store.database).addBan("2001:db8::5", time.time(), 600))
    finally:
        store.close()
    # Listed as it is enforced, for its /64 (it was listed as 2001:db8::5).
    assert [address for address, _, _, _ in banList(cli)] == ["2001:db8::/64"]
    assert json.loads(cli("ban", "list", "--json").out)["address"] == "2001:db8::/64"
    result = cli("ban", "del", "2001:db8::5")
    assert result.code == 0, result
    assert banList(cli) == []


@pytest.mark.parametrize("written", ["2001:db8::/64", "2001:db8::6"])
def test_aSingleIPv6AddressBannedByAnEarlierVersionIsLiftedAsListed(cli, written):
    """
    Such a ban is listed, and enforced, as its /64: lifted by what the
    list shows, or by any address of the /64, as any other ban.  Only its
    own address lifted it ("no ban for 2001:db8::/64", exit 1), which the
    list no longer shows.
    """
    store = openSynchronousStore(cli.url)
    try:
        resultOf(SQLPolicyStore(store.database).addBan("2001:db8::5", time.time(), 600))
    finally:
        store.close()
    result = cli("ban", "del", written)
    lifted = "lifted the ban of 2001:db8::/64; its failed logins and unknown recipients are forgotten\n"
    assert (result.code, result.out) == (0, lifted), result
    assert banList(cli) == []


def test_aBanAddedReplacesOneAnEarlierVersionStoredForAnAddressOfItsNetwork(cli):
    """
    C{ban add} replaces the ban its address has, also one stored by an
    earlier mailgate for a single IPv6 address of the /64: a server
    enforces the later of two bans of one /64, so the year-long one stayed
    in force (and listed) beside the minute "banned ... until" had said.
    """
    store = openSynchronousStore(cli.url)
    try:
        resultOf(SQLPolicyStore(store.database).addBan("2001:db8::5", time.time(), 365 * 86400))
    finally:
        store.close()
    before = time.time()
    assert cli("ban", "add", "2001:db8::5", "--for", "60").code == 0
    [(address, reason, failures, expires)] = banList(cli)
    assert (address, reason, failures) == ("2001:db8::/64", "admin", 0)
    assert before + 59 <= expires <= time.time() + 61


def test_bansMadeByFailuresAreListed(cli):
    store = openSynchronousStore(cli.url)
    try:
        policyStore = SQLPolicyStore(store.database)
        now = time.time()
        for n in range(4):
            resultOf(policyStore.recordFailure(AuthFailure(f"f{n}", "203.0.113.9", "bob", now), 4, 600, 900))
    finally:
        store.close()
    [(address, reason, failures, expires)] = banList(cli)
    assert (address, reason, failures) == ("203.0.113.9", "auth-failures", 4)
    assert now + 899 <= expires <= now + 901


def test_deleteWithoutABan(cli):
    result = cli("ban", "del", "192.0.2.8")
    assert result.code == 1
    assert result.err == "mailgate: no ban for 192.0.2.8\n"


def test_deleteReleasesAnAddressSlowedWithoutABan(cli, monkeypatch):
    """
    An address with failed logins and unknown recipients counted, below
    any ban, and slowed by a running server: C{ban del} says there is no
    ban and what it forgot, exit 0, in its output and its audit line, and
    the server no longer slows it after its next refresh.  With nothing
    left to forget, no ban, exit 1, as before.
    """
    from mailgate.cli import audit
    from mailgate.records import recipientsAddress

    outcomes = []
    monkeypatch.setattr(audit, "outcome", lambda args, text: outcomes.append(text))
    store = openSynchronousStore(cli.url)
    clock = Clock()
    now = time.time()
    clock.advance(now)
    settings = PolicySettings(exemptNetworks=["none"], banAfter=0, unknownRecipientSlowAfter=20)
    policy = ConnectionPolicy(SQLPolicyStore(store.database), clock, settings)
    client = IPv4Address("TCP", "192.0.2.9", 40000)
    try:
        policyStore = SQLPolicyStore(store.database)
        for n in range(12):
            resultOf(policyStore.recordFailure(AuthFailure(f"f{n}", "192.0.2.9", "bob", now), 0, 600, 900))
        for n in range(24):
            counted = AuthFailure(f"r{n}", recipientsAddress("192.0.2.9"), None, now)
            resultOf(policyStore.recordFailure(counted, 0, 600, 900))
        resultOf(policyStore.recordFailure(AuthFailure("o", "192.0.2.10", "bob", now), 0, 600, 900))
        policy.start()
        assert policy.authenticationDelay(client, None) == 15
        assert policy.recipientErrorDelay(client) > 0
        result = cli("ban", "del", "192.0.2.9")
        assert (result.code, result.out, result.err) == (
            0, "no ban for 192.0.2.9; its 12 failed logins and 24 unknown recipients are forgotten\n", "",
        )
        assert outcomes == ["no ban, its 12 failed logins and 24 unknown recipients forgotten"]
        clock.advance(REFRESH_INTERVAL)
        assert policy.authenticationDelay(client, None) == 0
        assert policy.recipientErrorDelay(client) == 0
        assert banList(cli) == []
        result = cli("ban", "del", "192.0.2.9")
        assert (result.code, result.err) == (1, "mailgate: no ban for 192.0.2.9\n")
        result = cli("ban", "del", "192.0.2.10")
        assert (result.code, result.out) == (0, "no ban for 192.0.2.10; its 1 failed login is forgotten\n")
    finally:
        policy.stop()
        store.close()


def test_deleteWithoutABanBansNothingOnANodeWhoseClockLags(cli):
    """
    C{ban del} releases an address slowed but not banned on a server whose
    clock is 5 seconds behind the host it ran on: the server does not ban
    the address it released (its next refresh read no ban in force).
    """
    store = openSynchronousStore(cli.url)
    clock = Clock()
    now = time.time()
    clock.advance(now - 5)
    settings = PolicySettings(exemptNetworks=["none"], banAfter=0)
    policy = ConnectionPolicy(SQLPolicyStore(store.database), clock, settings)
    client = IPv4Address("TCP", "192.0.2.9", 40000)
    try:
        resultOf(SQLPolicyStore(store.database).recordFailure(AuthFailure("f", "192.0.2.9", "bob", now), 0, 600, 900))
        policy.start()
        result = cli("ban", "del", "192.0.2.9")
        assert (result.code, result.out) == (0, "no ban for 192.0.2.9; its 1 failed login is forgotten\n")
        clock.advance(REFRESH_INTERVAL)
        assert not policy.isBanned(client)
        assert len(policy.bans) == 0
    finally:
        policy.stop()
        store.close()


def test_badAddresses(cli):
    for argv in (
        ("ban", "add", "mail.example.org"),
        ("ban", "del", "300.1.1.1"),
        ("ban", "add", "2001:db8::/48"),
        ("ban", "add", "192.0.2.0/24"),
    ):
        result = cli(*argv)
        assert result.code == EX_DATAERR, result
        assert "not an IP address" in result.err
    result = cli("ban", "add", "192.0.2.1", "--for", "0")
    assert result.code == EX_USAGE, result
    result = cli("ban", "add", "192.0.2.1", "--for", "soon")
    assert result.code == EX_USAGE, result
    assert banList(cli) == []


def test_loopbackBanSaysItIsExemptByDefault(cli):
    result = cli("ban", "add", "127.0.0.2")
    assert result.code == 0
    assert "note: 127.0.0.2 is in the default --exempt-network" in result.out


def test_aRunningServerFollowsTheCommandWithinOneRefresh(cli):
    """
    The server's policy (its own store connection, a clock of its own)
    enforces a ban added by the command at its next refresh, and lets the
    address in again at the refresh after C{ban del}.
    """
    store = openSynchronousStore(cli.url)
    clock = Clock()
    clock.advance(time.time())
    policy = ConnectionPolicy(SQLPolicyStore(store.database), clock, PolicySettings(exemptNetworks=["none"]))
    client = IPv4Address("TCP", "192.0.2.44", 40000)
    policy.start()
    try:
        assert policy.admit("pop3", client) is None
        policy.connectionClosed("pop3", client)
        assert cli("ban", "add", "192.0.2.44").code == 0
        clock.advance(REFRESH_INTERVAL)
        assert policy.admit("pop3", client) == BANNED
        assert cli("ban", "del", "192.0.2.44").code == 0
        clock.advance(REFRESH_INTERVAL)
        assert policy.admit("pop3", client) is None
    finally:
        policy.stop()
        store.close()


def test_banDurationIsBounded(cli):
    """
    At most ten years: a longer ban was stored, then failed to show (a
    year past 9999), and one past the database's integers failed to store.
    """
    for duration in ("300000000000", "99999999999999999999", "315360001", "-5"):
        result = cli("ban", "add", "192.0.2.10", f"--for={duration}")
        assert result.code == EX_USAGE, result
        assert result.err.startswith("mailgate: bad --for: ") and result.err.count("\n") == 1, result
    assert banList(cli) == []
    before = time.time()
    assert cli("ban", "add", "192.0.2.10", "--for", "315360000").code == 0
    [(_, _, _, expires)] = banList(cli)
    assert before + 315360000 - 1 <= expires <= time.time() + 315360001


def test_banListShowsABanBeyondYear9999(cli):
    """
    A ban an older mailgate stored for longer than a date can say: shown
    in seconds, and the others still listed.
    """
    store = openSynchronousStore(cli.url)
    try:
        policyStore = SQLPolicyStore(store.database)
        now = time.time()
        resultOf(policyStore.addBan("192.0.2.10", now, 300000000000))
        resultOf(policyStore.addBan("192.0.2.11", now, 60))
    finally:
        store.close()
    result = cli("ban", "list")
    assert result.code == 0, result
    lines = result.out.splitlines()
    address, reason, failures, seconds = lines[1].split()[:4]
    assert (address, reason, failures) == ("192.0.2.10", "admin", "0")
    assert now + 300000000000 - 1 <= int(seconds) <= now + 300000000000 + 2
    assert lines[1].endswith("(seconds since 1970, past year 9999)")
    assert lines[2].split()[0] == "192.0.2.11"
    assert cli("ban", "del", "192.0.2.10").code == 0
