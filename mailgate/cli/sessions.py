# -*- test-case-name: tests.test_cli -*-
"""
C{mailgate who} and C{mailgate kick}: the POP3 sessions of every node.
"""

import time

from mailgate.cli.common import (
    CommandError,
    EX_TEMPFAIL,
    _address,
    _existingUser,
    _jsonLines,
    _number,
    _result,
    _seconds,
    _time,
)


def _who(store, args, out, stdin):
    sessions = _result(store.listSessions())
    if args.json:
        return _jsonLines(out, (
            {"user": s.address, "node": s.node, "client": s.peer, "since": _time(s.since)} for s in sessions
        ))
    out.write(f"{'USER':<40} {'NODE':<30} {'CLIENT':<24} SINCE\n")
    for session in sessions:
        out.write(
            f"{session.address:<40} {session.node:<30} {session.peer or '-':<24} {_time(session.since)}\n"
        )


#: seconds C{mailgate kick} looks for a session it did not find at once
KICK_LOOK_AGAIN = 2.5


def _kick(store, args, out, stdin):
    address = _address(args.address)
    wait = _number(args.wait, _seconds, "--wait")
    _existingUser(store, address)
    # A session that logged in a moment ago appears in the registry with
    # its node's next write (about a second): look again for a little
    # while before saying there is none.
    lookUntil = time.monotonic() + KICK_LOOK_AGAIN
    while not _result(store.kickSessions(address)):
        if time.monotonic() >= lookUntil:
            raise CommandError(f"{address} has no POP3 session in progress", 1)
        time.sleep(0.25)
    # The node serving the session looks for the mark about once a second.
    # Only the marked sessions are waited for: a client that logs in again
    # at once (they do) has a new session, which was not asked to end.
    deadline = time.monotonic() + wait
    while True:
        if not _result(store.listSessions(address, kicked=True)):
            out.write(f"ended the POP3 session of {address}; nothing it deleted was removed\n")
            return
        if time.monotonic() >= deadline:
            raise CommandError(
                f"asked the node to end the POP3 session of {address}; it has not ended yet", EX_TEMPFAIL
            )
        time.sleep(0.2)
