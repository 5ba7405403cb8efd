//! Group behaviour through umbra-mls alone: each device has its own SQLite
//! storage, and messages move between them as bytes, as the server moves them.

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

    fn key_package(&self) -> Vec<u8> {
        new_key_package(
            &self.provider(),
            &self.signer,
            &self.account,
            Default::default(),
            false,
        )
        .unwrap()
    }

    /// A new group of this device's (timer off), and the delivery
    /// service's view of it.
    fn watched_group(&self, config: &GroupConfig) -> (Group, umbra_mls::PublicState) {
        let group =
            Group::create(&self.provider(), &self.signer, &self.account, config, 0).unwrap();
        let key = self.signer.identity_key();
        let public = umbra_mls::PublicState::from_group_info(
            &group.id(),
            &group.group_info(&self.provider(), &self.signer).unwrap(),
            &self.account,
            (&key, &key),
        )
        .unwrap();
        (group, public)
    }

    fn group(&self, id: &[u8]) -> Group {
        Group::load(&self.provider(), id).unwrap().unwrap()
    }
}

fn text(incoming: Incoming) -> Vec<u8> {
    match incoming {
        Incoming::Application { plaintext, .. } => plaintext,
        other => panic!("expected an application message, got {other:?}"),
    }
}

#[test]
fn add_message_remove_and_late_messages() {
    let alice = Device::new("AAAAAAAA", 1);
    let bob = Device::new("BBBBBBBB", 2);
    let carol = Device::new("CCCCCCCC", 3);
    let config = GroupConfig::default();

    let mut group = Group::create(
        &alice.provider(),
        &alice.signer,
        &alice.account,
        &config,
        30,
    )
    .unwrap();
    let id = group.id();
    let kp = umbra_mls::validate_key_package(&bob.key_package()).unwrap();
    assert_eq!(kp.account, bob.account);
    assert_eq!(kp.identity_key, bob.signer.identity_key());

    let out = group
        .add_members(
            &alice.provider(),
            &alice.signer,
            &[bob.key_package(), carol.key_package()],
        )
        .unwrap();
    assert_eq!(out.epoch, 0);
    let header = umbra_mls::message_header(&out.commit).unwrap();
    assert_eq!((header.group_id.clone(), header.epoch), (id.clone(), 0));
    group.merge_pending_commit(&alice.provider()).unwrap();
    let welcome = out.welcome.unwrap();
    let (_, inviter) = Group::join(&bob.provider(), &welcome, &config).unwrap();
    assert_eq!(inviter, alice.account);
    Group::join(&carol.provider(), &welcome, &config).unwrap();
    assert_eq!(bob.group(&id).members().len(), 3);

    // A message encrypted in epoch 1 arrives only after the removal commit.
    let late = group
        .encrypt(&alice.provider(), &alice.signer, b"late but readable")
        .unwrap();
    let removal = group
        .remove_members(
            &alice.provider(),
            &alice.signer,
            std::slice::from_ref(&carol.account),
        )
        .unwrap();
    group.merge_pending_commit(&alice.provider()).unwrap();
    let after = group
        .encrypt(&alice.provider(), &alice.signer, b"after removal")
        .unwrap();

    let mut bobs = bob.group(&id);
    let commit = bobs.process(&bob.provider(), &removal.commit).unwrap();
    assert!(matches!(
        commit,
        Incoming::Commit {
            epoch: 2,
            removed_self: false,
            ..
        }
    ));
    assert_eq!(
        text(bobs.process(&bob.provider(), &late).unwrap()),
        b"late but readable"
    );
    assert_eq!(
        text(bobs.process(&bob.provider(), &after).unwrap()),
        b"after removal"
    );

    // A removed member who ignores her removal still holds epoch-1 secrets
    // only: the epoch-2 message is beyond her reach.
    let mut carols = carol.group(&id);
    assert_eq!(carols.epoch(), 1);
    assert!(carols.process(&carol.provider(), &after).is_err());
    let mut carols = carol.group(&id);
    let commit = carols.process(&carol.provider(), &removal.commit).unwrap();
    assert!(matches!(
        commit,
        Incoming::Commit {
            removed_self: true,
            ..
        }
    ));
    assert!(!carols.is_active());
    assert!(matches!(
        carols.process(&carol.provider(), &after),
        Err(MlsError::NotActive)
    ));
    // (That she cannot read epoch-2 traffic even if she ignores her removal
    // is checked above, on her own state from before the removal: a
    // brand-new device holding no group at all would prove nothing.)
    // Her stored state after the removal cannot either.
    let mut carols = carol.group(&id);
    assert!(carols.process(&carol.provider(), &after).is_err());
}

