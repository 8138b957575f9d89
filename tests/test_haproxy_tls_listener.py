"""
C{haproxy:ssl:...} as a listener cannot work behind HAProxy: Twisted's
C{ssl:} listener does TLS first and would read the PROXY header inside
it, while HAProxy (C{send-proxy} or C{send-proxy-v2} with C{ssl} on its
server line) sends the header in the clear before TLS: every connection
failed its handshake and no client was ever greeted (measured with a real
HAProxy 2.6).  It is refused at start and by C{mailgate config --check},
in one line saying what to use instead, exit 78 as every other listener
mistake; what it names, C{--pop3s haproxy:tcp:...} (mailgate's own TLS
after the header), is checked to work with a real HAProxy.

The same goes for C{haproxy:tls:DIR...} (Twisted's C{tls:} listener, its
certificate chosen by SNI from a directory of PEM files): measured with a
real HAProxy (C{send-proxy-v2 ssl verify none sni ...}), a plain C{tls:}
listener greeted the client, C{haproxy:tls:} closed it ungreeted.
"""

import poplib
import re
import socket
import subprocess

import pytest

from certs import makeCertificate
from e2e import DEADLINE, MAILGATE, TWISTD, childEnvironment, sqliteOnly, waitFor
from e2e import mailgate_server  # noqa: F401 (fixture)
from mailgate import config as settings
from test_pairings import HAPROXY_CFG, haproxy  # noqa: F401 (fixture)


@pytest.fixture
def certificate(tmp_path):
    return makeCertificate(tmp_path, "mail.example.test")


def sslListener(certificate, tmp_path, kind="haproxy:ssl"):
    """
    Twisted's C{ssl:} listener, its certificate and key named.
    """
    cert, key = certificate
    return f"{kind}:0:interface=127.0.0.1:privateKey={key}:certKey={cert}"


def sniListener(certificate, tmp_path, kind="haproxy:tls"):
    """
    Twisted's C{tls:} listener over a directory of one PEM (certificate and
    key), as it reads them.
    """
    cert, key = certificate
    directory = tmp_path / "pems"
    directory.mkdir(exist_ok=True)
    (directory / "mail.example.test.pem").write_bytes(cert.read_bytes() + key.read_bytes())
    return f"{kind}:{directory}:port=0:interface=127.0.0.1"


#: each listener doing TLS before the PROXY header: its name and how to write one
LISTENERS = {"ssl": sslListener, "tls": sniListener}


@pytest.mark.parametrize(
    "name, kind",
    [(name, kind) for name in LISTENERS for kind in (f"haproxy:{name}", f"HAProxy:{name.upper()}", f"haproxy: {name}")],
)
def test_aTLSFirstListenerBehindHAProxyIsRefused(certificate, tmp_path, name, kind):
    description = LISTENERS[name](certificate, tmp_path, kind)
    with pytest.raises(ValueError) as refused:
        settings.checkEndpoint(description)
    reason = str(refused.value)
    assert "\n" not in reason
    assert f"{name}: cannot work behind haproxy:" in reason, reason
    assert "HAProxy sends its PROXY header in the clear, before TLS" in reason, reason
    assert "--pop3s haproxy:tcp:995" in reason, reason
    # Without haproxy:, the same listener is fine; haproxy:tcp: too.
    plain = LISTENERS[name](certificate, tmp_path, name)
    assert settings.checkEndpoint(plain) == plain
    assert settings.checkEndpoint("haproxy:tcp:0:interface=127.0.0.1") == "haproxy:tcp:0:interface=127.0.0.1"


@pytest.mark.parametrize(
    "name, option", [("ssl", "--pop3"), ("ssl", "--pop3s"), ("ssl", "--smtp"), ("ssl", "--lmtp"), ("tls", "--pop3"),
                     ("tls", "--smtp")],
)
def test_theServerRefusesToStartWithOne(tmp_path, certificate, name, option):
    cert, key = certificate
    started = subprocess.run(
        [TWISTD, "-n", "--pidfile=", "mailgate", "--database", f"sqlite:///{tmp_path / 'm.sqlite3'}",
         "--tls-cert", str(cert), "--tls-key", str(key), option, LISTENERS[name](certificate, tmp_path)],
        capture_output=True, text=True, timeout=DEADLINE, env=childEnvironment(), cwd=tmp_path,
    )
    assert started.returncode == 78, started.stdout + started.stderr
    [line] = started.stderr.splitlines()
    assert line.startswith(f"mailgate: {option}: invalid endpoint 'haproxy:{name}:"), line
    assert f"{name}: cannot work behind haproxy:" in line and "--pop3s haproxy:tcp:995" in line, line
    assert "Traceback" not in started.stdout


@pytest.mark.parametrize("name, key", [("ssl", "pop3"), ("ssl", "smtp"), ("tls", "pop3")])
def test_configCheckRefusesOne(tmp_path, certificate, name, key):
    path = tmp_path / "mailgate.toml"
    listener = LISTENERS[name](certificate, tmp_path)
    path.write_text(f'database = "sqlite:///{tmp_path / "m.sqlite3"}"\n{key} = ["{listener}"]\n')
    checked = subprocess.run(
        [MAILGATE, "--config", str(path), "config", "--check"],
        capture_output=True, text=True, timeout=DEADLINE, env=childEnvironment(), cwd=tmp_path,
    )
    assert checked.returncode == 78, checked.stdout + checked.stderr
    [line] = checked.stderr.splitlines()
    assert f"key '{key}': invalid endpoint 'haproxy:{name}:" in line, line
    assert f"{name}: cannot work behind haproxy:" in line and "--pop3s haproxy:tcp:995" in line, line


@sqliteOnly
def test_whatTheRefusalNamesWorksBehindARealHAProxy(mailgate_server, haproxy, certificate):  # noqa: F811
    """
    HAProxy speaking TLS to mailgate (C{send-proxy-v2 ssl}) reaches a
    C{--pop3s haproxy:tcp:} listener: the header in the clear, then
    mailgate's own TLS; the client, in the clear to HAProxy, is greeted
    and logged under its own address.
    """
    cert, key = certificate
    description = "haproxy:tcp:0:interface=127.0.0.1"
    server = mailgate_server("--pop3s", description, "--tls-cert", str(cert), "--tls-key", str(key))
    backPort = int(re.search(rf"POP3S listening on 127\.0\.0\.1:(\d+) \({description}\)", server.stdout).group(1))
    front = haproxy(backPort, HAPROXY_CFG.replace("send-proxy-v2 source", "send-proxy-v2 ssl verify none source"))
    client = poplib.POP3.__new__(poplib.POP3)
    client.host, client.port = "127.0.0.1", front
    client._tls_established = False
    client.sock = socket.create_connection(("127.0.0.1", front), timeout=DEADLINE, source_address=("127.0.0.2", 0))
    client.file = client.sock.makefile("rb")
    client._debugging = 0
    client.welcome = client._getresp()
    assert client.getwelcome().startswith(b"+OK")
    client.quit()
    line = waitFor(
        lambda: re.search(r"pop3 disconnect peer=127\.0\.0\.2:\d+ reason='quit' .*", server.stdout), "the end line"
    ).group(0)
    assert " tls=yes " in line, line
