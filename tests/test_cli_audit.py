"""
The audit trail of C{mailgate}'s commands (mailgate.cli.audit): the real
installed command, run in a mount namespace of its own (C{unshare -m})
whose /dev is the host's under an overlay, with a Unix datagram socket
of the test's bind-mounted on /dev/log, as a syslog daemon's would be.
The lines are read from that socket as glibc's syslog(3) writes them
(RFC 3164 without a host name), checked for what changed, who ran it
and the facility and severity; no password ever in them.  Without a
/dev/log, with one nobody listens on, and with one whose daemon takes
nothing (its queue full), the command does what it did without the
audit trail, output and exit status alike, and is not held.

It needs root (a mount namespace, an overlay, a bind mount) and
C{unshare}; where they are missing the tests are skipped saying so.  The
host's /dev and /dev/log are never touched.
"""

import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from databasefiles import olderSchema
from mailgate.store.schema import LATEST
from test_importer_faults import ScriptedPOP3, threeMessages

#: syslog(3)'s priorities, as the lines carry them (facility | severity)
AUTHPRIV_NOTICE = (10 << 3) | 5
AUTHPRIV_WARNING = (10 << 3) | 4
MAIL_NOTICE = (2 << 3) | 5
MAIL_WARNING = (2 << 3) | 4

ALICE = "alice@example.org"
BOB = "bob@example.org"
CAROL = "carol@example.org"
PASSWORD = "Audit-Tr0ub4dor-alice"
NEW_PASSWORD = "Audit-new-horse-battery"
CAROL_PASSWORD = "carol-passwd-file-secret"
SOURCE_PASSWORD = "source-pop3-secret-42"
DB_PASSWORD = "S3cret-database-pw"
SECRETS = (PASSWORD, NEW_PASSWORD, CAROL_PASSWORD, SOURCE_PASSWORD, DB_PASSWORD)

#: bounds every run: a command held by syslog would be stopped here
DEADLINE = 60

#: an RFC 3164 line as glibc's syslog(3) sends it to /dev/log
LINE = re.compile(rb"<(\d+)>([A-Z][a-z]{2} [ 1-3][0-9] [0-2][0-9]:[0-5][0-9]:[0-6][0-9]) mailgate\[(\d+)\]: (.*)", re.S)

#: set up /dev in the command's own mount namespace, then run it
NAMESPACE = r"""
set -e
scratch="$1"; socket="$2"; mode="$3"; shift 3
mount -t tmpfs tmpfs "$scratch"
mkdir "$scratch/upper" "$scratch/work"
mount -t overlay overlay -o "lowerdir=/dev,upperdir=$scratch/upper,workdir=$scratch/work" /dev
rm -f /dev/log
if [ "$mode" != none ]; then touch /dev/log; mount --bind "$socket" /dev/log; fi
exec "$@"
"""


def me():
    return pwd.getpwuid(os.getuid()).pw_name


def who(sudo=None):
    """
    The end of a line of a command run by this test's user (C{login_user}
    where the test runs in a login session of another user).
    """
    sudo = f" sudo_user={sudo}" if sudo else ""
    return rf"; by={re.escape(me())}{re.escape(sudo)}(?: login_user=\S+)?"


