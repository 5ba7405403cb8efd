//! `umbra`: the terminal client. Without a subcommand, the full-screen
//! messenger ([`tui`]); with one, a scriptable command over the
//! `umbra-client` library, every one of which can print JSON.

mod devices;
mod escape;
mod tui;
mod voice;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use escape::printable;
use serde_json::json;
use umbra_client::{
    AccountId, ActivationString, Client, ClientError, ClientOptions, ConversationId,
    ConversationKind, Direction, DuressScope, Event, Message, Passphrase,
};

/// Exit codes, so scripts can tell failures apart.
mod exit {
    pub const FAILURE: u8 = 1;
    pub const WRONG_PASSPHRASE: u8 = 3;
    pub const NETWORK: u8 = 4;
    pub const REFUSED: u8 = 5;
    pub const NOT_ACTIVATED: u8 = 6;
}

const AFTER_HELP: &str = "\
Getting started:
  umbra                            the full-screen chat (? lists its keys);
                                   on a new device it sets one up first
  umbra activate 'umbra://HOST:PORT/CODE?pin=...'   the same, for scripts
  umbra whoami                     your account ID, to give to contacts
  umbra contacts add K7QD9XPM      ask someone to be your contact
  umbra recv                       fetch what arrived (requests, messages)
  umbra contacts accept K7QD9XPM   accept a request; opens the conversation
  umbra send K7QD9XPM 'hello'      send a message
  umbra listen                     stay connected and print as things arrive

The passphrase is asked at a prompt, or read from UMBRA_PASSPHRASE.

Exit codes: 0 success, 1 failure, 2 usage error, 3 wrong passphrase,
4 server unreachable, not authentic, or busy (try again later),
5 refused by the server,
6 no device in --home.";

/// Umbra: end-to-end-encrypted messaging. All cryptography happens on
/// this device; the server only relays ciphertext.
#[derive(Debug, Parser)]
#[command(
    name = "umbra",
    version,
    about = "Umbra: end-to-end-encrypted messaging. All cryptography happens on this device;\nthe server only relays ciphertext. Without a command, `umbra` opens the full-screen chat.",
    after_help = AFTER_HELP
)]
struct Cli {
    /// Device directory (encrypted store and key-derivation parameters).
    #[arg(long, global = true, env = "UMBRA_HOME", default_value_os_t = default_home())]
    home: PathBuf,
    /// Print JSON (one object per line) instead of text.
    #[arg(long, global = true)]
    json: bool,
    /// Without a command: the full-screen messenger.
    #[command(subcommand)]
    command: Option<Command>,
}

fn default_home() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default()
        .join(".umbra")
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create this device from an activation string: pins the server's
    /// certificate, opens an account and sets the store's passphrase.
    Activate {
        /// The `umbra://…` string from your operator or distributor.
        activation: String,
    },
    /// Show this device's account ID and subscription.
    Whoami,
    /// Contacts: nothing can be exchanged until both sides agree.
    #[command(subcommand)]
    Contacts(ContactsCommand),
    /// The devices of this account, or of a contact, as the account's
    /// signed device list says (verified on this device).
    #[command(subcommand)]
    Devices(devices::DevicesCommand),
    /// Voice notes: `record` one (kept as a draft), `play` it or one
    /// received (at 1x, 1.5x or 2x), `send` it; `drafts`, `discard`.
    #[command(subcommand)]
    Voice(voice::VoiceCommand),
    /// Make this device a new device of an existing account, from the
    /// one-time link `umbra devices link` shows on one of its devices: it
    /// gets the account's contacts and unexpired history and joins its
    /// conversations. Sets this device's passphrase.
    Link {
        /// The `umbra-link://…` string. Without it, it is read from the
        /// standard input (so it stays out of the shell's history and the
        /// process list).
        link: Option<String>,
        /// What to call this device in the account's device list.
        #[arg(long, default_value = "")]
        name: String,
    },
    /// Send a text message to a contact (account ID) or a group
    /// (conversation ID from `groups list`).
    Send {
        target: String,
        /// The message; several words are joined with spaces.
        #[arg(required = true, num_args = 1..)]
        text: Vec<String>,
        /// Send it on a connection that does not log in, so the server
        /// learns only that a member of the group sent it (the members
        /// still see it is you). Uses one of this device's anonymous-send
        /// tokens; refused in a group whose current epoch has no delivery
        /// key (one made before anonymous sending: any change to the group
        /// gives it one).
        #[arg(long)]
        anonymous: bool,
    },
    /// Send a file (a photo, a document, any file up to the server's
    /// limit, 100 MiB by default) to a contact or a group. It is sealed
    /// on this device under a key of its own; the server stores only the
    /// sealed bytes, padded so its size says little, until every
    /// recipient fetched it. If the connection drops during the upload,
    /// `umbra uploads resume` finishes it.
    SendFile {
        /// Account ID (one-to-one) or conversation ID (group).
        target: String,
        /// The file to send.
        path: std::path::PathBuf,
        /// Text shown with the file.
        #[arg(long)]
        caption: Option<String>,
        /// Send a photo (JPEG, PNG, WebP) as it is. Without this, what its
        /// camera or editor wrote into it (EXIF: where and when it was
        /// taken, the phone; XMP; comments) is removed first.
        #[arg(long)]
        keep_metadata: bool,
    },
    /// Save a received (or sent) file to PATH, fetching it first if it is
    /// not on this device yet. PATH must not exist. MESSAGE_ID is the
    /// number `history --json` shows as `id`.
    Save {
        message_id: i64,
        path: std::path::PathBuf,
    },
    /// Uploads a dropped connection interrupted: `list`, `resume` (finish
    /// them and send their messages) or `cancel` (give them up).
    Uploads {
        #[arg(value_enum, default_value = "list")]
        action: UploadsAction,
    },
    /// Fetch and print everything that arrived while away (files
    /// included: fetched and kept sealed on this device; `save` opens
    /// one), then exit.
    Recv,
    /// Stay connected and print events as they arrive (Ctrl-C to stop).
    Listen,
    /// Group conversations.
    #[command(subcommand)]
    Groups(GroupsCommand),
    /// Show a conversation's messages.
    History {
        /// Account ID (one-to-one) or conversation ID (group).
        target: String,
        /// How many of the latest messages.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Replace this device's keys in every conversation ("recreate keys"):
    /// keys taken from this device before no longer open new messages.
    UpdateKeys,
    /// Encrypted notes that never leave this device.
    #[command(subcommand)]
    Vault(VaultCommand),
    /// Erase a device: another one with its wipe code (from any machine,
    /// no --home needed), or this one with --self.
    Wipe(WipeArgs),
    /// Protection of this device against coercion and guessing.
    #[command(subcommand)]
    Security(SecurityCommand),
    /// Add the days of a renewal code to this line's subscription (works
    /// after it ended, too).
    Renew { code: String },
    /// For distributors: issue codes within your quota and manage the lines
    /// you sold. Needs no device (--home is ignored).
    Distributor {
        /// The `umbra-distributor://…` credential from the operator.
        #[arg(long, env = "UMBRA_DISTRIBUTOR", hide_env_values = true)]
        credential: String,
        #[command(subcommand)]
        command: DistributorCommand,
    },
    /// Disappearing messages: set a conversation's timer for everyone in it
    /// (5s to 4w, or off), or with --default the timer new conversations
    /// start with (30s unless changed). For example `umbra disappear
    /// D2ZZNXWZ 1h`, or `umbra disappear --default off`.
    Disappear {
        /// TARGET TIMER: the account ID or conversation ID, then the timer
        /// (e.g. 30s, 5m, 1h, 1d, 4w, or off); with --default, TIMER alone.
        #[arg(required = true, num_args = 1..=2, value_names = ["TARGET", "TIMER"])]
        args: Vec<String>,
        /// Change the default for new conversations instead.
        #[arg(long)]
        default: bool,
    },
    /// Internal: finishes destroying a device after a duress passphrase (or
    /// too many wrong ones), reading the sealed revocation, if any, from
    /// stdin. `umbra` starts it by itself, detached, once it has answered.
    #[command(hide = true)]
    FinishErasure,
}

