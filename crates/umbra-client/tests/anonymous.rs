//! Sending to a group without saying who you are, over the real server:
//! members get the message (MLS tells them who wrote it), the server gets
//! it on a connection that never logged in; a message not signed with the
//! epoch's delivery key, one from an epoch the group has left, a spent
//! token and a forged one are each refused with their own error, and a
//! line's tokens are counted against its daily allowance.

mod common;

use std::sync::Arc;

use common::{Device, TestServer, befriend};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use umbra_client::{ClientError, Event};
use umbra_proto::{
    ClientFrame, ErrorCode, Push, Reply, Request, ServerMessage, decode_client, decode_server,
    encode_client,
};
use umbra_server::Direction;

/// Every anonymous message the server received, as it received it.
fn anonymous_frames(server: &TestServer) -> Vec<umbra_proto::AnonymousMessage> {
    server
        .frames()
        .into_iter()
        .filter(|(direction, _)| *direction == Direction::Inbound)
        .filter_map(|(_, bytes)| match decode_client(&bytes) {
            Ok(ClientFrame {
                request: Request::SendAnonymous(message),
                ..
            }) => Some(message),
            _ => None,
        })
        .collect()
}

/// Every request the server received, in order.
fn requests(server: &TestServer) -> Vec<Request> {
    server
        .frames()
        .into_iter()
        .filter(|(direction, _)| *direction == Direction::Inbound)
        .filter_map(|(_, bytes)| decode_client(&bytes).ok().map(|frame| frame.request))
        .collect()
}

