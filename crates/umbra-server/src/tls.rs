//! The server's TLS identity.
//!
//! `init` makes two key pairs. The **anchor** is a self-signed certificate
//! whose SHA-256 devices pin (activation strings carry it); its key signs
//! only certificates, and the server never reads it while running, so an
//! operator may keep it elsewhere. The **TLS certificate** the server
//! presents is issued by the anchor for a limited time (90 days by default)
//! and is replaced by `umbra-server admin rotate-tls` without any device
//! changing its pin: devices accept a certificate the anchor issued (the
//! rule is [`umbra_proto::pin`]). The certificate file holds the chain the
//! server sends, the TLS certificate then the anchor; the running server
//! reads it again on SIGHUP.
//!
//! A data directory made before rotation existed holds one self-signed
//! certificate, which devices pinned; its first rotation makes that
//! certificate the anchor, so those devices keep their pin too.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime, pem::PemObject};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use umbra_proto::CertFingerprint;

/// The anchor's certificate and key, beside the TLS certificate.
pub const ANCHOR_CERT: &str = "anchor.pem";
pub const ANCHOR_KEY: &str = "anchor.key";
/// How long a TLS certificate is valid unless the operator says otherwise.
pub const DEFAULT_DAYS: u32 = 90;
/// Allowance for devices whose clocks run behind (set by hand, say): a new
/// certificate is valid from this long before it was made.
const BACKDATE: Duration = Duration::from_secs(86_400);
const ANCHOR_NAME: &str = "Umbra server anchor";
/// The subject name of the one self-signed certificate made by servers
/// before rotation existed (rcgen's default).
const LEGACY_NAME: &str = "rcgen self signed cert";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot generate a certificate: {0}")]
    Generate(String),
    #[error("cannot read {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("cannot write {path}: {reason}")]
    Write { path: String, reason: String },
    #[error("TLS configuration rejected: {0}")]
    Config(String),
    #[error(
        "{0} is missing: the anchor's key is needed to issue a TLS certificate \
         (if it is kept elsewhere, name it with --anchor-key)"
    )]
    NoAnchorKey(String),
    #[error("{0}")]
    Anchor(String),
}

fn read_error(path: &Path, error: impl std::fmt::Display) -> TlsError {
    TlsError::Read {
        path: path.display().to_string(),
        reason: error.to_string(),
    }
}

fn write_error(path: &Path, error: impl std::fmt::Display) -> TlsError {
    TlsError::Write {
        path: path.display().to_string(),
        reason: error.to_string(),
    }
}

fn generate_error(error: impl std::fmt::Display) -> TlsError {
    TlsError::Generate(error.to_string())
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// The anchor's files: beside the TLS certificate.
pub fn anchor_paths(cert: &Path) -> (PathBuf, PathBuf) {
    let dir = cert.parent().unwrap_or(Path::new("."));
    (dir.join(ANCHOR_CERT), dir.join(ANCHOR_KEY))
}

/// The host names a certificate for `public_address` names: each host of
/// a comma-separated list of `HOST:PORT` (a cluster's nodes), and
/// `localhost`.
pub fn names_for(public_address: &str) -> Vec<String> {
    let mut names: Vec<String> = public_address
        .split(',')
        .map(|address| {
            let address = address.trim();
            address
                .rsplit_once(':')
                .map(|(host, _)| host.trim_matches(['[', ']']).to_owned())
                .unwrap_or_else(|| address.to_owned())
        })
        .filter(|name| !name.is_empty())
        .collect();
    names.push("localhost".to_owned());
    names.sort();
    names.dedup();
    names
}

/// The name of `path`'s partner while a rotation is under way.
fn next_of(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_owned();
    name.push(".next");
    path.with_file_name(name)
}

/// Writes `bytes` to a new file `path` (refused if something is there,
/// a link included), flushed to disk; `private` files are readable by
/// the owner only from the moment they exist.
fn create_file(path: &Path, bytes: &[u8], private: bool) -> Result<(), TlsError> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| write_error(parent, e))?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    options.mode(if private { 0o600 } else { 0o644 });
    #[cfg(not(unix))]
    let _ = private;
    let mut file = options.open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            write_error(
                path,
                "it exists: another rotate-tls is running, or one was interrupted \
                 (then delete the *.next files in that folder and run it again)",
            )
        } else {
            write_error(path, e)
        }
    })?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(|e| write_error(path, e))
}

