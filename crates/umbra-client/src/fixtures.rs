//! Test fixtures (feature `test-fixtures`, never in a release build): bulk
//! data for tests that need a realistically large store, written in one
//! transaction instead of tens of thousands of round trips.

use rusqlite::params;

use umbra_proto::BlobId;
use umbra_proto::content::{Attachment, Body};

use crate::Client;
use crate::error::{ClientError, Result};
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

    /// Message `message_id`'s file as it travels (key and digest
    /// included), for a test that plays a member misusing it.
    pub fn attachment_for_tests(&self, message_id: i64) -> Result<Attachment> {
        let row = self.db().query_row(
            "SELECT blob_id, file_key, digest, size, mime_type, name FROM attachments
             WHERE message_id = ?1",
            [message_id],
            |row| {
                Ok((
                    row.get::<_, Vec<u8>>(0)?,
                    row.get::<_, Vec<u8>>(1)?,
                    row.get::<_, Vec<u8>>(2)?,
                    row.get::<_, u64>(3)?,
                    row.get::<_, String>(4)?,
                    row.get::<_, String>(5)?,
                ))
            },
        )?;
        let (blob, key, digest, size, mime_type, name) = row;
        let corrupt = |_| ClientError::Store("an attachment's row".into());
        Ok(Attachment {
            blob_id: BlobId::from_slice(&blob)?,
            key: key.try_into().map_err(corrupt)?,
            digest: digest.try_into().map_err(corrupt)?,
            size,
            mime_type,
            name,
            caption: String::new(),
            duration_ms: 0,
            waveform: Vec::new(),
            thumbnail: Vec::new(),
        })
    }

    /// Sends a message whose file is `attachment`, uploading nothing: what
    /// a hostile member does to name a blob again, or under a false key.
    pub async fn send_attachment_for_tests(
        &self,
        conversation: &ConversationId,
        attachment: Attachment,
    ) -> Result<i64> {
        self.send_content(conversation, Body::Attachment(Box::new(attachment)))
            .await
    }
}