#[derive(Debug, Subcommand)]
enum DistributorCommand {
    /// Issue activation strings (or, with --renewal, renewal codes).
    Codes {
        #[arg(long, default_value_t = 180)]
        days: u32,
        #[arg(long, default_value_t = 1)]
        count: u32,
        #[arg(long)]
        renewal: bool,
    },
    /// Your lines: ID, subscription end, last-seen day, status.
    Lines,
    /// Stop a line from sending until resumed.
    Suspend { account: String },
    /// Let a suspended line send again.
    Resume { account: String },
    /// End a line for good.
    Revoke { account: String },
}

#[derive(Debug, Subcommand)]
enum SecurityCommand {
    /// Set a duress passphrase. Entered instead of the real one, at any
    /// prompt, it silently destroys this device; the device then looks like
    /// a fresh install. On an account of one device it also ends the line.
    /// On an account with several, it destroys this device alone, unless
    /// --every-device. Read from UMBRA_DURESS_PASSPHRASE, or asked twice
    /// (at least 8 characters).
    Duress {
        /// Destroy every device of the account too, as the wipe code does:
        /// the line ends, and each of its devices erases itself (one that
        /// is away when it next connects). Needs the wipe code, which is
        /// then kept sealed under the duress passphrase.
        #[arg(long)]
        every_device: bool,
        /// The `umbra-wipe://…` code, for --every-device (asked for if
        /// not given).
        #[arg(long, requires = "every_device")]
        wipe_code: Option<String>,
    },
    /// Wipe this device after this many wrong passphrases in a row
    /// (default 10).
    WipeAfter { attempts: u32 },
}

#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
struct WipeArgs {
    /// The `umbra-wipe://…` code shown when the device was activated.
    #[arg(long)]
    code: Option<String>,
    /// Erase this device and end its line at the server. Cannot be undone.
    #[arg(long = "self")]
    this_device: bool,
    /// With --self: do not ask for confirmation.
    #[arg(long, requires = "this_device")]
    yes: bool,
}

#[derive(Debug, Subcommand)]
enum VaultCommand {
    /// Store a note. The body is the remaining words, or standard input.
    Add { title: String, body: Vec<String> },
    /// List notes (titles only).
    List,
    /// Show one note.
    Show { id: i64 },
    /// Delete one note.
    Delete { id: i64 },
}

#[derive(Subcommand, Debug)]
enum ContactsCommand {
    /// Send a contact request.
    Add { account: String },
    /// Accept a contact request and open the conversation.
    Accept { account: String },
    /// List contacts and their state.
    List,
    /// Show the safety number (digits and QR code) to compare with the
    /// contact in person; then, with --mark, record that the number shown
    /// matched (refused if their key changed since). When a verified
    /// contact's key changed, nothing is sent to them until you compare the
    /// new number and --mark it, or --accept the new key unverified.
    Verify {
        account: String,
        /// The numbers matched: mark the contact verified.
        #[arg(long, conflicts_with = "accept")]
        mark: bool,
        /// Accept a changed key without comparing numbers: messages go to
        /// the contact again and the contact stays unverified.
        #[arg(long)]
        accept: bool,
    },
}

