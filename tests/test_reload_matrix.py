"""
What a reload (SIGHUP, C{systemctl reload}) does with each kind of setting
of the configuration file, on one real C{twistd -n mailgate --config FILE}:
a changed setting is either applied to new sessions (C{config.reloaded}
names it) or named as waiting for a restart (C{config.restart_needed}, a
changed database C{config.database_refused}), and a new session then sees
what the log said, never the file's value while the log is silent.

The in-process tests of L{mailgate.service} (tests/test_service.py) change
one or two settings at a time; this one changes a setting of every kind at
once (limits, timeouts, policy and ban settings, networks, listeners added,
the metrics listener, log format, retention and quota, host name and
greeting, the database, OAuth, TLS ticket keys), then applies a traced
network, another certificate and TLS version, narrower trusted, cleartext
and balancer networks, then puts the file back.  What each connection
limit, ban setting and retention or quota default does once applied is
shown by real clients in tests/test_reload_policy.py.  Every wait is
bounded (L{e2e.DEADLINE}).
"""

import json
import poplib
import signal
import smtplib
import socket
import ssl

import pytest
from certs import makeCertificate
from oauthtokens import Keys

from tests.e2e import DEADLINE, TWISTD, ServerProcess, waitFor

ORIGINAL = """\
database = "sqlite:///{tmp}/mail.sqlite3"
pop3 = ["tcp:0:interface=127.0.0.1"]
pop3s = ["tcp:0:interface=127.0.0.1"]
tls-cert = "{tmp}/first.test.crt"
tls-key = "{tmp}/first.test.key"
smtp = ["tcp:0:interface=127.0.0.1"]
hostname = "one.test"
domain = ["one.test"]
postmaster = "postmaster@one.test"
log-format = "json"
greeting = "first greeting"
max-message-size = "1M"
oauth2-keys = ["{tmp}/jwks.json"]
oauth2-issuer = ["https://login.example.test/realms/mail"]
oauth2-audience = ["mailgate"]
"""

#: one setting of each kind, each another value than ORIGINAL's (or the
#: default), none of which a running server applies
RESTART_ONLY = {
    "database": '"sqlite:///{tmp}/other.sqlite3"',
    "lmtp": '["tcp:0:interface=127.0.0.1"]',
    "metrics": '"tcp:0:interface=127.0.0.1"',
    "log-format": '"text"',
    "apop": '"always"',
    "auth-default-realm": '"one.test"',
    "master-users": "true",
    "master-user-separator": '"*"',
}

#: settings a reload applies to the sessions opened after it (a session
#: under way keeps its own), with another value than ORIGINAL's
SESSION = {
    "hostname": '"two.test"',
    "greeting": '"second greeting"',
    "max-message-size": '"2M"',
    "max-recipients": "7",
    "idle-timeout": "900",
    "login-timeout": "60",
    "auth-failure-delay": "0.5",
    "min-data-rate": "0",
    "smtp-idle-timeout": "600",
}

#: the connection policy's settings and the server's defaults for
#: maildrops, which a reload applies to what comes after it (the
#: connections open stay, the failures counted and bans in force too)
POLICY = {
    "max-connections": "50",
    "max-connections-per-ip": "3",
    "auth-penalty-max": "5",
    "ban-after": "3",
    "ban-window": "300",
    "ban-time": "60",
    "unknown-recipient-slow-after": "5",
    "unknown-recipient-ban-after": "9",
    "exempt-network": '["192.0.2.0/24"]',
    "default-quota": '"1G"',
    "quota-warning": "[80]",
    "expire-days": "30",
    "keep-deleted-days": "3",
    "duplicate-window": "60",
}

#: how mail is taken in, SMTP's error throttling, what logins are checked
#: with, the stop's grace and the timers' periods, which a reload applies
#: to the recipients, error replies, logins, stop and timers after it
#: (tests/test_reload_more.py shows what each does then)
LATER = {
    "domain": '["one.test", "two.test"]',
    "postmaster": '"admin@one.test"',
    "recipient-delimiter": '"+"',
    "delivered-to": '"none"',
    "quota-exceeded": '"permanent"',
    "spool-directory": '"{tmp}"',
    "smtp-soft-error-limit": "3",
    "smtp-error-sleep-time": "2",
    "login-delay": "60",
    "auth-cache-size": "100",
    "auth-cache-ttl": "10",
    "shutdown-grace": "5",
    "tls-ticket-key-rotation": "60",
    "memory-trim-interval": "30",
    # While OAuth stays on (tests/test_reload_oauth.py shows the logins).
    "oauth2-issuer": '["https://login.example.test/realms/other"]',
    "oauth2-audience": '["webmail"]',
    "oauth2-algorithm": '["ES256"]',
    "oauth2-clock-skew": "120",
    "oauth2-username-claim": '"preferred_username"',
}

