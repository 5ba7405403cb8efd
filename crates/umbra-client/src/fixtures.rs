//! Test fixtures (feature `test-fixtures`, never in a release build): bulk
//! data for tests that need a realistically large store, written in one
//! transaction instead of tens of thousands of round trips.

use rusqlite::params;

use crate::Client;
use crate::error::Result;
use crate::types::ConversationId;

impl Client {
    /// Writes `count` received text messages of `body_len` characters into
    /// `conversation`'s history, as if they had arrived from its peer.
    pub fn fill_history_for_tests(
        &self,
        conversation: &ConversationId,
        count: usize,
        body_len: usize,
    ) -> Result<()> {
        let group_id = self.group_id_of(conversation)?;
        let body: String = "lorem ipsum dolor sit amet "
            .chars()
            .cycle()
            .take(body_len)
            .collect();
        let mut db = self.db();
        let tx = db.transaction()?;
        {
            let mut insert = tx.prepare(
                "INSERT INTO messages (group_id, sender, direction, body, state, timestamp)
                 VALUES (?1, ?2, 'in', ?3, 'received', ?4)",
            )?;
            let now = self.now();
            for n in 0..count {
                insert.execute(params![
                    group_id,
                    self.account().as_str(),
                    body,
                    now + n as u64
                ])?;
            }
        }
        tx.commit()?;
        Ok(())
    }
}
