//! `umbra` with no subcommand: the full-screen messenger (ratatui +
//! crossterm). The drawing loop never waits on the network or on crypto:
//! keys become [`app::Action`]s, which run as tasks and report back as
//! [`Note`]s; the loop redraws on every key, note and tick.

pub mod app;
pub mod ui;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use crossterm::event::{Event as TermEvent, EventStream, KeyEventKind};
use futures_util::StreamExt;
use tokio::sync::{broadcast, mpsc};
use umbra_client::{
    Client, ClientError, ClientOptions, ConnectionState, Direction, Event, SystemClock,
};

use app::{Action, App, Link, Overlay, Screen};

/// Files the chat fetches at once: a burst of files waits its turn rather
/// than opening as many transfers on the one connection.
static FETCHES: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);

/// The recording and the playback under way: setting one stops it.
static RECORDING: Mutex<Option<Arc<AtomicBool>>> = Mutex::new(None);
static PLAYING: Mutex<Option<Arc<AtomicBool>>> = Mutex::new(None);

/// Sets the flag in `slot`, if any, stopping what it belongs to.
fn stop(slot: &Mutex<Option<Arc<AtomicBool>>>) {
    if let Some(flag) = slot.lock().unwrap_or_else(|e| e.into_inner()).take() {
        flag.store(true, Ordering::SeqCst);
    }
}

/// A new flag in `slot` (stopping what held it before).
fn begin(slot: &Mutex<Option<Arc<AtomicBool>>>) -> Arc<AtomicBool> {
    stop(slot);
    let flag = Arc::new(AtomicBool::new(false));
    *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(flag.clone());
    flag
}

/// A photo is being opened (one at a time: each can take a few hundred
/// megabytes while it is decoded).
static PHOTO_OPENING: AtomicBool = AtomicBool::new(false);

/// How photos are drawn: chosen once at start (`graphics`).
static PICKER: OnceLock<ratatui_image::picker::Picker> = OnceLock::new();

/// The terminal's graphics protocol (kitty, sixel or iTerm2), from what
/// the terminal says of itself in the environment, and its cell size in
/// pixels from the kernel; half blocks where neither says anything.
/// `UMBRA_GRAPHICS=halfblocks|kitty|sixel|iterm2` chooses instead. The
/// terminal is never queried: a terminal that does not answer would leave
/// the query reading what the person types next.
fn graphics() -> ratatui_image::picker::Picker {
    use ratatui_image::picker::{Picker, ProtocolType};
    let protocol = protocol_of(|name| std::env::var(name).unwrap_or_default());
    if protocol == ProtocolType::Halfblocks {
        return Picker::halfblocks();
    }
    let cell = crossterm::terminal::window_size()
        .ok()
        .filter(|size| size.columns > 0 && size.rows > 0 && size.width > 0 && size.height > 0)
        .map(|size| (size.width / size.columns, size.height / size.rows))
        .filter(|&(width, height)| width > 0 && height > 0)
        .unwrap_or((10, 20));
    // (`from_fontsize` is deprecated in favour of querying the terminal,
    // which is what this avoids.)
    #[allow(deprecated)]
    let mut picker = Picker::from_fontsize(ratatui_image::FontSize::new(cell.0, cell.1));
    picker.set_protocol_type(protocol);
    picker
}

/// The graphics protocol the environment `env` names (see `graphics`).
fn protocol_of(env: impl Fn(&str) -> String) -> ratatui_image::picker::ProtocolType {
    use ratatui_image::picker::ProtocolType;
    match env("UMBRA_GRAPHICS").as_str() {
        "halfblocks" => ProtocolType::Halfblocks,
        "kitty" => ProtocolType::Kitty,
        "sixel" => ProtocolType::Sixel,
        "iterm2" => ProtocolType::Iterm2,
        _ if env("TMUX").is_empty() && env("STY").is_empty() => {
            let (term, program) = (env("TERM"), env("TERM_PROGRAM"));
            if !env("KITTY_WINDOW_ID").is_empty()
                || term.contains("kitty")
                || term == "xterm-ghostty"
            {
                ProtocolType::Kitty
            } else if matches!(program.as_str(), "iTerm.app" | "WezTerm")
                || !env("WEZTERM_EXECUTABLE").is_empty()
            {
                ProtocolType::Iterm2
            } else if term.contains("foot") || term.contains("mlterm") || term.contains("contour") {
                ProtocolType::Sixel
            } else {
                ProtocolType::Halfblocks
            }
        }
        // Inside tmux or screen, graphics need passthrough the multiplexer
        // may not allow: half blocks always work.
        _ => ProtocolType::Halfblocks,
    }
}

