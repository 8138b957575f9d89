# -*- test-case-name: tests.test_config -*-
"""
mailgate's settings, each declared once.

Every setting of C{twistd mailgate} is one L{Setting} in L{SETTINGS}: its
long option name (which is also its key in a configuration file), the
attribute of L{MailgateConfig} it fills, its default, the L{Kind} of value
it takes (which reads and checks the value from the command line and from
TOML alike) and its help text.  From that one list come:

  - L{MailgateConfig}, the configuration the service is built from (an
    embedding application constructs it directly);
  - the options of C{twistd mailgate} (L{mailgate.tap.Options});
  - the configuration file, C{--config PATH}, read by L{readFile};
  - the commented example file C{contrib/mailgate.toml}
    (L{exampleFile}; C{python -m mailgate.config} prints it, and a test
    checks the shipped copy against it).

Adding an option is adding one L{Setting} to L{SETTINGS} (then
regenerating the example file).  Checks that involve several settings
(TLS) live in L{checkConfig}, the one place they are made.

Precedence: the command line, then the configuration file, then a
setting's environment variable (C{$MAILGATE_DATABASE}), then the default.
"""

import codecs
import difflib
import enum
import ipaddress
import json
import math
import os
import re
import socket
import stat
import sys
import textwrap
import tomllib

import attr
from twisted.internet.endpoints import serverFromString

from mailgate.address import MASTER_SEPARATORS, asciiDomain, normalizeDomain, userAddress
from mailgate.affinity import formatCPUs, parseCPUs
from mailgate.auth.oauth import ALGORITHMS as _JWT_ALGORITHMS
from mailgate.auth.oauth import DEFAULT_ALGORITHMS as _JWT_DEFAULT_ALGORITHMS
from mailgate.errors import ConfigurationError, InvalidAddress
from mailgate.memory import TRIM_INTERVAL
from mailgate.owners import ownerName
from mailgate.plural import counted
from mailgate.policy import settings as _policy
from mailgate.policy.addresses import DEFAULT_EXEMPT_NETWORKS, NO_NETWORKS
from mailgate.pop3.factory import DEFAULT_GREETING, DEFAULT_TRUSTED_NETWORKS, APOPAdvertiser
from mailgate.pop3.protocol import POP3Server
from mailgate.pop3.workarounds import parseWorkarounds
from mailgate.session.proxy import DEFAULT_BALANCER_NETWORKS
from mailgate.smtp.factory import EVERY_NETWORK, coversEveryAddress
from mailgate.smtp.policyservice import DEFAULT_NETWORKS as _QUOTA_STATUS_NETWORKS
from mailgate.smtp.policyservice import DUNNO, checkAction
from mailgate.smtp.policyservice import MAX_CONNECTIONS as _QUOTA_STATUS_MAX_CONNECTIONS
from mailgate.smtp.envelope import DELIVERED_TO
from mailgate.smtp.protocol import SMTPServer
from mailgate.store import DEFAULT_DATABASE, engineFromURL
# ZERO_DAYS and ZERO_QUOTA: why a retention of 0 days and a quota of 0 are
# refused, words the mailgate command says too, which imports them from
# there without this module's (and its protocols').
from mailgate.store.bounds import MAX_DAYS, ZERO_DAYS, ZERO_QUOTA, checkMaximum, formatSize, parseSize, parseWhole
from mailgate.store.limits import DAY, DUPLICATE_WINDOW
from mailgate.tls import CIPHERS, MINIMUM_VERSIONS, TICKET_KEY_ROTATION
from mailgate.urls import shownURL


# -- kinds of values -------------------------------------------------------


class Kind:
    """
    How one kind of value is read, from command-line text or from a TOML
    value, and checked.  Each method raises L{ValueError} with a message
    (no newline) saying what is wrong.

    @cvar metavar: the placeholder in help texts.
    @cvar expected: what a TOML value must be, for error messages.
    @cvar tomlTypes: the Python types a TOML value of this kind may have.
    """

    metavar = "TEXT"
    expected = "a string"
    tomlTypes = (str,)

    def fromText(self, text):
        """
        The value of command-line C{text}.
        """
        return self.check(text)

    def fromTOML(self, value):
        """
        The value of a TOML value (already parsed by L{tomllib}).
        """
        if isinstance(value, bool) and bool not in self.tomlTypes:
            raise ValueError(f"expected {self.expected}, got {_shown(value)}")
        if not isinstance(value, self.tomlTypes):
            raise ValueError(f"expected {self.expected}, got {_shown(value)}")
        return self.check(value)

    def check(self, value):
        """
        Check (and normalise) a value of the right type.
        """
        return value

    def checkList(self, values):
        """
        Check the values of a repeated setting together (each one is
        checked already): for what is wrong only in company.
        """
        return values

    def toTOML(self, value):
        """
        C{value} written as TOML (for the example file).
        """
        return json.dumps(value, ensure_ascii=False)


def _shown(value, secret=False):
    """
    A TOML value as an error message shows it: the value and its type, or
    with C{secret} (a value that may hold a password) its type alone.
    """
    names = {bool: "boolean", int: "integer", float: "float", str: "string", list: "array", dict: "table"}
    kind = names.get(type(value), type(value).__name__)
    if secret:
        return f"an {kind}" if kind[0] in "aeiou" else f"a {kind}"
    text = json.dumps(value, default=str) if not isinstance(value, dict) else "{...}"
    return f"{_shortText(text)} ({kind})"


class Text(Kind):
    """
    Any non-blank text.
    """

    def __init__(self, metavar="TEXT"):
        self.metavar = metavar

    def check(self, value):
        if not value.strip():
            raise ValueError("must not be empty")
        return value


class Line(Text):
    """
    Non-blank text for one protocol line: no control characters (no CR or
    LF that would end the line early), at most C{maximum} characters.
    """

    def __init__(self, maximum, metavar="TEXT"):
        super().__init__(metavar)
        self.maximum = maximum

    def check(self, value):
        value = super().check(value)
        if any(ord(c) < 32 or ord(c) == 127 for c in value):
            raise ValueError("must not contain control characters (such as a line break)")
        if len(value) > self.maximum:
            raise ValueError(f"must be at most {self.maximum} characters, not {len(value)}")
        return value


class Greeting(Line):
    """
    The POP3 greeting's text: a L{Line} of at most C{maximum} octets in
    UTF-8 (the whole greeting, APOP timestamp included, stays within RFC
    1939's 512 octets), without angle brackets: clients take the first
    C{<...>} of the greeting for its APOP timestamp (fetchmail the first,
    Python's poplib everything from the first C{<} to the last C{>}), so
    one in the text would make every APOP login fail.
    """

    def check(self, value):
        value = super().check(value)
        octets = len(value.encode("utf-8"))
        if octets > self.maximum:
            raise ValueError(f"must be at most {self.maximum} octets in UTF-8, not {octets}")
        if "<" in value or ">" in value:
            raise ValueError("must not contain < or > (clients would take them for the APOP timestamp)")
        return value


class ClientWorkarounds(Kind):
    """
    Names of Dovecot's C{pop3_client_workarounds}
    (L{mailgate.pop3.workarounds.KNOWN}), separated by spaces or commas,
    as Dovecot writes them (or, in a file, an array of names): a tuple of
    the names in Dovecot's order, or C{None} for none.
    """

    metavar = "NAMES"
    expected = 'workaround names (a string such as "outlook-no-nuls oe-ns-eoh", or an array of them)'
    tomlTypes = (str, list)

    def check(self, value):
        return parseWorkarounds(value) or None

    @classmethod
    def of(cls, value):
        """
        What an embedder's C{MailgateConfig(pop3ClientWorkarounds=...)}
        gives (a string, a list of names, or C{None}), as a setting's
        value.
        """
        return None if value is None else cls().check(value)

    def toTOML(self, value):
        return json.dumps(value if isinstance(value, str) else " ".join(value))


class CertificatePair(Text):
    """
    A certificate file and its key file, as C{CERT:KEY}, optionally
    followed by an alternative certificate and its key (of another type
    of key, as tls-alt-cert beside tls-cert), as C{CERT:KEY:ALTCERT:ALTKEY}.
    """

    metavar = "CERT:KEY[:ALTCERT:ALTKEY]"

    def __init__(self):
        pass

    def check(self, value):
        value = super().check(value)
        if not all(part.strip() for part in splitCertificatePair(value)):
            raise ValueError("must be a certificate file and its key file, as CERT:KEY (or CERT:KEY:ALTCERT:ALTKEY)")
        return value


def splitCertificatePair(value):
    """
    C{(certificatePath, keyPath)} of a L{CertificatePair} value, or
    C{(certificatePath, keyPath, altCertificatePath, altKeyPath)} where it
    has four parts.  A value of two parts may have colons in its
    certificate's path (the key's is after the last); one of four, none.
    """
    if value.count(":") == 3:
        return tuple(value.split(":"))
    certificate, _, key = value.rpartition(":")
    return certificate, key


#: The largest whole number any setting takes unless it says less: what
#: a database's 64-bit integers hold (and far more than any count or
#: number of seconds means), so that no value fails later, where it is used.
MAX_INTEGER = (1 << 63) - 1

#: The longest delay, timeout or interval a setting in seconds takes
#: unless it says otherwise: a week.  Past that no value means anything
#: a mail server does (Dovecot's and Postfix's timeouts and delays are
#: seconds to hours) but a mistake: --auth-failure-delay 1e300 held each
#: failed login's connection open for good (and a stop for its whole
#: grace), --login-delay 9223372036854775807 was advertised as it is and
#: let each user log in once, ever.
MAX_SECONDS = 7 * 24 * 3600


class Integer(Kind):
    """
    A whole number, at least C{minimum} and at most C{maximum}.
    """

    tomlTypes = (int,)

    def __init__(self, minimum=0, metavar="N", maximum=MAX_INTEGER):
        self.minimum = minimum
        self.maximum = maximum
        self.metavar = metavar
        self.expected = f"a whole number of at least {minimum}"

    def fromText(self, text):
        return self.check(parseWhole(text, self.maximum))

    def check(self, value):
        if isinstance(value, float) and not math.isfinite(value):
            # Only an embedder's MailgateConfig(...) gives a float here; nan
            # compares false with both bounds.
            raise ValueError(f"not a finite number: {value}")
        if isinstance(value, float) and not value.is_integer():
            # Nor one with a fraction, which the command line and the file
            # refuse: --login-delay 300.5 would be advertised as
            # LOGIN-DELAY 300.5, --expire-days as EXPIRE 1.5 (RFC 2449:
            # whole numbers).
            raise ValueError(f"not a whole number: {value}")
        if value < self.minimum:
            raise ValueError(f"must be at least {self.minimum}, not {value}")
        return checkMaximum(value, self.maximum)


# A number as settings are written: ASCII digits, a point, an exponent.
_DECIMAL = re.compile(r"\s*[+-]?([0-9]{1,30}(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]{1,3})?\s*\Z", re.ASCII)


class Number(Kind):
    """
    A finite number (a whole number is taken as it is), at least
    C{minimum} and at most C{maximum} (L{MAX_SECONDS}: a number is a
    number of seconds).
    """

    tomlTypes = (int, float)

    def __init__(self, minimum=0, metavar="SECONDS", maximum=MAX_SECONDS):
        self.minimum = minimum
        self.maximum = maximum
        self.metavar = metavar
        self.expected = f"a number of at least {minimum}"

    def fromText(self, text):
        # float() would also take "1_0", other scripts' digits and "nan".
        if _DECIMAL.match(text) is None:
            raise ValueError(f"not a number: {text[:30]!r}")
        return self.check(float(text.strip()))

    def check(self, value):
        try:
            number = float(value)
        except OverflowError:
            # A TOML integer past a float's range (310 digits and more),
            # which math.isfinite() would raise on too.
            raise ValueError("too large: a number of more than 308 digits") from None
        if not math.isfinite(number):
            raise ValueError(f"not a finite number: {value}")
        if isinstance(value, float) and value.is_integer() and abs(value) < 1e16:
            value = int(value)  # shown as written: 604801, not 604801.0
        if number < self.minimum:
            raise ValueError(f"must be at least {self.minimum}, not {value}")
        if number > self.maximum:
            checkMaximum(value, self.maximum)
        # -0.0 is 0.0: logs and replies that show the value say 0.
        return number + 0.0


