"""
Where mailgate's time goes: py-spy (a sampling profiler, installed into
.venv by C{make bench}) records the server process while a load runs, and
L{summarise} turns its raw output into the top entries by own time.

    py-spy record --pid PID --format raw --function --rate 200 --duration S --output F

C{--format raw} writes one line per distinct stack, "frame;frame;...;frame
COUNT", outermost frame first, each frame "function (file:line)"; with
C{--function} the line is the function's first line, so a function's
samples are not split by line.  Own time is the samples in which a
function is the innermost Python frame (so it includes the C code it
calls: a C{sqlite3} C{execute}, a socket C{send}, C{bytes.replace});
inclusive time those in which it appears anywhere in the stack (once per
stack).

Two modes (L{MODES}):
  - C{"gil"} (C{--gil}): only samples of the thread holding the GIL, the
    Python interpreter's own work, the part that per-byte and per-command
    Python code costs;
  - C{"all"}: every sample py-spy counts as active, which adds the C code
    that runs with the GIL released (SQLite statements on the worker
    threads, socket system calls) -- but py-spy's idle detection misses
    some waits here, which show as own time of the function that blocks:
    C{EPollReactor.doPoll} (C{epoll_wait}) and the worker threads' loop
    waiting for a job.

    python benchmarks/pyspy.py RAWFILE [--top 25]   # summarise a recorded file
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
from collections import Counter

_FRAME = re.compile(r"^(?P<function>.*?) \((?P<where>[^()]*?)(?::(?P<line>\d+))?\)$")


def find(bindir=None):
    """
    The py-spy executable (next to this Python, or on PATH), or C{None}.
    """
    for directory in filter(None, (bindir, os.path.dirname(sys.executable))):
        path = os.path.join(directory, "py-spy")
        if os.access(path, os.X_OK):
            return path
    return shutil.which("py-spy")


def version(executable):
    try:
        return subprocess.run([executable, "--version"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


MODES = ("gil", "all")

MODE_TITLES = {
    "gil": "samples holding the GIL (py-spy --gil): Python work",
    "all": (
        "every sample py-spy counts active: also C code with the GIL released (SQLite, socket calls); "
        "some waits show as own time of the blocking function (EPollReactor.doPoll: epoll_wait; "
        "the database worker loop: waiting for a job)"
    ),
}


def command(executable, pid, output, seconds, rate=200, mode="gil"):
    """
    The C{py-spy record} command line (see the module docstring).  As root
    py-spy may pause the process for each sample (exact stacks);
    otherwise C{--nonblocking}.
    """
    if mode not in MODES:
        raise ValueError(f"unknown py-spy mode {mode!r}")
    argv = [
        executable, "record", "--pid", str(pid), "--format", "raw", "--function", "--rate", str(rate),
        "--duration", str(max(1, round(seconds))), "--output", output,
    ]
    if mode == "gil":
        argv.append("--gil")
    if os.geteuid() != 0:
        argv.append("--nonblocking")
    return argv


def record(executable, pid, output, seconds, rate=200, mode="gil"):
    """
    Start C{py-spy record} on C{pid} for C{seconds}; return the
    C{subprocess.Popen} (wait for it with a timeout).
    """
    argv = command(executable, pid, output, seconds, rate, mode)
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def parseFrame(frame):
    """
    C{(function, "file:line")} of one py-spy frame; C{(frame, "")} for
    anything else (a thread or process label).
    """
    match = _FRAME.match(frame.strip())
    if match is None:
        return frame.strip(), ""
    where = match.group("where")
    if match.group("line"):
        where += ":" + match.group("line")
    return match.group("function"), where


def parseRaw(text):
    """
    C{[(stack as a list of frames, count), ...]} from py-spy's raw output.
    """
    stacks = []
    for line in text.splitlines():
        line = line.rstrip()
        if not line:
            continue
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        stacks.append((stack.split(";"), int(count)))
    return stacks


def summarise(text, top=25):
    """
    From py-spy raw output: C{{"samples": N, "entries": [...],
    "files": [...]}}, the entries being the C{top} frames by own samples,
    each C{{"function", "where", "own", "ownShare", "inclusive",
    "inclusiveShare"}}, and C{files} the source files by own samples.
    """
    stacks = parseRaw(text)
    total = sum(count for _, count in stacks)
    own = Counter()
    inclusive = Counter()
    files = Counter()
    for frames, count in stacks:
        keys = [parseFrame(f) for f in frames]
        own[keys[-1]] += count
        files[keys[-1][1].rsplit(":", 1)[0]] += count
        for key in set(keys):
            inclusive[key] += count
    share = lambda n: n / total if total else 0.0  # noqa: E731
    entries = [
        {"function": function, "where": where, "own": n, "ownShare": share(n),
         "inclusive": inclusive[(function, where)], "inclusiveShare": share(inclusive[(function, where)])}
        for (function, where), n in sorted(own.items(), key=lambda item: (-item[1], item[0]))[:top]
    ]
    return {
        "samples": total,
        "entries": entries,
        "files": [{"file": f, "own": n, "ownShare": share(n)} for f, n in files.most_common(15)],
    }


def formatSummary(summary, title=""):
    """
    The summary as text: a title line, the top entries (own %, inclusive
    %, function, file:line), then own time by file.
    """
    lines = []
    if title:
        lines.append(title)
    lines.append(f"{summary['samples']} samples")
    lines.append("")
    lines.append(f"top {len(summary['entries'])} by own time:")
    lines.append(f"{'own %':>7} {'incl %':>7}  function  (file:line)")
    for e in summary["entries"]:
        lines.append(f"{e['ownShare']:7.1%} {e['inclusiveShare']:7.1%}  {e['function']}  ({e['where']})")
    if summary["files"]:
        lines.append("")
        lines.append("own time by file:")
        for f in summary["files"]:
            lines.append(f"{f['ownShare']:7.1%}  {f['file']}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Summarise a py-spy raw (collapsed stacks) file.")
    parser.add_argument("raw")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    with open(args.raw, errors="replace") as f:
        print(formatSummary(summarise(f.read(), args.top), title=args.raw))
    return 0


if __name__ == "__main__":
    sys.exit(main())
