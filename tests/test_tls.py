"""
L{mailgate.tls.ServerTLS} and the service's TLS configuration, without
sockets: handshakes run in memory, the server side being what mailgate's
TLS layer makes of L{ServerTLS.context} and the client side Python's C{ssl}
module, both over memory BIOs, so what is checked is what a real client
negotiates.
"""

import datetime
import ssl

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import Logger, LogLevel, formatEvent

from mailgate.errors import ConfigurationError
from mailgate.service import MailgateConfig, MailgateService, makeService, makeTLS
from mailgate.tls import ServerTLS, TicketKeyRotation

from certs import certificateFingerprint, fingerprint, makeAuthority, makeCertificate, makeChain

HOST = "mail.example.test"


class Handshake:
    """
    The outcome of an in-memory handshake.

    @ivar ok: both sides completed the handshake.
    @ivar clientError: the C{ssl.SSLError} the client raised, if any.
    @ivar serverError: the C{ssl.SSLError} the server raised, if any.
    @ivar version: the negotiated protocol (C{"TLSv1.3"}...), if completed.
    @ivar peerCertificate: the server certificate (DER) the client saw.
    @ivar client: the client's C{ssl.SSLObject}.
    @ivar serverLastFlight: what the server sent after its side of the
        handshake completed (in TLS 1.3, its session tickets).
    """

    ok = False
    clientError = None
    serverError = None
    version = None
    peerCertificate = None
    client = None
    serverLastFlight = b""