#[test]
fn competing_commits_one_wins_the_other_is_cleared() {
    let alice = Device::new("AAAAAAAA", 1);
    let bob = Device::new("BBBBBBBB", 2);
    let config = GroupConfig::default();
    let mut alices = Group::create(
        &alice.provider(),
        &alice.signer,
        &alice.account,
        &config,
        30,
    )
    .unwrap();
    let id = alices.id();
    let out = alices
        .add_members(&alice.provider(), &alice.signer, &[bob.key_package()])
        .unwrap();
    alices.merge_pending_commit(&alice.provider()).unwrap();
    Group::join(&bob.provider(), &out.welcome.unwrap(), &config).unwrap();

    // The disappearing timer lives in the group context: the joiner sees
    // the creator's, and a commit changes it for everyone.
    let mut bobs = bob.group(&id);
    assert_eq!(bobs.disappear_after(), 30);
    let timer = alices
        .set_disappear_after(&alice.provider(), &alice.signer, 3600)
        .unwrap();
    alices.merge_pending_commit(&alice.provider()).unwrap();
    bobs.process(&bob.provider(), &timer.commit).unwrap();
    assert_eq!(
        (alices.disappear_after(), bobs.disappear_after()),
        (3600, 3600)
    );

    let alice_update = alices
        .self_update(&alice.provider(), &alice.signer)
        .unwrap();
    let bob_update = bobs.self_update(&bob.provider(), &bob.signer).unwrap();
    assert_eq!(alice_update.epoch, bob_update.epoch);
    // The delivery service took Alice's; Bob processes it, dropping his own.
    alices.merge_pending_commit(&alice.provider()).unwrap();
    bobs.process(&bob.provider(), &alice_update.commit).unwrap();
    assert!(!bobs.has_pending_commit());
    assert_eq!(bobs.epoch(), alices.epoch());
    let retry = bobs.self_update(&bob.provider(), &bob.signer).unwrap();
    bobs.merge_pending_commit(&bob.provider()).unwrap();
    alices.process(&alice.provider(), &retry.commit).unwrap();
    let hello = bobs
        .encrypt(&bob.provider(), &bob.signer, b"converged")
        .unwrap();
    assert_eq!(
        text(alices.process(&alice.provider(), &hello).unwrap()),
        b"converged"
    );
}

#[test]
fn garbage_is_a_typed_error() {
    assert!(matches!(
        umbra_mls::message_header(b"\x00\x01garbage"),
        Err(MlsError::Malformed(_))
    ));
    assert!(matches!(
        umbra_mls::validate_key_package(&[0u8; 40]),
        Err(MlsError::InvalidKeyPackage(_))
    ));
}

