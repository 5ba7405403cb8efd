//! One device connection: the WebSocket handshake, the request loop, and the
//! pump that pushes the device's mailbox to it.
//!
//! Three tasks per authenticated connection: this reader (requests are
//! handled one at a time, in order), a writer that owns the socket's sending
//! half, and the pump. They talk through a bounded queue of outgoing frames,
//! so a slow device slows only itself.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};
use umbra_proto::frame::Delivery;
use umbra_proto::{
    AccountId, DecodeError, ErrorCode, ErrorReply, MAX_FRAME_BYTES, Nonce, PROTOCOL_VERSION, Push,
    ServerMessage, decode_client, encode_server,
};

use crate::registry::Inbox;
use crate::service::{Services, Session};
use crate::{Direction, FrameTap};
use umbra_store::StoredDelivery;

/// Outgoing frames queued per connection before the reader or pump waits.
const OUTBOUND_QUEUE: usize = 256;
/// Deliveries read from the store per pump round.
const PUMP_BATCH: usize = 128;
/// Deliveries pushed from memory before the pump reads its mailbox to
/// move its high-water mark (bounds the set of IDs it remembers).
const MAX_PUSHED_AHEAD: usize = 4096;
/// How long the WebSocket upgrade may take once TLS is up.
const UPGRADE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a connection may stay unauthenticated before it is closed, so
/// idle sockets cannot hold connection slots.
pub const AUTH_TIMEOUT: Duration = Duration::from_secs(30);

/// WebSocket settings: a small read buffer (tungstenite allocates it up
/// front for every connection) and the protocol's frame limit.
pub fn websocket_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
        .max_message_size(Some(MAX_FRAME_BYTES))
        .max_frame_size(Some(MAX_FRAME_BYTES))
}

pub(crate) struct Connection {
    pub services: Arc<Services>,
    pub id: u64,
    pub shutdown: CancellationToken,
    pub tap: Option<FrameTap>,
    pub max_malformed_frames: u32,
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
        let upgrade = tokio_tungstenite::accept_async_with_config(stream, Some(websocket_config()));
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
        let (mut sink, mut source) = ws.split();
        let (out_tx, mut out_rx) = mpsc::channel::<Vec<u8>>(OUTBOUND_QUEUE);
        let tap = self.tap.clone();
        let writer = tokio::spawn(async move {
            // Everything queued goes out before one flush: one write
            // system call (and TLS record run) per burst, not per frame.
            'writing: while let Some(bytes) = out_rx.recv().await {
                let mut next = Some(bytes);
                while let Some(bytes) = next.take() {
                    if let Some(tap) = &tap {
                        tap(Direction::Outbound, &bytes);
                    }
                    if sink.feed(Message::Binary(bytes.into())).await.is_err() {
                        break 'writing;
                    }
                    next = out_rx.try_recv().ok();
                }
                if sink.flush().await.is_err() {
                    break;
                }
            }
            let _ = sink.close().await;
        });

        let mut nonce = [0u8; 32];
        if getrandom::getrandom(&mut nonce).is_err() {
            warn!("no randomness for a connection nonce; dropping the connection");
            return;
        }
        let nonce = Nonce::from_bytes(nonce);
        let hello = ServerMessage::Push(Push::Hello {
            protocol_version: u32::from(PROTOCOL_VERSION),
            nonce,
            server_time: self.services.clock.now(),
            max_frame_bytes: MAX_FRAME_BYTES as u32,
        });
        let _ = out_tx.send(encode_server(&hello)).await;

        let mut session = Session::AwaitingAuth { nonce };
        let mut online: Option<(AccountId, CancellationToken)> = None;
        let mut malformed = 0u32;
        let auth_deadline = tokio::time::Instant::now() + AUTH_TIMEOUT;
        loop {
            let next = tokio::select! {
                _ = self.shutdown.cancelled() => break,
                _ = tokio::time::sleep_until(auth_deadline), if matches!(session, Session::AwaitingAuth { .. }) => {
                    let error = ErrorReply::new(
                        ErrorCode::NotAuthenticated,
                        format!("not authenticated within {} seconds", AUTH_TIMEOUT.as_secs()),
                    );
                    let _ = out_tx.send(error_frame(0, error)).await;
                    break;
                }
                next = source.next() => next,
            };
            let bytes = match next {
                None | Some(Ok(Message::Close(_))) => break,
                Some(Ok(Message::Binary(bytes))) => bytes,
                Some(Ok(Message::Text(_))) => {
                    malformed += 1;
                    let error = ErrorReply::new(
                        ErrorCode::MalformedFrame,
                        "text frames are not part of the protocol; send binary frames",
                    );
                    if out_tx.send(error_frame(0, error)).await.is_err()
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
                    let _ = out_tx.send(error_frame(0, error)).await;
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
            let frame = match decode_client(&bytes) {
                Ok(frame) => frame,
                Err(error) => {
                    malformed += 1;
                    debug!(connection = self.id, %error, "malformed frame");
                    if out_tx
                        .send(error_frame(0, decode_error_reply(&error)))
                        .await
                        .is_err()
                        || malformed >= self.max_malformed_frames
                    {
                        break;
                    }
                    continue;
                }
            };
            let result = self.services.handle(&mut session, frame.request).await;
            let response = ServerMessage::Response {
                id: frame.id,
                result,
            };
            if out_tx.send(encode_server(&response)).await.is_err() {
                break;
            }
            if let (None, Session::Authenticated { account, .. }) = (&online, &session) {
                let inbox = self.services.registry.register(account, self.id);
                let stop = self.shutdown.child_token();
                tokio::spawn(pump(
                    Arc::clone(&self.services),
                    account.clone(),
                    inbox,
                    out_tx.clone(),
                    stop.clone(),
                ));
                online = Some((account.clone(), stop));
            }
        }
        if let Some((account, stop)) = online {
            stop.cancel();
            self.services.registry.unregister(&account, self.id);
        }
        drop(out_tx);
        let _ = writer.await;
    }
}

