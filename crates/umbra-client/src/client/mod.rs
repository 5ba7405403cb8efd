//! The device: activation, connection, contacts, conversations and the
//! processing of everything the server delivers.
//!
//! Concurrency: one `ops` lock serialises every MLS state change (a commit
//! in flight, a delivery being applied), so a group is never changed by two
//! hands at once. Pushes are applied by one task, in the order the server
//! accepted them; each is applied in one database transaction together with
//! the record that it was applied, then acknowledged.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, Transaction, params};
use tokio::sync::{Notify, broadcast, watch};
use tracing::info;
use umbra_mls::{Crypto, DeviceCertificate, DeviceSigner, Group, GroupConfig, Provider};
use umbra_proto::clock::{Clock, SystemClock};
use umbra_proto::content::MAX_GROUP_NAME_BYTES;
use umbra_proto::{
    AccountId, ActivationString, CertFingerprint, DeviceId, IdentityKey, Push, Reply, Request,
    WipeCode, register_signing_payload,
};
use zeroize::Zeroizing;

use crate::error::{ClientError, Result};
use crate::link::Link;

mod anonymous;
mod apply;
mod attachments;
pub use attachments::{FileOptions, mime_type_of, safe_file_name};
mod commits;
mod contacts;
mod conversations;
mod devices;
mod linking;
pub use linking::{JoinedAccount, LinkedDevice, PendingLink};
mod rejoin;
mod sending;
mod session;
mod voice;
use crate::secret::{KdfParams, Passphrase};
use crate::store;
use crate::types::{ContactState, ConversationId, DeliveryState, Direction, Event, Message};
pub use voice::{Recording, VoiceDraft, VoiceSource, play as play_voice};

/// How many times a commit is retried after losing its epoch to another.
const COMMIT_ATTEMPTS: usize = 5;
/// How long receipts wait by default: long enough that several messages'
/// receipts leave together and their timing links none of them to its
/// message; short enough that "delivered" still means something.
pub const DEFAULT_RECEIPT_DELAY: std::ops::RangeInclusive<Duration> =
    Duration::from_secs(2)..=Duration::from_secs(20);
/// Events buffered for slow subscribers before they start missing some.
const EVENT_BUFFER: usize = 1024;

/// Choices a device makes once, at activation or when opening.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Groups this device creates and joins: its `suite` is the one new
    /// conversations use when every device in them offers it (the
    /// post-quantum suite by default; the classical suite otherwise, which
    /// every device offers too), and the past-epoch window and padding.
    pub group: GroupConfig,
    /// Argon2id cost for a new store (an existing store keeps its own).
    pub kdf: KdfParams,
    /// One-time KeyPackages uploaded per refill.
    pub key_package_batch: usize,
    /// A device updates its own keys in each group at least this often
    /// (post-compromise security). Zero turns the periodic update off.
    pub self_update_interval: Duration,
    /// Where time comes from (tests use a `ManualClock`).
    pub clock: Arc<dyn Clock>,
    /// Delivered and read receipts wait a random time within this range
    /// (drawn for the first receipt of each conversation's batch; whole
    /// seconds) and then go out together, so their timing does not link a
    /// receipt to the message it answers. Zero sends each at once.
    pub receipt_delay: std::ops::RangeInclusive<Duration>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            group: GroupConfig::default(),
            kdf: KdfParams::default(),
            key_package_batch: 20,
            self_update_interval: Duration::from_secs(7 * 86_400),
            clock: Arc::new(SystemClock),
            receipt_delay: DEFAULT_RECEIPT_DELAY,
        }
    }
}

/// One Umbra device. Cheap to clone; clones share everything.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("account", &self.inner.account)
            .field("home", &self.inner.home)
            .finish_non_exhaustive()
    }
}

