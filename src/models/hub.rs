//! The Hugging Face Hub as a model source, spoken as its official client speaks it.
//!
//! - `GET {endpoint}/api/models/{repo}/revision/{revision}`: a branch, tag or commit → the
//!   commit (`sha`).
//! - `GET {endpoint}/api/models/{repo}/tree/{commit}?recursive=true`: every file at the
//!   commit with its size and git object id, and for large (LFS) files their sha256.
//! - `GET {endpoint}/{repo}/resolve/{commit}/{path}`: a small file directly, a large one
//!   through a redirect to another host (the token stays with the Hub: `download`).
//!
//! `HF_ENDPOINT` (a mirror), `HF_TOKEN` (or the token file `huggingface-cli login` writes),
//! and `HF_HUB_OFFLINE` are read as the official client reads them. Every failure says what
//! it means for the user: a gated or private repository without a token, a repository,
//! revision or file that does not exist (the Hub's `X-Error-Code` named), a Hub that kept
//! answering 429 or 5xx after backoff.

use std::path::PathBuf;
use std::time::Duration;

use reqwest::blocking::Client;
use reqwest::header::AUTHORIZATION;
use reqwest::{StatusCode, Url};
use serde::Deserialize;

use super::download::{retry_after, status_error, DownloadError, ATTEMPTS};

/// The public Hub.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// A Hub request that failed, in words that say what to do about it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct HubError(pub String);

/// Where the Hub is and who we are to it, from the environment.
#[derive(Debug, Clone)]
pub struct HubSettings {
    pub endpoint: String,
    pub token: Option<String>,
    pub offline: bool,
}

impl HubSettings {
    /// `HF_ENDPOINT`, `HF_TOKEN` (else the file at `HF_TOKEN_PATH`, else `$HF_HOME/token`),
    /// `HF_HUB_OFFLINE` (`1`, `true`, `yes` or `on`).
    pub fn from_env() -> HubSettings {
        let var = |k: &str| std::env::var(k).ok().map(|v| v.trim().to_string()).filter(|v| !v.is_empty());
        let endpoint = var("HF_ENDPOINT").unwrap_or_else(|| DEFAULT_ENDPOINT.to_string()).trim_end_matches('/').to_string();
        let token = var("HF_TOKEN").or_else(|| {
            let path = var("HF_TOKEN_PATH").map(PathBuf::from).unwrap_or_else(|| hf_home().join("token"));
            std::fs::read_to_string(path).ok().map(|t| t.trim().to_string()).filter(|t| !t.is_empty())
        });
        let offline = var("HF_HUB_OFFLINE").is_some_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"));
        HubSettings { endpoint, token, offline }
    }
}