/// Longest wait between reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// What background work reports to the drawing loop.
enum Note {
    Unlocked(Box<Client>),
    /// A new device: its client and the wipe code to show once.
    Activated(Box<Client>, String),
    /// Why, the activation string to correct or try again, and whether
    /// the device was made all the same.
    ActivationFailed(String, String, bool),
    UnlockFailed(String),
    Erased(String),
    Client(Event),
    Link(Link),
    /// A finished action: a notice for the status bar, or an error.
    Done(Result<String, String>),
    /// A recording's length so far and its level.
    Recording(u32, u8),
    /// A recording ended: its draft, for the conversation, or why not.
    Recorded(
        umbra_client::ConversationId,
        Result<umbra_client::VoiceDraft, String>,
    ),
    /// A voice note stopped playing (at its end, or why).
    Played(Result<(), String>),
    /// Something in the store changed: the screen reads it again.
    Refresh,
    /// A photo ready to show, or (`None`) one to show as its thumbnail.
    Photo(i64, String, Option<app::PhotoView>),
}

/// Runs the app until the user quits.
pub async fn run(home: PathBuf, options: ClientOptions) -> anyhow::Result<()> {
    let mut terminal = ratatui::try_init()?;
    // ratatui's hook restores the terminal on a panic. Only the drawing
    // loop's own panic ends the chat: one in a task (opening a photo,
    // playing a note; the codec's are caught and refused) must leave the
    // screen as it is.
    let restore = std::panic::take_hook();
    let drawing = std::thread::current().id();
    std::panic::set_hook(Box::new(move |info| {
        if std::thread::current().id() == drawing && !umbra_client::voice::in_codec() {
            restore(info);
        }
    }));
    let _ = PICKER.set(graphics());
    let result = event_loop(&mut terminal, home, options).await;
    ratatui::restore();
    // Said after the screen is restored, so that it stays visible.
    if let Ok(Some(farewell)) = &result {
        eprintln!("{farewell}");
    }
    result.map(drop)
}

async fn event_loop(
    terminal: &mut ratatui::DefaultTerminal,
    home: PathBuf,
    options: ClientOptions,
) -> anyhow::Result<Option<String>> {
    let mut app = App::default();
    if !umbra_client::device_exists(&home) {
        // What an interrupted erasure left goes first.
        let _ = Client::finish_erasure(&home);
        app.screen = Screen::Setup {
            step: app::Setup::Activation,
            input: String::new(),
            error: None,
        };
    }
    let (notes, mut inbox) = mpsc::unbounded_channel::<Note>();
    let mut keys = EventStream::new();
    let mut ticks = tokio::time::interval(Duration::from_millis(250));
    let mut client: Option<Client> = None;
    let mut farewell: Option<String> = None;
    // However the loop ends (quit, wipe, an error), a recording ends (what
    // was saved of it kept) and the player stops.
    struct StopVoice;
    impl Drop for StopVoice {
        fn drop(&mut self) {
            stop(&RECORDING);
            stop(&PLAYING);
        }
    }
    let _stop_voice = StopVoice;
    loop {
        app.now = umbra_client::Clock::now(&SystemClock);
        app.wide = terminal.size()?.width >= app::NARROW;
        terminal.draw(|frame| ui::draw(frame, &app))?;
        let showing_photo = matches!(app.overlay, Overlay::Photo { .. });
        let action = tokio::select! {
            key = keys.next() => match key {
                Some(Ok(TermEvent::Key(key))) if key.kind != KeyEventKind::Release => app.on_key(key),
                Some(Ok(_)) => None, // resize and the rest: just redraw
                Some(Err(error)) => return Err(error.into()),
                None => Some(Action::Quit),
            },
            note = inbox.recv() => {
                if let Some(note) = note {
                    on_note(&mut app, &mut client, &notes, note, &mut farewell);
                }
                None
            }
            _ = ticks.tick() => {
                app.tick += 1;
                None
            }
        };
        if farewell.is_some() {
            break;
        }
        if showing_photo && !matches!(app.overlay, Overlay::Photo { .. }) {
            // Pixels a graphics protocol drew are not cells: redrawn whole.
            app.photo = None;
            terminal.clear()?;
        }
        match action {
            None => {}
            Some(Action::Quit) => {
                // A recording keeps what was saved of it; the player stops.
                stop(&RECORDING);
                stop(&PLAYING);
                break;
            }
            Some(Action::Unlock(passphrase)) => {
                app.busy += 1;
                let (home, options, notes) = (home.clone(), options.clone(), notes.clone());
                tokio::task::spawn_blocking(move || {
                    let passphrase = umbra_client::Passphrase::new(passphrase);
                    let note = match Client::open(&home, &passphrase, options) {
                        Ok(client) => Note::Unlocked(Box::new(client)),
                        Err(error @ ClientError::Erased { .. }) => {
                            // Behind the answer, in a detached process like
                            // the CLI's (quitting does not wait for it): end
                            // the line at the server and overwrite what is
                            // left of the device.
                            if let ClientError::Erased { home, revocation } = &error {
                                crate::finish_erasure_detached(home, revocation.as_deref());
                            }
                            // On screen, exactly a wrong passphrase.
                            Note::UnlockFailed(error.to_string())
                        }
                        Err(error @ ClientError::NotActivated(_)) => {
                            Note::Erased(error.to_string())
                        }
                        Err(error) => Note::UnlockFailed(error.to_string()),
                    };
                    let _ = notes.send(note);
                });
            }
            Some(Action::Activate {
                activation,
                passphrase,
            }) => {
                app.busy += 1;
                let (home, options, notes) = (home.clone(), options.clone(), notes.clone());
                tokio::spawn(async move {
                    let note = match activate(&home, &activation, passphrase, options).await {
                        Ok((client, Some(wipe_code))) => {
                            Note::Activated(Box::new(client), wipe_code)
                        }
                        // Linked: the account's wipe code is the one its
                        // first device showed.
                        Ok((client, None)) => Note::Unlocked(Box::new(client)),
                        Err(error) => Note::ActivationFailed(
                            error,
                            activation,
                            umbra_client::device_exists(&home),
                        ),
                    };
                    let _ = notes.send(note);
                });
            }
            Some(action) => {
                if let Some(client) = &client {
                    perform(&mut app, client, &notes, action);
                }
            }
        }
    }
    Ok(farewell)
}

