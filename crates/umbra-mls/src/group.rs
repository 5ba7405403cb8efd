//! MLS groups as Umbra uses them: a conversation is a group, a one-to-one
//! conversation a group of two. Every state change is written through the
//! [`Provider`]'s connection; the caller brackets it in a transaction.

use openmls::prelude::{
    BasicCredential, Capabilities, ContentType, Credential, CredentialWithKey, Extension,
    ExtensionType, Extensions, GroupContext, GroupId, KeyPackage, KeyPackageIn, LeafNode,
    LeafNodeIndex, LeafNodeParameters, MlsGroup, MlsGroupCreateConfig, MlsGroupJoinConfig,
    MlsMessageBodyIn, MlsMessageIn, MlsMessageOut, PURE_PLAINTEXT_WIRE_FORMAT_POLICY,
    ProcessedMessageContent, ProtocolVersion, RequiredCapabilitiesExtension, StagedWelcome,
    UnknownExtension,
};
use openmls_traits::{OpenMlsProvider, random::OpenMlsRand};
use tls_codec::Deserialize as _;
use umbra_proto::tokens::{DELIVERY_KEY_BYTES, DELIVERY_KEY_LABEL, DeliveryKey};
use umbra_proto::{AccountId, DeviceAddr, DeviceId, IdentityKey};

use crate::{DeviceSigner, MlsError, Provider, Result, Suite, protocol};

/// How groups are created and joined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupConfig {
    pub suite: Suite,
    /// Past epochs whose secrets are kept, so that an application message
    /// sent just before a commit still decrypts after it.
    pub max_past_epochs: usize,
    /// Application messages are padded (inside the encryption) to a
    /// multiple of this many bytes, so that their size says only which
    /// bucket their content falls in (0: no padding).
    pub padding: usize,
}

impl GroupConfig {
    pub const DEFAULT_MAX_PAST_EPOCHS: usize = 5;
    /// A short text and its envelope fit in one block; a longer one says
    /// its length only to the nearest 256 bytes.
    pub const DEFAULT_PADDING: usize = 256;
}

impl Default for GroupConfig {
    fn default() -> Self {
        GroupConfig {
            suite: Suite::default(),
            max_past_epochs: Self::DEFAULT_MAX_PAST_EPOCHS,
            padding: Self::DEFAULT_PADDING,
        }
    }
}

/// A member as the group's ratchet tree states it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberInfo {
    pub account: AccountId,
    /// The leaf's signature key: the device's key.
    pub identity_key: IdentityKey,
    /// The account key the leaf claims: its device certificate's, or the
    /// leaf's own key for a leaf without one (device 1, whose key is the
    /// account key). A certificate is checked to bind the leaf's key to
    /// its account under this key before the leaf is taken in; whether
    /// this is the account's real key is for the one reading to compare
    /// with the key it pinned.
    pub account_key: IdentityKey,
    /// The device of the account the leaf is: its certificate's, or device
    /// 1 for a leaf without one.
    pub device: DeviceId,
}

impl MemberInfo {
    /// The leaf as an address: the account's device.
    pub fn address(&self) -> DeviceAddr {
        DeviceAddr::new(self.account.clone(), self.device)
    }
}

/// A commit waiting for the delivery service's verdict, and the Welcome for
/// the members it adds.
#[derive(Debug, Clone)]
pub struct CommitOutput {
    /// The epoch the commit was made in.
    pub epoch: u64,
    pub commit: Vec<u8>,
    pub welcome: Option<Vec<u8>>,
    /// MLSMessage(GroupInfo) of the epoch the commit starts, signed by this
    /// device, with the ratchet tree and the external public key: the
    /// server keeps it so that a member who fell behind can rejoin.
    pub group_info: Vec<u8>,
}

impl CommitOutput {
    pub(crate) fn new(
        epoch: u64,
        commit: MlsMessageOut,
        welcome: Option<MlsMessageOut>,
        group_info: Option<MlsMessageOut>,
    ) -> Result<CommitOutput> {
        let group_info = group_info.ok_or_else(|| {
            MlsError::Protocol("a commit came without the group's next GroupInfo".into())
        })?;
        Ok(CommitOutput {
            epoch,
            commit: to_bytes(&commit)?,
            welcome: welcome.as_ref().map(to_bytes).transpose()?,
            group_info: to_bytes(&group_info)?,
        })
    }
}

/// What an incoming group message turned out to be.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Incoming {
    Application {
        sender: AccountId,
        plaintext: Vec<u8>,
    },
    /// A member proposes to remove itself (it is leaving); stored until
    /// someone commits it.
    Leaving { sender: AccountId },
    /// Any other proposal: refused and not stored, because a device commits
    /// only its own changes and members' departures, so that every change
    /// is shown as the act of whoever made it.
    RefusedProposal { sender: AccountId },
    /// One of this device's own application messages, come back: an
    /// anonymous send reaches every member device, the sender's too (the
    /// server cannot tell which is the sender's). Nothing to apply.
    Echo,
    /// A commit, merged: the group is now at `epoch`.
    Commit {
        sender: AccountId,
        epoch: u64,
        /// This device was removed and can no longer read the group.
        removed_self: bool,
        /// An external commit: `sender`, a member who fell behind, rejoined
        /// (replacing its old leaf with its own key).
        rejoined: bool,
    },
}

