# -*- test-case-name: tests.test_pgrefusal -*-
"""
Why PostgreSQL refused a connection: a configuration to correct (a wrong
password, an unknown role or database, no C{pg_hba.conf} entry), or a moment
to wait out (the server down, starting up, out of connection slots).

The difference decides whether start-up and the C{mailgate} command stop
with C{EX_CONFIG} (78: do not retry, fix it) or C{EX_TEMPFAIL} (75: retry).
libpq reports a failed connection as text only: psycopg's error for it has
no C{sqlstate}, and the server's error fields, which libpq parses, stay
inside libpq (C{PQresultErrorField} needs a result, and a connection that
failed has none).  That text is in the server's language (its
C{lc_messages}) and in the client's, so reading it would misjudge any
server not set up in English.

The SQLSTATE is in the server's C{ErrorResponse}, and libpq shows it in one
place: its protocol trace (C{PQtrace}, which libpq 18, the one psycopg's
binary wheels bring, writes from the first message of a connection; libpq
15 only once authentication succeeded, so with it a wrong password stays a
temporary failure).  So, once an
attempt failed, one more is made for the purpose, with the same connection
string, traced into a private anonymous file whose only part read is the
C{ErrorResponse}'s C{C} field (and the answer to C{SSLRequest}).  In
C{PQTRACE_REGRESS_MODE} the authentication exchange is not written out;
the file (an unnamed memory file where Linux has them) is read and dropped,
never logged.  The verdict is kept per libpq message, so a node retrying
against a server that keeps refusing does not double its attempts.

Without a SQLSTATE, two refusals are still told from what libpq knows
without text: the server asked for a password and the URL gave none
(C{PQconnectionNeedsPassword}), or the URL requires TLS (C{sslmode}) and
the server answered C{N} to the request for it.  Anything else that fails
(no answer, a connection refused or reset, a time-out, a certificate
that does not verify) is taken as temporary, as before.
"""

import os
import re
import select
import stat
import tempfile
import threading
import time

import psycopg
from psycopg import pq

from mailgate.errors import DatabaseRefused, TemporaryFailure
from mailgate.store.pgresolve import addressed

#: SQLSTATE classes of a refusal only a change of configuration ends: 28
#: invalid authorization (a wrong password, an unknown role, no
#: pg_hba.conf entry, a role that may not log in), 3D no such database, 42
#: no CONNECT privilege or an unknown setting in C{options}, 22 a setting's
#: value refused.  Every other class (53 too many connections, 57 starting
#: up or shutting down, 08 connection failures...) is temporary.
CONFIGURATION_CLASSES = ("28", "3D", "42", "22")

_HINTS = {
    "28P01": "the user name or password in the database URL is wrong",
    "28000": "pg_hba.conf has no entry for this user, database and address, or the role may not log in",
    "3D000": "no database of that name: create it or correct the database URL",
    "42501": "the role may not connect to that database (GRANT CONNECT)",
}
_DEFAULT_HINT = "correct the database URL or the server's configuration"

_NO_PASSWORD = "the server asks for a password and neither the database URL nor a password file gives one"
_NO_TLS = "the database URL requires TLS (sslmode) and the server does not offer it"

_ERROR_CODE = re.compile(rb'\tErrorResponse\t.*? C "([0-9A-Z]{5})"')
_TLS_DECLINED = re.compile(rb"\tSSLResponse\t N$", re.MULTILINE)
_TLS_REQUIRED = ("require", "verify-ca", "verify-full")

# The verdicts found so far, by libpq's message: what a node retrying
# against a server that keeps refusing looks up instead of asking again.
_verdicts = {}
_MAX_VERDICTS = 64
_asking = threading.Lock()


