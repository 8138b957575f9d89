# -*- test-case-name: tests.test_policy -*-
"""
L{PolicySettings}: the numbers an operator sets for the connection policy
(C{twistd mailgate} options of the same names), with their defaults.
"""

import attr

from mailgate.policy.addresses import DEFAULT_EXEMPT_NETWORKS, parseNetworks

MAX_CONNECTIONS = 5000
# Postfix's default per-client limit (smtpd_client_connection_count_limit).
MAX_CONNECTIONS_PER_ADDRESS = 50
AUTH_PENALTY_MAX = 15.0
BAN_AFTER = 10
BAN_WINDOW = 600
BAN_TIME = 3600
#: Unknown recipients (550 5.1.1) from one address within the ban window
#: from which its SMTP error replies wait (see ConnectionPolicy.recipientErrorDelay).
UNKNOWN_RECIPIENT_SLOW_AFTER = 20
#: ... and from which it is banned: never by default (see README, Limits
#: and bans: a mail server delivering a list with stale addresses, or a
#: large provider's outbound host that also carries a harvester's mail,
#: would have all its mail refused).
UNKNOWN_RECIPIENT_BAN_AFTER = 0
#: The longest ban, and the longest window failures are counted over: ten
#: years.  A ban ends at a time that must stay a date (logs and mailgate
#: ban list show it) and a number the database stores; "for ever" is ten
#: years, renewed by mailgate ban add if it ever matters.
MAX_BAN_TIME = 10 * 365 * 86400


def _notNegative(instance, attribute, value):
    if value < 0:
        raise ValueError(f"{attribute.name} must not be negative: {value!r}")


def _positive(instance, attribute, value):
    if value <= 0:
        raise ValueError(f"{attribute.name} must be positive: {value!r}")


def _duration(instance, attribute, value):
    _positive(instance, attribute, value)
    if value > MAX_BAN_TIME:
        raise ValueError(f"{attribute.name} must be at most {MAX_BAN_TIME} seconds: {value!r}")


@attr.s(frozen=True, kw_only=True)
class PolicySettings:
    """
    @ivar maxConnections: connections this process serves at once; 0 for
        no limit.
    @ivar maxConnectionsPerAddress: connections from one client address;
        0 for no limit.
    @ivar authPenaltyMax: the longest authentication penalty, in seconds;
        0 turns the growing delay off.
    @ivar banAfter: the failure (within C{banWindow}) that bans an address;
        0 for no bans.
    @ivar banWindow: seconds over which failures are counted (and
        remembered for the penalty).
    @ivar banTime: seconds a ban lasts.
    @ivar unknownRecipientSlowAfter: SMTP recipients refused as unknown
        from one address (within C{banWindow}) from which every error
        reply of its SMTP sessions waits; 0 for never.
    @ivar unknownRecipientBanAfter: ... from which the address is banned
        (for C{banTime}); 0 for never.
    @ivar exemptNetworks: CIDR texts of the networks never penalised,
        banned or limited per address (C{["none"]} for none).
    """

    maxConnections = attr.ib(default=MAX_CONNECTIONS, validator=_notNegative)
    maxConnectionsPerAddress = attr.ib(default=MAX_CONNECTIONS_PER_ADDRESS, validator=_notNegative)
    authPenaltyMax = attr.ib(default=AUTH_PENALTY_MAX, validator=_notNegative)
    banAfter = attr.ib(default=BAN_AFTER, validator=_notNegative)
    banWindow = attr.ib(default=BAN_WINDOW, validator=_duration)
    banTime = attr.ib(default=BAN_TIME, validator=_duration)
    unknownRecipientSlowAfter = attr.ib(default=UNKNOWN_RECIPIENT_SLOW_AFTER, validator=_notNegative)
    unknownRecipientBanAfter = attr.ib(default=UNKNOWN_RECIPIENT_BAN_AFTER, validator=_notNegative)
    exemptNetworks = attr.ib(default=DEFAULT_EXEMPT_NETWORKS, converter=tuple)

    @exemptNetworks.validator
    def _checkNetworks(self, attribute, value):
        parseNetworks(value)
