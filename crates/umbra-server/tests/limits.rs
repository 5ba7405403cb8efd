//! Limits over the real protocol: each one, when hit, gets its typed error
//! while other connections and accounts go on being served.

mod common;

use std::time::Duration;

use common::{Raw, Server};
use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::Message;
use umbra_mls::{Crypto, DeviceSigner, Group, GroupConfig, Provider};
use umbra_proto::{
    AccountId, ErrorCode, GroupId, Reply, Request, ServerMessage, revoke_signing_payload,
};

/// How long a test waits for something that should happen promptly.
const PATIENCE: Duration = Duration::from_secs(20);

/// The next message on `raw` is an error with `code` (id 0: about the
/// connection, not a request), then the connection closes.
async fn closed_with(raw: &mut Raw, code: ErrorCode) -> String {
    let message = tokio::time::timeout(PATIENCE, async {
        loop {
            match raw.next().await {
                Some(ServerMessage::Push(_)) => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("the server neither answered nor closed");
    let text = match message {
        Some(ServerMessage::Response {
            id: 0,
            result: Err(error),
        }) => {
            assert_eq!(error.code, code, "{}", error.message);
            error.message
        }
        other => panic!("expected {code:?}, got {other:?}"),
    };
    let after = tokio::time::timeout(PATIENCE, raw.next())
        .await
        .expect("the connection stayed open");
    assert!(after.is_none(), "the connection stayed open: {after:?}");
    text
}

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
    // And the line cannot come back.
    let mut again = Raw::connect(&server).await;
    let signature =
        signer.sign_payload(&umbra_proto::login_signing_payload(&again.nonce, &account));
    again
        .expect_error(
            Request::Login {
                account_id: account.clone(),
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
        Ok(Reply::KeyPackageCount { remaining: 3 })
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
        Ok(Reply::KeyPackageCount { remaining: 3 })
    ));

    let create = || {
        let group = Group::create(&provider, &signer, &me, &GroupConfig::default(), 0).unwrap();
        Request::CreateGroup {
            group_id: GroupId::new(group.id()).unwrap(),
            group_info: group.group_info(&provider, &signer).unwrap(),
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
