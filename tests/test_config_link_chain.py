"""
A configuration file reached through a chain of symbolic links
(/etc/mailgate.toml -> SHARED/current -> a file kept elsewhere) is as
open to replacement as the chain's weakest directory: a user who may
write SHARED (every user, no sticky bit) may replace the link there and so
choose the file read, the server's database, listeners and certificates.
6363a63 looked at the directory of the name given and of the file at the
end; a link in between was not looked at, and nothing was warned of.
"""

import subprocess

from e2e import DEADLINE, MAILGATE, childEnvironment


def test_aLinkInBetweenInADirectoryEveryoneMayWriteIsWarnedOf(tmp_path):
    safe = tmp_path / "safe"
    safe.mkdir()
    safe.chmod(0o755)
    target = safe / "mailgate.toml"
    target.write_text('hostname = "mail.example.org"\n')
    target.chmod(0o644)
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    between = shared / "current"
    # Relative, as such links often are.
    between.symlink_to("../safe/mailgate.toml")
    etc = tmp_path / "etc"
    etc.mkdir()
    etc.chmod(0o755)
    link = etc / "mailgate.toml"
    link.symlink_to(between)
    done = subprocess.run(
        [MAILGATE, "--config", str(link), "config", "--check"], capture_output=True, text=True,
        timeout=DEADLINE, env=childEnvironment(),
    )
    assert (done.returncode, done.stdout) == (0, f"mailgate: {link}: configuration OK\n")
    assert done.stderr == (
        f"mailgate: warning: the directory {shared} of the configuration file {link} may be written by every user "
        "of this machine (mode 0777), who may replace the file, and so the database, listeners and certificates "
        f"the server uses at its next start or reload chosen: chmod o-w {shared}\n"
    )


def test_aChainThroughSafeDirectoriesIsNotWarnedOf(tmp_path):
    safe = tmp_path / "safe"
    safe.mkdir()
    safe.chmod(0o755)
    target = safe / "mailgate.toml"
    target.write_text('hostname = "mail.example.org"\n')
    target.chmod(0o644)
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    (sticky / "current").symlink_to(target)
    etc = tmp_path / "etc"
    etc.mkdir()
    etc.chmod(0o755)
    link = etc / "mailgate.toml"
    link.symlink_to(sticky / "current")
    done = subprocess.run(
        [MAILGATE, "--config", str(link), "config", "--check"], capture_output=True, text=True,
        timeout=DEADLINE, env=childEnvironment(),
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, f"mailgate: {link}: configuration OK\n", "")
