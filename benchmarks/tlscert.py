"""
The benchmarks' TLS certificates: self-signed, SHA-256, for the names
C{localhost} and C{mailgate.bench.test} and the address 127.0.0.1, valid
for 30 days; an RSA 2048 one, and with C{keyType="ecdsa"} an ECDSA P-256
one.  Both servers get the same certificates and keys (mailgate
C{--pop3s} with C{--tls-cert}/C{--tls-key}, and C{--tls-alt-cert}/
C{--tls-alt-key} for the second; Dovecot C{ssl_cert}/C{ssl_key}, and
C{ssl_alt_cert}/C{ssl_alt_key}).

Made with the C{cryptography} package (installed with Twisted's TLS
extra); without it, with the C{openssl} command.

    python benchmarks/tlscert.py DIRECTORY     # writes bench-cert.pem, bench-key.pem
"""

import datetime
import ipaddress
import os
import shutil
import subprocess
import sys

NAMES = ("localhost", "mailgate.bench.test")
KEY_BITS = 2048
KEY_TYPES = ("rsa", "ecdsa")
#: What --tls-certificates may name: the RSA certificate alone, or with an
#: ECDSA one beside it (which clients that accept ECDSA are given).
CERTIFICATE_CHOICES = ("rsa", "rsa+ecdsa")


def makeCertificate(directory, keyType="rsa"):
    """
    Write C{bench-cert.pem} and C{bench-key.pem} (RSA), or
    C{bench-ecdsa-cert.pem} and C{bench-ecdsa-key.pem}, into C{directory}
    (made if needed); return their paths.  Both readable by everyone
    (Dovecot's master reads them as root, but the benchmarks' own files
    need no secrecy).

    @param keyType: C{"rsa"} (2048 bits) or C{"ecdsa"} (P-256).
    """
    if keyType not in KEY_TYPES:
        raise ValueError(f"key type {keyType!r}: one of {', '.join(KEY_TYPES)}")
    os.makedirs(directory, exist_ok=True)
    stem = "bench" if keyType == "rsa" else f"bench-{keyType}"
    certificate = os.path.join(directory, f"{stem}-cert.pem")
    key = os.path.join(directory, f"{stem}-key.pem")
    try:
        certPEM, keyPEM = _withCryptography(keyType)
    except ImportError:
        certPEM, keyPEM = _withOpenSSL(directory, keyType)
    with open(certificate, "wb") as f:
        f.write(certPEM)
    with open(key, "wb") as f:
        f.write(keyPEM)
    os.chmod(certificate, 0o644)
    os.chmod(key, 0o644)
    return certificate, key


def makeCertificates(directory, kinds):
    """
    The certificates both servers get, from C{--tls-certificates}:
    C{"rsa"}, C{(certificate, key)}; C{"rsa+ecdsa"}, the RSA pair then the
    ECDSA pair as the alternative, C{(certificate, key, altCertificate,
    altKey)}.
    """
    if kinds not in CERTIFICATE_CHOICES:
        raise ValueError(f"certificates {kinds!r}: one of {', '.join(CERTIFICATE_CHOICES)}")
    paths = ()
    for keyType in kinds.split("+"):
        paths += makeCertificate(directory, keyType)
    return paths


def _withCryptography(keyType):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.x509.oid import NameOID

    if keyType == "ecdsa":
        privateKey = ec.generate_private_key(ec.SECP256R1())
    else:
        privateKey = rsa.generate_private_key(public_exponent=65537, key_size=KEY_BITS)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, NAMES[0])])
    now = datetime.datetime.now(datetime.timezone.utc)
    altNames = [x509.DNSName(n) for n in NAMES] + [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(privateKey.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName(altNames), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(privateKey, hashes.SHA256())
    )
    return (
        certificate.public_bytes(serialization.Encoding.PEM),
        privateKey.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    )


def _withOpenSSL(directory, keyType):
    openssl = shutil.which("openssl")
    if openssl is None:
        raise RuntimeError("neither the cryptography package nor the openssl command is available")
    cert = os.path.join(directory, ".openssl-cert.pem")
    key = os.path.join(directory, ".openssl-key.pem")
    san = ",".join([f"DNS:{n}" for n in NAMES] + ["IP:127.0.0.1"])
    if keyType == "ecdsa":
        newKey = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"]
    else:
        newKey = ["-newkey", f"rsa:{KEY_BITS}"]
    subprocess.run(
        [openssl, "req", "-x509", *newKey, "-sha256", "-nodes", "-days", "30",
         "-subj", f"/CN={NAMES[0]}", "-addext", f"subjectAltName={san}", "-keyout", key, "-out", cert],
        check=True, capture_output=True, timeout=60,
    )
    with open(cert, "rb") as f:
        certPEM = f.read()
    with open(key, "rb") as f:
        keyPEM = f.read()
    os.unlink(cert)
    os.unlink(key)
    return certPEM, keyPEM


if __name__ == "__main__":
    print("\n".join(makeCertificate(sys.argv[1] if len(sys.argv) > 1 else ".")))
