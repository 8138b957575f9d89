"""
The mailgate benchmark suite (what C{make bench} runs).

    .venv/bin/python benchmarks/run.py [--quick] [--duration 4] [--rounds 3] [--output DIR]

  1. Writes the standard corpus (20 users x 50 messages, benchmarks/corpus.py)
     and loads it into a fresh SQLite database with the mailgate CLI
     (C{mailgate user add --password-stdin --apop}, C{mailgate deliver}),
     checks every maildrop with C{mailgate mailbox list}, and copies it to a
     fresh PostgreSQL schema with C{mailgate db copy} when
     C{MAILGATE_TEST_POSTGRES} is set (C{make bench} starts PostgreSQL the
     way C{make test} does).  Makes a self-signed RSA 2048 certificate
     (benchmarks/tlscert.py) for POP3 over TLS.
  2. The comparison, in interleaved rounds: mailgate on SQLite, mailgate
     on PostgreSQL and Dovecot hp (benchmarks/dovecot.py) run at once, with
     warm credentials on both sides (mailgate's verified-login cache, warmed
     by a verification pass that also checks every message octet for octet;
     Dovecot's {PLAIN} passwords and auth cache).  Each round makes every
     measurement on each server in turn: the POP3 scenarios (stat, list,
     top, fetchall) at each concurrency (1 and 10) over plain TCP and over
     implicit TLS (TLS 1.3), a one-message RETR session at one client,
     three access patterns at one client (every message from the newest
     back; every header, then a few messages here and there; every
     message in order, the large ones' headers only), and
     LMTP and SMTP intake (10 sessions, 4 KB messages, verified after the
     rounds), and LMTP intake with each message in one BDAT chunk (RFC 3030
     CHUNKING) instead of DATA.  A row is the medians over the rounds; so a slow spell of
     the machine falls on every server alike, and a measurement during
     which the hypervisor took more than --steal-limit cores is taken
     again (L{Suite.measureCalm}).
  3. Cold logins, interleaved the same way: mailgate with
     C{--auth-cache-size 0} against Dovecot hp with {SHA512-CRYPT} and no
     auth cache, the stat scenario at 1 and 10 clients.
  4. A 100,000-message maildrop side by side: mailgate on SQLite and on
     PostgreSQL, and Dovecot hp on a maildir of the same messages (indexed
     by a first login): login to STAT answer, LIST and UIDL.  10,000
     concurrent idle POP3 sessions in one mailgate process (RSS) while
     another client measures short sessions, over plain TCP and then
     over implicit TLS.
  5. With py-spy (C{make bench} installs it): a profile of the mailgate
     server while one scenario runs (C{--profile}), the top entries by own
     time written to profile-SCENARIO.txt.
  6. Prints the tables (every row, then the side-by-side comparison with
     the targets), and writes results.json and results.md into the output
     directory.

Every server is started here and stopped in a finally block; every wait is
bounded.  Nothing is asserted about timings: the figures are printed.
"""

import argparse
import asyncio
import concurrent.futures
import datetime
import json
import os
import platform
import re
import resource
import secrets
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from urllib.parse import quote

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import corpus as corpusModule  # noqa: E402
import dovecot as dovecotModule  # noqa: E402
import pop3load  # noqa: E402
import pyspy  # noqa: E402
import report  # noqa: E402
import smtpload  # noqa: E402
import tlscert  # noqa: E402
from mailgate.affinity import formatCPUs, parseCPUs  # noqa: E402

DEADLINE = 60.0
STOP_GRACE = 15.0
HOSTNAME = "mailgate.bench.test"
INTAKE_USERS = 10
#: The intake measurements: the protocol, and whether each message goes as
#: one BDAT chunk (RFC 3030) instead of DATA.  Dovecot's LMTP offers
#: CHUNKING as mailgate's does, so both are measured both ways.
INTAKE_SCENARIOS = {"lmtp": ("lmtp", False), "smtp": ("smtp", False), "lmtp-bdat": ("lmtp", True)}
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

    def __init__(self, bindir, database, logPath, lmtp=True, smtp=True, options=(), tls=None, cpus=None):
        self.bindir = bindir
        self.database = database
        self.logPath = logPath
        self.lmtp = lmtp
        self.smtp = smtp
        self.tls = tls
        self.options = list(options) + (["--cpu-affinity", cpus] if cpus else [])
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
        if self.tls:
            argv += ["--pop3s", "tcp:0:interface=127.0.0.1", "--tls-cert", self.tls[0], "--tls-key", self.tls[1]]
            if len(self.tls) == 4:
                argv += ["--tls-alt-cert", self.tls[2], "--tls-alt-key", self.tls[3]]
        return argv + self.options

    def start(self):
        expected = {"POP3"} | ({"LMTP"} if self.lmtp else set()) | ({"SMTP"} if self.smtp else set())
        expected |= {"POP3S"} if self.tls else set()
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


def loadMailgate(bindir, database, corpus, extraUsers=(), workers=None):
    """
    Load the corpus: users with the CLI (with APOP, so both login kinds
    work), then every message as an LMTP delivery stores it, in order per
    user and several users at a time: the body once, and the copy's own
    C{Return-Path:} and C{Delivered-To:} in a row of their own
    (L{corpusModule.Corpus.copyFields}; C{--delivered-to final}, the
    default), so that RETR and TOP read what a real maildrop's copies make
    them read (the fields put before the body) while serving the octets
    Dovecot's maildir holds.  The store's own delivery, in this process:
    C{mailgate deliver} has no way to give those fields without the
    Received: field it writes too.  Then every maildrop is checked with
    C{mailgate mailbox list}.  Returns the seconds it took.
    """
    from mailgate.message import spoolBytes
    from mailgate.store import openSynchronousStore
    from mailgate.testing import resultOf

    began = time.monotonic()
    for user in list(corpus.users) + list(extraUsers):
        mailgateCLI(bindir, database, ["user", "add", user, "--password-stdin", "--apop"], corpus.password + "\n")

    def deliverAll(user):
        store = openSynchronousStore(database)
        try:
            for data in corpus.messages(user):
                fields, body = corpus.copyFields(data)
                source = spoolBytes(body)
                source.copyPrefixes = {user: fields}
                try:
                    resultOf(store.deliver([user], source))
                finally:
                    source.close()
        finally:
            store.close()
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


