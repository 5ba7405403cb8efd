//! A hostile server against an honest device: what the server writes into
//! a mailbox that the device did not ask for, or that nobody signed, is
//! refused.

mod common;

use common::{Device, TestServer, befriend};
use umbra_client::{AccountId, ClientError, ContactState, Event, Refusal};
use umbra_mls::{Crypto, DeviceSigner, Group, GroupConfig, Provider};
use umbra_proto::{DeliveryKind, GroupId};
use umbra_store::sqlite::SqliteStore;
use umbra_store::{Accounts, Groups, KeyPackages, Mailboxes, Notice};

/// An MLS identity the operator makes up: its own signing key, under
/// whatever account ID it chooses to claim.
struct Forger {
    signer: DeviceSigner,
    crypto: Crypto,
    db: rusqlite::Connection,
}

impl Forger {
    fn new(seed: u8) -> Forger {
        let mut db = rusqlite::Connection::open_in_memory().unwrap();
        umbra_mls::init_storage(&mut db).unwrap();
        Forger {
            signer: DeviceSigner::from_secret(&[seed; 32]),
            crypto: Crypto::default(),
            db,
        }
    }

    fn provider(&self) -> Provider<'_> {
        Provider::new(&self.crypto, &self.db)
    }

    /// A package "of a second device" of `claimed`, with a certificate
    /// the forger made under its own key posing as the account key.
    fn device_key_package(&self, claimed: &AccountId) -> Vec<u8> {
        use umbra_mls::{DeviceCertificate, DeviceLog, FIRST_DEVICE};
        let device = DeviceSigner::from_secret(&[0x42; 32]);
        let mut log = DeviceLog::new(claimed.clone(), self.signer.identity_key());
        log.append(log.first_entry(&self.signer, "phone", 1), None)
            .unwrap();
        let certificate = DeviceCertificate {
            account_key: self.signer.identity_key(),
            entry: log.add_entry(&self.signer, (FIRST_DEVICE, &self.signer), &device, "x", 2),
        };
        umbra_mls::new_device_key_package(
            &self.provider(),
            &device,
            claimed,
            Default::default(),
            false,
            Some(&certificate),
        )
        .unwrap()
    }

    fn key_package(&self, claimed: &AccountId, last_resort: bool) -> Vec<u8> {
        umbra_mls::new_key_package(
            &self.provider(),
            &self.signer,
            claimed,
            Default::default(),
            last_resort,
        )
        .unwrap()
    }

    /// A group "created by" `claimed` that invites the holder of
    /// `key_package`; returns its ID and the Welcome.
    fn invite(&self, claimed: &AccountId, key_package: &[u8]) -> (GroupId, Vec<u8>) {
        let mut group = Group::create(
            &self.provider(),
            &self.signer,
            claimed,
            &GroupConfig::default(),
            0,
        )
        .unwrap();
        let output = group
            .add_members(&self.provider(), &self.signer, &[key_package.to_vec()])
            .unwrap();
        (GroupId::new(group.id()).unwrap(), output.welcome.unwrap())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_contact_acceptance_is_refused() {
    let server = TestServer::start().await;
    let mut alice = Device::activate(&server).await;
    let bob = Device::activate(&server).await;
    let carol = Device::activate(&server).await;
    // Bob asks Alice, who has not answered.
    bob.client.add_contact(&alice.id()).await.unwrap();
    alice
        .wait_for(|e| matches!(e, Event::ContactRequest { .. }).then_some(()))
        .await;

    // The operator stops the server and writes into Alice's mailbox that
    // Bob and Carol accepted requests from her: she never sent one to
    // either. (Written while the server is down, so the forged deliveries
    // take their IDs in order with everything the server writes later.)
    let (data, address, store, _dir) = server.seize();
    for sender in [bob.id(), carol.id()] {
        let notice = Notice {
            recipient: alice.id(),
            device: None,
            sender,
            kind: DeliveryKind::ContactAccepted,
            group_id: None,
            payload: Vec::new(),
        };
        let now = common::now();
        store.notice(notice, now, now + 3600).await.unwrap();
    }
    drop(store);
    let _server = TestServer::start_in(&data, address).await;
    let mut alice = alice.reopen().await;
    alice.client.sync().await.unwrap();
    for expected in [bob.id(), carol.id()] {
        let (from, reason) = alice
            .wait_for(|e| match e {
                Event::Refused { from, reason } => Some((from.clone(), *reason)),
                _ => None,
            })
            .await;
        assert_eq!((from, reason), (expected, Refusal::UnaskedAcceptance));
    }
    let contacts = alice.client.contacts().unwrap();
    let state_of = |account| {
        contacts
            .iter()
            .find(|contact| contact.account == account)
            .map(|contact| contact.state)
    };
    assert_eq!(
        state_of(bob.id()),
        Some(ContactState::Incoming),
        "Bob's request still waits for Alice"
    );
    assert_eq!(state_of(carol.id()), None, "Carol is no contact");

    // A real acceptance still applies.
    let mut carol = carol.reopen().await;
    alice.client.add_contact(&carol.id()).await.unwrap();
    carol
        .wait_for(|e| matches!(e, Event::ContactRequest { .. }).then_some(()))
        .await;
    carol.client.accept_contact(&alice.id()).await.unwrap();
    alice
        .wait_for(|e| matches!(e, Event::ContactAccepted { .. }).then_some(()))
        .await;
    let contacts = alice.client.contacts().unwrap();
    assert!(
        contacts
            .iter()
            .any(|c| c.account == carol.id() && c.state == ContactState::Accepted)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_package_under_a_swapped_key_is_refused_and_the_pin_kept() {
    let server = TestServer::start().await;
    let mut alice = Device::activate(&server).await;
    let mut bob = Device::activate(&server).await;
    let mut carol = Device::activate(&server).await;
    let (with_bob, _) = befriend(&mut alice, &mut bob).await;
    befriend(&mut alice, &mut carol).await;
    alice.client.show_safety_number(&bob.id()).unwrap();
    alice.client.verify_contact(&bob.id()).unwrap();
    let number = alice.client.safety_number(&bob.id()).unwrap();

    // The operator hands out KeyPackages "from Bob" under its own key.
    let (data, address, store, _dir) = server.seize();
    TestServer::use_up_key_packages(&store, &bob.id()).await;
    let forger = Forger::new(99);
    let forged = (0..3)
        .map(|_| forger.key_package(&bob.id(), false))
        .collect();
    store
        .add_key_packages(
            &bob.id(),
            umbra_proto::DeviceId::FIRST,
            umbra_mls::Suite::default().code(),
            forged,
            Some(forger.key_package(&bob.id(), true)),
        )
        .await
        .unwrap();
    drop(store);
    let _server = TestServer::start_in(&data, address).await;
    let mut alice = alice.reopen().await;
    let mut bob = bob.reopen().await;
    let carol = carol.reopen().await;

    // Alice's device will not add that key, and says why.
    let refused = alice
        .client
        .create_group("plans", &[bob.id(), carol.id()])
        .await
        .unwrap_err();
    assert!(
        matches!(&refused, ClientError::ForeignKeyPackage(account) if *account == bob.id()),
        "{refused}"
    );
    let (from, reason) = alice
        .wait_for(|e| match e {
            Event::Refused { from, reason } => Some((from.clone(), *reason)),
            _ => None,
        })
        .await;
    assert_eq!(
        (from, reason),
        (bob.id(), Refusal::KeyPackageUnderAnotherKey)
    );
    assert_eq!(
        alice.client.conversations().unwrap().len(),
        2,
        "no group was made"
    );

    // The forged key displaced nothing: Bob is still verified under his
    // real key, and the conversation with him goes on.
    let bob_contact = alice
        .client
        .contacts()
        .unwrap()
        .into_iter()
        .find(|c| c.account == bob.id())
        .unwrap();
    assert!(bob_contact.verified && !bob_contact.key_changed && !bob_contact.key_unconfirmed);
    assert_eq!(alice.client.safety_number(&bob.id()).unwrap(), number);
    alice
        .client
        .send_text(&with_bob, "still there?")
        .await
        .unwrap();
    assert_eq!(bob.next_text().await.1, "still there?");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_welcome_from_a_stranger_or_under_another_key_is_refused() {
    let server = TestServer::start().await;
    let mut alice = Device::activate(&server).await;
    let mut bob = Device::activate(&server).await;
    let stranger = Device::activate(&server).await;
    befriend(&mut alice, &mut bob).await;
    let before = alice.client.conversations().unwrap().len();

    // The operator invites Alice to two groups of its own making: one "from"
    // an account she never accepted, one "from" Bob under its own key.
    let (data, address, store, _dir) = server.seize();
    let forger = Forger::new(77);
    for inviter in [stranger.id(), bob.id()] {
        let (key_package, _) = store
            .take_key_package(
                &alice.id(),
                umbra_proto::DeviceId::FIRST,
                umbra_mls::Suite::default().code(),
            )
            .await
            .unwrap()
            .unwrap();
        let (group_id, welcome) = forger.invite(&inviter, &key_package);
        let notice = Notice {
            recipient: alice.id(),
            device: None,
            sender: inviter,
            kind: DeliveryKind::Welcome,
            group_id: Some(group_id),
            payload: welcome,
        };
        let now = common::now();
        store.notice(notice, now, now + 3600).await.unwrap();
    }
    drop(store);
    let _server = TestServer::start_in(&data, address).await;
    let mut alice = alice.reopen().await;
    alice.client.sync().await.unwrap();

    let mut refusals = Vec::new();
    while refusals.len() < 2 {
        refusals.push(
            alice
                .wait_for(|e| match e {
                    Event::Refused { from, reason } => Some((from.clone(), *reason)),
                    _ => None,
                })
                .await,
        );
    }
    assert_eq!(
        refusals,
        vec![
            (stranger.id(), Refusal::InvitationFromStranger),
            (bob.id(), Refusal::InvitationUnderAnotherKey),
        ]
    );
    assert_eq!(
        alice.client.conversations().unwrap().len(),
        before,
        "no conversation was joined"
    );
    // Bob's real key is still the one Alice knows.
    let bob_contact = alice
        .client
        .contacts()
        .unwrap()
        .into_iter()
        .find(|c| c.account == bob.id())
        .unwrap();
    assert!(!bob_contact.key_changed);
}

/// More deliveries than twice the push window.
const BACKLOG: usize = 3 * umbra_proto::frame::PUSH_WINDOW_DELIVERIES;

/// A made-up account ID for each `n`.
fn made_up_account(n: usize) -> AccountId {
    let alphabet = AccountId::ALPHABET;
    let text: String = (0..AccountId::LEN)
        .map(|i| alphabet[(n / alphabet.len().pow(i as u32)) % alphabet.len()] as char)
        .collect();
    AccountId::parse(&text).unwrap()
}

/// Writes [`BACKLOG`] contact requests from made-up accounts into
/// `recipient`'s mailbox.
async fn fill_mailbox(store: &SqliteStore, recipient: &AccountId) {
    let now = common::now();
    for n in 0..BACKLOG {
        let notice = Notice {
            recipient: recipient.clone(),
            device: None,
            sender: made_up_account(n),
            kind: DeliveryKind::ContactRequest,
            group_id: None,
            payload: Vec::new(),
        };
        store.notice(notice, now, now + 3600).await.unwrap();
    }
}

fn incoming_requests(device: &Device) -> usize {
    device
        .client
        .contacts()
        .unwrap()
        .iter()
        .filter(|c| c.state == ContactState::Incoming)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_beyond_the_push_window_arrives_whole() {
    let server = TestServer::start().await;
    let alice = Device::activate(&server).await;
    let (data, address, store, _dir) = server.seize();
    fill_mailbox(&store, &alice.id()).await;
    drop(store);
    let server = TestServer::start_in(&data, address).await;
    let bob = Device::activate(&server).await;
    let mut alice = alice.reopen_offline();
    alice.client.connect().await.unwrap();
    // Live traffic while the backlog drains goes after it, not ahead.
    bob.client.add_contact(&alice.id()).await.unwrap();
    alice.client.sync().await.unwrap();
    let deadline = std::time::Instant::now() + common::PATIENCE;
    while incoming_requests(&alice) < BACKLOG + 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "Bob's request never came"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(incoming_requests(&alice), BACKLOG + 1);
    // (Delivery IDs say nothing about order: the senders do.)
    let mut pushed: Vec<AccountId> = server
        .frames()
        .into_iter()
        .filter(|(direction, _)| *direction == umbra_server::Direction::Outbound)
        .filter_map(|(_, bytes)| match umbra_proto::decode_server(&bytes) {
            Ok(umbra_proto::ServerMessage::Push(umbra_proto::Push::Delivery(d)))
                if d.kind == DeliveryKind::ContactRequest =>
            {
                d.sender
            }
            _ => None,
        })
        .collect();
    pushed.dedup();
    let expected: Vec<AccountId> = (0..BACKLOG)
        .map(made_up_account)
        .chain([bob.id()])
        .collect();
    assert!(pushed == expected, "deliveries pushed out of order");
    // Nothing was taken for a flood.
    assert!(alice.client.is_connected());
    loop {
        match alice.events.try_recv() {
            Ok(event) => assert!(
                !matches!(event, Event::ServerMisbehaved { .. }),
                "{event:?}"
            ),
            Err(tokio::sync::broadcast::error::TryRecvError::Lagged(_)) => continue,
            Err(_) => break,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_floods_its_device_is_cut_off() {
    let server = TestServer::start().await;
    let alice = Device::activate(&server).await;
    let (data, address, store, _dir) = server.seize();
    fill_mailbox(&store, &alice.id()).await;
    drop(store);
    // This server pushes the whole backlog without waiting for any
    // acknowledgement.
    let flood =
        TestServer::start_with_window(&data, address, umbra_server::PushWindow::UNBOUNDED).await;
    let mut alice = alice.reopen_offline();
    // (Connecting may already fail: the flood cuts the link under it.)
    let _ = alice.client.connect().await;
    alice
        .wait_for(|e| matches!(e, Event::ServerMisbehaved { .. }).then_some(()))
        .await;
    assert!(!alice.client.is_connected());
    assert!(
        incoming_requests(&alice) < BACKLOG,
        "cut off before the end"
    );

    // What was not applied was not acknowledged: from an honest server
    // it all arrives.
    drop(flood.stop());
    let _server = TestServer::start_in(&data, address).await;
    let alice = alice.reopen().await;
    alice.client.sync().await.unwrap();
    assert_eq!(incoming_requests(&alice), BACKLOG);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_cannot_stand_in_for_a_member_by_external_commit() {
    let server = TestServer::start().await;
    let mut alice = Device::activate(&server).await;
    let mut bob = Device::activate(&server).await;
    let (with_bob, with_alice) = befriend(&mut alice, &mut bob).await;
    let group_id = GroupId::new(with_alice.group_id().unwrap()).unwrap();

    // The operator joins the conversation by external commit from the
    // GroupInfo it keeps, under Alice's name with a key of its own; sends
    // Bob that commit, and a message from the epoch after it; and keeps a
    // GroupInfo of its group as the conversation's, for Bob to rejoin from.
    let (data, address, store, _dir) = server.seize();
    let real = store.group_info(&group_id).await.unwrap().unwrap();
    let eve = Forger::new(55);
    let (mut eves, commit) =
        Group::join_externally_unchecked(&eve.provider(), &eve.signer, &alice.id(), &real).unwrap();
    let lure = eves
        .encrypt(&eve.provider(), &eve.signer, b"not a Content")
        .unwrap();
    let forged = eves.group_info(&eve.provider(), &eve.signer).unwrap();
    let now = common::now();
    for (kind, payload) in [
        (DeliveryKind::Commit, commit),
        (DeliveryKind::Application, lure),
    ] {
        let notice = Notice {
            recipient: bob.id(),
            device: None,
            sender: alice.id(),
            kind,
            group_id: Some(group_id.clone()),
            payload,
        };
        store.notice(notice, now, now + 3600).await.unwrap();
    }
    drop(store);
    let config = umbra_server::Config::load(&data).unwrap();
    rusqlite::Connection::open(data.join(&config.database))
        .unwrap()
        .execute(
            "UPDATE groups SET group_info = ?1 WHERE group_id = ?2",
            rusqlite::params![forged, group_id.as_bytes()],
        )
        .unwrap();
    let _server = TestServer::start_in(&data, address).await;
    let alice = alice.reopen().await;
    let mut bob = bob.reopen().await;
    bob.client.sync().await.unwrap();
    let what = bob
        .wait_for(|e| match e {
            Event::ServerMisbehaved { what } => Some(what.clone()),
            _ => None,
        })
        .await;
    assert!(what.contains("did not rejoin"), "{what}");

    // Bob's device took neither: the conversation is still Alice and Bob
    // under their own keys, and what he sends reaches only Alice.
    alice
        .client
        .send_text(&with_bob, "still us?")
        .await
        .unwrap();
    assert_eq!(bob.next_text().await.1, "still us?");
    let view = bob.client.conversation(&with_alice).unwrap();
    assert_eq!(view.members.len(), 2, "{:?}", view.members);
    assert!(
        !bob.client
            .history(&with_alice, 50)
            .unwrap()
            .iter()
            .any(|m| m.body.contains("rejoined")),
        "no rejoin happened"
    );
    let contact = bob
        .client
        .contacts()
        .unwrap()
        .into_iter()
        .find(|c| c.account == alice.id())
        .unwrap();
    assert!(!contact.key_changed, "Alice's pinned key stands");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_verified_contact_under_a_new_key_in_a_group_gets_nothing_until_confirmed() {
    let server = TestServer::start().await;
    let mut alice = Device::activate(&server).await;
    let mut bob = Device::activate(&server).await;
    let mut carol = Device::activate(&server).await;
    let (with_bob, _) = befriend(&mut alice, &mut bob).await;
    alice.client.show_safety_number(&bob.id()).unwrap();
    alice.client.verify_contact(&bob.id()).unwrap();

    // Alice asks Carol and goes offline; Carol accepts, which opens their
    // conversation with a Welcome.
    alice.client.add_contact(&carol.id()).await.unwrap();
    carol
        .wait_for(|e| matches!(e, Event::ContactRequest { .. }).then_some(()))
        .await;
    let alice = alice.reopen_offline();
    carol.client.accept_contact(&alice.id()).await.unwrap();

    // The operator swaps that Welcome for one of its own "from Carol", of a
    // group where "Bob" has a key of the operator's.
    let (data, address, store, _dir) = server.seize();
    let (alice_kp, _) = store
        .take_key_package(
            &alice.id(),
            umbra_proto::DeviceId::FIRST,
            umbra_mls::Suite::default().code(),
        )
        .await
        .unwrap()
        .unwrap();
    let eve = Forger::new(44);
    let fake_bob = Forger::new(45);
    let mut group = Group::create(
        &eve.provider(),
        &eve.signer,
        &carol.id(),
        &GroupConfig::default(),
        0,
    )
    .unwrap();
    let output = group
        .add_members(
            &eve.provider(),
            &eve.signer,
            &[alice_kp, fake_bob.key_package(&bob.id(), false)],
        )
        .unwrap();
    let welcome = output.welcome.unwrap();
    drop(store);
    let config = umbra_server::Config::load(&data).unwrap();
    rusqlite::Connection::open(data.join(&config.database))
        .unwrap()
        .execute(
            "UPDATE mailbox SET payload = ?1 WHERE recipient = ?2 AND kind = ?3",
            rusqlite::params![welcome, alice.id().as_str(), DeliveryKind::Welcome as i32],
        )
        .unwrap();
    let _server = TestServer::start_in(&data, address).await;
    let mut alice = alice;
    alice.client.connect().await.unwrap();
    alice.client.sync().await.unwrap();

    // Alice's device sees Bob under another key: since she had verified
    // him, nothing goes to him, in any conversation, until she confirms.
    let stopped = alice
        .wait_for(|e| match e {
            Event::KeyChanged {
                account,
                sending_stopped,
            } if *account == bob.id() => Some(*sending_stopped),
            _ => None,
        })
        .await;
    assert!(stopped);
    let refused = alice.client.send_text(&with_bob, "are you there?").await;
    assert!(
        matches!(&refused, Err(ClientError::KeyUnconfirmed(account)) if *account == bob.id()),
        "{refused:?}"
    );
    let contact = alice
        .client
        .contacts()
        .unwrap()
        .into_iter()
        .find(|c| c.account == bob.id())
        .unwrap();
    assert!(contact.key_changed && contact.key_unconfirmed && !contact.verified);

    // Confirming what was shown (here: accepting the key unverified) lets
    // messages go again; the number shown before the change does not count.
    let unseen = alice.client.accept_key_change(&bob.id()).unwrap_err();
    assert!(
        matches!(&unseen, ClientError::SafetyNumberNotShown(account) if *account == bob.id()),
        "{unseen}"
    );
    alice.client.show_safety_number(&bob.id()).unwrap();
    alice.client.accept_key_change(&bob.id()).unwrap();
    let mut bob = bob.reopen().await;
    alice
        .client
        .send_text(&with_bob, "are you there?")
        .await
        .unwrap();
    assert_eq!(bob.next_text().await.1, "are you there?");
}

/// A delivery just over the frame limit (what a server before the size
/// check accepted: a 1 MiB message in a 1,048,594-byte envelope) is read,
/// reported, set aside and acknowledged, and what comes after it arrives.
/// It used to fail every connection of its recipient until it expired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_delivery_is_set_aside_and_the_mailbox_goes_on() {
    let server = TestServer::start().await;
    let mut alice = Device::activate(&server).await;
    let mut bob = Device::activate(&server).await;
    let (to_bob, _) = befriend(&mut alice, &mut bob).await;
    bob.client.disconnect();

    let (data, address, store, _dir) = server.seize();
    let now = common::now();
    let poison = Notice {
        recipient: bob.id(),
        device: None,
        sender: alice.id(),
        kind: DeliveryKind::Application,
        group_id: None,
        payload: vec![7; umbra_proto::MAX_FRAME_BYTES - 1],
    };
    store.notice(poison, now, now + 3600).await.unwrap();
    drop(store);
    let _server = TestServer::start_in(&data, address).await;

    let mut bob = bob.reopen().await;
    let from = bob
        .wait_for(|e| match e {
            Event::Discarded { from, .. } => Some(from.clone()),
            _ => None,
        })
        .await;
    assert_eq!(from, Some(alice.id()), "a notice names its sender");
    let alice = alice.reopen().await;
    alice
        .client
        .send_text(&to_bob, "after the big one")
        .await
        .unwrap();
    assert_eq!(
        bob.next_text().await,
        (alice.id(), "after the big one".into())
    );
    // Acknowledged: the next connection does not meet it again.
    bob.client.sync().await.unwrap();
    let mut bob = bob.reopen().await;
    bob.client.sync().await.unwrap();
    let again = tokio::time::timeout(std::time::Duration::from_secs(2), async {
        bob.wait_for(|e| matches!(e, Event::Discarded { .. }).then_some(()))
            .await
    })
    .await;
    assert!(again.is_err(), "the set-aside delivery came back");
}

/// Asked for a contact's first device, a server that hands out another
/// device's package (one that carries a certificate, here under a key of
/// its own) gets it refused, and no key is pinned for the contact from it:
/// a device pins account keys only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certified_package_in_place_of_a_first_devices_is_refused_and_nothing_pinned() {
    let server = TestServer::start().await;
    let mut alice = Device::activate(&server).await;
    let bob = Device::activate(&server).await;
    // Bob asks; Alice, accepting, fetches his package and would pin his
    // key from it (she has seen none of his yet).
    bob.client.add_contact(&alice.id()).await.unwrap();
    alice
        .wait_for(|e| matches!(e, Event::ContactRequest { .. }).then_some(()))
        .await;

    let (data, address, store, _dir) = server.seize();
    TestServer::use_up_key_packages(&store, &bob.id()).await;
    let forger = Forger::new(98);
    store
        .add_key_packages(
            &bob.id(),
            umbra_proto::DeviceId::FIRST,
            umbra_mls::Suite::default().code(),
            vec![forger.device_key_package(&bob.id())],
            None,
        )
        .await
        .unwrap();
    drop(store);
    let _server = TestServer::start_in(&data, address).await;
    let alice = alice.reopen().await;
    let bob = bob.reopen().await;

    let refused = alice.client.accept_contact(&bob.id()).await.unwrap_err();
    assert!(
        matches!(&refused, ClientError::ForeignKeyPackage(account) if *account == bob.id()),
        "{refused}"
    );
    // Nothing was pinned from it.
    let pinned = alice.client.safety_number(&bob.id());
    assert!(
        matches!(pinned, Err(ClientError::NotAccepted(_))),
        "a key was pinned: {pinned:?}"
    );
}

/// Stops `server`, records for `account` a wipe command signed with
/// `seed`'s key and dated `issued_at` (as the server keeps the newest it
/// relayed), ends the line, and starts the server again: the account's
/// devices, logging in, are shown that command.
async fn revoke_showing(
    server: TestServer,
    account: &AccountId,
    seed: &[u8; 16],
    issued_at: u64,
) -> (TestServer, Option<tempfile::TempDir>) {
    let (data, address, store, dir) = server.seize();
    let now = common::now();
    let signature = DeviceSigner::from_wipe_seed(seed)
        .sign_payload(&umbra_proto::wipe_signing_payload(account, issued_at));
    let mut command = issued_at.to_be_bytes().to_vec();
    command.extend_from_slice(signature.as_bytes());
    let notice = Notice {
        recipient: account.clone(),
        device: None,
        sender: account.clone(),
        kind: DeliveryKind::Wipe,
        group_id: None,
        payload: command,
    };
    store
        .queue_wipe_command(notice, issued_at, now, now + 3600)
        .await
        .unwrap();
    store.revoke(account, None, now, now + 3600).await.unwrap();
    drop(store);
    (TestServer::start_in(&data, address).await, dir)
}

#[tokio::test]
async fn a_wipe_command_the_wipe_code_did_not_sign_erases_nothing() {
    let server = TestServer::start().await;
    let alice = Device::activate(&server).await;
    let mut alice = alice.reopen_offline();

    // The operator records a "wipe command" for Alice's line, signed with
    // a key it made up over the right payload, and ends the line: her
    // device, logging in, is shown it.
    let _server = revoke_showing(server, &alice.id(), &[9; 16], common::now()).await;

    let refused = alice.client.connect().await;
    assert!(common::refused_as_revoked(&refused), "{refused:?}");
    alice
        .wait_for(|e| matches!(e, Event::ServerMisbehaved { .. }).then_some(()))
        .await;
    assert!(
        umbra_client::device_exists(alice.home.path()),
        "the server's word alone erases no device"
    );
    drop(alice.client);
    assert!(
        umbra_client::Client::open(alice.home.path(), &common::passphrase(), common::options())
            .is_ok()
    );
}

#[tokio::test]
async fn a_wipe_command_older_than_the_device_erases_nothing() {
    let server = TestServer::start().await;
    let alice = Device::activate(&server).await;
    let code = alice.wipe_code.clone().unwrap();
    let alice = alice.reopen_offline();

    // A genuine command, signed with Alice's own wipe code, but dated a day
    // before her device was made (one the line outlived, kept by the
    // server): shown when the line ends for another reason, it is no order
    // to erase a device that came after it.
    let then = common::now() - 86_400;
    let _server = revoke_showing(server, &alice.id(), &code.seed, then).await;

    let refused = alice.client.connect().await;
    assert!(common::refused_as_revoked(&refused), "{refused:?}");
    assert!(umbra_client::device_exists(alice.home.path()));
}
