//! Validated identifiers and fixed-size values that appear on the wire.

use std::fmt;

use crate::DecodeError;

/// A random 8-character account ID such as `K7QD9XPM`. No phone number, no
/// e-mail: the ID is all the server knows a person by.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AccountId(String);

impl AccountId {
    /// Characters an account ID is drawn from: digits and capitals without
    /// the look-alikes 0, 1, I, L and O, so an ID survives being read aloud.
    pub const ALPHABET: &'static [u8; 31] = b"23456789ABCDEFGHJKMNPQRSTUVWXYZ";
    /// Length of every account ID.
    pub const LEN: usize = 8;

    /// Parses an ID typed by a person or received on the wire. Lower case is
    /// accepted and normalised.
    pub fn parse(text: &str) -> Result<Self, DecodeError> {
        let upper = text.trim().to_ascii_uppercase();
        if upper.len() != Self::LEN {
            return Err(DecodeError::invalid(
                "account_id",
                format!("expected {} characters, got {}", Self::LEN, upper.len()),
            ));
        }
        if let Some(bad) = upper.bytes().find(|b| !Self::ALPHABET.contains(b)) {
            return Err(DecodeError::invalid(
                "account_id",
                format!("character {:?} is not used in account IDs", char::from(bad)),
            ));
        }
        Ok(AccountId(upper))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for AccountId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl serde::Serialize for AccountId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl fmt::Debug for AccountId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AccountId({})", self.0)
    }
}

/// An MLS group ID as chosen by the group's creator: 1 to 64 opaque bytes.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GroupId(Vec<u8>);

impl GroupId {
    pub const MAX_LEN: usize = 64;

    pub fn new(bytes: Vec<u8>) -> Result<Self, DecodeError> {
        if bytes.is_empty() || bytes.len() > Self::MAX_LEN {
            return Err(DecodeError::invalid(
                "group_id",
                format!("expected 1 to {} bytes, got {}", Self::MAX_LEN, bytes.len()),
            ));
        }
        Ok(GroupId(bytes))
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn to_hex(&self) -> String {
        hex::encode(&self.0)
    }
}

impl fmt::Debug for GroupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GroupId({})", self.to_hex())
    }
}

macro_rules! fixed_bytes {
    ($(#[$doc:meta])* $name:ident, $len:expr, $field:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash)]
        pub struct $name([u8; $len]);

        impl $name {
            pub const LEN: usize = $len;

            pub fn from_bytes(bytes: [u8; $len]) -> Self {
                $name(bytes)
            }

            pub fn from_slice(bytes: &[u8]) -> Result<Self, DecodeError> {
                let array: [u8; $len] = bytes.try_into().map_err(|_| {
                    DecodeError::invalid(
                        $field,
                        format!("expected {} bytes, got {}", $len, bytes.len()),
                    )
                })?;
                Ok($name(array))
            }

            pub fn as_bytes(&self) -> &[u8; $len] {
                &self.0
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({})"), hex::encode(self.0))
            }
        }
    };
}

fixed_bytes!(
    /// A device's Ed25519 public identity key.
    IdentityKey,
    32,
    "identity_key"
);
fixed_bytes!(
    /// An Ed25519 signature.
    Signature,
    64,
    "signature"
);
fixed_bytes!(
    /// The per-connection challenge the server sends in `Hello`.
    Nonce,
    32,
    "nonce"
);

/// A one-time activation code, e.g. `K7QD-9XPM-2HVA-RT4N`. It is a bearer
/// secret until redeemed, so its `Debug` form does not show it.
#[derive(Clone, PartialEq, Eq)]
pub struct ActivationCode(String);

impl ActivationCode {
    /// Number of code characters, without the dashes.
    pub const LEN: usize = 16;

    /// Parses a code as typed: case and dashes do not matter.
    pub fn parse(text: &str) -> Result<Self, DecodeError> {
        let cleaned: String = text
            .chars()
            .filter(|c| *c != '-' && !c.is_whitespace())
            .map(|c| c.to_ascii_uppercase())
            .collect();
        if cleaned.len() != Self::LEN || !cleaned.bytes().all(|b| AccountId::ALPHABET.contains(&b))
        {
            return Err(DecodeError::invalid(
                "activation_code",
                format!(
                    "expected {} characters from the code alphabet (dashes optional)",
                    Self::LEN
                ),
            ));
        }
        Ok(ActivationCode(cleaned))
    }

    /// The canonical form: upper case, no dashes. This is what is hashed.
    pub fn canonical(&self) -> &str {
        &self.0
    }

    /// The form printed for people: groups of four joined by dashes.
    pub fn grouped(&self) -> String {
        self.0
            .as_bytes()
            .chunks(4)
            .map(|chunk| String::from_utf8_lossy(chunk).into_owned())
            .collect::<Vec<_>>()
            .join("-")
    }
}

impl fmt::Debug for ActivationCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ActivationCode(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn account_ids_are_normalised_and_checked() {
        assert_eq!(
            AccountId::parse("k7qd9xpm").map(|a| a.0),
            Ok("K7QD9XPM".into())
        );
        assert!(AccountId::parse("K7QD9XP").is_err());
        assert!(
            AccountId::parse("K7QD9XP0").is_err(),
            "0 is not in the alphabet"
        );
        assert!(AccountId::parse("K7QD9XPMM").is_err());
    }

    #[test]
    fn activation_codes_ignore_dashes_and_hide_in_debug() {
        let code = ActivationCode::parse("k7qd-9xpm-2hva-rt4n").map_err(|e| e.to_string());
        let code = code.as_ref().map(|c| c.canonical().to_owned());
        assert_eq!(code, Ok("K7QD9XPM2HVART4N".to_owned()));
        let code = ActivationCode("K7QD9XPM2HVART4N".into());
        assert_eq!(code.grouped(), "K7QD-9XPM-2HVA-RT4N");
        assert!(!format!("{code:?}").contains("K7QD"));
    }

    #[test]
    fn fixed_sizes_are_enforced() {
        assert!(IdentityKey::from_slice(&[0; 31]).is_err());
        assert!(Signature::from_slice(&[0; 64]).is_ok());
        assert!(GroupId::new(vec![]).is_err());
        assert!(GroupId::new(vec![1; 65]).is_err());
    }
}
