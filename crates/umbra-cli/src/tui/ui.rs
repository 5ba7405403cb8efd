//! Drawing the app: one function per screen and overlay, from [`App`] only.

use ratatui::Frame;
use ratatui::layout::{Alignment, Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Clear, List, ListItem, ListState, Paragraph, Wrap};
use umbra_client::{AttachmentState, ConversationKind, DeliveryState, Direction};

use super::app::{App, Focus, Link, NARROW, Overlay, Screen, Setup, TIMERS};

const SPINNER: [&str; 4] = ["|", "/", "-", "\\"];

/// Every key, for the help overlay.
pub const KEYS: &[(&str, &str)] = &[
    ("Up/Down, j/k", "move between conversations"),
    ("Enter, Tab, Right", "open the conversation, write"),
    ("Enter (writing)", "send"),
    ("Up/Down, PgUp/PgDn (writing)", "scroll the conversation"),
    ("Esc, Tab (writing)", "back to the list"),
    ("Ctrl-A (writing)", "to a group: send without logging in"),
    ("Ctrl-F (writing)", "send a file (its path)"),
    ("Ctrl-S (writing)", "save the conversation's latest file"),
    (
        "Ctrl-V (writing)",
        "show the latest photo (whole once fetched)",
    ),
    ("Ctrl-R (writing)", "record a voice note; again to stop"),
    (
        "Ctrl-P (writing)",
        "play the latest voice note; again to stop",
    ),
    ("Ctrl-E (writing)", "voice notes at 1x, 1.5x, 2x"),
    ("r", "contact requests (Enter accepts, d declines)"),
    ("n", "new contact (by account ID)"),
    ("g", "new group (name, Tab, members)"),
    ("m", "members: IDs to add, -IDs to remove"),
    ("t", "disappearing-message timer"),
    ("s", "safety number (v marks verified)"),
    ("?", "this help"),
    ("Esc", "close a dialog or banner"),
    ("q, Ctrl-C", "quit"),
];

pub fn draw(frame: &mut Frame<'_>, app: &App) {
    match &app.screen {
        Screen::Setup { step, input, error } => {
            setup(frame, step, input, error.as_deref(), app.tick)
        }
        Screen::WipeCode { account, code, qr } => wipe_code(frame, account, code, qr),
        Screen::Unlock { input, error } => unlock(frame, input, error.as_deref()),
        Screen::Main => main(frame, app),
    }
}

/// A new device's first screen: `umbra activate`, step by step.
fn setup(frame: &mut Frame<'_>, step: &Setup, input: &str, error: Option<&str>, tick: u64) {
    let area = centered(frame.area(), 76, 9);
    let masked = format!("> {}", "*".repeat(input.chars().count()));
    let (title, prompt, shown, hint) = match step {
        Setup::Activation => (
            " welcome to Umbra ",
            "Paste your activation string (umbra://…) or device link (umbra-link://…):",
            format!("> {input}"),
            "Enter to go on, Esc to quit",
        ),
        Setup::Passphrase { .. } => (
            " choose a passphrase ",
            "A passphrase for this device (at least 8 characters). It \
             encrypts everything Umbra keeps here; nobody can recover it.",
            masked,
            "Enter to go on, Esc to go back",
        ),
        Setup::Repeat { .. } => (
            " choose a passphrase ",
            "Type it again:",
            masked,
            "Enter to activate, Esc to go back",
        ),
        Setup::Activating => (
            " activating ",
            "Setting up this device at the server…",
            SPINNER[(tick % 4) as usize].to_owned(),
            "",
        ),
    };
    let mut lines = vec![
        Line::from(prompt),
        Line::from(""),
        Line::from(shown),
        Line::from(""),
    ];
    match error {
        Some(error) => lines.push(Line::from(Span::styled(
            error,
            Style::default().fg(Color::Red),
        ))),
        None => lines.push(Line::from(hint)),
    }
    frame.render_widget(
        Paragraph::new(lines)
            .wrap(Wrap { trim: false })
            .block(Block::default().borders(Borders::ALL).title(title)),
        area,
    );
}

/// Shown once, right after activation, until Enter.
fn wipe_code(frame: &mut Frame<'_>, account: &str, code: &str, qr: &str) {
    let mut lines = vec![
        Line::from(format!(
            "Activated. Your account ID is {account}: give it to the people you want to talk to."
        )),
        Line::from(""),
        Line::from(
            "Your WIPE CODE, shown this once (write it down, or give it to someone you trust):",
        ),
        Line::from(""),
        Line::from(Span::styled(
            code.to_owned(),
            Style::default().add_modifier(Modifier::BOLD),
        )),
        Line::from(""),
        Line::from(
            "Whoever holds it can erase this device from anywhere (`umbra wipe --code CODE`); \
             nobody else can, not even the server's operator.",
        ),
        Line::from(""),
        Line::from("Enter when you have it"),
        Line::from(""),
    ];
    // Last: a short terminal cuts the QR code, not the words.
    lines.extend(qr.lines().map(|l| Line::from(l.to_owned())));
    let height = (lines.len() as u16).saturating_add(4);
    frame.render_widget(
        Paragraph::new(lines).wrap(Wrap { trim: false }).block(
            Block::default()
                .borders(Borders::ALL)
                .title(" your wipe code "),
        ),
        centered(frame.area(), 96, height),
    );
}

