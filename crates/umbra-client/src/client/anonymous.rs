//! Sending to a group without saying who you are: the message goes on a
//! connection of its own that never logs in, signed with the group's
//! delivery key of the epoch (which every member derives, and only
//! members) and paid for with a token the server signed blindly, so it
//! cannot tell which line got it (ARCHITECTURE.md, "Sending without saying
//! who you are").

use rusqlite::{OptionalExtension, params};
use tracing::debug;
use umbra_proto::content::{Body, Content};
use umbra_proto::tokens::{MAX_ANNOUNCED_TOKEN_KEYS, SendToken, TOKEN_KEY_ID_BYTES, TokenRequest};
use umbra_proto::{AnonymousMessage, ErrorCode, GroupId, Push, Reply, Request};

use crate::error::{ClientError, Result};
use crate::link::Link;
use crate::types::{ConversationId, DeliveryState, Event, Message};

use super::{Client, transit_ttl};

/// Tokens asked for at once.
const TOKENS_PER_REQUEST: usize = 32;
/// A device stops asking for its daily batch above this many.
const MAX_STOCK: u64 = 256;
/// The setting that records the UTC day a device last asked for tokens.
const TOKENS_DAY: &str = "tokens_asked_day";
/// Below this many, a device asks for more when it connects (not when it
/// sends: the request, on its logged-in connection, would tell the server
/// who was about to send).
const LOW_WATER: u64 = 8;
/// Attempts at one message whose group's epoch keeps moving, or whose
/// token turns out spent.
const ATTEMPTS: usize = 4;

/// How long a message refused for its epoch waits for a commit that
/// would explain it.
const COMMIT_PATIENCE: std::time::Duration = std::time::Duration::from_secs(3);

/// One anonymous message, encrypted, signed and paid for.
struct Prepared {
    message: AnonymousMessage,
    /// The epoch it was encrypted in.
    epoch: u64,
}

impl Client {
    /// Sends a text to a group conversation without logging in: the server
    /// learns that a member of the group sent it, not which. Returns it
    /// once the server has stored it for every member device (`Sent`); on
    /// failure it stays in the history as `Failed`. Refused with the
    /// server's `BAD_SIGNATURE` when nobody stated the epoch's delivery key
    /// (a group created before anonymous sending): send it as yourself.
    ///
    /// It carries no message ID, so no member answers it with a receipt:
    /// receipts go as their senders, and the one member not sending one
    /// would be the sender.
    pub async fn send_text_anonymously(
        &self,
        conversation: &ConversationId,
        text: &str,
    ) -> Result<Message> {
        if text.trim().is_empty() {
            return Err(ClientError::Invalid("empty message".into()));
        }
        let group_id = self.group_id_of(conversation)?;
        if self.token_stock()? == 0 {
            // Nothing in stock (used up since connecting): asking now is
            // linkable by its timing, which is why every device keeps a
            // stock, topped up when it connects.
            self.fetch_tokens().await?;
        }
        let content = Content {
            message_id: None,
            body: Body::Text(text.to_owned()),
            disappear_after: 0,
            sent_at_ms: self.now().saturating_mul(1000),
        };
        let (message_id, prepared) = self
            .prepare_anonymous(&group_id, &content, Some(text))
            .await?;
        let sent = self.send_prepared(&group_id, &content, prepared).await;
        let state = if sent.is_ok() {
            DeliveryState::Sent
        } else {
            DeliveryState::Failed
        };
        // Only from `sending`: the answer comes on a connection of its
        // own, after the copies went out.
        let updated = self.db().execute(
            "UPDATE messages SET state = ?2 WHERE id = ?1 AND state = 'sending'",
            params![message_id, state.as_str()],
        )?;
        if updated > 0 {
            self.emit(Event::DeliveryStateChanged { message_id, state });
        }
        sent?;
        self.message(conversation, message_id)
    }

