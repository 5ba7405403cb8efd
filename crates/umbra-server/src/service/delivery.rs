//! The MLS delivery service: validated commits, messages fanned out to a
//! group's members, standalone proposals, and what each costs the sender's
//! hourly delivery budget.

use super::*;

impl Services {
    pub(super) async fn send_commit(&self, me: &DeviceAddr, commit: CommitSubmission) -> Outcome {
        self.within_budget(&me.account)?;
        check_deliverable("the commit", &commit.commit)?;
        if let Some(welcome) = &commit.welcome {
            check_deliverable("the Welcome", welcome)?;
        }
        let header = umbra_mls::message_header(&commit.commit)
            .map_err(|e| refuse(ErrorCode::InvalidCommit, e.to_string()))?;
        if header.kind != umbra_mls::MessageKind::Commit
            || header.group_id != commit.group_id.as_bytes()
            || header.epoch != commit.epoch
        {
            return Err(refuse(
                ErrorCode::InvalidCommit,
                "the commit's MLS header does not match the declared group, epoch or type",
            ));
        }
        let group = self
            .store
            .group(&commit.group_id)
            .await
            .map_err(internal)?
            .ok_or_else(|| unknown_group(&commit.group_id))?;
        // Only member devices may have a commit validated (a rejoining
        // device is still one here): anyone else learns nothing and costs
        // nothing.
        if !group.members.contains(me) {
            return Err(not_a_member());
        }
        if commit.epoch > group.epoch {
            return Err(stale(commit.epoch, group.epoch));
        }
        let (added, adds, removed, public_state, group_info) = if commit.epoch < group.epoch {
            // Too old to validate: the store answers a resubmission of the
            // commit it accepted for that epoch as accepted, anything else
            // as stale, and never applies it (the epoch only moves on).
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new())
        } else {
            let before = group.members.clone();
            let (valid, public_state) = crate::handshake::validate_commit(
                commit.group_id.clone(),
                group,
                commit.commit.clone(),
                commit.welcome.clone(),
                commit.group_info.clone(),
            )
            .await?;
            if valid.sender != *me {
                return Err(refuse(
                    ErrorCode::InvalidCommit,
                    "the commit is signed by another member's leaf",
                ));
            }
            for member in &valid.added {
                // A device adds its own account's other devices, and
                // accounts that accepted it as a contact.
                if member.account != me.account
                    && !self
                        .store
                        .are_contacts(&me.account, &member.account)
                        .await
                        .map_err(internal)?
                {
                    return Err(refuse(
                        ErrorCode::NotAContact,
                        format!(
                            "{} has not accepted a contact request from you",
                            member.account
                        ),
                    ));
                }
                // A leaf of one of the account's current devices (that
                // device's number and key), under the account's own key
                // (device 1's leaf is signed with it; another device's
                // certificate is signed by it).
                let current = match self
                    .store
                    .account(&member.account)
                    .await
                    .map_err(internal)?
                {
                    Some(line) if line.identity_key == member.account_key => {
                        self.device_key(&line, member.device).await? == Some(member.identity_key)
                    }
                    _ => false,
                };
                if !current {
                    return Err(not_current(&member.account));
                }
            }
            // Routing follows the tree: which devices are in it now and
            // were not, and were and are not (a rejoin replaces a leaf of
            // the same device).
            let added = valid
                .members
                .iter()
                .filter(|leaf| !before.contains(leaf))
                .cloned()
                .collect();
            let removed = before
                .iter()
                .filter(|leaf| !valid.members.contains(leaf))
                .cloned()
                .collect();
            // What its Adds bring in, each checked current above: the
            // store checks them again where nothing can come between.
            let adds = valid
                .added
                .iter()
                .map(|member| DeviceAddr::new(member.account.clone(), member.device))
                .collect();
            (added, adds, removed, public_state, commit.group_info)
        };
        let now = self.now();
        let delivery_key = commit.delivery_key;
        let welcome_bytes = commit.welcome.as_ref().map_or(0, Vec::len);
        let commit_bytes = commit.commit.len();
        let record = CommitRecord {
            group_id: commit.group_id,
            epoch: commit.epoch,
            sender: me.clone(),
            commit: commit.commit,
            welcome: commit.welcome,
            added,
            adds,
            removed,
            public_state,
            group_info,
            // The committer states the new epoch's delivery key; the store
            // records it only if it accepts this commit now (a
            // resubmission could come from any member, who saw it too).
            delivery_key,
        };
        match self
            .store
            .accept_commit(&record, now, self.expires_at(now))
            .await
            .map_err(internal)?
        {
            CommitOutcome::Accepted {
                epoch,
                recipients,
                welcomed,
            } => {
                // Each copy stored, at its size: the commit to the members
                // it had, the Welcome to the devices it brings in (not to
                // a leaf a line that ended left in the tree).
                self.metrics.commits_accepted.inc();
                let told = recipients.len().saturating_sub(welcomed);
                self.charge(&me.account, commit_bytes, told);
                self.charge(&me.account, welcome_bytes, welcomed);
                self.registry.notify(&recipients);
                Ok(Reply::CommitAccepted { epoch })
            }
            CommitOutcome::Duplicate { epoch } => Ok(Reply::CommitAccepted { epoch }),
            CommitOutcome::Stale { current_epoch } => Err(stale(record.epoch, current_epoch)),
            CommitOutcome::UnknownGroup => Err(unknown_group(&record.group_id)),
            CommitOutcome::NotAMember => Err(not_a_member()),
            CommitOutcome::AddsFormerDevice { device } => Err(not_current(&device.account)),
        }
    }

    pub(super) async fn send_message(
        &self,
        me: &DeviceAddr,
        group_id: GroupId,
        message: Vec<u8>,
        kind: DeliveryKind,
        ttl_seconds: u32,
    ) -> Result<(Durable, Reply), ErrorReply> {
        check_deliverable("the message", &message)?;
        self.within_budget(&me.account)?;
        let header = umbra_mls::message_header(&message)
            .map_err(|e| refuse(ErrorCode::InvalidRequest, e.to_string()))?;
        let expected = match kind {
            DeliveryKind::Proposal => umbra_mls::MessageKind::Proposal,
            _ => umbra_mls::MessageKind::Application,
        };
        if header.kind != expected || header.group_id != group_id.as_bytes() {
            return Err(refuse(
                ErrorCode::InvalidRequest,
                "the message's MLS header does not match the declared group or kind",
            ));
        }
        if kind == DeliveryKind::Proposal {
            self.record_proposal(me, &group_id, &message).await?;
        }
        let now = self.now();
        let expires_at = self.message_expiry(now, ttl_seconds);
        match self
            .store
            .fan_out(&group_id, me, kind, &message, header.epoch, now, expires_at)
            .await
            .map_err(internal)?
        {
            FanOutOutcome::Stored {
                deliveries,
                durable,
            } => {
                // Online recipients get their copies now; the sender hears
                // "accepted" once each copy is on disk or acknowledged, and
                // the copies no connection will acknowledge go to disk
                // without waiting out the ack window.
                self.charge(&me.account, message.len(), deliveries.len());
                self.metrics.messages_accepted.inc();
                self.hand_over(deliveries);
                Ok((durable, Reply::Accepted { accepted_at: now }))
            }
            FanOutOutcome::LineInactive {
                status,
                subscription_expires_at,
            } => Err(
                line_refusal(status, subscription_expires_at, now).unwrap_or_else(|| {
                    refuse(
                        ErrorCode::Internal,
                        "the line check disagreed with the store",
                    )
                }),
            ),
            FanOutOutcome::UnknownGroup => Err(unknown_group(&group_id)),
            FanOutOutcome::NotAMember => Err(not_a_member()),
            FanOutOutcome::KeyWithdrawn => Err(refuse(
                ErrorCode::Internal,
                "the store checked a delivery key of a member's message",
            )),
            FanOutOutcome::BehindGroup { current_epoch } => Err(ErrorReply {
                current_epoch,
                ..refuse(
                    ErrorCode::StaleEpoch,
                    format!(
                        "the message is from epoch {}; the group is at epoch {current_epoch}: \
                         process what came before and encrypt it again",
                        header.epoch
                    ),
                )
            }),
            FanOutOutcome::AheadOfGroup { current_epoch } => Err(ErrorReply {
                current_epoch,
                ..refuse(
                    ErrorCode::InvalidRequest,
                    format!(
                        "the message is from epoch {}, which the group has not reached (it is at {current_epoch})",
                        header.epoch
                    ),
                )
            }),
        }
    }
}

