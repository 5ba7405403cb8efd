//! Validated frames: what the server acts on and what clients receive.
//!
//! `decode_*` take the raw bytes of one WebSocket message, check the version
//! byte and the size, decode the protobuf and validate every field; `encode_*`
//! go the other way. Limits on counts and sizes live here so that both sides
//! agree on them.

use bytes::Bytes;
use prost::Message;

use crate::blobs::{BlobId, MAX_BLOB_CHUNK};
use crate::devices::{DeviceEntry, DeviceId};
use crate::ids::{AccountId, ActivationCode, GroupId, IdentityKey, Nonce, Signature};
use crate::rendezvous::RendezvousId;
use crate::tokens::{
    DELIVERY_KEY_BYTES, MAX_TOKENS_PER_REQUEST, SendToken, TOKEN_KEY_ID_BYTES, fixed,
};

/// Most token key IDs a Hello may carry at all (a device refuses to send
/// anonymously past [`MAX_ANNOUNCED_TOKEN_KEYS`]).
const MAX_TOKEN_KEYS_DECODED: usize = 64;
use crate::wire::{self, client_frame, push, response, server_frame};
use crate::{DecodeError, MAX_FRAME_BYTES, PROTOCOL_VERSION};

pub use crate::wire::{CodeKind, ErrorCode, LineAction};

/// Most codes one IssueCodes request may ask for.
pub const MAX_CODES_PER_REQUEST: u32 = 1000;
/// Longest subscription a code may grant, in days.
pub const MAX_CODE_DAYS: u32 = 3650;

/// Most KeyPackages accepted in one upload.
pub const MAX_KEY_PACKAGES_PER_UPLOAD: usize = 100;
/// Largest single KeyPackage accepted, in bytes.
pub const MAX_KEY_PACKAGE_BYTES: usize = 16 * 1024;
/// The MLS ciphersuite a request that names none means, and the one whose
/// stock `LoggedIn`'s first fields count: 3,
/// MLS_128_DHKEMX25519_CHACHA20POLY1305_SHA256_Ed25519.
pub const CLASSICAL_SUITE: u16 = 0x0003;
/// Most ciphersuites one FetchKeyPackage may name.
pub const MAX_SUITES_PER_FETCH: usize = 8;
/// Most delivery IDs in one Ack.
pub const MAX_ACK_IDS: usize = 1024;
/// Flow control of pushes: a server has at most this many deliveries
/// pushed on one connection and not yet acknowledged on it...
pub const PUSH_WINDOW_DELIVERIES: usize = 1024;
/// ...and at most this many bytes of them (frames as sent; always at least
/// one delivery, however large). A device may drop a connection on which
/// the server exceeds either, so what it holds unapplied stays bounded.
pub const PUSH_WINDOW_BYTES: usize = 8 << 20;

/// How many KeyPackages of one ciphersuite a device has at the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SuiteStock {
    /// The MLS ciphersuite number.
    pub suite: u16,
    /// One-time KeyPackages waiting.
    pub remaining: u32,
    pub has_last_resort: bool,
}

/// One request from a device, with the id its response will carry.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientFrame {
    pub id: u64,
    pub request: Request,
}

/// A commit submitted to the delivery service.
#[derive(Debug, Clone, PartialEq)]
pub struct CommitSubmission {
    pub group_id: GroupId,
    /// The epoch the commit was made in.
    pub epoch: u64,
    pub commit: Vec<u8>,
    pub welcome: Option<Vec<u8>>,
    /// The group's signed GroupInfo for the epoch the commit starts.
    pub group_info: Vec<u8>,
    /// The public half of the new epoch's delivery key, for anonymous
    /// sending in it (see [`crate::tokens`]).
    pub delivery_key: Option<[u8; DELIVERY_KEY_BYTES]>,
}

/// An application message sent without logging in (see [`crate::tokens`]).
#[derive(Debug, Clone, PartialEq)]
pub struct AnonymousMessage {
    pub group_id: GroupId,
    /// An MLS application message of the group's current epoch.
    pub message: Vec<u8>,
    /// Hold undelivered copies at most this long (0: the server's TTL).
    pub ttl_seconds: u32,
    /// The epoch's delivery key's signature over
    /// [`crate::tokens::anonymous_signed_bytes`].
    pub signature: [u8; 64],
    pub token: SendToken,
}

#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Request {
    Register {
        activation_code: ActivationCode,
        identity_key: IdentityKey,
        signature: Signature,
    },
    Login {
        account_id: AccountId,
        signature: Signature,
        /// Signed by this device's key (from the account's device log).
        device: DeviceId,
    },
    UploadKeyPackages {
        key_packages: Vec<Vec<u8>>,
        last_resort: Option<Vec<u8>>,
    },
    /// One KeyPackage of `device` of `account_id` (a current device in
    /// the account's log; absent on the wire: device 1), of the first of
    /// `suites` (MLS ciphersuite numbers, most wanted first; absent on the
    /// wire: [`CLASSICAL_SUITE`]) the device has one of.
    FetchKeyPackage {
        account_id: AccountId,
        device: DeviceId,
        suites: Vec<u16>,
    },
    /// The current GroupInfo of a group this account is a member of, to
    /// rejoin it by external commit.
    FetchGroupInfo {
        group_id: GroupId,
    },
    SendContactRequest {
        to: AccountId,
    },
    AcceptContact {
        from: AccountId,
    },
    /// Forget the pending request from `from` (the requester is not told).
    DeclineContact {
        from: AccountId,
    },
    CreateGroup {
        group_id: GroupId,
        /// The group's signed GroupInfo at epoch 0, with its ratchet tree.
        group_info: Vec<u8>,
        /// The public half of epoch 0's delivery key.
        delivery_key: Option<[u8; DELIVERY_KEY_BYTES]>,
    },
    SendCommit(CommitSubmission),
    SendMessage {
        group_id: GroupId,
        message: Vec<u8>,
        kind: DeliveryKind,
        /// Hold undelivered copies at most this long (0: the server's TTL).
        ttl_seconds: u32,
    },
    Ack {
        delivery_ids: Vec<u64>,
        /// Answer only if it fails: the device learns that it was applied
        /// from the answer to a later request (they are handled in order).
        quiet: bool,
    },
    LookupAccount {
        account_id: AccountId,
    },
    Ping,
    /// The Ed25519 public key that verifies this line's wipe commands.
    SetWipeKey {
        wipe_key: IdentityKey,
    },
    Wipe {
        account_id: AccountId,
        issued_at: u64,
        signature: Signature,
    },
    Revoke {
        account_id: AccountId,
        signature: Signature,
    },
    RedeemRenewal {
        code: ActivationCode,
    },
    DistributorLogin {
        distributor_id: u64,
        signature: Signature,
    },
    IssueCodes {
        kind: CodeKind,
        days: u32,
        count: u32,
    },
    ListLines,
    SetLineStatus {
        account_id: AccountId,
        action: LineAction,
    },
    /// Appends a signed entry to the caller's own device log.
    AppendDeviceEntry {
        entry: DeviceEntry,
    },
    /// An account's device log from position `from` on (the caller's own,
    /// or a contact's).
    FetchDeviceLog {
        account_id: AccountId,
        from: u64,
    },
    /// Opens a rendezvous for linking a device (logged in, active line).
    OpenRendezvous,
    /// Writes a rendezvous slot, once (no login needed).
    RendezvousPut {
        rendezvous: RendezvousId,
        slot: u32,
        payload: Vec<u8>,
    },
    /// Reads a rendezvous slot (no login needed).
    RendezvousGet {
        rendezvous: RendezvousId,
        slot: u32,
    },
    /// Deletes a rendezvous the caller's account opened.
    CloseRendezvous {
        rendezvous: RendezvousId,
    },
    /// Blinded token inputs (at most [`MAX_TOKENS_PER_REQUEST`]) for an
    /// active line's daily allowance of anonymous sends.
    IssueTokens {
        blinded: Vec<Vec<u8>>,
    },
    /// An anonymous application message (no login needed; a logged-in
    /// session may send one too, but then the server knows who sent it).
    SendAnonymous(AnonymousMessage),
    /// A blob of `size` bytes for an attachment in `group_id`.
    CreateBlob {
        group_id: GroupId,
        size: u64,
        ttl_seconds: u32,
    },
    /// Appends `data` (1 byte to [`MAX_BLOB_CHUNK`]) at `offset`.
    PutBlob {
        blob_id: BlobId,
        offset: u64,
        /// A slice of the frame it came in ([`decode_client_bytes`]): a
        /// chunk of a file is not copied out of it.
        data: Bytes,
    },
    BlobStatus {
        blob_id: BlobId,
    },
    /// Reads `length` bytes (1 to [`MAX_BLOB_CHUNK`]) at `offset`.
    GetBlob {
        blob_id: BlobId,
        offset: u64,
        length: u32,
    },
    BlobFetched {
        blob_id: BlobId,
    },
}

