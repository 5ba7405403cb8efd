//! The per-device mailbox cap: how many bytes each mailbox holds on disk,
//! as the writer thread knows it.
//!
//! Only the writer changes the mailbox table, so it alone keeps the count:
//! no lock, no extra write. A mailbox's size is read from the database the
//! first time the writer needs it (after a start, or after it forgot it),
//! then kept up to date as the writer inserts and deletes; anything that
//! deletes in bulk (expiry, a revocation, a failed commit, another
//! process's write) makes it forget, and it reads again when it next needs
//! the figure. Copies acknowledged inside the ack window never reach the
//! disk and never count.

use std::collections::HashMap;

use rusqlite::Connection;
use umbra_proto::{AccountId, DeviceAddr};

use super::{backend, remember};
use crate::Result;

/// Bytes of payload each known mailbox holds, and the cap (0: none).
#[derive(Debug)]
pub(super) struct MailboxBytes {
    cap: u64,
    known: HashMap<DeviceAddr, u64>,
}

impl MailboxBytes {
    pub(super) fn new(cap: u64) -> Self {
        MailboxBytes {
            cap,
            known: HashMap::new(),
        }
    }

    /// Whether `recipient`'s mailbox has room for `bytes` more under the
    /// cap (always, without a cap).
    pub(super) fn has_room(
        &mut self,
        connection: &Connection,
        recipient: &DeviceAddr,
        bytes: u64,
    ) -> Result<bool> {
        if self.cap == 0 {
            return Ok(true);
        }
        let held = match self.known.get(recipient) {
            Some(held) => *held,
            None => {
                let held: u64 = connection
                    .prepare_cached(
                        "SELECT COALESCE(SUM(length(payload)), 0) FROM mailbox
                         WHERE recipient = ?1 AND device = ?2",
                    )
                    .and_then(|mut s| {
                        s.query_row(
                            rusqlite::params![recipient.account.as_str(), recipient.device.0],
                            |row| row.get(0),
                        )
                    })
                    .map_err(backend)?;
                remember(&mut self.known, recipient.clone(), held);
                held
            }
        };
        Ok(held.saturating_add(bytes) <= self.cap)
    }

    /// `bytes` were stored in `recipient`'s mailbox.
    pub(super) fn grew(&mut self, recipient: &DeviceAddr, bytes: u64) {
        if let Some(held) = self.known.get_mut(recipient) {
            *held = held.saturating_add(bytes);
        }
    }

    /// `bytes` were deleted from `recipient`'s mailbox.
    pub(super) fn shrank(&mut self, recipient: &DeviceAddr, bytes: u64) {
        if let Some(held) = self.known.get_mut(recipient) {
            *held = held.saturating_sub(bytes);
        }
    }

    /// `recipient`'s mailbox changed in a way not counted here.
    pub(super) fn forget(&mut self, recipient: &DeviceAddr) {
        self.known.remove(recipient);
    }

    /// The mailboxes of every device of `account` changed in a way not
    /// counted here.
    pub(super) fn forget_account(&mut self, account: &AccountId) {
        self.known.retain(|mailbox, _| mailbox.account != *account);
    }

    /// Mailboxes changed in bulk, or the changes counted may not have been
    /// committed.
    pub(super) fn forget_all(&mut self) {
        self.known.clear();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn account(text: &str) -> DeviceAddr {
        DeviceAddr::first(AccountId::parse(text).unwrap())
    }

    fn mailbox(rows: &[(&DeviceAddr, usize)]) -> Connection {
        let connection = Connection::open_in_memory().unwrap();
        connection
            .execute_batch(
                "CREATE TABLE mailbox (recipient TEXT NOT NULL, device INTEGER NOT NULL,
                                       payload BLOB NOT NULL)",
            )
            .unwrap();
        for (recipient, size) in rows {
            connection
                .execute(
                    "INSERT INTO mailbox (recipient, device, payload) VALUES (?1, ?2, ?3)",
                    rusqlite::params![
                        recipient.account.as_str(),
                        recipient.device.0,
                        vec![0u8; *size]
                    ],
                )
                .unwrap();
        }
        connection
    }

    #[test]
    fn each_device_of_an_account_has_its_own_count() {
        let first = account("AAAAAAAA");
        let second = DeviceAddr::new(first.account.clone(), umbra_proto::DeviceId(2));
        let connection = mailbox(&[(&first, 900), (&second, 100)]);
        let mut bytes = MailboxBytes::new(1000);
        assert!(!bytes.has_room(&connection, &first, 101).unwrap());
        assert!(bytes.has_room(&connection, &second, 900).unwrap());
        // Forgetting the account forgets both devices.
        connection.execute("DELETE FROM mailbox", []).unwrap();
        bytes.forget_account(&first.account);
        assert!(bytes.has_room(&connection, &first, 1000).unwrap());
        assert!(bytes.has_room(&connection, &second, 1000).unwrap());
    }

    #[test]
    fn reads_a_mailbox_once_then_counts() {
        let (a, b) = (account("AAAAAAAA"), account("BBBBBBBB"));
        let connection = mailbox(&[(&a, 600), (&a, 300), (&b, 50)]);
        let mut bytes = MailboxBytes::new(1000);
        assert!(bytes.has_room(&connection, &a, 100).unwrap());
        assert!(!bytes.has_room(&connection, &a, 101).unwrap());
        // Counted from here on: the table is not read again.
        connection.execute("DELETE FROM mailbox", []).unwrap();
        bytes.grew(&a, 100);
        assert!(!bytes.has_room(&connection, &a, 1).unwrap());
        bytes.shrank(&a, 600);
        assert!(bytes.has_room(&connection, &a, 600).unwrap());
        assert!(!bytes.has_room(&connection, &a, 601).unwrap());
        // Forgotten: read again (the table is empty now).
        bytes.forget(&a);
        assert!(bytes.has_room(&connection, &a, 1000).unwrap());
        // Without a cap, always room, and nothing is read.
        let mut uncapped = MailboxBytes::new(0);
        assert!(uncapped.has_room(&connection, &b, u64::MAX).unwrap());
    }

    #[test]
    fn changes_to_an_unknown_mailbox_are_not_guessed() {
        let a = account("AAAAAAAA");
        let connection = mailbox(&[(&a, 900)]);
        let mut bytes = MailboxBytes::new(1000);
        // Not known yet: growing or shrinking it is no count to keep.
        bytes.shrank(&a, 900);
        bytes.grew(&a, 10);
        assert!(!bytes.has_room(&connection, &a, 101).unwrap());
        bytes.forget_all();
        connection.execute("DELETE FROM mailbox", []).unwrap();
        assert!(bytes.has_room(&connection, &a, 1000).unwrap());
    }
}