class Syslog:
    """
    A syslog daemon's /dev/log for the command alone: the test's socket,
    and the command run where it is /dev/log.
    """

    def __init__(self, directory):
        self.directory = directory
        self.path = directory / "log.sock"
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.bind(str(self.path))
        self.socket.setblocking(False)
        self.script = Path(sys.executable).parent / "mailgate"
        self.database = f"sqlite:///{directory / 'mail.sqlite3'}"
        self.runs = 0

    def close(self):
        self.socket.close()

    def run(self, *argv, data=b"", mode="listening", database=None, env=None):
        """
        Run C{mailgate --database ... argv} with C{data} on its standard
        input, in a mount namespace where /dev/log is the test's socket
        (C{mode} C{listening}), is not there (C{none}), or is a socket
        nobody listens on (C{refusing}).
        """
        self.runs += 1
        scratch = self.directory / f"ns{self.runs}"
        scratch.mkdir()
        socketPath = self.path
        if mode == "refusing":
            socketPath = self.directory / f"gone{self.runs}.sock"
            gone = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            gone.bind(str(socketPath))
            gone.close()
        environ = {k: v for k, v in os.environ.items() if k not in ("MAILGATE_DATABASE", "SUDO_USER", "MAILGATE_AUDIT")}
        environ.update(env or {})
        command = [str(self.script), "--database", database or self.database, *argv]
        # unshare and sh exec the command: it runs under the process id
        # started here, which its lines carry.
        process = subprocess.Popen(
            ["unshare", "-m", "sh", "-c", NAMESPACE, "sh", str(scratch), str(socketPath), mode, *command],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=self.directory, env=environ,
        )
        try:
            out, err = process.communicate(data, timeout=DEADLINE)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            raise
        done = subprocess.CompletedProcess(process.args, process.returncode, out, err)
        done.pid = process.pid
        return done

    def lines(self, pid=None):
        """
        The lines sent since last asked, as C{(priority, text)}; each
        checked to be a syslog line of C{pid} (if given) with no secret.
        """
        lines = []
        while True:
            try:
                datagram = self.socket.recv(65536)
            except BlockingIOError:
                return lines
            for secret in SECRETS:
                assert secret.encode() not in datagram, datagram
            match = LINE.fullmatch(datagram)
            assert match, datagram
            if pid is not None:
                assert int(match.group(3)) == pid, datagram
            lines.append((int(match.group(1)), match.group(4).decode()))

    def logged(self, *argv, **kwargs):
        """
        Run the command and return it with the lines it sent.
        """
        done = self.run(*argv, **kwargs)
        for secret in SECRETS:
            assert secret.encode() not in done.stdout + done.stderr
        return done, self.lines(done.pid)


#: what a first run of the command in a namespace said, once a process
#: (it is the same for every test: a run costs 0.3 s of CPU)
_probed = []


@pytest.fixture
def syslog(tmp_path):
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("a private /dev/log needs root and unshare (a mount namespace of its own)")
    script = Path(sys.executable).parent / "mailgate"
    assert script.exists(), f"{script} is missing: run `make install`"
    daemon = Syslog(tmp_path)
    if not _probed:
        _probed.append(daemon.run("--version"))
    [probe] = _probed
    if probe.returncode != 0:
        daemon.close()
        pytest.skip(f"no mount namespace with an overlay on /dev here: {probe.stderr.decode().strip()}")
    yield daemon
    daemon.close()


def setUp(syslog, *argv, data=b""):
    """
    A command that only sets up what a test is about, run in this process
    on the test's database (no namespace, no audit line: only the runs
    of L{Syslog.run} are checked); its password hashed at the suite's
    cheap cost where the test asks for C{cheapCommandHashes}.
    """
    import io

    from mailgate.cli import run

    stdin = io.TextIOWrapper(io.BytesIO(data), encoding="utf-8", newline="")
    out, err = io.StringIO(), io.StringIO()
    code = run(["--database", syslog.database, *argv], stdin=stdin, stdout=out, stderr=err, environ={})
    assert code == 0, (argv, err.getvalue())


def assertLine(lines, priority, pattern):
    """
    C{lines} are one line, of C{priority}, that C{pattern} matches whole.
    """
    assert len(lines) == 1, lines
    [(sent, text)] = lines
    assert (sent, re.fullmatch(pattern, text) is not None) == (priority, True), (sent, text, pattern)