fn sync_dir(path: &Path) -> Result<(), TlsError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| write_error(dir, e))
}

/// Replaces the certificate chain and key as a pair. Both are written
/// beside the old ones as `*.next` first; then the key is renamed into
/// place, then the chain. A crash before the first rename leaves both
/// `.next` files and the old pair; one between the renames leaves the new
/// key with the old chain and `cert.pem.next`, which [`finish_rotation`]
/// (run whenever the files are read) moves into place.
fn replace_pair(cert: &Path, chain_pem: &str, key: &Path, key_pem: &str) -> Result<(), TlsError> {
    let (cert_next, key_next) = (next_of(cert), next_of(key));
    create_file(&key_next, key_pem.as_bytes(), true)?;
    if let Err(error) = create_file(&cert_next, chain_pem.as_bytes(), false) {
        let _ = std::fs::remove_file(&key_next);
        return Err(error);
    }
    std::fs::rename(&key_next, key).map_err(|e| write_error(key, e))?;
    sync_dir(key)?;
    std::fs::rename(&cert_next, cert).map_err(|e| write_error(cert, e))?;
    sync_dir(cert)
}

/// Completes or discards a rotation a crash cut short (see
/// [`replace_pair`]).
fn finish_rotation(cert: &Path, key: &Path) -> Result<(), TlsError> {
    let (cert_next, key_next) = (next_of(cert), next_of(key));
    if !cert_next.exists() {
        return Ok(());
    }
    if key_next.exists() {
        // Cut short before anything was replaced: the old pair stands.
        for next in [&cert_next, &key_next] {
            std::fs::remove_file(next).map_err(|e| write_error(next, e))?;
        }
        return sync_dir(cert);
    }
    // The new key is in place: its chain goes with it.
    std::fs::rename(&cert_next, cert).map_err(|e| write_error(cert, e))?;
    sync_dir(cert)
}

/// What issuing a TLS certificate produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Issued {
    /// The anchor's fingerprint: what devices pin (unchanged by rotation).
    pub pin: CertFingerprint,
    /// When the new TLS certificate expires, in seconds since the epoch.
    pub not_after: u64,
}

/// Makes a new anchor and a TLS certificate it issues for `names`, valid
/// for [`DEFAULT_DAYS`]: `cert` gets the chain, `key` the TLS key, and the
/// anchor's files go beside them (keys readable by the owner only).
pub fn generate(cert: &Path, key: &Path, names: Vec<String>) -> Result<Issued, TlsError> {
    let anchor_key = rcgen::KeyPair::generate().map_err(generate_error)?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(generate_error)?;
    params.distinguished_name = name(ANCHOR_NAME);
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let anchor = params.self_signed(&anchor_key).map_err(generate_error)?;
    let leaf = make_leaf(anchor.der(), &anchor_key, names, DEFAULT_DAYS, unix_now())?;
    let (anchor_cert, anchor_key_path) = anchor_paths(cert);
    create_file(
        &anchor_key_path,
        anchor_key.serialize_pem().as_bytes(),
        true,
    )?;
    create_file(&anchor_cert, anchor.pem().as_bytes(), false)?;
    leaf.write(cert, key, &anchor.pem())
}

