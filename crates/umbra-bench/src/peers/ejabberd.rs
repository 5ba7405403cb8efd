//! ejabberd 23.01 (Debian's package) as a peer: XMPP over WebSocket
//! (RFC 7395) on loopback, SASL PLAIN, XEP-0198 acknowledgements, offline
//! storage in Mnesia (`mod_offline`).
//!
//! The server runs as the `ejabberd` user from a working directory under
//! `work` (config from `../shared/bench/ejabberd/` with `@WORKDIR@`
//! substituted), started with `ejabberdctl`, pinned with `taskset`, with the
//! file limit raised. Users `u<index>@localhost` (password `p<index>`) are
//! registered once over `/api/register` (CPU-bound at about 150 users/s:
//! PBKDF2 per user) and the Mnesia spool is kept as a tarball per user count,
//! restored before every run so each run starts from the same state.
//!
//! Each device speaks a small XMPP client: one reader task that splits the
//! stream into top-level elements, records every `<message>` body (the
//! base64 of the payload) and answers the server's `<r/>`, and one writer
//! task that batches queued frames and asks for an acknowledgement
//! (`<r/>`) after each batch while none is outstanding. Each acknowledged
//! message counts as one accepted answer. `UMBRA_BENCH_EJABBERD_ACKS=0`
//! turns XEP-0198 off (plain XMPP, as in `../shared/bench/ejabberd`'s table).
//!
//! Groups are not benchmarked: MUC delivers only to occupants who are in the
//! room at the moment (no offline storage), so it is not the same traffic.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use futures_util::stream::SplitStream;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Notify, mpsc};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::recorder::Recorder;
use crate::system::{Endpoint, System, Topology};
use crate::umbra::wait_listening;

/// The HTTP listener (WebSocket and API) of `ejabberd-tuned.yml`.
const HTTP_ADDRESS: ([u8; 4], u16) = ([127, 0, 0, 1], 15280);
const WS_URL: &str = "ws://127.0.0.1:15280/ws";
/// The virtual host of `ejabberd-tuned.yml`.
const DOMAIN: &str = "localhost";
/// Where the benchmark's ejabberd configuration lives, unless overridden.
const CONFIG_ENV: &str = "UMBRA_BENCH_EJABBERD_CONFIG";
const DEFAULT_CONFIG_DIR: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../../shared/bench/ejabberd"
);
/// Set to 0 to run plain XMPP without XEP-0198 acknowledgements (each `<r/>`
/// and `<a/>` costs the server about as much as a small stanza; without them
/// "accepted" means "written").
const ACKS_ENV: &str = "UMBRA_BENCH_EJABBERD_ACKS";
const EJABBERDCTL: &str = "/usr/sbin/ejabberdctl";
/// The `ejabberd` user's home: the server and every `ejabberdctl` client
/// must read the same `.erlang.cookie`.
const EJABBERD_HOME: &str = "/var/lib/ejabberd";
/// Per-process open files for the server (the machine's hard limit).
const FILE_LIMIT: u32 = 20_000;
/// `/api/register` requests in flight (the server is CPU-bound anyway).
const REGISTER_PARALLELISM: usize = 4;
/// How long a login (WebSocket, SASL, bind, stream management) may take;
/// generous because a storm queues thousands of PBKDF2 runs on one core.
const LOGIN_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a closing connection waits for the server's `<close/>`.
const CLOSE_WAIT: Duration = Duration::from_secs(10);
/// How long the server may take to stop before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);
/// Largest element we buffer (the listener's `max_stanza_size` is 256 KiB).
const MAX_ELEMENT_BYTES: usize = 1 << 20;
/// Stanzas a device sends after enabling stream management and before its
/// first message: the initial `<presence/>`.
const STANZAS_BEFORE_MESSAGES: u64 = 1;

const OPEN: &str =
    r#"<open xmlns="urn:ietf:params:xml:ns:xmpp-framing" to="localhost" version="1.0"/>"#;
const CLOSE: &str = r#"<close xmlns="urn:ietf:params:xml:ns:xmpp-framing"/>"#;
const REQUEST_ACK: &str = "<r xmlns='urn:xmpp:sm:3'/>";

/// Starts ejabberd under `work`, ready for `topology`.
pub async fn start(work: &Path, cpu: Option<u32>, topology: &Topology) -> Result<Arc<dyn System>> {
    if topology.channels.iter().any(|members| members.len() > 2) {
        bail!("ejabberd: groups (MUC) are not benchmarked");
    }
    let system = EjabberdSystem::prepare(work, cpu, topology).await?;
    Ok(Arc::new(system))
}

