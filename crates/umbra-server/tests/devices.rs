//! Device logs over the real protocol: the server stores only entries that
//! follow the log's rules, within the device cap and the daily budget, and
//! shows a log only to the account and its contacts.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use common::{Raw, Server, closed_with};
use umbra_mls::{Crypto, DeviceCertificate, DeviceLog, DeviceSigner, FIRST_DEVICE, Provider};
use umbra_proto::{
    AccountId, DeliveryKind, DeviceId, ErrorCode, Push, Reply, Request, ServerMessage,
};

struct Account {
    raw: Raw,
    id: AccountId,
    key: DeviceSigner,
    log: DeviceLog,
}

impl Account {
    async fn new(server: &Server, seed: u8) -> Account {
        let key = DeviceSigner::from_secret(&[seed; 32]);
        let mut raw = Raw::connect(server).await;
        let id = raw.registered(server, &key).await;
        let log = DeviceLog::new(id.clone(), key.identity_key());
        Account { raw, id, key, log }
    }

    /// Appends `entry` at the server and, if it was taken, here.
    async fn append(&mut self, entry: umbra_proto::DeviceEntry) -> Result<(), ErrorCode> {
        match self
            .raw
            .call(Request::AppendDeviceEntry {
                entry: entry.clone(),
            })
            .await
        {
            Ok(Reply::Done) => {
                self.log.append(entry, None).unwrap();
                Ok(())
            }
            Ok(other) => panic!("unexpected {other:?}"),
            Err(error) => Err(error.code),
        }
    }

    async fn fetch(
        &mut self,
        whose: &AccountId,
        from: u64,
    ) -> Result<Vec<umbra_proto::DeviceEntry>, ErrorCode> {
        match self
            .raw
            .call(Request::FetchDeviceLog {
                account_id: whose.clone(),
                from,
            })
            .await
        {
            Ok(Reply::DeviceLog { entries }) => Ok(entries),
            Ok(other) => panic!("unexpected {other:?}"),
            Err(error) => Err(error.code),
        }
    }

    fn first(&self) -> umbra_proto::DeviceEntry {
        self.log.first_entry(&self.key, "phone", 1_800_000_000)
    }

    fn add(&self, by: (DeviceId, &DeviceSigner), new: &DeviceSigner) -> umbra_proto::DeviceEntry {
        self.log
            .add_entry(&self.key, by, new, "laptop", 1_800_000_000)
    }
}

/// Alice with devices 1 and 2 (device 2's key from `seed`) in her log, and
/// Bob, her contact.
async fn alice_with_a_second_device_and_bob(
    server: &Server,
    seed: u8,
) -> (Account, Account, DeviceSigner) {
    let mut alice = Account::new(server, 1).await;
    let mut bob = Account::new(server, 2).await;
    alice.append(alice.first()).await.unwrap();
    let d2 = DeviceSigner::from_secret(&[seed; 32]);
    alice
        .append(alice.add((FIRST_DEVICE, &alice.key), &d2))
        .await
        .unwrap();
    bob.raw
        .call(Request::SendContactRequest {
            to: alice.id.clone(),
        })
        .await
        .unwrap();
    alice
        .raw
        .call(Request::AcceptContact {
            from: bob.id.clone(),
        })
        .await
        .unwrap();
    (alice, bob, d2)
}

/// An empty MLS store for a test device.
fn mls_storage() -> rusqlite::Connection {
    let mut db = rusqlite::Connection::open_in_memory().unwrap();
    umbra_mls::init_storage(&mut db).unwrap();
    db
}

