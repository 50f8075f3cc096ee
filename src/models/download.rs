//! One file over HTTP into the store: streamed into `<file>.partial` while hashing, renamed
//! only when its digest matches, resumed with `Range` after a cut, retried with backoff on
//! rate limits and server errors.
//!
//! Redirects are followed here rather than by the HTTP client, because the Hub sends large
//! files to another host (its CDN, or a presigned object-store URL): the token goes to the
//! host it was meant for and never to a host a redirect names.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use reqwest::blocking::{Client, Response};
use reqwest::header::{HeaderMap, AUTHORIZATION, CONTENT_RANGE, LOCATION, RANGE, RETRY_AFTER};
use reqwest::{StatusCode, Url};

use sha2::{Digest as _, Sha256};

use super::verify::{git_blob_oid, sha256_file};

/// How many times one file is tried (a cut connection resumes and counts as a try).
pub const ATTEMPTS: u32 = 6;
/// The first pause between tries; it doubles each time (a `Retry-After` overrides it).
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
/// Most redirects followed for one request.
const MAX_REDIRECTS: usize = 10;

/// What a downloaded file must hash to.
#[derive(Debug, Clone, PartialEq)]
pub enum Expected {
    /// Its sha256 (lowercase hex).
    Sha256(String),
    /// Its git blob id (sha1 over `"blob <len>\0"` and the bytes), as the Hub lists it.
    GitBlob(String),
}

/// Why a download failed. `Status` keeps the server's own error code so a caller that knows
/// the server (the Hub client) can say what it means.
#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    #[error("{url} answered {status}{}", code.as_ref().map(|c| format!(" ({c})")).unwrap_or_default())]
    Status { url: String, status: u16, code: Option<String>, message: Option<String> },
    #[error("{url}: gave up after {tries} tries: {last}")]
    Exhausted { url: String, tries: u32, last: String },
    #[error("{path}: the download has {algorithm} {actual}, expected {expected}; it was discarded")]
    Mismatch { path: String, algorithm: &'static str, expected: String, actual: String },
    #[error("{path}: {message}")]
    Io { path: String, message: String },
}

/// One file to download.
pub struct FileRequest<'a> {
    pub url: Url,
    /// A bearer token, sent to `url`'s own origin only.
    pub token: Option<&'a str>,
    /// Where the verified file ends up (`<dest>.partial` while downloading).
    pub dest: &'a Path,
    pub expected: &'a Expected,
}

/// The `.partial` file beside `dest`.
pub fn partial_path(dest: &Path) -> PathBuf {
    let name = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    dest.with_file_name(format!("{name}.partial"))
}

/// Downloads one file, resuming a `.partial` left by an earlier try, and returns its sha256
/// once it matches `expected`. `progress` is called with the bytes added since its last call
/// (negative after a restart from zero, so a running total stays right).
pub fn download(client: &Client, req: &FileRequest, progress: &mut dyn FnMut(i64)) -> Result<String, DownloadError> {
    let io = |e: std::io::Error, p: &Path| DownloadError::Io { path: p.display().to_string(), message: e.to_string() };
    if let Some(parent) = req.dest.parent() {
        fs::create_dir_all(parent).map_err(|e| io(e, parent))?;
    }
    let partial = partial_path(req.dest);
    let mut backoff = FIRST_BACKOFF;
    let mut last = String::new();
    // Whether bytes left by an earlier run were resumed from: if the whole then fails its
    // digest, they may be the culprit (another version's partial file), so one fresh try.
    let mut resumed_stale = fs::metadata(&partial).is_ok_and(|m| m.len() > 0);
    // The sha256 of the partial file's bytes, kept across tries so a resumed download is
    // hashed as it streams, never read back.
    let mut hashed = Hashed::default();
    for attempt in 1..=ATTEMPTS {
        let have = fs::metadata(&partial).map(|m| m.len()).unwrap_or(0);
        // What this try reported, so a failed try can take it back before the next one
        // reports the partial file's bytes again.
        let mut counted = 0i64;
        let outcome = {
            let mut track = |d: i64| {
                counted += d;
                progress(d);
            };
            track(have as i64);
            fetch_once(client, req, &partial, have, &mut hashed, &mut track)
        };
        match outcome {
            Ok(()) => match finish(req, &partial, hex::encode(hashed.sha256.clone().finalize())) {
                Err(DownloadError::Mismatch { .. }) if resumed_stale => {
                    // `finish` removed the partial file: the next try starts from zero.
                    resumed_stale = false;
                    progress(-counted);
                    tracing::warn!(url = %req.url, "a file resumed from an earlier partial download did not verify; downloading it whole");
                }
                done => return done,
            },
            Err(Try::Fatal(e)) => return Err(e),
            Err(Try::Again { reason, wait }) => {
                last = reason;
                progress(-counted);
                if attempt < ATTEMPTS {
                    let pause = wait.unwrap_or(backoff).min(Duration::from_secs(60));
                    tracing::warn!(url = %req.url, attempt, pause_ms = pause.as_millis() as u64, "download interrupted: {last}; trying again");
                    std::thread::sleep(pause);
                    backoff *= 2;
                }
            }
        }
    }
    Err(DownloadError::Exhausted { url: req.url.to_string(), tries: ATTEMPTS, last })
}

