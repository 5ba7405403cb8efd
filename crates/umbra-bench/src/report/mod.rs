//! `docs/benchmarks.md` from the JSON results: tables per workload with the
//! median and range over runs, ratios against the peers, and an SVG plot.
//!
//! The report reads whatever the records hold and writes "–" for anything
//! missing, so a partial or older set of results still gives a report.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use serde_json::{Value, json};

mod files;

/// The latency bar of `BENCH.md`, in milliseconds.
const P99_BAR_MS: f64 = 50.0;
/// A rate is "held" when at least this share of what was sent arrived.
const HELD_DELIVERED: f64 = 0.99;
/// The plot, written beside the Markdown file.
const PLOT_FILE: &str = "benchmarks-relay-p99.svg";
/// The payload size the bar is about.
const DEFAULT_SIZE: u64 = 256;
/// Sky ECC's day at 100×, in seconds: the soak the bar is about.
const DAY_AT_100X_S: u64 = 864;
/// Generator CPU above which the generator, not the server, may have been
/// the limit.
const GENERATOR_SATURATED_PERCENT: f64 = 90.0;

/// A figure out of a record or a rate point.
type Metric = fn(&Value) -> Option<f64>;
/// How a figure is shown.
type Show = fn(f64) -> String;

/// Facts about this machine for the report.
pub fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_default();
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| text.lines().next().map(str::to_owned))
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned();
    json!({
        "cpu": cpu,
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "memory": memory,
        "kernel": kernel,
    })
}

/// Reads every `*.json` result in `from` (quick runs are skipped) and writes
/// the Markdown report to `out` and the relay plot beside it.
pub fn write(from: &Path, out: &Path) -> Result<()> {
    let loaded = load(from)?;
    let report = Report::new(&loaded.records);
    let mut md = String::new();
    report.header(&mut md, from, &loaded);
    report.durability(&mut md);
    report.relay(&mut md);
    report.fanout(&mut md);
    report.device_cost(&mut md);
    report.idle(&mut md);
    report.offline(&mut md);
    report.storm(&mut md);
    report.soak(&mut md);
    report.files(&mut md);
    report.ratios(&mut md);
    report.bar(&mut md);
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let plot = out.with_file_name(PLOT_FILE);
    std::fs::write(&plot, report.plot()).with_context(|| format!("writing {}", plot.display()))?;
    std::fs::write(out, md).with_context(|| format!("writing {}", out.display()))?;
    eprintln!(
        "report: {} results ({} quick skipped, {} unreadable) -> {} and {}",
        loaded.records.len(),
        loaded.quick,
        loaded.unreadable,
        out.display(),
        plot.display()
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// Loading and grouping

#[derive(Debug, Default)]
struct Loaded {
    records: Vec<Value>,
    quick: usize,
    unreadable: usize,
}

fn load(from: &Path) -> Result<Loaded> {
    let entries = std::fs::read_dir(from)
        .with_context(|| format!("reading results in {}", from.display()))?;
    let mut paths: Vec<_> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json") && p.is_file())
        .collect();
    paths.sort();
    let mut loaded = Loaded::default();
    for path in paths {
        let value = std::fs::read(&path)
            .ok()
            .and_then(|bytes| serde_json::from_slice::<Value>(&bytes).ok())
            .filter(Value::is_object);
        match value {
            None => {
                eprintln!("report: skipping {}: not a JSON result", path.display());
                loaded.unreadable += 1;
            }
            Some(v) if v.get("quick").and_then(Value::as_bool) == Some(true) => loaded.quick += 1,
            Some(v) => loaded.records.push(v),
        }
    }
    loaded
        .records
        .sort_by_key(|r| r.get("finished_at").and_then(Value::as_u64).unwrap_or(0));
    Ok(loaded)
}

/// The runs of one (workload, system, payload size, soak length, devices
/// per account), oldest first. Soaks of different lengths are kept apart:
/// their memory at the end is not comparable; so are runs with accounts of
/// several devices (each message goes to more devices).
#[derive(Debug)]
struct Group<'a> {
    workload: String,
    system: String,
    size: u64,
    /// A soak's length in whole seconds; 0 for the other workloads.
    span: u64,
    /// Devices per account (1 for results from before accounts had more).
    devices: u64,
    runs: Vec<&'a Value>,
}

/// A record's devices per account (1 where it does not say).
fn devices_per_account(record: &Value) -> u64 {
    record
        .get("devices_per_account")
        .and_then(Value::as_u64)
        .unwrap_or(1)
        .max(1)
}

/// A soak's length in whole seconds (0 for any other workload).
fn span(record: &Value, workload: &str) -> u64 {
    if workload != "soak" {
        return 0;
    }
    num(record, &["result", "seconds"]).map_or(0, |s| s.round() as u64)
}

fn workload_rank(workload: &str) -> usize {
    [
        "relay", "fanout", "idle", "offline", "storm", "soak", "files",
    ]
    .iter()
    .position(|w| *w == workload)
    .unwrap_or(usize::MAX)
}

fn system_rank(system: &str) -> usize {
    [
        "umbra",
        "umbra (TLS)",
        "nats",
        "mosquitto",
        "ejabberd",
        "prosody",
        "nginx (TLS)",
    ]
    .iter()
    .position(|s| *s == system)
    .unwrap_or(usize::MAX)
}

fn system_name(record: &Value) -> String {
    let name = text(record, &["system"]).unwrap_or("unknown").to_owned();
    let tls = record.get("tls").and_then(Value::as_bool) == Some(true);
    if tls && !name.contains("TLS") {
        format!("{name} (TLS)")
    } else {
        name
    }
}

#[derive(Debug)]
struct Report<'a> {
    records: &'a [Value],
    groups: Vec<Group<'a>>,
}

impl<'a> Report<'a> {
    fn new(records: &'a [Value]) -> Report<'a> {
        type Key = (usize, String, usize, String, u64, u64, u64);
        let mut map: BTreeMap<Key, Vec<&Value>> = BTreeMap::new();
        for record in records {
            let workload = text(record, &["workload"]).unwrap_or("unknown").to_owned();
            let system = system_name(record);
            let size = record.get("size").and_then(Value::as_u64).unwrap_or(0);
            let span = span(record, &workload);
            map.entry((
                workload_rank(&workload),
                workload,
                system_rank(&system),
                system,
                size,
                span,
                devices_per_account(record),
            ))
            .or_default()
            .push(record);
        }
        let groups = map
            .into_iter()
            .map(
                |((_, workload, _, system, size, span, devices), runs)| Group {
                    workload,
                    system,
                    size,
                    span,
                    devices,
                    runs,
                },
            )
            .collect();
        Report { records, groups }
    }

    fn of(&self, workload: &str) -> Vec<&Group<'a>> {
        self.groups
            .iter()
            .filter(|g| g.workload == workload)
            .collect()
    }

