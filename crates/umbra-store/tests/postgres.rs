//! The PostgreSQL store against the conformance suite, on a private
//! PostgreSQL server each test starts on a random loopback port.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use umbra_proto::GroupId;
use umbra_store::postgres::PgStore;
use umbra_store::postgres::testing::{
    PrivatePostgres, commit_in_progress, line_change_in_progress, query,
};
use umbra_store::{Accounts, Mailboxes, StoreError, StoreLimits, conformance};

fn server() -> PrivatePostgres {
    PrivatePostgres::start(false).unwrap_or_else(|e| panic!("{e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_passes_the_conformance_suite() {
    let pg = server();
    conformance::run_all(|| async { pg.fresh_store(StoreLimits::default()).await.unwrap() }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_caps_mailboxes() {
    let pg = server();
    let limits = StoreLimits {
        database_bytes: 0,
        mailbox_bytes: conformance::MAILBOX_CAP,
    };
    conformance::mailbox_cap(&pg.fresh_store(limits).await.unwrap()).await;
}

/// A second node (or an admin command) on the same database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_sees_another_writer() {
    let pg = server();
    let url = pg.create_database().await.unwrap();
    let server = PgStore::connect(&url, StoreLimits::default())
        .await
        .unwrap();
    let admin = PgStore::connect(&url, StoreLimits::default())
        .await
        .unwrap();
    conformance::sees_another_writer(&server, &admin).await;
}

/// What one connection stored, another (a restarted node) finds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_survives_reconnecting() {
    let pg = server();
    let url = pg.create_database().await.unwrap();
    let highest = {
        let store = PgStore::connect(&url, StoreLimits::default())
            .await
            .unwrap();
        conformance::survives_reopen_part_one(&store).await
    };
    let store = PgStore::connect(&url, StoreLimits::default())
        .await
        .unwrap();
    conformance::survives_reopen_part_two(&store, highest).await;
}

/// Two nodes on one database: racing commits, concurrent fan-outs to one
/// mailbox, a commit before its epoch's messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_two_nodes_order_as_one() {
    let pg = server();
    let url = pg.create_database().await.unwrap();
    let (a, b) = tokio::join!(
        PgStore::connect(&url, StoreLimits::default()),
        PgStore::connect(&url, StoreLimits::default())
    );
    conformance::two_nodes(&a.unwrap(), &b.unwrap()).await;
}

/// Several nodes starting at once on a new database migrate it once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_nodes_starting_together_migrate_once() {
    let pg = server();
    let url = pg.create_database().await.unwrap();
    let (a, b, c) = tokio::join!(
        PgStore::connect(&url, StoreLimits::default()),
        PgStore::connect(&url, StoreLimits::default()),
        PgStore::connect(&url, StoreLimits::default())
    );
    let (a, _b, _c) = (a.unwrap(), b.unwrap(), c.unwrap());
    let (newest, at) = a.schema_versions().await.unwrap();
    assert_eq!(newest, at);
    assert!(
        a.pending(
            &umbra_proto::DeviceAddr::first(umbra_proto::AccountId::parse("AAAAAAAA").unwrap()),
            0,
            1,
            0
        )
        .await
        .unwrap()
        .is_empty()
    );
}

/// Migration 3 run again after a node died in it without recording it:
/// an index whose build finished is kept (not built again from the whole
/// mailbox table); one its build left invalid is dropped and built again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_migration_run_again_keeps_a_finished_index() {
    let pg = server();
    let url = pg.create_database().await.unwrap();
    let index = |url: String| async move {
        let rows = query(
            &url,
            "SELECT i.indexrelid::bigint, i.indisvalid FROM pg_index i
             WHERE i.indexrelid = 'mailbox_full_notices'::regclass",
        )
        .await
        .unwrap();
        (rows[0][0].clone().unwrap(), rows[0][1].clone().unwrap())
    };
    let connect = || async {
        let store = PgStore::connect(&url, StoreLimits::default())
            .await
            .unwrap();
        let (newest, at) = store.schema_versions().await.unwrap();
        assert_eq!(newest, at);
    };
    connect().await;
    let (built, valid) = index(url.clone()).await;
    assert_eq!(valid, "t");

    // Died after the build, before recording it.
    query(&url, "DELETE FROM schema_migrations WHERE version = 3")
        .await
        .unwrap();
    connect().await;
    assert_eq!(
        index(url.clone()).await,
        (built.clone(), "t".into()),
        "kept"
    );

    // Died during the build: the index is there, invalid.
    query(
        &url,
        "UPDATE pg_index SET indisvalid = false
           WHERE indexrelid = 'mailbox_full_notices'::regclass;
         DELETE FROM schema_migrations WHERE version = 3",
    )
    .await
    .unwrap();
    connect().await;
    let (rebuilt, valid) = index(url.clone()).await;
    assert_ne!(rebuilt, built, "built again");
    assert_eq!(valid, "t");
}