fn unlock(frame: &mut Frame<'_>, input: &str, error: Option<&str>) {
    let area = centered(frame.area(), 50, 9);
    let mut lines = vec![
        Line::from("Umbra").alignment(Alignment::Center),
        Line::from(""),
        Line::from("Passphrase:"),
        Line::from(format!("> {}", "*".repeat(input.chars().count()))),
        Line::from(""),
    ];
    if let Some(error) = error {
        lines.push(Line::from(Span::styled(
            error,
            Style::default().fg(Color::Red),
        )));
    } else {
        lines.push(Line::from("Enter to unlock, Esc to quit"));
    }
    frame.render_widget(
        Paragraph::new(lines).block(Block::default().borders(Borders::ALL).title(" unlock ")),
        area,
    );
}

fn timer_mark(seconds: u32) -> String {
    if seconds == 0 {
        String::new()
    } else {
        format!(" ⏱{}", short_duration(u64::from(seconds)))
    }
}

fn short_duration(seconds: u64) -> String {
    match seconds {
        s if s >= 604_800 && s % 604_800 == 0 => format!("{}w", s / 604_800),
        s if s >= 86_400 && s % 86_400 == 0 => format!("{}d", s / 86_400),
        s if s >= 3600 && s % 3600 == 0 => format!("{}h", s / 3600),
        s if s >= 60 && s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

fn clock(unix: u64) -> String {
    let seconds = unix % 86_400;
    format!("{:02}:{:02}", seconds / 3600, (seconds % 3600) / 60)
}

fn main(frame: &mut Frame<'_>, app: &App) {
    let [body, status] =
        Layout::vertical([Constraint::Min(3), Constraint::Length(1)]).areas(frame.area());
    let body = if let Some(banner) = &app.banner {
        let [top, rest] = Layout::vertical([Constraint::Length(1), Constraint::Min(2)]).areas(body);
        frame.render_widget(
            Paragraph::new(format!("⚠ {banner} (Esc to dismiss)"))
                .style(Style::default().fg(Color::Black).bg(Color::Yellow)),
            top,
        );
        rest
    } else {
        body
    };
    if frame.area().width < NARROW {
        if app.showing_conversation {
            conversation(frame, app, body);
        } else {
            conversations(frame, app, body);
        }
    } else {
        let [list, chat] =
            Layout::horizontal([Constraint::Length(30), Constraint::Min(20)]).areas(body);
        conversations(frame, app, list);
        conversation(frame, app, chat);
    }
    status_bar(frame, app, status);
    overlay(frame, app);
}

fn conversations(frame: &mut Frame<'_>, app: &App, area: Rect) {
    let items: Vec<ListItem<'_>> = app
        .conversations
        .iter()
        .map(|conversation| {
            let verified = match &conversation.kind {
                ConversationKind::Direct { peer } => app
                    .contacts
                    .iter()
                    .any(|c| &c.account == peer && c.verified),
                ConversationKind::Group => false,
            };
            // A member whose changed key is not confirmed: nothing is sent
            // here until it is.
            let stopped = app
                .contacts
                .iter()
                .any(|c| c.key_unconfirmed && conversation.members.contains(&c.account));
            let unread = app.unread(&conversation.id);
            let mut title = App::title(conversation);
            if verified {
                title.push_str(" ✓");
            }
            if stopped {
                title.push_str(" ⚠ key changed");
            }
            title.push_str(&timer_mark(conversation.disappear_after));
            if unread > 0 {
                title.push_str(&format!(" ({unread})"));
            }
            let preview = app
                .previews
                .iter()
                .find(|(id, _)| *id == conversation.id)
                .map(|(_, text)| text.clone())
                .unwrap_or_default();
            let style = if unread > 0 {
                Style::default().add_modifier(Modifier::BOLD)
            } else {
                Style::default()
            };
            ListItem::new(vec![
                Line::from(Span::styled(title, style)),
                Line::from(Span::styled(
                    format!("  {preview}"),
                    Style::default().fg(Color::DarkGray),
                )),
            ])
        })
        .collect();
    let requests = app.requests().len();
    let title = if requests > 0 {
        format!(" Conversations · {requests} request(s): r ")
    } else {
        " Conversations ".to_owned()
    };
    let border = if app.focus == Focus::Conversations {
        Style::default().fg(Color::Cyan)
    } else {
        Style::default()
    };
    let mut state =
        ListState::default().with_selected((!app.conversations.is_empty()).then_some(app.selected));
    frame.render_stateful_widget(
        List::new(items)
            .block(
                Block::default()
                    .borders(Borders::ALL)
                    .title(title)
                    .border_style(border),
            )
            .highlight_style(Style::default().add_modifier(Modifier::REVERSED)),
        area,
        &mut state,
    );
}

fn state_mark(state: DeliveryState) -> &'static str {
    match state {
        DeliveryState::Sending => "…",
        DeliveryState::Sent => "✓",
        DeliveryState::Delivered => "✓✓",
        DeliveryState::Read => "✓✓ read",
        DeliveryState::Failed => "✗ not sent",
        DeliveryState::Received => "",
    }
}

fn conversation(frame: &mut Frame<'_>, app: &App, area: Rect) {
    let [messages, compose] =
        Layout::vertical([Constraint::Min(3), Constraint::Length(3)]).areas(area);
    let Some(current) = app.current() else {
        frame.render_widget(
            Paragraph::new("No conversation yet. n: add a contact · r: requests · ?: help")
                .wrap(Wrap { trim: true })
                .block(Block::default().borders(Borders::ALL)),
            messages,
        );
        return;
    };
    let mut title = format!(" {}", App::title(current));
    if let ConversationKind::Group = current.kind {
        title.push_str(&format!(" · {} members", current.members.len()));
    }
    title.push_str(&timer_mark(current.disappear_after));
    if let Some(suite) = current.suite {
        title.push_str(&format!(" · {}", suite.kind()));
    }
    if !current.active {
        title.push_str(" · you left");
    }
    title.push(' ');
    let lines: Vec<Line<'_>> = app
        .messages
        .iter()
        .map(|message| {
            let countdown = message
                .expires_at
                .map(|at| format!(" ⏱{}", short_duration(at.saturating_sub(app.now))))
                .unwrap_or_default();
            match message.direction {
                Direction::System => Line::from(Span::styled(
                    format!("  · {}", message.body),
                    Style::default().fg(Color::DarkGray),
                )),
                Direction::Out => Line::from(vec![
                    Span::styled(
                        format!("{} you: ", clock(message.timestamp)),
                        Style::default().fg(Color::Green),
                    ),
                    file_mark(message),
                    Span::raw(message.body.clone()),
                    Span::styled(
                        format!(" {}{countdown}", state_mark(message.state)),
                        Style::default().fg(Color::DarkGray),
                    ),
                ]),
                Direction::In => {
                    let late = message
                        .arrived_late()
                        .map(|at| format!(" (received {})", clock(at)))
                        .unwrap_or_default();
                    Line::from(vec![
                        Span::styled(
                            format!("{} {}: ", clock(message.timestamp), message.sender),
                            Style::default().fg(Color::Cyan),
                        ),
                        file_mark(message),
                        Span::raw(message.body.clone()),
                        Span::styled(
                            format!("{late}{countdown}"),
                            Style::default().fg(Color::DarkGray),
                        ),
                    ])
                }
            }
        })
        .collect();
    let block = Block::default().borders(Borders::ALL).title(title);
    let inner_height = messages.height.saturating_sub(2);
    let paragraph = Paragraph::new(lines).wrap(Wrap { trim: false });
    // Keep the newest line at the bottom, then scroll up by `scroll`.
    let total = paragraph.line_count(messages.width.saturating_sub(2)) as u16;
    let offset = total
        .saturating_sub(inner_height)
        .saturating_sub(app.scroll);
    frame.render_widget(paragraph.block(block).scroll((offset, 0)), messages);
    let border = if app.focus == Focus::Compose {
        Style::default().fg(Color::Cyan)
    } else {
        Style::default()
    };
    let title = if app.sending_anonymously() {
        " ANONYMOUS: the server can't tell it's you · Ctrl-A as yourself "
    } else {
        " Enter to send · Esc back · ? help "
    };
    frame.render_widget(
        Paragraph::new(format!("> {}", app.compose)).block(
            Block::default()
                .borders(Borders::ALL)
                .border_style(border)
                .title(title),
        ),
        compose,
    );
}

fn status_bar(frame: &mut Frame<'_>, app: &App, area: Rect) {
    let link = match app.link {
        Link::Connecting => "connecting…",
        Link::Connected => "connected",
        Link::Reconnecting => "reconnecting…",
        Link::CertificateMismatch => "CERTIFICATE MISMATCH: not connecting",
        Link::CertificateOutOfDate => "SERVER CERTIFICATE EXPIRED: check this device's clock",
    };
    let spinner = if app.busy > 0 {
        format!(" {}", SPINNER[(app.tick % 4) as usize])
    } else {
        String::new()
    };
    let mut text = format!(" {} · {link}{spinner}", app.account);
    if let Some((ms, level)) = app.recording {
        let meter = usize::from(level) * 10 / 256;
        text.push_str(&format!(
            " · \u{25cf} REC {} [{:<10}] Ctrl-R stops",
            crate::voice::minutes(ms),
            "\u{2588}".repeat(meter)
        ));
    }
    if app.playing {
        text.push_str(&format!(
            " · \u{25b6} playing at {}x, Ctrl-P stops",
            crate::tui::app::SPEEDS[app.speed]
        ));
    }
    if let Some(status) = &app.status {
        text.push_str(&format!(" · {status}"));
    }
    let style = match app.link {
        Link::CertificateMismatch | Link::CertificateOutOfDate => {
            Style::default().fg(Color::White).bg(Color::Red)
        }
        _ => Style::default().fg(Color::Black).bg(Color::Gray),
    };
    frame.render_widget(Paragraph::new(text).style(style), area);
}

/// Where a whole photo is drawn on a screen of `screen`: inside a frame
/// one cell in from the edges.
pub fn photo_area(screen: Rect) -> Rect {
    screen.inner(ratatui::layout::Margin::new(2, 2))
}

fn centered(area: Rect, width: u16, height: u16) -> Rect {
    let width = width.min(area.width);
    let height = height.min(area.height);
    Rect {
        x: area.x + (area.width - width) / 2,
        y: area.y + (area.height - height) / 2,
        width,
        height,
    }
}

fn dialog(frame: &mut Frame<'_>, title: &str, lines: Vec<Line<'_>>, width: u16) {
    let height = lines.len() as u16 + 2;
    let area = centered(frame.area(), width, height);
    frame.render_widget(Clear, area);
    frame.render_widget(
        Paragraph::new(lines).wrap(Wrap { trim: false }).block(
            Block::default()
                .borders(Borders::ALL)
                .title(format!(" {title} ")),
        ),
        area,
    );
}

/// A message's file, before its caption: type, name, size, where it is.
fn file_mark(message: &umbra_client::Message) -> Span<'static> {
    let Some(file) = &message.attachment else {
        return Span::raw("");
    };
    if file.duration_ms > 0 && file.mime_type.starts_with("audio/ogg") {
        let state = match file.state {
            AttachmentState::Sent | AttachmentState::Fetched => "Ctrl-P plays",
            AttachmentState::Available => "fetching…",
            AttachmentState::Gone => "no longer on the server",
            AttachmentState::Invalid => "damaged: refused",
        };
        return Span::styled(
            format!(
                "[voice {} {} · {state}] ",
                crate::voice::minutes(file.duration_ms),
                crate::voice::bars(&file.waveform)
            ),
            Style::default().fg(Color::Yellow),
        );
    }
    let kind = file.mime_type.split('/').next().unwrap_or("file");
    let kind = match kind {
        "image" => "photo",
        "audio" => "audio",
        "video" => "video",
        _ => "file",
    };
    let state = match file.state {
        AttachmentState::Sent | AttachmentState::Fetched => "Ctrl-S saves",
        AttachmentState::Available => "fetching…",
        AttachmentState::Gone => "no longer on the server",
        AttachmentState::Invalid => "damaged: refused",
    };
    Span::styled(
        format!(
            "[{kind} {} · {} · {state}] ",
            crate::escape::printable(&file.name),
            human_size(file.size)
        ),
        Style::default().fg(Color::Yellow),
    )
}

