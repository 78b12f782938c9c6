#!/usr/bin/python3
"""Tokens and key sets for test_jwks.c, made by an implementation that is not
Parley's (PyJWT and cryptography, Debian's python3-jwt): fresh keys each run.

  jwt_fixtures.py DIR NOW

writes DIR/jwks-1.json (kids rsa-1, ec-1, ed-1, ec-short whose x lost its leading
zero byte, and keys Parley must skip),
DIR/jwks-2.json (the rotation: rsa-2 only), DIR/jwks-weak.json (a 1024-bit
RSA key, refused), and DIR/tokens.tsv: one line per token,
"name<TAB>keyset<TAB>expected<TAB>token", expected being "ok" or a piece of
the error auth_verify must give, against keyset 1 or 2 (the live file's
content when the token is checked). Times are relative to NOW. The verifier
expects iss ISSUER, aud AUDIENCE, HS256 secret SECRET, leeway 60 s.
"""
import base64
import hashlib
import hmac
import json
import os
import sys

import jwt
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

ISSUER = "https://idp.example.test/"
AUDIENCE = "parley"
SECRET = "test-secret"


def b64(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwk(to_jwk, pub, **extra):
    k = json.loads(to_jwk(pub))
    k.update(extra)
    return k


def short_coordinate_key():
    """A P-256 key whose x has a leading zero byte (one in 256)."""
    while True:
        k = ec.generate_private_key(ec.SECP256R1())
        if k.public_key().public_numbers().x < 1 << 248:
            return k


def short_coordinate_jwk(key, **extra):
    """x and y as unsigned integers without leading zero bytes, as PyJWT
    before 2.8 writes them: not RFC 7518's full length, but seen in the wild."""
    n = key.public_key().public_numbers()
    def uint(v):
        return b64(v.to_bytes((v.bit_length() + 7) // 8, "big"))
    k = {"kty": "EC", "crv": "P-256", "x": uint(n.x), "y": uint(n.y)}
    k.update(extra)
    return k


def main():
    out, now = sys.argv[1], int(sys.argv[2])
    rsa1 = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    rsa2 = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    ec1 = ec.generate_private_key(ec.SECP256R1())
    ed1 = ed25519.Ed25519PrivateKey.generate()
    p384 = ec.generate_private_key(ec.SECP384R1())
    short = short_coordinate_key()

    set1 = {"keys": [
        jwk(RSAAlgorithm.to_jwk, rsa1.public_key(), kid="rsa-1", use="sig", alg="RS256"),
        jwk(ECAlgorithm.to_jwk, ec1.public_key(), kid="ec-1", use="sig"),
        jwk(OKPAlgorithm.to_jwk, ed1.public_key(), kid="ed-1"),
        short_coordinate_jwk(short, kid="ec-short"),
        # Skipped, not errors: an encryption key, another RSA algorithm, a
        # curve Parley does not verify, a symmetric key.
        jwk(RSAAlgorithm.to_jwk, rsa2.public_key(), kid="enc-1", use="enc"),
        jwk(RSAAlgorithm.to_jwk, rsa2.public_key(), kid="rs512-1", alg="RS512"),
        jwk(ECAlgorithm.to_jwk, p384.public_key(), kid="p384-1"),
        {"kty": "oct", "kid": "oct-1", "k": b64(b"jwks-oct-secret")},
    ]}
    set2 = {"keys": [jwk(RSAAlgorithm.to_jwk, rsa2.public_key(), kid="rsa-2")]}
    setw = {"keys": [jwk(RSAAlgorithm.to_jwk, weak.public_key(), kid="weak")]}
    for name, ks in (("jwks-1", set1), ("jwks-2", set2), ("jwks-weak", setw)):
        with open(os.path.join(out, name + ".json"), "w") as f:
            json.dump(ks, f)

    def claims(**over):
        c = {"sub": "alice", "iss": ISSUER, "aud": AUDIENCE, "iat": now - 5, "exp": now + 300}
        c.update(over)
        return {k: v for k, v in c.items() if v is not None}

    def tok(key, alg, kid=None, headers=None, **over):
        h = dict(headers or {})
        if kid is not None:
            h["kid"] = kid
        return jwt.encode(claims(**over), key, algorithm=alg, headers=h or None)

    def by_hand(header, body, sign):
        data = b64(json.dumps(header).encode()) + "." + b64(json.dumps(body).encode())
        return data + "." + b64(sign(data.encode()))

    rsa1_pem = rsa1.public_key().public_bytes(serialization.Encoding.PEM,
                                              serialization.PublicFormat.SubjectPublicKeyInfo)
    der_sig = by_hand({"alg": "ES256", "kid": "ec-1"}, claims(),
                      lambda d: ec1.sign(d, ec.ECDSA(hashes.SHA256())))
    good = tok(rsa1, "RS256", "rsa-1")
    other = tok(rsa1, "RS256", "rsa-1", sub="mallory")
    spliced = ".".join([good.split(".")[0], other.split(".")[1], good.split(".")[2]])

    rows = [
        ("rs256", 1, "ok", good),
        ("es256_aud_in_array", 1, "ok", tok(ec1, "ES256", "ec-1", aud=["other", AUDIENCE])),
        ("eddsa", 1, "ok", tok(ed1, "EdDSA", "ed-1")),
        ("es256_short_coordinate", 1, "ok", tok(short, "ES256", "ec-short")),
        ("hs256", 1, "ok", tok(SECRET, "HS256")),
        ("rs256_no_kid_one_rsa_key", 1, "ok", tok(rsa1, "RS256")),
        ("expired_within_leeway", 1, "ok", tok(rsa1, "RS256", "rsa-1", exp=now - 30)),
        ("nbf_within_leeway", 1, "ok", tok(rsa1, "RS256", "rsa-1", nbf=now + 30)),
        ("alg_none", 1, "alg must be", jwt.encode(claims(), None, algorithm="none")),
        ("alg_confusion_hs256_with_rsa_public_key", 1, "signature does not match",
         by_hand({"alg": "HS256", "kid": "rsa-1"}, claims(),
                 lambda d: hmac.new(rsa1_pem, d, hashlib.sha256).digest())),
        ("alg_rs256_on_an_ec_kid", 1, "names no RS256 key", tok(rsa1, "RS256", "ec-1")),
        ("oct_key_is_never_an_hmac_secret", 1, "signature does not match",
         by_hand({"alg": "HS256", "kid": "oct-1"}, claims(),
                 lambda d: hmac.new(b"jwks-oct-secret", d, hashlib.sha256).digest())),
        ("wrong_kid", 1, "names no RS256 key", tok(rsa1, "RS256", "rsa-9")),
        ("skipped_enc_key", 1, "names no RS256 key", tok(rsa2, "RS256", "enc-1")),
        ("signed_by_another_key", 1, "signature does not match", tok(rsa2, "RS256", "rsa-1")),
        ("claims_spliced", 1, "signature does not match", spliced),
        ("es256_der_signature", 1, "signature does not match", der_sig),
        ("expired", 1, "expired", tok(rsa1, "RS256", "rsa-1", iat=now - 400, exp=now - 61)),
        ("not_yet_valid", 1, "nbf is in the future", tok(ed1, "EdDSA", "ed-1", nbf=now + 120)),
        ("wrong_aud", 1, "aud", tok(ec1, "ES256", "ec-1", aud="someone-else")),
        ("no_aud", 1, "aud", tok(ec1, "ES256", "ec-1", aud=None)),
        ("wrong_iss", 1, "iss", tok(rsa1, "RS256", "rsa-1", iss="https://evil.example/")),
        ("crit_header", 1, "crit", tok(rsa1, "RS256", "rsa-1", headers={"crit": ["exp"]})),
        ("bad_sub", 1, "sub", tok(rsa1, "RS256", "rsa-1", sub="alice|idp")),
        ("new_kid_before_rotation", 1, "names no RS256 key", tok(rsa2, "RS256", "rsa-2")),
        ("new_kid_after_rotation", 2, "ok", tok(rsa2, "RS256", "rsa-2")),
        ("old_kid_after_rotation", 2, "names no RS256 key", good),
    ]
    with open(os.path.join(out, "tokens.tsv"), "w") as f:
        for name, ks, want, t in rows:
            f.write(f"{name}\t{ks}\t{want}\t{t}\n")


if __name__ == "__main__":
    main()
