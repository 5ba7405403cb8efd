//! Server configuration: one TOML file in the data directory, every field
//! documented with its default, and environment overrides for deployment.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Name of the configuration file inside the data directory.
pub const CONFIG_FILE: &str = "umbra-server.toml";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address and port to listen on. Default `0.0.0.0:7443`.
    pub listen: SocketAddr,
    /// Where to serve Prometheus metrics (`/metrics`) and health checks
    /// (`/health`, `/ready`) over plain HTTP, apart from the devices' port;
    /// keep it off the public network. Default: not served.
    pub metrics_listen: Option<SocketAddr>,
    /// `host:port` that devices connect to; activation strings carry it.
    /// A cluster lists every node, separated by commas. Default
    /// `127.0.0.1:7443`.
    pub public_address: String,
    /// Serve TLS (`wss://`). Default true. Plain `ws://` is refused unless
    /// `listen` is a loopback address: it exists for tests only.
    pub tls: bool,
    /// Certificate and private key (PEM), relative to the data directory.
    /// Defaults `tls/cert.pem` and `tls/key.pem`, made by `umbra-server init`.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Where the server keeps its state: an SQLite database file, relative
    /// to the data directory (default `umbra.db`, the embedded store), or a
    /// PostgreSQL database shared by the nodes of a cluster,
    /// `postgres://user@host:port/dbname` (its password, if it needs one,
    /// in the environment variable `UMBRA_DATABASE_PASSWORD`, never in
    /// this file).
    pub database: PathBuf,
    /// NATS server through which the nodes of a cluster wake each other's
    /// connections (`nats://host:4222`, or `nats://user@host:4222` for a
    /// NATS that admits only that user; its password, or a token for a
    /// NATS that asks for one, in the environment variable
    /// `UMBRA_NATS_PASSWORD`, never in this file), when several nodes
    /// share a PostgreSQL `database`. Default: none (one node).
    pub nats: Option<String>,
    /// Largest size the database may grow to, in bytes (0: as far as the
    /// disk allows). Writes beyond it, like writes on a full disk, are
    /// refused with `STORAGE_FULL` while reads go on; they succeed again
    /// once delivered messages made room. Default 0.
    pub max_database_bytes: u64,
    /// Most bytes of messages one device's mailbox holds while it is away.
    /// Application messages beyond it are not kept (their senders are told
    /// they were accepted, so nobody learns how long a device has been
    /// away); the device is told how many it missed (`MailboxFull`) when it
    /// returns. Commits, Welcomes, contact requests and notices are kept
    /// past it. 0: no cap. Default 67108864 (64 MiB).
    pub max_mailbox_bytes: u64,
    /// How long an undelivered message waits in a mailbox. Default `7d`.
    #[serde(with = "humantime_serde_compat")]
    pub mailbox_ttl: Duration,
    /// How often expired mailbox items are deleted. Default `1m`.
    #[serde(with = "humantime_serde_compat")]
    pub expiry_sweep_interval: Duration,
    /// Most simultaneous connections; more wait to be accepted. Default 20000.
    pub max_connections: usize,
    /// Most simultaneous connections from one IP address; more are told
    /// `TOO_MANY_CONNECTIONS` and closed. Default 256 (raise it when many
    /// devices share an address, as behind carrier-grade NAT).
    pub max_connections_per_address: usize,
    /// Most authenticated sessions of one account at once; a login beyond
    /// it closes the account's oldest session (`SESSION_REPLACED`).
    /// Default 8.
    pub max_sessions_per_account: usize,
    /// How long a connection may take to authenticate. Default `10s`.
    #[serde(with = "humantime_serde_compat")]
    pub auth_timeout: Duration,
    /// Most requests a connection may send before it authenticates; the
    /// next one closes it (`NOT_AUTHENTICATED`). Default 8.
    pub max_requests_before_auth: u32,
    /// An authenticated connection that sends nothing (not even a `Ping` or
    /// a WebSocket ping) for this long is closed (`IDLE_TIMEOUT`).
    /// Default `3m`; devices ping after 60 s of quiet.
    #[serde(with = "humantime_serde_compat")]
    pub idle_timeout: Duration,
    /// Requests per second one connection may sustain, and the burst it may
    /// send at once; a request over the rate is refused (`RATE_LIMITED`).
    /// Defaults 500 and 2000.
    pub requests_per_second: u32,
    pub request_burst: u32,
    /// Most one-time KeyPackages one device may keep at the server; an
    /// upload beyond it is refused (`QUOTA_EXCEEDED`). Default 200.
    pub max_key_packages: u32,
    /// Most groups one account may create. Default 1000.
    pub max_groups_per_account: u32,
    /// Most contact requests one account may send per hour. Default 60.
    pub contact_requests_per_hour: u32,
    /// Most devices one account may have at once (removed ones do not
    /// count; there is no lifetime count). Default 5.
    pub max_devices_per_account: u32,
    /// Most device log entries (adds and removes) one account may append
    /// per day. Default 20.
    pub device_changes_per_day: u32,
    /// Anonymous-send tokens one line may be issued per day (each pays for
    /// one message sent without logging in). Default 1000.
    pub anonymous_sends_per_day: u32,
    /// Bytes of anonymous messages one group may receive per hour (a
    /// message's size times its recipients), shared by all its members:
    /// nobody can tell whose they are, so one member flooding uses up the
    /// group's anonymous sending, not its ordinary traffic. Default
    /// 67108864 (64 MiB).
    pub anonymous_bytes_per_group_hour: u64,
    /// Bytes all open rendezvous (for linking devices) may hold together,
    /// in memory. Default 268435456 (256 MiB).
    pub max_rendezvous_bytes: u64,
    /// Bytes of deliveries one account may put into others' mailboxes per
    /// hour (a message's size times its recipients; commits and Welcomes
    /// count too). Default 268435456 (256 MiB).
    pub delivery_bytes_per_hour: u64,
    /// Largest file a device may send, in bytes: a blob larger than such a
    /// file's, padded and sealed (`docs/protocol.md`, "Attachments"), is
    /// refused with `BLOB_TOO_LARGE`. Default 104857600 (100 MiB).
    pub max_file_bytes: u64,
    /// Bytes of unfinished uploads one line may have at once; more:
    /// `QUOTA_EXCEEDED`. Default 268435456 (256 MiB).
    pub blob_bytes_in_flight_per_line: u64,
    /// Bytes of attachments one line may have at the server, finished or
    /// not (each is deleted once its recipients fetched it); more:
    /// `QUOTA_EXCEEDED`. Default 1073741824 (1 GiB).
    pub blob_bytes_per_line: u64,
    /// Bytes of attachments one line's devices may download per hour
    /// (beyond it: `QUOTA_EXCEEDED` until the hour refills it), so that a
    /// member reading a large file over and over cannot monopolise the
    /// server's disk. Default 4294967296 (4 GiB).
    pub blob_read_bytes_per_hour: u64,
    /// Bytes of attachments one line's devices may upload per hour (beyond
    /// it: `QUOTA_EXCEEDED` until the hour refills it). Default 2147483648
    /// (2 GiB: twenty of the largest files).
    pub blob_upload_bytes_per_hour: u64,
    /// Longest an attachment is kept: its conversation's timer, at least a
    /// day, at most this. Default `7d`.
    #[serde(with = "humantime_serde_compat")]
    pub blob_ttl: Duration,
    /// An upload that receives no bytes for this long is deleted. Default
    /// `1h`.
    #[serde(with = "humantime_serde_compat")]
    pub blob_upload_idle: Duration,
    /// Devices are told to upload KeyPackages when fewer than this many
    /// one-time ones remain at the server. Default 10.
    pub key_package_low_water: u32,
    /// Close a connection that sends this many malformed frames. Default 16.
    pub max_malformed_frames: u32,
    /// A line whose subscription ended can still redeem a renewal code for
    /// this long; then its server-side state is deleted. Default `30d`.
    #[serde(with = "humantime_serde_compat")]
    pub subscription_grace: Duration,
    /// A remote-wipe command signed longer ago than this is refused, so one
    /// that someone saw cannot be replayed later (each is also relayed only
    /// once). Default `1d`.
    #[serde(with = "humantime_serde_compat")]
    pub wipe_max_age: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([0, 0, 0, 0], 7443)),
            public_address: "127.0.0.1:7443".into(),
            metrics_listen: None,
            tls: true,
            cert: PathBuf::from("tls/cert.pem"),
            key: PathBuf::from("tls/key.pem"),
            database: PathBuf::from("umbra.db"),
            nats: None,
            max_database_bytes: 0,
            max_mailbox_bytes: 64 * 1024 * 1024,
            mailbox_ttl: Duration::from_secs(7 * 86_400),
            expiry_sweep_interval: Duration::from_secs(60),
            max_connections: 20_000,
            max_connections_per_address: 256,
            max_sessions_per_account: 8,
            auth_timeout: Duration::from_secs(10),
            max_requests_before_auth: 8,
            idle_timeout: Duration::from_secs(180),
            requests_per_second: 500,
            request_burst: 2000,
            max_key_packages: 200,
            max_groups_per_account: 1000,
            contact_requests_per_hour: 60,
            max_devices_per_account: 5,
            device_changes_per_day: 20,
            anonymous_sends_per_day: 1000,
            anonymous_bytes_per_group_hour: 64 * 1024 * 1024,
            max_rendezvous_bytes: 256 * 1024 * 1024,
            delivery_bytes_per_hour: 256 * 1024 * 1024,
            max_file_bytes: 100 * 1024 * 1024,
            blob_bytes_in_flight_per_line: 256 * 1024 * 1024,
            blob_bytes_per_line: 1024 * 1024 * 1024,
            blob_read_bytes_per_hour: 4 * 1024 * 1024 * 1024,
            blob_upload_bytes_per_hour: 2 * 1024 * 1024 * 1024,
            blob_ttl: Duration::from_secs(7 * 86_400),
            blob_upload_idle: Duration::from_secs(3600),
            key_package_low_water: 10,
            max_malformed_frames: 16,
            subscription_grace: Duration::from_secs(30 * 86_400),
            wipe_max_age: Duration::from_secs(86_400),
        }
    }
}

