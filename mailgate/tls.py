# -*- test-case-name: tests.test_tls -*-
"""
TLS for every listener: one server certificate, reloadable at run time.

L{ServerTLS} is what STLS, STARTTLS and the implicit-TLS listeners start
TLS with (L{mailgate.session.tlslayer}).  Each new TLS connection is made
from the certificate it loaded last, so L{ServerTLS.reload} (run on
SIGHUP) makes a renewed certificate take effect for new connections while
established sessions carry on.

The context is Python's C{ssl.SSLContext}.  Settings: TLS 1.2 at least, no TLS compression, no renegotiation, the
server's cipher preference, forward-secret AEAD suites first (TLS 1.3
suites are OpenSSL's defaults).
"""

import ssl

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from twisted.internet.interfaces import ISSLTransport
from twisted.logger import Logger

from mailgate.errors import ConfigurationError

# Forward-secret suites first, AEAD before CBC; no NULL, MD5 or DSS.
CIPHERS = (
    "ECDH+AESGCM:ECDH+CHACHA20:DH+AESGCM:DH+CHACHA20:ECDH+AES256:DH+AES256:"
    "ECDH+AES128:DH+AES:RSA+AESGCM:RSA+AES:!aNULL:!MD5:!DSS"
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
    STARTTLS).
    """
    return ISSLTransport.providedBy(transport) or bool(getattr(transport, "TLS", False))


def _read(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ConfigurationError(f"cannot read TLS certificate or key: {e}") from None


def makeContext(certificatePath, keyPath):
    """
    A server C{ssl.SSLContext}: the certificate (and the chain after it in
    the same file), the key, and the settings above.

    @return: the context and the leaf certificate (a C{cryptography}
        certificate, for logging its name and fingerprint).
    @raise ConfigurationError: if the files cannot be used.
    """
    chainPEM = _read(certificatePath)
    keyPEM = _read(keyPath)
    if b"-----BEGIN CERTIFICATE-----" not in chainPEM:
        raise ConfigurationError(f"{certificatePath}: no PEM certificate found")
    try:
        leaf = x509.load_pem_x509_certificates(chainPEM)[0]
    except ValueError as e:
        raise ConfigurationError(f"{certificatePath}: invalid certificate: {e}") from None
    try:
        serialization.load_pem_private_key(keyPEM, password=None)
    except (ValueError, TypeError) as e:
        raise ConfigurationError(f"{keyPath}: invalid private key: {e}") from None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= OPTIONS
    context.set_ciphers(CIPHERS)
    try:
        # The key was checked above to need no passphrase; the callable
        # keeps OpenSSL from ever asking for one on a terminal.
        context.load_cert_chain(certificatePath, keyPath, password=_noPassphrase)
    except ssl.SSLError as e:
        raise ConfigurationError(f"unusable TLS certificate/key pair: {e}") from None
    except OSError as e:
        raise ConfigurationError(f"cannot read TLS certificate or key: {e}") from None
    return context, leaf


def _noPassphrase():
    raise ConfigurationError("the TLS private key must not need a passphrase")


class ServerTLS:
    """
    The server side of TLS, from a PEM certificate (optionally followed by
    its chain) and a PEM private key.

    @ivar certificatePath: the certificate (and chain) file.
    @ivar keyPath: the private key file.
    @ivar subject: the certificate's common name, for logs.
    @ivar fingerprint: the certificate's SHA-256 fingerprint, colon-separated hex.
    """

    log = Logger()

    def __init__(self, certificatePath, keyPath):
        self.certificatePath = certificatePath
        self.keyPath = keyPath
        self._context = None
        self.reload()

    def reload(self):
        """
        Load the certificate and key again.  If the new files are unusable
        the previous certificate stays in service and the error is raised.

        @raise ConfigurationError: the files cannot be read, parsed, or do
            not belong together.
        """
        context, leaf = makeContext(self.certificatePath, self.keyPath)
        self._context = context
        names = leaf.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        self.subject = names[0].value if names else leaf.subject.rfc4514_string()
        self.fingerprint = ":".join(f"{b:02X}" for b in leaf.fingerprint(hashes.SHA256()))

    @property
    def context(self):
        """
        The current C{ssl.SSLContext}: each new TLS connection is made from
        it (L{mailgate.session.tlslayer}).
        """
        return self._context
