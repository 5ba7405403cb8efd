//! Commits: submitting one and merging it only once the delivery service
//! accepted it, retrying on a lost epoch, committing members' proposals,
//! and the periodic update of this device's own keys.

use rusqlite::params;
use tracing::debug;
use umbra_mls::{CommitOutput, Group, Provider};
use umbra_proto::frame::CommitSubmission;
use umbra_proto::{ErrorCode, GroupId, Reply, Request};

use crate::error::{ClientError, Result};
use crate::link::REQUEST_TIMEOUT;

use crate::types::{ConversationId, Event};

use super::{COMMIT_ATTEMPTS, Client, Verdict, commit_delivery_key, load_group};

impl Client {
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
                let delivery_key = commit_delivery_key(&group, provider, false);
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
                Ok(Some((planned, delivery_key)))
            })?;
            let Some((planned, delivery_key)) = planned else {
                return Ok(None);
            };
            let submission = CommitSubmission {
                group_id: gid.clone(),
                epoch: planned.epoch,
                commit: planned.commit.clone(),
                welcome: planned.welcome.clone(),
                group_info: planned.group_info.clone(),
                delivery_key,
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
    pub(super) async fn submit_commit(&self, submission: CommitSubmission) -> Verdict {
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
                Err(error @ (ClientError::Server { .. } | ClientError::TooLarge { .. })) => {
                    return Verdict::Refused(error);
                }
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
    pub(super) fn finish_commit(&self, group_id: &[u8], accepted: bool) -> Result<()> {
        let mut events = Vec::new();
        self.with_tx(|tx, provider| {
            let mut group = load_group(provider, group_id)?;
            if group.has_pending_commit() {
                if accepted {
                    let before = group.devices();
                    group.merge_pending_commit(provider)?;
                    let after = group.devices();
                    self.membership_lines(
                        tx,
                        group_id,
                        &self.inner.account.clone(),
                        &before,
                        &after,
                        &mut events,
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
        })?;
        self.emit_all(events);
        Ok(())
    }

    pub(super) async fn wait_for_epoch(&self, group_id: &[u8], epoch: u64) -> Result<()> {
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
    pub(super) async fn resubmit_pending_commits(&self) -> Result<()> {
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
            let delivery_key = self.with_tx(|_, provider| {
                Ok(load_group(provider, &group_id)
                    .ok()
                    .and_then(|group| commit_delivery_key(&group, provider, false)))
            })?;
            let verdict = self
                .submit_commit(CommitSubmission {
                    group_id: GroupId::new(group_id.clone())?,
                    epoch,
                    commit,
                    welcome,
                    group_info,
                    delivery_key,
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

    pub(super) async fn commit_pending_proposals(&self, group_id: &[u8]) -> Result<()> {
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

    pub(super) async fn self_update(&self, group_id: &[u8]) -> Result<()> {
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
}
