//! Probes: what a new model version must answer before it may serve.
//!
//! A manifest entry may carry one (`[models.probe]`). For an embedding model: inputs, the
//! vectors the version that wrote the probe gave for them, and the least cosine each new
//! vector must reach. For a generate model: a prompt, the greedy completion it gave, and
//! the least share of that completion's tokens the new version must reproduce in order.
//! The comparisons are plain functions here; running the model is the caller's.

use serde::{Deserialize, Serialize};

/// A probe, as the manifest writes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Probe {
    /// Embedding probes: the inputs...
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inputs: Vec<String>,
    /// ...the vectors expected for them...
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vectors: Vec<Vec<f32>>,
    /// ...and the least cosine each must reach (default 0.99).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_cosine: Option<f32>,
    /// Generation probes: a raw prompt (no chat template)...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    /// ...its expected greedy completion...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion: Option<String>,
    /// ...and the least share of its tokens to reproduce, position by position (default 1.0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_match: Option<f32>,
}

/// The default least cosine of an embedding probe.
pub const DEFAULT_MIN_COSINE: f32 = 0.99;

impl Probe {
    /// Whether the probe is well-formed for a model kind; the message names what is wrong.
    pub fn check_shape(&self, generate: bool) -> Result<(), String> {
        if generate {
            if self.prompt.as_deref().is_none_or(str::is_empty) || self.completion.is_none() {
                return Err("a generate model's probe needs `prompt` and `completion`".into());
            }
            if !self.inputs.is_empty() || !self.vectors.is_empty() {
                return Err("a generate model's probe takes no `inputs` or `vectors`".into());
            }
        } else {
            if self.inputs.is_empty() || self.inputs.len() != self.vectors.len() {
                return Err("an encoder's probe needs `inputs` and one vector in `vectors` for each".into());
            }
            if self.prompt.is_some() || self.completion.is_some() {
                return Err("an encoder's probe takes no `prompt` or `completion`".into());
            }
        }
        Ok(())
    }

    /// Compares the new version's vectors with the expected ones: `Err` names the first input
    /// below the bar.
    pub fn judge_vectors(&self, got: &[Vec<f32>]) -> Result<f32, String> {
        let bar = self.min_cosine.unwrap_or(DEFAULT_MIN_COSINE);
        let mut worst = 1.0f32;
        for ((input, want), have) in self.inputs.iter().zip(&self.vectors).zip(got) {
            let c = cosine(want, have);
            worst = worst.min(c);
            if c.is_nan() || c < bar {
                return Err(format!("probe input {input:?}: cosine {c:.4} to the expected vector, below {bar}"));
            }
        }
        if got.len() != self.vectors.len() {
            return Err(format!("the probe expected {} vectors, the model gave {}", self.vectors.len(), got.len()));
        }
        Ok(worst)
    }

    /// Compares the new version's completion tokens with the expected ones (both tokenized by
    /// the new version): `Err` when fewer than `min_match` of them agree, position by position.
    pub fn judge_tokens(&self, expected: &[u32], got: &[u32]) -> Result<f32, String> {
        let bar = self.min_match.unwrap_or(1.0);
        let same = expected.iter().zip(got).filter(|(a, b)| a == b).count();
        let share = if expected.is_empty() { 1.0 } else { same as f32 / expected.len() as f32 };
        if share < bar {
            return Err(format!(
                "probe prompt {:?}: {same} of {} expected tokens reproduced ({share:.2}), below {bar}",
                self.prompt.as_deref().unwrap_or(""),
                expected.len()
            ));
        }
        Ok(share)
    }
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    if a.len() != b.len() {
        return f32::NAN;
    }
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let n = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (n(a) * n(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vectors_pass_or_name_the_input_below_the_bar() {
        let p = Probe {
            inputs: vec!["a".into(), "b".into()],
            vectors: vec![vec![1.0, 0.0], vec![0.0, 1.0]],
            min_cosine: Some(0.9),
            prompt: None,
            completion: None,
            min_match: None,
        };
        p.check_shape(false).unwrap();
        assert!(p.judge_vectors(&[vec![1.0, 0.1], vec![0.1, 1.0]]).is_ok());
        let e = p.judge_vectors(&[vec![1.0, 0.0], vec![1.0, 0.0]]).unwrap_err();
        assert!(e.contains("\"b\"") && e.contains("below 0.9"), "{e}");
        assert!(p.judge_vectors(&[vec![1.0, 0.0, 0.0], vec![0.0, 1.0]]).is_err(), "another width never passes");
    }

    #[test]
    fn tokens_count_by_position() {
        let p = Probe {
            inputs: vec![],
            vectors: vec![],
            min_cosine: None,
            prompt: Some("Hi".into()),
            completion: Some("x".into()),
            min_match: Some(0.5),
        };
        p.check_shape(true).unwrap();
        assert!(p.judge_tokens(&[1, 2, 3, 4], &[1, 2, 9, 9]).is_ok());
        assert!(p.judge_tokens(&[1, 2, 3, 4], &[2, 3, 4]).is_err());
        assert!(p.check_shape(false).is_err());
    }
}
