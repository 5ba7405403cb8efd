//! The connection: opening it, logging in, keeping KeyPackages stocked,
//! and closing it.

use std::sync::Arc;

use rusqlite::Connection;
use tracing::{debug, warn};
use umbra_mls::{DeviceSigner, Suite};
use umbra_proto::{
    ErrorCode, IdentityKey, Push, Reply, Request, Signature, ended_login_signing_payload,
    login_signing_payload,
};

use crate::error::{ClientError, Result};
use crate::link::{Link, REQUEST_TIMEOUT};

use crate::types::{ConnectionState, Event};

use super::{Client, Inner};

impl Client {
    pub(super) fn link(&self) -> Result<Arc<Link>> {
        self.inner
            .link
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .filter(|link| link.is_alive())
            .ok_or(ClientError::NotConnected)
    }

    /// Starts erasing messages as they expire, once per client, when an
    /// async runtime is there to run it.
    pub(crate) fn start_expiry_ticker(&self) {
        if let Ok(runtime) = tokio::runtime::Handle::try_current()
            && !self
                .inner
                .ticking
                .swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            runtime.spawn(crate::disappearing::expiry_ticker(Arc::downgrade(
                &self.inner,
            )));
        }
    }

    pub(crate) fn inner_options(&self) -> &super::ClientOptions {
        &self.inner.options
    }

    pub(crate) fn receipts_flushing(&self) -> &std::sync::atomic::AtomicBool {
        &self.inner.receipts_flushing
    }

    pub(crate) fn signer(&self) -> &DeviceSigner {
        &self.inner.signer
    }

    pub(crate) fn from_weak(inner: &std::sync::Weak<Inner>) -> Option<Client> {
        inner.upgrade().map(|inner| Client { inner })
    }

    pub(crate) fn current_link(&self) -> Result<Arc<Link>> {
        self.link()
    }

    /// Signs with the account key (what the server registered for the
    /// line, and checks revocations against).
    pub(crate) fn sign(&self, payload: &[u8]) -> Signature {
        self.account_signer().sign_payload(payload)
    }

    pub(crate) fn emit_event(&self, event: Event) {
        self.emit(event);
    }

    /// Tells the front end everything a committed change produced, in
    /// order.
    pub(crate) fn emit_all(&self, events: Vec<Event>) {
        for event in events {
            self.emit(event);
        }
    }

    /// Closes the store file (replacing the connection with an empty
    /// in-memory one), so that it can be overwritten and removed.
    pub(crate) fn close_store(&self) {
        if let Ok(empty) = Connection::open_in_memory() {
            *self.db() = empty;
        }
    }

    pub(super) fn is_current(&self, link: &Arc<Link>) -> bool {
        self.inner
            .link
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_some_and(|current| Arc::ptr_eq(current, link))
    }

    pub fn is_connected(&self) -> bool {
        self.link().is_ok()
    }

    pub(crate) async fn request(&self, request: Request) -> Result<Reply> {
        self.link()?.request(request).await
    }

    /// Connects and authenticates, then applies what the server stored while
    /// this device was away (in the background: see [`Client::sync`]).
    pub async fn connect(&self) -> Result<()> {
        let (link, hello, pushes) =
            Link::connect(&self.inner.server_address, self.inner.server_pin).await?;
        let link = Arc::new(link);
        let started = self.start_session(&link, hello, pushes).await;
        if started.is_err() {
            self.report_flood(&link);
        }
        started
    }

    /// Tells the front end if `link` was dropped because the server flooded
    /// it with pushes.
    pub(super) fn report_flood(&self, link: &Link) {
        if link.flooded() {
            self.emit(Event::ServerMisbehaved {
                what: "it pushed far more than the protocol's flow control allows; the connection was dropped".into(),
            });
        }
    }

    /// Logs in on a new link, then starts applying its pushes.
    pub(super) async fn start_session(
        &self,
        link: &Arc<Link>,
        hello: Push,
        pushes: crate::link::Pushes,
    ) -> Result<()> {
        let Push::Hello {
            nonce, token_keys, ..
        } = hello
        else {
            return Err(ClientError::ConnectionLost);
        };
        *self
            .inner
            .token_keys
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = token_keys;
        let account = &self.inner.account;
        let login = |signer: &DeviceSigner, payload: Vec<u8>| Request::Login {
            account_id: account.clone(),
            device: self.inner.device,
            signature: signer.sign_payload(&payload),
        };
        let reply = match link
            .request(login(
                &self.inner.signer,
                login_signing_payload(&nonce, account),
            ))
            .await
        {
            // A linked device that is not on its account's list any more:
            // removed, or its line ended (and the devices with it). It asks
            // with the account key, over a payload no login takes; only for
            // an ended line does the server answer, with `LINE_REVOKED` and
            // the wipe command that ended it, if any.
            Err(ClientError::Server {
                code: ErrorCode::BadSignature,
                ..
            }) if self.inner.account_signer.is_some() => {
                link.request(login(
                    self.account_signer(),
                    ended_login_signing_payload(&nonce, account),
                ))
                .await
            }
            other => other,
        };
        let reply = match reply {
            Err(ClientError::LineEnded { wipe_command }) => {
                return Err(self.line_ended(&wipe_command));
            }
            other => other?,
        };
        let Reply::LoggedIn {
            subscription_expires_at,
            key_packages_remaining,
            has_last_resort,
            key_package_low_water,
            stocks,
        } = reply
        else {
            return Err(ClientError::Invalid("unexpected reply to Login".into()));
        };
        self.db().execute(
            "UPDATE device SET subscription_expires_at = ?1",
            [subscription_expires_at],
        )?;
        self.inner.synced.send_replace(0);
        let previous = self
            .inner
            .link
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .replace(Arc::clone(link));
        if let Some(previous) = previous {
            previous.close();
        }
        // Register the wipe key again on every connection: cheap, and it
        // repairs an activation whose first registration did not arrive.
        let wipe_key: Option<Vec<u8>> =
            self.db()
                .query_row("SELECT wipe_public_key FROM device", [], |row| row.get(0))?;
        if let Some(wipe_key) = wipe_key.and_then(|key| IdentityKey::from_slice(&key).ok()) {
            match link.request(Request::SetWipeKey { wipe_key }).await {
                // The server holds another wipe key for this line: this
                // device's wipe code would not be relayed.
                Err(ClientError::Server {
                    code: ErrorCode::InvalidRequest,
                    ..
                }) => self.emit(Event::ServerMisbehaved {
                    what: "it holds another wipe key for this line, so the wipe code would not \
                           work"
                        .into(),
                }),
                other => {
                    other?;
                }
            }
        }
        // Settle commits whose verdict was lost before applying anything:
        // the backlog may hold messages from the epoch after them.
        self.resubmit_pending_commits().await?;
        self.resume_rejoins()?;
        self.send_pending_declines().await;
        // Beside the session: the tokens' request must not hold up
        // connecting.
        let client = self.clone();
        tokio::spawn(async move { client.refill_tokens().await });
        // The account's device log: written on the first connection of a
        // device whose account has none, beside the session (the server's
        // answers cannot hold up connecting). A log that fails
        // verification is the server's doing; the device says so.
        let client = self.clone();
        tokio::spawn(async move {
            match client.ensure_device_log().await {
                Ok(()) => {}
                Err(ClientError::DeviceLog { account, error }) => {
                    client.emit(Event::ServerMisbehaved {
                        what: format!(
                            "the device list it keeps for {account} fails verification: {error}"
                        ),
                    })
                }
                Err(error) => debug!(%error, "device log"),
            }
        });
        tokio::spawn(self.clone().apply_pushes(pushes, Arc::clone(link)));
        self.emit(Event::Connection {
            state: ConnectionState::Connected,
        });
        // A server that counts no stock per suite keeps the classical
        // suite's alone: nothing else is uploaded to it, or asked of it.
        let taken: Vec<Suite> = if stocks.is_empty() {
            vec![Suite::CLASSICAL]
        } else {
            stocks
                .iter()
                .filter_map(|stock| Suite::from_code(stock.suite))
                .collect()
        };
        *self
            .inner
            .server_suites
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = taken;
        // The post-quantum suite first: the classical packages say the
        // device offers it only once the server holds some (else a peer
        // would take the server for withholding them).
        self.inner.post_quantum_at_server.store(
            stocks.iter().any(|stock| {
                Suite::from_code(stock.suite).is_some_and(Suite::is_post_quantum)
                    && stock.has_last_resort
            }),
            std::sync::atomic::Ordering::SeqCst,
        );
        for suite in self.offered_suites() {
            let (remaining, has_last_resort) =
                match stocks.iter().find(|stock| stock.suite == suite.code()) {
                    Some(stock) => (stock.remaining, stock.has_last_resort),
                    None => (key_packages_remaining, has_last_resort),
                };
            if remaining >= key_package_low_water && has_last_resort {
                continue;
            }
            let uploaded = self
                .upload_key_packages(
                    suite,
                    self.inner.options.key_package_batch,
                    !has_last_resort || remaining == 0,
                )
                .await;
            match uploaded {
                // A full server still serves reads: the device stays
                // connected and reads its mailbox; the next connection (or
                // the next "KeyPackages low" notice) uploads again.
                Err(error) if error.server_code() == Some(ErrorCode::StorageFull) => {
                    debug!(%error, "uploading KeyPackages deferred");
                }
                // Another suite refused is not worth the session: the
                // classical one is what every conversation can fall back to.
                // (It said at login it takes the suite: a refusal hides the
                // device's post-quantum packages from its contacts, who
                // would see only classical ones and take them as all it
                // offers. Said, not hidden.)
                Err(error) if suite != Suite::CLASSICAL && error.server_code().is_some() => {
                    warn!(%error, %suite, "uploading KeyPackages refused");
                    self.emit(Event::ServerMisbehaved {
                        what: format!("it refused this device's {suite} KeyPackages: {error}"),
                    });
                }
                other => other?,
            }
        }
        self.start_expiry_ticker();
        // Once the backlog is applied, refresh our keys where they are due.
        let client = self.clone();
        tokio::spawn(async move {
            if client.sync().await.is_ok()
                && let Err(error) = client.update_keys_if_due().await
            {
                debug!(%error, "periodic key update");
            }
        });
        Ok(())
    }

    /// Closes the connection.
    pub fn disconnect(&self) {
        let link = self
            .inner
            .link
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(link) = link {
            link.close();
        }
    }

    /// Waits until everything the server held for this device when it
    /// connected has been applied and acknowledged, and the receipts
    /// already due (kept from earlier) have gone out.
    pub async fn sync(&self) -> Result<()> {
        let mut synced = self.inner.synced.subscribe();
        let wait = synced.wait_for(|count| *count > 0);
        match tokio::time::timeout(REQUEST_TIMEOUT, wait).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => return Err(ClientError::ConnectionLost),
            Err(_) => return Err(ClientError::Timeout(REQUEST_TIMEOUT.as_secs())),
        }
        if let Err(error) = self.flush_receipts().await {
            debug!(%error, "sending receipts");
        }
        if self.is_connected() {
            Ok(())
        } else {
            Err(ClientError::ConnectionLost)
        }
    }

    /// The suites this device offers KeyPackages of, most preferred first:
    /// the one its options prefer for new conversations (post-quantum by
    /// default), and the classical one every Umbra device offers, so a
    /// conversation with a device that offers nothing else still starts.
    /// Only those the server keeps (as it said at login).
    pub(super) fn offered_suites(&self) -> Vec<Suite> {
        let taken = self
            .inner
            .server_suites
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let preferred = self.inner.options.group.suite;
        let mut suites = vec![preferred];
        if preferred != Suite::CLASSICAL {
            suites.push(Suite::CLASSICAL);
        }
        suites.retain(|suite| *suite == Suite::CLASSICAL || taken.contains(suite));
        suites
    }

    /// The suites a KeyPackage of `suite` says this device offers: its own,
    /// and of the others those the server holds packages of (a classical
    /// package listing the post-quantum suite while the server holds none
    /// would have peers take the server for withholding them).
    fn advertised_suites(&self, suite: Suite) -> Vec<Suite> {
        let at_server = self
            .inner
            .post_quantum_at_server
            .load(std::sync::atomic::Ordering::SeqCst);
        let mut suites = self.offered_suites();
        suites.retain(|offered| *offered == suite || !offered.is_post_quantum() || at_server);
        suites
    }

    /// Uploads `batch` one-time KeyPackages of `suite` and, if asked, a
    /// new last-resort one.
    pub(super) async fn upload_key_packages(
        &self,
        suite: Suite,
        batch: usize,
        with_last_resort: bool,
    ) -> Result<()> {
        let capable = self.advertised_suites(suite);
        let (one_time, last_resort) = self.with_tx(|_, provider| {
            let make = |last| {
                umbra_mls::new_offering_key_package(
                    provider,
                    &self.inner.signer,
                    &self.inner.account,
                    (suite, &capable),
                    last,
                    self.certificate(),
                )
            };
            let one_time = (0..batch)
                .map(|_| make(false))
                .collect::<Result<Vec<_>, _>>()?;
            let last_resort = with_last_resort.then(|| make(true)).transpose()?;
            Ok((one_time, last_resort))
        })?;
        self.request(Request::UploadKeyPackages {
            key_packages: one_time,
            last_resort,
        })
        .await?;
        if suite.is_post_quantum() && with_last_resort {
            self.inner
                .post_quantum_at_server
                .store(true, std::sync::atomic::Ordering::SeqCst);
        }
        debug!(batch, with_last_resort, %suite, "uploaded KeyPackages");
        Ok(())
    }

    /// Replaces the last-resort KeyPackage, as an audit of openmls users
    /// advised (a reused last-resort package weakens forward secrecy for
    /// new conversations). The one-time pool is topped up when the server
    /// says it runs low (it caps how many may wait there).
    pub async fn rotate_key_packages(&self) -> Result<()> {
        for suite in self.offered_suites() {
            self.upload_key_packages(suite, 0, true).await?;
        }
        Ok(())
    }
}
