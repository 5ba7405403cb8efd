//! What the post-quantum key exchange costs a TLS handshake: one full TLS
//! 1.3 handshake between a client and the server's own configuration
//! (`umbra_server::tls::server_config`, its certificate as `init` makes
//! it, issued by its anchor), in
//! memory, with the hybrid group X25519MLKEM768 that devices offer first,
//! and with X25519 alone, as a client without ML-KEM gets. Both sides' CPU
//! is in the figure. Run with `cargo bench -p umbra-server --bench tls`.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
use rustls::{ClientConfig, ClientConnection, NamedGroup, ServerConfig, ServerConnection};

/// A client that trusts the server's anchor and offers only `group`.
fn client_config(cert: &CertificateDer<'static>, group: NamedGroup) -> Arc<ClientConfig> {
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider.kx_groups.retain(|kx| kx.name() == group);
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.clone()).expect("the server's certificate");
    Arc::new(
        ClientConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// One handshake, bytes passed back and forth in memory; the group agreed.
fn handshake(client: &Arc<ClientConfig>, server: &Arc<ServerConfig>) -> NamedGroup {
    let name = ServerName::try_from("localhost").expect("a name");
    let mut client = ClientConnection::new(Arc::clone(client), name).expect("a client");
    let mut server = ServerConnection::new(Arc::clone(server)).expect("a server");
    let mut wire = Vec::new();
    while client.is_handshaking() || server.is_handshaking() {
        wire.clear();
        while client.wants_write() {
            client.write_tls(&mut wire).expect("client writes");
        }
        let mut bytes = &wire[..];
        while !bytes.is_empty() {
            server.read_tls(&mut bytes).expect("server reads");
        }
        server.process_new_packets().expect("server handshake");
        wire.clear();
        while server.wants_write() {
            server.write_tls(&mut wire).expect("server writes");
        }
        let mut bytes = &wire[..];
        while !bytes.is_empty() {
            client.read_tls(&mut bytes).expect("client reads");
        }
        client.process_new_packets().expect("client handshake");
    }
    client
        .negotiated_key_exchange_group()
        .expect("a TLS 1.3 handshake agrees on a group")
        .name()
}

fn tls(c: &mut Criterion) {
    let dir = std::env::temp_dir().join(format!("umbra-tls-bench-{}", std::process::id()));
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    umbra_server::tls::generate(&cert, &key, vec!["localhost".into()]).expect("a certificate");
    let identity = umbra_server::tls::Identity::load(&cert, &key).expect("the certificate");
    let server = umbra_server::tls::server_config(identity).expect("the server's config");
    let der = CertificateDer::from_pem_file(dir.join(umbra_server::tls::ANCHOR_CERT))
        .expect("the anchor");
    let mut group = c.benchmark_group("tls_handshake");
    for kx in [NamedGroup::X25519MLKEM768, NamedGroup::X25519] {
        let client = client_config(&der, kx);
        assert_eq!(
            handshake(&client, &server),
            kx,
            "the group offered is agreed"
        );
        group.bench_function(format!("{kx:?}"), |bencher| {
            bencher.iter(|| black_box(handshake(&client, &server)));
        });
    }
    group.finish();
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, tls);
criterion_main!(benches);
