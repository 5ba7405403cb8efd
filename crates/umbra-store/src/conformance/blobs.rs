//! Blobs: created only by a member within the line's quota, written in
//! order by their uploader alone, read whole by the group's devices once
//! complete, deleted when the last recipient fetched them, when they
//! expire, or when an upload stays idle.

use umbra_proto::{BlobId, DeviceAddr};

use super::{NOW, group, group_of_two, one, registered};
use crate::{BlobCreation, BlobInfo, BlobQuota, BlobRead, BlobWrite, NewBlob, Store};

const ROOMY: BlobQuota = BlobQuota {
    in_flight: 1 << 30,
    stored: 1 << 30,
};

fn new_blob(id: u8, owner: &DeviceAddr, group: &umbra_proto::GroupId, size: u64) -> NewBlob {
    NewBlob {
        id: BlobId([id; 16]),
        owner: owner.clone(),
        group: group.clone(),
        size,
        now: NOW,
        expires_at: NOW + 100,
    }
}

async fn read(
    store: &impl Store,
    id: u8,
    reader: &DeviceAddr,
    offset: u64,
    length: u32,
) -> BlobRead {
    store
        .read_blob(&BlobId([id; 16]), reader, offset, length, NOW)
        .await
        .unwrap()
}

async fn put(
    store: &impl Store,
    id: u8,
    owner: &DeviceAddr,
    offset: u64,
    data: &[u8],
) -> BlobWrite {
    store
        .put_blob(
            &BlobId([id; 16]),
            owner,
            offset,
            bytes::Bytes::copy_from_slice(data),
            NOW,
        )
        .await
        .unwrap()
}

