//! One device connection: the WebSocket handshake, the request loop, and
//! the writer that sends responses and pushes the device's mailbox.
//!
//! Two tasks per connection: the reader (requests are handled one at a
//! time, in order) and the writer, which owns the socket's sending half.
//! The reader hands responses to the writer through a bounded queue; once
//! the device is authenticated, the writer also empties the account's
//! [`Inbox`] and reads its mailbox. A slow device slows only itself.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{FuturesOrdered, SplitSink};
use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::burst::Burst;
use crate::reads::FrameReads;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::{Bytes, Error as WsError, Message};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};
use umbra_proto::frame::Delivery;
use umbra_proto::{
    AccountId, DecodeError, DeviceAddr, ErrorCode, ErrorReply, MAX_FRAME_BYTES, Nonce,
    PROTOCOL_VERSION, Push, Request, ServerMessage, SplicedFrame, decode_client_bytes,
    encode_server, encode_server_spliced, refused_frame_id,
};

use crate::limits::RateLimit;
use crate::registry::Inbox;
use crate::service::{Answer, PushWindow, Services, Session};
use crate::{Direction, FrameTap};
use umbra_store::StoredDelivery;

/// Responses queued per connection before the reader waits.
const OUTBOUND_QUEUE: usize = 64;
/// `GetBlob`s of one connection waiting for their answer before the
/// reader waits (a device keeps 4 in flight).
const FILE_READS: usize = 8;
/// Deliveries read from the store per mailbox read.
const MAILBOX_BATCH: usize = 128;
/// Deliveries pushed from memory before the writer reads its mailbox to
/// move its high-water mark (bounds the set of IDs it remembers).
///
/// A connection that only receives fresh copies reads its mailbox for no
/// other reason, so under steady traffic its `pushed` set grows to this
/// bound before a read empties it. At 4,096 (an estimated ~70 KB per
/// connection, hours to reach at a chat's pace) the server's memory crept
/// up through the whole `umbra-bench soak` run: ~4,000 more IDs
/// remembered every second across its ~7,000 connections. At 256 (~4 KB)
/// it costs one mailbox read per 256 deliveries pushed, which finds only
/// the few not acknowledged yet.
const MAX_PUSHED_AHEAD: usize = 256;
/// How long after a failed mailbox read (the store away) it is tried
/// again; the connection answers requests meanwhile.
const READ_RETRY: Duration = Duration::from_secs(1);
/// How long the WebSocket upgrade may take once TLS is up.
const UPGRADE_TIMEOUT: Duration = Duration::from_secs(10);

/// Bytes of frames collected before they are written to the socket
/// ([`Burst`]). The writer feeds everything that is ready (queued
/// responses, every answer a commit settled, the inbox) and flushes once
/// per burst, so a burst shares one `send` (with TLS, fewer records).
/// Against writing each frame as it is fed, `umbra-bench offline` (3 runs
/// each, one session) went from 35-42k to 51-61k accepted msgs/s and the
/// drain from 85-105k to 131-181k msgs/s; relay was unchanged within
/// run-to-run noise. (Measured when tungstenite collected the burst
/// itself; [`Burst`] collects it and frees its buffer after each burst.)
const WRITE_BUFFER: usize = 16 * 1024;

/// What tungstenite collects before handing frames to [`Burst`]. It keeps
/// the capacity of the most it ever held (this plus one frame) for the
/// connection's life, so it is small; handing on every frame singly (0)
/// cost the drain a sixth of its rate (`umbra-bench offline`, 3 runs each,
/// alternating with tungstenite collecting 16 KiB itself as before: with 0
/// 114k, 113k, 126k msgs/s against 157k, 135k, 140k; with 4 KiB 148k,
/// 137k, 132k against 139k, 138k, 149k; accept rates unchanged).
const FRAME_BUFFER: usize = 4096;
/// Largest WebSocket frame the server writes: longer messages go in
/// fragments of this size (the write buffer, which never shrinks, grows
/// to about one fragment on a connection that ever sent a file).
const FRAGMENT: usize = 16 * 1024;

/// WebSocket settings: a small read buffer (tungstenite allocates it up
/// front for every connection), frames handed on in small groups (to
/// [`Burst`], which collects a burst without keeping memory between
/// bursts), and the protocol's frame limit.
pub fn websocket_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(FRAME_BUFFER)
        .max_message_size(Some(MAX_FRAME_BYTES))
        .max_frame_size(Some(MAX_FRAME_BYTES))
}

pub(crate) struct Connection {
    pub services: Arc<Services>,
    pub id: u64,
    pub shutdown: CancellationToken,
    pub tap: Option<FrameTap>,
    pub max_malformed_frames: u32,
    /// Set when the connection must be refused (its address has too many
    /// open): the device is told why instead of Hello, and it is closed.
    pub refused: Option<ErrorReply>,
}

