//! Getting back in: a device that fell behind in a group (its commits
//! expired while it was offline) rejoins by itself, and a removed member can
//! be added again.

mod common;

use common::{Device, TestServer, befriend};
use umbra_client::{ConversationId, ConversationKind, Direction, Event, ManualClock};
use umbra_proto::{DeliveryKind, GroupId, Push, ServerMessage};
use umbra_store::{Mailboxes, Notice};

const DAY: u64 = 86_400;

/// Alice's group with Bob and Carol, with everyone in it.
async fn group_of_three(
    alice: &mut Device,
    bob: &mut Device,
    carol: &mut Device,
) -> ConversationId {
    befriend(alice, bob).await;
    befriend(alice, carol).await;
    // Nothing may disappear while the test looks (the server's clock jumps).
    alice.client.set_default_disappearing(None).unwrap();
    let group = alice
        .client
        .create_group("crew", &[bob.id(), carol.id()])
        .await
        .unwrap();
    for member in [bob, carol] {
        member
            .wait_for(|e| match e {
                Event::ConversationStarted { conversation }
                    if conversation.kind == ConversationKind::Group =>
                {
                    Some(())
                }
                _ => None,
            })
            .await;
    }
    group
}

/// Whether `device` shows a system line containing `text` in `group`.
fn shows(device: &Device, group: &ConversationId, text: &str) -> bool {
    device
        .client
        .history(group, 100)
        .unwrap()
        .iter()
        .any(|m| m.direction == Direction::System && m.body.contains(text))
}

/// Waits until `device` has applied a change to `group` that `done` sees.
async fn wait_until(device: &mut Device, group: &ConversationId, done: impl Fn(&Device) -> bool) {
    let group = group.clone();
    while !done(device) {
        device
            .wait_for(|e| match e {
                Event::ConversationChanged { conversation } if conversation.id == group => Some(()),
                _ => None,
            })
            .await;
    }
}

