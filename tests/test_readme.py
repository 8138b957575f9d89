"""
The README's examples, taken from README.md and run as an administrator
would run them, so that none of them rots unnoticed: the options table
against the declarations, the command synopsis against each command's
own usage, every command line of the shell examples against the
command's and the server's parsers, the keys of the --json listings
against what each prints, the configuration file example read as the
server reads it, the metric table against what a server exports, the
Prometheus configuration and alerts checked by promtool, the Postfix
snippets read by postconf, the pipe transport's command run as Postfix
runs it and the Unix-socket pairing run with a private Postfix, the
HAProxy configuration checked by haproxy.  (The quick start, the C{.tac} file
and the systemd units have tests of their own: test_quickstart.py,
test_e2e_smtp.py, test_systemd.py.)
"""

import contextlib
import io
import re
import shlex
import shutil
import smtplib
import subprocess
import tomllib
from pathlib import Path

import pytest

from e2e import mailgate_cli, mailgate_server, sqliteOnly, waitFor  # noqa: F401 (fixtures)
from mailgate.cli import buildParser, run
from mailgate.config import SETTINGS
from mailgate.metrics import Metrics
from mailgate.tap import Options
from test_pairings import MAIN_CF, MASTER_CF, PrivatePostfix, postfixRoot  # noqa: F401 (fixture)

# The command's new passwords are hashed cheaply here (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("cheapCommandHashes")

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text(encoding="utf-8")
# Seconds a program checking an example (promtool, postconf, haproxy) may take.
DEADLINE = 30


def section(heading):
    """
    The README's text under C{heading} (a line starting with #), up to the
    next heading of the same or a higher level (not a comment line in a
    code block).
    """
    lines = README.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if re.fullmatch(rf"#+ {re.escape(heading)}\n", line)]
    assert len(starts) == 1, f"no section {heading!r} in README.md"
    level = lines[starts[0]].index(" ")
    text, fenced = [], False
    for line in lines[starts[0] + 1:]:
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(rf"#{{1,{level}}} ", line):
            break
        text.append(line)
    return "".join(text)


def codeBlocks(text, language=""):
    """
    The fenced code blocks of C{text} in C{language} ("" for those
    without one), in order, their indentation (in a list item) removed.
    """
    blocks, lines, inside = [], None, None
    for line in text.splitlines(keepends=True):
        fence = re.match(r"^( *)```(\S*)\s*$", line)
        if lines is None:
            if fence:
                lines, inside = [], fence.group(2)
                indent = len(fence.group(1))
        elif fence and len(fence.group(1)) == indent and not fence.group(2):
            if inside == language:
                blocks.append("".join(lines))
            lines = None
        else:
            lines.append(line[indent:] if line[:indent].isspace() else line)
    return blocks


def tableRows(text, header):
    """
    The cells of each row of the Markdown table that starts with the line
    C{header}.
    """
    lines = text[text.index(header):].splitlines()[2:]
    rows = []
    for line in lines:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip("|"))])
    return rows


def command(*argv, stdin=b""):
    """
    The C{mailgate} command, run in-process: its exit status, output and
    errors.
    """
    out, err = io.StringIO(), io.StringIO()
    stream = io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8", newline="")
    code = run(list(argv), stdin=stream, stdout=out, stderr=err, environ={})
    return code, out.getvalue(), err.getvalue()


def checked(argv, what):
    """
    Run a program that checks an example; skip if it is not installed.
    """
    if shutil.which(argv[0]) is None:
        pytest.skip(f"{argv[0]} is not installed (tests/sysdeps.sh installs it)")
    done = subprocess.run(argv, capture_output=True, text=True, timeout=DEADLINE)
    assert done.returncode == 0, f"{what}: {done.stdout}{done.stderr}"
    return done.stdout


# -- Running the server: the options table -----------------------------------------


def test_theOptionsTableIsEveryOptionWithItsDefault():
    """
    Every option of C{twistd mailgate} is in the table and nothing else,
    each with the default the declarations give it (where the default is
    a value: a number, a word, a list of networks).
    """
    rows = tableRows(section("Running the server: `twistd mailgate`"), "| option | default | meaning |")
    documented = {}
    for cells in rows:
        for name in re.findall(r"--([a-z0-9-]+)", cells[0]):
            documented[name] = cells[1]
    declared = {s.name for s in SETTINGS} | {flag for s in SETTINGS for flag in s.flags}
    assert set(documented) == declared | {"config"}
    for setting in SETTINGS:
        cell = documented[setting.name]
        default = setting.default
        if isinstance(default, (int, float)) and not isinstance(default, bool):
            numbers = [float(n) for n in re.findall(r"\d+(?:\.\d+)?", cell)]
            assert float(default) in numbers, (setting.name, default, cell)
        elif isinstance(default, str) and setting.defaultText is None:
            assert f"`{default}`" in cell or cell == default, (setting.name, default, cell)
        elif setting.repeated and default:
            assert all(f"`{value}`" in cell for value in default), (setting.name, default, cell)
        elif default is None and setting.defaultText is None:
            assert cell == "none", (setting.name, cell)


