"""
SASL clients for the tests, written from the RFCs, not from mailgate's
code: SCRAM-SHA-256 (RFC 5802, RFC 7677) and CRAM-MD5 (RFC 2195).  The
in-memory SASL tests and the end-to-end TLS tests share them.

    from saslclients import ScramClient, cramMD5Response   # tests/ is on sys.path
"""

import base64
import hashlib
import hmac
import os


def b64(data):
    """
    Base64 text of C{data} (C{str} is encoded as UTF-8 first).
    """
    if isinstance(data, str):
        data = data.encode("utf-8")
    return base64.b64encode(data).decode("ascii")


def unb64(text):
    return base64.b64decode(text, validate=True)


def _hmac(key, message):
    return hmac.new(key, message, hashlib.sha256).digest()


def _xor(a, b):
    return bytes(x ^ y for x, y in zip(a, b))


def saslname(name):
    return name.replace("=", "=3D").replace(",", "=2C")


class ScramClient:
    """
    The client side of SCRAM-SHA-256 without channel binding.

    @param nonce: the client nonce; a random one by default.
    @param gs2: the GS2 header (C{"n,,"}: no channel binding, no authzid).
    """

    def __init__(self, username, password, nonce=None, gs2="n,,"):
        if nonce is None:
            nonce = base64.b64encode(os.urandom(18)).decode("ascii")
        self.username = username
        self.password = password
        self.clientNonce = nonce
        self.gs2 = gs2
        self.clientFirstBare = f"n={saslname(username)},r={nonce}"
        self.serverSignature = None

    def first(self):
        return (self.gs2 + self.clientFirstBare).encode("utf-8")

    def parseServerFirst(self, message):
        text = message.decode("utf-8")
        attributes = dict(item.split("=", 1) for item in text.split(","))
        assert set(attributes) == {"r", "s", "i"}, text
        assert text == f"r={attributes['r']},s={attributes['s']},i={attributes['i']}"
        return attributes["r"], unb64(attributes["s"]), int(attributes["i"])

    def final(self, serverFirst, nonce=None, channelBinding=None):
        """
        The client-final-message answering C{serverFirst}; C{nonce} and
        C{channelBinding} replace the correct values, for tampering.
        """
        serverNonce, salt, iterations = self.parseServerFirst(serverFirst)
        assert serverNonce.startswith(self.clientNonce) and len(serverNonce) > len(self.clientNonce)
        binding = channelBinding if channelBinding is not None else b64(self.gs2)
        withoutProof = f"c={binding},r={nonce if nonce is not None else serverNonce}"
        authMessage = ",".join([self.clientFirstBare, serverFirst.decode("utf-8"), withoutProof]).encode("utf-8")
        salted = hashlib.pbkdf2_hmac("sha256", self.password.encode("utf-8"), salt, iterations)
        clientKey = _hmac(salted, b"Client Key")
        storedKey = hashlib.sha256(clientKey).digest()
        proof = _xor(clientKey, _hmac(storedKey, authMessage))
        serverKey = _hmac(salted, b"Server Key")
        self.serverSignature = _hmac(serverKey, authMessage)
        return f"{withoutProof},p={b64(proof)}".encode("utf-8")

    def verify(self, serverFinal):
        return serverFinal == b"v=" + base64.b64encode(self.serverSignature)


def cramMD5Response(username, secret, challenge):
    """
    The client's answer to a CRAM-MD5 challenge (RFC 2195): the user name,
    a space and HMAC-MD5(secret, challenge) in lower-case hex.
    """
    digest = hmac.new(secret.encode("utf-8"), challenge, hashlib.md5).hexdigest()
    return f"{username} {digest}".encode("utf-8")
