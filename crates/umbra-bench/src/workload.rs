//! The workloads of `../shared/design/BENCH.md`, written once against
//! [`System`], so Umbra and every peer get the same traffic.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tokio::sync::Semaphore;

use crate::recorder::{DEFERRED, Observed, Recorder};
use crate::sampler::{Sampler, Usage, sample};
use crate::stamp::{Stamp, now_ns};
use crate::system::{Endpoint, System, Topology};

/// Connection attempts in flight at once: about a listen backlog's worth,
/// so a storm measures the server, not SYN retransmission timers.
pub const CONNECT_PARALLELISM: usize = 1000;
/// Longest wait for stragglers and drains (they normally end as soon as
/// everything arrived, or after [`QUIET`] without progress).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(600);
/// No progress for this long means the rest is not coming.
const QUIET: Duration = Duration::from_secs(10);
const SAMPLE_EVERY: Duration = Duration::from_millis(100);

/// Connects the given devices, `parallelism` at a time.
pub async fn connect_all(
    system: &Arc<dyn System>,
    devices: &[u32],
    recorder: &Arc<Recorder>,
    parallelism: usize,
) -> Result<Vec<(u32, Box<dyn Endpoint>)>> {
    let permits = Arc::new(Semaphore::new(parallelism.max(1)));
    let mut tasks = Vec::with_capacity(devices.len());
    for &device in devices {
        let permit = Arc::clone(&permits).acquire_owned().await?;
        let system = Arc::clone(system);
        let recorder = Arc::clone(recorder);
        tasks.push(tokio::spawn(async move {
            let _permit = permit;
            let endpoint = system.connect(device, recorder).await;
            endpoint.map(|e| (device, e))
        }));
    }
    let mut endpoints = Vec::with_capacity(tasks.len());
    for task in tasks {
        endpoints.push(task.await?.context("connecting a device")?);
    }
    Ok(endpoints)
}

/// One sender in an open-loop run.
struct Sender<'a> {
    device: u32,
    channel: u32,
    endpoint: &'a dyn Endpoint,
    template: Vec<u8>,
    seq: u64,
}

/// One offered rate of a run.
#[derive(Debug, Clone, Serialize)]
pub struct RatePoint {
    pub offered_per_s: f64,
    pub seconds: f64,
    pub recipients_per_message: u32,
    pub observed: Observed,
    pub delivered_per_s: f64,
    pub lost: u64,
    pub server: Usage,
    pub server_cpu_us_per_delivery: f64,
    pub generator_cpu_percent: f64,
    /// The CPU of each further process the system names (a cluster's other
    /// nodes, PostgreSQL, NATS) over the same window.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub components: Vec<ComponentCpu>,
}

/// One further process's (or group of processes') CPU over a run's window.
#[derive(Debug, Clone, Serialize)]
pub struct ComponentCpu {
    pub name: String,
    pub cpu_us_per_delivery: f64,
    /// Of one core.
    pub cpu_percent: f64,
}

/// CPU time so far of each process of each named component.
fn component_cpu(components: &[(String, Vec<u32>)]) -> Vec<(String, Vec<(u32, u64)>)> {
    components
        .iter()
        .map(|(name, pids)| {
            let times = pids
                .iter()
                .filter_map(|&pid| sample(pid).ok().map(|s| (pid, s.cpu_us)))
                .collect();
            (name.clone(), times)
        })
        .collect()
}

/// What each component used between two readings (a process that appeared
/// in between counts from zero; one gone by the end is not counted).
fn component_usage(
    before: &[(String, Vec<(u32, u64)>)],
    after: &[(String, Vec<(u32, u64)>)],
    deliveries: u64,
    seconds: f64,
) -> Vec<ComponentCpu> {
    after
        .iter()
        .map(|(name, now)| {
            let then = before.iter().find(|(n, _)| n == name).map(|(_, t)| t);
            let used: u64 = now
                .iter()
                .map(|(pid, cpu)| {
                    let start = then
                        .and_then(|t| t.iter().find(|(p, _)| p == pid))
                        .map_or(0, |(_, c)| *c);
                    cpu.saturating_sub(start)
                })
                .sum();
            ComponentCpu {
                name: name.clone(),
                cpu_us_per_delivery: used as f64 / deliveries.max(1) as f64,
                cpu_percent: used as f64 / (seconds * 1e4),
            }
        })
        .collect()
}

