# -*- test-case-name: tests.test_pgrefusal -*-
"""
The values of a C{postgresql://} URL's connection parameters, checked as
libpq checks them, before connecting.

libpq reads a URL's syntax and parameter names before it connects (what
it cannot read is a C{ProgrammingError}, a refusal: exit 78), but an
invalid value of a parameter (a port past 65535, C{sslmode=requir}) only
as it connects, and says so as it says "server not reachable": a start
exited 75 (C{EX_TEMPFAIL}), which the systemd unit retries every two
seconds for ever, where nothing but the URL can change.
"""

import os
import re
import ssl
import stat
from urllib.parse import parse_qsl, urlsplit

from psycopg import Error
from psycopg.conninfo import conninfo_to_dict

#: libpq's parameters whose values are one of a few words
CHOICES = {
    "sslmode": ("disable", "allow", "prefer", "require", "verify-ca", "verify-full"),
    "gssencmode": ("disable", "prefer", "require"),
    "channel_binding": ("disable", "prefer", "require"),
    "target_session_attrs": ("any", "read-write", "read-only", "primary", "standby", "prefer-standby"),
}
#: the environment variables libpq takes the parameters checked here
#: from, where the URL gives none
ENVIRONMENT = {
    "port": "PGPORT",
    "sslmode": "PGSSLMODE",
    "gssencmode": "PGGSSENCMODE",
    "channel_binding": "PGCHANNELBINDING",
    "target_session_attrs": "PGTARGETSESSIONATTRS",
    "sslrootcert": "PGSSLROOTCERT",
    "sslcert": "PGSSLCERT",
    "sslkey": "PGSSLKEY",
    "sslcertmode": "PGSSLCERTMODE",
}
#: the sslmodes that check the server's certificate against a root
#: certificate file, which libpq refuses to connect without
VERIFYING = ("verify-ca", "verify-full")
#: libpq's parameters whose values are whole numbers (not connect_timeout:
#: mailgate gives its own to every connection, which replaces the URL's)
NUMBERS = ("keepalives", "keepalives_idle", "keepalives_interval", "keepalives_count", "tcp_user_timeout")


def parameterProblem(conninfo):
    """
    What libpq would refuse in C{conninfo} or the values of its
    parameters, or C{None}.  The text names a parameter and its value,
    never the password's.  What libpq cannot read at all (an unknown
    parameter, a bad C{%} escape, white space before the scheme) is its
    own parse error, without the password (L{mailgate.urls.withoutPassword}):
    C{None} there had C{config --check} say "configuration OK" of a URL
    the server then refused at its start.
    """
    scheme, separator, rest = conninfo.partition("://")
    if separator and rest[: min((i for i in map(rest.find, "/?#") if i >= 0), default=len(rest))].count("@") > 1:
        # libpq takes what follows the first "@" for the host: a password
        # holding one is read as another host name, part of the password
        # in it, which its error then quotes.
        return "an '@' in the user name or password (write it %40: libpq takes what follows the first '@' for the host)"
    try:
        parameters = conninfo_to_dict(conninfo)
    except Error as e:
        from mailgate.urls import withoutPassword

        return withoutPassword(" ".join(str(e).split()), conninfo)
    # What the URL does not give, libpq takes from the environment (the
    # systemd unit's Environment=, say), and refuses there the same way;
    # but from a service file first (service=, PGSERVICE), not read here.
    given = {}
    service = "service" in parameters or "PGSERVICE" in os.environ
    for name, variable in ENVIRONMENT.items():
        if not service and name not in parameters and variable in os.environ:
            parameters[name] = os.environ[variable]
            given[name] = f"{variable} in the environment; "
    # Several hosts have a port each, comma-separated; an empty one is the
    # default port.
    for port in parameters.get("port", "").split(","):
        if port and not 1 <= (_integer(port) or 0) <= 65535:
            return f"invalid port {port!r} ({given.get('port', '')}a number from 1 to 65535)"
    for name, choices in CHOICES.items():
        value = parameters.get(name)
        if value is not None and value not in choices:
            return f"invalid {name} {value!r} ({given.get(name, '')}one of {', '.join(choices)})"
    for name in NUMBERS:
        value = parameters.get(name)
        if value is not None and _integer(value) is None:
            return f"invalid {name} {value!r} (a whole number)"
    if not service and parameters.get("sslmode") in VERIFYING + ("require",):
        return _unusableRootCertificate(parameters, given) or _unusableClientKey(parameters, given)
    return None


def _unusableRootCertificate(parameters, given):
    """
    What libpq would say of a root certificate file that does not exist,
    or that it cannot use, with an C{sslmode} that checks the server's
    certificate against it (C{sslrootcert}, else
    C{~/.postgresql/root.crt} of the user running mailgate; C{require}
    checks against the file only where there is one), or C{None}.
    libpq says it before connecting, in the words of any failure to
    connect: a node whose URL names a CA file not installed (or not where
    the user running it looks) exited 75, and the systemd unit started it
    again every two seconds for ever.  So did one the service's user may
    not read (installed mode 600 as root: libpq's words then end with
    "could not read root certificate file ...:" and no reason), a
    directory, or a file without a certificate (the key, say).
    """
    path = parameters.get("sslrootcert")
    if path is None:
        path = os.path.join(os.path.expanduser("~"), ".postgresql", "root.crt")
        where = f"no sslrootcert in the URL, so libpq's default for the user running mailgate, {path}"
    elif path == "system":
        # libpq 16 on: the system's own trusted roots.
        return None
    else:
        where = f"{given.get('sslrootcert', '')}sslrootcert {path!r}"
    mode = parameters["sslmode"]
    if not os.path.exists(path):
        if mode not in VERIFYING:
            # require checks the certificate only against a file there is.
            return None
        return (
            f"no root certificate file: sslmode {mode} checks the server's certificate "
            f"against one, and {where} does not exist"
        )
    problem = _rootCertificateProblem(path)
    if problem is None:
        return None
    against = "against one" if mode in VERIFYING else "against one where there is one"
    return f"unusable root certificate file: sslmode {mode} checks the server's certificate {against}, and {where} {problem}"


