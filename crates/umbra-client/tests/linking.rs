//! Linking a second device to an account: through a rendezvous at the
//! real server, the new device gets the account's contacts and history,
//! is added to its conversations, and from then on sends and receives as
//! the account; a link under another secret adds nothing.

mod common;

use std::time::Duration;

use common::{Device, PATIENCE, TestServer, befriend, options, passphrase};
use umbra_client::{Client, ConversationId, DeviceId, Direction, Event, LinkString};

/// Waits until `check` holds, or fails the test after [`PATIENCE`].
async fn until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn texts(client: &Client, conversation: &ConversationId) -> Vec<(Direction, String)> {
    client
        .history(conversation, 100)
        .unwrap()
        .into_iter()
        .filter(|m| m.direction != Direction::System)
        .map(|m| (m.direction, m.body))
        .collect()
}

/// Links a new device to `existing`'s account; returns it with its events.
async fn link(existing: &Device, name: &str) -> (Device, umbra_client::LinkedDevice) {
    let pending = existing.client.start_link().await.unwrap();
    let string = pending.link_string().to_string();
    let finishing = tokio::spawn(pending.finish());
    let home = tempfile::tempdir().unwrap();
    let parsed: LinkString = string.parse().unwrap();
    let (client, joined) = Client::join_link(home.path(), &passphrase(), &parsed, name, options())
        .await
        .unwrap();
    let linked = finishing.await.unwrap().unwrap();
    assert_eq!(joined.account, existing.id());
    assert_eq!(joined.device, linked.device);
    assert_eq!(joined.conversations, Some(linked.conversations));
    let events = client.subscribe();
    let device = Device {
        home,
        client,
        events,
        wipe_code: None,
    };
    (device, linked)
}

#[tokio::test]
async fn a_linked_device_has_the_history_and_sends_and_receives_as_the_account() {
    let server = TestServer::start().await;
    let mut phone = Device::activate(&server).await;
    let mut bob = Device::activate(&server).await;
    let (at_phone, at_bob) = befriend(&mut phone, &mut bob).await;
    bob.client.send_text(&at_bob, "before one").await.unwrap();
    assert_eq!(phone.next_text().await.1, "before one");
    phone
        .client
        .send_text(&at_phone, "before two")
        .await
        .unwrap();
    assert_eq!(bob.next_text().await.1, "before two");

    let (laptop, linked) = link(&phone, "laptop").await;
    assert_eq!(
        (
            linked.device,
            linked.name.as_str(),
            linked.conversations,
            linked.failed
        ),
        (DeviceId(2), "laptop", 1, 0)
    );
    // Same account, same account key: Bob's safety number does not move.
    assert_eq!(laptop.client.account(), phone.client.account());
    assert_eq!(laptop.client.identity_key(), phone.client.identity_key());
    assert_ne!(laptop.client.device_key(), phone.client.device_key());
    assert_eq!(laptop.client.device(), DeviceId(2));
    let listed = laptop.client.devices().await.unwrap();
    assert_eq!(
        listed
            .iter()
            .map(|d| (d.id, d.name.as_str(), d.this_device))
            .collect::<Vec<_>>(),
        vec![(DeviceId(1), "", false), (DeviceId(2), "laptop", true)]
    );
    assert_eq!(phone.client.devices().await.unwrap().len(), 2);

    // The history came along, each message on its side.
    let history = vec![
        (Direction::In, "before one".to_owned()),
        (Direction::Out, "before two".to_owned()),
    ];
    assert_eq!(texts(&laptop.client, &at_phone), history);
    assert_eq!(
        laptop.client.contacts().unwrap().len(),
        1,
        "Bob is a contact there too"
    );
    // And the conversation goes on there, once the phone's Welcome is in.
    until("the laptop is a member of the conversation", || {
        laptop
            .client
            .conversation(&at_phone)
            .is_ok_and(|c| c.active)
    })
    .await;

    // Bob's message reaches both devices; the laptop's reaches Bob, and
    // the phone shows it as sent by the account.
    bob.client.send_text(&at_bob, "after").await.unwrap();
    assert_eq!(phone.next_text().await.1, "after");
    until("the laptop has Bob's message", || {
        texts(&laptop.client, &at_phone).last() == Some(&(Direction::In, "after".to_owned()))
    })
    .await;
    laptop
        .client
        .send_text(&at_phone, "from the laptop")
        .await
        .unwrap();
    let (sender, body) = bob.next_text().await;
    assert_eq!((sender, body.as_str()), (phone.id(), "from the laptop"));
    let mut phone = phone;
    let shown = phone
        .wait_for(|event| match event {
            Event::MessageReceived { message } if message.body == "from the laptop" => {
                Some(message.direction)
            }
            _ => None,
        })
        .await;
    assert_eq!(
        shown,
        Direction::Out,
        "the account's own message, from another device"
    );
    let all = vec![
        (Direction::In, "before one".to_owned()),
        (Direction::Out, "before two".to_owned()),
        (Direction::In, "after".to_owned()),
        (Direction::Out, "from the laptop".to_owned()),
    ];
    assert_eq!(texts(&phone.client, &at_phone), all);
    assert_eq!(texts(&laptop.client, &at_phone), all);
}

#[tokio::test]
async fn a_link_under_another_secret_adds_no_device() {
    let server = TestServer::start().await;
    let phone = Device::activate(&server).await;
    let pending = phone.client.start_link().await.unwrap();
    let mut forged = pending.link_string().clone();
    forged.secret[0] ^= 1;
    let finishing = tokio::spawn(pending.finish());
    let home = tempfile::tempdir().unwrap();
    // The new device waits for an answer that cannot come; the existing
    // one refuses the offer it cannot open.
    let joining = tokio::spawn(async move {
        Client::join_link(home.path(), &passphrase(), &forged, "laptop", options()).await
    });
    let refused = tokio::time::timeout(PATIENCE, finishing)
        .await
        .expect("the existing device did not give up")
        .unwrap();
    assert!(
        matches!(refused, Err(umbra_client::ClientError::LinkFailed(_))),
        "{refused:?}"
    );
    joining.abort();
    assert_eq!(phone.client.devices().await.unwrap().len(), 1);
}
