"""
C{haproxy:tls:DIR...} (Twisted's C{tls:} listener, its certificate chosen
by SNI from a directory of PEM files) cannot work behind HAProxy, for the
reason C{haproxy:ssl:...} cannot (tests/test_haproxy_tls_listener.py): it
does TLS first and reads the PROXY header inside it, which HAProxy sends
in the clear before TLS.  Measured with a real HAProxy (C{send-proxy-v2
ssl verify none sni ...}): a plain C{tls:} listener greeted the client,
C{haproxy:tls:} closed it ungreeted.  It is refused as C{haproxy:ssl:} is:
at start and by C{mailgate config --check}, one line, exit 78.
"""

import subprocess

import pytest

from certs import makeCertificate
from e2e import DEADLINE, MAILGATE, TWISTD, childEnvironment
from mailgate import config as settings


@pytest.fixture
def pems(tmp_path):
    """
    A directory of one PEM (certificate and key), as Twisted's tls:
    listener reads them.
    """
    cert, key = makeCertificate(tmp_path, "mail.example.test")
    directory = tmp_path / "pems"
    directory.mkdir()
    (directory / "mail.example.test.pem").write_bytes(cert.read_bytes() + key.read_bytes())
    return directory


def sniListener(pems, kind="haproxy:tls"):
    return f"{kind}:{pems}:port=0:interface=127.0.0.1"


@pytest.mark.parametrize("kind", ["haproxy:tls", "HAProxy:TLS", "haproxy: tls"])
def test_aTLSListenerBehindHAProxyIsRefused(pems, kind):
    description = sniListener(pems, kind)
    with pytest.raises(ValueError) as refused:
        settings.checkEndpoint(description)
    reason = str(refused.value)
    assert "\n" not in reason
    assert "tls: cannot work behind haproxy:" in reason, reason
    assert "HAProxy sends its PROXY header in the clear, before TLS" in reason, reason
    assert "--pop3s haproxy:tcp:995" in reason, reason
    # Without haproxy:, the same tls: listener is fine; haproxy:tcp: too.
    plain = sniListener(pems, "tls")
    assert settings.checkEndpoint(plain) == plain
    assert settings.checkEndpoint("haproxy:tcp:0:interface=127.0.0.1") == "haproxy:tcp:0:interface=127.0.0.1"


@pytest.mark.parametrize("option", ["--pop3", "--smtp"])
def test_theServerRefusesToStartWithOne(tmp_path, pems, option):
    started = subprocess.run(
        [TWISTD, "-n", "--pidfile=", "mailgate", "--database", f"sqlite:///{tmp_path / 'm.sqlite3'}",
         option, sniListener(pems)],
        capture_output=True, text=True, timeout=DEADLINE, env=childEnvironment(), cwd=tmp_path,
    )
    assert started.returncode == 78, started.stdout + started.stderr
    [line] = started.stderr.splitlines()
    assert line.startswith(f"mailgate: {option}: invalid endpoint 'haproxy:tls:"), line
    assert "tls: cannot work behind haproxy:" in line and "--pop3s haproxy:tcp:995" in line, line
    assert "Traceback" not in started.stdout


def test_configCheckRefusesOne(tmp_path, pems):
    path = tmp_path / "mailgate.toml"
    path.write_text(f'database = "sqlite:///{tmp_path / "m.sqlite3"}"\npop3 = ["{sniListener(pems)}"]\n')
    checked = subprocess.run(
        [MAILGATE, "--config", str(path), "config", "--check"],
        capture_output=True, text=True, timeout=DEADLINE, env=childEnvironment(), cwd=tmp_path,
    )
    assert checked.returncode == 78, checked.stdout + checked.stderr
    [line] = checked.stderr.splitlines()
    assert "key 'pop3': invalid endpoint 'haproxy:tls:" in line and "tls: cannot work behind haproxy:" in line, line
