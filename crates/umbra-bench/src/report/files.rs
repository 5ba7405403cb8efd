//! The files workload's section: attachments against nginx, and the bar of
//! the attachments issue (download at least half nginx's throughput; the
//! server's memory growing by less than 64 MiB while 100 transfers of
//! 100 MiB run at once).

use std::fmt::Write as _;

use serde_json::Value;

use super::{
    Group, NOT_MEASURED, Report, cell, count, num, paired, real, spread, spread_text, text, times,
    values, verdict,
};

/// The peer the files workload compares Umbra with.
const PEER: &str = "nginx (TLS)";
const UMBRA: &str = "umbra (TLS)";
/// Most RSS growth allowed with the transfers running, in KiB.
const GROWTH_BAR_KIB: f64 = 64.0 * 1024.0;

fn mib(bytes: f64) -> String {
    let mib = bytes / 1_048_576.0;
    if mib >= 1.0 {
        format!("{} MiB", real(mib))
    } else {
        format!("{} KiB", real(bytes / 1024.0))
    }
}

fn kib_as_mib(kib: f64) -> String {
    format!("{} MiB", real(kib / 1024.0))
}

/// The point for files of `size` bytes in a run.
fn point(record: &Value, size: u64) -> Option<&Value> {
    record
        .pointer("/result/one_at_a_time")?
        .as_array()?
        .iter()
        .find(|p| p.get("file_bytes").and_then(Value::as_u64) == Some(size))
}