/// The accounts of `leaves`, each once, in the order of its first leaf.
pub fn accounts_of(leaves: &[DeviceAddr]) -> Vec<AccountId> {
    let mut accounts: Vec<AccountId> = Vec::new();
    for leaf in leaves {
        if !accounts.contains(&leaf.account) {
            accounts.push(leaf.account.clone());
        }
    }
    accounts
}

/// One MLS group held by this device.
#[derive(Debug)]
pub struct Group {
    pub(crate) inner: MlsGroup,
}

pub(crate) fn credential(signer: &DeviceSigner, account: &AccountId) -> CredentialWithKey {
    CredentialWithKey {
        credential: BasicCredential::new(account.as_str().as_bytes().to_vec()).into(),
        signature_key: signer.identity_key().as_bytes().to_vec().into(),
    }
}

pub(crate) fn account_of(credential: &Credential) -> Result<AccountId> {
    let basic = BasicCredential::try_from(credential.clone())
        .map_err(|_| MlsError::Malformed("credential is not a basic credential".into()))?;
    std::str::from_utf8(basic.identity())
        .ok()
        .and_then(|text| AccountId::parse(text).ok())
        .ok_or_else(|| MlsError::Malformed("credential is not an Umbra account ID".into()))
}

/// A leaf's account, key and the account key it claims, if it is an Umbra
/// leaf: its credential an account ID, and a device certificate it carries
/// one that binds its key to that account.
pub(crate) fn leaf_member(leaf: &LeafNode) -> std::result::Result<MemberInfo, String> {
    let account = account_of(leaf.credential())
        .map_err(|_| "a leaf's credential is not an Umbra account ID".to_owned())?;
    let identity_key = IdentityKey::from_slice(leaf.signature_key().as_slice())
        .map_err(|_| "a leaf's signature key is not an Ed25519 key".to_owned())?;
    let (account_key, device) = match crate::relay::leaf_certificate(leaf.extensions())
        .map_err(|e| format!("{account}'s leaf carries a malformed device certificate: {e}"))?
    {
        None => (identity_key, DeviceId::FIRST),
        Some(certificate) if certificate.certifies(&account, &identity_key) => {
            (certificate.account_key, certificate.entry.device())
        }
        Some(_) => {
            return Err(format!(
                "{account}'s leaf carries a device certificate that does not bind its key to the account"
            ));
        }
    };
    Ok(MemberInfo {
        account,
        identity_key,
        account_key,
        device,
    })
}

/// What every Umbra leaf declares it supports: the last-resort KeyPackage
/// extension on top of openmls's defaults (an extension a KeyPackage carries
/// must be listed in its leaf's capabilities).
fn capabilities() -> Capabilities {
    capabilities_offering(&Suite::ALL)
}

/// A leaf's capabilities: Umbra's extensions, and `offered` as the
/// ciphersuites (what a KeyPackage's device offers; members read it to
/// tell a device that has no post-quantum package from a server that
/// withholds it).
fn capabilities_offering(offered: &[Suite]) -> Capabilities {
    Capabilities::builder()
        .ciphersuites(offered.iter().map(|suite| suite.ciphersuite()).collect())
        .extensions(vec![
            ExtensionType::LastResort,
            ExtensionType::Unknown(DISAPPEARING_EXTENSION),
            ExtensionType::Unknown(DEVICE_CERTIFICATE_EXTENSION),
        ])
        .build()
}

/// Umbra's leaf extension (private-use range): a device's certificate
/// ([`crate::DeviceCertificate`]), carried by the leaves of every device
/// but device 1 (whose key is the account key), so members can check that
/// the leaf's key is one of the account's devices.
pub const DEVICE_CERTIFICATE_EXTENSION: u16 = 0xF0D6;

/// Umbra's group-context extension (private-use range): the disappearing
/// timer every member enforces, 4 bytes big endian, in seconds; 0 is off.
/// Changed only by a commit, so every change is authenticated and ordered.
pub const DISAPPEARING_EXTENSION: u16 = 0xF0D5;

/// The group-context extensions that carry a timer: the timer itself, and
/// the requirement that every member support it (which openmls demands of
/// any non-default group-context extension).
pub(crate) fn timer_extensions(seconds: u32) -> Result<Extensions<GroupContext>> {
    Extensions::from_vec(vec![
        Extension::RequiredCapabilities(RequiredCapabilitiesExtension::new(
            &[ExtensionType::Unknown(DISAPPEARING_EXTENSION)],
            &[],
            &[],
        )),
        Extension::Unknown(
            DISAPPEARING_EXTENSION,
            UnknownExtension(seconds.to_be_bytes().to_vec()),
        ),
    ])
    .map_err(|e| protocol("building the timer extension", e))
}

pub(crate) fn to_bytes(message: &MlsMessageOut) -> Result<Vec<u8>> {
    message
        .to_bytes()
        .map_err(|e| protocol("serialising an MLS message", e))
}

pub(crate) fn parse_message(bytes: &[u8]) -> Result<MlsMessageIn> {
    MlsMessageIn::tls_deserialize_exact(bytes).map_err(|e| MlsError::Malformed(e.to_string()))
}

/// The leaf extension that carries a device certificate.
fn certificate_extension(certificate: &crate::DeviceCertificate) -> Result<Extensions<LeafNode>> {
    Extensions::single(Extension::Unknown(
        DEVICE_CERTIFICATE_EXTENSION,
        UnknownExtension(certificate.encode()),
    ))
    .map_err(|e| protocol("adding the device certificate", e))
}

