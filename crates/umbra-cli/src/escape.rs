//! Text from other people made safe to print on a terminal: control and
//! bidi characters become visible escapes.
//!
//! A message body, a group name or a server's error text is written by
//! someone else. Printed raw, an escape sequence in it can move the cursor,
//! erase or recolour lines (for example the key-change warning), and a
//! newline or carriage return can forge a line that seems to come from
//! someone else. [`printable`] keeps one such text on one line and makes it
//! unable to steer the terminal. JSON output is left exact: serde_json
//! writes every character below U+0020 as `\n`, `\u001b` and the like, so a
//! value stays on one line; DEL, C1 and bidi characters pass through as
//! written, for the program that reads the JSON to handle.

use std::borrow::Cow;
use std::fmt::Write;

/// `text` with every character that could steer a terminal or reorder
/// what it shows replaced by a visible escape (`\n`, `\r`, `\t`, otherwise
/// `\u{1b}` style): C0 controls (ESC among them), DEL, C1 controls
/// (U+0080–U+009F, among them the one-byte CSI U+009B), the Unicode line and
/// paragraph separators, and the bidi embeddings, overrides and isolates
/// (U+202A–U+202E, U+2066–U+2069). Everything else, backslashes included,
/// is kept as is; borrows when nothing needs escaping.
pub fn printable(text: &str) -> Cow<'_, str> {
    let Some(first) = text.find(needs_escape) else {
        return Cow::Borrowed(text);
    };
    let (clean, rest) = text.split_at(first);
    let mut out = String::with_capacity(text.len() + 8);
    out.push_str(clean);
    for c in rest.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if needs_escape(c) => {
                // Writing to a String cannot fail.
                let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

fn needs_escape(c: char) -> bool {
    c.is_control() // C0, DEL and C1
        || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(input: &str, expected: &str) {
        let got = printable(input);
        assert_eq!(got, expected, "printable({input:?})");
        assert_eq!(
            matches!(got, Cow::Borrowed(_)),
            input == expected,
            "borrows exactly when nothing changed: {input:?}"
        );
    }

    #[test]
    fn plain_text_is_borrowed_unchanged() {
        check("", "");
        check("hello alice", "hello alice");
        check(
            "Grüße, 你好, привет, مرحبا ✓ 🙂",
            "Grüße, 你好, привет, مرحبا ✓ 🙂",
        );
        check(r"C:\path\u{1b} stays", r"C:\path\u{1b} stays");
        check(
            "\u{a0}non-breaking\u{a0}space",
            "\u{a0}non-breaking\u{a0}space",
        );
    }

    #[test]
    fn escape_sequences_cannot_steer_the_terminal() {
        // Erase this line, cursor up: would hide the line above.
        check("\x1b[2K\x1b[1A", r"\u{1b}[2K\u{1b}[1A");
        check("\x1b]0;title\x07", r"\u{1b}]0;title\u{7}");
        check("red \x1b[31mtext\x1b[0m", r"red \u{1b}[31mtext\u{1b}[0m");
        check("\0\x08\x7f", r"\u{0}\u{8}\u{7f}");
    }

    #[test]
    fn line_breaks_cannot_forge_lines() {
        check(
            "hi\n[2024-01-01T00:00:00Z] K7QD9XPM: forged",
            r"hi\n[2024-01-01T00:00:00Z] K7QD9XPM: forged",
        );
        check("overwrite\rme", r"overwrite\rme");
        check("\x1b[2K\rforged", r"\u{1b}[2K\rforged");
        check("a\tb", r"a\tb");
        check("a\u{2028}b\u{2029}c", r"a\u{2028}b\u{2029}c");
    }

    #[test]
    fn c1_controls_are_escaped() {
        // U+009B is a one-byte CSI on terminals that honour C1 controls.
        check("\u{9b}2K", r"\u{9b}2K");
        check("next\u{85}line", r"next\u{85}line");
        check("\u{80}\u{9f}", r"\u{80}\u{9f}");
    }

    #[test]
    fn bidi_controls_cannot_reorder_text() {
        check(
            "pay \u{202e}0001\u{202c} now",
            r"pay \u{202e}0001\u{202c} now",
        );
        check(
            "\u{202a}\u{202b}\u{202d}\u{2066}\u{2067}\u{2068}\u{2069}",
            r"\u{202a}\u{202b}\u{202d}\u{2066}\u{2067}\u{2068}\u{2069}",
        );
        // Hebrew and Arabic letters themselves are fine.
        check("שלום", "שלום");
    }

    /// `--json` output needs no help: serde_json escapes every C0 control
    /// (ESC, CR, LF among them), so one JSON value stays on one line.
    #[test]
    fn json_escapes_c0_controls_by_itself() {
        let line = serde_json::json!({ "body": "\x1b[2K\r\nforged\t\0" }).to_string();
        assert_eq!(line, r#"{"body":"\u001b[2K\r\nforged\t\u0000"}"#);
    }
}
