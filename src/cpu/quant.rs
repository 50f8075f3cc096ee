//! Quantized weights (GGML's block formats) and the matmul that applies each weight block
//! once to every row of a batch.
//!
//! candle's CPU quantized matmul quantizes each activation row and then streams the whole
//! weight matrix once per row, so a batch of 8 sequences or a 30-token prompt reads the
//! weights 8 or 30 times. Here activations are quantized once (8-bit, per block of 32), and
//! each task walks a slice of weight rows: a weight block is loaded and unpacked once and
//! multiplied into a tile of up to 8 activation rows held in registers.
//!
//! Every supported format is held as unsigned quants with a scale and an offset per block of
//! 32 (value = d·q + m): Q4_1 as packed nibbles, Q8_0 as bytes shifted by 128 (m = -128·d).
//! So one kernel serves both: Σ_b d_b·dx_b·(Σ q·x) + Σ_b m_b·(dx_b·Σx). Quants are laid out
//! in pairs of blocks so one 512-bit register holds 64 of them: AVX-512 VNNI (`vpdpbusd`)
//! multiplies two blocks per instruction; AVX2 (`vpmaddubsw`) and plain Rust (the
//! specification) read the same layout.
//!
//! Activations are quantized exactly as candle (and so mistral.rs) quantizes them —
//! the block scale rounded to f16, Q8_1's block sum rounded through f16 — so the two
//! engines' logits agree to float summation order.

use super::Parallel;

/// Elements per quantization block.
pub const QK: usize = 32;

/// How a matrix's quants are packed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Packing {
    /// 4-bit: 32 bytes per pair of blocks, byte i = q[b0][i] | q[b1][i] << 4 (a trailing
    /// odd block uses the low nibbles of 32 bytes).
    Nibbles,
    /// 8-bit: one byte per quant.
    Bytes,
}

/// A quantized `rows × cols` matrix (PyTorch `Linear` layout: one row per output).
#[derive(Debug, Clone)]
pub struct QMatrix {
    pub rows: usize,
    pub cols: usize,
    pub packing: Packing,
    /// Per block: scale.
    pub d: Vec<f32>,
    /// Per block: offset.
    pub m: Vec<f32>,
    /// The offsets transposed, `[block][row]`: the offset term of a task's rows is then a
    /// few vector multiply-adds per activation row instead of a dot product per output.
    pub m_t: Vec<f32>,
    /// Quants, `row_bytes()` per row.
    pub q: Vec<u8>,
    /// The GGML type it came from (for `/info`).
    pub source: &'static str,
}

/// Activations quantized to 8 bits per block of 32.
#[derive(Debug, Default, Clone)]
pub struct QActs {
    pub rows: usize,
    pub cols: usize,
    /// Per block: scale (f16-rounded, as candle stores it).
    pub d: Vec<f32>,
    /// Per block: the block sum as Q8_1 stores it, `f16(f16(Σq)·d)`: the offset term of
    /// Q4_1 weights uses this, as candle's Q4_1 × Q8_1 product does.
    pub s_q81: Vec<f32>,
    /// Per block: `d·Σq` in f32: the offset term of Q8_0 weights (exact, as candle's Q8_0 × Q8_0).
    pub s: Vec<f32>,
    /// Per pair of blocks: 16 floats `[d0 ×8, d1 ×8]` (the lane pattern of the 512-bit kernel).
    pub dpat: Vec<f32>,
    pub q: Vec<i8>,
}

fn f16_round(x: f32) -> f32 {
    half::f16::from_f32(x).to_f32()
}

/// Rounds half away from zero (Rust's and C's `round`, what candle quantizes with), written
/// so that it vectorizes (libm's `roundf` is a call per element).
#[inline(always)]
fn round_away(x: f32) -> f32 {
    let t = x.trunc();
    let frac = (x - t).abs();
    if frac >= 0.5 { t + 1f32.copysign(x) } else { t }
}