impl Request {
    /// The request's name as in `umbra.proto`, for logs and metrics (never
    /// its contents).
    pub fn kind(&self) -> &'static str {
        match self {
            Request::Register { .. } => "Register",
            Request::Login { .. } => "Login",
            Request::UploadKeyPackages { .. } => "UploadKeyPackages",
            Request::FetchKeyPackage { .. } => "FetchKeyPackage",
            Request::FetchGroupInfo { .. } => "FetchGroupInfo",
            Request::SendContactRequest { .. } => "SendContactRequest",
            Request::AcceptContact { .. } => "AcceptContact",
            Request::DeclineContact { .. } => "DeclineContact",
            Request::CreateGroup { .. } => "CreateGroup",
            Request::SendCommit(_) => "SendCommit",
            Request::SendMessage { .. } => "SendMessage",
            Request::Ack { .. } => "Ack",
            Request::LookupAccount { .. } => "LookupAccount",
            Request::Ping => "Ping",
            Request::SetWipeKey { .. } => "SetWipeKey",
            Request::Wipe { .. } => "Wipe",
            Request::Revoke { .. } => "Revoke",
            Request::RedeemRenewal { .. } => "RedeemRenewal",
            Request::DistributorLogin { .. } => "DistributorLogin",
            Request::IssueCodes { .. } => "IssueCodes",
            Request::ListLines => "ListLines",
            Request::SetLineStatus { .. } => "SetLineStatus",
            Request::AppendDeviceEntry { .. } => "AppendDeviceEntry",
            Request::FetchDeviceLog { .. } => "FetchDeviceLog",
            Request::OpenRendezvous => "OpenRendezvous",
            Request::RendezvousPut { .. } => "RendezvousPut",
            Request::RendezvousGet { .. } => "RendezvousGet",
            Request::CloseRendezvous { .. } => "CloseRendezvous",
            Request::IssueTokens { .. } => "IssueTokens",
            Request::SendAnonymous(_) => "SendAnonymous",
            Request::CreateBlob { .. } => "CreateBlob",
            Request::PutBlob { .. } => "PutBlob",
            Request::BlobStatus { .. } => "BlobStatus",
            Request::GetBlob { .. } => "GetBlob",
            Request::BlobFetched { .. } => "BlobFetched",
        }
    }
}

/// One line as its distributor sees it: never contacts, groups or messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineInfo {
    pub account_id: AccountId,
    pub subscription_expires_at: u64,
    /// Unix day of the last login; 0 if never.
    pub last_seen_day: u64,
    pub status: String,
}

/// What a mailbox item is.
pub use crate::wire::DeliveryKind;

/// One stored item pushed from a mailbox.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    pub id: u64,
    /// The account a server notice is from (contact requests and
    /// acceptances, revocations, device removals, wipes and the server's
    /// own notices); `None` (empty on the wire) for what members send a
    /// group, whose sender MLS authenticates and the server does not keep.
    pub sender: Option<AccountId>,
    pub kind: DeliveryKind,
    pub group_id: Option<GroupId>,
    pub payload: Vec<u8>,
    pub sent_at: u64,
}

#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Push {
    Hello {
        protocol_version: u32,
        nonce: Nonce,
        server_time: u64,
        max_frame_bytes: u32,
        /// The IDs of the keys whose anonymous-send tokens the server
        /// accepts, the same on every connection (at most
        /// [`crate::tokens::MAX_ANNOUNCED_TOKEN_KEYS`] from an honest
        /// server).
        token_keys: Vec<[u8; TOKEN_KEY_ID_BYTES]>,
    },
    Delivery(Delivery),
    Synced,
}

#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Reply {
    Registered {
        account_id: AccountId,
        subscription_expires_at: u64,
    },
    LoggedIn {
        subscription_expires_at: u64,
        key_packages_remaining: u32,
        has_last_resort: bool,
        key_package_low_water: u32,
        /// The device's stock for every ciphersuite the server takes
        /// (the two fields above repeat [`CLASSICAL_SUITE`]'s).
        stocks: Vec<SuiteStock>,
    },
    /// The uploaded suite's one-time stock after an upload.
    KeyPackageCount {
        remaining: u32,
        suite: u16,
    },
    KeyPackage {
        key_package: Vec<u8>,
        last_resort: bool,
    },
    GroupInfo {
        group_info: Vec<u8>,
    },
    /// Device log entries, in order.
    DeviceLog {
        entries: Vec<DeviceEntry>,
    },
    RendezvousOpened {
        rendezvous: RendezvousId,
        expires_at: u64,
    },
    /// A rendezvous slot's payload, if it was written.
    RendezvousSlot {
        payload: Option<Vec<u8>>,
    },
    /// Signed token inputs, in the order asked, and the proof that the key
    /// named signed them all.
    Tokens {
        key_id: [u8; TOKEN_KEY_ID_BYTES],
        public_key: Vec<u8>,
        evaluated: Vec<Vec<u8>>,
        proof: Vec<u8>,
    },
    Done,
    BlobCreated {
        blob_id: BlobId,
        expires_at: u64,
    },
    /// `stored` bytes of `size` are durable.
    BlobState {
        size: u64,
        stored: u64,
        expires_at: u64,
    },
    BlobData {
        /// Sent as it was read ([`crate::encode_server_spliced`]).
        data: Bytes,
        size: u64,
    },
    CommitAccepted {
        epoch: u64,
    },
    AccountInfo {
        account_id: AccountId,
        identity_key: IdentityKey,
    },
    Accepted {
        accepted_at: u64,
    },
    /// Activation strings, or bare renewal codes.
    Codes {
        codes: Vec<String>,
    },
    Lines {
        lines: Vec<LineInfo>,
    },
    Renewed {
        subscription_expires_at: u64,
    },
}

/// A typed refusal. `message` is for people; programs match on `code`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message} ({code:?})")]
pub struct ErrorReply {
    pub code: ErrorCode,
    pub message: String,
    /// Set for [`ErrorCode::StaleEpoch`]: the group's epoch at the server.
    pub current_epoch: u64,
    /// Set for [`ErrorCode::LineRevoked`] answering `Login`, when a wipe
    /// command was ever relayed for the line: the newest, as its devices
    /// receive one (8-byte issue time, then the wipe key's signature). Each
    /// device checks it against its own wipe key before it acts; empty
    /// otherwise.
    pub wipe_command: Vec<u8>,
}

impl ErrorReply {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ErrorReply {
            code,
            message: message.into(),
            current_epoch: 0,
            wipe_command: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum ServerMessage {
    Response {
        id: u64,
        result: Result<Reply, ErrorReply>,
    },
    Push(Push),
}

fn frame_body(bytes: &[u8], max: usize) -> Result<&[u8], DecodeError> {
    if bytes.len() > max {
        return Err(DecodeError::TooLarge {
            len: bytes.len(),
            max,
        });
    }
    match bytes.split_first() {
        None => Err(DecodeError::Empty),
        Some((&PROTOCOL_VERSION, body)) => Ok(body),
        Some((&got, _)) => Err(DecodeError::UnsupportedVersion { got }),
    }
}

fn with_version(message: &impl Message) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + message.encoded_len());
    out.push(PROTOCOL_VERSION);
    message.encode_raw(&mut out);
    out
}

