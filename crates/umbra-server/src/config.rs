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
    /// `host:port` that devices connect to; activation strings carry it.
    /// Default `127.0.0.1:7443`.
    pub public_address: String,
    /// Serve TLS (`wss://`). Default true. Plain `ws://` is refused unless
    /// `listen` is a loopback address: it exists for tests only.
    pub tls: bool,
    /// Certificate and private key (PEM), relative to the data directory.
    /// Defaults `tls/cert.pem` and `tls/key.pem`, made by `umbra-server init`.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// SQLite database file, relative to the data directory. Default `umbra.db`.
    pub database: PathBuf,
    /// How long an undelivered message waits in a mailbox. Default `7d`.
    #[serde(with = "humantime_serde_compat")]
    pub mailbox_ttl: Duration,
    /// How often expired mailbox items are deleted. Default `1m`.
    #[serde(with = "humantime_serde_compat")]
    pub expiry_sweep_interval: Duration,
    /// Most simultaneous connections; more wait to be accepted. Default 20000.
    pub max_connections: usize,
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
            tls: true,
            cert: PathBuf::from("tls/cert.pem"),
            key: PathBuf::from("tls/key.pem"),
            database: PathBuf::from("umbra.db"),
            mailbox_ttl: Duration::from_secs(7 * 86_400),
            expiry_sweep_interval: Duration::from_secs(60),
            max_connections: 20_000,
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
# UMBRA_TLS, UMBRA_MAILBOX_TTL, UMBRA_MAX_CONNECTIONS.

# Address and port to listen on.
listen = "0.0.0.0:7443"

# host:port that devices connect to. Activation strings carry it, so set it to
# the name or address your users' devices can reach.
public_address = "127.0.0.1:7443"

# Serve TLS (wss://). Devices pin this server's certificate fingerprint.
# Plain ws:// is refused unless `listen` is a loopback address.
tls = true
cert = "tls/cert.pem"
key = "tls/key.pem"

# SQLite database (relative to this directory).
database = "umbra.db"

# How long an undelivered message waits in a mailbox, and how often expired
# ones are swept away. Delivered messages are deleted as soon as the device
# acknowledges them.
mailbox_ttl = "7days"
expiry_sweep_interval = "1m"

# Most simultaneous connections.
max_connections = 20000

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