/// ejabberd under test, running from `dir`.
#[derive(Debug)]
struct EjabberdSystem {
    dir: PathBuf,
    cpu: Option<u32>,
    pid: AtomicU32,
    channels: Arc<Vec<Vec<u32>>>,
    /// Whether devices enable XEP-0198 and count its acknowledgements.
    acks: bool,
}

impl EjabberdSystem {
    async fn prepare(work: &Path, cpu: Option<u32>, topology: &Topology) -> Result<EjabberdSystem> {
        check_environment()?;
        std::fs::create_dir_all(work)?;
        let dir = std::path::absolute(work.join("ejabberd"))?;
        let config_hash = write_config(&dir)?;
        kill_stale(&dir)?;
        if tokio::net::TcpStream::connect(SocketAddr::from(HTTP_ADDRESS))
            .await
            .is_ok()
        {
            bail!(
                "something already listens on {:?}: stop the other ejabberd first",
                HTTP_ADDRESS
            );
        }
        let snapshot = dir.join(format!(
            "spool-{}-users-{config_hash}.tar",
            topology.devices
        ));
        if !snapshot.exists() {
            build_snapshot(&dir, cpu, topology.devices, &snapshot).await?;
        }
        restore_spool(&dir, &snapshot)?;
        let pid = start_server(&dir, cpu).await?;
        Ok(EjabberdSystem {
            dir,
            cpu,
            pid: AtomicU32::new(pid),
            channels: Arc::new(topology.channels.clone()),
            acks: std::env::var(ACKS_ENV).map_or(true, |value| value != "0"),
        })
    }
}

impl Drop for EjabberdSystem {
    fn drop(&mut self) {
        stop_server(&self.dir, self.pid.load(Ordering::SeqCst));
    }
}

#[async_trait::async_trait]
impl System for EjabberdSystem {
    fn name(&self) -> String {
        "ejabberd".into()
    }

    fn server_pid(&self) -> u32 {
        self.pid.load(Ordering::SeqCst)
    }

    async fn connect(&self, index: u32, recorder: Arc<Recorder>) -> Result<Box<dyn Endpoint>> {
        let endpoint =
            XmppEndpoint::connect(index, recorder, Arc::clone(&self.channels), self.acks)
                .await
                .with_context(|| format!("ejabberd: logging in u{index}"))?;
        Ok(Box::new(endpoint))
    }

    fn payload(&self, _channel: u32, size: usize) -> Vec<u8> {
        crate::peers::random_payload(size)
    }

    fn acknowledges(&self) -> bool {
        self.acks
    }

    fn durability(&self) -> String {
        let answer = if self.acks {
            "XEP-0198 ack (<a h>) once ejabberd's session process has routed the stanza"
        } else {
            "no acknowledgement (plain XMPP: accepted means written)"
        };
        format!(
            "{answer}; routed in memory to an online recipient; for an offline one, \
             mod_offline's mnesia:dirty_write into offline_msg (disc_only_copies: a DETS \
             file, no fsync; DETS caches writes for up to 3 s / 14 KB, lost on kill -9)"
        )
    }

