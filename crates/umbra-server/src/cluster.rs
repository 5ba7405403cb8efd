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
//!   session of it).

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

/// This node's link to the others.
pub struct Cluster {
    client: async_nats::Client,
    /// A random name for this node, to tell its own announcements apart.
    node: String,
    /// NATS was away since the last poll: wake-ups may have been lost.
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
#[error("cannot reach NATS at the configured address: {0}")]
pub struct ClusterError(String);

impl Cluster {
    /// Connects to NATS at `url` (`nats://host:port`). The client
    /// reconnects by itself, and re-subscribes, after NATS goes away.
    pub async fn connect(url: &str) -> Result<Arc<Cluster>, ClusterError> {
        let mut node = [0u8; 8];
        getrandom::getrandom(&mut node).map_err(|e| ClusterError(e.to_string()))?;
        let node = hex::encode(node);
        let missed = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&missed);
        let client = async_nats::ConnectOptions::new()
            .name(format!("umbra-server {node}"))
            .connection_timeout(Duration::from_secs(5))
            .event_callback(move |event| {
                let flag = Arc::clone(&flag);
                async move {
                    match event {
                        async_nats::Event::Disconnected => {
                            warn!("NATS is away: connections poll their mailboxes meanwhile");
                            flag.store(true, Ordering::SeqCst);
                        }
                        async_nats::Event::Connected => info!("NATS is back"),
                        async_nats::Event::SlowConsumer(_) => {
                            // A wake-up dropped: read every mailbox again.
                            flag.store(true, Ordering::SeqCst);
                        }
                        other => debug!(%other, "NATS"),
                    }
                }
            })
            .connect(url)
            .await
            .map_err(|e| ClusterError(e.to_string()))?;
        info!(%node, "routing between nodes over NATS");
        Ok(Arc::new(Cluster {
            client,
            node,
            missed,
        }))
    }

    fn publish(&self, subject: String, payload: impl Into<bytes::Bytes>) {
        let client = self.client.clone();
        let payload = payload.into();
        // Publishing only queues the message for the client's connection;
        // a lost one costs latency, not mail (see the module's notes).
        tokio::spawn(async move {
            if let Err(error) = client.publish(subject, payload).await {
                debug!(%error, "publishing to NATS");
            }
        });
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

    /// Follows `device`'s subjects for its connection on this node, until
    /// `stop`: wake-ups wake `inbox`, an end ends it. Returns once the
    /// subscriptions are in place at NATS (so a wake-up published after
    /// this returns reaches the connection), having told the other nodes
    /// that the device is here now (they end its sessions there).
    pub async fn follow(
        self: &Arc<Self>,
        device: &DeviceAddr,
        inbox: Arc<Inbox>,
        stop: CancellationToken,
    ) {
        let subscribed = async {
            let on_device = self.client.subscribe(device_subject(device)).await?;
            let on_account = self
                .client
                .subscribe(account_subject(&device.account))
                .await?;
            self.client.flush().await.map_err(|e| e.to_string())?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>((on_device, on_account))
        };
        let (mut on_device, mut on_account) = match subscribed.await {
            Ok(subscriptions) => subscriptions,
            Err(error) => {
                // NATS is away: the connection is polled meanwhile.
                warn!(%error, "subscribing to a device's subject");
                self.missed.store(true, Ordering::SeqCst);
                return;
            }
        };
        self.publish(
            device_subject(device),
            format!("replaced {}", self.node).into_bytes(),
        );
        let node = self.node.clone();
        tokio::spawn(async move {
            loop {
                let message = tokio::select! {
                    _ = stop.cancelled() => break,
                    message = on_device.next() => message,
                    message = on_account.next() => message,
                };
                let Some(message) = message else { break };
                match &message.payload[..] {
                    b"wake" => inbox.wake(),
                    b"removed" => {
                        inbox.end(crate::service::removed_session());
                        break;
                    }
                    b"revoked" => {
                        inbox.end(crate::service::revoked_session());
                        break;
                    }
                    other => {
                        if let Some(from) = other.strip_prefix(b"replaced ")
                            && from != node.as_bytes()
                        {
                            inbox.end(ErrorReply::new(
                                ErrorCode::SessionReplaced,
                                "this device connected to another node of the cluster",
                            ));
                            break;
                        }
                    }
                }
            }
        });
    }

    /// Whether wake-ups may have been lost since the last call (NATS went
    /// away, or dropped messages for a slow consumer), or NATS is away
    /// now: then every connection should read its mailbox.
    pub fn should_poll(&self) -> bool {
        let away = self.client.connection_state() != async_nats::connection::State::Connected;
        self.missed.swap(away, Ordering::SeqCst) || away
    }
}
