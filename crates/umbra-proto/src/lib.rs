//! Umbra wire protocol: the bytes that travel between devices and the server.
//!
//! Layers, each parsing fully so the next never sees a malformed value:
//! bytes → [`wire`] (prost messages, as in `proto/umbra.proto`) → [`frame`]
//! (validated requests, responses and pushes). This crate does no IO and
//! holds no state; every decoder returns a typed [`DecodeError`], never a
//! panic, whatever bytes it is given.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

pub mod activation;
pub mod blobs;
pub mod clock;
pub mod content;
pub mod devices;
pub mod frame;
pub mod ids;
pub mod pin;
pub mod rendezvous;
pub mod spent;
pub mod spliced;
pub mod tokens;
pub mod wire;

pub use activation::{ActivationString, CertFingerprint, DistributorCredential, WipeCode};
pub use blobs::BlobId;
pub use devices::{DeviceAddr, DeviceChange, DeviceEntry, DeviceId};
pub use frame::{
    AnonymousMessage, CLASSICAL_SUITE, ClientFrame, Delivery, DeliveryKind, ErrorCode, ErrorReply,
    Push, Reply, Request, ServerMessage, SuiteStock, decode_client, decode_client_bytes,
    decode_server, encode_client, encode_server, refused_frame_id,
};
pub use ids::{AccountId, ActivationCode, GroupId, IdentityKey, Nonce, Signature};
pub use rendezvous::{LinkString, RendezvousId};
pub use spliced::{SplicedFrame, encode_server_spliced};

/// The protocol version carried in the first byte of every frame.
pub const PROTOCOL_VERSION: u8 = 1;

/// Largest frame either side accepts, version byte included.
pub const MAX_FRAME_BYTES: usize = 1024 * 1024;

/// Largest MLS message (application message, proposal, commit or Welcome)
/// the server accepts to deliver: its `Delivery` envelope (ID, sender, kind,
/// group ID, time) must still fit in a frame the recipient accepts, or the
/// message would block the recipient's mailbox.
pub const MAX_DELIVERY_PAYLOAD: usize = MAX_FRAME_BYTES - 512;

/// How far past [`MAX_FRAME_BYTES`] a client still reads a server frame.
/// The server never sends one that large; the slack lets a delivery that an
/// older server accepted (its envelope just over the limit) arrive, so the
/// device can set it aside instead of failing every connection on it.
pub const SERVER_FRAME_SLACK: usize = 4096;

/// Why a frame could not be decoded. Every variant names what was wrong so
/// that a peer (or its developer) can act on it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    #[error("empty frame: expected a version byte followed by a protobuf message")]
    Empty,
    #[error("unsupported protocol version {got}; this side speaks version {PROTOCOL_VERSION}")]
    UnsupportedVersion { got: u8 },
    #[error("frame of {len} bytes exceeds the maximum of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("malformed protobuf: {0}")]
    Protobuf(String),
    #[error("required field `{0}` is missing")]
    Missing(&'static str),
    #[error("field `{field}` is invalid: {reason}")]
    Invalid { field: &'static str, reason: String },
}

impl DecodeError {
    pub(crate) fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        DecodeError::Invalid {
            field,
            reason: reason.into(),
        }
    }
}

/// The bytes a device signs to register: binds its identity key to this
/// connection's nonce so a captured registration cannot be replayed.
pub fn register_signing_payload(nonce: &Nonce, identity_key: &IdentityKey) -> Vec<u8> {
    let mut payload = b"umbra-register-v1".to_vec();
    payload.extend_from_slice(nonce.as_bytes());
    payload.extend_from_slice(identity_key.as_bytes());
    payload
}

/// What the holder of a line's wipe code signs to have the device wiped.
pub fn wipe_signing_payload(account_id: &AccountId, issued_at: u64) -> Vec<u8> {
    let mut payload = b"umbra-wipe-v1".to_vec();
    payload.extend_from_slice(account_id.as_str().as_bytes());
    payload.extend_from_slice(&issued_at.to_be_bytes());
    payload
}

/// What a device signs, with its identity key, to end its line for good.
pub fn revoke_signing_payload(account_id: &AccountId) -> Vec<u8> {
    let mut payload = b"umbra-revoke-v1".to_vec();
    payload.extend_from_slice(account_id.as_str().as_bytes());
    payload
}

/// What a distributor signs to log in on this connection.
pub fn distributor_login_payload(nonce: &Nonce, distributor_id: u64) -> Vec<u8> {
    let mut payload = b"umbra-distributor-login-v1".to_vec();
    payload.extend_from_slice(nonce.as_bytes());
    payload.extend_from_slice(&distributor_id.to_be_bytes());
    payload
}

/// The bytes a device signs to log in as `account_id` on this connection.
pub fn login_signing_payload(nonce: &Nonce, account_id: &AccountId) -> Vec<u8> {
    let mut payload = b"umbra-login-v1".to_vec();
    payload.extend_from_slice(nonce.as_bytes());
    payload.extend_from_slice(account_id.as_str().as_bytes());
    payload
}

/// What a linked device whose own key was refused signs with the account
/// key to ask whether its line ended: a tag of its own, so that it is never
/// a login as device 1 (whose key the account key is).
pub fn ended_login_signing_payload(nonce: &Nonce, account_id: &AccountId) -> Vec<u8> {
    let mut payload = b"umbra-login-ended-v1".to_vec();
    payload.extend_from_slice(nonce.as_bytes());
    payload.extend_from_slice(account_id.as_str().as_bytes());
    payload
}
