#!/usr/bin/env python3
"""Writes the seed inputs of every fuzz target, built from the project's own
test vectors, into OUT_DIR/<target>/ (scripts/fuzz.sh runs this into the
corpus directories before fuzzing).

Sources:
- tests/vectors/intent.json: each Ethereum intent becomes its unsigned
  transaction (legacy EIP-155 and EIP-1559 forms), the Bitcoin intent a PSBT
  spending the wallet's P2WPKH outputs (the generator key, as in the pure
  tests);
- docs/approval-format.md: the approval and governance message vectors, with
  and without their signatures;
- docs/policy-example.toml: the policy, as is.
The gRPC seeds wrap the same inputs in their request messages, behind the
selector byte of fuzz/fuzz_targets/grpc_requests.rs.

Standard library only. A source that cannot be read is reported on stderr
and skipped; the committed seeds in fuzz/seeds/ still apply.
"""

import hashlib
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# P2WPKH program of the secp256k1 generator point: the pure tests' wallet.
WALLET_PROGRAM = bytes.fromhex("751e76e8199196d454941c45d1b3a323f1433bd6")

# Selector bytes of grpc_requests.rs (index into its REQUESTS).
CREATE_WALLET, GET_WALLET, LIST_WALLETS, CREATE_WITHDRAWAL, GET_WITHDRAWAL = 0, 1, 2, 3, 4
LIST_WITHDRAWALS, SUBMIT_APPROVAL, PROPOSE_POLICY = 5, 9, 11
APPROVE_POLICY, FREEZE, UNFREEZE, INCLUSION, CONSISTENCY = 12, 13, 14, 19, 20


# --- RLP and the Ethereum transactions --------------------------------------