crate::multiversion! {
    /// Quantizes blocks of 32: per block the f16-rounded scale, Q8_1's and the exact sum
    /// terms, and the quants.
    fn quantize_blocks(x: &[f32], d: &mut [f32], s_q81: &mut [f32], s: &mut [f32], q: &mut [i8]) {
        for (b, block) in x.chunks_exact(QK).enumerate() {
            let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            let scale = amax / 127.0;
            let id = if scale != 0.0 { 1.0 / scale } else { 0.0 };
            let out = &mut q[b * QK..(b + 1) * QK];
            let mut sum = 0i32;
            for (o, v) in out.iter_mut().zip(block) {
                let r = round_away(v * id) as i32;
                *o = r as i8;
                sum += r;
            }
            let d16 = f16_round(scale);
            d[b] = d16;
            s_q81[b] = f16_round(f16_round(sum as f32) * d16);
            s[b] = d16 * sum as f32;
        }
    }
}

impl QActs {
    /// Quantizes `x` (`rows × cols`, row-major) into this buffer, reusing its memory.
    pub fn quantize(&mut self, x: &[f32], rows: usize, cols: usize) {
        self.quantize_par(x, rows, cols, &super::Rayon(1));
    }

    /// `quantize`, with rows split across `par` when there are several.
    pub fn quantize_par(&mut self, x: &[f32], rows: usize, cols: usize, par: &dyn Parallel) {
        assert!(cols % QK == 0 && x.len() >= rows * cols);
        let blocks = cols / QK;
        let pairs = blocks.div_ceil(2);
        self.rows = rows;
        self.cols = cols;
        self.d.resize(rows * blocks, 0.0);
        self.s_q81.resize(rows * blocks, 0.0);
        self.s.resize(rows * blocks, 0.0);
        self.dpat.resize(rows * pairs * 16, 0.0);
        self.q.resize(rows * cols, 0);
        let ptrs = ActPtrs {
            d: self.d.as_mut_ptr(),
            s_q81: self.s_q81.as_mut_ptr(),
            s: self.s.as_mut_ptr(),
            dpat: self.dpat.as_mut_ptr(),
            q: self.q.as_mut_ptr(),
        };
        let tasks = if rows >= 4 { par.threads().min(rows) } else { 1 };
        let per = rows.div_ceil(tasks);
        par.for_each(tasks, &|t| {
            let (r0, r1) = ((t * per).min(rows), ((t + 1) * per).min(rows));
            // SAFETY: task t owns rows r0..r1 of every buffer (all row-major and sized above).
            unsafe { ptrs.quantize_rows(&x[r0 * cols..r1 * cols], r0, r1, blocks, pairs) };
        });
    }
}

/// Raw views of `QActs`'s buffers, so row ranges can be filled by separate tasks.
#[derive(Clone, Copy)]
struct ActPtrs {
    d: *mut f32,
    s_q81: *mut f32,
    s: *mut f32,
    dpat: *mut f32,
    q: *mut i8,
}
// SAFETY: tasks write disjoint row ranges.
unsafe impl Send for ActPtrs {}
unsafe impl Sync for ActPtrs {}

impl ActPtrs {
    /// # Safety
    /// Rows `r0..r1` of every buffer exist and no one else touches them meanwhile.
    unsafe fn quantize_rows(&self, x: &[f32], r0: usize, r1: usize, blocks: usize, pairs: usize) {
        let n = r1 - r0;
        let d = std::slice::from_raw_parts_mut(self.d.add(r0 * blocks), n * blocks);
        let s_q81 = std::slice::from_raw_parts_mut(self.s_q81.add(r0 * blocks), n * blocks);
        let s = std::slice::from_raw_parts_mut(self.s.add(r0 * blocks), n * blocks);
        let q = std::slice::from_raw_parts_mut(self.q.add(r0 * blocks * QK), n * blocks * QK);
        let dpat = std::slice::from_raw_parts_mut(self.dpat.add(r0 * pairs * 16), n * pairs * 16);
        quantize_blocks(x, d, s_q81, s, q);
        for r in 0..n {
            for p in 0..pairs {
                let d0 = d[r * blocks + 2 * p];
                let d1 = if 2 * p + 1 < blocks { d[r * blocks + 2 * p + 1] } else { 0.0 };
                let pat = &mut dpat[(r * pairs + p) * 16..(r * pairs + p + 1) * 16];
                pat[..8].fill(d0);
                pat[8..].fill(d1);
            }
        }
    }
}

