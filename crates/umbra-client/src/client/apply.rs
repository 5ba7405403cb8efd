//! Applying what the server delivers, in the order it accepted it: contact
//! requests, Welcomes, commits, application messages and notices, each in
//! one transaction with the record that it was applied; and checking the
//! keys members present against the ones pinned for them.

use std::sync::Arc;

use rusqlite::{OptionalExtension, Transaction, params};
use tracing::{debug, warn};
use umbra_mls::{Group, Incoming, Provider};
use umbra_proto::content::{Body, Content};
use umbra_proto::frame::Delivery;
use umbra_proto::{
    AccountId, DeliveryKind, DeviceAddr, GroupId, IdentityKey, Push, Request, Signature,
};

use crate::error::{ClientError, Result};
use crate::link::Link;

use crate::types::{
    AttachmentState, ConnectionState, ContactState, ConversationId, DeliveryState, Direction,
    Event, Message, Refusal,
};

use super::{Client, FollowUp, contact_state, list, pinned_key};

impl Client {
    pub(super) async fn apply_pushes(self, mut pushes: crate::link::Pushes, link: Arc<Link>) {
        let _ = self.inner.held.subscribe().wait_for(|held| !*held).await;
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
        // A link that a newer connection replaced says nothing: the client
        // is still connected, through the new one (a front end that
        // reconnects on this event would otherwise replace that one in
        // turn, and so on for ever).
        let replaced = self
            .inner
            .link
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_some_and(|current| !Arc::ptr_eq(current, &link));
        if !replaced {
            self.emit(Event::Connection {
                state: ConnectionState::Disconnected,
            });
        }
        self.inner.progress.notify_waiters();
    }

