//! Anonymous sending: the tokens that pay for it and the delivery key that
//! proves group membership without naming the member.
//!
//! *Tokens.* An active line asks the server to sign blinded token inputs
//! (RFC 9497 VOPRF, ciphersuite ristretto255-SHA512, in the manner of
//! Privacy Pass, RFC 9578). The server's proof ties its answer to the
//! public key it names, so every token is valid under that key; blinding
//! means the server cannot link a token spent later to the line that got
//! it. A spent token is the nonce, the key's ID and the VOPRF output over
//! `TOKEN_TYPE || nonce || SHA-256(TOKEN_CHALLENGE)`; the server, holding
//! the key, recomputes the output and remembers the nonce.
//!
//! *Delivery key.* Each epoch, every member derives an Ed25519 key from the
//! group's MLS exporter ([`DELIVERY_KEY_LABEL`]); the committer tells the
//! server its public half. An anonymous message is signed with it over
//! [`anonymous_signed_bytes`], so the server learns "a member of this group
//! in this epoch sent this", and nothing about which.

use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use rand_core::OsRng;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use voprf::{
    BlindedElement, EvaluationElement, Group, Proof, Ristretto255, VoprfClient, VoprfServer,
};
use zeroize::Zeroizing;

use crate::{DecodeError, GroupId};

/// The token type in a token's input (not a registered Privacy Pass type:
/// Umbra's tokens are redeemed only at the server that issued them).
pub const TOKEN_TYPE: u16 = 0x5542;
/// What a token pays for, hashed into its input.
pub const TOKEN_CHALLENGE: &[u8] = b"umbra anonymous send v1";
/// The MLS exporter label of the per-epoch delivery key.
pub const DELIVERY_KEY_LABEL: &str = "umbra delivery key v1";
/// Bytes of a token's nonce, of a token key's ID and of a delivery key.
pub const TOKEN_NONCE_BYTES: usize = 32;
pub const TOKEN_KEY_ID_BYTES: usize = 32;
pub const DELIVERY_KEY_BYTES: usize = 32;
/// Bytes of a VOPRF output (SHA-512).
pub const TOKEN_AUTHENTICATOR_BYTES: usize = 64;
/// Most token keys an honest server announces at once: the one issuing,
/// and the one before it (its tokens are still accepted for a rotation
/// period). A server that announces more could be handing lines keys of
/// their own, to tell their tokens apart: a device does not send
/// anonymously to it.
pub const MAX_ANNOUNCED_TOKEN_KEYS: usize = 2;
/// Bytes of a token key's secret (a ristretto255 scalar).
const SECRET_BYTES: usize = 32;
/// Largest MLS message sent anonymously (a text, padded, is far smaller):
/// nobody can tell who sent one, so each is kept small.
pub const MAX_ANONYMOUS_MESSAGE: usize = 64 * 1024;
/// Most token inputs one `IssueTokens` may carry.
pub const MAX_TOKENS_PER_REQUEST: usize = 64;

/// Why a token could not be made or checked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the token key is not a valid key")]
    BadKey,
    #[error("an element of the server's answer is not a group element")]
    BadElement,
    #[error("the server's answer does not prove it used the key it names")]
    BadProof,
    #[error("the server answered {got} elements for {asked} token inputs (1 to {asked} expected)")]
    WrongCount { asked: usize, got: usize },
    #[error("the key's ID is not the SHA-256 of its public key")]
    WrongKeyId,
    #[error("no randomness available")]
    NoRandomness,
}

/// A token as it is spent.
#[derive(Clone, PartialEq, Eq)]
pub struct SendToken {
    pub key_id: [u8; TOKEN_KEY_ID_BYTES],
    pub nonce: [u8; TOKEN_NONCE_BYTES],
    pub authenticator: [u8; TOKEN_AUTHENTICATOR_BYTES],
}

impl std::fmt::Debug for SendToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The nonce and authenticator are the token itself: whoever reads
        // them could spend it.
        write!(f, "SendToken(key {})", hex::encode(&self.key_id[..4]))
    }
}

/// Bytes of a ristretto255 element's encoding.
const ELEMENT_BYTES: usize = 32;

/// A blinded input: exactly one element's encoding (the decoder reads the
/// first 32 bytes of whatever it is given).
fn blinded_element(bytes: &[u8]) -> Result<BlindedElement<Ristretto255>, TokenError> {
    if bytes.len() != ELEMENT_BYTES {
        return Err(TokenError::BadElement);
    }
    BlindedElement::<Ristretto255>::deserialize(bytes).map_err(|_| TokenError::BadElement)
}

