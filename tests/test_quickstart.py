"""
The quick start as a newcomer follows it: what C{make run} prints (and the
README repeats), run against the server C{make run} starts, on ephemeral
ports instead of 1110 and 2525: a user added, a message sent by SMTP with
curl, and read back by POP3 with curl.
"""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from e2e import InstalledCommand, ServerProcess, runCommand, sqliteOnly

REPO = Path(__file__).resolve().parent.parent
CURL = shutil.which("curl")
PASSWORD = "quick start"


def makeRun():
    """
    What C{make run} would print, and the server command it would run,
    from C{make -n run}: nothing is run but the C{echo} and C{printf}
    lines, to see what they print.
    """
    environment = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    done = subprocess.run(
        ["make", "--no-print-directory", "-n", "run"],
        cwd=REPO, env=environment, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith('echo "mailgate: POP3 on'))
    printing = [line for line in lines[start:] if line.startswith(("echo ", "printf "))]
    [server] = [line for line in lines[start:] if "twistd" in line]
    shown = subprocess.run(
        ["sh", "-c", "\n".join(printing)], capture_output=True, text=True, timeout=60
    ).stdout
    return shown, server


def test_makeRunListensForSMTPAndSaysHowToUseIt():
    shown, server = makeRun()
    assert server.endswith("twistd --pidfile= -n mailgate --smtp tcp:2525:interface=127.0.0.1"), server
    assert "POP3 on 127.0.0.1:1110, SMTP on 127.0.0.1:2525" in shown
    assert "smtp://127.0.0.1:2525" in shown and "pop3://127.0.0.1:1110/1" in shown


@sqliteOnly
@pytest.mark.skipif(CURL is None, reason="curl is not installed (no curl on PATH)")
def test_theQuickStartDeliversBySMTPAndReadsByPOP3(tmp_path, databaseURL):
    shown, serverCommand = makeRun()
    [send] = [line.strip() for line in shown.splitlines() if "smtp://" in line]
    [read] = [line.strip() for line in shown.splitlines() if "pop3://" in line]
    [add] = [line.strip() for line in shown.splitlines() if " user add " in line]
    address = add.split()[-1]
    # The README shows the same commands.
    readme = (REPO / "README.md").read_text()
    for command in (send, read):
        assert command in readme, command

    options = serverCommand.split("mailgate", 1)[1].split()
    options = [re.sub(r"^tcp:2525:", "tcp:0:", option) for option in options]
    server = ServerProcess(databaseURL, options, cwd=tmp_path)
    server.start()
    try:
        # The installed command, as the quick start runs it.
        InstalledCommand(databaseURL, cwd=tmp_path).check("user", "add", address, "--password-stdin", input=PASSWORD + "\n")
        smtp, pop3 = server.portOf("SMTP"), server.port
        code, out, err = runCommand(["sh", "-c", send.replace("127.0.0.1:2525", f"127.0.0.1:{smtp}")])
        assert code == 0, (code, out, err)
        argv = read.replace("127.0.0.1:1110", f"127.0.0.1:{pop3}").split()
        argv[argv.index(address)] = f"{address}:{PASSWORD}"
        code, out, err = runCommand(argv)
        assert code == 0, (code, err)
        assert out.startswith("Return-Path: <") and out.endswith("Subject: hello\r\n\r\nfirst message\r\n"), out
    finally:
        server.stop()
