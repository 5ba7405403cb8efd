//! CPU time and memory of a process, read from `/proc`.

use std::time::Duration;

use anyhow::{Context, Result};
use serde::Serialize;

/// Linux reports CPU times in clock ticks of 1/100 s (USER_HZ is 100 on
/// every architecture Linux supports for user space ABI purposes here).
const TICKS_PER_SECOND: u64 = 100;

/// One reading of a process.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct ProcSample {
    /// User plus system CPU time, in microseconds.
    pub cpu_us: u64,
    /// Resident set size, in KiB.
    pub rss_kib: u64,
}

/// Reads `/proc/PID/stat` and `/proc/PID/status`.
pub fn sample(pid: u32) -> Result<ProcSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // The command name is in parentheses and may contain spaces: count
    // fields from the last ')'.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .context("unexpected /proc stat format")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After ')': state is field 3 of stat(5), so utime (14) and stime (15)
    // are at indexes 11 and 12 here.
    let ticks = |index: usize| -> Result<u64> {
        fields
            .get(index)
            .context("short /proc stat")?
            .parse::<u64>()
            .context("bad /proc stat number")
    };
    let cpu_us = (ticks(11)? + ticks(12)?) * (1_000_000 / TICKS_PER_SECOND);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let rss_kib = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
        .unwrap_or(0);
    Ok(ProcSample { cpu_us, rss_kib })
}

/// The sum of several processes' readings (a server of a master process
/// and its workers counts as one).
pub fn sample_all(pids: &[u32]) -> Result<ProcSample> {
    let mut total = ProcSample::default();
    for &pid in pids {
        let one = sample(pid)?;
        total.cpu_us += one.cpu_us;
        total.rss_kib += one.rss_kib;
    }
    Ok(total)
}

/// Samples a process (or several, summed) every `every` in the
/// background; the peak RSS and the CPU time between [`Sampler::start`]
/// and [`Sampler::finish`].
#[derive(Debug)]
pub struct Sampler {
    pids: Vec<u32>,
    start: ProcSample,
    peak_rss: std::sync::Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

/// CPU and memory over an interval.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Usage {
    pub cpu_us: u64,
    pub rss_start_kib: u64,
    pub rss_end_kib: u64,
    pub rss_peak_kib: u64,
}

impl Sampler {
    pub fn start(pid: u32, every: Duration) -> Result<Sampler> {
        Sampler::start_all(vec![pid], every)
    }

    /// Samples the sum of `pids`.
    pub fn start_all(pids: Vec<u32>, every: Duration) -> Result<Sampler> {
        let start = sample_all(&pids)?;
        let peak_rss = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(start.rss_kib));
        let peak = std::sync::Arc::clone(&peak_rss);
        let watched = pids.clone();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                match sample_all(&watched) {
                    Ok(now) => {
                        peak.fetch_max(now.rss_kib, std::sync::atomic::Ordering::Relaxed);
                    }
                    Err(_) => return,
                }
            }
        });
        Ok(Sampler {
            pids,
            start,
            peak_rss,
            task,
        })
    }

    pub fn finish(self) -> Result<Usage> {
        self.task.abort();
        let end = sample_all(&self.pids)?;
        Ok(Usage {
            cpu_us: end.cpu_us.saturating_sub(self.start.cpu_us),
            rss_start_kib: self.start.rss_kib,
            rss_end_kib: end.rss_kib,
            rss_peak_kib: self
                .peak_rss
                .load(std::sync::atomic::Ordering::Relaxed)
                .max(end.rss_kib),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_memory_and_uses_cpu() {
        let pid = std::process::id();
        let before = sample(pid).expect("own /proc entry");
        let mut x = 0u64;
        let spin = std::time::Instant::now();
        while spin.elapsed() < Duration::from_millis(50) {
            x = x.wrapping_mul(31).wrapping_add(7);
        }
        std::hint::black_box(x);
        let after = sample(pid).expect("own /proc entry");
        assert!(after.rss_kib > 0);
        assert!(after.cpu_us >= before.cpu_us);
    }
}
