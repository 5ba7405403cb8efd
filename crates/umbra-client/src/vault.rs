//! The vault: encrypted notes that live only in the device stores. They
//! are never sent anywhere, except to a new device of the account when the
//! user links it with the vault (`PendingLink::with_vault`), and go with
//! everything else when the device is wiped.

use rusqlite::{OptionalExtension, params};
use serde::Serialize;

use crate::client::Client;
use crate::error::{ClientError, Result};

/// Longest note title, in bytes.
pub const MAX_TITLE_BYTES: usize = 200;
/// Largest note body, in bytes.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Note {
    pub id: i64,
    pub title: String,
    pub body: String,
    pub created_at: u64,
    pub updated_at: u64,
}

impl Client {
    /// Stores a note; returns its ID.
    pub fn vault_add(&self, title: &str, body: &str) -> Result<i64> {
        if title.trim().is_empty() || title.len() > MAX_TITLE_BYTES {
            return Err(ClientError::Invalid(format!(
                "a note title has 1 to {MAX_TITLE_BYTES} bytes"
            )));
        }
        if body.len() > MAX_BODY_BYTES {
            return Err(ClientError::Invalid(format!(
                "a note holds at most {MAX_BODY_BYTES} bytes"
            )));
        }
        let now = self.now();
        let db = self.db();
        db.execute(
            "INSERT INTO vault (title, body, created_at, updated_at) VALUES (?1, ?2, ?3, ?3)",
            params![title, body, now],
        )?;
        Ok(db.last_insert_rowid())
    }

    /// Every note, newest first, without bodies.
    pub fn vault_list(&self) -> Result<Vec<Note>> {
        let db = self.db();
        let mut statement = db.prepare(
            "SELECT id, title, '', created_at, updated_at FROM vault ORDER BY updated_at DESC, id DESC",
        )?;
        let rows = statement.query_map([], note)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    pub fn vault_get(&self, id: i64) -> Result<Note> {
        self.db()
            .query_row(
                "SELECT id, title, body, created_at, updated_at FROM vault WHERE id = ?1",
                [id],
                note,
            )
            .optional()?
            .ok_or_else(|| ClientError::Invalid(format!("no note {id}")))
    }

    /// Deletes a note (the store overwrites deleted content).
    pub fn vault_delete(&self, id: i64) -> Result<()> {
        let deleted = self.db().execute("DELETE FROM vault WHERE id = ?1", [id])?;
        if deleted == 0 {
            return Err(ClientError::Invalid(format!("no note {id}")));
        }
        Ok(())
    }
}

fn note(row: &rusqlite::Row<'_>) -> rusqlite::Result<Note> {
    Ok(Note {
        id: row.get(0)?,
        title: row.get(1)?,
        body: row.get(2)?,
        created_at: row.get(3)?,
        updated_at: row.get(4)?,
    })
}
