//! What a device refuses from a misbehaving member even when the delivery
//! service lets it through (a hostile server): a commit that gives the
//! committer's leaf another account, and proposals for others' changes.

use openmls_rust_crypto::RustCrypto;
use rusqlite::Connection;
use umbra_mls::{DeviceSigner, Group, GroupConfig, Incoming, MlsError, Provider, new_key_package};
use umbra_proto::AccountId;

struct Device {
    account: AccountId,
    signer: DeviceSigner,
    crypto: RustCrypto,
    db: Connection,
}

impl Device {
    fn new(id: &str, seed: u8) -> Device {
        let mut db = Connection::open_in_memory().unwrap();
        umbra_mls::init_storage(&mut db).unwrap();
        Device {
            account: AccountId::parse(id).unwrap(),
            signer: DeviceSigner::from_secret(&[seed; 32]),
            crypto: RustCrypto::default(),
            db,
        }
    }

    fn provider(&self) -> Provider<'_> {
        Provider::new(&self.crypto, &self.db)
    }
}

/// Mallory's group with Bob in it, as each holds it.
fn pair() -> (Device, Group, Device, Group) {
    let mallory = Device::new("MMMMMMMM", 1);
    let bob = Device::new("BBBBBBBB", 2);
    let config = GroupConfig::default();
    let mut group = Group::create(
        &mallory.provider(),
        &mallory.signer,
        &mallory.account,
        &config,
        0,
    )
    .unwrap();
    let bob_key_package = new_key_package(
        &bob.provider(),
        &bob.signer,
        &bob.account,
        Default::default(),
        false,
    )
    .unwrap();
    let added = group
        .add_members(&mallory.provider(), &mallory.signer, &[bob_key_package])
        .unwrap();
    group.merge_pending_commit(&mallory.provider()).unwrap();
    let (bobs, _) = Group::join(&bob.provider(), &added.welcome.unwrap(), &config).unwrap();
    (mallory, group, bob, bobs)
}

#[test]
fn a_commit_renaming_its_senders_leaf_is_not_applied() {
    let (mallory, mut group, bob, mut bobs) = pair();
    let carol = AccountId::parse("CCCCCCCC").unwrap();
    let renamed = group
        .update_as(&mallory.provider(), &mallory.signer, &carol)
        .unwrap();
    let refused = bobs.process(&bob.provider(), &renamed.commit).unwrap_err();
    assert!(matches!(refused, MlsError::Protocol(_)), "{refused}");
    // Bob's state did not move (the caller's transaction rolls back, but
    // the group as loaded is already unchanged).
    let reloaded = Group::load(&bob.provider(), &bobs.id()).unwrap().unwrap();
    assert_eq!(reloaded.epoch(), 1);
    assert_eq!(
        reloaded.accounts(),
        vec![mallory.account.clone(), bob.account.clone()]
    );
}

#[test]
fn proposals_for_others_changes_are_not_stored() {
    let (mallory, mut group, bob, mut bobs) = pair();
    let removal = group
        .propose_removal(&mallory.provider(), &mallory.signer, &bob.account)
        .unwrap();
    assert_eq!(
        bobs.process(&bob.provider(), &removal).unwrap(),
        Incoming::RefusedProposal {
            sender: mallory.account.clone()
        }
    );
    assert!(
        !bobs.has_pending_proposals(),
        "nothing left to be laundered"
    );
    let timer = group
        .propose_disappear_after(&mallory.provider(), &mallory.signer, 0)
        .unwrap();
    assert!(matches!(
        bobs.process(&bob.provider(), &timer).unwrap(),
        Incoming::RefusedProposal { .. }
    ));
    assert!(!bobs.has_pending_proposals());
    let leaving = group.leave(&mallory.provider(), &mallory.signer).unwrap();
    assert!(matches!(
        bobs.process(&bob.provider(), &leaving).unwrap(),
        Incoming::Leaving { .. }
    ));
    assert!(bobs.has_pending_proposals(), "a member leaving is kept");
}

/// What the server checks of an uploaded KeyPackage beyond its signature:
/// the credential is the account ID byte for byte (it was parsed, so a
/// lower-case one passed and members comparing bytes saw another name),
/// and the leaf can take the extensions every Umbra group requires (a
/// package without them passed, to fail at whoever fetched it).
#[test]
fn key_packages_with_a_loose_credential_or_no_capabilities_are_refused() {
    let device = Device::new("KKKKKKKK", 9);
    let provider = device.provider();
    let valid = umbra_mls::odd_key_package(&provider, &device.signer, "KKKKKKKK", false).unwrap();
    let checked = umbra_mls::validate_key_package(&valid).unwrap();
    assert_eq!(checked.account, device.account);
    for (identity, bare, why) in [
        ("kkkkkkkk", false, "canonical"),
        (" KKKKKKKK", false, "canonical"),
        ("KKKKKKKK", true, "capabilities"),
    ] {
        let odd = umbra_mls::odd_key_package(&provider, &device.signer, identity, bare).unwrap();
        match umbra_mls::validate_key_package(&odd) {
            Err(MlsError::InvalidKeyPackage(message)) => {
                assert!(message.contains(why), "{identity:?}: {message}")
            }
            other => panic!("{identity:?} bare={bare}: {other:?}"),
        }
    }
}