/// `umbra activate` (or `umbra link`, for a device link), for the setup
/// screen: the wipe code to show once (none for a linked device), or the
/// error as the user should read it.
async fn activate(
    home: &std::path::Path,
    activation: &str,
    passphrase: String,
    options: ClientOptions,
) -> Result<(Client, Option<String>), String> {
    let passphrase = umbra_client::Passphrase::new(passphrase);
    if activation.starts_with("umbra-link://") {
        let link: umbra_client::LinkString = activation.parse().map_err(|e| format!("{e}"))?;
        let (client, _) = Client::join_link(home, &passphrase, &link, "", options)
            .await
            .map_err(|e| e.to_string())?;
        return Ok((client, None));
    }
    let activation: umbra_client::ActivationString =
        activation.parse().map_err(|e| format!("{e}"))?;
    let (client, wipe_code) = Client::activate(home, &passphrase, &activation, options)
        .await
        .map_err(|e| e.to_string())?;
    Ok((client, Some(wipe_code.to_string())))
}

/// The client is open: events flow to the screen and a task keeps it
/// connected.
fn start(app: &mut App, client: &Client, notes: &mpsc::UnboundedSender<Note>) {
    app.account = client.account().to_string();
    forward_events(client.subscribe(), notes.clone());
    tokio::spawn(supervise(client.clone(), notes.clone()));
    refresh(app, client);
}

