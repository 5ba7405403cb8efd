//! The services behind the protocol: authentication, the KeyPackage
//! directory, contacts and the MLS delivery service. One call per request;
//! the connection handler owns the socket, this owns the rules. This file
//! dispatches requests and holds authentication, contacts and the
//! directory; `delivery.rs` the delivery service, `devices.rs` device logs,
//! `lines.rs` wipes, revocation and distributors.

use std::sync::Arc;

use tracing::{debug, info, warn};
use umbra_proto::frame::CommitSubmission;
use umbra_proto::frame::{CodeKind, LineAction, LineInfo};
use umbra_proto::{
    AccountId, ActivationCode, ActivationString, DeliveryKind, DeviceAddr, DeviceId, ErrorCode,
    ErrorReply, GroupId, Nonce, Reply, Request, Signature, distributor_login_payload,
    ended_login_signing_payload, login_signing_payload, register_signing_payload,
    revoke_signing_payload, wipe_signing_payload,
};
use umbra_store::{
    Account, CodeHash, CommitOutcome, CommitRecord, ContactAcceptOutcome, ContactRequestOutcome,
    Durable, FanOutOutcome, LineStatus, Notice, Registration, Renewal, Store, StoreError,
};

use crate::registry::Registry;
use umbra_proto::clock::Clock;
use umbra_proto::spent::{Budget, Payer};

mod anonymous;
mod blobs;
mod delivery;
mod devices;
pub(crate) use devices::removed_session;
mod lines;

pub use anonymous::{TOKEN_KEY_ROTATION, TokenKeys};

use delivery::{line_refusal, not_a_member, unknown_group};

/// Where a connection stands in authentication.
#[derive(Debug, Clone)]
pub enum Session {
    /// Waiting for Register or Login signed over this nonce.
    AwaitingAuth { nonce: Nonce },
    /// Line status and subscription are read from the store on each send,
    /// so a suspension or renewal takes effect at once.
    Authenticated {
        account: AccountId,
        device: umbra_proto::DeviceId,
    },
    /// A distributor: manages its own lines, never sees content.
    Distributor { id: u64 },
}

/// Rules that the services apply: the configuration (every limit and
/// timeout is read from it where it applies), and what the configuration
/// does not hold.
#[derive(Debug, Clone)]
pub struct Limits {
    pub config: crate::Config,
    /// The certificate pin activation strings carry.
    pub pin: umbra_proto::CertFingerprint,
    /// How far a connection's pushes may run ahead of its acknowledgements.
    pub push_window: PushWindow,
}

/// A fixed key nobody holds: what an unauthenticated request's signature is
/// checked against when the account or distributor it names does not exist,
/// so that the answer and the work are the same as for a bad signature.
fn nobody() -> umbra_proto::IdentityKey {
    static NOBODY: std::sync::OnceLock<umbra_proto::IdentityKey> = std::sync::OnceLock::new();
    *NOBODY.get_or_init(|| umbra_mls::DeviceSigner::from_secret(&[0x5a; 32]).identity_key())
}

impl Services {
    /// Refuses a send while the account's delivery budget is used up.
    fn within_budget(&self, me: &AccountId) -> Result<(), ErrorReply> {
        self.send_budget
            .check(
                &self.payers.account(Budget::Delivery, me),
                tokio::time::Instant::now(),
            )
            .map_err(|wait| {
                refuse(
                    ErrorCode::QuotaExceeded,
                    format!(
                        "this account delivered more than {} MiB this hour; try again in {} s",
                        self.limits.config.delivery_bytes_per_hour / (1024 * 1024),
                        wait.as_secs().max(1)
                    ),
                )
            })
    }

    /// Charges `me` for `bytes` delivered to each of `recipients`.
    fn charge(&self, me: &AccountId, bytes: usize, recipients: usize) {
        let total = (bytes as u64).saturating_mul(recipients as u64);
        if total > 0 {
            self.send_budget.charge(
                &self.payers.account(Budget::Delivery, me),
                total,
                tokio::time::Instant::now(),
            );
        }
    }
}