/// What the reader hands the writer.
enum Outbound {
    Frame(Vec<u8>),
    /// A response to send once ready: a request's effects durable, or a
    /// file's bytes read (see [`FILE_READS`]).
    Later(LaterResponse),
    /// The device authenticated as this account: from now on, push its
    /// mailbox (after the responses queued before this).
    Online(Box<(DeviceAddr, Arc<Inbox>)>),
}

fn error_frame(id: u64, error: ErrorReply) -> Vec<u8> {
    encode_server(&ServerMessage::Response {
        id,
        result: Err(error),
    })
}

fn decode_error_reply(error: &DecodeError) -> ErrorReply {
    let code = match error {
        DecodeError::UnsupportedVersion { .. } => ErrorCode::UnsupportedVersion,
        DecodeError::TooLarge { .. } => ErrorCode::FrameTooLarge,
        _ => ErrorCode::MalformedFrame,
    };
    ErrorReply::new(code, error.to_string())
}

impl Connection {
    /// Serves one accepted stream (TLS or plain) until the device leaves,
    /// misbehaves, or the server shuts down.
    pub async fn serve<S>(self, stream: S)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let _open = crate::metrics::Open::new(&self.services.metrics);
        // Boxed, like the request handler below: the handshake's state is
        // large and needed once, not for the connection's whole life.
        let upgrade = Box::pin(tokio_tungstenite::accept_async_with_config(
            Burst::new(FrameReads::new(stream), WRITE_BUFFER),
            Some(websocket_config()),
        ));
        let ws = match tokio::time::timeout(UPGRADE_TIMEOUT, upgrade).await {
            Ok(Ok(ws)) => ws,
            Ok(Err(error)) => {
                debug!(connection = self.id, %error, "WebSocket handshake failed");
                return;
            }
            Err(_) => {
                debug!(connection = self.id, "WebSocket handshake timed out");
                return;
            }
        };
        if let Some(refusal) = self.refused {
            let mut ws = ws;
            let _ = ws
                .send(Message::Binary(error_frame(0, refusal).into()))
                .await;
            let _ = ws.close(None).await;
            return;
        }
        let (sink, mut source) = ws.split();
        let (out_tx, out_rx) = mpsc::channel::<Outbound>(OUTBOUND_QUEUE);
        // Cancelled when the reader stops, so that what follows the
        // device for the cluster does not outlive its connection.
        let stop = self.shutdown.child_token();
        let unacked = Arc::new(Unacked::new(self.services.limits.push_window));
        let writer = tokio::spawn(
            Writer {
                sink,
                tap: self.tap.clone(),
                services: Arc::clone(&self.services),
                unacked: Arc::clone(&unacked),
                flushing: Vec::new(),
            }
            .run(out_rx),
        );
        let send = |bytes: Vec<u8>| out_tx.send(Outbound::Frame(bytes));
        let file_bytes_slot = Arc::new(tokio::sync::Semaphore::new(1));
        let file_reads = Arc::new(tokio::sync::Semaphore::new(FILE_READS));

        let mut nonce = [0u8; 32];
        if getrandom::getrandom(&mut nonce).is_err() {
            warn!("no randomness for a connection nonce; dropping the connection");
            return;
        }
        let nonce = Nonce::from_bytes(nonce);
        let now = self.services.clock.now();
        let token_keys = self
            .services
            .tokens
            .announced(&*self.services.store, now)
            .await;
        let hello = ServerMessage::Push(Push::Hello {
            protocol_version: u32::from(PROTOCOL_VERSION),
            nonce,
            server_time: now,
            max_frame_bytes: MAX_FRAME_BYTES as u32,
            token_keys,
        });
        let _ = send(encode_server(&hello)).await;

