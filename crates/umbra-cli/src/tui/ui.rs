//! Drawing the app: one function per screen and overlay, from [`App`] only.

use ratatui::Frame;
use ratatui::layout::{Alignment, Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Clear, List, ListItem, ListState, Paragraph, Wrap};
use umbra_client::{ConversationKind, DeliveryState, Direction};

use super::app::{App, Focus, Link, NARROW, Overlay, Screen, TIMERS};

const SPINNER: [&str; 4] = ["|", "/", "-", "\\"];

/// Every key, for the help overlay.
pub const KEYS: &[(&str, &str)] = &[
    ("Up/Down, j/k", "move between conversations"),
    ("Enter, Tab, Right", "open the conversation, write"),
    ("Enter (writing)", "send"),
    ("Up/Down, PgUp/PgDn (writing)", "scroll the conversation"),
    ("Esc, Tab (writing)", "back to the list"),
    ("r", "contact requests (Enter accepts)"),
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
        Screen::Unlock { input, error } => unlock(frame, input, error.as_deref()),
        Screen::Main => main(frame, app),
    }
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
        lines.push(Line::from(Span::styled(error, Style::default().fg(Color::Red))));
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
            let unread = app.unread(&conversation.id);
            let mut title = App::title(conversation);
            if verified {
                title.push_str(" ✓");
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
    let mut state = ListState::default().with_selected((!app.conversations.is_empty()).then_some(app.selected));
    frame.render_stateful_widget(
        List::new(items)
            .block(Block::default().borders(Borders::ALL).title(title).border_style(border))
            .highlight_style(Style::default().add_modifier(Modifier::REVERSED)),
        area,
        &mut state,
    );
}

fn state_mark(state: DeliveryState) -> &'static str {
    match state {
        DeliveryState::Sending => "…",
        DeliveryState::Sent => "✓",
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
                    Span::styled(format!("{} you: ", clock(message.timestamp)), Style::default().fg(Color::Green)),
                    Span::raw(message.body.clone()),
                    Span::styled(
                        format!(" {}{countdown}", state_mark(message.state)),
                        Style::default().fg(Color::DarkGray),
                    ),
                ]),
                Direction::In => Line::from(vec![
                    Span::styled(
                        format!("{} {}: ", clock(message.timestamp), message.sender),
                        Style::default().fg(Color::Cyan),
                    ),
                    Span::raw(message.body.clone()),
                    Span::styled(countdown, Style::default().fg(Color::DarkGray)),
                ]),
            }
        })
        .collect();
    let block = Block::default().borders(Borders::ALL).title(title);
    let inner_height = messages.height.saturating_sub(2);
    let paragraph = Paragraph::new(lines).wrap(Wrap { trim: false });
    // Keep the newest line at the bottom, then scroll up by `scroll`.
    let total = paragraph.line_count(messages.width.saturating_sub(2)) as u16;
    let offset = total.saturating_sub(inner_height).saturating_sub(app.scroll);
    frame.render_widget(paragraph.block(block).scroll((offset, 0)), messages);
    let border = if app.focus == Focus::Compose {
        Style::default().fg(Color::Cyan)
    } else {
        Style::default()
    };
    frame.render_widget(
        Paragraph::new(format!("> {}", app.compose)).block(
            Block::default()
                .borders(Borders::ALL)
                .border_style(border)
                .title(" Enter to send · Esc back · ? help "),
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
    };
    let spinner = if app.busy > 0 {
        format!(" {}", SPINNER[(app.tick % 4) as usize])
    } else {
        String::new()
    };
    let mut text = format!(" {} · {link}{spinner}", app.account);
    if let Some(status) = &app.status {
        text.push_str(&format!(" · {status}"));
    }
    let style = match app.link {
        Link::CertificateMismatch => Style::default().fg(Color::White).bg(Color::Red),
        _ => Style::default().fg(Color::Black).bg(Color::Gray),
    };
    frame.render_widget(Paragraph::new(text).style(style), area);
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
        Paragraph::new(lines)
            .wrap(Wrap { trim: false })
            .block(Block::default().borders(Borders::ALL).title(format!(" {title} "))),
        area,
    );
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
                        let line = format!("{} {}", if n == *selected { ">" } else { " " }, contact.account);
                        Line::from(line)
                    })
                    .collect()
            };
            lines.push(Line::from(""));
            lines.push(Line::from("Enter accepts · Esc closes"));
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
                Line::from(format!("{} Name:    {name}", if *on_members { " " } else { ">" })),
                Line::from(format!("{} Members: {members}", if *on_members { ">" } else { " " })),
                Line::from(""),
                Line::from("Members are account IDs, comma-separated"),
                Line::from("Tab switches field · Enter creates · Esc cancels"),
            ],
            56,
        ),
        Overlay::Members { input } => {
            let mut lines: Vec<Line<'_>> = app
                .current()
                .map(|c| c.members.iter().map(|m| Line::from(format!("  {m}"))).collect())
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
                    Line::from(format!("{} {label}", if n == *selected { ">" } else { " " }))
                })
                .collect();
            lines.push(Line::from(""));
            lines.push(Line::from("Enter sets it for everyone · Esc"));
            dialog(frame, "messages disappear after", lines, 40);
        }
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