    /// The group the bar and the ratios are about: one device per account;
    /// the default payload size if it was measured, else the smallest; for
    /// soaks, the day at 100× if it was measured, else the longest.
    fn find(&self, workload: &str, system: &str) -> Option<&Group<'a>> {
        let mut candidates: Vec<&Group<'a>> = self
            .groups
            .iter()
            .filter(|g| g.workload == workload && g.system == system && g.devices == 1)
            .collect();
        candidates.sort_by_key(|g| {
            (
                g.size != DEFAULT_SIZE,
                g.size,
                g.span != DAY_AT_100X_S,
                std::cmp::Reverse(g.span),
            )
        });
        candidates.first().copied()
    }

    /// The label of a group's rows: the system, plus the size when the
    /// workload was measured at more than one, plus the length when soaks
    /// of more than one length were run, plus the devices per account when
    /// more than one.
    fn label(&self, group: &Group<'_>) -> String {
        let distinct = |f: fn(&Group<'_>) -> u64| {
            let mut seen: Vec<u64> = self.of(&group.workload).iter().map(|g| f(g)).collect();
            seen.sort_unstable();
            seen.dedup();
            seen.len() > 1
        };
        let mut label = group.system.clone();
        if distinct(|g| g.size) {
            let _ = write!(label, ", {} B", group.size);
        }
        if distinct(|g| g.span) {
            let _ = write!(label, ", {} s", group.span);
        }
        if group.devices != 1 {
            let _ = write!(label, ", {} devices/account", group.devices);
        }
        label
    }

    // -----------------------------------------------------------------------
    // Header

    fn header(&self, md: &mut String, from: &Path, loaded: &Loaded) {
        md.push_str("# Benchmarks\n\n");
        let _ = writeln!(
            md,
            "Generated by `scripts/bench` from the JSON results in `{}` \
             (`umbra-bench report`); do not edit by hand, rerun the script. \
             What is measured, against whom, and the bar are defined in \
             `../shared/design/BENCH.md`. Every figure is the median over the \
             runs with the range in parentheses, `median (min–max)`; `n` is the \
             number of runs; `–` means not measured.\n",
            from.display()
        );
        if self.records.is_empty() {
            let _ = writeln!(
                md,
                "**No results.** `{}` holds no full (non-quick) results{}.\n",
                from.display(),
                if loaded.quick > 0 {
                    format!("; {} quick smoke-test results were skipped", loaded.quick)
                } else {
                    String::new()
                }
            );
        } else if loaded.quick > 0 {
            let _ = writeln!(
                md,
                "{} quick smoke-test results were skipped.\n",
                loaded.quick
            );
        }

        md.push_str("## Machine and runs\n\n");
        let mut machines: Vec<String> = Vec::new();
        for record in self.records {
            let line = machine_line(record.get("machine"));
            if !machines.contains(&line) {
                machines.push(line);
            }
        }
        if machines.is_empty() {
            md.push_str("- Machine: –\n");
        }
        for line in &machines {
            let _ = writeln!(md, "- Machine: {line}");
        }
        md.push_str(
            "- The server is pinned to one core (`--server-cpu`), the generator to another \
             (`taskset`), so \"cores\" above counts the CPUs the generator was allowed to use.\n",
        );
        let stamps: Vec<u64> = self
            .records
            .iter()
            .filter_map(|r| r.get("finished_at").and_then(Value::as_u64))
            .collect();
        match (stamps.iter().min(), stamps.iter().max()) {
            (Some(first), Some(last)) => {
                let _ = writeln!(
                    md,
                    "- Runs finished between {} and {} ({} results).",
                    utc(*first),
                    utc(*last),
                    self.records.len()
                );
            }
            _ => {
                let _ = writeln!(md, "- Runs: – ({} results).", self.records.len());
            }
        }
        md.push('\n');

        let mut workloads: Vec<&str> = Vec::new();
        for group in &self.groups {
            if !workloads.contains(&group.workload.as_str()) {
                workloads.push(&group.workload);
            }
        }
        if !workloads.is_empty() {
            md.push_str("Commands (each run once per result counted in `n`):\n\n");
        }
        for workload in workloads {
            let mut commands: Vec<&str> = Vec::new();
            for group in self.of(workload) {
                for run in &group.runs {
                    let command = text(run, &["command"]).unwrap_or("–");
                    if !commands.contains(&command) {
                        commands.push(command);
                    }
                }
            }
            let _ = writeln!(md, "- {workload}:\n\n  ```sh");
            for command in commands {
                let _ = writeln!(md, "  {command}");
            }
            md.push_str("  ```\n");
        }
        md.push('\n');
    }

    fn durability(&self, md: &mut String) {
        md.push_str("## Durability\n\nWhat each system does with a message before it says \"accepted\":\n\n");
        let mut seen: Vec<(String, String)> = Vec::new();
        let mut systems: Vec<&Group<'_>> = self.groups.iter().collect();
        systems.sort_by_key(|g| system_rank(&g.system));
        for group in systems {
            for run in &group.runs {
                let entry = (
                    group.system.clone(),
                    text(run, &["durability"]).unwrap_or("–").to_owned(),
                );
                if !seen.contains(&entry) {
                    seen.push(entry);
                }
            }
        }
        if seen.is_empty() {
            md.push_str("- –\n");
        }
        for (system, durability) in seen {
            let _ = writeln!(md, "- **{system}**: {durability}");
        }
        md.push('\n');
    }

    // -----------------------------------------------------------------------
    // Per-workload tables

    fn relay(&self, md: &mut String) {
        md.push_str("## relay\n\n");
        let groups = self.of("relay");
        if groups.is_empty() {
            md.push_str("Not measured.\n\n");
            return;
        }
        sizes_line(md, &groups);
        let _ = writeln!(
            md,
            "1:1 pairs, open loop. A rate is *held* when p99 ≤ {P99_BAR_MS} ms and at least \
             {:.0} % of what was sent arrived. `server µs/delivery` is the server's CPU time \
             divided by the deliveries in the sending window; it is left out (–) where fewer \
             than half of the offered messages were delivered in the window (the server was \
             still working through an earlier rate's backlog, so the quotient means nothing).\n",
            HELD_DELIVERED * 100.0
        );
        md.push_str(
            "| system | offered/s | delivered/s | delivered % | p50 ms | p99 ms | p999 ms \
             | server µs/delivery | lost | duplicates | generator CPU % | n |\n",
        );
        md.push_str("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n");
        let mut saturated = Vec::new();
        let mut errors = Vec::new();
        for group in &groups {
            for (key, points) in points_by(group, rate_key) {
                let rate = key as f64 / 1000.0;
                let got: Vec<&Value> = points.iter().flatten().copied().collect();
                let column = |f: Metric| got.iter().map(|p| f(p)).collect::<Vec<_>>();
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                    self.label(group),
                    count(rate),
                    cell(&column(|p| num(p, &["delivered_per_s"])), count),
                    cell(&column(delivered_percent), real),
                    cell(&column(|p| latency(p, "p50_ms")), real),
                    cell(&column(|p| latency(p, "p99_ms")), real),
                    cell(&column(|p| latency(p, "p999_ms")), real),
                    cell(&column(server_us), real),
                    cell(&column(|p| num(p, &["lost"])), count),
                    cell(&column(|p| num(p, &["observed", "duplicates"])), count),
                    cell(&column(|p| num(p, &["generator_cpu_percent"])), real),
                    got.len(),
                );
                if column(|p| num(p, &["generator_cpu_percent"]))
                    .iter()
                    .flatten()
                    .any(|c| *c >= GENERATOR_SATURATED_PERCENT)
                {
                    saturated.push(format!("{} at {}/s", self.label(group), count(rate)));
                }
                for p in &got {
                    if let Some(e) = text(p, &["observed", "first_error"]) {
                        errors.push(format!(
                            "{} at {}/s: {}",
                            self.label(group),
                            count(rate),
                            clip(e)
                        ));
                    }
                }
            }
        }
        md.push('\n');
        if !saturated.is_empty() {
            let _ = writeln!(
                md,
                "The generator's core was saturated (≥ {GENERATOR_SATURATED_PERCENT:.0} % CPU) for: {}; \
                 those points may understate the server.\n",
                saturated.join("; ")
            );
        }
        errors_list(md, &errors);
        let _ = writeln!(md, "![p99 against offered rate]({PLOT_FILE})\n");
    }

    fn fanout(&self, md: &mut String) {
        md.push_str("## fanout\n\n");
        let groups = self.of("fanout");
        if groups.is_empty() {
            md.push_str("Not measured.\n\n");
            return;
        }
        sizes_line(md, &groups);
        md.push_str(
            "One sender per group; the offered message rate is chosen so that the group \
             gets about the same deliveries per second at every size. Group sizes count \
             accounts; with several devices per account, every device of every member \
             (the sender's own other devices included) gets each message.\n\n",
        );
        md.push_str(
            "| system | group size | offered msgs/s | deliveries/s | delivered % | p99 ms | lost | n |\n",
        );
        md.push_str("|---|--:|--:|--:|--:|--:|--:|--:|\n");
        let mut errors = Vec::new();
        for group in &groups {
            let by_size = points_by(group, |_, p| fanout_key(p, group.devices));
            for (size, points) in by_size {
                let got: Vec<&Value> = points.iter().flatten().copied().collect();
                let column = |f: Metric| got.iter().map(|p| f(p)).collect::<Vec<_>>();
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {} | {} | {} | {} | {} |",
                    self.label(group),
                    size,
                    cell(&column(|p| num(p, &["offered_per_s"])), real),
                    cell(&column(|p| num(p, &["delivered_per_s"])), count),
                    cell(&column(delivered_percent), real),
                    cell(&column(|p| latency(p, "p99_ms")), real),
                    cell(&column(|p| num(p, &["lost"])), count),
                    got.len(),
                );
                for p in &got {
                    if let Some(e) = text(p, &["observed", "first_error"]) {
                        errors.push(format!(
                            "{}, group of {size}: {}",
                            self.label(group),
                            clip(e)
                        ));
                    }
                }
            }
        }
        md.push('\n');
        errors_list(md, &errors);
    }

    /// Relay and fanout measured with one device per account and with
    /// more, at the same offered rate (relay) or group size (fanout): the
    /// figures side by side, and the server CPU each extra recipient device
    /// adds to a message. Nothing is written unless both were measured.
    fn device_cost(&self, md: &mut String) {
        let mut rows = Vec::new();
        for workload in ["relay", "fanout"] {
            let groups = self.of(workload);
            for one in groups.iter().filter(|g| g.devices == 1) {
                let several = groups
                    .iter()
                    .filter(|g| g.devices > 1 && g.system == one.system && g.size == one.size);
                for many in several {
                    let key = |group: &Group<'a>| {
                        let devices = group.devices;
                        points_by(group, move |_, p| {
                            if workload == "relay" {
                                rate_key(0, p)
                            } else {
                                fanout_key(p, devices)
                            }
                        })
                    };
                    let theirs = key(many);
                    for (at, ours) in key(one) {
                        let Some(more) = theirs.get(&at) else {
                            continue;
                        };
                        let at = if workload == "relay" {
                            format!("{}/s", count(at as f64 / 1000.0))
                        } else {
                            format!("{at} accounts")
                        };
                        let both = |f: Metric| (median_of(&ours, f), median_of(more, f));
                        let recipients = both(|p| num(p, &["recipients_per_message"]));
                        let per_message = both(server_us_per_message);
                        let extra = match (per_message, recipients) {
                            ((Some(a), Some(b)), (Some(ra), Some(rb))) if rb > ra => {
                                Some((b - a) / (rb - ra))
                            }
                            _ => None,
                        };
                        let (p50, p99) = (
                            both(|p| latency(p, "p50_ms")),
                            both(|p| latency(p, "p99_ms")),
                        );
                        let delivered = both(|p| num(p, &["delivered_per_s"]));
                        let per_delivery = both(server_us);
                        rows.push(format!(
                            "| {workload} | {} | {at} | 1 → {} | {} | {} | {} | {} | {} | {} | {} | {} / {} |",
                            one.system,
                            many.devices,
                            arrow(recipients.0, recipients.1, count),
                            arrow(delivered.0, delivered.1, count),
                            arrow(per_message.0, per_message.1, real),
                            arrow(per_delivery.0, per_delivery.1, real),
                            arrow(p50.0, p50.1, real),
                            arrow(p99.0, p99.1, real),
                            extra.map_or_else(|| "–".to_owned(), real),
                            ours.iter().flatten().count(),
                            more.iter().flatten().count(),
                        ));
                    }
                }
            }
        }
        if rows.is_empty() {
            return;
        }
        md.push_str(
            "## Cost per extra device

",
        );
        md.push_str(
            "The same relay rate or fanout group size with one device per account and with \
             more (`--devices-per-account`): each account's further devices are in every \
             group it is in, so a message also goes to them and to the sender's own other \
             devices. Medians over the runs, `one device → several`. `server µs/msg` is the \
             server's CPU time per message sent; `µs per extra recipient` is its growth \
             divided by the extra recipient devices per message.\n\n",
        );
        md.push_str(
            "| workload | system | at | devices/account | recipients/msg | deliveries/s \
             | server µs/msg | server µs/delivery | p50 ms | p99 ms | µs per extra recipient | n |\n",
        );
        md.push_str("|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n");
        for row in rows {
            md.push_str(&row);
            md.push('\n');
        }
        md.push('\n');
    }

    fn idle(&self, md: &mut String) {
        md.push_str("## idle\n\n");
        let groups = self.of("idle");
        if groups.is_empty() {
            md.push_str("Not measured.\n\n");
            return;
        }
        md.push_str(
            "Connected, authenticated, idle devices: the server's resident memory growth \
             divided by the connections (1 KB = 1000 bytes, 1 KiB = 1024 bytes).\n\n",
        );
        md.push_str(
            "| system | devices | KiB per connection | KB per connection | connect s | n |\n",
        );
        md.push_str("|---|--:|--:|--:|--:|--:|\n");
        for group in &groups {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} |",
                self.label(group),
                cell(&values(group, |r| num(r, &["result", "devices"])), count),
                cell(&values(group, idle_kib), real),
                cell(&values(group, idle_kb), real),
                cell(
                    &values(group, |r| num(r, &["result", "connect_seconds"])),
                    real
                ),
                group.runs.len(),
            );
        }
        md.push('\n');
    }

    fn offline(&self, md: &mut String) {
        md.push_str("## offline\n\n");
        let groups = self.of("offline");
        if groups.is_empty() {
            md.push_str("Not measured.\n\n");
            return;
        }
        md.push_str(
            "Recipients offline: senders send as fast as the server accepts, the server is \
             killed with SIGKILL and restarted, then the recipients connect and drain. \
             *Lost* counts accepted messages that never arrived.\n\n",
        );
        md.push_str(
            "| system | messages | accepted/s | drained/s | killed | lost after kill -9 | duplicates | n |\n",
        );
        md.push_str("|---|--:|--:|--:|--:|--:|--:|--:|\n");
        let mut errors = Vec::new();
        for group in &groups {
            let killed = group
                .runs
                .iter()
                .filter(|r| r.pointer("/result/killed").and_then(Value::as_bool) == Some(true))
                .count();
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} of {} runs | {} | {} | {} |",
                self.label(group),
                cell(&values(group, |r| num(r, &["result", "messages"])), count),
                cell(
                    &values(group, |r| num(r, &["result", "accepted_per_s"])),
                    count
                ),
                cell(
                    &values(group, |r| num(r, &["result", "drained_per_s"])),
                    count
                ),
                killed,
                group.runs.len(),
                cell(&values(group, |r| num(r, &["result", "lost"])), count),
                cell(&values(group, |r| num(r, &["result", "duplicates"])), count),
                group.runs.len(),
            );
            for r in &group.runs {
                if let Some(e) = text(r, &["result", "first_error"]) {
                    errors.push(format!("{}: {}", self.label(group), clip(e)));
                }
            }
        }
        md.push('\n');
        errors_list(md, &errors);
    }

    fn storm(&self, md: &mut String) {
        md.push_str("## storm\n\n");
        let groups = self.of("storm");
        if groups.is_empty() {
            md.push_str("Not measured.\n\n");
            return;
        }
        md.push_str(
            "Half the devices leave a backlog for the other half; then every device \
             connects at once.\n\n",
        );
        md.push_str("| system | devices | backlog per device | s to connected | s to drained | lost | n |\n");
        md.push_str("|---|--:|--:|--:|--:|--:|--:|\n");
        for group in &groups {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} |",
                self.label(group),
                cell(&values(group, |r| num(r, &["result", "devices"])), count),
                cell(
                    &values(group, |r| num(r, &["result", "backlog_per_device"])),
                    count
                ),
                cell(
                    &values(group, |r| num(r, &["result", "seconds_to_connected"])),
                    real
                ),
                cell(
                    &values(group, |r| num(r, &["result", "seconds_to_drained"])),
                    real
                ),
                cell(&values(group, |r| num(r, &["result", "lost"])), count),
                group.runs.len(),
            );
        }
        md.push('\n');
    }

    fn soak(&self, md: &mut String) {
        md.push_str("## soak\n\n");
        let groups = self.of("soak");
        if groups.is_empty() {
            md.push_str("Not measured.\n\n");
            return;
        }
        md.push_str(
            "Seeded Sky-ECC-shaped traffic (Poisson arrivals, mixed sizes, 70 % of devices \
             online at every moment: every 100 ms one online device leaves and one offline \
             device comes back and drains what waited for it). Latency is over deliveries \
             to online recipients; *deferred* deliveries went to recipients that were \
             offline when the message was sent. The server's RSS: at the start (before \
             traffic), after the first minute, at the end and at its peak; *last 10 min* \
             is how much it rose over the run's last ten minutes, so flat memory is a \
             value near zero there. Memory that grows with a connection's age rises \
             until the population of connections has turned over (in this workload a \
             connection lives about 700 s), which takes longer than the 864 s day: \
             longer runs show where it levels off.\n\n",
        );
        md.push_str(
            "| system | rate/s | seconds | p50 ms | p99 ms | p999 ms | lost | errors \
             | RSS start MiB | RSS 1 min MiB | RSS end MiB | RSS peak MiB | last 10 min MiB \
             | reconnects | deferred | n |\n",
        );
        md.push_str("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n");
        let mut errors = Vec::new();
        for group in &groups {
            let mib = |key: &'static str| {
                values(group, move |r| {
                    num(r, &["result", "server", key]).map(|k| k / 1024.0)
                })
            };
            let first_minute = values(group, |r| {
                r.pointer("/result/rss_per_minute_kib/0")
                    .and_then(Value::as_f64)
                    .map(|k| k / 1024.0)
            });
            let last_ten = values(group, |r| {
                let minutes = r.pointer("/result/rss_per_minute_kib")?.as_array()?;
                let end = minutes.last()?.as_f64()?;
                let before = minutes.get(minutes.len().checked_sub(11)?)?.as_f64()?;
                Some((end - before) / 1024.0)
            });
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                self.label(group),
                cell(&values(group, |r| num(r, &["result", "rate_per_s"])), count),
                cell(&values(group, |r| num(r, &["result", "seconds"])), count),
                cell(&values(group, |r| soak_latency(r, "p50_ms")), real),
                cell(&values(group, |r| soak_latency(r, "p99_ms")), real),
                cell(&values(group, |r| soak_latency(r, "p999_ms")), real),
                cell(&values(group, |r| num(r, &["result", "lost"])), count),
                cell(&values(group, |r| num(r, &["result", "errors"])), count),
                cell(&mib("rss_start_kib"), real),
                cell(&first_minute, real),
                cell(&mib("rss_end_kib"), real),
                cell(&mib("rss_peak_kib"), real),
                cell(&last_ten, real),
                cell(&values(group, |r| num(r, &["result", "reconnects"])), count),
                cell(
                    &values(group, |r| num(r, &["result", "observed", "deferred"])),
                    count
                ),
                group.runs.len(),
            );
            for r in &group.runs {
                if let Some(e) = text(r, &["result", "observed", "first_error"]) {
                    errors.push(format!("{}: {}", self.label(group), clip(e)));
                }
            }
        }
        md.push('\n');
        errors_list(md, &errors);
        self.soak_memory(md, &groups);
    }

    /// The server's RSS minute by minute (every fifth minute, and the last),
    /// so a reader sees whether memory levels off rather than only where
    /// it ended.
    fn soak_memory(&self, md: &mut String, groups: &[&Group<'_>]) {
        let minutes = |r: &Value| {
            r.pointer("/result/rss_per_minute_kib")
                .and_then(Value::as_array)
                .map_or(0, Vec::len)
        };
        let longest = groups
            .iter()
            .flat_map(|g| g.runs.iter().map(|r| minutes(r)))
            .max()
            .unwrap_or(0);
        if longest == 0 {
            return;
        }
        let mut shown: Vec<usize> = (1..=longest).filter(|m| *m == 1 || m % 5 == 0).collect();
        if shown.last() != Some(&longest) {
            shown.push(longest);
        }
        md.push_str(
            "The server's RSS in MiB at the end of each minute (every fifth minute and \
             the last; median and range over runs):\n\n| system |",
        );
        for m in &shown {
            let _ = write!(md, " min {m} |");
        }
        md.push_str("\n|---|");
        md.push_str(&"--:|".repeat(shown.len()));
        md.push('\n');
        for group in groups {
            let _ = write!(md, "| {} |", self.label(group));
            for m in &shown {
                let at = values(group, |r| {
                    r.pointer(&format!("/result/rss_per_minute_kib/{}", m - 1))
                        .and_then(Value::as_f64)
                        .map(|k| k / 1024.0)
                });
                let _ = write!(md, " {} |", cell(&at, real));
            }
            md.push('\n');
        }
        md.push('\n');
    }

    // -----------------------------------------------------------------------
    // Ratios

    fn ratios(&self, md: &mut String) {
        md.push_str("## Ratios\n\n");
        md.push_str(
            "Umbra (without TLS, as the peers run) divided by each peer. Where both have \
             the same number of runs, run *i* of one is paired with run *i* of the other \
             (they ran side by side) and the ratio is the median (range) over the pairs; \
             otherwise it is the ratio of the medians.\n\n",
        );
        md.push_str("| metric | peer | Umbra | peer value | Umbra / peer | pairs |\n");
        md.push_str("|---|---|--:|--:|--:|--:|\n");
        let mut rows = 0;
        let peers = ["nats", "mosquitto", "ejabberd", "prosody"];
        if let Some(umbra) = self.find("relay", "umbra") {
            let umbra_rates = points_by(umbra, rate_key);
            for peer in peers {
                let Some(other) = self.find("relay", peer) else {
                    continue;
                };
                let other_rates = points_by(other, rate_key);
                for (key, ours) in &umbra_rates {
                    let Some(theirs) = other_rates.get(key) else {
                        continue;
                    };
                    let a: Vec<Option<f64>> = ours.iter().map(|p| p.and_then(server_us)).collect();
                    let b: Vec<Option<f64>> =
                        theirs.iter().map(|p| p.and_then(server_us)).collect();
                    ratio_row(
                        md,
                        &format!(
                            "relay server µs/delivery at {}/s",
                            count(*key as f64 / 1000.0)
                        ),
                        peer,
                        &a,
                        &b,
                        real,
                    );
                    rows += 1;
                }
            }
            let a = held_rates(umbra);
            for peer in peers {
                if let Some(other) = self.find("relay", peer) {
                    ratio_row(
                        md,
                        &format!("relay: highest offered rate held at p99 ≤ {P99_BAR_MS} ms"),
                        peer,
                        &a,
                        &held_rates(other),
                        count,
                    );
                    rows += 1;
                }
            }
        }
        let simple: [(&str, &str, Metric, Show); 2] = [
            ("idle", "idle KiB per connection", idle_kib, real),
            (
                "offline",
                "offline accepted/s",
                |r| num(r, &["result", "accepted_per_s"]),
                count,
            ),
        ];
        for (workload, metric, f, show) in simple {
            let Some(umbra) = self.find(workload, "umbra") else {
                continue;
            };
            for peer in peers {
                if let Some(other) = self.find(workload, peer) {
                    ratio_row(md, metric, peer, &values(umbra, f), &values(other, f), show);
                    rows += 1;
                }
            }
        }
        if rows == 0 {
            md.push_str("| – | – | – | – | not measured | – |\n");
        }
        md.push('\n');
    }

    // -----------------------------------------------------------------------
    // The bar

    fn bar(&self, md: &mut String) {
        md.push_str("## Against the bar\n\n");
        md.push_str(
            "The bar of `BENCH.md` (one server process on one core, messages stored durably \
             before the sender is told \"accepted\"), judged on the median.\n\n",
        );
        md.push_str("| bar | measured (median, range) | verdict |\n|---|---|---|\n");
        let mut row = |bar: &str, measured: String, verdict: &str| {
            let _ = writeln!(md, "| {bar} | {measured} | {verdict} |");
        };
        let umbra_relay = self.find("relay", "umbra");

        // relay ≥ 60k msgs/s at p99 ≤ 50 ms on one core.
        let (measured, status) = match umbra_relay {
            None => ("–".to_owned(), NOT_MEASURED),
            Some(g) => {
                let rates = held_rates(g);
                let mut note = String::new();
                if held_top_rate(g) {
                    note.push_str(" (the highest offered: the limit may be higher)");
                }
                if !g
                    .runs
                    .iter()
                    .all(|r| text(r, &["command"]).is_some_and(|c| c.contains("--server-cpu")))
                {
                    note.push_str("; server not pinned to one core in every run");
                }
                match spread(&rates) {
                    None => (format!("no offered rate held{note}"), NOT_MET),
                    Some(s) => (
                        format!("{} msgs/s offered{note}", spread_text(s, count)),
                        verdict(s.median >= 60_000.0),
                    ),
                }
            }
        };
        row(
            "relay: ≥ 60,000 msgs/s on one core at p99 ≤ 50 ms",
            measured,
            status,
        );

        // relay ≥ 8× ejabberd's held rate.
        let (measured, status) = match (umbra_relay, self.find("relay", "ejabberd")) {
            (Some(u), Some(e)) => {
                let ratios = paired(&held_rates(u), &held_rates(e));
                let bound = match (held_top_rate(u), held_top_rate(e)) {
                    (false, true) => {
                        "; ejabberd held its highest offered rate, so its limit is higher \
                         and the ratio an upper bound"
                    }
                    (true, false) => {
                        "; Umbra held its highest offered rate, so the ratio is a lower bound"
                    }
                    (true, true) => "; both held their highest offered rates: limits unknown",
                    (false, false) => "",
                };
                match spread(&ratios) {
                    None => ("no rate held by both".to_owned(), NOT_MEASURED),
                    Some(s) => (
                        format!("{}{bound}", spread_text(s, times)),
                        verdict(s.median >= 8.0),
                    ),
                }
            }
            _ => ("–".to_owned(), NOT_MEASURED),
        };
        row(
            "relay: ≥ 8× the rate ejabberd holds at p99 ≤ 50 ms",
            measured,
            status,
        );

        // relay CPU per message ≤ 1.5× nats.
        let (measured, status) = match (umbra_relay, self.find("relay", "nats")) {
            (Some(u), Some(n)) => cpu_against(u, n),
            _ => ("–".to_owned(), NOT_MEASURED),
        };
        row(
            "relay: server CPU per message ≤ 1.5× nats-server's",
            measured,
            status,
        );

        // idle memory.
        for (system, limit, bar) in [
            ("umbra", 12.0, "idle: ≤ 12 KB per connection without TLS"),
            ("umbra (TLS)", 24.0, "idle: ≤ 24 KB per connection with TLS"),
        ] {
            let (measured, status) = match self.find("idle", system).map(|g| values(g, idle_kb)) {
                Some(v) => match spread(&v) {
                    Some(s) => (
                        format!(
                            "{} KB{}",
                            spread_text(s, real),
                            devices_note(self.find("idle", system))
                        ),
                        verdict(s.median <= limit),
                    ),
                    None => ("–".to_owned(), NOT_MEASURED),
                },
                None => ("–".to_owned(), NOT_MEASURED),
            };
            row(bar, measured, status);
        }
        let (measured, status) = match (self.find("idle", "umbra"), self.find("idle", "ejabberd")) {
            (Some(u), Some(e)) => match spread(&paired(&values(u, idle_kib), &values(e, idle_kib)))
            {
                Some(s) => (
                    format!("{} of ejabberd's", spread_text(s, times)),
                    verdict(s.median <= 0.25),
                ),
                None => ("–".to_owned(), NOT_MEASURED),
            },
            _ => ("–".to_owned(), NOT_MEASURED),
        };
        row(
            "idle: ≤ 1/4 of ejabberd's memory per connection",
            measured,
            status,
        );

        // offline.
        let offline = self.find("offline", "umbra");
        let (measured, status) = match offline
            .map(|g| values(g, |r| num(r, &["result", "accepted_per_s"])))
            .and_then(|v| spread(&v))
        {
            Some(s) => (
                format!("{} msgs/s", spread_text(s, count)),
                verdict(s.median >= 50_000.0),
            ),
            None => ("–".to_owned(), NOT_MEASURED),
        };
        row(
            "offline: ≥ 50,000 durable msgs/s accepted",
            measured,
            status,
        );
        let killed: Vec<&Value> = offline
            .map(|g| {
                g.runs
                    .iter()
                    .copied()
                    .filter(|r| r.pointer("/result/killed").and_then(Value::as_bool) == Some(true))
                    .collect()
            })
            .unwrap_or_default();
        let lost: Vec<f64> = killed
            .iter()
            .filter_map(|r| num(r, &["result", "lost"]))
            .collect();
        let (measured, status) = if lost.is_empty() {
            ("no run with kill -9".to_owned(), NOT_MEASURED)
        } else {
            let total: f64 = lost.iter().sum();
            (
                format!(
                    "{} lost over {} runs with kill -9",
                    count(total),
                    lost.len()
                ),
                verdict(total == 0.0),
            )
        };
        row(
            "offline: nothing acknowledged lost on kill -9",
            measured,
            status,
        );

        // storm.
        let (measured, status) = match self.find("storm", "umbra (TLS)") {
            None => ("–".to_owned(), NOT_MEASURED),
            Some(g) => {
                let devices = spread(&values(g, |r| num(r, &["result", "devices"])));
                let seconds = spread(&values(g, |r| {
                    let connected = num(r, &["result", "seconds_to_connected"])?;
                    let drained = num(r, &["result", "seconds_to_drained"]).unwrap_or(connected);
                    Some(connected.max(drained))
                }));
                let lost: f64 = values(g, |r| num(r, &["result", "lost"]))
                    .iter()
                    .flatten()
                    .sum();
                match (devices, seconds) {
                    (Some(d), Some(s)) if d.min >= 19_000.0 => (
                        format!(
                            "{} s for {} devices, {} lost",
                            spread_text(s, real),
                            count(d.median),
                            count(lost)
                        ),
                        verdict(s.median <= 30.0 && lost == 0.0),
                    ),
                    (Some(d), Some(s)) => (
                        format!(
                            "{} s for only {} devices",
                            spread_text(s, real),
                            count(d.min)
                        ),
                        NOT_MEASURED,
                    ),
                    _ => ("–".to_owned(), NOT_MEASURED),
                }
            }
        };
        row(
            "storm: 19,000 TLS devices reconnected and drained in ≤ 30 s",
            measured,
            status,
        );

        // soak.
        let (measured, status) = match self.find("soak", "umbra") {
            None => ("–".to_owned(), NOT_MEASURED),
            Some(g) => match spread(&values(g, |r| soak_latency(r, "p99_ms"))) {
                None => ("–".to_owned(), NOT_MEASURED),
                Some(s) => {
                    let rate = spread(&values(g, |r| num(r, &["result", "rate_per_s"])));
                    let secs = spread(&values(g, |r| num(r, &["result", "seconds"])));
                    let lost: f64 = values(g, |r| num(r, &["result", "lost"]))
                        .iter()
                        .flatten()
                        .sum();
                    let mut note = format!(
                        "p99 {} ms at {} msgs/s for {} s, {} lost",
                        spread_text(s, real),
                        rate.map_or("–".into(), |r| count(r.median)),
                        secs.map_or("–".into(), |r| count(r.median)),
                        count(lost)
                    );
                    let whole_day = rate.is_some_and(|r| r.median >= 6_944.0 * 0.95)
                        && secs.is_some_and(|t| t.median >= 864.0 * 0.99);
                    if !whole_day {
                        note.push_str(" (less than the whole day at 100×)");
                    }
                    (note, verdict(s.median <= P99_BAR_MS))
                }
            },
        };
        row(
            "soak: Sky ECC's day (6M messages) at 100× with p99 ≤ 50 ms",
            measured,
            status,
        );
        md.push('\n');
    }

    // -----------------------------------------------------------------------
    // The plot

    fn plot(&self) -> String {
        let mut series: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
        for group in self.of("relay") {
            let mut line = Vec::new();
            for (key, points) in points_by(group, rate_key) {
                let p99: Vec<Option<f64>> = points
                    .iter()
                    .map(|p| p.and_then(|p| latency(p, "p99_ms")))
                    .collect();
                if let Some(s) = spread(&p99).filter(|s| s.median > 0.0) {
                    line.push((key as f64 / 1000.0, s.median));
                }
            }
            if !line.is_empty() {
                series.push((self.label(group), line));
            }
        }
        svg(&series)
    }
}

