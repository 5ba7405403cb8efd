//! Server storage: what the relay remembers, behind domain-level traits.
//!
//! The traits speak Umbra (accounts, contacts, key packages, groups,
//! mailboxes), never SQL. Operations that must be atomic from the protocol's
//! point of view are single trait methods: accepting a commit moves the group's
//! epoch, updates its membership and stores the fan-out in one step, so a
//! backend can make it one transaction. Every backend must pass
//! [`conformance`]; [`sqlite::SqliteStore`] is the embedded default, and
//! [`postgres::PgStore`] the one several nodes share.
//!
//! **Invariant:** the store holds ciphertext, public keys and routing
//! metadata only. It has no column for a private key or a plaintext.
#![deny(clippy::unwrap_used, clippy::expect_used)]

mod blobs;
pub mod conformance;
pub mod postgres;
pub mod sqlite;
mod staging;

pub use blobs::{BlobCreation, BlobInfo, BlobQuota, BlobRead, BlobWrite, Blobs, NewBlob};
pub use staging::ACK_WINDOW;

use async_trait::async_trait;
use sha2::{Digest, Sha256};
use umbra_proto::tokens::DELIVERY_KEY_BYTES;
use umbra_proto::{
    AccountId, ActivationCode, DeliveryKind, DeviceAddr, DeviceId, GroupId, IdentityKey,
};

/// Unix seconds. Passed in by the caller so that time is controllable.
pub type Timestamp = u64;

/// Seconds in a day, for subscription arithmetic.
pub const DAY: u64 = 86_400;

/// How long the hash of an accepted commit is kept, so that the commit,
/// resubmitted after a lost reply, is recognised as accepted: longer than
/// any delivery lives (a device away longer has lost the group's commits
/// anyway, and rejoins). Then it is deleted: the server keeps no record of
/// a group's history beyond what devices may still need.
pub const COMMIT_HASH_LIFETIME: u64 = 31 * DAY;
/// How long an unanswered contact request is kept: as long as its delivery
/// can wait in a mailbox (at most `mailbox_ttl`'s 7 days by default), and
/// some more for a device away longer; then the server forgets who asked
/// whom.
pub const CONTACT_REQUEST_LIFETIME: u64 = 30 * DAY;

/// What the mailboxes hold: see [`Mailboxes::depth`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MailboxDepth {
    /// Copies waiting for their devices.
    pub copies: u64,
    /// Their payloads' bytes.
    pub bytes: u64,
}

/// The ack window's state: see [`Mailboxes::ack_window`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AckWindow {
    /// How long a copy waits for its acknowledgement before it is written
    /// (widened while acknowledgements come late).
    pub width: std::time::Duration,
    /// Copies waiting in it now.
    pub copies: u64,
}

/// How a node's items of one kind were batched into transactions since it
/// started: see [`Mailboxes::batching`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchStats {
    /// Transactions that ran them (a lone item's included).
    pub transactions: u64,
    /// Items those transactions carried.
    pub items: u64,
    /// Items refused unrun (`Unavailable`): they waited longer for a
    /// transaction than the queue allows.
    pub refused: u64,
}

/// A store's batching of fan-outs and acknowledgements, for one that
/// batches them itself (the clustered store).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Batching {
    pub fan_outs: BatchStats,
    pub acks: BatchStats,
}

/// What a store may hold, set when it is opened. Zero means no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreLimits {
    /// Largest size of the whole store; a write beyond it fails with
    /// [`StoreError::Full`], as on a full disk, and succeeds again once
    /// deletions made room.
    pub database_bytes: u64,
    /// Most payload bytes one device's mailbox holds. An application
    /// message for a mailbox at the cap is not kept (its sender is still
    /// told it was accepted); the device gets one `MailboxFull` notice
    /// counting those it missed. Handshake messages, Welcomes, contact
    /// requests and notices are kept past the cap.
    pub mailbox_bytes: u64,
}

