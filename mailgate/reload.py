"""
What a SIGHUP's reload of the configuration file applies to a running
server, and how: the tables of the settings it applies (each with where
and from when), what stays for the restart and why, and the functions
that apply a changed configuration to the service hierarchy
L{mailgate.service} built.

A module of its own so that the reload's knowledge is read, and grows, in
one place, apart from the wiring of a start.  It sits below
L{mailgate.service}, which calls it (L{mailgate.service.MailgateService.reloadConfig}):
what the reload builds as a start does (the TLS contexts, the OAuth
validator, the connection policy's settings) it is handed, so that it
never imports the service back.
"""

import attr

from mailgate.config import COMMAND_SETTINGS, SETTINGS, checkConfig, networksOf
from mailgate.errors import ConfigurationError
from mailgate.hostname import machineName
from mailgate.interfaces import ILifecycleStore
from mailgate.listenercheck import busyListeners
from mailgate.logs import literal
from mailgate.memory import MemoryTrimmer
from mailgate.networks import coversEveryAddress, parseNetwork
from mailgate.policy.descriptors import fittedConnectionLimit, openFileLimit
from mailgate.pop3 import POP3Factory
from mailgate.session.proxy import ProxyHeaderEndpoint
from mailgate.smtp import LMTPFactory, SMTPFactory
from mailgate.store.housekeeping import RegistryService, RetentionService
from mailgate.tls import TicketKeyRotation
from mailgate.urls import shownURL

