//! Device lists: each account's signed device log, kept by the server and
//! verified by the account's own device and by its contacts; a server that
//! adds a device on its own, or rolls the log back, is caught by both.

mod common;

use common::{Device, TestServer, befriend};
use umbra_client::{ClientError, DeviceId};
use umbra_mls::{DeviceLog, DeviceLogError, DeviceSigner, FIRST_DEVICE};
use umbra_store::DeviceLogs;

#[tokio::test]
async fn the_account_and_its_contacts_see_the_same_verified_device_list() {
    let server = TestServer::start().await;
    let mut alice = Device::activate(&server).await;
    let mut bob = Device::activate(&server).await;
    befriend(&mut alice, &mut bob).await;

    // Alice's first connection wrote her log's first entry (beside the
    // session, so it is waited for): her device, under her account key.
    let db = rusqlite::Connection::open(server.data.join("umbra.db")).unwrap();
    let written = || -> i64 {
        db.query_row(
            "SELECT COUNT(*) FROM device_log WHERE account_id = ?1",
            [alice.id().as_str()],
            |row| row.get(0),
        )
        .unwrap()
    };
    let waited = tokio::time::timeout(std::time::Duration::from_secs(20), async {
        while written() == 0 {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(waited.is_ok(), "the first connection wrote no device log");
    let hers = alice.client.devices().await.unwrap();
    assert_eq!(written(), 1, "asking again wrote nothing more");
    assert_eq!(hers.len(), 1);
    let me = &hers[0];
    assert_eq!(
        (me.id, me.this_device, me.removed_at),
        (FIRST_DEVICE, true, None)
    );
    assert_eq!(me.key, hex::encode(alice.client.identity_key().as_bytes()));

    // Bob checks it against the key he pinned for her.
    let seen_by_bob = bob.client.contact_devices(&alice.id()).await.unwrap();
    assert_eq!(seen_by_bob.len(), 1);
    assert_eq!(
        (
            seen_by_bob[0].id,
            &seen_by_bob[0].key,
            seen_by_bob[0].this_device
        ),
        (DeviceId(1), &me.key, false)
    );
    // Asking again fetches only what is new, and finds the same.
    assert_eq!(
        bob.client.contact_devices(&alice.id()).await.unwrap(),
        seen_by_bob
    );
}

#[tokio::test]
async fn a_device_the_server_adds_on_its_own_is_refused_by_the_account_and_its_contacts() {
    let server = TestServer::start().await;
    let mut alice = Device::activate(&server).await;
    let mut bob = Device::activate(&server).await;
    befriend(&mut alice, &mut bob).await;
    alice.client.devices().await.unwrap();
    bob.client.contact_devices(&alice.id()).await.unwrap();
    let (alice_id, alice_key) = (alice.id(), alice.client.identity_key());

    // The operator, with the disk but not Alice's key, lists a device of
    // its own for her: correctly chained, signed with keys it holds.
    let (data, address, store, _dir) = server.seize();
    let stored = store.device_log(&alice_id, 0, 10).await.unwrap();
    let first = umbra_proto::DeviceEntry::decode(&stored[0]).unwrap();
    let log = DeviceLog::verify(alice_id.clone(), alice_key, [first], None).unwrap();
    let operator = DeviceSigner::from_secret(&[0x66; 32]);
    let planted = log.add_entry(
        &operator,
        (FIRST_DEVICE, &operator),
        &operator,
        "operator",
        common::now(),
    );
    assert!(
        store
            .append_device_entry(
                &alice_id,
                1,
                &planted.encode(),
                common::now(),
                common::now() + 3600
            )
            .await
            .unwrap()
            .is_some()
    );
    drop(store);
    let _server = TestServer::start_in(&data, address).await;
    let alice = alice.reopen().await;
    let bob = bob.reopen().await;

    for (who, result) in [
        ("alice", alice.client.devices().await),
        ("bob", bob.client.contact_devices(&alice_id).await),
    ] {
        match result {
            Err(ClientError::DeviceLog { account, error }) => {
                assert_eq!(account, alice_id, "{who}");
                assert_eq!(error, DeviceLogError::AccountSignature { seq: 1 }, "{who}");
            }
            other => panic!("{who} accepted a planted device: {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_server_that_rolls_a_device_list_back_is_caught() {
    let server = TestServer::start().await;
    let mut alice = Device::activate(&server).await;
    let mut bob = Device::activate(&server).await;
    befriend(&mut alice, &mut bob).await;
    alice.client.devices().await.unwrap();
    bob.client.contact_devices(&alice.id()).await.unwrap();
    let alice_id = alice.id();

    // The operator deletes Alice's log (so that a list of its own making
    // could start again from nothing).
    let (data, address, store, _dir) = server.seize();
    drop(store);
    let db = rusqlite::Connection::open(data.join("umbra.db")).unwrap();
    let deleted = db
        .execute(
            "DELETE FROM device_log WHERE account_id = ?1",
            [alice_id.as_str()],
        )
        .unwrap();
    assert_eq!(deleted, 1);
    drop(db);
    let _server = TestServer::start_in(&data, address).await;
    let alice = alice.reopen().await;
    let bob = bob.reopen().await;

    for result in [
        alice.client.devices().await,
        bob.client.contact_devices(&alice_id).await,
    ] {
        assert!(
            matches!(
                result,
                Err(ClientError::DeviceLog {
                    error: DeviceLogError::RolledBack { pinned: 1 },
                    ..
                })
            ),
            "{result:?}"
        );
    }
}

#[tokio::test]
async fn a_server_that_replaces_a_verified_entry_is_caught() {
    let server = TestServer::start().await;
    let mut alice = Device::activate(&server).await;
    let mut bob = Device::activate(&server).await;
    befriend(&mut alice, &mut bob).await;
    alice.client.devices().await.unwrap();
    bob.client.contact_devices(&alice.id()).await.unwrap();
    let alice_id = alice.id();

    // The operator rewrites Alice's first entry: the same device and key,
    // another date (its own replay of the log, which trusts what it
    // stored, still accepts it; her signatures no longer match).
    let (data, address, store, _dir) = server.seize();
    drop(store);
    let db = rusqlite::Connection::open(data.join("umbra.db")).unwrap();
    let stored: Vec<u8> = db
        .query_row(
            "SELECT entry FROM device_log WHERE account_id = ?1 AND seq = 0",
            [alice_id.as_str()],
            |row| row.get(0),
        )
        .unwrap();
    let mut entry = umbra_proto::DeviceEntry::decode(&stored).unwrap();
    entry.created_at += 1;
    let replaced = db
        .execute(
            "UPDATE device_log SET entry = ?2 WHERE account_id = ?1 AND seq = 0",
            rusqlite::params![alice_id.as_str(), entry.encode()],
        )
        .unwrap();
    assert_eq!(replaced, 1);
    drop(db);
    let _server = TestServer::start_in(&data, address).await;
    let alice = alice.reopen().await;
    let bob = bob.reopen().await;

    for result in [
        alice.client.devices().await,
        bob.client.contact_devices(&alice_id).await,
    ] {
        assert!(
            matches!(
                result,
                Err(ClientError::DeviceLog {
                    error: DeviceLogError::Forked { seq: 0 },
                    ..
                })
            ),
            "{result:?}"
        );
    }
}
