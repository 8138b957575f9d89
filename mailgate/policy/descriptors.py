# -*- test-case-name: tests.test_hostile_load -*-
"""
The connections this process can serve within its limit on open files.

Every connection is a file descriptor, and so are the database's
connections and their files, the log, the listeners, the metrics port's
connections and a message spooled to disk.  A process that runs out of
descriptors cannot even accept a connection to refuse it: Twisted closes
such connections unanswered, and the database cannot open what it needs.
So the limit on connections in all (C{--max-connections}) is kept below
the process's limit on open files (C{ulimit -n}, systemd's
C{LimitNOFILE}), with room left for the rest: over it, a client is told
C{-ERR [SYS/TEMP]} or C{421} as for any full server, and everything else
keeps working.  (Dovecot only warns at start when its C{client_limit}
does not fit C{ulimit -n}; here the limit that does fit is the one
enforced, and the warning says so.)

The quota-status service's connections (C{--quota-status}) are
descriptors too, outside C{--max-connections}: up to
C{--quota-status-max-connections} of them are kept apart as well
(L{quotaStatusConnections}), lest Postfix's policy connections eat the
reserve the database and the refusals need.
"""

from mailgate.plural import counted

#: descriptors kept for everything but client connections: the database's
#: connections and their files (an SQLite connection holds three), the
#: log, the listeners, the metrics port's connections (32), the
#: connections accepted only to be refused, whose descriptors are let go
#: in the reactor's next turn (64 a turn, two turns' worth: see
#: mailgate.session.accepting) and those that wait for their TLS
#: handshake to be told why (32: L{mailgate.session.refusals.REFUSED_IN_HANDSHAKE}), messages spooled to
#: disk, a TLS certificate or a log file reopened
RESERVED = 256



def openFileLimit():
    """
    This process's (soft) limit on open files, or C{None} if it has none
    or it cannot be read.
    """
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, ValueError, OSError):
        return None
    if soft == resource.RLIM_INFINITY or soft <= 0:
        return None
    return soft


def quotaStatusConnections(config):
    """
    The quota-status connections C{config} may have open beside the mail
    connections: C{quota-status-max-connections} when C{--quota-status}
    listens, else none (0 for no limit counts none: there is no bound to
    keep apart).
    """
    return config.quotaStatusMaxConnections if config.quotaStatus else 0


def connectionsWithin(fileLimit):
    """
    The most connections a process allowed C{fileLimit} open files can
    serve, the rest kept for L{RESERVED} uses (of a limit too small for
    them, a quarter: at least one connection).
    """
    return max(1, fileLimit // 4, fileLimit - RESERVED)


def fittedConnectionLimit(maxConnections, fileLimit, quotaStatus=0):
    """
    C{maxConnections} (0: no limit) lowered to fit C{fileLimit} open files
    (C{None}: no limit), beside C{quotaStatus} quota-status connections
    (L{quotaStatusConnections}).

    @return: C{(limit, warning)}: the limit to enforce, and C{None} or the
        text of the warning saying it was lowered and why.
    """
    if fileLimit is None:
        return maxConnections, None
    fitting = connectionsWithin(fileLimit - quotaStatus)
    if maxConnections and maxConnections <= fitting:
        return maxConnections, None
    beside = f" beside quota-status-max-connections {quotaStatus}" if quotaStatus else ""
    if maxConnections:
        wanted = f"max-connections {maxConnections}{beside}"
        lower = " or quota-status-max-connections" if quotaStatus else ""
        remedy = (
            f"raise the open file limit to at least {maxConnections + quotaStatus + RESERVED} "
            f"or lower max-connections{lower}"
        )
    else:
        wanted = f"max-connections 0 (no limit){beside}"
        remedy = "raise the open file limit for more"
    return fitting, (
        f"{wanted} does not fit the {fileLimit} open files this process may have (ulimit -n, "
        f"systemd's LimitNOFILE), some of which the database, the log and the listeners need: "
        f"at most {counted(fitting, 'connection')} are served, more are refused (-ERR [SYS/TEMP], 421 4.7.0); "
        f"{remedy}"
    )
