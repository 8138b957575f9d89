# -*- test-case-name: tests.test_affinity -*-
"""
Keeping the reactor thread and the database threads on the same CPUs
(the C{cpu-affinity} setting).

At every command that reads the store, the reactor thread hands a job to
a database thread and goes back to waiting; the database thread does
some tens of microseconds of work and wakes the reactor with the answer.
When the two wake each other across CPUs, each wake-up is an
inter-processor interrupt and, on a virtual machine, an idle virtual CPU
that the hypervisor has to bring back: on the 2-core VM the benchmarks
run on, a bare hand-over there and back costs about 80 µs of CPU across
two CPUs and 16 µs on one.  mailgate's Python runs in one thread at a time
anyway, so pinning these threads to one CPU costs little parallelism
and saves those wake-ups (see C{benchmarks/RESULTS.md}).

What is pinned: the reactor thread, the threads named C{mailgate-db-*}
running when the service starts, and every thread the reactor thread
starts afterwards (Linux gives a new thread its creator's affinity),
which is how the database threads of C{twistd mailgate} get it.  What is
not: password hashing.  A cold login's scrypt hash is 0.1 s of CPU on
the reactor's thread pool, which must stay free to run on the other CPUs
instead of queueing behind the reactor; L{CPUAffinity.unpinned} wraps
the work given to that pool.

Off by default: several mailgate processes on one machine (PostgreSQL
nodes) would each need their own CPU, which only the administrator
knows, and an application embedding mailgate may place its threads
itself.  Linux only (C{os.sched_setaffinity}).
"""

import os
import threading

from twisted.application.service import Service
from twisted.logger import Logger

#: The names of the store's worker threads start so
#: (L{mailgate.store.database.WorkerThreads}).
DATABASE_THREADS = "mailgate-db-"


def parseCPUs(text):
    """
    A CPU list as Linux writes them (C{taskset -c}, C{cpuset(7)}): numbers
    and ranges separated by commas, C{"2"}, C{"0-3"}, C{"0,2,4-5"}.

    @return: a C{frozenset} of CPU numbers.
    @raise ValueError: saying what is wrong with C{text}.
    """
    cpus = set()
    for part in text.split(","):
        part = part.strip()
        first, dash, last = part.partition("-")
        if not first.isdigit() or (dash and not last.isdigit()):
            raise ValueError(f"not a CPU list (such as 2, 0-3 or 0,2): {text!r}")
        low, high = int(first), int(last) if dash else int(first)
        if high < low:
            raise ValueError(f"CPU range {part!r} runs backwards")
        if high - low >= 4096:
            raise ValueError(f"CPU range {part!r} is too large")
        cpus.update(range(low, high + 1))
    return frozenset(cpus)


def formatCPUs(cpus):
    """
    C{cpus} written back as a CPU list, ranges joined (C{{0, 1, 2, 5}} ->
    C{"0-2,5"}).
    """
    parts = []
    for cpu in sorted(cpus):
        if parts and parts[-1][1] == cpu - 1:
            parts[-1][1] = cpu
        else:
            parts.append([cpu, cpu])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in parts)


def supported():
    """
    Whether this system lets a thread choose its CPUs.
    """
    return hasattr(os, "sched_setaffinity")


class CPUAffinity:
    """
    CPUs for the reactor and database threads, and the CPUs the process
    was allowed when it started (for the threads that are to stay free).

    @ivar cpus: the CPUs to pin to.
    @ivar everywhere: the CPUs the process could run on at start.
    """

    def __init__(self, cpus, everywhere=None):
        if not supported():
            raise ValueError("CPU affinity is not supported on this system")
        if everywhere is None:
            everywhere = os.sched_getaffinity(0)
        self.everywhere = frozenset(everywhere)
        missing = frozenset(cpus) - self.everywhere
        if not cpus or missing:
            raise ValueError(
                f"CPU {formatCPUs(missing) or '(none)'} is not one this process may run on "
                f"(it may use {formatCPUs(self.everywhere)})"
            )
        self.cpus = frozenset(cpus)
        self._freed = threading.local()

    def pin(self, thread=0):
        """
        Pin a thread (the calling one by default, else a native thread id)
        to L{cpus}.
        """
        os.sched_setaffinity(thread, self.cpus)

    def free(self, thread=0):
        """
        Let a thread (the calling one by default) run on every CPU of
        L{everywhere} again.
        """
        os.sched_setaffinity(thread, self.everywhere)

    def unpinned(self, function):
        """
        C{function}, made to free the thread it runs on first (once per
        thread): for work given to threads the reactor thread started, such
        as password hashing, that should not wait for the reactor's CPU.
        """
        freed = self._freed

        def run(*args, **kwargs):
            if not getattr(freed, "done", False):
                self.free()
                freed.done = True
            return function(*args, **kwargs)

        return run


class AffinityService(Service):
    """
    Pins the reactor thread and the database threads when started (from
    the reactor thread, which is where services start), and frees the
    reactor thread again when stopped.

    @ivar affinity: the L{CPUAffinity}.
    """

    log = Logger()

    def __init__(self, affinity):
        self.affinity = affinity

    def startService(self):
        super().startService()
        self.affinity.pin()
        pinned = 1
        for thread in threading.enumerate():
            if thread.name.startswith(DATABASE_THREADS) and thread.native_id is not None:
                try:
                    self.affinity.pin(thread.native_id)
                except ProcessLookupError:
                    # It ended meanwhile (a store closing).
                    continue
                pinned += 1
        self.log.info(
            "reactor thread and database threads on CPU {cpus}",
            cpus=formatCPUs(self.affinity.cpus),
            event="service.cpu_affinity",
            threads=pinned,
        )

    def stopService(self):
        super().stopService()
        self.affinity.free()
