//! The values front ends see: contacts, conversations, messages, events.

use std::fmt;

use serde::Serialize;
use umbra_proto::AccountId;

/// A conversation, named by its MLS group ID in hex.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct ConversationId(pub String);

impl ConversationId {
    pub fn from_group(group_id: &[u8]) -> Self {
        ConversationId(hex::encode(group_id))
    }

    pub fn group_id(&self) -> Option<Vec<u8>> {
        hex::decode(&self.0).ok()
    }
}

impl fmt::Display for ConversationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ContactState {
    /// We asked; they have not accepted yet.
    Outgoing,
    /// They asked; we have not accepted yet.
    Incoming,
    Accepted,
}

impl ContactState {
    pub(crate) fn parse(text: &str) -> Option<Self> {
        match text {
            "outgoing" => Some(ContactState::Outgoing),
            "incoming" => Some(ContactState::Incoming),
            "accepted" => Some(ContactState::Accepted),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Contact {
    pub account: AccountId,
    pub state: ContactState,
    /// The user compared safety numbers and marked them verified.
    pub verified: bool,
    /// The contact's identity key differs from the one first seen.
    pub key_changed: bool,
    /// The key changed while the contact was verified: nothing is sent to
    /// any conversation they are in until the user confirms the new
    /// safety number ([`crate::Client::verify_contact`]) or accepts the new
    /// key unverified ([`crate::Client::accept_key_change`]).
    pub key_unconfirmed: bool,
    /// The one-to-one conversation, once it exists.
    pub conversation: Option<ConversationId>,
}

/// One device of an account, as its verified device log lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Device {
    pub id: umbra_proto::DeviceId,
    /// The device's public key, hex (the account key for device 1).
    pub key: String,
    /// Chosen by whoever added it; the server and contacts see it.
    pub name: String,
    /// Unix seconds, by the adding device's clock.
    pub added_at: u64,
    pub added_by: umbra_proto::DeviceId,
    /// Unix seconds (by the removing device's clock) and the device that
    /// removed it; `None` for a current device.
    pub removed_at: Option<u64>,
    pub removed_by: Option<umbra_proto::DeviceId>,
    /// This is the device asking.
    pub this_device: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ConversationKind {
    Direct { peer: AccountId },
    Group,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Conversation {
    pub id: ConversationId,
    #[serde(flatten)]
    pub kind: ConversationKind,
    pub name: String,
    /// False once this device was removed or left.
    pub active: bool,
    /// The disappearing timer every member enforces, in seconds; 0 is off.
    pub disappear_after: u32,
    pub members: Vec<AccountId>,
    /// The MLS ciphersuite the conversation uses (in JSON, its name, such
    /// as MLS_128_MLKEM768X25519_AES128GCM_SHA256_Ed25519); None once this
    /// device left it.
    #[serde(serialize_with = "suite_name")]
    pub suite: Option<umbra_mls::Suite>,
}

fn suite_name<S: serde::Serializer>(
    suite: &Option<umbra_mls::Suite>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match suite {
        Some(suite) => serializer.serialize_str(suite.name()),
        None => serializer.serialize_none(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    In,
    Out,
    /// A line the client wrote itself: "X added Y".
    System,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryState {
    /// Encrypted, not yet accepted by the server.
    Sending,
    /// Stored by the server for every recipient.
    Sent,
    /// A recipient's device has it.
    Delivered,
    /// A recipient has seen it.
    Read,
    /// The server refused it or could not be reached.
    Failed,
    Received,
}

impl DeliveryState {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            DeliveryState::Sending => "sending",
            DeliveryState::Sent => "sent",
            DeliveryState::Delivered => "delivered",
            DeliveryState::Read => "read",
            DeliveryState::Failed => "failed",
            DeliveryState::Received => "received",
        }
    }

    pub(crate) fn parse(text: &str) -> DeliveryState {
        match text {
            "sending" => DeliveryState::Sending,
            "sent" => DeliveryState::Sent,
            "delivered" => DeliveryState::Delivered,
            "read" => DeliveryState::Read,
            "received" => DeliveryState::Received,
            _ => DeliveryState::Failed,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Message {
    pub id: i64,
    pub conversation: ConversationId,
    pub sender: AccountId,
    pub direction: Direction,
    pub body: String,
    pub state: DeliveryState,
    /// Unix seconds: when it was sent. Theirs by the sender's clock (which
    /// this device cannot check), never later than it arrived; system
    /// lines when what they report happened here.
    pub timestamp: u64,
    /// Theirs: when this device received it (Unix seconds). Later than
    /// `timestamp` when the device was away or the message waited.
    pub received_at: Option<u64>,
    /// When this copy disappears (Unix seconds), if it does: ours from when
    /// they were sent, theirs from when first shown.
    pub expires_at: Option<u64>,
    /// The conversation's timer when the message was sent, in seconds.
    pub disappear_after: u32,
    /// The file it carries, if it carries one (`body` is then its caption).
    pub attachment: Option<AttachmentInfo>,
}

/// What front ends show of a message's file. The name is the sender's:
/// escape it before showing it, and never use it as a path unchecked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AttachmentInfo {
    pub name: String,
    /// The file's size in bytes.
    pub size: u64,
    pub mime_type: String,
    pub state: AttachmentState,
    /// Voice notes: their length.
    pub duration_ms: u32,
    /// Photos: whether a thumbnail came with it (`Client::thumbnail`).
    pub has_thumbnail: bool,
    /// Voice notes: one level (0-255) per slice of time, as sent.
    pub waveform: Vec<u8>,
}

/// Where a message's file stands on this device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AttachmentState {
    /// This device sent it; its sealed copy is here.
    Sent,
    /// Received; not fetched from the server yet.
    Available,
    /// Fetched; its sealed copy is here and can be saved.
    Fetched,
    /// The server no longer has it and this device never fetched it.
    Gone,
    /// What the server gave did not open under its key or match its
    /// digest; fetched again only when asked.
    Invalid,
}

impl AttachmentState {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            AttachmentState::Sent => "sent",
            AttachmentState::Available => "available",
            AttachmentState::Fetched => "fetched",
            AttachmentState::Gone => "gone",
            AttachmentState::Invalid => "invalid",
        }
    }

    pub(crate) fn parse(text: &str) -> Self {
        match text {
            "sent" => AttachmentState::Sent,
            "fetched" => AttachmentState::Fetched,
            "available" => AttachmentState::Available,
            "invalid" => AttachmentState::Invalid,
            _ => AttachmentState::Gone,
        }
    }

    /// Whether its sealed copy is on this device.
    pub fn is_here(self) -> bool {
        matches!(self, AttachmentState::Sent | AttachmentState::Fetched)
    }
}

/// How much later than it was sent a message must arrive for history to
/// show both times.
pub const SHOWN_DELAY: u64 = 60;

impl Message {
    /// When this message arrived, if that was [`SHOWN_DELAY`] or more after
    /// it was sent (the device was away, or the message waited): worth
    /// showing beside the time it was sent.
    pub fn arrived_late(&self) -> Option<u64> {
        self.received_at
            .filter(|&at| at >= self.timestamp.saturating_add(SHOWN_DELAY))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ConnectionState {
    Connected,
    Disconnected,
}

/// Everything a front end needs to redraw, in the order it happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Event {
    MessageReceived {
        message: Message,
    },
    /// A file going up or coming down: `done` of `total` bytes (sealed).
    Transfer {
        message_id: Option<i64>,
        name: String,
        upload: bool,
        done: u64,
        total: u64,
    },
    DeliveryStateChanged {
        message_id: i64,
        state: DeliveryState,
    },
    ContactRequest {
        from: AccountId,
    },
    ContactAccepted {
        by: AccountId,
    },
    ConversationStarted {
        conversation: Conversation,
    },
    ConversationChanged {
        conversation: Conversation,
    },
    /// A contact's identity key is not the one seen before: compare safety
    /// numbers again before trusting the conversation. `sending_stopped`
    /// when the contact was verified: nothing goes to them until the user
    /// confirms (see [`Contact::key_unconfirmed`]).
    KeyChanged {
        account: AccountId,
        sending_stopped: bool,
    },
    Connection {
        state: ConnectionState,
    },
    /// Everything stored at the server while offline has been processed.
    Synced,
    /// Disappearing messages reached their time and were erased.
    MessagesExpired {
        message_ids: Vec<i64>,
    },
    /// This device was wiped (remote wipe, or at the user's request): its
    /// store is gone and this client can do nothing more.
    Wiped,
    /// A wipe command arrived that is not signed with this device's wipe
    /// code (for example one forged by the server); it was ignored.
    WipeRefused,
    /// Something arrived "from" `from` that this device did not ask for or
    /// that is not under the key it pinned for them (what a server standing
    /// in for a contact would send); nothing of it was applied.
    Refused {
        from: AccountId,
        reason: Refusal,
    },
    /// A delivery could never be applied (malformed, not decryptable, from
    /// an epoch that is gone); it was set aside and acknowledged, so it
    /// does not hold up the ones after it. `from`: the account a server
    /// notice named; `None` for a conversation's message, whose sender only
    /// MLS could have told (the server does not say). `reason` says what
    /// was wrong with it.
    Discarded {
        from: Option<AccountId>,
        reason: String,
    },
    /// The server reports that `dropped` messages for this device were not
    /// kept because its mailbox there was full (the device was away while
    /// more arrived than the server keeps for one device). Their senders
    /// were not told.
    MailboxOverflow {
        dropped: u64,
    },
    /// The server broke the protocol in a way that could exhaust this
    /// device (`what` says how); the connection was dropped. Nothing that
    /// was not applied was acknowledged, so reconnecting loses nothing.
    ServerMisbehaved {
        what: String,
    },
}

/// Why a delivery was refused (see [`Event::Refused`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Refusal {
    /// A contact acceptance for a request this device never sent.
    UnaskedAcceptance,
    /// A group invitation from someone who is not an accepted contact.
    InvitationFromStranger,
    /// A group invitation signed under another key than the contact's
    /// pinned one.
    InvitationUnderAnotherKey,
    /// A KeyPackage for the contact under another key than the pinned one
    /// (the server handing out a key of its own to be added instead).
    KeyPackageUnderAnotherKey,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Refusal::UnaskedAcceptance => "an acceptance of a contact request you never sent",
            Refusal::InvitationFromStranger => "a group invitation from someone not your contact",
            Refusal::InvitationUnderAnotherKey => {
                "a group invitation signed with another key than the one you know for them"
            }
            Refusal::KeyPackageUnderAnotherKey => {
                "a KeyPackage (the key to add them to a conversation) under another key than the one you know for them"
            }
        })
    }
}
