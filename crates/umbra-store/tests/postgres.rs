//! The PostgreSQL store against the conformance suite, on a private
//! PostgreSQL server each test starts on a random loopback port.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use umbra_store::postgres::PgStore;
use umbra_store::postgres::testing::PrivatePostgres;
use umbra_store::{Mailboxes, StoreLimits, conformance};

fn server() -> PrivatePostgres {
    PrivatePostgres::start(false).unwrap_or_else(|e| panic!("{e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_passes_the_conformance_suite() {
    let pg = server();
    conformance::run_all(|| async { pg.fresh_store(StoreLimits::default()).await.unwrap() }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_caps_mailboxes() {
    let pg = server();
    let limits = StoreLimits {
        database_bytes: 0,
        mailbox_bytes: conformance::MAILBOX_CAP,
    };
    conformance::mailbox_cap(&pg.fresh_store(limits).await.unwrap()).await;
}

/// A second node (or an admin command) on the same database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_sees_another_writer() {
    let pg = server();
    let url = pg.create_database().await.unwrap();
    let server = PgStore::connect(&url, StoreLimits::default())
        .await
        .unwrap();
    let admin = PgStore::connect(&url, StoreLimits::default())
        .await
        .unwrap();
    conformance::sees_another_writer(&server, &admin).await;
}

/// What one connection stored, another (a restarted node) finds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_survives_reconnecting() {
    let pg = server();
    let url = pg.create_database().await.unwrap();
    let highest = {
        let store = PgStore::connect(&url, StoreLimits::default())
            .await
            .unwrap();
        conformance::survives_reopen_part_one(&store).await
    };
    let store = PgStore::connect(&url, StoreLimits::default())
        .await
        .unwrap();
    conformance::survives_reopen_part_two(&store, highest).await;
}

/// Two nodes on one database: racing commits, concurrent fan-outs to one
/// mailbox, a commit before its epoch's messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_two_nodes_order_as_one() {
    let pg = server();
    let url = pg.create_database().await.unwrap();
    let (a, b) = tokio::join!(
        PgStore::connect(&url, StoreLimits::default()),
        PgStore::connect(&url, StoreLimits::default())
    );
    conformance::two_nodes(&a.unwrap(), &b.unwrap()).await;
}

/// Several nodes starting at once on a new database migrate it once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_nodes_starting_together_migrate_once() {
    let pg = server();
    let url = pg.create_database().await.unwrap();
    let (a, b, c) = tokio::join!(
        PgStore::connect(&url, StoreLimits::default()),
        PgStore::connect(&url, StoreLimits::default()),
        PgStore::connect(&url, StoreLimits::default())
    );
    let (a, _b, _c) = (a.unwrap(), b.unwrap(), c.unwrap());
    let (newest, at) = a.schema_versions().await.unwrap();
    assert_eq!(newest, at);
    assert!(
        a.pending(
            &umbra_proto::DeviceAddr::first(umbra_proto::AccountId::parse("AAAAAAAA").unwrap()),
            0,
            1,
            0
        )
        .await
        .unwrap()
        .is_empty()
    );
}