/// The configuration file `umbra-server init` writes: every field with its
/// default and what it means.
pub const DEFAULT_CONFIG_TEXT: &str = r#"# Umbra server configuration. Every field is optional; shown are the defaults.
# Environment variables override the file: UMBRA_LISTEN, UMBRA_PUBLIC_ADDRESS,
# UMBRA_TLS, UMBRA_MAILBOX_TTL, UMBRA_MAX_CONNECTIONS,
# UMBRA_MAX_CONNECTIONS_PER_ADDRESS, UMBRA_REQUESTS_PER_SECOND,
# UMBRA_DELIVERY_BYTES_PER_HOUR, UMBRA_METRICS_LISTEN, UMBRA_DATABASE,
# UMBRA_NATS.

# Address and port to listen on.
listen = "0.0.0.0:7443"

# Where to serve Prometheus metrics (GET /metrics) and health checks
# (GET /health: the store answers; GET /ready: accepting connections), over
# plain HTTP apart from the devices' port. Not served unless set; keep it on
# a private address.
# metrics_listen = "127.0.0.1:9464"

# host:port that devices connect to. Activation strings carry it, so set it to
# the name or address your users' devices can reach. A cluster lists every
# node, separated by commas ("n1.example:7443,n2.example:7443").
public_address = "127.0.0.1:7443"

