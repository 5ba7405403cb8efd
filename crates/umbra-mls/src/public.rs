//! The delivery service's view of a group: its public state (ratchet tree
//! and group context, openmls's `PublicGroup`), against which the server
//! validates every handshake message before it relays it.
//!
//! Handshake messages (commits and proposals) travel as MLS
//! `PublicMessage`s, signed by their sender's leaf key; application
//! messages stay `PrivateMessage`s. Holding no secret of the group, the
//! server can still check that a commit is for the current epoch, is signed
//! by the member it names, that every proposal it carries is valid against
//! the tree, and which leaves it adds and removes. It cannot check what is
//! encrypted to the members (path secrets, the confirmation tag): a member
//! who cannot process a commit the server accepted gets back in by an
//! external commit (see [`PublicState::process_commit`]).
//!
//! Umbra's policy on handshake messages is enforced here too, so that every
//! change to a group is shown as the act of whoever made it:
//! - a proposal sent on its own may only be a member's removal of itself
//!   (leaving); any other proposal must come inline in its author's commit;
//! - a commit may carry by reference only such self-removals;
//! - a Welcome goes to exactly the KeyPackages the commit adds.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use openmls::prelude::{
    GroupId, LeafNode, MlsMessageBodyIn, MlsMessageIn, ProcessedMessage, ProcessedMessageContent,
    Proposal, ProposalOrRefType, ProposalStore, ProtocolMessage, PublicGroup, QueuedProposal,
    Sender,
};
use openmls_memory_storage::MemoryStorage;
use openmls_rust_crypto::RustCrypto;
use tls_codec::{Deserialize as _, Size as _};
use umbra_proto::{AccountId, DeviceAddr, IdentityKey};

use crate::group::{account_of, leaf_member};
use crate::{MemberInfo, MlsError, Result};

/// Why the delivery service refused a handshake message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HandshakeError {
    #[error("not a valid MLS handshake message: {0}")]
    Malformed(String),
    #[error("the commit does not validate against the group's state: {0}")]
    InvalidCommit(String),
    #[error("the proposal is refused: {0}")]
    InvalidProposal(String),
    #[error("the Welcome does not match the commit: {0}")]
    InvalidWelcome(String),
    #[error("the GroupInfo is refused: {0}")]
    InvalidGroupInfo(String),
    #[error("the message is for epoch {message} but the group is at epoch {group}")]
    WrongEpoch { message: u64, group: u64 },
    #[error("the server's copy of the group state is unreadable: {0}")]
    State(String),
}

/// What a validated commit does, as the server derived it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidCommit {
    /// The committing device: its leaf's account and device after the
    /// commit (the joiner's new leaf, for an external commit).
    pub sender: DeviceAddr,
    /// The members its Add proposals add, with the keys their leaves carry.
    pub added: Vec<MemberInfo>,
    /// Every leaf after the commit, in leaf order.
    pub members: Vec<DeviceAddr>,
}

/// The public state of one group, as the delivery service keeps it.
#[derive(Debug)]
pub struct PublicState {
    group: PublicGroup,
    storage: MemoryStorage,
}

/// Format version of [`PublicState::to_bytes`].
const STATE_FORMAT: u8 = 1;

/// Largest GroupInfo accepted for a new group: its creator's leaf alone
/// (about 1 KiB) with room to spare, so a tree padded with blank nodes is
/// refused before it is parsed.
const MAX_NEW_GROUP_INFO_BYTES: usize = 2 * umbra_proto::frame::MAX_KEY_PACKAGE_BYTES;

/// Largest leaf a commit may bring into the tree (an added KeyPackage's or
/// the committer's new one): what a KeyPackage upload may be, so no member
/// can grow the state every commit loads and stores.
const MAX_LEAF_BYTES: usize = umbra_proto::frame::MAX_KEY_PACKAGE_BYTES;

fn check_leaf_size(leaf: &LeafNode) -> Result<(), HandshakeError> {
    let size = leaf.tls_serialized_len();
    if size > MAX_LEAF_BYTES {
        return Err(HandshakeError::InvalidCommit(format!(
            "it brings a leaf of {size} bytes into the tree; at most {MAX_LEAF_BYTES}"
        )));
    }
    Ok(())
}

