"""
What one read costs a POP3 session while input piles up behind a command
that waits: a hostile or broken client writing pipelined commands an octet
per segment while the server is busy with its PASS (here the delay after a
failed login).  The session keeps reading until more than
C{maxQueuedCommands} complete lines wait (or C{maxBufferedInput} octets),
so each read should cost its own octets, whatever already waits.

    .venv/bin/python benchmarks/trickle.py [--rounds 5] [--line 250 --line 7]

In one process (L{mailgate.testing.POP3Session}, a real SQLite file, the
session's own clock): CPU per read (process time, best of the rounds), in
microseconds, for lines of each length until the session stops reading,
beside a logged-in session given NOOPs an octet per read, nothing waiting
(each command answered as its line ends).  Not a target:
a figure to compare before and after a change to the session core.
"""

import argparse
import os
import sys
import tempfile
import time

from mailgate.testing import POP3Session, addUser, memoryStore

ADDRESS = "alice@example.org"


def busySession(store):
    """
    A session whose PASS waits (the delay after a failed login), so that
    what the client sends next piles up unread.
    """
    session = POP3Session(store, apop=False)
    session.command(f"USER {ADDRESS}")
    session.protocol.authFailureDelay = 60
    session.send(b"PASS wrong\r\n")
    return session


def perRead(store, line, busy=True):
    """
    Hand the session C{line} again and again, an octet per read, until it
    stops reading (or 64 KiB have gone); return (microseconds per read,
    reads).
    """
    if busy:
        session = busySession(store)
    else:
        session = POP3Session(store, apop=False)
        assert session.login(ADDRESS, "secret").startswith("+OK")
    data = line * (64 * 1024 // len(line) + 1)
    transport = session.transport
    protocol = session.protocol
    reads = 0
    start = time.process_time()
    for i in range(len(data)):
        if transport.producerState == "paused" or (not busy and i == 20000):
            break
        protocol.dataReceived(data[i:i + 1])
        reads += 1
    elapsed = time.process_time() - start
    protocol.connectionLost(None)
    return elapsed / reads * 1e6, reads


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--line", type=int, action="append", help="command line lengths, CRLF included")
    args = parser.parse_args(argv)
    lengths = args.line or [250, 100, 7]
    with tempfile.TemporaryDirectory() as directory:
        store = memoryStore("sqlite:///" + os.path.join(directory, "trickle.sqlite3"))
        addUser(store, ADDRESS, "secret", apop=False)
        print("| input | reads until paused | us per read (best of %d) |" % args.rounds)
        print("|---|---:|---:|")
        for length in lengths:
            line = b"NOOP " + b"x" * max(0, length - 7) + b"\r\n"
            figures = [perRead(store, line) for _ in range(args.rounds)]
            reads = figures[0][1]
            print(f"| {len(line)}-octet lines behind a waiting PASS | {reads} | {min(f[0] for f in figures):.2f} |")
        idle = [perRead(store, b"NOOP\r\n", busy=False) for _ in range(args.rounds)]
        print(f"| NOOP lines, logged in, nothing waiting | {idle[0][1]} | {min(f[0] for f in idle):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