def test_accountChangesGoToAuthprivSayingWhatChangedAndWhoChangedIt(syslog, tmp_path):
    """
    Adding, changing and removing accounts are logged as shadow's useradd,
    passwd and userdel log theirs: to authpriv, one line each, naming the
    command, the address, what was done and who ran it (the Unix user,
    and the one sudo ran it for); never the password.
    """
    sudo = {"SUDO_USER": "operator7"}
    done, lines = syslog.logged("user", "add", ALICE, "--password-stdin", data=f"{PASSWORD}\n".encode(), env=sudo)
    assert (done.returncode, done.stdout) == (0, f"added {ALICE}\n".encode())
    assertLine(lines, AUTHPRIV_NOTICE, rf"admin user add {ALICE}: added{who('operator7')}")

    done, lines = syslog.logged("user", "passwd", ALICE, "--password-stdin", data=f"{NEW_PASSWORD}\n".encode())
    assert done.returncode == 0, done.stderr
    assertLine(lines, AUTHPRIV_NOTICE, rf"admin user passwd {ALICE}: password changed{who()}")

    done, lines = syslog.logged("user", "apop", ALICE, "on", "--password-stdin", data=f"{NEW_PASSWORD}\n".encode())
    assert done.returncode == 0, done.stderr
    assertLine(lines, AUTHPRIV_NOTICE, rf"admin user apop {ALICE} on: APOP enabled{who()}")
    done, lines = syslog.logged("user", "apop", ALICE, "off")
    assert done.returncode == 0, done.stderr
    assertLine(lines, AUTHPRIV_NOTICE, rf"admin user apop {ALICE} off: APOP and CRAM-MD5 disabled{who()}")

    done, lines = syslog.logged("user", "rename", ALICE, BOB)
    assert done.returncode == 0, done.stderr
    assertLine(lines, AUTHPRIV_NOTICE, rf"admin user rename {ALICE} {BOB}: renamed to {BOB}{who()}")

    passwdFile = tmp_path / "passwd"
    passwdFile.write_text(f"{CAROL}:{{PLAIN}}{CAROL_PASSWORD}::::::\n")
    done, lines = syslog.logged("user", "import", str(passwdFile))
    assert done.returncode == 0, done.stderr
    assertLine(lines, AUTHPRIV_NOTICE, rf"admin user import {passwdFile}: 1 added, 0 already there, 0 failed{who()}")

    done, lines = syslog.logged("user", "del", BOB)
    assert done.returncode == 0, done.stderr
    assertLine(lines, AUTHPRIV_NOTICE, rf"admin user del {BOB}: deleted, with their maildrop{who()}")

    # A refusal once at work is a warning, saying why as the command did.
    done, lines = syslog.logged("user", "add", CAROL, "--password-stdin", data=f"{PASSWORD}\n".encode())
    assert (done.returncode, done.stderr) == (73, f"mailgate: user {CAROL} already exists\n".encode())
    assertLine(lines, AUTHPRIV_WARNING, rf"admin user add {CAROL}: failed \(exit 73\): user {CAROL} already exists{who()}")
    done, lines = syslog.logged("user", "apop", CAROL, "on", "--password-stdin", data=f"{PASSWORD}\n".encode())
    assert done.returncode == 65, done.stderr
    assertLine(
        lines, AUTHPRIV_WARNING,
        rf"admin user apop {CAROL} on: failed \(exit 65\): that is not the current password of {CAROL}{who()}",
    )
    # A mistyped address is refused before the command starts: nothing
    # was tried, nothing logged.
    done, lines = syslog.logged("user", "del", "carol@@example.org")
    assert (done.returncode, lines) == (65, [])


