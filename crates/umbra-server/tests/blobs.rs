//! Attachments' blobs over the real server, as a hostile or careless
//! device would use them: every misuse gets a typed error, and the server
//! goes on serving the device and everyone else.

mod common;

use common::{Raw, Server, solo_group};
use umbra_mls::DeviceSigner;
use umbra_proto::blobs::{MAX_BLOB_CHUNK, SEALED_SEGMENT, SEGMENT, sealed_len};
use umbra_proto::{BlobId, ErrorCode, GroupId, Reply, Request};

const MIB: u64 = 1024 * 1024;

async fn create(
    raw: &mut Raw,
    group: &GroupId,
    size: u64,
) -> Result<BlobId, umbra_proto::ErrorReply> {
    match raw
        .call(Request::CreateBlob {
            group_id: group.clone(),
            size,
            ttl_seconds: 0,
        })
        .await
    {
        Ok(Reply::BlobCreated {
            blob_id,
            expires_at,
        }) => {
            assert!(expires_at > 0);
            Ok(blob_id)
        }
        Ok(other) => panic!("{other:?}"),
        Err(error) => Err(error),
    }
}

fn put(blob_id: BlobId, offset: u64, data: Vec<u8>) -> Request {
    Request::PutBlob {
        blob_id,
        offset,
        data: data.into(),
    }
}

fn get(blob_id: BlobId, offset: u64, length: u32) -> Request {
    Request::GetBlob {
        blob_id,
        offset,
        length,
    }
}

