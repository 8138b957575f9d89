"""
The POP3 clients administrators' users run, against a real C{twistd
mailgate}: mpop (GnuTLS, GNU SASL), getmail6, curl and fetchmail
(OpenSSL), as Debian 12 ships them (tests/sysdeps.sh installs all of
them; test_dovecot_migration.py and test_e2e_policy.py have more of
fetchmail).  fetchmail also hands what it fetched to an SMTP or LMTP
server, as administrators moving users off an old POP3 server have it
deliver into mailgate's LMTP.

What a user of each must see:

  - it logs in over plain TCP, STLS and implicit TLS (POP3S) where it can,
    verifying the test's certificate, with the mechanism it picks by itself
    and with each one it can be told to use;
  - what it stores is what was delivered, octet for octet apart from the
    header fields it adds itself (and the LF line ends it writes): lines
    starting with ".", a line of a single ".", a message without a final
    line end, 8-bit octets, a message of a few MB;
  - keeping mail on the server, a second run fetches nothing, and a third
    run only the message that arrived meanwhile;
  - deleting after retrieval, nothing goes before QUIT: a client killed in
    the middle of a run leaves every message in place, and its next run
    gets each of them exactly once;
  - a wrong password is reported as such and does not get the client's
    address banned, nor does a maildrop another session holds, which the
    client reports as in use.

Clients deliver through an MDA (L{MDA}): a small script that writes each
message to a file of its own, and on request stops in the middle of one
(the client then blocks writing to it, mid-retrieval).

The tests that only run clients against a server share one per set of
options (tests/sharedserver.py, L{serveShared}), each with users of its
own; those that need an option, the ban counting or the CRAM-MD5 offer of
their own start their own (L{serve}).
"""

import collections
import fcntl
import os
import re
import shlex
import shutil
import signal
import smtplib
import select
import struct
import subprocess
import sys
import termios
import time
from urllib.parse import quote

import pytest

from certs import makeCertificate, makeChain
from e2e import (  # noqa: F401 (mailgate_server is a fixture)
    DEADLINE,
    childEnvironment,
    mailgate_cli,
    mailgate_server,
    popLogin,
    retrieve,
    sqliteOnly,
    waitFor,
)
from sharedserver import shared, sharedBackend, sharedServers, sqliteOnlyShared  # noqa: F401 (fixtures)
from mailgate.testing import deliver, memoryStore


MPOP = shutil.which("mpop")
GETMAIL = shutil.which("getmail")
CURL = shutil.which("curl")
FETCHMAIL = shutil.which("fetchmail")
NEOMUTT = shutil.which("neomutt")
SNAIL = shutil.which("s-nail")


def requires(binary, name, package):
    return pytest.mark.skipif(
        binary is None, reason=f"{name} is not installed (Debian package {package}; tests/sysdeps.sh installs it)"
    )


requiresMpop = requires(MPOP, "mpop", "mpop")
requiresGetmail = requires(GETMAIL, "getmail", "getmail6")
requiresCurl = requires(CURL, "curl", "curl")
requiresFetchmail = requires(FETCHMAIL, "fetchmail", "fetchmail")
requiresNeomutt = requires(NEOMUTT, "neomutt", "neomutt")
requiresSnail = requires(SNAIL, "s-nail", "s-nail")

ALICE = "alice@example.org"
ALICE_PW = "wonder land"  # a space: PASS takes the rest of the line
BOB = "bob@example.org"  # has APOP (and CRAM-MD5 where it is offered)
BOB_PW = "b0b's secret"
CAROL = "carol@example.org"
WRONG = "not the password"
LOOPBACK_TCP = "tcp:0:interface=127.0.0.1"
FAST_FAILURES = ("--auth-failure-delay", "0.05")
# Bans as an exposed server has them, loopback included: a second failed
# login within the window bans the address.
STRICT = ("--exempt-network", "none", "--ban-after", "2", "--auth-penalty-max", "0")


# -- what is delivered --------------------------------------------------------


def bigMessage():
    """
    A message of about 3.5 MB in lines of 64 octets, its header too, so
    that the server's 128 KiB chunks start at line starts: the lines
    there start with ".", as do others now and then, where the clients'
    buffers may end.
    """
    header = b"From: <sender@example.net>\r\n" + b"Subject: big".ljust(32) + b"\r\n\r\n"
    assert len(header) == 64
    chunkLines = 128 * 1024 // 64

    def line(n):
        text = b"line %06d of a big message, with a dot now and then" % n
        dotted = n % chunkLines == chunkLines - 1 or n % 97 == 0
        return (b"." + text if dotted else text).ljust(62) + b"\r\n"

    return header + b"".join(line(n) for n in range(56000)) + b".\r\n..\r\nlast\r\n"


def awkwardMessages():
    """
    What a maildrop holds that is awkward to serve, in delivery order (the
    big one in the middle).
    """
    return [
        b"From: <sender@example.net>\r\nSubject: plain\r\n\r\nhello\r\n",
        b"From: <sender@example.net>\r\nSubject: dots\r\n\r\n.leading dot\r\n.\r\n..two\r\n. \r\nend\r\n",
        bigMessage(),
        b"From: <sender@example.net>\r\nSubject: unterminated\r\n\r\nfirst line\r\nlast line, no line end",
        b"From: <sender@example.net>\r\nSubject: 8-bit caf\xc3\xa9 \xe2\x82\xac\r\nContent-Type: text/plain; charset=iso-8859-1\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n\r\n\xe9t\xe9 \xe0 la plage \xff\xfe\x80\r\n",
    ]


def asServed(delivered):
    """
    A delivered message as POP3 serves it: a final line end added if it
    had none.
    """
    return delivered if delivered.endswith(b"\r\n") else delivered + b"\r\n"


def deliverAll(cli, address, messages):
    """
    Deliver C{messages} to C{address}, in order, through a store opened in
    this process on the server's database: C{mailgate deliver} would cost
    a process start for each (a second on a loaded machine for the five
    of L{awkwardMessages}).
    """
    store = memoryStore(cli.database)
    try:
        for message in messages:
            deliver(store, [address], message)
    finally:
        store.close()


def sendBySMTP(server, address, message):
    """
    Send C{message} to C{address} through the server's SMTP listener.
    """
    with smtplib.SMTP("127.0.0.1", server.portOf("SMTP"), local_hostname="client.test", timeout=DEADLINE) as smtp:
        smtp.sendmail("sender@example.net", [address], message)


# -- what a client stored -------------------------------------------------------

MDA = r'''
"""
An MDA for the tests: each message on stdin becomes a file msg.* in the
directory given.  While a file named "block" exists there, a message whose
first 4 KiB name "Subject: big" is not read further: the script creates
"blocked" and waits to be killed (at most a minute).
"""
import os, sys, tempfile, time
out = sys.argv[1]
head = sys.stdin.buffer.read(4096)
if b"Subject: big" in head and os.path.exists(os.path.join(out, "block")):
    open(os.path.join(out, "blocked"), "w").close()
    time.sleep(60)
    sys.exit(75)
data = head + sys.stdin.buffer.read()
fd, path = tempfile.mkstemp(dir=out, prefix="tmp.")
os.write(fd, data)
os.fsync(fd)
os.close(fd)
os.rename(path, path.replace("tmp.", "msg."))
'''


