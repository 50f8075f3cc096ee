//! What the queue hands the worker: a batch's inputs packed back to back, no padding.

/// A packed batch: token ids of every input back to back, and the boundaries.
#[derive(Debug, Clone, Default)]
pub struct PackedBatch {
    pub ids: Vec<u32>,
    pub type_ids: Vec<u32>,
    pub positions: Vec<u32>,
    /// Input i owns tokens `cu_seqlens[i]..cu_seqlens[i + 1]`.
    pub cu_seqlens: Vec<u32>,
    pub max_len: usize,
}

impl PackedBatch {
    /// Packs the given token sequences (each already truncated and with special tokens).
    pub fn new<'a>(inputs: impl IntoIterator<Item = (&'a [u32], &'a [u32])>) -> Self {
        let mut b = PackedBatch { cu_seqlens: vec![0], ..Default::default() };
        for (ids, types) in inputs {
            b.ids.extend_from_slice(ids);
            b.type_ids.extend_from_slice(types);
            b.positions.extend(0..ids.len() as u32);
            b.cu_seqlens.push(b.ids.len() as u32);
            b.max_len = b.max_len.max(ids.len());
        }
        b
    }

    /// Number of inputs.
    pub fn len(&self) -> usize {
        self.cu_seqlens.len() - 1
    }

    /// True when the batch has no inputs.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Total tokens.
    pub fn tokens(&self) -> usize {
        self.ids.len()
    }
}
