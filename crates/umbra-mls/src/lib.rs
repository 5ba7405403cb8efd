//! The one place Umbra talks to openmls.
//!
//! Everything MLS goes through this crate: the device signer, the provider
//! that binds openmls to an SQLite connection, groups (create, join, add,
//! remove, update, encrypt, process) and the checks the server makes on MLS
//! bytes it relays (KeyPackage validation, message headers). Callers never
//! import openmls types; they get Umbra types and typed [`MlsError`]s.
//!
//! Transactions are the caller's job: every operation here writes through the
//! connection the [`Provider`] borrows, so a caller that opens a transaction
//! first and commits after makes the operation atomic (openmls's storage trait
//! has no transaction boundary of its own).
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod devices;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
mod group;
#[cfg(feature = "hostile")]
mod hostile;
mod provider;
mod public;
mod relay;
mod signer;

pub use devices::{
    DeviceCertificate, DeviceLog, DeviceLogError, DeviceRecord, FIRST_DEVICE, name_allowed,
};
pub use group::{
    CommitOutput, DEVICE_CERTIFICATE_EXTENSION, DISAPPEARING_EXTENSION, Group, GroupConfig,
    Incoming, MemberInfo, accounts_of, new_device_key_package, new_key_package,
    new_offering_key_package,
};
#[cfg(feature = "hostile")]
pub use hostile::odd_key_package;
/// The cryptography and randomness provider (RustCrypto); one per device.
pub use openmls_rust_crypto::RustCrypto as Crypto;
pub use provider::{Provider, init_storage};
pub use public::{HandshakeError, PublicState, ValidCommit, fuzz_group_info};
pub use relay::{
    MessageHeader, MessageKind, ValidKeyPackage, message_header, validate_key_package,
};
pub use signer::{DeviceSigner, verify};

use std::fmt;
use std::str::FromStr;

use openmls::prelude::Ciphersuite;

/// The MLS ciphersuites Umbra offers. All use Ed25519 signatures, because a
/// device's MLS signature key is its Ed25519 identity key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub enum Suite {
    /// MLS_128_MLKEM768X25519_AES128GCM_SHA256_Ed25519 (the default for
    /// new conversations): the hybrid X-Wing KEM, ML-KEM-768 with X25519,
    /// so what is captured today stays closed to a quantum computer unless
    /// both fall.
    #[default]
    MlKem768X25519Aes128GcmEd25519,
    /// MLS_128_DHKEMX25519_CHACHA20POLY1305_SHA256_Ed25519 (classical; the
    /// fallback for a group one of whose devices offers no hybrid
    /// KeyPackage).
    X25519ChaCha20Ed25519,
    /// MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519 (classical).
    X25519Aes128GcmEd25519,
}

impl Suite {
    /// Every suite, most preferred first.
    pub const ALL: [Suite; 3] = [
        Suite::MlKem768X25519Aes128GcmEd25519,
        Suite::X25519ChaCha20Ed25519,
        Suite::X25519Aes128GcmEd25519,
    ];

    /// The classical suite a conversation falls back to when one of its
    /// devices offers no post-quantum KeyPackage (and the one the protocol
    /// assumes where a request names no suite).
    pub const CLASSICAL: Suite = Suite::X25519ChaCha20Ed25519;

    pub(crate) fn ciphersuite(self) -> Ciphersuite {
        match self {
            Suite::MlKem768X25519Aes128GcmEd25519 => {
                Ciphersuite::MLS_128_MLKEM768X25519_AES128GCM_SHA256_Ed25519
            }
            Suite::X25519ChaCha20Ed25519 => {
                Ciphersuite::MLS_128_DHKEMX25519_CHACHA20POLY1305_SHA256_Ed25519
            }
            Suite::X25519Aes128GcmEd25519 => {
                Ciphersuite::MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519
            }
        }
    }

    pub(crate) fn from_ciphersuite(ciphersuite: Ciphersuite) -> Option<Suite> {
        Suite::ALL
            .into_iter()
            .find(|suite| suite.ciphersuite() == ciphersuite)
    }

    /// The suite's number in the MLS registry (what the protocol sends).
    pub fn code(self) -> u16 {
        u16::from(self.ciphersuite())
    }

    /// The suite with registry number `code`, if Umbra offers it.
    pub fn from_code(code: u16) -> Option<Suite> {
        Suite::ALL.into_iter().find(|suite| suite.code() == code)
    }

    /// Whether the suite's key exchange resists a quantum computer.
    pub fn is_post_quantum(self) -> bool {
        matches!(self, Suite::MlKem768X25519Aes128GcmEd25519)
    }

    /// A short label for people: "post-quantum" or "classical".
    pub fn kind(self) -> &'static str {
        if self.is_post_quantum() {
            "post-quantum"
        } else {
            "classical"
        }
    }

    /// The RFC 9420 (or draft) name.
    pub fn name(self) -> &'static str {
        match self {
            Suite::MlKem768X25519Aes128GcmEd25519 => {
                "MLS_128_MLKEM768X25519_AES128GCM_SHA256_Ed25519"
            }
            Suite::X25519ChaCha20Ed25519 => "MLS_128_DHKEMX25519_CHACHA20POLY1305_SHA256_Ed25519",
            Suite::X25519Aes128GcmEd25519 => "MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519",
        }
    }
}

impl fmt::Display for Suite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Suite {
    type Err = MlsError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Suite::ALL
            .into_iter()
            .find(|suite| suite.name().eq_ignore_ascii_case(text.trim()))
            .ok_or_else(|| MlsError::UnsupportedCiphersuite(text.to_owned()))
    }
}

/// Why an MLS operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MlsError {
    #[error("malformed MLS message: {0}")]
    Malformed(String),
    #[error("invalid KeyPackage: {0}")]
    InvalidKeyPackage(String),
    #[error("ciphersuite {0} is not supported; Umbra supports {names}", names = Suite::ALL.map(Suite::name).join(", "))]
    UnsupportedCiphersuite(String),
    #[error("message is for epoch {message} but the group is at epoch {group}")]
    WrongEpoch { message: u64, group: u64 },
    #[error("this device is no longer a member of the group")]
    NotActive,
    #[error("{0} is not a member of the group")]
    NotAMember(String),
    /// A GroupInfo offered to rejoin from fails this device's checks (not
    /// signed by a member it knew, another group, a second leaf under its
    /// own account): the server offered a group of its own making.
    #[error("refusing to rejoin: {0}")]
    UntrustedGroupInfo(String),
    /// A rejoin was asked for, but the group is not ahead of this device.
    #[error("this device is not behind in the group")]
    NotBehind,
    #[error("the MLS protocol rejected the operation: {0}")]
    Protocol(String),
    #[error("local MLS storage failed: {0}")]
    Storage(String),
}

pub type Result<T, E = MlsError> = std::result::Result<T, E>;

pub(crate) fn protocol(context: &str, error: impl fmt::Debug) -> MlsError {
    MlsError::Protocol(format!("{context}: {error:?}"))
}
