"""
import pop3 gives the source the user name as the administrator wrote it,
and imports into the user mailgate knows by that name.

mailgate takes several spellings of a name for one user (Unicode forms,
capitals: mailgate.address); a source may not.  A Dovecot whose
passwd-file names a user in decomposed form (``jo\u0308rg``, as a file
written on macOS has it; with ``auth_username_chars`` emptied, as Dovecot
needs for UTF-8 names) logs in only that spelling: before, import pop3
logged in with its own normal form (``j\u00f6rg``), and the real Dovecot
refused the login of a user whose name and password were both right.
"""

import os
import pytest

from dovecotserver import PrivateDovecot, requireDovecot
from e2e import AdminCommand, mailgateHere

pytestmark = requireDovecot

PASSWORD = "wonder land"
#: The name as the source's passwd-file has it, and as mailgate keeps it.
DECOMPOSED = "jo\u0308rg@example.org"
COMPOSED = "j\u00f6rg@example.org"
MESSAGE = b"Subject: moved\n\nfrom the old server\n"


@pytest.fixture(scope="module")
def dovecot():
    """
    A Dovecot that logs in the decomposed spelling only, with one message
    in that user's maildir.
    """
    server = PrivateDovecot(extra="auth_username_chars =\n")
    try:
        server.addUsers(["placeholder@example.org"], PASSWORD)
        server.start()
        path = os.path.join(server.directory, "passwd")
        with open(path, encoding="utf-8") as f:
            text = f.read()
        with open(path, "w", encoding="utf-8") as f:
            f.write(text.replace("placeholder@example.org:", f"{DECOMPOSED}:", 1))
        maildir = server.maildir("placeholder@example.org")
        with open(os.path.join(maildir, "new", "1700000000.M1P1.test"), "wb") as f:
            f.write(MESSAGE)
        os.chown(os.path.join(maildir, "new", "1700000000.M1P1.test"), server.uid, server.gid)
        yield server
        assert server.errorsLogged() == []
    finally:
        server.cleanup()


@pytest.fixture
def target(tmp_path):
    """
    An empty mailgate database with the user, named the composed way.
    """
    url = f"sqlite:///{tmp_path / 'target.sqlite3'}"
    cli = AdminCommand(url)
    cli.addUser(COMPOSED, "here")
    return url, cli


def test_aUsersFileLineLogsInAsItIsSpelt(dovecot, target, tmp_path):
    """
    --users: the line's spelling logs in to the source; the mail lands in
    the user mailgate knows by that name.
    """
    url, cli = target
    users = tmp_path / "users.txt"
    users.write_text(f"{DECOMPOSED} {PASSWORD}\n", encoding="utf-8")
    code, out, err = mailgateHere(url, "import", "pop3", f"pop3://127.0.0.1:{dovecot.pop3Port}", "--users", str(users))
    assert (code, err) == (0, ""), out
    assert out.splitlines()[0].startswith(f"{COMPOSED}: 1 message imported"), out
    assert len(cli.mailbox(COMPOSED)) == 1


def test_anAddressLogsInAsItIsSpelt(dovecot, target):
    """
    The one-user form: its ADDRESS is the login too, as written.
    """
    url, cli = target
    code, out, err = mailgateHere(
        url, "import", "pop3", f"pop3://127.0.0.1:{dovecot.pop3Port}", DECOMPOSED, "--password-stdin",
        stdin=PASSWORD + "\n",
    )
    assert (code, err) == (0, ""), out
    assert out.startswith("1 message imported"), out
    assert len(cli.mailbox(COMPOSED)) == 1
