//! The delivery service's validation of handshake messages: each group's
//! public MLS state is loaded from the store, the commit or proposal is
//! checked against it (`umbra_mls::PublicState`) on a blocking thread (a
//! commit in a group of a thousand costs milliseconds of CPU), and the
//! outcome is mapped to the protocol's typed errors.

use umbra_mls::{HandshakeError, PublicState, ValidCommit, ValidProposal};
use umbra_proto::{ErrorCode, ErrorReply, GroupId};
use umbra_store::GroupState;

/// Why a handshake message is refused, as the device sees it.
pub fn refusal(error: HandshakeError, commit: bool) -> ErrorReply {
    let code = match &error {
        HandshakeError::WrongEpoch { .. } => ErrorCode::StaleEpoch,
        HandshakeError::InvalidProposal(_) => ErrorCode::InvalidProposal,
        HandshakeError::State(_) => ErrorCode::Internal,
        HandshakeError::Malformed(_) | HandshakeError::InvalidGroupInfo(_) if !commit => {
            ErrorCode::InvalidProposal
        }
        _ => ErrorCode::InvalidCommit,
    };
    if code == ErrorCode::Internal {
        tracing::error!(%error, "a group's stored public state is unreadable");
    }
    let mut reply = ErrorReply::new(code, error.to_string());
    if let HandshakeError::WrongEpoch { group, .. } = error {
        reply.current_epoch = group;
    }
    reply
}

fn load(group_id: &GroupId, state: &GroupState) -> Result<PublicState, ErrorReply> {
    let Some(bytes) = &state.public_state else {
        return Err(ErrorReply::new(
            ErrorCode::InvalidCommit,
            "this group was registered before the server validated commits; create a new one",
        ));
    };
    PublicState::from_bytes(group_id.as_bytes(), bytes).map_err(|e| refusal(e, true))
}

/// Validates a commit against the group's state; returns what it does and
/// the state after it.
pub async fn validate_commit(
    group_id: GroupId,
    state: GroupState,
    commit: Vec<u8>,
    welcome: Option<Vec<u8>>,
) -> Result<(ValidCommit, Vec<u8>), ErrorReply> {
    blocking(move || {
        let mut public = load(&group_id, &state)?;
        let valid = public
            .process_commit(&commit, &state.proposals, welcome.as_deref())
            .map_err(|e| refusal(e, true))?;
        Ok((valid, public.to_bytes()))
    })
    .await
}

/// Validates a standalone proposal against the group's state.
pub async fn validate_proposal(
    group_id: GroupId,
    state: GroupState,
    proposal: Vec<u8>,
) -> Result<ValidProposal, ErrorReply> {
    blocking(move || {
        load(&group_id, &state)?
            .check_proposal(&proposal)
            .map_err(|e| refusal(e, false))
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
