//! Limits over the real protocol: each one, when hit, gets its typed error
//! while other connections and accounts go on being served.

mod common;

use std::time::Duration;

use common::{Raw, Server, closed_with};
use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::Message;
use umbra_mls::{Crypto, DeviceSigner, Group, GroupConfig, Provider};
use umbra_proto::{
    AccountId, ErrorCode, GroupId, Reply, Request, ServerMessage, revoke_signing_payload,
};

/// How long a test waits for something that should happen promptly.
const PATIENCE: Duration = Duration::from_secs(20);

fn signer(n: u8) -> DeviceSigner {
    DeviceSigner::from_secret(&[n; 32])
}

#[tokio::test]
async fn connections_per_address_are_capped_other_addresses_are_served() {
    let server = Server::start_with(|c| c.max_connections_per_address = 2).await;
    let local = [127, 0, 0, 1].into();
    let first = Raw::connect_from(&server, local).await;
    let mut second = Raw::connect_from(&server, local).await;
    let mut third = Raw::open_from(&server, local).await;
    let message = closed_with(&mut third, ErrorCode::TooManyConnections).await;
    assert!(message.contains("2 connections"), "{message}");

    // Another address is not affected, nor the connections already open.
    let mut elsewhere = Raw::connect_from(&server, [127, 0, 0, 2].into()).await;
    elsewhere.alive().await;
    second.alive().await;

    // A connection that ends gives its slot back.
    drop(first);
    let mut again = tokio::time::timeout(PATIENCE, async {
        loop {
            let mut raw = Raw::open_from(&server, local).await;
            match raw.next().await {
                Some(ServerMessage::Push(umbra_proto::Push::Hello { nonce, .. })) => {
                    raw.nonce = nonce;
                    return raw;
                }
                _ => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    })
    .await
    .expect("the slot never came back");
    again.alive().await;
}

#[tokio::test]
async fn sessions_per_account_are_capped_the_oldest_is_replaced() {
    let server = Server::start_with(|c| c.max_sessions_per_account = 2).await;
    let signer = signer(1);
    let mut oldest = Raw::connect(&server).await;
    let account = oldest.registered(&server, &signer).await;
    let mut middle = Raw::connect(&server).await;
    middle.login(&account, &signer).await;
    oldest.alive().await;
    let mut newest = Raw::connect(&server).await;
    newest.login(&account, &signer).await;

    let message = closed_with(&mut oldest, ErrorCode::SessionReplaced).await;
    assert!(message.contains("at most 2"), "{message}");
    middle.alive().await;
    newest.alive().await;

    // Another account's sessions are untouched.
    let mut other = Raw::connect(&server).await;
    other.registered(&server, &self::signer(2)).await;
    other.alive().await;
}

#[tokio::test]
async fn a_revoked_lines_sessions_are_closed_at_once() {
    let server = Server::start().await;
    let signer = signer(3);
    let mut phone = Raw::connect(&server).await;
    let account = phone.registered(&server, &signer).await;
    let mut laptop = Raw::connect(&server).await;
    laptop.login(&account, &signer).await;
    let mut bystander = Raw::connect(&server).await;
    bystander.registered(&server, &self::signer(4)).await;

    // Revoked from a third, unauthenticated connection (as after a wipe).
    let mut anywhere = Raw::connect(&server).await;
    let revoke = Request::Revoke {
        account_id: account.clone(),
        signature: signer.sign_payload(&revoke_signing_payload(&account)),
    };
    assert_eq!(anywhere.call(revoke).await, Ok(Reply::Done));

    closed_with(&mut phone, ErrorCode::LineRevoked).await;
    closed_with(&mut laptop, ErrorCode::LineRevoked).await;
    bystander.alive().await;
    // Nothing is stored for it any more, and it answers like a line that
    // never was: a contact request to it is refused as to an unknown one.
    let request = Request::SendContactRequest {
        to: account.clone(),
    };
    bystander
        .expect_error(request, ErrorCode::UnknownAccount)
        .await;
    // And the line cannot come back.
    let mut again = Raw::connect(&server).await;
    let signature =
        signer.sign_payload(&umbra_proto::login_signing_payload(&again.nonce, &account));
    again
        .expect_error(
            Request::Login {
                account_id: account.clone(),
                device: umbra_proto::DeviceId::FIRST,
                signature,
            },
            ErrorCode::LineRevoked,
        )
        .await;
}

#[tokio::test]
async fn authentication_must_come_soon_and_within_a_few_requests() {
    let server = Server::start_with(|c| {
        c.auth_timeout = Duration::from_secs(1);
        c.max_requests_before_auth = 3;
    })
    .await;
    let started = tokio::time::Instant::now();
    let mut silent = Raw::connect(&server).await;
    let mut chatty = Raw::connect(&server).await;
    for _ in 0..3 {
        chatty.alive().await;
    }
    chatty.send(Request::Ping).await;
    let message = closed_with(&mut chatty, ErrorCode::NotAuthenticated).await;
    assert!(message.contains("more than 3 requests"), "{message}");

    let message = closed_with(&mut silent, ErrorCode::NotAuthenticated).await;
    assert!(message.contains("within 1 seconds"), "{message}");
    assert!(started.elapsed() >= Duration::from_secs(1));

    // Authenticating in time is unaffected by either limit.
    let mut device = Raw::connect(&server).await;
    device.registered(&server, &signer(5)).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for _ in 0..5 {
        device.alive().await;
    }
}

#[tokio::test]
async fn idle_sessions_close_and_pings_keep_them_open() {
    let server = Server::start_with(|c| c.idle_timeout = Duration::from_secs(2)).await;
    let mut quiet = Raw::connect(&server).await;
    quiet.registered(&server, &signer(6)).await;
    let mut pinging = Raw::connect(&server).await;
    pinging.registered(&server, &signer(7)).await;

    let started = tokio::time::Instant::now();
    let keepalive = async {
        // WebSocket pings, as the Umbra client sends them, twice as long
        // as the quiet connection needs to be closed.
        while started.elapsed() < Duration::from_secs(4) {
            pinging
                .ws
                .send(Message::Ping(Vec::new().into()))
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    };
    let (message, ()) = tokio::join!(closed_with(&mut quiet, ErrorCode::IdleTimeout), keepalive);
    assert!(message.contains("2 seconds"), "{message}");
    assert!(started.elapsed() >= Duration::from_secs(2));
    pinging.alive().await;
}

#[tokio::test]
async fn requests_beyond_the_rate_are_refused_one_by_one() {
    let server = Server::start_with(|c| {
        c.requests_per_second = 1;
        c.request_burst = 4;
        c.max_requests_before_auth = 100;
    })
    .await;
    let mut greedy = Raw::connect(&server).await;
    let mut ids = Vec::new();
    for _ in 0..7 {
        ids.push(greedy.send(Request::Ping).await);
    }
    let mut refused = Vec::new();
    for _ in 0..7 {
        let (id, result) = greedy.response().await.expect("connection closed");
        match result {
            Ok(Reply::Done) => {}
            Err(error) if error.code == ErrorCode::RateLimited => refused.push(id),
            other => panic!("unexpected {other:?}"),
        }
    }
    // The burst goes through (perhaps one more as the bucket refills); the
    // rest is refused, each under its own request id.
    assert!((2..=3).contains(&refused.len()), "refused {refused:?}");
    assert!(
        refused.iter().all(|id| ids[4..].contains(id)),
        "{refused:?}"
    );
    // Another connection has its own budget.
    let mut other = Raw::connect(&server).await;
    for _ in 0..4 {
        other.alive().await;
    }
    // And the greedy one is served again once it slows down.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    greedy.alive().await;
}

#[tokio::test]
async fn per_account_quotas_for_key_packages_groups_and_contact_requests() {
    let server = Server::start_with(|c| {
        c.max_key_packages = 3;
        c.max_groups_per_account = 1;
        c.contact_requests_per_hour = 2;
    })
    .await;
    let signer = signer(8);
    let mut raw = Raw::connect(&server).await;
    let me = raw.registered(&server, &signer).await;
    let crypto = Crypto::default();
    let mut db = rusqlite::Connection::open_in_memory().unwrap();
    umbra_mls::init_storage(&mut db).unwrap();
    let provider = Provider::new(&crypto, &db);
    let key_packages = |n: usize| {
        (0..n)
            .map(|_| {
                umbra_mls::new_key_package(&provider, &signer, &me, Default::default(), false)
                    .unwrap()
            })
            .collect::<Vec<_>>()
    };
    let upload = |key_packages| Request::UploadKeyPackages {
        key_packages,
        last_resort: None,
    };
    assert!(matches!(
        raw.call(upload(key_packages(3))).await,
        Ok(Reply::KeyPackageCount { remaining: 3, .. })
    ));
    let message = raw
        .expect_error(upload(key_packages(1)), ErrorCode::QuotaExceeded)
        .await;
    assert!(message.contains("at most 3"), "{message}");
    // A new last-resort package is still taken (it replaces the old one).
    let last_resort =
        umbra_mls::new_key_package(&provider, &signer, &me, Default::default(), true).unwrap();
    assert!(matches!(
        raw.call(Request::UploadKeyPackages {
            key_packages: vec![],
            last_resort: Some(last_resort),
        })
        .await,
        Ok(Reply::KeyPackageCount { remaining: 3, .. })
    ));

    let create = || {
        let group = Group::create(&provider, &signer, &me, &GroupConfig::default(), 0).unwrap();
        Request::CreateGroup {
            group_id: GroupId::new(group.id()).unwrap(),
            group_info: group.group_info(&provider, &signer).unwrap(),
            delivery_key: None,
        }
    };
    assert_eq!(raw.call(create()).await, Ok(Reply::Done));
    raw.expect_error(create(), ErrorCode::QuotaExceeded).await;

    let mut others: Vec<AccountId> = Vec::new();
    for n in 0..3 {
        let mut other = Raw::connect(&server).await;
        others.push(other.registered(&server, &self::signer(20 + n)).await);
    }
    for to in &others[..2] {
        let request = Request::SendContactRequest { to: to.clone() };
        assert_eq!(raw.call(request).await, Ok(Reply::Done));
    }
    let request = Request::SendContactRequest {
        to: others[2].clone(),
    };
    let message = raw.expect_error(request, ErrorCode::QuotaExceeded).await;
    assert!(message.contains("2 contact requests an hour"), "{message}");

    // None of this touches another account.
    let mut other = Raw::connect(&server).await;
    other.login(&others[0], &self::signer(20)).await;
    let request = Request::SendContactRequest {
        to: others[2].clone(),
    };
    assert_eq!(other.call(request).await, Ok(Reply::Done));
}

/// A member's device at the raw protocol, with its own MLS storage.
struct Member {
    raw: Raw,
    account: AccountId,
    signer: DeviceSigner,
    crypto: Crypto,
    db: rusqlite::Connection,
}

impl Member {
    async fn register(server: &Server, seed: u8) -> Member {
        let signer = signer(seed);
        let mut raw = Raw::connect(server).await;
        let account = raw.registered(server, &signer).await;
        let mut db = rusqlite::Connection::open_in_memory().unwrap();
        umbra_mls::init_storage(&mut db).unwrap();
        Member {
            raw,
            account,
            signer,
            crypto: Crypto::default(),
            db,
        }
    }

    fn provider(&self) -> Provider<'_> {
        Provider::new(&self.crypto, &self.db)
    }

    /// The next delivery of `kind` pushed to this member (others, such as
    /// notices not acknowledged and so pushed again, are skipped).
    async fn delivery(&mut self, kind: umbra_proto::DeliveryKind) -> umbra_proto::Delivery {
        tokio::time::timeout(PATIENCE, async {
            loop {
                match self.raw.next().await.expect("connection closed") {
                    ServerMessage::Push(umbra_proto::Push::Delivery(delivery))
                        if delivery.kind == kind =>
                    {
                        return delivery;
                    }
                    _ => continue,
                }
            }
        })
        .await
        .expect("no delivery came")
    }
}

/// A message of the largest size the server accepts reaches its recipient
/// online (pushed from memory) and offline (read back from the mailbox),
/// and decrypts: its delivery fits in a frame the client reads.
#[tokio::test]
async fn the_largest_accepted_message_reaches_an_online_and_an_offline_recipient() {
    let server = Server::start().await;
    let mut alice = Member::register(&server, 30).await;
    let mut bob = Member::register(&server, 31).await;
    let fetched = alice.befriend(&mut bob).await;
    // Unpadded, so that a message can be made exactly as large as the
    // server accepts (padding would round it to a bucket).
    let config = GroupConfig {
        padding: 0,
        ..GroupConfig::default()
    };
    let mut group =
        Group::create(&alice.provider(), &alice.signer, &alice.account, &config, 0).unwrap();
    let group_id = GroupId::new(group.id()).unwrap();
    let create = Request::CreateGroup {
        group_id: group_id.clone(),
        group_info: group.group_info(&alice.provider(), &alice.signer).unwrap(),
        delivery_key: None,
    };
    assert_eq!(alice.raw.call(create).await, Ok(Reply::Done));
    let added = group
        .add_members(&alice.provider(), &alice.signer, &[fetched])
        .unwrap();
    let commit = Request::SendCommit(umbra_proto::frame::CommitSubmission {
        group_id: group_id.clone(),
        epoch: 0,
        commit: added.commit.clone(),
        welcome: added.welcome.clone(),
        group_info: added.group_info.clone(),
        delivery_key: None,
    });
    assert!(matches!(
        alice.raw.call(commit).await,
        Ok(Reply::CommitAccepted { epoch: 1 })
    ));
    group.merge_pending_commit(&alice.provider()).unwrap();
    let welcome = bob
        .delivery(umbra_proto::DeliveryKind::Welcome)
        .await
        .payload;
    let (mut bobs, _) = Group::join(&bob.provider(), &welcome, &config).unwrap();

    // The plaintext that makes the MLS message exactly as large as the
    // server accepts (found by trying: length prefixes grow with the size).
    let mut largest = umbra_proto::MAX_DELIVERY_PAYLOAD - 1000;
    for _ in 0..5 {
        let size = group
            .encrypt(&alice.provider(), &alice.signer, &vec![0; largest])
            .unwrap()
            .len();
        if size == umbra_proto::MAX_DELIVERY_PAYLOAD {
            break;
        }
        largest = largest + umbra_proto::MAX_DELIVERY_PAYLOAD - size;
    }
    let send = |group: &mut Group, alice: &Member, plaintext: Vec<u8>| {
        let message = group
            .encrypt(&alice.provider(), &alice.signer, &plaintext)
            .unwrap();
        assert_eq!(message.len(), umbra_proto::MAX_DELIVERY_PAYLOAD);
        Request::SendMessage {
            group_id: group_id.clone(),
            message,
            kind: umbra_proto::DeliveryKind::Application,
            ttl_seconds: 0,
        }
    };
    let text = |mark: u8| {
        let mut plaintext = vec![mark; largest];
        plaintext[0] = b'!';
        plaintext
    };

    // Online: pushed from memory.
    let online = send(&mut group, &alice, text(1));
    assert!(matches!(
        alice.raw.call(online).await,
        Ok(Reply::Accepted { .. })
    ));
    let delivery = bob.delivery(umbra_proto::DeliveryKind::Application).await;
    assert_eq!(delivery.payload.len(), umbra_proto::MAX_DELIVERY_PAYLOAD);
    match bobs.process(&bob.provider(), &delivery.payload).unwrap() {
        umbra_mls::Incoming::Application { plaintext, .. } => assert_eq!(plaintext, text(1)),
        other => panic!("{other:?}"),
    }
    let ack = Request::Ack {
        delivery_ids: vec![delivery.id],
        quiet: false,
    };
    assert_eq!(bob.raw.call(ack).await, Ok(Reply::Done));

    // Offline: stored, then read from the mailbox at the next login.
    drop(std::mem::replace(&mut bob.raw, Raw::connect(&server).await));
    let offline = send(&mut group, &alice, text(2));
    assert!(matches!(
        alice.raw.call(offline).await,
        Ok(Reply::Accepted { .. })
    ));
    let Member {
        raw,
        account,
        signer,
        ..
    } = &mut bob;
    raw.login(account, signer).await;
    let delivery = bob.delivery(umbra_proto::DeliveryKind::Application).await;
    match bobs.process(&bob.provider(), &delivery.payload).unwrap() {
        umbra_mls::Incoming::Application { plaintext, .. } => assert_eq!(plaintext, text(2)),
        other => panic!("{other:?}"),
    }
}

impl Member {
    /// `self` and `other` become contacts (`other` accepts), and `other`
    /// uploads a key package; the package, as `self` fetches it.
    async fn befriend(&mut self, other: &mut Member) -> Vec<u8> {
        let key_package = umbra_mls::new_key_package(
            &other.provider(),
            &other.signer,
            &other.account,
            Default::default(),
            false,
        )
        .unwrap();
        let upload = Request::UploadKeyPackages {
            key_packages: vec![key_package],
            last_resort: None,
        };
        assert!(other.raw.call(upload).await.is_ok());
        let request = Request::SendContactRequest {
            to: other.account.clone(),
        };
        assert_eq!(self.raw.call(request).await, Ok(Reply::Done));
        let accept = Request::AcceptContact {
            from: self.account.clone(),
        };
        assert_eq!(other.raw.call(accept).await, Ok(Reply::Done));
        let fetch = Request::FetchKeyPackage {
            account_id: other.account.clone(),
            device: umbra_proto::DeviceId::FIRST,
            suites: vec![umbra_mls::Suite::default().code()],
        };
        match self.raw.call(fetch).await {
            Ok(Reply::KeyPackage { key_package, .. }) => key_package,
            other => panic!("{other:?}"),
        }
    }
}

/// The wait a budget refusal names, in seconds.
fn wait_named(refusal: &str) -> u64 {
    refusal
        .split("try again in ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|seconds| seconds.parse().ok())
        .unwrap_or_else(|| panic!("no wait in {refusal:?}"))
}

/// A committer's delivery budget pays for each copy the server stores, at
/// that copy's size: the commit once per member it goes to, the Welcome
/// once per device it brings in. Before, every recipient was charged the
/// commit's size (a Welcome's included), and the Welcome was charged once
/// more for each leaf a line that ended left in the tree, though none is
/// stored for it. Read from the wait the refusal names: at 100 bytes an
/// hour's second, it tells the overdraft to within 100 bytes.
#[tokio::test]
async fn a_committer_pays_for_the_copies_stored_and_no_more() {
    const PER_HOUR: u64 = 360_000;
    const PER_SECOND: u64 = PER_HOUR / 3600;
    let server = Server::start_with(|c| c.delivery_bytes_per_hour = PER_HOUR).await;
    let mut alice = Member::register(&server, 40).await;
    let mut bob = Member::register(&server, 41).await;
    let mut carol = Member::register(&server, 42).await;
    let mut dave = Member::register(&server, 43).await;
    let for_bob = alice.befriend(&mut bob).await;
    let for_carol = alice.befriend(&mut carol).await;
    let for_dave = alice.befriend(&mut dave).await;
    let config = GroupConfig {
        padding: 0,
        ..GroupConfig::default()
    };
    let mut group =
        Group::create(&alice.provider(), &alice.signer, &alice.account, &config, 0).unwrap();
    let group_id = GroupId::new(group.id()).unwrap();
    let create = Request::CreateGroup {
        group_id: group_id.clone(),
        group_info: group.group_info(&alice.provider(), &alice.signer).unwrap(),
        delivery_key: None,
    };
    assert_eq!(alice.raw.call(create).await, Ok(Reply::Done));
    let started = std::time::Instant::now();
    let commit = async |alice: &mut Member, group: &mut Group, key_package: &[Vec<u8>]| {
        let added = group
            .add_members(&alice.provider(), &alice.signer, key_package)
            .unwrap();
        let welcome = added.welcome.clone().unwrap();
        let request = Request::SendCommit(umbra_proto::frame::CommitSubmission {
            group_id: group_id.clone(),
            epoch: added.epoch,
            commit: added.commit.clone(),
            welcome: added.welcome,
            group_info: added.group_info,
            delivery_key: None,
        });
        assert!(matches!(
            alice.raw.call(request).await,
            Ok(Reply::CommitAccepted { .. })
        ));
        group.merge_pending_commit(&alice.provider()).unwrap();
        (added.commit.len() as u64, welcome.len() as u64)
    };

    // Bob and Carol in: two Welcomes, no commit (Alice was alone).
    let (_, welcome) = commit(&mut alice, &mut group, &[for_bob, for_carol]).await;
    let mut charged = 2 * welcome;
    // Carol's line ends by its own word; her leaf stays in the tree. Dave
    // in: the commit to Bob, a Welcome to Dave, nothing for Carol's leaf.
    let revoke = Request::Revoke {
        account_id: carol.account.clone(),
        signature: carol
            .signer
            .sign_payload(&revoke_signing_payload(&carol.account)),
    };
    let mut anywhere = Raw::connect(&server).await;
    assert_eq!(anywhere.call(revoke).await, Ok(Reply::Done));
    let (to_bob, welcome) = commit(&mut alice, &mut group, &[for_dave]).await;
    charged += to_bob + welcome;

    // Messages to Bob and Dave until the budget is spent.
    let refusal = loop {
        let message = group
            .encrypt(&alice.provider(), &alice.signer, &[7; 50_000])
            .unwrap();
        let length = message.len() as u64;
        let send = Request::SendMessage {
            group_id: group_id.clone(),
            message,
            kind: umbra_proto::DeliveryKind::Application,
            ttl_seconds: 0,
        };
        match alice.raw.call(send).await {
            Ok(Reply::Accepted { .. }) => charged += 2 * length,
            Err(refusal) if refusal.code == ErrorCode::QuotaExceeded => break refusal.message,
            other => panic!("{other:?}"),
        }
        assert!(charged < 2 * PER_HOUR, "the budget never ran out");
    };
    // The bucket refilled for at most the time since the first charge.
    let refilled = PER_SECOND * (started.elapsed().as_secs() + 1);
    let overdrawn = charged.saturating_sub(PER_HOUR);
    let named = wait_named(&refusal);
    assert!(
        (overdrawn.saturating_sub(refilled) / PER_SECOND..=(overdrawn / PER_SECOND).max(1))
            .contains(&named),
        "overdrawn by {overdrawn} bytes (less up to {refilled} refilled): {refusal}"
    );
    drop((bob, carol, dave));
}