/// A device other than an account's first carries its certificate (the
/// account key and the log entry that added it) in its leaf: accepted by
/// the delivery service's checks, readable by members, kept when the
/// device updates its keys.
#[test]
fn a_device_certificate_travels_in_its_leaf() {
    use umbra_mls::{DeviceCertificate, DeviceLog, FIRST_DEVICE};
    let alice = Device::new("AAAAAAAA", 1);
    // Bob's second device: its own key, added to Bob's log by his first.
    let bob_account = DeviceSigner::from_secret(&[2; 32]);
    let bob2 = Device::new("BBBBBBBB", 22);
    let mut log = DeviceLog::new(bob2.account.clone(), bob_account.identity_key());
    log.append(log.first_entry(&bob_account, "phone", 1), None)
        .unwrap();
    let add = log.add_entry(
        &bob_account,
        (FIRST_DEVICE, &bob_account),
        &bob2.signer,
        "laptop",
        2,
    );
    log.append(add.clone(), None).unwrap();
    let certificate = DeviceCertificate {
        account_key: bob_account.identity_key(),
        entry: add,
    };
    let package = umbra_mls::new_device_key_package(
        &bob2.provider(),
        &bob2.signer,
        &bob2.account,
        Default::default(),
        false,
        Some(&certificate),
    )
    .unwrap();
    let valid = umbra_mls::validate_key_package(&package).unwrap();
    assert_eq!(valid.certificate.as_ref(), Some(&certificate));
    assert!(certificate.certifies(&bob2.account, &bob2.signer.identity_key()));

    let config = GroupConfig::default();
    let (mut group, public) = alice.watched_group(&config);
    let id = group.id();
    let out = group
        .add_members(&alice.provider(), &alice.signer, &[package])
        .unwrap();
    let (valid, public) = public
        .process_commit(&out.commit, &[], out.welcome.as_deref())
        .unwrap();
    assert_eq!(valid.added[0].identity_key, bob2.signer.identity_key());
    group.merge_pending_commit(&alice.provider()).unwrap();
    Group::join(&bob2.provider(), &out.welcome.unwrap(), &config).unwrap();
    let bob2_key = bob2.signer.identity_key();
    assert_eq!(
        group.device_certificate(&bob2_key).unwrap(),
        Some(certificate.clone())
    );
    assert_eq!(
        group
            .device_certificate(&alice.signer.identity_key())
            .unwrap(),
        None,
        "a first device carries none"
    );
    // Members see the account key the leaf claims: the certificate's for
    // Bob's device, the leaf's own for a first device.
    let claimed: Vec<_> = group
        .members()
        .into_iter()
        .map(|m| (m.account, m.identity_key, m.account_key))
        .collect();
    assert_eq!(
        claimed,
        [
            (
                alice.account.clone(),
                alice.signer.identity_key(),
                alice.signer.identity_key()
            ),
            (bob2.account.clone(), bob2_key, bob_account.identity_key()),
        ]
    );

    // Bob's device updates its keys: its leaf keeps the certificate.
    let mut bobs = bob2.group(&id);
    let update = bobs.self_update(&bob2.provider(), &bob2.signer).unwrap();
    public.process_commit(&update.commit, &[], None).unwrap();
    bobs.merge_pending_commit(&bob2.provider()).unwrap();
    assert!(matches!(
        group.process(&alice.provider(), &update.commit).unwrap(),
        Incoming::Commit { epoch: 2, .. }
    ));
    assert_eq!(
        group.device_certificate(&bob2_key).unwrap(),
        Some(certificate)
    );
    let hello = bobs
        .encrypt(&bob2.provider(), &bob2.signer, b"from the laptop")
        .unwrap();
    assert_eq!(
        text(group.process(&alice.provider(), &hello).unwrap()),
        b"from the laptop"
    );
}

