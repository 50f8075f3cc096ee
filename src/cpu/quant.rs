//! Quantized weights (GGML's block formats) and the matmul that applies each weight block
//! once to every row of a batch.
//!
//! candle's CPU quantized matmul quantizes each activation row and then streams the whole
//! weight matrix once per row, so a batch of 8 sequences or a 30-token prompt reads the
//! weights 8 or 30 times. Here activations are quantized once (8-bit, per block of 32, with
//! the block's scale and sum), and each task walks a slice of weight rows: a weight block is
//! loaded and unpacked once and multiplied into a tile of up to 8 activation rows held in
//! registers. Integer dot products use AVX-512 VNNI (`vpdpbusd`) where the CPU has it, AVX2
//! (`vpmaddubsw`) otherwise, and plain Rust as the portable fallback and the specification.
//!
//! Formats: Q4_1 (4-bit with scale and minimum per block, SmolLM2's file), Q8_0 (8-bit with
//! scale; also what any other GGML type is converted to at load).

use rayon::prelude::*;

/// Elements per quantization block.
pub const QK: usize = 32;

/// Weights of one matrix in a block format, repacked into separate arrays (scales apart
/// from quants) so the kernels load each with one aligned-enough vector load.
#[derive(Debug, Clone)]
pub enum QWeights {
    /// Per block: scale `d`, minimum `m`, 16 bytes of nibbles (element j in the low nibble
    /// of byte j, element j+16 in its high nibble). Value = d·q + m.
    Q4_1 { d: Vec<f32>, m: Vec<f32>, q: Vec<u8> },
    /// Per block: scale `d`, 32 signed bytes. Value = d·q.
    Q8_0 { d: Vec<f32>, q: Vec<i8> },
}

/// A quantized `rows × cols` matrix (PyTorch `Linear` layout: one row per output).
#[derive(Debug, Clone)]
pub struct QMatrix {
    pub rows: usize,
    pub cols: usize,
    pub weights: QWeights,
}

/// Activations quantized to 8 bits per block of 32: per block a scale `d` and `s = d·Σq`.
#[derive(Debug, Default, Clone)]
pub struct QActs {
    pub rows: usize,
    pub cols: usize,
    pub d: Vec<f32>,
    pub s: Vec<f32>,
    pub q: Vec<i8>,
}

impl QActs {
    /// Quantizes `x` (`rows × cols`, row-major) into this buffer, reusing its memory.
    pub fn quantize(&mut self, x: &[f32], rows: usize, cols: usize) {
        assert!(cols % QK == 0 && x.len() >= rows * cols);
        let blocks = cols / QK;
        self.rows = rows;
        self.cols = cols;
        self.d.resize(rows * blocks, 0.0);
        self.s.resize(rows * blocks, 0.0);
        self.q.resize(rows * cols, 0);
        for (b, block) in x[..rows * cols].chunks_exact(QK).enumerate() {
            let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
            let q = &mut self.q[b * QK..(b + 1) * QK];
            let mut sum = 0i32;
            for (o, v) in q.iter_mut().zip(block) {
                let v = (v * inv).round() as i32;
                *o = v as i8;
                sum += v;
            }
            self.d[b] = d;
            self.s[b] = d * sum as f32;
        }
    }
}

impl QMatrix {
    /// Builds a Q8_0 matrix from f32 values (used for GGML types we have no kernel for).
    pub fn q8_0_from_f32(values: &[f32], rows: usize, cols: usize) -> QMatrix {
        let mut acts = QActs::default();
        acts.quantize(values, rows, cols);
        QMatrix { rows, cols, weights: QWeights::Q8_0 { d: acts.d, q: acts.q } }
    }