pub(super) async fn blobs(store: &impl Store) {
    let (g, alice, bob) = group_of_two(store).await;
    let carol = registered(store, "CCCCCCCC", 3).await;
    let (alice, bob, carol) = (one(&alice), one(&bob), one(&carol));
    let create = |blob, quota| store.create_blob(blob, quota);

    // Only a member of an existing group creates one.
    assert_eq!(
        create(new_blob(1, &carol, &g, 10), ROOMY).await.unwrap(),
        BlobCreation::NotAMember
    );
    assert_eq!(
        create(new_blob(1, &alice, &group(77), 10), ROOMY)
            .await
            .unwrap(),
        BlobCreation::UnknownGroup
    );
    assert_eq!(
        create(new_blob(1, &alice, &g, 10), ROOMY).await.unwrap(),
        BlobCreation::Created
    );
    assert_eq!(
        create(new_blob(1, &alice, &g, 5), ROOMY).await.unwrap(),
        BlobCreation::IdTaken
    );
    let id = BlobId([1; 16]);
    let fresh = BlobInfo {
        owner: alice.clone(),
        group: g.clone(),
        size: 10,
        stored: 0,
        expires_at: NOW + 100,
    };
    assert_eq!(
        store.blob(&id, &alice, NOW).await.unwrap(),
        Some(fresh.clone())
    );
    assert_eq!(
        store.blob(&id, &bob, NOW).await.unwrap(),
        None,
        "only its uploader sees it"
    );

    // Written in order, by its uploader alone, never past its size.
    assert_eq!(read(store, 1, &bob, 0, 10).await, BlobRead::Incomplete);
    assert_eq!(put(store, 1, &bob, 0, b"abc").await, BlobWrite::Unknown);
    assert_eq!(
        put(store, 1, &alice, 5, b"abc").await,
        BlobWrite::Offset { stored: 0 }
    );
    assert_eq!(
        put(store, 1, &alice, 0, b"012345").await,
        BlobWrite::Stored(BlobInfo {
            stored: 6,
            ..fresh.clone()
        })
    );
    assert_eq!(
        put(store, 1, &alice, 0, b"xx").await,
        BlobWrite::Offset { stored: 6 }
    );
    assert_eq!(
        put(store, 1, &alice, 6, b"67890").await,
        BlobWrite::PastEnd { size: 10 }
    );
    assert_eq!(read(store, 1, &bob, 0, 10).await, BlobRead::Incomplete);
    assert_eq!(
        put(store, 1, &alice, 6, b"6789").await,
        BlobWrite::Stored(BlobInfo {
            stored: 10,
            ..fresh.clone()
        })
    );

    // Read by the group's devices and its uploader, in ranges.
    assert_eq!(
        read(store, 1, &bob, 2, 5).await,
        BlobRead::Data {
            data: b"23456".to_vec(),
            size: 10
        }
    );
    assert_eq!(
        read(store, 1, &alice, 8, 100).await,
        BlobRead::Data {
            data: b"89".to_vec(),
            size: 10
        }
    );
    assert_eq!(
        read(store, 1, &bob, 10, 5).await,
        BlobRead::Data {
            data: vec![],
            size: 10
        }
    );
    assert_eq!(read(store, 1, &carol, 0, 10).await, BlobRead::Unknown);
    assert_eq!(
        read(store, 9, &bob, 0, 10).await,
        BlobRead::Unknown,
        "never issued"
    );

    // The line's quotas: bytes in flight, bytes stored (blob 1's 10 bytes
    // count as stored only).
    let tight = BlobQuota {
        in_flight: 150,
        stored: 1 << 30,
    };
    assert_eq!(
        create(new_blob(2, &alice, &g, 100), tight).await.unwrap(),
        BlobCreation::Created
    );
    assert_eq!(
        create(new_blob(3, &alice, &g, 100), tight).await.unwrap(),
        BlobCreation::InFlightQuota { used: 100 }
    );
    let full = BlobQuota {
        in_flight: 1 << 30,
        stored: 150,
    };
    assert_eq!(
        create(new_blob(3, &alice, &g, 50), full).await.unwrap(),
        BlobCreation::StoredQuota { used: 110 }
    );
    assert_eq!(
        create(new_blob(3, &bob, &g, 50), full).await.unwrap(),
        BlobCreation::Created,
        "another line's quota is its own"
    );

    // Deleted once its last recipient fetched it, not before; a device
    // that was never waited for changes nothing.
    assert!(!store.blob_fetched(&id, &carol).await.unwrap());
    assert!(
        !store.blob_fetched(&id, &alice).await.unwrap(),
        "its uploader is no recipient"
    );
    assert!(matches!(
        read(store, 1, &bob, 0, 1).await,
        BlobRead::Data { .. }
    ));
    assert!(store.blob_fetched(&id, &bob).await.unwrap());
    assert!(!store.blob_fetched(&id, &bob).await.unwrap(), "once");
    assert_eq!(read(store, 1, &alice, 0, 10).await, BlobRead::Unknown);
    assert_eq!(store.blob(&id, &alice, NOW).await.unwrap(), None);

    // Expiry: gone at its time whether swept or not; the sweep deletes the
    // expired and the idle incomplete ones, and keeps the rest.
    assert_eq!(
        put(store, 3, &bob, 0, &[7; 50]).await,
        BlobWrite::Stored(BlobInfo {
            owner: bob.clone(),
            group: g.clone(),
            size: 50,
            stored: 50,
            expires_at: NOW + 100,
        })
    );
    assert_eq!(
        store
            .read_blob(&BlobId([3; 16]), &alice, 0, 1, NOW + 100)
            .await
            .unwrap(),
        BlobRead::Unknown
    );
    let mut later = new_blob(4, &alice, &g, 5);
    later.now = NOW + 50;
    later.expires_at = NOW + 1000;
    assert_eq!(create(later, ROOMY).await.unwrap(), BlobCreation::Created);
    let mut complete = new_blob(5, &alice, &g, 1);
    complete.expires_at = NOW + 1000;
    assert_eq!(
        create(complete, ROOMY).await.unwrap(),
        BlobCreation::Created
    );
    assert!(matches!(
        put(store, 5, &alice, 0, b"x").await,
        BlobWrite::Stored(_)
    ));
    // Blob 2 (incomplete, idle since NOW) and 3 (expired) go; 4 was
    // created after the idle cut-off, 5 is complete.
    assert_eq!(store.expire_blobs(NOW + 100, NOW + 1).await.unwrap(), 2);
    assert_eq!(store.expire_blobs(NOW + 100, NOW + 1).await.unwrap(), 0);
    assert!(
        store
            .blob(&BlobId([2; 16]), &alice, NOW)
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        store
            .blob(&BlobId([4; 16]), &alice, NOW)
            .await
            .unwrap()
            .is_some()
    );
    assert!(matches!(
        store
            .read_blob(&BlobId([5; 16]), &bob, 0, 1, NOW + 100)
            .await
            .unwrap(),
        BlobRead::Data { .. }
    ));
    assert_eq!(store.expire_blobs(NOW + 1000, NOW + 1).await.unwrap(), 2);
}