fn parse(bytes: &[u8]) -> Result<MlsMessageIn, HandshakeError> {
    MlsMessageIn::tls_deserialize_exact(bytes).map_err(|e| HandshakeError::Malformed(e.to_string()))
}

impl PublicState {
    /// Starts tracking a new group from its creator's signed GroupInfo at
    /// epoch 0 (with the ratchet tree extension). The group must have its
    /// creator as its only member: the device whose key is `creator_key`,
    /// of the account whose key is `account_key` (the same key for device
    /// 1; another device's leaf carries a certificate under it).
    pub fn from_group_info(
        group_id: &[u8],
        group_info: &[u8],
        creator: &AccountId,
        (creator_key, account_key): (&IdentityKey, &IdentityKey),
    ) -> Result<PublicState, HandshakeError> {
        if group_info.len() > MAX_NEW_GROUP_INFO_BYTES {
            return Err(HandshakeError::InvalidGroupInfo(format!(
                "a new group's GroupInfo is {} bytes; with its creator alone it fits in {MAX_NEW_GROUP_INFO_BYTES}",
                group_info.len()
            )));
        }
        let state = PublicState::observe(group_id, group_info)?;
        let only_leaf_first = state.group.members().all(|member| member.index.u32() == 0);
        if state.epoch() != 0 || !only_leaf_first {
            return Err(HandshakeError::InvalidGroupInfo(
                "a new group starts at epoch 0 with a tree of its creator's leaf alone".into(),
            ));
        }
        match state.leaves()?.as_slice() {
            [only]
                if only.account == *creator
                    && only.identity_key == *creator_key
                    && only.account_key == *account_key =>
            {
                Ok(state)
            }
            _ => Err(HandshakeError::InvalidGroupInfo(
                "a new group has its creator (this account and its identity key) as only member"
                    .into(),
            )),
        }
    }

    /// Starts tracking a group, at any epoch, from a member's signed
    /// GroupInfo with the ratchet tree extension: the signature, the tree
    /// and its hash against the group context are verified.
    pub fn observe(group_id: &[u8], group_info: &[u8]) -> Result<PublicState, HandshakeError> {
        let refuse = |why: &str| HandshakeError::InvalidGroupInfo(why.to_owned());
        let MlsMessageBodyIn::GroupInfo(info) = parse(group_info)?.extract() else {
            return Err(refuse("the MLS message does not carry a GroupInfo"));
        };
        if info.group_id().as_slice() != group_id {
            return Err(refuse("it is for another group"));
        }
        let tree = info
            .extensions()
            .ratchet_tree()
            .ok_or_else(|| refuse("it carries no ratchet tree"))?
            .ratchet_tree()
            .clone();
        let storage = MemoryStorage::default();
        let (group, _) = PublicGroup::from_external(
            &RustCrypto::default(),
            &storage,
            tree,
            info,
            ProposalStore::new(),
        )
        .map_err(|e| HandshakeError::InvalidGroupInfo(format!("{e:?}")))?;
        crate::Suite::from_ciphersuite(group.ciphersuite())
            .ok_or_else(|| refuse("its ciphersuite is not one Umbra offers"))?;
        Ok(PublicState { group, storage })
    }