    /// Row `r` as f32 (used for embedding lookups).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let blocks = self.cols / QK;
        for b in 0..blocks {
            let i = r * blocks + b;
            let o = &mut out[b * QK..(b + 1) * QK];
            match &self.weights {
                QWeights::Q4_1 { d, m, q } => {
                    let qs = &q[i * 16..(i + 1) * 16];
                    for j in 0..16 {
                        o[j] = d[i] * (qs[j] & 0x0F) as f32 + m[i];
                        o[j + 16] = d[i] * (qs[j] >> 4) as f32 + m[i];
                    }
                }
                QWeights::Q8_0 { d, q } => {
                    for j in 0..QK {
                        o[j] = d[i] * q[i * QK + j] as f32;
                    }
                }
            }
        }
    }

    /// Bytes of weight data (for `/info` and memory accounting).
    pub fn bytes(&self) -> usize {
        match &self.weights {
            QWeights::Q4_1 { d, m, q } => 4 * (d.len() + m.len()) + q.len(),
            QWeights::Q8_0 { d, q } => 4 * d.len() + q.len(),
        }
    }

    /// Concatenates matrices with the same width and format row-wise (fused projections:
    /// q, k and v, or gate and up, become one matmul).
    pub fn concat(parts: Vec<QMatrix>) -> Result<QMatrix, String> {
        let cols = parts.first().ok_or("nothing to concatenate")?.cols;
        let rows = parts.iter().map(|p| p.rows).sum();
        let mut it = parts.into_iter();
        let first = it.next().ok_or("nothing to concatenate")?;
        let mut weights = first.weights;
        for p in it {
            if p.cols != cols {
                return Err("cannot fuse matrices of different widths".into());
            }
            match (&mut weights, p.weights) {
                (QWeights::Q4_1 { d, m, q }, QWeights::Q4_1 { d: d2, m: m2, q: q2 }) => {
                    d.extend(d2);
                    m.extend(m2);
                    q.extend(q2);
                }
                (QWeights::Q8_0 { d, q }, QWeights::Q8_0 { d: d2, q: q2 }) => {
                    d.extend(d2);
                    q.extend(q2);
                }
                _ => return Err("cannot fuse matrices of different formats".into()),
            }
        }
        Ok(QMatrix { rows, cols, weights })
    }
}

/// Output rows (weight rows) per parallel task.
const ROWS_PER_TASK: usize = 32;
/// Activation rows per register tile.
const TILE: usize = 8;

#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: each task writes a disjoint set of output columns (its own weight rows).
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// `out[r][n] = Σ_k x[r][k] · w[n][k]` for every activation row `r` and weight row `n`
/// (`out` is `x.rows × w.rows`, row-major). `threads` > 1 splits the weight rows.
pub fn qmatmul(w: &QMatrix, x: &QActs, out: &mut [f32], threads: usize) {
    assert_eq!(w.cols, x.cols, "qmatmul: widths differ");
    assert!(out.len() >= x.rows * w.rows, "qmatmul: output too small");
    let kernel = Kernel::detect();
    let ptr = OutPtr(out.as_mut_ptr());
    let run = |chunk: usize| {
        let n0 = chunk * ROWS_PER_TASK;
        let n1 = (n0 + ROWS_PER_TASK).min(w.rows);
        // SAFETY: rows n0..n1 of `w` exist; `out` holds x.rows × w.rows values (asserted),
        // and this task writes only columns n0..n1.
        unsafe { kernel.run(w, x, n0, n1, ptr) };
    };
    let chunks = w.rows.div_ceil(ROWS_PER_TASK);
    if threads > 1 && chunks > 1 {
        (0..chunks).into_par_iter().for_each(run);
    } else {
        (0..chunks).for_each(run);
    }
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Kernel {
    #[cfg(target_arch = "x86_64")]
    Vnni,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Portable,
}

impl Kernel {
    fn detect() -> Kernel {
        #[cfg(target_arch = "x86_64")]
        {
            if std::env::var_os("EDGENODE_CPU_ISA").is_some_and(|v| v == "portable") {
                return Kernel::Portable;
            }
            let vnni = std::arch::is_x86_feature_detected!("avx512vnni") && std::arch::is_x86_feature_detected!("avx512vl");
            if vnni && crate::cpu::Isa::detect() == crate::cpu::Isa::Avx512 {
                return Kernel::Vnni;
            }
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                return Kernel::Avx2;
            }
        }
        Kernel::Portable
    }

    /// # Safety
    /// `n0..n1` are rows of `w`; `out` points at `x.rows × w.rows` floats.
    unsafe fn run(self, w: &QMatrix, x: &QActs, n0: usize, n1: usize, out: OutPtr) {
        match self {
            #[cfg(target_arch = "x86_64")]
            Kernel::Vnni => x86::run_vnni(w, x, n0, n1, out.0),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => x86::run_avx2(w, x, n0, n1, out.0),
            Kernel::Portable => portable(w, x, n0, n1, out.0),
        }
    }
}

