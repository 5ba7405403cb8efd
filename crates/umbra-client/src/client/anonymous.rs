//! Sending to a group without saying who you are: the message goes on a
//! connection of its own that never logs in, signed with the group's
//! delivery key of the epoch (which every member derives, and only
//! members) and paid for with a token the server signed blindly, so it
//! cannot tell which line got it (ARCHITECTURE.md, "Sending without saying
//! who you are").

use rusqlite::{OptionalExtension, params};
use tracing::debug;
use umbra_proto::content::{Body, Content};
use umbra_proto::tokens::{SendToken, TokenRequest};
use umbra_proto::{AnonymousMessage, ErrorCode, GroupId, Reply, Request};

use crate::error::{ClientError, Result};
use crate::link::Link;
use crate::types::{ConversationId, DeliveryState, Event, Message};

use super::{Client, transit_ttl};

/// Tokens asked for at once.
const TOKENS_PER_REQUEST: usize = 32;
/// Below this many, a device that sends anonymously asks for more when it
/// connects (not when it sends: the request, on its logged-in connection,
/// would tell the server who was about to send).
const LOW_WATER: u64 = 8;
/// The setting that marks a device that sends anonymously.
const SETTING: &str = "anonymous_sending";
/// Attempts at one message whose group's epoch keeps moving, or whose
/// token turns out spent.
const ATTEMPTS: usize = 4;

/// One anonymous message, encrypted, signed and paid for.
struct Prepared {
    message: AnonymousMessage,
}

impl Client {
    /// Sends a text to a group conversation without logging in: the server
    /// learns that a member of the group sent it, not which. Returns it
    /// once the server has stored it for every member device (`Sent`); on
    /// failure it stays in the history as `Failed`. Refused with the
    /// server's `BAD_SIGNATURE` when nobody stated the epoch's delivery key
    /// (a group created before anonymous sending): send it as yourself.
    pub async fn send_text_anonymously(
        &self,
        conversation: &ConversationId,
        text: &str,
    ) -> Result<Message> {
        if text.trim().is_empty() {
            return Err(ClientError::Invalid("empty message".into()));
        }
        let group_id = self.group_id_of(conversation)?;
        self.db().execute(
            "INSERT OR REPLACE INTO settings (key, value) VALUES (?1, '1')",
            [SETTING],
        )?;
        if self.token_stock()? == 0 {
            // Nothing in stock: asking now is linkable by its timing, so a
            // device keeps a stock (refilled when it connects).
            self.fetch_tokens().await?;
        }
        let mut uid = [0u8; 16];
        getrandom::getrandom(&mut uid).map_err(|e| ClientError::Store(e.to_string()))?;
        let content = Content {
            message_id: Some(uid),
            body: Body::Text(text.to_owned()),
            disappear_after: 0,
            sent_at_ms: self.now().saturating_mul(1000),
        };
        let (message_id, mut prepared) = self
            .prepare_anonymous(&group_id, &content, Some(text))
            .await?;
        let mut attempts = 1;
        let sent = loop {
            let sent = self.deliver_anonymously(&prepared).await;
            match sent {
                Err(ClientError::Server {
                    code: ErrorCode::StaleEpoch,
                    current_epoch,
                    ..
                }) if attempts < ATTEMPTS => {
                    attempts += 1;
                    self.return_token(&prepared.message.token)?;
                    if let Err(error) = self.wait_for_epoch(&group_id, current_epoch).await {
                        break Err(error);
                    }
                    match self.prepare_anonymous(&group_id, &content, None).await {
                        Ok((_, again)) => prepared = again,
                        Err(error) => break Err(error),
                    }
                }
                Err(ClientError::Server {
                    code: ErrorCode::TokenSpent | ErrorCode::InvalidToken,
                    ..
                }) if attempts < ATTEMPTS => {
                    // The token is gone (a key retired, or a token this
                    // device spent before a crash): the same message, with
                    // another.
                    attempts += 1;
                    if self.token_stock()? == 0
                        && let Err(error) = self.fetch_tokens().await
                    {
                        break Err(error);
                    }
                    match self.take_token()? {
                        Some(token) => prepared.message.token = token,
                        None => {
                            break Err(ClientError::Invalid("no anonymous-send token left".into()));
                        }
                    }
                }
                Err(error) => {
                    if !matches!(
                        error.server_code(),
                        Some(ErrorCode::TokenSpent | ErrorCode::InvalidToken)
                    ) {
                        // Refused before it was spent (or never sent).
                        self.return_token(&prepared.message.token)?;
                    }
                    break Err(error);
                }
                Ok(reply) => break Ok(reply),
            }
        };
        let state = if sent.is_ok() {
            DeliveryState::Sent
        } else {
            DeliveryState::Failed
        };
        self.db().execute(
            "UPDATE messages SET state = ?2 WHERE id = ?1",
            params![message_id, state.as_str()],
        )?;
        self.emit(Event::DeliveryStateChanged { message_id, state });
        sent?;
        self.message(conversation, message_id)
    }