fn protobuf(error: prost::DecodeError) -> DecodeError {
    DecodeError::Protobuf(error.to_string())
}

fn account(field: &'static str, text: &str) -> Result<AccountId, DecodeError> {
    AccountId::parse(text).map_err(|e| match e {
        DecodeError::Invalid { reason, .. } => DecodeError::Invalid { field, reason },
        other => other,
    })
}

/// A key that is either absent (empty) or exactly 32 bytes.
fn optional_key(bytes: &[u8]) -> Result<Option<[u8; DELIVERY_KEY_BYTES]>, DecodeError> {
    if bytes.is_empty() {
        return Ok(None);
    }
    fixed("delivery_key", bytes).map(Some)
}

fn non_empty(field: &'static str, bytes: Vec<u8>) -> Result<Vec<u8>, DecodeError> {
    if bytes.is_empty() {
        return Err(DecodeError::Missing(field));
    }
    Ok(bytes)
}

fn key_package(field: &'static str, bytes: Vec<u8>) -> Result<Vec<u8>, DecodeError> {
    let bytes = non_empty(field, bytes)?;
    if bytes.len() > MAX_KEY_PACKAGE_BYTES {
        return Err(DecodeError::invalid(
            field,
            format!("{} bytes exceeds {MAX_KEY_PACKAGE_BYTES}", bytes.len()),
        ));
    }
    Ok(bytes)
}

/// An MLS ciphersuite number (RFC 9420's registry is 16 bits wide).
fn suite(field: &'static str, value: u32) -> Result<u16, DecodeError> {
    u16::try_from(value)
        .ok()
        .filter(|&suite| suite != 0)
        .ok_or_else(|| DecodeError::invalid(field, format!("{value} is no ciphersuite")))
}

/// A fetch's suites, most wanted first: none named means the classical one.
fn suites(values: Vec<u32>) -> Result<Vec<u16>, DecodeError> {
    if values.len() > MAX_SUITES_PER_FETCH {
        return Err(DecodeError::invalid(
            "suites",
            format!("at most {MAX_SUITES_PER_FETCH}"),
        ));
    }
    if values.is_empty() {
        return Ok(vec![CLASSICAL_SUITE]);
    }
    values
        .into_iter()
        .map(|value| suite("suites", value))
        .collect()
}

fn delivery_kind(field: &'static str, value: i32) -> Result<DeliveryKind, DecodeError> {
    match DeliveryKind::try_from(value) {
        Ok(DeliveryKind::Unspecified) | Err(_) => Err(DecodeError::invalid(
            field,
            format!("unknown delivery kind {value}"),
        )),
        Ok(kind) => Ok(kind),
    }
}

/// The request id of a client frame that [`decode_client`] refused, when
/// the frame's envelope can still be read: so that the error answers that
/// request rather than id 0. Only the id field is decoded (any other field,
/// however malformed, is skipped).
pub fn refused_frame_id(bytes: &[u8]) -> Option<u64> {
    #[derive(Clone, PartialEq, prost::Message)]
    struct IdOnly {
        #[prost(uint64, tag = "1")]
        id: u64,
    }
    let body = frame_body(bytes, MAX_FRAME_BYTES).ok()?;
    IdOnly::decode(body)
        .ok()
        .map(|frame| frame.id)
        .filter(|id| *id != 0)
}

/// Decodes and validates one client frame.
pub fn decode_client(bytes: &[u8]) -> Result<ClientFrame, DecodeError> {
    client_frame(frame_body(bytes, MAX_FRAME_BYTES)?)
}

/// [`decode_client`] of a frame the caller owns: a file's chunk
/// (`PutBlob`'s data) is a slice of it, not a copy.
pub fn decode_client_bytes(bytes: Bytes) -> Result<ClientFrame, DecodeError> {
    frame_body(&bytes, MAX_FRAME_BYTES)?;
    client_frame(bytes.slice(1..))
}

