//! Tokenizing encoder inputs, off the async runtime.
//!
//! Tokenization is CPU work of its own (a long input takes milliseconds), so it runs on a
//! small pool of threads shared by every encoder model, never on the tokio workers that
//! serve HTTP. The tokenizer file's own truncation and padding settings are switched off:
//! the limit is the model's `max_seq_length`, applied here, where an input that is too
//! long either fails with its token count or is cut (keeping the closing special token),
//! exactly as sentence-transformers cuts it.

use std::path::Path;
use std::sync::{mpsc, Arc, Mutex};

use tokenizers::{Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};
use tokio::sync::oneshot;

use crate::error::Error;

/// What to do with an input over the model's token limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Truncation {
    /// Refuse it (422 naming the input and its token count).
    Refuse,
    /// Cut the end (TEI's and sentence-transformers' default).
    Right,
    /// Cut the beginning (TEI's `truncation_direction: "Left"`): the end of a long
    /// document is kept.
    Left,
}

/// One input of an encoder: a text, or a sentence pair (a cross-encoder's query and passage,
/// encoded together as `[CLS] a [SEP] b [SEP]` with segment ids 0 and 1).
#[derive(Debug, Clone, PartialEq)]
pub enum Text {
    One(String),
    Pair(String, String),
}

/// One token of a tokenized text, as TEI's `/tokenize` reports it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SimpleToken {
    pub id: u32,
    /// The text the token covers; a special token's own name.
    pub text: String,
    pub special: bool,
    /// Byte offsets into the input; null for special tokens.
    pub start: Option<usize>,
    pub stop: Option<usize>,
}

/// A tokenized input that fits the model.
#[derive(Debug, Clone)]
pub struct Tokens {
    pub ids: Vec<u32>,
    pub type_ids: Vec<u32>,
    /// Token count before truncation.
    pub untruncated: usize,
}

/// An encoder model's tokenizer with its token limit.
pub struct InputTokenizer {
    tokenizer: Tokenizer,
    /// The same tokenizer cutting sentence pairs to the limit, longest first (as
    /// transformers and sentence-transformers' CrossEncoder do): cutting the end, and the
    /// beginning.
    pairs_right: Tokenizer,
    pairs_left: Tokenizer,
    /// Most tokens per input, special tokens included.
    pub max_tokens: usize,
}

impl InputTokenizer {
    /// Loads `tokenizer.json` with its own truncation and padding disabled.
    pub fn load(path: &Path, max_tokens: usize) -> Result<Self, String> {
        if !path.is_file() {
            return Err(format!("tokenizer file {} is missing", path.display()));
        }
        let mut tokenizer = Tokenizer::from_file(path).map_err(|e| format!("cannot load tokenizer {}: {e}", path.display()))?;
        tokenizer.with_padding(None);
        tokenizer.with_truncation(None).map_err(|e| format!("cannot configure tokenizer {}: {e}", path.display()))?;
        let pairs = |direction| -> Result<Tokenizer, String> {
            let mut t = tokenizer.clone();
            let params = TruncationParams { max_length: max_tokens, strategy: TruncationStrategy::LongestFirst, stride: 0, direction };
            t.with_truncation(Some(params)).map_err(|e| format!("cannot configure tokenizer {}: {e}", path.display()))?;
            Ok(t)
        };
        let (pairs_right, pairs_left) = (pairs(TruncationDirection::Right)?, pairs(TruncationDirection::Left)?);
        Ok(InputTokenizer { tokenizer, pairs_right, pairs_left, max_tokens })
    }

    /// Tokenizes input `index`, a text or a pair.
    pub fn encode_text(&self, index: usize, text: &Text, truncation: Truncation) -> Result<Tokens, Error> {
        match text {
            Text::One(t) => self.encode(index, t, truncation),
            Text::Pair(a, b) => self.encode_pair(index, a, b, truncation),
        }
    }

    /// Tokenizes a sentence pair; over the limit the longer of the two is cut first.
    pub fn encode_pair(&self, index: usize, a: &str, b: &str, truncation: Truncation) -> Result<Tokens, Error> {
        let failed = |e| Error::field(format!("inputs[{index}]"), format!("cannot be tokenized: {e}"));
        let whole = self.tokenizer.encode((a, b), true).map_err(failed)?;
        let untruncated = whole.get_ids().len();
        let enc = match truncation {
            _ if untruncated <= self.max_tokens => whole,
            Truncation::Refuse => return Err(Error::InputTooLong { index, tokens: untruncated, limit: self.max_tokens }),
            Truncation::Right => self.pairs_right.encode((a, b), true).map_err(failed)?,
            Truncation::Left => self.pairs_left.encode((a, b), true).map_err(failed)?,
        };
        Ok(Tokens { ids: enc.get_ids().to_vec(), type_ids: enc.get_type_ids().to_vec(), untruncated })
    }

