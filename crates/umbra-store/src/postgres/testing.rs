//! A private PostgreSQL server for tests and benchmarks: `initdb` into a
//! temporary directory and `postgres` on a random loopback port, shared
//! with nothing else on the machine, stopped and deleted when dropped.
//!
//! The server binaries come from `UMBRA_PG_BIN` if set, else the newest
//! `/usr/lib/postgresql/<version>/bin`, else the `PATH` (`.ci/run` installs
//! Debian's `postgresql` when none is there). Run as root, the server runs
//! as the `postgres` user, since PostgreSQL refuses to run as root.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use umbra_proto::GroupId;

use crate::{Result, StoreError, StoreLimits};

use super::PgStore;

/// A PostgreSQL server of the test's own.
pub struct PrivatePostgres {
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
    bin: PathBuf,
    owner: Option<(u32, u32)>,
    durable: bool,
    /// Further server settings (`-c name=value`), for profiling.
    settings: Vec<String>,
    databases: std::sync::atomic::AtomicU32,
}

impl std::fmt::Debug for PrivatePostgres {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrivatePostgres")
            .field("port", &self.port)
            .finish()
    }
}

fn failed(what: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(format!("the private PostgreSQL: {what}"))
}

/// Where the server binaries are.
fn binaries() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("UMBRA_PG_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("postgres").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Ok(bin);
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .find(|dir| dir.join("postgres").exists() && dir.join("initdb").exists());
    on_path.ok_or_else(|| {
        failed(
            "no PostgreSQL server binaries (initdb, postgres) found: install Debian's \
             `postgresql` (.ci/run does) or set UMBRA_PG_BIN",
        )
    })
}

/// The `postgres` user's IDs, when running as root (`dir`, just made, is
/// owned by whoever runs this).
fn owner(dir: &Path) -> Result<Option<(u32, u32)>> {
    use std::os::unix::fs::MetadataExt;
    if std::fs::metadata(dir).map_err(failed)?.uid() != 0 {
        return Ok(None);
    }
    let id = |flag: &str| {
        Command::new("id")
            .args([flag, "postgres"])
            .output()
            .ok()
            .and_then(|out| {
                String::from_utf8_lossy(&out.stdout)
                    .trim()
                    .parse::<u32>()
                    .ok()
            })
    };
    match (id("-u"), id("-g")) {
        (Some(uid), Some(gid)) => Ok(Some((uid, gid))),
        _ => Err(failed(
            "running as root, and there is no `postgres` user to run the server as",
        )),
    }
}

fn chown(path: &Path, owner: Option<(u32, u32)>) -> Result<()> {
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(path, Some(uid), Some(gid)).map_err(failed)?;
    }
    Ok(())
}

fn as_owner(command: &mut Command, owner: Option<(u32, u32)>) {
    if let Some((uid, gid)) = owner {
        use std::os::unix::process::CommandExt;
        command.uid(uid).gid(gid);
    }
}

/// The processes whose parent is `parent`, from `/proc`.
fn children(parent: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
            // "pid (command) state ppid ...": the command may hold spaces
            // and parentheses, so read after the last ')'.
            let ppid: u32 = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            (ppid == parent).then_some(pid)
        })
        .collect()
}

/// Whether process `pid` is there and not a zombie.
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z")
    })
}

/// `kill SIGNAL PID...` (processes already gone are no failure).
fn send(signal: &str, pids: &[u32]) -> Result<()> {
    if pids.is_empty() {
        return Ok(());
    }
    Command::new("kill")
        .arg(signal)
        .args(pids.iter().map(u32::to_string))
        .stderr(Stdio::null())
        .status()
        .map_err(failed)?;
    Ok(())
}

/// A loopback port free at the moment.
fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(failed)?;
    Ok(listener.local_addr().map_err(failed)?.port())
}

impl PrivatePostgres {
    /// Creates a cluster and starts its server, waiting until it accepts
    /// connections. `durable: false` turns `fsync` off, for tests that do
    /// not cut the machine's power.
    pub fn start(durable: bool) -> Result<Self> {
        PrivatePostgres::start_with(durable, &[])
    }

