//! Hostile input against the real server: every bad frame or request gets a
//! clear, typed error, and the server goes on serving everyone else.

mod common;

use common::{Raw, Server};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use umbra_mls::{Crypto, DeviceSigner, Group, GroupConfig, Provider};
use umbra_proto::frame::CommitSubmission;
use umbra_proto::{
    AccountId, ActivationCode, ErrorCode, GroupId, MAX_FRAME_BYTES, Nonce, Push, Reply, Request,
    ServerMessage, Signature, login_signing_payload, register_signing_payload,
    wipe_signing_payload,
};
use umbra_server::Config;

#[tokio::test]
async fn malformed_frames_get_typed_errors_and_the_server_keeps_serving() {
    let server = Server::start().await;
    let mut bystander = Raw::connect(&server).await;
    let mut attacker = Raw::connect(&server).await;

    for (bytes, code) in [
        (vec![1, 0xff, 0xff, 0xff, 0x0f], ErrorCode::MalformedFrame),
        (vec![9, 1, 2], ErrorCode::UnsupportedVersion),
        (vec![], ErrorCode::MalformedFrame),
        (vec![1], ErrorCode::MalformedFrame),
    ] {
        attacker.send_raw(Message::Binary(bytes.into())).await;
        let (id, result) = attacker.response().await.unwrap();
        assert_eq!((id, result.unwrap_err().code), (0, code));
    }
    // A frame whose envelope is readable but whose request is invalid (an
    // account ID with a character not in the alphabet) is answered under
    // its own id, so the client can tell which request failed.
    let login = umbra_proto::encode_client(&umbra_proto::ClientFrame {
        id: 77,
        request: Request::Login {
            account_id: AccountId::parse("AAAAAAAA").unwrap(),
            device: umbra_proto::DeviceId::FIRST,
            signature: Signature::from_slice(&[0; 64]).unwrap(),
        },
    });
    let invalid: Vec<u8> = {
        let at = login
            .windows(8)
            .position(|w| w == b"AAAAAAAA")
            .expect("the account ID in the frame");
        let mut bytes = login.clone();
        bytes[at] = b'1';
        bytes
    };
    attacker.send_raw(Message::Binary(invalid.into())).await;
    let (id, result) = attacker.response().await.unwrap();
    let error = result.unwrap_err();
    assert_eq!(
        (id, error.code),
        (77, ErrorCode::MalformedFrame),
        "{}",
        error.message
    );
    attacker.send_raw(Message::Text("hello".into())).await;
    let (_, result) = attacker.response().await.unwrap();
    assert!(result.unwrap_err().message.contains("text frames"));
    attacker.alive().await;
    bystander.alive().await;

    // Oversized: refused with FRAME_TOO_LARGE, then that connection closes.
    attacker
        .send_raw(Message::Binary(vec![1u8; MAX_FRAME_BYTES + 1].into()))
        .await;
    let (_, result) = attacker
        .response()
        .await
        .expect("an error frame before closing");
    assert_eq!(result.unwrap_err().code, ErrorCode::FrameTooLarge);
    assert!(attacker.next().await.is_none(), "connection closed");
    bystander.alive().await;

    // A flood of garbage is cut off after the configured number of frames
    // (on an authenticated connection: before authentication, fewer
    // requests of any kind are allowed).
    let mut flooder = Raw::connect(&server).await;
    flooder
        .registered(&server, &DeviceSigner::from_secret(&[9; 32]))
        .await;
    for _ in 0..Config::default().max_malformed_frames {
        flooder
            .send_raw(Message::Binary(vec![1, 0xff].into()))
            .await;
    }
    let mut errors = 0;
    while let Some(message) = flooder.next().await {
        if let ServerMessage::Response { result: Err(_), .. } = message {
            errors += 1;
        }
    }
    assert_eq!(errors, Config::default().max_malformed_frames);
    bystander.alive().await;
    Raw::connect(&server).await.alive().await;
}