/// Creates a KeyPackage for this device, ready to upload. Its private keys
/// are written to the provider's storage, where a Welcome will find them.
pub fn new_key_package(
    provider: &Provider<'_>,
    signer: &DeviceSigner,
    account: &AccountId,
    suite: Suite,
    last_resort: bool,
) -> Result<Vec<u8>> {
    new_device_key_package(provider, signer, account, suite, last_resort, None)
}

/// [`new_key_package`] for a device that carries a certificate in its
/// leaf (every device but device 1).
pub fn new_device_key_package(
    provider: &Provider<'_>,
    signer: &DeviceSigner,
    account: &AccountId,
    suite: Suite,
    last_resort: bool,
    certificate: Option<&crate::DeviceCertificate>,
) -> Result<Vec<u8>> {
    new_offering_key_package(
        provider,
        signer,
        account,
        (suite, &Suite::ALL),
        last_resort,
        certificate,
    )
}

/// [`new_device_key_package`] of `suite` from a device that offers the
/// suites `offered` (its leaf's capabilities list them, and only them).
pub fn new_offering_key_package(
    provider: &Provider<'_>,
    signer: &DeviceSigner,
    account: &AccountId,
    (suite, offered): (Suite, &[Suite]),
    last_resort: bool,
    certificate: Option<&crate::DeviceCertificate>,
) -> Result<Vec<u8>> {
    let mut builder = KeyPackage::builder().leaf_node_capabilities(capabilities_offering(offered));
    if let Some(certificate) = certificate {
        builder = builder.leaf_node_extensions(certificate_extension(certificate)?);
    }
    if last_resort {
        builder = builder.mark_as_last_resort();
    }
    let bundle = builder
        .build(
            suite.ciphersuite(),
            provider,
            signer,
            credential(signer, account),
        )
        .map_err(|e| protocol("creating a KeyPackage", e))?;
    to_bytes(&MlsMessageOut::from(bundle.key_package().clone()))
}

impl Group {
    fn join_config(config: &GroupConfig) -> MlsGroupJoinConfig {
        MlsGroupJoinConfig::builder()
            .use_ratchet_tree_extension(true)
            .wire_format_policy(PURE_PLAINTEXT_WIRE_FORMAT_POLICY)
            .max_past_epochs(config.max_past_epochs)
            .padding_size(config.padding)
            .build()
    }

    /// Creates a group with this device as its only member, under a random
    /// 16-byte group ID.
    pub fn create(
        provider: &Provider<'_>,
        signer: &DeviceSigner,
        account: &AccountId,
        config: &GroupConfig,
        disappear_after: u32,
    ) -> Result<Group> {
        Self::create_as_device(provider, signer, account, config, disappear_after, None)
    }

    /// [`Group::create`] by a device whose leaf carries its certificate
    /// (every device but device 1).
    pub fn create_as_device(
        provider: &Provider<'_>,
        signer: &DeviceSigner,
        account: &AccountId,
        config: &GroupConfig,
        disappear_after: u32,
        certificate: Option<&crate::DeviceCertificate>,
    ) -> Result<Group> {
        let mut builder = MlsGroupCreateConfig::builder();
        if let Some(certificate) = certificate {
            builder = builder
                .capabilities(capabilities())
                .with_leaf_node_extensions(certificate_extension(certificate)?)
                .map_err(|e| protocol("adding the device certificate", e))?;
        }
        let create_config = builder
            .ciphersuite(config.suite.ciphersuite())
            .use_ratchet_tree_extension(true)
            // Commits and proposals go out as signed PublicMessages, so the
            // delivery service can validate them (`public.rs`); application
            // messages are always encrypted.
            .wire_format_policy(PURE_PLAINTEXT_WIRE_FORMAT_POLICY)
            .max_past_epochs(config.max_past_epochs)
            .padding_size(config.padding)
            .capabilities(capabilities())
            .with_group_context_extensions(timer_extensions(disappear_after)?)
            .build();
        let id = provider
            .rand()
            .random_vec(16)
            .map_err(|e| protocol("drawing a group ID", e))?;
        let inner = MlsGroup::new_with_group_id(
            provider,
            signer,
            &create_config,
            GroupId::from_slice(&id),
            credential(signer, account),
        )
        .map_err(|e| protocol("creating a group", e))?;
        Ok(Group { inner })
    }

    /// The group's signed GroupInfo with its ratchet tree, for the delivery
    /// service: it starts tracking a new group from it.
    pub fn group_info(&self, provider: &Provider<'_>, signer: &DeviceSigner) -> Result<Vec<u8>> {
        let info = self
            .inner
            .export_group_info(provider.crypto(), signer, true)
            .map_err(|e| protocol("exporting the GroupInfo", e))?;
        to_bytes(&info)
    }

    /// Loads a group from the provider's storage.
    pub fn load(provider: &Provider<'_>, group_id: &[u8]) -> Result<Option<Group>> {
        MlsGroup::load(provider.storage(), &GroupId::from_slice(group_id))
            .map(|inner| inner.map(|inner| Group { inner }))
            .map_err(|e| MlsError::Storage(e.to_string()))
    }