def test_mailboxesBansSessionsAndDatabaseChangesGoToTheMailFacility(syslog, tmp_path, cheapCommandHashes):
    """
    Quotas, retention, mail removed, restored and imported, bans, kicked
    sessions and database upgrades, copies and backups: to the mail
    facility, beside the server's lines, as postsuper logs its deletions.
    """
    setUp(syslog, "user", "add", ALICE, "--password-stdin", data=f"{PASSWORD}\n".encode())
    syslog.lines()
    expected = [
        (("user", "quota", ALICE, "1G", "--messages", "100"), rf"admin user quota {ALICE}: quota set to 1G, messages: 100"),
        (("user", "expire", ALICE, "30"), rf"admin user expire {ALICE}: messages expire after: 30 days"),
        (("user", "recount", "--all"), r"admin user recount --all: recounted 1 user; the use kept for 0 was wrong"),
        (("import", "forget", ALICE), rf"admin import forget {ALICE}: forgot 0 imported unique ids"),
        (("ban", "add", "192.0.2.7", "--for", "600"), r"admin ban add 192\.0\.2\.7: banned until \d{4}-\d\d-\d\dT[\d:]{8}Z"),
        (("ban", "del", "192.0.2.7"), r"admin ban del 192\.0\.2\.7: ban lifted, its failed logins and unknown recipients forgotten"),
    ]
    for argv, pattern in expected:
        done, lines = syslog.logged(*argv)
        assert done.returncode == 0, (argv, done.stderr)
        assertLine(lines, MAIL_NOTICE, pattern + who())

    # The MTA's deliveries are its log's (one run a message); an
    # administrator giving mail back with --again is audited.
    message = b"Subject: audited\n\nnot in any log line\n"
    done, lines = syslog.logged("deliver", ALICE, data=message)
    assert (done.returncode, lines) == (0, [])
    done, lines = syslog.logged("deliver", "--again", ALICE, data=message)
    assert done.returncode == 0, done.stderr
    uid = done.stdout.decode().split()[-1]
    assertLine(lines, MAIL_NOTICE, rf"admin deliver --again {ALICE}: delivered to {ALICE} as {uid}{who()}")
    assert "audited" not in lines[0][1]

    maildir = tmp_path / "Maildir"
    for part in ("cur", "new", "tmp"):
        (maildir / part).mkdir(parents=True)
    (maildir / "new" / "1700000000.M1P1.old:2,").write_bytes(b"Subject: old\n\nold mail\n")
    done, lines = syslog.logged("import", "maildir", str(maildir), ALICE)
    assert done.returncode == 0, done.stderr
    assertLine(
        lines, MAIL_NOTICE,
        rf"admin import maildir {maildir} {ALICE}: 1 message imported \(\d+ octets\), 0 skipped as already present"
        + who(),
    )

    done, lines = syslog.logged("mailbox", "expunge", ALICE, "--all")
    assert done.returncode == 0, done.stderr
    assertLine(
        lines, MAIL_NOTICE,
        rf"admin mailbox expunge {ALICE}: removed 3 messages \(every message\) and 0 kept deleted messages{who()}",
    )
    done, lines = syslog.logged("mailbox", "restore", ALICE, "no-such-uidl")
    assert done.returncode == 65, done.stderr
    assertLine(
        lines, MAIL_WARNING,
        rf"admin mailbox restore {ALICE}: 0 messages restored; failed \(exit 65\): not among {ALICE}'s kept "
        rf"deleted messages: no-such-uidl{who()}",
    )
    done, lines = syslog.logged("kick", ALICE, "--wait", "0")
    assert done.returncode == 1, done.stderr
    assertLine(lines, MAIL_WARNING, rf"admin kick {ALICE}: failed \(exit 1\): {ALICE} has no POP3 session in progress{who()}")

    database = re.escape(syslog.database)
    done, lines = syslog.logged("db", "upgrade")
    assert done.returncode == 0, done.stderr
    assertLine(lines, MAIL_NOTICE, rf"admin db upgrade {database}: nothing to apply; schema is at version \d+{who()}")
    backup = tmp_path / "backup.sqlite3"
    done, lines = syslog.logged("db", "backup", str(backup))
    assert done.returncode == 0, done.stderr
    assertLine(lines, MAIL_NOTICE, rf"admin db backup {database}: backed up to {backup} \(\d+ octets\){who()}")
    copy = f"sqlite:///{tmp_path / 'copy.sqlite3'}"
    done, lines = syslog.logged("db", "copy", "--from", syslog.database, "--to", copy)
    assert done.returncode == 0, done.stderr
    assertLine(
        lines, MAIL_NOTICE, rf"admin db copy --from {database} --to {re.escape(copy)}: copied 1 user, 0 messages{who()}"
    )
    # A database URL's password is never in a line: here the one of a
    # PostgreSQL server that is not there.
    target = f"postgresql://mailgate:{DB_PASSWORD}@127.0.0.1:1/mail"
    done, lines = syslog.logged("db", "copy", "--from", syslog.database, "--to", target)
    assert done.returncode in (75, 78), done.stderr
    assert len(lines) == 1 and lines[0][0] == MAIL_WARNING, lines
    assert lines[0][1].startswith(
        f"admin db copy --from {syslog.database} --to postgresql://mailgate:***@127.0.0.1:1/mail: failed (exit "
    ), lines


def test_commandsThatChangeNothingLogNothing(syslog, tmp_path, cheapCommandHashes):
    """
    Listing, showing, checking and testing a password change nothing, and
    log nothing (as the server's log has its reads, if anything).
    """
    setUp(syslog, "user", "add", ALICE, "--password-stdin", data=f"{PASSWORD}\n".encode())
    setUp(syslog, "deliver", ALICE, data=b"Subject: x\n\nbody\n")
    syslog.lines()
    for argv, data in [
        (("user", "list"), b""),
        (("user", "test", ALICE, "--password-stdin"), f"{PASSWORD}\n".encode()),
        (("mailbox", "list", ALICE), b""),
        (("mailbox", "show", ALICE, "1"), b""),
        (("mailbox", "deleted", ALICE), b""),
        (("who",), b""),
        (("nodes",), b""),
        (("ban", "list"), b""),
        (("db", "version"), b""),
        (("db", "check"), b""),
        (("config",), b""),
    ]:
        done, lines = syslog.logged(*argv, data=data)
        assert (done.returncode, lines) == (0, []), (argv, done.stderr)
    # Heard where a command changes something.
    done, lines = syslog.logged("user", "del", ALICE)
    assert done.returncode == 0, done.stderr
    assertLine(lines, AUTHPRIV_NOTICE, rf"admin user del {ALICE}: deleted, with their maildrop{who()}")


