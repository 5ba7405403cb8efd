//! Lines and what only they may do: remote wipes relayed under the line's
//! wipe key, revocation by the line itself or its distributor (which ends
//! its sessions at once), the distributors' own requests, and the end of
//! lines whose subscription lapsed.

use super::*;

impl Services {
    /// Checks a wipe command against the line's wipe key and puts it in the
    /// line's mailbox. The device checks the signature again itself: this
    /// check only keeps forgeries from reaching it.
    pub(super) async fn relay_wipe(
        &self,
        account_id: &AccountId,
        issued_at: u64,
        signature: &Signature,
    ) -> Outcome {
        // A revoked line has no wipe key any more: that answer is the same
        // as for an unknown account or a wrong code.
        let payload = wipe_signing_payload(account_id, issued_at);
        self.signed_by_line(
            account_id,
            |account| account.wipe_key,
            &payload,
            signature,
            "the wipe command is not signed with the wipe code of a live line",
        )
        .await?;
        let now = self.now();
        if issued_at.saturating_add(self.limits.config.wipe_max_age.as_secs()) < now
            || issued_at > now.saturating_add(WIPE_CLOCK_SKEW_SECS)
        {
            return Err(refuse(
                ErrorCode::StaleWipe,
                format!(
                    "the wipe command was signed at {issued_at} (Unix seconds); this server relays only commands signed in the last {} seconds",
                    self.limits.config.wipe_max_age.as_secs()
                ),
            ));
        }
        let mut command = issued_at.to_be_bytes().to_vec();
        command.extend_from_slice(signature.as_bytes());
        let notice = Notice {
            recipient: account_id.clone(),
            device: None,
            sender: account_id.clone(),
            kind: DeliveryKind::Wipe,
            group_id: None,
            payload: command,
        };
        // Kept until its device takes it or the line ends (revoked, or
        // lapsed past its grace: either deletes the mailbox), however long
        // the device stays offline: no expiry of its own.
        let expires_at = i64::MAX as u64;
        let Some(told) = self
            .store
            .queue_wipe_command(notice, issued_at, now, expires_at)
            .await
            .map_err(internal)?
        else {
            return Err(refuse(
                ErrorCode::StaleWipe,
                "this wipe command, or a newer one, was relayed already",
            ));
        };
        self.registry.notify(&told);
        info!("wipe command relayed");
        debug!(account = %account_id, "wipe command relayed");
        Ok(Reply::Done)
    }

    /// Ends a line at the request of its own device (signed with the
    /// identity key): after a wipe, a duress unlock, or on purpose.
    pub(super) async fn revoke(&self, account_id: &AccountId, signature: &Signature) -> Outcome {
        let payload = revoke_signing_payload(account_id);
        let account = self
            .signed_by_line(
                account_id,
                |account| Some(account.identity_key),
                &payload,
                signature,
                "the revocation is not signed with the line's identity key",
            )
            .await?;
        if account.status == LineStatus::Revoked {
            return Err(refuse(ErrorCode::LineRevoked, "this line was revoked"));
        }
        self.end_line(account_id, Some(signature)).await?;
        Ok(Reply::Done)
    }

    /// Revokes a line and tells its groups, so nobody keeps encrypting to it.
    pub(super) async fn end_line(
        &self,
        account_id: &AccountId,
        proof: Option<&Signature>,
    ) -> Result<(), ErrorReply> {
        let now = self.now();
        let told = self
            .store
            .revoke(account_id, proof, now, self.expires_at(now))
            .await
            .map_err(internal)?;
        self.registry.notify(&told);
        self.registry.end_sessions(account_id, &revoked_session());
        info!(groups_told = told.len(), "line revoked");
        debug!(account = %account_id, "line revoked");
        Ok(())
    }

    /// Checks an unauthenticated request's `signature` over `payload` with
    /// the line's key (`key_of`). An unknown account, a line without that
    /// key and a bad signature get one answer (`BAD_SIGNATURE`, `refusal`)
    /// after the same work (a signature check against a fixed key when
    /// there is none), so the caller cannot tell whether an account exists.
    pub(super) async fn signed_by_line(
        &self,
        account_id: &AccountId,
        key_of: impl Fn(&Account) -> Option<umbra_proto::IdentityKey>,
        payload: &[u8],
        signature: &Signature,
        refusal: &str,
    ) -> Result<Account, ErrorReply> {
        let account = self.store.account(account_id).await.map_err(internal)?;
        let key = account.as_ref().and_then(key_of);
        let verified = umbra_mls::verify(&key.unwrap_or_else(nobody), payload, signature);
        match account {
            Some(account) if verified && key.is_some() => Ok(account),
            _ => Err(refuse(ErrorCode::BadSignature, refusal)),
        }
    }

