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
//! 32 (value = d·q + m): Q4_1 as nibbles, Q8_0 as bytes shifted by 128 (m = -128·d). So one
//! kernel serves both: Σ_b d_b·dx_b·(Σ q·x) + Σ_b m_b·(dx_b·Σx).
//!
//! Weights are interleaved in groups of 16 rows (the lanes of a 512-bit register): for each
//! block of 32 columns, four consecutive quants of each of the 16 rows sit side by side, so
//! one load feeds 16 output rows and one broadcast of four activation bytes feeds them all.
//! The integer dot of a whole block then accumulates lane-wise (`vpdpbusd` on AVX-512 VNNI,
//! `vpmaddubsw` on AVX2) with no horizontal reduction, and the scales and offsets of the
//! 16 rows are one vector each: two float multiply-adds per block finish 16 outputs, where a
//! row-major layout needs a reduction per output (llama.cpp's repacked layouts do the same;
//! measured here, 3× the throughput at 1 and at 8 rows: see docs/performance.md).
//!
//! Activations are quantized exactly as candle (and so mistral.rs) quantizes them —
//! the block scale rounded to f16, Q8_1's block sum rounded through f16 — so the two
//! engines' logits agree to float summation order.

use super::Parallel;

/// Elements per quantization block.
pub const QK: usize = 32;
/// Weight rows per interleaved group (one 512-bit register of f32 or i32 lanes).
pub const LANES: usize = 16;

/// How a matrix's quants are packed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Packing {
    /// 4-bit: per group and block, four chunks of 64 bytes; chunk c holds, for each of the
    /// 16 rows, 4 bytes whose low nibbles are the row's quants 4c..4c+4 and whose high
    /// nibbles are its quants 16+4c..16+4c+4.
    Nibbles,
    /// 8-bit: per group and block, eight chunks of 64 bytes; chunk c holds, for each of the
    /// 16 rows, its quants 4c..4c+4.
    Bytes,
}

impl Packing {
    /// Bytes of one group's block (16 rows × 32 quants).
    pub const fn group_block_bytes(self) -> usize {
        match self {
            Packing::Nibbles => LANES * QK / 2,
            Packing::Bytes => LANES * QK,
        }
    }
}

/// A quantized `rows × cols` matrix (PyTorch `Linear` layout: one row per output), stored
/// in interleaved groups of 16 rows (the last group padded with zero rows).
#[derive(Debug, Clone)]
pub struct QMatrix {
    pub rows: usize,
    pub cols: usize,
    pub packing: Packing,
    /// Scales, `[group][block][lane]`.
    pub d: Vec<f32>,
    /// Offsets, `[group][block][lane]`.
    pub m: Vec<f32>,
    /// Quants, `[group][block]` of `packing.group_block_bytes()` each.
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

/// Quantizes blocks of 32: per block the f16-rounded scale, Q8_1's and the exact sum terms,
/// and the quants. The plain-Rust body is the specification; the SIMD versions produce the
/// same bits (a test checks), since the quants feed a parity test against mistral.rs.
fn quantize_blocks(x: &[f32], d: &mut [f32], s_q81: &mut [f32], s: &mut [f32], q: &mut [i8]) {
    #[cfg(target_arch = "x86_64")]
    match crate::cpu::Isa::detect() {
        // SAFETY: `Isa::detect` verified the CPU has these features.
        crate::cpu::Isa::Avx512 => return unsafe { x86::quantize_avx512(x, d, s_q81, s, q) },
        crate::cpu::Isa::Avx2 => return unsafe { x86::quantize_avx2(x, d, s_q81, s, q) },
        _ => {}
    }
    quantize_blocks_portable(x, d, s_q81, s, q)
}

fn quantize_blocks_portable(x: &[f32], d: &mut [f32], s_q81: &mut [f32], s: &mut [f32], q: &mut [i8]) {
    for (b, block) in x.chunks_exact(QK).enumerate() {
        let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        let id = block_inverse(amax);
        let mut sum = 0i32;
        for (o, v) in q[b * QK..(b + 1) * QK].iter_mut().zip(block) {
            let r = round_away(v * id) as i32;
            *o = r as i8;
            sum += r;
        }
        finish_block(amax, sum, b, d, s_q81, s);
    }
}

/// The multiplier that maps a block with largest magnitude `amax` onto ±127.
#[inline(always)]
fn block_inverse(amax: f32) -> f32 {
    let scale = amax / 127.0;
    if scale != 0.0 { 1.0 / scale } else { 0.0 }
}

/// Stores block `b`'s scale and sum terms.
#[inline(always)]
fn finish_block(amax: f32, sum: i32, b: usize, d: &mut [f32], s_q81: &mut [f32], s: &mut [f32]) {
    let d16 = f16_round(amax / 127.0);
    d[b] = d16;
    s_q81[b] = f16_round(f16_round(sum as f32) * d16);
    s[b] = d16 * sum as f32;
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
        self.rows = rows;
        self.cols = cols;
        self.d.resize(rows * blocks, 0.0);
        self.s_q81.resize(rows * blocks, 0.0);
        self.s.resize(rows * blocks, 0.0);
        self.q.resize(rows * cols, 0);
        let ptrs = ActPtrs { d: self.d.as_mut_ptr(), s_q81: self.s_q81.as_mut_ptr(), s: self.s.as_mut_ptr(), q: self.q.as_mut_ptr() };
        let tasks = if rows >= 4 { par.threads().min(rows) } else { 1 };
        let per = rows.div_ceil(tasks);
        par.for_each(tasks, &|t| {
            let (r0, r1) = ((t * per).min(rows), ((t + 1) * per).min(rows));
            // SAFETY: task t owns rows r0..r1 of every buffer (all row-major and sized above).
            unsafe { ptrs.quantize_rows(&x[r0 * cols..r1 * cols], r0, r1, blocks) };
        });
    }
}

