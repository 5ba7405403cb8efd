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
    /// Where to write, when the run ends, what PostgreSQL spent its time
    /// on (`--pg-profile`).
    profile: Option<std::path::PathBuf>,
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
    /// nats-server. With `profile`, PostgreSQL counts its statements
    /// (`pg_stat_statements`, from PostgreSQL's own contrib) and the
    /// counts from [`Backing::begin_profile`] to the end of the run go to
    /// that file.
    pub async fn start(profile: Option<std::path::PathBuf>) -> Result<Backing> {
        let settings: &[&str] = if profile.is_some() {
            &[
                "shared_preload_libraries=pg_stat_statements",
                "pg_stat_statements.track_utility=on",
            ]
        } else {
            &[]
        };
        let postgres =
            PrivatePostgres::start_with(true, settings).context("starting a private PostgreSQL")?;
        let database = postgres
            .create_database()
            .await
            .context("creating the run's database")?;
        if profile.is_some() {
            umbra_store::postgres::testing::query(&database, "CREATE EXTENSION pg_stat_statements")
                .await
                .context("pg_stat_statements (PostgreSQL's contrib) is needed for --pg-profile")?;
        }
        let nats = PrivateNats::start(None)
            .context("starting nats-server (Debian's nats-server package)")?;
        Ok(Backing {
            postgres,
            nats,
            database,
            profile,
        })
    }

    /// Forgets what PostgreSQL counted so far (building the fixture), so
    /// the profile covers the workload alone.
    pub async fn begin_profile(&self) -> Result<()> {
        if self.profile.is_some() {
            umbra_store::postgres::testing::query(
                &self.database,
                "SELECT pg_stat_statements_reset()",
            )
            .await?;
        }
        Ok(())
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

impl Drop for Backing {
    /// Writes the profile, if asked: the statements that took most of
    /// PostgreSQL's execution time, with their calls and mean time.
    fn drop(&mut self) {
        let Some(path) = &self.profile else {
            return;
        };
        let sql = "SELECT calls, round(total_exec_time::numeric, 1) AS total_ms, \
                   round(mean_exec_time::numeric, 4) AS mean_ms, rows, \
                   left(regexp_replace(query, '\\s+', ' ', 'g'), 200) AS statement \
                   FROM pg_stat_statements ORDER BY total_exec_time DESC LIMIT 30";
        match self.postgres.psql(&self.database, sql) {
            Ok(text) => match std::fs::write(path, text) {
                Ok(()) => eprintln!("PostgreSQL's profile: {}", path.display()),
                Err(error) => eprintln!("cannot write {}: {error}", path.display()),
            },
            Err(error) => eprintln!("no PostgreSQL profile: {error}"),
        }
    }
}