    async fn kill9_and_restart(&self) -> Result<()> {
        let pid = self.pid.load(Ordering::SeqCst);
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || kill9(pid, &dir)).await??;
        let pid = start_server(&self.dir, self.cpu).await?;
        self.pid.store(pid, Ordering::SeqCst);
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// The server process.

fn config_source() -> PathBuf {
    std::env::var_os(CONFIG_ENV).map_or_else(|| PathBuf::from(DEFAULT_CONFIG_DIR), PathBuf::from)
}

fn check_environment() -> Result<()> {
    for tool in [
        EJABBERDCTL,
        "/usr/bin/setpriv",
        "/usr/bin/openssl",
        "/usr/bin/tar",
    ] {
        if !Path::new(tool).exists() {
            bail!(
                "ejabberd: {tool} is missing (apt-get install -y ejabberd openssl util-linux tar)"
            );
        }
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let root = status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        == Some("0");
    if !root {
        bail!("ejabberd: the benchmark must run as root to start ejabberd as its own user");
    }
    Ok(())
}

/// Lays out `dir` (etc, log, run, spool, certificate) and returns a short
/// hash of the configuration, so a spool snapshot is reused only with the
/// configuration it was made with.
fn write_config(dir: &Path) -> Result<String> {
    let source = config_source();
    let read = |name: &str| {
        std::fs::read_to_string(source.join(name)).with_context(|| {
            format!(
                "reading {} (set {CONFIG_ENV} to the ejabberd bench config directory)",
                source.join(name).display()
            )
        })
    };
    let workdir = dir.to_str().context("the work directory is not UTF-8")?;
    let yml = read("ejabberd-tuned.yml")?;
    let ctl = read("ejabberdctl-tuned.cfg")?;
    let inetrc = read("inetrc")?;
    let etc = dir.join("etc");
    for sub in ["etc", "log", "run", "spool"] {
        std::fs::create_dir_all(dir.join(sub))?;
    }
    std::fs::write(etc.join("ejabberd.yml"), yml.replace("@WORKDIR@", workdir))?;
    std::fs::write(
        etc.join("ejabberdctl.cfg"),
        ctl.replace("@WORKDIR@", workdir),
    )?;
    std::fs::write(etc.join("inetrc"), &inetrc)?;
    let certificate = etc.join("ejabberd.pem");
    if !certificate.exists() {
        make_certificate(&etc, &certificate)?;
    }
    run(Command::new("chown")
        .arg("-R")
        .arg("ejabberd:ejabberd")
        .arg(dir))?;
    use sha2::Digest;
    let digest = sha2::Sha256::digest(format!("{yml}\0{ctl}\0{inetrc}").as_bytes());
    Ok(hex::encode(digest.get(..4).unwrap_or_default()))
}

/// A self-signed certificate and its key in one file, as `certfiles` wants.
fn make_certificate(etc: &Path, certificate: &Path) -> Result<()> {
    let key = etc.join("key.tmp");
    let cert = etc.join("cert.tmp");
    run(Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "3650",
        ])
        .args(["-subj", "/CN=localhost", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert))?;
    let mut pem = std::fs::read(&cert)?;
    pem.extend(std::fs::read(&key)?);
    std::fs::write(certificate, pem)?;
    std::fs::remove_file(key)?;
    std::fs::remove_file(cert)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(certificate, std::fs::Permissions::from_mode(0o600))?;
    Ok(())
}

/// Runs a setup command and fails with its output if it fails.
fn run(command: &mut Command) -> Result<String> {
    let output = command
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {command:?}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if !output.status.success() {
        bail!("{command:?} failed ({}): {}", output.status, text.trim());
    }
    Ok(text)
}

/// `ejabberdctl` as the `ejabberd` user on `dir`, with the file limit
/// raised first (`setpriv` keeps it; `su` would reset it), pinned to `cpu`.
fn ejabberdctl(dir: &Path, cpu: Option<u32>, args: &[&str]) -> Command {
    let mut command = Command::new("/bin/sh");
    command
        .arg("-c")
        .arg(format!(
            "ulimit -n {FILE_LIMIT} 2>/dev/null || ulimit -n \"$(ulimit -Hn)\"; exec \"$@\""
        ))
        .arg("ejabberdctl");
    if let Some(cpu) = cpu {
        command.args(["taskset", "-c", &cpu.to_string()]);
    }
    command
        .args([
            "setpriv",
            "--reuid=ejabberd",
            "--regid=ejabberd",
            "--init-groups",
        ])
        .args(["env", &format!("HOME={EJABBERD_HOME}"), EJABBERDCTL])
        .arg("--config-dir")
        .arg(dir.join("etc"))
        .arg("--logs")
        .arg(dir.join("log"))
        .arg("--spool")
        .arg(dir.join("spool"))
        .args(args);
    command
}

fn pid_file(dir: &Path) -> PathBuf {
    dir.join("run").join("ejabberd.pid")
}

fn read_pid(dir: &Path) -> Option<u32> {
    std::fs::read_to_string(pid_file(dir))
        .ok()?
        .trim()
        .parse()
        .ok()
        .filter(|&pid| pid > 0)
}

/// Whether `pid` has exited (a zombie counts: the server is not ours to reap).
fn process_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with(['Z', 'X'])),
    }
}

