"""
Signing keys and JWT access tokens for the OAUTHBEARER and XOAUTH2 tests,
made here with C{cryptography} keys, as an identity provider makes them:
a JWKS file (RSA and EC keys, each with its C{kid}) and a PEM file (an
Ed25519 key), and tokens signed with any of them or with keys the server
does not know.
"""

import base64
import hashlib
import hmac
import json
import time

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

ISSUER = "https://login.example.test/realms/mail"
AUDIENCE = "mailgate"


def _b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _octets(number):
    return number.to_bytes((number.bit_length() + 7) // 8, "big")


class Keys:
    """
    An RSA, an EC P-256 and an Ed25519 key the server is given, and an RSA
    key it is not.
    """

    def __init__(self):
        self.rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.ec = ec.generate_private_key(ec.SECP256R1())
        self.ed = ed25519.Ed25519PrivateKey.generate()
        self.stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def write(self, directory):
        """
        Write C{jwks.json} (the RSA and EC keys) and C{ed25519.pem}; return
        their paths.
        """
        jwks = {"keys": []}
        # Written out here, as RFC 7518 has them (EC coordinates of the
        # curve's full size): PyJWT's own to_jwk dropped a coordinate's
        # leading zero octets before 2.9, a JWK its from_jwk then refuses.
        numbers = self.rsa.public_key().public_numbers()
        jwks["keys"].append({"kty": "RSA", "kid": "rsa-1", "use": "sig", "alg": "RS256",
                             "n": _b64url(_octets(numbers.n)), "e": _b64url(_octets(numbers.e))})
        point = self.ec.public_key().public_numbers()
        jwks["keys"].append({"kty": "EC", "kid": "ec-1", "use": "sig", "alg": "ES256", "crv": "P-256",
                             "x": _b64url(point.x.to_bytes(32, "big")), "y": _b64url(point.y.to_bytes(32, "big"))})
        # A shared secret in the set is never used.
        jwks["keys"].append({"kty": "oct", "kid": "hmac", "k": _b64url(b"secret" * 6)})
        jwksPath = directory / "jwks.json"
        jwksPath.write_text(json.dumps(jwks))
        pemPath = directory / "ed25519.pem"
        pemPath.write_bytes(self.publicPEM(self.ed))
        return jwksPath, pemPath

    @staticmethod
    def publicPEM(key):
        return key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def token(self, email="alice@example.org", alg="RS256", key=None, kid="default", now=None, **claims):
        """
        A signed access token for C{email}.  C{claims} override or add
        claims (C{None} removes one).
        """
        now = time.time() if now is None else now
        body = {"iss": ISSUER, "aud": AUDIENCE, "sub": "1234", "email": email,
                "iat": int(now), "nbf": int(now), "exp": int(now) + 300}
        body.update(claims)
        body = {name: value for name, value in body.items() if value is not None}
        if key is None:
            key = {"RS256": self.rsa, "ES256": self.ec, "EdDSA": self.ed}[alg]
        if kid == "default":
            kid = {"RS256": "rsa-1", "ES256": "ec-1"}.get(alg)
        headers = {"kid": kid} if kid else None
        return jwt.encode(body, key, algorithm=alg, headers=headers)


def unsignedToken(**claims):
    """
    A token with C{alg: none} and no signature.
    """
    header = _b64url(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    return f"{header}.{_b64url(json.dumps(claims).encode())}."


def hmacToken(secret, **claims):
    """
    A token signed HS256 with C{secret} (the attack: the server's public
    key taken for an HMAC secret).
    """
    header = _b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    signingInput = f"{header}.{_b64url(json.dumps(claims).encode())}"
    signature = hmac.new(secret, signingInput.encode(), hashlib.sha256).digest()
    return f"{signingInput}.{_b64url(signature)}"


def oauthbearer(token, authzid=""):
    """
    An OAUTHBEARER client message (RFC 7628 section 3.1).
    """
    gs2 = f"n,a={authzid}," if authzid else "n,,"
    return f"{gs2}\x01host=mail.example.test\x01port=995\x01auth=Bearer {token}\x01\x01".encode()


def xoauth2(user, token):
    """
    An XOAUTH2 client message (Google's and Microsoft's).
    """
    return f"user={user}\x01auth=Bearer {token}\x01\x01".encode()