    /// Joins a group from a Welcome addressed to one of this device's
    /// KeyPackages. Returns the group and who added us.
    pub fn join(
        provider: &Provider<'_>,
        welcome: &[u8],
        config: &GroupConfig,
    ) -> Result<(Group, AccountId)> {
        let MlsMessageBodyIn::Welcome(welcome) = parse_message(welcome)?.extract() else {
            return Err(MlsError::Malformed("expected a Welcome".into()));
        };
        let mut builder =
            StagedWelcome::build_from_welcome(provider, &Self::join_config(config), welcome)
                .map_err(|e| protocol("processing a Welcome", e))?;
        let group_id = builder
            .processed_welcome()
            .unverified_group_info()
            .group_id()
            .clone();
        let epoch = builder
            .processed_welcome()
            .unverified_group_info()
            .epoch()
            .as_u64();
        if let Some(existing) = Self::load(provider, group_id.as_slice())? {
            if existing.is_active() {
                return Err(MlsError::Protocol(
                    "a Welcome to a group this device is in already".into(),
                ));
            }
            // Removed from it before: a new Welcome, from after the
            // removal, adds this device again (an old one replayed does not).
            if epoch <= existing.epoch() {
                return Err(MlsError::Protocol(
                    "a Welcome older than this device's removal from the group".into(),
                ));
            }
            builder = builder.replace_old_group();
        }
        let staged = builder
            .build()
            .map_err(|e| protocol("processing a Welcome", e))?;
        let inviter = account_of(
            staged
                .welcome_sender()
                .map_err(|e| protocol("reading the Welcome's sender", e))?
                .credential(),
        )?;
        let inner = staged
            .into_group(provider)
            .map_err(|e| protocol("joining from a Welcome", e))?;
        let group = Group { inner };
        if let Err(error) = group.check_leaves() {
            group.delete(provider)?;
            return Err(error);
        }
        Ok((group, inviter))
    }

    /// Rejoins a group this device fell behind in (its commits expired or
    /// could not be processed) by an external commit from the group's
    /// current GroupInfo, with this device's own key: the commit replaces
    /// our old leaf. The group returned is already at the next epoch
    /// (openmls merges an external commit at once); the commit must still
    /// be accepted by the delivery service, and if it is not, rejoining
    /// starts again from a fresh GroupInfo. Whatever was sent while we were
    /// behind stays unreadable.
    ///
    /// The GroupInfo comes from the server, so it is trusted only as far as
    /// this device can check it: it must be for `group_id`, at an epoch
    /// later than `behind` (the last epoch this device really reached; a
    /// device that is not behind does not rejoin), and signed by a member
    /// this device already had in the group, with the key it had; and the
    /// group it leads to may hold no other leaf under our account.
    pub fn rejoin(
        provider: &Provider<'_>,
        signer: &DeviceSigner,
        account: &AccountId,
        config: &GroupConfig,
        behind: (&[u8], u64),
        group_info: &[u8],
    ) -> Result<(Group, CommitOutput)> {
        Self::rejoin_as_device(provider, signer, account, config, behind, group_info, None)
    }

    /// [`Group::rejoin`] by a device whose new leaf carries its certificate
    /// (every device but device 1).
    pub fn rejoin_as_device(
        provider: &Provider<'_>,
        signer: &DeviceSigner,
        account: &AccountId,
        config: &GroupConfig,
        (group_id, behind): (&[u8], u64),
        group_info: &[u8],
        certificate: Option<&crate::DeviceCertificate>,
    ) -> Result<(Group, CommitOutput)> {
        use openmls::prelude::{OpenMlsSignaturePublicKey, Verifiable as _};
        let refuse = |why: &str| MlsError::UntrustedGroupInfo(why.to_owned());
        let MlsMessageBodyIn::GroupInfo(info) = parse_message(group_info)?.extract() else {
            return Err(MlsError::Malformed("expected a GroupInfo".into()));
        };
        if info.group_id().as_slice() != group_id {
            return Err(refuse("the GroupInfo is for another group"));
        }
        if info.epoch().as_u64() <= behind {
            return Err(MlsError::NotBehind);
        }
        let old = Self::load(provider, group_id)?
            .ok_or_else(|| refuse("this device holds no state of the group"))?;
        let known = old.inner.members().any(|member| {
            account_of(&member.credential).is_ok()
                && OpenMlsSignaturePublicKey::new(
                    member.signature_key.clone().into(),
                    old.inner.ciphersuite().signature_algorithm(),
                )
                .is_ok_and(|key| info.verify_no_out(provider.crypto(), &key).is_ok())
        });
        if !known {
            return Err(refuse(
                "the GroupInfo is not signed by a member this device knew in the group",
            ));
        }
        old.delete(provider)?;
        let (group, bundle) =
            Self::external_commit(provider, signer, account, config, info, certificate)?;
        if let Err(error) = group.check_leaves() {
            group.delete(provider)?;
            return Err(error);
        }
        // Any other leaf of this account is another of its devices: the
        // tree holds no second leaf for this device, and every leaf of the
        // account stands for the one account key this device's does
        // (`check_leaves`), which only the account can certify under.
        let epoch = group.epoch().saturating_sub(1);
        let (commit, _, group_info) = bundle.into_messages();
        let output = CommitOutput::new(epoch, commit, None, group_info)?;
        Ok((group, output))
    }

