//! Addresses derived from a wallet's HSM public key, using each chain's own library.
//!
//! - Ethereum: keccak-256 of the uncompressed point, last 20 bytes, EIP-55
//!   checksummed (`alloy-primitives`).
//! - Bitcoin: P2WPKH (BIP-84 style native SegWit v0) over the compressed point,
//!   bech32 for the configured network (`bitcoin`).

use k256::ecdsa::VerifyingKey;

/// The Ethereum address of a public key.
pub fn ethereum_address(key: &VerifyingKey) -> alloy_primitives::Address {
    let uncompressed = key.to_sec1_point(false);
    // SEC1 uncompressed is 0x04 || x || y; the address hashes x || y.
    alloy_primitives::Address::from_raw_public_key(&uncompressed.as_bytes()[1..])
}

/// The EIP-55 checksummed Ethereum address of a public key.
pub fn ethereum_address_checksummed(key: &VerifyingKey) -> String {
    ethereum_address(key).to_checksum(None)
}

/// The compressed public key in rust-bitcoin's type.
pub fn bitcoin_public_key(key: &VerifyingKey) -> bitcoin::CompressedPublicKey {
    let compressed = key.to_sec1_point(true);
    // A k256 key is always a valid curve point, and secp256k1 (the C library)
    // accepts every valid compressed point.
    bitcoin::CompressedPublicKey::from_slice(compressed.as_bytes())
        .unwrap_or_else(|_| unreachable!("k256 verifying key is a valid compressed point"))
}

/// The P2WPKH address of a public key on `network`.
pub fn bitcoin_p2wpkh_address(key: &VerifyingKey, network: bitcoin::Network) -> bitcoin::Address {
    bitcoin::Address::p2wpkh(&bitcoin_public_key(key), network)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(sec1_hex: &str) -> VerifyingKey {
        VerifyingKey::from_sec1_bytes(&hex::decode(sec1_hex).unwrap()).unwrap()
    }

    /// The generator point: the public key of private key 1.
    const G: &str = "0279BE667EF9DCBBAC55A06295CE870B07029BFCDB2DCE28D959F2815B16F81798";

    #[test]
    fn ethereum_known_answers() {
        // Private key 1: the widely published address of the generator point.
        assert_eq!(
            ethereum_address_checksummed(&key(G)),
            "0x7E5F4552091A69125d5DfCb7b8C2659029395Bdf"
        );
        // EIP-155's example key 0x4646..46 signs from this published address.
        let eip155 = k256::ecdsa::SigningKey::from_slice(&[0x46; 32]).unwrap();
        assert_eq!(
            ethereum_address_checksummed(eip155.verifying_key()),
            "0x9d8A62f656a8d1615C1294fd71e9CFb3E4855A4F"
        );
    }

    #[test]
    fn bitcoin_known_answers_from_bip173() {
        // BIP-173's P2WPKH example uses the generator point.
        assert_eq!(
            bitcoin_p2wpkh_address(&key(G), bitcoin::Network::Bitcoin).to_string(),
            "bc1qw508d6qejxtdg4y5r3zarvary0c5xw7kv8f3t4"
        );
        assert_eq!(
            bitcoin_p2wpkh_address(&key(G), bitcoin::Network::Testnet).to_string(),
            "tb1qw508d6qejxtdg4y5r3zarvary0c5xw7kxpjzsx"
        );
        assert_eq!(
            bitcoin_p2wpkh_address(&key(G), bitcoin::Network::Regtest).to_string(),
            "bcrt1qw508d6qejxtdg4y5r3zarvary0c5xw7kygt080"
        );
    }
}
