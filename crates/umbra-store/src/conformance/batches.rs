//! Many senders at once: a backend may check and store several senders'
//! messages together (the embedded store's writer, the clustered store's
//! batches), and what it stores must be what it would have stored for
//! them one after the other.

use umbra_proto::{AccountId, DeliveryKind, GroupId};

use super::{
    NOW, TTL, befriend, commit, group, info_at, key, keyed_group_of_three, low_water, one,
    read_all, registered, send_in_epoch, state_at, stored, wipe_command,
};
use crate::postgres::{Ack, FanOut, PgStore};
use crate::{
    Distributors, FanOutOutcome, LineStatus, Mailboxes, Notice, Sender, Store, StoredDelivery,
};

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

/// `list` checked and stored by `store`'s batch at once (`together`), or
/// one message after the other.
async fn run(store: &PgStore, list: &[FanOut], together: bool) -> Vec<FanOutOutcome> {
    let results = if together {
        store.fan_out_batch(list).await.unwrap()
    } else {
        let mut results = Vec::new();
        for fan_out in list {
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
    results
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
/// Carol's mailbox fills part way through the batch, and two more
/// batches follow: one whose copies for her meet the notice stored
/// before it, and, once she has read and acknowledged everything, one
/// that fills her mailbox again.
pub async fn a_batch_stores_as_one_after_another(batched: &PgStore, alone: &PgStore, capped: bool) {
    // The group's key, and one it does not have (withdrawn).
    let (key, withdrawn) = ([5; 32], [9; 32]);
    let message = |g: &GroupId, sender: Option<&AccountId>, kind, payload: &[u8], epoch| FanOut {
        group: g.clone(),
        sender: sender.map_or(Sender::Anonymous(key), |s| Sender::Device(one(s))),
        kind,
        payload: payload.to_vec(),
        epoch,
        now: NOW,
        expires_at: NOW + TTL,
    };
    let app = DeliveryKind::Application;
    let fan_outs = |g: &GroupId, [alice, bob, carol]: &[AccountId; 3], mallory: &AccountId| {
        let message = |sender, kind, payload, epoch| message(g, sender, kind, payload, epoch);
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
            FanOut {
                sender: Sender::Anonymous(withdrawn),
                ..message(None, app, b"key withdrawn", 1)
            },
        ]
    };
    let mut outcomes = Vec::new();
    let mut mailboxes = Vec::new();
    let mut batch_outcomes = Vec::new();
    let mut carol_before_reading = Vec::new();
    for (store, together) in [(batched, true), (alone, false)] {
        let (g, members) = keyed_group_of_three(store, Some(key)).await;
        let mallory = registered(store, "MMMMMMMM", 13).await;
        store
            .set_line_status(&members[2], LineStatus::Suspended)
            .await
            .unwrap();
        let [alice, bob, carol] = &members;
        let mut times = 0u64..;
        // Each message its own times, so that a mix-up between them shows.
        let mut timed = |mut list: Vec<FanOut>| {
            for (n, fan_out) in times.by_ref().zip(&mut list) {
                fan_out.now = NOW + n;
                fan_out.expires_at = NOW + TTL + 10 * n;
            }
            list
        };
        let list = timed(fan_outs(&g, &members, &mallory));
        let mut results = run(store, &list, together).await;
        if capped {
            let (a, b) = (Some(alice), Some(bob));
            let more = timed(vec![
                message(&g, a, app, b"four", 1),
                message(&g, b, app, b"five", 1),
            ]);
            results.extend(run(store, &more, together).await);
            carol_before_reading.push(read_all(store, carol).await);
            let mut last = timed(vec![
                message(&g, a, app, b"six", 1),
                message(&g, b, app, b"seven", 1),
                message(&g, a, app, b"eight", 1),
                message(&g, b, app, b"nine", 1),
            ]);
            // Kept for less time than the notice it is counted in: the
            // notice keeps its longer life.
            last[3].expires_at = NOW + TTL;
            results.extend(run(store, &last, together).await);
        }
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
        assert_eq!(
            carol_before_reading[0], carol_before_reading[1],
            "the same mailbox before Carol read it"
        );
        // "one" and "two" fit; "anonymous" does not, nor (the notice
        // taking room) "three": one notice counting both; the proposal is
        // kept past the cap. The next batch's "four" and "five" do not
        // fit either: the notice stored before it is replaced by one
        // counting four.
        let before: Vec<&[u8]> = carol_before_reading[0]
            .iter()
            .map(|d| &d.payload[..])
            .collect();
        assert_eq!(
            before,
            [&b"one"[..], b"two", b"proposal", &4u64.to_be_bytes()]
        );
        assert_eq!(carol_before_reading[0][3].kind, DeliveryKind::MailboxFull);
        // Read and acknowledged, notice included: room for "six" and
        // "seven", not "eight" or "nine", and the count starts over.
        assert_eq!(carol, [&b"six"[..], b"seven", &2u64.to_be_bytes()]);
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
    // Signed with the group's key: stored for every leaf (capped, only
    // Alice's copy fits: Bob's and Carol's mailboxes hold "one" and "two").
    let FanOutOutcome::Stored { deliveries, .. } = &batch_outcomes[7] else {
        panic!("{:?}", batch_outcomes[7]);
    };
    assert_eq!(deliveries.len(), if capped { 1 } else { 3 });
    assert!(
        matches!(batch_outcomes[10], FanOutOutcome::KeyWithdrawn),
        "{:?}",
        batch_outcomes[10]
    );
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

/// Expiry against an acknowledgement, in the order that closed a cycle
/// when expiry deleted copies before locking their heads: Alice and Bob
/// each hold a copy that has expired; a third transaction (on `url`, the
/// store's database) holds one of their mailbox heads; expiry starts and
/// waits for it; then the other device acknowledges its copy; then the
/// head is let go. Both orders of the two heads, since the order in
/// which expiry reached them was the planner's; the acknowledgement alone
/// and in a batch that also acknowledges a copy of the held mailbox (the
/// two statements that take heads); and the copy acknowledged the
/// expired one (expiry deletes it first, or the acknowledgement does) or
/// one that lives on (its head's count lowered after expiry changed it).
/// Each copy is deleted once and every byte count is its copies' sum;
/// whether PostgreSQL had to break a deadlock is in its log, which the
/// caller reads.
pub async fn expiry_meets_an_acknowledgement(store: &PgStore, url: &str) {
    use std::sync::atomic::{AtomicBool, Ordering};
    let alice = registered(store, "AAAAAAAA", 1).await;
    let bob = registered(store, "BBBBBBBB", 2).await;
    let mut rounds = Vec::new();
    for batched in [false, true] {
        for (held, acking) in [(&alice, &bob), (&bob, &alice)] {
            for live in [false, true] {
                rounds.push((held, acking, batched, live));
            }
        }
    }
    for (round, (held, acking, batched, live)) in (0u64..).zip(rounds) {
        let at = NOW + 100 * round;
        // In each mailbox a copy that lives on and one that has expired,
        // of sizes all different: a byte count lowered wrongly shows.
        for (n, who) in (0usize..).zip([&alice, &bob]) {
            let notice = |size| Notice {
                payload: vec![7; size],
                ..low_water(who, who)
            };
            store.notice(notice(3 + n), at, at + TTL).await.unwrap();
            store.notice(notice(5 + 2 * n), at, at + 1).await.unwrap();
        }
        // This round's two copies: the last two in the mailbox, the one
        // that lives on first.
        let this_round = |who: &AccountId| {
            let who = one(who);
            async move {
                let held = store.pending(&who, 0, 1000, at).await.unwrap();
                let [.., lives, dead] = &held[..] else {
                    panic!("{held:?}");
                };
                (lives.id, dead.id)
            }
        };
        let (lives, dead) = this_round(acking).await;
        let id = if live { lives } else { dead };
        let (held_lives, _) = this_round(held).await;
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .unwrap();
        let connection = tokio::spawn(connection);
        client
            .batch_execute(&format!(
                "BEGIN; SELECT 1 FROM mailbox_heads WHERE account_id = '{}' FOR UPDATE",
                held.as_str()
            ))
            .await
            .unwrap();
        let acked = AtomicBool::new(false);
        let expire = store.expire(at + 10);
        let ack = async {
            waiting_for_locks(url, 1).await;
            let deleted = if batched {
                // With the held mailbox's copy that lives on: the batch
                // takes both heads.
                let acks = [
                    Ack::new(one(acking), vec![i64::try_from(id).unwrap()]),
                    Ack::new(one(held), vec![i64::try_from(held_lives).unwrap()]),
                ];
                store.ack_batch(&acks).await.map(|counts| {
                    assert_eq!(counts[1], 1, "the held mailbox's copy");
                    counts[0] + counts[1]
                })
            } else {
                store.ack(&one(acking), &[id]).await
            };
            acked.store(true, Ordering::SeqCst);
            deleted
        };
        let release = async {
            waiting_for_locks(url, 1).await;
            // The acknowledgement done, or waiting too.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while !acked.load(Ordering::SeqCst)
                && locks_waited_for(url).await < 2
                && std::time::Instant::now() < deadline
            {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            client.batch_execute("COMMIT").await.unwrap();
        };
        let (expired, acked, ()) = tokio::join!(expire, ack, release);
        let (expired, acked) = (expired.unwrap(), acked.unwrap());
        // Both expired copies, and those acknowledged that live on.
        let gone = 2 + usize::from(live) + usize::from(batched);
        assert_eq!(expired + acked, gone, "each copy deleted once");
        drop(client);
        connection.await.unwrap().unwrap();
        for who in [&alice, &bob] {
            let held = store.pending(&one(who), 0, 1000, at).await.unwrap();
            assert!(held.iter().all(|d| d.payload.len() < 5), "{held:?}");
        }
        let kept = store.pending(&one(acking), 0, 1000, at).await.unwrap();
        assert_eq!(
            kept.iter().any(|d| d.id == lives),
            !live,
            "the copy that lives on, gone only if acknowledged"
        );
        heads_count_their_copies(url).await;
    }
}

/// Every mailbox head's byte count is its copies' payloads' sum, and no
/// mailbox holds more than one `MailboxFull` notice.
pub async fn heads_count_their_copies(url: &str) {
    let wrong = crate::postgres::testing::query(
        url,
        "SELECT h.account_id, h.device, h.bytes, COALESCE(SUM(octet_length(m.payload)), 0)
         FROM mailbox_heads h LEFT JOIN mailbox m
           ON m.account_id = h.account_id AND m.device = h.device
         GROUP BY h.account_id, h.device, h.bytes
         HAVING h.bytes <> COALESCE(SUM(octet_length(m.payload)), 0)",
    )
    .await
    .unwrap();
    assert!(
        wrong.is_empty(),
        "heads whose byte count is wrong: {wrong:?}"
    );
    let notices = crate::postgres::testing::query(
        url,
        &format!(
            "SELECT account_id, device, COUNT(*) FROM mailbox WHERE kind = {}
             GROUP BY account_id, device HAVING COUNT(*) > 1",
            DeliveryKind::MailboxFull as i32
        ),
    )
    .await
    .unwrap();
    assert!(
        notices.is_empty(),
        "several notices in one mailbox: {notices:?}"
    );
}

/// How many of the database's backends wait for a lock.
async fn locks_waited_for(url: &str) -> usize {
    let rows = crate::postgres::testing::query(
        url,
        "SELECT count(*) FROM pg_stat_activity
         WHERE wait_event_type = 'Lock' AND datname = current_database()",
    )
    .await
    .unwrap();
    rows[0][0].as_deref().unwrap().parse().unwrap()
}

/// Waits (up to 30 s) until at least `n` backends wait for a lock.
async fn waiting_for_locks(url: &str, n: usize) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while locks_waited_for(url).await < n {
        assert!(
            std::time::Instant::now() < deadline,
            "nothing waits for the lock held"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// The `mailbox_bytes` of the stores given to
/// [`commits_and_revocations_race_batches`]: the hoarder's mailbox fills
/// part way through.
pub const RACE_CAP: u64 = 256;

/// Batches racing everything else that stores or deletes copies, through
/// two stores on one database (`url`, capped at [`RACE_CAP`]): each of
/// eight senders writes in two groups with one recipient and a hoarder
/// who never reads (in one group a leaver and, as commits add her, a
/// newcomer too), while each first group's commit adds the newcomer with
/// a Welcome, the leaver's line is revoked, the recipient acknowledges
/// what she read and expiry runs. Each transaction takes the mailbox
/// heads it stores under or deletes from at once, so none of them waits
/// for another in a cycle (the caller reads PostgreSQL's log for
/// deadlocks it had to break); and what was stored is what the rules
/// say: every message the recipient was sent once (unless her mailbox
/// filled between reads, then at most once), in each sender's order; the
/// hoarder's one notice counting what did not fit; a Welcome for the
/// newcomer in every group; nothing for the revoked line; every head's
/// byte count its copies' sum.
pub async fn commits_and_revocations_race_batches(a: &PgStore, b: &PgStore, url: &str) {
    use crate::{Accounts, CommitOutcome, Groups};
    const RACERS: u8 = 8;
    const MESSAGES: u8 = 12;
    let recipient = registered(a, &account_of(17), 17).await;
    let leaver = registered(a, &account_of(11), 11).await;
    let newcomer = registered(a, &account_of(12), 12).await;
    let hoarder = registered(a, &account_of(13), 13).await;
    let mut senders = Vec::new();
    for n in 0..RACERS {
        let sender = registered(a, &account_of(n), n).await;
        let (shared, private) = (group(100 + n), group(200 + n));
        let both = [
            (&shared, vec![&recipient, &hoarder, &leaver]),
            (&private, vec![&recipient, &hoarder]),
        ];
        for (g, with) in both {
            a.create_group(g, &one(&sender), &state_at(0), &info_at(0), None, NOW)
                .await
                .unwrap();
            let added = commit(g, 0, &sender, b"add", &with, &[]);
            a.accept_commit(&added, NOW, NOW + TTL).await.unwrap();
        }
        senders.push((sender, shared, private));
    }
    for who in [&recipient, &leaver] {
        read_all(a, who).await;
    }
    // A copy that has expired in every mailbox, for expiry to delete.
    for who in [&recipient, &leaver, &newcomer, &hoarder] {
        a.notice(low_water(who, who), NOW, NOW + 1).await.unwrap();
    }

    let done = std::sync::atomic::AtomicUsize::new(0);
    let write = |n: usize| {
        let (sender, shared, private) = senders[n].clone();
        let done = &done;
        async move {
            for m in 0..MESSAGES {
                for (k, g) in [&shared, &private].into_iter().enumerate() {
                    let store = if (n + k).is_multiple_of(2) { a } else { b };
                    let payload = [n as u8, k as u8, m];
                    let mut epoch = 1;
                    loop {
                        match send_in_epoch(store, g, &sender, &payload, epoch, NOW).await {
                            Ok(FanOutOutcome::BehindGroup { current_epoch }) => {
                                epoch = current_epoch;
                            }
                            outcome => {
                                stored(outcome).1.wait().await.unwrap();
                                break;
                            }
                        }
                    }
                }
            }
            done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    };
    let senders_done = || done.load(std::sync::atomic::Ordering::SeqCst) == senders.len();
    let add_newcomer = |n: usize| {
        let (sender, shared, _) = senders[n].clone();
        let newcomer = &newcomer;
        async move {
            let store = if n.is_multiple_of(2) { b } else { a };
            loop {
                let epoch = store.group(&shared).await.unwrap().unwrap().epoch;
                let added = commit(&shared, epoch, &sender, b"add", &[newcomer], &[]);
                match store.accept_commit(&added, NOW, NOW + TTL).await.unwrap() {
                    CommitOutcome::Accepted { .. } => break,
                    CommitOutcome::Stale { .. } => {}
                    other => panic!("{other:?}"),
                }
            }
        }
    };
    let revoke = async {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        b.revoke(&leaver, None, NOW, NOW + TTL).await.unwrap();
    };
    let mut received = Vec::new();
    let read = async {
        let mut turn = 0usize;
        loop {
            let finished = senders_done();
            let store = if turn.is_multiple_of(2) { a } else { b };
            turn += 1;
            let held = store.pending(&one(&recipient), 0, 1000, NOW).await.unwrap();
            let ids: Vec<u64> = held.iter().map(|d| d.id).collect();
            store.ack(&one(&recipient), &ids).await.unwrap();
            store.expire(NOW + 5).await.unwrap();
            received.extend(held);
            if finished {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    };
    let writers = futures_util::future::join_all((0..senders.len()).map(write));
    let commits = futures_util::future::join_all((0..senders.len()).map(add_newcomer));
    tokio::join!(writers, commits, revoke, read);

    let messages: Vec<&StoredDelivery> = received
        .iter()
        .filter(|d| d.kind == DeliveryKind::Application)
        .collect();
    let missed = received.iter().any(|d| d.kind == DeliveryKind::MailboxFull);
    for n in 0..RACERS {
        for k in 0..2u8 {
            let order: Vec<u8> = messages
                .iter()
                .filter(|d| d.payload[..2] == [n, k])
                .map(|d| d.payload[2])
                .collect();
            if missed {
                assert!(order.windows(2).all(|w| w[1] > w[0]), "{order:?}");
            } else {
                assert_eq!(
                    order,
                    (0..MESSAGES).collect::<Vec<_>>(),
                    "sender {n}'s messages in group {k}, each once, in order"
                );
            }
        }
    }
    // The hoarder's mailbox: what fitted, then one notice counting the
    // rest of what the senders wrote.
    let hoarded = a.pending(&one(&hoarder), 0, 1000, NOW).await.unwrap();
    let kept = hoarded
        .iter()
        .filter(|d| d.kind == DeliveryKind::Application)
        .count() as u64;
    let notices: Vec<&StoredDelivery> = hoarded
        .iter()
        .filter(|d| d.kind == DeliveryKind::MailboxFull)
        .collect();
    let [notice] = notices.as_slice() else {
        panic!("the hoarder's notices: {notices:?}");
    };
    let count = u64::from_be_bytes(notice.payload[..].try_into().unwrap());
    assert_eq!(
        kept + count,
        u64::from(RACERS) * 2 * u64::from(MESSAGES),
        "every message kept or counted"
    );
    heads_count_their_copies(url).await;
    let ids: Vec<u64> = received.iter().map(|d| d.id).collect();
    assert!(ids.windows(2).all(|w| w[1] > w[0]), "{ids:?}");
    let welcomes = a
        .pending(&one(&newcomer), 0, 1000, NOW)
        .await
        .unwrap()
        .into_iter()
        .filter(|d| d.kind == DeliveryKind::Welcome)
        .count();
    assert_eq!(welcomes, senders.len(), "a Welcome from every group");
    assert!(
        a.pending(&one(&leaver), 0, 1000, NOW)
            .await
            .unwrap()
            .is_empty(),
        "nothing kept for the revoked line"
    );
}

/// Runs `act` once sixteen loops on two nodes (`a` and `b`) are running
/// `each` (given its node and its number) at full speed, each loop until
/// `each` says it was refused or `act` ends; returns what `act` returned
/// and how long it took.
async fn amid<'s, T, F, Fut>(
    a: &'s PgStore,
    b: &'s PgStore,
    each: F,
    act: impl std::future::Future<Output = T>,
) -> (T, std::time::Duration)
where
    F: Fn(&'s PgStore, usize) -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let stop = AtomicBool::new(false);
    let done = AtomicU64::new(0);
    let loops = (0..16).map(|k| {
        let store = if k % 2 == 0 { a } else { b };
        let (stop, done, each) = (&stop, &done, &each);
        async move {
            while !stop.load(Ordering::SeqCst) && each(store, k).await {
                done.fetch_add(1, Ordering::SeqCst);
            }
        }
    });
    let timed = async {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while done.load(Ordering::SeqCst) < 500 {
            assert!(
                std::time::Instant::now() < deadline,
                "the loops stopped before 500 rounds"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let started = std::time::Instant::now();
        let outcome = act.await;
        let took = started.elapsed();
        stop.store(true, Ordering::SeqCst);
        (outcome, took)
    };
    let (_, timed) = tokio::join!(futures_util::future::join_all(loops), timed);
    timed
}

/// [`amid`] sixteen senders sending to `g` (every third as `first`, the
/// others as `second`), each until it is refused.
async fn amid_sends<T>(
    a: &PgStore,
    b: &PgStore,
    g: &GroupId,
    [first, second]: [&AccountId; 2],
    act: impl std::future::Future<Output = T>,
) -> (T, std::time::Duration) {
    let each = |store, k: usize| {
        let who = if k.is_multiple_of(3) { first } else { second };
        async move {
            matches!(
                send(store, g, who, b"busy", 1).await,
                FanOutOutcome::Stored { .. }
            )
        }
    };
    amid(a, b, each, act).await
}

/// A commit on a group that sixteen senders on two nodes keep sending to,
/// some fan-out holding the group's row at every moment: the commit gets
/// its turn (see `postgres/turns.rs`) and is accepted; returns how long
/// it took. (With row locks alone it waited out its time limit and
/// failed.)
pub async fn commit_amid_fan_outs(a: &PgStore, b: &PgStore) -> std::time::Duration {
    let (g, [alice, bob, _carol]) = keyed_group_of_three(a, None).await;
    let update = commit(&g, 1, &alice, b"update", &[], &[]);
    let (outcome, took) = amid_sends(
        a,
        b,
        &g,
        [&alice, &bob],
        crate::Groups::accept_commit(a, &update, NOW, NOW + TTL),
    )
    .await;
    assert!(
        matches!(outcome, Ok(crate::CommitOutcome::Accepted { .. })),
        "{outcome:?} after {took:?}"
    );
    took
}

/// Two groups of Alice's alone, `held` and `other`, and a commit in
/// progress on `held` (what `hold` starts, kept until this returns): a
/// commit on `other` is accepted without waiting for it; returns how long
/// it took.
pub async fn commit_beside_another<H, F>(
    store: &PgStore,
    held: &GroupId,
    other: &GroupId,
    hold: F,
) -> std::time::Duration
where
    F: std::future::Future<Output = H>,
{
    let alice = super::registered(store, "AAAAAAAA", 1).await;
    for g in [held, other] {
        assert!(
            crate::Groups::create_group(
                store,
                g,
                &super::one(&alice),
                &super::state_at(0),
                &super::info_at(0),
                None,
                NOW,
            )
            .await
            .unwrap()
        );
    }
    let _held = hold.await;
    let started = std::time::Instant::now();
    let outcome = crate::Groups::accept_commit(
        store,
        &commit(other, 0, &alice, b"update", &[], &[]),
        NOW,
        NOW + TTL,
    )
    .await;
    let took = started.elapsed();
    assert!(
        matches!(outcome, Ok(crate::CommitOutcome::Accepted { epoch: 1, .. })),
        "{outcome:?} after {took:?}"
    );
    took
}

/// A line whose devices send from sixteen connections on two nodes at
/// once, some send holding the line's row at every moment, is revoked or
/// suspended (`to`): the change gets its turn (see `postgres/turns.rs`);
/// returns how long it took. (With row locks alone the line's own sends
/// held it off until its time limit.)
pub async fn line_change_amid_own_sends(
    a: &PgStore,
    b: &PgStore,
    to: LineStatus,
) -> std::time::Duration {
    let (g, [alice, _bob, _carol]) = keyed_group_of_three(a, None).await;
    let change = async {
        match to {
            LineStatus::Revoked => crate::Accounts::revoke(a, &alice, None, NOW, NOW + TTL)
                .await
                .map(drop),
            _ => crate::Distributors::set_line_status(a, &alice, to).await,
        }
    };
    let (done, took) = amid_sends(a, b, &g, [&alice, &alice], change).await;
    changed(a, &alice, done, took, to).await
}

/// A line sending from sixteen connections on two nodes gets its own
/// other writes in their turn (each takes the line alone, as a change of
/// its status does): its wipe key, a wipe command for it and the day it
/// was last seen; returns how long each took, in that order.
pub async fn line_writes_amid_own_sends(a: &PgStore, b: &PgStore) -> [std::time::Duration; 3] {
    let (g, [alice, _bob, _carol]) = keyed_group_of_three(a, None).await;
    let sends = [&alice, &alice];
    let nine = key(9);
    let wipe_key = crate::Accounts::set_wipe_key(a, &alice, &nine);
    let (done, key_took) = amid_sends(a, b, &g, sends, wipe_key).await;
    assert!(done.is_ok(), "{done:?} after {key_took:?}");
    let command =
        crate::Accounts::queue_wipe_command(a, wipe_command(&alice, 100), 100, NOW, NOW + TTL);
    let (queued, command_took) = amid_sends(a, b, &g, sends, command).await;
    assert!(
        queued.as_ref().is_ok_and(|told| told.is_some()),
        "{queued:?} after {command_took:?}"
    );
    let touch = crate::Accounts::touch(a, &alice, 20_000);
    let (touched, touch_took) = amid_sends(a, b, &g, sends, touch).await;
    assert!(touched.is_ok(), "{touched:?} after {touch_took:?}");
    let row = crate::Accounts::account(a, &alice).await.unwrap().unwrap();
    assert_eq!(
        (
            row.wipe_key,
            row.last_seen_day,
            row.last_wipe_command.is_some()
        ),
        (Some(key(9)), Some(20_000), true)
    );
    [key_took, command_took, touch_took]
}

/// Checks that a change of `line` to `status` succeeded (`done`, after
/// `took`) and holds; returns `took`.
async fn changed<T: std::fmt::Debug>(
    store: &PgStore,
    line: &AccountId,
    done: crate::Result<T>,
    took: std::time::Duration,
    status: LineStatus,
) -> std::time::Duration {
    assert!(done.is_ok(), "{done:?} after {took:?}");
    let account = crate::Accounts::account(store, line)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(account.status, status);
    took
}

/// A stranger's line answering a contact request of Alice's from sixteen
/// connections on two nodes, over and over (any line may name any other
/// here), does not hold Alice's revocation off: it gets her line's turn;
/// returns how long it took.
pub async fn revocation_amid_a_strangers_answers(a: &PgStore, b: &PgStore) -> std::time::Duration {
    let alice = registered(a, "AAAAAAAA", 1).await;
    let mallory = registered(a, "MMMMMMMM", 4).await;
    let each = |store, _| {
        let (alice, mallory) = (&alice, &mallory);
        async move {
            crate::Contacts::decline_contact(store, mallory, alice)
                .await
                .is_ok()
        }
    };
    let revocation = crate::Accounts::revoke(a, &alice, None, NOW, NOW + TTL);
    let (told, took) = amid(a, b, each, revocation).await;
    changed(a, &alice, told, took, LineStatus::Revoked).await
}

/// Bob's device 2, current when a commit adding it was checked, is being
/// removed (`remove` starts the removal, holding Bob's line, and returns a
/// future that ends it) while the commit is stored: the commit waits for
/// the removal's end, then finds the device gone and is refused. (A
/// commit that did not take the lines it adds read the device as still
/// current and was accepted, leaving the removed device a member.)
pub async fn commit_racing_a_device_removal<H, R, E>(
    store: &PgStore,
    remove: impl FnOnce(AccountId) -> H,
) where
    H: std::future::Future<Output = R>,
    R: std::future::Future<Output = Result<(), E>>,
    E: std::fmt::Debug,
{
    let alice = registered(store, "AAAAAAAA", 1).await;
    let bob = registered(store, "BBBBBBBB", 2).await;
    befriend(store, &alice, &bob).await;
    let g = group(5);
    assert!(
        crate::Groups::create_group(
            store,
            &g,
            &one(&alice),
            &state_at(0),
            &info_at(0),
            None,
            NOW
        )
        .await
        .unwrap()
    );
    for (seq, entry) in [(0, super::add_device(0, 1)), (1, super::add_device(1, 2))] {
        assert!(
            crate::DeviceLogs::append_device_entry(store, &bob, seq, &entry, NOW, NOW + TTL)
                .await
                .unwrap()
                .is_some()
        );
    }
    let bob_two = umbra_proto::DeviceAddr {
        account: bob.clone(),
        device: umbra_proto::DeviceId(2),
    };
    let adds = crate::CommitRecord {
        added: vec![bob_two.clone()],
        adds: vec![bob_two.clone()],
        ..commit(&g, 0, &alice, b"add", &[], &[])
    };
    let ending = remove(bob.clone()).await;
    let committing = crate::Groups::accept_commit(store, &adds, NOW, NOW + TTL);
    let ended = async {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        ending.await
    };
    let (outcome, ended) = tokio::join!(committing, ended);
    ended.unwrap();
    assert_eq!(
        outcome.unwrap(),
        crate::CommitOutcome::AddsFormerDevice { device: bob_two }
    );
}