def _unusableClientKey(parameters, given):
    """
    What libpq would refuse of the private key of a client certificate it
    sends (C{sslcert}, else C{~/.postgresql/postgresql.crt}, where that
    file exists), or C{None}: no key file (C{sslkey}, else
    C{~/.postgresql/postgresql.key}), or one others may read.  libpq says
    it as it connects, in the words of any failure to connect: exit 75,
    and the systemd unit restarted the node for ever.  (With C{sslmode}
    C{prefer} or C{allow}, libpq goes on without TLS instead.)
    """
    if parameters.get("sslcertmode") == "disable":
        return None
    home = os.path.join(os.path.expanduser("~"), ".postgresql")
    certificate = parameters.get("sslcert") or os.path.join(home, "postgresql.crt")
    if not os.path.isfile(certificate):
        return None
    key = parameters.get("sslkey")
    if key and ":" in key:
        # An OpenSSL engine's key (engine:name), not a file.
        return None
    if key:
        where = f"{given.get('sslkey', '')}sslkey {key!r}"
    else:
        key = os.path.join(home, "postgresql.key")
        where = f"no sslkey in the URL, so libpq's default for the user running mailgate, {key}"
    lead = f"unusable client certificate: libpq sends {certificate}, and {where}"
    try:
        status = os.stat(key)
    except FileNotFoundError:
        return f"{lead} does not exist (its private key)"
    except OSError as e:
        return f"{lead} cannot be read ({e.strerror})"
    if not stat.S_ISREG(status.st_mode):
        return f"{lead} is not a file"
    mode = stat.S_IMODE(status.st_mode)
    # libpq's rule: owned by root, 0640 or less (a group of the key's
    # readers); owned by anyone else, 0600 or less.
    if mode & (0o037 if status.st_uid == 0 else 0o077):
        return (
            f"{lead} may be read by others (mode {mode:04o}), which libpq refuses: chmod 600 it "
            f"(or 640, owned by root)"
        )
    return None


def _rootCertificateProblem(path):
    """
    Why libpq could not load the root certificates in the file C{path},
    which exists, or C{None}.  It is read as libpq reads it, by OpenSSL's
    C{load_verify_locations}: PEM certificates (or CRLs), at least one.
    """
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=path)
    except IsADirectoryError:
        return "is a directory (sslrootcert names a file of PEM certificates)"
    except PermissionError as e:
        from mailgate.owners import ownerName

        return f"may not be read by the user running mailgate, {ownerName(os.geteuid())} ({e.strerror})"
    except ssl.SSLError:
        return "holds no certificate (a file of PEM certificates: -----BEGIN CERTIFICATE-----)"
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    return None


#: the white space C's isspace() skips, as libpq's number parsing does
_C_SPACE = " \t\n\v\f\r"
#: a whole number as C's strtol() reads it in base 10: a sign, ASCII digits
_C_INTEGER = re.compile(r"[+-]?[0-9]+")


def _integer(text):
    """
    C{text} as libpq reads a whole-number parameter (its
    C{parse_int_param}: strtol in base 10, white space allowed before and
    after, a C int), or C{None} where libpq refuses it.  Stricter than
    libpq (C{str.isdigit} and no white space or sign), a port of
    C{" 5432"} or C{"+5432"}, which libpq connects with, was refused.
    """
    text = text.strip(_C_SPACE)
    if not _C_INTEGER.fullmatch(text):
        return None
    number = int(text)
    return number if -(2**31) <= number < 2**31 else None


#: the port libpq connects to where nothing names one
DEFAULT_PORT = "5432"


def shownWhere(url):
    """
    Where the PostgreSQL URL C{url} connects, as errors and the start-up
    log name it, without its user and password: the host and a port other
    than libpq's default, or the Unix socket's directory (C{?host=/run/pg},
    its port too), or neither (libpq's default socket, not C{localhost}'s
    TCP port); several servers each with their port, as written.  An
    administrator running several clusters on one host tells them apart
    by the port: C{postgresql://127.0.0.1/mg} said nothing of which.
    """
    parts = urlsplit(url)
    hosts = parts.netloc.rpartition("@")[2]
    if "," in hosts:
        # Several servers (a primary and its standbys): each named, with
        # its port, not the first alone (urlsplit's hostname), which a
        # failure to reach the second was reported as.
        return f"postgresql://{hosts}{parts.path}"
    query = dict(parse_qsl(parts.query))
    host = parts.hostname or query.get("host", "")
    written = hosts.rpartition("]")[2] if hosts.startswith("[") else hosts
    port = written.rpartition(":")[2] if ":" in written else query.get("port", "")
    if port == DEFAULT_PORT:
        port = ""
    if host.startswith("/"):
        return f"postgresql://{parts.path}?host={host}" + (f"&port={port}" if port else "")
    if ":" in host:
        host = f"[{host}]"
    return f"postgresql://{host}{':' + port if port else ''}{parts.path}"