/// Every file size measured one at a time in `group`, smallest first.
fn sizes(groups: &[&Group<'_>]) -> Vec<u64> {
    let mut sizes: Vec<u64> = groups
        .iter()
        .flat_map(|g| &g.runs)
        .filter_map(|r| r.pointer("/result/one_at_a_time")?.as_array())
        .flatten()
        .filter_map(|p| p.get("file_bytes").and_then(Value::as_u64))
        .collect();
    sizes.sort_unstable();
    sizes.dedup();
    sizes
}

fn at(group: &Group<'_>, size: u64, key: &str) -> Vec<Option<f64>> {
    values(group, |r| point(r, size).and_then(|p| num(p, &[key])))
}

fn concurrent(group: &Group<'_>, key: &str) -> Vec<Option<f64>> {
    values(group, |r| num(r, &["result", "concurrent", key]))
}

impl Report<'_> {
    pub(super) fn files(&self, md: &mut String) {
        md.push_str("## files\n\n");
        let groups = self.of("files");
        if groups.is_empty() {
            md.push_str("Not measured.\n\n");
            return;
        }
        md.push_str(
            "Attachments: Umbra's blob service against nginx over TLS. Umbra is driven as \
             its devices drive it (a blob of the sealed file's size, 256 KiB `PutBlob` and \
             `GetBlob` requests, four in flight, then `BlobFetched`); nginx moves the same bytes \
             with WebDAV `PUT` and `GET` on kept-alive connections, its writes likewise 256 KiB. \
             Both run one process (nginx: one worker) pinned to the same core; every download \
             is checked byte for byte. MB is 10^6 bytes; CPU is the server's (nginx: master \
             and worker).\n\n",
        );
        for group in &groups {
            if let Some(durability) = group
                .runs
                .iter()
                .find_map(|r| text(r, &["result", "durability"]))
            {
                let _ = writeln!(md, "- {}: {durability}.", self.label(group));
            }
        }
        md.push('\n');

        md.push_str("One transfer at a time:\n\n");
        md.push_str(
            "| system | file | files per run | upload MB/s | download MB/s | CPU ms/MB up | CPU ms/MB down | n |\n",
        );
        md.push_str("|---|--:|--:|--:|--:|--:|--:|--:|\n");
        for size in sizes(&groups) {
            for group in &groups {
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {} | {} | {} | {} | {} |",
                    self.label(group),
                    mib(size as f64),
                    cell(&at(group, size, "files"), count),
                    cell(&at(group, size, "upload_mb_s"), real),
                    cell(&at(group, size, "download_mb_s"), real),
                    cell(&at(group, size, "upload_cpu_ms_per_mb"), real),
                    cell(&at(group, size, "download_cpu_ms_per_mb"), real),
                    group.runs.len(),
                );
            }
        }
        md.push('\n');

        md.push_str(
            "All at once (each transfer on its own connection; RSS idle is with every \
             connection open and nothing moving, growth is the higher peak above it):\n\n",
        );
        md.push_str(
            "| system | transfers × file | upload MB/s | download MB/s | CPU ms/MB up | CPU ms/MB down | RSS idle | peak up | peak down | growth | n |\n",
        );
        md.push_str("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n");
        for group in &groups {
            let transfers = spread(&concurrent(group, "transfers")).map_or(0.0, |s| s.median);
            let file = spread(&concurrent(group, "file_bytes")).map_or(0.0, |s| s.median);
            let _ = writeln!(
                md,
                "| {} | {} × {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                self.label(group),
                count(transfers),
                mib(file),
                cell(&concurrent(group, "upload_mb_s"), real),
                cell(&concurrent(group, "download_mb_s"), real),
                cell(&concurrent(group, "upload_cpu_ms_per_mb"), real),
                cell(&concurrent(group, "download_cpu_ms_per_mb"), real),
                cell(&concurrent(group, "rss_idle_kib"), kib_as_mib),
                cell(&concurrent(group, "rss_peak_upload_kib"), kib_as_mib),
                cell(&concurrent(group, "rss_peak_download_kib"), kib_as_mib),
                cell(&concurrent(group, "rss_growth_kib"), kib_as_mib),
                group.runs.len(),
            );
        }
        md.push('\n');
        self.files_bar(md, &groups);
    }

    fn files_bar(&self, md: &mut String, groups: &[&Group<'_>]) {
        let umbra = groups.iter().find(|g| g.system == UMBRA);
        let nginx = groups.iter().find(|g| g.system == PEER);
        md.push_str(
            "Against the attachments bar (ratios run by run where both have as many runs, \
             else of the medians):\n\n",
        );
        md.push_str("| bar | measured (median, range) | verdict |\n|---|---|---|\n");
        for size in sizes(groups) {
            let (measured, status) = match (umbra, nginx) {
                (Some(u), Some(n)) => {
                    let ratios =
                        paired(&at(u, size, "download_mb_s"), &at(n, size, "download_mb_s"));
                    match spread(&ratios) {
                        Some(s) => (
                            format!("{} of nginx's", spread_text(s, times)),
                            verdict(s.median >= 0.5),
                        ),
                        None => ("–".to_owned(), NOT_MEASURED),
                    }
                }
                _ => ("–".to_owned(), NOT_MEASURED),
            };
            let _ = writeln!(
                md,
                "| download of {} files ≥ 0.5× nginx | {measured} | {status} |",
                mib(size as f64)
            );
        }
        let (measured, status) = match umbra {
            Some(u) => match spread(&concurrent(u, "rss_growth_kib")) {
                Some(s) => {
                    let transfers = spread(&concurrent(u, "transfers")).map_or(0.0, |t| t.median);
                    let file = spread(&concurrent(u, "file_bytes")).map_or(0.0, |f| f.median);
                    (
                        format!(
                            "{} with {} × {}",
                            spread_text(s, kib_as_mib),
                            count(transfers),
                            mib(file)
                        ),
                        verdict(s.max < GROWTH_BAR_KIB),
                    )
                }
                None => ("–".to_owned(), NOT_MEASURED),
            },
            None => ("–".to_owned(), NOT_MEASURED),
        };
        let _ = writeln!(
            md,
            "| server RSS growth < 64 MiB with 100 transfers of 100 MiB at once | {measured} | {status} |"
        );
        md.push('\n');
    }
}
