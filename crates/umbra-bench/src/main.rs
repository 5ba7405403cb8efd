//! `umbra-bench`: see the crate documentation and docs/benchmarks.md.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use serde_json::{Value, json};
use umbra_bench::system::{System, Topology};
use umbra_bench::umbra::{ServerSpec, UmbraSystem};
use umbra_bench::{failover, files, peers, report, workload};

/// Load generator for Umbra and its peers. Each workload starts the server
/// under test itself (pinned to --server-cpu), sets up devices over the real
/// protocol, measures, and writes one JSON result into --results.
#[derive(Debug, Parser)]
#[command(name = "umbra-bench", version)]
struct Cli {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    workload: Workload,
}

#[derive(Debug, Args)]
struct Common {
    /// System under test: umbra, nats, mosquitto or ejabberd.
    #[arg(long, global = true, default_value = "umbra")]
    system: String,
    /// Serve TLS (Umbra; the peers run without TLS).
    #[arg(long, global = true)]
    tls: bool,
    /// The umbra-server binary (default: next to this one).
    #[arg(long, global = true)]
    server_bin: Option<PathBuf>,
    /// CPU to pin the server to (the generator should run on another one,
    /// e.g. `taskset -c 1 umbra-bench ...`).
    #[arg(long, global = true)]
    server_cpu: Option<u32>,
    /// Where fixtures and peer working directories live.
    #[arg(long, global = true, default_value = "target/umbra-bench")]
    work: PathBuf,
    /// Where the JSON result goes (one file per run).
    #[arg(long, global = true, default_value = "target/umbra-bench/results")]
    results: PathBuf,
    /// Small sizes that finish in seconds: a smoke test, not a measurement.
    #[arg(long, global = true)]
    quick: bool,
    /// Payload size in bytes.
    #[arg(long, global = true, default_value_t = 256)]
    size: usize,
    /// Devices per account (relay and fanout, Umbra only): each account's
    /// further devices are added to its device log and to every group it
    /// is in, so each message also goes to them and to the sender's own
    /// other devices. Group sizes stay counted in accounts.
    #[arg(long, global = true, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    devices_per_account: u32,
    /// Umbra nodes (cluster mode, 2 or more): that many umbra-server
    /// processes on one PostgreSQL and one NATS server the bench starts
    /// for the run (PostgreSQL's server binaries and nats-server must be
    /// installed); device i uses node i mod N, so a relay pair's two
    /// devices are on different nodes.
    #[arg(long, global = true, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    nodes: u32,
    /// Umbra on a private PostgreSQL and NATS even with one node (implied
    /// by --nodes 2 or more): the single-node figure beside a cluster's.
    #[arg(long, global = true)]
    postgres: bool,
    /// With PostgreSQL: count where PostgreSQL spends its time
    /// (pg_stat_statements) during the workload, and write the top
    /// statements to this file when the run ends.
    #[arg(long, global = true)]
    pg_profile: Option<PathBuf>,
}

impl Common {
    /// Refuses more than one device per account where it means nothing:
    /// workloads other than relay and fanout, and the peers (which have no
    /// accounts of several devices).
    fn single_device_only(&self, workload: &str) -> Result<()> {
        if self.devices_per_account != 1 {
            bail!(
                "--devices-per-account {} is for the relay and fanout workloads; {workload} \
                 runs with one device per account",
                self.devices_per_account
            );
        }
        Ok(())
    }

    fn several_devices_on_umbra_only(&self) -> Result<()> {
        if self.devices_per_account != 1 && self.system != "umbra" {
            bail!(
                "--devices-per-account {}: accounts of several devices are Umbra's; {} has none",
                self.devices_per_account,
                self.system
            );
        }
        Ok(())
    }
}

