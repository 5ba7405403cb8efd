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
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OptionalExtension, Transaction, params};
use tokio::sync::{Notify, broadcast, watch};
use tracing::{debug, info, warn};
use umbra_mls::{CommitOutput, Crypto, DeviceSigner, Group, GroupConfig, Incoming, Provider};
use umbra_proto::clock::{Clock, SystemClock};
use umbra_proto::content::{Body, Content, MAX_GROUP_NAME_BYTES};
use umbra_proto::frame::{CommitSubmission, Delivery};
use umbra_proto::{
    AccountId, ActivationString, CertFingerprint, DeliveryKind, ErrorCode, GroupId, IdentityKey,
    Push, Reply, Request, Signature, WipeCode, login_signing_payload, register_signing_payload,
};
use zeroize::Zeroizing;

use crate::error::{ClientError, Result};
use crate::link::{Link, REQUEST_TIMEOUT};

mod rejoin;
use crate::safety::SafetyNumber;
use crate::secret::{KdfParams, Passphrase};
use crate::store;
use crate::types::{
    ConnectionState, Contact, ContactState, Conversation, ConversationId, ConversationKind,
    DeliveryState, Direction, Event, Message, Refusal,
};

/// How many times a commit is retried after losing its epoch to another.
const COMMIT_ATTEMPTS: usize = 5;
/// Events buffered for slow subscribers before they start missing some.
const EVENT_BUFFER: usize = 1024;