# Serve TLS (wss://). Devices pin this server's certificate fingerprint.
# Plain ws:// is refused unless `listen` is a loopback address.
tls = true
cert = "tls/cert.pem"
key = "tls/key.pem"

# SQLite database (relative to this directory), and the largest size it may
# grow to in bytes (0: as far as the disk allows). When it is full, or the
# disk is, writes are refused with STORAGE_FULL while reads and deliveries go
# on; writes succeed again once delivered messages made room.
database = "umbra.db"
max_database_bytes = 0
# Or a PostgreSQL database, which several nodes may share (see
# docs/operations.md); its password, if any, goes in the environment
# variable UMBRA_DATABASE_PASSWORD, and max_database_bytes stays 0:
# database = "postgres://umbra@db.internal:5432/umbra"
# Several nodes on one PostgreSQL database wake each other's connections
# through NATS (the database stays the only truth; see docs/operations.md);
# a user named here logs in with the password in UMBRA_NATS_PASSWORD:
# nats = "nats://umbra@127.0.0.1:4222"

# Most bytes of messages one device's mailbox holds while it is away (0: no
# cap). Messages beyond it are not kept, and the device is told how many it
# missed when it returns; commits, Welcomes and contact requests are always
# kept, so it can still follow its groups.
max_mailbox_bytes = 67108864