/// Raw views of `QActs`'s buffers, so row ranges can be filled by separate tasks.
#[derive(Clone, Copy)]
struct ActPtrs {
    d: *mut f32,
    s_q81: *mut f32,
    s: *mut f32,
    q: *mut i8,
}
// SAFETY: tasks write disjoint row ranges.
unsafe impl Send for ActPtrs {}
unsafe impl Sync for ActPtrs {}

impl ActPtrs {
    /// # Safety
    /// Rows `r0..r1` of every buffer exist and no one else touches them meanwhile.
    unsafe fn quantize_rows(&self, x: &[f32], r0: usize, r1: usize, blocks: usize) {
        let n = r1 - r0;
        let d = std::slice::from_raw_parts_mut(self.d.add(r0 * blocks), n * blocks);
        let s_q81 = std::slice::from_raw_parts_mut(self.s_q81.add(r0 * blocks), n * blocks);
        let s = std::slice::from_raw_parts_mut(self.s.add(r0 * blocks), n * blocks);
        let q = std::slice::from_raw_parts_mut(self.q.add(r0 * blocks * QK), n * blocks * QK);
        quantize_blocks(x, d, s_q81, s, q);
    }
}

impl QMatrix {
    /// Groups of 16 rows (the last one padded).
    pub fn groups(&self) -> usize {
        self.rows.div_ceil(LANES)
    }

    /// Lays out a matrix from its blocks: `block(r, b, codes)` writes row `r`'s 32 quants of
    /// block `b` into `codes` and returns its scale and offset.
    fn build(rows: usize, cols: usize, packing: Packing, source: &'static str, mut block: impl FnMut(usize, usize, &mut [u8; QK]) -> (f32, f32)) -> QMatrix {
        assert!(cols % QK == 0, "width {cols} is not a multiple of {QK}");
        let blocks = cols / QK;
        let groups = rows.div_ceil(LANES);
        let gb = packing.group_block_bytes();
        let mut out = QMatrix {
            rows,
            cols,
            packing,
            d: vec![0.0; groups * blocks * LANES],
            m: vec![0.0; groups * blocks * LANES],
            q: vec![0; groups * blocks * gb],
            source,
        };
        let mut codes = [0u8; QK];
        for r in 0..rows {
            let (g, lane) = (r / LANES, r % LANES);
            for b in 0..blocks {
                let (d, m) = block(r, b, &mut codes);
                out.d[(g * blocks + b) * LANES + lane] = d;
                out.m[(g * blocks + b) * LANES + lane] = m;
                let dst = &mut out.q[(g * blocks + b) * gb..(g * blocks + b + 1) * gb];
                for (j, &c) in codes.iter().enumerate() {
                    let (at, shift) = Self::position(packing, lane, j);
                    dst[at] |= c << shift;
                }
            }
        }
        out
    }

    /// Where quant `j` of a block of row `lane` sits in its group's block: byte and bit shift.
    #[inline(always)]
    fn position(packing: Packing, lane: usize, j: usize) -> (usize, u32) {
        match packing {
            Packing::Nibbles => {
                let jj = j % 16;
                ((jj / 4) * 64 + lane * 4 + jj % 4, if j < 16 { 0 } else { 4 })
            }
            Packing::Bytes => ((j / 4) * 64 + lane * 4 + j % 4, 0),
        }
    }

    /// From GGUF Q4_1 blocks (20 bytes each: f16 d, f16 m, 16 bytes of nibbles with element
    /// j in the low nibble of byte j and element j+16 in its high nibble).
    pub fn from_q4_1(raw: &[u8], rows: usize, cols: usize) -> QMatrix {
        let blocks = cols / QK;
        QMatrix::build(rows, cols, Packing::Nibbles, "Q4_1", |r, b, codes| {
            let blk = &raw[(r * blocks + b) * 20..(r * blocks + b + 1) * 20];
            for j in 0..16 {
                codes[j] = blk[4 + j] & 0x0F;
                codes[j + 16] = blk[4 + j] >> 4;
            }
            (f16_bits(blk[0], blk[1]), f16_bits(blk[2], blk[3]))
        })
    }