/// A leaf whose device certificate does not bind its key to its account is
/// refused everywhere it could come in: by the delivery service's commit
/// checks, by a member processing the commit, by the device joining.
#[test]
fn a_leaf_with_a_certificate_that_binds_nothing_is_refused() {
    use umbra_mls::{DeviceCertificate, DeviceLog, HandshakeError};
    let alice = Device::new("AAAAAAAA", 1);
    let carol = Device::new("CCCCCCCC", 3);
    let bob_account = DeviceSigner::from_secret(&[2; 32]);
    let bob2 = Device::new("BBBBBBBB", 22);
    let log = DeviceLog::new(bob2.account.clone(), bob_account.identity_key());
    // Device 1's entry: a real one, signed by Bob's account key, but it
    // adds the account key, not this device's.
    let certificate = DeviceCertificate {
        account_key: bob_account.identity_key(),
        entry: log.first_entry(&bob_account, "phone", 1),
    };
    let package = umbra_mls::new_device_key_package(
        &bob2.provider(),
        &bob2.signer,
        &bob2.account,
        Default::default(),
        false,
        Some(&certificate),
    )
    .unwrap();

    let config = GroupConfig::default();
    let (mut group, public) = alice.watched_group(&config);
    let id = group.id();
    let with_carol = group
        .add_members(&alice.provider(), &alice.signer, &[carol.key_package()])
        .unwrap();
    let (_, public) = public
        .process_commit(&with_carol.commit, &[], with_carol.welcome.as_deref())
        .unwrap();
    group.merge_pending_commit(&alice.provider()).unwrap();
    Group::join(&carol.provider(), &with_carol.welcome.unwrap(), &config).unwrap();

    let out = group
        .add_members(&alice.provider(), &alice.signer, &[package])
        .unwrap();
    match public.process_commit(&out.commit, &[], out.welcome.as_deref()) {
        Err(HandshakeError::InvalidCommit(why)) => assert!(why.contains("does not bind"), "{why}"),
        other => panic!("the delivery service took it: {other:?}"),
    }
    let mut carols = carol.group(&id);
    match carols.process(&carol.provider(), &out.commit) {
        Err(MlsError::Protocol(why)) => assert!(why.contains("does not bind"), "{why}"),
        other => panic!("a member took it: {other:?}"),
    }
    assert_eq!(
        carol.group(&id).epoch(),
        1,
        "the member's state did not move"
    );
    group.merge_pending_commit(&alice.provider()).unwrap();
    match Group::join(&bob2.provider(), &out.welcome.unwrap(), &config) {
        Err(MlsError::Protocol(why)) => assert!(why.contains("does not bind"), "{why}"),
        other => panic!("the device joined: {other:?}"),
    }
    assert!(
        Group::load(&bob2.provider(), &id).unwrap().is_none(),
        "nothing of the group is left on the device"
    );
}

/// A Welcome into a tree where one account holds two leaves (a server's
/// own "Bob" beside the real one, the forged one signing as inviter) is
/// refused: the leaf a device checks for an account is then its only one.
#[test]
fn a_welcome_into_a_tree_with_two_leaves_of_one_account_is_refused() {
    let alice = Device::new("AAAAAAAA", 1);
    let bob = Device::new("BBBBBBBB", 2);
    let forged_bob = Device::new("BBBBBBBB", 99);
    let config = GroupConfig::default();
    let mut group = Group::create(
        &forged_bob.provider(),
        &forged_bob.signer,
        &forged_bob.account,
        &config,
        0,
    )
    .unwrap();
    let out = group
        .add_members(
            &forged_bob.provider(),
            &forged_bob.signer,
            &[bob.key_package(), alice.key_package()],
        )
        .unwrap();
    let id = group.id();
    match Group::join(&alice.provider(), &out.welcome.unwrap(), &config) {
        Err(MlsError::Protocol(why)) => assert!(why.contains("two leaves for BBBBBBBB/1"), "{why}"),
        other => panic!("joined: {other:?}"),
    }
    assert!(Group::load(&alice.provider(), &id).unwrap().is_none());
}

/// Device 2 of the account whose device-1 key is `account_key`, added to
/// the account's log by device 1, and a KeyPackage of it carrying its
/// certificate.
fn second_device(account_key: &DeviceSigner, id: &str, seed: u8) -> (Device, Vec<u8>) {
    use umbra_mls::{DeviceCertificate, DeviceLog, FIRST_DEVICE};
    let device = Device::new(id, seed);
    let mut log = DeviceLog::new(device.account.clone(), account_key.identity_key());
    log.append(log.first_entry(account_key, "phone", 1), None)
        .unwrap();
    let entry = log.add_entry(
        account_key,
        (FIRST_DEVICE, account_key),
        &device.signer,
        "laptop",
        2,
    );
    let certificate = DeviceCertificate {
        account_key: account_key.identity_key(),
        entry,
    };
    let package = umbra_mls::new_device_key_package(
        &device.provider(),
        &device.signer,
        &device.account,
        Default::default(),
        false,
        Some(&certificate),
    )
    .unwrap();
    (device, package)
}