    /// Joins the group `info` describes by an external commit under
    /// `account` with this device's key, checking nothing beyond what
    /// openmls does (callers check first). The group is already at the next
    /// epoch (openmls merges an external commit at once).
    pub(crate) fn external_commit(
        provider: &Provider<'_>,
        signer: &DeviceSigner,
        account: &AccountId,
        config: &GroupConfig,
        info: openmls::messages::group_info::VerifiableGroupInfo,
        certificate: Option<&crate::DeviceCertificate>,
    ) -> Result<(Group, openmls::prelude::CommitMessageBundle)> {
        let mut leaf = LeafNodeParameters::builder().with_capabilities(capabilities());
        if let Some(certificate) = certificate {
            leaf = leaf.with_extensions(certificate_extension(certificate)?);
        }
        let (inner, bundle) = MlsGroup::external_commit_builder()
            .with_config(Self::join_config(config))
            .build_group(provider, info, credential(signer, account))
            .map_err(|e| protocol("joining by external commit", e))?
            .leaf_node_parameters(leaf.build())
            .load_psks(provider.storage())
            .map_err(|e| protocol("loading PSKs", e))?
            .build(provider.rand(), provider.crypto(), signer, |_| true)
            .map_err(|e| protocol("building the external commit", e))?
            .finalize(provider)
            .map_err(|e| protocol("finishing the external commit", e))?;
        Ok((Group { inner }, bundle))
    }

    pub fn id(&self) -> Vec<u8> {
        self.inner.group_id().as_slice().to_vec()
    }

    pub fn epoch(&self) -> u64 {
        self.inner.epoch().as_u64()
    }

    pub fn is_active(&self) -> bool {
        self.inner.is_active()
    }

    /// The disappearing timer in the group context, in seconds (0 = off).
    pub fn disappear_after(&self) -> u32 {
        self.inner
            .extensions()
            .unknown(DISAPPEARING_EXTENSION)
            .and_then(|extension| extension.0.as_slice().try_into().ok())
            .map(u32::from_be_bytes)
            .unwrap_or(0)
    }

    /// Commits a new disappearing timer (pending, as any commit).
    pub fn set_disappear_after(
        &mut self,
        provider: &Provider<'_>,
        signer: &DeviceSigner,
        seconds: u32,
    ) -> Result<CommitOutput> {
        let epoch = self.epoch();
        let mut extensions = self.inner.extensions().clone();
        for extension in timer_extensions(seconds)?.iter() {
            extensions
                .add_or_replace(extension.clone())
                .map_err(|e| protocol("setting the timer", e))?;
        }
        let (commit, welcome, group_info) = self
            .inner
            .update_group_context_extensions(provider, extensions, signer)
            .map_err(|e| protocol("changing the timer", e))?;
        CommitOutput::new(epoch, commit, welcome, group_info.map(MlsMessageOut::from))
    }

    /// This epoch's delivery key: every member derives the same one from
    /// the MLS exporter, nobody else can (see `umbra_proto::tokens`).
    pub fn delivery_key(&self, provider: &Provider<'_>) -> Result<DeliveryKey> {
        let seed = self
            .inner
            .export_secret(
                provider.crypto(),
                DELIVERY_KEY_LABEL,
                self.inner.group_id().as_slice(),
                DELIVERY_KEY_BYTES,
            )
            .map_err(|e| protocol("deriving the delivery key", e))?;
        delivery_key(&seed)
    }

    /// The delivery key of the epoch this device's pending commit starts,
    /// for the committer to state with the commit (`None`: no commit is
    /// pending).
    pub fn next_delivery_key(&self, provider: &Provider<'_>) -> Result<Option<DeliveryKey>> {
        let Some(staged) = self.inner.pending_commit() else {
            return Ok(None);
        };
        let seed = staged
            .export_secret(
                provider.crypto(),
                DELIVERY_KEY_LABEL,
                self.inner.group_id().as_slice(),
                DELIVERY_KEY_BYTES,
            )
            .map_err(|e| protocol("deriving the next delivery key", e))?;
        delivery_key(&seed).map(Some)
    }

    pub fn suite(&self) -> Option<Suite> {
        Suite::from_ciphersuite(self.inner.ciphersuite())
    }

    /// Members as the ratchet tree states them, in leaf order.
    pub fn members(&self) -> Vec<MemberInfo> {
        // Every leaf was checked as it came in (a Welcome's tree, a
        // commit's adds and path); one that does not read is left out.
        self.inner
            .public_group()
            .members()
            .filter_map(|member| self.inner.public_group().leaf(member.index))
            .filter_map(|leaf| leaf_member(leaf).ok())
            .collect()
    }

    /// Checks every leaf of the tree (a group just joined or rejoined):
    /// each an Umbra leaf, and no device of an account, and no key,
    /// holding two (as the delivery service requires of every commit), so
    /// the leaf of a device is the one that speaks for it, a Welcome's
    /// sender included.
    fn check_leaves(&self) -> Result<()> {
        let mut devices = std::collections::BTreeSet::new();
        let mut keys = std::collections::BTreeSet::new();
        let mut account_keys = std::collections::BTreeMap::new();
        for member in self.inner.public_group().members() {
            if let Some(leaf) = self.inner.public_group().leaf(member.index) {
                let member = leaf_member(leaf).map_err(MlsError::Protocol)?;
                if !devices.insert(member.address())
                    || !keys.insert(*member.identity_key.as_bytes())
                {
                    return Err(MlsError::Protocol(format!(
                        "the group holds two leaves for {}",
                        member.address()
                    )));
                }
                // All of an account's leaves stand for one account key.
                let claimed = *account_keys
                    .entry(member.account.clone())
                    .or_insert(member.account_key);
                if claimed != member.account_key {
                    return Err(MlsError::Protocol(format!(
                        "the group's leaves of {} stand for two account keys",
                        member.account
                    )));
                }
            }
        }
        Ok(())
    }