class Mailbox:
    """
    The directory a client's MDA writes to, and what it wrote.
    """

    def __init__(self, directory):
        self.directory = directory
        directory.mkdir()
        self.script = directory.parent / f"{directory.name}-mda.py"
        self.script.write_text(MDA)
        self.seen = set()

    @property
    def command(self):
        return [sys.executable, str(self.script), str(self.directory)]

    def new(self):
        """
        The messages stored since the last call, as the client wrote them.
        """
        names = sorted(n for n in os.listdir(self.directory) if n.startswith("msg.") and n not in self.seen)
        self.seen.update(names)
        return [(self.directory / n).read_bytes() for n in names]

    def block(self):
        (self.directory / "block").touch()

    def unblock(self):
        (self.directory / "block").unlink()

    def blocked(self):
        return (self.directory / "blocked").exists()


def withoutAddedFields(stored, names):
    """
    C{stored} as the server sent it: the header fields the client put on
    top (C{names}, in that order, each with its continuation lines) taken
    off, and the LF line ends it wrote back to CRLF.  Fails if the client
    did not add exactly those.
    """
    for name in names:
        match = re.match(rb"%s:[^\n]*\n(?:[ \t][^\n]*\n)*" % name.encode(), stored, re.I)
        assert match, f"the client did not add {name}: {stored[:300]!r}"
        stored = stored[match.end():]
    assert b"\r" not in stored, stored[:300]
    return stored.replace(b"\n", b"\r\n")


def assertStoredExactly(stored, delivered, names):
    """
    Every delivered message was stored exactly once, octet for octet
    (apart from the client's own fields and line ends), in any order.
    """
    got = collections.Counter(withoutAddedFields(s, names) for s in stored)
    want = collections.Counter(asServed(d) for d in delivered)
    if got != want:
        def summary(counter):
            return sorted((m[:60], len(m), n) for m, n in counter.items())

        pytest.fail(f"stored {summary(got)}\ndelivered {summary(want)}")


# -- the server ---------------------------------------------------------------------


@pytest.fixture
def certificate(tmp_path):
    """
    A self-signed certificate for "localhost" and 127.0.0.1, the trust
    anchor every client is given: C{(certificatePath, keyPath)}.
    """
    directory = tmp_path / "tls"
    directory.mkdir()
    return makeCertificate(directory, "localhost", name="server")


@pytest.fixture
def serve(mailgate_server, mailgate_cli, certificate):
    """
    C{serve(*options)}: a server with Alice (USER/PASS, SASL) and Bob (APOP
    enabled), the certificate, POP3 (with STLS), POP3S and SMTP.
    """
    mailgate_cli.addUser(ALICE, ALICE_PW)
    mailgate_cli.addUser(BOB, BOB_PW, apop=True)

    def start(*options):
        certificatePath, keyPath = certificate
        return mailgate_server(
            "--tls-cert", str(certificatePath), "--tls-key", str(keyPath),
            "--pop3s", LOOPBACK_TCP, "--smtp", LOOPBACK_TCP, "--domain", "example.org",
            *FAST_FAILURES, *options,
        )

    return start


@pytest.fixture(scope="module")
def moduleCertificate(tmp_path_factory):
    """
    The certificate of the module's shared servers (tests/sharedserver.py),
    made as L{certificate} is.
    """
    return makeCertificate(tmp_path_factory.mktemp("tls"), "localhost", name="server")


def withAnAPOPUser(cli):
    """
    A user with APOP in a shared server's database before it starts: as on
    the servers L{serve} starts, with Bob in it already, greetings carry an
    APOP timestamp from the first connection on.
    """
    cli.addUser("apop-user@example.org", "apop secret", apop=True)


@pytest.fixture
def serveShared(shared, moduleCertificate):
    """
    C{serveShared(*options)}: the module's server started as L{serve} starts
    one, shared by the tests that only run clients against it (one for each
    set of options; tests/sharedserver.py), and users of the test's own as
    L{serve}'s Alice and Bob: C{(server, admin command, alice, bob)}.  The
    tests that import CRAM-MD5 states (which make the server offer
    CRAM-MD5 to all), count failures towards bans, or need an option of
    their own keep a server of their own (L{serve}).
    """

    def start(*options):
        certificatePath, keyPath = moduleCertificate
        server = shared(
            "--tls-cert", str(certificatePath), "--tls-key", str(keyPath),
            "--pop3s", LOOPBACK_TCP, "--smtp", LOOPBACK_TCP, "--domain", "example.org",
            *FAST_FAILURES, *options, prepare=withAnAPOPUser,
        )
        cli = shared.cli(server)
        alice, bob = shared.address("alice"), shared.address("bob")
        cli.addUser(alice, ALICE_PW)
        cli.addUser(bob, BOB_PW, apop=True)
        return server, cli, alice, bob

    return start


def loginMechanisms(server, address, count):
    """
    The mechanism of each login of C{address} the server logged, in order,
    once at least C{count} are there: the server logs a login before it
    answers it, but a thread of the test's reads its output, and on a
    loaded machine the line can reach the test after the client is done.
    """
    pattern = rf"pop3 login user={re.escape(address)} peer=\S+ mechanism=(\S+)"

    def logged():
        found = re.findall(pattern, server.stdout)
        return found if len(found) >= count else None

    return waitFor(logged, f"{count} logins of {address} in the server's log")


def banList(cli):
    return cli.check("ban", "list").splitlines()[1:]


# -- the clients ---------------------------------------------------------------------


class Client:
    """
    One client program, its files in a directory of its own.

    @cvar added: the header fields it adds on top of each message it stores.
    """

    added = ()
    #: whether it sends DELE for each message once stored (else all at the end)
    marksAsItGoes = False
    #: whether it takes a message's Return-Path field for the envelope
    #: sender and writes it back above the fields it adds
    movesReturnPath = False
    #: whether it writes the message's Delivered-To above its own fields
    #: too (fetchmail, which reads it for the envelope recipient)
    movesDeliveredTo = False

    def __init__(self, directory, server, certificate, user=ALICE):
        self.directory = directory
        directory.mkdir()
        self.server = server
        #: the user it logs in as unless told another
        self.user = user
        self.trust = str(certificate[0])
        self.mailbox = Mailbox(directory / "mail")
        self.running = None

    def portFor(self, transport):
        return self.server.portOf("POP3S") if transport == "pop3s" else self.server.port

    def run(self, **settings):
        """
        Run the client once to its end; return (exit status, its output).
        """
        argv = self.argv(**settings)
        try:
            done = subprocess.run(argv, capture_output=True, timeout=DEADLINE * 2, env=self.environment())
        except subprocess.TimeoutExpired as e:
            pytest.fail(f"{argv} did not finish within {DEADLINE * 2} s\n{e.stdout!r}\n{e.stderr!r}")
        return done.returncode, (done.stdout + done.stderr).decode("utf-8", "replace")

    def fetch(self, **settings):
        """
        Run the client, which must succeed; return what it stored.
        """
        code, output = self.run(**settings)
        assert code == 0, f"{self.name} {settings} exited {code}\n{output}\n{self.server.log()}"
        return self.mailbox.new()

    def start(self, **settings):
        """
        Start the client in a process group of its own, not waiting.
        """
        self.running = subprocess.Popen(
            self.argv(**settings), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env=self.environment(), start_new_session=True,
        )
        return self.running

    def kill(self):
        """
        SIGKILL the started client and everything it started (its MDA).
        """
        os.killpg(self.running.pid, signal.SIGKILL)
        self.running.wait(DEADLINE)

    def environment(self):
        return dict(childEnvironment(), HOME=str(self.directory))


