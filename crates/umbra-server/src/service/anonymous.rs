//! Anonymous sending: tokens issued to active lines, and application
//! messages accepted from connections that never logged in, signed with
//! their group's delivery key of the epoch (see `umbra_proto::tokens`).

use std::sync::{Arc, Mutex};

use umbra_proto::AnonymousMessage;
use umbra_proto::tokens::{
    MAX_ANONYMOUS_MESSAGE, SendToken, TOKEN_KEY_ID_BYTES, TokenIssuer, verify_anonymous,
};
use umbra_store::{Timestamp, TokenKey};

use super::*;
use crate::service::delivery::check_deliverable;

/// The public half of a delivery key no member holds (that of an all-zero
/// seed), checked against when a group has none.
static NOBODY: std::sync::LazyLock<[u8; 32]> =
    std::sync::LazyLock::new(|| umbra_proto::tokens::DeliveryKey::from_seed(&[0; 32]).public());

/// How long a token key issues tokens; tokens it issued are accepted for
/// as long again, then the key and the record of what was spent under it
/// are forgotten.
pub const TOKEN_KEY_ROTATION: u64 = 30 * 86_400;

/// Token keys with when each was made, newest first.
type Keys = Vec<(Timestamp, Arc<TokenIssuer>)>;

/// The token keys in use, read from the store (which another node may
/// share) and kept in memory.
#[derive(Default)]
pub struct TokenKeys {
    keys: Mutex<Option<Keys>>,
    /// Held while a key is made, so that requests racing each other make
    /// one (every key more is a way to tell lines apart).
    making: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for TokenKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenKeys")
    }
}