impl Services {
    /// A put or a get at a rendezvous, or its close by `opener`: here if
    /// this node holds it, else at the node of the cluster that does.
    async fn at_rendezvous(&self, request: Request, opener: Option<&AccountId>) -> Outcome {
        let now = self.now();
        let rendezvous = match &request {
            Request::RendezvousPut {
                rendezvous,
                slot,
                payload,
            } => {
                crate::rendezvous::check_put(*slot, payload.len())?;
                rendezvous
            }
            Request::RendezvousGet { rendezvous, .. } | Request::CloseRendezvous { rendezvous } => {
                rendezvous
            }
            _ => return Err(refuse(ErrorCode::Internal, "not a rendezvous request")),
        };
        if !self.rendezvous.holds(rendezvous, now)
            && let Some(cluster) = self.registry.cluster()
            && let Some(answer) = crate::rendezvous::across::ask(
                cluster,
                &self.rendezvous_keys,
                request.clone(),
                opener,
            )
            .await
        {
            return answer;
        }
        match request {
            Request::RendezvousPut {
                rendezvous,
                slot,
                payload,
            } => self
                .rendezvous
                .put(&rendezvous, slot, payload, now)
                .map(|()| Reply::Done),
            Request::RendezvousGet { rendezvous, slot } => self
                .rendezvous
                .get(&rendezvous, slot, now)
                .map(|payload| Reply::RendezvousSlot { payload }),
            Request::CloseRendezvous { rendezvous } => match opener {
                Some(opener) => self
                    .rendezvous
                    .close(&rendezvous, opener)
                    .map(|()| Reply::Done),
                None => Err(refuse(ErrorCode::Internal, "a close names its opener")),
            },
            _ => Err(refuse(ErrorCode::Internal, "not a rendezvous request")),
        }
    }
}

/// What a session of a revoked line is told as it is closed.
pub(crate) fn revoked_session() -> ErrorReply {
    refuse(
        ErrorCode::LineRevoked,
        "this line was revoked; its sessions are closed",
    )
}

/// Flow control of one connection's pushes: deliveries pushed and not yet
/// acknowledged on it, in number and in bytes (at least one is always let
/// through). The protocol's values are the default; devices may drop a
/// connection that exceeds them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PushWindow {
    pub deliveries: usize,
    pub bytes: usize,
}

impl Default for PushWindow {
    fn default() -> Self {
        PushWindow {
            deliveries: umbra_proto::frame::PUSH_WINDOW_DELIVERIES,
            bytes: umbra_proto::frame::PUSH_WINDOW_BYTES,
        }
    }
}

impl PushWindow {
    /// No flow control: what a broken or hostile server does (tests only).
    pub const UNBOUNDED: PushWindow = PushWindow {
        deliveries: usize::MAX,
        bytes: usize::MAX,
    };
}

/// `BlobFetched` crossings-off that may run after their answer, server-wide:
/// few, so that one account sending many cannot queue many writes ahead of
/// everyone else's (past them, each is done before its answer, as all were).
pub(crate) const BLOB_FETCHED_IN_FLIGHT: usize = 8;

/// Shared by every connection.
pub struct Services {
    pub store: Arc<dyn Store>,
    pub registry: Registry,
    /// What devices see of delivery IDs.
    pub delivery_ids: crate::delivery_ids::PublicIds,
    /// Bytes each account may still deliver this hour.
    pub send_budget: crate::limits::SendBudget<Payer>,
    /// Bytes each group may still receive anonymously this hour.
    pub anonymous_budget: crate::limits::SendBudget<Payer>,
    /// Bytes of attachments each account may still download this hour.
    pub blob_read_budget: crate::limits::SendBudget<Payer>,
    /// Bytes of attachments each account may still upload this hour.
    pub blob_upload_budget: crate::limits::SendBudget<Payer>,
    /// Whom the budgets are kept under (keyed hashes of account and group
    /// IDs, the same on every node of a cluster).
    pub payers: crate::spending::Pseudonyms,
    /// `BlobFetched` crossings-off under way after their answer (see
    /// `service/blobs.rs`); past this many, the next is done before it is
    /// answered, so a flood of them waits on the store instead of piling
    /// up as tasks.
    pub blob_fetched_in_flight: Arc<tokio::sync::Semaphore>,
    /// Where devices being linked meet their account's existing device.
    pub rendezvous: Arc<crate::rendezvous::Rendezvous>,
    /// What the nodes of a cluster tag their talk of rendezvous with.
    pub rendezvous_keys: Arc<crate::rendezvous::across::Keys>,
    /// Where the tasks that answer for this node's rendezvous on NATS run.
    pub rendezvous_holders: crate::rendezvous::across::Holders,
    pub clock: Arc<dyn Clock>,
    pub limits: Limits,
    /// The keys that sign anonymous-send tokens.
    pub tokens: TokenKeys,
    /// What the node counts, for `/metrics`.
    pub metrics: crate::metrics::Metrics,
}