class Mpop(Client):
    """
    mpop: STLS or POP3S with GnuTLS; keeps the unique ids of the mail it
    left on the server in a file; adds a Received field.
    """

    name = "mpop"
    added = ("Received",)

    def argv(self, transport="stls", auth="on", user=None, password=ALICE_PW, keep=True):
        user = user or self.user
        config = self.directory / "mpoprc"
        config.write_text(
            "account default\n"
            "host 127.0.0.1\n"
            f"port {self.portFor(transport)}\n"
            f"tls {'off' if transport == 'plain' else 'on'}\n"
            f"tls_starttls {'on' if transport == 'stls' else 'off'}\n"
            f"tls_trust_file {self.trust}\n"
            f"auth {auth}\n"
            f"user {user}\n"
            f'password "{password}"\n'
            f"keep {'on' if keep else 'off'}\n"
            f"uidls_file {self.directory / 'uidls'}\n"
            f"delivery mda \"{' '.join(self.mailbox.command)}\"\n"
        )
        config.chmod(0o600)
        return [MPOP, "-C", str(config), "--half-quiet"]


class Getmail(Client):
    """
    getmail6: plain POP3 or POP3S (it has no STLS), USER/PASS or APOP; keeps
    the unique ids it saw in its getmail directory; adds Return-Path,
    Delivered-To and Received fields.
    """

    name = "getmail"
    added = ("Return-Path", "Delivered-To", "Received")
    marksAsItGoes = True

    def argv(self, transport="pop3s", auth="user", user=None, password=ALICE_PW, keep=True):
        user = user or self.user
        retriever = "SimplePOP3SSLRetriever" if transport == "pop3s" else "SimplePOP3Retriever"
        config = self.directory / "getmailrc"
        script, *arguments = self.mailbox.command
        config.write_text(
            "[retriever]\n"
            f"type = {retriever}\n"
            "server = 127.0.0.1\n"
            f"port = {self.portFor(transport)}\n"
            f"username = {user}\n"
            f"password = {password}\n"
            f"use_apop = {auth == 'apop'}\n"
            + (f"ca_certs = {self.trust}\n" if transport == "pop3s" else "")
            + "\n[destination]\n"
            "type = MDA_external\n"
            f"path = {script}\n"
            f"arguments = {tuple(arguments)!r}\n"
            # The suite may run as root, which getmail refuses by default.
            "allow_root_commands = true\n"
            "\n[options]\n"
            "read_all = false\n"
            f"delete = {not keep}\n"
        )
        return [GETMAIL, "--getmaildir", str(self.directory), "--rcfile", "getmailrc"]


class Curl(Client):
    """
    curl: one command per run (RETR of the message the URL names, LIST
    without one, or the command -X gives), writing what it fetched on
    standard output as the server sent it, CRLF line ends included.
    """

    name = "curl"

    def argv(self, transport="stls", auth="PLAIN", user=None, password=ALICE_PW, path="/", options=()):
        user = user or self.user
        scheme = "pop3s" if transport == "pop3s" else "pop3"
        argv = [CURL, "--silent", "--show-error", "--verbose", "--max-time", str(int(DEADLINE))]
        argv += ["--cacert", self.trust, "--user", f"{user}:{password}"]
        if transport == "stls":
            argv.append("--ssl-reqd")
        if auth is not None:
            argv += ["--login-options", f"AUTH={auth}"]
        return argv + list(options) + [f"{scheme}://127.0.0.1:{self.portFor(transport)}{path}"]

    def get(self, **settings):
        """
        Run curl, which must succeed; return its standard output.
        """
        argv = self.argv(**settings)
        done = subprocess.run(argv, capture_output=True, timeout=DEADLINE * 2, env=self.environment())
        assert done.returncode == 0, f"{argv} exited {done.returncode}\n{done.stderr.decode()}"
        return done.stdout


class Fetchmail(Client):
    """
    fetchmail: plain POP3, STLS or POP3S with OpenSSL, checking the
    certificate (sslcertck) against the CA file it is given and the name
    it polls, "localhost": it matches DNS names only, not an IP address;
    with keep and uidl it keeps the unique ids it saw in its ids file.
    It retrieves with TOP n 99999999 rather than RETR, sends DELE for each
    message once delivered, and exits with 1 when there was nothing to
    fetch.  It adds a Received field on top of each message, and writes
    the message's Return-Path above it.

    C{deliver} gives the rc file's delivery line (C{smtphost ... lmtp});
    by default it delivers to the test's MDA.  C{options} are more of the
    user's options.
    """

    name = "fetchmail"
    added = ("Received",)
    marksAsItGoes = True
    movesReturnPath = True
    movesDeliveredTo = True

    def argv(self, transport="stls", auth="any", user=None, password=ALICE_PW, keep=True, deliver=None, options=""):
        user = user or self.user
        # fetchmail's own default is auth any: CRAM-MD5 when offered, else
        # USER/PASS; APOP is a protocol of its own to it.
        protocol = "APOP" if auth == "apop" else f"POP3 auth {auth}"
        tls = {
            "plain": 'sslproto ""',
            "stls": f"sslproto tls1.2+ sslcertck sslcertfile {quoted(self.trust)}",
            "pop3s": f"ssl sslcertck sslcertfile {quoted(self.trust)}",
        }[transport]
        if deliver is None:
            deliver = f"mda {quoted(shlex.join(self.mailbox.command))}"
        config = self.directory / "fetchmailrc"
        config.write_text(
            "set no syslog\n"
            f"poll localhost with proto {protocol} port {self.portFor(transport)} uidl\n"
            f"  user {quoted(user)} there with password {quoted(password)} is root here\n"
            f"  {'keep' if keep else 'nokeep'} {tls} {options}\n"
            f"  {deliver}\n"
        )
        config.chmod(0o600)
        # Its lock file in its directory: as root it would take
        # /var/run/fetchmail.pid, and refuse to run beside any other.
        return [
            FETCHMAIL, "-f", str(config), "-i", str(self.directory / "fetchids"),
            "--pidfile", str(self.directory / "fetchmail.pid"), "--nodetach",
        ]

    def fetch(self, **settings):
        """
        Run fetchmail, which must succeed: exit with 0 having stored
        something, or with 1 (no mail) having stored nothing.
        """
        code, output = self.run(**settings)
        stored = self.mailbox.new()
        assert code == (0 if stored else 1), f"fetchmail {settings} exited {code}\n{output}\n{self.server.log()}"
        return stored


def quoted(text):
    """
    C{text} as a string of a fetchmail rc file.
    """
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