    /// Tokenizes input `index`; over the limit it is cut or refused as `truncation` says.
    pub fn encode(&self, index: usize, text: &str, truncation: Truncation) -> Result<Tokens, Error> {
        let enc = self.tokenizer.encode(text, true).map_err(|e| Error::field(format!("inputs[{index}]"), format!("cannot be tokenized: {e}")))?;
        let ids = enc.get_ids();
        let type_ids = enc.get_type_ids();
        let untruncated = ids.len();
        if untruncated <= self.max_tokens {
            return Ok(Tokens { ids: ids.to_vec(), type_ids: type_ids.to_vec(), untruncated });
        }
        // The leading and trailing special tokens ([CLS], [SEP]) stay; the content between
        // them is cut at the end (right) or at the beginning (left).
        let special = enc.get_special_tokens_mask();
        let lead = special.iter().take_while(|&&s| s == 1).count().min(self.max_tokens);
        let trail = special.iter().rev().take_while(|&&s| s == 1).count().min(self.max_tokens - lead);
        let room = self.max_tokens - lead - trail;
        let content = lead..untruncated - trail;
        let kept = match truncation {
            Truncation::Refuse => return Err(Error::InputTooLong { index, tokens: untruncated, limit: self.max_tokens }),
            Truncation::Right => content.start..content.start + room,
            Truncation::Left => content.end - room..content.end,
        };
        let pick = |v: &[u32]| -> Vec<u32> { v[..lead].iter().chain(&v[kept.clone()]).chain(&v[untruncated - trail..]).copied().collect() };
        Ok(Tokens { ids: pick(ids), type_ids: pick(type_ids), untruncated })
    }

    /// Every token of `text` with the text it covers (TEI's `/tokenize`). Not truncated.
    pub fn tokens(&self, text: &str, add_special_tokens: bool) -> Result<Vec<SimpleToken>, Error> {
        let enc = self.tokenizer.encode(text, add_special_tokens).map_err(|e| Error::field("inputs", format!("cannot be tokenized: {e}")))?;
        let special = enc.get_special_tokens_mask();
        Ok(enc
            .get_ids()
            .iter()
            .zip(enc.get_offsets())
            .zip(special)
            .map(|((&id, &(start, stop)), &s)| {
                if s == 1 {
                    SimpleToken { id, text: self.tokenizer.id_to_token(id).unwrap_or_default(), special: true, start: None, stop: None }
                } else {
                    let covered = text
                        .get(start..stop)
                        .map(str::to_string)
                        .unwrap_or_else(|| String::from_utf8_lossy(&text.as_bytes()[start.min(stop)..stop.min(text.len())]).into_owned());
                    SimpleToken { id, text: covered, special: false, start: Some(start), stop: Some(stop) }
                }
            })
            .collect())
    }

    /// The text of token ids (TEI's `/decode`).
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, Error> {
        self.tokenizer.decode(ids, skip_special_tokens).map_err(|e| Error::field("ids", format!("cannot be decoded: {e}")))
    }

    /// Tokens in the vocabulary.
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }
}

type Task = Box<dyn FnOnce() + Send>;

/// A fixed pool of threads that tokenize.
pub struct TokenizerPool {
    tasks: mpsc::Sender<Task>,
    threads: usize,
}

impl TokenizerPool {
    /// Starts `threads` tokenizer threads.
    pub fn new(threads: usize) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Task>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            std::thread::Builder::new().name(format!("tokenize-{i}")).spawn(move || loop {
                // Holding the lock only while taking a task; a poisoned lock means another
                // tokenizer thread panicked while taking one, which leaves the queue intact.
                let next = match rx.lock() {
                    Ok(guard) => guard.recv(),
                    Err(poisoned) => poisoned.into_inner().recv(),
                };
                match next {
                    Ok(task) => task(),
                    Err(_) => return,
                }
            })?;
        }
        Ok(TokenizerPool { tasks: tx, threads: threads.max(1) })
    }

    /// Threads in the pool.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Tokenizes `texts` on the pool; the first failing input decides the error.
    pub async fn encode(&self, tokenizer: Arc<InputTokenizer>, texts: Arc<Vec<Text>>, truncate: Truncation) -> Result<Vec<Tokens>, Error> {
        let (tx, rx) = oneshot::channel();
        let task: Task = Box::new(move || {
            let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                texts.iter().enumerate().map(|(i, t)| tokenizer.encode_text(i, t, truncate)).collect::<Result<Vec<_>, _>>()
            }))
            .unwrap_or_else(|_| Err(Error::Internal("the tokenizer panicked on this input".into())));
            let _ = tx.send(out);
        });
        self.tasks.send(task).map_err(|_| Error::Internal("the tokenizer pool has stopped".into()))?;
        rx.await.map_err(|_| Error::Internal("the tokenizer pool dropped the request".into()))?
    }
}
