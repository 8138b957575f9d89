"""
This machine's own name, the default of C{--hostname}: what greetings, the
APOP timestamp and C{Received:} fields say mailgate runs on.
"""

import socket


def machineName():
    """
    This machine's fully qualified name, as C{hostname -f} gives it (and
    Postfix's C{myhostname} and Dovecot's C{hostname} take it): the host
    name, or its canonical name where the resolver knows one.

    Not Python's C{socket.getfqdn()}, which looks the host name's address
    up again and takes the first name listed for it: with C{127.0.0.1
    localhost} and C{127.0.0.1 mail} in C{/etc/hosts} (as containers
    write it) that is C{localhost}, and on a cloud machine it is whatever
    the address's reverse record says, the provider's name rather than
    the machine's.

    It may ask the resolver: call it at start-up, never on the reactor
    while it serves.
    """
    name = socket.gethostname()
    try:
        found = socket.getaddrinfo(name, None, flags=socket.AI_CANONNAME)
    except (OSError, UnicodeError):
        return name
    for *_, canonical, _ in found:
        if canonical:
            return canonical
    return name
