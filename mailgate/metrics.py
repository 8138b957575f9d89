# -*- test-case-name: tests.test_metrics -*-
"""
What mailgate counts, for Prometheus.

The protocols, the store and the policy report what happens through the
methods of L{Metrics}; this module alone knows how it is exported (with
prometheus-client).  Metric names and label values are a contract
(dashboards and alerts depend on them) and every label value comes from a
small fixed set: never a user name or an address.  A value outside its set
is counted under C{"other"} (C{"OTHER"} for POP3 commands), so a caller's
mistake can never make the number of series grow without bound.

Label values used by callers:
  - C{protocol}: C{"pop3"}, C{"smtp"}, C{"lmtp"}; and in the
    connection series (open, admitted, refused) C{"quota-status"}
  - C{mechanism}: C{"user"} (USER/PASS), C{"apop"}, and the SASL mechanism
    names in lower case (C{"plain"}, C{"login"}, C{"cram-md5"},
    C{"scram-sha-256"}, and with C{--oauth2-keys} C{"oauthbearer"} and
    C{"xoauth2"})
  - login C{result}: C{"ok"}, C{"failed"}, C{"banned"}, C{"in_use"},
    C{"disabled"}, C{"network"} (the user's allowed networks refused the
    client's address), C{"tempfail"}
  - delivery C{result}: C{"accepted"}, C{"rejected"}, C{"tempfail"}
  - timeout C{kind}: C{"idle"}, C{"login"}, C{"data_rate"}
  - refusal C{reason}: C{"banned"}, C{"too_many"} (C{--max-connections}
    or C{--max-connections-per-ip}; with C{protocol} C{"quota-status"},
    C{--quota-status-max-connections}), C{"shutting_down"}; with
    C{protocol} C{"quota-status"} also C{"network"} (a peer outside
    C{--quota-status-network})
  - POP3 C{command}: the RFC command names in upper case; anything else
    is counted as C{"OTHER"}
  - XCLIENT C{command}: C{"XFORWARD"} (SMTP, LMTP), C{"XCLIENT"}; its
    C{result}: C{"accepted"}, C{"refused_network"}, C{"refused_sequence"},
    C{"refused_syntax"}
  - database C{operation}: the name of the store's interaction (the
    function run on a worker thread, without its leading underscore:
    C{"findUser"}, C{"deliver"}, C{"openMessages"}, ...), a set fixed by
    the code.

The protocols and the policy report on the reactor thread, and their
counters and gauges are plain numbers read when scraped (see
L{_ReactorSeries}); what the store reports from its worker threads goes to
prometheus-client's own thread-safe types.

L{mailgate.metricssite} serves them over HTTP (C{--metrics}), in a module
of its own: a process without that listener (C{mailgate deliver}, a
server without C{--metrics}) does not import Twisted Web.
"""