impl QMatrix {
    /// Bytes of quants per row.
    pub fn row_bytes(&self) -> usize {
        match self.packing {
            Packing::Nibbles => (self.cols / QK).div_ceil(2) * QK,
            Packing::Bytes => self.cols,
        }
    }

    /// From GGUF Q4_1 blocks (20 bytes each: f16 d, f16 m, 16 bytes of nibbles with element
    /// j in the low nibble of byte j and element j+16 in its high nibble).
    pub fn from_q4_1(raw: &[u8], rows: usize, cols: usize) -> QMatrix {
        let blocks = cols / QK;
        let mut out = QMatrix { rows, cols, packing: Packing::Nibbles, d: vec![], m: vec![], m_t: vec![], q: vec![], source: "Q4_1" };
        let row_bytes = out.row_bytes();
        out.q = vec![0u8; rows * row_bytes];
        let mut codes = [0u8; QK];
        for r in 0..rows {
            for b in 0..blocks {
                let blk = &raw[(r * blocks + b) * 20..(r * blocks + b + 1) * 20];
                out.d.push(f16_bits(blk[0], blk[1]));
                out.m.push(f16_bits(blk[2], blk[3]));
                for j in 0..16 {
                    codes[j] = blk[4 + j] & 0x0F;
                    codes[j + 16] = blk[4 + j] >> 4;
                }
                let dst = &mut out.q[r * row_bytes + (b / 2) * QK..r * row_bytes + (b / 2 + 1) * QK];
                let shift = if b % 2 == 0 { 0 } else { 4 };
                for (o, c) in dst.iter_mut().zip(codes) {
                    *o |= c << shift;
                }
            }
        }
        out.transpose_offsets();
        out
    }

    /// Rebuilds `m_t` from `m`.
    fn transpose_offsets(&mut self) {
        let blocks = self.cols / QK;
        self.m_t = vec![0.0; self.m.len()];
        for r in 0..self.rows {
            for b in 0..blocks {
                self.m_t[b * self.rows + r] = self.m[r * blocks + b];
            }
        }
    }

    /// From GGUF Q8_0 blocks (34 bytes each: f16 d, 32 signed bytes).
    pub fn from_q8_0(raw: &[u8], rows: usize, cols: usize) -> QMatrix {
        let blocks = rows * cols / QK;
        let mut out = QMatrix {
            rows,
            cols,
            packing: Packing::Bytes,
            d: Vec::with_capacity(blocks),
            m: Vec::with_capacity(blocks),
            m_t: vec![],
            q: Vec::with_capacity(rows * cols),
            source: "Q8_0",
        };
        for blk in raw.chunks_exact(34).take(blocks) {
            let d = f16_bits(blk[0], blk[1]);
            out.d.push(d);
            out.m.push(-128.0 * d);
            out.q.extend(blk[2..].iter().map(|&x| (x as i8 as i16 + 128) as u8));
        }
        out.transpose_offsets();
        out
    }

    /// Quantizes f32 values to Q8_0 (for GGML types we have no kernel for).
    pub fn q8_0_from_f32(values: &[f32], rows: usize, cols: usize) -> QMatrix {
        let mut raw = Vec::with_capacity(rows * cols / QK * 34);
        for block in values[..rows * cols].chunks_exact(QK) {
            let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            raw.extend(half::f16::from_f32(d).to_bits().to_le_bytes());
            raw.extend(block.iter().map(|v| (v * id).round() as i8 as u8));
        }
        let mut m = QMatrix::from_q8_0(&raw, rows, cols);
        m.source = "Q8_0 (converted)";
        m
    }

    /// Quant `j` of block `b` of row `r` (0..15 or 0..255).
    #[inline(always)]
    fn code(&self, r: usize, b: usize, j: usize) -> u8 {
        let row = &self.q[r * self.row_bytes()..];
        match self.packing {
            Packing::Nibbles => {
                let byte = row[(b / 2) * QK + j];
                if b % 2 == 0 { byte & 0x0F } else { byte >> 4 }
            }
            Packing::Bytes => row[b * QK + j],
        }
    }

