//! Rendezvous across the nodes of a cluster.
//!
//! Devices try a cluster's nodes in turn, so the device being linked may
//! reach another node than the one its account's device opened the
//! rendezvous on, and the opener may have moved by the time it closes it.
//! The node that holds a rendezvous answers for it on NATS for as long as
//! it is open, on a subject named after a keyed hash of its ID
//! (`umbra.v1.rdv.<hash>`); a node asked to put, get or close at a
//! rendezvous it does not hold asks there, and answers as the holder did.
//!
//! Every request and answer carries a tag (HMAC-SHA-256 under a key
//! derived from `delivery-ids.key`) over the rendezvous ID, the asker's
//! reply subject and the content: only a node of the cluster that knows
//! the ID can ask, and only the holder can answer, so holding NATS
//! credentials is not enough to read, write or close a rendezvous, nor to
//! answer for one. The ID itself never goes on NATS (requests carry a
//! zeroed one). The slots are sealed by the devices
//! (`umbra_client::pairing`); NATS sees their sizes and timing, and the
//! sealed bytes of what is forwarded.
//!
//! NATS away: the other nodes answer `SERVER_BUSY`, and find the
//! rendezvous once NATS is back (one opened meanwhile too). The holder
//! stopped: the rendezvous is unknown to the other nodes, as one lost to a
//! restart.
//!
//! ```text
//! request := tag (32) opener_len (1) opener (the closing account's ID;
//!            none for a put or a get) frame (a client frame: a put, a
//!            get or a close, its rendezvous zeroed)
//! answer  := tag (32) message (a server frame: the response)
//! tag     := HMAC(key, "ask" | "answer", ID, reply subject, the rest)
//! ```

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};
use umbra_proto::clock::Clock;
use umbra_proto::frame::ClientFrame;
use umbra_proto::rendezvous::RENDEZVOUS_TTL_SECS;
use umbra_proto::{
    AccountId, ErrorCode, ErrorReply, RendezvousId, Reply, Request, ServerMessage, decode_client,
    decode_server, encode_client, encode_server,
};

use super::Rendezvous;
use crate::cluster::Cluster;
use crate::delivery_ids::ClusterMac;

/// How long a node waits for the holder's answer.
pub const ASK_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a node waits, after NATS said no node holds a rendezvous, for
/// an answer that says otherwise.
const NO_ONE_GRACE: Duration = Duration::from_millis(250);

/// How long opening a rendezvous waits, at most, for a request through
/// NATS to reach its holder (past this, only this node serves it).
const HOLD_TIMEOUT: Duration = Duration::from_secs(2);

const TAG_LEN: usize = 32;

/// Most requests a holder answers for one rendezvous (the inboxes it
/// remembers, to run none twice): a link takes a few thousand at most,
/// one new device polling through another node for ten minutes.
const MAX_ANSWERED: usize = 16_384;

/// The key the nodes tag what they say about rendezvous with.
#[derive(Debug)]
pub struct Keys(ClusterMac);

impl Keys {
    pub fn new(cluster_key: &[u8; 16]) -> Keys {
        Keys(ClusterMac::new(cluster_key, b"umbra.v1.rdv"))
    }

    /// The subject rendezvous `id`'s holder answers on.
    fn subject(&self, id: &RendezvousId) -> String {
        let tag = self.0.tag(&[b"subject", &id.0]);
        let half: String = hex::encode(tag).chars().take(32).collect();
        format!("umbra.v1.rdv.{half}")
    }
}

/// A message's tag and what follows it.
fn split_tagged(message: &[u8]) -> Option<(&[u8], &[u8])> {
    message.split_at_checked(TAG_LEN)
}

/// Where a node's holders run: on its task tracker, until it stops.
#[derive(Clone, Debug, Default)]
pub struct Holders {
    pub tasks: TaskTracker,
    pub stop: CancellationToken,
}