    /// Encrypts `content` for the group's current epoch, signs it with the
    /// epoch's delivery key and takes a token for it, in one transaction;
    /// with `text`, records the message as `sending`.
    async fn prepare_anonymous(
        &self,
        group_id: &[u8],
        content: &Content,
        text: Option<&str>,
    ) -> Result<(i64, Prepared)> {
        let gid = GroupId::new(group_id.to_vec())?;
        let _ops = self.inner.ops.lock().await;
        self.with_tx(|tx, provider| {
            let mut group = self.sendable(tx, provider, group_id)?;
            let ttl = group.disappear_after();
            let content = Content {
                disappear_after: ttl,
                ..content.clone()
            };
            let token = take_token(tx)?
                .ok_or_else(|| ClientError::Invalid("no anonymous-send token left".into()))?;
            let ciphertext = group.encrypt(provider, &self.inner.signer, &content.encode())?;
            let ttl_seconds = transit_ttl(ttl);
            let signature = group.delivery_key(provider)?.sign(
                &gid,
                group.epoch(),
                ttl_seconds,
                &ciphertext,
            );
            let mut message_id = 0;
            if let Some(text) = text {
                let now = self.now();
                tx.execute(
                    "INSERT INTO messages (group_id, sender, direction, body, state, timestamp, ttl, expires_at, uid)
                     VALUES (?1, ?2, 'out', ?3, 'sending', ?4, ?5, ?6, ?7)",
                    params![
                        group_id,
                        self.inner.account.as_str(),
                        text,
                        now,
                        ttl,
                        (ttl > 0).then(|| now + u64::from(ttl)),
                        content.message_id.as_ref().map(|uid| &uid[..])
                    ],
                )?;
                message_id = tx.last_insert_rowid();
            }
            Ok((
                message_id,
                Prepared {
                    message: AnonymousMessage {
                        group_id: gid.clone(),
                        message: ciphertext,
                        ttl_seconds,
                        signature,
                        token,
                    },
                },
            ))
        })
    }

    /// Sends on a connection of its own, which never logs in and is closed
    /// once the server answered.
    async fn deliver_anonymously(&self, prepared: &Prepared) -> Result<Reply> {
        let (link, _hello, _pushes) =
            Link::connect(&self.inner.server_address, self.inner.server_pin).await?;
        let answer = link
            .request(Request::SendAnonymous(prepared.message.clone()))
            .await;
        link.close();
        answer
    }

    /// Tokens this device holds.
    pub fn token_stock(&self) -> Result<u64> {
        Ok(self
            .db()
            .query_row("SELECT COUNT(*) FROM send_tokens", [], |row| row.get(0))?)
    }

    /// Asks the server (on the logged-in connection) for tokens and keeps
    /// those whose proof checks out against the key the server names.
    /// Returns how many were added.
    pub async fn fetch_tokens(&self) -> Result<usize> {
        let (request, blinded) =
            TokenRequest::new(TOKENS_PER_REQUEST).map_err(|e| ClientError::Store(e.to_string()))?;
        let reply = self.request(Request::IssueTokens { blinded }).await?;
        let Reply::Tokens {
            key_id,
            public_key,
            evaluated,
            proof,
        } = reply
        else {
            return Err(ClientError::Invalid(
                "unexpected reply to IssueTokens".into(),
            ));
        };
        let tokens = request
            .finish(&key_id, &public_key, &evaluated, &proof)
            .map_err(|error| {
                self.emit(Event::ServerMisbehaved {
                    what: format!("its anonymous-send tokens do not check out: {error}"),
                });
                ClientError::Invalid(format!("the server's tokens do not check out: {error}"))
            })?;
        let db = self.db();
        for token in &tokens {
            db.execute(
                "INSERT OR IGNORE INTO send_tokens (nonce, key_id, authenticator) VALUES (?1, ?2, ?3)",
                params![&token.nonce[..], &token.key_id[..], &token.authenticator[..]],
            )?;
        }
        Ok(tokens.len())
    }

    /// On connecting: a device that sends anonymously tops its stock up.
    pub(super) async fn refill_tokens(&self) {
        let used: bool = match self
            .db()
            .query_row("SELECT 1 FROM settings WHERE key = ?1", [SETTING], |_| {
                Ok(())
            })
            .optional()
        {
            Ok(used) => used.is_some(),
            Err(error) => {
                debug!(%error, "reading the anonymous-sending setting");
                return;
            }
        };
        if !used || self.token_stock().is_ok_and(|stock| stock >= LOW_WATER) {
            return;
        }
        if let Err(error) = self.fetch_tokens().await {
            debug!(%error, "topping up anonymous-send tokens");
        }
    }

    fn take_token(&self) -> Result<Option<SendToken>> {
        let db = self.db();
        let tx = db.unchecked_transaction()?;
        let token = take_token(&tx)?;
        tx.commit()?;
        Ok(token)
    }

    fn return_token(&self, token: &SendToken) -> Result<()> {
        self.db().execute(
            "INSERT OR IGNORE INTO send_tokens (nonce, key_id, authenticator) VALUES (?1, ?2, ?3)",
            params![
                &token.nonce[..],
                &token.key_id[..],
                &token.authenticator[..]
            ],
        )?;
        Ok(())
    }
}

/// Takes one token out of the stock (deleting it).
fn take_token(tx: &rusqlite::Connection) -> Result<Option<SendToken>> {
    let row: Option<(Vec<u8>, Vec<u8>, Vec<u8>)> = tx
        .query_row(
            "SELECT nonce, key_id, authenticator FROM send_tokens LIMIT 1",
            [],
            |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
        )
        .optional()?;
    let Some((nonce, key_id, authenticator)) = row else {
        return Ok(None);
    };
    tx.execute("DELETE FROM send_tokens WHERE nonce = ?1", [&nonce])?;
    let corrupt = || ClientError::Store("a stored token is damaged".into());
    Ok(Some(SendToken {
        key_id: key_id.try_into().map_err(|_| corrupt())?,
        nonce: nonce.try_into().map_err(|_| corrupt())?,
        authenticator: authenticator.try_into().map_err(|_| corrupt())?,
    }))
}
