//! Remote wipe, self-wipe and revocation.
//!
//! At activation the device draws a wipe seed, keeps only the public half of
//! the key derived from it, and shows the seed to the user once, inside a
//! [`WipeCode`]. Whoever holds the code signs a wipe command; the server
//! relays it; the device checks the signature against its own copy of the
//! public key before wiping. The server cannot make a command that passes:
//! it never had the seed.

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

/// Checks a relayed wipe command (issued_at || signature) against the
/// device's wipe key.
pub(crate) fn verify_command(
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
    /// Wipes this device and ends its line at the server: the user's own
    /// "wipe everything" from a device they hold.
    pub async fn wipe_self(&self) -> Result<()> {
        self.wipe_now("requested on this device").await
    }

    /// Revokes the line at the server (best effort, briefly), then destroys
    /// the local store. Afterwards this client can do nothing more.
    pub(crate) async fn wipe_now(&self, reason: &str) -> Result<()> {
        if let Ok(link) = self.current_link() {
            let request = Request::Revoke {
                account_id: self.account().clone(),
                signature: self.sign(&revoke_signing_payload(self.account())),
            };
            match tokio::time::timeout(REVOKE_TIMEOUT, link.request(request)).await {
                Ok(Ok(_)) => info!("line revoked at the server"),
                Ok(Err(error)) => warn!(%error, "the server did not revoke the line"),
                Err(_) => warn!("the server did not confirm the revocation in time"),
            }
        }
        self.disconnect();
        self.close_store();
        store::shred(self.home())?;
        info!(reason, "device wiped");
        self.emit_event(Event::Wiped);
        Ok(())
    }
}
