//! What the server may check on the MLS bytes it relays, without any key:
//! that an uploaded KeyPackage is well formed, signed by the uploading
//! device's identity key and names its account; and the public header
//! (group, epoch, content type) of a handshake or application message.

use openmls::prelude::{
    BasicCredential, ContentType, Extension, ExtensionType, Extensions, LeafNode, MlsMessageBodyIn,
    MlsMessageIn, ProtocolVersion, UnknownExtension,
};
use openmls_rust_crypto::RustCrypto;
use tls_codec::Deserialize as _;
use umbra_proto::{AccountId, IdentityKey};

use crate::{DeviceCertificate, MlsError, Result, Suite};

/// A KeyPackage whose signature has been verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidKeyPackage {
    pub account: AccountId,
    pub identity_key: IdentityKey,
    pub last_resort: bool,
    pub suite: Suite,
    /// The suites its leaf's capabilities list that Umbra knows: what its
    /// device offers. A device that offers the post-quantum suite keeps a
    /// package of it at the server (a last-resort one at least), so a
    /// classical package of such a device, handed out when both were asked
    /// for, is the server's choice, not the device's.
    pub offers: Vec<Suite>,
    /// The device certificate its leaf carries, decoded but not checked
    /// (checking needs the account key, which the caller knows).
    pub certificate: Option<DeviceCertificate>,
}

/// Parses and verifies a KeyPackage (an MLSMessage carrying one).
pub fn validate_key_package(bytes: &[u8]) -> Result<ValidKeyPackage> {
    let message = MlsMessageIn::tls_deserialize_exact(bytes)
        .map_err(|e| MlsError::InvalidKeyPackage(format!("not an MLS message: {e}")))?;
    let MlsMessageBodyIn::KeyPackage(key_package) = message.extract() else {
        return Err(MlsError::InvalidKeyPackage(
            "the MLS message does not carry a KeyPackage".into(),
        ));
    };
    let key_package = key_package
        .validate(&RustCrypto::default(), ProtocolVersion::Mls10)
        .map_err(|e| MlsError::InvalidKeyPackage(format!("{e:?}")))?;
    let suite = Suite::from_ciphersuite(key_package.ciphersuite()).ok_or_else(|| {
        MlsError::UnsupportedCiphersuite(format!("{:?}", key_package.ciphersuite()))
    })?;
    let leaf = key_package.leaf_node();
    let credential = BasicCredential::try_from(leaf.credential().clone())
        .map_err(|_| MlsError::InvalidKeyPackage("credential is not a basic credential".into()))?;
    // Exactly the account ID's canonical form (upper case, no spaces):
    // members compare credentials byte for byte.
    let account = std::str::from_utf8(credential.identity())
        .ok()
        .and_then(|text| AccountId::parse(text).ok().filter(|id| id.as_str() == text))
        .ok_or_else(|| {
            MlsError::InvalidKeyPackage(
                "credential is not an Umbra account ID in its canonical (upper-case) form".into(),
            )
        })?;
    // Members need both to add the device to a group (the timer is a
    // required group-context extension), so a package without them would
    // only fail later, at the one who fetched it.
    let extensions = leaf.capabilities().extensions();
    for (needed, name) in [
        (ExtensionType::LastResort, "last_resort (0x000A)"),
        (
            ExtensionType::Unknown(crate::DISAPPEARING_EXTENSION),
            "the disappearing timer (0xF0D5)",
        ),
    ] {
        if !extensions.contains(&needed) {
            return Err(MlsError::InvalidKeyPackage(format!(
                "the leaf's capabilities do not list the {name} extension"
            )));
        }
    }
    let identity_key = IdentityKey::from_slice(leaf.signature_key().as_slice())
        .map_err(|e| MlsError::InvalidKeyPackage(e.to_string()))?;
    let certificate = leaf_certificate(leaf.extensions())
        .map_err(|e| MlsError::InvalidKeyPackage(format!("its device certificate: {e}")))?;
    let offers = leaf
        .capabilities()
        .ciphersuites()
        .iter()
        .filter_map(|suite| Suite::from_code(suite.value()))
        .collect();
    Ok(ValidKeyPackage {
        account,
        identity_key,
        last_resort: key_package.last_resort(),
        suite,
        offers,
        certificate,
    })
}

/// The device certificate in a leaf's extensions, if it carries one.
pub(crate) fn leaf_certificate(
    extensions: &Extensions<LeafNode>,
) -> std::result::Result<Option<DeviceCertificate>, umbra_proto::DecodeError> {
    let found = extensions.iter().find_map(|extension| match extension {
        Extension::Unknown(kind, UnknownExtension(bytes))
            if *kind == crate::DEVICE_CERTIFICATE_EXTENSION =>
        {
            Some(bytes)
        }
        _ => None,
    });
    found
        .map(|bytes| DeviceCertificate::decode(bytes))
        .transpose()
}

/// What kind of MLS message a relayed message is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageKind {
    Application,
    Proposal,
    Commit,
}

/// The cleartext header of an MLS PublicMessage or PrivateMessage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageHeader {
    pub group_id: Vec<u8>,
    pub epoch: u64,
    pub kind: MessageKind,
}

/// Reads the header of an MLS protocol message without decrypting it.
pub fn message_header(bytes: &[u8]) -> Result<MessageHeader> {
    let message = MlsMessageIn::tls_deserialize_exact(bytes)
        .map_err(|e| MlsError::Malformed(e.to_string()))?;
    let protocol = message
        .try_into_protocol_message()
        .map_err(|_| MlsError::Malformed("not a protocol message (public or private)".into()))?;
    let kind = match protocol.content_type() {
        ContentType::Application => MessageKind::Application,
        ContentType::Proposal => MessageKind::Proposal,
        ContentType::Commit => MessageKind::Commit,
    };
    Ok(MessageHeader {
        group_id: protocol.group_id().as_slice().to_vec(),
        epoch: protocol.epoch().as_u64(),
        kind,
    })
}
