# -*- test-case-name: tests.test_tap -*-
"""
C{twistd mailgate}: command-line options and the service maker.

Parsing has no side effects (no reactor, no database): L{Options} only
checks and collects; L{makeService} opens the store and builds the services.
"""

import os

from twisted.internet.endpoints import serverFromString
from twisted.internet.testing import MemoryReactor
from twisted.python import usage

from mailgate.errors import ConfigurationError
from mailgate.policy import settings as policyDefaults
from mailgate.policy.addresses import DEFAULT_EXEMPT_NETWORKS
from mailgate.pop3.factory import DEFAULT_TRUSTED_NETWORKS
from mailgate.service import DEFAULT_POP3, MailgateConfig, makeService as _makeService
from mailgate.store import DEFAULT_DATABASE, engineFromURL


def _checkEndpoint(description):
    """
    Parse an endpoint description against a reactor that never listens,
    so that typos are reported while parsing options.
    """
    try:
        serverFromString(MemoryReactor(), description)
    except Exception as e:
        raise usage.UsageError(f"invalid endpoint {description!r}: {e}")
    return description


def _positive(kind):
    def convert(value):
        try:
            number = kind(value)
        except ValueError:
            raise ValueError(f"not a number: {value!r}")
        if number < 0:
            raise ValueError(f"must not be negative: {value!r}")
        return number

    return convert


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "mailgate serves POP3 from a database of maildrops (embedded SQLite "
        "by default) and takes mail in over SMTP and LMTP.  Listeners are "
        "Twisted strports descriptions, e.g. "
        "tcp:110, tcp:1110:interface=127.0.0.1, "
        "ssl:995:privateKey=key.pem:certKey=cert.pem, "
        "unix:/run/mailgate/lmtp, systemd:domain=INET:index=0."
    )

    optFlags = [
        ["no-apop", None, "Never offer APOP: no timestamp in the greeting."],
        [
            "apop",
            None,
            "Always offer APOP.  Default: offer it (a timestamp in the greeting) "
            "only while some user has APOP enabled.",
        ],
    ]
    optParameters = [
        [
            "database",
            None,
            None,
            "Database URL: sqlite:///FILE (relative), sqlite:////ABSOLUTE/FILE "
            "or postgresql://USER@HOST/DB.  Default: $MAILGATE_DATABASE, "
            f"else {DEFAULT_DATABASE}.",
        ],
        [
            "hostname",
            None,
            None,
            "Host name used in greetings and in the APOP timestamp "
            "(default: this machine's fully qualified name).",
        ],
        [
            "auth-failure-delay",
            None,
            1.0,
            "Seconds to wait before answering a failed login (the same for an "
            "unknown user and a wrong password; other sessions are not held up).",
            _positive(float),
        ],
        [
            "idle-timeout",
            None,
            600,
            "Seconds of inactivity before a POP3 session is logged out "
            "(RFC 1939: at least 600).",
            _positive(int),
        ],
        [
            "login-delay",
            None,
            None,
            "Minimum seconds between two logins of the same user; advertised "
            "as LOGIN-DELAY (RFC 2449).  Default: no limit.",
            _positive(int),
        ],
        [
            "max-message-size",
            None,
            50 * 1024 * 1024,
            "Largest message SMTP and LMTP accept, in octets (advertised as SIZE).",
            _positive(int),
        ],
        [
            "max-recipients",
            None,
            100,
            "Most recipients in one SMTP or LMTP transaction (RFC 5321 asks for at least 100).",
            _positive(int),
        ],
        [
            "tls-cert",
            None,
            None,
            "PEM file with the server certificate, optionally followed by its "
            "chain.  With --tls-key, enables STLS, STARTTLS and --pop3s; "
            "SIGHUP reloads both files.",
        ],
        ["tls-key", None, None, "PEM file with the private key of --tls-cert."],
        [
            "max-connections",
            None,
            policyDefaults.MAX_CONNECTIONS,
            "Most connections (POP3, SMTP and LMTP together) served at once; "
            "more are refused with -ERR [SYS/TEMP] / 421 4.7.0.  0 for no limit.",
            _positive(int),
        ],
        [
            "max-connections-per-ip",
            None,
            policyDefaults.MAX_CONNECTIONS_PER_ADDRESS,
            "Most connections from one client address (the real one behind a "
            "haproxy: listener), except from --exempt-network.  0 for no limit.",
            _positive(int),
        ],
        [
            "auth-penalty-max",
            None,
            policyDefaults.AUTH_PENALTY_MAX,
            "After failed logins from an address (or against one name from many "
            "addresses), its next login waits 2 seconds, doubling per failure, at "
            "most this many seconds.  0 turns the growing delay off.",
            _positive(float),
        ],
        [
            "ban-after",
            None,
            policyDefaults.BAN_AFTER,
            "Ban a client address at its Nth failed login within --ban-window "
            "(counted across every node on the database).  0 for no bans.",
            _positive(int),
        ],
        [
            "ban-window",
            None,
            policyDefaults.BAN_WINDOW,
            "Seconds over which failed logins are counted.",
            _positive(int),
        ],
        [
            "ban-time",
            None,
            policyDefaults.BAN_TIME,
            "Seconds a ban lasts (see also: mailgate ban list|add|del).",
            _positive(int),
        ],
    ]

    def __init__(self):
        super().__init__()
        self["pop3"] = []
        self["smtp"] = []
        self["lmtp"] = []
        self["domain"] = []
        self["pop3s"] = []
        self["trusted-network"] = []
        self["exempt-network"] = []

    def opt_pop3s(self, description):
        """
        A POP3 listener with implicit TLS from the first byte (e.g. tcp:995),
        using --tls-cert and --tls-key; repeat for several.
        """
        self["pop3s"].append(_checkEndpoint(description))

    def opt_trusted_network(self, cidr):
        """
        A network (CIDR) from which plaintext passwords (USER/PASS, AUTH
        PLAIN) are accepted without TLS; repeat for several.  Default:
        127.0.0.0/8 and ::1/128.  Elsewhere plaintext logins need TLS.
        """
        import ipaddress

        try:
            self["trusted-network"].append(str(ipaddress.ip_network(cidr, strict=False)))
        except ValueError as e:
            raise usage.UsageError(f"invalid --trusted-network {cidr!r}: {e}")

    def opt_exempt_network(self, cidr):
        """
        A network (CIDR) never penalised, banned or limited per address
        (webmail, monitoring); repeat for several.  Default: 127.0.0.0/8 and
        ::1/128; giving the option replaces the default, and "none" exempts
        nothing.
        """
        from mailgate.policy.addresses import NO_NETWORKS, parseNetworks

        try:
            networks = parseNetworks(self["exempt-network"] + [cidr])
        except ValueError as e:
            raise usage.UsageError(f"invalid --exempt-network {cidr!r}: {e}")
        self["exempt-network"] = [str(n) for n in networks] or [NO_NETWORKS]

    def opt_pop3(self, description):
        """
        A POP3 listener, as a strports description; repeat for several.
        Default: tcp:1110:interface=127.0.0.1.
        """
        self["pop3"].append(_checkEndpoint(description))

    def opt_smtp(self, description):
        """
        An SMTP listener (e.g. tcp:2525:interface=127.0.0.1); repeat for
        several.  Default: none.
        """
        self["smtp"].append(_checkEndpoint(description))

    def opt_lmtp(self, description):
        """
        An LMTP listener, for an MTA such as Postfix (e.g.
        unix:/run/mailgate/lmtp or tcp:2424:interface=127.0.0.1); repeat for
        several.  Default: none.
        """
        self["lmtp"].append(_checkEndpoint(description))

    def opt_domain(self, name):
        """
        A domain SMTP and LMTP accept mail for; repeat for several.
        Default: the domains of existing users.
        """
        from mailgate.address import normalizeDomain
        from mailgate.errors import InvalidAddress

        try:
            self["domain"].append(normalizeDomain(name))
        except InvalidAddress as e:
            raise usage.UsageError(str(e))

    def postOptions(self):
        if self["database"] is None:
            self["database"] = os.environ.get("MAILGATE_DATABASE") or DEFAULT_DATABASE
        try:
            engineFromURL(self["database"])
        except ConfigurationError as e:
            raise usage.UsageError(str(e))
        if not self["pop3"]:
            self["pop3"] = [DEFAULT_POP3]
        if self["apop"] and self["no-apop"]:
            raise usage.UsageError("--apop and --no-apop contradict each other")
        if (self["tls-cert"] is None) != (self["tls-key"] is None):
            raise usage.UsageError("--tls-cert and --tls-key go together")
        if self["pop3s"] and self["tls-cert"] is None:
            raise usage.UsageError("--pop3s needs --tls-cert and --tls-key")
        if self["max-message-size"] < 1:
            raise usage.UsageError("--max-message-size must be at least 1")
        if self["max-recipients"] < 1:
            raise usage.UsageError("--max-recipients must be at least 1")
        if self["hostname"] is not None and not self["hostname"].strip():
            raise usage.UsageError("--hostname must not be empty")
        for name in ("ban-window", "ban-time"):
            if self[name] < 1:
                raise usage.UsageError(f"--{name} must be at least 1")

    def toConfig(self):
        return MailgateConfig(
            database=self["database"],
            pop3=list(self["pop3"]),
            smtp=list(self["smtp"]),
            lmtp=list(self["lmtp"]),
            domains=list(self["domain"]) or None,
            maxMessageSize=self["max-message-size"],
            maxRecipients=self["max-recipients"],
            pop3s=list(self["pop3s"]),
            tlsCertificate=self["tls-cert"],
            tlsKey=self["tls-key"],
            trustedNetworks=list(self["trusted-network"]) or list(DEFAULT_TRUSTED_NETWORKS),
            reloadOnSIGHUP=True,
            hostname=self["hostname"],
            apop=False if self["no-apop"] else (True if self["apop"] else "auto"),
            authFailureDelay=self["auth-failure-delay"],
            idleTimeout=self["idle-timeout"],
            loginDelay=self["login-delay"],
            maxConnections=self["max-connections"],
            maxConnectionsPerAddress=self["max-connections-per-ip"],
            authPenaltyMax=self["auth-penalty-max"],
            banAfter=self["ban-after"],
            banWindow=self["ban-window"],
            banTime=self["ban-time"],
            exemptNetworks=list(self["exempt-network"]) or list(DEFAULT_EXEMPT_NETWORKS),
        )


def raiseFileLimit():
    """
    Raise this process's soft limit on open files to its hard limit: every
    session is a file descriptor, and the usual soft limit of 1024 would cap
    a mail server at about a thousand concurrent sessions.

    @return: the new soft limit, or C{None} if it could not be read.
    """
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard != resource.RLIM_INFINITY and soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        return soft
    except (ImportError, ValueError, OSError):
        return None


def makeService(options):
    """
    The service for C{twistd mailgate}.  Configuration errors, found now or
    when the listeners start, end the process with a one-line message.
    """
    raiseFileLimit()
    try:
        service = _makeService(options.toConfig())
    except ConfigurationError as e:
        raise SystemExit(f"mailgate: {e}")
    service.exitOnStartupError = True
    parent = getattr(options, "parent", None)
    service.daemonized = parent is not None and not parent.get("nodaemon", False)
    return service
