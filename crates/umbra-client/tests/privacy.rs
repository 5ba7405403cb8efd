//! The server never holds plaintext: known plaintexts are sent one-to-one and
//! in a group, then the server's files and every frame it received or sent
//! are scanned for them.

mod common;

use common::{Device, TestServer, befriend};
use umbra_client::Event;

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_plaintext_reaches_the_server() {
    let server = TestServer::start().await;
    let mut alice = Device::activate(&server).await;
    let mut bob = Device::activate(&server).await;
    let mut carol = Device::activate(&server).await;
    let (direct, _) = befriend(&mut alice, &mut bob).await;
    befriend(&mut alice, &mut carol).await;

    let secrets = [
        "CANARY-one-to-one-7f3a9c",
        "CANARY-reply-51d2e0",
        "CANARY-group-message-9b44",
        "CANARY-GROUP-NAME-c0ffee",
    ];
    alice.client.send_text(&direct, secrets[0]).await.unwrap();
    assert_eq!(bob.next_text().await.1, secrets[0]);
    bob.client.send_text(&direct, secrets[1]).await.unwrap();
    assert_eq!(alice.next_text().await.1, secrets[1]);
    let group = alice
        .client
        .create_group(secrets[3], &[bob.id(), carol.id()])
        .await
        .unwrap();
    carol
        .wait_for(|e| matches!(e, Event::ConversationStarted { .. }).then_some(()))
        .await;
    alice.client.send_text(&group, secrets[2]).await.unwrap();
    assert_eq!(carol.next_text().await.1, secrets[2]);
    assert_eq!(carol.client.conversation(&group).unwrap().name, secrets[3]);
    // Bob reads his while offline, so his copy sat in the mailbox first.
    assert_eq!(bob.next_text().await.1, secrets[2]);

    // The devices' own stores are encrypted too: no canary in their files.
    let mut files = Vec::new();
    for device in [&alice, &bob, &carol] {
        for entry in std::fs::read_dir(device.home.path()).unwrap() {
            files.push(entry.unwrap().path());
        }
    }
    let frames = server.frames();
    let data = server.data.clone();
    assert!(
        frames.len() > 50,
        "the tap saw the traffic ({} frames)",
        frames.len()
    );
    // The server's files while it runs (WAL included), then after it stopped.
    let mut contents = read_all(walk(&data));
    let wal_seen = contents
        .iter()
        .any(|(name, _)| name.ends_with("umbra.db-wal"));
    let _kept = server.stop();
    contents.extend(read_all(walk(&data)));
    contents.extend(read_all(files));
    assert!(wal_seen, "the live WAL file was scanned");
    // Control: what the server may know (account IDs) is found by the same
    // scan, so a miss above means absence, not a blind scan.
    let alice_id = alice.id();
    assert!(
        contents
            .iter()
            .any(|(_, bytes)| contains(bytes, alice_id.as_str().as_bytes()))
    );
    assert!(
        frames
            .iter()
            .any(|(_, frame)| contains(frame, alice_id.as_str().as_bytes()))
    );
    for secret in secrets {
        for (direction, frame) in &frames {
            assert!(
                !contains(frame, secret.as_bytes()),
                "{secret} crossed the wire in a {direction:?} frame"
            );
        }
        for (name, bytes) in &contents {
            assert!(
                !contains(bytes, secret.as_bytes()),
                "{secret} found in {name}"
            );
        }
    }
}

