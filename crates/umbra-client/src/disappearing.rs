//! Disappearing messages. The timer is part of the MLS group context, so
//! every member enforces the same one and a change is a commit, shown in the
//! conversation. Our copy of a message goes the timer's length after it was
//! sent; theirs the timer's length after it was first shown. Deleted rows
//! leave nothing behind: the store runs with `secure_delete`, and the WAL is
//! checkpointed and truncated after each expiry.

use std::sync::Weak;
use std::time::Duration;

use rusqlite::{OptionalExtension, Transaction, params};

use crate::client::{Client, Inner};
use crate::error::{ClientError, Result};
use crate::types::{ConversationId, Event};

/// The shortest timer a conversation may have, in seconds.
pub const MIN_TIMER: u32 = 5;
/// The longest: four weeks.
pub const MAX_TIMER: u32 = 28 * 86_400;
/// New conversations start with this timer unless the user changed the
/// account's default (the model system deleted texts after 30 seconds).
pub const DEFAULT_TIMER: u32 = 30;

const DEFAULT_TIMER_KEY: &str = "default_disappear_after";

/// A received message in a disappearing conversation that is never shown
/// still goes this long (plus its timer) after it arrived.
pub const UNSHOWN_BACKSTOP: u64 = 7 * 86_400;

/// "30 seconds", "2 hours", "4 weeks": how a timer reads in a conversation.
pub fn describe(seconds: u32) -> String {
    let units = [
        (604_800, "week"),
        (86_400, "day"),
        (3_600, "hour"),
        (60, "minute"),
    ];
    for (size, name) in units {
        if seconds >= size && seconds.is_multiple_of(size) {
            let n = seconds / size;
            return format!("{n} {name}{}", if n == 1 { "" } else { "s" });
        }
    }
    format!("{seconds} second{}", if seconds == 1 { "" } else { "s" })
}

/// Checks a timer choice: off, or 5 seconds to 4 weeks.
fn validate(timer: Option<Duration>) -> Result<u32> {
    match timer {
        None => Ok(0),
        Some(duration) => {
            let seconds = u32::try_from(duration.as_secs()).unwrap_or(u32::MAX);
            if (MIN_TIMER..=MAX_TIMER).contains(&seconds) {
                Ok(seconds)
            } else {
                Err(ClientError::Invalid(format!(
                    "a disappearing timer is between {} and {}, or off",
                    describe(MIN_TIMER),
                    describe(MAX_TIMER)
                )))
            }
        }
    }
}

impl Client {
    /// The timer new conversations start with, in seconds (0 = off).
    pub fn default_disappearing(&self) -> Result<u32> {
        let value: Option<String> = self
            .db()
            .query_row(
                "SELECT value FROM settings WHERE key = ?1",
                [DEFAULT_TIMER_KEY],
                |row| row.get(0),
            )
            .optional()?;
        Ok(value.and_then(|v| v.parse().ok()).unwrap_or(DEFAULT_TIMER))
    }

    /// Changes the timer new conversations start with (`None`: off).
    pub fn set_default_disappearing(&self, timer: Option<Duration>) -> Result<()> {
        let seconds = validate(timer)?;
        self.db().execute(
            "INSERT INTO settings (key, value) VALUES (?1, ?2)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            params![DEFAULT_TIMER_KEY, seconds.to_string()],
        )?;
        Ok(())
    }

    /// Sets a conversation's timer for every member (`None`: off). The
    /// change is an MLS commit; everyone sees who changed it.
    pub async fn set_disappearing(
        &self,
        conversation: &ConversationId,
        timer: Option<Duration>,
    ) -> Result<()> {
        let seconds = validate(timer)?;
        let group_id = self.group_id_of(conversation)?;
        let signer = self.signer();
        self.commit(&group_id, |group, provider| {
            if group.disappear_after() == seconds {
                return Ok(None);
            }
            Ok(Some(group.set_disappear_after(provider, signer, seconds)?))
        })
        .await?;
        let mut events = Vec::new();
        let mut db = self.db();
        let tx = db.transaction()?;
        self.record_timer(&tx, &group_id, "You", seconds, &mut events)?;
        tx.commit()?;
        drop(db);
        self.emit_all(events);
        self.emit_changed(conversation)
    }

