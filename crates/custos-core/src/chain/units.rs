//! Units and addresses as people and requests write them: decimal amounts
//! of base units and 0x-prefixed Ethereum addresses. The gRPC conversions,
//! the policy language and the CLI all parse them here, with one meaning.

use alloy_primitives::{Address, U256};

/// Longest decimal accepted for an amount: 2^256 - 1 has 78 digits.
const MAX_DECIMAL_DIGITS: usize = 78;

/// What [`decimal`] answers for a number above 2^256 - 1.
pub const TOO_LARGE: &str = "exceeds 2^256 - 1";

/// A decimal amount: digits only, no sign, no leading zeros, below 2^256.
/// The empty string is 0.
///
/// ```
/// use alloy_primitives::U256;
/// use custos_core::chain::units::decimal;
///
/// assert_eq!(decimal("1000000000000000000"), Ok(U256::from(10u64).pow(U256::from(18u64))));
/// assert_eq!(decimal(""), Ok(U256::ZERO));
/// assert!(decimal("01").is_err());
/// assert!(decimal("1.5").is_err());
/// ```
pub fn decimal(text: &str) -> Result<U256, &'static str> {
    if text.is_empty() {
        return Ok(U256::ZERO);
    }
    if !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err("must be a decimal integer of base units (digits only)");
    }
    if text.len() > 1 && text.starts_with('0') {
        return Err("must not have leading zeros");
    }
    if text.len() > MAX_DECIMAL_DIGITS {
        return Err(TOO_LARGE);
    }
    U256::from_str_radix(text, 10).map_err(|_| TOO_LARGE)
}

/// What [`address`] answers for a mixed-case address whose EIP-55 checksum
/// fails, so that callers can tell it from a malformed one.
pub const BAD_CHECKSUM: &str = "has an invalid EIP-55 checksum";

/// A 0x-prefixed address; mixed-case input must carry a valid EIP-55 checksum.
///
/// ```
/// use custos_core::chain::units::address;
///
/// assert!(address("0x9d8a62f656a8d1615c1294fd71e9cfb3e4855a4f").is_ok());
/// assert!(address("0x9d8A62f656a8d1615C1294fd71e9CFb3E4855A4F").is_ok());
/// assert_eq!(
///     address("0x9D8A62f656a8d1615C1294fd71e9CFb3E4855A4F"),
///     Err("has an invalid EIP-55 checksum")
/// );
/// ```
pub fn address(text: &str) -> Result<Address, &'static str> {
    let hex_part = text.strip_prefix("0x").ok_or("must start with 0x")?;
    if hex_part.len() != 40 || !hex_part.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err("must be 0x followed by 40 hex digits");
    }
    let mixed =
        hex_part.bytes().any(|b| b.is_ascii_uppercase()) && hex_part.bytes().any(|b| b.is_ascii_lowercase());
    if mixed {
        Address::parse_checksummed(text, None).map_err(|_| BAD_CHECKSUM)
    } else {
        text.parse().map_err(|_| "is not a valid address")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_bounds() {
        assert_eq!(decimal("0").unwrap(), U256::ZERO);
        assert_eq!(decimal(&U256::MAX.to_string()).unwrap(), U256::MAX);
        assert!(
            decimal("115792089237316195423570985008687907853269984665640564039457584007913129639936")
                .is_err()
        );
        assert!(decimal(" 1").is_err());
    }
}