        let limits = &self.services.limits;
        let mut session = Session::AwaitingAuth { nonce };
        let mut online: Option<(AccountId, Arc<Inbox>)> = None;
        let mut malformed = 0u32;
        let mut before_auth = 0u32;
        let mut rate = RateLimit::new(
            limits.config.requests_per_second,
            limits.config.request_burst,
        );
        let auth_deadline = tokio::time::Instant::now() + limits.config.auth_timeout;
        let mut last_heard = tokio::time::Instant::now();
        loop {
            let authenticated = !matches!(session, Session::AwaitingAuth { .. });
            let deadline = if authenticated {
                last_heard + limits.config.idle_timeout
            } else {
                auth_deadline
            };
            let ended = async {
                match &online {
                    Some((_, inbox)) => inbox.ended().await,
                    None => std::future::pending().await,
                }
            };
            let next = tokio::select! {
                _ = self.shutdown.cancelled() => break,
                reason = ended => {
                    debug!(connection = self.id, code = ?reason.code, "session ended by the server");
                    let _ = send(error_frame(0, reason)).await;
                    break;
                }
                _ = tokio::time::sleep_until(deadline) => {
                    let error = if authenticated {
                        ErrorReply::new(
                            ErrorCode::IdleTimeout,
                            format!("nothing received for {} seconds; send Ping to keep a connection open", limits.config.idle_timeout.as_secs()),
                        )
                    } else {
                        ErrorReply::new(
                            ErrorCode::NotAuthenticated,
                            format!("not authenticated within {} seconds", limits.config.auth_timeout.as_secs()),
                        )
                    };
                    let _ = send(error_frame(0, error)).await;
                    break;
                }
                next = source.next() => next,
            };
            last_heard = tokio::time::Instant::now();
            if !authenticated && matches!(next, Some(Ok(Message::Binary(_) | Message::Text(_)))) {
                before_auth += 1;
                if before_auth > limits.config.max_requests_before_auth {
                    let error = ErrorReply::new(
                        ErrorCode::NotAuthenticated,
                        format!(
                            "more than {} requests without authenticating",
                            limits.config.max_requests_before_auth
                        ),
                    );
                    let _ = send(error_frame(0, error)).await;
                    break;
                }
            }
            let bytes = match next {
                None | Some(Ok(Message::Close(_))) => break,
                Some(Ok(Message::Binary(bytes))) => bytes,
                Some(Ok(Message::Text(_))) => {
                    malformed += 1;
                    let error = ErrorReply::new(
                        ErrorCode::MalformedFrame,
                        "text frames are not part of the protocol; send binary frames",
                    );
                    if send(error_frame(0, error)).await.is_err()
                        || malformed >= self.max_malformed_frames
                    {
                        break;
                    }
                    continue;
                }
                Some(Ok(_)) => continue, // ping, pong: tungstenite answers pings itself
                Some(Err(WsError::Capacity(error))) => {
                    let error = ErrorReply::new(
                        ErrorCode::FrameTooLarge,
                        format!("{error}; the limit is {MAX_FRAME_BYTES} bytes"),
                    );
                    let _ = send(error_frame(0, error)).await;
                    break;
                }
                Some(Err(error)) => {
                    debug!(connection = self.id, %error, "connection error");
                    break;
                }
            };
            if let Some(tap) = &self.tap {
                tap(Direction::Inbound, &bytes);
            }
            // Before decoding: a request over the rate costs only the read
            // of its id.
            if !rate.allow(last_heard) {
                let error = ErrorReply::new(
                    ErrorCode::RateLimited,
                    format!(
                        "more than {} requests per second on this connection; slow down",
                        limits.config.requests_per_second
                    ),
                );
                let id = refused_frame_id(&bytes).unwrap_or(0);
                if send(error_frame(id, error)).await.is_err() {
                    break;
                }
                continue;
            }
            let bytes = compact(bytes);
            let frame = match decode_client_bytes(bytes.clone()) {
                Ok(frame) => frame,
                Err(error) => {
                    malformed += 1;
                    debug!(connection = self.id, %error, "malformed frame");
                    // Answered under the request's id when it can be read.
                    let id = refused_frame_id(&bytes).unwrap_or(0);
                    if send(error_frame(id, decode_error_reply(&error)))
                        .await
                        .is_err()
                        || malformed >= self.max_malformed_frames
                    {
                        break;
                    }
                    continue;
                }
            };
            // The frame's bytes are decoded: held on only as a file's
            // chunk, which is a slice of them (not a second copy).
            drop(bytes);
            let mut request = frame.request;
            if let Request::Ack { delivery_ids, .. } = &mut request {
                // Public IDs of deliveries pushed here become the internal
                // ones they stand for; any other is ignored.
                *delivery_ids = unacked.acked(delivery_ids);
            }
            // File bytes are read and answered by the writer, in order,
            // one chunk at a time: the reader goes on (acknowledgements,
            // sends) meanwhile.
            if matches!(request, Request::GetBlob { .. }) {
                let Ok(outstanding) = Arc::clone(&file_reads).acquire_owned().await else {
                    break;
                };
                let (services, slot) = (Arc::clone(&self.services), Arc::clone(&file_bytes_slot));
                let (mut asking, id) = (session.clone(), frame.id);
                let response = async move {
                    // (Neither semaphore is ever closed.)
                    let turn = slot.acquire_owned().await.ok();
                    let result = match Box::pin(services.answer(&mut asking, request)).await {
                        Answer::Now(result) => result,
                        _ => Err(ErrorReply::new(ErrorCode::Internal, "unexpected answer")),
                    };
                    // The chunk goes out from the buffer it was read into.
                    let frame = encode_server_spliced(ServerMessage::Response { id, result });
                    drop(outstanding);
                    (frame, turn)
                };
                if out_tx
                    .send(Outbound::Later(Box::pin(response)))
                    .await
                    .is_err()
                {
                    break;
                }
                continue;
            }
            // Boxed: the handler's state is large and lives only while a
            // request is in flight, not in every idle connection's task.
            let answer = Box::pin(self.services.answer(&mut session, request)).await;

            let queued = match answer {
                Answer::Now(result) => {
                    let response = ServerMessage::Response {
                        id: frame.id,
                        result,
                    };
                    send(encode_server(&response)).await
                }
                // Answered by the writer when durable; meanwhile the next
                // request (perhaps the acknowledgement it waits for) runs.
                Answer::WhenDurable(durable, reply) => {
                    let response = Answer::response(durable, reply, frame.id);
                    out_tx
                        .send(Outbound::Later(Box::pin(
                            response.map(|bytes| (bytes.into(), None)),
                        )))
                        .await
                }
                Answer::Quiet => Ok(()),
            };
            if queued.is_err() {
                break;
            }
            if let (None, Session::Authenticated { account, device }) = (&online, &session) {
                let inbox = self.services.registry.register(
                    account,
                    *device,
                    self.id,
                    limits.config.max_sessions_per_account,
                );
                // A revocation or a device's removal that raced this login
                // (read the line or device as live, then registered after
                // the sessions were ended) is caught here.
                // In a cluster: woken and ended by the other nodes from now
                // on (before the first mailbox read, and before the check
                // below, so a revocation on another node is either seen by
                // the check or heard), and ended where it was before.
                if let Some(cluster) = self.services.registry.cluster() {
                    let here = DeviceAddr::new(account.clone(), *device);
                    cluster
                        .follow(&here, Arc::clone(&inbox), stop.clone())
                        .await;
                }
                self.services.end_if_gone(account, *device, &inbox).await;
                let online_now = Outbound::Online(Box::new((
                    DeviceAddr::new(account.clone(), *device),
                    Arc::clone(&inbox),
                )));
                online = Some((account.clone(), inbox));
                if out_tx.send(online_now).await.is_err() {
                    break;
                }
            }
        }
        if let Some((account, _)) = online {
            self.services.registry.unregister(&account, self.id);
        }
        stop.cancel();
        drop(out_tx);
        let _ = writer.await;
    }
}

