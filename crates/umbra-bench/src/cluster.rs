//! Cluster mode (`--nodes N`, Umbra only): N `umbra-server` processes on
//! one PostgreSQL database and one NATS server, both private to the run (a
//! PostgreSQL cluster made with `initdb` in a temporary directory and a
//! `nats-server`, each on a free loopback port; `.ci/run` installs both
//! from Debian, and so does any machine with `apt-get install postgresql
//! nats-server`). Device `i` connects to node `i mod N`, so in a relay run
//! on two nodes every pair's sender and recipient are on different nodes:
//! every message crosses between them.

use anyhow::{Context, Result};
use umbra_server::cluster::testing::PrivateNats;
use umbra_store::postgres::testing::PrivatePostgres;

/// The database and the message bus every node of a run shares.
pub struct Backing {
    postgres: PrivatePostgres,
    nats: PrivateNats,
    /// The run's database, `postgres://…`.
    pub database: String,
}

impl std::fmt::Debug for Backing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backing")
            .field("database", &self.database)
            .field("nats", &self.nats)
            .finish()
    }
}

impl Backing {
    /// Starts a durable PostgreSQL (fsync on) with a new database, and a
    /// nats-server.
    pub async fn start() -> Result<Backing> {
        let postgres = PrivatePostgres::start(true).context("starting a private PostgreSQL")?;
        let database = postgres
            .create_database()
            .await
            .context("creating the run's database")?;
        let nats = PrivateNats::start(None)
            .context("starting nats-server (Debian's nats-server package)")?;
        Ok(Backing {
            postgres,
            nats,
            database,
        })
    }

    /// The configuration lines that put a node on this backing.
    pub fn config_lines(&self) -> String {
        format!(
            "\ndatabase = \"{}\"\nnats = \"{}\"\n",
            self.database,
            self.nats.url()
        )
    }

    /// The processes whose CPU a run reports besides the nodes': every
    /// PostgreSQL process (its postmaster and backends, as they are now)
    /// and the nats-server.
    pub fn components(&self) -> Vec<(String, Vec<u32>)> {
        vec![
            ("PostgreSQL".into(), self.postgres.pids()),
            ("NATS".into(), vec![self.nats.pid()]),
        ]
    }
}