/// Bytes for people: 512 B, 1.5 KiB, 20.0 MiB.
fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

fn overlay(frame: &mut Frame<'_>, app: &App) {
    match &app.overlay {
        Overlay::None => {}
        Overlay::Help => {
            let lines = KEYS
                .iter()
                .map(|(key, what)| Line::from(format!("{key:<30} {what}")))
                .collect();
            dialog(frame, "keys (Esc closes)", lines, 76);
        }
        Overlay::Requests { selected } => {
            let requests = app.requests();
            let mut lines: Vec<Line<'_>> = if requests.is_empty() {
                vec![Line::from("No contact requests.")]
            } else {
                requests
                    .iter()
                    .enumerate()
                    .map(|(n, contact)| {
                        let line = format!(
                            "{} {}",
                            if n == *selected { ">" } else { " " },
                            contact.account
                        );
                        Line::from(line)
                    })
                    .collect()
            };
            lines.push(Line::from(""));
            lines.push(Line::from("Enter accepts · d declines · Esc closes"));
            dialog(frame, "contact requests", lines, 40);
        }
        Overlay::NewContact { input } => dialog(
            frame,
            "new contact",
            vec![
                Line::from("Their account ID:"),
                Line::from(format!("> {input}")),
                Line::from(""),
                Line::from("Enter sends a contact request · Esc cancels"),
            ],
            50,
        ),
        Overlay::NewGroup {
            name,
            members,
            on_members,
        } => dialog(
            frame,
            "new group",
            vec![
                Line::from(format!(
                    "{} Name:    {name}",
                    if *on_members { " " } else { ">" }
                )),
                Line::from(format!(
                    "{} Members: {members}",
                    if *on_members { ">" } else { " " }
                )),
                Line::from(""),
                Line::from("Members are account IDs, comma-separated"),
                Line::from("Tab switches field · Enter creates · Esc cancels"),
            ],
            56,
        ),
        Overlay::Members { input } => {
            let mut lines: Vec<Line<'_>> = app
                .current()
                .map(|c| {
                    c.members
                        .iter()
                        .map(|m| Line::from(format!("  {m}")))
                        .collect()
                })
                .unwrap_or_default();
            lines.push(Line::from(""));
            lines.push(Line::from(format!("> {input}")));
            lines.push(Line::from("IDs to add, or -IDs to remove · Enter · Esc"));
            dialog(frame, "members", lines, 50);
        }
        Overlay::Timer { selected } => {
            let mut lines: Vec<Line<'_>> = TIMERS
                .iter()
                .enumerate()
                .map(|(n, seconds)| {
                    let label = if *seconds == 0 {
                        "off".to_owned()
                    } else {
                        umbra_client::describe_timer(*seconds)
                    };
                    Line::from(format!(
                        "{} {label}",
                        if n == *selected { ">" } else { " " }
                    ))
                })
                .collect();
            lines.push(Line::from(""));
            lines.push(Line::from("Enter sets it for everyone · Esc"));
            dialog(frame, "messages disappear after", lines, 40);
        }
        Overlay::Photo { name } => {
            let area = frame.area().inner(ratatui::layout::Margin::new(1, 1));
            frame.render_widget(Clear, area);
            let block = Block::default().borders(Borders::ALL).title(format!(
                " {} · any key closes ",
                crate::escape::printable(name)
            ));
            frame.render_widget(block, area);
            if let Some(view) = &app.photo {
                frame.render_widget(ratatui_image::Image::new(&view.0), photo_area(frame.area()));
            }
        }
        Overlay::Picture { name, picture } => {
            // Two pixels a cell: the upper half block in the top pixel's
            // colour on the bottom pixel's.
            let mut lines: Vec<Line<'_>> = (0..picture.height.div_ceil(2))
                .map(|row| {
                    Line::from(
                        (0..picture.width)
                            .map(|x| {
                                let [r, g, b] = picture.at(x, row * 2);
                                let [r2, g2, b2] = picture.at(x, row * 2 + 1);
                                Span::styled(
                                    "▀",
                                    Style::default()
                                        .fg(Color::Rgb(r, g, b))
                                        .bg(Color::Rgb(r2, g2, b2)),
                                )
                            })
                            .collect::<Vec<_>>(),
                    )
                })
                .collect();
            lines.push(Line::from(""));
            lines.push(Line::from(
                "A thumbnail from its sender · Ctrl-S saves the photo · any key closes",
            ));
            let title = format!("{}", crate::escape::printable(name));
            dialog(frame, &title, lines, 76);
        }
        Overlay::AttachFile { input } => dialog(
            frame,
            "send a file",
            vec![
                Line::from("Path of the file (~/ for your home):"),
                Line::from(format!("> {input}")),
                Line::from(""),
                Line::from("It is sealed on this device; the server keeps"),
                Line::from("only ciphertext, until every recipient has it."),
                Line::from("Enter sends · Esc cancels"),
            ],
            60,
        ),
        Overlay::VoiceDraft {
            to, duration_ms, ..
        } => dialog(
            frame,
            "voice note",
            vec![
                Line::from(format!(
                    "Recorded {} (kept encrypted on this device).",
                    crate::voice::minutes(*duration_ms)
                )),
                Line::from(format!("For {}.", crate::escape::printable(to))),
                Line::from(""),
                Line::from("Enter sends · p listens · d deletes"),
                Line::from("Esc keeps it as a draft"),
            ],
            60,
        ),
        Overlay::SaveFile { input, .. } => dialog(
            frame,
            "save the file",
            vec![
                Line::from("Save it opened to (a new file; ~/ for your home):"),
                Line::from(format!("> {input}")),
                Line::from(""),
                Line::from("Enter saves · Esc cancels"),
            ],
            60,
        ),
        Overlay::Safety {
            account,
            digits,
            qr,
        } => {
            let mut lines = vec![
                Line::from(format!("Safety number with {account}:")),
                Line::from(""),
                Line::from(digits.clone()),
                Line::from(""),
            ];
            lines.extend(qr.lines().map(|l| Line::from(l.to_owned())));
            lines.push(Line::from(""));
            lines.push(Line::from("Compare with theirs · v: mark verified · Esc"));
            dialog(frame, "verify", lines, 76);
        }
    }
}