class Boolean(Kind):
    """
    True or false: a TOML boolean; on the command line, a flag (declare the
    setting with C{flags={"name": True}}) or C{yes}/C{no}.
    """

    metavar = "yes|no"
    expected = "true or false"
    tomlTypes = (bool,)
    _words = {"yes": True, "true": True, "on": True, "1": True, "no": False, "false": False, "off": False, "0": False}

    def fromText(self, text):
        try:
            return self._words[text.strip().lower()]
        except KeyError:
            raise ValueError(f"must be yes or no, not {text!r}") from None

    def toTOML(self, value):
        return "true" if value else "false"


class Choice(Kind):
    """
    One of a few words.

    @param values: the words, or an L{enum.Enum} whose values are the words
        (the value is then the enum member).
    """

    def __init__(self, values):
        self.enum = values if isinstance(values, type) and issubclass(values, enum.Enum) else None
        self.words = [m.value for m in values] if self.enum else list(values)
        self.metavar = "|".join(self.words)
        self.expected = "one of " + ", ".join(json.dumps(w) for w in self.words)

    def check(self, value):
        word = value.strip().lower()
        if word not in self.words:
            raise ValueError(f"must be {self.expected}, not {value!r}")
        return self.enum(word) if self.enum else word

    def toTOML(self, value):
        return json.dumps(value.value if isinstance(value, enum.Enum) else value)


class JWTAlgorithm(Choice):
    """
    A JWT signature algorithm of L{mailgate.auth.oauth.ALGORITHMS}, in any
    case, kept as JWT writes it (C{EdDSA}).  No HMAC and no C{none}.
    """

    def __init__(self):
        super().__init__([name.lower() for name in _JWT_ALGORITHMS])
        self.metavar = "ALG"
        self.expected = "one of " + ", ".join(json.dumps(name) for name in _JWT_ALGORITHMS)

    def check(self, value):
        word = super().check(value)
        return _JWT_ALGORITHMS[self.words.index(word)]


class Size(Kind):
    """
    A size in octets: a whole number, or one with a unit as Dovecot's quota
    settings write it (C{64K}, C{500M}, C{1G}; units of 1024).  In TOML, a
    number of octets or such a string.
    """

    metavar = "SIZE"
    expected = "a size (octets, or a string such as \"500M\" or \"1G\")"
    tomlTypes = (int, str)

    def __init__(self, minimum=0, zero=None):
        self.minimum = minimum
        self.zero = zero

    def check(self, value):
        if isinstance(value, float):
            # Only an embedder's MailgateConfig(...) gives a float (50e6).
            if not value.is_integer():
                raise ValueError(f"not a whole number of octets: {value}")
            value = int(value)
        octets = parseSize(str(value))
        if octets == 0 and self.zero is not None:
            raise ValueError(self.zero)
        if octets < self.minimum:
            raise ValueError(f"must be at least {counted(self.minimum, 'octet')}, not {value!r}")
        return octets

    def toTOML(self, value):
        return json.dumps(formatSize(value))


class Days(Integer):
    """
    A whole number of days, at least one, or C{never} (C{None}): how long
    messages are kept.

    Not 0: where most of mailgate's limits take 0 for "no limit", a
    retention of 0 days would remove every message, read or not, at the
    retention task's next pass; C{never} is how mail is kept.
    """

    tomlTypes = (int, str)

    def __init__(self):
        Integer.__init__(self, minimum=1, metavar="DAYS|never", maximum=MAX_DAYS)
        self.expected = 'a whole number of days or "never"'

    def fromText(self, text):
        return self.check(text)

    def check(self, value):
        if isinstance(value, str):
            if value.strip().lower() == "never":
                return None
            return self.check(parseWhole(value, self.maximum))
        if value == 0:
            raise ValueError(ZERO_DAYS)
        return Integer.check(self, value)

    def toTOML(self, value):
        return '"never"' if value is None else str(value)


class Endpoint(Kind):
    """
    A Twisted server endpoint description (strports), checked for syntax.
    """

    metavar = "ENDPOINT"
    expected = "an endpoint description (a string such as \"tcp:110\")"

    def check(self, value):
        return checkEndpoint(value)


class PolicyAction(Line):
    """
    An action a Postfix policy server answers (the quota-status service's):
    an access(5) word such as DUNNO, REJECT or DEFER_IF_PERMIT, or a
    4NN/5NN code, then optional text, on one line
    (L{mailgate.smtp.policyservice.checkAction}).
    """

    def __init__(self):
        super().__init__(512, metavar="ACTION")

    def check(self, value):
        return checkAction(super().check(value))


class CPUList(Kind):
    """
    CPUs as Linux lists them (C{2}, C{0-3}, C{0,2}); a whole number in
    TOML is one CPU.  Kept as text, normalised.
    """

    metavar = "CPUS"
    expected = "a CPU list (a string such as \"2\" or \"0-3\", or a whole number)"
    tomlTypes = (str, int)

    def check(self, value):
        if isinstance(value, int):
            value = str(value)
        return formatCPUs(parseCPUs(value))


class Network(Kind):
    """
    An IP network in CIDR notation (host bits are dropped).
    """

    metavar = "CIDR"

    def check(self, value):
        try:
            network = ipaddress.ip_network(value.strip(), strict=False)
        except ValueError as e:
            raise ValueError(f"not a network: {e}") from None
        mapped = getattr(ipaddress.ip_interface(value.strip()).ip, "ipv4_mapped", None)
        if mapped is not None and network.prefixlen < 96:
            # ::ffff:10.0.0.0/8 is ::/8, which holds ::1 and no IPv4 client.
            if network.prefixlen <= 32:
                ipv4 = ipaddress.ip_network(f"{mapped}/{network.prefixlen}", strict=False)
                written = f"{ipv4} (or ::ffff:{ipv4.network_address}/{network.prefixlen + 96}"
            else:
                written = "IPv4 networks as such (10.0.0.0/8, or ::ffff:10.0.0.0/104"
            raise ValueError(
                f"not a network: {value.strip()!r} is {network}, not an IPv4 network: write {written}, "
                "the prefix counting IPv6's 128 bits)"
            )
        if mapped is not None:
            # As written, with its IPv4 part: str() gives ::ffff:a00:0/104.
            return f"::ffff:{ipaddress.IPv6Address(int(network.network_address)).ipv4_mapped}/{network.prefixlen}"
        return str(network)


class ExemptNetwork(Network):
    """
    A network in CIDR notation, or C{none} (given alone: no network).
    """

    #: what C{none} means, for the error that combines it with networks
    noneMeans = "exempts nothing"

    def check(self, value):
        if value.strip().lower() == NO_NETWORKS:
            return NO_NETWORKS
        return Network.check(self, value)

    def checkList(self, values):
        if NO_NETWORKS in values and len(values) > 1:
            raise ValueError(f"{NO_NETWORKS!r} {self.noneMeans}: it cannot be combined with networks")
        return values


class BalancerNetwork(Network):
    """
    A network of the load balancers that may send a PROXY header: at least
    one.  No balancer at all means, to the PROXY listener beneath
    (L{mailgate.session.proxy.isBalancer}), that any peer may send one, so
    choose the address every policy sees: an empty list in a file, meant
    as "none", would trust everyone.
    """

    def checkList(self, values):
        if not values:
            raise ValueError(
                "an empty list would let any peer send a PROXY header (and claim any client "
                "address): name the balancers' networks, or leave the key out for this machine's "
                "(0.0.0.0/0 and ::/0 to trust every peer)"
            )
        return values


class TrustedNetwork(ExemptNetwork):
    """
    A network trusted with plaintext passwords, or C{none} (given alone:
    plaintext passwords only over TLS).
    """

    noneMeans = "trusts no network"


class CleartextNetwork(ExemptNetwork):
    """
    A network SMTP or LMTP takes mail from without TLS, or C{none} (given
    alone: mail only over TLS).
    """

    noneMeans = "takes mail in the clear from no network"


def networksOf(values):
    """
    The networks of an L{ExemptNetwork} list, without the C{none} that
    stands for no network.
    """
    return [value for value in values if value != NO_NETWORKS]


class HostName(Text):
    """
    A host name as greetings and trace fields carry it: a domain name
    (letters, digits, hyphens and dots, as L{Domain}), or an address
    literal (C{[192.0.2.1]}, C{[IPv6:2001:db8::1]}).  Kept as written:
    it only has to be safe in a protocol line and in the APOP timestamp
    (no space, no C{<>}, no line break).
    """

    def __init__(self):
        super().__init__("NAME")

    def check(self, value):
        name = super().check(value).strip()
        if name.startswith("[") and name.endswith("]"):
            return _addressLiteral(name)
        try:
            normalizeDomain(name)
        except InvalidAddress:
            raise ValueError(
                f"not a host name: {_shortText(name)!r} (letters, digits, hyphens and dots, "
                f"or an address literal such as [192.0.2.1])"
            ) from None
        return name


def _addressLiteral(name):
    """
    C{name} if it is an address literal of RFC 5321 (section 4.1.3).
    """
    inside = name[1:-1]
    text = inside[len("IPv6:"):] if inside[:5].lower() == "ipv6:" else inside
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise ValueError(f"not an address literal: {_shortText(name)!r}") from None
    if (address.version == 6) != (text is not inside):
        raise ValueError(f"not an address literal: {_shortText(name)!r} (IPv6 ones are written [IPv6:...])")
    if "%" in text:
        raise ValueError(f"not an address literal: {_shortText(name)!r} (an address literal has no %zone)")
    return name


def _shortText(text):
    """
    Text for an error message, cut short past 60 characters.
    """
    return text if len(text) <= 60 else text[:57] + "..."


class Domain(Kind):
    """
    A mail domain, normalised (lower case, IDNA): one written in Unicode is
    its ASCII form, as mail, logins and the mailgate command take it.
    """

    metavar = "NAME"

    def check(self, value):
        try:
            return normalizeDomain(asciiDomain(value) or value)
        except InvalidAddress as e:
            raise ValueError(str(e)) from None


class MailAddress(Kind):
    """
    A user's address, normalised (C{local@domain}, the domain in lower
    case, one written in Unicode in its ASCII form), as the store keeps it.
    """

    metavar = "ADDRESS"

    def check(self, value):
        try:
            return userAddress(value)
        except InvalidAddress as e:
            raise ValueError(str(e)) from None


class DatabaseURL(Kind):
    """
    A database URL mailgate has an engine for.
    """

    metavar = "URL"

    def fromTOML(self, value):
        # A value of the wrong type is not shown: the URL in it may hold
        # the database's password, and the error goes to the terminal
        # and, on a reload, into the server's log.
        if not isinstance(value, str):
            raise ValueError(f"expected {self.expected}, got {_shown(value, secret=True)}")
        return self.check(value)

    def check(self, value):
        try:
            engineFromURL(value)
        except ConfigurationError as e:
            raise ValueError(str(e)) from None
        return value