# How long an undelivered message waits in a mailbox, and how often expired
# ones are swept away. Delivered messages are deleted as soon as the device
# acknowledges them.
mailbox_ttl = "7days"
expiry_sweep_interval = "1m"

# Most simultaneous connections, and most from one IP address (raise the
# second when many devices share an address, as behind carrier-grade NAT).
max_connections = 20000
max_connections_per_address = 256

# Most authenticated sessions of one account at once; a login beyond this
# closes the account's oldest session.
max_sessions_per_account = 8

# A connection must authenticate within auth_timeout and after at most
# max_requests_before_auth requests; an authenticated one that sends nothing
# for idle_timeout is closed (devices ping after 60 seconds of quiet).
auth_timeout = "10s"
max_requests_before_auth = 8
idle_timeout = "3m"

# Requests per second one connection may sustain, and the burst it may send
# at once; more are refused with RATE_LIMITED.
requests_per_second = 500
request_burst = 2000

# Per-account quotas: one-time KeyPackages kept at the server, groups
# created, contact requests sent per hour. Beyond them: QUOTA_EXCEEDED.
max_key_packages = 200
max_groups_per_account = 1000
contact_requests_per_hour = 60

# Devices one account may have at once (removed devices do not count, and
# there is no lifetime count), and device changes (adds and removes) one
# account may make per day. Beyond them: QUOTA_EXCEEDED.
max_devices_per_account = 5
device_changes_per_day = 20

# Tokens one line may be issued per day for sending to its groups without
# logging in (one token per message). Beyond it: QUOTA_EXCEEDED.
anonymous_sends_per_day = 1000
# Bytes of anonymous messages one group may receive per hour (size times
# recipients), shared by its members. Beyond it: QUOTA_EXCEEDED (members
# still send as themselves).
anonymous_bytes_per_group_hour = 67108864

# Bytes all open rendezvous may hold together (in memory): where a device
# being linked meets its account's existing device. Each lives ten minutes
# and holds at most 24 MiB. Beyond it: SERVER_BUSY.
max_rendezvous_bytes = 268435456

# Bytes of deliveries one account may put into others' mailboxes per hour (a
# message's size times its recipients), so that no account can fill the
# store for everyone. Beyond it: QUOTA_EXCEEDED until the hour refills it.
delivery_bytes_per_hour = 268435456

# Attachments (photos, voice notes, files): the largest file a device may
# upload (BLOB_TOO_LARGE beyond it), the bytes of unfinished uploads and of
# all attachments one line may have at the server (QUOTA_EXCEEDED beyond
# them), how long an attachment is kept at most (its conversation's timer,
# at least a day; it is deleted as soon as every recipient device fetched
# it), and how long an upload may stay idle before it is deleted.
max_file_bytes = 104857600
blob_bytes_in_flight_per_line = 268435456
blob_bytes_per_line = 1073741824
# Bytes of attachments one line's devices may download, and upload, per hour.
blob_read_bytes_per_hour = 4294967296
blob_upload_bytes_per_hour = 2147483648
blob_ttl = "7days"
blob_upload_idle = "1h"

# Devices are asked to upload KeyPackages below this many one-time ones.
key_package_low_water = 10

# Close a connection after this many malformed frames.
max_malformed_frames = 16

# A line whose subscription ended can still redeem a renewal code for this
# long; after that its server-side state (KeyPackages, mailbox, contacts,
# group memberships) is deleted.
subscription_grace = "30days"

# A remote-wipe command signed longer ago than this is refused (and each is
# relayed only once), so a command someone saw cannot be replayed. A relayed
# command waits for its device until the line ends, not just mailbox_ttl.
wipe_max_age = "1day"
"#;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a valid configuration: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("environment variable {name}={value:?} is invalid: {reason}")]
    Env {
        name: &'static str,
        value: String,
        reason: String,
    },
}

