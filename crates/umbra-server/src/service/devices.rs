//! Device logs: an account's devices append signed entries, and the
//! account's devices and its contacts read them. Every entry is checked
//! with the rules devices use (`umbra_mls::DeviceLog`) before it is stored,
//! so an honest server serves only logs every verifier accepts; a hostile
//! one is caught by those verifiers, not by this code.

use umbra_mls::{DeviceLog, DeviceLogError};
use umbra_proto::{DeviceChange, DeviceEntry, DeviceId, IdentityKey};

use super::*;

/// Most entries one `FetchDeviceLog` answer carries; a device asks again
/// from where the answer ended until one comes back shorter.
const DEVICE_LOG_PAGE: u32 = umbra_proto::devices::DEVICE_LOG_PAGE as u32;

impl Services {
    pub(super) async fn append_device_entry(
        &self,
        me: &AccountId,
        device: DeviceId,
        entry: DeviceEntry,
    ) -> Outcome {
        let account = self.live_account(me).await?;
        if entry.by_device != device {
            return Err(refuse(
                ErrorCode::InvalidDeviceEntry,
                format!(
                    "the entry is made by device {}, but this session is device {device}",
                    entry.by_device
                ),
            ));
        }
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
        let Some(told) = self
            .store
            .append_device_entry(me, entry.seq, &entry.encode(), now, self.expires_at(now))
            .await
            .map_err(internal)?
        else {
            return Err(stale(entry.seq + 1));
        };
        self.registry.notify(&told);
        debug!(account = %me, seq = entry.seq, "device log entry appended");
        if let DeviceChange::Remove { device: removed } = entry.change {
            self.registry
                .end_device_sessions(me, removed, &removed_session());
            // Not handed out any more (FetchKeyPackage asks for current
            // devices only); deleting them is housekeeping, so a failure
            // here does not undo the removal.
            if let Err(error) = self.store.withdraw_key_packages(me, removed).await {
                warn!(%error, "withdrawing a removed device's KeyPackages failed");
            }
        }
        Ok(Reply::Done)
    }

    /// Checks a `Login`'s signature with the key of `device` as the
    /// account's device log lists it (device 1's is the account key while
    /// the log is empty). An unknown account, a device that is not current
    /// and a bad signature get one answer (`BAD_SIGNATURE`) after the same
    /// work, so the answer tells nothing about which accounts or devices
    /// exist.
    pub(super) async fn signed_by_device(
        &self,
        account_id: &AccountId,
        device: DeviceId,
        payload: &[u8],
        signature: &Signature,
    ) -> Result<Account, ErrorReply> {
        let account = self.store.account(account_id).await.map_err(internal)?;
        let key = match &account {
            Some(account) => self.device_key(account, device).await?,
            None => None,
        };
        let verified = umbra_mls::verify(&key.unwrap_or_else(nobody), payload, signature);
        match account {
            Some(account) if verified && key.is_some() => Ok(account),
            _ => Err(refuse(
                ErrorCode::BadSignature,
                "login signature does not verify with the key of that device of the account",
            )),
        }
    }

    /// The key of `account`'s current device `device`, if it is one.
    pub(super) async fn device_key(
        &self,
        account: &Account,
        device: DeviceId,
    ) -> Result<Option<IdentityKey>, ErrorReply> {
        if account.status == LineStatus::Revoked {
            // Its devices went with it; device 1's key (the account key)
            // still proves a login, which is then told the line is gone
            // (a linked device asks with `ended_login_signing_payload`).
            return Ok((device == DeviceId::FIRST).then_some(account.identity_key));
        }
        // The store keeps the current devices as the log's entries are
        // appended: no replay of the log.
        let key = self
            .store
            .devices(&account.id)
            .await
            .map_err(internal)?
            .into_iter()
            .find_map(|(current, key)| (current == device).then_some(key));
        if key.is_none() && device == DeviceId::FIRST {
            // Revoked since `account` was read (its devices went with it)?
            // Then the login is told so, as above, not refused as forged.
            if let Some(now) = self.store.account(&account.id).await.map_err(internal)?
                && now.status == LineStatus::Revoked
            {
                return Ok(Some(now.identity_key));
            }
        }
        Ok(key)
    }

    /// Ends the session behind `inbox` if `account`'s line is gone or
    /// revoked, or `device` is no longer one of its current devices
    /// (checked after the session registered, so a revocation or a removal
    /// racing a login cannot leave the session open).
    pub(crate) async fn end_if_gone(
        &self,
        account: &AccountId,
        device: DeviceId,
        inbox: &crate::registry::Inbox,
    ) {
        match self.store.account(account).await {
            Ok(Some(line)) if line.status != LineStatus::Revoked => {
                if let Ok(None) = self.device_key(&line, device).await {
                    inbox.end(removed_session());
                }
            }
            Ok(_) => inbox.end(revoked_session()),
            Err(_) => {}
        }
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
        // Positions past any real log's length read as its end (SQLite
        // integers stop at 2^63).
        let from = from.min(i64::MAX as u64);
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

pub(crate) fn removed_session() -> ErrorReply {
    refuse(
        ErrorCode::DeviceRemoved,
        "this device was removed from its account; it can no longer log in",
    )
}

fn stale(length: u64) -> ErrorReply {
    refuse(
        ErrorCode::StaleDeviceLog,
        format!(
            "another device changed this account's device list first (the log has at least {length} entries); fetch it and make the change again"
        ),
    )
}