fn token_input(nonce: &[u8; TOKEN_NONCE_BYTES]) -> Vec<u8> {
    let mut input = Vec::with_capacity(2 + TOKEN_NONCE_BYTES + 32);
    input.extend_from_slice(&TOKEN_TYPE.to_be_bytes());
    input.extend_from_slice(nonce);
    input.extend_from_slice(&Sha256::digest(TOKEN_CHALLENGE));
    input
}

/// A token key's ID: the SHA-256 of its public key.
pub fn token_key_id(public_key: &[u8]) -> [u8; TOKEN_KEY_ID_BYTES] {
    Sha256::digest(public_key).into()
}

/// The server's side: one token key.
pub struct TokenIssuer {
    server: VoprfServer<Ristretto255>,
    public_key: Vec<u8>,
    id: [u8; TOKEN_KEY_ID_BYTES],
}

impl std::fmt::Debug for TokenIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TokenIssuer(key {})", hex::encode(&self.id[..4]))
    }
}

impl TokenIssuer {
    pub fn generate() -> Result<Self, TokenError> {
        let server =
            VoprfServer::<Ristretto255>::new(&mut OsRng).map_err(|_| TokenError::BadKey)?;
        Ok(Self::wrap(server))
    }

    /// The key [`TokenIssuer::secret`] returned.
    pub fn from_secret(secret: &[u8]) -> Result<Self, TokenError> {
        let server =
            VoprfServer::<Ristretto255>::new_with_key(secret).map_err(|_| TokenError::BadKey)?;
        Ok(Self::wrap(server))
    }

    fn wrap(server: VoprfServer<Ristretto255>) -> Self {
        let public_key = Ristretto255::serialize_elem(server.get_public_key()).to_vec();
        let id = token_key_id(&public_key);
        TokenIssuer {
            server,
            public_key,
            id,
        }
    }

    pub fn secret(&self) -> Zeroizing<Vec<u8>> {
        // The serialized server is the scalar followed by the public key.
        let mut both = self.server.serialize();
        let secret = Zeroizing::new(both.iter().take(SECRET_BYTES).copied().collect());
        zeroize::Zeroize::zeroize(both.as_mut_slice());
        secret
    }

    pub fn id(&self) -> [u8; TOKEN_KEY_ID_BYTES] {
        self.id
    }

    pub fn public_key(&self) -> &[u8] {
        &self.public_key
    }

    /// Whether every blinded input is a valid element (checked before the
    /// line's allowance is charged for them).
    pub fn check_blinded(blinded: &[Vec<u8>]) -> Result<(), TokenError> {
        for b in blinded {
            blinded_element(b)?;
        }
        Ok(())
    }

    /// Signs blinded token inputs: the evaluated elements, in order, and
    /// one proof for all of them.
    pub fn issue(&self, blinded: &[Vec<u8>]) -> Result<(Vec<Vec<u8>>, Vec<u8>), TokenError> {
        let elements = blinded
            .iter()
            .map(|b| blinded_element(b))
            .collect::<Result<Vec<_>, _>>()?;
        let result = self
            .server
            .batch_blind_evaluate(&mut OsRng, &elements)
            .map_err(|_| TokenError::BadElement)?;
        let evaluated = result
            .messages
            .iter()
            .map(|m| m.serialize().to_vec())
            .collect();
        Ok((evaluated, result.proof.serialize().to_vec()))
    }

    /// Whether `token` was issued under this key (not whether it was spent).
    pub fn verify(&self, token: &SendToken) -> bool {
        if token.key_id != self.id {
            return false;
        }
        match self.server.evaluate(&token_input(&token.nonce)) {
            Ok(output) => bool::from(output.as_slice().ct_eq(&token.authenticator)),
            Err(_) => false,
        }
    }
}

/// The device's side: token inputs, blinded, waiting for the server's
/// answer. Never leaves the device.
pub struct TokenRequest {
    pending: Vec<([u8; TOKEN_NONCE_BYTES], VoprfClient<Ristretto255>)>,
}

impl std::fmt::Debug for TokenRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TokenRequest({} tokens)", self.pending.len())
    }
}

impl TokenRequest {
    /// `count` fresh token inputs and their blinded form, to send.
    pub fn new(count: usize) -> Result<(Self, Vec<Vec<u8>>), TokenError> {
        let mut pending = Vec::with_capacity(count);
        let mut blinded = Vec::with_capacity(count);
        for _ in 0..count {
            let mut nonce = [0u8; TOKEN_NONCE_BYTES];
            getrandom_fill(&mut nonce)?;
            let result = VoprfClient::<Ristretto255>::blind(&token_input(&nonce), &mut OsRng)
                .map_err(|_| TokenError::BadElement)?;
            blinded.push(result.message.serialize().to_vec());
            pending.push((nonce, result.state));
        }
        Ok((TokenRequest { pending }, blinded))
    }