    /// Notes a timer change in the conversation, if it is one.
    pub(crate) fn record_timer(
        &self,
        tx: &Transaction<'_>,
        group_id: &[u8],
        who: &str,
        seconds: u32,
        events: &mut Vec<Event>,
    ) -> Result<()> {
        let current: u32 = tx.query_row(
            "SELECT disappear_after FROM conversations WHERE group_id = ?1",
            [group_id],
            |row| row.get(0),
        )?;
        if current == seconds {
            return Ok(());
        }
        tx.execute(
            "UPDATE conversations SET disappear_after = ?2 WHERE group_id = ?1",
            params![group_id, seconds],
        )?;
        let line = if seconds == 0 {
            format!("{who} turned off disappearing messages")
        } else {
            format!(
                "{who} set messages to disappear after {}",
                describe(seconds)
            )
        };
        self.system_line(tx, group_id, &line, events)
    }

    /// Records that these messages were shown to the user: in a
    /// disappearing conversation their countdown starts now, and their
    /// senders are told they were read (in the background).
    pub fn mark_shown(&self, message_ids: &[i64]) -> Result<()> {
        let read = self.mark_shown_only(message_ids)?;
        if self.receipts_wait() {
            for (conversation, uids) in &read {
                self.keep_receipts(conversation, umbra_proto::content::ReceiptKind::Read, uids)?;
            }
        } else if !read.is_empty()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            let client = self.clone();
            runtime.spawn(async move {
                for (conversation, uids) in read {
                    let _ = client
                        .receipt(
                            &conversation,
                            umbra_proto::content::ReceiptKind::Read,
                            uids,
                            false,
                        )
                        .await;
                }
            });
        }
        Ok(())
    }

    /// Erases the messages whose time has come and leaves no trace of them
    /// in the store's files. Returns how many went.
    pub fn expire_messages(&self) -> Result<usize> {
        let now = self.now();
        let ids: Vec<i64> = {
            let mut db = self.db();
            let tx = db.transaction()?;
            let ids: Vec<i64> = tx
                .prepare(
                    "SELECT id FROM messages WHERE expires_at IS NOT NULL AND expires_at <= ?1",
                )?
                .query_map([now], |row| row.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            if ids.is_empty() {
                return Ok(0);
            }
            tx.execute(
                "DELETE FROM messages WHERE expires_at IS NOT NULL AND expires_at <= ?1",
                [now],
            )?;
            tx.commit()?;
            // Deleted cells are zeroed (secure_delete); move every page out
            // of the WAL and truncate it, so no old copy stays there.
            db.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
            ids
        };
        // Their files' keys went with them; now the sealed files.
        if let Err(error) = self.sweep_files() {
            tracing::warn!(%error, "deleting the files of expired messages failed");
        }
        let count = ids.len();
        self.emit_event(Event::MessagesExpired { message_ids: ids });
        Ok(count)
    }

    /// Seconds until the next message is due to disappear, if any is.
    fn next_expiry_in(&self) -> Result<Option<u64>> {
        let next: Option<u64> = self.db().query_row(
            "SELECT MIN(expires_at) FROM messages WHERE expires_at IS NOT NULL",
            [],
            |row| row.get(0),
        )?;
        Ok(next.map(|at| at.saturating_sub(self.now())))
    }
}

/// Erases messages as they expire, for as long as the client lives: checks
/// every second (one indexed lookup), so a 5-second message goes on time.
/// Holds the client weakly: dropping the last handle stops it. A failing
/// store is retried; a wiped one ends it.
pub(crate) async fn expiry_ticker(inner: Weak<Inner>) {
    let mut ticks = tokio::time::interval(Duration::from_secs(1));
    loop {
        ticks.tick().await;
        let Some(client) = Client::from_weak(&inner) else {
            return;
        };
        if !crate::store::exists(client.home()) {
            return;
        }
        if matches!(client.next_expiry_in(), Ok(Some(0))) {
            let _ = client.expire_messages();
        }
        if let Err(error) = client.flush_receipts().await {
            tracing::debug!(%error, "sending receipts");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timers_read_like_a_person_would_say_them() {
        assert_eq!(describe(30), "30 seconds");
        assert_eq!(describe(60), "1 minute");
        assert_eq!(describe(7200), "2 hours");
        assert_eq!(describe(28 * 86_400), "4 weeks");
        assert_eq!(describe(90), "90 seconds");
        assert!(validate(Some(Duration::from_secs(4))).is_err());
        assert!(validate(Some(Duration::from_secs(29 * 86_400))).is_err());
        assert_eq!(validate(None).ok(), Some(0));
        assert_eq!(validate(Some(Duration::from_secs(5))).ok(), Some(5));
    }
}
