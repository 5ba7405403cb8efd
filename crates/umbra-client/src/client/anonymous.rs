//! Sending to a group without saying who you are: the message goes on a
//! connection of its own that never logs in, signed with the group's
//! delivery key of the epoch (which every member derives, and only
//! members) and paid for with a token the server signed blindly, so it
//! cannot tell which line got it (ARCHITECTURE.md, "Sending without saying
//! who you are").

use rusqlite::{OptionalExtension, params};
use tracing::debug;
use umbra_proto::content::{Body, Content};
use umbra_proto::tokens::{MAX_ANNOUNCED_TOKEN_KEYS, SendToken, TokenRequest};
use umbra_proto::{AnonymousMessage, ErrorCode, GroupId, Push, Reply, Request};

use crate::error::{ClientError, Result};
use crate::link::Link;
use crate::types::{ConversationId, DeliveryState, Event, Message};

use super::{Client, transit_ttl};

/// Tokens asked for at once.
const TOKENS_PER_REQUEST: usize = 32;
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
            let retry = attempts < ATTEMPTS;
            match sent {
                Ok(reply) => break Ok(reply),
                // Refused before the token was spent: the server answers
                // this for any epoch but its current one (it tells nobody
                // who has not proved membership which that is). When a
                // commit arrives meanwhile, the message goes again in the
                // new epoch.
                Err(
                    error @ ClientError::Server {
                        code: ErrorCode::BadSignature,
                        ..
                    },
                ) => {
                    self.return_token(&prepared.message.token)?;
                    let moved = tokio::time::timeout(
                        COMMIT_PATIENCE,
                        self.wait_for_epoch(&group_id, prepared.epoch + 1),
                    )
                    .await
                    .is_ok_and(|waited| waited.is_ok());
                    if !(retry && moved) {
                        break Err(error);
                    }
                    attempts += 1;
                    match self.prepare_anonymous(&group_id, &content, None).await {
                        Ok((_, again)) => prepared = again,
                        Err(error) => break Err(error),
                    }
                }
                // A commit won the race after the token was spent: the
                // message again in the new epoch, with another token.
                Err(ClientError::Server {
                    code: ErrorCode::StaleEpoch,
                    current_epoch,
                    ..
                }) if retry => {
                    attempts += 1;
                    if let Err(error) = self.wait_for_epoch(&group_id, current_epoch).await {
                        break Err(error);
                    }
                    match self.prepare_anonymous(&group_id, &content, None).await {
                        Ok((_, again)) => prepared = again,
                        Err(error) => break Err(error),
                    }
                }
                // The token is gone (a key retired, or a token this device
                // spent before a crash): the same message, with another.
                Err(ClientError::Server {
                    code: ErrorCode::TokenSpent | ErrorCode::InvalidToken,
                    ..
                }) if retry => {
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
                    // A token goes back only when the server certainly did
                    // not spend it: used twice, it would tell the server
                    // that two messages came from one sender.
                    let unspent = match &error {
                        ClientError::UntrustedTokens(_)
                        | ClientError::Unreachable { .. }
                        | ClientError::CertificateMismatch => true,
                        ClientError::Server { code, .. } => matches!(
                            code,
                            ErrorCode::QuotaExceeded
                                | ErrorCode::InvalidRequest
                                | ErrorCode::FrameTooLarge
                                | ErrorCode::RateLimited
                                | ErrorCode::TooManyConnections
                        ),
                        _ => false,
                    };
                    if unspent {
                        self.return_token(&prepared.message.token)?;
                    }
                    break Err(error);
                }
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
        let key = prepared.message.token.key_id;
        if !announced.contains(&key) || announced.len() > MAX_ANNOUNCED_TOKEN_KEYS {
            link.close();
            let what = if announced.contains(&key) {
                format!(
                    "it announces {} token keys, where an honest server has at most {MAX_ANNOUNCED_TOKEN_KEYS}: \
                     it could be giving lines keys of their own, to tell their anonymous messages apart",
                    announced.len()
                )
            } else {
                "it did not announce the key of the tokens it gave this device: \
                 it could be telling this device's anonymous messages apart"
                    .to_owned()
            };
            self.emit(Event::ServerMisbehaved { what: what.clone() });
            return Err(ClientError::UntrustedTokens(what));
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

    /// On connecting, every device tops its stock up (whether or not it
    /// ever sent anonymously: asking only before sending would point the
    /// server at the senders).
    pub(super) async fn refill_tokens(&self) {
        if self.token_stock().is_ok_and(|stock| stock >= LOW_WATER) {
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
