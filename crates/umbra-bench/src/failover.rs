//! failover (cluster mode, `--nodes 2` or more): relay between pairs whose
//! two devices are on different nodes, at a fixed offered rate, while the
//! last node is killed with SIGKILL part-way through. Each device that was
//! on it notices its connection end, connects to the next node at once (a
//! device's first retry; the terminal client waits 1 s before it) and is
//! timed until it is *served again*: logged in and its stored backlog
//! pushed (the server's `Synced`). Loss is counted exactly, message by
//! message: every message the server accepted must reach its recipient
//! (sends never answered, their connection gone, are counted apart: their
//! sender was not told "accepted").

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use serde::Serialize;

use crate::recorder::{Observed, Recorder};
use crate::stamp::{Stamp, now_ns};
use crate::system::{Endpoint, System, Topology};
use crate::workload::{CONNECT_PARALLELISM, connect_all, pace};

/// How long a moved device keeps trying the next node before the run
/// fails.
const RECONNECT_FOR: Duration = Duration::from_secs(60);
/// The wait for stragglers ends once nothing is missing and no answer
/// came for this long, or after [`QUIET`] without any progress.
const SETTLED: Duration = Duration::from_secs(3);
const QUIET: Duration = Duration::from_secs(15);

/// What a failover run observed.
#[derive(Debug, Clone, Serialize)]
pub struct FailoverResult {
    pub nodes: usize,
    pub offered_per_s: f64,
    pub seconds: f64,
    /// When the node was killed, seconds into the run.
    pub killed_at_s: f64,
    /// Devices that were on the killed node.
    pub devices_moved: usize,
    /// From the kill to a moved device seeing its connection end: the
    /// operating system closes a killed process's sockets.
    pub noticed_p50_ms: f64,
    pub noticed_max_ms: f64,
    /// From the kill to a moved device served again by another node.
    pub served_again_p50_ms: f64,
    pub served_again_p99_ms: f64,
    pub served_again_max_ms: f64,
    /// Connection attempts that failed before one succeeded (all devices).
    pub failed_attempts: u64,
    /// Sends in flight when their connection ended: never answered (the
    /// message may or may not have been stored).
    pub unanswered: u64,
    /// Sends made on a connection that had already ended, before its
    /// device moved: never sent at all.
    pub cut_off: u64,
    /// Deliveries of accepted messages that never arrived (must be 0).
    pub lost: u64,
    pub observed: Observed,
}

/// One sender: a device and the channel it sends on.
struct Sender {
    device: u32,
    channel: u32,
    template: Vec<u8>,
    seq: u64,
}