    /// Row `r` as f32 (used for embedding lookups).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let blocks = self.cols / QK;
        for b in 0..blocks {
            let (d, m) = (self.d[r * blocks + b], self.m[r * blocks + b]);
            for j in 0..QK {
                out[b * QK + j] = d * self.code(r, b, j) as f32 + m;
            }
        }
    }

    /// Bytes of weight data (for `/info` and memory accounting).
    pub fn bytes(&self) -> usize {
        4 * (self.d.len() + self.m.len() + self.m_t.len()) + self.q.len()
    }

    /// Stacks matrices of the same width and packing (fused projections: q, k and v, or
    /// gate and up, become one matmul).
    pub fn concat(parts: Vec<QMatrix>) -> Result<QMatrix, String> {
        let mut it = parts.into_iter();
        let mut out = it.next().ok_or("nothing to concatenate")?;
        for p in it {
            if p.cols != out.cols || p.packing != out.packing {
                return Err("cannot fuse matrices of different widths or formats".into());
            }
            out.rows += p.rows;
            out.d.extend(p.d);
            out.m.extend(p.m);
            out.q.extend(p.q);
        }
        out.transpose_offsets();
        Ok(out)
    }
}

fn f16_bits(lo: u8, hi: u8) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([lo, hi])).to_f32()
}

/// Fewest output rows (weight rows) per parallel task.
const MIN_ROWS_PER_TASK: usize = 32;
/// Activation rows per register tile.
const TILE: usize = 8;

#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: each task writes a disjoint set of output columns (its own weight rows).
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// A method (not a field access) so closures capture the whole `Send` wrapper.
    fn get(&self) -> *mut f32 {
        self.0
    }
}

/// `out[r][n] = Σ_k x[r][k] · w[n][k]` for every activation row `r` and weight row `n`
/// (`out` is `x.rows × w.rows`, row-major). `threads` > 1 splits the weight rows.
pub fn qmatmul(w: &QMatrix, x: &QActs, out: &mut [f32], par: &dyn Parallel) {
    qmatmul_with(Kernel::detect(), w, x, out, par)
}

/// `qmatmul` with a chosen kernel (tests compare every kernel with the specification).
pub fn qmatmul_with(kernel: Kernel, w: &QMatrix, x: &QActs, out: &mut [f32], par: &dyn Parallel) {
    assert_eq!(w.cols, x.cols, "qmatmul: widths differ");
    assert!(out.len() >= x.rows * w.rows, "qmatmul: output too small");
    assert!(w.q.len() >= w.rows * w.row_bytes() && w.d.len() >= w.rows * (w.cols / QK), "qmatmul: weights truncated");
    let ptr = OutPtr(out.as_mut_ptr());
    // Enough tasks for the threads to balance, few enough that each is worth a dispatch.
    let tasks = (w.rows / MIN_ROWS_PER_TASK).clamp(1, par.threads() * 8);
    // Whole vectors of outputs per task (the offset term runs 16 outputs per vector).
    let per_task = w.rows.div_ceil(tasks).div_ceil(16) * 16;
    let tasks = w.rows.div_ceil(per_task);
    let run = |chunk: usize| {
        let n0 = (chunk * per_task).min(w.rows);
        let n1 = (n0 + per_task).min(w.rows);
        // SAFETY: rows n0..n1 of `w` exist and its buffers are complete (asserted); `out`
        // holds x.rows × w.rows values (asserted), and this task writes only columns n0..n1.
        unsafe {
            offsets(w, x, n0, n1, ptr.get());
            kernel.run(w, x, n0, n1, ptr.get());
        }
    };
    par.for_each(tasks, &run);
}

/// Writes the offset term `Σ_b m_b · s_b` of outputs `n0..n1` for every activation row:
/// the part of each product the integer kernels then add to.
///
/// # Safety
/// As `Kernel::run`.
unsafe fn offsets(w: &QMatrix, x: &QActs, n0: usize, n1: usize, out: *mut f32) {
    let blocks = w.cols / QK;
    let sums = match w.packing {
        Packing::Nibbles => &x.s_q81,
        Packing::Bytes => &x.s,
    };
    offsets_rows(&w.m_t, sums, blocks, w.rows, x.rows, n0, n1, out);
}