#[derive(Debug, Subcommand)]
enum GroupsCommand {
    /// Create a group with accepted contacts.
    Create {
        name: String,
        #[command(flatten)]
        members: Members,
    },
    /// Add accepted contacts to a group.
    Add {
        conversation: String,
        #[command(flatten)]
        members: Members,
    },
    /// Remove members: they cannot read anything sent afterwards.
    Remove {
        conversation: String,
        #[command(flatten)]
        members: Members,
    },
    /// Rename a group.
    Rename { conversation: String, name: String },
    /// Leave a group.
    Leave { conversation: String },
    /// List conversations.
    List,
}

#[derive(Debug, Args)]
struct Members {
    /// Account IDs, comma-separated or repeated.
    #[arg(long = "member", short = 'm', value_delimiter = ',', required = true)]
    members: Vec<String>,
}

impl Members {
    fn parse(&self) -> anyhow::Result<Vec<AccountId>> {
        self.members.iter().map(|m| account(m)).collect()
    }
}

fn account(text: &str) -> anyhow::Result<AccountId> {
    AccountId::parse(text).with_context(|| format!("{text:?} is not an account ID"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("UMBRA_LOG")
                .unwrap_or_else(|_| "error".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let json = cli.json;
    let outcome = runtime.block_on(run(cli));
    // A recorder or player thread that is still winding down (stopped,
    // its program killed) is not waited for past this.
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            let code = exit_code(&error);
            if json {
                println!(
                    "{}",
                    json!({ "error": format!("{error:#}"), "exit_code": code })
                );
            } else {
                // A server's refusal carries its own text: escaped like a message.
                eprintln!("error: {}", printable(&format!("{error:#}")));
            }
            // After a duress unlock (or one wrong passphrase too many), the
            // answer above is out; overwriting the store and ending the line
            // at the server happen in a detached process, so that the
            // caller sees the same answer, exit code and timing as for a
            // wrong passphrase.
            if let Some(ClientError::Erased { home, revocation }) =
                error.downcast_ref::<ClientError>()
            {
                finish_erasure_detached(home, revocation.as_deref());
            }
            ExitCode::from(code)
        }
    }
}

/// Starts `umbra finish-erasure` for `home` in its own process group (a
/// Ctrl-C or hang-up at the terminal does not reach it), with no output,
/// handing it the revocation on stdin, and does not wait for it.
pub(crate) fn finish_erasure_detached(
    home: &std::path::Path,
    revocation: Option<&umbra_client::Revocation>,
) {
    use std::process::{Command, Stdio};
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let mut command = Command::new(exe);
    command
        .arg("--home")
        .arg(home)
        .arg("finish-erasure")
        .env_remove("UMBRA_PASSPHRASE")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    #[cfg(unix)]
    std::os::unix::process::CommandExt::process_group(&mut command, 0);
    let spawned = command.spawn();
    // Not waited for: it outlives this process, which exits now.
    #[allow(clippy::zombie_processes)]
    if let Ok(mut child) = spawned
        && let (Some(stdin), Some(revocation)) = (child.stdin.take(), revocation)
    {
        let _ = serde_json::to_writer(stdin, revocation);
    }
}

/// The detached second half of an erasure (see `finish_erasure_detached`):
/// overwrites what is left of the device and sends the revocation, both at
/// once.
async fn finish_erasure(cli: &Cli) -> anyhow::Result<()> {
    let mut sealed = String::new();
    std::io::Read::read_to_string(&mut std::io::stdin(), &mut sealed)?;
    let revocation: Option<umbra_client::Revocation> = serde_json::from_str(&sealed).ok();
    let home = cli.home.clone();
    let shred = tokio::task::spawn_blocking(move || Client::finish_erasure(&home));
    if let Some(revocation) = revocation {
        let _ = revocation.send().await;
    }
    shred.await??;
    Ok(())
}

fn exit_code(error: &anyhow::Error) -> u8 {
    match error.downcast_ref::<ClientError>() {
        // A duress unlock looks exactly like a wrong passphrase.
        Some(ClientError::WrongPassphrase | ClientError::Erased { .. }) => exit::WRONG_PASSPHRASE,
        Some(ClientError::NotActivated(_)) => exit::NOT_ACTIVATED,
        Some(
            ClientError::CertificateMismatch
            | ClientError::CertificateOutOfDate
            | ClientError::Unreachable { .. }
            | ClientError::ConnectionLost
            | ClientError::NotConnected
            | ClientError::Timeout(_)
            | ClientError::Server {
                code: umbra_client::ErrorCode::ServerBusy,
                ..
            },
        ) => exit::NETWORK,
        Some(
            ClientError::Server { .. }
            | ClientError::LineEnded { .. }
            | ClientError::ErasedByAccount
            | ClientError::NotAContact(_)
            | ClientError::NotAccepted(_)
            | ClientError::NoRequest(_)
            | ClientError::NotAMember,
        ) => exit::REFUSED,
        _ => exit::FAILURE,
    }
}

fn passphrase(confirm: bool) -> anyhow::Result<Passphrase> {
    if let Ok(text) = std::env::var("UMBRA_PASSPHRASE") {
        return Ok(Passphrase::new(text));
    }
    let first = rpassword::prompt_password(if confirm {
        "Choose a passphrase for this device: "
    } else {
        "Passphrase: "
    })
    .context("cannot read the passphrase (set UMBRA_PASSPHRASE when there is no terminal)")?;
    if confirm {
        if first.chars().count() < 8 {
            bail!("choose a passphrase of at least 8 characters");
        }
        let again = rpassword::prompt_password("Repeat it: ")?;
        if again != first {
            bail!("the passphrases differ");
        }
    }
    Ok(Passphrase::new(first))
}

struct Out {
    json: bool,
}

impl Out {
    fn value(&self, value: serde_json::Value, text: impl FnOnce() -> String) {
        if self.json {
            println!("{value}");
        } else {
            println!("{}", text());
        }
    }

    fn message(&self, message: &Message) {
        self.value(json!(message), || format_message(message));
    }

    fn event(&self, event: &Event) {
        if self.json {
            println!("{}", json!(event));
            return;
        }
        match event {
            Event::MessageReceived { message } => println!("{}", format_message(message)),
            Event::ContactRequest { from } => println!(
                "{from} wants to be your contact: `umbra contacts accept {from}` to accept"
            ),
            Event::ContactAccepted { by } => println!("{by} accepted your contact request"),
            Event::ConversationStarted { conversation } => match &conversation.kind {
                ConversationKind::Direct { peer } => {
                    println!("conversation with {peer} is ready")
                }
                // A group's name comes in its first message, after the
                // Welcome: announced then, as a line of the group.
                ConversationKind::Group if conversation.name.is_empty() => {
                    println!("you are in a new group ({})", conversation.id)
                }
                ConversationKind::Group => println!(
                    "you are in group \u{201c}{}\u{201d} ({})",
                    printable(&conversation.name),
                    conversation.id
                ),
            },
            Event::KeyChanged {
                account,
                sending_stopped,
            } => {
                println!(
                    "WARNING: the identity key of {account} CHANGED. Compare safety numbers again: `umbra contacts verify {account}`"
                );
                if *sending_stopped {
                    println!(
                        "You had verified {account}: nothing is sent to them until you compare the new number (`umbra contacts verify {account}`) and confirm it (`--mark`), or accept the new key unverified (`--accept`)."
                    );
                }
            }
            Event::ServerMisbehaved { what } => {
                println!("WARNING: the server misbehaved: {what}")
            }
            Event::Refused { from, reason } => {
                println!("REFUSED {reason}, \"from\" {from}: nothing of it was applied")
            }
            Event::Discarded { from, reason } => {
                let from = from.as_ref().map_or_else(
                    || "in a conversation".to_owned(),
                    |from| format!("from {from}"),
                );
                println!(
                    "A message {from} could not be read and was set aside: {}",
                    printable(reason)
                )
            }
            Event::MailboxOverflow { dropped } => {
                println!(
                    "WARNING: {dropped} message(s) sent to you were not kept: your mailbox on \
                     the server was full while this device was away"
                )
            }
            _ => {}
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum UploadsAction {
    List,
    Resume,
    Cancel,
}

/// Shows transfer progress while a command runs: a progress bar per file
/// on standard error when it is a terminal (indicatif draws nothing
/// otherwise); `--json` output gets the `transfer` events themselves.
fn show_transfers(
    out: &Out,
    events: &mut tokio::sync::broadcast::Receiver<Event>,
) -> tokio::task::JoinHandle<()> {
    use tokio::sync::broadcast::error::RecvError;
    let mut events = events.resubscribe();
    let json = out.json;
    tokio::spawn(async move {
        let mut bars: std::collections::HashMap<(String, bool), indicatif::ProgressBar> =
            std::collections::HashMap::new();
        loop {
            let event = match events.recv().await {
                Ok(event) => event,
                Err(RecvError::Lagged(_)) => continue,
                Err(RecvError::Closed) => break,
            };
            let Event::Transfer {
                name,
                upload,
                done,
                total,
                ..
            } = &event
            else {
                continue;
            };
            if json {
                println!("{}", json!(event));
                continue;
            }
            let bar = bars.entry((name.clone(), *upload)).or_insert_with(|| {
                let bar = indicatif::ProgressBar::new(*total);
                let style = indicatif::ProgressStyle::with_template(
                    "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> ");
                bar.set_style(style);
                let verb = if *upload { "sending" } else { "fetching" };
                bar.set_message(format!("{verb} {}", printable(name)));
                bar
            });
            bar.set_position(*done);
            if done >= total {
                bar.finish();
            }
        }
    })
}

/// One message on one line. The body is escaped whoever wrote it: theirs
/// is someone else's text, and system lines quote group names.
fn format_message(message: &Message) -> String {
    let time = rfc3339(message.timestamp);
    let mut body = printable(&message.body).into_owned();
    if let Some(file) = &message.attachment
        && file.duration_ms > 0
        && file.mime_type.starts_with("audio/ogg")
    {
        let caption = std::mem::take(&mut body);
        body = format!(
            "[voice note #{} {} {} ({:?})]{}{caption}",
            message.id,
            voice::minutes(file.duration_ms),
            voice::bars(&file.waveform),
            file.state,
            if caption.is_empty() { "" } else { " " }
        );
    } else if let Some(file) = &message.attachment {
        let caption = std::mem::take(&mut body);
        body = format!(
            "[file #{} {} ({}, {} bytes, {:?})]{}{caption}",
            message.id,
            printable(&file.name),
            printable(&file.mime_type),
            file.size,
            file.state,
            if caption.is_empty() { "" } else { " " }
        );
    }
    match message.direction {
        Direction::System => format!("[{time}] * {body}"),
        Direction::Out => format!("[{time}] you: {body} ({:?})", message.state),
        Direction::In => match message.arrived_late() {
            Some(at) => format!(
                "[{time}] {}: {body} (received {})",
                message.sender,
                rfc3339(at)
            ),
            None => format!("[{time}] {}: {body}", message.sender),
        },
    }
}

fn rfc3339(unix: u64) -> humantime::Rfc3339Timestamp {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(unix))
}

/// Opens the device in --home.
fn open(cli: &Cli) -> anyhow::Result<Client> {
    if !umbra_client::device_exists(&cli.home) {
        // What an interrupted erasure left goes now.
        let _ = Client::finish_erasure(&cli.home);
        return Err(ClientError::NotActivated(cli.home.display().to_string()).into());
    }
    Ok(Client::open(
        &cli.home,
        &passphrase(false)?,
        ClientOptions::default(),
    )?)
}

/// Opens, connects and applies what the server held.
async fn online(cli: &Cli) -> anyhow::Result<Client> {
    let client = open(cli)?;
    client.connect().await?;
    client.sync().await?;
    Ok(client)
}

fn conversation(client: &Client, target: &str) -> anyhow::Result<ConversationId> {
    if let Ok(account) = AccountId::parse(target) {
        return Ok(client.conversation_with(&account)?);
    }
    let id = ConversationId(target.to_ascii_lowercase());
    client.conversation(&id)?;
    Ok(id)
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let out = Out { json: cli.json };
    let Some(command) = &cli.command else {
        // With no device here yet, the app opens on its setup screen.
        return tui::run(cli.home.clone(), ClientOptions::default()).await;
    };
    match command {
        Command::FinishErasure => finish_erasure(&cli).await?,
        Command::Activate { activation } => {
            let activation: ActivationString = activation
                .parse()
                .context("this is not a valid activation string")?;
            let passphrase = passphrase(true)?;
            let (client, wipe_code) = Client::activate(
                &cli.home,
                &passphrase,
                &activation,
                ClientOptions::default(),
            )
            .await?;
            let expires = client.subscription_expires_at()?;
            let wipe_code = wipe_code.to_string();
            out.value(
                json!({
                    "account_id": client.account(),
                    "subscription_expires_at": expires,
                    "home": cli.home,
                    "wipe_code": wipe_code,
                }),
                || {
                    let mut text = format!(
                        "Activated. Your account ID is {}. Give it to the people you want to talk to.\nSubscription until {}.\n\n\
                         Your WIPE CODE (shown once, write it down or give it to someone you trust):\n\n  {wipe_code}\n\n\
                         Whoever holds it can erase this device from anywhere with `umbra wipe --code CODE`.\n\
                         Nobody else can, not even the server's operator.",
                        client.account(),
                        date(expires)
                    );
                    if let Some(qr) = qr(&wipe_code) {
                        text.push_str(&format!("\n\n{qr}"));
                    }
                    text
                },
            );
        }
        Command::Whoami => {
            let client = open(&cli)?;
            let expires = client.subscription_expires_at()?;
            out.value(
                json!({
                    "account_id": client.account(),
                    "identity_key": hex(client.identity_key().as_bytes()),
                    "server": client.server_address(),
                    "subscription_expires_at": expires,
                }),
                || {
                    format!(
                        "{}\nserver {}\nsubscription until {}",
                        client.account(),
                        client.server_address(),
                        date(expires)
                    )
                },
            );
        }
        Command::Contacts(command) => contacts(&cli, &out, command).await?,
        Command::Devices(command) => devices::devices(&cli, &out, command).await?,
        Command::Voice(command) => voice::voice(&cli, &out, command).await?,
        Command::Link { link, name } => devices::link(&cli, &out, link.as_deref(), name).await?,
        Command::Send {
            target,
            text,
            anonymous,
        } => {
            let client = online(&cli).await?;
            let id = conversation(&client, target)?;
            let message = if *anonymous {
                client.send_text_anonymously(&id, &text.join(" ")).await?
            } else {
                client.send_text(&id, &text.join(" ")).await?
            };
            out.message(&message);
        }
        Command::SendFile {
            target,
            path,
            caption,
            keep_metadata,
        } => {
            let client = online(&cli).await?;
            let mut events = client.subscribe();
            let progress = show_transfers(&out, &mut events);
            let id = conversation(&client, target)?;
            let options = umbra_client::FileOptions {
                caption: caption.clone(),
                keep_metadata: *keep_metadata,
            };
            let message = client.send_file_with(&id, path, options).await?;
            progress.abort();
            out.message(&message);
        }
        Command::Save { message_id, path } => {
            let client = online(&cli).await?;
            let mut events = client.subscribe();
            let progress = show_transfers(&out, &mut events);
            let size = client.save_attachment(*message_id, path).await?;
            progress.abort();
            out.value(
                json!({ "saved": path.display().to_string(), "bytes": size }),
                || format!("saved {size} bytes to {}", path.display()),
            );
        }
        Command::Uploads { action } => {
            let client = open(&cli)?;
            match action {
                UploadsAction::List => {
                    let names = client.pending_uploads()?;
                    out.value(json!({ "uploads": names }), || {
                        if names.is_empty() {
                            "no interrupted uploads".into()
                        } else {
                            names
                                .iter()
                                .map(|n| printable(n).into_owned())
                                .collect::<Vec<_>>()
                                .join("\n")
                        }
                    });
                }
                UploadsAction::Cancel => {
                    let cancelled = client.cancel_uploads()?;
                    out.value(json!({ "cancelled": cancelled }), || {
                        format!("{cancelled} upload(s) given up")
                    });
                }
                UploadsAction::Resume => {
                    client.connect().await?;
                    client.sync().await?;
                    let mut events = client.subscribe();
                    let progress = show_transfers(&out, &mut events);
                    let mut failed = 0;
                    for (name, outcome) in client.resume_uploads().await? {
                        match outcome {
                            Ok(message) => out.message(&message),
                            Err(error) => {
                                failed += 1;
                                eprintln!("{}: {error}", printable(&name));
                            }
                        }
                    }
                    progress.abort();
                    if failed > 0 {
                        bail!("{failed} upload(s) could not be finished");
                    }
                }
            }
        }
        Command::Recv => {
            let client = open(&cli)?;
            let mut events = client.subscribe();
            client.connect().await?;
            client.sync().await?;
            let mut shown = Vec::new();
            loop {
                let event = match events.try_recv() {
                    Ok(event) => event,
                    Err(tokio::sync::broadcast::error::TryRecvError::Lagged(n)) => {
                        eprintln!("({n} events skipped: output too slow)");
                        continue;
                    }
                    Err(_) => break,
                };
                if let Event::MessageReceived { message } = &event
                    && message.direction == Direction::In
                {
                    shown.push(message.id);
                }
                out.event(&event);
            }
            client.mark_read(&shown).await?;
            // Files after the messages: one that cannot be fetched now is
            // said, and left for the next time.
            let progress = show_transfers(&out, &mut events);
            if let Err(error) = client.fetch_attachments().await {
                eprintln!("files not fetched: {error}");
            }
            progress.abort();
        }
        Command::Listen => {
            let client = open(&cli)?;
            let mut events = client.subscribe();
            client.connect().await?;
            if !cli.json {
                eprintln!("listening as {} (Ctrl-C to stop)", client.account());
            }
            loop {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => break,
                    event = events.recv() => match event {
                        Ok(Event::Connection { state: umbra_client::ConnectionState::Disconnected }) => {
                            bail!(ClientError::ConnectionLost);
                        }
                        Ok(event) => out.event(&event),
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                            eprintln!("({n} events skipped: output too slow)");
                        }
                        Err(_) => break,
                    },
                }
            }
        }
        Command::Groups(command) => groups(&cli, &out, command).await?,
        Command::History { target, limit } => {
            let client = open(&cli)?;
            let id = conversation(&client, target)?;
            let messages = client.history(&id, *limit)?;
            for message in &messages {
                out.message(message);
            }
            // Read receipts need the server; without it the history still shows.
            let shown: Vec<i64> = messages.iter().map(|m| m.id).collect();
            if client.connect().await.is_ok() {
                client.mark_read(&shown).await?;
            } else {
                client.mark_shown(&shown)?;
            }
        }
        Command::Vault(command) => vault(&cli, &out, command)?,
        Command::Wipe(args) => {
            if let Some(code) = &args.code {
                let code: umbra_client::WipeCode =
                    code.parse().context("this is not a valid wipe code")?;
                umbra_client::send_wipe(&code, &umbra_client::SystemClock).await?;
                out.value(json!({ "wipe_sent": code.account }), || {
                    format!(
                        "Wipe command for {} accepted by the server. The device erases itself when it next connects.",
                        code.account
                    )
                });
            } else {
                if !args.yes {
                    eprint!(
                        "Erase this device and end its line for good? Type 'erase' to confirm: "
                    );
                    let mut answer = String::new();
                    std::io::stdin().read_line(&mut answer)?;
                    if answer.trim() != "erase" {
                        bail!("not confirmed; nothing was erased");
                    }
                }
                let client = open(&cli)?;
                if let Err(error) = client.connect().await {
                    eprintln!(
                        "warning: cannot reach the server ({}); erasing locally only",
                        printable(&error.to_string())
                    );
                }
                client.wipe_self().await?;
                out.value(json!({ "wiped": true }), || {
                    "This device was erased.".into()
                });
            }
        }
        Command::Disappear { args, default } => {
            let (target, timer) = match (args.as_slice(), *default) {
                ([timer], true) => (None, timer),
                ([target, timer], false) => (Some(target), timer),
                (_, true) => {
                    bail!("with --default give the timer alone: `umbra disappear --default 1h`")
                }
                (_, false) => bail!(
                    "give the conversation and the timer: `umbra disappear ACCOUNT_OR_GROUP 1h` (or --default TIMER)"
                ),
            };
            let seconds =
                match timer.as_str() {
                    "off" | "0" => None,
                    text => Some(humantime::parse_duration(text).with_context(|| {
                        format!("{text:?} is not a duration like 30s, 1h or 4w")
                    })?),
                };
            if *default {
                let client = open(&cli)?;
                client.set_default_disappearing(seconds)?;
                out.value(
                    json!({ "default_disappear_after": seconds.map(|d| d.as_secs()) }),
                    || "New conversations will use this timer.".into(),
                );
            } else {
                let client = online(&cli).await?;
                let id = conversation(&client, target.map(String::as_str).unwrap_or_default())?;
                client.set_disappearing(&id, seconds).await?;
                out.value(
                    json!({ "conversation": id, "disappear_after": seconds.map(|d| d.as_secs()) }),
                    || match seconds {
                        None => "Disappearing messages are off.".into(),
                        Some(d) => format!(
                            "Messages now disappear after {}.",
                            umbra_client::describe_timer(d.as_secs() as u32)
                        ),
                    },
                );
            }
        }
        Command::Renew { code } => {
            let client = online(&cli).await?;
            let until = client.redeem_renewal(code).await?;
            out.value(json!({ "subscription_expires_at": until }), || {
                format!("Renewed: subscription until {}.", date(until))
            });
        }
        Command::Distributor {
            credential,
            command,
        } => {
            let credential: umbra_client::DistributorCredential = credential
                .parse()
                .context("this is not a valid distributor credential")?;
            let session = umbra_client::DistributorSession::connect(&credential).await?;
            match command {
                DistributorCommand::Codes {
                    days,
                    count,
                    renewal,
                } => {
                    for code in session.issue_codes(*renewal, *days, *count).await? {
                        out.value(json!({ "code": code }), || printable(&code).into_owned());
                    }
                }
                DistributorCommand::Lines => {
                    for line in session.lines().await? {
                        out.value(
                            json!({
                                "account_id": line.account_id,
                                "subscription_expires_at": line.subscription_expires_at,
                                "last_seen_day": line.last_seen_day,
                                "status": line.status,
                            }),
                            || {
                                let seen = if line.last_seen_day == 0 {
                                    "never".to_owned()
                                } else {
                                    date(line.last_seen_day.saturating_mul(86_400))
                                };
                                format!(
                                    "{}  until {}  last seen {seen}  {}",
                                    line.account_id,
                                    date(line.subscription_expires_at),
                                    printable(&line.status)
                                )
                            },
                        );
                    }
                }
                DistributorCommand::Suspend { account: id } => {
                    session.suspend(&account(id)?).await?;
                    out.value(json!({ "suspended": id }), || format!("{id} suspended."));
                }
                DistributorCommand::Resume { account: id } => {
                    session.resume(&account(id)?).await?;
                    out.value(json!({ "resumed": id }), || format!("{id} resumed."));
                }
                DistributorCommand::Revoke { account: id } => {
                    session.revoke(&account(id)?).await?;
                    out.value(json!({ "revoked": id }), || {
                        format!("{id} revoked for good.")
                    });
                }
            }
        }
        Command::Security(command) => {
            let client = open(&cli)?;
            let current = passphrase(false)?;
            match command {
                SecurityCommand::Duress {
                    every_device,
                    wipe_code,
                } => {
                    let duress = match std::env::var("UMBRA_DURESS_PASSPHRASE") {
                        Ok(text) if text.chars().count() < 8 => {
                            bail!("choose a duress passphrase of at least 8 characters")
                        }
                        Ok(text) => Passphrase::new(text),
                        Err(_) => {
                            let first = rpassword::prompt_password("Duress passphrase: ")?;
                            let again = rpassword::prompt_password("Repeat it: ")?;
                            if first != again {
                                bail!("the passphrases differ");
                            }
                            if first.chars().count() < 8 {
                                bail!("choose a duress passphrase of at least 8 characters");
                            }
                            Passphrase::new(first)
                        }
                    };
                    let scope = if *every_device {
                        let text = match wipe_code {
                            Some(code) => code.clone(),
                            None => rpassword::prompt_password("Wipe code (umbra-wipe://…): ")?,
                        };
                        DuressScope::EveryDevice(
                            text.trim()
                                .parse()
                                .context("this is not a valid wipe code")?,
                        )
                    } else {
                        DuressScope::ThisDevice
                    };
                    let ends_line = client.set_duress_passphrase(&current, &duress, &scope)?;
                    out.value(
                        json!({
                            "duress_set": true,
                            "every_device": every_device,
                            "ends_line": ends_line,
                        }),
                        || {
                            if *every_device {
                                "Duress passphrase set. Entering it at any prompt erases this device \
                                 and wipes the account as the wipe code does: every other device \
                                 erases itself (one that is away, when it next connects)."
                                    .into()
                            } else if ends_line {
                                "Duress passphrase set. Entering it at any prompt erases this device \
                                 and ends its line (it is the account's only device; a device \
                                 linked later is then cut off, and keeps what it holds)."
                                    .into()
                            } else {
                                "Duress passphrase set. Entering it at any prompt erases this device \
                                 and removes nothing else: the account's other devices go on."
                                    .into()
                            }
                        },
                    );
                }
                SecurityCommand::WipeAfter { attempts } => {
                    client.set_max_failed_unlocks(&current, *attempts)?;
                    out.value(json!({ "wipe_after": attempts }), || {
                        format!(
                            "This device erases itself after {attempts} wrong passphrases in a row."
                        )
                    });
                }
            }
        }
        Command::UpdateKeys => {
            let client = online(&cli).await?;
            let updated = client.update_keys().await?;
            client.rotate_key_packages().await?;
            out.value(json!({ "conversations_updated": updated }), || {
                format!("New keys in {updated} conversation(s); KeyPackages replaced.")
            });
        }
    }
    Ok(())
}

async fn contacts(cli: &Cli, out: &Out, command: &ContactsCommand) -> anyhow::Result<()> {
    match command {
        ContactsCommand::Add { account: id } => {
            let id = account(id)?;
            let client = online(cli).await?;
            client.add_contact(&id).await?;
            out.value(json!({ "requested": id }), || {
                format!("Contact request sent to {id}. You can talk once they accept.")
            });
        }
        ContactsCommand::Accept { account: id } => {
            let id = account(id)?;
            let client = online(cli).await?;
            let conversation = client.accept_contact(&id).await?;
            out.value(
                json!({ "accepted": id, "conversation": conversation }),
                || format!("{id} is now a contact. `umbra send {id} ...` to write."),
            );
        }
        ContactsCommand::List => {
            let client = open(cli)?;
            let contacts = client.contacts()?;
            if out.json {
                for contact in &contacts {
                    println!("{}", json!(contact));
                }
            } else if contacts.is_empty() {
                println!("No contacts yet: `umbra contacts add ID`.");
            } else {
                for contact in contacts {
                    let mut marks = vec![format!("{:?}", contact.state).to_lowercase()];
                    if contact.verified {
                        marks.push("verified".into());
                    }
                    if contact.key_changed {
                        marks.push("KEY CHANGED".into());
                    }
                    if contact.key_unconfirmed {
                        marks.push("sending stopped until you confirm the new key".into());
                    }
                    println!("{}  {}", contact.account, marks.join(", "));
                }
            }
        }
        ContactsCommand::Verify {
            account: id,
            mark,
            accept,
        } => {
            let id = account(id)?;
            let client = open(cli)?;
            // Marking applies to the number shown by an earlier `verify`.
            let number = if *mark {
                client.verify_contact(&id)?;
                client.safety_number(&id)?
            } else if *accept {
                client.accept_key_change(&id)?;
                client.safety_number(&id)?
            } else {
                client.show_safety_number(&id)?
            };
            out.value(
                json!({ "account": id, "safety_number": number.digits, "verified": mark }),
                || {
                    let mut text = format!(
                        "Safety number with {id}:\n\n  {}\n",
                        number.digits
                    );
                    if let Some(qr) = number.qr() {
                        text.push_str(&format!("\n{qr}\n"));
                    }
                    text.push_str(if *mark {
                        "Marked verified."
                    } else if *accept {
                        "New key accepted, unverified: messages go to them again."
                    } else {
                        "Compare it with theirs in person. If it matches: `umbra contacts verify ID --mark`."
                    });
                    text
                },
            );
        }
    }
    Ok(())
}

fn vault(cli: &Cli, out: &Out, command: &VaultCommand) -> anyhow::Result<()> {
    let client = open(cli)?;
    match command {
        VaultCommand::Add { title, body } => {
            let body = if body.is_empty() {
                let mut text = String::new();
                std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)?;
                text
            } else {
                body.join(" ")
            };
            let id = client.vault_add(title, &body)?;
            out.value(json!({ "id": id }), || format!("Stored note {id}."));
        }
        VaultCommand::List => {
            for note in client.vault_list()? {
                out.value(
                    json!({ "id": note.id, "title": note.title, "updated_at": note.updated_at }),
                    || format!("{:>4}  {}", note.id, note.title),
                );
            }
        }
        VaultCommand::Show { id } => {
            let note = client.vault_get(*id)?;
            out.value(json!(note), || format!("{}\n\n{}", note.title, note.body));
        }
        VaultCommand::Delete { id } => {
            client.vault_delete(*id)?;
            out.value(json!({ "deleted": id }), || format!("Deleted note {id}."));
        }
    }
    Ok(())
}