class EchoingPOP3(ScriptedPOP3):
    """
    A POP3 source that refuses C{PASS} quoting what it was given, as some
    servers' errors quote what they refused: the command says it on
    standard error, but its audit line never does.
    """

    def _answer(self, verb, argument, marked):
        if verb == "PASS":
            return f"-ERR [AUTH] authentication failed for password {argument}\r\n".encode()
        return super()._answer(verb, argument, marked)


def test_importFromPOP3NamesTheSourceNeverItsPassword(syslog, tmp_path, cheapCommandHashes):
    setUp(syslog, "user", "add", ALICE, "--password-stdin", data=f"{PASSWORD}\n".encode())
    syslog.lines()
    source = ScriptedPOP3(threeMessages())
    echoing = EchoingPOP3(threeMessages())
    try:
        done, lines = syslog.logged(
            "import", "pop3", source.url, ALICE, "--password-stdin", data=f"{SOURCE_PASSWORD}\n".encode()
        )
        assert done.returncode == 0, done.stderr
        assertLine(
            lines, MAIL_NOTICE,
            rf"admin import pop3 {re.escape(source.url)} {ALICE}: 3 messages imported \(\d+ octets\), 0 skipped as "
            rf"already present{who()}",
        )

        # The source's refusal quotes the password: on standard error, as
        # before; blanked in the line.
        refused = syslog.run("import", "pop3", echoing.url, ALICE, "--password-stdin",
                             data=f"{SOURCE_PASSWORD}\n".encode())
        assert refused.returncode == 69, refused.stderr
        assert SOURCE_PASSWORD.encode() in refused.stderr
        lines = syslog.lines(refused.pid)
        assert len(lines) == 1 and lines[0][0] == MAIL_WARNING, lines
        assert lines[0][1].startswith(f"admin import pop3 {echoing.url} {ALICE}: failed (exit 69): "), lines
        assert "authentication failed for password ***" in lines[0][1], lines

        # Many users, from a file of passwords.
        users = tmp_path / "users"
        users.write_text(f"{ALICE} {SOURCE_PASSWORD}\n")
        done = syslog.run("import", "pop3", f"pop3://127.0.0.1:{echoing.port}", "--users", str(users))
        assert done.returncode == 65, done.stderr
        lines = syslog.lines(done.pid)
        assert len(lines) == 1 and lines[0][0] == MAIL_WARNING, lines
        assert lines[0][1].startswith(
            f"admin import pop3 pop3://127.0.0.1:{echoing.port} --users {users}: 1 user: 0 messages imported"
        ), lines

        # A password in the URL is refused before anything is done: not
        # logged, not said.
        url = f"pop3://alice:{SOURCE_PASSWORD}@127.0.0.1:{source.port}"
        done, lines = syslog.logged("import", "pop3", url, ALICE)
        assert (done.returncode, lines) == (64, [])
    finally:
        source.stop()
        echoing.stop()


def test_aPasswordThatIsAWordOfTheLineIsNotShownByItsBlanking(syslog):
    """
    A password is blanked only in what a failing command said, which may
    quote it: a *** in the target or outcome, in place of the address's
    local part, a domain's label or "changed", would say the password is
    that word.
    """
    done, lines = syslog.logged("user", "add", ALICE, "--password-stdin", data=b"alice\n")
    assert done.returncode == 0, done.stderr
    assertLine(lines, AUTHPRIV_NOTICE, rf"admin user add {ALICE}: added{who()}")
    for password in (b"changed", b"example"):
        done, lines = syslog.logged("user", "passwd", ALICE, "--password-stdin", data=password + b"\n")
        assert done.returncode == 0, done.stderr
        assertLine(lines, AUTHPRIV_NOTICE, rf"admin user passwd {ALICE}: password changed{who()}")


def test_aLongNonUTF8PathIsCutBeforeWhoRanTheCommand(syslog, tmp_path, cheapCommandHashes):
    """
    A maildir's path of octets that are not UTF-8 and of control
    characters is written printable on one line (C{\\xNN}, C{?}), and a
    long one is cut to at most MAX_LINE octets in all, keeping who ran the
    command: each such octet takes four once written, and a line longer
    than the syslog daemon takes would lose its end.
    """
    setUp(syslog, "user", "add", ALICE, "--password-stdin", data=f"{PASSWORD}\n".encode())
    syslog.lines()
    maildir = os.fsencode(str(tmp_path)) + b"/forged\n<13>Dec  6 10:00:00 sshd[1]: x"
    for _ in range(14):
        maildir += b"/" + b"\xe9" * 200 + b"\x1b[31m"
    for sub in (b"cur", b"new", b"tmp"):
        os.makedirs(maildir + b"/" + sub)
    done, lines = syslog.logged("import", "maildir", os.fsdecode(maildir), ALICE)
    assert done.returncode == 0, done.stderr
    assert len(lines) == 1 and lines[0][0] == MAIL_NOTICE, lines
    text = lines[0][1]
    assert len(text.encode()) <= 4000, len(text.encode())
    assert re.fullmatch(rf"admin import maildir {re.escape(str(tmp_path))}/forged\?<13>Dec  6 10:00:00 sshd\[1\]: "
                        rf"x/(\\xe9)+\?\[31m/.*\.\.\.{who()}", text), text