#: settings a running server applies to new sessions, with another value
LIVE = {
    "debug-peer": '["127.0.0.0/8"]',
    "tls-cert": '"{tmp}/second.test.crt"',
    "tls-key": '"{tmp}/second.test.key"',
    "tls-min-version": '"1.3"',
    # Each new session asks once: one from 127.0.0.1 is no longer trusted
    # with a password in the clear, nor given mail without TLS.
    "trusted-network": '["192.0.2.0/24"]',
    "smtp-cleartext-network": '["192.0.2.0/24"]',
    "lmtp-cleartext-network": '["192.0.2.0/24"]',
    "proxy-network": '["192.0.2.0/24"]',
    # A Dovecot proxy on 127.0.0.1: the greetings after it say [XCLIENT].
    "xclient-network": '["127.0.0.1/32"]',
}


class ConfiguredServer(ServerProcess):
    """
    A server whose every setting comes from its configuration file: no
    option of the command line overrides a key of it.  C{expect}: the
    listeners the file gives it, as L{ServerProcess} waits for them.
    """

    def __init__(self, configPath, cwd, expect=None):
        super().__init__(None, cwd=cwd, expect=expect or {"POP3": 1, "POP3S": 1, "SMTP": 1})
        self.configPath = configPath

    @property
    def argv(self):
        return [TWISTD, "-n", "--pidfile=", "mailgate", "--config", str(self.configPath)]

    def records(self, *names):
        """
        The JSON log records of the events C{names}, in the order written.
        """
        found = []
        for line in self.stdout.splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("event") in names:
                found.append(record)
        return found

    def events(self, name):
        return self.records(name)

    def reload(self):
        """
        SIGHUP; the reload's C{config.reloaded} record, or C{None} when it
        failed (C{config.reload_failed}).
        """
        ends = ("config.reloaded", "config.reload_failed")
        before = len(self.records(*ends))
        self.process.send_signal(signal.SIGHUP)
        waitFor(lambda: len(self.records(*ends)) > before, what=f"the reload's config.reloaded line\n{self.log()}")
        last = self.records(*ends)[before]
        return last if last["event"] == "config.reloaded" else None


def greeting(server):
    client = poplib.POP3("127.0.0.1", server.port, timeout=DEADLINE)
    try:
        return client.getwelcome().decode()
    finally:
        client.quit()


def capa(server):
    client = poplib.POP3("127.0.0.1", server.port, timeout=DEADLINE)
    try:
        return client.capa()
    finally:
        client.quit()


def ehlo(server):
    client = smtplib.SMTP("127.0.0.1", server.portOf("SMTP"), timeout=DEADLINE)
    try:
        code, text = client.ehlo("client.test")
        assert code == 250
        return text.decode().splitlines()[0].split()[0], client.esmtp_features.get("size")
    finally:
        client.quit()


