# -*- test-case-name: tests.test_auth -*-
"""
Credential checkers over the mail store.

Both checkers answer a successful login with the user's
L{mailgate.records.UserRecord} as avatar id, and every failure with
the same L{UnauthorizedLogin}, whatever the reason: an unknown user and a
wrong password must look alike.  The unknown user even pays for a password
hash, so the two take the same time.
"""

import attr
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from mailgate.address import loginAddress
from mailgate.auth.cache import VerifiedCredentialCache
from mailgate.auth.credentials import IAPOPCredentials, ICramMD5Credentials, IMasterCredentials
from mailgate.auth.passwords import SCRYPT_LOG_N, dummyHash, makeCredentials, needsUpgrade, verifyPassword
from mailgate.errors import InvalidAddress, MasterNetworkRefused
from mailgate.networks import peerAllowed


def threadRunner(reactor, affinity=None):
    """
    A callable that runs a function on C{reactor}'s thread pool and returns
    a L{Deferred}: slow hashes never run on the reactor thread.

    @param affinity: the L{mailgate.affinity.CPUAffinity} the reactor
        thread is pinned with, if any: the pool's threads (started by the
        reactor thread, so pinned like it) are freed to run anywhere, so
        that a cold login's hash never waits for the reactor's CPU.
    """
    from twisted.internet.threads import deferToThreadPool

    def run(function, *args):
        if affinity is not None:
            function = affinity.unpinned(function)
        return deferToThreadPool(reactor, reactor.getThreadPool(), function, *args)

    return run


class LoginAbandoned(Exception):
    """
    A password was not checked: its login was given up (the session that
    asked ended) before its hash started.  Neither a success nor a
    failure: nothing is counted, remembered or answered.
    """


def abandonWhen(credentials, abandoned):
    """
    Mark C{credentials} as given up once C{abandoned()} is true (a POP3
    session that ended: its connection lost, its login timeout): a
    password hash that has not started by then is not run.
    """
    credentials.mailgateAbandoned = abandoned
    return credentials


def abandonedCheck(credentials):
    """
    The C{abandoned} callable L{abandonWhen} gave C{credentials}, or
    C{None} (never given up).
    """
    return getattr(credentials, "mailgateAbandoned", None)


def _addressOf(username, defaultRealm=None):
    try:
        return loginAddress(username, defaultRealm)
    except InvalidAddress:
        return None


def _verifyOrDummy(password, storedHash, abandoned=None):
    """
    Whether C{password} matches C{storedHash} (a dummy hash run for an
    unknown user, so that both cost the same).  Runs on the thread pool.

    @param abandoned: returns whether the login was given up (its session
        ended) while this waited in the pool's queue: then nothing is
        hashed.  The pool runs ten hashes at once and queues the rest
        without bound; a flood of connections that send a password and
        close at once (500 of them in a tenth of a second from one exempt
        address) left a queue of hashes that nobody would read, and a
        real user's login waited behind all of them (86 seconds).
    @raise LoginAbandoned: if C{abandoned()} says so.
    """
    if abandoned is not None and abandoned():
        raise LoginAbandoned()
    if storedHash is None:
        verifyPassword(password, dummyHash())
        return False
    matched = verifyPassword(password, storedHash)
    if not matched and needsUpgrade(storedHash):
        # A hash imported from another server is often cheaper than
        # scrypt: a wrong password costs what an unknown user's does.
        verifyPassword(password, dummyHash())
    return matched


def _verifiedOnce(cache, runInThread, name, storedHash, password, credentials):
    """
    Check C{password} against C{storedHash} (C{None}: no such user, whose
    dummy hash costs the same) on the thread pool, unless it failed
    against this very hash before: it would fail again, and a client
    repeating an old password must not cost a hash each time (an unknown
    name's neither, while it stays unknown).  A failure is remembered
    under C{name} in C{cache}.

    @return: a L{Deferred} that fails with L{UnauthorizedLogin} if the
        password does not match (or with L{LoginAbandoned}).
    """
    if cache.failedBefore(name, storedHash, password):
        return defer.fail(UnauthorizedLogin())

    def matched(ok):
        if not ok:
            cache.rememberFailure(name, storedHash, password)
            raise UnauthorizedLogin()

    return runInThread(_verifyOrDummy, password, storedHash, abandonedCheck(credentials)).addCallback(matched)