/// How one try ended, when it did not finish the file.
enum Try {
    /// Worth another try: a cut connection (the partial file is kept), 429, 5xx.
    Again { reason: String, wait: Option<Duration> },
    /// Not worth another: 4xx, a file system error.
    Fatal(DownloadError),
}

/// A running sha256 and how many bytes it covers.
#[derive(Default)]
struct Hashed {
    sha256: Sha256,
    len: u64,
}

impl Hashed {
    /// The hash of the first `len` bytes of a file (a partial download left by an earlier run).
    fn of_prefix(path: &Path, len: u64) -> std::io::Result<Hashed> {
        let mut sha256 = Sha256::new();
        std::io::copy(&mut File::open(path)?.take(len), &mut HashWriter(&mut sha256))?;
        Ok(Hashed { sha256, len })
    }
}

/// Feeds what is written into a hasher (for `std::io::copy`).
struct HashWriter<'a>(&'a mut Sha256);

impl Write for HashWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn fetch_once(client: &Client, req: &FileRequest, partial: &Path, have: u64, hashed: &mut Hashed, progress: &mut dyn FnMut(i64)) -> Result<(), Try> {
    let io = |e: std::io::Error| Try::Fatal(DownloadError::Io { path: partial.display().to_string(), message: e.to_string() });
    let mut response = get_following(client, &req.url, req.token, (have > 0).then_some(have))?;
    let mut file = OpenOptions::new().create(true).write(true).truncate(false).open(partial).map_err(io)?;
    match response.status() {
        StatusCode::RANGE_NOT_SATISFIABLE => {
            // What we hold is not a prefix the server recognises: start over.
            file.set_len(0).map_err(io)?;
            *hashed = Hashed::default();
            return Err(Try::Again { reason: "the server could not resume the partial file; starting over".into(), wait: None });
        }
        StatusCode::PARTIAL_CONTENT if have > 0 && range_start(response.headers()) == Some(have) => {
            if hashed.len != have {
                *hashed = Hashed::of_prefix(partial, have).map_err(io)?;
            }
            file.seek(SeekFrom::End(0)).map_err(io)?;
        }
        StatusCode::PARTIAL_CONTENT => {
            // A range we did not ask for: nothing here can be trusted to line up.
            file.set_len(0).map_err(io)?;
            *hashed = Hashed::default();
            return Err(Try::Again { reason: "the server answered another range than asked; starting over".into(), wait: None });
        }
        s if s.is_success() => {
            // The server sent the whole file (it ignored or could not honour the range).
            progress(-(have as i64));
            file.set_len(0).map_err(io)?;
            file.seek(SeekFrom::Start(0)).map_err(io)?;
            *hashed = Hashed::default();
        }
        s => return Err(Try::Again { reason: format!("unexpected status {s}"), wait: None }),
    }
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match response.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                file.write_all(&buf[..n]).map_err(io)?;
                hashed.sha256.update(&buf[..n]);
                hashed.len += n as u64;
                progress(n as i64);
            }
            Err(e) => {
                file.flush().map_err(io)?;
                return Err(Try::Again { reason: format!("the connection broke mid-file ({e})"), wait: None });
            }
        }
    }
    file.sync_all().map_err(io)?;
    if let Some(total) = response.content_length().map(|n| n + if response.status() == StatusCode::PARTIAL_CONTENT { have } else { 0 }) {
        let len = file.metadata().map_err(io)?.len();
        if len < total {
            return Err(Try::Again { reason: format!("the connection closed after {len} of {total} bytes"), wait: None });
        }
    }
    Ok(())
}

