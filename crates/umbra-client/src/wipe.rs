//! Remote wipe, self-wipe and revocation.
//!
//! At activation the device draws a wipe seed, keeps only the public half of
//! the key derived from it, and shows the seed to the user once, inside a
//! [`WipeCode`]. Whoever holds the code signs a wipe command; the server
//! relays it; the device checks the signature against its own copy of the
//! public key before wiping. The server cannot make a command that passes:
//! it never had the seed (nor does any device, unless its user sealed the
//! code under a duress passphrase meant for every device).

use std::time::Duration;

use tracing::{info, warn};
use umbra_mls::DeviceSigner;
use umbra_proto::clock::Clock;
use umbra_proto::{IdentityKey, Push, Request, Signature, WipeCode, revoke_signing_payload};

use crate::client::Client;
use crate::error::{ClientError, Result};
use crate::link::Link;
use crate::store;
use crate::types::Event;

/// How long a wiping device waits for the server to confirm its revocation.
const REVOKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Sends the wipe command a wipe code stands for, from any machine.
pub async fn send_wipe(code: &WipeCode, clock: &dyn Clock) -> Result<()> {
    let signer = DeviceSigner::from_wipe_seed(&code.seed);
    let issued_at = clock.now();
    let signature =
        signer.sign_payload(&umbra_proto::wipe_signing_payload(&code.account, issued_at));
    let (link, hello, _pushes) = Link::connect(&code.address, code.pin).await?;
    if !matches!(hello, Push::Hello { .. }) {
        return Err(ClientError::ConnectionLost);
    }
    link.request(Request::Wipe {
        account_id: code.account.clone(),
        issued_at,
        signature,
    })
    .await?;
    Ok(())
}

/// How far before a device was made a wipe command may be signed and still
/// be for it (clocks differ; the server allows as much).
const WIPE_SKEW_SECS: u64 = 300;

/// What a wipe command shown to a device is for it.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Command {
    /// Signed with its wipe key, for its account, after it was made.
    ForThisDevice,
    /// Genuine, but signed before this device was made (linked later): a
    /// wipe the line outlived is not an order to erase a newer device.
    Older,
    /// Not signed with its wipe key for its account.
    Forged,
}

/// Checks a wipe command (issued_at || signature) shown to the device whose
/// store `db` is: against its stored wipe key and account, and against the
/// time it was made.
pub(crate) fn check_command(
    db: &rusqlite::Connection,
    account: &umbra_proto::AccountId,
    payload: &[u8],
) -> Result<Command> {
    let (wipe_key, created_at): (Option<Vec<u8>>, u64) = db.query_row(
        "SELECT wipe_public_key, created_at FROM device",
        [],
        |row| Ok((row.get(0)?, row.get(1)?)),
    )?;
    let genuine = wipe_key
        .and_then(|key| IdentityKey::from_slice(&key).ok())
        .is_some_and(|key| verify_command(&key, account, payload));
    let issued_at = payload
        .first_chunk::<8>()
        .map_or(0, |bytes| u64::from_be_bytes(*bytes));
    Ok(match genuine {
        false => Command::Forged,
        true if issued_at.saturating_add(WIPE_SKEW_SECS) < created_at => Command::Older,
        true => Command::ForThisDevice,
    })
}

/// Checks a relayed wipe command (issued_at || signature) against the
/// device's wipe key.
fn verify_command(
    wipe_key: &IdentityKey,
    account: &umbra_proto::AccountId,
    payload: &[u8],
) -> bool {
    let Some((issued_at, signature)) = payload.split_first_chunk::<8>() else {
        return false;
    };
    let Ok(signature) = Signature::from_slice(signature) else {
        return false;
    };
    let message = umbra_proto::wipe_signing_payload(account, u64::from_be_bytes(*issued_at));
    umbra_mls::verify(wipe_key, &message, &signature)
}

impl Client {
    /// Wipes this device. If it is its account's only device, the line
    /// ends at the server too; otherwise this device is removed from the
    /// account, and the others go on.
    pub async fn wipe_self(&self) -> Result<()> {
        self.wipe_now("requested on this device", false).await
    }