def checkEndpoint(description, adopting=False):
    """
    Check the syntax of a server endpoint description without listening.

    The description is parsed by Twisted's own parsers, with no reactor at
    all: they only record the reactor for later (test_config pins that for
    every kind mailgate documents), so nothing can listen or connect here.

    A C{systemd:} description names a socket systemd passes to the server
    it starts, and to no other process: the C{mailgate} command and
    C{mailgate config --check} (the unit's C{ExecReload=}) read the same
    file without one.  Its socket must be there only in the process that
    systemd gave sockets to, or with C{adopting} (the server, about to
    listen on it).

    @return: the description.
    @raise ValueError: with what is wrong.
    """
    if not isinstance(description, str) or not description.strip():
        raise ValueError("an empty endpoint description")
    if any(ord(c) < 32 or ord(c) == 127 for c in description):
        # Twisted's parsers took interface=<CR><LF> (bind() refused it at
        # start) and echoed others into their errors as they were.
        raise ValueError(f"invalid endpoint {description!r}: it must not contain control characters")
    kind, _, rest = description.strip().partition(":")
    inner = rest.partition(":")[0].strip().lower()
    if kind.lower() == "haproxy" and inner in ("ssl", "tls"):
        # Twisted's ssl: and tls: (PEMs chosen by SNI) listeners do TLS
        # first and would read the header inside it; HAProxy (send-proxy,
        # send-proxy-v2 with ssl on the server line) sends it in the clear
        # before TLS: every connection failed its handshake, no client was
        # ever greeted.
        raise ValueError(
            f"invalid endpoint {description!r}: {inner}: cannot work behind haproxy: (HAProxy sends its PROXY "
            f"header in the clear, before TLS); use --pop3s haproxy:tcp:995 (mailgate's TLS after the header), "
            f"or end TLS at HAProxy (bind ... ssl crt) and use haproxy:tcp:"
        )
    try:
        endpoint = serverFromString(None, description)
    except (IndexError, KeyError) as e:
        arguments = _systemdArguments(description)
        if arguments is None:
            raise ValueError(f"invalid endpoint {description!r}: {type(e).__name__} {e}") from None
        if adopting or os.environ.get("LISTEN_PID") == str(os.getpid()):
            raise ValueError(
                f"{description!r}: systemd passed no socket with that index or name "
                f"(start mailgate through its socket unit, or use another endpoint)"
            ) from None
        # Twisted looks the socket up before it reads the address family.
        if not hasattr(socket, "AF_" + arguments.get("domain", "")):
            raise ValueError(
                f"invalid endpoint {description!r}: no address family {'AF_' + arguments.get('domain', '')!r}"
            ) from None
        return description
    except Exception as e:
        reason = str(e).replace("\n", " ") or type(e).__name__
        if _UNESCAPED_INTERFACE.search(description):
            # Twisted's words for interface=::1 ("got multiple values for
            # argument 'interface'") do not say what to write.
            reason = "escape each colon of an IPv6 interface address with a backslash (interface=\\:\\:1)"
        raise ValueError(f"invalid endpoint {description!r}: {reason}") from None
    address = _listeningAddress(endpoint)
    if address is not None and address[0] == "tcp" and not 0 <= address[1] <= 65535:
        # Twisted's parser takes any whole number; bind() refuses it only
        # at start, which exited 1 (systemd tries again, for ever) after
        # config --check had said the file was right.
        raise ValueError(f"invalid endpoint {description!r}: port {address[1]} is not a port number (0 to 65535)")
    return description


#: An interface whose IPv6 address's colons are not escaped: C{interface=::1},
#: C{interface=2001:db8::1} (not C{interface=192.0.2.1:backlog=64}, nor a host name).
_UNESCAPED_INTERFACE = re.compile(r"interface=[0-9a-f]*:[0-9a-f]*:", re.IGNORECASE)


def _systemdArguments(description):
    """
    The C{key=value} arguments of a C{systemd:} description (behind
    C{haproxy:} or not), or C{None} for another kind.
    """
    kind, _, rest = description.strip().partition(":")
    if kind.lower() == "haproxy":
        kind, _, rest = rest.partition(":")
    if kind.lower() != "systemd":
        return None
    return dict(part.split("=", 1) for part in rest.split(":") if "=" in part)


def _listeningAddress(endpoint):
    """
    Where the listener of a server C{endpoint} (parsed from a strports
    description) binds: C{("tcp", port, interface)} for C{tcp:},
    C{tcp6:} and C{ssl:}, behind C{haproxy:} or not, the interface as
    written (C{""}: every IPv4 address); C{("unix", path)} for a Unix
    socket; C{None} for another kind (C{systemd:}, whose socket systemd
    binds).
    """
    while hasattr(endpoint, "_wrappedEndpoint"):
        # haproxy: wraps the endpoint that listens.
        endpoint = endpoint._wrappedEndpoint
    port = getattr(endpoint, "_port", None)
    if isinstance(port, int):
        return ("tcp", port, getattr(endpoint, "_interface", "") or "")
    address = getattr(endpoint, "_address", None)
    if isinstance(address, str):
        return ("unix", os.path.abspath(address))
    return None


def listenerAddresses(config, names=None):
    """
    Where the listeners of C{config} (of its settings C{names}, or of
    every listener setting) bind, each as C{(name, description, address)},
    the address as L{_listeningAddress} gives it; a description whose
    address is not known here (C{systemd:}, or one refused elsewhere) is
    left out.
    """
    for name in LISTENER_SETTINGS if names is None else [n for n in LISTENER_SETTINGS if n in names]:
        values = getattr(config, setting(name).attribute)
        for description in ([values] if isinstance(values, str) else values or ()):
            try:
                address = _listeningAddress(serverFromString(None, description))
            except Exception:
                # Refused with its reason elsewhere (checkEndpoint).
                continue
            if address is not None:
                yield name, description, address


def missingSocketDirectories(config, names=None):
    """
    The Unix-socket listeners of C{config} (of its settings C{names}, or
    of every listener setting) whose directory is not there (or is not a
    directory), each as C{(name, description, reason)}: a start cannot
    listen on them and exits 78.  Only what is missing counts, not what
    this user may not write: under twistd's C{--uid} root makes the
    sockets.

    It is for the running server's reload, and for C{mailgate config
    --check} to warn of, not to refuse: run while the server is stopped,
    the unit's C{RuntimeDirectory=} (C{/run/mailgate}) is not there
    either, and systemd makes it at the next start.
    """
    missing = []
    for name, description, address in listenerAddresses(config, names):
        if address[0] != "unix":
            continue
        directory = os.path.dirname(address[1])
        try:
            os.stat(directory)
        except FileNotFoundError:
            missing.append((name, description, f"the directory {directory} does not exist"))
            continue
        except NotADirectoryError:
            missing.append((name, description, f"a part of {directory} is not a directory"))
            continue
        except OSError:
            continue
        if not os.path.isdir(directory):
            missing.append((name, description, f"{directory} is not a directory"))
    return missing


#: What every user of the machine may do with a Unix socket of these
#: listeners that they may reach (L{openSockets}).
_SOCKET_RISKS = {
    "lmtp": "hand mail to any user under any sender, past the MTA's checks",
    "quota-status": "learn which addresses exist and how full their mailboxes are",
}


def openSockets(config, modeOf=lambda path: os.stat(path).st_mode):
    """
    The Unix-socket listeners of C{config} for an MTA (C{lmtp},
    C{quota-status}) that every user of the machine may use, each as a
    warning: the socket's mode lets others connect (C{mode=666}, as
    README has it, and Twisted's default) and every directory above it
    lets others enter.  README has the socket made in a directory only
    the MTA may enter (C{install -d -o mailgate -g postfix -m 750}); one
    made in a directory any user may enter (/tmp, /run, the queue
    directory itself) is open to all of them.  Warned of, not refused, as
    a key file others may read is; a directory missing is
    L{missingSocketDirectories}'.

    @param modeOf: the mode of a path (L{os.stat}'s; tests give theirs).
    """
    warnings = []
    for name, risk in _SOCKET_RISKS.items():
        values = getattr(config, setting(name).attribute)
        for description in [values] if isinstance(values, str) else values or ():
            try:
                endpoint = serverFromString(None, description)
            except Exception:
                continue
            address = _listeningAddress(endpoint)
            mode = getattr(endpoint, "_mode", None)
            if address is None or address[0] != "unix" or not isinstance(mode, int) or not mode & 0o002:
                continue
            directory, reachable = os.path.dirname(address[1]), True
            while True:
                try:
                    if not modeOf(directory) & 0o001:
                        reachable = False
                        break
                except OSError:
                    reachable = False
                    break
                if directory == os.path.dirname(directory):
                    break
                directory = os.path.dirname(directory)
            if reachable:
                warnings.append(
                    f"the {name} socket {address[1]} may be used by every user of this machine (mode "
                    f"{mode:04o}, in directories anyone may enter): any of them may {risk}; make it in a "
                    "directory only the MTA may enter (README: install -d -o mailgate -g postfix -m 750)"
                )
    return warnings


def masterUsersOnWarning(path, given=None, settings=None):
    """
    What to warn of, if anything, in C{master-users = false} in the
    configuration file at C{path} beside a C{master-user-separator} (the
    file's or the command line's, C{given} by long option name): the
    separator turns master logins on by itself, so they stay on, where an
    administrator who wrote false meant them off.  Warned of, not
    refused: the example file uncommented as a whole says both.
    """
    given = given or {}
    if not path or "master-users" in given:
        return None
    try:
        values = readFile(path, SETTINGS if settings is None else settings)
    except ConfigurationError:
        return None
    separator = given.get("master-user-separator", values.get("master-user-separator"))
    if values.get("master-users") is not False or separator is None:
        return None
    return (
        f"master-users = false in {path}, but master-user-separator is set, which turns master "
        "logins on by itself: master users log in all the same; remove master-user-separator to turn "
        "them off"
    )


# -- the APOP policy ---------------------------------------------------------


class APOPPolicy(enum.Enum):
    """
    When the POP3 greeting offers APOP (carries a timestamp), and SASL
    offers CRAM-MD5 (which works for the users with APOP, and for those
    imported from Dovecot with a C{{CRAM-MD5}} hash's states).

    @cvar AUTO: APOP only while some user has APOP enabled, CRAM-MD5 only
        while some user has imported CRAM-MD5 states (both checked every
        L{mailgate.service.APOP_REFRESH} seconds): clients that prefer APOP
        whenever it is offered never try it where it cannot work, and
        clients that pick CRAM-MD5 whenever CAPA lists it and never fall
        back (curl) go on working for users without APOP when one user
        opts into it, as with Dovecot.
    @cvar ALWAYS: always, both.
    @cvar NEVER: never; APOP and CRAM-MD5 logins are not even checked.
    """

    AUTO = "auto"
    ALWAYS = "always"
    NEVER = "never"

    @classmethod
    def of(cls, value):
        """
        The policy C{value} names: a policy, its word, or (as older
        configurations said) C{True} for always and C{False} for never.
        """
        if isinstance(value, cls):
            return value
        if value is True:
            return cls.ALWAYS
        if value is False or value is None:
            return cls.NEVER
        try:
            return cls(str(value).lower())
        except ValueError:
            raise ValueError(f"APOP policy must be auto, always or never, not {value!r}") from None

    @property
    def checked(self):
        """
        Whether APOP logins are verified at all (the portal has an APOP
        checker).
        """
        return self is not APOPPolicy.NEVER

    def advertiser(self, store):
        """
        What the POP3 factory is given as its C{apop}: C{True}, C{False},
        or an L{APOPAdvertiser} asking C{store}.
        """
        if self is APOPPolicy.AUTO:
            return APOPAdvertiser(store)
        return self is APOPPolicy.ALWAYS


LOG_FORMATS = ("text", "json")


class RecipientDelimiter(Kind):
    """
    The characters that separate a user from a detail in an address's
    local part: those a local part may hold besides letters and digits
    (not the dot, which joins a name's parts), each at most once.
    """

    metavar = "CHARACTERS"
    allowed = "!#$%&'*+-/=?^_`{|}~"

    def check(self, value):
        if not value or any(c not in self.allowed for c in value):
            raise ValueError(f"must be one or more of {self.allowed} (such as +)")
        if len(set(value)) != len(value):
            raise ValueError("names a character twice")
        return value


class MasterUserSeparator(Kind):
    """
    One character that no master user's name holds
    (L{mailgate.address.MASTER_SEPARATORS}).
    """

    metavar = "CHARACTER"

    def check(self, value):
        if len(value) != 1 or value not in MASTER_SEPARATORS:
            raise ValueError(f"must be one of {MASTER_SEPARATORS} (such as *)")
        return value


# -- settings ------------------------------------------------------------------