impl TokenKeys {
    fn cached(&self) -> Option<Keys> {
        self.keys
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Reads the keys from the store, newest first.
    async fn load(&self, store: &dyn Store) -> Result<Keys, ErrorReply> {
        let mut keys = Vec::new();
        for key in store.token_keys().await.map_err(internal)? {
            let issuer = TokenIssuer::from_secret(&key.secret).map_err(|_| {
                refuse(ErrorCode::Internal, "a stored token key is not a valid key")
            })?;
            keys.push((key.created_at, Arc::new(issuer)));
        }
        *self
            .keys
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(keys.clone());
        Ok(keys)
    }

    /// The key that issues tokens now: made (and the oldest retired) when
    /// the newest is older than [`TOKEN_KEY_ROTATION`].
    async fn current(
        &self,
        store: &dyn Store,
        now: Timestamp,
    ) -> Result<Arc<TokenIssuer>, ErrorReply> {
        let fresh = |keys: &[(Timestamp, Arc<TokenIssuer>)]| {
            keys.first()
                .filter(|(created, _)| created.saturating_add(TOKEN_KEY_ROTATION) > now)
                .map(|(_, issuer)| Arc::clone(issuer))
        };
        if let Some(issuer) = self.cached().as_deref().and_then(fresh) {
            return Ok(issuer);
        }
        let _making = self.making.lock().await;
        // Read again before making one: another request, or another node,
        // may have (every key more is a way to tell lines apart).
        if let Some(issuer) = fresh(&self.load(store).await?) {
            return Ok(issuer);
        }
        let issuer = TokenIssuer::generate()
            .map_err(|_| refuse(ErrorCode::Internal, "could not make a token key"))?;
        // Kept only if no other node made a fresh one meanwhile.
        store
            .add_token_key(
                &TokenKey {
                    id: issuer.id(),
                    secret: issuer.secret().to_vec(),
                    created_at: now,
                },
                now.saturating_sub(TOKEN_KEY_ROTATION),
            )
            .await
            .map_err(internal)?;
        store
            .retire_token_keys(now.saturating_sub(2 * TOKEN_KEY_ROTATION))
            .await
            .map_err(internal)?;
        let keys = self.load(store).await?;
        keys.first()
            .map(|(_, issuer)| Arc::clone(issuer))
            .ok_or_else(|| refuse(ErrorCode::Internal, "the token key was not kept"))
    }

    /// The IDs of the keys that still verify tokens, newest first, as
    /// every connection's Hello announces them (empty if the store cannot
    /// be read: nobody can send anonymously then anyway).
    pub async fn announced(
        &self,
        store: &dyn Store,
        now: Timestamp,
    ) -> Vec<[u8; TOKEN_KEY_ID_BYTES]> {
        // The newest key announced is the one that issues: a device takes
        // tokens only under it.
        if self.current(store, now).await.is_err() {
            return Vec::new();
        }
        let keys = self.cached().unwrap_or_default();
        keys.iter()
            .filter(|(created, _)| created.saturating_add(2 * TOKEN_KEY_ROTATION) > now)
            .map(|(_, issuer)| issuer.id())
            .collect()
    }

    /// The key `id` names, if it still verifies tokens.
    async fn find(
        &self,
        store: &dyn Store,
        id: &[u8; TOKEN_KEY_ID_BYTES],
        now: Timestamp,
    ) -> Result<Option<Arc<TokenIssuer>>, ErrorReply> {
        let pick = |keys: &[(Timestamp, Arc<TokenIssuer>)]| {
            keys.iter()
                .find(|(created, issuer)| {
                    issuer.id() == *id && created.saturating_add(2 * TOKEN_KEY_ROTATION) > now
                })
                .map(|(_, issuer)| Arc::clone(issuer))
        };
        if let Some(found) = self.cached().as_deref().and_then(pick) {
            return Ok(Some(found));
        }
        // Another node may have made it since this one last read.
        Ok(pick(&self.load(store).await?))
    }
}

impl Services {
    /// Signs up to `blinded.len()` token inputs within the line's daily
    /// allowance.
    pub(super) async fn issue_tokens(&self, me: &AccountId, blinded: Vec<Vec<u8>>) -> Outcome {
        self.require_active(me).await?;
        TokenIssuer::check_blinded(&blinded)
            .map_err(|e| refuse(ErrorCode::InvalidRequest, format!("token inputs: {e}")))?;
        let now = self.now();
        // The key first: a failure to make one costs no allowance.
        let issuer = self.tokens.current(&*self.store, now).await?;
        let per_day = self.limits.config.anonymous_sends_per_day;
        let wanted = u32::try_from(blinded.len()).unwrap_or(u32::MAX);
        let granted = self
            .store
            .grant_tokens(me, now / 86_400, wanted, per_day)
            .await
            .map_err(internal)?;
        if granted == 0 {
            return Err(refuse(
                ErrorCode::QuotaExceeded,
                format!(
                    "a line may be issued {per_day} anonymous-send tokens a day; more tomorrow (UTC)"
                ),
            ));
        }
        let granted: Vec<Vec<u8>> = blinded
            .into_iter()
            .take(usize::try_from(granted).unwrap_or(usize::MAX))
            .collect();
        let (evaluated, proof) = issuer
            .issue(&granted)
            .map_err(|e| refuse(ErrorCode::InvalidRequest, format!("token inputs: {e}")))?;
        Ok(Reply::Tokens {
            key_id: issuer.id(),
            public_key: issuer.public_key().to_vec(),
            evaluated,
            proof,
        })
    }