/// Choices a device makes once, at activation or when opening.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Ciphersuite and past-epoch window for groups this device creates.
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
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            group: GroupConfig::default(),
            kdf: KdfParams::default(),
            key_package_batch: 20,
            self_update_interval: Duration::from_secs(7 * 86_400),
            clock: Arc::new(SystemClock),
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
    signer: DeviceSigner,
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
    /// Groups this device is rejoining (see `rejoin.rs`).
    rejoining: Mutex<std::collections::HashSet<Vec<u8>>>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
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
    /// The server says our one-time KeyPackages are running out.
    ReplenishKeyPackages,
    /// A member's line was revoked: commit its removal.
    RemoveMember(Vec<u8>, AccountId),
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
        let (account, secret, address, pin): (String, Vec<u8>, String, String) = connection
            .query_row(
                "SELECT account_id, identity_secret, server_address, server_pin FROM device",
                [],
                |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?)),
            )
            .optional()?
            .ok_or_else(|| ClientError::NotActivated(home.display().to_string()))?;
        let secret = Zeroizing::new(secret);
        let secret: &[u8; 32] = secret
            .as_slice()
            .try_into()
            .map_err(|_| ClientError::Store("identity key has the wrong length".into()))?;
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        Ok(Client {
            inner: Arc::new(Inner {
                home: home.to_owned(),
                account: AccountId::parse(&account)?,
                signer: DeviceSigner::from_secret(secret),
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
                rejoining: Mutex::default(),
            }),
        })
    }

    pub fn account(&self) -> &AccountId {
        &self.inner.account
    }

    pub fn identity_key(&self) -> IdentityKey {
        self.inner.signer.identity_key()
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

    // ----- connection ------------------------------------------------------

    fn link(&self) -> Result<Arc<Link>> {
        self.inner
            .link
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .filter(|link| link.is_alive())
            .ok_or(ClientError::NotConnected)
    }

    /// Starts erasing messages as they expire, once per client, when an
    /// async runtime is there to run it.
    pub(crate) fn start_expiry_ticker(&self) {
        if let Ok(runtime) = tokio::runtime::Handle::try_current()
            && !self
                .inner
                .ticking
                .swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            runtime.spawn(crate::disappearing::expiry_ticker(Arc::downgrade(
                &self.inner,
            )));
        }
    }

    pub(crate) fn signer(&self) -> &DeviceSigner {
        &self.inner.signer
    }

    pub(crate) fn from_weak(inner: &std::sync::Weak<Inner>) -> Option<Client> {
        inner.upgrade().map(|inner| Client { inner })
    }

    pub(crate) fn current_link(&self) -> Result<Arc<Link>> {
        self.link()
    }

    pub(crate) fn sign(&self, payload: &[u8]) -> Signature {
        self.inner.signer.sign_payload(payload)
    }

    pub(crate) fn emit_event(&self, event: Event) {
        self.emit(event);
    }

    /// Closes the store file (replacing the connection with an empty
    /// in-memory one), so that it can be overwritten and removed.
    pub(crate) fn close_store(&self) {
        if let Ok(empty) = Connection::open_in_memory() {
            *self.db() = empty;
        }
    }

    fn is_current(&self, link: &Arc<Link>) -> bool {
        self.inner
            .link
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_some_and(|current| Arc::ptr_eq(current, link))
    }

    pub fn is_connected(&self) -> bool {
        self.link().is_ok()
    }

    pub(crate) async fn request(&self, request: Request) -> Result<Reply> {
        self.link()?.request(request).await
    }

    /// Connects and authenticates, then applies what the server stored while
    /// this device was away (in the background: see [`Client::sync`]).
    pub async fn connect(&self) -> Result<()> {
        let (link, hello, pushes) =
            Link::connect(&self.inner.server_address, self.inner.server_pin).await?;
        let link = Arc::new(link);
        let started = self.start_session(&link, hello, pushes).await;
        if started.is_err() {
            self.report_flood(&link);
        }
        started
    }

    /// Tells the front end if `link` was dropped because the server flooded
    /// it with pushes.
    fn report_flood(&self, link: &Link) {
        if link.flooded() {
            self.emit(Event::ServerMisbehaved {
                what: "it pushed far more than the protocol's flow control allows; the connection was dropped".into(),
            });
        }
    }

    /// Logs in on a new link, then starts applying its pushes.
    async fn start_session(
        &self,
        link: &Arc<Link>,
        hello: Push,
        pushes: crate::link::Pushes,
    ) -> Result<()> {
        let Push::Hello { nonce, .. } = hello else {
            return Err(ClientError::ConnectionLost);
        };
        let account = &self.inner.account;
        let reply = link
            .request(Request::Login {
                account_id: account.clone(),
                signature: self
                    .inner
                    .signer
                    .sign_payload(&login_signing_payload(&nonce, account)),
            })
            .await?;
        let Reply::LoggedIn {
            subscription_expires_at,
            key_packages_remaining,
            has_last_resort,
            key_package_low_water,
        } = reply
        else {
            return Err(ClientError::Invalid("unexpected reply to Login".into()));
        };
        self.db().execute(
            "UPDATE device SET subscription_expires_at = ?1",
            [subscription_expires_at],
        )?;
        self.inner.synced.send_replace(0);
        let previous = self
            .inner
            .link
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .replace(Arc::clone(link));
        if let Some(previous) = previous {
            previous.close();
        }
        // Register the wipe key again on every connection: cheap, and it
        // repairs an activation whose first registration did not arrive.
        let wipe_key: Option<Vec<u8>> =
            self.db()
                .query_row("SELECT wipe_public_key FROM device", [], |row| row.get(0))?;
        if let Some(wipe_key) = wipe_key.and_then(|key| IdentityKey::from_slice(&key).ok()) {
            link.request(Request::SetWipeKey { wipe_key }).await?;
        }
        // Settle commits whose verdict was lost before applying anything:
        // the backlog may hold messages from the epoch after them.
        self.resubmit_pending_commits().await?;
        self.resume_rejoins()?;
        tokio::spawn(self.clone().apply_pushes(pushes, Arc::clone(link)));
        self.emit(Event::Connection {
            state: ConnectionState::Connected,
        });
        if key_packages_remaining < key_package_low_water || !has_last_resort {
            self.upload_key_packages(
                self.inner.options.key_package_batch,
                !has_last_resort || key_packages_remaining == 0,
            )
            .await?;
        }
        self.start_expiry_ticker();
        // Once the backlog is applied, refresh our keys where they are due.
        let client = self.clone();
        tokio::spawn(async move {
            if client.sync().await.is_ok()
                && let Err(error) = client.update_keys_if_due().await
            {
                debug!(%error, "periodic key update");
            }
        });
        Ok(())
    }

    /// Closes the connection.
    pub fn disconnect(&self) {
        let link = self
            .inner
            .link
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(link) = link {
            link.close();
        }
    }

    /// Waits until everything the server held for this device when it
    /// connected has been applied and acknowledged.
    pub async fn sync(&self) -> Result<()> {
        let mut synced = self.inner.synced.subscribe();
        let wait = synced.wait_for(|count| *count > 0);
        match tokio::time::timeout(REQUEST_TIMEOUT, wait).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => return Err(ClientError::ConnectionLost),
            Err(_) => return Err(ClientError::Timeout(REQUEST_TIMEOUT.as_secs())),
        }
        if self.is_connected() {
            Ok(())
        } else {
            Err(ClientError::ConnectionLost)
        }
    }

    /// Uploads `batch` one-time KeyPackages and, if asked, a new
    /// last-resort one.
    async fn upload_key_packages(&self, batch: usize, with_last_resort: bool) -> Result<()> {
        let suite = self.inner.options.group.suite;
        let (one_time, last_resort) = self.with_tx(|_, provider| {
            let make = |last| {
                umbra_mls::new_key_package(
                    provider,
                    &self.inner.signer,
                    &self.inner.account,
                    suite,
                    last,
                )
            };
            let one_time = (0..batch)
                .map(|_| make(false))
                .collect::<Result<Vec<_>, _>>()?;
            let last_resort = with_last_resort.then(|| make(true)).transpose()?;
            Ok((one_time, last_resort))
        })?;
        self.request(Request::UploadKeyPackages {
            key_packages: one_time,
            last_resort,
        })
        .await?;
        debug!(batch, with_last_resort, "uploaded KeyPackages");
        Ok(())
    }

    /// Replaces the last-resort KeyPackage, as an audit of openmls users
    /// advised (a reused last-resort package weakens forward secrecy for
    /// new conversations). The one-time pool is topped up when the server
    /// says it runs low (it caps how many may wait there).
    pub async fn rotate_key_packages(&self) -> Result<()> {
        self.upload_key_packages(0, true).await
    }

    // ----- applying deliveries ---------------------------------------------

    async fn apply_pushes(self, mut pushes: crate::link::Pushes, link: Arc<Link>) {
        while let Some(first) = pushes.recv().await {
            let mut batch = vec![first];
            while let Ok(more) = pushes.try_recv() {
                batch.push(more);
            }
            let mut acks = Vec::new();
            let mut synced = 0;
            let mut stalled = false;
            for (push, size) in batch {
                match push {
                    Push::Delivery(delivery) => {
                        let id = delivery.id;
                        let applied = self.apply_delivery(delivery).await;
                        link.applied(size);
                        match applied {
                            Ok(()) => acks.push(id),
                            Err(error) => {
                                // Transient (the local store failed): stop
                                // here, unacknowledged, so that this delivery
                                // and everything after it come again in order
                                // on the next connection.
                                warn!(%error, id, "could not apply a delivery; disconnecting to retry");
                                stalled = true;
                                break;
                            }
                        }
                    }
                    Push::Synced => synced += 1,
                    _ => {}
                }
            }
            // Quiet: the server answers an Ack only if it fails, so reading
            // never waits a round trip. An Ack lost with its connection costs
            // a redelivery, which `processed_deliveries` recognises.
            for chunk in acks.chunks(umbra_proto::frame::MAX_ACK_IDS) {
                let ack = Request::Ack {
                    delivery_ids: chunk.to_vec(),
                    quiet: true,
                };
                if let Err(error) = link.notify(ack).await {
                    debug!(%error, "acknowledgement not sent; the server will redeliver");
                }
            }
            // `sync` promises the backlog is acknowledged, not only applied:
            // the server handles a connection's requests in order, so the
            // answer to this Ping means every Ack before it was applied.
            if synced > 0
                && let Err(error) = link.request(Request::Ping).await
            {
                debug!(%error, "acknowledgements not confirmed; the server will redeliver");
            }
            self.inner.progress.notify_waiters();
            if stalled {
                link.close();
                break;
            }
            // A push task outliving its connection must not speak for the
            // new one.
            if synced > 0 && self.is_current(&link) {
                self.inner.synced.send_modify(|count| *count += synced);
                self.emit(Event::Synced);
            }
        }
        self.report_flood(&link);
        self.emit(Event::Connection {
            state: ConnectionState::Disconnected,
        });
        self.inner.progress.notify_waiters();
    }

    /// Applies one delivery exactly once: the record that it was applied is
    /// written in the same transaction as its effects.
    async fn apply_delivery(&self, delivery: Delivery) -> Result<()> {
        let _ops = self.inner.ops.lock().await;
        let mut events = Vec::new();
        let mut follow_up = None;
        let outcome = self.with_tx(|tx, provider| {
            let seen = tx
                .prepare_cached("SELECT 1 FROM processed_deliveries WHERE delivery_id = ?1")?
                .exists([delivery.id])?;
            if !seen {
                follow_up = self.apply_in_tx(tx, provider, &delivery, &mut events)?;
                // A genuine wipe is not marked as done until it is: if the
                // wipe is interrupted, the command comes again.
                if !matches!(follow_up, Some(FollowUp::Wipe)) {
                    tx.execute(
                        "INSERT INTO processed_deliveries (delivery_id, processed_at) VALUES (?1, ?2)",
                        params![delivery.id, self.now()],
                    )?;
                }
            }
            Ok(())
        });
        match outcome {
            Ok(()) => {}
            // The transaction rolled back. A failing local store is
            // transient: retry later, in order.
            Err(
                error @ (ClientError::Store(_) | ClientError::Mls(umbra_mls::MlsError::Storage(_))),
            ) => {
                return Err(error);
            }
            // Anything else is about the message itself (malformed, not
            // decryptable, not from a contact) and will never apply: record
            // it as seen so that it is acknowledged rather than retried.
            Err(error) => {
                warn!(%error, id = delivery.id, kind = ?delivery.kind, "discarding a delivery that cannot be applied");
                events.clear();
                events.push(Event::Discarded {
                    from: delivery.sender.clone(),
                    reason: error.to_string(),
                });
                follow_up = None;
                self.db().execute(
                    "INSERT OR IGNORE INTO processed_deliveries (delivery_id, processed_at) VALUES (?1, ?2)",
                    params![delivery.id, self.now()],
                )?;
            }
        }
        for event in events {
            self.emit(event);
        }
        drop(_ops);
        match follow_up {
            // Spawned: the commit may have to wait for this very task to
            // apply a competing commit.
            Some(FollowUp::CommitProposals(group_id)) => {
                let client = self.clone();
                tokio::spawn(async move {
                    if let Err(error) = client.commit_pending_proposals(&group_id).await {
                        debug!(%error, "committing a leave proposal");
                    }
                });
            }
            // Before the next delivery: a contact may be about to fetch one.
            Some(FollowUp::ReplenishKeyPackages) => {
                if let Err(error) = self
                    .upload_key_packages(self.inner.options.key_package_batch, false)
                    .await
                {
                    warn!(%error, "replenishing KeyPackages");
                }
            }
            Some(FollowUp::RemoveMember(group_id, account)) => {
                let client = self.clone();
                tokio::spawn(async move {
                    if let Err(error) = client.remove_from_group(&group_id, &[account]).await {
                        debug!(%error, "removing a revoked member");
                    }
                });
            }
            Some(FollowUp::Rejoin(group_id)) => self.spawn_rejoin(group_id),
            Some(FollowUp::Wipe) => {
                self.wipe_now("remote wipe").await?;
            }
            // Inline, before the next delivery: `recv` and `sync` then know
            // that the receipts for what they applied have gone out.
            Some(FollowUp::Receipt(group_id, uids)) => {
                let conversation = ConversationId::from_group(&group_id);
                if let Err(error) = self
                    .send_receipt(
                        &conversation,
                        umbra_proto::content::ReceiptKind::Delivered,
                        uids,
                    )
                    .await
                {
                    debug!(%error, "delivery receipt not sent");
                }
            }
            None => {}
        }
        Ok(())
    }

    fn apply_in_tx(
        &self,
        tx: &Transaction<'_>,
        provider: &Provider<'_>,
        delivery: &Delivery,
        events: &mut Vec<Event>,
    ) -> Result<Option<FollowUp>> {
        let sender = &delivery.sender;
        match delivery.kind {
            DeliveryKind::ContactRequest => {
                // If we had asked them too, theirs is the request the server
                // keeps: accepting it makes us contacts.
                let state = contact_state(tx, sender)?;
                if state != Some(ContactState::Accepted) {
                    tx.execute(
                        "INSERT INTO contacts (account_id, state, updated_at) VALUES (?1, 'incoming', ?2)
                         ON CONFLICT (account_id) DO UPDATE SET state = 'incoming', updated_at = ?2",
                        params![sender.as_str(), self.now()],
                    )?;
                    events.push(Event::ContactRequest {
                        from: sender.clone(),
                    });
                }
            }
            DeliveryKind::ContactAccepted => {
                // Only an answer to a request this device sent: the server
                // alone must not be able to make someone a contact.
                let accepted = tx.execute(
                    "UPDATE contacts SET state = 'accepted', updated_at = ?2
                     WHERE account_id = ?1 AND state = 'outgoing'",
                    params![sender.as_str(), self.now()],
                )?;
                if accepted == 1 {
                    events.push(Event::ContactAccepted { by: sender.clone() });
                } else if contact_state(tx, sender)? != Some(ContactState::Accepted) {
                    // (An acceptance crossing our own is no news.)
                    warn!(%sender, "refusing an acceptance of a contact request this device did not send");
                    events.push(Event::Refused {
                        from: sender.clone(),
                        reason: Refusal::UnaskedAcceptance,
                    });
                }
            }
            DeliveryKind::Welcome => self.apply_welcome(tx, provider, delivery, events)?,
            DeliveryKind::Commit | DeliveryKind::Application | DeliveryKind::Proposal => {
                let group_id = delivery
                    .group_id
                    .as_ref()
                    .ok_or_else(|| ClientError::Invalid("group message without a group".into()))?;
                return self.apply_group_message(tx, provider, group_id, delivery, events);
            }
            DeliveryKind::KeyPackagesLow => return Ok(Some(FollowUp::ReplenishKeyPackages)),
            DeliveryKind::Wipe => {
                let wipe_key: Option<Vec<u8>> =
                    tx.query_row("SELECT wipe_public_key FROM device", [], |row| row.get(0))?;
                let genuine = wipe_key
                    .and_then(|key| IdentityKey::from_slice(&key).ok())
                    .is_some_and(|key| {
                        crate::wipe::verify_command(&key, &self.inner.account, &delivery.payload)
                    });
                if genuine {
                    return Ok(Some(FollowUp::Wipe));
                }
                warn!("refusing a wipe command that is not signed with this device's wipe code");
                events.push(Event::WipeRefused);
            }
            DeliveryKind::MemberRevoked => {
                let group_id = delivery
                    .group_id
                    .as_ref()
                    .ok_or_else(|| ClientError::Invalid("revocation without a group".into()))?;
                let (account, proof) = delivery
                    .payload
                    .split_at(AccountId::LEN.min(delivery.payload.len()));
                let revoked = std::str::from_utf8(account)
                    .ok()
                    .and_then(|text| AccountId::parse(text).ok())
                    .ok_or_else(|| ClientError::Invalid("revocation without an account".into()))?;
                let gid = group_id.as_bytes().to_vec();
                let Some(group) = Group::load(provider, &gid)? else {
                    return Ok(None);
                };
                // Only the member's own signed revocation makes us remove it:
                // the server alone must not be able to have members removed.
                let signed = Signature::from_slice(proof).ok().is_some_and(|signature| {
                    group.members().iter().any(|member| {
                        member.account == revoked
                            && umbra_mls::verify(
                                &member.identity_key,
                                &umbra_proto::revoke_signing_payload(&revoked),
                                &signature,
                            )
                    })
                });
                if signed {
                    return Ok(Some(FollowUp::RemoveMember(gid, revoked)));
                }
                self.system_line(
                    tx,
                    &gid,
                    &format!("The server reports that {revoked}'s line has ended"),
                )?;
                events.push(Event::ConversationChanged {
                    conversation: self.conversation_in(tx, provider, &gid)?,
                });
            }
            // The server's own word (it could drop messages without saying
            // so anyway): only what it says is shown.
            DeliveryKind::MailboxFull => {
                let dropped = <[u8; 8]>::try_from(delivery.payload.as_slice())
                    .map(u64::from_be_bytes)
                    .map_err(|_| ClientError::Invalid("a mailbox notice without a count".into()))?;
                events.push(Event::MailboxOverflow { dropped });
            }
            DeliveryKind::Unspecified => {}
        }
        Ok(None)
    }

    fn apply_welcome(
        &self,
        tx: &Transaction<'_>,
        provider: &Provider<'_>,
        delivery: &Delivery,
        events: &mut Vec<Event>,
    ) -> Result<()> {
        let (group, inviter) = Group::join(provider, &delivery.payload, &self.inner.options.group)?;
        if inviter != delivery.sender
            || contact_state(tx, &inviter)? != Some(ContactState::Accepted)
        {
            // Not from a contact we accepted: leave no trace of the group.
            warn!(inviter = %inviter, "ignoring a Welcome from someone who is not a contact");
            group.delete(provider)?;
            events.push(Event::Refused {
                from: delivery.sender.clone(),
                reason: Refusal::InvitationFromStranger,
            });
            return Ok(());
        }
        let pinned = pinned_key(tx, &inviter)?;
        let inviter_key = group
            .members()
            .into_iter()
            .find(|member| member.account == inviter)
            .map(|member| member.identity_key);
        if let Some(pinned) = pinned
            && inviter_key.is_none_or(|key| key.as_bytes()[..] != pinned[..])
        {
            // A Welcome signed by another key than the one we know for
            // this contact: someone (a server) stands in for them.
            warn!(inviter = %inviter, "ignoring a Welcome whose inviter's key is not the one pinned");
            group.delete(provider)?;
            events.push(Event::Refused {
                from: inviter,
                reason: Refusal::InvitationUnderAnotherKey,
            });
            return Ok(());
        }
        let members: Vec<AccountId> = group.accounts();
        self.check_keys(tx, &group, events)?;
        // A conversation this device was removed from, and is now added to
        // again: the same conversation goes on, history and all.
        let again = tx.execute(
            "UPDATE conversations SET active = 1, disappear_after = ?2 WHERE group_id = ?1 AND active = 0",
            params![group.id(), group.disappear_after()],
        )? == 1;
        if again {
            self.system_line(tx, &group.id(), &format!("{inviter} added you again"))?;
            events.push(Event::ConversationChanged {
                conversation: self.conversation_in(tx, provider, &group.id())?,
            });
            return Ok(());
        }
        let has_direct: bool = tx
            .prepare_cached("SELECT 1 FROM conversations WHERE peer = ?1")?
            .exists([inviter.as_str()])?;
        let direct = members.len() == 2 && !has_direct;
        tx.execute(
            "INSERT INTO conversations (group_id, kind, peer, name, created_at, last_self_update, disappear_after)
             VALUES (?1, ?2, ?3, '', ?4, ?4, ?5)",
            params![
                group.id(),
                if direct { "direct" } else { "group" },
                direct.then(|| inviter.as_str()),
                self.now(),
                group.disappear_after()
            ],
        )?;
        if !direct {
            self.system_line(tx, &group.id(), &format!("{inviter} added you"))?;
        }
        events.push(Event::ConversationStarted {
            conversation: self.conversation_in(tx, provider, &group.id())?,
        });
        Ok(())
    }

    fn apply_group_message(
        &self,
        tx: &Transaction<'_>,
        provider: &Provider<'_>,
        group_id: &GroupId,
        delivery: &Delivery,
        events: &mut Vec<Event>,
    ) -> Result<Option<FollowUp>> {
        let id = group_id.as_bytes().to_vec();
        let Some(mut group) = Group::load(provider, &id)? else {
            return Err(ClientError::UnknownConversation(group_id.to_hex()));
        };
        let before: Vec<AccountId> = group.accounts();
        let had_pending = group.has_pending_commit();
        let incoming = match group.process(provider, &delivery.payload) {
            Ok(incoming) => incoming,
            // From an epoch this device never reached (the commits that
            // lead there expired, or were lost), or a commit of our own
            // epoch that cannot be processed: the device is behind.
            Err(error @ umbra_mls::MlsError::WrongEpoch { .. }) => {
                warn!(%error, "this device is behind in a group; rejoining");
                return Ok(Some(FollowUp::Rejoin(id)));
            }
            Err(error @ umbra_mls::MlsError::Protocol(_))
                if group.is_active()
                    && umbra_mls::message_header(&delivery.payload).is_ok_and(|header| {
                        header.kind == umbra_mls::MessageKind::Commit
                            && header.epoch == group.epoch()
                    }) =>
            {
                warn!(%error, "a commit of this device's epoch cannot be processed; rejoining");
                return Ok(Some(FollowUp::Rejoin(id)));
            }
            Err(error) => return Err(error.into()),
        };
        if had_pending && !group.has_pending_commit() {
            // Processing settled our own commit (merged or superseded).
            tx.execute("DELETE FROM pending_commits WHERE group_id = ?1", [&id])?;
        }
        let conversation = ConversationId::from_group(&id);
        match incoming {
            Incoming::Application { sender, plaintext } => {
                let content = Content::decode(&plaintext)?;
                match content.body {
                    Body::Text(body) => {
                        let timestamp = self.now();
                        // The shorter of the sender's timer and ours: a message
                        // never outlives the timer it was sent under.
                        let ttl = match (content.disappear_after, group.disappear_after()) {
                            (0, ours) => ours,
                            (theirs, 0) => theirs.min(crate::disappearing::MAX_TIMER),
                            (theirs, ours) => theirs.min(ours),
                        };
                        // Counting starts when it is shown; one never shown
                        // still goes after a backstop, not never.
                        let backstop = (ttl > 0).then(|| {
                            timestamp + crate::disappearing::UNSHOWN_BACKSTOP + u64::from(ttl)
                        });
                        tx.execute(
                            "INSERT INTO messages (group_id, sender, direction, body, state, timestamp, ttl, expires_at, uid)
                             VALUES (?1, ?2, 'in', ?3, 'received', ?4, ?5, ?6, ?7)",
                            params![
                                id,
                                sender.as_str(),
                                body,
                                timestamp,
                                ttl,
                                backstop,
                                content.message_id.map(|uid| uid.to_vec())
                            ],
                        )?;
                        events.push(Event::MessageReceived {
                            message: Message {
                                id: tx.last_insert_rowid(),
                                conversation,
                                sender,
                                direction: Direction::In,
                                body,
                                state: DeliveryState::Received,
                                timestamp,
                                expires_at: (ttl > 0).then(|| {
                                    timestamp
                                        + crate::disappearing::UNSHOWN_BACKSTOP
                                        + u64::from(ttl)
                                }),
                                disappear_after: ttl,
                            },
                        });
                        if let Some(uid) = content.message_id {
                            return Ok(Some(FollowUp::Receipt(id.clone(), vec![uid])));
                        }
                    }
                    Body::Receipt { kind, message_ids } => {
                        self.apply_receipt(tx, &id, kind, &message_ids, events)?;
                    }
                    Body::GroupName(name) => {
                        tx.execute(
                            "UPDATE conversations SET name = ?2 WHERE group_id = ?1",
                            params![id, name],
                        )?;
                        self.system_line(
                            tx,
                            &id,
                            &format!("{sender} named the group \u{201c}{name}\u{201d}"),
                        )?;
                        events.push(Event::ConversationChanged {
                            conversation: self.conversation_in(tx, provider, &id)?,
                        });
                    }
                    _ => {}
                }
                Ok(None)
            }
            Incoming::Leaving { sender } => {
                self.system_line(tx, &id, &format!("{sender} is leaving"))?;
                Ok(Some(FollowUp::CommitProposals(id)))
            }
            Incoming::RefusedProposal { sender } => {
                // Only the author of a change commits it, so the group
                // always shows who made it; a proposal for anyone else's
                // change is dropped (the server refuses them too).
                self.system_line(
                    tx,
                    &id,
                    &format!("{sender} proposed a change only they can make; ignored"),
                )?;
                Ok(None)
            }
            Incoming::Commit {
                sender,
                removed_self,
                rejoined,
                ..
            } => {
                tx.execute("DELETE FROM pending_commits WHERE group_id = ?1", [&id])?;
                if rejoined {
                    self.system_line(tx, &id, &format!("{sender} rejoined"))?;
                    self.check_keys(tx, &group, events)?;
                } else if removed_self {
                    tx.execute(
                        "UPDATE conversations SET active = 0 WHERE group_id = ?1",
                        [&id],
                    )?;
                    self.system_line(tx, &id, &format!("{sender} removed you"))?;
                } else {
                    let after: Vec<AccountId> = group.accounts();
                    self.membership_lines(tx, &id, &sender, &before, &after)?;
                    self.check_keys(tx, &group, events)?;
                    self.record_timer(tx, &id, sender.as_str(), group.disappear_after())?;
                }
                events.push(Event::ConversationChanged {
                    conversation: self.conversation_in(tx, provider, &id)?,
                });
                Ok(None)
            }
            _ => Ok(None),
        }
    }

    fn membership_lines(
        &self,
        tx: &Transaction<'_>,
        group_id: &[u8],
        by: &AccountId,
        before: &[AccountId],
        after: &[AccountId],
    ) -> Result<()> {
        let added: Vec<AccountId> = after
            .iter()
            .filter(|a| !before.contains(a))
            .cloned()
            .collect();
        let removed: Vec<AccountId> = before
            .iter()
            .filter(|a| !after.contains(a))
            .cloned()
            .collect();
        if !added.is_empty() {
            self.system_line(tx, group_id, &format!("{by} added {}", list(&added)))?;
        }
        if !removed.is_empty() {
            self.system_line(tx, group_id, &format!("{by} removed {}", list(&removed)))?;
        }
        Ok(())
    }

    pub(crate) fn system_line(
        &self,
        tx: &Transaction<'_>,
        group_id: &[u8],
        text: &str,
    ) -> Result<()> {
        tx.execute(
            "INSERT INTO messages (group_id, sender, direction, body, state, timestamp)
             VALUES (?1, ?2, 'system', ?3, 'received', ?4)",
            params![group_id, self.inner.account.as_str(), text, self.now()],
        )?;
        Ok(())
    }

    /// Compares the identity keys in `group` with the ones first seen for
    /// each contact, remembering new ones and flagging changed ones.
    fn check_keys(
        &self,
        tx: &Transaction<'_>,
        group: &Group,
        events: &mut Vec<Event>,
    ) -> Result<()> {
        for member in group.members() {
            if member.account == self.inner.account {
                continue;
            }
            self.check_key(tx, &member.account, &member.identity_key, events)?;
        }
        Ok(())
    }

    fn check_key(
        &self,
        tx: &Transaction<'_>,
        account: &AccountId,
        key: &IdentityKey,
        events: &mut Vec<Event>,
    ) -> Result<()> {
        let known: Option<Option<Vec<u8>>> = tx
            .query_row(
                "SELECT identity_key FROM contacts WHERE account_id = ?1",
                [account.as_str()],
                |row| row.get(0),
            )
            .optional()?;
        match known {
            Some(None) => {
                tx.execute(
                    "UPDATE contacts SET identity_key = ?2 WHERE account_id = ?1",
                    params![account.as_str(), &key.as_bytes()[..]],
                )?;
            }
            Some(Some(old)) if old != key.as_bytes() => {
                // A verified contact's new key is not written to until the
                // user confirms it (Signal's rule); an unverified one's is,
                // with a warning.
                let sending_stopped: bool = tx.query_row(
                    "UPDATE contacts SET identity_key = ?2, key_changed = 1,
                         key_unconfirmed = (verified OR key_unconfirmed), verified = 0
                     WHERE account_id = ?1 RETURNING key_unconfirmed",
                    params![account.as_str(), &key.as_bytes()[..]],
                    |row| row.get(0),
                )?;
                warn!(account = %account, sending_stopped, "identity key changed");
                events.push(Event::KeyChanged {
                    account: account.clone(),
                    sending_stopped,
                });
            }
            _ => {}
        }
        Ok(())
    }

    // ----- commits ---------------------------------------------------------

    /// Makes a commit with `plan`, submits it, and merges it once the server
    /// accepted it. When another member's commit won the epoch, forgets ours,
    /// waits until the winner has been applied, and plans again. `plan`
    /// returning `None` means there is nothing (left) to commit.
    pub(crate) async fn commit(
        &self,
        group_id: &[u8],
        mut plan: impl FnMut(&mut Group, &Provider<'_>) -> Result<Option<CommitOutput>>,
    ) -> Result<Option<u64>> {
        let gid = GroupId::new(group_id.to_vec())?;
        for _ in 0..COMMIT_ATTEMPTS {
            let ops = self.inner.ops.lock().await;
            let planned = self.with_tx(|tx, provider| {
                let mut group = load_group(provider, group_id)?;
                if !group.is_active() {
                    return Err(ClientError::NotAMember);
                }
                let Some(planned) = plan(&mut group, provider)? else {
                    return Ok(None);
                };
                tx.execute(
                    "INSERT OR REPLACE INTO pending_commits (group_id, epoch, commit_, welcome, group_info)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![
                        group_id,
                        planned.epoch,
                        planned.commit,
                        planned.welcome,
                        planned.group_info
                    ],
                )?;
                Ok(Some(planned))
            })?;
            let Some(planned) = planned else {
                return Ok(None);
            };
            let submission = CommitSubmission {
                group_id: gid.clone(),
                epoch: planned.epoch,
                commit: planned.commit.clone(),
                welcome: planned.welcome.clone(),
                group_info: planned.group_info.clone(),
            };
            match self.submit_commit(submission).await {
                Verdict::Accepted(epoch) => {
                    self.finish_commit(group_id, true)?;
                    drop(ops);
                    // Membership or keys changed: front ends redraw.
                    self.emit_changed(&ConversationId::from_group(group_id))?;
                    return Ok(Some(epoch));
                }
                Verdict::Stale(current_epoch) => {
                    self.finish_commit(group_id, false)?;
                    drop(ops);
                    debug!(current_epoch, "our commit lost its epoch; catching up");
                    self.wait_for_epoch(group_id, current_epoch).await?;
                }
                Verdict::Refused(error) => {
                    self.finish_commit(group_id, false)?;
                    return Err(error);
                }
                Verdict::Unknown(error) => {
                    // The server may or may not have it: the commit stays
                    // pending, and is resubmitted on the next connection
                    // (or settled by the next message in this group).
                    return Err(error);
                }
            }
        }
        Err(ClientError::CommitContention)
    }

    /// Submits a commit, resubmitting it if the reply is lost on a live
    /// connection (the server recognises a commit it accepted already).
    async fn submit_commit(&self, submission: CommitSubmission) -> Verdict {
        let mut last_error = ClientError::NotConnected;
        for _ in 0..COMMIT_ATTEMPTS {
            match self.request(Request::SendCommit(submission.clone())).await {
                Ok(Reply::CommitAccepted { epoch }) => return Verdict::Accepted(epoch),
                Ok(_) => {
                    return Verdict::Unknown(ClientError::Invalid(
                        "unexpected reply to a commit".into(),
                    ));
                }
                Err(ClientError::Server {
                    code: ErrorCode::StaleEpoch,
                    current_epoch,
                    ..
                }) => return Verdict::Stale(current_epoch),
                // The server could not decide; nothing is known.
                Err(
                    error @ ClientError::Server {
                        code: ErrorCode::Internal | ErrorCode::ServerBusy,
                        ..
                    },
                ) => return Verdict::Unknown(error),
                Err(error @ ClientError::Server { .. }) => return Verdict::Refused(error),
                Err(error @ ClientError::Timeout(_)) if self.is_connected() => {
                    last_error = error;
                    continue;
                }
                Err(error) => return Verdict::Unknown(error),
            }
        }
        Verdict::Unknown(last_error)
    }

    /// Merges (accepted) or discards (rejected) the pending commit.
    fn finish_commit(&self, group_id: &[u8], accepted: bool) -> Result<()> {
        self.with_tx(|tx, provider| {
            let mut group = load_group(provider, group_id)?;
            if group.has_pending_commit() {
                if accepted {
                    let before: Vec<AccountId> = group.accounts();
                    group.merge_pending_commit(provider)?;
                    let after: Vec<AccountId> = group.accounts();
                    self.membership_lines(
                        tx,
                        group_id,
                        &self.inner.account.clone(),
                        &before,
                        &after,
                    )?;
                    tx.execute(
                        "UPDATE conversations SET last_self_update = ?2 WHERE group_id = ?1",
                        params![group_id, self.now()],
                    )?;
                } else {
                    group.clear_pending_commit(provider)?;
                }
            }
            tx.execute(
                "DELETE FROM pending_commits WHERE group_id = ?1",
                [group_id],
            )?;
            Ok(())
        })
    }

    async fn wait_for_epoch(&self, group_id: &[u8], epoch: u64) -> Result<()> {
        let deadline = tokio::time::Instant::now() + REQUEST_TIMEOUT;
        loop {
            let progressed = self.inner.progress.notified();
            tokio::pin!(progressed);
            progressed.as_mut().enable();
            let current =
                self.with_tx(|_, provider| Ok(load_group(provider, group_id)?.epoch()))?;
            if current >= epoch {
                return Ok(());
            }
            if !self.is_connected() {
                return Err(ClientError::ConnectionLost);
            }
            if tokio::time::timeout_at(deadline, progressed).await.is_err() {
                return Err(ClientError::Timeout(REQUEST_TIMEOUT.as_secs()));
            }
        }
    }

    /// After a crash or a lost connection: resubmit commits whose verdict
    /// was never seen. The server answers a duplicate as accepted.
    async fn resubmit_pending_commits(&self) -> Result<()> {
        type Row = (Vec<u8>, u64, Vec<u8>, Option<Vec<u8>>, Vec<u8>);
        let pending: Vec<Row> = {
            let db = self.db();
            let mut statement = db.prepare(
                "SELECT group_id, epoch, commit_, welcome, group_info FROM pending_commits",
            )?;
            let rows = statement.query_map([], |row| {
                Ok((
                    row.get(0)?,
                    row.get(1)?,
                    row.get(2)?,
                    row.get(3)?,
                    row.get(4)?,
                ))
            })?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        for (group_id, epoch, commit, welcome, group_info) in pending {
            let _ops = self.inner.ops.lock().await;
            let verdict = self
                .submit_commit(CommitSubmission {
                    group_id: GroupId::new(group_id.clone())?,
                    epoch,
                    commit,
                    welcome,
                    group_info,
                })
                .await;
            match verdict {
                Verdict::Accepted(_) => self.finish_commit(&group_id, true)?,
                Verdict::Stale(_) | Verdict::Refused(_) => self.finish_commit(&group_id, false)?,
                Verdict::Unknown(error) => return Err(error),
            }
        }
        Ok(())
    }

    async fn commit_pending_proposals(&self, group_id: &[u8]) -> Result<()> {
        let signer = &self.inner.signer;
        self.commit(group_id, |group, provider| {
            if !group.has_pending_proposals() {
                return Ok(None);
            }
            let output = group.commit_pending_proposals(provider, signer)?;
            Ok(Some(output))
        })
        .await?;
        Ok(())
    }

    // ----- contacts --------------------------------------------------------

    /// Sends a contact request. Nothing can be exchanged until they accept.
    /// If they had asked first, this accepts their request instead.
    pub async fn add_contact(&self, account: &AccountId) -> Result<()> {
        if account == &self.inner.account {
            return Err(ClientError::Invalid("you cannot add yourself".into()));
        }
        let state = contact_state(&self.db(), account)?;
        match state {
            Some(ContactState::Incoming) => return self.accept_contact(account).await.map(drop),
            Some(ContactState::Accepted) => return Ok(()),
            _ => {}
        }
        self.request(Request::SendContactRequest {
            to: account.clone(),
        })
        .await?;
        self.db().execute(
            "INSERT INTO contacts (account_id, state, updated_at) VALUES (?1, 'outgoing', ?2)
             ON CONFLICT (account_id) DO NOTHING",
            params![account.as_str(), self.now()],
        )?;
        Ok(())
    }

    /// Accepts a contact request and opens the one-to-one conversation.
    pub async fn accept_contact(&self, account: &AccountId) -> Result<ConversationId> {
        let state = contact_state(&self.db(), account)?;
        match state {
            Some(ContactState::Incoming) => {}
            Some(ContactState::Accepted) => {
                if let Some(existing) = self.direct_conversation(account)? {
                    return Ok(existing);
                }
            }
            _ => return Err(ClientError::NoRequest(account.clone())),
        }
        self.request(Request::AcceptContact {
            from: account.clone(),
        })
        .await?;
        self.db().execute(
            "UPDATE contacts SET state = 'accepted', updated_at = ?2 WHERE account_id = ?1",
            params![account.as_str(), self.now()],
        )?;
        let conversation = self
            .new_conversation(None, std::slice::from_ref(account))
            .await?;
        Ok(conversation)
    }

    /// Declines a contact request: it is forgotten on this device, and
    /// nothing is sent (the requester is not told).
    pub fn decline_contact(&self, account: &AccountId) -> Result<()> {
        let removed = self.db().execute(
            "DELETE FROM contacts WHERE account_id = ?1 AND state = 'incoming'",
            [account.as_str()],
        )?;
        if removed == 0 {
            return Err(ClientError::NoRequest(account.clone()));
        }
        Ok(())
    }

    pub fn contacts(&self) -> Result<Vec<Contact>> {
        let db = self.db();
        let mut statement = db.prepare(
            "SELECT c.account_id, c.state, c.verified, c.key_changed, v.group_id, c.key_unconfirmed
             FROM contacts c LEFT JOIN conversations v ON v.peer = c.account_id
             ORDER BY c.account_id",
        )?;
        let rows = statement.query_map([], |row| {
            Ok(Contact {
                account: parse_account(&row.get::<_, String>(0)?)?,
                state: ContactState::parse(&row.get::<_, String>(1)?)
                    .unwrap_or(ContactState::Outgoing),
                verified: row.get(2)?,
                key_changed: row.get(3)?,
                key_unconfirmed: row.get(5)?,
                conversation: row
                    .get::<_, Option<Vec<u8>>>(4)?
                    .map(|g| ConversationId::from_group(&g)),
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// The safety number for this device and `account`.
    pub fn safety_number(&self, account: &AccountId) -> Result<SafetyNumber> {
        let key: Option<Option<Vec<u8>>> = self
            .db()
            .query_row(
                "SELECT identity_key FROM contacts WHERE account_id = ?1",
                [account.as_str()],
                |row| row.get(0),
            )
            .optional()?;
        let key = match key {
            None => return Err(ClientError::NotAContact(account.clone())),
            Some(None) => {
                return Err(ClientError::NotAccepted(account.clone()));
            }
            Some(Some(key)) => IdentityKey::from_slice(&key)?,
        };
        Ok(SafetyNumber::new(
            (&self.inner.account, &self.identity_key()),
            (account, &key),
        ))
    }

    /// The safety number to show the user for comparison; remembers that
    /// it was shown, so that [`Client::verify_contact`] marks exactly the
    /// key it stands for.
    pub fn show_safety_number(&self, account: &AccountId) -> Result<SafetyNumber> {
        let number = self.safety_number(account)?;
        self.db().execute(
            "UPDATE contacts SET shown_key = identity_key WHERE account_id = ?1",
            [account.as_str()],
        )?;
        Ok(number)
    }

    /// Marks a contact verified after the user compared the safety number
    /// last shown ([`Client::show_safety_number`]); clears a key-changed
    /// warning and lets messages go to them again. Refused if the key
    /// changed since that number was shown (or none was).
    pub fn verify_contact(&self, account: &AccountId) -> Result<()> {
        self.confirm_shown_key(
            account,
            "verified = 1, key_changed = 0, key_unconfirmed = 0",
        )
    }

    /// Accepts a contact's changed identity key, as last shown, without
    /// verifying it: messages go to them again, and the contact stays
    /// unverified.
    pub fn accept_key_change(&self, account: &AccountId) -> Result<()> {
        self.confirm_shown_key(account, "key_changed = 0, key_unconfirmed = 0")
    }

    /// Applies `set` to the contact if its key is still the one last shown.
    fn confirm_shown_key(&self, account: &AccountId, set: &str) -> Result<()> {
        self.safety_number(account)?;
        let marked = self.db().execute(
            &format!(
                "UPDATE contacts SET {set} WHERE account_id = ?1 AND shown_key = identity_key"
            ),
            [account.as_str()],
        )?;
        if marked == 0 {
            return Err(ClientError::SafetyNumberNotShown(account.clone()));
        }
        Ok(())
    }

    // ----- conversations ---------------------------------------------------

    fn direct_conversation(&self, peer: &AccountId) -> Result<Option<ConversationId>> {
        let id: Option<Vec<u8>> = self
            .db()
            .query_row(
                "SELECT group_id FROM conversations WHERE peer = ?1",
                [peer.as_str()],
                |row| row.get(0),
            )
            .optional()?;
        Ok(id.map(|g| ConversationId::from_group(&g)))
    }

    /// The one-to-one conversation with `account`, or why there is none.
    pub fn conversation_with(&self, account: &AccountId) -> Result<ConversationId> {
        if let Some(id) = self.direct_conversation(account)? {
            return Ok(id);
        }
        let state = contact_state(&self.db(), account)?;
        match state {
            None => Err(ClientError::NotAContact(account.clone())),
            Some(ContactState::Incoming) => Err(ClientError::Invalid(format!(
                "{account} asked to be your contact; accept with `contacts accept {account}` first"
            ))),
            Some(_) => Err(ClientError::NotAccepted(account.clone())),
        }
    }

    async fn fetch_key_packages(&self, accounts: &[AccountId]) -> Result<Vec<Vec<u8>>> {
        let mut key_packages = Vec::with_capacity(accounts.len());
        for account in accounts {
            let state = contact_state(&self.db(), account)?;
            match state {
                Some(ContactState::Accepted) => {}
                None => return Err(ClientError::NotAContact(account.clone())),
                Some(_) => return Err(ClientError::NotAccepted(account.clone())),
            }
            let Reply::KeyPackage { key_package, .. } = self
                .request(Request::FetchKeyPackage {
                    account_id: account.clone(),
                })
                .await?
            else {
                return Err(ClientError::Invalid(
                    "unexpected reply to FetchKeyPackage".into(),
                ));
            };
            let valid = umbra_mls::validate_key_package(&key_package)?;
            if &valid.account != account {
                return Err(ClientError::Invalid(format!(
                    "the server returned a KeyPackage for {} when asked for {account}",
                    valid.account
                )));
            }
            // An account's identity key does not change: a KeyPackage
            // under another key than the one pinned for this contact is the
            // server's own, and is refused without touching the pin (so a
            // forged one cannot displace the real key or block the real
            // conversation). The first one seen pins the key.
            let mut events = Vec::new();
            let foreign = self.with_tx(|tx, _| match pinned_key(tx, account)? {
                Some(pinned) => Ok(pinned[..] != valid.identity_key.as_bytes()[..]),
                None => {
                    self.check_key(tx, account, &valid.identity_key, &mut events)?;
                    Ok(false)
                }
            })?;
            if foreign {
                warn!(%account, "refusing a KeyPackage under another key than the pinned one");
                self.emit(Event::Refused {
                    from: account.clone(),
                    reason: Refusal::KeyPackageUnderAnotherKey,
                });
                return Err(ClientError::ForeignKeyPackage(account.clone()));
            }
            for event in events {
                self.emit(event);
            }
            key_packages.push(key_package);
        }
        Ok(key_packages)
    }

    /// Creates a conversation with `members` (all accepted contacts): a
    /// direct one when `name` is None and there is one member.
    async fn new_conversation(
        &self,
        name: Option<&str>,
        members: &[AccountId],
    ) -> Result<ConversationId> {
        let key_packages = self.fetch_key_packages(members).await?;
        let group_id = {
            let _ops = self.inner.ops.lock().await;
            let timer = self.default_disappearing()?;
            let group = self.with_tx(|_, provider| {
                Group::create(
                    provider,
                    &self.inner.signer,
                    &self.inner.account,
                    &self.inner.options.group,
                    timer,
                )
                .map_err(ClientError::from)
            })?;
            let group_id = group.id();
            let group_info =
                self.with_tx(|_, provider| Ok(group.group_info(provider, &self.inner.signer)?))?;
            let registered = self
                .request(Request::CreateGroup {
                    group_id: GroupId::new(group_id.clone())?,
                    group_info,
                })
                .await;
            if let Err(error) = registered {
                self.with_tx(|_, provider| Ok(group.delete(provider)?))?;
                return Err(error);
            }
            let direct = name.is_none() && members.len() == 1;
            self.db().execute(
                "INSERT INTO conversations (group_id, kind, peer, name, created_at, last_self_update, disappear_after)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?5, ?6)",
                params![
                    group_id,
                    if direct { "direct" } else { "group" },
                    direct.then(|| members.first().map(AccountId::as_str)).flatten(),
                    name.unwrap_or_default(),
                    self.now(),
                    timer
                ],
            )?;
            group_id
        };
        self.add_to_group(&group_id, members, key_packages).await?;
        let conversation = ConversationId::from_group(&group_id);
        if let Some(name) = name.filter(|n| !n.is_empty()) {
            self.send_content(&conversation, Body::GroupName(name.to_owned()))
                .await?;
        }
        let started = self.conversation(&conversation)?;
        self.emit(Event::ConversationStarted {
            conversation: started,
        });
        Ok(conversation)
    }

    async fn add_to_group(
        &self,
        group_id: &[u8],
        members: &[AccountId],
        key_packages: Vec<Vec<u8>>,
    ) -> Result<()> {
        let signer = &self.inner.signer;
        let mut events = Vec::new();
        self.commit(group_id, |group, provider| {
            let present: Vec<AccountId> = group.accounts();
            let fresh: Vec<usize> = (0..members.len())
                .filter(|i| members.get(*i).is_some_and(|m| !present.contains(m)))
                .collect();
            if fresh.is_empty() {
                return Ok(None);
            }
            let kps: Vec<Vec<u8>> = fresh
                .iter()
                .filter_map(|i| key_packages.get(*i).cloned())
                .collect();
            let output = group.add_members(provider, signer, &kps)?;
            Ok(Some(output))
        })
        .await?;
        self.with_tx(|tx, provider| {
            let group = load_group(provider, group_id)?;
            self.check_keys(tx, &group, &mut events)
        })?;
        for event in events {
            self.emit(event);
        }
        Ok(())
    }

    /// Creates a group conversation with accepted contacts.
    pub async fn create_group(&self, name: &str, members: &[AccountId]) -> Result<ConversationId> {
        check_group_name(name)?;
        if members.is_empty() {
            return Err(ClientError::Invalid(
                "a group needs at least one other member".into(),
            ));
        }
        self.new_conversation(Some(name), members).await
    }

    pub(crate) fn group_id_of(&self, conversation: &ConversationId) -> Result<Vec<u8>> {
        let group_id = conversation
            .group_id()
            .ok_or_else(|| ClientError::UnknownConversation(conversation.to_string()))?;
        let exists = self
            .db()
            .prepare_cached("SELECT 1 FROM conversations WHERE group_id = ?1")?
            .exists([&group_id])?;
        if !exists {
            return Err(ClientError::UnknownConversation(conversation.to_string()));
        }
        Ok(group_id)
    }

    /// Adds accepted contacts to a group conversation.
    pub async fn add_members(
        &self,
        conversation: &ConversationId,
        members: &[AccountId],
    ) -> Result<()> {
        let group_id = self.group_id_of(conversation)?;
        let key_packages = self.fetch_key_packages(members).await?;
        self.add_to_group(&group_id, members, key_packages).await
    }

    /// Removes members; they cannot read anything sent afterwards.
    pub async fn remove_members(
        &self,
        conversation: &ConversationId,
        members: &[AccountId],
    ) -> Result<()> {
        let group_id = self.group_id_of(conversation)?;
        self.remove_from_group(&group_id, members).await
    }

    async fn remove_from_group(&self, group_id: &[u8], members: &[AccountId]) -> Result<()> {
        let signer = &self.inner.signer;
        self.commit(group_id, |group, provider| {
            let present: Vec<AccountId> = group.accounts();
            let removed: Vec<AccountId> = members
                .iter()
                .filter(|m| present.contains(m))
                .cloned()
                .collect();
            if removed.is_empty() {
                return Ok(None);
            }
            let output = group.remove_members(provider, signer, &removed)?;
            Ok(Some(output))
        })
        .await?;
        Ok(())
    }

    /// Renames a group; every member sees the new name.
    pub async fn rename_group(&self, conversation: &ConversationId, name: &str) -> Result<()> {
        check_group_name(name)?;
        self.send_content(conversation, Body::GroupName(name.to_owned()))
            .await?;
        let group_id = self.group_id_of(conversation)?;
        self.db().execute(
            "UPDATE conversations SET name = ?2 WHERE group_id = ?1",
            params![group_id, name],
        )?;
        self.emit_changed(conversation)
    }

    /// Leaves a group: proposes our removal, which the next member online
    /// commits. Nothing sent after that commit can be read here.
    pub async fn leave_group(&self, conversation: &ConversationId) -> Result<()> {
        let group_id = self.group_id_of(conversation)?;
        let _ops = self.inner.ops.lock().await;
        let proposal = self.with_tx(|_, provider| {
            let mut group = load_group(provider, &group_id)?;
            Ok(group.leave(provider, &self.inner.signer)?)
        })?;
        let sent = self
            .request(Request::SendMessage {
                group_id: GroupId::new(group_id.clone())?,
                message: proposal,
                kind: DeliveryKind::Proposal,
                ttl_seconds: 0,
            })
            .await;
        self.with_tx(|tx, provider| {
            if sent.is_ok() {
                tx.execute(
                    "UPDATE conversations SET active = 0 WHERE group_id = ?1",
                    [&group_id],
                )?;
                self.system_line(tx, &group_id, "You left")?;
            } else {
                // Not sent: forget the proposal, or the group would stay
                // blocked on it.
                load_group(provider, &group_id)?.clear_pending_proposals(provider)?;
            }
            Ok(())
        })?;
        sent?;
        drop(_ops);
        self.emit_changed(conversation)
    }

    /// Replaces this device's keys in every active conversation (also the
    /// "recreate keys" action): a key stolen before no longer opens what is
    /// sent after.
    pub async fn update_keys(&self) -> Result<usize> {
        let groups: Vec<Vec<u8>> = {
            let db = self.db();
            let mut statement =
                db.prepare("SELECT group_id FROM conversations WHERE active = 1")?;
            let rows = statement.query_map([], |row| row.get(0))?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        let mut updated = 0;
        for group_id in groups {
            self.self_update(&group_id).await?;
            updated += 1;
        }
        Ok(updated)
    }

    /// Runs the periodic self-update in conversations that are due.
    pub async fn update_keys_if_due(&self) -> Result<usize> {
        let interval = self.inner.options.self_update_interval.as_secs();
        if interval == 0 {
            return Ok(0);
        }
        let due: Vec<Vec<u8>> = {
            let db = self.db();
            let mut statement = db.prepare(
                "SELECT group_id FROM conversations WHERE active = 1 AND last_self_update <= ?1",
            )?;
            let rows =
                statement.query_map([self.now().saturating_sub(interval)], |row| row.get(0))?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        for group_id in &due {
            self.self_update(group_id).await?;
        }
        Ok(due.len())
    }

    async fn self_update(&self, group_id: &[u8]) -> Result<()> {
        let signer = &self.inner.signer;
        self.commit(group_id, |group, provider| {
            Ok(Some(group.self_update(provider, signer)?))
        })
        .await?;
        Ok(())
    }

    pub(crate) fn emit_changed(&self, conversation: &ConversationId) -> Result<()> {
        let conversation = self.conversation(conversation)?;
        self.emit(Event::ConversationChanged { conversation });
        Ok(())
    }

    fn conversation_in(
        &self,
        tx: &Connection,
        provider: &Provider<'_>,
        group_id: &[u8],
    ) -> Result<Conversation> {
        let (kind, peer, name, active, disappear_after): (String, Option<String>, String, bool, u32) = tx
            .query_row(
                "SELECT kind, peer, name, active, disappear_after FROM conversations WHERE group_id = ?1",
                [group_id],
                |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?, row.get(4)?)),
            )
            .optional()?
            .ok_or_else(|| ClientError::UnknownConversation(hex::encode(group_id)))?;
        let members = match Group::load(provider, group_id)? {
            Some(group) if group.is_active() => group.accounts(),
            _ => vec![],
        };
        let kind = match (kind.as_str(), peer) {
            ("direct", Some(peer)) => ConversationKind::Direct {
                peer: AccountId::parse(&peer)?,
            },
            _ => ConversationKind::Group,
        };
        Ok(Conversation {
            id: ConversationId::from_group(group_id),
            kind,
            name,
            active,
            disappear_after,
            members,
        })
    }

    pub fn conversation(&self, conversation: &ConversationId) -> Result<Conversation> {
        let group_id = self.group_id_of(conversation)?;
        let db = self.db();
        let provider = Provider::new(&self.inner.crypto, &db);
        self.conversation_in(&db, &provider, &group_id)
    }

    pub fn conversations(&self) -> Result<Vec<Conversation>> {
        let db = self.db();
        let ids: Vec<Vec<u8>> = {
            let mut statement =
                db.prepare("SELECT group_id FROM conversations ORDER BY created_at, group_id")?;
            let rows = statement.query_map([], |row| row.get(0))?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        let provider = Provider::new(&self.inner.crypto, &db);
        ids.iter()
            .map(|id| self.conversation_in(&db, &provider, id))
            .collect()
    }

    /// The last `limit` messages of a conversation, oldest first.
    pub fn history(&self, conversation: &ConversationId, limit: usize) -> Result<Vec<Message>> {
        let group_id = self.group_id_of(conversation)?;
        let db = self.db();
        let mut statement = db.prepare(
            "SELECT id, sender, direction, body, state, timestamp, expires_at, ttl FROM (
                 SELECT * FROM messages WHERE group_id = ?1 ORDER BY id DESC LIMIT ?2
             ) ORDER BY id",
        )?;
        let rows = statement.query_map(params![group_id, limit as i64], |row| {
            message_row(row, conversation)
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// One message of a conversation, by its local ID.
    fn message(&self, conversation: &ConversationId, id: i64) -> Result<Message> {
        self.db()
            .query_row(
                "SELECT id, sender, direction, body, state, timestamp, expires_at, ttl
                 FROM messages WHERE id = ?1",
                [id],
                |row| message_row(row, conversation),
            )
            .optional()?
            .ok_or_else(|| ClientError::Store("sent message vanished".into()))
    }

    // ----- sending ---------------------------------------------------------

    /// Sends a text message. Returns it once the server has stored it for
    /// every recipient (state `Sent`); on failure it stays in the history as
    /// `Failed`.
    pub async fn send_text(&self, conversation: &ConversationId, text: &str) -> Result<Message> {
        if text.trim().is_empty() {
            return Err(ClientError::Invalid("empty message".into()));
        }
        let id = self
            .send_content(conversation, Body::Text(text.to_owned()))
            .await?;
        self.emit(Event::DeliveryStateChanged {
            message_id: id,
            state: DeliveryState::Sent,
        });
        self.message(conversation, id)
    }

    /// Encrypts and sends one application message. Text is recorded locally
    /// (MLS cannot decrypt one's own messages) in the same transaction as the
    /// ratchet step. Returns the local message ID and whether it was accepted.
    pub(crate) async fn send_content(
        &self,
        conversation: &ConversationId,
        body: Body,
    ) -> Result<i64> {
        let group_id = self.group_id_of(conversation)?;
        let ops = self.inner.ops.lock().await;
        let text = match &body {
            Body::Text(text) => Some(text.clone()),
            _ => None,
        };
        let mut uid = [0u8; 16];
        getrandom::getrandom(&mut uid).map_err(|e| ClientError::Store(e.to_string()))?;
        let content = Content {
            message_id: text.is_some().then_some(uid),
            body,
            disappear_after: 0,
            sent_at_ms: now_ms(),
        };
        let (message_id, ciphertext, ttl) = self.with_tx(|tx, provider| {
            let mut group = load_group(provider, &group_id)?;
            if !group.is_active() {
                return Err(ClientError::NotAMember);
            }
            if let Some(account) = unconfirmed_member(tx, &group)? {
                return Err(ClientError::KeyUnconfirmed(account));
            }
            if Self::is_rejoining(tx, &group_id)? {
                return Err(ClientError::Rejoining);
            }
            let content = Content {
                disappear_after: group.disappear_after(),
                ..content.clone()
            };
            let ciphertext = group.encrypt(provider, &self.inner.signer, &content.encode())?;
            let mut message_id = 0;
            let ttl = group.disappear_after();
            if let Some(text) = &text {
                let now = self.now();
                tx.execute(
                    "INSERT INTO messages (group_id, sender, direction, body, state, timestamp, ttl, expires_at, uid)
                     VALUES (?1, ?2, 'out', ?3, 'sending', ?4, ?5, ?6, ?7)",
                    params![
                        group_id,
                        self.inner.account.as_str(),
                        text,
                        now,
                        ttl,
                        (ttl > 0).then(|| now + u64::from(ttl)),
                        &uid[..]
                    ],
                )?;
                message_id = tx.last_insert_rowid();
            }
            Ok((message_id, ciphertext, ttl))
        })?;
        drop(ops);
        let sent = self
            .request(Request::SendMessage {
                group_id: GroupId::new(group_id)?,
                message: ciphertext,
                kind: DeliveryKind::Application,
                ttl_seconds: transit_ttl(ttl),
            })
            .await;
        let state = if sent.is_ok() {
            DeliveryState::Sent
        } else {
            DeliveryState::Failed
        };
        if message_id != 0 {
            self.db().execute(
                "UPDATE messages SET state = ?2 WHERE id = ?1",
                params![message_id, state.as_str()],
            )?;
        }
        match sent {
            Ok(_) => Ok(message_id),
            Err(error) => {
                if message_id != 0 {
                    self.emit(Event::DeliveryStateChanged {
                        message_id,
                        state: DeliveryState::Failed,
                    });
                }
                Err(error)
            }
        }
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
    Ok(Message {
        id: row.get(0)?,
        conversation: conversation.clone(),
        sender: parse_account(&row.get::<_, String>(1)?)?,
        direction,
        body: row.get(3)?,
        state: DeliveryState::parse(&row.get::<_, String>(4)?),
        timestamp: row.get(5)?,
        expires_at: row.get(6)?,
        disappear_after: row.get(7)?,
    })
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
