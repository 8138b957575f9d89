"""
SMTP (RFC 5321) and LMTP (RFC 2033) intake, delivering into the store.

L{SMTPFactory} and L{LMTPFactory} build sessions around a delivery policy
(L{LocalDelivery}: local users of accepted domains, committed to an
L{mailgate.interfaces.IMailStore}).

The factories and protocols are imported when first named (L{__getattr__}):
they bring the session core, and with it TLS and the reactor's TCP, which
C{mailgate deliver} (L{LocalDelivery} alone, once per message under an
MTA's pipe transport) does without.
"""

from mailgate.smtp.delivery import LocalDelivery

__all__ = ["LMTPFactory", "LMTPServer", "LocalDelivery", "SMTPFactory", "SMTPServer"]


def __getattr__(name):
    """
    C{mailgate.smtp.SMTPFactory} and the like, from their modules, at their
    first use.
    """
    if name in ("LMTPFactory", "SMTPFactory"):
        from mailgate.smtp import factory

        return getattr(factory, name)
    if name in ("LMTPServer", "SMTPServer"):
        from mailgate.smtp import protocol

        return getattr(protocol, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