crate::multiversion! {
    /// `out[r][n0..n1] = Σ_b sums[r][b] · m_t[b][n0..n1]`: vector multiply-adds over outputs.
    fn offsets_rows(m_t: &[f32], sums: &[f32], blocks: usize, rows_w: usize, rows_x: usize, n0: usize, n1: usize, out: *mut f32) {
        let width = n1 - n0;
        for r in 0..rows_x {
            // SAFETY: the caller guarantees `out` holds rows_x × rows_w floats and that this
            // task alone writes columns n0..n1.
            let o = unsafe { std::slice::from_raw_parts_mut(out.add(r * rows_w + n0), width) };
            let s = &sums[r * blocks..(r + 1) * blocks];
            // 64 outputs at a time (four independent vector chains), accumulated in registers
            // over every block and stored once; then 16 at a time.
            let mut c = 0;
            while c + 64 <= width {
                let mut acc = [0f32; 64];
                for (b, sb) in s.iter().enumerate() {
                    let m = &m_t[b * rows_w + n0 + c..b * rows_w + n0 + c + 64];
                    for i in 0..64 {
                        acc[i] = sb.mul_add(m[i], acc[i]);
                    }
                }
                o[c..c + 64].copy_from_slice(&acc);
                c += 64;
            }
            while c + 16 <= width {
                let mut acc = [0f32; 16];
                for (b, sb) in s.iter().enumerate() {
                    let m = &m_t[b * rows_w + n0 + c..b * rows_w + n0 + c + 16];
                    for i in 0..16 {
                        acc[i] = sb.mul_add(m[i], acc[i]);
                    }
                }
                o[c..c + 16].copy_from_slice(&acc);
                c += 16;
            }
            for (i, v) in o[c..].iter_mut().enumerate() {
                *v = s.iter().enumerate().fold(0.0, |a, (b, sb)| sb.mul_add(m_t[b * rows_w + n0 + c + i], a));
            }
        }
    }
}

/// Which kernel runs.
#[derive(Clone, Copy, PartialEq, Debug)]
pub enum Kernel {
    #[cfg(target_arch = "x86_64")]
    Avx512Vnni,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Portable,
}

impl Kernel {
    /// The fastest kernel this CPU runs.
    pub fn detect() -> Kernel {
        #[cfg(target_arch = "x86_64")]
        {
            if crate::cpu::Isa::detect() == crate::cpu::Isa::Portable {
                return Kernel::Portable;
            }
            if crate::cpu::Isa::detect() == crate::cpu::Isa::Avx512 && std::arch::is_x86_feature_detected!("avx512vnni") {
                return Kernel::Avx512Vnni;
            }
            return Kernel::Avx2;
        }
        #[allow(unreachable_code)]
        Kernel::Portable
    }

    /// Adds the integer-dot part of rows `n0..n1` into `out` (which holds the offset term).
    ///
    /// # Safety
    /// `n0..n1` are rows of `w`, whose buffers are complete; `out` points at
    /// `x.rows × w.rows` floats.
    unsafe fn run(self, w: &QMatrix, x: &QActs, n0: usize, n1: usize, out: *mut f32) {
        match self {
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Vnni => x86::run_avx512(w, x, n0, n1, out),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => x86::run_avx2(w, x, n0, n1, out),
            Kernel::Portable => portable(w, x, n0, n1, out),
        }
    }
}