    /// Every member leaf as an address (account and device).
    pub fn devices(&self) -> Vec<DeviceAddr> {
        self.members().iter().map(MemberInfo::address).collect()
    }

    /// The member accounts, each once, in the order of their first leaf
    /// (an account has a leaf per device in the group).
    pub fn accounts(&self) -> Vec<AccountId> {
        accounts_of(&self.devices())
    }

    /// The device certificate the leaf with signature key `key` carries
    /// (`None` for a leaf without one, or no such leaf); a certificate
    /// that does not decode is an error.
    pub fn device_certificate(
        &self,
        key: &IdentityKey,
    ) -> Result<Option<crate::DeviceCertificate>> {
        let Some(index) = self
            .inner
            .members()
            .find(|member| member.signature_key == key.as_bytes())
            .map(|member| member.index)
        else {
            return Ok(None);
        };
        let Some(leaf) = self.inner.public_group().leaf(index) else {
            return Ok(None);
        };
        crate::relay::leaf_certificate(leaf.extensions())
            .map_err(|e| MlsError::Malformed(format!("a leaf's device certificate: {e}")))
    }

    /// `account`'s first leaf (the hostile test member's target).
    #[cfg(feature = "hostile")]
    pub(crate) fn leaf(&self, account: &AccountId) -> Option<LeafNodeIndex> {
        self.leaves_of(account).into_iter().next()
    }

    /// Every leaf of `account`: one per device of it in the group.
    pub(crate) fn leaves_of(&self, account: &AccountId) -> Vec<LeafNodeIndex> {
        self.inner
            .members()
            .filter(|member| account_of(&member.credential).ok().as_ref() == Some(account))
            .map(|member| member.index)
            .collect()
    }

    pub fn has_pending_commit(&self) -> bool {
        self.inner.pending_commit().is_some()
    }

    /// Adds the owners of these KeyPackages. The commit stays pending until
    /// [`Group::merge_pending_commit`] (the server accepted it) or
    /// [`Group::clear_pending_commit`] (it did not).
    pub fn add_members(
        &mut self,
        provider: &Provider<'_>,
        signer: &DeviceSigner,
        key_packages: &[Vec<u8>],
    ) -> Result<CommitOutput> {
        let mut validated = Vec::with_capacity(key_packages.len());
        for bytes in key_packages {
            let MlsMessageBodyIn::KeyPackage(key_package) = parse_message(bytes)?.extract() else {
                return Err(MlsError::InvalidKeyPackage("expected a KeyPackage".into()));
            };
            let key_package: KeyPackageIn = key_package;
            let key_package = key_package
                .validate(provider.crypto(), ProtocolVersion::Mls10)
                .map_err(|e| MlsError::InvalidKeyPackage(format!("{e:?}")))?;
            if key_package.ciphersuite() != self.inner.ciphersuite() {
                return Err(MlsError::UnsupportedCiphersuite(format!(
                    "{:?} (the group uses {:?})",
                    key_package.ciphersuite(),
                    self.inner.ciphersuite()
                )));
            }
            validated.push(key_package);
        }
        let epoch = self.epoch();
        let (commit, welcome, group_info) = self
            .inner
            .add_members(provider, signer, &validated)
            .map_err(|e| protocol("adding members", e))?;
        CommitOutput::new(
            epoch,
            commit,
            Some(welcome),
            group_info.map(MlsMessageOut::from),
        )
    }

    /// Removes these accounts from the group, every device of each
    /// (pending, as for adds).
    pub fn remove_members(
        &mut self,
        provider: &Provider<'_>,
        signer: &DeviceSigner,
        accounts: &[AccountId],
    ) -> Result<CommitOutput> {
        let mut leaves = Vec::new();
        for account in accounts {
            let of = self.leaves_of(account);
            if of.is_empty() {
                return Err(MlsError::NotAMember(account.to_string()));
            }
            leaves.extend(of);
        }
        let epoch = self.epoch();
        let (commit, welcome, group_info) = self
            .inner
            .remove_members(provider, signer, &leaves)
            .map_err(|e| protocol("removing members", e))?;
        CommitOutput::new(epoch, commit, welcome, group_info.map(MlsMessageOut::from))
    }

    /// Removes these devices' leaves (an account's others stay), pending
    /// as for adds. Devices without a leaf are skipped; `None` if none
    /// has one.
    pub fn remove_devices(
        &mut self,
        provider: &Provider<'_>,
        signer: &DeviceSigner,
        devices: &[DeviceAddr],
    ) -> Result<Option<CommitOutput>> {
        let leaves: Vec<LeafNodeIndex> = self
            .inner
            .members()
            .filter(|member| {
                self.inner
                    .public_group()
                    .leaf(member.index)
                    .and_then(|leaf| leaf_member(leaf).ok())
                    .is_some_and(|leaf| devices.contains(&leaf.address()))
            })
            .map(|member| member.index)
            .collect();
        if leaves.is_empty() {
            return Ok(None);
        }
        let epoch = self.epoch();
        let (commit, welcome, group_info) = self
            .inner
            .remove_members(provider, signer, &leaves)
            .map_err(|e| protocol("removing devices", e))?;
        CommitOutput::new(epoch, commit, welcome, group_info.map(MlsMessageOut::from)).map(Some)
    }

