"""
The cpu-affinity setting: the reactor thread and the database threads on
the CPUs an administrator names, password hashing free of them.
"""

import os
import pathlib
import threading

import pytest
from twisted.python import usage

from e2e import popLogin, sqliteOnly, waitFor
from e2e import mailgate_cli, mailgate_server  # noqa: F401 (fixtures)
from mailgate import tap
from mailgate.affinity import DATABASE_THREADS, AffinityService, CPUAffinity, formatCPUs, parseCPUs
from mailgate.config import MailgateConfig
from mailgate.errors import ConfigurationError
from mailgate.service import makeService
from mailgate.testing import memoryStore

EVERYWHERE = frozenset(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else frozenset()

needsTwoCPUs = pytest.mark.skipif(
    len(EVERYWHERE) < 2, reason="pinning is only visible with at least two CPUs to choose from"
)

#: The CPU the tests pin to: the last this process may use.
PINNED = max(EVERYWHERE) if EVERYWHERE else 0


def affinityOf(tid):
    return frozenset(os.sched_getaffinity(tid))


def inThread(function, name="helper"):
    """
    Run C{function} on a new thread; return what it returned.
    """
    result = []
    thread = threading.Thread(target=lambda: result.append(function()), name=name)
    thread.start()
    thread.join(10)
    assert not thread.is_alive()
    return result[0]


# -- CPU lists ------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, cpus",
    [("2", {2}), ("0-3", {0, 1, 2, 3}), ("0,2,4-5", {0, 2, 4, 5}), (" 1 , 3 ", {1, 3}), ("3-3", {3})],
)
def test_cpuListsAsLinuxWritesThem(text, cpus):
    assert parseCPUs(text) == cpus


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "not a CPU list"),
        ("two", "not a CPU list"),
        ("-1", "not a CPU list"),
        ("1-", "not a CPU list"),
        ("1,,2", "not a CPU list"),
        ("3-1", "runs backwards"),
        ("0-100000", "too large"),
    ],
)
def test_badCPUListsAreRefusedWithAReason(text, message):
    with pytest.raises(ValueError, match=message):
        parseCPUs(text)


def test_cpuListsAreWrittenBackWithRanges():
    assert formatCPUs({0, 1, 2, 5, 7, 8}) == "0-2,5,7-8"
    assert formatCPUs({4}) == "4"
    assert parseCPUs(formatCPUs({0, 1, 2, 5})) == {0, 1, 2, 5}


def test_onlyCPUsTheProcessMayUse():
    with pytest.raises(ValueError, match=r"CPU 9-10 is not one this process may run on \(it may use 0-1\)"):
        CPUAffinity({1, 9, 10}, everywhere={0, 1})
    with pytest.raises(ValueError, match="not one this process may run on"):
        CPUAffinity(set(), everywhere={0, 1})


# -- the setting ------------------------------------------------------------------


def test_settingFromTheCommandLineAndTheFile(tmp_path):
    options = tap.Options()
    options.parseOptions(["--cpu-affinity", "1,0"])
    assert options.toConfig().cpuAffinity == "0-1"
    path = tmp_path / "mailgate.toml"
    path.write_text("cpu-affinity = 3\n")
    options = tap.Options()
    options.parseOptions(["--config", str(path)])
    assert options.toConfig().cpuAffinity == "3"
    assert MailgateConfig().cpuAffinity is None


def test_badSettingIsAnError(tmp_path):
    options = tap.Options()
    with pytest.raises(usage.UsageError, match="not a CPU list"):
        options.parseOptions(["--cpu-affinity", "first"])
    path = tmp_path / "mailgate.toml"
    path.write_text("cpu-affinity = true\n")
    options = tap.Options()
    with pytest.raises(SystemExit, match="key 'cpu-affinity': expected a CPU list"):
        options.parseOptions(["--config", str(path)])


def test_aCPUTheProcessMayNotUseStopsStartUp():
    config = MailgateConfig(pop3=[], cpuAffinity="4095")
    with pytest.raises(ConfigurationError, match="cpu-affinity: CPU 4095 is not one this process may run on"):
        makeService(config, store=memoryStore())