pub(crate) struct Inner {
    home: PathBuf,
    account: AccountId,
    /// This device's own key: its MLS leaves, its logins.
    signer: DeviceSigner,
    /// The account key, on a linked device (on device 1, `signer` is it).
    account_signer: Option<DeviceSigner>,
    /// This device's number within its account.
    device: DeviceId,
    /// What this device's leaves carry to show they are its account's
    /// (none for device 1).
    certificate: Option<DeviceCertificate>,
    server_address: String,
    server_pin: CertFingerprint,
    options: ClientOptions,
    crypto: Crypto,
    db: Mutex<Connection>,
    ops: tokio::sync::Mutex<()>,
    link: Mutex<Option<Arc<Link>>>,
    events: broadcast::Sender<Event>,
    /// Signalled after every batch of applied deliveries.
    progress: Notify,
    /// Counts `Synced` pushes applied on the current connection.
    synced: watch::Sender<u64>,
    /// Whether the expiry ticker runs.
    ticking: std::sync::atomic::AtomicBool,
    /// While true, deliveries wait before being applied (a device being
    /// linked first takes in the history its account's other device sends).
    held: watch::Sender<bool>,
    /// Groups this device is rejoining (see `rejoin.rs`).
    rejoining: Mutex<std::collections::HashSet<Vec<u8>>>,
    /// Blobs being fetched, one fetch each at a time (two messages may
    /// name one blob, and its partial file is the blob's).
    fetching: Mutex<std::collections::HashMap<umbra_proto::BlobId, Arc<tokio::sync::Mutex<()>>>>,
    /// The MLS suites the server said at login it keeps KeyPackages of
    /// (a server that reports none keeps the classical suite's only).
    server_suites: Mutex<Vec<umbra_mls::Suite>>,
    /// The token keys the logged-in connection's Hello announced.
    token_keys: Mutex<Vec<[u8; umbra_proto::tokens::TOKEN_KEY_ID_BYTES]>>,
    /// Whether a flush of due receipts is under way (see `receipts.rs`).
    receipts_flushing: std::sync::atomic::AtomicBool,
    /// Whether the server holds a post-quantum last-resort package of this
    /// device (said at login, or uploaded since).
    post_quantum_at_server: std::sync::atomic::AtomicBool,
}

/// A signing key from its 32 stored bytes (zeroised after use).
fn signer_from(secret: Vec<u8>) -> Result<DeviceSigner> {
    let secret = Zeroizing::new(secret);
    let secret: &[u8; 32] = secret
        .as_slice()
        .try_into()
        .map_err(|_| ClientError::Store("a stored key has the wrong length".into()))?;
    Ok(DeviceSigner::from_secret(secret))
}

fn parse_account(text: &str) -> rusqlite::Result<AccountId> {
    AccountId::parse(text).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
    })
}

