//! The full-screen app's state and how keys change it. Pure: no terminal,
//! no network. A key either changes the state or asks for an [`Action`],
//! which the run loop performs off the drawing loop.

use std::time::Duration;

use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use umbra_client::{AccountId, Contact, Conversation, ConversationId, ConversationKind, Message};

/// Conversations pane narrower than this many columns: one pane at a time.
pub const NARROW: u16 = 80;

/// Timer choices in the picker, in seconds (0 = off).
pub const TIMERS: [u32; 9] = [0, 5, 30, 60, 300, 3600, 86_400, 604_800, 2_419_200];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    Connecting,
    Connected,
    Reconnecting,
    CertificateMismatch,
    /// The server's certificate expired (or is not yet valid) by this
    /// device's clock.
    CertificateOutOfDate,
}

/// What fills the terminal. Its `Debug` shows no passphrase, activation
/// string or wipe code.
#[derive(Clone, PartialEq, Eq)]
pub enum Screen {
    /// No device here yet: `umbra activate`'s steps, on screen.
    Setup {
        step: Setup,
        input: String,
        error: Option<String>,
    },
    /// Just activated: the wipe code, shown this once.
    WipeCode {
        account: String,
        code: String,
        qr: String,
    },
    Unlock {
        input: String,
        error: Option<String>,
    },
    Main,
}

impl std::fmt::Debug for Screen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Screen::Setup { step, error, .. } => f
                .debug_struct("Setup")
                .field("step", step)
                .field("error", error)
                .finish_non_exhaustive(),
            Screen::WipeCode { account, .. } => f
                .debug_struct("WipeCode")
                .field("account", account)
                .finish_non_exhaustive(),
            Screen::Unlock { error, .. } => f
                .debug_struct("Unlock")
                .field("error", error)
                .finish_non_exhaustive(),
            Screen::Main => f.write_str("Main"),
        }
    }
}

/// Where setting up a device is; what was entered so far goes along.
#[derive(Clone, PartialEq, Eq)]
pub enum Setup {
    /// Pasting the activation string (`umbra://…`) from the operator or
    /// distributor, or a device link (`umbra-link://…`) from `umbra
    /// devices link` on another device of the account.
    Activation,
    /// Choosing the passphrase that opens this device's store.
    Passphrase { activation: String },
    /// Typing it again.
    Repeat {
        activation: String,
        passphrase: String,
    },
    /// Waiting for the server.
    Activating,
}

impl std::fmt::Debug for Setup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Setup::Activation => "Activation",
            Setup::Passphrase { .. } => "Passphrase",
            Setup::Repeat { .. } => "Repeat",
            Setup::Activating => "Activating",
        })
    }
}

/// Shortest passphrase a new device accepts (as `umbra activate`).
pub const MIN_PASSPHRASE: usize = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Focus {
    Conversations,
    Compose,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Overlay {
    None,
    Help,
    Requests {
        selected: usize,
    },
    NewContact {
        input: String,
    },
    NewGroup {
        name: String,
        members: String,
        on_members: bool,
    },
    Members {
        input: String,
    },
    Timer {
        selected: usize,
    },
    Safety {
        account: AccountId,
        digits: String,
        qr: String,
    },
    /// The path of a file to send into the open conversation.
    AttachFile {
        input: String,
    },
    /// Where to save message `message`'s file.
    SaveFile {
        message: i64,
        input: String,
    },
    /// A voice note just recorded, kept as draft `draft`: send it,
    /// listen to it, delete it, or keep it for later.
    VoiceDraft {
        conversation: ConversationId,
        /// Who it goes to, as the list names them.
        to: String,
        draft: i64,
        duration_ms: u32,
    },
    /// A whole photo (`App::photo`), drawn through the terminal's
    /// graphics protocol or with half blocks.
    Photo {
        name: String,
    },
    /// A photo's thumbnail, drawn with half blocks.
    Picture {
        name: String,
        picture: umbra_client::thumbnail::Picture,
    },
}

/// Work for the run loop. Its `Debug` shows no passphrase or activation
/// string.
#[derive(Clone, PartialEq, Eq)]
pub enum Action {
    Unlock(String),
    Activate {
        activation: String,
        passphrase: String,
    },
    Send(ConversationId, String),
    /// To a group, on a connection that does not log in.
    SendAnonymously(ConversationId, String),
    Open(ConversationId),
    Accept(AccountId),
    Decline(AccountId),
    AddContact(AccountId),
    CreateGroup(String, Vec<AccountId>),
    AddMembers(ConversationId, Vec<AccountId>),
    RemoveMembers(ConversationId, Vec<AccountId>),
    SetTimer(ConversationId, Option<Duration>),
    ShowSafety(AccountId),
    MarkVerified(AccountId),
    SendFile(ConversationId, std::path::PathBuf),
    SaveFile(i64, std::path::PathBuf),
    ShowPicture(i64),
    /// Start recording a voice note for the conversation.
    RecordVoice(ConversationId),
    /// End the recording under way (kept as a draft).
    StopRecording,
    /// Play a voice note at one of `SPEEDS`.
    PlayVoice(umbra_client::VoiceSource, usize),
    StopPlaying,
    SendVoiceDraft(ConversationId, i64),
    DiscardVoiceDraft(i64),
    Quit,
}

impl std::fmt::Debug for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Action::Unlock(_) => f.write_str("Unlock(..)"),
            Action::Activate { .. } => f.write_str("Activate { .. }"),
            Action::Send(id, _) => write!(f, "Send({id}, ..)"),
            Action::SendAnonymously(id, _) => write!(f, "SendAnonymously({id}, ..)"),
            Action::Open(id) => write!(f, "Open({id})"),
            Action::Accept(a) => write!(f, "Accept({a})"),
            Action::Decline(a) => write!(f, "Decline({a})"),
            Action::AddContact(a) => write!(f, "AddContact({a})"),
            Action::CreateGroup(_, members) => write!(f, "CreateGroup(.., {members:?})"),
            Action::AddMembers(id, members) => write!(f, "AddMembers({id}, {members:?})"),
            Action::RemoveMembers(id, members) => write!(f, "RemoveMembers({id}, {members:?})"),
            Action::SetTimer(id, timer) => write!(f, "SetTimer({id}, {timer:?})"),
            Action::ShowSafety(a) => write!(f, "ShowSafety({a})"),
            Action::MarkVerified(a) => write!(f, "MarkVerified({a})"),
            Action::SendFile(id, _) => write!(f, "SendFile({id}, ..)"),
            Action::SaveFile(message, _) => write!(f, "SaveFile({message}, ..)"),
            Action::ShowPicture(message) => write!(f, "ShowPicture({message})"),
            Action::RecordVoice(id) => write!(f, "RecordVoice({id})"),
            Action::StopRecording => f.write_str("StopRecording"),
            Action::PlayVoice(source, speed) => {
                write!(
                    f,
                    "PlayVoice({source:?}, {}x)",
                    SPEEDS[*speed % SPEEDS.len()]
                )
            }
            Action::StopPlaying => f.write_str("StopPlaying"),
            Action::SendVoiceDraft(id, draft) => write!(f, "SendVoiceDraft({id}, {draft})"),
            Action::DiscardVoiceDraft(draft) => write!(f, "DiscardVoiceDraft({draft})"),
            Action::Quit => f.write_str("Quit"),
        }
    }
}