def pop3sCertificate(server, maximum=ssl.TLSVersion.TLSv1_3):
    """
    The subject CN of the certificate a new POP3S session is given, by a
    client that speaks at most C{maximum}.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.maximum_version = maximum
    with socket.create_connection(("127.0.0.1", server.portOf("POP3S")), timeout=DEADLINE) as raw:
        with context.wrap_socket(raw) as tls:
            der = tls.getpeercert(binary_form=True)
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    [cn] = x509.load_der_x509_certificate(der).subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return cn.value


def test_everyKindOfSettingIsAppliedOrNamed(tmp_path):
    """
    A file changing a setting of every kind: one C{config.restart_needed}
    line names each the running server does not apply (the database its
    own C{config.database_refused}), and new POP3S sessions keep the
    certificate of the start, the log its JSON format; the host name, the
    greeting, the size, the recipients, the POP3 and SMTP
    timeouts, the data rate, the connection limits, the penalty and ban
    settings, the exempt networks, the quota and retention defaults, the
    domains, postmaster, recipient delimiter, over-quota reply and spool,
    SMTP's error throttling, login-delay, the credential cache, the
    stop's grace, the timers' periods and (OAuth on before and after) the
    oauth2-* settings are said applied, and new sessions get the new host name,
    greeting and SIZE while a POP3 and an SMTP session opened before keep
    the start's.  A traced
    network, another certificate and tls-min-version, and the trusted,
    cleartext and balancer networks then are applied at once (new
    sessions traced, given the new certificate, refused TLS 1.2, not
    offered USER nor given mail in the clear from 127.0.0.1) while the
    others still wait; the file put back, the reload applies the start's
    values again and has nothing waiting for a restart.
    """
    makeCertificate(tmp_path, "first.test")
    makeCertificate(tmp_path, "second.test")
    Keys().write(tmp_path)
    path = tmp_path / "mailgate.toml"
    original = ORIGINAL.format(tmp=tmp_path)
    path.write_text(original)
    server = ConfiguredServer(path, tmp_path)
    try:
        server.start()
        assert greeting(server).startswith("+OK first greeting")
        assert ehlo(server) == ("one.test", "1048576")
        assert pop3sCertificate(server, ssl.TLSVersion.TLSv1_2) == "first.test"

        changed = "".join(
            line for line in original.splitlines(keepends=True) if line.split(" =")[0] not in RESTART_ONLY
        )
        applied = {**SESSION, **POLICY, **LATER}
        changed = "".join(line for line in changed.splitlines(keepends=True) if line.split(" =")[0] not in applied)
        changed += "".join(f"{name} = {value}\n" for name, value in {**RESTART_ONLY, **applied}.items())
        changed = changed.format(tmp=tmp_path)
        path.write_text(changed)
        # Sessions under way at the reload keep what they began with.
        oldPOP3 = poplib.POP3("127.0.0.1", server.port, timeout=DEADLINE)
        oldSMTP = smtplib.SMTP("127.0.0.1", server.portOf("SMTP"), timeout=DEADLINE)
        try:
            assert oldSMTP.ehlo("client.test")[0] == 250
            reloaded = server.reload()
            assert reloaded is not None, server.log()
            assert sorted(reloaded["applied"]) == sorted({**SESSION, **POLICY, **LATER})
            # ... the greeting they got, the size limit in force.
            assert oldPOP3.getwelcome().decode().startswith("+OK first greeting")
            assert "UIDL" in oldPOP3.capa()
            code, text = oldSMTP.ehlo("client.test")
            assert text.decode().split()[0] == "one.test"
            assert oldSMTP.esmtp_features.get("size") == "1048576"
            assert oldSMTP.mail("a@client.test", ["SIZE=1500000"])[0] == 552
        finally:
            oldPOP3.quit()
            oldSMTP.quit()
        [later] = server.events("config.restart_needed")
        assert sorted(later["settings"]) == sorted(set(RESTART_ONLY) - {"database"})
        [refused] = server.events("config.database_refused")
        assert "other.sqlite3" in refused["new"]
        # New sessions see what the server said it serves: the reload's
        # host name, greeting and size.
        assert greeting(server).startswith("+OK second greeting")
        assert ehlo(server) == ("two.test", "2097152")
        assert "USER" in capa(server)
        assert pop3sCertificate(server, ssl.TLSVersion.TLSv1_2) == "first.test"
        # Still JSON (log-format waits for the restart too), and no
        # listener was added.
        assert all(line.startswith("{") for line in server.stdout.splitlines())
        assert "LMTP listening" not in server.stdout and "METRICS listening" not in server.stdout

        live = "".join(
            line for line in changed.splitlines(keepends=True) if line.split(" =")[0] not in LIVE
        )
        live += "".join(f"{name} = {value.format(tmp=tmp_path)}\n" for name, value in LIVE.items())
        path.write_text(live)
        reloaded = server.reload()
        assert sorted(reloaded["applied"]) == sorted(LIVE)
        # New sessions get the new certificate, and only over TLS 1.3.
        assert pop3sCertificate(server) == "second.test"
        with pytest.raises(ssl.SSLError):
            pop3sCertificate(server, ssl.TLSVersion.TLSv1_2)
        # 127.0.0.1 no longer on the trusted and cleartext networks: no
        # password in the clear, no mail without TLS.
        assert "USER" not in capa(server)
        client = smtplib.SMTP("127.0.0.1", server.portOf("SMTP"), timeout=DEADLINE)
        try:
            client.ehlo("client.test")
            assert client.mail("a@client.test")[0] == 530
        finally:
            client.quit()
        assert len(server.events("config.restart_needed")) == 2
        assert sorted(server.events("config.restart_needed")[-1]["settings"]) == sorted(later["settings"])
        traced = len(server.events("session.trace"))
        assert greeting(server).startswith("+OK [XCLIENT] second greeting")
        waitFor(lambda: len(server.events("session.trace")) > traced, what="a new session traced")

        path.write_text(original)
        reloaded = server.reload()
        # All of them, in the JSON record's list as in its text: more than
        # the 50 items other fields' lists are cut at (mailgate.logs).
        assert len(reloaded["applied"]) > 50
        assert sorted(reloaded["applied"]) == sorted({**LIVE, **SESSION, **POLICY, **LATER})
        assert reloaded["summary"] == "applied " + ", ".join(reloaded["applied"])
        assert pop3sCertificate(server, ssl.TLSVersion.TLSv1_2) == "first.test"
        assert "USER" in capa(server)
        assert greeting(server).startswith("+OK first greeting")
        assert ehlo(server) == ("one.test", "1048576")
        assert len(server.events("config.restart_needed")) == 2
        assert len(server.events("config.database_refused")) == 2
    finally:
        server.stop()


def test_whatTheMailgateCommandReadsFromTheFileAReloadApplies():
    """
    The settings the mailgate command reads from the server's file at each
    run (mailgate deliver, an MTA's pipe transport, delivers with them) are
    all applied by a reload: mail through the pipe and through the
    server's SMTP and LMTP are never taken by different settings until a
    restart, as they were with recipient-delimiter, quota-exceeded,
    hostname, spool-directory, postmaster and domain.
    """
    from mailgate.config import COMMAND_SETTINGS
    from mailgate.reload import (
        DELIVERY_SETTINGS,
        NAME_SETTINGS,
        SESSION_SETTINGS,
        STORE_SETTINGS,
    )

    assert COMMAND_SETTINGS <= DELIVERY_SETTINGS | NAME_SETTINGS | SESSION_SETTINGS.keys() | STORE_SETTINGS
