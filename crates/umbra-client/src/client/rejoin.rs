//! Getting back into a group this device fell behind in: its commits
//! expired in the mailbox (offline longer than the TTL) or one could not be
//! processed. The device rejoins by itself, with an external commit from the
//! GroupInfo the delivery service keeps for the group's current epoch; the
//! other members see "X rejoined". What was sent while it was behind stays
//! unreadable to it.

use rusqlite::params;
use tracing::{debug, warn};
use umbra_mls::Group;
use umbra_proto::frame::CommitSubmission;
use umbra_proto::{ErrorCode, GroupId, Reply, Request};

use super::{Client, Verdict};
use crate::error::{ClientError, Result};
use crate::types::ConversationId;

/// Tries before giving up until the next message shows the device behind.
const REJOIN_ATTEMPTS: usize = 3;

impl Client {
    /// Starts rejoining `group_id` in the background, unless already under
    /// way.
    pub(super) fn spawn_rejoin(&self, group_id: Vec<u8>) {
        let fresh = self
            .inner
            .rejoining
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(group_id.clone());
        if !fresh {
            return;
        }
        let client = self.clone();
        tokio::spawn(async move {
            if let Err(error) = client.rejoin(&group_id).await {
                warn!(%error, "rejoining a group this device fell behind in");
            }
            client
                .inner
                .rejoining
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&group_id);
        });
    }

    async fn rejoin(&self, group_id: &[u8]) -> Result<()> {
        let gid = GroupId::new(group_id.to_vec())?;
        let conversation = ConversationId::from_group(group_id);
        for _ in 0..REJOIN_ATTEMPTS {
            let ops = self.inner.ops.lock().await;
            let fetched = self
                .request(Request::FetchGroupInfo {
                    group_id: gid.clone(),
                })
                .await;
            let group_info = match fetched {
                Ok(Reply::GroupInfo { group_info }) => group_info,
                Ok(_) => {
                    return Err(ClientError::Invalid(
                        "unexpected reply to FetchGroupInfo".into(),
                    ));
                }
                Err(error) if error.server_code() == Some(ErrorCode::NotAMember) => {
                    // Removed while away (that commit expired too).
                    self.with_tx(|tx, _| {
                        tx.execute(
                            "UPDATE conversations SET active = 0 WHERE group_id = ?1",
                            [group_id],
                        )?;
                        self.system_line(tx, group_id, "You were removed while away")
                    })?;
                    drop(ops);
                    return self.emit_changed(&conversation);
                }
                Err(error) => return Err(error),
            };
            let output = self.with_tx(|_, provider| {
                let (_, output) = Group::rejoin(
                    provider,
                    &self.inner.signer,
                    &self.inner.account,
                    &self.inner.options.group,
                    &group_info,
                )?;
                Ok(output)
            })?;
            let verdict = self
                .submit_commit(CommitSubmission {
                    group_id: gid.clone(),
                    epoch: output.epoch,
                    commit: output.commit,
                    welcome: None,
                    group_info: output.group_info,
                })
                .await;
            match verdict {
                Verdict::Accepted(epoch) => {
                    self.with_tx(|tx, _| {
                        tx.execute(
                            "UPDATE conversations SET last_self_update = ?2 WHERE group_id = ?1",
                            params![group_id, self.now()],
                        )?;
                        self.system_line(
                            tx,
                            group_id,
                            "This device fell behind and rejoined; what was sent meanwhile cannot be read here",
                        )
                    })?;
                    drop(ops);
                    debug!(epoch, "rejoined a group");
                    return self.emit_changed(&conversation);
                }
                // Someone committed meanwhile: start again from the new
                // GroupInfo.
                Verdict::Stale(_) => continue,
                Verdict::Refused(error) | Verdict::Unknown(error) => return Err(error),
            }
        }
        Err(ClientError::CommitContention)
    }
}