    /// Destroys the local store first (nothing may stand between a genuine
    /// wipe and the shredding), then tells the server with the keys still
    /// in memory (best effort, briefly): the line is revoked if `whole_line`
    /// (a remote wipe, meant for every device) or if this is the account's
    /// only device as far as this device knows; otherwise this device
    /// removes itself from the account's device log. Afterwards this client
    /// can do nothing more.
    pub(crate) async fn wipe_now(&self, reason: &str, whole_line: bool) -> Result<()> {
        let link = self.current_link().ok();
        let farewell = if whole_line {
            None
        } else {
            self.farewell_entry()
        };
        let revocation = match farewell {
            Some(entry) => Request::AppendDeviceEntry { entry },
            None => Request::Revoke {
                account_id: self.account().clone(),
                signature: self.sign(&revoke_signing_payload(self.account())),
            },
        };
        self.close_store();
        let shredded = store::shred(self.home());
        if let Some(link) = link {
            match tokio::time::timeout(REVOKE_TIMEOUT, link.request(revocation)).await {
                Ok(Ok(_)) => info!("line revoked at the server"),
                Ok(Err(error)) => warn!(%error, "the server did not revoke the line"),
                Err(_) => warn!("the server did not confirm the revocation in time"),
            }
        }
        self.disconnect();
        shredded?;
        info!(reason, "device wiped");
        self.emit_event(Event::Wiped);
        Ok(())
    }

    /// The server says this line was revoked, showing `command`, the
    /// newest wipe command relayed for it. If this device's own wipe key
    /// signed it, the holder of the wipe code wiped the account (meant for
    /// every device; one that was away when another acted on it lost its
    /// copy with the line's mailboxes): this device erases itself. The
    /// account key alone, which every linked device holds and a removed
    /// one may have kept, can end the line but never erases a device.
    /// Anything else is the server's claim alone: refused, and said so.
    pub(crate) fn line_ended(&self, command: &[u8]) -> ClientError {
        let revoked = || ClientError::Server {
            code: umbra_proto::ErrorCode::LineRevoked,
            message: "the server says this line was revoked".into(),
            current_epoch: 0,
        };
        let checked = check_command(&self.db(), self.account(), command);
        match checked {
            Ok(Command::ForThisDevice) => {}
            // The line outlived that wipe, and this device came after it.
            Ok(Command::Older) => return revoked(),
            Ok(Command::Forged) => {
                warn!("refusing a wipe command that is not signed with this device's wipe code");
                self.emit_event(Event::ServerMisbehaved {
                    what: "it said this line was wiped, with a command this device's wipe code \
                           did not sign"
                        .into(),
                });
                return revoked();
            }
            Err(error) => return error,
        }
        self.close_store();
        let shredded = store::shred(self.home());
        self.disconnect();
        if let Err(error) = shredded {
            warn!(%error, "erasing the device after its line was wiped");
            return error;
        }
        info!("the line was wiped: device erased");
        self.emit_event(Event::Wiped);
        ClientError::ErasedByAccount
    }
}

/// A revocation of a line signed in advance with its identity key, kept
/// sealed under the duress passphrase so that a duress unlock can end the
/// line at the server even though it cannot open the store.
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Revocation {
    pub address: String,
    pub pin: String,
    pub account: String,
    pub signature: String,
    /// For a duress passphrase set for every device: the wipe code's seed
    /// (hex), to sign a fresh wipe command when it is used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wipe_seed: Option<String>,
}

// The seed wipes every device of the account: overwritten when dropped.
impl Drop for Revocation {
    fn drop(&mut self) {
        if let Some(seed) = &mut self.wipe_seed {
            zeroize::Zeroize::zeroize(seed);
        }
    }
}

impl std::fmt::Debug for Revocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Revocation")
            .field("account", &self.account)
            .finish_non_exhaustive()
    }
}