def verifyPop3(port, corpus, digests, apop=False, tls=False):
    """
    Every user's maildrop once through POP3 (fetchall), octet for octet
    against the corpus; also warms the server up (caches, indexes, and
    mailgate's verified-login cache).
    """
    result = runLoad(
        port=port, users=corpus.users, password=corpus.password, scenario="fetchall",
        concurrency=min(4, len(corpus.users)), duration=600, sessions=len(corpus.users),
        expected=digests, apop=apop, settle=0, tls=tls,
    )
    ok = result.errors == 0 and result.sessions == len(corpus.users)
    if tls:
        ok = ok and set(result.tlsVersions) == {"TLSv1.3"}
    if not ok:
        log(f"VERIFICATION FAILED on port {port}: {result.summary()}")
    return {"ok": ok, "sessions": result.sessions, "errors": result.errorKinds, "tlsVersions": result.tlsVersions}


# -- what is measured, on what -----------------------------------------------------


@dataclass(frozen=True)
class Measurement:
    """
    One measurement of a round: a POP3 scenario (over plain TCP or TLS,
    with USER/PASS or APOP) at a concurrency, or intake (C{scenario}
    "lmtp", "smtp" or "lmtp-bdat", L{INTAKE_SCENARIOS}; C{concurrency}
    sessions).
    """

    kind: str
    scenario: str
    concurrency: int
    transport: str = "plain"
    login: str = "USER/PASS"

    @property
    def intakeProtocol(self):
        """
        The listener an intake measurement sends to: C{"lmtp"} or
        C{"smtp"}.
        """
        return INTAKE_SCENARIOS[self.scenario][0]

    @property
    def bdat(self):
        """
        Whether an intake measurement sends each message in a BDAT chunk.
        """
        return INTAKE_SCENARIOS[self.scenario][1]

    def describe(self):
        if self.kind == "intake":
            return f"{self.scenario} x{self.concurrency}"
        login = " APOP" if self.login == "APOP" else ""
        return f"{self.scenario} {self.transport}{login} x{self.concurrency}"


class Target:
    """
    A running server the rounds measure: its name in the tables, its
    listeners (C{pop3}, C{pop3s}, C{lmtp}, C{smtp}; absent ones are not
    measured), the process trees whose CPU counts, and how to read back
    what intake delivered (C{tokens()}, for the verification).
    """

    def __init__(self, server, backend, credentials, ports, pids, extraPids=(), tokens=None):
        self.server = server
        self.backend = backend
        self.credentials = credentials
        self.ports = {k: v for k, v in ports.items() if v}
        self.pids = list(pids)
        self.extraPids = extraPids
        self.tokens = tokens

    @property
    def name(self):
        cold = " (cold)" if self.credentials == "cold" else ""
        return f"{self.server}/{self.backend}{cold}"

    def port(self, measurement):
        if measurement.kind == "intake":
            return self.ports.get(measurement.intakeProtocol)
        return self.ports.get("pop3s" if measurement.transport == "tls" else "pop3")


def mailgatePorts(server):
    return {name.lower(): port for name, port in server.ports.items()}