#[tokio::test]
async fn authentication_refusals() {
    let server = Server::start().await;
    let mut raw = Raw::connect(&server).await;
    let signer = DeviceSigner::from_secret(&[1; 32]);

    raw.expect_error(
        Request::FetchKeyPackage {
            account_id: AccountId::parse("AAAAAAAA").unwrap(),
            device: umbra_proto::DeviceId::FIRST,
            suites: vec![umbra_mls::Suite::default().code()],
        },
        ErrorCode::NotAuthenticated,
    )
    .await;
    let unknown = ActivationCode::parse("2222-3333-4444-5555").unwrap();
    let message = raw
        .expect_error(
            Request::Register {
                activation_code: unknown,
                identity_key: signer.identity_key(),
                signature: signer.sign_payload(&register_signing_payload(
                    &raw.nonce,
                    &signer.identity_key(),
                )),
            },
            ErrorCode::UnknownActivationCode,
        )
        .await;
    assert_eq!(message, "activation code is not known to this server");

    // A signature over the wrong nonce (a replayed registration).
    let code = server.code().await;
    let replayed = signer.sign_payload(&register_signing_payload(
        &Nonce::from_bytes([9; 32]),
        &signer.identity_key(),
    ));
    raw.expect_error(
        Request::Register {
            activation_code: code.clone(),
            identity_key: signer.identity_key(),
            signature: replayed,
        },
        ErrorCode::BadSignature,
    )
    .await;
    let Reply::Registered { account_id, .. } = raw.register(code.clone(), &signer).await.unwrap()
    else {
        panic!("registration failed");
    };
    raw.expect_error(
        Request::Login {
            account_id: account_id.clone(),
            device: umbra_proto::DeviceId::FIRST,
            signature: Signature::from_bytes([0; 64]),
        },
        ErrorCode::AlreadyAuthenticated,
    )
    .await;

    // The code is spent.
    let mut second = Raw::connect(&server).await;
    let other = DeviceSigner::from_secret(&[2; 32]);
    let error = second.register(code, &other).await.unwrap_err();
    assert_eq!(
        (error.code, error.message.as_str()),
        (
            ErrorCode::ActivationCodeUsed,
            "activation code already used"
        )
    );

    // Claims for an unknown account, and a forged login.
    second
        .expect_error(
            Request::Login {
                account_id: AccountId::parse("ZZZZZZZZ").unwrap(),
                device: umbra_proto::DeviceId::FIRST,
                signature: Signature::from_bytes([0; 64]),
            },
            // The same answer as a forged login: nobody learns from it
            // whether an account exists.
            ErrorCode::BadSignature,
        )
        .await;
    for unknown in [
        Request::Revoke {
            account_id: AccountId::parse("ZZZZZZZZ").unwrap(),
            signature: Signature::from_bytes([0; 64]),
        },
        Request::Wipe {
            account_id: AccountId::parse("ZZZZZZZZ").unwrap(),
            issued_at: 1,
            signature: Signature::from_bytes([0; 64]),
        },
    ] {
        second.expect_error(unknown, ErrorCode::BadSignature).await;
    }
    let forged = other.sign_payload(&login_signing_payload(&second.nonce, &account_id));
    second
        .expect_error(
            Request::Login {
                account_id: account_id.clone(),
                device: umbra_proto::DeviceId::FIRST,
                signature: forged,
            },
            ErrorCode::BadSignature,
        )
        .await;
    let genuine = signer.sign_payload(&login_signing_payload(&second.nonce, &account_id));
    assert!(matches!(
        second
            .call(Request::Login {
                account_id,
                device: umbra_proto::DeviceId::FIRST,
                signature: genuine,
            })
            .await,
        Ok(Reply::LoggedIn { .. })
    ));
}