fn on_note(
    app: &mut App,
    client: &mut Option<Client>,
    notes: &mpsc::UnboundedSender<Note>,
    note: Note,
    farewell: &mut Option<String>,
) {
    match note {
        Note::Unlocked(unlocked) => {
            app.busy = app.busy.saturating_sub(1);
            let unlocked = *unlocked;
            app.screen = Screen::Main;
            start(app, &unlocked, notes);
            *client = Some(unlocked);
        }
        Note::Activated(activated, code) => {
            app.busy = app.busy.saturating_sub(1);
            let activated = *activated;
            app.screen = Screen::WipeCode {
                account: activated.account().to_string(),
                qr: umbra_client::qr_text(&code).unwrap_or_default(),
                code,
            };
            start(app, &activated, notes);
            *client = Some(activated);
        }
        Note::ActivationFailed(error, activation, device_made) => {
            app.busy = app.busy.saturating_sub(1);
            app.screen = if device_made {
                // The device was made, and only what followed failed (its
                // first connection): it opens like any other.
                Screen::Unlock {
                    input: String::new(),
                    error: Some(format!(
                        "This device was set up, but then: {error}. Unlock it to go on."
                    )),
                }
            } else {
                Screen::Setup {
                    step: app::Setup::Activation,
                    input: activation,
                    error: Some(format!("Not activated: {error}")),
                }
            };
        }
        Note::UnlockFailed(error) => {
            app.busy = app.busy.saturating_sub(1);
            app.screen = Screen::Unlock {
                input: String::new(),
                error: Some(error),
            };
        }
        Note::Erased(message) => *farewell = Some(message),
        Note::Recording(ms, level) => {
            if app.recording.is_some() {
                app.recording = Some((ms, level));
            }
        }
        Note::Recorded(conversation, outcome) => {
            app.recording = None;
            match outcome {
                // What the person is doing in another dialog is left alone.
                Ok(draft) if app.overlay != Overlay::None => {
                    app.status = Some(format!(
                        "Voice note kept as draft {} (umbra voice send)",
                        draft.id
                    ));
                }
                Ok(draft) => {
                    let to = app
                        .conversations
                        .iter()
                        .find(|c| c.id == conversation)
                        .map(App::title)
                        .unwrap_or_else(|| conversation.to_string());
                    app.overlay = Overlay::VoiceDraft {
                        conversation,
                        to,
                        draft: draft.id,
                        duration_ms: draft.duration_ms,
                    }
                }
                Err(error) => app.status = Some(error),
            }
        }
        Note::Refresh => {
            if let Some(client) = client {
                refresh(app, client);
            }
        }
        Note::Photo(message, name, view) => {
            PHOTO_OPENING.store(false, Ordering::SeqCst);
            // Not over a dialog the person opened meanwhile.
            if app.overlay != Overlay::None {
                return;
            }
            match view {
                Some(view) => {
                    app.photo = Some(view);
                    app.overlay = Overlay::Photo { name };
                }
                None => show_thumbnail(app, client.as_ref(), message),
            }
        }
        Note::Played(outcome) => {
            app.playing = false;
            if let Err(error) = outcome {
                app.status = Some(error);
            }
        }
        Note::Link(link) => app.link = link,
        Note::Done(result) => {
            app.busy = app.busy.saturating_sub(1);
            app.status = Some(match result {
                Ok(notice) => notice,
                Err(error) => error,
            });
            if let Some(client) = client {
                refresh(app, client);
            }
        }
        Note::Client(event) => {
            let Some(client) = client else { return };
            match &event {
                // A line about the group (who joined, a new name) is
                // shown, not counted as unread.
                Event::MessageReceived { message } if message.direction == Direction::System => {}
                Event::Transfer {
                    name,
                    upload,
                    done,
                    total,
                    ..
                } => {
                    app.status = Some(format!(
                        "{} {}: {}%",
                        if *upload { "sending" } else { "fetching" },
                        crate::escape::printable(name),
                        done * 100 / (*total).max(1)
                    ));
                    // Progress only: nothing in the store changed.
                    return;
                }
                Event::MessageReceived { message } => {
                    // Files come as they are announced, kept sealed; a
                    // failure shows on the message (and Ctrl-S tries again).
                    if message
                        .attachment
                        .as_ref()
                        .is_some_and(|f| f.state == umbra_client::AttachmentState::Available)
                    {
                        let (c, notes, id) = (client.clone(), notes.clone(), message.id);
                        tokio::spawn(async move {
                            // (The semaphore is never closed.)
                            let _turn = FETCHES.acquire().await;
                            let outcome = c.fetch_attachment(id).await;
                            let _ = notes.send(Note::Done(
                                outcome
                                    .map(|_| String::new())
                                    .map_err(|e| format!("A file could not be fetched: {e}")),
                            ));
                        });
                        app.busy += 1;
                    }
                    let open = app.current().map(|c| &c.id) == Some(&message.conversation)
                        && app.conversation_visible();
                    if open {
                        let _ = client.mark_shown(&[message.id]);
                    } else if let Some((_, n)) = app
                        .unread
                        .iter_mut()
                        .find(|(c, _)| *c == message.conversation)
                    {
                        *n += 1;
                    } else {
                        app.unread.push((message.conversation.clone(), 1));
                    }
                }
                Event::KeyChanged {
                    account,
                    sending_stopped,
                } => {
                    app.banner = Some(if *sending_stopped {
                        format!(
                            "The identity key of {account}, whom you verified, CHANGED: nothing is sent to them until you compare the new safety number (s) and confirm it"
                        )
                    } else {
                        format!(
                            "The identity key of {account} CHANGED: compare safety numbers again (s)"
                        )
                    });
                }
                Event::ServerMisbehaved { what } => {
                    app.banner = Some(format!("The server misbehaved: {what}"));
                }
                Event::Refused { from, reason } => {
                    app.banner = Some(format!(
                        "Refused {reason}, \"from\" {from}: nothing of it was applied"
                    ));
                }
                Event::Discarded { from, reason } => {
                    let from = from.as_ref().map_or_else(
                        || "in a conversation".to_owned(),
                        |from| format!("from {from}"),
                    );
                    app.banner = Some(format!(
                        "A message {from} could not be read and was set aside: {}",
                        crate::escape::printable(reason)
                    ));
                }
                Event::MailboxOverflow { dropped } => {
                    app.banner = Some(format!(
                        "{dropped} message(s) sent to you were not kept: your mailbox on the \
                         server was full while this device was away"
                    ));
                }
                Event::ContactRequest { from } => {
                    app.status = Some(format!("{from} wants to be your contact: r"));
                }
                Event::Wiped => {
                    *farewell = Some("This device was wiped.".into());
                    return;
                }
                Event::Connection {
                    state: ConnectionState::Disconnected,
                } => app.link = Link::Reconnecting,
                _ => {}
            }
            refresh(app, client);
        }
    }
}