@attr.s(frozen=True)
class Setting:
    """
    One setting, declared once.

    @ivar name: the long option (C{--name}) and the configuration file key.
    @ivar attribute: the L{MailgateConfig} attribute.
    @ivar kind: the L{Kind} of its value (of each value, if C{repeated}).
    @ivar default: the default value (a tuple for a repeated setting; the
        configuration gets a fresh list), or C{None} for "not set".
    @ivar help: what it does, one or more sentences.
    @ivar repeated: a list: the option may be given several times, and the
        file gives an array.  Given on the command line, it replaces the
        file's list and the default.
    @ivar flags: command-line flags that set it, instead of C{--name VALUE}:
        C{{flag: value}} (C{--apop} and C{--no-apop}).  Giving two of them
        is an error.
    @ivar environment: an environment variable consulted before the
        default (by C{twistd mailgate}, not by L{MailgateConfig}).
    @ivar defaultText: how help texts describe the default, when the
        value alone does not say it.
    @ivar example: a value the example file shows for a setting whose
        default is unset or empty.
    @ivar converter: turns what an embedding application passes to
        L{MailgateConfig} into the setting's type.
    """

    name = attr.ib()
    attribute = attr.ib()
    kind = attr.ib()
    default = attr.ib()
    help = attr.ib()
    repeated = attr.ib(default=False)
    flags = attr.ib(factory=dict)
    environment = attr.ib(default=None)
    defaultText = attr.ib(default=None)
    example = attr.ib(default=None)
    converter = attr.ib(default=None)

    def defaultValue(self):
        """
        A fresh default value (a new list for a repeated setting).
        """
        return list(self.default) if self.repeated else self.default

    def describeDefault(self):
        if self.defaultText is not None:
            return self.defaultText
        if self.default is None or (self.repeated and not self.default):
            return "none"
        if self.repeated:
            return ", ".join(str(v) for v in self.default)
        if isinstance(self.default, enum.Enum):
            return self.default.value
        return str(self.default)

    def fromTOML(self, value):
        """
        The value of this setting's key in a configuration file.

        @raise ValueError: saying what is wrong with it.
        """
        if not self.repeated:
            return self.kind.fromTOML(value)
        if not isinstance(value, list):
            raise ValueError(f"expected an array (of {self.kind.expected} each), got {_shown(value)}")
        return self.kind.checkList([self.kind.fromTOML(item) for item in value])


DEFAULT_POP3 = "tcp:1110:interface=127.0.0.1"
# Where a protocol class already has a default (for embedders using it
# directly), the setting's default is that one, not a copy.
_TRUSTED, _POP3, _SMTP, _DATABASE = DEFAULT_TRUSTED_NETWORKS, POP3Server, SMTPServer, DEFAULT_DATABASE

