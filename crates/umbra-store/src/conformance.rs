//! The behaviour every storage backend must show. A backend's tests call
//! [`run_all`] with a function that makes a fresh, empty store; each check
//! gets its own. Checks panic with a description of what differed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod batches;
mod blobs;

pub use batches::{
    BATCH_CAP, RACE_CAP, a_batch_stores_as_one_after_another, commits_and_revocations_race_batches,
    expiry_meets_an_acknowledgement, many_senders_at_once,
};

use std::future::Future;

use umbra_proto::{
    AccountId, ActivationCode, DeliveryKind, DeviceAddr, DeviceChange, DeviceEntry, DeviceId,
    GroupId, IdentityKey, Signature,
};

use crate::{
    Account, CodeHash, CodeKind, CommitOutcome, CommitRecord, ContactAcceptOutcome,
    ContactRequestOutcome, DAY, Durable, FanOutOutcome, LineStatus, Notice, Registration, Renewal,
    Result, Store, StoredDelivery, TokenKey,
};

const NOW: u64 = 1_800_000_000;
const TTL: u64 = 7 * DAY;
/// The classical MLS suite (3) and the post-quantum one (0x004F), as the
/// server files KeyPackages under them.
const C: u16 = 0x0003;
const PQ: u16 = 0x004F;

/// Runs every check, each against a fresh store from `make`.
pub async fn run_all<S, F, Fut>(make: F)
where
    S: Store,
    F: Fn() -> Fut,
    Fut: Future<Output = S>,
{
    registration(&make().await).await;
    key_packages(&make().await).await;
    key_packages_per_device(&make().await).await;
    key_packages_per_suite(&make().await).await;
    contacts(&make().await).await;
    contact_requests_declined_and_pruned(&make().await).await;
    commits_one_per_epoch(&make().await).await;
    commits_add_only_current_devices(&make().await).await;
    commit_hashes_are_swept(&make().await).await;
    fan_out_and_mailboxes(&make().await).await;
    notices(&make().await).await;
    revocation(&make().await).await;
    wipe_commands(&make().await).await;
    lines_decide_each_send(&make().await).await;
    distributors(&make().await).await;
    expiry(&make().await).await;
    device_logs(&make().await).await;
    mailboxes_per_device(&make().await).await;
    anonymous_fan_out_and_delivery_keys(&make().await).await;
    tokens(&make().await).await;
    mailbox_depth(&make().await).await;
    blobs::blobs(&make().await).await;
    blobs::blobs_wait_only_for_who_can_fetch(&make().await).await;
    blobs::a_sweep_over_many_blobs_takes_exactly_the_ones_due(&make().await).await;
    let store = make().await;
    batches::many_senders_at_once(&store, &store).await;
}

/// What the operator's metrics read: every copy waiting, in the ack window
/// or on disk, counted once; acknowledged ones gone.
async fn mailbox_depth(store: &impl Store) {
    let (g, alice, bob) = group_of_two(store).await;
    read_all(store, &alice).await;
    read_all(store, &bob).await;
    assert_eq!(store.depth().await.unwrap(), crate::MailboxDepth::default());
    for n in 0..3u8 {
        let (_, durable) = stored(send(store, &g, &bob, &[n; 10], NOW).await);
        durable.wait().await.unwrap();
    }
    assert_eq!(
        store.depth().await.unwrap(),
        crate::MailboxDepth {
            copies: 3,
            bytes: 30
        }
    );
    let held = store.pending(&one(&alice), 0, 2, NOW).await.unwrap();
    store
        .ack(&one(&alice), &held.iter().map(|d| d.id).collect::<Vec<_>>())
        .await
        .unwrap();
    assert_eq!(
        store.depth().await.unwrap(),
        crate::MailboxDepth {
            copies: 1,
            bytes: 10
        }
    );
}

fn account(text: &str) -> AccountId {
    AccountId::parse(text).unwrap()
}

/// An account's first device (every account the checks register has it).
fn one(account: &AccountId) -> DeviceAddr {
    DeviceAddr::first(account.clone())
}

fn code(n: u8) -> CodeHash {
    let digits = AccountId::ALPHABET;
    let text: String = (0..16)
        .map(|i| char::from(digits[(usize::from(n) * 7 + i) % digits.len()]))
        .collect();
    CodeHash::of(&ActivationCode::parse(&text).unwrap())
}

fn key(n: u8) -> IdentityKey {
    IdentityKey::from_bytes([n; 32])
}

/// Alice's group with Bob in it (epoch 1), for backend-specific tests.
pub(crate) async fn group_of_two(store: &impl Store) -> (GroupId, AccountId, AccountId) {
    let alice = registered(store, "AAAAAAAA", 1).await;
    let bob = registered(store, "BBBBBBBB", 2).await;
    befriend(store, &alice, &bob).await;
    let g = group(9);
    store
        .create_group(&g, &one(&alice), &state_at(0), &info_at(0), None, NOW)
        .await
        .unwrap();
    store
        .accept_commit(&commit(&g, 0, &alice, b"add", &[&bob], &[]), NOW, NOW + TTL)
        .await
        .unwrap();
    (g, alice, bob)
}

/// Reads and acknowledges everything in `who`'s mailbox.
async fn read_all(store: &impl Store, who: &AccountId) -> Vec<StoredDelivery> {
    let held = store.pending(&one(who), 0, 100, NOW).await.unwrap();
    let ids: Vec<u64> = held.iter().map(|d| d.id).collect();
    store.ack(&one(who), &ids).await.unwrap();
    held
}

/// Alice's group with Bob and Carol, at epoch 1, every mailbox read.
pub(crate) async fn group_of_three(store: &impl Store) -> (GroupId, [AccountId; 3]) {
    keyed_group_of_three(store, None).await
}

/// Alice, Bob and Carol registered, Bob and Carol Alice's contacts.
async fn alice_and_friends(store: &impl Store) -> [AccountId; 3] {
    let alice = registered(store, "AAAAAAAA", 1).await;
    let bob = registered(store, "BBBBBBBB", 2).await;
    let carol = registered(store, "CCCCCCCC", 3).await;
    befriend(store, &alice, &bob).await;
    befriend(store, &alice, &carol).await;
    [alice, bob, carol]
}

/// [`group_of_three`] whose epoch 1 has the delivery key `key`.
pub(crate) async fn keyed_group_of_three(
    store: &impl Store,
    key: Option<[u8; 32]>,
) -> (GroupId, [AccountId; 3]) {
    let [alice, bob, carol] = alice_and_friends(store).await;
    let g = group(3);
    store
        .create_group(&g, &one(&alice), &state_at(0), &info_at(0), None, NOW)
        .await
        .unwrap();
    store
        .accept_commit(
            &CommitRecord {
                delivery_key: key,
                ..commit(&g, 0, &alice, b"add", &[&bob, &carol], &[])
            },
            NOW,
            NOW + TTL,
        )
        .await
        .unwrap();
    for who in [&alice, &bob, &carol] {
        read_all(store, who).await;
    }
    (g, [alice, bob, carol])
}

fn group(n: u8) -> GroupId {
    GroupId::new(vec![n; 16]).unwrap()
}

pub(crate) async fn registered(store: &impl Store, id: &str, n: u8) -> AccountId {
    store.issue_codes(&[code(n)], 30, NOW).await.unwrap();
    let id = account(id);
    let outcome = store.register(code(n), &id, &key(n), NOW).await.unwrap();
    assert!(
        matches!(outcome, Registration::Registered(_)),
        "{outcome:?}"
    );
    id
}

async fn befriend(store: &impl Store, a: &AccountId, b: &AccountId) {
    store.request_contact(a, b, NOW, NOW + TTL).await.unwrap();
    store.accept_contact(b, a, NOW, NOW + TTL).await.unwrap();
}

async fn registration(store: &impl Store) {
    store
        .issue_codes(&[code(1), code(2)], 180, NOW)
        .await
        .unwrap();
    let alice = account("AAAAAAAA");
    let bob = account("BBBBBBBB");
    assert_eq!(
        store.register(code(9), &alice, &key(1), NOW).await.unwrap(),
        Registration::UnknownCode
    );
    let Registration::Registered(account_row) =
        store.register(code(1), &alice, &key(1), NOW).await.unwrap()
    else {
        panic!("a fresh code must register");
    };
    assert_eq!(account_row.subscription_expires_at, NOW + 180 * DAY);
    assert_eq!(store.account(&alice).await.unwrap(), Some(account_row));
    assert_eq!(
        store.register(code(1), &bob, &key(2), NOW).await.unwrap(),
        Registration::CodeUsed
    );
    assert_eq!(
        store.register(code(2), &alice, &key(2), NOW).await.unwrap(),
        Registration::IdTaken
    );
    assert_eq!(
        store.register(code(2), &bob, &key(1), NOW).await.unwrap(),
        Registration::KeyTaken
    );
    // The failed attempts did not burn the code.
    assert!(matches!(
        store.register(code(2), &bob, &key(2), NOW).await.unwrap(),
        Registration::Registered(_)
    ));
    assert_eq!(store.account(&account("CCCCCCCC")).await.unwrap(), None);
}

async fn key_packages(store: &impl Store) {
    let alice = registered(store, "AAAAAAAA", 1).await;
    let one = DeviceId::FIRST;
    assert_eq!(store.take_key_package(&alice, one, C).await.unwrap(), None);
    let stock = store
        .add_key_packages(
            &alice,
            one,
            C,
            vec![b"kp1".to_vec(), b"kp2".to_vec()],
            Some(b"last".to_vec()),
        )
        .await
        .unwrap();
    assert_eq!((stock.one_time, stock.has_last_resort), (2, true));
    let first = store.take_key_package(&alice, one, C).await.unwrap();
    let second = store.take_key_package(&alice, one, C).await.unwrap();
    assert_eq!(first, Some((b"kp1".to_vec(), false)), "oldest first");
    assert_eq!(
        second,
        Some((b"kp2".to_vec(), false)),
        "each handed out once"
    );
    for _ in 0..2 {
        assert_eq!(
            store.take_key_package(&alice, one, C).await.unwrap(),
            Some((b"last".to_vec(), true)),
            "the last-resort package stays"
        );
    }
    let stock = store
        .add_key_packages(&alice, one, C, vec![], Some(b"newer".to_vec()))
        .await
        .unwrap();
    assert_eq!((stock.one_time, stock.has_last_resort), (0, true));
    assert_eq!(
        store.take_key_package(&alice, one, C).await.unwrap(),
        Some((b"newer".to_vec(), true)),
        "uploading a last-resort package replaces the old one"
    );
}

