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

from OpenSSL import SSL, crypto
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator, ISSLTransport
from twisted.internet.ssl import CertificateOptions, TLSVersion
from twisted.logger import Logger
from zope.interface import implementer

from mailgate.errors import ConfigurationError


def isSecure(transport):
    """
    Whether C{transport} is TLS-protected (implicit TLS, or after STLS or
    STARTTLS).
    """
    return ISSLTransport.providedBy(transport) or bool(getattr(transport, "TLS", False))


def _loadPEM(certificatePath, keyPath):
    try:
        with open(certificatePath, "rb") as f:
            chainPEM = f.read()
        with open(keyPath, "rb") as f:
            keyPEM = f.read()
    except OSError as e:
        raise ConfigurationError(f"cannot read TLS certificate or key: {e}") from None
    certificates = []
    marker = b"-----BEGIN CERTIFICATE-----"
    for part in chainPEM.split(marker)[1:]:
        try:
            certificates.append(crypto.load_certificate(crypto.FILETYPE_PEM, marker + part))
        except crypto.Error as e:
            raise ConfigurationError(f"{certificatePath}: invalid certificate: {e}") from None
    if not certificates:
        raise ConfigurationError(f"{certificatePath}: no PEM certificate found")
    try:
        key = crypto.load_privatekey(crypto.FILETYPE_PEM, keyPEM)
    except crypto.Error as e:
        raise ConfigurationError(f"{keyPath}: invalid private key: {e}") from None
    return certificates[0], certificates[1:], key


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """
    The server side of TLS, from a PEM certificate (optionally followed by
    its chain) and a PEM private key.

    @ivar certificatePath: the certificate (and chain) file.
    @ivar keyPath: the private key file.
    """

    log = Logger()

    def __init__(self, certificatePath, keyPath):
        self.certificatePath = certificatePath
        self.keyPath = keyPath
        self._options = None
        self.reload()

    def reload(self):
        """
        Load the certificate and key again.  If the new files are unusable
        the previous certificate stays in service and the error is raised.

        @raise ConfigurationError: the files cannot be read, parsed, or do
            not belong together.
        """
        certificate, chain, key = _loadPEM(self.certificatePath, self.keyPath)
        try:
            options = CertificateOptions(
                privateKey=key,
                certificate=certificate,
                extraCertChain=chain,
                raiseMinimumTo=TLSVersion.TLSv1_2,
            )
            options.getContext()  # checks that the key matches the certificate
        except (SSL.Error, ValueError) as e:
            raise ConfigurationError(f"unusable TLS certificate/key pair: {e}") from None
        self._options = options
        self.subject = certificate.get_subject().CN
        self.fingerprint = certificate.digest("sha256").decode("ascii")

    def serverConnectionForTLS(self, tlsProtocol):
        return SSL.Connection(self._options.getContext(), None)

    def getContext(self):
        """
        The current OpenSSL context, for APIs that want a context factory.
        """
        return self._options.getContext()
