"""
C{twistd mailgate}: option parsing, the service maker, the service
hierarchy on a L{MemoryReactor}, and the plugin twistd finds.
"""

import os
from pathlib import Path

import pytest
from twisted.application.service import IService, IServiceMaker, MultiService
from twisted.internet.testing import MemoryReactorClock as MemoryReactor
from twisted.plugin import getPlugins
from twisted.python import usage
from zope.interface.verify import verifyObject

from mailgate import tap
from mailgate.config import APOPPolicy
from mailgate.errors import ConfigurationError
from mailgate.pop3 import POP3Factory
from mailgate.service import MailgateConfig, makeService
from mailgate.store import DEFAULT_DATABASE
from mailgate.testing import resultOf

UNREACHABLE = "sqlite:////nonexistent/directory/x.sqlite3"


@pytest.fixture(autouse=True)
def noEnvironmentDatabase(monkeypatch):
    monkeypatch.delenv("MAILGATE_DATABASE", raising=False)


def parse(*argv):
    options = tap.Options()
    options.parseOptions(list(argv))
    return options


# -- Options -------------------------------------------------------------------


def test_defaults():
    options = parse()
    assert options["database"] == DEFAULT_DATABASE == "sqlite:///mailgate.sqlite3"
    assert options["pop3"] == ["tcp:1110:interface=127.0.0.1"]
    assert options["hostname"] is None
    assert options["apop"] is APOPPolicy.AUTO
    assert options["auth-failure-delay"] == 1.0
    assert options["idle-timeout"] == 600
    assert options["login-timeout"] == 180
    assert options["login-delay"] is None
    config = options.toConfig()
    assert config.database == "sqlite:///mailgate.sqlite3"
    assert config.pop3 == ["tcp:1110:interface=127.0.0.1"]
    assert config.hostname is None
    assert config.apop is APOPPolicy.AUTO
    assert config.authFailureDelay == 1.0
    assert config.idleTimeout == 600
    assert config.loginTimeout == 180
    assert config.loginDelay is None


def test_databaseFromEnvironment(monkeypatch):
    monkeypatch.setenv("MAILGATE_DATABASE", "sqlite:////var/lib/mailgate/env.sqlite3")
    assert parse()["database"] == "sqlite:////var/lib/mailgate/env.sqlite3"
    # The command line wins over the environment.
    assert parse("--database", "sqlite:///cli.sqlite3")["database"] == "sqlite:///cli.sqlite3"


def test_emptyEnvironmentMeansDefault(monkeypatch):
    monkeypatch.setenv("MAILGATE_DATABASE", "")
    assert parse()["database"] == DEFAULT_DATABASE


def test_badDatabaseInEnvironment(monkeypatch, capsys):
    """
    An invalid C{$MAILGATE_DATABASE} (the systemd unit's Environment= or
    EnvironmentFile= gives it) is refused in one line, exit 78 (EX_CONFIG),
    as the same value in the configuration file is: it was a usage error,
    exit 1 under twistd (64 under mailgate serve), which the unit's
    Restart=on-failure retried every two seconds for ever.
    """
    monkeypatch.setenv("MAILGATE_DATABASE", "mysql://localhost/mail")
    with pytest.raises(SystemExit) as e:
        parse()
    assert e.value.code == 78
    assert capsys.readouterr().err == (
        "mailgate: $MAILGATE_DATABASE: unsupported database URL 'mysql://localhost/mail': "
        "use sqlite:///FILE or postgresql://...\n"
    )


def test_repeatablePop3():
    options = parse(
        "--pop3", "tcp:110",
        "--pop3", "tcp6:1110:interface=\\:\\:1",
        "--pop3", "unix:/tmp/mailgate-test-pop3",
    )
    assert options["pop3"] == ["tcp:110", "tcp6:1110:interface=\\:\\:1", "unix:/tmp/mailgate-test-pop3"]
    assert options.toConfig().pop3 == options["pop3"]


def test_pop3ReplacesTheDefault():
    assert parse("--pop3", "tcp:2110")["pop3"] == ["tcp:2110"]


@pytest.mark.parametrize(
    "endpoint",
    ["tcp:notaport", "bogus:110", "tcp:110:nosuchoption=1", ""],
)
def test_invalidEndpoint(endpoint):
    with pytest.raises(usage.UsageError):
        parse("--pop3", endpoint)


@pytest.mark.parametrize(
    "url",
    ["mysql://localhost/mail", "sqlite://relative.sqlite3", "sqlite:///", "mail.sqlite3"],
)
def test_badDatabaseURL(url):
    with pytest.raises(usage.UsageError):
        parse("--database", url)


def test_goodDatabaseURLs():
    for url in ("sqlite:///relative.sqlite3", "sqlite:////abs/mail.sqlite3", "sqlite:///:memory:"):
        assert parse("--database", url)["database"] == url