/// `HF_HOME`, else `$XDG_CACHE_HOME/huggingface`, else `~/.cache/huggingface`.
pub fn hf_home() -> PathBuf {
    if let Some(h) = std::env::var_os("HF_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(h);
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/")).join(".cache"));
    cache.join("huggingface")
}

/// One file at a commit, as the tree API lists it.
#[derive(Debug, Clone, PartialEq)]
pub struct HubFile {
    pub path: String,
    pub size: u64,
    /// The git blob id.
    pub oid: String,
    /// The sha256, for files stored with LFS (the large ones).
    pub lfs_sha256: Option<String>,
}

#[derive(Deserialize)]
struct TreeItem {
    #[serde(rename = "type")]
    kind: String,
    path: String,
    #[serde(default)]
    size: u64,
    #[serde(default)]
    oid: String,
    lfs: Option<TreeLfs>,
}

#[derive(Deserialize)]
struct TreeLfs {
    oid: String,
}

#[derive(Deserialize)]
struct RevisionInfo {
    sha: String,
}

/// A client for one endpoint.
pub struct Hub {
    pub settings: HubSettings,
    client: Client,
}

impl Hub {
    pub fn new(settings: HubSettings) -> Result<Hub, HubError> {
        let client = http_client().map_err(|e| HubError(format!("cannot build an HTTP client: {e}")))?;
        Ok(Hub { settings, client })
    }

    /// The HTTP client downloads share.
    pub fn client(&self) -> &Client {
        &self.client
    }

    fn refuse_offline(&self, what: &str) -> Result<(), HubError> {
        if self.settings.offline {
            return Err(HubError(format!("HF_HUB_OFFLINE is set, so {what} cannot be asked of the Hub")));
        }
        Ok(())
    }

    /// `{endpoint}/{segments...}`, each segment percent-encoded (a path's own `/` kept).
    fn url(&self, segments: &[&str]) -> Result<Url, HubError> {
        let mut url = Url::parse(&self.settings.endpoint).map_err(|e| HubError(format!("HF_ENDPOINT {:?}: {e}", self.settings.endpoint)))?;
        {
            let mut path = url.path_segments_mut().map_err(|_| HubError(format!("HF_ENDPOINT {:?} cannot take a path", self.settings.endpoint)))?;
            path.pop_if_empty();
            for s in segments {
                path.extend(s.split('/'));
            }
        }
        Ok(url)
    }

    /// Where a file's bytes are: `{endpoint}/{repo}/resolve/{commit}/{path}`.
    pub fn file_url(&self, repo: &str, commit: &str, path: &str) -> Result<Url, HubError> {
        let mut url = self.url(&[repo, "resolve"])?;
        url.path_segments_mut().map_err(|_| HubError("bad endpoint".into()))?.push(commit).extend(path.split('/'));
        Ok(url)
    }

    /// A branch, tag or commit of `repo` → the full commit id.
    pub fn resolve_commit(&self, repo: &str, revision: &str) -> Result<String, HubError> {
        self.refuse_offline(&format!("{repo}@{revision}'s commit"))?;
        let mut url = self.url(&["api/models", repo, "revision"])?;
        url.path_segments_mut().map_err(|_| HubError("bad endpoint".into()))?.push(revision);
        let info: RevisionInfo = self.get_json(&url, repo, Some(revision), None)?;
        Ok(info.sha)
    }

    /// Every file of `repo` at `commit`, following the listing's pages.
    pub fn list_files(&self, repo: &str, commit: &str) -> Result<Vec<HubFile>, HubError> {
        self.refuse_offline(&format!("the file list of {repo}@{commit}"))?;
        let mut url = self.url(&["api/models", repo, "tree"])?;
        url.path_segments_mut().map_err(|_| HubError("bad endpoint".into()))?.push(commit);
        url.query_pairs_mut().append_pair("recursive", "true");
        let mut files = Vec::new();
        let mut next = Some(url);
        while let Some(page) = next.take() {
            let (items, link): (Vec<TreeItem>, Option<String>) = self.get_json_with_link(&page, repo, Some(commit), None)?;
            files.extend(items.into_iter().filter(|i| i.kind == "file").map(|i| HubFile {
                path: i.path,
                size: i.size,
                oid: i.oid,
                lfs_sha256: i.lfs.map(|l| l.oid),
            }));
            // The token goes with the next page: only to the Hub's own origin.
            next = link.and_then(|l| next_link(&l)).and_then(|l| page.join(&l).ok()).filter(|n| super::download::same_origin(&page, n));
        }
        Ok(files)
    }

    fn get_json<T: serde::de::DeserializeOwned>(&self, url: &Url, repo: &str, revision: Option<&str>, path: Option<&str>) -> Result<T, HubError> {
        self.get_json_with_link(url, repo, revision, path).map(|(v, _)| v)
    }

    /// A GET to the Hub's API with the token, retried with backoff on 429 and 5xx.
    fn get_json_with_link<T: serde::de::DeserializeOwned>(
        &self,
        url: &Url,
        repo: &str,
        revision: Option<&str>,
        path: Option<&str>,
    ) -> Result<(T, Option<String>), HubError> {
        let mut backoff = Duration::from_millis(500);
        let mut last = String::new();
        for attempt in 1..=ATTEMPTS {
            let mut request = self.client.get(url.clone());
            if let Some(t) = &self.settings.token {
                request = request.header(AUTHORIZATION, format!("Bearer {t}"));
            }
            let wait = match request.send() {
                Ok(r) if r.status().is_success() => {
                    let link = r.headers().get("link").and_then(|l| l.to_str().ok()).map(str::to_string);
                    let value = r.json::<T>().map_err(|e| HubError(format!("{}: the Hub's answer is not what its API returns: {e}", shown(url))))?;
                    return Ok((value, link));
                }
                Ok(r) if r.status() == StatusCode::TOO_MANY_REQUESTS || r.status().is_server_error() => {
                    let wait = retry_after(r.headers());
                    last = status_error(url, r).to_string();
                    wait
                }
                Ok(r) => return Err(self.explain(&status_error(url, r), repo, revision, path)),
                Err(e) => {
                    last = format!("cannot reach {}: {e}", self.settings.endpoint);
                    None
                }
            };
            if attempt < ATTEMPTS {
                std::thread::sleep(wait.unwrap_or(backoff).min(Duration::from_secs(60)));
                backoff *= 2;
            }
        }
        Err(HubError(format!("{repo}: gave up after {ATTEMPTS} tries: {last}")))
    }

    /// What a failed Hub request means, in the user's terms.
    pub fn explain(&self, e: &DownloadError, repo: &str, revision: Option<&str>, path: Option<&str>) -> HubError {
        let DownloadError::Status { status, code, message, .. } = e else {
            return HubError(e.to_string());
        };
        let code_str = code.as_deref().unwrap_or("");
        let said = match (code, message) {
            (Some(c), Some(m)) => format!(" ({status} {c}: {m})"),
            (Some(c), None) => format!(" ({status} {c})"),
            (None, Some(m)) => format!(" ({status}: {m})"),
            (None, None) => format!(" ({status})"),
        };
        let at = revision.map(|r| format!(" at {r}")).unwrap_or_default();
        HubError(match (*status, code_str) {
            (401 | 403, _) if self.settings.token.is_none() => {
                format!("{repo} is gated or private: it needs HF_TOKEN with access to {repo}{said}")
            }
            (401 | 403, _) => format!("HF_TOKEN has no access to {repo}: accept its terms or use a token that can read it{said}"),
            (404, "RevisionNotFound") => format!("revision {} not found in {repo}{said}", revision.unwrap_or("?")),
            (404, "EntryNotFound") => format!("{} not found in {repo}{at}{said}", path.unwrap_or("the file")),
            (404, "RepoNotFound") | (404, _) if path.is_none() || code_str == "RepoNotFound" => {
                format!("repository {repo} not found on {}{said}", self.settings.endpoint)
            }
            (404, _) => format!("{} not found in {repo}{at}{said}", path.unwrap_or("the file")),
            _ => format!("{repo}{at}: the Hub answered{said}"),
        })
    }
}

/// The `rel="next"` target of a `Link` header.
fn next_link(header: &str) -> Option<String> {
    header.split(',').find(|part| part.contains("rel=\"next\"")).and_then(|part| {
        let start = part.find('<')? + 1;
        let end = part.find('>')?;
        part.get(start..end).map(str::to_string)
    })
}

/// A URL without its query, for messages.
fn shown(url: &Url) -> String {
    let mut u = url.clone();
    u.set_query(None);
    u.to_string()
}

/// The blocking client model downloads use: no automatic redirects (`download` follows them
/// itself so a token never leaves its host), a connect timeout, and a timeout on each wait
/// (the blocking client applies it to the answer's headers and to every read of the body,
/// not to the whole transfer), which turns a stalled transfer into a retry instead of a hang
/// without limiting how long a large file may take.
pub fn http_client() -> reqwest::Result<Client> {
    Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(15))
        .timeout(Duration::from_secs(60))
        .user_agent(concat!("edgenode/", env!("CARGO_PKG_VERSION")))
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub(token: Option<&str>) -> Hub {
        Hub::new(HubSettings { endpoint: "https://hub.example/mirror/".trim_end_matches('/').into(), token: token.map(Into::into), offline: false })
            .unwrap()
    }

    #[test]
    fn file_urls_keep_subfolders_and_encode_the_rest() {
        let u = hub(None).file_url("BAAI/bge-small-en-v1.5", "5c38ec7c405ec4b44b94cc5a9bb96e735b38267a", "1_Pooling/config.json").unwrap();
        assert_eq!(
            u.as_str(),
            "https://hub.example/mirror/BAAI/bge-small-en-v1.5/resolve/5c38ec7c405ec4b44b94cc5a9bb96e735b38267a/1_Pooling/config.json"
        );
        let u = hub(None).file_url("a/b", "main", "with space#.gguf").unwrap();
        assert!(u.as_str().ends_with("/a/b/resolve/main/with%20space%23.gguf"), "{u}");
    }

    #[test]
    fn errors_say_what_to_do() {
        let status = |s: u16, c: &str| DownloadError::Status { url: "u".into(), status: s, code: Some(c.into()), message: None };
        let e = hub(None).explain(&status(401, "GatedRepo"), "meta/llama", Some("main"), None);
        assert!(e.0.contains("needs HF_TOKEN with access to meta/llama"), "{e}");
        let e = hub(Some("t")).explain(&status(403, "GatedRepo"), "meta/llama", Some("main"), None);
        assert!(e.0.starts_with("HF_TOKEN has no access to meta/llama"), "{e}");
        let e = hub(None).explain(&status(404, "RevisionNotFound"), "a/b", Some("v9"), None);
        assert!(e.0.contains("revision v9 not found in a/b") && e.0.contains("RevisionNotFound"), "{e}");
        let e = hub(None).explain(&status(404, "EntryNotFound"), "a/b", Some("c"), Some("x.gguf"));
        assert!(e.0.contains("x.gguf not found in a/b at c"), "{e}");
        let e = hub(None).explain(&status(404, "RepoNotFound"), "a/b", Some("c"), Some("x.gguf"));
        assert!(e.0.contains("repository a/b not found"), "{e}");
    }

    #[test]
    fn link_header_next_page() {
        let h = r#"<https://huggingface.co/api/models/a/b/tree/c?cursor=xyz>; rel="next""#;
        assert_eq!(next_link(h).as_deref(), Some("https://huggingface.co/api/models/a/b/tree/c?cursor=xyz"));
        assert_eq!(next_link(r#"<https://x>; rel="prev""#), None);
    }
}