#[tokio::test]
async fn only_entries_that_follow_the_rules_are_stored() {
    let server = Server::start().await;
    let mut alice = Account::new(&server, 1).await;
    assert_eq!(alice.fetch(&alice.id.clone(), 0).await, Ok(vec![]));

    // The first entry must be device 1 with the account key: another key
    // as device 1 is refused.
    let stranger = DeviceSigner::from_secret(&[9; 32]);
    let wrong_first = alice.log.first_entry(&stranger, "x", 1);
    assert_eq!(
        alice.append(wrong_first).await,
        Err(ErrorCode::InvalidDeviceEntry)
    );
    alice.append(alice.first()).await.unwrap();

    // An add signed by a key that is not the account's is refused; one
    // signed properly is stored; one made on an old head is stale.
    let d2 = DeviceSigner::from_secret(&[2; 32]);
    let forged = alice
        .log
        .add_entry(&stranger, (FIRST_DEVICE, &alice.key), &d2, "x", 1);
    assert_eq!(
        alice.append(forged).await,
        Err(ErrorCode::InvalidDeviceEntry)
    );
    let stale = alice.add((FIRST_DEVICE, &alice.key), &d2);
    alice
        .append(alice.add((FIRST_DEVICE, &alice.key), &d2))
        .await
        .unwrap();
    assert_eq!(
        alice
            .raw
            .call(Request::AppendDeviceEntry { entry: stale })
            .await
            .unwrap_err()
            .code,
        ErrorCode::StaleDeviceLog
    );

    // What the server holds verifies, from scratch, as the same log.
    let id = alice.id.clone();
    let stored = alice.fetch(&id, 0).await.unwrap();
    let verified = DeviceLog::verify(id.clone(), alice.key.identity_key(), stored, None).unwrap();
    assert_eq!(verified.head(), alice.log.head());
    assert_eq!(alice.fetch(&id, 1).await.unwrap().len(), 1);
    alice.raw.alive().await;
}

#[tokio::test]
async fn devices_are_capped_and_changes_budgeted_per_account() {
    let server = Server::start_with(|config| {
        config.max_devices_per_account = 2;
        config.device_changes_per_day = 4;
    })
    .await;
    let mut alice = Account::new(&server, 1).await;
    let mut bob = Account::new(&server, 5).await;
    alice.append(alice.first()).await.unwrap();
    let me = FIRST_DEVICE;
    let d2 = DeviceSigner::from_secret(&[2; 32]);
    alice
        .append(alice.add((me, &alice.key), &d2))
        .await
        .unwrap();
    let d3 = DeviceSigner::from_secret(&[3; 32]);
    assert_eq!(
        alice.append(alice.add((me, &alice.key), &d3)).await,
        Err(ErrorCode::QuotaExceeded),
        "a third device over a cap of two"
    );
    // Removing one makes room (no lifetime count)...
    let remove = alice
        .log
        .remove_entry(&alice.key, (me, &alice.key), DeviceId(2), 1);
    alice.append(remove).await.unwrap();
    alice
        .append(alice.add((me, &alice.key), &d3))
        .await
        .unwrap();
    // ...but four changes a day is the budget.
    let remove = alice
        .log
        .remove_entry(&alice.key, (me, &alice.key), DeviceId(3), 1);
    assert_eq!(alice.append(remove).await, Err(ErrorCode::QuotaExceeded));
    // Another account is not held back by Alice's budget.
    bob.append(bob.first()).await.unwrap();
}

#[tokio::test]
async fn a_log_is_shown_to_the_account_and_its_contacts_only() {
    let server = Server::start().await;
    let mut alice = Account::new(&server, 1).await;
    let mut bob = Account::new(&server, 2).await;
    let mut carol = Account::new(&server, 3).await;
    alice.append(alice.first()).await.unwrap();
    let alice_id = alice.id.clone();
    assert_eq!(carol.fetch(&alice_id, 0).await, Err(ErrorCode::NotAContact));
    let bob_id = bob.id.clone();
    bob.raw
        .call(Request::SendContactRequest {
            to: alice_id.clone(),
        })
        .await
        .unwrap();
    assert_eq!(
        bob.fetch(&alice_id, 0).await,
        Err(ErrorCode::NotAContact),
        "a request is not enough"
    );
    alice
        .raw
        .call(Request::AcceptContact { from: bob_id })
        .await
        .unwrap();
    assert_eq!(bob.fetch(&alice_id, 0).await.unwrap().len(), 1);
    carol.raw.alive().await;
}