fn client_frame(body: impl bytes::Buf) -> Result<ClientFrame, DecodeError> {
    let raw = wire::ClientFrame::decode(body).map_err(protobuf)?;
    if raw.id == 0 {
        return Err(DecodeError::Missing("id"));
    }
    let request = match raw.request.ok_or(DecodeError::Missing("request"))? {
        client_frame::Request::Register(r) => Request::Register {
            activation_code: ActivationCode::parse(&r.activation_code)?,
            identity_key: IdentityKey::from_slice(&r.identity_key)?,
            signature: Signature::from_slice(&r.signature)?,
        },
        client_frame::Request::Login(r) => Request::Login {
            account_id: account("account_id", &r.account_id)?,
            signature: Signature::from_slice(&r.signature)?,
            device: DeviceId(r.device.max(1)),
        },
        client_frame::Request::UploadKeyPackages(r) => {
            if r.key_packages.len() > MAX_KEY_PACKAGES_PER_UPLOAD {
                return Err(DecodeError::invalid(
                    "key_packages",
                    format!("at most {MAX_KEY_PACKAGES_PER_UPLOAD} per upload"),
                ));
            }
            Request::UploadKeyPackages {
                key_packages: r
                    .key_packages
                    .into_iter()
                    .map(|kp| key_package("key_packages", kp))
                    .collect::<Result<_, _>>()?,
                last_resort: if r.last_resort.is_empty() {
                    None
                } else {
                    Some(key_package("last_resort", r.last_resort)?)
                },
            }
        }
        client_frame::Request::FetchKeyPackage(r) => Request::FetchKeyPackage {
            account_id: account("account_id", &r.account_id)?,
            device: DeviceId(r.device.max(1)),
            suites: suites(r.suites)?,
        },
        client_frame::Request::SendContactRequest(r) => Request::SendContactRequest {
            to: account("account_id", &r.account_id)?,
        },
        client_frame::Request::AcceptContact(r) => Request::AcceptContact {
            from: account("account_id", &r.account_id)?,
        },
        client_frame::Request::DeclineContact(r) => Request::DeclineContact {
            from: account("account_id", &r.account_id)?,
        },
        client_frame::Request::CreateGroup(r) => Request::CreateGroup {
            group_id: GroupId::new(r.group_id)?,
            group_info: non_empty("group_info", r.group_info)?,
            delivery_key: optional_key(&r.delivery_key)?,
        },
        client_frame::Request::SendCommit(r) => Request::SendCommit(CommitSubmission {
            group_id: GroupId::new(r.group_id)?,
            epoch: r.epoch,
            commit: non_empty("commit", r.commit)?,
            welcome: (!r.welcome.is_empty()).then_some(r.welcome),
            group_info: r.group_info,
            delivery_key: optional_key(&r.delivery_key)?,
        }),
        client_frame::Request::SendMessage(r) => {
            let kind = delivery_kind("kind", r.kind)?;
            if !matches!(kind, DeliveryKind::Application | DeliveryKind::Proposal) {
                return Err(DecodeError::invalid(
                    "kind",
                    "SendMessage carries only APPLICATION or PROPOSAL messages",
                ));
            }
            Request::SendMessage {
                group_id: GroupId::new(r.group_id)?,
                message: non_empty("message", r.message)?,
                kind,
                ttl_seconds: r.ttl_seconds,
            }
        }
        client_frame::Request::Ack(r) => {
            if r.delivery_ids.len() > MAX_ACK_IDS {
                return Err(DecodeError::invalid(
                    "delivery_ids",
                    format!("at most {MAX_ACK_IDS} per Ack"),
                ));
            }
            Request::Ack {
                delivery_ids: r.delivery_ids,
                quiet: r.quiet,
            }
        }
        client_frame::Request::LookupAccount(r) => Request::LookupAccount {
            account_id: account("account_id", &r.account_id)?,
        },
        client_frame::Request::Ping(_) => Request::Ping,
        client_frame::Request::FetchGroupInfo(r) => Request::FetchGroupInfo {
            group_id: GroupId::new(r.group_id)?,
        },
        client_frame::Request::AppendDeviceEntry(r) => Request::AppendDeviceEntry {
            entry: DeviceEntry::decode(&r.entry)?,
        },
        client_frame::Request::FetchDeviceLog(r) => Request::FetchDeviceLog {
            account_id: account("account_id", &r.account_id)?,
            from: r.from,
        },
        client_frame::Request::OpenRendezvous(_) => Request::OpenRendezvous,
        client_frame::Request::RendezvousPut(r) => Request::RendezvousPut {
            rendezvous: RendezvousId::from_slice(&r.rendezvous)?,
            slot: r.slot,
            payload: r.payload,
        },
        client_frame::Request::RendezvousGet(r) => Request::RendezvousGet {
            rendezvous: RendezvousId::from_slice(&r.rendezvous)?,
            slot: r.slot,
        },
        client_frame::Request::CloseRendezvous(r) => Request::CloseRendezvous {
            rendezvous: RendezvousId::from_slice(&r.rendezvous)?,
        },
        client_frame::Request::IssueTokens(r) => {
            if r.blinded.is_empty() || r.blinded.len() > MAX_TOKENS_PER_REQUEST {
                return Err(DecodeError::invalid(
                    "blinded",
                    format!("expected 1 to {MAX_TOKENS_PER_REQUEST} token inputs"),
                ));
            }
            Request::IssueTokens { blinded: r.blinded }
        }
        client_frame::Request::SendAnonymous(r) => Request::SendAnonymous(AnonymousMessage {
            group_id: GroupId::new(r.group_id)?,
            message: non_empty("message", r.message)?,
            ttl_seconds: r.ttl_seconds,
            signature: fixed("signature", &r.signature)?,
            token: SendToken {
                key_id: fixed("token_key_id", &r.token_key_id)?,
                nonce: fixed("token_nonce", &r.token_nonce)?,
                authenticator: fixed("token_authenticator", &r.token_authenticator)?,
            },
        }),
        client_frame::Request::CreateBlob(r) => Request::CreateBlob {
            group_id: GroupId::new(r.group_id)?,
            size: r.size,
            ttl_seconds: r.ttl_seconds,
        },
        client_frame::Request::PutBlob(r) => {
            if r.data.len() > MAX_BLOB_CHUNK {
                return Err(DecodeError::invalid(
                    "data",
                    format!("at most {MAX_BLOB_CHUNK} bytes"),
                ));
            }
            if r.data.is_empty() {
                return Err(DecodeError::Missing("data"));
            }
            Request::PutBlob {
                blob_id: BlobId::from_slice(&r.blob_id)?,
                offset: r.offset,
                data: r.data,
            }
        }
        client_frame::Request::BlobStatus(r) => Request::BlobStatus {
            blob_id: BlobId::from_slice(&r.blob_id)?,
        },
        client_frame::Request::GetBlob(r) => {
            if r.length == 0 || r.length as usize > MAX_BLOB_CHUNK {
                return Err(DecodeError::invalid(
                    "length",
                    format!("1 to {MAX_BLOB_CHUNK} bytes"),
                ));
            }
            Request::GetBlob {
                blob_id: BlobId::from_slice(&r.blob_id)?,
                offset: r.offset,
                length: r.length,
            }
        }
        client_frame::Request::BlobFetched(r) => Request::BlobFetched {
            blob_id: BlobId::from_slice(&r.blob_id)?,
        },
        client_frame::Request::SetWipeKey(r) => Request::SetWipeKey {
            wipe_key: IdentityKey::from_slice(&r.wipe_key)?,
        },
        client_frame::Request::Wipe(r) => Request::Wipe {
            account_id: account("account_id", &r.account_id)?,
            issued_at: r.issued_at,
            signature: Signature::from_slice(&r.signature)?,
        },
        client_frame::Request::Revoke(r) => Request::Revoke {
            account_id: account("account_id", &r.account_id)?,
            signature: Signature::from_slice(&r.signature)?,
        },
        client_frame::Request::RedeemRenewal(r) => Request::RedeemRenewal {
            code: ActivationCode::parse(&r.code)?,
        },
        client_frame::Request::DistributorLogin(r) => Request::DistributorLogin {
            distributor_id: r.distributor_id,
            signature: Signature::from_slice(&r.signature)?,
        },
        client_frame::Request::IssueCodes(r) => {
            let kind = match CodeKind::try_from(r.kind) {
                Ok(kind @ (CodeKind::Activation | CodeKind::Renewal)) => kind,
                _ => return Err(DecodeError::invalid("kind", "ACTIVATION or RENEWAL")),
            };
            if !(1..=MAX_CODE_DAYS).contains(&r.days) {
                return Err(DecodeError::invalid(
                    "days",
                    format!("1 to {MAX_CODE_DAYS}"),
                ));
            }
            if !(1..=MAX_CODES_PER_REQUEST).contains(&r.count) {
                return Err(DecodeError::invalid(
                    "count",
                    format!("1 to {MAX_CODES_PER_REQUEST}"),
                ));
            }
            Request::IssueCodes {
                kind,
                days: r.days,
                count: r.count,
            }
        }
        client_frame::Request::ListLines(_) => Request::ListLines,
        client_frame::Request::SetLineStatus(r) => Request::SetLineStatus {
            account_id: account("account_id", &r.account_id)?,
            action: match LineAction::try_from(r.action) {
                Ok(LineAction::Unspecified) | Err(_) => {
                    return Err(DecodeError::invalid("action", "SUSPEND, RESUME or REVOKE"));
                }
                Ok(action) => action,
            },
        },
    };
    Ok(ClientFrame {
        id: raw.id,
        request,
    })
}