    /// Checks that `group_info` is `committer`'s signed GroupInfo of exactly
    /// this state: the same group context (epoch, tree hash, transcript),
    /// the same ratchet tree in its extension, byte for byte, and the
    /// external public key a rejoining member needs. One signature check
    /// against the committer's leaf and a comparison, not a verification of
    /// the whole tree again (that cost 50 ms per commit in a group of a
    /// thousand). What the server cannot check (that the external public
    /// key and confirmation tag are the group's) a rejoining device finds
    /// out, like an unprocessable commit.
    pub fn check_group_info(
        &self,
        group_info: &[u8],
        committer: &DeviceAddr,
    ) -> Result<(), HandshakeError> {
        use openmls::prelude::{OpenMlsSignaturePublicKey, Verifiable as _};
        use tls_codec::Serialize as _;
        let refuse = |why: &str| HandshakeError::InvalidCommit(why.to_owned());
        let message = parse(group_info)
            .map_err(|e| refuse(&format!("its GroupInfo is not an MLS message: {e}")))?;
        let MlsMessageBodyIn::GroupInfo(info) = message.extract() else {
            return Err(refuse("its GroupInfo is not an MLS GroupInfo"));
        };
        if info.group_context() != self.group.group_context() {
            return Err(refuse(
                "its GroupInfo is not the group's state after the commit",
            ));
        }
        if info.extensions().external_pub().is_none() {
            return Err(refuse("its GroupInfo carries no external public key"));
        }
        let tree = info
            .extensions()
            .ratchet_tree()
            .ok_or_else(|| refuse("its GroupInfo carries no ratchet tree"))?;
        let theirs = tree.ratchet_tree().tls_serialize_detached();
        let ours = self.group.export_ratchet_tree().tls_serialize_detached();
        if theirs.is_err() || theirs != ours {
            return Err(refuse(
                "its GroupInfo's ratchet tree is not the group's after the commit",
            ));
        }
        // The committing device's own leaf (its account may have others).
        let key = self
            .group
            .members()
            .find(|member| {
                self.member(member.index)
                    .is_some_and(|leaf| leaf.address() == *committer)
            })
            .map(|member| member.signature_key)
            .ok_or_else(|| refuse("the committer has no leaf after its commit"))?;
        let key = OpenMlsSignaturePublicKey::new(
            key.into(),
            self.group.ciphersuite().signature_algorithm(),
        )
        .map_err(|_| refuse("the committer's leaf key is not a signature key"))?;
        info.verify_no_out(&RustCrypto::default(), &key)
            .map_err(|_| refuse("its GroupInfo is not signed by the committer"))
    }

    /// Loads a state written by [`PublicState::to_bytes`].
    pub fn from_bytes(group_id: &[u8], bytes: &[u8]) -> Result<PublicState, HandshakeError> {
        let corrupt = || HandshakeError::State("truncated or corrupt".into());
        let (&format, mut rest) = bytes.split_first().ok_or_else(corrupt)?;
        if format != STATE_FORMAT {
            return Err(HandshakeError::State(format!("unknown format {format}")));
        }
        let take = |rest: &mut &[u8]| -> Result<Vec<u8>, HandshakeError> {
            let (length, tail) = rest.split_first_chunk::<4>().ok_or_else(corrupt)?;
            let length = u32::from_be_bytes(*length) as usize;
            let (value, tail) = tail.split_at_checked(length).ok_or_else(corrupt)?;
            *rest = tail;
            Ok(value.to_vec())
        };
        let mut values = HashMap::new();
        while !rest.is_empty() {
            let key = take(&mut rest)?;
            let value = take(&mut rest)?;
            values.insert(key, value);
        }
        let storage = MemoryStorage {
            values: values.into(),
        };
        let group = PublicGroup::load(&storage, &GroupId::from_slice(group_id))
            .map_err(|e| HandshakeError::State(format!("{e:?}")))?
            .ok_or_else(|| HandshakeError::State("no group in it".into()))?;
        Ok(PublicState { group, storage })
    }

    /// The state as bytes, for the server's store (keys in order, so the
    /// same state always gives the same bytes).
    pub fn to_bytes(&self) -> Vec<u8> {
        let values = match self.storage.values.read() {
            Ok(values) => values,
            Err(poisoned) => poisoned.into_inner(),
        };
        let sorted: BTreeMap<&Vec<u8>, &Vec<u8>> = values.iter().collect();
        let mut out = vec![STATE_FORMAT];
        for (key, value) in sorted {
            for field in [key, value] {
                // Entries are a tree, a context or a tag: far below 4 GiB.
                out.extend_from_slice(&(field.len() as u32).to_be_bytes());
                out.extend_from_slice(field);
            }
        }
        out
    }

