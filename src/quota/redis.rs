//! The fleet store on Redis (6.2 or newer, Valkey, Upstash): one script call per sync
//! settles every scope this node reports and hands out its leases, atomically.
//!
//! Keys share one hash tag (`{namespace}`), so the call touches one slot and also runs on a
//! Redis Cluster.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, Script, Value};

/// One scope's report in a settle call.
#[derive(Debug, Clone)]
pub struct Report {
    pub scope: String,
    pub window_minutes: u64,
    pub limit: f64,
    /// The lease asked for (0 gives the node's lease back).
    pub want: f64,
    /// (minute, this node's amount in it): only minutes that changed since the last report.
    pub minutes: Vec<(u64, f64)>,
}

/// What the store answered for one scope.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Granted {
    /// The fleet's total over the scope's window (this node's reports included).
    pub total: f64,
    /// The lease this node holds now.
    pub lease: f64,
}

/// The store's answer to one settle call.
#[derive(Debug, Clone, PartialEq)]
pub enum Settled {
    /// In the order of the reports.
    Ok { epoch: String, scopes: Vec<Granted> },
    /// The node's epoch is not the store's: the store lost its data (or is another store)
    /// since the node last reported; everything must be reported again.
    Epoch(String),
}

/// A Redis fleet store.
pub struct RedisStore {
    conn: ConnectionManager,
    script: Script,
    namespace: String,
    timeout: Duration,
    /// The URL without its password, for `/stats` and logs.
    pub shown: String,
}

impl RedisStore {
    /// Prepares the client (inside a tokio runtime); nothing connects until the first call (a store that is down at
    /// start is the same case as one that goes down later).
    pub fn new(url: &str, namespace: &str, timeout: Duration) -> Result<RedisStore, String> {
        let client = Client::open(url).map_err(|e| format!("fleet.store: {e}"))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(1));
        let conn = ConnectionManager::new_lazy_with_config(client, config).map_err(|e| format!("fleet.store: {e}"))?;
        Ok(RedisStore { conn, script: Script::new(include_str!("settle.lua")), namespace: namespace.to_string(), timeout, shown: shown_url(url) })
    }

    fn key(&self, scope: &str, part: &str) -> String {
        format!("{{{}}}:{scope}:{part}", self.namespace)
    }

    /// Reports `reports` for `node` and takes its leases: one round trip (two when the
    /// store has not seen the script yet).
    pub async fn settle(
        &self,
        node: &str,
        epoch: &str,
        new_epoch: &str,
        now_minute: u64,
        lease_ttl: Duration,
        reports: &[Report],
    ) -> Result<Settled, String> {
        let mut call = self.script.prepare_invoke();
        call.key(format!("{{{}}}:epoch", self.namespace));
        call.arg(node).arg(epoch).arg(new_epoch).arg(now_minute).arg(lease_ttl.as_millis() as u64);
        for r in reports {
            for part in ["totals", format!("node:{node}").as_str(), "leases", "lease_expiry"] {
                call.key(self.key(&r.scope, part));
            }
            call.arg(r.window_minutes).arg(num(r.limit)).arg(num(r.want)).arg(r.minutes.len());
            for (minute, amount) in &r.minutes {
                call.arg(*minute).arg(num(*amount));
            }
        }
        let mut conn = self.conn.clone();
        let answer: Vec<String> = tokio::time::timeout(self.timeout, call.invoke_async(&mut conn))
            .await
            .map_err(|_| format!("no answer within {} ms", self.timeout.as_millis()))?
            .map_err(|e| e.to_string())?;
        parse(&answer, reports.len())
    }

    /// `PING`, for a reachability check without side effects.
    pub async fn ping(&self) -> Result<(), String> {
        let mut conn = self.conn.clone();
        let pong: Value = tokio::time::timeout(self.timeout, redis::cmd("PING").query_async(&mut conn))
            .await
            .map_err(|_| "timeout".to_string())?
            .map_err(|e| e.to_string())?;
        match pong {
            Value::SimpleString(_) | Value::BulkString(_) => Ok(()),
            other => Err(format!("unexpected answer {other:?}")),
        }
    }
}

/// A number as the script reads it (`tonumber`), without exponent surprises for integers.
fn num(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        format!("{}", x as i64)
    } else {
        format!("{x}")
    }
}

fn parse(answer: &[String], scopes: usize) -> Result<Settled, String> {
    match answer.first().map(String::as_str) {
        Some("epoch") => Ok(Settled::Epoch(answer.get(1).cloned().unwrap_or_default())),
        Some("ok") if answer.len() == 2 + 2 * scopes => {
            let number = |s: &String| s.parse::<f64>().map_err(|_| format!("the settle script answered {s:?}, not a number"));
            let mut granted = Vec::with_capacity(scopes);
            for pair in answer[2..].chunks(2) {
                granted.push(Granted { total: number(&pair[0])?, lease: number(&pair[1])? });
            }
            Ok(Settled::Ok { epoch: answer[1].clone(), scopes: granted })
        }
        _ => Err(format!("the settle script answered {answer:?}")),
    }
}

/// `redis://user:secret@host:6379/0` → `redis://user:***@host:6379/0`.
pub fn shown_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let creds = &url[scheme + 3..at];
            let user = creds.split(':').next().unwrap_or("");
            let hidden = if creds.contains(':') { format!("{user}:***") } else { "***".to_string() };
            format!("{}{hidden}{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_stay_out_of_sight() {
        assert_eq!(shown_url("redis://default:s3cret@fly-x.upstash.io:6379"), "redis://default:***@fly-x.upstash.io:6379");
        assert_eq!(shown_url("redis://127.0.0.1:6379/2"), "redis://127.0.0.1:6379/2");
        assert_eq!(num(3.0), "3");
        assert_eq!(num(0.25), "0.25");
    }

    #[test]
    fn answers_parse_per_scope() {
        let a: Vec<String> = ["ok", "e1", "1.5", "0.25", "0", "3"].iter().map(|s| s.to_string()).collect();
        let Settled::Ok { epoch, scopes } = parse(&a, 2).unwrap() else { panic!() };
        assert_eq!(epoch, "e1");
        assert_eq!(scopes[1], Granted { total: 0.0, lease: 3.0 });
        assert_eq!(parse(&["epoch".into(), "e2".into()], 2).unwrap(), Settled::Epoch("e2".into()));
        assert!(parse(&["ok".into()], 1).is_err());
    }
}
