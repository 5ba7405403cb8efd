//! Routing between the nodes of a cluster, over NATS core subjects.
//!
//! The database is the only truth; NATS is a doorbell. When a node stores
//! mail for a device that has no connection on it, it publishes a wake-up
//! on the device's subject; the node holding that device's connection
//! (subscribed to the subject for as long as the connection is
//! authenticated: the subscription *is* presence) wakes the connection,
//! which reads its mailbox from the database. Nothing is carried in the
//! wake-up, so a lost one costs latency, never a message: while NATS is
//! away, and once when it returns, every connection on the node reads its
//! mailbox again (every [`POLL_WHILE_AWAY`]), so what arrived meanwhile
//! is found.
//!
//! Subjects (the account ID and device number are the only names):
//! - `umbra.v1.dev.<account>.<device>`: `wake` (new mail), `removed` (the
//!   device was removed: end its session), `replaced <node>` (the device
//!   connected to node `<node>`: end its session anywhere else);
//! - `umbra.v1.acct.<account>`: `revoked` (the line ended: end every
//!   session of it);
//! - `umbra.v1.poll`: read every connection's mailbox (after wake-ups may
//!   have been lost);
//! - `umbra.v1.spent`: what a node charged to the hourly budgets
//!   ([`crate::spending`]), so that they hold for the cluster.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use umbra_proto::{AccountId, DeviceAddr, ErrorCode, ErrorReply};

use crate::registry::Inbox;

/// How often connections read their mailboxes while NATS is away.
pub const POLL_WHILE_AWAY: Duration = Duration::from_secs(5);

/// How often, in a cluster, every connection reads its mailbox whatever
/// NATS says: the net under wake-ups lost with a node that died between
/// storing mail and announcing it.
pub const SAFETY_POLL: Duration = Duration::from_secs(60);

/// How long a connection waits for NATS to confirm its subscriptions
/// before going on without them (polled meanwhile, subscribed later).
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Wake-ups and announcements waiting for the publishing task at most;
/// past that they are dropped (and every node told to poll once NATS
/// takes them again).
const OUTBOX: usize = 8192;

/// Subject on which a node asks every node to read all its connections'
/// mailboxes (after wake-ups may have been lost).
pub const POLL_SUBJECT: &str = "umbra.v1.poll";

/// Requests to poll are acted on at most once in this long: after NATS
/// returns, every node asks every node, and a cluster of N nodes would
/// otherwise have each connection read its mailbox N times at once.
pub const POLL_COALESCE: Duration = Duration::from_secs(1);

/// Turns requests to poll, however many and however fast, into at most
/// one poll each [`POLL_COALESCE`]: the first at once, those that come
/// within the following period as one poll at its end (so none is lost:
/// mail stored before the last request is read after it).
#[derive(Debug)]
pub struct Coalesce {
    quiet_until: tokio::time::Instant,
    owed: bool,
}

impl Default for Coalesce {
    fn default() -> Self {
        Coalesce {
            quiet_until: tokio::time::Instant::now(),
            owed: false,
        }
    }
}

impl Coalesce {
    /// A request came: whether to poll now (else one is owed).
    pub fn asked(&mut self) -> bool {
        let now = tokio::time::Instant::now();
        if now >= self.quiet_until {
            self.quiet_until = now + POLL_COALESCE;
            // This poll covers whatever was owed.
            self.owed = false;
            true
        } else {
            self.owed = true;
            false
        }
    }

    /// Resolves when an owed poll is due (never while none is owed);
    /// then poll.
    pub async fn due(&mut self) {
        if !self.owed {
            std::future::pending::<()>().await;
        }
        tokio::time::sleep_until(self.quiet_until).await;
        self.owed = false;
        self.quiet_until = tokio::time::Instant::now() + POLL_COALESCE;
    }
}

/// This node's link to the others.
pub struct Cluster {
    client: async_nats::Client,
    /// A random name for this node, to tell its own announcements apart.
    node: String,
    /// Announcements to publish, in order, by one task.
    outbox: tokio::sync::mpsc::Sender<(String, bytes::Bytes)>,
    /// Wake-ups may have been lost since the last look (NATS went away,
    /// dropped messages for a slow consumer, or the outbox overflowed).
    missed: Arc<AtomicBool>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster").field("node", &self.node).finish()
    }
}