#: Every setting, in the order help texts and the example file list them.
SETTINGS = (
    Setting(
        "database", "database", DatabaseURL(), _DATABASE,
        "Database URL: sqlite:///FILE (relative to the working directory), "
        "sqlite:////ABSOLUTE/FILE or postgresql://USER:PASSWORD@HOST:PORT/DB.",
        environment="MAILGATE_DATABASE",
        defaultText=f"$MAILGATE_DATABASE, else {_DATABASE}",
    ),
    Setting(
        "pop3", "pop3", Endpoint(), (DEFAULT_POP3,),
        "A POP3 listener, as a strports description (tcp:110, "
        "tcp:1110:interface=127.0.0.1, unix:/run/mailgate/pop3, "
        "haproxy:tcp:110, systemd:domain=INET:index=0).",
        repeated=True,
    ),
    Setting(
        "pop3s", "pop3s", Endpoint(), (),
        "A POP3 listener with implicit TLS from the first byte (e.g. tcp:995), "
        "using tls-cert and tls-key.",
        repeated=True, example=["tcp:995"],
    ),
    Setting(
        "smtp", "smtp", Endpoint(), (),
        "An SMTP listener (e.g. tcp:25, tcp:2525:interface=127.0.0.1).",
        repeated=True, example=["tcp:2525:interface=127.0.0.1"],
    ),
    Setting(
        "lmtp", "lmtp", Endpoint(), (),
        "An LMTP listener, for an MTA such as Postfix (e.g. "
        "tcp:2424:interface=127.0.0.1, or "
        "unix:/var/spool/postfix/mailgate/lmtp:mode=666 in a directory of "
        "mailgate's that only Postfix may enter: see README).",
        repeated=True, example=["tcp:2424:interface=127.0.0.1"],
    ),
    Setting(
        "quota-status", "quotaStatus", Endpoint(), (),
        "A quota-status listener: a Postfix policy service (as Dovecot's "
        "quota-status -p postfix) that Postfix asks at its own RCPT "
        "(check_policy_service inet:127.0.0.1:12340 in "
        "smtpd_recipient_restrictions) whether the recipient's mailbox has "
        "room for the size the client declared, so that a full mailbox is "
        "refused to the sending MTA instead of bounced by Postfix later.  It "
        "tells which addresses exist and how full they are: bind it to "
        "loopback or a private address (see quota-status-network).",
        repeated=True, example=["tcp:12340:interface=127.0.0.1"],
    ),
    Setting(
        "metrics", "metrics", Endpoint(), None,
        "Serve Prometheus metrics (GET /metrics) and a health check "
        "(GET /healthz: 200 while the database answers within a second, "
        "503 otherwise; GET /healthz/pop3, /healthz/smtp, /healthz/lmtp: "
        "whether this node can serve that protocol, for a balancer's "
        "backend) over HTTP on this endpoint.",
        example="tcp:9101:interface=127.0.0.1",
    ),
    Setting(
        "hostname", "hostname", HostName(), None,
        "Host name used in greetings, the APOP timestamp and Received: fields.",
        defaultText="this machine's fully qualified name", example="mail.example.org",
    ),
    Setting(
        "domain", "domains", Domain(), (),
        "A domain SMTP and LMTP accept mail for.",
        repeated=True, defaultText="the domains of existing users and aliases", example=["example.org"],
    ),
    Setting(
        "max-message-size", "maxMessageSize", Size(minimum=1),
        _SMTP.maxMessageSize,
        "Largest message SMTP and LMTP accept: octets, or with a unit as "
        "default-quota takes it (50M; units of 1024).  Advertised in octets "
        "as SIZE.",
    ),
    Setting(
        "spool-directory", "spoolDirectory", Text("DIRECTORY"), None,
        "Directory where SMTP, LMTP and mailgate deliver keep a message "
        "being received once it outgrows memory (over 1 MB, or the 64 MiB "
        "all messages being received share), as Dovecot's mail_temp_dir: "
        "its files are nameless and readable by the server's user only.  A "
        "full one refuses such mail with 452 4.3.1.",
        defaultText="the system's temporary directory ($TMPDIR, else /tmp)",
        example="/var/lib/mailgate/spool",
    ),
    Setting(
        "min-data-rate", "minDataRate", Integer(metavar="OCTETS"), _SMTP.minDataRate,
        "Octets per second the data of an SMTP or LMTP message must average, "
        "beyond an allowance of smtp-idle-timeout (five minutes), as "
        "Postfix's smtpd_min_data_rate: a client sending slower is told 421 "
        "and disconnected, so that no connection is held by trickling a "
        "message in.  0: no limit.",
    ),
    Setting(
        "smtp-idle-timeout", "smtpIdleTimeout", Integer(minimum=1, metavar="SECONDS", maximum=MAX_SECONDS),
        _SMTP.idleTimeout,
        "Seconds an SMTP or LMTP client may stay silent before it is told 421 "
        "and disconnected, as Postfix's smtpd_timeout; also the allowance "
        "min-data-rate gives a message's data.  RFC 5321 asks a server to wait "
        "at least 300 (less is warned of).  At most a week (604800).",
    ),
    Setting(
        "max-recipients", "maxRecipients", Integer(minimum=1), _SMTP.maxRecipients,
        "Most recipients in one SMTP or LMTP transaction (RFC 5321 asks for at least 100).",
    ),
    Setting(
        "smtp-soft-error-limit", "smtpSoftErrorLimit", Integer(maximum=_SMTP.maxBadCommands),
        _SMTP.softErrorLimit,
        "Errors an SMTP session may make (a refused recipient, a bad or "
        "out-of-sequence command; counted afresh after each message the client "
        "delivers) before each further error reply waits smtp-error-sleep-time, "
        "the client's next commands with it, as Postfix's smtpd_soft_error_limit: "
        "slows a client guessing addresses.  10: the 11th error's reply waits; "
        "0: from the first error.  Replies to commands that succeed never wait.  "
        f"At most {_SMTP.maxBadCommands}: at the {_SMTP.maxBadCommands}th error the session is closed with 421 "
        f"(smtpd_hard_error_limit), so {_SMTP.maxBadCommands} never waits.  LMTP never waits.",
    ),
    Setting(
        "smtp-error-sleep-time", "smtpErrorSleepTime", Number(maximum=60), 1.0,
        "Seconds each SMTP error reply past smtp-soft-error-limit waits "
        "(Postfix's smtpd_error_sleep_time), on a timer: nothing else waits.  "
        "0: never.  At most 60.",
    ),
    Setting(
        "tls-cert", "tlsCertificate", Text("PEM"), None,
        "PEM file with the server certificate, optionally followed by its "
        "chain.  With tls-key, enables STLS, STARTTLS and pop3s listeners; "
        "SIGHUP reloads both files.",
        example="/etc/mailgate/cert.pem",
    ),
    Setting(
        "tls-key", "tlsKey", Text("PEM"), None,
        "PEM file with the private key of tls-cert.",
        example="/etc/mailgate/key.pem",
    ),
    Setting(
        "tls-min-version", "tlsMinVersion", Choice(tuple(MINIMUM_VERSIONS)), "1.2",
        "The oldest TLS version accepted on STLS, STARTTLS and pop3s: 1.2 "
        "(as Dovecot's default), or 1.3 where a policy asks for it (clients "
        "from before about 2018 then cannot connect).",
    ),
    Setting(
        "tls-ciphers", "tlsCiphers", Text("LIST"), CIPHERS,
        "The TLS 1.2 cipher suites offered, as an OpenSSL cipher list "
        "(Dovecot's ssl_cipher_list), e.g. ECDHE+AESGCM:ECDHE+CHACHA20 for AEAD "
        "only.  Suites without authentication or encryption are never offered, "
        "and a list none of whose suites the certificates can serve is refused.  "
        "TLS 1.3's suites are OpenSSL's, all AEAD.",
        defaultText="forward-secret suites, AEAD first",
    ),
    Setting(
        "tls-alt-cert", "tlsAltCertificate", Text("PEM"), None,
        "A second certificate (and chain), whose key is of another type than "
        "tls-cert's: typically ECDSA beside RSA.  Clients that accept it (nearly "
        "all) get it, the others tls-cert; an ECDSA handshake costs the server "
        "less than half the CPU of an RSA-2048 one.  Reloaded with tls-cert.",
        example="/etc/mailgate/cert-ecdsa.pem",
    ),
    Setting(
        "tls-alt-key", "tlsAltKey", Text("PEM"), None,
        "PEM file with the private key of tls-alt-cert.",
        example="/etc/mailgate/key-ecdsa.pem",
    ),
    Setting(
        "tls-sni-cert", "tlsNamedCertificates", CertificatePair(), (),
        "A further certificate (and chain) and its key, as CERT:KEY, for "
        "clients that ask (by SNI) for a host name this certificate lists in "
        "its subjectAltName (*.example.net: any name one level below); other "
        "clients get tls-cert.  For a gateway serving several domains, as "
        "Dovecot's local_name blocks; the names are the certificate's own, so "
        "none can be given a certificate that is not for it.  "
        "CERT:KEY:ALTCERT:ALTKEY adds an alternative certificate for the same "
        "names with a key of another type (ECDSA beside RSA), as tls-alt-cert.  "
        "Reloaded with tls-cert.",
        repeated=True, example=["/etc/mailgate/example-net.pem:/etc/mailgate/example-net.key"],
    ),
    Setting(
        "tls-ticket-key-rotation", "tlsTicketKeyRotation", Integer(minimum=1, metavar="SECONDS", maximum=MAX_SECONDS),
        TICKET_KEY_ROTATION,
        "Seconds between new keys for the TLS session tickets clients resume "
        "with (a reload makes one too): whoever got a key from the server's "
        "memory could read the TLS 1.2 sessions whose tickets it sealed.  A "
        "client resuming with a ticket of an older key gets a full handshake.  "
        "At most a week (604800).",
    ),
    Setting(
        "trusted-network", "trustedNetworks", TrustedNetwork(), tuple(_TRUSTED),
        "A network (CIDR) from which plaintext passwords (USER/PASS, AUTH "
        "PLAIN) are accepted without TLS; elsewhere plaintext logins need TLS.  "
        "none: plaintext logins need TLS from every network, loopback "
        "included (Unix socket peers excepted).",
        repeated=True,
    ),
    Setting(
        "smtp-cleartext-network", "smtpCleartextNetworks", CleartextNetwork(), EVERY_NETWORK,
        "A network (CIDR) from which SMTP takes mail without TLS; from "
        "elsewhere MAIL, RCPT, DATA and BDAT are refused with 530 5.7.0 "
        "until STARTTLS, as Postfix's smtpd_tls_security_level = encrypt "
        "(not on a public MX: RFC 3207 has it take mail in the clear).  "
        "none: TLS from every network, loopback included (Unix socket peers "
        "excepted).  Less than every network needs tls-cert and tls-key.",
        repeated=True, defaultText="every network (0.0.0.0/0, ::/0)",
    ),
    Setting(
        "lmtp-cleartext-network", "lmtpCleartextNetworks", CleartextNetwork(), EVERY_NETWORK,
        "A network (CIDR) from which LMTP takes mail without TLS, as "
        "smtp-cleartext-network for SMTP: for an MTA on another machine "
        "(Postfix with lmtp_tls_security_level = encrypt), 127.0.0.0/8 and "
        "::1/128 (or none) keep mail from crossing the network in the clear.",
        repeated=True, defaultText="every network (0.0.0.0/0, ::/0)",
    ),
    Setting(
        "proxy-network", "proxyNetworks", BalancerNetwork(), DEFAULT_BALANCER_NETWORKS,
        "A network (CIDR) of the load balancers that may connect to haproxy: "
        "listeners (Dovecot's haproxy_trusted_networks): a connection from "
        "elsewhere is closed unread, since its PROXY header would choose the "
        "client address every policy sees.  Giving it replaces the default "
        "(a HAProxy on this machine).",
        repeated=True, example=["10.0.0.2/32"],
    ),
    Setting(
        "xclient-network", "xclientNetworks", Network(), (),
        "A network (CIDR) of the proxies and MTAs in front that name the client they relay. POP3 "
        "proxies (Dovecot's, whose passdb sends users here) whose XCLIENT names it, as Dovecot's "
        "login_trusted_networks lets it: the greeting to them says [XCLIENT], and the client's address "
        "then stands for the proxy's in logins (bans, penalties, allowed networks) and logs.  SMTP and "
        "LMTP: EHLO and LHLO offer them XFORWARD (Postfix's lmtp_send_xforward_command = yes, a content "
        "filter), naming the client of the next message in its Received field and log lines, and XCLIENT "
        "(Dovecot's LMTP proxy, nginx), after which the session is the named client's (Received field, "
        "logs, bans, unknown recipients).  None by default.",
        repeated=True, example=["10.0.0.3/32"],
    ),
    Setting(
        "apop", "apop", Choice(APOPPolicy), APOPPolicy.AUTO,
        "When the POP3 greeting offers APOP, and AUTH offers CRAM-MD5: auto "
        "(the APOP timestamp while some user has APOP enabled; CRAM-MD5 only "
        "while some user has the states of a {CRAM-MD5} hash imported from "
        "Dovecot, not because of APOP, as clients such as curl pick it "
        "whenever it is listed and fail for users without it), always (both), "
        "or never (neither).  On the command line: --apop (always) or "
        "--no-apop (never).",
        flags={"apop": APOPPolicy.ALWAYS, "no-apop": APOPPolicy.NEVER},
        converter=APOPPolicy.of,
    ),
    Setting(
        "auth-failure-delay", "authFailureDelay", Number(), _POP3.authFailureDelay,
        "Seconds to wait before answering a failed login (the same for an "
        "unknown user and a wrong password; other sessions are not held up).  "
        "At most a week (604800).",
    ),
    Setting(
        "idle-timeout", "idleTimeout", Integer(metavar="SECONDS", maximum=MAX_SECONDS), _POP3.idleTimeout,
        "Seconds of inactivity before a POP3 session is logged out "
        "(RFC 1939: at least 600).  0: no limit.  At most a week (604800).",
    ),
    Setting(
        "greeting", "greeting", Greeting(200), DEFAULT_GREETING,
        "The POP3 greeting's text after +OK (Dovecot's login_greeting), e.g. "
        "one that does not name the software; at most 200 octets, without "
        "< or > (clients would take them for the APOP timestamp, which, "
        "when offered, follows it).",
    ),
    Setting(
        "login-timeout", "loginTimeout", Integer(metavar="SECONDS", maximum=MAX_SECONDS), _POP3.loginTimeout,
        "Seconds a POP3 client has from the greeting to complete its login; "
        "one still not logged in then is told so and disconnected, whatever "
        "it sent meanwhile (as Dovecot's login processes do after three "
        "minutes).  0: no limit.  At most a week (604800).",
    ),
    Setting(
        "login-delay", "loginDelay", Integer(metavar="SECONDS", maximum=MAX_SECONDS), None,
        "Minimum seconds between two logins of the same user, advertised as "
        "LOGIN-DELAY (RFC 2449).  At most a week (604800).",
        defaultText="no limit", example=300,
    ),
    Setting(
        "pop3-client-workarounds", "pop3ClientWorkarounds", ClientWorkarounds(), None,
        "Dovecot's pop3_client_workarounds, for old clients moved from a "
        "Dovecot that had them: names, separated by spaces or commas.  "
        "outlook-no-nuls: RETR and TOP send every NUL octet of a message as "
        "0x80 (Outlook and Outlook Express hang on a NUL).  oe-ns-eoh: they "
        "end a message whose header has no end (no empty line) with the "
        "empty line it lacks (Outlook Express and Netscape Mail need it); "
        "LIST, STAT and RETR's octet count still give the size as stored, "
        "as Dovecot's do.  By default messages are sent as stored.",
        defaultText="none", example="outlook-no-nuls oe-ns-eoh",
        converter=ClientWorkarounds.of,
    ),
    Setting(
        "default-quota", "defaultQuota", Size(zero=ZERO_QUOTA), None,
        "Storage quota of users who have none of their own (mailgate user "
        "quota), e.g. 1G or 500M.  SMTP and LMTP refuse a recipient it would "
        "take over quota: at RCPT for the size the client declares, at the end "
        "of DATA for the real one.",
        defaultText="no limit", example=1 << 30,
    ),
    Setting(
        "postmaster", "postmaster", MailAddress(), None,
        "The user who receives mail to postmaster (RFC 5321 section 4.5.1: "
        "every SMTP server accepts it): <postmaster> without a domain, and "
        "postmaster@ any domain mailgate accepts mail for that has no user "
        "of that name.  Without it, such mail is refused (550).",
        defaultText="none", example="admin@example.org",
    ),
    Setting(
        "recipient-delimiter", "recipientDelimiter", RecipientDelimiter(), None,
        "Characters that separate a user from a detail in a recipient's "
        "address, as Postfix's and Dovecot's recipient_delimiter: with +, "
        "SMTP and LMTP take mail for bob+lists@example.org as "
        "bob@example.org's, unless a user of that whole name exists.  The "
        "first of them in the local part counts.",
        defaultText="none", example="+",
    ),
    Setting(
        "delivered-to", "deliveredTo", Choice(DELIVERED_TO), "final",
        "Which Delivered-To: field SMTP and LMTP (and mailgate deliver with "
        "--sender) put at the top of each recipient's copy, after its "
        "Return-Path:, as Dovecot's lmtp_hdr_delivery_address: final names "
        "the recipient as the client named it at RCPT (bob+lists@example.org, "
        "an alias as the alias), for a POP3 user's client filters and "
        "fetchmail's multidrop mode; none writes no such field.  A message "
        "for several users is still stored once.",
    ),
    Setting(
        "quota-warning", "quotaWarnings", Integer(metavar="PERCENT", minimum=1, maximum=100), (),
        "A percentage of a user's quota (storage or messages): the delivery "
        "that brings the user's use to it puts a message into the user's "
        "maildrop saying how full it is and what to do, once each time the "
        "use goes past it (as Dovecot's quota_warning; a POP3 user sees "
        "nothing else before mail is refused).",
        repeated=True, example=[80, 95],
    ),
    Setting(
        "duplicate-window", "duplicateWindow", Integer(metavar="SECONDS", maximum=MAX_DAYS * DAY),
        DUPLICATE_WINDOW,
        "Seconds during which a message a user got by SMTP, LMTP or "
        "mailgate deliver, sent again from the same sender with the same "
        "octets, is taken for the client's retry (it lost the 250 after the "
        "commit: a timeout, a cut connection, a node killed) and answered "
        "as delivered without a second copy; 0 stores every copy.  Another "
        "message, or one passed on again by an MTA (its own Received field "
        "differs), is never taken for one, nor is a message without a "
        "Message-ID or Received field (a device's or a script's alert).",
    ),
    Setting(
        "quota-exceeded", "quotaExceeded", Choice(("temporary", "permanent")), "temporary",
        "How SMTP and LMTP refuse a recipient over quota: temporary (452 4.2.2, "
        "the MTA retries after the user made room) or permanent (552 5.2.2).",
    ),
    Setting(
        "quota-status-network", "quotaStatusNetworks", Network(), _QUOTA_STATUS_NETWORKS,
        "A network (CIDR) whose peers the quota-status listener answers (the "
        "Postfix servers in front); a connection from elsewhere is closed "
        "unread and logged.  Unix socket peers are always answered.",
        repeated=True, defaultText="loopback (127.0.0.0/8, ::1/128)",
    ),
    Setting(
        "quota-status-max-connections", "quotaStatusMaxConnections", Integer(), _QUOTA_STATUS_MAX_CONNECTIONS,
        "Most quota-status connections open at once, for every Postfix in front together: each of "
        "Postfix's smtpd processes keeps one, so the default is twice Postfix's default_process_limit "
        "(100); raise it above the smtpd processes of all of them.  More are closed unanswered, "
        "logged once a minute at most (quota_status.refused): Postfix then answers that recipient "
        "as its smtpd_policy_service_default_action says, by default 451 4.3.5 Server "
        "configuration problem, a temporary failure (the mail is deferred, not lost).  0 for no "
        "limit.",
    ),
    Setting(
        "quota-status-success", "quotaStatusSuccess", PolicyAction(), DUNNO,
        "What quota-status answers Postfix for a recipient with room "
        "(Dovecot's quota_status_success): DUNNO lets Postfix's other "
        "restrictions decide; OK would skip them.",
    ),
    Setting(
        "quota-status-nouser", "quotaStatusNouser", PolicyAction(), DUNNO,
        "What quota-status answers Postfix for an address of a domain served "
        "here that no user or alias has (Dovecot's quota_status_nouser): "
        "DUNNO leaves it to Postfix (and mailgate's LMTP), REJECT Unknown "
        "user refuses it at Postfix's RCPT.  A domain not served here is "
        "always DUNNO.",
    ),
    Setting(
        "quota-status-overquota", "quotaStatusOverquota", PolicyAction(), None,
        "What quota-status answers Postfix for a mailbox over quota, or that "
        "the message would put over it (Dovecot's quota_status_overquota), "
        "e.g. \"552 5.2.2 Mailbox is full\".",
        defaultText="as quota-exceeded says: 452 4.2.2 mailbox full (temporary), 552 5.2.2 mailbox full (permanent)",
        example="552 5.2.2 Mailbox is full",
    ),
    Setting(
        "quota-status-toolarge", "quotaStatusToolarge", PolicyAction(), None,
        "What quota-status answers Postfix for a message larger than the "
        "mailbox's whole quota (Dovecot's quota_status_toolarge).",
        defaultText="552 5.2.3 message larger than the mailbox's whole quota (N octets)",
        example="552 5.2.3 Message is too large for the mailbox",
    ),
    Setting(
        "expire-days", "expireDays", Days(), None,
        "Days a message is kept before the retention task removes it, for "
        "users without a value of their own (mailgate user expire); "
        "advertised as EXPIRE (RFC 2449).  never keeps mail until clients "
        "delete it.",
        defaultText="never", example=30,
    ),
    Setting(
        "keep-deleted-days", "keepDeletedDays", Integer(metavar="DAYS", maximum=MAX_DAYS), 0,
        "Days messages deleted by POP3 clients are kept (outside the quota) "
        "for mailgate mailbox deleted / restore; 0 removes them at once.",
    ),
    Setting(
        "auth-default-realm", "authDefaultRealm", Domain(), None,
        "The domain of a POP3 login name given without one (USER alice, as "
        "Dovecot's auth_default_realm): alice logs in as alice@DOMAIN.  For "
        "clients set up with the bare user name of a server that took it.  "
        "Names with a domain are as they are.",
        example="example.org",
    ),
    Setting(
        "master-users", "masterUsers", Boolean(), False,
        "Let master users (mailgate master add) log in to any user's maildrop with their own "
        "password, as Dovecot's master users do: by AUTH PLAIN with the user as the authorisation "
        "identity and the master user as the authentication identity, and with master-user-separator "
        "by USER user*master.  The user's disabled state, allowed networks and maildrop lock apply; "
        "every line of such a session names the master user.  Off, an authorisation identity naming "
        "another user is refused.",
        flags={"master-users": True},
    ),
    Setting(
        "master-user-separator", "masterUserSeparator", MasterUserSeparator(), None,
        "The character that separates a user's name from a master user's in a login name (USER, "
        "PLAIN, LOGIN), as Dovecot's auth_master_user_separator: with *, USER alice@example.org*admin "
        "and admin's password log in to alice's maildrop.  Set, master logins are on (as with master-users).",
        example="*",
    ),
    Setting(
        "auth-cache-size", "authCacheSize", Integer(), 10000,
        "Verified logins remembered (as keyed digests, never passwords), so "
        "a user's password hash is computed once per auth-cache-ttl rather "
        "than at every login, as Dovecot's auth_cache_size does; as many "
        "failed ones, so that a wrong password tried again against the same "
        "hash is refused without it.  0 turns the cache off: every login "
        "pays for the hash.",
    ),
    Setting(
        "auth-cache-ttl", "authCacheTTL", Integer(minimum=1, metavar="SECONDS", maximum=MAX_SECONDS), 3600,
        "Seconds a remembered login stays valid.  A password change takes "
        "effect at once whatever this says.  At most a week (604800).",
    ),
    Setting(
        "oauth2-keys", "oauth2Keys", Text("FILE"), (),
        "A file of the public keys that sign OAuth 2.0 access tokens (JWTs): a JWKS as the identity "
        "provider publishes it at its jwks_uri, one JWK, or PEM public keys or certificates.  Set, it "
        "turns on POP3 AUTH OAUTHBEARER and XOAUTH2 where PLAIN is offered (over TLS or from a "
        "trusted-network), with tokens validated here, without a call to the provider per login, as "
        "Dovecot's oauth2 passdb with local_validation_key_dict; needs oauth2-issuer and "
        "oauth2-audience.  SIGHUP reads the files again.",
        repeated=True, example=["/etc/mailgate/oauth2-jwks.json"],
    ),
    Setting(
        "oauth2-issuer", "oauth2Issuers", Text("URL"), (),
        "An issuer (iss claim, compared exactly) whose access tokens are accepted.",
        repeated=True, example=["https://login.example.org/realms/mail"],
    ),
    Setting(
        "oauth2-audience", "oauth2Audiences", Text("NAME"), (),
        "An audience (aud claim) an accepted access token must name: mailgate's client or resource "
        "id at the identity provider, so that tokens made for other services are refused.",
        repeated=True, example=["mailgate"],
    ),
    Setting(
        "oauth2-algorithm", "oauth2Algorithms", JWTAlgorithm(), _JWT_DEFAULT_ALGORITHMS,
        "A signature algorithm accepted on access tokens: " + ", ".join(_JWT_ALGORITHMS) + " (never none, "
        "never HS256 and its kin, whose key is a shared secret).",
        repeated=True,
    ),
    Setting(
        "oauth2-clock-skew", "oauth2ClockSkew", Integer(metavar="SECONDS", maximum=3600), 60,
        "Seconds of clock difference with the identity provider allowed on an access token's exp, "
        "nbf and iat, at most an hour (3600).",
    ),
    Setting(
        "oauth2-username-claim", "oauth2UsernameClaim", Text("CLAIM"), "email",
        "The access token's claim that names the user (as Dovecot's username_attribute), read as a "
        "USER name is (auth-default-realm applies); the user must exist in mailgate.",
    ),
    Setting(
        "max-connections", "maxConnections", Integer(), _policy.MAX_CONNECTIONS,
        "Most connections (POP3, SMTP and LMTP together) served at once; more "
        "are refused with -ERR [SYS/TEMP] / 421 4.7.0.  0 for no limit.  "
        "Lowered, with a warning at start, to fit the open file limit (ulimit "
        "-n, LimitNOFILE) less 256 descriptors kept for the database and the log "
        "(and with quota-status, less quota-status-max-connections).",
    ),
    Setting(
        "max-connections-per-ip", "maxConnectionsPerAddress", Integer(),
        _policy.MAX_CONNECTIONS_PER_ADDRESS,
        "Most connections from one client address (an IPv6 client's /64; the real one behind a "
        "haproxy: listener), except from exempt-network.  0 for no limit.",
    ),
    Setting(
        "auth-penalty-max", "authPenaltyMax", Number(), _policy.AUTH_PENALTY_MAX,
        "After failed logins from an address (or against one name from many "
        "addresses), its next login waits 2 seconds, doubling per failure, at "
        "most this many seconds.  0 turns the growing delay off.  At most a week (604800).",
    ),
    Setting(
        "ban-after", "banAfter", Integer(), _policy.BAN_AFTER,
        "Ban a client address at its Nth failed login within ban-window "
        "(counted across every node on the database).  0 for no bans.",
    ),
    Setting(
        "ban-window", "banWindow", Integer(minimum=1, metavar="SECONDS", maximum=_policy.MAX_BAN_TIME),
        _policy.BAN_WINDOW,
        "Seconds over which failed logins are counted (at most ten years).",
    ),
    Setting(
        "ban-time", "banTime", Integer(minimum=1, metavar="SECONDS", maximum=_policy.MAX_BAN_TIME),
        _policy.BAN_TIME,
        "Seconds a ban lasts, at most ten years (see also: mailgate ban list|add|del).",
    ),
    Setting(
        "unknown-recipient-slow-after", "unknownRecipientSlowAfter", Integer(),
        _policy.UNKNOWN_RECIPIENT_SLOW_AFTER,
        "From the Nth SMTP recipient refused as unknown (550 5.1.1) to one client "
        "address within ban-window (across its sessions and every node; never "
        "exempt-network, never LMTP), every error reply of its SMTP sessions waits, "
        "from their first error: 2 seconds, doubling with each further unknown "
        "recipient, at most 15.  Slows address harvesting; a mail server delivering "
        "a list with stale addresses only gets its 550s later.  0: never.",
    ),
    Setting(
        "unknown-recipient-ban-after", "unknownRecipientBanAfter", Integer(),
        _policy.UNKNOWN_RECIPIENT_BAN_AFTER,
        "Ban a client address (for ban-time, reason unknown-rcpt) at its Nth SMTP "
        "recipient refused as unknown within ban-window, across every node.  0 (the "
        "default): never, since a ban refuses all of that address's mail, and a "
        "large provider's outbound server carries a harvester's messages along "
        "with its users' (Stalwart bans at 35 a day, Postfix and sendmail never).",
    ),
    Setting(
        "exempt-network", "exemptNetworks", ExemptNetwork(), tuple(DEFAULT_EXEMPT_NETWORKS),
        "A network (CIDR) never penalised, banned or limited per address "
        "(webmail, monitoring); none exempts nothing.",
        repeated=True,
    ),
    Setting(
        "shutdown-grace", "shutdownGrace", Number(), 30.0,
        "Seconds open sessions get to finish when the server stops (SIGTERM): "
        "a POP3 QUIT in that time applies its deletions, an SMTP/LMTP message "
        "being received is committed; new connections are refused at once.  "
        "At most a week (604800).",
    ),
    Setting(
        "cpu-affinity", "cpuAffinity", CPUList(), None,
        "CPUs (such as 2, or 2-3) for the reactor thread and the database "
        "threads, which wake each other at nearly every command: on one CPU "
        "that costs far less than across CPUs, most of all in a virtual "
        "machine.  mailgate's Python runs one thread at a time, so one CPU "
        "is what it uses anyway; password hashing stays free to run on any.  "
        "Give each mailgate process on a machine its own CPU.  Unset: the "
        "kernel places every thread.",
        example="2",
    ),
    Setting(
        "memory-trim-interval", "memoryTrimInterval", Integer(metavar="SECONDS", maximum=MAX_SECONDS),
        TRIM_INTERVAL,
        "Seconds between returns of freed memory to the system: when sessions "
        "have ended since the last one, the C library's free memory (OpenSSL's "
        "buffers above all) is handed back, so that the RSS falls again after "
        "a burst of connections instead of staying at its peak.  glibc only; "
        "0: never.  At most a week (604800).",
    ),
    Setting(
        "log-format", "logFormat", Choice(LOG_FORMATS), "text",
        "How twistd's log is written: text (human lines) or json (one JSON "
        "object per line, with time, level, event, session, protocol, peer "
        "and user).",
    ),
    Setting(
        "debug-peer", "debugPeers", Network(), (),
        "A network (CIDR) whose clients' sessions are traced in the log "
        "(session.trace: each command and the first line of each reply), as "
        "Postfix's debug_peer_list: for finding out why one client fails.  "
        "Passwords, SASL exchanges and message content are never shown.",
        repeated=True, example=["192.0.2.7/32"],
    ),
    Setting(
        "debug-user", "debugUsers", MailAddress(), (),
        "A user whose sessions are traced in the log (as debug-peer): POP3 "
        "from the USER command naming it, or the login as it, on; SMTP and "
        "LMTP from a RCPT naming it on.",
        repeated=True, example=["alice@example.org"],
    ),
)