/// A storage backend failed; the request cannot be completed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("storage backend failed: {0}")]
    Backend(String),
    /// The disk (or the configured database size) is full: nothing was
    /// written. Writes succeed again once space returns.
    #[error("storage is full")]
    Full,
    #[error("stored data is inconsistent: {0}")]
    Corrupt(String),
    /// The database cannot be reached (a clustered backend whose database
    /// server is down, stopped or cut off): the request was given up at
    /// once instead of waiting for it, and may be sent again. One cut off
    /// half way may or may not have been stored.
    #[error("the database is unavailable: {0}")]
    Unavailable(String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Refuses a database whose schema is at `applied`, past the `newest`
/// migration this build knows: a newer server migrated it (an upgrade
/// rolled back, a newer backup restored), and this one would misread it.
pub(crate) fn refuse_newer_schema(applied: i64, newest: i64) -> Result<()> {
    if applied > newest {
        return Err(StoreError::Backend(format!(
            "the database's schema is at version {applied}, newer than this umbra-server \
             knows ({newest}): a newer umbra-server upgraded it; run that version (going \
             back needs a backup taken before the upgrade)"
        )));
    }
    Ok(())
}

/// SHA-256 of an activation code's canonical form. Codes are stored hashed,
/// so a copy of the database does not hand out unused codes.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct CodeHash(pub [u8; 32]);

impl CodeHash {
    pub fn of(code: &ActivationCode) -> Self {
        CodeHash(Sha256::digest(code.canonical().as_bytes()).into())
    }
}

impl std::fmt::Debug for CodeHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CodeHash(..)")
    }
}

/// Whether a line may be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineStatus {
    Active,
    /// Paused by its distributor: it can log in but not send.
    Suspended,
    /// Ended for good (revoked by its distributor, or the device wiped
    /// itself): nothing is kept but the row that says so.
    Revoked,
}

impl LineStatus {
    /// Whether a line in this state, with a subscription running until
    /// `subscription_expires_at`, may send at `now`: the one rule that the
    /// fan-out's transaction and the server's refusals both apply.
    pub fn may_send(self, subscription_expires_at: Timestamp, now: Timestamp) -> bool {
        self == LineStatus::Active && now < subscription_expires_at
    }