/// Replaces the TLS certificate and key with new ones issued by the anchor
/// for `names`, valid for `days` (at least 1) from `now` (seconds since the
/// epoch). `anchor_key` defaults to the anchor's key beside `cert`. A data
/// directory made before rotation existed has no anchor: its self-signed
/// certificate, the one its devices pinned, becomes the anchor (written
/// only once a certificate it issued has passed the devices' check).
pub fn rotate(
    cert: &Path,
    key: &Path,
    anchor_key: Option<&Path>,
    names: Vec<String>,
    days: u32,
    now: u64,
) -> Result<Issued, TlsError> {
    if days == 0 {
        return Err(TlsError::Generate(
            "a certificate must be valid for at least a day".into(),
        ));
    }
    finish_rotation(cert, key)?;
    let (anchor_cert, default_key) = anchor_paths(cert);
    if !anchor_cert.exists() {
        // An older server's one self-signed certificate and its key.
        let chain = read_chain(cert)?;
        let [old] = chain.as_slice() else {
            return Err(TlsError::Anchor(format!(
                "{} holds a chain but {} is missing: copy the chain's last certificate there",
                cert.display(),
                anchor_cert.display()
            )));
        };
        if default_key.exists() {
            return Err(TlsError::Anchor(format!(
                "{} exists without {}: restore the anchor's certificate",
                default_key.display(),
                anchor_cert.display()
            )));
        }
        let old_key_pem = std::fs::read_to_string(key).map_err(|e| read_error(key, e))?;
        let old_key = rcgen::KeyPair::from_pem(&old_key_pem).map_err(|e| read_error(key, e))?;
        let old_pem = std::fs::read_to_string(cert).map_err(|e| read_error(cert, e))?;
        let leaf = make_leaf(old, &old_key, names, days, now)?;
        create_file(&default_key, old_key_pem.as_bytes(), true)?;
        create_file(&anchor_cert, old_pem.as_bytes(), false)?;
        return leaf.write(cert, key, &old_pem);
    }
    let anchor_key = anchor_key.map_or(default_key, Path::to_owned);
    if !anchor_key.exists() {
        return Err(TlsError::NoAnchorKey(anchor_key.display().to_string()));
    }
    let anchor_chain = read_chain(&anchor_cert)?;
    let [anchor] = anchor_chain.as_slice() else {
        return Err(TlsError::Anchor(format!(
            "{} must hold one certificate",
            anchor_cert.display()
        )));
    };
    let anchor_pem =
        std::fs::read_to_string(&anchor_cert).map_err(|e| read_error(&anchor_cert, e))?;
    let signer = rcgen::KeyPair::from_pem(
        &std::fs::read_to_string(&anchor_key).map_err(|e| read_error(&anchor_key, e))?,
    )
    .map_err(|e| read_error(&anchor_key, e))?;
    make_leaf(anchor, &signer, names, days, now)
        .map_err(|error| match error {
            TlsError::Anchor(reason) => TlsError::Anchor(format!(
                "{reason}: is {} the key of {}?",
                anchor_key.display(),
                anchor_cert.display()
            )),
            other => other,
        })?
        .write(cert, key, &anchor_pem)
}

fn name(common: &str) -> rcgen::DistinguishedName {
    let mut name = rcgen::DistinguishedName::new();
    name.push(rcgen::DnType::CommonName, common);
    name
}

/// A TLS certificate and key made in memory, checked, not yet written.
struct Leaf {
    cert_pem: String,
    key_pem: String,
    issued: Issued,
}

impl Leaf {
    /// Writes the chain (this certificate, then the anchor) and the key.
    fn write(self, cert: &Path, key: &Path, anchor_pem: &str) -> Result<Issued, TlsError> {
        replace_pair(
            cert,
            &format!("{}{anchor_pem}", self.cert_pem),
            key,
            &self.key_pem,
        )?;
        Ok(self.issued)
    }
}