impl Services {
    /// A standalone proposal is validated against the group's state (only
    /// a member's own leaving is accepted) and recorded for the epoch, so
    /// that the commit which applies it can be validated too.
    pub(super) async fn record_proposal(
        &self,
        me: &DeviceAddr,
        group_id: &GroupId,
        message: &[u8],
    ) -> Result<(), ErrorReply> {
        let group = self
            .store
            .group(group_id)
            .await
            .map_err(internal)?
            .ok_or_else(|| unknown_group(group_id))?;
        if !group.members.contains(me) {
            return Err(not_a_member());
        }
        // A line that may not send has nothing recorded either.
        self.require_active(&me.account).await?;
        let epoch = group.epoch;
        let leaving =
            crate::handshake::validate_proposal(group_id.clone(), group, message.to_vec()).await?;
        if leaving != *me {
            return Err(refuse(
                ErrorCode::InvalidProposal,
                "the proposal is signed by another member's leaf",
            ));
        }
        if !self
            .store
            .add_proposal(group_id, epoch, message)
            .await
            .map_err(internal)?
        {
            let current_epoch = match self.store.group(group_id).await.map_err(internal)? {
                Some(group) => group.epoch,
                None => return Err(unknown_group(group_id)),
            };
            return Err(ErrorReply {
                current_epoch,
                ..refuse(
                    ErrorCode::StaleEpoch,
                    format!(
                        "the proposal was made in epoch {epoch}; the group is at epoch {current_epoch}: process what came before and propose again"
                    ),
                )
            });
        }
        Ok(())
    }
}