    /// [`PrivatePostgres::start`] with further server settings
    /// (`name=value`, as `postgres -c` takes them).
    pub fn start_with(durable: bool, settings: &[&str]) -> Result<Self> {
        let bin = binaries()?;
        let dir = tempfile::Builder::new()
            .prefix("umbra-pg-")
            .tempdir()
            .map_err(failed)?;
        let owner = owner(dir.path())?;
        chown(dir.path(), owner)?;
        let data = dir.path().join("data");
        let mut initdb = Command::new(bin.join("initdb"));
        initdb
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                "umbra",
                "--auth=trust",
                "--encoding=UTF8",
                "--no-sync",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        as_owner(&mut initdb, owner);
        let output = initdb.output().map_err(failed)?;
        if !output.status.success() {
            return Err(failed(format!(
                "initdb failed: {}",
                String::from_utf8_lossy(&output.stderr)
            )));
        }
        let mut server = PrivatePostgres {
            dir,
            port: 0,
            child: None,
            bin,
            owner,
            durable,
            settings: settings.iter().map(|s| (*s).to_owned()).collect(),
            databases: std::sync::atomic::AtomicU32::new(0),
        };
        // A port found free may be taken before the server binds it: try
        // a few.
        let mut last = None;
        for _ in 0..5 {
            server.port = free_port()?;
            match server.launch() {
                Ok(()) => return Ok(server),
                Err(error) => last = Some(error),
            }
        }
        Err(last.unwrap_or_else(|| failed("could not start")))
    }

