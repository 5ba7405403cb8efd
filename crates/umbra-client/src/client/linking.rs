//! Linking a new device to this account, from either side.
//!
//! The existing device opens a rendezvous at the server and shows a link
//! string ([`Client::start_link`], then [`PendingLink::finish`]); the new
//! device, given the string, joins ([`Client::join_link`]). What they say
//! and how it is sealed is `crate::pairing`. In short: the new device
//! offers its fresh device key; the existing one answers with the log
//! entry adding it (signed by the account key and itself); the new device
//! adds its own signature; the existing one appends the entry and sends
//! the bundle (the account key, contacts, settings, conversations and the
//! unexpired history); the new device creates its store, logs in as
//! itself and says it is ready; the existing one adds it to every
//! conversation.
//!
//! Slots are read without being consumed, so a new device whose
//! connection drops reconnects and carries on where it was; either side
//! that waits longer than the rendezvous lives gives up with a clear error.

use std::path::Path;
use std::time::Duration;

use rusqlite::params;
use tracing::{debug, info, warn};
use umbra_mls::{DeviceCertificate, DeviceSigner};
use umbra_proto::rendezvous::RENDEZVOUS_TTL_SECS;
use umbra_proto::{
    AccountId, DeviceChange, DeviceEntry, DeviceId, ErrorCode, IdentityKey, LinkString, Reply,
    Request, Signature,
};
use zeroize::Zeroizing;

use crate::error::{ClientError, Result};
use crate::link::Link;
use crate::pairing::{self, Answer, Bundle, Joined, Manifest, Offer, Sealer, Table, Value};
use crate::secret::Passphrase;
use crate::store;

use super::{Client, ClientOptions};

/// How often a waiting side looks at the rendezvous.
const POLL: Duration = Duration::from_millis(200);
/// How many times a request answered `SERVER_BUSY` is asked again.
const BUSY_TRIES: u32 = 14;

/// How long the existing device waits for the new one to read the last
/// slot before it closes the rendezvous.
const DONE_PATIENCE: Duration = Duration::from_secs(30);

/// The tables a new device gets a copy of, in the order they are written.
const COPIED: &[&str] = &[
    "contacts",
    "settings",
    "conversations",
    "messages",
    "device_log",
];

/// Messages' files: each message's attachment row, named by the message's
/// ID, group and sender (row IDs differ between devices). The new device
/// fetches the files from the server while they are there.
const MESSAGE_FILES: &str = "message_files";

/// The vault's table: copied only when the user chooses
/// ([`PendingLink::with_vault`]).
const VAULT: &str = "vault";

/// A link this device offered and is waiting to complete.
pub struct PendingLink {
    client: Client,
    link: LinkString,
    sealer: Sealer,
    expires_at: u64,
    vault: bool,
}

impl std::fmt::Debug for PendingLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingLink")
            .field("expires_at", &self.expires_at)
            .field("vault", &self.vault)
            .finish_non_exhaustive()
    }
}

/// A device added by [`PendingLink::finish`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkedDevice {
    pub device: DeviceId,
    pub name: String,
    /// Conversations it was added to, and those it could not be (it has
    /// their history, and can be added again from any device).
    pub conversations: usize,
    pub failed: usize,
}

/// What a new device got by [`Client::join_link`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinedAccount {
    pub account: AccountId,
    pub device: DeviceId,
    pub contacts: usize,
    pub messages: usize,
    /// Vault notes, if the existing device chose to send the vault.
    pub vault_notes: usize,
    /// Conversations the existing device added this one to, once it said
    /// so (None if it did not within the rendezvous's life).
    pub conversations: Option<usize>,
}

impl PendingLink {
    /// The string to show the new device (as text or a QR code).
    pub fn link_string(&self) -> &LinkString {
        &self.link
    }

    /// Unix seconds after which the link no longer works.
    pub fn expires_at(&self) -> u64 {
        self.expires_at
    }

    /// Sends the vault's notes to the new device too. Without it the
    /// vault stays on this device alone.
    pub fn with_vault(mut self) -> Self {
        self.vault = true;
        self
    }

    /// Waits for the new device and links it: appends the log entry that
    /// adds it, hands it the account's keys, contacts and history, and
    /// adds it to every conversation. Fails if it does not come before the
    /// link expires.
    pub async fn finish(self) -> Result<LinkedDevice> {
        let result = self.run().await;
        // Whatever happened, the rendezvous is no longer needed.
        let _ = ask_at_rendezvous(
            &self.client,
            Request::CloseRendezvous {
                rendezvous: self.link.rendezvous,
            },
        )
        .await;
        result
    }