impl Config {
    /// The PostgreSQL database `database` names, if it is a `postgres://`
    /// (or `postgresql://`) URL rather than a file.
    pub fn postgres_url(&self) -> Option<&str> {
        let text = self.database.to_str()?;
        (text.starts_with("postgres://") || text.starts_with("postgresql://")).then_some(text)
    }

    /// Reads `umbra-server.toml` from `data_dir` (defaults if absent), then
    /// applies environment overrides.
    pub fn load(data_dir: &Path) -> Result<Config, ConfigError> {
        let path = data_dir.join(CONFIG_FILE);
        let mut config = match std::fs::read_to_string(&path) {
            Ok(text) => toml::from_str(&text).map_err(|source| ConfigError::Parse {
                path: path.clone(),
                source: Box::new(source),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Config::default(),
            Err(source) => return Err(ConfigError::Read { path, source }),
        };
        config.apply_env(|name| std::env::var(name).ok())?;
        Ok(config)
    }

    /// Applies `UMBRA_*` overrides read through `get`.
    pub fn apply_env(
        &mut self,
        get: impl Fn(&'static str) -> Option<String>,
    ) -> Result<(), ConfigError> {
        fn parse<T: std::str::FromStr>(name: &'static str, value: String) -> Result<T, ConfigError>
        where
            T::Err: std::fmt::Display,
        {
            value.parse().map_err(|e: T::Err| ConfigError::Env {
                name,
                reason: e.to_string(),
                value,
            })
        }
        if let Some(v) = get("UMBRA_LISTEN") {
            self.listen = parse("UMBRA_LISTEN", v)?;
        }
        if let Some(v) = get("UMBRA_DATABASE") {
            self.database = PathBuf::from(v);
        }
        if let Some(v) = get("UMBRA_NATS") {
            self.nats = Some(v);
        }
        if let Some(v) = get("UMBRA_METRICS_LISTEN") {
            self.metrics_listen = Some(parse("UMBRA_METRICS_LISTEN", v)?);
        }
        if let Some(v) = get("UMBRA_PUBLIC_ADDRESS") {
            self.public_address = v;
        }
        if let Some(v) = get("UMBRA_TLS") {
            self.tls = parse("UMBRA_TLS", v)?;
        }
        if let Some(v) = get("UMBRA_MAILBOX_TTL") {
            self.mailbox_ttl = parse::<humantime::Duration>("UMBRA_MAILBOX_TTL", v)?.into();
        }
        if let Some(v) = get("UMBRA_MAX_CONNECTIONS") {
            self.max_connections = parse("UMBRA_MAX_CONNECTIONS", v)?;
        }
        if let Some(v) = get("UMBRA_MAX_CONNECTIONS_PER_ADDRESS") {
            self.max_connections_per_address = parse("UMBRA_MAX_CONNECTIONS_PER_ADDRESS", v)?;
        }
        if let Some(v) = get("UMBRA_DELIVERY_BYTES_PER_HOUR") {
            self.delivery_bytes_per_hour = parse("UMBRA_DELIVERY_BYTES_PER_HOUR", v)?;
        }
        if let Some(v) = get("UMBRA_REQUESTS_PER_SECOND") {
            self.requests_per_second = parse("UMBRA_REQUESTS_PER_SECOND", v)?;
            self.request_burst = self.request_burst.max(self.requests_per_second);
        }
        Ok(())
    }
}

/// serde adapter for durations written as "7days", "90s", "1m".
mod humantime_serde_compat {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&humantime::format_duration(*value).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(deserializer)?;
        humantime::parse_duration(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_defaults_are_the_defaults() {
        let parsed: Config = toml::from_str(DEFAULT_CONFIG_TEXT).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(parsed, Config::default());
    }

    #[test]
    fn environment_overrides_and_errors() {
        let mut config = Config::default();
        config
            .apply_env(|name| match name {
                "UMBRA_MAILBOX_TTL" => Some("2h".into()),
                "UMBRA_TLS" => Some("false".into()),
                _ => None,
            })
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.mailbox_ttl, Duration::from_secs(7200));
        assert!(!config.tls);
        let error = config
            .apply_env(|name| (name == "UMBRA_LISTEN").then(|| "nowhere".into()))
            .err()
            .map(|e| e.to_string());
        assert!(error.is_some_and(|e| e.contains("UMBRA_LISTEN")));
    }
}