#[derive(Debug)]
pub struct App {
    pub screen: Screen,
    pub focus: Focus,
    pub overlay: Overlay,
    pub account: String,
    pub link: Link,
    pub conversations: Vec<Conversation>,
    pub contacts: Vec<Contact>,
    pub unread: Vec<(ConversationId, usize)>,
    pub previews: Vec<(ConversationId, String)>,
    pub selected: usize,
    /// The open conversation's messages, oldest first.
    pub messages: Vec<Message>,
    /// Lines scrolled up from the bottom of the conversation.
    pub scroll: u16,
    pub compose: String,
    /// A key-change warning, shown until dismissed.
    pub banner: Option<String>,
    /// The last error or notice, in the status bar.
    pub status: Option<String>,
    /// Work in flight: the status bar shows a spinner.
    pub busy: usize,
    pub tick: u64,
    pub now: u64,
    /// In a narrow terminal: whether the conversation (not the list) shows.
    pub showing_conversation: bool,
    /// Wide enough for both panes: the selected conversation is on screen.
    pub wide: bool,
    /// What is written to a group goes without logging in (Ctrl-A while
    /// writing turns it on and off).
    pub anonymous: bool,
    /// A voice note being recorded: its length so far and its level.
    pub recording: Option<(u32, u8)>,
    /// A voice note is playing.
    pub playing: bool,
    /// Which of `SPEEDS` voice notes play at (Ctrl-E changes it).
    pub speed: usize,
    /// The photo `Overlay::Photo` shows, ready for the terminal.
    pub photo: Option<PhotoView>,
}

/// A photo encoded for the terminal's graphics protocol, at the size of
/// the screen when it was opened. Its `Debug` shows none of it.
pub struct PhotoView(pub ratatui_image::protocol::Protocol);

impl std::fmt::Debug for PhotoView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PhotoView(..)")
    }
}

/// The speeds voice notes play at.
pub const SPEEDS: [f32; 3] = [1.0, 1.5, 2.0];

impl Default for App {
    fn default() -> Self {
        App {
            screen: Screen::Unlock {
                input: String::new(),
                error: None,
            },
            focus: Focus::Conversations,
            overlay: Overlay::None,
            account: String::new(),
            link: Link::Connecting,
            conversations: Vec::new(),
            contacts: Vec::new(),
            unread: Vec::new(),
            previews: Vec::new(),
            selected: 0,
            messages: Vec::new(),
            scroll: 0,
            compose: String::new(),
            banner: None,
            status: None,
            busy: 0,
            tick: 0,
            now: 0,
            showing_conversation: false,
            wide: true,
            anonymous: false,
            recording: None,
            playing: false,
            speed: 0,
            photo: None,
        }
    }
}

/// A path typed by the person, with a leading `~/` meaning their home.
fn expand_home(path: &str) -> std::path::PathBuf {
    match (path.strip_prefix("~/"), std::env::var_os("HOME")) {
        (Some(rest), Some(home)) => std::path::PathBuf::from(home).join(rest),
        _ => std::path::PathBuf::from(path),
    }
}

fn parse_accounts(text: &str) -> Result<Vec<AccountId>, String> {
    text.split([',', ' '])
        .filter(|part| !part.is_empty())
        .map(|part| AccountId::parse(part).map_err(|_| format!("{part:?} is not an account ID")))
        .collect()
}

impl App {
    pub fn current(&self) -> Option<&Conversation> {
        self.conversations.get(self.selected)
    }

    /// What a conversation is called in the list and the title bar.
    pub fn title(conversation: &Conversation) -> String {
        match &conversation.kind {
            ConversationKind::Direct { peer } => peer.to_string(),
            ConversationKind::Group if conversation.name.is_empty() => "(group)".into(),
            ConversationKind::Group => conversation.name.clone(),
        }
    }

    /// Whether the selected conversation is on screen now.
    pub fn conversation_visible(&self) -> bool {
        self.wide || self.showing_conversation
    }