/// Reloads what the screen shows from the local store (cheap, no network).
fn refresh(app: &mut App, client: &Client) {
    let current = app.current().map(|c| c.id.clone());
    if let Ok(conversations) = client.conversations() {
        app.conversations = conversations;
    }
    if let Ok(contacts) = client.contacts() {
        app.contacts = contacts;
    }
    if let Some(current) = current
        && let Some(index) = app.conversations.iter().position(|c| c.id == current)
    {
        app.selected = index;
    }
    app.selected = app.selected.min(app.conversations.len().saturating_sub(1));
    app.previews = app
        .conversations
        .iter()
        .filter_map(|c| {
            let last = client.history(&c.id, 1).ok()?.pop()?;
            Some((c.id.clone(), last.body))
        })
        .collect();
    if let Some(id) = app.current().map(|c| c.id.clone())
        && let Ok(messages) = client.history(&id, 500)
    {
        // On screen means shown: in a disappearing conversation, their
        // countdowns start now.
        if app.conversation_visible() {
            let unseen: Vec<i64> = messages
                .iter()
                .filter(|m| m.direction == umbra_client::Direction::In && m.expires_at.is_none())
                .map(|m| m.id)
                .collect();
            if !unseen.is_empty() && client.mark_shown(&unseen).is_ok() {
                app.unread.retain(|(c, _)| *c != id);
                app.messages = client.history(&id, 500).unwrap_or(messages);
                return;
            }
        }
        app.messages = messages;
    }
}

