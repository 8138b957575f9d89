# -*- test-case-name: tests.test_cli -*-
"""
C{mailgate who} and C{mailgate kick}: the POP3 sessions of every node;
C{mailgate nodes}: the nodes and the settings they work with.
"""

import time

from mailgate.cli import audit
from mailgate.cli.common import (
    CommandError,
    EX_TEMPFAIL,
    _addJSON,
    _address,
    _existingUser,
    _jsonLines,
    _number,
    _result,
    _seconds,
    _time,
)
from mailgate.printable import leftAligned, printable
from mailgate.store.bounds import formatSize
from mailgate.store.registry import SHARED_SETTINGS


def _inProgress(sessions):
    """
    The sessions that are: not those the registry still shows of a node
    killed outright whose maildrop lock went with it (PostgreSQL), which
    hold nothing and will not end by a kick.
    """
    return [s for s in sessions if not s.gone]


def _who(store, args, out, stdin):
    sessions = _inProgress(_result(store.listSessions()))
    if args.json:
        return _jsonLines(out, (
            {"user": s.address, "node": s.node, "client": s.peer, "master": s.master, "since": _time(s.since)}
            for s in sessions
        ))
    # As wide as the longest client: an IPv6 one takes up to 47 characters.
    width = max([24] + [len(s.peer or "") for s in sessions])
    # A master user's session (a helpdesk's, a backup tool's login to the
    # user's maildrop) names it; "-" is the user's own login.
    masterWidth = max([len("MASTER")] + [len(_master(s)) for s in sessions])
    out.write(f"{'USER':<40} {'NODE':<30} {'CLIENT':<{width}} {'MASTER':<{masterWidth}} SINCE\n")
    for session in sessions:
        out.write(
            f"{leftAligned(session.address, 40)} {session.node:<30} {session.peer or '-':<{width}} "
            f"{_master(session):<{masterWidth}} {_time(session.since)}\n"
        )


def _master(session):
    """
    What C{mailgate who} shows of the master user who logged in to a
    session's maildrop: its name, or C{-} for the user's own login.
    """
    return "-" if session.master is None else printable(session.master)


#: What C{mailgate nodes} shows of the settings nodes announce
#: (L{mailgate.store.registry.SHARED_SETTINGS}), in its columns' order.
_NODE_SETTINGS = (
    "quota_octets", "expire_days", "keep_deleted_days", "quota_exceeded", "quota_warnings", "recipient_delimiter",
    "duplicate_window",
)


def _nodes(store, args, out, stdin):
    nodes = _result(store.listNodes())
    if args.json:
        return _jsonLines(out, (
            {
                "node": n.name, "started": _time(n.started), "seen": _time(n.seen),
                "settings": _jsonSettings(n.settings), "clock_offset": _clockOffset(n.settings),
            }
            for n in nodes
        ))
    out.write(
        f"{'NODE':<30} {'STARTED':<20} {'QUOTA':>8} {'EXPIRE':>6} {'KEEP-DELETED':>12} {'OVER-QUOTA':<10} "
        f"{'WARN-AT':<8} {'DELIMITER':<9} {'DUP-WINDOW':>10} CLOCK\n"
    )
    for node in nodes:
        quota, expire, keep, overQuota, warnAt, delimiter, window = (
            _shownSetting(node.settings, name) for name in _NODE_SETTINGS
        )
        offset = _clockOffset(node.settings)
        clock = "-" if offset is None else f"{offset:+.1f}s"
        out.write(
            f"{node.name:<30} {_time(node.started):<20} {quota:>8} {expire:>6} {keep:>12} {overQuota:<10} "
            f"{warnAt:<8} {delimiter:<9} {window:>10} {clock}\n"
        )
    announced = [n.settings for n in nodes if n.settings is not None]
    # A node of a version that does not announce a setting is not compared
    # on it.
    differing = [name for name in _NODE_SETTINGS if len({str(s[name]) for s in announced if name in s}) > 1]
    if differing:
        options = ", ".join(SHARED_SETTINGS[name][0] for name in differing)
        out.write(f"\nthe nodes differ in {options}: give every node the same\n")


def _jsonSettings(settings):
    """
    A node's announced settings for C{--json}: C{null} for none (never),
    and C{null} as a whole where the node announced none.
    """
    if settings is None:
        return None
    return {
        name: value if type(value) is not int or value >= 0 else None
        for name, value in settings.items()
        if name != "clock_offset"
    }


def _clockOffset(settings):
    """
    The node's clock minus the database server's, as the node last
    measured and announced it (seconds), or C{None}: not measured (SQLite,
    a node just started, or a version that does not).
    """
    value = None if settings is None else settings.get("clock_offset")
    return float(value) if type(value) in (int, float) else None


def _shownSetting(settings, name):
    value = None if settings is None else settings.get(name)
    if name == "quota_exceeded" and value in ("temporary", "permanent"):
        return value
    if name == "quota_warnings" and isinstance(value, list):
        return ",".join(f"{v}%" for v in value) or "none"
    if name == "recipient_delimiter" and isinstance(value, str):
        return value or "none"
    if type(value) is not int:
        return "-"
    if value < 0:
        return "never" if name == "expire_days" else "none"
    return formatSize(value) if name == "quota_octets" else str(value)


#: seconds C{mailgate kick} looks for a session it did not find at once
KICK_LOOK_AGAIN = 2.5