    /// The tokens, once the server's answer is checked against the key it
    /// names. The server may sign fewer than asked (what is left of the
    /// line's daily allowance): the first ones, in order.
    pub fn finish(
        mut self,
        key_id: &[u8],
        public_key: &[u8],
        evaluated: &[Vec<u8>],
        proof: &[u8],
    ) -> Result<Vec<SendToken>, TokenError> {
        if evaluated.is_empty() || evaluated.len() > self.pending.len() {
            return Err(TokenError::WrongCount {
                asked: self.pending.len(),
                got: evaluated.len(),
            });
        }
        self.pending.truncate(evaluated.len());
        let id = token_key_id(public_key);
        if key_id != id {
            return Err(TokenError::WrongKeyId);
        }
        let key = Ristretto255::deserialize_elem(public_key).map_err(|_| TokenError::BadKey)?;
        let proof = Proof::<Ristretto255>::deserialize(proof).map_err(|_| TokenError::BadProof)?;
        let messages = evaluated
            .iter()
            .map(|e| EvaluationElement::<Ristretto255>::deserialize(e))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| TokenError::BadElement)?;
        let inputs: Vec<Vec<u8>> = self
            .pending
            .iter()
            .map(|(nonce, _)| token_input(nonce))
            .collect();
        let clients: Vec<VoprfClient<Ristretto255>> =
            self.pending.iter().map(|(_, c)| c.clone()).collect();
        let outputs = VoprfClient::batch_finalize(&inputs, &clients, &messages, &proof, key)
            .map_err(|_| TokenError::BadProof)?;
        self.pending
            .iter()
            .zip(outputs)
            .map(|((nonce, _), output)| {
                let output = output.map_err(|_| TokenError::BadElement)?;
                let authenticator = output
                    .as_slice()
                    .try_into()
                    .map_err(|_| TokenError::BadElement)?;
                Ok(SendToken {
                    key_id: id,
                    nonce: *nonce,
                    authenticator,
                })
            })
            .collect()
    }
}

fn getrandom_fill(bytes: &mut [u8]) -> Result<(), TokenError> {
    use rand_core::RngCore;
    OsRng
        .try_fill_bytes(bytes)
        .map_err(|_| TokenError::NoRandomness)
}

/// What an anonymous message's signature covers: the group, its epoch, the
/// time to keep it and the MLS message itself, under a domain label.
pub fn anonymous_signed_bytes(
    group: &GroupId,
    epoch: u64,
    ttl_seconds: u32,
    message: &[u8],
) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(64 + group.as_bytes().len() + message.len());
    bytes.extend_from_slice(b"umbra anonymous message v1\0");
    bytes.extend_from_slice(&(group.as_bytes().len() as u32).to_be_bytes());
    bytes.extend_from_slice(group.as_bytes());
    bytes.extend_from_slice(&epoch.to_be_bytes());
    bytes.extend_from_slice(&ttl_seconds.to_be_bytes());
    bytes.extend_from_slice(message);
    bytes
}

/// The per-epoch delivery key every member derives from the exporter
/// secret (`seed`, [`DELIVERY_KEY_BYTES`] long).
pub struct DeliveryKey(SigningKey);

impl std::fmt::Debug for DeliveryKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeliveryKey({})", hex::encode(&self.public()[..4]))
    }
}

impl DeliveryKey {
    pub fn from_seed(seed: &[u8; DELIVERY_KEY_BYTES]) -> Self {
        DeliveryKey(SigningKey::from_bytes(seed))
    }

    pub fn public(&self) -> [u8; DELIVERY_KEY_BYTES] {
        self.0.verifying_key().to_bytes()
    }

    pub fn sign(&self, group: &GroupId, epoch: u64, ttl_seconds: u32, message: &[u8]) -> [u8; 64] {
        self.0
            .sign(&anonymous_signed_bytes(group, epoch, ttl_seconds, message))
            .to_bytes()
    }
}

/// Whether `signature` is the delivery key `public`'s over the message.
pub fn verify_anonymous(
    public: &[u8; DELIVERY_KEY_BYTES],
    signature: &[u8; 64],
    group: &GroupId,
    epoch: u64,
    ttl_seconds: u32,
    message: &[u8],
) -> bool {
    let Ok(key) = VerifyingKey::from_bytes(public) else {
        return false;
    };
    let signature = ed25519_dalek::Signature::from_bytes(signature);
    key.verify_strict(
        &anonymous_signed_bytes(group, epoch, ttl_seconds, message),
        &signature,
    )
    .is_ok()
}

