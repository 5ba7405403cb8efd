//! A hostile server against an honest device: what the server writes into
//! a mailbox that the device did not ask for, or that nobody signed, is
//! refused.

mod common;

use common::{Device, TestServer};
use umbra_client::{ContactState, Event};
use umbra_store::{Mailboxes, Notice};

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
    let (data, address) = (server.data.clone(), server.address);
    let _dir = server.stop();
    let config = umbra_server::Config::load(&data).unwrap();
    let store = umbra_server::open_store(&data, &config).unwrap();
    for sender in [bob.id(), carol.id()] {
        let notice = Notice {
            recipient: alice.id(),
            sender,
            kind: umbra_proto::DeliveryKind::ContactAccepted,
            group_id: None,
            payload: Vec::new(),
        };
        let now = common::now();
        store.notice(notice, now, now + 3600).await.unwrap();
    }
    drop(store);
    let _server = TestServer::start_in(&data, address).await;
    let alice = alice.reopen().await;
    alice.client.sync().await.unwrap();
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
    let mut alice = alice;
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
