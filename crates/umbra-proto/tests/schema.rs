//! `proto/umbra.proto` is the schema an independent client is written from;
//! `src/wire.rs` is what the server and the Umbra client actually encode.
//! This test reads both as text and fails, with a list of every difference,
//! when they disagree on a message, an enum, a field (name, type, tag,
//! `repeated` / `optional`, oneof membership) or an enum value (name,
//! number). A tag the .proto reserves must not be used by wire.rs.
//!
//! Names are compared the way prost derives Rust names from a .proto: field
//! names as they are, oneof members `upload_key_packages` ↔ variant
//! `UploadKeyPackages`, enum values `STALE_EPOCH` ↔ variant `StaleEpoch`
//! (a value's `ENUM_NAME_` prefix, as in `ERROR_CODE_UNSPECIFIED`, is
//! dropped first).
//!
//! Both parsers are deliberately small: they handle the subset of protobuf
//! and of prost-derive Rust that these two files use, and panic on anything
//! they do not understand (nested messages, maps, services) rather than skip
//! it. wire.rs is also checked to have had every `#[prost(...)]` attribute
//! and every prost derive consumed, so a change of style there cannot make
//! the comparison silently partial.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

const PROTO: &str = include_str!("../proto/umbra.proto");
const WIRE: &str = include_str!("../src/wire.rs");

const SCALARS: &[&str] = &[
    "double", "float", "int32", "int64", "uint32", "uint64", "sint32", "sint64", "fixed32",
    "fixed64", "sfixed32", "sfixed64", "bool", "string", "bytes",
];

// ---------------------------------------------------------------------------
// The common model.

#[derive(Debug, Clone, PartialEq, Eq)]
struct Field {
    /// "", "repeated" or "optional".
    label: &'static str,
    /// A scalar keyword, or the (unqualified) name of a message or enum.
    ty: String,
    tag: u32,
    /// The oneof this field belongs to, if any.
    oneof: Option<String>,
}

impl Field {
    fn render(&self, name: &str) -> String {
        let label = if self.label.is_empty() {
            String::new()
        } else {
            format!("{} ", self.label)
        };
        let oneof = match &self.oneof {
            Some(o) => format!(" (in oneof {o})"),
            None => String::new(),
        };
        format!("`{label}{} {name} = {};`{oneof}", self.ty, self.tag)
    }
}

#[derive(Debug, Default)]
struct Message {
    /// Keyed by proto field name.
    fields: BTreeMap<String, Field>,
    reserved: BTreeSet<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Value {
    /// The name as written in its own file (proto SCREAMING_CASE, or the
    /// Rust variant).
    written: String,
    number: i64,
}

#[derive(Debug, Default)]
struct Schema {
    messages: BTreeMap<String, Message>,
    /// Enum name -> (Rust variant name -> value).
    enums: BTreeMap<String, BTreeMap<String, Value>>,
    /// Problems found within one file (duplicate tags and the like).
    problems: Vec<String>,
}

/// A singular message field always has presence: `optional` on it changes
/// nothing on the wire, and prost-build writes `#[prost(message, optional)]`
/// for a plain `Msg field = N;`. Both are compared as plain.
fn normalize(schema: &mut Schema) {
    let messages: BTreeSet<String> = schema.messages.keys().cloned().collect();
    for msg in schema.messages.values_mut() {
        for f in msg.fields.values_mut() {
            if f.label == "optional" && messages.contains(&f.ty) {
                f.label = "";
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Tokens, shared by both parsers.

#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    Ident(String),
    Num(String),
    Str(String),
    Punct(char),
}

#[derive(Debug, Clone)]
struct Token {
    tok: Tok,
    line: usize,
}

fn tokenize(src: &str) -> Vec<Token> {
    let chars: Vec<char> = src.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    let mut line = 1;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if c == '\n' {
            line += 1;
            i += 1;
        } else if c.is_whitespace() {
            i += 1;
        } else if c == '/' && next == Some('/') {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            i += 2;
            while i < chars.len() && !(chars[i] == '*' && chars.get(i + 1) == Some(&'/')) {
                if chars[i] == '\n' {
                    line += 1;
                }
                i += 1;
            }
            i += 2;
        } else if c == '"' {
            let start_line = line;
            let mut s = String::new();
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                if chars[i] == '\\' {
                    i += 1;
                }
                if let Some(&ch) = chars.get(i) {
                    if ch == '\n' {
                        line += 1;
                    }
                    s.push(ch);
                }
                i += 1;
            }
            i += 1;
            out.push(Token {
                tok: Tok::Str(s),
                line: start_line,
            });
        } else if c.is_ascii_digit() {
            let mut s = String::new();
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
                s.push(chars[i]);
                i += 1;
            }
            out.push(Token {
                tok: Tok::Num(s),
                line,
            });
        } else if c.is_alphabetic() || c == '_' {
            // A Rust raw identifier `r#name` is the identifier `name`.
            if c == 'r'
                && next == Some('#')
                && chars
                    .get(i + 2)
                    .is_some_and(|c| c.is_alphabetic() || *c == '_')
            {
                i += 2;
            }
            let mut s = String::new();
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                s.push(chars[i]);
                i += 1;
            }
            out.push(Token {
                tok: Tok::Ident(s),
                line,
            });
        } else {
            out.push(Token {
                tok: Tok::Punct(c),
                line,
            });
            i += 1;
        }
    }
    out
}