/// A database a newer server migrated is refused by an older one, which
/// neither migrates it nor uses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_from_a_newer_server_is_refused() {
    let pg = server();
    let url = pg.create_database().await.unwrap();
    let store = PgStore::connect(&url, StoreLimits::default())
        .await
        .unwrap();
    let (newest, _) = store.schema_versions().await.unwrap();
    drop(store);
    umbra_store::postgres::testing::query(
        &url,
        &format!(
            "INSERT INTO schema_migrations (version) VALUES ({})",
            newest + 1
        ),
    )
    .await
    .unwrap();
    let refused = PgStore::connect(&url, StoreLimits::default()).await;
    assert!(
        matches!(&refused, Err(StoreError::Backend(m)) if m.contains("newer")),
        "{:?}",
        refused.map(|_| ())
    );
}

/// How long the store may take to notice that the database went away: the
/// probe's period and its patience, with room for a loaded machine.
/// (Under the transaction's own 15 s bound, which answers `Backend`, not
/// `Unavailable`: the error's kind shows that the probe answered.)
const NOTICED_WITHIN: Duration = Duration::from_secs(14);
/// How long a request may take to be refused once the outage is known
/// (about a millisecond; a transaction's own bound is 15 s).
const AT_ONCE: Duration = Duration::from_secs(2);

/// Reads and writes until both are refused as unavailable; returns how
/// long the first refusal took, and checks that each later one is fast.
async fn refused_while_away(store: &PgStore) -> Duration {
    let started = Instant::now();
    let who = umbra_proto::AccountId::parse("AAAAAAAA").unwrap();
    loop {
        let read = store.schema_versions().await;
        if let Err(StoreError::Unavailable(_)) = read {
            break;
        }
        assert!(started.elapsed() < NOTICED_WITHIN, "still {read:?}");
    }
    let noticed = started.elapsed();
    assert!(noticed < NOTICED_WITHIN, "refused only after {noticed:?}");
    for _ in 0..10 {
        let asked = Instant::now();
        let read = store.schema_versions().await;
        assert!(matches!(read, Err(StoreError::Unavailable(_))), "{read:?}");
        let write = store.touch(&who, 20_000).await;
        assert!(
            matches!(write, Err(StoreError::Unavailable(_))),
            "{write:?}"
        );
        assert!(
            asked.elapsed() < AT_ONCE,
            "refused after {:?}",
            asked.elapsed()
        );
    }
    noticed
}