fn wait_gone(pid: u32, within: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < within {
        if process_gone(pid) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    process_gone(pid)
}

fn kill9(pid: u32, dir: &Path) -> Result<()> {
    if pid > 0 && !process_gone(pid) {
        let _ = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .stderr(Stdio::null())
            .status();
        if !wait_gone(pid, Duration::from_secs(10)) {
            bail!("ejabberd (pid {pid}) survived SIGKILL");
        }
    }
    let _ = std::fs::remove_file(pid_file(dir));
    Ok(())
}

/// A server left running from `dir` by an interrupted run is killed.
fn kill_stale(dir: &Path) -> Result<()> {
    if let Some(pid) = read_pid(dir)
        && !process_gone(pid)
    {
        let command = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if command.trim() == "beam.smp" {
            eprintln!(
                "  ejabberd: killing a server left running from {}",
                dir.display()
            );
            kill9(pid, dir)?;
        }
    }
    let _ = std::fs::remove_file(pid_file(dir));
    Ok(())
}

/// Starts the server, waits until it says it started and listens, and
/// returns the pid of its `beam.smp`.
async fn start_server(dir: &Path, cpu: Option<u32>) -> Result<u32> {
    let owned = dir.to_owned();
    let pid = tokio::task::spawn_blocking(move || -> Result<u32> {
        let dir = owned.as_path();
        let _ = std::fs::remove_file(pid_file(dir));
        // `start` detaches the VM; its output goes to a file so that no pipe
        // is held open by the daemon.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("ejabberdctl.log"))?;
        let status = ejabberdctl(dir, cpu, &["start"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .status()?;
        if !status.success() {
            bail!(
                "ejabberdctl start failed ({status}); see {}/log",
                dir.display()
            );
        }
        let started = run(&mut ejabberdctl(dir, None, &["started"]));
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(30) {
            if let Some(pid) = read_pid(dir) {
                if let Err(error) = started {
                    // Half started: leave nothing behind.
                    let _ = kill9(pid, dir);
                    return Err(error)
                        .context(format!("ejabberd did not start; see {}/log", dir.display()));
                }
                return Ok(pid);
            }
            if started.is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        started.with_context(|| format!("ejabberd did not start; see {}/log", dir.display()))?;
        bail!("ejabberd started but wrote no pid file")
    })
    .await??;
    if let Err(error) =
        wait_listening(SocketAddr::from(HTTP_ADDRESS), Duration::from_secs(60)).await
    {
        let owned = dir.to_owned();
        let _ = tokio::task::spawn_blocking(move || stop_server(&owned, pid)).await;
        return Err(error);
    }
    Ok(pid)
}

/// `ejabberdctl stop`, then SIGKILL if the VM lingers.
fn stop_server(dir: &Path, pid: u32) {
    if pid == 0 || process_gone(pid) {
        return;
    }
    let _ = ejabberdctl(dir, None, &["stop"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if !wait_gone(pid, STOP_TIMEOUT) {
        let _ = kill9(pid, dir);
    }
    let _ = std::fs::remove_file(pid_file(dir));
}

/// Registers `users` on an empty spool and keeps the stopped server's spool
/// as `snapshot`.
async fn build_snapshot(dir: &Path, cpu: Option<u32>, users: u32, snapshot: &Path) -> Result<()> {
    let spool = dir.join("spool");
    if spool.exists() {
        std::fs::remove_dir_all(&spool)?;
    }
    std::fs::create_dir_all(&spool)?;
    run(Command::new("chown").arg("ejabberd:ejabberd").arg(&spool))?;
    eprintln!("registering {users} ejabberd users (once; about 150 per second)");
    let started = Instant::now();
    let pid = start_server(dir, cpu).await?;
    let registered = register_users(users).await;
    let owned = dir.to_owned();
    tokio::task::spawn_blocking(move || stop_server(&owned, pid)).await?;
    registered?;
    let partial = snapshot.with_extension("partial");
    run(Command::new("tar")
        .arg("-C")
        .arg(dir)
        .arg("-cf")
        .arg(&partial)
        .arg("spool"))?;
    std::fs::rename(&partial, snapshot)?;
    eprintln!("  registered in {:.1?}", started.elapsed());
    Ok(())
}

fn restore_spool(dir: &Path, snapshot: &Path) -> Result<()> {
    let spool = dir.join("spool");
    if spool.exists() {
        std::fs::remove_dir_all(&spool)?;
    }
    // As root, tar keeps the owner (ejabberd) and modes.
    run(Command::new("tar")
        .arg("-C")
        .arg(dir)
        .arg("-xpf")
        .arg(snapshot))?;
    Ok(())
}

async fn register_users(users: u32) -> Result<()> {
    let mut requests = futures_util::stream::iter(0..users)
        .map(register)
        .buffer_unordered(REGISTER_PARALLELISM);
    while let Some(result) = requests.next().await {
        result?;
    }
    Ok(())
}

/// One `POST /api/register` (loopback may call it without credentials);
/// "already registered" is fine.
async fn register(index: u32) -> Result<()> {
    let body = serde_json::json!({
        "user": user(index),
        "host": DOMAIN,
        "password": password(index),
    })
    .to_string();
    let request = format!(
        "POST /api/register HTTP/1.1\r\nHost: 127.0.0.1:{}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        HTTP_ADDRESS.1,
        body.len()
    );
    let exchange = async {
        let mut tcp = TcpStream::connect(SocketAddr::from(HTTP_ADDRESS)).await?;
        tcp.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        tcp.read_to_end(&mut response).await?;
        anyhow::Ok(response)
    };
    let response = tokio::time::timeout(Duration::from_secs(60), exchange)
        .await
        .context("no answer to /api/register")??;
    let text = String::from_utf8_lossy(&response);
    match text.split_whitespace().nth(1) {
        Some("200" | "409") => Ok(()),
        _ => bail!("registering {}: {}", user(index), text.trim()),
    }
}

fn user(index: u32) -> String {
    format!("u{index}")
}

fn password(index: u32) -> String {
    format!("p{index}")
}

// ---------------------------------------------------------------------------
// The client.

/// What the writer task sends.
#[derive(Debug)]
enum Out {
    /// A `<message>` the device sends (counted for acknowledgements).
    Message(String),
    /// Stream management traffic (`<a/>`, `<r/>`).
    Control(String),
    /// Acknowledge what was received, close the stream, stop.
    Close,
}

/// Stream management counters of one connection (XEP-0198).
#[derive(Debug, Default)]
struct Counters {
    /// Stanzas received since stream management was enabled.
    received: u64,
    /// Messages written.
    sent: u64,
    /// Messages the server acknowledged.
    acked: u64,
    /// An `<r/>` is outstanding.
    requested: bool,
    /// The device is leaving: what arrives now is neither acknowledged nor
    /// recorded (the server re-routes it to offline storage).
    closing: bool,
}

#[derive(Debug, Default)]
struct Shared {
    counters: Mutex<Counters>,
    alive: AtomicBool,
    /// Wakes the reader when the writer has closed the stream.
    closed: Notify,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Counters> {
        self.counters.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts `messages` written; whether an `<r/>` should follow them.
    fn wrote(&self, messages: u64) -> bool {
        let mut counters = self.lock();
        counters.sent += messages;
        let request = !counters.requested;
        counters.requested = true;
        request
    }

    /// The server handled `h` stanzas: returns how many more messages that
    /// acknowledges and whether to ask again (messages written since).
    fn acknowledged(&self, h: u64) -> (u64, bool) {
        let mut counters = self.lock();
        let acked = h
            .saturating_sub(STANZAS_BEFORE_MESSAGES)
            .min(counters.sent)
            .max(counters.acked);
        let newly = acked - counters.acked;
        counters.acked = acked;
        let again = counters.sent > counters.acked;
        counters.requested = again;
        (newly, again)
    }

    /// Counts a received stanza unless the device is leaving; whether to
    /// process it.
    fn received(&self) -> bool {
        let mut counters = self.lock();
        if counters.closing {
            return false;
        }
        counters.received += 1;
        true
    }
}

/// One logged-in device.
#[derive(Debug)]
struct XmppEndpoint {
    index: u32,
    channels: Arc<Vec<Vec<u32>>>,
    out: mpsc::UnboundedSender<Out>,
    shared: Arc<Shared>,
}

impl XmppEndpoint {
    async fn connect(
        index: u32,
        recorder: Arc<Recorder>,
        channels: Arc<Vec<Vec<u32>>>,
        acks: bool,
    ) -> Result<XmppEndpoint> {
        let tcp = TcpStream::connect(SocketAddr::from(HTTP_ADDRESS)).await?;
        tcp.set_nodelay(true)?;
        let mut request = WS_URL.into_client_request()?;
        request
            .headers_mut()
            .insert("Sec-WebSocket-Protocol", HeaderValue::from_static("xmpp"));
        let config = WebSocketConfig::default()
            .read_buffer_size(4096)
            .write_buffer_size(0)
            .max_message_size(Some(MAX_ELEMENT_BYTES))
            .max_frame_size(Some(MAX_ELEMENT_BYTES));
        let login = async {
            let (mut ws, _) =
                tokio_tungstenite::client_async_with_config(request, tcp, Some(config)).await?;
            let mut elements = Splitter::default();
            log_in(&mut ws, &mut elements, index, acks).await?;
            anyhow::Ok((ws, elements))
        };
        let (ws, elements) = tokio::time::timeout(LOGIN_TIMEOUT, login)
            .await
            .context("login timed out")??;
        let (mut sink, source) = ws.split();
        let (out, mut queue) = mpsc::unbounded_channel::<Out>();
        let shared = Arc::new(Shared {
            alive: AtomicBool::new(true),
            ..Shared::default()
        });

        // Writes are batched: everything queued goes out before one flush,
        // followed by an <r/> unless one is already outstanding.
        let writer_shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let shared = writer_shared;
            'batches: while let Some(first) = queue.recv().await {
                let mut next = Some(first);
                let mut messages = 0u64;
                let mut closing = false;
                while let Some(item) = next.take() {
                    let text = match item {
                        Out::Message(text) => {
                            messages += 1;
                            text
                        }
                        Out::Control(text) => text,
                        Out::Close => {
                            closing = true;
                            break;
                        }
                    };
                    if sink.feed(Message::Text(text.into())).await.is_err() {
                        break 'batches;
                    }
                    next = queue.try_recv().ok();
                }
                if acks
                    && messages > 0
                    && shared.wrote(messages)
                    && sink.feed(Message::Text(REQUEST_ACK.into())).await.is_err()
                {
                    break;
                }
                if closing {
                    let handled = {
                        let mut counters = shared.lock();
                        counters.closing = true;
                        counters.received
                    };
                    if acks {
                        let ack = format!("<a xmlns='urn:xmpp:sm:3' h='{handled}'/>");
                        let _ = sink.feed(Message::Text(ack.into())).await;
                    }
                    let _ = sink.feed(Message::Text(CLOSE.into())).await;
                    let _ = sink.flush().await;
                    break;
                }
                if sink.flush().await.is_err() {
                    break;
                }
            }
            shared.alive.store(false, Ordering::SeqCst);
            shared.closed.notify_one();
        });

        let reader = Reader {
            index,
            recorder,
            shared: Arc::clone(&shared),
            out: out.clone(),
        };
        tokio::spawn(reader.run(source, elements));
        Ok(XmppEndpoint {
            index,
            channels,
            out,
            shared,
        })
    }
}

impl Endpoint for XmppEndpoint {
    fn send(&self, channel: u32, payload: Vec<u8>) {
        let Some(members) = self.channels.get(channel as usize) else {
            return;
        };
        let Some(&to) = members.iter().find(|&&member| member != self.index) else {
            return;
        };
        let body = BASE64.encode(&payload);
        let stanza = format!(
            "<message to='{}@{DOMAIN}' type='chat'><body>{body}</body></message>",
            user(to)
        );
        let _ = self.out.send(Out::Message(stanza));
    }

    fn is_alive(&self) -> bool {
        self.shared.alive.load(Ordering::SeqCst)
    }
}

impl Drop for XmppEndpoint {
    fn drop(&mut self) {
        // The writer acknowledges what was received and closes the stream,
        // so the server neither re-routes nor waits for a timeout.
        let _ = self.out.send(Out::Close);
    }
}

async fn send_text<S>(ws: &mut WebSocketStream<S>, text: &str) -> Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    ws.send(Message::Text(text.into()))
        .await
        .context("sending to ejabberd")
}

/// Reads until a top-level element named like `wanted` arrives, skipping
/// others; a stream error or close fails.
async fn expect<S>(
    ws: &mut WebSocketStream<S>,
    elements: &mut Splitter,
    wanted: &[&str],
) -> Result<String>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    loop {
        while let Some(element) = elements.next_element() {
            let name = element_name(&element);
            if wanted.contains(&name) {
                return Ok(element);
            }
            if matches!(name, "stream:error" | "close") {
                bail!("ejabberd closed the stream: {element}");
            }
        }
        match ws.next().await {
            Some(Ok(Message::Text(text))) => elements.push(text.as_str()),
            Some(Ok(Message::Binary(bytes))) => elements.push(&String::from_utf8_lossy(&bytes)),
            Some(Ok(Message::Close(_))) | None => bail!("ejabberd closed the connection"),
            Some(Ok(_)) => {}
            Some(Err(error)) => return Err(error).context("reading from ejabberd"),
        }
    }
}

/// Open, SASL PLAIN, restart, bind, enable stream management, initial
/// presence (after which the server pushes stored messages).
async fn log_in<S>(
    ws: &mut WebSocketStream<S>,
    elements: &mut Splitter,
    index: u32,
    acks: bool,
) -> Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    send_text(ws, OPEN).await?;
    expect(ws, elements, &["open"]).await?;
    let features = expect(ws, elements, &["stream:features", "features"]).await?;
    if !features.contains("<mechanism>PLAIN</mechanism>") {
        bail!("ejabberd does not offer SASL PLAIN: {features}");
    }
    let token = BASE64.encode(format!("\0{}\0{}", user(index), password(index)));
    send_text(
        ws,
        &format!("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{token}</auth>"),
    )
    .await?;
    let outcome = expect(ws, elements, &["success", "failure"]).await?;
    if element_name(&outcome) != "success" {
        bail!("ejabberd refused the login: {outcome}");
    }
    send_text(ws, OPEN).await?;
    expect(ws, elements, &["open"]).await?;
    let features = expect(ws, elements, &["stream:features", "features"]).await?;
    if acks && !features.contains("urn:xmpp:sm:3") {
        bail!("ejabberd does not offer stream management (mod_stream_mgmt): {features}");
    }
    send_text(
        ws,
        "<iq type='set' id='bind'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>\
         <resource>bench</resource></bind></iq>",
    )
    .await?;
    let bound = expect(ws, elements, &["iq"]).await?;
    if attribute(&bound, "type") != Some("result") {
        bail!("ejabberd refused the resource binding: {bound}");
    }
    if acks {
        send_text(ws, "<enable xmlns='urn:xmpp:sm:3'/>").await?;
        let enabled = expect(ws, elements, &["enabled", "failed"]).await?;
        if element_name(&enabled) != "enabled" {
            bail!("ejabberd refused stream management: {enabled}");
        }
    }
    send_text(ws, "<presence/>").await
}

/// The reading half of a device.
struct Reader {
    index: u32,
    recorder: Arc<Recorder>,
    shared: Arc<Shared>,
    out: mpsc::UnboundedSender<Out>,
}

impl Reader {
    async fn run<S>(self, mut source: SplitStream<WebSocketStream<S>>, mut elements: Splitter)
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let mut deadline: Option<tokio::time::Instant> = None;
        'frames: loop {
            while let Some(element) = elements.next_element() {
                if !self.handle(&element) {
                    break 'frames;
                }
            }
            let next = match deadline {
                None => tokio::select! {
                    next = source.next() => next,
                    () = self.shared.closed.notified() => {
                        deadline = Some(tokio::time::Instant::now() + CLOSE_WAIT);
                        continue;
                    }
                },
                Some(deadline) => match tokio::time::timeout_at(deadline, source.next()).await {
                    Ok(next) => next,
                    Err(_) => break,
                },
            };
            match next {
                Some(Ok(Message::Text(text))) => elements.push(text.as_str()),
                Some(Ok(Message::Binary(bytes))) => elements.push(&String::from_utf8_lossy(&bytes)),
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                Some(Ok(_)) => {}
            }
        }
        self.shared.alive.store(false, Ordering::SeqCst);
    }

    /// Handles one top-level element; false ends the connection.
    fn handle(&self, element: &str) -> bool {
        match element_name(element) {
            // A bounced message (type='error') carries our own body: it is
            // not a delivery.
            "message" if self.shared.received() && attribute(element, "type") != Some("error") => {
                if let Some(payload) = body(element) {
                    self.recorder.delivered(self.index, &payload);
                }
            }
            "message" => {}
            "presence" | "iq" => {
                self.shared.received();
            }
            "r" => {
                let handled = {
                    let counters = self.shared.lock();
                    (!counters.closing).then_some(counters.received)
                };
                if let Some(handled) = handled {
                    let _ = self.out.send(Out::Control(format!(
                        "<a xmlns='urn:xmpp:sm:3' h='{handled}'/>"
                    )));
                }
            }
            "a" => {
                let Some(h) = attribute(element, "h").and_then(|h| h.parse::<u64>().ok()) else {
                    return true;
                };
                let (newly, again) = self.shared.acknowledged(h);
                for _ in 0..newly {
                    self.recorder.note_answer(true, None);
                }
                if again {
                    let _ = self.out.send(Out::Control(REQUEST_ACK.into()));
                }
            }
            "close" | "stream:error" => return false,
            _ => {}
        }
        true
    }
}