    /// Applies one delivery exactly once: the record that it was applied is
    /// written in the same transaction as its effects.
    pub(super) async fn apply_delivery(&self, delivery: Delivery) -> Result<()> {
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
        self.emit_all(events);
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
            Some(FollowUp::ReplenishKeyPackages(suite)) => {
                if !self.offered_suites().contains(&suite) {
                    debug!(%suite, "asked to replenish KeyPackages of a suite not offered");
                } else if let Err(error) = self
                    .upload_key_packages(suite, self.inner.options.key_package_batch, false)
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
            Some(FollowUp::RemoveDevice(group_id, device)) => {
                let client = self.clone();
                tokio::spawn(async move {
                    if let Err(error) = client.remove_devices_from_group(&group_id, &[device]).await
                    {
                        debug!(%error, "removing a removed device's leaf");
                    }
                });
            }
            Some(FollowUp::Rejoin(group_id)) => self.spawn_rejoin(group_id),
            Some(FollowUp::Wipe) => {
                self.wipe_now("remote wipe", true).await?;
            }
            // Inline, before the next delivery: `recv` and `sync` then know
            // that the receipts for what they applied have gone out.
            Some(FollowUp::Receipt(group_id, uids)) => {
                let conversation = ConversationId::from_group(&group_id);
                if let Err(error) = self
                    .receipt(
                        &conversation,
                        umbra_proto::content::ReceiptKind::Delivered,
                        uids,
                        true,
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

    pub(super) fn apply_in_tx(
        &self,
        tx: &Transaction<'_>,
        provider: &Provider<'_>,
        delivery: &Delivery,
        events: &mut Vec<Event>,
    ) -> Result<Option<FollowUp>> {
        // Only the server's notices name a sender; what members send a group
        // names none (MLS authenticates it).
        let notice_sender = || {
            delivery.sender.as_ref().ok_or_else(|| {
                ClientError::Invalid(format!("a {:?} delivery without its sender", delivery.kind))
            })
        };
        match delivery.kind {
            DeliveryKind::ContactRequest => {
                let sender = notice_sender()?;
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
                let sender = notice_sender()?;
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
            DeliveryKind::KeyPackagesLow => {
                // The suite's number; none (an older server): the classical.
                let suite = match delivery.payload[..] {
                    [] => Some(umbra_mls::Suite::CLASSICAL),
                    [high, low] => umbra_mls::Suite::from_code(u16::from_be_bytes([high, low])),
                    _ => None,
                };
                return Ok(suite.map(FollowUp::ReplenishKeyPackages));
            }
            DeliveryKind::Wipe => {
                use crate::wipe::Command;
                match crate::wipe::check_command(tx, &self.inner.account, &delivery.payload)? {
                    // Queued only for the devices current when it was
                    // relayed: its date against this device's (local)
                    // clock at its making would only add a way to fail.
                    Command::ForThisDevice | Command::Older => return Ok(Some(FollowUp::Wipe)),
                    Command::Forged => {
                        warn!(
                            "refusing a wipe command that is not signed with this device's wipe code"
                        );
                    }
                }
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
                                &member.account_key,
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
                    events,
                )?;
                events.push(Event::ConversationChanged {
                    conversation: self.conversation_in(tx, provider, &gid)?,
                });
            }
            DeliveryKind::DeviceRemoved => {
                return self.apply_device_removed(tx, provider, delivery, events);
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

    /// A member's device was removed from its account: commit its leaf's
    /// removal, but only on the account's own signed remove entry (the
    /// server alone must not be able to have a device removed); otherwise
    /// only show what the server says.
    fn apply_device_removed(
        &self,
        tx: &Transaction<'_>,
        provider: &Provider<'_>,
        delivery: &Delivery,
        events: &mut Vec<Event>,
    ) -> Result<Option<FollowUp>> {
        let gid = delivery
            .group_id
            .as_ref()
            .ok_or_else(|| ClientError::Invalid("a device removal without a group".into()))?
            .as_bytes()
            .to_vec();
        let Some(group) = Group::load(provider, &gid)? else {
            return Ok(None);
        };
        let account = delivery
            .sender
            .as_ref()
            .ok_or_else(|| ClientError::Invalid("a device removal without its account".into()))?;
        let entry = umbra_proto::DeviceEntry::decode(&delivery.payload).ok();
        let removed = entry.as_ref().and_then(|entry| match entry.change {
            umbra_proto::DeviceChange::Remove { device } => Some(device),
            umbra_proto::DeviceChange::Add { .. } => None,
        });
        let (Some(entry), Some(device)) = (entry, removed) else {
            return Err(ClientError::Invalid(
                "a device removal that carries no remove entry".into(),
            ));
        };
        // Signed by the account's key as this device knows it: the key it
        // pinned for a contact, its own account key for its own account
        // (never a key a leaf merely claims).
        let known = if *account == self.inner.account {
            Some(self.identity_key())
        } else {
            pinned_key(tx, account)?.and_then(|key| IdentityKey::from_slice(&key).ok())
        };
        let signed = known.is_some_and(|key| {
            umbra_mls::verify(&key, &entry.signed_bytes(account), &entry.account_signature)
        });
        let members = group.members();
        let leaf = umbra_proto::DeviceAddr::new(account.clone(), device);
        let has_leaf = members.iter().any(|member| member.address() == leaf);
        let line = if signed {
            format!(
                "{account} removed their device {device} (from their device {})",
                entry.by_device
            )
        } else {
            format!("The server reports that {account} removed their device {device}")
        };
        self.system_line(tx, &gid, &line, events)?;
        events.push(Event::ConversationChanged {
            conversation: self.conversation_in(tx, provider, &gid)?,
        });
        Ok((signed && has_leaf).then_some(FollowUp::RemoveDevice(gid, leaf)))
    }

    pub(super) fn apply_welcome(
        &self,
        tx: &Transaction<'_>,
        provider: &Provider<'_>,
        delivery: &Delivery,
        events: &mut Vec<Event>,
    ) -> Result<()> {
        let (group, inviter) = Group::join(provider, &delivery.payload, &self.inner.options.group)?;
        // Another device of this account adds this one to its groups.
        let own = inviter == self.inner.account;
        // The inviter is the one the Welcome proves (its GroupInfo's
        // signer); a `sender` the server adds is not looked at.
        if !own && contact_state(tx, &inviter)? != Some(ContactState::Accepted) {
            // Not from a contact we accepted: leave no trace of the group.
            warn!(inviter = %inviter, "ignoring a Welcome from someone who is not a contact");
            group.delete(provider)?;
            events.push(Event::Refused {
                from: inviter.clone(),
                reason: Refusal::InvitationFromStranger,
            });
            return Ok(());
        }
        let pinned = if own {
            Some(self.identity_key().as_bytes().to_vec())
        } else {
            pinned_key(tx, &inviter)?
        };
        // The account key the inviter's leaf claims (its certificate's, for
        // a device other than its first).
        let inviter_key = group
            .members()
            .into_iter()
            .find(|member| member.account == inviter)
            .map(|member| member.account_key);
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
        if again && own {
            // A conversation whose history came with this device's link:
            // it goes on here now.
            events.push(Event::ConversationChanged {
                conversation: self.conversation_in(tx, provider, &group.id())?,
            });
            return Ok(());
        }
        if again {
            self.system_line(
                tx,
                &group.id(),
                &format!("{inviter} added you again"),
                events,
            )?;
            events.push(Event::ConversationChanged {
                conversation: self.conversation_in(tx, provider, &group.id())?,
            });
            return Ok(());
        }
        // The other account of a two-account conversation: the inviter,
        // unless the inviter is this account's other device.
        let peer = members
            .iter()
            .find(|account| **account != self.inner.account)
            .cloned()
            .unwrap_or_else(|| inviter.clone());
        let has_direct: bool = tx
            .prepare_cached("SELECT 1 FROM conversations WHERE peer = ?1")?
            .exists([peer.as_str()])?;
        let direct = members.len() == 2 && !has_direct;
        tx.execute(
            "INSERT INTO conversations (group_id, kind, peer, name, created_at, last_self_update, disappear_after)
             VALUES (?1, ?2, ?3, '', ?4, ?4, ?5)",
            params![
                group.id(),
                if direct { "direct" } else { "group" },
                direct.then(|| peer.as_str()),
                self.now(),
                group.disappear_after()
            ],
        )?;
        // The conversation first, then what happens in it.
        events.push(Event::ConversationStarted {
            conversation: self.conversation_in(tx, provider, &group.id())?,
        });
        if !direct && !own {
            self.system_line(tx, &group.id(), &format!("{inviter} added you"), events)?;
        }
        Ok(())
    }

    pub(super) fn apply_group_message(
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
        let before = group.devices();
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
                    body @ (Body::Text(_) | Body::Attachment(_)) => {
                        // A file's message shows its caption as its text.
                        let (body, attachment) = match body {
                            Body::Attachment(attachment) => {
                                (attachment.caption.clone(), Some(attachment))
                            }
                            Body::Text(body) => (body, None),
                            _ => return Ok(None),
                        };
                        let timestamp = self.now();
                        let sent_at = sent_at(content.sent_at_ms, timestamp);
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
                        // Already here, the same text from the same sender:
                        // it came with the history this device got when it
                        // was linked. (Another text under a known ID is
                        // stored: an ID is no one's to take.)
                        if let Some(uid) = content.message_id
                            && tx
                                .prepare_cached(
                                    "SELECT 1 FROM messages
                                     WHERE uid = ?1 AND group_id = ?2 AND sender = ?3 AND body = ?4",
                                )?
                                .exists(params![&uid[..], id, sender.as_str(), body])?
                        {
                            return Ok(None);
                        }
                        // Sent by another device of this account: ours, as
                        // it is on the device that sent it.
                        let own = sender == self.inner.account;
                        let (direction, state) = if own {
                            (Direction::Out, DeliveryState::Sent)
                        } else {
                            (Direction::In, DeliveryState::Received)
                        };
                        tx.execute(
                            "INSERT INTO messages (group_id, sender, direction, body, state, timestamp, ttl, expires_at, uid, sent_at)
                             VALUES (?1, ?2, ?9, ?3, ?10, ?4, ?5, ?6, ?7, ?8)",
                            params![
                                id,
                                sender.as_str(),
                                body,
                                timestamp,
                                ttl,
                                backstop,
                                content.message_id.map(|uid| uid.to_vec()),
                                sent_at,
                                if own { "out" } else { "in" },
                                state.as_str()
                            ],
                        )?;
                        let message_id = tx.last_insert_rowid();
                        // Its sender's other device has it already (this
                        // account sent it): still fetched, as any.
                        if let Some(attachment) = &attachment {
                            super::attachments::record_attachment(
                                tx,
                                message_id,
                                attachment,
                                AttachmentState::Available,
                            )?;
                        }
                        events.push(Event::MessageReceived {
                            message: Message {
                                id: message_id,
                                conversation,
                                sender,
                                direction,
                                body,
                                state,
                                timestamp: sent_at,
                                received_at: Some(timestamp),
                                expires_at: (ttl > 0).then(|| {
                                    timestamp
                                        + crate::disappearing::UNSHOWN_BACKSTOP
                                        + u64::from(ttl)
                                }),
                                disappear_after: ttl,
                                attachment: attachment.as_deref().map(|attachment| {
                                    super::attachments::info_of(
                                        attachment,
                                        AttachmentState::Available,
                                    )
                                }),
                            },
                        });
                        if let Some(uid) = content.message_id
                            && !own
                        {
                            return Ok(Some(FollowUp::Receipt(id.clone(), vec![uid])));
                        }
                    }
                    Body::Receipt { kind, message_ids } => {
                        let own = sender == self.inner.account;
                        self.apply_receipt(tx, &id, (kind, own), &message_ids, events)?;
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
                            events,
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
                self.system_line(tx, &id, &format!("{sender} is leaving"), events)?;
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
                    events,
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
                    self.system_line(tx, &id, &format!("{sender} rejoined"), events)?;
                    self.check_keys(tx, &group, events)?;
                } else if removed_self {
                    tx.execute(
                        "UPDATE conversations SET active = 0 WHERE group_id = ?1",
                        [&id],
                    )?;
                    self.system_line(tx, &id, &format!("{sender} removed you"), events)?;
                } else {
                    let after = group.devices();
                    self.membership_lines(tx, &id, &sender, &before, &after, events)?;
                    self.check_keys(tx, &group, events)?;
                    self.record_timer(tx, &id, sender.as_str(), group.disappear_after(), events)?;
                }
                events.push(Event::ConversationChanged {
                    conversation: self.conversation_in(tx, provider, &id)?,
                });
                Ok(None)
            }
            // This device's own anonymous message, which the server sent
            // to every member device: recorded when it was sent.
            Incoming::Echo => Ok(None),
            _ => Ok(None),
        }
    }

    /// The lines a commit by `by` that took the group's leaves from
    /// `before` to `after` writes: accounts added and removed, and devices
    /// added to or removed from an account that stays a member (a removal
    /// the account signed is also shown from its entry, see
    /// `apply_device_removed`; this line says who committed it, so that no
    /// member takes another's device out unseen).
    pub(super) fn membership_lines(
        &self,
        tx: &Transaction<'_>,
        group_id: &[u8],
        by: &AccountId,
        before: &[DeviceAddr],
        after: &[DeviceAddr],
        events: &mut Vec<Event>,
    ) -> Result<()> {
        let (before_devices, after_devices) = (before, after);
        let (before, after) = (
            umbra_mls::accounts_of(before),
            umbra_mls::accounts_of(after),
        );
        let whose = |leaf: &DeviceAddr| {
            if leaf.account == *by {
                "their".to_owned()
            } else {
                format!("{}'s", leaf.account)
            }
        };
        for leaf in after_devices {
            if before.contains(&leaf.account) && !before_devices.contains(leaf) {
                let line = format!("{by} added {} device {}", whose(leaf), leaf.device);
                self.system_line(tx, group_id, &line, events)?;
            }
        }
        for leaf in before_devices {
            if after.contains(&leaf.account) && !after_devices.contains(leaf) {
                let line = format!("{by} removed {} device {}", whose(leaf), leaf.device);
                self.system_line(tx, group_id, &line, events)?;
            }
        }
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
            self.system_line(
                tx,
                group_id,
                &format!("{by} added {}", list(&added)),
                events,
            )?;
        }
        if !removed.is_empty() {
            self.system_line(
                tx,
                group_id,
                &format!("{by} removed {}", list(&removed)),
                events,
            )?;
        }
        Ok(())
    }

    /// Writes a line of the conversation's history that reports what
    /// happened to it (who joined, left, renamed it, removed this device),
    /// and tells the front end as it would of a message: a removed member
    /// is told, not only shown it next time they look.
    pub(crate) fn system_line(
        &self,
        tx: &Transaction<'_>,
        group_id: &[u8],
        text: &str,
        events: &mut Vec<Event>,
    ) -> Result<()> {
        let now = self.now();
        tx.execute(
            "INSERT INTO messages (group_id, sender, direction, body, state, timestamp)
             VALUES (?1, ?2, 'system', ?3, 'received', ?4)",
            params![group_id, self.inner.account.as_str(), text, now],
        )?;
        events.push(Event::MessageReceived {
            message: Message {
                id: tx.last_insert_rowid(),
                conversation: ConversationId::from_group(group_id),
                sender: self.inner.account.clone(),
                direction: Direction::System,
                body: text.to_owned(),
                state: DeliveryState::Received,
                timestamp: now,
                received_at: None,
                expires_at: None,
                disappear_after: 0,
                attachment: None,
            },
        });
        Ok(())
    }

    /// Compares the account keys the leaves in `group` claim with the ones
    /// first seen for each contact, remembering new ones and flagging
    /// changed ones.
    pub(super) fn check_keys(
        &self,
        tx: &Transaction<'_>,
        group: &Group,
        events: &mut Vec<Event>,
    ) -> Result<()> {
        for member in group.members() {
            if member.account == self.inner.account {
                continue;
            }
            // The account key, not the device's: a contact's devices all
            // stand for the one key their safety number covers.
            self.check_key(tx, &member.account, &member.account_key, events)?;
        }
        Ok(())
    }

    pub(super) fn check_key(
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
}

/// Oldest a received message's sending time may be, before its arrival:
/// longer than any server keeps a message.
const OLDEST_SENT: u64 = 31 * 24 * 3600;

/// When a message that arrived at `arrived` (Unix seconds) was sent, as its
/// sender's clock says in `sent_at_ms`: never later than it arrived (a
/// clock ahead cannot put it in the future) and never before a server
/// could have kept it.
pub(crate) fn sent_at(sent_at_ms: u64, arrived: u64) -> u64 {
    if sent_at_ms == 0 {
        // Not said (the field is optional): its arrival is all we know.
        return arrived;
    }
    (sent_at_ms / 1000).clamp(arrived.saturating_sub(OLDEST_SENT), arrived)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_is_dated_by_its_senders_clock_within_what_is_possible() {
        let arrived = 1_800_000_000;
        // Sent an hour before it arrived (the device was away).
        assert_eq!(
            sent_at((arrived - 3600) * 1000 + 999, arrived),
            arrived - 3600
        );
        // A sender's clock ahead of ours cannot date it after its arrival.
        assert_eq!(sent_at((arrived + 600) * 1000, arrived), arrived);
        // Nor can one far behind (or lying) date it before any server
        // could have kept it.
        assert_eq!(sent_at(1000, arrived), arrived - OLDEST_SENT);
        // Not said at all: dated by its arrival.
        assert_eq!(sent_at(0, arrived), arrived);
    }
}