/// The specification: block-by-block integer dots with the same scales the SIMD kernels use.
unsafe fn portable(w: &QMatrix, x: &QActs, n0: usize, n1: usize, out: *mut f32) {
    let blocks = w.cols / QK;
    for r in 0..x.rows {
        let xq = &x.q[r * x.cols..(r + 1) * x.cols];
        for n in n0..n1 {
            let mut acc = 0f32;
            for b in 0..blocks {
                let xb = &xq[b * QK..(b + 1) * QK];
                let (dx, sx) = (x.d[r * blocks + b], x.s[r * blocks + b]);
                let i = n * blocks + b;
                match &w.weights {
                    QWeights::Q4_1 { d, m, q } => {
                        let qs = &q[i * 16..(i + 1) * 16];
                        let mut dot = 0i32;
                        for j in 0..16 {
                            dot += (qs[j] & 0x0F) as i32 * xb[j] as i32 + (qs[j] >> 4) as i32 * xb[j + 16] as i32;
                        }
                        acc += d[i] * dx * dot as f32 + m[i] * sx;
                    }
                    QWeights::Q8_0 { d, q } => {
                        let dot: i32 = q[i * QK..(i + 1) * QK].iter().zip(xb).map(|(a, b)| *a as i32 * *b as i32).sum();
                        acc += d[i] * dx * dot as f32;
                    }
                }
            }
            *out.add(r * w.rows + n) = acc;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{QActs, QMatrix, QWeights, QK, TILE};

    /// An 8-bit dot product of 32 unsigned × 32 signed bytes into 8 i32 lanes.
    trait Dot {
        unsafe fn dot(a: __m256i, b: __m256i) -> __m256i;
    }

    struct Avx2Dot;
    impl Dot for Avx2Dot {
        #[inline(always)]
        unsafe fn dot(a: __m256i, b: __m256i) -> __m256i {
            _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1))
        }
    }

    struct VnniDot;
    impl Dot for VnniDot {
        #[inline(always)]
        unsafe fn dot(a: __m256i, b: __m256i) -> __m256i {
            _mm256_dpbusd_epi32(_mm256_setzero_si256(), a, b)
        }
    }

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    #[inline(always)]
    unsafe fn unpack_q4(p: *const u8) -> __m256i {
        let v = _mm_loadu_si128(p as *const __m128i);
        let mask = _mm_set1_epi8(0x0F);
        let lo = _mm_and_si128(v, mask);
        let hi = _mm_and_si128(_mm_srli_epi16(v, 4), mask);
        _mm256_set_m128i(hi, lo)
    }

    /// One weight row against `R` activation rows starting at `r0`; returns the R sums.
    #[inline(always)]
    unsafe fn row_tile<D: Dot, const R: usize>(w: &QMatrix, x: &QActs, n: usize, r0: usize) -> [f32; R] {
        let blocks = w.cols / QK;
        let mut acc = [_mm256_setzero_ps(); R];
        let mut extra = [0f32; R];
        let xq = x.q.as_ptr();
        match &w.weights {
            QWeights::Q4_1 { d, m, q } => {
                for b in 0..blocks {
                    let i = n * blocks + b;
                    let wv = unpack_q4(q.as_ptr().add(i * 16));
                    let (dw, mw) = (*d.get_unchecked(i), *m.get_unchecked(i));
                    for r in 0..R {
                        let row = r0 + r;
                        let xv = _mm256_loadu_si256(xq.add(row * x.cols + b * QK) as *const __m256i);
                        let dot = _mm256_cvtepi32_ps(D::dot(wv, xv));
                        let scale = _mm256_set1_ps(dw * *x.d.get_unchecked(row * blocks + b));
                        acc[r] = _mm256_fmadd_ps(scale, dot, acc[r]);
                        extra[r] += mw * *x.s.get_unchecked(row * blocks + b);
                    }
                }
            }
            QWeights::Q8_0 { d, q } => {
                for b in 0..blocks {
                    let i = n * blocks + b;
                    let wv = _mm256_loadu_si256(q.as_ptr().add(i * QK) as *const __m256i);
                    // Signed × signed through an unsigned × signed dot: |w| · (x with w's sign).
                    let aw = _mm256_sign_epi8(wv, wv);
                    let dw = *d.get_unchecked(i);
                    for r in 0..R {
                        let row = r0 + r;
                        let xv = _mm256_loadu_si256(xq.add(row * x.cols + b * QK) as *const __m256i);
                        let dot = _mm256_cvtepi32_ps(D::dot(aw, _mm256_sign_epi8(xv, wv)));
                        let scale = _mm256_set1_ps(dw * *x.d.get_unchecked(row * blocks + b));
                        acc[r] = _mm256_fmadd_ps(scale, dot, acc[r]);
                    }
                }
            }
        }
        let mut out = [0f32; R];
        for r in 0..R {
            out[r] = hsum(acc[r]) + extra[r];
        }
        out
    }

    #[inline(always)]
    unsafe fn run<D: Dot>(w: &QMatrix, x: &QActs, n0: usize, n1: usize, out: *mut f32) {
        let mut r0 = 0;
        while r0 < x.rows {
            let left = x.rows - r0;
            macro_rules! tile {
                ($r:expr) => {{
                    for n in n0..n1 {
                        let sums = row_tile::<D, $r>(w, x, n, r0);
                        for (r, s) in sums.iter().enumerate() {
                            *out.add((r0 + r) * w.rows + n) = *s;
                        }
                    }
                    r0 += $r;
                }};
            }
            if left >= TILE {
                tile!(8)
            } else if left >= 4 {
                tile!(4)
            } else if left >= 2 {
                tile!(2)
            } else {
                tile!(1)
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn run_avx2(w: &QMatrix, x: &QActs, n0: usize, n1: usize, out: *mut f32) {
        run::<Avx2Dot>(w, x, n0, n1, out)
    }

    #[target_feature(enable = "avx2,fma,avx512f,avx512vl,avx512vnni")]
    pub(super) unsafe fn run_vnni(w: &QMatrix, x: &QActs, n0: usize, n1: usize, out: *mut f32) {
        run::<VnniDot>(w, x, n0, n1, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn q4_1_from_f32(v: &[f32], rows: usize, cols: usize) -> QMatrix {
        let (mut d, mut m, mut q) = (vec![], vec![], vec![]);
        for block in v.chunks_exact(QK) {
            let (lo, hi) = block.iter().fold((f32::MAX, f32::MIN), |(a, b), &x| (a.min(x), b.max(x)));
            let scale = (hi - lo) / 15.0;
            d.push(scale);
            m.push(lo);
            let code = |x: f32| if scale > 0.0 { ((x - lo) / scale).round().clamp(0.0, 15.0) as u8 } else { 0 };
            for j in 0..16 {
                q.push(code(block[j]) | (code(block[j + 16]) << 4));
            }
        }
        QMatrix { rows, cols, weights: QWeights::Q4_1 { d, m, q } }
    }

    /// Every kernel against the dequantized weights times the dequantized activations in f64,
    /// for batch sizes that exercise every tile width.
    #[test]
    fn kernels_match_the_dequantized_product() {
        let (rows, cols) = (70, 128);
        let wf = random(rows * cols, 1);
        for w in [q4_1_from_f32(&wf, rows, cols), QMatrix::q8_0_from_f32(&wf, rows, cols)] {
            let mut wd = vec![0f32; rows * cols];
            for r in 0..rows {
                w.dequantize_row(r, &mut wd[r * cols..(r + 1) * cols]);
            }
            for batch in [1, 3, 8, 13] {
                let xf = random(batch * cols, 7 + batch as u64);
                let mut x = QActs::default();
                x.quantize(&xf, batch, cols);
                let xd: Vec<f32> = (0..batch * cols).map(|i| x.d[i / QK] * x.q[i] as f32).collect();
                for kernel in [Kernel::detect(), Kernel::Portable] {
                    let mut out = vec![f32::NAN; batch * rows];
                    // SAFETY: all rows, full output.
                    unsafe { kernel.run(&w, &x, 0, rows, OutPtr(out.as_mut_ptr())) };
                    for r in 0..batch {
                        for n in 0..rows {
                            let want: f64 = (0..cols).map(|k| xd[r * cols + k] as f64 * wd[n * cols + k] as f64).sum();
                            let got = out[r * rows + n] as f64;
                            assert!((got - want).abs() < 1e-3 * (1.0 + want.abs()), "{kernel:?} batch {batch} ({r},{n}): {got} vs {want}");
                        }
                    }
                }
                let mut threaded = vec![0f32; batch * rows];
                qmatmul(&w, &x, &mut threaded, 2);
                let mut single = vec![0f32; batch * rows];
                qmatmul(&w, &x, &mut single, 1);
                assert_eq!(threaded, single);
            }
        }
    }
}