    pub fn as_str(self) -> &'static str {
        match self {
            LineStatus::Active => "active",
            LineStatus::Suspended => "suspended",
            LineStatus::Revoked => "revoked",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "active" => Some(LineStatus::Active),
            "suspended" => Some(LineStatus::Suspended),
            "revoked" => Some(LineStatus::Revoked),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub id: AccountId,
    pub identity_key: IdentityKey,
    pub created_at: Timestamp,
    pub subscription_expires_at: Timestamp,
    /// Public key that verifies remote-wipe commands for this line.
    pub wipe_key: Option<IdentityKey>,
    pub status: LineStatus,
    /// The distributor that sold the line, if not the operator.
    pub distributor: Option<u64>,
    /// Unix day (seconds / 86400) of the last login.
    pub last_seen_day: Option<u64>,
    /// The newest wipe command relayed for the line, as queued (issue time
    /// and the wipe key's signature), kept for ever: shown to the line's
    /// devices when they log in after it ended, so that one that was
    /// offline erases itself too.
    pub last_wipe_command: Option<Vec<u8>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Registration {
    Registered(Account),
    UnknownCode,
    CodeUsed,
    /// The randomly drawn account ID exists already: draw another.
    IdTaken,
    /// This identity key already has an account.
    KeyTaken,
}

#[async_trait]
pub trait Accounts: Send + Sync {
    /// Stores new activation codes, each granting `days` of subscription.
    async fn issue_codes(&self, codes: &[CodeHash], days: u32, now: Timestamp) -> Result<()>;
    /// Redeems a code and creates the account, atomically.
    async fn register(
        &self,
        code: CodeHash,
        id: &AccountId,
        identity_key: &IdentityKey,
        now: Timestamp,
    ) -> Result<Registration>;
    async fn account(&self, id: &AccountId) -> Result<Option<Account>>;
    /// Records the public key that verifies this line's wipe commands, if
    /// it has none yet (it is set once, and never replaced).
    async fn set_wipe_key(&self, id: &AccountId, key: &IdentityKey) -> Result<()>;
    /// Queues a wipe command (`notice`, for the line it names, a copy
    /// for each of its current devices) if its signed issue time is later
    /// than every one queued for the line before, recording that time and
    /// the command itself (`Account::last_wipe_command`, kept when the
    /// line is revoked) in the same step: the devices it was queued for,
    /// or `None` for a replay or an older command (nothing is stored).
    async fn queue_wipe_command(
        &self,
        notice: Notice,
        issued_at: u64,
        now: Timestamp,
        expires_at: Timestamp,
    ) -> Result<Option<Vec<DeviceAddr>>>;
    /// Records a login on `day` (Unix day).
    async fn touch(&self, id: &AccountId, day: u64) -> Result<()>;
    /// Ends a line: withdraws its KeyPackages, drops its devices'
    /// mailboxes, its contacts and its device log, takes every leaf of it
    /// out of every group and tells each remaining member device (a
    /// `MemberRevoked` delivery per group, carrying the line's own signed
    /// revocation when it revoked itself), atomically. Returns the devices
    /// told.
    async fn revoke(
        &self,
        id: &AccountId,
        proof: Option<&umbra_proto::Signature>,
        now: Timestamp,
        expires_at: Timestamp,
    ) -> Result<Vec<DeviceAddr>>;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContactRequestOutcome {
    Sent,
    /// A request was already pending; it was not sent again.
    AlreadyRequested,
    AlreadyContacts,
    /// One of the two lines does not exist or was revoked (perhaps since
    /// the caller checked): nothing recorded, nothing sent.
    LineGone,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContactAcceptOutcome {
    Accepted,
    NoRequest,
    AlreadyContacts,
}

#[async_trait]
pub trait Contacts: Send + Sync {
    /// Records a request from `from` to `to` and puts a contact-request
    /// delivery in the mailbox of each of `to`'s current devices,
    /// atomically.
    async fn request_contact(
        &self,
        from: &AccountId,
        to: &AccountId,
        now: Timestamp,
        expires_at: Timestamp,
    ) -> Result<(ContactRequestOutcome, Vec<DeviceAddr>)>;
    /// `acceptor` accepts `requester`'s pending request; a contact-accepted
    /// delivery goes to the mailbox of each of `requester`'s current
    /// devices in the same step.
    async fn accept_contact(
        &self,
        acceptor: &AccountId,
        requester: &AccountId,
        now: Timestamp,
        expires_at: Timestamp,
    ) -> Result<(ContactAcceptOutcome, Vec<DeviceAddr>)>;
    async fn are_contacts(&self, a: &AccountId, b: &AccountId) -> Result<bool>;
    /// `decliner` declines `requester`'s pending request: its deliveries
    /// still waiting for `decliner`'s devices are deleted, and the request
    /// is marked declined (it cannot be accepted; asked again, the requester
    /// is answered as if it were pending, and nothing is sent) until it
    /// goes with the unanswered ones after [`CONTACT_REQUEST_LIFETIME`].
    /// Whether there was one pending.
    async fn decline_contact(&self, decliner: &AccountId, requester: &AccountId) -> Result<bool>;
    /// How many contact requests `from` sent at or after `since` that are
    /// still recorded (pending or accepted).
    async fn contact_requests_since(&self, from: &AccountId, since: Timestamp) -> Result<u64>;
}

/// Each account's device log: signed entries the server checked before
/// storing them (`umbra_mls::DeviceLog`), kept in order and handed to the
/// account's devices and its contacts, who check them again.
#[async_trait]
pub trait DeviceLogs: Send + Sync {
    /// The entries of `account`'s log from position `from` on, at most
    /// `limit` of them, in order.
    async fn device_log(&self, account: &AccountId, from: u64, limit: u32) -> Result<Vec<Vec<u8>>>;
    /// Stores `entry` at position `seq` if that is the log's next position;
    /// `None` (nothing stored) if it is not, because another device of the
    /// account appended first. An entry that removes a device also tells,
    /// in the same step, every other current member device of each group
    /// where the removed device has a leaf (a `DeviceRemoved` delivery
    /// carrying the entry, kept until `expires_at`); returns the devices
    /// told.
    async fn append_device_entry(
        &self,
        account: &AccountId,
        seq: u64,
        entry: &[u8],
        now: Timestamp,
        expires_at: Timestamp,
    ) -> Result<Option<Vec<DeviceAddr>>>;
    /// How many entries were appended to `account`'s log at or after
    /// `since` (the server's time of each append).
    async fn device_entries_since(&self, account: &AccountId, since: Timestamp) -> Result<u64>;
    /// `account`'s current devices and their keys, in order: device 1
    /// (whose key is the account key) from registration, then as the
    /// entries appended add and remove them. Removing a device deletes its
    /// mailbox in the same step, and no copy is stored for it afterwards
    /// (its leaves stay in groups until a member commits their removal).
    async fn devices(&self, account: &AccountId) -> Result<Vec<(DeviceId, IdentityKey)>>;
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPackageStock {
    pub one_time: u32,
    pub has_last_resort: bool,
}

/// KeyPackages belong to one device of an account and one MLS ciphersuite
/// (`suite`, the registry number): each device keeps, per suite, its own
/// stock of one-time packages and its own last-resort one.
#[async_trait]
pub trait KeyPackages: Send + Sync {
    /// Adds one-time KeyPackages of `suite` for `device` and, if given,
    /// replaces its last-resort one of that suite.
    async fn add_key_packages(
        &self,
        account: &AccountId,
        device: DeviceId,
        suite: u16,
        one_time: Vec<Vec<u8>>,
        last_resort: Option<Vec<u8>>,
    ) -> Result<KeyPackageStock>;
    /// Hands out one KeyPackage of `suite` of `device`: a one-time one
    /// (deleted as it is handed out, so never twice), or the last-resort
    /// one when none is left. Returns the package and whether it is the
    /// last-resort one.
    async fn take_key_package(
        &self,
        account: &AccountId,
        device: DeviceId,
        suite: u16,
    ) -> Result<Option<(Vec<u8>, bool)>>;
    async fn key_package_stock(
        &self,
        account: &AccountId,
        device: DeviceId,
        suite: u16,
    ) -> Result<KeyPackageStock>;
    /// The stock of each of `suites`, in that order, as
    /// [`KeyPackages::key_package_stock`] gives it (what a login reports):
    /// one suite after another here, in one transaction where a backend can.
    async fn key_package_stocks(
        &self,
        account: &AccountId,
        device: DeviceId,
        suites: &[u16],
    ) -> Result<Vec<KeyPackageStock>> {
        let mut stocks = Vec::with_capacity(suites.len());
        for &suite in suites {
            stocks.push(self.key_package_stock(account, device, suite).await?);
        }
        Ok(stocks)
    }
    /// Deletes every KeyPackage of `device` (a device removed from its
    /// account); returns how many there were, the last-resort one included.
    async fn withdraw_key_packages(&self, account: &AccountId, device: DeviceId) -> Result<u64>;
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupState {
    pub epoch: u64,
    /// The group's leaves: each member device, ordered by account and
    /// device.
    pub members: Vec<DeviceAddr>,
    /// The group's public MLS state (opaque to the store), against which
    /// the delivery service validates handshake messages; `None` for a
    /// group registered before validation existed.
    pub public_state: Option<Vec<u8>>,
    /// Standalone proposals accepted in the current epoch, in order.
    pub proposals: Vec<Vec<u8>>,
}

impl GroupState {
    /// Whether `account` has a leaf in the group.
    pub fn has_account(&self, account: &AccountId) -> bool {
        self.members.iter().any(|leaf| leaf.account == *account)
    }
}

/// A commit as the delivery service records it.
#[derive(Debug, Clone)]
pub struct CommitRecord {
    pub group_id: GroupId,
    pub epoch: u64,
    /// The committing device.
    pub sender: DeviceAddr,
    pub commit: Vec<u8>,
    pub welcome: Option<Vec<u8>>,
    /// Leaves added and removed, as the delivery service derived them from
    /// the validated commit (never as a client declared them).
    pub added: Vec<DeviceAddr>,
    pub removed: Vec<DeviceAddr>,
    /// The devices the commit's Add proposals bring in, each checked by
    /// the server to be current. Not `added`: a leaf of a line revoked
    /// without its own signature stays in the tree (members do not take
    /// it out on the server's word) and is in `added` of every commit
    /// that keeps it. The store refuses the commit if one of these is no
    /// longer current ([`CommitOutcome::AddsFormerDevice`]).
    pub adds: Vec<DeviceAddr>,
    /// The group's public state after the commit.
    pub public_state: Vec<u8>,
    /// The GroupInfo of the epoch it starts, checked against that state.
    pub group_info: Vec<u8>,
    /// The public half of the delivery key of the epoch it starts, as its
    /// committer states it: recorded with the commit, or none.
    pub delivery_key: Option<[u8; DELIVERY_KEY_BYTES]>,
}

impl CommitRecord {
    pub fn hash(&self) -> [u8; 32] {
        Sha256::digest(&self.commit).into()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommitOutcome {
    /// The group moved to `epoch`; these devices got deliveries: the
    /// commit, but the last `welcomed` of them the Welcome instead (the
    /// current devices the commit brings in; a leaf left by a line that
    /// ended gets nothing).
    Accepted {
        epoch: u64,
        recipients: Vec<DeviceAddr>,
        welcomed: usize,
    },
    /// The same commit was accepted before (a retry after a lost response).
    Duplicate {
        epoch: u64,
    },
    /// Another commit won this epoch.
    Stale {
        current_epoch: u64,
    },
    UnknownGroup,
    NotAMember,
    /// A device the commit's Adds bring in (`CommitRecord::adds`) is no
    /// longer one of its account's current devices: removed, or its line
    /// ended, after the server checked the commit and before it came to be
    /// stored. Nothing is stored; the
    /// group stays at its epoch (its members would never be told to take
    /// the leaf out: the device's removal or the line's revocation was
    /// announced before it was in the group).
    AddsFormerDevice {
        device: DeviceAddr,
    },
}

#[derive(Debug)]
pub enum FanOutOutcome {
    /// Accepted for each recipient: the copies as the mailbox holds them,
    /// so a recipient that is online can be handed its copy without
    /// reading it back. Hand them over at once, but tell the sender
    /// "accepted" only after `durable` resolves: a backend may keep copies
    /// in memory for a moment in case they are acknowledged first (see
    /// [`Durable`]).
    Stored {
        deliveries: Vec<(DeviceAddr, StoredDelivery)>,
        durable: Durable,
    },
    UnknownGroup,
    NotAMember,
    /// The message names an epoch the group has not reached.
    AheadOfGroup {
        current_epoch: u64,
    },
    /// An application message of an epoch the group has left: members
    /// added since could not read it, so its sender must encrypt it again
    /// in the current epoch.
    BehindGroup {
        current_epoch: u64,
    },
    /// The sender's line may not send (checked in the same transaction as
    /// the insert, so a suspension is never raced past).
    LineInactive {
        status: LineStatus,
        subscription_expires_at: Timestamp,
    },
    /// An anonymous message signed with a delivery key the group no longer
    /// has: withdrawn (a revocation or device removal) since the caller
    /// checked the signature, in the same epoch.
    KeyWithdrawn,
}

/// Resolves once each copy of a fan-out is safe: written durably, or
/// acknowledged by its recipient (which then holds it, so it need never be
/// written). Until then the copies are readable from the mailbox and may
/// be delivered, but a crash can lose those that are not yet acknowledged;
/// so the sender is told "accepted" only after this.
#[must_use = "the sender may be told \"accepted\" only after the copies are durable"]
pub struct Durable(Option<tokio::sync::oneshot::Receiver<Result<()>>>);

impl Durable {
    /// Already durable (the copies were written with the check).
    pub fn ready() -> Self {
        Durable(None)
    }

    pub(crate) fn waiting(answer: tokio::sync::oneshot::Receiver<Result<()>>) -> Self {
        Durable(Some(answer))
    }

    /// Waits until every copy is written or acknowledged.
    pub async fn wait(self) -> Result<()> {
        match self.0 {
            None => Ok(()),
            Some(answer) => answer.await.unwrap_or_else(|_| {
                Err(StoreError::Backend(
                    "the storage writer stopped before the copies were written".into(),
                ))
            }),
        }
    }
}

impl std::fmt::Debug for Durable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Durable(waiting)"
        } else {
            "Durable(ready)"
        })
    }
}

#[async_trait]
pub trait Groups: Send + Sync {
    /// Registers a group at epoch 0 with `creator`'s device as its only
    /// leaf, its validated public state, its creator's GroupInfo and the
    /// epoch's delivery key (if stated). Returns false if the group ID
    /// exists.
    async fn create_group(
        &self,
        group: &GroupId,
        creator: &DeviceAddr,
        public_state: &[u8],
        group_info: &[u8],
        delivery_key: Option<&[u8; DELIVERY_KEY_BYTES]>,
        now: Timestamp,
    ) -> Result<bool>;
    /// The group's epoch and that epoch's delivery key, if any; `None` for
    /// a group that does not exist. (What an anonymous message is checked
    /// against, without reading the members.)
    async fn delivery_key(
        &self,
        group: &GroupId,
    ) -> Result<Option<(u64, Option<[u8; DELIVERY_KEY_BYTES]>)>>;
    async fn group(&self, group: &GroupId) -> Result<Option<GroupState>>;
    /// How many existing groups `creator` created.
    async fn groups_created(&self, creator: &AccountId) -> Result<u64>;
    /// The GroupInfo of the group's current epoch (empty if none was kept).
    async fn group_info(&self, group: &GroupId) -> Result<Option<Vec<u8>>>;
    /// Accepts `commit` if the group is still at `commit.epoch` and the
    /// sending device has a leaf in it: moves to the next epoch, stores its
    /// public state and delivery key, forgets the epoch's proposals, applies the membership
    /// change and stores the commit for every other current member device
    /// (the sender's other devices and removed ones included, so they
    /// learn of it) and the Welcome for every added one.
    async fn accept_commit(
        &self,
        commit: &CommitRecord,
        now: Timestamp,
        expires_at: Timestamp,
    ) -> Result<CommitOutcome>;
    /// Records a validated standalone proposal for the group's `epoch`, so a
    /// commit may reference it. False if the group is no longer at `epoch`
    /// (or does not exist).
    async fn add_proposal(&self, group: &GroupId, epoch: u64, message: &[u8]) -> Result<bool>;
    /// Stores an application message or proposal for every other current
    /// member device (the sender's other devices included). `epoch` is
    /// the one its MLS header names: a message from an epoch later than
    /// the group's is refused (`AheadOfGroup`), and an application message
    /// from an earlier one too (`BehindGroup`).
    #[allow(clippy::too_many_arguments)] // one message and its context
    async fn fan_out(
        &self,
        group: &GroupId,
        sender: &DeviceAddr,
        kind: DeliveryKind,
        payload: &[u8],
        epoch: u64,
        now: Timestamp,
        expires_at: Timestamp,
    ) -> Result<FanOutOutcome>;
    /// Stores an anonymous application message for every current member
    /// device, if the group is at `epoch` (`AheadOfGroup` or `BehindGroup`
    /// otherwise) and its delivery key is still `delivery_key`
    /// (`KeyWithdrawn` otherwise): checked with the copies' storing, so a
    /// key withdrawn after the caller checked the signature with it is
    /// never raced past. The caller checked the signature and token.
    #[allow(clippy::too_many_arguments)] // one message and its context
    async fn fan_out_anonymous(
        &self,
        group: &GroupId,
        payload: &[u8],
        epoch: u64,
        delivery_key: &[u8; DELIVERY_KEY_BYTES],
        now: Timestamp,
        expires_at: Timestamp,
    ) -> Result<FanOutOutcome>;
}

/// Who a message to fan out is from, as every backend checks it.
#[derive(Clone)]
pub(crate) enum Sender {
    /// A member device: its line must be active and it a member of the
    /// group's current epoch; it gets no copy of its own message (its
    /// account's other devices do).
    Device(DeviceAddr),
    /// Anonymous, its signature checked with this delivery key: the group
    /// must still have the key (`KeyWithdrawn` otherwise); every leaf
    /// gets a copy.
    Anonymous([u8; DELIVERY_KEY_BYTES]),
}

impl Sender {
    /// The sending device, `None` for an anonymous message.
    pub(crate) fn device(&self) -> Option<&DeviceAddr> {
        match self {
            Sender::Device(device) => Some(device),
            Sender::Anonymous(_) => None,
        }
    }
}

/// The delivery service's rules for a message fanned out to a group at
/// `current` epoch, one function for every backend. `sender` is `None` for
/// an anonymous message (its token paid for it; the service checked its
/// signature under the epoch's delivery key), else whether the sending
/// device has a routable leaf and its line (`None`: no such account).
pub(crate) fn check_fan_out(
    current: u64,
    epoch: u64,
    kind: DeliveryKind,
    now: Timestamp,
    sender: Option<(bool, Option<(LineStatus, Timestamp)>)>,
) -> std::result::Result<(), FanOutOutcome> {
    let Some((member, line)) = sender else {
        // Only the current epoch's delivery key signs, and only for it.
        return if epoch == current {
            Ok(())
        } else if epoch > current {
            Err(FanOutOutcome::AheadOfGroup {
                current_epoch: current,
            })
        } else {
            Err(FanOutOutcome::BehindGroup {
                current_epoch: current,
            })
        };
    };
    if !member {
        return Err(FanOutOutcome::NotAMember);
    }
    // No member can have reached an epoch the delivery service has not
    // accepted a commit for; a message claiming one would only send the
    // others looking for commits that do not exist.
    if epoch > current {
        return Err(FanOutOutcome::AheadOfGroup {
            current_epoch: current,
        });
    }
    // Every current member can read a message of the current epoch; one
    // of an earlier epoch would reach members added since, who cannot.
    if kind == DeliveryKind::Application && epoch < current {
        return Err(FanOutOutcome::BehindGroup {
            current_epoch: current,
        });
    }
    match line {
        Some((status, until)) if status.may_send(until, now) => Ok(()),
        Some((status, until)) => Err(FanOutOutcome::LineInactive {
            status,
            subscription_expires_at: until,
        }),
        None => Err(FanOutOutcome::LineInactive {
            status: LineStatus::Revoked,
            subscription_expires_at: 0,
        }),
    }
}

/// A key that signs send tokens. `secret` is the VOPRF private key.
#[derive(Clone, PartialEq, Eq)]
pub struct TokenKey {
    pub id: [u8; 32],
    pub secret: Vec<u8>,
    pub created_at: Timestamp,
}

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenKey")
            .field("id", &format_args!("{:02x?}", &self.id[..4]))
            .field("created_at", &self.created_at)
            .finish_non_exhaustive()
    }
}

/// Anonymous sending's tokens: the keys that sign them, the daily
/// allowance of each line, and the tokens spent.
#[async_trait]
pub trait Tokens: Send + Sync {
    /// Every token key kept, newest first.
    async fn token_keys(&self) -> Result<Vec<TokenKey>>;
    /// Keeps `key`, unless a key made after `fresh_since` is kept already
    /// (another node made one meanwhile): whether it was kept.
    async fn add_token_key(&self, key: &TokenKey, fresh_since: Timestamp) -> Result<bool>;
    /// Forgets the keys created at or before `cutoff`, and the tokens
    /// spent under them (which no longer verify). Returns how many keys.
    async fn retire_token_keys(&self, cutoff: Timestamp) -> Result<u64>;
    /// Grants `account` up to `wanted` tokens of its `per_day` on `day`,
    /// and counts them: how many it may have now (0 once the day's
    /// allowance is spent).
    async fn grant_tokens(
        &self,
        account: &AccountId,
        day: u64,
        wanted: u32,
        per_day: u32,
    ) -> Result<u32>;
    /// Marks a token spent: false if it was spent before, or if its key is
    /// no longer kept (retired: what was spent under it is forgotten).
    async fn spend_token(&self, key_id: &[u8; 32], nonce: &[u8; 32]) -> Result<bool>;
}

/// A delivery the server originates rather than fans out.
#[derive(Debug, Clone)]
pub struct Notice {
    pub recipient: AccountId,
    /// The device it is for, or `None` for every current device of the
    /// account (a copy each).
    pub device: Option<DeviceId>,
    pub sender: AccountId,
    pub kind: DeliveryKind,
    pub group_id: Option<GroupId>,
    pub payload: Vec<u8>,
}

/// One stored mailbox item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredDelivery {
    pub id: u64,
    /// The account a server notice is from (a contact request, an
    /// acceptance, a device removal...). `None` for what members send a
    /// group (application messages, commits, proposals, Welcomes): MLS
    /// authenticates their sender to the recipients, so the server neither
    /// stores nor sends it.
    pub sender: Option<AccountId>,
    pub kind: DeliveryKind,
    pub group_id: Option<GroupId>,
    pub payload: Vec<u8>,
    pub sent_at: Timestamp,
}

#[async_trait]
pub trait Mailboxes: Send + Sync {
    /// Deliveries for `recipient`'s device with an ID above `after`, oldest
    /// first.
    async fn pending(
        &self,
        recipient: &DeviceAddr,
        after: u64,
        limit: usize,
        now: Timestamp,
    ) -> Result<Vec<StoredDelivery>>;
    /// Stores a delivery that the server itself originates, for the
    /// device it names or each current device of its account; returns
    /// each copy's device and delivery ID.
    async fn notice(
        &self,
        notice: Notice,
        now: Timestamp,
        expires_at: Timestamp,
    ) -> Result<Vec<(DeviceAddr, u64)>>;
    /// Deletes deliveries `recipient`'s device acknowledged; returns how
    /// many existed.
    async fn ack(&self, recipient: &DeviceAddr, ids: &[u64]) -> Result<usize>;
    /// The fan-out copies `ids` went to recipients with no connection open,
    /// so no acknowledgement will come for them soon: a backend that holds
    /// copies back for one (the SQLite store's ack window) writes these
    /// without waiting. A hint; it changes no outcome.
    fn no_reader(&self, ids: &[u64]) {
        let _ = ids;
    }
    /// Whether each mailbox's delivery IDs are dense (1, 2, 3, ... with no
    /// gap), as on a store several nodes share: then a gap means a
    /// delivery stored elsewhere that this node has not seen yet.
    fn dense_ids(&self) -> bool {
        false
    }
    /// For a store on a database server: whether it finds the database
    /// away now (`true`), changing as it does, so that a node can read its
    /// connections' mailboxes again when it returns.
    fn away(&self) -> Option<tokio::sync::watch::Receiver<bool>> {
        None
    }
    /// What waits in every mailbox now, copies in the ack window
    /// included: for the operator's metrics (counted when asked, not kept
    /// up to date, and not atomic with writes going on).
    async fn depth(&self) -> Result<MailboxDepth>;
    /// The ack window's state now, for a store that has one.
    fn ack_window(&self) -> Option<AckWindow> {
        None
    }
    /// How fan-outs and acknowledgements were batched so far, for a store
    /// that batches them in a queue of its own.
    fn batching(&self) -> Option<Batching> {
        None
    }
    /// Deletes deliveries whose time to live has passed, the hashes of
    /// commits accepted [`COMMIT_HASH_LIFETIME`] or longer ago, and contact
    /// requests left unanswered for [`CONTACT_REQUEST_LIFETIME`]; returns
    /// how many deliveries it deleted.
    async fn expire(&self, now: Timestamp) -> Result<usize>;
}

/// A reseller of lines, authenticated by its own Ed25519 key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Distributor {
    pub id: u64,
    pub name: String,
    pub public_key: IdentityKey,
    /// Codes it may still issue.
    pub quota: u32,
}