    /// From GGUF Q4_K super-blocks (144 bytes per 256 values: f16 d, f16 dmin, 12 bytes
    /// of 6-bit scales and mins for 8 sub-blocks, 128 bytes of nibbles). A sub-block of 32
    /// is `d·sc·q − dmin·m`: a scale and an offset per block of 32, which is exactly this
    /// layout's model, so Q4_K runs on the nibble kernels with no loss (the per-block scale
    /// and offset are computed once here, in f32, as candle and llama.cpp compute them).
    /// `cols` must be a multiple of 256.
    pub fn from_q4_k(raw: &[u8], rows: usize, cols: usize) -> QMatrix {
        let supers = cols / 256;
        QMatrix::build(rows, cols, Packing::Nibbles, "Q4_K", |r, b, codes| {
            let (s, j) = (b / 8, b % 8);
            let blk = &raw[(r * supers + s) * 144..(r * supers + s + 1) * 144];
            let (d, dmin) = (f16_bits(blk[0], blk[1]), f16_bits(blk[2], blk[3]));
            let (sc, m) = k_scale_min(&blk[4..16], j);
            // Sub-blocks 2c and 2c+1 share 32 bytes: low nibbles, then high nibbles.
            let qs = &blk[16 + (j / 2) * 32..16 + (j / 2 + 1) * 32];
            for (c, q) in codes.iter_mut().zip(qs) {
                *c = if j % 2 == 0 { q & 0x0F } else { q >> 4 };
            }
            (d * sc as f32, -(dmin * m as f32))
        })
    }

    /// From GGUF Q5_K super-blocks (176 bytes per 256 values: f16 d, f16 dmin, the same 12
    /// bytes of 6-bit scales and mins as Q4_K, 32 bytes of fifth bits, 128 bytes of
    /// nibbles). A sub-block of 32 is `d·sc·q − dmin·m` with q in 0..32, so Q5_K runs on the
    /// byte kernels with no loss (at 8 bits per quant in memory). `cols` must be a multiple
    /// of 256.
    pub fn from_q5_k(raw: &[u8], rows: usize, cols: usize) -> QMatrix {
        let supers = cols / 256;
        QMatrix::build(rows, cols, Packing::Bytes, "Q5_K", |r, b, codes| {
            let (s, j) = (b / 8, b % 8);
            let blk = &raw[(r * supers + s) * 176..(r * supers + s + 1) * 176];
            let (d, dmin) = (f16_bits(blk[0], blk[1]), f16_bits(blk[2], blk[3]));
            let (sc, m) = k_scale_min(&blk[4..16], j);
            let qh = &blk[16..48];
            // Sub-blocks 2c and 2c+1 share 32 bytes of nibbles; bit j of qh[l] is quant l's
            // fifth bit in sub-block j.
            let qs = &blk[48 + (j / 2) * 32..48 + (j / 2 + 1) * 32];
            for (l, c) in codes.iter_mut().enumerate() {
                let low = if j % 2 == 0 { qs[l] & 0x0F } else { qs[l] >> 4 };
                *c = low | (((qh[l] >> j) & 1) << 4);
            }
            (d * sc as f32, -(dmin * m as f32))
        })
    }

    /// From GGUF Q8_0 blocks (34 bytes each: f16 d, 32 signed bytes).
    pub fn from_q8_0(raw: &[u8], rows: usize, cols: usize) -> QMatrix {
        let blocks = cols / QK;
        QMatrix::build(rows, cols, Packing::Bytes, "Q8_0", |r, b, codes| {
            let blk = &raw[(r * blocks + b) * 34..(r * blocks + b + 1) * 34];
            for (c, &x) in codes.iter_mut().zip(&blk[2..]) {
                *c = (x as i8 as i16 + 128) as u8;
            }
            let d = f16_bits(blk[0], blk[1]);
            (d, -128.0 * d)
        })
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

    /// Index of row `r`'s block `b` in `d` and `m`.
    #[inline(always)]
    fn scale_index(&self, r: usize, b: usize) -> usize {
        ((r / LANES) * (self.cols / QK) + b) * LANES + r % LANES
    }

    /// Quant `j` of block `b` of row `r` (0..15 or 0..255).
    #[inline(always)]
    fn code(&self, r: usize, b: usize, j: usize) -> u8 {
        let gb = self.packing.group_block_bytes();
        let base = ((r / LANES) * (self.cols / QK) + b) * gb;
        let (at, shift) = Self::position(self.packing, r % LANES, j);
        let v = self.q[base + at] >> shift;
        match self.packing {
            Packing::Nibbles => v & 0x0F,
            Packing::Bytes => v,
        }
    }

    /// Row `r` as f32 (used for embedding lookups).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        for b in 0..self.cols / QK {
            let i = self.scale_index(r, b);
            let (d, m) = (self.d[i], self.m[i]);
            for j in 0..QK {
                out[b * QK + j] = d * self.code(r, b, j) as f32 + m;
            }
        }
    }

    /// Bytes of weight data (for `/info` and memory accounting).
    pub fn bytes(&self) -> usize {
        4 * (self.d.len() + self.m.len()) + self.q.len()
    }

    /// Stacks matrices of the same width and packing (fused projections: q, k and v, or
    /// gate and up, become one matmul).
    pub fn concat(parts: Vec<QMatrix>) -> Result<QMatrix, String> {
        let first = parts.first().ok_or("nothing to concatenate")?;
        let (cols, packing, source) = (first.cols, first.packing, first.source);
        if parts.iter().any(|p| p.cols != cols || p.packing != packing) {
            return Err("cannot fuse matrices of different widths or formats".into());
        }
        // Row r of the result: (part, row within it).
        let owner: Vec<(usize, usize)> = parts.iter().enumerate().flat_map(|(i, p)| (0..p.rows).map(move |r| (i, r))).collect();
        Ok(QMatrix::build(owner.len(), cols, packing, source, |r, b, codes| {
            let (p, local) = owner[r];
            let part = &parts[p];
            for (j, c) in codes.iter_mut().enumerate() {
                *c = part.code(local, b, j);
            }
            let i = part.scale_index(local, b);
            (part.d[i], part.m[i])
        }))
    }
}

