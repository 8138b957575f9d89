"""
Debian's Dovecot (2.3) as the benchmarks' reference, run privately.

Everything lives in one temporary directory: its own configuration file
(passed with C{-c}, so /etc/dovecot is never read), base_dir, state_dir,
log, passwd-file and maildirs.  It listens on 127.0.0.1 only, for POP3 and
LMTP only, on free ports.  Mail belongs to one unprivileged system account
(C{mail} where it exists), so the POP3 and LMTP processes run as that user.

Variants:
  - C{"hp"}: what a performance-minded administrator configures (the
    settings issue 15 lists): long-lived login processes, each serving
    many connections, and pop3 processes reused from session to session,
        service pop3-login { service_count = 0; process_min_avail = 2;
                             client_limit = 1000 }
        service pop3 { service_count = 0; process_min_avail = 2 }
        pop3_no_flag_updates = yes
        mail_max_userip_connections = 1000
  - C{"default"}: the stock process settings, one login process per
    connection and one pop3 process per session (not in C{make bench}'s
    default run any more; C{--dovecot-default} adds it).

Credentials (the passdb is a passwd-file):
  - C{"warm"} (L{CREDENTIALS}): C{{PLAIN}} passwords with
    C{auth_cache_size = 1M} and C{auth_cache_ttl = 1 hour}: a repeated
    login costs no hashing, as with mailgate's verified-login cache.  The
    scenario rows use it; APOP works with it too (it needs the cleartext).
  - C{"cold"}: C{{SHA512-CRYPT}} passwords (5000 rounds) and
    C{auth_cache_size = 0}: every login verifies the hash.  The cold-login
    rows use it, against mailgate with C{--auth-cache-size 0}.
  The scheme and the cache can also be chosen separately (C{scheme},
  C{authCache}).

With C{tls=(certificate, key)}: C{ssl = yes} with that certificate and
key, and a C{pop3s} listener (implicit TLS) on a free port of 127.0.0.1;
with C{tls=(certificate, key, altCertificate, altKey)} the second pair as
C{ssl_alt_cert} and C{ssl_alt_key} too (an ECDSA certificate beside an
RSA one, as mailgate's C{--tls-alt-cert}).

LMTP deliveries are fsync'ed (C{mail_fsync = always}), so they are durable
when acknowledged, like mailgate's.

As a command, for trying things by hand:

    python benchmarks/dovecot.py [--variant hp|default] [--credentials warm|cold] [--tls CERT KEY]
"""

import argparse
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

DOVECOT = "/usr/sbin/dovecot"
DEADLINE = 30.0

VARIANTS = ("hp", "default")
SCHEMES = ("SHA512-CRYPT", "PLAIN")

#: login cost settings: the passdb scheme and whether the auth cache is on
CREDENTIALS = {
    "warm": {"scheme": "PLAIN", "authCache": True},
    "cold": {"scheme": "SHA512-CRYPT", "authCache": False},
}


def available():
    """
    Whether Dovecot is installed here.
    """
    return os.access(DOVECOT, os.X_OK)


