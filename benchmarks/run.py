"""
The mailgate benchmark suite (what C{make bench} runs).

    .venv/bin/python benchmarks/run.py [--quick] [--duration 5] [--dovecot]

  1. Writes the standard corpus (20 users x 50 messages, benchmarks/corpus.py)
     and loads it into a fresh SQLite database with the mailgate CLI
     (C{mailgate user add --password-stdin --apop}, C{mailgate deliver}),
     checks every maildrop with C{mailgate mailbox list}, and copies it to a
     fresh PostgreSQL schema with C{mailgate db copy} when
     C{MAILGATE_TEST_POSTGRES} is set (C{make bench} starts PostgreSQL the
     way C{make test} does).
  2. For each server -- mailgate on SQLite, mailgate on PostgreSQL, Dovecot
     in its high-performance and its default login mode -- verifies every
     message once through POP3 against the corpus, then runs each POP3
     scenario (stat, list, top, fetchall) at 1, 10 and 50 concurrent
     clients for a fixed time, a one-message RETR session at concurrency
     1, and the intake benchmark (LMTP, and SMTP for mailgate) at 10
     sessions with 4 KB messages, verified afterwards.  APOP logins are
     compared separately (Dovecot needs {PLAIN} passwords for them).
  3. On SQLite: a 100,000-message maildrop (login to STAT answer, LIST and
     UIDL), and 10,000 concurrent idle POP3 sessions in one mailgate
     process (RSS) while another client measures short sessions.
  4. Prints one table, and writes results.json and results.md into the
     output directory.

Every server is started here and stopped in a finally block; every wait is
bounded.  Nothing is asserted about timings: the figures are printed.
"""

import argparse
import asyncio
import concurrent.futures
import datetime
import importlib.metadata
import json
import os
import platform
import re
import resource
import secrets
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from urllib.parse import quote

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import corpus as corpusModule  # noqa: E402
import dovecot as dovecotModule  # noqa: E402
import pop3load  # noqa: E402
import smtpload  # noqa: E402

DEADLINE = 60.0
STOP_GRACE = 15.0
HOSTNAME = "mailgate.bench.test"
INTAKE_USERS = 10
_LISTENING = re.compile(r"\b(POP3S|POP3|SMTP|LMTP) listening on (\S+?):(\d+) \(")


def log(message):
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def intakeUsers(count=INTAKE_USERS):
    return [f"intake{i:02d}@{corpusModule.DOMAIN}" for i in range(1, count + 1)]


# -- mailgate -----------------------------------------------------------------


def _raiseLimits():
    # In the child, before exec: as many descriptors as the hard limit allows.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class MailgateServer:
    """
    One C{twistd -n mailgate} process on 127.0.0.1, ports read from its
    "X listening on 127.0.0.1:PORT" log lines.
    """

    def __init__(self, bindir, database, logPath, lmtp=True, smtp=True, options=()):
        self.bindir = bindir
        self.database = database
        self.logPath = logPath
        self.lmtp = lmtp
        self.smtp = smtp
        self.options = list(options)
        self.process = None
        self.ports = {}

    @property
    def pid(self):
        return self.process.pid if self.process is not None else None

    @property
    def argv(self):
        argv = [
            os.path.join(self.bindir, "twistd"), "-n", "--pidfile=", "mailgate",
            "--database", self.database, "--hostname", HOSTNAME,
            "--pop3", "tcp:0:interface=127.0.0.1",
        ]
        if self.lmtp:
            argv += ["--lmtp", "tcp:0:interface=127.0.0.1"]
        if self.smtp:
            argv += ["--smtp", "tcp:0:interface=127.0.0.1"]
        return argv + self.options

    def start(self):
        expected = {"POP3"} | ({"LMTP"} if self.lmtp else set()) | ({"SMTP"} if self.smtp else set())
        offset = os.path.getsize(self.logPath) if os.path.exists(self.logPath) else 0
        env = dict(os.environ)
        env.pop("MAILGATE_DATABASE", None)
        env["PYTHONUNBUFFERED"] = "1"
        with open(self.logPath, "ab") as out:
            self.process = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                env=env, cwd=os.path.dirname(self.logPath), start_new_session=True,
                preexec_fn=_raiseLimits,
            )
        deadline = time.monotonic() + DEADLINE
        while True:
            with open(self.logPath, errors="replace") as f:
                f.seek(offset)
                text = f.read()
            ports = {name: int(port) for name, host, port in _LISTENING.findall(text)}
            if expected <= set(ports):
                self.ports = ports
                return self
            if self.process.poll() is not None:
                raise RuntimeError(f"twistd mailgate exited at start-up:\n{text[-3000:]}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"twistd mailgate did not listen within {DEADLINE} s:\n{text[-3000:]}")
            time.sleep(0.05)

    def stop(self):
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_GRACE)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(STOP_GRACE)

    def errorsLogged(self):
        with open(self.logPath, errors="replace") as f:
            text = f.read()
        return [
            line for line in text.splitlines()
            if "Traceback" in line or "Unhandled" in line or "CRITICAL" in line
        ]


def mailgateCLI(bindir, database, args, stdin=None, timeout=DEADLINE):
    """
    Run the mailgate admin command; return its standard output.
    """
    argv = [os.path.join(bindir, "mailgate"), "--database", database] + list(args)
    env = dict(os.environ)
    env.pop("MAILGATE_DATABASE", None)
    if isinstance(stdin, str) and os.path.exists(stdin):
        with open(stdin, "rb") as f:
            result = subprocess.run(argv, stdin=f, capture_output=True, timeout=timeout, env=env)
    else:
        result = subprocess.run(
            argv, input=stdin.encode() if isinstance(stdin, str) else stdin,
            capture_output=True, timeout=timeout, env=env,
        )
    if result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv[1:])} exited {result.returncode}: "
            f"{result.stderr.decode(errors='replace').strip()}"
        )
    return result.stdout.decode(errors="replace")


def loadMailgate(bindir, database, corpus, filesDir, extraUsers=(), workers=None):
    """
    Load the corpus with the CLI: users (with APOP, so both login kinds
    work), then every message with C{mailgate deliver}, in order per user
    and several users at a time; then check every maildrop with
    C{mailgate mailbox list}.  Returns the seconds it took.
    """
    began = time.monotonic()
    paths = corpus.writeFiles(filesDir)
    for user in list(corpus.users) + list(extraUsers):
        mailgateCLI(bindir, database, ["user", "add", user, "--password-stdin", "--apop"], corpus.password + "\n")

    def deliverAll(user):
        for path in paths[user]:
            mailgateCLI(bindir, database, ["deliver", user], path)
        return user

    workers = workers or max(2, os.cpu_count() or 2)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for future in concurrent.futures.as_completed([pool.submit(deliverAll, u) for u in corpus.users]):
            future.result()
    checkMailbox(bindir, database, corpus)
    return time.monotonic() - began


def checkMailbox(bindir, database, corpus):
    """
    C{mailgate mailbox list} of every user must show the corpus: the
    number of messages and each size.
    """
    for index, user in enumerate(corpus.users):
        output = mailgateCLI(bindir, database, ["mailbox", "list", user])
        # The messages, then (after an empty line) the maildrop's use.
        listing = output.split("\n\n", 1)[0]
        sizes = [int(line.split()[1]) for line in listing.splitlines()[1:] if line.strip()]
        wanted = [len(m) for m in corpus.messages(index)]
        if sizes != wanted:
            raise RuntimeError(f"{user}: mailbox list shows sizes {sizes[:5]}..., the corpus has {wanted[:5]}...")