/// Issues a TLS certificate for `names`, valid for `days` from `now`, with
/// the anchor `anchor` and its key `signer`, and checks it as devices will.
fn make_leaf(
    anchor: &CertificateDer<'_>,
    signer: &rcgen::KeyPair,
    names: Vec<String>,
    days: u32,
    now: u64,
) -> Result<Leaf, TlsError> {
    let not_before = now.saturating_sub(BACKDATE.as_secs());
    let not_after = now.saturating_add(u64::from(days) * 86_400);
    let time = |seconds: u64| {
        i64::try_from(seconds)
            .ok()
            .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
            .ok_or_else(|| TlsError::Generate(format!("{seconds} is not a valid time")))
    };
    let leaf_key = rcgen::KeyPair::generate().map_err(generate_error)?;
    let mut params = rcgen::CertificateParams::new(names).map_err(generate_error)?;
    params.distinguished_name = name("Umbra server");
    params.not_before = time(not_before)?;
    params.not_after = time(not_after)?;
    params.is_ca = rcgen::IsCa::ExplicitNoCa;
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    // The issuer's name must be the anchor's subject exactly. Anchors made
    // here carry one of two names (see LEGACY_NAME); the certificate is
    // checked as devices check it, so a wrong guess is never written.
    let provider = provider();
    let algorithms = provider.signature_verification_algorithms.all;
    let at = UnixTime::since_unix_epoch(Duration::from_secs(now));
    let mut refusal = None;
    for issuer_name in [ANCHOR_NAME, LEGACY_NAME] {
        let mut issuer_params =
            rcgen::CertificateParams::new(Vec::<String>::new()).map_err(generate_error)?;
        issuer_params.distinguished_name = name(issuer_name);
        let issuer = rcgen::Issuer::new(issuer_params, signer);
        let leaf = params
            .signed_by(&leaf_key, &issuer)
            .map_err(generate_error)?;
        match umbra_proto::pin::issued_by(leaf.der(), anchor, at, algorithms) {
            Ok(()) => {
                return Ok(Leaf {
                    cert_pem: leaf.pem(),
                    key_pem: leaf_key.serialize_pem(),
                    issued: Issued {
                        pin: CertFingerprint::of_der(anchor),
                        not_after,
                    },
                });
            }
            Err(error) => refusal = Some(error),
        }
    }
    Err(TlsError::Anchor(format!(
        "devices would refuse a certificate issued with this key ({})",
        refusal.map(|e| e.to_string()).unwrap_or_default(),
    )))
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn read_chain(cert: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|e| read_error(cert, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| read_error(cert, e))?;
    if chain.is_empty() {
        return Err(read_error(cert, "no certificate in the file"));
    }
    Ok(chain)
}

/// What devices pin for the chain in `cert` (PEM): the anchor beside it
/// (`anchor.pem`), or, for an older server without one, the chain's one
/// self-signed certificate. Never a certificate merely appended to the
/// chain file (a public CA's, say): pinning that would accept anyone it
/// certified.
pub fn fingerprint(cert: &Path) -> Result<CertFingerprint, TlsError> {
    let (anchor, _) = anchor_paths(cert);
    if anchor.exists() {
        let chain = read_chain(&anchor)?;
        let [anchor_der] = chain.as_slice() else {
            return Err(read_error(&anchor, "it must hold one certificate"));
        };
        return Ok(CertFingerprint::of_der(anchor_der));
    }
    let chain = read_chain(cert)?;
    let [only] = chain.as_slice() else {
        return Err(read_error(
            cert,
            format!(
                "a chain of {} certificates without {} beside it: devices pin the anchor \
                 (a server made by `umbra-server init` has one)",
                chain.len(),
                ANCHOR_CERT
            ),
        ));
    };
    Ok(CertFingerprint::of_der(only))
}

/// The certificate and key the server presents, read again on request.
#[derive(Debug)]
pub struct Identity {
    cert: PathBuf,
    key: PathBuf,
    provider: Arc<CryptoProvider>,
    /// What devices pin: fixed when the server starts.
    pin: CertFingerprint,
    current: RwLock<Arc<CertifiedKey>>,
}

/// What the server presents now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Presented {
    /// When the TLS certificate expires (seconds since the epoch); `None`
    /// for an older server's self-signed certificate, valid for ever.
    pub not_after: Option<u64>,
    /// What devices pin.
    pub pin: CertFingerprint,
}

impl Identity {
    /// Reads the chain and key (finishing a rotation a crash cut short).
    /// A chain devices refuse under the pin ([`fingerprint`]) is an error;
    /// one they refuse only because it is out of date is served (the
    /// server says so in its log) until it is replaced.
    pub fn load(cert: &Path, key: &Path) -> Result<Arc<Identity>, TlsError> {
        let provider = provider();
        finish_rotation(cert, key)?;
        let pin = fingerprint(cert)?;
        let current = Identity::read(&provider, cert, key)?;
        match Identity::check(&provider, pin, &current, unix_now()) {
            Ok(()) | Err(umbra_proto::pin::PinError::OutOfDate) => {}
            Err(refusal) => {
                return Err(TlsError::Anchor(format!(
                    "devices would refuse {} under the pin they hold ({refusal})",
                    cert.display()
                )));
            }
        }
        Ok(Arc::new(Identity {
            cert: cert.to_owned(),
            key: key.to_owned(),
            provider,
            pin,
            current: RwLock::new(Arc::new(current)),
        }))
    }