@implementer(ICredentialsChecker)
class PasswordChecker:
    """
    Checks a user name and password (POP3 USER/PASS, SASL PLAIN) against
    the stored scrypt hash, consulting a cache of recent verifications first.

    A cached verification is answered without the database; the user record
    it returns carries the hash the password was verified against, and
    L{mailgate.interfaces.IMailStore.openMaildrop} refuses it (with
    L{mailgate.errors.CredentialsChanged}) if that is no longer the stored
    hash.

    @param runInThread: how to run the hash off the reactor thread; see
        L{threadRunner}.
    """

    credentialInterfaces = (IUsernamePassword,)
    log = Logger()

    #: scrypt's cost (log2 of N) of the hashes that replace imported ones
    hashCost = SCRYPT_LOG_N

    def __init__(self, store, runInThread, cache=None, defaultRealm=None):
        self._store = store
        self._runInThread = runInThread
        self.cache = VerifiedCredentialCache() if cache is None else cache
        self._defaultRealm = defaultRealm

    def requestAvatarId(self, credentials):
        password = credentials.password
        if isinstance(password, str):
            password = password.encode("utf-8")
        address = _addressOf(credentials.username, self._defaultRealm)
        if address is not None:
            user = self.cache.lookup(address, password)
            if user is not None:
                # Verified recently.  The store confirms, when it opens the
                # maildrop, that the stored hash is still this one.
                return defer.succeed(user)
        return self._verify(address, password, credentials.username, credentials)

    @defer.inlineCallbacks
    def _verify(self, address, password, username, credentials):
        user = None if address is None else (yield self._store.findUser(address))
        storedHash = None if user is None else user.passwordHash
        # A name that is no address (refused whatever the password) is
        # remembered as given, apart from every address (which has no NUL).
        if isinstance(username, bytes):
            username = username.decode("utf-8", "replace")
        failedAs = address if address is not None else "\0" + username
        yield _verifiedOnce(self.cache, self._runInThread, failedAs, storedHash, password, credentials)
        if needsUpgrade(storedHash):
            user = yield self._upgrade(user, password)
        if not needsUpgrade(user.passwordHash):
            # Remember who this is, but not the user's other secrets.  (An
            # imported hash the upgrade could not replace is not: the next
            # login, answered from the cache, would not try again.)
            remembered = attr.evolve(user, scramSha256=None, apopSecret=None, cramMD5=None)
            self.cache.remember(user.address, user.passwordHash, password, remembered)
        return user


    @defer.inlineCallbacks
    def _upgrade(self, user, password):
        """
        Replace a hash imported from another server by mailgate's own
        (scrypt, and SCRAM-SHA-256 keys, which an imported hash lacks), now
        that the password is at hand.  Best effort: if the store cannot
        take it now, the login goes on and the next one tries again.

        What else the user logs in with stays as it was: an APOP secret,
        and the HMAC-MD5 states of a C{{CRAM-MD5}} hash imported from
        Dovecot, which served CRAM-MD5 from them.  Their mail clients are
        likely set up for CRAM-MD5: dropping the states would break them
        at the first login from another client (a webmail, a phone), and
        keeping the password in clear for it instead (an APOP secret) would
        keep more than Dovecot did and start offering APOP.  The states are
        kept as they are (the same the password makes, since it matched);
        C{mailgate user apop ADDRESS off} erases them.  Only the hash and
        the SCRAM keys are written, so that an APOP secret or states
        erased (or set) by the mailgate command while the new hash was
        made are not put back (or erased).

        @return: the user as the login goes on with it.
        """
        credentials = yield self._runInThread(makeCredentials, password, False, self.hashCost)
        try:
            replaced = yield self._store.upgradeCredentials(
                user.address, user.passwordHash, credentials, hashOnly=True
            )
        except Exception as e:
            self.log.warn(
                "could not replace {user}'s imported password hash: {error}",
                user=user.address, error=str(e), event="auth.upgrade_failed",
            )
            # It may have been replaced all the same (CommitUncertain: the
            # connection was lost while the COMMIT was on its way).
            replaced = False
        if not replaced:
            # Changed meanwhile: by another node's login replacing it too
            # (the password then checks against what it stored), by this
            # replacement whose commit went unconfirmed, or by a new
            # password (opening the maildrop refuses this login).
            try:
                current = yield self._store.findUser(user.address)
            except Exception:
                return user
            if current is not None and not needsUpgrade(current.passwordHash):
                if (yield self._runInThread(verifyPassword, password, current.passwordHash)):
                    return current
            return user
        self.log.info(
            "{user}'s imported password hash replaced by mailgate's own",
            user=user.address, event="auth.hash_upgraded",
        )
        return attr.evolve(user, passwordHash=credentials.passwordHash, scramSha256=credentials.scramSha256)


def _masterKey(name):
    """
    What a master user's verification is remembered under in the
    credential cache it shares with the users': no address holds a NUL,
    and the names that are no address are remembered as C{NUL name}.
    """
    return "master\0" + name


