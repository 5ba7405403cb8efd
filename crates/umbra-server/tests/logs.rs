//! What the server writes to its log at info level (the default) carries
//! no account ID: registering, a relayed wipe command and a revocation are
//! logged as events, the accounts they concern only at debug level.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};

use common::{Raw, Server};
use umbra_mls::DeviceSigner;
use umbra_proto::{Reply, Request, revoke_signing_payload, wipe_signing_payload};

/// Everything the subscriber writes, kept for the test to read.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn info_logs_name_no_account_and_no_address() {
    // The one test in this binary: the subscriber is global, so it sees
    // the server's tasks on every thread.
    let captured = Captured::default();
    let writer = captured.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::INFO)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .init();

    let server = Server::start().await;
    let mut device = Raw::connect(&server).await;
    let signer = DeviceSigner::from_secret(&[5; 32]);
    let account = device.registered(&server, &signer).await;
    let port = device.ws.get_ref().local_addr().unwrap().port();
    let wiper = DeviceSigner::from_secret(&[6; 32]);
    let set_key = Request::SetWipeKey {
        wipe_key: wiper.identity_key(),
    };
    assert_eq!(device.call(set_key).await, Ok(Reply::Done));
    let mut stranger = Raw::connect(&server).await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let wipe = Request::Wipe {
        account_id: account.clone(),
        issued_at: now,
        signature: wiper.sign_payload(&wipe_signing_payload(&account, now)),
    };
    assert_eq!(stranger.call(wipe).await, Ok(Reply::Done));
    let revoke = Request::Revoke {
        account_id: account.clone(),
        signature: signer.sign_payload(&revoke_signing_payload(&account)),
    };
    assert_eq!(stranger.call(revoke).await, Ok(Reply::Done));

    let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    for event in ["account registered", "wipe command relayed", "line revoked"] {
        assert!(text.contains(event), "{event} was not logged:\n{text}");
    }
    assert!(
        !text.contains(account.as_str()),
        "the account ID is in the info log:\n{text}"
    );
    assert!(
        !text.contains(&format!(":{port}")),
        "the device's address is in the info log:\n{text}"
    );
}