    fn read(provider: &CryptoProvider, cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
        let chain = read_chain(cert)?;
        let private = PrivateKeyDer::from_pem_file(key).map_err(|e| read_error(key, e))?;
        let certified = CertifiedKey::from_der(chain, private, provider).map_err(|e| {
            TlsError::Config(format!("{} and {}: {e}", cert.display(), key.display()))
        })?;
        Ok(certified)
    }

    /// Reads the certificate and key files again and presents them to
    /// connections from now on (open connections keep theirs). A chain
    /// devices would refuse at `now` (seconds since the epoch), under the
    /// pin they hold, is not taken: on any error the server goes on
    /// presenting what it did.
    pub fn reload(&self, now: u64) -> Result<Presented, TlsError> {
        finish_rotation(&self.cert, &self.key)?;
        let fresh = Identity::read(&self.provider, &self.cert, &self.key)?;
        Identity::check(&self.provider, self.pin, &fresh, now).map_err(|refusal| {
            TlsError::Anchor(format!(
                "devices would refuse {} under the pin they hold ({refusal})",
                self.cert.display()
            ))
        })?;
        let fresh = Arc::new(fresh);
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = fresh;
        Ok(self.presented())
    }

    /// What devices decide about `certified` under `pin` at `now`.
    fn check(
        provider: &CryptoProvider,
        pin: CertFingerprint,
        certified: &CertifiedKey,
        now: u64,
    ) -> Result<(), umbra_proto::pin::PinError> {
        let [leaf, others @ ..] = certified.cert.as_slice() else {
            return Err(umbra_proto::pin::PinError::NotPinned);
        };
        umbra_proto::pin::check(
            pin,
            leaf,
            others,
            UnixTime::since_unix_epoch(Duration::from_secs(now)),
            provider.signature_verification_algorithms.all,
        )
    }

    /// The certificate presented now.
    pub fn presented(&self) -> Presented {
        let current = Arc::clone(&self.current.read().unwrap_or_else(|p| p.into_inner()));
        let chain = &current.cert;
        let pin = self.pin;
        // The anchor is found by the pin, not by its place in the chain.
        let anchor = chain
            .iter()
            .skip(1)
            .find(|c| CertFingerprint::of_der(c) == pin);
        let not_after = match (chain.first(), anchor) {
            (Some(leaf), Some(anchor)) => umbra_proto::pin::expiry(
                leaf,
                anchor,
                self.provider.signature_verification_algorithms.all,
            ),
            _ => None,
        };
        Presented { not_after, pin }
    }
}

impl ResolvesServerCert for Identity {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(
            &self.current.read().unwrap_or_else(|p| p.into_inner()),
        ))
    }
}

