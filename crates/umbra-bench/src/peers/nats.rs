//! nats-server as a peer: core publish/subscribe on loopback, without
//! JetStream and without storage, the raw relay reference. The devices speak
//! a minimal client of the NATS text protocol (INFO, CONNECT, SUB, PUB, MSG,
//! PING/PONG) written here, so nats-server gets exactly Umbra's traffic.
//!
//! Also home of what the peers share: [`Routes`] (who a send goes to),
//! [`Broker`] (the pinned server process) and [`write_queue`] (the batching
//! writer task).

use std::ffi::OsString;
use std::io::Write as _;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::recorder::Recorder;
use crate::system::{Endpoint, System, Topology};
use crate::umbra::pinned_command;

/// How long a device may take to connect and subscribe.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a (re)started broker may take to listen.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Per-connection read buffer: small, since idle runs hold ~19k of them.
pub(super) const READ_BUFFER: usize = 8 * 1024;
/// The writer task writes at most this much per system call.
const WRITE_BATCH: usize = 64 * 1024;
/// Longest control line accepted from the server (INFO is the long one).
const MAX_LINE: u64 = 64 * 1024;
/// Largest message payload accepted (nats-server's default limit is 1 MiB).
const MAX_PAYLOAD: usize = 8 * 1024 * 1024;

/// Starts nats under `work`, ready for `topology`.
pub async fn start(work: &Path, cpu: Option<u32>, topology: &Topology) -> Result<Arc<dyn System>> {
    let dir = work.join("nats");
    std::fs::create_dir_all(&dir)?;
    let port = free_port()?;
    let args = ["-a", "127.0.0.1", "-p", &port.to_string()]
        .map(OsString::from)
        .to_vec();
    let broker = Broker::start(
        "nats-server",
        find_program("nats-server"),
        args,
        cpu,
        dir.join("nats.log"),
        port,
    )
    .await?;
    Ok(Arc::new(NatsSystem {
        broker,
        routes: Arc::new(Routes::new(topology)),
    }))
}

/// Where one send goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Target {
    /// The other member of a 1:1 channel: its inbox.
    Device(u32),
    /// A group channel: its subject, which every member but the first
    /// subscribes to, so the broker fans out.
    Group(u32),
}

/// The topology as subjects: each device's inbox plus the groups it
/// receives.
#[derive(Debug)]
pub(super) struct Routes {
    devices: u32,
    channels: Vec<Vec<u32>>,
    /// Per device, the group channels it subscribes to.
    groups_of: Vec<Vec<u32>>,
}

impl Routes {
    pub(super) fn new(topology: &Topology) -> Routes {
        let mut groups_of = vec![Vec::new(); topology.devices as usize];
        for (channel, members) in topology.channels.iter().enumerate() {
            if members.len() > 2 {
                for &member in members.iter().skip(1) {
                    if let Some(groups) = groups_of.get_mut(member as usize) {
                        groups.push(channel as u32);
                    }
                }
            }
        }
        Routes {
            devices: topology.devices,
            channels: topology.channels.clone(),
            groups_of,
        }
    }

    pub(super) fn devices(&self) -> u32 {
        self.devices
    }

    /// The group channels `device` receives.
    pub(super) fn groups_of(&self, device: u32) -> &[u32] {
        self.groups_of
            .get(device as usize)
            .map_or(&[][..], Vec::as_slice)
    }

    /// Whether `device` receives anything at all (is in some channel other
    /// than as a group's sender).
    pub(super) fn receives(&self, device: u32) -> bool {
        self.channels.iter().any(|members| match members.len() {
            2 => members.contains(&device),
            n if n > 2 => members.iter().skip(1).any(|&m| m == device),
            _ => false,
        })
    }

    /// Where `from`'s send on `channel` goes; `None` for a channel with
    /// nobody to send to.
    pub(super) fn target(&self, from: u32, channel: u32) -> Option<Target> {
        let members = self.channels.get(channel as usize)?;
        match members.as_slice() {
            [first, second] => Some(Target::Device(if *first == from {
                *second
            } else {
                *first
            })),
            members if members.len() > 2 => Some(Target::Group(channel)),
            _ => None,
        }
    }
}

