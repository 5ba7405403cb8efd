//! `umbra-server`: run the relay, prepare its data directory, and the
//! operator's administration commands.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use umbra_server::{Clock, Config, ServerOptions, SystemClock, admin};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The Umbra relay: stores and forwards end-to-end-encrypted messages
/// between devices. It never sees a private key or a plaintext.
#[derive(Debug, Parser)]
#[command(name = "umbra-server", version, about, long_about = None)]
struct Cli {
    /// Data directory: configuration, TLS certificate and database.
    #[arg(long, global = true, env = "UMBRA_DATA", default_value = "umbra-data")]
    data: PathBuf,
    /// How log lines are written to standard error: `text` for people
    /// (coloured only on a terminal), `json` (one object per line) for a
    /// log collector. The level comes from `UMBRA_LOG` (default `info`).
    #[arg(long, global = true, env = "UMBRA_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create the data directory: a documented configuration file, an
    /// anchor certificate whose fingerprint devices will pin, and a TLS
    /// certificate the anchor issued for 90 days (renew it with `admin
    /// rotate-tls`).
    Init {
        /// host:port that devices will connect to.
        #[arg(long, default_value = "127.0.0.1:7443")]
        public_address: String,
    },
    /// Run the server (initialising the data directory first if it is new).
    Run,
    /// Operator commands.
    Admin {
        #[command(subcommand)]
        command: AdminCommand,
    },
}