const NOT_MEASURED: &str = "not measured";
const NOT_MET: &str = "**not met**";

fn verdict(met: bool) -> &'static str {
    if met { "met" } else { NOT_MET }
}

fn devices_note(group: Option<&Group<'_>>) -> String {
    group
        .and_then(|g| spread(&values(g, |r| num(r, &["result", "devices"]))))
        .map(|d| format!(" ({} devices)", count(d.median)))
        .unwrap_or_default()
}

/// CPU per message against nats at the highest offered rate both held
/// (CPU per message of a server that falls behind means little), else at
/// the highest rate both were offered.
fn cpu_against(umbra: &Group<'_>, nats: &Group<'_>) -> (String, &'static str) {
    let ours = points_by(umbra, rate_key);
    let theirs = points_by(nats, rate_key);
    let common: Vec<i64> = ours
        .keys()
        .filter(|k| theirs.contains_key(k))
        .copied()
        .collect();
    let all_held = |points: &[Option<&Value>]| {
        !points.is_empty() && points.iter().all(|p| p.is_some_and(held))
    };
    let held_both = common.iter().rev().find(|k| {
        ours.get(k).is_some_and(|p| all_held(p)) && theirs.get(k).is_some_and(|p| all_held(p))
    });
    let (key, note) = match (held_both, common.last()) {
        (Some(k), _) => (*k, ""),
        (None, Some(k)) => (*k, " (neither held a common rate)"),
        (None, None) => return ("no common offered rate".to_owned(), NOT_MEASURED),
    };
    let per_run = |points: Option<&Vec<Option<&Value>>>| -> Vec<Option<f64>> {
        points
            .map(|p| p.iter().map(|p| p.and_then(server_us)).collect())
            .unwrap_or_default()
    };
    match spread(&paired(
        &per_run(ours.get(&key)),
        &per_run(theirs.get(&key)),
    )) {
        Some(s) => (
            format!(
                "{} of nats-server's at {}/s{note}",
                spread_text(s, times),
                count(key as f64 / 1000.0)
            ),
            verdict(s.median <= 1.5),
        ),
        None => ("–".to_owned(), NOT_MEASURED),
    }
}