CLIENTS = [
    pytest.param(Mpop, marks=requiresMpop, id="mpop"),
    pytest.param(Getmail, marks=requiresGetmail, id="getmail"),
    pytest.param(Fetchmail, marks=requiresFetchmail, id="fetchmail"),
]


@pytest.fixture
def makeClient(tmp_path, certificate):
    """
    C{makeClient(Class, server)}: a client in a directory of its own; any
    still running when the test ends is killed.  It logs in as Alice, or
    as C{user=}, and trusts the certificate, or C{trust=}'s (a shared
    server's).
    """
    made = []

    def make(cls, server, user=ALICE, trust=None):
        client = cls(tmp_path / f"{cls.name}-{len(made)}", server, trust or certificate, user)
        made.append(client)
        return client

    yield make
    for client in made:
        if client.running is not None and client.running.poll() is None:
            client.kill()


# -- 1. transports and mechanisms ------------------------------------------------------


@sqliteOnlyShared
@requiresMpop
def test_mpopOverEveryTransportWithEveryMechanism(serveShared, makeClient, moduleCertificate):
    """
    mpop logs in over plain TCP, STLS and POP3S, verifying the certificate:
    by itself it picks PLAIN inside TLS and SCRAM-SHA-256 outside; told
    to, it uses USER/PASS, PLAIN, LOGIN and, for a user with APOP, APOP
    and CRAM-MD5 (offered with --apop).  Mechanisms the user cannot use
    fail as authentication failures, and SCRAM-SHA-1, which is not
    offered, is refused by mpop itself.
    """
    server, mailgate_cli, alice, bob = serveShared("--apop")
    delivered = b"From: <sender@example.net>\r\nSubject: for mpop\r\n\r\n.hi\r\n"
    mailgate_cli.deliver(alice, delivered)
    mailgate_cli.deliver(bob, delivered)
    mpop = makeClient(Mpop, server, user=alice, trust=moduleCertificate)

    runs = [
        (alice, ALICE_PW, transport, auth)
        for transport in ("plain", "stls", "pop3s")
        for auth in ("on", "user", "plain", "login", "scram-sha-256")
    ] + [(bob, BOB_PW, "stls", auth) for auth in ("on", "apop", "cram-md5")]
    for user, password, transport, auth in runs:
        # keep, with the unique ids forgotten: each run fetches the message.
        (mpop.directory / "uidls").unlink(missing_ok=True)
        stored = mpop.fetch(transport=transport, auth=auth, user=user, password=password)
        assertStoredExactly(stored, [delivered], Mpop.added)
    # By itself mpop sends the password only inside TLS (PLAIN), and uses
    # SCRAM-SHA-256 without it.
    chosen = {("plain", "on"): "scram-sha-256", ("stls", "on"): "plain", ("pop3s", "on"): "plain"}
    assert loginMechanisms(server, alice, 15) == [chosen.get((t, auth), auth) for _, _, t, auth in runs[:15]]
    assert loginMechanisms(server, bob, 3) == ["plain", "apop", "cram-md5"]

    for auth in ("apop", "cram-md5"):
        code, output = mpop.run(auth=auth)
        assert code == 77, output  # EX_NOPERM
        assert f"authentication failed (method {auth.upper()})" in output, output
    code, output = mpop.run(auth="scram-sha-1")
    assert "does not support authentication method SCRAM-SHA-1" in output, output
    assert len(mailgate_cli.mailbox(alice)) == 1


@sqliteOnlyShared
@requiresMpop
def test_mpopsSCRAMWithAPasswordSASLprepChanges(serveShared, shared, makeClient, moduleCertificate):
    """
    mpop (GNU SASL) prepares the password with SASLprep before SCRAM, as
    RFC 5802 asks: a password with a no-break space and a ligature, which
    SASLprep maps to a space and "fi", logs in with SCRAM-SHA-256, mpop's
    choice without TLS, as it does with USER/PASS.
    """
    server, mailgate_cli, alice, bob = serveShared()
    carol = shared.address("carol")
    password = "caf\u00e9\u00a0\ufb01ve"
    mailgate_cli.addUser(carol, password)
    delivered = b"From: <sender@example.net>\r\nSubject: for carol\r\n\r\nhi\r\n"
    mailgate_cli.deliver(carol, delivered)
    mpop = makeClient(Mpop, server, user=alice, trust=moduleCertificate)
    for auth in ("on", "user"):
        (mpop.directory / "uidls").unlink(missing_ok=True)
        stored = mpop.fetch(transport="plain", auth=auth, user=carol, password=password)
        assertStoredExactly(stored, [delivered], Mpop.added)
    assert loginMechanisms(server, carol, 2) == ["scram-sha-256", "user"]


@sqliteOnlyShared
@requiresGetmail
def test_getmailOverPlainAndImplicitTLSWithUSERAndAPOP(serveShared, makeClient, moduleCertificate):
    """
    getmail logs in with USER/PASS (what it does by itself) and, told to,
    with APOP, over plain TCP and over POP3S verifying the certificate and
    its name; a user without APOP cannot use it.
    """
    server, mailgate_cli, alice, bob = serveShared()
    delivered = b"From: <sender@example.net>\r\nSubject: for getmail\r\n\r\n.hi\r\n"
    mailgate_cli.deliver(alice, delivered)
    mailgate_cli.deliver(bob, delivered)
    getmail = makeClient(Getmail, server, user=alice, trust=moduleCertificate)

    runs = [(alice, ALICE_PW, "user"), (bob, BOB_PW, "user"), (bob, BOB_PW, "apop")]
    for transport in ("plain", "pop3s"):
        for user, password, auth in runs:
            for state in getmail.directory.glob("oldmail-*"):
                state.unlink()
            stored = getmail.fetch(transport=transport, auth=auth, user=user, password=password)
            assertStoredExactly(stored, [delivered], Getmail.added)
    assert loginMechanisms(server, alice, 2) == ["user"] * 2
    assert loginMechanisms(server, bob, 4) == ["user", "apop"] * 2

    code, output = getmail.run(auth="apop")
    assert code != 0 and "-ERR [AUTH] invalid user name or password" in output, output


# -- 2. keeping mail on the server, deleting it ---------------------------------------------


