//! What can go wrong on a device, in words a person can act on.

use umbra_proto::{AccountId, ErrorCode, ErrorReply};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    #[error("wrong passphrase")]
    WrongPassphrase,
    #[error("no Umbra device in {0}; run `umbra activate` first")]
    NotActivated(String),
    /// The duress passphrase (or one wrong passphrase too many) was
    /// entered: the device is destroyed, nothing opens it any more. Shown
    /// exactly as a wrong passphrase; after answering, a front end should,
    /// unseen, call [`crate::Client::finish_erasure`] and send the revocation
    /// if there is one. The next attempt finds no device.
    #[error("wrong passphrase")]
    Erased {
        home: std::path::PathBuf,
        revocation: Option<Box<crate::wipe::Revocation>>,
    },
    #[error("{0} already holds an Umbra device")]
    AlreadyActivated(String),
    #[error("server certificate does not match the pinned fingerprint; refusing to connect")]
    CertificateMismatch,
    /// The server's certificate was issued by the pinned anchor but has
    /// expired, or is not valid yet, by this device's clock.
    #[error(
        "the server's certificate has expired or is not yet valid by this device's clock; \
         check the device's date and time, and if they are right, tell the server's operator \
         (umbra-server admin rotate-tls)"
    )]
    CertificateOutOfDate,
    #[error("cannot reach the server at {address}: {reason}")]
    Unreachable { address: String, reason: String },
    #[error("the connection to the server was lost")]
    ConnectionLost,
    /// A request larger than one frame: nothing was sent. For a commit,
    /// the group has grown past what one handshake can carry.
    #[error(
        "this request is {bytes} bytes and the server takes at most {limit} in one frame; \
         nothing was sent (a group's commit, Welcome and GroupInfo grow with its members: \
         a post-quantum group takes about 150 devices in its first commit and about 350 in all, \
         a classical one about 1,200)"
    )]
    TooLarge { bytes: usize, limit: usize },
    #[error("not connected to the server")]
    NotConnected,
    #[error("the server did not answer within {0} seconds")]
    Timeout(u64),
    #[error("{message}")]
    Server {
        code: ErrorCode,
        message: String,
        current_epoch: u64,
    },
    /// The server says the line was revoked and shows a wipe command
    /// relayed for it (not yet checked: the device checks it against its
    /// own wipe key before it acts).
    #[error("the server says this line was revoked")]
    LineEnded { wipe_command: Vec<u8> },
    /// The line ended after a wipe command signed with its wipe code (from
    /// the code's holder, or a duress passphrase set for every device), as
    /// the server showed: this device erased itself.
    #[error(
        "this line was wiped with its wipe code (or a duress passphrase set for every device); \
         this device has erased itself"
    )]
    ErasedByAccount,
    #[error("{0} is not a contact; add them with `contacts add` first")]
    NotAContact(AccountId),
    #[error("contact {0} has not accepted your request yet")]
    NotAccepted(AccountId),
    #[error("no pending contact request from {0}")]
    NoRequest(AccountId),
    #[error("no conversation {0}")]
    UnknownConversation(String),
    #[error(
        "the identity key of {0} changed since you verified it; nothing is sent to them until you \
         compare the new safety number (`umbra contacts verify {0}`) and confirm it (`--mark`), \
         or accept the new key unverified (`--accept`)"
    )]
    KeyUnconfirmed(AccountId),
    #[error(
        "the server handed out a key for {0} that is not the one you know for them; refusing to \
         add it (compare safety numbers with them)"
    )]
    ForeignKeyPackage(AccountId),
    /// Asked for a post-quantum package first, the server handed out a
    /// classical one of a device whose packages say it offers post-quantum
    /// ones: it would have the conversation made classical.
    #[error(
        "the server handed out a classical KeyPackage of {0}, whose device offers post-quantum \
         ones; nothing was created (the server withholds them, or the device could not upload \
         them yet: try again later)"
    )]
    Downgraded(AccountId),
    /// A package of another suite than any asked for.
    #[error("the server handed out a KeyPackage of {0} of a suite that was not asked for")]
    WrongSuite(AccountId),
    /// More devices than one commit can add.
    #[error(
        "a conversation of {devices} devices is more than one commit can start (at most {limit}); \
         start it with fewer members and add the others in a second step"
    )]
    TooManyDevices { devices: usize, limit: usize },
    #[error(
        "the safety number with {0} was not shown, or changed since it was; compare it \
         (again) first: `umbra contacts verify {0}`"
    )]
    SafetyNumberNotShown(AccountId),
    #[error(
        "this device fell behind in this conversation and is getting back in; try again in a moment"
    )]
    Rejoining,
    #[error("you are no longer a member of this conversation")]
    NotAMember,
    #[error(
        "the server's device list for {account} fails verification ({error}); it may have been \
         tampered with, so no device on it is trusted"
    )]
    DeviceLog {
        account: AccountId,
        error: umbra_mls::DeviceLogError,
    },
    #[error("invalid input: {0}")]
    Invalid(String),
    /// The server's anonymous-send tokens could let it tell who sent an
    /// anonymous message; nothing was sent.
    #[error("not sending anonymously: {0}")]
    UntrustedTokens(String),
    /// The key of this device's anonymous-send tokens was retired: new
    /// ones come when it next connects.
    #[error("this device's anonymous-send tokens expired; new ones come when it next connects")]
    TokenKeyRetired,
    #[error("linking the device failed: {0}")]
    LinkFailed(String),
    #[error("group commit kept losing to other members' commits; try again")]
    CommitContention,
    #[error(transparent)]
    Mls(#[from] umbra_mls::MlsError),
    #[error("local store: {0}")]
    Store(String),
    #[error("protocol error from the server: {0}")]
    Protocol(#[from] umbra_proto::DecodeError),
}

impl From<ErrorReply> for ClientError {
    fn from(reply: ErrorReply) -> Self {
        if reply.code == ErrorCode::LineRevoked && !reply.wipe_command.is_empty() {
            return ClientError::LineEnded {
                wipe_command: reply.wipe_command,
            };
        }
        ClientError::Server {
            code: reply.code,
            message: reply.message,
            current_epoch: reply.current_epoch,
        }
    }
}

/// A file's read or write (attachments): reported as the local store's.
impl From<std::io::Error> for ClientError {
    fn from(error: std::io::Error) -> Self {
        ClientError::Store(format!("file: {error}"))
    }
}

impl From<rusqlite::Error> for ClientError {
    fn from(error: rusqlite::Error) -> Self {
        ClientError::Store(error.to_string())
    }
}

impl ClientError {
    /// The server's error code, when the server refused the request.
    pub fn server_code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Server { code, .. } => Some(*code),
            ClientError::LineEnded { .. } | ClientError::ErasedByAccount => {
                Some(ErrorCode::LineRevoked)
            }
            _ => None,
        }
    }
}

pub type Result<T, E = ClientError> = std::result::Result<T, E>;
