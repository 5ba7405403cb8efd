//! Conversations: creating groups, adding and removing members, renaming
//! and leaving, and reading conversations and their history.

use rusqlite::{Connection, OptionalExtension, params};
use tracing::{debug, warn};
use umbra_mls::{Group, Provider, Suite};
use umbra_proto::content::Body;
use umbra_proto::{
    AccountId, DeliveryKind, DeviceId, ErrorCode, GroupId, IdentityKey, Reply, Request,
};

use crate::error::{ClientError, Result};
use crate::types::{
    ContactState, Conversation, ConversationId, ConversationKind, Event, Message, Refusal,
};

use super::{Client, check_group_name, contact_state, load_group, message_row, pinned_key};

/// Most devices a new conversation starts with in the post-quantum suite:
/// the commit that adds them, its Welcome and GroupInfo share one frame
/// (1 MiB), at about 6.7 KB per post-quantum device (figures in
/// docs/benchmarks.md); more start classical.
const MAX_POST_QUANTUM_START: usize = 128;
/// Most devices a new conversation starts with at all (about 0.8 KB each in
/// the classical suite, more with device certificates).
const MAX_START: usize = 1000;

impl Client {
    pub(super) fn direct_conversation(&self, peer: &AccountId) -> Result<Option<ConversationId>> {
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

    /// KeyPackages for these accounts: a leaf's worth for each current
    /// device of each, paired with the account it is for, each of the
    /// first of `suites` its device has one of.
    pub(super) async fn fetch_key_packages(
        &self,
        accounts: &[AccountId],
        suites: &[Suite],
    ) -> Result<Vec<(AccountId, Vec<u8>)>> {
        let mut key_packages = Vec::with_capacity(accounts.len());
        for account in accounts {
            let state = contact_state(&self.db(), account)?;
            match state {
                Some(ContactState::Accepted) => {}
                None => return Err(ClientError::NotAContact(account.clone())),
                Some(_) => return Err(ClientError::NotAccepted(account.clone())),
            }
            // Device 1's first: its key is the account key, pinned below;
            // then the account's other devices', as its log lists them.
            let Reply::KeyPackage { key_package, .. } = self
                .request(Request::FetchKeyPackage {
                    account_id: account.clone(),
                    device: umbra_proto::DeviceId::FIRST,
                    suites: suite_codes(suites),
                })
                .await?
            else {
                return Err(ClientError::Invalid(
                    "unexpected reply to FetchKeyPackage".into(),
                ));
            };
            let valid = umbra_mls::validate_key_package(&key_package)?;
            self.check_suite(account, &valid, suites)?;
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
            // Device 1's package is signed with the account key itself and
            // carries no certificate (the server refuses one that does): one
            // that does is another device's, and its key is no account key
            // to pin.
            let mut events = Vec::new();
            let foreign = valid.certificate.is_some()
                || self.with_tx(|tx, _| match pinned_key(tx, account)? {
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
            self.emit_all(events);
            key_packages.push((account.clone(), key_package));
            for package in self
                .other_devices_packages(account, valid.identity_key, DeviceId::FIRST, suites)
                .await?
            {
                key_packages.push((account.clone(), package));
            }
        }
        Ok(key_packages)
    }

    /// One KeyPackage of each current device of `account` but `skip`, as
    /// the account's device log, verified under its account `key`, lists
    /// them: a group holds a leaf per device. Each package must be that
    /// device's (its key, and its certificate under `key` for its number,
    /// or for device 1 none); a device with none left is skipped (it can be
    /// added later).
    pub(super) async fn other_devices_packages(
        &self,
        account: &AccountId,
        key: IdentityKey,
        skip: DeviceId,
        suites: &[Suite],
    ) -> Result<Vec<Vec<u8>>> {
        let log = self.verified_device_log(account, key).await?;
        let mut packages = Vec::new();
        let others: Vec<(DeviceId, IdentityKey)> = log
            .current_devices()
            .filter(|device| device.id != skip)
            .map(|device| (device.id, device.key))
            .collect();
        for (device, device_key) in others {
            let reply = self
                .request(Request::FetchKeyPackage {
                    account_id: account.clone(),
                    device,
                    suites: suite_codes(suites),
                })
                .await;
            let key_package = match reply {
                Ok(Reply::KeyPackage { key_package, .. }) => key_package,
                Err(error)
                    if matches!(
                        error.server_code(),
                        Some(ErrorCode::NoKeyPackage | ErrorCode::UnknownDevice)
                    ) =>
                {
                    debug!(%account, %device, %error, "a device left out");
                    continue;
                }
                Err(error) => return Err(error),
                Ok(_) => {
                    return Err(ClientError::Invalid(
                        "unexpected reply to FetchKeyPackage".into(),
                    ));
                }
            };
            let valid = umbra_mls::validate_key_package(&key_package)?;
            self.check_suite(account, &valid, suites)?;
            let genuine = valid.account == *account
                && valid.identity_key == device_key
                && match valid.certificate.as_ref() {
                    None => device == DeviceId::FIRST && device_key == key,
                    Some(certificate) => {
                        certificate.account_key == key
                            && certificate.entry.device() == device
                            && certificate.certifies(account, &device_key)
                    }
                };
            if !genuine {
                warn!(%account, %device, "refusing a KeyPackage that is not that device's");
                self.emit(Event::Refused {
                    from: account.clone(),
                    reason: Refusal::KeyPackageUnderAnotherKey,
                });
                return Err(ClientError::ForeignKeyPackage(account.clone()));
            }
            packages.push(key_package);
        }
        Ok(packages)
    }

    /// KeyPackages of `suites` for a new conversation with `members`: each
    /// of their devices', and this account's other devices'.
    async fn packages_for_new(
        &self,
        members: &[AccountId],
        suites: &[Suite],
    ) -> Result<Vec<(AccountId, Vec<u8>)>> {
        let mut key_packages = self.fetch_key_packages(members, suites).await?;
        let own = self.inner.account.clone();
        for package in self
            .other_devices_packages(&own, self.identity_key(), self.inner.device, suites)
            .await?
        {
            key_packages.push((own.clone(), package));
        }
        Ok(key_packages)
    }

    /// A fetched package must be of a suite asked for: another is the
    /// server's doing.
    pub(super) fn check_suite(
        &self,
        account: &AccountId,
        valid: &umbra_mls::ValidKeyPackage,
        suites: &[Suite],
    ) -> Result<()> {
        if suites.contains(&valid.suite) {
            return Ok(());
        }
        warn!(%account, suite = %valid.suite, "a KeyPackage of a suite not asked for");
        self.emit(Event::ServerMisbehaved {
            what: format!(
                "it handed out a KeyPackage of {account} of {}, which was not asked for",
                valid.suite
            ),
        });
        Err(ClientError::WrongSuite(account.clone()))
    }

    /// The ciphersuite of this device's group `group_id`.
    pub(super) fn group_suite(&self, group_id: &[u8]) -> Result<Suite> {
        self.with_tx(|_, provider| {
            load_group(provider, group_id)?.suite().ok_or_else(|| {
                ClientError::Invalid("the conversation uses a suite Umbra no longer offers".into())
            })
        })
    }

    /// Creates a conversation with `members` (all accepted contacts): a
    /// direct one when `name` is None and there is one member.
    pub(super) async fn new_conversation(
        &self,
        name: Option<&str>,
        members: &[AccountId],
    ) -> Result<ConversationId> {
        // The preferred suite (post-quantum) when every device offers it
        // and the first commit can carry it; otherwise the classical one.
        // At least a device each: refused before any package is spent.
        if members.len() + 1 > MAX_START {
            return Err(ClientError::TooManyDevices {
                devices: members.len() + 1,
                limit: MAX_START,
            });
        }
        let mut offered = self.offered_suites();
        if members.len() + 1 > MAX_POST_QUANTUM_START {
            offered.retain(|suite| !suite.is_post_quantum());
        }
        let mut suite = offered[0];
        let mut key_packages = self.packages_for_new(members, &offered).await?;
        if suite != Suite::CLASSICAL {
            let mut classical_only = false;
            for (account, package) in &key_packages {
                let valid = umbra_mls::validate_key_package(package)?;
                if valid.suite == suite {
                    continue;
                }
                // A device that offers the suite keeps a package of it at
                // the server (a last-resort one at least).
                if valid.offers.contains(&suite) {
                    warn!(%account, "a classical KeyPackage of a device that offers post-quantum ones");
                    self.emit(Event::ServerMisbehaved {
                        what: format!(
                            "it handed out a classical KeyPackage of {account}, whose device \
                             offers post-quantum ones"
                        ),
                    });
                    return Err(ClientError::Downgraded(account.clone()));
                }
                classical_only = true;
            }
            // Fetched again, every device's (the packages handed out first
            // are spent: the server hands each out once).
            if classical_only || key_packages.len() + 1 > MAX_POST_QUANTUM_START {
                debug!(%suite, "a device offers no post-quantum KeyPackage, or too many devices: classical");
                suite = Suite::CLASSICAL;
                key_packages = self.packages_for_new(members, &[suite]).await?;
            }
        }
        if key_packages.len() + 1 > MAX_START {
            return Err(ClientError::TooManyDevices {
                devices: key_packages.len() + 1,
                limit: MAX_START,
            });
        }
        let config = umbra_mls::GroupConfig {
            suite,
            ..self.inner.options.group
        };
        let group_id = {
            let _ops = self.inner.ops.lock().await;
            let timer = self.default_disappearing()?;
            let group = self.with_tx(|_, provider| {
                Group::create_as_device(
                    provider,
                    &self.inner.signer,
                    &self.inner.account,
                    &config,
                    timer,
                    self.certificate(),
                )
                .map_err(ClientError::from)
            })?;
            let group_id = group.id();
            let (group_info, delivery_key) = self.with_tx(|_, provider| {
                Ok((
                    group.group_info(provider, &self.inner.signer)?,
                    group.delivery_key(provider)?.public(),
                ))
            })?;
            let registered = self
                .request(Request::CreateGroup {
                    group_id: GroupId::new(group_id.clone())?,
                    group_info,
                    delivery_key: Some(delivery_key),
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
        let conversation = ConversationId::from_group(&group_id);
        if let Err(error) = self.add_to_group(&group_id, key_packages).await {
            // A commit too large to send was dropped: so is the conversation
            // that nobody else could join.
            if matches!(error, ClientError::TooLarge { .. }) {
                self.with_tx(|tx, provider| {
                    tx.execute("DELETE FROM conversations WHERE group_id = ?1", [&group_id])?;
                    load_group(provider, &group_id)?.delete(provider)?;
                    Ok(())
                })?;
            }
            return Err(error);
        }
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

    pub(super) async fn add_to_group(
        &self,
        group_id: &[u8],
        key_packages: Vec<(AccountId, Vec<u8>)>,
    ) -> Result<()> {
        let signer = &self.inner.signer;
        let mut events = Vec::new();
        self.commit(group_id, |group, provider| {
            // Accounts already in the group keep the leaves they have; this
            // account's own devices are added where they have none.
            let present: Vec<AccountId> = group.accounts();
            let own_leaves: Vec<DeviceId> = group
                .members()
                .into_iter()
                .filter(|member| member.account == self.inner.account)
                .map(|member| member.device)
                .collect();
            let kps: Vec<Vec<u8>> = key_packages
                .iter()
                .filter(|(account, package)| {
                    if *account == self.inner.account {
                        let device = umbra_mls::validate_key_package(package).ok().map(|valid| {
                            valid
                                .certificate
                                .map_or(DeviceId::FIRST, |c| c.entry.device())
                        });
                        device.is_some_and(|device| !own_leaves.contains(&device))
                    } else {
                        !present.contains(account)
                    }
                })
                .map(|(_, package)| package.clone())
                .collect();
            if kps.is_empty() {
                return Ok(None);
            }
            let output = group.add_members(provider, signer, &kps)?;
            Ok(Some(output))
        })
        .await?;
        self.with_tx(|tx, provider| {
            let group = load_group(provider, group_id)?;
            self.check_keys(tx, &group, &mut events)
        })?;
        self.emit_all(events);
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
        let suite = self.group_suite(&group_id)?;
        let key_packages = self.fetch_key_packages(members, &[suite]).await?;
        self.add_to_group(&group_id, key_packages).await
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

    pub(super) async fn remove_from_group(
        &self,
        group_id: &[u8],
        members: &[AccountId],
    ) -> Result<()> {
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

    /// Commits the removal of these devices' leaves (a member's devices
    /// removed from its account), if the group still holds any.
    pub(super) async fn remove_devices_from_group(
        &self,
        group_id: &[u8],
        devices: &[umbra_proto::DeviceAddr],
    ) -> Result<()> {
        let signer = &self.inner.signer;
        self.commit(group_id, |group, provider| {
            Ok(group.remove_devices(provider, signer, devices)?)
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
        let mut events = Vec::new();
        self.with_tx(|tx, provider| {
            if sent.is_ok() {
                tx.execute(
                    "UPDATE conversations SET active = 0 WHERE group_id = ?1",
                    [&group_id],
                )?;
                self.system_line(tx, &group_id, "You left", &mut events)?;
            } else {
                // Not sent: forget the proposal, or the group would stay
                // blocked on it.
                load_group(provider, &group_id)?.clear_pending_proposals(provider)?;
            }
            Ok(())
        })?;
        sent?;
        drop(_ops);
        self.emit_all(events);
        self.emit_changed(conversation)
    }

    pub(super) fn conversation_in(
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
        let (members, suite) = match Group::load(provider, group_id)? {
            Some(group) if group.is_active() => (group.accounts(), group.suite()),
            _ => (vec![], None),
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
            suite,
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
            "SELECT m.id, m.sender, m.direction, m.body, m.state, m.timestamp, m.expires_at, m.ttl,
                    m.sent_at, a.name, a.size, a.mime_type, a.state, a.duration_ms,
                    a.thumbnail IS NOT NULL, a.waveform FROM (
                 SELECT * FROM messages WHERE group_id = ?1 ORDER BY id DESC LIMIT ?2
             ) AS m LEFT JOIN attachments a ON a.message_id = m.id ORDER BY m.id",
        )?;
        let rows = statement.query_map(params![group_id, limit as i64], |row| {
            message_row(row, conversation)
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// One message of a conversation, by its local ID.
    pub(super) fn message(&self, conversation: &ConversationId, id: i64) -> Result<Message> {
        self.db()
            .query_row(
                "SELECT m.id, m.sender, m.direction, m.body, m.state, m.timestamp, m.expires_at,
                        m.ttl, m.sent_at, a.name, a.size, a.mime_type, a.state, a.duration_ms,
                        a.thumbnail IS NOT NULL, a.waveform
                 FROM messages m LEFT JOIN attachments a ON a.message_id = m.id WHERE m.id = ?1",
                [id],
                |row| message_row(row, conversation),
            )
            .optional()?
            .ok_or_else(|| ClientError::Store("sent message vanished".into()))
    }
}

/// Suites as the protocol numbers them, in the same order.
fn suite_codes(suites: &[Suite]) -> Vec<u16> {
    suites.iter().map(|suite| suite.code()).collect()
}
