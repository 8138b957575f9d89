# -*- test-case-name: tests.test_policy -*-
"""
Connection limits, the authentication penalty and bans.

L{ConnectionPolicy} (in L{mailgate.policy.connection}) is what
C{twistd mailgate} runs: limits per process and per client address,
Dovecot's authentication penalty, and bans shared by every node through
the store.  A protocol factory given no policy admits everyone and never
delays (L{mailgate.session.OpenPolicy}).
"""