fn ratio_row(
    md: &mut String,
    metric: &str,
    peer: &str,
    ours: &[Option<f64>],
    theirs: &[Option<f64>],
    show: Show,
) {
    let ratios = paired(ours, theirs);
    let pairs = if ours.len() == theirs.len() {
        ratios.len().to_string()
    } else {
        "medians".to_owned()
    };
    let _ = writeln!(
        md,
        "| {metric} | {peer} | {} | {} | {} | {pairs} |",
        cell(ours, show),
        cell(theirs, show),
        spread(&ratios).map_or("–".to_owned(), |s| spread_text(s, times)),
    );
}

/// Ratios a/b: run by run when both have as many runs, else of the medians.
fn paired(a: &[Option<f64>], b: &[Option<f64>]) -> Vec<Option<f64>> {
    let ratio = |x: f64, y: f64| (y != 0.0).then(|| x / y).filter(|r| r.is_finite());
    if a.len() == b.len() {
        a.iter()
            .zip(b)
            .filter_map(|(x, y)| ratio((*x)?, (*y)?))
            .map(Some)
            .collect()
    } else {
        match (spread(a), spread(b)) {
            (Some(x), Some(y)) => ratio(x.median, y.median).into_iter().map(Some).collect(),
            _ => Vec::new(),
        }
    }
}

