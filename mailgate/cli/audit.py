# -*- test-case-name: tests.test_cli_audit -*-
"""
The audit trail of C{mailgate}'s commands: each command that changes
something (users, passwords, quotas, bans, sessions, mail, the database)
sends one line to syslog once it has done so, or once it failed, saying
the command, its target, what it did and who ran it, as Postfix's
C{postsuper} logs each deletion and shadow's C{useradd}, C{userdel} and
C{passwd} each account change.  The server's own log sees only the
effects, with no name of the operator behind them.

The lines are sent as glibc's syslog(3) sends them (RFC 3164 without a
host name, on /dev/log), under the name C{mailgate} and the process id:
account changes (C{user add}, C{del}, C{passwd}, C{apop}, C{rename},
C{import}) to the authpriv facility, where shadow's tools log theirs
(auth.log, readable by administrators only), the others to the mail
facility (mail.log, beside the server's lines and Postfix's); done at
C{notice}, failed at C{warning}.  Not through Python's C{syslog} module:
glibc's send blocks for as long as the syslog daemon takes nothing (a
stuck rsyslog or journald, the socket's queue full), and so would the
command.  Here a line waits at most L{SEND_TIMEOUT} and is then dropped;
no /dev/log (no syslog daemon) drops it at once.  Sending never changes
the command's output or exit status.

A line never holds a password, a hash or a secret: none is part of what
is said, the passwords the command read are blanked wherever an error
would quote them (a POP3 server's refusal may), and so is a URL's.
C{MAILGATE_AUDIT=off} in the environment turns the lines off.
"""

import errno
import os
import re
import socket
import time

from mailgate.printable import printable
from mailgate.urls import shownURL, withoutPassword

#: syslog(3)'s facilities (<syslog.h>)
LOG_MAIL = 2 << 3
LOG_AUTHPRIV = 10 << 3
#: ... and severities: a change made is "normal but significant", one
#: refused or stopped half-way a warning
LOG_NOTICE = 5
LOG_WARNING = 4

#: where glibc's syslog(3) sends its lines
SYSLOG_SOCKET = "/dev/log"
#: how long a line may wait for a syslog daemon that takes nothing
#: (seconds): then it is dropped and the command goes on
SEND_TIMEOUT = 1.0
#: the longest line sent (octets, after the header): a syslog daemon cuts or drops
#: longer ones (rsyslog's default maxMessageSize is 8 KB)
MAX_LINE = 4000
#: the name the lines carry, as useradd's carry useradd
IDENT = "mailgate"

#: C{$MAILGATE_AUDIT} values that turn the lines off
_OFF = ("off", "no", "false", "0")

#: C{scheme://user:password@}, in any text
_URL_PASSWORD = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://[^\s/:@]*):[^\s/@]*@")

#: month names as glibc writes them, in the C locale whatever the user's
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


class Audited:
    """
    What a command that changes something says of itself in its line
    (the C{audit} default of its parser): its name, its target, read from
    its arguments, and its facility.

    @param target: the name of the argument that is its target, or a
        callable that makes the target's text from the arguments, or
        C{None} (a command with no target).
    @param when: a callable telling from the arguments whether this run
        is audited at all (C{deliver} with C{--again} only), or C{None}.
    """

    def __init__(self, command, target=None, facility=LOG_MAIL, when=None):
        self.command = command
        self._target = target
        self.facility = facility
        self._when = when

    def applies(self, args):
        return self._when is None or bool(self._when(args))

    def target(self, args):
        if self._target is None:
            return ""
        if callable(self._target):
            return self._target(args)
        value = getattr(args, self._target, None)
        if isinstance(value, (list, tuple)):
            return " ".join(map(str, value))
        return "" if value is None else str(value)


def account(command, target="address"):
    """
    A command that changes an account (its password, its existence, its
    name): logged to authpriv, as shadow's tools log theirs.
    """
    return Audited(command, target, facility=LOG_AUTHPRIV)


def database(args):
    """
    The target of a C{db} command: the database, without its password.
    """
    return shownURL(args.databaseURL)


def started(args):
    """
    Called as the command starts to work (its options read, its database
    open): from now on, whatever happens is logged.
    """
    audited = getattr(args, "audit", None)
    if audited is not None and audited.applies(args):
        args.auditStarted = True


def outcome(args, text):
    """
    What the command did, for its line: the last said wins.
    """
    args.auditOutcome = text


def secret(args, text):
    """
    A password the command read: blanked in its line wherever an error
    would quote it.
    """
    secrets = getattr(args, "auditSecrets", None)
    if secrets is None:
        secrets = args.auditSecrets = []
    if text:
        secrets.append(text)


def upgraded(args, applied):
    """
    The schema upgrade a command made as it opened an existing database
    (every command does, db backup and db version aside, as a server's
    start does): a line of its own, as db upgrade's, for after it an
    older mailgate no longer uses the database.  Not of a database made
    from nothing (its first migration applied), which the command that
    made it says.  Never raises.
    """
    try:
        if not applied or applied[0].version <= 1 or _off(args):
            return
        from mailgate.plural import noun

        versions = ", ".join(str(migration.version) for migration in applied)
        text = (
            f"admin db upgrade {shownURL(args.databaseURL)}: applied {noun(len(applied), 'migration')} {versions} "
            f"as the database was opened by another command"
        )
        who = _who(getattr(args, "environ", None) or {})
        send(LOG_MAIL | LOG_NOTICE, _printable(f"{_scrubbed(args, text)}; {who}"))
    except Exception:
        pass