_BY_NAME = {s.name: s for s in SETTINGS}


def setting(name):
    """
    The L{Setting} of a long option name.
    """
    return _BY_NAME[name]


# -- the configuration ------------------------------------------------------------


def _wholeNumber(value):
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _wholeNumbers(setting):
    """
    The converter of a whole-number setting (L{Integer}, L{Size}): an
    embedder's whole float (C{loginDelay=600.0}, C{maxMessageSize=50e6})
    becomes the C{int} the command line and the file give.  Kept a float,
    it passed L{checkConfig} and was advertised as one (C{LOGIN-DELAY
    600.0}, C{SIZE 50000000.0}; RFC 2449 and RFC 1870 want digits).  Any
    other value is left for L{checkConfig} to refuse (a fraction, nan, a
    repeated setting given as one value).
    """
    if not isinstance(setting.kind, (Integer, Size)):
        return None
    if not setting.repeated:
        return _wholeNumber

    def wholeNumbers(values):
        if isinstance(values, (list, tuple)):
            return type(values)(_wholeNumber(v) for v in values)
        return values

    return wholeNumbers


def makeConfigClass(settings):
    """
    The configuration class of C{settings}: one attribute per setting,
    defaulting to its declared default, plus C{reloadOnSIGHUP}.
    """
    attributes = {}
    for s in settings:
        attributes[s.attribute] = attr.ib(factory=s.defaultValue, converter=s.converter or _wholeNumbers(s))
    attributes["reloadOnSIGHUP"] = attr.ib(default=False)
    cls = attr.make_class("MailgateConfig", attributes, kw_only=True)
    cls.__module__ = __name__
    fields = "\n".join(
        textwrap.fill(
            f"@ivar {s.attribute}: {s.help} (C{{--{s.name}}}; default: {s.describeDefault()}.)",
            76,
            break_on_hyphens=False,
            initial_indent="    ",
            subsequent_indent="        ",
        )
        for s in settings
    )
    cls.__doc__ = (
        "\n    Everything mailgate can be told, with its defaults: one attribute per\n"
        "    L{Setting} of L{SETTINGS} (the defaults are declared there), plus\n"
        "    C{reloadOnSIGHUP}.\n\n"
        f"{fields}\n"
        "    @ivar reloadOnSIGHUP: reload the certificate and key (and reopen the\n"
        "        log file) on SIGHUP.\n    "
    )
    return cls


MailgateConfig = makeConfigClass(SETTINGS)