// ---------------------------------------------------------------------------
// Values out of records

fn get<'v>(value: &'v Value, path: &[&str]) -> Option<&'v Value> {
    path.iter().try_fold(value, |v, key| v.get(key))
}

fn num(value: &Value, path: &[&str]) -> Option<f64> {
    get(value, path)
        .and_then(Value::as_f64)
        .filter(|x| x.is_finite())
}

fn text<'v>(value: &'v Value, path: &[&str]) -> Option<&'v str> {
    get(value, path)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
}

fn values(group: &Group<'_>, f: impl Fn(&Value) -> Option<f64>) -> Vec<Option<f64>> {
    group.runs.iter().map(|r| f(r)).collect()
}

/// Relay points are matched across runs by offered rate (in mmsgs/s).
fn rate_key(_index: usize, point: &Value) -> Option<i64> {
    num(point, &["offered_per_s"]).map(|r| (r * 1000.0).round() as i64)
}

/// Fanout points are matched across runs by group size in accounts (its
/// recipient devices plus the sender, over the devices per account).
fn fanout_key(point: &Value, devices: u64) -> Option<i64> {
    num(point, &["recipients_per_message"]).map(|r| (r as i64 + 1) / devices.max(1) as i64)
}

/// The server's CPU time per message sent, where [`server_us`] means
/// something.
fn server_us_per_message(point: &Value) -> Option<f64> {
    server_us(point)?;
    let sent = num(point, &["observed", "sent"]).filter(|s| *s > 0.0)?;
    num(point, &["server", "cpu_us"]).map(|cpu| cpu / sent)
}

