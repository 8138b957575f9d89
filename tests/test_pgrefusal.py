"""
A PostgreSQL server that refuses mailgate for its configuration (a wrong
password, an unknown role or database, a role that may not log in, no
password at all) stops start-up and the C{mailgate} command with
C{EX_CONFIG} (78) and one line saying why, so that neither systemd nor an
administrator retries it for ever; one that cannot be reached, or refuses
for now (no connection slot left), with C{EX_TEMPFAIL} (75).  A node
already running whose password is changed under it logs why each attempt
fails and keeps trying, and serves again once the password is put back.

All on the suite's real PostgreSQL (tests/pgserver.py), with roles made
for each test: the server's messages are in whatever language it was set
up in, and nothing here depends on their words but on the SQLSTATE.
"""

import poplib
import secrets
import socket
from urllib.parse import quote, urlsplit, urlunsplit

import pytest

from certs import makeCertificate
from conftest import _requirePostgres, withSchema
from e2e import DEADLINE, MAILGATE, AdminCommand, ServerStarter, pop, runCommand, waitFor
from e2e import mailgateHere as mailgate
from mailgate.cli import EX_CONFIG, EX_TEMPFAIL
from mailgate.store import pgrefusal

ALICE = "alice@example.org"
ALICE_PW = "alice-pw"


def asRole(base, user, password=None, database=None):
    """
    C{base} (the suite's PostgreSQL URL) as another role, password or
    database.
    """
    parts = urlsplit(base)
    host = parts.netloc.rpartition("@")[2]
    userInfo = quote(user) + (f":{quote(password)}" if password is not None else "")
    path = f"/{database}" if database is not None else parts.path
    return urlunsplit(parts._replace(netloc=f"{userInfo}@{host}", path=path))


def admin(sql):
    import psycopg

    with psycopg.connect(_requirePostgres(), autocommit=True) as conn:
        conn.execute(sql)


@pytest.fixture
def roles():
    """
    Make PostgreSQL roles for a test, C{roles("LOGIN PASSWORD 'x'")}
    returning each one's name; all are dropped (their sessions ended
    first) when it ends.
    """
    made = []

    def make(attributes):
        name = "mgref_" + secrets.token_hex(4)
        admin(f"CREATE ROLE {name} {attributes}")
        made.append(name)
        return name

    yield make
    for name in made:
        admin(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{name}'")
        admin(f"DROP OWNED BY {name}")
        admin(f"DROP ROLE {name}")


def unusedPort():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wrongPassword(roles):
    return asRole(_requirePostgres(), urlsplit(_requirePostgres()).username, "wrong-" + secrets.token_hex(4))


def _unknownRole(roles):
    return asRole(_requirePostgres(), "nosuch_" + secrets.token_hex(4), "wrong-" + secrets.token_hex(4))


def _unknownDatabase(roles):
    parts = urlsplit(_requirePostgres())
    return asRole(_requirePostgres(), parts.username, parts.password, "nosuch_" + secrets.token_hex(4))


def _mayNotLogIn(roles):
    return asRole(_requirePostgres(), roles("NOLOGIN PASSWORD 'pw-nologin'"), "pw-nologin")


def _noPassword(roles):
    return asRole(_requirePostgres(), roles("LOGIN PASSWORD 'pw-needed'"))


def _noConnectionSlot(roles):
    return asRole(_requirePostgres(), roles("LOGIN PASSWORD 'pw-limited' CONNECTION LIMIT 0"), "pw-limited")


def _serverDown(roles):
    parts = urlsplit(_requirePostgres())
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition(":")[0] + f":{unusedPort()}"))


# (how the URL is made, the exit status, what the one line says)
REFUSALS = {
    "wrong password": (_wrongPassword, EX_CONFIG, "a configuration error (SQLSTATE 28P01): "),
    # PostgreSQL answers an unknown role as it answers a wrong password.
    "unknown role": (_unknownRole, EX_CONFIG, "a configuration error (SQLSTATE 28P01): "),
    "unknown database": (_unknownDatabase, EX_CONFIG, "a configuration error (SQLSTATE 3D000): "),
    "role that may not log in": (_mayNotLogIn, EX_CONFIG, "a configuration error (SQLSTATE 28000): "),
    "no password": (
        _noPassword, EX_CONFIG,
        "the server asks for a password and neither the database URL nor a password file gives one "
        "(PGPASSFILE's password file ",
    ),
    "no connection slot": (_noConnectionSlot, EX_TEMPFAIL, "temporary failure, try again: "),
    "server down": (_serverDown, EX_TEMPFAIL, "temporary failure, try again: "),
}


