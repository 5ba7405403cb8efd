//! Disappearing messages: the timer is agreed in the group, each copy goes
//! at its time, and nothing readable is left, even to someone holding the
//! passphrase: the test decrypts every page of the store and its WAL.

mod common;

use std::sync::Arc;
use std::time::Duration;

use aes::cipher::{BlockDecryptMut, KeyIvInit, block_padding::NoPadding};
use common::{Device, TestServer, befriend};
use umbra_client::{ClientOptions, Event, ManualClock};

const PAGE: usize = 4096;
/// SQLCipher 4 keeps a 16-byte IV and a 64-byte HMAC at the end of a page.
const RESERVE: usize = 80;

/// The store key, derived as the device does from the passphrase.
fn store_key(home: &std::path::Path) -> [u8; 32] {
    let kdf: serde_json::Value =
        serde_json::from_slice(&std::fs::read(home.join("kdf.json")).unwrap()).unwrap();
    let params = &kdf["params"];
    let argon = argon2::Argon2::new(
        argon2::Algorithm::Argon2id,
        argon2::Version::V0x13,
        argon2::Params::new(
            params["memory_kib"].as_u64().unwrap() as u32,
            params["iterations"].as_u64().unwrap() as u32,
            params["parallelism"].as_u64().unwrap() as u32,
            Some(32),
        )
        .unwrap(),
    );
    let salt = hex::decode(kdf["salt"].as_str().unwrap()).unwrap();
    let mut key = [0u8; 32];
    argon
        .hash_password_into(b"correct horse battery staple", &salt, &mut key)
        .unwrap();
    key
}

/// Decrypts one SQLCipher page (AES-256-CBC, raw key, IV in the reserve).
fn decrypt_page(key: &[u8; 32], page: &[u8], first: bool) -> Vec<u8> {
    let start = if first { 16 } else { 0 };
    let iv = &page[PAGE - RESERVE..PAGE - RESERVE + 16];
    let mut data = page[start..PAGE - RESERVE].to_vec();
    cbc::Decryptor::<aes::Aes256>::new(key.into(), iv.into())
        .decrypt_padded_mut::<NoPadding>(&mut data)
        .unwrap();
    data
}

/// Every page the device's files hold, decrypted: the database, and each
/// frame of its WAL (old versions of pages included).
fn plaintext_pages(home: &std::path::Path) -> Vec<Vec<u8>> {
    let key = store_key(home);
    let mut pages = Vec::new();
    let db = std::fs::read(home.join("device.db")).unwrap();
    for (n, page) in db.chunks_exact(PAGE).enumerate() {
        pages.push(decrypt_page(&key, page, n == 0));
    }
    if let Ok(wal) = std::fs::read(home.join("device.db-wal")) {
        for frame in wal.get(32..).unwrap_or_default().chunks_exact(24 + PAGE) {
            let page_number = u32::from_be_bytes(frame[..4].try_into().unwrap());
            pages.push(decrypt_page(&key, &frame[24..], page_number == 1));
        }
    }
    pages
}

fn readable(home: &std::path::Path, text: &str) -> bool {
    plaintext_pages(home)
        .iter()
        .any(|page| page.windows(text.len()).any(|w| w == text.as_bytes()))
}

async fn device(server: &TestServer, clock: &ManualClock) -> Device {
    let options = ClientOptions {
        clock: Arc::new(clock.clone()),
        ..common::options()
    };
    Device::activate_with(&server.activation().await, options).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_disappear_on_time_and_leave_nothing_readable() {
    let server = TestServer::start().await;
    let clock = ManualClock::new(common::now());
    let mut alice = device(&server, &clock).await;
    let mut bob = device(&server, &clock).await;
    let (conversation, _) = befriend(&mut alice, &mut bob).await;
    // New conversations start at the default: 30 seconds.
    assert_eq!(
        bob.client
            .conversation(&conversation)
            .unwrap()
            .disappear_after,
        30
    );

    // Alice changes the timer; Bob's side follows, and says who did it.
    alice
        .client
        .set_disappearing(&conversation, Some(Duration::from_secs(60)))
        .await
        .unwrap();
    bob.wait_for(|e| match e {
        Event::ConversationChanged { conversation } if conversation.disappear_after == 60 => {
            Some(())
        }
        _ => None,
    })
    .await;
    let lines: Vec<String> = bob
        .client
        .history(&conversation, 20)
        .unwrap()
        .into_iter()
        .map(|m| m.body)
        .collect();
    assert!(
        lines.contains(&format!(
            "{} set messages to disappear after 1 minute",
            alice.id()
        )),
        "{lines:?}"
    );
    let refused = alice
        .client
        .set_disappearing(&conversation, Some(Duration::from_secs(2)))
        .await;
    assert!(refused.is_err(), "below 5 seconds is refused");

    let canary = "CANARY-burn-after-reading-4f9e2a";
    let sent = alice.client.send_text(&conversation, canary).await.unwrap();
    assert_eq!(sent.expires_at, Some(clock.now_secs() + 60));
    let (_, body) = bob.next_text().await;
    assert_eq!(body, canary);
    // Control: with the key, the pages do show it while it lives.
    assert!(readable(alice.home.path(), canary));
    assert!(readable(bob.home.path(), canary));

    // A minute on: the sender's copy goes; the recipient's waits until shown.
    clock.advance(61);
    assert_eq!(alice.client.expire_messages().unwrap(), 1);
    assert_eq!(bob.client.expire_messages().unwrap(), 0);
    let bobs = bob.client.history(&conversation, 50).unwrap();
    let copy = bobs.iter().find(|m| m.body == canary).unwrap();
    assert!(
        copy.expires_at.unwrap() > clock.now_secs() + 6 * 86_400,
        "not shown yet: only the week-long backstop applies"
    );
    bob.client.mark_shown(&[copy.id]).unwrap();
    clock.advance(59);
    assert_eq!(bob.client.expire_messages().unwrap(), 0);
    clock.advance(2);
    assert_eq!(bob.client.expire_messages().unwrap(), 1);

    for device in [&alice, &bob] {
        let history = device.client.history(&conversation, 50).unwrap();
        assert!(history.iter().all(|m| m.body != canary));
        assert!(
            !readable(device.home.path(), canary),
            "the expired plaintext must not survive in any page or WAL frame"
        );
    }
}

trait NowSecs {
    fn now_secs(&self) -> u64;
}

impl NowSecs for ManualClock {
    fn now_secs(&self) -> u64 {
        umbra_client::Clock::now(self)
    }
}