def test_aSchemaUpgradeMadeByAnotherCommandIsLogged(syslog):
    """
    Every command but db backup and db version upgrades the schema of
    the database it opens, after which an older mailgate no longer uses
    it: a read-only command that did (user list) sends a line saying so,
    as db upgrade would have; one finding it up to date sends none.
    """
    olderSchema(syslog.database)
    done, lines = syslog.logged("user", "list")
    assert done.returncode == 0, done.stderr
    assertLine(
        lines, MAIL_NOTICE,
        rf"admin db upgrade {re.escape(syslog.database)}: applied migration {LATEST} as the database was opened "
        rf"by another command{who()}",
    )
    done, lines = syslog.logged("user", "list")
    assert (done.returncode, lines) == (0, [])


def scenario(syslog, database, mode, env=None):
    """
    A few commands on C{database}: what they said and their exit
    statuses.
    """
    said = []
    for argv, data in [
        (("user", "add", ALICE, "--password-stdin"), f"{PASSWORD}\n".encode()),
        (("user", "add", ALICE, "--password-stdin"), f"{PASSWORD}\n".encode()),
        (("user", "quota", ALICE, "10M"), b""),
        (("mailbox", "expunge", ALICE, "--all"), b""),
        (("user", "del", ALICE), b""),
        (("user", "del", ALICE), b""),
    ]:
        done = syslog.run(*argv, data=data, mode=mode, database=database, env=env)
        said.append((done.returncode, done.stdout, done.stderr))
    return said


def test_withoutASyslogDaemonCommandsDoAsBefore(syslog, tmp_path):
    """
    No /dev/log (no syslog daemon), or one nobody listens on: the same
    output and exit statuses as with one, and no line anywhere;
    C{MAILGATE_AUDIT=off} sends none.
    """
    heard = scenario(syslog, f"sqlite:///{tmp_path / 'heard.sqlite3'}", "listening")
    assert [code for code, _, _ in heard] == [0, 73, 0, 0, 0, 67]
    assert len(syslog.lines()) == 6
    for mode in ("none", "refusing"):
        assert scenario(syslog, f"sqlite:///{tmp_path / (mode + '.sqlite3')}", mode) == heard, mode
    off = scenario(syslog, f"sqlite:///{tmp_path / 'off.sqlite3'}", "listening", env={"MAILGATE_AUDIT": "off"})
    assert off == heard
    assert syslog.lines() == []


def test_aSyslogDaemonThatTakesNothingDoesNotHoldTheCommand(syslog):
    """
    A syslog daemon that takes nothing (stuck: its socket's queue full):
    glibc's syslog(3) would wait for it for ever, and the command with it.
    The line waits a moment and is dropped; the command does as it
    would; once the daemon reads again, the next command's line is there.
    """
    filler = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    filler.setblocking(False)
    filler.connect(str(syslog.path))
    queued = 0
    try:
        while True:
            filler.send(b"<13>Dec  6 17:00:00 filler[1]: queued")
            queued += 1
    except BlockingIOError:
        pass
    finally:
        filler.close()
    assert queued > 0
    done = syslog.run("user", "add", ALICE, "--password-stdin", data=f"{PASSWORD}\n".encode())
    assert (done.returncode, done.stdout, done.stderr) == (0, f"added {ALICE}\n".encode(), b"")
    drained = []
    while True:
        try:
            drained.append(syslog.socket.recv(65536))
        except BlockingIOError:
            break
    assert drained == [b"<13>Dec  6 17:00:00 filler[1]: queued"] * queued
    done, lines = syslog.logged("user", "del", ALICE)
    assert done.returncode == 0, done.stderr
    assertLine(lines, AUTHPRIV_NOTICE, rf"admin user del {ALICE}: deleted, with their maildrop{who()}")