fn list(accounts: &[AccountId]) -> String {
    accounts
        .iter()
        .map(AccountId::as_str)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Work that applying a delivery calls for, done after the transaction.
enum FollowUp {
    /// A member asked to leave: commit its removal.
    CommitProposals(Vec<u8>),
    /// The server says our one-time KeyPackages of this suite are running
    /// out.
    ReplenishKeyPackages(umbra_mls::Suite),
    /// A member's line was revoked: commit its removal.
    RemoveMember(Vec<u8>, AccountId),
    /// A member removed one of its devices: commit its leaf's removal.
    RemoveDevice(Vec<u8>, umbra_proto::DeviceAddr),
    /// A genuine wipe command arrived.
    Wipe,
    /// Tell the sender of these texts that they arrived.
    Receipt(Vec<u8>, Vec<[u8; 16]>),
    /// This device fell behind in this group: rejoin it.
    Rejoin(Vec<u8>),
}

/// What the delivery service said of a commit.
enum Verdict {
    Accepted(u64),
    /// Another commit took the epoch; the group is now at this one.
    Stale(u64),
    /// Refused for good (not a member, not a contact, malformed).
    Refused(ClientError),
    /// No verdict reached us.
    Unknown(ClientError),
}

impl Client {
    // ----- opening ---------------------------------------------------------

    /// Creates a new device in `home` from an activation string: checks the
    /// server against the pinned fingerprint, registers a fresh identity key
    /// with the one-time code, creates the encrypted store and connects.
    pub async fn activate(
        home: &Path,
        passphrase: &Passphrase,
        activation: &ActivationString,
        options: ClientOptions,
    ) -> Result<(Client, WipeCode)> {
        if store::exists(home) {
            return Err(ClientError::AlreadyActivated(home.display().to_string()));
        }
        let mut secret = Zeroizing::new([0u8; 32]);
        getrandom::getrandom(secret.as_mut()).map_err(|e| ClientError::Store(e.to_string()))?;
        let signer = DeviceSigner::from_secret(&secret);
        let (link, hello, _pushes) = Link::connect(&activation.address, activation.pin).await?;
        let Push::Hello { nonce, .. } = hello else {
            return Err(ClientError::ConnectionLost);
        };
        let identity_key = signer.identity_key();
        let reply = link
            .request(Request::Register {
                activation_code: activation.code.clone(),
                identity_key,
                signature: signer.sign_payload(&register_signing_payload(&nonce, &identity_key)),
            })
            .await?;
        let Reply::Registered {
            account_id,
            subscription_expires_at,
        } = reply
        else {
            return Err(ClientError::Invalid("unexpected reply to Register".into()));
        };
        drop(link);
        let mut wipe_seed = Zeroizing::new([0u8; 16]);
        getrandom::getrandom(wipe_seed.as_mut()).map_err(|e| ClientError::Store(e.to_string()))?;
        let wipe_key = DeviceSigner::from_wipe_seed(&wipe_seed).identity_key();
        let connection = store::create(home, passphrase, options.kdf)?;
        connection.execute(
            "INSERT INTO device (singleton, account_id, identity_secret, server_address, server_pin,
                                 subscription_expires_at, created_at)
             VALUES (1, ?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                account_id.as_str(),
                &signer.secret_bytes()[..],
                activation.address,
                activation.pin.to_hex(),
                subscription_expires_at,
                options.clock.now()
            ],
        )?;
        connection.execute(
            "UPDATE device SET wipe_public_key = ?1",
            [&wipe_key.as_bytes()[..]],
        )?;
        info!(account = %account_id, "device activated");
        let client = Client::from_parts(home, connection, options)?;
        client.connect().await?;
        let wipe_code = WipeCode {
            address: activation.address.clone(),
            pin: activation.pin,
            account: account_id,
            seed: *wipe_seed,
        };
        Ok((client, wipe_code))
    }

    /// Opens the device in `home`. Does not connect.
    pub fn open(home: &Path, passphrase: &Passphrase, options: ClientOptions) -> Result<Client> {
        match store::open(home, passphrase)? {
            store::Unlocked::Open(connection) => {
                let client = Client::from_parts(home, connection, options)?;
                // Whatever came due while the device was closed goes first.
                client.expire_messages()?;
                // And files whose messages went while it was closed, or
                // that a crash left half written.
                if let Err(error) = client.sweep_files() {
                    tracing::warn!(%error, "deleting leftover files failed");
                }
                client.start_expiry_ticker();
                Ok(client)
            }
            // Answered exactly like a wrong passphrase.
            store::Unlocked::Erased(sealed) => Err(ClientError::Erased {
                home: home.to_owned(),
                revocation: sealed
                    .and_then(|bytes| serde_json::from_slice(&bytes).ok())
                    .map(Box::new),
            }),
        }
    }

    /// Finishes destroying a device after [`ClientError::Erased`]: `open`
    /// destroyed only its key file (so that it answered as fast as for a
    /// wrong passphrase); this overwrites and removes the rest. Call it after
    /// the person has been answered (the CLI does it in a detached process).
    /// Does nothing to a device that still has its key file. If it never
    /// runs, the next `open` or `activate` in `home` does it.
    pub fn finish_erasure(home: &Path) -> Result<()> {
        store::clear_leftovers(home)
    }

    fn from_parts(home: &Path, connection: Connection, options: ClientOptions) -> Result<Client> {
        type Row = (
            String,
            Vec<u8>,
            String,
            String,
            u32,
            Option<Vec<u8>>,
            Option<Vec<u8>>,
        );
        let (account, secret, address, pin, device, account_secret, certificate): Row = connection
            .query_row(
                "SELECT account_id, identity_secret, server_address, server_pin, device_number,
                        account_secret, certificate
                 FROM device",
                [],
                |row| {
                    Ok((
                        row.get(0)?,
                        row.get(1)?,
                        row.get(2)?,
                        row.get(3)?,
                        row.get(4)?,
                        row.get(5)?,
                        row.get(6)?,
                    ))
                },
            )
            .optional()?
            .ok_or_else(|| ClientError::NotActivated(home.display().to_string()))?;
        let signer = signer_from(secret)?;
        let account_signer = account_secret.map(signer_from).transpose()?;
        let certificate = certificate
            .map(|bytes| DeviceCertificate::decode(&bytes))
            .transpose()?;
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        Ok(Client {
            inner: Arc::new(Inner {
                home: home.to_owned(),
                account: AccountId::parse(&account)?,
                signer,
                account_signer,
                device: DeviceId(device),
                certificate,
                server_address: address,
                server_pin: CertFingerprint::from_hex(&pin)?,
                options,
                crypto: Crypto::default(),
                db: Mutex::new(connection),
                ops: tokio::sync::Mutex::new(()),
                link: Mutex::new(None),
                events,
                progress: Notify::new(),
                synced: watch::channel(0).0,
                ticking: std::sync::atomic::AtomicBool::new(false),
                held: watch::channel(false).0,
                rejoining: Mutex::default(),
                fetching: Mutex::default(),
                server_suites: Mutex::new(vec![umbra_mls::Suite::CLASSICAL]),
                token_keys: Mutex::new(Vec::new()),
                receipts_flushing: std::sync::atomic::AtomicBool::new(false),
                post_quantum_at_server: std::sync::atomic::AtomicBool::new(false),
            }),
        })
    }

    pub fn account(&self) -> &AccountId {
        &self.inner.account
    }

    /// The account key: what contacts pin and safety numbers cover (the
    /// same on every device of the account).
    pub fn identity_key(&self) -> IdentityKey {
        self.account_signer().identity_key()
    }

    /// This device's own key (device 1's is the account key).
    pub fn device_key(&self) -> IdentityKey {
        self.inner.signer.identity_key()
    }

    /// This device's number within its account.
    pub fn device(&self) -> DeviceId {
        self.inner.device
    }

    pub(crate) fn account_signer(&self) -> &DeviceSigner {
        self.inner
            .account_signer
            .as_ref()
            .unwrap_or(&self.inner.signer)
    }

    pub(crate) fn certificate(&self) -> Option<&DeviceCertificate> {
        self.inner.certificate.as_ref()
    }

    pub fn server_address(&self) -> &str {
        &self.inner.server_address
    }

    pub fn server_pin(&self) -> CertFingerprint {
        self.inner.server_pin
    }

    pub fn home(&self) -> &Path {
        &self.inner.home
    }

    /// Unix seconds at which the subscription ends, as last told by the server.
    pub fn subscription_expires_at(&self) -> Result<u64> {
        Ok(self
            .db()
            .query_row("SELECT subscription_expires_at FROM device", [], |row| {
                row.get(0)
            })?)
    }

    /// Every event from now on. Subscribe before [`Client::connect`] to see
    /// what arrives while offline.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.inner.events.subscribe()
    }

    pub(crate) fn now(&self) -> u64 {
        self.inner.options.clock.now()
    }

    fn emit(&self, event: Event) {
        let _ = self.inner.events.send(event);
    }

    pub(crate) fn db(&self) -> std::sync::MutexGuard<'_, Connection> {
        // SQLite rolls back a transaction left open by a panicking holder,
        // so the connection is usable after poisoning.
        self.inner.db.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `work` in one database transaction with an MLS provider bound
    /// to it: all of its writes land together or not at all.
    fn with_tx<T>(
        &self,
        work: impl FnOnce(&Transaction<'_>, &Provider<'_>) -> Result<T>,
    ) -> Result<T> {
        let mut db = self.db();
        let tx = db.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let value = {
            let provider = Provider::new(&self.inner.crypto, &tx);
            work(&tx, &provider)?
        };
        tx.commit()?;
        Ok(value)
    }
}