@pytest.mark.parametrize(
    "sqlstate, configuration",
    [
        ("28P01", True),  # password authentication failed (or no such role)
        ("28000", True),  # no pg_hba.conf entry; the role may not log in
        ("3D000", True),  # no such database
        ("42501", True),  # no CONNECT privilege on the database
        ("42704", True),  # an unknown setting in the URL's options=-c...
        ("22023", True),  # a setting's value refused
        ("53300", False),  # too many connections (for the server or the role)
        ("57P03", False),  # starting up, shutting down, in recovery
        ("57P01", False),  # terminated by an administrator
        ("08P01", False),  # protocol violation
        ("XX000", False),  # an internal error
    ],
)
def test_theVerdictOfEachSQLSTATE(sqlstate, configuration):
    """
    The classes that only a change of configuration ends, and the
    others, which waiting may.
    """
    verdict = pgrefusal.verdictOf(sqlstate, tlsDeclined=False, needsPassword=False)
    assert (verdict is not None) == configuration
    if configuration:
        assert verdict.startswith(f"a configuration error (SQLSTATE {sqlstate}): ")


@pytest.fixture(autouse=True)
def noPasswordFromElsewhere(monkeypatch, tmp_path):
    """
    libpq would take a password the URL lacks from C{$PGPASSWORD} or a
    password file: not here.
    """
    monkeypatch.delenv("PGPASSWORD", raising=False)
    monkeypatch.setenv("PGPASSFILE", str(tmp_path / "no-pgpass"))


def assertOneLine(err, expected, url):
    assert err.startswith("mailgate: ") and err.count("\n") == 1, err
    assert expected in err, err
    assert "Traceback" not in err
    assertNoPassword(err, url)


def assertNoPassword(text, url):
    password = urlsplit(url).password
    if password:
        assert f":{password}@" not in text, text
        # The suite's own role is called what its password is.
        if password != urlsplit(url).username:
            assert password not in text, text


@pytest.mark.parametrize("case", list(REFUSALS))
def test_theCommandSaysWhetherToFixOrToRetry(case, roles):
    """
    C{mailgate user list} exits 78 when PostgreSQL refuses the URL's
    password, role or database, 75 when it is down or full, with one line
    that says which and never the password.
    """
    makeURL, code, expected = REFUSALS[case]
    url = makeURL(roles)
    code_, out, err = mailgate(url, "user", "list")
    assert (code_, out) == (code, ""), err
    assertOneLine(err, expected, url)