/// The socket's sending half, and (once the device is authenticated) the
/// account's mailbox: the stored backlog first, then `Synced`, then each
/// new delivery as it enters the mailbox. Fresh fan-out copies arrive in
/// the [`Inbox`] (handed over once the mailbox holds them: after the commit
/// that checked them, possibly before they are written, see
/// `umbra_store::ACK_WINDOW`); anything else, or anything that did not
/// fit, is read back from the mailbox.
struct Writer<S> {
    sink: SplitSink<WebSocketStream<S>, Message>,
    tap: Option<FrameTap>,
    services: Arc<Services>,
    unacked: Arc<Unacked>,
    /// Slots of answers of file bytes fed to the socket and not yet
    /// flushed, released at the next flush.
    flushing: Vec<tokio::sync::OwnedSemaphorePermit>,
}

/// Where the writer stands in pushing one account's mailbox.
struct Mailbox {
    device: DeviceAddr,
    inbox: Arc<Inbox>,
    /// Every delivery up to `after` has been pushed (or acknowledged), as
    /// a mailbox read established.
    after: u64,
    /// IDs above `after` pushed from memory, so a later read does not push
    /// them twice.
    pushed: BTreeSet<u64>,
    /// Deliveries pushed on this connection and not acknowledged yet (the
    /// push window, [`PushWindow`]).
    unacked: Arc<Unacked>,
    /// The mailbox must be read before waiting again.
    read: bool,
    /// A read failed (the store away): the next is not before this.
    retry_at: Option<tokio::time::Instant>,
    synced: bool,
}

impl Mailbox {
    /// Whether another delivery may be pushed now.
    fn has_room(&self) -> bool {
        self.unacked.has_room()
    }
}

/// A connection's deliveries pushed and not acknowledged yet, with their
/// frame sizes: the writer adds what it pushes, the reader takes off what
/// the device acknowledges (directly, without a message to the writer, so a
/// quiet Ack stays nearly free), and wakes the writer only when it was
/// waiting for room.
struct Unacked {
    window: PushWindow,
    state: std::sync::Mutex<UnackedState>,
    room: tokio::sync::Notify,
}

#[derive(Default)]
struct UnackedState {
    /// By public delivery ID: the internal ID and the frame's size.
    sizes: HashMap<u64, (u64, usize)>,
    bytes: usize,
    /// The writer found the window full and waits for room.
    waiting: bool,
}