/// `by` removes `member` from `group`, and `member`'s device sees it.
async fn remove(by: &Device, member: &mut Device, group: &ConversationId) {
    by.client
        .remove_members(group, &[member.id()])
        .await
        .unwrap();
    wait_until(member, group, |member| {
        !member.client.conversation(group).unwrap().active
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_offline_beyond_the_mailbox_ttl_rejoins_by_itself() {
    let clock = ManualClock::new(common::now());
    let server = TestServer::start_with_clock(clock.clone()).await;
    let mut alice = Device::activate(&server).await;
    let mut bob = Device::activate(&server).await;
    let mut carol = Device::activate(&server).await;
    let group = group_of_three(&mut alice, &mut bob, &mut carol).await;

    // Carol goes offline; Alice updates her keys (a commit), and Carol's
    // copy of that commit expires with the mailbox TTL.
    let carol = carol.reopen_offline();
    alice.client.update_keys().await.unwrap();
    clock.advance(8 * DAY);
    alice
        .client
        .send_text(&group, "while you were away")
        .await
        .unwrap();
    assert_eq!(bob.next_text().await.1, "while you were away");

    // Back online, Carol's device finds itself behind and rejoins.
    let mut carol = carol;
    carol.client.connect().await.unwrap();
    wait_until(&mut carol, &group, |carol| shows(carol, &group, "rejoined")).await;
    wait_until(&mut alice, &group, |alice| {
        shows(alice, &group, &format!("{} rejoined", carol.id()))
    })
    .await;
    wait_until(&mut bob, &group, |bob| shows(bob, &group, "rejoined")).await;

    // The group works for everyone again.
    alice
        .client
        .send_text(&group, "welcome back")
        .await
        .unwrap();
    assert_eq!(carol.next_text().await.1, "welcome back");
    assert_eq!(bob.next_text().await.1, "welcome back");
    carol.client.send_text(&group, "thanks").await.unwrap();
    assert_eq!(alice.next_text().await.1, "thanks");
    assert_eq!(bob.next_text().await.1, "thanks");
    assert_eq!(
        carol.client.conversation(&group).unwrap().members.len(),
        3,
        "one leaf each, Carol's old one replaced"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_member_can_be_added_again() {
    let server = TestServer::start().await;
    let mut alice = Device::activate(&server).await;
    let mut bob = Device::activate(&server).await;
    let mut carol = Device::activate(&server).await;
    let group = group_of_three(&mut alice, &mut bob, &mut carol).await;

    remove(&alice, &mut carol, &group).await;

    alice
        .client
        .add_members(&group, &[carol.id()])
        .await
        .unwrap();
    wait_until(&mut carol, &group, |carol| {
        carol.client.conversation(&group).unwrap().active
    })
    .await;
    assert!(shows(&carol, &group, "added you again"));
    wait_until(&mut bob, &group, |bob| {
        bob.client.conversation(&group).unwrap().members.len() == 3
    })
    .await;
    alice
        .client
        .send_text(&group, "welcome back")
        .await
        .unwrap();
    assert_eq!(carol.next_text().await.1, "welcome back");
    assert_eq!(bob.next_text().await.1, "welcome back");
    carol
        .client
        .send_text(&group, "glad to be back")
        .await
        .unwrap();
    assert_eq!(alice.next_text().await.1, "glad to be back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_welcome_does_not_bring_back_a_removed_member() {
    let server = TestServer::start().await;
    let mut alice = Device::activate(&server).await;
    let mut bob = Device::activate(&server).await;
    let mut carol = Device::activate(&server).await;
    befriend(&mut alice, &mut bob).await;
    befriend(&mut alice, &mut carol).await;
    // Carol's one-time KeyPackages are used up, so the Welcome is for her
    // last-resort one, which stays usable: a replay can be opened.
    let (data, address, store, dir) = server.seize();
    TestServer::use_up_key_packages(&store, &carol.id()).await;
    drop(store);
    let server = TestServer::start_in(&data, address).await;
    let alice = alice.reopen().await;
    let mut bob = bob.reopen().await;
    alice.client.set_default_disappearing(None).unwrap();
    let group = alice
        .client
        .create_group("crew", &[bob.id(), carol.id()])
        .await
        .unwrap();
    // (Carol comes back online only now: connecting, she would have
    // uploaded fresh one-time KeyPackages.)
    let mut carol = carol.reopen().await;
    for member in [&mut bob, &mut carol] {
        wait_until(member, &group, |m| m.client.conversation(&group).is_ok()).await;
    }
    let group_id = GroupId::new(group.group_id().unwrap()).unwrap();
    // The operator kept the Welcome it relayed.
    let welcome = server
        .frames()
        .into_iter()
        .filter(|(direction, _)| *direction == umbra_server::Direction::Outbound)
        .find_map(|(_, bytes)| match umbra_proto::decode_server(&bytes) {
            Ok(ServerMessage::Push(Push::Delivery(d)))
                if d.kind == DeliveryKind::Welcome && d.group_id.as_ref() == Some(&group_id) =>
            {
                Some(d.payload)
            }
            _ => None,
        })
        .unwrap();

    remove(&alice, &mut carol, &group).await;

    // It delivers the old Welcome again.
    let (_, _, store, dir2) = server.seize();
    let notice = Notice {
        recipient: carol.id(),
        device: None,
        sender: alice.id(),
        kind: DeliveryKind::Welcome,
        group_id: Some(group_id),
        payload: welcome,
    };
    let now = common::now();
    store.notice(notice, now, now + 3600).await.unwrap();
    drop(store);
    let _server = TestServer::start_in(&data, address).await;
    let carol = carol.reopen().await;
    carol.client.sync().await.unwrap();
    assert!(
        !carol.client.conversation(&group).unwrap().active,
        "the conversation stays ended"
    );
    assert!(!shows(&carol, &group, "added you again"));
    drop((dir, dir2));
}