    async fn run(&self) -> Result<LinkedDevice> {
        let client = &self.client;
        let offer: Offer = self.wait_for(pairing::OFFER).await?;
        let key = IdentityKey::from_slice(
            &hex::decode(&offer.device_key)
                .map_err(|_| ClientError::LinkFailed("the new device's key is not hex".into()))?,
        )?;
        if !umbra_mls::name_allowed(&offer.name) {
            self.put(
                &Answer::Refused("that device name is not allowed".into()),
                pairing::ANSWER,
            )
            .await?;
            return Err(ClientError::LinkFailed(
                "the new device's name is too long or holds control characters".into(),
            ));
        }
        let account = client.account().clone();
        let log = client
            .verified_device_log(&account, client.identity_key())
            .await?;
        let mut entry = log.add_entry_for(
            client.account_signer(),
            (client.device(), &client.inner.signer),
            key,
            &offer.name,
            client.now(),
        );
        let device = entry.device();
        // Everything that could stop the link is settled before the entry
        // is offered: once it is appended, the device counts.
        let (bundle, mark) = match client.bundle(device, offer.store_version, self.vault) {
            Ok(bundle) => bundle,
            Err(error) => {
                self.put(&Answer::Refused(error.to_string()), pairing::ANSWER)
                    .await?;
                return Err(error);
            }
        };
        let bytes = Zeroizing::new(
            serde_json::to_vec(&bundle).map_err(|e| ClientError::Store(e.to_string()))?,
        );
        drop(bundle);
        let (chunks, digest) = match pairing::chunks(&bytes) {
            Ok(chunks) => chunks,
            Err(error) => {
                self.put(&Answer::Refused(error.to_string()), pairing::ANSWER)
                    .await?;
                return Err(error);
            }
        };
        self.put(
            &Answer::Entry {
                account: account.to_string(),
                entry: hex::encode(entry.encode()),
            },
            pairing::ANSWER,
        )
        .await?;
        let signature: String = self.wait_for(pairing::SIGNATURE).await?;
        entry.added_signature = Some(Signature::from_slice(&hex::decode(signature).map_err(
            |_| ClientError::LinkFailed("the new device's signature is not hex".into()),
        )?)?);
        // Checked here first: a wrong signature is the new device's
        // fault, not a reason to bother the server.
        if let Err(error) = log.clone().append(entry.clone(), None) {
            let why = format!("the new device's signature does not verify ({error})");
            self.put(&Manifest::Refused(why.clone()), pairing::MANIFEST)
                .await?;
            return Err(ClientError::LinkFailed(why));
        }
        if let Err(error) = client
            .request(Request::AppendDeviceEntry {
                entry: entry.clone(),
            })
            .await
        {
            let why = match error.server_code() {
                Some(ErrorCode::QuotaExceeded) => format!("the server refused: {error}"),
                _ => error.to_string(),
            };
            self.put(&Manifest::Refused(why), pairing::MANIFEST).await?;
            return Err(error);
        }
        info!(%device, "device added to this account's log");
        // Keeps the new entry, verified, as part of this account's log.
        client
            .verified_device_log(&account, client.identity_key())
            .await?;
        for (n, chunk) in chunks.iter().enumerate() {
            self.put_bytes(pairing::FIRST_CHUNK + n as u32, chunk)
                .await?;
        }
        self.put(
            &Manifest::Bundle {
                chunks: chunks.len() as u32,
                sha256: hex::encode(digest),
            },
            pairing::MANIFEST,
        )
        .await?;
        debug!(
            bytes = bytes.len(),
            chunks = chunks.len(),
            "link bundle sent"
        );
        let () = self.wait_for(pairing::READY).await?;
        let (conversations, failed) = client.add_own_device(device, key).await;
        // What arrived here since the history was taken, sent before the
        // new device was in the conversations (after, it gets its own
        // copies; it keeps one of each).
        client.settle().await;
        let (messages, message_files) = client.messages_after(mark)?;
        self.put(
            &Joined {
                conversations,
                failed,
                messages: Some(messages),
                message_files: Some(message_files),
            },
            pairing::JOINED,
        )
        .await?;
        // The rendezvous is closed once the new device has read that (or
        // has had a while to).
        let read = tokio::time::timeout(DONE_PATIENCE, self.wait_for::<()>(pairing::DONE)).await;
        if !matches!(read, Ok(Ok(()))) {
            debug!("the new device did not confirm the end of linking; closing anyway");
        }
        Ok(LinkedDevice {
            device,
            name: offer.name,
            conversations,
            failed,
        })
    }

    async fn put<T: serde::Serialize>(&self, value: &T, slot: u32) -> Result<()> {
        let bytes = Zeroizing::new(
            serde_json::to_vec(value).map_err(|e| ClientError::Store(e.to_string()))?,
        );
        self.put_bytes(slot, &bytes).await
    }

    async fn put_bytes(&self, slot: u32, bytes: &[u8]) -> Result<()> {
        put_through(
            &self.client,
            &self.sealer,
            self.link.rendezvous,
            slot,
            bytes,
        )
        .await
    }

