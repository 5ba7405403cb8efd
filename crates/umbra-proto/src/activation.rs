//! The activation string an operator hands to a new user: everything a device
//! needs to find the server, authenticate it and open an account.
//!
//! Format: `umbra://HOST:PORT/CODE?pin=SHA256HEX`, where the pin is the
//! SHA-256 of the server's TLS certificate (DER) in lower-case hex. A client
//! that cannot match the pin refuses to talk to the server.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest, Sha256};

use crate::{ActivationCode, DecodeError};

/// SHA-256 of a server certificate's DER encoding: what clients pin.
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
    /// `host:port` the device connects to (IPv6 hosts in brackets).
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
        if address.is_empty() || !address.contains(':') {
            return Err(DecodeError::invalid(
                "activation",
                "address must be HOST:PORT",
            ));
        }
        Ok(ActivationString {
            address: address.to_owned(),
            pin: CertFingerprint::from_hex(query)?,
            code: ActivationCode::parse(code)?,
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
    }
}
