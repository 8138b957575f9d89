# -*- test-case-name: tests.test_cli -*-
"""
C{mailgate ban ...}: the addresses banned by every node.
"""

import datetime
import time

from mailgate.cli import audit
from mailgate.cli.common import CommandError, EX_DATAERR, _addJSON, _jsonLines, _number, _result
from mailgate.store.bounds import parseWhole


# -- bans (the connection policy's, shared through the database) -----------


def _banAddress(text):
    from mailgate.policy.addresses import addressText

    try:
        return addressText(text)
    except ValueError:
        raise CommandError(f"not an IP address (nor an IPv6 /64 network): {text!r}", EX_DATAERR)


def _utc(at):
    """
    A time as C{ban} shows it; one no date can hold (a ban stored by an
    older mailgate, which took any length) as its number of seconds.
    """
    try:
        return datetime.datetime.fromtimestamp(at, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (ValueError, OverflowError, OSError):
        return f"{int(at)} (seconds since 1970, past year 9999)"


def _policyStore(store):
    from mailgate.store.policy import SQLPolicyStore

    return SQLPolicyStore(store.database)


def _banList(store, args, out, stdin):
    from mailgate.policy.addresses import storedKey

    # Each ban as it is enforced: one an older mailgate stored for a
    # single IPv6 address covers its /64 (mailgate.policy.bans), and was
    # listed as the single address.
    bans = [(storedKey(b.address), b) for b in _result(_policyStore(store).listBans(time.time()))]
    if args.json:
        return _jsonLines(out, (
            {"address": address, "reason": b.reason, "failures": b.failures, "expires": _utc(b.expires)}
            for address, b in bans
        ))
    out.write(f"{'ADDRESS':<39} {'REASON':<14} {'FAILURES':>8}  EXPIRES\n")
    for address, ban in bans:
        out.write(f"{address:<39} {ban.reason:<14} {ban.failures:>8}  {_utc(ban.expires)}\n")


def _banAddOptions(args):
    from mailgate.policy.settings import MAX_BAN_TIME

    args.address = _banAddress(args.address)
    args.duration = _number(args.duration, lambda text: parseWhole(text, MAX_BAN_TIME), "--for", minimum=1)


def _banAdd(store, args, out, stdin):
    import ipaddress

    from mailgate.policy.addresses import DEFAULT_EXEMPT_NETWORKS

    address, duration = args.address, args.duration
    policy = _policyStore(store)
    ban = _result(policy.addBan(address, time.time(), duration))
    # Replaced, or the later of the two would still be enforced.
    _liftEarlierBans(policy, address)
    out.write(f"banned {address} until {_utc(ban.expires)}\n")
    audit.outcome(args, f"banned until {_utc(ban.expires)}")
    banned = ipaddress.ip_network(address)
    if any(banned.overlaps(ipaddress.ip_network(n)) for n in DEFAULT_EXEMPT_NETWORKS):
        out.write(
            f"note: {address} is in the default --exempt-network; servers exempting it "
            f"do not enforce this ban\n"
        )


def _banDelOptions(args):
    args.banned = _banAddress(args.address)


def _liftEarlierBans(policy, address):
    """
    Lift the bans an earlier mailgate stored for single IPv6 addresses of
    the /64 C{address}: enforced, and listed, for it.  Whether there was one.
    """
    from mailgate.policy.addresses import storedKey

    removed = False
    for ban in _result(policy.listBans(time.time())):
        if ban.address != address and storedKey(ban.address) == address:
            removed = _result(policy.removeBan(ban.address, time.time())) or removed
    return removed


def _banDel(store, args, out, stdin):
    address = args.banned
    policy = _policyStore(store)
    removed = _result(policy.removeBan(address, time.time()))
    removed = _liftEarlierBans(policy, address) or removed
    if removed:
        out.write(f"lifted the ban of {address}; its failed logins and unknown recipients are forgotten\n")
        audit.outcome(args, "ban lifted, its failed logins and unknown recipients forgotten")
        return
    # Slowed but not banned (POP3's penalty, SMTP's slowed errors): released
    # all the same, on every node within a second.
    forgotten = _result(policy.forgetFailures(address, time.time()))
    what = _forgottenText(forgotten)
    if not what:
        raise CommandError(f"no ban for {address}")
    verb = "is" if forgotten.logins + forgotten.recipients == 1 else "are"
    out.write(f"no ban for {address}; its {what} {verb} forgotten\n")
    audit.outcome(args, f"no ban, its {what} forgotten")


def _forgottenText(forgotten):
    """
    "12 failed logins and 24 unknown recipients", or what of it there was.
    """
    from mailgate.plural import counted

    parts = []
    if forgotten.logins:
        parts.append(counted(forgotten.logins, "failed login"))
    if forgotten.recipients:
        parts.append(counted(forgotten.recipients, "unknown recipient"))
    return " and ".join(parts)


def _addBanCommands(commands):
    """
    C{mailgate ban list|add|del}: running servers (every node) enforce a
    change within seconds.
    """
    from mailgate.policy.settings import BAN_TIME

    ban = commands.add_parser(
        "ban",
        help="list, add and lift bans of client addresses",
        description="Bans of client addresses, shared by every server on the database: "
        "a running server enforces a ban added or lifted here within a second.",
    ).add_subparsers(dest="action", metavar="ACTION")
    ban.required = True
    banList = ban.add_parser(
        "list",
        help="list the bans in force: address, reason, failures, expiry (UTC)",
        description="List the bans in force: the address (an IPv6 client's /64), the reason "
        "(auth-failures, unknown-rcpt or admin), the failed logins (or SMTP recipients refused as unknown) "
        "that made it and when it ends (UTC).",
    )
    _addJSON(banList)
    banList.set_defaults(run=_banList, migrate=True, readsOnly=True)
    banAdd = ban.add_parser(
        "add",
        help="ban an address, an IPv6 one for its whole /64 (replacing a ban it has)",
        description="Ban ADDRESS (an IPv6 address: its whole /64) for --for seconds, replacing "
        "a ban it has: every server on the database refuses its new connections within seconds, "
        "before any password is checked.",
    )
    banAdd.add_argument("address", metavar="ADDRESS")
    banAdd.add_argument(
        "--for",
        dest="duration",
        default=str(BAN_TIME),
        metavar="SECONDS",
        help=f"how long the ban lasts, at most ten years (default: {BAN_TIME})",
    )
    banAdd.set_defaults(
        run=_banAdd, migrate=True, readOptions=_banAddOptions, audit=audit.Audited("ban add", "address")
    )
    banDel = ban.add_parser(
        "del",
        help="lift an address's ban and forget its failed logins and unknown recipients",
        description="Lift ADDRESS's ban and forget its failed logins and SMTP recipients refused as unknown, "
        "so that it starts afresh: every server on the database stops slowing it within seconds. An address "
        "slowed but not banned is released the same way; exit 1, changing nothing, if it has neither a ban "
        "nor failures counted.",
    )
    banDel.add_argument("address", metavar="ADDRESS")
    banDel.set_defaults(run=_banDel, migrate=True, readOptions=_banDelOptions, audit=audit.Audited("ban del", "banned"))