def version():
    try:
        return subprocess.run(
            [DOVECOT, "--version"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def freePort():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mailAccount():
    """
    The unprivileged account mail is stored as: C{(name, uid, gid)}.
    """
    for name in ("mail", "nobody"):
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        return name, entry.pw_uid, entry.pw_gid
    raise RuntimeError("no unprivileged account (mail or nobody) to own the maildirs")


def _checkTraversable(path):
    """
    Every directory above C{path} must be searchable by other users.
    """
    parent = os.path.dirname(path)
    while parent and parent != os.path.dirname(parent):
        if not os.stat(parent).st_mode & 0o001:
            raise RuntimeError(
                f"{parent} is not searchable by other users (mode "
                f"{oct(os.stat(parent).st_mode & 0o777)}); Dovecot's unprivileged "
                f"processes could not reach {path}"
            )
        parent = os.path.dirname(parent)


def hashPassword(password, scheme):
    """
    The passwd-file form of C{password}: C{{SCHEME}...}.
    """
    if scheme == "PLAIN":
        return "{PLAIN}" + password
    doveadm = shutil.which("doveadm") or "/usr/bin/doveadm"
    try:
        result = subprocess.run(
            [doveadm, "pw", "-s", scheme, "-p", password],
            capture_output=True, text=True, timeout=30,
        )
        if result.returncode == 0 and result.stdout.startswith("{" + scheme + "}"):
            return result.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    if scheme == "SHA512-CRYPT":
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            import crypt
        return "{SHA512-CRYPT}" + crypt.crypt(password, crypt.mksalt(crypt.METHOD_SHA512))
    raise RuntimeError(f"cannot hash a password with scheme {scheme}")


CONFIG = """\
# Generated by benchmarks/dovecot.py for the mailgate benchmarks.
protocols = pop3 lmtp
listen = 127.0.0.1
base_dir = {base}/run
state_dir = {base}/state
log_path = {base}/dovecot.log
info_log_path = {base}/dovecot.log
instance_name = mailgate-bench-{port}
{ssl}
disable_plaintext_auth = no
auth_mechanisms = plain apop
default_internal_user = dovecot
default_login_user = dovenull
first_valid_uid = {uid}
first_valid_gid = {gid}
mail_uid = {uid}
mail_gid = {gid}
mail_location = maildir:~/Maildir
mail_fsync = always
pop3_uidl_format = %08Xu%08Xv
postmaster_address = postmaster@bench.test
hostname = dovecot.bench.test
shutdown_clients = yes
{auth}{tuning}
passdb {{
  driver = passwd-file
  args = username_format=%Lu {base}/passwd
}}
userdb {{
  driver = passwd-file
  args = username_format=%Lu {base}/passwd
}}

service pop3-login {{
  inet_listener pop3 {{
    address = 127.0.0.1
    port = {pop3}
  }}
  inet_listener pop3s {{
{pop3s}  }}
{login}}}
{pop3service}
service lmtp {{
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {lmtp}
  }}
  unix_listener lmtp {{
    mode = 0600
  }}
}}

service imap-login {{
  inet_listener imap {{
    port = 0
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
"""

#: the hp variant's pop3-login service settings
HIGH_PERFORMANCE = """\
  service_count = 0
  process_min_avail = {minAvail}
  client_limit = 1000
"""

#: the hp variant's pop3 service (post-login processes reused too)
HIGH_PERFORMANCE_POP3 = """\
service pop3 {{
  service_count = 0
  process_min_avail = {minAvail}
}}
"""

#: the hp variant's global settings
HIGH_PERFORMANCE_GLOBAL = """\
pop3_no_flag_updates = yes
mail_max_userip_connections = 1000
"""

#: the auth cache of the warm credentials
AUTH_CACHE = """\
auth_cache_size = 1M
auth_cache_ttl = 1 hour
"""

NO_AUTH_CACHE = "auth_cache_size = 0\n"

#: process_min_avail of the hp variant (the issue's figure)
MIN_AVAIL = 2


class Dovecot:
    """
    A private Dovecot under C{directory} (created if needed).

    Call L{addUsers} (and L{loadCorpus}) before L{start}; L{start} and
    L{stop} may be called again, with another variant or scheme, over the
    same maildirs.

    @ivar pid: the master process, while running.
    @ivar pop3Port: @ivar lmtpPort: the listeners, while running.
    """

    def __init__(self, directory=None, variant="hp", scheme="SHA512-CRYPT", cores=None,
                 authCache=False, tls=None, credentials=None):
        if credentials is not None:
            scheme, authCache = CREDENTIALS[credentials]["scheme"], CREDENTIALS[credentials]["authCache"]
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}")
        if scheme not in SCHEMES:
            raise ValueError(f"unknown scheme {scheme!r}")
        self._ownDirectory = directory is None
        self.directory = os.path.abspath(directory or tempfile.mkdtemp(prefix="bench-dovecot-"))
        os.makedirs(self.directory, exist_ok=True)
        # Dovecot's unprivileged processes (auth as "dovecot", mail as the
        # mail account) must reach the passwd-file and the homes under here.
        os.chmod(self.directory, 0o755)
        _checkTraversable(self.directory)
        self.variant = variant
        self.scheme = scheme
        self.authCache = authCache
        self.tls = tls
        self.cores = cores or os.cpu_count() or 1
        self.minAvail = MIN_AVAIL
        self.account, self.uid, self.gid = mailAccount()
        self.mailRoot = os.path.join(self.directory, "mail")
        os.makedirs(self.mailRoot, exist_ok=True)
        os.chown(self.mailRoot, self.uid, self.gid)
        self._users = {}
        self._hashes = {}
        self.process = None
        self.pid = None
        self.pop3Port = None
        self.pop3sPort = None
        self.lmtpPort = None
        self.configPath = os.path.join(self.directory, "dovecot.conf")
        self.logPath = os.path.join(self.directory, "dovecot.log")

    @property
    def credentials(self):
        """
        C{"warm"}, C{"cold"} or a description of another combination.
        """
        for name, c in CREDENTIALS.items():
            if (c["scheme"], c["authCache"]) == (self.scheme, bool(self.authCache)):
                return name
        return f"{self.scheme}, auth cache {'on' if self.authCache else 'off'}"

    # -- users and mail -------------------------------------------------

    def home(self, user):
        return os.path.join(self.mailRoot, user.lower())

    def maildir(self, user):
        return os.path.join(self.home(user), "Maildir")

    def addUsers(self, users, password):
        """
        Users with one password (stored in the current scheme at L{start}).
        """
        for user in users:
            self._users[user.lower()] = password
            for sub in ("cur", "new", "tmp"):
                os.makedirs(os.path.join(self.maildir(user), sub), exist_ok=True)
        from corpus import chownTree

        chownTree(self.mailRoot, self.uid, self.gid)

    def loadCorpus(self, corpus):
        """
        The corpus's users and their messages, as maildirs.
        """
        self.addUsers(corpus.users, corpus.password)
        corpus.writeMaildirs(self.mailRoot, self.uid, self.gid)

    def _writePasswd(self):
        lines = []
        for user, password in sorted(self._users.items()):
            key = (password, self.scheme)
            if key not in self._hashes:
                self._hashes[key] = hashPassword(password, self.scheme)
            lines.append(f"{user}:{self._hashes[key]}:{self.uid}:{self.gid}::{self.home(user)}::")
        path = os.path.join(self.directory, "passwd")
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
        os.chmod(path, 0o644)

    def configText(self):
        """
        The configuration file for the current variant, credentials, TLS
        and ports.
        """
        hp = self.variant == "hp"
        if self.tls:
            certificate, key, *alternative = (os.path.abspath(p) for p in self.tls)
            ssl = f"ssl = yes\nssl_cert = <{certificate}\nssl_key = <{key}\nssl_min_protocol = TLSv1.2"
            if alternative:
                ssl += f"\nssl_alt_cert = <{alternative[0]}\nssl_alt_key = <{alternative[1]}"
            pop3s = f"    address = 127.0.0.1\n    port = {self.pop3sPort}\n"
        else:
            ssl = "ssl = no"
            pop3s = "    port = 0\n"
        return CONFIG.format(
            base=self.directory,
            uid=self.uid,
            gid=self.gid,
            pop3=self.pop3Port,
            lmtp=self.lmtpPort,
            port=self.pop3Port,
            ssl=ssl,
            pop3s=pop3s,
            auth=AUTH_CACHE if self.authCache else NO_AUTH_CACHE,
            tuning=HIGH_PERFORMANCE_GLOBAL if hp else "",
            login=HIGH_PERFORMANCE.format(minAvail=self.minAvail) if hp else "",
            pop3service=HIGH_PERFORMANCE_POP3.format(minAvail=self.minAvail) if hp else "",
        )

    def _writeConfig(self):
        with open(self.configPath, "w") as f:
            f.write(self.configText())

    def config(self):
        with open(self.configPath) as f:
            return f.read()

    # -- running ----------------------------------------------------------

    def start(self, variant=None, scheme=None, authCache=None, credentials=None):
        """
        Start the master in the foreground (C{-F}) and wait until every
        listener accepts connections (for C{pop3s}: a TCP connection).
        """
        if self.process is not None:
            raise RuntimeError("Dovecot is already running")
        if credentials is not None:
            scheme, authCache = CREDENTIALS[credentials]["scheme"], CREDENTIALS[credentials]["authCache"]
        if variant is not None:
            if variant not in VARIANTS:
                raise ValueError(f"unknown variant {variant!r}")
            self.variant = variant
        if scheme is not None:
            if scheme not in SCHEMES:
                raise ValueError(f"unknown scheme {scheme!r}")
            self.scheme = scheme
        if authCache is not None:
            self.authCache = authCache
        self.pop3Port = freePort()
        self.lmtpPort = freePort()
        self.pop3sPort = freePort() if self.tls else None
        for sub in ("run", "state"):
            os.makedirs(os.path.join(self.directory, sub), exist_ok=True)
        self._writePasswd()
        self._writeConfig()
        self._logOffset = os.path.getsize(self.logPath) if os.path.exists(self.logPath) else 0
        self.process = subprocess.Popen(
            [DOVECOT, "-F", "-c", self.configPath],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=open(os.path.join(self.directory, "master.stderr"), "ab"),
            start_new_session=True,
        )
        self.pid = self.process.pid
        deadline = time.monotonic() + DEADLINE
        pending = {self.pop3Port, self.lmtpPort}
        while pending:
            if self.process.poll() is not None:
                raise RuntimeError(f"Dovecot exited at start-up:\n{self.log()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"Dovecot did not listen within {DEADLINE} s:\n{self.log()}")
            for port in list(pending):
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                        s.settimeout(5)
                        if s.recv(512):
                            pending.discard(port)
                except OSError:
                    pass
            if pending:
                time.sleep(0.1)
        if self.pop3sPort is not None:
            self._waitForTLS(deadline)
        if self.variant == "hp":
            self._waitForLoginProcesses(deadline)
        return self

    def _waitForTLS(self, deadline):
        """
        The pop3s listener completes a TLS handshake and greets.
        """
        import ssl

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.pop3sPort), timeout=2) as raw:
                    raw.settimeout(5)
                    with context.wrap_socket(raw) as s:
                        if s.recv(512).startswith(b"+OK"):
                            return
            except OSError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"Dovecot's pop3s listener did not greet over TLS:\n{self.log()}")
            time.sleep(0.1)

    def processNames(self):
        """
        The names (comm) of the master's process tree now.
        """
        from pop3load import processTree

        names = []
        for pid in processTree([self.pid]):
            try:
                with open(f"/proc/{pid}/comm") as f:
                    names.append(f.read().strip())
            except OSError:
                pass
        return names

    def pin(self, cpus):
        """
        Run every process of the running instance on C{cpus} (a set of
        CPU numbers): the master and its children now, and (inherited
        from the master) every child it starts later.  The comparison's
        fair counterpart of mailgate's C{--cpu-affinity}.
        """
        from pop3load import pinProcessTrees

        pinProcessTrees([self.pid], cpus)

    def _waitForLoginProcesses(self, deadline):
        """
        Let the master start its process_min_avail login and pop3
        processes, so their start-up is not part of the first measurement.
        """
        while time.monotonic() < deadline:
            names = self.processNames()
            if names.count("pop3-login") >= self.minAvail and names.count("pop3") >= self.minAvail:
                return
            time.sleep(0.1)

    def log(self):
        try:
            with open(self.logPath, errors="replace") as f:
                f.seek(getattr(self, "_logOffset", 0))
                text = f.read()
        except OSError:
            text = ""
        try:
            with open(os.path.join(self.directory, "master.stderr"), errors="replace") as f:
                text += f.read()
        except OSError:
            pass
        return text[-5000:]

    def errorsLogged(self):
        """
        Error and fatal lines the log got since the last start.
        """
        return [
            line
            for line in self.log().splitlines()
            if " Error: " in line or " Fatal: " in line or " Panic: " in line
        ]

    def stop(self):
        """
        SIGTERM to the master (which ends its children), then SIGKILL to
        the process group if it does not end in time.  Safe to call twice.
        """
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(DEADLINE)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except OSError:
                    pass
                process.wait(DEADLINE)
        self.pid = None

    def cleanup(self):
        self.stop()
        if self._ownDirectory:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.cleanup()

    # -- what arrived -----------------------------------------------------

    def messageFiles(self, user):
        """
        Paths of every message in a user's maildir (new and cur).
        """
        found = []
        for sub in ("new", "cur"):
            folder = os.path.join(self.maildir(user), sub)
            try:
                found.extend(os.path.join(folder, n) for n in os.listdir(folder))
            except FileNotFoundError:
                pass
        return found


