//! The files workload: what attachments cost the server. First many
//! transfers at once (100 of 100 MiB by default) and the server's memory
//! meanwhile, which must not grow with the files (the server streams; it
//! never holds a file), measured from a server that has moved nothing
//! yet; then upload and download throughput and server CPU per MB for
//! files of each size, one transfer at a time.
//!
//! Umbra is driven as its devices drive it: a blob of the sealed file's
//! size (`umbra_proto::blobs::sealed_len`), created in a group, uploaded
//! in `PutBlob` requests of four sealed segments (256 KiB and 64 bytes)
//! and read in `GetBlob` requests as large, four in flight, then
//! `BlobFetched` (not waited for, as a device does not). Its peer is nginx over TLS
//! ([`crate::peers::nginx`]) moving the same number of bytes with `PUT` and
//! `GET`. The bytes are random (sealed files look so); every download is
//! checked against what was uploaded.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use futures_util::StreamExt;
use futures_util::stream::FuturesOrdered;
use serde::Serialize;
use umbra_proto::blobs::{BlobId, sealed_len};
use umbra_proto::{GroupId, Reply, Request};

use crate::conn::Conn;
use crate::recorder::Recorder;
use crate::sampler::{Sampler, sample_all};
use crate::umbra::UmbraSystem;

/// Bytes per request, as Umbra's device sends and reads them: four sealed
/// segments (256 KiB and 64 bytes).
const CHUNK: usize = 4 * umbra_proto::blobs::SEALED_SEGMENT;
/// Requests of one transfer in flight at once, as the device keeps them.
const WINDOW: usize = 4;
/// How often memory is read while transfers run.
const SAMPLE_EVERY: Duration = Duration::from_millis(50);

/// What was stored, as its server names it (a blob ID, a path).
#[derive(Debug, Clone)]
pub struct Stored(pub Vec<u8>);

/// A server that stores and serves files.
#[async_trait::async_trait]
pub trait FileServer: Send + Sync {
    fn name(&self) -> String;

    /// Its processes (their CPU and memory are summed).
    fn pids(&self) -> Vec<u32>;

    /// What an upload's answer promises, for the report.
    fn durability(&self) -> String;

    /// Transfer slot `slot`: an uploader and a downloader of its own.
    async fn open(&self, slot: u32) -> Result<Box<dyn Slot>>;
}

/// One transfer slot.
#[async_trait::async_trait]
pub trait Slot: Send {
    /// Uploads `bytes` whole.
    async fn upload(&mut self, bytes: &[u8]) -> Result<Stored>;

    /// Downloads `stored` whole and checks it is `expect`.
    async fn download(&mut self, stored: &Stored, expect: &[u8]) -> Result<()>;
}

/// Umbra: slot `i` is pair `i` of the fixture; its first device uploads
/// into their group, the second downloads.
#[derive(Debug)]
pub struct UmbraFiles {
    pub system: UmbraSystem,
}

#[async_trait::async_trait]
impl FileServer for UmbraFiles {
    fn name(&self) -> String {
        crate::system::System::name(&self.system)
    }

    fn pids(&self) -> Vec<u32> {
        vec![crate::system::System::server_pid(&self.system)]
    }

    fn durability(&self) -> String {
        "each 256 KiB PutBlob answered once written and fsynced; the blob deleted once its \
         recipient says BlobFetched"
            .into()
    }

    async fn open(&self, slot: u32) -> Result<Box<dyn Slot>> {
        let recorder = Arc::new(Recorder::new());
        let group = self
            .system
            .group(slot)
            .with_context(|| format!("no pair {slot} in the fixture"))?
            .clone();
        let sender = self
            .system
            .login(slot * 2, 0, Arc::clone(&recorder))
            .await?;
        let receiver = self.system.login(slot * 2 + 1, 0, recorder).await?;
        Ok(Box::new(UmbraSlot {
            group,
            sender,
            receiver,
        }))
    }
}