/// What a code is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CodeKind {
    /// Opens a new line.
    Activation,
    /// Adds days to an existing line.
    Renewal,
}

impl CodeKind {
    fn as_str(self) -> &'static str {
        match self {
            CodeKind::Activation => "activation",
            CodeKind::Renewal => "renewal",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Renewal {
    /// The subscription now ends at this time.
    Renewed {
        subscription_expires_at: Timestamp,
    },
    UnknownCode,
    CodeUsed,
    /// The code was sold by another distributor than the line's.
    WrongDistributor,
}

#[async_trait]
pub trait Distributors: Send + Sync {
    /// Adds a distributor; `None` if the name or key is taken.
    async fn add_distributor(
        &self,
        name: &str,
        public_key: &IdentityKey,
        quota: u32,
        now: Timestamp,
    ) -> Result<Option<u64>>;
    async fn distributors(&self) -> Result<Vec<Distributor>>;
    /// Stores codes sold by `distributor`, taking them from its quota, in
    /// one step. `false` (and nothing stored) if the quota is too small.
    async fn issue_distributor_codes(
        &self,
        distributor: u64,
        codes: &[CodeHash],
        kind: CodeKind,
        days: u32,
        now: Timestamp,
    ) -> Result<bool>;
    /// Stores renewal codes issued by the operator.
    async fn issue_renewal_codes(
        &self,
        codes: &[CodeHash],
        days: u32,
        now: Timestamp,
    ) -> Result<()>;
    /// The lines a distributor sold.
    async fn lines(&self, distributor: u64) -> Result<Vec<Account>>;
    /// Suspends or resumes a line (not for revocation: see `Accounts::revoke`).
    async fn set_line_status(&self, account: &AccountId, status: LineStatus) -> Result<()>;
    /// Redeems a renewal code for `account`: the days count from the later
    /// of now and the current end.
    async fn redeem_renewal(
        &self,
        account: &AccountId,
        code: CodeHash,
        now: Timestamp,
    ) -> Result<Renewal>;
    /// Lines whose subscription ended before `cutoff` and are not revoked.
    async fn lapsed_lines(&self, cutoff: Timestamp) -> Result<Vec<AccountId>>;
    /// Revokes every line that lapsed before `cutoff`, each checked again
    /// and revoked in one transaction (so a renewal cannot slip in
    /// between). Returns each line with the member devices told. A line
    /// that could not be revoked now is left for the next sweep (an error
    /// only when no line was revoked). The embedded store revokes them all
    /// in one write: its one writer waits for no lock, and what fails that
    /// write (the disk) fails every line alike.
    async fn revoke_lapsed(
        &self,
        cutoff: Timestamp,
        now: Timestamp,
        expires_at: Timestamp,
    ) -> Result<Vec<(AccountId, Vec<DeviceAddr>)>>;
}

/// Everything the server needs from storage.
pub trait Store:
    Accounts
    + Contacts
    + KeyPackages
    + Groups
    + Mailboxes
    + Distributors
    + DeviceLogs
    + Tokens
    + Blobs
    + 'static
{
}
impl<
    T: Accounts
        + Contacts
        + KeyPackages
        + Groups
        + Mailboxes
        + Distributors
        + DeviceLogs
        + Tokens
        + Blobs
        + 'static,
> Store for T
{
}