#[tokio::test]
async fn each_device_logs_in_with_its_own_key_and_a_removed_one_is_cut_off_at_once() {
    let server = Server::start().await;
    let mut alice = Account::new(&server, 1).await;
    alice.append(alice.first()).await.unwrap();
    let d2 = DeviceSigner::from_secret(&[2; 32]);
    alice
        .append(alice.add((FIRST_DEVICE, &alice.key), &d2))
        .await
        .unwrap();
    let id = alice.id.clone();

    // Device 2 logs in with its own key; not with the account key, and no
    // device the log does not list logs in at all. The refusals are the
    // one a bad signature gets.
    let mut second = Raw::connect(&server).await;
    assert!(matches!(
        second.login_device(&id, DeviceId(2), &d2).await,
        Ok(Reply::LoggedIn { .. })
    ));
    for (device, key) in [(DeviceId(2), &alice.key), (DeviceId(3), &d2)] {
        let mut other = Raw::connect(&server).await;
        let refused = other.login_device(&id, device, key).await.unwrap_err();
        assert_eq!(refused.code, ErrorCode::BadSignature, "{device}");
    }

    // Device 1 removes device 2: its session ends at once and it cannot
    // log in again; device 1 goes on.
    let remove = alice
        .log
        .remove_entry(&alice.key, (FIRST_DEVICE, &alice.key), DeviceId(2), 1);
    alice.append(remove).await.unwrap();
    closed_with(&mut second, ErrorCode::DeviceRemoved).await;
    let mut again = Raw::connect(&server).await;
    let refused = again.login_device(&id, DeviceId(2), &d2).await.unwrap_err();
    assert_eq!(refused.code, ErrorCode::BadSignature);
    alice.raw.alive().await;
}

#[tokio::test]
async fn a_removed_first_device_cannot_log_in_with_the_account_key() {
    let server = Server::start().await;
    let mut alice = Account::new(&server, 1).await;
    alice.append(alice.first()).await.unwrap();
    let d2 = DeviceSigner::from_secret(&[2; 32]);
    alice
        .append(alice.add((FIRST_DEVICE, &alice.key), &d2))
        .await
        .unwrap();
    let id = alice.id.clone();
    let mut second = Raw::connect(&server).await;
    second.login_device(&id, DeviceId(2), &d2).await.unwrap();
    // Device 2 removes device 1 (whose key is the account key).
    let entry = alice
        .log
        .remove_entry(&alice.key, (DeviceId(2), &d2), FIRST_DEVICE, 1);
    assert_eq!(
        second
            .call(Request::AppendDeviceEntry {
                entry: entry.clone()
            })
            .await,
        Ok(Reply::Done)
    );
    closed_with(&mut alice.raw, ErrorCode::DeviceRemoved).await;
    let mut again = Raw::connect(&server).await;
    let refused = again
        .login_device(&id, FIRST_DEVICE, &alice.key)
        .await
        .unwrap_err();
    assert_eq!(refused.code, ErrorCode::BadSignature);
    second.alive().await;
}

#[tokio::test]
async fn a_session_appends_only_entries_it_makes_itself() {
    let server = Server::start().await;
    let mut alice = Account::new(&server, 1).await;
    alice.append(alice.first()).await.unwrap();
    let d2 = DeviceSigner::from_secret(&[2; 32]);
    alice
        .append(alice.add((FIRST_DEVICE, &alice.key), &d2))
        .await
        .unwrap();
    // Device 1's session hands in an entry device 2 made.
    let d3 = DeviceSigner::from_secret(&[3; 32]);
    let by_two = alice.add((DeviceId(2), &d2), &d3);
    assert_eq!(
        alice.append(by_two).await,
        Err(ErrorCode::InvalidDeviceEntry)
    );
}

