//! Many senders at once: a backend may check and store several senders'
//! messages together (the embedded store's writer, the clustered store's
//! batches), and what it stores must be what it would have stored for
//! them one after the other.

use umbra_proto::{AccountId, DeliveryKind, GroupId};

use super::{
    NOW, TTL, befriend, commit, group, group_of_three, info_at, one, read_all, registered,
    send_in_epoch, state_at, stored,
};
use crate::postgres::{FanOut, PgStore};
use crate::{Distributors, FanOutOutcome, LineStatus, Mailboxes, Store};

/// The `mailbox_bytes` of the stores given to
/// [`a_batch_stores_as_one_after_another`] with `capped`: room in Carol's
/// mailbox for "one" and "two" but not "anonymous" besides them.
pub const BATCH_CAP: u64 = 12;

/// Senders in [`many_senders_at_once`], each in a group of two with the
/// one recipient.
const SENDERS: u8 = 16;
/// Messages each of them sends, one after the other.
const EACH: u8 = 20;

/// An account ID made of one letter of the alphabet, eight times.
fn account_of(n: u8) -> String {
    let letter = AccountId::ALPHABET[usize::from(n) % AccountId::ALPHABET.len()];
    String::from_utf8(vec![letter; 8]).unwrap()
}

/// Sixteen senders, half through each store (two nodes of a cluster, or
/// one store twice), send to one recipient at once, each in a group of
/// two with her, each message waiting for the one before as a
/// connection's do; meanwhile a non-member and a member of an epoch
/// gone send too. Every stored message is in her mailbox once, under
/// dense IDs, each sender's in the order sent; every refused one is
/// refused for its own reason and stored nowhere.
pub async fn many_senders_at_once(a: &impl Store, b: &impl Store) {
    let carol = registered(a, &account_of(30), 30).await;
    let mallory = registered(a, &account_of(29), 29).await;
    let mut senders = Vec::new();
    for n in 0..SENDERS {
        let sender = registered(a, &account_of(n), n).await;
        befriend(a, &sender, &carol).await;
        let g = group(100 + n);
        a.create_group(&g, &one(&sender), &state_at(0), &info_at(0), None, NOW)
            .await
            .unwrap();
        let added = commit(&g, 0, &sender, b"add", &[&carol], &[]);
        a.accept_commit(&added, NOW, NOW + TTL).await.unwrap();
        senders.push((sender, g));
    }
    read_all(a, &carol).await;

    let send_all = |n: usize| {
        let (sender, g) = senders[n].clone();
        let carol = &carol;
        async move {
            let mut ids = Vec::new();
            for m in 0..EACH {
                let payload = [n as u8, m];
                let outcome = if n.is_multiple_of(2) {
                    send(a, &g, &sender, &payload, 1).await
                } else {
                    send(b, &g, &sender, &payload, 1).await
                };
                let (deliveries, durable) = stored(Ok(outcome));
                durable.wait().await.unwrap();
                let [(to, delivery)] = deliveries.as_slice() else {
                    panic!("sender {n} message {m}: {} copies", deliveries.len());
                };
                assert_eq!(to.account, *carol);
                ids.push(delivery.id);
            }
            ids
        }
    };
    // Refused, again and again, beside the others: each is told why.
    let intruder = async {
        for m in 0..EACH {
            let g = &senders[1].1;
            let outcome = if m.is_multiple_of(2) {
                send(a, g, &mallory, b"intrusion", 1).await
            } else {
                send(b, g, &mallory, b"intrusion", 1).await
            };
            assert!(matches!(outcome, FanOutOutcome::NotAMember), "{outcome:?}");
        }
    };
    let behind = async {
        for m in 0..EACH {
            let (sender, g) = &senders[2];
            let outcome = if m.is_multiple_of(2) {
                send(a, g, sender, b"epoch gone", 0).await
            } else {
                send(b, g, sender, b"epoch gone", 0).await
            };
            assert!(
                matches!(outcome, FanOutOutcome::BehindGroup { current_epoch: 1 }),
                "{outcome:?}"
            );
        }
    };
    let everyone = futures_util::future::join_all((0..usize::from(SENDERS)).map(send_all));
    let (handed, (), ()) = tokio::join!(everyone, intruder, behind);

    let held = a.pending(&one(&carol), 0, 10_000, NOW).await.unwrap();
    let mut ids: Vec<u64> = held.iter().map(|d| d.id).collect();
    let first = ids.first().copied().unwrap();
    let expected: Vec<u64> = (first..first + u64::from(SENDERS) * u64::from(EACH)).collect();
    assert_eq!(ids, expected, "Carol's IDs are dense, each used once");
    for (n, sent) in handed.iter().enumerate() {
        let mine: Vec<_> = held
            .iter()
            .filter(|d| d.payload.first() == Some(&(n as u8)))
            .collect();
        let order: Vec<u8> = mine.iter().map(|d| d.payload[1]).collect();
        assert_eq!(order, (0..EACH).collect::<Vec<_>>(), "sender {n}'s order");
        let theirs: Vec<u64> = mine.iter().map(|d| d.id).collect();
        assert_eq!(&theirs, sent, "sender {n} was told the IDs stored");
        assert!(
            mine.iter()
                .all(|d| d.group_id.as_ref() == Some(&senders[n].1)
                    && d.kind == DeliveryKind::Application)
        );
    }
    ids.sort_unstable();
    b.ack(&one(&carol), &ids).await.unwrap();
    assert!(
        a.pending(&one(&carol), 0, 10, NOW)
            .await
            .unwrap()
            .is_empty()
    );

    // Back the other way: Carol writes in every group, and the sixteen
    // acknowledge at once, each copy on its own and each twice at the
    // same moment, through both stores (as a device reconnecting to
    // another node may): every copy is deleted, and counted, once.
    const BACK: u8 = 5;
    for (sender, g) in &senders {
        read_all(a, sender).await;
        for m in 0..BACK {
            let (_, durable) = stored(Ok(send(a, g, &carol, &[m], 1).await));
            durable.wait().await.unwrap();
        }
    }
    let acknowledge = |n: usize| {
        let device = one(&senders[n].0);
        async move {
            let held = a.pending(&device, 0, 100, NOW).await.unwrap();
            assert_eq!(held.len(), usize::from(BACK), "sender {n}'s mailbox");
            for delivery in &held {
                let id = [delivery.id];
                let (first, second) = tokio::join!(a.ack(&device, &id), b.ack(&device, &id));
                assert_eq!(
                    first.unwrap() + second.unwrap(),
                    1,
                    "sender {n}'s copy {} deleted once",
                    delivery.id
                );
            }
        }
    };
    futures_util::future::join_all((0..usize::from(SENDERS)).map(acknowledge)).await;
    for (sender, _) in &senders {
        assert!(
            b.pending(&one(sender), 0, 10, NOW)
                .await
                .unwrap()
                .is_empty()
        );
    }
}

