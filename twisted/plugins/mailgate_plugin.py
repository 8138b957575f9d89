"""
The C{twistd mailgate} plugin.

This directory has no C{__init__.py} on purpose: C{twisted.plugins} is a
namespace that Twisted extends with every C{twisted/plugins} directory on
C{sys.path}.  The options and service live in L{mailgate.tap} and are only
imported when C{twistd mailgate} runs, so C{twistd --help} stays fast.
"""

from twisted.application.service import ServiceMaker

mailgate = ServiceMaker(
    "mailgate",
    "mailgate.tap",
    "POP3 / SMTP / LMTP mail gateway over SQLite or PostgreSQL",
    "mailgate",
)