#: the settings a SIGHUP applies to a running server when the
#: configuration file changes them (and TLS_SETTINGS while TLS stays on,
#: OAUTH2_SETTINGS while OAuth stays on, SESSION_SETTINGS,
#: NETWORK_SETTINGS, POLICY_SETTINGS and STORE_SETTINGS; the others need a
#: restart)
LIVE_SETTINGS = frozenset({"debug-peer", "debug-user"})
#: the settings a SIGHUP applies to sessions opened after it, as Dovecot's
#: reload does: each a factory attribute the factory copies into every
#: session it builds (or a POP3 session reads once, at its greeting), so
#: a session under way keeps the values it began with.  The setting's
#: name: the factories it is set on, and their attribute.
#:
#: What a SIGHUP leaves to the restart (config.restart_needed), and why:
#: the listeners (pop3, pop3s, smtp, lmtp, quota-status, metrics) and the
#: database, bound and opened at start (a changed database is refused
#: outright); quota-status-network, which the quota-status factory was
#: built with (the other quota-status-* settings apply:
#: QUOTA_STATUS_SETTINGS, QUOTA_STATUS_ACTIONS);
#: log-format, the observer twistd set up at start (one file, one format,
#: for whatever parses it); cpu-affinity, the threads pinned at start (the
#: reactor's, the database's), which would each have to be pinned again;
#: apop, which checkers the portal was built with (APOP's
#: or not) and what the APOP advertiser and its timer offer in greetings
#: and CAPA; auth-default-realm, read by the portal's checkers,
#: the SASL server and the connection policy, which counts failed logins
#: and bans under the full names it makes (changed under it, the failures
#: counted would be under other names than the next ones); OAuth turned on
#: or off (oauth2-keys set or emptied), which changes what CAPA and the
#: SASL server offer (OAUTHBEARER, XOAUTH2) and which checkers the portal
#: was built with; while OAuth stays on, OAUTH2_SETTINGS apply to the
#: logins after the SIGHUP; master-users and master-user-separator, which
#: checkers the portal was built with and what the SASL server's PLAIN and
#: LOGIN make of a name (a master login turned off must not be let in by
#: an exchange begun before).
SESSION_SETTINGS = {
    "greeting": (POP3Factory, "greeting"),
    "idle-timeout": (POP3Factory, "idleTimeout"),
    "login-timeout": (POP3Factory, "loginTimeout"),
    "auth-failure-delay": (POP3Factory, "authFailureDelay"),
    "pop3-client-workarounds": (POP3Factory, "clientWorkarounds"),
    "max-message-size": (SMTPFactory, "maxMessageSize"),
    "max-recipients": (SMTPFactory, "maxRecipients"),
    "min-data-rate": (SMTPFactory, "minDataRate"),
    "smtp-idle-timeout": (SMTPFactory, "idleTimeout"),
}
#: the networks a SIGHUP applies to sessions opened after it: the
#: factory's list each new session asks once (a session under way keeps
#: the answer it had: the USER its CAPA offered, the mail its MTA began
#: to send in the clear), and the balancers a haproxy: listener believes
#: from the next connection on (L{ProxyHeaderEndpoint.setBalancers}).
#: smtp-cleartext-network and lmtp-cleartext-network only where the
#: server has TLS to offer those now asked for it (else a restart's).
NETWORK_SETTINGS = frozenset({
    "trusted-network", "smtp-cleartext-network", "lmtp-cleartext-network", "proxy-network", "xclient-network",
})
#: the connection policy's settings (L{mailgate.service.policySettings}), which a SIGHUP
#: applies to what comes after it (L{ConnectionPolicy.reconfigure}): the
#: connections open stay, the failures counted and the bans in force too
POLICY_SETTINGS = frozenset({
    "max-connections", "max-connections-per-ip", "auth-penalty-max", "ban-after", "ban-window", "ban-time",
    "unknown-recipient-slow-after", "unknown-recipient-ban-after", "exempt-network",
})
#: the quota-status service's limit on connections open at once, which a
#: SIGHUP applies to the connections made after it, as max-connections:
#: those open stay, though more than a lower limit.  The setting's name:
#: the L{mailgate.smtp.policyservice.QuotaStatusFactory} attribute.
QUOTA_STATUS_SETTINGS = {"quota-status-max-connections": "maxConnections"}
#: what the quota-status service answers (Dovecot's quota_status_*),
#: which a SIGHUP applies to the answers given after it (the factory's
#: L{mailgate.smtp.policyservice.QuotaStatusActions}, made anew; a
#: request asked before it and answered after has the new one), as
#: Dovecot's reload applies them to its quota-status service
QUOTA_STATUS_ACTIONS = frozenset({
    "quota-status-success", "quota-status-nouser", "quota-status-overquota", "quota-status-toolarge",
})
#: what the mail connections' limit is fitted to the open file limit with
#: (L{mailgate.policy.descriptors.fittedConnectionLimit}): the policy's
#: settings, and quota-status-max-connections, whose connections the
#: descriptors kept apart count
_FITTED_SETTINGS = POLICY_SETTINGS | QUOTA_STATUS_SETTINGS.keys()
#: the server's defaults for maildrops (L{mailgate.service.storeLimits}), which a SIGHUP
#: applies to the next delivery and the retention task's next round (run
#: at once: what a shorter retention removes goes then, not up to ten
#: minutes later); the store reads them at each use
STORE_SETTINGS = frozenset({"default-quota", "quota-warning", "expire-days", "keep-deleted-days", "duplicate-window"})
#: SMTP's error throttling (Postfix's smtpd_soft_error_limit and
#: smtpd_error_sleep_time): the SMTP factory's attributes, which its
#: sessions read at each error, so a SIGHUP applies them to the error
#: replies after it, in sessions under way too (a client is told nothing
#: of them).  Not LMTP's: its client, the site's own MTA, is never held.
ERROR_SETTINGS = {"smtp-soft-error-limit": "softErrorLimit", "smtp-error-sleep-time": "errorSleepTime"}
#: how SMTP and LMTP take mail in: the domains, the postmaster, the
#: recipient delimiter, the reply to a recipient over quota (each SMTP,
#: LMTP and quota-status factory's L{mailgate.smtp.LocalDelivery} reads
#: them at each RCPT, policy request and delivery)
#: and the spool directory (taken as a message's data begins).  A SIGHUP
#: applies them to the recipients given after it: RCPT resolves a
#: recipient to its user, so a transaction under way delivers to the
#: users it was told it would.  The node announces recipient-delimiter and
#: quota-exceeded to the others sharing its database at once
#: (L{RegistryService.announce}), which compare them with theirs.
DELIVERY_SETTINGS = frozenset(
    {"domain", "postmaster", "recipient-delimiter", "delivered-to", "quota-exceeded", "spool-directory"}
)
#: what POP3 checks a login with, which a SIGHUP applies to the logins
#: checked after it: login-delay (the realm's check, and the LOGIN-DELAY
#: CAPA lists from then on, to tell clients what they are checked
#: against), the credential cache's bound and lifetime (for what is
#: cached after it; a shorter lifetime ends what was cached before within
#: it, a lower bound drops the oldest, a cache turned off forgets all it
#: holds: L{mailgate.auth.cache.VerifiedCredentialCache.reconfigure})
LOGIN_SETTINGS = frozenset({"login-delay", "auth-cache-size", "auth-cache-ttl"})
#: the seconds the sessions get at the next stop
STOP_SETTINGS = frozenset({"shutdown-grace"})
#: the host name, which a SIGHUP applies to sessions opened after it: an
#: SMTP or LMTP session takes the factory's at its greeting and keeps it
#: in every reply and Received field to its end, a POP3 session's APOP
#: timestamp names it at the greeting, a CRAM-MD5 challenge (a nonce the
#: client signs as it is) at its AUTH; the node's entry in the session
#: registry (mailgate nodes, who, the other nodes' warnings) is renamed
#: at its next flush (L{RegistryService.rename})
NAME_SETTINGS = frozenset({"hostname"})
#: the periods of the server's timers, which a SIGHUP starts again: the
#: next trim of freed memory, and the next TLS session ticket key, come a
#: new period after it (L{MemoryTrimmer.setInterval},
#: L{TicketKeyRotation.setInterval})
TIMER_SETTINGS = frozenset({"memory-trim-interval", "tls-ticket-key-rotation"})
#: the settings L{mailgate.service.makeTokenValidator} reads
OAUTH2_SETTINGS = frozenset({"oauth2-keys", "oauth2-issuer", "oauth2-audience", "oauth2-algorithm",
                             "oauth2-clock-skew", "oauth2-username-claim"})