/// The sweep goes through every blob however many there are (it works
/// in chunks on some stores): each one due goes, no other.
pub(super) async fn a_sweep_over_many_blobs_takes_exactly_the_ones_due(store: &impl Store) {
    let (g, alice, _bob) = group_of_two(store).await;
    let alice = one(&alice);
    // 1,300 blobs, their IDs in the order of `n`. Every third of the
    // first 500 and of the last 300 expires at NOW + 10, and none of
    // those between (a stretch with nothing due, longer than a chunk of
    // the embedded store's sweep); the others at NOW + 1000.
    let id = |n: u16| {
        let mut id = [0u8; 16];
        id[..2].copy_from_slice(&n.to_be_bytes());
        id[15] = (n % 251) as u8;
        BlobId(id)
    };
    let due = |n: u16| n.is_multiple_of(3) && !(500..1_000).contains(&n);
    for n in 0..1_300u16 {
        let blob = NewBlob {
            id: id(n),
            owner: alice.clone(),
            group: g.clone(),
            size: 10,
            now: NOW,
            expires_at: if due(n) { NOW + 10 } else { NOW + 1000 },
        };
        assert_eq!(
            store.create_blob(blob, ROOMY).await.unwrap(),
            BlobCreation::Created
        );
    }
    // None idle yet (the cut-off is before they were made).
    assert_eq!(store.expire_blobs(NOW + 10, NOW - 1).await.unwrap(), 267);
    for n in 0..1_300u16 {
        let kept = store.blob(&id(n), &alice, NOW).await.unwrap().is_some();
        assert_eq!(kept, !due(n), "blob {n}");
    }
    assert_eq!(store.expire_blobs(NOW + 10, NOW - 1).await.unwrap(), 0);
    // All the rest, as idle uploads.
    assert_eq!(store.expire_blobs(NOW + 10, NOW + 1).await.unwrap(), 1_033);
}

/// A blob's lifetime counts from the end of its upload (its message is
/// sent then); it waits for the devices in its group when the upload
/// ends (one added meanwhile included), and not for those that can no
/// longer fetch it: a member removed from the group, or nobody at all.
pub(super) async fn blobs_wait_only_for_who_can_fetch(store: &impl Store) {
    let (g, alice_id, bob_id) = group_of_two(store).await;
    let carol_id = registered(store, "CCCCCCCC", 3).await;
    let (alice, bob, carol) = (one(&alice_id), one(&bob_id), one(&carol_id));
    let live = |id: u8, now| {
        let alice = alice.clone();
        async move {
            store
                .blob(&BlobId([id; 16]), &alice, now)
                .await
                .unwrap()
                .is_some()
        }
    };

    // Created at NOW for 100 s, complete at NOW + 50: lives to NOW + 150.
    assert_eq!(
        store
            .create_blob(new_blob(1, &alice, &g, 4), ROOMY)
            .await
            .unwrap(),
        BlobCreation::Created
    );
    // Carol joins while it is uploaded.
    store
        .accept_commit(
            &super::commit(&g, 1, &alice_id, b"add", &[&carol_id], &[]),
            NOW,
            NOW + 100,
        )
        .await
        .unwrap();
    let done = store
        .put_blob(
            &BlobId([1; 16]),
            &alice,
            0,
            bytes::Bytes::from_static(b"data"),
            NOW + 50,
        )
        .await
        .unwrap();
    assert!(
        matches!(&done, BlobWrite::Stored(info) if info.expires_at == NOW + 150),
        "{done:?}"
    );
    assert!(matches!(
        store
            .read_blob(&BlobId([1; 16]), &bob, 0, 4, NOW + 120)
            .await
            .unwrap(),
        BlobRead::Data { .. }
    ));
    assert!(live(1, NOW + 149).await && !live(1, NOW + 150).await);
    assert!(
        !store.blob_fetched(&BlobId([1; 16]), &bob).await.unwrap(),
        "Carol has not"
    );
    assert!(store.blob_fetched(&BlobId([1; 16]), &carol).await.unwrap());

    // Blob 2 waits for Bob and Carol; Bob is then removed from the group.
    assert_eq!(
        store
            .create_blob(new_blob(2, &alice, &g, 4), ROOMY)
            .await
            .unwrap(),
        BlobCreation::Created
    );
    assert!(matches!(
        put(store, 2, &alice, 0, b"data").await,
        BlobWrite::Stored(_)
    ));
    assert!(!store.blob_fetched(&BlobId([2; 16]), &carol).await.unwrap());
    assert_eq!(
        store.expire_blobs(NOW, NOW).await.unwrap(),
        0,
        "Bob is still waited for"
    );
    store
        .accept_commit(
            &super::commit(&g, 2, &alice_id, b"remove", &[], &[&bob_id]),
            NOW,
            NOW + 100,
        )
        .await
        .unwrap();
    assert_eq!(store.expire_blobs(NOW, NOW).await.unwrap(), 1);
    assert!(!live(2, NOW).await);

    // Alone in a group: nobody to wait for once it is complete.
    let solo = group(33);
    store
        .create_group(
            &solo,
            &alice,
            &super::state_at(0),
            &super::info_at(0),
            None,
            NOW,
        )
        .await
        .unwrap();
    assert_eq!(
        store
            .create_blob(new_blob(4, &alice, &solo, 4), ROOMY)
            .await
            .unwrap(),
        BlobCreation::Created
    );
    assert_eq!(
        store.expire_blobs(NOW, NOW).await.unwrap(),
        0,
        "not complete yet"
    );
    assert!(matches!(
        put(store, 4, &alice, 0, b"data").await,
        BlobWrite::Stored(_)
    ));
    assert_eq!(store.expire_blobs(NOW, NOW).await.unwrap(), 1);
}