@sqliteOnlyShared
@pytest.mark.parametrize("clientClass", CLIENTS)
def test_keptMailIsFetchedOnceAndThenOnlyWhatIsNew(serveShared, makeClient, clientClass, moduleCertificate):
    """
    Keeping mail on the server, the client fetches every message octet for
    octet, then nothing on its next run (its saved unique ids match UIDL),
    then only the message that arrived by SMTP meanwhile.  Nothing is
    removed from the server.
    """
    server, mailgate_cli, alice, bob = serveShared()
    delivered = awkwardMessages()
    deliverAll(mailgate_cli, alice, delivered)
    client = makeClient(clientClass, server, user=alice, trust=moduleCertificate)

    assertStoredExactly(client.fetch(keep=True), delivered, client.added)
    assert client.fetch(keep=True) == []
    new = b"From: <sender@example.net>\r\nSubject: new\r\n\r\nnew\r\n.\r\n"
    sendBySMTP(server, alice, new)
    [stored] = client.fetch(keep=True)
    # After the client's fields, the server's Delivered-To and Received
    # fields (getmail takes its Return-Path for its own, fetchmail moves
    # it and the Delivered-To above its own field), then what was sent.
    moved = ("Return-Path",) * client.movesReturnPath + ("Delivered-To",) * client.movesDeliveredTo
    served = withoutAddedFields(stored, (*moved, *client.added))
    assert re.match(
        rb"(Return-Path: <sender@example.net>\r\n)?(Delivered-To: %s\r\n)?Received: from client.test "
        % re.escape(alice.encode()), served,
    ), served
    # The copy's Delivered-To names alice, wherever the client put it.
    assert re.search(rb"(?m)^Delivered-To: %s\r?$" % re.escape(alice.encode()), stored), stored
    assert served.endswith(b"\r\n" + new), served
    assert client.fetch(keep=True) == []
    assert len(mailgate_cli.mailbox(alice)) == len(delivered) + 1


@sqliteOnly
@requiresFetchmail
def test_restoredMailIsFetchedByAFetchmailThatSearchesForItsFirstUnseenMessage(serve, mailgate_cli, makeClient):
    """
    fetchmail with keep and uidl, where more than seven messages are
    listed, looks for the first message it has not seen by halving the
    list (fastuidl: with fastuidl 1 on every poll, by default on three of
    every four of its daemon's), and takes every message before the last
    one it has seen for seen.  Two messages deleted by another client
    (kept for recovery) were forgotten by a poll that read the whole
    list; once restored under their ids they are new mail to it.  Put
    back in their old place, among messages it had seen, fetchmail never
    fetched them; restored after the others (as new mail comes, and as
    Dovecot lists a message file put back), it fetches them, once.
    """
    server = serve("--keep-deleted-days", "1")
    delivered = [b"From: <sender@example.net>\r\nSubject: m%d\r\n\r\nbody %d\r\n" % (n, n) for n in range(10)]
    deliverAll(mailgate_cli, ALICE, delivered[:5])
    fetchmail = makeClient(Fetchmail, server)
    halving = "fastuidl 1"

    assertStoredExactly(fetchmail.fetch(options=halving), delivered[:5], Fetchmail.added)
    client = popLogin(server, ALICE, ALICE_PW)
    ids = [line.split()[1].decode() for line in client.uidl()[1]]
    client.dele(2)
    client.dele(4)
    client.quit()
    # Three messages: read whole, and the two ids forgotten.
    assert fetchmail.fetch(options=halving) == []
    deliverAll(mailgate_cli, ALICE, delivered[5:])
    assertStoredExactly(fetchmail.fetch(options=halving), delivered[5:], Fetchmail.added)
    restored = mailgate_cli.check("mailbox", "restore", ALICE, ids[1], ids[3])
    assert restored.endswith(f"2 messages restored to {ALICE}\n"), restored

    assertStoredExactly(fetchmail.fetch(options=halving), [delivered[1], delivered[3]], Fetchmail.added)
    assert fetchmail.fetch(options=halving) == []


@sqliteOnly
@pytest.mark.parametrize("clientClass", CLIENTS)
def test_aClientKilledMidRetrievalDeletesNothing(serve, mailgate_cli, makeClient, clientClass):
    """
    Deleting after retrieval, a client killed (SIGKILL) while it retrieves
    the big message, after it had stored the ones before it (getmail and
    fetchmail had marked them deleted too; mpop sends its DELEs at the
    end), leaves every message on the server; its next run fetches
    each exactly once, octet for octet, and only then, after its QUIT, is
    the maildrop empty.
    """
    server = serve("--debug-peer", "127.0.0.1/32")
    delivered = awkwardMessages()
    deliverAll(mailgate_cli, ALICE, delivered)
    client = makeClient(clientClass, server)

    client.mailbox.block()
    client.start(keep=False)
    waitFor(client.mailbox.blocked, f"{client.name} to reach the big message")
    # It retrieved (and the server had started to send) the big message:
    # RETR, or fetchmail's TOP 3 99999999.
    waitFor(lambda: re.search(r"C: (RETR|TOP) 3\b", server.stdout), "RETR 3 in the server's trace")
    if client.marksAsItGoes:
        waitFor(lambda: "C: DELE 2" in server.stdout, "DELE 2 in the server's trace")
    # Marked, not removed: only QUIT removes.
    assert len(mailgate_cli.mailbox(ALICE)) == len(delivered)
    client.kill()
    waitFor(lambda: "reason='connection lost'" in server.stdout, "the server to see the connection go")
    assert len(mailgate_cli.mailbox(ALICE)) == len(delivered)
    killedRun = client.mailbox.new()

    client.mailbox.unblock()
    stored = client.fetch(keep=False)
    assertStoredExactly(stored, delivered, client.added)
    assert mailgate_cli.mailbox(ALICE) == []
    assertStoredExactly(killedRun, delivered[:2], client.added)


@sqliteOnlyShared
@requiresCurl
def test_curlOverEveryTransportWithEveryMechanism(serveShared, makeClient, moduleCertificate):
    """
    curl fetches every message octet for octet over plain TCP (AUTH LOGIN),
    STLS (AUTH PLAIN with an initial response) and POP3S (AUTH PLAIN),
    verifying the certificate; its LIST and UIDL are what the server holds,
    and a DELE it sends takes effect at its QUIT.  For a user with APOP it
    uses APOP when told to.

    By itself it picks CRAM-MD5 whenever CAPA offers it and does not fall
    back; Bob's APOP does not make the server offer it, so with no options
    curl logs in with PLAIN, Alice (without APOP) as Bob, though the
    greeting carries an APOP timestamp (curl prefers SASL to it).
    """
    server, mailgate_cli, alice, bob = serveShared()
    delivered = awkwardMessages()
    deliverAll(mailgate_cli, alice, delivered)
    mailgate_cli.deliver(bob, delivered[0])
    curl = makeClient(Curl, server, user=alice, trust=moduleCertificate)

    for transport, auth, options in [
        ("plain", "LOGIN", ()), ("stls", "PLAIN", ("--sasl-ir",)), ("pop3s", "PLAIN", ()),
    ]:
        for number, message in enumerate(delivered, 1):
            got = curl.get(transport=transport, auth=auth, path=f"/{number}", options=options)
            assert got == asServed(message), (transport, number, got[:200], len(got))
    assert loginMechanisms(server, alice, 15) == ["login"] * 5 + ["plain"] * 10

    held = mailgate_cli.mailbox(alice)
    assert curl.get().decode().splitlines() == [f"{n} {octets}" for n, octets, _ in held]
    assert curl.get(options=("--request", "UIDL")).decode().splitlines() == [f"{n} {uid}" for n, _, uid in held]

    assert curl.get(user=bob, password=BOB_PW, auth=None, path="/1") == delivered[0]
    assert curl.get(user=bob, password=BOB_PW, auth="+APOP", path="/1") == delivered[0]
    assert loginMechanisms(server, bob, 2) == ["plain", "apop"]

    code, output = curl.run(auth=None, path="/1")
    assert code == 0, output
    assert "< +OK mailgate POP3 server ready <" in output, output
    assert "> AUTH PLAIN" in output and "CRAM-MD5" not in output, output
    # Fifteen logins above, LIST and UIDL, and this one.
    logins = loginMechanisms(server, alice, 18)
    assert len(logins) == 18 and logins[-1] == "plain", logins

    assert curl.get(path="/2", options=("--request", "DELE", "--head")) == b""
    assert [uid for _, _, uid in mailgate_cli.mailbox(alice)] == [uid for i, (_, _, uid) in enumerate(held) if i != 1]


