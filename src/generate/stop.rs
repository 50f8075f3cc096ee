//! Stop sequences, matched on the text as it streams.
//!
//! Text that could still turn out to be the start of a stop sequence is held back; once a
//! stop sequence appears, the text before it is released and everything from it on is
//! dropped. So neither a streaming nor a non-streaming answer ever contains the stop
//! sequence, and both contain exactly the same text (OpenAI's way).
//!
//! A `keeping` matcher is text-generation-inference's way: generation stops after the
//! token that completes a stop sequence and that token's text stays in the answer. It holds
//! back and releases whole pieces only, so each released piece is still exactly the text
//! of the tokens behind it (TGI reports every token with its text).

/// Matches stop sequences across streamed pieces.
#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
    /// Keep the stop sequence (and release whole pieces).
    keep: bool,
}

/// What feeding a piece produced.
#[derive(Debug, PartialEq)]
pub struct Released {
    /// Text that can be sent now.
    pub text: String,
    /// A stop sequence was found: generation should end.
    pub stopped: bool,
}

impl StopMatcher {
    /// A matcher for these stop sequences (empty ones are ignored).
    pub fn new(stops: &[String]) -> Self {
        StopMatcher { stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(), pending: String::new(), keep: false }
    }

    /// A matcher that keeps the stop sequence in the text and releases whole pieces.
    pub fn keeping(stops: &[String]) -> Self {
        StopMatcher { keep: true, ..Self::new(stops) }
    }

    /// Feeds the next piece of generated text.
    pub fn push(&mut self, piece: &str) -> Released {
        if self.stops.is_empty() {
            return Released { text: piece.to_string(), stopped: false };
        }
        self.pending.push_str(piece);
        if let Some(at) = self.stops.iter().filter_map(|s| self.pending.find(s.as_str())).min() {
            let text = if self.keep { std::mem::take(&mut self.pending) } else { self.pending[..at].to_string() };
            self.pending.clear();
            return Released { text, stopped: true };
        }
        // Hold back the longest tail that is a prefix of some stop sequence.
        let hold = self
            .stops
            .iter()
            .map(|s| (1..s.len().min(self.pending.len() + 1)).rev().find(|&n| s.is_char_boundary(n) && self.pending.ends_with(&s[..n])).unwrap_or(0))
            .max()
            .unwrap_or(0);
        let cut = if self.keep && hold > 0 { 0 } else { self.pending.len() - hold };
        let text = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        Released { text, stopped: false }
    }

    /// The held-back text, once generation ended without a stop sequence.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut m = StopMatcher::new(&stops);
        let mut out = String::new();
        for p in pieces {
            let r = m.push(p);
            out.push_str(&r.text);
            if r.stopped {
                return (out, true);
            }
        }
        out.push_str(&m.finish());
        (out, false)
    }

    #[test]
    fn stop_split_across_pieces_is_cut() {
        assert_eq!(run(&["\n\n"], &["Paris", ".\n", "\nMore"]), ("Paris.".into(), true));
        assert_eq!(run(&["END"], &["abcE", "N", "Dxyz"]), ("abc".into(), true));
    }

    #[test]
    fn near_miss_is_released() {
        assert_eq!(run(&["END"], &["abcE", "Nx", "yz"]), ("abcENxyz".into(), false));
        assert_eq!(run(&[], &["a", "b"]), ("ab".into(), false));
    }

    /// TGI's way: the stop sequence and the rest of the token that completed it stay, and
    /// held text is released as whole pieces, never split.
    #[test]
    fn a_keeping_matcher_keeps_the_stop_and_whole_pieces() {
        let stops = vec!["END".to_string()];
        let mut m = StopMatcher::keeping(&stops);
        assert_eq!(m.push("abcE"), Released { text: String::new(), stopped: false }, "held whole");
        assert_eq!(m.push("NDx"), Released { text: "abcENDx".into(), stopped: true });
        let mut m = StopMatcher::keeping(&stops);
        assert_eq!(m.push("abE").text, "");
        assert_eq!(m.push("Nz").text, "abENz", "a near miss is released whole");
        assert_eq!(m.push("q").text, "q");
    }

    #[test]
    fn earliest_stop_wins() {
        assert_eq!(run(&["c", "ab"], &["xabc"]), ("x".into(), true));
    }
}
