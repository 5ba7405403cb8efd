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
use umbra_mls::{DeviceCertificate, DeviceLog, DeviceSigner, Group, GroupConfig, Provider, Suite};
use umbra_proto::frame::CommitSubmission;
use umbra_proto::{
    AccountId, CertFingerprint, DeliveryKind, DeviceId, GroupId, Reply, Request,
    login_signing_payload, register_signing_payload,
};

use crate::conn::{Conn, Dial};
use crate::recorder::Recorder;
use crate::stamp::Stamp;
use crate::system::{Endpoint, System, Topology};

/// The bench's groups use the classical suite, as they did before the
/// post-quantum one became the default, so figures stay comparable across
/// versions (the server's relay cost does not depend on the suite; the
/// handshake sizes of both are in docs/benchmarks.md).
const BENCH_SUITE: Suite = Suite::CLASSICAL;

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
    /// Per device index: its key, account and number.
    pub devices: Vec<FixtureDevice>,
    pub channels: Vec<FixtureChannel>,
}

/// One device of a fixture. Fixtures written before accounts had several
/// devices hold `[secret, account]` pairs: they read as device 1.
#[derive(Debug, Serialize, Deserialize)]
pub struct FixtureDevice {
    /// Hex of the device's 32-byte Ed25519 secret (device 1's is the
    /// account key).
    pub secret: String,
    pub account: String,
    /// Its number in the account's device log.
    #[serde(default = "first_device")]
    pub device: u32,
}