fn forward_events(mut events: broadcast::Receiver<Event>, notes: mpsc::UnboundedSender<Note>) {
    tokio::spawn(async move {
        loop {
            match events.recv().await {
                Ok(event) => {
                    if notes.send(Note::Client(event)).is_err() {
                        return;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    });
}

/// Keeps the connection up: connects, waits for it to drop, and tries
/// again with exponential backoff (1 s doubling to 30 s), each wait drawn
/// at random between half and all of it, so the devices of a node that
/// died do not all come back to the next one in the same millisecond.
async fn supervise(client: Client, notes: mpsc::UnboundedSender<Note>) {
    let mut backoff = Duration::from_secs(1);
    let mut first = true;
    loop {
        let _ = notes.send(Note::Link(if first {
            Link::Connecting
        } else {
            Link::Reconnecting
        }));
        first = false;
        let mut events = client.subscribe();
        match client.connect().await {
            Ok(()) => {
                let _ = notes.send(Note::Link(Link::Connected));
                backoff = Duration::from_secs(1);
                // Files whose fetch failed before (the connection dropped
                // during it) are fetched again on each connection.
                let (c, n) = (client.clone(), notes.clone());
                tokio::spawn(async move {
                    let _turn = FETCHES.acquire().await;
                    if c.fetch_attachments().await.is_ok_and(|fetched| fetched > 0) {
                        let _ = n.send(Note::Refresh);
                    }
                    // Files (and voice notes) whose upload a dropped
                    // connection interrupted go now, as they were asked to.
                    if let Ok(outcomes) = c.resume_uploads().await
                        && !outcomes.is_empty()
                    {
                        let sent = outcomes.iter().filter(|(_, o)| o.is_ok()).count();
                        let _ = n.send(Note::Done(Ok(format!(
                            "{sent} of {} interrupted upload(s) sent",
                            outcomes.len()
                        ))));
                    }
                });
                loop {
                    match events.recv().await {
                        Ok(Event::Connection {
                            state: ConnectionState::Disconnected,
                        }) => break,
                        Ok(Event::Wiped) | Err(broadcast::error::RecvError::Closed) => return,
                        _ => {}
                    }
                }
            }
            Err(ClientError::CertificateMismatch) => {
                let _ = notes.send(Note::Link(Link::CertificateMismatch));
            }
            Err(ClientError::CertificateOutOfDate) => {
                let _ = notes.send(Note::Link(Link::CertificateOutOfDate));
            }
            // The line was wiped and this device erased itself (the app
            // was told by `Event::Wiped`): nothing left to connect.
            Err(ClientError::ErasedByAccount) => return,
            Err(_) => {}
        }
        if notes.is_closed() {
            return;
        }
        tokio::time::sleep(jittered(backoff)).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// A wait between half of `backoff` and all of it, drawn at random.
fn jittered(backoff: Duration) -> Duration {
    let mut noise = [0u8; 4];
    // Without randomness (never seen), the whole wait.
    if getrandom::getrandom(&mut noise).is_err() {
        return backoff;
    }
    let fraction = f64::from(u32::from_le_bytes(noise)) / f64::from(u32::MAX);
    backoff.mul_f64(0.5 + fraction / 2.0)
}

/// Shows message `message`'s thumbnail with half blocks, or says why not.
fn show_thumbnail(app: &mut App, client: Option<&Client>, message: i64) {
    let name = app
        .messages
        .iter()
        .find(|m| m.id == message)
        .and_then(|m| m.attachment.as_ref())
        .map(|f| f.name.clone())
        .unwrap_or_default();
    let picture = client
        .and_then(|c| c.thumbnail(message).ok().flatten())
        .and_then(|bytes| umbra_client::thumbnail::picture(&bytes, 72, 40));
    match picture {
        Some(picture) => app.overlay = Overlay::Picture { name, picture },
        None => app.status = Some("This photo cannot be shown".into()),
    }
}

/// Runs an action: local ones at once, network ones as tasks.
fn perform(app: &mut App, client: &Client, notes: &mpsc::UnboundedSender<Note>, action: Action) {
    let spawn = |app: &mut App,
                 work: std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<String, String>> + Send>,
    >| {
        app.busy += 1;
        let notes = notes.clone();
        tokio::spawn(async move {
            let _ = notes.send(Note::Done(work.await));
        });
    };
    let c = client.clone();
    match action {
        Action::Open(id) => {
            if let Ok(messages) = client.history(&id, 500) {
                let _ = client.mark_shown(&messages.iter().map(|m| m.id).collect::<Vec<_>>());
                app.messages = messages;
            }
        }
        Action::Send(id, text) => spawn(
            app,
            Box::pin(async move {
                c.send_text(&id, &text)
                    .await
                    .map(|_| String::new())
                    .map_err(|e| match e {
                        ClientError::KeyUnconfirmed(account) => format!(
                            "Not sent: the identity key of {account}, whom you verified, changed. Compare the new safety number (s) and mark it (v) to send again."
                        ),
                        e => e.to_string(),
                    })
            }),
        ),
        Action::SendFile(id, path) => {
            app.overlay = Overlay::None;
            spawn(
                app,
                Box::pin(async move {
                    c.send_file(&id, &path, None)
                        .await
                        .map(|m| {
                            let name = m.attachment.map(|f| f.name).unwrap_or_default();
                            format!("sent {}", crate::escape::printable(&name))
                        })
                        .map_err(|e| format!("Not sent: {e}"))
                }),
            )
        }
        Action::ShowPicture(message) => {
            let file = app
                .messages
                .iter()
                .find(|m| m.id == message)
                .and_then(|m| m.attachment.clone());
            // The whole photo once it is here; its thumbnail until then.
            let whole = file.as_ref().is_some_and(|f| {
                f.state.is_here() && matches!(f.mime_type.as_str(), "image/jpeg" | "image/png")
            });
            if !whole {
                show_thumbnail(app, Some(client), message);
                return;
            }
            if PHOTO_OPENING.swap(true, Ordering::SeqCst) {
                app.status = Some("A photo is already opening".into());
                return;
            }
            let name = file.map(|f| f.name).unwrap_or_default();
            let area = crossterm::terminal::size()
                .map(|(width, height)| {
                    ui::photo_area(ratatui::layout::Rect::new(0, 0, width, height))
                })
                .unwrap_or_default();
            let notes = notes.clone();
            app.busy += 1;
            tokio::spawn(async move {
                let image = c.photo(message).await.ok().flatten();
                let view = match (image, PICKER.get()) {
                    (Some(image), Some(picker)) => tokio::task::spawn_blocking(move || {
                        picker
                            .new_protocol(image, area.as_size(), ratatui_image::Resize::Fit(None))
                            .ok()
                            .map(app::PhotoView)
                    })
                    .await
                    .ok()
                    .flatten(),
                    _ => None,
                };
                let _ = notes.send(Note::Done(Ok(String::new())));
                let _ = notes.send(Note::Photo(message, name, view));
            });
        }
        Action::RecordVoice(id) => {
            let flag = begin(&RECORDING);
            let (c, notes) = (client.clone(), notes.clone());
            tokio::task::spawn_blocking(move || {
                let mut shown = 0;
                let outcome = crate::voice::Input::microphone().and_then(|input| {
                    crate::voice::record_from(&c, input, &flag, None, |ms, level| {
                        if ms >= shown + 100 {
                            shown = ms;
                            let _ = notes.send(Note::Recording(ms, level));
                        }
                    })
                });
                let _ = notes.send(Note::Recorded(id, outcome.map_err(|e| e.to_string())));
            });
        }
        Action::StopRecording => stop(&RECORDING),
        Action::PlayVoice(source, speed) => {
            let speed = app::SPEEDS[speed % app::SPEEDS.len()];
            let flag = begin(&PLAYING);
            let notes = notes.clone();
            tokio::spawn(async move {
                // However this ends (a panic too), the app hears it stopped.
                struct Ended(mpsc::UnboundedSender<Note>, Result<(), String>);
                impl Drop for Ended {
                    fn drop(&mut self) {
                        let outcome = std::mem::replace(&mut self.1, Ok(()));
                        let _ = self.0.send(Note::Played(outcome));
                    }
                }
                let mut ended = Ended(notes.clone(), Ok(()));
                let outcome = match c.voice_note(source).await {
                    Ok(ogg) => tokio::task::spawn_blocking(move || {
                        crate::voice::play_on_device(&ogg, speed, &flag).map(|_| ())
                    })
                    .await
                    .map_err(anyhow::Error::from)
                    .and_then(|played| played),
                    Err(error) => Err(error.into()),
                };
                ended.1 = outcome.map_err(|e| e.to_string());
            });
        }
        Action::StopPlaying => stop(&PLAYING),
        Action::SendVoiceDraft(id, draft) => {
            app.overlay = Overlay::None;
            stop(&PLAYING);
            spawn(
                app,
                Box::pin(async move {
                    c.send_voice_draft(&id, draft, None)
                        .await
                        .map(|_| "voice note sent".to_owned())
                        .map_err(|e| {
                            format!(
                                "Not sent: {e} (an interrupted upload is finished when the \
                                 app connects again)"
                            )
                        })
                }),
            )
        }
        Action::DiscardVoiceDraft(draft) => {
            app.overlay = Overlay::None;
            stop(&PLAYING);
            app.status = Some(match client.discard_voice_draft(draft) {
                Ok(()) => "Voice note deleted".into(),
                Err(error) => error.to_string(),
            });
        }
        Action::SaveFile(message, path) => {
            app.overlay = Overlay::None;
            spawn(
                app,
                Box::pin(async move {
                    c.save_attachment(message, &path)
                        .await
                        .map(|size| format!("saved {size} bytes to {}", path.display()))
                        .map_err(|e| format!("Not saved: {e}"))
                }),
            )
        }
        Action::SendAnonymously(id, text) => spawn(
            app,
            Box::pin(async move {
                c.send_text_anonymously(&id, &text)
                    .await
                    .map(|_| String::new())
                    .map_err(|e| format!("Not sent anonymously: {e}"))
            }),
        ),
        Action::Accept(account) => spawn(
            app,
            Box::pin(async move {
                c.accept_contact(&account)
                    .await
                    .map(|_| format!("{account} is now a contact"))
                    .map_err(|e| e.to_string())
            }),
        ),
        Action::AddContact(account) => spawn(
            app,
            Box::pin(async move {
                c.add_contact(&account)
                    .await
                    .map(|_| format!("request sent to {account}"))
                    .map_err(|e| e.to_string())
            }),
        ),
        Action::CreateGroup(name, members) => spawn(
            app,
            Box::pin(async move {
                c.create_group(&name, &members)
                    .await
                    .map(|_| format!("group {name} created"))
                    .map_err(|e| e.to_string())
            }),
        ),
        Action::AddMembers(id, members) => spawn(
            app,
            Box::pin(async move {
                c.add_members(&id, &members)
                    .await
                    .map(|_| "added".to_owned())
                    .map_err(|e| e.to_string())
            }),
        ),
        Action::RemoveMembers(id, members) => spawn(
            app,
            Box::pin(async move {
                c.remove_members(&id, &members)
                    .await
                    .map(|_| "removed".to_owned())
                    .map_err(|e| e.to_string())
            }),
        ),
        Action::SetTimer(id, timer) => spawn(
            app,
            Box::pin(async move {
                c.set_disappearing(&id, timer)
                    .await
                    .map(|_| "timer set".to_owned())
                    .map_err(|e| e.to_string())
            }),
        ),
        Action::Decline(account) => spawn(
            app,
            Box::pin(async move {
                c.decline_contact(&account)
                    .await
                    .map(|()| format!("declined {account}"))
                    .map_err(|e| e.to_string())
            }),
        ),
        Action::ShowSafety(account) => match client.show_safety_number(&account) {
            Ok(number) => {
                app.overlay = Overlay::Safety {
                    account,
                    digits: number.digits.clone(),
                    qr: number.qr().unwrap_or_default(),
                }
            }
            Err(error) => app.status = Some(error.to_string()),
        },
        Action::MarkVerified(account) => {
            app.status = Some(match client.verify_contact(&account) {
                Ok(()) => format!("{account} marked verified"),
                Err(error) => error.to_string(),
            });
            app.banner = None;
            refresh(app, client);
        }
        Action::Unlock(_) | Action::Activate { .. } | Action::Quit => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn photos_go_out_in_the_protocol_the_terminal_names_and_half_blocks_otherwise() {
        use ratatui_image::picker::ProtocolType;
        let of = |pairs: &[(&str, &str)]| {
            let pairs: Vec<(String, String)> = pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect();
            super::protocol_of(move |name| {
                pairs
                    .iter()
                    .find(|(k, _)| k == name)
                    .map(|(_, v)| v.clone())
                    .unwrap_or_default()
            })
        };
        assert_eq!(of(&[("TERM", "xterm-kitty")]), ProtocolType::Kitty);
        assert_eq!(of(&[("TERM_PROGRAM", "iTerm.app")]), ProtocolType::Iterm2);
        assert_eq!(of(&[("TERM", "foot")]), ProtocolType::Sixel);
        assert_eq!(of(&[("TERM", "xterm-256color")]), ProtocolType::Halfblocks);
        // tmux may not pass graphics through; the person may say otherwise.
        assert_eq!(
            of(&[("TERM", "xterm-kitty"), ("TMUX", "/tmp/tmux-0/default,1,0")]),
            ProtocolType::Halfblocks
        );
        assert_eq!(
            of(&[("TMUX", "/tmp/x"), ("UMBRA_GRAPHICS", "sixel")]),
            ProtocolType::Sixel
        );
        assert_eq!(
            of(&[("TERM", "xterm-kitty"), ("UMBRA_GRAPHICS", "halfblocks")]),
            ProtocolType::Halfblocks
        );
    }

    #[test]
    fn reconnect_waits_are_spread_between_half_and_all_of_the_backoff() {
        let backoff = Duration::from_secs(8);
        let waits: Vec<Duration> = (0..200).map(|_| jittered(backoff)).collect();
        assert!(
            waits.iter().all(|w| *w >= backoff / 2 && *w <= backoff),
            "{waits:?}"
        );
        let early = waits.iter().filter(|w| **w < backoff * 3 / 4).count();
        // Half are expected in the lower half of the range; 200 draws all
        // on one side would be a broken draw, not chance.
        assert!((20..=180).contains(&early), "{early} of 200 early");
    }
}