/// The median of `f` over a point's runs.
fn median_of(points: &[Option<&Value>], f: impl Fn(&Value) -> Option<f64>) -> Option<f64> {
    let values: Vec<Option<f64>> = points.iter().map(|p| p.and_then(&f)).collect();
    spread(&values).map(|s| s.median)
}

/// "a → b", each shown with `show` ("–" where missing).
fn arrow(a: Option<f64>, b: Option<f64>, show: Show) -> String {
    let one = |x: Option<f64>| x.map_or_else(|| "–".to_owned(), show);
    format!("{} → {}", one(a), one(b))
}

/// A group's rate points by `key`, one slot per run (empty where that run
/// lacks the point).
fn points_by<'v>(
    group: &Group<'v>,
    key: impl Fn(usize, &Value) -> Option<i64>,
) -> BTreeMap<i64, Vec<Option<&'v Value>>> {
    let mut map: BTreeMap<i64, Vec<Option<&'v Value>>> = BTreeMap::new();
    let runs = group.runs.len();
    for (run, record) in group.runs.iter().enumerate() {
        let points = record
            .get("points")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default();
        for (index, point) in points.iter().enumerate() {
            let Some(k) = key(index, point) else {
                continue;
            };
            let slots = map.entry(k).or_insert_with(|| vec![None; runs]);
            if let Some(slot) = slots.get_mut(run) {
                *slot = Some(point);
            }
        }
    }
    map
}

/// A latency of a rate point, if anything was delivered to measure it by.
fn latency(point: &Value, key: &str) -> Option<f64> {
    let delivered = num(point, &["observed", "delivered"])?;
    (delivered > 0.0)
        .then(|| num(point, &["observed", key]))
        .flatten()
}

fn soak_latency(record: &Value, key: &str) -> Option<f64> {
    record.get("result").and_then(|r| latency(r, key))
}

fn server_us(point: &Value) -> Option<f64> {
    let in_window = num(point, &["observed", "delivered_in_window"]).unwrap_or(1.0);
    let offered = num(point, &["offered_per_s"])
        .zip(num(point, &["seconds"]))
        .map_or(0.0, |(rate, seconds)| rate * seconds);
    (in_window > 0.0 && in_window >= offered / 2.0)
        .then(|| num(point, &["server_cpu_us_per_delivery"]))
        .flatten()
}

fn delivered_percent(point: &Value) -> Option<f64> {
    let sent = num(point, &["observed", "sent"])?;
    let recipients = num(point, &["recipients_per_message"]).unwrap_or(1.0);
    let delivered = num(point, &["observed", "delivered"])?;
    (sent > 0.0).then(|| 100.0 * delivered / (sent * recipients))
}

fn held(point: &Value) -> bool {
    let p99_ok = latency(point, "p99_ms").is_some_and(|p| p <= P99_BAR_MS);
    let delivered_ok = delivered_percent(point).is_none_or(|d| d >= HELD_DELIVERED * 100.0);
    p99_ok && delivered_ok
}

/// Per run, the highest offered rate held.
fn held_rates(group: &Group<'_>) -> Vec<Option<f64>> {
    values(group, |record| {
        record
            .get("points")
            .and_then(Value::as_array)?
            .iter()
            .filter(|p| held(p))
            .filter_map(|p| num(p, &["offered_per_s"]))
            .max_by(f64::total_cmp)
    })
}

/// Whether in some run the highest rate offered was held.
fn held_top_rate(group: &Group<'_>) -> bool {
    group.runs.iter().any(|record| {
        let points = record
            .get("points")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default();
        points
            .iter()
            .max_by(|a, b| {
                let rate = |p: &Value| num(p, &["offered_per_s"]).unwrap_or(0.0);
                rate(a).total_cmp(&rate(b))
            })
            .is_some_and(held)
    })
}

fn idle_kib(record: &Value) -> Option<f64> {
    num(record, &["result", "kib_per_connection"])
}