# -- PostgreSQL ------------------------------------------------------------------


def withSchema(url, schema):
    separator = "&" if "?" in url else "?"
    return f"{url}{separator}options={quote(f'-c search_path={schema}')}"


def psql(url, sql, timeout=60):
    psqlBin = shutil.which("psql")
    if psqlBin:
        result = subprocess.run(
            [psqlBin, "-v", "ON_ERROR_STOP=1", "-tAc", sql, url],
            capture_output=True, text=True, timeout=timeout,
        )
    else:
        code = "import psycopg,sys\nwith psycopg.connect(sys.argv[1], autocommit=True) as c:\n r=c.execute(sys.argv[2])\n print(r.fetchone()[0] if r.description else '')"
        result = subprocess.run(
            [sys.executable, "-c", code, url, sql], capture_output=True, text=True, timeout=timeout
        )
    if result.returncode != 0:
        raise RuntimeError(f"psql {sql!r}: {result.stderr.strip()}")
    return result.stdout.strip()


def postgresRoots():
    """
    PIDs of running PostgreSQL postmasters (a postgres process whose parent
    is not one), for measuring the database's CPU behind mailgate.
    """
    comms = {}
    parents = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        comm = data[data.index(b"(") + 1 : data.rindex(b")")].decode(errors="replace")
        comms[int(name)] = comm
        parents[int(name)] = int(data[data.rindex(b")") + 2 :].split()[1])
    return [pid for pid, comm in comms.items() if comm in ("postgres", "postmaster") and comms.get(parents[pid]) not in ("postgres", "postmaster")]


# -- measurements ----------------------------------------------------------------


def runLoad(**kwargs):
    return asyncio.run(pop3load.runLoad(pop3load.LoadConfig(**kwargs)))


def waitQuiet(maxWait, threshold):
    """
    Sample the machine's busy CPU each second until it is at most
    C{threshold} cores, or C{maxWait} seconds passed.  Returns
    C{{"waited": seconds, "busyCores": the last sample}}.
    """
    began = time.monotonic()
    while True:
        before = pop3load.systemBusySeconds()
        time.sleep(1.0)
        busy = pop3load.systemBusySeconds() - before
        waited = time.monotonic() - began
        if busy <= threshold or waited >= maxWait:
            return {"waited": round(waited, 1), "busyCores": round(busy, 2)}


def verifyPop3(port, corpus, digests, apop=False):
    """
    Every user's maildrop once through POP3 (fetchall), octet for octet
    against the corpus; also warms the server up (caches, indexes).
    """
    result = runLoad(
        port=port, users=corpus.users, password=corpus.password, scenario="fetchall",
        concurrency=min(4, len(corpus.users)), duration=600, sessions=len(corpus.users),
        expected=digests, apop=apop, settle=0,
    )
    ok = result.errors == 0 and result.sessions == len(corpus.users)
    if not ok:
        log(f"VERIFICATION FAILED on port {port}: {result.summary()}")
    return {"ok": ok, "sessions": result.sessions, "errors": result.errorKinds}