/// The specification: per block, an exact integer dot scaled by both scales, plus the
/// offset term.
unsafe fn portable(w: &QMatrix, x: &QActs, n0: usize, n1: usize, out: *mut f32) {
    let blocks = w.cols / QK;
    for r in 0..x.rows {
        for n in n0..n1 {
            let mut acc = 0f32;
            for b in 0..blocks {
                let xq = &x.q[r * x.cols + b * QK..r * x.cols + (b + 1) * QK];
                let dot: i32 = (0..QK).map(|j| w.code(n, b, j) as i32 * xq[j] as i32).sum();
                acc += dot as f32 * (w.d[n * blocks + b] * x.d[r * blocks + b]);
            }
            *out.add(r * w.rows + n) += acc;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{Packing, QActs, QMatrix, QK, TILE};

    /// 64 unsigned quants of a block pair in one register: `[block 0 | block 1]`.
    #[inline(always)]
    unsafe fn load_pair_512(w: &QMatrix, row: *const u8, p: usize) -> __m512i {
        match w.packing {
            Packing::Nibbles => {
                let v = _mm256_loadu_si256(row.add(p * QK) as *const __m256i);
                let mask = _mm256_set1_epi8(0x0F);
                let lo = _mm256_and_si256(v, mask);
                let hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
                _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1)
            }
            Packing::Bytes => _mm512_loadu_si512(row.add(p * 2 * QK) as *const __m512i),
        }
    }

    /// The lane sums of eight vectors, as one vector of eight (a transposing add tree:
    /// 23 instructions instead of eight separate reductions).
    #[inline(always)]
    unsafe fn reduce8(v: [__m512; 8]) -> __m256 {
        let half = |a: __m512, b: __m512| {
            _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0b01_00_01_00), _mm512_shuffle_f32x4(a, b, 0b11_10_11_10))
        };
        let (ab, cd, ef, gh) = (half(v[0], v[1]), half(v[2], v[3]), half(v[4], v[5]), half(v[6], v[7]));
        let quarter = |a: __m512, b: __m512| {
            _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0b10_00_10_00), _mm512_shuffle_f32x4(a, b, 0b11_01_11_01))
        };
        // Each 128-bit lane now holds 4 partial sums of one vector: p = [a b c d], q = [e f g h].
        let (p, q) = (quarter(ab, cd), quarter(ef, gh));
        let w = _mm512_add_ps(_mm512_unpacklo_ps(p, q), _mm512_unpackhi_ps(p, q));
        let t = _mm512_add_ps(w, _mm512_permute_ps(w, 0b01_00_11_10));
        // Lane k holds [sum(k), sum(k+4), ..]: gather positions 0,4,8,12,1,5,9,13.
        let idx = _mm512_set_epi32(0, 0, 0, 0, 0, 0, 0, 0, 13, 9, 5, 1, 12, 8, 4, 0);
        _mm512_castps512_ps256(_mm512_permutexvar_ps(idx, t))
    }

    #[inline(always)]
    unsafe fn tile_avx512<const R: usize>(w: &QMatrix, x: &QActs, n: usize, r0: usize) -> [f32; R] {
        let blocks = w.cols / QK;
        let pairs = blocks / 2;
        let xpairs = blocks.div_ceil(2);
        let row = w.q.as_ptr().add(n * w.row_bytes());
        let d = w.d.as_ptr().add(n * blocks);
        let xq = x.q.as_ptr();
        let dpat = x.dpat.as_ptr();
        let mut acc = [_mm512_setzero_ps(); 8];
        // Lanes 0-7 take the first scale of a pair, lanes 8-15 the second.
        let spread = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
        for p in 0..pairs {
            let wq = load_pair_512(w, row, p);
            let two = _mm_castpd_ps(_mm_load_sd(d.add(2 * p) as *const f64));
            let dw = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(two));
            for r in 0..R {
                let xr = r0 + r;
                let xv = _mm512_loadu_si512(xq.add(xr * x.cols + p * 2 * QK) as *const __m512i);
                let dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wq, xv);
                let scale = _mm512_mul_ps(dw, _mm512_loadu_ps(dpat.add((xr * xpairs + p) * 16)));
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc[r]);
            }
        }
        let mut out = [0f32; 8];
        _mm256_storeu_ps(out.as_mut_ptr(), reduce8(acc));
        if blocks % 2 == 1 {
            // A trailing odd block: 256-bit, low nibbles / first 32 bytes of its pair slot.
            let b = blocks - 1;
            let wv = match w.packing {
                Packing::Nibbles => _mm256_and_si256(_mm256_loadu_si256(row.add(pairs * QK) as *const __m256i), _mm256_set1_epi8(0x0F)),
                Packing::Bytes => _mm256_loadu_si256(row.add(b * QK) as *const __m256i),
            };
            for r in 0..R {
                let xr = r0 + r;
                let xv = _mm256_loadu_si256(xq.add(xr * x.cols + b * QK) as *const __m256i);
                let dot = _mm256_dpbusd_epi32(_mm256_setzero_si256(), wv, xv);
                out[r] += hsum_i32(dot) as f32 * (*d.add(b) * x.d[xr * blocks + b]);
            }
        }
        let mut res = [0f32; R];
        res.copy_from_slice(&out[..R]);
        res
    }

    #[inline(always)]
    unsafe fn hsum_i32(v: __m256i) -> i32 {
        let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
        _mm_cvtsi128_si32(s)
    }

    #[inline(always)]
    unsafe fn hsum_ps(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// 32 unsigned quants of block `b` of a row.
    #[inline(always)]
    unsafe fn load_block_256(w: &QMatrix, row: *const u8, b: usize) -> __m256i {
        match w.packing {
            Packing::Nibbles => {
                let v = _mm256_loadu_si256(row.add((b / 2) * QK) as *const __m256i);
                let v = if b % 2 == 0 { v } else { _mm256_srli_epi16(v, 4) };
                _mm256_and_si256(v, _mm256_set1_epi8(0x0F))
            }
            Packing::Bytes => _mm256_loadu_si256(row.add(b * QK) as *const __m256i),
        }
    }

    #[inline(always)]
    unsafe fn tile_avx2<const R: usize>(w: &QMatrix, x: &QActs, n: usize, r0: usize) -> [f32; R] {
        let blocks = w.cols / QK;
        let row = w.q.as_ptr().add(n * w.row_bytes());
        let mut acc = [_mm256_setzero_ps(); R];
        let ones = _mm256_set1_epi16(1);
        // vpmaddubsw saturates pairs at i16: fine for 4-bit quants (2·15·127), not for bytes
        // (2·255·127). Bytes are shifted back to signed and multiplied as |w| · (x with w's
        // sign); that product is the whole dot, so the offset term written first is undone.
        let signed = w.packing == Packing::Bytes;
        for b in 0..blocks {
            let mut wv = load_block_256(w, row, b);
            let mut abs = wv;
            if signed {
                wv = _mm256_xor_si256(wv, _mm256_set1_epi8(-128));
                abs = _mm256_sign_epi8(wv, wv);
            }
            let dw = *w.d.get_unchecked(n * blocks + b);
            for r in 0..R {
                let xr = r0 + r;
                let mut xv = _mm256_loadu_si256(x.q.as_ptr().add(xr * x.cols + b * QK) as *const __m256i);
                if signed {
                    xv = _mm256_sign_epi8(xv, wv);
                }
                let dot = _mm256_madd_epi16(_mm256_maddubs_epi16(abs, xv), ones);
                let scale = _mm256_set1_ps(dw * *x.d.get_unchecked(xr * blocks + b));
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), scale, acc[r]);
            }
        }
        let mut out = [0f32; R];
        for r in 0..R {
            out[r] = hsum_ps(acc[r]);
        }
        out
    }

    macro_rules! driver {
        ($name:ident, $tile:ident, $features:literal, $replaces_offset:expr) => {
            #[target_feature(enable = $features)]
            pub(super) unsafe fn $name(w: &QMatrix, x: &QActs, n0: usize, n1: usize, out: *mut f32) {
                let replace = $replaces_offset(w);
                let mut r0 = 0;
                while r0 < x.rows {
                    let left = x.rows - r0;
                    macro_rules! tile {
                        ($r:expr) => {{
                            for n in n0..n1 {
                                let sums = $tile::<$r>(w, x, n, r0);
                                for (r, s) in sums.iter().enumerate() {
                                    let o = out.add((r0 + r) * w.rows + n);
                                    if replace {
                                        *o = *s;
                                    } else {
                                        *o += *s;
                                    }
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
        };
    }

    driver!(run_avx2, tile_avx2, "avx2,fma", |w: &QMatrix| w.packing == Packing::Bytes);
    driver!(run_avx512, tile_avx512, "avx2,fma,avx512f,avx512vl,avx512bw,avx512vnni", |_: &QMatrix| false);
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::cpu::random_f32 as random;

    /// GGUF Q4_1 bytes for f32 values (min/max quantization), for tests.
    fn q4_1_raw(v: &[f32]) -> Vec<u8> {
        let mut raw = Vec::new();
        for block in v.chunks_exact(QK) {
            let (lo, hi) = block.iter().fold((f32::MAX, f32::MIN), |(a, b), &x| (a.min(x), b.max(x)));
            let d = (hi - lo) / 15.0;
            raw.extend(half::f16::from_f32(d).to_bits().to_le_bytes());
            raw.extend(half::f16::from_f32(lo).to_bits().to_le_bytes());
            let code = |x: f32| if d > 0.0 { ((x - lo) / d).round().clamp(0.0, 15.0) as u8 } else { 0 };
            for j in 0..16 {
                raw.push(code(block[j]) | (code(block[j + 16]) << 4));
            }
        }
        raw
    }

    /// Every kernel against the dequantized weights times the dequantized activations in
    /// f64, for even and odd block counts and batch sizes that exercise every tile width.
    #[test]
    fn kernels_match_the_dequantized_product() {
        for (rows, cols) in [(70, 128), (45, 96)] {
            let wf = random(rows * cols, 1);
            for w in [QMatrix::from_q4_1(&q4_1_raw(&wf), rows, cols), QMatrix::q8_0_from_f32(&wf, rows, cols)] {
                let mut wd = vec![0f32; rows * cols];
                for r in 0..rows {
                    w.dequantize_row(r, &mut wd[r * cols..(r + 1) * cols]);
                }
                for batch in [1, 3, 8, 13] {
                    let xf = random(batch * cols, 7 + batch as u64);
                    let mut x = QActs::default();
                    x.quantize(&xf, batch, cols);
                    let xd: Vec<f32> = (0..batch * cols).map(|i| x.d[i / QK] * x.q[i] as f32).collect();
                    let mut kernels = vec![Kernel::Portable];
                    if Kernel::detect() != Kernel::Portable {
                        kernels.push(Kernel::detect());
                    }
                    #[cfg(target_arch = "x86_64")]
                    if std::arch::is_x86_feature_detected!("avx2") {
                        kernels.push(Kernel::Avx2);
                    }
                    for kernel in kernels {
                        let mut out = vec![f32::NAN; batch * rows];
                        qmatmul_with(kernel, &w, &x, &mut out, &crate::cpu::Rayon(1));
                        for r in 0..batch {
                            for n in 0..rows {
                                let want: f64 = (0..cols).map(|k| xd[r * cols + k] as f64 * wd[n * cols + k] as f64).sum();
                                let got = out[r * rows + n] as f64;
                                // Q4_1's offset term uses Q8_1's f16-rounded block sums, as candle does.
                                assert!((got - want).abs() < 2e-2 * (1.0 + want.abs()), "{kernel:?} {} {rows}x{cols} batch {batch} ({r},{n}): {got} vs {want}", w.source);
                            }
                        }
                    }
                    let mut threaded = vec![0f32; batch * rows];
                    qmatmul(&w, &x, &mut threaded, &crate::cpu::team::Team::new(2, "test").unwrap());
                    let mut single = vec![0f32; batch * rows];
                    qmatmul(&w, &x, &mut single, &crate::cpu::Rayon(1));
                    assert_eq!(threaded, single);
                }
            }
        }
    }

    #[test]
    fn rounding_is_half_away_from_zero() {
        for x in [0.5f32, -0.5, 1.5, -1.5, 2.4999998, 0.49999997, -126.5, 126.49, 0.0, -0.0] {
            assert_eq!(round_away(x), x.round(), "{x}");
        }
    }

    #[test]
    fn simd_kernels_agree_with_the_specification() {
        let (rows, cols) = (33, 192);
        let wf = random(rows * cols, 3);
        let w = QMatrix::from_q4_1(&q4_1_raw(&wf), rows, cols);
        let mut x = QActs::default();
        x.quantize(&random(5 * cols, 9), 5, cols);
        let mut spec = vec![0f32; 5 * rows];
        qmatmul_with(Kernel::Portable, &w, &x, &mut spec, &crate::cpu::Rayon(1));
        let mut fast = vec![0f32; 5 * rows];
        qmatmul_with(Kernel::detect(), &w, &x, &mut fast, &crate::cpu::Rayon(1));
        for (a, b) in spec.iter().zip(&fast) {
            assert!((a - b).abs() <= 1e-5 * (1.0 + a.abs()), "{a} vs {b}");
        }
    }
}
