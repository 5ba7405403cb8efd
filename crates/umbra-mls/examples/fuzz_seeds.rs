//! Writes the fuzz targets' seed corpus: valid frames, MLS objects and
//! strings, so that fuzzing starts past the first parse and reaches the
//! deep paths (a KeyPackage's signature and extensions, a commit's
//! GroupInfo and tree).
//!
//! `cargo run -p umbra-mls --example fuzz_seeds -- fuzz/seeds` (replaces the
//! files it writes; the objects carry fresh keys each time).

use std::path::{Path, PathBuf};

use umbra_mls::{Crypto, DeviceSigner, Group, GroupConfig, Provider};
use umbra_proto::content::{Body, Content};
use umbra_proto::frame::{CommitSubmission, Delivery};
use umbra_proto::{
    AccountId, ClientFrame, DeliveryKind, ErrorCode, ErrorReply, GroupId, Nonce, Push, Reply,
    Request, ServerMessage, Signature, encode_client, encode_server,
};

type Error = Box<dyn std::error::Error>;

fn write(dir: &Path, target: &str, name: &str, bytes: &[u8]) -> Result<(), Error> {
    let dir = dir.join(target);
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join(name), bytes)?;
    Ok(())
}

fn main() -> Result<(), Error> {
    let out = PathBuf::from(
        std::env::args()
            .nth(1)
            .ok_or("usage: fuzz_seeds DIRECTORY (fuzz/seeds)")?,
    );
    let config = GroupConfig::default();
    let crypto = Crypto::default();
    let member = |seed: u8, id: &str| -> Result<_, Error> {
        let mut db = rusqlite::Connection::open_in_memory()?;
        umbra_mls::init_storage(&mut db)?;
        Ok((
            DeviceSigner::from_secret(&[seed; 32]),
            AccountId::parse(id)?,
            db,
        ))
    };
    let (alice_signer, alice, alice_db) = member(1, "AAAAAAAA")?;
    let (bob_signer, bob, bob_db) = member(2, "BBBBBBBB")?;
    let (alice_p, bob_p) = (
        Provider::new(&crypto, &alice_db),
        Provider::new(&crypto, &bob_db),
    );

    let key_package = umbra_mls::new_key_package(&bob_p, &bob_signer, &bob, config.suite, false)?;
    let last_resort = umbra_mls::new_key_package(&bob_p, &bob_signer, &bob, config.suite, true)?;
    let mut group = Group::create(&alice_p, &alice_signer, &alice, &config, 30)?;
    let created_info = group.group_info(&alice_p, &alice_signer)?;
    let added = group.add_members(&alice_p, &alice_signer, std::slice::from_ref(&key_package))?;
    group.merge_pending_commit(&alice_p)?;
    let welcome = added.welcome.clone().ok_or("no Welcome")?;
    let application = group.encrypt(&alice_p, &alice_signer, b"hello")?;
    let update = group.self_update(&alice_p, &alice_signer)?;

    let mls = [
        ("key_package", &key_package),
        ("last_resort", &last_resort),
        ("group_info", &created_info),
        ("commit", &added.commit),
        ("commit_group_info", &added.group_info),
        ("welcome", &welcome),
        ("application", &application),
        ("update", &update.commit),
    ];
    for (name, bytes) in mls {
        write(&out, "mls_relay", name, bytes)?;
        let mut raw = vec![0xff];
        raw.extend_from_slice(bytes);
        write(&out, "device_mls", name, &raw)?;
    }
    // The device target's own messages, untouched and lightly changed.
    for template in 0u8..5 {
        write(
            &out,
            "device_mls",
            &format!("template_{template}"),
            &[template],
        )?;
        write(
            &out,
            "device_mls",
            &format!("edited_{template}"),
            &[template, 0, 60, 1],
        )?;
    }

    let group_id = GroupId::new(group.id())?;
    let frames = [
        (
            "login",
            Request::Login {
                account_id: alice.clone(),
                device: umbra_proto::DeviceId::FIRST,
                signature: Signature::from_slice(&[7; 64])?,
            },
        ),
        (
            "upload",
            Request::UploadKeyPackages {
                key_packages: vec![key_package.clone()],
                last_resort: Some(last_resort.clone()),
            },
        ),
        (
            "create_group",
            Request::CreateGroup {
                group_id: group_id.clone(),
                group_info: created_info.clone(),
                delivery_key: Some([3; 32]),
            },
        ),
        (
            "commit",
            Request::SendCommit(CommitSubmission {
                group_id: group_id.clone(),
                epoch: 0,
                commit: added.commit.clone(),
                welcome: Some(welcome.clone()),
                group_info: added.group_info.clone(),
                delivery_key: Some([4; 32]),
            }),
        ),
        (
            "anonymous",
            Request::SendAnonymous(umbra_proto::AnonymousMessage {
                group_id: group_id.clone(),
                message: application.clone(),
                ttl_seconds: 30,
                signature: [5; 64],
                token: umbra_proto::tokens::SendToken {
                    key_id: [6; 32],
                    nonce: [7; 32],
                    authenticator: [8; 64],
                },
            }),
        ),
        (
            "tokens",
            Request::IssueTokens {
                blinded: vec![vec![9; 32]; 3],
            },
        ),
        (
            "message",
            Request::SendMessage {
                group_id: group_id.clone(),
                message: application.clone(),
                kind: DeliveryKind::Application,
                ttl_seconds: 30,
            },
        ),
        (
            "ack",
            Request::Ack {
                delivery_ids: vec![1, 2, 3],
                quiet: true,
            },
        ),
    ];
    for (name, request) in frames {
        write(
            &out,
            "client_frame",
            name,
            &encode_client(&ClientFrame { id: 1, request }),
        )?;
    }

    let delivery = |kind, payload: &[u8]| {
        ServerMessage::Push(Push::Delivery(Delivery {
            id: 7,
            sender: Some(alice.clone()),
            kind,
            group_id: Some(group_id.clone()),
            payload: payload.to_vec(),
            sent_at: 1_800_000_000,
        }))
    };
    let pushes = [
        (
            "hello",
            ServerMessage::Push(Push::Hello {
                protocol_version: 1,
                nonce: Nonce::from_bytes([3; 32]),
                server_time: 1_800_000_000,
                max_frame_bytes: 1 << 20,
                token_keys: vec![[4; 32]],
            }),
        ),
        ("welcome", delivery(DeliveryKind::Welcome, &welcome)),
        ("commit", delivery(DeliveryKind::Commit, &update.commit)),
        (
            "application",
            delivery(DeliveryKind::Application, &application),
        ),
        ("synced", ServerMessage::Push(Push::Synced)),
        (
            "stale",
            ServerMessage::Response {
                id: 4,
                result: Err(ErrorReply::new(ErrorCode::StaleEpoch, "stale")),
            },
        ),
        (
            "group_info",
            ServerMessage::Response {
                id: 5,
                result: Ok(Reply::GroupInfo {
                    group_info: update.group_info.clone(),
                }),
            },
        ),
    ];
    for (name, message) in pushes {
        write(&out, "server_frame", name, &encode_server(&message))?;
    }

    let contents = [
        ("text", Body::Text("hello ✓".into())),
        ("group_name", Body::GroupName("Night shift".into())),
        (
            "receipt",
            Body::Receipt {
                kind: umbra_proto::content::ReceiptKind::Read,
                message_ids: vec![[9; 16]],
            },
        ),
    ];
    for (name, body) in contents {
        let content = Content {
            body,
            message_id: Some([4; 16]),
            disappear_after: 30,
            sent_at_ms: 1_800_000_000_000,
        };
        write(&out, "content", name, &content.encode())?;
    }

    let pin = "3f".repeat(32);
    // Seeds that do not parse would start the fuzzer at the first check.
    let check = |text: &str, parses: bool| -> Result<(), Error> {
        if parses {
            Ok(())
        } else {
            Err(format!("the seed {text:?} does not parse").into())
        }
    };
    let activation = format!("umbra://chat.example:7443/K7QD-9XPM-2HVA-RT4N?pin={pin}");
    check(
        &activation,
        activation.parse::<umbra_proto::ActivationString>().is_ok(),
    )?;
    let wipe = format!(
        "umbra-wipe://chat.example:7443/AAAAAAAA/3fa0-91c2-0000-1111-2222-3333-4444-5555?pin={pin}"
    );
    check(&wipe, wipe.parse::<umbra_proto::WipeCode>().is_ok())?;
    let distributor = format!(
        "umbra-distributor://chat.example:7443/3/{}?pin={pin}",
        "ab".repeat(32)
    );
    check(
        &distributor,
        distributor
            .parse::<umbra_proto::DistributorCredential>()
            .is_ok(),
    )?;
    write(
        &out,
        "activation_string",
        "activation",
        activation.as_bytes(),
    )?;
    write(
        &out,
        "activation_string",
        "ipv6",
        format!("umbra://[::1]:7443/K7QD9XPM2HVART4N?pin={pin}").as_bytes(),
    )?;
    write(&out, "device_strings", "wipe_code", wipe.as_bytes())?;
    write(
        &out,
        "device_strings",
        "distributor",
        format!(
            "umbra-distributor://chat.example:7443/3/{}?pin={pin}",
            "ab".repeat(32)
        )
        .as_bytes(),
    )?;
    println!("seeds written under {}", out.display());
    Ok(())
}
