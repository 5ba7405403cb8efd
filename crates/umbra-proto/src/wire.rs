//! Raw protobuf messages, mirroring `proto/umbra.proto` field for field.
//!
//! These are what travels; nothing outside this crate should build or match
//! on them directly. [`crate::frame`] turns them into validated domain types.
#![allow(missing_docs)]

#[derive(Clone, PartialEq, prost::Message)]
pub struct ClientFrame {
    #[prost(uint64, tag = "1")]
    pub id: u64,
    #[prost(
        oneof = "client_frame::Request",
        tags = "10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44"
    )]
    pub request: Option<client_frame::Request>,
}

pub mod client_frame {
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Request {
        #[prost(message, tag = "10")]
        Register(super::Register),
        #[prost(message, tag = "11")]
        Login(super::Login),
        #[prost(message, tag = "12")]
        UploadKeyPackages(super::UploadKeyPackages),
        #[prost(message, tag = "13")]
        FetchKeyPackage(super::FetchKeyPackage),
        #[prost(message, tag = "14")]
        SendContactRequest(super::SendContactRequest),
        #[prost(message, tag = "15")]
        AcceptContact(super::AcceptContact),
        #[prost(message, tag = "37")]
        DeclineContact(super::DeclineContact),
        #[prost(message, tag = "16")]
        CreateGroup(super::CreateGroup),
        #[prost(message, tag = "17")]
        SendCommit(super::SendCommit),
        #[prost(message, tag = "18")]
        SendMessage(super::SendMessage),
        #[prost(message, tag = "19")]
        Ack(super::Ack),
        #[prost(message, tag = "20")]
        LookupAccount(super::LookupAccount),
        #[prost(message, tag = "21")]
        Ping(super::Ping),
        #[prost(message, tag = "22")]
        SetWipeKey(super::SetWipeKey),
        #[prost(message, tag = "23")]
        Wipe(super::Wipe),
        #[prost(message, tag = "24")]
        Revoke(super::Revoke),
        #[prost(message, tag = "25")]
        RedeemRenewal(super::RedeemRenewal),
        #[prost(message, tag = "26")]
        DistributorLogin(super::DistributorLogin),
        #[prost(message, tag = "27")]
        IssueCodes(super::IssueCodes),
        #[prost(message, tag = "28")]
        ListLines(super::ListLines),
        #[prost(message, tag = "29")]
        SetLineStatus(super::SetLineStatus),
        #[prost(message, tag = "30")]
        FetchGroupInfo(super::FetchGroupInfo),
        #[prost(message, tag = "31")]
        AppendDeviceEntry(super::AppendDeviceEntry),
        #[prost(message, tag = "32")]
        FetchDeviceLog(super::FetchDeviceLog),
        #[prost(message, tag = "33")]
        OpenRendezvous(super::OpenRendezvous),
        #[prost(message, tag = "34")]
        RendezvousPut(super::RendezvousPut),
        #[prost(message, tag = "35")]
        RendezvousGet(super::RendezvousGet),
        #[prost(message, tag = "36")]
        CloseRendezvous(super::CloseRendezvous),
        #[prost(message, tag = "38")]
        IssueTokens(super::IssueTokens),
        #[prost(message, tag = "39")]
        SendAnonymous(super::SendAnonymous),
        #[prost(message, tag = "40")]
        CreateBlob(super::CreateBlob),
        #[prost(message, tag = "41")]
        PutBlob(super::PutBlob),
        #[prost(message, tag = "42")]
        BlobStatus(super::BlobStatus),
        #[prost(message, tag = "43")]
        GetBlob(super::GetBlob),
        #[prost(message, tag = "44")]
        BlobFetched(super::BlobFetched),
    }
}

/// Creates a blob for an attachment in a group.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CreateBlob {
    #[prost(bytes = "vec", tag = "1")]
    pub group_id: Vec<u8>,
    #[prost(uint64, tag = "2")]
    pub size: u64,
    #[prost(uint32, tag = "3")]
    pub ttl_seconds: u32,
}

/// Appends bytes to a blob the caller is uploading.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PutBlob {
    #[prost(bytes = "vec", tag = "1")]
    pub blob_id: Vec<u8>,
    #[prost(uint64, tag = "2")]
    pub offset: u64,
    #[prost(bytes = "bytes", tag = "3")]
    pub data: bytes::Bytes,
}

