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

use tokenizers::Tokenizer;
use tokio::sync::oneshot;

use crate::error::Error;

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
        Ok(InputTokenizer { tokenizer, max_tokens })
    }

    /// Tokenizes input `index`: over the limit it is cut when `truncate`, else refused (422).
    pub fn encode(&self, index: usize, text: &str, truncate: bool) -> Result<Tokens, Error> {
        let enc = self.tokenizer.encode(text, true).map_err(|e| Error::field(format!("inputs[{index}]"), format!("cannot be tokenized: {e}")))?;
        let mut ids = enc.get_ids().to_vec();
        let mut type_ids = enc.get_type_ids().to_vec();
        let untruncated = ids.len();
        if untruncated > self.max_tokens {
            if !truncate {
                return Err(Error::InputTooLong { index, tokens: untruncated, limit: self.max_tokens });
            }
            // Keep the trailing special tokens ([SEP]) and cut the content before them.
            let special = enc.get_special_tokens_mask();
            let trailing = special.iter().rev().take_while(|&&s| s == 1).count().min(self.max_tokens);
            let keep = self.max_tokens - trailing;
            let tail_ids: Vec<u32> = ids[untruncated - trailing..].to_vec();
            let tail_types: Vec<u32> = type_ids[untruncated - trailing..].to_vec();
            ids.truncate(keep);
            type_ids.truncate(keep);
            ids.extend(tail_ids);
            type_ids.extend(tail_types);
        }
        Ok(Tokens { ids, type_ids, untruncated })
    }
}

type Task = Box<dyn FnOnce() + Send>;

/// A fixed pool of threads that tokenize.
pub struct TokenizerPool {
    tasks: mpsc::Sender<Task>,
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
        Ok(TokenizerPool { tasks: tx })
    }

    /// Tokenizes `texts` on the pool; the first failing input decides the error.
    pub async fn encode(&self, tokenizer: Arc<InputTokenizer>, texts: Arc<Vec<String>>, truncate: bool) -> Result<Vec<Tokens>, Error> {
        let (tx, rx) = oneshot::channel();
        let task: Task = Box::new(move || {
            let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                texts.iter().enumerate().map(|(i, t)| tokenizer.encode(i, t, truncate)).collect::<Result<Vec<_>, _>>()
            }))
            .unwrap_or_else(|_| Err(Error::Internal("the tokenizer panicked on this input".into())));
            let _ = tx.send(out);
        });
        self.tasks.send(task).map_err(|_| Error::Internal("the tokenizer pool has stopped".into()))?;
        rx.await.map_err(|_| Error::Internal("the tokenizer pool dropped the request".into()))?
    }
}