/// An account has a leaf per device in a group: each device reads every
/// member's messages and its own account's other devices' too; no device
/// (and no key) gets two leaves; removing the account removes every leaf
/// of it. The delivery service and the members agree on each step.
#[test]
fn each_device_of_an_account_has_its_own_leaf() {
    use umbra_mls::HandshakeError;
    use umbra_proto::{DeviceAddr, DeviceId};
    let phone = Device::new("AAAAAAAA", 1);
    let (laptop, laptop_package) = second_device(&phone.signer, "AAAAAAAA", 11);
    let bob = Device::new("BBBBBBBB", 2);
    let config = GroupConfig::default();
    let (mut group, public) = phone.watched_group(&config);
    let id = group.id();

    let out = group
        .add_members(
            &phone.provider(),
            &phone.signer,
            &[laptop_package, bob.key_package()],
        )
        .unwrap();
    let (valid, public) = public
        .process_commit(&out.commit, &[], out.welcome.as_deref())
        .unwrap();
    let (alice_1, alice_2, bob_1) = (
        DeviceAddr::first(phone.account.clone()),
        DeviceAddr::new(phone.account.clone(), DeviceId(2)),
        DeviceAddr::first(bob.account.clone()),
    );
    assert_eq!(valid.sender, alice_1);
    assert_eq!(
        valid.members,
        [alice_1.clone(), alice_2.clone(), bob_1.clone()]
    );
    group.merge_pending_commit(&phone.provider()).unwrap();
    let welcome = out.welcome.unwrap();
    let (mut laptops, _) = Group::join(&laptop.provider(), &welcome, &config).unwrap();
    let (mut bobs, _) = Group::join(&bob.provider(), &welcome, &config).unwrap();
    assert_eq!(
        bobs.accounts(),
        [phone.account.clone(), bob.account.clone()]
    );

    // Bob's message reaches both of Alice's devices; the laptop's reaches
    // her phone (and Bob), each telling which device sent it.
    let hello = bobs
        .encrypt(&bob.provider(), &bob.signer, b"hi Alice")
        .unwrap();
    for (device, group) in [(&phone, &mut group), (&laptop, &mut laptops)] {
        assert_eq!(
            text(group.process(&device.provider(), &hello).unwrap()),
            b"hi Alice"
        );
    }
    let own = laptops
        .encrypt(&laptop.provider(), &laptop.signer, b"from my laptop")
        .unwrap();
    assert_eq!(
        text(group.process(&phone.provider(), &own).unwrap()),
        b"from my laptop"
    );

    // The laptop commits: the committer is its device, and its GroupInfo
    // is checked against its own leaf, not its account's first.
    let update = laptops
        .self_update(&laptop.provider(), &laptop.signer)
        .unwrap();
    let (valid, public) = public.process_commit(&update.commit, &[], None).unwrap();
    assert_eq!(valid.sender, alice_2);
    public
        .check_group_info(&update.group_info, &alice_2)
        .unwrap();
    assert!(
        public
            .check_group_info(&update.group_info, &alice_1)
            .is_err(),
        "signed by the laptop's leaf, not the phone's"
    );
    laptops.merge_pending_commit(&laptop.provider()).unwrap();
    for (device, group) in [(&phone, &mut group), (&bob, &mut bobs)] {
        assert!(matches!(
            group.process(&device.provider(), &update.commit).unwrap(),
            Incoming::Commit { .. }
        ));
    }

    // Another leaf for device 2 (a certificate from a fork of the log,
    // another key): refused by the delivery service and by the members.
    // (openmls itself refuses a key already in the tree.)
    let (_, forked) = second_device(&phone.signer, "AAAAAAAA", 12);
    let again = group
        .add_members(&phone.provider(), &phone.signer, &[forked])
        .unwrap();
    let kept = public.to_bytes();
    match public.process_commit(&again.commit, &[], again.welcome.as_deref()) {
        Err(HandshakeError::InvalidCommit(why)) => {
            assert!(why.contains("a member device already"), "{why}")
        }
        other => panic!("the delivery service took it: {other:?}"),
    }
    match bobs.process(&bob.provider(), &again.commit) {
        Err(MlsError::Protocol(why)) => assert!(why.contains("a member device already"), "{why}"),
        other => panic!("a member took it: {other:?}"),
    }
    group.clear_pending_commit(&phone.provider()).unwrap();

    // Bob removes Alice's account: both of her leaves go.
    let removal = bobs
        .remove_members(
            &bob.provider(),
            &bob.signer,
            std::slice::from_ref(&phone.account),
        )
        .unwrap();
    let (valid, _) = umbra_mls::PublicState::from_bytes(&id, &kept)
        .unwrap()
        .process_commit(&removal.commit, &[], None)
        .unwrap();
    assert_eq!(valid.sender, bob_1);
    assert_eq!(valid.members, [bob_1]);
    bobs.merge_pending_commit(&bob.provider()).unwrap();
    assert_eq!(bobs.accounts(), std::slice::from_ref(&bob.account));
    for (device, group) in [(&phone, &mut group), (&laptop, &mut laptops)] {
        assert!(matches!(
            group.process(&device.provider(), &removal.commit).unwrap(),
            Incoming::Commit {
                removed_self: true,
                ..
            }
        ));
    }
}