/// How long the server may hold a message of a conversation whose timer is
/// `timer` seconds: the timer lowers the server's TTL, but not below a day,
/// so that a device offline overnight still gets what was sent to it.
fn transit_ttl(timer: u32) -> u32 {
    const FLOOR: u32 = 86_400;
    if timer == 0 { 0 } else { timer.max(FLOOR) }
}

fn message_row(
    row: &rusqlite::Row<'_>,
    conversation: &ConversationId,
) -> rusqlite::Result<Message> {
    let direction = match row.get::<_, String>(2)?.as_str() {
        "in" => Direction::In,
        "out" => Direction::Out,
        _ => Direction::System,
    };
    // The `timestamp` column is when the row was written: for theirs, when
    // it arrived; `sent_at` their clock's time (absent before version 8).
    let written: u64 = row.get(5)?;
    let sent_at: Option<u64> = row.get(8)?;
    let received = direction == Direction::In;
    Ok(Message {
        id: row.get(0)?,
        conversation: conversation.clone(),
        sender: parse_account(&row.get::<_, String>(1)?)?,
        direction,
        body: row.get(3)?,
        state: DeliveryState::parse(&row.get::<_, String>(4)?),
        timestamp: if received {
            sent_at.unwrap_or(written)
        } else {
            written
        },
        received_at: received.then_some(written),
        expires_at: row.get(6)?,
        disappear_after: row.get(7)?,
        attachment: match row.get::<_, Option<String>>(9)? {
            Some(name) => Some(crate::types::AttachmentInfo {
                name,
                size: row.get(10)?,
                mime_type: row.get(11)?,
                state: crate::types::AttachmentState::parse(&row.get::<_, String>(12)?),
                duration_ms: row.get(13)?,
                has_thumbnail: row.get(14)?,
                waveform: row.get::<_, Option<Vec<u8>>>(15)?.unwrap_or_default(),
            }),
            None => None,
        },
    })
}