fn read_all(paths: Vec<std::path::PathBuf>) -> Vec<(String, Vec<u8>)> {
    paths
        .into_iter()
        .filter_map(|path| Some((path.display().to_string(), std::fs::read(&path).ok()?)))
        .collect()
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// MLS authenticates who sent a group's message to its recipients; the
/// server neither keeps the sender of an application message, commit,
/// proposal or Welcome in its mailbox nor sends it with the delivery. Its
/// own notices (a contact request here) still name theirs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_keeps_and_sends_no_sender_of_what_members_send() {
    use umbra_proto::{DeliveryKind, Push, ServerMessage};
    let server = TestServer::start().await;
    let mut alice = Device::activate(&server).await;
    let mut bob = Device::activate(&server).await;
    let mut carol = Device::activate(&server).await;
    let (direct, _) = befriend(&mut alice, &mut bob).await;
    befriend(&mut alice, &mut carol).await;
    bob.client.disconnect();
    let dave = Device::activate(&server).await;
    dave.client.add_contact(&bob.id()).await.unwrap();

    // While Bob is away: a text, a group (Welcome), its name (a text), a
    // commit (Carol added after), and Carol's text in it.
    alice.client.send_text(&direct, "one").await.unwrap();
    let group = alice
        .client
        .create_group("crew", &[bob.id()])
        .await
        .unwrap();
    alice
        .client
        .add_members(&group, &[carol.id()])
        .await
        .unwrap();
    // (Her own direct conversation with Alice started earlier: this one.)
    carol
        .wait_for(|e| match e {
            Event::ConversationStarted { conversation } if conversation.id == group => Some(()),
            _ => None,
        })
        .await;
    carol.client.send_text(&group, "two").await.unwrap();

    let (data, address, store, _dir) = server.seize();
    drop(store);
    let db = rusqlite::Connection::open(data.join("umbra.db")).unwrap();
    let kinds: Vec<(i32, String)> = db
        .prepare("SELECT kind, sender FROM mailbox WHERE recipient = ?1 ORDER BY id")
        .unwrap()
        .query_map([bob.id().as_str()], |row| Ok((row.get(0)?, row.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    drop(db);
    let group_traffic = [
        DeliveryKind::Application,
        DeliveryKind::Commit,
        DeliveryKind::Welcome,
        DeliveryKind::Proposal,
    ]
    .map(|kind| kind as i32);
    let held: Vec<&(i32, String)> = kinds
        .iter()
        .filter(|(kind, _)| group_traffic.contains(kind))
        .collect();
    assert!(
        held.len() >= 5,
        "Bob's mailbox holds what was sent: {kinds:?}"
    );
    assert!(
        held.iter().all(|(_, sender)| sender.is_empty()),
        "no sender stored: {kinds:?}"
    );
    assert!(
        kinds.contains(&(DeliveryKind::ContactRequest as i32, dave.id().to_string())),
        "a contact request names its sender: {kinds:?}"
    );

    let server = TestServer::start_in(&data, address).await;
    let mut bob = bob.reopen().await;
    assert_eq!(bob.next_text().await.1, "one");
    assert_eq!(bob.next_text().await, (carol.id(), "two".to_owned()));
    let pushed: Vec<(DeliveryKind, Option<umbra_client::AccountId>)> = server
        .frames()
        .into_iter()
        .filter(|(direction, _)| *direction == umbra_server::Direction::Outbound)
        .filter_map(|(_, frame)| match umbra_proto::decode_server(&frame) {
            Ok(ServerMessage::Push(Push::Delivery(delivery))) => {
                Some((delivery.kind, delivery.sender))
            }
            _ => None,
        })
        .collect();
    assert!(pushed.len() >= 5, "{pushed:?}");
    for (kind, sender) in &pushed {
        if group_traffic.contains(&(*kind as i32)) {
            assert_eq!(sender, &None, "a {kind:?} was pushed with its sender");
        }
    }
    assert!(
        pushed.contains(&(DeliveryKind::ContactRequest, Some(dave.id()))),
        "{pushed:?}"
    );
}

/// The tables ARCHITECTURE.md's "What the server knows" lists: the names in
/// the first column of its table.
fn documented_tables() -> Vec<String> {
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../ARCHITECTURE.md"),
    )
    .unwrap();
    let section = text
        .split("\n## What the server knows")
        .nth(1)
        .and_then(|rest| rest.split("\n## ").next())
        .expect("ARCHITECTURE.md has the section");
    section
        .lines()
        .filter_map(|line| line.strip_prefix("| `"))
        .filter_map(|row| row.split(" | ").next())
        .flat_map(|cell| {
            cell.split('`')
                .map(str::trim)
                .filter(|name| !name.is_empty() && *name != ",")
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// A day of traffic on a server whose clock the test moves (contacts asked,
/// accepted and declined, a group and its commits, texts on disappearing
/// timers to a device that is away), then a month: the server's database
/// holds no table ARCHITECTURE.md does not list, no copy past its expiry
/// and no sender of what members sent; after the month no commit hash, no
/// contact request (answered or not) and no waiting copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_day_of_traffic_leaves_only_what_the_server_is_said_to_know() {
    use std::sync::Arc;
    use umbra_client::{ClientOptions, ManualClock};
    const DAY: u64 = 86_400;
    let clock = ManualClock::new(common::now());
    let server = TestServer::start_with_clock(clock.clone()).await;
    let options = || ClientOptions {
        clock: Arc::new(clock.clone()),
        ..common::options()
    };
    // Every conversation on the default 30-second timer.
    let activation = server.activation().await;
    let mut alice = Device::activate_with(&activation, options()).await;
    let activation = server.activation().await;
    let mut bob = Device::activate_with(&activation, options()).await;
    let activation = server.activation().await;
    let mut carol = Device::activate_with(&activation, options()).await;
    let activation = server.activation().await;
    let dave = Device::activate_with(&activation, options()).await;
    let (direct, _) = befriend(&mut alice, &mut bob).await;
    befriend(&mut alice, &mut carol).await;
    // Dave asks Bob, who declines; Carol asks Dave, who never answers.
    dave.client.add_contact(&bob.id()).await.unwrap();
    bob.wait_for(|e| matches!(e, Event::ContactRequest { .. }).then_some(()))
        .await;
    bob.client.decline_contact(&dave.id()).await.unwrap();
    carol.client.add_contact(&dave.id()).await.unwrap();
    let group = alice
        .client
        .create_group("day", &[bob.id(), carol.id()])
        .await
        .unwrap();
    for hour in 0..24u64 {
        alice
            .client
            .send_text(&direct, &format!("hour {hour}"))
            .await
            .unwrap();
        carol
            .client
            .send_text(&group, &format!("group hour {hour}"))
            .await
            .unwrap();
        if hour == 12 {
            // Bob goes away: what follows waits for him.
            bob.client.disconnect();
        }
        clock.advance(3600);
    }
    clock.advance(1);

    let (data, address, store, _dir) = server.seize();
    use umbra_store::Mailboxes as _;
    store
        .expire(umbra_client::Clock::now(&clock))
        .await
        .unwrap();
    let db = rusqlite::Connection::open(data.join("umbra.db")).unwrap();
    let tables: Vec<String> = db
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
        .unwrap()
        .query_map([], |row| row.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let documented = documented_tables();
    assert!(documented.len() >= 10, "{documented:?}");
    for table in &tables {
        assert!(
            documented.contains(table),
            "table {table} is not in ARCHITECTURE.md's \"What the server knows\""
        );
    }
    let count = |sql: &str| -> i64 { db.query_row(sql, [], |row| row.get(0)).unwrap() };
    let now = umbra_client::Clock::now(&clock);
    assert_eq!(
        count(&format!(
            "SELECT COUNT(*) FROM mailbox WHERE expires_at <= {now}"
        )),
        0,
        "copies past their expiry"
    );
    assert!(
        count("SELECT COUNT(*) FROM mailbox WHERE kind = 1") > 0,
        "Bob's waiting copies are there to look at"
    );
    assert_eq!(
        count("SELECT COUNT(*) FROM mailbox WHERE kind IN (1, 2, 3, 4) AND sender != ''"),
        0,
        "a sender of what members send"
    );
    let pending = |requester: &Device, addressee: &Device| {
        count(&format!(
            "SELECT COUNT(*) FROM contacts WHERE requester = '{}' AND addressee = '{}' \
             AND accepted = 0",
            requester.id(),
            addressee.id()
        ))
    };
    let declined = count(&format!(
        "SELECT COUNT(*) FROM contacts WHERE requester = '{}' AND declined = 1",
        dave.id()
    ));
    assert_eq!(
        (pending(&dave, &bob), declined),
        (1, 1),
        "a declined request is kept marked, for now"
    );
    assert_eq!(pending(&carol, &dave), 1, "an unanswered one, for now");
    assert!(count("SELECT COUNT(*) FROM group_commits") > 0);
    drop(db);

    // A month later.
    let later = now + 31 * DAY;
    store.expire(later).await.unwrap();
    drop(store);
    let db = rusqlite::Connection::open(data.join("umbra.db")).unwrap();
    let count = |sql: &str| -> i64 { db.query_row(sql, [], |row| row.get(0)).unwrap() };
    assert_eq!(count("SELECT COUNT(*) FROM group_commits"), 0);
    assert_eq!(count("SELECT COUNT(*) FROM contacts WHERE accepted = 0"), 0);
    assert_eq!(
        count("SELECT COUNT(*) FROM mailbox"),
        0,
        "nothing waits a month"
    );
    assert_eq!(
        count("SELECT COUNT(*) FROM contacts WHERE accepted = 1"),
        2,
        "contacts stay"
    );
    let _ = address;
}

/// A request declined while the device is offline is declined at the
/// server when it next connects: its requester can no longer get it
/// accepted or sent again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_declined_offline_is_declined_at_the_server_on_connecting() {
    let server = TestServer::start().await;
    let mut bob = Device::activate(&server).await;
    let dave = Device::activate(&server).await;
    dave.client.add_contact(&bob.id()).await.unwrap();
    bob.wait_for(|e| matches!(e, Event::ContactRequest { .. }).then_some(()))
        .await;
    let bob = bob.reopen_offline();
    bob.client.decline_contact(&dave.id()).await.unwrap();
    let declined = |data: &std::path::Path| -> i64 {
        let db = rusqlite::Connection::open(data.join("umbra.db")).unwrap();
        db.query_row(
            "SELECT COUNT(*) FROM contacts WHERE requester = ?1 AND declined = 1",
            [dave.id().as_str()],
            |row| row.get(0),
        )
        .unwrap()
    };
    assert_eq!(declined(&server.data), 0, "the server has not heard yet");
    bob.client.connect().await.unwrap();
    bob.client.sync().await.unwrap();
    assert_eq!(declined(&server.data), 1, "told on connecting");
}
