"""
SMTP (RFC 5321) and LMTP (RFC 2033) intake, delivering into the store.

L{SMTPFactory} and L{LMTPFactory} build sessions around a delivery policy
(L{LocalDelivery}: local users of accepted domains, committed to an
L{mailgate.interfaces.IMailStore}).
"""

from mailgate.smtp.delivery import LocalDelivery
from mailgate.smtp.factory import LMTPFactory, SMTPFactory
from mailgate.smtp.protocol import LMTPServer, SMTPServer

__all__ = ["LMTPFactory", "LMTPServer", "LocalDelivery", "SMTPFactory", "SMTPServer"]
