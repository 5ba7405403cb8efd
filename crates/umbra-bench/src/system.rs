//! What every system under test (Umbra and the peers) offers the workloads:
//! devices that connect, send on a channel, and report what they receive.

use std::sync::Arc;

use anyhow::Result;

use crate::recorder::Recorder;

/// Who talks to whom. A channel of two accounts is a 1:1 conversation; a
/// larger one is a group whose first member sends (fanout) or whose members
/// all do.
///
/// Indexes are devices, each one connected endpoint. An account is
/// `devices_per_account` consecutive indexes: account `a` is devices
/// `a * k .. a * k + k`, its device numbers 1 to `k` in that order (device 1
/// holds the account key). A channel lists every device of every member
/// account, its sender (device 1 of the first account) first.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Topology {
    pub devices: u32,
    /// Member device indexes of each channel.
    pub channels: Vec<Vec<u32>>,
    /// Devices of each account (left out of the JSON when 1, so a fixture
    /// cached before accounts had several devices keeps its key).
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub devices_per_account: u32,
}

fn one() -> u32 {
    1
}

fn is_one(n: &u32) -> bool {
    *n == 1
}

impl Topology {
    /// `pairs` conversations between devices 2i and 2i+1.
    pub fn pairs(pairs: u32) -> Topology {
        Topology::pairs_with(pairs, 1)
    }

    /// `pairs` conversations between accounts 2i and 2i+1, each account
    /// with `per_account` devices: a channel holds the 2 × `per_account`
    /// devices of both accounts.
    pub fn pairs_with(pairs: u32, per_account: u32) -> Topology {
        Topology::groups_with(&vec![2; pairs as usize], per_account)
    }

    /// One group per size; device 0 of each group is its sender.
    pub fn groups(sizes: &[u32]) -> Topology {
        Topology::groups_with(sizes, 1)
    }

    /// One group per size, counted in accounts of `per_account` devices
    /// each: a group of `n` accounts has `n × per_account` member devices,
    /// its first account's device 1 (the sender) first.
    pub fn groups_with(sizes: &[u32], per_account: u32) -> Topology {
        let per_account = per_account.max(1);
        let mut next = 0;
        let channels = sizes
            .iter()
            .map(|&size| {
                let devices = size * per_account;
                let members = (next..next + devices).collect();
                next += devices;
                members
            })
            .collect();
        Topology {
            devices: next,
            channels,
            devices_per_account: per_account,
        }
    }

    /// Devices with no conversations at all.
    pub fn idle(devices: u32) -> Topology {
        Topology {
            devices,
            channels: Vec::new(),
            devices_per_account: 1,
        }
    }

    fn per_account(&self) -> u32 {
        self.devices_per_account.max(1)
    }

    /// How many accounts the devices make.
    pub fn accounts(&self) -> u32 {
        self.devices.div_ceil(self.per_account())
    }

    /// The account device `index` belongs to.
    pub fn account_of(&self, index: u32) -> u32 {
        index / self.per_account()
    }

    /// Device `index`'s number within its account (1 for the account's
    /// first device).
    pub fn device_number(&self, index: u32) -> u32 {
        index % self.per_account() + 1
    }

    /// The index of `account`'s device 1.
    pub fn first_device(&self, account: u32) -> u32 {
        account * self.per_account()
    }

    /// Recipient devices of one message on `channel`: every member device
    /// but the sending one (the sender's own other devices included).
    pub fn recipients(&self, channel: usize) -> u32 {
        self.channels
            .get(channel)
            .map_or(0, |members| members.len() as u32)
            .saturating_sub(1)
    }
}

/// One connected device.
pub trait Endpoint: Send + Sync {
    /// Queues `payload` for channel `channel` without waiting; the server's
    /// answer (if its protocol has one) is counted by the recorder.
    fn send(&self, channel: u32, payload: Vec<u8>);

    /// Whether the connection is still up.
    fn is_alive(&self) -> bool;

    /// Resolves once the connection has ended (by default, found so by
    /// looking every 10 ms).
    fn closed(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>> {
        Box::pin(async move {
            while self.is_alive() {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        })
    }
}

/// A server under test.
#[async_trait::async_trait]
pub trait System: Send + Sync {
    /// Short name for tables: "umbra", "nats", ...
    fn name(&self) -> String;

    /// The server process, for CPU and memory sampling.
    fn server_pid(&self) -> u32;

    /// Further processes whose CPU a run reports, by name (a cluster's
    /// other nodes, its database, its message bus); none for one server.
    fn components(&self) -> Vec<(String, Vec<u32>)> {
        Vec::new()
    }

    /// Connects (and logs in) device `index`. Everything it receives is
    /// reported to `recorder` as received by `index`. Resolves once the
    /// device is ready to send and its stored backlog has been delivered.
    async fn connect(&self, index: u32, recorder: Arc<Recorder>) -> Result<Box<dyn Endpoint>>;

    /// Servers (a cluster's nodes) devices may connect to: 1 but for an
    /// Umbra cluster.
    fn nodes(&self) -> usize {
        1
    }

    /// The node [`System::connect`] connects device `index` to.
    fn node_of(&self, _index: u32) -> usize {
        0
    }

    /// Kills node `node` with SIGKILL, and leaves it dead.
    fn kill_node(&self, _node: usize) -> Result<()> {
        anyhow::bail!("{} runs as one server: no node to kill alone", self.name())
    }

    /// Connects (and logs in) device `index` through node `node`, as
    /// [`System::connect`] does through its own.
    async fn connect_to(
        &self,
        index: u32,
        node: usize,
        recorder: Arc<Recorder>,
    ) -> Result<Box<dyn Endpoint>> {
        if node != 0 {
            anyhow::bail!("{} runs as one server: no node {node}", self.name());
        }
        self.connect(index, recorder).await
    }

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_device_per_account_is_the_old_topology() -> serde_json::Result<()> {
        let pairs = Topology::pairs(2);
        assert_eq!(pairs.channels, vec![vec![0, 1], vec![2, 3]]);
        assert_eq!(pairs.devices, 4);
        // The fixture cache key of single-device topologies is unchanged.
        assert_eq!(
            serde_json::to_string(&pairs)?,
            r#"{"devices":4,"channels":[[0,1],[2,3]]}"#
        );
        let old: Topology = serde_json::from_str(r#"{"devices":4,"channels":[]}"#)?;
        assert_eq!(old.devices_per_account, 1);
        Ok(())
    }

    #[test]
    fn accounts_of_several_devices() {
        let pairs = Topology::pairs_with(2, 3);
        assert_eq!(pairs.devices, 12);
        assert_eq!(pairs.accounts(), 4);
        assert_eq!(pairs.channels.first(), Some(&vec![0, 1, 2, 3, 4, 5]));
        assert_eq!(pairs.recipients(0), 5);
        assert_eq!((pairs.account_of(7), pairs.device_number(7)), (2, 2));
        assert_eq!(pairs.first_device(3), 9);
        let groups = Topology::groups_with(&[2, 4], 3);
        assert_eq!(groups.devices, 18);
        assert_eq!(groups.recipients(1), 11);
        assert_eq!(groups.channels.get(1).and_then(|m| m.first()), Some(&6));
    }
}
