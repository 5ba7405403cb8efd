//! The server's TLS identity: a self-signed certificate made at `init`,
//! pinned by clients through the fingerprint in activation strings.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use umbra_proto::CertFingerprint;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot generate a certificate: {0}")]
    Generate(String),
    #[error("cannot read {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("TLS configuration rejected: {0}")]
    Config(String),
}

/// Writes a new self-signed certificate and key for `names` (PEM), the key
/// readable by the owner only. Returns the certificate's fingerprint.
pub fn generate(cert: &Path, key: &Path, names: Vec<String>) -> Result<CertFingerprint, TlsError> {
    let certified =
        rcgen::generate_simple_self_signed(names).map_err(|e| TlsError::Generate(e.to_string()))?;
    for path in [cert, key] {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| TlsError::Generate(e.to_string()))?;
        }
    }
    std::fs::write(cert, certified.cert.pem()).map_err(|e| TlsError::Generate(e.to_string()))?;
    write_private(key, certified.signing_key.serialize_pem().as_bytes())
        .map_err(|e| TlsError::Generate(e.to_string()))?;
    Ok(CertFingerprint::of_der(certified.cert.der()))
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    options.mode(0o600);
    options.open(path)?.write_all(bytes)
}

fn read_error(path: &Path, error: impl std::fmt::Display) -> TlsError {
    TlsError::Read {
        path: path.display().to_string(),
        reason: error.to_string(),
    }
}

/// The fingerprint of the certificate in `cert` (PEM).
pub fn fingerprint(cert: &Path) -> Result<CertFingerprint, TlsError> {
    let der = CertificateDer::from_pem_file(cert).map_err(|e| read_error(cert, e))?;
    Ok(CertFingerprint::of_der(&der))
}

/// A rustls server configuration: TLS 1.3 only, with aws-lc-rs's provider,
/// which prefers the hybrid post-quantum key exchange X25519MLKEM768 and
/// takes X25519 alone from a client that lacks it.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let chain = vec![CertificateDer::from_pem_file(cert).map_err(|e| read_error(cert, e))?];
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| read_error(key, e))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .map_err(|e| TlsError::Config(e.to_string()))?
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .map_err(|e| TlsError::Config(e.to_string()))?;
    Ok(Arc::new(config))
}