def checkConfig(config, settings=SETTINGS):
    """
    The checks that involve several settings (or several values of one),
    made once for every way a configuration is built (command line, file,
    embedding).

    @raise ConfigurationError: saying what does not fit.
    """
    for s in settings:
        value = getattr(config, s.attribute)
        if s.repeated and not isinstance(value, (list, tuple)):
            # An embedder's MailgateConfig(pop3="tcp:110") or
            # quotaWarnings=80: read on as a list, a string is its
            # characters and a number no list at all (a TypeError later).
            raise ConfigurationError(f"{s.attribute}: a list of values, not {value!r}")
        if isinstance(s.kind, (Integer, Number, Size)):
            # The bounds the command line and the file enforce hold for an
            # embedding application's MailgateConfig(...) too (a retention
            # of 0 days, a negative count, nan, a delay of 1e300, a quota
            # past 1024T), named as it names them.
            for number in value if s.repeated else [value]:
                if isinstance(number, (int, float)) and not isinstance(number, bool):
                    try:
                        s.kind.check(number)
                    except ValueError as e:
                        raise ConfigurationError(f"{s.attribute}: {_oneLine(e)}") from None
        if s.repeated:
            try:
                s.kind.checkList(value)
            except ValueError as e:
                raise ConfigurationError(f"{s.name}: {_oneLine(e)}") from None
    if (config.tlsCertificate is None) != (config.tlsKey is None):
        raise ConfigurationError("TLS needs both a certificate and a key")
    if config.pop3s and config.tlsCertificate is None:
        raise ConfigurationError("implicit-TLS listeners need a certificate and a key")
    if (config.tlsAltCertificate is None) != (config.tlsAltKey is None):
        raise ConfigurationError("the alternative TLS certificate needs both tls-alt-cert and tls-alt-key")
    if config.tlsAltCertificate is not None and config.tlsCertificate is None:
        raise ConfigurationError("tls-alt-cert and tls-alt-key go beside tls-cert and tls-key, which are not set")
    if config.tlsNamedCertificates and config.tlsCertificate is None:
        raise ConfigurationError("tls-sni-cert goes beside tls-cert and tls-key, which are not set")
    for name, networks in (
        ("smtp-cleartext-network", config.smtpCleartextNetworks),
        ("lmtp-cleartext-network", config.lmtpCleartextNetworks),
    ):
        if config.tlsCertificate is None and not coversEveryAddress(networksOf(networks)):
            raise ConfigurationError(
                f"{name} asks for STARTTLS from other networks, which needs tls-cert and tls-key (not set): "
                "without them all their mail would be refused"
            )
    if config.oauth2Keys and not (config.oauth2Issuers and config.oauth2Audiences):
        raise ConfigurationError("oauth2-keys needs oauth2-issuer and oauth2-audience (which tokens to accept)")
    if (config.oauth2Issuers or config.oauth2Audiences) and not config.oauth2Keys:
        raise ConfigurationError("oauth2-issuer and oauth2-audience go with oauth2-keys, which is not set")
    if not config.oauth2Algorithms:
        raise ConfigurationError("oauth2-algorithm: at least one algorithm")
    return config


def checkListening(config, path=None):
    """
    The check C{twistd mailgate} makes of what it is to serve, beyond
    L{checkConfig} (an embedding application may build mailgate without
    listeners): it listens on something.  An empty pop3 list (in a file,
    say) turns the default listener off, and a server on nothing is a
    mistake, not a deployment.  Made at start, by C{mailgate config
    --check} and at a reload, so that all three refuse the same files.

    Nor may two listeners bind the same address: the second one's start
    failed with "address already in use", exit 1, which systemd takes
    for a port the process before still holds and tries again, for ever.

    @param path: the configuration file, to name in the message.
    @raise ConfigurationError: nothing to listen on, or two listeners on
        one address.
    """
    where = f" (in {path})" if path else ""
    if not (config.pop3 or config.pop3s or config.smtp or config.lmtp or config.quotaStatus):
        raise ConfigurationError("nothing to listen on: pop3, pop3s, smtp and lmtp are all empty" + where)
    clash = sharedAddress(config)
    if clash:
        raise ConfigurationError(clash + where)
    return config


#: the settings whose values are listeners, in the order they start
LISTENER_SETTINGS = ("pop3", "pop3s", "smtp", "lmtp", "quota-status", "metrics")

#: the settings of a C{--config} file that the C{mailgate} command reads
#: as the server's, at each run (L{mailgate.cli}: the store's defaults
#: every command applies, and what C{mailgate deliver}, an MTA's pipe
#: transport, delivers with), beside C{database}: changed in the file, they
#: apply there at once, while a running server takes them at its restart
COMMAND_SETTINGS = frozenset({
    "default-quota", "expire-days", "keep-deleted-days", "quota-warning", "duplicate-window",
    "recipient-delimiter", "quota-exceeded", "hostname", "spool-directory", "postmaster", "domain",
    "max-message-size", "delivered-to",
})


def sharedAddress(config):
    """
    What two listeners of C{config} that would bind one address are, as
    a message, or C{None}: the same Unix socket, or the same TCP port
    where their interfaces meet (the same address, or the wildcard
    address of its family; a C{tcp6:} listener on C{::} takes IPv4
    connections too where the kernel makes IPv6 sockets dual-stack, as
    Linux does by default).  Port 0 (any free port) meets nothing.
    """
    bound = []
    for name in LISTENER_SETTINGS:
        values = getattr(config, setting(name).attribute)
        for description in ([values] if isinstance(values, str) else values or ()):
            try:
                address = _listeningAddress(serverFromString(None, description))
            except Exception:
                # Refused with its reason elsewhere (checkEndpoint).
                continue
            if address is None or address[0] == "tcp" and address[1] == 0:
                continue
            for otherName, otherDescription, other in bound:
                if _meet(address, other):
                    versions = {
                        getattr(_interface(a[2]), "version", None) for a in (address, other) if a[0] == "tcp"
                    }
                    why = (
                        " (an IPv6 listener on :: takes IPv4 connections too: net.ipv6.bindv6only is 0)"
                        if versions == {4, 6} else ""
                    )
                    return (
                        f"{otherName} {otherDescription} and {name} {description} would listen on "
                        f"the same address ({_describeAddress(other)}){why}: the second could not start"
                    )
            bound.append((name, description, address))
    return None


def _describeAddress(address):
    if address[0] == "unix":
        return address[1]
    return f"port {address[1]}" + (f" of {address[2]}" if address[2] else "")


def _meet(one, other):
    """
    Whether two L{_listeningAddress} values are one address to bind.
    """
    if one[0] != other[0]:
        return False
    if one[0] == "unix":
        return one[1] == other[1]
    if one[1] != other[1]:
        return False
    first, second = _interface(one[2]), _interface(other[2])
    if first == second:
        return True
    if isinstance(first, str) or isinstance(second, str):
        # A host name: what it names is known only once looked up.
        return False
    for wildcard, address in ((first, second), (second, first)):
        if not wildcard.is_unspecified:
            continue
        if wildcard.version == address.version or wildcard.version == 6 and _dualStack():
            return True
    return False


def _interface(text):
    """
    The address of a TCP listener's interface (C{""}: IPv4's wildcard), or
    its text where it is a host name.
    """
    try:
        # A link-local address keeps its zone (fe80::1%eth0): one per
        # interface may be bound.  ::ffff:127.0.0.1 binds 127.0.0.1.
        address = ipaddress.ip_address(text or "0.0.0.0")
        return getattr(address, "ipv4_mapped", None) or address
    except ValueError:
        return text.lower()


def _dualStack():
    """
    Whether IPv6 sockets take IPv4 connections too (Linux's
    net.ipv6.bindv6only of 0, its default), so that a listener on C{::}
    holds the IPv4 port of the same number.
    """
    try:
        with open("/proc/sys/net/ipv6/bindv6only") as f:
            return f.read().strip() == "0"
    except OSError:
        return False


# -- the configuration file --------------------------------------------------------


class ConfigFileError(ConfigurationError):
    """
    The configuration file cannot be used; the message names the file and,
    where one is at fault, the key.
    """


class EnvironmentValueError(ConfigurationError):
    """
    An environment variable that gives a setting (C{$MAILGATE_DATABASE})
    has a value that cannot be used; the message names the variable.  It
    comes from the service's environment (a systemd unit's C{Environment=}
    or C{EnvironmentFile=}), not from a command line typed at a terminal:
    the server refuses it as it refuses a configuration file's value (exit
    78, which the unit does not retry), not as a usage error (exit 1).
    """


def readFile(path, settings=SETTINGS):
    """
    Read a TOML configuration file whose keys name C{settings}.

    @return: C{{setting name: value}} for the keys the file sets.
    @raise ConfigFileError: the file cannot be read or parsed, has a key
        that names no setting, or a value of the wrong type or an invalid
        one (the first such key is named).
    """
    if not os.fspath(path).strip():
        # --config "" (a variable of a unit's command line, unset): the
        # server took it for no file at all, and served its defaults.
        raise ConfigFileError("--config names no file (an empty path)")
    try:
        text = _readRegularFile(path)
        if text.startswith(codecs.BOM_UTF8):
            # What Windows editors put before UTF-8 text; tomllib says
            # "Invalid statement (at line 1, column 1)" of it, which
            # points at nothing the administrator can see.
            raise ConfigFileError(
                f"{path}: starts with a byte order mark (U+FEFF, as some editors save UTF-8); "
                "save it without one"
            )
        document = tomllib.loads(text.decode("utf-8"))
    except OSError as e:
        raise ConfigFileError(f"{path}: cannot read the configuration file: {e.strerror}") from None
    except UnicodeDecodeError as e:
        # tomllib decodes the whole file first: TOML is UTF-8 text.
        raise ConfigFileError(
            f"{path}: not UTF-8 text (byte {e.start} is {e.object[e.start:e.start + 1]!r}); "
            "a configuration file is TOML, which is UTF-8"
        ) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigFileError(f"{path}: not valid TOML: {_oneLine(e)}") from None
    except RecursionError:
        # tomllib recurses once per level of nested arrays or tables: a
        # file of thousands of "[" was a traceback.
        raise ConfigFileError(f"{path}: not valid TOML: arrays or tables nested too deeply") from None
    byName = {s.name: s for s in settings}
    values = {}
    for key, value in document.items():
        s = byName.get(key)
        if s is None:
            close = difflib.get_close_matches(key, byName, n=1)
            if key == "config":
                # --config is a long option too: "keys are the long option
                # names" told the administrator it should have worked.
                hint = " (a configuration file cannot name another: --config is given on the command line only)"
            elif close:
                hint = f" (did you mean {close[0]!r}?)"
            else:
                hint = " (keys are the long option names of twistd mailgate)"
            raise ConfigFileError(f"{path}: unknown key {key!r}{hint}")
        try:
            values[key] = s.fromTOML(value)
        except ValueError as e:
            raise ConfigFileError(f"{path}: key {key!r}: {_oneLine(e)}") from None
    return values


#: The largest configuration file read: the example, every key with its
#: help, is about 20 KB; a file past this is some other one named by
#: mistake (a log), not to be read into memory whole.
MAX_FILE_SIZE = 1 << 20