def connectionFailure(where, conninfo, reason, pgconn=None, timedOut=False, timeout=10):
    """
    The exception for a connection attempt that failed.

    @param where: the server, as the message names it (its URL without
        the password).
    @param conninfo: the connection string, for the attempt that asks why.
    @param reason: libpq's account of the failure, as text.
    @param pgconn: the failed C{PGconn}, where there is one (psycopg's
        error carries it as C{pgconn}).
    @param timedOut: the attempt ran out of time: no server answered, and
        asking again would only wait as long again.
    @param timeout: seconds the attempt that asks may take.
    @return: a L{DatabaseRefused} for a refusal of configuration, else a
        L{TemporaryFailure}; each with one line naming the server and
        libpq's reason (the URL's password taken out of it).
    """
    from mailgate.urls import withoutPassword

    reason = withoutPassword(reason, conninfo)
    message = f"cannot connect to PostgreSQL at {where}: {reason}"
    verdict = None
    if pgconn is not None and pgconn.needs_password:
        verdict = _NO_PASSWORD
    elif not timedOut:
        verdict = _cachedVerdict(reason, conninfo, timeout)
    if verdict is None:
        return TemporaryFailure(message)
    if verdict is _NO_PASSWORD:
        verdict = f"{verdict} ({passwordFileProblem(conninfo)})"
    return DatabaseRefused(f"{message}; {verdict}")


def passwordFileProblem(conninfo):
    """
    Why the password file libpq read for C{conninfo} gave no password, in
    words: where the administrator put it (README: the C{~/.pgpass} of
    the user the node runs as, mode 600) is not where libpq looked, libpq
    ignored it, or it has no line for the connection.  The refusal said
    "the database URL gives none" alone, which sent the reader to put the
    password in the URL.  Only the file's name, mode and owner are read
    here, never its lines.
    """
    from psycopg.conninfo import conninfo_to_dict

    from mailgate.owners import ownerName

    try:
        given = conninfo_to_dict(conninfo).get("passfile")
    except Exception:
        given = None
    if given:
        which, path = "the URL's passfile", given
    elif os.environ.get("PGPASSFILE"):
        which, path = "PGPASSFILE's password file", os.environ["PGPASSFILE"]
    else:
        which = "the password file"
        path = os.path.join(os.path.expanduser("~"), ".pgpass")
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return f"{which} {path} does not exist"
    except OSError as e:
        return f"{which} {path} cannot be read ({e.strerror})"
    if not stat.S_ISREG(mode):
        return f"{which} {path} is not a file"
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        return f"{which} {path} is ignored by libpq, as others may read it: chmod 600 it"
    if not os.access(path, os.R_OK):
        return f"{which} {path} may not be read by the user running mailgate, {ownerName(os.geteuid())}"
    return f"{which} {path} has no line for this server, port, database and user"


def _cachedVerdict(reason, conninfo, timeout):
    try:
        return _verdicts[reason]
    except KeyError:
        pass
    # One asks at a time (worker threads whose connections failed together
    # would each ask): the others then find its verdict.
    with _asking:
        try:
            return _verdicts[reason]
        except KeyError:
            pass
        try:
            verdict = verdictOf(*askWhy(conninfo, timeout))
        except Exception:
            # Asking failed in a way of its own: the first failure is what
            # there is to report, as a temporary one, and asked about again.
            return None
        if len(_verdicts) >= _MAX_VERDICTS:
            _verdicts.clear()
        _verdicts[reason] = verdict
        return verdict


def verdictOf(sqlstate, tlsDeclined, needsPassword):
    """
    What an attempt's outcome says: C{None} for a temporary failure (or a
    success), else why the configuration is at fault, in words.
    """
    if sqlstate is not None and sqlstate[:2] in CONFIGURATION_CLASSES:
        return f"a configuration error (SQLSTATE {sqlstate}): {_HINTS.get(sqlstate, _DEFAULT_HINT)}"
    if sqlstate is None and needsPassword:
        return _NO_PASSWORD
    if sqlstate is None and tlsDeclined:
        return _NO_TLS
    return None


