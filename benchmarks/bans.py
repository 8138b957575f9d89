"""
What the bans in force cost a node's reactor: every node keeps the bans
of all nodes in memory (L{mailgate.policy.bans.BanList}) and looks at the
store twice a second (L{mailgate.policy.refresh}): a refresh that finds
nothing new, the sweep for bans that ended, and, when any node added a
ban, a refresh that reads them all again.  A brute-force attack from a
botnet is when bans are many and new ones come every second, and when the
reactor is needed most.

    .venv/bin/python benchmarks/bans.py [--bans 10000 --bans 100000] [--rounds 5]

In one process, on the reactor's side only (the store's read runs on a
database thread): CPU per call (process time, best of the rounds), in
milliseconds, for a list of N IPv4 bans.  Not a target: a figure to
compare before and after a change to the ban list.
"""

import argparse
import ipaddress
import sys
import time

from twisted.internet.task import Clock

from mailgate.policy.bans import BanList
from mailgate.records import BanRecord

START = 1_000_000


class _Metrics:
    def bans(self, count):
        pass


def banRecords(count, extra=()):
    """
    C{count} bans of distinct IPv4 addresses, ending an hour from
    L{START} and a second apart, then C{extra}.
    """
    return tuple(
        BanRecord(str(ipaddress.IPv4Address(0x0A000000 + n)), "auth-failures", 5, START, START + 3600 + n)
        for n in range(count)
    ) + tuple(extra)


def timings(count):
    """
    Milliseconds of CPU for: the first read of C{count} bans (a node's
    start), a refresh that finds the store unchanged, a sweep before any
    ban ends, and a refresh after one ban was added.
    """
    clock = Clock()
    clock.advance(START)
    bans = BanList(clock, _Metrics())
    stored = banRecords(count)
    figures = {}
    start = time.process_time()
    bans.update(1, stored)
    figures["first read"] = time.process_time() - start
    start = time.process_time()
    for _ in range(10):
        bans.update(1, None)
    figures["unchanged refresh"] = (time.process_time() - start) / 10
    start = time.process_time()
    for _ in range(10):
        bans.sweep()
    figures["sweep"] = (time.process_time() - start) / 10
    added = banRecords(count, [BanRecord("192.0.2.1", "admin", 0, START, START + 60)])
    start = time.process_time()
    bans.update(2, added)
    figures["refresh after one ban added"] = time.process_time() - start
    assert len(bans) == count + 1
    return {name: seconds * 1000 for name, seconds in figures.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--bans", type=int, action="append", help="how many bans are in force")
    args = parser.parse_args(argv)
    counts = args.bans or [10_000, 100_000]
    names = ["first read", "unchanged refresh", "sweep", "refresh after one ban added"]
    print("| bans | " + " | ".join(f"{name}, ms" for name in names) + " |")
    print("|---:|" + "---:|" * len(names))
    for count in counts:
        rounds = [timings(count) for _ in range(args.rounds)]
        best = {name: min(r[name] for r in rounds) for name in names}
        print(f"| {count:,} | " + " | ".join(f"{best[name]:.2f}" for name in names) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
