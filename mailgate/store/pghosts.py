# -*- test-case-name: tests.test_pgfailover -*-
"""
The servers of a multi-host PostgreSQL URL (C{postgresql://db1,db2/mail}:
a primary and its standbys), as mailgate connects to them.

libpq tries them in the URL's order, from the first, at every connection.
A first server whose machine is gone (a failover's old primary) then costs
every new connection its whole connect timeout before the next is tried,
the primary: after a failover a node took ten seconds for each of its
lock and read connections, made one after another, and its first login
waited for them.  L{HostOrder} puts the server that last took a
connection first; L{hostAttempts} gives each server its own timeout.
"""

import random
import threading

import psycopg


def _servers(params):
    """
    C{(host, hostaddr, port)} of each server C{params} (a parsed
    connection string) names, C{None} for a parameter it does not give
    (libpq then takes the environment's, C{PGPORT} say, or a service
    file's) and an empty string for one it gives empty (libpq's compiled
    default then: a multi-host URL without ports gives C{port=,}, which
    is 5432 whatever C{PGPORT} says); C{None} for fewer than two servers.
    """

    def values(name):
        value = params.get(name)
        return [None] if value is None else str(value).split(",")

    hosts = values("host")
    addresses = values("hostaddr")
    count = max(len(hosts), len(addresses))
    if count < 2:
        return None
    ports = values("port")

    def nth(values, i):
        return values[i] if len(values) > 1 else values[0]

    return [(nth(hosts, i), nth(addresses, i), nth(ports, i)) for i in range(count)]


def hostAttempts(info):
    """
    The connection strings to try in turn for C{info}, one per host where
    it names several (C{host=db1,db2}, a multi-host URL), each with its
    own port and address, as psycopg's own connect tries them.

    libpq's non-blocking connect moves on to the next host only for some
    failures, and its C{connect_timeout} is for the caller to enforce
    (L{mailgate.store.pgreactor}'s C{_connected}: all hosts together): a first host that did not answer
    at all (its machine gone, the old primary of a failover) took the
    whole time, every time, and a node's lock and read connections never
    reached the primary named after it.  Each host is given the whole
    timeout.  C{load_balance_hosts=random} (libpq 16) is honoured.
    """
    try:
        params = psycopg.conninfo.conninfo_to_dict(info)
    except psycopg.Error:
        return [info]
    servers = _servers(params)
    if servers is None:
        return [info]
    attempts = []
    for server in servers:
        single = dict(params)
        for name, value in zip(("host", "hostaddr", "port"), server):
            if value is None:
                # Not given: the environment's or the service file's, as
                # libpq takes it for the whole list.
                single.pop(name, None)
            else:
                # Given, if empty: libpq's compiled default, not the
                # environment's, as for the whole list (popping it sent
                # these connections to PGPORT's server while the worker
                # connections went to 5432).
                single[name] = value
        attempts.append(psycopg.conninfo.make_conninfo("", **single))
    if params.get("load_balance_hosts") == "random":
        random.shuffle(attempts)
    return attempts


class HostOrder:
    """
    The servers of a connection string naming several, the one that last
    took a connection first.  Thread-safe: connections are made on worker
    threads.
    """

    def __init__(self, conninfo):
        try:
            self._servers = _servers(psycopg.conninfo.conninfo_to_dict(conninfo))
        except psycopg.Error:
            self._servers = None
        self._first = 0
        self._lock = threading.Lock()

    def parameters(self):
        """
        The C{host}, C{port} and C{hostaddr} parameters that list the
        servers in the order to try them, overriding the connection
        string's: none while that order is the connection string's own.
        """
        with self._lock:
            first = self._first
        if not self._servers or first == 0:
            return {}
        order = self._servers[first:] + self._servers[:first]
        parameters = {}
        for i, name in enumerate(("host", "hostaddr", "port")):
            # Only what the connection string gives: one it does not is
            # left to the environment or the service file, as without
            # the reordering (an empty list, "," for two, would be
            # libpq's compiled default instead, 5432 for PGPORT's port).
            if order[0][i] is not None:
                parameters[name] = ",".join(server[i] for server in order)
        return parameters

    def connected(self, host, port):
        """
        A connection was made to C{host} (as libpq reports it: the name,
        or the address where only one was given) on C{port}.
        """
        if not self._servers:
            return
        for i, (name, address, given) in enumerate(self._servers):
            if host in (name, address) and given in (port, "", None):
                with self._lock:
                    self._first = i
                return


_orders = {}
_ordersLock = threading.Lock()
#: connection strings whose order is remembered, at most (a process has one
#: or two: the server's database, a db copy's target)
_MAX_ORDERS = 16


def hostOrderOf(conninfo):
    """
    The L{HostOrder} of C{conninfo}, one per process: a node makes
    several engines of its URL as it starts (the URL's check, the schema's,
    the store's), each of which had to learn anew, at the cost of a
    timeout, which server answers.
    """
    with _ordersLock:
        order = _orders.get(conninfo)
        if order is None:
            if len(_orders) >= _MAX_ORDERS:
                _orders.clear()
            order = _orders[conninfo] = HostOrder(conninfo)
        return order

