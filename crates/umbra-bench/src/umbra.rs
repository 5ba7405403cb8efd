//! Umbra as a system under test: the real `umbra-server` binary in its own
//! process, and simulated devices that set up accounts, contacts and MLS
//! groups over the real protocol once, then reuse that state run after run.

use std::collections::{BTreeMap, HashSet};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use umbra_mls::{DeviceSigner, Group, GroupConfig, Provider, Suite};
use umbra_proto::frame::CommitSubmission;
use umbra_proto::{
    AccountId, CertFingerprint, DeliveryKind, GroupId, Reply, Request, login_signing_payload,
    register_signing_payload,
};

use crate::conn::{Conn, Dial};
use crate::recorder::Recorder;
use crate::system::{Endpoint, System, Topology};

/// Members added per commit while building a large group.
const ADD_BATCH: usize = 100;
/// Setup requests in flight at once.
const SETUP_PARALLELISM: usize = 256;
/// How long a device may take to receive its stored backlog on login.
const SYNC_TIMEOUT: Duration = Duration::from_secs(600);

/// Where the server binary is and how to run it.
#[derive(Debug, Clone)]
pub struct ServerSpec {
    pub bin: PathBuf,
    pub tls: bool,
    /// Pin the server to this CPU (with `taskset`).
    pub cpu: Option<u32>,
}