/// A free TCP port on loopback (free when asked; the broker binds it next).
pub(super) fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// `/usr/sbin/NAME` (where Debian installs the brokers), else NAME from PATH.
pub(super) fn find_program(name: &str) -> PathBuf {
    let sbin = Path::new("/usr/sbin").join(name);
    if sbin.exists() {
        sbin
    } else {
        PathBuf::from(name)
    }
}

/// A broker process pinned like Umbra's server, restartable on the same
/// port with the same arguments. Killed when dropped.
#[derive(Debug)]
pub(super) struct Broker {
    name: &'static str,
    program: PathBuf,
    args: Vec<OsString>,
    cpu: Option<u32>,
    log: PathBuf,
    pub(super) address: SocketAddr,
    child: Mutex<Child>,
}

impl Broker {
    /// Starts `program args` (which must make it listen on `port`) and
    /// waits until it accepts connections.
    pub(super) async fn start(
        name: &'static str,
        program: PathBuf,
        args: Vec<OsString>,
        cpu: Option<u32>,
        log: PathBuf,
        port: u16,
    ) -> Result<Broker> {
        let child = Broker::spawn(name, &program, &args, cpu, &log)?;
        let broker = Broker {
            name,
            program,
            args,
            cpu,
            log,
            address: SocketAddr::from(([127, 0, 0, 1], port)),
            child: Mutex::new(child),
        };
        broker.wait_ready().await?;
        Ok(broker)
    }

