"""
mailgate's POP3 server (RFC 1939, 2449, 3206).

L{mailgate.pop3.factory.POP3Factory} builds L{mailgate.pop3.protocol.POP3Server}
instances from a L{twisted.cred.portal.Portal} whose realm hands out
L{mailgate.interfaces.IMaildrop} avatars.
"""

from mailgate.pop3.factory import POP3Factory
from mailgate.pop3.protocol import POP3Server

__all__ = ["POP3Factory", "POP3Server"]
