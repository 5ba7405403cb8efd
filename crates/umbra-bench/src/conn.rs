//! One simulated Umbra device's connection: the real protocol (WebSocket,
//! optionally TLS with the pinned certificate), requests matched to
//! responses, fire-and-forget sends counted by the recorder, deliveries
//! recorded and acknowledged in batches.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use umbra_proto::{
    ClientFrame, ErrorReply, MAX_FRAME_BYTES, Nonce, Push, Reply, Request, ServerMessage,
    decode_server, encode_client,
};

use crate::recorder::Recorder;
use crate::stamp::Stamp;

/// Request ids with this bit are acknowledgements (their answers are not
/// counted as answers to sends).
const ACK_BIT: u64 = 1 << 62;
/// Most delivery ids per Ack.
const ACK_BATCH: usize = 256;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

type Waiters = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<Reply, ErrorReply>>>>>;
/// Fired sends not answered yet, by request id: which message each is.
type Fired = Arc<Mutex<HashMap<u64, Stamp>>>;

/// How to reach the server.
#[derive(Clone, Debug)]
pub struct Dial {
    pub address: SocketAddr,
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

/// An open connection.
#[derive(Debug)]
pub struct Conn {
    out: mpsc::UnboundedSender<Vec<u8>>,
    waiters: Waiters,
    fired: Fired,
    next_id: AtomicU64,
    pub nonce: Nonce,
    synced: Arc<(AtomicBool, Notify)>,
    alive: Arc<Alive>,
    closing: Arc<Notify>,
    recorder: Arc<Recorder>,
}

/// Whether the connection is up, and a way to wait for it to end.
#[derive(Debug)]
struct Alive {
    up: AtomicBool,
    ended: Notify,
}

impl Alive {
    fn end(&self) {
        self.up.store(false, Ordering::SeqCst);
        self.ended.notify_waiters();
    }
}

impl Drop for Conn {
    /// Leaves like a device does: stop reading, acknowledge everything
    /// received, then close the socket once the queue is written. (Aborting
    /// instead would leave deliveries unacknowledged, and the server would
    /// rightly deliver them again on the next login.)
    fn drop(&mut self) {
        self.closing.notify_one();
    }
}

impl Conn {
    /// Connects as device `index`; its deliveries go to `recorder`.
    pub async fn open(dial: &Dial, index: u32, recorder: Arc<Recorder>) -> Result<Conn> {
        let tcp = TcpStream::connect(dial.address)
            .await
            .with_context(|| format!("connecting to {}", dial.address))?;
        tcp.set_nodelay(true)?;
        let config = WebSocketConfig::default()
            .read_buffer_size(4096)
            // Frames go out together at the writer's flush, not one
            // `send` each (0 would write every frame at once).
            .write_buffer_size(16 * 1024)
            .max_message_size(Some(MAX_FRAME_BYTES))
            .max_frame_size(Some(MAX_FRAME_BYTES));
        let url = format!("ws://{}/", dial.address);
        match &dial.tls {
            Some(tls) => {
                let name = rustls::pki_types::ServerName::try_from("umbra.invalid")?;
                let stream = tokio_rustls::TlsConnector::from(Arc::clone(tls))
                    .connect(name, tcp)
                    .await
                    .context("TLS handshake")?;
                let (ws, _) =
                    tokio_tungstenite::client_async_with_config(url, stream, Some(config)).await?;
                Conn::start(ws, index, recorder).await
            }
            None => {
                let (ws, _) =
                    tokio_tungstenite::client_async_with_config(url, tcp, Some(config)).await?;
                Conn::start(ws, index, recorder).await
            }
        }
    }