    /// Replaces this device's leaf keys (post-compromise security); also
    /// commits any proposals received so far.
    pub fn self_update(
        &mut self,
        provider: &Provider<'_>,
        signer: &DeviceSigner,
    ) -> Result<CommitOutput> {
        let epoch = self.epoch();
        let bundle = self
            .inner
            .self_update(provider, signer, LeafNodeParameters::default())
            .map_err(|e| protocol("updating own keys", e))?;
        let (commit, welcome, group_info) = bundle.into_messages();
        CommitOutput::new(epoch, commit, welcome, group_info)
    }

    /// Forgets proposals received or made but not committed.
    pub fn clear_pending_proposals(&mut self, provider: &Provider<'_>) -> Result<()> {
        self.inner
            .clear_pending_proposals(provider.storage())
            .map_err(|e| MlsError::Storage(e.to_string()))
    }

    pub fn has_pending_proposals(&self) -> bool {
        self.inner.has_pending_proposals()
    }

    /// Commits the proposals received so far (for example a member leaving).
    pub fn commit_pending_proposals(
        &mut self,
        provider: &Provider<'_>,
        signer: &DeviceSigner,
    ) -> Result<CommitOutput> {
        let epoch = self.epoch();
        let (commit, welcome, group_info) = self
            .inner
            .commit_to_pending_proposals(provider, signer)
            .map_err(|e| protocol("committing pending proposals", e))?;
        CommitOutput::new(epoch, commit, welcome, group_info.map(MlsMessageOut::from))
    }

    /// Proposes to remove this device; another member commits it.
    pub fn leave(&mut self, provider: &Provider<'_>, signer: &DeviceSigner) -> Result<Vec<u8>> {
        let proposal = self
            .inner
            .leave_group(provider, signer)
            .map_err(|e| protocol("leaving the group", e))?;
        to_bytes(&proposal)
    }

    /// The delivery service accepted our commit: move to the next epoch.
    pub fn merge_pending_commit(&mut self, provider: &Provider<'_>) -> Result<()> {
        self.inner
            .merge_pending_commit(provider)
            .map_err(|e| protocol("merging our commit", e))
    }

    /// The delivery service rejected our commit: forget it.
    pub fn clear_pending_commit(&mut self, provider: &Provider<'_>) -> Result<()> {
        self.inner
            .clear_pending_commit(provider.storage())
            .map_err(|e| MlsError::Storage(e.to_string()))
    }

    /// Encrypts an application message for the group.
    pub fn encrypt(
        &mut self,
        provider: &Provider<'_>,
        signer: &DeviceSigner,
        plaintext: &[u8],
    ) -> Result<Vec<u8>> {
        if !self.is_active() {
            return Err(MlsError::NotActive);
        }
        let message = self
            .inner
            .create_message(provider, signer, plaintext)
            .map_err(|e| protocol("encrypting", e))?;
        to_bytes(&message)
    }

