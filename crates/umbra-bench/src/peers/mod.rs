//! The peer servers Umbra is compared with, started on loopback by the
//! benchmark (pinned like Umbra) and driven with the same workloads:
//!
//! - [`nats`]: nats-server, core publish/subscribe (no storage): the raw
//!   relay reference.
//! - [`mosquitto`]: MQTT 3.1.1, QoS 1, persistent sessions.
//! - [`ejabberd`]: XMPP over WebSocket, offline storage.
//! - [`nginx`]: HTTPS file uploads and downloads (the files workload only).
//!
//! The generator speaks each protocol with a small client of its own (the
//! subset the workloads need), so that every system is driven the same way
//! by the same scheduler and no client library's batching or threading
//! skews the comparison.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Result, bail};

use crate::system::{System, Topology};

pub mod ejabberd;
pub mod mosquitto;
pub mod nats;
pub mod nginx;

/// Starts peer `name` in a working directory under `work` and returns it,
/// ready for `topology`.
pub async fn start(
    name: &str,
    work: &Path,
    cpu: Option<u32>,
    topology: &Topology,
) -> Result<Arc<dyn System>> {
    match name {
        "nats" => nats::start(work, cpu, topology).await,
        "mosquitto" => mosquitto::start(work, cpu, topology).await,
        "ejabberd" => ejabberd::start(work, cpu, topology).await,
        other => bail!("unknown system {other:?}: expected umbra, nats, mosquitto or ejabberd"),
    }
}

/// Random bytes of `size` for peers' payloads (the generator stamps the
/// tail).
pub fn random_payload(size: usize) -> Vec<u8> {
    let mut payload = vec![0u8; size];
    let _ = getrandom::getrandom(&mut payload);
    payload
}