# -- Administration: the synopsis ----------------------------------------------------


def synopsis():
    """
    The README's synopsis of the C{mailgate} command, one command a line
    (continuation lines joined), without the global options.
    """
    [block] = codeBlocks(section("Administration: `mailgate`"))[:1]
    lines = []
    for line in block.splitlines():
        if line.startswith(" ") and lines:
            lines[-1] += " " + line.strip()
        else:
            lines.append(re.sub(r"^mailgate \[--database URL\] \[--config FILE\]", "mailgate", line))
    return lines


def test_theSynopsisIsWhatEachCommandTakes():
    """
    Each line of the synopsis names a command that exists, with the
    options its own usage lists, no more and no fewer.
    """
    lines = synopsis()
    assert len(lines) > 30
    for line in lines:
        words = line.split()
        assert words[0] == "mailgate", line
        path = []
        for word in words[1:]:
            if not re.fullmatch(r"[a-z][a-z0-9]*", word):
                break
            path.append(word)
        if path == ["serve"]:
            continue  # the options of twistd mailgate: the table above
        code, out, err = command(*path, "--help")
        assert code == 0, (line, err)
        usage = out.split("\n\n")[0]
        assert " ".join(usage.split()).startswith(f"usage: mailgate {' '.join(path)} "), (line, usage)
        given = set(re.findall(r"(?<![\w-])(--?[a-z][a-z-]*)", line)) - {"-h"}
        taken = set(re.findall(r"(?<![\w-])(--?[a-z][a-z-]*)", usage)) - {"-h"}
        assert given == taken, (line, usage)