struct Cursor<'a> {
    file: &'static str,
    toks: &'a [Token],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn new(file: &'static str, toks: &'a [Token]) -> Self {
        Self { file, toks, pos: 0 }
    }

    fn peek(&self) -> Option<&'a Tok> {
        self.toks.get(self.pos).map(|t| &t.tok)
    }

    fn peek_at(&self, n: usize) -> Option<&'a Tok> {
        self.toks.get(self.pos + n).map(|t| &t.tok)
    }

    fn line(&self) -> usize {
        self.toks
            .get(self.pos)
            .or_else(|| self.toks.last())
            .map_or(0, |t| t.line)
    }

    fn fail(&self, what: &str) -> ! {
        panic!(
            "{}:{}: schema test parser: {what} (found {:?})",
            self.file,
            self.line(),
            self.peek()
        )
    }

    fn next(&mut self) -> &'a Tok {
        let Some(t) = self.toks.get(self.pos) else {
            self.fail("unexpected end of file")
        };
        self.pos += 1;
        &t.tok
    }

    fn is_punct(&self, c: char) -> bool {
        self.peek() == Some(&Tok::Punct(c))
    }

    fn is_ident(&self, s: &str) -> bool {
        matches!(self.peek(), Some(Tok::Ident(i)) if i == s)
    }

    fn eat_punct(&mut self, c: char) -> bool {
        let yes = self.is_punct(c);
        if yes {
            self.pos += 1;
        }
        yes
    }

    fn eat_ident(&mut self, s: &str) -> bool {
        let yes = self.is_ident(s);
        if yes {
            self.pos += 1;
        }
        yes
    }

    fn punct(&mut self, c: char) {
        if !self.eat_punct(c) {
            self.fail(&format!("expected `{c}`"))
        }
    }

    fn ident(&mut self) -> String {
        match self.peek() {
            Some(Tok::Ident(s)) => {
                self.pos += 1;
                s.clone()
            }
            _ => self.fail("expected an identifier"),
        }
    }

    fn number(&mut self) -> i64 {
        let negative = self.eat_punct('-');
        let n = match self.peek() {
            Some(Tok::Num(s)) => {
                let n = if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
                    i64::from_str_radix(hex, 16).ok()
                } else {
                    s.parse().ok()
                };
                n.unwrap_or_else(|| self.fail("bad number"))
            }
            _ => self.fail("expected a number"),
        };
        self.pos += 1;
        if negative { -n } else { n }
    }

    fn tag(&mut self) -> u32 {
        let n = self.number();
        u32::try_from(n).unwrap_or_else(|_| self.fail("tag out of range"))
    }

    /// Tokens up to the matching close of the bracket just consumed.
    fn until_close(&mut self, open: char, close: char) -> Vec<Tok> {
        let mut depth = 1usize;
        let mut out = Vec::new();
        loop {
            let t = self.next();
            if *t == Tok::Punct(open) {
                depth += 1;
            } else if *t == Tok::Punct(close) {
                depth -= 1;
                if depth == 0 {
                    return out;
                }
            }
            out.push(t.clone());
        }
    }

    /// Skips one item: up to a `;` or past a balanced `{ ... }`.
    fn skip_item(&mut self) {
        loop {
            match self.next() {
                Tok::Punct(';') => return,
                Tok::Punct('{') => {
                    self.until_close('{', '}');
                    return;
                }
                _ => {}
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Names.

/// Words of an identifier, split at `_` and at lower-to-upper case changes.
fn words(name: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut prev_lower = false;
    for c in name.chars() {
        if c == '_' {
            if !cur.is_empty() {
                out.push(std::mem::take(&mut cur));
            }
            prev_lower = false;
            continue;
        }
        if c.is_uppercase() && prev_lower && !cur.is_empty() {
            out.push(std::mem::take(&mut cur));
        }
        prev_lower = c.is_lowercase() || c.is_ascii_digit();
        cur.push(c);
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

fn upper_camel(name: &str) -> String {
    words(name)
        .iter()
        .map(|w| {
            let lower = w.to_lowercase();
            let mut cs = lower.chars();
            match cs.next() {
                Some(f) => f.to_uppercase().chain(cs).collect::<String>(),
                None => String::new(),
            }
        })
        .collect()
}

fn snake(name: &str) -> String {
    words(name)
        .iter()
        .map(|w| w.to_lowercase())
        .collect::<Vec<_>>()
        .join("_")
}

fn screaming(name: &str) -> String {
    snake(name).to_uppercase()
}

/// The Rust variant prost makes of proto enum value `value` in `enum_name`.
fn variant_of_proto_value(enum_name: &str, value: &str) -> String {
    let prefix = format!("{}_", screaming(enum_name));
    let stripped = match value.strip_prefix(&prefix) {
        Some(rest) if rest.starts_with(|c: char| c.is_alphabetic()) => rest,
        _ => value,
    };
    upper_camel(stripped)
}

// ---------------------------------------------------------------------------
// The .proto.

fn parse_proto(src: &str) -> Schema {
    let toks = tokenize(src);
    let mut c = Cursor::new("proto/umbra.proto", &toks);
    let mut schema = Schema::default();
    while c.peek().is_some() {
        if c.eat_punct(';') {
            continue;
        }
        let kw = c.ident();
        match kw.as_str() {
            "syntax" | "package" | "option" | "import" | "edition" => c.skip_item(),
            "message" => proto_message(&mut c, &mut schema),
            "enum" => proto_enum(&mut c, &mut schema),
            other => c.fail(&format!("unsupported top-level `{other}`")),
        }
    }
    normalize(&mut schema);
    schema
}

fn proto_type(c: &mut Cursor<'_>) -> String {
    c.eat_punct('.');
    let mut name = c.ident();
    while c.eat_punct('.') {
        name = c.ident();
    }
    name
}

fn proto_field(
    c: &mut Cursor<'_>,
    msg: &str,
    oneof: Option<&str>,
    fields: &mut Vec<(String, Field)>,
) {
    let label = if c.eat_ident("repeated") {
        "repeated"
    } else if c.eat_ident("optional") {
        "optional"
    } else if c.is_ident("required") {
        c.fail("`required` is not proto3")
    } else {
        ""
    };
    if c.is_ident("map") && c.peek_at(1) == Some(&Tok::Punct('<')) {
        c.fail(&format!(
            "map fields (in {msg}) are not supported by this test"
        ));
    }
    let ty = proto_type(c);
    let name = c.ident();
    c.punct('=');
    let tag = c.tag();
    if c.eat_punct('[') {
        c.until_close('[', ']');
    }
    c.punct(';');
    fields.push((
        name,
        Field {
            label,
            ty,
            tag,
            oneof: oneof.map(str::to_owned),
        },
    ));
}

fn proto_reserved(c: &mut Cursor<'_>, numbers: &mut BTreeSet<u32>) {
    loop {
        match c.peek() {
            Some(Tok::Str(_)) => {
                c.next();
            }
            _ => {
                let from = c.tag();
                if c.eat_ident("to") {
                    if c.is_ident("max") {
                        c.fail("`reserved N to max` is not supported by this test");
                    }
                    let to = c.tag();
                    numbers.extend(from..=to);
                } else {
                    numbers.insert(from);
                }
            }
        }
        if c.eat_punct(';') {
            return;
        }
        c.punct(',');
    }
}

fn proto_message(c: &mut Cursor<'_>, schema: &mut Schema) {
    let name = c.ident();
    c.punct('{');
    let mut fields: Vec<(String, Field)> = Vec::new();
    let mut reserved = BTreeSet::new();
    loop {
        if c.eat_punct('}') {
            break;
        }
        if c.eat_punct(';') {
            continue;
        }
        if c.eat_ident("reserved") {
            proto_reserved(c, &mut reserved);
        } else if c.eat_ident("option") {
            c.skip_item();
        } else if c.eat_ident("oneof") {
            let oneof = c.ident();
            c.punct('{');
            loop {
                if c.eat_punct('}') {
                    break;
                }
                if c.eat_punct(';') {
                    continue;
                }
                if c.eat_ident("option") {
                    c.skip_item();
                    continue;
                }
                proto_field(c, &name, Some(&oneof), &mut fields);
            }
        } else if c.is_ident("message") || c.is_ident("enum") {
            // A nested message or enum would be `name::Inner` in prost.
            c.fail(&format!(
                "nested types (in {name}) are not supported by this test"
            ));
        } else if c.is_ident("extensions") || c.is_ident("extend") || c.is_ident("group") {
            c.fail("extensions and groups are not supported by this test");
        } else {
            proto_field(c, &name, None, &mut fields);
        }
    }
    let msg = add_message(schema, "umbra.proto", &name, fields);
    msg.reserved = reserved;
}

fn add_message<'s>(
    schema: &'s mut Schema,
    file: &str,
    name: &str,
    fields: Vec<(String, Field)>,
) -> &'s mut Message {
    if schema.messages.contains_key(name) || schema.enums.contains_key(name) {
        schema
            .problems
            .push(format!("{file}: `{name}` is defined twice"));
    }
    let mut msg = Message::default();
    let mut tags: BTreeMap<u32, String> = BTreeMap::new();
    for (field, f) in fields {
        if f.tag == 0 || f.tag > 536_870_911 || (19_000..=19_999).contains(&f.tag) {
            schema.problems.push(format!(
                "{file}: {name}.{field} has tag {}, not a valid field number",
                f.tag
            ));
        }
        if let Some(other) = tags.insert(f.tag, field.clone()) {
            schema.problems.push(format!(
                "{file}: {name}.{field} and {name}.{other} both have tag {}",
                f.tag
            ));
        }
        if msg.fields.insert(field.clone(), f).is_some() {
            schema
                .problems
                .push(format!("{file}: {name}.{field} is defined twice"));
        }
    }
    schema.messages.insert(name.to_owned(), msg);
    schema.messages.get_mut(name).unwrap()
}

fn proto_enum(c: &mut Cursor<'_>, schema: &mut Schema) {
    let name = c.ident();
    c.punct('{');
    let mut values = Vec::new();
    let mut allow_alias = false;
    loop {
        if c.eat_punct('}') {
            break;
        }
        if c.eat_punct(';') {
            continue;
        }
        if c.eat_ident("option") {
            allow_alias |= c.is_ident("allow_alias");
            c.skip_item();
            continue;
        }
        if c.eat_ident("reserved") {
            proto_reserved(c, &mut BTreeSet::new());
            continue;
        }
        let value = c.ident();
        c.punct('=');
        let number = c.number();
        if c.eat_punct('[') {
            c.until_close('[', ']');
        }
        c.punct(';');
        let variant = variant_of_proto_value(&name, &value);
        values.push((
            variant,
            Value {
                written: value,
                number,
            },
        ));
    }
    if values.first().is_none_or(|(_, v)| v.number != 0) {
        schema.problems.push(format!(
            "umbra.proto: enum {name}: the first value must be 0 in proto3"
        ));
    }
    add_enum(schema, "umbra.proto", &name, values, allow_alias);
}

fn add_enum(
    schema: &mut Schema,
    file: &str,
    name: &str,
    values: Vec<(String, Value)>,
    allow_alias: bool,
) {
    if schema.messages.contains_key(name) || schema.enums.contains_key(name) {
        schema
            .problems
            .push(format!("{file}: `{name}` is defined twice"));
    }
    let mut map = BTreeMap::new();
    let mut numbers: BTreeMap<i64, String> = BTreeMap::new();
    for (variant, v) in values {
        if let Some(other) = numbers.insert(v.number, v.written.clone())
            && !allow_alias
        {
            schema.problems.push(format!(
                "{file}: enum {name}: {} and {other} are both {}",
                v.written, v.number
            ));
        }
        if let Some(old) = map.insert(variant.clone(), v.clone()) {
            schema.problems.push(format!(
                "{file}: enum {name}: {} and {} are the same name once mapped (`{variant}`)",
                old.written, v.written
            ));
        }
    }
    schema.enums.insert(name.to_owned(), map);
}

// ---------------------------------------------------------------------------
// wire.rs.

#[derive(Debug, Default)]
struct Attrs {
    /// Arguments of a `#[prost(...)]` attribute.
    prost: Option<Vec<Tok>>,
    /// The `prost::X` derives.
    derives: Vec<String>,
}

#[derive(Debug)]
struct RustField {
    name: String,
    ty: Vec<Tok>,
    prost: Vec<Tok>,
    line: usize,
}

#[derive(Debug)]
struct RustVariant {
    name: String,
    /// `= N`, for an enumeration.
    discriminant: Option<i64>,
    /// The tuple field's type, for a oneof.
    ty: Vec<Tok>,
    prost: Option<Vec<Tok>>,
}

#[derive(Debug, Default)]
struct RustItems {
    /// Path (`mod::Name`) -> fields, for `prost::Message` structs.
    structs: BTreeMap<String, Vec<RustField>>,
    /// Path -> variants, for `prost::Enumeration` enums.
    enumerations: BTreeMap<String, Vec<RustVariant>>,
    /// Path -> variants, for `prost::Oneof` enums.
    oneofs: BTreeMap<String, Vec<RustVariant>>,
    /// How many `#[prost(...)]` attributes and prost derives were used.
    prost_attrs_used: usize,
    derives_used: usize,
}

fn rust_attrs(c: &mut Cursor<'_>, items: &mut RustItems) -> Attrs {
    let mut attrs = Attrs::default();
    loop {
        if c.is_punct('#') && c.peek_at(1) == Some(&Tok::Punct('!')) {
            c.next();
            c.next();
            c.punct('[');
            c.until_close('[', ']');
            continue;
        }
        if !c.eat_punct('#') {
            return attrs;
        }
        c.punct('[');
        let body = c.until_close('[', ']');
        match body.first() {
            Some(Tok::Ident(p)) if p == "prost" => {
                if body.get(1) != Some(&Tok::Punct('(')) || body.last() != Some(&Tok::Punct(')')) {
                    c.fail("expected #[prost(...)]");
                }
                if attrs.prost.is_some() {
                    c.fail("two #[prost(...)] attributes on one item");
                }
                attrs.prost = Some(body[2..body.len() - 1].to_vec());
                items.prost_attrs_used += 1;
            }
            Some(Tok::Ident(d)) if d == "derive" => {
                for w in body.windows(4) {
                    if let [
                        Tok::Ident(p),
                        Tok::Punct(':'),
                        Tok::Punct(':'),
                        Tok::Ident(t),
                    ] = w
                        && p == "prost"
                    {
                        attrs.derives.push(t.clone());
                    }
                }
            }
            _ => {}
        }
    }
}

/// Type tokens up to a `,` (or the given closer) outside brackets.
fn rust_type(c: &mut Cursor<'_>, closer: char) -> Vec<Tok> {
    let mut depth = 0usize;
    let mut out = Vec::new();
    loop {
        match c.peek() {
            Some(Tok::Punct(p)) if depth == 0 && (*p == ',' || *p == closer) => return out,
            Some(Tok::Punct('<' | '(' | '[')) => depth += 1,
            Some(Tok::Punct('>' | ')' | ']')) => {
                depth = depth
                    .checked_sub(1)
                    .unwrap_or_else(|| c.fail("unbalanced type"));
            }
            None => c.fail("unexpected end of file in a type"),
            _ => {}
        }
        out.push(c.next().clone());
    }
}

fn rust_vis(c: &mut Cursor<'_>) {
    if c.eat_ident("pub") && c.is_punct('(') {
        c.next();
        c.until_close('(', ')');
    }
}

fn rust_items(c: &mut Cursor<'_>, path: &str, items: &mut RustItems) {
    loop {
        if c.peek().is_none() || c.eat_punct('}') {
            return;
        }
        if c.eat_punct(';') {
            continue;
        }
        let attrs = rust_attrs(c, items);
        rust_vis(c);
        let qualify = |name: &str| {
            if path.is_empty() {
                name.to_owned()
            } else {
                format!("{path}::{name}")
            }
        };
        if c.eat_ident("struct") {
            let name = qualify(&c.ident());
            if attrs.prost.is_some() {
                c.fail("#[prost(...)] on a struct");
            }
            let fields = if c.eat_punct('{') {
                rust_fields(c, items)
            } else if c.eat_punct(';') {
                Vec::new()
            } else {
                c.fail("expected a struct with named fields")
            };
            if attrs.derives.iter().any(|d| d == "Message") {
                items.derives_used += 1;
                items.structs.insert(name, fields);
            } else if fields.iter().any(|f| !f.prost.is_empty()) {
                c.fail(&format!(
                    "{name} has #[prost] fields but no prost::Message derive"
                ));
            }
        } else if c.eat_ident("enum") {
            let name = qualify(&c.ident());
            c.punct('{');
            let variants = rust_variants(c, items);
            if attrs.derives.iter().any(|d| d == "Enumeration") {
                items.derives_used += 1;
                items.enumerations.insert(name, variants);
            } else if attrs.derives.iter().any(|d| d == "Oneof") {
                items.derives_used += 1;
                items.oneofs.insert(name, variants);
            } else if variants.iter().any(|v| v.prost.is_some()) {
                c.fail(&format!("{name} has #[prost] variants but no prost derive"));
            }
        } else if c.eat_ident("mod") {
            let name = qualify(&c.ident());
            c.punct('{');
            rust_items(c, &name, items);
        } else {
            if attrs.prost.is_some() {
                c.fail("#[prost(...)] on an item this test does not understand");
            }
            c.skip_item();
        }
    }
}

fn rust_fields(c: &mut Cursor<'_>, items: &mut RustItems) -> Vec<RustField> {
    let mut out = Vec::new();
    loop {
        if c.eat_punct('}') {
            return out;
        }
        let attrs = rust_attrs(c, items);
        if c.eat_punct('}') {
            return out;
        }
        rust_vis(c);
        let line = c.line();
        let name = c.ident();
        c.punct(':');
        let ty = rust_type(c, '}');
        c.eat_punct(',');
        out.push(RustField {
            name,
            ty,
            prost: attrs.prost.unwrap_or_default(),
            line,
        });
    }
}

fn rust_variants(c: &mut Cursor<'_>, items: &mut RustItems) -> Vec<RustVariant> {
    let mut out = Vec::new();
    loop {
        if c.eat_punct('}') {
            return out;
        }
        let attrs = rust_attrs(c, items);
        if c.eat_punct('}') {
            return out;
        }
        let name = c.ident();
        let mut v = RustVariant {
            name,
            discriminant: None,
            ty: Vec::new(),
            prost: attrs.prost,
        };
        if c.eat_punct('=') {
            v.discriminant = Some(c.number());
        } else if c.eat_punct('(') {
            v.ty = rust_type(c, ')');
            c.punct(')');
        } else if c.is_punct('{') {
            c.fail("struct variants are not supported by this test");
        }
        c.eat_punct(',');
        out.push(v);
    }
}

/// `#[prost(...)]` arguments: `key` or `key = "value"`, comma separated.
fn prost_args(toks: &[Tok], at: &str) -> BTreeMap<String, Option<String>> {
    let mut out = BTreeMap::new();
    for part in toks.split(|t| *t == Tok::Punct(',')) {
        match part {
            [] => {}
            [Tok::Ident(k)] => {
                out.insert(k.clone(), None);
            }
            [Tok::Ident(k), Tok::Punct('='), Tok::Str(v)] => {
                out.insert(k.clone(), Some(v.clone()));
            }
            other => panic!("src/wire.rs: {at}: cannot read #[prost] argument {other:?}"),
        }
    }
    out
}

/// The last identifier of a Rust type: `Option<super::Hello>` -> `Hello`.
fn type_name(ty: &[Tok]) -> String {
    ty.iter()
        .rev()
        .find_map(|t| match t {
            Tok::Ident(i) => Some(i.clone()),
            _ => None,
        })
        .unwrap_or_default()
}

fn tag_of(args: &BTreeMap<String, Option<String>>, at: &str) -> u32 {
    let Some(Some(tag)) = args.get("tag") else {
        panic!("src/wire.rs: {at}: #[prost] without tag = \"N\"")
    };
    tag.trim()
        .parse()
        .unwrap_or_else(|_| panic!("src/wire.rs: {at}: bad tag {tag:?}"))
}

/// The proto type and label a `#[prost(...)]` field attribute describes.
fn prost_type(
    args: &BTreeMap<String, Option<String>>,
    rust_ty: &[Tok],
    at: &str,
) -> (&'static str, String) {
    for unsupported in ["map", "hash_map", "btree_map", "group"] {
        if args.contains_key(unsupported) {
            panic!("src/wire.rs: {at}: `{unsupported}` fields are not supported by this test");
        }
    }
    let ty = if let Some(e) = args.get("enumeration") {
        let e = e
            .as_deref()
            .unwrap_or_else(|| panic!("src/wire.rs: {at}: enumeration without a name"));
        e.rsplit("::").next().unwrap_or(e).to_owned()
    } else if args.contains_key("message") {
        type_name(rust_ty)
    } else if let Some(s) = SCALARS.iter().find(|s| args.contains_key(**s)) {
        (*s).to_owned()
    } else {
        panic!("src/wire.rs: {at}: cannot tell the field's type from its #[prost] attribute")
    };
    let label = if args.contains_key("repeated") {
        "repeated"
    } else if args.contains_key("optional") {
        "optional"
    } else {
        ""
    };
    (label, ty)
}

fn parse_wire(src: &str) -> Schema {
    let toks = tokenize(src);
    let mut c = Cursor::new("src/wire.rs", &toks);
    let mut items = RustItems::default();
    rust_items(&mut c, "", &mut items);
    if c.peek().is_some() {
        c.fail("unbalanced `}`");
    }

    // Everything prost sees must have been read.
    let mut attrs_present = 0;
    let mut derives_present = 0;
    for w in toks.windows(4) {
        let w: Vec<&Tok> = w.iter().map(|t| &t.tok).collect();
        if let [
            Tok::Punct('#'),
            Tok::Punct('['),
            Tok::Ident(p),
            Tok::Punct('('),
        ] = w[..]
            && p == "prost"
        {
            attrs_present += 1;
        }
        if let [
            Tok::Ident(p),
            Tok::Punct(':'),
            Tok::Punct(':'),
            Tok::Ident(d),
        ] = w[..]
            && p == "prost"
            && ["Message", "Enumeration", "Oneof"].contains(&d.as_str())
        {
            derives_present += 1;
        }
    }
    assert_eq!(
        (attrs_present, derives_present),
        (items.prost_attrs_used, items.derives_used),
        "src/wire.rs has (#[prost] attributes, prost derives) this test did not read; \
         teach its parser the new form"
    );

    let mut schema = Schema::default();
    for (name, values) in &items.enumerations {
        let values = values
            .iter()
            .map(|v| {
                let number = v
                    .discriminant
                    .unwrap_or_else(|| panic!("src/wire.rs: {name}::{} has no `= N`", v.name));
                (
                    v.name.clone(),
                    Value {
                        written: v.name.clone(),
                        number,
                    },
                )
            })
            .collect();
        add_enum(&mut schema, "wire.rs", name, values, false);
    }
    for (name, rust_fields) in &items.structs {
        let mut fields = Vec::new();
        for f in rust_fields {
            let at = format!("line {}, {name}.{}", f.line, f.name);
            if f.prost.is_empty() {
                panic!("src/wire.rs: {at}: field without #[prost(...)]");
            }
            let args = prost_args(&f.prost, &at);
            let Some(oneof) = args.get("oneof") else {
                let (label, ty) = prost_type(&args, &f.ty, &at);
                let tag = tag_of(&args, &at);
                fields.push((
                    f.name.clone(),
                    Field {
                        label,
                        ty,
                        tag,
                        oneof: None,
                    },
                ));
                continue;
            };
            let path = oneof
                .as_deref()
                .unwrap_or_else(|| panic!("src/wire.rs: {at}: oneof without a path"));
            let expected_path = format!("{}::{}", snake(name), type_name(&f.ty));
            if path != expected_path || !f.ty.contains(&Tok::Ident("Option".into())) {
                schema.problems.push(format!(
                    "wire.rs: {at}: oneof = {path:?} with type {} (prost expects \
                     Option<{expected_path}>)",
                    f.ty.iter()
                        .map(|t| match t {
                            Tok::Ident(s) | Tok::Num(s) | Tok::Str(s) => s.clone(),
                            Tok::Punct(p) => p.to_string(),
                        })
                        .collect::<String>()
                ));
            }
            let variants = items
                .oneofs
                .get(path)
                .unwrap_or_else(|| panic!("src/wire.rs: {at}: no prost::Oneof enum {path}"));
            let declared: BTreeSet<u32> = match args.get("tags") {
                Some(Some(tags)) => tags
                    .split(',')
                    .map(|t| {
                        t.trim()
                            .parse()
                            .unwrap_or_else(|_| panic!("src/wire.rs: {at}: bad tags {tags:?}"))
                    })
                    .collect(),
                _ => panic!("src/wire.rs: {at}: oneof without tags = \"...\""),
            };
            let mut used = BTreeSet::new();
            for v in variants {
                let vat = format!("{path}::{}", v.name);
                let prost = v
                    .prost
                    .as_ref()
                    .unwrap_or_else(|| panic!("src/wire.rs: {vat}: variant without #[prost]"));
                let vargs = prost_args(prost, &vat);
                let (label, ty) = prost_type(&vargs, &v.ty, &vat);
                let tag = tag_of(&vargs, &vat);
                used.insert(tag);
                let field = snake(&v.name);
                if upper_camel(&field) != v.name {
                    schema.problems.push(format!(
                        "wire.rs: {vat}: variant name does not map to a proto field name"
                    ));
                }
                fields.push((
                    field,
                    Field {
                        label,
                        ty,
                        tag,
                        oneof: Some(f.name.clone()),
                    },
                ));
            }
            if declared != used {
                schema.problems.push(format!(
                    "wire.rs: {at}: tags = {declared:?} but the variants of {path} use {used:?}"
                ));
            }
        }
        add_message(&mut schema, "wire.rs", name, fields);
    }
    for (name, tags) in retired_tags(src) {
        match schema.messages.get_mut(&name) {
            Some(msg) => msg.reserved = tags,
            None => schema.problems.push(format!(
                "wire.rs: a comment retires tags {tags:?} of {name}, which is not a message"
            )),
        }
    }
    for path in items.oneofs.keys() {
        let used = items.structs.values().any(|fs| {
            fs.iter()
                .any(|f| prost_args(&f.prost, path).get("oneof") == Some(&Some(path.clone())))
        });
        if !used {
            schema
                .problems
                .push(format!("wire.rs: oneof enum {path} is used by no message"));
        }
    }
    normalize(&mut schema);
    schema
}

/// Retired tags, which prost cannot express: a plain `//` comment inside a
/// top-level struct that starts with `Tag N` or `Tags N and M` and says
/// "retired", as in
///
/// ```text
/// // Tags 5 and 6 (declared `added` and `removed` accounts) are retired:
/// // the server derives membership from the validated commit.
/// ```
///
/// The numbers are read up to the first `(`, `:` or "is/are retired".
fn retired_tags(src: &str) -> BTreeMap<String, BTreeSet<u32>> {
    let mut out: BTreeMap<String, BTreeSet<u32>> = BTreeMap::new();
    let mut current: Option<String> = None;
    let mut block = String::new();
    let mut flush = |current: &Option<String>, block: &mut String| {
        let text = std::mem::take(block);
        let Some(name) = current else { return };
        if !(text.starts_with("Tag ") || text.starts_with("Tags ")) || !text.contains("retired") {
            return;
        }
        let end = ["(", ":", "is retired", "are retired"]
            .iter()
            .filter_map(|m| text.find(m))
            .min()
            .unwrap_or(text.len());
        let tags = text[..end]
            .split(|c: char| !c.is_ascii_digit())
            .filter(|d| !d.is_empty())
            .map(|d| d.parse::<u32>().unwrap());
        out.entry(name.clone()).or_default().extend(tags);
    };
    for line in src.lines() {
        let trimmed = line.trim();
        if let Some(comment) = trimmed.strip_prefix("//")
            && !comment.starts_with('/')
            && !comment.starts_with('!')
        {
            if !block.is_empty() {
                block.push(' ');
            }
            block.push_str(comment.trim());
            continue;
        }
        flush(&current, &mut block);
        if let Some(rest) = trimmed
            .strip_prefix("pub struct ")
            .or_else(|| trimmed.strip_prefix("struct "))
            && !line.starts_with(char::is_whitespace)
        {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            current = Some(name);
        } else if line.starts_with('}') {
            current = None;
        }
    }
    flush(&current, &mut block);
    out
}

// ---------------------------------------------------------------------------
// The comparison.

fn check_types(schema: &Schema, file: &str, problems: &mut Vec<String>) {
    for (name, msg) in &schema.messages {
        for (field, f) in &msg.fields {
            let known = SCALARS.contains(&f.ty.as_str())
                || schema.messages.contains_key(&f.ty)
                || schema.enums.contains_key(&f.ty);
            if !known {
                problems.push(format!("{file}: {name}.{field} has unknown type {}", f.ty));
            }
            if msg.reserved.contains(&f.tag) {
                problems.push(format!(
                    "{file}: {name}.{field} uses tag {}, which is reserved",
                    f.tag
                ));
            }
        }
    }
}

fn compare(proto: &Schema, wire: &Schema) -> Vec<String> {
    let mut out = Vec::new();
    out.extend(proto.problems.iter().cloned());
    out.extend(wire.problems.iter().cloned());
    check_types(proto, "umbra.proto", &mut out);
    check_types(wire, "wire.rs", &mut out);

    let names: BTreeSet<&String> = proto.messages.keys().chain(wire.messages.keys()).collect();
    for name in names {
        let (p, w) = match (proto.messages.get(name), wire.messages.get(name)) {
            (Some(p), Some(w)) => (p, w),
            (Some(_), None) => {
                out.push(format!("message {name}: in umbra.proto, not in wire.rs"));
                continue;
            }
            (None, Some(_)) => {
                out.push(format!("message {name}: in wire.rs, not in umbra.proto"));
                continue;
            }
            (None, None) => continue,
        };
        if p.reserved != w.reserved {
            out.push(format!(
                "message {name}: umbra.proto reserves tags {:?}, wire.rs marks {:?} retired \
                 (a `// Tags N and M ... are retired` comment in the struct)",
                p.reserved, w.reserved
            ));
        }
        let fields: BTreeSet<&String> = p.fields.keys().chain(w.fields.keys()).collect();
        for field in fields {
            match (p.fields.get(field), w.fields.get(field)) {
                (Some(pf), Some(wf)) if pf == wf => {}
                (Some(pf), Some(wf)) => out.push(format!(
                    "message {name}: umbra.proto has {}, wire.rs has {}",
                    pf.render(field),
                    wf.render(field)
                )),
                (Some(pf), None) => out.push(format!(
                    "message {name}: umbra.proto has {}, wire.rs does not",
                    pf.render(field)
                )),
                (None, Some(wf)) => {
                    let reserved = if p.reserved.contains(&wf.tag) {
                        " (umbra.proto reserves that tag)"
                    } else {
                        ""
                    };
                    out.push(format!(
                        "message {name}: wire.rs has {}, umbra.proto does not{reserved}",
                        wf.render(field)
                    ));
                }
                (None, None) => {}
            }
        }
    }

    let names: BTreeSet<&String> = proto.enums.keys().chain(wire.enums.keys()).collect();
    for name in names {
        let (p, w) = match (proto.enums.get(name), wire.enums.get(name)) {
            (Some(p), Some(w)) => (p, w),
            (Some(_), None) => {
                out.push(format!("enum {name}: in umbra.proto, not in wire.rs"));
                continue;
            }
            (None, Some(_)) => {
                out.push(format!("enum {name}: in wire.rs, not in umbra.proto"));
                continue;
            }
            (None, None) => continue,
        };
        let variants: BTreeSet<&String> = p.keys().chain(w.keys()).collect();
        for variant in variants {
            match (p.get(variant), w.get(variant)) {
                (Some(pv), Some(wv)) if pv.number == wv.number => {}
                (Some(pv), Some(wv)) => out.push(format!(
                    "enum {name}: umbra.proto has `{} = {};`, wire.rs has `{} = {}`",
                    pv.written, pv.number, wv.written, wv.number
                )),
                (Some(pv), None) => out.push(format!(
                    "enum {name}: umbra.proto has `{} = {};`, wire.rs has no variant {variant}",
                    pv.written, pv.number
                )),
                (None, Some(wv)) => out.push(format!(
                    "enum {name}: wire.rs has `{} = {}`, umbra.proto has no `{} = {};`",
                    wv.written,
                    wv.number,
                    screaming(variant),
                    wv.number
                )),
                (None, None) => {}
            }
        }
    }
    out
}

fn report(problems: &[String]) -> String {
    let mut s = format!(
        "proto/umbra.proto and src/wire.rs disagree ({} difference(s)); wire.rs is what \
         runs, so bring umbra.proto (and docs/protocol.md) in line with it:\n",
        problems.len()
    );
    for p in problems {
        writeln!(s, "  - {p}").unwrap();
    }
    s
}

#[test]
fn umbra_proto_matches_wire_rs() {
    let proto = parse_proto(PROTO);
    let wire = parse_wire(WIRE);
    // A parser that read nothing would agree with anything.
    assert!(proto.messages.len() >= 40 && proto.enums.len() >= 5);
    assert!(wire.messages.len() >= 40 && wire.enums.len() >= 5);
    let problems = compare(&proto, &wire);
    assert!(problems.is_empty(), "{}", report(&problems));
}

// ---------------------------------------------------------------------------
// The checker itself: it must see a drift, in either file.

const PROTO_SAMPLE: &str = r#"
syntax = "proto3";
package t.v1;
message Outer {
  uint64 id = 1;
  oneof body {
    Inner inner = 2;
    Empty nothing_here = 3;
  }
  reserved 4, 6 to 7;
  repeated bytes blobs = 5;
}
message Inner { optional string name = 1; Kind kind = 2; Empty e = 3; }
message Empty {}
enum Kind {
  KIND_UNSPECIFIED = 0;
  FIRST_ONE = 1;
  SECOND = 2;
}
"#;

const WIRE_SAMPLE: &str = r#"
#[derive(Clone, PartialEq, prost::Message)]
pub struct Outer {
    #[prost(uint64, tag = "1")]
    pub id: u64,
    #[prost(oneof = "outer::Body", tags = "2, 3")]
    pub body: Option<outer::Body>,
    // Tags 4, 6 and 7 are retired.
    #[prost(bytes = "vec", repeated, tag = "5")]
    pub blobs: Vec<Vec<u8>>,
}
pub mod outer {
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Body {
        #[prost(message, tag = "2")]
        Inner(super::Inner),
        #[prost(message, tag = "3")]
        NothingHere(super::Empty),
    }
}
#[derive(Clone, PartialEq, prost::Message)]
pub struct Inner {
    #[prost(string, optional, tag = "1")]
    pub name: Option<String>,
    #[prost(enumeration = "Kind", tag = "2")]
    pub kind: i32,
    #[prost(message, optional, tag = "3")]
    pub e: Option<Empty>,
}
#[derive(Clone, PartialEq, prost::Message)]
pub struct Empty {}
#[derive(Clone, Copy, Debug, PartialEq, Eq, prost::Enumeration)]
#[repr(i32)]
pub enum Kind {
    Unspecified = 0,
    /// A doc comment.
    FirstOne = 1,
    Second = 2,
}
"#;

fn diff(proto: &str, wire: &str) -> Vec<String> {
    compare(&parse_proto(proto), &parse_wire(wire))
}

/// `src` with `from` replaced (exactly once) by `to`.
fn edit(src: &str, from: &str, to: &str) -> String {
    assert_eq!(src.matches(from).count(), 1, "{from:?}");
    src.replacen(from, to, 1)
}

#[test]
fn checker_accepts_matching_samples() {
    assert_eq!(diff(PROTO_SAMPLE, WIRE_SAMPLE), Vec::<String>::new());
    // Spelled differently, the same on the wire.
    let proto = edit(PROTO_SAMPLE, "Empty e = 3", "optional Empty e = 3");
    let proto = edit(&proto, "KIND_UNSPECIFIED", "UNSPECIFIED");
    assert_eq!(diff(&proto, WIRE_SAMPLE), Vec::<String>::new());
}

#[test]
fn checker_sees_each_kind_of_drift() {
    let proto_edits = [
        ("  SECOND = 2;\n", ""),
        ("SECOND = 2", "SECOND = 3"),
        ("FIRST_ONE", "FIRST"),
        ("repeated bytes blobs", "bytes blobs"),
        ("optional string name", "string name"),
        ("uint64 id = 1", "uint32 id = 1"),
        ("uint64 id = 1", "uint64 id = 9"),
        ("Kind kind = 2", "Kind kind_of = 2"),
        ("    Empty nothing_here = 3;\n", ""),
        ("Empty nothing_here = 3", "Empty nothing = 3"),
        ("Inner inner = 2;", "Empty inner = 2;"),
        (
            "  uint64 id = 1;\n  oneof body {",
            "  oneof body {\n  uint64 id = 1;",
        ),
        ("reserved 4, 6 to 7", "reserved 4, 5"),
        ("message Empty {}", "message Empty {}\nmessage Extra {}"),
        ("  KIND_UNSPECIFIED = 0;\n", ""),
        ("Empty e = 3", "repeated Empty e = 3"),
        ("reserved 4, 6 to 7", "reserved 4, 6"),
        ("  reserved 4, 6 to 7;\n", ""),
    ];
    for (from, to) in proto_edits {
        let problems = diff(&edit(PROTO_SAMPLE, from, to), WIRE_SAMPLE);
        assert!(
            !problems.is_empty(),
            "proto edit {from:?} -> {to:?} went unseen"
        );
    }
    let wire_edits = [
        ("    Second = 2,\n", ""),
        ("Second = 2", "Second = 4"),
        (r#"repeated, tag = "5""#, r#"tag = "5""#),
        (r#"tag = "5""#, r#"tag = "6""#),
        (
            r#"#[prost(uint64, tag = "1")]"#,
            r#"#[prost(fixed64, tag = "1")]"#,
        ),
        ("pub kind: i32", "pub kind_of: i32"),
        ("    // Tags 4, 6 and 7 are retired.\n", ""),
        ("Tags 4, 6 and 7", "Tags 4 and 6"),
        (r#"tags = "2, 3""#, r#"tags = "2, 3, 4""#),
        (
            r#"#[prost(message, tag = "3")]"#,
            r#"#[prost(message, tag = "8")]"#,
        ),
        ("NothingHere(super::Empty)", "Nothing(super::Empty)"),
        ("Inner(super::Inner)", "Inner(super::Empty)"),
        (
            "pub struct Empty {}",
            "pub struct Empty {}\n#[derive(prost::Message)]\npub struct Extra {}",
        ),
    ];
    for (from, to) in wire_edits {
        let problems = diff(PROTO_SAMPLE, &edit(WIRE_SAMPLE, from, to));
        assert!(
            !problems.is_empty(),
            "wire.rs edit {from:?} -> {to:?} went unseen"
        );
    }
}

#[test]
#[should_panic(expected = "did not read")]
fn checker_refuses_prost_attributes_it_cannot_place() {
    // A field inside an `impl` block the parser skips: it must not pass
    // unnoticed.
    let wire =
        format!("{WIRE_SAMPLE}\nimpl Empty {{ #[prost(uint32, tag = \"1\")] fn x() {{}} }}\n");
    parse_wire(&wire);
}

#[test]
fn names_map_as_prost_maps_them() {
    assert_eq!(
        variant_of_proto_value("ErrorCode", "ERROR_CODE_UNSPECIFIED"),
        "Unspecified"
    );
    assert_eq!(
        variant_of_proto_value("ErrorCode", "NOT_A_CONTACT"),
        "NotAContact"
    );
    assert_eq!(
        variant_of_proto_value("DeliveryKind", "KEY_PACKAGES_LOW"),
        "KeyPackagesLow"
    );
    assert_eq!(snake("UploadKeyPackages"), "upload_key_packages");
    assert_eq!(upper_camel("upload_key_packages"), "UploadKeyPackages");
    assert_eq!(screaming("TooManyConnections"), "TOO_MANY_CONNECTIONS");
}