#[cfg(test)]
mod tests {
    //! Golden snapshots of every screen, rendered with ratatui's TestBackend.
    //! `UPDATE_SNAPSHOTS=1 cargo test -p umbra-cli` rewrites them; review the
    //! diff before committing.
    #![allow(clippy::unwrap_used)]

    use ratatui::Terminal;
    use ratatui::backend::TestBackend;
    use umbra_client::{
        AccountId, Contact, ContactState, Conversation, ConversationId, ConversationKind,
        DeliveryState, Direction, Message,
    };

    use super::super::app::{App, Focus, Link, Overlay, Screen};
    use super::draw;

    const NOW: u64 = 1_795_300_000;

    fn id(text: &str) -> AccountId {
        AccountId::parse(text).unwrap()
    }

    fn message(
        n: i64,
        direction: Direction,
        sender: &str,
        body: &str,
        expires_in: Option<u64>,
    ) -> Message {
        Message {
            id: n,
            conversation: ConversationId("aa".into()),
            sender: id(sender),
            direction,
            body: body.into(),
            state: match direction {
                Direction::Out => DeliveryState::Sent,
                _ => DeliveryState::Received,
            },
            timestamp: NOW - 600 + n as u64 * 60,
            received_at: (direction == Direction::In).then_some(NOW - 600 + n as u64 * 60),
            expires_at: expires_in.map(|s| NOW + s),
            disappear_after: 30,
            attachment: None,
        }
    }