def _kickOptions(args):
    args.address = _address(args.address)
    args.wait = _number(args.wait, _seconds, "--wait")


def _kick(store, args, out, stdin):
    address = args.address
    _existingUser(store, address)
    listed = _result(store.listSessions(address))
    if listed and not _inProgress(listed):
        raise CommandError(f"{address} has no POP3 session: its node has gone", 1)
    marked = []
    if not endSessions(store, address, args.wait, marked=marked):
        raise CommandError(f"{address} has no POP3 session in progress", 1)
    # From the rows the kick marked, or where it ended before they were
    # read, the rows before it.
    by = masterNote(marked or _inProgress(listed))
    # Ended by the kick, or by its own QUIT just before its node saw the
    # mark (then its deletions were made): the registry does not say which.
    out.write(
        f"the POP3 session of {address}{by} has ended; nothing it marked deleted was removed, "
        "unless it sent QUIT before its node saw the kick\n"
    )
    audit.outcome(args, f"its POP3 session{by} has ended")


def masterNote(sessions):
    """
    Whose sessions C{sessions} (L{mailgate.records.SessionInfo}) were, as
    an ended session's line says it: C{" (logged in by the master user
    NAME)"} where a master user's login (a helpdesk's, a backup tool's)
    opened one, as C{mailgate who} names it; C{""} for a user's own.
    """
    masters = sorted({s.master for s in sessions if s.master is not None})
    return f" (logged in by the master user {', '.join(printable(m) for m in masters)})" if masters else ""


def endSessions(store, address, wait, lookAgain=None, marked=None):
    """
    End C{address}'s POP3 sessions on every node without applying their
    deletions, as C{mailgate kick} does (C{mailgate user disable} too),
    and wait for them to end.

    @param wait: the seconds to wait for them to end.
    @param lookAgain: the seconds to look for a session not found at once
        (L{KICK_LOOK_AGAIN} if C{None}).
    @param marked: a list to which the sessions marked to end are added
        (L{mailgate.records.SessionInfo}, as first listed once marked), or
        C{None}.
    @return: whether there was a session to end (it has ended).
    @raise CommandError: (exit 75) the nodes were asked, and the sessions
        had not ended after C{wait} seconds.
    """
    # A session that logged in a moment ago appears in the registry with
    # its node's next write (about a second): look again for a little
    # while before saying there is none.
    lookUntil = time.monotonic() + (KICK_LOOK_AGAIN if lookAgain is None else lookAgain)
    while not _result(store.kickSessions(address)):
        if time.monotonic() >= lookUntil:
            return False
        time.sleep(0.25)
    # The node serving the session looks for the mark about once a second.
    # Only the marked sessions are waited for: a client that logs in again
    # at once (they do) has a new session, which was not asked to end.
    deadline = time.monotonic() + wait
    listed = _inProgress(_result(store.listSessions(address, kicked=True)))
    if marked is not None:
        marked.extend(listed)
    while listed:
        if time.monotonic() >= deadline:
            raise CommandError(
                f"asked the node to end the POP3 session of {address}; it has not ended yet", EX_TEMPFAIL
            )
        time.sleep(0.2)
        listed = _inProgress(_result(store.listSessions(address, kicked=True)))
    return True


def _addSessionCommands(commands):
    """
    C{mailgate who}, C{nodes} and C{kick}: the POP3 sessions and nodes on the database.
    """
    who = commands.add_parser(
        "who",
        help="list the POP3 sessions in progress on every node",
        description="List the POP3 sessions in progress on every node sharing the database: "
        "user, node (its hostname and process id), client address, the master user who logged in to "
        "the user's maildrop (- for the user's own login), since when.  A session shows "
        "within a second or two of its login; those of a node whose heartbeat stopped (killed, "
        "its machine gone) are left out after 30 seconds, on PostgreSQL at once (its maildrop "
        "lock went with the node).",
    )
    _addJSON(who)
    who.set_defaults(run=_who, migrate=True, readsOnly=True)
    nodes = commands.add_parser(
        "nodes",
        help="list the running nodes sharing the database and the settings they work with",
        description="List the nodes whose heartbeat is recent, with the settings each works with on "
        "the data they share (default quota, retention (EXPIRE), days deleted mail is kept, how mail "
        "over quota is refused, quota warnings, recipient delimiter, duplicate window) and its clock "
        "against the database server's; says which of these settings differ between nodes.",
    )
    _addJSON(nodes)
    nodes.set_defaults(run=_nodes, migrate=True, readsOnly=True)
    kick = commands.add_parser(
        "kick",
        help="end a user's POP3 session, wherever it runs, without applying its deletions",
        description="End ADDRESS's POP3 session on whichever node serves it: the client is told "
        "-ERR [SYS/TEMP] session ended by the administrator, nothing the session marked deleted "
        "is deleted, and the maildrop is free again.  Waits until the session is gone: exit 0, "
        "1 if there was none (at once on PostgreSQL if its node was killed), 75 if it is still "
        "there after --wait seconds.",
    )
    kick.add_argument("address", metavar="ADDRESS")
    kick.add_argument(
        "--wait", default="30", metavar="SECONDS", help="how long to wait for it to end (default 30)"
    )
    kick.set_defaults(run=_kick, migrate=True, readOptions=_kickOptions, audit=audit.Audited("kick", "address"))