    pub fn unread(&self, id: &ConversationId) -> usize {
        self.unread
            .iter()
            .find(|(c, _)| c == id)
            .map_or(0, |(_, n)| *n)
    }

    pub fn requests(&self) -> Vec<&Contact> {
        self.contacts
            .iter()
            .filter(|c| c.state == umbra_client::ContactState::Incoming)
            .collect()
    }

    fn open_selected(&mut self) -> Option<Action> {
        let id = self.current()?.id.clone();
        self.unread.retain(|(c, _)| *c != id);
        self.scroll = 0;
        self.showing_conversation = true;
        self.focus = Focus::Compose;
        // Anonymous sending is chosen each time, for one conversation.
        self.anonymous = false;
        Some(Action::Open(id))
    }

    /// Handles one key; returns work for the run loop, if any.
    pub fn on_key(&mut self, key: KeyEvent) -> Option<Action> {
        if key.modifiers.contains(KeyModifiers::CONTROL) && key.code == KeyCode::Char('c') {
            return Some(Action::Quit);
        }
        if let Screen::Setup { .. } = self.screen {
            return self.on_setup_key(key);
        }
        if let Screen::WipeCode { .. } = self.screen {
            if key.code == KeyCode::Enter {
                self.screen = Screen::Main;
            }
            return None;
        }
        if let Screen::Unlock { input, error } = &mut self.screen {
            match key.code {
                KeyCode::Enter if !input.is_empty() => {
                    *error = None;
                    return Some(Action::Unlock(std::mem::take(input)));
                }
                KeyCode::Backspace => {
                    input.pop();
                }
                KeyCode::Esc => return Some(Action::Quit),
                KeyCode::Char(c) => input.push(c),
                _ => {}
            }
            return None;
        }
        match std::mem::replace(&mut self.overlay, Overlay::None) {
            Overlay::None => {}
            overlay => return self.on_overlay_key(overlay, key),
        }
        if self.banner.is_some() && key.code == KeyCode::Esc {
            self.banner = None;
            return None;
        }
        match self.focus {
            Focus::Conversations => self.on_list_key(key),
            Focus::Compose => self.on_compose_key(key),
        }
    }

    /// A new device, as `umbra activate` sets it up: the activation
    /// string, a passphrase typed twice, then the server. Esc goes back a
    /// step (and from the first, quits).
    fn on_setup_key(&mut self, key: KeyEvent) -> Option<Action> {
        let Screen::Setup { step, input, error } = &mut self.screen else {
            return None;
        };
        if *step == Setup::Activating {
            // Waiting for the server: nothing typed now would mean anything
            // (Ctrl-C still quits).
            return None;
        }
        match key.code {
            // As on the unlock screen, whatever the modifiers: a character
            // the passphrase was chosen with is one that unlocks it.
            KeyCode::Char(c) => {
                input.push(c);
                return None;
            }
            KeyCode::Backspace => {
                input.pop();
                return None;
            }
            KeyCode::Esc => {
                *error = None;
                input.clear();
                *step = match std::mem::replace(step, Setup::Activation) {
                    Setup::Activation => return Some(Action::Quit),
                    // Back to the string, to correct it.
                    Setup::Passphrase { activation } => {
                        *input = activation;
                        Setup::Activation
                    }
                    Setup::Activating => Setup::Activating,
                    Setup::Repeat { activation, .. } => Setup::Passphrase { activation },
                };
                return None;
            }
            KeyCode::Enter => {}
            _ => return None,
        }
        let entered = std::mem::take(input);
        *error = None;
        match std::mem::replace(step, Setup::Activating) {
            Setup::Activation => {
                let activation = entered.trim().to_owned();
                // A device link from the account's other device works too.
                let link = activation.starts_with("umbra-link://");
                let parsed = if link {
                    activation
                        .parse::<umbra_client::LinkString>()
                        .map(|_| ())
                        .map_err(|problem| {
                            format!(
                                "Not a device link ({problem}): it looks like \
                                 umbra-link://HOST:PORT/…?pin=…"
                            )
                        })
                } else {
                    activation
                        .parse::<umbra_client::ActivationString>()
                        .map(|_| ())
                        .map_err(|problem| {
                            format!(
                                "Not an activation string ({problem}): it looks like \
                                 umbra://HOST:PORT/CODE?pin=…"
                            )
                        })
                };
                if let Err(problem) = parsed {
                    *step = Setup::Activation;
                    *input = activation;
                    *error = Some(problem);
                } else {
                    *step = Setup::Passphrase { activation };
                }
                None
            }
            Setup::Passphrase { activation } => {
                if entered.chars().count() < MIN_PASSPHRASE {
                    *error = Some(format!(
                        "Choose a passphrase of at least {MIN_PASSPHRASE} characters"
                    ));
                    *step = Setup::Passphrase { activation };
                } else {
                    *step = Setup::Repeat {
                        activation,
                        passphrase: entered,
                    };
                }
                None
            }
            Setup::Repeat {
                activation,
                passphrase,
            } => {
                if entered != passphrase {
                    *error = Some("The passphrases differ: choose it again".into());
                    *step = Setup::Passphrase { activation };
                    return None;
                }
                Some(Action::Activate {
                    activation,
                    passphrase,
                })
            }
            Setup::Activating => None,
        }
    }

