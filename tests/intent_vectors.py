#!/usr/bin/env python3
"""Independent implementation of the custos intent encoding (docs/approval-format.md).

Written from the specification alone, with the Python standard library only.
It re-encodes every vector's intent fields and checks the canonical bytes and
the SHA-256 intent hash published next to them.

    python3 tests/intent_vectors.py tests/vectors/intent.json
"""
import hashlib
import json
import struct
import sys

DOMAIN = b"custos/intent/v1"


def enc_str(text: str) -> bytes:
    raw = text.encode("utf-8")
    return struct.pack(">I", len(raw)) + raw


def u64(n: int) -> bytes:
    return struct.pack(">Q", n)


def u256(n: int) -> bytes:
    if not 0 <= n < 2**256:
        raise ValueError(f"{n} does not fit in 256 bits")
    return n.to_bytes(32, "big")


def encode(intent: dict) -> bytes:
    out = bytearray(DOMAIN)
    out += enc_str(intent["network"])
    asset = intent["asset"]
    out += enc_str(asset["symbol"])
    out += enc_str(asset["contract"])
    out += bytes([asset["decimals"]])
    out += enc_str(intent["from"])
    out += struct.pack(">I", len(intent["destinations"]))
    for dest in intent["destinations"]:
        out += enc_str(dest["to"]) + u256(int(dest["amount"]))
    fee = intent["fee"]
    if fee["kind"] == "ethereum":
        out += b"\x01" + u64(fee["nonce"]) + u64(fee["gas_limit"])
        out += u256(int(fee["max_fee_per_gas"])) + u256(int(fee["max_priority_fee_per_gas"]))
        out += u256(int(fee["max_total_fee"]))
    elif fee["kind"] == "bitcoin":
        out += b"\x02" + u256(int(fee["change"])) + u256(int(fee["fee"])) + u64(fee["vsize"])
    else:
        raise ValueError(f"unknown fee kind {fee['kind']!r}")
    tx_id = bytes.fromhex(intent["transaction_id"])
    if len(tx_id) != 32:
        raise ValueError("transaction_id must be 32 bytes")
    out += tx_id
    return bytes(out)


def main(path: str) -> int:
    with open(path, encoding="utf-8") as f:
        vectors = json.load(f)["vectors"]
    failed = 0
    for vector in vectors:
        encoded = encode(vector["intent"])
        digest = hashlib.sha256(encoded).hexdigest()
        ok = encoded.hex() == vector["canonical_hex"] and digest == vector["intent_hash"]
        print(f"{'ok  ' if ok else 'FAIL'} {vector['name']} {digest}")
        failed += not ok
    print(f"{len(vectors) - failed} passed, {failed} failed")
    return 1 if failed or not vectors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
