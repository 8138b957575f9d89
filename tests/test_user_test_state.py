"""
C{mailgate user test} beside a disabled user (C{user disable}, Dovecot's
C{nologin}) and one restricted to networks (C{user networks}, Dovecot's
C{allow_nets}): with the right password it says the state, as doveadm
auth test prints the passdb's extra fields, and exits 77 where a login
is refused all the same; a wrong password is told as before.  Run as the
command (L{e2e.AdminCommand}) on a real SQLite file and the real PostgreSQL, and
against a real C{twistd mailgate} whose poplib logins from 127.0.0.2 and
127.0.0.3 it must agree with.

Before, the right password of a disabled user, or of one whose client is
on none of their networks, was "correct", exit 0: the administrator was
not told why the user's logins were refused.
"""

import poplib
import re

import pytest

from e2e import AdminCommand, mailgate_cli, mailgate_server, runHere  # noqa: F401 (fixtures)
from mailgate.testing import addUser, memoryStore, resultOf
from test_lifecycle_e2e import pop

ALICE = "alice@example.org"
BOB = "bob@example.org"
PASSWORD = "wonderland-tested"
REASON = "Account suspended: call 555-0100"
CORRECT = f"the password of {ALICE} is correct (kept as mailgate's own hash)\n"
NETWORKS_LINE = (
    f"{ALICE} may log in from 127.0.0.2/32,2001:db8::/32,local only (mailgate user networks): a login from "
    "elsewhere is refused as a wrong password is\n"
)
ALLOWED = "127.0.0.2"
REFUSED = "127.0.0.3"


@pytest.fixture
def command(databaseURL, tmp_path):
    """
    The C{mailgate} command (L{AdminCommand}) on the test's database (SQLite, PostgreSQL),
    with Alice and Bob.
    """
    command = AdminCommand(databaseURL, cwd=tmp_path)
    command.addUser(ALICE, PASSWORD)
    command.addUser(BOB, PASSWORD)
    return command


def userTest(command, password=PASSWORD, *options):
    return command("user", "test", ALICE, "--password-stdin", *options, input=f"{password}\n")


def test_aDisabledUserIsSaidWithTheReasonAndSinceWhen(command):
    assert userTest(command) == (0, CORRECT, "")
    wrong = userTest(command, "not hers")
    assert wrong == (77, "", f"mailgate: that is not the password of {ALICE}\n")

    command.check("user", "disable", ALICE, "--reason", REASON)
    code, out, err = userTest(command)
    assert code == 77
    lines = out.splitlines(keepends=True)
    assert lines[0] == CORRECT and len(lines) == 2, out
    assert re.fullmatch(
        rf"{ALICE} is disabled since \d{{4}}-\d\d-\d\dT\d\d:\d\d:\d\dZ \({re.escape(REASON)}\): every POP3 login "
        rf"of theirs is refused \(mailgate user enable {ALICE} lets them in again\)\n",
        lines[1],
    ), lines[1]
    # Since when: as user list says it.
    since = next(line for line in command.check("user", "list").splitlines() if line.startswith(ALICE + " "))
    assert lines[1].split()[4] in since
    assert err == f"mailgate: the password is right, but a login of {ALICE} is refused: disabled\n"
    # A wrong password: as before, whatever the state.
    assert userTest(command, "not hers") == wrong

    command.check("user", "disable", ALICE)
    code, out, _ = userTest(command)
    assert code == 77 and "(no reason given): every POP3 login" in out.splitlines()[1]
    command.check("user", "enable", ALICE)
    assert userTest(command) == (0, CORRECT, "")