#: the settings L{mailgate.service.makeTLS} reads
TLS_SETTINGS = frozenset({"tls-cert", "tls-key", "tls-alt-cert", "tls-alt-key", "tls-sni-cert", "tls-min-version",
                          "tls-ciphers"})


def reloadConfiguration(
    service, *, checkStartable, makeTokenValidator, policySettings, traceSelection, storeLimits,
    smtpTimeoutWarning, postmasterWarning, traceWarning, quotaStatusActions,
):
    """
    Read the configuration of C{service} (a L{mailgate.service.MailgateService})
    again and apply what changed: L{mailgate.service.MailgateService.reloadConfig},
    which says what and when.

    The other arguments are L{mailgate.service}'s functions of the same
    names, which build from the new configuration what a start builds
    from it (and refuse what a start refuses): handed in, as this module
    is below the one that wires the start.

    @return: the names of the settings applied, or C{None} if the
        configuration could not be read.
    """
    if not service.readsConfiguration():
        return None
    try:
        new = service.configSource()
        checkConfig(new)
        changed = [s for s in SETTINGS if getattr(service.config, s.attribute) != getattr(new, s.attribute)]
        # What a restart would refuse (as config --check does) is not
        # taken "for the next restart": that restart would fail.
        newTLS = checkStartable(new, {s.name for s in changed})
        # While OAuth stays on, the validator of the new settings (a
        # start's, refused as a start would be), swapped in below.
        newTokens = None
        if service.tokens is not None and new.oauth2Keys and OAUTH2_SETTINGS & {s.name for s in changed}:
            newTokens = makeTokenValidator(new)
        newPolicy = fitWarning = None
        if service.policy is not None and _FITTED_SETTINGS & {s.name for s in changed}:
            # The quota-status listener is the running one's (a restart's
            # to change), its limit the new one.
            quotaStatus = new.quotaStatusMaxConnections if service.config.quotaStatus else 0
            maxConnections, fitWarning = fittedConnectionLimit(new.maxConnections, openFileLimit(), quotaStatus)
            newPolicy = policySettings(new, maxConnections)
    except ConfigurationError as e:
        service.reloadActionFailed()
        service.log.error(
            "configuration reload failed, keeping the configuration in service: {error}",
            error=e,
            event="config.reload_failed",
        )
        _reloadTokens(service)
        return None
    # The TLS settings change at once while TLS stays on (the files and
    # settings newTLS loaded); TLS turned on or off changes listeners
    # and what STLS and STARTTLS offer: a restart's.
    live = LIVE_SETTINGS | SESSION_SETTINGS.keys() | _liveNetworks(service, new) | ERROR_SETTINGS.keys()
    live |= DELIVERY_SETTINGS | LOGIN_SETTINGS | STOP_SETTINGS | NAME_SETTINGS | TIMER_SETTINGS
    live |= QUOTA_STATUS_SETTINGS.keys() | QUOTA_STATUS_ACTIONS
    live |= TLS_SETTINGS if service.tls is not None and newTLS is not None else frozenset()
    live |= OAUTH2_SETTINGS if newTokens is not None else frozenset()
    live |= POLICY_SETTINGS if service.policy is not None else frozenset()
    live |= STORE_SETTINGS if ILifecycleStore.providedBy(service.store) else frozenset()
    applied = [s.name for s in changed if s.name in live]
    later = [s.name for s in changed if s.name not in live and s.name != "database"]
    if new.database != service.config.database:
        # Not one more setting for the next restart: the mailgate
        # command and mailgate deliver (an MTA's pipe transport) read
        # the file's database now, so until the restart users added
        # and mail delivered go where this server does not look.
        shownNew, shownOld = shownURL(new.database), shownURL(service.config.database)
        change = (
            f"the database changed to {shownNew}" if shownNew != shownOld else "the database URL's password changed"
        )
        service.log.error(
            "configuration reload: " + literal(change) + "; a running server does not change databases and "
            "keeps serving {old} as it opened it until it is restarted, while the mailgate command and "
            "mailgate deliver with this file already use the new one: restart now, or put the old "
            "URL back",
            new=shownNew,
            old=shownOld,
            event="config.database_refused",
        )
    if applied:
        service.config = attr.evolve(
            service.config, **{s.attribute: getattr(new, s.attribute) for s in changed if s.name in applied}
        )
        trace = traceSelection(service.config)
        for factory in service.sessionFactories:
            factory.trace = trace
            for s in changed:
                kind, attribute = SESSION_SETTINGS.get(s.name, (None, None))
                if kind is not None and isinstance(factory, kind):
                    setattr(factory, attribute, getattr(new, s.attribute))
            _applyNetworks(factory, service.config, applied)
            _applyMailAndLogins(factory, service.config, applied)
        for factory in service.quotaStatusFactories:
            # The RCPT check quota-status answers with stays SMTP's and
            # LMTP's (the same domains, postmaster, delimiter and
            # quota-exceeded), and names the server as they do.
            if DELIVERY_SETTINGS & set(applied):
                _applyDelivery(factory.delivery, service.config)
            if "hostname" in applied:
                factory.hostname = service.config.hostname or machineName()
            for name, attribute in QUOTA_STATUS_SETTINGS.items():
                if name in applied:
                    setattr(factory, attribute, getattr(service.config, _attributeOf(name)))
            if QUOTA_STATUS_ACTIONS & set(applied):
                factory.actions = quotaStatusActions(service.config)
        service.shutdownGrace = service.config.shutdownGrace
        if "hostname" in applied:
            _rename(service, service.config.hostname or machineName())
        for child in service:
            if isinstance(child, MemoryTrimmer) and "memory-trim-interval" in applied:
                child.setInterval(service.config.memoryTrimInterval)
            elif isinstance(child, TicketKeyRotation) and "tls-ticket-key-rotation" in applied:
                child.setInterval(service.config.tlsTicketKeyRotation)
        if "proxy-network" in applied:
            for listener in (l for ls in service.listeners.values() for l in ls):
                if isinstance(listener.endpoint, ProxyHeaderEndpoint):
                    listener.endpoint.setBalancers(service.config.proxyNetworks)
    if set(applied) & TLS_SETTINGS:
        service.tls.adopt(newTLS)
    _reloadTokens(service, newTokens if set(applied) & OAUTH2_SETTINGS else None)
    if newPolicy is not None and set(applied) & _FITTED_SETTINGS:
        if fitWarning and {"max-connections", "quota-status-max-connections"} & set(applied):
            service.log.warn("{warning}", warning=fitWarning, event="limits.open_files")
        service.policy.reconfigure(newPolicy)
        service.sessions.stressChanged(service.policy.underStress())
        if service.metrics is not None:
            service.metrics.connectionLimit(newPolicy.maxConnections)
    if set(applied) & STORE_SETTINGS:
        service.store.limits = storeLimits(service.config)
        for factory in service.sessionFactories:
            if isinstance(factory, SMTPFactory):
                factory.delivery.forgetRecipients()
        for factory in service.quotaStatusFactories:
            factory.delivery.forgetRecipients()
        for retention in _retentionServices(service):
            retention.runSoon()
    if set(applied) & (STORE_SETTINGS | {"quota-exceeded", "recipient-delimiter"}):
        for registry in (child for child in service if isinstance(child, RegistryService)):
            registry.announce(service.config.quotaExceeded, service.config.recipientDelimiter)
    if "smtp-idle-timeout" in applied:
        warning = smtpTimeoutWarning(service.config)
        if warning:
            service.log.warn("{warning}", warning=warning, event="config.smtp_idle_timeout_short")
    if "postmaster" in applied:
        warning = postmasterWarning(service.config)
        if warning:
            service.log.warn("{warning}", warning=warning, event="smtp.no_postmaster")
    if {"debug-peer", "debug-user"} & set(applied):
        warning = traceWarning(service.config)
        if warning:
            service.log.warn("{warning}", warning=warning, event="trace.enabled")
    summary = ("applied " + ", ".join(applied)) if applied else "nothing to apply"
    # As a line ("{line}"), so that the JSON record carries the lists of
    # setting names whole: a reload can apply more settings than the 50
    # items other fields' lists are cut at (mailgate.logs), and the names
    # are bounded by the settings there are.
    service.log.info(
        "{line}",
        line=f"configuration reloaded: {summary}",
        summary=summary,
        applied=applied,
        event="config.reloaded",
    )
    service.restartNeeded = tuple(later) + (("database",) if new.database != service.config.database else ())
    for name, description, reason in busyListeners(new, service.config, {s.name for s in changed}):
        service.log.warn(
            "configuration changed: {setting} {description}: {reason}: the restart could not listen "
            "there (exit 1, which systemd retries)",
            setting=name,
            description=description,
            reason=reason,
            event="config.listener_busy",
        )
    if later:
        # Said where the mailgate command (mailgate deliver, an MTA's
        # pipe transport) reads the change already: until the restart
        # it delivers with other settings than this server's LMTP.
        read = [name for name in later if name in COMMAND_SETTINGS]
        # The sentence's parts are made here, not given as fields: the
        # JSON record carries the setting names as lists alone.
        text = f"configuration changed: {', '.join(later)} {'takes' if len(later) == 1 else 'take'} effect at "
        text += "the next restart"
        if read:
            text += f"; the mailgate command and mailgate deliver with this file use {', '.join(read)} already"
        service.log.warn(
            "{line}",
            line=text,
            settings=later,
            readByTheCommand=read,
            event="config.restart_needed",
        )
    return applied