def test_unsetMeansNoAffinityService():
    root = makeService(MailgateConfig(pop3=[]), store=memoryStore())
    assert not [s for s in root if isinstance(s, AffinityService)]
    pinned = makeService(MailgateConfig(pop3=[], cpuAffinity=str(PINNED)), store=memoryStore())
    services = list(pinned)
    # First, so that what starts after it starts pinned.
    assert isinstance(services[0], AffinityService)
    assert services[0].affinity.cpus == {PINNED}


# -- pinning and freeing ----------------------------------------------------------


@needsTwoCPUs
def test_pinIsForTheCallingThreadOnly():
    affinity = CPUAffinity({PINNED})
    assert inThread(lambda: (affinity.pin(), affinityOf(0))[1]) == {PINNED}
    assert affinityOf(0) == EVERYWHERE


@needsTwoCPUs
def test_unpinnedWorkRunsAnywhere():
    """
    Work wrapped by C{unpinned} (password hashing) frees the thread it
    runs on, though that thread was started pinned.
    """
    affinity = CPUAffinity({PINNED})
    hashing = affinity.unpinned(lambda: affinityOf(0))

    def pinnedThread():
        affinity.pin()
        before = affinityOf(0)
        return before, hashing(), hashing()

    before, first, again = inThread(pinnedThread)
    assert before == {PINNED}
    assert first == again == EVERYWHERE


@needsTwoCPUs
def test_serviceStartPinsTheReactorAndDatabaseThreads():
    """
    Started on the reactor thread (here, the test's), the service pins it
    and the running database threads, and threads started afterwards are
    born pinned; other threads are left alone, and stopping frees the
    reactor thread.
    """
    release = threading.Event()
    seen = {}

    def waiting(name):
        def run():
            release.wait(10)
            seen[name] = affinityOf(0)

        thread = threading.Thread(target=run, name=name)
        thread.start()
        return thread

    database = waiting(DATABASE_THREADS + "sqlite-reader-0")
    other = waiting("someone-else")
    service = AffinityService(CPUAffinity({PINNED}))
    service.startService()
    try:
        assert affinityOf(0) == {PINNED}
        assert inThread(lambda: affinityOf(0), name="started-later") == {PINNED}
    finally:
        service.stopService()
        release.set()
        database.join(10)
        other.join(10)
    assert affinityOf(0) == EVERYWHERE
    assert seen == {DATABASE_THREADS + "sqlite-reader-0": {PINNED}, "someone-else": EVERYWHERE}


# -- twistd mailgate --cpu-affinity ------------------------------------------------


def threadAffinities(pid):
    """
    The CPUs each thread of process C{pid} may run on, from /proc.
    """
    found = {}
    for task in pathlib.Path(f"/proc/{pid}/task").iterdir():
        try:
            status = (task / "status").read_text()
        except FileNotFoundError:
            continue
        for line in status.splitlines():
            if line.startswith("Cpus_allowed_list:"):
                found[int(task.name)] = parseCPUs(line.split(":", 1)[1])
    return found


@needsTwoCPUs
@sqliteOnly
def test_twistdPinsReactorAndDatabaseThreadsButNotHashing(mailgate_server, mailgate_cli):
    """
    With C{--cpu-affinity}, the server's main (reactor) thread and its
    three SQLite threads (the writer, two readers) run on the CPU given;
    the thread that hashes a cold login's password may run on any.
    """
    mailgate_cli.addUser("alice@example.org", "alice-secret")
    server = mailgate_server("--cpu-affinity", str(PINNED), "--auth-cache-size", "0")
    pid = server.process.pid
    # Logged once the services start, after the listeners are bound.
    waitFor(lambda: f"reactor thread and database threads on CPU {PINNED}" in server.stdout, "the log line")
    client = popLogin(server, "alice@example.org", "alice-secret")
    try:
        assert client.stat() == (0, 0)
    finally:
        client.quit()

    def hashingThreadSeen():
        return any(cpus == EVERYWHERE for cpus in threadAffinities(pid).values())

    waitFor(hashingThreadSeen, "a thread free to run on every CPU (the password hash's)")
    threads = threadAffinities(pid)
    assert threads[pid] == {PINNED}
    pinned = [tid for tid, cpus in threads.items() if cpus == {PINNED}]
    # The reactor thread and the writer and two readers, at least.
    assert len(pinned) >= 4, threads