    /// Checks an anonymous message's signature under its group's delivery
    /// key and its token, spends the token and fans the message out to
    /// every member device. Nothing here knows, or logs, who sent it.
    pub(super) async fn send_anonymous(
        &self,
        message: AnonymousMessage,
    ) -> Result<(Durable, Reply), ErrorReply> {
        let AnonymousMessage {
            group_id,
            message,
            ttl_seconds,
            signature,
            token,
        } = message;
        check_deliverable("the message", &message)?;
        if message.len() > MAX_ANONYMOUS_MESSAGE {
            return Err(refuse(
                ErrorCode::FrameTooLarge,
                format!("an anonymous message may be at most {MAX_ANONYMOUS_MESSAGE} bytes"),
            ));
        }
        let header = umbra_mls::message_header(&message)
            .map_err(|e| refuse(ErrorCode::InvalidRequest, e.to_string()))?;
        if header.kind != umbra_mls::MessageKind::Application
            || header.group_id != group_id.as_bytes()
        {
            return Err(refuse(
                ErrorCode::InvalidRequest,
                "only an application message of the group named may be sent anonymously",
            ));
        }
        // One answer for every way of not holding the epoch's key (no such
        // group, no key stated, another epoch, another key): whoever has
        // not proved membership learns nothing about the group.
        let key = self
            .store
            .delivery_key(&group_id)
            .await
            .map_err(internal)?
            .and_then(|(epoch, key)| key.filter(|_| epoch == header.epoch));
        // A signature is checked either way (against a key nobody holds
        // when there is none), so the time taken does not tell either.
        let verified = verify_anonymous(
            &key.unwrap_or(*NOBODY),
            &signature,
            &group_id,
            header.epoch,
            ttl_seconds,
            &message,
        );
        let Some(key) = key.filter(|_| verified) else {
            return Err(not_signed_with_the_key());
        };
        // Nobody can tell whose anonymous messages are whose, so they are
        // counted against the group: a member flooding uses up the
        // group's anonymous sending, not its other traffic.
        let payer = self.payers.group(&group_id);
        self.anonymous_budget
            .check(&payer, tokio::time::Instant::now())
            .map_err(|wait| {
                refuse(
                    ErrorCode::QuotaExceeded,
                    format!(
                        "this group received its hour's anonymous messages; send as yourself, \
                         or anonymously again in {} s",
                        wait.as_secs().max(1)
                    ),
                )
            })?;
        self.spend(&token).await?;
        let now = self.now();
        let expires_at = self.message_expiry(now, ttl_seconds);
        match self
            .store
            .fan_out_anonymous(&group_id, &message, header.epoch, &key, now, expires_at)
            .await
            .map_err(internal)?
        {
            FanOutOutcome::Stored {
                deliveries,
                durable,
            } => {
                let bytes = (message.len() as u64).saturating_mul(deliveries.len() as u64);
                self.anonymous_budget
                    .charge(&payer, bytes, tokio::time::Instant::now());
                self.metrics.anonymous_accepted.inc();
                self.hand_over(deliveries);
                Ok((durable, Reply::Accepted { accepted_at: now }))
            }
            FanOutOutcome::UnknownGroup => Err(unknown_group(&group_id)),
            // A commit came between the check and the fan-out: the token
            // is spent (the sender has more), the message must be made
            // again in the new epoch.
            FanOutOutcome::BehindGroup { current_epoch }
            | FanOutOutcome::AheadOfGroup { current_epoch } => Err(ErrorReply {
                current_epoch,
                ..refuse(
                    ErrorCode::StaleEpoch,
                    format!("the group moved to epoch {current_epoch}"),
                )
            }),
            // Withdrawn (a revocation, a device removed) since it was read
            // above: the same answer as a key never held.
            FanOutOutcome::KeyWithdrawn => Err(not_signed_with_the_key()),
            FanOutOutcome::NotAMember | FanOutOutcome::LineInactive { .. } => Err(refuse(
                ErrorCode::Internal,
                "the store checked a sender of an anonymous message",
            )),
        }
    }

    async fn spend(&self, token: &SendToken) -> Result<(), ErrorReply> {
        let now = self.now();
        let valid = match self.tokens.find(&*self.store, &token.key_id, now).await? {
            Some(issuer) => issuer.verify(token),
            None => false,
        };
        if !valid {
            return Err(refuse(
                ErrorCode::InvalidToken,
                "the token was not issued by this server, or its key has been retired",
            ));
        }
        if !self
            .store
            .spend_token(&token.key_id, &token.nonce)
            .await
            .map_err(internal)?
        {
            return Err(refuse(
                ErrorCode::TokenSpent,
                "the token was spent already (or its key was retired just now)",
            ));
        }
        Ok(())
    }
}

/// The refusal of an anonymous message not signed with the delivery key
/// its group has now.
fn not_signed_with_the_key() -> ErrorReply {
    refuse(
        ErrorCode::BadSignature,
        "not signed with the delivery key of the group's current epoch",
    )
}