def copySqlite(source, destination):
    """
    A consistent copy of a SQLite database (the backup API), for a second
    server that must not share the first one's file.
    """
    src = sqlite3.connect(source, timeout=30)
    dst = sqlite3.connect(destination)
    try:
        src.backup(dst)
    finally:
        dst.close()
        src.close()


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
        # Measurements taken again because of steal (measureCalm).
        self.stealRepeats = 0

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

    # -- the interleaved rounds ---------------------------------------------------

    def warmMeasurements(self):
        """
        What each round of the comparison measures, in order: the POP3
        scenarios over each transport at each concurrency, the one-message
        session, APOP (with --apop), then intake.
        """
        args = self.args
        measurements = []
        for transport in args.transports:
            for scenario in args.scenarios:
                for concurrency in args.concurrency:
                    measurements.append(Measurement("pop3", scenario, concurrency, transport))
        measurements.append(Measurement("pop3", "retr1", 1))
        # Clients that do not go through the maildrop from the first
        # message on: the read-ahead's worst cases beside its best.
        for scenario in ("newest", "pick", "limit"):
            measurements.append(Measurement("pop3", scenario, 1))
        if args.apop:
            for scenario in ("stat", "fetchall"):
                measurements.append(Measurement("pop3", scenario, 10, "plain", "APOP"))
        if not args.no_intake:
            for scenario in args.intake_scenarios:
                measurements.append(Measurement("intake", scenario, args.intake_sessions))
        return measurements

    def measure(self, target, port, m):
        if m.kind == "intake":
            return asyncio.run(
                smtpload.runIntake(
                    port, intakeUsers(), lmtp=m.intakeProtocol == "lmtp", sessions=m.concurrency,
                    messages=self.args.intake_messages, size=self.args.intake_size,
                    serverPids=target.pids, extraPids=target.extraPids, bdat=m.bdat,
                )
            )
        return runLoad(
            port=port, users=self.corpus.users, password=self.corpus.password, scenario=m.scenario,
            concurrency=m.concurrency, duration=self.args.duration, serverPids=target.pids,
            extraPids=target.extraPids, apop=m.login == "APOP", tls=m.transport == "tls",
        )

    def measureCalm(self, target, port, m, label):
        """
        One measurement, after the idle check; taken again (at most
        --steal-retries times) while the hypervisor took more than
        --steal-limit cores from this machine during it.  Steal makes the
        same work cost more CPU for whichever server it falls on (up to
        twice as much, RESULTS.md), and interleaving cannot even that out
        when it falls on one server's measurements and not the other's.
        The last attempt is kept whatever its steal; C{self.stealRepeats}
        counts the measurements taken again.
        """
        limit, retries = self.args.steal_limit, self.args.steal_retries
        for attempt in range(retries + 1):
            self.quiet()
            result = self.measure(target, port, m)
            steal = getattr(result, "stealCores", None)
            if not limit or steal is None or steal <= limit or attempt == retries:
                return result
            self.stealRepeats += 1
            log(f"{label}, {target.name}: {m.describe()}: steal {steal:.2f} cores > {limit:g}, measured again")

    def rounds(self, targets, measurements, label):
        """
        --rounds rounds; in each, every measurement on each target in
        turn (the targets' order rotated from round to round).  Then the
        intake runs are verified (every acknowledged message exactly once
        in its recipient's maildrop), and one row per target and
        measurement (the medians over the rounds, L{report.aggregate}) is
        added, grouped by measurement.
        """
        results = {}
        # (target, measurement) a server cannot take: BDAT without CHUNKING.
        unable = set()
        total = self.args.rounds
        for number in range(total):
            shift = number % len(targets)
            order = targets[shift:] + targets[:shift]
            for m in measurements:
                for target in order:
                    port = target.port(m)
                    if port is None or (target.name, m) in unable:
                        continue
                    try:
                        result = self.measureCalm(target, port, m, label)
                    except smtpload.ChunkingNotOffered as e:
                        # Not measured, and said so: DATA's figures under
                        # BDAT's name would be worse than no row.
                        unable.add((target.name, m))
                        self.notes.append(f"{label}, {target.name}: {m.describe()} not measured: {e}")
                        log(f"{label}, {target.name}: {m.describe()} NOT MEASURED: {e}")
                        continue
                    results.setdefault((target.name, m), []).append((result, self._lastQuiet))
                    log(f"{label} round {number + 1}/{total}, {target.name}: {result.summary()}")
        for target in targets:
            intakes = [r for (name, m), runs in results.items() if name == target.name and m.kind == "intake"
                       for r, _ in runs]
            if intakes and target.tokens is not None:
                found = target.tokens()
                for result in intakes:
                    smtpload.verify(result, found)
                    if not result.verified:
                        log(f"INTAKE VERIFICATION FAILED, {target.name}: {result.verification}")
        for m in measurements:
            for target in targets:
                runs = results.get((target.name, m))
                if not runs:
                    continue
                dicts = []
                for result, quiet in runs:
                    d = result.asDict()
                    d["quietWaited"] = quiet["waited"] if quiet else None
                    dicts.append(d)
                row = {
                    "server": target.server, "backend": target.backend, "credentials": target.credentials,
                    "kind": m.kind, "transport": m.transport, "login": m.login if m.kind == "pop3" else "-",
                    **report.aggregate(dicts),
                }
                if m.kind == "intake":
                    row["scenario"] = f"{m.scenario} {self.args.intake_size // 1024}KB"
                    row["concurrency"] = row["sessions"] = m.concurrency
                self.rows.append(row)

    def verifyTargets(self, targets, apop=False):
        """
        Every target serves every maildrop once, octet for octet against
        the corpus, over each transport it listens on (and with APOP).
        """
        for target in targets:
            for transport, key in (("plain", "pop3"), ("tls", "pop3s")):
                if key in target.ports:
                    self.extra[f"verify {target.name} {transport}"] = verifyPop3(
                        target.ports[key], self.corpus, self.digests, tls=transport == "tls"
                    )
            if apop and target.credentials == "warm":
                self.extra[f"verify {target.name} APOP"] = verifyPop3(
                    target.ports["pop3"], self.corpus, self.digests, apop=True
                )

    def comparison(self, workdir, sqliteURL, pgURL, tls):
        """
        Mailgate on SQLite (and PostgreSQL) and Dovecot hp, warm
        credentials, all running at once; verified, then measured in
        interleaved rounds.
        """
        only = self.args.only
        targets, mailgates, dovecots = [], [], []
        try:
            databases = []
            if "sqlite" in only:
                databases.append(("sqlite", sqliteURL, ()))
            if pgURL is not None:
                databases.append(("postgres", pgURL, postgresRoots))
            for backend, url, extraPids in databases:
                server = MailgateServer(self.bindir, url, os.path.join(workdir, f"mailgate-{backend}.log"), tls=tls,
                                        cpus=self.args.mailgate_cpus)
                mailgates.append(server)
                server.start()
                log(f"mailgate on {backend}: pid {server.pid}, ports {server.ports}")
                port = server.ports["POP3"]

                def viaPop3(port=port):
                    return asyncio.run(smtpload.tokensFromPOP3(port, intakeUsers(), self.corpus.password))

                targets.append(Target("mailgate", backend, "warm", mailgatePorts(server), [server.pid],
                                      extraPids, viaPop3))
            if "dovecot" in only:
                # With --mailgate-cpus, Dovecot hp runs twice: as it is, and
                # pinned to the same CPUs; each cell compares with the better.
                variants = [("hp", None)] + ([("hp", "pinned")] if self.args.mailgate_cpus else [])
                variants += [("default", None)] if self.args.dovecot_default else []
                for variant, pinned in variants:
                    name = f"dovecot-{variant}" + (f"-{pinned}" if pinned else "")
                    dv = dovecotModule.Dovecot(os.path.join(workdir, name), variant=variant,
                                               credentials="warm", tls=tls)
                    dovecots.append(dv)
                    dv.loadCorpus(self.corpus)
                    dv.addUsers(intakeUsers(), self.corpus.password)
                    dv.start()
                    if pinned:
                        dv.pin(parseCPUs(self.args.mailgate_cpus))
                    log(f"{name}: master pid {dv.pid}, POP3 {dv.pop3Port}, POP3S {dv.pop3sPort}, "
                        f"LMTP {dv.lmtpPort}" + (f", on CPU {self.args.mailgate_cpus}" if pinned else ""))
                    maildirs = {u: dv.maildir(u) for u in intakeUsers()}
                    targets.append(Target(
                        name, "maildir", "warm",
                        {"pop3": dv.pop3Port, "pop3s": dv.pop3sPort, "lmtp": dv.lmtpPort}, [dv.pid],
                        tokens=lambda maildirs=maildirs: smtpload.tokensFromMaildirs(maildirs),
                    ))
            if not targets:
                return
            self.verifyTargets(targets, apop=self.args.apop)
            self.rounds(targets, self.warmMeasurements(), "comparison")
            for server in mailgates:
                errors = server.errorsLogged()
                if errors:
                    self.notes.append(f"{os.path.basename(server.logPath)} logged errors: {errors[:5]}")
            for dv in dovecots:
                errors = dv.errorsLogged()
                if errors:
                    self.notes.append(f"dovecot-{dv.variant} logged errors: {errors[:5]}")
        finally:
            for server in mailgates:
                server.stop()
            for dv in dovecots:
                dv.stop()

    def cold(self, workdir, sqlitePath):
        """
        The cold-login figure: mailgate with --auth-cache-size 0 (on a
        copy of the SQLite database) against Dovecot hp with
        {SHA512-CRYPT} passwords and no auth cache, the stat scenario at
        the run's concurrencies up to 10, in interleaved rounds.
        """
        targets, server, dv = [], None, None
        try:
            coldPath = os.path.join(workdir, "cold.sqlite3")
            copySqlite(sqlitePath, coldPath)
            server = MailgateServer(
                self.bindir, "sqlite:///" + coldPath, os.path.join(workdir, "mailgate-cold.log"),
                lmtp=False, smtp=False, options=["--auth-cache-size", "0"], cpus=self.args.mailgate_cpus,
            )
            server.start()
            targets.append(Target("mailgate", "sqlite", "cold", mailgatePorts(server), [server.pid]))
            if self.args.dovecot:
                dv = dovecotModule.Dovecot(os.path.join(workdir, "dovecot-cold"), variant="hp", credentials="cold")
                dv.loadCorpus(self.corpus)
                dv.start()
                targets.append(Target("dovecot-hp", "maildir", "cold", {"pop3": dv.pop3Port}, [dv.pid]))
            self.verifyTargets(targets)
            levels = [c for c in self.args.concurrency if c <= 10] or self.args.concurrency[:1]
            self.rounds(targets, [Measurement("pop3", "stat", c) for c in levels], "cold logins")
            errors = server.errorsLogged()
            if errors:
                self.notes.append(f"mailgate (cold) logged errors: {errors[:5]}")
        finally:
            if server is not None:
                server.stop()
            if dv is not None:
                dv.stop()

    # -- big maildrop, idle sessions --------------------------------------

    def big(self, workdir, maildrop=True, idle=True, tls=None):
        """
        The big maildrop's login and listing, then the idle sessions: over
        plain TCP and, with C{tls} (certificate and key paths), once more
        over implicit TLS, where each session also holds its TLS state.
        """
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
        idleUsers = [f"idle{i:05d}@{corpusModule.DOMAIN}" for i in range(1, args.idle_sessions + 1)] if idle else []
        self.notes.extend(fillBigDatabase(path, bigUser, args.big_messages, idleUsers, password))
        self.extra["big load seconds"] = round(time.monotonic() - began, 1)
        # The idle sessions are more than --max-connections allows by
        # default (5000): the limit is raised for this server, as an
        # administrator expecting that many clients would.
        server = MailgateServer(
            self.bindir, database, os.path.join(workdir, "mailgate-big.log"), lmtp=False, smtp=False,
            options=["--max-connections", str(2 * args.idle_sessions + 100),
                     "--memory-trim-interval", str(IDLE_TRIM_INTERVAL)],
            tls=tls, cpus=args.mailgate_cpus,
        )
        try:
            server.start()
            port = server.ports["POP3"]
            if maildrop:
                self.quiet()
                self.extra["big maildrop"] = asyncio.run(bigMaildrop(port, bigUser, password, args.big_messages, args.big_repeats))
                log(f"big maildrop on SQLite: {self.extra['big maildrop']}")
            if idle:
                self.quiet()
                self.extra["idle sessions"] = asyncio.run(
                    idleSessions(server.pid, port, idleUsers, password, probe, args.duration)
                )
                log(f"idle sessions: {self.extra['idle sessions']}")
                if tls is not None:
                    self.quiet()
                    self.extra["idle sessions tls"] = asyncio.run(
                        idleSessions(server.pid, port, idleUsers, password, probe, args.duration,
                                     tlsPort=server.ports["POP3S"])
                    )
                    log(f"idle sessions over TLS: {self.extra['idle sessions tls']}")
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
        server = MailgateServer(self.bindir, url, os.path.join(workdir, "mailgate-big-postgres.log"), lmtp=False, smtp=False,
                                cpus=self.args.mailgate_cpus)
        try:
            server.start()
            self.quiet()
            self.extra["big maildrop postgres"] = asyncio.run(
                bigMaildrop(server.ports["POP3"], bigUser, password, args.big_messages, args.big_repeats)
            )
            log(f"big maildrop on PostgreSQL: {self.extra['big maildrop postgres']}")
        finally:
            server.stop()

    def bigDovecot(self, workdir):
        """
        The same big maildrop in Dovecot hp (warm credentials): the same
        message --big-messages times in one user's maildir (hard links of
        a few files), indexed by a first login (timed apart), then the
        same timed sessions as mailgate's.
        """
        args = self.args
        password = self.corpus.password
        bigUser = f"big@{corpusModule.DOMAIN}"
        dv = dovecotModule.Dovecot(os.path.join(workdir, "dovecot-big"), variant="hp", credentials="warm")
        try:
            dv.addUsers([bigUser], password)
            began = time.monotonic()
            writeBigMaildir(dv.maildir(bigUser), self.corpus.message(0, 1), args.big_messages, dv.uid, dv.gid)
            written = time.monotonic() - began
            dv.start()
            self.quiet()
            indexSeconds = asyncio.run(firstLogin(dv.pop3Port, bigUser, password, args.big_messages))
            log(f"big maildrop in Dovecot: {args.big_messages} files written in {written:.1f} s, "
                f"indexed by a first login in {indexSeconds:.1f} s")
            self.quiet()
            result = asyncio.run(bigMaildrop(dv.pop3Port, bigUser, password, args.big_messages, args.big_repeats))
            result["indexSeconds"] = round(indexSeconds, 2)
            result["writeSeconds"] = round(written, 2)
            self.extra["big maildrop dovecot"] = result
            log(f"big maildrop in Dovecot: {result}")
            errors = dv.errorsLogged()
            if errors:
                self.notes.append(f"dovecot-big logged errors: {errors[:5]}")
        finally:
            dv.stop()

    # -- profile ---------------------------------------------------------------

    def profile(self, workdir, sqliteURL, outputDir, tls):
        """
        py-spy on a mailgate server (SQLite, warm credentials) while
        --profile-clients clients run each --profile scenario ("fetchall",
        or "fetchall+tls" over TLS) for --profile-seconds, once per
        --profile-modes mode (L{pyspy.MODES}: the GIL holder's samples, all
        active samples).  profile-SCENARIO.txt in the output directory gets
        the top entries by own time of each mode; the raw stacks go to
        profile-SCENARIO-MODE.raw.
        """
        args = self.args
        executable = pyspy.find(self.bindir)
        if executable is None:
            self.notes.append("profile skipped: py-spy is not installed (make bench installs it into .venv)")
            return
        os.makedirs(outputDir, exist_ok=True)
        server = MailgateServer(self.bindir, sqliteURL, os.path.join(workdir, "mailgate-profile.log"),
                                lmtp=False, smtp=False, tls=tls, cpus=args.mailgate_cpus)
        try:
            server.start()
            for spec in args.profile:
                scenario, _, mode = spec.partition("+")
                overTLS = mode == "tls"
                if overTLS and not tls:
                    self.notes.append(f"profile {spec} skipped: no TLS in this run")
                    continue
                port = server.ports["POP3S" if overTLS else "POP3"]
                verifyPop3(port, self.corpus, self.digests, tls=overTLS)  # warms the login cache
                sections, modes = [], {}
                for pyspyMode in args.profile_modes:
                    section = self._profileOnce(executable, server, port, spec, scenario, overTLS, pyspyMode, outputDir)
                    if section is not None:
                        sections.append(section[0])
                        modes[pyspyMode] = section[1]
                if not sections:
                    continue
                path = os.path.join(outputDir, f"profile-{spec}.txt")
                with open(path, "w") as f:
                    f.write("\n\n".join(sections) + "\n")
                self.extra[f"profile {spec}"] = {"file": path, "modes": modes}
                log(f"profile {spec}: summary in {path}")
        finally:
            server.stop()

    def _profileOnce(self, executable, server, port, spec, scenario, overTLS, mode, outputDir):
        """
        One py-spy recording while the load runs: C{(text, summary)}, or
        C{None} (and a note) if py-spy failed.
        """
        args = self.args
        seconds = args.profile_seconds
        raw = os.path.join(outputDir, f"profile-{spec}-{mode}.raw")
        self.quiet()
        spy = pyspy.record(executable, server.pid, raw, seconds, mode=mode)
        try:
            time.sleep(0.3)  # py-spy attaches
            result = runLoad(
                port=port, users=self.corpus.users, password=self.corpus.password, scenario=scenario,
                concurrency=args.profile_clients, duration=seconds + 0.5, serverPids=[server.pid],
                tls=overTLS, settle=0,
            )
            output, _ = spy.communicate(timeout=seconds + 60)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.wait(STOP_GRACE)
            self.notes.append(f"profile {spec} ({mode}): py-spy did not finish in time")
            return None
        if spy.returncode != 0 or not os.path.exists(raw):
            self.notes.append(f"profile {spec} ({mode}): py-spy failed ({spy.returncode}): "
                              f"{output.decode(errors='replace').strip()[-300:]}")
            return None
        with open(raw, errors="replace") as f:
            summary = pyspy.summarise(f.read(), args.profile_top)
        title = (
            f"== {pyspy.MODE_TITLES[mode]}\n"
            f"{pyspy.version(executable)}: {' '.join(pyspy.command('py-spy', server.pid, os.path.basename(raw), seconds, mode=mode))}\n"
            f"on twistd mailgate (SQLite, warm credentials) while {args.profile_clients} client(s) ran "
            f"'{scenario}' over {'TLS' if overTLS else 'plain TCP'} (corpus {self.corpus.userCount} users x "
            f"{self.corpus.messageCount} messages); the load meanwhile: {result.summary()}"
        )
        log(f"profile {spec} ({mode}): {summary['samples']} samples; {result.summary()}")
        return pyspy.formatSummary(summary, title), {
            "samples": summary["samples"], "raw": raw, "errors": result.errors,
            "top": [{k: e[k] for k in ("function", "where", "ownShare", "inclusiveShare")} for e in summary["entries"]],
        }