async fn groups(cli: &Cli, out: &Out, command: &GroupsCommand) -> anyhow::Result<()> {
    match command {
        GroupsCommand::Create { name, members } => {
            let members = members.parse()?;
            let client = online(cli).await?;
            let id = client.create_group(name, &members).await?;
            out.value(json!({ "conversation": id, "name": name }), || {
                format!("Group \u{201c}{name}\u{201d} created: {id}")
            });
        }
        GroupsCommand::Add {
            conversation: target,
            members,
        } => {
            let members = members.parse()?;
            let client = online(cli).await?;
            let id = conversation(&client, target)?;
            client.add_members(&id, &members).await?;
            out.value(json!({ "conversation": id, "added": members }), || {
                "Added.".into()
            });
        }
        GroupsCommand::Remove {
            conversation: target,
            members,
        } => {
            let members = members.parse()?;
            let client = online(cli).await?;
            let id = conversation(&client, target)?;
            client.remove_members(&id, &members).await?;
            out.value(json!({ "conversation": id, "removed": members }), || {
                "Removed. They cannot read anything sent from now on.".into()
            });
        }
        GroupsCommand::Rename {
            conversation: target,
            name,
        } => {
            let client = online(cli).await?;
            let id = conversation(&client, target)?;
            client.rename_group(&id, name).await?;
            out.value(json!({ "conversation": id, "name": name }), || {
                "Renamed.".into()
            });
        }
        GroupsCommand::Leave {
            conversation: target,
        } => {
            let client = online(cli).await?;
            let id = conversation(&client, target)?;
            client.leave_group(&id).await?;
            out.value(json!({ "conversation": id, "left": true }), || {
                "Left the group.".into()
            });
        }
        GroupsCommand::List => {
            let client = open(cli)?;
            for conversation in client.conversations()? {
                out.value(json!(conversation), || {
                    let what = match &conversation.kind {
                        ConversationKind::Direct { peer } => format!("with {peer}"),
                        ConversationKind::Group => format!(
                            "\u{201c}{}\u{201d}, {} members",
                            printable(&conversation.name),
                            conversation.members.len()
                        ),
                    };
                    let state = if conversation.active { "" } else { " (left)" };
                    let suite = conversation
                        .suite
                        .map(|suite| format!(", {}", suite.kind()))
                        .unwrap_or_default();
                    format!("{}  {what}{suite}{state}", conversation.id)
                });
            }
        }
    }
    Ok(())
}

/// A UTC date for people. Times from the server are not trusted to be sane:
/// anything past the year 9999 reads as such rather than failing.
fn date(unix: u64) -> String {
    const YEAR_9999_END: u64 = 253_402_300_799;
    if unix > YEAR_9999_END {
        return "after 9999".into();
    }
    let time = std::time::UNIX_EPOCH + std::time::Duration::from_secs(unix);
    let mut text = String::new();
    use std::fmt::Write;
    if write!(text, "{}", humantime::format_rfc3339_seconds(time)).is_err() {
        return "an unreadable date".into();
    }
    text.split('T').next().unwrap_or_default().to_owned()
}

fn qr(text: &str) -> Option<String> {
    umbra_client::qr_text(text)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