    pub fn epoch(&self) -> u64 {
        self.group.group_context().epoch().as_u64()
    }

    /// Every leaf of the tree, in leaf order; a leaf whose credential is
    /// not an Umbra account makes the state invalid for Umbra.
    fn leaves(&self) -> Result<Vec<MemberInfo>, HandshakeError> {
        self.group
            .members()
            .map(|member| {
                let leaf = self
                    .group
                    .leaf(member.index)
                    .ok_or_else(|| HandshakeError::State("a member without a leaf".into()))?;
                leaf_member(leaf).map_err(HandshakeError::InvalidCommit)
            })
            .collect()
    }

    fn process(&self, bytes: &[u8]) -> Result<ProcessedMessage, HandshakeError> {
        let message = parse(bytes)?
            .try_into_protocol_message()
            .map_err(|_| HandshakeError::Malformed("not a protocol message".into()))?;
        let ProtocolMessage::PublicMessage(_) = &message else {
            return Err(HandshakeError::Malformed(
                "handshake messages must be MLS PublicMessages".into(),
            ));
        };
        let epoch = message.epoch().as_u64();
        if epoch != self.epoch() {
            return Err(HandshakeError::WrongEpoch {
                message: epoch,
                group: self.epoch(),
            });
        }
        self.group
            .process_message(&RustCrypto::default(), message)
            .map_err(|e| HandshakeError::InvalidCommit(format!("{e:?}")))
    }

    fn sender_account(processed: &ProcessedMessage) -> Result<AccountId, HandshakeError> {
        account_of(processed.credential()).map_err(|_| {
            HandshakeError::Malformed("the sender's credential is not an Umbra account ID".into())
        })
    }

    /// The Umbra member at `leaf`, if that leaf reads as one.
    fn member(&self, leaf: openmls::prelude::LeafNodeIndex) -> Option<MemberInfo> {
        self.group
            .leaf(leaf)
            .and_then(|leaf| leaf_member(leaf).ok())
    }

    /// Validates a standalone proposal for the current epoch: it must be
    /// signed by a member, propose that member's own removal, and be its
    /// first in this epoch (`stored` are the epoch's accepted proposals), so
    /// the proposals a commit replays stay at most one per member. Returns
    /// the leaving member device.
    pub fn check_proposal(
        &self,
        bytes: &[u8],
        stored: &[Vec<u8>],
    ) -> Result<DeviceAddr, HandshakeError> {
        let refuse = |why: &str| HandshakeError::InvalidProposal(why.to_owned());
        let processed = self.process(bytes).map_err(|error| match error {
            HandshakeError::InvalidCommit(why) => HandshakeError::InvalidProposal(why),
            other => other,
        })?;
        let sender = Self::sender_account(&processed)?;
        let Sender::Member(sender_leaf) = *processed.sender() else {
            return Err(refuse("only a member may propose"));
        };
        let ProcessedMessageContent::ProposalMessage(queued) = processed.into_content() else {
            return Err(refuse("not a proposal"));
        };
        if !matches!(queued.proposal(), Proposal::Remove(remove) if remove.removed() == sender_leaf)
        {
            return Err(refuse(
                "a proposal on its own may only be a member leaving; other changes are made by their author's own commit",
            ));
        }
        let proposed_before = stored.iter().any(|earlier| {
            self.process(earlier)
                .is_ok_and(|earlier| *earlier.sender() == Sender::Member(sender_leaf))
        });
        if proposed_before {
            return Err(refuse("this member already proposed leaving in this epoch"));
        }
        self.member(sender_leaf)
            .filter(|member| member.account == sender)
            .map(|member| member.address())
            .ok_or_else(|| refuse("the proposer's leaf is not an Umbra member's"))
    }

