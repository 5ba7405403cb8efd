//! What a misbehaving member sends and an honest Umbra device never does,
//! so the tests of the delivery service's policy can send it for real.
//! Compiled only with the `hostile` feature (tests).

use openmls::prelude::{
    KeyPackageIn, LeafNodeIndex, LeafNodeParameters, MlsMessageBodyIn, MlsMessageIn,
    ProtocolVersion,
};
use openmls_traits::OpenMlsProvider as _;
use tls_codec::Deserialize as _;

use crate::CommitOutput;
use crate::group::{Group, credential, parse_message, timer_extensions, to_bytes};
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
        let (commit, _, group_info) = bundle.into_messages();
        CommitOutput::new(epoch, commit, None, group_info)
    }

    /// A key update whose new leaf drops its device certificate: a
    /// device other than 1 would then read as its account's device 1,
    /// under its own key (what a removed device might try).
    pub fn update_without_certificate(
        &mut self,
        provider: &Provider<'_>,
        signer: &DeviceSigner,
    ) -> Result<CommitOutput> {
        let epoch = self.epoch();
        let parameters = LeafNodeParameters::builder()
            .with_extensions(openmls::prelude::Extensions::empty())
            .build();
        let bundle = self
            .inner
            .self_update(provider, signer, parameters)
            .map_err(|e| protocol("updating without a certificate", e))?;
        let (commit, _, group_info) = bundle.into_messages();
        CommitOutput::new(epoch, commit, None, group_info)
    }

    /// One commit that removes a member and adds it again from a fresh
    /// KeyPackage: the member is cut off while the others see no change.
    pub fn remove_and_add(
        &mut self,
        provider: &Provider<'_>,
        signer: &DeviceSigner,
        account: &AccountId,
        key_package: &[u8],
    ) -> Result<CommitOutput> {
        let leaf = self
            .leaf(account)
            .ok_or_else(|| MlsError::NotAMember(account.to_string()))?;
        let message = MlsMessageIn::tls_deserialize_exact(key_package)
            .map_err(|e| MlsError::Malformed(e.to_string()))?;
        let MlsMessageBodyIn::KeyPackage(key_package) = message.extract() else {
            return Err(MlsError::InvalidKeyPackage("expected a KeyPackage".into()));
        };
        let key_package =
            KeyPackageIn::validate(key_package, provider.crypto(), ProtocolVersion::Mls10)
                .map_err(|e| MlsError::InvalidKeyPackage(format!("{e:?}")))?;
        let epoch = self.epoch();
        let bundle = self
            .inner
            .commit_builder()
            .propose_removals([leaf])
            .propose_adds([key_package])
            .load_psks(provider.storage())
            .map_err(|e| protocol("loading PSKs", e))?
            .build(provider.rand(), provider.crypto(), signer, |_| true)
            .map_err(|e| protocol("building a commit", e))?
            .stage_commit(provider)
            .map_err(|e| protocol("staging a commit", e))?;
        let (commit, welcome, group_info) = bundle.into_messages();
        CommitOutput::new(epoch, commit, welcome, group_info)
    }

    /// Joins a group by external commit from any GroupInfo, under any
    /// account, with none of the checks an Umbra device makes first: what a
    /// server holding a group's GroupInfo could do to stand in for a member.
    /// Returns the group (already at the next epoch) and the commit.
    pub fn join_externally_unchecked(
        provider: &Provider<'_>,
        signer: &DeviceSigner,
        claimed: &AccountId,
        group_info: &[u8],
    ) -> Result<(Group, Vec<u8>)> {
        let MlsMessageBodyIn::GroupInfo(info) = parse_message(group_info)?.extract() else {
            return Err(MlsError::Malformed("expected a GroupInfo".into()));
        };
        let (group, bundle) = Group::external_commit(
            provider,
            signer,
            claimed,
            &crate::GroupConfig::default(),
            info,
            None,
        )?;
        let (commit, _, _) = bundle.into_messages();
        Ok((group, to_bytes(&commit)?))
    }
}

/// A KeyPackage an honest device never makes: a credential naming
/// `identity` byte for byte (say, an account ID in lower case), and leaf
/// capabilities that list no extension at all if `bare`.
pub fn odd_key_package(
    provider: &Provider<'_>,
    signer: &DeviceSigner,
    identity: &str,
    bare: bool,
) -> Result<Vec<u8>> {
    use openmls::prelude::{
        BasicCredential, Capabilities, CredentialWithKey, KeyPackage, MlsMessageOut,
    };
    let mut builder = KeyPackage::builder();
    if !bare {
        builder = builder.leaf_node_capabilities(
            Capabilities::builder()
                .extensions(vec![
                    openmls::prelude::ExtensionType::LastResort,
                    openmls::prelude::ExtensionType::Unknown(crate::DISAPPEARING_EXTENSION),
                ])
                .build(),
        );
    }
    let credential = CredentialWithKey {
        credential: BasicCredential::new(identity.as_bytes().to_vec()).into(),
        signature_key: signer.identity_key().as_bytes().to_vec().into(),
    };
    let bundle = builder
        .build(
            crate::Suite::default().ciphersuite(),
            provider,
            signer,
            credential,
        )
        .map_err(|e| protocol("creating a KeyPackage", e))?;
    to_bytes(&MlsMessageOut::from(bundle.key_package().clone()))
}
