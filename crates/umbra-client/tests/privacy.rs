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
    carol
        .wait_for(|e| matches!(e, Event::ConversationStarted { .. }).then_some(()))
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