    pub(super) async fn live_account(&self, account_id: &AccountId) -> Result<Account, ErrorReply> {
        match self.store.account(account_id).await.map_err(internal)? {
            None => Err(refuse(
                ErrorCode::UnknownAccount,
                format!("no account {account_id} on this server"),
            )),
            Some(account) if account.status == LineStatus::Revoked => {
                Err(refuse(ErrorCode::LineRevoked, "this line was revoked"))
            }
            Some(account) => Ok(account),
        }
    }

    /// What a distributor may do: codes within its quota, and its own lines.
    pub(super) async fn distributor(&self, id: u64, request: Request) -> Outcome {
        match request {
            Request::IssueCodes { kind, days, count } => {
                let mut codes = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    let text = crate::random_string(ActivationCode::LEN)
                        .map_err(|_| refuse(ErrorCode::Internal, "no randomness available"))?;
                    codes.push(
                        ActivationCode::parse(&text)
                            .map_err(|_| refuse(ErrorCode::Internal, "code generation"))?,
                    );
                }
                let hashes: Vec<CodeHash> = codes.iter().map(CodeHash::of).collect();
                let store_kind = match kind {
                    CodeKind::Renewal => umbra_store::CodeKind::Renewal,
                    _ => umbra_store::CodeKind::Activation,
                };
                let issued = self
                    .store
                    .issue_distributor_codes(id, &hashes, store_kind, days, self.now())
                    .await
                    .map_err(internal)?;
                if !issued {
                    return Err(refuse(
                        ErrorCode::QuotaExceeded,
                        format!("your quota does not cover {count} more code(s); ask the operator"),
                    ));
                }
                info!(distributor = id, count, ?kind, "codes issued");
                let codes = codes
                    .into_iter()
                    .map(|code| match store_kind {
                        umbra_store::CodeKind::Activation => ActivationString {
                            address: self.limits.config.public_address.clone(),
                            pin: self.limits.pin,
                            code,
                        }
                        .to_string(),
                        umbra_store::CodeKind::Renewal => code.grouped(),
                    })
                    .collect();
                Ok(Reply::Codes { codes })
            }
            Request::ListLines => {
                let lines = self.store.lines(id).await.map_err(internal)?;
                Ok(Reply::Lines {
                    lines: lines
                        .into_iter()
                        .map(|line| LineInfo {
                            account_id: line.id,
                            subscription_expires_at: line.subscription_expires_at,
                            last_seen_day: line.last_seen_day.unwrap_or(0),
                            status: line.status.as_str().to_owned(),
                        })
                        .collect(),
                })
            }
            Request::SetLineStatus { account_id, action } => {
                let line = self.store.account(&account_id).await.map_err(internal)?;
                // The same answer for a line that does not exist and one that
                // belongs to someone else: a distributor learns nothing of
                // other distributors' lines.
                let Some(line) = line.filter(|line| line.distributor == Some(id)) else {
                    return Err(refuse(
                        ErrorCode::NotYourLine,
                        format!("{account_id} is not one of your lines"),
                    ));
                };
                if line.status == LineStatus::Revoked {
                    return Err(refuse(ErrorCode::LineRevoked, "this line was revoked"));
                }
                match action {
                    LineAction::Suspend => self
                        .store
                        .set_line_status(&account_id, LineStatus::Suspended)
                        .await
                        .map_err(internal)?,
                    LineAction::Resume => self
                        .store
                        .set_line_status(&account_id, LineStatus::Active)
                        .await
                        .map_err(internal)?,
                    _ => self.end_line(&account_id, None).await?,
                }
                info!(distributor = id, ?action, "line status changed");
                debug!(line = %account_id, "line status changed");
                Ok(Reply::Done)
            }
            Request::Ping => Ok(Reply::Done),
            _ => Err(refuse(
                ErrorCode::InvalidRequest,
                "a distributor session takes IssueCodes, ListLines and SetLineStatus",
            )),
        }
    }

    /// Ends lines whose subscription lapsed longer ago than the grace
    /// period: their KeyPackages, mailbox, contacts and memberships go.
    pub async fn purge_lapsed_lines(&self) -> Result<usize, ErrorReply> {
        let cutoff = self
            .now()
            .saturating_sub(self.limits.config.subscription_grace.as_secs());
        let now = self.now();
        let ended = self
            .store
            .revoke_lapsed(cutoff, now, self.expires_at(now))
            .await
            .map_err(internal)?;
        for (line, told) in &ended {
            self.registry.notify(told);
            self.registry.end_sessions(line, &revoked_session());
            info!("lapsed line ended");
            debug!(account = %line, "lapsed line ended");
        }
        Ok(ended.len())
    }
}