_FILE_KINDS = (
    (stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
)


def _readRegularFile(path):
    """
    The octets of the configuration file at C{path}, which must be a
    regular file of at most L{MAX_FILE_SIZE} octets.

    Opened without waiting: a FIFO no process writes to held open() for
    good (the start, C{config --check}, and a reload in the reactor), and
    a device such as C{/dev/zero} was read until memory ran out.

    @raise OSError: it cannot be opened or read.
    @raise ConfigFileError: it is not a regular file, or too large.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        found = os.fstat(fd)
        mode = found.st_mode
        if _isNullDevice(found):
            # The customary empty file (--config /dev/null: the defaults),
            # read as such before devices were refused.
            os.close(fd)
            return b""
        if not stat.S_ISREG(mode):
            what = next((name for test, name in _FILE_KINDS if test(mode)), "not a file")
            raise ConfigFileError(f"{path}: cannot read the configuration file: it is {what}, not a regular file")
        os.set_blocking(fd, True)
        f = open(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with f:
        text = f.read(MAX_FILE_SIZE + 1)
    if len(text) > MAX_FILE_SIZE:
        raise ConfigFileError(
            f"{path}: larger than 1 MiB: not a configuration file (the example, contrib/mailgate.toml, "
            "is about 20 KB)"
        )
    return text


def _isNullDevice(found):
    """
    Whether C{found} (a stat result) is C{/dev/null}'s: a device, but one
    read as an empty file, which neither waits nor runs on.
    """
    try:
        null = os.stat(os.devnull)
    except OSError:
        return False
    return stat.S_ISCHR(found.st_mode) and stat.S_ISCHR(null.st_mode) and found.st_rdev == null.st_rdev


def _linkChain(path):
    """
    The names C{path} leads through: itself (absolute), each symbolic link
    it is or points to, in order, and the file at the end (its real path).
    """
    names = [os.path.abspath(path)]
    current = names[0]
    # The kernel follows at most 40 links.
    for _ in range(40):
        try:
            target = os.readlink(current)
        except OSError:
            break
        current = os.path.join(os.path.realpath(os.path.dirname(current)), target)
        names.append(os.path.normpath(current))
    names.append(os.path.realpath(path))
    return names


#: What whoever may change the configuration file may do.
_REPLACED = "and so the database, listeners and certificates the server uses at its next start or reload chosen"


def _pathDirectories(path):
    """
    Every directory whose replacement changes the file C{path} names: the
    directory of the name given, of each symbolic link it leads through and
    of the file at the end (L{_linkChain}), in that order, then each of
    their parents up to C{/}.  A user who may rename an entry of any of
    them may put a directory of their own in its place, with a file of
    their own below: OpenSSH's C{StrictModes} walks the same way
    (C{safe_path} in its C{misc.c}).
    """
    near = [os.path.dirname(name) for name in _linkChain(path)]
    above = []
    for directory in near:
        while directory != os.path.dirname(directory):
            directory = os.path.dirname(directory)
            above.append(directory)
    return list(dict.fromkeys(near + above))


def writableByOthers(path):
    """
    What to warn of, if anything, in who may change the configuration file
    at C{path}: every user of the machine may write it, or replace it in a
    directory they may write (without the sticky bit, which keeps them to
    their own files), be it the file's directory or one above it
    (L{_pathDirectories}).  Whoever may chooses the server's database (one
    of their own takes every message and login), listeners and
    certificates at its next start or reload.  Warned of, not refused, as
    the file's other permissions are.
    """
    try:
        found = os.stat(path)
    except OSError:
        return None
    mode = stat.S_IMODE(found.st_mode)
    if _isNullDevice(found):
        # Every user may write it (0666), and it holds nothing all the same.
        return None
    if mode & stat.S_IWOTH:
        return (
            f"the configuration file {path} may be written by every user of this machine (mode {mode:04o}), "
            f"{_REPLACED}: chmod o-w it"
        )
    near = {os.path.dirname(name) for name in _linkChain(path)}
    for directory in _pathDirectories(path):
        try:
            directoryMode = os.stat(directory).st_mode
        except OSError:
            continue
        if directoryMode & stat.S_IWOTH and not directoryMode & stat.S_ISVTX:
            where = "of" if directory in near else "above"
            return (
                f"the directory {directory} {where} the configuration file {path} may be written by every user of "
                f"this machine (mode {stat.S_IMODE(directoryMode):04o}), who may replace the file, {_REPLACED}: "
                f"chmod o-w {directory}"
            )
    return None


def _notTrusted():
    """
    Whom an owner is not, said of it: root, and the user this process runs as.
    """
    return "not root" if os.geteuid() == 0 else f"neither root nor {ownerName(os.geteuid())}"


def ownedByOthers(path):
    """
    What to warn of, if anything, in who owns the configuration file at
    C{path} and the directories its replacement goes through
    (L{_pathDirectories}): a user neither root nor the one this process
    runs as.  The owner of the file may rewrite it, the owner of a
    directory rename what it holds (and chmod either at will), whatever
    their modes say, and so choose what the server serves, as a file every
    user may write (L{writableByOthers}).  A symbolic link on the way
    counts where its directory has the sticky bit (/tmp), which leaves
    its owner the one who may replace it.  The first found is named.
    """
    trusted = {0, os.geteuid()}
    try:
        found = os.stat(path)
    except OSError:
        return None
    if _isNullDevice(found):
        return None
    if found.st_uid not in trusted:
        return (
            f"the configuration file {path} is owned by {ownerName(found.st_uid)}, {_notTrusted()}, who may "
            f"rewrite it, {_REPLACED}: chown root it"
        )
    chain = _linkChain(path)
    for name in chain[:-1]:
        try:
            link, directoryMode = os.lstat(name), os.stat(os.path.dirname(name)).st_mode
        except OSError:
            continue
        if stat.S_ISLNK(link.st_mode) and directoryMode & stat.S_ISVTX and link.st_uid not in trusted:
            subject = (
                f"the configuration file {path}, a symbolic link" if name == chain[0]
                else f"the symbolic link {name} to the configuration file {path}"
            )
            return (
                f"{subject} in a directory with the sticky bit, is owned by {ownerName(link.st_uid)}, "
                f"{_notTrusted()}, who may replace it, {_REPLACED}: chown -h root {name}"
            )
    near = {os.path.dirname(name) for name in chain}
    for directory in _pathDirectories(path):
        try:
            owner = os.stat(directory).st_uid
        except OSError:
            continue
        if owner not in trusted:
            where = "of" if directory in near else "above"
            return (
                f"the directory {directory} {where} the configuration file {path} is owned by {ownerName(owner)}, "
                f"{_notTrusted()}, who may replace the file, {_REPLACED}: chown root {directory}"
            )
    return None


def _oneLine(error):
    return " ".join(str(error).split())


def resolve(given, fileValues=None, environ=None, settings=SETTINGS, configClass=MailgateConfig):
    """
    The configuration from the command line, a configuration file and the
    environment, each overriding the ones after it, then the defaults.

    @param given: C{{setting name: value}} given on the command line,
        already checked.
    @param fileValues: what L{readFile} returned, or C{None}.
    @param environ: the environment (L{os.environ} by default).
    @param settings: the declarations, and C{configClass} the class made
        from them (L{makeConfigClass}).
    @raise ConfigurationError: an environment variable's value is invalid,
        or the settings do not fit together (L{checkConfig}).
    """
    environ = os.environ if environ is None else environ
    fileValues = fileValues or {}
    values = {}
    for s in settings:
        if s.name in given:
            value = given[s.name]
        elif s.name in fileValues:
            value = fileValues[s.name]
        elif s.environment and environ.get(s.environment):
            try:
                value = s.kind.fromText(environ[s.environment])
            except ValueError as e:
                raise EnvironmentValueError(f"${s.environment}: {_oneLine(e)}") from None
        else:
            value = s.defaultValue()
        values[s.attribute] = list(value) if s.repeated else value
    return checkConfig(configClass(**values), settings)


def resolveFile(path, given=None, environ=None, settings=SETTINGS, configClass=MailgateConfig):
    """
    L{resolve} with the configuration file at C{path} (C{None}: none), read
    by L{readFile}: a setting that does not fit with the others (a
    certificate without its key) in the file alone is the file's fault,
    named as every other fault of the file is (L{ConfigFileError}: exit 78
    at start, so that systemd does not start the server again and again
    on the same file), rather than a usage error without the file's name
    (exit 1, which systemd's Restart=on-failure retries).

    @raise ConfigFileError: the file is at fault.
    @raise ConfigurationError: the command line or the environment (with
        or without the file) is.
    """
    fileValues = readFile(path, settings) if path is not None else None
    try:
        return resolve(given or {}, fileValues, environ, settings, configClass)
    except ConfigFileError:
        raise
    except ConfigurationError as e:
        if fileValues is None:
            raise
        try:
            resolve({}, fileValues, {}, settings, configClass)
        except ConfigurationError:
            raise ConfigFileError(f"{path}: {_oneLine(e)}") from None
        raise


# -- the example file ----------------------------------------------------------------


EXAMPLE_HEADER = """\
# mailgate configuration: twistd mailgate --config /etc/mailgate/mailgate.toml
#
# Every key is a long option of `twistd mailgate` (see `twistd mailgate
# --help`); an option given on the command line wins over this file.  An
# unknown key, a value of the wrong type or an invalid value stops start-up
# with one line naming the key and this file.
#
# Each key below is shown commented out with its default value; where there
# is no default, with an example.  Lists replace the default, they do not
# add to it.  A relative path (sqlite:///FILE, tls-cert, unix:PATH) is
# relative to the server's working directory (/var/lib/mailgate under the
# systemd unit), not to this file, and for the mailgate command given this
# file (mailgate --config FILE user add, an MTA's mailgate deliver) to the
# directory that runs in: give the database as an absolute path
# (sqlite:////var/lib/mailgate/mailgate.sqlite3).  $VARIABLES are not
# expanded.
#
# systemctl reload (SIGHUP) reads this file again: debug-peer, debug-user
# and, while TLS stays on, the tls-* settings apply at once; greeting,
# idle-timeout, login-timeout, auth-failure-delay, pop3-client-workarounds,
# max-message-size, max-recipients, min-data-rate, smtp-idle-timeout,
# trusted-network, smtp-cleartext-network, lmtp-cleartext-network,
# proxy-network and xclient-network to the sessions opened after it (those under way keep
# theirs); max-connections,
# max-connections-per-ip, auth-penalty-max, ban-after, ban-window,
# ban-time, unknown-recipient-slow-after, unknown-recipient-ban-after,
# exempt-network and quota-status-max-connections to the connections and
# failed logins after it (the connections open, the failures counted and
# the bans in force stay);
# default-quota, quota-warning, expire-days, keep-deleted-days and
# duplicate-window to the next delivery and the retention round the
# reload starts; domain, postmaster, recipient-delimiter, delivered-to,
# quota-exceeded and spool-directory to the recipients and messages after it;
# quota-status-success, quota-status-nouser, quota-status-overquota and
# quota-status-toolarge to the quota-status answers after it;
# smtp-soft-error-limit and smtp-error-sleep-time to the SMTP error
# replies after it; login-delay, auth-cache-size and auth-cache-ttl to
# the logins after it (a cache turned off forgets what it held);
# hostname to the sessions opened after it; shutdown-grace to the next
# stop; memory-trim-interval and tls-ticket-key-rotation from it on (the
# next trim and key a new period later); while OAuth stays on, the
# oauth2-* settings to the logins after it; every other change (OAuth
# turned on or off too) waits for a restart (systemctl restart
# mailgate), named in the log (config.restart_needed) and by systemctl
# status until then.  A file the server would refuse at start is refused
# by the reload too, and what is in service stays.
#
# This file is generated from mailgate/config.py (python -m mailgate.config).
"""


def exampleFile(settings=SETTINGS):
    """
    The commented example configuration file: every key with its help text
    and its default (or an example value where it has none).
    """
    parts = [EXAMPLE_HEADER]
    for s in settings:
        lines = textwrap.wrap(s.help, 76, break_on_hyphens=False)
        if s.repeated:
            lines += ["An array: repeat the option on the command line for several."]
        unset = s.default is None or (s.repeated and not s.default)
        value = s.example if unset else s.default
        if unset:
            lines.append(f"Default: {s.describeDefault()}; for example:")
        elif s.defaultText is not None:
            lines.append(f"Default: {s.defaultText}.")
        if s.repeated:
            shown = "[" + ", ".join(s.kind.toTOML(v) for v in value) + "]"
        else:
            shown = s.kind.toTOML(value)
        parts.append("\n" + "".join(f"# {line}\n" for line in lines) + f"#{s.name} = {shown}\n")
    return "".join(parts)


def effectiveFile(config, settings=SETTINGS, everything=False):
    """
    The configuration C{config} serves, as a configuration file (Postfix's
    C{postconf -n}, Dovecot's C{doveconf -n}): each setting not at its
    default (with C{everything}, each one), the database URL's password
    hidden.  Read back, it gives the same configuration, but for that
    password.
    """
    lines = []
    for s in settings:
        value = getattr(config, s.attribute)
        if s.repeated:
            value = list(value)
        if not everything and value == s.defaultValue():
            continue
        if value is None:
            # TOML has no "none": the setting left out is.
            lines.append(f"#{s.name} =   (none)\n")
            continue
        if s.attribute == "database":
            value = shownURL(value)
        if s.repeated:
            shown = "[" + ", ".join(s.kind.toTOML(v) for v in value) + "]"
        else:
            shown = s.kind.toTOML(value)
        lines.append(f"{s.name} = {shown}\n")
    return "".join(lines)


if __name__ == "__main__":
    sys.stdout.write(exampleFile())