@implementer(ICredentialsChecker)
class MasterPasswordChecker:
    """
    Checks a master user's login to another user's maildrop
    (L{IMasterCredentials}): the master user's password against its
    stored hash, then the user it logs in as, who must exist.  The answer
    is that user (L{mailgate.records.UserRecord}), whose maildrop the
    realm opens as for the user's own login: the user's disabled state,
    allowed networks and C{[IN-USE]} lock apply, the user's own password
    is not asked.

    A client on none of the master user's allowed networks (C{mailgate
    master networks}) is refused once the password is verified, with
    L{MasterNetworkRefused}, which a session answers as a wrong password.
    An unknown master user, a wrong password and an unknown user fail
    alike, after the same hash.  Both are looked up at every master
    login (one indexed read each): a verification is remembered with the
    hash it was made against, as a user's is, and honoured only while
    that is still the master user's, so that C{mailgate master passwd}
    and C{master del} take effect at once on every node.

    @param cache: the L{VerifiedCredentialCache} the users' password
        checker uses (master users' entries are kept apart by their keys).
    """

    credentialInterfaces = (IMasterCredentials,)

    def __init__(self, store, runInThread, cache, defaultRealm=None):
        self._store = store
        self._runInThread = runInThread
        self.cache = cache
        self._defaultRealm = defaultRealm

    @defer.inlineCallbacks
    def requestAvatarId(self, credentials):
        password = credentials.password
        if isinstance(password, str):
            password = password.encode("utf-8")
        name = credentials.master
        address = _addressOf(credentials.username, self._defaultRealm)
        master = None if name is None else (yield self._store.findMasterUser(name))
        user = None if address is None else (yield self._store.findUser(address))
        storedHash = None if master is None else master.passwordHash
        key = _masterKey(name) if name is not None else "\0" + credentials.masterAsGiven
        if storedHash is None or not self.cache.check(key, storedHash, password):
            yield _verifiedOnce(self.cache, self._runInThread, key, storedHash, password, credentials)
            self.cache.remember(key, storedHash, password)
        if credentials.peer is not None and not peerAllowed(credentials.peer, master.allowedNetworks):
            raise MasterNetworkRefused(name)
        if user is None:
            raise UnauthorizedLogin()
        return user


#: the HMAC-MD5 states a CRAM-MD5 response is checked against when the
#: user has none (or is unknown), so that every refusal costs the same
_DUMMY_CRAM_CONTEXT = bytes(32)

#: the secret an APOP digest (or a CRAM-MD5 response) is checked against
#: when the user has no APOP secret or is unknown: the same work as a
#: real secret's digest, whose answer is thrown away
_DUMMY_APOP_SECRET = b"\0" * 16


def _cramContextOf(user):
    """
    The user's CRAM-MD5 states (32 octets), or L{_DUMMY_CRAM_CONTEXT} for
    an unknown user, one without, or states that are not 64 hex digits
    (written by hand into the database: refused, not a traceback).
    """
    if user is None or user.cramMD5 is None:
        return _DUMMY_CRAM_CONTEXT
    try:
        context = bytes.fromhex(user.cramMD5)
    except (TypeError, ValueError):
        return _DUMMY_CRAM_CONTEXT
    return context if len(context) == 32 else _DUMMY_CRAM_CONTEXT


@implementer(ICredentialsChecker)
class APOPChecker:
    """
    Checks an APOP digest, or a CRAM-MD5 response, against the user's APOP
    secret: both prove knowledge of a secret the server must be able to
    recover.  A CRAM-MD5 response is also checked against the HMAC-MD5
    states of a user imported from Dovecot with a C{{CRAM-MD5}} hash (kept
    after their first login replaced it; see L{PasswordChecker._upgrade}):
    CRAM-MD5 needs no more than them.  Users with neither fail exactly
    like a wrong digest, after the same work.

    Such a login learns no password, so an imported hash stays as it is
    until a login that gives one (USER/PASS, PLAIN, LOGIN).
    """

    credentialInterfaces = (IAPOPCredentials, ICramMD5Credentials)

    def __init__(self, store, defaultRealm=None):
        self._store = store
        self._defaultRealm = defaultRealm

    @defer.inlineCallbacks
    def requestAvatarId(self, credentials):
        address = _addressOf(credentials.username, self._defaultRealm)
        user = None if address is None else (yield self._store.findUser(address))
        cramMD5 = ICramMD5Credentials.providedBy(credentials)
        if cramMD5:
            # Carried on from states for every user, those with APOP too:
            # in pure Python it costs fifty times what an APOP secret's
            # HMAC does, which would tell them from everyone else.
            context = _cramContextOf(user)
            fromStates = credentials.checkContext(context) and context is not _DUMMY_CRAM_CONTEXT
        if user is not None and user.apopSecret is not None:
            matched = credentials.checkPassword(user.apopSecret)
        else:
            # The digest a user with APOP has checked, made all the same:
            # skipped, a refusal of a user without APOP (or of no user)
            # came sooner than a wrong digest's, which a client timing
            # its answers could see with --auth-failure-delay 0.
            credentials.checkPassword(_DUMMY_APOP_SECRET)
            matched = cramMD5 and fromStates
        if not matched:
            raise UnauthorizedLogin()
        return user
