//! Linking a new device: the one-time link string and the rendezvous the
//! two devices meet at.
//!
//! An existing device opens a rendezvous at the server (logged in, on an
//! active line) and shows a link string. The new device, which has no
//! account yet, reads and writes the rendezvous's numbered slots without
//! logging in; whoever knows the rendezvous ID can. Everything put there is
//! sealed under keys derived from the link's secret, which the server never
//! sees (the client's `pairing` module).
//!
//! Link string format:
//! `umbra-link://HOST:PORT/RENDEZVOUS/SECRET?pin=SHA256HEX`, the 16-byte
//! rendezvous ID and the 32-byte secret in lower-case hex.

use std::fmt;
use std::str::FromStr;

use crate::{CertFingerprint, DecodeError};

/// How long a rendezvous lives after it is opened (seconds).
pub const RENDEZVOUS_TTL_SECS: u64 = 600;

/// Slots of one rendezvous are numbered `0..RENDEZVOUS_SLOTS`.
pub const RENDEZVOUS_SLOTS: u32 = 64;

/// Largest payload one slot holds (below the frame limit, with room for
/// the request around it).
pub const RENDEZVOUS_SLOT_BYTES: usize = 768 * 1024;

/// Most bytes all slots of one rendezvous hold together.
pub const RENDEZVOUS_BYTES: usize = 24 * 1024 * 1024;

/// A rendezvous's random ID: knowing it is what lets a device use it.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct RendezvousId(pub [u8; 16]);

impl RendezvousId {
    pub fn from_slice(bytes: &[u8]) -> Result<Self, DecodeError> {
        Ok(RendezvousId(bytes.try_into().map_err(|_| {
            DecodeError::invalid("rendezvous", format!("{} bytes, expected 16", bytes.len()))
        })?))
    }
}

// Only a prefix: the ID is a capability, kept out of logs.
impl fmt::Debug for RendezvousId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RendezvousId({}…)", hex::encode(&self.0[..2]))
    }
}

/// A parsed link string. Its `Debug` leaves out the secret and the ID.
#[derive(Clone, PartialEq, Eq)]
pub struct LinkString {
    /// `host:port` of the account's server.
    pub address: String,
    pub pin: CertFingerprint,
    pub rendezvous: RendezvousId,
    /// The one-time secret both devices derive the rendezvous's keys from.
    pub secret: [u8; 32],
}

const LINK_SCHEME: &str = "umbra-link://";

// The secret opens everything the two devices exchange: overwritten when
// the link is dropped.
impl Drop for LinkString {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.secret);
    }
}

impl fmt::Debug for LinkString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LinkString")
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

impl fmt::Display for LinkString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{LINK_SCHEME}{}/{}/{}?pin={}",
            self.address,
            hex::encode(self.rendezvous.0),
            hex::encode(self.secret),
            self.pin
        )
    }
}

impl FromStr for LinkString {
    type Err = DecodeError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let invalid = |why: &str| DecodeError::invalid("link", why.to_owned());
        let rest = text
            .trim()
            .strip_prefix(LINK_SCHEME)
            .ok_or_else(|| invalid("must start with umbra-link://"))?;
        let (rest, pin) = rest
            .split_once("?pin=")
            .ok_or_else(|| invalid("missing ?pin=FINGERPRINT"))?;
        let mut parts = rest.rsplitn(3, '/');
        let (Some(secret), Some(rendezvous), Some(address)) =
            (parts.next(), parts.next(), parts.next())
        else {
            return Err(invalid("expected HOST:PORT/RENDEZVOUS/SECRET"));
        };
        if address.is_empty() || !address.contains(':') {
            return Err(invalid("address must be HOST:PORT"));
        }
        let bytes = |field: &str, text: &str| {
            hex::decode(text).map_err(|_| invalid(&format!("the {field} is not hex")))
        };
        let secret: [u8; 32] = bytes("secret", secret)?
            .try_into()
            .map_err(|_| invalid("the secret must be 32 bytes"))?;
        Ok(LinkString {
            address: address.to_owned(),
            pin: CertFingerprint::from_hex(pin)?,
            rendezvous: RendezvousId::from_slice(&bytes("rendezvous", rendezvous)?)?,
            secret,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_strings_round_trip_and_hide_their_secret() {
        let link = LinkString {
            address: "[::1]:7443".into(),
            pin: CertFingerprint([3; 32]),
            rendezvous: RendezvousId([9; 16]),
            secret: [0xab; 32],
        };
        let text = link.to_string();
        assert_eq!(text.parse::<LinkString>().ok(), Some(link.clone()));
        assert!(!format!("{link:?}").contains("abab"));
        assert!(!format!("{link:?}").contains("0909"));
        for bad in [
            "umbra://x:1/a/b?pin=00",
            &text.replace("?pin=", "?pun="),
            &text.replace(&hex::encode([0xab; 32]), "abab"),
            &text.replace("[::1]:7443", ""),
        ] {
            assert!(bad.parse::<LinkString>().is_err(), "{bad}");
        }
    }
}