def test_theNetworksAreSaidAndAClientJudgedAsTheServerJudgesIt(command):
    assert userTest(command, PASSWORD, "--from", REFUSED) == (
        0, f"{CORRECT}{ALICE} may log in from anywhere: from {REFUSED} too\n", ""
    )
    command.check("user", "networks", ALICE, f"{ALLOWED},2001:db8::/32,local")
    assert userTest(command) == (0, CORRECT + NETWORKS_LINE, "")
    for client in (ALLOWED, f"::ffff:{ALLOWED}", "2001:db8::7", "local"):
        shown = "a Unix socket (local)" if client == "local" else client
        assert userTest(command, PASSWORD, "--from", client) == (
            0, f"{CORRECT}{NETWORKS_LINE}a login from {shown} is let in: it is on one of those networks\n", ""
        ), client
    for client in (REFUSED, "2001:db9::7"):
        assert userTest(command, PASSWORD, "--from", client) == (
            77,
            f"{CORRECT}{NETWORKS_LINE}a login from {client} is refused: it is on none of those networks\n",
            f"mailgate: the password is right, but a login of {ALICE} is refused: from {client}, on none of its "
            "networks\n",
        ), client
    # Both at once: each said, in one line of error.
    command.check("user", "disable", ALICE)
    code, out, err = userTest(command, PASSWORD, "--from", REFUSED)
    assert code == 77 and out.count("\n") == 4
    assert err == (
        f"mailgate: the password is right, but a login of {ALICE} is refused: disabled and from {REFUSED}, "
        "on none of its networks\n"
    )
    # A wrong password: as before, from anywhere.
    assert userTest(command, "not hers", "--from", REFUSED) == (
        77, "", f"mailgate: that is not the password of {ALICE}\n"
    )
    # Bob is not restricted.
    assert command("user", "test", BOB, "--password-stdin", input=f"{PASSWORD}\n") == (
        0, f"the password of {BOB} is correct (kept as mailgate's own hash)\n", ""
    )


@pytest.mark.parametrize("databaseURL", ["sqlite"], indirect=True)
@pytest.mark.parametrize("client", ["office-lan", "127.0.0.0/8", "", "127.0.0.1:110"])
def test_aFromThatIsNoAddressIsAUsageError(command, client):
    code, out, err = userTest(command, PASSWORD, "--from", client)
    assert (code, out) == (64, "")
    assert err == (
        f"mailgate: --from {client!r} is not an IP address (give the client's, e.g. 192.0.2.7, or local)\n"
    )


def test_noSuchUserAndTheHelp(command):
    code, out, err = command("user", "test", "nobody@example.org", "--password-stdin", "--from", ALLOWED, input="x\n")
    assert (code, out, err) == (67, "", "mailgate: no such user: nobody@example.org\n")
    code, out, _ = runHere(["user", "test", "--help"])
    assert code == 0 and "--from ADDRESS" in out and "disabled" in out


def test_theStoreTellsOneUsersSummary(databaseURL):
    """
    C{userSummary}: one user's row of the listing (their state with it),
    C{None} for no such user, on both engines.
    """
    store = memoryStore(databaseURL)
    try:
        addUser(store, ALICE, PASSWORD)
        addUser(store, BOB, PASSWORD)
        resultOf(store.disableUser(ALICE, REASON))
        resultOf(store.setAllowedNetworks(ALICE, "127.0.0.2/32"))
        alice = resultOf(store.userSummary(ALICE))
        assert alice == next(user for user in resultOf(store.listUsers()) if user.address == ALICE)
        assert (alice.disabledReason, alice.allowedNetworks) == (REASON, "127.0.0.2/32")
        assert alice.disabledAt is not None
        bob = resultOf(store.userSummary(BOB))
        assert (bob.address, bob.disabledAt, bob.allowedNetworks) == (BOB, None, None)
        assert resultOf(store.userSummary("nobody@example.org")) is None
    finally:
        store.close()


def test_itAgreesWithARunningServer(mailgate_server, mailgate_cli):
    """
    A real server, poplib from 127.0.0.2 and 127.0.0.3: where C{user test
    --from} says a login is let in, the server lets it in; where it says
    refused, the server refuses it (as a wrong password); disabled,
    refused from both.
    """
    mailgate_cli.addUser(ALICE, PASSWORD)
    server = mailgate_server("--auth-failure-delay", "0")
    mailgate_cli.check("user", "networks", ALICE, ALLOWED)
    assert userTest(mailgate_cli, PASSWORD, "--from", ALLOWED)[0] == 0
    pop(server.port, ALICE, PASSWORD, source=ALLOWED).quit()
    assert userTest(mailgate_cli, PASSWORD, "--from", REFUSED)[0] == 77
    with pytest.raises(poplib.error_proto, match=r"-ERR \[AUTH\] invalid user name or password"):
        pop(server.port, ALICE, PASSWORD, source=REFUSED)
    mailgate_cli.check("user", "disable", ALICE, "--reason", REASON)
    assert userTest(mailgate_cli, PASSWORD, "--from", ALLOWED)[0] == 77
    with pytest.raises(poplib.error_proto, match=re.escape(f"-ERR [AUTH] {REASON}")):
        pop(server.port, ALICE, PASSWORD, source=ALLOWED)