    fn sample() -> App {
        let direct = Conversation {
            id: ConversationId("aa".into()),
            kind: ConversationKind::Direct {
                peer: id("GUF8EA6B"),
            },
            name: String::new(),
            active: true,
            disappear_after: 30,
            members: vec![id("XX4H6VEU"), id("GUF8EA6B")],
            suite: Some(umbra_client::Suite::default()),
        };
        let group = Conversation {
            id: ConversationId("bb".into()),
            kind: ConversationKind::Group,
            name: "Night shift".into(),
            active: true,
            disappear_after: 0,
            members: vec![id("XX4H6VEU"), id("GUF8EA6B"), id("K7QD9XPM")],
            suite: Some(umbra_client::Suite::CLASSICAL),
        };
        App {
            screen: Screen::Main,
            account: "XX4H6VEU".into(),
            link: Link::Connected,
            conversations: vec![direct, group],
            contacts: vec![
                Contact {
                    account: id("GUF8EA6B"),
                    state: ContactState::Accepted,
                    verified: true,
                    key_changed: false,
                    key_unconfirmed: false,
                    conversation: Some(ConversationId("aa".into())),
                },
                Contact {
                    account: id("K7QD9XPM"),
                    state: ContactState::Incoming,
                    verified: false,
                    key_changed: false,
                    key_unconfirmed: false,
                    conversation: None,
                },
            ],
            unread: vec![(ConversationId("bb".into()), 2)],
            previews: vec![
                (ConversationId("aa".into()), "see you at nine".into()),
                (ConversationId("bb".into()), "who has the keys?".into()),
            ],
            messages: vec![
                message(
                    1,
                    Direction::System,
                    "XX4H6VEU",
                    "GUF8EA6B set messages to disappear after 30 seconds",
                    None,
                ),
                message(
                    2,
                    Direction::In,
                    "GUF8EA6B",
                    "are we still on for tonight? this line is long enough to wrap across the pane, with ünïcödé and 漢字 too",
                    Some(21),
                ),
                message(3, Direction::Out, "XX4H6VEU", "see you at nine", Some(28)),
            ],
            now: NOW,
            ..App::default()
        }
    }