/// Waits until `device` holds at least `count` tokens (it asks for them when
/// it connects, beside the session).
async fn wait_for_tokens(device: &Device, count: u64) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    while device.client.token_stock().unwrap() < count {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no tokens after 30 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// A group `creator` makes with `others`, once each of them has it.
async fn group_of(creator: &Device, others: &mut [&mut Device]) -> umbra_client::ConversationId {
    let ids: Vec<_> = others.iter().map(|d| d.id()).collect();
    let group = creator.client.create_group("crew", &ids).await.unwrap();
    for device in others.iter_mut() {
        device
            .wait_for(|e| match e {
                Event::ConversationStarted { conversation } if conversation.id == group => Some(()),
                _ => None,
            })
            .await;
    }
    group
}

/// Sends `request` on a fresh connection that never logs in; the answer.
async fn send_unauthenticated(
    server: &TestServer,
    request: Request,
) -> Result<Reply, umbra_proto::ErrorReply> {
    let activation = server.activation().await;
    let tls = umbra_client::pinned_tls_config(activation.pin).unwrap();
    let tcp = tokio::net::TcpStream::connect(&activation.address)
        .await
        .unwrap();
    let name = rustls::pki_types::ServerName::try_from("umbra.invalid").unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(name, tcp)
        .await
        .unwrap();
    let (mut ws, _) =
        tokio_tungstenite::client_async(format!("wss://{}/", activation.address), tls)
            .await
            .unwrap();
    ws.send(WsMessage::binary(encode_client(&ClientFrame {
        id: 1,
        request,
    })))
    .await
    .unwrap();
    loop {
        let frame = tokio::time::timeout(std::time::Duration::from_secs(30), ws.next())
            .await
            .expect("the server answers")
            .expect("the connection stays open")
            .unwrap();
        let WsMessage::Binary(bytes) = frame else {
            continue;
        };
        match decode_server(&bytes).unwrap() {
            ServerMessage::Response { id: 1, result } => return result,
            ServerMessage::Push(Push::Hello { .. }) => continue,
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_anonymous_message_reaches_the_members_and_not_the_senders_name_to_the_server() {
    let server = TestServer::start().await;
    let mut alice = Device::activate(&server).await;
    let mut bob = Device::activate(&server).await;
    let mut carol = Device::activate(&server).await;
    befriend(&mut alice, &mut bob).await;
    befriend(&mut alice, &mut carol).await;
    let group = group_of(&alice, &mut [&mut bob, &mut carol]).await;
    for device in [&alice, &bob, &carol] {
        wait_for_tokens(device, 32).await;
    }
    let before = requests(&server).len();

    let sent = bob
        .client
        .send_text_anonymously(&group, "from a member, unnamed")
        .await
        .unwrap();
    assert_eq!(sent.body, "from a member, unnamed");
    for device in [&mut alice, &mut carol] {
        let (sender, text) = device.next_text().await;
        assert_eq!(text, "from a member, unnamed");
        assert_eq!(sender, bob.id(), "MLS tells the members who wrote it");
    }

    // The server got it on a connection that never logged in (no device
    // logged in while it was sent: the devices' own connections were open
    // before), and nothing in it names Bob.
    let frames = anonymous_frames(&server);
    assert_eq!(frames.len(), 1);
    let anonymous = &frames[0];
    let bob_id = bob.id();
    let contains = |haystack: &[u8], needle: &[u8]| {
        haystack
            .windows(needle.len())
            .any(|window| window == needle)
    };
    assert!(!contains(&anonymous.message, bob_id.as_str().as_bytes()));
    let after: Vec<Request> = requests(&server).into_iter().skip(before).collect();
    assert!(after.iter().any(|r| matches!(r, Request::SendAnonymous(_))));
    assert!(
        !after.iter().any(|r| matches!(r, Request::Login { .. })),
        "no login on the connection it came on"
    );
    assert!(
        !after
            .iter()
            .any(|r| matches!(r, Request::IssueTokens { .. })),
        "Bob's tokens came when he connected: asking for them as he sends would point at him"
    );

    // Bob's own copy came back to him too (the server cannot tell his
    // device from the others'); it is dropped, not shown twice or reported.
    // And nobody answers it with a receipt: they go as their senders, and
    // the one member not sending one would be Bob. (His message as himself
    // gets its receipts: they flow.)
    let named = bob
        .client
        .send_text(&group, "and now as myself")
        .await
        .unwrap();
    for device in [&mut alice, &mut carol] {
        assert_eq!(device.next_text().await.1, "and now as myself");
    }
    bob.wait_for(|e| match e {
        Event::DeliveryStateChanged { message_id, state } if *message_id == sent.id => {
            assert!(
                !matches!(
                    state,
                    umbra_client::DeliveryState::Delivered | umbra_client::DeliveryState::Read
                ),
                "a receipt for the anonymous message"
            );
            None
        }
        Event::DeliveryStateChanged { message_id, state }
            if *message_id == named.id && *state == umbra_client::DeliveryState::Delivered =>
        {
            Some(())
        }
        _ => None,
    })
    .await;
    let anonymous_state = bob
        .client
        .history(&group, 50)
        .unwrap()
        .into_iter()
        .find(|m| m.id == sent.id)
        .unwrap()
        .state;
    assert_eq!(
        anonymous_state,
        umbra_client::DeliveryState::Sent,
        "no receipt for the anonymous message"
    );
    bob.client.sync().await.unwrap();
    let history = bob.client.history(&group, 50).unwrap();
    assert_eq!(
        history
            .iter()
            .filter(|m| m.body == "from a member, unnamed")
            .count(),
        1
    );
    while let Ok(event) = bob.events.try_recv() {
        assert!(
            !matches!(
                event,
                Event::Discarded { .. } | Event::ServerMisbehaved { .. }
            ),
            "{event:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_signatures_spent_or_forged_tokens_and_old_epochs_are_refused() {
    let server = TestServer::start().await;
    let mut alice = Device::activate(&server).await;
    let mut bob = Device::activate(&server).await;
    let mut carol = Device::activate(&server).await;
    befriend(&mut alice, &mut bob).await;
    befriend(&mut alice, &mut carol).await;
    let group = group_of(&alice, &mut [&mut bob, &mut carol]).await;
    bob.client
        .send_text_anonymously(&group, "the original")
        .await
        .unwrap();
    assert_eq!(alice.next_text().await.1, "the original");
    let original = anonymous_frames(&server).remove(0);

    // The very same message again: its token was spent.
    let refused = send_unauthenticated(&server, Request::SendAnonymous(original.clone()))
        .await
        .unwrap_err();
    assert_eq!(refused.code, ErrorCode::TokenSpent, "{}", refused.message);

    // A token the server never issued.
    let mut forged = original.clone();
    forged.token.nonce[0] ^= 1;
    let refused = send_unauthenticated(&server, Request::SendAnonymous(forged))
        .await
        .unwrap_err();
    assert_eq!(refused.code, ErrorCode::InvalidToken, "{}", refused.message);
    let mut forged = original.clone();
    forged.token.authenticator[0] ^= 1;
    forged.token.nonce[1] ^= 1;
    let refused = send_unauthenticated(&server, Request::SendAnonymous(forged))
        .await
        .unwrap_err();
    assert_eq!(refused.code, ErrorCode::InvalidToken, "{}", refused.message);

    // Someone without the epoch's delivery key (not a member): a
    // signature under any other key, or over other bytes.
    let mut stranger = original.clone();
    stranger.signature = umbra_proto::tokens::DeliveryKey::from_seed(&[9; 32]).sign(
        &stranger.group_id,
        0,
        stranger.ttl_seconds,
        &stranger.message,
    );
    let refused = send_unauthenticated(&server, Request::SendAnonymous(stranger))
        .await
        .unwrap_err();
    assert_eq!(refused.code, ErrorCode::BadSignature, "{}", refused.message);
    let mut longer = original.clone();
    longer.ttl_seconds += 1;
    let refused = send_unauthenticated(&server, Request::SendAnonymous(longer))
        .await
        .unwrap_err();
    assert_eq!(refused.code, ErrorCode::BadSignature, "{}", refused.message);

    // A member removed keeps the old epoch's key, which signs nothing now;
    // the refusal is the same as for any other key (nobody who has not
    // proved membership learns the group's epoch).
    alice
        .client
        .remove_members(&group, &[carol.id()])
        .await
        .unwrap();
    let refused = send_unauthenticated(&server, Request::SendAnonymous(original.clone()))
        .await
        .unwrap_err();
    assert_eq!(refused.code, ErrorCode::BadSignature, "{}", refused.message);
    assert_eq!(refused.current_epoch, 0, "no epoch is told");
    let mut unknown = original.clone();
    unknown.group_id = umbra_proto::GroupId::new(vec![7; 16]).unwrap();
    let refused = send_unauthenticated(&server, Request::SendAnonymous(unknown))
        .await
        .unwrap_err();
    assert_eq!(
        refused.code,
        ErrorCode::InvalidRequest,
        "the MLS header names another group: {}",
        refused.message
    );

    // None of this disturbed the group: members still send, anonymously
    // too, in the new epoch (its committer stated its key).
    let carol_id = carol.id();
    bob.wait_for(|e| match e {
        Event::ConversationChanged { conversation }
            if conversation.id == group && !conversation.members.contains(&carol_id) =>
        {
            Some(())
        }
        _ => None,
    })
    .await;
    bob.client
        .send_text_anonymously(&group, "after the removal")
        .await
        .unwrap();
    assert_eq!(alice.next_text().await.1, "after the removal");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lines_tokens_are_counted_against_its_daily_allowance() {
    let server = TestServer::start_configured(|config| config.anonymous_sends_per_day = 40).await;
    let alice = Device::activate(&server).await;
    // Every device asks for 32 when it connects.
    wait_for_tokens(&alice, 32).await;
    assert_eq!(
        alice.client.fetch_tokens().await.unwrap(),
        8,
        "what is left of the day's allowance"
    );
    let refused = alice.client.fetch_tokens().await.unwrap_err();
    assert!(
        matches!(
            &refused,
            ClientError::Server {
                code: ErrorCode::QuotaExceeded,
                ..
            }
        ),
        "{refused:?}"
    );
    assert_eq!(alice.client.token_stock().unwrap(), 40);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_announcing_more_token_keys_than_it_needs_is_not_sent_to() {
    use umbra_store::Tokens as _;
    let server = TestServer::start().await;
    let mut alice = Device::activate(&server).await;
    let mut bob = Device::activate(&server).await;
    befriend(&mut alice, &mut bob).await;
    let group = group_of(&alice, &mut [&mut bob]).await;
    wait_for_tokens(&bob, 32).await;

    // The operator adds two keys beside the real one: enough to hand some
    // lines keys of their own and tell their tokens apart.
    let (data, address, store, _dir) = server.seize();
    let now = common::now();
    for n in 0..2u8 {
        let issuer = umbra_proto::tokens::TokenIssuer::generate().unwrap();
        store
            .add_token_key(
                &umbra_store::TokenKey {
                    id: issuer.id(),
                    secret: issuer.secret().to_vec(),
                    created_at: now - u64::from(n),
                },
                i64::MAX as u64,
            )
            .await
            .unwrap();
    }
    drop(store);
    let server = TestServer::start_in(&data, address).await;
    bob.client.connect().await.unwrap();
    let stock = bob.client.token_stock().unwrap();
    let refused = bob
        .client
        .send_text_anonymously(&group, "never sent")
        .await
        .unwrap_err();
    assert!(
        matches!(refused, ClientError::UntrustedTokens(_)),
        "{refused:?}"
    );
    bob.wait_for(|e| matches!(e, Event::ServerMisbehaved { .. }).then_some(()))
        .await;
    assert!(anonymous_frames(&server).is_empty(), "nothing was sent");
    assert_eq!(
        bob.client.token_stock().unwrap(),
        stock,
        "the token goes back: it was never shown to the server"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_member_flooding_uses_up_the_groups_anonymous_hour_not_its_traffic() {
    let server =
        TestServer::start_configured(|config| config.anonymous_bytes_per_group_hour = 1).await;
    let mut alice = Device::activate(&server).await;
    let mut bob = Device::activate(&server).await;
    befriend(&mut alice, &mut bob).await;
    let group = group_of(&alice, &mut [&mut bob]).await;
    wait_for_tokens(&bob, 32).await;
    bob.client
        .send_text_anonymously(&group, "the first goes")
        .await
        .unwrap();
    assert_eq!(alice.next_text().await.1, "the first goes");
    let stock = bob.client.token_stock().unwrap();
    let refused = bob
        .client
        .send_text_anonymously(&group, "the hour is used up")
        .await
        .unwrap_err();
    assert_eq!(
        refused.server_code(),
        Some(ErrorCode::QuotaExceeded),
        "{refused:?}"
    );
    assert_eq!(
        bob.client.token_stock().unwrap(),
        stock - 1,
        "a token that reached the server is not offered again (a repeated nonce would link \
         two messages), even when refused"
    );
    // Sending as oneself is not touched, for anyone in the group.
    bob.client.send_text(&group, "as myself").await.unwrap();
    assert_eq!(alice.next_text().await.1, "as myself");
    alice.client.send_text(&group, "me too").await.unwrap();
    assert_eq!(bob.next_text().await.1, "me too");
}