    fn on_list_key(&mut self, key: KeyEvent) -> Option<Action> {
        match key.code {
            KeyCode::Char('q') => return Some(Action::Quit),
            KeyCode::Char('?') => self.overlay = Overlay::Help,
            KeyCode::Down | KeyCode::Char('j') if self.selected + 1 < self.conversations.len() => {
                self.selected += 1;
                return self.preview_selected();
            }
            KeyCode::Up | KeyCode::Char('k') if self.selected > 0 => {
                self.selected -= 1;
                return self.preview_selected();
            }
            KeyCode::Enter | KeyCode::Tab | KeyCode::Right | KeyCode::Char('l') => {
                return self.open_selected();
            }
            KeyCode::Char('r') => self.overlay = Overlay::Requests { selected: 0 },
            KeyCode::Char('n') => {
                self.overlay = Overlay::NewContact {
                    input: String::new(),
                }
            }
            KeyCode::Char('g') => {
                self.overlay = Overlay::NewGroup {
                    name: String::new(),
                    members: String::new(),
                    on_members: false,
                }
            }
            KeyCode::Char('m') if self.current().is_some() => {
                self.overlay = Overlay::Members {
                    input: String::new(),
                }
            }
            KeyCode::Char('t') => {
                if let Some(current) = self.current() {
                    let selected = TIMERS
                        .iter()
                        .position(|t| *t == current.disappear_after)
                        .unwrap_or(0);
                    self.overlay = Overlay::Timer { selected };
                }
            }
            KeyCode::Char('s') => {
                if let Some(ConversationKind::Direct { peer }) = self.current().map(|c| &c.kind) {
                    return Some(Action::ShowSafety(peer.clone()));
                }
            }
            _ => {}
        }
        None
    }

    /// Moving the selection in the list shows that conversation too, but
    /// keeps the focus on the list.
    fn preview_selected(&mut self) -> Option<Action> {
        let id = self.current()?.id.clone();
        self.unread.retain(|(c, _)| *c != id);
        self.scroll = 0;
        self.anonymous = false;
        Some(Action::Open(id))
    }

    /// Whether what is written now goes anonymously: turned on, and the
    /// conversation is a group (in a one-to-one conversation the server
    /// knows the other member anyway).
    pub fn sending_anonymously(&self) -> bool {
        self.anonymous
            && self
                .current()
                .is_some_and(|c| matches!(c.kind, ConversationKind::Group))
    }

    /// The newest message of the open conversation that carries a file.
    pub fn latest_file(&self) -> Option<&Message> {
        self.messages.iter().rev().find(|m| m.attachment.is_some())
    }

    fn on_compose_key(&mut self, key: KeyEvent) -> Option<Action> {
        if key.modifiers.contains(KeyModifiers::CONTROL) && key.code == KeyCode::Char('f') {
            self.overlay = Overlay::AttachFile {
                input: String::new(),
            };
            return None;
        }
        if key.modifiers.contains(KeyModifiers::CONTROL) && key.code == KeyCode::Char('s') {
            match self.latest_file() {
                Some(message) => {
                    let name = message
                        .attachment
                        .as_ref()
                        .map(|file| umbra_client::safe_file_name(&file.name))
                        .unwrap_or_default();
                    self.overlay = Overlay::SaveFile {
                        message: message.id,
                        input: name,
                    };
                }
                None => self.status = Some("No file in this conversation".into()),
            }
            return None;
        }
        if key.modifiers.contains(KeyModifiers::CONTROL) && key.code == KeyCode::Char('v') {
            let photo = self.messages.iter().rev().find(|m| {
                m.attachment.as_ref().is_some_and(|f| {
                    f.has_thumbnail || matches!(f.mime_type.as_str(), "image/jpeg" | "image/png")
                })
            });
            match photo {
                Some(message) => return Some(Action::ShowPicture(message.id)),
                None => self.status = Some("No photo in this conversation".into()),
            }
            return None;
        }
        if key.modifiers.contains(KeyModifiers::CONTROL) && key.code == KeyCode::Char('r') {
            if self.recording.is_some() {
                return Some(Action::StopRecording);
            }
            let id = self.current()?.id.clone();
            self.recording = Some((0, 0));
            return Some(Action::RecordVoice(id));
        }
        if key.modifiers.contains(KeyModifiers::CONTROL) && key.code == KeyCode::Char('p') {
            if self.playing {
                return Some(Action::StopPlaying);
            }
            let note = self.messages.iter().rev().find(|m| {
                m.attachment
                    .as_ref()
                    .is_some_and(|f| f.duration_ms > 0 && f.mime_type.starts_with("audio/ogg"))
            });
            match note {
                Some(message) => {
                    self.playing = true;
                    return Some(Action::PlayVoice(
                        umbra_client::VoiceSource::Message(message.id),
                        self.speed,
                    ));
                }
                None => self.status = Some("No voice note in this conversation".into()),
            }
            return None;
        }
        if key.modifiers.contains(KeyModifiers::CONTROL) && key.code == KeyCode::Char('e') {
            self.speed = (self.speed + 1) % SPEEDS.len();
            self.status = Some(format!("Voice notes play at {}x", SPEEDS[self.speed]));
            return None;
        }
        if key.modifiers.contains(KeyModifiers::CONTROL) && key.code == KeyCode::Char('a') {
            if self
                .current()
                .is_some_and(|c| matches!(c.kind, ConversationKind::Group))
            {
                self.anonymous = !self.anonymous;
            } else {
                self.status = Some("Anonymous sending is for groups".into());
            }
            return None;
        }
        match key.code {
            KeyCode::Esc | KeyCode::Tab => {
                self.focus = Focus::Conversations;
                self.showing_conversation = false;
            }
            KeyCode::Enter => {
                let text = self.compose.trim().to_owned();
                if text.is_empty() {
                    return None;
                }
                let id = self.current()?.id.clone();
                let anonymous = self.sending_anonymously();
                self.compose.clear();
                self.scroll = 0;
                return Some(if anonymous {
                    Action::SendAnonymously(id, text)
                } else {
                    Action::Send(id, text)
                });
            }
            KeyCode::Backspace => {
                self.compose.pop();
            }
            KeyCode::PageUp | KeyCode::Up => self.scroll = self.scroll.saturating_add(3),
            KeyCode::PageDown | KeyCode::Down => self.scroll = self.scroll.saturating_sub(3),
            KeyCode::Char(c) => self.compose.push(c),
            _ => {}
        }
        None
    }

