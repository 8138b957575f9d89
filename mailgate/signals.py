# -*- test-case-name: tests.test_service -*-
"""
The process's signal handlers, shared by every mailgate service in it.

An application may embed several mailgate services (two databases, two
sets of ports), each reloading on SIGHUP and SIGUSR1
(C{reloadOnSIGHUP=True}).  Each installing its own handler and putting
back, at its stop, the one it had found, the first one stopped put back
the handler from before them all, and took away the second's: the next
SIGHUP ended the process by its default action.  Here one handler per
signal calls every service's; the handler from before is put back once
the last service has let go.
"""

import signal
import threading


class SharedSignalHandlers:
    """
    One handler per signal, calling each owner's handler in turn.
    """

    def __init__(self):
        #: signal number -> {owner: handler}
        self._handlers = {}
        #: signal number -> the handler there before the first owner's
        self._previous = {}

    def handle(self, owner, signum, handler):
        """
        Call C{handler(signum, frame)} on C{signum}, as C{owner}'s (in
        place of the one C{owner} had there, if any).
        """
        handlers = self._handlers.setdefault(signum, {})
        if not handlers:
            self._previous[signum] = signal.signal(signum, self._dispatch)
        handlers[owner] = handler

    def handledBy(self, owner):
        """
        The signals C{owner} has a handler for.
        """
        return [signum for signum, handlers in self._handlers.items() if owner in handlers]

    def release(self, owner):
        """
        Drop C{owner}'s handlers; a signal no owner handles any more gets
        back the handler it had before, unless the application has put one
        of its own there since.
        """
        for signum in self.handledBy(owner):
            handlers = self._handlers[signum]
            del handlers[owner]
            if handlers:
                continue
            del self._handlers[signum]
            previous = self._previous.pop(signum)
            # None: a handler not installed from Python, which Python
            # cannot put back.
            if previous is not None and signal.getsignal(signum) == self._dispatch:
                signal.signal(signum, previous)

    def _dispatch(self, signum, frame):
        for handler in list(self._handlers.get(signum, {}).values()):
            handler(signum, frame)


#: the handlers of this process's mailgate services
processSignals = SharedSignalHandlers()


class HeldSignals:
    """
    C{signums} (SIGHUP, SIGUSR1) held from its making until L{release}:
    what arrives is noted in L{received}, in the order it came, for the
    caller to act on once it can, instead of their default action ending
    the process.  Once L{handOver} names the owner that will handle them,
    a signal that owner has a handler for is its alone (not noted again).
    For C{twistd mailgate}: from the making of its service (a schema
    upgrade makes that minutes) to the end of its privilegedStartService,
    where the service handles them; twistd starts its logger, writes its
    pid file and daemonizes in between, and a signal there ended the
    process as during the making.  Outside the main thread, where no
    handler can be installed, nothing is held.
    """

    def __init__(self, signums):
        #: the signal numbers received (each once)
        self.received = []
        self._taker = None
        if threading.current_thread() is threading.main_thread():
            for signum in signums:
                processSignals.handle(self, signum, self._hold)

    def _hold(self, signum, frame):
        if self._taker is not None and signum in processSignals.handledBy(self._taker):
            return
        if signum not in self.received:
            self.received.append(signum)

    def handOver(self, taker):
        """
        From now on, leave to C{taker} the signals it handles itself.
        """
        self._taker = taker

    def release(self):
        """
        Stop holding: each signal gets back the handler it had before,
        unless another owner handles it.
        """
        processSignals.release(self)