/// The failover workload (see the module's documentation).
pub async fn failover(
    system: &Arc<dyn System>,
    topology: &Topology,
    rate: f64,
    size: usize,
    duration: Duration,
    kill_after: Duration,
) -> Result<FailoverResult> {
    let nodes = system.nodes();
    if nodes < 2 {
        bail!("failover needs a cluster: --nodes 2 or more");
    }
    if kill_after >= duration || rate <= 0.0 {
        bail!("the node must be killed inside the run (--kill-after < --duration)");
    }
    let victim = nodes - 1;
    let recorder = Arc::new(Recorder::new());
    let all: Vec<u32> = (0..topology.devices).collect();
    let endpoints = connect_all(system, &all, &recorder, CONNECT_PARALLELISM).await?;
    // Each device's current connection, replaced when it moves.
    let slots: Arc<Vec<RwLock<Arc<dyn Endpoint>>>> = Arc::new(
        endpoints
            .into_iter()
            .map(|(_, endpoint)| RwLock::new(Arc::from(endpoint)))
            .collect(),
    );
    let mut senders: Vec<Sender> = Vec::new();
    for (channel, members) in topology.channels.iter().enumerate() {
        let template = system.payload(channel as u32, size);
        for &device in members {
            senders.push(Sender {
                device,
                channel: channel as u32,
                template: template.clone(),
                seq: 0,
            });
        }
    }
    if senders.is_empty() {
        bail!("nothing to send");
    }
    let mut channels_of = std::collections::HashMap::<u32, usize>::new();
    for sender in &senders {
        *channels_of.entry(sender.device).or_default() += 1;
    }
    if channels_of.values().any(|&n| n > 1) {
        // Sequence numbers are per sender and channel here; a device in
        // two channels would number two streams alike.
        bail!("failover runs on pairs: every device in one channel");
    }
    let recipients = recipients_of(topology);
    let moved: Vec<u32> = all
        .iter()
        .copied()
        .filter(|&d| system.node_of(d) == victim)
        .collect();

    recorder.begin(1);
    let start = Instant::now();
    let start_ns = now_ns();
    let killer = {
        let system = Arc::clone(system);
        let slots = Arc::clone(&slots);
        let recorder = Arc::clone(&recorder);
        let moved = moved.clone();
        tokio::spawn(async move {
            tokio::time::sleep(kill_after).await;
            kill_and_move(&system, &slots, &recorder, &moved, victim, nodes).await
        })
    };

    let total = (rate * duration.as_secs_f64()).round() as u64;
    let interval_ns = 1e9 / rate;
    let count = senders.len() as u64;
    pace(start, rate, total, |k| {
        let index = usize::try_from(k % count).unwrap_or(0);
        if let Some(sender) = senders.get_mut(index) {
            let mut payload = sender.template.clone();
            Stamp {
                run: 1,
                sender: sender.device,
                seq: sender.seq,
                due_ns: start_ns + (k as f64 * interval_ns) as u64,
            }
            .write(&mut payload);
            sender.seq += 1;
            let endpoint = slots
                .get(sender.device as usize)
                .map(|slot| Arc::clone(&slot.read().unwrap_or_else(|p| p.into_inner())));
            if let Some(endpoint) = endpoint {
                endpoint.send(sender.channel, payload);
            }
            recorder.note_sent();
        }
    })
    .await;
    let seconds = start.elapsed().as_secs_f64();
    recorder.close_window();
    let moves = killer.await??;

    // Stragglers: until nothing accepted is missing and the answers have
    // stopped coming (the cut-off sends never will).
    let mut last = (u64::MAX, u64::MAX);
    let mut changed = Instant::now();
    let lost = loop {
        let missing = recorder.missing(&recipients);
        let now = (
            recorder.answered.load(std::sync::atomic::Ordering::SeqCst),
            recorder.delivered_count(),
        );
        if now != last {
            last = now;
            changed = Instant::now();
        }
        if (missing == 0 && changed.elapsed() >= SETTLED) || changed.elapsed() >= QUIET {
            break missing;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // A connection that ended on a node that was not killed would make
    // its deliveries look lost: the run is void then.
    let ended = slots
        .iter()
        .filter(|slot| !slot.read().unwrap_or_else(|p| p.into_inner()).is_alive())
        .count();
    if ended > 0 {
        bail!("{ended} connections ended besides the killed node's: the run proves nothing");
    }
    let observed = recorder.observed();
    let cut_off = recorder.cut_off.load(std::sync::atomic::Ordering::SeqCst);
    let ms = |d: &Duration| d.as_secs_f64() * 1000.0;
    let mut served: Vec<f64> = moves.iter().map(|m| ms(&m.served)).collect();
    served.sort_by(f64::total_cmp);
    let mut noticed: Vec<f64> = moves.iter().map(|m| ms(&m.noticed)).collect();
    noticed.sort_by(f64::total_cmp);
    let result = FailoverResult {
        nodes,
        offered_per_s: rate,
        seconds,
        killed_at_s: kill_after.as_secs_f64(),
        devices_moved: moves.len(),
        noticed_p50_ms: quantile(&noticed, 0.5),
        noticed_max_ms: noticed.last().copied().unwrap_or(0.0),
        served_again_p50_ms: quantile(&served, 0.5),
        served_again_p99_ms: quantile(&served, 0.99),
        served_again_max_ms: served.last().copied().unwrap_or(0.0),
        failed_attempts: moves.iter().map(|m| m.failed_attempts).sum(),
        unanswered: observed
            .sent
            .saturating_sub(observed.accepted + observed.refused + cut_off),
        cut_off,
        lost,
        observed,
    };
    drop(slots);
    Ok(result)
}

/// The devices that receive what each sender sends: the other members of
/// its channels.
fn recipients_of(topology: &Topology) -> impl Fn(u32) -> Vec<u32> + use<> {
    let mut of: std::collections::HashMap<u32, Vec<u32>> = std::collections::HashMap::new();
    for members in &topology.channels {
        for &sender in members {
            of.entry(sender)
                .or_default()
                .extend(members.iter().copied().filter(|&m| m != sender));
        }
    }
    move |sender| of.get(&sender).cloned().unwrap_or_default()
}

/// How one device moved off the killed node.
struct Move {
    noticed: Duration,
    served: Duration,
    failed_attempts: u64,
}

/// Kills node `victim`, then moves each of `moved` to the next node as
/// soon as it sees its connection end.
async fn kill_and_move(
    system: &Arc<dyn System>,
    slots: &Arc<Vec<RwLock<Arc<dyn Endpoint>>>>,
    recorder: &Arc<Recorder>,
    moved: &[u32],
    victim: usize,
    nodes: usize,
) -> Result<Vec<Move>> {
    let killed = Instant::now();
    // Reaping the process blocks: off the runtime, which the generator
    // shares with every device's connection.
    let killer = Arc::clone(system);
    tokio::task::spawn_blocking(move || killer.kill_node(victim)).await??;
    let target = (victim + 1) % nodes;
    let mut tasks = Vec::with_capacity(moved.len());
    for &device in moved {
        let system = Arc::clone(system);
        let slots = Arc::clone(slots);
        let recorder = Arc::clone(recorder);
        tasks.push(tokio::spawn(async move {
            let slot = slots
                .get(device as usize)
                .ok_or_else(|| anyhow::anyhow!("no device {device}"))?;
            let current = Arc::clone(&slot.read().unwrap_or_else(|p| p.into_inner()));
            let within = RECONNECT_FOR.saturating_sub(killed.elapsed());
            if tokio::time::timeout(within, current.closed())
                .await
                .is_err()
            {
                bail!("device {device} never saw its node die");
            }
            drop(current);
            let noticed = killed.elapsed();
            let mut failed_attempts = 0;
            loop {
                let within = RECONNECT_FOR.saturating_sub(killed.elapsed());
                let attempt = system.connect_to(device, target, Arc::clone(&recorder));
                let attempt = tokio::time::timeout(within, attempt)
                    .await
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("no login within {RECONNECT_FOR:?}")));
                match attempt {
                    Ok(endpoint) => {
                        let served = killed.elapsed();
                        *slot.write().unwrap_or_else(|p| p.into_inner()) = Arc::from(endpoint);
                        return Ok(Move {
                            noticed,
                            served,
                            failed_attempts,
                        });
                    }
                    Err(error) if killed.elapsed() > RECONNECT_FOR => {
                        bail!("device {device} not served again: {error:#}")
                    }
                    Err(_) => {
                        failed_attempts += 1;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        }));
    }
    let mut moves = Vec::with_capacity(tasks.len());
    let mut failure = None;
    for task in &mut tasks {
        match task.await {
            Ok(Ok(moved)) => moves.push(moved),
            Ok(Err(error)) => {
                failure = Some(error);
                break;
            }
            Err(error) => {
                failure = Some(error.into());
                break;
            }
        }
    }
    if let Some(error) = failure {
        // The other movers are not left running behind the error.
        for task in &tasks {
            task.abort();
        }
        return Err(error);
    }
    Ok(moves)
}

/// The `q` quantile of sorted `values` (0 for none).
fn quantile(values: &[f64], q: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let rank = ((values.len() as f64 * q).ceil() as usize).clamp(1, values.len());
    values.get(rank - 1).copied().unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_of_served_times() {
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&values, 0.5), 50.0);
        assert_eq!(quantile(&values, 0.99), 99.0);
        assert_eq!(quantile(&[7.0], 0.99), 7.0);
        assert_eq!(quantile(&[], 0.5), 0.0);
    }

    #[test]
    fn each_sender_sends_to_the_other_members_of_its_channels() {
        let topology = Topology::pairs(2);
        let of = recipients_of(&topology);
        assert_eq!(of(0), vec![1]);
        assert_eq!(of(3), vec![2]);
        assert!(of(9).is_empty());
    }
}