@sqliteOnly
@requiresCurl
def test_curlWhereImportedCramMD5StatesMakeItOffered(serve, mailgate_cli, makeClient):
    """
    Fay came from a Dovecot whose {CRAM-MD5} hash gave her CRAM-MD5: while
    such a user is there the server offers it, and curl with no options
    picks it: it works for Fay and for Bob (APOP), and fails for Alice,
    who has neither, as a denied login; told --login-options AUTH=PLAIN
    (README, POP3), she logs in.
    """
    from mailgate.auth.md5state import hmacMD5Context

    fay, fayPassword = "fay@example.org", "fay's secret"
    hashed = "{CRAM-MD5}" + hmacMD5Context(fayPassword.encode()).hex()
    mailgate_cli.check("user", "add", fay, "--password-stdin", "--hashed", input=hashed.encode() + b"\n")
    delivered = b"From: <sender@example.net>\r\nSubject: for curl\r\n\r\nhi\r\n"
    for address in (ALICE, BOB, fay):
        mailgate_cli.deliver(address, delivered)
    server = serve()
    curl = makeClient(Curl, server)

    for user, password in ((fay, fayPassword), (BOB, BOB_PW)):
        assert curl.get(user=user, password=password, auth=None, path="/1") == delivered
        assert loginMechanisms(server, user, 1) == ["cram-md5"]

    code, output = curl.run(auth=None, path="/1")
    assert code == 67, output  # CURLE_LOGIN_DENIED
    assert "> AUTH CRAM-MD5" in output and "< -ERR [AUTH] invalid user name or password" in output, output
    assert curl.get(auth="PLAIN", path="/1") == delivered
    assert loginMechanisms(server, ALICE, 1) == ["plain"]


@sqliteOnlyShared
@requiresFetchmail
def test_fetchmailOverEveryTransportWithEveryMechanism(serveShared, makeClient, tmp_path, moduleCertificate):
    """
    fetchmail logs in over plain TCP, STLS and POP3S, checking the
    certificate: by itself (auth any) Alice, who has no APOP, with
    USER/PASS once the CRAM-MD5 that --apop offers failed for her, and
    Bob with CRAM-MD5; told to (over STLS), Alice with USER/PASS and Bob
    with APOP and CRAM-MD5.  Alice's APOP and CRAM-MD5 fail as
    authentication failures, and a certificate its CA file does not
    vouch for stops it before it logs in.
    """
    server, mailgate_cli, alice, bob = serveShared("--apop")
    delivered = b"From: <sender@example.net>\r\nSubject: for fetchmail\r\n\r\n.hi\r\n"
    mailgate_cli.deliver(alice, delivered)
    mailgate_cli.deliver(bob, delivered)
    fetchmail = makeClient(Fetchmail, server, user=alice, trust=moduleCertificate)

    runs = [
        (user, password, transport, "any")
        for transport in ("plain", "stls", "pop3s")
        for user, password in ((alice, ALICE_PW), (bob, BOB_PW))
    ] + [(alice, ALICE_PW, "stls", "password"), (bob, BOB_PW, "stls", "apop"), (bob, BOB_PW, "stls", "cram-md5")]
    for user, password, transport, auth in runs:
        # keep, with the unique ids forgotten: each run fetches the message.
        (fetchmail.directory / "fetchids").unlink(missing_ok=True)
        stored = fetchmail.fetch(transport=transport, auth=auth, user=user, password=password)
        assertStoredExactly(stored, [delivered], Fetchmail.added)
    assert loginMechanisms(server, alice, 4) == ["user"] * 4
    assert loginMechanisms(server, bob, 5) == ["cram-md5"] * 3 + ["apop", "cram-md5"]

    for auth in ("apop", "cram-md5"):
        code, output = fetchmail.run(auth=auth)
        assert code == 3 and f"Authorization failure on {alice}@localhost" in output, output  # AUTHFAIL
    # Another certificate for the same name as the only trust anchor.
    (tmp_path / "other").mkdir()
    fetchmail.trust = str(makeCertificate(tmp_path / "other", "localhost", name="other")[0])
    for transport in ("stls", "pop3s"):
        code, output = fetchmail.run(transport=transport)
        assert code == 2 and "certificate verify failed" in output, output  # SOCKET
    assert len(loginMechanisms(server, alice, 4)) == 4
    assert len(mailgate_cli.mailbox(alice)) == 1


@sqliteOnly
@requiresFetchmail
def test_fetchmailMovesAMaildropIntoLMTPOctetForOctet(mailgate_server, mailgate_cli, makeClient, tmp_path):
    """
    Moving users off an old POP3 server: fetchmail, keeping the mail
    there, fetches Alice's maildrop over STLS, verifying a certificate
    issued by an intermediate CA (the server sends the chain, fetchmail
    trusts the root), and hands each message to an LMTP server, here
    mailgate's own, for Carol.  Each arrives octet for octet, lines
    starting with "." and the big message included, under the fields
    put on top of it: mailgate's Return-Path (the envelope sender
    fetchmail took from the message) and Received field (with LMTP),
    then fetchmail's Received field.  Its next run hands over nothing.
    """
    carolPassword = "carol's secret"
    (tmp_path / "ca").mkdir()
    chain, key, root = makeChain(tmp_path / "ca", "localhost", intermediate=True)
    mailgate_cli.addUser(ALICE, ALICE_PW)
    mailgate_cli.addUser(CAROL, carolPassword)
    server = mailgate_server(
        "--tls-cert", str(chain), "--tls-key", str(key), "--lmtp", LOOPBACK_TCP, "--domain", "example.org",
    )
    delivered = awkwardMessages()
    deliverAll(mailgate_cli, ALICE, delivered)
    fetchmail = makeClient(Fetchmail, server)
    fetchmail.trust = str(root)
    intoLMTP = f"smtphost 127.0.0.1/{server.portOf('LMTP')} lmtp smtpname {CAROL}"

    code, output = fetchmail.run(deliver=intoLMTP)
    assert code == 0, f"{output}\n{server.log()}"
    client = popLogin(server, CAROL, carolPassword)
    arrived = [retrieve(client, number) for number in range(1, len(delivered) + 1)]
    assert client.stat()[0] == len(delivered)
    client.quit()
    fields = re.compile(
        rb"Return-Path: <sender@example\.net>\r\n"
        # The copy's own, as mailgate's LMTP wrote it for carol.
        rb"Delivered-To: carol@example\.org\r\n"
        rb"(Received: [^\r]*\r\n(?:\t[^\r]*\r\n)*)"
        rb"(Received: [^\r]*\r\n(?:\t[^\r]*\r\n)*)"
    )
    messages = []
    for message in arrived:
        match = fields.match(message)
        assert match, message[:400]
        ours, fetchmails = match.groups()
        assert b"\tby mailgate.test (mailgate) with LMTP id " in ours and b"for <carol@example.org>;" in ours, ours
        assert b"with POP3 (fetchmail-" in fetchmails and b"for <carol@example.org>" in fetchmails, fetchmails
        messages.append(message[match.end():])
    assert messages == [asServed(message) for message in delivered]

    code, output = fetchmail.run(deliver=intoLMTP)
    assert code == 1, output
    for user, password in ((CAROL, carolPassword), (ALICE, ALICE_PW)):
        client = popLogin(server, user, password)
        assert client.stat()[0] == len(delivered)
        client.quit()