/// Sub-block `j`'s 6-bit scale and min from the 12 packed bytes Q4_K and Q5_K share.
fn k_scale_min(scales: &[u8], j: usize) -> (u8, u8) {
    if j < 4 {
        (scales[j] & 63, scales[j + 4] & 63)
    } else {
        ((scales[j + 4] & 0xF) | ((scales[j - 4] >> 6) << 4), (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4))
    }
}

fn f16_bits(lo: u8, hi: u8) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([lo, hi])).to_f32()
}

/// Fewest output rows (weight rows) per parallel task.
const MIN_ROWS_PER_TASK: usize = 32;

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
    qmatmul_columns(kernel, w, x, out, w.rows, 0, par)
}

/// `qmatmul` into columns `col..col + w.rows` of an output whose rows are `ld` wide: the
/// parts of a projection stored in different formats (llama.cpp's Q4_K_M keeps some `v`
/// projections in Q6_K beside Q4_K `q` and `k`) fill one output side by side.
pub fn qmatmul_columns(kernel: Kernel, w: &QMatrix, x: &QActs, out: &mut [f32], ld: usize, col: usize, par: &dyn Parallel) {
    assert_eq!(w.cols, x.cols, "qmatmul: widths differ");
    assert!(col + w.rows <= ld, "qmatmul: columns past the row");
    assert!(x.rows == 0 || out.len() >= (x.rows - 1) * ld + col + w.rows, "qmatmul: output too small");
    let blocks = w.cols / QK;
    let groups = w.groups();
    assert!(
        w.q.len() >= groups * blocks * w.packing.group_block_bytes() && w.d.len() >= groups * blocks * LANES && w.m.len() >= groups * blocks * LANES,
        "qmatmul: weights truncated"
    );
    assert!(x.q.len() >= x.rows * x.cols && x.d.len() >= x.rows * blocks && x.s.len() >= x.rows * blocks && x.s_q81.len() >= x.rows * blocks, "qmatmul: activations truncated");
    // SAFETY: `col` is within `out` (asserted above).
    let ptr = OutPtr(unsafe { out.as_mut_ptr().add(col) });
    // Enough tasks for the threads to balance, few enough that each is worth a dispatch.
    let tasks = (w.rows / MIN_ROWS_PER_TASK).clamp(1, par.threads() * 8);
    let per_task = groups.div_ceil(tasks);
    let tasks = groups.div_ceil(per_task);
    let run = |chunk: usize| {
        let g0 = chunk * per_task;
        let g1 = (g0 + per_task).min(groups);
        // SAFETY: groups g0..g1 of `w` exist and its buffers are complete, as are the
        // activations' (asserted); `out` holds x.rows rows of ld values from `col` on
        // (asserted), and this task writes only the columns of its own groups.
        unsafe { kernel.run(w, x, g0, g1, ptr.get(), ld) };
    };
    par.for_each(tasks, &run);
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

    /// Writes the outputs of weight groups `g0..g1` (rows `16·g0..min(16·g1, rows)`) for
    /// every activation row.
    ///
    /// # Safety
    /// `g0..g1` are groups of `w`, whose buffers are complete, as are `x`'s; `out` points at
    /// `x.rows` rows of `ld ≥ w.rows` floats (only the first `w.rows` of each are written).
    unsafe fn run(self, w: &QMatrix, x: &QActs, g0: usize, g1: usize, out: *mut f32, ld: usize) {
        match self {
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Vnni => x86::run_avx512(w, x, g0, g1, out, ld),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => x86::run_avx2(w, x, g0, g1, out, ld),
            Kernel::Portable => portable(w, x, g0, g1, out, ld),
        }
    }
}