@pytest.mark.parametrize("value", ["-1", "abc", "1.5", ""])
def test_badIdleTimeout(value):
    with pytest.raises(usage.UsageError):
        parse("--idle-timeout", value)


@pytest.mark.parametrize("value", ["-1", "abc", "2.5", ""])
def test_badLoginTimeout(value):
    with pytest.raises(usage.UsageError):
        parse("--login-timeout", value)


def test_minDataRateReachesSMTPAndLMTP(tmp_path):
    assert parse().toConfig().minDataRate == 500
    for value in ("-1", "fast", "1.5"):
        with pytest.raises(usage.UsageError):
            parse("--min-data-rate", value)
    reactor = MemoryReactor()
    root = makeService(
        config(tmp_path, pop3=[], smtp=["tcp:2525"], lmtp=["tcp:2424"], minDataRate=1234), reactor=reactor
    )
    root.startService()
    try:
        factories = [factory for _, factory, *_ in reactor.tcpServers]
        assert len(factories) == 2
        assert [f.buildProtocol(None).minDataRate for f in factories] == [1234, 1234]
    finally:
        root.stopService()


def test_greeting():
    assert parse().toConfig().greeting == "mailgate POP3 server ready"
    assert parse("--greeting", "POP3 ready.").toConfig().greeting == "POP3 ready."
    for value in ("", "   ", "two\r\nlines", "tab\there", "x" * 201):
        with pytest.raises(usage.UsageError):
            parse("--greeting", value)


@pytest.mark.parametrize("value", ["Welcome to <mail.example.org>", "POP3 > all", "\u4e2d" * 67])
def test_aGreetingThatWouldBreakAPOPOrTheLineLimitIsRefused(value):
    """
    Clients take the first <...> of the greeting for the APOP timestamp
    (poplib: from the first < to the last >), so angle brackets in the
    text would fail every APOP login; and 200 characters of three octets
    each would take the greeting past RFC 1939's 512 octets.
    """
    with pytest.raises(usage.UsageError) as refused:
        parse("--greeting", value)
    assert "greeting" in str(refused.value)
    assert parse("--greeting", "Willkommen, Müller").toConfig().greeting == "Willkommen, Müller"


def test_tlsMinimumVersion():
    assert parse().toConfig().tlsMinVersion == "1.2"
    assert parse("--tls-min-version", "1.3").toConfig().tlsMinVersion == "1.3"
    for value in ("1.1", "1.0", "tls1.3", ""):
        with pytest.raises(usage.UsageError):
            parse("--tls-min-version", value)


@pytest.mark.parametrize("value", ["-0.5", "soon"])
def test_badAuthFailureDelay(value):
    with pytest.raises(usage.UsageError):
        parse("--auth-failure-delay", value)


@pytest.mark.parametrize("value", ["-5", "x"])
def test_badLoginDelay(value):
    with pytest.raises(usage.UsageError):
        parse("--login-delay", value)


def test_numericOptions():
    options = parse(
        "--idle-timeout", "900", "--auth-failure-delay", "0.25", "--login-delay", "300", "--login-timeout", "60"
    )
    config = options.toConfig()
    assert config.idleTimeout == 900
    assert config.loginTimeout == 60
    assert parse("--login-timeout", "0").toConfig().loginTimeout == 0
    assert config.authFailureDelay == 0.25
    assert config.loginDelay == 300


def test_apopModes():
    assert parse("--no-apop").toConfig().apop is APOPPolicy.NEVER
    assert parse("--apop").toConfig().apop is APOPPolicy.ALWAYS
    assert parse().toConfig().apop is APOPPolicy.AUTO
    with pytest.raises(usage.UsageError):
        parse("--apop", "--no-apop")
    # Giving the same flag twice is no contradiction.
    assert parse("--apop", "--apop").toConfig().apop is APOPPolicy.ALWAYS


def test_hostname():
    assert parse("--hostname", "pop.example.org").toConfig().hostname == "pop.example.org"
    # Kept as written.
    for name in ("Mail.Example.ORG", "localhost", "mx-1.example.org", "[192.0.2.1]", "[IPv6:2001:db8::1]"):
        assert parse("--hostname", name).toConfig().hostname == name
    with pytest.raises(usage.UsageError):
        parse("--hostname", "  ")


@pytest.mark.parametrize(
    "name",
    ["a\r\nb", "evil\r\n+OK injected", "a b<c>", "<x>", "mail_1.example.org", "-mail.example.org",
     "mail..example.org", "[192.0.2.1", "[2001:db8::1]", "[IPv6:192.0.2.1]", "[999.0.2.1]", "x" * 254,
     "[IPv6:fe80::1%eth0]"],
)
def test_hostnameRefused(name):
    """
    It goes raw into the POP3 greeting, the SMTP banner and the APOP
    timestamp: a line break would end the line, a space or <> would break
    the timestamp.  An address literal has no zone (C{%eth0}): RFC 5321's
    has none, and the name the greeting and the Received field gave was
    none.
    """
    with pytest.raises(usage.UsageError, match="--hostname: not a"):
        parse("--hostname", name)


