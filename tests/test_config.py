"""
mailgate.config: settings declared once, used by the command line, the
TOML configuration file and L{MailgateConfig}; the shipped example file
generated from the declarations; endpoint syntax checked with no reactor.
"""

import io
import json
import os
import pathlib
import re
import socket
import tomllib

import pytest
from twisted.python import usage

from certs import makeCertificate
from e2e import MAILGATE, TWISTD, databaseURL, runCommand, sqliteOnly, waitFor
from e2e import mailgate_server  # noqa: F401 (fixture)
from mailgate import config as settings
from mailgate import tap
from mailgate.config import APOPPolicy, MailgateConfig
from mailgate.errors import ConfigurationError
from mailgate.pop3.factory import APOPAdvertiser
from mailgate.testing import memoryStore
from test_tap import noEnvironmentDatabase, parse  # noqa: F401 (autouse fixture)

REPO = pathlib.Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "contrib" / "mailgate.toml"


def writeConfig(tmp_path, text, name="mailgate.toml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# -- one declaration per setting ------------------------------------------------


def test_everySettingIsAnOptionAndAnAttribute():
    usageText = tap.Options().getUsage()
    fields = {a.name for a in MailgateConfig.__attrs_attrs__}
    for s in settings.SETTINGS:
        names = list(s.flags) if s.flags else [s.name]
        for name in names:
            assert f"--{name}" in usageText, name
        assert s.attribute in fields, s.attribute
        # The default as the configuration holds it is the declared one.
        assert getattr(MailgateConfig(), s.attribute) == s.defaultValue()
    assert fields == {s.attribute for s in settings.SETTINGS} | {"reloadOnSIGHUP"}


def test_addingASettingIsOneDeclaration(tmp_path):
    """
    One more L{Setting} gives a command-line option, a configuration file
    key, a configuration attribute and an entry in the example file.
    """
    warning = settings.Setting(
        "drain-warning", "drainWarning", settings.Number(), 30.0,
        "Seconds before the end of the shutdown grace at which sessions are warned.",
    )
    extended = settings.SETTINGS + (warning,)
    Config = settings.makeConfigClass(extended)

    class Extended(tap.Options):
        settings = extended
        configClass = Config

    assert Config().drainWarning == 30.0
    assert "--drain-warning=" in Extended().getUsage()
    options = Extended()
    options.parseOptions(["--drain-warning", "5"])
    assert options.toConfig().drainWarning == 5.0
    path = writeConfig(tmp_path, "drain-warning = 12\n")
    options = Extended()
    options.parseOptions(["--config", path])
    assert options.toConfig().drainWarning == 12.0
    assert "#drain-warning = 30.0\n" in settings.exampleFile(extended)
    # The original options know nothing of it.
    with pytest.raises(usage.UsageError):
        parse("--drain-warning", "5")
    with pytest.raises(SystemExit, match="unknown key 'drain-warning'"):
        parse("--config", path)


def test_aBooleanSettingIsAFlag(tmp_path):
    verbose = settings.Setting(
        "verbose-sessions", "verboseSessions", settings.Boolean(), False,
        "Log every command.", flags={"verbose-sessions": True},
    )
    extended = settings.SETTINGS + (verbose,)
    Config = settings.makeConfigClass(extended)

    class Extended(tap.Options):
        settings = extended
        configClass = Config

    options = Extended()
    options.parseOptions([])
    assert options.toConfig().verboseSessions is False
    options = Extended()
    options.parseOptions(["--verbose-sessions"])
    assert options.toConfig().verboseSessions is True
    for text, value in (("verbose-sessions = true\n", True), ("verbose-sessions = false\n", False)):
        options = Extended()
        options.parseOptions(["--config", writeConfig(tmp_path, text)])
        assert options.toConfig().verboseSessions is value
    with pytest.raises(SystemExit, match="expected true or false"):
        Extended().parseOptions(["--config", writeConfig(tmp_path, 'verbose-sessions = "yes"\n')])
    assert "#verbose-sessions = false\n" in settings.exampleFile(extended)


def test_defaultsAreTheDeclaredOnes():
    assert parse().toConfig() == MailgateConfig(reloadOnSIGHUP=True)


def test_repeatedDefaultsAreNotShared():
    first, second = MailgateConfig(), MailgateConfig()
    first.pop3.append("tcp:2110")
    assert second.pop3 == ["tcp:1110:interface=127.0.0.1"]


def test_embeddersMayStillSayTrueFalseOrAuto():
    assert MailgateConfig(apop=True).apop is APOPPolicy.ALWAYS
    assert MailgateConfig(apop=False).apop is APOPPolicy.NEVER
    assert MailgateConfig(apop="auto").apop is APOPPolicy.AUTO
    assert MailgateConfig(apop="never").apop is APOPPolicy.NEVER
    with pytest.raises(ValueError):
        MailgateConfig(apop="sometimes")


def test_apopPolicy():
    store = memoryStore()
    assert isinstance(APOPPolicy.AUTO.advertiser(store), APOPAdvertiser)
    assert APOPPolicy.ALWAYS.advertiser(store) is True
    assert APOPPolicy.NEVER.advertiser(store) is False
    assert APOPPolicy.AUTO.checked and APOPPolicy.ALWAYS.checked
    assert not APOPPolicy.NEVER.checked


def test_checkConfigIsWhereTLSIsChecked(tmp_path):
    with pytest.raises(ConfigurationError, match="both a certificate and a key"):
        settings.checkConfig(MailgateConfig(tlsKey="key.pem"))
    with pytest.raises(ConfigurationError, match="implicit-TLS"):
        settings.checkConfig(MailgateConfig(pop3s=["tcp:995"]))
    # The command line goes through the same check.
    with pytest.raises(usage.UsageError, match="both a certificate and a key"):
        parse("--tls-cert", "cert.pem")
    with pytest.raises(usage.UsageError, match="implicit-TLS"):
        parse("--pop3s", "tcp:995")


# -- endpoints checked without a reactor -------------------------------------------


@pytest.mark.parametrize(
    "description",
    [
        "tcp:110",
        "tcp:1110:interface=127.0.0.1:backlog=128",
        "tcp6:110:interface=\\:\\:1",
        "unix:/run/mailgate/lmtp:mode=660",
        "haproxy:tcp:110",
        "haproxy:unix:/run/mailgate/pop3",
    ],
)
def test_endpointSyntaxAccepted(description):
    assert settings.checkEndpoint(description) == description


def test_sslEndpointLoadsItsFilesWithoutListening(tmp_path):
    cert, key = makeCertificate(tmp_path, "mail.example.test")
    description = f"ssl:995:privateKey={key}:certKey={cert}"
    assert settings.checkEndpoint(description) == description
    with pytest.raises(ValueError, match="invalid endpoint"):
        settings.checkEndpoint(f"ssl:995:privateKey={tmp_path / 'missing.key'}:certKey={cert}")


def test_systemdEndpointOutsideSystemd():
    """
    Outside socket activation (this test process was given no sockets)
    the server, about to listen (adopting), refuses the description with
    a reason; test_systemd starts a real twistd the way systemd does,
    where it is accepted.
    """
    for description in ("systemd:domain=INET:index=0", "systemd:domain=INET:name=pop3"):
        with pytest.raises(ValueError, match="systemd passed no socket with that index or name"):
            settings.checkEndpoint(description, adopting=True)
    with pytest.raises(ValueError, match="exactly one of descriptor index or name"):
        settings.checkEndpoint("systemd:domain=INET")


def test_aSocketActivatedFileIsReadByTheCommandAndConfigCheck(tmp_path, monkeypatch):
    """
    The mailgate command and config --check (the unit's ExecReload=) read
    the server's file in processes systemd gives no socket: a systemd:
    listener refused there failed every admin command run with --config
    and every systemctl reload.  They check its syntax; the process
    systemd gave sockets to, and the server about to listen, look the
    socket up.
    """
    from twisted.internet.testing import MemoryReactorClock

    from mailgate.cli import run
    from mailgate.service import makeService

    path = tmp_path / "mailgate.toml"
    path.write_text(f'database = "sqlite:///{tmp_path / "m.sqlite3"}"\npop3 = ["systemd:domain=INET6:name=pop3"]\n')
    out, err = io.StringIO(), io.StringIO()
    assert run(["--config", str(path), "config", "--check"], stdout=out, stderr=err, environ={}) == 0, err.getvalue()
    assert run(["--config", str(path), "db", "upgrade"], stdout=out, stderr=err, environ={}) == 0, err.getvalue()
    assert run(["--config", str(path), "user", "list"], stdout=out, stderr=err, environ={}) == 0, err.getvalue()
    with pytest.raises(ValueError, match="no address family 'AF_INET7'"):
        settings.checkEndpoint("systemd:domain=INET7:name=pop3")
    with pytest.raises(ConfigurationError, match="systemd passed no socket with that index or name"):
        makeService(
            MailgateConfig(pop3=["haproxy:systemd:domain=INET:name=pop3"]), reactor=MemoryReactorClock(),
            store=memoryStore(),
        )
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
    with pytest.raises(settings.ConfigFileError, match="key 'pop3': .* systemd passed no socket with that"):
        settings.readFile(path)


@pytest.mark.parametrize(
    "description",
    ["tcp:notaport", "bogus:110", "tcp:110:nosuchoption=1", "", "   ", "haproxy:nothing:1",
     # Control characters: bind() refused interface=<CR><LF> only at start.
     "tcp:110:interface=\r\n", "tcp:110:interface=\x1b[2J", "bogus\x1b[2J:110"],
)
def test_endpointSyntaxRefused(description):
    with pytest.raises(ValueError):
        settings.checkEndpoint(description)
    with pytest.raises(usage.UsageError, match="--smtp"):
        parse("--smtp", description)


def test_checkingAnEndpointListensOnNothing():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings.checkEndpoint(f"tcp:{port}:interface=127.0.0.1")
    # Nothing took the port: binding it again works.
    with socket.socket() as again:
        again.bind(("127.0.0.1", port))


@pytest.mark.parametrize("description", ["tcp:65536", "tcp:-1", "tcp6:99999:interface=\\:\\:1", "haproxy:tcp:70000"])
def test_aPortNumberOutOfRangeIsRefused(description, tmp_path):
    """
    Twisted's parser takes any whole number for a port: the start then
    failed at bind() with exit 1, which systemd retries for ever, after
    config --check had said OK.  Refused as every other invalid endpoint.
    """
    with pytest.raises(ValueError, match=r"is not a port number \(0 to 65535\)"):
        settings.checkEndpoint(description)
    with pytest.raises(usage.UsageError, match="--pop3: .* is not a port number"):
        parse("--pop3", description)
    path = tmp_path / "mailgate.toml"
    path.write_text(f"smtp = [{json.dumps(description)}]\n")
    with pytest.raises(settings.ConfigFileError, match=f"{path}: key 'smtp': .* is not a port number"):
        settings.readFile(path)
    assert settings.checkEndpoint("tcp:65535") == "tcp:65535"


@pytest.mark.parametrize(
    "description",
    ["tcp6:110:interface=::1", "tcp6:110:interface=2001:db8::1", "tcp:110:interface=::", "haproxy:tcp6:110:interface=::1",
     "tcp6:110:interface=fe80::1%eth0:backlog=64"],
)
def test_anIPv6InterfaceWithUnescapedColonsIsRefusedSayingSo(description, tmp_path):
    """
    The colons of an IPv6 interface must be escaped (C{interface=\\:\\:1}),
    as README says; an administrator's C{interface=::1} was refused with
    Twisted's own words ("_TCP6ServerParser._parseServer() got multiple
    values for argument 'interface'"), which do not say what to write.
    """
    reason = f"invalid endpoint {description!r}: escape each colon of an IPv6 interface address with a backslash"
    with pytest.raises(ValueError) as e:
        settings.checkEndpoint(description)
    assert str(e.value).startswith(reason + " (interface=\\:\\:1)")
    with pytest.raises(usage.UsageError, match="^--pop3: " + re.escape(reason)):
        parse("--pop3", description)
    path = tmp_path / "mailgate.toml"
    path.write_text(f"pop3 = [{json.dumps(description)}]\n")
    with pytest.raises(settings.ConfigFileError, match=f"{path}: key 'pop3': " + re.escape(reason)):
        settings.readFile(path)
    head, _, address = description.partition("interface=")
    address, _, backlog = address.partition(":backlog=")
    escaped = head + "interface=" + address.replace(":", "\\:") + (f":backlog={backlog}" if backlog else "")
    assert settings.checkEndpoint(escaped) == escaped


@pytest.mark.parametrize(
    "listeners, clash",
    [
        ({"pop3": ["tcp:1110"], "smtp": ["tcp:1110"]}, "pop3 tcp:1110 and smtp tcp:1110"),
        ({"pop3": ["tcp:1110:interface=127.0.0.1"], "lmtp": ["haproxy:tcp:1110"]},
         "pop3 tcp:1110:interface=127.0.0.1 and lmtp haproxy:tcp:1110"),
        ({"pop3": ["unix:/run/m/pop3"], "metrics": "unix:/run/m/pop3"},
         "pop3 unix:/run/m/pop3 and metrics unix:/run/m/pop3"),
        ({"pop3": ["tcp6:1110:interface=\\:\\:1", "tcp6:1110"]}, "pop3 tcp6:1110:interface=\\:\\:1 and pop3 tcp6:1110"),
        # An IPv4 address written mapped into IPv6 is that address.
        ({"pop3": ["tcp:1110:interface=127.0.0.1"], "smtp": ["tcp6:1110:interface=\\:\\:ffff\\:127.0.0.1"]},
         "pop3 tcp:1110:interface=127.0.0.1 and smtp tcp6:1110:interface=\\:\\:ffff\\:127.0.0.1"),
    ],
)
def test_twoListenersOnOneAddressAreRefused(listeners, clash, tmp_path):
    """
    The second listener on an address could not start ("address already
    in use", exit 1, which systemd retries for ever, taking it for the
    process before still holding the port): refused by checkListening,
    which the start, a reload and config --check make, naming both.
    """
    config = MailgateConfig(**listeners)
    with pytest.raises(ConfigurationError, match=re.escape(clash) + " would listen on the same address"):
        settings.checkListening(config)
    path = tmp_path / "mailgate.toml"
    path.write_text("".join(f"{name} = {json.dumps(value)}\n" for name, value in listeners.items()))
    options = tap.Options()
    with pytest.raises(SystemExit) as refused:
        options.parseOptions(["--config", str(path)])
    assert refused.value.code == 78 and str(refused.value).endswith(f"the second could not start (in {path})")


def test_listenersOnDifferentAddressesOrAnyFreePortDoNotClash():
    for listeners in (
        {"pop3": ["tcp:1110:interface=127.0.0.1"], "smtp": ["tcp:1110:interface=127.0.0.2"]},
        {"pop3": ["tcp:0", "tcp:0"], "smtp": ["tcp:0"]},
        {"pop3": ["tcp:1110:interface=127.0.0.1", "tcp6:1110:interface=\\:\\:1"]},
        # One link-local address per interface.
        {"pop3": ["tcp6:1110:interface=fe80\\:\\:1%eth0", "tcp6:1110:interface=fe80\\:\\:1%eth1"]},
        {"pop3": ["tcp:1110"], "smtp": ["tcp:1125"], "lmtp": ["unix:/run/m/lmtp"], "metrics": "unix:/run/m/metrics"},
    ):
        assert settings.checkListening(MailgateConfig(**listeners))


def test_tapNoLongerUsesATestReactor():
    source = (REPO / "mailgate" / "tap.py").read_text() + (REPO / "mailgate" / "config.py").read_text()
    assert "MemoryReactor" not in source
    assert "twisted.internet.testing" not in source


# -- the configuration file ---------------------------------------------------------


def test_fileSetsOptions(tmp_path):
    path = writeConfig(
        tmp_path,
        'database = "sqlite:////var/lib/mailgate/mail.sqlite3"\n'
        'pop3 = ["tcp:110", "tcp:1110:interface=127.0.0.1"]\n'
        'smtp = ["tcp:25"]\n'
        "max-recipients = 250\n"
        "min-data-rate = 2000\n"
        "login-timeout = 60\n"
        'tls-min-version = "1.3"\n'
        "auth-failure-delay = 2\n"
        'apop = "never"\n'
        'domain = ["Example.ORG"]\n'
        'trusted-network = ["10.1.2.3/8"]\n'
        'log-format = "json"\n'
        'metrics = "tcp:9101:interface=127.0.0.1"\n',
    )
    config = parse("--config", path).toConfig()
    assert (config.minDataRate, config.loginTimeout, config.tlsMinVersion) == (2000, 60, "1.3")
    assert config.database == "sqlite:////var/lib/mailgate/mail.sqlite3"
    assert config.pop3 == ["tcp:110", "tcp:1110:interface=127.0.0.1"]
    assert config.smtp == ["tcp:25"]
    assert config.maxRecipients == 250
    assert config.authFailureDelay == 2.0
    assert config.apop is APOPPolicy.NEVER
    assert config.domains == ["example.org"]
    assert config.trustedNetworks == ["10.0.0.0/8"]
    assert config.logFormat == "json"
    assert config.metrics == "tcp:9101:interface=127.0.0.1"
    # What the file does not set keeps its default.
    assert config.idleTimeout == 600
    assert config.lmtp == []


def test_commandLineOverridesTheFile(tmp_path, monkeypatch):
    monkeypatch.setenv("MAILGATE_DATABASE", "sqlite:///from-environment.sqlite3")
    path = writeConfig(
        tmp_path,
        'database = "sqlite:///from-file.sqlite3"\n'
        'pop3 = ["tcp:110"]\n'
        "max-recipients = 250\n"
        'apop = "never"\n'
        'hostname = "file.example.org"\n',
    )
    config = parse(
        "--config", path, "--pop3", "tcp:2110", "--pop3", "tcp:3110", "--max-recipients", "300", "--apop"
    ).toConfig()
    assert config.pop3 == ["tcp:2110", "tcp:3110"]
    assert config.maxRecipients == 300
    assert config.apop is APOPPolicy.ALWAYS
    # Not given on the command line: the file's, over the environment's.
    assert config.hostname == "file.example.org"
    assert config.database == "sqlite:///from-file.sqlite3"
    assert parse("--config", path, "--database", "sqlite:///cli.sqlite3").toConfig().database == (
        "sqlite:///cli.sqlite3"
    )
    # Without the file, the environment is used.
    assert parse().toConfig().database == "sqlite:///from-environment.sqlite3"


def test_messageSizeTakesAUnit(tmp_path):
    """
    C{max-message-size} reads sizes as C{default-quota} does (Dovecot's
    units of 1024), on the command line and in the file, as octets or as
    a string.
    """
    assert parse("--max-message-size", "10M").toConfig().maxMessageSize == 10 * 1024 * 1024
    assert parse("--max-message-size", "2048").toConfig().maxMessageSize == 2048
    assert parse("--config", writeConfig(tmp_path, 'max-message-size = "1G"\n')).toConfig().maxMessageSize == 2**30
    assert parse("--config", writeConfig(tmp_path, "max-message-size = 4096\n")).toConfig().maxMessageSize == 4096
    with pytest.raises(usage.UsageError, match="at least 1 octet"):
        parse("--max-message-size", "0")


def test_optionOrderDoesNotMatter(tmp_path):
    path = writeConfig(tmp_path, "max-recipients = 250\n")
    assert parse("--max-recipients", "300", "--config", path).toConfig().maxRecipients == 300


def test_emptyFileMeansDefaults(tmp_path):
    path = writeConfig(tmp_path, "# nothing set\n")
    assert parse("--config", path).toConfig() == parse().toConfig()


def fileError(tmp_path, text):
    path = writeConfig(tmp_path, text)
    with pytest.raises(SystemExit) as e:
        parse("--config", path)
    # EX_CONFIG, which the systemd unit does not restart on; the line is
    # the exception's text (and on standard error).
    assert e.value.code == 78
    message = str(e.value)
    assert message.startswith("mailgate: ")
    assert "\n" not in message
    assert path in message
    return message


def test_unknownKey(tmp_path):
    message = fileError(tmp_path, "max-recipient = 10\n")
    assert "unknown key 'max-recipient'" in message
    assert "did you mean 'max-recipients'" in message
    # --config is an option, but not a key: said so, rather than that keys
    # are the options' names (which told the administrator it was one).
    message = fileError(tmp_path, 'config = "other.toml"\n')
    assert "unknown key 'config' (a configuration file cannot name another: --config is given" in message
    assert "long option names" not in message
    # Attribute names are not keys: the file speaks the options' language.
    assert "unknown key 'maxRecipients'" in fileError(tmp_path, "maxRecipients = 10\n")


@pytest.mark.parametrize(
    "text, key, reason",
    [
        ('max-recipients = "100"\n', "max-recipients", "expected a whole number"),
        ("max-recipients = 1.5\n", "max-recipients", "expected a whole number"),
        ("max-recipients = true\n", "max-recipients", "expected a whole number"),
        ("max-recipients = 0\n", "max-recipients", "must be at least 1"),
        ("idle-timeout = -5\n", "idle-timeout", "must be at least 0"),
        ("max-message-size = 0\n", "max-message-size", "must be at least 1 octet"),
        ('max-message-size = "lots"\n', "max-message-size", "not a size: 'lots'"),
        ('auth-failure-delay = "soon"\n', "auth-failure-delay", "expected a number"),
        ('pop3 = "tcp:110"\n', "pop3", "expected an array"),
        ("pop3 = [110]\n", "pop3", "expected an endpoint"),
        ('pop3 = ["tcp:notaport"]\n', "pop3", "invalid endpoint 'tcp:notaport'"),
        ('smtp = ["bogus:25"]\n', "smtp", "invalid endpoint 'bogus:25'"),
        ('metrics = "tcp:9101:nosuch=1"\n', "metrics", "invalid endpoint"),
        ('apop = "sometimes"\n', "apop", "must be one of"),
        ("apop = true\n", "apop", "expected one of"),
        ('log-format = "xml"\n', "log-format", "must be one of"),
        ('database = "mysql://localhost/mail"\n', "database", "unsupported database URL"),
        ('trusted-network = ["10.0.0.0/33"]\n', "trusted-network", "not a network"),
        ('domain = ["not a domain"]\n', "domain", "domain"),
        ('hostname = "  "\n', "hostname", "must not be empty"),
        ('hostname = "evil\\r\\n+OK injected"\n', "hostname", "not a host name"),
        ('hostname = "a b<c>"\n', "hostname", "not a host name"),
        ('hostname = "[mail.example.org]"\n', "hostname", "not an address literal"),
        ('default-quota = "99999999999999999999T"\n', "default-quota", "too large"),
        ('default-quota = "8388608T"\n', "default-quota", "at most 1024T"),
        ("default-quota = 9223372036854775807\n", "default-quota", "at most 1024T"),
        ('max-message-size = "2048T"\n', "max-message-size", "at most 1024T"),
        ("expire-days = 99999999999999999999\n", "expire-days", "must be at most 36500"),
        ('expire-days = "99999999999999999999"\n', "expire-days", "must be at most 36500"),
        ("keep-deleted-days = 99999999999999999999\n", "keep-deleted-days", "must be at most 36500"),
        ("ban-time = 1000000000000\n", "ban-time", "must be at most 315360000"),
        ("ban-window = 315360001\n", "ban-window", "must be at most 315360000"),
        ("idle-timeout = 99999999999999999999\n", "idle-timeout", "must be at most 604800, not 999999"),
        # Timers and delays: at most a week, and never inf or nan (TOML
        # has both literals).
        ("auth-failure-delay = 1e300\n", "auth-failure-delay", "must be at most 604800, not 1e+300"),
        ("auth-failure-delay = inf\n", "auth-failure-delay", "not a finite number: inf"),
        ("auth-penalty-max = nan\n", "auth-penalty-max", "not a finite number: nan"),
        ("shutdown-grace = 604800.5\n", "shutdown-grace", "must be at most 604800, not 604800.5"),
        ("login-delay = 9223372036854775807\n", "login-delay", "must be at most 604800, not 9223372036854775807"),
        ("login-timeout = 604801\n", "login-timeout", "must be at most 604800, not 604801"),
        ("auth-cache-ttl = 604801\n", "auth-cache-ttl", "must be at most 604800, not 604801"),
        ("memory-trim-interval = 604801\n", "memory-trim-interval", "must be at most 604800, not 604801"),
        ("idle-timeout = inf\n", "idle-timeout", "expected a whole number"),
        ("max-connections = 9223372036854775808\n", "max-connections", "must be at most 9223372036854775807"),
        ("[pop3]\nport = 110\n", "pop3", "got {...} (table)"),
        # An integer past a float's range: an OverflowError traceback, exit 1.
        ("shutdown-grace = 1" + "0" * 400 + "\n", "shutdown-grace", "too large"),
        ("auth-penalty-max = -1" + "0" * 400 + "\n", "auth-penalty-max", "too large"),
    ],
)
def test_wrongValues(tmp_path, text, key, reason):
    message = fileError(tmp_path, text)
    assert f"key {key!r}" in message
    assert reason in message


@pytest.mark.parametrize(
    "value",
    [
        '["postgresql://mailgate:s3cret-pw@db.internal/mail"]',
        '["postgresql://mailgate@db.internal/mail?password=s3cret-pw"]',
    ],
)
def test_aDatabaseOfTheWrongTypeIsRefusedWithoutItsPassword(tmp_path, value):
    """
    A database URL given as an array (as the listeners are) is refused
    saying what it should be, without the value: the error goes to the
    terminal and, for a reload (SIGHUP), into the server's log, and the
    URL holds the database's password.
    """
    message = fileError(tmp_path, f"database = {value}\n")
    assert "key 'database'" in message and "expected a string" in message
    assert "s3cret-pw" not in message


def test_notTOML(tmp_path):
    message = fileError(tmp_path, "pop3 = [tcp:110\n")
    assert "not valid TOML" in message
    assert "line 1" in message


def test_theEffectiveFileHidesTheTLSKeysPasswordToo():
    """
    mailgate config (the effective file) hides the database URL's
    ?sslpassword= (libpq's password of the client's TLS key) as it hides
    ?password=: it was shown in clear.
    """
    from mailgate.urls import hasPassword

    url = "postgresql://mailgate@db.internal/mail?sslkey=/etc/mailgate/client.key&sslpassword=k3y-s3cret"
    shown = settings.effectiveFile(MailgateConfig(database=url))
    assert "k3y-s3cret" not in shown
    assert 'database = "postgresql://mailgate@db.internal/mail?sslkey=/etc/mailgate/client.key&sslpassword=***"' in shown
    # and a file giving it, readable by all, is warned of
    assert hasPassword(url)


@pytest.mark.parametrize(
    "text, reason",
    [
        ('tls-cert = "cert.pem"\n', "TLS needs both a certificate and a key"),
        ('pop3s = ["tcp:995"]\n', "implicit-TLS listeners need a certificate and a key"),
    ],
)
def test_settingsOfTheFileThatDoNotFitTogetherNameTheFile(tmp_path, text, reason):
    """
    A certificate without its key in the file is the file's fault: one line
    naming it and exit 78, as for a wrong value, not a usage error without
    the file's name and exit 1 (which systemd's Restart=on-failure retried
    every two seconds on the same file).  Where the command line is at
    fault too, it stays a usage error; a reload names the file as well.
    """
    path = writeConfig(tmp_path, text)
    assert fileError(tmp_path, text) == f"mailgate: {path}: {reason}"
    with pytest.raises(usage.UsageError) as e:
        parse("--config", writeConfig(tmp_path, "max-recipients = 5\n"), "--tls-cert", "cert.pem")
    assert str(e.value) == "TLS needs both a certificate and a key"
    options = parse("--config", writeConfig(tmp_path, "max-recipients = 5\n"))
    writeConfig(tmp_path, text)
    with pytest.raises(settings.ConfigFileError) as e:
        options.reread()
    assert str(e.value) == f"{path}: {reason}"


@pytest.mark.parametrize("text", ["pop3 = " + "[" * 5000 + "]" * 5000, "pop3 = " + "{a=" * 5000 + "1" + "}" * 5000])
def test_nestedTooDeeply(tmp_path, text):
    """
    Not a RecursionError traceback from tomllib: one line naming the file.
    """
    message = fileError(tmp_path, text + "\n")
    assert message.endswith("mailgate.toml: not valid TOML: arrays or tables nested too deeply"), message


def test_notUTF8(tmp_path):
    """
    Not a UnicodeDecodeError traceback: one line naming the file.
    """
    path = tmp_path / "mailgate.toml"
    path.write_bytes(b"\xff\xfed\x00")
    with pytest.raises(SystemExit) as e:
        parse("--config", str(path))
    assert str(e.value) == (
        f"mailgate: {path}: not UTF-8 text (byte 0 is b'\\xff'); a configuration file is TOML, which is UTF-8"
    )


def test_byteOrderMark(tmp_path):
    """
    A file saved with a UTF-8 byte order mark (as Windows editors do) is
    refused saying so, not as "Invalid statement (at line 1, column 1)".
    """
    path = tmp_path / "mailgate.toml"
    path.write_bytes(b"\xef\xbb\xbfexpire-days = 30\n")
    with pytest.raises(SystemExit) as e:
        parse("--config", str(path))
    assert str(e.value) == (
        f"mailgate: {path}: starts with a byte order mark (U+FEFF, as some editors save UTF-8); save it without one"
    )


@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_aFileThatIsNotARegularFileIsRefusedAtOnce(tmp_path, kind):
    """
    --config naming a FIFO (a named pipe no one writes to) hung the start
    for good, before any line was written (twistd and mailgate config
    --check alike: open() waits for a writer), and a reload on it would
    have stopped the reactor.  It, a directory or a device is refused at
    once, exit 78, saying what it is.
    """
    path = tmp_path / "mailgate.toml"
    if kind == "fifo":
        os.mkfifo(path)
        what = "a FIFO"
    else:
        path.mkdir()
        what = "a directory"
    reason = f"mailgate: {path}: cannot read the configuration file: it is {what}, not a regular file"
    code, out, err = runCommand(
        [TWISTD, "-n", "--pidfile=", "mailgate", "--database", databaseURL(tmp_path / "m.sqlite3"), "--config", str(path)],
        cwd=tmp_path,
    )
    assert (code, [line for line in (out + err).splitlines() if line.strip()]) == (78, [reason])
    code, out, err = runCommand([MAILGATE, "--config", str(path), "config", "--check"], cwd=tmp_path)
    assert (code, out, err) == (78, "", reason + "\n")
    assert not (tmp_path / "m.sqlite3").exists()


def test_aDeviceIsNoConfigurationFile():
    """
    /dev/zero, given by mistake, was read until memory ran out.
    """
    with pytest.raises(SystemExit) as e:
        parse("--config", "/dev/zero")
    assert e.value.code == 78
    assert str(e.value) == (
        "mailgate: /dev/zero: cannot read the configuration file: it is a character device, not a regular file"
    )


def test_aHugeFileIsNoConfigurationFile(tmp_path):
    """
    A file far larger than any configuration (a log named by mistake) is
    refused without being read into memory whole.
    """
    path = tmp_path / "mailgate.log"
    with open(path, "wb") as f:
        f.truncate(settings.MAX_FILE_SIZE + 1)
    with pytest.raises(SystemExit) as e:
        parse("--config", str(path))
    assert str(e.value) == (
        f"mailgate: {path}: larger than 1 MiB: not a configuration file (the example, contrib/mailgate.toml, "
        "is about 20 KB)"
    )
    with open(path, "wb") as f:
        f.truncate(settings.MAX_FILE_SIZE)
    with pytest.raises(SystemExit, match="not valid TOML"):
        parse("--config", str(path))


def test_missingFile(tmp_path):
    with pytest.raises(SystemExit) as e:
        parse("--config", str(tmp_path / "absent.toml"))
    assert str(e.value).startswith(f"mailgate: {tmp_path / 'absent.toml'}: cannot read")


def test_badEnvironmentIsNamed(monkeypatch):
    monkeypatch.setenv("MAILGATE_DATABASE", "mysql://localhost/mail")
    # Refused as a configuration error (exit 78), not a usage error: see
    # test_tap.test_badDatabaseInEnvironment.
    with pytest.raises(tap.ConfigurationRefused, match=r"\$MAILGATE_DATABASE"):
        parse()


# -- the example file ------------------------------------------------------------------


def test_exampleFileIsGeneratedFromTheDeclarations():
    """
    contrib/mailgate.toml is exactly what the declarations produce; after
    adding or changing a setting, regenerate it:
    .venv/bin/python -m mailgate.config > contrib/mailgate.toml
    """
    assert EXAMPLE.read_text() == settings.exampleFile(), (
        "contrib/mailgate.toml is out of date: run "
        "`.venv/bin/python -m mailgate.config > contrib/mailgate.toml`"
    )


def test_exampleFileHasEveryKeyAndItsDefault(tmp_path):
    text = EXAMPLE.read_text()
    keys = re.findall(r"^#([a-z0-9-]+) = ", text, re.MULTILINE)
    assert keys == [s.name for s in settings.SETTINGS]
    # Uncommented, it is a valid configuration file; where a setting has a
    # default, the value shown is that default.
    uncommented = re.sub(r"^#([a-z0-9-]+ = )", r"\1", text, flags=re.MULTILINE)
    document = tomllib.loads(uncommented)
    for s in settings.SETTINGS:
        value = s.fromTOML(document[s.name])
        unset = s.default is None or (s.repeated and not s.default)
        if not unset:
            assert value == s.defaultValue(), s.name
    path = writeConfig(tmp_path, uncommented.replace("/etc/mailgate/", str(tmp_path) + "/"))
    cert, key = makeCertificate(tmp_path, "mail.example.test")
    os.replace(cert, tmp_path / "cert.pem")
    os.replace(key, tmp_path / "key.pem")
    parse("--config", path)


# -- with the real twistd --------------------------------------------------------------


@sqliteOnly
def test_twistdReadsTheFile(mailgate_server, tmp_path):
    path = writeConfig(
        tmp_path,
        'pop3 = ["tcp:0:interface=127.0.0.1"]\n'
        'smtp = ["tcp:0:interface=127.0.0.1"]\n'
        'hostname = "from-file.test"\n',
    )
    server = mailgate_server("--config", path, "--hostname", "from-cli.test", expect={"SMTP": 1})
    # The file's SMTP listener is there, and the command line's host name
    # won over the file's.
    with socket.create_connection(("127.0.0.1", server.portOf("SMTP")), timeout=10) as s:
        assert s.recv(512).startswith(b"220 from-cli.test ")
    # And the start says the file's is not served.
    waitFor(lambda: f"hostname in {path}: the command line gives it another value, which wins" in server.stdout,
            f"the warning, in {server.log()}")


@sqliteOnly
def test_aFileGivingTheDatabasePasswordThatEveryoneMayReadIsWarnedOf(mailgate_server, tmp_path):
    """
    A configuration file holding the database's password, left readable
    by every user of the machine (0644, as an editor under the usual
    umask leaves it): every start says so, naming the file, not the
    password.  Readable by its group only, or without a password, it is
    not warned of.
    """
    url = "postgresql://mailgate:s3cret-pw@db.internal/mail"
    path = writeConfig(tmp_path, f'database = "{url}"\n')
    warning = (
        f"the configuration file {path} holds the database's password, and every user of this "
        f"machine may read it (mode 0644): chmod o-r it"
    )
    # The command line's database (the test's SQLite file) wins over the
    # file's, which still holds the password.
    os.chmod(path, 0o644)
    server = mailgate_server("--config", path)
    waitFor(lambda: warning in server.stdout, f"the warning, in {server.log()}")
    assert "s3cret" not in server.stdout + server.stderr
    server.stop()
    os.chmod(path, 0o640)
    assert tap.configFileWarning(path) is None
    os.chmod(path, 0o644)
    for text in ('database = "postgresql://mailgate@db.internal/mail"\n', 'hostname = "mail.example.org"\n'):
        pathlib.Path(path).write_text(text)
        assert tap.configFileWarning(path) is None, text
    pathlib.Path(path).write_text('database = "postgresql://mailgate@db.internal/mail?password=s3cret-pw"\n')
    assert tap.configFileWarning(path) == warning


@sqliteOnly
def test_aFileEveryoneMayWriteIsWarnedOf(mailgate_server, tmp_path):
    """
    A configuration file every user of the machine may write (0666), or
    one in a directory they may write (not sticky: they may replace it),
    hands each of them the server at its next start or reload: its
    database (a database of theirs takes every message and login), its
    listeners, its certificates.  Every start, reload and config --check
    says so; it was silent.
    """
    directory = tmp_path / "etc"
    directory.mkdir()
    path = writeConfig(directory, "max-recipients = 50\n")
    os.chmod(path, 0o666)
    warning = (
        f"the configuration file {path} may be written by every user of this machine (mode 0666), "
        "and so the database, listeners and certificates the server uses at its next start or reload "
        "chosen: chmod o-w it"
    )
    server = mailgate_server("--config", path)
    waitFor(lambda: warning in server.stdout, f"the warning, in {server.log()}")
    server.stop()
    code, out, err = runCommand([MAILGATE, "--config", path, "config", "--check"])
    assert (code, err) == (0, f"mailgate: warning: {warning}\n")
    os.chmod(path, 0o644)
    assert tap.configFileWarning(path) is None
    os.chmod(directory, 0o777)
    assert tap.configFileWarning(path) == (
        f"the directory {directory} of the configuration file {path} may be written by every user of this "
        "machine (mode 0777), who may replace the file, and so the database, listeners and certificates the "
        f"server uses at its next start or reload chosen: chmod o-w {directory}"
    )
    os.chmod(directory, 0o1777)
    assert tap.configFileWarning(path) is None
    # Both warnings of a file, in one.
    pathlib.Path(path).write_text('database = "postgresql://mailgate:s3cret@db.internal/mail"\n')
    os.chmod(path, 0o666)
    assert tap.configFileWarning(path) == (
        f"the configuration file {path} holds the database's password, and every user of this machine may read "
        f"it (mode 0666): chmod o-r it; {warning}"
    )


def test_oauth2KeysAreAmongTheFilesAReloadReadsAgain(tmp_path, capsys):
    """
    A SIGHUP reads the oauth2-keys files again, as it reads the TLS files:
    under twistd's --rundir a relative one is refused at start as theirs
    is (a real twistd started with oauth2-keys = ["jwks.pem"] and
    --rundir elsewhere, and each SIGHUP then said 'oauth2 keys not
    reloaded: cannot read jwks.pem', or would have read another file of
    that name); and one the --uid user cannot read is named in the
    warning at start (reload.unreadable), as each SIGHUP fails on it.
    """
    issuer = ("--oauth2-issuer", "https://login.example.org", "--oauth2-audience", "mailgate")
    options = parse("--database", f"sqlite:///{tmp_path / 'mail.sqlite3'}", "--oauth2-keys", "jwks.pem", *issuer)
    options.parent = {"rundir": str(tmp_path), "nodaemon": True}
    with pytest.raises(SystemExit) as e:
        tap.makeService(options)
    assert e.value.code == 78
    assert capsys.readouterr().err == (
        "mailgate: twistd --rundir with relative paths (--oauth2-keys jwks.pem): mailgate opens them before "
        "twistd changes directory and again after it, which would be two different files; give them as "
        "absolute paths\n"
    )
    keys = tmp_path / "jwks.pem"
    keys.write_text("")
    missing = tmp_path / "absent.pem"
    options = parse(
        "--database", f"sqlite:///{tmp_path / 'mail.sqlite3'}", "--oauth2-keys", str(keys), "--oauth2-keys",
        str(missing), *issuer,
    )
    assert tap.relativePaths(options.config) == []
    assert tap.unreadableForReload(options.config) == [f"--oauth2-keys {missing}"]


@pytest.mark.parametrize("option", ["exempt-network", "trusted-network", "proxy-network", "debug-peer"])
def test_anIPv4NetworkMappedIntoIPv6WithItsIPv4PrefixIsRefused(tmp_path, option):
    """
    C{::ffff:127.0.0.0/8} is C{::/8} (the prefix counts IPv6's 128 bits),
    which holds no IPv4 client (they are compared in their IPv4 form) but
    C{::1}: a server given it as C{--exempt-network} limited 127.0.0.1 and
    exempted C{::1}, and said nothing.  Refused, saying what to write;
    the prefix of 96 or more that names the IPv4 network is taken.
    """
    reason = (
        "not a network: '::ffff:127.0.0.0/8' is ::/8, not an IPv4 network: write 127.0.0.0/8 "
        "(or ::ffff:127.0.0.0/104, the prefix counting IPv6's 128 bits)"
    )
    with pytest.raises(usage.UsageError, match=f"^--{option}: " + re.escape(reason) + "$"):
        parse(f"--{option}", "::ffff:127.0.0.0/8")
    assert fileError(tmp_path, f'{option} = ["::ffff:127.0.0.0/8"]\n').endswith(f"key '{option}': {reason}")
    with pytest.raises(usage.UsageError, match=re.escape("'::ffff:0:0/80' is ::/80, not an IPv4 network")):
        parse(f"--{option}", "::ffff:0:0/80")
    for network in ("::ffff:127.0.0.0/104", "::ffff:127.0.0.1", "::/8", "2001:db8::/32"):
        parse(f"--{option}", network)


def test_anIPv4NetworkMappedIntoIPv6IsShownWithItsIPv4Part(tmp_path):
    """
    C{mailgate config} shows such a network as it was written, its IPv4
    part dotted: it showed C{::ffff:10.0.0.0/104} as C{::ffff:a00:0/104}.
    """
    path = writeConfig(tmp_path, 'exempt-network = ["::ffff:10.0.0.0/104", "::FFFF:10.1.2.3/128", "2001:db8::/32"]\n')
    code, out, err = runCommand([MAILGATE, "--config", path, "config"])
    assert (code, err) == (0, ""), err
    assert 'exempt-network = ["::ffff:10.0.0.0/104", "::ffff:10.1.2.3/128", "2001:db8::/32"]' in out, out


def test_exemptNetworkNoneWithNetworks(tmp_path):
    """
    In a file, the one line naming the file and the key (not twistd's
    usage text); on the command line, a usage error, as before.
    """
    message = fileError(tmp_path, 'exempt-network = ["none", "10.0.0.0/8"]\n')
    assert message.endswith("key 'exempt-network': 'none' exempts nothing: it cannot be combined with networks")
    with pytest.raises(usage.UsageError, match="exempt-network: 'none' exempts nothing"):
        parse("--exempt-network", "none", "--exempt-network", "10.0.0.0/8")
    assert parse("--exempt-network", "none").toConfig().exemptNetworks == ["none"]
    assert parse("--trusted-network", "none").toConfig().trustedNetworks == ["none"]
    with pytest.raises(usage.UsageError, match="trusted-network: 'none' trusts no network"):
        parse("--trusted-network", "none", "--trusted-network", "10.0.0.0/8")


def test_anEmptyProxyNetworkListIsRefused(tmp_path):
    """
    No balancer at all, to the PROXY listener, means any peer may send a
    header (and claim a loopback client: exempt from bans, allowed
    plaintext passwords): proxy-network = [] in a file, meant as "none",
    is refused in one line rather than trusting everyone.  An embedder's
    MailgateConfig is checked alike.
    """
    from mailgate.config import ConfigurationError, MailgateConfig, checkConfig

    message = fileError(tmp_path, "proxy-network = []\n")
    assert message.endswith("key 'proxy-network': an empty list would let any peer send a PROXY header "
                            "(and claim any client address): name the balancers' networks, or leave the "
                            "key out for this machine's (0.0.0.0/0 and ::/0 to trust every peer)")
    with pytest.raises(ConfigurationError, match="proxy-network: an empty list"):
        checkConfig(MailgateConfig(proxyNetworks=[]))
    assert parse("--proxy-network", "10.0.0.2/32").toConfig().proxyNetworks == ["10.0.0.2/32"]


def test_twistdStopsOnABadFileWithOneLine(tmp_path):
    """
    The one line, and EX_CONFIG (78): the file must change before a start
    can work, so the systemd unit (RestartPreventExitStatus=78) does not
    start it again and again.
    """
    path = writeConfig(tmp_path, 'pop3 = ["tcp:notaport"]\n')
    code, out, err = runCommand(
        [TWISTD, "-n", "--pidfile=", "mailgate", "--database", databaseURL(tmp_path / "m.sqlite3"), "--config", path],
        cwd=tmp_path,
    )
    assert code == 78, (code, out, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines == [f"mailgate: {path}: key 'pop3': invalid endpoint 'tcp:notaport': "
                     "invalid literal for int() with base 10: 'notaport'"], (out, err)
    assert "Traceback" not in out + err
    assert not (tmp_path / "m.sqlite3").exists()

def test_anEmptyConfigPathIsRefusedNotTakenForNone(capsys):
    """
    --config "" (a unit's variable, unset): the server took the empty
    path for no file and served its defaults, while mailgate config
    --check refused it.  Both refuse it, exit 78, in the same words.
    """
    with pytest.raises(SystemExit) as refused:
        parse("--config", "")
    assert refused.value.code == 78
    assert str(refused.value) == "mailgate: --config names no file (an empty path)"
    err = io.StringIO()
    from mailgate.cli import run

    assert run(["--config", " ", "config", "--check"], stdout=io.StringIO(), stderr=err, environ={}) == 78
    assert err.getvalue() == "mailgate: --config names no file (an empty path)\n"


def test_twistdRefusesToListenOnNothing(tmp_path):
    """
    A file that empties the POP3 list, with no other listener: refused
    in one line, not a server that listens on nothing.
    """
    path = tmp_path / "mailgate.toml"
    path.write_text("pop3 = []\n")
    code, out, err = runCommand(
        [TWISTD, "-n", "--pidfile=", "mailgate", "--database", databaseURL(tmp_path / "m.sqlite3"), "--config", str(path)],
        cwd=tmp_path,
    )
    assert code == 78, (code, out, err)
    assert [line for line in (out + err).splitlines() if line.strip()] == [
        f"mailgate: nothing to listen on: pop3, pop3s, smtp and lmtp are all empty (in {path})"
    ]



@pytest.mark.parametrize(
    "content, reason",
    [
        (b"\xff\xfed\x00", "not UTF-8 text (byte 0 is b'\\xff'); a configuration file is TOML, which is UTF-8"),
        (b'exempt-network = ["none", "10.0.0.0/8"]\n',
         "key 'exempt-network': 'none' exempts nothing: it cannot be combined with networks"),
    ],
)
def test_twistdStopsOnAFileWithOneLineNamingIt(tmp_path, content, reason):
    """
    Neither a traceback nor twistd's usage text: the one line.
    """
    path = tmp_path / "mailgate.toml"
    path.write_bytes(content)
    code, out, err = runCommand(
        [TWISTD, "-n", "--pidfile=", "mailgate", "--database", databaseURL(tmp_path / "m.sqlite3"), "--config", str(path)],
        cwd=tmp_path,
    )
    assert code == 78, (code, out, err)
    assert [line for line in (out + err).splitlines() if line.strip()] == [f"mailgate: {path}: {reason}"]


@pytest.mark.parametrize(
    "argv, reason",
    [
        (["--tls-cert", "cert.pem"], "TLS needs both a certificate and a key"),
        (["--apop", "--no-apop"], "--apop and --no-apop contradict each other"),
        (["--pop3", "tcp:11O"], "--pop3: invalid endpoint 'tcp:11O': invalid literal for int() with base 10: '11O'"),
        (["--bogus"], "option --bogus not recognized"),
        (["--idle-timeout", "nan"], "--idle-timeout: not a whole number: 'nan'"),
        # The first file was dropped, unsaid: a base file and a local one,
        # as other daemons layer them, served the second over the defaults.
        (["--config", "base.toml", "--config", "local.toml"],
         "--config given twice (base.toml, then local.toml): a server reads one configuration file"),
    ],
)
def test_twistdStopsOnABadCommandLineWithOneLine(tmp_path, argv, reason):
    """
    As for a file: the one line on standard error, not twistd's usage text
    of some two hundred lines on standard output with the reason last; and
    exit 78 (EX_CONFIG), as the same value in the file, which the systemd
    unit does not retry (it was 1: started again every two seconds for
    ever on a command line only an edit of the unit can mend).
    """
    code, out, err = runCommand(
        [TWISTD, "-n", "--pidfile=", "mailgate", "--database", databaseURL(tmp_path / "m.sqlite3"), *argv],
        cwd=tmp_path,
    )
    assert (code, out) == (78, ""), err
    assert err.splitlines() == [f"mailgate: {reason} (twistd mailgate --help lists the options)"]


def test_expireDaysZeroIsRefused(tmp_path):
    """
    On the command line and in a file alike: 0 days of retention would
    remove every message, read or not, at the retention task's next pass
    (where 0 means "no limit" for most other settings); never keeps mail.
    """
    reason = (
        "must be at least 1, not 0: 0 days would remove every message at the next retention pass; "
        "never keeps mail"
    )
    with pytest.raises(usage.UsageError) as e:
        parse("--expire-days", "0")
    assert str(e.value) == f"--expire-days: {reason}"
    for text in ("expire-days = 0\n", 'expire-days = "0"\n'):
        path = tmp_path / "mailgate.toml"
        path.write_text(text)
        with pytest.raises(settings.ConfigFileError) as e:
            settings.readFile(path)
        assert str(e.value) == f"{path}: key 'expire-days': {reason}"
    assert parse("--expire-days", "1").config.expireDays == 1
    assert parse("--expire-days", "never").config.expireDays is None


def test_defaultQuotaZeroIsRefused(tmp_path):
    """
    A default quota of 0 would have every user without a quota of their
    own refuse every message (452 for ever), where Dovecot reads 0 as no
    limit: refused on the command line and in a file alike.
    """
    reason = (
        "must be at least 1, not 0: a quota of 0 would refuse every message (no limit: no "
        "--default-quota, or a user's quota none)"
    )
    for value in ("0", "0M"):
        with pytest.raises(usage.UsageError) as e:
            parse("--default-quota", value)
        assert str(e.value) == f"--default-quota: {reason}"
    for text in ("default-quota = 0\n", 'default-quota = "0K"\n'):
        path = tmp_path / "mailgate.toml"
        path.write_text(text)
        with pytest.raises(settings.ConfigFileError) as e:
            settings.readFile(path)
        assert str(e.value) == f"{path}: key 'default-quota': {reason}"
    assert parse("--default-quota", "1").config.defaultQuota == 1
    assert parse().config.defaultQuota is None


@pytest.mark.parametrize(
    "values, message",
    [
        ({"expireDays": 0}, "expireDays: must be at least 1, not 0: 0 days would remove every message"),
        ({"maxRecipients": -5}, "maxRecipients: must be at least 1, not -5"),
        ({"authFailureDelay": float("nan")}, "authFailureDelay: not a finite number: nan"),
        ({"shutdownGrace": 10**400}, "shutdownGrace: too large"),
        ({"authFailureDelay": 1e300}, "authFailureDelay: must be at most 604800, not 1e+300"),
        ({"idleTimeout": float("nan")}, "idleTimeout: not a finite number: nan"),
        ({"loginTimeout": float("inf")}, "loginTimeout: not a finite number: inf"),
        ({"loginDelay": 2**63}, "loginDelay: must be at most 604800, not 9223372036854775808"),
        ({"memoryTrimInterval": 10**9}, "memoryTrimInterval: must be at most 604800"),
        ({"quotaWarnings": [80, float("nan")]}, "quotaWarnings: not a finite number: nan"),
        ({"quotaWarnings": [101]}, "quotaWarnings: must be at most 100, not 101"),
        ({"defaultQuota": 1e300}, "defaultQuota: too large: "),
        ({"maxMessageSize": float("inf")}, "maxMessageSize: not a whole number of octets: inf"),
        ({"keepDeletedDays": 2**64}, "keepDeletedDays: must be at most 36500"),
        ({"loginDelay": 300.5}, "loginDelay: not a whole number: 300.5"),
        ({"expireDays": 1.5}, "expireDays: not a whole number: 1.5"),
        ({"quotaWarnings": [80, 95.5]}, "quotaWarnings: not a whole number: 95.5"),
        # A repeated setting given as one value: a TypeError, or a string
        # read as its characters (pop3="tcp:110" as the endpoints "t", "c"...).
        ({"quotaWarnings": 80}, "quotaWarnings: a list of values, not 80"),
        ({"quotaWarnings": None}, "quotaWarnings: a list of values, not None"),
        ({"pop3": "tcp:1110:interface=127.0.0.1"}, "pop3: a list of values, not 'tcp:1110:interface=127.0.0.1'"),
    ],
)
def test_anEmbeddersConfigurationIsBoundedAsTheCommandLineIs(tmp_path, values, message):
    """
    MailgateConfig(...) of an embedding application reaches makeService
    without the command line's or the file's checks: the same bounds
    hold there, named by attribute, before anything is opened.
    """
    from mailgate.service import makeService

    config = MailgateConfig(database=f"sqlite:///{tmp_path / 'm.sqlite3'}", **values)
    with pytest.raises(ConfigurationError) as e:
        makeService(config)
    assert str(e.value).startswith(message)
    assert not (tmp_path / "m.sqlite3").exists()


def test_anEmbeddersWholeFloatIsTakenAsAWholeNumber():
    """
    A whole float an embedder gives a whole-number setting (600.0, 50e6)
    is taken, and kept as the whole number it is: kept as a float, it was
    advertised as one (LOGIN-DELAY 600.0 in CAPA, SIZE 50000000.0 in EHLO;
    RFC 2449 and RFC 1870 want digits), which the command line and the
    file never give.
    """
    config = settings.checkConfig(MailgateConfig(
        loginDelay=600.0, expireDays=30.0, maxMessageSize=50e6, defaultQuota=1e9, quotaWarnings=[80.0, 95],
    ))
    values = [config.loginDelay, config.expireDays, config.maxMessageSize, config.defaultQuota, *config.quotaWarnings]
    assert values == [600, 30, 50_000_000, 1_000_000_000, 80, 95]
    assert [type(v) for v in values] == [int] * 6


@pytest.mark.parametrize(
    "argv, message",
    [
        (("--auth-failure-delay", "1e300"), "--auth-failure-delay: must be at most 604800, not 1e+300"),
        (("--auth-failure-delay", "1e999"), "--auth-failure-delay: not a finite number: inf"),
        (("--auth-failure-delay", "nan"), "--auth-failure-delay: not a number: 'nan'"),
        (("--auth-penalty-max", "inf"), "--auth-penalty-max: not a number: 'inf'"),
        (("--shutdown-grace", "604801"), "--shutdown-grace: must be at most 604800, not 604801"),
        (("--idle-timeout", "9223372036854775807"), "--idle-timeout: must be at most 604800, not 9223372036854775807"),
        (("--login-timeout", "1e9"), "--login-timeout: not a whole number: '1e9'"),
        (("--login-delay", "604801"), "--login-delay: must be at most 604800, not 604801"),
        (("--auth-cache-ttl", "99999999999"), "--auth-cache-ttl: must be at most 604800, not 99999999999"),
        (("--memory-trim-interval", "604801"), "--memory-trim-interval: must be at most 604800, not 604801"),
    ],
)
def test_timesAreAtMostAWeek(argv, message):
    """
    A delay, timeout or interval in seconds is at most a week
    (MAX_SECONDS), and a finite number: --auth-failure-delay 1e300 held
    each failed login's connection for ever, --login-delay 2**63-1 was
    advertised as LOGIN-DELAY and let each user log in once.  A week
    itself is taken.
    """
    with pytest.raises(usage.UsageError) as e:
        parse(*argv)
    assert str(e.value) == message
    name = argv[0][2:]
    attribute = settings.setting(name).attribute
    assert getattr(parse(argv[0], "604800").config, attribute) == 604800


def test_everyBoundIsDocumented():
    """
    Every number setting in seconds has a bound below what the database's
    integers hold, and README's options table states each bound a
    setting has below that (the number itself), as its help does.
    """
    from test_readme import section, tableRows

    rows = tableRows(section("Running the server: `twistd mailgate`"), "| option | default | meaning |")
    meanings = {}
    for cells in rows:
        for name in re.findall(r"--([a-z0-9-]+)", cells[0]):
            meanings[name] = cells[2]
    bounded = 0
    for s in settings.SETTINGS:
        if not isinstance(s.kind, (settings.Integer, settings.Number)):
            continue
        if s.kind.metavar == "SECONDS":
            assert s.kind.maximum < settings.MAX_INTEGER, s.name
        if s.kind.maximum < settings.MAX_INTEGER:
            bounded += 1
            assert re.search(rf"\b{s.kind.maximum}\b", meanings[s.name]), (s.name, meanings[s.name])
    assert bounded >= 14


def test_negativeZeroIsZero(tmp_path):
    """
    -0.0 (TOML writes it, and the command line) is 0: logs and replies
    that show the value say 0, not -0.
    """
    path = tmp_path / "mailgate.toml"
    path.write_text("shutdown-grace = -0.0\nauth-failure-delay = -0.0\n")
    config = settings.readFile(path)
    assert repr(config["shutdown-grace"]) == "0.0"
    assert repr(parse("--auth-penalty-max", "-0").config.authPenaltyMax) == "0.0"


@pytest.mark.parametrize(
    "argv, message",
    [
        (("--max-recipients", "1_000"), "--max-recipients: not a whole number: '1_000'"),
        (("--max-recipients", "\u0661\u0662"), "--max-recipients: not a whole number: '\u0661\u0662'"),
        (("--max-recipients", "\uff11\uff12"), "--max-recipients: not a whole number: '\uff11\uff12'"),
        (("--max-recipients", "9" * 5000), "--max-recipients: must be at most "),
        (("--auth-failure-delay", "1_0"), "--auth-failure-delay: not a number: '1_0'"),
        (("--auth-failure-delay", "\u0661"), "--auth-failure-delay: not a number: '\u0661'"),
        (("--max-message-size", "9" * 5000), "--max-message-size: too large: "),
    ],
)
def test_numbersAreWrittenInASCIIDigits(argv, message):
    """
    Python's int() and float() also take "1_000", other scripts' digits
    and full-width ones, and give up past 4300 digits with a message of
    their own: a setting is plain digits, and an endless one is too large.
    """
    with pytest.raises(usage.UsageError) as e:
        parse(*argv)
    assert str(e.value).startswith(message), str(e.value)
    assert parse("--max-recipients", " 0100 ").config.maxRecipients == 100
    assert parse("--auth-failure-delay", "2.5").config.authFailureDelay == 2.5
    assert parse("--auth-failure-delay", "1e1").config.authFailureDelay == 10.0


def test_anMTASocketEveryUserMayReachIsWarnedOf(tmp_path):
    """
    An LMTP or quota-status Unix socket that every user of the machine
    may use (its mode lets others connect, as README's mode=666 and
    Twisted's default do, and every directory above it lets others in)
    is warned of at the start (C{listener.socket_open}): any local user
    could hand mail to any user under any sender past Postfix's checks,
    or learn which addresses exist.  README has it in a directory only
    Postfix may enter (mode 750): then nothing is said, nor for a socket
    of mode 660, nor for a POP3 socket.
    """
    from mailgate.config import openSockets

    def modes(closed=()):
        # Every directory enterable by all (0755), but those in closed (0750).
        return lambda path: 0o40750 if path in closed else 0o40755

    spool = str(tmp_path / "spool" / "mailgate")
    config = MailgateConfig(
        lmtp=[f"unix:{spool}/lmtp:mode=666", "tcp:2424:interface=127.0.0.1"],
        quotaStatus=[f"unix:{spool}/quota-status"],
        pop3=[f"unix:{spool}/pop3"],
    )
    assert openSockets(config, modes()) == [
        f"the lmtp socket {spool}/lmtp may be used by every user of this machine (mode 0666, in directories "
        "anyone may enter): any of them may hand mail to any user under any sender, past the MTA's checks; "
        "make it in a directory only the MTA may enter (README: install -d -o mailgate -g postfix -m 750)",
        f"the quota-status socket {spool}/quota-status may be used by every user of this machine (mode 0666, "
        "in directories anyone may enter): any of them may learn which addresses exist and how full their "
        "mailboxes are; make it in a directory only the MTA may enter (README: install -d -o mailgate -g "
        "postfix -m 750)",
    ]
    assert openSockets(config, modes(closed={spool})) == []
    assert openSockets(config, modes(closed={"/"})) == []
    assert openSockets(MailgateConfig(lmtp=[f"unix:{spool}/lmtp:mode=660"]), modes()) == []


def test_theStartWarnsOfAnOpenMTASocket(tmp_path, monkeypatch):
    """
    The warning is among the start's (its directories taken for ones
    every user may enter: pytest's are its own user's).
    """
    import functools

    from mailgate import service as serviceModule
    from mailgate.config import openSockets
    from mailgate.service import makeService

    from iterated import IteratedReactor

    monkeypatch.setattr(serviceModule, "openSockets", functools.partial(openSockets, modeOf=lambda path: 0o40755))
    reactor = IteratedReactor()
    try:
        service = makeService(
            MailgateConfig(database=f"sqlite:///{tmp_path}/mail.sqlite3", pop3=[],
                           lmtp=[f"unix:{tmp_path}/lmtp:mode=666"]),
            reactor=reactor,
        )
        service.store.engine.releaseServer()
    finally:
        reactor.close()
    [warning] = [text for event, text in service.startupWarnings if event == "listener.socket_open"]
    assert warning.startswith(f"the lmtp socket {tmp_path}/lmtp may be used by every user of this machine")