impl UnackedState {
    fn has_room(&self, window: PushWindow) -> bool {
        self.sizes.is_empty() || (self.sizes.len() < window.deliveries && self.bytes < window.bytes)
    }
}

impl Unacked {
    fn new(window: PushWindow) -> Unacked {
        Unacked {
            window,
            state: std::sync::Mutex::default(),
            room: tokio::sync::Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, UnackedState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether another delivery may be pushed now; if not, the next
    /// acknowledgement that makes room wakes the writer.
    fn has_room(&self) -> bool {
        let mut state = self.lock();
        let room = state.has_room(self.window);
        state.waiting = !room;
        room
    }

    fn pushed(&self, public: u64, id: u64, size: usize) {
        let mut state = self.lock();
        if let Some((_, old)) = state.sizes.insert(public, (id, size)) {
            state.bytes -= old;
        }
        state.bytes += size;
    }

    /// The device acknowledged the deliveries with these public IDs; returns
    /// their internal IDs (public IDs not pushed here are ignored).
    fn acked(&self, public: &[u64]) -> Vec<u64> {
        let mut state = self.lock();
        let mut ids = Vec::with_capacity(public.len());
        for public in public {
            if let Some((id, size)) = state.sizes.remove(public) {
                state.bytes -= size;
                ids.push(id);
            }
        }
        // A map never shrinks by itself: after a drain (up to a window of
        // deliveries in flight, ~50 KB of table) every connection that
        // ever drained a backlog would keep that much for its whole life,
        // and the server's memory grew with each reconnect in the soak.
        if state.sizes.is_empty() && state.sizes.capacity() > SMALL_WINDOW {
            state.sizes = HashMap::new();
        }
        if state.waiting && state.has_room(self.window) {
            state.waiting = false;
            drop(state);
            self.room.notify_one();
        }
        ids
    }
}

/// Deliveries in flight that a connection's table of unacknowledged
/// pushes keeps room for once they are all acknowledged.
const SMALL_WINDOW: usize = 64;

/// Why the writer stopped.
struct Closed;

/// A response frame that is ready once its request's effects are durable.
/// A response, and the turn it holds until it is flushed (a file's bytes:
/// a connection holds one answer of them in memory at a time, so a device
/// that asks for many chunks at once, or reads slowly, costs the server one
/// chunk, not all it asked for).
type LaterResponse =
    Pin<Box<dyn Future<Output = (SplicedFrame, Option<tokio::sync::OwnedSemaphorePermit>)> + Send>>;

impl<S> Writer<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    async fn run(mut self, mut out: mpsc::Receiver<Outbound>) {
        let mut mailbox: Option<Mailbox> = None;
        // Responses waiting for durability, answered in request order.
        // Created on first use: most connections never have one waiting.
        let mut later: Option<FuturesOrdered<LaterResponse>> = None;
        loop {
            // (A full push window waits for acknowledgements first, and a
            // failed read for its time to try again.)
            let now = tokio::time::Instant::now();
            if let Some(mailbox) = mailbox
                .as_mut()
                .filter(|m| m.read && m.has_room() && m.retry_at.is_none_or(|at| at <= now))
            {
                // Boxed: a read's state is only needed while it runs.
                if Box::pin(self.read_mailbox(mailbox)).await.is_err()
                    || self.sink.flush().await.is_err()
                {
                    break;
                }
            }
            let inbox = mailbox.as_ref().map(|m| Arc::clone(&m.inbox));
            let retry_at = mailbox.as_ref().and_then(|m| m.retry_at);
            let retry = async {
                match retry_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            let signalled = async {
                match &inbox {
                    Some(inbox) => inbox.signalled().await,
                    None => std::future::pending().await,
                }
            };
            // Ends when the reader drops its queue, after everything it
            // queued (the response to its last request included) is sent.
            let waiting = later.as_mut().filter(|l| !l.is_empty());
            let has_later = waiting.is_some();
            let answered = async {
                match waiting {
                    Some(later) => later.next().await,
                    None => std::future::pending().await,
                }
            };
            let result = tokio::select! {
                next = out.recv() => match next {
                    None => break,
                    Some(next) => self.outbound(next, &mut out, &mut mailbox, &mut later).await,
                },
                Some(frame) = answered, if has_later => self.answer(frame, &mut later).await,
                () = signalled => match mailbox.as_mut() {
                    Some(mailbox) => self.push_inbox(mailbox).await,
                    None => Ok(()),
                },
                // Acknowledgements made room in a full window: the loop
                // reads the mailbox on.
                () = self.unacked.room.notified() => Ok(()),
                // Time to read again after a failed read.
                () = retry => Ok(()),
            };
            if result.is_err() || self.sink.flush().await.is_err() {
                break;
            }
            self.flushing.clear();
        }
        // The reader is gone; answer what is still waiting, then close.
        self.flushing.clear();
        if let Some(mut later) = later {
            while let Some((frame, turn)) = later.next().await {
                if self.feed_spliced(frame).await.is_err() {
                    break;
                }
                // The next file read waits for this one's turn.
                if turn.is_some() && self.sink.flush().await.is_err() {
                    break;
                }
            }
            let _ = self.sink.flush().await;
        }
        let _ = self.sink.close().await;
    }

    /// Sends `next` and everything else the reader queued meanwhile.
    async fn outbound(
        &mut self,
        next: Outbound,
        out: &mut mpsc::Receiver<Outbound>,
        mailbox: &mut Option<Mailbox>,
        later: &mut Option<FuturesOrdered<LaterResponse>>,
    ) -> Result<(), Closed> {
        let mut next = Some(next);
        while let Some(item) = next.take() {
            match item {
                Outbound::Frame(bytes) => self.feed(bytes).await?,
                Outbound::Later(response) => later
                    .get_or_insert_with(FuturesOrdered::new)
                    .push_back(response),
                Outbound::Online(online) => {
                    let (device, inbox) = *online;
                    *mailbox = Some(Mailbox {
                        device,
                        inbox,
                        after: 0,
                        pushed: BTreeSet::new(),
                        unacked: Arc::clone(&self.unacked),
                        read: true,
                        retry_at: None,
                        synced: false,
                    });
                }
            }
            next = out.try_recv().ok();
        }
        Ok(())
    }

    /// Sends an answer that became ready, and every later one that is
    /// ready too (a commit settles many at once), so they share a write.
    async fn answer(
        &mut self,
        (frame, turn): (SplicedFrame, Option<tokio::sync::OwnedSemaphorePermit>),
        later: &mut Option<FuturesOrdered<LaterResponse>>,
    ) -> Result<(), Closed> {
        self.feed_spliced(frame).await?;
        // Released once flushed (in `run`).
        self.flushing.extend(turn);
        if let Some(later) = later.as_mut() {
            while let Some(Some((frame, turn))) = later.next().now_or_never() {
                self.feed_spliced(frame).await?;
                self.flushing.extend(turn);
            }
        }
        Ok(())
    }

    /// Takes what the inbox holds and pushes every copy not pushed yet;
    /// remembers whether the mailbox must be read (asked for, or too many
    /// IDs remembered above the high-water mark).
    async fn push_inbox(&mut self, mailbox: &mut Mailbox) -> Result<(), Closed> {
        let taken = mailbox.inbox.take();
        mailbox.read |= taken.read_mailbox;
        // While a read of the mailbox is pending (asked for, or a full
        // window left deliveries behind), nothing is pushed from memory:
        // the read finds these copies too, and pushes everything in order.
        // Pushing them now would let them overtake what the read has yet
        // to push (a message of an epoch before its commit).
        if mailbox.read {
            return Ok(());
        }
        // With a store several nodes share, another node may have stored
        // a delivery below these (a commit) that this one has only been
        // woken for: each mailbox's IDs are dense there, so a copy is
        // pushed from memory only if it is the very next one; otherwise
        // the mailbox is read, and pushes everything in order.
        let dense = self.services.store.dense_ids();
        let mut next = mailbox.after + 1;
        while dense && mailbox.pushed.contains(&next) {
            next += 1;
        }
        for delivery in taken.deliveries {
            if delivery.id <= mailbox.after || mailbox.pushed.contains(&delivery.id) {
                continue;
            }
            if (dense && delivery.id != next) || !mailbox.has_room() {
                // A gap, or the window is full: this and what follows
                // wait in the mailbox, read in order (once the device has
                // caught up).
                mailbox.read = true;
                break;
            }
            mailbox.pushed.insert(delivery.id);
            next = delivery.id + 1;
            while dense && mailbox.pushed.contains(&next) {
                next += 1;
            }
            self.push(mailbox, delivery).await?;
        }
        mailbox.read |= mailbox.pushed.len() >= MAX_PUSHED_AHEAD;
        Ok(())
    }

    /// Pushes one delivery, counting it in the window until acknowledged.
    async fn push(
        &mut self,
        mailbox: &mut Mailbox,
        delivery: StoredDelivery,
    ) -> Result<(), Closed> {
        let id = delivery.id;
        let public = self.services.delivery_ids.public(id);
        let frame = push_frame(public, delivery);
        mailbox.unacked.pushed(public, id, frame.len());
        self.services.metrics.deliveries_pushed.inc();
        self.feed(frame).await
    }

    /// Reads the mailbox until it has pushed everything stored, then tells
    /// the device it is synced (once).
    async fn read_mailbox(&mut self, mailbox: &mut Mailbox) -> Result<(), Closed> {
        mailbox.retry_at = None;
        loop {
            // Copies queued before this point were in the mailbox (written
            // or staged) before the read begins, so it finds them; copies
            // queued after it are pushed later unless the read already
            // covered them.
            self.push_inbox(mailbox).await?;
            if !mailbox.has_room() {
                mailbox.read = true;
                return Ok(());
            }
            let now = self.services.clock.now();
            let batch = match self
                .services
                .store
                .pending(&mailbox.device, mailbox.after, MAILBOX_BATCH, now)
                .await
            {
                Ok(batch) => batch,
                Err(error) => {
                    // Tried again in a second. Meanwhile the connection
                    // answers requests (refused too, while the store is
                    // away), and pushes nothing from memory: `read` stays
                    // set, so the order holds.
                    if let umbra_store::StoreError::Unavailable(_) = error {
                        // The store says once that its database is away.
                        debug!(%error, "reading a mailbox failed; trying again");
                    } else {
                        warn!(%error, "reading a mailbox failed; trying again");
                    }
                    mailbox.retry_at = Some(tokio::time::Instant::now() + READ_RETRY);
                    return Ok(());
                }
            };
            let full = batch.len() == MAILBOX_BATCH;
            let highest = batch.last().map(|d| d.id);
            // The last ID of this batch dealt with (pushed, or pushed
            // before), when the window fills before its end.
            let mut stopped_after = None;
            let mut handled = mailbox.after;
            for stored in batch {
                if !mailbox.pushed.contains(&stored.id) {
                    if !mailbox.has_room() {
                        stopped_after = Some(handled);
                        break;
                    }
                    let id = stored.id;
                    self.push(mailbox, stored).await?;
                    handled = id;
                } else {
                    handled = stored.id;
                }
            }
            if let Some(handled) = stopped_after {
                // Resumed from here once acknowledgements make room.
                mailbox.after = handled.max(mailbox.after);
                mailbox.pushed = mailbox.pushed.split_off(&(mailbox.after + 1));
                mailbox.read = true;
                return Ok(());
            }
            if full {
                mailbox.after = highest.unwrap_or(mailbox.after).max(mailbox.after);
                mailbox.pushed = mailbox.pushed.split_off(&(mailbox.after + 1));
                self.sink.flush().await.map_err(|_| Closed)?;
                continue;
            }
            // The read saw everything in the mailbox before it began, which
            // includes everything pushed from memory so far.
            mailbox.after = highest
                .into_iter()
                .chain(mailbox.pushed.last().copied())
                .fold(mailbox.after, u64::max);
            mailbox.pushed.clear();
            mailbox.read = false;
            if !mailbox.synced {
                mailbox.synced = true;
                self.feed(encode_server(&ServerMessage::Push(Push::Synced)))
                    .await?;
            }
            return Ok(());
        }
    }

    /// Hands one frame to the socket (written once [`WRITE_BUFFER`] bytes
    /// are collected); [`Writer::run`] flushes after each burst.
    async fn feed(&mut self, bytes: Vec<u8>) -> Result<(), Closed> {
        self.feed_spliced(bytes.into()).await
    }

    /// [`Writer::feed`] of a frame that may be in pieces (a chunk of a
    /// file and the few bytes around it): a frame over [`FRAGMENT`] goes
    /// in fragments ([`fragments`]), each a slice of one piece, and the
    /// chunk is not copied into a frame first.
    async fn feed_spliced(&mut self, frame: SplicedFrame) -> Result<(), Closed> {
        // One buffer if it is one already, or small enough to join.
        let frame = match frame.into_whole() {
            Err(spliced) if spliced.len() <= FRAGMENT => Ok(spliced.to_vec()),
            other => other,
        };
        if let Some(tap) = &self.tap {
            match &frame {
                Ok(whole) => tap(Direction::Outbound, whole),
                Err(spliced) => tap(Direction::Outbound, &spliced.to_vec()),
            }
        }
        let frame = match frame {
            Ok(whole) if whole.len() <= FRAGMENT => {
                return self
                    .sink
                    .feed(Message::Binary(whole.into()))
                    .await
                    .map_err(|_| Closed);
            }
            Ok(whole) => SplicedFrame::from(whole),
            Err(spliced) => spliced,
        };
        for fragment in fragments(frame) {
            self.sink
                .feed(Message::Frame(fragment))
                .await
                .map_err(|_| Closed)?;
        }
        Ok(())
    }
}

/// `message` in a buffer of its own size if the one it is in is much
/// larger (tungstenite joins a fragmented message into a buffer that may
/// have grown to twice it): a file's chunk decoded from it is a slice of
/// it, held while it is written and synced. A message that is a slice of
/// tungstenite's read buffer (not fragmented) is left alone: that buffer
/// is the connection's anyway.
fn compact(message: Bytes) -> Bytes {
    match message.try_into_mut() {
        Ok(buffer) if buffer.capacity() > buffer.len() + buffer.len() / 2 => {
            Bytes::copy_from_slice(&buffer)
        }
        Ok(buffer) => buffer.freeze(),
        Err(shared) => shared,
    }
}

/// A large message in WebSocket fragments (RFC 6455, 5.4; every WebSocket
/// library joins them again) of at most [`FRAGMENT`] bytes, each a slice
/// of one of the frame's pieces: the buffers between here and the socket
/// hold a fragment of it, not all of it, and keep no message-sized
/// capacity afterwards.
fn fragments(frame: SplicedFrame) -> Vec<Frame> {
    let mut out = Vec::with_capacity(frame.len().div_ceil(FRAGMENT) + 2);
    let mut pieces = frame.pieces().peekable();
    while let Some(piece) = pieces.next() {
        let last_piece = pieces.peek().is_none();
        let mut at = 0;
        while at < piece.len() {
            let end = (at + FRAGMENT).min(piece.len());
            let opcode = if out.is_empty() {
                OpCode::Data(Data::Binary)
            } else {
                OpCode::Data(Data::Continue)
            };
            let fin = last_piece && end == piece.len();
            out.push(Frame::message(piece.slice(at..end), opcode, fin));
            at = end;
        }
    }
    out
}

/// The push of `stored` under its public ID.
fn push_frame(public: u64, stored: StoredDelivery) -> Vec<u8> {
    encode_server(&ServerMessage::Push(Push::Delivery(Delivery {
        id: public,
        sender: stored.sender,
        kind: stored.kind,
        group_id: stored.group_id,
        payload: stored.payload,
        sent_at: stored.sent_at,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_chunk_goes_in_fragments_that_join_into_its_frame() {
        use umbra_proto::{Reply, encode_server_spliced};
        for len in [FRAGMENT - 20, FRAGMENT, 3 * FRAGMENT + 5, 262_144] {
            let message = ServerMessage::Response {
                id: 77,
                result: Ok(Reply::BlobData {
                    data: vec![0x5A; len].into(),
                    size: 1 << 30,
                }),
            };
            let whole = encode_server(&message);
            let frame = encode_server_spliced(message);
            assert_eq!(frame.len(), whole.len());
            let fragments = fragments(frame);
            let mut joined = Vec::new();
            for (n, fragment) in fragments.iter().enumerate() {
                let header = fragment.header();
                let expected = if n == 0 {
                    OpCode::Data(Data::Binary)
                } else {
                    OpCode::Data(Data::Continue)
                };
                assert_eq!(header.opcode, expected, "fragment {n} of {len} bytes");
                assert_eq!(header.is_final, n + 1 == fragments.len(), "FIN of {n}");
                assert!(!fragment.payload().is_empty() && fragment.payload().len() <= FRAGMENT);
                joined.extend_from_slice(fragment.payload());
            }
            assert_eq!(joined, whole, "{len} bytes");
        }
        // A frame in one piece goes the same way.
        let whole = vec![1u8; 2 * FRAGMENT + 1];
        let finals: Vec<bool> = fragments(whole.into())
            .iter()
            .map(|f| f.header().is_final)
            .collect();
        assert_eq!(finals, [false, false, true]);
    }

    #[test]
    fn a_message_in_a_much_larger_buffer_is_copied_into_one_its_size() {
        let mut joined = bytes::BytesMut::with_capacity(2 << 20);
        joined.extend_from_slice(&[3; 300_000]);
        let compacted = compact(joined.freeze());
        assert_eq!(compacted, vec![3u8; 300_000]);
        let capacity = compacted.try_into_mut().map(|b| b.capacity()).ok();
        assert!(capacity.is_some_and(|c| c < 400_000), "{capacity:?}");
        // Shared (a slice of the read buffer): left where it is.
        let read = Bytes::from(vec![4u8; 1 << 20]);
        let message = read.slice(10..300_010);
        assert_eq!(compact(message.clone()).as_ptr(), message.as_ptr());
    }

    #[test]
    fn the_unacknowledged_table_gives_its_room_back_once_empty() {
        let unacked = Unacked::new(PushWindow::default());
        for id in 1..=1000 {
            unacked.pushed(id + 5000, id, 100);
        }
        assert_eq!(unacked.lock().sizes.len(), 1000);
        let internal = unacked.acked(&(5001..=5999).collect::<Vec<_>>());
        assert_eq!(internal, (1..=999).collect::<Vec<_>>());
        assert!(
            unacked.lock().sizes.capacity() >= 1000,
            "one still in flight"
        );
        assert_eq!(
            unacked.acked(&[6000, 42]),
            vec![1000],
            "unknown IDs are ignored"
        );
        let state = unacked.lock();
        assert_eq!((state.sizes.capacity(), state.bytes), (0, 0));
    }
}
