//! A real server on 127.0.0.1 and real devices, for integration tests.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tempfile::TempDir;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use umbra_client::{
    AccountId, ActivationString, Client, ClientOptions, ConversationId, Event, KdfParams,
    Passphrase,
};
use umbra_server::{Config, Direction, PushWindow, ServerOptions};

/// How long a test waits for something that should happen promptly.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// Frames the server received or sent, in order.
pub type Frames = Arc<Mutex<Vec<(Direction, Vec<u8>)>>>;

/// What a test is shown of each frame (see [`TestServer::start_in_watched`]).
pub type Watch = Arc<dyn Fn(Direction, &[u8]) + Send + Sync>;

/// A server running on its own runtime and thread, so that a test can stop
/// it cleanly and start it again on the same data. (A test that kills a
/// server uses [`ServerProcess`]: a real process, really killed.)
pub struct TestServer {
    pub data: PathBuf,
    pub address: SocketAddr,
    pub frames: Frames,
    /// Notified, the server reads its TLS certificate again (SIGHUP to a
    /// real process).
    pub reload_tls: Arc<tokio::sync::Notify>,
    /// Where metrics are served, once bound, when the configuration sets
    /// `metrics_listen`.
    pub metrics: Arc<std::sync::OnceLock<SocketAddr>>,
    shutdown: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
    _dir: Option<TempDir>,
}

impl TestServer {
    pub async fn start() -> TestServer {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("server");
        let mut server = TestServer::start_in(&data, "127.0.0.1:0".parse().unwrap()).await;
        server._dir = Some(dir);
        server
    }

    /// A server whose configuration `adjust` changed first.
    pub async fn start_configured(adjust: impl FnOnce(&mut Config) + Send + 'static) -> TestServer {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("server");
        let mut server = TestServer::start_full(
            &data,
            "127.0.0.1:0".parse().unwrap(),
            Arc::new(umbra_server::SystemClock),
            PushWindow::default(),
            Box::new(adjust),
            None,
        )
        .await;
        server._dir = Some(dir);
        server
    }

    /// A server whose clock the test moves.
    pub async fn start_with_clock(clock: umbra_client::ManualClock) -> TestServer {
        TestServer::start_with_clock_configured(clock, |_| {}).await
    }

    /// A server on `clock` whose configuration `adjust` changed first.
    pub async fn start_with_clock_configured(
        clock: umbra_client::ManualClock,
        adjust: impl FnOnce(&mut Config) + Send + 'static,
    ) -> TestServer {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("server");
        let mut server = TestServer::start_full(
            &data,
            "127.0.0.1:0".parse().unwrap(),
            Arc::new(clock),
            PushWindow::default(),
            Box::new(adjust),
            None,
        )
        .await;
        server._dir = Some(dir);
        server
    }

    /// Starts a server on `data` (initialised if new) at `address`.
    pub async fn start_in(data: &Path, address: SocketAddr) -> TestServer {
        TestServer::start_with_window(data, address, PushWindow::default()).await
    }

    /// Starts a server on `data` at `address` that shows `watch` every
    /// frame it receives or sends, as it comes and before it is acted on.
    pub async fn start_in_watched(data: &Path, address: SocketAddr, watch: Watch) -> TestServer {
        TestServer::start_full(
            data,
            address,
            Arc::new(umbra_server::SystemClock),
            PushWindow::default(),
            Box::new(|_| {}),
            Some(watch),
        )
        .await
    }

    /// Starts a server on `data` at `address` with this push window
    /// ([`PushWindow::UNBOUNDED`]: one that floods its devices).
    pub async fn start_with_window(
        data: &Path,
        address: SocketAddr,
        window: PushWindow,
    ) -> TestServer {
        TestServer::start_full(
            data,
            address,
            Arc::new(umbra_server::SystemClock),
            window,
            Box::new(|_| {}),
            None,
        )
        .await
    }