    /// Decrypts and applies one message from the group: returns the
    /// plaintext of an application message, stores a proposal, merges a
    /// commit. A commit from another member supersedes any commit of ours
    /// still pending: the delivery service accepts one per epoch.
    pub fn process(&mut self, provider: &Provider<'_>, bytes: &[u8]) -> Result<Incoming> {
        if !self.is_active() {
            return Err(MlsError::NotActive);
        }
        let protocol_message = parse_message(bytes)?
            .try_into_protocol_message()
            .map_err(|_| MlsError::Malformed("not a protocol message".into()))?;
        let message_epoch = protocol_message.epoch().as_u64();
        if self.has_pending_commit() {
            // The delivery service orders each group's traffic and never
            // echoes our own messages. So a message from the next epoch
            // proves that our pending commit was the one accepted, and a
            // commit from this epoch proves that another one was.
            if Some(message_epoch) == self.epoch().checked_add(1) {
                self.merge_pending_commit(provider)?;
            } else if message_epoch == self.epoch()
                && protocol_message.content_type() == ContentType::Commit
            {
                self.clear_pending_commit(provider)?;
            }
        }
        let processed = self
            .inner
            .process_message(provider, protocol_message)
            .map_err(|e| {
                if message_epoch > self.epoch() {
                    MlsError::WrongEpoch {
                        message: message_epoch,
                        group: self.epoch(),
                    }
                } else {
                    protocol("processing a message", e)
                }
            })?;
        let sender = account_of(processed.credential())?;
        let sender_kind = processed.sender().clone();
        match processed.into_content() {
            ProcessedMessageContent::ApplicationMessage(message) => Ok(Incoming::Application {
                sender,
                plaintext: message.into_bytes(),
            }),
            ProcessedMessageContent::ProposalMessage(proposal) => {
                let sender_leaf = match proposal.sender() {
                    openmls::prelude::Sender::Member(leaf) => Some(*leaf),
                    _ => None,
                };
                let leaving = matches!(
                    proposal.proposal(),
                    openmls::prelude::Proposal::Remove(remove)
                        if Some(remove.removed()) == sender_leaf
                );
                if !leaving {
                    return Ok(Incoming::RefusedProposal { sender });
                }
                self.inner
                    .store_pending_proposal(provider.storage(), *proposal)
                    .map_err(|e| MlsError::Storage(e.to_string()))?;
                Ok(Incoming::Leaving { sender })
            }
            ProcessedMessageContent::StagedCommitMessage(staged) => {
                // The delivery service refuses these too; a device does not
                // take its word for it. Every credential a commit brings in
                // must be an Umbra account (a leaf that is not would be a
                // member nobody sees), and the committer keeps its own.
                for credential in staged.credentials_to_verify() {
                    account_of(credential)?;
                }
                // And every leaf it brings in reads as an Umbra leaf, its
                // device certificate (if any) binding its key.
                let path_leaf = staged
                    .update_path_leaf_node()
                    .map(leaf_member)
                    .transpose()
                    .map_err(MlsError::Protocol)?;
                let leaf_at = |index: LeafNodeIndex| {
                    self.inner
                        .public_group()
                        .leaf(index)
                        .and_then(|leaf| leaf_member(leaf).ok())
                };
                // A committer's path keeps its device and the account key
                // it stands for (a removed device dropping its certificate
                // would otherwise pass for device 1).
                if let (openmls::prelude::Sender::Member(index), Some(new)) =
                    (&sender_kind, &path_leaf)
                {
                    let same = leaf_at(*index).is_some_and(|old| {
                        old.address() == new.address() && old.account_key == new.account_key
                    });
                    if !same {
                        return Err(MlsError::Protocol(format!(
                            "{sender}'s commit gives its leaf another device or account key"
                        )));
                    }
                }
                let mut added = Vec::new();
                for add in staged.add_proposals() {
                    added.push(
                        leaf_member(add.add_proposal().key_package().leaf_node())
                            .map_err(MlsError::Protocol)?,
                    );
                }
                if let Some(leaf) = staged.update_path_leaf_node()
                    && account_of(leaf.credential())? != sender
                {
                    return Err(MlsError::Protocol(format!(
                        "{sender}'s commit gives its leaf another account"
                    )));
                }
                let rejoined = matches!(sender_kind, openmls::prelude::Sender::NewMemberCommit);
                // An external commit is only a member rejoining with its
                // own key (its new leaf replaces its old one); and no
                // device is added that has a leaf already (nor any key
                // twice), so no device holds two leaves. Otherwise a server
                // could slip in a leaf of its own under a member's name.
                if rejoined {
                    let own_key = staged
                        .update_path_leaf_node()
                        .map(|leaf| leaf.signature_key().as_slice().to_vec());
                    let was_member = self.inner.members().any(|member| {
                        Some(&member.signature_key) == own_key.as_ref()
                            && account_of(&member.credential).is_ok_and(|a| a == sender)
                    });
                    if !was_member {
                        return Err(MlsError::Protocol(format!(
                            "an external commit under {sender}'s name from a key that was not theirs"
                        )));
                    }
                    // It removes its own device's old leaf and nothing else.
                    let removes: Vec<_> = staged.remove_proposals().collect();
                    let own_only = removes.len() <= 1
                        && removes.iter().all(|remove| {
                            let old = leaf_at(remove.remove_proposal().removed());
                            matches!((old, &path_leaf), (Some(old), Some(new))
                                if old.address() == new.address()
                                    && old.account_key == new.account_key)
                        });
                    if !own_only {
                        return Err(MlsError::Protocol(format!(
                            "{sender}'s rejoin removes another leaf than its own device's"
                        )));
                    }
                }
                let members = self.members();
                for (n, new) in added.iter().enumerate() {
                    let taken = |old: &MemberInfo| {
                        old.address() == new.address() || old.identity_key == new.identity_key
                    };
                    if members.iter().chain(added.iter().take(n)).any(taken) {
                        return Err(MlsError::Protocol(format!(
                            "a commit that adds {}, a member device already",
                            new.address()
                        )));
                    }
                    // Every leaf of an account stands for one account key: a
                    // leaf certified under another key is someone else's.
                    let other_key = members.iter().chain(added.iter().take(n)).any(|old| {
                        old.account == new.account && old.account_key != new.account_key
                    });
                    if other_key {
                        return Err(MlsError::Protocol(format!(
                            "a commit that adds {} under another account key than its other leaves",
                            new.address()
                        )));
                    }
                }
                let removed_self = staged.self_removed();
                self.inner
                    .merge_staged_commit(provider, *staged)
                    .map_err(|e| protocol("merging a commit", e))?;
                Ok(Incoming::Commit {
                    sender,
                    epoch: self.epoch(),
                    removed_self,
                    rejoined,
                })
            }
            ProcessedMessageContent::OwnPrivateMessage => Ok(Incoming::Echo),
            ProcessedMessageContent::ExternalJoinProposalMessage(_) => Err(MlsError::Protocol(
                "external join proposals are not accepted".into(),
            )),
            // The delivery service never echoes a device's own messages.
            _ => Err(MlsError::Protocol(
                "received this device's own message back".into(),
            )),
        }
    }

    /// Deletes the group's state from storage.
    pub fn delete(mut self, provider: &Provider<'_>) -> Result<()> {
        self.inner
            .delete(provider.storage())
            .map_err(|e| MlsError::Storage(e.to_string()))
    }
}

fn delivery_key(seed: &[u8]) -> Result<DeliveryKey> {
    let seed =
        zeroize::Zeroizing::new(<[u8; DELIVERY_KEY_BYTES]>::try_from(seed).map_err(|_| {
            MlsError::Protocol("the exporter gave a seed of the wrong size".into())
        })?);
    Ok(DeliveryKey::from_seed(&seed))
}