def _reloadTokens(service, new=None):
    """
    The OAuth 2.0 keys at a SIGHUP that read the configuration file:
    C{new}'s settings and keys (L{mailgate.auth.oauth.TokenValidator.adopt}), or else the
    key files in service read again; after the file, so that files it
    no longer names are not read (a provider's new key file named,
    the old one removed).
    """
    if service.tokens is None:
        return
    if new is None:
        if reloadTokenKeys(service.tokens, service.log) is False:
            service.reloadActionFailed()
        return
    service.tokens.adopt(new)
    service.log.info("oauth2 keys reloaded: {count} keys", count=len(new.keys), event="oauth2.reloaded")
    _warnOfKeyFiles(service.tokens, service.log)


def _rename(service, name):
    """
    Name the server C{name} (a reload changed hostname) in the sessions
    opened from now on, and the node in the session registry.
    """
    for factory in service.sessionFactories:
        factory.hostname = name
        if getattr(factory, "sasl", None) is not None:
            factory.sasl.hostname = name
    for registry in (child for child in service if isinstance(child, RegistryService)):
        registry.rename(name)


def _liveNetworks(service, new):
    """
    The networks of L{NETWORK_SETTINGS} a reload to C{new} can apply:
    the cleartext networks only where they ask for no TLS, or the
    server has TLS to offer.
    """
    live = {"trusted-network", "proxy-network", "xclient-network"}
    for name, attribute in (("smtp", "smtpCleartextNetworks"), ("lmtp", "lmtpCleartextNetworks")):
        networks = [parseNetwork(n) for n in networksOf(getattr(new, attribute))]
        if service.tls is not None or coversEveryAddress(networks):
            live.add(f"{name}-cleartext-network")
    return live


