"""
C{mailgate user import --refresh} on a newer passwd-file, while a move
from Dovecot goes on: an account the old server has disabled since the
last run (C{nologin}, C{fail}) is disabled here too, whether or not its
user has logged in here since; without C{--refresh} the run says so and
changes nothing.  The installed command on a real SQLite file (the
store's part, disableUser, is tested on both engines elsewhere).
"""

import hashlib

import pytest

from test_cli import CLI
from test_user_disable_cli import login

ALICE = "alice@example.org"
BOB = "bob@example.org"
CAROL = "carol@example.org"
DAVE = "dave@example.org"
PASSWORD = "moving-day"


def _md5(password):
    """
    A {PLAIN-MD5} hash of C{password}: one mailgate keeps as imported
    until its user's first login (a password in clear is hashed at once).
    """
    return "{PLAIN-MD5}" + hashlib.md5(password.encode()).hexdigest()


@pytest.fixture
def cli(tmp_path, cheapCommandHashes):
    return CLI(tmp_path / "admin.sqlite3")


def _imported(cli, tmp_path, text, *options, inClear=()):
    """
    The lines C{user import} writes; on standard error nothing, but the
    line of a C{--refresh} run that names the users C{inClear} (there,
    their password in clear in the file: not compared).
    """
    passwd = tmp_path / "passwd"
    passwd.write_text(text)
    result = cli("user", "import", str(passwd), *options)
    said = ""
    if inClear:
        users = f"{len(inClear)} user{'s' if len(inClear) > 1 else ''}"
        said = (
            f"mailgate: {users} there ({inClear[0]}{', ...' if len(inClear) > 1 else ''}) had their password in "
            f"clear in {passwd}: hashed when imported, it is mailgate's own, which --refresh leaves, as for a user "
            f"who has logged in here; give those whose password changed on the old server the new one with "
            f"mailgate user passwd\n"
        )
    assert (result.code, result.err) == (0, said), result
    return result.out.splitlines()


def test_aNewerFilesNologinDisablesTheUserWithRefresh(cli, tmp_path):
    assert _imported(
        cli, tmp_path,
        f"{ALICE}:{{PLAIN}}{PASSWORD}::::::\n"
        f"{BOB}:{{PLAIN}}{PASSWORD}::::::\n"
        f"{CAROL}:{{PLAIN}}{PASSWORD}::::::nologin=y reason=Moved\n"
        f"{DAVE}:{_md5(PASSWORD)}::::::\n",
    )[-1] == "4 added, 0 already there, 0 failed"
    # Alice logs in here (her hash becomes mailgate's own); Bob does not.
    assert login(cli.url, ALICE, PASSWORD).startswith("+OK")

    # The old server disables Alice and Bob, and gives Dave a new password.
    newer = (
        f"{ALICE}:{{PLAIN}}{PASSWORD}::::::nologin=y reason=Left\n"
        f"{BOB}:{{PLAIN}}{PASSWORD}::::::fail=y\n"
        f"{CAROL}:{{PLAIN}}{PASSWORD}::::::nologin=y reason=Moved\n"
        f"{DAVE}:{_md5('new-' + PASSWORD)}::::::nologin\n"
    )
    # Without --refresh: said, nothing changed.
    assert _imported(cli, tmp_path, newer) == [
        f"exists {ALICE} (Dovecot's nologin has it disabled, not here: --refresh)",
        f"exists {BOB} (Dovecot's fail has it disabled, not here: --refresh)",
        f"exists {CAROL}",
        f"exists {DAVE} (its imported password is not the file's; Dovecot's nologin has it disabled, not here: "
        "--refresh)",
        "0 added, 4 already there, 0 failed",
    ]
    assert login(cli.url, ALICE, PASSWORD).startswith("+OK")
    assert login(cli.url, BOB, PASSWORD).startswith("+OK")

    assert _imported(cli, tmp_path, newer, "--refresh", inClear=[CAROL]) == [
        f"disabled {ALICE} (as Dovecot's nologin has it now: Left)",
        f"disabled {BOB} (as Dovecot's fail has it now)",
        f"exists {CAROL}",
        f"updated {DAVE}",
        f"disabled {DAVE} (as Dovecot's nologin has it now)",
        "0 added, 3 updated, 1 already there, 0 failed",
    ]
    assert login(cli.url, ALICE, PASSWORD) == "-ERR [AUTH] Left\r\n"
    assert login(cli.url, BOB, PASSWORD) == "-ERR [AUTH] Login disabled for this user\r\n"
    assert login(cli.url, CAROL, PASSWORD) == "-ERR [AUTH] Moved\r\n"
    # Dave's new password is the one refused as disabled (not as wrong).
    assert login(cli.url, DAVE, f"new-{PASSWORD}") == "-ERR [AUTH] Login disabled for this user\r\n"

    # Run again: nothing left to change.
    assert _imported(cli, tmp_path, newer, "--refresh", inClear=[ALICE, BOB, CAROL])[-1] == (
        "0 added, 0 updated, 4 already there, 0 failed"
    )


def test_aLineNoLongerDisabledLeavesTheUserDisabled(cli, tmp_path):
    """
    The other way is the administrator's call (user enable): a file
    without the nologin it had enables no one.
    """
    _imported(cli, tmp_path, f"{ALICE}:{{PLAIN}}{PASSWORD}::::::nologin=y reason=Moved\n")
    assert _imported(cli, tmp_path, f"{ALICE}:{{PLAIN}}{PASSWORD}::::::\n", "--refresh", inClear=[ALICE]) == [
        f"exists {ALICE}",
        "0 added, 0 updated, 1 already there, 0 failed",
    ]
    assert login(cli.url, ALICE, PASSWORD) == "-ERR [AUTH] Moved\r\n"


def test_aPasswordInClearIsNotComparedAndRefreshSaysSo(cli, tmp_path):
    """
    A password in clear ({PLAIN}) is hashed as it is imported: the hash
    is mailgate's own from the start, which --refresh leaves (a newer
    password could be told from it only by a scrypt check per user).
    Walked: a user's password changed in the file while the move went on,
    and the --refresh run said "exists" alone, the old password still
    logging in and the new one refused.  Now one line says which users
    --refresh left so, and what gives them the new password.  A hash
    kept as imported is compared, and replaced, as before.
    """
    _imported(cli, tmp_path, f"{ALICE}:{{PLAIN}}{PASSWORD}::::::\n{DAVE}:{_md5(PASSWORD)}::::::\n")
    newer = f"{ALICE}:{{PLAIN}}new-{PASSWORD}::::::\n{DAVE}:{_md5('new-' + PASSWORD)}::::::\n"
    assert _imported(cli, tmp_path, newer, "--refresh", inClear=[ALICE]) == [
        f"exists {ALICE}",
        f"updated {DAVE}",
        "0 added, 1 updated, 1 already there, 0 failed",
    ]
    assert login(cli.url, ALICE, PASSWORD).startswith("+OK")
    assert login(cli.url, DAVE, f"new-{PASSWORD}").startswith("+OK")
    # Without --refresh, nothing is said of them: nothing was asked.
    assert _imported(cli, tmp_path, newer) == [f"exists {ALICE}", f"exists {DAVE}", "0 added, 2 already there, 0 failed"]
