"""
mailgate: a POP3, SMTP and LMTP mail gateway built on Twisted.

One process, one reactor, one service hierarchy: mail comes in over SMTP or
LMTP, is committed to a database (embedded SQLite, or PostgreSQL shared by
several nodes) and goes out to mail clients over POP3.
"""

__version__ = "0.1.0"