/// An application message from `sender` to `g` in `epoch`, sent now.
async fn send(
    store: &impl Store,
    g: &GroupId,
    sender: &AccountId,
    payload: &[u8],
    epoch: u64,
) -> FanOutOutcome {
    send_in_epoch(store, g, sender, payload, epoch, NOW)
        .await
        .unwrap()
}

/// The clustered store's batch against the same messages one after the
/// other, each in its own transaction, on two stores with the same
/// history: the same outcome for each message (stored, or refused for
/// the same reason) and the same mailboxes, copy for copy and ID for ID.
/// With `capped`, the stores' `mailbox_bytes` must be [`BATCH_CAP`]:
/// Carol's mailbox fills part way through the batch.
pub async fn a_batch_stores_as_one_after_another(batched: &PgStore, alone: &PgStore, capped: bool) {
    let fan_outs = |g: &GroupId, [alice, bob, carol]: &[AccountId; 3], mallory: &AccountId| {
        let message = |sender: Option<&AccountId>, kind, payload: &[u8], epoch| FanOut {
            group: g.clone(),
            sender: sender.map(one),
            kind,
            payload: payload.to_vec(),
            epoch,
            now: NOW,
            expires_at: NOW + TTL,
        };
        let app = DeliveryKind::Application;
        vec![
            message(Some(alice), app, b"one", 1),
            message(Some(mallory), app, b"not a member", 1),
            message(Some(bob), app, b"epoch gone", 0),
            message(Some(bob), app, b"epoch to come", 7),
            FanOut {
                group: group(77),
                ..message(Some(alice), app, b"no such group", 1)
            },
            message(Some(carol), app, b"suspended", 1),
            message(Some(alice), app, b"two", 1),
            message(None, app, b"anonymous", 1),
            message(Some(bob), app, b"three", 1),
            message(Some(bob), DeliveryKind::Proposal, b"proposal", 0),
        ]
    };
    let mut outcomes = Vec::new();
    let mut mailboxes = Vec::new();
    let mut batch_outcomes = Vec::new();
    for (store, together) in [(batched, true), (alone, false)] {
        let (g, members) = group_of_three(store).await;
        let mallory = registered(store, "MMMMMMMM", 13).await;
        store
            .set_line_status(&members[2], LineStatus::Suspended)
            .await
            .unwrap();
        let mut list = fan_outs(&g, &members, &mallory);
        // Each message its own times, so that a mix-up between them shows.
        for (n, fan_out) in (0u64..).zip(&mut list) {
            fan_out.now = NOW + n;
            fan_out.expires_at = NOW + TTL + 10 * n;
        }
        let results = if together {
            store.fan_out_batch(&list).await.unwrap()
        } else {
            let mut results = Vec::new();
            for fan_out in &list {
                results.extend(
                    store
                        .fan_out_batch(std::slice::from_ref(fan_out))
                        .await
                        .unwrap(),
                );
            }
            results
        };
        assert_eq!(results.len(), list.len());
        outcomes.push(format!("{results:?}"));
        if together {
            batch_outcomes = results;
        }
        let mut held = Vec::new();
        for who in members.iter().chain([&mallory]) {
            held.push(store.pending(&one(who), 0, 100, NOW).await.unwrap());
        }
        mailboxes.push(held);
    }
    assert_eq!(
        outcomes[0], outcomes[1],
        "the same outcome for each message"
    );
    assert_eq!(mailboxes[0], mailboxes[1], "the same mailboxes");
    // And those are what the rules say (so that the two cannot agree on
    // something wrong).
    let carol: Vec<&[u8]> = mailboxes[0][2].iter().map(|d| &d.payload[..]).collect();
    if capped {
        // "one" and "two" fit; "anonymous" does not, nor (the notice
        // taking room) "three": one notice counting both; the proposal is
        // kept past the cap.
        assert_eq!(
            carol,
            [&b"one"[..], b"two", &2u64.to_be_bytes(), b"proposal"]
        );
        assert_eq!(mailboxes[0][2][2].kind, DeliveryKind::MailboxFull);
    } else {
        assert_eq!(
            carol,
            [&b"one"[..], b"two", b"anonymous", b"three", b"proposal"]
        );
    }
    // IDs increase (dense but for a notice replaced by the next one).
    let ids: Vec<u64> = mailboxes[0][2].iter().map(|d| d.id).collect();
    assert!(ids.windows(2).all(|w| w[1] > w[0]), "{ids:?}");
    if !capped {
        assert!(ids.windows(2).all(|w| w[1] == w[0] + 1), "{ids:?}");
    }
    assert!(mailboxes[0][3].is_empty(), "Mallory is in no group");
    let refused = &batch_outcomes[1..6];
    assert!(
        matches!(
            refused,
            [
                FanOutOutcome::NotAMember,
                FanOutOutcome::BehindGroup { current_epoch: 1 },
                FanOutOutcome::AheadOfGroup { current_epoch: 1 },
                FanOutOutcome::UnknownGroup,
                FanOutOutcome::LineInactive {
                    status: LineStatus::Suspended,
                    ..
                },
            ]
        ),
        "{refused:?}"
    );
}