    fn launch(&mut self) -> Result<()> {
        let durable = self.durable;
        let data = self.dir.path().join("data");
        // Appended: a restart's log follows the one before it.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("server.log"))
            .map_err(failed)?;
        chown(&self.dir.path().join("server.log"), self.owner)?;
        let mut command = Command::new(self.bin.join("postgres"));
        command
            .arg("-D")
            .arg(&data)
            .args(["-p", &self.port.to_string()])
            .args(["-c", "listen_addresses=127.0.0.1"])
            .arg("-c")
            .arg(format!(
                "unix_socket_directories={}",
                self.dir.path().display()
            ))
            .args(["-c", "max_connections=200"])
            .args(["-c", "shared_buffers=64MB"])
            .args([
                "-c",
                &format!("fsync={}", if durable { "on" } else { "off" }),
            ])
            .args([
                "-c",
                &format!("full_page_writes={}", if durable { "on" } else { "off" }),
            ])
            .stdout(Stdio::null())
            .stderr(log);
        for setting in &self.settings {
            command.arg("-c").arg(setting);
        }
        as_owner(&mut command, self.owner);
        let mut child = command.spawn().map_err(failed)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                let log =
                    std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default();
                return Err(failed(format!("the server exited ({status}): {log}")));
            }
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                let ready = Command::new(self.bin.join("pg_isready"))
                    .args([
                        "-h",
                        "127.0.0.1",
                        "-p",
                        &self.port.to_string(),
                        "-U",
                        "umbra",
                    ])
                    .stdout(Stdio::null())
                    .status();
                if ready.is_ok_and(|s| s.success()) {
                    self.child = Some(child);
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(failed("the server did not start within 30 s"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs `sql` with `psql` (beside the server's binaries) against the
    /// database at `url`, returning what it prints (unaligned, tab
    /// separated): for use where no async runtime is at hand.
    pub fn psql(&self, url: &str, sql: &str) -> Result<String> {
        let output = Command::new(self.bin.join("psql"))
            .args(["-X", "-q", "-A", "-F", "\t", "-d", url, "-c", sql])
            .output()
            .map_err(failed)?;
        if !output.status.success() {
            return Err(failed(format!(
                "psql failed: {}",
                String::from_utf8_lossy(&output.stderr)
            )));
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// URL of database `name` on this server.
    pub fn url(&self, name: &str) -> String {
        format!("postgres://umbra@127.0.0.1:{}/{name}", self.port)
    }

    /// Creates a new, empty database; returns its URL.
    pub async fn create_database(&self) -> Result<String> {
        let n = self
            .databases
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("umbra_{n}");
        let (client, connection) =
            tokio_postgres::connect(&self.url("postgres"), tokio_postgres::NoTls)
                .await
                .map_err(super::backend)?;
        let task = tokio::spawn(connection);
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .map_err(super::backend)?;
        drop(client);
        let _ = task.await;
        Ok(self.url(&name))
    }

    /// Sends `signal` to the postmaster, then to every process it started
    /// (its backends and helpers: each in a session of its own, so not
    /// reached through a process group).
    fn signal(&self, signal: &str) -> Result<()> {
        let child = self.child.as_ref().ok_or_else(|| failed("not running"))?;
        // The postmaster first: stopped or killed, it starts no process
        // that the list below would miss.
        send(signal, &[child.id()])?;
        send(signal, &children(child.id()))
    }

    /// Stops every process of the server where it is (`SIGSTOP`):
    /// connections stay open and nothing answers, as when the database's
    /// machine hangs or the network drops its packets.
    pub fn pause(&self) -> Result<()> {
        self.signal("-STOP")
    }

    /// Lets a paused server go on (`SIGCONT`).
    pub fn resume(&self) -> Result<()> {
        self.signal("-CONT")
    }

    /// Kills every process of the server (`SIGKILL`, paused or not),
    /// leaving its data directory as a crash would.
    pub fn kill(&mut self) -> Result<()> {
        let child = self.child.as_ref().ok_or_else(|| failed("not running"))?;
        // The postmaster stopped, its children listed and killed while it
        // cannot reap them (so their PIDs are not reused), then it.
        send("-STOP", &[child.id()])?;
        let backends = children(child.id());
        send("-KILL", &backends)?;
        send("-KILL", &[child.id()])?;
        if let Some(mut child) = self.child.take() {
            let _ = child.wait();
        }
        // Until the last backend is gone, its shared memory keeps a new
        // server from starting.
        let deadline = Instant::now() + Duration::from_secs(10);
        while backends.iter().any(|pid| alive(*pid)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Starts the server again on its port and data directory (after
    /// [`PrivatePostgres::kill`]: it recovers from its write-ahead log).
    pub fn restart(&mut self) -> Result<()> {
        if self.child.is_some() {
            return Err(failed("still running"));
        }
        self.launch()
    }

    /// The server's processes now: its postmaster and every process it
    /// started (to measure their CPU).
    pub fn pids(&self) -> Vec<u32> {
        self.child.as_ref().map_or_else(Vec::new, |child| {
            let mut pids = vec![child.id()];
            pids.extend(children(child.id()));
            pids
        })
    }

    /// The server's log so far, to show when a test fails.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// A store on a new, empty database of this server.
    pub async fn fresh_store(&self, limits: StoreLimits) -> Result<PgStore> {
        PgStore::connect(&self.create_database().await?, limits).await
    }
}

/// Runs `sql` on the database at `url` and returns its rows, each value as
/// text (NULL as `None`): for tests that look at what the store wrote.
pub async fn query(url: &str, sql: &str) -> Result<Vec<Vec<Option<String>>>> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .map_err(super::backend)?;
    let task = tokio::spawn(connection);
    let messages = client.simple_query(sql).await.map_err(super::backend)?;
    drop(client);
    let _ = task.await;
    Ok(messages
        .into_iter()
        .filter_map(|message| match message {
            tokio_postgres::SimpleQueryMessage::Row(row) => Some(
                (0..row.len())
                    .map(|i| row.get(i).map(str::to_owned))
                    .collect(),
            ),
            _ => None,
        })
        .collect())
}

/// A connection of its own to the database at `url`, in a transaction.
async fn begin(url: &str) -> Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .map_err(super::backend)?;
    tokio::spawn(connection);
    client
        .batch_execute("BEGIN")
        .await
        .map_err(super::backend)?;
    Ok(client)
}

/// A commit on a group in progress on a connection of its own: its
/// transaction has taken the group's turn and row, as a commit's first
/// statement does, and holds them until this is dropped (the connection
/// closes, the transaction is rolled back).
pub struct CommitInProgress {
    _client: tokio_postgres::Client,
}

impl std::fmt::Debug for CommitInProgress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CommitInProgress")
    }
}

/// Starts a [`CommitInProgress`] on `group` on the database at `url`.
pub async fn commit_in_progress(url: &str, group: &GroupId) -> Result<CommitInProgress> {
    let client = begin(url).await?;
    client
        .query(super::groups::EPOCH.as_str(), &[&group.as_bytes()])
        .await
        .map_err(super::backend)?;
    Ok(CommitInProgress { _client: client })
}

/// A change of a line in progress on a connection of its own: its
/// transaction has taken the line's turn and row, as a change's first
/// statement does, and run more statements; it ends with
/// [`LineChangeInProgress::commit`] (or is rolled back when dropped).
pub struct LineChangeInProgress {
    client: tokio_postgres::Client,
}

impl std::fmt::Debug for LineChangeInProgress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LineChangeInProgress")
    }
}

impl LineChangeInProgress {
    /// Commits the change.
    pub async fn commit(self) -> Result<()> {
        self.client
            .batch_execute("COMMIT")
            .await
            .map_err(super::backend)
    }
}

/// Starts a [`LineChangeInProgress`] on `account`'s line on the database
/// at `url`, running `then` (statements) after taking the line.
pub async fn line_change_in_progress(
    url: &str,
    account: &str,
    then: &str,
) -> Result<LineChangeInProgress> {
    let client = begin(url).await?;
    client
        .query(&super::turns::line_alone("1", "NO KEY UPDATE"), &[&account])
        .await
        .map_err(super::backend)?;
    client.batch_execute(then).await.map_err(super::backend)?;
    Ok(LineChangeInProgress { client })
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        if self.child.is_some() {
            // A paused server goes on first, so that it can stop.
            let _ = self.resume();
        }
        if let Some(mut child) = self.child.take() {
            // Immediate shutdown: SIGQUIT to the postmaster, which stops
            // its backends; SIGKILL to them all if it is still there
            // after 5 s.
            let _ = Command::new("kill")
                .args(["-QUIT", &child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = send("-KILL", &children(child.id()));
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// PostgreSQL's generic plans (the ones a prepared statement settles on)
/// for the statements that look a device's `MailboxFull` notice up, with
/// sequential scans ruled out (a table as small as a test's is read whole
/// otherwise): whether they use the notices' own index, not the mailbox's.
pub async fn notice_plans(url: &str) -> Result<Vec<String>> {
    let mut plans = Vec::new();
    for sql in [
        super::mailboxes::STORED_NOTICE,
        super::mailboxes::DELETE_NOTICE,
    ] {
        plans.push(generic_plan(url, sql, "text, bigint", "'AAAAAAAA', 1").await?);
    }
    Ok(plans)
}

/// The plan PostgreSQL settles on for `sql` prepared with parameters of
/// `types`, run with `args`: the generic one, sequential scans ruled out
/// (a table as small as a test's is read whole otherwise).
async fn generic_plan(url: &str, sql: &str, types: &str, args: &str) -> Result<String> {
    let rows = query(
        url,
        &format!(
            "SET plan_cache_mode = force_generic_plan; SET enable_seqscan = off;
             PREPARE planned({types}) AS {sql};
             EXPLAIN EXECUTE planned({args})"
        ),
    )
    .await?;
    Ok(rows
        .into_iter()
        .filter_map(|row| row.into_iter().next().flatten())
        .collect::<Vec<_>>()
        .join("\n"))
}

/// PostgreSQL's generic plans (as a prepared statement gets after its
/// fifth run) for the acknowledgements' statements, alone and batched,
/// ([`generic_plan`]): whether the
/// head lock's gate is a one-time filter above the delete's read of the
/// mailbox (evaluated, locking the heads, before any copy is read).
pub async fn ack_plans(url: &str) -> Result<Vec<String>> {
    Ok(vec![
        generic_plan(
            url,
            super::mailboxes::ACK_ALONE,
            "text, bigint, bigint[]",
            "'AAAAAAAA', 1, '{1,2}'",
        )
        .await?,
        generic_plan(
            url,
            super::mailboxes::ACKS_TOGETHER,
            "text[], bigint[], text[], bigint[], bigint[]",
            "'{AAAAAAAA}', '{1}', '{AAAAAAAA,AAAAAAAA}', '{1,1}', '{1,2}'",
        )
        .await?,
    ])
}