#[tokio::test]
async fn stale_and_forged_commits_and_foreign_key_packages() {
    let server = Server::start().await;
    let mut raw = Raw::connect(&server).await;
    let signer = DeviceSigner::from_secret(&[3; 32]);
    let account_id = raw.registered(&server, &signer).await;

    let crypto = Crypto::default();
    let mut db = rusqlite::Connection::open_in_memory().unwrap();
    umbra_mls::init_storage(&mut db).unwrap();
    let provider = Provider::new(&crypto, &db);

    // A KeyPackage naming another account is refused.
    let stranger = AccountId::parse("SSSSSSSS").unwrap();
    let foreign =
        umbra_mls::new_key_package(&provider, &signer, &stranger, Default::default(), false)
            .unwrap();
    raw.expect_error(
        Request::UploadKeyPackages {
            key_packages: vec![foreign],
            last_resort: None,
        },
        ErrorCode::InvalidKeyPackage,
    )
    .await;
    raw.expect_error(
        Request::UploadKeyPackages {
            key_packages: vec![b"not a key package".to_vec()],
            last_resort: None,
        },
        ErrorCode::InvalidKeyPackage,
    )
    .await;

    let mut group =
        Group::create(&provider, &signer, &account_id, &GroupConfig::default(), 0).unwrap();
    let group_id = GroupId::new(group.id()).unwrap();
    let group_info = group.group_info(&provider, &signer).unwrap();
    assert_eq!(
        raw.call(Request::CreateGroup {
            group_id: group_id.clone(),
            group_info: group_info.clone(),
            delivery_key: None,
        })
        .await,
        Ok(Reply::Done)
    );
    raw.expect_error(
        Request::CreateGroup {
            group_id: group_id.clone(),
            group_info: group_info.clone(),
            delivery_key: None,
        },
        ErrorCode::GroupExists,
    )
    .await;
    let submission = |epoch, output: &umbra_mls::CommitOutput| {
        Request::SendCommit(CommitSubmission {
            group_id: group_id.clone(),
            epoch,
            commit: output.commit.clone(),
            welcome: None,
            group_info: output.group_info.clone(),
            delivery_key: None,
        })
    };
    // Someone outside the group is refused before anything is validated.
    let mut outsider = Raw::connect(&server).await;
    outsider
        .registered(&server, &DeviceSigner::from_secret(&[4; 32]))
        .await;
    let first = group.self_update(&provider, &signer).unwrap();
    outsider
        .expect_error(submission(0, &first), ErrorCode::NotAMember)
        .await;
    // Nor send into it, even a genuine message of the group: the server's
    // check, not a client's own, keeps an outsider out.
    let genuine = group.encrypt(&provider, &signer, b"overheard").unwrap();
    outsider
        .expect_error(
            Request::SendMessage {
                group_id: group_id.clone(),
                message: genuine,
                kind: umbra_proto::DeliveryKind::Application,
                ttl_seconds: 0,
            },
            ErrorCode::NotAMember,
        )
        .await;
    // Nor may it fetch the group's GroupInfo (to rejoin what it never was in).
    outsider
        .expect_error(
            Request::FetchGroupInfo {
                group_id: group_id.clone(),
            },
            ErrorCode::NotAMember,
        )
        .await;
    // A new group's GroupInfo carries its creator's leaf alone: anything
    // much larger (a tree padded with blank nodes) is refused unparsed.
    let padded = GroupId::new(vec![7; 16]).unwrap();
    let message = raw
        .expect_error(
            Request::CreateGroup {
                group_id: padded,
                group_info: vec![0; 64 * 1024],
                delivery_key: None,
            },
            ErrorCode::InvalidRequest,
        )
        .await;
    assert!(message.contains("fits in"), "{message}");
    // Declared epoch that does not match the MLS header.
    raw.expect_error(submission(5, &first), ErrorCode::InvalidCommit)
        .await;
    // A valid commit with a GroupInfo that is not the state it starts (the
    // group's epoch-0 one, or none): the GroupInfo kept for members who
    // must rejoin is always the group's current one.
    for wrong in [group_info.clone(), Vec::new()] {
        let stale = umbra_mls::CommitOutput {
            group_info: wrong,
            ..first.clone()
        };
        let message = raw
            .expect_error(submission(0, &stale), ErrorCode::InvalidCommit)
            .await;
        assert!(message.contains("GroupInfo"), "{message}");
    }
    assert_eq!(
        raw.call(submission(0, &first)).await,
        Ok(Reply::CommitAccepted { epoch: 1 })
    );
    // Retrying the same commit is answered as accepted, not applied twice.
    assert_eq!(
        raw.call(submission(0, &first)).await,
        Ok(Reply::CommitAccepted { epoch: 1 })
    );
    // A different commit for the epoch already taken.
    group.clear_pending_commit(&provider).unwrap();
    let second = group.self_update(&provider, &signer).unwrap();
    let error = raw.call(submission(0, &second)).await.unwrap_err();
    assert_eq!(
        (error.code, error.current_epoch),
        (ErrorCode::StaleEpoch, 1)
    );
    // A member's message from an epoch the group never reached (its own
    // fork, merged without the server) is refused: delivered, it would send
    // every other member looking for commits that do not exist (and have
    // them blame the server when it has none).
    group.merge_pending_commit(&provider).unwrap();
    group.self_update(&provider, &signer).unwrap();
    group.merge_pending_commit(&provider).unwrap();
    let ahead = group
        .encrypt(&provider, &signer, b"from the future")
        .unwrap();
    let error = raw
        .call(Request::SendMessage {
            group_id: group_id.clone(),
            message: ahead,
            kind: umbra_proto::DeliveryKind::Application,
            ttl_seconds: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(
        (error.code, error.current_epoch),
        (ErrorCode::InvalidRequest, 1),
        "{}",
        error.message
    );
    raw.alive().await;
}

#[tokio::test]
async fn shutdown_drains_and_stops() {
    let server = Server::start().await;
    let mut raw = Raw::connect(&server).await;
    raw.alive().await;
    server.shutdown.cancel();
    assert!(
        raw.next().await.is_none(),
        "the server closed the connection"
    );
    let refused = TcpStream::connect(server.address).await;
    assert!(refused.is_err(), "nothing listens after shutdown");
}

#[tokio::test]
async fn a_quiet_ack_is_answered_only_when_it_fails() {
    let server = Server::start().await;

    // Quiet does not silence a refusal.
    let mut stranger = Raw::connect(&server).await;
    let quiet_ack = |delivery_ids| Request::Ack {
        delivery_ids,
        quiet: true,
    };
    stranger
        .expect_error(quiet_ack(vec![1]), ErrorCode::NotAuthenticated)
        .await;

    let mut device = Raw::connect(&server).await;
    let signer = DeviceSigner::from_secret(&[5; 32]);
    let account_id = device.registered(&server, &signer).await;
    // A wipe command is the simplest delivery to put in a mailbox.
    let wiper = DeviceSigner::from_secret(&[6; 32]);
    let set_key = Request::SetWipeKey {
        wipe_key: wiper.identity_key(),
    };
    assert_eq!(device.call(set_key.clone()).await, Ok(Reply::Done));
    // Set once: the same key again is fine, another is refused (whoever
    // holds the account key must not swap the key wipes are checked with).
    assert_eq!(device.call(set_key).await, Ok(Reply::Done));
    device
        .expect_error(
            Request::SetWipeKey {
                wipe_key: DeviceSigner::from_secret(&[7; 32]).identity_key(),
            },
            ErrorCode::InvalidRequest,
        )
        .await;
    let wipe = |issued_at| Request::Wipe {
        account_id: account_id.clone(),
        issued_at,
        signature: wiper.sign_payload(&wipe_signing_payload(&account_id, issued_at)),
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    // (Each waits for its delivery: a newer command replaces one still
    // waiting in the mailbox.)
    let mut delivered = Vec::new();
    for issued_at in [now, now + 1] {
        assert_eq!(stranger.call(wipe(issued_at)).await, Ok(Reply::Done));
        loop {
            match device.next().await.expect("connection closed") {
                ServerMessage::Push(Push::Delivery(delivery)) => {
                    delivered.push(delivery.id);
                    break;
                }
                ServerMessage::Push(_) => {}
                other => panic!("expected deliveries, got {other:?}"),
            }
        }
    }
    // A command seen once cannot be replayed, nor an older or stale one.
    for replayed in [now + 1, now, now - 2 * 86_400] {
        stranger
            .expect_error(wipe(replayed), ErrorCode::StaleWipe)
            .await;
    }

    // Acknowledged quietly: the next response is the Ping's, so the Ack
    // had none, and (requests being handled in order) it was applied.
    device.send(quiet_ack(vec![delivered[0]])).await;
    let ping = device.send(Request::Ping).await;
    assert_eq!(device.response().await, Some((ping, Ok(Reply::Done))));

    // The loud kind is still answered.
    assert_eq!(
        device
            .call(Request::Ack {
                delivery_ids: vec![delivered[1]],
                quiet: false,
            })
            .await,
        Ok(Reply::Done)
    );

    // Both are gone: the next login pushes an empty backlog.
    drop(device);
    let mut again = Raw::connect(&server).await;
    again.login(&account_id, &signer).await;
    match again.next().await {
        Some(ServerMessage::Push(Push::Synced)) => {}
        other => panic!("expected an empty backlog, got {other:?}"),
    }
}

/// A message whose delivery would not fit in a frame the recipient accepts
/// (a frame of exactly the limit used to be accepted, and its delivery then
/// blocked the recipient's mailbox) is refused when sent.
#[tokio::test]
async fn a_message_too_large_to_deliver_is_refused() {
    let server = Server::start().await;
    let mut raw = Raw::connect(&server).await;
    raw.registered(&server, &DeviceSigner::from_secret(&[6; 32]))
        .await;
    let group_id = GroupId::new(vec![5; 16]).unwrap();
    let message = raw
        .expect_error(
            Request::SendMessage {
                group_id,
                message: vec![1; umbra_proto::MAX_DELIVERY_PAYLOAD + 1],
                kind: umbra_proto::DeliveryKind::Application,
                ttl_seconds: 0,
            },
            ErrorCode::FrameTooLarge,
        )
        .await;
    assert!(message.contains("can be delivered"), "{message}");
    raw.alive().await;
}

/// An unknown distributor number gets the answer a bad signature gets, so
/// an unauthenticated caller cannot list which distributors exist (it got
/// UNKNOWN_ACCOUNT before).
#[tokio::test]
async fn an_unknown_distributor_looks_like_a_bad_signature() {
    let server = Server::start().await;
    let mut raw = Raw::connect(&server).await;
    let signer = DeviceSigner::from_secret(&[11; 32]);
    let distributor_id = 4242;
    let signature = signer.sign_payload(&umbra_proto::distributor_login_payload(
        &raw.nonce,
        distributor_id,
    ));
    let message = raw
        .expect_error(
            Request::DistributorLogin {
                distributor_id,
                signature,
            },
            ErrorCode::BadSignature,
        )
        .await;
    assert_eq!(message, "distributor login signature does not verify");
    raw.alive().await;
}

/// The delivery IDs a device sees do not count what the server delivered
/// to others in between (they were one global sequence, so two IDs told a
/// device the server's traffic volume), and still acknowledge what they
/// stand for.
#[tokio::test]
async fn delivery_ids_do_not_reveal_other_accounts_traffic() {
    let server = Server::start().await;
    let wiper = DeviceSigner::from_secret(&[12; 32]);
    let mut watcher = Raw::connect(&server).await;
    let watcher_id = watcher
        .registered(&server, &DeviceSigner::from_secret(&[13; 32]))
        .await;
    let mut busy = Raw::connect(&server).await;
    let busy_id = busy
        .registered(&server, &DeviceSigner::from_secret(&[14; 32]))
        .await;
    for raw in [&mut watcher, &mut busy] {
        let set_key = Request::SetWipeKey {
            wipe_key: wiper.identity_key(),
        };
        assert_eq!(raw.call(set_key).await, Ok(Reply::Done));
    }
    // A wipe command is the simplest delivery to put in a mailbox.
    let wipe = |account_id: &AccountId, issued_at| Request::Wipe {
        account_id: account_id.clone(),
        issued_at,
        signature: wiper.sign_payload(&wipe_signing_payload(account_id, issued_at)),
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    // (Authenticated: before that, a connection has only a few requests.)
    let mut sender = Raw::connect(&server).await;
    sender
        .registered(&server, &DeviceSigner::from_secret(&[15; 32]))
        .await;
    let mut seen = Vec::new();
    for round in 0..2 {
        assert_eq!(
            sender.call(wipe(&watcher_id, now + round)).await,
            Ok(Reply::Done)
        );
        let id = loop {
            match watcher.next().await.expect("connection closed") {
                ServerMessage::Push(Push::Delivery(delivery)) => break delivery.id,
                _ => continue,
            }
        };
        seen.push(id);
        // Meanwhile the server delivers to someone else.
        for n in 0..5 {
            let issued_at = now + 10 * round + n;
            assert_eq!(
                sender.call(wipe(&busy_id, issued_at)).await,
                Ok(Reply::Done)
            );
        }
    }
    assert!(
        seen[0].abs_diff(seen[1]) > 1 << 40,
        "consecutive IDs {seen:?} count the deliveries in between"
    );
    // They acknowledge what they stand for: the next login pushes nothing.
    let ack = Request::Ack {
        delivery_ids: seen.clone(),
        quiet: false,
    };
    assert_eq!(watcher.call(ack).await, Ok(Reply::Done));
    drop(watcher);
    let mut again = Raw::connect(&server).await;
    again
        .login(&watcher_id, &DeviceSigner::from_secret(&[13; 32]))
        .await;
    match again.next().await {
        Some(ServerMessage::Push(Push::Synced)) => {}
        other => panic!("expected an empty backlog, got {other:?}"),
    }
}

/// A linked device whose own key was refused asks, with the account key,
/// whether its line ended. What it signs is never a login: not as device 1
/// (whose key the account key is) while the line lives, so a server shown
/// it cannot pass it on as one; once the line is revoked, it is answered.
#[tokio::test]
async fn asking_whether_a_line_ended_is_no_login() {
    let server = Server::start().await;
    let account_key = DeviceSigner::from_secret(&[21; 32]);
    let mut first = Raw::connect(&server).await;
    let account_id = first.registered(&server, &account_key).await;
    let ask = |raw: &Raw, device| Request::Login {
        account_id: account_id.clone(),
        device,
        signature: account_key.sign_payload(&umbra_proto::ended_login_signing_payload(
            &raw.nonce,
            &account_id,
        )),
    };
    for device in [umbra_proto::DeviceId::FIRST, umbra_proto::DeviceId(2)] {
        let mut raw = Raw::connect(&server).await;
        let request = ask(&raw, device);
        raw.expect_error(request, ErrorCode::BadSignature).await;
    }

    let revoke = Request::Revoke {
        account_id: account_id.clone(),
        signature: account_key.sign_payload(&umbra_proto::revoke_signing_payload(&account_id)),
    };
    assert_eq!(first.call(revoke).await, Ok(Reply::Done));
    let mut raw = Raw::connect(&server).await;
    let request = ask(&raw, umbra_proto::DeviceId(2));
    raw.expect_error(request, ErrorCode::LineRevoked).await;
}