/// Sends from `senders` round robin at `rate` messages per second for
/// `duration`, stamping each with the time it was due (so a server that
/// falls behind shows up as latency, not as a slower offered rate), then
/// waits for the stragglers.
#[allow(clippy::too_many_arguments)]
async fn open_loop(
    system: &Arc<dyn System>,
    recorder: &Arc<Recorder>,
    senders: &mut [Sender<'_>],
    run: u16,
    rate: f64,
    duration: Duration,
    recipients: u32,
) -> Result<RatePoint> {
    if senders.is_empty() || rate <= 0.0 {
        bail!("nothing to send");
    }
    recorder.begin(run);
    let server = Sampler::start(system.server_pid(), SAMPLE_EVERY)?;
    let me = std::process::id();
    let generator_start = sample(me)?;
    let components_start = component_cpu(&system.components());
    let total = (rate * duration.as_secs_f64()).round() as u64;
    let interval_ns = 1e9 / rate;
    let start = Instant::now();
    let start_ns = now_ns();
    let count = senders.len() as u64;
    pace(start, rate, total, |k| {
        let index = usize::try_from(k % count).unwrap_or(0);
        if let Some(sender) = senders.get_mut(index) {
            let mut payload = sender.template.clone();
            Stamp {
                run,
                sender: sender.device,
                seq: sender.seq,
                due_ns: start_ns + (k as f64 * interval_ns) as u64,
            }
            .write(&mut payload);
            sender.seq += 1;
            sender.endpoint.send(sender.channel, payload);
            recorder.note_sent();
        }
    })
    .await;
    let seconds = start.elapsed().as_secs_f64();
    recorder.close_window();
    let generator_end = sample(me)?;
    let server = server.finish()?;
    let components_end = component_cpu(&system.components());
    wait_for_stragglers(system.as_ref(), recorder, recipients).await;
    let observed = recorder.observed();
    let components = component_usage(
        &components_start,
        &components_end,
        observed.delivered_in_window,
        seconds,
    );
    let expected = observed.accepted * u64::from(recipients);
    let delivered_per_s = observed.delivered_in_window as f64 / seconds;
    Ok(RatePoint {
        offered_per_s: rate,
        seconds,
        recipients_per_message: recipients,
        lost: expected.saturating_sub(observed.delivered),
        server_cpu_us_per_delivery: server.cpu_us as f64
            / observed.delivered_in_window.max(1) as f64,
        generator_cpu_percent: (generator_end.cpu_us - generator_start.cpu_us) as f64
            / (seconds * 1e4),
        delivered_per_s,
        observed,
        server,
        components,
    })
}

/// Open-loop pacing: calls `send(k)` for k = 0 .. `total` at `rate` a
/// second from `start`, each as soon as it is due (checked every
/// millisecond; a late tick sends everything due since).
pub(crate) async fn pace(start: Instant, rate: f64, total: u64, mut send: impl FnMut(u64)) {
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut k = 0u64;
    while k < total {
        tick.tick().await;
        let due = ((start.elapsed().as_secs_f64() * rate) as u64 + 1).min(total);
        while k < due {
            send(k);
            k += 1;
        }
    }
}

/// Waits until every send was answered and every accepted message arrived
/// at each of its recipients, or nothing has moved for a while (a system
/// that lost messages), or [`DRAIN_TIMEOUT`] passed.
async fn wait_for_stragglers(system: &dyn System, recorder: &Recorder, recipients: u32) {
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    let mut last = (u64::MAX, u64::MAX);
    let mut quiet_since = Instant::now();
    while Instant::now() < deadline {
        let sent = recorder.sent.load(Ordering::SeqCst);
        let answered = recorder.answered.load(Ordering::SeqCst);
        let accepted = accepted(system, recorder);
        let delivered = recorder.delivered_count();
        let answers_done = !system.acknowledges() || answered >= sent;
        if answers_done && delivered >= accepted * u64::from(recipients) {
            return;
        }
        // Nothing says a message was dropped: stop once nothing has been
        // answered or has arrived for a while.
        if (answered, delivered) != last {
            last = (answered, delivered);
            quiet_since = Instant::now();
        } else if quiet_since.elapsed() > QUIET {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The senders of each channel: only its first member when `only_first`,
/// else device 1 of each member account (every member when accounts have
/// one device each; an account's other devices only receive, as a
/// person's other devices show what they sent from one).
fn senders_for<'a>(
    system: &Arc<dyn System>,
    topology: &Topology,
    endpoints: &'a [(u32, Box<dyn Endpoint>)],
    size: usize,
    only_first: bool,
) -> Vec<Sender<'a>> {
    let by_device: std::collections::HashMap<u32, &'a dyn Endpoint> =
        endpoints.iter().map(|(d, e)| (*d, e.as_ref())).collect();
    let mut senders = Vec::new();
    for (channel, members) in topology.channels.iter().enumerate() {
        let channel = channel as u32;
        let template = system.payload(channel, size);
        let members: Vec<u32> = if only_first {
            members.iter().take(1).copied().collect()
        } else {
            members
                .iter()
                .copied()
                .filter(|&m| topology.device_number(m) == 1)
                .collect()
        };
        for member in members {
            if let Some(endpoint) = by_device.get(&member) {
                senders.push(Sender {
                    device: member,
                    channel,
                    endpoint: *endpoint,
                    template: template.clone(),
                    seq: 0,
                });
            }
        }
    }
    senders
}

/// Sends `per_sender` messages from each sender as fast as they can be
/// queued (all due now), for workloads that measure storage, not latency.
fn send_backlog(senders: &mut [Sender<'_>], per_sender: u64, recorder: &Recorder) {
    let due_ns = now_ns();
    for _ in 0..per_sender {
        for sender in senders.iter_mut() {
            let mut payload = sender.template.clone();
            Stamp {
                run: 1,
                sender: sender.device,
                seq: sender.seq,
                due_ns,
            }
            .write(&mut payload);
            sender.seq += 1;
            sender.endpoint.send(sender.channel, payload);
            recorder.note_sent();
        }
    }
}

/// Messages the system took responsibility for: acknowledged ones, or all
/// that were written when it does not acknowledge.
fn accepted(system: &dyn System, recorder: &Recorder) -> u64 {
    if system.acknowledges() {
        recorder.accepted.load(Ordering::SeqCst)
    } else {
        recorder.sent.load(Ordering::SeqCst)
    }
}

/// Waits until the server answered every send (at once for systems that
/// do not acknowledge), or [`DRAIN_TIMEOUT`] passed.
async fn wait_for_answers(system: &dyn System, recorder: &Recorder) {
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    while system.acknowledges()
        && recorder.answered.load(Ordering::SeqCst) < recorder.sent.load(Ordering::SeqCst)
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Seconds from `start_ns` to the last delivery of the run (0 if none).
fn seconds_to_last_delivery(recorder: &Recorder, start_ns: u64) -> f64 {
    recorder
        .observed()
        .last_delivery_ns
        .saturating_sub(start_ns) as f64
        / 1e9
}

/// relay: `pairs` 1:1 conversations, both sides sending, at each rate.
pub async fn relay(
    system: &Arc<dyn System>,
    topology: &Topology,
    rates: &[f64],
    size: usize,
    duration: Duration,
) -> Result<Vec<RatePoint>> {
    let recorder = Arc::new(Recorder::new());
    let all: Vec<u32> = (0..topology.devices).collect();
    let endpoints = connect_all(system, &all, &recorder, CONNECT_PARALLELISM).await?;
    let mut senders = senders_for(system, topology, &endpoints, size, false);
    // Every conversation has as many devices: the peer's, and the sender's
    // own other devices.
    let recipients = (0..topology.channels.len())
        .map(|channel| topology.recipients(channel))
        .max()
        .unwrap_or(1)
        .max(1);
    let mut points = Vec::new();
    for (run, &rate) in rates.iter().enumerate() {
        let point = open_loop(
            system,
            &recorder,
            &mut senders,
            run as u16 + 1,
            rate,
            duration,
            recipients,
        )
        .await?;
        let others: String = point
            .components
            .iter()
            .map(|c| format!(", {} {:.1} µs/delivery", c.name, c.cpu_us_per_delivery))
            .collect();
        eprintln!(
            "  {}: offered {:.0}/s delivered {:.0}/s ({:.2} per accepted message, {} devices/account) \
             p50 {:.2} ms p99 {:.2} ms lost {} dup {} server {:.1} µs/delivery{others}",
            system.name(),
            rate,
            point.delivered_per_s,
            point.observed.delivered as f64 / point.observed.accepted.max(1) as f64,
            topology.devices_per_account,
            point.observed.p50_ms,
            point.observed.p99_ms,
            point.lost,
            point.observed.duplicates,
            point.server_cpu_us_per_delivery
        );
        points.push(point);
    }
    Ok(points)
}

/// fanout: one group per size, its first member sending at a rate that
/// offers about `deliveries_per_s` deliveries per second.
pub async fn fanout(
    system: &Arc<dyn System>,
    topology: &Topology,
    deliveries_per_s: f64,
    size: usize,
    duration: Duration,
) -> Result<Vec<RatePoint>> {
    let recorder = Arc::new(Recorder::new());
    let all: Vec<u32> = (0..topology.devices).collect();
    let endpoints = connect_all(system, &all, &recorder, CONNECT_PARALLELISM).await?;
    let mut points = Vec::new();
    for (channel, members) in topology.channels.iter().enumerate() {
        let recipients = topology.recipients(channel).max(1);
        let single = Topology {
            devices: topology.devices,
            channels: topology
                .channels
                .iter()
                .enumerate()
                .map(|(i, m)| if i == channel { m.clone() } else { Vec::new() })
                .collect(),
            devices_per_account: topology.devices_per_account,
        };
        let mut senders = senders_for(system, &single, &endpoints, size, true);
        let rate = deliveries_per_s / f64::from(recipients);
        let point = open_loop(
            system,
            &recorder,
            &mut senders,
            channel as u16 + 1,
            rate,
            duration,
            recipients,
        )
        .await?;
        eprintln!(
            "  {}: group of {} accounts × {} devices at {:.0} msgs/s: {:.0} deliveries/s \
             ({:.2} per accepted message) p99 {:.2} ms lost {} dup {} server {:.1} µs/delivery",
            system.name(),
            members.len() as u32 / topology.devices_per_account.max(1),
            topology.devices_per_account,
            rate,
            point.delivered_per_s,
            point.observed.delivered as f64 / point.observed.accepted.max(1) as f64,
            point.observed.p99_ms,
            point.lost,
            point.observed.duplicates,
            point.server_cpu_us_per_delivery
        );
        points.push(point);
    }
    Ok(points)
}

/// What the offline workload saw.
#[derive(Debug, Clone, Serialize)]
pub struct OfflineResult {
    pub messages: u64,
    pub accepted: u64,
    pub accept_seconds: f64,
    pub accepted_per_s: f64,
    pub killed: bool,
    pub drain_seconds: f64,
    pub drained_per_s: f64,
    pub delivered: u64,
    pub lost: u64,
    pub duplicates: u64,
    pub server_cpu_us_per_accept: f64,
    pub first_error: Option<String>,
}

/// offline: the receiving side of every pair is away; the senders send
/// `per_sender` messages each as fast as the server accepts them; then the
/// server is killed with SIGKILL (when `kill` is set and the system can
/// restart), restarted, and the receivers connect and drain.
pub async fn offline(
    system: &Arc<dyn System>,
    topology: &Topology,
    per_sender: u64,
    size: usize,
    kill: bool,
) -> Result<OfflineResult> {
    let recorder = Arc::new(Recorder::new());
    recorder.begin(1);
    let senders: Vec<u32> = topology
        .channels
        .iter()
        .filter_map(|m| m.first().copied())
        .collect();
    let receivers: Vec<u32> = topology
        .channels
        .iter()
        .filter_map(|m| m.get(1).copied())
        .collect();
    let endpoints = connect_all(system, &senders, &recorder, CONNECT_PARALLELISM).await?;
    let mut senders = senders_for(system, topology, &endpoints, size, true);
    let pid = system.server_pid();
    let cpu_start = sample(pid)?.cpu_us;
    let start = Instant::now();
    send_backlog(&mut senders, per_sender, &recorder);
    let sent = recorder.sent.load(Ordering::SeqCst);
    wait_for_answers(system.as_ref(), &recorder).await;
    let accept_seconds = start.elapsed().as_secs_f64();
    let cpu = sample(pid)?.cpu_us.saturating_sub(cpu_start);
    let accepted = accepted(system.as_ref(), &recorder);
    drop(senders);
    drop(endpoints);
    if kill {
        system.kill9_and_restart().await?;
    }
    let killed = kill;
    let drain_start = now_ns();
    let receiving = connect_all(system, &receivers, &recorder, CONNECT_PARALLELISM).await?;
    wait_for_stragglers(system.as_ref(), &recorder, 1).await;
    let drain_seconds = seconds_to_last_delivery(&recorder, drain_start).max(1e-3);
    drop(receiving);
    let observed = recorder.observed();
    Ok(OfflineResult {
        messages: sent,
        accepted,
        accept_seconds,
        accepted_per_s: accepted as f64 / accept_seconds,
        killed,
        drain_seconds,
        drained_per_s: observed.delivered as f64 / drain_seconds,
        delivered: observed.delivered,
        lost: accepted.saturating_sub(observed.delivered),
        duplicates: observed.duplicates,
        server_cpu_us_per_accept: cpu as f64 / accepted.max(1) as f64,
        first_error: observed.first_error,
    })
}

/// What the idle workload saw.
#[derive(Debug, Clone, Serialize)]
pub struct IdleResult {
    pub devices: u32,
    pub connect_seconds: f64,
    pub rss_before_kib: u64,
    pub rss_after_kib: u64,
    pub kib_per_connection: f64,
}

/// idle: connects every device and measures the server's resident memory
/// per connection once they are all in and quiet.
pub async fn idle(
    system: &Arc<dyn System>,
    topology: &Topology,
    settle: Duration,
) -> Result<IdleResult> {
    let recorder = Arc::new(Recorder::new());
    let pid = system.server_pid();
    tokio::time::sleep(settle).await;
    let before = sample(pid)?.rss_kib;
    let start = Instant::now();
    let all: Vec<u32> = (0..topology.devices).collect();
    let endpoints = connect_all(system, &all, &recorder, CONNECT_PARALLELISM).await?;
    let connect_seconds = start.elapsed().as_secs_f64();
    tokio::time::sleep(settle).await;
    let after = sample(pid)?.rss_kib;
    let alive = endpoints.iter().filter(|(_, e)| e.is_alive()).count();
    if alive != endpoints.len() {
        bail!(
            "{} of {} connections dropped while idle",
            endpoints.len() - alive,
            endpoints.len()
        );
    }
    drop(endpoints);
    Ok(IdleResult {
        devices: topology.devices,
        connect_seconds,
        rss_before_kib: before,
        rss_after_kib: after,
        kib_per_connection: after.saturating_sub(before) as f64
            / f64::from(topology.devices.max(1)),
    })
}

/// What the storm workload saw.
#[derive(Debug, Clone, Serialize)]
pub struct StormResult {
    pub devices: u32,
    pub backlog_per_device: u64,
    pub seconds_to_connected: f64,
    pub seconds_to_drained: f64,
    pub delivered: u64,
    pub lost: u64,
    pub duplicates: u64,
}

/// storm: half the devices leave a backlog for the other half; then every
/// device connects at once, and we time until all are in and drained.
pub async fn storm(
    system: &Arc<dyn System>,
    topology: &Topology,
    backlog: u64,
    size: usize,
) -> Result<StormResult> {
    let recorder = Arc::new(Recorder::new());
    recorder.begin(1);
    let senders: Vec<u32> = topology
        .channels
        .iter()
        .filter_map(|m| m.first().copied())
        .collect();
    {
        let endpoints = connect_all(system, &senders, &recorder, CONNECT_PARALLELISM).await?;
        let mut senders = senders_for(system, topology, &endpoints, size, true);
        send_backlog(&mut senders, backlog, &recorder);
        wait_for_answers(system.as_ref(), &recorder).await;
    }
    let accepted = accepted(system.as_ref(), &recorder);
    // Let the server notice the senders are gone.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let start = Instant::now();
    let start_ns = now_ns();
    let all: Vec<u32> = (0..topology.devices).collect();
    let endpoints = connect_all(system, &all, &recorder, CONNECT_PARALLELISM).await?;
    let seconds_to_connected = start.elapsed().as_secs_f64();
    wait_for_stragglers(system.as_ref(), &recorder, 1).await;
    let seconds_to_drained =
        seconds_to_last_delivery(&recorder, start_ns).max(seconds_to_connected);
    drop(endpoints);
    let observed = recorder.observed();
    Ok(StormResult {
        devices: topology.devices,
        backlog_per_device: backlog,
        seconds_to_connected,
        seconds_to_drained,
        delivered: observed.delivered,
        lost: accepted.saturating_sub(observed.delivered),
        duplicates: observed.duplicates,
    })
}

/// What the soak workload saw.
#[derive(Debug, Clone, Serialize)]
pub struct SoakResult {
    pub seconds: f64,
    pub rate_per_s: f64,
    pub online_fraction: f64,
    pub observed: Observed,
    pub lost: u64,
    pub server: Usage,
    pub reconnects: u64,
    pub errors: u64,
    /// The server's RSS at the end of each minute of traffic: flat once
    /// every connection's buffers reached their working size (the first
    /// minute), or growing.
    pub rss_per_minute_kib: Vec<u64>,
}

/// soak: seeded random traffic at `rate` messages per second (Poisson
/// arrivals, sizes drawn from `sizes`) over 1:1 conversations, with
/// A random device out of `devices` for which `wanted` holds, if one turns
/// up within a few draws (both the online and the offline devices are a
/// large share, so one nearly always does).
fn draw(rng: &mut StdRng, devices: usize, mut wanted: impl FnMut(usize) -> bool) -> Option<usize> {
    (0..64)
        .map(|_| rng.gen_range(0..devices))
        .find(|&d| wanted(d))
}

/// `online` of the devices connected at any time and devices churning
/// (one leaves and another comes back every `churn_every`). Messages to an
/// offline recipient are stored and drained when it returns; their latency
/// is reported apart.
#[allow(clippy::too_many_arguments)]
pub async fn soak(
    system: &Arc<dyn System>,
    topology: &Topology,
    rate: f64,
    sizes: &[usize],
    duration: Duration,
    online: f64,
    churn_every: Duration,
    seed: u64,
) -> Result<SoakResult> {
    let recorder = Arc::new(Recorder::new());
    recorder.begin(1);
    let mut rng = StdRng::seed_from_u64(seed);
    let devices = topology.devices as usize;
    let mut is_online: Vec<bool> = (0..devices)
        .map(|_| rng.gen_bool(online.clamp(0.0, 1.0)))
        .collect();
    let first: Vec<u32> = (0..topology.devices)
        .filter(|&d| is_online.get(d as usize).copied().unwrap_or(false))
        .collect();
    let mut endpoints: Vec<Option<Box<dyn Endpoint>>> = (0..devices).map(|_| None).collect();
    for (device, endpoint) in connect_all(system, &first, &recorder, CONNECT_PARALLELISM).await? {
        if let Some(slot) = endpoints.get_mut(device as usize) {
            *slot = Some(endpoint);
        }
    }
    let templates: Vec<Vec<Vec<u8>>> = (0..topology.channels.len() as u32)
        .map(|c| sizes.iter().map(|&s| system.payload(c, s)).collect())
        .collect();
    let (returning_tx, mut returning_rx) =
        tokio::sync::mpsc::unbounded_channel::<(u32, Box<dyn Endpoint>)>();
    let server = Sampler::start(system.server_pid(), SAMPLE_EVERY)?;
    let mut seq = vec![0u64; devices];
    let start = Instant::now();
    let start_ns = now_ns();
    let mut next_arrival = 0.0f64;
    let mut next_churn = churn_every;
    let mut reconnects = 0u64;
    // A device that just left may still have its last acknowledgement in
    // flight; it comes back only after a pause, as a phone would.
    let mut left_at: Vec<Option<Instant>> = (0..devices).map(|_| None).collect();
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let errors = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut rss_per_minute_kib = Vec::new();
    let mut next_minute = Duration::from_secs(60);
    while start.elapsed() < duration {
        tick.tick().await;
        if start.elapsed() >= next_minute {
            next_minute += Duration::from_secs(60);
            if let Ok(now) = crate::sampler::sample(system.server_pid()) {
                rss_per_minute_kib.push(now.rss_kib);
            }
        }
        while let Ok((device, endpoint)) = returning_rx.try_recv() {
            if let Some(slot) = endpoints.get_mut(device as usize) {
                *slot = Some(endpoint);
            }
            reconnects += 1;
        }
        if start.elapsed() >= next_churn {
            next_churn += churn_every;
            // One online device leaves, one offline device comes back: drawn
            // from those online and those offline, so the share online stays
            // where it started. (Drawing from all devices and skipping the
            // misses let 70 % drift towards 50 %: the load was not steady.)
            let leaving = draw(&mut rng, devices, |d| {
                endpoints.get(d).is_some_and(Option::is_some)
            });
            if let Some(leaving) = leaving
                && endpoints.get_mut(leaving).and_then(Option::take).is_some()
                && let Some(flag) = is_online.get_mut(leaving)
            {
                *flag = false;
                if let Some(at) = left_at.get_mut(leaving) {
                    *at = Some(Instant::now());
                }
            }
            let returning = draw(&mut rng, devices, |d| {
                let rested = left_at
                    .get(d)
                    .and_then(|at| *at)
                    .is_none_or(|at| at.elapsed() > Duration::from_secs(2));
                rested
                    && is_online.get(d) == Some(&false)
                    && endpoints.get(d).is_some_and(Option::is_none)
            });
            if let Some(returning) = returning {
                if let Some(flag) = is_online.get_mut(returning) {
                    *flag = true;
                }
                let system = Arc::clone(system);
                let recorder = Arc::clone(&recorder);
                let tx = returning_tx.clone();
                let errors = Arc::clone(&errors);
                tokio::spawn(async move {
                    match system.connect(returning as u32, recorder).await {
                        Ok(endpoint) => {
                            let _ = tx.send((returning as u32, endpoint));
                        }
                        Err(_) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        }
        let now = start.elapsed().as_secs_f64();
        while next_arrival <= now {
            let due_ns = start_ns + (next_arrival * 1e9) as u64;
            // Exponential gaps: a Poisson process at `rate`.
            let gap: f64 = -(1.0 - rng.r#gen::<f64>()).ln() / rate;
            next_arrival += gap;
            // A random conversation whose chosen side is online sends.
            for _ in 0..8 {
                let channel = rng.gen_range(0..topology.channels.len());
                let Some(members) = topology.channels.get(channel) else {
                    continue;
                };
                let side = rng.gen_range(0..members.len().max(1));
                let Some(&from) = members.get(side) else {
                    continue;
                };
                let Some(Some(endpoint)) = endpoints.get(from as usize) else {
                    continue;
                };
                let to_online = members
                    .iter()
                    .filter(|&&m| m != from)
                    .all(|&m| endpoints.get(m as usize).is_some_and(Option::is_some));
                let size_index = rng.gen_range(0..100usize) * sizes.len() / 100;
                let Some(template) = templates.get(channel).and_then(|t| t.get(size_index)) else {
                    continue;
                };
                let mut payload = template.clone();
                let Some(counter) = seq.get_mut(from as usize) else {
                    continue;
                };
                Stamp {
                    run: if to_online { 1 } else { 1 | DEFERRED },
                    sender: from,
                    seq: *counter,
                    due_ns,
                }
                .write(&mut payload);
                *counter += 1;
                endpoint.send(channel as u32, payload);
                recorder.note_sent();
                break;
            }
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    recorder.close_window();
    let server = server.finish()?;
    // Everyone comes back, so every stored message can be counted.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let missing: Vec<u32> = (0..topology.devices)
        .filter(|&d| endpoints.get(d as usize).is_some_and(Option::is_none))
        .collect();
    while let Ok((device, endpoint)) = returning_rx.try_recv() {
        if let Some(slot) = endpoints.get_mut(device as usize) {
            *slot = Some(endpoint);
        }
    }
    let _back = connect_all(system, &missing, &recorder, CONNECT_PARALLELISM).await?;
    wait_for_stragglers(system.as_ref(), &recorder, 1).await;
    let accepted = accepted(system.as_ref(), &recorder);
    let observed = recorder.observed();
    Ok(SoakResult {
        seconds,
        rate_per_s: observed.sent as f64 / seconds,
        online_fraction: online,
        lost: accepted.saturating_sub(observed.delivered),
        errors: observed.refused + errors.load(Ordering::Relaxed),
        observed,
        server,
        reconnects,
        rss_per_minute_kib,
    })
}
