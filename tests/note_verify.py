#!/usr/bin/env python3
"""Independent C2SP signed-note and tlog-checkpoint verifier.

Written from the specifications alone (c2sp.org/signed-note,
c2sp.org/tlog-checkpoint) and docs/audit-log.md, with the `cryptography`
package for the Ed25519 and ECDSA P-256 primitives:

    python3 tests/note_verify.py VERIFIER_KEY NOTE_FILE

VERIFIER_KEY is `name+hex(key id)+base64(type || key)`. Prints one JSON
object {origin, tree_size, root_hex, key_id_hex} and exits 0 when a signature
line by that key verifies; prints the reason and exits 1 otherwise.
"""
import base64
import hashlib
import json
import sys

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey


def refuse(reason):
    print(reason)
    sys.exit(1)


def parse_verifier(text):
    name, key_id_hex, key_b64 = text.strip().split("+", 2)
    typed = base64.b64decode(key_b64, validate=True)
    kind, key = typed[0], typed[1:]
    if kind == 0x01:
        if len(key) != 32:
            refuse("Ed25519 key is not 32 bytes")
        expected = hashlib.sha256(name.encode() + b"\n" + bytes([kind]) + key).digest()[:4]
        public = Ed25519PublicKey.from_public_bytes(key)
    elif kind == 0x02:
        # transparency-dev/witness ECDSA: key ID over the SPKI DER encoding.
        expected = hashlib.sha256(key).digest()[:4]
        public = serialization.load_der_public_key(key)
        if not isinstance(public, ec.EllipticCurvePublicKey):
            refuse("type 0x02 key is not an EC key")
    else:
        refuse(f"unknown signature type {kind:#04x}")
    if expected.hex() != key_id_hex:
        refuse("verifier key ID does not match its key")
    return name, expected, kind, public


def verify(public, kind, text, signature):
    try:
        if kind == 0x01:
            public.verify(signature, text)
        else:
            public.verify(signature, text, ec.ECDSA(hashes.SHA256()))
        return True
    except InvalidSignature:
        return False


def main():
    name, key_id, kind, public = parse_verifier(sys.argv[1])
    note = open(sys.argv[2], "rb").read().decode("utf-8")
    if any(ord(c) < 0x20 and c != "\n" for c in note):
        refuse("control character in note")
    split = note.rfind("\n\n")
    if split < 0:
        refuse("no blank line before the signatures")
    text, signatures = note[: split + 1], note[split + 2 :]
    if not signatures.endswith("\n"):
        refuse("note does not end in a newline")
    verified = False
    for line in signatures[:-1].split("\n"):
        if not line.startswith("\u2014 "):
            refuse("signature line does not start with an em dash")
        line_name, sig_b64 = line[2:].split(" ", 1)
        raw = base64.b64decode(sig_b64, validate=True)
        if line_name != name or raw[:4] != key_id:
            continue  # another key's signature: ignored, as the spec requires
        if not verify(public, kind, text.encode(), raw[4:]):
            refuse("signature by the pinned key does not verify")
        verified = True
    if not verified:
        refuse("no signature by the pinned key")
    lines = text.split("\n")
    origin, size, root = lines[0], lines[1], lines[2]
    if origin != name:
        refuse("checkpoint origin is not the key name")
    if not size.isdigit() or (len(size) > 1 and size[0] == "0"):
        refuse("tree size is not decimal")
    root = base64.b64decode(root, validate=True)
    if len(root) != 32:
        refuse("root hash is not 32 bytes")
    print(json.dumps({"origin": origin, "tree_size": int(size), "root_hex": root.hex(), "key_id_hex": key_id.hex()}))


if __name__ == "__main__":
    main()