    /// Sends a prepared message, again in a new epoch or with another
    /// token as the server's answers require.
    async fn send_prepared(
        &self,
        group_id: &[u8],
        content: &Content,
        mut prepared: Prepared,
    ) -> Result<Reply> {
        for attempt in 1..=ATTEMPTS {
            let last = attempt == ATTEMPTS;
            match self.deliver_anonymously(&prepared).await {
                Ok(reply) => return Ok(reply),
                // The token never left the device: it goes back.
                Err(
                    error @ (ClientError::UntrustedTokens(_)
                    | ClientError::Unreachable { .. }
                    | ClientError::CertificateMismatch
                    | ClientError::CertificateOutOfDate),
                ) => {
                    self.return_token(&prepared.message.token)?;
                    return Err(error);
                }
                // Its key is no longer announced (retired): tokens under it
                // are worth nothing; the same message with another.
                Err(ClientError::Server {
                    code: ErrorCode::InvalidToken | ErrorCode::TokenSpent,
                    ..
                })
                | Err(ClientError::TokenKeyRetired)
                    if !last =>
                {
                    self.db().execute(
                        "DELETE FROM send_tokens WHERE key_id = ?1",
                        [&prepared.message.token.key_id[..]],
                    )?;
                    if self.token_stock()? == 0 {
                        self.fetch_tokens().await?;
                    }
                    prepared.message.token = self.take_token()?.ok_or_else(|| {
                        ClientError::Invalid("no anonymous-send token left".into())
                    })?;
                }
                // Refused for its epoch (the server tells nobody who has
                // not proved membership which epoch the group is at): when
                // a commit arrives meanwhile, the message goes again in
                // the new one. The token may have been seen, so it is not
                // offered again (a repeated nonce would link two messages).
                Err(
                    error @ ClientError::Server {
                        code: ErrorCode::BadSignature,
                        ..
                    },
                ) => {
                    let moved = tokio::time::timeout(
                        COMMIT_PATIENCE,
                        self.wait_for_epoch(group_id, prepared.epoch + 1),
                    )
                    .await
                    .is_ok_and(|waited| waited.is_ok());
                    if last || !moved {
                        return Err(error);
                    }
                    prepared = self.prepare_anonymous(group_id, content, None).await?.1;
                }
                // A commit won the race after the token was spent.
                Err(ClientError::Server {
                    code: ErrorCode::StaleEpoch,
                    current_epoch,
                    ..
                }) if !last => {
                    self.wait_for_epoch(group_id, current_epoch).await?;
                    prepared = self.prepare_anonymous(group_id, content, None).await?.1;
                }
                Err(error) => return Err(error),
            }
        }
        Err(ClientError::CommitContention)
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
            let signature =
                group
                    .delivery_key(provider)?
                    .sign(&gid, group.epoch(), ttl_seconds, &ciphertext);
            let message_id = match text {
                Some(text) => {
                    self.record_outgoing(tx, group_id, text, ttl, content.message_id.as_ref())?
                }
                None => 0,
            };
            Ok((
                message_id,
                Prepared {
                    epoch: group.epoch(),
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
        let (link, hello, _pushes) =
            Link::connect(&self.inner.server_address, self.inner.server_pin).await?;
        // The token's key must be one the server announces to every
        // connection, among few: a key made for one line would tell its
        // tokens apart.
        let announced = match &hello {
            Push::Hello { token_keys, .. } => token_keys.clone(),
            _ => Vec::new(),
        };
        if announced.len() > MAX_ANNOUNCED_TOKEN_KEYS {
            link.close();
            let what = format!(
                "it announces {} token keys, where an honest server has at most \
                 {MAX_ANNOUNCED_TOKEN_KEYS}: it could be giving lines keys of their own, to tell \
                 their anonymous messages apart",
                announced.len()
            );
            self.emit(Event::ServerMisbehaved { what: what.clone() });
            return Err(ClientError::UntrustedTokens(what));
        }
        if !announced.contains(&prepared.message.token.key_id) {
            // Tokens are taken only under the newest key announced, so
            // one no longer listed was retired.
            link.close();
            return Err(ClientError::TokenKeyRetired);
        }
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
        // Only under the key that issues now, the newest this connection's
        // Hello announced (to every connection alike): a key for some lines
        // only would tell their tokens apart. (A key made since this device
        // connected is checked against a fresh Hello.)
        let announced = self.announced_token_keys();
        if announced.first().is_some_and(|newest| *newest != key_id) {
            let (link, hello, _pushes) =
                Link::connect(&self.inner.server_address, self.inner.server_pin).await?;
            link.close();
            let fresh = match hello {
                Push::Hello { token_keys, .. } => token_keys,
                _ => Vec::new(),
            };
            if fresh.first() != Some(&key_id) {
                let what = "it issued anonymous-send tokens under a key it does not announce as \
                            its newest: it could be giving this line a key of its own"
                    .to_owned();
                self.emit(Event::ServerMisbehaved { what: what.clone() });
                return Err(ClientError::UntrustedTokens(what));
            }
        }
        let tokens = request
            .finish(&key_id, &public_key, &evaluated, &proof)
            .map_err(|error| {
                self.emit(Event::ServerMisbehaved {
                    what: format!("its anonymous-send tokens do not check out: {error}"),
                });
                ClientError::UntrustedTokens(format!("its tokens do not check out: {error}"))
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

    /// On connecting: tokens under keys the server no longer announces
    /// (retired) are dropped, and every device asks for a batch on its
    /// first connection of each UTC day while its stock is under
    /// [`MAX_STOCK`], and whenever it is under [`LOW_WATER`]: whether it
    /// ever sends anonymously or not, so that asking points at nobody.
    pub(super) async fn refill_tokens(&self) {
        let announced = self.announced_token_keys();
        if announced.len() > MAX_ANNOUNCED_TOKEN_KEYS {
            self.emit(Event::ServerMisbehaved {
                what: format!(
                    "it announces {} token keys, where an honest server has at most \
                     {MAX_ANNOUNCED_TOKEN_KEYS}: it could be giving lines keys of their own",
                    announced.len()
                ),
            });
            return;
        }
        if let Err(error) = self.drop_tokens_not_under(&announced) {
            debug!(%error, "dropping retired tokens");
        }
        let today = (self.now() / 86_400).to_string();
        let asked_today = self
            .db()
            .query_row(
                "SELECT value FROM settings WHERE key = ?1",
                [TOKENS_DAY],
                |row| row.get::<_, String>(0),
            )
            .optional()
            .ok()
            .flatten()
            .is_some_and(|day| day == today);
        let stock = self.token_stock().unwrap_or(0);
        if stock >= MAX_STOCK || (asked_today && stock >= LOW_WATER) {
            return;
        }
        match self.fetch_tokens().await {
            Ok(_) => {
                if let Err(error) = self.db().execute(
                    "INSERT OR REPLACE INTO settings (key, value) VALUES (?1, ?2)",
                    params![TOKENS_DAY, today],
                ) {
                    debug!(%error, "recording the day tokens were asked for");
                }
            }
            Err(error) => debug!(%error, "topping up anonymous-send tokens"),
        }
    }

    /// The token keys the logged-in connection's Hello announced.
    fn announced_token_keys(&self) -> Vec<[u8; TOKEN_KEY_ID_BYTES]> {
        self.inner
            .token_keys
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Deletes the tokens under any key but `announced` (nothing when no
    /// key is announced: a server that has not made one yet).
    fn drop_tokens_not_under(&self, announced: &[[u8; TOKEN_KEY_ID_BYTES]]) -> Result<()> {
        if announced.is_empty() {
            return Ok(());
        }
        let db = self.db();
        let tx = db.unchecked_transaction()?;
        let keys: Vec<Vec<u8>> = {
            let mut statement = tx.prepare("SELECT DISTINCT key_id FROM send_tokens")?;
            let rows = statement.query_map([], |row| row.get(0))?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        for key in keys {
            if !announced.iter().any(|a| a[..] == key[..]) {
                tx.execute("DELETE FROM send_tokens WHERE key_id = ?1", [&key])?;
            }
        }
        tx.commit()?;
        Ok(())
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