/// Asks until the store answers again; returns how long that took.
async fn served_again(store: &PgStore, within: Duration) -> Duration {
    let started = Instant::now();
    while let Err(error) = store.schema_versions().await {
        assert!(started.elapsed() < within, "not served again: {error}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    started.elapsed()
}

/// The database stopped where it is (SIGSTOP: connections open, nothing
/// answers), let go, then killed and started again: while it is away every
/// request is refused at once as unavailable, the store serves again on
/// its own when it is back, and what it stored before is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_away_is_refused_at_once_and_served_again() {
    let mut pg = PrivatePostgres::start(true).unwrap_or_else(|e| panic!("{e}"));
    let url = pg.create_database().await.unwrap();
    let store = PgStore::connect(&url, StoreLimits::default())
        .await
        .unwrap();
    let highest = conformance::survives_reopen_part_one(&store).await;

    pg.pause().unwrap();
    let noticed = refused_while_away(&store).await;
    pg.resume().unwrap();
    let back = served_again(&store, NOTICED_WITHIN).await;
    eprintln!("paused: refused after {noticed:?}, served {back:?} after it went on");

    pg.kill().unwrap();
    let noticed = refused_while_away(&store).await;
    pg.restart().unwrap();
    let back = served_again(&store, NOTICED_WITHIN).await;
    eprintln!("killed: refused after {noticed:?}, served {back:?} after the restart");
    conformance::survives_reopen_part_two(&store, highest).await;
}

/// Sixteen senders at once through two nodes: batched (more messages than
/// transactions on each node), and stored as if one after the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_batches_many_senders_on_two_nodes() {
    let pg = server();
    let url = pg.create_database().await.unwrap();
    let (a, b) = tokio::join!(
        PgStore::connect(&url, StoreLimits::default()),
        PgStore::connect(&url, StoreLimits::default())
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    conformance::many_senders_at_once(&a, &b).await;
    for (name, store) in [("a", &a), ("b", &b)] {
        let stats = store.fan_out_stats();
        assert!(
            stats.items > stats.transactions,
            "node {name} stored every message alone: {stats:?}"
        );
        let stats = store.ack_stats();
        assert!(
            stats.items > stats.transactions,
            "node {name} ran every acknowledgement alone: {stats:?}"
        );
    }
    // Every mailbox is empty, and so is its count of bytes (what the cap
    // is checked against).
    let heads = query(&url, "SELECT COUNT(*) FROM mailbox_heads WHERE bytes <> 0")
        .await
        .unwrap();
    assert_eq!(heads, vec![vec![Some("0".to_owned())]]);
    // Batches lock in one order, and acknowledgements lock the head before
    // the copies: no deadlock was needed to sort them out (each would
    // have cost a second and a retry).
    assert!(!pg.log().contains("deadlock detected"), "{}", pg.log());
}

/// Runs [`conformance::a_batch_stores_as_one_after_another`] on two new
/// databases opened with `limits`, then compares their mailbox heads:
/// the next ID and the byte count (what the cap is checked against) of
/// every mailbox are the same after the batch as after the messages one
/// after the other.
async fn batch_against_one_after_another(limits: StoreLimits, capped: bool) {
    let pg = server();
    let (one, other) = tokio::join!(pg.create_database(), pg.create_database());
    let (one, other) = (one.unwrap(), other.unwrap());
    let (batched, alone) = tokio::join!(
        PgStore::connect(&one, limits),
        PgStore::connect(&other, limits)
    );
    conformance::a_batch_stores_as_one_after_another(&batched.unwrap(), &alone.unwrap(), capped)
        .await;
    let heads = "SELECT account_id, device, next_id, bytes, closed FROM mailbox_heads
                 ORDER BY account_id, device";
    let (these, those) = (
        query(&one, heads).await.unwrap(),
        query(&other, heads).await.unwrap(),
    );
    assert!(these.len() >= 4, "{these:?}");
    assert_eq!(these, those, "the same heads");
    // Every copy as stored, to its expiry (which `pending` does not show).
    let copies = "SELECT account_id, device, id, sender, kind, group_id, payload, sent_at,
                         expires_at FROM mailbox ORDER BY account_id, device, id";
    let (these, those) = (
        query(&one, copies).await.unwrap(),
        query(&other, copies).await.unwrap(),
    );
    assert!(these.len() >= 8, "{these:?}");
    assert_eq!(these, those, "the same copies");
}

/// A batch with every kind of refusal in it: each message's outcome, and
/// every mailbox, as one after the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_batch_is_one_after_another() {
    batch_against_one_after_another(StoreLimits::default(), false).await;
}

/// The same with mailboxes capped, the batch fitting under the cap (the
/// byte counts it moves must be the ones messages one at a time move).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_capped_batch_is_one_after_another() {
    let limits = StoreLimits {
        mailbox_bytes: 1 << 20,
        ..StoreLimits::default()
    };
    batch_against_one_after_another(limits, false).await;
}

/// The same with Carol's mailbox filling part way through the batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_batch_meeting_a_full_mailbox_is_one_after_another() {
    let limits = StoreLimits {
        mailbox_bytes: conformance::BATCH_CAP,
        ..StoreLimits::default()
    };
    batch_against_one_after_another(limits, true).await;
}

/// Expiry and an acknowledgement meeting on two mailboxes' heads and
/// copies: neither waits for the other in a cycle (PostgreSQL's log shows
/// none broken), each copy is deleted once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_expiry_and_acknowledgements_take_heads_in_one_order() {
    let pg = server();
    let url = pg.create_database().await.unwrap();
    let store = PgStore::connect(&url, StoreLimits::default())
        .await
        .unwrap();
    conformance::expiry_meets_an_acknowledgement(&store, &url).await;
    assert!(!pg.log().contains("deadlock detected"), "{}", pg.log());
}