def writeBigMaildir(maildir, message, count, uid, gid, linksPerFile=50_000):
    """
    C{count} copies of C{message} in C{maildir}/cur, named as
    L{corpus.Corpus.writeMaildirs} names them (LF line ends on disk, both
    sizes in the name, already seen): hard links of one file per
    C{linksPerFile} (a file system limits an inode's links; a new file is
    written wherever a link fails).
    """
    onDisk = message.replace(b"\r\n", b"\n")
    cur = os.path.join(maildir, "cur")
    os.makedirs(cur, exist_ok=True)
    source, links = None, 0
    for n in range(1, count + 1):
        path = os.path.join(cur, f"{1_600_000_000 + n}.M{n:06d}P1.bigbench,S={len(onDisk)},W={len(message)}:2,S")
        if source is not None and links < linksPerFile:
            try:
                os.link(source, path)
                links += 1
                continue
            except OSError:
                pass
        with open(path, "wb") as f:
            f.write(onDisk)
        os.chown(path, uid, gid)
        source, links = path, 1
    for directory in (os.path.dirname(maildir), maildir, cur, os.path.join(maildir, "new"), os.path.join(maildir, "tmp")):
        if os.path.isdir(directory):
            os.chown(directory, uid, gid)


async def firstLogin(port, user, password, messages, timeout=600.0):
    """
    One untimed-for-the-table session (login, STAT, QUIT) that lets a
    server build its indexes; returns its seconds.
    """
    began = time.perf_counter()
    client = await pop3load.connect("127.0.0.1", port, DEADLINE)
    try:
        await asyncio.wait_for(pop3load.login(client, user, password), timeout)
        count, _ = pop3load._stat(await asyncio.wait_for(client.command("STAT"), timeout))
        await asyncio.wait_for(client.command("QUIT"), DEADLINE)
    finally:
        client.close()
    if count != messages:
        raise RuntimeError(f"{user}: STAT says {count} messages, {messages} were written")
    return time.perf_counter() - began


