//! What every system under test (Umbra and the peers) offers the workloads:
//! devices that connect, send on a channel, and report what they receive.

use std::sync::Arc;

use anyhow::Result;

use crate::recorder::Recorder;

/// Who talks to whom. A channel of two is a 1:1 conversation; a larger one
/// is a group whose first member sends (fanout) or whose members all do.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Topology {
    pub devices: u32,
    /// Member device indexes of each channel.
    pub channels: Vec<Vec<u32>>,
}

impl Topology {
    /// `pairs` conversations between devices 2i and 2i+1.
    pub fn pairs(pairs: u32) -> Topology {
        Topology {
            devices: pairs * 2,
            channels: (0..pairs).map(|i| vec![2 * i, 2 * i + 1]).collect(),
        }
    }

    /// One group per size; device 0 of each group is its sender.
    pub fn groups(sizes: &[u32]) -> Topology {
        let mut next = 0;
        let channels = sizes
            .iter()
            .map(|&size| {
                let members = (next..next + size).collect();
                next += size;
                members
            })
            .collect();
        Topology {
            devices: next,
            channels,
        }
    }

    /// Devices with no conversations at all.
    pub fn idle(devices: u32) -> Topology {
        Topology {
            devices,
            channels: Vec::new(),
        }
    }
}

/// One connected device.
pub trait Endpoint: Send + Sync {
    /// Queues `payload` for channel `channel` without waiting; the server's
    /// answer (if its protocol has one) is counted by the recorder.
    fn send(&self, channel: u32, payload: Vec<u8>);

    /// Whether the connection is still up.
    fn is_alive(&self) -> bool;
}

/// A server under test.
#[async_trait::async_trait]
pub trait System: Send + Sync {
    /// Short name for tables: "umbra", "nats", ...
    fn name(&self) -> String;

    /// The server process, for CPU and memory sampling.
    fn server_pid(&self) -> u32;

    /// Connects (and logs in) device `index`. Everything it receives is
    /// reported to `recorder` as received by `index`. Resolves once the
    /// device is ready to send and its stored backlog has been delivered.
    async fn connect(&self, index: u32, recorder: Arc<Recorder>) -> Result<Box<dyn Endpoint>>;

    /// A message of `size` bytes for `channel` that the generator stamps.
    fn payload(&self, channel: u32, size: usize) -> Vec<u8>;

    /// Whether the server tells the sender its message was stored (Umbra's
    /// Accepted, MQTT's PUBACK). Without it, "accepted" means "written".
    fn acknowledges(&self) -> bool;

    /// What a message goes through on this server, for the report.
    fn durability(&self) -> String;

    /// Kills the server with SIGKILL and starts it again on the same data.
    async fn kill9_and_restart(&self) -> Result<()>;
}
