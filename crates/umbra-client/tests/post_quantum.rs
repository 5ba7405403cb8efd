//! Post-quantum by default: conversations use the hybrid MLS suite
//! (ML-KEM-768 with X25519) when every device in them offers it, fall back
//! to the classical suite when one does not, and the connection to the
//! server negotiates the hybrid TLS key exchange X25519MLKEM768.

mod common;

use std::sync::Arc;

use common::{Device, TestServer, befriend, options};
use rustls::NamedGroup;
use rustls::pki_types::ServerName;
use umbra_client::{ClientOptions, ConversationId, Suite};

const POST_QUANTUM: Suite = Suite::MlKem768X25519Aes128GcmEd25519;

/// A device that offers only the classical suite, as one from before the
/// post-quantum suite came does.
fn classical_only() -> ClientOptions {
    let mut options = options();
    options.group.suite = Suite::CLASSICAL;
    options
}

fn suite_of(device: &Device, conversation: &ConversationId) -> Option<Suite> {
    device.client.conversation(conversation).unwrap().suite
}

/// A verifier for a test that only reads the key exchange: it takes any
/// certificate (devices pin theirs; see `pinned_tls_config`).
#[derive(Debug)]
struct AnyCertificate;

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &rustls::pki_types::CertificateDer<'_>,
        _dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _message: &[u8],
        _cert: &rustls::pki_types::CertificateDer<'_>,
        _dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::aws_lc_rs::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The TLS group a client configured with `config` negotiates with the
