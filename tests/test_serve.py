"""
C{mailgate serve}: the server in the foreground with the options of
C{twistd mailgate}, which works where the twistd plugin is not found.

Developers install with C{pip install -e .}; Twisted's plugin scan looks
only in C{twisted/plugins} directories on C{sys.path}, which an editable
install does not put there, so C{twistd mailgate} is then unknown.  The
test makes a real editable install into a fresh virtual environment (its
dependencies borrowed from the suite's, without mailgate), shows the
plugin is not found there, and serves POP3 with that environment's
C{mailgate serve}.
"""

import poplib
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from twisted import version as twistedVersion

from e2e import DEADLINE, ServerProcess, runCommand
from mailgate.testing import addUser, deliver, memoryStore

REPO = Path(__file__).resolve().parent.parent
ALICE = "alice@example.org"
PASSWORD = "wonderland"


def dependenciesWithoutMailgate(directory):
    """
    A directory of links to everything installed next to the suite's
    Twisted except mailgate itself and its twistd plugin: the
    dependencies, as a fresh environment would have them.
    """
    site = Path(sysconfig.get_paths()["purelib"])
    directory.mkdir()
    for entry in site.iterdir():
        if entry.name.startswith(("mailgate", "__editable__")) or entry.suffix == ".pth":
            continue
        if entry.name == "twisted":
            twisted = directory / "twisted"
            twisted.mkdir()
            for part in entry.iterdir():
                if part.name != "plugins":
                    (twisted / part.name).symlink_to(part)
            plugins = twisted / "plugins"
            plugins.mkdir()
            for plugin in (entry / "plugins").iterdir():
                if plugin.name not in ("mailgate_plugin.py", "dropin.cache", "__pycache__"):
                    (plugins / plugin.name).symlink_to(plugin)
            continue
        (directory / entry.name).symlink_to(entry)
    return directory


@pytest.fixture(scope="module")
def editable(tmp_path_factory):
    """
    A virtual environment with mailgate installed by C{pip install -e}
    from a copy of the working tree: its C{bin} directory.
    """
    root = tmp_path_factory.mktemp("editable")
    source = root / "src"
    shutil.copytree(
        REPO,
        source,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", ".pgtest", "build", "dist", "*.egg-info", ".pytest_cache", "__pycache__",
            ".hypothesis", "benchmarks", "*.sqlite3*",
        ),
    )
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True, timeout=60,
    ).stdout.strip()
    Path(purelib, "dependencies.pth").write_text(str(dependenciesWithoutMailgate(root / "deps")) + "\n")
    code, out, err = runCommand(
        [str(python), "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-build-isolation",
         "-e", str(source)],
        timeout=180,
    )
    assert code == 0, err
    return venv / "bin", source


class ServeProcess(ServerProcess):
    """
    A server started with C{mailgate serve} from a given C{bin} directory.
    """

    def __init__(self, bin, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.command = (str(bin / "mailgate"), "serve")


def test_theEditableInstallServesWithMailgateServe(editable, tmp_path):
    bin, source = editable
    python = str(bin / "python")
    # mailgate comes from the working tree, and twistd cannot see its plugin.
    code, out, err = runCommand(
        [python, "-c",
         "import mailgate; from twisted.plugin import getPlugins;"
         "from twisted.application.service import IServiceMaker;"
         "print(mailgate.__file__); print([m.tapname for m in getPlugins(IServiceMaker)])"],
        cwd=tmp_path,
    )
    assert code == 0, err
    where, makers = out.splitlines()
    assert Path(where).is_relative_to(source), where
    assert "'mailgate'" not in makers, makers
    code, out, err = runCommand(
        [python, "-c", "from twisted.scripts.twistd import run; run()", "-n", "mailgate"], cwd=tmp_path
    )
    assert "Unknown command: mailgate" in out + err, (code, out, err)
    # Twisted before 26.10 exits 0 there (setup.cfg allows 23.10 on).
    if (twistedVersion.major, twistedVersion.minor) >= (26, 10):
        assert code != 0, (code, out, err)

    # mailgate serve needs no plugin.
    database = f"sqlite:///{tmp_path / 'mail.sqlite3'}"
    store = memoryStore(database)
    try:
        addUser(store, ALICE, PASSWORD)
        deliver(store, [ALICE], b"Subject: hello\r\n\r\nfirst message\r\n")
    finally:
        store.close()
    server = ServeProcess(bin, database, cwd=tmp_path)
    server.start()
    try:
        client = poplib.POP3("127.0.0.1", server.port, timeout=DEADLINE)
        assert client.getwelcome().startswith(b"+OK mailgate POP3 server ready")
        client.user(ALICE)
        client.pass_(PASSWORD)
        assert client.stat() == (1, len(b"Subject: hello\r\n\r\nfirst message\r\n"))
        client.quit()
    finally:
        status = server.stop()
    assert status in (0, -15), server.log()
    assert "Server Shut Down." in server.stdout, server.log()


def test_serveTakesTheOptionsOfTwistdMailgate(editable, tmp_path):
    """
    C{mailgate serve --help} lists the plugin's options; a bad one is a
    usage error (64) that says what was wrong, and so is a value the
    plugin refuses.  C{mailgate --database URL serve} serves that database.
    """
    bin, _ = editable
    mailgate = str(bin / "mailgate")
    code, out, err = runCommand([mailgate, "serve", "--help"], cwd=tmp_path)
    assert code == 0, err
    assert out.startswith("Usage: mailgate serve [options]")
    for option in ("--pop3=", "--smtp=", "--tls-cert=", "--trusted-network=", "--no-apop"):
        assert option in out, option
    code, out, err = runCommand([mailgate, "serve", "--bogus"], cwd=tmp_path)
    assert (code, out, err) == (
        64, "", "mailgate serve: option --bogus not recognized (mailgate serve --help lists the options)\n"
    )
    code, out, err = runCommand([mailgate, "serve", "--pop3", "nonsense:1"], cwd=tmp_path)
    assert code == 64 and "invalid endpoint 'nonsense:1'" in err, (code, err)
    # mailgate's own --database reaches the server (serve's own would win).
    code, out, err = runCommand([mailgate, "--database", "mysql://db/mail", "serve"], cwd=tmp_path)
    assert code == 64 and "unsupported database URL 'mysql://db/mail'" in err, (code, err)