/// The public half of the delivery key of the epoch a commit starts (the
/// pending commit's; after an external commit, which openmls merges at
/// once, the epoch the group is in: `merged`), for the server to check
/// anonymous messages of that epoch against. Never the current epoch's for
/// an ordinary commit: a member it removes knows that one.
fn commit_delivery_key(group: &Group, provider: &Provider<'_>, merged: bool) -> Option<[u8; 32]> {
    let key = match group.next_delivery_key(provider) {
        Ok(Some(key)) => Ok(key),
        Ok(None) if merged => group.delivery_key(provider),
        Ok(None) => return None,
        Err(error) => Err(error),
    };
    match key {
        Ok(key) => Some(key.public()),
        Err(error) => {
            tracing::debug!(%error, "no delivery key for the commit; the epoch has no anonymous sending");
            None
        }
    }
}

fn load_group(provider: &Provider<'_>, group_id: &[u8]) -> Result<Group> {
    Group::load(provider, group_id)?
        .ok_or_else(|| ClientError::UnknownConversation(hex::encode(group_id)))
}

/// The identity key pinned for a contact (the first one seen), if any.
fn pinned_key(db: &Connection, account: &AccountId) -> Result<Option<Vec<u8>>> {
    Ok(db
        .query_row(
            "SELECT identity_key FROM contacts WHERE account_id = ?1",
            [account.as_str()],
            |row| row.get(0),
        )
        .optional()?
        .flatten())
}

/// A member of `group` whose changed key the user has not confirmed yet.
/// (On every send: one query for the few such contacts, usually none, not
/// one per member.)
fn unconfirmed_member(db: &Connection, group: &Group) -> Result<Option<AccountId>> {
    let mut statement =
        db.prepare_cached("SELECT account_id FROM contacts WHERE key_unconfirmed = 1")?;
    let unconfirmed = statement
        .query_map([], |row| parse_account(&row.get::<_, String>(0)?))?
        .collect::<rusqlite::Result<Vec<AccountId>>>()?;
    if unconfirmed.is_empty() {
        return Ok(None);
    }
    Ok(group
        .accounts()
        .into_iter()
        .find(|a| unconfirmed.contains(a)))
}

fn contact_state(db: &Connection, account: &AccountId) -> Result<Option<ContactState>> {
    let state: Option<String> = db
        .query_row(
            "SELECT state FROM contacts WHERE account_id = ?1",
            [account.as_str()],
            |row| row.get(0),
        )
        .optional()?;
    Ok(state.as_deref().and_then(ContactState::parse))
}

fn check_group_name(name: &str) -> Result<()> {
    if name.trim().is_empty() || name.len() > MAX_GROUP_NAME_BYTES {
        return Err(ClientError::Invalid(format!(
            "a group name has 1 to {MAX_GROUP_NAME_BYTES} bytes"
        )));
    }
    Ok(())
}
