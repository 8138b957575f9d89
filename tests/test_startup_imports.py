"""
What a start of C{twistd mailgate} and of the C{mailgate} command imports.

Every start pays for each module it imports, whether the run needs it or
not, and some starts are many: an MTA's pipe transport runs C{mailgate
deliver} once per message, scripts run the admin commands, and the test
suite starts some 900 processes.  A feature's modules are therefore
imported where they are used when the feature is optional.  These tests
run the installed commands with C{PYTHONPROFILEIMPORTTIME} (the
C{-X importtime} report, on standard error) and check what a run left out
by name, not by time: a module imported again at the top of a module for a
constant or a type fails them, on any machine.
"""

import subprocess

from e2e import DEADLINE, MAILGATE, AdminCommand, ServerProcess, childEnvironment, databaseURL

#: Twisted Web: the HTTP of C{--metrics} (L{mailgate.metricssite}) alone
WEB = ("twisted.web", "mailgate.metricssite")
#: the checkers of other servers' password hashes (users imported with
#: one, L{mailgate.auth.foreign}) and of OAuth 2.0 tokens (C{--oauth2-keys})
HASHES_AND_TOKENS = ("passlib", "argon2", "mailgate.auth.cryptschemes", "mailgate.auth.systemcrypt", "jwt")
#: the PostgreSQL engine, for a postgresql:// database alone
POSTGRES = ("psycopg", "mailgate.store.postgres")
#: what a server's sessions are made of, which delivering a message from
#: the command line does without
SESSIONS = ("mailgate.session", "mailgate.smtp.factory", "mailgate.smtp.protocol", "mailgate.pop3", "OpenSSL")

MESSAGE = b"From: a@example.org\r\nSubject: hello\r\n\r\nhi\r\n"


def importedModules(report):
    """
    The names of the modules an C{-X importtime} report on standard error
    (C{report}) lists: each import's line ends in its module's name.
    """
    return {
        line.rpartition("|")[2].strip()
        for line in report.splitlines()
        if line.startswith("import time:") and not line.rstrip().endswith("imported package")
    }


def among(modules, prefixes):
    """
    The C{modules} that are, or are inside, one of C{prefixes}.
    """
    return sorted(m for m in modules if any(m == p or m.startswith(p + ".") for p in prefixes))


def commandImports(database, *args, input=b""):
    """
    Run C{mailgate --database DATABASE ARGS...}; return its exit status,
    its standard output and the modules it imported.
    """
    done = subprocess.run(
        [MAILGATE, "--database", database, *args],
        input=input,
        capture_output=True,
        timeout=DEADLINE,
        env={**childEnvironment(), "PYTHONPROFILEIMPORTTIME": "1"},
    )
    stdout = done.stdout.decode("utf-8", "replace")
    return done.returncode, stdout, importedModules(done.stderr.decode("utf-8", "replace"))


def serverImports(database, options=()):
    """
    Start C{twistd -n mailgate} serving POP3 (and C{options}) until it
    listens, then stop it; return the modules it imported on the way.
    """
    server = ServerProcess(database, options=list(options), env={"PYTHONPROFILEIMPORTTIME": "1"})
    try:
        server.start()
    finally:
        server.stop()
    return importedModules(server.stderr)


def test_theReportIsRead(tmp_path):
    """
    The report names what a run did import: without this, the tests below
    would pass on a report they could not read.
    """
    code, _, modules = commandImports(databaseURL(tmp_path / "mail.db"), "db", "upgrade")
    assert code == 0
    assert {"mailgate.cli", "mailgate.store", "argparse"} <= modules


def test_deliverImportsNoWebAndNoSessions(tmp_path):
    """
    C{mailgate deliver}, run once per message by an MTA's pipe transport,
    imports neither Twisted Web nor what the server's sessions are made
    of (TLS, the session core, the protocols): it delivers through
    L{mailgate.smtp.delivery} alone.  Nor, on SQLite, the PostgreSQL
    engine.
    """
    url = databaseURL(tmp_path / "mail.db")
    AdminCommand(url).addUser("alice@example.org", "secret")
    code, out, modules = commandImports(url, "deliver", "alice@example.org", input=MESSAGE)
    assert code == 0 and "delivered to alice@example.org" in out
    assert "mailgate.smtp.delivery" in modules
    assert among(modules, WEB + SESSIONS + HASHES_AND_TOKENS + POSTGRES) == []


def test_anAdminCommandImportsNoHashCheckers(tmp_path):
    """
    C{mailgate user list} on SQLite imports neither Twisted Web, nor the
    checkers of imported password hashes and OAuth 2.0 tokens, nor the
    PostgreSQL engine.
    """
    url = databaseURL(tmp_path / "mail.db")
    AdminCommand(url).addUser("alice@example.org", "secret")
    code, out, modules = commandImports(url, "user", "list")
    assert code == 0 and "alice@example.org" in out
    assert among(modules, WEB + HASHES_AND_TOKENS + POSTGRES) == []


def test_aServerWithoutMetricsImportsNoWeb(tmp_path):
    """
    A server serving POP3 from SQLite without C{--metrics} or
    C{--oauth2-keys} imports neither Twisted Web, nor the checkers of
    imported password hashes and OAuth 2.0 tokens, nor the PostgreSQL
    engine; one with C{--metrics} imports its site.
    """
    url = databaseURL(tmp_path / "mail.db")
    assert among(serverImports(url), WEB + HASHES_AND_TOKENS + POSTGRES) == []
    assert "mailgate.metricssite" in serverImports(url, ["--metrics", "tcp:0:interface=127.0.0.1"])


def test_theSMTPSyntaxClassesAreTheABNFs():
    """
    The character classes of L{mailgate.smtp.syntax} that take every
    non-ASCII character are written as what they leave out, which compiles
    in microseconds; each takes exactly the characters of its RFC 5321
    (and RFC 6531) form, which took milliseconds at every start.
    """
    import re

    from mailgate.smtp import syntax

    abnf = {
        syntax._PARAM_VALUE: r"^[\x21-\x3c\x3e-\x7e\x80-\U0010ffff]+$",
        syntax._DOT_STRING: r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~\x80-\U0010ffff-]+"
        r"(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~\x80-\U0010ffff-]+)*$",
        syntax._LOOSE_DOTS: r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~\x80-\U0010ffff.-]+$",
        syntax._QUOTED: r'^"([\x20\x21\x23-\x5b\x5d-\x7e\x80-\U0010ffff]|\\[\x20-\x7e])*"$',
    }
    # Every character but the line feed, each on a line of its own (quoted
    # for _QUOTED): what is left once each pattern has removed the lines it
    # matches, in one call, is the same.
    every = [chr(c) for c in range(0x110000) if c != 0x0A]
    plain, quoted = "\n".join(every), "\n".join(f'"{c}"' for c in every)
    for pattern, form in abnf.items():
        lines = quoted if pattern is syntax._QUOTED else plain

        def unmatched(regex):
            return re.sub(re.compile(regex, re.MULTILINE), "", lines)

        assert unmatched(pattern.pattern) == unmatched(form), form
        for text in ["\n", "a.b", ".a", "a..b", "a.", "a\n", "a b", '"a\\"b"', '"a\nb"', "é.ü", "a\u2028", '"\\é"']:
            assert bool(pattern.match(text)) == bool(re.match(form, text)), (form, text)