class Suite:
    def __init__(self, args):
        self.args = args
        self.rows = []
        self.extra = {}
        self.notes = []
        self.corpus = corpusModule.Corpus(args.users, args.messages)
        self.digests = self.corpus.digests()
        self.bindir = args.bin
        self._lastQuiet = None

    # One row of the table.
    def addPop3(self, server, backend, login, result):
        row = {"server": server, "backend": backend, "kind": "pop3", "login": login, **result.asDict(),
               "quiet": self._lastQuiet}
        self.rows.append(row)
        log(f"{server}/{backend}: {result.summary()}")
        return row

    def addIntake(self, server, backend, result):
        row = {
            "server": server, "backend": backend, "kind": "intake",
            "scenario": f"{result.protocol.lower()} {result.size // 1024}KB",
            "concurrency": result.sessions, **result.asDict(), "quiet": self._lastQuiet,
        }
        self.rows.append(row)
        log(f"{server}/{backend}: {result.summary()}")
        return row

    def quiet(self):
        """
        Before a measurement: write out the page cache's dirty pages, so
        that an earlier phase's writeback (another server's mail files or
        WAL) does not compete with this measurement's fsyncs, then wait (at
        most --quiet-wait seconds) until the machine is nearly idle, so
        other work on it disturbs less.
        """
        os.sync()
        if self.args.quiet_wait <= 0:
            self._lastQuiet = None
            return
        self._lastQuiet = waitQuiet(self.args.quiet_wait, self.args.quiet_threshold)

    def pop3Matrix(self, server, backend, port, pids, extraPids=(), apop=False):
        args = self.args
        login = "APOP" if apop else "USER/PASS"
        for scenario in args.scenarios:
            for concurrency in args.concurrency:
                self.quiet()
                result = runLoad(
                    port=port, users=self.corpus.users, password=self.corpus.password,
                    scenario=scenario, concurrency=concurrency, duration=args.duration,
                    serverPids=pids, extraPids=extraPids, apop=apop,
                )
                self.addPop3(server, backend, login, result)
        self.quiet()
        result = runLoad(
            port=port, users=self.corpus.users, password=self.corpus.password,
            scenario="retr1", concurrency=1, duration=args.duration,
            serverPids=pids, extraPids=extraPids, apop=apop,
        )
        self.addPop3(server, backend, login, result)

    def apopRuns(self, server, backend, port, pids, extraPids=()):
        for scenario in ("stat", "fetchall"):
            self.quiet()
            result = runLoad(
                port=port, users=self.corpus.users, password=self.corpus.password,
                scenario=scenario, concurrency=10, duration=self.args.duration,
                serverPids=pids, extraPids=extraPids, apop=True,
            )
            self.addPop3(server, backend, "APOP", result)

    def intake(self, server, backend, port, lmtp, pids, extraPids=(), verifyWith=None):
        self.quiet()
        result = asyncio.run(
            smtpload.runIntake(
                port, intakeUsers(), lmtp=lmtp, sessions=self.args.intake_sessions,
                messages=self.args.intake_messages, size=self.args.intake_size,
                serverPids=pids, extraPids=extraPids,
            )
        )
        if verifyWith is not None:
            smtpload.verify(result, verifyWith())
            if not result.verified:
                log(f"INTAKE VERIFICATION FAILED: {result.verification}")
        return self.addIntake(server, backend, result)

    # -- mailgate ----------------------------------------------------------

    def mailgate(self, backend, database, workdir, extraPids=()):
        server = MailgateServer(self.bindir, database, os.path.join(workdir, f"mailgate-{backend}.log"))
        try:
            server.start()
            log(f"mailgate on {backend}: pid {server.pid}, ports {server.ports}")
            port = server.ports["POP3"]
            self.extra[f"verify mailgate/{backend}"] = verifyPop3(port, self.corpus, self.digests)
            self.pop3Matrix("mailgate", backend, port, [server.pid], extraPids)
            if backend == "sqlite" or self.args.apop_all:
                self.apopRuns("mailgate", backend, port, [server.pid], extraPids)

            def viaPop3():
                return asyncio.run(smtpload.tokensFromPOP3(port, intakeUsers(), self.corpus.password))

            self.intake("mailgate", backend, server.ports["LMTP"], True, [server.pid], extraPids, viaPop3)
            self.intake("mailgate", backend, server.ports["SMTP"], False, [server.pid], extraPids, viaPop3)
            errors = server.errorsLogged()
            if errors:
                self.notes.append(f"mailgate/{backend} logged errors: {errors[:5]}")
        finally:
            server.stop()

    # -- Dovecot -------------------------------------------------------------

    def dovecot(self, workdir):
        dv = dovecotModule.Dovecot(os.path.join(workdir, "dovecot"))
        try:
            dv.loadCorpus(self.corpus)
            dv.addUsers(intakeUsers(), self.corpus.password)
            maildirs = {u: dv.maildir(u) for u in intakeUsers()}

            def viaMaildir():
                return smtpload.tokensFromMaildirs(maildirs)

            for variant in self.args.dovecot_variants:
                dv.start(variant=variant, scheme="SHA512-CRYPT")
                try:
                    name = f"dovecot-{variant}"
                    log(f"{name}: master pid {dv.pid}, POP3 {dv.pop3Port}, LMTP {dv.lmtpPort}")
                    self.extra[f"verify {name}"] = verifyPop3(dv.pop3Port, self.corpus, self.digests)
                    self.pop3Matrix(name, "maildir", dv.pop3Port, [dv.pid])
                    self.intake(name, "maildir", dv.lmtpPort, True, [dv.pid], verifyWith=viaMaildir)
                    errors = dv.errorsLogged()
                    if errors:
                        self.notes.append(f"{name} logged errors: {errors[:5]}")
                finally:
                    dv.stop()
            # APOP needs cleartext passwords in the passdb.
            dv.start(variant="hp", scheme="PLAIN")
            try:
                self.extra["verify dovecot-hp APOP"] = verifyPop3(dv.pop3Port, self.corpus, self.digests, apop=True)
                self.apopRuns("dovecot-hp", "maildir", dv.pop3Port, [dv.pid])
            finally:
                dv.stop()
        finally:
            dv.stop()

    # -- interleaved rounds ------------------------------------------------

    #: what the interleaved rounds measure: POP3 scenarios at one client,
    #: then intake
    interleavedPop3 = ("stat", "list", "retr1", "top", "fetchall")

    def interleaved(self, workdir, sqliteURL, pgURL):
        """
        The targets that compare servers (intake against Dovecot's LMTP,
        PostgreSQL against SQLite, RETR1 p99) measured again with the
        servers interleaved: mailgate on SQLite, mailgate on PostgreSQL and
        Dovecot hp all run at once, each measurement is made on each server
        in turn, and that --rounds times.  The phases above measure one
        server after another for minutes each, so a slow spell of the
        machine (this VM has them: a third slower for minutes) falls on one
        server only; here it falls on all alike, and the medians over the
        rounds are what the ratios use.
        """
        servers = {}
        running = []
        dv = None
        try:
            databases = [("sqlite", sqliteURL, ())]
            if pgURL is not None:
                databases.append(("postgres", pgURL, postgresRoots))
            for backend, url, extraPids in databases:
                server = MailgateServer(self.bindir, url, os.path.join(workdir, f"interleaved-{backend}.log"))
                server.start()
                running.append(server)
                servers[f"mailgate/{backend}"] = {
                    "pop3": server.ports["POP3"], "lmtp": server.ports["LMTP"], "smtp": server.ports["SMTP"],
                    "pids": [server.pid], "extraPids": extraPids,
                }
            if "dovecot" in self.args.only:
                dv = dovecotModule.Dovecot(os.path.join(workdir, "dovecot-interleaved"))
                dv.loadCorpus(self.corpus)
                dv.addUsers(intakeUsers(), self.corpus.password)
                dv.start(variant="hp", scheme="SHA512-CRYPT")
                servers["dovecot-hp/maildir"] = {
                    "pop3": dv.pop3Port, "lmtp": dv.lmtpPort, "smtp": None, "pids": [dv.pid], "extraPids": (),
                }
            figures = {}
            for round in range(self.args.rounds):
                for what in self.interleavedPop3 + ("lmtp", "smtp"):
                    for name, server in servers.items():
                        if what == "smtp" and server["smtp"] is None:
                            continue
                        self.quiet()
                        if what in ("lmtp", "smtp"):
                            result = asyncio.run(
                                smtpload.runIntake(
                                    server[what], intakeUsers(), lmtp=what == "lmtp",
                                    sessions=self.args.intake_sessions, messages=self.args.intake_messages,
                                    size=self.args.intake_size, serverPids=server["pids"],
                                    extraPids=server["extraPids"],
                                )
                            )
                            figure = {"rate": result.messagesPerSecond, "cpuMs": result.cpuMsPerMessage,
                                      "p99ms": result.p99, "errors": result.errors}
                        else:
                            result = runLoad(
                                port=server["pop3"], users=self.corpus.users, password=self.corpus.password,
                                scenario=what, concurrency=1, duration=self.args.duration,
                                serverPids=server["pids"], extraPids=server["extraPids"],
                            )
                            figure = {"rate": result.sessionsPerSecond, "cpuMs": result.cpuMsPerSession,
                                      "p99ms": result.p99, "errors": result.errors}
                        figures.setdefault(f"{name} {what}", []).append(figure)
                        log(f"interleaved round {round + 1}, {name}: {result.summary()}")
            self.extra["interleaved"] = {"rounds": self.args.rounds, "figures": figures}
        finally:
            for server in running:
                server.stop()
            if dv is not None:
                dv.stop()

    # -- big maildrop, idle sessions --------------------------------------

    def big(self, workdir):
        args = self.args
        path = os.path.join(workdir, "big.sqlite3")
        database = "sqlite:///" + path
        password = self.corpus.password
        bigUser = f"big@{corpusModule.DOMAIN}"
        probe = f"probe@{corpusModule.DOMAIN}"
        began = time.monotonic()
        for user in (bigUser, probe):
            mailgateCLI(self.bindir, database, ["user", "add", user, "--password-stdin", "--apop"], password + "\n")
            mailgateCLI(self.bindir, database, ["deliver", user], self.corpus.message(0, 1))
        idleUsers = [f"idle{i:05d}@{corpusModule.DOMAIN}" for i in range(1, args.idle_sessions + 1)]
        self.notes.extend(fillBigDatabase(path, bigUser, args.big_messages, idleUsers, password))
        self.extra["big load seconds"] = round(time.monotonic() - began, 1)
        server = MailgateServer(self.bindir, database, os.path.join(workdir, "mailgate-big.log"), lmtp=False, smtp=False)
        try:
            server.start()
            port = server.ports["POP3"]
            self.quiet()
            self.extra["big maildrop"] = asyncio.run(bigMaildrop(port, bigUser, password, args.big_messages, args.big_repeats))
            log(f"100k maildrop: {self.extra['big maildrop']}")
            self.quiet()
            self.extra["idle sessions"] = asyncio.run(
                idleSessions(server.pid, port, idleUsers, password, probe, args.duration)
            )
            log(f"idle sessions: {self.extra['idle sessions']}")
            errors = server.errorsLogged()
            if errors:
                self.notes.append(f"mailgate/big logged errors: {errors[:5]}")
        finally:
            server.stop()

    def bigPostgres(self, workdir, url):
        """
        The big maildrop on PostgreSQL (a schema of its own).
        """
        args = self.args
        password = self.corpus.password
        bigUser = f"big@{corpusModule.DOMAIN}"
        mailgateCLI(self.bindir, url, ["user", "add", bigUser, "--password-stdin"], password + "\n")
        mailgateCLI(self.bindir, url, ["deliver", bigUser], self.corpus.message(0, 1))
        fillBigPostgres(url, bigUser, args.big_messages)
        server = MailgateServer(self.bindir, url, os.path.join(workdir, "mailgate-big-postgres.log"), lmtp=False, smtp=False)
        try:
            server.start()
            self.quiet()
            self.extra["big maildrop postgres"] = asyncio.run(
                bigMaildrop(server.ports["POP3"], bigUser, password, args.big_messages, args.big_repeats)
            )
            log(f"big maildrop on PostgreSQL: {self.extra['big maildrop postgres']}")
        finally:
            server.stop()


