# -*- test-case-name: tests.test_cli -*-
"""
C{mailgate serve}: the server itself, in the foreground, as C{twistd -n
mailgate} runs it.
"""

import contextlib

from mailgate.cli.common import EX_OK, EX_USAGE


SERVE_DESCRIPTION = "POP3 / SMTP / LMTP mail gateway over SQLite or PostgreSQL"


def _serveOptions():
    """
    The options of C{twistd mailgate}, introduced as C{mailgate serve}'s.
    """
    from mailgate.tap import Options

    class ServeOptions(Options):
        synopsis = "Usage: mailgate serve [options]"

    return ServeOptions()


def _serve(argv, database, stdout, stderr):
    """
    Run the server in the foreground with C{twistd mailgate}'s options, as
    C{twistd -n --pidfile= mailgate} does, logging to standard output.

    It needs no twistd plugin: the service maker is given to twistd's
    runner here, so this works where Twisted's plugin scan cannot find
    C{twisted/plugins/mailgate_plugin.py} (an editable install).

    @param database: the C{--database} given to C{mailgate} itself, if
        any; C{serve}'s own C{--database} wins.
    @return: the exit status once the server has stopped.
    """
    from twisted.python import usage

    if database is not None:
        argv = ["--database", database, *argv]
    options = _serveOptions()
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            options.parseOptions(argv)
    except usage.UsageError as e:
        # One line, as twistd mailgate says it (see mailgate.tap.Options).
        stderr.write(f"mailgate serve: {e} (mailgate serve --help lists the options)\n")
        return EX_USAGE
    except SystemExit as e:
        # --help and --version exit 0; a configuration file that cannot be
        # used has written its one line and exits 78, as twistd mailgate
        # does (see mailgate.tap.Options).
        if isinstance(e.code, str):
            stderr.write(f"{e.code}\n")
            return EX_USAGE
        return e.code or EX_OK

    from twisted.application.service import ServiceMaker
    from twisted.scripts.twistd import ServerOptions, runApp

    maker = ServiceMaker("mailgate", "mailgate.tap", SERVE_DESCRIPTION, "mailgate")

    class ServeServerOptions(ServerOptions):
        def _getPlugins(self, interface):
            return [maker]

    config = ServeServerOptions()
    config.parseOptions(["--nodaemon", "--pidfile=", "mailgate", *argv])
    runApp(config)
    return EX_OK