/// Pushes `account`'s mailbox to this connection: the stored backlog first,
/// then `Synced`, then each new delivery as it is committed. Fresh
/// fan-out copies arrive in memory (already durable: they are handed over
/// only after their commit); anything else, or anything that did not fit
/// in memory, is read back from the mailbox.
async fn pump(
    services: Arc<Services>,
    account: AccountId,
    mut inbox: Inbox,
    out: mpsc::Sender<Vec<u8>>,
    stop: CancellationToken,
) {
    // Every delivery up to `after` has been pushed (or acknowledged), as a
    // mailbox read established; `pushed` holds IDs above it pushed from
    // memory, so a later read does not push them twice.
    let mut after = 0u64;
    let mut pushed: BTreeSet<u64> = BTreeSet::new();
    let mut read = true;
    let mut synced = false;
    let push = |stored: StoredDelivery| {
        encode_server(&ServerMessage::Push(Push::Delivery(Delivery {
            id: stored.id,
            sender: stored.sender,
            kind: stored.kind,
            group_id: stored.group_id,
            payload: stored.payload,
            sent_at: stored.sent_at,
        })))
    };
    loop {
        let woken = inbox.wake.notified();
        tokio::pin!(woken);
        // Register interest before reading, so a delivery stored between
        // the read and the wait still wakes us.
        woken.as_mut().enable();
        if read || pushed.len() >= MAX_PUSHED_AHEAD {
            // Cleared before the read: whatever could not be queued from
            // now on wakes us again, and everything before is in the read.
            inbox.overflowed.store(false, Ordering::SeqCst);
            let batch = tokio::select! {
                _ = stop.cancelled() => return,
                batch = services.store.pending(&account, after, PUMP_BATCH, services.clock.now()) => batch,
            };
            let batch = match batch {
                Ok(batch) => batch,
                Err(error) => {
                    warn!(%error, "reading a mailbox failed; retrying");
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    }
                }
            };
            let full = batch.len() == PUMP_BATCH;
            let highest = batch.last().map(|d| d.id);
            for stored in batch {
                if !pushed.contains(&stored.id) && out.send(push(stored)).await.is_err() {
                    return;
                }
            }
            if full {
                after = highest.unwrap_or(after).max(after);
                pushed = pushed.split_off(&(after + 1));
                continue;
            }
            // The read saw everything committed before it began, which
            // includes everything pushed from memory so far.
            after = highest
                .into_iter()
                .chain(pushed.last().copied())
                .fold(after, u64::max);
            pushed.clear();
            read = false;
            if !synced {
                synced = true;
                if out
                    .send(encode_server(&ServerMessage::Push(Push::Synced)))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = &mut woken => read = true,
            delivery = inbox.deliveries.recv() => {
                let Some(delivery) = delivery else { return };
                let mut next = Some(delivery);
                while let Some(delivery) = next.take() {
                    if delivery.id > after
                        && pushed.insert(delivery.id)
                        && out.send(push(delivery)).await.is_err()
                    {
                        return;
                    }
                    next = inbox.deliveries.try_recv().ok();
                }
            }
        }
    }
}