@pytest.mark.parametrize(
    "option, value, reason",
    [
        ("--default-quota", "99999999999999999999T", "too large"),
        ("--default-quota", "8388608T", "at most 1024T"),
        ("--max-message-size", "9223372036854775808", "at most 1024T"),
        ("--expire-days", "99999999999999999999", "must be at most 36500"),
        ("--keep-deleted-days", "99999999999999999999", "must be at most 36500"),
        ("--ban-time", "1000000000000", "must be at most 315360000"),
        ("--ban-window", "99999999999999999999", "must be at most 315360000"),
        ("--login-timeout", "99999999999999999999", "must be at most 604800"),
        ("--max-connections", "99999999999999999999", "must be at most 9223372036854775807"),
    ],
)
def test_valuesOutOfRange(option, value, reason):
    """
    Refused at start-up, not taken to fail every delivery (quota), every
    retention pass (days) or the first ban (ban-time) later.
    """
    with pytest.raises(usage.UsageError, match=f"{option}: .*{reason}"):
        parse(option, value)
    # The largest values in range are taken.
    config = parse(
        "--default-quota", "1024T", "--expire-days", "36500", "--keep-deleted-days", "36500",
        "--ban-time", "315360000", "--ban-window", "315360000",
    ).toConfig()
    assert (config.defaultQuota, config.expireDays, config.keepDeletedDays) == (1 << 50, 36500, 36500)
    assert (config.banTime, config.banWindow) == (315360000, 315360000)


def test_unknownOption():
    with pytest.raises(usage.UsageError):
        parse("--no-such-option")


def test_usageDocumentsEveryOption():
    text = tap.Options().getUsage()
    for option in (
        "--database",
        "--pop3",
        "--hostname",
        "--no-apop",
        "--auth-failure-delay",
        "--idle-timeout",
        "--login-timeout",
        "--login-delay",
        "--help",
    ):
        assert option in text, option
    assert "MAILGATE_DATABASE" in text
    assert "tcp:1110:interface=127.0.0.1" in text


# -- tap.makeService -------------------------------------------------------------


def test_makeServiceWithUnopenableDatabase(capsys):
    """
    A database file that cannot be opened is a configuration error: one
    line, and EX_CONFIG (78), which the systemd unit does not restart on.
    """
    options = parse("--database", UNREACHABLE, "--pop3", "tcp:0:interface=127.0.0.1")
    with pytest.raises(SystemExit) as e:
        tap.makeService(options)
    assert e.value.code == 78
    err = capsys.readouterr().err
    assert err.startswith("mailgate: cannot open SQLite database /nonexistent/directory/x.sqlite3")
    assert err.count("\n") == 1


def test_theLogFilesMetricsFollowTheServersOwnLogFile(tmp_path, monkeypatch):
    """
    Under twistd with C{-l FILE}, the metrics read the log file the
    server writes (mailgate_log_lines_lost_total,
    mailgate_log_last_reopen_successful): a SIGUSR1 whose reopening
    failed, the log's directory gone, shows as 0 until one works.
    """
    logs = tmp_path / "logs"
    logs.mkdir()
    options = parse("--database", f"sqlite:///{tmp_path / 'mail.sqlite3'}", "--pop3", "tcp:0:interface=127.0.0.1")
    options.parent = {"logfile": str(logs / "mailgate.log"), "nodaemon": True}
    monkeypatch.setattr(tap.twistedcompat, "leanEventDispatch", lambda reactor: False)
    monkeypatch.setattr(tap.logs, "forwardStandardLogging", lambda: None)
    service = tap.makeService(options)

    def reopened():
        return service.metrics.registry.get_sample_value("mailgate_log_last_reopen_successful")

    try:
        assert reopened() == 1
        assert service.metrics.registry.get_sample_value("mailgate_log_lines_lost_total") == 0
        logs.rename(tmp_path / "rotated")
        service.reopenLogs()
        assert reopened() == 0
        logs.mkdir()
        service.reopenLogs()
        assert reopened() == 1
    finally:
        service.store.close()