def _retentionServices(service):
    return [child for child in service if isinstance(child, RetentionService)]


def _applyNetworks(factory, config, applied):
    """
    Give C{factory} (POP3, SMTP or LMTP) the networks of C{config} that a
    reload C{applied}, for the sessions it builds from now on.
    """
    if "xclient-network" in applied and isinstance(factory, (POP3Factory, SMTPFactory)):
        # The POP3 greetings from now on, and the XCLIENT that follows one;
        # the EHLO and LHLO replies that offer XCLIENT and XFORWARD, and
        # the commands.
        factory.xclientNetworks = tuple(parseNetwork(n) for n in config.xclientNetworks)
    if isinstance(factory, POP3Factory):
        if "trusted-network" in applied:
            factory.trustedNetworks = tuple(parseNetwork(n) for n in networksOf(config.trustedNetworks))
    elif isinstance(factory, SMTPFactory):
        lmtp = isinstance(factory, LMTPFactory)
        name = "lmtp-cleartext-network" if lmtp else "smtp-cleartext-network"
        if name in applied:
            networks = config.lmtpCleartextNetworks if lmtp else config.smtpCleartextNetworks
            factory.takeCleartextFrom(networksOf(networks))


def _applyMailAndLogins(factory, config, applied):
    """
    Give C{factory} the settings of C{config} that a reload C{applied} of
    L{ERROR_SETTINGS} and L{DELIVERY_SETTINGS} (SMTP, LMTP) or
    L{LOGIN_SETTINGS} (POP3).
    """
    if isinstance(factory, POP3Factory):
        if "login-delay" in applied:
            factory.loginDelay = factory.portal.realm.loginDelay = config.loginDelay
        if {"auth-cache-size", "auth-cache-ttl"} & set(applied):
            factory.portal.passwordChecker.cache.reconfigure(config.authCacheSize, float(config.authCacheTTL))
        return
    if not isinstance(factory, SMTPFactory):
        return
    if not isinstance(factory, LMTPFactory):
        for name, attribute in ERROR_SETTINGS.items():
            if name in applied:
                setattr(factory, attribute, getattr(config, _attributeOf(name)))
    if DELIVERY_SETTINGS & set(applied):
        _applyDelivery(factory.delivery, config)
        factory.spoolDirectory = config.spoolDirectory


