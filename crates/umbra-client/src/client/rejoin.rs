//! Getting back into a group this device fell behind in: its commits
//! expired in the mailbox (offline longer than the TTL) or one could not be
//! processed. The device rejoins by itself, with an external commit from the
//! GroupInfo the delivery service keeps for the group's current epoch, which
//! it checks first (`umbra_mls::Group::rejoin`): a server cannot lead it
//! into a group of its own making. The other members see "X rejoined". What
//! was sent while it was behind stays unreadable to it.
//!
//! Until the server accepts the external commit the device holds a group
//! state nobody else has: the `rejoins` table marks it, nothing is sent in
//! it, and the rejoin resumes on the next connection.

use rusqlite::{OptionalExtension, params};
use tracing::{debug, warn};
use umbra_mls::{Group, MlsError};
use umbra_proto::frame::CommitSubmission;
use umbra_proto::{ErrorCode, GroupId, Reply, Request};

use super::{Client, Verdict, commit_delivery_key, load_group};
use crate::error::{ClientError, Result};
use crate::types::ConversationId;

/// Tries before giving up until the next message shows the device behind.
const REJOIN_ATTEMPTS: usize = 3;

/// Takes a group off the set of groups being rejoined when its task ends,
/// however it ends.
struct Rejoining {
    client: Client,
    group_id: Vec<u8>,
}

impl Drop for Rejoining {
    fn drop(&mut self) {
        self.client
            .inner
            .rejoining
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.group_id);
    }
}

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
        let guard = Rejoining {
            client: self.clone(),
            group_id,
        };
        tokio::spawn(async move {
            match guard.client.rejoin(&guard.group_id).await {
                Ok(()) => {}
                Err(ClientError::Mls(MlsError::NotBehind)) => {
                    debug!("a message suggested this device was behind in a group; it is not");
                }
                Err(ClientError::Mls(MlsError::UntrustedGroupInfo(why))) => {
                    warn!(%why, "the server offered a GroupInfo this device cannot trust");
                    guard.client.emit_event(crate::types::Event::ServerMisbehaved {
                        what: format!(
                            "it offered a conversation's state that no member signed ({why}); this device did not rejoin"
                        ),
                    });
                }
                Err(error) => warn!(%error, "rejoining a group this device fell behind in"),
            }
        });
    }

    /// Resumes the rejoins the server has not answered yet (after a lost
    /// connection or a restart).
    pub(super) fn resume_rejoins(&self) -> Result<()> {
        let pending: Vec<Vec<u8>> = {
            let db = self.db();
            let mut statement = db.prepare("SELECT group_id FROM rejoins")?;
            let rows = statement.query_map([], |row| row.get(0))?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        for group_id in pending {
            self.spawn_rejoin(group_id);
        }
        Ok(())
    }

    /// Whether the group's state is an unaccepted rejoin's.
    pub(super) fn is_rejoining(db: &rusqlite::Connection, group_id: &[u8]) -> Result<bool> {
        Ok(db
            .prepare_cached("SELECT 1 FROM rejoins WHERE group_id = ?1")?
            .exists([group_id])?)
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
                    let mut events = Vec::new();
                    self.with_tx(|tx, _| {
                        tx.execute("DELETE FROM rejoins WHERE group_id = ?1", [group_id])?;
                        tx.execute(
                            "UPDATE conversations SET active = 0 WHERE group_id = ?1",
                            [group_id],
                        )?;
                        self.system_line(tx, group_id, "You were removed while away", &mut events)
                    })?;
                    drop(ops);
                    self.emit_all(events);
                    return self.emit_changed(&conversation);
                }
                Err(error) => return Err(error),
            };
            let output = self.with_tx(|tx, provider| {
                // The last epoch really reached: the group's, or the one
                // before an earlier rejoin that was not accepted.
                let behind: Option<u64> = tx
                    .query_row(
                        "SELECT behind FROM rejoins WHERE group_id = ?1",
                        [group_id],
                        |row| row.get(0),
                    )
                    .optional()?;
                let behind = match behind {
                    Some(epoch) => epoch,
                    None => load_group(provider, group_id)?.epoch(),
                };
                let (group, output) = Group::rejoin_as_device(
                    provider,
                    &self.inner.signer,
                    &self.inner.account,
                    &self.inner.options.group,
                    (group_id, behind),
                    &group_info,
                    self.certificate(),
                )?;
                tx.execute(
                    "INSERT OR REPLACE INTO rejoins (group_id, behind) VALUES (?1, ?2)",
                    params![group_id, behind],
                )?;
                Ok((output, commit_delivery_key(&group, provider, true)))
            })?;
            let (output, delivery_key) = output;
            let verdict = self
                .submit_commit(CommitSubmission {
                    group_id: gid.clone(),
                    epoch: output.epoch,
                    commit: output.commit,
                    welcome: None,
                    group_info: output.group_info,
                    delivery_key,
                })
                .await;
            match verdict {
                Verdict::Accepted(epoch) => {
                    let mut events = Vec::new();
                    self.with_tx(|tx, provider| {
                        tx.execute("DELETE FROM rejoins WHERE group_id = ?1", [group_id])?;
                        tx.execute(
                            "UPDATE conversations SET last_self_update = ?2 WHERE group_id = ?1",
                            params![group_id, self.now()],
                        )?;
                        // Whoever came in meanwhile is checked like any
                        // member a commit brings in.
                        let group = load_group(provider, group_id)?;
                        self.check_keys(tx, &group, &mut events)?;
                        self.system_line(
                            tx,
                            group_id,
                            "This device fell behind and rejoined; what was sent meanwhile cannot be read here",
                            &mut events,
                        )
                    })?;
                    drop(ops);
                    self.emit_all(events);
                    debug!(epoch, "rejoined a group");
                    return self.emit_changed(&conversation);
                }
                // Someone committed meanwhile: start again from the new
                // GroupInfo.
                Verdict::Stale(_) => continue,
                // The rejoin stays marked: resumed on the next connection.
                Verdict::Refused(error) | Verdict::Unknown(error) => return Err(error),
            }
        }
        Err(ClientError::CommitContention)
    }
}
