# -*- test-case-name: tests.test_pgresolve -*-
"""
The address of a PostgreSQL server named by a host name
(C{postgresql://db.example.internal/mail}), looked up before libpq is
given the connection, so that libpq never looks it up itself.

libpq resolves a host name with a blocking C{getaddrinfo} inside
C{PQconnectStart}, which psycopg's C{pq.PGconn.connect_start} calls
keeping Python's lock: with its DNS server slow or gone, a node tested so
(its resolver waiting 4 s twice) answered nothing at all, not a POP3
C{CAPA}, no timer, for 8 s at every reconnection of its reactor's
connections.  Here the name is looked up with C{socket.getaddrinfo}, which
lets the other threads run, on a thread of its own whose answer is awaited
C{timeout} seconds at most, and libpq is given the address
(C{hostaddr}) beside the name (C{host}), which it still uses for TLS
(C{sslmode=verify-full} checks the certificate against the name) and in
its messages.  A name is looked up at every connection: a failover made
by changing the name's address is followed.

The worker threads' connections (psycopg's C{Connection.connect}, in
L{mailgate.store.postgres}) go through the same lookup: psycopg looks a
name up itself with C{socket.getaddrinfo} (Python's lock let go), but as
long as the system's resolver waits, with no bound of mailgate's: a CLI
command, or a node's reader and writer threads, waited 40 s on a DNS
server that never answered (C{options timeout:15 attempts:2}) before
failing, where the reactor's connections gave up after 10.
"""

import ipaddress
import os
import socket
import threading

import psycopg

from mailgate.plural import counted
from mailgate.store.pghosts import hostAttempts


class NotResolved(Exception):
    """
    A server's name could not be resolved (no answer in time, or no
    address): a temporary failure, as Postfix and Dovecot take one.
    """


def _needsLookup(host):
    if not host or host.startswith("/") or host[1:2] == ":" or host.startswith("@"):
        # libpq's default, a Unix socket's directory (or an abstract one).
        return False
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return True
    return False


def _lookUp(host, timeout):
    """
    The addresses of C{host}, in the resolver's order, waited for
    C{timeout} seconds at most (the thread asking the resolver then ends
    when the resolver gives up).
    """
    answer = {}

    def ask():
        try:
            answer["addresses"] = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
        except OSError as e:
            answer["error"] = e

    asking = threading.Thread(target=ask, name=f"resolving {host}", daemon=True)
    asking.start()
    asking.join(timeout)
    if asking.is_alive():
        raise NotResolved(f"could not resolve host name \"{host}\": no answer from DNS in {counted(timeout, 'second', spec='g')}")
    if "error" in answer:
        error = answer["error"]
        raise NotResolved(f"could not resolve host name \"{host}\": {getattr(error, 'strerror', None) or error}")
    addresses = []
    for _, _, _, _, sockaddr in answer["addresses"]:
        if sockaddr[0] not in addresses:
            addresses.append(sockaddr[0])
    if not addresses:
        raise NotResolved(f"could not resolve host name \"{host}\": no address")
    return addresses


def resolvedAttempts(attempt, timeout):
    """
    The connection strings for C{attempt} (one server's, as
    L{mailgate.store.pghosts.hostAttempts} gives it), one per address of its
    host name, in the resolver's order, each with C{hostaddr}; C{attempt}
    itself where libpq has nothing to look up (an address, a Unix socket,
    C{hostaddr} given).

    @raise NotResolved: if the name has no address, or none came in
        C{timeout} seconds.
    """
    try:
        params = psycopg.conninfo.conninfo_to_dict(attempt)
    except psycopg.Error:
        return [attempt]
    if params.get("hostaddr"):
        return [attempt]
    host = str(params.get("host") or os.environ.get("PGHOST", ""))
    if "," in host or not _needsLookup(host):
        return [attempt]
    return [
        psycopg.conninfo.make_conninfo("", **{**params, "host": host, "hostaddr": address})
        for address in _lookUp(host, timeout)
    ]


def addressedAttempts(info, timeout, unresolved):
    """
    The connection strings to try in turn for C{info} (see
    L{mailgate.store.pghosts.hostAttempts}), each server's name looked up
    here (L{resolvedAttempts}) when its turn comes, not by libpq or
    psycopg.  A name that does not resolve is given to C{unresolved} (its
    L{NotResolved}) and the next server is tried.
    """
    for attempt in hostAttempts(info):
        try:
            addresses = resolvedAttempts(attempt, timeout)
        except NotResolved as e:
            unresolved(e)
            continue
        yield from addresses


def addressed(conninfo, timeout):
    """
    C{conninfo} with the address of each server it names by a host name
    (the first the resolver gives) in C{hostaddr}, in the order of its
    C{host} list, for a connection libpq makes in one call
    (L{mailgate.store.pgrefusal.askWhy}'s).

    @raise NotResolved: if a name has no address, or none came in
        C{timeout} seconds.
    """
    try:
        params = psycopg.conninfo.conninfo_to_dict(conninfo)
    except psycopg.Error:
        return conninfo
    hosts = str(params.get("host") or os.environ.get("PGHOST", "")).split(",")
    if params.get("hostaddr") or not any(_needsLookup(host) for host in hosts):
        return conninfo
    # An empty entry: that server's host is used as libpq reads it.
    addresses = [_lookUp(host, timeout)[0] if _needsLookup(host) else "" for host in hosts]
    return psycopg.conninfo.make_conninfo(
        "", **{**params, "host": ",".join(hosts), "hostaddr": ",".join(addresses)}
    )