/// A fixed-size field of a frame.
pub(crate) fn fixed<const N: usize>(
    field: &'static str,
    bytes: &[u8],
) -> Result<[u8; N], DecodeError> {
    bytes.try_into().map_err(|_| {
        DecodeError::invalid(field, format!("expected {N} bytes, got {}", bytes.len()))
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn tokens_issued_verify_once_finished_and_forged_ones_do_not() {
        let issuer = TokenIssuer::generate().unwrap();
        let (request, blinded) = TokenRequest::new(3).unwrap();
        let (evaluated, proof) = issuer.issue(&blinded).unwrap();
        let tokens = request
            .finish(&issuer.id(), issuer.public_key(), &evaluated, &proof)
            .unwrap();
        assert_eq!(tokens.len(), 3);
        assert!(tokens.iter().all(|t| issuer.verify(t)));
        // The blinded inputs are not the nonces: nothing the server saw
        // at issuance appears in a token.
        for token in &tokens {
            assert!(
                blinded
                    .iter()
                    .all(|b| !b.windows(32).any(|w| w == token.nonce))
            );
        }
        let mut forged = tokens[0].clone();
        forged.nonce[0] ^= 1;
        assert!(!issuer.verify(&forged));
        let mut forged = tokens[0].clone();
        forged.authenticator[5] ^= 1;
        assert!(!issuer.verify(&forged));
        // Another key does not accept them.
        let other = TokenIssuer::generate().unwrap();
        assert!(!other.verify(&tokens[0]));
        // A key restored from its secret is the same key.
        let restored = TokenIssuer::from_secret(&issuer.secret()).unwrap();
        assert_eq!(restored.id(), issuer.id());
        assert!(restored.verify(&tokens[1]));
    }

    #[test]
    fn a_blinded_input_is_exactly_one_element() {
        let (_, blinded) = TokenRequest::new(1).unwrap();
        assert!(TokenIssuer::check_blinded(&blinded).is_ok());
        let mut longer = blinded.clone();
        longer[0].push(0);
        assert_eq!(
            TokenIssuer::check_blinded(&longer),
            Err(TokenError::BadElement)
        );
        let issuer = TokenIssuer::generate().unwrap();
        assert_eq!(issuer.issue(&longer).unwrap_err(), TokenError::BadElement);
        assert_eq!(
            TokenIssuer::check_blinded(&[vec![0; 32]]),
            Err(TokenError::BadElement),
            "the identity"
        );
    }

    #[test]
    fn an_answer_under_another_key_than_named_is_refused() {
        let issuer = TokenIssuer::generate().unwrap();
        let other = TokenIssuer::generate().unwrap();
        let (request, blinded) = TokenRequest::new(2).unwrap();
        // Evaluated under `other` (a key the server keeps for this line
        // alone, say) but presented as `issuer`'s.
        let (evaluated, proof) = other.issue(&blinded).unwrap();
        assert_eq!(
            request
                .finish(&issuer.id(), issuer.public_key(), &evaluated, &proof)
                .unwrap_err(),
            TokenError::BadProof
        );
        let (request, blinded) = TokenRequest::new(2).unwrap();
        let (evaluated, proof) = issuer.issue(&blinded).unwrap();
        assert_eq!(
            request
                .finish(&other.id(), issuer.public_key(), &evaluated, &proof)
                .unwrap_err(),
            TokenError::WrongKeyId
        );
    }

    #[test]
    fn a_delivery_signature_covers_group_epoch_ttl_and_message() {
        let key = DeliveryKey::from_seed(&[7; 32]);
        let group = GroupId::new(vec![1; 16]).unwrap();
        let other = GroupId::new(vec![2; 16]).unwrap();
        let signature = key.sign(&group, 4, 60, b"ciphertext");
        let public = key.public();
        assert!(verify_anonymous(
            &public,
            &signature,
            &group,
            4,
            60,
            b"ciphertext"
        ));
        assert!(!verify_anonymous(
            &public,
            &signature,
            &other,
            4,
            60,
            b"ciphertext"
        ));
        assert!(!verify_anonymous(
            &public,
            &signature,
            &group,
            5,
            60,
            b"ciphertext"
        ));
        assert!(!verify_anonymous(
            &public,
            &signature,
            &group,
            4,
            0,
            b"ciphertext"
        ));
        assert!(!verify_anonymous(
            &public,
            &signature,
            &group,
            4,
            60,
            b"ciphertexT"
        ));
        let stranger = DeliveryKey::from_seed(&[8; 32]);
        assert!(!verify_anonymous(
            &stranger.public(),
            &signature,
            &group,
            4,
            60,
            b"ciphertext"
        ));
    }
}