def askWhy(conninfo, timeout):
    """
    Make one connection attempt, traced, and close it.

    @return: C{(sqlstate, tlsDeclined, needsPassword)}: the SQLSTATE of the
        server's refusal (C{None} if it sent none, or libpq did not trace
        it), whether the server declined TLS that the URL requires, and
        whether it asked for a password the URL does not give.
    """
    deadline = time.monotonic() + timeout
    # libpq's own lookup of a host name keeps Python's lock (a name that
    # does not resolve raises NotResolved: nothing is learnt, nothing kept).
    info = psycopg.conninfo.make_conninfo(addressed(conninfo, timeout), connect_timeout=max(1, int(timeout)))
    with _privateFile() as trace:
        pg = pq.PGconn.connect_start(info.encode("utf-8"))
        try:
            traced = _trace(pg, trace)
            try:
                _complete(pg, deadline)
            finally:
                if traced:
                    # Flushes the stream: nothing of it is left for the
                    # exit of the process to write to a reused descriptor.
                    pg.untrace()
            needsPassword = pg.status != pq.ConnStatus.OK and pg.needs_password
            sslmode = _option(pg, b"sslmode")
        finally:
            pg.finish()
        trace.seek(0)
        # A refusal is a few lines; a connection that succeeded writes its
        # parameters too, still far below this.
        text = trace.read(1 << 16)
    code = _ERROR_CODE.search(text)
    tlsDeclined = sslmode in _TLS_REQUIRED and _TLS_DECLINED.search(text) is not None
    return (code.group(1).decode("ascii") if code else None), tlsDeclined, needsPassword


def _privateFile():
    """
    A file nobody else can open, for the trace, which may hold what the
    authentication exchange sent: in memory where Linux offers it.
    """
    if hasattr(os, "memfd_create"):
        try:
            return open(os.memfd_create("mailgate-pg-refusal", os.MFD_CLOEXEC), "w+b")
        except OSError:
            pass
    return tempfile.TemporaryFile()


def _trace(pg, trace):
    """
    Trace C{pg} into C{trace}; whether libpq does (psycopg traces on Linux
    only).

    psycopg hands libpq a C{FILE} opened on the descriptor and never closes
    it (a few kilobytes, once per new message thanks to the verdicts
    kept): closing it would close the descriptor, which is ours to close.
    C{PQuntrace} flushes it, so nothing is left in it to be written later.
    """
    try:
        pg.trace(trace.fileno())
        pg.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS | pq.Trace.REGRESS_MODE)
    except psycopg.Error:
        return False
    return True


def _complete(pg, deadline):
    """
    Drive C{PQconnectPoll} until the attempt succeeds, fails or runs out
    of time.  C{poll}, not C{select}: a busy node's descriptors go past
    C{FD_SETSIZE}.

    The socket is waited for before the first call too, as libpq asks
    (C{PQconnectStart} leaves it connecting): called at once, for a
    server whose machine does not answer (a multi-host URL's old primary,
    gone in a failover) C{connect_poll} blocked until the kernel gave up
    on the connection, 133 seconds, the deadline ignored.
    """
    status = pq.PollingStatus.WRITING
    while pg.status != pq.ConnStatus.BAD:
        if status in (pq.PollingStatus.OK, pq.PollingStatus.FAILED):
            return
        left = deadline - time.monotonic()
        if left <= 0:
            return
        poller = select.poll()
        poller.register(pg.socket, select.POLLIN if status == pq.PollingStatus.READING else select.POLLOUT)
        if not poller.poll(left * 1000):
            return
        status = pg.connect_poll()


def _option(pg, keyword):
    """
    The value libpq uses for a connection option (from the URL, the
    environment or its default), as text, or C{None}.
    """
    for option in pg.info:
        if option.keyword == keyword:
            return option.val.decode("utf-8", "replace") if option.val else None
    return None
