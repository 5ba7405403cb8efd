//! Device logs: an account's devices append signed entries, and the
//! account's devices and its contacts read them. Every entry is checked
//! with the rules devices use (`umbra_mls::DeviceLog`) before it is stored,
//! so an honest server serves only logs every verifier accepts; a hostile
//! one is caught by those verifiers, not by this code.

use umbra_mls::{DeviceLog, DeviceLogError};
use umbra_proto::DeviceEntry;

use super::*;

/// Most entries one `FetchDeviceLog` answer carries; a device asks again
/// from where the answer ended until one comes back shorter.
pub(crate) const DEVICE_LOG_PAGE: u32 = 500;

impl Services {
    pub(super) async fn append_device_entry(&self, me: &AccountId, entry: DeviceEntry) -> Outcome {
        let account = self.live_account(me).await?;
        let now = self.now();
        let config = &self.limits.config;
        let budget = config.device_changes_per_day;
        let recent = self
            .store
            .device_entries_since(me, now.saturating_sub(86_400))
            .await
            .map_err(internal)?;
        if recent >= u64::from(budget) {
            return Err(refuse(
                ErrorCode::QuotaExceeded,
                format!("at most {budget} device changes a day; try again tomorrow"),
            ));
        }
        let log = self.stored_device_log(&account).await?;
        let max = usize::try_from(config.max_devices_per_account).unwrap_or(usize::MAX);
        log.check(&entry, Some(max), true)
            .map_err(|error| match error {
                DeviceLogError::TooManyDevices { max, .. } => refuse(
                    ErrorCode::QuotaExceeded,
                    format!("an account has at most {max} devices; remove one first"),
                ),
                DeviceLogError::Position { seq, expected } if seq < expected => stale(expected),
                other => refuse(ErrorCode::InvalidDeviceEntry, other.to_string()),
            })?;
        if !self
            .store
            .append_device_entry(me, entry.seq, &entry.encode(), now)
            .await
            .map_err(internal)?
        {
            return Err(stale(entry.seq + 1));
        }
        debug!(account = %me, seq = entry.seq, "device log entry appended");
        Ok(Reply::Done)
    }

    pub(super) async fn fetch_device_log(
        &self,
        me: &AccountId,
        account_id: &AccountId,
        from: u64,
    ) -> Outcome {
        self.live_account(me).await?;
        if account_id != me
            && !self
                .store
                .are_contacts(me, account_id)
                .await
                .map_err(internal)?
        {
            return Err(refuse(
                ErrorCode::NotAContact,
                format!("{account_id} is not one of your contacts"),
            ));
        }
        let entries = self
            .store
            .device_log(account_id, from, DEVICE_LOG_PAGE)
            .await
            .map_err(internal)?
            .iter()
            .map(|bytes| DeviceEntry::decode(bytes))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| internal(StoreError::Corrupt(format!("device log entry: {e}"))))?;
        Ok(Reply::DeviceLog { entries })
    }

    /// The account's log as stored, replayed (entries were verified when
    /// they were appended).
    async fn stored_device_log(&self, account: &Account) -> Result<DeviceLog, ErrorReply> {
        let mut entries = Vec::new();
        loop {
            let page = self
                .store
                .device_log(&account.id, entries.len() as u64, DEVICE_LOG_PAGE)
                .await
                .map_err(internal)?;
            let full = page.len() == DEVICE_LOG_PAGE as usize;
            for bytes in page {
                entries.push(DeviceEntry::decode(&bytes).map_err(|e| {
                    internal(StoreError::Corrupt(format!("device log entry: {e}")))
                })?);
            }
            if !full {
                break;
            }
        }
        DeviceLog::replay(account.id.clone(), account.identity_key, entries)
            .map_err(|e| internal(StoreError::Corrupt(format!("stored device log: {e}"))))
    }
}

fn stale(length: u64) -> ErrorReply {
    refuse(
        ErrorCode::StaleDeviceLog,
        format!(
            "another device changed this account's device list first (the log has at least {length} entries); fetch it and make the change again"
        ),
    )
}