def test_aDatabasePasswordOnTheCommandLineIsWarnedOf(postgresURL, monkeypatch):
    """
    A server given C{--database postgresql://USER:PASSWORD@...} on its
    command line shows the password to every user of the machine, in the
    process list, for as long as it runs: served, but warned of at start
    (without the password), saying where else to put it.  The same URL
    from the configuration file or C{$MAILGATE_DATABASE} is not.
    """
    from mailgate.urls import hasPassword

    assert hasPassword(postgresURL)
    password = postgresURL.split("://", 1)[1].split("@", 1)[0].split(":", 1)[1]
    options = parse("--database", postgresURL, "--pop3", "tcp:0:interface=127.0.0.1")
    # What twistd's process would change for good (the global reactor's
    # dispatch, the root logger) is left alone in the tests' process.
    monkeypatch.setattr(tap.twistedcompat, "leanEventDispatch", lambda reactor: False)
    monkeypatch.setattr(tap.logs, "forwardStandardLogging", lambda: None)
    service = tap.makeService(options)
    try:
        [warning] = [text for event, text in service.startupWarnings if event == "config.password_on_command_line"]
    finally:
        service.store.close()
    assert warning.startswith(
        "--database on the command line gives the database's password, which every user of this machine "
        "can read in the process list (ps) while the server runs: set database in the --config file"
    )
    assert password not in warning
    monkeypatch.setenv("MAILGATE_DATABASE", postgresURL)
    for fromElsewhere in (parse(), parse("--database", "postgresql://mailgate@db.example.org/mail")):
        assert fromElsewhere.commandLinePasswordWarning() is None
    assert parse("--database", "postgresql://m@db/mail?password=x").commandLinePasswordWarning() == warning


# -- service.makeService on a MemoryReactor -----------------------------------------


def config(tmp_path, **kw):
    kw.setdefault("database", f"sqlite:///{tmp_path / 'service.sqlite3'}")
    # A memory reactor runs no threads: keep the automatic APOP check (a
    # database read on a worker thread) out of these service tests.
    kw.setdefault("apop", APOPPolicy.ALWAYS)
    return MailgateConfig(**kw)


def test_serviceListensWhereConfigured(tmp_path):
    reactor = MemoryReactor()
    root = makeService(
        config(tmp_path, pop3=["tcp:1110:interface=127.0.0.1", "tcp:2110"]), reactor=reactor
    )
    assert isinstance(root, MultiService)
    assert verifyObject(IService, root)
    # Building the hierarchy listens on nothing yet.
    assert reactor.tcpServers == []
    root.privilegedStartService()
    root.startService()
    try:
        listening = [(port, interface) for port, _, _, interface in reactor.tcpServers]
        assert listening == [(1110, "127.0.0.1"), (2110, "")]
        factories = {factory for _, factory, _, _ in reactor.tcpServers}
        assert len(factories) == 1
        assert isinstance(factories.pop(), POP3Factory)
        assert [l.description for l in root.listeners["POP3"]] == [
            "tcp:1110:interface=127.0.0.1",
            "tcp:2110",
        ]
    finally:
        root.stopService()


def test_serviceFactoryFollowsTheConfiguration(tmp_path):
    reactor = MemoryReactor()
    root = makeService(
        config(
            tmp_path,
            pop3=["tcp:1110"],
            hostname="pop.example.org",
            apop=False,
            idleTimeout=900,
            loginTimeout=45,
            greeting="Mail service ready.",
            authFailureDelay=2.5,
            loginDelay=60,
        ),
        reactor=reactor,
    )
    root.startService()
    try:
        factory = reactor.tcpServers[0][1]
        assert factory.hostname == "pop.example.org"
        assert factory.apop is False
        assert factory.idleTimeout == 900
        assert factory.buildProtocol(None).loginTimeout == 45
        assert factory.greeting == "Mail service ready."
        assert factory.authFailureDelay == 2.5
        assert "LOGIN-DELAY 60" in factory.extraCapabilities()
    finally:
        root.stopService()


def test_serviceWithoutListeners(tmp_path):
    reactor = MemoryReactor()
    root = makeService(config(tmp_path, pop3=[]), reactor=reactor)
    root.startService()
    root.stopService()
    assert reactor.tcpServers == []


def test_serviceMigratesTheDatabase(tmp_path):
    import sqlite3

    from mailgate.store.schema import LATEST, SCHEMA_TABLE

    root = makeService(config(tmp_path, pop3=[]), reactor=MemoryReactor())
    try:
        conn = sqlite3.connect(tmp_path / "service.sqlite3")
        assert conn.execute(f"SELECT max(version) FROM {SCHEMA_TABLE}").fetchone() == (LATEST,)
        conn.close()
    finally:
        root.stopService()


def test_invalidEndpointInConfig(tmp_path):
    with pytest.raises(ConfigurationError):
        makeService(config(tmp_path, pop3=["bogus:110"]), reactor=MemoryReactor())


def test_unopenableDatabaseInConfig():
    with pytest.raises(ConfigurationError):
        makeService(MailgateConfig(database=UNREACHABLE, pop3=[]), reactor=MemoryReactor())


def test_stopServiceClosesTheStore(tmp_path):
    reactor = MemoryReactor()
    root = makeService(config(tmp_path, pop3=["tcp:1110"]), reactor=reactor)
    store = root.store
    closed = []
    close = store.close

    def recordingClose():
        closed.append(True)
        return close()

    store.close = recordingClose
    root.startService()
    assert closed == []
    resultOf(root.stopService())
    assert closed == [True]


