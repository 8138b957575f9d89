"""
C{pop3-client-workarounds} (Dovecot's C{pop3_client_workarounds}) as the
command line, a configuration file and an embedder give it, and an
unknown name refused at start in one line, as any bad setting is.
"""

import pytest

from e2e import TWISTD, databaseURL, runCommand
from mailgate.config import MailgateConfig, effectiveFile
from test_config import fileError, writeConfig
from test_tap import noEnvironmentDatabase, parse  # noqa: F401 (autouse fixture)

BOTH = ("outlook-no-nuls", "oe-ns-eoh")


def test_noneByDefault():
    assert parse().toConfig().pop3ClientWorkarounds is None
    assert MailgateConfig().pop3ClientWorkarounds is None


@pytest.mark.parametrize(
    "given, names",
    [
        ("outlook-no-nuls oe-ns-eoh", BOTH),
        ("oe-ns-eoh,outlook-no-nuls", BOTH),
        (" oe-ns-eoh , ", ("oe-ns-eoh",)),
        ("outlook-no-nuls", ("outlook-no-nuls",)),
        ("", None),
    ],
)
def test_theCommandLineTakesDovecotsList(given, names):
    assert parse("--pop3-client-workarounds", given).toConfig().pop3ClientWorkarounds == names


@pytest.mark.parametrize(
    "value, names",
    [
        ('"outlook-no-nuls oe-ns-eoh"', BOTH),
        ('"oe-ns-eoh, outlook-no-nuls"', BOTH),
        ('["oe-ns-eoh", "outlook-no-nuls"]', BOTH),
        ('["oe-ns-eoh"]', ("oe-ns-eoh",)),
        ("[]", None),
    ],
)
def test_theFileTakesAStringOrAnArray(tmp_path, value, names):
    path = writeConfig(tmp_path, f"pop3-client-workarounds = {value}\n")
    config = parse("--config", path).toConfig()
    assert config.pop3ClientWorkarounds == names
    # What mailgate config --effective writes reads back the same.
    if names:
        assert effectiveFile(config) == f'pop3-client-workarounds = "{" ".join(names)}"\n'


def test_anEmbedderGivesAStringOrNames():
    assert MailgateConfig(pop3ClientWorkarounds="oe-ns-eoh outlook-no-nuls").pop3ClientWorkarounds == BOTH
    assert MailgateConfig(pop3ClientWorkarounds=["oe-ns-eoh"]).pop3ClientWorkarounds == ("oe-ns-eoh",)
    with pytest.raises(ValueError, match="unknown POP3 client workaround 'delay-newmail'"):
        MailgateConfig(pop3ClientWorkarounds="delay-newmail")


@pytest.mark.parametrize(
    "value, reason",
    [
        ('"outlook-no-nuls oe-ns-eo"', "unknown POP3 client workaround 'oe-ns-eo' (known: outlook-no-nuls, oe-ns-eoh)"),
        ('["outlook-no-nuls", 1]', "expected workaround names"),
        ("true", "expected workaround names"),
    ],
)
def test_aFileWithAnUnknownNameIsRefused(tmp_path, value, reason):
    message = fileError(tmp_path, f"pop3-client-workarounds = {value}\n")
    assert "key 'pop3-client-workarounds'" in message
    assert reason in message


def test_twistdRefusesAnUnknownNameInOneLine(tmp_path):
    """
    Dovecot's 2.3 names only: a name it does not know (a typo, or one of
    Dovecot 1.x's, delay-newmail) stops the start with exit 78, the one
    line naming it and the known ones.
    """
    code, out, err = runCommand(
        [TWISTD, "-n", "--pidfile=", "mailgate", "--database", databaseURL(tmp_path / "m.sqlite3"),
         "--pop3-client-workarounds", "outlook-no-nuls,delay-newmail"],
        cwd=tmp_path,
    )
    assert (code, out) == (78, ""), err
    assert err.splitlines() == [
        "mailgate: --pop3-client-workarounds: unknown POP3 client workaround 'delay-newmail' "
        "(known: outlook-no-nuls, oe-ns-eoh) (twistd mailgate --help lists the options)"
    ]
