//! Budget-aware JSON mode: as a `json_object` answer nears its `max_tokens`, the shortest
//! valid way to close it (end the string, fill a value with `0`, close every open object and
//! list) is steered token by token, so the answer is whole JSON instead of a prefix cut by the
//! budget. llguidance's grammar still decides what is allowed; this only picks, among allowed
//! tokens, the one that closes soonest, and only once the budget leaves no other way. An
//! answer closed this way reports `finish_reason: "length"`. The token texts come from the
//! model's tokenizer.json (SentencePiece pieces: `▁` for a space, `<0xNN>` for a byte).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

/// Each token's text, and the single-character tokens the closing sequences use.
#[derive(Debug)]
pub struct Vocabulary {
    texts: Vec<String>,
    single: HashMap<char, u32>,
}

impl Vocabulary {
    /// From a tokenizer.json's `model.vocab` (piece → id); `None` if it has none.
    pub fn from_tokenizer_json(json: &serde_json::Value) -> Option<Self> {
        let vocab = json.get("model")?.get("vocab")?.as_object()?;
        let size = vocab.values().filter_map(|v| v.as_u64()).max()? as usize + 1;
        let mut texts = vec![String::new(); size];
        for (piece, id) in vocab {
            if let Some(id) = id.as_u64() {
                texts[id as usize] = piece_text(piece);
            }
        }
        let mut single = HashMap::new();
        for (id, t) in texts.iter().enumerate() {
            let mut chars = t.chars();
            if let (Some(c), None) = (chars.next(), chars.next()) {
                // A plain piece wins over its byte-fallback twin (lower ids are the bytes).
                single.insert(c, id as u32);
            }
        }
        Some(Self { texts, single })
    }

    fn text(&self, id: u32) -> &str {
        self.texts.get(id as usize).map_or("", String::as_str)
    }
}