fn first_device() -> u32 {
    DeviceId::FIRST.0
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
    device: DeviceId,
    /// What its leaves carry (every device but device 1).
    certificate: Option<DeviceCertificate>,
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

/// Unix seconds now.
fn unix_now() -> u64 {
    crate::stamp::now_ns() / 1_000_000_000
}

/// Uploads `count` KeyPackages of `device` (with its certificate, if it
/// has one) on its own session.
async fn upload_key_packages(device: &SetupDevice, count: usize) -> Result<()> {
    if count == 0 {
        return Ok(());
    }
    let packages = {
        let crypto = umbra_mls::Crypto::default();
        let storage = mls_storage()?;
        let provider = Provider::new(&crypto, &storage);
        (0..count)
            .map(|_| {
                umbra_mls::new_device_key_package(
                    &provider,
                    &device.signer,
                    &device.account,
                    BENCH_SUITE,
                    false,
                    device.certificate.as_ref(),
                )
            })
            .collect::<Result<Vec<_>, _>>()?
    };
    for chunk in packages.chunks(umbra_proto::frame::MAX_KEY_PACKAGES_PER_UPLOAD) {
        device
            .conn
            .request(Request::UploadKeyPackages {
                key_packages: chunk.to_vec(),
                last_resort: None,
            })
            .await
            .with_context(|| {
                format!(
                    "uploading KeyPackages of device {} of {}",
                    device.device, device.account
                )
            })?;
    }
    Ok(())
}

/// Sets up one account over the real protocol: its device 1 (index
/// `first_index`) registers with `code`; each further device (up to
/// `per_account`, at the following indexes) gets a fresh key, is added to
/// the account's device log by device 1 (entry 0 first: device 1 itself),
/// signed by the account key, by device 1 and by the added key, as linking
/// does, and logs in as its number on a session of its own. Returns the
/// devices in order, logged in.
async fn set_up_account(
    dial: &Dial,
    first_index: u32,
    per_account: u32,
    code: umbra_proto::ActivationCode,
) -> Result<Vec<SetupDevice>> {
    let signer = DeviceSigner::from_secret(&random_secret()?);
    let conn = Conn::open(dial, first_index, Arc::new(Recorder::new())).await?;
    let identity_key = signer.identity_key();
    let signature = signer.sign_payload(&register_signing_payload(&conn.nonce, &identity_key));
    let Reply::Registered { account_id, .. } = conn
        .request(Request::Register {
            activation_code: code,
            identity_key,
            signature,
        })
        .await
        .context("registering an account")?
    else {
        bail!("unexpected reply to Register");
    };
    let mut devices = Vec::with_capacity(per_account as usize);
    if per_account > 1 {
        let mut log = DeviceLog::new(account_id.clone(), signer.identity_key());
        let first = log.first_entry(&signer, "bench 1", unix_now());
        conn.request(Request::AppendDeviceEntry {
            entry: first.clone(),
        })
        .await
        .with_context(|| format!("appending the first device log entry of {account_id}"))?;
        log.append(first, None)
            .context("the first device log entry does not verify")?;
        for number in 2..=per_account {
            let added = DeviceSigner::from_secret(&random_secret()?);
            let entry = log.add_entry(
                &signer,
                (DeviceId::FIRST, &signer),
                &added,
                &format!("bench {number}"),
                unix_now(),
            );
            if entry.device() != DeviceId(number) {
                bail!(
                    "{account_id}: the log gives the new device number {}, expected {number}",
                    entry.device()
                );
            }
            conn.request(Request::AppendDeviceEntry {
                entry: entry.clone(),
            })
            .await
            .with_context(|| format!("adding device {number} to {account_id}'s device log"))?;
            log.append(entry.clone(), None)
                .with_context(|| format!("{account_id}'s entry adding device {number}"))?;
            let index = first_index + number - 1;
            let device_conn = Conn::open(dial, index, Arc::new(Recorder::new())).await?;
            device_conn
                .request(Request::Login {
                    account_id: account_id.clone(),
                    device: entry.device(),
                    signature: added
                        .sign_payload(&login_signing_payload(&device_conn.nonce, &account_id)),
                })
                .await
                .with_context(|| format!("logging in as device {number} of {account_id}"))?;
            devices.push(SetupDevice {
                signer: added,
                account: account_id.clone(),
                device: entry.device(),
                certificate: Some(DeviceCertificate {
                    account_key: signer.identity_key(),
                    entry,
                }),
                conn: device_conn,
            });
        }
        // The server's log must be the one built here, entry for entry.
        let Reply::DeviceLog { entries } = conn
            .request(Request::FetchDeviceLog {
                account_id: account_id.clone(),
                from: 0,
            })
            .await
            .with_context(|| format!("fetching {account_id}'s device log"))?
        else {
            bail!("unexpected reply to FetchDeviceLog");
        };
        let served = DeviceLog::verify(account_id.clone(), signer.identity_key(), entries, None)
            .with_context(|| format!("{account_id}'s device log as the server keeps it"))?;
        if served.head() != log.head() {
            bail!("{account_id}'s device log at the server differs from the one appended");
        }
    }
    devices.insert(
        0,
        SetupDevice {
            signer,
            account: account_id,
            device: DeviceId::FIRST,
            certificate: None,
            conn,
        },
    );
    Ok(devices)
}

/// The contacts a fixture makes: each channel's creating account with each
/// other member account, as (device 1 of one, device 1 of the other).
fn contact_pairs(topology: &Topology) -> HashSet<(u32, u32)> {
    let mut pairs = HashSet::new();
    for members in &topology.channels {
        if let Some((&creator, rest)) = members.split_first() {
            let from = topology.account_of(creator);
            for &member in rest {
                let to = topology.account_of(member);
                if to != from {
                    pairs.insert((topology.first_device(from), topology.first_device(to)));
                }
            }
        }
    }
    pairs
}

/// Writes the fixture server's configuration file before
/// `umbra_server::init` (which keeps a file it finds): the defaults, with
/// the limits meant for real clients that setting up the fixture would run
/// into raised: contact requests per hour (a group's creator asks every
/// member account at once), and devices, sessions and device log entries
/// per account. Limits the fixture stays under keep their defaults.
fn write_fixture_config(data_dir: &Path, per_account: u32, contact_requests: u32) -> Result<()> {
    let defaults = umbra_server::Config::default();
    let mut raised: Vec<(&str, u32)> = Vec::new();
    if contact_requests > defaults.contact_requests_per_hour {
        raised.push(("contact_requests_per_hour", contact_requests));
    }
    if per_account > defaults.max_devices_per_account {
        raised.push(("max_devices_per_account", per_account));
    }
    // Device 1's entry and one per further device, all appended today.
    if per_account > defaults.device_changes_per_day {
        raised.push(("device_changes_per_day", per_account));
    }
    if per_account as usize > defaults.max_sessions_per_account {
        raised.push(("max_sessions_per_account", per_account));
    }
    if raised.is_empty() {
        return Ok(());
    }
    let mut text = String::new();
    for line in umbra_server::config::DEFAULT_CONFIG_TEXT.lines() {
        let key = line.split('=').next().unwrap_or_default().trim();
        match raised.iter().find(|(name, _)| *name == key) {
            Some((name, value)) => text.push_str(&format!("{name} = {value}")),
            None => text.push_str(line),
        }
        text.push('\n');
    }
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    let path = data_dir.join(umbra_server::config::CONFIG_FILE);
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
}

/// Builds a fixture over the real protocol: registers every account with an
/// activation code (its device 1), adds its other devices to its device log
/// as linking does, uploads KeyPackages (carrying their device certificates),
/// makes contacts, creates each channel's MLS group and adds every member
/// device, and encrypts one message per payload size per channel. Leaves the
/// server's data in `data_dir`. `extra_config` (`key = value` lines: a
/// cluster's database and NATS) replaces those keys in the server's
/// configuration file.
pub async fn build_fixture(
    spec: &ServerSpec,
    data_dir: &Path,
    topology: &Topology,
    sizes: &[usize],
    extra_config: &str,
) -> Result<Fixture> {
    let started = Instant::now();
    let per_account = topology.devices_per_account.max(1);
    let pairs = contact_pairs(topology);
    let mut asked: BTreeMap<u32, u32> = BTreeMap::new();
    for (from, _) in &pairs {
        *asked.entry(*from).or_default() += 1;
    }
    let contact_requests = asked.values().copied().max().unwrap_or(0);
    write_fixture_config(data_dir, per_account, contact_requests)?;
    umbra_server::init(data_dir, "127.0.0.1:7443")?;
    if !extra_config.is_empty() {
        let path = data_dir.join(umbra_server::config::CONFIG_FILE);
        let key = |line: &str| line.split('=').next().unwrap_or_default().trim().to_owned();
        let replaced: Vec<String> = extra_config
            .lines()
            .filter(|line| line.contains('='))
            .map(key)
            .collect();
        let mut text: String = std::fs::read_to_string(&path)?
            .lines()
            .filter(|line| !replaced.contains(&key(line)))
            .map(|line| format!("{line}\n"))
            .collect();
        // Appended at the end: the configuration has no `[table]`
        // sections, so the keys stay top-level.
        text.push_str(extra_config);
        std::fs::write(&path, text)?;
    }
    let config = umbra_server::Config::load(data_dir)?;
    if per_account > config.max_devices_per_account
        || per_account > config.device_changes_per_day
        || per_account as usize > config.max_sessions_per_account
        || contact_requests > config.contact_requests_per_hour
    {
        bail!(
            "the fixture server's configuration ({}) does not allow {per_account} devices per \
             account and {contact_requests} contact requests from one account",
            data_dir.join(umbra_server::config::CONFIG_FILE).display()
        );
    }
    let accounts = topology.accounts();
    let codes =
        umbra_server::admin::issue_codes(data_dir, &config, 3650, accounts as usize, unix_now())
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
    let wanted = Arc::new(wanted);

    // Register, add the further devices, upload.
    let slots: Arc<Vec<Mutex<Option<Arc<SetupDevice>>>>> =
        Arc::new((0..topology.devices).map(|_| Mutex::new(None)).collect());
    let jobs: Vec<_> = codes
        .into_iter()
        .enumerate()
        .map(|(account, code)| (topology.first_device(account as u32), code))
        .collect();
    {
        let slots = Arc::clone(&slots);
        let dial = dial.clone();
        parallel(jobs, move |(first_index, code)| {
            let slots = Arc::clone(&slots);
            let dial = dial.clone();
            let wanted = Arc::clone(&wanted);
            async move {
                let devices = set_up_account(&dial, first_index, per_account, code.code).await?;
                for (index, device) in (first_index..).zip(devices) {
                    let count = wanted.get(index as usize).copied().unwrap_or(0);
                    upload_key_packages(&device, count).await?;
                    if let Some(slot) = slots.get(index as usize) {
                        *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(device));
                    }
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
        "  registered {} accounts of {} devices each ({} devices) in {:.1?}",
        accounts,
        per_account,
        devices.len(),
        started.elapsed()
    );

    // Contacts: each channel's creating account and each other member
    // account, between their devices 1.
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
        .map(|d| FixtureDevice {
            secret: hex::encode(*d.signer.secret_bytes()),
            account: d.account.to_string(),
            device: d.device.0,
        })
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

/// Creates one channel's group as its first member and adds every other
/// member device: a KeyPackage of each (account, device) fetched by number,
/// [`ADD_BATCH`] per commit.
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
    let config = GroupConfig {
        suite: BENCH_SUITE,
        ..GroupConfig::default()
    };
    let mut group = {
        let provider = Provider::new(&crypto, &storage);
        Group::create_as_device(
            &provider,
            &creator.signer,
            &creator.account,
            &config,
            0,
            creator.certificate.as_ref(),
        )?
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
            delivery_key: None,
        })
        .await?;
    for batch in rest.chunks(ADD_BATCH) {
        let mut key_packages = Vec::with_capacity(batch.len());
        for &member in batch {
            let member = device(member)?;
            let Reply::KeyPackage { key_package, .. } = creator
                .conn
                .request(Request::FetchKeyPackage {
                    account_id: member.account.clone(),
                    device: member.device,
                    suites: vec![BENCH_SUITE.code()],
                })
                .await
                .with_context(|| {
                    format!(
                        "fetching a KeyPackage of device {} of {}",
                        member.device, member.account
                    )
                })?
            else {
                bail!("unexpected reply to FetchKeyPackage");
            };
            key_packages.push(key_package);
        }
        let output = {
            let provider = Provider::new(&crypto, &storage);
            group.add_members(&provider, &creator.signer, &key_packages)?
        };
        // The server closes a connection that sends a larger frame; say why
        // instead. (The Welcome and the GroupInfo carry the whole tree.)
        let bytes = output.commit.len()
            + output.welcome.as_ref().map_or(0, Vec::len)
            + output.group_info.len();
        if bytes > umbra_proto::MAX_FRAME_BYTES {
            bail!(
                "a group of {} member devices cannot be set up: a commit adding members to it, \
                 with its Welcome and GroupInfo, is {bytes} bytes, over the {}-byte frame limit \
                 (use smaller groups or fewer devices per account)",
                members.len(),
                umbra_proto::MAX_FRAME_BYTES
            );
        }
        creator
            .conn
            .request(Request::SendCommit(CommitSubmission {
                group_id: group_id.clone(),
                epoch: output.epoch,
                commit: output.commit,
                welcome: output.welcome,
                group_info: output.group_info,
                delivery_key: None,
            }))
            .await
            .context("committing the addition of a group's members")?;
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

/// Umbra under test: a server started on a copy of a fixture's data (or,
/// in cluster mode, several on one database).
pub struct UmbraSystem {
    pub server: Mutex<ServerProcess>,
    dial: Dial,
    /// A cluster's nodes after the first, and how to reach each node (the
    /// first's included); device `i` uses `dials[i % dials.len()]`.
    others: Vec<Mutex<ServerProcess>>,
    dials: Vec<Dial>,
    backing: Option<crate::cluster::Backing>,
    tls: bool,
    /// Per device index: its key, account and number.
    signers: Vec<(DeviceSigner, AccountId, DeviceId)>,
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
                "building an Umbra fixture: {} accounts, {} devices, {} channels",
                topology.accounts(),
                topology.devices,
                topology.channels.len()
            );
            let fixture = build_fixture(spec, &pristine, topology, sizes, "").await?;
            std::fs::write(&fixture_file, serde_json::to_vec(&fixture)?)?;
        }
        let fixture: Fixture = serde_json::from_slice(&std::fs::read(&fixture_file)?)?;
        let run = dir.join("run");
        copy_dir(&pristine, &run)?;
        let server = ServerProcess::start(spec, &run).await?;
        UmbraSystem::from_fixture(server, &fixture, spec.tls)
    }

    /// `nodes` servers on a PostgreSQL database and a NATS server of their
    /// own ([`crate::cluster`]): the fixture is built through the first
    /// (never cached: the database is new each time), and the others start
    /// on copies of its data directory, as an operator deploys them.
    pub async fn prepare_cluster(
        spec: &ServerSpec,
        work: &Path,
        topology: &Topology,
        sizes: &[usize],
        nodes: u32,
        profile: Option<PathBuf>,
    ) -> Result<UmbraSystem> {
        let dir = work.join(format!("umbra-cluster-{}", std::process::id()));
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        std::fs::create_dir_all(&dir)?;
        let backing = crate::cluster::Backing::start(profile).await?;
        eprintln!(
            "building an Umbra fixture on {nodes} nodes, PostgreSQL and NATS: {} accounts, {} \
             devices, {} channels",
            topology.accounts(),
            topology.devices,
            topology.channels.len()
        );
        let first = dir.join("node-1");
        let fixture = build_fixture(spec, &first, topology, sizes, &backing.config_lines()).await?;
        let mut copies = Vec::new();
        for n in 2..=nodes {
            let data = dir.join(format!("node-{n}"));
            copy_dir(&first, &data)?;
            copies.push(data);
        }
        let server = ServerProcess::start(spec, &first).await?;
        let mut system = UmbraSystem::from_fixture(server, &fixture, spec.tls)?;
        let pin: [u8; 32] = hex::decode(&fixture.pin)?
            .try_into()
            .map_err(|_| anyhow::anyhow!("bad pin in fixture"))?;
        let pin = CertFingerprint(pin);
        for data in copies {
            let node = ServerProcess::start(spec, &data).await?;
            system.dials.push(dial(node.address, spec.tls, pin)?);
            system.others.push(Mutex::new(node));
        }
        backing.begin_profile().await?;
        system.backing = Some(backing);
        Ok(system)
    }

    fn from_fixture(server: ServerProcess, fixture: &Fixture, tls: bool) -> Result<UmbraSystem> {
        let pin: [u8; 32] = hex::decode(&fixture.pin)?
            .try_into()
            .map_err(|_| anyhow::anyhow!("bad pin in fixture"))?;
        let signers = fixture
            .devices
            .iter()
            .map(|device| {
                let secret: [u8; 32] = hex::decode(&device.secret)?
                    .try_into()
                    .map_err(|_| anyhow::anyhow!("bad secret in fixture"))?;
                Ok((
                    DeviceSigner::from_secret(&secret),
                    AccountId::parse(&device.account)?,
                    DeviceId(device.device),
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
        let first = dial(server.address, tls, CertFingerprint(pin))?;
        Ok(UmbraSystem {
            dials: vec![first.clone()],
            dial: first,
            others: Vec::new(),
            backing: None,
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

    /// SIGKILL to every node (each tried, whatever the others did).
    pub fn kill9(&self) -> Result<()> {
        let first = self.lock_server().kill9();
        let others: Vec<Result<()>> = self
            .others
            .iter()
            .map(|node| node.lock().unwrap_or_else(|p| p.into_inner()).kill9())
            .collect();
        others.into_iter().fold(first, |all, one| all.and(one))
    }

    /// Logs device `index` in through node `node` and returns its
    /// connection once its stored backlog has been delivered: for workloads
    /// that make requests of their own (the files workload's blobs).
    pub async fn login(&self, index: u32, node: usize, recorder: Arc<Recorder>) -> Result<Conn> {
        let (signer, account, device) = self
            .signers
            .get(index as usize)
            .context("device index out of range")?;
        let dial = self.dials.get(node).unwrap_or(&self.dial);
        let conn = Conn::open(dial, index, recorder).await?;
        let signature = signer.sign_payload(&login_signing_payload(&conn.nonce, account));
        conn.request(Request::Login {
            account_id: account.clone(),
            device: *device,
            signature,
        })
        .await
        .with_context(|| format!("logging in as device {device} of {account}"))?;
        conn.wait_synced(SYNC_TIMEOUT).await?;
        Ok(conn)
    }

    /// The MLS group of channel `channel`.
    pub fn group(&self, channel: u32) -> Option<&GroupId> {
        self.groups.get(channel as usize)
    }

    pub async fn restart(&self) -> Result<()> {
        for node in std::iter::once(&self.server).chain(&self.others) {
            let lock = || node.lock().unwrap_or_else(|p| p.into_inner());
            let (spec, data_dir, address) = {
                let server = lock();
                (server.spec.clone(), server.data_dir.clone(), server.address)
            };
            let child = ServerProcess::spawn(&spec, &data_dir, address)?;
            lock().child = child;
            wait_listening(address, Duration::from_secs(60)).await?;
        }
        Ok(())
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
            let stamp = Stamp::read(&payload);
            self.conn.fire(
                Request::SendMessage {
                    group_id: group_id.clone(),
                    message: payload,
                    kind: DeliveryKind::Application,
                    ttl_seconds: 0,
                },
                stamp,
            );
        }
    }

    fn is_alive(&self) -> bool {
        self.conn.is_alive()
    }

    fn closed(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>> {
        Box::pin(self.conn.closed())
    }
}

#[async_trait::async_trait]
impl System for UmbraSystem {
    fn name(&self) -> String {
        let name = if self.tls { "umbra (TLS)" } else { "umbra" };
        match (self.dials.len(), self.backing.is_some()) {
            (0 | 1, false) => name.into(),
            (0 | 1, true) => format!("{name}, PostgreSQL"),
            (nodes, _) => format!("{name}, {nodes} nodes"),
        }
    }

    fn server_pid(&self) -> u32 {
        self.lock_server().pid()
    }

    fn components(&self) -> Vec<(String, Vec<u32>)> {
        let mut components: Vec<(String, Vec<u32>)> = self
            .others
            .iter()
            .enumerate()
            .map(|(n, node)| {
                let pid = node.lock().unwrap_or_else(|p| p.into_inner()).pid();
                (format!("node {}", n + 2), vec![pid])
            })
            .collect();
        if let Some(backing) = &self.backing {
            components.extend(backing.components());
        }
        components
    }

    async fn connect(&self, index: u32, recorder: Arc<Recorder>) -> Result<Box<dyn Endpoint>> {
        self.connect_to(index, self.node_of(index), recorder).await
    }

    fn nodes(&self) -> usize {
        self.dials.len().max(1)
    }

    fn node_of(&self, index: u32) -> usize {
        index as usize % self.nodes()
    }

    fn kill_node(&self, node: usize) -> Result<()> {
        match node.checked_sub(1) {
            None => self.lock_server().kill9(),
            Some(other) => self
                .others
                .get(other)
                .context("no such node")?
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .kill9(),
        }
    }

    async fn connect_to(
        &self,
        index: u32,
        node: usize,
        recorder: Arc<Recorder>,
    ) -> Result<Box<dyn Endpoint>> {
        let conn = self.login(index, node, recorder).await?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixtures_from_before_several_devices_still_read() -> serde_json::Result<()> {
        let old: Fixture = serde_json::from_str(
            r#"{"topology": {"devices": 2, "channels": [[0, 1]]}, "pin": "00",
                "devices": [["aa", "ABCDEFGH"], ["bb", "JKMNPQRS"]], "channels": []}"#,
        )?;
        assert_eq!(old.topology.devices_per_account, 1);
        let numbers: Vec<u32> = old.devices.iter().map(|d| d.device).collect();
        assert_eq!(numbers, vec![1, 1]);
        assert_eq!(
            old.devices.get(1).map(|d| d.account.as_str()),
            Some("JKMNPQRS")
        );
        Ok(())
    }

    #[test]
    fn the_fixture_server_lets_a_large_group_and_many_devices_be_set_up() -> Result<()> {
        let dir = tempfile::tempdir()?;
        write_fixture_config(dir.path(), 9, 999)?;
        let config = umbra_server::Config::load(dir.path())?;
        assert_eq!(config.contact_requests_per_hour, 999);
        assert_eq!(config.max_devices_per_account, 9);
        assert_eq!(config.device_changes_per_day, 20, "not lowered");
        assert_eq!(config.max_sessions_per_account, 9);
        // Within the defaults, no file: `umbra_server::init` writes its own.
        let small = dir.path().join("small");
        write_fixture_config(&small, 3, 19)?;
        assert!(!small.exists());
        Ok(())
    }
}
