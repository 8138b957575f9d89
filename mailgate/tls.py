# -*- test-case-name: tests.test_tls -*-
"""
TLS for every listener: one server certificate, and optionally an
alternative one with a key of another type, reloadable at run time.

L{ServerTLS} is what STLS, STARTTLS and the implicit-TLS listeners start
TLS with (L{mailgate.session.tlslayer}).  Each new TLS connection is made
from the certificates it loaded last, so L{ServerTLS.reload} (run on
SIGHUP) makes a renewed certificate take effect for new connections while
established sessions carry on.

Why an alternative certificate (Dovecot's C{ssl_alt_cert}): most of a full
handshake's server CPU is the signature made with the certificate's key,
and an ECDSA P-256 signature costs a fraction of an RSA-2048 one (a whole
TLS 1.3 handshake here: about 200 µs against 460, see
benchmarks/RESULTS.md).  With an RSA certificate and an ECDSA one loaded
together, OpenSSL signs with ECDSA for every client that accepts it
(nearly all of today's) and with RSA for the others, so no client is left
out for the saving.

Why certificates chosen by name (Dovecot's C{local_name} blocks): a
gateway serving several domains is reached as C{pop.example.org} by some
clients and C{mail.example.net} by others, and a client checks that the
certificate names the host it asked for.  Each further certificate serves
the names its subjectAltName lists (C{*.example.net} for any name one
level below), read from the certificate itself so that no name can be
given a certificate that is not for it; a client asking for another name,
or for none (SNI), gets the main certificate.

The context is Python's C{ssl.SSLContext}.  Settings: TLS 1.2 at least
(or 1.3, by choice), no TLS compression, no renegotiation, the
server's cipher preference, forward-secret suites only, AEAD first (TLS
1.3 suites are OpenSSL's defaults); the TLS 1.2 list may be replaced
(C{tls-ciphers}, Dovecot's C{ssl_cipher_list}), never by one that lets in
suites without authentication or encryption, or none the certificates
can serve.

Why the main context is made again every hour by default
(L{TicketKeyRotation}, C{tls-ticket-key-rotation}): OpenSSL seals the
session tickets it gives clients with a key of the context's own, made
with it and kept as long as it lives.  A TLS 1.2 ticket carries the session's master secret, and
TLS 1.2 resumption makes no new key exchange, so whoever got that key
(a memory dump, a core file) could read every TLS 1.2 session, first
connection and resumed ones, whose ticket was recorded while it was in
service: with one context for the life of the process, every one since
the start.  (TLS 1.3 resumption makes a new ECDHE exchange, as OpenSSL
requires unless told otherwise, so only the tickets themselves would be
read.)  A new context, from the certificates and keys already read,
bounds that to one interval, as Postfix's tlsmgr does.  Python's C{ssl}
gives no way to set the ticket keys, and OpenSSL opens a ticket with the
key of the context a connection was made from, chosen before its
ClientHello is read (an SNI callback's context does not count): the
previous key cannot be kept for tickets already given out, so a client
resuming across a renewal gets a full handshake, and a new ticket.
"""

import contextlib
import datetime
import os
import ssl
import sys

import attr
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from twisted.application.service import Service
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from mailgate.errors import ConfigurationError
from mailgate.owners import permissionsOf
from mailgate.plural import counted
from mailgate.twistedcompat import twistedHandshakeDone

# Forward-secret suites only, AEAD before CBC; no NULL, MD5 or DSS.  Not
# RSA key exchange (kRSA, which Twisted's default list keeps last): whoever
# got the key later could read every session recorded with it.  Dovecot's
# default list leaves it out too, and every client that speaks TLS 1.2, the
# oldest version accepted, has ECDHE.
CIPHERS = (
    "ECDH+AESGCM:ECDH+CHACHA20:DH+AESGCM:DH+CHACHA20:ECDH+AES256:DH+AES256:"
    "ECDH+AES128:DH+AES:!kRSA:!aNULL:!MD5:!DSS"
)
OPTIONS = (
    ssl.OP_NO_COMPRESSION
    | ssl.OP_NO_RENEGOTIATION
    | ssl.OP_CIPHER_SERVER_PREFERENCE
    | ssl.OP_SINGLE_DH_USE
    | ssl.OP_SINGLE_ECDH_USE
)


def isSecure(transport):
    """
    Whether C{transport} is TLS-protected (implicit TLS, or after STLS or
    STARTTLS): for mailgate's TLS layer, once its handshake has completed
    (one that failed protected nothing, and its session's end line says
    C{tls=no}).
    """
    if ISSLTransport.providedBy(transport):
        return tlsEstablished(transport)
    return bool(getattr(transport, "TLS", False))


