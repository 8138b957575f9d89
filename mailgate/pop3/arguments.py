# -*- test-case-name: tests.test_pop3_protocol -*-
"""
Parsing POP3 command arguments.  Each function raises
L{mailgate.session.CommandError}, whose text is the C{-ERR} reason.
"""

import re

from mailgate.session import CommandError

# Any number of digits, leading zeros included (RFC 1939 does not forbid
# them): a number past the maildrop is "no such message" however long.
# The command line's 255 octets bound what int() converts.
_DIGITS = re.compile(r"[0-9]+\Z")


def noArguments(argument):
    """
    Refuse an argument to a command that takes none.  Spaces after the
    command are forgiven, as around a message number; other white space
    (a tab, a no-break space, U+0085) is an argument: C{QUIT\\t} was
    refused while C{QUIT \\t} applied the session's deletions.
    """
    if argument.strip(" "):
        raise CommandError("this command takes no arguments")


def number(text, what="message number"):
    if not _DIGITS.match(text):
        raise CommandError(f"invalid {what}: {ascii(text[:20])}" if text else f"missing {what}")
    return int(text)


def lineCount(text):
    """
    TOP's count of body lines: any count, however large (RFC 1939: more
    lines than the body has sends the whole message).
    """
    if not text.isascii() or not text.isdigit():
        raise CommandError(f"invalid line count: {ascii(text[:20])}" if text else "missing line count")
    return int(text)


def arguments(argument, count, names):
    """
    Exactly C{count} arguments separated by spaces.  Spaces before, between
    and after them are forgiven, as around the message number of LIST or
    RETR (and as Dovecot forgives them: C{TOP 1  2}); other white space
    (a tab, a no-break space) stays in the argument, which then is not a
    number.
    """
    parts = [part for part in argument.split(" ") if part]
    if len(parts) != count:
        raise CommandError(f"expected: {names}")
    return parts