/// A piece as text: `▁` is a space, `<0xNN>` an ASCII byte (other bytes carry no JSON syntax).
fn piece_text(piece: &str) -> String {
    if let Some(hex) = piece.strip_prefix("<0x").and_then(|p| p.strip_suffix('>'))
        && let Ok(b) = u8::from_str_radix(hex, 16)
    {
        return if b.is_ascii() {
            (b as char).to_string()
        } else {
            String::new()
        };
    }
    piece.replace('\u{2581}', " ")
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Frame {
    /// In an object: awaiting a key or `}`.
    ObjectStart,
    /// In an object: awaiting a key (after `,`).
    Key,
    /// After a key: awaiting `:`.
    Colon,
    /// After `:`: awaiting the value.
    Value,
    /// After a member: awaiting `,` or `}`.
    ObjectNext,
    /// In a list: awaiting a value or `]`.
    ListStart,
    /// In a list after `,`: awaiting a value.
    ListValue,
    /// After an element: awaiting `,` or `]`.
    ListNext,
}

/// Where a JSON text stands, enough to close it.
#[derive(Debug, Clone, Default)]
struct Scan {
    frames: Vec<Frame>,
    in_string: bool,
    escaped: bool,
    /// A number or literal being written, and its text so far.
    scalar: String,
    started: bool,
}

impl Scan {
    fn after_value(&mut self) {
        if let Some(top) = self.frames.last_mut() {
            *top = match *top {
                Frame::Colon
                | Frame::Value
                | Frame::ObjectStart
                | Frame::Key
                | Frame::ObjectNext => Frame::ObjectNext,
                _ => Frame::ListNext,
            };
        }
    }

    /// A number or literal being written ends: it was its frame's value.
    fn end_scalar(&mut self) {
        if !self.scalar.is_empty() {
            self.scalar.clear();
            self.after_value();
        }
    }

    fn push(&mut self, c: char) {
        if self.in_string {
            match (self.escaped, c) {
                (true, _) => self.escaped = false,
                (false, '\\') => self.escaped = true,
                (false, '"') => {
                    self.in_string = false;
                    match self.frames.last_mut() {
                        Some(f @ (Frame::ObjectStart | Frame::Key)) => *f = Frame::Colon,
                        _ => self.after_value(),
                    }
                }
                _ => {}
            }
            return;
        }
        if !matches!(c, '0'..='9' | '.' | 'e' | 'E' | '+' | '-' | 'a'..='z') {
            self.end_scalar();
        }
        match c {
            // A container is its parent's value: the parent waits for `,` or its close next.
            '{' => {
                self.started = true;
                self.after_value();
                self.frames.push(Frame::ObjectStart);
            }
            '[' => {
                self.after_value();
                self.frames.push(Frame::ListStart);
            }
            '}' | ']' => {
                self.frames.pop();
            }
            '"' => self.in_string = true,
            ':' => {
                if let Some(f) = self.frames.last_mut() {
                    *f = Frame::Value;
                }
            }
            ',' => {
                if let Some(f) = self.frames.last_mut() {
                    *f = if *f == Frame::ObjectNext {
                        Frame::Key
                    } else {
                        Frame::ListValue
                    };
                }
            }
            c if c.is_whitespace() => {}
            c => self.scalar.push(c),
        }
    }

    /// The shortest text that closes the JSON from here: the open scalar completed, then
    /// for each state the one character that moves toward the end, fed back through `push`
    /// so the state follows as it would for the model's own text.
    fn closing(&self) -> String {
        let mut scan = self.clone();
        let mut out = String::new();
        let mut write = |scan: &mut Scan, c: char| {
            scan.push(c);
            out.push(c);
        };
        if !self.scalar.is_empty() {
            complete_scalar(&self.scalar)
                .chars()
                .for_each(|c| write(&mut scan, c));
        }
        loop {
            let c = if scan.in_string {
                '"'
            } else {
                scan.end_scalar();
                match scan.frames.last() {
                    None => break,
                    Some(Frame::ObjectStart | Frame::ObjectNext) => '}',
                    Some(Frame::Key) => '"',
                    Some(Frame::Colon) => ':',
                    Some(Frame::Value | Frame::ListValue) => '0',
                    Some(Frame::ListStart | Frame::ListNext) => ']',
                }
            };
            write(&mut scan, c);
        }
        out
    }
}

/// What a partly written number or literal still needs.
fn complete_scalar(s: &str) -> String {
    for word in ["true", "false", "null"] {
        if let Some(rest) = word.strip_prefix(s) {
            return rest.to_owned();
        }
    }
    if s.ends_with(['.', 'e', 'E', '+', '-']) {
        "0".into()
    } else {
        String::new()
    }
}

/// One request's closer.
#[derive(Debug)]
pub struct Closer {
    vocab: Arc<Vocabulary>,
    prompt_len: usize,
    max_tokens: usize,
    /// Set once the closer has steered: the answer ends for want of budget.
    pub forced: Arc<AtomicBool>,
}

impl Closer {
    pub fn new(vocab: Arc<Vocabulary>, prompt_len: usize, max_tokens: usize) -> Self {
        Self {
            vocab,
            prompt_len,
            max_tokens,
            forced: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Steers toward the closing text when the tokens left only just fit it (one more is
    /// kept for the end-of-sequence token).
    pub fn apply(&self, logits: &mut [f32], context: &[u32]) {
        let written = context.len().saturating_sub(self.prompt_len);
        let left = self.max_tokens.saturating_sub(written);
        // Cheap test first: nothing to do while the budget is far from spent.
        if left > 64 {
            return;
        }
        let mut scan = Scan::default();
        for &id in &context[self.prompt_len.min(context.len())..] {
            for c in self.vocab.text(id).chars() {
                scan.push(c);
            }
        }
        if !scan.started {
            return;
        }
        let closing = scan.closing();
        let needed = closing.chars().count();
        if needed == 0 || needed + 1 < left {
            return;
        }
        let Some(next) = closing
            .chars()
            .next()
            .and_then(|c| self.vocab.single.get(&c))
        else {
            return;
        };
        let i = *next as usize;
        if i < logits.len() {
            logits[i] = logits_max(logits) + 100.0;
            self.forced.store(true, Relaxed);
        }
    }
}

fn logits_max(l: &[f32]) -> f32 {
    l.iter()
        .copied()
        .filter(|x| x.is_finite())
        .fold(f32::NEG_INFINITY, f32::max)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn closing(text: &str) -> String {
        let mut s = Scan::default();
        text.chars().for_each(|c| s.push(c));
        s.closing()
    }

    #[test]
    fn the_shortest_valid_closing_from_every_state() {
        for (prefix, close) in [
            ("{", "}"),
            ("{\"ab", "\":0}"),
            ("{\"a\"", ":0}"),
            ("{\"a\":", "0}"),
            ("{\"a\":\"x", "\"}"),
            ("{\"a\":\"x\\\"", "\"}"),
            ("{\"a\":1", "}"),
            ("{\"a\":1.", "0}"),
            ("{\"a\":tr", "ue}"),
            ("{\"a\":[", "]}"),
            ("{\"a\":[1,", "0]}"),
            ("{\"a\":{\"b\":[{", "}]}}"),
            ("{\"a\":1,", "\"\":0}"),
            ("{\"a\":[\"x\",{\"y\":null", "}]}"),
            // A trailing backslash escapes the first quote; a second one ends the string.
            ("{\"a\":\"x\\", "\"\"}"),
        ] {
            let out = closing(prefix);
            assert_eq!(out, close, "after {prefix}");
            let whole = format!("{prefix}{out}");
            assert!(
                serde_json::from_str::<serde_json::Value>(&whole).is_ok(),
                "{whole}"
            );
        }
    }

    #[test]
    fn pieces_read_as_text() {
        assert_eq!(piece_text("\u{2581}hello"), " hello");
        assert_eq!(piece_text("<0x22>"), "\"");
        assert_eq!(piece_text("<0xE2>"), "");
    }
}