struct UmbraSlot {
    group: GroupId,
    sender: Conn,
    receiver: Conn,
}

#[async_trait::async_trait]
impl Slot for UmbraSlot {
    async fn upload(&mut self, bytes: &[u8]) -> Result<Stored> {
        let blob_id = match self
            .sender
            .request(Request::CreateBlob {
                group_id: self.group.clone(),
                size: bytes.len() as u64,
                ttl_seconds: 0,
            })
            .await?
        {
            Reply::BlobCreated { blob_id, .. } => blob_id,
            other => bail!("CreateBlob answered with {other:?}"),
        };
        // As the device does: WINDOW requests in flight, answered in order.
        let mut chunks = bytes.chunks(CHUNK);
        let mut in_flight = FuturesOrdered::new();
        let mut asked = 0u64;
        loop {
            while in_flight.len() < WINDOW {
                let Some(chunk) = chunks.next() else { break };
                let request = self.sender.request(Request::PutBlob {
                    blob_id,
                    offset: asked,
                    data: chunk.to_vec().into(),
                });
                asked += chunk.len() as u64;
                let end = asked;
                in_flight.push_back(async move { (end, request.await) });
            }
            let Some((end, reply)) = in_flight.next().await else {
                break;
            };
            match reply? {
                Reply::BlobState { stored, .. } if stored == end => {}
                other => bail!("PutBlob to {end} answered with {other:?}"),
            }
        }
        Ok(Stored(blob_id.0.to_vec()))
    }

    async fn download(&mut self, stored: &Stored, expect: &[u8]) -> Result<()> {
        let blob_id = BlobId(stored.0.as_slice().try_into().context("not a blob ID")?);
        let mut in_flight = FuturesOrdered::new();
        let mut asked = 0usize;
        let mut offset = 0usize;
        while offset < expect.len() {
            while in_flight.len() < WINDOW && asked < expect.len() {
                let length = (expect.len() - asked).min(CHUNK);
                let request = self.receiver.request(Request::GetBlob {
                    blob_id,
                    offset: asked as u64,
                    length: length as u32,
                });
                asked += length;
                in_flight.push_back(request);
            }
            let Some(reply) = in_flight.next().await else {
                break;
            };
            let data = match reply? {
                Reply::BlobData { data, .. } => data,
                other => bail!("GetBlob at {offset} answered with {other:?}"),
            };
            ensure!(
                !data.is_empty() && expect.get(offset..offset + data.len()) == Some(&data[..]),
                "the blob's bytes at {offset} are not the ones uploaded"
            );
            offset += data.len();
        }
        // As the device does: said, not waited for.
        self.receiver.fire(Request::BlobFetched { blob_id }, None);
        Ok(())
    }
}

/// The sizes a run measures.
#[derive(Debug, Clone)]
pub struct Plan {
    /// File sizes measured one transfer at a time.
    pub sizes: Vec<u64>,
    /// Transfers at once, and the size of each.
    pub concurrent: u32,
    pub concurrent_size: u64,
}

impl Plan {
    /// Files of `size` moved one after another: enough to last a while
    /// (512 MiB in all), at least 3, at most 64.
    pub fn files_of(size: u64) -> u64 {
        (512 * 1024 * 1024 / size.max(1)).clamp(3, 64)
    }

