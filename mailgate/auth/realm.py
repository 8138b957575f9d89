# -*- test-case-name: tests.test_auth -*-
"""
The realm: from an authenticated user to the database-backed maildrop.
"""

from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from zope.interface import implementer


from mailgate.auth.checkers import APOPChecker, PasswordChecker
from mailgate.auth.sasl import ScramChecker
from mailgate.errors import CredentialsChanged, LoginDelayed
from mailgate.interfaces import IMaildrop


@implementer(IRealm)
class MaildropRealm:
    """
    Hands out L{IMaildrop} avatars: the user's maildrop, locked and
    snapshotted.  The logout callable releases the lock.

    @param loginDelay: if set, the minimum number of seconds between two
        logins of the same user (RFC 2449 LOGIN-DELAY); a login sooner than
        that fails with L{LoginDelayed}, after the password was verified.
    """

    def __init__(self, store, loginDelay=None, onStaleCredentials=None):
        self._store = store
        self._loginDelay = loginDelay
        self._onStaleCredentials = onStaleCredentials

    def requestAvatar(self, avatarId, mind, *interfaces):
        if IMaildrop not in interfaces:
            raise NotImplementedError("mailgate's realm only provides IMaildrop")
        return self._open(avatarId)

    def _open(self, identity):
        # Callbacks rather than a generator: this runs at every login.
        d = self._store.openMaildrop(identity)
        d.addErrback(self._credentialsChanged, identity)
        if self._loginDelay:
            d.addCallback(self._checkLoginDelay, identity)
        return d.addCallback(_avatar)

    def _credentialsChanged(self, failure, identity):
        failure.trap(CredentialsChanged)
        # A remembered password that is no longer the user's: a failed
        # login like any other, and nothing more to remember about it.
        if self._onStaleCredentials is not None:
            self._onStaleCredentials(identity)
        raise UnauthorizedLogin()

    def _checkLoginDelay(self, maildrop, identity):
        d = self._store.recordLogin(identity, self._loginDelay)

        def checked(allowed):
            if not allowed:
                maildrop.release()
                raise LoginDelayed(
                    f"the minimum time between logins is {self._loginDelay} seconds"
                )
            return maildrop

        def failed(failure):
            maildrop.release()
            return failure

        return d.addCallbacks(checked, failed)


def _avatar(maildrop):
    return (IMaildrop, maildrop, maildrop.release)


def makePortal(store, runInThread, cache=None, apop=True, loginDelay=None, defaultRealm=None):
    """
    The POP3 portal: the maildrop realm with the password checker (USER/PASS
    and SASL PLAIN), the SCRAM-SHA-256 checker and, unless switched off, the
    APOP checker.

    @param defaultRealm: the domain of a login name without one (Dovecot's
        C{auth_default_realm}), or C{None}.

    @return: the L{Portal}; its password checker is its C{passwordChecker}
        attribute, whose C{cache} tests and embedders can tune.
    """
    passwords = PasswordChecker(store, runInThread, cache, defaultRealm)
    checkers = [passwords, ScramChecker(store, defaultRealm)]
    if apop:
        checkers.append(APOPChecker(store, defaultRealm))
    realm = MaildropRealm(
        store, loginDelay, onStaleCredentials=lambda user: passwords.cache.forgetUser(user.address)
    )
    portal = Portal(realm, checkers)
    portal.passwordChecker = passwords
    return portal