# Columns whose meaning fillBigDatabase knows; others are copied from a
# template row and reported, in case the schema grew something (a counter)
# that needs a real value.
_KNOWN_USER_COLUMNS = {"user_id", "address", "domain", "password_hash", "scram_sha256", "apop_secret", "created_at"}
_KNOWN_MAILBOX_COLUMNS = {
    "user_id", "uid_validity", "next_uid", "last_login", "used_octets", "used_messages", "oldest_arrival",
    "quota_octets", "quota_messages", "expire_days",
}
#: usage counters kept in step with the rows written here
_USAGE_COLUMNS = ("used_octets", "used_messages", "oldest_arrival")


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
        UPDATE mailboxes SET next_uid = u.uid + {messages}, used_messages = {messages},
            used_octets = {messages} * u.size, oldest_arrival = u.arrived_at
        FROM u WHERE mailboxes.user_id = u.user_id
    """, timeout=600)
    psql(url, "ANALYZE")


def fillBigDatabase(path, bigUser, messages, idleUsers, password):
    """
    Direct SQL (the schema of mailgate/store/schema.py), for speed: give
    C{bigUser}, who has one message delivered by the CLI, C{messages - 1}
    more maildrop entries sharing its body (sizes and unique ids as a
    delivery writes them; the mailbox's usage counters to match), and
    create the idle users as copies of
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
        if set(_USAGE_COLUMNS) <= set(mailboxColumns):
            cur.execute(
                "UPDATE mailboxes SET used_messages = ?, used_octets = ?, oldest_arrival = ? WHERE user_id = ?",
                (messages, messages * size, arrived, userId),
            )
        now = int(time.time())
        for address in idleUsers:
            values = {c: v for c, v in userTemplate.items() if c != "user_id"}
            values.update(address=address, apop_secret=password, created_at=now)
            if "domain" in values:
                values["domain"] = address.rpartition("@")[2]
            _insert(cur, "users", values)
            box = dict(mailboxTemplate)
            box.update(user_id=cur.lastrowid, uid_validity=secrets.randbits(31), next_uid=1, last_login=None)
            box.update({c: (None if c == "oldest_arrival" else 0) for c in _USAGE_COLUMNS if c in box})
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
    octets = None
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
        "octets": octets,
        "ok": all(r["ok"] for r in runs),
    }


