//! The delivery service's validation of handshake messages: each group's
//! public MLS state is loaded from the store, the GroupInfo, commit or
//! proposal is checked against it (`umbra_mls::PublicState`) on a blocking
//! thread (a commit in a group of a thousand costs milliseconds of CPU, a
//! GroupInfo may carry a large tree), and the outcome is mapped to the
//! protocol's typed errors.

use umbra_mls::{HandshakeError, PublicState, ValidCommit};
use umbra_proto::{AccountId, ErrorCode, ErrorReply, GroupId, IdentityKey};
use umbra_store::GroupState;

/// Why a handshake message is refused, as the device sees it; `refused` is
/// the code for a message that is malformed or does not validate.
fn refusal(error: HandshakeError, refused: ErrorCode) -> ErrorReply {
    let code = match &error {
        HandshakeError::WrongEpoch { .. } => ErrorCode::StaleEpoch,
        HandshakeError::State(_) => {
            tracing::error!(%error, "validating against a group's stored public state failed");
            ErrorCode::Internal
        }
        _ => refused,
    };
    let mut reply = ErrorReply::new(code, error.to_string());
    if let HandshakeError::WrongEpoch { group, .. } = error {
        reply.current_epoch = group;
    }
    reply
}

fn load(
    group_id: &GroupId,
    state: &GroupState,
    refused: ErrorCode,
) -> Result<PublicState, ErrorReply> {
    let Some(bytes) = &state.public_state else {
        return Err(ErrorReply::new(
            refused,
            "this group was registered before the server validated commits; create a new one",
        ));
    };
    PublicState::from_bytes(group_id.as_bytes(), bytes).map_err(|e| refusal(e, refused))
}

/// Checks a new group's GroupInfo (its creator alone, at epoch 0) and
/// returns the group's public state to store.
pub async fn validate_group_info(
    group_id: GroupId,
    group_info: Vec<u8>,
    creator: AccountId,
    (creator_key, account_key): (IdentityKey, IdentityKey),
) -> Result<Vec<u8>, ErrorReply> {
    blocking(move || {
        PublicState::from_group_info(
            group_id.as_bytes(),
            &group_info,
            &creator,
            (&creator_key, &account_key),
        )
        .map(|state| state.to_bytes())
        .map_err(|e| refusal(e, ErrorCode::InvalidRequest))
    })
    .await
}

/// Validates a commit against the group's state; returns what it does and
/// the state after it.
/// The commit must come with the GroupInfo of the epoch it starts (kept
/// for members who must rejoin), which must be exactly that state.
pub async fn validate_commit(
    group_id: GroupId,
    state: GroupState,
    commit: Vec<u8>,
    welcome: Option<Vec<u8>>,
    group_info: Vec<u8>,
) -> Result<(ValidCommit, Vec<u8>), ErrorReply> {
    let refused = ErrorCode::InvalidCommit;
    blocking(move || {
        let (valid, after) = load(&group_id, &state, refused)?
            .process_commit(&commit, &state.proposals, welcome.as_deref())
            .map_err(|e| refusal(e, refused))?;
        after
            .check_group_info(&group_info, &valid.sender)
            .map_err(|e| refusal(e, refused))?;
        Ok((valid, after.to_bytes()))
    })
    .await
}

/// Validates a standalone proposal against the group's state; returns the
/// member device it is from (which is leaving).
pub async fn validate_proposal(
    group_id: GroupId,
    state: GroupState,
    proposal: Vec<u8>,
) -> Result<umbra_proto::DeviceAddr, ErrorReply> {
    let refused = ErrorCode::InvalidProposal;
    blocking(move || {
        load(&group_id, &state, refused)?
            .check_proposal(&proposal, &state.proposals)
            .map_err(|e| refusal(e, refused))
    })
    .await
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, ErrorReply> + Send + 'static,
) -> Result<T, ErrorReply> {
    tokio::task::spawn_blocking(work).await.unwrap_or_else(|_| {
        Err(ErrorReply::new(
            ErrorCode::Internal,
            "the server could not complete the request; try again",
        ))
    })
}