    async fn start_full(
        data: &Path,
        address: SocketAddr,
        clock: Arc<dyn umbra_server::Clock>,
        push_window: PushWindow,
        adjust: Box<dyn FnOnce(&mut Config) + Send>,
        watch: Option<Watch>,
    ) -> TestServer {
        umbra_server::init(data, "127.0.0.1:0").unwrap();
        let mut config = Config::load(data).unwrap();
        adjust(&mut config);
        // Create and migrate the database before anything else opens it
        // (a PostgreSQL one is migrated by the server as it starts).
        if config.postgres_url().is_none() {
            drop(umbra_server::open_store(data, &config).unwrap());
        }
        let listener = std::net::TcpListener::bind(address).unwrap();
        listener.set_nonblocking(true).unwrap();
        let address = listener.local_addr().unwrap();
        config.public_address = address.to_string();
        let frames: Frames = Arc::default();
        let reload_tls = Arc::new(tokio::sync::Notify::new());
        let metrics = Arc::new(std::sync::OnceLock::new());
        let tap_frames = Arc::clone(&frames);
        let options = ServerOptions {
            tap: Some(Arc::new(move |direction, bytes: &[u8]| {
                if let Some(watch) = &watch {
                    watch(direction, bytes);
                }
                tap_frames.lock().unwrap().push((direction, bytes.to_vec()));
            })),
            clock,
            push_window,
            metrics_bound: Some(Arc::clone(&metrics)),
            reload_tls: Arc::clone(&reload_tls),
        };
        let shutdown = CancellationToken::new();
        let (token, data_dir) = (shutdown.clone(), data.to_owned());
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                umbra_server::run(config, data_dir, listener, token, options)
                    .await
                    .unwrap();
            });
            runtime.shutdown_background();
        });
        TestServer {
            data: data.to_owned(),
            address,
            frames,
            reload_tls,
            metrics,
            shutdown,
            thread: Some(thread),
            _dir: None,
        }
    }

    pub async fn activation(&self) -> ActivationString {
        activation_at(&self.data, self.address).await
    }

    /// Stops cleanly: connections finish their request and close. Returns
    /// the temporary directory holding the data, if the server made one.
    pub fn stop(mut self) -> Option<TempDir> {
        self.shutdown.cancel();
        if let Some(thread) = self.thread.take() {
            thread.join().unwrap();
        }
        self._dir.take()
    }

    /// Stops the server and opens its store, as an operator with the disk
    /// would (a hostile server's tests write into it); start it again with
    /// [`TestServer::start_in`] on the data directory and address returned.
    pub fn seize(
        self,
    ) -> (
        PathBuf,
        SocketAddr,
        umbra_store::sqlite::SqliteStore,
        Option<TempDir>,
    ) {
        let (data, address) = (self.data.clone(), self.address);
        let dir = self.stop();
        let config = Config::load(&data).unwrap();
        let store = umbra_server::open_store(&data, &config).unwrap();
        (data, address, store, dir)
    }

    /// Hands out every one-time KeyPackage of `account`'s device 1, from
    /// a seized server's store, so the next fetch gets its last-resort one
    /// (or, with nothing left, what a test plants).
    pub async fn use_up_key_packages(
        store: &umbra_store::sqlite::SqliteStore,
        account: &umbra_client::AccountId,
    ) {
        use umbra_store::KeyPackages as _;
        while let Some((_, last_resort)) = store
            .take_key_package(
                account,
                umbra_proto::DeviceId::FIRST,
                umbra_mls::Suite::default().code(),
            )
            .await
            .unwrap()
        {
            if last_resort {
                break;
            }
        }
    }

    /// Every frame the server received or sent so far.
    pub fn frames(&self) -> Vec<(Direction, Vec<u8>)> {
        self.frames.lock().unwrap().clone()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

pub fn options() -> ClientOptions {
    ClientOptions {
        kdf: KdfParams::insecure_for_tests(),
        key_package_batch: 5,
        // Receipts at once: tests that wait for "delivered" need not wait
        // out a random delay (`receipts_wait_and_leave_together` tests it).
        receipt_delay: std::time::Duration::ZERO..=std::time::Duration::ZERO,
        ..ClientOptions::default()
    }
}

pub fn passphrase() -> Passphrase {
    Passphrase::new("correct horse battery staple")
}

/// A device with its event stream, subscribed before it connected.
pub struct Device {
    pub home: TempDir,
    pub client: Client,
    pub events: broadcast::Receiver<Event>,
    pub wipe_code: Option<umbra_client::WipeCode>,
}

impl Device {
    /// A device on the real clock, with disappearing messages off by
    /// default (a 30-second timer on the real clock would be a hidden time
    /// limit on every test on a busy machine; tests about timers use a
    /// `ManualClock` and [`Device::activate_with`]).
    pub async fn activate(server: &TestServer) -> Device {
        Device::activate_untimed(&server.activation().await, options()).await
    }

    /// [`Device::activate_with`], then the default timer turned off.
    pub async fn activate_untimed(activation: &ActivationString, options: ClientOptions) -> Device {
        let device = Device::activate_with(activation, options).await;
        device.client.set_default_disappearing(None).unwrap();
        device
    }

    /// Activates a device from an activation string with these options.
    pub async fn activate_with(activation: &ActivationString, options: ClientOptions) -> Device {
        let home = tempfile::tempdir().unwrap();
        let (client, wipe_code) = Client::activate(home.path(), &passphrase(), activation, options)
            .await
            .unwrap();
        let events = client.subscribe();
        client.sync().await.unwrap();
        Device {
            home,
            client,
            events,
            wipe_code: Some(wipe_code),
        }
    }

    pub fn id(&self) -> AccountId {
        self.client.account().clone()
    }

    /// Waits for the first event that `pick` maps to a value.
    pub async fn wait_for<T>(&mut self, pick: impl FnMut(&Event) -> Option<T>) -> T {
        self.wait_for_within(PATIENCE, pick).await
    }

    /// [`Device::wait_for`], giving up after `patience` (for work that
    /// takes long on a loaded machine, such as a hundred devices each
    /// joining a post-quantum group at once).
    pub async fn wait_for_within<T>(
        &mut self,
        patience: Duration,
        mut pick: impl FnMut(&Event) -> Option<T>,
    ) -> T {
        let deadline = tokio::time::Instant::now() + patience;
        loop {
            let event = tokio::time::timeout_at(deadline, self.events.recv())
                .await
                .expect("timed out waiting for an event")
                .expect("event stream closed");
            if let Some(value) = pick(&event) {
                return value;
            }
        }
    }

    /// Waits for the next text message and returns (sender, body).
    pub async fn next_text(&mut self) -> (AccountId, String) {
        let message = self.next_message().await;
        (message.sender, message.body)
    }

    /// Waits for the next text message (not a line about a group).
    pub async fn next_message(&mut self) -> umbra_client::Message {
        self.wait_for(|event| match event {
            Event::MessageReceived { message }
                if message.direction == umbra_client::Direction::In =>
            {
                Some(message.clone())
            }
            _ => None,
        })
        .await
    }

    /// Closes this device and opens it again from its store, connected.
    pub async fn reopen(self) -> Device {
        let device = self.reopen_offline();
        device.client.connect().await.unwrap();
        device
    }

    /// Closes this device and opens it again from its store, not connected.
    pub fn reopen_offline(self) -> Device {
        let Device {
            home,
            client,
            wipe_code,
            ..
        } = self;
        client.disconnect();
        drop(client);
        let client = Client::open(home.path(), &passphrase(), options()).unwrap();
        let events = client.subscribe();
        Device {
            home,
            client,
            events,
            wipe_code,
        }
    }
}

/// Whether `result` is the server's plain refusal of a revoked line (no
/// erasure, nothing else).
pub fn refused_as_revoked<T>(result: &Result<T, umbra_client::ClientError>) -> bool {
    matches!(
        result,
        Err(umbra_client::ClientError::Server {
            code: umbra_client::ErrorCode::LineRevoked,
            ..
        })
    )
}

/// Makes `a` and `b` contacts; returns the conversation as each sees it.
pub async fn befriend(a: &mut Device, b: &mut Device) -> (ConversationId, ConversationId) {
    a.client.add_contact(&b.id()).await.unwrap();
    let from = b
        .wait_for(|e| match e {
            Event::ContactRequest { from } => Some(from.clone()),
            _ => None,
        })
        .await;
    assert_eq!(from, a.id());
    let b_side = b.client.accept_contact(&a.id()).await.unwrap();
    let a_side = a
        .wait_for(|e| match e {
            Event::ConversationStarted { conversation } => Some(conversation.id.clone()),
            _ => None,
        })
        .await;
    assert_eq!(a_side, b_side, "both see the same group");
    (a_side, b_side)
}

/// The value of counter `name` (without `_total`) in the metrics of the
/// server whose metrics listener is at `address`.
pub async fn counter(address: SocketAddr, name: &str) -> u64 {
    sample(address, &format!("umbra_{name}_total")).await
}

/// The value of `series` (a metric's full name, with its labels) in the
/// metrics of the server whose metrics listener is at `address`.
pub async fn sample(address: SocketAddr, series: &str) -> u64 {
    let text = scrape(address).await.unwrap();
    let line = format!("{series} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&line))
        .unwrap_or_else(|| panic!("no {line} in {text}"))
        .trim()
        .parse()
        .unwrap()
}

/// The metrics text of the server whose metrics listener is at `address`
/// (an error if it does not listen, yet or any more).
pub async fn scrape(address: SocketAddr) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address).await?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: umbra\r\nConnection: close\r\n\r\n")
        .await?;
    let mut text = String::new();
    stream.read_to_string(&mut text).await?;
    Ok(text)
}

