//! Linking a second device to an account: through a rendezvous at the
//! real server, the new device gets the account's contacts and history,
//! is added to its conversations, and from then on sends and receives as
//! the account; a link under another secret adds nothing.

mod common;

use std::time::Duration;

use common::{Device, PATIENCE, TestServer, befriend, options, passphrase};
use umbra_client::{
    Client, ClientError, ConversationId, DeviceId, Direction, DuressScope, Event, LinkString,
};

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
    link_with(existing, name, false).await.0
}

/// [`link`], sending the vault if `vault`; also returns how many vault
/// notes the new device got.
async fn link_with(
    existing: &Device,
    name: &str,
    vault: bool,
) -> ((Device, umbra_client::LinkedDevice), usize) {
    let mut pending = existing.client.start_link().await.unwrap();
    if vault {
        pending = pending.with_vault();
    }
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
    ((device, linked), joined.vault_notes)
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
    phone.client.vault_add("alarm", "4711").unwrap();

    let ((laptop, linked), notes) = link_with(&phone, "laptop", false).await;
    assert_eq!(notes, 0);
    assert!(
        laptop.client.vault_list().unwrap().is_empty(),
        "the vault stays on the phone unless the user chose to send it"
    );
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

    // Bob is shown that the account added a device to the conversation.
    let added = format!("{} added their device 2", phone.id());
    until("Bob is shown the new device", || {
        bob.client
            .history(&at_bob, 100)
            .unwrap()
            .iter()
            .any(|m| m.direction == Direction::System && m.body == added)
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

/// Waits until `device` is a member of `conversation`.
async fn joined(device: &Device, conversation: &ConversationId) {
    until("the device is in the conversation", || {
        device
            .client
            .conversation(conversation)
            .is_ok_and(|c| c.active)
    })
    .await;
}

/// Every device's history of `conversation`, messages only.
fn histories(devices: &[&Device], conversation: &ConversationId) -> Vec<Vec<String>> {
    devices
        .iter()
        .map(|d| {
            texts(&d.client, conversation)
                .into_iter()
                .map(|(_, body)| body)
                .collect()
        })
        .collect()
}

#[tokio::test]
async fn two_accounts_with_two_and_three_devices_see_every_message_in_one_order() {
    let server = TestServer::start().await;
    let mut alice = Device::activate(&server).await;
    let mut bob = Device::activate(&server).await;
    let (conversation, _) = befriend(&mut alice, &mut bob).await;
    let (alice_laptop, _) = link(&alice, "laptop").await;
    bob.client.vault_add("door", "2580").unwrap();
    let ((bob_tablet, _), notes) = link_with(&bob, "tablet", true).await;
    assert_eq!(notes, 1);
    let note = bob_tablet.client.vault_list().unwrap();
    assert_eq!(note.len(), 1);
    assert_eq!(
        bob_tablet.client.vault_get(note[0].id).unwrap().body,
        "2580",
        "the vault came along, as chosen"
    );
    // A device linked by a linked device: the entry is made and signed
    // by device 2, and the history it hands on came by a link itself.
    let (bob_laptop, linked) = link(&bob_tablet, "laptop").await;
    assert_eq!(linked.device, DeviceId(3));
    assert_eq!(bob.client.devices().await.unwrap().len(), 3);
    let devices = [&alice, &alice_laptop, &bob, &bob_tablet, &bob_laptop];
    for device in devices {
        until("every device is in the conversation", || {
            device
                .client
                .conversation(&conversation)
                .is_ok_and(|c| c.active)
        })
        .await;
    }

    // Each device sends in turn; every device, the sender's other devices
    // included, shows every message, in the same order.
    let mut sent = Vec::new();
    for (n, sender) in devices.iter().enumerate() {
        let text = format!("message {n}");
        sender.client.send_text(&conversation, &text).await.unwrap();
        sent.push(text);
        until("every device has the message", || {
            histories(&devices, &conversation)
                .iter()
                .all(|h| h == &sent)
        })
        .await;
    }
    // Each message is the account's own on its account's devices: Alice
    // sent 0 and 1, Bob 2 to 4.
    let directions = |device: &Device| -> Vec<Direction> {
        texts(&device.client, &conversation)
            .into_iter()
            .map(|(direction, _)| direction)
            .collect()
    };
    use Direction::{In, Out};
    assert_eq!(directions(&alice_laptop), vec![Out, Out, In, In, In]);
    assert_eq!(directions(&bob_laptop), vec![In, In, Out, Out, Out]);

    // A group a linked device creates holds every device of both
    // accounts.
    let group = alice_laptop
        .client
        .create_group("five devices", &[bob.id()])
        .await
        .unwrap();
    for device in devices {
        until("every device is in the new group", || {
            device.client.conversation(&group).is_ok_and(|c| c.active)
        })
        .await;
    }
    bob_laptop
        .client
        .send_text(&group, "in the group")
        .await
        .unwrap();
    until("every device has the group's message", || {
        histories(&devices, &group)
            .iter()
            .all(|h| h == &vec!["in the group".to_owned()])
    })
    .await;
}

#[tokio::test]
async fn a_removed_device_is_cut_off_and_gets_nothing_sent_afterwards() {
    let server = TestServer::start().await;
    let mut phone = Device::activate(&server).await;
    let mut bob = Device::activate(&server).await;
    let (conversation, at_bob) = befriend(&mut phone, &mut bob).await;
    let (laptop, _) = link(&phone, "laptop").await;
    joined(&laptop, &conversation).await;
    assert!(
        phone
            .client
            .remove_device(phone.client.device())
            .await
            .is_err(),
        "a device does not remove itself"
    );
    phone.client.remove_device(DeviceId(2)).await.unwrap();
    let listed = phone.client.devices().await.unwrap();
    assert!(listed[1].removed_at.is_some(), "{listed:?}");
    // The laptop is cut off at once, and cannot come back.
    until("the laptop is disconnected", || {
        !laptop.client.is_connected()
    })
    .await;
    assert!(laptop.client.connect().await.is_err());

    // What Bob sends now reaches the phone and not the laptop (whose
    // mailbox is gone; that its leaf leaves the tree, so later epochs'
    // keys are not derived for it, is `hostile_member`'s
    // `a_removed_device_is_committed_out_of_its_groups`).
    bob.client
        .send_text(&at_bob, "after the removal")
        .await
        .unwrap();
    assert_eq!(phone.next_text().await.1, "after the removal");
    assert!(
        texts(&laptop.client, &conversation)
            .iter()
            .all(|(_, body)| body != "after the removal")
    );
}

#[tokio::test]
async fn wiping_a_linked_device_removes_it_and_leaves_the_account_alone() {
    let server = TestServer::start().await;
    let mut phone = Device::activate(&server).await;
    let mut bob = Device::activate(&server).await;
    let (conversation, at_bob) = befriend(&mut phone, &mut bob).await;
    let (laptop, _) = link(&phone, "laptop").await;
    joined(&laptop, &conversation).await;

    // The laptop's own wipe (a thief's wrong guesses, a duress unlock, the
    // user's choice) takes the laptop, not the line.
    laptop.client.wipe_self().await.unwrap();
    assert!(!umbra_client::device_exists(laptop.home.path()));
    let listed = phone.client.devices().await.unwrap();
    assert_eq!(listed.len(), 2);
    assert!(listed[1].removed_at.is_some(), "{listed:?}");
    assert_eq!(listed[1].removed_by, Some(DeviceId(2)), "it removed itself");

    // The phone goes on: it reconnects, sends and receives.
    let mut phone = phone.reopen().await;
    phone
        .client
        .send_text(&conversation, "still here")
        .await
        .unwrap();
    assert_eq!(bob.next_text().await.1, "still here");
    bob.client.send_text(&at_bob, "good").await.unwrap();
    assert_eq!(phone.next_text().await.1, "good");
}

#[tokio::test]
async fn read_on_one_device_is_read_on_the_others() {
    let server = TestServer::start().await;
    let mut phone = Device::activate(&server).await;
    let mut bob = Device::activate(&server).await;
    let (conversation, at_bob) = befriend(&mut phone, &mut bob).await;
    let (laptop, _) = link(&phone, "laptop").await;
    joined(&laptop, &conversation).await;
    bob.client.send_text(&at_bob, "read me once").await.unwrap();
    let on_phone = phone.next_message().await;
    assert_eq!(on_phone.state, umbra_client::DeliveryState::Received);
    let on_laptop = loop {
        let found = laptop
            .client
            .history(&conversation, 10)
            .unwrap()
            .into_iter()
            .find(|m| m.body == "read me once");
        if let Some(message) = found {
            break message;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };

    // Read on the laptop: the phone shows it read too, and Bob sees it
    // read.
    laptop.client.mark_read(&[on_laptop.id]).await.unwrap();
    let state = |client: &Client, conversation: &ConversationId| {
        client
            .history(conversation, 10)
            .unwrap()
            .into_iter()
            .find(|m| m.body == "read me once")
            .map(|m| m.state)
    };
    until("the phone shows the message read", || {
        state(&phone.client, &conversation) == Some(umbra_client::DeliveryState::Read)
    })
    .await;
    until("Bob sees it read", || {
        state(&bob.client, &at_bob) == Some(umbra_client::DeliveryState::Read)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_linked_while_messages_flow_has_each_once_in_order() {
    let server = TestServer::start().await;
    let mut phone = Device::activate(&server).await;
    let mut bob = Device::activate(&server).await;
    let (conversation, at_bob) = befriend(&mut phone, &mut bob).await;

    // Bob writes all along, before, during and after the link.
    let writing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sender = {
        let (client, writing) = (bob.client.clone(), std::sync::Arc::clone(&writing));
        tokio::spawn(async move {
            let mut sent = Vec::new();
            while writing.load(std::sync::atomic::Ordering::SeqCst) || sent.len() < 5 {
                let text = format!("flowing {}", sent.len());
                client.send_text(&at_bob, &text).await.unwrap();
                sent.push(text);
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
            sent
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (laptop, _) = link(&phone, "laptop").await;
    joined(&laptop, &conversation).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    writing.store(false, std::sync::atomic::Ordering::SeqCst);
    let sent = sender.await.unwrap();

    let bodies = |device: &Device| -> Vec<String> {
        texts(&device.client, &conversation)
            .into_iter()
            .map(|(_, body)| body)
            .collect()
    };
    until("the phone has every message", || bodies(&phone) == sent).await;
    until("the laptop has every message, once, in order", || {
        bodies(&laptop) == sent
    })
    .await;
}

/// Files sent all along a link: those that reached the existing device
/// after it took the history, before the new one was in the conversation
/// (the catch-up), come with their files too, ready to fetch.
#[tokio::test]
async fn a_device_linked_while_files_flow_can_fetch_each() {
    let server = TestServer::start().await;
    let mut phone = Device::activate(&server).await;
    let mut bob = Device::activate(&server).await;
    let (conversation, at_bob) = befriend(&mut phone, &mut bob).await;
    let outside = tempfile::tempdir().unwrap();
    let path = outside.path().join("note.txt");
    std::fs::write(&path, b"a small file, sent over and over").unwrap();

    let writing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sender = {
        let (client, writing) = (bob.client.clone(), std::sync::Arc::clone(&writing));
        let path = path.clone();
        tokio::spawn(async move {
            let mut sent = 0;
            while writing.load(std::sync::atomic::Ordering::SeqCst) || sent < 5 {
                client.send_file(&at_bob, &path, None).await.unwrap();
                sent += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            sent
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (laptop, _) = link(&phone, "laptop").await;
    joined(&laptop, &conversation).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    writing.store(false, std::sync::atomic::Ordering::SeqCst);
    let sent = sender.await.unwrap();

    let files = |device: &Device| -> Vec<Option<umbra_client::AttachmentInfo>> {
        device
            .client
            .history(&conversation, 1000)
            .unwrap()
            .into_iter()
            .filter(|m| m.direction != Direction::System)
            .map(|m| m.attachment)
            .collect()
    };
    until("the laptop has every message", || {
        files(&laptop).len() == sent
    })
    .await;
    let laptop_files = files(&laptop);
    assert!(
        laptop_files.iter().all(Option::is_some),
        "a message came without its file: {laptop_files:?}"
    );
    assert_eq!(laptop.client.fetch_attachments().await.unwrap(), sent);
}

#[tokio::test]
async fn a_linked_device_shows_voice_notes_with_their_length_and_waveform() {
    let server = TestServer::start().await;
    let mut phone = Device::activate(&server).await;
    let mut bob = Device::activate(&server).await;
    let (conversation, at_bob) = befriend(&mut phone, &mut bob).await;
    let tone: Vec<f32> = (0..48_000)
        .map(|i| 0.5 * (2.0 * std::f32::consts::PI * 300.0 * i as f32 / 48_000.0).sin())
        .collect();
    let mut recording = bob.client.record_voice().unwrap();
    recording.push(&tone).unwrap();
    let draft = recording.finish().unwrap();
    bob.client
        .send_voice_draft(&at_bob, draft.id, None)
        .await
        .unwrap();
    let note = phone
        .wait_for(|event| match event {
            umbra_client::Event::MessageReceived { message } => message.attachment.clone(),
            _ => None,
        })
        .await;
    assert_eq!(note.duration_ms, 1_000);
    assert!(!note.waveform.is_empty());

    let (laptop, _) = link(&phone, "laptop").await;
    joined(&laptop, &conversation).await;
    let copied = laptop
        .client
        .history(&conversation, 100)
        .unwrap()
        .into_iter()
        .find_map(|m| m.attachment)
        .expect("the note came with the history");
    assert_eq!(
        (copied.duration_ms, copied.waveform),
        (note.duration_ms, note.waveform)
    );
}

#[tokio::test]
async fn a_new_device_whose_existing_device_goes_away_gives_up_cleanly() {
    let server = TestServer::start().await;
    let phone = Device::activate(&server).await;
    let pending = phone.client.start_link().await.unwrap();
    let link_string = pending.link_string().clone();
    // The phone goes offline before it answers (and never finishes).
    drop(pending);
    phone.client.disconnect();

    let clock = umbra_client::ManualClock::new(common::now());
    let home = tempfile::tempdir().unwrap();
    let joining = {
        let (home, clock) = (home.path().to_owned(), clock.clone());
        tokio::spawn(async move {
            let options = umbra_client::ClientOptions {
                clock: std::sync::Arc::new(clock),
                ..options()
            };
            Client::join_link(&home, &passphrase(), &link_string, "laptop", options).await
        })
    };
    // It waits for an answer (its offer is at the rendezvous) until the
    // link has expired by its clock, then says so and leaves nothing.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!joining.is_finished(), "it gave up before the link expired");
    clock.advance(601);
    let given_up = tokio::time::timeout(PATIENCE, joining)
        .await
        .expect("the new device did not give up")
        .unwrap();
    assert!(
        matches!(&given_up, Err(umbra_client::ClientError::LinkFailed(why)) if why.contains("in time")),
        "{given_up:?}"
    );
    assert!(!umbra_client::device_exists(home.path()));
    let phone = phone.reopen().await;
    assert_eq!(phone.client.devices().await.unwrap().len(), 1);
}

#[tokio::test]
async fn the_wipe_code_erases_a_device_that_was_away_when_it_was_used() {
    let server = TestServer::start().await;
    let mut phone = Device::activate(&server).await;
    let (laptop, _) = link(&phone, "laptop").await;
    // The laptop is closed (in a drawer, or in a thief's bag).
    let mut laptop = laptop.reopen_offline();

    let code = phone.wipe_code.clone().unwrap();
    umbra_client::send_wipe(&code, &umbra_client::SystemClock)
        .await
        .unwrap();
    phone
        .wait_for(|e| matches!(e, Event::Wiped).then_some(()))
        .await;
    assert!(!umbra_client::device_exists(phone.home.path()));

    // The phone ended the line, and the laptop's copy of the wipe command
    // went with the line's mailboxes. Back online, it is shown the wipe
    // command, checks it under its wipe key, and erases itself.
    let back = laptop.client.connect().await;
    assert!(
        matches!(back, Err(ClientError::ErasedByAccount)),
        "{back:?}"
    );
    laptop
        .wait_for(|e| matches!(e, Event::Wiped).then_some(()))
        .await;
    assert!(!umbra_client::device_exists(laptop.home.path()));
}

/// Closes `device` and opens it with its duress passphrase: answered as a
/// wrong passphrase, it hands over the revocation it had sealed.
fn open_under_duress(
    device: Device,
    duress: &umbra_client::Passphrase,
) -> (tempfile::TempDir, Box<umbra_client::Revocation>) {
    let Device { home, client, .. } = device;
    client.disconnect();
    drop(client);
    let erased = Client::open(home.path(), duress, options()).unwrap_err();
    let ClientError::Erased {
        revocation: Some(revocation),
        ..
    } = erased
    else {
        panic!("expected the sealed revocation, got {erased:?}");
    };
    (home, revocation)
}

#[tokio::test]
async fn a_duress_passphrase_for_every_device_erases_the_others_too() {
    let server = TestServer::start().await;
    let mut phone = Device::activate(&server).await;
    let mut bob = Device::activate(&server).await;
    let (conversation, _) = befriend(&mut phone, &mut bob).await;
    let (laptop, _) = link(&phone, "laptop").await;
    joined(&laptop, &conversation).await;
    let duress = umbra_client::Passphrase::new("they are watching");
    // Set on the laptop, with the account's wipe code (which its owner
    // keeps; the laptop does not hold it).
    let code = phone.wipe_code.clone().unwrap();
    laptop
        .client
        .set_duress_passphrase(&passphrase(), &duress, &DuressScope::EveryDevice(code))
        .unwrap();
    // The phone is away meanwhile.
    let mut phone = phone.reopen_offline();

    // The laptop is opened with the duress passphrase: it looks like a
    // typo, and hands the front end what to send (a fresh wipe command
    // signed with the sealed code, and the line's revocation).
    let (home, revocation) = open_under_duress(laptop, &duress);
    Client::finish_erasure(home.path()).unwrap();
    revocation.send().await.unwrap();

    // The phone comes back to a revoked line, is shown the wipe command,
    // checks it under its wipe key and erases itself.
    let back = phone.client.connect().await;
    assert!(
        matches!(back, Err(ClientError::ErasedByAccount)),
        "{back:?}"
    );
    phone
        .wait_for(|e| matches!(e, Event::Wiped).then_some(()))
        .await;
    assert!(!umbra_client::device_exists(phone.home.path()));
    assert!(!umbra_client::device_exists(home.path()));
}

#[tokio::test]
async fn the_account_key_alone_ends_the_line_but_erases_no_device() {
    let server = TestServer::start().await;
    let phone = Device::activate(&server).await;
    // Set while the phone is the account's only device: the duress
    // passphrase ends the line, and carries no wipe command (as a removed
    // device that kept the account key can end it too).
    let duress = umbra_client::Passphrase::new("they are watching");
    phone
        .client
        .set_duress_passphrase(&passphrase(), &duress, &DuressScope::ThisDevice)
        .unwrap();
    let (laptop, _) = link(&phone, "laptop").await;
    let mut laptop = laptop.reopen_offline();

    let (home, revocation) = open_under_duress(phone, &duress);
    assert_eq!(revocation.wipe_seed, None);
    Client::finish_erasure(home.path()).unwrap();
    revocation.send().await.unwrap();

    // The laptop is cut off, and keeps what it holds.
    let back = laptop.client.connect().await;
    assert!(common::refused_as_revoked(&back), "{back:?}");
    assert!(umbra_client::device_exists(laptop.home.path()));
    while let Ok(event) = laptop.events.try_recv() {
        assert!(
            !matches!(event, Event::Wiped | Event::ServerMisbehaved { .. }),
            "{event:?}"
        );
    }
}