def _off(args):
    environ = getattr(args, "environ", None) or {}
    return str(environ.get("MAILGATE_AUDIT", "")).strip().lower() in _OFF


def finish(args, code, error=None):
    """
    Send the command's line, if it is audited and started: done (C{code}
    0), or failed with exit status C{code} and C{error}, what it said on
    standard error.  Never raises, never changes what the command does.
    """
    try:
        if args is None or not getattr(args, "auditStarted", False):
            return
        args.auditStarted = False
        environ = getattr(args, "environ", None) or {}
        if str(environ.get("MAILGATE_AUDIT", "")).strip().lower() in _OFF:
            return
        audited = args.audit
        line, severity = _line(args, audited, code, error)
        send(audited.facility | severity, line)
    except Exception:
        pass


def _line(args, audited, code, error):
    target = audited.target(args)
    head = f"admin {audited.command}{' ' + target if target else ''}"
    said = getattr(args, "auditOutcome", None)
    if code == 0:
        text, severity = said or "done", LOG_NOTICE
    else:
        text = f"{said}; " if said else ""
        # Only what it said on failing may quote a password it read (a
        # POP3 source's refusal): blanked there alone, as a *** in the
        # command's target or outcome would say the password is that word
        # ("admin user add ***@example.org: added" of a password alice).
        text += f"failed (exit {code})" + (f": {_withoutSecrets(args, error)}" if error else "")
        severity = LOG_WARNING
    # Cut once printable, in octets: a non-UTF-8 octet is written in four
    # (\\xNN), and a line cut by the daemon would lose who ran it.
    line = _printable(_scrubbed(args, f"{head}: {text}")).encode("utf-8")
    who = _who(getattr(args, "environ", None) or {})
    room = MAX_LINE - len(who.encode("utf-8")) - 2
    if len(line) > room:
        line = line[: room - 3].decode("utf-8", "ignore").encode("utf-8") + b"..."
    return f"{line.decode('utf-8')}; {who}", severity


def _withoutSecrets(args, text):
    """
    C{text} without the passwords the command read nor its database URL's.
    """
    for password in sorted(getattr(args, "auditSecrets", None) or (), key=len, reverse=True):
        # Only where it stands as a word of its own, as
        # mailgate.urls.withoutPassword does.
        text = re.sub(rf"(?<![A-Za-z0-9]){re.escape(password)}(?![A-Za-z0-9])", "***", text)
    url = getattr(args, "databaseURL", None)
    if url:
        text = withoutPassword(text, url)
    return text


def _scrubbed(args, text):
    """
    C{text} without any URL's password.
    """
    return _URL_PASSWORD.sub(r"\1:***@", text)


def _printable(text):
    """
    One line: what is not printable (a line break in a file's name would
    start a forged line) as C{?}, octets that were not UTF-8 as C{\\xNN}.
    """
    return printable(text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace"))


def _word(text):
    return "".join(c if c.isprintable() and not c.isspace() else "?" for c in str(text))


def _userName(uid):
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except (KeyError, OverflowError):
        return str(uid)


def _loginUser():
    """
    The user who logged in to the session the command runs in (the audit
    login uid, which C{su} and C{sudo} keep), or C{None} where unknown.
    """
    try:
        with open("/proc/self/loginuid") as f:
            uid = int(f.read().strip())
    except (OSError, ValueError):
        return None
    if uid in (-1, 0xFFFFFFFF):
        return None
    return _userName(uid)


def _who(environ):
    """
    Who ran the command: the Unix user (C{by=}), and where known the
    user C{sudo} ran it for (C{sudo_user=}) and the user logged in
    (C{login_user=}, after C{su}), each named once.
    """
    name = _userName(os.getuid())
    parts = [f"by={_word(name)}"]
    named = {name}
    sudo = environ.get("SUDO_USER")
    if sudo:
        parts.append(f"sudo_user={_word(sudo)}")
        named.add(sudo)
    login = _loginUser()
    if login is not None and login not in named:
        parts.append(f"login_user={_word(login)}")
    return " ".join(parts)


def _stamp(now):
    moment = time.localtime(now)
    clock = f"{moment.tm_hour:02d}:{moment.tm_min:02d}:{moment.tm_sec:02d}"
    return f"{_MONTHS[moment.tm_mon - 1]} {moment.tm_mday:2d} {clock}"


def send(priority, line, path=None, timeout=SEND_TIMEOUT):
    """
    Send C{line} to the syslog daemon at C{path} (/dev/log) as glibc's
    syslog(3) does: C{<PRI>Mmm dd hh:mm:ss mailgate[PID]: line}, one
    datagram (or, on a stream socket, the line and a NUL).  Waits at
    most C{timeout} seconds.

    @return: whether it was sent.
    """
    path = SYSLOG_SOCKET if path is None else path
    data = f"<{priority}>{_stamp(time.time())} {IDENT}[{os.getpid()}]: {line}".encode("utf-8", "replace")
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        sock = socket.socket(socket.AF_UNIX, kind)
        try:
            sock.settimeout(timeout)
            try:
                sock.connect(path)
            except OSError as e:
                if kind == socket.SOCK_DGRAM and e.errno == errno.EPROTOTYPE:
                    continue
                return False
            if kind == socket.SOCK_DGRAM:
                sock.send(data)
            else:
                sock.sendall(data + b"\0")
            return True
        except OSError:
            return False
        finally:
            sock.close()
    return False