/// A one-time activation string from the server whose data is at `data`,
/// pointing devices at `address`.
pub async fn activation_at(data: &Path, address: SocketAddr) -> ActivationString {
    let mut config = Config::load(data).unwrap();
    config.public_address = address.to_string();
    let mut strings = umbra_server::admin::issue_codes(data, &config, 30, 1, now())
        .await
        .unwrap();
    strings.pop().unwrap()
}

/// The real `umbra-server` binary as its own process, for tests that kill it
/// (SIGKILL: no destructor, no flush, the store's writer thread stops
/// wherever it is).
pub struct ServerProcess {
    pub data: PathBuf,
    pub address: SocketAddr,
    child: std::process::Child,
}

impl ServerProcess {
    /// The binary, built beside the test binaries by a workspace build
    /// (`./scripts/test` builds it).
    fn binary() -> PathBuf {
        let test = std::env::current_exe().unwrap();
        let dir = test.parent().and_then(Path::parent).unwrap();
        let binary = dir.join("umbra-server");
        assert!(
            binary.exists(),
            "{} is missing: build the workspace (`cargo build --workspace`) or run ./scripts/test",
            binary.display()
        );
        binary
    }

    /// Starts the server on `data` (initialised if new) on a free loopback
    /// port, or on `address` again; returns once it accepts connections.
    pub async fn start(data: &Path, address: Option<SocketAddr>) -> ServerProcess {
        ServerProcess::start_with_env(data, address, &[]).await
    }