# Columns whose meaning fillBigDatabase knows; others are copied from a
# template row and reported, in case the schema grew something (a counter)
# that needs a real value.
_KNOWN_USER_COLUMNS = {"user_id", "address", "domain", "password_hash", "scram_sha256", "apop_secret", "created_at"}
_KNOWN_MAILBOX_COLUMNS = {"user_id", "uid_validity", "next_uid", "last_login"}


def _columns(cur, table):
    return [row[1] for row in cur.execute(f"PRAGMA table_info({table})").fetchall()]


def _insert(cur, table, values):
    columns = list(values)
    cur.execute(
        f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
        [values[c] for c in columns],
    )


def fillBigPostgres(url, bigUser, messages):
    """
    The PostgreSQL counterpart of L{fillBigDatabase}'s maildrop part, in
    one statement (C{generate_series}).
    """
    psql(url, f"""
        WITH u AS (
            SELECT m.user_id, m.uid, m.body_owner, m.body_id, m.size, m.header_size,
                   m.arrived_at, b.uid_validity
            FROM maildrop m JOIN users s ON s.user_id = m.user_id
            JOIN mailboxes b ON b.user_id = m.user_id
            WHERE s.address = '{bigUser}'
        ), ins AS (
            INSERT INTO maildrop (user_id, uid, uidl, body_owner, body_id, size, header_size, arrived_at)
            SELECT u.user_id, g, lpad(to_hex(g), 8, '0') || lpad(to_hex(u.uid_validity), 8, '0'),
                   u.body_owner, u.body_id, u.size, u.header_size, u.arrived_at
            FROM u, generate_series(u.uid + 1, u.uid + {messages - 1}) AS g
            RETURNING 1
        ), b AS (
            UPDATE bodies SET refcount = {messages}
            FROM u WHERE bodies.owner_id = u.body_owner AND bodies.body_id = u.body_id
            RETURNING 1
        )
        UPDATE mailboxes SET next_uid = u.uid + {messages}
        FROM u WHERE mailboxes.user_id = u.user_id
    """, timeout=600)
    psql(url, "ANALYZE")