def rlp_int(n):
    return rlp_bytes(n.to_bytes((n.bit_length() + 7) // 8, "big") if n else b"")


def rlp_bytes(b):
    if len(b) == 1 and b[0] < 0x80:
        return b
    return rlp_length(len(b), 0x80) + b


def rlp_list(items):
    body = b"".join(items)
    return rlp_length(len(body), 0xC0) + body


def rlp_length(n, offset):
    if n < 56:
        return bytes([offset + n])
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([offset + 55 + len(size)]) + size


def transfer_call(to, amount):
    return bytes.fromhex("a9059cbb") + bytes(12) + to + amount.to_bytes(32, "big")


def ethereum_txs(intent):
    """The legacy (EIP-155) and EIP-1559 unsigned encodings of an intent."""
    fee = intent["fee"]
    chain_id = int(intent["network"].split(":")[1])
    dest = intent["destinations"][0]
    to_addr = bytes.fromhex(dest["to"][2:])
    amount = int(dest["amount"])
    contract = intent["asset"]["contract"]
    if contract:
        to, value, data = bytes.fromhex(contract[2:]), 0, transfer_call(to_addr, amount)
    else:
        to, value, data = to_addr, amount, b""
    nonce, gas = int(fee["nonce"]), int(fee["gas_limit"])
    max_fee, priority = int(fee["max_fee_per_gas"]), int(fee["max_priority_fee_per_gas"])
    legacy = rlp_list([rlp_int(nonce), rlp_int(max_fee), rlp_int(gas), rlp_bytes(to), rlp_int(value),
                       rlp_bytes(data), rlp_int(chain_id), rlp_int(0), rlp_int(0)])
    eip1559 = b"\x02" + rlp_list([rlp_int(chain_id), rlp_int(nonce), rlp_int(priority), rlp_int(max_fee),
                                  rlp_int(gas), rlp_bytes(to), rlp_int(value), rlp_bytes(data), rlp_list([])])
    fields = {"chain_id": chain_id, "nonce": nonce, "gas_limit": gas, "max_fee": max_fee,
              "priority": priority, "to": "0x" + to.hex(), "value": value, "data": data}
    return legacy, eip1559, fields


# --- Bitcoin: bech32, transactions, PSBT -------------------------------------

BECH32 = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"


def segwit_script(address):
    """scriptPubKey of a bech32 (witness v0) address; no checksum check."""
    data = [BECH32.index(c) for c in address[address.rindex("1") + 1:-6]]
    version, acc, bits, program = data[0], 0, 0, bytearray()
    for v in data[1:]:
        acc, bits = (acc << 5) | v, bits + 5
        if bits >= 8:
            bits -= 8
            program.append((acc >> bits) & 0xFF)
    return bytes([version, len(program)]) + bytes(program)


def varint(n):
    if n < 0xFD:
        return bytes([n])
    if n <= 0xFFFF:
        return b"\xfd" + n.to_bytes(2, "little")
    return b"\xfe" + n.to_bytes(4, "little")


def txout(sat, script):
    return sat.to_bytes(8, "little") + varint(len(script)) + script


def tx(version, inputs, outputs, lock_time):
    """Non-witness serialization; inputs are (txid, vout, sequence)."""
    out = version.to_bytes(4, "little") + varint(len(inputs))
    for txid, vout, sequence in inputs:
        out += txid + vout.to_bytes(4, "little") + b"\x00" + sequence.to_bytes(4, "little")
    out += varint(len(outputs)) + b"".join(outputs)
    return out + lock_time.to_bytes(4, "little")


def psbt_pair(key, value):
    return varint(len(key)) + key + varint(len(value)) + value


def bitcoin_psbt(intent):
    """A PSBT as the pure tests build it: one previous transaction per input,
    paying the input's amount to the wallet at output i."""
    fee = intent["fee"]
    own = bytes([0, 20]) + WALLET_PROGRAM
    outputs = [(int(d["amount"]), segwit_script(d["to"])) for d in intent["destinations"]]
    change = int(fee["change"])
    if change:
        outputs.append((change, own))
    total = sum(sat for sat, _ in outputs) + int(fee["fee"])
    amounts = [50_000, total - 50_000] if total > 50_000 else [total]
    previous, inputs = [], []
    for i, sat in enumerate(amounts):
        outs = [txout(sat if j == i else 1, own) for j in range(i + 1)]
        legacy = tx(2, [], outs, i)
        inputs.append((hashlib.sha256(hashlib.sha256(legacy).digest()).digest(), i, 0xFFFFFFFD))
        # Without inputs the plain encoding would read as a segwit marker:
        # rust-bitcoin writes such a transaction in the extended format.
        previous.append(legacy[:4] + b"\x00\x01" + legacy[4:])
    unsigned = tx(2, inputs, [txout(sat, script) for sat, script in outputs], 0)
    txid = hashlib.sha256(hashlib.sha256(unsigned).digest()).digest().hex()  # internal byte order
    if txid != intent["transaction_id"]:
        print(f"make_seeds: note: PSBT txid {txid} differs from the vector's", file=sys.stderr)
    out = b"psbt\xff" + psbt_pair(b"\x00", unsigned) + b"\x00"
    for i, (p, sat) in enumerate(zip(previous, amounts)):
        out += psbt_pair(b"\x00", p) + psbt_pair(b"\x01", txout(sat, own)) + b"\x00"
    out += b"\x00" * len(outputs)
    return out


# --- Protobuf ------------------------------------------------------------------

def pb_varint(n):
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def pb(fields):
    """Encodes [(number, value)]: int as varint, str/bytes as length-delimited."""
    out = b""
    for number, value in fields:
        if isinstance(value, int):
            out += pb_varint(number << 3) + pb_varint(value)
        else:
            value = value.encode() if isinstance(value, str) else value
            out += pb_varint(number << 3 | 2) + pb_varint(len(value)) + value
    return out


def create_withdrawal(transaction):
    return pb([(1, "req-1"), (2, "wallets/hot"), (3, transaction), (4, "backend")])


# --- The vectors ---------------------------------------------------------------

def signed_message_vectors(text):
    """(message, signature) pairs from docs/approval-format.md."""
    pairs = []
    for block in re.findall(r"```\n(message .*?)```", text, re.S):
        parts = {}
        key = None
        for line in block.splitlines():
            head = line[:9].strip()
            if head:
                key = head
            parts.setdefault(key, "")
            parts[key] += line[9:].split("(")[0].strip()
        if "message" in parts and "r || s" in parts:
            pairs.append((bytes.fromhex(parts["message"]), bytes.fromhex(parts["r || s"])))
    return pairs


def main(out_dir):
    seeds = {t: [] for t in ("ethereum_tx", "psbt", "policy_document", "approval_message", "grpc_requests")}
    grpc = seeds["grpc_requests"]

    def source(name, build):
        try:
            build()
        except (OSError, ValueError, KeyError, IndexError) as e:
            print(f"make_seeds: skipped {name}: {e!r}", file=sys.stderr)

    def intents():
        for vector in json.loads((ROOT / "tests/vectors/intent.json").read_text())["vectors"]:
            intent = vector["intent"]
            if intent["fee"]["kind"] == "ethereum":
                legacy, eip1559, f = ethereum_txs(intent)
                seeds["ethereum_tx"] += [legacy, eip1559]
                for raw in (legacy, eip1559):
                    grpc.append(bytes([CREATE_WITHDRAWAL]) + create_withdrawal(pb([(1, pb([(1, raw)]))])))
                fields = pb([(1, 2), (2, f["chain_id"]), (3, f["nonce"]), (4, f["gas_limit"]),
                             (6, str(f["max_fee"])), (7, str(f["priority"])), (8, f["to"]),
                             (9, str(f["value"])), (10, f["data"])])
                grpc.append(bytes([CREATE_WITHDRAWAL]) + create_withdrawal(pb([(1, pb([(2, fields)]))])))
            else:
                psbt = bitcoin_psbt(intent)
                seeds["psbt"].append(psbt)
                grpc.append(bytes([CREATE_WITHDRAWAL]) + create_withdrawal(pb([(2, pb([(1, psbt)]))])))

    def messages():
        for message, signature in signed_message_vectors((ROOT / "docs/approval-format.md").read_text()):
            seeds["approval_message"] += [message, message + signature]
            signed = pb([(1, message), (2, signature)])
            if message.startswith(b"custos/approval/"):
                grpc.append(bytes([SUBMIT_APPROVAL]) + signed)
            else:
                for selector in (APPROVE_POLICY, FREEZE):
                    grpc.append(bytes([selector]) + pb([(1, signed)]))
                grpc.append(bytes([UNFREEZE]) + pb([(1, signed), (1, signed)]))

    def policy():
        document = (ROOT / "docs/policy-example.toml").read_bytes()
        seeds["policy_document"].append(document)
        grpc.append(bytes([PROPOSE_POLICY]) + pb([(1, document)]))

    source("tests/vectors/intent.json", intents)
    source("docs/approval-format.md", messages)
    source("docs/policy-example.toml", policy)
    grpc += [
        bytes([CREATE_WALLET]) + pb([(1, "hot"), (2, pb([(2, "Hot wallet")]))]),
        bytes([GET_WALLET]) + pb([(1, "wallets/hot")]),
        bytes([LIST_WALLETS]) + pb([(1, 10), (2, "5")]),
        bytes([GET_WITHDRAWAL]) + pb([(1, "withdrawals/wd_" + "0a" * 16)]),
        bytes([LIST_WITHDRAWALS]) + pb([(1, 50), (2, "17"), (3, 1)]),
        bytes([INCLUSION]) + pb([(1, 5), (2, 1000)]),
        bytes([CONSISTENCY]) + pb([(1, 7), (2, 1000)]),
    ]
    for target, inputs in seeds.items():
        directory = Path(out_dir) / target
        directory.mkdir(parents=True, exist_ok=True)
        for data in inputs:
            (directory / ("seed-" + hashlib.sha256(data).hexdigest()[:16])).write_bytes(data)
        print(f"make_seeds: {target}: {len(inputs)} seeds", file=sys.stderr)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: make_seeds.py OUT_DIR")
    main(sys.argv[1])
