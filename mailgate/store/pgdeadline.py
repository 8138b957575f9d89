"""
A deadline for every answer a blocking PostgreSQL connection waits for.

The worker threads' connections (psycopg's, in blocking mode) wait for an
answer as long as the socket stays open.  A database server that stops
answering while its machine's kernel still does (the PostgreSQL processes
stopped or stuck in the kernel on a hung disk, a PgBouncer wedged, a relay
that keeps the connection but forwards nothing) acknowledges everything
the node sends and answers its keepalive probes: neither the keepalive nor
C{tcp_user_timeout} ever gives the connection up, and the server's
C{statement_timeout} is the server's to enforce.  A writer thread stuck so
held every delivery's reply and every QUIT's deletions for as long as the
database was away, hours if need be; each reader thread stuck so held the
login or the recipient it was looking up.

Here each wait (a statement's answer, a COMMIT's) gives the connection up
after L{ANSWER_DEADLINE} seconds without its answer, as the reactor's
connections (L{mailgate.store.pgreactor.ReactorConnection.deadline}) do:
the connection is closed, its state unknown, and the statement fails as a
lost connection (an C{OperationalError} without an SQLSTATE), which the
callers already take for what it is: a read is asked again on a fresh
connection, a write lost before its COMMIT runs again, one lost during
its COMMIT is reported as perhaps committed.  The server's own
C{statement_timeout} (60 s) ends a slow statement before.
"""

import inspect

import psycopg
from psycopg import errors as pgerrors

from mailgate.plural import counted

#: seconds an answer may take before the connection is given up as lost:
#: beyond the server's statement_timeout (60 s), which ends a statement
#: that is merely slow
ANSWER_DEADLINE = 75.0

_WaitTimeout = getattr(pgerrors, "_WaitTimeout", None)
# psycopg 3.3.6 on (setup.cfg's floor): Connection.wait(gen, interval,
# timeout), raising _WaitTimeout.  An older psycopg (3.2 has neither) waits
# without a deadline, as before.
_SUPPORTED = _WaitTimeout is not None and "timeout" in inspect.signature(psycopg.Connection.wait).parameters


class DeadlineConnection(psycopg.Connection):
    """
    A psycopg connection whose waits for an answer end after
    L{answerDeadline} seconds (C{None}: no deadline, for a schema
    migration, which runs without the statement timeout on purpose).
    """

    answerDeadline = ANSWER_DEADLINE

    def wait(self, gen, *args, **kwargs):
        deadline = self.answerDeadline
        if not _SUPPORTED or deadline is None or len(args) > 1 or kwargs.get("timeout") is not None:
            return super().wait(gen, *args, **kwargs)
        try:
            return super().wait(gen, *args, **{**kwargs, "timeout": deadline})
        except _WaitTimeout:
            # Half an exchange is under way: the connection cannot be used
            # again, and its backend ends when the server sees it close.
            self.pgconn.finish()
            raise psycopg.OperationalError(
                f"no answer from PostgreSQL in {counted(deadline, 'second', spec='g')}: connection given up"
            ) from None