    fn spawn(
        name: &str,
        program: &Path,
        args: &[OsString],
        cpu: Option<u32>,
        log: &Path,
    ) -> Result<Child> {
        // Appended, so a restart's output follows the first run's.
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening {}", log.display()))?;
        pinned_command(program, cpu)
            .args(args)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("starting {name} ({}); is it installed?", program.display()))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Child> {
        self.child.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn pid(&self) -> u32 {
        self.lock().id()
    }

    /// Sends `signal` (a name such as "USR1") to the broker.
    pub(super) fn signal(&self, signal: &str) -> Result<()> {
        let pid = self.pid();
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()
            .context("running kill")?;
        if !status.success() {
            bail!("kill -{signal} {pid} failed: {status}");
        }
        Ok(())
    }

    /// SIGKILL (no chance to save anything), then the same command again.
    pub(super) async fn kill9_and_restart(&self) -> Result<()> {
        {
            let mut child = self.lock();
            child.kill()?;
            child.wait()?;
            *child = Broker::spawn(self.name, &self.program, &self.args, self.cpu, &self.log)?;
        }
        self.wait_ready().await
    }

    /// Waits until the broker accepts TCP connections; fails early if it
    /// exits (a bad configuration, a taken port).
    async fn wait_ready(&self) -> Result<()> {
        let start = Instant::now();
        while start.elapsed() < START_TIMEOUT {
            if let Some(status) = self.lock().try_wait()? {
                bail!(
                    "{} exited at start ({status}); see {}",
                    self.name,
                    self.log.display()
                );
            }
            if TcpStream::connect(self.address).await.is_ok() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!(
            "{} not listening on {} after {START_TIMEOUT:?}; see {}",
            self.name,
            self.address,
            self.log.display()
        )
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let child = self.child.get_mut().unwrap_or_else(|p| p.into_inner());
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Writes everything queued, batching: whatever is waiting goes out in one
/// write (up to [`WRITE_BATCH`]), so a busy connection makes few system
/// calls and an idle one sends each frame at once. Ends when every sender
/// of `queue` is gone, or with the write error.
pub(super) async fn write_queue(
    mut socket: OwnedWriteHalf,
    mut queue: mpsc::UnboundedReceiver<Vec<u8>>,
) -> std::io::Result<()> {
    let mut batch: Vec<u8> = Vec::new();
    while let Some(first) = queue.recv().await {
        if batch.is_empty() {
            batch = first;
        } else {
            batch.extend_from_slice(&first);
        }
        while batch.len() < WRITE_BATCH {
            match queue.try_recv() {
                Ok(next) => batch.extend_from_slice(&next),
                Err(_) => break,
            }
        }
        socket.write_all(&batch).await?;
        batch.clear();
        if batch.capacity() > 2 * WRITE_BATCH {
            batch = Vec::new();
        }
    }
    Ok(())
}

/// nats-server under test.
#[derive(Debug)]
struct NatsSystem {
    broker: Broker,
    routes: Arc<Routes>,
}

/// One device's NATS connection.
#[derive(Debug)]
struct NatsEndpoint {
    index: u32,
    routes: Arc<Routes>,
    out: mpsc::UnboundedSender<Vec<u8>>,
    alive: Arc<AtomicBool>,
    tasks: [JoinHandle<()>; 2],
}

impl Drop for NatsEndpoint {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Endpoint for NatsEndpoint {
    fn send(&self, channel: u32, payload: Vec<u8>) {
        let Some(target) = self.routes.target(self.index, channel) else {
            return;
        };
        let mut frame = Vec::with_capacity(payload.len() + 32);
        // Writing into a Vec cannot fail.
        let _ = match target {
            Target::Device(device) => write!(frame, "PUB d.{device} {}\r\n", payload.len()),
            Target::Group(group) => write!(frame, "PUB g.{group} {}\r\n", payload.len()),
        };
        frame.extend_from_slice(&payload);
        frame.extend_from_slice(b"\r\n");
        let _ = self.out.send(frame);
    }

    fn is_alive(&self) -> bool {
        self.alive.load(Ordering::SeqCst)
    }
}

/// Reads one control line into `line`, without its CR LF.
async fn read_line<R: AsyncBufRead + Unpin>(reader: &mut R, line: &mut Vec<u8>) -> Result<()> {
    line.clear();
    let read = (&mut *reader)
        .take(MAX_LINE)
        .read_until(b'\n', line)
        .await?;
    if read == 0 {
        bail!("connection closed by nats-server");
    }
    if line.last() != Some(&b'\n') {
        bail!("control line from nats-server cut short or longer than {MAX_LINE} bytes");
    }
    line.pop();
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    Ok(())
}

/// Everything the server sends after the handshake: messages are recorded
/// as received by `index`; the first PONG (answering the PING after the
/// SUBs) tells `connect` the subscriptions are in place.
async fn read_loop(
    mut reader: BufReader<OwnedReadHalf>,
    index: u32,
    recorder: Arc<Recorder>,
    out: mpsc::UnboundedSender<Vec<u8>>,
    ready: &mut Option<oneshot::Sender<Result<()>>>,
) -> Result<()> {
    let mut line = Vec::with_capacity(256);
    let mut payload = Vec::new();
    loop {
        read_line(&mut reader, &mut line).await?;
        let text = std::str::from_utf8(&line).context("control line is not UTF-8")?;
        let mut words = text.split_ascii_whitespace();
        let op = words.next().unwrap_or_default();
        if op.eq_ignore_ascii_case("MSG") {
            // MSG <subject> <sid> [reply-to] <#bytes>
            let fields = words.clone().count();
            if !(3..=4).contains(&fields) {
                bail!("malformed MSG line: {text:.100}");
            }
            let size: usize = words
                .last()
                .and_then(|s| s.parse().ok())
                .with_context(|| format!("bad size in {text:.100}"))?;
            if size > MAX_PAYLOAD {
                bail!("MSG of {size} bytes is over the {MAX_PAYLOAD}-byte limit");
            }
            payload.resize(size + 2, 0);
            reader.read_exact(&mut payload).await?;
            if !payload.ends_with(b"\r\n") {
                bail!("MSG payload not followed by CR LF");
            }
            recorder.delivered(index, payload.get(..size).unwrap_or_default());
        } else if op.eq_ignore_ascii_case("PING") {
            let _ = out.send(b"PONG\r\n".to_vec());
        } else if op.eq_ignore_ascii_case("PONG") {
            if let Some(ready) = ready.take() {
                let _ = ready.send(Ok(()));
            }
        } else if op.eq_ignore_ascii_case("+OK") || op.eq_ignore_ascii_case("INFO") {
        } else if op.eq_ignore_ascii_case("-ERR") {
            bail!("nats-server: {text:.200}");
        } else {
            bail!("unexpected line from nats-server: {text:.100}");
        }
    }
}

impl NatsSystem {
    async fn open(&self, index: u32, recorder: Arc<Recorder>) -> Result<NatsEndpoint> {
        let stream = TcpStream::connect(self.broker.address)
            .await
            .with_context(|| format!("connecting to nats-server at {}", self.broker.address))?;
        stream.set_nodelay(true)?;
        let (read, mut write) = stream.into_split();
        let mut reader = BufReader::with_capacity(READ_BUFFER, read);
        let mut line = Vec::new();
        read_line(&mut reader, &mut line).await?;
        if !line.starts_with(b"INFO ") {
            bail!(
                "nats-server did not start with INFO: {:.100}",
                String::from_utf8_lossy(&line)
            );
        }
        let mut hello = Vec::with_capacity(256);
        hello.extend_from_slice(
            b"CONNECT {\"verbose\":false,\"pedantic\":false,\"echo\":false}\r\n",
        );
        let _ = write!(hello, "SUB d.{index} 1\r\n");
        for (sid, group) in (2u32..).zip(self.routes.groups_of(index)) {
            let _ = write!(hello, "SUB g.{group} {sid}\r\n");
        }
        hello.extend_from_slice(b"PING\r\n");
        write.write_all(&hello).await?;

        let alive = Arc::new(AtomicBool::new(true));
        let (out, queue) = mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = oneshot::channel();
        let reader_task = {
            let alive = Arc::clone(&alive);
            let out = out.clone();
            tokio::spawn(async move {
                let mut ready = Some(ready_tx);
                let result = read_loop(reader, index, recorder, out, &mut ready).await;
                alive.store(false, Ordering::SeqCst);
                if let (Some(ready), Err(error)) = (ready, result) {
                    let _ = ready.send(Err(error));
                }
            })
        };
        let writer_task = {
            let alive = Arc::clone(&alive);
            tokio::spawn(async move {
                if write_queue(write, queue).await.is_err() {
                    alive.store(false, Ordering::SeqCst);
                }
            })
        };
        let endpoint = NatsEndpoint {
            index,
            routes: Arc::clone(&self.routes),
            out,
            alive,
            tasks: [reader_task, writer_task],
        };
        ready_rx
            .await
            .context("connection closed before nats-server answered PING")??;
        Ok(endpoint)
    }
}

#[async_trait::async_trait]
impl System for NatsSystem {
    fn name(&self) -> String {
        "nats".into()
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
        false
    }

    fn durability(&self) -> String {
        "none: relayed from memory, no storage; messages for offline subscribers are dropped".into()
    }

    async fn kill9_and_restart(&self) -> Result<()> {
        self.broker.kill9_and_restart().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_go_to_the_other_member_and_groups_to_their_subject() {
        let topology = Topology {
            devices: 6,
            channels: vec![vec![0, 1], vec![2, 3, 4, 5], vec![5]],
            devices_per_account: 1,
        };
        let routes = Routes::new(&topology);
        assert_eq!(routes.target(0, 0), Some(Target::Device(1)));
        assert_eq!(routes.target(1, 0), Some(Target::Device(0)));
        assert_eq!(routes.target(2, 1), Some(Target::Group(1)));
        assert_eq!(routes.target(5, 2), None);
        assert_eq!(routes.target(0, 9), None);
        assert_eq!(routes.groups_of(2), &[] as &[u32]);
        assert_eq!(routes.groups_of(4), &[1]);
        assert!(routes.receives(1) && routes.receives(3) && !routes.receives(2));
    }

    #[tokio::test]
    async fn read_line_refuses_a_line_without_end() {
        let mut input: &[u8] = b"INFO {}\r\nPING";
        let mut line = Vec::new();
        read_line(&mut input, &mut line)
            .await
            .expect("a whole line");
        assert_eq!(line, b"INFO {}");
        assert!(read_line(&mut input, &mut line).await.is_err());
    }
}
