//! Cluster mode (`--nodes N`, Umbra only): N `umbra-server` processes on
//! one PostgreSQL database and one NATS server, both private to the run (a
//! PostgreSQL cluster made with `initdb` in a temporary directory and a
//! `nats-server`, each on a free loopback port; `.ci/run` installs both
//! from Debian, and so does any machine with `apt-get install postgresql
//! nats-server`). Device `i` connects to node `i mod N`, so in a relay run
//! on two nodes every pair's sender and recipient are on different nodes:
//! every message crosses between them.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use umbra_store::postgres::testing::PrivatePostgres;

/// The database and the message bus every node of a run shares.
pub struct Backing {
    postgres: PrivatePostgres,
    nats: Child,
    /// The run's database, `postgres://…`.
    pub database: String,
    /// `nats://127.0.0.1:PORT`.
    pub nats_url: String,
}

impl std::fmt::Debug for Backing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backing")
            .field("database", &self.database)
            .field("nats", &self.nats_url)
            .finish()
    }
}

impl Backing {
    /// Starts a durable PostgreSQL (fsync on) with a new database, and a
    /// nats-server logging into `work`.
    pub async fn start(work: &Path) -> Result<Backing> {
        let postgres = PrivatePostgres::start(true).context("starting a private PostgreSQL")?;
        let database = postgres
            .create_database()
            .await
            .context("creating the run's database")?;
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let log = std::fs::File::create(work.join("nats-server.log"))?;
        let nats = Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting nats-server (Debian's nats-server package)")?;
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if started.elapsed() > Duration::from_secs(20) {
                bail!("nats-server did not listen on port {port} within 20 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Backing {
            postgres,
            nats,
            database,
            nats_url: format!("nats://127.0.0.1:{port}"),
        })
    }

    /// The configuration lines that put a node on this backing.
    pub fn config_lines(&self) -> String {
        format!(
            "\ndatabase = \"{}\"\nnats = \"{}\"\n",
            self.database, self.nats_url
        )
    }

    /// The processes whose CPU a run reports besides the nodes': every
    /// PostgreSQL process (its postmaster and backends, as they are now)
    /// and the nats-server.
    pub fn components(&self) -> Vec<(String, Vec<u32>)> {
        vec![
            ("PostgreSQL".into(), self.postgres.pids()),
            ("NATS".into(), vec![self.nats.id()]),
        ]
    }
}

impl Drop for Backing {
    fn drop(&mut self) {
        let _ = self.nats.kill();
        let _ = self.nats.wait();
    }
}
