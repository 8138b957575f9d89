"""
The benchmarks' TLS certificate: self-signed, RSA 2048, SHA-256, for the
names C{localhost} and C{mailgate.bench.test} and the address 127.0.0.1,
valid for 30 days.  Both servers get the same certificate and key (mailgate
C{--pop3s} with C{--tls-cert}/C{--tls-key}, Dovecot C{ssl_cert}/C{ssl_key}).

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


def makeCertificate(directory):
    """
    Write C{bench-cert.pem} and C{bench-key.pem} into C{directory} (made if
    needed); return their paths.  Both readable by everyone (Dovecot's
    master reads them as root, but the benchmarks' own files need no
    secrecy).
    """
    os.makedirs(directory, exist_ok=True)
    certificate = os.path.join(directory, "bench-cert.pem")
    key = os.path.join(directory, "bench-key.pem")
    try:
        certPEM, keyPEM = _withCryptography()
    except ImportError:
        certPEM, keyPEM = _withOpenSSL(directory)
    with open(certificate, "wb") as f:
        f.write(certPEM)
    with open(key, "wb") as f:
        f.write(keyPEM)
    os.chmod(certificate, 0o644)
    os.chmod(key, 0o644)
    return certificate, key


def _withCryptography():
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

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


def _withOpenSSL(directory):
    openssl = shutil.which("openssl")
    if openssl is None:
        raise RuntimeError("neither the cryptography package nor the openssl command is available")
    cert = os.path.join(directory, ".openssl-cert.pem")
    key = os.path.join(directory, ".openssl-key.pem")
    san = ",".join([f"DNS:{n}" for n in NAMES] + ["IP:127.0.0.1"])
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", f"rsa:{KEY_BITS}", "-sha256", "-nodes", "-days", "30",
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
