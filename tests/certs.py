"""
Test certificates, made on the fly with C{cryptography}: no fixtures on
disk, nothing that expires in the repository.

    from certs import makeCertificate   # tests/ is on sys.path, like e2e

    certificatePath, keyPath = makeCertificate(tmp_path, "mail.example.test")
    tls = ServerTLS(certificatePath, keyPath)

Every certificate names its C{commonName} as a DNS subjectAltName and
127.0.0.1 as an IP subjectAltName, so a client verifying the host name
accepts it when connecting to C{commonName} or to the loopback address.  A
self-signed certificate is its own trust anchor: pass the certificate path
as the client's CA file.

L{makeChain} makes a leaf certificate issued by a small CA, with a chain
file (leaf followed by the CA certificates) as servers are usually given,
and the root certificate separately for the client to trust.

This module holds no tests; the TLS, SASL and end-to-end tests import it.
"""

import datetime
import hashlib
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

LOOPBACK_IP = ipaddress.ip_address("127.0.0.1")


class Authority:
    """
    A certificate authority able to issue certificates.

    @ivar certificate: its L{x509.Certificate}.
    @ivar key: its private key.
    @ivar path: where its PEM certificate was written.
    """

    def __init__(self, certificate, key, path):
        self.certificate = certificate
        self.key = key
        self.path = path

    @property
    def pem(self):
        return self.certificate.public_bytes(serialization.Encoding.PEM)


def _name(commonName):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, commonName)])


def _newKey(keyType="ec"):
    if keyType == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(ec.SECP256R1())


def _keyPEM(key):
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _builder(commonName, publicKey, issuerName, days):
    now = datetime.datetime.now(datetime.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(commonName))
        .issuer_name(issuerName)
        .public_key(publicKey)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
    )


def _leaf(commonName, key, issuerName, issuerKey, days):
    builder = _builder(commonName, key.public_key(), issuerName, days)
    builder = builder.add_extension(
        x509.SubjectAlternativeName([x509.DNSName(commonName), x509.IPAddress(LOOPBACK_IP)]),
        critical=False,
    )
    builder = builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    builder = builder.add_extension(
        x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
            encipher_only=False, decipher_only=False,
        ),
        critical=True,
    )
    builder = builder.add_extension(
        x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
    )
    builder = builder.add_extension(
        x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
    )
    builder = builder.add_extension(
        x509.AuthorityKeyIdentifier.from_issuer_public_key(issuerKey.public_key()), critical=False
    )
    return builder.sign(issuerKey, hashes.SHA256())


def _write(path, data):
    path = Path(path)
    path.write_bytes(data)
    return path


def makeCertificate(directory, commonName="localhost", name=None, days=30, issuer=None, keyType="ec"):
    """
    Write a certificate and its private key as PEM files: an EC (P-256)
    key, or with C{keyType="rsa"} an RSA 2048 one.

    @param directory: where to write them.
    @param commonName: the subject CN and DNS subjectAltName (127.0.0.1 is
        always added as an IP subjectAltName).
    @param name: the file name stem; C{commonName} by default.  Give a new
        one to keep earlier files, or the same one to overwrite them (for
        reload tests).
    @param days: validity from now.
    @param issuer: an L{Authority} to sign with; self-signed by default.
    @param keyType: C{"ec"} or C{"rsa"}.
    @return: C{(certificatePath, keyPath)} as L{Path}s.
    """
    directory = Path(directory)
    stem = name or commonName
    key = _newKey(keyType)
    if issuer is None:
        certificate = _leaf(commonName, key, _name(commonName), key, days)
    else:
        certificate = _leaf(commonName, key, issuer.certificate.subject, issuer.key, days)
    certificatePath = _write(
        directory / f"{stem}.crt", certificate.public_bytes(serialization.Encoding.PEM)
    )
    keyPath = _write(directory / f"{stem}.key", _keyPEM(key))
    # As a key should be kept: mailgate warns of one every user may read.
    keyPath.chmod(0o600)
    return certificatePath, keyPath


def makeAuthority(directory, commonName="mailgate test CA", issuer=None, days=30):
    """
    A CA certificate (self-signed, or issued by C{issuer} for an
    intermediate), written to C{directory/<commonName>.ca.crt}.

    @return: an L{Authority}.
    """
    key = _newKey()
    issuerName = _name(commonName) if issuer is None else issuer.certificate.subject
    issuerKey = key if issuer is None else issuer.key
    builder = _builder(commonName, key.public_key(), issuerName, days)
    builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    builder = builder.add_extension(
        x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False,
        ),
        critical=True,
    )
    builder = builder.add_extension(
        x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
    )
    builder = builder.add_extension(
        x509.AuthorityKeyIdentifier.from_issuer_public_key(issuerKey.public_key()), critical=False
    )
    certificate = builder.sign(issuerKey, hashes.SHA256())
    stem = commonName.replace(" ", "-")
    path = _write(Path(directory) / f"{stem}.ca.crt", certificate.public_bytes(serialization.Encoding.PEM))
    return Authority(certificate, key, path)


def makeChain(directory, commonName="localhost", intermediate=False, days=30):
    """
    A leaf certificate issued by a small CA, as a chain file.

    @param intermediate: issue the leaf from an intermediate CA (itself
        issued by the root), so that a client trusting only the root can
        verify the leaf only if the server sends the chain.
    @return: C{(chainPath, keyPath, rootPath)}: the chain file holds the
        leaf followed by the issuing CA (the intermediate, if any, else the
        root); the client should trust C{rootPath}.
    """
    directory = Path(directory)
    root = makeAuthority(directory, f"{commonName} root CA", days=days)
    issuer = root
    if intermediate:
        issuer = makeAuthority(directory, f"{commonName} intermediate CA", issuer=root, days=days)
    leafPath, keyPath = makeCertificate(directory, commonName, name=f"{commonName}.leaf", days=days, issuer=issuer)
    chainPath = _write(directory / f"{commonName}.chain.crt", leafPath.read_bytes() + issuer.pem)
    return chainPath, keyPath, root.path


def fingerprint(der):
    """
    The SHA-256 fingerprint of a DER certificate in the form pyOpenSSL's
    C{X509.digest("sha256")} (and so L{mailgate.tls.ServerTLS.fingerprint})
    uses: upper-case hex pairs joined by colons.
    """
    return ":".join(f"{b:02X}" for b in hashlib.sha256(der).digest())


def certificateFingerprint(path):
    """
    The fingerprint (see L{fingerprint}) of the first certificate in a PEM
    file.
    """
    certificate = x509.load_pem_x509_certificate(Path(path).read_bytes())
    return fingerprint(certificate.public_bytes(serialization.Encoding.DER))