/// Why a line may not send at `now`, if it may not
/// ([`LineStatus::may_send`], the rule the store applies inside a
/// fan-out's transaction).
impl Services {
    /// When a message's undelivered copies expire: the server's TTL, or
    /// less if a disappearing conversation asks.
    pub(super) fn message_expiry(&self, now: u64, ttl_seconds: u32) -> u64 {
        match ttl_seconds {
            0 => self.expires_at(now),
            ttl => self.expires_at(now).min(now.saturating_add(u64::from(ttl))),
        }
    }

    /// Online recipients get their copies now; those no connection will
    /// acknowledge go to disk without waiting out the ack window.
    pub(super) fn hand_over(&self, deliveries: Vec<(DeviceAddr, umbra_store::StoredDelivery)>) {
        let unread = self.registry.deliver(deliveries);
        if !unread.is_empty() {
            self.store.no_reader(&unread);
        }
    }
}

pub(super) fn line_refusal(status: LineStatus, expires: u64, now: u64) -> Option<ErrorReply> {
    if status.may_send(expires, now) {
        return None;
    }
    match status {
        LineStatus::Revoked => Some(refuse(ErrorCode::LineRevoked, "this line was revoked")),
        LineStatus::Suspended => Some(refuse(
            ErrorCode::LineSuspended,
            "this line is suspended; contact your distributor",
        )),
        LineStatus::Active => Some(refuse(
            ErrorCode::SubscriptionExpired,
            format!(
                "subscription expired on {}, enter a renewal code",
                date(expires)
            ),
        )),
    }
}

pub(super) fn stale(epoch: u64, current_epoch: u64) -> ErrorReply {
    ErrorReply {
        current_epoch,
        ..refuse(
            ErrorCode::StaleEpoch,
            format!(
                "the commit was made in epoch {epoch}; the group is at epoch {current_epoch}: process what came before and retry"
            ),
        )
    }
}

pub(super) fn unknown_group(group: &GroupId) -> ErrorReply {
    refuse(
        ErrorCode::UnknownGroup,
        format!("no group {} on this server", group.to_hex()),
    )
}

pub(super) fn not_a_member() -> ErrorReply {
    refuse(ErrorCode::NotAMember, "you are not a member of this group")
}

/// Refuses a message whose delivery would not fit in a frame a device
/// accepts (it would block the recipient's mailbox for good).
pub(crate) fn check_deliverable(what: &str, message: &[u8]) -> Result<(), ErrorReply> {
    if message.len() > umbra_proto::MAX_DELIVERY_PAYLOAD {
        return Err(refuse(
            ErrorCode::FrameTooLarge,
            format!(
                "{what} is {} bytes; at most {} can be delivered (a delivery carries it in a frame of at most {} bytes)",
                message.len(),
                umbra_proto::MAX_DELIVERY_PAYLOAD,
                umbra_proto::MAX_FRAME_BYTES
            ),
        ));
    }
    Ok(())
}

/// A commit adds a device its account no longer has (or never had).
fn not_current(account: &AccountId) -> ErrorReply {
    refuse(
        ErrorCode::InvalidCommit,
        format!("the KeyPackage added for {account} is not one of that account's current devices"),
    )
}