/// Encodes one client frame, version byte included.
pub fn encode_client(frame: &ClientFrame) -> Vec<u8> {
    let request = match &frame.request {
        Request::Register {
            activation_code,
            identity_key,
            signature,
        } => client_frame::Request::Register(wire::Register {
            activation_code: activation_code.canonical().to_owned(),
            identity_key: identity_key.as_bytes().to_vec(),
            signature: signature.as_bytes().to_vec(),
        }),
        Request::Login {
            account_id,
            signature,
            device,
        } => client_frame::Request::Login(wire::Login {
            account_id: account_id.to_string(),
            signature: signature.as_bytes().to_vec(),
            device: device.0,
        }),
        Request::UploadKeyPackages {
            key_packages,
            last_resort,
        } => client_frame::Request::UploadKeyPackages(wire::UploadKeyPackages {
            key_packages: key_packages.clone(),
            last_resort: last_resort.clone().unwrap_or_default(),
        }),
        Request::FetchKeyPackage {
            account_id,
            device,
            suites,
        } => client_frame::Request::FetchKeyPackage(wire::FetchKeyPackage {
            account_id: account_id.to_string(),
            device: device.0,
            suites: suites.iter().map(|&suite| u32::from(suite)).collect(),
        }),
        Request::SendContactRequest { to } => {
            client_frame::Request::SendContactRequest(wire::SendContactRequest {
                account_id: to.to_string(),
            })
        }
        Request::AcceptContact { from } => {
            client_frame::Request::AcceptContact(wire::AcceptContact {
                account_id: from.to_string(),
            })
        }
        Request::DeclineContact { from } => {
            client_frame::Request::DeclineContact(wire::DeclineContact {
                account_id: from.to_string(),
            })
        }
        Request::CreateGroup {
            group_id,
            group_info,
            delivery_key,
        } => client_frame::Request::CreateGroup(wire::CreateGroup {
            group_id: group_id.as_bytes().to_vec(),
            group_info: group_info.clone(),
            delivery_key: delivery_key.map(|k| k.to_vec()).unwrap_or_default(),
        }),
        Request::SendCommit(c) => client_frame::Request::SendCommit(wire::SendCommit {
            group_id: c.group_id.as_bytes().to_vec(),
            epoch: c.epoch,
            commit: c.commit.clone(),
            welcome: c.welcome.clone().unwrap_or_default(),
            group_info: c.group_info.clone(),
            delivery_key: c.delivery_key.map(|k| k.to_vec()).unwrap_or_default(),
        }),
        Request::SendMessage {
            group_id,
            message,
            kind,
            ttl_seconds,
        } => client_frame::Request::SendMessage(wire::SendMessage {
            group_id: group_id.as_bytes().to_vec(),
            message: message.clone(),
            kind: *kind as i32,
            ttl_seconds: *ttl_seconds,
        }),
        Request::Ack {
            delivery_ids,
            quiet,
        } => client_frame::Request::Ack(wire::Ack {
            delivery_ids: delivery_ids.clone(),
            quiet: *quiet,
        }),
        Request::LookupAccount { account_id } => {
            client_frame::Request::LookupAccount(wire::LookupAccount {
                account_id: account_id.to_string(),
            })
        }
        Request::Ping => client_frame::Request::Ping(wire::Ping {}),
        Request::FetchGroupInfo { group_id } => {
            client_frame::Request::FetchGroupInfo(wire::FetchGroupInfo {
                group_id: group_id.as_bytes().to_vec(),
            })
        }
        Request::AppendDeviceEntry { entry } => {
            client_frame::Request::AppendDeviceEntry(wire::AppendDeviceEntry {
                entry: entry.encode(),
            })
        }
        Request::FetchDeviceLog { account_id, from } => {
            client_frame::Request::FetchDeviceLog(wire::FetchDeviceLog {
                account_id: account_id.to_string(),
                from: *from,
            })
        }
        Request::OpenRendezvous => client_frame::Request::OpenRendezvous(wire::OpenRendezvous {}),
        Request::RendezvousPut {
            rendezvous,
            slot,
            payload,
        } => client_frame::Request::RendezvousPut(wire::RendezvousPut {
            rendezvous: rendezvous.0.to_vec(),
            slot: *slot,
            payload: payload.clone(),
        }),
        Request::RendezvousGet { rendezvous, slot } => {
            client_frame::Request::RendezvousGet(wire::RendezvousGet {
                rendezvous: rendezvous.0.to_vec(),
                slot: *slot,
            })
        }
        Request::CloseRendezvous { rendezvous } => {
            client_frame::Request::CloseRendezvous(wire::CloseRendezvous {
                rendezvous: rendezvous.0.to_vec(),
            })
        }
        Request::IssueTokens { blinded } => client_frame::Request::IssueTokens(wire::IssueTokens {
            blinded: blinded.clone(),
        }),
        Request::SendAnonymous(m) => client_frame::Request::SendAnonymous(wire::SendAnonymous {
            group_id: m.group_id.as_bytes().to_vec(),
            message: m.message.clone(),
            ttl_seconds: m.ttl_seconds,
            signature: m.signature.to_vec(),
            token_key_id: m.token.key_id.to_vec(),
            token_nonce: m.token.nonce.to_vec(),
            token_authenticator: m.token.authenticator.to_vec(),
        }),
        Request::CreateBlob {
            group_id,
            size,
            ttl_seconds,
        } => client_frame::Request::CreateBlob(wire::CreateBlob {
            group_id: group_id.as_bytes().to_vec(),
            size: *size,
            ttl_seconds: *ttl_seconds,
        }),
        Request::PutBlob {
            blob_id,
            offset,
            data,
        } => client_frame::Request::PutBlob(wire::PutBlob {
            blob_id: blob_id.0.to_vec(),
            offset: *offset,
            data: data.clone(),
        }),
        Request::BlobStatus { blob_id } => client_frame::Request::BlobStatus(wire::BlobStatus {
            blob_id: blob_id.0.to_vec(),
        }),
        Request::GetBlob {
            blob_id,
            offset,
            length,
        } => client_frame::Request::GetBlob(wire::GetBlob {
            blob_id: blob_id.0.to_vec(),
            offset: *offset,
            length: *length,
        }),
        Request::BlobFetched { blob_id } => client_frame::Request::BlobFetched(wire::BlobFetched {
            blob_id: blob_id.0.to_vec(),
        }),
        Request::SetWipeKey { wipe_key } => client_frame::Request::SetWipeKey(wire::SetWipeKey {
            wipe_key: wipe_key.as_bytes().to_vec(),
        }),
        Request::Wipe {
            account_id,
            issued_at,
            signature,
        } => client_frame::Request::Wipe(wire::Wipe {
            account_id: account_id.to_string(),
            issued_at: *issued_at,
            signature: signature.as_bytes().to_vec(),
        }),
        Request::Revoke {
            account_id,
            signature,
        } => client_frame::Request::Revoke(wire::Revoke {
            account_id: account_id.to_string(),
            signature: signature.as_bytes().to_vec(),
        }),
        Request::RedeemRenewal { code } => {
            client_frame::Request::RedeemRenewal(wire::RedeemRenewal {
                code: code.canonical().to_owned(),
            })
        }
        Request::DistributorLogin {
            distributor_id,
            signature,
        } => client_frame::Request::DistributorLogin(wire::DistributorLogin {
            distributor_id: *distributor_id,
            signature: signature.as_bytes().to_vec(),
        }),
        Request::IssueCodes { kind, days, count } => {
            client_frame::Request::IssueCodes(wire::IssueCodes {
                kind: *kind as i32,
                days: *days,
                count: *count,
            })
        }
        Request::ListLines => client_frame::Request::ListLines(wire::ListLines {}),
        Request::SetLineStatus { account_id, action } => {
            client_frame::Request::SetLineStatus(wire::SetLineStatus {
                account_id: account_id.to_string(),
                action: *action as i32,
            })
        }
    };
    with_version(&wire::ClientFrame {
        id: frame.id,
        request: Some(request),
    })
}

