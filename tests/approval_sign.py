#!/usr/bin/env python3
"""Independent approver tool: builds and signs a custos approval message.

Written from docs/approval-format.md alone, with the Python standard library
only: the message encoding, SHA-256, and ECDSA over secp256k1 with RFC 6979
deterministic nonces and low-S normalisation, implemented here from the specs.

    python3 tests/approval_sign.py PRIVATE_KEY_HEX SERVICE_ID WITHDRAWAL_ID \\
        INTENT_HASH_HEX POLICY_HASH_HEX approve|reject EXPIRES_AT APPROVER

prints one JSON object: message_hex, digest_hex, signature_hex, public_key_hex.
"""
import hashlib
import hmac
import json
import struct
import sys

P = 2**256 - 2**32 - 977
N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
G = (0x79BE667EF9DCBBAC55A06295CE870B07029BFCDB2DCE28D959F2815B16F81798,
     0x483ADA7726A3C4655DA4FBFC0E1108A8FD17B448A68554199C47D08FFB10D4B8)


def point_add(a, b):
    if a is None:
        return b
    if b is None:
        return a
    if a[0] == b[0] and (a[1] + b[1]) % P == 0:
        return None
    if a == b:
        lam = 3 * a[0] * a[0] * pow(2 * a[1], -1, P) % P
    else:
        lam = (b[1] - a[1]) * pow(b[0] - a[0], -1, P) % P
    x = (lam * lam - a[0] - b[0]) % P
    return x, (lam * (a[0] - x) - a[1]) % P


def point_mul(k, point=G):
    result = None
    while k:
        if k & 1:
            result = point_add(result, point)
        point = point_add(point, point)
        k >>= 1
    return result


def rfc6979_nonce(secret: int, digest: bytes) -> int:
    x = secret.to_bytes(32, "big")
    h = (int.from_bytes(digest, "big") % N).to_bytes(32, "big")
    v, k = b"\x01" * 32, b"\x00" * 32
    k = hmac.new(k, v + b"\x00" + x + h, hashlib.sha256).digest()
    v = hmac.new(k, v, hashlib.sha256).digest()
    k = hmac.new(k, v + b"\x01" + x + h, hashlib.sha256).digest()
    v = hmac.new(k, v, hashlib.sha256).digest()
    while True:
        v = hmac.new(k, v, hashlib.sha256).digest()
        candidate = int.from_bytes(v, "big")
        if 1 <= candidate < N:
            return candidate
        k = hmac.new(k, v + b"\x00", hashlib.sha256).digest()
        v = hmac.new(k, v, hashlib.sha256).digest()


def sign(secret: int, digest: bytes) -> bytes:
    z = int.from_bytes(digest, "big") % N
    k = rfc6979_nonce(secret, digest)
    r = point_mul(k)[0] % N
    s = pow(k, -1, N) * (z + r * secret) % N
    if s > N // 2:  # low-S, as custos requires
        s = N - s
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def enc_id(text: str) -> bytes:
    raw = text.encode("utf-8")
    assert 1 <= len(raw) <= 128
    return struct.pack(">H", len(raw)) + raw


def approval_message(service, withdrawal, intent_hash, policy_hash, vote, expires_at, approver) -> bytes:
    return (b"custos/approval/v1" + enc_id(service) + enc_id(withdrawal)
            + bytes.fromhex(intent_hash) + bytes.fromhex(policy_hash)
            + {"approve": b"\x01", "reject": b"\x02"}[vote]
            + struct.pack(">Q", int(expires_at)) + enc_id(approver))


def main(argv):
    secret = int(argv[1], 16)
    message = approval_message(*argv[2:9])
    digest = hashlib.sha256(message).digest()
    x, y = point_mul(secret)
    public = bytes([2 + (y & 1)]) + x.to_bytes(32, "big")
    print(json.dumps({
        "message_hex": message.hex(),
        "digest_hex": digest.hex(),
        "signature_hex": sign(secret, digest).hex(),
        "public_key_hex": public.hex(),
    }))


if __name__ == "__main__":
    main(sys.argv)