def runInTerminal(argv, environment):
    """
    Run a full-screen program to its end in a terminal of its own (a
    pseudo-terminal of 50 lines by 200 columns), reading what it draws so
    that it never blocks on it; kill it and fail after L{DEADLINE}
    seconds (a question it asks would wait for ever).  Returns its exit
    status and the screen's text.
    """
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
    try:
        process = subprocess.Popen(
            argv, stdin=slave, stdout=slave, stderr=slave, env=environment, start_new_session=True,
        )
    finally:
        os.close(slave)
    screen = bytearray()
    deadline = time.monotonic() + DEADLINE
    try:
        while process.poll() is None or select.select([master], [], [], 0)[0]:
            if time.monotonic() > deadline:
                process.kill()
                process.wait(DEADLINE)
                pytest.fail(f"{argv} did not finish within {DEADLINE} s; its screen: {bytes(screen[-2000:])!r}")
            if select.select([master], [], [], 0.05)[0]:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the program closed the terminal
                    chunk = b""
                if not chunk and process.poll() is not None:
                    break
                screen += chunk
    finally:
        os.close(master)
    return process.wait(DEADLINE), re.sub(r"\x1b(?:\[[0-9;?]*[A-Za-z]|[()][0-9A-Za-z]|[=>])", " ", screen.decode("utf-8", "replace"))


@sqliteOnlyShared
@requiresNeomutt
def test_neomuttReadsSavesAndDeletesOverPOP3S(serveShared, tmp_path, moduleCertificate):
    """
    neomutt opens Alice's maildrop over POP3S (pops://, verifying the
    certificate with GnuTLS, logging in with SCRAM-SHA-256 through GNU
    SASL), reads each header with TOP n 0, and saves every message to a
    maildir, octet for octet apart from the Content-Length and Lines
    fields it adds at the end of the header (and LF line ends), deleting
    nothing.  Told to delete the second message and sync, it sends DELE
    and QUIT and at once logs in again, which works: the QUIT released
    the maildrop.  Run from a script through a terminal: C{-e 'push
    ...'} types the keys.
    """
    server, mailgate_cli, alice, bob = serveShared()
    delivered = awkwardMessages()
    deliverAll(mailgate_cli, alice, delivered)
    held = mailgate_cli.mailbox(alice)
    directory = tmp_path / "neomutt"
    directory.mkdir()
    config = directory / "muttrc"
    config.write_text(
        f'set pop_pass="{ALICE_PW}"\n'
        f'set ssl_ca_certificates_file="{moduleCertificate[0]}"\n'
        f'set certificate_file="{directory / "certificates"}"\n'
        f'set folder="{directory}"\n'
        f'set spoolfile="{directory / "spool"}"\n'
        'set mbox_type=Maildir record="" header_cache="" message_cachedir=""\n'
        "set confirmcreate=no move=no sleep_time=0 wait_key=no\n"
    )
    mailbox = f"pops://{quote(alice, safe='')}@localhost:{server.portOf('POP3S')}/"
    environment = dict(childEnvironment(), HOME=str(directory), TERM="xterm")

    def neomutt(*commands):
        code, screen = runInTerminal([NEOMUTT, "-n", "-F", str(config), "-f", mailbox, *commands], environment)
        assert code == 0, f"{screen}\n{server.log()}"

    neomutt("-e", "set delete=no", "-e", "push <tag-pattern>~A<enter><tag-prefix><save-message>=saved<enter><quit>")
    stored = [path.read_bytes() for path in (directory / "saved" / "new").iterdir()]
    added = re.compile(rb"Content-Length: \d+\nLines: \d+\n(?=\n)")
    assertStoredExactly([added.sub(b"", message, count=1) for message in stored], delivered, ())
    assert mailgate_cli.mailbox(alice) == held

    neomutt("-e", "set delete=yes", "-e", "push <next-entry><delete-message><sync-mailbox><quit>")
    assert loginMechanisms(server, alice, 3) == ["scram-sha-256"] * 3
    assert mailgate_cli.mailbox(alice) == [(n, octets, uid) for n, (_, octets, uid) in enumerate(held[:1] + held[2:], 1)]


