# -*- test-case-name: tests.test_tls -*-
"""
TLS for every listener: one server certificate, reloadable at run time.

L{ServerTLS} is what STLS, STARTTLS and the implicit-TLS listeners hand to
Twisted.  It builds each new TLS connection from the certificate it loaded
last, so L{ServerTLS.reload} (run on SIGHUP) makes a renewed certificate
take effect for new connections while established sessions carry on.

Defaults (Twisted's L{CertificateOptions}, made explicit where it matters):
TLS 1.2 at least, no TLS compression, the server's cipher preference,
Twisted's default cipher list (forward-secret AEAD suites first).
"""

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator, ISSLTransport
from twisted.logger import Logger
from zope.interface import implementer

from mailgate.errors import ConfigurationError

# Forward-secret suites first, AEAD before CBC; no NULL, MD5 or DSS (the
# list Twisted uses by default).  TLS 1.3 suites are OpenSSL's defaults.
CIPHERS = (
    "ECDH+AESGCM:ECDH+CHACHA20:DH+AESGCM:DH+CHACHA20:ECDH+AES256:DH+AES256:"
    "ECDH+AES128:DH+AES:RSA+AESGCM:RSA+AES:!aNULL:!MD5:!DSS"
)
OPTIONS = (
    SSL.OP_NO_SSLv2
    | SSL.OP_NO_SSLv3
    | SSL.OP_NO_TLSv1
    | SSL.OP_NO_TLSv1_1
    | SSL.OP_NO_COMPRESSION
    | SSL.OP_CIPHER_SERVER_PREFERENCE
    | SSL.OP_SINGLE_DH_USE
    | SSL.OP_SINGLE_ECDH_USE
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
    An OpenSSL server context: the certificate (and the chain after it in
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
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    context.set_min_proto_version(SSL.TLS1_2_VERSION)
    context.set_options(OPTIONS)
    context.set_cipher_list(CIPHERS.encode("ascii"))
    try:
        context.use_certificate_chain_file(certificatePath)
    except SSL.Error as e:
        raise ConfigurationError(f"{certificatePath}: invalid certificate: {e}") from None
    try:
        context.use_privatekey_file(keyPath)
        context.check_privatekey()
    except SSL.Error as e:
        raise ConfigurationError(f"unusable TLS certificate/key pair: {e}") from None
    return context, leaf


@implementer(IOpenSSLServerConnectionCreator)
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

    def serverConnectionForTLS(self, tlsProtocol):
        return SSL.Connection(self._context, None)

    def getContext(self):
        """
        The current OpenSSL context, for APIs that want a context factory.
        """
        return self._context
