//! nats as a peer (being written).

use std::path::Path;
use std::sync::Arc;

use anyhow::{Result, bail};

use crate::system::{System, Topology};

/// Starts nats under `work`, ready for `topology`.
pub async fn start(
    _work: &Path,
    _cpu: Option<u32>,
    _topology: &Topology,
) -> Result<Arc<dyn System>> {
    bail!("nats is not supported yet")
}