impl std::fmt::Debug for Services {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Services")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

type Outcome = Result<Reply, ErrorReply>;

/// When a request's answer may be sent.
#[derive(Debug)]
pub enum Answer {
    /// At once.
    Now(Outcome),
    /// Once `durable` resolves: the reply if it does, else an internal
    /// error. The request's effects are already visible (a sent message's
    /// copies are in the mailboxes and on their way), so the connection
    /// can go on to the next request meanwhile, which matters for the
    /// recipient's acknowledgement that may be what `durable` waits for.
    WhenDurable(Durable, Reply),
    /// Never: a quiet request (an `Ack` with `quiet`) that succeeded.
    Quiet,
}

impl Answer {
    /// The response frame for request `id`, once it may be sent.
    pub async fn response(durable: Durable, reply: Reply, id: u64) -> Vec<u8> {
        let result = match durable.wait().await {
            Ok(()) => Ok(reply),
            Err(error) => Err(internal(error)),
        };
        umbra_proto::encode_server(&umbra_proto::ServerMessage::Response { id, result })
    }
}

/// How far in the future a wipe command's signed time may be (clocks differ).
const WIPE_CLOCK_SKEW_SECS: u64 = 300;

fn refuse(code: ErrorCode, message: impl Into<String>) -> ErrorReply {
    ErrorReply::new(code, message)
}

fn internal(error: StoreError) -> ErrorReply {
    if let StoreError::Full = error {
        warn!("storage is full: refusing writes until there is room");
        return refuse(
            ErrorCode::StorageFull,
            "the server's storage is full; nothing was stored, try again later",
        );
    }
    if let StoreError::Unavailable(_) = error {
        // The store's probe says when the database goes and comes back;
        // not repeated for every request refused meanwhile. SERVER_BUSY,
        // which every client already treats as "try again later".
        tracing::debug!(%error, "a request failed: the database does not answer");
        return refuse(
            ErrorCode::ServerBusy,
            "the server's database does not answer; nothing was stored, send this again shortly",
        );
    }
    warn!(%error, "storage failure");
    refuse(
        ErrorCode::Internal,
        "the server could not complete the request; try again",
    )
}

/// Formats Unix seconds as a UTC date for people.
pub fn date(unix: u64) -> String {
    let time = std::time::UNIX_EPOCH + std::time::Duration::from_secs(unix);
    humantime::format_rfc3339_seconds(time)
        .to_string()
        .split('T')
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// Draws a random account ID, uniformly over the alphabet.
fn random_account_id() -> Result<AccountId, ErrorReply> {
    crate::random_string(AccountId::LEN)
        .ok()
        .and_then(|text| AccountId::parse(&text).ok())
        .ok_or_else(|| refuse(ErrorCode::Internal, "no randomness available"))
}

impl Services {
    fn now(&self) -> u64 {
        self.clock.now()
    }

    fn expires_at(&self, now: u64) -> u64 {
        now.saturating_add(self.limits.config.mailbox_ttl.as_secs())
    }

    /// Whether the store answers a read (`/health`).
    pub async fn store_answers(&self) -> bool {
        match GroupId::new(vec![0]) {
            Ok(group) => self.store.delivery_key(&group).await.is_ok(),
            Err(_) => false,
        }
    }

    /// Handles one request, updating `session` on successful authentication;
    /// see [`Answer`] for when to send the reply. Counted in the metrics:
    /// the time until the answer is ready (or waits only on the copies
    /// becoming durable), and refusals by code.
    pub async fn answer(&self, session: &mut Session, request: Request) -> Answer {
        let kind = request.kind();
        let started = std::time::Instant::now();
        let answer = self.answer_request(session, request).await;
        self.metrics
            .request_seconds
            .get_or_create(&crate::metrics::RequestLabels { request: kind })
            .observe(started.elapsed().as_secs_f64());
        if let Answer::Now(Err(error)) = &answer {
            self.metrics
                .errors
                .get_or_create(&crate::metrics::ErrorLabels {
                    code: format!("{:?}", error.code),
                })
                .inc();
        }
        answer
    }

    async fn answer_request(&self, session: &mut Session, request: Request) -> Answer {
        match (&*session, request) {
            (
                Session::Authenticated { account, device },
                Request::SendMessage {
                    group_id,
                    message,
                    kind,
                    ttl_seconds,
                },
            ) => {
                // The line is checked inside the store's transaction.
                let me = DeviceAddr::new(account.clone(), *device);
                match self
                    .send_message(&me, group_id, message, kind, ttl_seconds)
                    .await
                {
                    Ok((durable, reply)) => Answer::WhenDurable(durable, reply),
                    Err(error) => Answer::Now(Err(error)),
                }
            }
            // Whether or not the connection logged in: a device sends these
            // on one that did not, so the server cannot tell whose they are.
            (_, Request::SendAnonymous(message)) => match self.send_anonymous(message).await {
                Ok((durable, reply)) => Answer::WhenDurable(durable, reply),
                Err(error) => Answer::Now(Err(error)),
            },
            (_, request @ Request::Ack { quiet: true, .. }) => {
                match self.handle(session, request).await {
                    Ok(_) => Answer::Quiet,
                    Err(error) => Answer::Now(Err(error)),
                }
            }
            (_, request) => Answer::Now(self.handle(session, request).await),
        }
    }

    /// Handles every request but an authenticated `SendMessage` (which
    /// [`Services::answer`] takes, as its reply waits for durability).
    async fn handle(&self, session: &mut Session, request: Request) -> Outcome {
        match (&*session, request) {
            (
                Session::AwaitingAuth { nonce },
                Request::Register {
                    activation_code,
                    identity_key,
                    signature,
                },
            ) => {
                let payload = register_signing_payload(nonce, &identity_key);
                if !umbra_mls::verify(&identity_key, &payload, &signature) {
                    return Err(refuse(
                        ErrorCode::BadSignature,
                        "registration signature does not verify with the identity key",
                    ));
                }
                let now = self.now();
                let code = CodeHash::of(&activation_code);
                for _ in 0..8 {
                    let id = random_account_id()?;
                    match self
                        .store
                        .register(code, &id, &identity_key, now)
                        .await
                        .map_err(internal)?
                    {
                        Registration::Registered(account) => {
                            info!("account registered");
                            debug!(account = %account.id, "account registered");
                            *session = Session::Authenticated {
                                account: account.id.clone(),
                                device: umbra_proto::DeviceId::FIRST,
                            };
                            return Ok(Reply::Registered {
                                account_id: account.id,
                                subscription_expires_at: account.subscription_expires_at,
                            });
                        }
                        Registration::IdTaken => continue,
                        Registration::UnknownCode => {
                            return Err(refuse(
                                ErrorCode::UnknownActivationCode,
                                "activation code is not known to this server",
                            ));
                        }
                        Registration::CodeUsed => {
                            return Err(refuse(
                                ErrorCode::ActivationCodeUsed,
                                "activation code already used",
                            ));
                        }
                        Registration::KeyTaken => {
                            return Err(refuse(
                                ErrorCode::InvalidRequest,
                                "this identity key already has an account",
                            ));
                        }
                    }
                }
                Err(refuse(
                    ErrorCode::Internal,
                    "could not draw a free account ID",
                ))
            }
            (
                Session::AwaitingAuth { nonce },
                Request::Login {
                    account_id,
                    signature,
                    device,
                },
            ) => {
                let payload = login_signing_payload(nonce, &account_id);
                let account = match self
                    .signed_by_device(&account_id, device, &payload, &signature)
                    .await
                {
                    Ok(account) => account,
                    // A linked device asking, with the account key, whether
                    // its line ended (its own key went with the line). The
                    // same work for every refused login.
                    Err(refused) => {
                        let line = self.store.account(&account_id).await.map_err(internal)?;
                        let key = line
                            .as_ref()
                            .filter(|line| line.status == LineStatus::Revoked)
                            .map_or_else(nobody, |line| line.identity_key);
                        let ended = ended_login_signing_payload(nonce, &account_id);
                        match line {
                            Some(line) if umbra_mls::verify(&key, &ended, &signature) => line,
                            _ => return Err(refused),
                        }
                    }
                };
                if account.status == LineStatus::Revoked {
                    return Err(ErrorReply {
                        wipe_command: account.last_wipe_command.unwrap_or_default(),
                        ..refuse(ErrorCode::LineRevoked, "this line was revoked")
                    });
                }
                // Best effort: a device logs in (and reads its mailbox) even
                // while the storage is full. Once a day: the line just read
                // says whether today is recorded already (a reconnect storm
                // writes nothing).
                // (A later day, written by a node whose clock is ahead, is
                // left as it is.)
                let today = self.now() / umbra_store::DAY;
                if account.last_seen_day.is_none_or(|day| day < today)
                    && let Err(error) = self.store.touch(&account_id, today).await
                {
                    debug!(%error, "recording the login day failed");
                }
                let suites: Vec<u16> = umbra_mls::Suite::ALL.iter().map(|s| s.code()).collect();
                let stocks = self
                    .store
                    .key_package_stocks(&account_id, device, &suites)
                    .await
                    .map_err(internal)?;
                if stocks.len() != suites.len() {
                    return Err(internal(umbra_store::StoreError::Corrupt(format!(
                        "{} KeyPackage stocks for {} suites",
                        stocks.len(),
                        suites.len()
                    ))));
                }
                let stocks: Vec<umbra_proto::SuiteStock> = stocks
                    .into_iter()
                    .zip(&suites)
                    .map(|(stock, &suite)| umbra_proto::SuiteStock {
                        suite,
                        remaining: stock.one_time,
                        has_last_resort: stock.has_last_resort,
                    })
                    .collect();
                let classical = stocks
                    .iter()
                    .find(|stock| stock.suite == umbra_proto::CLASSICAL_SUITE)
                    .copied();
                debug!(account = %account_id, "logged in");
                *session = Session::Authenticated {
                    account: account_id,
                    device,
                };
                Ok(Reply::LoggedIn {
                    subscription_expires_at: account.subscription_expires_at,
                    key_packages_remaining: classical.map_or(0, |stock| stock.remaining),
                    has_last_resort: classical.is_some_and(|stock| stock.has_last_resort),
                    key_package_low_water: self.limits.config.key_package_low_water,
                    stocks,
                })
            }
            (Session::Authenticated { .. }, Request::Register { .. } | Request::Login { .. }) => {
                Err(refuse(
                    ErrorCode::AlreadyAuthenticated,
                    "this connection is already authenticated",
                ))
            }
            (
                _,
                Request::Wipe {
                    account_id,
                    issued_at,
                    signature,
                },
            ) => self.relay_wipe(&account_id, issued_at, &signature).await,
            (
                _,
                Request::Revoke {
                    account_id,
                    signature,
                },
            ) => self.revoke(&account_id, &signature).await,
            (
                Session::AwaitingAuth { nonce },
                Request::DistributorLogin {
                    distributor_id,
                    signature,
                },
            ) => {
                let distributors = self.store.distributors().await.map_err(internal)?;
                let key = distributors
                    .iter()
                    .find(|d| d.id == distributor_id)
                    .map(|d| d.public_key);
                // One answer, after the same work, for an unknown distributor
                // and a bad signature: the caller learns nothing about which
                // distributor numbers exist.
                let payload = distributor_login_payload(nonce, distributor_id);
                let verified = umbra_mls::verify(&key.unwrap_or_else(nobody), &payload, &signature);
                if !(verified && key.is_some()) {
                    return Err(refuse(
                        ErrorCode::BadSignature,
                        "distributor login signature does not verify",
                    ));
                }
                info!(distributor = distributor_id, "distributor logged in");
                *session = Session::Distributor { id: distributor_id };
                Ok(Reply::Done)
            }
            (Session::Distributor { id }, request) => {
                let id = *id;
                self.distributor(id, request).await
            }
            (Session::AwaitingAuth { .. }, Request::Ping) => Ok(Reply::Done),
            // A device being linked has no account yet: the rendezvous ID
            // it was given is what lets it in.
            (
                Session::AwaitingAuth { .. } | Session::Authenticated { .. },
                request @ (Request::RendezvousPut { .. } | Request::RendezvousGet { .. }),
            ) => self.at_rendezvous(request, None).await,
            (Session::AwaitingAuth { .. }, _) => Err(refuse(
                ErrorCode::NotAuthenticated,
                "authenticate with Register or Login first",
            )),
            (Session::Authenticated { account, device }, request) => {
                let (account, device) = (account.clone(), *device);
                self.authenticated(&account, device, request).await
            }
        }
    }

    /// Sending needs a line that is active and paid for. Read from the store
    /// each time, so a suspension or renewal takes effect at once.
    /// The caller's account, if its line may act now.
    async fn require_active(&self, me: &AccountId) -> Result<Account, ErrorReply> {
        let account = self
            .store
            .account(me)
            .await
            .map_err(internal)?
            .ok_or_else(|| refuse(ErrorCode::LineRevoked, "this line no longer exists"))?;
        match line_refusal(account.status, account.subscription_expires_at, self.now()) {
            Some(refusal) => Err(refusal),
            None => Ok(account),
        }
    }

    async fn authenticated(
        &self,
        me: &AccountId,
        device: umbra_proto::DeviceId,
        request: Request,
    ) -> Outcome {
        match request {
            Request::UploadKeyPackages {
                key_packages,
                last_resort,
            } => {
                self.upload_key_packages(me, device, key_packages, last_resort)
                    .await
            }
            Request::FetchKeyPackage {
                account_id,
                device: of,
                suites,
            } => {
                self.require_active(me).await?;
                // Its own account's other devices (to add them to its
                // groups), or an account that accepted it as a contact.
                if account_id != *me
                    && !self
                        .store
                        .are_contacts(me, &account_id)
                        .await
                        .map_err(internal)?
                {
                    return Err(refuse(
                        ErrorCode::NotAContact,
                        format!("{account_id} has not accepted a contact request from you"),
                    ));
                }
                // A contact's line is there (contacts are deleted with a
                // revoked one); only its current devices hand out packages.
                let current = match self.store.account(&account_id).await.map_err(internal)? {
                    Some(line) => self.device_key(&line, of).await?.is_some(),
                    None => false,
                };
                if !current {
                    return Err(refuse(
                        ErrorCode::UnknownDevice,
                        format!("device {of} is not one of {account_id}'s current devices"),
                    ));
                }
                // The first suite asked for that the device has a package
                // of (one this server does not take has none).
                for suite in suites {
                    if umbra_mls::Suite::from_code(suite).is_none() {
                        continue;
                    }
                    let taken = self
                        .store
                        .take_key_package(&account_id, of, suite)
                        .await
                        .map_err(internal)?;
                    if let Some((key_package, last_resort)) = taken {
                        if !last_resort {
                            self.warn_if_low(&account_id, of, suite).await?;
                        }
                        return Ok(Reply::KeyPackage {
                            key_package,
                            last_resort,
                        });
                    }
                }
                Err(refuse(
                    ErrorCode::NoKeyPackage,
                    format!(
                        "{account_id} has no KeyPackage of the suites asked for; ask them to come online"
                    ),
                ))
            }
            Request::SendContactRequest { to } => {
                self.require_active(me).await?;
                if &to == me {
                    return Err(refuse(ErrorCode::InvalidRequest, "you cannot add yourself"));
                }
                // A revoked line is gone: answered like one that never was,
                // and nothing is stored for it.
                let target = self.store.account(&to).await.map_err(internal)?;
                if target.is_none_or(|line| line.status == LineStatus::Revoked) {
                    return Err(refuse(
                        ErrorCode::UnknownAccount,
                        format!("no account {to} on this server"),
                    ));
                }
                let now = self.now();
                let limit = self.limits.config.contact_requests_per_hour;
                let recent = self
                    .store
                    .contact_requests_since(me, now.saturating_sub(3600))
                    .await
                    .map_err(internal)?;
                if recent >= u64::from(limit) {
                    return Err(refuse(
                        ErrorCode::QuotaExceeded,
                        format!("at most {limit} contact requests an hour; try again later"),
                    ));
                }
                let (outcome, told) = self
                    .store
                    .request_contact(me, &to, now, self.expires_at(now))
                    .await
                    .map_err(internal)?;
                match outcome {
                    ContactRequestOutcome::Sent => {
                        self.registry.notify(&told);
                        Ok(Reply::Done)
                    }
                    ContactRequestOutcome::AlreadyRequested => Ok(Reply::Done),
                    // Revoked since it was looked up: as above.
                    ContactRequestOutcome::LineGone => Err(refuse(
                        ErrorCode::UnknownAccount,
                        format!("no account {to} on this server"),
                    )),
                    ContactRequestOutcome::AlreadyContacts => Err(refuse(
                        ErrorCode::InvalidRequest,
                        format!("{to} is already a contact"),
                    )),
                }
            }
            Request::AcceptContact { from } => {
                self.require_active(me).await?;
                let now = self.now();
                let (outcome, told) = self
                    .store
                    .accept_contact(me, &from, now, self.expires_at(now))
                    .await
                    .map_err(internal)?;
                match outcome {
                    ContactAcceptOutcome::Accepted => {
                        self.registry.notify(&told);
                        Ok(Reply::Done)
                    }
                    ContactAcceptOutcome::AlreadyContacts => Ok(Reply::Done),
                    ContactAcceptOutcome::NoRequest => Err(refuse(
                        ErrorCode::InvalidRequest,
                        format!("there is no pending contact request from {from}"),
                    )),
                }
            }
            Request::DeclineContact { from } => {
                self.live_account(me).await?;
                self.store
                    .decline_contact(me, &from)
                    .await
                    .map_err(internal)?;
                Ok(Reply::Done)
            }
            Request::CreateGroup {
                group_id,
                group_info,
                delivery_key,
            } => {
                let account = self.require_active(me).await?;
                let limit = self.limits.config.max_groups_per_account;
                if self.store.groups_created(me).await.map_err(internal)? >= u64::from(limit) {
                    return Err(refuse(
                        ErrorCode::QuotaExceeded,
                        format!("an account may create at most {limit} groups"),
                    ));
                }
                // The creator's leaf is this session's device's.
                let device_key = self
                    .device_key(&account, device)
                    .await?
                    .ok_or_else(|| refuse(ErrorCode::DeviceRemoved, "this device was removed"))?;
                let public_state = crate::handshake::validate_group_info(
                    group_id.clone(),
                    group_info.clone(),
                    me.clone(),
                    (device_key, account.identity_key),
                )
                .await?;
                if self
                    .store
                    .create_group(
                        &group_id,
                        &DeviceAddr::new(me.clone(), device),
                        &public_state,
                        &group_info,
                        delivery_key.as_ref(),
                        self.now(),
                    )
                    .await
                    .map_err(internal)?
                {
                    Ok(Reply::Done)
                } else {
                    Err(refuse(
                        ErrorCode::GroupExists,
                        "a group with this ID exists",
                    ))
                }
            }
            Request::IssueTokens { blinded } => self.issue_tokens(me, blinded).await,
            Request::SendCommit(commit) => {
                self.require_active(me).await?;
                self.send_commit(&DeviceAddr::new(me.clone(), device), commit)
                    .await
            }
            Request::FetchGroupInfo { group_id } => {
                self.require_active(me).await?;
                let group = self
                    .store
                    .group(&group_id)
                    .await
                    .map_err(internal)?
                    .ok_or_else(|| unknown_group(&group_id))?;
                // A member device that fell behind rejoins its own leaf.
                if !group.members.contains(&DeviceAddr::new(me.clone(), device)) {
                    return Err(not_a_member());
                }
                match self.store.group_info(&group_id).await.map_err(internal)? {
                    Some(group_info) if !group_info.is_empty() => {
                        Ok(Reply::GroupInfo { group_info })
                    }
                    _ => Err(refuse(
                        ErrorCode::UnknownGroup,
                        "no GroupInfo is kept for this group (it predates rejoining); ask a member to add you again",
                    )),
                }
            }
            Request::Ack { delivery_ids, .. } => {
                self.store
                    .ack(&DeviceAddr::new(me.clone(), device), &delivery_ids)
                    .await
                    .map_err(internal)?;
                Ok(Reply::Done)
            }
            Request::LookupAccount { account_id } => {
                self.live_account(me).await?;
                // A revoked line is gone: answered like one that never was.
                match self.store.account(&account_id).await.map_err(internal)? {
                    Some(account) if account.status != LineStatus::Revoked => {
                        Ok(Reply::AccountInfo {
                            account_id: account.id,
                            identity_key: account.identity_key,
                        })
                    }
                    _ => Err(refuse(
                        ErrorCode::UnknownAccount,
                        format!("no account {account_id} on this server"),
                    )),
                }
            }
            Request::Ping => Ok(Reply::Done),
            Request::OpenRendezvous => {
                self.require_active(me).await?;
                let (rendezvous, expires_at) = self.rendezvous.open(me, self.now())?;
                if let Some(cluster) = self.registry.cluster() {
                    crate::rendezvous::across::hold(
                        Arc::clone(&self.rendezvous),
                        Arc::clone(&self.clock),
                        Arc::clone(cluster),
                        Arc::clone(&self.rendezvous_keys),
                        rendezvous,
                        &self.rendezvous_holders,
                    )
                    .await;
                }
                Ok(Reply::RendezvousOpened {
                    rendezvous,
                    expires_at,
                })
            }
            request @ Request::CloseRendezvous { .. } => {
                self.at_rendezvous(request, Some(me)).await
            }
            Request::RedeemRenewal { code } => {
                self.live_account(me).await?;
                match self
                    .store
                    .redeem_renewal(me, CodeHash::of(&code), self.now())
                    .await
                    .map_err(internal)?
                {
                    Renewal::Renewed {
                        subscription_expires_at,
                    } => Ok(Reply::Renewed {
                        subscription_expires_at,
                    }),
                    Renewal::UnknownCode => Err(refuse(
                        ErrorCode::UnknownActivationCode,
                        "renewal code is not known to this server",
                    )),
                    Renewal::CodeUsed => Err(refuse(
                        ErrorCode::ActivationCodeUsed,
                        "renewal code already used",
                    )),
                    Renewal::WrongDistributor => Err(refuse(
                        ErrorCode::NotYourLine,
                        "this renewal code was sold for another distributor's lines",
                    )),
                }
            }
            Request::AppendDeviceEntry { entry } => {
                self.append_device_entry(me, device, entry).await
            }
            Request::CreateBlob {
                group_id,
                size,
                ttl_seconds,
            } => {
                let me = DeviceAddr::new(me.clone(), device);
                self.create_blob(&me, group_id, size, ttl_seconds).await
            }
            Request::PutBlob {
                blob_id,
                offset,
                data,
            } => {
                let me = DeviceAddr::new(me.clone(), device);
                self.put_blob(&me, blob_id, offset, data).await
            }
            Request::BlobStatus { blob_id } => {
                self.blob_status(&DeviceAddr::new(me.clone(), device), blob_id)
                    .await
            }
            Request::GetBlob {
                blob_id,
                offset,
                length,
            } => {
                let me = DeviceAddr::new(me.clone(), device);
                self.get_blob(&me, blob_id, offset, length).await
            }
            Request::BlobFetched { blob_id } => {
                self.blob_fetched(&DeviceAddr::new(me.clone(), device), blob_id)
                    .await
            }
            Request::FetchDeviceLog { account_id, from } => {
                self.fetch_device_log(me, &account_id, from).await
            }
            Request::SetWipeKey { wipe_key } => {
                // Set once: whoever holds the account key (every linked
                // device, and a removed one that kept it) must not be able
                // to swap the key that wipe commands are checked against.
                let account = self.live_account(me).await?;
                if account.wipe_key.is_none() {
                    self.store
                        .set_wipe_key(me, &wipe_key)
                        .await
                        .map_err(internal)?;
                }
                match self.store.account(me).await.map_err(internal)? {
                    Some(now) if now.wipe_key == Some(wipe_key) => Ok(Reply::Done),
                    _ => Err(refuse(
                        ErrorCode::InvalidRequest,
                        "this line's wipe key is set already, and cannot be replaced",
                    )),
                }
            }
            _ => Err(refuse(ErrorCode::InvalidRequest, "unsupported request")),
        }
    }

    /// Tells a device, through its mailbox, that its one-time KeyPackages
    /// of `suite` ran below the low-water mark: once as a fetch takes the
    /// stock across the mark and once more as a fetch takes the last one;
    /// fetches served by the last-resort package tell nothing (the caller
    /// checks). The notice's payload is the suite's number (2 bytes, big
    /// endian).
    async fn warn_if_low(
        &self,
        account: &AccountId,
        device: DeviceId,
        suite: u16,
    ) -> Result<(), ErrorReply> {
        let stock = self
            .store
            .key_package_stock(account, device, suite)
            .await
            .map_err(internal)?;
        let mark = self.limits.config.key_package_low_water;
        if stock.one_time + 1 == mark || (stock.one_time == 0 && mark > 1) {
            let now = self.now();
            let notice = Notice {
                recipient: account.clone(),
                device: Some(device),
                sender: account.clone(),
                kind: DeliveryKind::KeyPackagesLow,
                group_id: None,
                payload: suite.to_be_bytes().to_vec(),
            };
            let stored = self
                .store
                .notice(notice, now, self.expires_at(now))
                .await
                .map_err(internal)?;
            self.registry
                .notify(stored.iter().map(|(device, _)| device));
        }
        Ok(())
    }

    async fn upload_key_packages(
        &self,
        me: &AccountId,
        device: DeviceId,
        key_packages: Vec<Vec<u8>>,
        last_resort: Option<Vec<u8>>,
    ) -> Outcome {
        let account = self.live_account(me).await?;
        // The session's device was current when it logged in; a removal
        // since ends the session, so a missing key here is that race.
        let device_key = self
            .device_key(&account, device)
            .await?
            .ok_or_else(|| refuse(ErrorCode::DeviceRemoved, "this device was removed"))?;
        let check = |bytes: &[u8],
                     want_last_resort: bool|
         -> Result<umbra_mls::Suite, ErrorReply> {
            let valid = umbra_mls::validate_key_package(bytes)
                .map_err(|e| refuse(ErrorCode::InvalidKeyPackage, e.to_string()))?;
            if valid.account != *me || valid.identity_key != device_key {
                return Err(refuse(
                    ErrorCode::InvalidKeyPackage,
                    format!(
                        "KeyPackage credential does not match this account and the key of device {device}"
                    ),
                ));
            }
            // Every device but device 1 (whose key is the account key)
            // carries the log's add entry for it, signed by the account
            // key, so members can check its leaf without asking anyone.
            let certified = match (&valid.certificate, device == DeviceId::FIRST) {
                (None, true) => true,
                (Some(certificate), false) => {
                    certificate.account_key == account.identity_key
                        && certificate.certifies(me, &device_key)
                }
                _ => false,
            };
            if !certified {
                return Err(refuse(
                    ErrorCode::InvalidKeyPackage,
                    if device == DeviceId::FIRST {
                        "device 1's KeyPackages carry no device certificate (its key is the account key)"
                            .to_owned()
                    } else {
                        format!(
                            "device {device}'s KeyPackages must carry its certificate: the account key and the log entry that added it"
                        )
                    },
                ));
            }
            if valid.last_resort != want_last_resort {
                return Err(refuse(
                    ErrorCode::InvalidKeyPackage,
                    if want_last_resort {
                        "the last-resort slot needs a KeyPackage marked last-resort"
                    } else {
                        "one-time KeyPackages must not be marked last-resort"
                    },
                ));
            }
            Ok(valid.suite)
        };
        // One upload is one suite's: the stock, its cap and the last-resort
        // slot are per suite (an empty upload asks for suite 3's count).
        let mut suite = None;
        for (key_package, want_last_resort) in key_packages
            .iter()
            .map(|kp| (kp, false))
            .chain(last_resort.iter().map(|kp| (kp, true)))
        {
            let this = check(key_package, want_last_resort)?;
            if *suite.get_or_insert(this) != this {
                return Err(refuse(
                    ErrorCode::InvalidKeyPackage,
                    "the KeyPackages of one upload must all be of one ciphersuite",
                ));
            }
        }
        let suite = suite.map_or(umbra_proto::CLASSICAL_SUITE, umbra_mls::Suite::code);
        let limit = self.limits.config.max_key_packages;
        let stock = self
            .store
            .key_package_stock(me, device, suite)
            .await
            .map_err(internal)?;
        if u64::from(stock.one_time) + key_packages.len() as u64 > u64::from(limit) {
            return Err(refuse(
                ErrorCode::QuotaExceeded,
                format!(
                    "at most {limit} one-time KeyPackages of one device and suite may wait at the server ({} do)",
                    stock.one_time
                ),
            ));
        }
        let stock = self
            .store
            .add_key_packages(me, device, suite, key_packages, last_resort)
            .await
            .map_err(internal)?;
        Ok(Reply::KeyPackageCount {
            remaining: stock.one_time,
            suite,
        })
    }
}