/// How much of a blob the caller uploads is stored.
#[derive(Clone, PartialEq, prost::Message)]
pub struct BlobStatus {
    #[prost(bytes = "vec", tag = "1")]
    pub blob_id: Vec<u8>,
}

/// Reads part of a complete blob.
#[derive(Clone, PartialEq, prost::Message)]
pub struct GetBlob {
    #[prost(bytes = "vec", tag = "1")]
    pub blob_id: Vec<u8>,
    #[prost(uint64, tag = "2")]
    pub offset: u64,
    #[prost(uint32, tag = "3")]
    pub length: u32,
}

/// The caller's device has the blob.
#[derive(Clone, PartialEq, prost::Message)]
pub struct BlobFetched {
    #[prost(bytes = "vec", tag = "1")]
    pub blob_id: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct BlobCreated {
    #[prost(bytes = "vec", tag = "1")]
    pub blob_id: Vec<u8>,
    #[prost(uint64, tag = "2")]
    pub expires_at: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct BlobState {
    #[prost(uint64, tag = "1")]
    pub size: u64,
    #[prost(uint64, tag = "2")]
    pub stored: u64,
    #[prost(uint64, tag = "3")]
    pub expires_at: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct BlobData {
    #[prost(bytes = "bytes", tag = "1")]
    pub data: bytes::Bytes,
    #[prost(uint64, tag = "2")]
    pub size: u64,
}

/// Opens a rendezvous for linking a device (see `crate::rendezvous`).
#[derive(Clone, PartialEq, prost::Message)]
pub struct OpenRendezvous {}

/// Writes one slot of a rendezvous, once.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RendezvousPut {
    #[prost(bytes = "vec", tag = "1")]
    pub rendezvous: Vec<u8>,
    #[prost(uint32, tag = "2")]
    pub slot: u32,
    #[prost(bytes = "vec", tag = "3")]
    pub payload: Vec<u8>,
}

/// Reads one slot of a rendezvous (it stays until the rendezvous closes).
#[derive(Clone, PartialEq, prost::Message)]
pub struct RendezvousGet {
    #[prost(bytes = "vec", tag = "1")]
    pub rendezvous: Vec<u8>,
    #[prost(uint32, tag = "2")]
    pub slot: u32,
}

/// Deletes a rendezvous the caller's account opened.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CloseRendezvous {
    #[prost(bytes = "vec", tag = "1")]
    pub rendezvous: Vec<u8>,
}

/// Appends one signed entry (an encoded [`DeviceEntry`]) to the caller's
/// own device log.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AppendDeviceEntry {
    #[prost(bytes = "vec", tag = "1")]
    pub entry: Vec<u8>,
}

/// The entries of an account's device log from position `from` on.
#[derive(Clone, PartialEq, prost::Message)]
pub struct FetchDeviceLog {
    #[prost(string, tag = "1")]
    pub account_id: String,
    #[prost(uint64, tag = "2")]
    pub from: u64,
}

