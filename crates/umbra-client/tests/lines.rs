//! Subscriptions and distributors against the real server: quotas, a
//! distributor that manages only its own lines, suspension, revocation,
//! expiry, renewal and the grace period.

mod common;

use common::{Device, TestServer, befriend};
use umbra_client::{DistributorSession, ErrorCode, ManualClock};

const DAY: u64 = 86_400;

async fn activate_with(activation: &str) -> Device {
    Device::activate_untimed(&activation.parse().unwrap(), common::options()).await
}

fn config(server: &TestServer) -> umbra_server::Config {
    let mut config = umbra_server::Config::load(&server.data).unwrap();
    config.public_address = server.address.to_string();
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_distributor_manages_its_own_lines_and_no_others() {
    let server = TestServer::start().await;
    let config = config(&server);
    let now = common::now();
    let north = umbra_server::admin::add_distributor(&server.data, &config, "north", 2, now)
        .await
        .unwrap();
    let south = umbra_server::admin::add_distributor(&server.data, &config, "south", 5, now)
        .await
        .unwrap();
    let north = DistributorSession::connect(&north).await.unwrap();
    let south = DistributorSession::connect(&south).await.unwrap();

    // Quotas hold.
    let mut north_codes = north.issue_codes(false, 180, 2).await.unwrap();
    let over = north.issue_codes(false, 180, 1).await.unwrap_err();
    assert_eq!(over.server_code(), Some(ErrorCode::QuotaExceeded));
    let south_codes = south.issue_codes(false, 180, 1).await.unwrap();

    let mut mine = activate_with(&north_codes.pop().unwrap()).await;
    let mut theirs = activate_with(&south_codes[0]).await;
    befriend(&mut mine, &mut theirs).await;

    // Each sees only its own lines: ID, end of subscription, last seen.
    let lines = north.lines().await.unwrap();
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0].account_id, mine.id());
    assert!(lines[0].subscription_expires_at > now + 179 * DAY);
    assert_eq!(lines[0].last_seen_day, now / DAY);
    assert_eq!(lines[0].status, "active");
    assert_eq!(south.lines().await.unwrap()[0].account_id, theirs.id());

    // ...and can act on no other distributor's line.
    for refused in [
        north.suspend(&theirs.id()).await.unwrap_err(),
        north.revoke(&theirs.id()).await.unwrap_err(),
        south.suspend(&mine.id()).await.unwrap_err(),
    ] {
        assert_eq!(refused.server_code(), Some(ErrorCode::NotYourLine));
    }
    let conversation = mine.client.conversation_with(&theirs.id()).unwrap();
    mine.client
        .send_text(&conversation, "unaffected")
        .await
        .unwrap();
    assert_eq!(theirs.next_text().await.1, "unaffected");

    // Suspended: cannot send until resumed.
    north.suspend(&mine.id()).await.unwrap();
    let suspended = mine
        .client
        .send_text(&conversation, "hello?")
        .await
        .unwrap_err();
    assert_eq!(suspended.server_code(), Some(ErrorCode::LineSuspended));
    north.resume(&mine.id()).await.unwrap();
    mine.client.send_text(&conversation, "back").await.unwrap();
    assert_eq!(theirs.next_text().await.1, "back");

    // Revoked: gone for good. Its contact is told, but an unsigned notice
    // from the server does not make anyone remove a member.
    north.revoke(&mine.id()).await.unwrap();
    assert_eq!(north.lines().await.unwrap()[0].status, "revoked");
    let view = theirs
        .wait_for(|e| match e {
            umbra_client::Event::ConversationChanged { conversation } => Some(conversation.clone()),
            _ => None,
        })
        .await;
    assert_eq!(
        view.members.len(),
        2,
        "no removal on the server's word alone"
    );
    let lines: Vec<String> = theirs
        .client
        .history(&view.id, 20)
        .unwrap()
        .into_iter()
        .map(|m| m.body)
        .collect();
    assert!(lines.contains(&format!(
        "The server reports that {}'s line has ended",
        mine.id()
    )));
    mine.client.disconnect();
    let refused = mine.client.connect().await.unwrap_err();
    assert_eq!(refused.server_code(), Some(ErrorCode::LineRevoked));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_line_cannot_send_but_can_renew_and_is_ended_after_the_grace() {
    let clock = ManualClock::new(common::now());
    let server = TestServer::start_with_clock(clock.clone()).await;
    let mut alice = Device::activate(&server).await;
    let mut bob = Device::activate(&server).await;
    let (conversation, _) = befriend(&mut alice, &mut bob).await;

    // The activation codes in these tests grant 30 days.
    clock.advance(31 * DAY);
    let expired = alice
        .client
        .send_text(&conversation, "late")
        .await
        .unwrap_err();
    assert_eq!(expired.server_code(), Some(ErrorCode::SubscriptionExpired));
    assert!(
        expired.to_string().starts_with("subscription expired on ")
            && expired.to_string().ends_with(", enter a renewal code"),
        "{expired}"
    );

    let config = config(&server);
    let now = umbra_client::Clock::now(&clock);
    let renewal = umbra_server::admin::issue_renewal_codes(&server.data, &config, 30, 1, now)
        .await
        .unwrap();
    let until = alice
        .client
        .redeem_renewal(&renewal[0].grouped())
        .await
        .unwrap();
    assert_eq!(
        until,
        now + 30 * DAY,
        "counted from today, since it had ended"
    );
    let reused = alice
        .client
        .redeem_renewal(&renewal[0].grouped())
        .await
        .unwrap_err();
    assert_eq!(reused.server_code(), Some(ErrorCode::ActivationCodeUsed));
    alice
        .client
        .send_text(&conversation, "renewed")
        .await
        .unwrap();
    assert_eq!(bob.next_text().await.1, "renewed");

    // Bob never renewed (his line ended on day 30): within the 30-day grace
    // it stays; after it, its server-side state goes. Alice's runs to day 61.
    let purge = |days: u64| {
        let (data, config) = (server.data.clone(), config.clone());
        let at = now - 31 * DAY + days * DAY;
        async move {
            umbra_server::admin::purge_lapsed_lines(&data, &config, at)
                .await
                .unwrap()
        }
    };
    assert!(purge(59).await.is_empty());
    assert_eq!(purge(61).await, vec![bob.id()]);
    let store = umbra_server::open_store(&server.data, &config).unwrap();
    use umbra_store::Accounts;
    let line = store.account(&bob.id()).await.unwrap().unwrap();
    assert_eq!(line.status, umbra_store::LineStatus::Revoked);
}