/// Checks the finished `.partial` (whose bytes hash to `sha256`, computed as they streamed)
/// against the expected digest and renames it into place.
fn finish(req: &FileRequest, partial: &Path, sha256: String) -> Result<String, DownloadError> {
    let io = |e: std::io::Error| DownloadError::Io { path: partial.display().to_string(), message: e.to_string() };
    let (algorithm, expected, actual) = match req.expected {
        Expected::Sha256(want) => ("sha256", want.clone(), sha256.clone()),
        Expected::GitBlob(want) => ("git object id", want.clone(), git_blob_oid(partial).map_err(io)?),
    };
    if actual != expected {
        // Bytes that hash wrong cannot be trusted to resume from: start over next time.
        let _ = fs::remove_file(partial);
        return Err(DownloadError::Mismatch { path: req.dest.display().to_string(), algorithm, expected, actual });
    }
    fs::rename(partial, req.dest).map_err(io)?;
    Ok(sha256)
}

/// `Content-Range: bytes START-END/TOTAL` → START.
fn range_start(headers: &HeaderMap) -> Option<u64> {
    let v = headers.get(CONTENT_RANGE)?.to_str().ok()?;
    v.strip_prefix("bytes ")?.split('-').next()?.trim().parse().ok()
}

/// The same scheme, host and port: the only place a token may go.
pub fn same_origin(a: &Url, b: &Url) -> bool {
    a.scheme() == b.scheme() && a.host_str() == b.host_str() && a.port_or_known_default() == b.port_or_known_default()
}

/// A GET (or HEAD) that follows redirects itself, sending the token only to `url`'s origin.
/// Statuses worth another try come back as `Try::Again`, other failures as `Try::Fatal`.
fn get_following(client: &Client, url: &Url, token: Option<&str>, from: Option<u64>) -> Result<Response, Try> {
    let mut current = url.clone();
    for _ in 0..=MAX_REDIRECTS {
        let mut request = client.get(current.clone());
        if let (Some(t), true) = (token, same_origin(url, &current)) {
            request = request.header(AUTHORIZATION, format!("Bearer {t}"));
        }
        if let Some(n) = from {
            request = request.header(RANGE, format!("bytes={n}-"));
        }
        let response = request.send().map_err(|e| Try::Again { reason: format!("cannot reach {}: {e}", origin(&current)), wait: None })?;
        let status = response.status();
        if status.is_redirection() {
            let location = response.headers().get(LOCATION).and_then(|l| l.to_str().ok()).and_then(|l| current.join(l).ok());
            match location {
                Some(next) => {
                    current = next;
                    continue;
                }
                None => return Err(Try::Fatal(status_error(&current, response))),
            }
        }
        if status.is_success() || (status == StatusCode::RANGE_NOT_SATISFIABLE && from.is_some()) {
            return Ok(response);
        }
        if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
            let wait = retry_after(response.headers());
            return Err(Try::Again { reason: status_error(&current, response).to_string(), wait });
        }
        return Err(Try::Fatal(status_error(&current, response)));
    }
    Err(Try::Fatal(DownloadError::Status { url: url.to_string(), status: 310, code: Some("TooManyRedirects".into()), message: None }))
}

/// `scheme://host:port` of a URL, for messages (never its query, which may be a presigned secret).
pub fn origin(url: &Url) -> String {
    url.origin().ascii_serialization()
}

/// A non-success answer as an error, with the server's `X-Error-Code` and `X-Error-Message`
/// (the Hub's) when it sent them. The URL loses its query: presigned URLs carry secrets there.
pub fn status_error(url: &Url, response: Response) -> DownloadError {
    let header = |name: &str| response.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
    let code = header("x-error-code");
    let mut message = header("x-error-message");
    let status = response.status().as_u16();
    if message.is_none() {
        message = response.text().ok().and_then(|t| {
            let v: serde_json::Value = serde_json::from_str(&t).ok()?;
            v.get("error").and_then(|e| e.as_str()).map(str::to_string)
        });
    }
    let mut shown = url.clone();
    shown.set_query(None);
    DownloadError::Status { url: shown.to_string(), status, code, message }
}