def test_storeCanBeReopenedAfterStopService(tmp_path):
    """
    Stopping the service must release the database entirely, so that an
    embedding application can start mailgate again on the same file.
    """
    first = makeService(config(tmp_path, pop3=[]), reactor=MemoryReactor())
    first.startService()
    resultOf(first.stopService())
    second = makeService(config(tmp_path, pop3=[]), reactor=MemoryReactor())
    second.startService()
    resultOf(second.stopService())


def test_secondServerOnTheSameFileIsRefused(tmp_path):
    first = makeService(config(tmp_path, pop3=[]), reactor=MemoryReactor())
    try:
        with pytest.raises(ConfigurationError):
            makeService(config(tmp_path, pop3=[]), reactor=MemoryReactor())
    finally:
        first.stopService()


def test_serviceUsesAGivenStore(store):
    reactor = MemoryReactor()
    root = makeService(MailgateConfig(database=UNREACHABLE, pop3=["tcp:1110"]), reactor=reactor, store=store)
    assert root.store is store
    root.startService()
    try:
        assert [port for port, _, _, _ in reactor.tcpServers] == [1110]
    finally:
        root.stopService()


# -- the plugin ------------------------------------------------------------------


def test_pluginIsFound():
    makers = [p for p in getPlugins(IServiceMaker) if p.tapname == "mailgate"]
    assert len(makers) == 1
    maker = makers[0]
    assert verifyObject(IServiceMaker, maker)
    assert maker.options is tap.Options
    assert maker.makeService is tap.makeService
    assert maker.description


