# -*- test-case-name: tests.test_auth -*-
"""
The realm: from an authenticated user to the database-backed maildrop.
"""

from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer
from twisted.python.failure import Failure
from zope.interface import implementer


from mailgate.auth.checkers import APOPChecker, MasterPasswordChecker, PasswordChecker
from mailgate.auth.oauth import BearerTokenChecker
from mailgate.auth.sasl import ScramChecker
from mailgate.errors import CredentialsChanged, LoginDelayed
from mailgate.interfaces import IMaildrop
from mailgate.plural import counted


@implementer(IRealm)
class MaildropRealm:
    """
    Hands out L{IMaildrop} avatars: the user's maildrop, locked and
    snapshotted.  The logout callable releases the lock.

    @param loginDelay: if set, the minimum number of seconds between two
        logins of the same user (RFC 2449 LOGIN-DELAY); a login sooner than
        that fails with L{LoginDelayed}, after the password was verified.
    @ivar loginDelay: the same, read at each login (a reload changes it).
    """

    def __init__(self, store, loginDelay=None, onStaleCredentials=None):
        self._store = store
        self.loginDelay = loginDelay
        self._onStaleCredentials = onStaleCredentials

    def requestAvatar(self, avatarId, mind, *interfaces):
        if IMaildrop not in interfaces:
            raise NotImplementedError("mailgate's realm only provides IMaildrop")
        # The mind is the client's address (a POP3 session's peer), which
        # the user's allowed networks are checked against.
        return self._open(avatarId, mind)

    def _open(self, identity, peer=None):
        # Callbacks rather than a generator: this runs at every login.
        # Without a client (no mind) the store is asked as before.
        d = self._store.openMaildrop(identity) if peer is None else self._store.openMaildrop(identity, peer)
        d.addErrback(self._credentialsChanged, identity)
        if self.loginDelay:
            d.addCallback(self._checkLoginDelay, identity, self.loginDelay)
        return d.addCallback(_avatar)

    def _credentialsChanged(self, failure, identity):
        failure.trap(CredentialsChanged)
        # The hash the credentials were checked against (a remembered
        # one, most often) is no longer the user's: nothing more to
        # remember about it, and the portal checks them again.
        if self._onStaleCredentials is not None:
            self._onStaleCredentials(identity)
        raise StaleCredentials()

    def _checkLoginDelay(self, maildrop, identity, delay):
        d = self._store.recordLogin(identity, delay)

        def checked(allowed):
            if not allowed:
                return _afterRelease(
                    maildrop,
                    Failure(LoginDelayed(f"the minimum time between logins is {counted(delay, 'second')}")),
                )
            return maildrop

        def failed(failure):
            return _afterRelease(maildrop, failure)

        return d.addCallbacks(checked, failed)


def _afterRelease(maildrop, refusal):
    """
    Release C{maildrop} and fail with C{refusal} once it is released: RFC
    1939 section 4 has the lock taken for a login that is refused released
    before the refusal goes out, and where locks are held in the database
    the release is a round trip.  Refused at once, a client logging in
    again as soon as it read C{[LOGIN-DELAY]} could find its maildrop
    still locked by the login just refused (C{[IN-USE]}).  A release that
    fails is left to fail on its own, as before.
    """
    done = defer.Deferred()

    def released(result):
        done.errback(refusal)
        return result

    defer.maybeDeferred(maildrop.release).addBoth(released)
    return done


class StaleCredentials(UnauthorizedLogin):
    """
    The credentials were checked against a stored hash (or an address)
    that is no longer the user's by the time the maildrop was opened: a
    remembered password after a password change, or a user deleted or
    renamed meanwhile.  L{MaildropPortal} checks them once more; failing
    again, it is a failed login like any other.
    """


class MaildropPortal(Portal):
    """
    A L{Portal} that checks credentials found stale (L{StaleCredentials})
    once more, against what the store holds now, before refusing them.

    A password is remembered with the hash it was verified against, and
    opening the maildrop refuses it once that hash is no longer the
    user's.  The hash also changes when the password does not: set again
    to the same one (C{mailgate user passwd}, which SASLprep'd SCRAM keys
    ask for), or changed and changed back.  Refused there, the user's
    right password would fail once on every node that remembered it,
    counted towards the address's penalties and bans.  Checked again
    (the remembered entry is forgotten first, so it is a full
    verification), the old password still fails and the right one logs
    in.  Once only: a second stale answer (the password changed again
    meanwhile) is a failed login.
    """

    def login(self, credentials, mind, *interfaces):
        d = Portal.login(self, credentials, mind, *interfaces)

        def again(failure):
            failure.trap(StaleCredentials)
            return Portal.login(self, credentials, mind, *interfaces)

        return d.addErrback(again)


def _avatar(maildrop):
    return (IMaildrop, maildrop, maildrop.release)


def makePortal(
    store, runInThread, cache=None, apop=True, loginDelay=None, defaultRealm=None, tokens=None, masterUsers=False
):
    """
    The POP3 portal: the maildrop realm with the password checker (USER/PASS
    and SASL PLAIN), the SCRAM-SHA-256 checker and, unless switched off, the
    APOP checker.

    @param defaultRealm: the domain of a login name without one (Dovecot's
        C{auth_default_realm}), or C{None}.
    @param tokens: the L{mailgate.auth.oauth.TokenValidator} of OAuth 2.0
        bearer tokens (OAUTHBEARER, XOAUTH2), or C{None}: none accepted.
    @param masterUsers: check master users' logins to other users'
        maildrops (L{mailgate.auth.credentials.MasterCredentials}); without
        it, such credentials are refused as the portal refuses any it has
        no checker for.

    @return: the L{Portal}; its password checker is its C{passwordChecker}
        attribute, whose C{cache} tests and embedders can tune.
    """
    passwords = PasswordChecker(store, runInThread, cache, defaultRealm)
    checkers = [passwords, ScramChecker(store, defaultRealm)]
    if apop:
        checkers.append(APOPChecker(store, defaultRealm))
    if tokens is not None:
        checkers.append(BearerTokenChecker(store, tokens, defaultRealm))
    if masterUsers:
        checkers.append(MasterPasswordChecker(store, runInThread, passwords.cache, defaultRealm))
    realm = MaildropRealm(
        store, loginDelay, onStaleCredentials=lambda user: passwords.cache.forgetUser(user.address)
    )
    portal = MaildropPortal(realm, checkers)
    portal.passwordChecker = passwords
    return portal