impl Revocation {
    /// Sends the revocation to the server; first, if it carries the wipe
    /// code's seed, a fresh wipe command, which every device of the line
    /// acts on (or, away meanwhile, is shown when it next logs in).
    pub async fn send(&self) -> Result<()> {
        let pin = umbra_proto::CertFingerprint::from_hex(&self.pin)?;
        let account_id = umbra_proto::AccountId::parse(&self.account)?;
        if let Some(seed) = &self.wipe_seed {
            let seed = zeroize::Zeroizing::new(
                hex::decode(seed)
                    .ok()
                    .and_then(|bytes| <[u8; 16]>::try_from(bytes).ok())
                    .ok_or_else(|| ClientError::Invalid("damaged revocation".into()))?,
            );
            let code = WipeCode {
                address: self.address.clone(),
                pin,
                account: account_id.clone(),
                seed: *seed,
            };
            if let Err(error) = send_wipe(&code, &umbra_proto::clock::SystemClock).await {
                warn!(%error, "the wipe command was not relayed");
            }
        }
        let signature = hex::decode(&self.signature)
            .ok()
            .and_then(|bytes| Signature::from_slice(&bytes).ok())
            .ok_or_else(|| ClientError::Invalid("damaged revocation".into()))?;
        let (link, _, _) = Link::connect(&self.address, pin).await?;
        let revoked = tokio::time::timeout(
            REVOKE_TIMEOUT,
            link.request(Request::Revoke {
                account_id,
                signature,
            }),
        )
        .await
        .map_err(|_| ClientError::Timeout(REVOKE_TIMEOUT.as_secs()))?;
        match revoked {
            // A device that acted on the wipe command ended the line first.
            Err(ClientError::Server {
                code: umbra_proto::ErrorCode::LineRevoked,
                ..
            }) if self.wipe_seed.is_some() => Ok(()),
            other => other.map(|_| ()),
        }
    }
}

/// What a duress passphrase destroys besides the device it is entered on.
#[derive(Debug)]
pub enum DuressScope {
    /// This device alone while the account has others. On an account of
    /// one device the line ends with it (there is nothing else to keep);
    /// a device linked later is then cut off, not erased.
    ThisDevice,
    /// Every device of the account, by a wipe command signed with the wipe
    /// code given here (this device does not hold it otherwise): the line
    /// ends, and each device erases itself, one that is away when it next
    /// connects. The code's seed is sealed under the duress passphrase.
    EveryDevice(WipeCode),
}

impl Client {
    /// Sets a duress passphrase: entered instead of the real one, it
    /// destroys this device (and, as `scope` says, the account's others,
    /// by ending the line at the server when reachable) with the same work
    /// and the same outward behaviour as an unlock. `passphrase` is the
    /// real one, to confirm. Returns whether using it also ends the line
    /// (for every device; or for this one, when it is the account's only
    /// device as far as it knows).
    pub fn set_duress_passphrase(
        &self,
        passphrase: &crate::Passphrase,
        duress: &crate::Passphrase,
        scope: &DuressScope,
    ) -> Result<bool> {
        let (mut kdf, real_key) = store::derive_checked(self.home(), passphrase)?;
        let duress_key = kdf.derive(duress)?;
        if *duress_key == *real_key {
            return Err(ClientError::Invalid(
                "the duress passphrase must differ from the real one".into(),
            ));
        }
        let wipe_seed = match scope {
            DuressScope::ThisDevice => None,
            DuressScope::EveryDevice(code) => {
                let key: Option<Vec<u8>> =
                    self.db()
                        .query_row("SELECT wipe_public_key FROM device", [], |row| row.get(0))?;
                let derived = DeviceSigner::from_wipe_seed(&code.seed).identity_key();
                if code.account != *self.account()
                    || key.as_deref() != Some(&derived.as_bytes()[..])
                {
                    return Err(ClientError::Invalid(
                        "this is not the wipe code of this account".into(),
                    ));
                }
                Some(hex::encode(code.seed))
            }
        };
        // To destroy this device alone on an account with other devices,
        // no revocation of the line is kept (and no removal either: one
        // signed now would be stale by the time it is used). Otherwise
        // the line's revocation is sealed, and for every device the wipe
        // code's seed with it.
        let sealed = if wipe_seed.is_none() && self.farewell_entry().is_some() {
            Vec::new()
        } else {
            let revocation = Revocation {
                address: self.server_address().to_owned(),
                pin: self.server_pin().to_hex(),
                account: self.account().to_string(),
                signature: hex::encode(
                    self.sign(&revoke_signing_payload(self.account()))
                        .as_bytes(),
                ),
                wipe_seed,
            };
            serde_json::to_vec(&revocation).map_err(|e| ClientError::Store(e.to_string()))?
        };
        kdf.set_duress(&duress_key, &sealed)?;
        kdf.write(self.home())?;
        Ok(!sealed.is_empty())
    }

    /// How many wrong passphrases in a row wipe the device (default 10).
    pub fn set_max_failed_unlocks(&self, passphrase: &crate::Passphrase, max: u32) -> Result<()> {
        if max == 0 {
            return Err(ClientError::Invalid("the limit must be at least 1".into()));
        }
        store::derive_checked(self.home(), passphrase)?;
        let mut attempts = crate::secret::Attempts::read(self.home())?;
        attempts.max = max;
        attempts.write(self.home())
    }
}