    /// Validates a commit for the current epoch and returns what it does
    /// with the state of the next epoch. `proposals` are the standalone
    /// proposals accepted in this epoch (in order), which the commit may
    /// reference; `welcome` must go to exactly the members it adds.
    ///
    /// Checked: the MLS validation openmls does without the group's
    /// secrets (signature by the sender's leaf, every proposal against the
    /// tree, the update path's shape and leaf), then Umbra's policy: inline
    /// only the committer's own adds, removals and timer; by reference only
    /// members' own removals; every leaf after it is one that was there
    /// with the same account and key, or one the commit adds (so nobody
    /// changes a credential, and an external commit is only a member
    /// rejoining with its own key, replacing its old leaf); no account
    /// holds two leaves.
    pub fn process_commit(
        mut self,
        bytes: &[u8],
        proposals: &[Vec<u8>],
        welcome: Option<&[u8]>,
    ) -> Result<(ValidCommit, PublicState), HandshakeError> {
        let crypto = RustCrypto::default();
        for proposal in proposals {
            // Accepted in this epoch already; one that no longer applies
            // is simply not available to the commit.
            let Ok(processed) = self.process(proposal) else {
                continue;
            };
            if let ProcessedMessageContent::ProposalMessage(queued) = processed.into_content() {
                self.group
                    .add_proposal(&self.storage, *queued)
                    .map_err(|e| HandshakeError::State(format!("{e:?}")))?;
            }
        }
        let processed = self.process(bytes)?;
        let sender = Self::sender_account(&processed)?;
        let sender_leaf = match processed.sender() {
            Sender::Member(index) => Some(*index),
            _ => None,
        };
        let external = sender_leaf.is_none();
        let ProcessedMessageContent::StagedCommitMessage(staged) = processed.into_content() else {
            return Err(HandshakeError::InvalidCommit("not a commit".into()));
        };
        let refuse = |why: String| HandshakeError::InvalidCommit(why);
        let path_leaf = match staged.update_path_leaf_node() {
            Some(leaf) => {
                check_leaf_size(leaf)?;
                Some(leaf_member(leaf).map_err(refuse)?)
            }
            None => None,
        };
        // The committing device: its leaf's, or (joining from outside) the
        // leaf it brings. A path keeps the committer's account and device.
        let committer = match (sender_leaf, &path_leaf) {
            (Some(index), _) => self.member(index).ok_or_else(|| {
                refuse("the committer's leaf is not an Umbra member's".to_owned())
            })?,
            (None, Some(leaf)) => leaf.clone(),
            (None, None) => {
                return Err(refuse(
                    "an external commit must bring the joiner's leaf".to_owned(),
                ));
            }
        };
        if committer.account != sender
            || path_leaf.as_ref().is_some_and(|leaf| {
                leaf.address() != committer.address() || leaf.account_key != committer.account_key
            })
        {
            return Err(refuse(format!(
                "{sender}'s commit gives its leaf another account or device"
            )));
        }
        let committer = committer.address();
        for queued in staged.queued_proposals() {
            check_policy(queued, &committer, external, |leaf| {
                self.member(leaf).map(|member| member.address())
            })
            .map_err(refuse)?;
        }
        let before = self.leaves()?;
        let mut added = Vec::new();
        let mut added_refs = BTreeSet::new();
        for add in staged.add_proposals() {
            let key_package = add.add_proposal().key_package();
            let leaf = key_package.leaf_node();
            check_leaf_size(leaf)?;
            let member = leaf_member(leaf).map_err(refuse)?;
            let reference = key_package
                .hash_ref(&crypto)
                .map_err(|e| HandshakeError::State(format!("{e:?}")))?;
            if before.iter().chain(&added).any(|old| {
                old.address() == member.address() || old.identity_key == member.identity_key
            }) {
                // Removed and added in one commit, its Welcome would go to
                // a device the routing still counts as a member; the
                // others would see no change at all.
                return Err(refuse(format!(
                    "it adds {}, a member device already (or its key): remove first, add in a later commit",
                    member.address()
                )));
            }
            added_refs.insert(reference.as_slice().to_vec());
            added.push(member);
        }
        check_welcome(welcome, &added_refs)?;
        self.group
            .merge_commit(&self.storage, *staged)
            .map_err(|e| HandshakeError::State(format!("{e:?}")))?;
        let after = self.leaves()?;
        let mut devices = BTreeSet::new();
        let mut keys = BTreeSet::new();
        for member in &after {
            if !devices.insert(member.address()) || !keys.insert(*member.identity_key.as_bytes()) {
                return Err(refuse(format!(
                    "after it {} would hold two leaves",
                    member.address()
                )));
            }
            if !before.contains(member) && !added.contains(member) {
                return Err(refuse(format!(
                    "it gives {} a leaf with another credential or key than it had",
                    member.account
                )));
            }
        }
        let members = after.iter().map(MemberInfo::address).collect();
        Ok((
            ValidCommit {
                sender: committer,
                added,
                members,
            },
            self,
        ))
    }
}