/// KeyPackages belong to a device: each uploads its own (signed by its own
/// key, checked against the log), a contact takes one of a named current
/// device, and a removed device's are withdrawn.
#[tokio::test]
async fn key_packages_are_per_device_and_a_removed_devices_are_withdrawn() {
    let server = Server::start().await;
    let (mut alice, mut bob, d2) = alice_with_a_second_device_and_bob(&server, 12).await;
    let id = alice.id.clone();
    let crypto = Crypto::default();
    let db = mls_storage();
    let provider = Provider::new(&crypto, &db);
    let certificate = |entry: usize| DeviceCertificate {
        account_key: alice.key.identity_key(),
        entry: alice.log.entries()[entry].clone(),
    };
    let certified =
        |signer: &DeviceSigner, last_resort, certificate: Option<&DeviceCertificate>| {
            umbra_mls::new_device_key_package(
                &provider,
                signer,
                &id,
                Default::default(),
                last_resort,
                certificate,
            )
            .unwrap()
        };
    // Device 2's packages carry the log's entry that added it.
    let d2_certificate = certificate(1);
    let package = |signer: &DeviceSigner, last_resort: bool| {
        let certificate = (signer.identity_key() == d2.identity_key()).then_some(&d2_certificate);
        certified(signer, last_resort, certificate)
    };
    let upload =
        |key_packages: Vec<Vec<u8>>, last_resort: Option<Vec<u8>>| Request::UploadKeyPackages {
            key_packages,
            last_resort,
        };

    let mut second = Raw::connect(&server).await;
    let Ok(Reply::LoggedIn {
        key_packages_remaining: 0,
        has_last_resort: false,
        ..
    }) = second.login_device(&id, DeviceId(2), &d2).await
    else {
        panic!("device 2 starts with no KeyPackages of its own");
    };
    // Each session uploads packages signed by its own device's key only.
    let refused = second
        .expect_error(
            upload(vec![package(&alice.key, false)], None),
            ErrorCode::InvalidKeyPackage,
        )
        .await;
    assert!(refused.contains("device 2"), "{refused}");
    alice
        .raw
        .expect_error(
            upload(vec![package(&d2, false)], None),
            ErrorCode::InvalidKeyPackage,
        )
        .await;
    // Without its certificate, or with one that does not bind its key
    // (device 1's entry), or one under another account key, it is refused;
    // device 1 carries none.
    // A certificate that does bind device 2's key, under an account key
    // of someone else's making: only the account key's check refuses it.
    let stranger = DeviceSigner::from_secret(&[99; 32]);
    let mut made_up = DeviceLog::new(id.clone(), stranger.identity_key());
    made_up
        .append(made_up.first_entry(&stranger, "phone", 1), None)
        .unwrap();
    let forged = DeviceCertificate {
        account_key: stranger.identity_key(),
        entry: made_up.add_entry(&stranger, (FIRST_DEVICE, &stranger), &d2, "laptop", 2),
    };
    assert!(forged.certifies(&id, &d2.identity_key()));
    for wrong in [None, Some(&certificate(0)), Some(&forged)] {
        let refused = second
            .expect_error(
                upload(vec![certified(&d2, false, wrong)], None),
                ErrorCode::InvalidKeyPackage,
            )
            .await;
        assert!(refused.contains("certificate"), "{refused}");
    }
    alice
        .raw
        .expect_error(
            upload(
                vec![certified(&alice.key, false, Some(&d2_certificate))],
                None,
            ),
            ErrorCode::InvalidKeyPackage,
        )
        .await;
    let two = [package(&d2, false), package(&d2, false)];
    assert_eq!(
        second
            .call(upload(two.to_vec(), Some(package(&d2, true))))
            .await,
        Ok(Reply::KeyPackageCount {
            remaining: 2,
            suite: umbra_mls::Suite::default().code()
        })
    );
    assert_eq!(
        alice
            .raw
            .call(upload(vec![package(&alice.key, false)], None))
            .await,
        Ok(Reply::KeyPackageCount {
            remaining: 1,
            suite: umbra_mls::Suite::default().code()
        }),
        "device 1's stock is its own"
    );

    // A contact takes one of the device it names, signed by that device.
    let fetch = |device| Request::FetchKeyPackage {
        account_id: id.clone(),
        device,
        suites: vec![umbra_mls::Suite::default().code()],
    };
    let key_of = |reply: Result<Reply, umbra_proto::ErrorReply>| match reply {
        Ok(Reply::KeyPackage { key_package, .. }) => {
            umbra_mls::validate_key_package(&key_package)
                .unwrap()
                .identity_key
        }
        other => panic!("{other:?}"),
    };
    assert_eq!(
        key_of(bob.raw.call(fetch(DeviceId(2))).await),
        d2.identity_key()
    );
    assert_eq!(
        key_of(bob.raw.call(fetch(FIRST_DEVICE)).await),
        alice.key.identity_key()
    );
    bob.raw
        .expect_error(fetch(DeviceId(3)), ErrorCode::UnknownDevice)
        .await;

    // Device 1 removes device 2: its packages are not handed out again
    // (the one-time one left and the last-resort one are withdrawn).
    let remove = alice
        .log
        .remove_entry(&alice.key, (FIRST_DEVICE, &alice.key), DeviceId(2), 1);
    alice.append(remove).await.unwrap();
    bob.raw
        .expect_error(fetch(DeviceId(2)), ErrorCode::UnknownDevice)
        .await;
    let store =
        umbra_store::sqlite::SqliteStore::open(&server.data.path().join("umbra.db")).unwrap();
    let stock = umbra_store::KeyPackages::key_package_stock(
        &store,
        &id,
        DeviceId(2),
        umbra_mls::Suite::default().code(),
    )
    .await
    .unwrap();
    assert_eq!((stock.one_time, stock.has_last_resort), (0, false));
    alice.raw.alive().await;
}

