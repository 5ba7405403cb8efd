//! The secure-phone features against the real server: remote wipe that the
//! operator cannot forge, self-wipe, revocation, and the vault.

mod common;

use common::{Device, TestServer, befriend};
use umbra_client::{ClientError, DuressScope, ErrorCode, Event, SystemClock};
use umbra_store::{Accounts, KeyPackages, LineStatus, Mailboxes, Notice};

fn device_files_gone(device: &Device) {
    assert!(!umbra_client::device_exists(device.home.path()));
    let left: Vec<_> = std::fs::read_dir(device.home.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "nothing may remain, found {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_wipe_with_the_code_erases_the_device_and_ends_its_line() {
    let server = TestServer::start().await;
    let mut alice = Device::activate(&server).await;
    let mut bob = Device::activate(&server).await;
    let mut carol = Device::activate(&server).await;
    befriend(&mut bob, &mut alice).await;
    befriend(&mut bob, &mut carol).await;
    let group = bob
        .client
        .create_group("cell", &[alice.id(), carol.id()])
        .await
        .unwrap();
    for device in [&mut alice, &mut carol] {
        device
            .wait_for(|e| matches!(e, Event::ConversationStarted { conversation } if conversation.members.len() == 3).then_some(()))
            .await;
    }
    alice
        .client
        .vault_add("safe", "combination 12-34-56")
        .unwrap();

    // From another machine: only the wipe code is needed.
    let code = alice.wipe_code.clone().unwrap();
    umbra_client::send_wipe(&code, &SystemClock).await.unwrap();
    alice
        .wait_for(|e| matches!(e, Event::Wiped).then_some(()))
        .await;
    device_files_gone(&alice);

    // The server withdrew the line: no KeyPackages, no login.
    let config = umbra_server::Config::load(&server.data).unwrap();
    let store = umbra_server::open_store(&server.data, &config).unwrap();
    let line = store.account(&alice.id()).await.unwrap().unwrap();
    assert_eq!(line.status, LineStatus::Revoked);
    assert_eq!(
        store
            .take_key_package(
                &alice.id(),
                umbra_proto::DeviceId::FIRST,
                umbra_mls::Suite::default().code()
            )
            .await
            .unwrap(),
        None
    );

    // Its groups were told, and a remaining member committed its removal.
    for device in [&mut bob, &mut carol] {
        device
            .wait_for(|e| match e {
                Event::ConversationChanged { conversation }
                    if conversation.id == group && conversation.members.len() == 2 =>
                {
                    Some(())
                }
                _ => None,
            })
            .await;
    }
    bob.client.send_text(&group, "still here").await.unwrap();
    assert_eq!(carol.next_text().await.1, "still here");

    // The code cannot be replayed against the revoked line.
    let again = umbra_client::send_wipe(&code, &SystemClock)
        .await
        .unwrap_err();
    // (Answered as any wrong code or unknown account would be.)
    assert_eq!(again.server_code(), Some(ErrorCode::BadSignature));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wipe_forged_by_the_server_or_without_the_code_is_refused() {
    let server = TestServer::start().await;
    let mut alice = Device::activate(&server).await;
    let mut bob = Device::activate(&server).await;
    let (conversation, _) = befriend(&mut alice, &mut bob).await;

    // Without the code: a different seed does not verify at the server.
    let mut guessed = alice.wipe_code.clone().unwrap();
    guessed.seed[0] ^= 1;
    let refused = umbra_client::send_wipe(&guessed, &SystemClock)
        .await
        .unwrap_err();
    assert_eq!(refused.server_code(), Some(ErrorCode::BadSignature));

    // A malicious operator writes a wipe command straight into the mailbox,
    // signed with a key of its own.
    let operator_key = umbra_mls::DeviceSigner::from_secret(&[66; 32]);
    let issued_at = common::now();
    let mut payload = issued_at.to_be_bytes().to_vec();
    payload.extend_from_slice(
        operator_key
            .sign_payload(&umbra_proto::wipe_signing_payload(&alice.id(), issued_at))
            .as_bytes(),
    );
    let config = umbra_server::Config::load(&server.data).unwrap();
    let store = umbra_server::open_store(&server.data, &config).unwrap();
    let notice = Notice {
        recipient: alice.id(),
        device: None,
        sender: alice.id(),
        kind: umbra_proto::DeliveryKind::Wipe,
        group_id: None,
        payload,
    };
    store
        .notice(notice, issued_at, issued_at + 3600)
        .await
        .unwrap();
    let mut alice = alice.reopen().await;
    alice
        .wait_for(|e| matches!(e, Event::WipeRefused).then_some(()))
        .await;
    assert!(umbra_client::device_exists(alice.home.path()));
    alice
        .client
        .send_text(&conversation, "still alive")
        .await
        .unwrap();
    assert_eq!(bob.next_text().await.1, "still alive");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_wipes_their_own_device_and_the_vault_goes_with_it() {
    let server = TestServer::start().await;
    let alice = Device::activate(&server).await;
    let id = alice.client.vault_add("first", "one").unwrap();
    alice.client.vault_add("second", "two").unwrap();
    assert_eq!(alice.client.vault_get(id).unwrap().body, "one");
    let titles: Vec<String> = alice
        .client
        .vault_list()
        .unwrap()
        .into_iter()
        .map(|n| n.title)
        .collect();
    assert_eq!(titles, vec!["second", "first"]);
    alice.client.vault_delete(id).unwrap();
    assert!(matches!(
        alice.client.vault_get(id),
        Err(ClientError::Invalid(_))
    ));

    alice.client.wipe_self().await.unwrap();
    device_files_gone(&alice);
    let config = umbra_server::Config::load(&server.data).unwrap();
    let store = umbra_server::open_store(&server.data, &config).unwrap();
    assert_eq!(
        store.account(&alice.id()).await.unwrap().unwrap().status,
        LineStatus::Revoked
    );
    assert!(
        store
            .pending(
                &umbra_proto::DeviceAddr::first(alice.id()),
                0,
                10,
                common::now(),
            )
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_duress_passphrase_destroys_the_device_and_ends_its_line() {
    let server = TestServer::start().await;
    let mut alice = Device::activate(&server).await;
    let mut bob = Device::activate(&server).await;
    befriend(&mut alice, &mut bob).await;
    let duress = umbra_client::Passphrase::new("open sesame, they are watching");
    let same = alice
        .client
        .set_duress_passphrase(
            &common::passphrase(),
            &common::passphrase(),
            &DuressScope::ThisDevice,
        )
        .unwrap_err();
    assert!(matches!(same, ClientError::Invalid(_)), "{same}");
    alice
        .client
        .set_duress_passphrase(&common::passphrase(), &duress, &DuressScope::ThisDevice)
        .unwrap();
    let account = alice.id();
    alice.client.disconnect();
    let Device { home, client, .. } = alice;
    drop(client);

    let erased = umbra_client::Client::open(home.path(), &duress, common::options()).unwrap_err();
    assert_eq!(
        erased.to_string(),
        ClientError::WrongPassphrase.to_string(),
        "looks exactly like a typo"
    );
    let ClientError::Erased {
        revocation: Some(revocation),
        ..
    } = erased
    else {
        panic!("expected the sealed revocation, got {erased:?}");
    };
    // Nothing opens the device any more; the rest is overwritten after
    // the answer, by the front end.
    assert!(!umbra_client::device_exists(home.path()));
    umbra_client::Client::finish_erasure(home.path()).unwrap();
    assert_eq!(std::fs::read_dir(home.path()).unwrap().count(), 0);
    revocation.send().await.unwrap();
    let config = umbra_server::Config::load(&server.data).unwrap();
    let store = umbra_server::open_store(&server.data, &config).unwrap();
    assert_eq!(
        store.account(&account).await.unwrap().unwrap().status,
        LineStatus::Revoked
    );
    let real = umbra_client::Client::open(home.path(), &common::passphrase(), common::options());
    assert!(matches!(real, Err(ClientError::NotActivated(_))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_passphrases_wipe_the_device_and_the_count_survives_restarts() {
    let server = TestServer::start().await;
    let alice = Device::activate(&server).await;
    alice
        .client
        .set_max_failed_unlocks(&common::passphrase(), 3)
        .unwrap();
    alice.client.disconnect();
    let Device { home, client, .. } = alice;
    drop(client);
    let wrong = umbra_client::Passphrase::new("guess");
    let open = |passphrase: &umbra_client::Passphrase| {
        umbra_client::Client::open(home.path(), passphrase, common::options())
    };
    // Two wrong, then the right one: the count starts again.
    for _ in 0..2 {
        assert!(matches!(open(&wrong), Err(ClientError::WrongPassphrase)));
    }
    drop(open(&common::passphrase()).unwrap());
    // Each attempt is a fresh open, as after a restart: the count is on disk.
    for _ in 0..2 {
        assert!(matches!(open(&wrong), Err(ClientError::WrongPassphrase)));
        assert!(umbra_client::device_exists(home.path()));
    }
    let third = open(&wrong).unwrap_err();
    assert_eq!(
        third.to_string(),
        "wrong passphrase",
        "answered like the others"
    );
    assert!(
        matches!(
            third,
            ClientError::Erased {
                revocation: None,
                ..
            }
        ),
        "{third:?}"
    );
    assert!(!umbra_client::device_exists(home.path()), "the third wipes");
    umbra_client::Client::finish_erasure(home.path()).unwrap();
    assert_eq!(std::fs::read_dir(home.path()).unwrap().count(), 0);
    assert!(matches!(
        open(&common::passphrase()),
        Err(ClientError::NotActivated(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wipe_waits_for_its_device_past_the_mailbox_ttl_and_the_subscription() {
    const DAY: u64 = 86_400;
    let clock = umbra_client::ManualClock::new(common::now());
    let server = TestServer::start_with_clock(clock.clone()).await;
    let alice = Device::activate(&server).await;
    // The activation codes in these tests grant 30 days. On day 25, with
    // the phone switched off, its owner sends the wipe from elsewhere.
    let alice = alice.reopen_offline();
    clock.advance(25 * DAY);
    let code = alice.wipe_code.clone().unwrap();
    umbra_client::send_wipe(&code, &clock).await.unwrap();

    // The phone comes back on day 36: past the mailbox TTL (7 days) and
    // the subscription's end, within its grace, so the line has not ended.
    clock.advance(11 * DAY);
    let mut alice = alice;
    let _ = alice.client.connect().await;
    alice
        .wait_for(|e| matches!(e, Event::Wiped).then_some(()))
        .await;
    device_files_gone(&alice);
}