/// Umbra's rule for one proposal a commit carries.
fn check_policy(
    queued: &QueuedProposal,
    committer: &DeviceAddr,
    external: bool,
    member: impl Fn(openmls::prelude::LeafNodeIndex) -> Option<DeviceAddr>,
) -> std::result::Result<(), String> {
    match queued.proposal_or_ref_type() {
        // Inline: the committer's own act.
        ProposalOrRefType::Proposal => match queued.proposal() {
            Proposal::Add(_) | Proposal::Remove(_) | Proposal::GroupContextExtensions(_)
                if !external =>
            {
                Ok(())
            }
            Proposal::ExternalInit(_) if external => Ok(()),
            Proposal::Remove(remove) if external => {
                // A rejoining device removes only its own old leaf (its
                // account's other devices keep theirs).
                if member(remove.removed()).as_ref() == Some(committer) {
                    Ok(())
                } else {
                    Err("an external commit may remove only the joiner's old leaf".into())
                }
            }
            other => Err(format!(
                "Umbra does not use {:?} proposals",
                other.proposal_type()
            )),
        },
        // By reference: only another member's own removal.
        ProposalOrRefType::Reference => match (queued.sender(), queued.proposal()) {
            (Sender::Member(author), Proposal::Remove(remove)) if *author == remove.removed() => {
                Ok(())
            }
            _ => Err("a commit may carry by reference only members' removals of themselves".into()),
        },
    }
}

/// A Welcome must go to exactly the KeyPackages the commit adds.
fn check_welcome(welcome: Option<&[u8]>, added: &BTreeSet<Vec<u8>>) -> Result<(), HandshakeError> {
    let refuse = |why: &str| HandshakeError::InvalidWelcome(why.to_owned());
    let Some(welcome) = welcome else {
        return if added.is_empty() {
            Ok(())
        } else {
            Err(refuse("the commit adds members but carries no Welcome"))
        };
    };
    if added.is_empty() {
        return Err(refuse("the commit adds nobody, so it has no Welcome"));
    }
    let MlsMessageBodyIn::Welcome(welcome) = parse(welcome)
        .map_err(|e| HandshakeError::InvalidWelcome(e.to_string()))?
        .extract()
    else {
        return Err(refuse("the MLS message does not carry a Welcome"));
    };
    let recipients: BTreeSet<Vec<u8>> = welcome
        .secrets()
        .iter()
        .map(|secrets| secrets.new_member().as_slice().to_vec())
        .collect();
    if recipients.len() != welcome.secrets().len() || &recipients != added {
        return Err(refuse(
            "it is not addressed to exactly the KeyPackages the commit adds",
        ));
    }
    Ok(())
}

impl From<HandshakeError> for MlsError {
    fn from(error: HandshakeError) -> Self {
        MlsError::Protocol(error.to_string())
    }
}

/// The GroupInfo check a `CreateGroup` gets, on arbitrary bytes: a fuzz
/// entry point (the creator named is fixed, so most inputs fail there).
pub fn fuzz_group_info(bytes: &[u8]) -> bool {
    let (Ok(account), Ok(key)) = (
        AccountId::parse("AAAAAAAA"),
        IdentityKey::from_slice(&[0; 32]),
    ) else {
        return false;
    };
    PublicState::from_group_info(&[0; 16], bytes, &account, (&key, &key)).is_ok()
}