/// server.
async fn negotiated_group(server: &TestServer, config: rustls::ClientConfig) -> NamedGroup {
    let tcp = tokio::net::TcpStream::connect(server.address)
        .await
        .unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = ServerName::try_from("umbra.invalid").unwrap();
    let tls = connector.connect(name, tcp).await.unwrap();
    tls.get_ref()
        .1
        .negotiated_key_exchange_group()
        .expect("a TLS 1.3 handshake has a key exchange group")
        .name()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_to_the_server_is_post_quantum_and_takes_a_classical_client_too() {
    let server = TestServer::start().await;
    let pin = server.activation().await.pin;
    let devices = umbra_client::pinned_tls_config(pin).unwrap();
    assert_eq!(
        negotiated_group(&server, devices).await,
        NamedGroup::X25519MLKEM768,
        "a device and the server agree on the hybrid key exchange"
    );

    // A client without ML-KEM (X25519 alone) still connects, classically.
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider
        .kx_groups
        .retain(|group| group.name() == NamedGroup::X25519);
    let classical = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate))
        .with_no_client_auth();
    assert_eq!(
        negotiated_group(&server, classical).await,
        NamedGroup::X25519
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conversations_are_post_quantum_when_every_device_offers_it() {
    let server = TestServer::start().await;
    let mut alice = Device::activate(&server).await;
    let mut bob = Device::activate(&server).await;
    let mut carol = Device::activate(&server).await;
    let (direct, _) = befriend(&mut alice, &mut bob).await;
    assert_eq!(suite_of(&alice, &direct), Some(POST_QUANTUM));
    assert_eq!(suite_of(&bob, &direct), Some(POST_QUANTUM));
    alice
        .client
        .send_text(&direct, "over ML-KEM")
        .await
        .unwrap();
    assert_eq!(bob.next_text().await.1, "over ML-KEM");
    bob.client.send_text(&direct, "and back").await.unwrap();
    assert_eq!(alice.next_text().await.1, "and back");

    befriend(&mut alice, &mut carol).await;
    let group = alice
        .client
        .create_group("quantum-safe", &[bob.id(), carol.id()])
        .await
        .unwrap();
    assert_eq!(suite_of(&alice, &group), Some(POST_QUANTUM));
    alice
        .client
        .send_text(&group, "to the group")
        .await
        .unwrap();
    for member in [&mut bob, &mut carol] {
        assert_eq!(member.next_text().await.1, "to the group");
        assert_eq!(suite_of(member, &group), Some(POST_QUANTUM));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_classical_device_makes_its_conversations_classical() {
    let server = TestServer::start().await;
    let mut alice = Device::activate(&server).await;
    let mut bob = Device::activate(&server).await;
    let activation = server.activation().await;
    let mut old = Device::activate_untimed(&activation, classical_only()).await;

    // Alice (post-quantum) starts the conversation with the old device: her
    // first fetch finds no hybrid KeyPackage there, so she falls back.
    let (with_old, _) = befriend(&mut old, &mut alice).await;
    assert_eq!(suite_of(&alice, &with_old), Some(Suite::CLASSICAL));
    assert_eq!(suite_of(&old, &with_old), Some(Suite::CLASSICAL));
    alice
        .client
        .send_text(&with_old, "classical")
        .await
        .unwrap();
    assert_eq!(old.next_text().await.1, "classical");
    old.client
        .send_text(&with_old, "still works")
        .await
        .unwrap();
    assert_eq!(alice.next_text().await.1, "still works");

    // The old device starts one: it asks for classical packages only.
    let (old_bob, _) = befriend(&mut bob, &mut old).await;
    assert_eq!(suite_of(&bob, &old_bob), Some(Suite::CLASSICAL));

    // A group with the old device is classical; one without it is not.
    let (alice_bob, _) = befriend(&mut alice, &mut bob).await;
    assert_eq!(suite_of(&alice, &alice_bob), Some(POST_QUANTUM));
    let mixed = alice
        .client
        .create_group("mixed", &[bob.id(), old.id()])
        .await
        .unwrap();
    assert_eq!(suite_of(&alice, &mixed), Some(Suite::CLASSICAL));
    alice.client.send_text(&mixed, "everyone").await.unwrap();
    assert_eq!(bob.next_text().await.1, "everyone");
    assert_eq!(old.next_text().await.1, "everyone");

    // A post-quantum group cannot take the old device later: it has no
    // KeyPackage of the group's suite, and says so.
    let group = alice
        .client
        .create_group("pq only", &[bob.id()])
        .await
        .unwrap();
    assert_eq!(suite_of(&alice, &group), Some(POST_QUANTUM));
    let refused = alice.client.add_members(&group, &[old.id()]).await;
    assert!(
        refused.as_ref().is_err_and(|error| error
            .to_string()
            .contains("no KeyPackage of the suites asked for")),
        "{refused:?}"
    );
    assert_eq!(alice.client.conversation(&group).unwrap().members.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_quantum_group_of_a_hundred() {
    const MEMBERS: usize = 100;
    let server = TestServer::start_configured(|config| {
        config.contact_requests_per_hour = 1000;
    })
    .await;
    let mut hub = Device::activate(&server).await;
    let mut friends = Vec::with_capacity(MEMBERS - 1);
    for _ in 1..MEMBERS {
        let mut friend = Device::activate(&server).await;
        befriend(&mut hub, &mut friend).await;
        friends.push(friend);
    }
    let ids: Vec<_> = friends.iter().map(Device::id).collect();
    let group = hub.client.create_group("hundred", &ids).await.unwrap();
    let conversation = hub.client.conversation(&group).unwrap();
    assert_eq!(conversation.suite, Some(POST_QUANTUM));
    assert_eq!(conversation.members.len(), MEMBERS);
    hub.client.send_text(&group, "to a hundred").await.unwrap();
    for friend in &mut friends {
        // Ninety-nine devices process the Welcome of a hundred-leaf
        // post-quantum tree at once, on two cores beside other tests.
        let message = friend
            .wait_for_within(std::time::Duration::from_secs(90), |event| match event {
                umbra_client::Event::MessageReceived { message }
                    if message.direction == umbra_client::Direction::In =>
                {
                    Some(message.clone())
                }
                _ => None,
            })
            .await;
        assert_eq!(message.body, "to a hundred");
        assert_eq!(message.conversation, group);
        assert_eq!(suite_of(friend, &group), Some(POST_QUANTUM));
    }
    // Meanwhile ninety-nine devices answer with receipts and replenish
    // their post-quantum KeyPackages, which the server checks one by one:
    // on two cores a request may wait out its 30 s limit. Sent again then,
    // as a user would (a copy that was stored after all arrives first).
    let last = friends.last_mut().unwrap();
    let mut attempts = 0;
    loop {
        match last.client.send_text(&group, "and one back").await {
            Ok(_) => break,
            Err(umbra_client::ClientError::Timeout(_)) if attempts < 3 => attempts += 1,
            Err(error) => panic!("{error}"),
        }
    }
    let answer = hub
        .wait_for_within(std::time::Duration::from_secs(90), |event| match event {
            umbra_client::Event::MessageReceived { message }
                if message.direction == umbra_client::Direction::In =>
            {
                Some(message.body.clone())
            }
            _ => None,
        })
        .await;
    assert_eq!(answer, "and one back");
}

/// A server that hands out a device's classical package when its
/// post-quantum ones were asked for first, though the device's packages say
/// it offers them, would have the conversation made classical: the device
/// reports it and creates nothing. A package of a suite not asked for at
/// all is refused the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_withholds_post_quantum_packages_is_caught() {
    use umbra_client::{ClientError, Event};
    let server = TestServer::start().await;
    let mut alice = Device::activate(&server).await;
    let bob = Device::activate(&server).await;
    bob.client.add_contact(&alice.id()).await.unwrap();
    alice
        .wait_for(|e| matches!(e, Event::ContactRequest { .. }).then_some(()))
        .await;
    // Bob stays away, so he uploads nothing meanwhile.
    let bob = bob.reopen_offline();

    // The operator deletes Bob's post-quantum packages.
    let (data, address, store, _dir) = server.seize();
    drop(store);
    let withhold = |data: &std::path::Path| {
        let db = rusqlite::Connection::open(data.join("umbra.db")).unwrap();
        for table in ["key_packages", "last_resort_key_packages"] {
            db.execute(
                &format!("DELETE FROM {table} WHERE account_id = ?1 AND suite = ?2"),
                rusqlite::params![bob.id().as_str(), POST_QUANTUM.code()],
            )
            .unwrap();
        }
    };
    withhold(&data);
    let server = TestServer::start_in(&data, address).await;
    let mut alice = alice.reopen().await;
    let refused = alice.client.accept_contact(&bob.id()).await;
    assert!(
        matches!(&refused, Err(ClientError::Downgraded(account)) if *account == bob.id()),
        "{refused:?}"
    );
    alice
        .wait_for(|e| matches!(e, Event::ServerMisbehaved { .. }).then_some(()))
        .await;
    assert!(alice.client.conversations().unwrap().is_empty());

    // It plants a package of a suite nobody asked for under the
    // post-quantum one.
    let (data, address, store, _dir) = server.seize();
    let mut db = rusqlite::Connection::open_in_memory().unwrap();
    umbra_mls::init_storage(&mut db).unwrap();
    let crypto = umbra_mls::Crypto::default();
    let planted = umbra_mls::new_key_package(
        &umbra_mls::Provider::new(&crypto, &db),
        &umbra_mls::DeviceSigner::from_secret(&[9; 32]),
        &bob.id(),
        Suite::X25519Aes128GcmEd25519,
        false,
    )
    .unwrap();
    use umbra_store::KeyPackages as _;
    store
        .add_key_packages(
            &bob.id(),
            umbra_proto::DeviceId::FIRST,
            POST_QUANTUM.code(),
            vec![planted],
            None,
        )
        .await
        .unwrap();
    drop(store);
    let _server = TestServer::start_in(&data, address).await;
    let mut alice = alice.reopen().await;
    // Accepting again starts the conversation that failed.
    let started = alice.client.accept_contact(&bob.id()).await;
    assert!(
        matches!(&started, Err(ClientError::WrongSuite(account)) if *account == bob.id()),
        "{started:?}"
    );
    alice
        .wait_for(|e| matches!(e, Event::ServerMisbehaved { .. }).then_some(()))
        .await;
    assert!(alice.client.conversations().unwrap().is_empty());
}