fn device_subject(device: &DeviceAddr) -> String {
    format!("umbra.v1.dev.{}.{}", device.account, device.device.0)
}

fn account_subject(account: &AccountId) -> String {
    format!("umbra.v1.acct.{account}")
}

/// The connection to NATS failed.
#[derive(Debug, thiserror::Error)]
#[error("cannot use NATS at the configured address: {0}")]
pub struct ClusterError(String);

impl Cluster {
    /// Connects to NATS at `url` (`nats://host:port`, or
    /// `nats://user@host:port`), with `password` (from
    /// [`crate::NATS_PASSWORD_ENV`]): the user's password when the address
    /// names a user, else a token. A password in the address itself is
    /// refused (it would sit in the configuration file and its backups). A
    /// node starts even while NATS is away (its connections poll until it
    /// comes), or refuses it (its credentials wrong: the log says so); the
    /// client reconnects, and re-subscribes, by itself.
    pub async fn connect(url: &str, password: Option<&str>) -> Result<Arc<Cluster>, ClusterError> {
        let address: async_nats::ServerAddr = url
            .parse()
            .map_err(|e: std::io::Error| ClusterError(e.to_string()))?;
        if address.password().is_some() {
            return Err(ClusterError(format!(
                "the address names a password: give it in {} instead",
                crate::NATS_PASSWORD_ENV
            )));
        }
        let options = match (address.username(), password) {
            (Some(user), Some(password)) => {
                // An address gives its user %-escaped, as URLs do (a user
                // named `a@b` is written `a%40b`); NATS is given the name.
                let user = percent_encoding::percent_decode_str(user)
                    .decode_utf8()
                    .map_err(|_| {
                        ClusterError(
                            "the user named in the address is not UTF-8 once its %-escapes \
                             are decoded"
                                .into(),
                        )
                    })?;
                async_nats::ConnectOptions::new()
                    .user_and_password(user.into_owned(), password.to_owned())
            }
            // (The user is not repeated: a token written where NATS's
            // own tools put it, `nats://TOKEN@host`, reads as one.)
            (Some(_), None) => {
                return Err(ClusterError(format!(
                    "the address names a user: give its password in {} (or, for a token, \
                     leave the address without one and give the token there)",
                    crate::NATS_PASSWORD_ENV
                )));
            }
            (None, Some(token)) => async_nats::ConnectOptions::new().token(token.to_owned()),
            (None, None) => async_nats::ConnectOptions::new(),
        };
        let mut node = [0u8; 8];
        getrandom::getrandom(&mut node).map_err(|e| ClusterError(e.to_string()))?;
        let node = hex::encode(node);
        let missed = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&missed);
        let client = options
            .name(format!("umbra-server {node}"))
            .connection_timeout(Duration::from_secs(5))
            .retry_on_initial_connect()
            .event_callback(move |event| {
                let flag = Arc::clone(&flag);
                async move {
                    match event {
                        async_nats::Event::Disconnected => {
                            warn!("NATS is away: connections poll their mailboxes meanwhile");
                            flag.store(true, Ordering::SeqCst);
                        }
                        async_nats::Event::Connected => info!("connected to NATS"),
                        async_nats::Event::SlowConsumer(_) => {
                            warn!("NATS dropped messages for this node: mailboxes are read again");
                            flag.store(true, Ordering::SeqCst);
                        }
                        // A failed attempt to connect (a refused login
                        // among them); the client tries again by itself.
                        async_nats::Event::ClientError(error) => {
                            warn!(
                                %error,
                                "cannot connect to NATS (if it refuses the login: the user in \
                                 `nats`, its password or token in {}); connections poll \
                                 their mailboxes meanwhile",
                                crate::NATS_PASSWORD_ENV
                            );
                            flag.store(true, Ordering::SeqCst);
                        }
                        async_nats::Event::ServerError(error) => {
                            warn!(%error, "NATS refused something: mailboxes are read again");
                            flag.store(true, Ordering::SeqCst);
                        }
                        other => debug!(%other, "NATS"),
                    }
                }
            })
            .connect(address)
            .await
            .map_err(|e| ClusterError(e.to_string()))?;
        let (outbox, mut queued) = tokio::sync::mpsc::channel::<(String, bytes::Bytes)>(OUTBOX);
        let (publisher, lost) = (client.clone(), Arc::clone(&missed));
        tokio::spawn(async move {
            while let Some((subject, payload)) = queued.recv().await {
                // While NATS is away its client's queue is not drained:
                // dropped here instead of piling up, and every node polls
                // once NATS is back.
                if publisher.connection_state() != async_nats::connection::State::Connected {
                    lost.store(true, Ordering::SeqCst);
                    continue;
                }
                if let Err(error) = publisher.publish(subject, payload).await {
                    debug!(%error, "publishing to NATS");
                    lost.store(true, Ordering::SeqCst);
                }
            }
        });
        info!(%node, "routing between nodes over NATS");
        Ok(Arc::new(Cluster {
            client,
            node,
            outbox,
            missed,
        }))
    }

    /// Queues an announcement for the publishing task, in order; a lost
    /// one costs latency, not mail (see the module's notes).
    fn publish(&self, subject: String, payload: impl Into<bytes::Bytes>) {
        if self.outbox.try_send((subject, payload.into())).is_err() {
            self.missed.store(true, Ordering::SeqCst);
        }
    }

    /// New mail for `device`, which has no connection on this node.
    pub fn wake(&self, device: &DeviceAddr) {
        self.publish(device_subject(device), &b"wake"[..]);
    }

    /// `device` was removed from its account: its sessions end everywhere.
    pub fn end_device(&self, device: &DeviceAddr) {
        self.publish(device_subject(device), &b"removed"[..]);
    }

    /// `account`'s line ended: its sessions end everywhere.
    pub fn end_account(&self, account: &AccountId) {
        self.publish(account_subject(account), &b"revoked"[..]);
    }

    /// Whether NATS is connected now.
    pub fn connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// Whether wake-ups may have been lost since the last call; resets.
    pub fn take_missed(&self) -> bool {
        self.missed.swap(false, Ordering::SeqCst)
    }

    /// Asks every node (this one too) to have its connections read their
    /// mailboxes.
    pub async fn ask_all_to_poll(&self) {
        if let Err(error) = self.client.publish(POLL_SUBJECT, "poll".into()).await {
            debug!(%error, "asking the nodes to poll");
            self.missed.store(true, Ordering::SeqCst);
        }
    }

    /// The requests of other nodes to read every mailbox.
    pub async fn polls(&self) -> Result<async_nats::Subscriber, ClusterError> {
        self.hear(POLL_SUBJECT).await
    }

    /// This node's name in the cluster: random, new at each start.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Publishes `payload` on `subject` to every node (this one too), if
    /// NATS is there now; whether it was handed to NATS.
    pub async fn tell_all(&self, subject: &'static str, payload: Vec<u8>) -> bool {
        if !self.connected() {
            return false;
        }
        match self.client.publish(subject, payload.into()).await {
            Ok(()) => true,
            Err(error) => {
                debug!(%error, subject, "publishing to NATS");
                false
            }
        }
    }

    /// What every node publishes on `subject` (this one's too), for as
    /// long as the subscriber is kept (NATS subscribes it again after it
    /// was away).
    pub async fn hear(
        &self,
        subject: &'static str,
    ) -> Result<async_nats::Subscriber, ClusterError> {
        self.client
            .subscribe(subject)
            .await
            .map_err(|e| ClusterError(e.to_string()))
    }

    /// What every node publishes on `subject`, one not fixed in advance
    /// (see [`Cluster::hear`]).
    pub async fn listen(&self, subject: String) -> Result<async_nats::Subscriber, ClusterError> {
        self.client
            .subscribe(subject)
            .await
            .map_err(|e| ClusterError(e.to_string()))
    }

    /// A new subject for answers to this node.
    pub fn inbox(&self) -> String {
        self.client.new_inbox()
    }

    /// Publishes `payload` on `subject`, to be answered on `reply`, if NATS
    /// is there now; whether it was handed to NATS.
    pub async fn tell_with_reply(&self, subject: String, reply: String, payload: Vec<u8>) -> bool {
        if !self.connected() {
            return false;
        }
        match self
            .client
            .publish_with_reply(subject, reply, payload.into())
            .await
        {
            Ok(()) => true,
            Err(error) => {
                debug!(%error, "publishing to NATS");
                false
            }
        }
    }

    /// Answers a request heard on NATS (at `reply`, its reply subject).
    pub async fn reply(&self, reply: async_nats::Subject, payload: Vec<u8>) {
        if let Err(error) = self.client.publish(reply, payload.into()).await {
            debug!(%error, "answering through NATS");
        }
    }

    /// Follows `device`'s subjects for its connection on this node, until
    /// `stop`: wake-ups wake `inbox`, an end ends it. When NATS is there,
    /// returns once NATS has the subscriptions (this node's announcement
    /// that the device is here, published after subscribing, came back on
    /// them): a wake-up published after this returns reaches the
    /// connection, and the device's sessions on other nodes end. When NATS
    /// is away or slow, returns at once (at most [`SUBSCRIBE_TIMEOUT`])
    /// and keeps trying in the background; the connection is polled
    /// meanwhile.
    pub async fn follow(
        self: &Arc<Self>,
        device: &DeviceAddr,
        inbox: Arc<Inbox>,
        stop: CancellationToken,
    ) {
        if self.connected() {
            let attempt = self.subscribe(device, &inbox);
            if let Ok(Some(subscriptions)) = tokio::time::timeout(SUBSCRIBE_TIMEOUT, attempt).await
            {
                self.forward(subscriptions, inbox, stop);
                return;
            }
        }
        // Away, or too slow: polled until subscribed.
        self.missed.store(true, Ordering::SeqCst);
        let (cluster, device) = (Arc::clone(self), device.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(POLL_WHILE_AWAY) => {}
                }
                if !cluster.connected() {
                    continue;
                }
                let attempt = cluster.subscribe(&device, &inbox);
                if let Ok(Some(subscriptions)) =
                    tokio::time::timeout(SUBSCRIBE_TIMEOUT, attempt).await
                {
                    // Anything stored before it took effect: read.
                    inbox.wake();
                    cluster.forward(subscriptions, inbox, stop);
                    return;
                }
            }
        });
    }

    /// Subscribes to `device`'s subjects and announces it here; returns
    /// once the announcement came back (what arrives before it is acted
    /// on), `None` if NATS failed.
    async fn subscribe(
        &self,
        device: &DeviceAddr,
        inbox: &Inbox,
    ) -> Option<(async_nats::Subscriber, async_nats::Subscriber)> {
        let mut on_device = self.client.subscribe(device_subject(device)).await.ok()?;
        let on_account = self
            .client
            .subscribe(account_subject(&device.account))
            .await
            .ok()?;
        let mut token = [0u8; 8];
        getrandom::getrandom(&mut token).ok()?;
        let announcement = format!("replaced {} {}", self.node, hex::encode(token));
        self.client
            .publish(device_subject(device), announcement.clone().into())
            .await
            .ok()?;
        self.client.flush().await.ok()?;
        while let Some(message) = on_device.next().await {
            if message.payload == announcement.as_bytes() {
                return Some((on_device, on_account));
            }
            if self.act_on(&message.payload, inbox) {
                return None;
            }
        }
        None
    }

    /// Acts on one message on a connection's subjects: whether it ended
    /// the session.
    fn act_on(&self, payload: &[u8], inbox: &Inbox) -> bool {
        match payload {
            b"wake" => {
                inbox.wake();
                false
            }
            b"removed" => {
                inbox.end(crate::service::removed_session());
                true
            }
            b"revoked" => {
                inbox.end(crate::service::revoked_session());
                true
            }
            other => {
                let elsewhere = other
                    .strip_prefix(b"replaced ")
                    .and_then(|rest| rest.split(|b| *b == b' ').next())
                    .is_some_and(|from| from != self.node.as_bytes());
                if elsewhere {
                    inbox.end(ErrorReply::new(
                        ErrorCode::SessionReplaced,
                        "this device connected to another node of the cluster",
                    ));
                }
                elsewhere
            }
        }
    }

    fn forward(
        self: &Arc<Self>,
        (mut on_device, mut on_account): (async_nats::Subscriber, async_nats::Subscriber),
        inbox: Arc<Inbox>,
        stop: CancellationToken,
    ) {
        let cluster = Arc::clone(self);
        tokio::spawn(async move {
            loop {
                let message = tokio::select! {
                    _ = stop.cancelled() => break,
                    message = on_device.next() => message,
                    message = on_account.next() => message,
                };
                let Some(message) = message else { break };
                if cluster.act_on(&message.payload, &inbox) {
                    break;
                }
            }
        });
    }
}