/// A running `umbra-server` process.
#[derive(Debug)]
pub struct ServerProcess {
    spec: ServerSpec,
    data_dir: PathBuf,
    pub address: SocketAddr,
    child: Child,
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Runs `program args` pinned to `cpu` when `taskset` is available.
pub fn pinned_command(program: &Path, cpu: Option<u32>) -> Command {
    match cpu {
        Some(cpu) if Path::new("/usr/bin/taskset").exists() => {
            let mut command = Command::new("/usr/bin/taskset");
            command.arg("-c").arg(cpu.to_string()).arg(program);
            command
        }
        _ => Command::new(program),
    }
}

/// Waits until something accepts TCP connections on `address`.
pub async fn wait_listening(address: SocketAddr, within: Duration) -> Result<()> {
    let start = Instant::now();
    while start.elapsed() < within {
        if tokio::net::TcpStream::connect(address).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("nothing listening on {address} after {within:?}")
}

impl ServerProcess {
    pub async fn start(spec: &ServerSpec, data_dir: &Path) -> Result<ServerProcess> {
        let address = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let child = ServerProcess::spawn(spec, data_dir, address)?;
        let server = ServerProcess {
            spec: spec.clone(),
            data_dir: data_dir.to_owned(),
            address,
            child,
        };
        wait_listening(address, Duration::from_secs(60)).await?;
        Ok(server)
    }

    fn spawn(spec: &ServerSpec, data_dir: &Path, address: SocketAddr) -> Result<Child> {
        let log = std::fs::File::create(data_dir.with_extension("log"))?;
        pinned_command(&spec.bin, spec.cpu)
            .arg("--data")
            .arg(data_dir)
            .arg("run")
            .env("UMBRA_LISTEN", address.to_string())
            .env("UMBRA_TLS", spec.tls.to_string())
            .env("UMBRA_MAX_CONNECTIONS", "60000")
            // Every simulated device connects from loopback, and one
            // sender offers the whole fan-out rate: the per-address and
            // per-connection limits meant for real clients are lifted.
            .env("UMBRA_MAX_CONNECTIONS_PER_ADDRESS", "60000")
            .env("UMBRA_REQUESTS_PER_SECOND", "10000000")
            .env("UMBRA_DELIVERY_BYTES_PER_HOUR", "1000000000000000")
            .env("UMBRA_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", spec.bin.display()))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: no chance to flush anything.
    pub fn kill9(&mut self) -> Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    /// SIGTERM and wait: the server's graceful shutdown.
    pub fn stop(&mut self) -> Result<()> {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(30) {
            if self.child.try_wait()?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill9()
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Everything the generator needs to act as the fixture's devices.
#[derive(Debug, Serialize, Deserialize)]
pub struct Fixture {
    pub topology: Topology,
    pub pin: String,
    /// Per device: hex secret key and account ID.
    pub devices: Vec<(String, String)>,
    pub channels: Vec<FixtureChannel>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct FixtureChannel {
    pub group_id: String,
    /// Payload size asked for → hex of a real MLS application message of
    /// (about) that size for this group.
    pub templates: BTreeMap<usize, String>,
}

struct SetupDevice {
    signer: DeviceSigner,
    account: AccountId,
    conn: Conn,
}

fn random_secret() -> Result<[u8; 32]> {
    let mut secret = [0u8; 32];
    getrandom::getrandom(&mut secret).context("no randomness")?;
    Ok(secret)
}

fn mls_storage() -> Result<rusqlite::Connection> {
    let mut connection = rusqlite::Connection::open_in_memory()?;
    umbra_mls::init_storage(&mut connection)?;
    Ok(connection)
}

async fn parallel<T, F, Fut>(items: Vec<T>, work: F) -> Result<()>
where
    T: Send + 'static,
    F: Fn(T) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<()>> + Send + 'static,
{
    let permits = Arc::new(Semaphore::new(SETUP_PARALLELISM));
    let work = Arc::new(work);
    let mut tasks = Vec::with_capacity(items.len());
    for item in items {
        let permit = Arc::clone(&permits).acquire_owned().await?;
        let work = Arc::clone(&work);
        tasks.push(tokio::spawn(async move {
            let _permit = permit;
            work(item).await
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(())
}

/// Builds a fixture over the real protocol: registers every device with an
/// activation code, uploads KeyPackages, makes contacts, creates each
/// channel's MLS group and adds its members, and encrypts one message per
/// payload size per channel. Leaves the server's data in `data_dir`.
pub async fn build_fixture(
    spec: &ServerSpec,
    data_dir: &Path,
    topology: &Topology,
    sizes: &[usize],
) -> Result<Fixture> {
    let started = Instant::now();
    umbra_server::init(data_dir, "127.0.0.1:7443")?;
    let config = umbra_server::Config::load(data_dir)?;
    let now = crate::stamp::now_ns() / 1_000_000_000;
    let codes =
        umbra_server::admin::issue_codes(data_dir, &config, 3650, topology.devices as usize, now)
            .await?;
    let pin: CertFingerprint = codes.first().map_or(CertFingerprint([0; 32]), |c| c.pin);
    let mut server = ServerProcess::start(spec, data_dir).await?;
    let dial = dial(server.address, spec.tls, pin)?;

    // Who needs how many KeyPackages: one per channel they are added to.
    let mut wanted = vec![0usize; topology.devices as usize];
    for members in &topology.channels {
        for &member in members.iter().skip(1) {
            if let Some(count) = wanted.get_mut(member as usize) {
                *count += 1;
            }
        }
    }

    // Register and upload.
    let slots: Arc<Vec<Mutex<Option<Arc<SetupDevice>>>>> =
        Arc::new((0..topology.devices).map(|_| Mutex::new(None)).collect());
    let jobs: Vec<_> = codes.into_iter().zip(wanted).enumerate().collect();
    {
        let slots = Arc::clone(&slots);
        let dial = dial.clone();
        parallel(jobs, move |(index, (code, key_packages))| {
            let slots = Arc::clone(&slots);
            let dial = dial.clone();
            async move {
                let secret = random_secret()?;
                let signer = DeviceSigner::from_secret(&secret);
                let conn = Conn::open(&dial, index as u32, Arc::new(Recorder::new())).await?;
                let identity_key = signer.identity_key();
                let signature =
                    signer.sign_payload(&register_signing_payload(&conn.nonce, &identity_key));
                let Reply::Registered { account_id, .. } = conn
                    .request(Request::Register {
                        activation_code: code.code,
                        identity_key,
                        signature,
                    })
                    .await?
                else {
                    bail!("unexpected reply to Register");
                };
                if key_packages > 0 {
                    let packages = {
                        let crypto = umbra_mls::Crypto::default();
                        let storage = mls_storage()?;
                        let provider = Provider::new(&crypto, &storage);
                        (0..key_packages)
                            .map(|_| {
                                umbra_mls::new_key_package(
                                    &provider,
                                    &signer,
                                    &account_id,
                                    Suite::default(),
                                    false,
                                )
                            })
                            .collect::<Result<Vec<_>, _>>()?
                    };
                    for chunk in packages.chunks(umbra_proto::frame::MAX_KEY_PACKAGES_PER_UPLOAD) {
                        conn.request(Request::UploadKeyPackages {
                            key_packages: chunk.to_vec(),
                            last_resort: None,
                        })
                        .await?;
                    }
                }
                let device = SetupDevice {
                    signer,
                    account: account_id,
                    conn,
                };
                if let Some(slot) = slots.get(index) {
                    *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(device));
                }
                Ok(())
            }
        })
        .await?;
    }
    let devices: Arc<Vec<Arc<SetupDevice>>> = Arc::new(
        slots
            .iter()
            .map(|slot| slot.lock().unwrap_or_else(|p| p.into_inner()).clone())
            .collect::<Option<Vec<_>>>()
            .context("a device was not registered")?,
    );
    eprintln!(
        "  registered {} devices in {:.1?}",
        devices.len(),
        started.elapsed()
    );

    // Contacts: each channel's creator and each other member.
    let mut pairs = HashSet::new();
    for members in &topology.channels {
        if let Some((&creator, rest)) = members.split_first() {
            for &member in rest {
                pairs.insert((creator, member));
            }
        }
    }
    {
        let devices = Arc::clone(&devices);
        parallel(pairs.into_iter().collect(), move |(from, to)| {
            let devices = Arc::clone(&devices);
            async move {
                let (Some(from), Some(to)) = (devices.get(from as usize), devices.get(to as usize))
                else {
                    bail!("channel member out of range");
                };
                from.conn
                    .request(Request::SendContactRequest {
                        to: to.account.clone(),
                    })
                    .await?;
                to.conn
                    .request(Request::AcceptContact {
                        from: from.account.clone(),
                    })
                    .await?;
                Ok(())
            }
        })
        .await?;
    }

    // Groups and message templates.
    let channels: Arc<Vec<Mutex<Option<FixtureChannel>>>> =
        Arc::new(topology.channels.iter().map(|_| Mutex::new(None)).collect());
    {
        let devices = Arc::clone(&devices);
        let channels = Arc::clone(&channels);
        let sizes = sizes.to_vec();
        let jobs: Vec<_> = topology.channels.clone().into_iter().enumerate().collect();
        parallel(jobs, move |(index, members)| {
            let devices = Arc::clone(&devices);
            let channels = Arc::clone(&channels);
            let sizes = sizes.clone();
            async move {
                let channel = build_group(&devices, &members, &sizes).await?;
                if let Some(slot) = channels.get(index) {
                    *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(channel);
                }
                Ok(())
            }
        })
        .await?;
    }
    let channels = channels
        .iter()
        .map(|slot| slot.lock().unwrap_or_else(|p| p.into_inner()).take())
        .collect::<Option<Vec<_>>>()
        .context("a channel was not built")?;
    let devices_out = devices
        .iter()
        .map(|d| (hex::encode(*d.signer.secret_bytes()), d.account.to_string()))
        .collect();
    drop(devices);
    server.stop()?;
    eprintln!("  fixture built in {:.1?}", started.elapsed());
    Ok(Fixture {
        topology: topology.clone(),
        pin: hex::encode(pin.0),
        devices: devices_out,
        channels,
    })
}

async fn build_group(
    devices: &[Arc<SetupDevice>],
    members: &[u32],
    sizes: &[usize],
) -> Result<FixtureChannel> {
    let device = |index: u32| devices.get(index as usize).context("member out of range");
    let Some((&creator, rest)) = members.split_first() else {
        bail!("empty channel");
    };
    let creator = device(creator)?;
    let crypto = umbra_mls::Crypto::default();
    let storage = mls_storage()?;
    let config = GroupConfig::default();
    let mut group = {
        let provider = Provider::new(&crypto, &storage);
        Group::create(&provider, &creator.signer, &creator.account, &config, 0)?
    };
    let group_id = GroupId::new(group.id())?;
    let group_info = {
        let provider = Provider::new(&crypto, &storage);
        group.group_info(&provider, &creator.signer)?
    };
    creator
        .conn
        .request(Request::CreateGroup {
            group_id: group_id.clone(),
            group_info,
        })
        .await?;
    for batch in rest.chunks(ADD_BATCH) {
        let mut key_packages = Vec::with_capacity(batch.len());
        for &member in batch {
            let account = device(member)?.account.clone();
            let Reply::KeyPackage { key_package, .. } = creator
                .conn
                .request(Request::FetchKeyPackage {
                    account_id: account.clone(),
                    device: umbra_proto::DeviceId::FIRST,
                })
                .await?
            else {
                bail!("unexpected reply to FetchKeyPackage");
            };
            key_packages.push(key_package);
        }
        let output = {
            let provider = Provider::new(&crypto, &storage);
            group.add_members(&provider, &creator.signer, &key_packages)?
        };
        creator
            .conn
            .request(Request::SendCommit(CommitSubmission {
                group_id: group_id.clone(),
                epoch: output.epoch,
                commit: output.commit,
                welcome: output.welcome,
                group_info: output.group_info,
            }))
            .await?;
        let provider = Provider::new(&crypto, &storage);
        group.merge_pending_commit(&provider)?;
    }
    let provider = Provider::new(&crypto, &storage);
    let overhead = group.encrypt(&provider, &creator.signer, b"")?.len();
    let mut templates = BTreeMap::new();
    for &size in sizes {
        let plaintext = vec![0x5Au8; size.saturating_sub(overhead)];
        let message = group.encrypt(&provider, &creator.signer, &plaintext)?;
        templates.insert(size, hex::encode(message));
    }
    Ok(FixtureChannel {
        group_id: hex::encode(group_id.as_bytes()),
        templates,
    })
}

/// How to reach a server with this pin.
pub fn dial(address: SocketAddr, tls: bool, pin: CertFingerprint) -> Result<Dial> {
    Ok(Dial {
        address,
        tls: if tls {
            Some(Arc::new(umbra_client::pinned_tls_config(pin)?))
        } else {
            None
        },
    })
}

/// Copies a data directory (the fixture's pristine server state).
pub fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    if to.exists() {
        std::fs::remove_dir_all(to)?;
    }
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

/// Umbra under test: a server started on a copy of a fixture's data.
pub struct UmbraSystem {
    pub server: Mutex<ServerProcess>,
    dial: Dial,
    tls: bool,
    signers: Vec<(DeviceSigner, AccountId)>,
    groups: Arc<Vec<GroupId>>,
    templates: Vec<BTreeMap<usize, Vec<u8>>>,
}

impl std::fmt::Debug for UmbraSystem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UmbraSystem")
            .field("address", &self.dial.address)
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

impl UmbraSystem {
    /// Builds the fixture for `topology` under `cache` if it is not there
    /// yet, copies its server data to a fresh directory and starts the server.
    pub async fn prepare(
        spec: &ServerSpec,
        cache: &Path,
        topology: &Topology,
        sizes: &[usize],
    ) -> Result<UmbraSystem> {
        let key = serde_json::to_vec(&(topology, sizes, spec.tls))?;
        let digest = hex::encode(&sha256(&key)[..8]);
        let dir = cache.join(format!("umbra-fixture-{digest}"));
        let pristine = dir.join("pristine");
        let fixture_file = dir.join("fixture.json");
        if !fixture_file.exists() {
            if dir.exists() {
                std::fs::remove_dir_all(&dir)?;
            }
            std::fs::create_dir_all(&dir)?;
            eprintln!(
                "building an Umbra fixture: {} devices, {} channels",
                topology.devices,
                topology.channels.len()
            );
            let fixture = build_fixture(spec, &pristine, topology, sizes).await?;
            std::fs::write(&fixture_file, serde_json::to_vec(&fixture)?)?;
        }
        let fixture: Fixture = serde_json::from_slice(&std::fs::read(&fixture_file)?)?;
        let run = dir.join("run");
        copy_dir(&pristine, &run)?;
        let server = ServerProcess::start(spec, &run).await?;
        UmbraSystem::from_fixture(server, &fixture, spec.tls)
    }

    fn from_fixture(server: ServerProcess, fixture: &Fixture, tls: bool) -> Result<UmbraSystem> {
        let pin: [u8; 32] = hex::decode(&fixture.pin)?
            .try_into()
            .map_err(|_| anyhow::anyhow!("bad pin in fixture"))?;
        let signers = fixture
            .devices
            .iter()
            .map(|(secret, account)| {
                let secret: [u8; 32] = hex::decode(secret)?
                    .try_into()
                    .map_err(|_| anyhow::anyhow!("bad secret in fixture"))?;
                Ok((
                    DeviceSigner::from_secret(&secret),
                    AccountId::parse(account)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        let groups = fixture
            .channels
            .iter()
            .map(|c| Ok(GroupId::new(hex::decode(&c.group_id)?)?))
            .collect::<Result<Vec<_>>>()?;
        let templates = fixture
            .channels
            .iter()
            .map(|c| {
                c.templates
                    .iter()
                    .map(|(size, bytes)| Ok((*size, hex::decode(bytes)?)))
                    .collect::<Result<BTreeMap<_, _>>>()
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(UmbraSystem {
            dial: dial(server.address, tls, CertFingerprint(pin))?,
            server: Mutex::new(server),
            tls,
            signers,
            groups: Arc::new(groups),
            templates,
        })
    }

    fn lock_server(&self) -> std::sync::MutexGuard<'_, ServerProcess> {
        self.server.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn kill9(&self) -> Result<()> {
        self.lock_server().kill9()
    }

    pub async fn restart(&self) -> Result<()> {
        let (spec, data_dir, address) = {
            let server = self.lock_server();
            (server.spec.clone(), server.data_dir.clone(), server.address)
        };
        let child = ServerProcess::spawn(&spec, &data_dir, address)?;
        self.lock_server().child = child;
        wait_listening(address, Duration::from_secs(60)).await
    }
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).into()
}

struct UmbraEndpoint {
    conn: Conn,
    groups: Arc<Vec<GroupId>>,
}

impl Endpoint for UmbraEndpoint {
    fn send(&self, channel: u32, payload: Vec<u8>) {
        if let Some(group_id) = self.groups.get(channel as usize) {
            self.conn.fire(Request::SendMessage {
                group_id: group_id.clone(),
                message: payload,
                kind: DeliveryKind::Application,
                ttl_seconds: 0,
            });
        }
    }

    fn is_alive(&self) -> bool {
        self.conn.is_alive()
    }
}

#[async_trait::async_trait]
impl System for UmbraSystem {
    fn name(&self) -> String {
        if self.tls { "umbra (TLS)" } else { "umbra" }.into()
    }

    fn server_pid(&self) -> u32 {
        self.lock_server().pid()
    }

    async fn connect(&self, index: u32, recorder: Arc<Recorder>) -> Result<Box<dyn Endpoint>> {
        let (signer, account) = self
            .signers
            .get(index as usize)
            .context("device index out of range")?;
        let conn = Conn::open(&self.dial, index, recorder).await?;
        let signature = signer.sign_payload(&login_signing_payload(&conn.nonce, account));
        conn.request(Request::Login {
            account_id: account.clone(),
            device: umbra_proto::DeviceId::FIRST,
            signature,
        })
        .await?;
        conn.wait_synced(SYNC_TIMEOUT).await?;
        Ok(Box::new(UmbraEndpoint {
            conn,
            groups: Arc::clone(&self.groups),
        }))
    }

    fn payload(&self, channel: u32, size: usize) -> Vec<u8> {
        self.templates
            .get(channel as usize)
            .and_then(|t| t.get(&size).or_else(|| t.values().next()))
            .cloned()
            .unwrap_or_else(|| vec![0; size])
    }

    fn acknowledges(&self) -> bool {
        true
    }

    async fn kill9_and_restart(&self) -> Result<()> {
        self.kill9()?;
        self.restart().await
    }

    fn durability(&self) -> String {
        "each copy stored in SQLite (WAL, synchronous=FULL: fsync per group commit) or \
         acknowledged by its recipient before Accepted (a copy acknowledged within its ack \
         window, 10 ms, widening to at most 320 ms while acknowledgements come late, plus the \
         wait for the next sweep, is never written; a copy for a recipient with no connection \
         is written at the next sweep; devices acknowledge with quiet Acks)"
            .into()
    }
}