/// The block sums the offset term multiplies: Q8_1's for nibbles (as candle's Q4_1 × Q8_1),
/// the exact ones for bytes (as candle's Q8_0 × Q8_0).
fn offset_sums(w: &QMatrix, x: &QActs) -> *const f32 {
    match w.packing {
        Packing::Nibbles => x.s_q81.as_ptr(),
        Packing::Bytes => x.s.as_ptr(),
    }
}

/// The specification: per block, an exact integer dot scaled by both scales, plus the
/// offset times the activation block's sum.
unsafe fn portable(w: &QMatrix, x: &QActs, g0: usize, g1: usize, out: *mut f32, ld: usize) {
    let blocks = w.cols / QK;
    let sums = offset_sums(w, x);
    for r in 0..x.rows {
        for n in g0 * LANES..(g1 * LANES).min(w.rows) {
            let mut acc = 0f32;
            for b in 0..blocks {
                let xq = &x.q[r * x.cols + b * QK..r * x.cols + (b + 1) * QK];
                let dot: i32 = (0..QK).map(|j| w.code(n, b, j) as i32 * xq[j] as i32).sum();
                let i = w.scale_index(n, b);
                acc += dot as f32 * (w.d[i] * x.d[r * blocks + b]) + w.m[i] * *sums.add(r * blocks + b);
            }
            *out.add(r * ld + n) = acc;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{offset_sums, Packing, QActs, QMatrix, LANES, QK};

    /// Four activation bytes, broadcast to every 32-bit lane.
    #[inline(always)]
    unsafe fn bcast4_512(p: *const i8) -> __m512i {
        _mm512_set1_epi32(std::ptr::read_unaligned(p as *const i32))
    }

    #[inline(always)]
    unsafe fn bcast4_256(p: *const i8) -> __m256i {
        _mm256_set1_epi32(std::ptr::read_unaligned(p as *const i32))
    }

    /// One group of 16 weight rows against activation rows `r0..r0+R`: 16 outputs per row.
    #[inline(always)]
    unsafe fn group_avx512<const R: usize>(w: &QMatrix, x: &QActs, g: usize, r0: usize, out: *mut f32, ld: usize) {
        let blocks = w.cols / QK;
        let gb = w.packing.group_block_bytes();
        let sums = offset_sums(w, x);
        let xq = x.q.as_ptr();
        let low = _mm512_set1_epi8(0x0F);
        let mut acc = [_mm512_setzero_ps(); R];
        for b in 0..blocks {
            let wq = w.q.as_ptr().add((g * blocks + b) * gb);
            // Two independent integer chains per row (latency, not throughput, bounds one row).
            let mut ia = [_mm512_setzero_si512(); R];
            let mut ib = [_mm512_setzero_si512(); R];
            match w.packing {
                Packing::Nibbles => {
                    for c in 0..4 {
                        let v = _mm512_loadu_si512(wq.add(c * 64) as *const __m512i);
                        let lo = _mm512_and_si512(v, low);
                        let hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
                        for r in 0..R {
                            let xr = xq.add((r0 + r) * x.cols + b * QK);
                            ia[r] = _mm512_dpbusd_epi32(ia[r], lo, bcast4_512(xr.add(4 * c)));
                            ib[r] = _mm512_dpbusd_epi32(ib[r], hi, bcast4_512(xr.add(16 + 4 * c)));
                        }
                    }
                }
                Packing::Bytes => {
                    for c in 0..4 {
                        let va = _mm512_loadu_si512(wq.add(c * 64) as *const __m512i);
                        let vb = _mm512_loadu_si512(wq.add((c + 4) * 64) as *const __m512i);
                        for r in 0..R {
                            let xr = xq.add((r0 + r) * x.cols + b * QK);
                            ia[r] = _mm512_dpbusd_epi32(ia[r], va, bcast4_512(xr.add(4 * c)));
                            ib[r] = _mm512_dpbusd_epi32(ib[r], vb, bcast4_512(xr.add(16 + 4 * c)));
                        }
                    }
                }
            }
            let dw = _mm512_loadu_ps(w.d.as_ptr().add((g * blocks + b) * LANES));
            let mw = _mm512_loadu_ps(w.m.as_ptr().add((g * blocks + b) * LANES));
            for r in 0..R {
                let k = (r0 + r) * blocks + b;
                let dot = _mm512_cvtepi32_ps(_mm512_add_epi32(ia[r], ib[r]));
                let scale = _mm512_mul_ps(dw, _mm512_set1_ps(*x.d.get_unchecked(k)));
                acc[r] = _mm512_fmadd_ps(dot, scale, acc[r]);
                acc[r] = _mm512_fmadd_ps(mw, _mm512_set1_ps(*sums.add(k)), acc[r]);
            }
        }
        let valid = (w.rows - g * LANES).min(LANES);
        let mask: __mmask16 = if valid == LANES { !0 } else { (1u16 << valid) - 1 };
        for r in 0..R {
            _mm512_mask_storeu_ps(out.add((r0 + r) * ld + g * LANES), mask, acc[r]);
        }
    }

    /// Half a group (8 weight rows, `half` 0 or 1) against activation rows `r0..r0+R`.
    ///
    /// `vpmaddubsw` multiplies unsigned by signed bytes into saturating i16 pairs. For
    /// nibbles (2·15·127 per pair) a whole block's eight products per lane still fit in i16
    /// (30,480), so they are summed as i16 and widened once per block. Bytes (up to 255) would
    /// saturate: they are shifted back to signed and multiplied as |w| · (x with w's sign),
    /// widened per chunk; that product is the whole dot, so no offset term is added.
    #[inline(always)]
    unsafe fn half_avx2<const R: usize>(w: &QMatrix, x: &QActs, g: usize, half: usize, r0: usize, out: *mut f32, ld: usize) {
        let blocks = w.cols / QK;
        let gb = w.packing.group_block_bytes();
        let sums = offset_sums(w, x);
        let xq = x.q.as_ptr();
        let low = _mm256_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); R];
        for b in 0..blocks {
            let wq = w.q.as_ptr().add((g * blocks + b) * gb + half * 32);
            let mut dots = [_mm256_setzero_si256(); R];
            match w.packing {
                Packing::Nibbles => {
                    let mut pairs = [_mm256_setzero_si256(); R];
                    for c in 0..4 {
                        let v = _mm256_loadu_si256(wq.add(c * 64) as *const __m256i);
                        let lo = _mm256_and_si256(v, low);
                        let hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
                        for r in 0..R {
                            let xr = xq.add((r0 + r) * x.cols + b * QK);
                            pairs[r] = _mm256_add_epi16(pairs[r], _mm256_maddubs_epi16(lo, bcast4_256(xr.add(4 * c))));
                            pairs[r] = _mm256_add_epi16(pairs[r], _mm256_maddubs_epi16(hi, bcast4_256(xr.add(16 + 4 * c))));
                        }
                    }
                    for r in 0..R {
                        dots[r] = _mm256_madd_epi16(pairs[r], ones);
                    }
                }
                Packing::Bytes => {
                    for c in 0..8 {
                        let signed = _mm256_xor_si256(_mm256_loadu_si256(wq.add(c * 64) as *const __m256i), _mm256_set1_epi8(-128));
                        let abs = _mm256_sign_epi8(signed, signed);
                        for r in 0..R {
                            let xv = _mm256_sign_epi8(bcast4_256(xq.add((r0 + r) * x.cols + b * QK + 4 * c)), signed);
                            dots[r] = _mm256_add_epi32(dots[r], _mm256_madd_epi16(_mm256_maddubs_epi16(abs, xv), ones));
                        }
                    }
                }
            }
            let at = (g * blocks + b) * LANES + half * 8;
            let dw = _mm256_loadu_ps(w.d.as_ptr().add(at));
            let mw = _mm256_loadu_ps(w.m.as_ptr().add(at));
            for r in 0..R {
                let k = (r0 + r) * blocks + b;
                let scale = _mm256_mul_ps(dw, _mm256_set1_ps(*x.d.get_unchecked(k)));
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots[r]), scale, acc[r]);
                if w.packing == Packing::Nibbles {
                    acc[r] = _mm256_fmadd_ps(mw, _mm256_set1_ps(*sums.add(k)), acc[r]);
                }
            }
        }
        let n0 = g * LANES + half * 8;
        let valid = w.rows.saturating_sub(n0).min(8);
        for r in 0..R {
            let dst = out.add((r0 + r) * ld + n0);
            if valid == 8 {
                _mm256_storeu_ps(dst, acc[r]);
            } else {
                let mut tmp = [0f32; 8];
                _mm256_storeu_ps(tmp.as_mut_ptr(), acc[r]);
                std::ptr::copy_nonoverlapping(tmp.as_ptr(), dst, valid);
            }
        }
    }

    /// `quantize_blocks` on AVX-512: round half away from zero as truncate, then step away
    /// from zero where the dropped fraction is at least one half (exactly `round_away`).
    #[target_feature(enable = "avx2,fma,avx512f,avx512vl,avx512bw,avx512dq")]
    pub(super) unsafe fn quantize_avx512(x: &[f32], d: &mut [f32], s_q81: &mut [f32], s: &mut [f32], q: &mut [i8]) {
        let blocks = (x.len() / QK).min(d.len()).min(q.len() / QK);
        let signbit = _mm512_set1_ps(-0.0);
        let one = _mm512_set1_ps(1.0);
        let half = _mm512_set1_ps(0.5);
        for b in 0..blocks {
            let p = x.as_ptr().add(b * QK);
            let (v0, v1) = (_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16)));
            let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_andnot_ps(signbit, v0), _mm512_andnot_ps(signbit, v1)));
            let id = _mm512_set1_ps(super::block_inverse(amax));
            let round = |v: __m512| {
                let t = _mm512_mul_ps(v, id);
                let tr = _mm512_roundscale_ps(t, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
                let frac = _mm512_andnot_ps(signbit, _mm512_sub_ps(t, tr));
                let away = _mm512_or_ps(one, _mm512_and_ps(signbit, t));
                let up = _mm512_cmp_ps_mask(frac, half, _CMP_GE_OQ);
                _mm512_cvtps_epi32(_mm512_mask_add_ps(tr, up, tr, away))
            };
            let (i0, i1) = (round(v0), round(v1));
            let out = q.as_mut_ptr().add(b * QK);
            _mm_storeu_si128(out as *mut __m128i, _mm512_cvtepi32_epi8(i0));
            _mm_storeu_si128(out.add(16) as *mut __m128i, _mm512_cvtepi32_epi8(i1));
            let sum = _mm512_reduce_add_epi32(_mm512_add_epi32(i0, i1));
            super::finish_block(amax, sum, b, d, s_q81, s);
        }
    }

    /// `quantize_blocks` on AVX2, the same arithmetic in four 8-lane vectors.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn quantize_avx2(x: &[f32], d: &mut [f32], s_q81: &mut [f32], s: &mut [f32], q: &mut [i8]) {
        let blocks = (x.len() / QK).min(d.len()).min(q.len() / QK);
        let signbit = _mm256_set1_ps(-0.0);
        let one = _mm256_set1_ps(1.0);
        let half = _mm256_set1_ps(0.5);
        for b in 0..blocks {
            let p = x.as_ptr().add(b * QK);
            let v = [_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)), _mm256_loadu_ps(p.add(16)), _mm256_loadu_ps(p.add(24))];
            let m = _mm256_max_ps(
                _mm256_max_ps(_mm256_andnot_ps(signbit, v[0]), _mm256_andnot_ps(signbit, v[1])),
                _mm256_max_ps(_mm256_andnot_ps(signbit, v[2]), _mm256_andnot_ps(signbit, v[3])),
            );
            let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
            let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
            let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
            let id = _mm256_set1_ps(super::block_inverse(amax));
            let round = |v: __m256| {
                let t = _mm256_mul_ps(v, id);
                let tr = _mm256_round_ps(t, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
                let frac = _mm256_andnot_ps(signbit, _mm256_sub_ps(t, tr));
                let away = _mm256_or_ps(one, _mm256_and_ps(signbit, t));
                let up = _mm256_cmp_ps(frac, half, _CMP_GE_OQ);
                _mm256_cvtps_epi32(_mm256_add_ps(tr, _mm256_and_ps(up, away)))
            };
            let i = [round(v[0]), round(v[1]), round(v[2]), round(v[3])];
            // i32 → i16 → i8 with saturating packs (values are within ±127, so exact); the packs
            // interleave 128-bit lanes, which the final permute undoes.
            let w01 = _mm256_packs_epi32(i[0], i[1]);
            let w23 = _mm256_packs_epi32(i[2], i[3]);
            let bytes = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(w01, w23), _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            _mm256_storeu_si256(q.as_mut_ptr().add(b * QK) as *mut __m256i, bytes);
            let t = _mm256_add_epi32(_mm256_add_epi32(i[0], i[1]), _mm256_add_epi32(i[2], i[3]));
            let t = _mm_add_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1));
            let t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0b01_00_11_10));
            let t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0b10_11_00_01));
            super::finish_block(amax, _mm_cvtsi128_si32(t), b, d, s_q81, s);
        }
    }

    /// Activation rows in tiles of `$big`, then 4, 2 and 1, for each unit of weights.
    macro_rules! tiles {
        ($rows:expr, $big:literal, |$r0:ident, $r:ident| $body:expr) => {{
            let mut $r0 = 0;
            while $r0 < $rows {
                let left = $rows - $r0;
                if left >= $big {
                    { const $r: usize = $big; $body }
                    $r0 += $big;
                } else if left >= 4 {
                    { const $r: usize = 4; $body }
                    $r0 += 4;
                } else if left >= 2 {
                    { const $r: usize = 2; $body }
                    $r0 += 2;
                } else {
                    { const $r: usize = 1; $body }
                    $r0 += 1;
                }
            }
        }};
    }

    /// Groups `g0..g1`, each kept in L1 while every tile of activation rows passes over it.
    #[target_feature(enable = "avx2,fma,avx512f,avx512vl,avx512bw,avx512vnni")]
    pub(super) unsafe fn run_avx512(w: &QMatrix, x: &QActs, g0: usize, g1: usize, out: *mut f32, ld: usize) {
        for g in g0..g1 {
            tiles!(x.rows, 8, |r0, R| group_avx512::<R>(w, x, g, r0, out, ld));
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn run_avx2(w: &QMatrix, x: &QActs, g0: usize, g1: usize, out: *mut f32, ld: usize) {
        for g in g0..g1 {
            for half in 0..2 {
                if g * LANES + half * 8 < w.rows {
                    tiles!(x.rows, 4, |r0, R| half_avx2::<R>(w, x, g, half, r0, out, ld));
                }
            }
        }
    }
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

    /// The SIMD quantizers produce the specification's bits, ties and zero blocks included.
    #[test]
    fn simd_quantization_is_bit_exact() {
        let mut x = random(64 * QK, 21);
        x[..QK].fill(0.0);
        for (i, v) in x[QK..2 * QK].iter_mut().enumerate() {
            *v = (i as f32 - 16.0) * 0.5; // amax 8: quants hit exact halves
        }
        let blocks = x.len() / QK;
        let spec = {
            let (mut d, mut a, mut b, mut q) = (vec![0f32; blocks], vec![0f32; blocks], vec![0f32; blocks], vec![0i8; x.len()]);
            quantize_blocks_portable(&x, &mut d, &mut a, &mut b, &mut q);
            (d, a, b, q)
        };
        let (mut d, mut a, mut b, mut q) = (vec![0f32; blocks], vec![0f32; blocks], vec![0f32; blocks], vec![0i8; x.len()]);
        quantize_blocks(&x, &mut d, &mut a, &mut b, &mut q);
        assert_eq!(spec, (d, a, b, q));
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            let (mut d, mut a, mut b, mut q) = (vec![0f32; blocks], vec![0f32; blocks], vec![0f32; blocks], vec![0i8; x.len()]);
            unsafe { x86::quantize_avx2(&x, &mut d, &mut a, &mut b, &mut q) };
            assert_eq!(spec, (d, a, b, q));
        }
    }

    /// K-quant super-blocks of random bytes with sane f16 scales, loaded by `load`, give
    /// exactly the values candle dequantizes from the same bytes.
    fn matches_candle(dtype: candle_core::quantized::GgmlDType, block_bytes: usize, load: fn(&[u8], usize, usize) -> QMatrix) {
        use candle_core::quantized::{QStorage, QTensor};
        let (rows, cols) = (5, 512);
        let noise = random(rows * cols / 256 * block_bytes, 31);
        let mut raw: Vec<u8> = noise.iter().map(|v| ((v + 1.0) * 127.9) as u8).collect();
        for blk in raw.chunks_exact_mut(block_bytes) {
            blk[0..2].copy_from_slice(&half::f16::from_f32(0.0123).to_bits().to_le_bytes());
            blk[2..4].copy_from_slice(&half::f16::from_f32(0.0041).to_bits().to_le_bytes());
        }
        let w = load(&raw, rows, cols);
        let storage = QStorage::from_data(std::borrow::Cow::Borrowed(&raw[..]), &candle_core::Device::Cpu, dtype).unwrap();
        let want = QTensor::new(storage, (rows, cols)).unwrap().dequantize(&candle_core::Device::Cpu).unwrap();
        let want: Vec<f32> = want.flatten_all().unwrap().to_vec1().unwrap();
        let mut got = vec![0f32; cols];
        for r in 0..rows {
            w.dequantize_row(r, &mut got);
            for (c, (g, e)) in got.iter().zip(&want[r * cols..(r + 1) * cols]).enumerate() {
                assert!((g - e).abs() <= 1e-6 * (1.0 + e.abs()), "{dtype:?} row {r} col {c}: {g} vs {e}");
            }
        }
    }

    #[test]
    fn q4_k_matches_candles_dequantization() {
        matches_candle(candle_core::quantized::GgmlDType::Q4K, 144, QMatrix::from_q4_k);
    }

    #[test]
    fn q5_k_matches_candles_dequantization() {
        matches_candle(candle_core::quantized::GgmlDType::Q5K, 176, QMatrix::from_q5_k);
    }

    /// Parts in different formats written side by side into one output equal each part's
    /// own product (the mixed-format projections of Q4_K_M files).
    #[test]
    fn parts_fill_their_own_columns() {
        let cols = 64;
        let a = QMatrix::from_q4_1(&q4_1_raw(&random(20 * cols, 5)), 20, cols);
        let b = QMatrix::q8_0_from_f32(&random(7 * cols, 6), 7, cols);
        let mut x = QActs::default();
        x.quantize(&random(3 * cols, 7), 3, cols);
        for kernel in [Kernel::Portable, Kernel::detect()] {
            let (mut pa, mut pb) = (vec![0f32; 3 * 20], vec![0f32; 3 * 7]);
            qmatmul_with(kernel, &a, &x, &mut pa, &crate::cpu::Rayon(1));
            qmatmul_with(kernel, &b, &x, &mut pb, &crate::cpu::Rayon(1));
            let mut out = vec![f32::NAN; 3 * 27];
            qmatmul_columns(kernel, &a, &x, &mut out, 27, 0, &crate::cpu::Rayon(2));
            qmatmul_columns(kernel, &b, &x, &mut out, 27, 20, &crate::cpu::Rayon(2));
            for r in 0..3 {
                assert_eq!(&out[r * 27..r * 27 + 20], &pa[r * 20..(r + 1) * 20], "{kernel:?} row {r}");
                assert_eq!(&out[r * 27 + 20..(r + 1) * 27], &pb[r * 7..(r + 1) * 7], "{kernel:?} row {r}");
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