/// A device's key update that drops its certificate (it would then read
/// as its account's device 1, under its own key, and a removal of device
/// 2 would find no leaf) is refused by the delivery service and by the
/// members.
#[test]
fn a_key_update_that_drops_its_certificate_is_refused() {
    use umbra_mls::HandshakeError;
    let bob = Device::new("BBBBBBBB", 2);
    let mallory_phone = DeviceSigner::from_secret(&[5; 32]);
    let (laptop, package) = second_device(&mallory_phone, "MMMMMMMM", 55);
    let config = GroupConfig::default();
    let (mut group, public) = bob.watched_group(&config);
    let out = group
        .add_members(&bob.provider(), &bob.signer, &[package])
        .unwrap();
    let (_, public) = public
        .process_commit(&out.commit, &[], out.welcome.as_deref())
        .unwrap();
    group.merge_pending_commit(&bob.provider()).unwrap();
    let (mut laptops, _) = Group::join(&laptop.provider(), &out.welcome.unwrap(), &config).unwrap();

    let bare = laptops
        .update_without_certificate(&laptop.provider(), &laptop.signer)
        .unwrap();
    match public.process_commit(&bare.commit, &[], None) {
        Err(HandshakeError::InvalidCommit(why)) => {
            assert!(why.contains("another account or device"), "{why}")
        }
        other => panic!("the delivery service took it: {other:?}"),
    }
    match group.process(&bob.provider(), &bare.commit) {
        Err(MlsError::Protocol(why)) => {
            assert!(why.contains("another device or account key"), "{why}")
        }
        other => panic!("a member took it: {other:?}"),
    }
}

/// Application messages are padded inside the encryption: texts of 1 and
/// 150 bytes give ciphertexts of one size, a longer one the next bucket
/// up; the members read the texts unpadded.
#[test]
fn application_messages_are_padded_to_buckets() {
    let alice = Device::new("AAAAAAAA", 1);
    let bob = Device::new("BBBBBBBB", 2);
    let config = GroupConfig::default();
    let (mut group, _) = alice.watched_group(&config);
    let out = group
        .add_members(&alice.provider(), &alice.signer, &[bob.key_package()])
        .unwrap();
    group.merge_pending_commit(&alice.provider()).unwrap();
    let (mut bobs, _) = Group::join(&bob.provider(), &out.welcome.unwrap(), &config).unwrap();
    let mut sizes = Vec::new();
    for plain in [vec![b'a'; 1], vec![b'b'; 150], vec![b'c'; 400]] {
        let sealed = group
            .encrypt(&alice.provider(), &alice.signer, &plain)
            .unwrap();
        sizes.push(sealed.len());
        assert_eq!(text(bobs.process(&bob.provider(), &sealed).unwrap()), plain);
    }
    assert_eq!(sizes[0], sizes[1], "one bucket: {sizes:?}");
    assert_eq!(
        sizes[2] - sizes[0],
        GroupConfig::DEFAULT_PADDING,
        "the next bucket up: {sizes:?}"
    );
}
