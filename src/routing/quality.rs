//! Quality per tier, the article's third axis: scores clients send (`POST /v1/feedback`)
//! and scores from shadow comparisons (an edge answer's embedding against the cloud's
//! answer to the same request).
//!
//! Answer ids are remembered for `routing.feedback_window_s` with the tier and split bucket
//! that answered, so a score lands where it belongs. Scores are kept for the same day the
//! routing samples cover.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::time::Duration;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::ledger::Tier;
use crate::state::{unix_ms, Changes, Durable, Journal, Records, Stamped};
use crate::telemetry::metrics::METRICS;

/// Where a score came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// A client's `POST /v1/feedback`.
    Feedback,
    /// Cosine of the edge answer's embedding to the cloud's answer to the same request.
    Shadow,
}

impl Source {
    fn as_str(self) -> &'static str {
        match self {
            Source::Feedback => "feedback",
            Source::Shadow => "shadow",
        }
    }
}

/// Why a feedback score was not recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FeedbackRefusal {
    /// No answer with this id within the window.
    Unknown,
    /// This answer was scored already; the first score counts.
    AlreadyScored,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct Answered {
    tier: Tier,
    split: bool,
    scored: bool,
    /// Unix ms when it was answered.
    at: u64,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct Score {
    /// Unix ms when it was scored.
    at: u64,
    tier: Tier,
    split: bool,
    source: Source,
    value: f64,
}

/// Most answer ids remembered at once (the oldest are forgotten first).
const MAX_IDS: usize = 100_000;
/// Most scores kept.
const MAX_SCORES: usize = 100_000;
const SCORE_WINDOW: Duration = Duration::from_secs(24 * 3600);

/// Remembered answer ids: what answered each, the order they arrived in (for expiry), and
/// the ids changed since the state was last saved.
#[derive(Default)]
struct Answers {
    map: HashMap<String, Answered>,
    order: VecDeque<(u64, String)>,
    dirty: BTreeSet<String>,
}

impl Stamped for Score {
    fn at_ms(&self) -> u64 {
        self.at
    }
}

/// Quality scores of one node.
pub struct Quality {
    window: Duration,
    ids: Mutex<Answers>,
    scores: Mutex<Journal<Score>>,
}

const SECTION: &str = "quality";

impl Quality {
    pub fn new(feedback_window: Duration) -> Self {
        Quality { window: feedback_window, ids: Mutex::default(), scores: Mutex::new(Journal::new("s/", MAX_SCORES, SCORE_WINDOW)) }
    }

    /// Restores the ids and scores an earlier run saved (those past their window are dropped).
    pub fn restore(&self, records: &Records) {
        let mut answers: Vec<(String, Answered)> = records.prefixed::<Answered>(SECTION, "id/");
        answers.sort_by_key(|(_, a)| a.at);
        let mut ids = self.ids.lock();
        for (id, a) in answers {
            ids.order.push_back((a.at, id.clone()));
            ids.map.insert(id, a);
        }
        self.forget_old(&mut ids, MAX_IDS);
        self.scores.lock().restore(records, SECTION);
    }

    /// Remembers an answer so feedback on its id can find its tier.
    pub fn remember(&self, id: &str, tier: Tier, split: bool) {
        if id.is_empty() {
            return;
        }
        let mut ids = self.ids.lock();
        self.forget_old(&mut ids, MAX_IDS - 1);
        let at = unix_ms();
        ids.map.insert(id.to_string(), Answered { tier, split, scored: false, at });
        ids.order.push_back((at, id.to_string()));
        ids.dirty.insert(id.to_string());
    }

    /// Forgets ids older than the window, and the oldest beyond `keep`.
    fn forget_old(&self, answers: &mut Answers, keep: usize) {
        let now = unix_ms();
        let window = self.window.as_millis() as u64;
        while answers.order.front().is_some_and(|(at, _)| now.saturating_sub(*at) > window) || answers.order.len() > keep {
            if let Some((_, old)) = answers.order.pop_front() {
                answers.map.remove(&old);
                answers.dirty.insert(old);
            }
        }
    }

    /// Records a client's score (0..1) for answer `id`; returns the tier that answered.
    pub fn feedback(&self, id: &str, score: f64) -> Result<Tier, FeedbackRefusal> {
        let answered = {
            let mut ids = self.ids.lock();
            self.forget_old(&mut ids, MAX_IDS);
            let a = ids.map.get_mut(id).ok_or(FeedbackRefusal::Unknown)?;
            if a.scored {
                return Err(FeedbackRefusal::AlreadyScored);
            }
            a.scored = true;
            let a = *a;
            ids.dirty.insert(id.to_string());
            a
        };
        self.record(answered.tier, answered.split, Source::Feedback, score);
        Ok(answered.tier)
    }

    /// Records a shadow comparison's score for an edge answer.
    pub fn shadow(&self, split: bool, score: f64) {
        self.record(Tier::Edge, split, Source::Shadow, score);
    }

    fn record(&self, tier: Tier, split: bool, source: Source, value: f64) {
        METRICS.quality_score.with_label_values(&[tier.as_str(), source.as_str()]).observe(value);
        self.scores.lock().push(Score { at: unix_ms(), tier, split, source, value });
    }

    fn all_scores(&self) -> Vec<Score> {
        self.scores.lock().iter().copied().collect()
    }

    fn summary(scores: &[Score], pick: impl Fn(&Score) -> bool) -> Value {
        let chosen: Vec<f64> = scores.iter().filter(|s| pick(s)).map(|s| s.value).collect();
        let n = chosen.len();
        json!({"count": n, "mean": (n > 0).then(|| chosen.iter().sum::<f64>() / n as f64)})
    }

    /// Scores of a tier from a source.
    pub fn count(&self, tier: Tier, source: Source) -> usize {
        self.scores.lock().iter().filter(|s| s.tier == tier && s.source == source).count()
    }

    /// Mean score of a tier over every source (`None` without scores).
    pub fn mean(&self, tier: Tier) -> Option<f64> {
        let scores = self.scores.lock();
        let chosen: Vec<f64> = scores.iter().filter(|s| s.tier == tier).map(|s| s.value).collect();
        (!chosen.is_empty()).then(|| chosen.iter().sum::<f64>() / chosen.len() as f64)
    }

    /// Per tier and source (and per split bucket when `split_mode`), for `/stats`.
    pub fn stats(&self, split_mode: bool) -> Value {
        let scores = self.all_scores();
        let tier = |t: Tier, split_only: bool| {
            json!({
                "feedback": Self::summary(&scores, |s| s.tier == t && s.source == Source::Feedback && (!split_only || s.split)),
                "shadow": Self::summary(&scores, |s| s.tier == t && s.source == Source::Shadow && (!split_only || s.split)),
                "all": Self::summary(&scores, |s| s.tier == t && (!split_only || s.split)),
            })
        };
        let mut out = json!({"edge": tier(Tier::Edge, false), "cloud": tier(Tier::Cloud, false), "feedback_window_s": self.window.as_secs()});
        if split_mode {
            out["split"] = json!({"edge": tier(Tier::Edge, true), "cloud": tier(Tier::Cloud, true)});
        }
        out
    }
}

impl Durable for Quality {
    fn changes(&self, out: &mut Changes) {
        {
            let mut ids = self.ids.lock();
            for id in std::mem::take(&mut ids.dirty) {
                match ids.map.get(&id) {
                    Some(a) => out.put(SECTION, &format!("id/{id}"), a),
                    None => out.delete(SECTION, &format!("id/{id}")),
                }
            }
        }
        self.scores.lock().changes(SECTION, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn feedback_finds_the_tier_once_and_only_within_the_window() {
        let q = Quality::new(Duration::from_secs(60));
        q.remember("chatcmpl-1", Tier::Cloud, true);
        assert_eq!(q.feedback("chatcmpl-1", 0.25), Ok(Tier::Cloud));
        assert_eq!(q.feedback("chatcmpl-1", 0.9), Err(FeedbackRefusal::AlreadyScored));
        assert_eq!(q.feedback("nope", 0.9), Err(FeedbackRefusal::Unknown));
        q.shadow(false, 0.75);
        assert_eq!(q.mean(Tier::Cloud), Some(0.25));
        let s = q.stats(true);
        assert_eq!(s["edge"]["shadow"]["count"], 1);
        assert_eq!(s["split"]["cloud"]["feedback"]["mean"], 0.25);
        let short = Quality::new(Duration::from_millis(1));
        short.remember("old", Tier::Edge, false);
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(short.feedback("old", 1.0), Err(FeedbackRefusal::Unknown));
    }

    #[test]
    fn ids_and_scores_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::state::StateStore::open(dir.path()).unwrap();
        let q = Quality::new(Duration::from_secs(60));
        q.remember("chatcmpl-a", Tier::Edge, false);
        q.remember("chatcmpl-b", Tier::Cloud, true);
        assert_eq!(q.feedback("chatcmpl-a", 0.5), Ok(Tier::Edge));
        let mut c = Changes::default();
        q.changes(&mut c);
        store.commit(&c).unwrap();
        let restored = Quality::new(Duration::from_secs(60));
        restored.restore(&store.load().unwrap());
        assert_eq!(restored.feedback("chatcmpl-a", 0.9), Err(FeedbackRefusal::AlreadyScored));
        assert_eq!(restored.feedback("chatcmpl-b", 1.0), Ok(Tier::Cloud));
        assert_eq!(restored.mean(Tier::Edge), Some(0.5));
        assert_eq!(restored.count(Tier::Cloud, Source::Feedback), 1);
    }
}