/// Answers for rendezvous `id` on NATS until it is gone from `rendezvous`
/// (closed, replaced, expired), its time is up, the node stops, or NATS
/// ends the subscription. Returns once a request through NATS reaches it,
/// or after [`HOLD_TIMEOUT`] at most; at once while NATS is away (the
/// subscription waits for NATS, as the node's others do: the other nodes
/// find the rendezvous once it is back).
pub async fn hold(
    rendezvous: Arc<Rendezvous>,
    clock: Arc<dyn Clock>,
    cluster: Arc<Cluster>,
    keys: Arc<Keys>,
    id: RendezvousId,
    holders: &Holders,
) {
    let gone = rendezvous.gone(&id);
    let held = tokio::time::timeout(HOLD_TIMEOUT, async {
        let mut subscriber = match cluster.listen(keys.subject(&id)).await {
            Ok(subscriber) => subscriber,
            Err(error) => {
                warn!(%error, "a rendezvous is served by this node only");
                return;
            }
        };
        let (serving, keys_serving) = (Arc::clone(&cluster), Arc::clone(&keys));
        let stop = holders.stop.clone();
        holders.tasks.spawn(async move {
            let expiry = tokio::time::sleep(Duration::from_secs(RENDEZVOUS_TTL_SECS));
            tokio::pin!(expiry);
            let mut answered = Answered::default();
            while !answered.full() {
                tokio::select! {
                    _ = gone.cancelled() => break,
                    _ = stop.cancelled() => break,
                    _ = &mut expiry => break,
                    message = subscriber.next() => match message {
                        Some(message) => match answered.hear(&rendezvous, clock.as_ref(), &keys_serving, &id, message) {
                            Heard::Answer(reply, answer) => {
                                let _ = tokio::time::timeout(ASK_TIMEOUT, serving.reply(reply, answer)).await;
                            }
                            Heard::Again => debug!("a rendezvous request heard again: not run"),
                            Heard::Ignored => {}
                        },
                        None => break,
                    },
                }
            }
            if answered.full() {
                warn!("a rendezvous was asked about too often: served by this node only from now");
            }
            let _ = subscriber.unsubscribe().await;
        });
        if !cluster.connected() {
            return;
        }
        // Asks itself through NATS, as another node would: once that is
        // answered, so is a device that comes through another node.
        let probe = Request::RendezvousGet {
            rendezvous: id,
            slot: 0,
        };
        loop {
            if ask(&cluster, &keys, probe.clone(), None).await.is_some() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    if held.is_err() {
        warn!("NATS did not route to a rendezvous in time: other nodes may not find it yet");
    }
}

/// What a holder makes of a request heard on NATS.
#[derive(Debug)]
enum Heard {
    /// Run: the answer, and where it goes.
    Answer(async_nats::Subject, Vec<u8>),
    /// Heard before on the same inbox: a copy (to read a slot again, or
    /// to be answered in bulk), not run.
    Again,
    /// Not the cluster's, or not a request a holder runs.
    Ignored,
}

/// The inboxes a holder answered for one rendezvous: every ask has one of
/// its own, so a request heard again on one is not run again.
#[derive(Debug, Default)]
struct Answered(std::collections::HashSet<String>);

impl Answered {
    fn hear(
        &mut self,
        rendezvous: &Rendezvous,
        clock: &dyn Clock,
        keys: &Keys,
        id: &RendezvousId,
        message: async_nats::Message,
    ) -> Heard {
        if message
            .reply
            .as_ref()
            .is_some_and(|reply| self.0.contains(reply.as_str()))
        {
            return Heard::Again;
        }
        match answer(rendezvous, clock, keys, id, message) {
            Some((reply, answer)) => {
                self.0.insert(reply.to_string());
                Heard::Answer(reply, answer)
            }
            None => Heard::Ignored,
        }
    }

    /// Whether it answered [`MAX_ANSWERED`] requests: the holder stops.
    fn full(&self) -> bool {
        self.0.len() >= MAX_ANSWERED
    }
}

/// Runs a put, get or close another node forwarded to rendezvous `id`:
/// where to answer, and the answer (none for what this node does not
/// take: no reply subject, a tag that does not check, not such a
/// request).
fn answer(
    rendezvous: &Rendezvous,
    clock: &dyn Clock,
    keys: &Keys,
    id: &RendezvousId,
    message: async_nats::Message,
) -> Option<(async_nats::Subject, Vec<u8>)> {
    let reply = message.reply?;
    let (tag, rest) = split_tagged(&message.payload)?;
    if !keys.0.check(&[b"ask", &id.0, reply.as_bytes(), rest], tag) {
        debug!("a rendezvous request whose tag does not check: ignored");
        return None;
    }
    let (&opener_len, rest) = rest.split_first()?;
    let (opener, frame) = rest.split_at_checked(usize::from(opener_len))?;
    let now = clock.now();
    let result = match decode_client(frame).ok()?.request {
        Request::RendezvousPut { slot, payload, .. } => {
            rendezvous.put(id, slot, payload, now).map(|()| Reply::Done)
        }
        Request::RendezvousGet { slot, .. } => rendezvous
            .get(id, slot, now)
            .map(|payload| Reply::RendezvousSlot { payload }),
        Request::CloseRendezvous { .. } => {
            let opener = AccountId::parse(std::str::from_utf8(opener).ok()?).ok()?;
            rendezvous.close(id, &opener).map(|()| Reply::Done)
        }
        _ => return None,
    };
    let response = encode_server(&ServerMessage::Response { id: 1, result });
    let tag = keys.0.tag(&[b"answer", &id.0, reply.as_bytes(), &response]);
    Some((reply, [&tag[..], &response].concat()))
}

/// Runs `request` (a put, a get, or a close by `opener`) at the node
/// holding its rendezvous: its answer; none if no node holds it.
/// `SERVER_BUSY` while NATS is away, or when the holder does not answer
/// within [`ASK_TIMEOUT`].
pub async fn ask(
    cluster: &Cluster,
    keys: &Keys,
    request: Request,
    opener: Option<&AccountId>,
) -> Option<Result<Reply, ErrorReply>> {
    if !cluster.connected() {
        return Some(Err(busy("the other nodes cannot be reached now")));
    }
    let inbox = cluster.inbox();
    let (id, message) = request_message(keys, &inbox, request, opener)?;
    let asked = tokio::time::timeout(ASK_TIMEOUT, async {
        let mut answers = cluster.listen(inbox.clone()).await.ok()?;
        let subject = keys.subject(&id);
        if !cluster
            .tell_with_reply(subject, inbox.clone(), message)
            .await
        {
            return Some(Err(busy("the other nodes cannot be reached now")));
        }
        // NATS's "no responders" is not tagged (anyone on NATS could send
        // one to this inbox): taken only if no tagged answer follows soon.
        let mut no_one_until = None;
        loop {
            let next = match no_one_until {
                Some(until) => match tokio::time::timeout_at(until, answers.next()).await {
                    Ok(next) => next,
                    Err(_) => return None,
                },
                None => answers.next().await,
            };
            let Some(message) = next else { break };
            if message.status == Some(async_nats::StatusCode::NO_RESPONDERS) {
                no_one_until.get_or_insert(tokio::time::Instant::now() + NO_ONE_GRACE);
                continue;
            }
            match read_answer(keys, &id, &inbox, &message.payload) {
                Some(result) => return Some(result),
                None => debug!("a rendezvous answer whose tag does not check: ignored"),
            }
        }
        Some(Err(busy("the other nodes cannot be reached now")))
    })
    .await;
    asked.unwrap_or_else(|_| {
        Some(Err(busy(
            "the node holding this rendezvous did not answer in time",
        )))
    })
}

/// The rendezvous `request` is for, and the message that asks its holder
/// to run it (answers to `inbox`; `opener` closes).
fn request_message(
    keys: &Keys,
    inbox: &str,
    request: Request,
    opener: Option<&AccountId>,
) -> Option<(RendezvousId, Vec<u8>)> {
    let zeroed = RendezvousId([0; 16]);
    let (id, request) = match request {
        Request::RendezvousPut {
            rendezvous,
            slot,
            payload,
        } => (
            rendezvous,
            Request::RendezvousPut {
                rendezvous: zeroed,
                slot,
                payload,
            },
        ),
        Request::RendezvousGet { rendezvous, slot } => (
            rendezvous,
            Request::RendezvousGet {
                rendezvous: zeroed,
                slot,
            },
        ),
        Request::CloseRendezvous { rendezvous } => {
            (rendezvous, Request::CloseRendezvous { rendezvous: zeroed })
        }
        _ => return None,
    };
    let opener = opener.map_or(&[][..], |account| account.as_str().as_bytes());
    let opener_len = u8::try_from(opener.len()).ok()?;
    let rest = [
        &[opener_len][..],
        opener,
        &encode_client(&ClientFrame { id: 1, request }),
    ]
    .concat();
    let tag = keys.0.tag(&[b"ask", &id.0, inbox.as_bytes(), &rest]);
    Some((id, [&tag[..], &rest].concat()))
}

/// The holder's answer in `payload`, if its tag checks.
fn read_answer(
    keys: &Keys,
    id: &RendezvousId,
    inbox: &str,
    payload: &[u8],
) -> Option<Result<Reply, ErrorReply>> {
    let (tag, response) = split_tagged(payload)?;
    if !keys
        .0
        .check(&[b"answer", &id.0, inbox.as_bytes(), response], tag)
    {
        return None;
    }
    Some(match decode_server(response) {
        Ok(ServerMessage::Response { result, .. }) => result,
        _ => Err(busy("the node holding this rendezvous answered nonsense")),
    })
}

fn busy(why: &str) -> ErrorReply {
    ErrorReply::new(ErrorCode::ServerBusy, format!("{why}; try again"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alice() -> AccountId {
        AccountId::parse("AAAAAAAA").unwrap_or_else(|e| panic!("{e}"))
    }

    fn bob() -> AccountId {
        AccountId::parse("BBBBBBBB").unwrap_or_else(|e| panic!("{e}"))
    }

    #[derive(Debug)]
    struct Fixed;
    impl Clock for Fixed {
        fn now(&self) -> u64 {
            100
        }
    }

    /// A message as NATS hands it to the holder.
    fn heard(payload: Vec<u8>, reply: &str) -> async_nats::Message {
        async_nats::Message {
            subject: "umbra.v1.rdv.x".into(),
            reply: Some(reply.into()),
            payload: payload.into(),
            headers: None,
            status: None,
            description: None,
            length: 0,
        }
    }

    /// What the holder of `id` answers to `request` asked under `asker`'s
    /// key, read under the cluster's.
    fn run(
        holder: &Rendezvous,
        id: &RendezvousId,
        asker: &Keys,
        request: Request,
        opener: Option<&AccountId>,
    ) -> Option<Result<Reply, ErrorReply>> {
        let keys = Keys::new(&[1; 16]);
        let (asked, message) = request_message(asker, "_INBOX.a", request, opener)?;
        assert_eq!(&asked, id);
        let (reply, answer) = super::answer(holder, &Fixed, &keys, id, heard(message, "_INBOX.a"))?;
        assert_eq!(reply.as_str(), "_INBOX.a");
        read_answer(&keys, id, "_INBOX.a", &answer)
    }

    #[test]
    fn the_holder_answers_only_the_clusters_nodes_and_only_to_the_asker() {
        let holder = Rendezvous::new(1 << 20);
        let (id, _) = holder
            .open(&alice(), 100)
            .unwrap_or_else(|e| panic!("{e:?}"));
        let cluster = Keys::new(&[1; 16]);
        let put = Request::RendezvousPut {
            rendezvous: id,
            slot: 3,
            payload: b"sealed".to_vec(),
        };
        assert_eq!(
            run(&holder, &id, &cluster, put.clone(), None),
            Some(Ok(Reply::Done))
        );
        let get = Request::RendezvousGet {
            rendezvous: id,
            slot: 3,
        };
        assert_eq!(
            run(&holder, &id, &cluster, get.clone(), None),
            Some(Ok(Reply::RendezvousSlot {
                payload: Some(b"sealed".to_vec())
            }))
        );
        // Under another key (a node of another cluster, or not a node):
        // nothing is run, nothing answered.
        let stranger = Keys::new(&[2; 16]);
        let slot_9 = Request::RendezvousPut {
            rendezvous: id,
            slot: 9,
            payload: b"squat".to_vec(),
        };
        assert_eq!(run(&holder, &id, &stranger, slot_9, None), None);
        assert_eq!(holder.get(&id, 9, 100).ok(), Some(None), "not written");
        // A request heard again with another reply subject (to read what
        // it answers) does not check either.
        let (_, message) =
            request_message(&cluster, "_INBOX.a", get, None).unwrap_or_else(|| panic!("a get"));
        assert!(
            super::answer(&holder, &Fixed, &cluster, &id, heard(message, "_INBOX.b")).is_none()
        );
        // An answer under another key is not taken for the holder's.
        let (_, message) =
            request_message(&stranger, "_INBOX.a", put, None).unwrap_or_else(|| panic!("a put"));
        let (_, answer) =
            super::answer(&holder, &Fixed, &stranger, &id, heard(message, "_INBOX.a"))
                .unwrap_or_else(|| panic!("answered under its own key"));
        assert_eq!(read_answer(&cluster, &id, "_INBOX.a", &answer), None);
    }

    #[test]
    fn only_its_opener_closes_a_rendezvous_from_another_node() {
        let holder = Rendezvous::new(1 << 20);
        let (id, _) = holder
            .open(&alice(), 100)
            .unwrap_or_else(|e| panic!("{e:?}"));
        let cluster = Keys::new(&[1; 16]);
        let close = Request::CloseRendezvous { rendezvous: id };
        let gone = holder.gone(&id);
        let by_bob = run(&holder, &id, &cluster, close.clone(), Some(&bob()));
        assert!(matches!(by_bob, Some(Err(ref e)) if e.code == ErrorCode::UnknownRendezvous));
        assert!(holder.holds(&id, 100));
        assert!(!gone.is_cancelled());
        let by_alice = run(&holder, &id, &cluster, close, Some(&alice()));
        assert_eq!(by_alice, Some(Ok(Reply::Done)));
        assert!(!holder.holds(&id, 100));
        assert!(gone.is_cancelled(), "what answers for it on NATS stops");
    }

    #[test]
    fn a_request_heard_again_on_its_inbox_is_not_run_again() {
        let holder = Rendezvous::new(1 << 20);
        let (id, _) = holder
            .open(&alice(), 100)
            .unwrap_or_else(|e| panic!("{e:?}"));
        let keys = Keys::new(&[1; 16]);
        let get = |inbox: &str| {
            let request = Request::RendezvousGet {
                rendezvous: id,
                slot: 3,
            };
            let (_, message) =
                request_message(&keys, inbox, request, None).unwrap_or_else(|| panic!("a get"));
            heard(message, inbox)
        };
        let mut answered = Answered::default();
        let hear =
            |answered: &mut Answered, message| answered.hear(&holder, &Fixed, &keys, &id, message);
        assert!(
            matches!(hear(&mut answered, get("_INBOX.a")), Heard::Answer(reply, _) if reply.as_str() == "_INBOX.a")
        );
        assert!(
            matches!(hear(&mut answered, get("_INBOX.a")), Heard::Again),
            "a copy is not run"
        );
        assert!(
            matches!(hear(&mut answered, get("_INBOX.b")), Heard::Answer(..)),
            "a new ask is"
        );
        // Past the most it remembers, the holder stops (its node alone
        // serves the rendezvous).
        for n in 2..MAX_ANSWERED {
            assert!(!answered.full());
            assert!(matches!(
                hear(&mut answered, get(&format!("_INBOX.{n}"))),
                Heard::Answer(..)
            ));
        }
        assert!(answered.full());
    }

    #[test]
    fn a_subject_names_no_rendezvous_id() {
        let id = RendezvousId([0xab; 16]);
        let subject = Keys::new(&[1; 16]).subject(&id);
        assert!(!subject.contains(&hex::encode(id.0)));
        assert_ne!(subject, Keys::new(&[2; 16]).subject(&id), "keyed");
    }
}
