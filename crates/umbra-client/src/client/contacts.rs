//! Contacts: requests, acceptance, safety numbers and verification.

use rusqlite::{OptionalExtension, params};
use umbra_proto::{AccountId, IdentityKey, Request};

use crate::error::{ClientError, Result};
use crate::safety::SafetyNumber;
use crate::types::{Contact, ContactState, ConversationId};

use super::{Client, contact_state, parse_account};

impl Client {
    /// Sends a contact request. Nothing can be exchanged until they accept.
    /// If they had asked first, this accepts their request instead.
    pub async fn add_contact(&self, account: &AccountId) -> Result<()> {
        if account == &self.inner.account {
            return Err(ClientError::Invalid("you cannot add yourself".into()));
        }
        let state = contact_state(&self.db(), account)?;
        match state {
            Some(ContactState::Incoming) => return self.accept_contact(account).await.map(drop),
            Some(ContactState::Accepted) => return Ok(()),
            _ => {}
        }
        // Asking them after all: a decline not yet told is not told.
        self.db().execute(
            "DELETE FROM pending_declines WHERE account_id = ?1",
            [account.as_str()],
        )?;
        self.request(Request::SendContactRequest {
            to: account.clone(),
        })
        .await?;
        self.db().execute(
            "INSERT INTO contacts (account_id, state, updated_at) VALUES (?1, 'outgoing', ?2)
             ON CONFLICT (account_id) DO NOTHING",
            params![account.as_str(), self.now()],
        )?;
        Ok(())
    }

    /// Accepts a contact request and opens the one-to-one conversation.
    pub async fn accept_contact(&self, account: &AccountId) -> Result<ConversationId> {
        let state = contact_state(&self.db(), account)?;
        match state {
            Some(ContactState::Incoming) => {}
            Some(ContactState::Accepted) => {
                if let Some(existing) = self.direct_conversation(account)? {
                    return Ok(existing);
                }
            }
            _ => return Err(ClientError::NoRequest(account.clone())),
        }
        self.request(Request::AcceptContact {
            from: account.clone(),
        })
        .await?;
        self.db().execute(
            "UPDATE contacts SET state = 'accepted', updated_at = ?2 WHERE account_id = ?1",
            params![account.as_str(), self.now()],
        )?;
        let conversation = self
            .new_conversation(None, std::slice::from_ref(account))
            .await?;
        Ok(conversation)
    }

    /// Declines a contact request: it is forgotten on this device, and the
    /// server is told (now, or on the next connection) to drop what still
    /// waits of it and to answer the requester as if it were pending; the
    /// requester is not told. The server forgets every request after 30
    /// days.
    pub async fn decline_contact(&self, account: &AccountId) -> Result<()> {
        {
            let mut db = self.db();
            let tx = db.transaction()?;
            let removed = tx.execute(
                "DELETE FROM contacts WHERE account_id = ?1 AND state = 'incoming'",
                [account.as_str()],
            )?;
            if removed == 0 {
                return Err(ClientError::NoRequest(account.clone()));
            }
            tx.execute(
                "INSERT OR IGNORE INTO pending_declines (account_id) VALUES (?1)",
                [account.as_str()],
            )?;
            tx.commit()?;
        }
        if self.is_connected() {
            self.send_pending_declines().await;
        }
        Ok(())
    }

    /// Tells the server of the declines it has not heard of; each is
    /// forgotten here once the server answered (a failure keeps it for
    /// the next connection).
    pub(super) async fn send_pending_declines(&self) {
        let pending: Vec<String> = match self
            .db()
            .prepare("SELECT account_id FROM pending_declines")
            .and_then(|mut statement| {
                statement
                    .query_map([], |row| row.get(0))?
                    .collect::<rusqlite::Result<_>>()
            }) {
            Ok(pending) => pending,
            Err(error) => {
                tracing::debug!(%error, "reading pending declines");
                return;
            }
        };
        for text in pending {
            let Ok(from) = AccountId::parse(&text) else {
                continue;
            };
            match self.request(Request::DeclineContact { from }).await {
                Ok(_) => {
                    if let Err(error) = self.db().execute(
                        "DELETE FROM pending_declines WHERE account_id = ?1",
                        [&text],
                    ) {
                        tracing::debug!(%error, "forgetting a sent decline");
                    }
                }
                Err(error) => {
                    tracing::debug!(%error, "telling the server of a declined request");
                    return;
                }
            }
        }
    }

