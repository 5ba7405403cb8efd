//! The activation string an operator hands to a new user: everything a device
//! needs to find the server, authenticate it and open an account.
//!
//! Format: `umbra://HOST:PORT/CODE?pin=SHA256HEX`, where the pin is the
//! SHA-256 of the server's anchor certificate (DER) in lower-case hex: the
//! server presents certificates it issued (see [`crate::pin`] for what is
//! accepted). A client that cannot match the pin refuses to talk to the
//! server. A cluster's
//! nodes may all be named, `HOST:PORT,HOST:PORT`: the device tries them in
//! turn.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest, Sha256};

use crate::{ActivationCode, DecodeError};

/// SHA-256 of a certificate's DER encoding: what clients pin (the server's
/// anchor; see [`crate::pin`]).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct CertFingerprint(pub [u8; 32]);

impl CertFingerprint {
    pub fn of_der(der: &[u8]) -> Self {
        CertFingerprint(Sha256::digest(der).into())
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    pub fn from_hex(text: &str) -> Result<Self, DecodeError> {
        let bytes = hex::decode(text.trim())
            .map_err(|e| DecodeError::invalid("pin", format!("not hex: {e}")))?;
        let array: [u8; 32] = bytes
            .try_into()
            .map_err(|_| DecodeError::invalid("pin", "expected 32 bytes (64 hex digits)"))?;
        Ok(CertFingerprint(array))
    }
}

impl fmt::Debug for CertFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CertFingerprint({})", self.to_hex())
    }
}

impl fmt::Display for CertFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// A parsed activation string.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct ActivationString {
    /// `host:port` the device connects to (IPv6 hosts in brackets), or
    /// several, separated by commas (the nodes of a cluster).
    pub address: String,
    pub pin: CertFingerprint,
    pub code: ActivationCode,
}

const SCHEME: &str = "umbra://";

impl fmt::Display for ActivationString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{SCHEME}{}/{}?pin={}",
            self.address,
            self.code.grouped(),
            self.pin
        )
    }
}

impl FromStr for ActivationString {
    type Err = DecodeError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let rest = text
            .trim()
            .strip_prefix(SCHEME)
            .ok_or_else(|| DecodeError::invalid("activation", "must start with umbra://"))?;
        let (address, rest) = rest
            .split_once('/')
            .ok_or_else(|| DecodeError::invalid("activation", "missing /CODE after the address"))?;
        let (code, query) = rest
            .split_once("?pin=")
            .ok_or_else(|| DecodeError::invalid("activation", "missing ?pin=FINGERPRINT"))?;
        // One address, or several nodes of a cluster separated by commas.
        if address
            .split(',')
            .any(|node| node.is_empty() || !node.contains(':'))
        {
            return Err(DecodeError::invalid(
                "activation",
                "address must be HOST:PORT, or several separated by commas",
            ));
        }
        Ok(ActivationString {
            address: address.to_owned(),
            pin: CertFingerprint::from_hex(query)?,
            code: ActivationCode::parse(code)?,
        })
    }
}

/// The remote-wipe code shown once at activation: whoever holds it can have
/// the device wiped, from any machine, and nobody else can (the device checks
/// the command's signature by the key derived from `seed`).
///
/// Format: `umbra-wipe://HOST:PORT/ACCOUNT/SEED?pin=SHA256HEX`, the 16-byte
/// seed in hex, grouped by four with dashes.
#[derive(Clone, PartialEq, Eq)]
pub struct WipeCode {
    pub address: String,
    pub pin: CertFingerprint,
    pub account: crate::AccountId,
    pub seed: [u8; 16],
}

const WIPE_SCHEME: &str = "umbra-wipe://";

// Whoever holds the seed can wipe the device: overwritten when dropped.
impl Drop for WipeCode {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.seed);
    }
}

impl fmt::Debug for WipeCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WipeCode")
            .field("address", &self.address)
            .field("account", &self.account)
            .finish_non_exhaustive()
    }
}

impl fmt::Display for WipeCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let seed = hex::encode(self.seed);
        let grouped: Vec<&str> = seed
            .as_bytes()
            .chunks(4)
            .filter_map(|chunk| std::str::from_utf8(chunk).ok())
            .collect();
        write!(
            f,
            "{WIPE_SCHEME}{}/{}/{}?pin={}",
            self.address,
            self.account,
            grouped.join("-"),
            self.pin
        )
    }
}

impl FromStr for WipeCode {
    type Err = DecodeError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let invalid = |reason: &str| DecodeError::invalid("wipe_code", reason);
        let rest = text
            .trim()
            .strip_prefix(WIPE_SCHEME)
            .ok_or_else(|| invalid("must start with umbra-wipe://"))?;
        let (path, pin) = rest
            .split_once("?pin=")
            .ok_or_else(|| invalid("missing ?pin=FINGERPRINT"))?;
        let mut parts = path.splitn(3, '/');
        let (Some(address), Some(account), Some(seed)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(invalid(
                "expected umbra-wipe://HOST:PORT/ACCOUNT/CODE?pin=...",
            ));
        };
        if address.is_empty() || !address.contains(':') {
            return Err(invalid("address must be HOST:PORT"));
        }
        let seed = hex::decode(seed.replace('-', "").trim())
            .ok()
            .and_then(|bytes| <[u8; 16]>::try_from(bytes).ok())
            .ok_or_else(|| invalid("the code is 32 hex digits"))?;
        Ok(WipeCode {
            address: address.to_owned(),
            pin: CertFingerprint::from_hex(pin)?,
            account: crate::AccountId::parse(account)?,
            seed,
        })
    }
}

