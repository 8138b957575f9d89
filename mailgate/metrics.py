# -*- test-case-name: tests.test_metrics -*-
"""
What mailgate counts, for Prometheus.

The protocols, the store and the policy report what happens through the
methods of L{Metrics}; this module alone knows how it is exported.  Metric
names and label values are a contract (dashboards and alerts depend on
them) and every label value comes from a small fixed set: never a user
name or an address.

Label values used by callers:
  - C{protocol}: C{"pop3"}, C{"smtp"}, C{"lmtp"}
  - C{mechanism}: C{"user"} (USER/PASS), C{"apop"}, and the SASL mechanism
    names in lower case (C{"plain"}, C{"login"}, C{"cram-md5"},
    C{"scram-sha-256"})
  - login C{result}: C{"ok"}, C{"failed"}, C{"banned"}, C{"in_use"},
    C{"tempfail"}
  - delivery C{result}: C{"accepted"}, C{"rejected"}, C{"tempfail"}
  - POP3 C{command}: the RFC command names in upper case; anything else
    is counted as C{"OTHER"}

This is the interface the rest of mailgate codes against; the methods
are filled in by the metrics work (issue 12).  Until then they do nothing.
"""


class Metrics:
    """
    One server's metrics (one registry; several servers in one process,
    as in tests, each have their own).
    """

    def connectionOpened(self, protocol):
        """
        A connection was admitted: C{mailgate_connections{protocol}} up,
        C{mailgate_sessions_total{protocol}} counted.
        """

    def connectionClosed(self, protocol):
        """
        An admitted connection ended: C{mailgate_connections{protocol}} down.
        """

    def login(self, protocol, mechanism, result):
        """
        An authentication attempt ended (C{mailgate_logins_total}).
        """

    def pop3Command(self, command):
        """
        A POP3 command was run (C{mailgate_pop3_commands_total}).
        """

    def retrieved(self, octets):
        """
        A RETR sent a message of C{octets} octets
        (C{mailgate_pop3_retrieved_bytes_total}).
        """

    def deleted(self, count):
        """
        A QUIT removed C{count} messages
        (C{mailgate_pop3_deleted_messages_total}).
        """

    def delivery(self, protocol, result, octets=0, seconds=None):
        """
        A delivery ended (C{mailgate_deliveries_total}); for an accepted one
        also C{mailgate_delivered_bytes_total} and, given C{seconds} from
        the end of DATA to the commit, C{mailgate_delivery_seconds}.
        """

    def databaseOperation(self, operation, seconds):
        """
        One store operation took C{seconds} (C{mailgate_database_seconds}).
        """

    def databaseError(self):
        """
        A store operation failed (C{mailgate_database_errors_total}).
        """

    def groupCommit(self, size):
        """
        One commit carried C{size} writes (C{mailgate_group_commit_size}).
        """

    def authCache(self, hit):
        """
        The verified-credential cache was consulted
        (C{mailgate_auth_cache_total{result}}).
        """

    def maildropLocks(self, count):
        """
        This node now holds C{count} maildrop locks
        (C{mailgate_maildrop_locks}).
        """

    def bans(self, count):
        """
        C{count} addresses are banned now (C{mailgate_bans}).
        """
