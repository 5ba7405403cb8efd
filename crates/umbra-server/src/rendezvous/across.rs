//! Rendezvous across the nodes of a cluster.
//!
//! Devices try a cluster's nodes in turn, so the device being linked may
//! reach another node than the one its account's device opened the
//! rendezvous on. The node that holds a rendezvous answers for it on NATS
//! (request and reply) for as long as it is open, on a subject named
//! after a hash of its ID (`umbra.v1.rdv.<hash>`); a node asked about a
//! rendezvous it does not hold asks there, and answers as the holder did.
//! The ID, the capability to read and write the slots, never goes on
//! NATS: the subject carries the first half of its SHA-256 (the ID is 16
//! random bytes, so the hash gives nothing away), the forwarded request a
//! zeroed ID. The payloads are sealed by the devices
//! (`umbra_client::pairing`): NATS sees their sizes and timing.
//!
//! NATS away, or the holder stopped: the rendezvous is unknown to the
//! other nodes, as one lost to a restart (the user links again).

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use sha2::{Digest, Sha256};
use tracing::{debug, warn};
use umbra_proto::clock::Clock;
use umbra_proto::frame::ClientFrame;
use umbra_proto::rendezvous::RENDEZVOUS_TTL_SECS;
use umbra_proto::{
    ErrorCode, ErrorReply, RendezvousId, Reply, Request, ServerMessage, decode_client,
    decode_server, encode_client, encode_server,
};

use super::Rendezvous;
use crate::cluster::{Asked, Cluster};

/// How long a node waits for the holder's answer.
pub const ASK_TIMEOUT: Duration = Duration::from_secs(5);

/// How long opening a rendezvous waits for NATS to route to its holder
/// (past this, only this node serves it).
const HOLD_TIMEOUT: Duration = Duration::from_secs(2);

/// The subject rendezvous `id`'s holder answers on.
pub fn subject(id: &RendezvousId) -> String {
    let digest = Sha256::digest(id.0);
    let half: String = hex::encode(digest).chars().take(32).collect();
    format!("umbra.v1.rdv.{half}")
}

/// Answers for rendezvous `id` on NATS until it is gone from `rendezvous`
/// (closed, replaced, expired) or NATS ends the subscription. Returns
/// once a request to it reaches this node through NATS, or after
/// [`HOLD_TIMEOUT`].
pub async fn hold(
    rendezvous: Arc<Rendezvous>,
    clock: Arc<dyn Clock>,
    cluster: Arc<Cluster>,
    id: RendezvousId,
) {
    let gone = rendezvous.gone(&id);
    let subject = subject(&id);
    let mut subscriber = match tokio::time::timeout(HOLD_TIMEOUT, cluster.listen(subject)).await {
        Ok(Ok(subscriber)) => subscriber,
        Ok(Err(error)) => {
            warn!(%error, "a rendezvous is served by this node only");
            return;
        }
        Err(_) => {
            warn!(
                "NATS did not take a rendezvous's subscription in time: this node only serves it"
            );
            return;
        }
    };
    let serving = Arc::clone(&cluster);
    tokio::spawn(async move {
        let expiry = tokio::time::sleep(Duration::from_secs(RENDEZVOUS_TTL_SECS));
        tokio::pin!(expiry);
        loop {
            tokio::select! {
                _ = gone.cancelled() => break,
                _ = &mut expiry => break,
                message = subscriber.next() => match message {
                    Some(message) => {
                        answer(&rendezvous, clock.as_ref(), &serving, &id, message).await;
                    }
                    None => break,
                },
            }
        }
        let _ = subscriber.unsubscribe().await;
    });
    // Asks itself through NATS: once that is answered, so is a device
    // that comes through another node.
    let started = tokio::time::Instant::now();
    let probe = Request::RendezvousGet {
        rendezvous: id,
        slot: 0,
    };
    while started.elapsed() < HOLD_TIMEOUT {
        if ask(&cluster, probe.clone()).await.is_some() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    warn!("NATS did not route to a rendezvous in time: other nodes may not find it yet");
}

/// Runs a put or a get a node forwarded to rendezvous `id`, and replies.
async fn answer(
    rendezvous: &Rendezvous,
    clock: &dyn Clock,
    cluster: &Cluster,
    id: &RendezvousId,
    message: async_nats::Message,
) {
    let Some(reply) = message.reply else {
        return;
    };
    let now = clock.now();
    let result = match decode_client(&message.payload).map(|frame| frame.request) {
        Ok(Request::RendezvousPut { slot, payload, .. }) => {
            rendezvous.put(id, slot, payload, now).map(|()| Reply::Done)
        }
        Ok(Request::RendezvousGet { slot, .. }) => rendezvous
            .get(id, slot, now)
            .map(|payload| Reply::RendezvousSlot { payload }),
        Ok(_) | Err(_) => Err(ErrorReply::new(
            ErrorCode::MalformedFrame,
            "a node forwards only a rendezvous's puts and gets",
        )),
    };
    let response = encode_server(&ServerMessage::Response { id: 0, result });
    cluster.reply(reply, response).await;
}

/// Runs `request` (a put or a get) at the node holding its rendezvous:
/// its answer, or none if no node holds it (or NATS is away).
pub async fn ask(cluster: &Cluster, request: Request) -> Option<Result<Reply, ErrorReply>> {
    let (Request::RendezvousPut { rendezvous, .. } | Request::RendezvousGet { rendezvous, .. }) =
        &request
    else {
        return None;
    };
    let subject = subject(rendezvous);
    let request = match request {
        Request::RendezvousPut { slot, payload, .. } => Request::RendezvousPut {
            rendezvous: RendezvousId([0; 16]),
            slot,
            payload,
        },
        Request::RendezvousGet { slot, .. } => Request::RendezvousGet {
            rendezvous: RendezvousId([0; 16]),
            slot,
        },
        _ => return None,
    };
    let bytes = encode_client(&ClientFrame { id: 1, request });
    match cluster.ask(subject, bytes, ASK_TIMEOUT).await {
        Asked::Answered(answer) => match decode_server(&answer) {
            Ok(ServerMessage::Response { result, .. }) => Some(result),
            other => {
                debug!(?other, "a rendezvous's holder answered what is no response");
                Some(Err(busy()))
            }
        },
        Asked::NoOne => None,
        Asked::NoAnswer => Some(Err(busy())),
    }
}

fn busy() -> ErrorReply {
    ErrorReply::new(
        ErrorCode::ServerBusy,
        "the node holding this rendezvous did not answer in time; try again",
    )
}