/// Encodes one server frame, version byte included.
pub fn encode_server(message: &ServerMessage) -> Vec<u8> {
    let body = match message {
        ServerMessage::Response { id, result } => {
            let result = match result {
                Err(e) => response::Result::Error(wire::Error {
                    code: e.code as i32,
                    message: e.message.clone(),
                    current_epoch: e.current_epoch,
                    wipe_command: e.wipe_command.clone(),
                }),
                Ok(Reply::Registered {
                    account_id,
                    subscription_expires_at,
                }) => response::Result::Registered(wire::Registered {
                    account_id: account_id.to_string(),
                    subscription_expires_at: *subscription_expires_at,
                }),
                Ok(Reply::LoggedIn {
                    subscription_expires_at,
                    key_packages_remaining,
                    has_last_resort,
                    key_package_low_water,
                    stocks,
                }) => response::Result::LoggedIn(wire::LoggedIn {
                    subscription_expires_at: *subscription_expires_at,
                    key_packages_remaining: *key_packages_remaining,
                    has_last_resort: *has_last_resort,
                    key_package_low_water: *key_package_low_water,
                    stocks: stocks
                        .iter()
                        .map(|stock| wire::SuiteStock {
                            suite: u32::from(stock.suite),
                            remaining: stock.remaining,
                            has_last_resort: stock.has_last_resort,
                        })
                        .collect(),
                }),
                Ok(Reply::KeyPackageCount { remaining, suite }) => {
                    response::Result::KeyPackageCount(wire::KeyPackageCount {
                        remaining: *remaining,
                        suite: u32::from(*suite),
                    })
                }
                Ok(Reply::KeyPackage {
                    key_package,
                    last_resort,
                }) => response::Result::KeyPackage(wire::KeyPackage {
                    key_package: key_package.clone(),
                    last_resort: *last_resort,
                }),
                Ok(Reply::Done) => response::Result::Done(wire::Done {}),
                Ok(Reply::BlobCreated {
                    blob_id,
                    expires_at,
                }) => response::Result::BlobCreated(wire::BlobCreated {
                    blob_id: blob_id.0.to_vec(),
                    expires_at: *expires_at,
                }),
                Ok(Reply::BlobState {
                    size,
                    stored,
                    expires_at,
                }) => response::Result::BlobState(wire::BlobState {
                    size: *size,
                    stored: *stored,
                    expires_at: *expires_at,
                }),
                Ok(Reply::BlobData { data, size }) => response::Result::BlobData(wire::BlobData {
                    data: data.clone(),
                    size: *size,
                }),
                Ok(Reply::RendezvousOpened {
                    rendezvous,
                    expires_at,
                }) => response::Result::RendezvousOpened(wire::RendezvousOpened {
                    rendezvous: rendezvous.0.to_vec(),
                    expires_at: *expires_at,
                }),
                Ok(Reply::Tokens {
                    key_id,
                    public_key,
                    evaluated,
                    proof,
                }) => response::Result::Tokens(wire::Tokens {
                    key_id: key_id.to_vec(),
                    public_key: public_key.clone(),
                    evaluated: evaluated.clone(),
                    proof: proof.clone(),
                }),
                Ok(Reply::RendezvousSlot { payload }) => {
                    response::Result::RendezvousSlot(wire::RendezvousSlot {
                        written: payload.is_some(),
                        payload: payload.clone().unwrap_or_default(),
                    })
                }
                Ok(Reply::DeviceLog { entries }) => response::Result::DeviceLog(wire::DeviceLog {
                    entries: entries.iter().map(DeviceEntry::encode).collect(),
                }),
                Ok(Reply::GroupInfo { group_info }) => {
                    response::Result::GroupInfo(wire::GroupInfo {
                        group_info: group_info.clone(),
                    })
                }
                Ok(Reply::CommitAccepted { epoch }) => {
                    response::Result::CommitAccepted(wire::CommitAccepted { epoch: *epoch })
                }
                Ok(Reply::AccountInfo {
                    account_id,
                    identity_key,
                }) => response::Result::AccountInfo(wire::AccountInfo {
                    account_id: account_id.to_string(),
                    identity_key: identity_key.as_bytes().to_vec(),
                }),
                Ok(Reply::Accepted { accepted_at }) => response::Result::Accepted(wire::Accepted {
                    accepted_at: *accepted_at,
                }),
                Ok(Reply::Codes { codes }) => response::Result::Codes(wire::Codes {
                    codes: codes.clone(),
                }),
                Ok(Reply::Lines { lines }) => response::Result::Lines(wire::Lines {
                    lines: lines
                        .iter()
                        .map(|line| wire::Line {
                            account_id: line.account_id.to_string(),
                            subscription_expires_at: line.subscription_expires_at,
                            last_seen_day: line.last_seen_day,
                            status: line.status.clone(),
                        })
                        .collect(),
                }),
                Ok(Reply::Renewed {
                    subscription_expires_at,
                }) => response::Result::Renewed(wire::Renewed {
                    subscription_expires_at: *subscription_expires_at,
                }),
            };
            server_frame::Body::Response(wire::Response {
                id: *id,
                result: Some(result),
            })
        }
        ServerMessage::Push(p) => {
            let body = match p {
                Push::Hello {
                    protocol_version,
                    nonce,
                    server_time,
                    max_frame_bytes,
                    token_keys,
                } => push::Body::Hello(wire::Hello {
                    protocol_version: *protocol_version,
                    nonce: nonce.as_bytes().to_vec(),
                    server_time: *server_time,
                    max_frame_bytes: *max_frame_bytes,
                    token_keys: token_keys.iter().map(|k| k.to_vec()).collect(),
                }),
                Push::Delivery(d) => push::Body::Delivery(wire::Delivery {
                    id: d.id,
                    sender: d
                        .sender
                        .as_ref()
                        .map(AccountId::to_string)
                        .unwrap_or_default(),
                    kind: d.kind as i32,
                    group_id: d
                        .group_id
                        .as_ref()
                        .map(|g| g.as_bytes().to_vec())
                        .unwrap_or_default(),
                    payload: d.payload.clone(),
                    sent_at: d.sent_at,
                }),
                Push::Synced => push::Body::Synced(wire::Synced {}),
            };
            server_frame::Body::Push(wire::Push { body: Some(body) })
        }
    };
    with_version(&wire::ServerFrame { body: Some(body) })
}

