# -*- test-case-name: tests.test_service -*-
"""
What the next start would meet on the listeners a reload changes, seen
by the running server (L{mailgate.service.MailgateService.reloadConfig}):
reading the file checks their syntax, and a restart taken "for later"
on a listener it cannot serve failed then, with the service down
(exit 78) or retried every two seconds (exit 1).
"""

import errno
import socket

from mailgate.config import LISTENER_SETTINGS, checkEndpoint, listenerAddresses, missingSocketDirectories, setting
from mailgate.errors import ConfigurationError


def checkListenersForTheRestart(config, names):
    """
    At a reload, in the running server: the listeners of the changed
    settings C{names} as the next start will take them, which reading the
    file checked only the syntax of.

      - A C{systemd:} socket this process was not given: the next start,
        from the same socket unit, is given the same ones.  Twisted read
        them from the environment as it was imported, and took
        C{LISTEN_PID} out of it, so the file's reading could not tell
        this process from the C{mailgate} command's.
      - A Unix socket whose directory is not there: not for C{config
        --check}, which may run while the server is stopped, its
        C{RuntimeDirectory=} gone with it (it warns instead).

    @raise ConfigurationError: what the next start would refuse.
    """
    for name in LISTENER_SETTINGS:
        if name not in names:
            continue
        values = getattr(config, setting(name).attribute)
        for description in [values] if isinstance(values, str) else values or ():
            try:
                checkEndpoint(description, adopting=True)
            except ValueError as e:
                raise ConfigurationError(f"{name}: {e}") from None
    for name, description, reason in missingSocketDirectories(config, names):
        raise ConfigurationError(
            f"{name}: a start could not listen on {description}: {reason} (make it, or correct the path)"
        )


def busyListeners(new, current, names):
    """
    The TCP listeners of C{new}'s changed settings C{names} that the
    restart could not bind as things are now, each as C{(name,
    description, reason)}: a port another process listens on (a
    Dovecot still serving it, say), an interface address this machine
    does not have.  The start fails with exit 1, which systemd's
    C{Restart=on-failure} retries every two seconds: warned of at the
    reload, not refused, as the other process may be on its way out
    before the restart.  A port C{current} listens on is this server's,
    free by the restart; a port refused for want of privilege is left
    to the start (under twistd's C{--uid} root binds it).
    """
    served = {address[1] for _, _, address in listenerAddresses(current) if address[0] == "tcp"}
    busy = []
    for name, description, address in listenerAddresses(new, names):
        if address[0] != "tcp" or address[1] == 0 or address[1] in served:
            continue
        reason = _bindProblem(address[2], address[1])
        if reason is not None:
            busy.append((name, description, reason))
    return busy


def _bindProblem(interface, port):
    """
    Why a listening socket could not be bound to C{interface} (C{""}:
    every IPv4 address) and C{port} now, or C{None}: bound (with
    C{SO_REUSEADDR}, as Twisted binds) and closed at once, never
    listening.
    """
    host = interface or "0.0.0.0"
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except socket.gaierror as e:
        # A name that does not resolve (a mistyped address, 999.1.1.1):
        # the start's bind fails the same way, exit 1.
        return f"{host} is not an address of this machine ({e.strerror})"
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            return f"port {port} is in use by another process now"
        if e.errno == errno.EADDRNOTAVAIL:
            return f"{host} is not an address of this machine"
    return None


def foreignInterfaces(config):
    """
    The TCP listeners of C{config} whose interface is not an address of
    this machine (or a name that does not resolve), each as C{(name,
    description, reason)}: a start cannot bind them and exits 1, which
    systemd retries every two seconds.  For C{mailgate config --check} to
    warn of, as it warns of a Unix socket's missing directory: an address
    may be on its way (a floating address, an interface not up yet).  A
    port in use is not asked: the server checked may be the one using it.
    """
    foreign = []
    for name, description, address in listenerAddresses(config):
        if address[0] != "tcp" or not address[2]:
            continue
        reason = _bindProblem(address[2], 0)
        if reason is not None:
            foreign.append((name, description, reason))
    return foreign