/// What the operator hands a distributor: where the server is, how to pin
/// it, the distributor's number and its secret key (Ed25519 seed).
///
/// Format: `umbra-distributor://HOST:PORT/ID/SECRETHEX?pin=SHA256HEX`.
#[derive(Clone, PartialEq, Eq)]
pub struct DistributorCredential {
    pub address: String,
    pub pin: CertFingerprint,
    pub id: u64,
    pub secret: [u8; 32],
}

const DISTRIBUTOR_SCHEME: &str = "umbra-distributor://";

impl fmt::Debug for DistributorCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DistributorCredential")
            .field("address", &self.address)
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl fmt::Display for DistributorCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{DISTRIBUTOR_SCHEME}{}/{}/{}?pin={}",
            self.address,
            self.id,
            hex::encode(self.secret),
            self.pin
        )
    }
}

impl FromStr for DistributorCredential {
    type Err = DecodeError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let invalid = |reason: &str| DecodeError::invalid("distributor_credential", reason);
        let rest = text
            .trim()
            .strip_prefix(DISTRIBUTOR_SCHEME)
            .ok_or_else(|| invalid("must start with umbra-distributor://"))?;
        let (path, pin) = rest
            .split_once("?pin=")
            .ok_or_else(|| invalid("missing ?pin=FINGERPRINT"))?;
        let mut parts = path.splitn(3, '/');
        let (Some(address), Some(id), Some(secret)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(invalid(
                "expected umbra-distributor://HOST:PORT/ID/SECRET?pin=...",
            ));
        };
        Ok(DistributorCredential {
            address: address.to_owned(),
            pin: CertFingerprint::from_hex(pin)?,
            id: id.parse().map_err(|_| invalid("the ID is a number"))?,
            secret: hex::decode(secret)
                .ok()
                .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok())
                .ok_or_else(|| invalid("the secret is 64 hex digits"))?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str, expected: Result<(&str, &str), &str>) {
        let parsed = text.parse::<ActivationString>();
        match (parsed, expected) {
            (Ok(a), Ok((address, code))) => {
                assert_eq!(a.address, address);
                assert_eq!(a.code.canonical(), code);
                assert_eq!(a.to_string().parse::<ActivationString>(), Ok(a));
            }
            (Err(e), Err(fragment)) => assert!(e.to_string().contains(fragment), "{e}"),
            (got, want) => panic!("{text}: got {got:?}, want {want:?}"),
        }
    }

    #[test]
    fn wipe_codes_round_trip_and_hide_the_seed() {
        let code = WipeCode {
            address: "[::1]:7443".into(),
            pin: CertFingerprint([5; 32]),
            account: crate::AccountId::parse("K7QD9XPM").unwrap_or_else(|e| panic!("{e}")),
            seed: [0xab; 16],
        };
        let text = code.to_string();
        assert!(text.starts_with("umbra-wipe://[::1]:7443/K7QD9XPM/abab-abab-"));
        assert_eq!(text.parse::<WipeCode>(), Ok(code.clone()));
        assert!(!format!("{code:?}").contains("abab"));
        assert!(
            "umbra-wipe://x:1/K7QD9XPM/00?pin=00"
                .parse::<WipeCode>()
                .is_err()
        );
    }

    #[test]
    fn distributor_credentials_round_trip_and_hide_the_secret() {
        let credential = DistributorCredential {
            address: "host:1".into(),
            pin: CertFingerprint([1; 32]),
            id: 7,
            secret: [0xcd; 32],
        };
        assert_eq!(
            credential.to_string().parse::<DistributorCredential>(),
            Ok(credential.clone())
        );
        assert!(!format!("{credential:?}").contains("cdcd"));
    }

    #[test]
    fn activation_strings() {
        let pin = "ab".repeat(32);
        check(
            &format!("umbra://chat.example:7443/K7QD-9XPM-2HVA-RT4N?pin={pin}"),
            Ok(("chat.example:7443", "K7QD9XPM2HVART4N")),
        );
        check(
            &format!("umbra://[::1]:7443/K7QD9XPM2HVART4N?pin={pin}"),
            Ok(("[::1]:7443", "K7QD9XPM2HVART4N")),
        );
        check("http://x:1/K7QD9XPM2HVART4N?pin=00", Err("umbra://"));
        check("umbra://x:1/K7QD9XPM2HVART4N?pin=00", Err("32 bytes"));
        check(
            &format!("umbra://x:1/SHORT?pin={pin}"),
            Err("activation_code"),
        );
        check(
            &format!("umbra://x/K7QD9XPM2HVART4N?pin={pin}"),
            Err("HOST:PORT"),
        );
        // A cluster's nodes, each HOST:PORT.
        check(
            &format!("umbra://a.example:7443,[::1]:7443/K7QD9XPM2HVART4N?pin={pin}"),
            Ok(("a.example:7443,[::1]:7443", "K7QD9XPM2HVART4N")),
        );
        check(
            &format!("umbra://a.example:7443,b.example/K7QD9XPM2HVART4N?pin={pin}"),
            Err("HOST:PORT"),
        );
        check(
            &format!("umbra://a.example:7443,/K7QD9XPM2HVART4N?pin={pin}"),
            Err("HOST:PORT"),
        );
    }
}
