//! What a misbehaving member sends and an honest Umbra device never does,
//! so the tests of the delivery service's policy can send it for real.
//! Compiled only with the `hostile` feature (tests).

use openmls::prelude::{LeafNodeIndex, LeafNodeParameters};

use crate::CommitOutput;
use crate::group::{Group, credential, timer_extensions, to_bytes};
use crate::{DeviceSigner, MlsError, Provider, Result, protocol};
use umbra_proto::AccountId;

impl Group {
    /// A standalone proposal to remove another member (Umbra devices
    /// remove by their own commit, never by proposal).
    pub fn propose_removal(
        &mut self,
        provider: &Provider<'_>,
        signer: &DeviceSigner,
        account: &AccountId,
    ) -> Result<Vec<u8>> {
        let leaf: LeafNodeIndex = self
            .leaf(account)
            .ok_or_else(|| MlsError::NotAMember(account.to_string()))?;
        let (message, _) = self
            .inner
            .propose_remove_member(provider, signer, leaf)
            .map_err(|e| protocol("proposing a removal", e))?;
        to_bytes(&message)
    }

    /// A standalone proposal to change the disappearing timer.
    pub fn propose_disappear_after(
        &mut self,
        provider: &Provider<'_>,
        signer: &DeviceSigner,
        seconds: u32,
    ) -> Result<Vec<u8>> {
        let (message, _) = self
            .inner
            .propose_group_context_extensions(provider, timer_extensions(seconds)?, signer)
            .map_err(|e| protocol("proposing a timer", e))?;
        to_bytes(&message)
    }

    /// A key update whose new leaf names another account (with this
    /// device's key): an impersonation no honest device attempts.
    pub fn update_as(
        &mut self,
        provider: &Provider<'_>,
        signer: &DeviceSigner,
        account: &AccountId,
    ) -> Result<CommitOutput> {
        let epoch = self.epoch();
        let parameters = LeafNodeParameters::builder()
            .with_credential_with_key(credential(signer, account))
            .build();
        let bundle = self
            .inner
            .self_update(provider, signer, parameters)
            .map_err(|e| protocol("updating as another account", e))?;
        let (commit, _, _) = bundle.into_messages();
        Ok(CommitOutput {
            epoch,
            commit: to_bytes(&commit)?,
            welcome: None,
        })
    }
}
