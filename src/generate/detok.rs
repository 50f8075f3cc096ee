//! Incremental detokenization, shared by every engine so the same tokens always become
//! the same text.

/// Turns a growing list of generated tokens into text deltas, releasing only whole
/// characters: a token that ends inside a multi-byte character waits for the next one.
#[derive(Debug, Default)]
pub struct Detokenizer {
    prefix: usize,
    read: usize,
}

impl Detokenizer {
    /// New text since the last call, if the tokens so far end on a character boundary.
    pub fn push(&mut self, decode: impl Fn(&[u32]) -> String, tokens: &[u32]) -> Option<String> {
        let before = decode(&tokens[self.prefix..self.read]);
        let now = decode(&tokens[self.prefix..]);
        if now.len() > before.len() && !now.ends_with('\u{FFFD}') && now.is_char_boundary(before.len()) {
            let delta = now[before.len()..].to_string();
            self.prefix = self.read;
            self.read = tokens.len();
            Some(delta)
        } else {
            None
        }
    }

    /// Whatever is still held back, at the end of generation (lossy if it never completed).
    pub fn flush(&mut self, decode: impl Fn(&[u32]) -> String, tokens: &[u32]) -> Option<String> {
        let before = decode(&tokens[self.prefix..self.read]);
        let now = decode(&tokens[self.prefix..]);
        self.prefix = tokens.len();
        self.read = tokens.len();
        (now.len() > before.len() && now.is_char_boundary(before.len())).then(|| now[before.len()..].to_string())
    }
}