def tlsEstablished(transport):
    """
    Whether the TLS handshake of C{transport} (an C{ISSLTransport}) has
    completed, and stays so once the connection has ended: mailgate's TLS
    layer's C{established}, or Twisted's own TLS's (an C{ssl:} listener,
    an embedding host's C{TLSMemoryBIOFactory}).  A session over Twisted's
    TLS whose handshake failed, or that its client left mid-handshake,
    was logged as C{tls=yes}, as if its connection had been protected.
    """
    established = getattr(transport, "established", None)
    if established is not None:
        return bool(established)
    return twistedHandshakeDone(transport)


def tlsFailure(reason):
    """
    Why a connection's loss C{reason} (a L{Failure}) is a TLS failure, a
    handshake that failed or a corrupt record, as OpenSSL names it
    (C{"WRONG_VERSION_NUMBER"}); C{None} if it is none.

    mailgate's TLS layer fails with Python's C{ssl.SSLError}; Twisted's own
    TLS (an C{ssl:} listener, an embedding host's C{TLSMemoryBIOFactory})
    with pyOpenSSL's C{OpenSSL.SSL.Error}, whose failures were taken for a
    connection lost: no C{session.tls_failed} line, no count in
    C{mailgate_tls_failures_total}, and an end line saying
    C{reason='connection lost'}.
    """
    error = getattr(reason, "value", None)
    if isinstance(error, ssl.SSLError):
        return getattr(error, "reason", None) or str(error)
    # Not imported here: a process that imported no pyOpenSSL (mailgate
    # deliver) has none of its errors.
    SSL = sys.modules.get("OpenSSL.SSL")
    if SSL is None or not isinstance(error, SSL.Error) or isinstance(
        error, (SSL.SysCallError, SSL.ZeroReturnError, SSL.WantReadError, SSL.WantWriteError)
    ):
        # A reset or an EOF (Twisted makes an EOF a ConnectionLost), or a
        # clean close: no TLS failure.
        return None
    # pyOpenSSL's error: a list of (library, function, reason) of OpenSSL's
    # error queue, the reason in words ("wrong version number").
    entries = error.args[0] if error.args and isinstance(error.args[0], list) else []
    reasons = [entry[-1] for entry in entries if isinstance(entry, tuple) and entry and entry[-1]]
    if reasons:
        return str(reasons[-1]).upper().replace(" ", "_")
    return str(error) or type(error).__name__


def negotiated(transport):
    """
    What a session's end line says of its TLS (as Postfix's "TLS connection
    established ... TLSv1.3 with cipher ..."): the text to add to the line,
    C{" tls_version=TLSv1.3 tls_cipher=TLS_AES_256_GCM_SHA384"}, and the
    JSON record's fields, C{tlsVersion} and C{tlsCipher}; C{""} and no
    fields without a completed handshake of mailgate's TLS layer, or a
    balancer's word on the client's TLS (L{versionAndCipher}).  Which
    clients a higher C{--tls-min-version}, or a cipher taken out of
    C{--tls-ciphers}, would turn away is looked up with them.  A balancer
    may tell one without the other (HAProxy sends the cipher only with
    C{proxy-v2-options ssl-cipher}): the one told is shown.

    @return: C{(text, fields)}.
    """
    version, cipher = versionAndCipher(transport)
    text, fields = "", {}
    if version is not None:
        text, fields["tlsVersion"] = f" tls_version={version}", version
    if cipher is not None:
        text, fields["tlsCipher"] = f"{text} tls_cipher={cipher}", cipher
    return text, fields


def versionAndCipher(transport):
    """
    The TLS version and cipher a session's completed handshake negotiated
    (C{"TLSv1.3"}, C{"TLS_AES_256_GCM_SHA384"}), or C{(None, None)}: read
    from mailgate's TLS layer (L{mailgate.session.tlslayer}), or from the
    OpenSSL connection under Twisted's own TLS, which an application that
    embeds mailgate may give a listener of its own.  On a connection whose
    client's TLS a trusted balancer ended (HAProxy's C{send-proxy-v2-ssl}),
    what the balancer's PROXY header told of it
    (L{mailgate.session.proxy.BalancerTLS}), either C{None} if untold.
    """
    if not ISSLTransport.providedBy(transport):
        told = getattr(transport, "balancerTLS", None) if getattr(transport, "TLS", False) else None
        if told is None:
            return None, None
        return told.version, told.cipher
    if not tlsEstablished(transport):
        # (Twisted's TLS has them chosen before a handshake that fails.)
        return None, None
    version = getattr(transport, "version", None)
    if isinstance(version, str):
        return version, transport.cipher
    try:
        handle = transport.getHandle()
        version = handle.get_protocol_version_name()
        cipher = handle.get_cipher_name()
    except Exception:
        # Not an OpenSSL connection, or no handshake completed on it.
        return None, None
    if not isinstance(version, str) or not isinstance(cipher, str):
        return None, None
    return version, cipher


