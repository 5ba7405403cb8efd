//! The device's connection to its server: TLS with a pinned certificate,
//! WebSocket, requests matched to responses by id, and pushes handed on in
//! order.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tracing::{debug, warn};
use umbra_proto::{
    CertFingerprint, ClientFrame, ErrorReply, MAX_FRAME_BYTES, Push, Reply, Request, ServerMessage,
    decode_server, encode_client,
};

use crate::error::{ClientError, Result};

/// How long a request waits for its response.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// After this long without sending anything the device sends a WebSocket
/// ping; servers close connections idle for longer (3 minutes by default).
pub const KEEPALIVE: Duration = Duration::from_secs(60);

/// Accepts the server's certificate by the pin taken at activation, by the
/// rule of [`umbra_proto::pin`]: the pinned certificate itself, or one the
/// pinned anchor issued and that is valid now. Names and public CAs play no
/// part; the handshake signature is still checked against the accepted
/// certificate's key. Why a chain was refused is kept in `refusal`.
#[derive(Debug)]
struct PinnedCertificate {
    pin: CertFingerprint,
    refusal: Refusal,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

/// Why the last handshake's certificate was refused, if it was.
type Refusal = Arc<Mutex<Option<umbra_proto::pin::PinError>>>;

impl ServerCertVerifier for PinnedCertificate {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match umbra_proto::pin::check(
            self.pin,
            end_entity,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        ) {
            Ok(()) => Ok(ServerCertVerified::assertion()),
            Err(refusal) => {
                debug!(%refusal, "refused the server's certificate");
                *self.refusal.lock().unwrap_or_else(|p| p.into_inner()) = Some(refusal);
                Err(rustls::Error::InvalidCertificate(
                    rustls::CertificateError::ApplicationVerificationFailure,
                ))
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A TLS 1.3 client configuration that accepts only what `pin` accepts;
/// `refusal` says why when the server's certificate is refused.
fn pinned_config(
    pin: CertFingerprint,
    refusal: Refusal,
) -> Result<rustls::ClientConfig, rustls::Error> {
    // aws-lc-rs's provider offers the hybrid X25519MLKEM768 key exchange
    // first (and X25519 alone for a server without it), so what is captured
    // today stays closed to a quantum computer tomorrow.
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    Ok(
        rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedCertificate {
                pin,
                refusal,
                provider,
            }))
            .with_no_client_auth(),
    )
}

/// The TLS configuration devices use: TLS 1.3, and only what the pin
/// accepts. Public so that other programs speaking the protocol (the load
/// generator) connect exactly as devices do.
pub fn pinned_tls_config(pin: CertFingerprint) -> Result<rustls::ClientConfig, rustls::Error> {
    pinned_config(pin, Refusal::default())
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<Reply, ErrorReply>>>>>;

/// Pushes as the reader received them, each with its frame's size.
pub(crate) type Pushes = mpsc::UnboundedReceiver<(Push, usize)>;

/// Deliveries read from the socket and not yet applied. The server may
/// have at most a push window of them unacknowledged (the protocol's flow
/// control); a server that sends far more (twice the window) is cut off,
/// so what waits here stays bounded whatever the server does.
#[derive(Debug, Default)]
struct Backlog {
    deliveries: AtomicUsize,
    bytes: AtomicUsize,
    flooded: AtomicBool,
}

impl Backlog {
    const MAX_DELIVERIES: usize = 2 * umbra_proto::frame::PUSH_WINDOW_DELIVERIES;
    const MAX_BYTES: usize = 2 * umbra_proto::frame::PUSH_WINDOW_BYTES + MAX_FRAME_BYTES;

    /// Counts one more delivery; false if that overflows the backlog.
    fn received(&self, size: usize) -> bool {
        let deliveries = self.deliveries.fetch_add(1, Ordering::SeqCst) + 1;
        let bytes = self.bytes.fetch_add(size, Ordering::SeqCst) + size;
        deliveries <= Self::MAX_DELIVERIES && bytes <= Self::MAX_BYTES
    }
}

/// An open connection. Dropping it closes the socket.
#[derive(Debug)]
pub(crate) struct Link {
    out: mpsc::Sender<Vec<u8>>,
    pending: Pending,
    next_id: AtomicU64,
    alive: Arc<AtomicBool>,
    backlog: Arc<Backlog>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Link {
    fn drop(&mut self) {
        self.close();
    }
}

fn unreachable_error(address: &str, reason: impl std::fmt::Display) -> ClientError {
    ClientError::Unreachable {
        address: address.to_owned(),
        reason: reason.to_string(),
    }
}

/// Which of a cluster's addresses the next connection tries first: each
/// attempt in this process starts one further along, so a dead node is not
/// always tried first (a new process starts at the first).
static NEXT_ADDRESS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl Link {
    /// Connects to the server at `address`, checks the certificate against
    /// `pin`, and returns the link, the server's Hello, and the stream of
    /// later pushes. `address` may name several nodes of one cluster,
    /// separated by commas (`host1:7443,host2:7443`): each is tried in
    /// turn until one answers (every node presents the certificate the pin
    /// names). A certificate that does not match the pin is reported at
    /// once.
    pub async fn connect(address: &str, pin: CertFingerprint) -> Result<(Link, Push, Pushes)> {
        let nodes: Vec<&str> = address
            .split(',')
            .map(str::trim)
            .filter(|node| !node.is_empty())
            .collect();
        if nodes.len() <= 1 {
            return Link::connect_within(nodes.first().copied().unwrap_or(address), pin).await;
        }
        let start = NEXT_ADDRESS.fetch_add(1, Ordering::Relaxed);
        let mut failure = None;
        for offset in 0..nodes.len() {
            let node = nodes[(start + offset) % nodes.len()];
            match Link::connect_within(node, pin).await {
                Ok(connected) => return Ok(connected),
                // Someone answers for the server with another certificate:
                // said at once, not passed over for the next node.
                Err(ClientError::CertificateMismatch) => {
                    return Err(ClientError::CertificateMismatch);
                }
                // An out-of-date certificate may be one node an operator
                // forgot to rotate: the others are tried, and it is what
                // is reported if none answers.
                Err(error) => {
                    debug!(%error, node, "a node of the cluster did not answer");
                    if failure.is_none() || matches!(error, ClientError::CertificateOutOfDate) {
                        failure = Some(error);
                    }
                }
            }
        }
        Err(failure.unwrap_or_else(|| unreachable_error(address, "no address to connect to")))
    }

    /// [`Link::connect_node`], given up after [`REQUEST_TIMEOUT`] in all:
    /// a node that accepts the connection and then says nothing (full,
    /// stopped, a tarpit on the way) does not hold the device there, and
    /// the next node is tried.
    async fn connect_within(address: &str, pin: CertFingerprint) -> Result<(Link, Push, Pushes)> {
        tokio::time::timeout(REQUEST_TIMEOUT, Link::connect_node(address, pin))
            .await
            .unwrap_or_else(|_| {
                Err(unreachable_error(
                    address,
                    "the server did not answer in time",
                ))
            })
    }

    async fn connect_node(address: &str, pin: CertFingerprint) -> Result<(Link, Push, Pushes)> {
        let refusal = Refusal::default();
        let tls_config =
            pinned_config(pin, Arc::clone(&refusal)).map_err(|e| unreachable_error(address, e))?;
        let host = address
            .rsplit_once(':')
            .map(|(host, _)| host.trim_matches(['[', ']']))
            .unwrap_or(address);
        // The name plays no part in verification (the pin does); it only
        // has to be syntactically valid for the TLS handshake.
        let server_name = ServerName::try_from(host.to_owned())
            .or_else(|_| ServerName::try_from("umbra.invalid".to_owned()))
            .map_err(|e| unreachable_error(address, e))?;
        let tcp = tokio::time::timeout(REQUEST_TIMEOUT, TcpStream::connect(address))
            .await
            .map_err(|_| unreachable_error(address, "connection timed out"))?
            .map_err(|e| unreachable_error(address, e))?;
        let _ = tcp.set_nodelay(true);
        let tls = tokio_rustls::TlsConnector::from(Arc::new(tls_config))
            .connect(server_name, tcp)
            .await
            .map_err(
                |e| match refusal.lock().unwrap_or_else(|p| p.into_inner()).take() {
                    Some(umbra_proto::pin::PinError::OutOfDate) => {
                        ClientError::CertificateOutOfDate
                    }
                    Some(_) => ClientError::CertificateMismatch,
                    None => unreachable_error(address, e),
                },
            )?;
        // The server never sends more than MAX_FRAME_BYTES; a little more
        // is read anyway, so that a delivery an older server accepted
        // (whose envelope took it just past the limit) arrives and is set
        // aside like any message that cannot be applied, instead of
        // failing every connection while it waits in the mailbox.
        let ws_config = WebSocketConfig::default()
            .read_buffer_size(4096)
            .max_message_size(Some(MAX_FRAME_BYTES + umbra_proto::SERVER_FRAME_SLACK))
            .max_frame_size(Some(MAX_FRAME_BYTES + umbra_proto::SERVER_FRAME_SLACK));
        let (ws, _) = tokio_tungstenite::client_async_with_config(
            format!("wss://{address}/"),
            tls,
            Some(ws_config),
        )
        .await
        .map_err(|e| unreachable_error(address, e))?;
        let (mut sink, mut source) = ws.split();

        let (out_tx, mut out_rx) = mpsc::channel::<Vec<u8>>(256);
        let writer = tokio::spawn(async move {
            loop {
                let message = match tokio::time::timeout(KEEPALIVE, out_rx.recv()).await {
                    Ok(Some(bytes)) => Message::Binary(bytes.into()),
                    Ok(None) => break,
                    // Quiet for a while: a WebSocket ping keeps the server
                    // from closing the connection as idle.
                    Err(_) => Message::Ping(Vec::new().into()),
                };
                if sink.send(message).await.is_err() {
                    break;
                }
            }
            let _ = sink.close().await;
        });

        let pending: Pending = Arc::default();
        let alive = Arc::new(AtomicBool::new(true));
        let (push_tx, push_rx) = mpsc::unbounded_channel();
        let (hello_tx, hello_rx) = oneshot::channel();
        let backlog = Arc::new(Backlog::default());
        let reader = {
            let pending = Arc::clone(&pending);
            let alive = Arc::clone(&alive);
            let backlog = Arc::clone(&backlog);
            tokio::spawn(async move {
                let mut hello_tx = Some(hello_tx);
                while let Some(Ok(message)) = source.next().await {
                    let Message::Binary(bytes) = message else {
                        continue;
                    };
                    match decode_server(&bytes) {
                        Ok(ServerMessage::Response { id, result }) => {
                            let waiter = pending
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .remove(&id);
                            match waiter {
                                Some(waiter) => {
                                    let _ = waiter.send(result);
                                }
                                None => debug!(id, ?result, "response to no pending request"),
                            }
                        }
                        Ok(ServerMessage::Push(push @ Push::Hello { .. })) => {
                            if let Some(tx) = hello_tx.take() {
                                let _ = tx.send(push);
                            }
                        }
                        Ok(ServerMessage::Push(push)) => {
                            if matches!(push, Push::Delivery(_)) && !backlog.received(bytes.len()) {
                                warn!(
                                    "the server pushed far beyond its flow-control window; dropping the connection"
                                );
                                backlog.flooded.store(true, Ordering::SeqCst);
                                break;
                            }
                            if push_tx.send((push, bytes.len())).is_err() {
                                break;
                            }
                        }
                        Err(error) => debug!(%error, "undecodable frame from the server"),
                    }
                }
                alive.store(false, Ordering::SeqCst);
                // Fail every request still waiting.
                pending.lock().unwrap_or_else(|p| p.into_inner()).clear();
            })
        };
        let hello = tokio::time::timeout(REQUEST_TIMEOUT, hello_rx)
            .await
            .map_err(|_| ClientError::Timeout(REQUEST_TIMEOUT.as_secs()))?
            .map_err(|_| ClientError::ConnectionLost)?;
        Ok((
            Link {
                out: out_tx,
                pending,
                next_id: AtomicU64::new(1),
                alive,
                backlog,
                tasks: vec![reader, writer],
            },
            hello,
            push_rx,
        ))
    }

    /// Closes the connection now: stops reading (which ends the push
    /// stream) and writing; requests in flight fail.
    pub fn close(&self) {
        self.alive.store(false, Ordering::SeqCst);
        for task in &self.tasks {
            task.abort();
        }
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// One delivery of `size` bytes was applied (or set aside for good).
    pub fn applied(&self, size: usize) {
        self.backlog.deliveries.fetch_sub(1, Ordering::SeqCst);
        self.backlog.bytes.fetch_sub(size, Ordering::SeqCst);
    }

    /// Deliveries received and not yet applied.
    pub fn backlog(&self) -> usize {
        self.backlog.deliveries.load(Ordering::SeqCst)
    }

    /// Whether the connection was dropped because the server flooded it.
    pub fn flooded(&self) -> bool {
        self.backlog.flooded.load(Ordering::SeqCst)
    }

    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::SeqCst) && !self.out.is_closed()
    }

    /// Sends a request and waits for its response.
    pub async fn request(&self, request: Request) -> Result<Reply> {
        if !self.is_alive() {
            return Err(ClientError::ConnectionLost);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let bytes = encode_client(&ClientFrame { id, request });
        // The server would refuse it and close the connection: say why
        // here instead, and keep the connection.
        if bytes.len() > MAX_FRAME_BYTES {
            return Err(ClientError::TooLarge {
                bytes: bytes.len(),
                limit: MAX_FRAME_BYTES,
            });
        }
        let (tx, rx) = oneshot::channel();
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, tx);
        if self.out.send(bytes).await.is_err() {
            return Err(ClientError::ConnectionLost);
        }
        match tokio::time::timeout(REQUEST_TIMEOUT, rx).await {
            Err(_) => {
                self.pending
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id);
                Err(ClientError::Timeout(REQUEST_TIMEOUT.as_secs()))
            }
            Ok(Err(_)) => Err(ClientError::ConnectionLost),
            Ok(Ok(result)) => result.map_err(ClientError::from),
        }
    }

    /// Sends a request that expects no answer (a quiet `Ack`) without
    /// waiting. Should it fail, the server's error arrives as a response to
    /// no pending request and is logged at debug level.
    pub async fn notify(&self, request: Request) -> Result<()> {
        if !self.is_alive() {
            return Err(ClientError::ConnectionLost);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let bytes = encode_client(&ClientFrame { id, request });
        self.out
            .send(bytes)
            .await
            .map_err(|_| ClientError::ConnectionLost)
    }
}