def main(argv=None):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import corpus

    parser = argparse.ArgumentParser(description="Run a private Dovecot with the benchmark corpus.")
    parser.add_argument("--variant", choices=VARIANTS, default="hp")
    parser.add_argument("--credentials", choices=sorted(CREDENTIALS), default="warm")
    parser.add_argument("--tls", nargs=2, metavar=("CERT", "KEY"), help="also a pop3s listener with this certificate and key")
    parser.add_argument("--users", type=int, default=corpus.STANDARD_USERS)
    parser.add_argument("--messages", type=int, default=corpus.STANDARD_MESSAGES)
    parser.add_argument("--seconds", type=float, default=600, help="how long to keep it running")
    args = parser.parse_args(argv)
    if not available():
        print(f"{DOVECOT} is not installed", file=sys.stderr)
        return 1
    with Dovecot(variant=args.variant, credentials=args.credentials, tls=args.tls) as dovecot:
        dovecot.loadCorpus(corpus.Corpus(args.users, args.messages))
        dovecot.start()
        print(
            f"Dovecot {version()} ({args.variant}, {args.credentials} credentials) pid {dovecot.pid}: "
            f"POP3 127.0.0.1:{dovecot.pop3Port}, "
            + (f"POP3S 127.0.0.1:{dovecot.pop3sPort}, " if dovecot.pop3sPort else "")
            + f"LMTP 127.0.0.1:{dovecot.lmtpPort}, in {dovecot.directory}; Ctrl-C stops it",
            flush=True,
        )
        try:
            time.sleep(args.seconds)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