/// A rustls server configuration presenting `identity`: TLS 1.3 only,
/// with aws-lc-rs's provider, which prefers the hybrid post-quantum key
/// exchange X25519MLKEM768 and takes X25519 alone from a client that
/// lacks it.
pub fn server_config(identity: Arc<Identity>) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let config = rustls::ServerConfig::builder_with_provider(Arc::clone(&identity.provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(identity);
    Ok(Arc::new(config))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use umbra_proto::pin::{self, PinError};

    const NOW: u64 = 1_800_000_000;
    const DAY: u64 = 86_400;

    fn at(seconds: u64) -> UnixTime {
        UnixTime::since_unix_epoch(Duration::from_secs(seconds))
    }

    /// What a device decides about the chain in `cert` at `now`.
    fn device_check(pin: CertFingerprint, cert: &Path, now: u64) -> Result<(), PinError> {
        let chain = read_chain(cert).unwrap();
        let provider = provider();
        pin::check(
            pin,
            &chain[0],
            &chain[1..],
            at(now),
            provider.signature_verification_algorithms.all,
        )
    }

    struct Dir {
        _dir: tempfile::TempDir,
        cert: PathBuf,
        key: PathBuf,
    }

    fn dir() -> Dir {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (
            dir.path().join("tls/cert.pem"),
            dir.path().join("tls/key.pem"),
        );
        Dir {
            _dir: dir,
            cert,
            key,
        }
    }

    fn names() -> Vec<String> {
        names_for("127.0.0.1:7443,umbra.example:7443")
    }

    #[test]
    fn a_rotated_certificate_is_accepted_under_the_same_pin_while_it_is_valid() {
        let d = dir();
        let first = generate(&d.cert, &d.key, names()).unwrap();
        let (anchor, _) = anchor_paths(&d.cert);
        assert_eq!(
            first.pin,
            fingerprint(&anchor).unwrap(),
            "devices pin the anchor"
        );
        assert_eq!(fingerprint(&d.cert).unwrap(), first.pin);
        let first_leaf = read_chain(&d.cert).unwrap()[0].clone();

        let rotated = rotate(&d.cert, &d.key, None, names(), 30, NOW).unwrap();
        assert_eq!(rotated.pin, first.pin, "rotation keeps the pin");
        assert_eq!(rotated.not_after, NOW + 30 * DAY);
        let chain = read_chain(&d.cert).unwrap();
        assert_ne!(chain[0], first_leaf, "a new certificate");
        assert_eq!(chain.len(), 2);
        device_check(first.pin, &d.cert, NOW).unwrap();
        device_check(first.pin, &d.cert, NOW + 30 * DAY - 1).unwrap();
        // A device whose clock runs most of a day behind still connects.
        device_check(first.pin, &d.cert, NOW - 23 * 3600).unwrap();
        assert_eq!(
            device_check(first.pin, &d.cert, NOW + 30 * DAY + 1),
            Err(PinError::OutOfDate)
        );
        assert_eq!(
            device_check(first.pin, &d.cert, NOW - 25 * 3600),
            Err(PinError::OutOfDate)
        );
        let provider = provider();
        assert_eq!(
            pin::expiry(
                &chain[0],
                &chain[1],
                provider.signature_verification_algorithms.all
            ),
            Some(NOW + 30 * DAY),
            "the expiry the server reports is the one issued"
        );
        // The key presented matches the certificate.
        let identity = Identity::load(&d.cert, &d.key).unwrap();
        assert_eq!(identity.presented().not_after, Some(NOW + 30 * DAY));
    }

    #[test]
    fn a_certificate_another_anchor_issued_is_refused_even_beside_the_pinned_anchor() {
        let ours = dir();
        let pin = generate(&ours.cert, &ours.key, names()).unwrap().pin;
        let theirs = dir();
        generate(&theirs.cert, &theirs.key, names()).unwrap();
        rotate(&theirs.cert, &theirs.key, None, names(), 30, NOW).unwrap();
        let imposter = read_chain(&theirs.cert).unwrap();
        let (anchor, _) = anchor_paths(&ours.cert);
        let our_anchor = CertificateDer::from_pem_file(&anchor).unwrap();
        let provider = provider();
        let algorithms = provider.signature_verification_algorithms.all;
        // Their own chain: nothing in it is pinned.
        assert_eq!(
            pin::check(pin, &imposter[0], &imposter[1..], at(NOW), algorithms),
            Err(PinError::NotPinned)
        );
        // Our anchor's public certificate copied into their chain.
        assert!(matches!(
            pin::check(
                pin,
                &imposter[0],
                std::slice::from_ref(&our_anchor),
                at(NOW),
                algorithms
            ),
            Err(PinError::NotIssued(_))
        ));
        // The same with one of theirs that has expired, or is not valid
        // yet: refused as not issued, never as "check your clock".
        for moment in [NOW + 31 * DAY, NOW - 2 * DAY] {
            assert!(matches!(
                pin::check(
                    pin,
                    &imposter[0],
                    std::slice::from_ref(&our_anchor),
                    at(moment),
                    algorithms
                ),
                Err(PinError::NotIssued(_))
            ));
        }
        assert_eq!(pin::expiry(&imposter[0], &our_anchor, algorithms), None);
        assert_eq!(
            pin::expiry(&imposter[0], &imposter[1], algorithms),
            Some(NOW + 30 * DAY)
        );
    }

    #[test]
    fn a_rotation_cut_short_is_finished_or_discarded_when_the_files_are_read() {
        let d = dir();
        let pin = generate(&d.cert, &d.key, names()).unwrap().pin;
        let old_cert = std::fs::read(&d.cert).unwrap();
        let old_key = std::fs::read(&d.key).unwrap();
        rotate(&d.cert, &d.key, None, names(), 30, unix_now()).unwrap();
        let new_cert = std::fs::read(&d.cert).unwrap();
        let new_key = std::fs::read(&d.key).unwrap();

        // Cut short between the renames: the new key is in place, its
        // chain still beside it.
        std::fs::write(next_of(&d.cert), &new_cert).unwrap();
        std::fs::write(&d.cert, &old_cert).unwrap();
        let identity = Identity::load(&d.cert, &d.key).unwrap();
        assert_eq!(std::fs::read(&d.cert).unwrap(), new_cert);
        assert!(!next_of(&d.cert).exists());
        assert_eq!(identity.presented().pin, pin);

        // Cut short before any rename: the pair in place stands.
        std::fs::write(next_of(&d.cert), &old_cert).unwrap();
        std::fs::write(next_of(&d.key), &old_key).unwrap();
        Identity::load(&d.cert, &d.key).unwrap();
        assert_eq!(std::fs::read(&d.cert).unwrap(), new_cert);
        assert_eq!(std::fs::read(&d.key).unwrap(), new_key);
        assert!(!next_of(&d.cert).exists() && !next_of(&d.key).exists());

        // A rotation meeting another's files in the way writes nothing.
        std::fs::write(next_of(&d.key), b"someone else's").unwrap();
        assert!(matches!(
            rotate(&d.cert, &d.key, None, names(), 30, unix_now()),
            Err(TlsError::Write { .. })
        ));
        assert_eq!(std::fs::read(&d.cert).unwrap(), new_cert);
        assert!(!next_of(&d.cert).exists());
    }

    #[test]
    fn a_chain_file_with_more_certificates_does_not_move_the_pin() {
        let d = dir();
        let pin = generate(&d.cert, &d.key, names()).unwrap().pin;
        // A certificate appended to the chain (a public CA's, say).
        let other = rcgen::generate_simple_self_signed(names()).unwrap();
        let mut chain = std::fs::read_to_string(&d.cert).unwrap();
        chain.push_str(&other.cert.pem());
        std::fs::write(&d.cert, chain).unwrap();
        assert_eq!(fingerprint(&d.cert).unwrap(), pin);
        // Without the anchor beside it, a chain names no pin at all.
        let (anchor, _) = anchor_paths(&d.cert);
        std::fs::remove_file(anchor).unwrap();
        assert!(fingerprint(&d.cert).is_err());
        assert!(Identity::load(&d.cert, &d.key).is_err());
    }

    #[test]
    fn rotation_with_another_key_than_the_anchors_writes_nothing() {
        let d = dir();
        let pin = generate(&d.cert, &d.key, names()).unwrap().pin;
        let before = std::fs::read(&d.cert).unwrap();
        let other = dir();
        generate(&other.cert, &other.key, names()).unwrap();
        let (_, other_anchor_key) = anchor_paths(&other.cert);
        let refused =
            rotate(&d.cert, &d.key, Some(&other_anchor_key), names(), 30, NOW).unwrap_err();
        assert!(matches!(refused, TlsError::Anchor(_)), "{refused}");
        assert_eq!(std::fs::read(&d.cert).unwrap(), before);
        device_check(pin, &d.cert, unix_now()).unwrap();
        // Without the anchor's key beside it, rotation says where it is.
        let (_, anchor_key) = anchor_paths(&d.cert);
        std::fs::remove_file(&anchor_key).unwrap();
        assert!(matches!(
            rotate(&d.cert, &d.key, None, names(), 30, NOW),
            Err(TlsError::NoAnchorKey(_))
        ));
    }

    #[test]
    fn an_older_servers_self_signed_certificate_becomes_the_anchor_and_keeps_its_pin() {
        let d = dir();
        // As servers made it before rotation existed.
        let legacy = rcgen::generate_simple_self_signed(names()).unwrap();
        std::fs::create_dir_all(d.cert.parent().unwrap()).unwrap();
        std::fs::write(&d.cert, legacy.cert.pem()).unwrap();
        std::fs::write(&d.key, legacy.signing_key.serialize_pem()).unwrap();
        let pin = CertFingerprint::of_der(legacy.cert.der());
        assert_eq!(fingerprint(&d.cert).unwrap(), pin);
        device_check(pin, &d.cert, NOW).unwrap();
        assert_eq!(
            Identity::load(&d.cert, &d.key)
                .unwrap()
                .presented()
                .not_after,
            None
        );

        let rotated = rotate(&d.cert, &d.key, None, names(), 30, NOW).unwrap();
        assert_eq!(rotated.pin, pin, "devices activated before keep their pin");
        let chain = read_chain(&d.cert).unwrap();
        assert_eq!(chain.len(), 2);
        assert_eq!(chain[1].as_ref(), legacy.cert.der().as_ref());
        assert_ne!(chain[0].as_ref(), legacy.cert.der().as_ref());
        device_check(pin, &d.cert, NOW).unwrap();
        assert_eq!(
            std::fs::read(anchor_paths(&d.cert).1).unwrap(),
            legacy.signing_key.serialize_pem().as_bytes(),
            "the old key signs certificates now"
        );
        // The second rotation finds the anchor made by the first.
        rotate(&d.cert, &d.key, None, names(), 30, NOW + DAY).unwrap();
        assert_eq!(read_chain(&d.cert).unwrap()[1], chain[1]);
        device_check(pin, &d.cert, NOW + DAY).unwrap();
    }

    #[test]
    fn an_older_certificate_that_cannot_be_an_anchor_is_left_as_it_was() {
        let d = dir();
        // Self-signed under a subject name no Umbra server wrote.
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(names()).unwrap();
        params.distinguished_name = name("someone else's");
        let foreign = params.self_signed(&key).unwrap();
        std::fs::create_dir_all(d.cert.parent().unwrap()).unwrap();
        std::fs::write(&d.cert, foreign.pem()).unwrap();
        std::fs::write(&d.key, key.serialize_pem()).unwrap();
        assert!(matches!(
            rotate(&d.cert, &d.key, None, names(), 30, NOW),
            Err(TlsError::Anchor(_))
        ));
        let (anchor, anchor_key) = anchor_paths(&d.cert);
        assert!(!anchor.exists() && !anchor_key.exists(), "nothing written");
        assert_eq!(std::fs::read_to_string(&d.cert).unwrap(), foreign.pem());
    }

    #[test]
    fn reloading_refuses_a_chain_devices_would_refuse_and_keeps_presenting_the_old_one() {
        let d = dir();
        generate(&d.cert, &d.key, names()).unwrap();
        let identity = Identity::load(&d.cert, &d.key).unwrap();
        let now = unix_now();
        let first = identity.presented();

        // Another anchor's certificate put in place.
        let other = dir();
        generate(&other.cert, &other.key, names()).unwrap();
        let good_cert = std::fs::read(&d.cert).unwrap();
        let good_key = std::fs::read(&d.key).unwrap();
        std::fs::copy(&other.cert, &d.cert).unwrap();
        std::fs::copy(&other.key, &d.key).unwrap();
        assert!(matches!(identity.reload(now), Err(TlsError::Anchor(_))));
        assert_eq!(identity.presented(), first);

        // A certificate that has already expired.
        std::fs::write(&d.cert, &good_cert).unwrap();
        std::fs::write(&d.key, &good_key).unwrap();
        rotate(&d.cert, &d.key, None, names(), 1, now - 10 * DAY).unwrap();
        assert!(matches!(identity.reload(now), Err(TlsError::Anchor(_))));
        assert_eq!(identity.presented(), first);

        // A certificate whose key is not beside it.
        rotate(&d.cert, &d.key, None, names(), 30, now).unwrap();
        std::fs::write(&d.key, &good_key).unwrap();
        assert!(matches!(identity.reload(now), Err(TlsError::Config(_))));
        assert_eq!(identity.presented(), first);

        // A proper rotation is taken.
        let rotated = rotate(&d.cert, &d.key, None, names(), 30, now).unwrap();
        let presented = identity.reload(now).unwrap();
        assert_eq!(presented.pin, first.pin);
        assert_eq!(presented.not_after, Some(rotated.not_after));
    }
}