    fn render(app: &App, width: u16, height: u16) -> String {
        let mut terminal = Terminal::new(TestBackend::new(width, height)).unwrap();
        terminal.draw(|frame| draw(frame, app)).unwrap();
        let buffer = terminal.backend().buffer();
        (0..height)
            .map(|y| {
                (0..width)
                    .map(|x| buffer[(x, y)].symbol())
                    .collect::<String>()
                    .trim_end()
                    .to_owned()
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn check(name: &str, actual: String) {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("src/tui/snapshots")
            .join(format!("{name}.txt"));
        if std::env::var_os("UPDATE_SNAPSHOTS").is_some() {
            std::fs::write(&path, format!("{actual}\n")).unwrap();
            return;
        }
        let expected = std::fs::read_to_string(&path).unwrap_or_else(|_| {
            panic!(
                "no snapshot {}; run with UPDATE_SNAPSHOTS=1",
                path.display()
            )
        });
        assert_eq!(
            actual.trim_end_matches('\n'),
            expected.trim_end_matches('\n'),
            "screen {name} changed; if intended, rerun with UPDATE_SNAPSHOTS=1 and review the diff"
        );
    }

    #[test]
    fn unlock_screen_masks_the_passphrase() {
        let app = App {
            screen: Screen::Unlock {
                input: "secret".into(),
                error: None,
            },
            ..App::default()
        };
        check("unlock", render(&app, 80, 24));
        let app = App {
            screen: Screen::Unlock {
                input: String::new(),
                error: Some("wrong passphrase".into()),
            },
            ..App::default()
        };
        check("unlock_error", render(&app, 80, 24));
    }

    #[test]
    fn a_new_device_is_set_up_on_screen() {
        use super::super::app::Setup;
        let app = App {
            screen: Screen::Setup {
                step: Setup::Activation,
                input: "umbra://relay.example:7443/".into(),
                error: None,
            },
            ..App::default()
        };
        check("setup_activation", render(&app, 80, 24));
        let app = App {
            screen: Screen::Setup {
                step: Setup::Passphrase {
                    activation: "umbra://…".into(),
                },
                input: "secret".into(),
                error: Some("The passphrases differ: choose it again".into()),
            },
            ..App::default()
        };
        check("setup_passphrase", render(&app, 80, 24));
        let app = App {
            screen: Screen::WipeCode {
                account: "K7QD9XPM".into(),
                code: "umbra-wipe://relay.example:7443/K7QD9XPM/0a1b-2c3d?pin=ab12".into(),
                qr: "█▀▀▀█\n█ █ █\n▀▀▀▀▀".into(),
            },
            ..App::default()
        };
        check("wipe_code", render(&app, 100, 24));
    }

    #[test]
    fn two_panes() {
        check("main", render(&sample(), 100, 20));
    }

    #[test]
    fn writing_anonymously_says_so() {
        let mut app = sample();
        app.selected = app
            .conversations
            .iter()
            .position(|c| matches!(c.kind, umbra_client::ConversationKind::Group))
            .unwrap();
        app.focus = Focus::Compose;
        app.anonymous = true;
        app.compose = "who has the keys?".into();
        check("anonymous", render(&app, 100, 20));
    }

    #[test]
    fn narrow_terminals_show_one_pane() {
        let mut app = sample();
        app.wide = false;
        check("narrow_list", render(&app, 60, 16));
        app.showing_conversation = true;
        app.focus = Focus::Compose;
        app.compose = "on my way".into();
        check("narrow_conversation", render(&app, 60, 16));
    }

    #[test]
    fn overlays() {
        let mut app = sample();
        app.overlay = Overlay::Help;
        check("help", render(&app, 100, 24));
        app.overlay = Overlay::Requests { selected: 0 };
        check("requests", render(&app, 100, 20));
        app.overlay = Overlay::Timer { selected: 2 };
        check("timer", render(&app, 100, 20));
        app.overlay = Overlay::NewGroup {
            name: "Crew".into(),
            members: "GUF8EA6B,K7QD9XPM".into(),
            on_members: true,
        };
        check("new_group", render(&app, 100, 20));
        app.overlay = Overlay::NewContact {
            input: "K7QD9XPM".into(),
        };
        check("new_contact", render(&app, 100, 20));
        app.overlay = Overlay::Members {
            input: "-K7QD9XPM".into(),
        };
        app.selected = 1;
        check("members", render(&app, 100, 20));
        app.selected = 0;
        app.overlay = Overlay::Safety {
            account: id("GUF8EA6B"),
            digits: "25006 17974 24090 77942 09045 01518 48966 88725 80398 30090 53996 97296"
                .into(),
            qr: "█▀▀▀█\n█ █ █\n▀▀▀▀▀".into(),
        };
        check("safety", render(&app, 100, 24));
    }

    #[test]
    fn files_show_their_kind_name_size_and_state() {
        let mut app = sample();
        let mut sent = message(7, Direction::Out, "XX4H6VEU", "the view", None);
        sent.attachment = Some(umbra_client::AttachmentInfo {
            name: "harbour.jpg".into(),
            size: 2_400_000,
            mime_type: "image/jpeg".into(),
            state: umbra_client::AttachmentState::Sent,
            duration_ms: 0,
            has_thumbnail: true,
            waveform: Vec::new(),
        });
        let mut received = message(8, Direction::In, "GUF8EA6B", "", None);
        received.attachment = Some(umbra_client::AttachmentInfo {
            name: "notes\u{202e}fdp.exe".into(),
            size: 512,
            mime_type: "application/pdf".into(),
            state: umbra_client::AttachmentState::Available,
            duration_ms: 0,
            has_thumbnail: false,
            waveform: Vec::new(),
        });
        app.messages.push(sent);
        app.messages.push(received);
        app.focus = Focus::Compose;
        check("files", render(&app, 100, 20));
        app.overlay = Overlay::AttachFile {
            input: "~/photos/harbour.jpg".into(),
        };
        check("attach_file", render(&app, 100, 20));
        app.overlay = Overlay::SaveFile {
            message: 7,
            input: "harbour.jpg".into(),
        };
        check("save_file", render(&app, 100, 20));
        app.overlay = Overlay::Picture {
            name: "harbour.jpg".into(),
            picture: umbra_client::thumbnail::Picture {
                width: 8,
                height: 4,
                pixels: vec![[200, 10, 10]; 32],
            },
        };
        check("picture", render(&app, 100, 20));
    }

    #[test]
    fn voice_notes_show_their_length_and_waveform_and_recording_its_meter() {
        let mut app = sample();
        let mut note = message(9, Direction::In, "GUF8EA6B", "", None);
        note.attachment = Some(umbra_client::AttachmentInfo {
            name: "voice-note.opus".into(),
            size: 30_000,
            mime_type: "audio/ogg".into(),
            state: umbra_client::AttachmentState::Fetched,
            duration_ms: 67_000,
            has_thumbnail: false,
            waveform: vec![0, 40, 90, 140, 200, 255, 200, 120, 60, 0],
        });
        app.messages.push(note);
        app.focus = Focus::Compose;
        app.recording = Some((7_300, 180));
        check("voice", render(&app, 100, 20));
        app.recording = None;
        app.playing = true;
        app.speed = 1;
        app.overlay = Overlay::VoiceDraft {
            conversation: ConversationId("aa".into()),
            to: "GUF8EA6B".into(),
            draft: 3,
            duration_ms: 7_300,
        };
        check("voice_draft", render(&app, 100, 20));
    }

    /// A photo, 400 × 200: left half red, right half blue.
    fn two_halves() -> image::DynamicImage {
        image::DynamicImage::ImageRgb8(image::RgbImage::from_fn(400, 200, |x, _| {
            if x < 200 {
                image::Rgb([255, 0, 0])
            } else {
                image::Rgb([0, 0, 255])
            }
        }))
    }

    fn photo_view(protocol: ratatui_image::picker::ProtocolType) -> super::super::app::PhotoView {
        let mut picker = ratatui_image::picker::Picker::halfblocks();
        picker.set_protocol_type(protocol);
        let area = super::photo_area(ratatui::layout::Rect::new(0, 0, 60, 20));
        super::super::app::PhotoView(
            picker
                .new_protocol(
                    two_halves(),
                    area.as_size(),
                    ratatui_image::Resize::Fit(None),
                )
                .unwrap(),
        )
    }

    #[test]
    fn a_whole_photo_is_drawn_in_half_blocks_where_the_terminal_has_no_graphics() {
        let mut app = sample();
        app.focus = Focus::Compose;
        app.photo = Some(photo_view(ratatui_image::picker::ProtocolType::Halfblocks));
        app.overlay = Overlay::Photo {
            name: "harbour.jpg".into(),
        };
        let screen = render(&app, 60, 20);
        check("photo", screen.clone());
        // Red on the left, blue on the right: the cells' colours say so.
        let backend = {
            let mut terminal = Terminal::new(TestBackend::new(60, 20)).unwrap();
            terminal.draw(|frame| draw(frame, &app)).unwrap();
            terminal.backend().buffer().clone()
        };
        // (400 × 200 pixels at half blocks' 10 × 20 a cell: 40 × 10 cells
        // from the frame's corner; a cell of one colour is a space on it.)
        let row = 6;
        let left = backend[(8, row)].bg;
        let right = backend[(35, row)].bg;
        assert_eq!(left, ratatui::style::Color::Rgb(255, 0, 0), "{screen}");
        assert_eq!(right, ratatui::style::Color::Rgb(0, 0, 255), "{screen}");
    }

    #[test]
    fn a_whole_photo_goes_out_in_the_terminals_own_graphics_protocol() {
        use ratatui_image::picker::ProtocolType;
        // What each protocol's escape sequence starts with: kitty's APC
        // graphics command, sixel's DCS, iTerm2's OSC 1337.
        for (protocol, start) in [
            (ProtocolType::Kitty, "\u{1b}_G"),
            (ProtocolType::Sixel, "\u{1b}P"),
            (ProtocolType::Iterm2, "\u{1b}]1337;File="),
        ] {
            let mut app = sample();
            app.photo = Some(photo_view(protocol));
            app.overlay = Overlay::Photo {
                name: "harbour.jpg".into(),
            };
            let mut terminal = Terminal::new(TestBackend::new(60, 20)).unwrap();
            terminal.draw(|frame| draw(frame, &app)).unwrap();
            let sent: String = terminal
                .backend()
                .buffer()
                .content()
                .iter()
                .map(|cell| cell.symbol())
                .collect();
            assert!(sent.contains(start), "{protocol:?} sent no {start:?}");
        }
    }

    #[test]
    fn key_change_banner_and_reconnecting_status() {
        let mut app = sample();
        app.banner =
            Some("The identity key of GUF8EA6B CHANGED: compare safety numbers again (s)".into());
        app.link = Link::Reconnecting;
        app.busy = 1;
        app.tick = 1;
        check("banner_reconnecting", render(&app, 100, 20));
        app.banner = None;
        app.link = Link::CertificateMismatch;
        check("certificate_mismatch", render(&app, 100, 20));
    }
}