// ---------------------------------------------------------------------------
// Just enough XML: top-level elements, names, attributes, the body.

/// Splits received text into complete top-level elements, whether the
/// server puts one per WebSocket frame (RFC 7395, what ejabberd does) or
/// splits or combines them.
#[derive(Debug, Default)]
struct Splitter {
    buffer: String,
    /// Scanned up to here.
    position: usize,
    depth: usize,
    /// Where the element being scanned starts.
    start: Option<usize>,
}

impl Splitter {
    fn push(&mut self, text: &str) {
        if self.buffer.len() + text.len() > MAX_ELEMENT_BYTES {
            // Larger than any stanza the server may send: drop it.
            *self = Splitter::default();
            return;
        }
        self.buffer.push_str(text);
    }

    fn next_element(&mut self) -> Option<String> {
        let bytes = self.buffer.as_bytes();
        loop {
            let rest = bytes.get(self.position..)?;
            let Some(offset) = rest.iter().position(|&b| b == b'<') else {
                // Text: inside an element it is kept; between elements it
                // is whitespace and dropped.
                if self.start.is_none() {
                    self.buffer.clear();
                    self.position = 0;
                }
                return None;
            };
            let open = self.position + offset;
            let close = tag_end(bytes, open)?;
            let tag = bytes.get(open..=close)?;
            let is_end = tag.get(1) == Some(&b'/');
            let is_special = matches!(tag.get(1), Some(b'?' | b'!'));
            let is_empty = tag.len() >= 2 && tag.get(tag.len() - 2) == Some(&b'/');
            self.position = close + 1;
            if is_special {
                continue;
            }
            if self.depth == 0 && !is_end {
                self.start = Some(open);
            }
            if is_end {
                self.depth = self.depth.saturating_sub(1);
            } else if !is_empty {
                self.depth += 1;
            }
            if self.depth == 0
                && let Some(start) = self.start.take()
            {
                let element = self.buffer.get(start..self.position).map(str::to_owned);
                self.buffer.drain(..self.position);
                self.position = 0;
                return element;
            }
        }
    }
}

