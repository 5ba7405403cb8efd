//! `umbra-server admin backup` while the server takes writes, and `admin
//! restore` into a new data directory: the copy is consistent, holds every
//! account registered before it began, and a server started on it serves
//! them, with the certificate devices pinned and the same delivery-ID key.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use common::{Raw, Server};
use umbra_mls::DeviceSigner;
use umbra_proto::{Reply, Request};
use umbra_server::Config;
use umbra_store::Accounts as _;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_taken_under_load_restores_into_a_server_that_serves() {
    let server = Arc::new(Server::start().await);
    let config = Config::load(server.data.path()).unwrap();
    let mut before = Vec::new();
    for seed in 1..=10u8 {
        let signer = DeviceSigner::from_secret(&[seed; 32]);
        let mut raw = Raw::connect(&server).await;
        let account = raw.registered(&server, &signer).await;
        before.push((account, signer));
    }

    // An upload half done: its bytes are in the backup, and it resumes
    // from there on the restored server.
    let blob_size = umbra_proto::blobs::sealed_len(65_537);
    let segment = umbra_proto::blobs::SEALED_SEGMENT;
    assert_eq!(blob_size, 67_616, "two segments, the second short");
    let blob = {
        let (account, signer) = &before[0];
        let mut raw = Raw::connect(&server).await;
        raw.login(account, signer).await;
        let group = common::solo_group(&mut raw, signer, account).await;
        let blob_id = match raw
            .call(Request::CreateBlob {
                group_id: group,
                size: blob_size,
                ttl_seconds: 0,
            })
            .await
        {
            Ok(Reply::BlobCreated { blob_id, .. }) => blob_id,
            other => panic!("{other:?}"),
        };
        assert!(matches!(
            raw.call(Request::PutBlob { blob_id, offset: 0, data: vec![5; segment].into() }).await,
            Ok(Reply::BlobState { stored, .. }) if stored == segment as u64
        ));
        blob_id
    };

    // Writes go on while the backup runs: registrations and KeyPackages.
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let stop = Arc::clone(&stop);
        let server = Arc::clone(&server);
        tokio::spawn(async move {
            let mut written = 0u32;
            let mut raw = Raw::connect(&server).await;
            while !stop.load(Ordering::SeqCst) {
                let mut secret = [7u8; 32];
                secret[..4].copy_from_slice(&written.to_be_bytes());
                let signer = DeviceSigner::from_secret(&secret);
                if written.is_multiple_of(2) {
                    let mut fresh = Raw::connect(&server).await;
                    fresh.registered(&server, &signer).await;
                } else {
                    // A code issued: a write from another connection.
                    drop(server.code().await);
                }
                written += 1;
            }
            drop(raw.call(Request::Ping).await);
            written
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let accounts = |path: &std::path::Path| -> i64 {
        let db = rusqlite::Connection::open(path.join("umbra.db")).unwrap();
        db.query_row("SELECT COUNT(*) FROM accounts", [], |row| row.get(0))
            .unwrap()
    };
    let at_start = accounts(server.data.path());
    let destination = tempfile::tempdir().unwrap();
    let backup_dir = destination.path().join("backup");
    let (data, copy_config, target) = (
        server.data.path().to_owned(),
        config.clone(),
        backup_dir.clone(),
    );
    let copied = tokio::task::spawn_blocking(move || {
        umbra_server::admin::backup(&data, &copy_config, &target)
    })
    .await
    .unwrap()
    .unwrap();
    let at_end = accounts(server.data.path());
    // A snapshot taken between the two: not an older copy, not a later one.
    let copied_accounts = accounts(&backup_dir);
    assert!(
        (at_start..=at_end).contains(&copied_accounts),
        "{at_start} <= {copied_accounts} <= {at_end}"
    );
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    stop.store(true, Ordering::SeqCst);
    let written = load.await.unwrap();
    assert!(written > 0, "the server took writes meanwhile");
    assert_eq!(copied.len(), 8, "{copied:?}");
    assert!(copied.contains(&std::path::Path::new("blobs").join(blob.to_hex())));

    // Backing up into a directory that exists is refused.
    assert!(umbra_server::admin::backup(server.data.path(), &config, &backup_dir).is_err());

    // Restored into a new data directory: the same certificate and keys.
    let restored = tempfile::tempdir().unwrap();
    umbra_server::admin::restore(&backup_dir, restored.path()).unwrap();
    let (anchor, anchor_key) = umbra_server::tls::anchor_paths(&config.cert);
    for file in [
        config.cert.clone(),
        config.key.clone(),
        anchor,
        anchor_key,
        std::path::PathBuf::from(umbra_server::delivery_ids::KEY_FILE),
    ] {
        assert_eq!(
            std::fs::read(server.data.path().join(&file)).unwrap(),
            std::fs::read(restored.path().join(&file)).unwrap(),
            "{}",
            file.display()
        );
    }
    // The anchor came back with its key: the copy can issue certificates
    // devices accept under the pin they hold.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let rotated = umbra_server::tls::rotate(
        &restored.path().join(&config.cert),
        &restored.path().join(&config.key),
        None,
        umbra_server::tls::names_for("127.0.0.1:0"),
        30,
        now,
    )
    .unwrap();
    assert_eq!(
        rotated.pin,
        umbra_server::tls::fingerprint(&server.data.path().join(&config.cert)).unwrap()
    );
    assert!(
        umbra_server::admin::restore(&backup_dir, restored.path()).is_err(),
        "a data directory with a database is not overwritten"
    );
    {
        let store = umbra_server::open_store(restored.path(), &config).unwrap();
        for (account, _) in &before {
            assert!(store.account(account).await.unwrap().is_some(), "{account}");
        }
    }

    // A server on the copy serves the accounts it holds.
    drop(server);
    let again = Server::start_on(restored, |_| {}).await;
    for (account, signer) in &before {
        let mut raw = Raw::connect(&again).await;
        raw.login(account, signer).await;
        assert_eq!(raw.call(Request::Ping).await, Ok(Reply::Done));
    }
    // ...and the upload goes on where the backup found it.
    let (account, signer) = &before[0];
    let mut raw = Raw::connect(&again).await;
    raw.login(account, signer).await;
    assert!(matches!(
        raw.call(Request::BlobStatus { blob_id: blob }).await,
        Ok(Reply::BlobState { stored, .. }) if stored == segment as u64
    ));
    let rest = vec![6; (blob_size - segment as u64) as usize];
    assert!(matches!(
        raw.call(Request::PutBlob { blob_id: blob, offset: segment as u64, data: rest.into() }).await,
        Ok(Reply::BlobState { stored, size, .. }) if stored == size
    ));
}