from prometheus_client import (
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from mailgate import __version__

PROTOCOLS = ("pop3", "smtp", "lmtp")
#: every mechanism a POP3 login may use (each SASL mechanism the server can
#: offer, L{mailgate.auth.sasl.SASLServer.mechanisms}, in lower case): one
#: left out was counted as C{"other"}, as OAuth 2.0 logins were
MECHANISMS = ("user", "apop", "plain", "login", "cram-md5", "scram-sha-256", "oauthbearer", "xoauth2")
LOGIN_RESULTS = ("ok", "failed", "banned", "in_use", "disabled", "network", "tempfail")
#: how a message ended: stored, refused for good, refused for now, or
#: a client's retry of a message its recipients already had (answered as
#: delivered, not stored again)
DELIVERY_RESULTS = ("accepted", "rejected", "tempfail", "duplicate")
#: why a session was closed by a timer: silence (every protocol), no login
#: in time (POP3), message data arriving too slowly (SMTP, LMTP)
TIMEOUT_KINDS = ("idle", "login", "data_rate")
#: why a connection was refused as it arrived: the reason the policy (or
#: the shutdown) gives, to its label value
REFUSAL_REASONS = {
    "banned": "banned", "too many connections": "too_many", "shutting down": "shutting_down",
    # closed unanswered by the accept loop: the process had no descriptor
    # left to serve it (see mailgate.session.accepting)
    "no descriptors": "no_descriptors",
    # closed by the PROXY wrapper before a session began: from an address
    # outside --proxy-network, or a missing, late or malformed header
    # (see mailgate.session.proxy)
    "not a balancer": "not_balancer", "bad PROXY header": "proxy_header",
}
#: the listeners whose connections are counted (open, admitted, refused):
#: the mail protocols', and the quota-status service's
REFUSING_PROTOCOLS = PROTOCOLS + ("quota-status",)
#: why the quota-status service closed a connection unread, to its label
#: value: a peer outside C{--quota-status-network} (C{network}: not
#: C{not_balancer}, which names C{--proxy-network}'s refusal), and past
#: C{--quota-status-max-connections}.  Its own set: a series for each of
#: the mail protocols' reasons would be zeros, and theirs need no
#: C{network} one.
QUOTA_STATUS_REFUSALS = {"not on quota-status-network": "network", "too many connections": "too_many"}
POP3_COMMANDS = (
    "USER", "PASS", "APOP", "AUTH", "STLS", "CAPA", "QUIT",
    "STAT", "LIST", "RETR", "DELE", "NOOP", "RSET", "TOP", "UIDL",
)
#: why the database's writes fail: no room left (a full disk, a full
#: tablespace), or anything else (read-only, unreachable, ...)
WRITE_FAILURE_REASONS = ("storage_full", "other")
#: the settings nodes sharing a database announce and compare (the
#: options' names, as labels)
NODE_SETTINGS = (
    "default_quota", "expire_days", "keep_deleted_days", "quota_warning", "quota_exceeded", "recipient_delimiter",
    "duplicate_window",
)
#: why a RCPT was refused: no such user, a domain not served, a full
#: mailbox, a message larger than the mailbox's whole quota, too many
#: recipients, a command or address that does not parse
RECIPIENT_REFUSALS = (
    "no_such_user", "relay_denied", "mailbox_full", "larger_than_quota", "too_many", "bad_syntax",
)
#: why a MAIL was refused (each also a C{smtp.sender_refused} line): the
#: size it declares over the limit, a sender or parameters that do not
#: parse, or TLS required first (C{--smtp-cleartext-network},
#: C{--lmtp-cleartext-network})
SENDER_REFUSALS = ("too_large", "bad_syntax", "tls_required")
#: what the retention task removes for good: messages past their
#: retention, and deleted mail past the days it is kept for recovery
RETENTION_KINDS = ("expired", "purged")
#: how a round of the retention task ended: done, failed (the database,
#: say: the next round tries again), or skipped while this node's clock
#: runs ahead of the database server's
RETENTION_RESULTS = ("completed", "failed", "skipped")
#: what the quota-status service (L{mailgate.smtp.policyservice}) answered
#: Postfix: a recipient with room, an unknown one, one over quota, a
#: message larger than the whole quota, the store failing (DEFER_IF_PERMIT),
#: or a request it has no opinion on (another request type, no recipient,
#: a domain not served here: DUNNO)
QUOTA_STATUS_RESULTS = ("success", "nouser", "overquota", "toolarge", "tempfail", "ignored")
#: the commands by which an MTA or proxy in front names the client it
#: relays (SMTP and LMTP: Postfix's XFORWARD and XCLIENT; POP3: XCLIENT),
#: as the C{command} label gives them
RELAY_COMMANDS = {"smtp": ("XFORWARD", "XCLIENT"), "lmtp": ("XFORWARD", "XCLIENT"), "pop3": ("XCLIENT",)}
#: how such a command ended: taken, or refused from a peer outside
#: C{--xclient-network}, at the wrong point of the session (in a mail
#: transaction; POP3: after a login began or another XCLIENT), or for an
#: argument that does not parse
RELAY_COMMAND_RESULTS = ("accepted", "refused_network", "refused_sequence", "refused_syntax")
#: the TLS versions a session can negotiate (C{--tls-min-version} 1.2 or
#: 1.3; OpenSSL's names, as the end lines' C{tls_version=}); the cipher
#: is not a label (see L{Metrics.tlsEstablished})
TLS_VERSIONS = ("TLSv1.2", "TLSv1.3")
OTHER = "other"
OTHER_COMMAND = "OTHER"
#: distinct database operations labelled before the rest count as "other"
MAX_OPERATIONS = 64

# Seconds: from a millisecond (an SQLite read) to ten seconds (a stalled
# commit); sizes: how many writes shared one commit.
DELIVERY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
DATABASE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
GROUP_COMMIT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def _bounded(value, allowed, other=OTHER):
    return value if value in allowed else other


class _Series:
    """
    The series of one counter or gauge family, kept as plain numbers by
    label values: one value for a family of one label, a tuple of them for
    several, C{()} for none.
    """

    def __init__(self, familyType, name, documentation, labelnames=(), initial=((),)):
        self._familyType = familyType
        self._name = name
        self._documentation = documentation
        self._labelnames = tuple(labelnames)
        #: label values to value; every series of a small label set is
        #: here from the start, at zero, so that rate() and alerts see it
        #: before the first event
        self.values = dict.fromkeys(initial, 0)

    def family(self):
        family = self._familyType(self._name, self._documentation, labels=self._labelnames)
        for labels, value in list(self.values.items()):
            family.add_metric(labels if type(labels) is tuple else (labels,), value)
        return family


class _ReadSeries(_Series):
    """
    A series of one value, without labels, read from C{read()} when
    scraped: what another object keeps counting (the log file's lost
    lines, counted under its lock from any thread).
    """

    def __init__(self, familyType, name, documentation, read):
        super().__init__(familyType, name, documentation)
        self._read = read

    def family(self):
        self.values[()] = self._read()
        return super().family()


class _ReactorSeries:
    """
    A collector of L{_Series}, read when scraped.

    These families are counted on the reactor thread, where the protocols
    and the policy run, by adding to a plain number: a counter of
    prometheus-client takes four Python calls and a lock per increment
    (counting a POP3 command: 334 ns that way, 86 ns this way; about 3 µs
    less per short session, see benchmarks/RESULTS.md).  The scrape
    (L{mailgate.metricssite.MetricsResource}) runs on the reactor thread too, so it never sees
    half an update.
    """

    def __init__(self, series):
        self._series = series

    def collect(self):
        return [series.family() for series in self._series]

    def describe(self):
        return self.collect()


class Metrics:
    """
    One server's metrics: its own L{CollectorRegistry} (several servers in
    one process, as in tests, each have their own), with the client
    library's process, platform and garbage-collector metrics.

    @ivar registry: the registry to export.
    """

    def __init__(self):
        self.registry = registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)

        counter, gauge = CounterMetricFamily, GaugeMetricFamily
        # 1, labelled with the version: which nodes run which release, as
        # an upgrade rolls through a cluster.
        self._info = _Series(gauge, "mailgate_build_info", "The mailgate release running.", ["version"])
        self._info.values = {__version__: 1}
        self._open = _Series(
            gauge, "mailgate_connections", "Connections open now.", ["protocol"], REFUSING_PROTOCOLS
        )
        self._limit = _Series(
            gauge, "mailgate_connections_limit",
            "The most connections served at once (max-connections, fitted to the open file limit); 0: none.",
        )
        self._sessions = _Series(
            counter, "mailgate_sessions", "Connections admitted.", ["protocol"], REFUSING_PROTOCOLS
        )
        self._refused = _Series(
            counter, "mailgate_connections_refused", "Connections refused as they arrived, by reason.",
            ["protocol", "reason"],
            [(protocol, reason) for protocol in PROTOCOLS for reason in REFUSAL_REASONS.values()]
            + [("quota-status", reason) for reason in QUOTA_STATUS_REFUSALS.values()],
        )
        self._tlsFailures = _Series(
            counter, "mailgate_tls_failures", "TLS handshakes that failed, and corrupt TLS records.",
            ["protocol"], PROTOCOLS,
        )
        self._tlsSessions = _Series(
            counter, "mailgate_tls_sessions", "TLS handshakes completed, by protocol and TLS version negotiated.",
            ["protocol", "version"], [(protocol, version) for protocol in PROTOCOLS for version in TLS_VERSIONS],
        )
        self._logins = _Series(
            counter, "mailgate_logins", "Authentication attempts, by outcome.",
            ["protocol", "mechanism", "result"],
            [("pop3", mechanism, result) for mechanism in MECHANISMS for result in LOGIN_RESULTS],
        )
        self._pop3Commands = _Series(
            counter, "mailgate_pop3_commands", "POP3 command lines, run or refused, by command.", ["command"],
            POP3_COMMANDS + (OTHER_COMMAND,),
        )
        self._retrievedBytes = _Series(
            counter, "mailgate_pop3_retrieved_bytes", "Octets of messages sent by RETR."
        )
        self._deletedMessages = _Series(
            counter, "mailgate_pop3_deleted_messages", "Messages removed by QUIT."
        )
        self._deliveries = _Series(
            counter, "mailgate_deliveries", "SMTP and LMTP deliveries, by outcome.", ["protocol", "result"],
            [(protocol, result) for protocol in ("smtp", "lmtp") for result in DELIVERY_RESULTS],
        )
        self._deliveredBytes = _Series(
            counter, "mailgate_delivered_bytes", "Octets of messages accepted by SMTP and LMTP."
        )
        self._authCache = _Series(
            counter, "mailgate_auth_cache", "Lookups in the verified-credential cache.", ["result"],
            ("hit", "miss"),
        )
        self._maildropLocks = _Series(
            gauge, "mailgate_maildrop_locks", "Maildrop locks this node holds (POP3 sessions logged in)."
        )
        self._bans = _Series(gauge, "mailgate_bans", "Addresses banned now.")
        self._writesFailing = _Series(
            gauge, "mailgate_database_writes_failing",
            "1 while the latest write transaction failed in the database, by reason.",
            ["reason"], WRITE_FAILURE_REASONS,
        )
        self._timeouts = _Series(
            counter, "mailgate_timeouts", "Sessions closed by a timer, by protocol and kind.", ["protocol", "kind"],
            [("pop3", "idle"), ("pop3", "login"), ("smtp", "idle"),
             ("smtp", "data_rate"), ("lmtp", "idle"), ("lmtp", "data_rate")],
        )
        self._forbidden = _Series(
            counter, "mailgate_forbidden_commands",
            "Sessions ended at once for a line of another protocol (an HTTP request), by protocol.",
            ["protocol"], PROTOCOLS,
        )
        self._recipientsRefused = _Series(
            counter, "mailgate_recipients_refused", "RCPT commands refused, by protocol and reason.",
            ["protocol", "reason"],
            [(protocol, reason) for protocol in ("smtp", "lmtp") for reason in (*RECIPIENT_REFUSALS, OTHER)],
        )
        self._sendersRefused = _Series(
            counter, "mailgate_senders_refused", "MAIL commands refused, by protocol and reason.",
            ["protocol", "reason"],
            [(protocol, reason) for protocol in ("smtp", "lmtp") for reason in (*SENDER_REFUSALS, OTHER)],
        )
        self._retentionRemoved = _Series(
            counter, "mailgate_retention_removed_messages",
            "Messages the retention task removed for good, by kind: expired, or kept deleted mail purged.",
            ["kind"], RETENTION_KINDS,
        )
        self._retentionRounds = _Series(
            counter, "mailgate_retention_rounds", "Rounds of the retention task, by how they ended.",
            ["result"], RETENTION_RESULTS,
        )
        self._quotaStatusAnswers = _Series(
            counter, "mailgate_quota_status_answers",
            "Answers of the quota-status service to Postfix's policy requests, by outcome.",
            ["result"], QUOTA_STATUS_RESULTS,
        )
        self._relayCommands = _Series(
            counter, "mailgate_xclient_commands",
            "XFORWARD and XCLIENT commands, by protocol, command and outcome (taken, or why refused).",
            ["protocol", "command", "result"],
            [
                (protocol, command, result)
                for protocol, commands in RELAY_COMMANDS.items() for command in commands
                for result in RELAY_COMMAND_RESULTS
            ],
        )
        self._settingsDiffer = _Series(
            gauge, "mailgate_node_settings_differ",
            "1 where another live node sharing the database works with another value of the setting.",
            ["setting"], NODE_SETTINGS,
        )
        # No series until measured (never on SQLite: no clock of its own).
        self._clockOffset = _Series(
            gauge, "mailgate_node_clock_offset_seconds",
            "This node's clock minus the database server's, as last measured (PostgreSQL; every 30 s).",
            initial=(),
        )
        # No series without TLS; one per certificate in service (the
        # alternative key type's and each named one's too), replaced at
        # each reload.
        self._certificateExpiry = _Series(
            gauge, "mailgate_tls_certificate_expiry_timestamp_seconds",
            "When each TLS certificate in service stops being valid (its notAfter), in Unix time.",
            ["subject", "key_type", "fingerprint"], initial=(),
        )
        # 1 until a reload (SIGHUP) fails in any part, and again once one
        # succeeds: an alert on 0 sees a node serving what it had before,
        # which systemctl reload may have reported as done.
        self._reloadSuccessful = _Series(
            gauge, "mailgate_config_last_reload_successful",
            "1 unless the last reload (SIGHUP) failed in any part: the configuration file, a certificate, the log.",
        )
        self._reloadSuccessful.values[()] = 1
        # No series until a reload finds a setting of the file changed
        # that only a restart applies.
        self._restartNeeded = _Series(
            gauge, "mailgate_config_restart_needed",
            "1 for each setting the configuration file changes that waits for a restart, as the last reload found.",
            ["setting"], initial=(),
        )
        # The log's (twistd -l FILE, or standard output; see logStream):
        # lines lost, and whether its last reopening worked.  An alert on
        # a full log disk cannot come from the log itself.
        self._logStream = None
        self._logLinesLost = _ReadSeries(
            counter, "mailgate_log_lines_lost",
            "Log lines lost: not written to the log file or standard output (a full disk, an I/O error, a reader "
            "gone), or dropped while its reader took none (a stuck journald or syslog daemon).",
            lambda: self._logStream.linesLost if self._logStream is not None else 0,
        )
        self._logReopened = _ReadSeries(
            gauge, "mailgate_log_last_reopen_successful",
            "1 unless the last reopening of the log file (SIGHUP, SIGUSR1) failed: lines go to the old file.",
            lambda: 0 if self._logStream is not None and self._logStream.reopenFailed else 1,
        )
        registry.register(_ReactorSeries([
            self._logLinesLost, self._logReopened, self._reloadSuccessful, self._restartNeeded, self._info,
            self._open, self._limit, self._sessions, self._refused, self._tlsFailures, self._tlsSessions,
            self._logins, self._pop3Commands, self._retrievedBytes,
            self._deletedMessages, self._deliveries, self._deliveredBytes, self._authCache,
            self._maildropLocks, self._bans, self._writesFailing, self._timeouts, self._settingsDiffer, self._clockOffset,
            self._certificateExpiry, self._retentionRemoved, self._retentionRounds, self._recipientsRefused,
            self._sendersRefused, self._forbidden, self._quotaStatusAnswers, self._relayCommands,
        ]))

        # The histograms, and the store's worker threads' counter:
        # prometheus-client's own types, which take a lock.
        self._deliverySeconds = Histogram(
            "mailgate_delivery_seconds", "From the end of DATA to the commit of the message.",
            buckets=DELIVERY_BUCKETS, registry=registry,
        )
        self._databaseSeconds = Histogram(
            "mailgate_database_seconds", "Time of one store operation on its worker thread.",
            ["operation"], buckets=DATABASE_BUCKETS, registry=registry,
        )
        self._databaseErrors = Counter(
            "mailgate_database_errors_total", "Store operations that failed in the database.",
            registry=registry,
        )
        self._groupCommitSize = Histogram(
            "mailgate_group_commit_size", "Writes made durable by one commit.",
            buckets=GROUP_COMMIT_BUCKETS, registry=registry,
        )
        # Operation name to its histogram child, looked up without a lock.
        self._operations = {}

    @staticmethod
    def _count(series, labels, amount=1):
        values = series.values
        values[labels] = values.get(labels, 0) + amount

    def connectionOpened(self, protocol):
        """
        A connection was admitted: C{mailgate_connections{protocol}} up,
        C{mailgate_sessions_total{protocol}} counted.  C{"quota-status"}
        too: Postfix's policy connections, outside C{--max-connections}
        (their own limit is C{--quota-status-max-connections}).
        """
        protocol = _bounded(protocol, REFUSING_PROTOCOLS)
        self._count(self._open, protocol)
        self._count(self._sessions, protocol)

    def connectionClosed(self, protocol):
        """
        An admitted connection ended: C{mailgate_connections{protocol}} down.
        """
        self._count(self._open, _bounded(protocol, REFUSING_PROTOCOLS), -1)

    def connectionRefused(self, protocol, reason):
        """
        A connection was refused as it arrived, told why (the reason the
        policy gives, or C{"shutting down"}): it never opened a session,
        so only C{mailgate_connections_refused_total{protocol,reason}}
        counts it.  A rise in C{too_many} is the connection limits
        turning clients away (with C{protocol} C{"quota-status"}: Postfix's
        policy connections past C{--quota-status-max-connections}; its
        C{network}, peers outside C{--quota-status-network}, told by
        L{QUOTA_STATUS_REFUSALS}).
        """
        protocol = _bounded(protocol, REFUSING_PROTOCOLS)
        reasons = QUOTA_STATUS_REFUSALS if protocol == "quota-status" else REFUSAL_REASONS
        self._count(self._refused, (protocol, reasons.get(reason, OTHER)))

    def connectionLimit(self, limit):
        """
        At most C{limit} connections are served at once, 0 for no limit
        (C{mailgate_connections_limit}): C{--max-connections}, lowered to
        fit the open file limit.
        C{sum(mailgate_connections{protocol!="quota-status"}) /
        mailgate_connections_limit} is how full the node is.
        """
        self._limit.values[()] = limit

    def tlsFailed(self, protocol):
        """
        A connection's TLS failed (C{mailgate_tls_failures_total}): its
        handshake (pop3s, STLS, STARTTLS), mostly, or a corrupt record
        later.  A rise after a certificate change is clients refusing it.
        """
        self._count(self._tlsFailures, _bounded(protocol, PROTOCOLS))

    def tlsEstablished(self, protocol, version):
        """
        An admitted connection's TLS handshake completed (pop3s, STLS,
        STARTTLS): C{mailgate_tls_sessions_total{protocol,version}}, what a
        C{--tls-min-version 1.3} would turn away (the TLSv1.2 series).
        The cipher is not a label: its set is OpenSSL's and
        C{--tls-ciphers}' (some thirty names), changed by a reload; the
        sessions' end lines name it (C{tls_cipher=}).
        """
        self._count(self._tlsSessions, (_bounded(protocol, PROTOCOLS), _bounded(version, TLS_VERSIONS)))

    def openConnections(self):
        """
        The mail protocols' connections open now, by protocol (for
        systemd's status line, which counts sessions: Postfix's
        quota-status connections are none).
        """
        return {protocol: self._open.values[protocol] for protocol in PROTOCOLS}

    def login(self, protocol, mechanism, result):
        """
        An authentication attempt ended (C{mailgate_logins_total}).
        """
        labels = (
            _bounded(protocol, PROTOCOLS),
            _bounded(mechanism, MECHANISMS),
            _bounded(result, LOGIN_RESULTS),
        )
        self._count(self._logins, labels)

    def pop3Command(self, command):
        """
        A POP3 command was run (C{mailgate_pop3_commands_total}).
        """
        counts = self._pop3Commands.values
        if command not in counts:
            command = command.upper() if isinstance(command, str) else OTHER_COMMAND
            command = _bounded(command, POP3_COMMANDS, OTHER_COMMAND)
        counts[command] += 1

    def retrieved(self, octets):
        """
        A RETR sent a message of C{octets} octets
        (C{mailgate_pop3_retrieved_bytes_total}).
        """
        self._retrievedBytes.values[()] += octets

    def deleted(self, count):
        """
        A QUIT removed C{count} messages
        (C{mailgate_pop3_deleted_messages_total}).
        """
        self._deletedMessages.values[()] += count

    def delivery(self, protocol, result, octets=0, seconds=None):
        """
        A delivery ended (C{mailgate_deliveries_total}); for an accepted one
        also C{mailgate_delivered_bytes_total} and, given C{seconds} from
        the end of DATA to the commit, C{mailgate_delivery_seconds}.
        """
        result = _bounded(result, DELIVERY_RESULTS)
        self._count(self._deliveries, (_bounded(protocol, PROTOCOLS), result))
        if result == "accepted":
            if octets:
                self._deliveredBytes.values[()] += octets
            if seconds is not None:
                self._deliverySeconds.observe(seconds)

    def databaseOperation(self, operation, seconds):
        """
        One store operation took C{seconds} (C{mailgate_database_seconds}).
        """
        child = self._operations.get(operation)
        if child is None:
            label = operation if len(self._operations) < MAX_OPERATIONS else OTHER
            child = self._databaseSeconds.labels(label)
            if label != OTHER:
                self._operations[operation] = child
        child.observe(seconds)

    def databaseError(self):
        """
        A store operation failed (C{mailgate_database_errors_total}).
        """
        self._databaseErrors.inc()

    def groupCommit(self, size):
        """
        One commit carried C{size} writes (C{mailgate_group_commit_size}).
        """
        self._groupCommitSize.observe(size)

    def authCache(self, hit):
        """
        The verified-credential cache was consulted
        (C{mailgate_auth_cache_total{result}}).
        """
        self._authCache.values["hit" if hit else "miss"] += 1

    def maildropLocks(self, count):
        """
        This node now holds C{count} maildrop locks
        (C{mailgate_maildrop_locks}).
        """
        self._maildropLocks.values[()] = count

    def timedOut(self, protocol, kind):
        """
        A session was closed by one of its timers: C{kind} is one of
        L{TIMEOUT_KINDS}.  A rise in C{login} or C{data_rate} is clients
        holding connections without using them.
        """
        self._count(self._timeouts, (_bounded(protocol, PROTOCOLS), _bounded(kind, TIMEOUT_KINDS)))

    def forbiddenCommand(self, protocol):
        """
        A session was ended at once for a line of another protocol
        (C{mailgate_forbidden_commands_total}): an HTTP request a browser or
        proxy was made to send to a mail port (the ALPACA attack), or an
        SMTP/LMTP line that begins with no letter.
        """
        self._count(self._forbidden, _bounded(protocol, PROTOCOLS))

    def recipientRefused(self, protocol, reason):
        """
        A RCPT was refused for C{reason}, one of L{RECIPIENT_REFUSALS}
        (C{mailgate_recipients_refused_total}): mail refused there never
        reaches DATA, where deliveries are counted, and a full mailbox is
        refused there as a rule.
        """
        self._count(self._recipientsRefused, (_bounded(protocol, PROTOCOLS), _bounded(reason, RECIPIENT_REFUSALS)))

    def senderRefused(self, protocol, reason):
        """
        A MAIL was refused for C{reason}, one of L{SENDER_REFUSALS}
        (C{mailgate_senders_refused_total}): mail refused there never
        reaches RCPT or DATA, where the other refusals are counted, so an
        MTA whose every message is refused (in the clear where TLS is
        required, say) showed in no metric, only in the log.
        """
        self._count(self._sendersRefused, (_bounded(protocol, PROTOCOLS), _bounded(reason, SENDER_REFUSALS)))

    def quotaStatusAnswer(self, result):
        """
        The quota-status service answered a policy request with C{result},
        one of L{QUOTA_STATUS_RESULTS}
        (C{mailgate_quota_status_answers_total}): how many recipients
        Postfix refused at its RCPT for a full mailbox, and whether the
        store failed it.
        """
        self._count(self._quotaStatusAnswers, _bounded(result, QUOTA_STATUS_RESULTS))

    def relayCommand(self, protocol, command, result):
        """
        An XFORWARD or XCLIENT (C{command}, in upper case) ended with
        C{result}, one of L{RELAY_COMMAND_RESULTS}
        (C{mailgate_xclient_commands_total}): whether the MTA in front
        uses XFORWARD, and a peer refused for being outside
        C{--xclient-network} (a misconfigured option, or one that changed
        address), which the log alone told.  A command a protocol does
        not have is counted as C{"OTHER"}.
        """
        protocol = _bounded(protocol, PROTOCOLS)
        command = _bounded(command, RELAY_COMMANDS.get(protocol, ()), OTHER_COMMAND)
        self._count(self._relayCommands, (protocol, command, _bounded(result, RELAY_COMMAND_RESULTS)))

    def retentionRound(self, result):
        """
        A round of the retention task ended with C{result}, one of
        L{RETENTION_RESULTS}: what an alert on a task that no longer
        completes watches.
        """
        self._count(self._retentionRounds, _bounded(result, RETENTION_RESULTS))

    def retentionRemoved(self, kind, count):
        """
        The retention task removed C{count} messages for good, of
        C{kind}, one of L{RETENTION_KINDS} (counted as each of its passes
        commits, so a round that fails later counts what it did): what an
        alert on a sudden rise in removals watches.
        """
        if count:
            self._count(self._retentionRemoved, _bounded(kind, RETENTION_KINDS), count)

    def writesFailing(self, reason):
        """
        The database's latest write transaction failed for C{reason}, one
        of L{WRITE_FAILURE_REASONS}, or (C{None}) committed
        (C{mailgate_database_writes_failing}): what an alert on a full
        disk watches.
        """
        values = self._writesFailing.values
        for name in WRITE_FAILURE_REASONS:
            values[name] = 0
        if reason is not None:
            values[_bounded(reason, WRITE_FAILURE_REASONS)] = 1

    def bans(self, count):
        """
        C{count} addresses are banned now (C{mailgate_bans}).
        """
        self._bans.values[()] = count

    def settingsDiffer(self, settings):
        """
        Another live node works with other values of C{settings} (names
        of L{NODE_SETTINGS}), and with the same values of the others
        (C{mailgate_node_settings_differ}): what an alert on nodes
        configured apart watches.
        """
        values = self._settingsDiffer.values
        for name in NODE_SETTINGS:
            # Keyed as the initial series are (a family of one label: the
            # value alone), or each setting would be exported twice.
            values[name] = 1 if name in settings else 0

    def clockOffset(self, seconds):
        """
        This node's clock is C{seconds} ahead of the database server's
        (C{mailgate_node_clock_offset_seconds}; negative: behind): what an
        alert on a node whose clock drifts watches.
        """
        self._clockOffset.values[()] = seconds

    def reloaded(self, failed, restartNeeded):
        """
        A reload is over: it C{failed} in some part or not
        (C{mailgate_config_last_reload_successful}), and the file changes
        the settings C{restartNeeded}, which wait for a restart
        (C{mailgate_config_restart_needed}, one series each, the others
        gone).
        """
        self._reloadSuccessful.values[()] = 0 if failed else 1
        self._restartNeeded.values = {name: 1 for name in restartNeeded}

    def logStream(self, stream):
        """
        The log is written to C{stream} (a L{mailgate.logs.LogStream}, or
        the L{mailgate.logs.SyslogObserver} of twistd's C{--syslog}):
        C{mailgate_log_lines_lost_total} and
        C{mailgate_log_last_reopen_successful} read it when scraped (a log
        on standard output, the journal's, counts lines lost too, and has
        no file to reopen: 1).
        """
        self._logStream = stream

    def certificatesInService(self, certificates):
        """
        The TLS certificates served from now on (at start, and after each
        reload that loaded new files): C{(subject, keyType, fingerprint,
        notAfter)}, the last in Unix time; the SHA-256 fingerprint keeps
        two certificates of one name and key type apart.  C{mailgate_tls_certificate_expiry_timestamp_seconds}
        then has one series each, and none of the certificates replaced:
        an alert on C{... - time() < 14 * 86400} watches the certificate
        clients are given, which an ACME renewal whose reload never came
        leaves to run out.
        """
        values = self._certificateExpiry.values
        values.clear()
        for subject, keyType, fingerprint, notAfter in certificates:
            values[(subject, keyType, fingerprint)] = notAfter


class NotServed(Exception):
    """
    The health check's verdict on a protocol this node has no listener
    for: a balancer's backend that checks it is misconfigured, and sees
    it (503) rather than a node taken for healthy that refuses every
    connection.
    """