def shellCommands():
    """
    Each command of the README's C{sh} code blocks, as the list of words
    the shell gives it: continuation lines joined, comments, pipes, lists
    and redirections taken apart, a command substitution C{$(...)} a word
    of its own.
    """
    commands = []
    for block in codeBlocks(README, "sh"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(re.sub(r"\$\([^)]*\)", "SUBSTITUTED", line), comments=True)
            command = []
            for word in [*words, "|"]:
                if word in ("|", "||", "&&", ";"):
                    commands.append(command)
                    command = []
                elif re.fullmatch(r"\d?[<>].*", word):
                    command.append(">")
                else:
                    command.append(word)
    return [[w for i, w in enumerate(c) if w != ">" and (i == 0 or c[i - 1] != ">")] for c in commands if c]


def test_everyCommandLineParses():
    """
    Every C{mailgate} and C{twistd mailgate} command line of the README's
    shell examples (a cron line's, one run as another user, in a pipe)
    is one the command and the server take, its options and arguments
    as their parsers read them; C{...} stands for more options.
    """
    names = set(buildParser()._subparsers._group_actions[0].choices)
    mailgate = twistd = 0
    for words in shellCommands():
        for i, word in enumerate(words[:-1]):
            following = words[i + 1]
            if word == "twistd" or (word == "mailgate" and words[i - 1:i] == ["twistd"]):
                # twistd [its options] mailgate [the server's options]
                if word == "twistd":
                    continue
                options = Options()
                options.parseOptions([w for w in words[i + 1:] if w != "..."])
                twistd += 1
                break
            if Path(word).name == "mailgate" and (following in names or following in ("--database", "--config")):
                argv = [w for w in words[i + 1:] if w != "..."]
                err = io.StringIO()
                try:
                    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
                        # As the command parses: serve's options are the server's.
                        args, rest = buildParser().parse_known_args(argv)
                        if args.command != "serve":
                            buildParser().parse_args(argv)
                        else:
                            Options().parseOptions(rest)
                except SystemExit as e:
                    assert not e.code, (" ".join(words), err.getvalue())
                mailgate += 1
                break
    assert mailgate > 20 and twistd > 3, (mailgate, twistd)


def test_commandsAsAnotherUserNeedNoSudo():
    """
    A command run as the server's user or as postgres goes through
    C{runuser} (util-linux, on every Debian machine), not C{sudo}, which a
    Debian installed with a root password does not have: the restore and
    the PostgreSQL set-up said C{sudo -u}, "command not found" there.
    """
    programs = {words[0] for words in shellCommands()}
    assert "sudo" not in programs and "runuser" in programs, programs


def test_theJSONKeysAreWhatTheListingsPrint(tmp_path):
    """
    The keys the README promises scripts for each C{--json} listing (and
    a node's announced settings) are the keys each prints, no more and no
    fewer: a record of every listing made on a real SQLite file, with a
    POP3 session in the registry and a message deleted and kept.
    """
    import json

    from mailgate.testing import POP3Session, addUser, deliver, memoryStore, resultOf

    listings = ("user list", "mailbox list", "mailbox deleted", "who", "nodes", "ban list")
    text = " ".join(section("Administration: `mailgate`").split())
    text = text[text.index("under keys that do not change (") :].split("; times in UTC", 1)[0]
    names = "|".join(re.escape(f"`{name}`:") for name in listings)
    promised = dict(re.findall(rf"`({'|'.join(listings)})`: (.*?)(?=; (?:{names})|$)", text))
    assert set(promised) == set(listings), promised
    announced = promised["nodes"].split("by name:", 1)[1].split(";", 1)[0]
    settings = set(re.findall(r"`([a-z_0-9]+)`", announced)) - {"null"}
    keys = {}
    for name, described in promised.items():
        while re.search(r"\([^()]*\)", described):
            described = re.sub(r"\([^()]*\)", "", described)
        keys[name] = set(re.findall(r"`([a-z_0-9]+)`", described)) - {"null"}

    url = f"sqlite:///{tmp_path / 'mail.sqlite3'}"
    store = memoryStore(url)
    try:
        addUser(store, "alice@example.org", "wonderland")
        deliver(store, ["alice@example.org"], b"Subject: a\r\n\r\none\r\n")
        deliver(store, ["alice@example.org"], b"Subject: b\r\n\r\ntwo\r\n")
        store.limits.keepDeletedDays = 7
        # What a server's registry announces (twistd mailgate sets both).
        store.sessions.name, store.sessions.quotaExceeded = "node-a[1]", "temporary"
        session = POP3Session(store)
        assert session.login("alice@example.org", "wonderland").startswith("+OK")
        assert session.command("DELE 1").startswith("+OK") and session.command("QUIT").startswith("+OK")
        session = POP3Session(store)
        assert session.login("alice@example.org", "wonderland").startswith("+OK")
        resultOf(store.sessions.flush())
        assert command("--database", url, "ban", "add", "192.0.2.7")[0] == 0
        for name in listings:
            argv = name.split() + (["alice@example.org"] if name.startswith("mailbox") else []) + ["--json"]
            code, out, err = command("--database", url, *argv)
            assert (code, err) == (0, ""), (name, out)
            records = [json.loads(line) for line in out.splitlines()]
            assert records and all(set(r) == keys[name] for r in records), (name, keys[name] ^ set(records[0]))
            if name == "nodes":
                assert set(records[0]["settings"]) == settings, settings ^ set(records[0]["settings"])
                # A setting of none is null, but for these two (README said null for all).
                none = {k: v for k, v in records[0]["settings"].items() if k in ("expire_days", "quota_octets")}
                assert none == {"expire_days": None, "quota_octets": None}, records
                assert "`quota_warnings`, a list of percentages, `[]` for none" in text
                assert records[0]["settings"]["quota_warnings"] == []
                assert '`recipient_delimiter`, a string, `""` for none' in text
                assert records[0]["settings"]["recipient_delimiter"] == ""
    finally:
        store.close()


# -- Configuration file ---------------------------------------------------------------


def test_theConfigurationExampleIsWhatTheServerReads(tmp_path):
    """
    The example file loads as C{twistd mailgate --config} loads it, and
    C{mailgate --config FILE config} shows it back, setting for setting,
    the database's password hidden.
    """
    [example] = codeBlocks(section("Configuration file"), "toml")
    path = tmp_path / "mailgate.toml"
    path.write_text(example, encoding="utf-8")
    written = tomllib.loads(example)

    options = Options()
    options.parseOptions(["--config", str(path)])
    config = options.toConfig()
    assert config.database == written["database"]
    assert config.pop3 == written["pop3"]
    # haproxy: listeners take PROXY headers only from the balancers named.
    assert any(e.startswith("haproxy:") for e in config.pop3) and config.proxyNetworks == written["proxy-network"]

    code, out, err = command("--config", str(path), "config")
    assert (code, err) == (0, ""), out
    shown = tomllib.loads(out)
    assert shown == {**written, "database": written["database"].replace(":secret@", ":***@")}


def test_aBadConfigurationFileIsExitStatus78(tmp_path):
    """
    The one line the README shows, and EX_CONFIG, which the systemd unit
    does not restart on (RestartPreventExitStatus=78), for C{mailgate
    serve} as for C{twistd mailgate}.
    """
    [line] = [b for b in codeBlocks(section("Configuration file")) if "invalid endpoint" in b]
    path = tmp_path / "mailgate.toml"
    path.write_text('pop3 = ["tcp:11O"]\n')
    code, out, err = command("serve", "--database", f"sqlite:///{tmp_path / 'm.sqlite3'}", "--config", str(path))
    assert code == 78, (code, out, err)
    assert err == line.replace("/etc/mailgate/mailgate.toml", str(path))
    assert "EX_CONFIG" in README and "RestartPreventExitStatus=78" in (REPO / "contrib/systemd/mailgate.service").read_text()


# -- Metrics and health ---------------------------------------------------------------


def test_theLogrotateRuleReopensTheLogWithoutAReload():
    """
    The logrotate rule of Logs has the server reopen its log file with
    SIGUSR1, sent to the main process by systemd (twistd's own children
    have none, and a plain kill needs the pid): it reopens the file alone
    (test_logs.test_usr1ReopensTheLogFile).  It said systemctl reload, which
    runs the unit's ExecReload= config --check first: a configuration file
    being edited, or a renewed certificate not in place yet, failed the
    check, no signal was sent, and the server went on writing to the
    rotated file, lost once compressed; a half-done edit passing the check
    was applied by the night's rotation.
    """
    [rule] = [block for block in codeBlocks(section("Logs")) if "postrotate" in block]
    commands = rule.split("postrotate", 1)[1].split("endscript", 1)[0].split()
    assert commands == ["systemctl", "kill", "--signal=USR1", "--kill-whom=main", "mailgate.service"], rule


def test_logrotateReadsTheRule(tmp_path):
    """
    The rule of Logs, as logrotate reads it (debug mode: nothing is
    rotated, no command run), its log in the test's directory: every line
    a directive logrotate knows (it reports an unknown one, still exiting
    0, and ignores it), the log file rotated daily and 14 kept.
    """
    [rule] = [block for block in codeBlocks(section("Logs")) if "postrotate" in block]
    log = tmp_path / "mailgate.log"
    log.write_text("")
    (tmp_path / "rule").write_text(rule.replace("/var/log/mailgate/mailgate.log", str(log)))
    if shutil.which("logrotate") is None:
        pytest.skip("logrotate is not installed (tests/sysdeps.sh installs it)")
    done = subprocess.run(
        ["logrotate", "-d", "-s", str(tmp_path / "state"), str(tmp_path / "rule")],
        capture_output=True, text=True, timeout=DEADLINE,
    )
    said = done.stdout + done.stderr
    assert done.returncode == 0 and "error" not in said.lower(), said
    assert f"rotating pattern: {log}  after 1 days (14 rotations)" in said, said


def test_theMetricTableIsWhatAServerExports():
    """
    Every metric of the table is exported, with the type the table gives
    it, and every mailgate metric exported is in the table.
    """
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    rows = tableRows(section("Metrics and health"), "| metric | type | labels |")
    documented = {cells[0].strip("`"): cells[1] for cells in rows}
    exposition = generate_latest(Metrics().registry).decode()
    exported = {
        family.name: family.type
        for family in text_string_to_metric_families(exposition)
        # (the client library's creation times of its own counters and
        # histograms are no metrics of mailgate's)
        if family.name.startswith("mailgate_") and not family.name.endswith("_created")
    }
    # The parser names a counter's family without its _total.
    exported = {(name + "_total" if kind == "counter" else name): kind for name, kind in exported.items()}
    assert documented == exported


def test_thePrometheusExamplesAreValid(tmp_path):
    """
    The scrape configuration and the alert rules pass promtool, and the
    alerts name only metrics of the table.
    """
    scrape, rules = codeBlocks(section("Metrics and health"), "yaml")
    (tmp_path / "rules.yml").write_text(rules)
    (tmp_path / "prometheus.yml").write_text("rule_files: [rules.yml]\n" + scrape)
    checked(["promtool", "check", "config", str(tmp_path / "prometheus.yml")], "the scrape configuration")
    documented = {cells[0].strip("`") for cells in tableRows(section("Metrics and health"), "| metric | type | labels |")}
    for name in re.findall(r"\b(mailgate_[a-z_]+)", rules):
        assert re.sub(r"_bucket$", "", name) in documented, name


def loggedEventNames():
    """
    The stable event names (C{event} of the JSON log) the code under
    mailgate/ logs, read from its syntax tree: an C{event="..."} keyword,
    the first argument of a session's C{logInfo}, C{logWarning},
    C{logError} and C{logFailure} (C{f"{self.protocolName}.x"} as
    C{smtp.x}, found in the README as C{smtp.x} or C{lmtp.x}), the event
    given to the SMTP/LMTP refusal logger, and an event dictionary's
    C{"event"} key.  (A name passed through a variable is not found.)
    """
    import ast

    def name(node, protocol="smtp"):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return node.value
        if isinstance(node, ast.JoinedStr) and len(node.values) == 2:
            first, rest = node.values
            if (
                isinstance(first, ast.FormattedValue) and ast.unparse(first.value) == "self.protocolName"
                and isinstance(rest, ast.Constant)
            ):
                return protocol + rest.value
        return None

    names = {}
    for path in sorted((REPO / "mailgate").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            found = []
            if isinstance(node, ast.Call):
                found += [keyword.value for keyword in node.keywords if keyword.arg == "event"]
                function = ast.unparse(node.func).rsplit(".", 1)[-1]
                if function in ("logInfo", "logWarning", "logError", "logFailure") and node.args:
                    found.append(node.args[0])
                if function == "_logRefusedMessage" and len(node.args) > 1:
                    event = name(node.args[1])
                    if event is not None:
                        names.setdefault(f"smtp.{event}", path.name)
            elif isinstance(node, ast.Dict):
                found += [value for key, value in zip(node.keys, node.values) if name(key) == "event"]
            for value in found:
                event = name(value)
                if event is not None:
                    names.setdefault(event, path.name)
    return names


def test_everyLineTheCodeLogsHasAnEventName():
    """
    Every call of a logger under mailgate/ (C{log.info}, C{warn}, C{error},
    C{failure}, ...) gives its event a stable name, which the test below
    finds in the README: a line without one had the logging class's name
    as its JSON C{event}, and an administrator filtering or alerting on
    warnings and errors had no name to use (C{lock.lost},
    C{retention.failed} and C{database.connection_lost} were among them).
    A call passing its fields whole (C{**fields}) is left to its callers.
    """
    import ast

    unnamed = []
    for path in sorted((REPO / "mailgate").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            if node.func.attr not in ("debug", "info", "warn", "error", "critical", "failure"):
                continue
            if not re.search(r"(^|\.|_)log$", ast.unparse(node.func.value)):
                continue
            if not any(keyword.arg in ("event", None) for keyword in node.keywords):
                unnamed.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not unnamed, unnamed


def test_everyLoggedEventIsInTheReadme():
    """
    Every event name the code logs is in the README (in backquotes),
    where an administrator looking up a line of the log, or writing a
    filter on its JSON, finds what it means; the refusals have their
    table, the rest theirs.
    """
    names = loggedEventNames()
    # The reading of the code itself: events of every kind are found.
    assert {"pop3.login", "smtp.disconnect", "smtp.rejected", "log.lines_lost", "session.trace"} <= set(names)
    missing = sorted(
        f"{event} ({where})" for event, where in names.items()
        if f"`{event}`" not in README and not (event.startswith("smtp.") and f"`lmtp.{event[5:]}`" in README)
    )
    assert not missing, missing


# -- Receiving mail: Postfix -----------------------------------------------------------


def postfixDirectory(tmp_path, mainLines, masterLines=""):
    """
    A scratch Postfix configuration directory: Debian's master.cf and a
    main.cf of C{mainLines}, with C{masterLines} appended to master.cf.
    """
    directory = tmp_path / "postfix"
    directory.mkdir()
    master = Path("/etc/postfix/master.cf")
    if not master.exists():
        pytest.skip("Postfix is not installed (tests/sysdeps.sh installs it)")
    (directory / "master.cf").write_text(master.read_text() + masterLines)
    (directory / "main.cf").write_text("compatibility_level = 3.6\n" + mainLines)
    return directory


def test_thePostfixLMTPSnippetIsValid(tmp_path):
    [main] = [b for b in codeBlocks(section("Receiving mail: SMTP and LMTP")) if "/etc/postfix/main.cf" in b]
    directory = postfixDirectory(tmp_path, main)
    settings = checked(["postconf", "-n", "-c", str(directory)], "main.cf")
    assert "virtual_transport = lmtp:inet:127.0.0.1:2424" in settings
    assert "reject_unverified_recipient" in settings
    assert "warning" not in settings


def test_thePostfixPipeTransportDelivers(tmp_path):
    """
    The pipe transport of master.cf, as postconf reads it, with its
    command run as Postfix's pipe runs it (the paths those of this
    checkout): mail from a sender is delivered with its Return-Path:, and
    so is a bounce, whose sender the pipe gives as MAILER-DAEMON
    (null_sender's default), not refused as a bad sender, which would
    bounce every bounce for a local user in turn.
    """
    [block] = [b for b in codeBlocks(section("Administration: `mailgate`")) if "/etc/postfix/master.cf" in b]
    master, main = block.split("# /etc/postfix/main.cf\n")
    directory = postfixDirectory(tmp_path, main, master)
    assert "mailgate_destination_recipient_limit = 1" in checked(["postconf", "-n", "-c", str(directory)], "main.cf")
    service = checked(["postconf", "-M", "-c", str(directory), "mailgate/unix"], "master.cf")
    assert " pipe " in service and "user=mailgate " in service and "flags=" not in service
    argv = shlex.split(service.split("argv=", 1)[1])
    assert argv[:3] == ["/opt/mailgate/bin/mailgate", "--config", "/etc/mailgate/mailgate.toml"], argv

    database = f"sqlite:///{tmp_path / 'mail.sqlite3'}"
    config = tmp_path / "mailgate.toml"
    config.write_text(f'database = "{database}"\n')
    assert command("--config", str(config), "user", "add", "alice@example.org", "--password-stdin", stdin=b"pw\n")[0] == 0
    for n, sender in enumerate(("bob@example.net", "MAILER-DAEMON"), start=1):
        expanded = [
            {"${sender}": sender, "${recipient}": "alice@example.org"}.get(word, word) for word in argv[3:]
        ]
        message = f"Subject: piped\n\nmessage {n}\n".encode()
        code, out, err = command("--config", str(config), *expanded, stdin=message)
        assert (code, err) == (0, ""), (sender, out)
        code, message, err = command("--config", str(config), "mailbox", "show", "alice@example.org", str(n))
        returnPath = "<>" if sender == "MAILER-DAEMON" else f"<{sender}>"
        assert message.startswith(
            f"Return-Path: {returnPath}\r\nDelivered-To: alice@example.org\r\nReceived: "
        ), message


# -- Scaling out: HAProxy ----------------------------------------------------------------


def nodesCommand():
    """
    The server's configuration from the nodes' command of Scaling out.
    """
    [commandLine] = [b for b in codeBlocks(section("Scaling out"), "sh") if "haproxy:" in b]
    argv = shlex.split(commandLine.replace("\\\n", " "))
    assert argv[:2] == ["twistd", "mailgate"]
    options = Options()
    options.parseOptions(argv[2:])
    return options.toConfig()


def test_theHAProxyConfigurationIsValid(tmp_path):
    """
    The balancer's configuration, as haproxy reads it: its servers are
    the nodes' C{haproxy:} listeners (a port of its own, 1110, had every
    check fail against nodes listening on 110), each sent the PROXY
    header and checked; its timeouts outlast mailgate's idle timeouts
    (Debian's 50 s, or a minute, closed a POP3 client silent for a
    minute, unanswered, where mailgate gives it ten); and a connection a
    stopping node refuses is tried on another (C{option redispatch}:
    without it, 14 of 1364 logins through a real HAProxy failed during
    a node's restart, 2 of 1460 with it).
    """
    from mailgate.smtp.protocol import SMTPServer

    [block] = [b for b in codeBlocks(section("Scaling out")) if "send-proxy-v2" in b]
    configuration = tmp_path / "haproxy.cfg"
    configuration.write_text(block)
    checked(["haproxy", "-c", "-f", str(configuration)], "the HAProxy configuration")

    config = nodesCommand()
    listening = {
        backend: {int(re.match(r"haproxy:tcp:(\d+)", d).group(1)) for d in descriptions}
        for backend, descriptions in (("mailgate_pop3", config.pop3), ("mailgate_smtp", config.smtp))
    }
    backends = dict(re.findall(r"^backend (\S+)\n((?:    .*\n)+)", block, re.MULTILINE))
    assert set(backends) == set(listening)
    # Each backend is checked on the nodes' metrics listener, for its own
    # protocol: /healthz would take every node out of the POP3 backend
    # while the shared database takes no writes, though POP3 still works.
    metricsPort = re.fullmatch(r"tcp:(\d+)(:.*)?", config.metrics).group(1)
    for backend, body in backends.items():
        protocol = backend.removeprefix("mailgate_")
        assert re.findall(r"^    option httpchk (.*)$", body, re.MULTILINE) == [f"GET /healthz/{protocol}"], body
        servers = re.findall(r"^    server \S+ [\d.]+:(\d+) (.*)$", body, re.MULTILINE)
        assert len(servers) == 3, body
        for port, options in servers:
            assert int(port) in listening[backend], body
            assert options.split() == ["send-proxy-v2", "check", "port", metricsPort], body

    def seconds(name):
        [value] = re.findall(rf"^    timeout {name} (\d+)m$", block, re.MULTILINE)
        return int(value) * 60

    longest = max(config.idleTimeout, SMTPServer.idleTimeout)
    assert seconds("client") > longest and seconds("server") > longest
    assert re.search(r"^    option redispatch$", block, re.MULTILINE)

    # The rolling restart drains and readies servers of this configuration.
    named = {
        (backend, server)
        for backend, body in backends.items()
        for server in re.findall(r"^    server (\S+) ", body, re.MULTILINE)
    }
    commands = re.findall(r"set server (\S+)/(\S+) state (\w+)", section("Scaling out"))
    assert commands and {(b, s) for b, s, _ in commands} <= named, commands
    assert {state for _, _, state in commands} == {"drain", "ready"}


def test_theScalingOutCommandNamesItsBalancerAndChecksTheDatabase():
    """
    The nodes' command has haproxy: listeners behind a balancer on
    another machine: without --proxy-network they would close every
    connection it sends (only loopback is a balancer by default).  Its
    database, on another machine, is reached over TLS whose certificate
    is checked: libpq's default (prefer) takes the clear or any
    certificate, and the messages and password hashes cross the network.
    The server's configuration lets that role in, over TLS alone, on an
    address other than localhost (Debian's default, where every node was
    refused).
    """
    import ipaddress

    from psycopg.conninfo import conninfo_to_dict

    config = nodesCommand()
    assert config.pop3 == ["haproxy:tcp:110"] and config.proxyNetworks != ["127.0.0.0/8", "::1/128"]
    # Each node is named by its machine's FQDN in mailgate nodes and who:
    # a hostname shared by every node left their process ids alone.
    assert config.hostname is None
    parameters = conninfo_to_dict(config.database)
    assert parameters["sslmode"] == "verify-full" and parameters["sslrootcert"].startswith("/etc/mailgate/")
    # The server lets that role into that database, over TLS alone, from
    # the nodes' network, listening on more than localhost.
    [server] = [b for b in codeBlocks(section("Scaling out")) if "pg_hba.conf" in b]
    [rule] = re.findall(r"^host\S* .*$", server, re.MULTILINE)
    kind, database, role, network, method = rule.split()
    assert (kind, database, role, method) == ("hostssl", parameters["dbname"], parameters["user"], "scram-sha-256")
    nodes = ("10.0.0.5", "10.0.0.6", "10.0.0.7")
    assert all(ipaddress.ip_address(node) in ipaddress.ip_network(network) for node in nodes)
    [listen] = re.findall(r"^listen_addresses = '(.*)'$", server, re.MULTILINE)
    assert listen != "localhost" and re.search(r"^ssl = on$", server, re.MULTILINE)


def test_thePostfixTransportListsEveryNodesLMTP(tmp_path):
    """
    The MTA's transport names every node's LMTP listener, as postconf
    reads it (Postfix 3.5's list of next hops), on the port the nodes'
    command gives LMTP.
    """
    [main] = [b for b in codeBlocks(section("Scaling out")) if "/etc/postfix/main.cf" in b]
    directory = postfixDirectory(tmp_path, main)
    settings = checked(["postconf", "-n", "-c", str(directory)], "main.cf")
    assert "warning" not in settings
    [transport] = re.findall(r"^virtual_transport = (.*)$", settings, re.MULTILINE)
    assert transport.startswith("lmtp:inet:")
    hops = [hop.strip() for hop in transport.removeprefix("lmtp:inet:").split(",")]
    [lmtp] = nodesCommand().lmtp
    port = re.fullmatch(r"tcp:(\d+)", lmtp).group(1)
    assert len(hops) == 3 and all(re.fullmatch(rf"\[10\.0\.0\.\d+\]:{port}", hop) for hop in hops), hops


# -- Running the server: the default host name ---------------------------------------------


def test_theDefaultHostNameIsTheMachinesFQDN(tmp_path):
    """
    C{--hostname}'s default, "the machine's FQDN", is what C{hostname -f}
    says (as Postfix's myhostname and Dovecot's hostname take it), in the
    SMTP greeting, the APOP timestamp and the C{Received:} field of
    C{mailgate deliver}: not C{localhost} where /etc/hosts lists
    localhost first for the machine's address, as containers write it.
    """
    from mailgate.testing import POP3Session, SMTPSession, memoryStore

    if shutil.which("hostname") is None:
        pytest.skip("no hostname command")
    done = subprocess.run(["hostname", "-f"], capture_output=True, text=True, timeout=DEADLINE)
    if done.returncode != 0 or not done.stdout.strip():
        pytest.skip(f"hostname -f does not know this machine's name: {done.stderr.strip()}")
    fqdn = done.stdout.strip()

    assert SMTPSession(memoryStore(), hostname=None).greeting.startswith(f"220 {fqdn} ESMTP ")
    assert POP3Session(memoryStore(), hostname=None, apop=True).greeting.rstrip().endswith(f"@{fqdn}>")
    database = f"sqlite:///{tmp_path / 'mail.sqlite3'}"
    assert command("--database", database, "user", "add", "alice@example.org", "--password-stdin", stdin=b"pw\n")[0] == 0
    code, out, err = command(
        "--database", database, "deliver", "-f", "bob@example.net", "alice@example.org", stdin=b"Subject: x\n\nhi\n"
    )
    assert (code, err) == (0, ""), out
    code, message, err = command("--database", database, "mailbox", "show", "alice@example.org", "1")
    assert f"Received: by {fqdn} (mailgate) " in message, message


# -- Scaling out: Citus ------------------------------------------------------------------


def test_theCitusStatementsDistributeEveryTableThatGrowsWithMail():
    """
    The statements distribute every table the schema keys by its owner
    (tests/test_schema.py checks the keys in the catalog), by that key,
    colocated with the mailboxes: a table left out would be one Citus
    cannot join with the others on one shard.
    """
    from test_schema import GROWING

    [statements] = [b for b in codeBlocks(section("Scaling out"), "sql") if "create_distributed_table" in b]
    distributed = dict(re.findall(r"create_distributed_table\('(\w+)', '(\w+)'", statements))
    assert distributed == GROWING
    for table in set(GROWING) - {"mailboxes"}:
        assert f"create_distributed_table('{table}', '{GROWING[table]}', colocate_with => 'mailboxes')" in statements
    assert set(re.findall(r"create_reference_table\('(\w+)'\)", statements)) == {"users", "mailgate_nodes"}


# -- Receiving mail: Postfix asking mailgate at its own RCPT ---------------------------------


@sqliteOnly
def test_postfixAsksMailgateAtItsOwnRCPT(mailgate_server, mailgate_cli, postfixRoot):
    """
    The README's main.cf, on a private Postfix delivering to mailgate by
    LMTP: a client from outside mynetworks is refused an unknown
    recipient at Postfix's own RCPT (Postfix's probe asked mailgate,
    which refused it 550 5.1.1), and a user's address is accepted.
    """
    [main] = [b for b in codeBlocks(section("Receiving mail: SMTP and LMTP")) if "/etc/postfix/main.cf" in b]
    server = mailgate_server("--lmtp", "tcp:0:interface=127.0.0.1", "--no-apop")
    mailgate_cli.addUser("alice@example.org", "alice's secret")
    postfix = PrivatePostfix(postfixRoot, server.portOf("LMTP"))
    snippet = main.replace("lmtp:inet:127.0.0.1:2424", f"lmtp:inet:127.0.0.1:{server.portOf('LMTP')}")
    # The client (on loopback) is not one of mynetworks here, as a remote
    # MTA would not be; the probes need Postfix's verify service.
    postfix.mainCF = re.sub(
        r"mynetworks = .*\n|smtpd_recipient_restrictions = .*\n|virtual_mailbox_domains = .*\n|virtual_transport = .*\n",
        "", MAIN_CF,
    ) + "mynetworks = 192.0.2.0/24\n" + snippet
    postfix.masterCF = MASTER_CF + "verify     unix  - - n -  1 verify\n"

    def rcpt(address):
        """
        Postfix's answer to RCPT TO:<address>, once its probe has had
        mailgate's answer (it says "in progress" until then).
        """

        def answered():
            with smtplib.SMTP("127.0.0.1", postfix.smtpPort, timeout=DEADLINE) as smtp:
                smtp.ehlo("client.test")
                assert smtp.mail("bob@remote.test")[0] == 250
                code, text = smtp.rcpt(address)
            return None if b"in progress" in text else (code, text)

        return waitFor(answered, f"Postfix to verify {address} with mailgate")

    try:
        postfix.start()
        code, text = rcpt("nobody@example.org")
        assert code == 550 and b"5.1.1" in text and b"550 5.1.1" in text, (code, text, postfix.maillog())
        assert rcpt("alice@example.org")[0] == 250, postfix.maillog()
    finally:
        postfix.stop()


@sqliteOnly
def test_postfixDeliversThroughTheUnixSocketInItsQueueDirectory(postfixRoot, mailgate_server, mailgate_cli):
    """
    The README's Unix-socket pairing as it is written: the directory of
    mailgate's in Postfix's queue directory made by its C{install -d}
    (group postfix, mode 750; owned here by the test's user, root, for
    the README's user mailgate), mailgate's socket in it with C{mode=666},
    and main.cf's C{virtual_transport = lmtp:unix:mailgate/lmtp}, read by
    Postfix's LMTP client chrooted in the queue directory as Debian's
    master.cf runs it: a message sent to Postfix reaches the maildrop.
    (postfixRoot first: its directory, which holds the socket, is removed
    after the server stopped.)
    """
    import getpass

    [block] = [b for b in codeBlocks(section("Receiving mail: SMTP and LMTP"), "sh") if "lmtp:unix:" in b]
    queue = postfixRoot / "queue"
    here = block.replace("/var/spool/postfix", str(queue))
    [transport] = re.findall(r"main\.cf: (virtual_transport = lmtp:unix:\S+)", block)
    [install] = [line for line in here.splitlines() if line.startswith("install ")]
    [endpoint] = re.findall(r"--lmtp (unix:\S+)", here)

    postfix = PrivatePostfix(postfixRoot, None)
    postfix.mainCF = MAIN_CF.replace("virtual_transport = lmtp:inet:127.0.0.1:{lmtpPort}", transport)
    assert transport in postfix.mainCF
    postfix.masterCF = MASTER_CF.replace("lmtp       unix  - - n -  - lmtp", "lmtp       unix  - - y -  - lmtp")
    assert " - - y -  - lmtp" in postfix.masterCF
    try:
        postfix.start()
        argv = shlex.split(install.replace("-o mailgate", f"-o {getpass.getuser()}"))
        subprocess.run(argv, check=True, timeout=DEADLINE)
        mailgate_server("--lmtp", endpoint, "--domain", "example.org", "--no-apop")
        mailgate_cli.addUser("alice@example.org", "alice's secret")
        with smtplib.SMTP("127.0.0.1", postfix.smtpPort, timeout=DEADLINE) as smtp:
            assert smtp.sendmail("bob@remote.test", ["alice@example.org"], b"Subject: unix\r\n\r\nhello\r\n") == {}
        waitFor(lambda: "status=sent" in postfix.maillog(), "Postfix to deliver through the Unix socket")
    finally:
        postfix.stop()
    listed = mailgate_cli.check("mailbox", "list", "alice@example.org", "--json")
    assert len(listed.splitlines()) == 1, (listed, postfix.maillog())
