//! Quality per tier, the article's third axis: scores clients send (`POST /v1/feedback`)
//! and scores from shadow comparisons (an edge answer's embedding against the cloud's
//! answer to the same request).
//!
//! Answer ids are remembered for `routing.feedback_window_s` with the tier and split bucket
//! that answered, so a score lands where it belongs. Scores are kept for the same day the
//! routing samples cover.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::Serialize;
use serde_json::{json, Value};

use super::ledger::Tier;
use crate::telemetry::metrics::METRICS;

/// Where a score came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
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

#[derive(Debug, Clone, Copy)]
struct Answered {
    tier: Tier,
    split: bool,
    scored: bool,
}

#[derive(Debug, Clone, Copy)]
struct Score {
    at: Instant,
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

/// Remembered answer ids: what answered each, and the order they arrived in (for expiry).
type Answers = (HashMap<String, Answered>, VecDeque<(Instant, String)>);

/// Quality scores of one node.
pub struct Quality {
    window: Duration,
    ids: Mutex<Answers>,
    scores: Mutex<VecDeque<Score>>,
}

impl Quality {
    pub fn new(feedback_window: Duration) -> Self {
        Quality { window: feedback_window, ids: Mutex::default(), scores: Mutex::default() }
    }

    /// Remembers an answer so feedback on its id can find its tier.
    pub fn remember(&self, id: &str, tier: Tier, split: bool) {
        if id.is_empty() {
            return;
        }
        let mut guard = self.ids.lock();
        self.forget_old(&mut guard, MAX_IDS - 1);
        let (map, order) = &mut *guard;
        map.insert(id.to_string(), Answered { tier, split, scored: false });
        order.push_back((Instant::now(), id.to_string()));
    }

    /// Forgets ids older than the window, and the oldest beyond `keep`.
    fn forget_old(&self, answers: &mut Answers, keep: usize) {
        let (map, order) = answers;
        let now = Instant::now();
        while order.front().is_some_and(|(at, _)| now.duration_since(*at) > self.window) || order.len() > keep {
            if let Some((_, old)) = order.pop_front() {
                map.remove(&old);
            }
        }
    }

    /// Records a client's score (0..1) for answer `id`; returns the tier that answered.
    pub fn feedback(&self, id: &str, score: f64) -> Result<Tier, FeedbackRefusal> {
        let answered = {
            let mut guard = self.ids.lock();
            self.forget_old(&mut guard, MAX_IDS);
            let a = guard.0.get_mut(id).ok_or(FeedbackRefusal::Unknown)?;
            if a.scored {
                return Err(FeedbackRefusal::AlreadyScored);
            }
            a.scored = true;
            *a
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
        let mut scores = self.scores.lock();
        scores.push_back(Score { at: Instant::now(), tier, split, source, value });
        while scores.len() > MAX_SCORES || scores.front().is_some_and(|s| s.at.elapsed() > SCORE_WINDOW) {
            scores.pop_front();
        }
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
        let scores: Vec<Score> = self.scores.lock().iter().copied().collect();
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
}