def fillBigDatabase(path, bigUser, messages, idleUsers, password):
    """
    Direct SQL (the schema of mailgate/store/schema.py), for speed: give
    C{bigUser}, who has one message delivered by the CLI, C{messages - 1}
    more maildrop entries sharing its body (sizes and unique ids as a
    delivery writes them), and create the idle users as copies of
    C{bigUser}'s row (same password hash, APOP secret), each with an empty
    mailbox.

    @return: notes about columns this function does not know (copied from
        the template rows as they were).
    """
    notes = []
    conn = sqlite3.connect(path, timeout=30)
    try:
        cur = conn.cursor()
        cur.execute("BEGIN IMMEDIATE")
        userColumns = _columns(cur, "users")
        mailboxColumns = _columns(cur, "mailboxes")
        unknown = (set(userColumns) - _KNOWN_USER_COLUMNS) | (set(mailboxColumns) - _KNOWN_MAILBOX_COLUMNS)
        if unknown:
            notes.append(f"big database: unknown columns {sorted(unknown)} copied from template rows")
        cur.execute(f"SELECT {', '.join(userColumns)} FROM users WHERE address = ?", (bigUser,))
        userTemplate = dict(zip(userColumns, cur.fetchone()))
        userId = userTemplate["user_id"]
        cur.execute(f"SELECT {', '.join(mailboxColumns)} FROM mailboxes WHERE user_id = ?", (userId,))
        mailboxTemplate = dict(zip(mailboxColumns, cur.fetchone()))
        validity = mailboxTemplate["uid_validity"]
        cur.execute(
            "SELECT uid, body_owner, body_id, size, header_size, arrived_at FROM maildrop WHERE user_id = ?",
            (userId,),
        )
        uid, owner, bodyId, size, headerSize, arrived = cur.fetchone()
        rows = (
            (userId, n, f"{n:08x}{validity:08x}", owner, bodyId, size, headerSize, arrived)
            for n in range(uid + 1, uid + messages)
        )
        cur.executemany(
            "INSERT INTO maildrop (user_id, uid, uidl, body_owner, body_id, size, header_size, arrived_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
        cur.execute("UPDATE bodies SET refcount = ? WHERE owner_id = ? AND body_id = ?", (messages, owner, bodyId))
        cur.execute("UPDATE mailboxes SET next_uid = ? WHERE user_id = ?", (uid + messages, userId))
        now = int(time.time())
        for address in idleUsers:
            values = {c: v for c, v in userTemplate.items() if c != "user_id"}
            values.update(address=address, apop_secret=password, created_at=now)
            if "domain" in values:
                values["domain"] = address.rpartition("@")[2]
            _insert(cur, "users", values)
            box = dict(mailboxTemplate)
            box.update(user_id=cur.lastrowid, uid_validity=secrets.randbits(31), next_uid=1, last_login=None)
            _insert(cur, "mailboxes", box)
        conn.commit()
    finally:
        conn.close()
    return notes


async def bigMaildrop(port, user, password, messages, repeats):
    """
    On the big maildrop: time from sending PASS to the STAT answer, and
    the time LIST and UIDL take to complete, over several sessions (the
    first one, which pays for the password hash, is reported apart).
    """
    runs = []
    for attempt in range(repeats + 1):
        client = await pop3load.connect("127.0.0.1", port)
        try:
            ok, greeting = await asyncio.wait_for(client.status(), DEADLINE)
            await asyncio.wait_for(client.command(f"USER {user}"), DEADLINE)
            t0 = time.perf_counter()
            await asyncio.wait_for(client.command(f"PASS {password}"), DEADLINE)
            t1 = time.perf_counter()
            count, octets = pop3load._stat(await asyncio.wait_for(client.command("STAT"), DEADLINE))
            t2 = time.perf_counter()
            listing = await asyncio.wait_for(client.multiline("LIST"), DEADLINE)
            t3 = time.perf_counter()
            uidl = await asyncio.wait_for(client.multiline("UIDL"), DEADLINE)
            t4 = time.perf_counter()
            await asyncio.wait_for(client.command("QUIT"), DEADLINE)
        finally:
            client.close()
        lines = (listing.count(b"\r\n"), uidl.count(b"\r\n"))
        runs.append({
            "loginToStatMs": (t2 - t0) * 1000, "loginMs": (t1 - t0) * 1000,
            "listMs": (t3 - t2) * 1000, "uidlMs": (t4 - t3) * 1000,
            "ok": count == messages and lines == (messages, messages),
        })
    warm = runs[1:] or runs
    median = lambda key: sorted(r[key] for r in warm)[len(warm) // 2]  # noqa: E731
    return {
        "messages": messages,
        "firstLoginToStatMs": round(runs[0]["loginToStatMs"], 2),
        "loginToStatMs": round(median("loginToStatMs"), 2),
        "loginToStatMaxMs": round(max(r["loginToStatMs"] for r in warm), 2),
        "listMs": round(median("listMs"), 2),
        "uidlMs": round(median("uidlMs"), 2),
        "sessions": len(warm),
        "ok": all(r["ok"] for r in runs),
    }


async def idleSessions(pid, port, users, password, probe, duration, batch=50):
    """
    Open one POP3 session per idle user and keep them open: RSS of the
    server with them greeted (AUTHORIZATION state) and then logged in with
    APOP (TRANSACTION state, each holding its maildrop); meanwhile a probe
    client runs short stat sessions and reports their p99.
    """
    pop3load.raiseFileLimit(len(users) + 256)
    report = {"sessions": len(users)}

    async def probeRun():
        result = await pop3load.runLoad(pop3load.LoadConfig(
            port=port, users=[probe], password=password, scenario="stat",
            concurrency=1, duration=duration, serverPids=[pid],
        ))
        return {
            "sessions": result.sessions, "p50ms": round(result.p50, 2) if result.p50 else None,
            "p99ms": round(result.p99, 2) if result.p99 else None, "errors": result.errors,
        }

    # One session first: the probe user's first login pays for the
    # password hash, which is not what is measured here.
    await pop3load.runLoad(pop3load.LoadConfig(
        port=port, users=[probe], password=password, scenario="stat",
        concurrency=1, duration=DEADLINE, sessions=1, settle=0,
    ))
    report["rssBaselineMiB"] = round(pop3load.rssBytes(pid) / 2**20, 1)
    report["probeWithoutIdle"] = await probeRun()
    clients = []
    failures = 0
    began = time.perf_counter()
    try:
        async def greet():
            client = await pop3load.connect("127.0.0.1", port, DEADLINE)
            clients.append(client)
            ok, text = await asyncio.wait_for(client.status(), DEADLINE)
            return client, text

        greetings = []
        for start in range(0, len(users), batch):
            results = await asyncio.gather(*(greet() for _ in users[start : start + batch]), return_exceptions=True)
            for r in results:
                if isinstance(r, BaseException):
                    failures += 1
                else:
                    greetings.append(r)
        report["connectSeconds"] = round(time.perf_counter() - began, 2)
        report["greeted"] = len(greetings)
        report["rssGreetedMiB"] = round(pop3load.rssBytes(pid) / 2**20, 1)

        async def loginOne(client, greeting, user):
            await asyncio.wait_for(
                client.command(f"APOP {user} {pop3load.apopDigest(greeting, password)}"), DEADLINE
            )

        began = time.perf_counter()
        pairs = list(zip(greetings, users))
        loggedIn = 0
        for start in range(0, len(pairs), batch):
            results = await asyncio.gather(
                *(loginOne(c, g, u) for (c, g), u in pairs[start : start + batch]), return_exceptions=True
            )
            for r in results:
                if isinstance(r, BaseException):
                    failures += 1
                else:
                    loggedIn += 1
        report["loginSeconds"] = round(time.perf_counter() - began, 2)
        report["loggedIn"] = loggedIn
        report["failures"] = failures
        await asyncio.sleep(1.0)
        rss = pop3load.rssBytes(pid)
        report["rssLoggedInMiB"] = round(rss / 2**20, 1)
        report["rssPerSessionKiB"] = round((rss - report["rssBaselineMiB"] * 2**20) / max(1, loggedIn) / 1024, 1)
        report["probeWithIdle"] = await probeRun()
        stillOpen = sum(1 for c in clients if c._lost is None)
        report["stillOpenAfterProbe"] = stillOpen
    finally:
        for client in clients:
            client.close()
    await asyncio.sleep(1.0)
    report["rssAfterCloseMiB"] = round(pop3load.rssBytes(pid) / 2**20, 1)
    return report


# -- the report ----------------------------------------------------------------------


def machineInfo(bindir):
    info = {"nproc": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version()}
    try:
        with open("/proc/cpuinfo") as f:
            models = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        info["cpu"] = models[0] if models else platform.processor()
    except OSError:
        info["cpu"] = platform.processor()
    try:
        info["twisted"] = importlib.metadata.version("twisted")
    except importlib.metadata.PackageNotFoundError:
        info["twisted"] = None
    try:
        info["mailgate"] = importlib.metadata.version("mailgate")
    except importlib.metadata.PackageNotFoundError:
        info["mailgate"] = None
    info["dovecot"] = dovecotModule.version() if dovecotModule.available() else None
    try:
        with open("/proc/meminfo") as f:
            info["memTotalMiB"] = int(f.readline().split()[1]) // 1024
    except OSError:
        pass
    try:
        info["git"] = subprocess.run(
            ["git", "-C", ROOT, "describe", "--always", "--dirty"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        info["git"] = None
    return info


def _fmt(value, digits=2):
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


COLUMNS = (
    ("server", "server"), ("backend", "backend"), ("login", "login"), ("scenario", "scenario"),
    ("conc", "conc"), ("rate", "sess/s"), ("mbs", "MB/s"), ("p50", "p50 ms"), ("p99", "p99 ms"),
    ("cpu", "CPU ms/sess"), ("dbcpu", "+DB ms"), ("client", "client CPU"), ("bg", "bg cores"), ("errors", "errors"),
    ("xhp", "CPU x dv-hp"), ("xdef", "CPU x dv-def"),
)


def _verified(row):
    """
    The intake verification mark: "ok" when every acknowledged message was
    found exactly once (and there were some).
    """
    report = row.get("verification")
    if row["kind"] != "intake" or report is None:
        return ""
    if not report["ok"]:
        return " VERIFY-FAILED"
    return " ok" if row.get("acknowledged") else " (nothing delivered)"


def tableRows(rows):
    """
    The rows of the one table, as dicts of strings; ratios against Dovecot
    (high-performance and default) for the same scenario, concurrency and
    login kind.
    """
    reference = {}
    for row in rows:
        if row["server"].startswith("dovecot"):
            key = (row["server"], row["scenario"], row["concurrency"], row.get("login"))
            reference[key] = row.get("cpuMsPerSession", row.get("cpuMsPerMessage"))
    out = []
    for row in rows:
        intake = row["kind"] == "intake"
        cpu = row["cpuMsPerMessage"] if intake else row["cpuMsPerSession"]
        dbcpu = row.get("extraCpuMsPerMessage") if intake else row.get("extraCpuMsPerSession")
        ratios = []
        for variant in ("dovecot-hp", "dovecot-default"):
            ref = reference.get((variant, row["scenario"], row["concurrency"], row.get("login")))
            ratios.append(f"{cpu / ref:.2f}" if cpu is not None and ref else "-")
        concurrency = str(row["concurrency"])
        if not intake and row.get("peak") and row["peak"] < row["concurrency"]:
            concurrency += f" ({row['peak']})"
        out.append({
            "server": row["server"], "backend": row["backend"],
            "login": row.get("login", "-") if not intake else "-",
            "scenario": row["scenario"], "conc": concurrency,
            "rate": _fmt(row["messagesPerSecond"] if intake else row["sessionsPerSecond"], 1),
            "mbs": "-" if intake else _fmt(row["megabytesPerSecond"], 2),
            "p50": _fmt(row["p50ms"]), "p99": _fmt(row["p99ms"]),
            "cpu": _fmt(cpu, 3),
            "dbcpu": _fmt(dbcpu, 3) if dbcpu else "-",
            "client": f"{row['clientCpuShare']:.0%}" if row.get("clientCpuShare") is not None else "-",
            "bg": _fmt(row.get("backgroundCores"), 2),
            "errors": str(row["errors"]) + _verified(row),
            "xhp": ratios[0], "xdef": ratios[1],
        })
    return out


def textTable(rows):
    cells = tableRows(rows)
    widths = {key: max([len(title)] + [len(c[key]) for c in cells]) for key, title in COLUMNS}
    lines = ["  ".join(title.ljust(widths[key]) for key, title in COLUMNS)]
    lines.append("  ".join("-" * widths[key] for key, _ in COLUMNS))
    for c in cells:
        lines.append("  ".join(
            c[key].ljust(widths[key]) if key in ("server", "backend", "login", "scenario") else c[key].rjust(widths[key])
            for key, _ in COLUMNS
        ))
    return "\n".join(lines)


def markdownTable(rows):
    cells = tableRows(rows)
    lines = ["| " + " | ".join(title for _, title in COLUMNS) + " |"]
    lines.append("|" + "|".join("---" if key in ("server", "backend", "login", "scenario") else "---:" for key, _ in COLUMNS) + "|")
    for c in cells:
        lines.append("| " + " | ".join(c[key] for key, _ in COLUMNS) + " |")
    return "\n".join(lines)


def extrasText(extra):
    lines = []
    big = extra.get("big maildrop")
    if big:
        lines.append(
            f"big maildrop ({big['messages']} messages, SQLite): login->STAT {big['loginToStatMs']} ms "
            f"(median of {big['sessions']}, max {big['loginToStatMaxMs']} ms; first login incl. "
            f"password hash {big['firstLoginToStatMs']} ms), LIST {big['listMs']} ms, "
            f"UIDL {big['uidlMs']} ms, ok={big['ok']}"
        )
    big = extra.get("big maildrop postgres")
    if big:
        lines.append(
            f"big maildrop ({big['messages']} messages, PostgreSQL): login->STAT {big['loginToStatMs']} ms "
            f"(median of {big['sessions']}, max {big['loginToStatMaxMs']} ms; first login incl. "
            f"password hash {big['firstLoginToStatMs']} ms), LIST {big['listMs']} ms, "
            f"UIDL {big['uidlMs']} ms, ok={big['ok']}"
        )
    idle = extra.get("idle sessions")
    if idle:
        lines.append(
            f"{idle['sessions']} idle POP3 sessions (one mailgate process, SQLite): RSS baseline "
            f"{idle['rssBaselineMiB']} MiB, greeted {idle.get('rssGreetedMiB')} MiB, logged in (APOP) "
            f"{idle.get('rssLoggedInMiB')} MiB ({idle.get('rssPerSessionKiB')} KiB/session), after close "
            f"{idle.get('rssAfterCloseMiB')} MiB; logged in {idle.get('loggedIn')}, failures "
            f"{idle.get('failures')}; short stat sessions p50/p99 "
            f"{idle['probeWithoutIdle']['p50ms']}/{idle['probeWithoutIdle']['p99ms']} ms without, "
            f"{idle.get('probeWithIdle', {}).get('p50ms')}/{idle.get('probeWithIdle', {}).get('p99ms')} ms "
            f"with the idle sessions (errors {idle.get('probeWithIdle', {}).get('errors')})"
        )
    interleaved = interleavedText(extra)
    if interleaved:
        lines.append(interleaved)
    for key, value in extra.items():
        if key.startswith("verify"):
            lines.append(f"{key}: {'OK' if value['ok'] else 'FAILED ' + repr(value)}")
        elif key.endswith("seconds"):
            lines.append(f"{key}: {value}")
    return "\n".join(lines)


def _interleavedMedians(extra):
    """
    Per "server what" key of the interleaved rounds: the medians of rate,
    CPU and p99 over the rounds, the rates of every round, and the errors.
    """
    block = extra.get("interleaved")
    if not block:
        return {}
    medians = {}
    for key, figures in block["figures"].items():
        def median(field):
            values = [f[field] for f in figures if f[field] is not None]
            return statistics.median(values) if values else None

        medians[key] = {
            "rate": median("rate"), "cpuMs": median("cpuMs"), "p99ms": median("p99ms"),
            "rates": [f["rate"] for f in figures], "errors": sum(f["errors"] for f in figures),
        }
    return medians


def interleavedText(extra):
    medians = _interleavedMedians(extra)
    if not medians:
        return ""
    rounds = extra["interleaved"]["rounds"]
    lines = [f"interleaved rounds ({rounds}; every measurement on each server in turn; medians, then each round's rate):"]
    for key, m in medians.items():
        unit = "msgs/s" if key.endswith(("lmtp", "smtp")) else "sessions/s"
        cpu = "-" if m["cpuMs"] is None else f"{m['cpuMs']:.3f}"
        p99 = "-" if m["p99ms"] is None else f"{m['p99ms']:.2f}"
        each = ", ".join(f"{r:.0f}" for r in m["rates"])
        lines.append(f"  {key}: {m['rate']:.1f} {unit}, CPU {cpu} ms, p99 {p99} ms, errors {m['errors']} ({each})")
    return "\n".join(lines)


def interleavedTargets(extra):
    """
    The targets that compare servers, read from the interleaved rounds.
    """
    medians = _interleavedMedians(extra)
    if not medians:
        return []
    lines = []
    reference = medians.get("dovecot-hp/maildir lmtp")
    if reference and reference["rate"]:
        for backend in ("sqlite", "postgres"):
            for protocol in ("lmtp", "smtp"):
                m = medians.get(f"mailgate/{backend} {protocol}")
                if m:
                    ratio = m["rate"] / reference["rate"]
                    lines.append(
                        f"interleaved: intake >= 2x Dovecot LMTP, mailgate/{backend} {protocol.upper()}: "
                        f"{m['rate']:.0f} vs {reference['rate']:.0f} msgs/s = {ratio:.2f}x -> {_verdict(ratio >= 2)}"
                    )
    ratios = []
    for what in Suite.interleavedPop3 + ("lmtp", "smtp"):
        base, pg = medians.get(f"mailgate/sqlite {what}"), medians.get(f"mailgate/postgres {what}")
        if base and pg and pg["rate"]:
            ratios.append((base["rate"] / pg["rate"], what))
    if ratios:
        parts = ", ".join(f"{what} {ratio:.2f}x" for ratio, what in ratios)
        lines.append(
            f"interleaved: PostgreSQL within 1.5x SQLite (rate SQLite/PG, one client; intake 10 sessions): "
            f"{parts} -> {_verdict(max(ratios)[0] <= 1.5)}"
        )
    for backend in ("sqlite", "postgres"):
        m = medians.get(f"mailgate/{backend} retr1")
        if m and m["p99ms"] is not None:
            lines.append(
                f"interleaved: one-message RETR session p99 < 5 ms, mailgate/{backend}: "
                f"{m['p99ms']:.2f} ms (median of the rounds) -> {_verdict(m['p99ms'] < 5)}"
            )
    return lines


def _rows(rows, **match):
    return [r for r in rows if all(r.get(k) == v for k, v in match.items())]


def _verdict(ok):
    return "met" if ok else "NOT met"


def targetsText(rows, extra):
    """
    The issue's targets against this run's figures (a reading, not a test).
    """
    lines = []
    for backend in ("sqlite", "postgres"):
        parts, worst = [], []
        for scenario in ("stat", "list", "top", "fetchall"):
            ratios = []
            for r in _rows(rows, server="mailgate", backend=backend, scenario=scenario, login="USER/PASS"):
                ref = _rows(rows, server="dovecot-hp", scenario=scenario, concurrency=r["concurrency"], login="USER/PASS")
                if r["errors"] or (ref and ref[0]["errors"]):
                    continue  # a disturbed run (see the table)
                if ref and ref[0]["cpuMsPerSession"] and r["cpuMsPerSession"]:
                    ratios.append(r["cpuMsPerSession"] / ref[0]["cpuMsPerSession"])
            if ratios:
                parts.append(f"{scenario} {min(ratios):.2f}-{max(ratios):.2f}x")
                worst.append(max(ratios))
        if parts:
            lines.append(
                f"CPU per POP3 session <= 1.0x Dovecot hp, mailgate/{backend} (its own process): "
                f"{', '.join(parts)} -> {_verdict(max(worst) <= 1.0)}"
            )
    reference = [r for r in _rows(rows, server="dovecot-hp", kind="intake") if r["scenario"].startswith("lmtp")]
    if reference:
        ref = reference[0]["messagesPerSecond"]
        for r in _rows(rows, server="mailgate", kind="intake"):
            ratio = r["messagesPerSecond"] / ref if ref else 0
            lines.append(
                f"intake >= 2x Dovecot LMTP msgs/s (10 sessions, 4 KB), mailgate/{r['backend']} "
                f"{r['protocol']}: {r['messagesPerSecond']:.0f} vs {ref:.0f} msgs/s = {ratio:.2f}x -> {_verdict(ratio >= 2)}"
            )
    for r in _rows(rows, server="mailgate", scenario="retr1", concurrency=1):
        if r["p99ms"] is not None:
            lines.append(
                f"one-message RETR session p99 < 5 ms at concurrency 1, mailgate/{r['backend']}: "
                f"{r['p99ms']:.2f} ms -> {_verdict(r['p99ms'] < 5)}"
            )
    for key, backend in (("big maildrop", "SQLite"), ("big maildrop postgres", "PostgreSQL")):
        big = extra.get(key)
        if big:
            lines.append(
                f"{big['messages']}-message maildrop login->STAT < 100 ms ({backend}): {big['loginToStatMs']:.1f} ms "
                f"-> {_verdict(big['loginToStatMs'] < 100 and big['ok'])}"
            )
    idle = extra.get("idle sessions")
    if idle and idle.get("rssLoggedInMiB") is not None:
        p99 = idle.get("probeWithIdle", {}).get("p99ms")
        lines.append(
            f"{idle['sessions']} idle sessions < 1 GiB RSS and p99 < 50 ms for others: "
            f"{idle['rssLoggedInMiB']:.0f} MiB, p99 {p99} ms -> "
            f"{_verdict(idle['rssLoggedInMiB'] < 1024 and p99 is not None and p99 < 50 and idle.get('loggedIn') == idle['sessions'])}"
        )
    rates, cpus = [], []
    for r in _rows(rows, server="mailgate", backend="postgres", kind="pop3", login="USER/PASS"):
        base = _rows(rows, server="mailgate", backend="sqlite", kind="pop3", login="USER/PASS",
                     scenario=r["scenario"], concurrency=r["concurrency"])
        if r["errors"] or (base and base[0]["errors"]):
            continue  # a disturbed run (see the table)
        if base and r["sessionsPerSecond"] and base[0]["cpuMsPerSession"]:
            rates.append((base[0]["sessionsPerSecond"] / r["sessionsPerSecond"], r["scenario"], r["concurrency"]))
            total = r["cpuMsPerSession"] + (r.get("extraCpuMsPerSession") or 0)
            cpus.append((r["cpuMsPerSession"] / base[0]["cpuMsPerSession"], total / base[0]["cpuMsPerSession"], r["scenario"], r["concurrency"]))
    if rates:
        worstRate = max(rates)
        worstCpu = max(cpus)
        worstTotal = max(cpus, key=lambda c: c[1])
        lines.append(
            f"PostgreSQL within 1.5x SQLite: sessions/s SQLite/PG up to {worstRate[0]:.2f}x ({worstRate[1]} x{worstRate[2]}); "
            f"mailgate CPU/session PG/SQLite up to {worstCpu[0]:.2f}x ({worstCpu[2]} x{worstCpu[3]}), "
            f"with PostgreSQL's own CPU up to {worstTotal[1]:.2f}x ({worstTotal[2]} x{worstTotal[3]}) "
            f"-> throughput {_verdict(worstRate[0] <= 1.5)}, mailgate CPU {_verdict(worstCpu[0] <= 1.5)}"
        )
    lines += interleavedTargets(extra)
    return "\n".join(lines)


# -- main ------------------------------------------------------------------------------


def parseArgs(argv):
    parser = argparse.ArgumentParser(description="The mailgate benchmark suite.")
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny corpus, short runs")
    parser.add_argument("--duration", type=float, default=None, help="seconds per measurement (default 5, --quick 0.5)")
    parser.add_argument("--concurrency", default=None, help="comma-separated (default 1,10,50; --quick 1,4)")
    parser.add_argument("--scenarios", default="stat,list,top,fetchall")
    parser.add_argument("--users", type=int, default=None)
    parser.add_argument("--messages", type=int, default=None)
    parser.add_argument("--intake-messages", type=int, default=None, help="messages per intake run (default 2000; --quick 60)")
    parser.add_argument("--intake-sessions", type=int, default=10)
    parser.add_argument("--intake-size", type=int, default=4096)
    parser.add_argument("--big-messages", type=int, default=None, help="default 100000; --quick 2000")
    parser.add_argument("--big-repeats", type=int, default=5)
    parser.add_argument("--idle-sessions", type=int, default=None, help="default 10000; --quick 200")
    parser.add_argument("--dovecot", dest="dovecot", action="store_true", default=None, help="run the Dovecot comparison (default: if installed)")
    parser.add_argument("--no-dovecot", dest="dovecot", action="store_false")
    parser.add_argument("--dovecot-variants", default="hp,default")
    parser.add_argument("--no-postgres", action="store_true", help="skip PostgreSQL even if MAILGATE_TEST_POSTGRES is set")
    parser.add_argument("--no-big", action="store_true", help="skip the 100k maildrop and idle sessions")
    parser.add_argument("--only", default="sqlite,postgres,dovecot,big", help="parts to run")
    parser.add_argument("--apop-all", action="store_true", help="APOP runs on PostgreSQL too")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds for the targets that compare servers (default 3; --quick 1; 0: none)")
    parser.add_argument("--quiet-wait", type=float, default=None, help="before each measurement, wait up to this many seconds for the machine to be idle (default 10; --quick 0)")
    parser.add_argument("--quiet-threshold", type=float, default=0.25, help="idle means at most this many cores busy (default 0.25)")
    parser.add_argument("--bin", default=os.path.dirname(sys.executable), help="where twistd and mailgate are")
    parser.add_argument("--workdir", default=None, help="keep data here (default: a temporary directory, removed)")
    parser.add_argument("--output", default=None, help="write results.json and results.md here")
    args = parser.parse_args(argv)
    quick = args.quick
    args.duration = args.duration or (0.5 if quick else 5.0)
    args.concurrency = [int(c) for c in (args.concurrency or ("1,4" if quick else "1,10,50")).split(",")]
    args.scenarios = args.scenarios.split(",")
    args.users = args.users or (3 if quick else corpusModule.STANDARD_USERS)
    args.messages = args.messages or (6 if quick else corpusModule.STANDARD_MESSAGES)
    args.intake_messages = args.intake_messages or (60 if quick else 2000)
    args.big_messages = args.big_messages or (2000 if quick else 100_000)
    args.idle_sessions = args.idle_sessions or (200 if quick else 10_000)
    args.big_repeats = 2 if quick else args.big_repeats
    if args.rounds is None:
        args.rounds = 1 if quick else 3
    if args.quiet_wait is None:
        args.quiet_wait = 0 if quick else 10
    args.dovecot_variants = args.dovecot_variants.split(",")
    args.only = set(args.only.split(","))
    if args.no_big:
        args.only.discard("big")
    if args.no_postgres:
        args.only.discard("postgres")
    if args.dovecot is None:
        args.dovecot = dovecotModule.available()
    if not args.dovecot:
        args.only.discard("dovecot")
    return args


def main(argv=None):
    args = parseArgs(sys.argv[1:] if argv is None else argv)
    for tool in ("twistd", "mailgate"):
        if not os.access(os.path.join(args.bin, tool), os.X_OK):
            print(f"run.py: no {tool} in {args.bin}; run `make install` or pass --bin", file=sys.stderr)
            return 2
    pop3load.raiseFileLimit()
    ownWorkdir = args.workdir is None
    workdir = os.path.abspath(args.workdir or tempfile.mkdtemp(prefix="mailgate-bench-"))
    os.makedirs(workdir, exist_ok=True)
    # Dovecot's unprivileged processes (auth, mail) must reach their files.
    os.chmod(workdir, 0o755)
    suite = Suite(args)
    started = datetime.datetime.now(datetime.timezone.utc)
    info = machineInfo(args.bin)
    info["loadavgBefore"] = open("/proc/loadavg").read().split()[:3]
    log(f"work directory {workdir}; machine {info}")
    summary = suite.corpus.summary()
    log(f"corpus {summary}")
    postgres = os.environ.get("MAILGATE_TEST_POSTGRES")
    if "postgres" in args.only and not postgres:
        suite.notes.append("PostgreSQL skipped: MAILGATE_TEST_POSTGRES is not set (make bench sets it)")
        args.only.discard("postgres")
    schema = None
    try:
        sqlitePath = os.path.join(workdir, "corpus.sqlite3")
        sqliteURL = "sqlite:///" + sqlitePath
        if args.only & {"sqlite", "postgres"}:
            seconds = loadMailgate(args.bin, sqliteURL, suite.corpus, os.path.join(workdir, "files"), intakeUsers())
            suite.extra["corpus load seconds (mailgate CLI)"] = round(seconds, 1)
            log(f"corpus loaded into SQLite with the mailgate CLI in {seconds:.1f} s")
        if "postgres" in args.only:
            schema = "bench_" + secrets.token_hex(4)
            psql(postgres, f"CREATE SCHEMA {schema}")
            pgURL = withSchema(postgres, schema)
            began = time.monotonic()
            mailgateCLI(args.bin, sqliteURL, ["db", "copy", "--from", sqliteURL, "--to", pgURL], timeout=600)
            checkMailbox(args.bin, pgURL, suite.corpus)
            suite.extra["postgres copy seconds (mailgate db copy)"] = round(time.monotonic() - began, 1)
            info["postgresql"] = psql(postgres, "SHOW server_version")
        if "sqlite" in args.only:
            suite.mailgate("sqlite", sqliteURL, workdir)
        if "postgres" in args.only:
            suite.mailgate("postgres", pgURL, workdir, extraPids=postgresRoots)
        if "dovecot" in args.only:
            suite.dovecot(workdir)
        if args.rounds and args.only & {"sqlite", "postgres"}:
            suite.interleaved(workdir, sqliteURL, pgURL if "postgres" in args.only else None)
        if "big" in args.only:
            suite.big(workdir)
            if postgres and "postgres" in args.only:
                bigSchema = "bench_big_" + secrets.token_hex(4)
                psql(postgres, f"CREATE SCHEMA {bigSchema}")
                try:
                    suite.bigPostgres(workdir, withSchema(postgres, bigSchema))
                finally:
                    psql(postgres, f"DROP SCHEMA {bigSchema} CASCADE")
    finally:
        if schema is not None:
            try:
                psql(postgres, f"DROP SCHEMA {schema} CASCADE")
            except Exception as e:  # noqa: BLE001
                log(f"could not drop schema {schema}: {e}")
        info["loadavgAfter"] = open("/proc/loadavg").read().split()[:3]
        results = {
            "started": started.isoformat(timespec="seconds"),
            "argv": sys.argv,
            "args": {k: (sorted(v) if isinstance(v, set) else v) for k, v in vars(args).items()},
            "machine": info,
            "corpus": summary,
            "rows": suite.rows,
            "extra": suite.extra,
            "notes": suite.notes,
        }
        output = args.output or (workdir if not ownWorkdir else None)
        if output:
            os.makedirs(output, exist_ok=True)
            with open(os.path.join(output, "results.json"), "w") as f:
                json.dump(results, f, indent=1, default=str)
            with open(os.path.join(output, "results.md"), "w") as f:
                f.write(
                    markdownTable(suite.rows) + "\n\n" + extrasText(suite.extra) + "\n\n"
                    + targetsText(suite.rows, suite.extra) + "\n"
                )
        if ownWorkdir:
            shutil.rmtree(workdir, ignore_errors=True)
    print()
    print(f"mailgate benchmarks, {started:%Y-%m-%d %H:%M} UTC; {info['nproc']} x {info['cpu']}, "
          f"Linux {info['kernel']}, Python {info['python']}, Twisted {info['twisted']}, "
          f"Dovecot {info['dovecot'] or '-'}, PostgreSQL {info.get('postgresql', '-')}")
    print(f"corpus: {summary}; {args.duration} s per measurement; CPU = server process tree "
          f"(utime+stime, /proc); '+DB ms' = PostgreSQL processes; conc (n) = n sessions at once at most")
    print(textTable(suite.rows))
    extras = extrasText(suite.extra)
    if extras:
        print()
        print(extras)
    targets = targetsText(suite.rows, suite.extra)
    if targets:
        print()
        print("Targets (issue \"Performance\"):")
        print(targets)
    for note in suite.notes:
        print("note:", note)
    if output:
        print(f"\nresults written to {output}/results.json and results.md")
    failed = [k for k, v in suite.extra.items() if k.startswith("verify") and not v["ok"]]
    failed += [r["server"] + "/" + r["scenario"] for r in suite.rows if r.get("verification") and not r["verification"]["ok"]]
    if failed:
        print("VERIFICATION FAILED:", ", ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