/// A commit may bring in a leaf of any current device of an account (its
/// certificate under the account's key), and a device creates groups under
/// its own key; a leaf of a device removed since is refused.
#[tokio::test]
async fn groups_take_leaves_of_current_devices_only() {
    use umbra_mls::{Group, GroupConfig};
    use umbra_proto::GroupId;
    use umbra_proto::frame::CommitSubmission;

    let server = Server::start().await;
    let (mut alice, mut bob, d2) = alice_with_a_second_device_and_bob(&server, 32).await;
    let id = alice.id.clone();
    let crypto = Crypto::default();
    let db = mls_storage();
    let provider = Provider::new(&crypto, &db);
    let certificate = DeviceCertificate {
        account_key: alice.key.identity_key(),
        entry: alice.log.entries()[1].clone(),
    };
    let package = |last_resort| {
        umbra_mls::new_device_key_package(
            &provider,
            &d2,
            &id,
            Default::default(),
            last_resort,
            Some(&certificate),
        )
        .unwrap()
    };
    let mut second = Raw::connect(&server).await;
    second.login_device(&id, DeviceId(2), &d2).await.unwrap();
    assert!(matches!(
        second
            .call(Request::UploadKeyPackages {
                key_packages: vec![package(false), package(false)],
                last_resort: None,
            })
            .await,
        Ok(Reply::KeyPackageCount { remaining: 2, .. })
    ));

    // Device 2 creates a group under its own key and certificate (not
    // under the account key, which is device 1's, nor without its
    // certificate).
    let config = GroupConfig::default();
    let own = Group::create_as_device(&provider, &d2, &id, &config, 0, Some(&certificate)).unwrap();
    let uncertified = Group::create(&provider, &d2, &id, &config, 0).unwrap();
    let create = |group: &Group, signer: &DeviceSigner| Request::CreateGroup {
        group_id: GroupId::new(group.id()).unwrap(),
        group_info: group.group_info(&provider, signer).unwrap(),
        delivery_key: None,
    };
    assert_eq!(second.call(create(&own, &d2)).await, Ok(Reply::Done));
    let posing = Group::create(&provider, &alice.key, &id, &config, 0).unwrap();
    second
        .expect_error(create(&posing, &alice.key), ErrorCode::InvalidRequest)
        .await;
    second
        .expect_error(create(&uncertified, &d2), ErrorCode::InvalidRequest)
        .await;

    // Bob adds Alice's device 2 from a package the server handed out.
    let fetch = Request::FetchKeyPackage {
        account_id: id.clone(),
        device: DeviceId(2),
        suites: vec![umbra_mls::Suite::default().code()],
    };
    let mut fetched = Vec::new();
    for _ in 0..2 {
        match bob.raw.call(fetch.clone()).await {
            Ok(Reply::KeyPackage { key_package, .. }) => fetched.push(key_package),
            other => panic!("{other:?}"),
        }
    }
    let bob_db = mls_storage();
    let bobs = Provider::new(&crypto, &bob_db);
    let add_in_new_group = |key_package: Vec<u8>| {
        let mut group = Group::create(&bobs, &bob.key, &bob.id, &config, 0).unwrap();
        let create = Request::CreateGroup {
            group_id: GroupId::new(group.id()).unwrap(),
            group_info: group.group_info(&bobs, &bob.key).unwrap(),
            delivery_key: None,
        };
        let added = group.add_members(&bobs, &bob.key, &[key_package]).unwrap();
        let commit = Request::SendCommit(CommitSubmission {
            group_id: GroupId::new(group.id()).unwrap(),
            epoch: 0,
            commit: added.commit,
            welcome: added.welcome,
            group_info: added.group_info,
            delivery_key: None,
        });
        (create, commit)
    };
    let (create, commit) = add_in_new_group(fetched.remove(0));
    assert_eq!(bob.raw.call(create).await, Ok(Reply::Done));
    assert_eq!(
        bob.raw.call(commit).await,
        Ok(Reply::CommitAccepted { epoch: 1 })
    );

    // A leaf with a current device's key under a certificate naming
    // another device number (an entry the log never took, signed by both
    // keys) is refused: the pair must be the log's.
    let unlogged = DeviceCertificate {
        account_key: alice.key.identity_key(),
        entry: alice
            .log
            .add_entry(&alice.key, (FIRST_DEVICE, &alice.key), &d2, "copy", 3),
    };
    assert_eq!(unlogged.entry.device(), DeviceId(3));
    let renumbered = umbra_mls::new_device_key_package(
        &provider,
        &d2,
        &id,
        Default::default(),
        false,
        Some(&unlogged),
    )
    .unwrap();
    let (create, commit) = add_in_new_group(renumbered);
    assert_eq!(bob.raw.call(create).await, Ok(Reply::Done));
    let refused = bob.raw.expect_error(commit, ErrorCode::InvalidCommit).await;
    assert!(refused.contains("current devices"), "{refused}");

    // Once device 2 is removed, its leaf is refused, even from a package
    // handed out before.
    let remove = alice
        .log
        .remove_entry(&alice.key, (FIRST_DEVICE, &alice.key), DeviceId(2), 1);
    alice.append(remove).await.unwrap();
    let (create, commit) = add_in_new_group(fetched.remove(0));
    assert_eq!(bob.raw.call(create).await, Ok(Reply::Done));
    let refused = bob.raw.expect_error(commit, ErrorCode::InvalidCommit).await;
    assert!(refused.contains("current devices"), "{refused}");
    alice.raw.alive().await;
}

