//! Safety numbers: a fingerprint of two accounts' identity keys that both
//! people can compare, in person or over another channel. If the server
//! substituted a key, the numbers differ.
//!
//! Construction (as Signal's numeric fingerprints): for each party,
//! SHA-512 iterated 5200 times over version, key and account ID, the first
//! 30 bytes read as six 5-digit groups; the two halves are ordered by
//! account ID so both sides see the same 60 digits.

use sha2::{Digest, Sha512};
use umbra_proto::{AccountId, IdentityKey};

const VERSION: &[u8] = b"umbra-safety-number-v1";
const ITERATIONS: usize = 5200;

/// Sixty digits in twelve groups of five, the same on both devices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SafetyNumber {
    pub digits: String,
}

fn half(account: &AccountId, key: &IdentityKey) -> String {
    let mut hash = Sha512::new()
        .chain_update(VERSION)
        .chain_update(key.as_bytes())
        .chain_update(account.as_str().as_bytes())
        .finalize();
    for _ in 1..ITERATIONS {
        hash = Sha512::new()
            .chain_update(hash)
            .chain_update(key.as_bytes())
            .finalize();
    }
    hash.chunks(5)
        .take(6)
        .map(|chunk| {
            let value = chunk.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
            format!("{:05}", value % 100_000)
        })
        .collect::<Vec<_>>()
        .join(" ")
}

impl SafetyNumber {
    pub fn new(a: (&AccountId, &IdentityKey), b: (&AccountId, &IdentityKey)) -> SafetyNumber {
        let (first, second) = if a.0 <= b.0 { (a, b) } else { (b, a) };
        SafetyNumber {
            digits: format!("{} {}", half(first.0, first.1), half(second.0, second.1)),
        }
    }

    /// The digits as a QR code of Unicode half blocks, for a terminal.
    pub fn qr(&self) -> Option<String> {
        qr_text(&format!("umbra-safety:{}", self.digits.replace(' ', "")))
    }
}

/// Renders `text` as a QR code of Unicode half blocks, for a terminal.
pub fn qr_text(text: &str) -> Option<String> {
    let code = qrcode::QrCode::new(text.as_bytes()).ok()?;
    Some(
        code.render::<qrcode::render::unicode::Dense1x2>()
            .dark_color(qrcode::render::unicode::Dense1x2::Light)
            .light_color(qrcode::render::unicode::Dense1x2::Dark)
            .build(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(text: &str) -> AccountId {
        AccountId::parse(text).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn both_sides_agree_and_any_key_change_shows() {
        let (alice, bob) = (id("AAAAAAAA"), id("BBBBBBBB"));
        let (ka, kb) = (
            IdentityKey::from_bytes([1; 32]),
            IdentityKey::from_bytes([2; 32]),
        );
        let from_alice = SafetyNumber::new((&alice, &ka), (&bob, &kb));
        let from_bob = SafetyNumber::new((&bob, &kb), (&alice, &ka));
        assert_eq!(from_alice, from_bob);
        assert_eq!(from_alice.digits.split(' ').count(), 12);
        assert!(
            from_alice
                .digits
                .chars()
                .all(|c| c.is_ascii_digit() || c == ' ')
        );
        let swapped = SafetyNumber::new((&alice, &IdentityKey::from_bytes([3; 32])), (&bob, &kb));
        assert_ne!(from_alice, swapped);
        assert!(from_alice.qr().is_some());
    }
}
