//! The server's TLS certificate rotated under devices' feet: devices
//! pinned the server's anchor at activation, and accept any certificate it
//! issued while that certificate is valid. Over the real server process,
//! rotated by the real `admin rotate-tls` and SIGHUP.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Device, PATIENCE, befriend};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime, pem::PemObject};
use rustls::{DigitallySignedStruct, SignatureScheme};
use umbra_client::{ClientError, DeliveryState};

/// Accepts any certificate and keeps the end-entity one: what the server
/// presents to a new connection, read from outside.
#[derive(Debug)]
struct Recorder {
    seen: Mutex<Option<Vec<u8>>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for Recorder {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        *self.seen.lock().unwrap() = Some(end_entity.to_vec());
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The end-entity certificate the server at `address` presents now.
async fn presented(address: SocketAddr) -> Vec<u8> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let recorder = Arc::new(Recorder {
        seen: Mutex::default(),
        provider: Arc::clone(&provider),
    });
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::clone(&recorder) as Arc<dyn ServerCertVerifier>)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(address).await.unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    recorder.seen.lock().unwrap().take().unwrap()
}

/// The end-entity certificate in the data directory's chain file.
fn on_disk(data: &std::path::Path) -> Vec<u8> {
    CertificateDer::pem_file_iter(data.join("tls/cert.pem"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_certificate_reaches_devices_online_and_offline_under_their_first_pin() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::ServerProcess::start(&dir.path().join("server"), None).await;
    let first_activation = server.activation().await;
    let mut alice = Device::activate_untimed(&first_activation, common::options()).await;
    let mut bob = Device::activate_untimed(&server.activation().await, common::options()).await;
    let (conversation, _) = befriend(&mut alice, &mut bob).await;
    // Bob's device is closed through the rotation; Alice's stays online.
    let bob = bob.reopen_offline();
    let old = presented(server.address).await;
    assert_eq!(old, on_disk(&server.data));

    let printed = server.command(&["admin", "rotate-tls", "--days", "30"]);
    assert!(printed.contains("cert.pem"), "{printed}");
    let new = on_disk(&server.data);
    assert_ne!(new, old, "a new certificate on disk");
    // The running server presents what it read at start until told.
    assert_eq!(presented(server.address).await, old);
    server.signal("HUP");
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while presented(server.address).await != new {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the server never presented the rotated certificate"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Alice's connection made before the rotation goes on.
    let sent = alice
        .client
        .send_text(&conversation, "over the old connection")
        .await
        .unwrap();
    assert_eq!(sent.state, DeliveryState::Sent);
    // A new connection of hers meets the new certificate and takes it.
    alice.client.disconnect();
    alice.client.connect().await.unwrap();
    let sent = alice
        .client
        .send_text(&conversation, "over a new connection")
        .await
        .unwrap();
    assert_eq!(sent.state, DeliveryState::Sent);
    // Bob's device, closed throughout, opens and is served.
    let mut bob = bob.reopen().await;
    bob.client.sync().await.unwrap();
    assert_eq!(bob.next_text().await.1, "over the old connection");
    assert_eq!(bob.next_text().await.1, "over a new connection");
    // New devices pin what the first ones pinned.
    let later = server.activation().await;
    assert_eq!(later.pin, first_activation.pin);
    let carol = Device::activate_untimed(&later, common::options()).await;
    carol.client.sync().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_certificate_is_refused_and_the_device_is_told_to_check_its_clock() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("server");
    umbra_server::init(&data, "127.0.0.1:0").unwrap();
    let now = common::now();
    // Issued by the pinned anchor, but ten days ago for one day.
    umbra_server::tls::rotate(
        &data.join("tls/cert.pem"),
        &data.join("tls/key.pem"),
        None,
        umbra_server::tls::names_for("127.0.0.1:0"),
        1,
        now - 10 * 86_400,
    )
    .unwrap();
    let server = common::TestServer::start_in(&data, "127.0.0.1:0".parse().unwrap()).await;
    let home = tempfile::tempdir().unwrap();
    let refused = umbra_client::Client::activate(
        home.path(),
        &common::passphrase(),
        &server.activation().await,
        common::options(),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(refused, ClientError::CertificateOutOfDate),
        "{refused}"
    );
    assert!(refused.to_string().contains("clock"), "{refused}");
    assert!(!umbra_client::device_exists(home.path()));

    // Rotated properly and read again: the same activation goes through.
    umbra_server::tls::rotate(
        &data.join("tls/cert.pem"),
        &data.join("tls/key.pem"),
        None,
        umbra_server::tls::names_for("127.0.0.1:0"),
        30,
        now,
    )
    .unwrap();
    server.reload_tls.notify_one();
    let activation = server.activation().await;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let home = tempfile::tempdir().unwrap();
        match umbra_client::Client::activate(
            home.path(),
            &common::passphrase(),
            &activation,
            common::options(),
        )
        .await
        {
            Ok(_) => break,
            Err(ClientError::CertificateOutOfDate) => {
                assert!(tokio::time::Instant::now() < deadline, "never read again");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(other) => panic!("{other}"),
        }
    }
}