/// Index of the `>` closing the tag that opens at `open`, skipping quoted
/// attribute values.
fn tag_end(bytes: &[u8], open: usize) -> Option<usize> {
    let mut quote = None;
    for (offset, &byte) in bytes.get(open..)?.iter().enumerate() {
        match (quote, byte) {
            (None, b'"' | b'\'') => quote = Some(byte),
            (Some(q), _) if byte == q => quote = None,
            (None, b'>') => return Some(open + offset),
            _ => {}
        }
    }
    None
}

/// The name of an element's start tag (`message`, `stream:features`).
fn element_name(element: &str) -> &str {
    let after = element.strip_prefix('<').unwrap_or(element);
    let end = after
        .find(|c: char| c.is_whitespace() || c == '/' || c == '>')
        .unwrap_or(after.len());
    after.get(..end).unwrap_or_default()
}

/// An attribute of the element's start tag.
fn attribute<'a>(element: &'a str, name: &str) -> Option<&'a str> {
    let tag = element.get(..tag_end(element.as_bytes(), 0)?)?;
    let mut rest = tag;
    loop {
        let at = rest.find(name)?;
        let before = rest.get(..at)?.chars().next_back();
        let after = rest.get(at + name.len()..)?;
        rest = after;
        if !before.is_some_and(char::is_whitespace) {
            continue;
        }
        let Some(value) = after.trim_start().strip_prefix('=') else {
            continue;
        };
        let value = value.trim_start();
        let quote = value.chars().next().filter(|&c| c == '\'' || c == '"')?;
        let value = value.get(1..)?;
        return value.get(..value.find(quote)?);
    }
}

