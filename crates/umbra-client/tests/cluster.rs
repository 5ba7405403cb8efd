//! Servers on PostgreSQL: real clients through a node whose state is in a
//! private PostgreSQL server, and through two nodes sharing it (each
//! node's data directory holding the same certificate and keys, as an
//! operator deploys them).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;

use common::{Device, TestServer, activation_at, options};
use umbra_store::postgres::testing::PrivatePostgres;

/// Points the data directory's configuration at `url`.
fn use_database(data: &Path, url: &str) {
    let path = data.join("umbra-server.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(text.matches("\ndatabase = \"umbra.db\"").count(), 1);
    let text = text.replace(
        "\ndatabase = \"umbra.db\"",
        &format!("\ndatabase = \"{url}\""),
    );
    std::fs::write(&path, text).unwrap();
}

/// A second node's data directory: a copy of the first's files (the
/// configuration naming the shared database, the TLS certificate and key
/// devices pin, the key behind public delivery IDs).
fn second_node(first: &Path, second: &Path) {
    std::fs::create_dir_all(second.join("tls")).unwrap();
    for file in [
        "umbra-server.toml",
        "tls/cert.pem",
        "tls/key.pem",
        umbra_server::delivery_ids::KEY_FILE,
    ] {
        std::fs::copy(first.join(file), second.join(file)).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_talk_through_nodes_sharing_one_postgres() {
    let pg = PrivatePostgres::start(false).unwrap();
    let url = pg.create_database().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    umbra_server::init(&a, "127.0.0.1:0").unwrap();
    use_database(&a, &url);
    // Any delivery-ID key: the first start makes it; the copy needs it.
    std::fs::write(a.join(umbra_server::delivery_ids::KEY_FILE), [7u8; 16]).unwrap();
    second_node(&a, &b);
    let node_a = TestServer::start_in(&a, "127.0.0.1:0".parse().unwrap()).await;
    let node_b = TestServer::start_in(&b, "127.0.0.1:0".parse().unwrap()).await;
    assert!(
        !a.join("umbra.db").exists() && !b.join("umbra.db").exists(),
        "no node keeps an SQLite database"
    );

    // Alice and Carol on node A: live, both ways, as on one node.
    let mut alice = Device::activate(&node_a).await;
    let mut carol = Device::activate(&node_a).await;
    let (to_carol, to_alice) = common::befriend(&mut alice, &mut carol).await;
    alice
        .client
        .send_text(&to_carol, "on postgres")
        .await
        .unwrap();
    assert_eq!(carol.next_text().await, (alice.id(), "on postgres".into()));
    carol.client.send_text(&to_alice, "and back").await.unwrap();
    assert_eq!(alice.next_text().await, (carol.id(), "and back".into()));

    // Bob's line was issued through node B (the admin command on the
    // shared database), and his device uses node B. What one node stores
    // for a device, the other hands it when it connects. (Live pushes
    // between nodes need the cluster's routing; here each device finds
    // its mail when it connects.)
    let activation = activation_at(&b, node_b.address).await;
    let bob = Device::activate_untimed(&activation, options()).await;
    alice.client.add_contact(&bob.id()).await.unwrap();
    let mut bob = bob.reopen().await;
    bob.wait_for(|e| matches!(e, umbra_client::Event::ContactRequest { .. }).then_some(()))
        .await;
    let to_alice = bob.client.accept_contact(&alice.id()).await.unwrap();
    let mut alice = alice.reopen().await;
    alice
        .wait_for(|e| matches!(e, umbra_client::Event::ConversationStarted { .. }).then_some(()))
        .await;
    let to_bob = alice.client.conversation_with(&bob.id()).unwrap();
    alice
        .client
        .send_text(&to_bob, "across nodes")
        .await
        .unwrap();
    let mut bob = bob.reopen().await;
    assert_eq!(bob.next_text().await, (alice.id(), "across nodes".into()));
    bob.client.send_text(&to_alice, "received").await.unwrap();
    let mut alice = alice.reopen().await;
    assert_eq!(alice.next_text().await, (bob.id(), "received".into()));

    drop((alice, bob, carol));
    node_a.stop();
    node_b.stop();
}
