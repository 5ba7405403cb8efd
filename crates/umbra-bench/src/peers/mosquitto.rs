//! mosquitto as a peer: an MQTT 3.1.1 broker on loopback with QoS 1 and
//! persistent sessions, the store-and-forward relay reference. The devices
//! speak a minimal MQTT client written here (CONNECT, SUBSCRIBE, PUBLISH
//! QoS 1 both ways, PUBACK), so mosquitto gets exactly Umbra's traffic.
//!
//! Device `i` is client `d<i>` with `clean_session=false`, subscribed at
//! QoS 1 to its inbox `d/<i>` and to `g/<channel>` for every group it
//! receives. Sessions are created once at start for every device that can
//! receive, so messages sent before its first connection wait for it, as
//! they would in Umbra's mailboxes.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures_util::{StreamExt, TryStreamExt};
use tokio::io::{AsyncBufRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedReadHalf;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::nats::{Broker, READ_BUFFER, Routes, Target, find_program, free_port, write_queue};
use crate::recorder::Recorder;
use crate::system::{Endpoint, System, Topology};

/// How long a device may take to connect and subscribe.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(120);
/// Sessions created at once at start.
const SETUP_PARALLELISM: usize = 256;
/// Seconds between the broker's snapshots of its in-memory state.
const AUTOSAVE_SECONDS: u32 = 60;
/// How long the broker may take to write its snapshot after SIGUSR1.
const SAVE_TIMEOUT: Duration = Duration::from_secs(120);
/// Largest packet accepted from the broker.
const MAX_PACKET: usize = 16 * 1024 * 1024;
/// PUBACKs for received messages are sent together, up to this many bytes.
const ACK_BATCH: usize = 4 * 1024;

const CONNECT: u8 = 1;
const CONNACK: u8 = 2;
const PUBLISH: u8 = 3;
const PUBACK: u8 = 4;
const SUBSCRIBE: u8 = 8;
const SUBACK: u8 = 9;
const PINGRESP: u8 = 13;
const DISCONNECT: u8 = 14;

/// Starts mosquitto under `work`, ready for `topology`.
pub async fn start(work: &Path, cpu: Option<u32>, topology: &Topology) -> Result<Arc<dyn System>> {
    let dir = work.join("mosquitto");
    // A fresh broker every run, as Umbra starts from its pristine fixture.
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    let data = dir.join("data");
    std::fs::create_dir_all(&data)?;
    let dir = std::fs::canonicalize(&dir)?;
    let data = dir.join("data");
    let port = free_port()?;
    let config = dir.join("mosquitto.conf");
    std::fs::write(
        &config,
        config_text(port, &data, &dir.join("mosquitto.log")),
    )?;
    let broker = Broker::start(
        "mosquitto",
        find_program("mosquitto"),
        vec![OsString::from("-c"), config.into_os_string()],
        cpu,
        dir.join("stderr.log"),
        port,
    )
    .await?;
    let system = MosquittoSystem {
        broker,
        routes: Arc::new(Routes::new(topology)),
        snapshot: data.join("mosquitto.db"),
    };
    system.create_sessions().await?;
    Ok(Arc::new(system))
}

fn config_text(port: u16, data: &Path, log: &Path) -> String {
    format!(
        "# Written by umbra-bench.\n\
         # Run as whoever starts the benchmark (root on the bench machines),\n\
         # so the work directory needs no chown.\n\
         user root\n\
         listener {port} 127.0.0.1\n\
         allow_anonymous true\n\
         max_connections -1\n\
         set_tcp_nodelay true\n\
         persistence true\n\
         persistence_location {data}/\n\
         persistence_file mosquitto.db\n\
         autosave_interval {AUTOSAVE_SECONDS}\n\
         autosave_on_changes false\n\
         max_queued_messages 1000000\n\
         max_queued_bytes 0\n\
         queue_qos0_messages false\n\
         max_inflight_messages 100\n\
         log_dest file {log}\n\
         log_type error\n\
         log_type warning\n\
         log_type notice\n\
         log_type information\n\
         connection_messages false\n",
        data = data.display(),
        log = log.display(),
    )
}

/// mosquitto under test.
#[derive(Debug)]
struct MosquittoSystem {
    broker: Broker,
    routes: Arc<Routes>,
    /// The broker's persistence file.
    snapshot: PathBuf,
}

impl MosquittoSystem {
    /// Creates the persistent session (with its subscriptions) of every
    /// device that can receive, then has the broker save them (SIGUSR1), so
    /// that they exist before any message is sent and survive a kill -9.
    async fn create_sessions(&self) -> Result<()> {
        let started = Instant::now();
        let receivers: Vec<u32> = (0..self.routes.devices())
            .filter(|&d| self.routes.receives(d))
            .collect();
        if receivers.is_empty() {
            return Ok(());
        }
        futures_util::stream::iter(receivers.iter().map(|&device| self.create_session(device)))
            .buffer_unordered(SETUP_PARALLELISM)
            .try_collect::<Vec<()>>()
            .await?;
        self.broker.signal("USR1")?;
        while !self.snapshot.exists() {
            if started.elapsed() > SAVE_TIMEOUT {
                bail!(
                    "mosquitto did not write {} after SIGUSR1",
                    self.snapshot.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        eprintln!(
            "  mosquitto: {} persistent sessions created and saved in {:.1?}",
            receivers.len(),
            started.elapsed()
        );
        Ok(())
    }

    async fn create_session(&self, device: u32) -> Result<()> {
        let stream = TcpStream::connect(self.broker.address).await?;
        stream.set_nodelay(true)?;
        let (read, mut write) = stream.into_split();
        let mut reader = BufReader::with_capacity(256, read);
        let mut hello = connect_packet(device);
        hello.extend_from_slice(&subscribe_packet(1, &self.topics(device)));
        write.write_all(&hello).await?;
        let mut body = Vec::new();
        expect_connack(&mut reader, &mut body).await?;
        let header = read_packet(&mut reader, &mut body).await?;
        if header >> 4 != SUBACK {
            bail!(
                "expected SUBACK from mosquitto, got packet type {}",
                header >> 4
            );
        }
        check_suback(&body)?;
        write.write_all(&[DISCONNECT << 4, 0]).await?;
        write.shutdown().await?;
        Ok(())
    }

    /// What `device` subscribes to.
    fn topics(&self, device: u32) -> Vec<String> {
        std::iter::once(format!("d/{device}"))
            .chain(
                self.routes
                    .groups_of(device)
                    .iter()
                    .map(|group| format!("g/{group}")),
            )
            .collect()
    }

    async fn open(&self, index: u32, recorder: Arc<Recorder>) -> Result<MqttEndpoint> {
        let stream = TcpStream::connect(self.broker.address)
            .await
            .with_context(|| format!("connecting to mosquitto at {}", self.broker.address))?;
        stream.set_nodelay(true)?;
        let (read, mut write) = stream.into_split();
        let mut reader = BufReader::with_capacity(READ_BUFFER, read);
        write.write_all(&connect_packet(index)).await?;
        let mut body = Vec::new();
        expect_connack(&mut reader, &mut body).await?;

        let link = Arc::new(Link {
            alive: AtomicBool::new(true),
            outstanding: AtomicU64::new(0),
            recorder,
        });
        let (out, queue) = mpsc::unbounded_channel();
        // Subscribing again on a resumed session replaces each subscription
        // with itself; it also covers a session lost in a crash.
        let _ = out.send(subscribe_packet(1, &self.topics(index)));
        let (ready_tx, ready_rx) = oneshot::channel();
        let reader_task = {
            let link = Arc::clone(&link);
            let out = out.clone();
            tokio::spawn(async move {
                let mut ready = Some(ready_tx);
                let result = read_loop(reader, index, &link, out, &mut ready).await;
                let why = match &result {
                    Ok(()) => "connection closed".to_owned(),
                    Err(error) => format!("{error:#}"),
                };
                link.fail(&why);
                if let (Some(ready), Err(error)) = (ready, result) {
                    let _ = ready.send(Err(error));
                }
            })
        };
        let writer_task = {
            let link = Arc::clone(&link);
            tokio::spawn(async move {
                if let Err(error) = write_queue(write, queue).await {
                    link.fail(&format!("writing to mosquitto: {error}"));
                }
            })
        };
        let endpoint = MqttEndpoint {
            index,
            routes: Arc::clone(&self.routes),
            out,
            link,
            next_packet_id: AtomicU16::new(1),
            tasks: [reader_task, writer_task],
        };
        ready_rx
            .await
            .context("connection closed before mosquitto answered SUBSCRIBE")??;
        Ok(endpoint)
    }
}

/// A connection's state shared by the endpoint and its tasks.
#[derive(Debug)]
struct Link {
    alive: AtomicBool,
    /// Publishes not yet acknowledged.
    outstanding: AtomicU64,
    recorder: Arc<Recorder>,
}

impl Link {
    fn acknowledged(&self) {
        let had_one = self
            .outstanding
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if had_one {
            self.recorder.note_answer(true, None);
        }
    }

    /// The connection is gone: whatever was not acknowledged never will be,
    /// and counts as refused (the sender cannot know it was stored).
    fn fail(&self, why: &str) {
        self.alive.store(false, Ordering::SeqCst);
        let lost = self.outstanding.swap(0, Ordering::SeqCst);
        for _ in 0..lost {
            self.recorder
                .note_answer(false, Some(format!("mosquitto: {why}")));
        }
    }
}

/// One device's MQTT connection.
#[derive(Debug)]
struct MqttEndpoint {
    index: u32,
    routes: Arc<Routes>,
    out: mpsc::UnboundedSender<Vec<u8>>,
    link: Arc<Link>,
    next_packet_id: AtomicU16,
    tasks: [JoinHandle<()>; 2],
}

impl Drop for MqttEndpoint {
    fn drop(&mut self) {
        // No DISCONNECT: the session stays either way, and going away
        // abruptly is what a phone does.
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl MqttEndpoint {
    /// 1..=65535, wrapping (0 is not a valid packet id).
    fn packet_id(&self) -> u16 {
        let id = self.next_packet_id.fetch_add(1, Ordering::Relaxed);
        if id == 0 {
            self.next_packet_id.fetch_add(1, Ordering::Relaxed)
        } else {
            id
        }
    }
}

impl Endpoint for MqttEndpoint {
    fn send(&self, channel: u32, payload: Vec<u8>) {
        let topic = match self.routes.target(self.index, channel) {
            Some(Target::Device(device)) => format!("d/{device}"),
            Some(Target::Group(group)) => format!("g/{group}"),
            None => return,
        };
        if !self.link.alive.load(Ordering::SeqCst) {
            self.link
                .recorder
                .note_answer(false, Some("mosquitto: connection closed".into()));
            return;
        }
        self.link.outstanding.fetch_add(1, Ordering::SeqCst);
        let packet = publish_packet(&topic, self.packet_id(), &payload);
        if self.out.send(packet).is_err() || !self.link.alive.load(Ordering::SeqCst) {
            // The connection died meanwhile; settle what it left.
            self.link.fail("connection closed");
        }
    }

    fn is_alive(&self) -> bool {
        self.link.alive.load(Ordering::SeqCst)
    }
}

#[async_trait::async_trait]
impl System for MosquittoSystem {
    fn name(&self) -> String {
        "mosquitto".into()
    }

    fn server_pid(&self) -> u32 {
        self.broker.pid()
    }

    async fn connect(&self, index: u32, recorder: Arc<Recorder>) -> Result<Box<dyn Endpoint>> {
        if index >= self.routes.devices() {
            bail!("device {index} is not in the topology");
        }
        let endpoint = tokio::time::timeout(CONNECT_TIMEOUT, self.open(index, recorder))
            .await
            .with_context(|| {
                format!("device {index} not subscribed within {CONNECT_TIMEOUT:?}")
            })??;
        Ok(Box::new(endpoint))
    }

    fn payload(&self, _channel: u32, size: usize) -> Vec<u8> {
        crate::peers::random_payload(size)
    }

    fn acknowledges(&self) -> bool {
        true
    }

    fn durability(&self) -> String {
        format!(
            "QoS 1, persistent sessions: PUBACK once the message is in the broker's memory; \
             persistence is an in-memory snapshot written every {AUTOSAVE_SECONDS} s \
             (autosave_interval {AUTOSAVE_SECONDS}) and on SIGTERM, no per-message fsync, \
             so a kill -9 loses what arrived since the last snapshot"
        )
    }

    async fn kill9_and_restart(&self) -> Result<()> {
        self.broker.kill9_and_restart().await
    }
}

/// Everything the broker sends after CONNACK: messages are recorded as
/// received by `index` and acknowledged, PUBACKs settle our publishes, and
/// the SUBACK tells `connect` the subscriptions are in place.
async fn read_loop(
    mut reader: BufReader<OwnedReadHalf>,
    index: u32,
    link: &Link,
    out: mpsc::UnboundedSender<Vec<u8>>,
    ready: &mut Option<oneshot::Sender<Result<()>>>,
) -> Result<()> {
    let mut body = Vec::new();
    let mut acks = Vec::new();
    loop {
        // Acknowledge together whatever arrived in one read.
        if reader.buffer().is_empty() && !acks.is_empty() {
            let _ = out.send(std::mem::take(&mut acks));
        }
        let header = match read_packet(&mut reader, &mut body).await {
            Ok(header) => header,
            Err(error) if is_clean_close(&error) => return Ok(()),
            Err(error) => return Err(error),
        };
        match header >> 4 {
            PUBLISH => {
                let (packet_id, payload) = parse_publish(header, &body)?;
                link.recorder.delivered(index, payload);
                if let Some(id) = packet_id {
                    acks.extend_from_slice(&puback_packet(id));
                    if acks.len() >= ACK_BATCH {
                        let _ = out.send(std::mem::take(&mut acks));
                    }
                }
            }
            PUBACK => {
                if body.len() != 2 {
                    bail!("PUBACK of {} bytes", body.len());
                }
                link.acknowledged();
            }
            SUBACK => {
                let checked = check_suback(&body);
                let failed = checked.is_err();
                if let Some(ready) = ready.take() {
                    let _ = ready.send(checked);
                }
                if failed {
                    bail!("subscription refused");
                }
            }
            PINGRESP => {}
            other => bail!("unexpected MQTT packet type {other} from mosquitto"),
        }
    }
}

fn is_clean_close(error: &anyhow::Error) -> bool {
    error
        .downcast_ref::<std::io::Error>()
        .is_some_and(|e| e.kind() == std::io::ErrorKind::UnexpectedEof)
}

/// Reads one packet: returns its first byte (type and flags) and leaves
/// the rest of it in `body`.
async fn read_packet<R: AsyncBufRead + Unpin>(reader: &mut R, body: &mut Vec<u8>) -> Result<u8> {
    let header = reader.read_u8().await?;
    // Remaining length: 7 bits per byte, least significant first, at most
    // four bytes.
    let mut length = 0usize;
    let mut shift = 0;
    loop {
        let byte = reader.read_u8().await?;
        length |= usize::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            break;
        }
        shift += 7;
        if shift > 21 {
            bail!("MQTT remaining length longer than four bytes");
        }
    }
    if length > MAX_PACKET {
        bail!("MQTT packet of {length} bytes is over the {MAX_PACKET}-byte limit");
    }
    body.resize(length, 0);
    reader.read_exact(body).await?;
    Ok(header)
}

async fn expect_connack<R: AsyncBufRead + Unpin>(reader: &mut R, body: &mut Vec<u8>) -> Result<()> {
    let header = read_packet(reader, body)
        .await
        .context("waiting for CONNACK")?;
    if header >> 4 != CONNACK {
        bail!(
            "expected CONNACK from mosquitto, got packet type {}",
            header >> 4
        );
    }
    match body.as_slice() {
        [_flags, 0] => Ok(()),
        [_flags, code] => bail!("mosquitto refused the connection (CONNACK code {code})"),
        _ => bail!("CONNACK of {} bytes", body.len()),
    }
}

fn check_suback(body: &[u8]) -> Result<()> {
    let Some(codes) = body.get(2..).filter(|codes| !codes.is_empty()) else {
        bail!("SUBACK without return codes");
    };
    if codes.iter().any(|&code| code > 2) {
        bail!("mosquitto refused a subscription (SUBACK {codes:?})");
    }
    Ok(())
}

/// The packet id (QoS 1) and payload of a PUBLISH.
fn parse_publish(header: u8, body: &[u8]) -> Result<(Option<u16>, &[u8])> {
    let qos = (header >> 1) & 3;
    let Some(&[high, low]) = body.get(..2) else {
        bail!("PUBLISH without topic");
    };
    let topic_end = 2 + usize::from(u16::from_be_bytes([high, low]));
    let rest = body.get(topic_end..).context("PUBLISH topic cut short")?;
    match qos {
        0 => Ok((None, rest)),
        1 => match rest {
            [high, low, payload @ ..] => Ok((Some(u16::from_be_bytes([*high, *low])), payload)),
            _ => bail!("PUBLISH without packet id"),
        },
        _ => bail!("PUBLISH at QoS {qos}, above the QoS 1 subscribed"),
    }
}

fn put_length(packet: &mut Vec<u8>, mut length: usize) {
    loop {
        let byte = (length % 128) as u8;
        length /= 128;
        if length == 0 {
            packet.push(byte);
            return;
        }
        packet.push(byte | 0x80);
    }
}

fn put_str(packet: &mut Vec<u8>, text: &str) {
    let length = u16::try_from(text.len()).expect("topics and client ids are short");
    packet.extend_from_slice(&length.to_be_bytes());
    packet.extend_from_slice(text.as_bytes());
}

/// A packet of `kind` (type and flags) around `body`.
fn packet(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut packet = Vec::with_capacity(body.len() + 5);
    packet.push(kind);
    put_length(&mut packet, body.len());
    packet.extend_from_slice(body);
    packet
}

/// CONNECT as client `d<device>`, keeping its session, no keepalive.
fn connect_packet(device: u32) -> Vec<u8> {
    let mut body = Vec::with_capacity(24);
    put_str(&mut body, "MQTT");
    body.push(4); // protocol level: 3.1.1
    body.push(0); // flags: clean_session=0, no will, no credentials
    body.extend_from_slice(&0u16.to_be_bytes()); // keepalive off
    put_str(&mut body, &format!("d{device}"));
    packet(CONNECT << 4, &body)
}

fn subscribe_packet(packet_id: u16, topics: &[String]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&packet_id.to_be_bytes());
    for topic in topics {
        put_str(&mut body, topic);
        body.push(1); // QoS 1
    }
    packet(SUBSCRIBE << 4 | 0b0010, &body)
}

fn publish_packet(topic: &str, packet_id: u16, payload: &[u8]) -> Vec<u8> {
    let length = 2 + topic.len() + 2 + payload.len();
    let mut packet = Vec::with_capacity(length + 5);
    packet.push(PUBLISH << 4 | 0b0010); // QoS 1, not DUP, not retained
    put_length(&mut packet, length);
    put_str(&mut packet, topic);
    packet.extend_from_slice(&packet_id.to_be_bytes());
    packet.extend_from_slice(payload);
    packet
}

fn puback_packet(packet_id: u16) -> [u8; 4] {
    let [high, low] = packet_id.to_be_bytes();
    [PUBACK << 4, 2, high, low]
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn read(bytes: &[u8]) -> Result<(u8, Vec<u8>)> {
        let mut input = bytes;
        let mut body = Vec::new();
        let header = read_packet(&mut input, &mut body).await?;
        Ok((header, body))
    }

    #[tokio::test]
    async fn remaining_length_round_trips_at_every_width() {
        for length in [0, 127, 128, 16_383, 16_384, 2_097_151, 2_097_152] {
            let body = vec![7u8; length];
            let (header, read_body) = read(&packet(0x30, &body)).await.expect("valid packet");
            assert_eq!((header, read_body.len()), (0x30, length));
        }
    }

    #[tokio::test]
    async fn hostile_packets_are_errors() {
        assert!(read(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01]).await.is_err());
        assert!(
            read(&[0x30, 0xff, 0xff, 0xff, 0x7f]).await.is_err(),
            "too large"
        );
        assert!(read(&[0x30, 5, 1, 2]).await.is_err(), "cut short");
        assert!(parse_publish(0x32, &[0, 9, b'a']).is_err());
        assert!(parse_publish(0x32, &[0, 1, b'a', 0]).is_err());
        assert!(parse_publish(0x34, &[0, 1, b'a', 0, 1]).is_err());
        assert!(check_suback(&[0, 1, 0x80]).is_err());
        assert!(check_suback(&[0, 1]).is_err());
    }

    #[test]
    fn a_publish_parses_back() {
        let bytes = publish_packet("d/7", 513, b"hello");
        let body = bytes.get(2..).expect("short packet, one length byte");
        assert_eq!(
            parse_publish(bytes[0], body).expect("valid"),
            (Some(513), &b"hello"[..])
        );
        assert_eq!(puback_packet(513), [0x40, 2, 2, 1]);
    }
}