/// `Retry-After` in seconds.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    headers.get(RETRY_AFTER)?.to_str().ok()?.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// A cached file (the Hugging Face cache, or anything already on disk) copied into the store
/// through `.partial` once it matches: hard-linked when it can be (same file system; the
/// cache never rewrites a blob), else copied.
pub fn adopt(source: &Path, dest: &Path, expected: &Expected) -> Result<Option<String>, DownloadError> {
    let io = |e: std::io::Error, p: &Path| DownloadError::Io { path: p.display().to_string(), message: e.to_string() };
    let source = source.canonicalize().map_err(|e| io(e, source))?;
    let sha256 = sha256_file(&source).map_err(|e| io(e, &source))?;
    let matches = match expected {
        Expected::Sha256(want) => &sha256 == want,
        Expected::GitBlob(want) => &git_blob_oid(&source).map_err(|e| io(e, &source))? == want,
    };
    if !matches {
        return Ok(None);
    }
    if let Some(parent) = dest.parent() {
        fs::create_dir_all(parent).map_err(|e| io(e, parent))?;
    }
    let partial = partial_path(dest);
    let _ = fs::remove_file(&partial);
    if fs::hard_link(&source, &partial).is_err() {
        let mut from = File::open(&source).map_err(|e| io(e, &source))?;
        let mut to = File::create(&partial).map_err(|e| io(e, &partial))?;
        std::io::copy(&mut from, &mut to).map_err(|e| io(e, &partial))?;
        to.sync_all().map_err(|e| io(e, &partial))?;
    }
    fs::rename(&partial, dest).map_err(|e| io(e, dest))?;
    Ok(Some(sha256))
}

/// Counts bytes across the files of one model and says so every few seconds: the caller's
/// sink (the model's `/readyz` and `/info` facts, or a terminal progress bar) on every
/// change, and a log line at most every `LOG_EVERY`.
pub struct Meter<'a> {
    pub model: &'a str,
    pub done: u64,
    pub total: u64,
    pub file: String,
    sink: &'a dyn Fn(&Progress),
    last_log: Instant,
}

/// Where a model's fetch stands.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Progress {
    /// The file being fetched now.
    pub file: String,
    pub bytes_done: u64,
    pub bytes_total: u64,
}

const LOG_EVERY: Duration = Duration::from_secs(5);

impl<'a> Meter<'a> {
    pub fn new(model: &'a str, total: u64, sink: &'a dyn Fn(&Progress)) -> Self {
        Meter { model, done: 0, total, file: String::new(), sink, last_log: Instant::now() }
    }

    /// Bytes added (or, negative, taken back after a restart) to the current file.
    pub fn add(&mut self, delta: i64) {
        self.done = self.done.saturating_add_signed(delta);
        let p = Progress { file: self.file.clone(), bytes_done: self.done, bytes_total: self.total.max(self.done) };
        (self.sink)(&p);
        if self.last_log.elapsed() >= LOG_EVERY {
            self.last_log = Instant::now();
            let pct = if p.bytes_total > 0 { 100.0 * p.bytes_done as f64 / p.bytes_total as f64 } else { 0.0 };
            tracing::info!(model = %self.model, file = %p.file, bytes_done = p.bytes_done, bytes_total = p.bytes_total, "fetching: {pct:.0}%");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_stay_with_their_origin() {
        let hub = Url::parse("https://huggingface.co/a/b/resolve/x/f").unwrap();
        assert!(same_origin(&hub, &Url::parse("https://huggingface.co/other").unwrap()));
        assert!(same_origin(&hub, &Url::parse("https://huggingface.co:443/other").unwrap()));
        assert!(!same_origin(&hub, &Url::parse("https://cdn-lfs.huggingface.co/x").unwrap()));
        assert!(!same_origin(&hub, &Url::parse("http://huggingface.co/x").unwrap()));
        assert!(!same_origin(&hub, &Url::parse("https://huggingface.co:8443/x").unwrap()));
    }

    #[test]
    fn a_resumed_hash_is_the_whole_files_hash() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let bytes: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&path, &bytes).unwrap();
        let mut h = Hashed::of_prefix(&path, 123_456).unwrap();
        h.sha256.update(&bytes[123_456..]);
        assert_eq!(hex::encode(h.sha256.finalize()), sha256_file(&path).unwrap());
    }

    #[test]
    fn content_range_start() {
        let mut h = HeaderMap::new();
        h.insert(CONTENT_RANGE, "bytes 1024-2047/2048".parse().unwrap());
        assert_eq!(range_start(&h), Some(1024));
    }
}