def _read(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ConfigurationError(f"cannot read TLS certificate or key: {e}") from None


#: the C{tls-min-version} words and the versions they stand for.
MINIMUM_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


#: What a cipher list given by the administrator (C{tls-ciphers}) always
#: keeps out: suites without authentication or without encryption.
NEVER = ":!aNULL:!eNULL"


def setCiphers(context, ciphers):
    """
    Offer C{ciphers} (an OpenSSL cipher list) for TLS 1.2, never those of
    L{NEVER}; TLS 1.3's suites are OpenSSL's, all of them AEAD and
    forward-secret.

    @raise ConfigurationError: if OpenSSL selects no suite from it.
    """
    try:
        context.set_ciphers(ciphers + NEVER)
    except ssl.SSLError:
        # Python's error reads "('No cipher can be selected.',)": the
        # line says it without that.
        raise ConfigurationError(f"tls-ciphers {ciphers!r} selects no cipher suite OpenSSL has") from None


# The authentication of the TLS 1.2 suites each type of key serves, as
# OpenSSL names it: EdDSA keys sign ECDHE-ECDSA handshakes (RFC 8422).
_TLS12_AUTH = {"RSA": "auth-rsa", "ECDSA": "auth-ecdsa", "Ed25519": "auth-ecdsa", "Ed448": "auth-ecdsa"}

# The key exchanges of the TLS 1.2 suites OpenSSL can negotiate here:
# ECDHE, and RSA's if an administrator's list asks for it.  Not DHE: it
# needs DH parameters, which Python's ssl takes only from a file
# (load_dh_params, Dovecot's ssl_dh) and mailgate gives none, so OpenSSL
# passes DHE suites over; nor PSK or SRP, whose secrets no one has here.
_TLS12_KEY_EXCHANGES = {"kx-ecdhe", "kx-rsa"}


def checkCiphersServeKeys(context, ciphers, keyTypes, minimumVersion):
    """
    Refuse a C{tls-ciphers} list under which no TLS 1.2 client could
    complete a handshake with these certificates: one whose suites all
    authenticate with a key of a type none of them has (ECDSA suites with
    an RSA certificate only), or exchange keys in a way OpenSSL does not
    negotiate here (DHE only: see L{_TLS12_KEY_EXCHANGES}), where TLS 1.2
    is accepted.

    Every suite but TLS 1.3's counts: OpenSSL files one under the oldest
    version that has it (C{ECDHE-RSA-AES256-SHA} under TLSv1.0), and
    TLS 1.2 negotiates those too.
    """
    if minimumVersion != "1.2":
        return
    needed = {_TLS12_AUTH.get(t) for t in keyTypes}
    if None in needed:
        # A key of a type not known here: not judged.
        return
    suites = [c for c in context.get_ciphers() if c["protocol"] != "TLSv1.3"]
    offered = {c["auth"] for c in suites if c["kea"] in _TLS12_KEY_EXCHANGES}
    if not needed & offered:
        served = ", ".join(sorted(offered)) or "none"
        why = ""
        if any(c["kea"] == "kx-dhe" for c in suites):
            why = "; DHE suites are never negotiated: mailgate loads no DH parameters, use ECDHE ones"
        raise ConfigurationError(
            f"tls-ciphers {ciphers!r}: no TLS 1.2 suite of it works with the certificate's "
            f"{' or '.join(keyTypes)} key (it offers {served}){why}; TLS 1.2 clients could not connect"
        )


def makeContext(certificatePath, keyPath, alternative=None, minimumVersion="1.2", ciphers=CIPHERS):
    """
    A server C{ssl.SSLContext}: the certificate (and the chain after it in
    the same file), the key, and the settings above; and the alternative
    certificate and key, if given, beside them.

    @param alternative: C{(certificatePath, keyPath)} of a second
        certificate whose key is of another type than the first's (an
        ECDSA key beside an RSA one), or C{None}.
    @param minimumVersion: the oldest TLS version accepted, C{"1.2"} (the
        default, as Dovecot's) or C{"1.3"} (for a policy that asks for
        TLS 1.3 only: clients of before about 2018 cannot connect).
    @param ciphers: the OpenSSL cipher list of TLS 1.2's suites (see
        L{setCiphers}): L{CIPHERS} unless the administrator gives another.
    @return: the context, the leaf certificates, first the main one
        then the alternative one if any (C{cryptography} certificates, for
        logging their names and fingerprints), the warnings of
        L{chainWarning} for their files, the contents of each
        certificate file and its key file, in that order (for
        L{remakeContext}), and C{(certificate file, certificate)} for each
        certificate of their chains after the leaf (for the validity
        warnings of L{CertificateSummary}).
    @raise ConfigurationError: if the files cannot be used, or the two
        keys are of one type (OpenSSL keeps one certificate per type of
        key: the second would silently replace the first).
    """
    context = _newContext(minimumVersion, ciphers)
    pairs = [(certificatePath, keyPath)] + ([tuple(alternative)] if alternative is not None else [])
    read = [_readChain(certificate) for certificate, _ in pairs]
    pems, chains = [pem for pem, _ in read], [chain for _, chain in read]
    leaves = [chain[0] for chain in chains]
    if len(leaves) == 2:
        mainType, altType = (keyType(leaf.public_key()) for leaf in leaves)
        if altType == mainType:
            raise ConfigurationError(
                f"{pairs[1][0]}: the alternative certificate's key is {altType}, like the "
                f"main certificate's; it must be of another type (e.g. ECDSA beside RSA), "
                f"since a server holds one certificate per type of key"
            )
    keyPEMs = [_loadPair(context, certificate, key, chain) for (certificate, key), chain in zip(pairs, chains)]
    checkCiphersServeKeys(context, ciphers, [keyType(leaf.public_key()) for leaf in leaves], minimumVersion)
    warnings = [chainWarning(certificate, chain) for (certificate, _), chain in zip(pairs, chains)]
    chained = [(certificate, issuer) for (certificate, _), chain in zip(pairs, chains) for issuer in chain[1:]]
    return context, leaves, [w for w in warnings if w], list(zip(pems, keyPEMs)), chained


def _newContext(minimumVersion, ciphers):
    """
    A server context with the settings of L{makeContext}, and no
    certificate yet.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MINIMUM_VERSIONS[minimumVersion]
    context.options |= OPTIONS
    # One TLS 1.3 session ticket per full handshake, not OpenSSL's two
    # (meant for clients that open several connections at once): a POP3
    # client holds one session per maildrop, and a connection that resumes
    # with its ticket is given a new one.  Each ticket costs the server an
    # encryption and a record: one fewer took 2-3 % off a TLS stat or list
    # session (benchmarks/RESULTS.md).
    context.num_tickets = 1
    setCiphers(context, ciphers)
    return context


def remakeContext(pems, minimumVersion, ciphers):
    """
    A context like the one L{makeContext} made, from the certificate
    files and keys it read (checked then), not from the files, which may
    have been replaced since (a renewal that waits for its SIGHUP): its
    own session ticket key is all that differs.

    @param pems: C{(certificate file, key file)} contents, as
        L{makeContext} returns them.
    @raise OSError: the contents cannot be handed to OpenSSL.
    @raise ssl.SSLError: OpenSSL refuses them.
    """
    context = _newContext(minimumVersion, ciphers)
    for chainPEM, keyPEM in pems:
        with _inMemory(chainPEM) as chainPath, _inMemory(keyPEM) as keyPath:
            context.load_cert_chain(chainPath, keyPath, password=_noPassphrase)
    return context


@contextlib.contextmanager
def _inMemory(data):
    """
    A path to a file of memory holding C{data}, while in the block:
    Python's C{load_cert_chain} reads files only, and a private key is
    not to be written to disk.  Linux's C{memfd_create}, whose file no
    other process can open once the block has closed it.
    """
    fd = os.memfd_create("mailgate-tls")
    try:
        with open(fd, "wb", closefd=False) as f:
            f.write(data)
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


def inMemoryFilesProblem():
    """
    Why L{_inMemory}'s files cannot be made here, or C{None}: where
    C{memfd_create} is refused (a seccomp filter) or there is no
    C{/proc} to name the file by (a chroot, a sandbox without it), every
    renewal of the ticket key would fail alike.  Keys are not written to
    a disk's file instead: not having to is why memory files are used.
    """
    memfdCreate = getattr(os, "memfd_create", None)
    if memfdCreate is None:
        return "this system has no memfd_create"
    try:
        fd = memfdCreate("mailgate-tls")
    except OSError as e:
        return f"memfd_create is refused: {e.strerror or e}"
    try:
        os.stat(f"/proc/self/fd/{fd}")
    except OSError as e:
        return f"/proc/self/fd/ cannot be read ({e.strerror or e}): no /proc here"
    finally:
        os.close(fd)
    return None


def keyType(publicKey):
    """
    The name of a public key's type (C{"RSA"}, C{"ECDSA"}, C{"Ed25519"},
    ...): what OpenSSL holds one certificate for.
    """
    if isinstance(publicKey, rsa.RSAPublicKey):
        return "RSA"
    if isinstance(publicKey, ec.EllipticCurvePublicKey):
        return "ECDSA"
    return type(publicKey).__name__.lstrip("_").replace("PublicKey", "")


def _readChain(certificatePath):
    """
    The contents of a PEM file, and its certificates: the leaf, then its
    chain.

    @raise ConfigurationError: if there is none, or one cannot be parsed.
    """
    chainPEM = _read(certificatePath)
    if b"-----BEGIN CERTIFICATE-----" not in chainPEM:
        raise ConfigurationError(f"{certificatePath}: no PEM certificate found")
    try:
        return chainPEM, x509.load_pem_x509_certificates(chainPEM)
    except ValueError as e:
        raise ConfigurationError(f"{certificatePath}: invalid certificate: {e}") from None


def _issued(issuer, certificate):
    """
    Whether C{issuer}'s key signed C{certificate} under its name, or may
    have: a signature C{cryptography} cannot check (an algorithm it does
    not know) is given the benefit of the doubt, so that no chain is
    warned of wrongly.
    """
    if certificate.issuer != issuer.subject:
        return False
    try:
        certificate.verify_directly_issued_by(issuer)
    except InvalidSignature:
        return False
    except Exception:
        return True
    return True


def chainWarning(certificatePath, chain):
    """
    What to warn of, if anything, in a certificate file's chain: it has
    certificates after the first, and none of them issued it (an
    intermediate left over from before a renewal, when the CA now issues
    from another one, or another file's chain).  Clients get the file as
    it is and, lacking the leaf's issuer, cannot verify it, while a test
    from a machine that has the intermediate cached passes.  A file of one
    certificate is left alone: its issuer may be a root the clients trust.

    @param chain: the file's certificates, the leaf first.
    """
    leaf, rest = chain[0], chain[1:]
    if not rest or any(_issued(candidate, leaf) for candidate in rest):
        return None
    return (
        f"{certificatePath}: no certificate of its chain issued the first one (whose issuer is "
        f"{leaf.issuer.rfc4514_string()}): clients cannot verify it; give the chain its CA sent "
        f"with it (certbot's fullchain.pem)"
    )


def _loadPair(context, certificatePath, keyPath, chain):
    """
    Check a key against its certificate, and load both into C{context}.

    OpenSSL's own check is not enough with two certificates: it files a
    key beside the certificate of the key's type, so the RSA key given
    with the ECDSA certificate would pass, checked against the RSA
    certificate loaded before, and the ECDSA certificate would go out with
    no key to sign with.

    @param chain: the certificate file's certificates, the leaf first.
    @return: the key file's contents.
    @raise ConfigurationError: if they cannot be used.
    """
    keyPEM = _read(keyPath)
    try:
        key = serialization.load_pem_private_key(keyPEM, password=None)
    except TypeError:
        # The one TypeError of a PEM key without a password: it has one.
        raise ConfigurationError(
            f"{keyPath}: the private key is encrypted with a passphrase, which mailgate does "
            f"not take; store it unencrypted (openssl pkey -in ENCRYPTED -out KEY), mode 600"
        ) from None
    except ValueError as e:
        raise ConfigurationError(f"{keyPath}: invalid private key: {e}") from None
    publicKey = _publicBytes(key.public_key())
    if publicKey != _publicBytes(chain[0].public_key()):
        later = [n for n, c in enumerate(chain[1:], 2) if _publicBytes(c.public_key()) == publicKey]
        if later:
            raise ConfigurationError(
                f"unusable TLS certificate/key pair: {keyPath} is the key of certificate {later[0]} "
                f"of {certificatePath}, not of the first: the server's own certificate must come "
                f"first, then its chain"
            )
        raise ConfigurationError(
            f"unusable TLS certificate/key pair: {keyPath} is not the key of {certificatePath}"
        )
    try:
        # The key was checked above to need no passphrase; the callable
        # keeps OpenSSL from ever asking for one on a terminal.
        context.load_cert_chain(certificatePath, keyPath, password=_noPassphrase)
    except ssl.SSLError as e:
        raise ConfigurationError(f"unusable TLS certificate/key pair: {e}") from None
    except OSError as e:
        raise ConfigurationError(f"cannot read TLS certificate or key: {e}") from None
    return keyPEM


def _publicBytes(publicKey):
    return publicKey.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _noPassphrase():
    raise ConfigurationError("the TLS private key must not need a passphrase")


def certificateNames(leaf):
    """
    The host names a certificate is for, in lower case: its
    subjectAltName's DNS names, or its common name where it has none.
    """
    try:
        names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = names.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        names = []
    if not names:
        common = leaf.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        names = [common[0].value] if common else []
    return [name.lower().rstrip(".") for name in names]


def _checkSameNames(names, alternativeLeaf, alternativePath, certificatePath):
    """
    Refuse an alternative certificate for a host name that does not list
    every name of the certificate it goes beside: a client given it for
    one of those names would find the name missing.
    """
    missing = sorted(set(names) - set(certificateNames(alternativeLeaf)))
    if missing:
        raise ConfigurationError(
            f"{alternativePath}: the alternative certificate does not name {', '.join(missing)}, "
            f"which {certificatePath} names"
        )


class _ByName:
    """
    The SNI callback choosing a connection's context by the host name its
    client asked for: a name a certificate lists, else a wildcard one
    level up, else the main context (left as it is).

    @ivar exact: host name to context.
    @ivar wildcard: parent domain (C{example.net} for C{*.example.net}) to
        context.
    """

    def __init__(self):
        self.exact = {}
        self.wildcard = {}

    def add(self, names, context, certificatePath):
        """
        Serve C{names} with C{context}.

        @raise ConfigurationError: a name another certificate serves.
        """
        for name in names:
            table, key = (self.wildcard, name[2:]) if name.startswith("*.") else (self.exact, name)
            if key in table:
                raise ConfigurationError(
                    f"{certificatePath}: {name} is named by another certificate too ({table[key][1]})"
                )
            table[key] = (context, certificatePath)

    def __call__(self, connection, serverName, context):
        if not serverName:
            return None
        name = serverName.lower().rstrip(".")
        found = self.exact.get(name)
        if found is None:
            parent = name.partition(".")[2]
            found = self.wildcard.get(parent) if parent else None
        if found is not None:
            connection.context = found[0]
        return None


class ServerTLS:
    """
    The server side of TLS, from a PEM certificate (optionally followed by
    its chain) and a PEM private key, and optionally an alternative pair
    whose key is of another type, and further pairs for other host names
    (see the module's docstring).

    @ivar certificatePath: the certificate (and chain) file.
    @ivar keyPath: the private key file.
    @ivar alternative: C{(certificatePath, keyPath)} of the alternative
        certificate, or C{None}.
    @ivar named: C{(certificatePath, keyPath)} of each certificate served
        to clients asking for a host name it lists, followed by
        C{altCertificatePath, altKeyPath} where an alternative certificate
        goes beside it.
    @ivar minimumVersion: the oldest TLS version accepted (C{"1.2"} or
        C{"1.3"}), kept across reloads.
    @ivar ciphers: the OpenSSL cipher list of TLS 1.2's suites, kept
        across reloads.
    @ivar subject: the certificate's common name, for logs.
    @ivar fingerprint: the certificate's SHA-256 fingerprint, colon-separated hex.
    @ivar certificates: for each certificate loaded, the main one first,
        its key's type, common name and fingerprint (for logs).
    @ivar chainCertificates: the same of each certificate that follows
        one of them in its file (its chain), for L{expiryWarnings}.
    @ivar keyWarnings: the warnings of L{keyFileWarning} for the keys.
    @ivar chainWarnings: the warnings of L{chainWarning} for the
        certificate files.
    """

    log = Logger()

    def __init__(self, certificatePath, keyPath, alternative=None, minimumVersion="1.2", named=(), ciphers=CIPHERS):
        if minimumVersion not in MINIMUM_VERSIONS:
            raise ConfigurationError(
                f"TLS minimum version must be one of {', '.join(MINIMUM_VERSIONS)}, not {minimumVersion!r}"
            )
        self.certificatePath = certificatePath
        self.keyPath = keyPath
        self.alternative = tuple(alternative) if alternative is not None else None
        self.named = [tuple(pair) for pair in named]
        self.minimumVersion = minimumVersion
        self.ciphers = ciphers
        self._context = None
        self.reload()

    def reload(self):
        """
        Load the certificates and keys again.  If the new files are
        unusable the previous certificates stay in service and the error
        is raised.

        @raise ConfigurationError: the files cannot be read, parsed, do
            not belong together, the alternative key is of the main
            key's type, or two named certificates name one host.
        """
        context, leaves, chainWarnings, pems, chained = makeContext(
            self.certificatePath, self.keyPath, self.alternative, self.minimumVersion, self.ciphers
        )
        if self.named:
            byName = _ByName()
            for certificatePath, keyPath, *alternative in self.named:
                namedContext, namedLeaves, namedWarnings, _, namedChained = makeContext(
                    certificatePath, keyPath, alternative or None, self.minimumVersion, self.ciphers
                )
                names = certificateNames(namedLeaves[0])
                if alternative:
                    _checkSameNames(names, namedLeaves[1], alternative[0], certificatePath)
                byName.add(names, namedContext, certificatePath)
                leaves += namedLeaves
                chainWarnings += namedWarnings
                chained += namedChained
            context.sni_callback = byName
        self._context = context
        self._pems = pems
        self.certificates = [_summary(leaf) for leaf in leaves]
        self.chainCertificates = [_summary(issuer, str(path)) for path, issuer in chained]
        self.subject = self.certificates[0].subject
        self.fingerprint = self.certificates[0].fingerprint
        keys = [self.keyPath] + ([self.alternative[1]] if self.alternative is not None else [])
        keys += [key for named in self.named for key in named[1::2]]
        self.keyWarnings = [w for w in map(keyFileWarning, keys) if w]
        self.chainWarnings = chainWarnings

    def adopt(self, other):
        """
        Serve what C{other}, a L{ServerTLS} made from a configuration read
        again (another C{tls-cert} file, another C{tls-min-version}...),
        loaded, and from now on reload its files with its settings.

        It is this object, not a new one, that changes: the listeners and
        the sessions' factories hold it, and each new connection is made
        from its context (established sessions keep theirs).
        """
        vars(self).update(vars(other))

    def describe(self):
        """
        The certificates in service, for a log line: each one's key type,
        common name and SHA-256 fingerprint.
        """
        return "; ".join(
            f"{c.keyType} {c.subject} sha256 {c.fingerprint} valid until {c.notAfter:%Y-%m-%d}"
            for c in self.certificates
        )

    def expiryWarnings(self, now=None):
        """
        The warnings of L{CertificateSummary.expiryWarning} for the
        certificates in service and the chains served with them.

        Why the chains too: a client that verifies the server's
        certificate through an intermediate the server sends refuses it
        once that intermediate has expired, however long the server's own
        certificate has left.  A chain file kept from before the CA issued
        its intermediate again (same name and key, a later end: the
        L{chainWarning} check passes it) does just that, as the expired
        AddTrust cross-certificate many servers still sent did in 2020.
        """
        now = now or datetime.datetime.now(datetime.timezone.utc)
        summaries = self.certificates + self.chainCertificates
        return [w for w in (c.expiryWarning(now) for c in summaries) if w]

    @property
    def context(self):
        """
        The current C{ssl.SSLContext}: each new TLS connection is made from
        it (L{mailgate.session.tlslayer}).
        """
        return self._context

    def ticketKeyRenewalProblem(self):
        """
        Why L{renewTicketKey} cannot work in this process, or C{None}
        (L{inMemoryFilesProblem}).
        """
        return inMemoryFilesProblem()

    def renewTicketKey(self):
        """
        Make new connections from a new context, made of the certificates
        and keys in service as they were read (L{remakeContext}), with the
        same choice of certificate by host name: a context of its own is a
        session ticket key of its own (see the module's docstring).

        Only the main context is made again: OpenSSL seals and opens the
        tickets of a connection whose SNI callback chose a named
        certificate's context with the key of the context the connection
        was made from, the main one.  Established connections keep the
        context they were made from, and with it the previous key, until
        they end.

        @raise OSError: the contents cannot be handed to OpenSSL.
        @raise ssl.SSLError: OpenSSL refuses them.
        """
        context = remakeContext(self._pems, self.minimumVersion, self.ciphers)
        context.sni_callback = self._context.sni_callback
        self._context = context


#: seconds a session ticket key is used (C{tls-ticket-key-rotation}):
#: Postfix's tlsmgr makes a new one as often by default (its session cache
#: timeout); OpenSSL's tickets last two hours at most anyway
TICKET_KEY_ROTATION = 3600


class TicketKeyRotation(Service):
    """
    Every C{interval} seconds, a new session ticket key for new TLS
    connections (L{ServerTLS.renewTicketKey}).  A reload of the
    certificates (SIGHUP) makes one too, between two of these.

    @param tls: the L{ServerTLS}.
    @param clock: the reactor.
    @param interval: seconds between two keys.
    """

    log = Logger()

    def __init__(self, tls, clock, interval=TICKET_KEY_ROTATION):
        self.tls = tls
        self.clock = clock
        self.interval = interval
        self._loop = None

    def startService(self):
        super().startService()
        problem = self.tls.ticketKeyRenewalProblem()
        if problem is not None:
            # Once, rather than an error line every interval for a
            # failure no retry mends.
            self.log.warn(
                "TLS session ticket keys cannot be renewed here ({problem}): a key is replaced only when "
                "the certificates are reloaded (SIGHUP) or mailgate restarts; give mailgate /proc and "
                "memfd_create for --tls-ticket-key-rotation to work",
                problem=problem,
                event="tls.ticket_key_rotation_unavailable",
            )
            return
        self._loop = LoopingCall(self.renew)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=False)

    def stopService(self):
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        return super().stopService()

    def setInterval(self, interval):
        """
        A new key every C{interval} seconds from now on (a reload): the
        next comes C{interval} seconds from now, not at the end of the
        period under way.
        """
        self.interval = interval
        if self._loop is not None and self._loop.running:
            self._loop.stop()
            self._loop = LoopingCall(self.renew)
            self._loop.clock = self.clock
            self._loop.start(interval, now=False)

    def renew(self):
        """
        Renew the key; should that fail, say so and keep the key in use
        until the next time.  Whatever the failure: one escaping here
        would end the looping call, and every renewal after it.
        """
        try:
            self.tls.renewTicketKey()
        except Exception as e:
            self.log.error(
                "TLS session ticket key not renewed, the current one stays in use until the next try: {error}",
                error=str(e) or e.__class__.__name__,
                event="tls.ticket_key_failed",
            )


def keyFileWarning(path):
    """
    What to warn of, if anything, in the permissions of a private key
    file: every user of the machine may read it (whoever holds it can
    impersonate the server and, with a non-forward-secret suite, read
    recorded sessions), or others than its owner may replace it.  A key
    its group may read is left alone: Debian's C{ssl-cert} group is the
    usual way to share one key between servers.
    """
    permissions = permissionsOf(path)
    if permissions is None:
        return None
    if permissions & 0o004:
        return (
            f"the TLS private key {path} is readable by every user (mode {permissions:04o}): "
            f"chmod o-rwx it"
        )
    if permissions & 0o022:
        return (
            f"the TLS private key {path} may be replaced by others than its owner "
            f"(mode {permissions:04o}): chmod go-w it"
        )
    return None


@attr.s(frozen=True, auto_attribs=True)
class CertificateSummary:
    """
    What a log says of a certificate in service.
    """

    keyType: str
    subject: str
    fingerprint: str
    notAfter: datetime.datetime = None
    notBefore: datetime.datetime = None
    #: the file whose chain it is in (it follows the server's certificate
    #: there), or C{None} for a server's certificate
    chainOf: str = None

    def expiryWarning(self, now):
        """
        What to warn of, if anything, at C{now} (an aware datetime): that
        the certificate is not valid yet or has expired (clients refuse
        it either way), or will expire within L{EXPIRY_WARNING_DAYS} days.

        A certificate not valid yet was issued to start later, or this
        machine's clock is behind: in the latter case clients, whose
        clocks are right, accept it, so it is said as a possibility.

        A certificate of a chain is said as one: clients refuse the
        server's certificate they verify through it.
        """
        if self.chainOf is None:
            what, refused = f"the TLS certificate {self.subject} ({self.keyType})", "clients refuse it"
        else:
            what = f"{self.chainOf}: the certificate {self.subject} in its chain"
            refused = "clients that verify the server's certificate through it refuse that"
        if self.notBefore is not None and now < self.notBefore:
            return (
                f"{what} is not valid before {self.notBefore:%Y-%m-%d %H:%M} UTC: {refused} until then, "
                f"unless this machine's clock is behind theirs"
            )
        if self.notAfter is None:
            return None
        if self.notAfter <= now:
            if self.chainOf is None:
                return f"{what} expired on {self.notAfter:%Y-%m-%d %H:%M} UTC"
            return (
                f"{what} expired on {self.notAfter:%Y-%m-%d %H:%M} UTC: {refused}; give the chain "
                f"your CA sends now (certbot's fullchain.pem)"
            )
        left = self.notAfter - now
        if left < datetime.timedelta(days=EXPIRY_WARNING_DAYS):
            return f"{what} expires in {counted(left.days, 'day')}, on {self.notAfter:%Y-%m-%d %H:%M} UTC"
        return None


#: days before a certificate's end that its start-up and reload lines
#: warn of it
EXPIRY_WARNING_DAYS = 14


def _summary(certificate, chainOf=None):
    return CertificateSummary(
        keyType(certificate.public_key()), _commonName(certificate), _fingerprint(certificate),
        certificate.not_valid_after_utc, certificate.not_valid_before_utc, chainOf,
    )


def _commonName(leaf):
    names = leaf.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return names[0].value if names else leaf.subject.rfc4514_string()


def _fingerprint(leaf):
    return ":".join(f"{b:02X}" for b in leaf.fingerprint(hashes.SHA256()))