#[derive(Debug, Subcommand)]
enum Workload {
    /// Connected, authenticated, idle devices: server memory per connection.
    Idle {
        #[arg(long, default_value_t = 19_000)]
        devices: u32,
    },
    /// 1:1 pairs exchanging messages at fixed offered rates (open loop).
    Relay {
        #[arg(long, default_value_t = 1000)]
        pairs: u32,
        /// Offered messages per second, one measurement each.
        #[arg(long, value_delimiter = ',', default_values_t = [5000.0, 20000.0, 40000.0, 60000.0])]
        rates: Vec<f64>,
        /// Length of each measurement.
        #[arg(long, default_value = "20s")]
        duration: humantime::Duration,
    },
    /// Recipients offline: durable accept rate, SIGKILL and restart, drain.
    Offline {
        #[arg(long, default_value_t = 200)]
        pairs: u32,
        #[arg(long, default_value_t = 500)]
        per_sender: u64,
        /// Do not kill the server between accepting and draining.
        #[arg(long)]
        no_kill: bool,
    },
    /// Groups: one sender per group, deliveries per second and latency.
    Fanout {
        /// Group sizes, in accounts (each of --devices-per-account devices).
        #[arg(long, value_delimiter = ',', default_values_t = [10, 100, 1000])]
        groups: Vec<u32>,
        /// Deliveries per second offered to each group.
        #[arg(long, default_value_t = 20000.0)]
        deliveries_rate: f64,
        #[arg(long, default_value = "10s")]
        duration: humantime::Duration,
    },
    /// Every device connects at once and drains its backlog.
    Storm {
        #[arg(long, default_value_t = 19_000)]
        devices: u32,
        /// Messages waiting for each receiving device.
        #[arg(long, default_value_t = 5)]
        backlog: u64,
    },
    /// Sky ECC's day at 100x: 6M messages/day is 69.4/s, so 6,944/s, with
    /// 70% of devices online at every moment and churning (one leaves and
    /// another returns every 100 ms); 864 s replays the whole day.
    Soak {
        #[arg(long, default_value_t = 5000)]
        pairs: u32,
        #[arg(long, default_value_t = 6944.0)]
        rate: f64,
        #[arg(long, default_value = "864s")]
        duration: humantime::Duration,
        #[arg(long, default_value_t = 0.7)]
        online: f64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Cluster mode only (--nodes 2 or more): relay across nodes at a fixed
    /// rate while the last node is killed with SIGKILL; its devices move
    /// to the next node at once, and the run reports how long until each
    /// is served again (logged in, its backlog pushed) and whether any
    /// accepted message was lost.
    Failover {
        #[arg(long, default_value_t = 200)]
        pairs: u32,
        /// Offered messages per second, across every sender.
        #[arg(long, default_value_t = 500.0)]
        rate: f64,
        #[arg(long, default_value = "20s")]
        duration: humantime::Duration,
        /// When the node is killed, from the start of sending.
        #[arg(long, default_value = "5s")]
        kill_after: humantime::Duration,
    },
    /// Attachments: upload and download throughput and server CPU per MB
    /// for files of each size, one transfer at a time, then many at once
    /// and the server's memory meanwhile (--system umbra --tls, or nginx).
    Files {
        /// File sizes moved one at a time, in bytes.
        #[arg(long, value_delimiter = ',', default_values_t = [1_048_576u64, 104_857_600])]
        sizes: Vec<u64>,
        /// Transfers at once.
        #[arg(long, default_value_t = 100)]
        concurrent: u32,
        /// Size of each of those files, in bytes.
        #[arg(long, default_value_t = 104_857_600)]
        concurrent_size: u64,
    },
    /// Regenerates docs/benchmarks.md and its plot from JSON results.
    Report {
        /// Directory of JSON results.
        #[arg(long, default_value = "docs/bench/results")]
        from: PathBuf,
        /// The Markdown file to write (the SVG plot goes beside it).
        #[arg(long, default_value = "docs/benchmarks.md")]
        out: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
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

fn server_bin(common: &Common) -> Result<PathBuf> {
    if let Some(bin) = &common.server_bin {
        return Ok(bin.clone());
    }
    let me = std::env::current_exe()?;
    let beside = me.with_file_name("umbra-server");
    if beside.exists() {
        return Ok(beside);
    }
    bail!(
        "no umbra-server next to {}; pass --server-bin",
        me.display()
    )
}

async fn system_for(
    common: &Common,
    topology: &Topology,
    sizes: &[usize],
) -> Result<Arc<dyn System>> {
    std::fs::create_dir_all(&common.work)?;
    if common.pg_profile.is_some() && !(common.nodes > 1 || common.postgres) {
        bail!("--pg-profile profiles the PostgreSQL of --postgres or --nodes N");
    }
    if common.system == "umbra" {
        let spec = ServerSpec {
            bin: server_bin(common)?,
            tls: common.tls,
            cpu: common.server_cpu,
        };
        let system = if common.nodes > 1 || common.postgres {
            UmbraSystem::prepare_cluster(
                &spec,
                &common.work,
                topology,
                sizes,
                common.nodes,
                common.pg_profile.clone(),
            )
            .await?
        } else {
            UmbraSystem::prepare(&spec, &common.work, topology, sizes).await?
        };
        return Ok(Arc::new(system));
    }
    if common.nodes > 1 || common.postgres {
        bail!(
            "--nodes and --postgres are for Umbra; {} runs as one server",
            common.system
        );
    }
    peers::start(&common.system, &common.work, common.server_cpu, topology).await
}

async fn run(cli: Cli) -> Result<()> {
    let common = &cli.common;
    let quick = common.quick;
    let size = common.size;
    let (name, result): (&str, Value) = match cli.workload {
        Workload::Report { from, out } => {
            return report::write(&from, &out);
        }
        Workload::Idle { devices } => {
            common.single_device_only("idle")?;
            let devices = if quick { 200 } else { devices };
            let topology = Topology::idle(devices);
            let system = system_for(common, &topology, &[size]).await?;
            let settle = Duration::from_secs(if quick { 1 } else { 5 });
            let result = workload::idle(&system, &topology, settle).await?;
            eprintln!(
                "  {}: {} devices, {:.1} KiB per connection",
                system.name(),
                devices,
                result.kib_per_connection
            );
            (
                "idle",
                json!({"system": system.name(), "durability": system.durability(), "result": result}),
            )
        }
        Workload::Relay {
            pairs,
            rates,
            duration,
        } => {
            let (pairs, rates, duration) = if quick {
                (20, vec![500.0], Duration::from_secs(3))
            } else {
                (pairs, rates, duration.into())
            };
            common.several_devices_on_umbra_only()?;
            let per_account = common.devices_per_account;
            let topology = Topology::pairs_with(pairs, per_account);
            let system = system_for(common, &topology, &[size]).await?;
            let points = workload::relay(&system, &topology, &rates, size, duration).await?;
            (
                "relay",
                json!({"system": system.name(), "durability": system.durability(), "pairs": pairs,
                       "devices_per_account": per_account, "points": points}),
            )
        }
        Workload::Offline {
            pairs,
            per_sender,
            no_kill,
        } => {
            common.single_device_only("offline")?;
            let (pairs, per_sender) = if quick { (10, 50) } else { (pairs, per_sender) };
            let topology = Topology::pairs(pairs);
            let system = system_for(common, &topology, &[size]).await?;
            let result = workload::offline(&system, &topology, per_sender, size, !no_kill).await?;
            eprintln!(
                "  {}: accepted {:.0}/s, drained {:.0}/s, lost {} (killed: {})",
                system.name(),
                result.accepted_per_s,
                result.drained_per_s,
                result.lost,
                result.killed
            );
            (
                "offline",
                json!({"system": system.name(), "durability": system.durability(), "pairs": pairs, "result": result}),
            )
        }
        Workload::Fanout {
            groups,
            deliveries_rate,
            duration,
        } => {
            let (groups, deliveries_rate, duration) = if quick {
                (vec![5, 20], 500.0, Duration::from_secs(2))
            } else {
                (groups, deliveries_rate, duration.into())
            };
            common.several_devices_on_umbra_only()?;
            let per_account = common.devices_per_account;
            let topology = Topology::groups_with(&groups, per_account);
            let system = system_for(common, &topology, &[size]).await?;
            let points =
                workload::fanout(&system, &topology, deliveries_rate, size, duration).await?;
            (
                "fanout",
                json!({"system": system.name(), "durability": system.durability(), "groups": groups,
                       "devices_per_account": per_account, "points": points}),
            )
        }
        Workload::Storm { devices, backlog } => {
            common.single_device_only("storm")?;
            let devices = if quick { 100 } else { devices };
            let topology = Topology::pairs(devices / 2);
            let system = system_for(common, &topology, &[size]).await?;
            let result = workload::storm(&system, &topology, backlog, size).await?;
            eprintln!(
                "  {}: {} devices connected in {:.1} s, drained in {:.1} s, lost {}",
                system.name(),
                result.devices,
                result.seconds_to_connected,
                result.seconds_to_drained,
                result.lost
            );
            (
                "storm",
                json!({"system": system.name(), "durability": system.durability(), "result": result}),
            )
        }
        Workload::Failover {
            pairs,
            rate,
            duration,
            kill_after,
        } => {
            common.single_device_only("failover")?;
            if common.nodes < 2 {
                bail!("failover kills one node of a cluster: run it with --nodes 2 or more");
            }
            let (pairs, rate, duration, kill_after) = if quick {
                (20, 200.0, Duration::from_secs(4), Duration::from_secs(1))
            } else {
                (pairs, rate, duration.into(), kill_after.into())
            };
            let topology = Topology::pairs(pairs);
            let system = system_for(common, &topology, &[size]).await?;
            let result =
                failover::failover(&system, &topology, rate, size, duration, kill_after).await?;
            eprintln!(
                "  {}: {} devices moved, served again p50 {:.0} ms p99 {:.0} ms max {:.0} ms; \
                 accepted {} lost {} dup {} unanswered {}; p99 {:.1} ms",
                system.name(),
                result.devices_moved,
                result.served_again_p50_ms,
                result.served_again_p99_ms,
                result.served_again_max_ms,
                result.observed.accepted,
                result.lost,
                result.observed.duplicates,
                result.unanswered,
                result.observed.p99_ms
            );
            (
                "failover",
                json!({"system": system.name(), "durability": system.durability(), "pairs": pairs, "result": result}),
            )
        }
        Workload::Files {
            sizes,
            concurrent,
            concurrent_size,
        } => {
            common.single_device_only("files")?;
            let plan = if quick {
                files::Plan {
                    sizes: vec![1 << 20, 8 << 20],
                    concurrent: 4,
                    concurrent_size: 4 << 20,
                }
            } else {
                files::Plan {
                    sizes,
                    concurrent,
                    concurrent_size,
                }
            };
            let server: Box<dyn files::FileServer> = match common.system.as_str() {
                "nginx" => {
                    std::fs::create_dir_all(&common.work)?;
                    Box::new(peers::nginx::start(&common.work, common.server_cpu).await?)
                }
                "umbra" => {
                    if !common.tls {
                        bail!("the files workload measures Umbra as devices reach it: pass --tls");
                    }
                    let topology = Topology::pairs(plan.slots());
                    let spec = ServerSpec {
                        bin: server_bin(common)?,
                        tls: true,
                        cpu: common.server_cpu,
                    };
                    std::fs::create_dir_all(&common.work)?;
                    let system =
                        UmbraSystem::prepare(&spec, &common.work, &topology, &[size]).await?;
                    Box::new(files::UmbraFiles { system })
                }
                other => bail!("the files workload runs on umbra or nginx, not {other}"),
            };
            let result = files::files(server.as_ref(), &plan).await?;
            ("files", json!({"system": server.name(), "result": result}))
        }
        Workload::Soak {
            pairs,
            rate,
            duration,
            online,
            seed,
        } => {
            common.single_device_only("soak")?;
            let (pairs, rate, duration) = if quick {
                (50, 300.0, Duration::from_secs(5))
            } else {
                (pairs, rate, duration.into())
            };
            let sizes = [256, 1024, 4096];
            let topology = Topology::pairs(pairs);
            let system = system_for(common, &topology, &sizes).await?;
            let churn_every = Duration::from_millis(if quick { 200 } else { 100 });
            let result = workload::soak(
                &system,
                &topology,
                rate,
                &sizes,
                duration,
                online,
                churn_every,
                seed,
            )
            .await?;
            eprintln!(
                "  {}: {:.0} msgs/s for {:.0} s, p99 {:.2} ms, lost {}, errors {}, RSS {} -> {} KiB",
                system.name(),
                result.rate_per_s,
                result.seconds,
                result.observed.p99_ms,
                result.lost,
                result.errors,
                result.server.rss_start_kib,
                result.server.rss_end_kib
            );
            (
                "soak",
                json!({"system": system.name(), "durability": system.durability(), "pairs": pairs, "result": result}),
            )
        }
    };
    let mut record = result;
    if let Some(object) = record.as_object_mut() {
        object.insert("workload".into(), json!(name));
        object.insert("tls".into(), json!(common.tls));
        object.insert("size".into(), json!(size));
        object.insert("quick".into(), json!(quick));
        object.insert(
            "command".into(),
            json!(std::env::args().collect::<Vec<_>>().join(" ")),
        );
        object.insert("machine".into(), json!(report::machine()));
        object.insert(
            "finished_at".into(),
            json!(umbra_bench::stamp::now_ns() / 1_000_000_000),
        );
    }
    std::fs::create_dir_all(&common.results)?;
    let slug: String = common
        .system
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .collect();
    let file = common.results.join(format!(
        "{name}-{slug}{}-{}.json",
        if common.tls { "-tls" } else { "" },
        umbra_bench::stamp::now_ns()
    ));
    std::fs::write(&file, serde_json::to_vec_pretty(&record)?)
        .with_context(|| format!("writing {}", file.display()))?;
    println!("{}", file.display());
    Ok(())
}
