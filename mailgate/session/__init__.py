"""
The one command-session core every mailgate protocol (POP3, SMTP, LMTP)
is built on: framing, the pipelined command queue, back-pressure, limits,
the idle timer, admission, session ids and log context, graceful shutdown,
and the PROXY-protocol header in front of it all.

  - L{CommandSession} (L{mailgate.session.core}): the base of every session.
  - L{SessionFactory}: what a session finds on its factory; its policy is
    L{OpenPolicy} (admits everyone, never delays) unless it is given one.
  - L{SessionTracker}: the open sessions, for a graceful shutdown.
  - L{TraceSelection}: the clients whose sessions are traced in the log.
  - L{ReplyWriter}, L{IdleTimer}, L{setNoDelay}, L{BlockSender}: the
    pieces, usable on their own.
"""

from mailgate.session.core import CommandError, CommandSession
from mailgate.session.factory import OpenPolicy, SessionFactory
from mailgate.session.idle import IdleTimer
from mailgate.session.ids import describeAddress, newSessionId
from mailgate.session.output import ReplyWriter, setNoDelay
from mailgate.session.sender import BlockSender, SendAborted
from mailgate.session.trace import TraceSelection
from mailgate.session.tracker import SessionTracker

__all__ = [
    "BlockSender",
    "CommandError",
    "CommandSession",
    "IdleTimer",
    "OpenPolicy",
    "ReplyWriter",
    "SendAborted",
    "SessionFactory",
    "SessionTracker",
    "TraceSelection",
    "describeAddress",
    "newSessionId",
    "setNoDelay",
]
