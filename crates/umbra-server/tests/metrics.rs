//! The operator's metrics and health checks, on their own listener: they
//! count what happens (connections, requests and their time, refusals by
//! code) and name nobody.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use common::Raw;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use umbra_mls::DeviceSigner;
use umbra_proto::{ErrorCode, Request};
use umbra_server::{Config, ServerOptions};

/// One HTTP exchange with the metrics listener: the status line and body.
async fn get(address: SocketAddr, request: &str) -> (String, String) {
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(20),
        stream.read_to_string(&mut answer),
    )
    .await
    .expect("the metrics listener answers")
    .unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    (head.lines().next().unwrap().to_owned(), body.to_owned())
}

async fn metrics(address: SocketAddr) -> String {
    let (status, body) = get(address, "GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n").await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    body
}

/// The value of the sample `name` (with its labels, as written).
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .map(|value| value.trim().parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_happens_and_name_nobody() {
    let data = tempfile::tempdir().unwrap();
    umbra_server::init(data.path(), "127.0.0.1:0").unwrap();
    let mut config = Config::load(data.path()).unwrap();
    config.tls = false;
    config.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let bound = Arc::new(OnceLock::new());
    tokio::spawn(umbra_server::run(
        config,
        data.path().to_owned(),
        listener,
        shutdown.clone(),
        ServerOptions {
            metrics_bound: Some(Arc::clone(&bound)),
            ..ServerOptions::default()
        },
    ));
    let server = common::Server {
        address,
        data,
        shutdown,
    };
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    let metrics_at = loop {
        if let Some(address) = bound.get() {
            break *address;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no metrics listener"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    };

    let before = metrics(metrics_at).await;
    assert_eq!(sample(&before, "umbra_connections"), Some(0.0), "{before}");
    // Read from the store at the scrape: nothing waits yet, and the
    // embedded store's ack window is at its narrowest.
    assert_eq!(
        sample(&before, "umbra_mailbox_copies"),
        Some(0.0),
        "{before}"
    );
    assert_eq!(
        sample(&before, "umbra_mailbox_bytes"),
        Some(0.0),
        "{before}"
    );
    assert_eq!(
        sample(&before, "umbra_ack_window_seconds"),
        Some(umbra_store::ACK_WINDOW.as_secs_f64()),
        "{before}"
    );
    assert_eq!(
        sample(&before, "umbra_ack_window_copies"),
        Some(0.0),
        "{before}"
    );

    let mut device = Raw::connect(&server).await;
    let signer = DeviceSigner::from_secret(&[5; 32]);
    let account = device.registered(&server, &signer).await;
    let mut stranger = Raw::connect(&server).await;
    stranger
        .expect_error(
            Request::LookupAccount {
                account_id: account.clone(),
            },
            ErrorCode::NotAuthenticated,
        )
        .await;

    let after = metrics(metrics_at).await;
    assert_eq!(sample(&after, "umbra_connections"), Some(2.0), "{after}");
    assert_eq!(
        sample(
            &after,
            r#"umbra_request_errors_total{code="NotAuthenticated"}"#
        ),
        Some(1.0),
        "{after}"
    );
    assert_eq!(
        sample(&after, r#"umbra_request_seconds_count{request="Register"}"#),
        Some(1.0),
        "{after}"
    );
    assert_eq!(sample(&after, "umbra_messages_accepted_total"), Some(0.0));
    assert!(
        !after.contains(account.as_str()),
        "no account in the metrics"
    );
    assert!(!after.contains("127.0.0.1"), "no address in the metrics");

    drop(stranger);
    drop(device);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let now = metrics(metrics_at).await;
        if sample(&now, "umbra_connections") == Some(0.0) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "closed connections are not counted: {now}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }

    assert_eq!(
        get(metrics_at, "GET /health HTTP/1.1\r\n\r\n").await,
        ("HTTP/1.1 200 OK".to_owned(), "ok\n".to_owned())
    );
    assert_eq!(
        get(metrics_at, "GET /ready HTTP/1.1\r\n\r\n").await.0,
        "HTTP/1.1 200 OK"
    );
    assert_eq!(
        get(metrics_at, "GET /accounts HTTP/1.1\r\n\r\n").await.0,
        "HTTP/1.1 404 Not Found"
    );
    assert_eq!(
        get(metrics_at, "POST /metrics HTTP/1.1\r\n\r\n").await.0,
        "HTTP/1.1 405 Method Not Allowed"
    );
    assert_eq!(
        get(metrics_at, "\x16\x03\x01 not http\r\n\r\n").await.0,
        "HTTP/1.1 400 Bad Request"
    );
    // The devices' port is untouched by all of it.
    let mut again = Raw::connect(&server).await;
    again.alive().await;
}