/// A nats-server of its own on a loopback port, for tests and the
/// benchmark's cluster mode (Debian's `nats-server`; `.ci/run` installs
/// it). Killed when dropped.
pub mod testing {
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    pub struct PrivateNats {
        child: Child,
        port: u16,
        user: Option<String>,
    }

    impl std::fmt::Debug for PrivateNats {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("PrivateNats")
                .field("port", &self.port)
                .finish()
        }
    }

    impl PrivateNats {
        /// Starts one on `port` (a free one if `None`), and returns once
        /// it accepts connections (within 20 s).
        pub fn start(port: Option<u16>) -> std::io::Result<PrivateNats> {
            PrivateNats::start_with(port, None)
        }

        /// [`PrivateNats::start`], admitting only `user` with `password`
        /// if given.
        pub fn start_with(
            port: Option<u16>,
            credentials: Option<(&str, &str)>,
        ) -> std::io::Result<PrivateNats> {
            let port = match port {
                Some(port) => port,
                None => std::net::TcpListener::bind("127.0.0.1:0")?
                    .local_addr()?
                    .port(),
            };
            let mut command = Command::new("nats-server");
            command.args(["-a", "127.0.0.1", "-p", &port.to_string()]);
            if let Some((user, password)) = credentials {
                command.args(["--user", user, "--pass", password]);
            }
            let mut child = command
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?;
            let deadline = Instant::now() + Duration::from_secs(20);
            while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(std::io::Error::other(format!(
                        "nats-server did not listen on port {port} within 20 s"
                    )));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok(PrivateNats {
                child,
                port,
                user: credentials.map(|(user, _)| user.to_owned()),
            })
        }

        /// `nats://127.0.0.1:PORT`, or `nats://USER@127.0.0.1:PORT` for
        /// one that admits only its user (%-escaped but for letters and
        /// digits).
        pub fn url(&self) -> String {
            match &self.user {
                Some(user) => format!(
                    "nats://{}@127.0.0.1:{}",
                    percent_encoding::utf8_percent_encode(user, percent_encoding::NON_ALPHANUMERIC),
                    self.port
                ),
                None => format!("nats://127.0.0.1:{}", self.port),
            }
        }

        /// Its process, to measure its CPU.
        pub fn pid(&self) -> u32 {
            self.child.id()
        }

        /// Kills it (SIGKILL); returns its port, to start it again there.
        pub fn kill(self) -> u16 {
            self.port
        }
    }

    impl Drop for PrivateNats {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A flood of requests within a period is one poll at once and one at
    /// its end; a request after a quiet period is served at once.
    #[tokio::test(start_paused = true)]
    async fn a_flood_of_requests_to_poll_is_one_poll_a_second() {
        let mut coalesce = Coalesce::default();
        let start = tokio::time::Instant::now();
        let mut polls = Vec::new();
        if coalesce.asked() {
            polls.push(start.elapsed());
        }
        for _ in 0..1000 {
            assert!(!coalesce.asked(), "within the period: owed, not done");
        }
        coalesce.due().await;
        polls.push(start.elapsed());
        // Nothing more is owed: `due` waits for ever.
        assert!(
            tokio::time::timeout(Duration::from_secs(10), coalesce.due())
                .await
                .is_err()
        );
        assert_eq!(polls, [Duration::ZERO, POLL_COALESCE]);
        // Quiet long enough: the next request is served at once.
        assert!(coalesce.asked());
    }

    /// Requests spread over time: each is followed by a poll no earlier
    /// than itself, and polls stay a period apart.
    #[tokio::test(start_paused = true)]
    async fn every_request_is_followed_by_a_poll() {
        let mut coalesce = Coalesce::default();
        let start = tokio::time::Instant::now();
        let mut polls = Vec::new();
        // As the node's loop runs: requests arrive while `due` waits
        // (and is dropped half way each time one does).
        let mut requests = [0u64, 500, 1200].into_iter().peekable();
        loop {
            let next = requests.peek().map(|at| start + Duration::from_millis(*at));
            tokio::select! {
                () = coalesce.due() => polls.push(start.elapsed()),
                () = tokio::time::sleep_until(next.unwrap_or(start)), if next.is_some() => {
                    requests.next();
                    if coalesce.asked() {
                        polls.push(start.elapsed());
                    }
                }
                () = tokio::time::sleep(Duration::from_secs(5)), if next.is_none() => break,
            }
        }
        assert_eq!(
            polls,
            [
                Duration::ZERO,
                Duration::from_secs(1),
                Duration::from_secs(2)
            ]
        );
    }
}
