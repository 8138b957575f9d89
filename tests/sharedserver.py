"""
One real C{twistd mailgate} shared by the tests of a module that would each
start an identical one only to run client exchanges of their own against
it: starting a server costs about half a second of CPU, more than most of
those exchanges.  Each test still has maildrops of its own (L{Share.address}
names them afresh for every test), so the tests do not depend on each
other or on their order.

A test module imports the fixture and asks for it:

    from sharedserver import shared, sharedServers  # noqa: F401 (fixtures)

    def test_something(shared):
        server = shared("--auth-failure-delay", "0.05")
        cli = shared.cli(server)
        alice = shared.address("alice")

C{shared(*options)} starts the module's server with those options the first
time and hands out the same one afterwards (one server for each set of
options, each on a database of its own).  What a server decides from the
database as a whole (whether any user has APOP, say) must not change with
what the tests sharing it do: such state is set up before the server
starts (C{prepare}), and tests that would change it share another server.  Like L{e2e.mailgate_server},
every test using it runs on both backends (the module-scoped
C{sharedBackend}, which L{sqliteOnlyShared} pins to SQLite); tests/conftest.py
puts the tests of a module that share a module-scoped fixture on one
pytest-xdist worker (C{--dist loadgroup}), so that each set of options is
started once per module and backend.

What a test sees of the server is what it would see of a server of its own
from the moment it began: C{server.stdout} is what the server wrote since
then, and the test fails if the server logged an error meanwhile or is no
longer running at its end.  Tests about starting, stopping, reloading,
signals, crashes or a configuration of their own keep their own server
(L{e2e.mailgate_server}).
"""

import contextlib
import secrets

import pytest

from e2e import _LOGGED_ERROR, AdminCommand, InstalledCommand, ServerProcess, databaseURL

sqliteOnlyShared = pytest.mark.parametrize("sharedBackend", ["sqlite"], indirect=True)


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def sharedBackend(request):
    """
    The backend the module's shared servers use: each in turn.
    """
    return request.param


class SharedServers:
    """
    The servers of one module on one backend, by their options, each
    started on first use on a database of its own and stopped at the end
    of the module.
    """

    def __init__(self, backend, directory):
        self.backend = backend
        self.directory = directory
        self.servers = {}
        self._schemas = []
        self._attempts = 0

    def _database(self, number):
        if self.backend == "sqlite":
            return databaseURL(self.directory / f"mail-{number}.sqlite3")
        import psycopg

        from conftest import _requirePostgres, withSchema

        base = _requirePostgres()
        schema = "t_" + secrets.token_hex(6)
        with psycopg.connect(base, autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA {schema}")
        self._schemas.append((base, schema))
        return withSchema(base, schema)

    def __call__(self, *options, expect=None, prepare=None):
        key = (options, tuple(sorted((expect or {}).items())), prepare)
        server = self.servers.get(key)
        if server is None:
            # A database of its own for every attempt: one that did not
            # start is not handed out, and the next test tries again, as
            # with servers of their own.
            self._attempts += 1
            server = ServerProcess(self._database(self._attempts), options, cwd=self.directory, expect=expect)
            if prepare is not None:
                prepare(AdminCommand(server.database, cwd=self.directory))
            try:
                server.start()
            except BaseException:
                if server.process is not None:
                    server.stop()
                raise
            self.servers[key] = server
        return server

    def close(self):
        """
        Stop every server and drop the PostgreSQL schemas; return the
        servers that logged an error (shutdown included).
        """
        for server in self.servers.values():
            server.stop()
        if self._schemas:
            import psycopg

            for base, schema in self._schemas:
                with psycopg.connect(base, autocommit=True) as conn:
                    conn.execute(f"DROP SCHEMA {schema} CASCADE")
        return [s for s in self.servers.values() if _LOGGED_ERROR.search(s.stdout + s.stderr)]


@pytest.fixture(scope="module")
def sharedServers(sharedBackend, tmp_path_factory):
    servers = SharedServers(sharedBackend, tmp_path_factory.mktemp(f"shared-{sharedBackend}"))
    failed = []
    try:
        yield servers
    finally:
        failed = servers.close()
    if failed:
        pytest.fail("a shared server logged an error\n" + "\n".join(s.log() for s in failed))


class ServerView:
    """
    A shared L{ServerProcess} as one test sees it: everything of the
    process, but its output only from where it was when the test began.
    """

    def __init__(self, server):
        self._server = server
        self._outFrom = len(server.stdout)
        self._errFrom = len(server.stderr)

    def __getattr__(self, name):
        return getattr(self._server, name)

    @property
    def stdout(self):
        return self._server.stdout[self._outFrom:]

    @property
    def stderr(self):
        return self._server.stderr[self._errFrom:]

    @property
    def wholeStdout(self):
        """
        Everything the process wrote since it started: its listening
        lines, say.
        """
        return self._server.stdout

    def log(self):
        return f"(a server shared by the module; its output since this test began)\n{self._server.log()}"


class Share:
    """
    What the L{shared} fixture yields to one test.
    """

    def __init__(self, servers):
        self._servers = servers
        self.views = []
        self.backend = servers.backend
        self.tmp_path = servers.directory
        self._token = secrets.token_hex(3)

    def __call__(self, *options, expect=None, prepare=None):
        """
        The module's server started with C{options} (and the listeners
        C{expect} counts, as for L{e2e.ServerStarter}), as this test sees it.

        @param prepare: called once, before the server starts, with the
            admin command on its fresh database (L{AdminCommand}):
            for what the server decides from the database as a whole and
            the tests sharing it need to hold from the start (greetings
            carry an APOP timestamp while some user has APOP, for one).
            A server of its own for each C{prepare}, and one without.
        """
        view = ServerView(self._servers(*options, expect=expect, prepare=prepare))
        self.views.append(view)
        return view

    def cli(self, server, installed=False):
        """
        The admin command on C{server}'s database: run in this process
        (L{AdminCommand}), or the installed script in a process of its own
        (L{InstalledCommand}).
        """
        kind = InstalledCommand if installed else AdminCommand
        return kind(server.database, cwd=self._servers.directory)

    def address(self, local, domain="example.org"):
        """
        An address of this test's own, C{local.TOKEN@domain}, the same for
        the same C{local} throughout the test.
        """
        return f"{local}.{self._token}@{domain}"


@pytest.fixture
def shared(sharedServers):
    """
    The module's shared servers (L{Share}); the test fails if one of those
    it used logged an error while it ran or stopped running.
    """
    share = Share(sharedServers)
    yield share
    for view in share.views:
        output = view.stdout + view.stderr
        if not view.running() or _LOGGED_ERROR.search(output):
            pytest.fail(f"the shared server logged an error or stopped during the test\n{view.log()}")