#[derive(Debug, Subcommand)]
enum AdminCommand {
    /// Activation codes for new lines, and renewal codes.
    Codes {
        #[command(subcommand)]
        command: CodesCommand,
    },
    /// Distributors: resellers who issue codes within a quota and manage
    /// their own lines (never content, contacts or groups).
    Distributors {
        #[command(subcommand)]
        command: DistributorsCommand,
    },
    /// Copy the data directory to a new directory while the server runs: a
    /// consistent copy of the database (SQLite's VACUUM INTO, checked with
    /// integrity_check), the configuration, the TLS certificate and key,
    /// and the delivery-ID key. It holds secrets: keep it as the data
    /// directory is kept.
    Backup {
        /// A directory that does not exist yet.
        destination: PathBuf,
    },
    /// Issue a new TLS certificate and key with the anchor devices pinned,
    /// replacing the ones the server presents; then send the running server
    /// SIGHUP (`systemctl reload umbra-server`) and it shows the new one to
    /// every new connection. No device changes anything. Run it before the
    /// certificate expires (the server warns two weeks ahead). It does not
    /// revoke: a leaked TLS key stays usable until its certificate expires,
    /// so keep --days short. For a cluster, copy the certificate and key
    /// to every node (or point --anchor-key at a copy of the anchor's key
    /// and run it on each node). A data directory made before rotation
    /// existed turns its certificate into the anchor first, so its devices
    /// keep their pin too.
    RotateTls {
        /// Validity of the new certificate, in days.
        #[arg(long, default_value_t = umbra_server::tls::DEFAULT_DAYS)]
        days: u32,
        /// The anchor's private key, if it is kept outside the data
        /// directory (default: tls/anchor.key beside the certificate).
        #[arg(long)]
        anchor_key: Option<PathBuf>,
    },
    /// Make the data directory (which must hold no database) a copy of a
    /// backup; then start the server on it with `run`. Devices keep
    /// working: the certificate they pinned is restored with it.
    Restore {
        /// A directory made by `admin backup`.
        backup: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum DistributorsCommand {
    /// Add a distributor. Prints its credential once: hand it over securely;
    /// it runs `umbra distributor --credential ...`.
    Add {
        name: String,
        /// How many codes (activation or renewal) it may issue.
        #[arg(long)]
        quota: u32,
    },
    /// List distributors and their remaining quota.
    List,
}

#[derive(Debug, Subcommand)]
enum CodesCommand {
    /// Issue one-time activation codes. Prints one activation string per
    /// code (and a QR code for a single one) to hand to the new user, who
    /// runs `umbra activate STRING`.
    Issue {
        /// Subscription length each code grants, in days.
        #[arg(long, default_value_t = 180)]
        days: u32,
        /// How many codes to issue.
        #[arg(long, default_value_t = 1)]
        count: usize,
        /// Print a QR code under every activation string.
        #[arg(long)]
        qr: bool,
        /// Issue renewal codes (days added to an existing line) instead.
        #[arg(long)]
        renewal: bool,
    },
}

fn main() -> ExitCode {
    // Transparent huge pages back the allocator's memory in 2 MiB pages
    // that stay resident while any byte of them is live: in the soak they
    // were 172 of the server's 310 MiB and made its memory climb in steps
    // for as long as it ran (see ARCHITECTURE.md, "Known limits"). Off for
    // this process only; failing that (an old kernel), it runs as before.
    #[cfg(target_os = "linux")]
    let _ = rustix::thread::disable_transparent_huge_pages(true);
    let cli = Cli::parse();
    // The PostgreSQL driver logs every statement's parameters at debug
    // level (ciphertexts, token keys), from its `query` module: never below
    // info, whatever UMBRA_LOG asks (a directive for the same target is
    // replaced, and these are the driver's and that module's own).
    let mut filter =
        tracing_subscriber::EnvFilter::try_from_env("UMBRA_LOG").unwrap_or_else(|_| "info".into());
    for quiet in ["tokio_postgres=info", "tokio_postgres::query=info"] {
        if let Ok(directive) = quiet.parse() {
            filter = filter.add_directive(directive);
        }
    }
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Json => logs.json().init(),
        LogFormat::Text => {
            use std::io::IsTerminal;
            // Colour on a terminal only, and never when NO_COLOR is set.
            let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
            logs.with_ansi(colour).init();
        }
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Init { public_address } => {
            let pin = umbra_server::init(&cli.data, &public_address)?;
            println!("Initialised {}", cli.data.display());
            println!("Anchor fingerprint (devices pin it): {pin}");
            println!(
                "Next: umbra-server --data {} admin codes issue --days 180",
                cli.data.display()
            );
        }
        Command::Run => {
            // Before anything else: SIGHUP's default action ends a process.
            let options = ServerOptions::default();
            reload_on_hangup(std::sync::Arc::clone(&options.reload_tls));
            if !cli.data.join(umbra_server::config::CONFIG_FILE).exists() {
                let pin = umbra_server::init(&cli.data, "127.0.0.1:7443")?;
                eprintln!(
                    "Initialised a new data directory {} (devices pin {pin})",
                    cli.data.display()
                );
            }
            let config = Config::load(&cli.data)?;
            let listener = tokio::net::TcpListener::bind(config.listen)
                .await
                .with_context(|| format!("cannot listen on {}", config.listen))?;
            let shutdown = CancellationToken::new();
            let on_signal = shutdown.clone();
            tokio::spawn(async move {
                wait_for_signal().await;
                on_signal.cancel();
            });
            umbra_server::run(config, cli.data.clone(), listener, shutdown, options).await?;
        }
        Command::Admin {
            command: AdminCommand::Restore { backup },
        } => {
            let restored = admin::restore(&backup, &cli.data)?;
            eprintln!(
                "Restored {} files into {}; start the server with `umbra-server run`.",
                restored.len(),
                cli.data.display()
            );
        }
        Command::Admin { command } => {
            anyhow::ensure!(
                cli.data.join(umbra_server::config::CONFIG_FILE).exists(),
                "{} is not an Umbra data directory; run `umbra-server init` first",
                cli.data.display()
            );
            let config = Config::load(&cli.data)?;
            admin_command(&cli.data, &config, command).await?;
        }
    }
    Ok(())
}

async fn admin_command(
    data: &std::path::Path,
    config: &Config,
    command: AdminCommand,
) -> anyhow::Result<()> {
    match command {
        AdminCommand::Backup { destination } => {
            let copied = admin::backup(data, config, &destination)?;
            for file in &copied {
                println!("{}", destination.join(file).display());
            }
            eprintln!(
                "Backed up {} files into {}. It holds the TLS key: keep it as the data directory is kept.",
                copied.len(),
                destination.display()
            );
        }
        AdminCommand::RotateTls { days, anchor_key } => {
            anyhow::ensure!(
                (1..=825).contains(&days),
                "--days must be 1 to 825 (a short life limits what a stolen key is worth)"
            );
            let issued = umbra_server::tls::rotate(
                &data.join(&config.cert),
                &data.join(&config.key),
                anchor_key.as_deref(),
                umbra_server::tls::names_for(&config.public_address),
                days,
                SystemClock.now(),
            )?;
            println!("{}", data.join(&config.cert).display());
            eprintln!(
                "Issued a new TLS certificate for {}, valid {days} days (until Unix time {}); \
                 devices keep their pin {}. Send the running server SIGHUP to present it.",
                config.public_address, issued.not_after, issued.pin
            );
        }
        // Into a data directory that holds nothing yet: `run` handles it
        // before checking for one.
        AdminCommand::Restore { .. } => {
            anyhow::bail!("restore into a new data directory (see `admin restore --help`)")
        }
        AdminCommand::Distributors { command } => match command {
            DistributorsCommand::Add { name, quota } => {
                let credential =
                    admin::add_distributor(data, config, &name, quota, SystemClock.now()).await?;
                println!("{credential}");
                eprintln!(
                    "Distributor {name:?} added (ID {}, quota {quota}). Hand it the line above, once, securely.",
                    credential.id
                );
            }
            DistributorsCommand::List => {
                for distributor in admin::distributors(data, config).await? {
                    println!(
                        "{:>4}  {}  quota {}",
                        distributor.id, distributor.name, distributor.quota
                    );
                }
            }
        },
        AdminCommand::Codes {
            command:
                CodesCommand::Issue {
                    days,
                    count,
                    qr,
                    renewal,
                },
        } => {
            anyhow::ensure!(
                (1..=100_000).contains(&count),
                "--count must be 1 to 100000"
            );
            if renewal {
                for code in
                    admin::issue_renewal_codes(data, config, days, count, SystemClock.now()).await?
                {
                    println!("{}", code.grouped());
                }
                eprintln!(
                    "Issued {count} renewal code(s), {days} days each: `umbra renew CODE` on the device."
                );
                return Ok(());
            }

            let strings = admin::issue_codes(data, config, days, count, SystemClock.now()).await?;
            for string in &strings {
                println!("{string}");
                if (qr || count == 1)
                    && let Some(code) = admin::qr_text(&string.to_string())
                {
                    println!("{code}");
                }
            }
            eprintln!(
                "Issued {count} activation code(s), {days} days each. Each works once: hand each string to one user, who runs `umbra activate STRING`."
            );
        }
    }
    Ok(())
}

/// SIGHUP: read the TLS certificate and key again (after `admin
/// rotate-tls`).
fn reload_on_hangup(reload: std::sync::Arc<tokio::sync::Notify>) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::hangup()) {
            Ok(mut hangup) => {
                tokio::spawn(async move {
                    while hangup.recv().await.is_some() {
                        reload.notify_one();
                    }
                });
            }
            Err(error) => tracing::warn!(%error, "cannot listen for SIGHUP"),
        }
    }
    #[cfg(not(unix))]
    let _ = reload;
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