/// One entry of an account's device log (see `crate::devices`).
#[derive(Clone, PartialEq, prost::Message)]
pub struct DeviceEntry {
    #[prost(uint64, tag = "1")]
    pub seq: u64,
    #[prost(bytes = "vec", tag = "2")]
    pub prev_hash: Vec<u8>,
    #[prost(uint64, tag = "3")]
    pub created_at: u64,
    #[prost(uint32, tag = "4")]
    pub by_device: u32,
    #[prost(message, optional, tag = "5")]
    pub add: Option<AddDevice>,
    #[prost(message, optional, tag = "6")]
    pub remove: Option<RemoveDevice>,
    #[prost(bytes = "vec", tag = "7")]
    pub account_signature: Vec<u8>,
    #[prost(bytes = "vec", tag = "8")]
    pub device_signature: Vec<u8>,
    #[prost(bytes = "vec", tag = "9")]
    pub added_signature: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct AddDevice {
    #[prost(uint32, tag = "1")]
    pub device: u32,
    #[prost(bytes = "vec", tag = "2")]
    pub key: Vec<u8>,
    #[prost(string, tag = "3")]
    pub name: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct RemoveDevice {
    #[prost(uint32, tag = "1")]
    pub device: u32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Register {
    #[prost(string, tag = "1")]
    pub activation_code: String,
    #[prost(bytes = "vec", tag = "2")]
    pub identity_key: Vec<u8>,
    #[prost(bytes = "vec", tag = "3")]
    pub signature: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Login {
    #[prost(string, tag = "1")]
    pub account_id: String,
    #[prost(bytes = "vec", tag = "2")]
    pub signature: Vec<u8>,
    /// The device logging in (0 is read as 1, the first device).
    #[prost(uint32, tag = "3")]
    pub device: u32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct UploadKeyPackages {
    #[prost(bytes = "vec", repeated, tag = "1")]
    pub key_packages: Vec<Vec<u8>>,
    #[prost(bytes = "vec", tag = "2")]
    pub last_resort: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct FetchKeyPackage {
    #[prost(string, tag = "1")]
    pub account_id: String,
    #[prost(uint32, tag = "2")]
    pub device: u32,
    /// MLS ciphersuites the fetcher takes, most wanted first (empty: 3).
    #[prost(uint32, repeated, tag = "3")]
    pub suites: Vec<u32>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct SendContactRequest {
    #[prost(string, tag = "1")]
    pub account_id: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct AcceptContact {
    #[prost(string, tag = "1")]
    pub account_id: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct DeclineContact {
    #[prost(string, tag = "1")]
    pub account_id: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct CreateGroup {
    #[prost(bytes = "vec", tag = "1")]
    pub group_id: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    pub group_info: Vec<u8>,
    /// The public half of epoch 0's delivery key (32 bytes), or empty.
    #[prost(bytes = "vec", tag = "3")]
    pub delivery_key: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct SendCommit {
    #[prost(bytes = "vec", tag = "1")]
    pub group_id: Vec<u8>,
    #[prost(uint64, tag = "2")]
    pub epoch: u64,
    #[prost(bytes = "vec", tag = "3")]
    pub commit: Vec<u8>,
    #[prost(bytes = "vec", tag = "4")]
    pub welcome: Vec<u8>,
    // Tags 5 and 6 (declared `added` and `removed` accounts) are retired:
    // the server derives membership from the validated commit.
    #[prost(bytes = "vec", tag = "7")]
    pub group_info: Vec<u8>,
    /// The public half of the new epoch's delivery key (32 bytes), or empty.
    #[prost(bytes = "vec", tag = "8")]
    pub delivery_key: Vec<u8>,
}

/// Blinded token inputs for the server to sign (an active line's session).
#[derive(Clone, PartialEq, prost::Message)]
pub struct IssueTokens {
    #[prost(bytes = "vec", repeated, tag = "1")]
    pub blinded: Vec<Vec<u8>>,
}

/// An application message for a group, on a connection that never logged
/// in: signed with the epoch's delivery key, paid for with a token.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SendAnonymous {
    #[prost(bytes = "vec", tag = "1")]
    pub group_id: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    pub message: Vec<u8>,
    #[prost(uint32, tag = "3")]
    pub ttl_seconds: u32,
    #[prost(bytes = "vec", tag = "4")]
    pub signature: Vec<u8>,
    #[prost(bytes = "vec", tag = "5")]
    pub token_key_id: Vec<u8>,
    #[prost(bytes = "vec", tag = "6")]
    pub token_nonce: Vec<u8>,
    #[prost(bytes = "vec", tag = "7")]
    pub token_authenticator: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct FetchGroupInfo {
    #[prost(bytes = "vec", tag = "1")]
    pub group_id: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct SendMessage {
    #[prost(bytes = "vec", tag = "1")]
    pub group_id: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    pub message: Vec<u8>,
    #[prost(enumeration = "DeliveryKind", tag = "3")]
    pub kind: i32,
    #[prost(uint32, tag = "4")]
    pub ttl_seconds: u32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Ack {
    #[prost(uint64, repeated, tag = "1")]
    pub delivery_ids: Vec<u64>,
    #[prost(bool, tag = "2")]
    pub quiet: bool,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct LookupAccount {
    #[prost(string, tag = "1")]
    pub account_id: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Ping {}

#[derive(Clone, PartialEq, prost::Message)]
pub struct SetWipeKey {
    #[prost(bytes = "vec", tag = "1")]
    pub wipe_key: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Wipe {
    #[prost(string, tag = "1")]
    pub account_id: String,
    #[prost(uint64, tag = "2")]
    pub issued_at: u64,
    #[prost(bytes = "vec", tag = "3")]
    pub signature: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Revoke {
    #[prost(string, tag = "1")]
    pub account_id: String,
    #[prost(bytes = "vec", tag = "2")]
    pub signature: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct RedeemRenewal {
    #[prost(string, tag = "1")]
    pub code: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct DistributorLogin {
    #[prost(uint64, tag = "1")]
    pub distributor_id: u64,
    #[prost(bytes = "vec", tag = "2")]
    pub signature: Vec<u8>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum CodeKind {
    Unspecified = 0,
    Activation = 1,
    Renewal = 2,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct IssueCodes {
    #[prost(enumeration = "CodeKind", tag = "1")]
    pub kind: i32,
    #[prost(uint32, tag = "2")]
    pub days: u32,
    #[prost(uint32, tag = "3")]
    pub count: u32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ListLines {}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum LineAction {
    Unspecified = 0,
    Suspend = 1,
    Resume = 2,
    Revoke = 3,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct SetLineStatus {
    #[prost(string, tag = "1")]
    pub account_id: String,
    #[prost(enumeration = "LineAction", tag = "2")]
    pub action: i32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ServerFrame {
    #[prost(oneof = "server_frame::Body", tags = "1, 2")]
    pub body: Option<server_frame::Body>,
}

pub mod server_frame {
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Body {
        #[prost(message, tag = "1")]
        Response(super::Response),
        #[prost(message, tag = "2")]
        Push(super::Push),
    }
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Response {
    #[prost(uint64, tag = "1")]
    pub id: u64,
    #[prost(
        oneof = "response::Result",
        tags = "2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21"
    )]
    pub result: Option<response::Result>,
}

pub mod response {
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Result {
        #[prost(message, tag = "2")]
        Error(super::Error),
        #[prost(message, tag = "3")]
        Registered(super::Registered),
        #[prost(message, tag = "4")]
        LoggedIn(super::LoggedIn),
        #[prost(message, tag = "5")]
        KeyPackageCount(super::KeyPackageCount),
        #[prost(message, tag = "6")]
        KeyPackage(super::KeyPackage),
        #[prost(message, tag = "7")]
        Done(super::Done),
        #[prost(message, tag = "8")]
        CommitAccepted(super::CommitAccepted),
        #[prost(message, tag = "9")]
        AccountInfo(super::AccountInfo),
        #[prost(message, tag = "10")]
        Accepted(super::Accepted),
        #[prost(message, tag = "11")]
        Codes(super::Codes),
        #[prost(message, tag = "12")]
        Lines(super::Lines),
        #[prost(message, tag = "13")]
        Renewed(super::Renewed),
        #[prost(message, tag = "14")]
        GroupInfo(super::GroupInfo),
        #[prost(message, tag = "15")]
        DeviceLog(super::DeviceLog),
        #[prost(message, tag = "16")]
        RendezvousOpened(super::RendezvousOpened),
        #[prost(message, tag = "17")]
        RendezvousSlot(super::RendezvousSlot),
        #[prost(message, tag = "18")]
        Tokens(super::Tokens),
        #[prost(message, tag = "19")]
        BlobCreated(super::BlobCreated),
        #[prost(message, tag = "20")]
        BlobState(super::BlobState),
        #[prost(message, tag = "21")]
        BlobData(super::BlobData),
    }
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct RendezvousOpened {
    #[prost(bytes = "vec", tag = "1")]
    pub rendezvous: Vec<u8>,
    #[prost(uint64, tag = "2")]
    pub expires_at: u64,
}

/// A slot's payload; `written` false for a slot nobody wrote yet.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RendezvousSlot {
    #[prost(bool, tag = "1")]
    pub written: bool,
    #[prost(bytes = "vec", tag = "2")]
    pub payload: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Error {
    #[prost(enumeration = "ErrorCode", tag = "1")]
    pub code: i32,
    #[prost(string, tag = "2")]
    pub message: String,
    #[prost(uint64, tag = "3")]
    pub current_epoch: u64,
    #[prost(bytes = "vec", tag = "4")]
    pub wipe_command: Vec<u8>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum ErrorCode {
    Unspecified = 0,
    MalformedFrame = 1,
    FrameTooLarge = 2,
    UnsupportedVersion = 3,
    NotAuthenticated = 4,
    AlreadyAuthenticated = 5,
    BadSignature = 6,
    UnknownActivationCode = 7,
    ActivationCodeUsed = 8,
    UnknownAccount = 9,
    InvalidKeyPackage = 10,
    NoKeyPackage = 11,
    NotAContact = 12,
    NotAMember = 13,
    StaleEpoch = 14,
    UnknownGroup = 15,
    GroupExists = 16,
    SubscriptionExpired = 17,
    InvalidRequest = 18,
    Internal = 19,
    ServerBusy = 20,
    LineRevoked = 21,
    LineSuspended = 22,
    QuotaExceeded = 23,
    NotYourLine = 24,
    InvalidCommit = 25,
    InvalidProposal = 26,
    StaleWipe = 27,
    RateLimited = 28,
    StorageFull = 29,
    TooManyConnections = 30,
    SessionReplaced = 31,
    IdleTimeout = 32,
    /// A device log entry breaks a rule of the log (the message says which).
    InvalidDeviceEntry = 33,
    /// Another device of the account appended to its device log first: fetch
    /// the log and make the change again on top of it.
    StaleDeviceLog = 34,
    /// This device was removed from its account: its sessions end (id 0)
    /// and it can no longer log in.
    DeviceRemoved = 35,
    /// The device named is not one of the account's current devices: fetch
    /// the account's device log again.
    UnknownDevice = 36,
    /// No such rendezvous: never opened, expired, or closed.
    UnknownRendezvous = 37,
    /// That rendezvous slot was already written.
    SlotTaken = 38,
    /// The token was not issued by this server under a key it still
    /// accepts.
    InvalidToken = 39,
    /// The token was spent already.
    TokenSpent = 40,
    /// No such blob for this caller: never issued, expired, deleted, or
    /// not the caller's to read.
    UnknownBlob = 41,
    /// `PutBlob`'s offset is not where the blob's stored bytes end.
    BlobOffset = 42,
    /// Larger than the server's largest file.
    BlobTooLarge = 43,
    /// `GetBlob` of a blob whose upload has not ended.
    BlobIncomplete = 44,
}

/// Signed token inputs, in the order asked, under the key named.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Tokens {
    #[prost(bytes = "vec", tag = "1")]
    pub key_id: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    pub public_key: Vec<u8>,
    #[prost(bytes = "vec", repeated, tag = "3")]
    pub evaluated: Vec<Vec<u8>>,
    #[prost(bytes = "vec", tag = "4")]
    pub proof: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Registered {
    #[prost(string, tag = "1")]
    pub account_id: String,
    #[prost(uint64, tag = "2")]
    pub subscription_expires_at: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct LoggedIn {
    #[prost(uint64, tag = "1")]
    pub subscription_expires_at: u64,
    #[prost(uint32, tag = "2")]
    pub key_packages_remaining: u32,
    #[prost(bool, tag = "3")]
    pub has_last_resort: bool,
    #[prost(uint32, tag = "4")]
    pub key_package_low_water: u32,
    /// The device's stock per ciphersuite (fields 2 and 3 are suite 3's).
    #[prost(message, repeated, tag = "5")]
    pub stocks: Vec<SuiteStock>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct SuiteStock {
    #[prost(uint32, tag = "1")]
    pub suite: u32,
    #[prost(uint32, tag = "2")]
    pub remaining: u32,
    #[prost(bool, tag = "3")]
    pub has_last_resort: bool,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct KeyPackageCount {
    #[prost(uint32, tag = "1")]
    pub remaining: u32,
    /// The ciphersuite the upload was of, whose stock `remaining` counts.
    #[prost(uint32, tag = "2")]
    pub suite: u32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct KeyPackage {
    #[prost(bytes = "vec", tag = "1")]
    pub key_package: Vec<u8>,
    #[prost(bool, tag = "2")]
    pub last_resort: bool,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Done {}

#[derive(Clone, PartialEq, prost::Message)]
pub struct GroupInfo {
    #[prost(bytes = "vec", tag = "1")]
    pub group_info: Vec<u8>,
}

/// Encoded [`DeviceEntry`]s, in log order.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DeviceLog {
    #[prost(bytes = "vec", repeated, tag = "1")]
    pub entries: Vec<Vec<u8>>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct CommitAccepted {
    #[prost(uint64, tag = "1")]
    pub epoch: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct AccountInfo {
    #[prost(string, tag = "1")]
    pub account_id: String,
    #[prost(bytes = "vec", tag = "2")]
    pub identity_key: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Accepted {
    #[prost(uint64, tag = "1")]
    pub accepted_at: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Codes {
    #[prost(string, repeated, tag = "1")]
    pub codes: Vec<String>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Line {
    #[prost(string, tag = "1")]
    pub account_id: String,
    #[prost(uint64, tag = "2")]
    pub subscription_expires_at: u64,
    #[prost(uint64, tag = "3")]
    pub last_seen_day: u64,
    #[prost(string, tag = "4")]
    pub status: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Lines {
    #[prost(message, repeated, tag = "1")]
    pub lines: Vec<Line>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Renewed {
    #[prost(uint64, tag = "1")]
    pub subscription_expires_at: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Push {
    #[prost(oneof = "push::Body", tags = "1, 2, 3")]
    pub body: Option<push::Body>,
}

pub mod push {
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Body {
        #[prost(message, tag = "1")]
        Hello(super::Hello),
        #[prost(message, tag = "2")]
        Delivery(super::Delivery),
        #[prost(message, tag = "3")]
        Synced(super::Synced),
    }
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Hello {
    #[prost(uint32, tag = "1")]
    pub protocol_version: u32,
    #[prost(bytes = "vec", tag = "2")]
    pub nonce: Vec<u8>,
    #[prost(uint64, tag = "3")]
    pub server_time: u64,
    #[prost(uint32, tag = "4")]
    pub max_frame_bytes: u32,
    /// IDs of the keys whose anonymous-send tokens are accepted.
    #[prost(bytes = "vec", repeated, tag = "5")]
    pub token_keys: Vec<Vec<u8>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum DeliveryKind {
    Unspecified = 0,
    Application = 1,
    Commit = 2,
    Welcome = 3,
    Proposal = 4,
    ContactRequest = 5,
    ContactAccepted = 6,
    KeyPackagesLow = 7,
    Wipe = 8,
    MemberRevoked = 9,
    /// From the server: application messages for this device were not
    /// kept because its mailbox was at its cap. The payload is how many
    /// (a big-endian u64) since the device acknowledged the last such
    /// notice.
    MailboxFull = 10,
    /// From the server, to each member device of a group in which a
    /// device of `sender`'s account has a leaf, when that device is
    /// removed from its account: the payload is the log's signed remove
    /// entry (a `DeviceEntry`), on whose account signature members commit
    /// the leaf's removal.
    DeviceRemoved = 11,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Delivery {
    #[prost(uint64, tag = "1")]
    pub id: u64,
    #[prost(string, tag = "2")]
    pub sender: String,
    #[prost(enumeration = "DeliveryKind", tag = "3")]
    pub kind: i32,
    #[prost(bytes = "vec", tag = "4")]
    pub group_id: Vec<u8>,
    #[prost(bytes = "vec", tag = "5")]
    pub payload: Vec<u8>,
    #[prost(uint64, tag = "6")]
    pub sent_at: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Synced {}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Content {
    #[prost(oneof = "content::Body", tags = "1, 2, 5, 6")]
    pub body: Option<content::Body>,
    #[prost(bytes = "vec", tag = "4")]
    pub message_id: Vec<u8>,
    #[prost(uint32, tag = "3")]
    pub disappear_after: u32,
    #[prost(uint64, tag = "15")]
    pub sent_at_ms: u64,
}

pub mod content {
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Body {
        #[prost(message, tag = "1")]
        Text(super::Text),
        #[prost(message, tag = "2")]
        GroupName(super::GroupName),
        #[prost(message, tag = "5")]
        Receipt(super::Receipt),
        #[prost(message, tag = "6")]
        Attachment(super::Attachment),
    }
}

/// A file: its blob and what opens it (see `proto/umbra.proto`).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Attachment {
    #[prost(bytes = "vec", tag = "1")]
    pub blob_id: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    pub key: Vec<u8>,
    #[prost(bytes = "vec", tag = "3")]
    pub digest: Vec<u8>,
    #[prost(uint64, tag = "4")]
    pub size: u64,
    #[prost(string, tag = "5")]
    pub mime_type: String,
    #[prost(string, tag = "6")]
    pub name: String,
    #[prost(string, tag = "7")]
    pub caption: String,
    #[prost(uint32, tag = "8")]
    pub duration_ms: u32,
    #[prost(bytes = "vec", tag = "9")]
    pub waveform: Vec<u8>,
    #[prost(bytes = "vec", tag = "10")]
    pub thumbnail: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Receipt {
    #[prost(enumeration = "ReceiptKind", tag = "1")]
    pub kind: i32,
    #[prost(bytes = "vec", repeated, tag = "2")]
    pub message_ids: Vec<Vec<u8>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum ReceiptKind {
    Unspecified = 0,
    Delivered = 1,
    Read = 2,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Text {
    #[prost(string, tag = "1")]
    pub body: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct GroupName {
    #[prost(string, tag = "1")]
    pub name: String,
}