    async fn wait_for<T: serde::de::DeserializeOwned>(&self, slot: u32) -> Result<T> {
        loop {
            if self.client.now() >= self.expires_at {
                return Err(ClientError::LinkFailed(
                    "the new device did not come in time; the link expired (start again)".into(),
                ));
            }
            let got = get_through(&self.client, &self.sealer, self.link.rendezvous, slot).await?;
            if let Some(bytes) = got {
                return parse(&bytes);
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

/// The rows of table `name` that `filter` (SQL after `FROM name`, with
/// `?1` the time now) selects, every column but a message's row ID.
fn copy_table(db: &rusqlite::Connection, name: &str, filter: &str, now: u64) -> Result<Table> {
    let columns: Vec<String> = db
        .prepare(&format!("SELECT name FROM pragma_table_info('{name}')"))?
        .query_map([], |row| row.get(0))?
        .collect::<rusqlite::Result<Vec<String>>>()?
        .into_iter()
        // Row IDs are the new device's to give.
        .filter(|column| !(name == "messages" && column == "id"))
        .collect();
    let sql = format!("SELECT {} FROM {name} {filter}", columns.join(", "));
    let mut statement = db.prepare(&sql)?;
    let rows = statement
        .query_map([now], |row| {
            (0..columns.len())
                .map(|i| {
                    Ok(match row.get_ref(i)? {
                        rusqlite::types::ValueRef::Null => Value::Null,
                        rusqlite::types::ValueRef::Integer(v) => Value::Integer(v),
                        rusqlite::types::ValueRef::Real(v) => Value::Real(v),
                        rusqlite::types::ValueRef::Text(v) => {
                            Value::Text(String::from_utf8_lossy(v).into_owned())
                        }
                        rusqlite::types::ValueRef::Blob(v) => Value::Blob(hex::encode(v)),
                    })
                })
                .collect::<rusqlite::Result<Vec<Value>>>()
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(Table {
        name: name.to_owned(),
        columns,
        rows,
    })
}

fn parse<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes)
        .map_err(|e| ClientError::LinkFailed(format!("a malformed link payload: {e}")))
}

impl Client {
    /// Opens a link for adding a device to this account. Show
    /// [`PendingLink::link_string`] to the new device, then
    /// [`PendingLink::finish`].
    pub async fn start_link(&self) -> Result<PendingLink> {
        let Reply::RendezvousOpened {
            rendezvous,
            expires_at,
        } = self.request(Request::OpenRendezvous).await?
        else {
            return Err(ClientError::Invalid(
                "unexpected reply to OpenRendezvous".into(),
            ));
        };
        let mut secret = [0u8; 32];
        getrandom::getrandom(&mut secret).map_err(|e| ClientError::Store(e.to_string()))?;
        let link = LinkString {
            address: self.inner.server_address.clone(),
            pin: self.inner.server_pin,
            rendezvous,
            secret,
        };
        // The server's clock set the expiry; this device waits by its own,
        // for the rendezvous's life at most.
        let expires_at =
            self.now() + RENDEZVOUS_TTL_SECS.min(expires_at.saturating_sub(self.now()));
        Ok(PendingLink {
            sealer: Sealer::new(&link.secret, rendezvous),
            client: self.clone(),
            link,
            expires_at,
            vault: false,
        })
    }

    /// What a new device (number `device`, whose store is at version
    /// `theirs`) gets: the account key and the
    /// rows of [`COPIED`] (messages only while they have not expired, and
    /// conversations not yet active there: they become active as this
    /// device adds it to each), with `vault` the vault's notes, and the
    /// last message ID it holds.
    fn bundle(&self, device: DeviceId, theirs: u32, vault: bool) -> Result<(Bundle, i64)> {
        let db = self.db();
        let (wipe, expires, version): (Option<Vec<u8>>, u64, u32) = db.query_row(
            "SELECT wipe_public_key, subscription_expires_at, (SELECT user_version FROM pragma_user_version)
             FROM device",
            [],
            |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
        )?;
        if version != theirs {
            return Err(ClientError::LinkFailed(format!(
                "the two devices run different versions of Umbra (store version {version} here, \
                 {theirs} on the new device); update both, then link again"
            )));
        }
        let mark: i64 = db.query_row("SELECT COALESCE(MAX(id), 0) FROM messages", [], |row| {
            row.get(0)
        })?;
        let mut tables = Vec::new();
        for name in COPIED {
            let filter = match *name {
                "messages" => "WHERE expires_at IS NULL OR expires_at > ?1 ORDER BY id",
                _ => "WHERE ?1 IS NOT NULL",
            };
            tables.push(copy_table(&db, name, filter, self.now())?);
        }
        tables.push(copy_message_files(&db, self.now(), 0)?);
        if vault {
            tables.push(copy_table(&db, VAULT, "WHERE ?1 IS NOT NULL", self.now())?);
        }
        let bundle = Bundle {
            store_version: version,
            account: self.inner.account.to_string(),
            device: device.0,
            account_secret: hex::encode(self.account_signer().secret_bytes()),
            wipe_public_key: wipe.map(hex::encode),
            subscription_expires_at: expires,
            tables,
        };
        Ok((bundle, mark))
    }

    /// Adds this account's device `device` (key `key`) to every active
    /// conversation: (added, failed).
    async fn add_own_device(&self, device: DeviceId, key: IdentityKey) -> (usize, usize) {
        let groups: Vec<Vec<u8>> = match self.active_groups() {
            Ok(groups) => groups,
            Err(error) => {
                warn!(%error, "listing conversations to add the new device to");
                return (0, 0);
            }
        };
        let (mut added, mut failed) = (0, 0);
        for group_id in groups {
            let result = async {
                let suite = self.group_suite(&group_id)?;
                let package = self.own_device_package(device, key, suite).await?;
                self.add_to_group(&group_id, vec![(self.inner.account.clone(), package)])
                    .await
            }
            .await;
            match result {
                Ok(()) => added += 1,
                Err(error) => {
                    warn!(%error, "adding the new device to a conversation");
                    failed += 1;
                }
            }
        }
        (added, failed)
    }

    /// Waits (briefly, five seconds at most) until this device has applied
    /// what the server pushed to it so far.
    async fn settle(&self) {
        let Ok(link) = self.link() else { return };
        let _ = link.request(Request::Ping).await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while link.backlog() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Messages (not lines about a group) after row `mark` that have not
    /// expired, the newest that fit one rendezvous slot.
    /// The messages that came after `mark`, and their files: the newest
    /// that fit one rendezvous slot (half of it for the messages; a
    /// quarter for the files, thumbnails left out first).
    fn messages_after(&self, mark: i64) -> Result<(Table, Table)> {
        let db = self.db();
        let filter = format!(
            "WHERE id > {mark} AND direction != 'system' \
             AND (expires_at IS NULL OR expires_at > ?1) ORDER BY id"
        );
        let mut table = copy_table(&db, "messages", &filter, self.now())?;
        let size = |table: &Table| serde_json::to_vec(table).map_or(0, |bytes| bytes.len());
        let budget = pairing::CHUNK_BYTES / 2;
        while size(&table) > budget && !table.rows.is_empty() {
            let drop = table.rows.len().div_ceil(4);
            table.rows.drain(..drop);
        }
        let mut files = copy_message_files(&db, self.now(), mark)?;
        let budget = pairing::CHUNK_BYTES / 4;
        if size(&files) > budget {
            for row in &mut files.rows {
                if let Some(thumbnail) = row.last_mut() {
                    *thumbnail = Value::Null;
                }
            }
        }
        while size(&files) > budget && !files.rows.is_empty() {
            let drop = files.rows.len().div_ceil(4);
            files.rows.drain(..drop);
        }
        Ok((table, files))
    }

    pub(super) fn active_groups(&self) -> Result<Vec<Vec<u8>>> {
        let db = self.db();
        let mut statement =
            db.prepare("SELECT group_id FROM conversations WHERE active = 1 ORDER BY created_at")?;
        let groups = statement
            .query_map([], |row| row.get(0))?
            .collect::<rusqlite::Result<Vec<Vec<u8>>>>()?;
        Ok(groups)
    }

    /// One KeyPackage of this account's device `device`, which must be
    /// under `key` and carry its certificate.
    async fn own_device_package(
        &self,
        device: DeviceId,
        key: IdentityKey,
        suite: umbra_mls::Suite,
    ) -> Result<Vec<u8>> {
        let account = self.inner.account.clone();
        let Reply::KeyPackage { key_package, .. } = self
            .request(Request::FetchKeyPackage {
                account_id: account.clone(),
                device,
                suites: vec![suite.code()],
            })
            .await?
        else {
            return Err(ClientError::Invalid(
                "unexpected reply to FetchKeyPackage".into(),
            ));
        };
        let valid = umbra_mls::validate_key_package(&key_package)?;
        self.check_suite(&account, &valid, &[suite])?;
        let genuine = valid.account == account
            && valid.identity_key == key
            && valid.certificate.as_ref().is_some_and(|certificate| {
                certificate.account_key == self.identity_key()
                    && certificate.entry.device() == device
                    && certificate.certifies(&account, &key)
            });
        if !genuine {
            return Err(ClientError::ForeignKeyPackage(account));
        }
        Ok(key_package)
    }

    /// Becomes a new device of the account whose existing device shows
    /// `link`: creates the store in `home` under `passphrase`, named
    /// `name` in the account's device list, and connects. Returns once
    /// the existing device has added it to its conversations (or the
    /// rendezvous expired meanwhile: the device is linked either way).
    pub async fn join_link(
        home: &Path,
        passphrase: &Passphrase,
        link: &LinkString,
        name: &str,
        options: ClientOptions,
    ) -> Result<(Client, JoinedAccount)> {
        if store::exists(home) {
            return Err(ClientError::AlreadyActivated(home.display().to_string()));
        }
        if !umbra_mls::name_allowed(name) {
            return Err(ClientError::Invalid(format!(
                "a device name has at most {} bytes and no control characters",
                umbra_proto::devices::MAX_DEVICE_NAME_BYTES
            )));
        }
        let store_version = store::VERSION;
        let started = options.clock.now();
        let deadline = started + RENDEZVOUS_TTL_SECS;
        let mut secret = Zeroizing::new([0u8; 32]);
        getrandom::getrandom(secret.as_mut()).map_err(|e| ClientError::Store(e.to_string()))?;
        let signer = DeviceSigner::from_secret(&secret);
        let mut meeting = Meeting {
            link,
            sealer: Sealer::new(&link.secret, link.rendezvous),
            connection: None,
            clock: options.clock.clone(),
            deadline,
        };
        meeting
            .put(
                pairing::OFFER,
                &Offer {
                    device_key: hex::encode(signer.identity_key().as_bytes()),
                    name: name.to_owned(),
                    store_version,
                },
            )
            .await?;
        let (account, mut entry) = match meeting.wait_for::<Answer>(pairing::ANSWER).await? {
            Answer::Entry { account, entry } => (
                AccountId::parse(&account)?,
                DeviceEntry::decode(
                    &hex::decode(entry)
                        .map_err(|_| ClientError::LinkFailed("the entry is not hex".into()))?,
                )?,
            ),
            Answer::Refused(why) => return Err(ClientError::LinkFailed(why)),
        };
        // The entry must add this device, under this name: nothing else is
        // signed here.
        let adds_me = matches!(&entry.change, DeviceChange::Add { key, name: n, .. }
            if *key == signer.identity_key() && n == name);
        if !adds_me {
            return Err(ClientError::LinkFailed(
                "the existing device answered with an entry that does not add this device".into(),
            ));
        }
        let signature = signer.sign_payload(&entry.signed_bytes(&account));
        meeting
            .put(pairing::SIGNATURE, &hex::encode(signature.as_bytes()))
            .await?;
        entry.added_signature = Some(signature);
        let bundle: Bundle = match meeting.wait_for::<Manifest>(pairing::MANIFEST).await? {
            Manifest::Refused(why) => return Err(ClientError::LinkFailed(why)),
            Manifest::Bundle { chunks, sha256 } => {
                if chunks > pairing::MAX_CHUNKS {
                    return Err(ClientError::LinkFailed(
                        "the bundle has too many chunks".into(),
                    ));
                }
                let mut bytes = Zeroizing::new(Vec::new());
                for n in 0..chunks {
                    let chunk = meeting
                        .get(pairing::FIRST_CHUNK + n)
                        .await?
                        .ok_or_else(|| {
                            ClientError::LinkFailed("a chunk of the bundle is missing".into())
                        })?;
                    bytes.extend_from_slice(&chunk);
                }
                let digest: [u8; 32] = sha2::Digest::finalize(
                    <sha2::Sha256 as sha2::Digest>::new_with_prefix(bytes.as_slice()),
                )
                .into();
                if hex::encode(digest) != sha256 {
                    return Err(ClientError::LinkFailed(
                        "the bundle does not match its digest".into(),
                    ));
                }
                parse(&bytes)?
            }
        };
        let account_signer = {
            let secret = Zeroizing::new(
                hex::decode(&bundle.account_secret)
                    .map_err(|_| ClientError::LinkFailed("the account key is not hex".into()))?,
            );
            super::signer_from(secret.to_vec())?
        };
        let certificate = DeviceCertificate {
            account_key: account_signer.identity_key(),
            entry: entry.clone(),
        };
        // The entry, now signed three times, must bind this device to the
        // account whose key came with it, as the number it was given.
        if bundle.account != account.as_str()
            || bundle.device != entry.device().0
            || !certificate.certifies(&account, &signer.identity_key())
        {
            return Err(ClientError::LinkFailed(
                "the account key sent does not sign the entry that adds this device".into(),
            ));
        }
        let connection = store::create(home, passphrase, options.kdf)?;
        let version: u32 =
            connection.query_row("SELECT user_version FROM pragma_user_version", [], |row| {
                row.get(0)
            })?;
        if version != bundle.store_version {
            drop(connection);
            let _ = store::shred(home);
            return Err(ClientError::LinkFailed(format!(
                "the existing device runs another version of Umbra (store version {} here, {} there); \
                 update both",
                version, bundle.store_version
            )));
        }
        let (contacts, messages, vault_notes) = match fill(
            &connection,
            &bundle,
            link,
            &signer,
            &account_signer,
            &certificate,
            started,
        ) {
            Ok(counts) => counts,
            Err(error) => {
                drop(connection);
                let _ = store::shred(home);
                return Err(error);
            }
        };
        info!(account = %account, device = %entry.device(), "device linked");
        let client = Client::from_parts(home, connection, options)?;
        // Its deliveries wait until the messages the existing device got
        // meanwhile are in, so that each conversation reads in order.
        client.inner.held.send_replace(true);
        let held = Held(client.clone());
        client.start_expiry_ticker();
        client.connect().await?;
        // Verifies this account's log (from the entries the existing device
        // verified), which must now list this device, under its key.
        let listed = client.devices().await?;
        let me = hex::encode(client.device_key().as_bytes());
        if !listed
            .iter()
            .any(|d| d.this_device && d.key == me && d.removed_at.is_none())
        {
            return Err(ClientError::LinkFailed(
                "the server's device list for this account does not list this device".into(),
            ));
        }
        put_through(
            &client,
            &meeting.sealer,
            link.rendezvous,
            pairing::READY,
            b"null",
        )
        .await?;
        meeting.connection = None;
        let conversations = loop {
            if client.now() >= deadline {
                break None;
            }
            match get_through(&client, &meeting.sealer, link.rendezvous, pairing::JOINED).await {
                Ok(Some(bytes)) => {
                    let joined: Joined = parse(&bytes)?;
                    if let Some(table) = &joined.messages {
                        // Messages only: nothing else may come this way.
                        if table.name != "messages" {
                            return Err(ClientError::LinkFailed(format!(
                                "the catch-up holds an unexpected table ({})",
                                table.name
                            )));
                        }
                        let mut db = client.db();
                        let tx = db.transaction()?;
                        let taken = insert_rows(&tx, table, true)?;
                        // Their files, to fetch as any.
                        let files = match &joined.message_files {
                            Some(files) if files.name != MESSAGE_FILES => {
                                return Err(ClientError::LinkFailed(format!(
                                    "the catch-up holds an unexpected table ({})",
                                    files.name
                                )));
                            }
                            Some(files) => insert_message_files(&tx, files)?,
                            None => 0,
                        };
                        tx.commit()?;
                        debug!(taken, files, "messages that came while linking");
                    }
                    let _ = put_through(
                        &client,
                        &meeting.sealer,
                        link.rendezvous,
                        pairing::DONE,
                        b"null",
                    )
                    .await;
                    break Some(joined.conversations);
                }
                Ok(None) => tokio::time::sleep(POLL).await,
                // Closed or expired: the existing device is done or gone.
                Err(error) if error.server_code() == Some(ErrorCode::UnknownRendezvous) => {
                    break None;
                }
                Err(error) => return Err(error),
            }
        };
        drop(held);
        let joined = JoinedAccount {
            account,
            device: entry.device(),
            contacts,
            messages,
            vault_notes,
            conversations,
        };
        Ok((client, joined))
    }
}

/// Writes a linked device's store in one transaction (all of it or none
/// of it): its device row, then the copied rows. Returns how many contacts,
/// messages and vault notes it got.
fn fill(
    connection: &rusqlite::Connection,
    bundle: &Bundle,
    link: &LinkString,
    signer: &DeviceSigner,
    account_signer: &DeviceSigner,
    certificate: &DeviceCertificate,
    now: u64,
) -> Result<(usize, usize, usize)> {
    let tx = connection.unchecked_transaction()?;
    let connection = &tx;
    let wipe = bundle
        .wipe_public_key
        .as_deref()
        .map(hex::decode)
        .transpose()
        .map_err(|_| ClientError::LinkFailed("the wipe key is not hex".into()))?;
    connection.execute(
        "INSERT INTO device (singleton, account_id, identity_secret, server_address, server_pin,
                             subscription_expires_at, created_at, wipe_public_key,
                             device_number, account_secret, certificate)
         VALUES (1, ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        params![
            bundle.account,
            &signer.secret_bytes()[..],
            link.address,
            link.pin.to_hex(),
            bundle.subscription_expires_at,
            now,
            wipe,
            bundle.device,
            &account_signer.secret_bytes()[..],
            certificate.encode(),
        ],
    )?;
    let (mut contacts, mut messages, mut notes) = (0, 0, 0);
    for table in &bundle.tables {
        if table.name == MESSAGE_FILES {
            insert_message_files(connection, table)?;
            continue;
        }
        insert_rows(connection, table, false)?;
        match table.name.as_str() {
            "contacts" => contacts = table.rows.len(),
            "messages" => messages = table.rows.len(),
            VAULT => notes = table.rows.len(),
            _ => {}
        }
    }
    // Not a member anywhere yet: each conversation becomes active as the
    // existing device adds this one.
    connection.execute("UPDATE conversations SET active = 0", [])?;
    tx.commit()?;
    Ok((contacts, messages, notes))
}

/// The files of the unexpired messages [`copy_table`] copies (those after
/// message `after`).
fn copy_message_files(db: &rusqlite::Connection, now: u64, after: i64) -> Result<Table> {
    let columns = [
        "uid",
        "group_id",
        "sender",
        "blob_id",
        "file_key",
        "digest",
        "size",
        "mime_type",
        "name",
        "duration_ms",
        "thumbnail",
        "waveform",
    ];
    let mut statement = db.prepare(
        "SELECT m.uid, m.group_id, m.sender, a.blob_id, a.file_key, a.digest, a.size,
                a.mime_type, a.name, a.duration_ms, a.thumbnail, a.waveform
         FROM attachments a JOIN messages m ON m.id = a.message_id
         WHERE m.uid IS NOT NULL AND (m.expires_at IS NULL OR m.expires_at > ?1)
           AND m.id > ?2
         ORDER BY m.id",
    )?;
    let rows = statement
        .query_map(rusqlite::params![now, after], |row| {
            Ok(vec![
                Value::Blob(hex::encode(row.get::<_, Vec<u8>>(0)?)),
                Value::Blob(hex::encode(row.get::<_, Vec<u8>>(1)?)),
                Value::Text(row.get(2)?),
                Value::Blob(hex::encode(row.get::<_, Vec<u8>>(3)?)),
                Value::Blob(hex::encode(row.get::<_, Vec<u8>>(4)?)),
                Value::Blob(hex::encode(row.get::<_, Vec<u8>>(5)?)),
                Value::Integer(row.get(6)?),
                Value::Text(row.get(7)?),
                Value::Text(row.get(8)?),
                Value::Integer(row.get(9)?),
                row.get::<_, Option<Vec<u8>>>(10)?
                    .map_or(Value::Null, |bytes| Value::Blob(hex::encode(bytes))),
                row.get::<_, Option<Vec<u8>>>(11)?
                    .map_or(Value::Null, |bytes| Value::Blob(hex::encode(bytes))),
            ])
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(Table {
        name: MESSAGE_FILES.into(),
        columns: columns.iter().map(|c| (*c).to_owned()).collect(),
        rows,
    })
}

/// Records the copied messages' files as there to fetch.
fn insert_message_files(tx: &rusqlite::Transaction<'_>, table: &Table) -> Result<usize> {
    let bad = || ClientError::LinkFailed("the bundle's message files are malformed".into());
    let mut written = 0;
    for row in &table.rows {
        let mut values = row.iter().map(sql_value).collect::<Result<Vec<_>>>()?;
        // (A device from before voice notes sends no waveform.)
        if values.len() == 11 {
            values.push(rusqlite::types::Value::Null);
        }
        let [
            uid,
            group,
            sender,
            blob,
            key,
            digest,
            size,
            mime,
            name,
            duration,
            thumbnail,
            waveform,
        ] = values.as_slice()
        else {
            return Err(bad());
        };
        let fits = |value: &rusqlite::types::Value, len: usize| matches!(value, rusqlite::types::Value::Blob(bytes) if bytes.len() == len);
        let size_ok = matches!(size, rusqlite::types::Value::Integer(n)
            if u64::try_from(*n).is_ok_and(|n| n <= umbra_proto::content::MAX_ATTACHMENT_SIZE));
        let thumbnail_ok = match thumbnail {
            rusqlite::types::Value::Null => true,
            rusqlite::types::Value::Blob(bytes) => {
                bytes.len() <= umbra_proto::content::MAX_THUMBNAIL_BYTES
            }
            _ => false,
        };
        let waveform_ok = match waveform {
            rusqlite::types::Value::Null => true,
            rusqlite::types::Value::Blob(bytes) => {
                bytes.len() <= umbra_proto::content::MAX_WAVEFORM_LEVELS
            }
            _ => false,
        };
        let text_ok = |value: &rusqlite::types::Value, max: usize| matches!(value, rusqlite::types::Value::Text(text) if text.len() <= max);
        let described = text_ok(mime, umbra_proto::content::MAX_MIME_TYPE_BYTES)
            && text_ok(name, umbra_proto::content::MAX_FILE_NAME_BYTES)
            && matches!(duration, rusqlite::types::Value::Integer(n) if u32::try_from(*n).is_ok());
        if !(fits(blob, 16)
            && fits(key, 32)
            && fits(digest, 32)
            && size_ok
            && thumbnail_ok
            && waveform_ok
            && described)
        {
            return Err(bad());
        }
        written += tx
            .prepare_cached(
                "INSERT OR IGNORE INTO attachments (message_id, blob_id, file_key, digest, size,
                                                    mime_type, name, duration_ms, thumbnail,
                                                    waveform, state)
                 SELECT id, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, 'available' FROM messages
                 WHERE uid = ?1 AND group_id = ?2 AND sender = ?3 ORDER BY id LIMIT 1",
            )?
            .execute(rusqlite::params![
                uid, group, sender, blob, key, digest, size, mime, name, duration, thumbnail,
                waveform
            ])?;
    }
    Ok(written)
}

/// A copied value as SQLite takes it (blobs travel as hex).
fn sql_value(value: &Value) -> Result<rusqlite::types::Value> {
    Ok(match value {
        Value::Null => rusqlite::types::Value::Null,
        Value::Integer(v) => rusqlite::types::Value::Integer(*v),
        Value::Real(v) => rusqlite::types::Value::Real(*v),
        Value::Text(v) => rusqlite::types::Value::Text(v.clone()),
        Value::Blob(v) => rusqlite::types::Value::Blob(
            hex::decode(v)
                .map_err(|_| ClientError::LinkFailed("a copied value is not hex".into()))?,
        ),
    })
}

/// Writes a copied table's rows; with `new_only`, a message whose ID
/// (`uid`) is already here is left out. Returns how many were written.
fn insert_rows(tx: &rusqlite::Transaction<'_>, table: &Table, new_only: bool) -> Result<usize> {
    if !(COPIED.contains(&table.name.as_str()) || table.name == VAULT)
        || table
            .columns
            .iter()
            .any(|c| c.is_empty() || !c.chars().all(|ch| ch.is_ascii_lowercase() || ch == '_'))
    {
        return Err(ClientError::LinkFailed(format!(
            "the bundle holds an unexpected table or column ({})",
            table.name
        )));
    }
    let placeholders: Vec<String> = (1..=table.columns.len()).map(|i| format!("?{i}")).collect();
    let sql = format!(
        "INSERT OR REPLACE INTO {} ({}) VALUES ({})",
        table.name,
        table.columns.join(", "),
        placeholders.join(", ")
    );
    let mut statement = tx.prepare(&sql)?;
    let column = |name: &str| table.columns.iter().position(|c| c == name);
    let key = [
        column("uid"),
        column("group_id"),
        column("sender"),
        column("body"),
    ];
    let mut written = 0;
    for row in &table.rows {
        let values = row.iter().map(sql_value).collect::<Result<Vec<_>>>()?;
        // A message already here (the same ID, group, sender and text).
        if new_only
            && let [Some(uid), Some(group), Some(sender), Some(body)] =
                key.map(|i| i.and_then(|i| values.get(i)))
            && tx
                .prepare_cached(
                    "SELECT 1 FROM messages
                     WHERE uid = ?1 AND group_id = ?2 AND sender = ?3 AND body = ?4",
                )?
                .exists(rusqlite::params![uid, group, sender, body])?
        {
            continue;
        }
        statement.execute(rusqlite::params_from_iter(values))?;
        written += 1;
    }
    Ok(written)
}

/// Holds a linked device's deliveries until dropped (see `Inner::held`).
struct Held(Client);

impl Drop for Held {
    fn drop(&mut self) {
        self.0.inner.held.send_replace(false);
    }
}

/// The new device's side of the rendezvous, before it has an account: a
/// connection that does not log in (the server closes it after a few
/// requests or seconds, so it is opened again as needed).
struct Meeting<'a> {
    link: &'a LinkString,
    sealer: Sealer,
    connection: Option<Link>,
    clock: std::sync::Arc<dyn umbra_proto::clock::Clock>,
    deadline: u64,
}

impl Meeting<'_> {
    async fn request(&mut self, request: Request) -> Result<Reply> {
        let mut busy = 0u32;
        loop {
            if self.clock.now() >= self.deadline {
                return Err(ClientError::LinkFailed(
                    "the existing device did not answer in time; start again from it".into(),
                ));
            }
            let link = match self.connection.take().filter(Link::is_alive) {
                Some(link) => link,
                None => Link::connect(&self.link.address, self.link.pin).await?.0,
            };
            match link.request(request.clone()).await {
                Ok(reply) => {
                    self.connection = Some(link);
                    return Ok(reply);
                }
                // The server refused (the rendezvous, the slot, its limits):
                // asking again would not change its answer.
                Err(error)
                    if error.server_code().is_some_and(|code| {
                        !matches!(code, ErrorCode::NotAuthenticated | ErrorCode::ServerBusy)
                    }) =>
                {
                    return Err(error);
                }
                // Busy (its room for rendezvous full, or, in a cluster, the
                // node holding the rendezvous out of reach for a moment):
                // again, through the next node listed, after a growing
                // pause.
                Err(error) if error.server_code() == Some(ErrorCode::ServerBusy) => {
                    after_busy(&mut busy, error).await?;
                }
                // Closed for not logging in, or lost: a new connection.
                Err(error) => {
                    debug!(%error, "rendezvous connection dropped; reconnecting");
                    tokio::time::sleep(POLL).await;
                }
            }
        }
    }

    async fn put<T: serde::Serialize>(&mut self, slot: u32, value: &T) -> Result<()> {
        let plaintext = Zeroizing::new(
            serde_json::to_vec(value).map_err(|e| ClientError::Store(e.to_string()))?,
        );
        let payload = self.sealer.seal(slot, &plaintext)?;
        match self
            .request(Request::RendezvousPut {
                rendezvous: self.link.rendezvous,
                slot,
                payload,
            })
            .await
        {
            Ok(_) => Ok(()),
            // Written on an earlier connection whose answer was lost, or
            // by someone else who has the link: only the first is ours.
            Err(error) if error.server_code() == Some(ErrorCode::SlotTaken) => {
                match self.get(slot).await {
                    Ok(Some(written)) if *written == *plaintext => Ok(()),
                    _ => Err(someone_else()),
                }
            }
            Err(error) if error.server_code() == Some(ErrorCode::UnknownRendezvous) => {
                Err(expired())
            }
            Err(error) => Err(error),
        }
    }

    async fn get(&mut self, slot: u32) -> Result<Option<Zeroizing<Vec<u8>>>> {
        match self
            .request(Request::RendezvousGet {
                rendezvous: self.link.rendezvous,
                slot,
            })
            .await
        {
            Ok(Reply::RendezvousSlot { payload }) => payload
                .map(|sealed| self.sealer.open(slot, &sealed))
                .transpose(),
            Ok(_) => Err(ClientError::Invalid(
                "unexpected reply to RendezvousGet".into(),
            )),
            Err(error) if error.server_code() == Some(ErrorCode::UnknownRendezvous) => {
                Err(expired())
            }
            Err(error) => Err(error),
        }
    }

    async fn wait_for<T: serde::de::DeserializeOwned>(&mut self, slot: u32) -> Result<T> {
        loop {
            if let Some(bytes) = self.get(slot).await? {
                return parse(&bytes);
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

/// After a request was answered `SERVER_BUSY` (`busy` times in a row
/// before this one, counted here): waits a growing pause, 0.4 s doubling
/// up to 3.2 s (40 s to 2 min in all with the requests' own time), or
/// gives `error` back once [`BUSY_TRIES`] are spent.
async fn after_busy(busy: &mut u32, error: ClientError) -> Result<()> {
    *busy += 1;
    if *busy > BUSY_TRIES {
        return Err(error);
    }
    debug!(%error, "the server is busy; asking again");
    tokio::time::sleep(POLL * 2u32.pow((*busy).min(4))).await;
    Ok(())
}

/// Runs a rendezvous request through `client`'s session (either device,
/// once logged in), asking again while the server answers `SERVER_BUSY`:
/// its room for rendezvous full, or, in a cluster, the node holding the
/// rendezvous out of reach for a moment. A request answered busy may
/// have been run: [`put_through`] allows for that.
async fn ask_at_rendezvous(client: &Client, request: Request) -> Result<Reply> {
    let mut busy = 0u32;
    loop {
        match client.request(request.clone()).await {
            Err(error) if error.server_code() == Some(ErrorCode::ServerBusy) => {
                after_busy(&mut busy, error).await?;
            }
            other => return other,
        }
    }
}

/// Puts `plaintext`, sealed, in `slot` of `rendezvous` through `client`'s
/// session. A slot found written already is ours (written by an earlier
/// ask whose answer was lost) only if it holds the same.
async fn put_through(
    client: &Client,
    sealer: &Sealer,
    rendezvous: umbra_proto::RendezvousId,
    slot: u32,
    plaintext: &[u8],
) -> Result<()> {
    let payload = sealer.seal(slot, plaintext)?;
    let put = Request::RendezvousPut {
        rendezvous,
        slot,
        payload,
    };
    match ask_at_rendezvous(client, put).await {
        Ok(_) => Ok(()),
        Err(error) if error.server_code() == Some(ErrorCode::SlotTaken) => {
            match get_through(client, sealer, rendezvous, slot).await {
                Ok(Some(written)) if *written == *plaintext => Ok(()),
                _ => Err(someone_else()),
            }
        }
        Err(error) => Err(error),
    }
}

/// What `slot` of `rendezvous` holds, opened, through `client`'s session.
async fn get_through(
    client: &Client,
    sealer: &Sealer,
    rendezvous: umbra_proto::RendezvousId,
    slot: u32,
) -> Result<Option<Zeroizing<Vec<u8>>>> {
    match ask_at_rendezvous(client, Request::RendezvousGet { rendezvous, slot }).await? {
        Reply::RendezvousSlot { payload } => {
            payload.map(|sealed| sealer.open(slot, &sealed)).transpose()
        }
        _ => Err(ClientError::Invalid(
            "unexpected reply to RendezvousGet".into(),
        )),
    }
}

fn someone_else() -> ClientError {
    ClientError::LinkFailed(
        "someone else is using this link; start again from the existing device".into(),
    )
}

fn expired() -> ClientError {
    ClientError::LinkFailed(
        "the link is not (or no longer) open at the server: it expired, was used, or was \
         mistyped; start again from the existing device"
            .into(),
    )
}
