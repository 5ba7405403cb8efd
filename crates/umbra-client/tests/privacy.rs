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