    pub fn contacts(&self) -> Result<Vec<Contact>> {
        let db = self.db();
        let mut statement = db.prepare(
            "SELECT c.account_id, c.state, c.verified, c.key_changed, v.group_id, c.key_unconfirmed
             FROM contacts c LEFT JOIN conversations v ON v.peer = c.account_id
             ORDER BY c.account_id",
        )?;
        let rows = statement.query_map([], |row| {
            Ok(Contact {
                account: parse_account(&row.get::<_, String>(0)?)?,
                state: ContactState::parse(&row.get::<_, String>(1)?)
                    .unwrap_or(ContactState::Outgoing),
                verified: row.get(2)?,
                key_changed: row.get(3)?,
                key_unconfirmed: row.get(5)?,
                conversation: row
                    .get::<_, Option<Vec<u8>>>(4)?
                    .map(|g| ConversationId::from_group(&g)),
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// The safety number for this device and `account`.
    pub fn safety_number(&self, account: &AccountId) -> Result<SafetyNumber> {
        let key: Option<Option<Vec<u8>>> = self
            .db()
            .query_row(
                "SELECT identity_key FROM contacts WHERE account_id = ?1",
                [account.as_str()],
                |row| row.get(0),
            )
            .optional()?;
        let key = match key {
            None => return Err(ClientError::NotAContact(account.clone())),
            Some(None) => {
                return Err(ClientError::NotAccepted(account.clone()));
            }
            Some(Some(key)) => IdentityKey::from_slice(&key)?,
        };
        Ok(SafetyNumber::new(
            (&self.inner.account, &self.identity_key()),
            (account, &key),
        ))
    }

    /// The safety number to show the user for comparison; remembers that
    /// it was shown, so that [`Client::verify_contact`] marks exactly the
    /// key it stands for.
    pub fn show_safety_number(&self, account: &AccountId) -> Result<SafetyNumber> {
        let number = self.safety_number(account)?;
        self.db().execute(
            "UPDATE contacts SET shown_key = identity_key WHERE account_id = ?1",
            [account.as_str()],
        )?;
        Ok(number)
    }

    /// Marks a contact verified after the user compared the safety number
    /// last shown ([`Client::show_safety_number`]); clears a key-changed
    /// warning and lets messages go to them again. Refused if the key
    /// changed since that number was shown (or none was).
    pub fn verify_contact(&self, account: &AccountId) -> Result<()> {
        self.confirm_shown_key(
            account,
            "verified = 1, key_changed = 0, key_unconfirmed = 0",
        )
    }

    /// Accepts a contact's changed identity key, as last shown, without
    /// verifying it: messages go to them again, and the contact stays
    /// unverified.
    pub fn accept_key_change(&self, account: &AccountId) -> Result<()> {
        self.confirm_shown_key(account, "key_changed = 0, key_unconfirmed = 0")
    }

    /// Applies `set` to the contact if its key is still the one last shown.
    pub(super) fn confirm_shown_key(&self, account: &AccountId, set: &str) -> Result<()> {
        self.safety_number(account)?;
        let marked = self.db().execute(
            &format!(
                "UPDATE contacts SET {set} WHERE account_id = ?1 AND shown_key = identity_key"
            ),
            [account.as_str()],
        )?;
        if marked == 0 {
            return Err(ClientError::SafetyNumberNotShown(account.clone()));
        }
        Ok(())
    }
}
