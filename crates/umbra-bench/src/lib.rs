//! `umbra-bench`: a load generator that drives a real `umbra-server` (and
//! the peer servers it is compared with) over their real protocols, and the
//! report that puts the figures side by side.
//!
//! - [`system`]: what a system under test offers: devices that connect,
//!   send on a channel and report what they receive.
//! - [`umbra`]: Umbra as one, [`peers`]: nats-server, mosquitto, ejabberd,
//!   nginx;
//!   [`cluster`]: Umbra as several nodes on a private PostgreSQL and NATS.
//! - [`workload`]: idle, relay, offline, fanout, storm, soak;
//!   [`failover`]: a cluster's node killed in the middle of a relay;
//!   [`files`]: attachments' upload and download, against nginx.
//! - [`recorder`], [`stamp`], [`sampler`]: latency, loss, duplicates, and
//!   the server's CPU and memory from `/proc`.
//! - [`report`]: `docs/benchmarks.md` and its plot from the JSON results.

pub mod cluster;
pub mod conn;
pub mod failover;
pub mod files;
pub mod peers;
pub mod recorder;
pub mod report;
pub mod sampler;
pub mod stamp;
pub mod system;
pub mod umbra;
pub mod workload;