/// The decoded `<body>` of a message.
fn body(element: &str) -> Option<Vec<u8>> {
    let open = element.find("<body")?;
    let inner = element.get(open..)?;
    let start = open + inner.find('>')? + 1;
    let end = start + element.get(start..)?.find("</body>")?;
    BASE64.decode(element.get(start..end)?.trim()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(chunks: &[&str]) -> Vec<String> {
        let mut splitter = Splitter::default();
        let mut elements = Vec::new();
        for chunk in chunks {
            splitter.push(chunk);
            while let Some(element) = splitter.next_element() {
                elements.push(element);
            }
        }
        elements
    }

    #[test]
    fn elements_are_split_whether_framed_split_or_combined() {
        let message = "<message xmlns='jabber:client' to='u1@localhost' type='chat'>\
                       <body>AAEC</body><delay stamp='x'/></message>";
        let open = "<open xmlns='urn:ietf:params:xml:ns:xmpp-framing' id='a>b'/>";
        assert_eq!(split(&[open, message]), vec![open, message]);
        let (left, right) = message.split_at(30);
        assert_eq!(split(&[left, right]), vec![message]);
        let combined = format!("{message}\n<r xmlns='urn:xmpp:sm:3'/>");
        assert_eq!(
            split(&[&combined]),
            vec![message, "<r xmlns='urn:xmpp:sm:3'/>"]
        );
    }

    #[test]
    fn names_attributes_and_bodies_are_read() {
        let message = "<message type=\"chat\" xml:lang='en'><body>AAEC</body></message>";
        assert_eq!(element_name(message), "message");
        assert_eq!(element_name("<stream:features x='1'>"), "stream:features");
        assert_eq!(attribute(message, "type"), Some("chat"));
        assert_eq!(
            attribute("<a xmlns='urn:xmpp:sm:3' h='42'/>", "h"),
            Some("42")
        );
        assert_eq!(attribute("<a xmlns='urn:xmpp:sm:3'/>", "h"), None);
        assert_eq!(body(message), Some(vec![0, 1, 2]));
    }

    #[test]
    fn hostile_input_does_not_panic() {
        for input in [
            "<",
            "</",
            "<a/",
            "<>",
            "</x></y><z",
            "<a b='",
            "\u{e9}<\u{e9}>",
        ] {
            let _ = split(&[input, input]);
            let _ = attribute(input, "h");
            let _ = body(input);
            let _ = element_name(input);
        }
    }
}