def test_anUnusableClientKeyIsAConfigurationError(monkeypatch, tmp_path):
    """
    A client certificate libpq sends (sslcert, else
    ~/.postgresql/postgresql.crt, where it exists) whose private key is
    missing or may be read by others: libpq refuses to connect with it
    (a root-owned key may be 0640, any other 0600), and said so as it says
    an unreachable server, exit 75, the systemd unit restarting the node
    for ever.  Refused before connecting, exit 78, saying which; with no
    certificate there, or sslcertmode=disable, the key is not looked at.
    """
    from mailgate.store.pgurl import parameterProblem

    for name in ("PGSSLMODE", "PGSERVICE", "PGSSLROOTCERT", "PGSSLCERT", "PGSSLKEY", "PGSSLCERTMODE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    certificate, key = makeCertificate(tmp_path, "mailnode")
    base = f"postgresql://mailnode@db.internal/mail?sslmode=require&sslcert={certificate}&sslkey="
    lead = f"unusable client certificate: libpq sends {certificate}, and sslkey"
    missing = tmp_path / "no.key"
    assert parameterProblem(base + str(missing)) == f"{lead} '{missing}' does not exist (its private key)"
    key.chmod(0o644)
    owner = "0600" if key.stat().st_uid != 0 else "0640"
    assert parameterProblem(base + str(key)) == (
        f"{lead} '{key}' may be read by others (mode 0644), which libpq refuses: chmod 600 it (or 640, owned by root)"
    )
    key.chmod(int(owner, 8))
    assert parameterProblem(base + str(key)) is None
    # No certificate to send: nothing of the key matters.
    assert parameterProblem(base.replace(str(certificate), str(tmp_path / "none.crt")) + str(missing)) is None
    assert parameterProblem(base + str(missing) + "&sslcertmode=disable") is None
    # The defaults under ~/.postgresql, as libpq takes them.
    default = tmp_path / "home" / ".postgresql"
    default.mkdir(parents=True)
    (default / "postgresql.crt").write_bytes(certificate.read_bytes())
    assert parameterProblem("postgresql://mailnode@db.internal/mail?sslmode=verify-full&sslrootcert=system") == (
        f"unusable client certificate: libpq sends {default / 'postgresql.crt'}, and no sslkey in the URL, so "
        f"libpq's default for the user running mailgate, {default / 'postgresql.key'} does not exist (its private key)"
    )

    # The command says it so, exit 78.
    key.chmod(0o644)
    status, _, err = mailgate(f"postgresql://mailnode@127.0.0.1:9/mail?sslmode=require&sslcert={certificate}&sslkey={key}", "user", "list")
    assert status == EX_CONFIG, err
    assert f"sslkey '{key}' may be read by others (mode 0644)" in err, err


def test_aMissingPasswordSaysWhyThePasswordFileGaveNone(roles, monkeypatch, tmp_path):
    """
    README has the nodes' password in the C{~/.pgpass} of the user they run
    as, mode 600.  Where libpq found none there, the refusal said "the
    database URL gives none" alone, which sends the reader to put it in the
    URL; it says what became of the file: not there, ignored (others may
    read it: libpq skips it, with a warning of its own on standard error),
    or without a line for the connection.  Exit 78 in each case.
    """
    url = _noPassword(roles)
    parts = urlsplit(url)
    passfile = tmp_path / "pgpass"
    monkeypatch.setenv("PGPASSFILE", str(passfile))
    lead = "the server asks for a password and neither the database URL nor a password file gives one"

    code, out, err = mailgate(url, "user", "list")
    assert code == EX_CONFIG, err
    assertOneLine(err, f"{lead} (PGPASSFILE's password file {passfile} does not exist)", url)

    passfile.write_text(f"{parts.hostname}:{parts.port or 5432}:*:{parts.username}:pw-needed\n")
    passfile.chmod(0o644)
    code, out, err = mailgate(url, "user", "list")
    assert code == EX_CONFIG, err
    assertOneLine(err, f"{lead} (PGPASSFILE's password file {passfile} is ignored by libpq, as others may read it: chmod 600 it)", url)

    passfile.write_text(f"{parts.hostname}:{parts.port or 5432}:*:someone_else:pw-needed\n")
    passfile.chmod(0o600)
    code, out, err = mailgate(url, "user", "list")
    assert code == EX_CONFIG, err
    assertOneLine(err, f"{lead} (PGPASSFILE's password file {passfile} has no line for this server, port, database and user)", url)

    # The file libpq reads without PGPASSFILE: the ~/.pgpass of the user
    # running mailgate (the unit's, /var/lib/mailgate/.pgpass), or the URL's.
    from mailgate.store.pgrefusal import passwordFileProblem

    monkeypatch.delenv("PGPASSFILE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert passwordFileProblem(url) == f"the password file {tmp_path / 'home' / '.pgpass'} does not exist"
    assert passwordFileProblem(f"{url}?passfile={passfile}") == (
        f"the URL's passfile {passfile} has no line for this server, port, database and user"
    )


def test_aURLParameterLibpqDoesNotKnowIsAConfigurationError():
    """
    Not a refusal of the server's, but no more worth retrying: a query
    parameter the driver does not know (mistyped) exits 78, not 75.
    """
    base = _requirePostgres()
    url = base + ("&" if "?" in base else "?") + "sslmod=require"
    code, out, err = mailgate(url, "user", "list")
    assert (code, out) == (EX_CONFIG, ""), err
    assertOneLine(err, 'invalid URI query parameter: "sslmod"', url)


# Parameters libpq reads but whose values it refuses only as it connects,
# and what mailgate says of each (the password is "50%off"-free here: the
# suite's own, which assertOneLine looks for).
BAD_VALUES = {
    "port past 65535": ("port", "99999", "invalid port '99999' (a number from 1 to 65535)"),
    "mistyped sslmode": ("sslmode", "requir", "invalid sslmode 'requir' (one of disable, allow, prefer"),
    "keepalive not a number": ("keepalives_idle", "5s", "invalid keepalives_idle '5s' (a whole number)"),
}


def _withParameter(url, name, value):
    if name == "port":
        parts = urlsplit(url)
        return parts._replace(netloc=parts.netloc.rsplit(":", 1)[0] + ":" + value).geturl()
    return url + ("&" if "?" in url else "?") + f"{name}={value}"


@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_aURLParameterValueLibpqRefusesIsAConfigurationError(case, servers):
    """
    A value libpq refuses (a port past 65535, a mistyped sslmode) is found
    before connecting, and exits 78 with what is wrong: libpq said it only
    as it connected, in the words of an unreachable server ("connection is
    bad: invalid port number"), and the start exited 75, which the systemd
    unit retried every two seconds for ever.  twistd mailgate says the
    same at its start.
    """
    name, value, expected = BAD_VALUES[case]
    url = _withParameter(_requirePostgres(), name, value)
    assert urlsplit(url).hostname
    code, out, err = mailgate(url, "user", "list")
    assert (code, out) == (EX_CONFIG, ""), err
    assertOneLine(err, expected, url)
    if case == "port past 65535":
        server = servers.spawn(database=url)
        assert server.wait() == EX_CONFIG, server.log()
        assert expected in server.stderr, server.log()


def test_aURLThatRequiresTLSOfAServerWithoutIt():
    """
    C{sslmode=require} against a server that answers the request for TLS
    with "no": nothing will change that but the configuration of one or
    the other, so 78; read from the server's answer, not libpq's words.
    """
    import psycopg

    with psycopg.connect(_requirePostgres(), autocommit=True) as conn:
        if conn.execute("SHOW ssl").fetchone()[0] == "on":
            pytest.skip("the suite's PostgreSQL offers TLS")
    base = _requirePostgres()
    url = base + ("&" if "?" in base else "?") + "sslmode=require"
    code, out, err = mailgate(url, "user", "list")
    assert (code, out) == (EX_CONFIG, ""), err
    assertOneLine(err, "the database URL requires TLS (sslmode) and the server does not offer it", url)


def test_mailgateServeSaysItToo(roles, tmp_path):
    """
    C{mailgate serve} (the server without twistd's plugin scan) exits as
    C{twistd mailgate} does.
    """
    url = _wrongPassword(roles)
    code, out, err = runCommand(
        [MAILGATE, "serve", "--database", url, "--pop3", "tcp:0:interface=127.0.0.1"], cwd=tmp_path
    )
    assert code == EX_CONFIG, (out, err)
    assertOneLine(err, "(SQLSTATE 28P01): the user name or password in the database URL is wrong", url)


def test_deliverLeavesTheMessageWithTheMTA(roles):
    """
    C{mailgate deliver} exits 75 whatever the refusal, as for its other
    configuration errors: the MTA keeps the message until it is fixed
    rather than bounce it.
    """
    url = _wrongPassword(roles)
    code, out, err = mailgate(url, "deliver", ALICE, stdin="Subject: hi\n\nhello\n")
    assert (code, out) == (EX_TEMPFAIL, ""), err
    assertOneLine(err, "(SQLSTATE 28P01)", url)


@pytest.mark.parametrize("side", ["--from", "--to"])
def test_dbCopyNamesTheSideRefused(side, roles, tmp_path):
    url = _unknownDatabase(roles)
    sqlite = f"sqlite:///{tmp_path / 'mail.sqlite3'}"
    assert mailgate(sqlite, "user", "add", ALICE, "--password-stdin", stdin="pw\n")[0] == 0
    urls = {"--from": sqlite, "--to": f"{sqlite}.copy"}
    urls[side] = url
    code, out, err = mailgate(sqlite, "db", "copy", "--from", urls["--from"], "--to", urls["--to"])
    assert (code, out) == (EX_CONFIG, ""), err
    assertOneLine(err, f"mailgate: {side}: cannot connect to PostgreSQL at ", url)
    assert "(SQLSTATE 3D000)" in err


@pytest.fixture
def servers(tmp_path):
    starter = ServerStarter(tmp_path, "sqlite:///unused")
    try:
        yield starter
    finally:
        starter.stopAll()


@pytest.mark.parametrize("case", ["wrong password", "unknown database", "no password", "server down"])
def test_startUpSaysWhetherToFixOrToRetry(case, roles, servers):
    """
    C{twistd -n mailgate --database postgresql://...} stops with one line
    and 78 (the unit's C{RestartPreventExitStatus=78}: systemd stops
    retrying) for a refusal of configuration, 75 (C{Restart=on-failure}
    tries again) when PostgreSQL is down.
    """
    makeURL, code, expected = REFUSALS[case]
    url = makeURL(roles)
    server = servers.spawn(database=url)
    assert server.wait() == code, server.log()
    assert server.stdout == "", server.log()
    assert "Traceback" not in server.stderr
    [line] = [line for line in server.stderr.splitlines() if line.strip()]
    assert line.startswith("mailgate: cannot connect to PostgreSQL at "), server.log()
    assert expected.removeprefix("temporary failure, try again: ") in line, server.log()
    assertNoPassword(line, url)


def test_aRunningNodeWhosePasswordChangesKeepsTrying(roles, servers, tmp_path):
    """
    The password of a running node's role changes under it (and its
    sessions with the server end): each login in the meantime gets
    C{-ERR [SYS/TEMP]}, the log says why (the SQLSTATE and what to
    correct, not the password), the process keeps running, and once the
    password is put back logins work again, without a restart.
    """
    role = roles("LOGIN PASSWORD 'pw-first'")
    schema = "s_" + secrets.token_hex(4)
    admin(f"CREATE SCHEMA {schema} AUTHORIZATION {role}")
    url = withSchema(asRole(_requirePostgres(), role, "pw-first"), schema)
    AdminCommand(url, cwd=tmp_path).addUser(ALICE, ALICE_PW)
    server = servers(database=url)

    def login():
        client = pop(server)
        try:
            client.user(ALICE)
            return client.pass_(ALICE_PW)
        except poplib.error_proto as e:
            return e.args[0]
        finally:
            client.close()

    assert login().startswith(b"+OK")
    admin(f"ALTER ROLE {role} PASSWORD 'pw-second'")
    admin(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{role}'")
    waitFor(
        lambda: "(SQLSTATE 28P01): the user name or password in the database URL is wrong" in server.stdout
        and login().startswith(b"-ERR [SYS/TEMP]"),
        "a refused login, logged with the server's reason",
        interval=0.2,
    )
    assert server.running(), server.log()
    assert "pw-first" not in server.stdout + server.stderr
    assert "Traceback" not in server.stdout + server.stderr, server.log()

    admin(f"ALTER ROLE {role} PASSWORD 'pw-first'")
    waitFor(lambda: login().startswith(b"+OK"), "a login once the password is back", timeout=DEADLINE, interval=0.2)
    assert server.running()


def test_workerThreadsRefusedTogetherAskWhyOnce(monkeypatch):
    """
    A node's worker threads whose connections were refused at the same
    moment (the role's password changed under a busy node) make one
    traced attempt between them, not one each: the others wait for its
    verdict.
    """
    import threading

    from mailgate.errors import DatabaseRefused
    from mailgate.store.postgres import _conninfo

    url = _wrongPassword(None)
    asked = []
    realAskWhy = pgrefusal.askWhy

    def countedAskWhy(*args):
        asked.append(threading.get_ident())
        return realAskWhy(*args)

    monkeypatch.setattr(pgrefusal, "askWhy", countedAskWhy)
    monkeypatch.setattr(pgrefusal, "_verdicts", {})
    together = threading.Barrier(6, timeout=DEADLINE)
    verdicts = []

    def refused():
        together.wait()
        verdicts.append(pgrefusal.connectionFailure("the test's server", _conninfo(url), "refused, as libpq said"))

    threads = [threading.Thread(target=refused) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(DEADLINE)
    assert len(verdicts) == 6 and all(isinstance(v, DatabaseRefused) for v in verdicts), verdicts
    assert len(asked) == 1


# URLs libpq cannot read, each with the password "50%off" or "two words"
# (written as administrators do, not percent-encoded) and the words libpq
# quotes it, or the whole URL, in.  Nothing is connected to.
UNREADABLE_URLS = {
    "a bare %": ("postgresql://mailgate:50%off@127.0.0.1:1/mail", 'invalid percent-encoded token: "***"'),
    "a space": ("postgresql://mailgate:two words@127.0.0.1:1/mail", 'unexpected spaces found in "***"'),
    "as a parameter": ("postgresql://mailgate@127.0.0.1:1/mail?password=50%off", 'token: "***"'),
}


def _unreadablePassword(url):
    return next(p for p in ("50%off", "two words") if p in url)


def test_aServerNotThereIsNamedWithItsPort():
    """
    The real C{mailgate} command given a cluster that does not answer on
    its port names it with the port, so that an administrator with
    several clusters on a host knows which one: before, C{cannot connect
    to PostgreSQL at postgresql://127.0.0.1/mail}.  The password is not
    shown.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, out, err = mailgate(f"postgresql://mailgate:s3cret@127.0.0.1:{port}/mail", "user", "list")
    assert (code, out) == (EX_TEMPFAIL, ""), err
    assert err.startswith(
        f"mailgate: temporary failure, try again: cannot connect to PostgreSQL at postgresql://127.0.0.1:{port}/mail: "
    ), err
    assert err.count("\n") == 1 and "s3cret" not in err, err


@pytest.mark.parametrize("case", list(UNREADABLE_URLS))
def test_aURLLibpqCannotReadIsRefusedWithoutItsPassword(case):
    """
    A password with a bare C{%} or a space in the URL (libpq wants them
    percent-encoded) is refused with libpq's reason, which quotes the
    password or the whole URL: the password is not printed.
    """
    url, expected = UNREADABLE_URLS[case]
    code, out, err = mailgate(url, "user", "list")
    assert (code, out) == (EX_CONFIG, ""), err
    assert err.startswith("mailgate: cannot connect to PostgreSQL at ") and err.count("\n") == 1, err
    assert expected in err, err
    password = _unreadablePassword(url)
    assert password not in err and quote(password) not in err, err


def test_aShortPasswordIsTakenOutOnlyWhereItStandsAlone():
    """
    The password is taken out of libpq's reason where it stands as a
    token of its own, not out of the words around it: with the password
    C{p}, the reason said C{***ort 1} for C{port 1}, mangled, and showed
    by what it blanked what the password is.
    """
    code, out, err = mailgate("postgresql://mailgate:p@127.0.0.1:1/mail", "user", "list")
    assert (code, out) == (EX_TEMPFAIL, ""), err
    assert "port 1 failed" in err and "***" not in err, err
    # Quoted alone, as libpq quotes what it cannot read, it is still taken out.
    from mailgate.urls import withoutPassword

    url = "postgresql://mailgate:p%@127.0.0.1:1/mail"
    assert withoutPassword('invalid percent-encoded token: "p%"', url) == 'invalid percent-encoded token: "***"'


def test_anAtInThePasswordIsRefusedWithoutConnecting():
    """
    A password holding a raw C{@} (C{postgresql://mailgate:p@ssw0rd@host/})
    is refused, saying to write it C{%40}: libpq took what follows the
    first C{@} for the host, and said C{could not resolve host name
    "ssw0rd@127.0.0.1"}, part of the password (exit 75, retried for ever).
    """
    code, out, err = mailgate("postgresql://mailgate:p@ssw0rd@127.0.0.1:1/mail", "user", "list")
    assert (code, out) == (EX_CONFIG, ""), err
    assert "write it %40" in err and "ssw0rd" not in err and err.count("\n") == 1, err


# URLs libpq cannot read at all, which the server refuses at its start
# (exit 78), each with the password "s3cret" and what libpq says of it.
UNPARSABLE_URLS = {
    "unknown parameter": (
        "postgresql://mailgate:s3cret@db.internal/mail?foo=bar", 'invalid URI query parameter: "foo"'
    ),
    "leading space": (
        " postgresql://mailgate:s3cret@db.internal/mail", 'missing "=" after "postgresql://mailgate:***@'
    ),
    "%zz in the password": (
        "postgresql://mailgate:s3cret%zz@db.internal/mail", 'invalid percent-encoded token: "***"'
    ),
}


@pytest.mark.parametrize("case", list(UNPARSABLE_URLS))
def test_configCheckRefusesAURLLibpqCannotRead(tmp_path, case):
    """
    C{mailgate --config FILE config --check} (the systemd unit's
    ExecReload) refuses, exit 78 in libpq's words without the password, a
    URL the server refuses at its start: it said "configuration OK"
    (L{mailgate.store.pgurl.parameterProblem} took an unreadable URL for
    no problem, leaving it to connecting to say).
    """
    import io

    from mailgate.cli import run

    url, expected = UNPARSABLE_URLS[case]
    config = tmp_path / "mailgate.toml"
    config.write_text(f'database = "{url}"\n')
    config.chmod(0o600)
    out, err = io.StringIO(), io.StringIO()
    code = run(["--config", str(config), "config", "--check"], stdout=out, stderr=err, environ={})
    assert (code, out.getvalue()) == (EX_CONFIG, ""), err.getvalue()
    assert err.getvalue().startswith("mailgate: cannot connect to the database at postgresql://db.internal/mail: ")
    assert expected in err.getvalue() and err.getvalue().count("\n") == 1, err.getvalue()
    assert "s3cret" not in err.getvalue()


def test_theServerStartsWithoutLoggingIt(servers):
    """
    C{twistd mailgate} at start-up says the same, into its log (the
    journal), without the password.
    """
    url, expected = UNREADABLE_URLS["a bare %"]
    server = servers.spawn(database=url)
    assert server.wait() == EX_CONFIG, server.log()
    written = server.stdout + server.stderr
    assert expected in written, server.log()
    assert "50%off" not in written, server.log()


def test_theReactorsConnectionsSayItWithoutThePassword():
    """
    The connections the reactor drives (maildrop locks, message reads)
    read the URL themselves: their refusal is the same.
    """
    from mailgate.errors import DatabaseRefused
    from mailgate.store import pgreactor

    url, expected = UNREADABLE_URLS["a space"]
    with pytest.raises(DatabaseRefused) as e:
        pgreactor.connect(url, [], [], 1, where="the test's server")
    assert expected in str(e.value) and "two words" not in str(e.value), str(e.value)
    # libpq quotes the whole URL for some mistakes (Python's own parser
    # refuses this one before the engine's connection; these do not ask it).
    with pytest.raises(DatabaseRefused) as e:
        pgreactor.connect("postgresql://mailgate:s3cret-pw@[]/mail", [], [], 1, where="the test's server")
    assert '"postgresql://mailgate:***@[]/mail"' in str(e.value) and "s3cret" not in str(e.value), str(e.value)


def test_theHealthCheckTellsTheKindOfErrorNotItsText(roles):
    """
    /healthz is open to load balancers, and sometimes wider: while the
    node's role's password has changed under it, its 503 says the
    database is unavailable and the error's class and SQLSTATE, not
    libpq's text, which names the role and the server it connected to;
    that text goes to the log (health.failed), once.
    """
    from twisted.logger import capturedLogs
    from twisted.web.resource import getChildForRequest
    from twisted.web.test.requesthelper import DummyRequest

    from mailgate.metrics import Metrics
    from mailgate.metricssite import MetricsResource
    from mailgate.service import MailgateService
    from mailgate.store import openStore
    from pumped import PumpedReactor

    role = roles("LOGIN PASSWORD 'pw-first'")
    schema = "s_" + secrets.token_hex(4)
    admin(f"CREATE SCHEMA {schema} AUTHORIZATION {role}")
    url = withSchema(asRole(_requirePostgres(), role, "pw-first"), schema)
    reactor = PumpedReactor()
    store = openStore(url, reactor=reactor)
    service = MailgateService(store, reactor=reactor)
    service.running = True
    root = MetricsResource(Metrics(), service.databaseAnswers, reactor, timeout=10.0)

    def healthz():
        request = DummyRequest([b"healthz"])
        request.uri = request.path = b"/healthz"
        getChildForRequest(root, request).render(request)
        reactor.pump(lambda: request.finished)
        return request.responseCode, b"".join(request.written).decode()

    try:
        assert healthz() == (200, "ok\n")
        admin(f"ALTER ROLE {role} PASSWORD 'pw-second'")
        admin(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{role}'")
        with capturedLogs() as logs:
            answers = [healthz() for _ in range(3)]
        assert {code for code, _ in answers} == {503}, answers
        host = urlsplit(_requirePostgres()).hostname
        for _, body in answers:
            assert body == "unavailable: database unavailable (DatabaseRefused, OperationalError, SQLSTATE 28P01)\n"
            assert role not in body and host not in body and schema not in body, body
        failed = [e["reason"] for e in logs if e.get("event") == "health.failed"]
        assert len(failed) == 1, failed
        assert role in failed[0] and host in failed[0], failed
        assert "pw-first" not in failed[0] and "pw-second" not in failed[0]
    finally:
        admin(f"ALTER ROLE {role} PASSWORD 'pw-first'")
        reactor.resultOf(store.close())


# Values libpq reads as it reads every whole number (strtol, white space
# around it allowed): connected with, so never refused before connecting.
GOOD_VALUES = {
    "port with a space before": ("port", " {port}"),
    "port with a sign": ("port", "+{port}"),
    "keepalive with spaces around": ("keepalives_idle", " 10 "),
}


@pytest.mark.parametrize("case", list(GOOD_VALUES))
def test_aURLParameterValueLibpqTakesIsNotRefused(case):
    """
    What the check before connecting refuses (L{test_aURLParameterValueLibpqRefusesIsAConfigurationError})
    is what libpq refuses, no more: a port of C{" 5432"} or C{"+5432"},
    which libpq connects with, was refused (exit 78, the start with it).
    """
    from mailgate.store.postgres import PostgresEngine

    name, value = GOOD_VALUES[case]
    base = _requirePostgres()
    value = value.format(port=urlsplit(base).port or 5432)
    url = base + ("&" if "?" in base else "?") + f"{name}={quote(value)}"
    conn = PostgresEngine(url).connect()
    try:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        conn.close()


def test_aParameterValueLibpqRefusesInTheEnvironmentIsAConfigurationError(monkeypatch):
    """
    libpq takes what the URL does not give from the environment (PGSSLMODE
    in the systemd unit's Environment=, say) and refuses a bad value there
    as it connects, as it refuses one in the URL: refused before
    connecting, saying where the value comes from (it exited 75 and was
    retried for ever).  The URL's own value, or a service file's, comes
    first, and a good value is no problem.
    """
    from mailgate.errors import DatabaseRefused
    from mailgate.store.postgres import PostgresEngine

    base = _requirePostgres()
    monkeypatch.setenv("PGSSLMODE", "requir")
    monkeypatch.delenv("PGSERVICE", raising=False)
    with pytest.raises(DatabaseRefused) as refused:
        PostgresEngine(base).connect()
    assert "invalid sslmode 'requir' (PGSSLMODE in the environment; one of disable" in str(refused.value)
    monkeypatch.setenv("PGSSLMODE", "prefer")
    PostgresEngine(base).connect().close()
    # Given in the URL, the environment's is not read (nor by libpq).
    monkeypatch.setenv("PGSSLMODE", "requir")
    PostgresEngine(base + ("&" if "?" in base else "?") + "sslmode=prefer").connect().close()


def test_aMissingRootCertificateIsAConfigurationError(monkeypatch, tmp_path):
    """
    C{sslmode=verify-full} (or C{verify-ca}) with a root certificate file
    that does not exist, named by the URL's C{sslrootcert}, by
    PGSSLROOTCERT, or libpq's default C{~/.postgresql/root.crt}: refused
    before connecting, naming the file (it exited 75, libpq saying it as
    it says an unreachable server, and the systemd unit restarted the
    node every two seconds for ever).  A file that exists, C{system}, or
    a mode that checks nothing is no problem here.
    """
    from mailgate.store.pgurl import parameterProblem

    monkeypatch.delenv("PGSSLROOTCERT", raising=False)
    monkeypatch.delenv("PGSSLMODE", raising=False)
    monkeypatch.delenv("PGSERVICE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    base = "postgresql://mailgate@db.internal/mail?sslmode=verify-full"
    missing = tmp_path / "db-ca.pem"
    problem = parameterProblem(f"{base}&sslrootcert={missing}")
    assert problem == (
        f"no root certificate file: sslmode verify-full checks the server's certificate against one, "
        f"and sslrootcert '{missing}' does not exist"
    )
    default = tmp_path / ".postgresql" / "root.crt"
    assert parameterProblem(base.replace("verify-full", "verify-ca")).endswith(
        f"so libpq's default for the user running mailgate, {default} does not exist"
    )
    monkeypatch.setenv("PGSSLROOTCERT", str(missing))
    assert f"PGSSLROOTCERT in the environment; sslrootcert '{missing}' does not exist" in parameterProblem(base)
    certificate, _ = makeCertificate(tmp_path, "db.internal")
    missing.write_bytes(certificate.read_bytes())
    assert parameterProblem(base) is None
    monkeypatch.delenv("PGSSLROOTCERT")
    default.parent.mkdir()
    default.write_bytes(certificate.read_bytes())
    assert parameterProblem(base) is None
    for fine in ("sslmode=require&sslrootcert=/nonexistent", "sslmode=verify-full&sslrootcert=system"):
        assert parameterProblem(f"postgresql://mailgate@db.internal/mail?{fine}") is None


def test_anUnusableRootCertificateIsAConfigurationError(monkeypatch, tmp_path):
    """
    A root certificate file that exists but that libpq cannot load, a
    directory, a file holding no certificate (the server's key given by
    mistake), or one the user running mailgate may not read (installed
    mode 600 as root, the service running as mailgate): refused before
    connecting, exit 78, saying which and why.  libpq said each as it
    says an unreachable server ("could not read root certificate file
    ...: no certificate or crl found", and for the unreadable one no
    reason at all), exit 75, and the systemd unit restarted the node every
    two seconds for ever.  So does sslmode=require, which checks against
    the file where there is one.  A real CA file is no problem (the test
    above), nor one missing with require.
    """
    from mailgate.store import pgurl

    monkeypatch.delenv("PGSSLMODE", raising=False)
    monkeypatch.delenv("PGSERVICE", raising=False)
    monkeypatch.delenv("PGSSLROOTCERT", raising=False)
    base = "postgresql://mailgate@db.internal/mail?sslmode=verify-full&sslrootcert="
    directory = tmp_path / "certs"
    directory.mkdir()
    key = tmp_path / "db.internal.key"
    key.write_text("-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIBbBbBbBbBbBbBbBbBbBbBbBbBbBbBbBbBbBbBbBbBbB\n-----END PRIVATE KEY-----\n")
    empty = tmp_path / "empty.pem"
    empty.write_bytes(b"")
    lead = "unusable root certificate file: sslmode verify-full checks the server's certificate against one, and sslrootcert"
    assert pgurl.parameterProblem(base + str(directory)) == (
        f"{lead} '{directory}' is a directory (sslrootcert names a file of PEM certificates)"
    )
    for holdsNone in (key, empty):
        assert pgurl.parameterProblem(base + str(holdsNone)) == (
            f"{lead} '{holdsNone}' holds no certificate (a file of PEM certificates: -----BEGIN CERTIFICATE-----)"
        )
    # sslmode=require checks the certificate against the file where there
    # is one: libpq refuses one it cannot read as verify-full does.
    required = base.replace("verify-full", "require")
    assert pgurl.parameterProblem(required + str(key)) == (
        "unusable root certificate file: sslmode require checks the server's certificate against one where "
        f"there is one, and sslrootcert '{key}' holds no certificate (a file of PEM certificates: "
        "-----BEGIN CERTIFICATE-----)"
    )

    # Root reads any file: the refusal a service's user meets is made here.
    certificate, _ = makeCertificate(tmp_path, "db.internal")

    def refused(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(pgurl.ssl.SSLContext, "load_verify_locations", refused)
    monkeypatch.setattr(pgurl.os, "geteuid", lambda: 0)
    assert pgurl.parameterProblem(base + str(certificate)) == (
        f"{lead} '{certificate}' may not be read by the user running mailgate, root (Permission denied)"
    )

    # The command and the server's start say it so, exit 78.
    monkeypatch.undo()
    monkeypatch.delenv("PGSSLMODE", raising=False)
    monkeypatch.delenv("PGSERVICE", raising=False)
    url = "postgresql://mailgate@127.0.0.1:9/mail?sslmode=verify-full&sslrootcert=" + str(key)
    status, _, err = mailgate(url, "user", "list")
    assert status == EX_CONFIG, err
    assert f"sslrootcert '{key}' holds no certificate" in err, err