/// A declined request's waiting deliveries go at once, and the request
/// with the unanswered ones after `CONTACT_REQUEST_LIFETIME`; meanwhile its
/// requester is answered as if it were pending. Contacts stay.
async fn contact_requests_declined_and_pruned(store: &impl Store) {
    let alice = registered(store, "AAAAAAAA", 1).await;
    let bob = registered(store, "BBBBBBBB", 2).await;
    let carol = registered(store, "CCCCCCCC", 3).await;
    let dave = registered(store, "DDDDDDDD", 4).await;
    store
        .request_contact(&alice, &bob, NOW, NOW + TTL)
        .await
        .unwrap();
    assert!(store.decline_contact(&bob, &alice).await.unwrap());
    assert!(
        store
            .pending(&one(&bob), 0, 10, NOW)
            .await
            .unwrap()
            .is_empty(),
        "its delivery went with it"
    );
    assert_eq!(
        store
            .accept_contact(&bob, &alice, NOW, NOW + TTL)
            .await
            .unwrap()
            .0,
        ContactAcceptOutcome::NoRequest
    );
    assert!(
        !store.decline_contact(&bob, &alice).await.unwrap(),
        "declined once"
    );
    // Alice cannot insist, nor tell it was declined, nor get her budget back.
    assert_eq!(
        store
            .request_contact(&alice, &bob, NOW + 1, NOW + TTL)
            .await
            .unwrap(),
        (ContactRequestOutcome::AlreadyRequested, Vec::new())
    );
    assert!(
        store
            .pending(&one(&bob), 0, 10, NOW)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(store.contact_requests_since(&alice, NOW).await.unwrap(), 1);
    // Bob may change his mind and ask her himself.
    assert_eq!(
        store
            .request_contact(&bob, &alice, NOW + 2, NOW + TTL)
            .await
            .unwrap()
            .0,
        ContactRequestOutcome::Sent
    );
    assert_eq!(
        store
            .accept_contact(&alice, &bob, NOW + 2, NOW + TTL)
            .await
            .unwrap()
            .0,
        ContactAcceptOutcome::Accepted
    );
    // Only the addressee's decline counts.
    store
        .request_contact(&carol, &bob, NOW, NOW + TTL)
        .await
        .unwrap();
    assert!(!store.decline_contact(&carol, &bob).await.unwrap());
    assert!(!store.decline_contact(&dave, &carol).await.unwrap());
    // Carol's request, unanswered, and an accepted pair.
    store
        .request_contact(&dave, &alice, NOW, NOW + TTL)
        .await
        .unwrap();
    store
        .accept_contact(&alice, &dave, NOW, NOW + TTL)
        .await
        .unwrap();
    let lifetime = crate::CONTACT_REQUEST_LIFETIME;
    store.expire(NOW + lifetime - 1).await.unwrap();
    assert_eq!(
        store
            .request_contact(&carol, &bob, NOW + lifetime - 1, NOW + TTL)
            .await
            .unwrap()
            .0,
        ContactRequestOutcome::AlreadyRequested,
        "kept until its lifetime"
    );
    store.expire(NOW + lifetime).await.unwrap();
    assert_eq!(
        store
            .accept_contact(&bob, &carol, NOW + lifetime, NOW + lifetime + TTL)
            .await
            .unwrap()
            .0,
        ContactAcceptOutcome::NoRequest,
        "forgotten after it"
    );
    assert!(
        store.are_contacts(&alice, &dave).await.unwrap(),
        "contacts stay"
    );
}

async fn key_packages_per_suite(store: &impl Store) {
    let alice = registered(store, "AAAAAAAA", 1).await;
    let one = DeviceId::FIRST;
    store
        .add_key_packages(
            &alice,
            one,
            C,
            vec![b"c-a".to_vec()],
            Some(b"c-last".to_vec()),
        )
        .await
        .unwrap();
    let stock = store
        .add_key_packages(
            &alice,
            one,
            PQ,
            vec![b"pq-a".to_vec(), b"pq-b".to_vec()],
            None,
        )
        .await
        .unwrap();
    assert_eq!(
        (stock.one_time, stock.has_last_resort),
        (2, false),
        "a suite's stock counts its own packages only"
    );
    let stock = store.key_package_stock(&alice, one, C).await.unwrap();
    assert_eq!((stock.one_time, stock.has_last_resort), (1, true));
    let stocks = store
        .key_package_stocks(&alice, one, &[PQ, C, 0xfff0])
        .await
        .unwrap();
    assert_eq!(
        stocks
            .iter()
            .map(|s| (s.one_time, s.has_last_resort))
            .collect::<Vec<_>>(),
        vec![(2, false), (1, true), (0, false)],
        "every suite's stock at once, in the order asked, none for a suite never uploaded"
    );
    assert_eq!(
        store.take_key_package(&alice, one, PQ).await.unwrap(),
        Some((b"pq-a".to_vec(), false)),
        "a fetch of one suite hands out that suite's, though the other's is older"
    );
    assert_eq!(
        store.take_key_package(&alice, one, PQ).await.unwrap(),
        Some((b"pq-b".to_vec(), false))
    );
    assert_eq!(
        store.take_key_package(&alice, one, PQ).await.unwrap(),
        None,
        "one suite's last resort is not another's"
    );
    store
        .add_key_packages(&alice, one, PQ, vec![], Some(b"pq-last".to_vec()))
        .await
        .unwrap();
    assert_eq!(
        store.take_key_package(&alice, one, PQ).await.unwrap(),
        Some((b"pq-last".to_vec(), true))
    );
    assert_eq!(
        store.take_key_package(&alice, one, C).await.unwrap(),
        Some((b"c-a".to_vec(), false))
    );
    assert_eq!(
        store.take_key_package(&alice, one, C).await.unwrap(),
        Some((b"c-last".to_vec(), true)),
        "a last-resort package of one suite leaves the other's in place"
    );
    assert_eq!(
        store.withdraw_key_packages(&alice, one).await.unwrap(),
        2,
        "withdrawing takes every suite's"
    );
}

async fn key_packages_per_device(store: &impl Store) {
    let alice = registered(store, "AAAAAAAA", 1).await;
    let (one, two) = (DeviceId::FIRST, DeviceId(2));
    store
        .add_key_packages(
            &alice,
            one,
            C,
            vec![b"one-a".to_vec()],
            Some(b"one-last".to_vec()),
        )
        .await
        .unwrap();
    let stock = store
        .add_key_packages(
            &alice,
            two,
            C,
            vec![b"two-a".to_vec(), b"two-b".to_vec()],
            Some(b"two-last".to_vec()),
        )
        .await
        .unwrap();
    assert_eq!(
        (stock.one_time, stock.has_last_resort),
        (2, true),
        "a device's stock counts its own packages only"
    );
    let stock = store.key_package_stock(&alice, one, C).await.unwrap();
    assert_eq!((stock.one_time, stock.has_last_resort), (1, true));
    assert_eq!(
        store.take_key_package(&alice, two, C).await.unwrap(),
        Some((b"two-a".to_vec(), false)),
        "each device hands out its own"
    );
    assert_eq!(
        store.take_key_package(&alice, one, C).await.unwrap(),
        Some((b"one-a".to_vec(), false))
    );
    assert_eq!(
        store.take_key_package(&alice, one, C).await.unwrap(),
        Some((b"one-last".to_vec(), true)),
        "one device's last resort is not another's"
    );
    assert_eq!(
        store.withdraw_key_packages(&alice, two).await.unwrap(),
        2,
        "one one-time package and the last-resort one"
    );
    assert_eq!(store.take_key_package(&alice, two, C).await.unwrap(), None);
    let stock = store.key_package_stock(&alice, two, C).await.unwrap();
    assert_eq!((stock.one_time, stock.has_last_resort), (0, false));
    assert_eq!(
        store.take_key_package(&alice, one, C).await.unwrap(),
        Some((b"one-last".to_vec(), true)),
        "withdrawing one device's packages leaves the others'"
    );
    assert_eq!(
        store
            .withdraw_key_packages(&alice, DeviceId(3))
            .await
            .unwrap(),
        0
    );
}

async fn contacts(store: &impl Store) {
    let alice = registered(store, "AAAAAAAA", 1).await;
    let bob = registered(store, "BBBBBBBB", 2).await;
    // A line revoked after the caller looked (as a server does before it
    // asks) neither sends nor receives a request: the store looks again.
    let gone = registered(store, "GGGGGGGG", 7).await;
    store.revoke(&gone, None, NOW, NOW + TTL).await.unwrap();
    for (from, to) in [(&alice, &gone), (&gone, &alice)] {
        assert_eq!(
            store
                .request_contact(from, to, NOW, NOW + TTL)
                .await
                .unwrap(),
            (ContactRequestOutcome::LineGone, Vec::new())
        );
    }
    assert!(read_all(store, &alice).await.is_empty());
    assert_eq!(
        store
            .accept_contact(&alice, &gone, NOW, NOW + TTL)
            .await
            .unwrap()
            .0,
        ContactAcceptOutcome::NoRequest
    );
    assert!(!store.are_contacts(&alice, &bob).await.unwrap());
    assert_eq!(
        store
            .accept_contact(&bob, &alice, NOW, NOW + TTL)
            .await
            .unwrap()
            .0,
        ContactAcceptOutcome::NoRequest
    );
    let (outcome, id) = store
        .request_contact(&alice, &bob, NOW, NOW + TTL)
        .await
        .unwrap();
    assert_eq!(outcome, ContactRequestOutcome::Sent);
    assert_eq!(id, vec![one(&bob)], "told on its one device");
    assert_eq!(
        store
            .request_contact(&alice, &bob, NOW, NOW + TTL)
            .await
            .unwrap()
            .0,
        ContactRequestOutcome::AlreadyRequested
    );
    assert!(
        !store.are_contacts(&alice, &bob).await.unwrap(),
        "not before acceptance"
    );
    assert_eq!(
        store
            .accept_contact(&alice, &bob, NOW, NOW + TTL)
            .await
            .unwrap()
            .0,
        ContactAcceptOutcome::NoRequest,
        "the requester cannot accept its own request"
    );
    let inbox = store.pending(&one(&bob), 0, 10, NOW).await.unwrap();
    assert_eq!(inbox.len(), 1);
    assert_eq!(
        (inbox[0].kind, inbox[0].sender.as_ref()),
        (DeliveryKind::ContactRequest, Some(&alice))
    );
    assert_eq!(
        store
            .accept_contact(&bob, &alice, NOW, NOW + TTL)
            .await
            .unwrap()
            .0,
        ContactAcceptOutcome::Accepted
    );
    assert!(store.are_contacts(&alice, &bob).await.unwrap());
    assert!(store.are_contacts(&bob, &alice).await.unwrap());
    let inbox = store.pending(&one(&alice), 0, 10, NOW).await.unwrap();
    assert_eq!(
        (inbox[0].kind, inbox[0].sender.as_ref()),
        (DeliveryKind::ContactAccepted, Some(&bob))
    );
    assert_eq!(
        store
            .request_contact(&bob, &alice, NOW, NOW + TTL)
            .await
            .unwrap()
            .0,
        ContactRequestOutcome::AlreadyContacts
    );
}

/// The copies of a fan-out that was stored, and its durability.
fn stored(outcome: Result<FanOutOutcome>) -> (Vec<(DeviceAddr, StoredDelivery)>, Durable) {
    match outcome.unwrap() {
        FanOutOutcome::Stored {
            deliveries,
            durable,
        } => (deliveries, durable),
        other => panic!("not stored: {other:?}"),
    }
}

/// An application message from `sender` to `g` in the group's current
/// epoch, sent at `at` and kept for the TTL.
async fn send(
    store: &impl Store,
    g: &GroupId,
    sender: &AccountId,
    payload: &[u8],
    at: u64,
) -> Result<FanOutOutcome> {
    let epoch = store.group(g).await?.map_or(0, |group| group.epoch);
    send_in_epoch(store, g, sender, payload, epoch, at).await
}

/// Like [`send`], from the MLS epoch `epoch`.
async fn send_in_epoch(
    store: &impl Store,
    g: &GroupId,
    sender: &AccountId,
    payload: &[u8],
    epoch: u64,
    at: u64,
) -> Result<FanOutOutcome> {
    store
        .fan_out(
            g,
            &one(sender),
            DeliveryKind::Application,
            payload,
            epoch,
            at,
            at + TTL,
        )
        .await
}

/// Waits until a stored fan-out's copies are written or acknowledged.
async fn settled(outcome: Result<FanOutOutcome>) {
    stored(outcome).1.wait().await.unwrap();
}

pub(crate) fn commit(
    group_id: &GroupId,
    epoch: u64,
    sender: &AccountId,
    body: &[u8],
    added: &[&AccountId],
    removed: &[&AccountId],
) -> CommitRecord {
    CommitRecord {
        group_id: group_id.clone(),
        epoch,
        sender: one(sender),
        commit: body.to_vec(),
        welcome: (!added.is_empty()).then(|| b"welcome".to_vec()),
        added: added.iter().map(|a| one(a)).collect(),
        adds: added.iter().map(|a| one(a)).collect(),
        removed: removed.iter().map(|a| one(a)).collect(),
        public_state: state_at(epoch.saturating_add(1)),
        group_info: info_at(epoch.saturating_add(1)),
        delivery_key: None,
    }
}

/// Stands for a group's public state at `epoch` (opaque to the store).
fn state_at(epoch: u64) -> Vec<u8> {
    format!("public state at epoch {epoch}").into_bytes()
}

fn info_at(epoch: u64) -> Vec<u8> {
    format!("group info at epoch {epoch}").into_bytes()
}

/// A commit's hash is kept for COMMIT_HASH_LIFETIME, so a resubmission is
/// recognised as accepted; then it is swept, and a resubmission is only
/// stale.
async fn commit_hashes_are_swept(store: &impl Store) {
    let alice = registered(store, "AAAAAAAA", 1).await;
    let bob = registered(store, "BBBBBBBB", 2).await;
    let g = group(1);
    store
        .create_group(&g, &one(&alice), &state_at(0), &info_at(0), None, NOW)
        .await
        .unwrap();
    let add = commit(&g, 0, &alice, b"add bob", &[&bob], &[]);
    assert!(matches!(
        store.accept_commit(&add, NOW, NOW + TTL).await.unwrap(),
        CommitOutcome::Accepted { epoch: 1, .. }
    ));
    store
        .expire(NOW + crate::COMMIT_HASH_LIFETIME - 1)
        .await
        .unwrap();
    assert_eq!(
        store.accept_commit(&add, NOW, NOW + TTL).await.unwrap(),
        CommitOutcome::Duplicate { epoch: 1 },
        "kept until its lifetime has passed"
    );
    store
        .expire(NOW + crate::COMMIT_HASH_LIFETIME)
        .await
        .unwrap();
    assert_eq!(
        store.accept_commit(&add, NOW, NOW + TTL).await.unwrap(),
        CommitOutcome::Stale { current_epoch: 1 },
        "swept once its lifetime has passed"
    );
}

async fn commits_one_per_epoch(store: &impl Store) {
    let alice = registered(store, "AAAAAAAA", 1).await;
    let bob = registered(store, "BBBBBBBB", 2).await;
    let carol = registered(store, "CCCCCCCC", 3).await;
    let g = group(1);
    assert!(
        store
            .create_group(&g, &one(&alice), &state_at(0), &info_at(0), None, NOW)
            .await
            .unwrap()
    );
    assert!(
        !store
            .create_group(&g, &one(&bob), &state_at(0), &info_at(0), None, NOW)
            .await
            .unwrap(),
        "IDs are unique"
    );
    assert_eq!(
        store
            .accept_commit(
                &commit(&group(2), 0, &alice, b"c", &[], &[]),
                NOW,
                NOW + TTL
            )
            .await
            .unwrap(),
        CommitOutcome::UnknownGroup
    );
    assert_eq!(
        store
            .accept_commit(&commit(&g, 0, &bob, b"c", &[&bob], &[]), NOW, NOW + TTL)
            .await
            .unwrap(),
        CommitOutcome::NotAMember
    );
    let add = commit(&g, 0, &alice, b"add bob and carol", &[&bob, &carol], &[]);
    let outcome = store.accept_commit(&add, NOW, NOW + TTL).await.unwrap();
    let CommitOutcome::Accepted {
        epoch: 1,
        mut recipients,
        welcomed: 2,
    } = outcome
    else {
        panic!("{outcome:?}");
    };
    recipients.sort();
    assert_eq!(
        recipients,
        vec![one(&bob), one(&carol)],
        "welcomes to the added"
    );
    assert_eq!(
        store.accept_commit(&add, NOW, NOW + TTL).await.unwrap(),
        CommitOutcome::Duplicate { epoch: 1 },
        "a retried commit is recognised, not applied twice"
    );
    let welcome = store.pending(&one(&bob), 0, 10, NOW).await.unwrap();
    assert_eq!(welcome.len(), 1);
    assert_eq!(welcome[0].kind, DeliveryKind::Welcome);
    assert_eq!(welcome[0].group_id.as_ref(), Some(&g));

    // Bob and Carol both commit in epoch 1: exactly one wins.
    let by_bob = commit(&g, 1, &bob, b"bob's update", &[], &[]);
    let by_carol = commit(&g, 1, &carol, b"carol's update", &[], &[]);
    assert!(matches!(
        store.accept_commit(&by_bob, NOW, NOW + TTL).await.unwrap(),
        CommitOutcome::Accepted { epoch: 2, .. }
    ));
    assert_eq!(
        store
            .accept_commit(&by_carol, NOW, NOW + TTL)
            .await
            .unwrap(),
        CommitOutcome::Stale { current_epoch: 2 }
    );
    let carols = store.pending(&one(&carol), 0, 10, NOW).await.unwrap();
    assert_eq!(
        carols
            .iter()
            .map(|d| d.payload.as_slice())
            .collect::<Vec<_>>(),
        vec![&b"welcome"[..], &b"bob's update"[..]],
        "the loser receives the winner's commit to process"
    );

    // Messages reach the members of the moment (a backend that remembers
    // memberships must notice each change).
    let recipients = |outcome| {
        let (deliveries, _) = stored(outcome);
        deliveries.into_iter().map(|(r, _)| r).collect::<Vec<_>>()
    };
    let before = send(store, &g, &carol, b"hi", NOW).await;
    assert_eq!(recipients(before), vec![one(&alice), one(&bob)]);

    // Standalone proposals are kept for their epoch only, in order.
    assert!(store.add_proposal(&g, 2, b"carol leaves").await.unwrap());
    assert!(store.add_proposal(&g, 2, b"again").await.unwrap());
    assert!(
        !store.add_proposal(&g, 1, b"late").await.unwrap(),
        "a proposal for a past epoch is not kept"
    );
    assert!(!store.add_proposal(&group(9), 0, b"x").await.unwrap());
    let state = store.group(&g).await.unwrap().unwrap();
    assert_eq!(
        (state.public_state, state.proposals),
        (
            Some(state_at(2)),
            vec![b"carol leaves".to_vec(), b"again".to_vec()]
        )
    );

    // Removing Carol: she still gets that commit, then nothing more.
    let remove = commit(&g, 2, &alice, b"remove carol", &[], &[&carol]);
    assert!(matches!(
        store.accept_commit(&remove, NOW, NOW + TTL).await.unwrap(),
        CommitOutcome::Accepted { epoch: 3, .. }
    ));
    assert_eq!(
        store.accept_commit(&by_bob, NOW, NOW + TTL).await.unwrap(),
        CommitOutcome::Duplicate { epoch: 2 },
        "a commit resubmitted epochs later is still recognised"
    );
    let absurd = commit(&g, u64::MAX, &alice, b"far future", &[], &[]);
    assert_eq!(
        store.accept_commit(&absurd, NOW, NOW + TTL).await.unwrap(),
        CommitOutcome::Stale { current_epoch: 3 }
    );
    let state = store.group(&g).await.unwrap().unwrap();
    assert_eq!(
        (state.epoch, state.members),
        (3, vec![one(&alice), one(&bob)])
    );
    assert_eq!(
        (state.public_state, state.proposals),
        (Some(state_at(3)), vec![]),
        "a commit stores its state and ends the epoch's proposals"
    );
    assert_eq!(
        store.group_info(&g).await.unwrap(),
        Some(info_at(3)),
        "and the GroupInfo of the epoch it started"
    );
    assert_eq!(store.group_info(&group(9)).await.unwrap(), None);
    let after = send(store, &g, &alice, b"bye", NOW).await;
    assert_eq!(recipients(after), vec![one(&bob)]);
    let last = store.pending(&one(&carol), 0, 10, NOW).await.unwrap();
    assert_eq!(
        last.last().map(|d| d.payload.as_slice()),
        Some(&b"remove carol"[..])
    );
    assert!(matches!(
        send(store, &g, &carol, b"x", NOW).await.unwrap(),
        FanOutOutcome::NotAMember
    ));
}

async fn fan_out_and_mailboxes(store: &impl Store) {
    let alice = registered(store, "AAAAAAAA", 1).await;
    let bob = registered(store, "BBBBBBBB", 2).await;
    befriend(store, &alice, &bob).await;
    let skip = store.pending(&one(&alice), 0, 100, NOW).await.unwrap();
    store
        .ack(&one(&alice), &skip.iter().map(|d| d.id).collect::<Vec<_>>())
        .await
        .unwrap();
    let g = group(7);
    store
        .create_group(&g, &one(&alice), &state_at(0), &info_at(0), None, NOW)
        .await
        .unwrap();
    store
        .accept_commit(&commit(&g, 0, &alice, b"add", &[&bob], &[]), NOW, NOW + TTL)
        .await
        .unwrap();
    for n in 0..5u8 {
        let (deliveries, durable) = stored(send(store, &g, &bob, &[n], NOW + u64::from(n)).await);
        let recipients: Vec<_> = deliveries.iter().map(|(r, _)| r.clone()).collect();
        assert_eq!(recipients, vec![one(&alice)]);
        let stored = store.pending(&one(&alice), 0, 100, NOW).await.unwrap();
        let (_, handed) = &deliveries[0];
        assert_eq!(
            stored.last(),
            Some(handed),
            "the copy handed back is in the mailbox, before it is durable"
        );
        durable.wait().await.unwrap();
        let stored = store.pending(&one(&alice), 0, 100, NOW).await.unwrap();
        assert_eq!(stored.last(), Some(handed), "and after");
    }
    assert!(matches!(
        send(store, &group(8), &bob, b"x", NOW).await.unwrap(),
        FanOutOutcome::UnknownGroup
    ));
    let page = store.pending(&one(&alice), 0, 3, NOW).await.unwrap();
    assert_eq!(
        page.iter().map(|d| d.payload[0]).collect::<Vec<_>>(),
        vec![0, 1, 2]
    );
    assert!(
        page.windows(2).all(|w| w[0].id < w[1].id),
        "in acceptance order"
    );
    let rest = store
        .pending(&one(&alice), page[2].id, 10, NOW)
        .await
        .unwrap();
    assert_eq!(
        rest.iter().map(|d| d.payload[0]).collect::<Vec<_>>(),
        vec![3, 4]
    );
    assert_eq!(
        rest[0].sender, None,
        "the sender of a group's message is not kept (MLS tells the recipient)"
    );
    assert_eq!(rest[0].sent_at, NOW + 3);

    // Bob cannot delete Alice's mail; Alice can. (Delivery IDs may be
    // numbered per mailbox: an ID of Alice's that also names something in
    // Bob's own mailbox would be Bob's to acknowledge.)
    let bobs: Vec<u64> = store
        .pending(&one(&bob), 0, 100, NOW)
        .await
        .unwrap()
        .iter()
        .map(|d| d.id)
        .collect();
    let foreign = page.iter().find(|d| !bobs.contains(&d.id)).unwrap();
    assert_eq!(store.ack(&one(&bob), &[foreign.id]).await.unwrap(), 0);
    assert_eq!(
        store
            .pending(&one(&alice), 0, 100, NOW)
            .await
            .unwrap()
            .len(),
        5,
        "Alice's mail is all there"
    );
    assert_eq!(
        store
            .ack(&one(&alice), &[page[0].id, page[1].id])
            .await
            .unwrap(),
        2
    );
    assert_eq!(
        store.ack(&one(&alice), &[page[0].id]).await.unwrap(),
        0,
        "acks are idempotent"
    );
    assert_eq!(
        store.ack(&one(&alice), &[u64::MAX]).await.unwrap(),
        0,
        "absurd IDs are ignored"
    );
    let left = store.pending(&one(&alice), 0, 10, NOW).await.unwrap();
    assert_eq!(left.len(), 3);

    // A copy acknowledged before it is durable: the sender's answer still
    // comes, and the copy is gone for good.
    let (deliveries, durable) = stored(send(store, &g, &bob, b"quick", NOW).await);
    let quick = deliveries[0].1.id;
    assert_eq!(store.ack(&one(&alice), &[quick]).await.unwrap(), 1);
    assert_eq!(store.ack(&one(&alice), &[quick]).await.unwrap(), 0);
    durable.wait().await.unwrap();
    let left = store.pending(&one(&alice), 0, 10, NOW).await.unwrap();
    assert_eq!(left.len(), 3, "the acknowledged copy does not come back");
    // Whatever is stored next sorts after it.
    assert!(
        store
            .notice(low_water(&alice, &bob), NOW, NOW + TTL)
            .await
            .unwrap()[0]
            .1
            > quick
    );
    // The group is at epoch 1 (one commit): a message of epoch 1 goes, one
    // of epoch 2 (which no member can have reached) is refused, both the
    // first time (read from the database) and after (remembered).
    settled(send_in_epoch(store, &g, &bob, b"now", 1, NOW).await).await;
    // An application message of epoch 0, which the group has left, is
    // refused: a member added in epoch 1 could not read it.
    assert!(matches!(
        send_in_epoch(store, &g, &bob, b"from the past", 0, NOW).await,
        Ok(FanOutOutcome::BehindGroup { current_epoch: 1 })
    ));
    for _ in 0..2 {
        assert!(matches!(
            send_in_epoch(store, &g, &bob, b"from the future", 2, NOW).await,
            Ok(FanOutOutcome::AheadOfGroup { current_epoch: 1 })
        ));
    }
}

/// A "KeyPackages low" notice for `recipient`.
fn low_water(recipient: &AccountId, sender: &AccountId) -> Notice {
    Notice {
        recipient: recipient.clone(),
        device: Some(DeviceId::FIRST),
        sender: sender.clone(),
        kind: DeliveryKind::KeyPackagesLow,
        group_id: None,
        payload: vec![],
    }
}

async fn notices(store: &impl Store) {
    let alice = registered(store, "AAAAAAAA", 1).await;
    let stored = store
        .notice(low_water(&alice, &alice), NOW, NOW + TTL)
        .await
        .unwrap();
    let [(to, id)] = stored.as_slice() else {
        panic!("one copy for a device: {stored:?}");
    };
    assert_eq!(*to, one(&alice));
    let id = *id;
    let inbox = store.pending(&one(&alice), 0, 10, NOW).await.unwrap();
    assert_eq!(inbox.len(), 1);
    assert_eq!(
        (inbox[0].id, inbox[0].kind),
        (id, DeliveryKind::KeyPackagesLow)
    );
    assert_eq!(
        (inbox[0].sender.as_ref(), inbox[0].group_id.as_ref()),
        (Some(&alice), None)
    );
}

/// A wipe command for `line` (from itself), issued at `issued_at`.
fn wipe_command(line: &AccountId, issued_at: u64) -> Notice {
    Notice {
        recipient: line.clone(),
        device: None,
        sender: line.clone(),
        kind: DeliveryKind::Wipe,
        group_id: None,
        payload: issued_at.to_be_bytes().to_vec(),
    }
}

async fn wipe_commands(store: &impl Store) {
    let alice = registered(store, "AAAAAAAA", 1).await;
    let queue = |issued_at: u64| {
        store.queue_wipe_command(wipe_command(&alice, issued_at), issued_at, NOW, NOW + TTL)
    };
    assert!(queue(100).await.unwrap().is_some());
    assert_eq!(queue(100).await.unwrap(), None, "a command is queued once");
    assert_eq!(queue(99).await.unwrap(), None, "nor an older one");
    assert_eq!(queue(u64::MAX).await.unwrap(), None);
    assert!(queue(101).await.unwrap().is_some());
    assert_eq!(queue(99).await.unwrap(), None, "nor an older one later");
    let queued: Vec<Vec<u8>> = store
        .pending(&one(&alice), 0, 10, NOW)
        .await
        .unwrap()
        .into_iter()
        .map(|delivery| delivery.payload)
        .collect();
    assert_eq!(
        queued,
        vec![101u64.to_be_bytes().to_vec()],
        "only the newest command accepted waits in the mailbox (one is \
         enough, and they never expire, so they must not pile up)"
    );
    // The newest is kept with the line, also once it is revoked (which
    // drops the mailbox), to show its devices that were away.
    let kept = || async {
        store
            .account(&alice)
            .await
            .unwrap()
            .unwrap()
            .last_wipe_command
    };
    assert_eq!(kept().await, Some(101u64.to_be_bytes().to_vec()));
    store.revoke(&alice, None, NOW, NOW + TTL).await.unwrap();
    assert!(
        store
            .pending(&one(&alice), 0, 10, NOW)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(kept().await, Some(101u64.to_be_bytes().to_vec()));
}

async fn revocation(store: &impl Store) {
    let alice = registered(store, "AAAAAAAA", 1).await;
    let bob = registered(store, "BBBBBBBB", 2).await;
    let carol = registered(store, "CCCCCCCC", 3).await;
    befriend(store, &alice, &bob).await;
    store.set_wipe_key(&alice, &key(9)).await.unwrap();
    store.set_wipe_key(&alice, &key(8)).await.unwrap();
    store.touch(&alice, 20_000).await.unwrap();
    let row = store.account(&alice).await.unwrap().unwrap();
    assert_eq!(
        (
            row.wipe_key,
            row.last_seen_day,
            row.status,
            row.last_wipe_command
        ),
        (Some(key(9)), Some(20_000), LineStatus::Active, None)
    );
    store
        .add_key_packages(
            &alice,
            DeviceId(2),
            C,
            vec![b"kp".to_vec()],
            Some(b"last".to_vec()),
        )
        .await
        .unwrap();
    assert!(
        store
            .append_device_entry(&alice, 0, &add_device(0, 1), NOW, NOW + TTL)
            .await
            .unwrap()
            .is_some()
    );
    let g = group(3);
    store
        .create_group(&g, &one(&bob), &state_at(0), &info_at(0), None, NOW)
        .await
        .unwrap();
    store
        .accept_commit(
            &commit(&g, 0, &bob, b"add", &[&alice, &carol], &[]),
            NOW,
            NOW + TTL,
        )
        .await
        .unwrap();

    let told = store.revoke(&alice, None, NOW, NOW + TTL).await.unwrap();
    assert_eq!(told, vec![one(&bob), one(&carol)]);
    let row = store.account(&alice).await.unwrap().unwrap();
    assert_eq!((row.status, row.wipe_key), (LineStatus::Revoked, None));
    assert_eq!(
        store
            .take_key_package(&alice, DeviceId(2), C)
            .await
            .unwrap(),
        None,
        "KeyPackages withdrawn, every device's"
    );
    assert!(
        store
            .pending(&one(&alice), 0, 10, NOW)
            .await
            .unwrap()
            .is_empty(),
        "mailbox dropped"
    );
    assert!(!store.are_contacts(&alice, &bob).await.unwrap());
    assert!(
        store.device_log(&alice, 0, 10).await.unwrap().is_empty(),
        "device log dropped"
    );
    let state = store.group(&g).await.unwrap().unwrap();
    assert_eq!(state.members, vec![one(&bob), one(&carol)]);
    let notice = store
        .pending(&one(&carol), 0, 10, NOW)
        .await
        .unwrap()
        .pop()
        .unwrap();
    assert_eq!(
        (
            notice.kind,
            notice.group_id.as_ref(),
            notice.payload.as_slice()
        ),
        (
            DeliveryKind::MemberRevoked,
            Some(&g),
            alice.as_str().as_bytes()
        )
    );
}

/// A commit checked by the server while the devices its Adds bring in
/// were current, stored after one was removed or its line revoked: refused,
/// nothing of it kept (the removal's and revocation's notices went out
/// before the leaf was in the group, so nobody would ever take it out). A
/// leaf of a revoked line that stayed in the tree (the revocation was not
/// the line's own signed one, so members do not take it out on the
/// server's word) is no Add: commits that keep it go on being accepted.
async fn commits_add_only_current_devices(store: &impl Store) {
    let [alice, bob, carol] = alice_and_friends(store).await;
    let g = group(4);
    store
        .create_group(&g, &one(&alice), &state_at(0), &info_at(0), None, NOW)
        .await
        .unwrap();
    store
        .accept_commit(
            &commit(&g, 0, &alice, b"add", &[&carol], &[]),
            NOW,
            NOW + TTL,
        )
        .await
        .unwrap();
    let remove_two = entry(
        2,
        DeviceChange::Remove {
            device: DeviceId(2),
        },
    );
    for (seq, change) in [
        (0, add_device(0, 1)),
        (1, add_device(1, 2)),
        (2, remove_two),
    ] {
        assert!(
            store
                .append_device_entry(&bob, seq, &change, NOW, NOW + TTL)
                .await
                .unwrap()
                .is_some()
        );
    }
    let bob_two = DeviceAddr {
        account: bob.clone(),
        device: DeviceId(2),
    };
    let adds_bob_two = CommitRecord {
        added: vec![one(&bob), bob_two.clone()],
        adds: vec![one(&bob), bob_two.clone()],
        ..commit(&g, 1, &alice, b"add", &[&bob], &[])
    };
    assert_eq!(
        store
            .accept_commit(&adds_bob_two, NOW, NOW + TTL)
            .await
            .unwrap(),
        CommitOutcome::AddsFormerDevice { device: bob_two }
    );
    let state = store.group(&g).await.unwrap().unwrap();
    assert_eq!(
        (state.epoch, state.members),
        (1, vec![one(&alice), one(&carol)])
    );
    assert!(
        store
            .pending(&one(&bob), 0, 10, NOW)
            .await
            .unwrap()
            .iter()
            .all(|d| d.kind != DeliveryKind::Welcome),
        "no Welcome for a refused commit"
    );

    // Carol's line ends by the distributor's word: her leaf stays in the
    // tree, so the server derives it as added by every commit keeping it.
    store.revoke(&carol, None, NOW, NOW + TTL).await.unwrap();
    let keeps_carol = CommitRecord {
        added: vec![one(&bob), one(&carol)],
        ..commit(&g, 1, &alice, b"add", &[&bob], &[])
    };
    let outcome = store
        .accept_commit(&keeps_carol, NOW, NOW + TTL)
        .await
        .unwrap();
    assert_eq!(
        outcome,
        CommitOutcome::Accepted {
            epoch: 2,
            recipients: vec![one(&bob)],
            welcomed: 1,
        }
    );
    // An Add of her device, checked before her line ended, is refused.
    let adds_carol = CommitRecord {
        added: vec![one(&carol)],
        adds: vec![one(&carol)],
        ..commit(&g, 2, &alice, b"update", &[], &[])
    };
    assert_eq!(
        store
            .accept_commit(&adds_carol, NOW, NOW + TTL)
            .await
            .unwrap(),
        CommitOutcome::AddsFormerDevice {
            device: one(&carol)
        }
    );
}

/// Entries are kept in order, per account; a position is taken once; the
/// count of recent appends uses the time of each append.
/// An encoded device log entry at `seq` making `change` (the store checks
/// no signature: the server did, before it stored the entry).
pub(crate) fn entry(seq: u64, change: DeviceChange) -> Vec<u8> {
    let unsigned = Signature::from_bytes([0; 64]);
    DeviceEntry {
        seq,
        prev_hash: [seq as u8; 32],
        created_at: NOW,
        by_device: DeviceId::FIRST,
        added_signature: matches!(change, DeviceChange::Add { .. }).then_some(unsigned),
        change,
        account_signature: unsigned,
        device_signature: unsigned,
    }
    .encode()
}

pub(crate) fn add_device(seq: u64, device: u32) -> Vec<u8> {
    entry(
        seq,
        DeviceChange::Add {
            device: DeviceId(device),
            key: key(100 + device as u8),
            name: format!("device {device}"),
        },
    )
}

async fn device_logs(store: &impl Store) {
    let alice = registered(store, "AAAAAAAA", 1).await;
    let bob = registered(store, "BBBBBBBB", 2).await;
    assert!(store.device_log(&alice, 0, 10).await.unwrap().is_empty());
    assert_eq!(
        store.devices(&alice).await.unwrap(),
        vec![(DeviceId::FIRST, key(1))],
        "an account starts with device 1, whose key is the account key"
    );
    assert!(
        store
            .append_device_entry(&alice, 1, &add_device(1, 2), NOW, NOW + TTL)
            .await
            .unwrap()
            .is_none(),
        "a position past the end is refused"
    );
    let entries = [add_device(0, 1), add_device(1, 2), add_device(2, 3)];
    for (seq, entry) in entries.iter().enumerate() {
        let at = NOW + seq as u64 * DAY;
        assert!(
            store
                .append_device_entry(&alice, seq as u64, entry, at, at + TTL)
                .await
                .unwrap()
                .is_some()
        );
    }
    assert!(
        store
            .append_device_entry(&alice, 1, &add_device(1, 9), NOW, NOW + TTL)
            .await
            .unwrap()
            .is_none(),
        "a taken position is refused"
    );
    assert!(
        store
            .append_device_entry(&bob, 0, &add_device(0, 1), NOW, NOW + TTL)
            .await
            .unwrap()
            .is_some()
    );
    assert_eq!(store.device_log(&alice, 0, 10).await.unwrap(), entries);
    assert_eq!(
        store.device_log(&alice, 1, 1).await.unwrap(),
        vec![entries[1].clone()]
    );
    assert!(store.device_log(&alice, 3, 10).await.unwrap().is_empty());
    assert_eq!(
        store.device_log(&bob, 0, 10).await.unwrap(),
        vec![add_device(0, 1)]
    );
    assert_eq!(
        store.device_entries_since(&alice, NOW + DAY).await.unwrap(),
        2
    );
    assert_eq!(store.device_entries_since(&alice, 0).await.unwrap(), 3);
    // The entries decide the current devices (device 1's add names its
    // key as the log has it).
    assert_eq!(
        store.devices(&alice).await.unwrap(),
        vec![
            (DeviceId::FIRST, key(101)),
            (DeviceId(2), key(102)),
            (DeviceId(3), key(103))
        ]
    );
    let remove = entry(
        3,
        DeviceChange::Remove {
            device: DeviceId(2),
        },
    );
    assert!(
        store
            .append_device_entry(&alice, 3, &remove, NOW, NOW + TTL)
            .await
            .unwrap()
            .is_some()
    );
    assert_eq!(
        store.devices(&alice).await.unwrap(),
        vec![(DeviceId::FIRST, key(101)), (DeviceId(3), key(103))]
    );
}

/// Each device of an account has its own mailbox and its own leaf: a
/// fan-out or a commit reaches every other current leaf (the sender's
/// own other devices too), each device reads and acknowledges its own
/// copies, a notice for the account reaches each current device, and a
/// removed device's mailbox goes at once and gets nothing more, though
/// its leaf stays until a commit removes it.
async fn mailboxes_per_device(store: &impl Store) {
    let alice = registered(store, "AAAAAAAA", 1).await;
    let bob = registered(store, "BBBBBBBB", 2).await;
    befriend(store, &alice, &bob).await;
    read_all(store, &alice).await;
    for (seq, device) in [(0, 1), (1, 2), (2, 3)] {
        let added = add_device(seq, device);
        assert!(
            store
                .append_device_entry(&alice, seq, &added, NOW, NOW + TTL)
                .await
                .unwrap()
                .is_some()
        );
    }
    let [phone, laptop, tablet] = [1, 2, 3].map(|d| DeviceAddr::new(alice.clone(), DeviceId(d)));
    let bob_phone = one(&bob);

    // What is meant for the account: a copy for each current device.
    let carol = registered(store, "CCCCCCCC", 3).await;
    let (outcome, told) = store
        .request_contact(&carol, &alice, NOW, NOW + TTL)
        .await
        .unwrap();
    assert_eq!(outcome, ContactRequestOutcome::Sent);
    assert_eq!(told, vec![phone.clone(), laptop.clone(), tablet.clone()]);
    for device in [&phone, &laptop, &tablet] {
        let held = store.pending(device, 0, 10, NOW).await.unwrap();
        assert_eq!(held.len(), 1, "{device} has its copy");
        assert_eq!(store.ack(device, &[held[0].id]).await.unwrap(), 1);
    }
    let notice = Notice {
        recipient: alice.clone(),
        device: None,
        sender: alice.clone(),
        kind: DeliveryKind::KeyPackagesLow,
        group_id: None,
        payload: Vec::new(),
    };
    let copies = store.notice(notice, NOW, NOW + TTL).await.unwrap();
    let devices: Vec<_> = copies.iter().map(|(to, _)| to.clone()).collect();
    assert_eq!(devices, vec![phone.clone(), laptop.clone(), tablet.clone()]);
    for device in [&phone, &laptop, &tablet] {
        let held = store.pending(device, 0, 10, NOW).await.unwrap();
        assert_eq!(held.len(), 1, "{device} has its copy");
        assert_eq!(store.ack(device, &[held[0].id]).await.unwrap(), 1);
    }

    // A group with Alice's phone and laptop and Bob's phone.
    let g = group(5);
    store
        .create_group(&g, &phone, &state_at(0), &info_at(0), None, NOW)
        .await
        .unwrap();
    let add = CommitRecord {
        sender: phone.clone(),
        added: vec![laptop.clone(), bob_phone.clone()],
        ..commit(&g, 0, &alice, b"add", &[], &[])
    };
    let add = CommitRecord {
        welcome: Some(b"welcome".to_vec()),
        ..add
    };
    let CommitOutcome::Accepted { mut recipients, .. } =
        store.accept_commit(&add, NOW, NOW + TTL).await.unwrap()
    else {
        panic!("the add is accepted");
    };
    recipients.sort();
    assert_eq!(
        recipients,
        vec![laptop.clone(), bob_phone.clone()],
        "Welcomes"
    );
    assert_eq!(
        store.group(&g).await.unwrap().unwrap().members,
        vec![phone.clone(), laptop.clone(), bob_phone.clone()]
    );
    for device in [&laptop, &bob_phone] {
        let held = store.pending(device, 0, 10, NOW).await.unwrap();
        let ids: Vec<u64> = held.iter().map(|d| d.id).collect();
        store.ack(device, &ids).await.unwrap();
    }

    // Bob's message reaches both of Alice's devices in the group (not the
    // tablet, which has no leaf); Alice's laptop's reaches her phone and
    // Bob, not itself.
    let (to, _) = stored(
        store
            .fan_out(
                &g,
                &bob_phone,
                DeliveryKind::Application,
                b"hi",
                1,
                NOW,
                NOW + TTL,
            )
            .await,
    );
    let to: Vec<_> = to.into_iter().map(|(device, _)| device).collect();
    assert_eq!(to, vec![phone.clone(), laptop.clone()]);
    let (to, durable) = stored(
        store
            .fan_out(
                &g,
                &laptop,
                DeliveryKind::Application,
                b"me",
                1,
                NOW,
                NOW + TTL,
            )
            .await,
    );
    durable.wait().await.unwrap();
    let to: Vec<_> = to.into_iter().map(|(device, _)| device).collect();
    assert_eq!(to, vec![phone.clone(), bob_phone.clone()]);
    assert!(matches!(
        store
            .fan_out(
                &g,
                &tablet,
                DeliveryKind::Application,
                b"x",
                1,
                NOW,
                NOW + TTL
            )
            .await
            .unwrap(),
        FanOutOutcome::NotAMember
    ));

    // Each device acknowledges its own copies only.
    let phone_held = store.pending(&phone, 0, 10, NOW).await.unwrap();
    let payloads: Vec<&[u8]> = phone_held.iter().map(|d| d.payload.as_slice()).collect();
    assert_eq!(payloads, [&b"hi"[..], b"me"]);
    assert_eq!(phone_held[1].sender, None, "no sender is kept");
    let ids: Vec<u64> = phone_held.iter().map(|d| d.id).collect();
    // (IDs may be numbered per mailbox: one the laptop holds too would be
    // its own to acknowledge.)
    let laptops: Vec<u64> = store
        .pending(&laptop, 0, 100, NOW)
        .await
        .unwrap()
        .iter()
        .map(|d| d.id)
        .collect();
    let foreign: Vec<u64> = ids
        .iter()
        .filter(|id| !laptops.contains(id))
        .copied()
        .collect();
    assert!(!foreign.is_empty());
    assert_eq!(
        store.ack(&laptop, &foreign).await.unwrap(),
        0,
        "not the laptop's"
    );
    assert_eq!(store.ack(&phone, &ids).await.unwrap(), 2);
    let laptop_held = store.pending(&laptop, 0, 10, NOW).await.unwrap();
    assert_eq!(laptop_held.len(), 1, "the laptop still has Bob's message");

    // The laptop is removed from the account: its mailbox goes, and it
    // gets nothing more, though its leaf stays until a commit removes it.
    let remove = entry(
        3,
        DeviceChange::Remove {
            device: DeviceId(2),
        },
    );
    let told = store
        .append_device_entry(&alice, 3, &remove, NOW, NOW + TTL)
        .await
        .unwrap();
    assert_eq!(
        told,
        Some(vec![phone.clone(), bob_phone.clone()]),
        "the group's other member devices are told, to commit the removal"
    );
    for device in [&phone, &bob_phone] {
        let held = store.pending(device, 0, 10, NOW).await.unwrap();
        let notices: Vec<_> = held
            .iter()
            .filter(|d| d.kind == DeliveryKind::DeviceRemoved)
            .map(|d| (d.sender.clone(), d.group_id.clone(), d.payload.clone()))
            .collect();
        assert_eq!(
            notices,
            [(Some(alice.clone()), Some(g.clone()), remove.clone())]
        );
        let ids: Vec<u64> = held.iter().map(|d| d.id).collect();
        store.ack(device, &ids).await.unwrap();
    }
    assert!(store.pending(&laptop, 0, 10, NOW).await.unwrap().is_empty());
    let (to, durable) = stored(
        store
            .fan_out(
                &g,
                &bob_phone,
                DeliveryKind::Application,
                b"after",
                1,
                NOW,
                NOW + TTL,
            )
            .await,
    );
    durable.wait().await.unwrap();
    let to: Vec<_> = to.into_iter().map(|(device, _)| device).collect();
    assert_eq!(to, vec![phone.clone()]);
    assert!(store.pending(&laptop, 0, 10, NOW).await.unwrap().is_empty());
    assert!(
        store
            .group(&g)
            .await
            .unwrap()
            .unwrap()
            .members
            .contains(&laptop),
        "the leaf stays until its removal is committed"
    );
    let removal = CommitRecord {
        sender: bob_phone.clone(),
        removed: vec![laptop.clone()],
        ..commit(&g, 1, &bob, b"remove laptop", &[], &[])
    };
    let CommitOutcome::Accepted { recipients, .. } =
        store.accept_commit(&removal, NOW, NOW + TTL).await.unwrap()
    else {
        panic!("the removal is accepted");
    };
    assert_eq!(recipients, vec![phone.clone()]);
    assert_eq!(
        store.group(&g).await.unwrap().unwrap().members,
        vec![phone.clone(), bob_phone.clone()]
    );

    // Revoking the line takes every leaf of it out and drops every mailbox.
    let told = store.revoke(&alice, None, NOW, NOW + TTL).await.unwrap();
    assert_eq!(told, vec![bob_phone.clone()]);
    assert!(store.devices(&alice).await.unwrap().is_empty());
    for device in [&phone, &tablet] {
        assert!(store.pending(device, 0, 10, NOW).await.unwrap().is_empty());
    }
    assert_eq!(
        store.group(&g).await.unwrap().unwrap().members,
        vec![bob_phone.clone()]
    );
}

/// Alice and Bob, registered, in a new group `g` that Alice created.
async fn pair_in_group(store: &impl Store, g: &GroupId) -> (AccountId, AccountId) {
    let alice = registered(store, "AAAAAAAA", 1).await;
    let bob = registered(store, "BBBBBBBB", 2).await;
    store
        .create_group(g, &one(&alice), &state_at(0), &info_at(0), None, NOW)
        .await
        .unwrap();
    store
        .accept_commit(&commit(g, 0, &alice, b"add", &[&bob], &[]), NOW, NOW + TTL)
        .await
        .unwrap();
    (alice, bob)
}

/// A line's status and subscription decide each send when it is made,
/// however many sends came before (a backend may remember lines).
async fn lines_decide_each_send(store: &impl Store) {
    let g = group(9);
    let (alice, _bob) = pair_in_group(store, &g).await;
    let send = |at: u64| send(store, &g, &alice, b"m", at);
    for _ in 0..3 {
        settled(send(NOW).await).await;
    }
    store
        .set_line_status(&alice, LineStatus::Suspended)
        .await
        .unwrap();
    assert!(matches!(
        send(NOW).await.unwrap(),
        FanOutOutcome::LineInactive {
            status: LineStatus::Suspended,
            ..
        }
    ));
    store
        .set_line_status(&alice, LineStatus::Active)
        .await
        .unwrap();
    settled(send(NOW).await).await;
    settled(send(NOW).await).await;
    // The 30-day subscription lapses, and a renewal brings the line back.
    let lapsed = NOW + 31 * DAY;
    assert!(matches!(
        send(lapsed).await.unwrap(),
        FanOutOutcome::LineInactive {
            status: LineStatus::Active,
            subscription_expires_at,
        } if subscription_expires_at == NOW + 30 * DAY
    ));
    store
        .issue_renewal_codes(&[code(20)], 30, NOW)
        .await
        .unwrap();
    assert!(matches!(
        store
            .redeem_renewal(&alice, code(20), lapsed)
            .await
            .unwrap(),
        Renewal::Renewed { .. }
    ));
    settled(send(lapsed).await).await;
    settled(send(lapsed).await).await;
    store
        .revoke(&alice, None, lapsed, lapsed + TTL)
        .await
        .unwrap();
    assert!(!matches!(
        send(lapsed).await.unwrap(),
        FanOutOutcome::Stored { .. }
    ));
}

/// Bytes of each application message in [`mailbox_cap`].
const CAPPED_MESSAGE: usize = 1000;

/// The `mailbox_bytes` limit a store given to [`mailbox_cap`] must be
/// opened with: room for three of its messages, not four.
pub const MAILBOX_CAP: u64 = 3 * CAPPED_MESSAGE as u64 + CAPPED_MESSAGE as u64 / 2;

/// Every device's mailbox is capped in bytes: application messages beyond
/// the cap are settled without being kept and the device is told how many
/// it missed; handshake messages are kept past it; one full mailbox costs
/// nobody else anything; acknowledging makes room again. `store` must be
/// opened with `mailbox_bytes = MAILBOX_CAP`.
pub async fn mailbox_cap(store: &impl Store) {
    let (g, [alice, bob, carol]) = group_of_three(store).await;
    // Bob is away; Carol reads as messages come.
    let mut carol_read = Vec::new();
    for n in 0..5u8 {
        let (_, durable) =
            stored(send_in_epoch(store, &g, &alice, &[n; CAPPED_MESSAGE], 1, NOW).await);
        durable.wait().await.unwrap();
        carol_read.extend(read_all(store, &carol).await.iter().map(|d| d.payload[0]));
    }
    assert_eq!(
        carol_read,
        vec![0, 1, 2, 3, 4],
        "a full mailbox costs others nothing"
    );
    let held = store.pending(&one(&bob), 0, 100, NOW).await.unwrap();
    let kinds: Vec<_> = held.iter().map(|d| (d.kind, d.payload[0])).collect();
    assert_eq!(
        kinds[..3],
        [
            (DeliveryKind::Application, 0),
            (DeliveryKind::Application, 1),
            (DeliveryKind::Application, 2)
        ],
        "what fits is kept, in order"
    );
    assert_eq!(held.len(), 4, "{kinds:?}");
    assert_eq!(held[3].kind, DeliveryKind::MailboxFull);
    assert_eq!(held[3].payload, 2u64.to_be_bytes(), "two were not kept");
    assert_eq!(
        held[3].sender,
        Some(bob.clone()),
        "a notice from the server, about bob"
    );

    // A commit is kept past the cap: without it Bob could not follow.
    let outcome = store
        .accept_commit(&commit(&g, 1, &alice, b"update", &[], &[]), NOW, NOW + TTL)
        .await
        .unwrap();
    assert!(
        matches!(outcome, CommitOutcome::Accepted { epoch: 2, .. }),
        "{outcome:?}"
    );
    let (_, durable) = stored(send_in_epoch(store, &g, &alice, &[5; CAPPED_MESSAGE], 2, NOW).await);
    durable.wait().await.unwrap();
    let held = store.pending(&one(&bob), 0, 100, NOW).await.unwrap();
    let kinds: Vec<_> = held.iter().map(|d| d.kind).collect();
    assert_eq!(
        kinds,
        [
            DeliveryKind::Application,
            DeliveryKind::Application,
            DeliveryKind::Application,
            DeliveryKind::Commit,
            DeliveryKind::MailboxFull
        ],
        "one notice, replaced, after everything it counts"
    );
    assert_eq!(held[4].payload, 3u64.to_be_bytes(), "the count goes on");

    // Reading makes room; the count starts again after the notice is read.
    let ids: Vec<u64> = held.iter().map(|d| d.id).collect();
    assert_eq!(store.ack(&one(&bob), &ids).await.unwrap(), 5);
    for n in 6..10u8 {
        let (_, durable) =
            stored(send_in_epoch(store, &g, &alice, &[n; CAPPED_MESSAGE], 2, NOW).await);
        durable.wait().await.unwrap();
    }
    let held = store.pending(&one(&bob), 0, 100, NOW).await.unwrap();
    let kinds: Vec<_> = held.iter().map(|d| (d.kind, d.payload[0])).collect();
    assert_eq!(
        kinds,
        [
            (DeliveryKind::Application, 6),
            (DeliveryKind::Application, 7),
            (DeliveryKind::Application, 8),
            (DeliveryKind::MailboxFull, 0)
        ]
    );
    assert_eq!(held[3].payload, 1u64.to_be_bytes());

    // A short-lived message dropped later does not shorten the notice's
    // life: it lives as long as the longest-lived copy it counts.
    let outcome = store
        .fan_out(
            &g,
            &one(&alice),
            DeliveryKind::Application,
            &[10; CAPPED_MESSAGE],
            2,
            NOW,
            NOW + 60,
        )
        .await;
    stored(outcome).1.wait().await.unwrap();
    store.expire(NOW + 61).await.unwrap();
    let held = store.pending(&one(&bob), 0, 100, NOW + 61).await.unwrap();
    let notice = held.last().unwrap();
    assert_eq!(notice.kind, DeliveryKind::MailboxFull, "{held:?}");
    assert_eq!(notice.payload, 2u64.to_be_bytes());

    // Replacing the notice again and again leaves nothing counted behind:
    // once everything is read, three messages fit again.
    for _ in 0..70 {
        let (_, durable) =
            stored(send_in_epoch(store, &g, &alice, &[11; CAPPED_MESSAGE], 2, NOW).await);
        durable.wait().await.unwrap();
    }
    let held = store.pending(&one(&bob), 0, 100, NOW).await.unwrap();
    assert_eq!(held.last().unwrap().payload, 72u64.to_be_bytes());
    let ids: Vec<u64> = held.iter().map(|d| d.id).collect();
    store.ack(&one(&bob), &ids).await.unwrap();
    for n in 12..15u8 {
        let (_, durable) =
            stored(send_in_epoch(store, &g, &alice, &[n; CAPPED_MESSAGE], 2, NOW).await);
        durable.wait().await.unwrap();
    }
    let held = store.pending(&one(&bob), 0, 100, NOW).await.unwrap();
    let kinds: Vec<_> = held.iter().map(|d| (d.kind, d.payload[0])).collect();
    assert_eq!(
        kinds,
        [
            (DeliveryKind::Application, 12),
            (DeliveryKind::Application, 13),
            (DeliveryKind::Application, 14)
        ]
    );
}

/// Two stores on one database, as the server and an admin command are: a
/// line suspended through one stops its sends through the other within a
/// few seconds, though the other has just let it send.
pub async fn sees_another_writer(server: &impl Store, admin: &impl Store) {
    let g = group(2);
    let (alice, _bob) = pair_in_group(server, &g).await;
    let send = || send(server, &g, &alice, b"m", NOW);
    for _ in 0..3 {
        settled(send().await).await;
    }
    admin
        .set_line_status(&alice, LineStatus::Suspended)
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !matches!(
        send().await.unwrap(),
        FanOutOutcome::LineInactive {
            status: LineStatus::Suspended,
            ..
        }
    ) {
        assert!(
            std::time::Instant::now() < deadline,
            "the other writer's change was never seen"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

async fn distributors(store: &impl Store) {
    let a = store
        .add_distributor("north", &key(40), 2, NOW)
        .await
        .unwrap()
        .unwrap();
    let b = store
        .add_distributor("south", &key(41), 5, NOW)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        store
            .add_distributor("north", &key(42), 1, NOW)
            .await
            .unwrap(),
        None
    );
    assert_eq!(store.distributors().await.unwrap().len(), 2);

    // The quota is checked and taken in one step.
    assert!(
        store
            .issue_distributor_codes(a, &[code(1)], CodeKind::Activation, 30, NOW)
            .await
            .unwrap()
    );
    assert!(
        !store
            .issue_distributor_codes(a, &[code(2), code(3)], CodeKind::Activation, 30, NOW)
            .await
            .unwrap()
    );
    assert!(
        store
            .issue_distributor_codes(a, &[code(2)], CodeKind::Activation, 30, NOW)
            .await
            .unwrap()
    );
    assert_eq!(store.distributors().await.unwrap()[0].quota, 0);

    let line = account("NNNNNNNN");
    assert!(matches!(
        store.register(code(1), &line, &key(1), NOW).await.unwrap(),
        Registration::Registered(Account { distributor: Some(d), .. }) if d == a
    ));
    assert_eq!(store.lines(a).await.unwrap().len(), 1);
    assert!(
        store.lines(b).await.unwrap().is_empty(),
        "a distributor sees only its own lines"
    );

    // Renewals: from the line's own distributor or the operator, once.
    assert!(
        store
            .issue_distributor_codes(b, &[code(5)], CodeKind::Renewal, 10, NOW)
            .await
            .unwrap()
    );
    assert_eq!(
        store.redeem_renewal(&line, code(5), NOW).await.unwrap(),
        Renewal::WrongDistributor
    );
    store
        .issue_renewal_codes(&[code(6)], 10, NOW)
        .await
        .unwrap();
    assert_eq!(
        store
            .register(code(6), &account("MMMMMMMM"), &key(2), NOW)
            .await
            .unwrap(),
        Registration::UnknownCode,
        "a renewal code opens no line"
    );
    assert_eq!(
        store.redeem_renewal(&line, code(6), NOW).await.unwrap(),
        Renewal::Renewed {
            subscription_expires_at: NOW + 40 * DAY
        }
    );
    assert_eq!(
        store.redeem_renewal(&line, code(6), NOW).await.unwrap(),
        Renewal::CodeUsed
    );
    // After it ended, days count from now.
    store.issue_renewal_codes(&[code(7)], 5, NOW).await.unwrap();
    let later = NOW + 100 * DAY;
    assert_eq!(
        store.redeem_renewal(&line, code(7), later).await.unwrap(),
        Renewal::Renewed {
            subscription_expires_at: later + 5 * DAY
        }
    );

    store
        .set_line_status(&line, LineStatus::Suspended)
        .await
        .unwrap();
    assert_eq!(
        store.account(&line).await.unwrap().unwrap().status,
        LineStatus::Suspended
    );
    assert!(
        store
            .lapsed_lines(later + 5 * DAY)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        store.lapsed_lines(later + 6 * DAY).await.unwrap(),
        vec![line.clone()]
    );
    let ended = store
        .revoke_lapsed(later + 6 * DAY, NOW, NOW + TTL)
        .await
        .unwrap();
    assert_eq!(ended.len(), 1);
    assert_eq!(ended[0].0, line);
    assert_eq!(
        store.account(&line).await.unwrap().unwrap().status,
        LineStatus::Revoked
    );
    assert!(
        store
            .lapsed_lines(later + 6 * DAY)
            .await
            .unwrap()
            .is_empty(),
        "revoked lines are done"
    );
    assert!(
        store
            .revoke_lapsed(later + 6 * DAY, NOW, NOW + TTL)
            .await
            .unwrap()
            .is_empty()
    );
}

async fn expiry(store: &impl Store) {
    let alice = registered(store, "AAAAAAAA", 1).await;
    let bob = registered(store, "BBBBBBBB", 2).await;
    store
        .request_contact(&alice, &bob, NOW, NOW + 10)
        .await
        .unwrap();
    assert_eq!(
        store
            .pending(&one(&bob), 0, 10, NOW + 9)
            .await
            .unwrap()
            .len(),
        1
    );
    assert!(
        store
            .pending(&one(&bob), 0, 10, NOW + 10)
            .await
            .unwrap()
            .is_empty(),
        "an expired delivery is never handed out, even before it is swept"
    );
    assert_eq!(store.expire(NOW + 9).await.unwrap(), 0);
    assert_eq!(store.expire(NOW + 10).await.unwrap(), 1);
}

/// First half of a durability check: write state a restart must keep.
pub async fn survives_reopen_part_one(store: &impl Store) -> u64 {
    let alice = registered(store, "AAAAAAAA", 1).await;
    let bob = registered(store, "BBBBBBBB", 2).await;
    store
        .request_contact(&alice, &bob, NOW, NOW + TTL)
        .await
        .unwrap();
    let g = group(1);
    store
        .create_group(&g, &one(&alice), &state_at(0), &info_at(0), None, NOW)
        .await
        .unwrap();
    store
        .accept_commit(&commit(&g, 0, &alice, b"add", &[&bob], &[]), NOW, NOW + TTL)
        .await
        .unwrap();
    let mut highest = 0;
    // One copy the recipient acknowledges at once, one it does not: once
    // the sender's answer came, the first is gone and the second is kept.
    for (payload, acknowledged) in [(&b"acked"[..], true), (&b"kept"[..], false)] {
        let (deliveries, durable) = stored(send(store, &g, &alice, payload, NOW).await);
        let id = deliveries[0].1.id;
        if acknowledged {
            store.ack(&one(&bob), &[id]).await.unwrap();
        }
        durable.wait().await.unwrap();
        highest = highest.max(id);
    }
    highest
}

/// Second half, on the reopened store.
/// `highest` is the largest delivery ID part one was handed.
pub async fn survives_reopen_part_two(store: &impl Store, highest: u64) {
    let bob = account("BBBBBBBB");
    assert!(store.account(&bob).await.unwrap().is_some());
    let inbox = store.pending(&one(&bob), 0, 10, NOW).await.unwrap();
    let kinds: Vec<_> = inbox.iter().map(|d| d.kind).collect();
    assert_eq!(
        kinds,
        [
            DeliveryKind::ContactRequest,
            DeliveryKind::Welcome,
            DeliveryKind::Application
        ]
    );
    assert_eq!(inbox[2].payload, b"kept", "the acknowledged copy is gone");
    // No delivery ID is handed out twice, written or not: a device that
    // applied an ID would take a new delivery under it for a repeat.
    let notice = low_water(&bob, &bob);
    assert!(store.notice(notice, NOW, NOW + TTL).await.unwrap()[0].1 > highest);
}

/// An anonymous message reaches every member device, the sender's own
/// included, and only in the epoch it names. The delivery key comes with
/// the commit that starts its epoch (or the group's creation) and only
/// then; a revocation or a device's removal takes it away.
async fn anonymous_fan_out_and_delivery_keys(store: &impl Store) {
    let (g, [alice, bob, carol]) = group_of_three(store).await;
    assert_eq!(store.delivery_key(&g).await.unwrap(), Some((1, None)));
    assert_eq!(store.delivery_key(&group(99)).await.unwrap(), None);
    let with_key = CommitRecord {
        delivery_key: Some([1; 32]),
        ..commit(&g, 1, &alice, b"update", &[], &[])
    };
    store
        .accept_commit(&with_key, NOW, NOW + TTL)
        .await
        .unwrap();
    assert_eq!(
        store.delivery_key(&g).await.unwrap(),
        Some((2, Some([1; 32])))
    );
    let resubmitted = CommitRecord {
        delivery_key: Some([7; 32]),
        ..with_key.clone()
    };
    assert!(matches!(
        store
            .accept_commit(&resubmitted, NOW, NOW + TTL)
            .await
            .unwrap(),
        CommitOutcome::Duplicate { .. }
    ));
    assert_eq!(
        store.delivery_key(&g).await.unwrap(),
        Some((2, Some([1; 32]))),
        "a resubmission (which any member could make) states nothing"
    );
    for who in [&alice, &bob, &carol] {
        read_all(store, who).await;
    }
    let created = group(98);
    assert!(
        store
            .create_group(
                &created,
                &one(&alice),
                &state_at(0),
                &info_at(0),
                Some(&[3; 32]),
                NOW
            )
            .await
            .unwrap()
    );
    assert_eq!(
        store.delivery_key(&created).await.unwrap(),
        Some((0, Some([3; 32])))
    );

    let FanOutOutcome::Stored {
        deliveries,
        durable,
    } = store
        .fan_out_anonymous(&g, b"whisper", 2, &[1; 32], NOW, NOW + TTL)
        .await
        .unwrap()
    else {
        panic!("an anonymous message of the current epoch is stored");
    };
    durable.wait().await.unwrap();
    let mut recipients: Vec<_> = deliveries.iter().map(|(r, _)| r.clone()).collect();
    recipients.sort();
    let mut everyone = vec![one(&alice), one(&bob), one(&carol)];
    everyone.sort();
    assert_eq!(
        recipients, everyone,
        "every member device, the sender's too"
    );
    for who in [&alice, &bob, &carol] {
        let held = read_all(store, who).await;
        assert_eq!(held.len(), 1);
        assert_eq!(held[0].payload, b"whisper");
        assert_eq!(held[0].sender, None);
        assert_eq!(held[0].kind, DeliveryKind::Application);
    }
    assert!(matches!(
        store
            .fan_out_anonymous(&g, b"old", 1, &[1; 32], NOW, NOW + TTL)
            .await
            .unwrap(),
        FanOutOutcome::BehindGroup { current_epoch: 2 }
    ));
    assert!(matches!(
        store
            .fan_out_anonymous(&g, b"future", 3, &[1; 32], NOW, NOW + TTL)
            .await
            .unwrap(),
        FanOutOutcome::AheadOfGroup { current_epoch: 2 }
    ));
    assert!(matches!(
        store
            .fan_out_anonymous(&group(99), b"x", 0, &[1; 32], NOW, NOW + TTL)
            .await
            .unwrap(),
        FanOutOutcome::UnknownGroup
    ));

    // A commit without a key leaves its epoch without one: the old key
    // does not carry over.
    store
        .accept_commit(
            &commit(&g, 2, &alice, b"remove carol", &[], &[&carol]),
            NOW,
            NOW + TTL,
        )
        .await
        .unwrap();
    assert_eq!(store.delivery_key(&g).await.unwrap(), Some((3, None)));
    for who in [&alice, &bob, &carol] {
        read_all(store, who).await;
    }
    assert!(
        matches!(
            store
                .fan_out_anonymous(&g, b"old key", 3, &[1; 32], NOW, NOW + TTL)
                .await
                .unwrap(),
            FanOutOutcome::KeyWithdrawn
        ),
        "a key is checked with the copies' storing, not only before"
    );

    // A line revoked takes the key of each of its groups with it: it knows
    // that key, so nobody sends with it until a member commits (stating a
    // new one).
    let keyed = CommitRecord {
        delivery_key: Some([4; 32]),
        ..commit(&g, 3, &alice, b"update again", &[], &[])
    };
    store.accept_commit(&keyed, NOW, NOW + TTL).await.unwrap();
    assert_eq!(
        store.delivery_key(&g).await.unwrap(),
        Some((4, Some([4; 32])))
    );
    for who in [&alice, &bob] {
        read_all(store, who).await;
    }
    let FanOutOutcome::Stored {
        deliveries,
        durable,
    } = store
        .fan_out_anonymous(&g, b"after", 4, &[4; 32], NOW, NOW + TTL)
        .await
        .unwrap()
    else {
        panic!("stored");
    };
    durable.wait().await.unwrap();
    let mut recipients: Vec<_> = deliveries.iter().map(|(r, _)| r.clone()).collect();
    recipients.sort();
    let mut members = vec![one(&alice), one(&bob)];
    members.sort();
    assert_eq!(recipients, members, "a removed member gets none");
    assert!(read_all(store, &carol).await.is_empty());
    store.revoke(&bob, None, NOW, NOW + TTL).await.unwrap();
    assert_eq!(store.delivery_key(&g).await.unwrap(), Some((4, None)));
    // A message whose signature was checked with the key just before (the
    // caller read it then) is refused: the key is gone when it is stored.
    assert!(matches!(
        store
            .fan_out_anonymous(&g, b"raced", 4, &[4; 32], NOW, NOW + TTL)
            .await
            .unwrap(),
        FanOutOutcome::KeyWithdrawn
    ));
    assert!(
        read_all(store, &alice)
            .await
            .iter()
            .all(|d| d.payload != b"raced")
    );
}

/// Token keys are kept newest first and retired with their spent tokens;
/// a line's daily allowance is counted across requests; a token is spent
/// once.
async fn tokens(store: &impl Store) {
    let alice = registered(store, "AAAAAAAA", 1).await;
    let bob = registered(store, "BBBBBBBB", 2).await;
    assert!(store.token_keys().await.unwrap().is_empty());
    let old = TokenKey {
        id: [1; 32],
        secret: vec![11; 32],
        created_at: NOW,
    };
    let new = TokenKey {
        id: [2; 32],
        secret: vec![22; 32],
        created_at: NOW + 30 * DAY,
    };
    assert!(store.add_token_key(&old, 0).await.unwrap());
    let racing = TokenKey {
        id: [3; 32],
        secret: vec![33; 32],
        created_at: NOW + 1,
    };
    assert!(
        !store.add_token_key(&racing, NOW - 1).await.unwrap(),
        "not while a key made since is kept (another node made one)"
    );
    assert!(store.add_token_key(&new, NOW).await.unwrap());
    assert!(!store.add_token_key(&new, NOW).await.unwrap());
    assert_eq!(
        store.token_keys().await.unwrap(),
        vec![new.clone(), old.clone()]
    );
    assert!(
        !format!("{old:?}").contains("11, 11"),
        "a token key's Debug shows no secret"
    );

    let day = NOW / DAY;
    assert_eq!(store.grant_tokens(&alice, day, 30, 50).await.unwrap(), 30);
    assert_eq!(store.grant_tokens(&alice, day, 30, 50).await.unwrap(), 20);
    assert_eq!(store.grant_tokens(&alice, day, 30, 50).await.unwrap(), 0);
    assert_eq!(
        store.grant_tokens(&bob, day, 30, 50).await.unwrap(),
        30,
        "per line"
    );
    assert_eq!(
        store.grant_tokens(&alice, day + 1, 30, 50).await.unwrap(),
        30,
        "per day"
    );

    assert!(store.spend_token(&old.id, &[5; 32]).await.unwrap());
    assert!(
        !store.spend_token(&old.id, &[5; 32]).await.unwrap(),
        "spent once"
    );
    assert!(
        store.spend_token(&new.id, &[5; 32]).await.unwrap(),
        "per key"
    );
    assert!(!store.spend_token(&new.id, &[5; 32]).await.unwrap());

    assert_eq!(store.retire_token_keys(NOW).await.unwrap(), 1);
    assert_eq!(store.token_keys().await.unwrap(), vec![new.clone()]);
    assert!(
        !store.spend_token(&old.id, &[6; 32]).await.unwrap(),
        "nothing is spent under a retired key (what was spent under it is forgotten)"
    );
    assert!(
        !store.spend_token(&[9; 32], &[6; 32]).await.unwrap(),
        "nor under an unknown one"
    );
    assert!(!store.spend_token(&new.id, &[5; 32]).await.unwrap());

    // A past day's allowance is swept with the expired mail.
    store.expire(NOW + 2 * DAY).await.unwrap();
    assert_eq!(store.grant_tokens(&alice, day, 30, 50).await.unwrap(), 30);
}

/// Two stores on one database, as two nodes of a cluster are: what one
/// node does is ordered with what the other does exactly as one node
/// orders its own requests.
///
/// - Racing commits at one epoch: exactly one wins, the other is stale,
///   and the epochs have no gap.
/// - Concurrent fan-outs to one recipient: its delivery IDs are dense and
///   increasing, a reader following the mailbox never sees an ID appear
///   below one it has already seen, and no ID is used twice.
/// - A commit is in every mailbox before any message of the epoch it
///   starts.
pub async fn two_nodes(a: &impl Store, b: &impl Store) {
    let (g, [alice, bob, carol]) = group_of_three(a).await;

    // Racing commits: Alice through one node, Bob through the other.
    let mut epoch = 1;
    for round in 0..20u8 {
        let from_alice = commit(&g, epoch, &alice, &[b'a', round], &[], &[]);
        let from_bob = commit(&g, epoch, &bob, &[b'b', round], &[], &[]);
        let (first, second) = tokio::join!(
            a.accept_commit(&from_alice, NOW, NOW + TTL),
            b.accept_commit(&from_bob, NOW, NOW + TTL),
        );
        let outcomes = [first.unwrap(), second.unwrap()];
        let won = outcomes
            .iter()
            .filter(|o| matches!(o, CommitOutcome::Accepted { epoch: e, .. } if *e == epoch + 1))
            .count();
        let lost = outcomes
            .iter()
            .filter(|o| matches!(o, CommitOutcome::Stale { current_epoch } if *current_epoch == epoch + 1))
            .count();
        assert_eq!((won, lost), (1, 1), "round {round}: {outcomes:?}");
        epoch += 1;
    }
    assert_eq!(b.group(&g).await.unwrap().unwrap().epoch, epoch);
    let commits = read_all(a, &carol).await;
    assert_eq!(commits.len(), 20, "one commit per epoch reached Carol");
    assert!(commits.iter().all(|d| d.kind == DeliveryKind::Commit));
    for who in [&alice, &bob] {
        read_all(b, who).await;
    }

    // Concurrent fan-outs to Carol from both nodes, while a reader follows
    // her mailbox through each node in turn.
    let last_before = a
        .notice(low_water(&carol, &carol), NOW, NOW + TTL)
        .await
        .unwrap()[0]
        .1;
    read_all(a, &carol).await;
    const SENDS: usize = 60;
    let reader = async {
        let mut seen = last_before;
        let mut order = Vec::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while order.len() < 2 * SENDS {
            assert!(
                std::time::Instant::now() < deadline,
                "Carol's copies never all came"
            );
            let node: &dyn Store = if order.len() % 2 == 0 { a } else { b };
            for delivery in node.pending(&one(&carol), seen, 1000, NOW).await.unwrap() {
                assert_eq!(
                    delivery.id,
                    seen + 1,
                    "a reader that saw {seen} next finds {}: an ID appeared late or was skipped",
                    delivery.id
                );
                seen = delivery.id;
                order.push(delivery.id);
            }
            tokio::task::yield_now().await;
        }
        order
    };
    let (from_alice, from_bob, order) = tokio::join!(
        send_many(a, &g, &alice, &carol, epoch, SENDS),
        send_many(b, &g, &bob, &carol, epoch, SENDS),
        reader
    );
    let mut handed: Vec<u64> = from_alice.into_iter().chain(from_bob).collect();
    handed.sort_unstable();
    assert_eq!(handed, order, "every ID handed out is in the mailbox, once");
    let held = a
        .pending(&one(&carol), last_before, 1000, NOW)
        .await
        .unwrap();
    let ids: Vec<u64> = held.iter().map(|d| d.id).collect();
    assert_eq!(ids, order);
    b.ack(&one(&carol), &ids).await.unwrap();
    let next = b
        .notice(low_water(&carol, &carol), NOW, NOW + TTL)
        .await
        .unwrap()[0]
        .1;
    assert_eq!(
        next,
        order.last().unwrap() + 1,
        "no ID reused after the acknowledgements"
    );
    read_all(a, &carol).await;

    // A commit through one node while the other sends, as fast as it can,
    // messages of the epoch that commit starts: none is stored before it.
    let next_epoch = epoch + 1;
    let eager = async {
        let mut sent = 0;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while sent < 5 {
            assert!(
                std::time::Instant::now() < deadline,
                "the commit never became visible"
            );
            match send_in_epoch(b, &g, &bob, b"early", next_epoch, NOW)
                .await
                .unwrap()
            {
                FanOutOutcome::AheadOfGroup { .. } => tokio::task::yield_now().await,
                FanOutOutcome::Stored { durable, .. } => {
                    durable.wait().await.unwrap();
                    sent += 1;
                }
                other => panic!("{other:?}"),
            }
        }
    };
    let next = commit(&g, epoch, &alice, b"next", &[], &[]);
    let committing = async {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        a.accept_commit(&next, NOW, NOW + TTL).await.unwrap()
    };
    let ((), outcome) = tokio::join!(eager, committing);
    assert!(
        matches!(outcome, CommitOutcome::Accepted { .. }),
        "{outcome:?}"
    );
    let held = a.pending(&one(&carol), 0, 100, NOW).await.unwrap();
    let kinds: Vec<_> = held.iter().map(|d| d.kind).collect();
    assert_eq!(kinds[0], DeliveryKind::Commit, "{kinds:?}");
    assert_eq!(kinds.len(), 6, "{kinds:?}");

    // A member added on one node while the other stores a message of the
    // epoch before: the message goes to the members of its epoch, never
    // to the newcomer, who could not read it (and its sender would never
    // know to send it again).
    let dave = registered(a, "DDDDDDDD", 4).await;
    for who in [&alice, &bob, &carol] {
        read_all(a, who).await;
    }
    for round in 0..15u8 {
        let at = a.group(&g).await.unwrap().unwrap().epoch;
        let adding = commit(&g, at, &alice, &[b'+', round], &[&dave], &[]);
        let (added, sent) = tokio::join!(
            a.accept_commit(&adding, NOW, NOW + TTL),
            send_in_epoch(b, &g, &bob, b"before dave", at, NOW),
        );
        assert!(matches!(added.unwrap(), CommitOutcome::Accepted { .. }));
        match sent.unwrap() {
            FanOutOutcome::Stored {
                deliveries,
                durable,
            } => {
                durable.wait().await.unwrap();
                assert!(
                    deliveries.iter().all(|(to, _)| to.account != dave),
                    "round {round}: a message of the epoch before went to the newcomer"
                );
            }
            FanOutOutcome::BehindGroup { .. } => {}
            other => panic!("{other:?}"),
        }
        let held = read_all(a, &dave).await;
        assert!(
            held.iter().all(|d| d.kind != DeliveryKind::Application),
            "round {round}: {:?}",
            held.iter().map(|d| d.kind).collect::<Vec<_>>()
        );
        let removing = commit(&g, at + 1, &alice, &[b'-', round], &[], &[&dave]);
        let removed = a.accept_commit(&removing, NOW, NOW + TTL).await.unwrap();
        assert!(
            matches!(removed, CommitOutcome::Accepted { .. }),
            "{removed:?}"
        );
        read_all(b, &dave).await;
    }
}

/// Sends `count` messages from `who` to `g` in `epoch`, one after the
/// other, each durable before the next; returns the IDs of `to`'s copies.
async fn send_many(
    store: &impl Store,
    g: &GroupId,
    who: &AccountId,
    to: &AccountId,
    epoch: u64,
    count: usize,
) -> Vec<u64> {
    let mut ids = Vec::new();
    for n in 0..count {
        let (deliveries, durable) =
            stored(send_in_epoch(store, g, who, &[n as u8], epoch, NOW).await);
        durable.wait().await.unwrap();
        ids.extend(
            deliveries
                .iter()
                .filter(|(device, _)| device.account == *to)
                .map(|(_, d)| d.id),
        );
    }
    ids
}