    async fn start<S>(ws: WebSocketStream<S>, index: u32, recorder: Arc<Recorder>) -> Result<Conn>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (mut sink, mut source) = ws.split();
        let (out, mut out_rx) = mpsc::unbounded_channel::<Vec<u8>>();
        let alive = Arc::new(Alive {
            up: AtomicBool::new(true),
            ended: Notify::new(),
        });
        // Writes are batched: everything queued goes out before one flush.
        // The writer ends (closing the socket) when every sender is gone.
        {
            let alive = Arc::clone(&alive);
            tokio::spawn(async move {
                while let Some(first) = out_rx.recv().await {
                    if sink.feed(Message::Binary(first.into())).await.is_err() {
                        break;
                    }
                    while let Ok(next) = out_rx.try_recv() {
                        if sink.feed(Message::Binary(next.into())).await.is_err() {
                            alive.end();
                            return;
                        }
                    }
                    if sink.flush().await.is_err() {
                        break;
                    }
                }
                let _ = sink.close().await;
                alive.end();
            });
        }
        let waiters: Waiters = Arc::default();
        let fired: Fired = Arc::default();
        let synced = Arc::new((AtomicBool::new(false), Notify::new()));
        let (hello_tx, hello_rx) = oneshot::channel();
        let closing = Arc::new(Notify::new());
        {
            let closing = Arc::clone(&closing);
            let waiters = Arc::clone(&waiters);
            let fired = Arc::clone(&fired);
            let synced = Arc::clone(&synced);
            let alive = Arc::clone(&alive);
            let out = out.clone();
            let recorder = Arc::clone(&recorder);
            tokio::spawn(async move {
                let mut hello_tx = Some(hello_tx);
                let mut acks: Vec<u64> = Vec::new();
                let mut ack_id = ACK_BIT;
                let mut closed = std::pin::pin!(closing.notified());
                loop {
                    if (&mut closed).now_or_never().is_some() {
                        break;
                    }
                    // Acknowledge once nothing more is ready to read.
                    let next = match source.next().now_or_never() {
                        Some(next) => next,
                        None => {
                            if !acks.is_empty() {
                                ack_id += 1;
                                let _ = out.send(ack_frame(ack_id, &mut acks, true));
                            }
                            tokio::select! {
                                _ = &mut closed => break,
                                next = source.next() => next,
                            }
                        }
                    };
                    let Some(Ok(message)) = next else { break };
                    let Message::Binary(bytes) = message else {
                        continue;
                    };
                    match decode_server(&bytes) {
                        Ok(ServerMessage::Response { id, result }) => {
                            let waiter = waiters
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .remove(&id);
                            if let Some(waiter) = waiter {
                                let _ = waiter.send(result);
                            } else if id & ACK_BIT == 0 {
                                let stamp =
                                    fired.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
                                match result {
                                    Ok(_) => {
                                        if let Some(stamp) = stamp {
                                            recorder.note_accepted(&stamp);
                                        }
                                        recorder.note_answer(true, None);
                                    }
                                    Err(error) => recorder.note_answer(
                                        false,
                                        Some(format!("{:?}: {}", error.code, error.message)),
                                    ),
                                }
                            }
                        }
                        Ok(ServerMessage::Push(Push::Hello { nonce, .. })) => {
                            if let Some(tx) = hello_tx.take() {
                                let _ = tx.send(nonce);
                            }
                        }
                        Ok(ServerMessage::Push(Push::Delivery(delivery))) => {
                            recorder.delivered(index, &delivery.payload);
                            acks.push(delivery.id);
                            if acks.len() >= ACK_BATCH {
                                ack_id += 1;
                                let _ = out.send(ack_frame(ack_id, &mut acks, true));
                            }
                        }
                        Ok(ServerMessage::Push(Push::Synced)) => {
                            synced.0.store(true, Ordering::SeqCst);
                            synced.1.notify_waiters();
                        }
                        Ok(ServerMessage::Push(_)) => {}
                        Err(_) => break,
                    }
                }
                if !acks.is_empty() {
                    // Leaving: wait (briefly) until the server confirms.
                    ack_id += 1;
                    let (tx, rx) = oneshot::channel();
                    waiters
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(ack_id, tx);
                    let _ = out.send(ack_frame(ack_id, &mut acks, false));
                    let confirm = async {
                        while let Some(Ok(Message::Binary(bytes))) = source.next().await {
                            if let Ok(ServerMessage::Response { id, .. }) = decode_server(&bytes)
                                && id == ack_id
                            {
                                return;
                            }
                        }
                    };
                    let _ = tokio::time::timeout(Duration::from_secs(5), confirm).await;
                    drop(rx);
                }
                alive.end();
                waiters.lock().unwrap_or_else(|p| p.into_inner()).clear();
                fired.lock().unwrap_or_else(|p| p.into_inner()).clear();
            });
        }
        let nonce = tokio::time::timeout(REQUEST_TIMEOUT, hello_rx)
            .await
            .context("no Hello from the server")?
            .context("connection closed before Hello")?;
        Ok(Conn {
            out,
            waiters,
            fired,
            next_id: AtomicU64::new(1),
            nonce,
            synced,
            alive,
            closing,
            recorder,
        })
    }

    pub fn is_alive(&self) -> bool {
        self.alive.up.load(Ordering::SeqCst)
    }

    /// Resolves once the connection has ended.
    pub async fn closed(&self) {
        loop {
            let ended = self.alive.ended.notified();
            let mut ended = std::pin::pin!(ended);
            ended.as_mut().enable();
            if !self.is_alive() {
                return;
            }
            ended.await;
        }
    }

    /// Sends a request and waits for its answer.
    pub async fn request(&self, request: Request) -> Result<Reply> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.waiters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, tx);
        self.out
            .send(encode_client(&ClientFrame { id, request }))
            .map_err(|_| anyhow!("connection closed"))?;
        match tokio::time::timeout(REQUEST_TIMEOUT, rx).await {
            Err(_) => bail!("no answer within {REQUEST_TIMEOUT:?}"),
            Ok(Err(_)) => bail!("connection closed while waiting for an answer"),
            Ok(Ok(Err(error))) => bail!("{:?}: {}", error.code, error.message),
            Ok(Ok(Ok(reply))) => Ok(reply),
        }
    }

    /// Sends a request whose answer the recorder counts (and, for the
    /// message `stamp` names, records as accepted).
    /// A send on a connection that has ended is counted as cut off.
    pub fn fire(&self, request: Request, stamp: Option<Stamp>) {
        if !self.is_alive() {
            self.recorder.cut_off.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        if let Some(stamp) = stamp {
            self.fired
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(id, stamp);
        }
        let _ = self.out.send(encode_client(&ClientFrame { id, request }));
    }

    /// Waits until the server said the stored backlog was pushed.
    pub async fn wait_synced(&self, within: Duration) -> Result<()> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let notified = self.synced.1.notified();
            if self.synced.0.load(Ordering::SeqCst) {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                bail!("backlog not delivered within {within:?}");
            }
        }
    }
}

/// An Ack of everything in `acks`. Quiet ones, like a device's while it
/// reads, get no answer; the last one before leaving is confirmed (and so
/// confirms every quiet one before it, as requests are handled in order).
fn ack_frame(id: u64, acks: &mut Vec<u64>, quiet: bool) -> Vec<u8> {
    encode_client(&ClientFrame {
        id,
        request: Request::Ack {
            delivery_ids: std::mem::take(acks),
            quiet,
        },
    })
}