    fn on_overlay_key(&mut self, overlay: Overlay, key: KeyEvent) -> Option<Action> {
        if key.code == KeyCode::Esc {
            self.photo = None;
            if let Overlay::VoiceDraft { draft, .. } = overlay {
                self.status = Some(format!(
                    "Voice note kept as draft {draft} (umbra voice send)"
                ));
            }
            return None;
        }
        match overlay {
            Overlay::None | Overlay::Help => None,
            Overlay::Requests { selected } => {
                let count = self.requests().len();
                match key.code {
                    KeyCode::Down | KeyCode::Char('j') => {
                        self.overlay = Overlay::Requests {
                            selected: (selected + 1).min(count.saturating_sub(1)),
                        }
                    }
                    KeyCode::Up | KeyCode::Char('k') => {
                        self.overlay = Overlay::Requests {
                            selected: selected.saturating_sub(1),
                        }
                    }
                    KeyCode::Enter | KeyCode::Char('a') => {
                        let account = self.requests().get(selected)?.account.clone();
                        return Some(Action::Accept(account));
                    }
                    KeyCode::Char('d') => {
                        let account = self.requests().get(selected)?.account.clone();
                        return Some(Action::Decline(account));
                    }
                    _ => self.overlay = Overlay::Requests { selected },
                }
                None
            }
            Overlay::NewContact { mut input } => match key.code {
                KeyCode::Enter => match AccountId::parse(&input) {
                    Ok(account) => Some(Action::AddContact(account)),
                    Err(_) => {
                        self.status = Some(format!("{input:?} is not an account ID"));
                        None
                    }
                },
                KeyCode::Backspace => {
                    input.pop();
                    self.overlay = Overlay::NewContact { input };
                    None
                }
                KeyCode::Char(c) => {
                    input.push(c);
                    self.overlay = Overlay::NewContact { input };
                    None
                }
                _ => {
                    self.overlay = Overlay::NewContact { input };
                    None
                }
            },
            Overlay::NewGroup {
                mut name,
                mut members,
                on_members,
            } => {
                let field = if on_members { &mut members } else { &mut name };
                match key.code {
                    KeyCode::Tab => {
                        self.overlay = Overlay::NewGroup {
                            name,
                            members,
                            on_members: !on_members,
                        };
                        return None;
                    }
                    KeyCode::Enter if on_members => {
                        return match parse_accounts(&members) {
                            Ok(accounts) => Some(Action::CreateGroup(name, accounts)),
                            Err(error) => {
                                self.status = Some(error);
                                None
                            }
                        };
                    }
                    KeyCode::Enter => {
                        self.overlay = Overlay::NewGroup {
                            name,
                            members,
                            on_members: true,
                        };
                        return None;
                    }
                    KeyCode::Backspace => {
                        field.pop();
                    }
                    KeyCode::Char(c) => field.push(c),
                    _ => {}
                }
                self.overlay = Overlay::NewGroup {
                    name,
                    members,
                    on_members,
                };
                None
            }
            Overlay::Members { mut input } => {
                let id = self.current()?.id.clone();
                match key.code {
                    KeyCode::Enter => {
                        let (remove, list) = match input.strip_prefix('-') {
                            Some(rest) => (true, rest.to_owned()),
                            None => (false, input.trim_start_matches('+').to_owned()),
                        };
                        return match parse_accounts(&list) {
                            Ok(accounts) if remove => Some(Action::RemoveMembers(id, accounts)),
                            Ok(accounts) => Some(Action::AddMembers(id, accounts)),
                            Err(error) => {
                                self.status = Some(error);
                                None
                            }
                        };
                    }
                    KeyCode::Backspace => {
                        input.pop();
                    }
                    KeyCode::Char(c) => input.push(c),
                    _ => {}
                }
                self.overlay = Overlay::Members { input };
                None
            }
            Overlay::Timer { selected } => match key.code {
                KeyCode::Down | KeyCode::Char('j') => {
                    self.overlay = Overlay::Timer {
                        selected: (selected + 1).min(TIMERS.len() - 1),
                    };
                    None
                }
                KeyCode::Up | KeyCode::Char('k') => {
                    self.overlay = Overlay::Timer {
                        selected: selected.saturating_sub(1),
                    };
                    None
                }
                KeyCode::Enter => {
                    let id = self.current()?.id.clone();
                    let seconds = *TIMERS.get(selected)?;
                    Some(Action::SetTimer(
                        id,
                        (seconds > 0).then(|| Duration::from_secs(u64::from(seconds))),
                    ))
                }
                _ => {
                    self.overlay = Overlay::Timer { selected };
                    None
                }
            },
            Overlay::AttachFile { mut input } => match key.code {
                KeyCode::Enter if !input.trim().is_empty() => {
                    let id = self.current()?.id.clone();
                    Some(Action::SendFile(id, expand_home(input.trim())))
                }
                KeyCode::Backspace => {
                    input.pop();
                    self.overlay = Overlay::AttachFile { input };
                    None
                }
                KeyCode::Char(c) => {
                    input.push(c);
                    self.overlay = Overlay::AttachFile { input };
                    None
                }
                _ => {
                    self.overlay = Overlay::AttachFile { input };
                    None
                }
            },
            Overlay::SaveFile { message, mut input } => match key.code {
                KeyCode::Enter if !input.trim().is_empty() => {
                    Some(Action::SaveFile(message, expand_home(input.trim())))
                }
                KeyCode::Backspace => {
                    input.pop();
                    self.overlay = Overlay::SaveFile { message, input };
                    None
                }
                KeyCode::Char(c) => {
                    input.push(c);
                    self.overlay = Overlay::SaveFile { message, input };
                    None
                }
                _ => {
                    self.overlay = Overlay::SaveFile { message, input };
                    None
                }
            },
            Overlay::VoiceDraft {
                conversation,
                to,
                draft,
                duration_ms,
            } => match key.code {
                KeyCode::Enter => Some(Action::SendVoiceDraft(conversation, draft)),
                KeyCode::Char('d') => Some(Action::DiscardVoiceDraft(draft)),
                KeyCode::Char('p') => {
                    self.overlay = Overlay::VoiceDraft {
                        conversation,
                        to,
                        draft,
                        duration_ms,
                    };
                    if self.playing {
                        return Some(Action::StopPlaying);
                    }
                    self.playing = true;
                    Some(Action::PlayVoice(
                        umbra_client::VoiceSource::Draft(draft),
                        self.speed,
                    ))
                }
                _ => {
                    self.overlay = Overlay::VoiceDraft {
                        conversation,
                        to,
                        draft,
                        duration_ms,
                    };
                    None
                }
            },
            // Any key closes them.
            Overlay::Picture { .. } => None,
            Overlay::Photo { .. } => {
                self.photo = None;
                None
            }
            Overlay::Safety {
                account,
                digits,
                qr,
            } => match key.code {
                KeyCode::Char('v') => Some(Action::MarkVerified(account)),
                _ => {
                    self.overlay = Overlay::Safety {
                        account,
                        digits,
                        qr,
                    };
                    None
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(code: KeyCode) -> KeyEvent {
        KeyEvent::new(code, KeyModifiers::NONE)
    }

    fn typed(app: &mut App, text: &str) {
        for c in text.chars() {
            app.on_key(key(KeyCode::Char(c)));
        }
    }

    #[test]
    fn unlock_collects_the_passphrase_and_hands_it_on() {
        let mut app = App::default();
        typed(&mut app, "secret");
        app.on_key(key(KeyCode::Backspace));
        assert_eq!(
            app.on_key(key(KeyCode::Enter)),
            Some(Action::Unlock("secre".into()))
        );
    }

    fn conversation(id: &str, kind: ConversationKind) -> Conversation {
        Conversation {
            id: ConversationId(id.into()),
            kind,
            name: String::new(),
            active: true,
            disappear_after: 0,
            members: Vec::new(),
            suite: None,
        }
    }

    #[test]
    fn ctrl_f_sends_a_file_and_ctrl_s_saves_the_latest_one() {
        let peer = AccountId::parse("GUF8EA6B").unwrap();
        let mut app = App {
            screen: Screen::Main,
            conversations: vec![conversation(
                "aa",
                ConversationKind::Direct { peer: peer.clone() },
            )],
            focus: Focus::Compose,
            ..App::default()
        };
        let ctrl = |c| KeyEvent::new(KeyCode::Char(c), KeyModifiers::CONTROL);
        // Nothing to save yet: said so.
        assert_eq!(app.on_key(ctrl('s')), None);
        assert!(app.status.as_deref().is_some_and(|s| s.contains("No file")));
        app.on_key(ctrl('f'));
        typed(&mut app, "/tmp/a.jpg");
        assert_eq!(
            app.on_key(key(KeyCode::Enter)),
            Some(Action::SendFile(
                ConversationId("aa".into()),
                "/tmp/a.jpg".into()
            ))
        );
        // The latest file, under a name its sender cannot make a path of.
        app.overlay = Overlay::None;
        app.messages = vec![Message {
            id: 9,
            conversation: ConversationId("aa".into()),
            sender: peer,
            direction: umbra_client::Direction::In,
            body: String::new(),
            state: umbra_client::DeliveryState::Received,
            timestamp: 0,
            received_at: None,
            expires_at: None,
            disappear_after: 0,
            attachment: Some(umbra_client::AttachmentInfo {
                name: "../../.bashrc".into(),
                size: 1,
                mime_type: "text/plain".into(),
                state: umbra_client::AttachmentState::Fetched,
                duration_ms: 0,
                has_thumbnail: false,
                waveform: Vec::new(),
            }),
        }];
        app.on_key(ctrl('s'));
        assert_eq!(
            app.overlay,
            Overlay::SaveFile {
                message: 9,
                input: "bashrc".into()
            },
            "a hidden file (a shell's startup file) is never proposed"
        );
        typed(&mut app, ".txt");
        assert_eq!(
            app.on_key(key(KeyCode::Enter)),
            Some(Action::SaveFile(9, "bashrc.txt".into()))
        );
        // No photo with a thumbnail: said so; then one.
        app.overlay = Overlay::None;
        assert_eq!(app.on_key(ctrl('v')), None);
        assert!(
            app.status
                .as_deref()
                .is_some_and(|s| s.contains("No photo"))
        );
        if let Some(file) = app.messages[0].attachment.as_mut() {
            file.has_thumbnail = true;
        }
        assert_eq!(app.on_key(ctrl('v')), Some(Action::ShowPicture(9)));
    }

    #[test]
    fn ctrl_r_records_a_voice_note_that_is_sent_or_kept_and_ctrl_p_plays_one() {
        let peer = AccountId::parse("GUF8EA6B").unwrap();
        let aa = ConversationId("aa".into());
        let mut app = App {
            screen: Screen::Main,
            conversations: vec![conversation(
                "aa",
                ConversationKind::Direct { peer: peer.clone() },
            )],
            focus: Focus::Compose,
            ..App::default()
        };
        let ctrl = |c| KeyEvent::new(KeyCode::Char(c), KeyModifiers::CONTROL);
        assert_eq!(app.on_key(ctrl('r')), Some(Action::RecordVoice(aa.clone())));
        assert!(app.recording.is_some());
        assert_eq!(app.on_key(ctrl('r')), Some(Action::StopRecording));
        // The run loop shows the draft: listen, then send.
        app.recording = None;
        app.overlay = Overlay::VoiceDraft {
            conversation: aa.clone(),
            to: "GUF8EA6B".into(),
            draft: 4,
            duration_ms: 7_000,
        };
        assert_eq!(
            app.on_key(key(KeyCode::Char('p'))),
            Some(Action::PlayVoice(umbra_client::VoiceSource::Draft(4), 0))
        );
        assert!(app.playing && matches!(app.overlay, Overlay::VoiceDraft { .. }));
        assert_eq!(
            app.on_key(key(KeyCode::Char('p'))),
            Some(Action::StopPlaying)
        );
        app.playing = false;
        assert_eq!(
            app.on_key(key(KeyCode::Enter)),
            Some(Action::SendVoiceDraft(aa.clone(), 4))
        );
        // Esc keeps it, and says where.
        app.overlay = Overlay::VoiceDraft {
            conversation: aa.clone(),
            to: "GUF8EA6B".into(),
            draft: 5,
            duration_ms: 1_000,
        };
        assert_eq!(app.on_key(key(KeyCode::Esc)), None);
        assert!(app.status.as_deref().is_some_and(|s| s.contains("draft 5")));
        // No voice note yet: said so. Then one, at the chosen speed.
        app.overlay = Overlay::None;
        assert_eq!(app.on_key(ctrl('p')), None);
        assert!(
            app.status
                .as_deref()
                .is_some_and(|s| s.contains("No voice note"))
        );
        app.messages = vec![Message {
            id: 12,
            conversation: aa,
            sender: peer,
            direction: umbra_client::Direction::In,
            body: String::new(),
            state: umbra_client::DeliveryState::Received,
            timestamp: 0,
            received_at: None,
            expires_at: None,
            disappear_after: 0,
            attachment: Some(umbra_client::AttachmentInfo {
                name: "voice-note.opus".into(),
                size: 9_000,
                mime_type: "audio/ogg".into(),
                state: umbra_client::AttachmentState::Fetched,
                duration_ms: 3_000,
                has_thumbnail: false,
                waveform: vec![10, 200, 90],
            }),
        }];
        app.on_key(ctrl('e'));
        app.on_key(ctrl('e'));
        assert_eq!(
            app.on_key(ctrl('p')),
            Some(Action::PlayVoice(umbra_client::VoiceSource::Message(12), 2))
        );
        assert_eq!(app.on_key(ctrl('p')), Some(Action::StopPlaying));
    }

    #[test]
    fn ctrl_a_sends_to_a_group_anonymously_and_only_to_a_group() {
        let peer = AccountId::parse("GUF8EA6B").unwrap();
        let mut app = App {
            screen: Screen::Main,
            conversations: vec![
                conversation("aa", ConversationKind::Direct { peer }),
                conversation("bb", ConversationKind::Group),
            ],
            focus: Focus::Compose,
            ..App::default()
        };
        let ctrl_a = KeyEvent::new(KeyCode::Char('a'), KeyModifiers::CONTROL);
        // A one-to-one conversation: said so, and sent as oneself.
        app.on_key(ctrl_a);
        assert!(!app.sending_anonymously());
        assert!(app.status.as_deref().is_some_and(|s| s.contains("groups")));
        typed(&mut app, "hi");
        assert_eq!(
            app.on_key(key(KeyCode::Enter)),
            Some(Action::Send(ConversationId("aa".into()), "hi".into()))
        );
        // The group: on, then off again.
        app.selected = 1;
        app.on_key(ctrl_a);
        assert!(app.sending_anonymously());
        typed(&mut app, "who has the keys?");
        assert_eq!(
            app.on_key(key(KeyCode::Enter)),
            Some(Action::SendAnonymously(
                ConversationId("bb".into()),
                "who has the keys?".into()
            ))
        );
        app.on_key(ctrl_a);
        assert!(!app.sending_anonymously());
        // On again, then another conversation is opened: off.
        app.on_key(ctrl_a);
        app.on_key(key(KeyCode::Esc));
        app.on_key(key(KeyCode::Enter));
        assert!(!app.sending_anonymously());
        typed(&mut app, "me");
        assert_eq!(
            app.on_key(key(KeyCode::Enter)),
            Some(Action::Send(ConversationId("bb".into()), "me".into()))
        );
    }

    fn setup() -> App {
        App {
            screen: Screen::Setup {
                step: Setup::Activation,
                input: String::new(),
                error: None,
            },
            ..App::default()
        }
    }

    fn setup_error(app: &App) -> Option<&str> {
        match &app.screen {
            Screen::Setup { error, .. } => error.as_deref(),
            other => panic!("left setup: {other:?}"),
        }
    }

    const ACTIVATION: &str = "umbra://127.0.0.1:7443/ABCD-EFGH-JKMN-PQRS?pin=\
        0000000000000000000000000000000000000000000000000000000000000000";

    #[test]
    fn setup_takes_an_activation_string_and_a_passphrase_typed_twice() {
        let mut app = setup();
        // Not an activation string: said so, and kept for correcting.
        typed(&mut app, "hello");
        assert_eq!(app.on_key(key(KeyCode::Enter)), None);
        assert!(setup_error(&app).is_some_and(|e| e.contains("umbra://")));
        assert!(matches!(&app.screen, Screen::Setup { input, .. } if input == "hello"));
        for _ in 0..5 {
            app.on_key(key(KeyCode::Backspace));
        }
        typed(&mut app, ACTIVATION);
        assert_eq!(app.on_key(key(KeyCode::Enter)), None);
        assert_eq!(setup_error(&app), None);
        // Too short, then two that differ: asked again each time.
        typed(&mut app, "short");
        app.on_key(key(KeyCode::Enter));
        assert!(setup_error(&app).is_some_and(|e| e.contains("at least 8")));
        typed(&mut app, "correct horse");
        app.on_key(key(KeyCode::Enter));
        typed(&mut app, "correct house");
        assert_eq!(app.on_key(key(KeyCode::Enter)), None);
        assert!(setup_error(&app).is_some_and(|e| e.contains("differ")));
        typed(&mut app, "correct horse");
        app.on_key(key(KeyCode::Enter));
        typed(&mut app, "correct horse");
        assert_eq!(
            app.on_key(key(KeyCode::Enter)),
            Some(Action::Activate {
                activation: ACTIVATION.into(),
                passphrase: "correct horse".into(),
            })
        );
        assert!(matches!(
            app.screen,
            Screen::Setup {
                step: Setup::Activating,
                ..
            }
        ));
        // What was typed never shows in a Debug string.
        let action = Action::Activate {
            activation: ACTIVATION.into(),
            passphrase: "correct horse".into(),
        };
        let debug = format!("{:?} {action:?}", app.screen);
        assert!(
            !debug.contains("horse") && !debug.contains("ABCD"),
            "{debug}"
        );
    }

    #[test]
    fn setup_takes_a_device_link_too() {
        let mut app = setup();
        let link = format!(
            "umbra-link://relay.example:7443/{}/{}?pin={}",
            "ab".repeat(16),
            "cd".repeat(32),
            "00".repeat(32)
        );
        typed(&mut app, &link);
        app.on_key(key(KeyCode::Enter));
        assert!(matches!(
            &app.screen,
            Screen::Setup { step: Setup::Passphrase { activation }, .. } if *activation == link
        ));
        let mut app = setup();
        typed(&mut app, "umbra-link://relay.example:7443/nothing");
        app.on_key(key(KeyCode::Enter));
        assert!(setup_error(&app).is_some_and(|e| e.contains("Not a device link")));
        // Neither the link nor its secret shows in a Debug string.
        assert!(!format!("{:?}", app.screen).contains("nothing"));
    }

    #[test]
    fn setup_goes_back_a_step_with_esc_and_quits_from_the_first() {
        let mut app = setup();
        typed(&mut app, ACTIVATION);
        app.on_key(key(KeyCode::Enter));
        typed(&mut app, "correct horse");
        app.on_key(key(KeyCode::Enter));
        app.on_key(key(KeyCode::Esc));
        assert!(matches!(
            &app.screen,
            Screen::Setup { step: Setup::Passphrase { activation }, input, .. }
                if activation == ACTIVATION && input.is_empty()
        ));
        app.on_key(key(KeyCode::Esc));
        assert!(matches!(
            &app.screen,
            Screen::Setup { step: Setup::Activation, input, .. } if input == ACTIVATION
        ));
        assert_eq!(app.on_key(key(KeyCode::Esc)), Some(Action::Quit));
    }

    #[test]
    fn setup_ignores_keys_while_activating() {
        let mut app = setup();
        typed(&mut app, ACTIVATION);
        app.on_key(key(KeyCode::Enter));
        for _ in 0..2 {
            typed(&mut app, "correct horse");
            app.on_key(key(KeyCode::Enter));
        }
        for code in [KeyCode::Esc, KeyCode::Enter, KeyCode::Char('x')] {
            assert_eq!(app.on_key(key(code)), None);
            assert!(matches!(
                app.screen,
                Screen::Setup {
                    step: Setup::Activating,
                    ..
                }
            ));
        }
    }

    #[test]
    fn the_wipe_code_stays_until_enter() {
        let mut app = App {
            screen: Screen::WipeCode {
                account: "K7QD9XPM".into(),
                code: "umbra-wipe://secret".into(),
                qr: String::new(),
            },
            ..App::default()
        };
        assert_eq!(app.on_key(key(KeyCode::Char('q'))), None);
        assert_eq!(app.on_key(key(KeyCode::Esc)), None);
        assert!(matches!(app.screen, Screen::WipeCode { .. }));
        assert!(!format!("{:?}", app.screen).contains("secret"));
        app.on_key(key(KeyCode::Enter));
        assert_eq!(app.screen, Screen::Main);
    }

    #[test]
    fn help_and_dialogs_open_and_close() {
        let mut app = App {
            screen: Screen::Main,
            ..App::default()
        };
        app.on_key(key(KeyCode::Char('?')));
        assert_eq!(app.overlay, Overlay::Help);
        app.on_key(key(KeyCode::Esc));
        assert_eq!(app.overlay, Overlay::None);
        app.on_key(key(KeyCode::Char('n')));
        typed(&mut app, "k7qd9xpm");
        assert_eq!(
            app.on_key(key(KeyCode::Enter)),
            Some(Action::AddContact(
                AccountId::parse("K7QD9XPM").unwrap_or_else(|e| panic!("{e}"))
            ))
        );
        app.on_key(key(KeyCode::Char('g')));
        typed(&mut app, "Crew");
        app.on_key(key(KeyCode::Tab));
        typed(&mut app, "K7QD9XPM,nope");
        assert_eq!(app.on_key(key(KeyCode::Enter)), None);
        assert!(app.status.as_deref().is_some_and(|s| s.contains("nope")));
    }
}