fn idle_kb(record: &Value) -> Option<f64> {
    idle_kib(record).map(|k| k * 1.024)
}

fn machine_line(machine: Option<&Value>) -> String {
    let Some(m) = machine else {
        return "–".to_owned();
    };
    let cpu = text(m, &["cpu"]).unwrap_or("–");
    let cores = m
        .get("cores")
        .and_then(Value::as_u64)
        .map_or("–".to_owned(), |c| c.to_string());
    let memory = text(m, &["memory"])
        .map(|s| {
            let kb: Option<f64> = s.split_whitespace().find_map(|w| w.parse::<f64>().ok());
            match kb {
                Some(kb) if s.contains("kB") => format!("{:.1} GiB", kb / 1024.0 / 1024.0),
                _ => s.to_owned(),
            }
        })
        .unwrap_or_else(|| "–".to_owned());
    let kernel = text(m, &["kernel"]).unwrap_or("–");
    format!("{cpu}; CPUs visible: {cores}; memory {memory}; Linux {kernel}")
}

// ---------------------------------------------------------------------------
// Statistics and formatting

#[derive(Debug, Clone, Copy)]
struct Spread {
    median: f64,
    min: f64,
    max: f64,
}

fn spread(values: &[Option<f64>]) -> Option<Spread> {
    let mut v: Vec<f64> = values
        .iter()
        .flatten()
        .copied()
        .filter(|x| x.is_finite())
        .collect();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let min = *v.first()?;
    let max = *v.last()?;
    let median = if n % 2 == 1 {
        *v.get(n / 2)?
    } else {
        (v.get(n / 2 - 1)? + v.get(n / 2)?) / 2.0
    };
    Some(Spread { median, min, max })
}

fn spread_text(s: Spread, show: Show) -> String {
    let (median, min, max) = (show(s.median), show(s.min), show(s.max));
    if min == max {
        median
    } else {
        format!("{median} ({min}–{max})")
    }
}

/// "median (min–max)" over the values present, or "–".
fn cell(values: &[Option<f64>], show: Show) -> String {
    spread(values).map_or_else(|| "–".to_owned(), |s| spread_text(s, show))
}

/// A measurement: three significant figures or so.
fn real(x: f64) -> String {
    let a = x.abs();
    if !x.is_finite() {
        "–".to_owned()
    } else if a >= 1000.0 {
        count(x)
    } else if a >= 100.0 {
        format!("{x:.0}")
    } else if a >= 10.0 {
        format!("{x:.1}")
    } else if a >= 1.0 || a == 0.0 {
        format!("{x:.2}")
    } else {
        format!("{x:.3}")
    }
}

/// A count or a rate: whole numbers with thousands separators.
fn count(x: f64) -> String {
    if !x.is_finite() {
        return "–".to_owned();
    }
    let rounded = x.round();
    if (x - rounded).abs() > 1e-9 && x.abs() < 100.0 {
        return format!("{x:.1}");
    }
    let digits = format!("{}", rounded.abs() as u64);
    let mut grouped = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            grouped.push(',');
        }
        grouped.push(c);
    }
    if rounded < 0.0 {
        format!("-{grouped}")
    } else {
        grouped
    }
}

fn times(x: f64) -> String {
    format!("{x:.2}×")
}

fn clip(s: &str) -> String {
    let one_line = s.replace(['\n', '|'], " ");
    if one_line.chars().count() > 200 {
        let head: String = one_line.chars().take(200).collect();
        format!("{head}…")
    } else {
        one_line
    }
}

fn sizes_line(md: &mut String, groups: &[&Group<'_>]) {
    let mut sizes: Vec<u64> = groups.iter().map(|g| g.size).collect();
    sizes.sort_unstable();
    sizes.dedup();
    let sizes: Vec<String> = sizes.iter().map(|s| format!("{s} B")).collect();
    let _ = writeln!(md, "Payload: {}.\n", sizes.join(", "));
}

fn errors_list(md: &mut String, errors: &[String]) {
    if errors.is_empty() {
        return;
    }
    md.push_str("First errors seen:\n\n");
    for e in errors {
        let _ = writeln!(md, "- {e}");
    }
    md.push('\n');
}

/// `YYYY-MM-DD HH:MM UTC` from Unix seconds.
fn utc(seconds: u64) -> String {
    let days = (seconds / 86_400) as i64;
    let rem = seconds % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60
    )
}

// ---------------------------------------------------------------------------
// SVG

const COLOURS: [&str; 8] = [
    "#1f77b4", "#2ca02c", "#d62728", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf",
];

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// 1, 2 or 5 times a power of ten, at least `x`.
fn nice_step(x: f64) -> f64 {
    if !(x.is_finite() && x > 0.0) {
        return 1.0;
    }
    let power = 10f64.powf(x.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * power)
        .find(|s| *s >= x)
        .unwrap_or(10.0 * power)
}

fn rate_label(x: f64) -> String {
    if x >= 1000.0 {
        let k = x / 1000.0;
        if (k - k.round()).abs() < 1e-9 {
            format!("{k:.0}k")
        } else {
            format!("{k:.1}k")
        }
    } else {
        format!("{x:.0}")
    }
}

fn ms_label(x: f64) -> String {
    if x >= 1.0 { count(x) } else { format!("{x}") }
}