/// The deliveries a freshly logged-in connection is handed, up to the
/// `Synced` that says its mailbox was read to the end.
async fn mailbox(raw: &mut Raw) -> Vec<umbra_proto::frame::Delivery> {
    let mut held = Vec::new();
    loop {
        match raw.next().await.expect("connection closed") {
            ServerMessage::Push(Push::Delivery(delivery)) => held.push(delivery),
            ServerMessage::Push(Push::Synced) => return held,
            _ => {}
        }
    }
}

/// Each device has its own mailbox: what is meant for the account (here
/// a contact request) reaches every device, and one device's
/// acknowledgement deletes its own copy only.
#[tokio::test]
async fn each_device_reads_and_acknowledges_its_own_mailbox() {
    let server = Server::start().await;
    let (alice, bob, d2) = alice_with_a_second_device_and_bob(&server, 2).await;
    let request = |held: &[umbra_proto::frame::Delivery]| {
        held.iter()
            .map(|d| (d.kind, d.sender.clone()))
            .collect::<Vec<_>>()
    };
    let expected = vec![(DeliveryKind::ContactRequest, Some(bob.id.clone()))];

    let mut second = Raw::connect(&server).await;
    second
        .login_device(&alice.id, DeviceId(2), &d2)
        .await
        .unwrap();
    let held = mailbox(&mut second).await;
    assert_eq!(request(&held), expected, "device 2 has its copy");
    second
        .call(Request::Ack {
            delivery_ids: vec![held[0].id],
            quiet: false,
        })
        .await
        .unwrap();

    // Device 1's copy is still there; device 2's is gone.
    let mut first = Raw::connect(&server).await;
    first.login(&alice.id, &alice.key).await;
    assert_eq!(request(&mailbox(&mut first).await), expected);
    drop(second);
    let mut second = Raw::connect(&server).await;
    second
        .login_device(&alice.id, DeviceId(2), &d2)
        .await
        .unwrap();
    assert!(mailbox(&mut second).await.is_empty());
}
