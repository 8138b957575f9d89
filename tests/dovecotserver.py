"""
A private Debian Dovecot for tests: the benchmarks' one
(benchmarks/dovecot.py: its own configuration, base_dir, log and
passwd-file under one temporary directory, POP3 and LMTP on free ports of
127.0.0.1, mail owned by an unprivileged account), with the POP3 unique id
format a test asks for.

    from dovecotserver import PrivateDovecot, requireDovecot

This module holds no tests.
"""

import os
import poplib
import shutil
import signal
import smtplib
import sys

import pytest

BENCHMARKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "benchmarks")
if BENCHMARKS not in sys.path:
    sys.path.insert(0, BENCHMARKS)

import dovecot as _benchmarkDovecot  # noqa: E402 (benchmarks/dovecot.py)

DEADLINE = 20.0

requireDovecot = pytest.mark.skipif(
    not _benchmarkDovecot.available(),
    reason="Debian's dovecot-pop3d is not installed here (make test installs it: tests/sysdeps.sh)",
)


#: No waiting on refused logins: Dovecot's auth_failure_delay (2 s per
#: refusal) and anvil's penalty (4 s, 8 s, ... before every later login from
#: 127.0.0.1) guard against guessing, which a private test instance does
#: not need; tests that are refused a login see the same -ERR, only sooner.
NO_LOGIN_DELAYS = """\
auth_failure_delay = 0
service anvil {
  unix_listener anvil-auth-penalty {
    mode = 0
  }
}
"""


class PrivateDovecot(_benchmarkDovecot.Dovecot):
    """
    One Dovecot (the stock process settings, cleartext passwords in its
    passwd-file, no delays on refused logins) with C{pop3_uidl_format =
    uidlFormat} and any other C{extra} settings.

    C{passdbFields} gives some users extra fields in the passwd-file
    (C{{address: "proxy=y host=127.0.0.1 port=N"}}): what the passdb
    answers for them, e.g. that Dovecot's LMTP proxies their mail
    elsewhere (C{lmtp_proxy = yes}); the other users' lines are as
    before.
    """

    def __init__(self, uidlFormat="%08Xu%08Xv", extra="", passdbFields=None):
        super().__init__(variant="default", scheme="PLAIN")
        self.uidlFormat = uidlFormat
        self.extra = extra
        self.passdbFields = {user.lower(): fields for user, fields in (passdbFields or {}).items()}

    def _writePasswd(self):
        super()._writePasswd()
        if not self.passdbFields:
            return
        path = os.path.join(self.directory, "passwd")
        with open(path) as f:
            lines = f.read().splitlines()
        for i, line in enumerate(lines):
            user = line.split(":", 1)[0]
            if user in self.passdbFields:
                # user:password:uid:gid:gecos:home:shell:extra fields
                assert line.count(":") == 7 and line.endswith(":"), "benchmarks/dovecot.py changed its passwd-file"
                lines[i] = line + self.passdbFields[user]
        missing = set(self.passdbFields) - {line.split(":", 1)[0] for line in lines}
        assert not missing, f"passdbFields for users not added: {sorted(missing)}"
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")

    def _writeConfig(self):
        super()._writeConfig()
        with open(self.configPath) as f:
            text = f.read()
        line = "pop3_uidl_format = %08Xu%08Xv\n"
        assert line in text, "benchmarks/dovecot.py changed its configuration"
        text = text.replace(line, f"pop3_uidl_format = {self.uidlFormat}\n{NO_LOGIN_DELAYS}{self.extra}\n")
        with open(self.configPath, "w") as f:
            f.write(text)

    def cleanup(self):
        """
        End the instance at once, SIGKILL to its process group, and remove
        its directory.  A stop by SIGTERM costs a fixed second (at shutdown
        Dovecot's master gives its log process a one-second sleep to
        flush), and nothing is read from the instance once a test cleans
        it up; L{stop}, for a test that starts it again, stays graceful.
        """
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(DEADLINE)
        super().cleanup()

    def own(self, path):
        """
        Give C{path} (and everything under it) to the mail account, as
        Dovecot's own files would be.
        """
        from corpus import chownTree

        chownTree(path, self.uid, self.gid)

    def deliver(self, address, message, sender="sender@example.net"):
        """
        A message into Dovecot's maildir through its LMTP, as an MTA would.
        """
        client = smtplib.LMTP("127.0.0.1", self.lmtpPort, timeout=DEADLINE)
        try:
            client.ehlo("client.test")  # smtplib.LMTP sends LHLO
            refused = client.sendmail(sender, [address], message)
            assert refused == {}, refused
        finally:
            client.quit()

    def pop3(self, address, password):
        """
        A logged-in poplib client.
        """
        client = poplib.POP3("127.0.0.1", self.pop3Port, timeout=DEADLINE)
        client.user(address)
        client.pass_(password)
        return client

    def copyMaildir(self, address, destination):
        """
        A copy of a user's maildir as it is on disk now (before Dovecot
        looks at it again).
        """
        shutil.copytree(self.maildir(address), destination, symlinks=False)
        return str(destination)


def answers(client):
    """
    What a POP3 server answers to UIDL and LIST, line by line, and every
    message as RETR gives it (poplib's lines, dot-stuffing undone).
    """
    uidl = [line.decode() for line in client.uidl()[1]]
    listing = [line.decode() for line in client.list()[1]]
    messages = [b"\r\n".join(client.retr(n)[1]) for n in range(1, len(listing) + 1)]
    return uidl, listing, messages