/// Decodes and validates one server frame.
pub fn decode_server(bytes: &[u8]) -> Result<ServerMessage, DecodeError> {
    let raw = wire::ServerFrame::decode(frame_body(
        bytes,
        MAX_FRAME_BYTES + crate::SERVER_FRAME_SLACK,
    )?)
    .map_err(protobuf)?;
    Ok(match raw.body.ok_or(DecodeError::Missing("body"))? {
        server_frame::Body::Response(r) => {
            let result = match r.result.ok_or(DecodeError::Missing("result"))? {
                response::Result::Error(e) => Err(ErrorReply {
                    code: ErrorCode::try_from(e.code).unwrap_or(ErrorCode::Unspecified),
                    message: e.message,
                    current_epoch: e.current_epoch,
                    wipe_command: e.wipe_command,
                }),
                response::Result::Registered(x) => Ok(Reply::Registered {
                    account_id: account("account_id", &x.account_id)?,
                    subscription_expires_at: x.subscription_expires_at,
                }),
                response::Result::LoggedIn(x) => Ok(Reply::LoggedIn {
                    subscription_expires_at: x.subscription_expires_at,
                    key_packages_remaining: x.key_packages_remaining,
                    has_last_resort: x.has_last_resort,
                    key_package_low_water: x.key_package_low_water,
                    stocks: x
                        .stocks
                        .into_iter()
                        .map(|stock| {
                            Ok(SuiteStock {
                                suite: suite("stocks", stock.suite)?,
                                remaining: stock.remaining,
                                has_last_resort: stock.has_last_resort,
                            })
                        })
                        .collect::<Result<_, DecodeError>>()?,
                }),
                response::Result::KeyPackageCount(x) => Ok(Reply::KeyPackageCount {
                    remaining: x.remaining,
                    suite: if x.suite == 0 {
                        CLASSICAL_SUITE
                    } else {
                        suite("suite", x.suite)?
                    },
                }),
                response::Result::KeyPackage(x) => Ok(Reply::KeyPackage {
                    key_package: key_package("key_package", x.key_package)?,
                    last_resort: x.last_resort,
                }),
                response::Result::Done(_) => Ok(Reply::Done),
                response::Result::BlobCreated(x) => Ok(Reply::BlobCreated {
                    blob_id: BlobId::from_slice(&x.blob_id)?,
                    expires_at: x.expires_at,
                }),
                response::Result::BlobState(x) => Ok(Reply::BlobState {
                    size: x.size,
                    stored: x.stored,
                    expires_at: x.expires_at,
                }),
                response::Result::BlobData(x) => Ok(Reply::BlobData {
                    data: x.data,
                    size: x.size,
                }),
                response::Result::RendezvousOpened(x) => Ok(Reply::RendezvousOpened {
                    rendezvous: RendezvousId::from_slice(&x.rendezvous)?,
                    expires_at: x.expires_at,
                }),
                response::Result::RendezvousSlot(x) => Ok(Reply::RendezvousSlot {
                    payload: x.written.then_some(x.payload),
                }),
                response::Result::Tokens(x) => Ok(Reply::Tokens {
                    key_id: fixed("key_id", &x.key_id)?,
                    public_key: x.public_key,
                    evaluated: x.evaluated,
                    proof: x.proof,
                }),
                response::Result::DeviceLog(x) => Ok(Reply::DeviceLog {
                    entries: x
                        .entries
                        .iter()
                        .map(|e| DeviceEntry::decode(e))
                        .collect::<Result<_, _>>()?,
                }),
                response::Result::GroupInfo(x) => Ok(Reply::GroupInfo {
                    group_info: x.group_info,
                }),
                response::Result::CommitAccepted(x) => Ok(Reply::CommitAccepted { epoch: x.epoch }),
                response::Result::AccountInfo(x) => Ok(Reply::AccountInfo {
                    account_id: account("account_id", &x.account_id)?,
                    identity_key: IdentityKey::from_slice(&x.identity_key)?,
                }),
                response::Result::Accepted(x) => Ok(Reply::Accepted {
                    accepted_at: x.accepted_at,
                }),
                response::Result::Codes(x) => Ok(Reply::Codes { codes: x.codes }),
                response::Result::Lines(x) => Ok(Reply::Lines {
                    lines: x
                        .lines
                        .into_iter()
                        .map(|line| {
                            Ok(LineInfo {
                                account_id: account("account_id", &line.account_id)?,
                                subscription_expires_at: line.subscription_expires_at,
                                last_seen_day: line.last_seen_day,
                                status: line.status,
                            })
                        })
                        .collect::<Result<_, DecodeError>>()?,
                }),
                response::Result::Renewed(x) => Ok(Reply::Renewed {
                    subscription_expires_at: x.subscription_expires_at,
                }),
            };
            ServerMessage::Response { id: r.id, result }
        }
        server_frame::Body::Push(p) => {
            ServerMessage::Push(match p.body.ok_or(DecodeError::Missing("push"))? {
                push::Body::Hello(h) => Push::Hello {
                    protocol_version: h.protocol_version,
                    nonce: Nonce::from_slice(&h.nonce)?,
                    server_time: h.server_time,
                    max_frame_bytes: h.max_frame_bytes,
                    token_keys: {
                        if h.token_keys.len() > MAX_TOKEN_KEYS_DECODED {
                            return Err(DecodeError::invalid(
                                "token_keys",
                                format!("more than {MAX_TOKEN_KEYS_DECODED}"),
                            ));
                        }
                        h.token_keys
                            .iter()
                            .map(|k| fixed("token_keys", k))
                            .collect::<Result<_, _>>()?
                    },
                },
                push::Body::Delivery(d) => Push::Delivery(Delivery {
                    id: d.id,
                    sender: if d.sender.is_empty() {
                        None
                    } else {
                        Some(account("sender", &d.sender)?)
                    },
                    kind: delivery_kind("kind", d.kind)?,
                    group_id: if d.group_id.is_empty() {
                        None
                    } else {
                        Some(GroupId::new(d.group_id)?)
                    },
                    payload: d.payload,
                    sent_at: d.sent_at,
                }),
                push::Body::Synced(_) => Push::Synced,
            })
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alice() -> AccountId {
        AccountId::parse("ACE23456").unwrap_or_else(|e| panic!("{e}"))
    }

    fn check_client(bytes: &[u8], expected: Result<(), &str>) {
        match (decode_client(bytes), expected) {
            (Ok(_), Ok(())) => {}
            (Err(e), Err(fragment)) => assert!(e.to_string().contains(fragment), "{e}"),
            (got, want) => panic!("got {got:?}, want {want:?}"),
        }
    }

    #[test]
    fn client_frames_round_trip() {
        let frames = vec![
            Request::Login {
                account_id: alice(),
                device: DeviceId::FIRST,
                signature: Signature::from_bytes([7; 64]),
            },
            Request::SendCommit(CommitSubmission {
                group_id: GroupId::new(vec![1, 2, 3]).unwrap_or_else(|e| panic!("{e}")),
                epoch: 4,
                commit: vec![9; 10],
                welcome: Some(vec![8; 5]),
                group_info: vec![7; 6],
                delivery_key: Some([6; 32]),
            }),
            Request::CreateGroup {
                group_id: GroupId::new(vec![1, 2, 3]).unwrap_or_else(|e| panic!("{e}")),
                group_info: vec![7; 6],
                delivery_key: None,
            },
            Request::IssueTokens {
                blinded: vec![vec![1; 32], vec![2; 32]],
            },
            Request::SendAnonymous(AnonymousMessage {
                group_id: GroupId::new(vec![1, 2, 3]).unwrap_or_else(|e| panic!("{e}")),
                message: vec![5; 40],
                ttl_seconds: 3600,
                signature: [4; 64],
                token: SendToken {
                    key_id: [3; 32],
                    nonce: [2; 32],
                    authenticator: [1; 64],
                },
            }),
            Request::FetchGroupInfo {
                group_id: GroupId::new(vec![1, 2, 3]).unwrap_or_else(|e| panic!("{e}")),
            },
            Request::FetchDeviceLog {
                account_id: alice(),
                from: 3,
            },
            Request::FetchKeyPackage {
                account_id: alice(),
                device: DeviceId(3),
                suites: vec![0x004F, CLASSICAL_SUITE],
            },
            Request::DeclineContact { from: alice() },
            Request::Ack {
                delivery_ids: vec![1, 2, 3],
                quiet: false,
            },
            Request::Ack {
                delivery_ids: vec![4],
                quiet: true,
            },
            Request::Ping,
            Request::OpenRendezvous,
            Request::RendezvousPut {
                rendezvous: RendezvousId([4; 16]),
                slot: 3,
                payload: vec![1, 2],
            },
            Request::RendezvousGet {
                rendezvous: RendezvousId([4; 16]),
                slot: 0,
            },
            Request::CloseRendezvous {
                rendezvous: RendezvousId([4; 16]),
            },
            Request::CreateBlob {
                group_id: GroupId::new(vec![1, 2]).unwrap_or_else(|e| panic!("{e}")),
                size: 1 << 20,
                ttl_seconds: 60,
            },
            Request::PutBlob {
                blob_id: BlobId([5; 16]),
                offset: 4096,
                data: vec![9; MAX_BLOB_CHUNK].into(),
            },
            Request::BlobStatus {
                blob_id: BlobId([5; 16]),
            },
            Request::GetBlob {
                blob_id: BlobId([5; 16]),
                offset: 7,
                length: 100,
            },
            Request::BlobFetched {
                blob_id: BlobId([5; 16]),
            },
        ];
        for (n, request) in frames.into_iter().enumerate() {
            let frame = ClientFrame {
                id: n as u64 + 1,
                request,
            };
            let encoded = encode_client(&frame);
            assert_eq!(
                decode_client_bytes(encoded.clone().into()),
                Ok(frame.clone())
            );
            assert_eq!(decode_client(&encoded), Ok(frame));
        }
    }

    #[test]
    fn a_file_chunk_is_a_slice_of_the_frame_it_came_in() {
        let encoded = Bytes::from(encode_client(&ClientFrame {
            id: 4,
            request: Request::PutBlob {
                blob_id: BlobId([5; 16]),
                offset: 0,
                data: vec![9; 4096].into(),
            },
        }));
        let Ok(ClientFrame {
            request: Request::PutBlob { data, .. },
            ..
        }) = decode_client_bytes(encoded.clone())
        else {
            panic!("not decoded");
        };
        let frame = encoded.as_ptr_range();
        assert!(frame.contains(&data.as_ptr()), "the chunk was copied");
        assert_eq!(data, vec![9; 4096]);
        // Refused as the borrowed form refuses it, at each stage: version,
        // protobuf, a field's own rule (an empty chunk, one too large).
        let mut empty = encode_client(&ClientFrame {
            id: 4,
            request: Request::GetBlob {
                blob_id: BlobId([5; 16]),
                offset: 0,
                length: 1,
            },
        });
        empty.truncate(1);
        let frame = |request| {
            with_version(&wire::ClientFrame {
                id: 1,
                request: Some(request),
            })
        };
        let too_large = frame(client_frame::Request::PutBlob(wire::PutBlob {
            blob_id: vec![1; 16],
            offset: 0,
            data: vec![0; MAX_BLOB_CHUNK + 1].into(),
        }));
        let no_data = frame(client_frame::Request::PutBlob(wire::PutBlob {
            blob_id: vec![1; 16],
            offset: 0,
            data: Bytes::new(),
        }));
        for hostile in [
            vec![2, 0],
            vec![1, 0xff, 0xff, 0xff],
            empty,
            too_large,
            no_data,
        ] {
            let refused = decode_client(&hostile);
            assert!(refused.is_err());
            assert_eq!(decode_client_bytes(hostile.into()), refused);
        }
    }

    #[test]
    fn hostile_client_frames_get_typed_errors() {
        check_client(&[], Err("empty frame"));
        check_client(&[2, 0], Err("unsupported protocol version 2"));
        check_client(&[1, 0xff, 0xff, 0xff], Err("malformed protobuf"));
        check_client(&[1], Err("`id` is missing"));
        check_client(&vec![1; MAX_FRAME_BYTES + 1], Err("exceeds the maximum"));
        let frame = |request| {
            with_version(&wire::ClientFrame {
                id: 1,
                request: Some(request),
            })
        };
        let put = |data: Vec<u8>| {
            frame(client_frame::Request::PutBlob(wire::PutBlob {
                blob_id: vec![1; 16],
                offset: 0,
                data: data.into(),
            }))
        };
        check_client(&put(vec![0; MAX_BLOB_CHUNK + 1]), Err("`data`"));
        check_client(&put(vec![]), Err("`data`"));
        let get = |blob_id: Vec<u8>, length| {
            frame(client_frame::Request::GetBlob(wire::GetBlob {
                blob_id,
                offset: 0,
                length,
            }))
        };
        check_client(&get(vec![1; 16], 0), Err("`length`"));
        check_client(
            &get(vec![1; 16], MAX_BLOB_CHUNK as u32 + 1),
            Err("`length`"),
        );
        check_client(&get(vec![1; 15], 1), Err("`blob_id`"));
        check_client(&get(vec![1; 16], MAX_BLOB_CHUNK as u32), Ok(()));
        let anonymous = wire::SendAnonymous {
            group_id: vec![1; 16],
            message: vec![2; 10],
            ttl_seconds: 0,
            signature: vec![3; 64],
            token_key_id: vec![4; 32],
            token_nonce: vec![5; 32],
            token_authenticator: vec![6; 64],
        };
        check_client(
            &frame(client_frame::Request::SendAnonymous(anonymous.clone())),
            Ok(()),
        );
        for (broken, field) in [
            (
                wire::SendAnonymous {
                    signature: vec![3; 63],
                    ..anonymous.clone()
                },
                "signature",
            ),
            (
                wire::SendAnonymous {
                    token_nonce: vec![],
                    ..anonymous.clone()
                },
                "token_nonce",
            ),
            (
                wire::SendAnonymous {
                    token_authenticator: vec![6; 65],
                    ..anonymous.clone()
                },
                "token_authenticator",
            ),
            (
                wire::SendAnonymous {
                    message: vec![],
                    ..anonymous.clone()
                },
                "message",
            ),
        ] {
            check_client(
                &frame(client_frame::Request::SendAnonymous(broken)),
                Err(field),
            );
        }
        check_client(
            &frame(client_frame::Request::IssueTokens(wire::IssueTokens {
                blinded: vec![],
            })),
            Err("blinded"),
        );
        check_client(
            &frame(client_frame::Request::IssueTokens(wire::IssueTokens {
                blinded: vec![vec![1; 32]; crate::tokens::MAX_TOKENS_PER_REQUEST + 1],
            })),
            Err("blinded"),
        );
        check_client(
            &frame(client_frame::Request::CreateGroup(wire::CreateGroup {
                group_id: vec![1; 16],
                group_info: vec![1],
                delivery_key: vec![1; 31],
            })),
            Err("delivery_key"),
        );
    }

    /// The largest deliverable message, in the largest envelope, still fits
    /// in a frame a device accepts.
    #[test]
    fn the_largest_delivery_fits_in_a_frame() {
        let frame = encode_server(&ServerMessage::Push(Push::Delivery(Delivery {
            id: u64::MAX,
            sender: Some(AccountId::parse("ZZZZZZZZ").unwrap_or_else(|e| panic!("{e}"))),
            kind: DeliveryKind::Application,
            group_id: Some(
                GroupId::new(vec![0xff; GroupId::MAX_LEN]).unwrap_or_else(|e| panic!("{e}")),
            ),
            payload: vec![0xff; crate::MAX_DELIVERY_PAYLOAD],
            sent_at: u64::MAX,
        })));
        assert!(frame.len() <= MAX_FRAME_BYTES, "{} bytes", frame.len());
        assert!(decode_server(&frame).is_ok());
        let bad_account = wire::ClientFrame {
            id: 1,
            request: Some(client_frame::Request::FetchKeyPackage(
                wire::FetchKeyPackage {
                    account_id: "nope".into(),
                    device: 0,
                    suites: Vec::new(),
                },
            )),
        };
        check_client(&with_version(&bad_account), Err("account_id"));
        let bad_kind = wire::ClientFrame {
            id: 1,
            request: Some(client_frame::Request::SendMessage(wire::SendMessage {
                group_id: vec![1],
                message: vec![1],
                kind: DeliveryKind::Welcome as i32,
                ttl_seconds: 0,
            })),
        };
        check_client(
            &with_version(&bad_kind),
            Err("only APPLICATION or PROPOSAL"),
        );
    }

    #[test]
    fn server_frames_round_trip() {
        let messages = vec![
            ServerMessage::Push(Push::Hello {
                protocol_version: 1,
                nonce: Nonce::from_bytes([3; 32]),
                server_time: 10,
                max_frame_bytes: 100,
                token_keys: vec![[4; 32], [5; 32]],
            }),
            ServerMessage::Push(Push::Delivery(Delivery {
                id: 5,
                sender: None,
                kind: DeliveryKind::Application,
                group_id: GroupId::new(vec![1]).ok(),
                payload: vec![1, 2],
                sent_at: 9,
            })),
            ServerMessage::Push(Push::Delivery(Delivery {
                id: 6,
                sender: Some(alice()),
                kind: DeliveryKind::ContactRequest,
                group_id: None,
                payload: Vec::new(),
                sent_at: 9,
            })),
            ServerMessage::Response {
                id: 3,
                result: Err(ErrorReply {
                    code: ErrorCode::StaleEpoch,
                    message: "stale".into(),
                    current_epoch: 7,
                    wipe_command: Vec::new(),
                }),
            },
            ServerMessage::Response {
                id: 9,
                result: Err(ErrorReply {
                    wipe_command: vec![3; 72],
                    ..ErrorReply::new(ErrorCode::LineRevoked, "ended")
                }),
            },
            ServerMessage::Response {
                id: 4,
                result: Ok(Reply::CommitAccepted { epoch: 8 }),
            },
            ServerMessage::Response {
                id: 5,
                result: Ok(Reply::RendezvousOpened {
                    rendezvous: RendezvousId([6; 16]),
                    expires_at: 600,
                }),
            },
            ServerMessage::Response {
                id: 6,
                result: Ok(Reply::RendezvousSlot { payload: None }),
            },
            ServerMessage::Response {
                id: 9,
                result: Ok(Reply::BlobCreated {
                    blob_id: BlobId([1; 16]),
                    expires_at: 86_400,
                }),
            },
            ServerMessage::Response {
                id: 10,
                result: Ok(Reply::BlobState {
                    size: 100,
                    stored: 50,
                    expires_at: 86_400,
                }),
            },
            ServerMessage::Response {
                id: 11,
                result: Ok(Reply::BlobData {
                    data: vec![3; 10].into(),
                    size: 100,
                }),
            },
            ServerMessage::Response {
                id: 7,
                result: Ok(Reply::RendezvousSlot {
                    payload: Some(vec![]),
                }),
            },
            ServerMessage::Response {
                id: 8,
                result: Ok(Reply::Tokens {
                    key_id: [9; 32],
                    public_key: vec![8; 32],
                    evaluated: vec![vec![7; 32]],
                    proof: vec![6; 64],
                }),
            },
        ];
        for message in messages {
            assert_eq!(decode_server(&encode_server(&message)), Ok(message));
        }
    }
}