/// Fan-out batches on two nodes racing commits with Welcomes, a
/// revocation, acknowledgements and expiry: no transaction waits for
/// another in a cycle, and every copy is where the rules put it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_batches_race_commits_and_revocations() {
    let pg = server();
    let url = pg.create_database().await.unwrap();
    let limits = StoreLimits {
        mailbox_bytes: conformance::RACE_CAP,
        ..StoreLimits::default()
    };
    let (a, b) = tokio::join!(
        PgStore::connect(&url, limits),
        PgStore::connect(&url, limits)
    );
    conformance::commits_and_revocations_race_batches(&a.unwrap(), &b.unwrap(), &url).await;
    assert!(!pg.log().contains("deadlock detected"), "{}", pg.log());
}

/// A device's `MailboxFull` notice is found through the notices' own
/// index, not by reading its mailbox: a full mailbox holds as many copies
/// as its cap allows, and every message to its groups looks the notice up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_finds_a_full_mailbox_notice_without_reading_the_mailbox() {
    let pg = server();
    let url = pg.create_database().await.unwrap();
    PgStore::connect(&url, StoreLimits::default())
        .await
        .unwrap();
    for plan in umbra_store::postgres::testing::notice_plans(&url)
        .await
        .unwrap()
    {
        assert!(plan.contains("mailbox_full_notices"), "{plan}");
    }
}

/// An acknowledgement's statement reads no copy before it holds the
/// mailbox heads: the gate on the heads' lock is a one-time filter above
/// every read of the mailbox in the delete, in the generic plan a
/// prepared statement settles on. (The expiry test shows what reading
/// first does: a deadlock; this one says where PostgreSQL put the gate,
/// should a later version plan it otherwise.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_acknowledgements_lock_heads_before_reading_copies() {
    let pg = server();
    let url = pg.create_database().await.unwrap();
    PgStore::connect(&url, StoreLimits::default())
        .await
        .unwrap();
    for plan in umbra_store::postgres::testing::ack_plans(&url)
        .await
        .unwrap()
    {
        let lines: Vec<&str> = plan.lines().collect();
        let depth = |line: &str| line.len() - line.trim_start().len();
        // The delete, and the gate somewhere below it.
        let delete = lines
            .iter()
            .position(|l| l.contains("Delete on mailbox"))
            .unwrap_or_else(|| panic!("{plan}"));
        let gate = lines
            .iter()
            .position(|l| l.contains("One-Time Filter"))
            .unwrap_or_else(|| panic!("no one-time filter: {plan}"));
        assert!(gate > delete, "{plan}");
        // The node the gate filters (the line above it) holds every read
        // of the mailbox in the delete: each such scan lies below it.
        let gated = depth(lines[gate - 1]);
        let subtree_end = (gate..lines.len())
            .find(|&n| n > gate && depth(lines[n]) <= gated)
            .unwrap_or(lines.len());
        for (n, line) in lines.iter().enumerate().skip(delete) {
            let reads_copies = line.contains(" on mailbox ")
                || line.contains(" on mailbox_pkey")
                || line.ends_with(" on mailbox");
            if reads_copies && !line.contains("Delete on") {
                assert!(
                    n > gate && n < subtree_end,
                    "a read of the mailbox outside the gate, line {n}: {plan}"
                );
            }
        }
    }
}

/// A line sending from sixteen connections on two nodes is revoked in its
/// turn, not held off by its own sends until the revocation's time limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_revocation_amid_own_sends_gets_its_turn() {
    let pg = server();
    let url = pg.create_database().await.unwrap();
    let (a, b) = tokio::join!(
        PgStore::connect(&url, StoreLimits::default()),
        PgStore::connect(&url, StoreLimits::default())
    );
    let took = conformance::batches::line_change_amid_own_sends(
        &a.unwrap(),
        &b.unwrap(),
        umbra_store::LineStatus::Revoked,
    )
    .await;
    assert!(
        took < Duration::from_secs(5),
        "the revocation waited {took:?}"
    );
    assert!(!pg.log().contains("deadlock detected"), "{}", pg.log());
}

