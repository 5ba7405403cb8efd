//! The Umbra device library: everything a front end needs, and all of the
//! cryptography, on the device.
//!
//! A [`Client`] owns one device: its Ed25519 identity key, its encrypted
//! store (SQLCipher, keyed by Argon2id of the passphrase), its MLS groups
//! (through `umbra-mls`) and its connection to the server. Front ends call
//! the async methods and consume one stream of [`Event`]s; this crate has no
//! terminal code.
//!
//! **Invariants:** private keys and plaintext never leave the device; every
//! MLS state change and the messages it produced are written in one
//! transaction; a commit is merged only after the server accepted it.
#![deny(clippy::unwrap_used, clippy::expect_used)]

mod client;
mod disappearing;
mod distributor;
mod error;
#[cfg(feature = "test-fixtures")]
mod fixtures;
mod link;
pub mod metadata;
mod pairing;
mod receipts;
mod safety;
pub mod seal;
mod secret;
mod store;
pub mod thumbnail;
mod types;
mod vault;
pub mod voice;
mod wipe;

pub use client::{
    Client, ClientOptions, FileOptions, JoinedAccount, LinkedDevice, PendingLink, Recording,
    VoiceDraft, VoiceSource, mime_type_of, play_voice, safe_file_name,
};
pub use disappearing::{DEFAULT_TIMER, MAX_TIMER, MIN_TIMER, describe as describe_timer};
pub use distributor::DistributorSession;
pub use error::{ClientError, Result};
pub use link::pinned_tls_config;
pub use safety::{SafetyNumber, qr_text};
pub use secret::{KdfParams, Passphrase};
pub use store::exists as device_exists;
pub use types::{
    AttachmentInfo, AttachmentState, ConnectionState, Contact, ContactState, Conversation,
    ConversationId, ConversationKind, DeliveryState, Device, Direction, Event, Message, Refusal,
};
pub use umbra_mls::Suite;
pub use umbra_proto::DistributorCredential;
pub use umbra_proto::clock::{Clock, ManualClock, SystemClock};
pub use umbra_proto::frame::LineInfo;
pub use umbra_proto::{
    AccountId, ActivationString, CertFingerprint, DeviceId, ErrorCode, LinkString, WipeCode,
};
pub use vault::Note;
pub use wipe::{DuressScope, Revocation, send_wipe};