def snail(url, trust, directory, *variables, commands=("quit",)):
    """
    Run s-nail (the mailx of Debian's s-nail package) on the POP3 mailbox
    C{url} in batch mode, read-only (C{-R}: it deletes nothing), trusting
    only the certificate file C{trust}, with C{-S} C{variables} and the
    C{-Y} C{commands}; return (exit status, its output).
    """
    argv = [SNAIL, "-n", "-N", "-R", "-S", "v15-compat", "-S", f"tls-ca-file={trust}", "-S", "tls-ca-no-defaults"]
    for variable in variables:
        argv += ["-S", variable]
    for command in commands:
        argv += ["-Y", command]
    environment = dict(childEnvironment(), HOME=str(directory), LC_ALL="C.UTF-8")
    try:
        done = subprocess.run(
            argv + ["-f", url], capture_output=True, stdin=subprocess.DEVNULL, timeout=DEADLINE * 2, env=environment,
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{argv} did not finish within {DEADLINE * 2} s\n{e.stdout!r}\n{e.stderr!r}")
    return done.returncode, (done.stdout + done.stderr).decode("utf-8", "replace")


def fromMbox(mbox):
    """
    The messages of an mbox file as s-nail's C{copy} writes them (a From_
    line before each, an empty line after each; none of these messages
    has a line starting with "From "), as the server sent them: with CRLF
    line ends.
    """
    assert mbox.startswith(b"From "), mbox[:200]
    messages = re.split(rb"\n\nFrom [^\n]*\n", mbox[mbox.index(b"\n") + 1 :])
    assert messages[-1].endswith(b"\n\n"), messages[-1][-200:]
    messages[-1] = messages[-1][:-2]
    return [message.replace(b"\n", b"\r\n") + b"\r\n" for message in messages]


@sqliteOnlyShared
@requiresSnail
def test_snailUsesAPOPWhereverTheGreetingOffersIt(serveShared, tmp_path, moduleCertificate):
    """
    s-nail logs in with APOP whenever the greeting has an APOP timestamp,
    which mailgate's greeting has while some user has APOP enabled (Bob
    here): for Alice, who has not, the login fails ([AUTH], a failed login
    of hers) and s-nail says to set pop3-no-apop.  With it set she logs
    in with USER/PASS over STLS and POP3S, s-nail verifying the
    certificate, and reads every message as it was delivered; Bob logs in
    with APOP.  A certificate that the CA file does not vouch for stops it
    before it logs in.
    """
    server, mailgate_cli, alice, bob = serveShared()
    delivered = awkwardMessages()
    deliverAll(mailgate_cli, alice, delivered)
    mailgate_cli.deliver(bob, delivered[0])
    held = mailgate_cli.mailbox(alice)
    trust = str(moduleCertificate[0])
    directory = tmp_path / "s-nail"
    directory.mkdir()
    aliceLogin = f"{quote(alice, safe='')}:wonder%20land@localhost"
    stls = f"pop3://{aliceLogin}:{server.port}"
    pop3s = f"pop3s://{aliceLogin}:{server.portOf('POP3S')}"

    code, output = snail(stls, trust, directory, "pop3-use-starttls")
    assert code != 0, output
    assert "POP3 error: -ERR [AUTH] invalid user name or password" in output, output
    assert "please set *pop3-no-apop*" in output, output

    for url in (stls, pop3s):
        mbox = directory / "saved"
        mbox.unlink(missing_ok=True)
        code, output = snail(url, trust, directory, "pop3-use-starttls", "pop3-no-apop", commands=[f"copy * {mbox}"])
        assert code == 0, f"{output}\n{server.log()}"
        assert fromMbox(mbox.read_bytes()) == [asServed(message) for message in delivered]
    assert loginMechanisms(server, alice, 2) == ["user", "user"]

    bobURL = f"pop3://{quote(bob, safe='')}:b0b%27s%20secret@localhost:{server.port}"
    code, output = snail(bobURL, trust, directory, "pop3-use-starttls", commands=["headers", "quit"])
    assert code == 0 and "plain" in output, output  # the one message's subject
    assert loginMechanisms(server, bob, 1) == ["apop"]

    (tmp_path / "other").mkdir()
    other = makeCertificate(tmp_path / "other", "localhost", name="other")[0]
    for url in (stls, pop3s):
        code, output = snail(url, other, directory, "pop3-use-starttls", "pop3-no-apop")
        assert code != 0 and "certificate" in output.lower(), output
    assert len(loginMechanisms(server, alice, 2)) == 2
    assert mailgate_cli.mailbox(alice) == held


# -- 3. failures -------------------------------------------------------------------------

CLIENTS_AND_CURL = CLIENTS + [pytest.param(Curl, marks=requiresCurl, id="curl")]


@sqliteOnly
@requiresFetchmail
def test_aFetchmailLeftWithAnOldPasswordIsNotBannedWhereCramMD5IsOffered(serve, mailgate_cli, makeClient):
    """
    A fetchmail left with an old password after a change polls with it
    again and again, by itself (auth any) with CRAM-MD5, which --apop
    offers, then USER/PASS.  With bans at the second counted failure,
    even on loopback, its polls fail as authentication failures but count
    one failure in all (the same wrong password again is not counted
    again, README): its address is not banned, and once given the new
    password it logs in.
    """
    server = serve("--apop", *STRICT)
    fetchmail = makeClient(Fetchmail, server)
    for _ in range(3):
        code, output = fetchmail.run(password=WRONG)
        # AUTHFAIL (fetchmail says "Authorization failure" the first time
        # only).
        assert code == 3 and "Query status=3 (AUTHFAIL)" in output, output
    assert banList(mailgate_cli) == []
    assert fetchmail.fetch() == []


@sqliteOnly
@pytest.mark.parametrize("clientClass", CLIENTS_AND_CURL)
def test_aWrongPasswordAndAMaildropInUseAreReportedAndBanNobody(serve, mailgate_cli, makeClient, clientClass):
    """
    With bans at the second failed login, even on loopback: a run with a
    wrong password fails and says so, and the next run, with the right
    password, logs in.  While another session holds the maildrop, a run
    fails with the server's [IN-USE] reply (mpop shows the server's reply
    after USER/PASS; after SASL it says only that authentication failed),
    however often it is tried; none of this bans the address.
    """
    server = serve(*STRICT)
    mailgate_cli.deliver(ALICE, b"Subject: one\r\n\r\none\r\n")
    client = makeClient(clientClass, server)
    wrongPassword = {
        "mpop": "authentication failed",
        "getmail": "-ERR [AUTH] invalid user name or password",
        "curl": "< -ERR [AUTH] invalid user name or password",
        "fetchmail": "Authorization failure on alice@example.org@localhost",
    }[client.name]
    # fetchmail shows the reply without its "-ERR", and says "lock busy".
    inUse = "[IN-USE] maildrop is locked by another POP3 session"
    auth = {"mpop": {"auth": "user"}}.get(client.name, {})

    code, output = client.run(password=WRONG)
    assert code != 0 and wrongPassword in output, output

    holder = popLogin(server, ALICE, ALICE_PW)
    for _ in range(3):
        code, output = client.run(**auth)
        assert code != 0 and inUse in output, output
    if client.name == "mpop":
        code, output = client.run()
        assert code == 77 and "authentication failed (method PLAIN)" in output, output
    holder.quit()

    code, output = client.run(**auth)
    assert code == 0, output
    assert banList(mailgate_cli) == []


@sqliteOnly
@requiresFetchmail
@requiresMpop
@requiresGetmail
@requiresCurl
def test_aFullServersRefusalIsReportedAsATemporaryOne(serve, mailgate_cli, makeClient):
    """
    Over --max-connections-per-ip (even on loopback here), a connection is
    refused with -ERR [SYS/TEMP] at the greeting, which each client shows:
    mpop, getmail and curl fail the run with the server's reply.
    fetchmail does not read RFC 3206's code: it sorts an -ERR before login
    by its words, and took "[SYS/TEMP] too many connections" for an
    authorization failure (exit 3), which its daemon reports to its user
    by mail after three polls as a password to check.  The reply says
    "service temporarily unavailable", which fetchmail reports as a busy
    server (exit 14, PS_SERVBUSY), to be polled again.  Once the other
    connection is gone, each client fetches, and nobody was banned.
    """
    server = serve("--max-connections-per-ip", "1", "--exempt-network", "none")
    mailgate_cli.deliver(ALICE, b"Subject: one\r\n\r\none\r\n")
    refused = "-ERR [SYS/TEMP] service temporarily unavailable: too many connections; try again later"
    shown = {
        # PS_SERVBUSY; with -v: "Server busy error on alice@...".
        "fetchmail": "Query status=14",
        "mpop": f"POP3 server message: {refused}",
        "getmail": f"POP error (b'{refused}')",
        "curl": f"< {refused}",
    }
    clients = [makeClient(cls, server) for cls in (Fetchmail, Mpop, Getmail, Curl)]

    # Bob's session holds the one connection 127.0.0.1 may have.
    held = popLogin(server, BOB, BOB_PW)
    for client in clients:
        code, output = client.run()
        assert code != 0 and shown[client.name] in output, output
    # Its connection stops counting before the +OK to QUIT is sent.
    held.quit()

    for client in clients:
        code, output = client.run()
        assert code == 0, f"{client.name}\n{output}"
    assert banList(mailgate_cli) == []
