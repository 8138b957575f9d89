"""
The cost of a lock-connection statement on PostgreSQL, two ways: through a
worker thread with psycopg (how the maildrop locks worked until a0f3742),
and on a connection driven by the reactor (L{mailgate.store.pgreactor}).
Each round is a lock and an unlock, one after the other, as a POP3 login
and QUIT make them.

    eval "$(.venv/bin/python tests/pgserver.py)"
    .venv/bin/python benchmarks/lockcalls.py --url "$MAILGATE_TEST_POSTGRES"
"""

import argparse
import os
import sys
import time

import psycopg
from twisted.internet import defer, reactor

from mailgate.store import engineFromURL
from mailgate.store.database import WorkerThreads
from mailgate.store.pgreactor import INT8, ReactorConnection, Statement

LOCK = Statement("bench_lock", "SELECT pg_try_advisory_lock($1)", [INT8])
UNLOCK = Statement("bench_unlock", "SELECT pg_advisory_unlock($1)", [INT8])
KEY = [b"4242424242"]


def threaded(url, threads):
    conn = psycopg.connect(url, autocommit=True)

    def run(sql):
        with conn.cursor(binary=True) as cursor:
            cursor.execute(sql, (int(KEY[0]),))
            return cursor.fetchone()

    @defer.inlineCallbacks
    def one():
        yield threads.submit(run, "SELECT pg_try_advisory_lock(%s)")
        yield threads.submit(run, "SELECT pg_advisory_unlock(%s)")

    return one


def reactorDriven(url, threads):
    engine = engineFromURL(url)
    conn = ReactorConnection(reactor, lambda: threads.submit(engine.connectPrepared, [LOCK, UNLOCK]), "bench")

    @defer.inlineCallbacks
    def one():
        yield conn.execute(LOCK, KEY)
        yield conn.execute(UNLOCK, KEY)

    return one


@defer.inlineCallbacks
def main(options):
    threads = WorkerThreads(reactor, 1, "bench")
    threads.start()
    ways = {"worker thread": threaded(options.url, threads), "reactor-driven": reactorDriven(options.url, threads)}
    try:
        for way in ways.values():  # connect and warm up
            for _ in range(200):
                yield way()
        for rnd in range(options.rounds):
            figures = []
            for name, way in ways.items():
                started = time.perf_counter()
                cpu = time.process_time()
                for _ in range(options.n):
                    yield way()
                wall = (time.perf_counter() - started) / options.n * 1e6
                used = (time.process_time() - cpu) / options.n * 1e6
                figures.append(f"{name}: {wall:.0f} µs per lock+unlock ({used:.0f} µs CPU)")
            print(f"round {rnd + 1}: " + "; ".join(figures), flush=True)
    finally:
        threads.stop()
        reactor.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--url", default=os.environ.get("MAILGATE_TEST_POSTGRES"), help="postgresql:// URL")
    parser.add_argument("-n", type=int, default=5000, help="lock+unlock pairs per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    options = parser.parse_args()
    if not options.url:
        sys.exit("give --url, or set MAILGATE_TEST_POSTGRES")
    reactor.callWhenRunning(main, options)
    reactor.run()