    /// Slots (pairs of the fixture) the run needs.
    pub fn slots(&self) -> u32 {
        self.concurrent.max(1)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct FilesResult {
    pub one_at_a_time: Vec<SizePoint>,
    pub concurrent: Concurrent,
    pub durability: String,
}

/// Files of one size moved one at a time.
#[derive(Debug, Clone, Serialize)]
pub struct SizePoint {
    /// The file's size, and the bytes moved for it (its sealed size).
    pub file_bytes: u64,
    pub bytes: u64,
    pub files: u64,
    pub upload_mb_s: f64,
    pub download_mb_s: f64,
    /// Server CPU (ms) per MB (10^6 bytes) moved.
    pub upload_cpu_ms_per_mb: f64,
    pub download_cpu_ms_per_mb: f64,
}

/// Many transfers at once.
#[derive(Debug, Clone, Serialize)]
pub struct Concurrent {
    pub transfers: u32,
    pub file_bytes: u64,
    pub bytes: u64,
    /// Aggregate throughput.
    pub upload_mb_s: f64,
    pub download_mb_s: f64,
    pub upload_cpu_ms_per_mb: f64,
    pub download_cpu_ms_per_mb: f64,
    /// Server RSS with every connection open and nothing moving, and its
    /// peak while uploads and while downloads ran.
    pub rss_idle_kib: u64,
    pub rss_peak_upload_kib: u64,
    pub rss_peak_download_kib: u64,
    /// The larger peak above the idle figure.
    pub rss_growth_kib: u64,
}

const MB: f64 = 1_000_000.0;

/// Runs `plan` against `server`.
pub async fn files(server: &dyn FileServer, plan: &Plan) -> Result<FilesResult> {
    let largest = plan
        .sizes
        .iter()
        .copied()
        .chain([plan.concurrent_size])
        .map(sealed_len)
        .max()
        .unwrap_or(0);
    let content = Arc::new(crate::peers::random_payload(
        usize::try_from(largest).context("file too large for this machine")?,
    ));
    let mut slots = Vec::new();
    for slot in 0..plan.slots() {
        slots.push(server.open(slot).await?);
    }
    let pids = server.pids();

    // All at once first, on a server that has moved nothing yet: its
    // memory with the connections open is the baseline, with no buffer
    // kept from earlier transfers in it.
    let (concurrent, mut slots) = concurrent(plan, slots, &content, &pids).await?;
    eprintln!(
        "  {}: {} transfers of {} B at once: up {:.0} MB/s, down {:.0} MB/s; RSS {} KiB idle, \
         peak {} KiB up, {} KiB down (+{} KiB)",
        server.name(),
        concurrent.transfers,
        concurrent.file_bytes,
        concurrent.upload_mb_s,
        concurrent.download_mb_s,
        concurrent.rss_idle_kib,
        concurrent.rss_peak_upload_kib,
        concurrent.rss_peak_download_kib,
        concurrent.rss_growth_kib
    );

    // The server finishes what the transfers left (deleting 10 GiB of
    // fetched blobs takes a while) before anything is timed again.
    settle(&pids).await?;

    let mut one_at_a_time = Vec::new();
    for &size in &plan.sizes {
        let bytes = sealed_len(size);
        let body = content
            .get(..bytes as usize)
            .context("content shorter than a file")?;
        let files = Plan::files_of(size);
        let before = sample_all(&pids)?;
        let started = Instant::now();
        let mut stored = Vec::new();
        let count = slots.len();
        for i in 0..files {
            let slot = slots
                .get_mut(i as usize % count)
                .context("no transfer slot")?;
            stored.push(
                slot.upload(body)
                    .await
                    .with_context(|| format!("uploading file {i} of {size} bytes"))?,
            );
        }
        let upload_s = started.elapsed().as_secs_f64();
        let middle = sample_all(&pids)?;
        let started = Instant::now();
        for (i, file) in stored.iter().enumerate() {
            let slot = slots.get_mut(i % count).context("no transfer slot")?;
            slot.download(file, body)
                .await
                .with_context(|| format!("downloading file {i} of {size} bytes"))?;
        }
        let download_s = started.elapsed().as_secs_f64();
        let after = sample_all(&pids)?;
        let total = (bytes * files) as f64;
        let point = SizePoint {
            file_bytes: size,
            bytes,
            files,
            upload_mb_s: total / MB / upload_s,
            download_mb_s: total / MB / download_s,
            upload_cpu_ms_per_mb: (middle.cpu_us - before.cpu_us) as f64 / 1000.0 / (total / MB),
            download_cpu_ms_per_mb: (after.cpu_us - middle.cpu_us) as f64 / 1000.0 / (total / MB),
        };
        eprintln!(
            "  {}: {} files of {size} B: up {:.0} MB/s ({:.2} ms CPU/MB), down {:.0} MB/s ({:.2} ms CPU/MB)",
            server.name(),
            files,
            point.upload_mb_s,
            point.upload_cpu_ms_per_mb,
            point.download_mb_s,
            point.download_cpu_ms_per_mb
        );
        one_at_a_time.push(point);
    }

    Ok(FilesResult {
        one_at_a_time,
        concurrent,
        durability: server.durability(),
    })
}

/// Waits (at most 60 s) until the server uses under 2% of a core over a
/// quarter of a second.
async fn settle(pids: &[u32]) -> Result<()> {
    let every = Duration::from_millis(250);
    let started = Instant::now();
    let mut before = sample_all(pids)?.cpu_us;
    while started.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(every).await;
        let now = sample_all(pids)?.cpu_us;
        if now.saturating_sub(before) < 5_000 {
            return Ok(());
        }
        before = now;
    }
    Ok(())
}

/// Every slot uploads one file at once, then every slot downloads its own;
/// the slots are handed back.
async fn concurrent(
    plan: &Plan,
    slots: Vec<Box<dyn Slot>>,
    content: &Arc<Vec<u8>>,
    pids: &[u32],
) -> Result<(Concurrent, Vec<Box<dyn Slot>>)> {
    let bytes = sealed_len(plan.concurrent_size);
    let length = bytes as usize;
    ensure!(content.len() >= length, "content shorter than a file");
    // Settle: what the open connections hold before anything moves.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle = sample_all(pids)?;

    let sampler = Sampler::start_all(pids.to_vec(), SAMPLE_EVERY)?;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (i, mut slot) in slots.into_iter().enumerate() {
        let content = Arc::clone(content);
        tasks.push(tokio::spawn(async move {
            let stored = slot
                .upload(&content[..length])
                .await
                .with_context(|| format!("concurrent upload {i}"))?;
            Ok::<_, anyhow::Error>((slot, stored))
        }));
    }
    let mut uploaded = Vec::new();
    for task in tasks {
        uploaded.push(task.await??);
    }
    let upload_s = started.elapsed().as_secs_f64();
    let up = sampler.finish()?;

    let sampler = Sampler::start_all(pids.to_vec(), SAMPLE_EVERY)?;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (i, (mut slot, stored)) in uploaded.into_iter().enumerate() {
        let content = Arc::clone(content);
        tasks.push(tokio::spawn(async move {
            slot.download(&stored, &content[..length])
                .await
                .with_context(|| format!("concurrent download {i}"))?;
            Ok::<_, anyhow::Error>(slot)
        }));
    }
    let mut slots = Vec::with_capacity(tasks.len());
    for task in tasks {
        slots.push(task.await??);
    }
    let download_s = started.elapsed().as_secs_f64();
    let down = sampler.finish()?;

    let total = (bytes * u64::from(plan.slots())) as f64;
    let result = Concurrent {
        transfers: plan.slots(),
        file_bytes: plan.concurrent_size,
        bytes,
        upload_mb_s: total / MB / upload_s,
        download_mb_s: total / MB / download_s,
        upload_cpu_ms_per_mb: up.cpu_us as f64 / 1000.0 / (total / MB),
        download_cpu_ms_per_mb: down.cpu_us as f64 / 1000.0 / (total / MB),
        rss_idle_kib: idle.rss_kib,
        rss_peak_upload_kib: up.rss_peak_kib,
        rss_peak_download_kib: down.rss_peak_kib,
        rss_growth_kib: up
            .rss_peak_kib
            .max(down.rss_peak_kib)
            .saturating_sub(idle.rss_kib),
    };
    Ok((result, slots))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_size_moves_enough_files_to_last_a_while() {
        assert_eq!(Plan::files_of(1 << 20), 64);
        assert_eq!(Plan::files_of(100 << 20), 5);
        assert_eq!(Plan::files_of(1 << 30), 3);
    }
}