#[tokio::test]
async fn hostile_uploads_and_downloads_get_typed_errors_and_a_resumed_upload_completes() {
    let server = Server::start_with(|config| {
        config.max_file_bytes = 2 * MIB;
        config.blob_bytes_in_flight_per_line = 4 * MIB;
        config.blob_bytes_per_line = 8 * MIB;
        config.blob_read_bytes_per_hour = 4 * MIB;
        config.blob_upload_bytes_per_hour = MIB;
    })
    .await;
    let alice_key = DeviceSigner::from_secret(&[1; 32]);
    let mut alice = Raw::connect(&server).await;
    let alice_id = alice.registered(&server, &alice_key).await;
    let group = solo_group(&mut alice, &alice_key, &alice_id).await;
    let carol_key = DeviceSigner::from_secret(&[2; 32]);
    let mut carol = Raw::connect(&server).await;
    let carol_id = carol.registered(&server, &carol_key).await;

    // Creation: size bounds, membership, the group must exist.
    // The limit is a file's: its blob, padded and sealed, is larger.
    let largest = umbra_proto::blobs::sealed_len(2 * MIB);
    assert!(largest > 2 * MIB);
    let refused = alice
        .call(Request::CreateBlob {
            group_id: group.clone(),
            size: largest + 1,
            ttl_seconds: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code, ErrorCode::BlobTooLarge, "{}", refused.message);
    assert!(create(&mut alice, &group, largest).await.is_ok());
    assert_eq!(
        create(&mut alice, &group, 0).await.unwrap_err().code,
        ErrorCode::InvalidRequest
    );
    assert_eq!(
        create(&mut carol, &group, sealed_len(0))
            .await
            .unwrap_err()
            .code,
        ErrorCode::NotAMember
    );
    let nowhere = GroupId::new(vec![9; 16]).unwrap();
    assert_eq!(
        create(&mut alice, &nowhere, sealed_len(0))
            .await
            .unwrap_err()
            .code,
        ErrorCode::UnknownGroup
    );

    // A blob of 20 sealed segments in two chunks: written only in order,
    // by its uploader, never past its size.
    let size = sealed_len(20 * SEGMENT as u64);
    assert_eq!(size, 20 * SEALED_SEGMENT as u64);
    let bytes: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
    let blob = create(&mut alice, &group, size).await.unwrap();
    let split = 10 * SEALED_SEGMENT;
    let first = bytes[..split].to_vec();
    let rest = bytes[split..].to_vec();
    alice
        .expect_error(put(blob, 10, first.clone()), ErrorCode::BlobOffset)
        .await;
    carol
        .expect_error(put(blob, 0, first.clone()), ErrorCode::UnknownBlob)
        .await;
    carol
        .expect_error(
            Request::BlobStatus { blob_id: blob },
            ErrorCode::UnknownBlob,
        )
        .await;
    assert!(matches!(
        alice.call(put(blob, 0, first.clone())).await,
        Ok(Reply::BlobState { stored, .. }) if stored == split as u64
    ));
    // The same chunk again (a retry after a lost answer), or overlapping.
    alice
        .expect_error(put(blob, 0, first.clone()), ErrorCode::BlobOffset)
        .await;
    alice
        .expect_error(put(blob, 100, rest.clone()), ErrorCode::BlobOffset)
        .await;
    let mut past_end = rest.clone();
    past_end.push(0);
    alice
        .expect_error(put(blob, split as u64, past_end), ErrorCode::InvalidRequest)
        .await;
    alice
        .expect_error(get(blob, 0, 10), ErrorCode::BlobIncomplete)
        .await;

    // The connection drops half way; a new one finds where the server's
    // copy ends and finishes it.
    drop(alice);
    let mut alice = Raw::connect(&server).await;
    alice.login(&alice_id, &alice_key).await;
    let stored = match alice.call(Request::BlobStatus { blob_id: blob }).await {
        Ok(Reply::BlobState {
            size: s, stored, ..
        }) => {
            assert_eq!(s, size);
            stored
        }
        other => panic!("{other:?}"),
    };
    assert_eq!(stored, split as u64);
    assert!(matches!(
        alice.call(put(blob, stored, rest.clone())).await,
        Ok(Reply::BlobState { stored, size: s, .. }) if stored == s
    ));

    // Read back in ranges by its uploader; nobody outside the group.
    let mut read = Vec::new();
    while (read.len() as u64) < size {
        match alice.call(get(blob, read.len() as u64, 300_000)).await {
            Ok(Reply::BlobData { data, size: s }) => {
                assert_eq!(s, size);
                assert!(!data.is_empty());
                read.extend(data);
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(read, bytes);
    carol
        .expect_error(get(blob, 0, 10), ErrorCode::UnknownBlob)
        .await;
    alice
        .expect_error(get(BlobId([7; 16]), 0, 10), ErrorCode::UnknownBlob)
        .await;
    // Reading it over and over stops at the line's hourly budget (4 MiB;
    // 1.25 read above), and the line goes on otherwise (below).
    let mut refusal = None;
    for _ in 0..8 {
        if let Err(error) = alice.call(get(blob, 0, MAX_BLOB_CHUNK as u32)).await {
            refusal = Some(error);
            break;
        }
    }
    let refusal = refusal.expect("the download budget never ran out");
    assert_eq!(
        refusal.code,
        ErrorCode::QuotaExceeded,
        "{}",
        refusal.message
    );
    assert!(
        refusal.message.contains("downloaded"),
        "{}",
        refusal.message
    );
    // A blob's file is its ciphertext as sent, under the data directory.
    let file = server.data.path().join("blobs").join(blob.to_hex());
    assert_eq!(std::fs::read(&file).unwrap(), bytes);

    // A flood of unfinished uploads stops at the line's quota; the line's
    // other requests and other lines go on.
    let mut created = 0;
    let refusal = loop {
        match create(&mut alice, &group, sealed_len(MIB)).await {
            Ok(_) => created += 1,
            Err(error) => break error,
        }
        assert!(created < 10, "the quota never stopped the flood");
    };
    assert_eq!(
        refusal.code,
        ErrorCode::QuotaExceeded,
        "{}",
        refusal.message
    );
    // 4 MiB unfinished at most: 2.0 are (the largest blob above), 1 more
    // fits; the 8 MiB a line may store are not reached.
    assert!(
        refusal.message.contains("unfinished"),
        "{}",
        refusal.message
    );
    assert_eq!(created, 1);
    alice.alive().await;
    let carols = solo_group(&mut carol, &carol_key, &carol_id).await;
    assert!(create(&mut carol, &carols, sealed_len(MIB)).await.is_ok());

    // The line uploaded 1.25 MiB this hour (the chunk that crossed its
    // 1 MiB went): the next upload waits for the hour to refill it.
    let next = create(&mut carol, &carols, sealed_len(0)).await.unwrap();
    assert!(
        carol
            .call(put(next, 0, vec![1; SEALED_SEGMENT]))
            .await
            .is_ok(),
        "another line uploads"
    );
    let mine = alice.call(Request::BlobStatus { blob_id: blob }).await;
    assert!(mine.is_ok());
    let refused = alice
        .call(put(blob, 0, vec![1; SEALED_SEGMENT]))
        .await
        .unwrap_err();
    assert_eq!(
        refused.code,
        ErrorCode::QuotaExceeded,
        "{}",
        refused.message
    );
    assert!(refused.message.contains("uploaded"), "{}", refused.message);

    // Fetched by a device that was never waited for: nothing happens.
    assert_eq!(
        carol.call(Request::BlobFetched { blob_id: blob }).await,
        Ok(Reply::Done)
    );
    assert!(file.exists());
}

/// A blob is a sealed file's size, and is written in whole sealed segments
/// but for its end: a line cannot fill the server with slivers (rows,
/// files, chunks) nor make each read walk a million of them; a read of a
/// sliver costs a segment of the hourly budget.
#[tokio::test]
async fn blobs_are_sealed_files_written_in_segments_and_slivers_cost_a_segment() {
    let server = Server::start_with(|config| {
        config.blob_read_bytes_per_hour = MIB;
    })
    .await;
    let alice_key = DeviceSigner::from_secret(&[1; 32]);
    let mut alice = Raw::connect(&server).await;
    let alice_id = alice.registered(&server, &alice_key).await;
    let group = solo_group(&mut alice, &alice_key, &alice_id).await;

    for size in [1, 10, sealed_len(0) - 1, sealed_len(0) + 1, 1 << 20] {
        let refused = create(&mut alice, &group, size).await.unwrap_err();
        assert_eq!(refused.code, ErrorCode::InvalidRequest, "{size}");
        assert!(
            refused.message.contains("sealed file"),
            "{}",
            refused.message
        );
    }

    // 200,000 bytes sealed: 3 whole segments and 4,112 bytes.
    let size = sealed_len(200_000);
    let tail = size as usize - 3 * SEALED_SEGMENT;
    assert_eq!(tail, 4_112);
    let blob = create(&mut alice, &group, size).await.unwrap();
    for sliver in [1, 10, SEALED_SEGMENT + SEALED_SEGMENT / 2, tail] {
        let refused = alice.call(put(blob, 0, vec![7; sliver])).await.unwrap_err();
        assert_eq!(refused.code, ErrorCode::InvalidRequest, "{sliver} bytes");
        assert!(
            refused.message.contains("whole sealed segments"),
            "{}",
            refused.message
        );
    }
    assert!(matches!(
        alice.call(put(blob, 0, vec![7; 3 * SEALED_SEGMENT])).await,
        Ok(Reply::BlobState { stored, .. }) if stored == 3 * SEALED_SEGMENT as u64
    ));
    // The end of the blob may be any length.
    assert!(matches!(
        alice.call(put(blob, 3 * SEALED_SEGMENT as u64, vec![7; tail])).await,
        Ok(Reply::BlobState { stored, .. }) if stored == size
    ));

    // One-byte reads: each costs a segment of the 1 MiB hour, so the
    // budget ends after 16 of them, not after a million.
    let mut served = 0;
    let refusal = loop {
        match alice.call(get(blob, served, 1)).await {
            Ok(Reply::BlobData { data, .. }) => assert_eq!(data, vec![7]),
            Ok(other) => panic!("{other:?}"),
            Err(error) => break error,
        }
        served += 1;
        assert!(served < 40, "one-byte reads never ran out of budget");
    };
    assert_eq!(
        refusal.code,
        ErrorCode::QuotaExceeded,
        "{}",
        refusal.message
    );
    assert_eq!(served, 16);
    alice.alive().await;
}