def clientContext(cafile, minimum=None, maximum=None, legacy=False):
    """
    A verifying client context trusting C{cafile}, limited to the given
    protocol versions.  C{legacy} lowers OpenSSL's security level so the
    client itself is able to speak TLS 1.0/1.1 (OpenSSL 3 refuses them at
    the default level).
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile=str(cafile))
    if legacy:
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
    if minimum is not None:
        context.minimum_version = minimum
    if maximum is not None:
        context.maximum_version = maximum
    return context


class Server:
    """
    The server side of an in-memory handshake: an C{ssl.SSLObject} made
    from a context as L{mailgate.session.tlslayer.TLSLayer} makes it.
    """

    def __init__(self, context):
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_side=True)


def handshake(server, context, hostname=HOST, rounds=20, session=None):
    """
    Run a TLS handshake between C{server} (a L{Server}, or a server
    C{ssl.SSLContext} to make one from) and a client from C{context}
    (resuming C{session} if given), moving bytes until both are done or
    one fails.
    """
    if isinstance(server, ssl.SSLContext):
        server = Server(server)
    result = Handshake()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = context.wrap_bio(incoming, outgoing, server_hostname=hostname, session=session)
    result.client = client
    clientDone = serverDone = False
    for _ in range(rounds):
        if not clientDone and result.clientError is None:
            try:
                client.do_handshake()
                clientDone = True
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError as e:
                result.clientError = e
        toServer = outgoing.read()
        if toServer:
            server.incoming.write(toServer)
        completed = False
        if not serverDone and result.serverError is None:
            try:
                server.tls.do_handshake()
                serverDone = completed = True
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError as e:
                result.serverError = e
        toClient = server.outgoing.read()
        if completed:
            result.serverLastFlight = toClient
        if toClient:
            incoming.write(toClient)
        if clientDone and serverDone:
            result.ok = True
            break
        if (result.clientError or result.serverError) and not toClient and not toServer:
            break
    else:
        raise AssertionError("handshake neither completed nor failed")
    if clientDone:
        result.version = client.version()
        result.peerCertificate = client.getpeercert(binary_form=True)
    return result


def connect(tls, cafile, **versions):
    return handshake(tls.context, clientContext(cafile, **versions))


# -- loading ---------------------------------------------------------------


def test_loadsCertificateAndKey(tls, pair):
    certificatePath, _ = pair
    assert tls.subject == HOST
    assert tls.fingerprint == certificateFingerprint(certificatePath)
    result = connect(tls, certificatePath)
    assert result.ok, (result.clientError, result.serverError)
    assert fingerprint(result.peerCertificate) == tls.fingerprint


def test_acceptsChainFile(tmp_path):
    """
    A certificate file holding the leaf and then its CA is accepted; the
    leaf is what the server presents, and a client trusting the CA
    verifies it.
    """
    chainPath, keyPath, rootPath = makeChain(tmp_path, HOST)
    assert chainPath.read_bytes().count(b"-----BEGIN CERTIFICATE-----") == 2
    tls = ServerTLS(str(chainPath), str(keyPath))
    assert tls.subject == HOST
    assert tls.fingerprint == certificateFingerprint(chainPath)
    result = connect(tls, rootPath)
    assert result.ok, (result.clientError, result.serverError)
    assert fingerprint(result.peerCertificate) == tls.fingerprint


def test_chainFileIntermediateIsSentToClients(tmp_path):
    """
    With a leaf issued by an intermediate CA, a client that trusts only the
    root can verify the server only if the server sends the intermediate
    from the chain file.
    """
    chainPath, keyPath, rootPath = makeChain(tmp_path, HOST, intermediate=True)
    result = connect(ServerTLS(str(chainPath), str(keyPath)), rootPath)
    assert result.ok, (result.clientError, result.serverError)

    # The leaf alone (no intermediate) does not verify against the root:
    # the success above is the chain's doing.
    leafOnly = tmp_path / "leaf-only.crt"
    leafOnly.write_bytes(chainPath.read_bytes().split(b"-----END CERTIFICATE-----")[0] + b"-----END CERTIFICATE-----\n")
    result = connect(ServerTLS(str(leafOnly), str(keyPath)), rootPath)
    assert not result.ok
    assert "certificate verify failed" in str(result.clientError)


def test_aChainThatDidNotIssueTheCertificateIsWarnedOf(tmp_path):
    """
    A chain file whose certificates after the first did not issue it (an
    intermediate from before a renewal) loads, but a client trusting the
    root cannot verify it: warned of, naming the file.  The right chain,
    and a file of the leaf alone (its issuer may be a trusted root), are
    not.
    """
    chainPath, keyPath, rootPath = makeChain(tmp_path, HOST, intermediate=True)
    assert ServerTLS(str(chainPath), str(keyPath)).chainWarnings == []
    leaf = chainPath.read_bytes().split(b"-----END CERTIFICATE-----")[0] + b"-----END CERTIFICATE-----\n"
    leafOnly = tmp_path / "leaf-only.crt"
    leafOnly.write_bytes(leaf)
    assert ServerTLS(str(leafOnly), str(keyPath)).chainWarnings == []
    stale = tmp_path / "stale-chain.crt"
    stale.write_bytes(leaf + makeAuthority(tmp_path, "former intermediate CA").pem)
    tls = ServerTLS(str(stale), str(keyPath))
    assert not connect(tls, rootPath).ok
    [warning] = tls.chainWarnings
    assert warning.startswith(f"{stale}: no certificate of its chain issued the first one")
    assert f"CN={HOST} intermediate CA" in warning
    # An intermediate of the right name but another key (a CA's new one).
    (tmp_path / "rekeyed").mkdir()
    stale.write_bytes(leaf + makeAuthority(tmp_path / "rekeyed", f"{HOST} intermediate CA").pem)
    assert len(ServerTLS(str(stale), str(keyPath)).chainWarnings) == 1


def test_aChainFileWithTheCertificateNotFirstIsRefusedSayingSo(tmp_path):
    """
    The server's certificate after its CA's in the file: refused, saying
    that it must come first, not only that the key is not the file's.
    """
    chainPath, keyPath, _ = makeChain(tmp_path, HOST)
    leaf, issuer = chainPath.read_bytes().split(b"-----END CERTIFICATE-----\n")[:2]
    swapped = tmp_path / "swapped.crt"
    swapped.write_bytes(issuer + b"-----END CERTIFICATE-----\n" + leaf + b"-----END CERTIFICATE-----\n")
    with pytest.raises(ConfigurationError, match="is the key of certificate 2 of .*: the server's own certificate must come first"):
        ServerTLS(str(swapped), str(keyPath))


def test_anEncryptedKeyIsRefusedSayingSo(tmp_path, pair):
    """
    A key that needs a passphrase (mailgate takes none, as Dovecot's
    ssl_key_password) is refused with how to store it unencrypted.
    """
    from cryptography.hazmat.primitives import serialization

    certificatePath, keyPath = pair
    key = serialization.load_pem_private_key(keyPath.read_bytes(), password=None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"pw")
        )
    )
    with pytest.raises(ConfigurationError) as e:
        ServerTLS(str(certificatePath), str(encrypted))
    assert str(e.value) == (
        f"{encrypted}: the private key is encrypted with a passphrase, which mailgate does not take; "
        f"store it unencrypted (openssl pkey -in ENCRYPTED -out KEY), mode 600"
    )


def test_mismatchedKeyIsRefused(tmp_path):
    certificatePath, _ = makeCertificate(tmp_path, HOST)
    _, otherKey = makeCertificate(tmp_path, "other.example.test")
    with pytest.raises(ConfigurationError) as e:
        ServerTLS(str(certificatePath), str(otherKey))
    assert "unusable TLS certificate/key pair" in str(e.value)


def test_missingCertificateFileIsRefused(tmp_path, pair):
    missing = tmp_path / "nonexistent.crt"
    with pytest.raises(ConfigurationError) as e:
        ServerTLS(str(missing), str(pair[1]))
    message = str(e.value)
    assert message.startswith("cannot read TLS certificate or key")
    assert str(missing) in message


def test_missingKeyFileIsRefused(tmp_path, pair):
    missing = tmp_path / "nonexistent.key"
    with pytest.raises(ConfigurationError) as e:
        ServerTLS(str(pair[0]), str(missing))
    assert "cannot read TLS certificate or key" in str(e.value)
    assert str(missing) in str(e.value)


def test_fileWithoutCertificateIsRefused(tmp_path, pair):
    """
    A key given as the certificate: there is no certificate in it.
    """
    _, keyPath = pair
    with pytest.raises(ConfigurationError) as e:
        ServerTLS(str(keyPath), str(keyPath))
    assert str(e.value) == f"{keyPath}: no PEM certificate found"


def test_garbageCertificatePEMIsRefused(tmp_path, pair):
    garbage = tmp_path / "garbage.crt"
    garbage.write_bytes(b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n")
    with pytest.raises(ConfigurationError) as e:
        ServerTLS(str(garbage), str(pair[1]))
    assert str(e.value).startswith(f"{garbage}: invalid certificate")


def test_garbageInChainIsRefused(tmp_path, pair):
    """
    A valid leaf followed by a broken chain certificate is refused, not
    half-loaded.
    """
    certificatePath, keyPath = pair
    broken = tmp_path / "broken-chain.crt"
    broken.write_bytes(
        certificatePath.read_bytes() + b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
    )
    with pytest.raises(ConfigurationError) as e:
        ServerTLS(str(broken), str(keyPath))
    assert str(e.value).startswith(f"{broken}: invalid certificate")


def test_garbageKeyPEMIsRefused(tmp_path, pair):
    garbage = tmp_path / "garbage.key"
    garbage.write_bytes(b"-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n")
    with pytest.raises(ConfigurationError) as e:
        ServerTLS(str(pair[0]), str(garbage))
    assert str(e.value).startswith(f"{garbage}: invalid private key")


def test_emptyKeyFileIsRefused(tmp_path, pair):
    empty = tmp_path / "empty.key"
    empty.write_bytes(b"")
    with pytest.raises(ConfigurationError) as e:
        ServerTLS(str(pair[0]), str(empty))
    assert str(e.value).startswith(f"{empty}: invalid private key")


# -- protocol settings -------------------------------------------------------


def test_contextOptions(tls):
    context = tls.context
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.maximum_version == ssl.TLSVersion.MAXIMUM_SUPPORTED
    for option in (
        ssl.OP_NO_COMPRESSION,
        ssl.OP_NO_RENEGOTIATION,
        ssl.OP_CIPHER_SERVER_PREFERENCE,
        ssl.OP_NO_SSLv3,
    ):
        assert context.options & option, option
    # TLS 1.0 and 1.1 are below the minimum version (the handshakes below
    # show them refused); no newer version is switched off.
    assert not context.options & ssl.OP_NO_TLSv1_2
    assert not context.options & ssl.OP_NO_TLSv1_3
    assert context.verify_mode == ssl.CERT_NONE  # clients show no certificate


def test_cipherSuitesAreForwardSecretAEADFirst(tls):
    """
    TLS 1.2 suites offered: ECDHE with AES-GCM or ChaCha20 first, nothing
    without authentication, forward secrecy, MD5 or DSS anywhere.
    """
    names = [c["name"] for c in tls.context.get_ciphers() if c["protocol"] == "TLSv1.2"]
    assert names, names
    assert names[0].startswith("ECDHE-") and ("GCM" in names[0] or "CHACHA20" in names[0])
    for name in names:
        assert "NULL" not in name and "MD5" not in name and "DSS" not in name, name
        assert name.startswith(("ECDHE-", "DHE-")), name


def test_aClientWithoutForwardSecrecyIsRefused(tmp_path):
    """
    RSA key exchange lets whoever gets the key later read every recorded
    session: a TLS 1.2 client offering only such suites is refused, even
    by a server with an RSA certificate; offering ECDHE as well, it gets
    in.
    """
    certificate, key = makeCertificate(tmp_path, HOST, keyType="rsa")
    tls = ServerTLS(str(certificate), str(key))
    client = clientContext(certificate, maximum=ssl.TLSVersion.TLSv1_2)
    client.set_ciphers("AES256-GCM-SHA384:AES128-GCM-SHA256:AES256-SHA256:AES128-SHA")
    refused = handshake(tls.context, client)
    assert not refused.ok and refused.serverError is not None
    client.set_ciphers("AES256-GCM-SHA384:ECDHE-RSA-AES128-GCM-SHA256")
    accepted = handshake(tls.context, client)
    assert accepted.ok and accepted.client.cipher()[0] == "ECDHE-RSA-AES128-GCM-SHA256"


def test_anAdministratorsCipherListIsWhatTLS12ClientsGet(tmp_path):
    """
    C{tls-ciphers} replaces the TLS 1.2 list: under AEAD only, a client
    offering only CBC suites is refused and one offering AES-GCM gets in;
    TLS 1.3 is not affected; and the list survives a reload.
    """
    certificate, key = makeCertificate(tmp_path, HOST, keyType="rsa")
    tls = ServerTLS(str(certificate), str(key), ciphers="ECDHE+AESGCM:ECDHE+CHACHA20")
    names = [c["name"] for c in tls.context.get_ciphers() if c["protocol"] == "TLSv1.2"]
    assert names and all("GCM" in n or "CHACHA20" in n for n in names), names
    for _ in range(2):
        client = clientContext(certificate, maximum=ssl.TLSVersion.TLSv1_2)
        client.set_ciphers("ECDHE-RSA-AES128-SHA256:ECDHE-RSA-AES256-SHA")
        refused = handshake(tls.context, client)
        assert not refused.ok and refused.serverError is not None
        client.set_ciphers("ECDHE-RSA-AES128-SHA256:ECDHE-RSA-AES256-GCM-SHA384")
        accepted = handshake(tls.context, client)
        assert accepted.ok and accepted.client.cipher()[0] == "ECDHE-RSA-AES256-GCM-SHA384"
        assert connect(tls, certificate).version == "TLSv1.3"
        tls.reload()


def test_aCipherListThatCannotWorkIsRefused(tmp_path):
    """
    A list OpenSSL selects nothing from, and one whose suites all need a
    key of a type the certificates do not have (ECDSA suites with an RSA
    certificate, where TLS 1.2 is accepted), are refused with the reason:
    neither would let a TLS 1.2 client in.  Suites without authentication
    or encryption asked for by name are never offered.
    """
    certificate, key = makeCertificate(tmp_path, HOST, keyType="rsa")
    with pytest.raises(ConfigurationError) as refused:
        ServerTLS(str(certificate), str(key), ciphers="NO-SUCH-CIPHER")
    # One line, without Python's tuple of OpenSSL's words: "... has (('No
    # cipher can be selected.',))" it said.
    assert str(refused.value) == "tls-ciphers 'NO-SUCH-CIPHER' selects no cipher suite OpenSSL has"
    with pytest.raises(ConfigurationError, match="no TLS 1.2 suite of it works with the certificate's RSA key"):
        ServerTLS(str(certificate), str(key), ciphers="ECDHE-ECDSA-AES128-GCM-SHA256")
    # TLS 1.3 only: the TLS 1.2 list is never used.
    ServerTLS(str(certificate), str(key), minimumVersion="1.3", ciphers="ECDHE-ECDSA-AES128-GCM-SHA256")
    tls = ServerTLS(str(certificate), str(key), ciphers="aNULL:eNULL:ECDHE-RSA-AES128-GCM-SHA256")
    offered = [c["name"] for c in tls.context.get_ciphers() if c["protocol"] == "TLSv1.2"]
    assert offered == ["ECDHE-RSA-AES128-GCM-SHA256"]


def test_aCipherListOfDHESuitesOnlyIsRefused(tmp_path):
    """
    DHE suites need DH parameters, which mailgate does not load: OpenSSL
    never negotiates one, so a list of nothing else would let no TLS 1.2
    client in, and is refused saying why.  With ECDHE suites beside them
    the list is taken.
    """
    certificate, key = makeCertificate(tmp_path, HOST, keyType="rsa")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certificate, key)
    context.set_ciphers("DHE-RSA-AES128-GCM-SHA256")
    client = clientContext(certificate, maximum=ssl.TLSVersion.TLSv1_2)
    client.set_ciphers("DHE-RSA-AES128-GCM-SHA256")
    assert not handshake(context, client).ok
    with pytest.raises(ConfigurationError, match="DHE suites are never negotiated"):
        ServerTLS(str(certificate), str(key), ciphers="DHE-RSA-AES128-GCM-SHA256:DHE-RSA-AES256-GCM-SHA384")
    ServerTLS(str(certificate), str(key), ciphers="DHE-RSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256")


def test_aCipherListOfSuitesOlderThanTLS12IsTakenForTLS12(tmp_path):
    """
    OpenSSL files a suite under the oldest version that has it
    (ECDHE-RSA-AES256-SHA under TLSv1.0), and TLS 1.2 negotiates it all
    the same: a list whose only RSA suite is such a one serves an RSA
    certificate, and is not refused.
    """
    certificate, key = makeCertificate(tmp_path, HOST, keyType="rsa")
    tls = ServerTLS(str(certificate), str(key), ciphers="ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-SHA")
    client = clientContext(certificate, maximum=ssl.TLSVersion.TLSv1_2)
    client.set_ciphers("ECDHE-RSA-AES256-SHA")
    result = handshake(tls.context, client)
    assert result.ok and result.client.cipher()[0] == "ECDHE-RSA-AES256-SHA", result.serverError


def test_anEd25519CertificateServesECDSASuites(tmp_path):
    """
    An Ed25519 key signs TLS 1.2's ECDHE-ECDSA handshakes: the default
    list serves it, a list of RSA suites only is refused for it.
    """
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519
    from cryptography.x509.oid import NameOID

    key = ed25519.Ed25519PrivateKey.generate()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOST)])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(HOST)]), critical=False)
        .sign(key, None)
    )
    certificatePath, keyPath = tmp_path / "ed.crt", tmp_path / "ed.key"
    certificatePath.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    keyPath.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    keyPath.chmod(0o600)
    tls = ServerTLS(str(certificatePath), str(keyPath))
    assert tls.certificates[0].keyType == "Ed25519"
    tls12 = handshake(tls.context, clientContext(certificatePath, maximum=ssl.TLSVersion.TLSv1_2))
    assert tls12.ok and tls12.client.cipher()[0].startswith("ECDHE-ECDSA-"), tls12.clientError
    with pytest.raises(ConfigurationError, match="no TLS 1.2 suite of it works with the certificate's Ed25519 key"):
        ServerTLS(str(certificatePath), str(keyPath), ciphers="ECDHE-RSA-AES128-GCM-SHA256")


def test_theCipherListComesFromTheConfiguration(tmp_path):
    certificate, key = makeCertificate(tmp_path, HOST, keyType="rsa")
    config = MailgateConfig(tlsCertificate=str(certificate), tlsKey=str(key), tlsCiphers="ECDHE+AESGCM")
    names = [c["name"] for c in makeTLS(config).context.get_ciphers() if c["protocol"] == "TLSv1.2"]
    assert names and all("GCM" in n for n in names), names
    with pytest.raises(ConfigurationError, match="selects no cipher suite"):
        makeTLS(MailgateConfig(tlsCertificate=str(certificate), tlsKey=str(key), tlsCiphers="NONE-AT-ALL"))


# The client side of these tests uses protocol versions Python deprecates.
legacyClient = pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")


@legacyClient
@pytest.mark.parametrize(
    "minimum, maximum",
    [
        (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1),
        (ssl.TLSVersion.TLSv1_1, ssl.TLSVersion.TLSv1_1),
    ],
    ids=["TLSv1.0", "TLSv1.1"],
)
def test_legacyProtocolsAreRefused(tls, pair, minimum, maximum):
    """
    A client limited to TLS 1.0 or 1.1 is turned away with a
    protocol_version alert.  (OpenSSL 3's default security level alone would
    refuse them too; L{test_contextOptions} checks mailgate's own setting.)
    """
    result = connect(tls, pair[0], minimum=minimum, maximum=maximum, legacy=True)
    assert not result.ok
    assert result.version is None
    assert result.serverError is not None
    assert "protocol version" in str(result.clientError)


@legacyClient
def test_legacyClientWorksAgainstALegacyServer(pair):
    """
    Control for L{test_legacyProtocolsAreRefused}: the same TLS 1.1 client
    completes a handshake with a server that allows TLS 1.1, so the refusal
    above is mailgate's doing.
    """
    certificatePath, keyPath = pair
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    context.load_cert_chain(str(certificatePath), str(keyPath))
    client = clientContext(
        certificatePath, minimum=ssl.TLSVersion.TLSv1_1, maximum=ssl.TLSVersion.TLSv1_1, legacy=True
    )
    result = handshake(context, client)
    if not result.ok:  # pragma: no cover - depends on the local OpenSSL
        pytest.skip(f"this OpenSSL cannot speak TLS 1.1 at all: {result.clientError or result.serverError}")
    assert result.version == "TLSv1.1"


@pytest.mark.parametrize(
    "version, name",
    [(ssl.TLSVersion.TLSv1_2, "TLSv1.2"), (ssl.TLSVersion.TLSv1_3, "TLSv1.3")],
)
def test_modernProtocolsAreAccepted(tls, pair, version, name):
    result = connect(tls, pair[0], minimum=version, maximum=version)
    assert result.ok, (result.clientError, result.serverError)
    assert result.version == name


@legacyClient
def test_bestProtocolIsNegotiated(tls, pair):
    result = connect(tls, pair[0], minimum=ssl.TLSVersion.TLSv1, legacy=True)
    assert result.ok, (result.clientError, result.serverError)
    assert result.version == "TLSv1.3"


def records(data):
    """
    The TLS records in C{data}, as C{(content type, length)}.
    """
    found = []
    while data:
        kind, length = data[0], int.from_bytes(data[3:5], "big")
        found.append((kind, length))
        data = data[5 + length:]
    return found


def test_aTLS13ClientGetsOneSessionTicketAndResumesWithIt(tls, pair):
    """
    After a full TLS 1.3 handshake the client is given one session ticket
    (OpenSSL would send two, for clients that open connections in
    parallel; a POP3 client holds one session per maildrop).  Its next
    connection resumes with it, without the certificate's signature, and
    is given a new ticket for the one after.
    """
    context = clientContext(pair[0], minimum=ssl.TLSVersion.TLSv1_3)
    first = handshake(tls.context, context)
    assert first.ok and first.version == "TLSv1.3"
    assert not first.client.session_reused
    # The tickets follow the handshake, one encrypted record each.
    assert [kind for kind, _ in records(first.serverLastFlight)] == [23]
    session = first.client.session
    for _ in range(3):
        with pytest.raises(ssl.SSLWantReadError):
            first.client.read()  # takes in the ticket
        assert first.client.session.has_ticket
        session = first.client.session
        resumed = handshake(tls.context, context, session=session)
        assert resumed.ok and resumed.client.session_reused
        assert resumed.peerCertificate == first.peerCertificate
        assert len(records(resumed.serverLastFlight)) == 1
        first = resumed


def test_aTicketFromBeforeAReloadGetsAFullHandshake(tls, pair):
    """
    The ticket key is the context's: after a reload, a client resuming
    with an older ticket is given a full handshake, and a new ticket.
    """
    context = clientContext(pair[0], minimum=ssl.TLSVersion.TLSv1_3)
    first = handshake(tls.context, context)
    with pytest.raises(ssl.SSLWantReadError):
        first.client.read()
    assert first.client.session.has_ticket
    tls.reload()
    again = handshake(tls.context, context, session=first.client.session)
    assert again.ok and not again.client.session_reused
    assert again.peerCertificate == first.peerCertificate
    assert len(records(again.serverLastFlight)) == 1


# -- session ticket keys -----------------------------------------------------------


def ticketFrom(tls, context):
    """
    A full handshake with C{context}, and the session the client keeps
    from it, with its ticket (TLS 1.3 sends it after the handshake).
    """
    first = handshake(tls.context, context)
    assert first.ok and not first.client.session_reused
    if first.version == "TLSv1.3":
        with pytest.raises(ssl.SSLWantReadError):
            first.client.read()
    assert first.client.session.has_ticket
    return first


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_aTicketFromBeforeTheKeyWasRenewedGetsAFullHandshake(tls, pair, version):
    """
    A new ticket key (L{ServerTLS.renewTicketKey}): a client resuming
    with a ticket the previous key sealed gets a full handshake with the
    same certificate, and a ticket that serves its next connection.  Up
    to the renewal, the old ticket resumed.
    """
    context = clientContext(pair[0], minimum=version, maximum=version)
    first = ticketFrom(tls, context)
    old = first.client.session
    assert handshake(tls.context, context, session=old).client.session_reused
    tls.renewTicketKey()
    again = handshake(tls.context, context, session=old)
    assert again.ok and again.version == first.version and not again.client.session_reused
    assert again.peerCertificate == first.peerCertificate
    renewed = ticketFrom(tls, context).client.session
    assert handshake(tls.context, context, session=renewed).client.session_reused


def test_theRenewedKeyServesTheCertificatesAsTheyWereRead(tmp_path):
    """
    The context made for a new key holds the certificates and keys in
    service, with their settings, not what their files hold now: a
    renewal replaced without its SIGHUP yet, or a file half written,
    waits for the reload.
    """
    certificatePath, keyPath, tls, oldCertificate = servingWithACopy(tmp_path)
    old = tls.fingerprint
    before = tls.context
    makeCertificate(tmp_path, HOST, name="server")  # renewed in place
    tls.renewTicketKey()
    assert tls.context is not before
    assert tls.context.minimum_version == before.minimum_version and tls.context.num_tickets == 1
    assert tls.context.options == before.options
    assert [c["name"] for c in tls.context.get_ciphers()] == [c["name"] for c in before.get_ciphers()]
    result = connect(tls, oldCertificate)
    assert result.ok and fingerprint(result.peerCertificate) == old and tls.fingerprint == old
    keyPath.write_bytes(b"half")
    tls.renewTicketKey()
    assert connect(tls, oldCertificate).ok


def test_theRenewedKeyKeepsTheAlternativeCertificate(dual):
    (rsaCertificate, rsaKey), (ecCertificate, ecKey), both = dual
    tls = ServerTLS(str(rsaCertificate), str(rsaKey), (str(ecCertificate), str(ecKey)))
    tls.renewTicketKey()
    for context, expected in ((clientContext(both), ecCertificate), (tls12Client(both, RSA_ONLY), rsaCertificate)):
        result = handshake(tls.context, context)
        assert result.ok and fingerprint(result.peerCertificate) == certificateFingerprint(expected)


def test_aTicketOfANamedCertificateIsTheMainKeysToo(hosted):
    """
    A client that asked (SNI) for a name another certificate serves is
    given its ticket under the main context's key (OpenSSL's, whatever
    context the SNI callback chose), so renewing that key alone makes it
    fall back to a full handshake too, and the client still gets the
    certificate of its name.
    """
    tls, main, net, com, trusted = hosted
    context = clientContext(net[0], minimum=ssl.TLSVersion.TLSv1_3)
    first = handshake(tls.context, context, "mail.example.net")
    assert first.ok and fingerprint(first.peerCertificate) == certificateFingerprint(net[0])
    with pytest.raises(ssl.SSLWantReadError):
        first.client.read()
    assert handshake(tls.context, context, "mail.example.net", session=first.client.session).client.session_reused
    tls.renewTicketKey()
    again = handshake(tls.context, context, "mail.example.net", session=first.client.session)
    assert again.ok and not again.client.session_reused
    assert fingerprint(again.peerCertificate) == certificateFingerprint(net[0])


class Renewals:
    """
    A L{ServerTLS} stand-in counting L{renewTicketKey} calls, failing
    the next C{failures} of them.
    """

    def __init__(self, failures=0, error=None, problem=None):
        self.calls = 0
        self.failures = failures
        self.error = OSError(24, "Too many open files") if error is None else error
        self.problem = problem

    def ticketKeyRenewalProblem(self):
        return self.problem

    def renewTicketKey(self):
        self.calls += 1
        if self.failures:
            self.failures -= 1
            raise self.error


def test_theTicketKeyIsRenewedEveryInterval():
    """
    L{TicketKeyRotation} renews the key once per interval on the clock it
    is given, not at its start, and no more once stopped.
    """
    clock, tls = Clock(), Renewals()
    rotation = TicketKeyRotation(tls, clock, 3600)
    rotation.startService()
    assert tls.calls == 0
    clock.advance(3599)
    assert tls.calls == 0
    clock.advance(1)
    assert tls.calls == 1
    clock.pump([3600] * 3)
    assert tls.calls == 4
    rotation.stopService()
    assert clock.getDelayedCalls() == []
    clock.advance(7200)
    assert tls.calls == 4


@pytest.mark.parametrize(
    "error, told",
    [
        (None, "[Errno 24] Too many open files"),
        (ValueError("unexpected"), "unexpected"),
    ],
    ids=["foreseen", "any"],
)
def test_aRenewalThatFailsIsSaidAndTheNextIsTried(error, told):
    """
    A key that cannot be renewed (no file descriptor left for the
    certificates) is an error line; the key in use stays, and the next
    interval tries again.  So is a renewal that fails with something
    else than the errors foreseen (a ValueError: a bug, or a Python whose
    ssl says so): the looping call died with it, and the key in use stayed
    for the life of the process.
    """
    clock, tls, events = Clock(), Renewals(failures=1, error=error), []
    rotation = TicketKeyRotation(tls, clock, 60)
    rotation.log = Logger(observer=events.append)
    rotation.startService()
    clock.advance(60)
    [event] = events
    assert event["event"] == "tls.ticket_key_failed" and event["log_level"] == LogLevel.error
    assert formatEvent(event) == (
        f"TLS session ticket key not renewed, the current one stays in use until the next try: {told}"
    )
    clock.advance(60)
    assert tls.calls == 2 and len(events) == 1
    rotation.stopService()


def test_whereNoRenewalCanWorkOneWarningSaysSoAtTheStart():
    """
    Where no renewal can work (no /proc, memfd_create refused), one
    warning at the start says so and what still replaces the key, and
    none is tried: before, every interval logged the same error, for
    ever (seen on a real twistd without /proc: "[Errno 2] No such file
    or directory" every second at --tls-ticket-key-rotation 1).
    """
    clock, events = Clock(), []
    tls = Renewals(problem="/proc/self/fd/ cannot be read (No such file or directory): no /proc here")
    rotation = TicketKeyRotation(tls, clock, 60)
    rotation.log = Logger(observer=events.append)
    rotation.startService()
    [event] = events
    assert event["event"] == "tls.ticket_key_rotation_unavailable" and event["log_level"] == LogLevel.warn
    assert formatEvent(event) == (
        "TLS session ticket keys cannot be renewed here (/proc/self/fd/ cannot be read (No such file or "
        "directory): no /proc here): a key is replaced only when the certificates are reloaded (SIGHUP) or "
        "mailgate restarts; give mailgate /proc and memfd_create for --tls-ticket-key-rotation to work"
    )
    assert clock.getDelayedCalls() == []
    clock.advance(600)
    assert tls.calls == 0 and len(events) == 1
    rotation.stopService()


def test_aRefusedMemfdCreateIsTheProblemOfRenewals(tls, monkeypatch):
    """
    L{ServerTLS.ticketKeyRenewalProblem}: none here (memfd_create and
    /proc at hand); with memfd_create refused, as a seccomp filter
    refuses it (EPERM), that is the problem.
    """
    import errno
    import os

    assert tls.ticketKeyRenewalProblem() is None

    def refused(name, flags=0):
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "memfd_create", refused)
    assert tls.ticketKeyRenewalProblem() == "memfd_create is refused: Operation not permitted"


def test_theServiceRenewsTheTicketKeyOnItsReactor(pair, tmp_path):
    """
    C{makeService} with a certificate renews the ticket key every
    C{tls-ticket-key-rotation} seconds on the reactor it is given (the
    default: an hour); without a certificate there is nothing to renew.
    """
    from mailgate.testing import memoryStore

    reactor = MemoryReactorClock()
    config = MailgateConfig(
        pop3s=["tcp:0:interface=127.0.0.1"], tlsCertificate=str(pair[0]), tlsKey=str(pair[1]),
        tlsTicketKeyRotation=120,
    )
    root = makeService(config, reactor=reactor, store=memoryStore())
    [rotation] = [s for s in root if isinstance(s, TicketKeyRotation)]
    assert rotation.clock is reactor and rotation.interval == 120 and rotation.tls is root.tls
    assert MailgateConfig().tlsTicketKeyRotation == 3600
    plain = makeService(MailgateConfig(), reactor=MemoryReactorClock(), store=memoryStore())
    assert not [s for s in plain if isinstance(s, TicketKeyRotation)]


def test_clientVerifiesTheHostName(tls, pair):
    """
    The certificates of L{certs} (C{tests/certs.py}) name their host and 127.0.0.1, and a
    verifying client holds the server to them.
    """
    assert handshake(tls.context, clientContext(pair[0]), HOST).ok
    assert handshake(tls.context, clientContext(pair[0]), "127.0.0.1").ok
    result = handshake(tls.context, clientContext(pair[0]), "other.example.test")
    assert not result.ok
    assert "certificate verify failed" in str(result.clientError)


# -- an alternative certificate (an ECDSA one beside an RSA one) --------------


@pytest.fixture
def dual(tmp_path):
    """
    An RSA certificate and an ECDSA one for the same name, and a file
    trusting both: C{(rsaPair, ecPair, bothPath)}.
    """
    rsaPair = makeCertificate(tmp_path, HOST, name="rsa", keyType="rsa")
    ecPair = makeCertificate(tmp_path, HOST, name="ecdsa")
    both = tmp_path / "both.crt"
    both.write_bytes(rsaPair[0].read_bytes() + ecPair[0].read_bytes())
    return rsaPair, ecPair, both


def tls12Client(cafile, ciphers):
    """
    A TLS 1.2 client offering only C{ciphers}: C{ECDHE-RSA-...} suites
    are what a client that cannot check an ECDSA signature offers.
    """
    context = clientContext(cafile, maximum=ssl.TLSVersion.TLSv1_2)
    context.set_ciphers(ciphers)
    return context


RSA_ONLY = "ECDHE-RSA-AES128-GCM-SHA256:ECDHE-RSA-AES256-GCM-SHA384"
ECDSA_ONLY = "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384"


@pytest.mark.parametrize("main", ["rsa", "ecdsa"])
def test_eachClientGetsTheCertificateItCanCheck(dual, main):
    """
    With both certificates loaded (either as the main one), a TLS 1.3
    client of today and a TLS 1.2 client offering ECDSA suites get the
    ECDSA certificate, the cheaper handshake; a client offering only RSA
    suites gets the RSA certificate.
    """
    rsaPair, ecPair, both = dual
    first, second = (rsaPair, ecPair) if main == "rsa" else (ecPair, rsaPair)
    tls = ServerTLS(str(first[0]), str(first[1]), (str(second[0]), str(second[1])))
    rsaPrint, ecPrint = certificateFingerprint(rsaPair[0]), certificateFingerprint(ecPair[0])

    modern = connect(tls, both)
    assert modern.ok, (modern.clientError, modern.serverError)
    assert modern.version == "TLSv1.3"
    assert fingerprint(modern.peerCertificate) == ecPrint

    for ciphers, expected in ((ECDSA_ONLY, ecPrint), (RSA_ONLY, rsaPrint)):
        result = handshake(tls.context, tls12Client(both, ciphers))
        assert result.ok, (ciphers, result.clientError, result.serverError)
        assert result.version == "TLSv1.2"
        assert fingerprint(result.peerCertificate) == expected, ciphers


def test_withoutAnAlternativeAnRSAOnlyClientFailsAgainstAnECDSACertificate(dual):
    """
    What the alternative is for: a server with only an ECDSA certificate
    cannot serve a client that checks only RSA signatures.
    """
    _, (ecCertificate, ecKey), both = dual
    tls = ServerTLS(str(ecCertificate), str(ecKey))
    assert not handshake(tls.context, tls12Client(both, RSA_ONLY)).ok


def test_bothCertificatesAreDescribedForTheLog(dual):
    (rsaCertificate, rsaKey), (ecCertificate, ecKey), _ = dual
    tls = ServerTLS(str(rsaCertificate), str(rsaKey), (str(ecCertificate), str(ecKey)))
    assert [(c.keyType, c.subject, c.fingerprint) for c in tls.certificates] == [
        ("RSA", HOST, certificateFingerprint(rsaCertificate)),
        ("ECDSA", HOST, certificateFingerprint(ecCertificate)),
    ]
    # The main certificate is still what subject and fingerprint name.
    assert tls.fingerprint == certificateFingerprint(rsaCertificate)
    described = tls.describe()
    assert described.startswith("RSA ") and "; ECDSA " in described
    assert certificateFingerprint(ecCertificate) in described


def test_expiredAndExpiringCertificatesAreWarnedOf(tmp_path):
    """
    A certificate is described with its end of validity; one that has
    ended, or ends within EXPIRY_WARNING_DAYS, is warned of (it is still
    served: the administrator may be about to replace it).
    """
    certificate, key = makeCertificate(tmp_path, HOST, days=30)
    tls = ServerTLS(str(certificate), str(key))
    [summary] = tls.certificates
    assert f"valid until {summary.notAfter:%Y-%m-%d}" in tls.describe()
    assert tls.expiryWarnings() == []
    soon = summary.notAfter - datetime.timedelta(days=3, hours=1)
    assert tls.expiryWarnings(now=soon) == [
        f"the TLS certificate {HOST} (ECDSA) expires in 3 days, on {summary.notAfter:%Y-%m-%d %H:%M} UTC"
    ]
    later = summary.notAfter + datetime.timedelta(seconds=1)
    assert tls.expiryWarnings(now=later) == [
        f"the TLS certificate {HOST} (ECDSA) expired on {summary.notAfter:%Y-%m-%d %H:%M} UTC"
    ]


def test_anIntermediateThatExpiresIsWarnedOf(tmp_path):
    """
    An intermediate the chain file sends that has expired makes clients
    refuse the server's certificate, however long that one has left (a
    chain kept from before the CA issued its intermediate again, with its
    name and key): it is warned of, naming the file, as the certificate
    itself would be, and so is one about to expire.  A chain whose
    intermediate outlives the certificate is not.
    """
    root = makeAuthority(tmp_path, "mailgate test root", days=400)
    sound = makeAuthority(tmp_path, "sound intermediate", issuer=root, days=300)
    ending = makeAuthority(tmp_path, "ending intermediate", issuer=root, days=10)
    files = {}
    for name, intermediate in (("sound", sound), ("ending", ending)):
        leafPath, keyPath = makeCertificate(tmp_path, HOST, name=name, days=60, issuer=intermediate)
        chainPath = tmp_path / f"{name}.chain.crt"
        chainPath.write_bytes(leafPath.read_bytes() + intermediate.pem)
        files[name] = (str(chainPath), str(keyPath))
    assert ServerTLS(*files["sound"]).expiryWarnings() == []
    tls = ServerTLS(*files["ending"])
    assert tls.chainWarnings == []
    end = ending.certificate.not_valid_after_utc
    assert tls.expiryWarnings() == [
        f"{files['ending'][0]}: the certificate ending intermediate in its chain expires in 9 days, "
        f"on {end:%Y-%m-%d %H:%M} UTC"
    ]
    later = end + datetime.timedelta(seconds=1)
    assert tls.expiryWarnings(now=later) == [
        f"{files['ending'][0]}: the certificate ending intermediate in its chain expired on "
        f"{end:%Y-%m-%d %H:%M} UTC: clients that verify the server's certificate through it refuse that; "
        f"give the chain your CA sends now (certbot's fullchain.pem)"
    ]


def test_aCertificateNotYetValidIsWarnedOf(tmp_path):
    """
    A certificate whose validity has not begun (issued with a later start,
    or this machine's clock is behind) is refused by clients until then
    as an expired one is: it is warned of until that time (and still
    served).
    """
    certificate, key = makeCertificate(tmp_path, HOST, days=30)
    tls = ServerTLS(str(certificate), str(key))
    [summary] = tls.certificates
    before = summary.notBefore - datetime.timedelta(hours=2)
    assert tls.expiryWarnings(now=before) == [
        f"the TLS certificate {HOST} (ECDSA) is not valid before {summary.notBefore:%Y-%m-%d %H:%M} UTC: "
        f"clients refuse it until then, unless this machine's clock is behind theirs"
    ]
    assert tls.expiryWarnings(now=summary.notBefore) == []


def test_anAlternativeWithAKeyOfTheSameTypeIsRefused(tmp_path, dual):
    """
    OpenSSL holds one certificate per type of key: a second ECDSA
    certificate would silently replace the first, so it is refused.
    """
    _, (ecCertificate, ecKey), _ = dual
    other = makeCertificate(tmp_path, HOST, name="other-ecdsa")
    with pytest.raises(ConfigurationError) as e:
        ServerTLS(str(ecCertificate), str(ecKey), (str(other[0]), str(other[1])))
    assert "ECDSA, like the main certificate's" in str(e.value)
    assert str(other[0]) in str(e.value)


def test_anAlternativeWithAKeyNotItsOwnIsRefused(dual):
    (rsaCertificate, rsaKey), (ecCertificate, _), _ = dual
    with pytest.raises(ConfigurationError) as e:
        ServerTLS(str(rsaCertificate), str(rsaKey), (str(ecCertificate), str(rsaKey)))
    assert "unusable TLS certificate/key pair" in str(e.value)


def test_reloadPicksUpARenewedAlternative(tmp_path, dual):
    (rsaCertificate, rsaKey), (ecCertificate, ecKey), _ = dual
    tls = ServerTLS(str(rsaCertificate), str(rsaKey), (str(ecCertificate), str(ecKey)))
    old = tls.certificates[1].fingerprint
    makeCertificate(tmp_path, HOST, name="ecdsa")  # renewed in place
    tls.reload()
    renewed = certificateFingerprint(ecCertificate)
    assert renewed != old and tls.certificates[1].fingerprint == renewed
    result = connect(tls, ecCertificate)
    assert result.ok and fingerprint(result.peerCertificate) == renewed


def test_failedReloadOfTheAlternativeKeepsBoth(dual):
    (rsaCertificate, rsaKey), (ecCertificate, ecKey), both = dual
    tls = ServerTLS(str(rsaCertificate), str(rsaKey), (str(ecCertificate), str(ecKey)))
    before = list(tls.certificates)
    kept = ecCertificate.read_bytes()
    ecCertificate.write_bytes(b"not a certificate\n")
    with pytest.raises(ConfigurationError):
        tls.reload()
    assert tls.certificates == before
    ecCertificate.write_bytes(kept)
    for context, expected in ((clientContext(both), ecCertificate), (tls12Client(both, RSA_ONLY), rsaCertificate)):
        result = handshake(tls.context, context)
        assert result.ok and fingerprint(result.peerCertificate) == certificateFingerprint(expected)


# -- reload ------------------------------------------------------------------


def servingWithACopy(tmp_path):
    """
    A server's TLS from a new certificate in tmp_path, and a copy of that
    certificate elsewhere, for a client to verify the old one against once
    the files are renewed in place.

    @return: C{(certificatePath, keyPath, tls, oldCertificate)}.
    """
    certificatePath, keyPath = makeCertificate(tmp_path, HOST, name="server")
    tls = ServerTLS(str(certificatePath), str(keyPath))
    oldCertificate = tmp_path / "old.crt"
    oldCertificate.write_bytes(certificatePath.read_bytes())
    return certificatePath, keyPath, tls, oldCertificate


# -- certificates chosen by the host name the client asks for (SNI) ----------


@pytest.fixture
def hosted(tmp_path):
    """
    A server for three domains: the main certificate for HOST, one for
    mail.example.net and a wildcard one for *.example.com; and a file
    trusting all three.
    """
    main = makeCertificate(tmp_path, HOST, name="main")
    net = makeCertificate(tmp_path, "mail.example.net", name="net", keyType="rsa")
    com = makeCertificate(tmp_path, "*.example.com", name="com")
    trusted = tmp_path / "all.crt"
    trusted.write_bytes(b"".join(pair[0].read_bytes() for pair in (main, net, com)))
    tls = ServerTLS(str(main[0]), str(main[1]), named=[net, com])
    return tls, main, net, com, trusted


@pytest.mark.parametrize(
    "asked, served",
    [
        ("mail.example.net", "net"),
        ("MAIL.Example.NET", "net"),
        ("pop.example.com", "com"),
        (HOST, "main"),
        ("example.com", "main"),
        ("a.b.example.com", "main"),
        ("other.example.net", "main"),
    ],
)
def test_eachClientGetsTheCertificateOfTheNameItAskedFor(hosted, asked, served):
    tls, main, net, com, trusted = hosted
    expected = {"main": main, "net": net, "com": com}[served]
    client = clientContext(trusted)
    client.check_hostname = False
    result = handshake(tls.context, client, asked)
    assert result.ok, (result.clientError, result.serverError)
    assert fingerprint(result.peerCertificate) == certificateFingerprint(expected[0])


def test_aClientThatNamesNoHostGetsTheMainCertificate(hosted):
    tls, main, _, _, trusted = hosted
    client = clientContext(trusted)
    client.check_hostname = False
    result = handshake(tls.context, client, None)
    assert result.ok and fingerprint(result.peerCertificate) == certificateFingerprint(main[0])


def test_aVerifyingClientAcceptsEachNamesCertificate(hosted):
    tls, main, net, com, _ = hosted
    for pair, asked in ((net, "mail.example.net"), (com, "pop.example.com"), (main, HOST)):
        result = handshake(tls.context, clientContext(pair[0]), asked)
        assert result.ok, (asked, result.clientError)


def test_aNamedCertificateWithAnAlternativeServesEachClientTheOneItCanCheck(tmp_path, hosted):
    """
    CERT:KEY:ALTCERT:ALTKEY: for mail.example.net, an ECDSA certificate
    beside the RSA one, as tls-alt-cert beside tls-cert: a client that
    accepts ECDSA gets it, an RSA-only TLS 1.2 client the RSA one; both
    are described, and their keys checked.  An alternative that does not
    name every host of the certificate it goes beside is refused.
    """
    tls, main, net, com, trusted = hosted
    netEC = makeCertificate(tmp_path, "mail.example.net", name="net-ec")
    both = tmp_path / "both.crt"
    both.write_bytes(trusted.read_bytes() + netEC[0].read_bytes())
    tls = ServerTLS(str(main[0]), str(main[1]), named=[(*net, *netEC), com])
    modern = handshake(tls.context, clientContext(both), "mail.example.net")
    assert modern.ok and fingerprint(modern.peerCertificate) == certificateFingerprint(netEC[0])
    rsaOnly = handshake(tls.context, tls12Client(both, RSA_ONLY), "mail.example.net")
    assert rsaOnly.ok and fingerprint(rsaOnly.peerCertificate) == certificateFingerprint(net[0])
    assert [c.keyType for c in tls.certificates] == ["ECDSA", "RSA", "ECDSA", "ECDSA"]
    netEC[1].chmod(0o644)
    tls.reload()
    assert any(str(netEC[1]) in warning for warning in tls.keyWarnings)
    elsewhere = makeCertificate(tmp_path, "pop.example.net", name="elsewhere")
    with pytest.raises(ConfigurationError, match="does not name mail.example.net"):
        ServerTLS(str(main[0]), str(main[1]), named=[(*net, *elsewhere)])


def test_aNamedCertificateWithAnAlternativeFromTheConfiguration(tmp_path):
    main = makeCertificate(tmp_path, HOST, name="main")
    net = makeCertificate(tmp_path, "mail.example.net", name="net", keyType="rsa")
    netEC = makeCertificate(tmp_path, "mail.example.net", name="net-ec")
    config = MailgateConfig(
        tlsCertificate=str(main[0]), tlsKey=str(main[1]),
        tlsNamedCertificates=[f"{net[0]}:{net[1]}:{netEC[0]}:{netEC[1]}"],
    )
    assert [c.keyType for c in makeTLS(config).certificates] == ["ECDSA", "RSA", "ECDSA"]
    from mailgate.config import CertificatePair

    for bad in (f"{net[0]}:{net[1]}:{netEC[0]}:", f"{net[0]}::{netEC[0]}:{netEC[1]}"):
        with pytest.raises(ValueError, match="CERT:KEY:ALTCERT:ALTKEY"):
            CertificatePair().check(bad)


def test_twoCertificatesNamingOneHostAreRefused(tmp_path, hosted):
    tls, main, net, _, _ = hosted
    again = makeCertificate(tmp_path, "mail.example.net", name="net2")
    with pytest.raises(ConfigurationError, match="mail.example.net is named by another certificate too"):
        ServerTLS(str(main[0]), str(main[1]), named=[net, again])


def test_namedCertificatesAreDescribedReloadedAndTheirKeysChecked(tmp_path, hosted):
    tls, main, net, com, trusted = hosted
    assert [c.subject for c in tls.certificates] == [HOST, "mail.example.net", "*.example.com"]
    assert "RSA mail.example.net" in tls.describe()
    old = certificateFingerprint(net[0])
    makeCertificate(tmp_path, "mail.example.net", name="net")  # renewed in place
    tls.reload()
    client = clientContext(net[0])
    result = handshake(tls.context, client, "mail.example.net")
    assert result.ok and fingerprint(result.peerCertificate) != old
    net[1].chmod(0o644)
    tls.reload()
    assert any(str(net[1]) in warning for warning in tls.keyWarnings)
    # A named pair that does not belong together is refused, and the
    # certificates in service stay.
    net[1].write_bytes(com[1].read_bytes())
    with pytest.raises(ConfigurationError, match="is not the key of"):
        tls.reload()
    assert handshake(tls.context, client, "mail.example.net").ok


def test_reloadPresentsTheNewCertificate(tmp_path):
    certificatePath, keyPath, tls, oldCertificate = servingWithACopy(tmp_path)
    old = tls.fingerprint

    makeCertificate(tmp_path, HOST, name="server")  # renewed in place
    tls.reload()
    assert tls.fingerprint != old
    assert tls.fingerprint == certificateFingerprint(certificatePath)

    result = connect(tls, certificatePath)
    assert result.ok, (result.clientError, result.serverError)
    assert fingerprint(result.peerCertificate) == tls.fingerprint
    # A client still trusting only the old certificate now fails.
    assert not connect(tls, oldCertificate).ok


def test_reloadPicksUpANewSubject(tmp_path):
    certificatePath, keyPath = makeCertificate(tmp_path, HOST, name="server")
    tls = ServerTLS(str(certificatePath), str(keyPath))
    makeCertificate(tmp_path, "renamed.example.test", name="server")
    tls.reload()
    assert tls.subject == "renamed.example.test"
    assert handshake(tls.context, clientContext(certificatePath), "renamed.example.test").ok


def test_reloadDoesNotDisturbAnEstablishedConnection(tmp_path):
    """
    A connection created before the reload finishes its handshake with the
    certificate it started with.
    """
    certificatePath, keyPath, tls, oldCertificate = servingWithACopy(tmp_path)
    old = tls.fingerprint
    earlier = Server(tls.context)
    makeCertificate(tmp_path, HOST, name="server")
    tls.reload()
    result = handshake(earlier, clientContext(oldCertificate))
    assert result.ok, (result.clientError, result.serverError)
    assert fingerprint(result.peerCertificate) == old


def test_failedReloadKeepsTheOldCertificate(tmp_path):
    certificatePath, keyPath, tls, oldCertificate = servingWithACopy(tmp_path)
    old = tls.fingerprint

    # A renewal caught half-way: new certificate, old key.
    oldKey = keyPath.read_bytes()
    makeCertificate(tmp_path, HOST, name="server")
    keyPath.write_bytes(oldKey)
    with pytest.raises(ConfigurationError) as e:
        tls.reload()
    assert "unusable TLS certificate/key pair" in str(e.value)
    assert tls.fingerprint == old
    assert tls.subject == HOST
    result = connect(tls, oldCertificate)
    assert result.ok, (result.clientError, result.serverError)
    assert fingerprint(result.peerCertificate) == old


def test_reloadWithMissingFilesKeepsTheOldCertificate(tmp_path):
    certificatePath, keyPath, tls, oldCertificate = servingWithACopy(tmp_path)
    old = tls.fingerprint
    certificatePath.unlink()
    with pytest.raises(ConfigurationError):
        tls.reload()
    assert tls.fingerprint == old
    result = connect(tls, oldCertificate)
    assert result.ok and fingerprint(result.peerCertificate) == old


# -- the service -----------------------------------------------------------


def serviceWithLog(tls):
    events = []
    service = MailgateService(store=None, tls=tls, reactor=Clock())
    service.log = Logger(observer=events.append)
    return service, events


def test_serviceReloadTLS(tmp_path):
    certificatePath, keyPath = makeCertificate(tmp_path, HOST, name="server")
    tls = ServerTLS(str(certificatePath), str(keyPath))
    service, events = serviceWithLog(tls)
    makeCertificate(tmp_path, HOST, name="server")
    assert service.reloadTLS() is True
    assert tls.fingerprint == certificateFingerprint(certificatePath)
    [event] = events
    assert event["log_level"] == LogLevel.info
    text = formatEvent(event)
    assert "TLS certificate reloaded" in text
    assert HOST in text and tls.fingerprint in text


def test_theCertificateInServiceIsLoggedAtStartAndWarnedOfWhenEnding(tmp_path, monkeypatch):
    certificatePath, keyPath = makeCertificate(tmp_path, HOST, name="server")
    tls = ServerTLS(str(certificatePath), str(keyPath))
    service, events = serviceWithLog(tls)
    service.startService()
    [event] = events
    assert event["event"] == "tls.loaded" and event["log_level"] == LogLevel.info
    assert formatEvent(event) == f"TLS certificate in service: {tls.describe()}"
    # Reloaded into the last days of its validity: warned of.
    del events[:]
    ending = tls.certificates[0].notAfter - datetime.timedelta(days=2)
    monkeypatch.setattr(tls, "expiryWarnings", lambda now=ending, real=tls.expiryWarnings: real(now))
    assert service.reloadTLS() is True
    assert [e["event"] for e in events] == ["tls.reloaded", "tls.expiry"]
    assert events[1]["log_level"] == LogLevel.warn
    assert formatEvent(events[1]).startswith(f"the TLS certificate {HOST} (ECDSA) expires in 2 days, on ")


@pytest.mark.parametrize(
    "mode, warning",
    [
        (0o600, None),
        (0o640, None),
        (0o644, "is readable by every user (mode 0644): chmod o-rwx it"),
        (0o660, "may be replaced by others than its owner (mode 0660): chmod go-w it"),
    ],
)
def test_aKeyFileOthersMayReadIsWarnedOfAtStart(tmp_path, mode, warning):
    """
    A private key every user of the machine may read (or others than its
    owner may replace) is warned of when it is loaded; one its group may
    read (Debian's ssl-cert group) is not.
    """
    certificatePath, keyPath = makeCertificate(tmp_path, HOST, name="server")
    keyPath.chmod(mode)
    tls = ServerTLS(str(certificatePath), str(keyPath))
    service, events = serviceWithLog(tls)
    service.startService()
    warnings = [formatEvent(e) for e in events if e["event"] == "tls.key_permissions"]
    if warning is None:
        assert warnings == []
    else:
        assert warnings == [f"the TLS private key {keyPath} {warning}"]
        assert [e["log_level"] for e in events if e["event"] == "tls.key_permissions"] == [LogLevel.warn]


def test_aStaleChainIsWarnedOfAtStartAndReload(tmp_path):
    """
    A chain that did not issue its certificate is a warning
    (C{tls.chain}) at start and at each reload, until it is put right.
    """
    chainPath, keyPath, _ = makeChain(tmp_path, HOST)
    good = chainPath.read_bytes()
    chainPath.write_bytes(good.split(b"-----END CERTIFICATE-----")[0] + b"-----END CERTIFICATE-----\n"
                          + makeAuthority(tmp_path, "former CA").pem)
    tls = ServerTLS(str(chainPath), str(keyPath))
    service, events = serviceWithLog(tls)
    service.startService()
    assert service.reloadTLS() is True
    warned = [formatEvent(e) for e in events if e["event"] == "tls.chain"]
    assert warned == tls.chainWarnings * 2 and len(warned) == 2
    chainPath.write_bytes(good)
    del events[:]
    assert service.reloadTLS() is True
    assert [e for e in events if e["event"] == "tls.chain"] == []


def test_anEndingCertificateIsWarnedOfDailyWhileTheServerRuns(tmp_path, monkeypatch):
    """
    A server that runs on without a reload (a renewal that failed sends no
    SIGHUP) warns of its certificate's end once a day, not only at its
    start; once stopped, it says nothing more.
    """
    from mailgate.service import TLS_VALIDITY_CHECK_INTERVAL

    certificatePath, keyPath = makeCertificate(tmp_path, HOST, name="server", days=30)
    tls = ServerTLS(str(certificatePath), str(keyPath))
    service, events = serviceWithLog(tls)
    service.startService()
    assert [e for e in events if e["event"] == "tls.expiry"] == []
    ending = tls.certificates[0].notAfter - datetime.timedelta(days=5, hours=1)
    monkeypatch.setattr(tls, "expiryWarnings", lambda real=tls.expiryWarnings: real(ending))
    service.reactor.advance(TLS_VALIDITY_CHECK_INTERVAL - 1)
    assert [e for e in events if e["event"] == "tls.expiry"] == []
    service.reactor.advance(1)
    [warned] = [formatEvent(e) for e in events if e["event"] == "tls.expiry"]
    assert warned.startswith(f"the TLS certificate {HOST} (ECDSA) expires in 5 days")
    service.reactor.advance(TLS_VALIDITY_CHECK_INTERVAL)
    assert len([e for e in events if e["event"] == "tls.expiry"]) == 2
    service.stopService()
    service.reactor.advance(TLS_VALIDITY_CHECK_INTERVAL)
    assert len([e for e in events if e["event"] == "tls.expiry"]) == 2


def test_serviceReloadTLSFailureIsLoggedAndKeepsTheOldCertificate(tmp_path):
    certificatePath, keyPath = makeCertificate(tmp_path, HOST, name="server")
    tls = ServerTLS(str(certificatePath), str(keyPath))
    old = tls.fingerprint
    service, events = serviceWithLog(tls)
    certificatePath.write_bytes(b"not a certificate\n")
    assert service.reloadTLS() is False
    assert tls.fingerprint == old
    [event] = events
    assert event["log_level"] == LogLevel.error
    text = formatEvent(event)
    assert "TLS reload failed, keeping the previous certificate" in text
    assert "no PEM certificate found" in text


def test_serviceReloadTLSWithoutTLS():
    service, events = serviceWithLog(None)
    assert service.reloadTLS() is False
    assert events == []


def test_makeTLSRefusesCertificateWithoutKey(pair):
    with pytest.raises(ConfigurationError) as e:
        makeTLS(MailgateConfig(tlsCertificate=str(pair[0])))
    assert str(e.value) == "TLS needs both a certificate and a key"


def test_makeTLSRefusesKeyWithoutCertificate(pair):
    with pytest.raises(ConfigurationError) as e:
        makeTLS(MailgateConfig(tlsKey=str(pair[1])))
    assert str(e.value) == "TLS needs both a certificate and a key"


def test_makeTLSRefusesPOP3SWithoutCertificate():
    with pytest.raises(ConfigurationError) as e:
        makeTLS(MailgateConfig(pop3s=["tcp:0:interface=127.0.0.1"]))
    assert "implicit-TLS listeners need a certificate and a key" in str(e.value)


def test_aMinimumOfTLS13RefusesTLS12ClientsAndSurvivesAReload(pair):
    """
    tls-min-version 1.3: a client that speaks at most TLS 1.2 fails its
    handshake (the server says why), a TLS 1.3 client gets in, and a
    reload (SIGHUP) keeps the minimum.
    """
    config = MailgateConfig(tlsCertificate=str(pair[0]), tlsKey=str(pair[1]), tlsMinVersion="1.3")
    tls = makeTLS(config)
    assert tls.minimumVersion == "1.3"
    for _ in range(2):
        old = connect(tls, pair[0], maximum=ssl.TLSVersion.TLSv1_2)
        assert not old.ok
        assert "UNSUPPORTED_PROTOCOL" in str(old.serverError), old.serverError
        new = connect(tls, pair[0], minimum=ssl.TLSVersion.TLSv1_3)
        assert new.ok, (new.clientError, new.serverError)
        assert new.version == "TLSv1.3"
        tls.reload()


def test_theDefaultMinimumIsTLS12(pair):
    tls = makeTLS(MailgateConfig(tlsCertificate=str(pair[0]), tlsKey=str(pair[1])))
    assert tls.minimumVersion == "1.2"
    result = connect(tls, pair[0], maximum=ssl.TLSVersion.TLSv1_2)
    assert result.ok and result.version == "TLSv1.2"


def test_anUnknownMinimumVersionIsRefused(pair):
    with pytest.raises(ConfigurationError, match="TLS minimum version must be one of 1.2, 1.3, not '1.1'"):
        ServerTLS(str(pair[0]), str(pair[1]), minimumVersion="1.1")


def test_makeTLSWithoutCertificate():
    assert makeTLS(MailgateConfig()) is None


def test_makeTLSRefusesAnAlternativeCertificateWithoutKey(pair):
    with pytest.raises(ConfigurationError, match="needs both tls-alt-cert and tls-alt-key"):
        makeTLS(MailgateConfig(tlsCertificate=str(pair[0]), tlsKey=str(pair[1]), tlsAltCertificate=str(pair[0])))


def test_makeTLSRefusesAnAlternativeWithoutTheMainCertificate(pair):
    with pytest.raises(ConfigurationError, match="beside tls-cert and tls-key, which are not set"):
        makeTLS(MailgateConfig(tlsAltCertificate=str(pair[0]), tlsAltKey=str(pair[1])))


def test_makeTLSLoadsTheAlternative(dual):
    (rsaCertificate, rsaKey), (ecCertificate, ecKey), _ = dual
    tls = makeTLS(MailgateConfig(
        tlsCertificate=str(rsaCertificate), tlsKey=str(rsaKey),
        tlsAltCertificate=str(ecCertificate), tlsAltKey=str(ecKey),
    ))
    assert [c.keyType for c in tls.certificates] == ["RSA", "ECDSA"]


def test_makeTLSLoadsThePair(pair):
    tls = makeTLS(MailgateConfig(tlsCertificate=str(pair[0]), tlsKey=str(pair[1])))
    assert isinstance(tls, ServerTLS)
    assert tls.fingerprint == certificateFingerprint(pair[0])


def test_makeTLSReportsUnusableFiles(tmp_path, pair):
    with pytest.raises(ConfigurationError) as e:
        makeTLS(MailgateConfig(tlsCertificate=str(tmp_path / "nope.crt"), tlsKey=str(pair[1])))
    assert "cannot read TLS certificate or key" in str(e.value)


def test_makeTLSRefusesNamedCertificatesWithoutTheMainOne(pair):
    with pytest.raises(ConfigurationError, match="tls-sni-cert goes beside tls-cert and tls-key"):
        makeTLS(MailgateConfig(tlsNamedCertificates=[f"{pair[0]}:{pair[1]}"]))


@pytest.mark.parametrize("value", ["/etc/cert.pem", ":/etc/key.pem", "/etc/cert.pem:", "  "])
def test_aNamedCertificateWithoutItsKeyIsRefusedAsAnOption(value):
    from mailgate.tap import Options

    with pytest.raises(Exception, match="CERT:KEY|must not be empty"):
        Options().parseOptions(["--tls-sni-cert", value])


def test_makeTLSLoadsNamedCertificates(tmp_path, pair):
    net = makeCertificate(tmp_path, "mail.example.net", name="net")
    tls = makeTLS(
        MailgateConfig(tlsCertificate=str(pair[0]), tlsKey=str(pair[1]), tlsNamedCertificates=[f"{net[0]}:{net[1]}"])
    )
    assert [c.subject for c in tls.certificates] == [HOST, "mail.example.net"]


def test_anExpiryWarningSaysDayForOne(tmp_path):
    """
    "expires in 1 day", "expires in 2 days": the warning's noun follows
    the days left.
    """
    certificate, key = makeCertificate(tmp_path, HOST, days=30)
    tls = ServerTLS(str(certificate), str(key))
    [summary] = tls.certificates
    for days, said in ((1, "1 day"), (2, "2 days")):
        soon = summary.notAfter - datetime.timedelta(days=days, hours=1)
        assert tls.expiryWarnings(now=soon) == [
            f"the TLS certificate {HOST} (ECDSA) expires in {said}, on {summary.notAfter:%Y-%m-%d %H:%M} UTC"
        ]
