//! Servers on PostgreSQL: real clients through a node whose state is in a
//! private PostgreSQL server, and through two nodes sharing it (each
//! node's data directory holding the same certificate and keys, as an
//! operator deploys them), without and with NATS between the nodes (a
//! private nats-server on a random loopback port, killed and restarted).
//! The faults: a node killed while a device sends and while members
//! commit, PostgreSQL stopped and killed, a reconnect storm.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::{Device, TestServer, activation_at, options};
use umbra_server::cluster::testing::PrivateNats;
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
/// and the anchor devices pin, the key behind public delivery IDs). Not
/// the anchor's key: a node never needs it.
fn second_node(first: &Path, second: &Path) {
    std::fs::create_dir_all(second.join("tls")).unwrap();
    for file in [
        "umbra-server.toml",
        "tls/cert.pem",
        "tls/key.pem",
        "tls/anchor.pem",
        umbra_server::delivery_ids::KEY_FILE,
    ] {
        std::fs::copy(first.join(file), second.join(file)).unwrap();
    }
}

/// Two nodes' data directories (in the returned temporary directory) on
/// database `url`, and NATS if given: the first initialised, the second
/// its copy. (Any delivery-ID key will do: the first start would make
/// one, but the copy needs it now.)
fn data_directories(
    url: &str,
    nats: Option<&str>,
) -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    umbra_server::init(&a, "127.0.0.1:0").unwrap();
    use_database(&a, url);
    if let Some(nats) = nats {
        use_nats(&a, nats);
    }
    std::fs::write(a.join(umbra_server::delivery_ids::KEY_FILE), [7u8; 16]).unwrap();
    second_node(&a, &b);
    (dir, a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_talk_through_nodes_sharing_one_postgres() {
    let pg = PrivatePostgres::start(false).unwrap();
    let url = pg.create_database().await.unwrap();
    let (_dir, a, b) = data_directories(&url, None);
    use_metrics(&a, "127.0.0.1:0".parse().unwrap());
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

    // Node A's store queued what its devices sent and acknowledged, and
    // its metrics count the transactions that ran them and what they
    // carried.
    let metrics = *node_a.metrics.get().expect("node A serves metrics");
    for kind in ["fan_out", "ack"] {
        let series = |name: &str| format!("umbra_store_{name}_total{{kind=\"{kind}\"}}");
        let transactions = common::sample(metrics, &series("batch_transactions")).await;
        let items = common::sample(metrics, &series("batched_items")).await;
        assert!(
            transactions >= 1 && items >= transactions,
            "{kind}: {items} items in {transactions} transactions"
        );
        assert_eq!(common::sample(metrics, &series("batch_refused")).await, 0);
    }

    drop((alice, bob, carol));
    node_a.stop();
    node_b.stop();
}

/// What the cluster tests run on: a private PostgreSQL with a new
/// database (`url`), a private nats-server, and two nodes' data directories
/// (in `dir`) on both.
struct Cluster {
    pg: PrivatePostgres,
    url: String,
    nats: PrivateNats,
    dir: tempfile::TempDir,
    a: std::path::PathBuf,
    b: std::path::PathBuf,
}

impl Cluster {
    /// `durable`: PostgreSQL with fsync on (for tests that kill it).
    async fn start(durable: bool) -> Cluster {
        let pg = PrivatePostgres::start(durable).unwrap();
        let url = pg.create_database().await.unwrap();
        let nats = PrivateNats::start(None).unwrap();
        let (dir, a, b) = data_directories(&url, Some(&nats.url()));
        Cluster {
            pg,
            url,
            nats,
            dir,
            a,
            b,
        }
    }
}

/// A loopback address free at the moment (for a node started later).
fn free_address() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Sets `nats` in the data directory's configuration.
fn use_nats(data: &Path, url: &str) {
    let path = data.join("umbra-server.toml");
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str(&format!("\nnats = \"{url}\"\n"));
    std::fs::write(&path, text).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_wake_each_other_through_nats_and_poll_while_it_is_away() {
    let Cluster {
        pg: _pg,
        url: _,
        nats,
        dir: _dir,
        a,
        b,
    } = Cluster::start(false).await;
    let node_a = TestServer::start_in(&a, "127.0.0.1:0".parse().unwrap()).await;
    let node_b = TestServer::start_in(&b, "127.0.0.1:0".parse().unwrap()).await;

    // Alice on node A, Bob on node B: everything live, as on one node.
    let mut alice = Device::activate(&node_a).await;
    let mut bob = Device::activate(&node_b).await;
    let (to_bob, to_alice) = common::befriend(&mut alice, &mut bob).await;
    alice
        .client
        .send_text(&to_bob, "across nodes, live")
        .await
        .unwrap();
    assert_eq!(
        bob.next_text().await,
        (alice.id(), "across nodes, live".into())
    );
    bob.client
        .send_text(&to_alice, "and back, live")
        .await
        .unwrap();
    assert_eq!(alice.next_text().await, (bob.id(), "and back, live".into()));

    // NATS dies: nothing is lost, and what is sent meanwhile still comes,
    // found by the connections' polling of their mailboxes.
    let port = nats.kill();
    alice
        .client
        .send_text(&to_bob, "while NATS is away")
        .await
        .unwrap();
    assert_eq!(
        bob.next_text().await,
        (alice.id(), "while NATS is away".into())
    );
    // A device logging in meanwhile is served too (polled until NATS
    // returns), and so is its mail.
    let mut bob = tokio::time::timeout(common::PATIENCE, bob.reopen())
        .await
        .expect("a login while NATS is away completes");
    alice
        .client
        .send_text(&to_bob, "to the new session")
        .await
        .unwrap();
    assert_eq!(
        bob.next_text().await,
        (alice.id(), "to the new session".into())
    );

    // NATS returns (on the same address): live again.
    let nats = PrivateNats::start(Some(port)).unwrap();
    for n in 0..3 {
        bob.client
            .send_text(&to_alice, &format!("after NATS came back {n}"))
            .await
            .unwrap();
        assert_eq!(
            alice.next_text().await,
            (bob.id(), format!("after NATS came back {n}"))
        );
    }
    drop((alice, bob, nats));
    node_a.stop();
    node_b.stop();
}

/// Sets `metrics_listen` in the data directory's configuration.
fn use_metrics(data: &Path, address: std::net::SocketAddr) {
    let path = data.join("umbra-server.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let listen = "\n# metrics_listen = \"127.0.0.1:9464\"";
    assert_eq!(text.matches(listen).count(), 1);
    let text = text.replace(listen, &format!("\nmetrics_listen = \"{address}\""));
    std::fs::write(&path, text).unwrap();
}

/// Whether the node whose metrics listener is at `metrics` is connected
/// to NATS, once that has held for `within` or it is so.
async fn nats_connected_within(metrics: std::net::SocketAddr, within: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        // (Its metrics listener may not listen yet.)
        if common::scrape(metrics)
            .await
            .is_ok_and(|text| text.lines().any(|l| l == "umbra_nats_connected 1"))
        {
            return true;
        }
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A NATS that admits only the cluster's user: nodes given its password
/// (`UMBRA_NATS_PASSWORD`, the user named in `nats`) log in and route; a
/// node given another is refused, and its connections poll meanwhile
/// (what is sent to its devices still comes); given the right one again,
/// it logs in. (Before, a node could not log in to a NATS that asked for
/// credentials at all, so NATS had to admit anyone who could reach it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_log_in_to_nats_with_the_cluster_password() {
    let pg = PrivatePostgres::start(false).unwrap();
    let url = pg.create_database().await.unwrap();
    let mut secret = [0u8; 16];
    getrandom::getrandom(&mut secret).unwrap();
    let password = hex::encode(secret);
    // A user name with characters a URL escapes: the node logs in with
    // the name, not its escaped form.
    let nats = PrivateNats::start_with(None, Some(("umbra@cluster", &password))).unwrap();
    assert!(nats.url().starts_with("nats://umbra%40cluster@127.0.0.1:"));
    let (_dir, a, b) = data_directories(&url, Some(&nats.url()));
    let (metrics_a, metrics_b) = (free_address(), free_address());
    use_metrics(&a, metrics_a);
    use_metrics(&b, metrics_b);
    let right = [("UMBRA_NATS_PASSWORD", password.as_str())];
    let wrong = [("UMBRA_NATS_PASSWORD", "not the password")];
    let node_a = common::ServerProcess::start_with_env(&a, None, &right).await;
    let node_b = common::ServerProcess::start_with_env(&b, None, &right).await;
    let started = tokio::time::Instant::now();
    assert!(nats_connected_within(metrics_a, common::PATIENCE).await);
    assert!(nats_connected_within(metrics_b, common::PATIENCE).await);
    let took = started.elapsed();

    // Alice on A, Bob on B, live both ways.
    let mut alice = Device::activate_untimed(&node_a.activation().await, options()).await;
    let mut bob = Device::activate_untimed(&node_b.activation().await, options()).await;
    let (to_bob, to_alice) = common::befriend(&mut alice, &mut bob).await;

    // B again with a wrong password: refused (for ten times as long as the
    // logins took, at least 3 s, its metrics answering), and what Alice
    // sends Bob still comes, found by B's polling.
    let address_b = node_b.address;
    drop(node_b);
    let node_b = common::ServerProcess::start_with_env(&b, Some(address_b), &wrong).await;
    assert!(
        !nats_connected_within(metrics_b, (took * 10).max(Duration::from_secs(3))).await,
        "a node with the wrong password is not let in"
    );
    assert_eq!(common::sample(metrics_b, "umbra_nats_connected").await, 0);
    let mut bob = bob.reopen().await;
    alice
        .client
        .send_text(&to_bob, "to a node that polls")
        .await
        .unwrap();
    assert_eq!(
        bob.next_text().await,
        (alice.id(), "to a node that polls".into())
    );

    // B again with the password: in, and live both ways.
    drop(node_b);
    let node_b = common::ServerProcess::start_with_env(&b, Some(address_b), &right).await;
    assert!(nats_connected_within(metrics_b, common::PATIENCE).await);
    let mut bob = bob.reopen().await;
    bob.client.send_text(&to_alice, "and back").await.unwrap();
    assert_eq!(alice.next_text().await, (bob.id(), "and back".into()));
    alice.client.send_text(&to_bob, "and there").await.unwrap();
    assert_eq!(bob.next_text().await, (alice.id(), "and there".into()));
    drop((alice, bob, node_a, node_b, nats));
}

/// Sets `key`, which the data directory's configuration sets once, to
/// `value`.
fn configure(data: &Path, key: &str, value: &str) {
    let path = data.join("umbra-server.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with(&format!("{key} = ")))
        .unwrap_or_else(|| panic!("{key} is not set in {}", path.display()))
        .to_owned();
    std::fs::write(&path, text.replace(&line, &format!("{key} = {value}"))).unwrap();
}

/// The address `node`'s metrics listener was bound to, once it is.
async fn metrics_of(node: &TestServer) -> std::net::SocketAddr {
    let started = std::time::Instant::now();
    loop {
        if let Some(address) = node.metrics.get() {
            return *address;
        }
        assert!(started.elapsed() < common::PATIENCE, "no metrics listener");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An account's hourly delivery budget is the cluster's, not each node's:
/// the nodes tell each other over NATS what they charged, so an account
/// that spent its budget through one node is refused by the next it
/// connects to (before, it got a fresh budget on every node), while
/// another account there goes on sending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_spends_one_budget_across_the_nodes() {
    let Cluster {
        pg: _pg,
        url: _,
        nats,
        dir: _dir,
        a,
        b,
    } = Cluster::start(false).await;
    for data in [&a, &b] {
        configure(data, "delivery_bytes_per_hour", "65536");
        use_metrics(data, "127.0.0.1:0".parse().unwrap());
    }
    // Every device lists both nodes; node B starts only once all are in,
    // so all are on node A.
    let address_b = free_address();
    let node_a = TestServer::start_in(&a, "127.0.0.1:0".parse().unwrap()).await;
    let both = format!("{},{address_b}", node_a.address);
    let mut devices = Vec::new();
    for _ in 0..3 {
        let mut activation = activation_at(&a, node_a.address).await;
        activation.address = both.clone();
        devices.push(Device::activate_untimed(&activation, options()).await);
    }
    let (mut alice, mut bob, mut carol) = (devices.remove(0), devices.remove(0), devices.remove(0));
    let (to_bob, to_alice) = common::befriend(&mut alice, &mut bob).await;
    let (carol_to_bob, _) = common::befriend(&mut carol, &mut bob).await;
    let node_b = TestServer::start_in(&b, address_b).await;
    let (metrics_a, metrics_b) = (metrics_of(&node_a).await, metrics_of(&node_b).await);
    let told = || common::counter(metrics_a, "cluster_charges_told_bytes");
    let heard = || common::counter(metrics_b, "cluster_charges_heard_bytes");

    // Node B hears what node A charges (Carol's small messages to Bob,
    // until it does: it may subscribe after the first are told; Alice
    // pays nothing for them). What A told before B listened never reaches
    // B, so the counts are compared from a moment when both have stood
    // still since.
    let started = std::time::Instant::now();
    while heard().await == 0 {
        assert!(started.elapsed() < common::PATIENCE, "node B never heard");
        carol
            .client
            .send_text(&carol_to_bob, "small")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let mut before = (told().await, heard().await);
    loop {
        assert!(
            started.elapsed() < common::PATIENCE,
            "the counts never settled"
        );
        tokio::time::sleep(Duration::from_millis(600)).await;
        let now = (told().await, heard().await);
        if now == before {
            break;
        }
        before = now;
    }
    let (told_before, heard_before) = before;

    // Alice spends her budget on node A.
    let filler = "y".repeat(8 * 1024);
    let sent = sent_until_over_budget(&alice, &to_bob, &filler).await;
    assert!((7..=8).contains(&sent), "{sent} of 8 KiB fit 64 KiB");
    // Node B has heard all node A told since.
    let started = std::time::Instant::now();
    loop {
        let told_since = told().await - told_before;
        let heard_since = heard().await - heard_before;
        if told_since >= (sent as u64) * 8 * 1024 && told_since == heard_since {
            break;
        }
        assert!(
            started.elapsed() < common::PATIENCE,
            "told {told_since}, heard {heard_since}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Node A heard nothing: node B charged nothing, and what A tells comes
    // back to A too, which must not count it again.
    assert_eq!(
        common::counter(metrics_a, "cluster_charges_heard_bytes").await,
        0
    );

    // Node A goes; the devices move to node B. Alice's budget is spent
    // there too (one more message at most, had the last charge not been
    // told yet); Bob's is not.
    node_a.stop();
    let accepted_on_b = sent_until_over_budget(&alice, &to_bob, &filler).await;
    assert!(
        accepted_on_b <= 1,
        "node B accepted {accepted_on_b} more of 8 KiB after node A had refused"
    );
    send_on_any_node(&bob, &to_alice, "still served")
        .await
        .unwrap();
    assert_eq!(alice.next_text().await, (bob.id(), "still served".into()));
    drop((alice, bob, carol, nats));
    node_b.stop();
}

/// A node whose `delivery-ids.key` is not the cluster's (an operator's
/// copying mistake) shares no budget, and says so: what the others tell it
/// fails its tag check, is counted as forged in its metrics and charges
/// nothing. (Before, such a node silently kept budgets of its own, and
/// anyone able to publish on NATS could charge any budget it could name.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_another_key_is_told_nothing_and_says_so() {
    let Cluster {
        pg: _pg,
        url: _,
        nats,
        dir: _dir,
        a,
        b,
    } = Cluster::start(false).await;
    std::fs::write(b.join(umbra_server::delivery_ids::KEY_FILE), [8u8; 16]).unwrap();
    for data in [&a, &b] {
        use_metrics(data, "127.0.0.1:0".parse().unwrap());
    }
    let node_a = TestServer::start_in(&a, "127.0.0.1:0".parse().unwrap()).await;
    let node_b = TestServer::start_in(&b, "127.0.0.1:0".parse().unwrap()).await;
    let (metrics_a, metrics_b) = (metrics_of(&node_a).await, metrics_of(&node_b).await);
    let mut alice =
        Device::activate_untimed(&activation_at(&a, node_a.address).await, options()).await;
    let mut bob =
        Device::activate_untimed(&activation_at(&a, node_a.address).await, options()).await;
    let (to_bob, _) = common::befriend(&mut alice, &mut bob).await;

    // Alice sends through node A, which tells what it charges, until node
    // B has refused a message of it.
    let forged = "umbra_cluster_spent_refused_total{reason=\"forged\"} ";
    let started = std::time::Instant::now();
    loop {
        alice.client.send_text(&to_bob, "charged").await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let refused = common::scrape(metrics_b).await.unwrap();
        if refused.lines().any(|l| l.starts_with(forged)) {
            break;
        }
        assert!(
            started.elapsed() < common::PATIENCE,
            "node B never refused a message: {refused}"
        );
    }
    assert!(common::counter(metrics_a, "cluster_charges_told_bytes").await > 0);
    assert_eq!(
        common::counter(metrics_b, "cluster_charges_heard_bytes").await,
        0,
        "node B counted what was not under its key"
    );
    drop((alice, bob, nats));
    node_a.stop();
    node_b.stop();
}

/// A device is linked through whichever node it reaches: the rendezvous
/// is held by the node the account's device opened it on, and the other
/// forwards the new device's puts and gets to it over NATS. (Before, the
/// new device was told the rendezvous did not exist unless it happened to
/// reach the same node, and devices try the nodes in turn.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_links_through_another_node_than_its_accounts() {
    let Cluster {
        pg: _pg,
        url: _,
        nats,
        dir: _dir,
        a,
        b,
    } = Cluster::start(false).await;
    let node_a = TestServer::start_in(&a, "127.0.0.1:0".parse().unwrap()).await;
    let node_b = TestServer::start_in(&b, "127.0.0.1:0".parse().unwrap()).await;
    let mut phone = Device::activate(&node_a).await;
    let mut bob = Device::activate(&node_a).await;
    let (to_bob, _) = common::befriend(&mut phone, &mut bob).await;
    phone
        .client
        .send_text(&to_bob, "before the laptop")
        .await
        .unwrap();
    assert_eq!(bob.next_text().await.1, "before the laptop");

    // The phone opens the rendezvous on node A; the laptop reaches node B.
    let pending = phone.client.start_link().await.unwrap();
    let home = tempfile::tempdir().unwrap();
    let (laptop, link) = link_laptop_through(&phone, pending, &node_b, home.path()).await;

    // The laptop, on node B, speaks as the account to Bob on node A.
    let to_bob = laptop.conversation_with(&bob.id()).unwrap();
    laptop.send_text(&to_bob, "from the laptop").await.unwrap();
    assert_eq!(
        bob.next_text().await,
        (phone.id(), "from the laptop".into())
    );

    // A rendezvous no node holds is unknown at once through node B (no
    // node listens for it; a holder would have 5 s to answer).
    let mut unheld = link.clone();
    unheld.rendezvous = umbra_proto::RendezvousId([0x5a; 16]);
    let other_home = tempfile::tempdir().unwrap();
    let started = std::time::Instant::now();
    let refused = umbra_client::Client::join_link(
        other_home.path(),
        &common::passphrase(),
        &unheld,
        "tablet",
        options(),
    )
    .await;
    let Err(error) = refused else {
        panic!("an unknown rendezvous linked a device");
    };
    assert!(error.to_string().contains("start again"), "{error}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "refused after {:?}",
        started.elapsed()
    );
    drop((phone, bob, laptop, nats));
    node_a.stop();
    node_b.stop();
}

/// Links a laptop, kept in `home`, to `phone`'s account through `node`
/// (`pending`: the phone's link, opened on its own node): the laptop, and
/// the link string it was given.
async fn link_laptop_through(
    phone: &Device,
    pending: umbra_client::PendingLink,
    node: &TestServer,
    home: &Path,
) -> (umbra_client::Client, umbra_client::LinkString) {
    let mut link: umbra_client::LinkString = pending.link_string().to_string().parse().unwrap();
    link.address = node.address.to_string();
    let finishing = tokio::spawn(pending.finish());
    let (laptop, joined) =
        umbra_client::Client::join_link(home, &common::passphrase(), &link, "laptop", options())
            .await
            .expect("the laptop links");
    let linked = finishing.await.unwrap().unwrap();
    assert_eq!(joined.account, phone.id());
    assert_eq!(joined.device, linked.device);
    assert_eq!(joined.conversations, Some(linked.conversations));
    (laptop, link)
}

/// A rendezvous opened while NATS is away is found through another node
/// once NATS is back: its holder's subscription waits for NATS, as the
/// node's others do, and the device being linked, told `SERVER_BUSY`
/// meanwhile, asks again. (Before, a node opening a rendezvous while NATS
/// was away never answered for it on NATS: the laptop was told it did not
/// exist.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rendezvous_opened_while_nats_is_away_is_found_once_it_is_back() {
    let Cluster {
        pg: _pg,
        url: _,
        nats,
        dir: _dir,
        a,
        b,
    } = Cluster::start(false).await;
    let node_a = TestServer::start_in(&a, "127.0.0.1:0".parse().unwrap()).await;
    let node_b = TestServer::start_in(&b, "127.0.0.1:0".parse().unwrap()).await;
    let phone = Device::activate(&node_a).await;

    let port = nats.kill();
    let pending = phone.client.start_link().await.unwrap();
    let nats = PrivateNats::start(Some(port)).unwrap();
    let home = tempfile::tempdir().unwrap();
    link_laptop_through(&phone, pending, &node_b, home.path()).await;
    drop((phone, nats));
    node_a.stop();
    node_b.stop();
}

/// The device being linked rides out `SERVER_BUSY` after its login too:
/// NATS is killed the moment the laptop logs in on node B (so its next
/// steps, forwarded to node A which holds the rendezvous, are answered
/// busy) and started again 3 s later; the link completes. (Before, the
/// steps after the login gave up at the first busy answer, leaving the
/// laptop in the account's device list and no device.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_being_linked_rides_out_a_busy_node_after_its_login() {
    let Cluster {
        pg: _pg,
        url: _,
        nats,
        dir: _dir,
        a,
        b,
    } = Cluster::start(false).await;
    let port: u16 = nats.url().rsplit(':').next().unwrap().parse().unwrap();
    let nats = Arc::new(std::sync::Mutex::new(Some(nats)));
    let node_a = TestServer::start_in(&a, "127.0.0.1:0".parse().unwrap()).await;
    let watched = Arc::clone(&nats);
    let watch: common::Watch = Arc::new(move |direction, bytes: &[u8]| {
        let login = matches!(
            umbra_proto::decode_client(bytes),
            Ok(umbra_proto::frame::ClientFrame {
                request: umbra_proto::Request::Login { .. },
                ..
            })
        );
        if direction == umbra_server::Direction::Inbound && login {
            // Killed (SIGKILL) before node B acts on the login.
            drop(watched.lock().unwrap().take());
        }
    });
    let node_b = TestServer::start_in_watched(&b, "127.0.0.1:0".parse().unwrap(), watch).await;
    let phone = Device::activate(&node_a).await;

    let pending = phone.client.start_link().await.unwrap();
    let restarting = tokio::spawn(async move {
        while nats.lock().unwrap().is_some() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
        PrivateNats::start(Some(port)).unwrap()
    });
    let home = tempfile::tempdir().unwrap();
    link_laptop_through(&phone, pending, &node_b, home.path()).await;
    let nats = restarting.await.unwrap();
    drop((phone, nats));
    node_a.stop();
    node_b.stop();
}

/// Sends `filler` from `device` (through whichever node answers) until it
/// is refused for its account's hourly budget; how many were accepted.
async fn sent_until_over_budget(
    device: &Device,
    to: &umbra_client::ConversationId,
    filler: &str,
) -> usize {
    let mut sent = 0;
    let refusal = loop {
        match send_on_any_node(device, to, filler).await {
            Ok(()) => sent += 1,
            Err(error) => break error,
        }
        assert!(sent < 20, "the budget never ran out");
    };
    assert_eq!(
        refusal.server_code(),
        Some(umbra_client::ErrorCode::QuotaExceeded),
        "{refusal}"
    );
    assert!(refusal.to_string().contains("this hour"), "{refusal}");
    sent
}

/// Sends `text` from `device`, connecting it again (to whichever node
/// answers) while the send fails for want of a server; the server's own
/// refusal is returned.
async fn send_on_any_node(
    device: &Device,
    to: &umbra_client::ConversationId,
    text: &str,
) -> Result<(), umbra_client::ClientError> {
    let started = std::time::Instant::now();
    loop {
        match device.client.send_text(to, text).await {
            Ok(_) => return Ok(()),
            Err(error) if error.server_code().is_some() => return Err(error),
            Err(error) => {
                assert!(started.elapsed() < common::PATIENCE, "never sent: {error}");
                reconnect(device).await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Connects `device` again (to whichever node answers) until it is in.
async fn reconnect(device: &Device) -> Duration {
    let started = std::time::Instant::now();
    while !device.client.is_connected() {
        assert!(started.elapsed() < common::PATIENCE, "never served again");
        if device.client.connect().await.is_err() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_nodes_devices_go_to_another_and_nothing_accepted_is_lost() {
    let Cluster {
        pg: _pg,
        url: _,
        nats,
        dir: _dir,
        a,
        b,
    } = Cluster::start(false).await;
    // Real processes: the node is killed with SIGKILL. Node B starts only
    // once both devices are in, so both are on node A, the one killed.
    let address_b = free_address();
    let node_a = common::ServerProcess::start(&a, None).await;
    let mut activation = activation_at(&a, node_a.address).await;
    activation.address = format!("{},{address_b}", node_a.address);
    let mut alice = Device::activate_untimed(&activation, options()).await;
    let mut activation = activation_at(&a, node_a.address).await;
    activation.address = format!("{address_b},{}", node_a.address);
    let mut bob = Device::activate_untimed(&activation, options()).await;
    let (to_bob, _) = common::befriend(&mut alice, &mut bob).await;
    let node_b = common::ServerProcess::start(&b, Some(address_b)).await;

    // Alice sends; node A dies in the middle. Whatever her device was told
    // was accepted reaches Bob exactly once, in order; what failed (its
    // answer lost with the node) she sends again, as a new message.
    let mut accepted = Vec::new();
    let mut node_a = Some(node_a);
    let mut served_again = None;
    for n in 0..30 {
        if n == 10 {
            node_a.take().unwrap().kill();
        }
        let mut attempt = 0;
        loop {
            let text = format!("message {n} attempt {attempt}");
            match alice.client.send_text(&to_bob, &text).await {
                Ok(_) => {
                    accepted.push(text);
                    break;
                }
                Err(_) => {
                    let took = reconnect(&alice).await;
                    served_again.get_or_insert(took);
                    attempt += 1;
                }
            }
        }
    }
    if !bob.client.is_connected() {
        served_again.get_or_insert(reconnect(&bob).await);
    }
    let mut received = Vec::new();
    while received.len() < accepted.len() || received.last() != accepted.last() {
        let (from, text) = bob.next_text().await;
        assert_eq!(from, alice.id());
        received.push(text);
    }
    let kept: Vec<&String> = received.iter().filter(|t| accepted.contains(t)).collect();
    assert_eq!(
        kept,
        accepted.iter().collect::<Vec<_>>(),
        "every accepted message once, in order"
    );
    let mut unique = received.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), received.len(), "nothing twice: {received:?}");
    let took = served_again.expect("the devices were on the node killed");
    eprintln!("served again {took:?} after the node was killed");
    assert!(
        took < Duration::from_secs(10),
        "a killed node's device was served again after {took:?}"
    );
    drop((alice, bob, nats, node_b));
}

/// Sends `text` until it is accepted, within `patience`; every failure
/// meanwhile must be the database's absence.
async fn send_when_back(
    device: &Device,
    to: &umbra_client::ConversationId,
    text: &str,
    patience: Duration,
) {
    let started = std::time::Instant::now();
    while let Err(error) = device.client.send_text(to, text).await {
        assert_eq!(
            error.server_code(),
            Some(umbra_client::ErrorCode::ServerBusy),
            "{error}"
        );
        assert!(started.elapsed() < patience, "not served again: {error}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The cluster's database stopped where it is (SIGSTOP) and let go, then
/// killed (SIGKILL) and started again: meanwhile a device's sends are
/// refused as SERVER_BUSY, at once once the node knows; afterwards they
/// are accepted again, and every message that was accepted arrives
/// exactly once, in order, on the other node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_are_refused_at_once_while_postgres_is_away_and_nothing_accepted_is_lost() {
    let Cluster {
        mut pg,
        nats,
        dir: _dir,
        a,
        b,
        ..
    } = Cluster::start(true).await;
    let node_a = TestServer::start_in(&a, "127.0.0.1:0".parse().unwrap()).await;
    let node_b = TestServer::start_in(&b, "127.0.0.1:0".parse().unwrap()).await;
    let mut alice = Device::activate(&node_a).await;
    let mut bob = Device::activate(&node_b).await;
    let (to_bob, _) = common::befriend(&mut alice, &mut bob).await;

    let mut accepted = Vec::new();
    for outage in ["paused", "killed"] {
        for n in 0..3 {
            let text = format!("before {outage} {n}");
            alice.client.send_text(&to_bob, &text).await.unwrap();
            accepted.push(text);
        }
        if outage == "paused" {
            pg.pause().unwrap();
        } else {
            pg.kill().unwrap();
        }
        // The first send waits until the node finds the database away (a
        // probe a second, two without an answer, each patient for 2 s);
        // those after it are refused at once (about a millisecond; a
        // transaction's own bound is 15 s).
        let mut took = Vec::new();
        for n in 0..5 {
            let asked = std::time::Instant::now();
            let refused = alice
                .client
                .send_text(&to_bob, &format!("while {outage} {n}"))
                .await
                .expect_err("nothing is stored while the database is away");
            assert_eq!(
                refused.server_code(),
                Some(umbra_client::ErrorCode::ServerBusy),
                "{refused}"
            );
            took.push(asked.elapsed());
        }
        eprintln!("{outage}: sends refused after {took:?}");
        // SERVER_BUSY (checked above) is the probe's answer: the
        // transaction's own 15 s bound answers INTERNAL. Under a loaded
        // machine the probes take longer than their nominal 5 s.
        assert!(took[0] < Duration::from_secs(14), "{took:?}");
        assert!(
            took[1..].iter().all(|t| *t < Duration::from_secs(2)),
            "{took:?}"
        );
        if outage == "paused" {
            pg.resume().unwrap();
        } else {
            pg.restart().unwrap();
        }
        let text = format!("after {outage}");
        send_when_back(&alice, &to_bob, &text, common::PATIENCE).await;
        accepted.push(text);
    }

    let mut received = Vec::new();
    while received.len() < accepted.len() {
        let (from, text) = bob.next_text().await;
        assert_eq!(from, alice.id());
        received.push(text);
    }
    assert_eq!(received, accepted, "every accepted message once, in order");
    drop((alice, bob, nats));
    node_a.stop();
    node_b.stop();
}

/// Commits (key updates) until one goes through, connecting again (to
/// whichever node answers) after a failure; a commit cut off by a dying
/// node stays pending in the device and is settled on the next connection.
/// Returns how many attempts failed.
async fn update_keys_through(device: &Device) -> usize {
    let started = std::time::Instant::now();
    let mut failed = 0;
    while let Err(error) = device.client.update_keys().await {
        assert!(
            started.elapsed() < common::PATIENCE,
            "never committed: {error}"
        );
        eprintln!("a commit failed: {error}");
        failed += 1;
        reconnect(device).await;
    }
    failed
}

/// `rounds` key updates, one after the other, each counted in `done`;
/// returns how many attempts failed.
async fn commit_rounds(
    device: &Device,
    rounds: usize,
    done: &std::sync::atomic::AtomicUsize,
) -> usize {
    let mut failed = 0;
    for _ in 0..rounds {
        failed += update_keys_through(device).await;
        done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
    failed
}

/// Every group's commits, as the database holds them, are one per epoch
/// from its first to the one before its current epoch: no gap.
async fn assert_no_epoch_gap(url: &str) {
    let groups = umbra_store::postgres::testing::query(
        url,
        "SELECT encode(g.group_id, 'hex'), g.epoch, \
                string_agg(c.epoch::text, ',' ORDER BY c.epoch) \
         FROM groups g JOIN group_commits c ON c.group_id = g.group_id \
         GROUP BY g.group_id, g.epoch",
    )
    .await
    .unwrap();
    assert!(!groups.is_empty());
    for row in groups {
        let [Some(group), Some(epoch), Some(commits)] = &row[..] else {
            panic!("{row:?}");
        };
        let epoch: u64 = epoch.parse().unwrap();
        let commits: Vec<u64> = commits.split(',').map(|e| e.parse().unwrap()).collect();
        let first = commits[0];
        assert_eq!(
            commits,
            (first..epoch).collect::<Vec<_>>(),
            "group {group}: one commit per epoch up to {epoch}"
        );
    }
}

/// A node killed (SIGKILL) while two members commit through it, racing for
/// the same epochs: their devices go to the other node, the commits cut off
/// are settled, the database holds one commit per epoch with no gap, and
/// the group is not stuck: everyone reads everyone afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_in_the_middle_of_commits_leaves_no_gap_and_no_stuck_group() {
    let Cluster {
        pg: _pg,
        url,
        nats,
        dir: _dir,
        a,
        b,
    } = Cluster::start(false).await;
    let address_b = free_address();
    let node_a = common::ServerProcess::start(&a, None).await;
    let mut devices = Vec::new();
    for _ in 0..3 {
        let mut activation = activation_at(&a, node_a.address).await;
        activation.address = format!("{},{address_b}", node_a.address);
        devices.push(Device::activate_untimed(&activation, options()).await);
    }
    let [mut alice, mut bob, mut carol] = <[Device; 3]>::try_from(devices).ok().unwrap();
    common::befriend(&mut alice, &mut bob).await;
    common::befriend(&mut alice, &mut carol).await;
    let group = alice
        .client
        .create_group("through a dying node", &[bob.id(), carol.id()])
        .await
        .unwrap();
    for device in [&mut bob, &mut carol] {
        device
            .wait_for(|e| {
                matches!(e, umbra_client::Event::ConversationStarted { .. }).then_some(())
            })
            .await;
    }
    let node_b = common::ServerProcess::start(&b, Some(address_b)).await;

    // Bob and Carol commit at once, round after round; node A dies once
    // four commits went through, with the next ones under way.
    let done = std::sync::atomic::AtomicUsize::new(0);
    let killer = async {
        while done.load(std::sync::atomic::Ordering::SeqCst) < 4 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        node_a.kill();
    };
    let (bob_failed, carol_failed, ()) = tokio::join!(
        commit_rounds(&bob, 6, &done),
        commit_rounds(&carol, 6, &done),
        killer
    );
    // The node died under commits in flight: at least one was cut off.
    assert!(bob_failed + carol_failed > 0, "the kill cut no commit off");

    assert_no_epoch_gap(&url).await;
    if !alice.client.is_connected() {
        reconnect(&alice).await;
    }
    for (from, text) in [
        (&bob, "from bob"),
        (&carol, "from carol"),
        (&alice, "from alice"),
    ] {
        from.client.send_text(&group, text).await.unwrap();
    }
    for (device, expected) in [
        (&mut alice, ["from bob", "from carol"]),
        (&mut bob, ["from alice", "from carol"]),
        (&mut carol, ["from alice", "from bob"]),
    ] {
        let mut got = vec![device.next_text().await.1, device.next_text().await.1];
        got.sort();
        assert_eq!(got, expected);
    }
    drop((alice, bob, carol, nats, node_b));
}

/// A reconnect storm spread over the nodes: sixteen pairs whose devices
/// list both nodes; the receivers are away while their senders write,
/// then all thirty-two devices connect again at the same moment (each
/// attempt starting one node further along, so they land on both). Every
/// device is served, every message stored meanwhile arrives exactly once
/// and in order, and delivery is live again across the nodes after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_storm_over_two_nodes_loses_nothing() {
    const PAIRS: usize = 16;
    const BACKLOG: usize = 5;
    let Cluster {
        pg: _pg,
        url: _,
        nats,
        dir: _dir,
        a,
        b,
    } = Cluster::start(false).await;
    let node_a = TestServer::start_in(&a, "127.0.0.1:0".parse().unwrap()).await;
    let node_b = TestServer::start_in(&b, "127.0.0.1:0".parse().unwrap()).await;
    let both = format!("{},{}", node_a.address, node_b.address);
    let mut pairs = Vec::new();
    for _ in 0..PAIRS {
        let mut devices = Vec::new();
        for _ in 0..2 {
            let mut activation = activation_at(&a, node_a.address).await;
            activation.address = both.clone();
            devices.push(Device::activate_untimed(&activation, options()).await);
        }
        let (mut sender, mut receiver) = (devices.remove(0), devices.remove(0));
        let (to_receiver, _) = common::befriend(&mut sender, &mut receiver).await;
        pairs.push((sender, receiver, to_receiver));
    }

    for (sender, receiver, to_receiver) in &pairs {
        receiver.client.disconnect();
        for n in 0..BACKLOG {
            sender
                .client
                .send_text(to_receiver, &format!("stored {n}"))
                .await
                .unwrap();
        }
        sender.client.disconnect();
    }
    let storm = std::time::Instant::now();
    let all = pairs
        .iter()
        .flat_map(|(sender, receiver, _)| [sender, receiver]);
    let connected = futures_util::future::join_all(all.map(|device| async move {
        let started = std::time::Instant::now();
        while let Err(error) = device.client.connect().await {
            assert!(
                started.elapsed() < common::PATIENCE,
                "never served: {error}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }))
    .await;
    eprintln!(
        "{} devices served again {:?} after the storm began",
        connected.len(),
        storm.elapsed()
    );

    for (sender, receiver, to_receiver) in &mut pairs {
        for n in 0..BACKLOG {
            assert_eq!(
                receiver.next_text().await,
                (sender.id(), format!("stored {n}"))
            );
        }
        sender.client.send_text(to_receiver, "live").await.unwrap();
        assert_eq!(receiver.next_text().await, (sender.id(), "live".into()));
    }
    drop((pairs, nats));
    node_a.stop();
    node_b.stop();
}

/// However many requests to poll a node hears, its connections read their
/// mailboxes at most once a second: after NATS returns every node asks
/// every node, and N nodes must not make each connection read N times.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_requests_to_poll_costs_one_read_a_second() {
    let cluster = Cluster::start(false).await;
    let node = TestServer::start_configured({
        let a = cluster.a.clone();
        move |config| {
            let loaded = umbra_server::Config::load(&a).unwrap();
            config.database = loaded.database;
            config.nats = loaded.nats;
            config.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
        }
    })
    .await;
    let deadline = tokio::time::Instant::now() + common::PATIENCE;
    let metrics = loop {
        if let Some(address) = node.metrics.get() {
            break *address;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no metrics listener"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // Another member of the cluster, as a node would speak. Asked once at
    // a time until the node hears (its subscription reaches NATS after it
    // starts listening: a request before that is heard by nobody).
    let asker = umbra_server::cluster::Cluster::connect(&cluster.nats.url(), None)
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + common::PATIENCE;
    while common::counter(metrics, "cluster_polls").await == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the node never heard"
        );
        asker.ask_all_to_poll().await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Quiet for longer than a period; then the flood.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let base = common::counter(metrics, "cluster_polls").await;
    let asked = std::time::Instant::now();
    for _ in 0..500 {
        asker.ask_all_to_poll().await;
    }
    // The first is served at once, the rest as one more a second later.
    let deadline = tokio::time::Instant::now() + common::PATIENCE;
    while common::counter(metrics, "cluster_polls").await < base + 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the node never polled"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // As long again as the requests took to send, and a second more:
    // nothing else comes of them.
    tokio::time::sleep(asked.elapsed() + Duration::from_secs(1)).await;
    let polls = common::counter(metrics, "cluster_polls").await - base;
    let allowed = 2 + asked.elapsed().as_secs();
    assert!(
        (2..=allowed).contains(&polls),
        "{polls} polls for 500 requests in {:?}",
        asked.elapsed()
    );
}