/// A line sending from sixteen connections on two nodes is suspended in
/// its turn, and one whose lines a stranger names from sixteen connections
/// is revoked in its turn (neither waits until its time limit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_line_changes_amid_others_get_their_turn() {
    let pg = server();
    for change in 0..2 {
        let url = pg.create_database().await.unwrap();
        let (a, b) = tokio::join!(
            PgStore::connect(&url, StoreLimits::default()),
            PgStore::connect(&url, StoreLimits::default())
        );
        let (a, b) = (a.unwrap(), b.unwrap());
        let took = if change == 0 {
            conformance::batches::line_change_amid_own_sends(
                &a,
                &b,
                umbra_store::LineStatus::Suspended,
            )
            .await
        } else {
            conformance::batches::revocation_amid_a_strangers_answers(&a, &b).await
        };
        assert!(
            took < Duration::from_secs(5),
            "change {change} waited {took:?}"
        );
    }
    assert!(!pg.log().contains("deadlock detected"), "{}", pg.log());
}

/// A line sending from sixteen connections on two nodes sets its wipe
/// key, is sent a wipe command and is seen logging in, each in its turn
/// (none waits until its time limit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_line_writes_amid_own_sends_get_their_turn() {
    let pg = server();
    let url = pg.create_database().await.unwrap();
    let (a, b) = tokio::join!(
        PgStore::connect(&url, StoreLimits::default()),
        PgStore::connect(&url, StoreLimits::default())
    );
    let took = conformance::batches::line_writes_amid_own_sends(&a.unwrap(), &b.unwrap()).await;
    for (write, took) in ["wipe key", "wipe command", "last seen"].iter().zip(took) {
        assert!(took < Duration::from_secs(5), "the {write} waited {took:?}");
    }
    assert!(!pg.log().contains("deadlock detected"), "{}", pg.log());
}

/// A commit adding a device that a removal in progress takes away waits
/// for the removal and is refused, not stored with the removed device a
/// member.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
// The removal starts in the first future and ends with the one it yields.
#[allow(clippy::async_yields_async)]
async fn postgres_commit_racing_a_device_removal_is_refused() {
    let pg = server();
    let url = pg.create_database().await.unwrap();
    let store = PgStore::connect(&url, StoreLimits::default())
        .await
        .unwrap();
    conformance::batches::commit_racing_a_device_removal(&store, |bob| {
        let url = url.clone();
        async move {
            let removal = line_change_in_progress(
                &url,
                bob.as_str(),
                &format!("DELETE FROM devices WHERE account_id = '{bob}' AND device = 2"),
            )
            .await
            .unwrap();
            removal.commit()
        }
    })
    .await;
}

/// Two groups whose IDs give the same 32-bit `hashtext`, the key the
/// groups' turns first had (public and cheap: anyone could choose a group
/// ID matching another group's): a commit in progress on one holds no
/// commit on the other up. (With that key the second waited for the
/// first to end, here until its own time limit.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_group_turn_is_the_group_own() {
    let pg = server();
    let url = pg.create_database().await.unwrap();
    let store = PgStore::connect(&url, StoreLimits::default())
        .await
        .unwrap();
    // About ten such pairs among 300,000 IDs (a birthday bound on 32 bits).
    let pair = query(
        &url,
        "SELECT min(i), max(i) FROM generate_series(1, 300000) AS i
         GROUP BY hashtext(encode(int8send(i), 'hex')) HAVING count(*) > 1 LIMIT 1",
    )
    .await
    .unwrap();
    let [held, other] = [0, 1].map(|column| {
        let n: i64 = pair[0][column].as_deref().unwrap().parse().unwrap();
        GroupId::new(n.to_be_bytes().to_vec()).unwrap()
    });
    let took = conformance::batches::commit_beside_another(&store, &held, &other, async {
        commit_in_progress(&url, &held).await.unwrap()
    })
    .await;
    assert!(took < Duration::from_secs(5), "the commit waited {took:?}");
}

/// A commit on a group two nodes' fan-outs never leave alone is served
/// in its turn, not starved until its time limit (14 s, then refused,
/// before the groups' turns).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_commit_amid_fan_outs_gets_its_turn() {
    let pg = server();
    let url = pg.create_database().await.unwrap();
    let (a, b) = tokio::join!(
        PgStore::connect(&url, StoreLimits::default()),
        PgStore::connect(&url, StoreLimits::default())
    );
    let took = conformance::batches::commit_amid_fan_outs(&a.unwrap(), &b.unwrap()).await;
    // Its turn comes once the fan-outs already in finish: milliseconds;
    // seconds on a loaded machine.
    assert!(took < Duration::from_secs(5), "the commit waited {took:?}");
    assert!(!pg.log().contains("deadlock detected"), "{}", pg.log());
}