def _applyDelivery(delivery, config):
    """
    Give C{delivery} (SMTP's, LMTP's or quota-status's
    L{mailgate.smtp.LocalDelivery}) the L{DELIVERY_SETTINGS} of C{config},
    for the recipients checked from now on.
    """
    delivery.domains = frozenset(d.lower() for d in config.domains) if config.domains else None
    delivery.postmaster = config.postmaster
    delivery.recipientDelimiter = config.recipientDelimiter or ""
    delivery.deliveredTo = config.deliveredTo
    delivery.quotaExceeded = config.quotaExceeded
    # What was remembered of a domain or recipient was under the old
    # domains and delimiter.
    delivery.forgetRecipients()


def _attributeOf(name):
    """
    The L{mailgate.config.MailgateConfig} attribute of the setting C{name}.
    """
    return next(s.attribute for s in SETTINGS if s.name == name)


def reloadTokenKeys(tokens, log):
    """
    SIGHUP: read the OAuth 2.0 signing keys again (an identity provider
    rotates them); keys that cannot be read leave those in service, and
    the reload counts as failed.
    """
    try:
        tokens.reload()
    except ConfigurationError as e:
        log.error("oauth2 keys not reloaded, keeping those in service: {error}", error=str(e),
                  event="oauth2.reload_failed")
        return False
    log.info("oauth2 keys reloaded: {count} keys", count=len(tokens.keys), event="oauth2.reloaded")
    _warnOfKeyFiles(tokens, log)
    return None


def _warnOfKeyFiles(tokens, log):
    """
    Warn, after each reload as at the start, of an OAuth 2.0 key file that
    others than its owner may replace (L{mailgate.auth.oauth.keyFileWarning}).
    """
    for warning in tokens.keyWarnings:
        log.warn("{warning}", warning=warning, event="oauth2.key_permissions")