    /// [`ServerProcess::start`] with these environment variables set.
    pub async fn start_with_env(
        data: &Path,
        address: Option<SocketAddr>,
        env: &[(&str, &str)],
    ) -> ServerProcess {
        let address = address.unwrap_or_else(|| {
            let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            probe.local_addr().unwrap()
        });
        umbra_server::init(data, &address.to_string()).unwrap();
        let child = std::process::Command::new(ServerProcess::binary())
            .arg("--data")
            .arg(data)
            .arg("run")
            .env("UMBRA_LISTEN", address.to_string())
            .env("UMBRA_PUBLIC_ADDRESS", address.to_string())
            .env("UMBRA_LOG", "warn")
            .envs(env.iter().copied())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while tokio::net::TcpStream::connect(address).await.is_err() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the server process never listened"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        ServerProcess {
            data: data.to_owned(),
            address,
            child,
        }
    }

    pub async fn activation(&self) -> ActivationString {
        activation_at(&self.data, self.address).await
    }

    /// Sends the process `signal` (a name `kill` knows: `HUP`, ...).
    pub fn signal(&self, signal: &str) {
        let status = std::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success(), "kill -{signal} failed");
    }

    /// Runs the real `umbra-server` binary on this data directory with
    /// `arguments` (an `admin` command, say) and returns its standard
    /// output; panics with its error output if it fails.
    pub fn command(&self, arguments: &[&str]) -> String {
        let output = std::process::Command::new(ServerProcess::binary())
            .arg("--data")
            .arg(&self.data)
            .args(arguments)
            .env("UMBRA_PUBLIC_ADDRESS", self.address.to_string())
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "umbra-server {arguments:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    }

    /// SIGKILL, and waits for the process to be gone.
    pub fn kill(mut self) -> (PathBuf, SocketAddr) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        (self.data.clone(), self.address)
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