/// p99 (log scale) against offered rate, one line per series.
fn svg(series: &[(String, Vec<(f64, f64)>)]) -> String {
    const W: f64 = 760.0;
    const H: f64 = 460.0;
    const LEFT: f64 = 70.0;
    const RIGHT: f64 = 190.0;
    const TOP: f64 = 40.0;
    const BOTTOM: f64 = 60.0;
    let (pw, ph) = (W - LEFT - RIGHT, H - TOP - BOTTOM);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="22" text-anchor="middle" font-size="15">relay: p99 latency against offered rate (median over runs)</text>"#,
        LEFT + pw / 2.0
    );
    let all: Vec<(f64, f64)> = series.iter().flat_map(|(_, l)| l.iter().copied()).collect();
    if all.is_empty() {
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle" font-size="14">no relay results</text>"#,
            W / 2.0,
            H / 2.0
        );
        s.push_str("</svg>\n");
        return s;
    }
    let max_x = all.iter().map(|p| p.0).fold(0.0, f64::max);
    let x_step = nice_step(max_x / 6.0);
    let x_max = (max_x / x_step).ceil().max(1.0) * x_step;
    let min_y = all.iter().map(|p| p.1).fold(P99_BAR_MS, f64::min);
    let max_y = all.iter().map(|p| p.1).fold(P99_BAR_MS, f64::max);
    let lo = min_y.log10().floor();
    let hi = max_y.log10().ceil().max(lo + 1.0);
    let x_of = |x: f64| LEFT + pw * x / x_max;
    let y_of = |y: f64| TOP + ph * (1.0 - (y.log10() - lo) / (hi - lo));

    // Grid, ticks and labels.
    let mut x = 0.0;
    while x <= x_max + x_step / 2.0 {
        let px = x_of(x);
        let _ = writeln!(
            s,
            r##"<line x1="{px:.1}" y1="{TOP}" x2="{px:.1}" y2="{:.1}" stroke="#e5e5e5"/><line x1="{px:.1}" y1="{:.1}" x2="{px:.1}" y2="{:.1}" stroke="black"/><text x="{px:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
            TOP + ph,
            TOP + ph,
            TOP + ph + 5.0,
            TOP + ph + 19.0,
            rate_label(x)
        );
        x += x_step;
    }
    let mut decade = lo;
    while decade <= hi + 1e-9 {
        let value = 10f64.powf(decade);
        let py = y_of(value);
        let _ = writeln!(
            s,
            r##"<line x1="{LEFT}" y1="{py:.1}" x2="{:.1}" y2="{py:.1}" stroke="#e5e5e5"/><line x1="{:.1}" y1="{py:.1}" x2="{LEFT}" y2="{py:.1}" stroke="black"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            LEFT + pw,
            LEFT - 5.0,
            LEFT - 8.0,
            py + 4.0,
            ms_label(value)
        );
        for m in 2..10 {
            let minor = value * f64::from(m);
            if decade + 1e-9 < hi {
                let py = y_of(minor);
                let _ = writeln!(
                    s,
                    r#"<line x1="{:.1}" y1="{py:.1}" x2="{LEFT}" y2="{py:.1}" stroke="black"/>"#,
                    LEFT - 3.0
                );
            }
        }
        decade += 1.0;
    }
    let _ = writeln!(
        s,
        r#"<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" stroke="black"/>"#
    );
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">offered rate (msgs/s)</text>"#,
        LEFT + pw / 2.0,
        H - 15.0
    );
    let _ = writeln!(
        s,
        r#"<text x="18" y="{:.1}" text-anchor="middle" transform="rotate(-90 18 {:.1})">p99 latency (ms, log scale)</text>"#,
        TOP + ph / 2.0,
        TOP + ph / 2.0
    );

    // The bar.
    let bar = y_of(P99_BAR_MS);
    let _ = writeln!(
        s,
        r##"<line x1="{LEFT}" y1="{bar:.1}" x2="{:.1}" y2="{bar:.1}" stroke="#555" stroke-dasharray="6 4"/><text x="{:.1}" y="{:.1}" text-anchor="end" fill="#555">p99 bar 50 ms</text>"##,
        LEFT + pw,
        LEFT + pw - 4.0,
        bar - 5.0
    );

    // Series and legend.
    for (i, (name, line)) in series.iter().enumerate() {
        let colour = COLOURS.get(i % COLOURS.len()).copied().unwrap_or("black");
        let points: Vec<String> = line
            .iter()
            .map(|(x, y)| format!("{:.1},{:.1}", x_of(*x), y_of(*y)))
            .collect();
        let _ = writeln!(
            s,
            r#"<polyline points="{}" fill="none" stroke="{colour}" stroke-width="2"/>"#,
            points.join(" ")
        );
        for (x, y) in line {
            let _ = writeln!(
                s,
                r#"<circle cx="{:.1}" cy="{:.1}" r="4" fill="{colour}"><title>{}: {} msgs/s, p99 {} ms</title></circle>"#,
                x_of(*x),
                y_of(*y),
                escape(name),
                count(*x),
                real(*y)
            );
        }
        let ly = TOP + 10.0 + 20.0 * i as f64;
        let lx = LEFT + pw + 15.0;
        let _ = writeln!(
            s,
            r#"<line x1="{lx:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{colour}" stroke-width="2"/><circle cx="{:.1}" cy="{ly:.1}" r="4" fill="{colour}"/><text x="{:.1}" y="{:.1}">{}</text>"#,
            lx + 24.0,
            lx + 12.0,
            lx + 30.0,
            ly + 4.0,
            escape(name)
        );
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spreads_and_formats() {
        let s = spread(&[Some(3.0), None, Some(1.0), Some(2.0), Some(10.0)]);
        let s = s.map(|s| (s.median, s.min, s.max));
        assert_eq!(s, Some((2.5, 1.0, 10.0)));
        assert_eq!(cell(&[None], real), "–");
        assert_eq!(cell(&[Some(5.0), Some(5.0)], real), "5.00");
        assert_eq!(count(60_000.0), "60,000");
        assert_eq!(count(1_234_567.4), "1,234,567");
        assert!(spread(&[]).is_none());
        assert_eq!(utc(0), "1970-01-01 00:00 UTC");
        assert_eq!(utc(1_700_000_000), "2023-11-14 22:13 UTC");
    }

    #[test]
    fn soaks_of_different_lengths_stay_apart() {
        let soak = |seconds: f64, p99: f64, rss: &[u64]| {
            json!({"workload": "soak", "system": "umbra", "size": 256, "finished_at": 1,
                   "result": {"seconds": seconds, "rate_per_s": 6941.0, "lost": 0,
                              "latency_ms": {"p99_ms": p99},
                              "rss_per_minute_kib": rss}})
        };
        // Thirty minutes: +4 MiB a minute up to 260 at minute 20, then 261.
        let long: Vec<u64> = (0..30u64)
            .map(|m| if m < 20 { (188 + 4 * m).min(260) } else { 261 } * 1024)
            .collect();
        let records = vec![
            soak(864.001, 60.0, &[190 * 1024, 250 * 1024]),
            soak(1800.2, 77.0, &long),
        ];
        let report = Report::new(&records);
        let groups = report.of("soak");
        assert_eq!(groups.len(), 2, "one row per length");
        assert_eq!(report.label(groups[0]), "umbra, 864 s");
        assert_eq!(report.label(groups[1]), "umbra, 1800 s");
        let bar = report.find("soak", "umbra").map(|g| g.span);
        assert_eq!(bar, Some(DAY_AT_100X_S), "the bar is about the day at 100×");
        let mut md = String::new();
        report.soak(&mut md);
        assert!(
            md.contains("| min 1 | min 5 | min 10 | min 15 | min 20 | min 25 | min 30 |"),
            "{md}"
        );
        assert!(
            md.contains("| umbra, 1800 s | 188 | 204 | 224 | 244 | 260 | 261 | 261 |"),
            "{md}"
        );
        assert!(md.contains("| umbra, 864 s | 190 | – | – |"), "{md}");
        // The rise over the last ten minutes: 261 - 260 for the long run,
        // unknown for a run of two minutes.
        assert!(md.contains("| – | 1.00 |"), "{md}");
    }

    #[test]
    fn extra_devices_are_costed_side_by_side() {
        let point = |rate: f64, recipients: u64, cpu_us: u64| {
            let sent = 500;
            let delivered = sent * recipients;
            json!({"offered_per_s": rate, "seconds": 1.0, "recipients_per_message": recipients,
                   "delivered_per_s": delivered as f64,
                   "server_cpu_us_per_delivery": cpu_us as f64 / delivered as f64,
                   "server": {"cpu_us": cpu_us},
                   "observed": {"sent": sent, "delivered": delivered,
                                "delivered_in_window": delivered, "p50_ms": 1.0, "p99_ms": 2.0}})
        };
        let record = |workload: &str, devices: Option<u64>, point: Value| {
            let mut record = json!({"workload": workload, "system": "umbra", "size": 256,
                                    "finished_at": 1, "points": [point]});
            if let (Some(devices), Some(object)) = (devices, record.as_object_mut()) {
                object.insert("devices_per_account".into(), json!(devices));
            }
            record
        };
        let records = vec![
            // 20 µs per message to one device, 60 to five: 10 per extra one.
            record("relay", None, point(500.0, 1, 10_000)),
            record("relay", Some(3), point(500.0, 5, 30_000)),
            // Groups of 5 accounts: 4 recipients, then 14.
            record("fanout", Some(1), point(125.0, 4, 10_000)),
            record("fanout", Some(3), point(35.7, 14, 25_000)),
        ];
        let report = Report::new(&records);
        let relay = report.of("relay");
        assert_eq!(relay.len(), 2, "one row per number of devices");
        assert_eq!(report.label(relay[1]), "umbra, 3 devices/account");
        assert_eq!(report.find("relay", "umbra").map(|g| g.devices), Some(1));
        let mut md = String::new();
        report.fanout(&mut md);
        assert!(md.contains("| umbra, 3 devices/account | 5 |"), "{md}");
        let mut md = String::new();
        report.device_cost(&mut md);
        assert!(md.contains("## Cost per extra device"), "{md}");
        assert!(
            md.contains("| relay | umbra | 500/s | 1 → 3 | 1 → 5 | 500 → 2,500 | 20.0 → 60.0 |"),
            "{md}"
        );
        assert!(md.contains("| 10.0 | 1 / 1 |"), "{md}");
        assert!(
            md.contains("| fanout | umbra | 5 accounts | 1 → 3 | 4 → 14 |"),
            "{md}"
        );
        let mut none = String::new();
        Report::new(&records[..1]).device_cost(&mut none);
        assert!(none.is_empty(), "no section without both: {none}");
    }

    #[test]
    fn missing_fields_give_a_report() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("umbra-report-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        std::fs::write(
            dir.join("a.json"),
            r#"{"workload": "relay", "points": [{}]}"#,
        )?;
        std::fs::write(dir.join("b.json"), r#"{"workload": "idle"}"#)?;
        std::fs::write(dir.join("c.json"), "not json")?;
        let out = dir.join("out").join("benchmarks.md");
        write(&dir, &out)?;
        let md = std::fs::read_to_string(&out)?;
        assert!(md.contains("## Against the bar"));
        assert!(dir.join("out").join(PLOT_FILE).exists());
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