def test_versionIsMailgates(capsys):
    """
    C{twistd mailgate --version} (and C{mailgate serve --version}) names
    mailgate's version, not only Twisted's, which is what an administrator
    asks for.
    """
    from twisted import copyright

    from mailgate import __version__

    with pytest.raises(SystemExit) as e:
        tap.Options().parseOptions(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out == f"mailgate {__version__} (Twisted {copyright.version})\n"


# -- twistd --uid ----------------------------------------------------------------------


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to have twistd switch to the user nobody")
def test_theFilesTheStartMakesBeforeTwistdsUidAreTheUsers(tmp_path):
    """
    twistd opens the database as root, before --uid takes effect: a new
    SQLite database was made root's, mode 0600, and the server, running
    as the user, could not open it (every session and background task
    failed).  The files the start made are the user's; the mode stays
    0600.  Here the start fails once they are made (its port is taken),
    and the user's own admin command then uses the database.
    """
    import pwd
    import shutil
    import socket
    import subprocess
    import tempfile

    from e2e import DEADLINE, MAILGATE, TWISTD, childEnvironment

    nobody = pwd.getpwnam("nobody")
    directory = Path(tempfile.mkdtemp(prefix="mailgate-uid-"))
    try:
        directory.chmod(0o777)
        database = f"sqlite:///{directory / 'mail.sqlite3'}"
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen(1)
            started = subprocess.run(
                [TWISTD, "-n", "--pidfile=", "-u", str(nobody.pw_uid), "-g", str(nobody.pw_gid), "mailgate",
                 "--database", database, "--pop3", f"tcp:{taken.getsockname()[1]}:interface=127.0.0.1"],
                capture_output=True, text=True, timeout=DEADLINE, cwd=directory, env=childEnvironment(),
            )
        assert started.returncode == 1 and "Address already in use" in started.stderr, started.stderr
        for name in ("mail.sqlite3", "mail.sqlite3.lock"):
            found = (directory / name).stat()
            assert (found.st_uid, found.st_gid, found.st_mode & 0o777) == (nobody.pw_uid, nobody.pw_gid, 0o600), name
        listed = subprocess.run(
            [MAILGATE, "--database", database, "user", "list"], capture_output=True, text=True,
            timeout=DEADLINE, cwd=directory, env=childEnvironment(), user="nobody",
        )
        assert listed.returncode == 0, listed.stderr
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to have twistd switch to the user nobody")
@pytest.mark.parametrize("unusable", ["spool directory", "database"])
def test_whatTwistdsUidUserCannotUseStopsTheStart(tmp_path, unusable):
    """
    Checked as root, at start, a spool directory or an SQLite database of
    root's alone passed, and then, the server running as --uid's user,
    every message too large for memory was refused with 452 (probe) or
    every database access failed.  Checked as that user: one line, exit 78.
    """
    import pwd
    import shutil
    import subprocess
    import tempfile

    from e2e import DEADLINE, TWISTD, childEnvironment

    nobody = pwd.getpwnam("nobody")
    directory = Path(tempfile.mkdtemp(prefix="mailgate-uid-"))
    try:
        directory.chmod(0o777)
        rootOnly = directory / "root-only"
        rootOnly.mkdir(mode=0o700)
        database = directory / "mail.sqlite3"
        argv = [TWISTD, "-n", "--pidfile=", "-u", str(nobody.pw_uid), "-g", str(nobody.pw_gid), "mailgate",
                "--pop3", "tcp:0:interface=127.0.0.1"]
        if unusable == "database":
            database.touch(mode=0o600)
            argv += ["--database", f"sqlite:///{database}"]
            expected = f"mailgate: cannot open SQLite database {database} to write to it (nobody may not read and write "
        else:
            argv += ["--database", f"sqlite:///{database}", "--spool-directory", str(rootOnly)]
            expected = f"mailgate: spool-directory: cannot spool messages in {rootOnly}: Permission denied"
        started = subprocess.run(
            argv, capture_output=True, text=True, timeout=DEADLINE, cwd=directory, env=childEnvironment()
        )
        assert started.returncode == 78, started.stderr
        assert started.stderr.startswith(expected), started.stderr
        assert started.stderr.endswith("(as nobody, the user of twistd's --uid)\n") and "Traceback" not in started.stderr
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to have twistd switch to the user nobody")
def test_twistdsUidWithoutGidIsCheckedWithTheUsersOwnGroup():
    """
    twistd C{--uid} without C{--gid} runs as the user's own group (its
    passwd entry's).  The start's checks ran as root's group instead: a
    database directory writable through the user's group (root's, mode
    0770, group nogroup) was refused, exit 78 "nobody may not create
    files", where the server, once switched, works in it (checked: its
    -wal and -shm are nobody:nogroup).  Here the start fails past the
    checks, at its port, which is taken.
    """
    import grp
    import pwd
    import shutil
    import socket
    import subprocess
    import tempfile

    from e2e import DEADLINE, TWISTD, childEnvironment

    nobody = pwd.getpwnam("nobody")
    group = grp.getgrgid(nobody.pw_gid).gr_name
    directory = Path(tempfile.mkdtemp(prefix="mailgate-uid-"))
    try:
        directory.chmod(0o755)
        shared = directory / "shared"
        shared.mkdir()
        os.chown(shared, 0, nobody.pw_gid)
        shared.chmod(0o770)
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen(1)
            started = subprocess.run(
                [TWISTD, "-n", "--pidfile=", "-u", str(nobody.pw_uid), "mailgate",
                 "--database", f"sqlite:///{shared / 'mail.sqlite3'}",
                 "--pop3", f"tcp:{taken.getsockname()[1]}:interface=127.0.0.1"],
                capture_output=True, text=True, timeout=DEADLINE, cwd=directory, env=childEnvironment(),
            )
        assert started.returncode == 1 and "Address already in use" in started.stderr, started.stderr
        found = (shared / "mail.sqlite3").stat()
        assert (found.st_uid, grp.getgrgid(found.st_gid).gr_name) == (nobody.pw_uid, group)
    finally:
        shutil.rmtree(directory, ignore_errors=True)

@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to have twistd switch to the user nobody")
def test_whatAReloadReadsThatTwistdsUidUserCannotReadIsWarnedOf():
    """
    twistd reads the configuration file and the TLS files at start, as
    root; a SIGHUP reads them again as --uid's user.  A key (or file) of
    root's alone started, and then every reload failed (probe: "cannot
    read the configuration file: Permission denied", "TLS reload failed
    ... Permission denied"), a renewed certificate never served until a
    restart.  The start warns, naming each such file and not the others.
    """
    import pwd
    import shutil
    import tempfile

    from certs import makeCertificate
    from e2e import TWISTD, ServerProcess, waitFor

    nobody = pwd.getpwnam("nobody")
    directory = Path(tempfile.mkdtemp(prefix="mailgate-uid-"))

    class AsNobody(ServerProcess):
        command = (TWISTD, "-n", "--pidfile=", "-u", str(nobody.pw_uid), "-g", str(nobody.pw_gid), "mailgate")

    try:
        directory.chmod(0o777)
        certificate, key = makeCertificate(directory, "mail.example.test")
        certificate.chmod(0o644)
        key.chmod(0o600)
        config = directory / "mailgate.toml"
        config.write_text(f'tls-cert = "{certificate}"\ntls-key = "{key}"\n')
        config.chmod(0o600)
        server = AsNobody(f"sqlite:///{directory / 'mail.sqlite3'}", ["--config", str(config)], cwd=directory)
        try:
            server.start()
            waitFor(lambda: "may not read" in server.stdout, f"the warning, in {server.log()}")
            [line] = [line for line in server.stdout.splitlines() if "may not read" in line]
            assert line.endswith(
                f"nobody, the user of twistd's --uid, may not read --config {config}, --tls-key {key}: the start "
                "read them as root, but a reload (SIGHUP, systemctl reload), made as nobody, cannot, and a "
                "renewed certificate would not be served until a restart; let nobody read them (chgrp, chmod g+r)"
            ), line
        finally:
            server.stop()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_twistdsHelpIntoAReaderGoneExits141(monkeypatch):
    """
    C{twistd mailgate --help | head}: the reader gone before the help (24
    KB) was written ends the process as a shell reports a command killed
    by SIGPIPE, 141, with nothing more written; it was Python's traceback
    of the BrokenPipeError, exit 1.
    """
    import io
    import sys
    import types

    readEnd, writeEnd = os.pipe()
    os.close(readEnd)
    stdout = io.TextIOWrapper(io.FileIO(writeEnd, "w"), write_through=True)
    monkeypatch.setattr(sys, "stdout", stdout)
    options = tap.Options()
    # What twistd's ServerOptions gives its subcommand's options.
    options.parent = types.SimpleNamespace(subCommand="mailgate", getSynopsis=lambda: "Usage: twistd [options]")
    try:
        with pytest.raises(SystemExit) as e:
            options.parseOptions(["--help"])
        assert e.value.code == 141
        # The descriptor goes nowhere now: the interpreter's flush at exit
        # reports nothing.
        stdout.write("x" * 100000)
    finally:
        stdout.close()


def test_twistdsChrootIsRefused(capsys):
    """
    twistd changes root once the database is open and the listeners are
    bound: the server listened, but its database's connections, made
    after, looked for the file inside the new root and every session
    failed.  Refused in one line, EX_CONFIG.
    """
    options = parse("--database", UNREACHABLE)
    options.parent = {"chroot": "/srv/mailgate", "nodaemon": True}
    with pytest.raises(SystemExit) as e:
        tap.makeService(options)
    assert e.value.code == 78
    err = capsys.readouterr().err
    assert err.startswith("mailgate: twistd --chroot is not supported: ") and err.count("\n") == 1, err


def test_aPidFileThatIsASymbolicLinkIsRefused(tmp_path, capsys):
    """
    twistd writes its pid file as root (before --uid takes effect)
    through whatever is at that path: a dangling link put there, in a
    directory its user may write, had root make any file of the machine
    (/etc/nologin, which shuts every other user out) with the pid in it.
    twistd's own check reads the file only where the link leads to one;
    mailgate, which runs after it and before the write, refuses the link
    in one line, EX_CONFIG.
    """
    target = tmp_path / "etc" / "nologin"
    link = tmp_path / "mailgate.pid"
    link.symlink_to(target)
    options = parse("--database", UNREACHABLE)
    options.parent = {"pidfile": str(link), "nodaemon": True}
    with pytest.raises(SystemExit) as e:
        tap.makeService(options)
    assert e.value.code == 78
    err = capsys.readouterr().err
    assert err.startswith(f"mailgate: the pid file {link} is a symbolic link") and err.count("\n") == 1, err
    assert not target.exists()


def test_twistdsRundirWithRelativePathsIsRefused(tmp_path, capsys):
    """
    twistd --rundir changes directory after the database is opened (and
    migrated) and the TLS files read: the database's connections, made
    after, opened another file of that name there, a new one without
    mailgate's tables (probe: "no such table" on every access), and a
    SIGHUP read the certificate or the configuration file from there.
    Relative paths with --rundir are refused in one line, exit 78.
    """
    options = parse(
        "--database", "sqlite:///mail.sqlite3", "--tls-cert", "cert.pem", "--tls-key", str(tmp_path / "key.pem"),
        "--tls-sni-cert", f"{tmp_path / 'b.pem'}:b.key",
    )
    options.parent = {"rundir": str(tmp_path), "nodaemon": True}
    with pytest.raises(SystemExit) as e:
        tap.makeService(options)
    assert e.value.code == 78
    assert capsys.readouterr().err == (
        "mailgate: twistd --rundir with relative paths (--database sqlite:///mail.sqlite3; --tls-cert cert.pem; "
        "--tls-sni-cert b.key): mailgate opens them before twistd changes directory and again after it, "
        "which would be two different files; give them as absolute paths\n"
    )
    absolute = parse("--database", f"sqlite:///{tmp_path / 'mail.sqlite3'}", "--spool-directory", str(tmp_path))
    assert tap.relativePaths(absolute.config, str(tmp_path / "mailgate.toml")) == []
    assert tap.relativePaths(absolute.config, "mailgate.toml") == ["--config mailgate.toml"]


def test_aReloadRefusesWhatTwistdsOptionsMakeTheNextStartRefuse(tmp_path):
    """
    A reload under the start's twistd options: a path of the file changed
    to a relative one under --rundir (the next start refuses it, exit 78)
    was taken, a relative tls-cert even applied at once, read from the
    directory twistd had changed to (probe on a real twistd).  Refused as
    the start refuses it, the configuration in service kept.  A real
    twistd: the point is its change of directory.
    """
    import signal

    from e2e import TWISTD, ServerProcess, databaseURL, waitFor

    run = tmp_path / "run"
    (run / "spool").mkdir(parents=True)
    config = tmp_path / "mailgate.toml"
    config.write_text(f'spool-directory = "{run / "spool"}"\n')
    server = ServerProcess(databaseURL(tmp_path / "mail.sqlite3"), ["--config", str(config)], cwd=tmp_path)
    server.command = (TWISTD, "-n", "--pidfile=", f"--rundir={run}", "mailgate")
    server.start()
    try:
        config.write_text('spool-directory = "spool"\n')
        server.process.send_signal(signal.SIGHUP)
        waitFor(lambda: "configuration reload" in server.stdout, "the reload")
        assert (
            "configuration reload failed, keeping the configuration in service: twistd --rundir with relative "
            "paths (--spool-directory spool): mailgate opens them before twistd changes directory"
        ) in server.stdout, server.log()
        assert "take effect at the next restart" not in server.stdout
    finally:
        server.stop()


def test_aReloadUnderTwistdsOwnLogRefusesAnotherLogFormat(tmp_path):
    """
    Under twistd's --syslog or --logger, which keep twistd's own text log,
    log-format = "json" is refused at start (exit 78); a reload took it
    for the next restart, which then refused the same file.
    """
    config = tmp_path / "mailgate.toml"
    config.write_text("")
    options = tap.Options()
    options.parseOptions(["--config", str(config)])
    reread = tap._rereadUnderTwistd(options, {"syslog": True}, False, True)
    assert reread().logFormat == "text"
    config.write_text('log-format = "json"\n')
    with pytest.raises(ConfigurationError, match=f'log-format = "json" in {config} writes to a file or standard'):
        reread()
    assert tap._rereadUnderTwistd(options, {}, False, False)().logFormat == "json"


def test_domainsAndAddressesInUnicodeAreTheirASCIIForm():
    """
    --domain, --auth-default-realm, --postmaster and --debug-user in
    Unicode name what mail, logins and the mailgate command name by them
    (alice@bücher.example is alice@xn--bcher-kva.example everywhere): the
    server refused to start with them as invalid domains, though the
    command's user add took them.
    """
    config = parse(
        "--domain", "B\u00fccher.example",
        "--auth-default-realm", "b\u00fccher.example.",
        "--postmaster", "Postmaster@b\u00fccher.example",
        "--debug-user", "alice@bu\u0308cher.example",
    ).toConfig()
    assert list(config.domains) == ["xn--bcher-kva.example"]
    assert config.authDefaultRealm == "xn--bcher-kva.example"
    assert config.postmaster == "postmaster@xn--bcher-kva.example"
    assert list(config.debugUsers) == ["alice@xn--bcher-kva.example"]
    with pytest.raises(usage.UsageError):
        parse("--domain", "\u2603.example").toConfig()


def test_whatAReloadAppliesIsSaidWhereTheConfigFileIsDescribed():
    """
    The settings a SIGHUP applies at once (mailgate.reload: LIVE_SETTINGS,
    and TLS_SETTINGS while TLS stays on) are named where the --config
    option, the systemd unit and the example configuration file describe
    the reload: the first two said that debug-peer and debug-user alone
    did, other changes waiting for a restart, after the TLS settings had
    come to apply at reload too; the example file, which administrators
    copy to /etc/mailgate and edit, said nothing of reloads.
    """
    from mailgate.reload import (
        DELIVERY_SETTINGS,
        ERROR_SETTINGS,
        LIVE_SETTINGS,
        LOGIN_SETTINGS,
        NAME_SETTINGS,
        NETWORK_SETTINGS,
        POLICY_SETTINGS,
        QUOTA_STATUS_ACTIONS,
        QUOTA_STATUS_SETTINGS,
        SESSION_SETTINGS,
        STOP_SETTINGS,
        STORE_SETTINGS,
        TIMER_SETTINGS,
        TLS_SETTINGS,
    )

    contrib = Path(__file__).parent.parent / "contrib"

    def comments(path):
        return " ".join(line.lstrip("# ") for line in path.read_text().splitlines() if line.startswith("#"))

    texts = [comments(contrib / "systemd" / "mailgate.service"), comments(contrib / "mailgate.toml")]
    for text in [" ".join(t.split()) for t in [tap.Options.opt_config.__doc__, *texts]]:
        applied = LIVE_SETTINGS | SESSION_SETTINGS.keys() | NETWORK_SETTINGS | POLICY_SETTINGS | STORE_SETTINGS
        applied |= ERROR_SETTINGS.keys() | DELIVERY_SETTINGS | LOGIN_SETTINGS | STOP_SETTINGS | NAME_SETTINGS
        applied |= TIMER_SETTINGS | QUOTA_STATUS_SETTINGS.keys() | QUOTA_STATUS_ACTIONS
        for name in applied:
            assert name in text, (name, text)
        assert all(name.startswith("tls-") for name in TLS_SETTINGS)
        assert "the tls-* settings apply at once" in text, text
