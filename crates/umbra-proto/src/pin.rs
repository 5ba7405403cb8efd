//! Which TLS certificates a device accepts from its server: the rule
//! behind the `pin` of activation strings, in one place for devices and
//! for the server's own check of a certificate it is about to present.
//!
//! The pin is the SHA-256 of one certificate's DER encoding. The server is
//! accepted when either
//!
//! 1. its end-entity certificate *is* the pinned certificate (a server made
//!    before rotation existed presents one self-signed certificate for
//!    ever); or
//! 2. the chain it sends holds the pinned certificate (the **anchor**), and
//!    the end-entity certificate was issued by the anchor's key, directly,
//!    is valid at the device's clock, and is not marked for another use
//!    than a TLS server. This is ordinary X.509 path validation (rustls's
//!    own `webpki`) with the anchor as the only trust anchor; host names
//!    play no part, the pin does.
//!
//! In both cases the TLS handshake is signed by the end-entity
//! certificate's key, so only a holder of a key the anchor certified (or
//! of the pinned certificate's key) passes. The server can therefore
//! change its TLS key and certificate (`umbra-server admin rotate-tls`)
//! without any device changing its pin, while the anchor's key, which
//! signs only certificates, may be kept away from the server.

use rustls_pki_types::{CertificateDer, SignatureVerificationAlgorithm, UnixTime};

use crate::CertFingerprint;

/// Why a server's certificate chain was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PinError {
    /// Neither the end-entity certificate nor any other certificate the
    /// server sent is the pinned one: another server, or someone in the
    /// way.
    #[error("no certificate the server sent is the pinned one")]
    NotPinned,
    /// The pinned anchor was sent, but the end-entity certificate is not
    /// one it issued (or is malformed, or issued for another use): anyone
    /// can copy the anchor's public certificate into a chain.
    #[error("the server's certificate was not issued by the pinned anchor: {0}")]
    NotIssued(String),
    /// Issued by the pinned anchor, but expired or not yet valid at this
    /// device's clock.
    #[error("the server's certificate has expired or is not yet valid (at this device's clock)")]
    OutOfDate,
}

/// Checks `end_entity` (with the rest of the chain the server sent,
/// `others`) against `pin` at time `now`, verifying signatures with
/// `algorithms` (a rustls crypto provider's). See the module documentation
/// for the rule.
pub fn check(
    pin: CertFingerprint,
    end_entity: &CertificateDer<'_>,
    others: &[CertificateDer<'_>],
    now: UnixTime,
    algorithms: &[&dyn SignatureVerificationAlgorithm],
) -> Result<(), PinError> {
    if CertFingerprint::of_der(end_entity) == pin {
        return Ok(());
    }
    let anchor = others
        .iter()
        .find(|certificate| CertFingerprint::of_der(certificate) == pin)
        .ok_or(PinError::NotPinned)?;
    issued_by(end_entity, anchor, now, algorithms)
}

/// Whether `anchor` issued `end_entity` for a TLS server, valid at `now`.
///
/// Path validation checks the dates before the signature, so a
/// certificate refused on its dates is checked again at a moment inside
/// them: only one the anchor did issue is reported as out of date; any
/// other (an expired certificate of someone else's, beside a copy of the
/// anchor) is not issued.
pub fn issued_by(
    end_entity: &CertificateDer<'_>,
    anchor: &CertificateDer<'_>,
    now: UnixTime,
    algorithms: &[&dyn SignatureVerificationAlgorithm],
) -> Result<(), PinError> {
    match validate(end_entity, anchor, now, algorithms) {
        Ok(()) => Ok(()),
        Err(webpki::Error::CertExpired { not_after, .. }) => {
            issued_at(end_entity, anchor, not_after, algorithms)
        }
        Err(webpki::Error::CertNotValidYet { not_before, .. }) => {
            issued_at(end_entity, anchor, not_before, algorithms)
        }
        Err(error) => Err(not_issued(error)),
    }
}

/// `OutOfDate` if `anchor` issued `end_entity` and it is valid at `moment`
/// (one end of its validity), else why not.
fn issued_at(
    end_entity: &CertificateDer<'_>,
    anchor: &CertificateDer<'_>,
    moment: UnixTime,
    algorithms: &[&dyn SignatureVerificationAlgorithm],
) -> Result<(), PinError> {
    match validate(end_entity, anchor, moment, algorithms) {
        Ok(()) => Err(PinError::OutOfDate),
        Err(error) => Err(not_issued(error)),
    }
}

fn not_issued(error: webpki::Error) -> PinError {
    PinError::NotIssued(format!("{error:?}"))
}

/// X.509 path validation of `end_entity` with `anchor` as the only trust
/// anchor and no intermediate, for a TLS server, at `now`.
fn validate(
    end_entity: &CertificateDer<'_>,
    anchor: &CertificateDer<'_>,
    now: UnixTime,
    algorithms: &[&dyn SignatureVerificationAlgorithm],
) -> Result<(), webpki::Error> {
    let anchor = webpki::anchor_from_trusted_cert(anchor)?;
    let leaf = webpki::EndEntityCert::try_from(end_entity)?;
    leaf.verify_for_usage(
        algorithms,
        &[anchor],
        &[],
        now,
        webpki::KeyUsage::server_auth(),
        None,
        None,
    )
    .map(|_| ())
}

/// When `end_entity`, issued by `anchor`, stops being valid (seconds since
/// the Unix epoch), as path validation reads it; `None` if `anchor` did not
/// issue it.
pub fn expiry(
    end_entity: &CertificateDer<'_>,
    anchor: &CertificateDer<'_>,
    algorithms: &[&dyn SignatureVerificationAlgorithm],
) -> Option<u64> {
    // Validation at the last second X.509 can write reports the
    // certificate's own end of validity (the parser rustls trusts reads
    // it, none is written here); validation at that moment says whether
    // the anchor issued it.
    let end_of_time = UnixTime::since_unix_epoch(std::time::Duration::from_secs(253_402_300_799));
    match validate(end_entity, anchor, end_of_time, algorithms) {
        Err(webpki::Error::CertExpired { not_after, .. }) => {
            (issued_at(end_entity, anchor, not_after, algorithms) == Err(PinError::OutOfDate))
                .then(|| not_after.as_secs())
        }
        _ => None,
    }
}