# The idle sessions' server hands freed memory back every this many
# seconds (mailgate's default is 60), so the run need not wait a minute to
# see it.
IDLE_TRIM_INTERVAL = 2


async def idleSessions(pid, port, users, password, probe, duration, batch=50, tlsPort=None):
    """
    Open one POP3 session per idle user and keep them open: RSS of the
    server with them greeted (AUTHORIZATION state) and then logged in with
    APOP (TRANSACTION state, each holding its maildrop); meanwhile a probe
    client runs short stat sessions (on C{port}) and reports their p99.
    With C{tlsPort}, the idle sessions are made over implicit TLS there.
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
        tls = pop3load.tlsContext() if tlsPort is not None else None

        async def greet():
            client = await pop3load.connect("127.0.0.1", tlsPort or port, DEADLINE, tls=tls)
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
    # What the server's memory trim (every IDLE_TRIM_INTERVAL seconds on
    # this server) gave back of what the sessions freed.
    await asyncio.sleep(IDLE_TRIM_INTERVAL + 3.0)
    report["rssAfterTrimMiB"] = round(pop3load.rssBytes(pid) / 2**20, 1)
    return report



# -- the report ----------------------------------------------------------------------


# Run by the interpreter that serves: what the report's header names.
_SERVER_VERSIONS = """
import importlib.metadata, json, os, platform, sys
def version(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None
# The binary behind the venv's link: two builds of one version (a
# distribution's, optimised, and one built from source without) differ in
# speed by more than the changes measured here.
print(json.dumps({"implementation": platform.python_implementation(), "python": platform.python_version(),
                  "executable": os.path.realpath(sys.executable),
                  "twisted": version("twisted"), "mailgate": version("mailgate")}))
"""


def serverInterpreter(bindir):
    """
    The interpreter that runs C{bindir}'s C{twistd} (its C{#!} line), or
    C{bindir}'s C{python}: the one every mailgate of the run is served by,
    which need not be the one running the benchmarks (C{--bin}).
    """
    try:
        with open(os.path.join(bindir, "twistd"), "rb") as f:
            first = f.readline()
        if first.startswith(b"#!"):
            words = first[2:].decode().split()
            # "#!/usr/bin/env python3": the interpreter is env's argument.
            return words[1] if os.path.basename(words[0]) == "env" else words[0]
    except (OSError, UnicodeDecodeError, IndexError):
        pass
    return os.path.join(bindir, "python")


def serverVersions(bindir):
    """
    The implementation and version of the serving interpreter, and the
    Twisted and mailgate it has installed; C{None} where it cannot say.
    """
    try:
        done = subprocess.run(
            [serverInterpreter(bindir), "-c", _SERVER_VERSIONS],
            capture_output=True, text=True, timeout=60,
            # Not from here: a source checkout's egg-info would answer
            # for an interpreter that has no mailgate installed.
            cwd=bindir,
        )
        return json.loads(done.stdout) if done.returncode == 0 else None
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


def machineInfo(bindir):
    info = {"nproc": os.cpu_count(), "kernel": platform.release()}
    try:
        with open("/proc/cpuinfo") as f:
            models = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        info["cpu"] = models[0] if models else platform.processor()
    except OSError:
        info["cpu"] = platform.processor()
    # The server's interpreter and packages, not this one's.
    info.update(serverVersions(bindir) or {"implementation": None, "python": None, "executable": None, "twisted": None, "mailgate": None})
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



def extrasText(extra):
    """
    The verification passes and the load times, one line each.
    """
    lines = []
    for key, value in extra.items():
        if key.startswith("verify"):
            versions = f" ({', '.join(sorted(value.get('tlsVersions') or {}))})" if value.get("tlsVersions") else ""
            lines.append(f"{key}: {'OK' if value['ok'] else 'FAILED ' + repr(value)}{versions}")
        elif key == "phase seconds":
            lines.append("seconds per phase: " + ", ".join(f"{k} {v}" for k, v in value.items()))
        elif key.endswith("seconds"):
            lines.append(f"{key}: {value}")
    return "\n".join(lines)


def profileText(extra, top=8):
    """
    The first entries of each profile, and where the full summary is.
    """
    parts = []
    for key, value in extra.items():
        if not key.startswith("profile "):
            continue
        for mode, summary in value["modes"].items():
            lines = [f"{key}, {mode} ({summary['samples']} samples; top {min(top, len(summary['top']))} by own time; "
                     f"{len(summary['top'])} in {value['file']}):"]
            for e in summary["top"][:top]:
                lines.append(f"  {e['ownShare']:6.1%} own {e['inclusiveShare']:6.1%} incl  {e['function']}  ({e['where']})")
            parts.append("\n".join(lines))
    return "\n".join(parts)


def writeResults(output, results, text, markdown):
    os.makedirs(output, exist_ok=True)
    with open(os.path.join(output, "results.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    with open(os.path.join(output, "results.md"), "w") as f:
        f.write(markdown)
    with open(os.path.join(output, "results.txt"), "w") as f:
        f.write(text)


def renderResults(rows, extra, notes, info, args, summary, markdown=False):
    """
    The whole report: header, every row, the side-by-side comparison, the
    targets, verifications, profiles and notes.
    """
    targets = report.targetLines(rows, extra)
    top = report.header(info, args, summary)
    sections = [top.replace("\n", "\n\n") if markdown else top]
    if rows:
        sections.append(("**Every measurement** (medians over the rounds)\n\n" if markdown else "Every measurement (medians over the rounds):\n")
                        + report.detailTable(rows, markdown))
    comparison = report.sideBySide(rows, extra, markdown)
    if comparison:
        sections.append(("## Side by side\n" if markdown else "Side by side:") + "\n" + comparison)
    if targets:
        bullet = "- " if markdown else "  "
        sections.append(("**Targets (issue 15)**\n\n" if markdown else "Targets (issue 15):\n")
                        + "\n".join(bullet + line for line in targets))
    verbatim = (lambda text: f"```\n{text}\n```") if markdown else (lambda text: text)
    extras = extrasText(extra)
    if extras:
        sections.append(verbatim(extras))
    profiles = profileText(extra)
    if profiles:
        sections.append(verbatim(profiles))
    if notes:
        sections.append(verbatim("\n".join("note: " + n for n in notes)))
    return "\n\n".join(sections) + "\n"


# -- main ------------------------------------------------------------------------------

PARTS = ("sqlite", "postgres", "dovecot", "cold", "big", "idle", "profile")


def parseArgs(argv):
    parser = argparse.ArgumentParser(description="The mailgate benchmark suite.")
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny corpus, short runs, one round")
    parser.add_argument("--duration", type=float, default=None, help="seconds per measurement (default 4, --quick 0.5)")
    parser.add_argument("--concurrency", default=None, help="comma-separated client counts (default 1,10; --quick 1,4)")
    parser.add_argument("--scenarios", default="stat,list,top,fetchall")
    parser.add_argument("--transports", default="plain,tls", help="POP3 over plain TCP and/or implicit TLS (default plain,tls)")
    parser.add_argument("--tls-certificates", default="rsa", choices=tlscert.CERTIFICATE_CHOICES,
                        help="the certificates both servers serve POP3S with: rsa (RSA 2048), or rsa+ecdsa "
                             "(an ECDSA P-256 one beside it: mailgate --tls-alt-cert, Dovecot ssl_alt_cert; "
                             "the TLS 1.3 load generator is given the ECDSA one) (default rsa)")
    parser.add_argument("--users", type=int, default=None)
    parser.add_argument("--messages", type=int, default=None)
    parser.add_argument("--intake-messages", type=int, default=None, help="messages per intake run (default 6000, a few seconds like a POP3 measurement; --quick 60)")
    parser.add_argument("--intake-sessions", type=int, default=10)
    parser.add_argument("--intake-size", type=int, default=4096)
    parser.add_argument("--no-intake", action="store_true", help="no LMTP/SMTP intake measurements")
    parser.add_argument("--intake-scenarios", default=",".join(INTAKE_SCENARIOS),
                        help="intake measurements: lmtp and smtp send by DATA, lmtp-bdat each message as one "
                             f"BDAT chunk (default {','.join(INTAKE_SCENARIOS)})")
    parser.add_argument("--big-messages", type=int, default=None, help="default 100000; --quick 2000")
    parser.add_argument("--big-repeats", type=int, default=5)
    parser.add_argument("--idle-sessions", type=int, default=None, help="default 10000; --quick 200")
    parser.add_argument("--dovecot", dest="dovecot", action="store_true", default=None, help="run the Dovecot comparison (default: if installed)")
    parser.add_argument("--no-dovecot", dest="dovecot", action="store_false")
    parser.add_argument("--dovecot-default", action="store_true", help="also Dovecot with the stock process settings in the rounds")
    parser.add_argument("--mailgate-cpus", default=None, metavar="CPUS", help="run every mailgate with --cpu-affinity CPUS (e.g. 0), and Dovecot hp in the comparison twice, as it is and pinned to the same CPUs, each cell against the better of the two (default: nothing pinned)")
    parser.add_argument("--apop", action="store_true", help="also APOP logins (stat and fetchall at 10 clients) in the rounds")
    parser.add_argument("--no-postgres", action="store_true", help="skip PostgreSQL even if MAILGATE_TEST_POSTGRES is set")
    parser.add_argument("--no-big", action="store_true", help="skip the big maildrop and the idle sessions")
    parser.add_argument("--only", default=",".join(PARTS), help=f"parts to run (default {','.join(PARTS)})")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3; --quick 1)")
    parser.add_argument("--quiet-wait", type=float, default=None, help="before each measurement, wait up to this many seconds for the machine to be idle (default 10; --quick 0)")
    parser.add_argument("--steal-limit", type=float, default=None, help="take a measurement again while the VM's steal during it exceeded this many cores (default 0.1; --quick 0 = never)")
    parser.add_argument("--steal-retries", type=int, default=2, help="at most this many times per measurement (default 2)")
    parser.add_argument("--quiet-threshold", type=float, default=0.25, help="idle means at most this many cores busy (default 0.25)")
    parser.add_argument("--profile", default="top,fetchall", help="scenarios to profile mailgate in with py-spy, e.g. top,fetchall+tls; 'none' for none (default top,fetchall)")
    parser.add_argument("--profile-seconds", type=float, default=None, help="seconds per profile (default 10; --quick 2)")
    parser.add_argument("--profile-clients", type=int, default=1)
    parser.add_argument("--profile-top", type=int, default=25, help="entries in each profile summary")
    parser.add_argument("--profile-modes", default="gil,all", help="py-spy recordings per profiled scenario: gil (--gil, Python work) and/or all (default gil,all)")
    parser.add_argument("--bin", default=os.path.dirname(sys.executable), help="where twistd and mailgate are")
    parser.add_argument("--workdir", default=None, help="keep data here (default: a temporary directory, removed)")
    parser.add_argument("--output", default=None, help="write results.{json,md,txt} and the profiles here")
    args = parser.parse_args(argv)
    quick = args.quick
    args.duration = args.duration or (0.5 if quick else 4.0)
    args.concurrency = [int(c) for c in (args.concurrency or ("1,4" if quick else "1,10")).split(",")]
    args.scenarios = args.scenarios.split(",")
    unknown = [s for s in args.scenarios if s not in pop3load.SCENARIOS]
    if unknown:
        parser.error(f"unknown scenarios {unknown}; use {pop3load.SCENARIOS}")
    args.intake_scenarios = [s for s in args.intake_scenarios.split(",") if s]
    unknown = [s for s in args.intake_scenarios if s not in INTAKE_SCENARIOS]
    if unknown:
        parser.error(f"unknown intake scenarios {unknown}; use {','.join(INTAKE_SCENARIOS)}")
    args.transports = [t for t in args.transports.split(",") if t]
    if not set(args.transports) <= {"plain", "tls"}:
        parser.error("--transports takes plain and/or tls")
    args.users = args.users or (3 if quick else corpusModule.STANDARD_USERS)
    args.messages = args.messages or (6 if quick else corpusModule.STANDARD_MESSAGES)
    args.intake_messages = args.intake_messages or (60 if quick else 6000)
    args.big_messages = args.big_messages or (2000 if quick else 100_000)
    args.idle_sessions = args.idle_sessions or (200 if quick else 10_000)
    args.big_repeats = 2 if quick else args.big_repeats
    args.profile_seconds = args.profile_seconds or (2.0 if quick else 10.0)
    args.profile = [] if args.profile in ("", "none") else args.profile.split(",")
    args.profile_modes = [m for m in args.profile_modes.split(",") if m]
    if not args.profile_modes or not set(args.profile_modes) <= set(pyspy.MODES):
        parser.error(f"--profile-modes takes {','.join(pyspy.MODES)}")
    for spec in args.profile:
        if spec.partition("+")[0] not in pop3load.SCENARIOS or spec.partition("+")[2] not in ("", "tls"):
            parser.error(f"--profile: {spec!r} is not SCENARIO or SCENARIO+tls")
    if args.rounds is None:
        args.rounds = 1 if quick else 3
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.quiet_wait is None:
        args.quiet_wait = 0 if quick else 10
    if args.steal_limit is None:
        args.steal_limit = 0 if quick else 0.1
    if args.mailgate_cpus is not None:
        try:
            args.mailgate_cpus = formatCPUs(parseCPUs(args.mailgate_cpus))
        except ValueError as e:
            parser.error(f"--mailgate-cpus: {e}")
    args.only = set(args.only.split(","))
    if not args.only <= set(PARTS):
        parser.error(f"--only takes {','.join(PARTS)}")
    if args.no_big:
        args.only -= {"big", "idle"}
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
    info["started"] = f"{started:%Y-%m-%d %H:%M} UTC"
    with open("/proc/loadavg") as f:
        info["loadavgBefore"] = f.read().split()[:3]
    stealBefore = pop3load.systemStealSeconds()
    log(f"work directory {workdir}; machine {info}")
    summary = suite.corpus.summary()
    log(f"corpus {summary}")
    postgres = os.environ.get("MAILGATE_TEST_POSTGRES")
    if "postgres" in args.only and not postgres:
        suite.notes.append("PostgreSQL skipped: MAILGATE_TEST_POSTGRES is not set (make bench sets it)")
        args.only.discard("postgres")
    output = args.output or (workdir if not ownWorkdir else None)
    schema = None
    pgURL = None
    try:
        sqlitePath = os.path.join(workdir, "corpus.sqlite3")
        sqliteURL = "sqlite:///" + sqlitePath
        if args.only & {"sqlite", "postgres", "cold", "profile"}:
            seconds = loadMailgate(args.bin, sqliteURL, suite.corpus, intakeUsers())
            suite.extra["corpus load seconds (as LMTP stores copies)"] = round(seconds, 1)
            log(f"corpus loaded into SQLite, each copy with its own fields, in {seconds:.1f} s")
        if "postgres" in args.only:
            schema = "bench_" + secrets.token_hex(4)
            psql(postgres, f"CREATE SCHEMA {schema}")
            pgURL = withSchema(postgres, schema)
            began = time.monotonic()
            mailgateCLI(args.bin, sqliteURL, ["db", "copy", "--from", sqliteURL, "--to", pgURL], timeout=600)
            checkMailbox(args.bin, pgURL, suite.corpus)
            suite.extra["postgres copy seconds (mailgate db copy)"] = round(time.monotonic() - began, 1)
            info["postgresql"] = psql(postgres, "SHOW server_version")
        tls = None
        if "tls" in args.transports or any(spec.endswith("+tls") for spec in args.profile):
            tls = tlscert.makeCertificates(os.path.join(workdir, "tls"), args.tls_certificates)
        phases = suite.extra.setdefault("phase seconds", {})

        def phase(name, function, *arguments):
            began = time.monotonic()
            try:
                function(*arguments)
            finally:
                phases[name] = round(time.monotonic() - began, 1)

        if args.only & {"sqlite", "postgres", "dovecot"}:
            phase("comparison", suite.comparison, workdir, sqliteURL, pgURL, tls if "tls" in args.transports else None)
        if "cold" in args.only:
            phase("cold logins", suite.cold, workdir, sqlitePath)
        if args.only & {"big", "idle"}:
            phase("big maildrop and idle sessions (SQLite)", lambda: suite.big(
                workdir, maildrop="big" in args.only, idle="idle" in args.only,
                tls=tls if "tls" in args.transports else None))
        if "big" in args.only and "postgres" in args.only:
            bigSchema = "bench_big_" + secrets.token_hex(4)
            psql(postgres, f"CREATE SCHEMA {bigSchema}")
            try:
                phase("big maildrop (PostgreSQL)", suite.bigPostgres, workdir, withSchema(postgres, bigSchema))
            finally:
                psql(postgres, f"DROP SCHEMA {bigSchema} CASCADE")
        if "big" in args.only and args.dovecot:
            phase("big maildrop (Dovecot)", suite.bigDovecot, workdir)
        if "profile" in args.only and args.profile:
            phase("profile", suite.profile, workdir, sqliteURL, output or os.path.join(workdir, "profile"), tls)
    finally:
        if schema is not None:
            try:
                psql(postgres, f"DROP SCHEMA {schema} CASCADE")
            except Exception as e:  # noqa: BLE001
                log(f"could not drop schema {schema}: {e}")
        with open("/proc/loadavg") as f:
            info["loadavgAfter"] = f.read().split()[:3]
        plainArgs = {k: (sorted(v) if isinstance(v, set) else v) for k, v in vars(args).items()}
        suite.extra["total seconds"] = round((datetime.datetime.now(datetime.timezone.utc) - started).total_seconds(), 1)
        # Time the hypervisor gave to others: a run's slow spells.
        info["stealCoreSeconds"] = round(pop3load.systemStealSeconds() - stealBefore, 1)
        info["runSeconds"] = suite.extra["total seconds"]
        info["stealRepeats"] = suite.stealRepeats
        results = {
            "started": started.isoformat(timespec="seconds"),
            "argv": sys.argv,
            "args": plainArgs,
            "machine": info,
            "corpus": summary,
            "rows": suite.rows,
            "comparison": {
                "pop3": report.pop3Cells(suite.rows), "throughput": report.throughputCells(suite.rows),
                "intake": report.intakeCells(suite.rows), "cold": report.coldCells(suite.rows),
                "big": report.bigCells(suite.extra), "targets": report.targetLines(suite.rows, suite.extra),
            },
            "extra": suite.extra,
            "notes": suite.notes,
        }
        text = renderResults(suite.rows, suite.extra, suite.notes, info, plainArgs, summary)
        if output:
            writeResults(output, results, text,
                         renderResults(suite.rows, suite.extra, suite.notes, info, plainArgs, summary, markdown=True))
        if ownWorkdir:
            shutil.rmtree(workdir, ignore_errors=True)
    print()
    print(text, end="")
    if output:
        print(f"\nresults written to {output}/results.json, results.md and results.txt")
    failed = [k for k, v in suite.extra.items() if k.startswith("verify") and not v["ok"]]
    failed += [f"{r['server']}/{r['backend']} {r['scenario']}" for r in suite.rows
               if r.get("verification") and not r["verification"]["ok"]]
    if failed:
        print("VERIFICATION FAILED:", ", ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
