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

use super::{Disjoint, Parallel};
use crate::multiversion;

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
    /// 6-bit (Q6_K): the low four bits laid out as `Nibbles` (256 bytes), then two chunks of
    /// 64 bytes with the top two bits: for each row 4 bytes, byte i holding at bits 2k..2k+2
    /// those of quant 4k+i (first chunk: quants 0..16; second: 16..32). Each half of a block
    /// (16 quants) has its own scale, `d·sc` with an i8 `sc` per half and an f32 `d` per
    /// super-block of 256, and the offset `-32·d·sc`: Q6_K's own numbers, so no loss.
    Sixbits,
}

impl Packing {
    /// Bytes of one group's block (16 rows × 32 quants).
    pub const fn group_block_bytes(self) -> usize {
        match self {
            Packing::Nibbles => LANES * QK / 2,
            Packing::Bytes => LANES * QK,
            Packing::Sixbits => LANES * QK * 3 / 4,
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
    /// Scales, `[group][block][lane]` (`Sixbits`: `[group][super-block][lane]`).
    pub d: Vec<f32>,
    /// Offsets, `[group][block][lane]` (empty for `Sixbits`, whose offsets follow the scales).
    pub m: Vec<f32>,
    /// `Sixbits` only: the i8 scale of each half block, `[group][block][half][lane]`.
    pub sc: Vec<i8>,
    /// Quants, `[group][block]` of `packing.group_block_bytes()` each.
    pub q: Vec<u8>,
    /// The GGML type it came from (for `/info`).
    pub source: &'static str,
    /// Consecutive blocks that share one scale (`Bytes` only; 1 for every GGML format): with
    /// activations quantized over the same spans (`QActs::quantize_spans`), the AVX-512
    /// kernel sums a whole span in integers and converts once per span instead of per block.
    pub span: usize,
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
    /// Per half block (16 values): `d·Σq` in f32, the offset term of Q6_K's half-block scales.
    pub s16: Vec<f32>,
    pub q: Vec<i8>,
    /// Consecutive blocks that share one scale (1 from `quantize`).
    pub span: usize,
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
    if frac >= 0.5 {
        t + 1f32.copysign(x)
    } else {
        t
    }
}

/// Quantizes blocks of 32: per block the f16-rounded scale, Q8_1's and the exact sum terms,
/// and the quants. The plain-Rust body is the specification; the SIMD versions produce the
/// same bits (a test checks), since the quants feed a parity test against mistral.rs.
/// Where a row range's quantized blocks go: per block its scale and sum terms (`s16`:
/// two per block), and the quants.
struct BlockOut<'a> {
    d: &'a mut [f32],
    s_q81: &'a mut [f32],
    s: &'a mut [f32],
    s16: &'a mut [f32],
    q: &'a mut [i8],
}

fn quantize_blocks(x: &[f32], out: &mut BlockOut) {
    #[cfg(target_arch = "x86_64")]
    match crate::cpu::Isa::detect() {
        // SAFETY: `Isa::detect` verified the CPU has these features.
        crate::cpu::Isa::Avx512 => return unsafe { x86::quantize_avx512(x, 1, out) },
        crate::cpu::Isa::Avx2 => return unsafe { x86::quantize_avx2(x, out) },
        _ => {}
    }
    quantize_blocks_portable(x, out)
}

fn quantize_blocks_portable(x: &[f32], out: &mut BlockOut) {
    for (b, block) in x.chunks_exact(QK).enumerate() {
        let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        let id = block_inverse(amax);
        let mut sums = [0i32; 2];
        for (j, (o, v)) in out.q[b * QK..(b + 1) * QK].iter_mut().zip(block).enumerate() {
            let r = round_away(v * id) as i32;
            *o = r as i8;
            sums[j / 16] += r;
        }
        finish_block(amax, sums, b, out);
    }
}

/// The multiplier that maps a block with largest magnitude `amax` onto ±127.
#[inline(always)]
fn block_inverse(amax: f32) -> f32 {
    let scale = amax / 127.0;
    if scale != 0.0 {
        1.0 / scale
    } else {
        0.0
    }
}

/// Stores block `b`'s scale and sum terms, from the integer sums of its two halves.
#[inline(always)]
fn finish_block(amax: f32, halves: [i32; 2], b: usize, out: &mut BlockOut) {
    let d16 = f16_round(amax / 127.0);
    let sum = halves[0] + halves[1];
    out.d[b] = d16;
    out.s_q81[b] = f16_round(f16_round(sum as f32) * d16);
    out.s[b] = d16 * sum as f32;
    out.s16[2 * b] = d16 * halves[0] as f32;
    out.s16[2 * b + 1] = d16 * halves[1] as f32;
}

impl QActs {
    /// Quantizes `x` (`rows × cols`, row-major) into this buffer, reusing its memory.
    pub fn quantize(&mut self, x: &[f32], rows: usize, cols: usize) {
        self.quantize_par(x, rows, cols, &super::Rayon(1));
    }

    /// `quantize`, with rows split across `par` when there are several.
    pub fn quantize_par(&mut self, x: &[f32], rows: usize, cols: usize, par: &dyn Parallel) {
        self.quantize_spans(x, rows, cols, 1, par)
    }

    /// Quantizes with one scale per `span` consecutive blocks of each row (the largest
    /// magnitude of the whole span maps to ±127), for weights quantized the same way
    /// (`QMatrix::q8_from_f32_spans`). Every block still carries its scale and sums, so any
    /// kernel computes the same product; the AVX-512 one converts once per span.
    pub fn quantize_spans(&mut self, x: &[f32], rows: usize, cols: usize, span: usize, par: &dyn Parallel) {
        assert!(span >= 1 && cols.is_multiple_of(QK * span) && x.len() >= rows * cols);
        let blocks = cols / QK;
        self.rows = rows;
        self.cols = cols;
        self.span = span;
        self.d.resize(rows * blocks, 0.0);
        self.s_q81.resize(rows * blocks, 0.0);
        self.s.resize(rows * blocks, 0.0);
        self.s16.resize(rows * blocks * 2, 0.0);
        self.q.resize(rows * cols, 0);
        let ptrs = ActPtrs {
            d: Disjoint::new(self.d.as_mut_ptr()),
            s_q81: Disjoint::new(self.s_q81.as_mut_ptr()),
            s: Disjoint::new(self.s.as_mut_ptr()),
            s16: Disjoint::new(self.s16.as_mut_ptr()),
            q: Disjoint::new(self.q.as_mut_ptr()),
        };
        let tasks = if rows >= 4 { par.threads().min(rows) } else { 1 };
        let per = rows.div_ceil(tasks);
        par.for_each(tasks, &|t| {
            let (r0, r1) = ((t * per).min(rows), ((t + 1) * per).min(rows));
            // SAFETY: task t owns rows r0..r1 of every buffer (all row-major and sized above).
            unsafe { ptrs.quantize_rows(&x[r0 * cols..r1 * cols], r0, r1, blocks, span) };
        });
    }
}

multiversion! {
    /// Quantizes whole spans of `span` blocks: the span's largest magnitude sets one scale,
    /// each block gets that scale and its own sums. The plain-Rust specification of spans
    /// (span 1 is `quantize_blocks_portable`), vectorized by the compiler.
    fn quantize_span_blocks(x: &[f32], span: usize, out: &mut BlockOut<'_>) {
        for (sp, chunk) in x.chunks_exact(span * QK).enumerate() {
            let amax = chunk.iter().fold(0f32, |m, v| m.max(v.abs()));
            let id = block_inverse(amax);
            for (i, block) in chunk.chunks_exact(QK).enumerate() {
                let b = sp * span + i;
                let mut sums = [0i32; 2];
                for (half, (o, v)) in out.q[b * QK..(b + 1) * QK].chunks_exact_mut(16).zip(block.chunks_exact(16)).enumerate() {
                    for (o, v) in o.iter_mut().zip(v) {
                        let r = round_away(v * id) as i32;
                        *o = r as i8;
                        sums[half] += r;
                    }
                }
                finish_block(amax, sums, b, out);
            }
        }
    }
}

/// Raw views of `QActs`'s buffers, so row ranges can be filled by separate tasks.
#[derive(Clone, Copy)]
struct ActPtrs {
    d: Disjoint<f32>,
    s_q81: Disjoint<f32>,
    s: Disjoint<f32>,
    s16: Disjoint<f32>,
    q: Disjoint<i8>,
}

impl ActPtrs {
    /// # Safety
    /// Rows `r0..r1` of every buffer exist and no one else touches them meanwhile.
    unsafe fn quantize_rows(&self, x: &[f32], r0: usize, r1: usize, blocks: usize, span: usize) {
        let n = r1 - r0;
        let d = std::slice::from_raw_parts_mut(self.d.get().add(r0 * blocks), n * blocks);
        let s_q81 = std::slice::from_raw_parts_mut(self.s_q81.get().add(r0 * blocks), n * blocks);
        let s = std::slice::from_raw_parts_mut(self.s.get().add(r0 * blocks), n * blocks);
        let s16 = std::slice::from_raw_parts_mut(self.s16.get().add(r0 * blocks * 2), n * blocks * 2);
        let q = std::slice::from_raw_parts_mut(self.q.get().add(r0 * blocks * QK), n * blocks * QK);
        let mut out = BlockOut { d, s_q81, s, s16, q };
        if span == 1 {
            return quantize_blocks(x, &mut out);
        }
        #[cfg(target_arch = "x86_64")]
        if crate::cpu::Isa::detect() == crate::cpu::Isa::Avx512 {
            // SAFETY: `Isa::detect` verified the CPU has these features.
            return x86::quantize_avx512(x, span, &mut out);
        }
        quantize_span_blocks(x, span, &mut out)
    }
}

impl QMatrix {
    /// Groups of 16 rows (the last one padded).
    pub fn groups(&self) -> usize {
        self.rows.div_ceil(LANES)
    }

    /// Lays out a matrix from its blocks: `block(r, b, codes)` writes row `r`'s 32 quants of
    /// block `b` into `codes` and returns its scale and offset.
    fn build(
        rows: usize,
        cols: usize,
        packing: Packing,
        source: &'static str,
        mut block: impl FnMut(usize, usize, &mut [u8; QK]) -> (f32, f32),
    ) -> QMatrix {
        assert!(cols.is_multiple_of(QK), "width {cols} is not a multiple of {QK}");
        let blocks = cols / QK;
        let groups = rows.div_ceil(LANES);
        let gb = packing.group_block_bytes();
        let mut out = QMatrix {
            rows,
            cols,
            packing,
            d: vec![0.0; groups * blocks * LANES],
            m: vec![0.0; groups * blocks * LANES],
            sc: Vec::new(),
            q: vec![0; groups * blocks * gb],
            source,
            span: 1,
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

    /// Where quant `j` of a block of row `lane` sits in its group's block: byte and bit shift
    /// (for `Sixbits`, of its low four bits; `high_position` has the other two).
    #[inline(always)]
    fn position(packing: Packing, lane: usize, j: usize) -> (usize, u32) {
        match packing {
            Packing::Nibbles | Packing::Sixbits => {
                let jj = j % 16;
                ((jj / 4) * 64 + lane * 4 + jj % 4, if j < 16 { 0 } else { 4 })
            }
            Packing::Bytes => ((j / 4) * 64 + lane * 4 + j % 4, 0),
        }
    }

    /// `Sixbits`: where the top two bits of quant `j` of row `lane` sit: byte and bit shift.
    #[inline(always)]
    fn high_position(lane: usize, j: usize) -> (usize, u32) {
        let jj = j % 16;
        (LANES * QK / 2 + (j / 16) * 64 + lane * 4 + jj % 4, 2 * (jj / 4) as u32)
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

    /// Lays out a `Sixbits` matrix (cols a multiple of 256) from its super-blocks:
    /// `block(r, s, codes, sc)` writes row `r`'s 256 quants (0..63) of super-block `s` and
    /// its 16 half-block scales, and returns the super-block's `d`.
    fn build_sixbits(
        rows: usize,
        cols: usize,
        source: &'static str,
        mut block: impl FnMut(usize, usize, &mut [u8; 256], &mut [i8; 16]) -> f32,
    ) -> QMatrix {
        assert!(cols.is_multiple_of(256), "width {cols} is not a multiple of 256");
        let (blocks, supers, groups) = (cols / QK, cols / 256, rows.div_ceil(LANES));
        let gb = Packing::Sixbits.group_block_bytes();
        let mut out = QMatrix {
            rows,
            cols,
            packing: Packing::Sixbits,
            d: vec![0.0; groups * supers * LANES],
            m: Vec::new(),
            sc: vec![0; groups * blocks * 2 * LANES],
            q: vec![0; groups * blocks * gb],
            source,
            span: 1,
        };
        let (mut codes, mut sc) = ([0u8; 256], [0i8; 16]);
        for r in 0..rows {
            let (g, lane) = (r / LANES, r % LANES);
            for s in 0..supers {
                out.d[(g * supers + s) * LANES + lane] = block(r, s, &mut codes, &mut sc);
                for i in 0..8 {
                    let b = s * 8 + i;
                    for h in 0..2 {
                        out.sc[((g * blocks + b) * 2 + h) * LANES + lane] = sc[2 * i + h];
                    }
                    let dst = &mut out.q[(g * blocks + b) * gb..(g * blocks + b + 1) * gb];
                    for (j, &c) in codes[i * QK..(i + 1) * QK].iter().enumerate() {
                        let (at, shift) = Self::position(Packing::Sixbits, lane, j);
                        dst[at] |= (c & 0x0F) << shift;
                        let (hat, hshift) = Self::high_position(lane, j);
                        dst[hat] |= (c >> 4) << hshift;
                    }
                }
            }
        }
        out
    }

    /// From GGUF Q6_K super-blocks (210 bytes per 256 values: 128 bytes of low nibbles, 64
    /// of top bits, 16 i8 scales (one per 16 values), f16 d): value `d·sc·(q − 32)`, kept as
    /// it is on the `Sixbits` kernels. `cols` must be a multiple of 256.
    pub fn from_q6_k(raw: &[u8], rows: usize, cols: usize) -> QMatrix {
        let supers = cols / 256;
        QMatrix::build_sixbits(rows, cols, "Q6_K", |r, s, codes, sc| {
            let blk = &raw[(r * supers + s) * 210..(r * supers + s + 1) * 210];
            let (ql, qh) = (&blk[..128], &blk[128..192]);
            for (i, c) in codes.iter_mut().enumerate() {
                // ggml's layout: halves of 128; in each, four runs of 32 share ql and qh bytes.
                let (n, k, l) = (i / 128, (i % 128) / 32, i % 32);
                let low = ql[n * 64 + (k % 2) * 32 + l];
                let low = if k < 2 { low & 0x0F } else { low >> 4 };
                *c = low | (((qh[n * 32 + l] >> (2 * k)) & 3) << 4);
            }
            for (v, &b) in sc.iter_mut().zip(&blk[192..208]) {
                *v = b as i8;
            }
            f16_bits(blk[208], blk[209])
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

    /// Quantizes f32 values to 8 bits with one f32 scale per `span` blocks of 32 of each
    /// row (the int8 encoder's weights; see `span`). Stored as `Bytes`, like Q8_0.
    pub fn q8_from_f32_spans(values: &[f32], rows: usize, cols: usize, span: usize) -> QMatrix {
        assert!(span >= 1 && cols.is_multiple_of(QK * span) && values.len() >= rows * cols);
        let spans = cols / (QK * span);
        let scales: Vec<f32> =
            values[..rows * cols].chunks_exact(QK * span).map(|chunk| chunk.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0).collect();
        let mut m = QMatrix::build(rows, cols, Packing::Bytes, "Q8 (int8 encoder)", |r, b, codes| {
            let d = scales[r * spans + b / span];
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            for (c, v) in codes.iter_mut().zip(&values[r * cols + b * QK..r * cols + (b + 1) * QK]) {
                *c = (round_away(v * id) as i32 + 128) as u8;
            }
            (d, -128.0 * d)
        });
        m.span = span;
        m
    }

    /// Index of row `r`'s block `b` in `d` and `m`.
    #[inline(always)]
    fn scale_index(&self, r: usize, b: usize) -> usize {
        ((r / LANES) * (self.cols / QK) + b) * LANES + r % LANES
    }

    /// Quant `j` of block `b` of row `r` (0..15, 0..63 or 0..255).
    #[inline(always)]
    fn code(&self, r: usize, b: usize, j: usize) -> u8 {
        let gb = self.packing.group_block_bytes();
        let base = ((r / LANES) * (self.cols / QK) + b) * gb;
        let (at, shift) = Self::position(self.packing, r % LANES, j);
        let v = self.q[base + at] >> shift;
        match self.packing {
            Packing::Nibbles => v & 0x0F,
            Packing::Bytes => v,
            Packing::Sixbits => {
                let (hat, hshift) = Self::high_position(r % LANES, j);
                (v & 0x0F) | (((self.q[base + hat] >> hshift) & 3) << 4)
            }
        }
    }

    /// `Sixbits`: the scale of half `h` of block `b` of row `r`, `d·sc` (as candle and
    /// llama.cpp compute it, in f32).
    #[inline(always)]
    fn half_scale(&self, r: usize, b: usize, h: usize) -> f32 {
        let (g, lane, blocks) = (r / LANES, r % LANES, self.cols / QK);
        let d = self.d[(g * (blocks / 8) + b / 8) * LANES + lane];
        d * self.sc[((g * blocks + b) * 2 + h) * LANES + lane] as f32
    }

    /// Row `r` as f32 (used for embedding lookups).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        for b in 0..self.cols / QK {
            if self.packing == Packing::Sixbits {
                for j in 0..QK {
                    out[b * QK + j] = self.half_scale(r, b, j / 16) * (self.code(r, b, j) as i32 - 32) as f32;
                }
                continue;
            }
            let i = self.scale_index(r, b);
            let (d, m) = (self.d[i], self.m[i]);
            for j in 0..QK {
                out[b * QK + j] = d * self.code(r, b, j) as f32 + m;
            }
        }
    }

    /// Bytes of weight data (for `/info` and memory accounting).
    pub fn bytes(&self) -> usize {
        4 * (self.d.len() + self.m.len()) + self.sc.len() + self.q.len()
    }

    /// Stacks matrices of the same width and packing (fused projections: q, k and v, or
    /// gate and up, become one matmul).
    pub fn concat(parts: Vec<QMatrix>) -> Result<QMatrix, String> {
        let first = parts.first().ok_or("nothing to concatenate")?;
        let (cols, packing, source) = (first.cols, first.packing, first.source);
        // Fused parts keep a shared span; otherwise every block keeps its own scale.
        let span = if parts.iter().all(|p| p.span == first.span) { first.span } else { 1 };
        if parts.iter().any(|p| p.cols != cols || p.packing != packing) {
            return Err("cannot fuse matrices of different widths or formats".into());
        }
        // Row r of the result: (part, row within it).
        let owner: Vec<(usize, usize)> = parts.iter().enumerate().flat_map(|(i, p)| (0..p.rows).map(move |r| (i, r))).collect();
        if packing == Packing::Sixbits {
            return Ok(QMatrix::build_sixbits(owner.len(), cols, source, |r, s, codes, sc| {
                let (p, local) = owner[r];
                let part = &parts[p];
                for (i, c) in codes.iter_mut().enumerate() {
                    *c = part.code(local, s * 8 + i / QK, i % QK);
                }
                let (g, lane, blocks) = (local / LANES, local % LANES, cols / QK);
                for (i, v) in sc.iter_mut().enumerate() {
                    *v = part.sc[((g * blocks + s * 8 + i / 2) * 2 + i % 2) * LANES + lane];
                }
                part.d[(g * (blocks / 8) + s) * LANES + lane]
            }));
        }
        let mut fused = QMatrix::build(owner.len(), cols, packing, source, |r, b, codes| {
            let (p, local) = owner[r];
            let part = &parts[p];
            for (j, c) in codes.iter_mut().enumerate() {
                *c = part.code(local, b, j);
            }
            let i = part.scale_index(local, b);
            (part.d[i], part.m[i])
        });
        fused.span = span;
        Ok(fused)
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
    qmatmul_inner(kernel, w, x, out, ld, col, par, None)
}

/// What a task does with its outputs once they are computed: `finish(outputs, n0)` gets,
/// row by row, the outputs of the task's weight rows (from weight row `n0` on).
pub type Finish<'a> = &'a (dyn Fn(&mut [f32], usize) + Sync);

/// `qmatmul`, then `finish` on each task's outputs inside the task, while they are in cache:
/// a dense layer's bias and activation without a second pass or parallel step.
pub fn qmatmul_finish(w: &QMatrix, x: &QActs, out: &mut [f32], par: &dyn Parallel, finish: Finish) {
    qmatmul_inner(Kernel::detect(), w, x, out, w.rows, 0, par, Some(finish))
}

// The product's operands and layout, as `qmatmul_columns` takes them, and the finish step.
#[allow(clippy::too_many_arguments)]
fn qmatmul_inner(kernel: Kernel, w: &QMatrix, x: &QActs, out: &mut [f32], ld: usize, col: usize, par: &dyn Parallel, finish: Option<Finish>) {
    assert_eq!(w.cols, x.cols, "qmatmul: widths differ");
    assert!(col + w.rows <= ld, "qmatmul: columns past the row");
    assert!(x.rows == 0 || out.len() >= (x.rows - 1) * ld + col + w.rows, "qmatmul: output too small");
    let blocks = w.cols / QK;
    let groups = w.groups();
    let scales_complete = match w.packing {
        Packing::Sixbits => blocks.is_multiple_of(8) && w.d.len() >= groups * (blocks / 8) * LANES && w.sc.len() >= groups * blocks * 2 * LANES,
        _ => w.d.len() >= groups * blocks * LANES && w.m.len() >= groups * blocks * LANES,
    };
    assert!(w.q.len() >= groups * blocks * w.packing.group_block_bytes() && scales_complete, "qmatmul: weights truncated");
    let n = x.rows * blocks;
    assert!(
        x.q.len() >= x.rows * x.cols && x.d.len() >= n && x.s.len() >= n && x.s_q81.len() >= n && x.s16.len() >= 2 * n,
        "qmatmul: activations truncated"
    );
    // SAFETY: `col` is within `out` (asserted above).
    // Each task writes a disjoint set of output columns (its own weight rows).
    let ptr = Disjoint::new(unsafe { out.as_mut_ptr().add(col) });
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
        if let Some(finish) = finish {
            let (n0, n1) = (g0 * LANES, (g1 * LANES).min(w.rows));
            for r in 0..x.rows {
                // SAFETY: as above: row r's columns n0..n1 are this task's own outputs.
                finish(unsafe { std::slice::from_raw_parts_mut(ptr.get().add(r * ld + n0), n1 - n0) }, n0);
            }
        }
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
        Packing::Sixbits => x.s16.as_ptr(),
    }
}

/// The specification: per block, an exact integer dot scaled by both scales, plus the
/// offset times the activation block's sum.
unsafe fn portable(w: &QMatrix, x: &QActs, g0: usize, g1: usize, out: *mut f32, ld: usize) {
    let blocks = w.cols / QK;
    if w.packing == Packing::Sixbits {
        // Per half block: the integer dot scaled by both scales, plus the offset
        // (-32·d·sc) times the activation half's sum.
        for r in 0..x.rows {
            for n in g0 * LANES..(g1 * LANES).min(w.rows) {
                let mut acc = 0f32;
                for b in 0..blocks {
                    let k = r * blocks + b;
                    let xq = &x.q[r * x.cols + b * QK..r * x.cols + (b + 1) * QK];
                    for h in 0..2 {
                        let dot: i32 = (16 * h..16 * h + 16).map(|j| w.code(n, b, j) as i32 * xq[j] as i32).sum();
                        let dw = w.half_scale(n, b, h);
                        acc += dot as f32 * (dw * x.d[k]) + (-32.0 * dw) * x.s16[2 * k + h];
                    }
                }
                *out.add(r * ld + n) = acc;
            }
        }
        return;
    }
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

    use super::{offset_sums, BlockOut, Packing, QActs, QMatrix, LANES, QK};

    /// Four activation bytes, broadcast to every 32-bit lane.
    #[inline(always)]
    unsafe fn bcast4_512(p: *const i8) -> __m512i {
        _mm512_set1_epi32(std::ptr::read_unaligned(p as *const i32))
    }

    #[inline(always)]
    unsafe fn bcast4_256(p: *const i8) -> __m256i {
        _mm256_set1_epi32(std::ptr::read_unaligned(p as *const i32))
    }

    /// Writes a group's 16 outputs per activation row, leaving out the padding rows of the
    /// last group (`out` rows are `ld` wide).
    #[inline(always)]
    unsafe fn store_group<const R: usize>(acc: &[__m512; R], rows: usize, g: usize, r0: usize, out: *mut f32, ld: usize) {
        let valid = (rows - g * LANES).min(LANES);
        let mask: __mmask16 = if valid == LANES { !0 } else { (1u16 << valid) - 1 };
        for (r, a) in acc.iter().enumerate() {
            _mm512_mask_storeu_ps(out.add((r0 + r) * ld + g * LANES), mask, *a);
        }
    }

    /// Writes half a group's 8 outputs (weight rows from `n0`) per activation row.
    #[inline(always)]
    unsafe fn store_half<const R: usize>(acc: &[__m256; R], rows: usize, n0: usize, r0: usize, out: *mut f32, ld: usize) {
        let valid = rows.saturating_sub(n0).min(8);
        for (r, a) in acc.iter().enumerate() {
            let dst = out.add((r0 + r) * ld + n0);
            if valid == 8 {
                _mm256_storeu_ps(dst, *a);
            } else {
                let mut tmp = [0f32; 8];
                _mm256_storeu_ps(tmp.as_mut_ptr(), *a);
                std::ptr::copy_nonoverlapping(tmp.as_ptr(), dst, valid);
            }
        }
    }

    /// Block `b` of `Bytes` weights (a group's 16 rows × 32 quants at `wq`) against
    /// activation rows `r0..r0+R` of `xq` (rows `cols` apart): the integer dots accumulate
    /// lane-wise into `ia` (quants 0..16) and `ib` (16..32).
    #[inline(always)]
    // The accumulators are a register tile indexed in lockstep with the rows' pointers.
    #[allow(clippy::needless_range_loop)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn bytes_block<const R: usize>(
        wq: *const u8,
        xq: *const i8,
        cols: usize,
        r0: usize,
        b: usize,
        ia: &mut [__m512i; R],
        ib: &mut [__m512i; R],
    ) {
        for c in 0..4 {
            let va = _mm512_loadu_si512(wq.add(c * 64) as *const __m512i);
            let vb = _mm512_loadu_si512(wq.add((c + 4) * 64) as *const __m512i);
            for r in 0..R {
                let xr = xq.add((r0 + r) * cols + b * QK);
                ia[r] = _mm512_dpbusd_epi32(ia[r], va, bcast4_512(xr.add(4 * c)));
                ib[r] = _mm512_dpbusd_epi32(ib[r], vb, bcast4_512(xr.add(16 + 4 * c)));
            }
        }
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
                Packing::Sixbits => unreachable!("Sixbits has its own kernel"),
                Packing::Bytes => bytes_block::<R>(wq, xq, x.cols, r0, b, &mut ia, &mut ib),
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
        store_group(&acc, w.rows, g, r0, out, ld);
    }

    /// `group_avx512` for `Bytes` weights and activations quantized over the same spans of
    /// blocks (`QMatrix::span`): the scales are constant over a span, so its blocks' integer
    /// dots add up exactly before one conversion and two multiply-adds per row, where the
    /// per-block kernel spends as many float instructions per block as integer ones.
    #[inline(always)]
    // The accumulators are a register tile indexed in lockstep with the rows' pointers.
    #[allow(clippy::needless_range_loop)]
    unsafe fn group_avx512_spans<const R: usize>(w: &QMatrix, x: &QActs, g: usize, r0: usize, out: *mut f32, ld: usize) {
        let (blocks, span) = (w.cols / QK, w.span);
        let gb = Packing::Bytes.group_block_bytes();
        let xq = x.q.as_ptr();
        let mut acc = [_mm512_setzero_ps(); R];
        for b0 in (0..blocks).step_by(span) {
            let mut ia = [_mm512_setzero_si512(); R];
            let mut ib = [_mm512_setzero_si512(); R];
            let mut sums = [0f32; R];
            for b in b0..b0 + span {
                bytes_block::<R>(w.q.as_ptr().add((g * blocks + b) * gb), xq, x.cols, r0, b, &mut ia, &mut ib);
                for r in 0..R {
                    sums[r] += *x.s.get_unchecked((r0 + r) * blocks + b);
                }
            }
            let dw = _mm512_loadu_ps(w.d.as_ptr().add((g * blocks + b0) * LANES));
            let mw = _mm512_loadu_ps(w.m.as_ptr().add((g * blocks + b0) * LANES));
            for r in 0..R {
                let dot = _mm512_cvtepi32_ps(_mm512_add_epi32(ia[r], ib[r]));
                let scale = _mm512_mul_ps(dw, _mm512_set1_ps(*x.d.get_unchecked((r0 + r) * blocks + b0)));
                acc[r] = _mm512_fmadd_ps(dot, scale, acc[r]);
                acc[r] = _mm512_fmadd_ps(mw, _mm512_set1_ps(sums[r]), acc[r]);
            }
        }
        store_group(&acc, w.rows, g, r0, out, ld);
    }

    /// Half a group (8 weight rows, `half` 0 or 1) against activation rows `r0..r0+R`.
    ///
    /// `vpmaddubsw` multiplies unsigned by signed bytes into saturating i16 pairs. For
    /// nibbles (2·15·127 per pair) a whole block's eight products per lane still fit in i16
    /// (30,480), so they are summed as i16 and widened once per block. Bytes (up to 255) would
    /// saturate: they are shifted to signed (`u − 128`) and multiplied as |w| · (x with w's
    /// sign), widened per chunk. The shift is paid back in the offset term: `Σ u·x =
    /// Σ (u − 128)·x + 128·Σ x`, so a block adds `(128·d + m)·Σ x`. For Q8_0 and the int8
    /// encoder `m` is `−128·d` and that is exactly zero; for Q5_K (codes 0..31, `m` the
    /// sub-block's min) it is the whole min and shift correction.
    #[inline(always)]
    // The accumulators are a register tile indexed in lockstep with the rows' pointers.
    #[allow(clippy::needless_range_loop)]
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
                Packing::Sixbits => unreachable!("Sixbits has its own kernel"),
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
            // Bytes: the offset plus the shift's correction (see above).
            let offset = if w.packing == Packing::Bytes { _mm256_fmadd_ps(dw, _mm256_set1_ps(128.0), mw) } else { mw };
            for r in 0..R {
                let k = (r0 + r) * blocks + b;
                let scale = _mm256_mul_ps(dw, _mm256_set1_ps(*x.d.get_unchecked(k)));
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots[r]), scale, acc[r]);
                acc[r] = _mm256_fmadd_ps(offset, _mm256_set1_ps(*sums.add(k)), acc[r]);
            }
        }
        store_half(&acc, w.rows, g * LANES + half * 8, r0, out, ld);
    }

    /// Chunk `c`'s top two bits of each quant, from a chunk of top bits, moved to bits 4..6 of
    /// its byte: shifted 16-bit lanes, then masked, so nothing crosses from the other byte.
    #[inline(always)]
    unsafe fn tops_512(h: __m512i, c: usize) -> __m512i {
        let t = match c {
            0 => _mm512_slli_epi16(h, 4),
            1 => _mm512_slli_epi16(h, 2),
            2 => h,
            _ => _mm512_srli_epi16(h, 2),
        };
        _mm512_and_si512(t, _mm512_set1_epi8(0x30))
    }

    #[inline(always)]
    unsafe fn tops_256(h: __m256i, c: usize) -> __m256i {
        let t = match c {
            0 => _mm256_slli_epi16(h, 4),
            1 => _mm256_slli_epi16(h, 2),
            2 => h,
            _ => _mm256_srli_epi16(h, 2),
        };
        _mm256_and_si256(t, _mm256_set1_epi8(0x30))
    }

    /// `group_avx512` for `Sixbits` (Q6_K): the quants rebuilt from their nibbles and top
    /// bits, each half block with its own scale `d·sc` and offset `-32·d·sc`.
    #[inline(always)]
    unsafe fn group_avx512_sixbits<const R: usize>(w: &QMatrix, x: &QActs, g: usize, r0: usize, out: *mut f32, ld: usize) {
        let blocks = w.cols / QK;
        let gb = w.packing.group_block_bytes();
        let xq = x.q.as_ptr();
        let low = _mm512_set1_epi8(0x0F);
        let minus32 = _mm512_set1_ps(-32.0);
        let mut acc = [_mm512_setzero_ps(); R];
        for b in 0..blocks {
            let wq = w.q.as_ptr().add((g * blocks + b) * gb);
            let h0 = _mm512_loadu_si512(wq.add(256) as *const __m512i);
            let h1 = _mm512_loadu_si512(wq.add(320) as *const __m512i);
            let mut ia = [_mm512_setzero_si512(); R];
            let mut ib = [_mm512_setzero_si512(); R];
            for c in 0..4 {
                let v = _mm512_loadu_si512(wq.add(c * 64) as *const __m512i);
                let lo = _mm512_or_si512(_mm512_and_si512(v, low), tops_512(h0, c));
                let hi = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(v, 4), low), tops_512(h1, c));
                for r in 0..R {
                    let xr = xq.add((r0 + r) * x.cols + b * QK);
                    ia[r] = _mm512_dpbusd_epi32(ia[r], lo, bcast4_512(xr.add(4 * c)));
                    ib[r] = _mm512_dpbusd_epi32(ib[r], hi, bcast4_512(xr.add(16 + 4 * c)));
                }
            }
            let d = _mm512_loadu_ps(w.d.as_ptr().add((g * (blocks / 8) + b / 8) * LANES));
            let sc = w.sc.as_ptr().add((g * blocks + b) * 2 * LANES);
            let sa = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(sc as *const __m128i))));
            let sb = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(sc.add(LANES) as *const __m128i))));
            let (ma, mb) = (_mm512_mul_ps(sa, minus32), _mm512_mul_ps(sb, minus32));
            for r in 0..R {
                let k = (r0 + r) * blocks + b;
                let dx = _mm512_set1_ps(*x.d.get_unchecked(k));
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ia[r]), _mm512_mul_ps(sa, dx), acc[r]);
                acc[r] = _mm512_fmadd_ps(ma, _mm512_set1_ps(*x.s16.get_unchecked(2 * k)), acc[r]);
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ib[r]), _mm512_mul_ps(sb, dx), acc[r]);
                acc[r] = _mm512_fmadd_ps(mb, _mm512_set1_ps(*x.s16.get_unchecked(2 * k + 1)), acc[r]);
            }
        }
        store_group(&acc, w.rows, g, r0, out, ld);
    }

    /// `half_avx2` for `Sixbits`: products of quants up to 63 with activations fit a
    /// `vpmaddubsw` pair (16,002), widened per chunk.
    #[inline(always)]
    unsafe fn half_avx2_sixbits<const R: usize>(w: &QMatrix, x: &QActs, g: usize, half: usize, r0: usize, out: *mut f32, ld: usize) {
        let blocks = w.cols / QK;
        let gb = w.packing.group_block_bytes();
        let xq = x.q.as_ptr();
        let low = _mm256_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
        let minus32 = _mm256_set1_ps(-32.0);
        let mut acc = [_mm256_setzero_ps(); R];
        for b in 0..blocks {
            let wq = w.q.as_ptr().add((g * blocks + b) * gb + half * 32);
            let h0 = _mm256_loadu_si256(wq.add(256) as *const __m256i);
            let h1 = _mm256_loadu_si256(wq.add(320) as *const __m256i);
            let mut da = [_mm256_setzero_si256(); R];
            let mut db = [_mm256_setzero_si256(); R];
            for c in 0..4 {
                let v = _mm256_loadu_si256(wq.add(c * 64) as *const __m256i);
                let lo = _mm256_or_si256(_mm256_and_si256(v, low), tops_256(h0, c));
                let hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(v, 4), low), tops_256(h1, c));
                for r in 0..R {
                    let xr = xq.add((r0 + r) * x.cols + b * QK);
                    da[r] = _mm256_add_epi32(da[r], _mm256_madd_epi16(_mm256_maddubs_epi16(lo, bcast4_256(xr.add(4 * c))), ones));
                    db[r] = _mm256_add_epi32(db[r], _mm256_madd_epi16(_mm256_maddubs_epi16(hi, bcast4_256(xr.add(16 + 4 * c))), ones));
                }
            }
            let d = _mm256_loadu_ps(w.d.as_ptr().add((g * (blocks / 8) + b / 8) * LANES + half * 8));
            let sc = w.sc.as_ptr().add((g * blocks + b) * 2 * LANES + half * 8);
            let sa = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(sc as *const __m128i))));
            let sb = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(sc.add(LANES) as *const __m128i))));
            let (ma, mb) = (_mm256_mul_ps(sa, minus32), _mm256_mul_ps(sb, minus32));
            for r in 0..R {
                let k = (r0 + r) * blocks + b;
                let dx = _mm256_set1_ps(*x.d.get_unchecked(k));
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(da[r]), _mm256_mul_ps(sa, dx), acc[r]);
                acc[r] = _mm256_fmadd_ps(ma, _mm256_set1_ps(*x.s16.get_unchecked(2 * k)), acc[r]);
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(db[r]), _mm256_mul_ps(sb, dx), acc[r]);
                acc[r] = _mm256_fmadd_ps(mb, _mm256_set1_ps(*x.s16.get_unchecked(2 * k + 1)), acc[r]);
            }
        }
        store_half(&acc, w.rows, g * LANES + half * 8, r0, out, ld);
    }

    /// `quantize_blocks` on AVX-512 (`span` 1), and `quantize_span_blocks` (one scale per
    /// `span` blocks): round half away from zero as truncate, then step away from zero where
    /// the dropped fraction is at least one half (exactly `round_away`).
    #[target_feature(enable = "avx2,fma,avx512f,avx512vl,avx512bw,avx512dq")]
    pub(super) unsafe fn quantize_avx512(x: &[f32], span: usize, o: &mut BlockOut) {
        let blocks = (x.len() / QK).min(o.d.len()).min(o.q.len() / QK).min(o.s16.len() / 2);
        let signbit = _mm512_set1_ps(-0.0);
        let one = _mm512_set1_ps(1.0);
        let half = _mm512_set1_ps(0.5);
        for b0 in (0..blocks).step_by(span) {
            let end = (b0 + span).min(blocks);
            let mut m = _mm512_setzero_ps();
            for b in b0..end {
                let p = x.as_ptr().add(b * QK);
                let (v0, v1) = (_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16)));
                m = _mm512_max_ps(m, _mm512_max_ps(_mm512_andnot_ps(signbit, v0), _mm512_andnot_ps(signbit, v1)));
            }
            let amax = _mm512_reduce_max_ps(m);
            let id = _mm512_set1_ps(super::block_inverse(amax));
            let round = |v: __m512| {
                let t = _mm512_mul_ps(v, id);
                let tr = _mm512_roundscale_ps(t, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
                let frac = _mm512_andnot_ps(signbit, _mm512_sub_ps(t, tr));
                let away = _mm512_or_ps(one, _mm512_and_ps(signbit, t));
                let up = _mm512_cmp_ps_mask(frac, half, _CMP_GE_OQ);
                _mm512_cvtps_epi32(_mm512_mask_add_ps(tr, up, tr, away))
            };
            for b in b0..end {
                let p = x.as_ptr().add(b * QK);
                let (i0, i1) = (round(_mm512_loadu_ps(p)), round(_mm512_loadu_ps(p.add(16))));
                let out = o.q.as_mut_ptr().add(b * QK);
                _mm_storeu_si128(out as *mut __m128i, _mm512_cvtepi32_epi8(i0));
                _mm_storeu_si128(out.add(16) as *mut __m128i, _mm512_cvtepi32_epi8(i1));
                super::finish_block(amax, [_mm512_reduce_add_epi32(i0), _mm512_reduce_add_epi32(i1)], b, o);
            }
        }
    }

    /// `quantize_blocks` on AVX2, the same arithmetic in four 8-lane vectors.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn quantize_avx2(x: &[f32], o: &mut BlockOut) {
        let blocks = (x.len() / QK).min(o.d.len()).min(o.q.len() / QK).min(o.s16.len() / 2);
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
            _mm256_storeu_si256(o.q.as_mut_ptr().add(b * QK) as *mut __m256i, bytes);
            let hsum = |t: __m256i| {
                let t = _mm_add_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1));
                let t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0b01_00_11_10));
                let t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0b10_11_00_01));
                _mm_cvtsi128_si32(t)
            };
            let halves = [hsum(_mm256_add_epi32(i[0], i[1])), hsum(_mm256_add_epi32(i[2], i[3]))];
            super::finish_block(amax, halves, b, o);
        }
    }

    /// Activation rows in tiles of `$big`, then 4, 2 and 1, for each unit of weights.
    macro_rules! tiles {
        ($rows:expr, $big:literal, |$r0:ident, $r:ident| $body:expr) => {{
            let mut $r0 = 0;
            while $r0 < $rows {
                let left = $rows - $r0;
                if left >= $big {
                    {
                        const $r: usize = $big;
                        $body
                    }
                    $r0 += $big;
                } else if left >= 4 {
                    {
                        const $r: usize = 4;
                        $body
                    }
                    $r0 += 4;
                } else if left >= 2 {
                    {
                        const $r: usize = 2;
                        $body
                    }
                    $r0 += 2;
                } else {
                    {
                        const $r: usize = 1;
                        $body
                    }
                    $r0 += 1;
                }
            }
        }};
    }

    /// Groups `g0..g1`, each kept in L1 while every tile of activation rows passes over it.
    #[target_feature(enable = "avx2,fma,avx512f,avx512vl,avx512bw,avx512vnni")]
    pub(super) unsafe fn run_avx512(w: &QMatrix, x: &QActs, g0: usize, g1: usize, out: *mut f32, ld: usize) {
        for g in g0..g1 {
            if w.packing == Packing::Sixbits {
                tiles!(x.rows, 8, |r0, R| group_avx512_sixbits::<R>(w, x, g, r0, out, ld));
            } else if w.packing == Packing::Bytes && w.span > 1 && x.span == w.span {
                tiles!(x.rows, 8, |r0, R| group_avx512_spans::<R>(w, x, g, r0, out, ld));
            } else {
                tiles!(x.rows, 8, |r0, R| group_avx512::<R>(w, x, g, r0, out, ld));
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn run_avx2(w: &QMatrix, x: &QActs, g0: usize, g1: usize, out: *mut f32, ld: usize) {
        for g in g0..g1 {
            for half in 0..2 {
                if g * LANES + half * 8 >= w.rows {
                    continue;
                }
                if w.packing == Packing::Sixbits {
                    tiles!(x.rows, 4, |r0, R| half_avx2_sixbits::<R>(w, x, g, half, r0, out, ld));
                } else {
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

    /// GGUF K-quant super-blocks of random bytes with sane f16 scales (bytes 0..4 for Q4_K and
    /// Q5_K; the last two for Q6_K, whose i8 scales are random).
    fn k_raw(rows: usize, cols: usize, block_bytes: usize, seed: u64) -> Vec<u8> {
        let noise = random(rows * cols / 256 * block_bytes, seed);
        let mut raw: Vec<u8> = noise.iter().map(|v| ((v + 1.0) * 127.9) as u8).collect();
        for blk in raw.chunks_exact_mut(block_bytes) {
            if block_bytes == 210 {
                blk[208..210].copy_from_slice(&half::f16::from_f32(0.0021).to_bits().to_le_bytes());
            } else {
                blk[0..2].copy_from_slice(&half::f16::from_f32(0.0123).to_bits().to_le_bytes());
                blk[2..4].copy_from_slice(&half::f16::from_f32(0.0041).to_bits().to_le_bytes());
            }
        }
        raw
    }

    /// Every kernel against the dequantized weights times the dequantized activations in
    /// f64, for even and odd block counts and batch sizes that exercise every tile width.
    #[test]
    fn kernels_match_the_dequantized_product() {
        for (rows, cols) in [(70, 128), (45, 96), (37, 512)] {
            let wf = random(rows * cols, 1);
            let mut matrices = vec![QMatrix::from_q4_1(&q4_1_raw(&wf), rows, cols), QMatrix::q8_0_from_f32(&wf, rows, cols)];
            if cols % 256 == 0 {
                matrices.push(QMatrix::from_q4_k(&k_raw(rows, cols, 144, 4), rows, cols));
                // Bytes whose codes are not shifted by 128 (0..31, with a real min): the
                // AVX2 kernel once dropped the min on these.
                matrices.push(QMatrix::from_q5_k(&k_raw(rows, cols, 176, 6), rows, cols));
                matrices.push(QMatrix::from_q6_k(&k_raw(rows, cols, 210, 5), rows, cols));
            }
            for w in matrices {
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
                                assert!(
                                    (got - want).abs() < 2e-2 * (1.0 + want.abs()),
                                    "{kernel:?} {} {rows}x{cols} batch {batch} ({r},{n}): {got} vs {want}",
                                    w.source
                                );
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
        let run = |f: &dyn Fn(&mut BlockOut)| {
            let (mut d, mut a, mut b, mut h, mut q) =
                (vec![0f32; blocks], vec![0f32; blocks], vec![0f32; blocks], vec![0f32; 2 * blocks], vec![0i8; x.len()]);
            f(&mut BlockOut { d: &mut d, s_q81: &mut a, s: &mut b, s16: &mut h, q: &mut q });
            (d, a, b, h, q)
        };
        let spec = run(&|o| quantize_blocks_portable(&x, o));
        assert_eq!(spec, run(&|o| quantize_blocks(&x, o)));
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            assert_eq!(spec, run(&|o| unsafe { x86::quantize_avx2(&x, o) }));
        }
        // The half sums add up to the block's.
        for b in 0..blocks {
            let (halves, whole) = (spec.3[2 * b] + spec.3[2 * b + 1], spec.2[b]);
            assert!((halves - whole).abs() <= 1e-6 * (1.0 + whole.abs()), "block {b}: {halves} vs {whole}");
        }
    }

    /// K-quant super-blocks of random bytes with sane f16 scales, loaded by `load`, give
    /// exactly the values candle dequantizes from the same bytes.
    fn matches_candle(dtype: candle_core::quantized::GgmlDType, block_bytes: usize, load: fn(&[u8], usize, usize) -> QMatrix) {
        use candle_core::quantized::{QStorage, QTensor};
        let (rows, cols) = (5, 512);
        let raw = k_raw(rows, cols, block_bytes, 31);
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

    #[test]
    fn q6_k_matches_candles_dequantization() {
        matches_candle(candle_core::quantized::GgmlDType::Q6K, 210, QMatrix::from_q6_k);
    }

    /// Q6_K matrices fused row-wise keep every row exactly.
    #[test]
    fn six_bit_matrices_fuse() {
        let (a, b) = (QMatrix::from_q6_k(&k_raw(20, 512, 210, 8), 20, 512), QMatrix::from_q6_k(&k_raw(7, 512, 210, 9), 7, 512));
        let both = QMatrix::concat(vec![a.clone(), b.clone()]).unwrap();
        let (mut want, mut got) = (vec![0f32; 512], vec![0f32; 512]);
        for r in 0..27 {
            if r < 20 {
                a.dequantize_row(r, &mut want)
            } else {
                b.dequantize_row(r - 20, &mut want)
            }
            both.dequantize_row(r, &mut got);
            assert_eq!(want, got, "row {r}");
        }
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

    /// Weights and activations quantized over spans of blocks: the span kernel agrees with
    /// the specification (which reads each block's replicated scale), and the quantizer with
    /// its definition (one scale per span, every value within half a step).
    #[test]
    fn span_quantization_and_kernel_agree_with_the_specification() {
        for (rows, cols, span, batch) in [(33, 384, 4, 13), (40, 1536, 4, 9), (17, 384, 12, 3), (16, 256, 2, 1)] {
            let wf = random(rows * cols, 31);
            let w = QMatrix::q8_from_f32_spans(&wf, rows, cols, span);
            let mut row = vec![0f32; cols];
            for r in 0..rows {
                w.dequantize_row(r, &mut row);
                for (sp, (got, want)) in row.chunks_exact(QK * span).zip(wf[r * cols..(r + 1) * cols].chunks_exact(QK * span)).enumerate() {
                    let step = want.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
                    for (g, v) in got.iter().zip(want) {
                        assert!((g - v).abs() <= 0.5 * step * (1.0 + 1e-5), "row {r} span {sp}: {g} vs {v}");
                    }
                }
            }
            let mut xf = random(batch * cols, 32);
            xf[..QK].fill(0.0); // a zero block inside a span
            let mut x = QActs::default();
            x.quantize_spans(&xf, batch, cols, span, &crate::cpu::Rayon(2));
            let blocks = cols / QK;
            // The SIMD quantizer gives the specification's bits.
            let mut spec =
                QActs { d: vec![0.0; batch * blocks], s_q81: vec![0.0; batch * blocks], s: vec![0.0; batch * blocks], ..Default::default() };
            spec.s16 = vec![0.0; 2 * batch * blocks];
            spec.q = vec![0; batch * cols];
            let mut out = BlockOut { d: &mut spec.d, s_q81: &mut spec.s_q81, s: &mut spec.s, s16: &mut spec.s16, q: &mut spec.q };
            quantize_span_blocks(&xf, span, &mut out);
            assert_eq!((&spec.q, &spec.d, &spec.s, &spec.s16), (&x.q, &x.d, &x.s, &x.s16), "span {span}");
            for (k, d) in x.d.iter().enumerate() {
                assert_eq!(*d, x.d[k - k % span], "block {k}: one scale per span");
            }
            for r in 0..batch {
                for b in 0..blocks {
                    let q = &x.q[r * cols + b * QK..r * cols + (b + 1) * QK];
                    let k = r * blocks + b;
                    assert_eq!(x.s[k], x.d[k] * q.iter().map(|&v| v as i32).sum::<i32>() as f32);
                }
            }
            let mut spec = vec![0f32; batch * rows];
            qmatmul_with(Kernel::Portable, &w, &x, &mut spec, &crate::cpu::Rayon(1));
            let mut fast = vec![0f32; batch * rows];
            qmatmul(&w, &x, &mut fast, &crate::cpu::Rayon(2));
            for (a, b) in spec.iter().zip(&fast) {
                assert!((a - b).abs() <= 1e-4 * (1.0 + a.abs()), "{rows}x{cols} span {span}: {a} vs {b}");
            }
            // A finish step sees every output once, with its weight row's index.
            let mut finished = vec![0f32; batch * rows];
            qmatmul_finish(&w, &x, &mut finished, &crate::cpu::Rayon(2), &|outputs, n0| {
                for (j, v) in outputs.iter_mut().enumerate() {
                    *v += (n0 + j) as f32;
                }
            });
            for (i, (f, b)) in finished.iter().zip(&fast).enumerate() {
                assert_eq!(*f, b + (i % rows) as f32, "output {i}");
            }
        }
    }

    #[test]
    fn simd_kernels_agree_with_the_specification() {
        let rows = 33;
        let q4 = QMatrix::from_q4_1(&q4_1_raw(&random(rows * 192, 3)), rows, 192);
        let q6 = QMatrix::from_q6_k(&k_raw(rows, 512, 210, 4), rows, 512);
        for w in [q4, q6] {
            let cols = w.cols;
            let mut x = QActs::default();
            x.quantize(&random(5 * cols, 9), 5, cols);
            let mut spec = vec![0f32; 5 * rows];
            qmatmul_with(Kernel::Portable, &w, &x, &mut spec, &crate::cpu::Rayon(1));
            let mut kernels = vec![Kernel::detect()];
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                kernels.push(Kernel::Avx2);
            }
            for kernel in kernels {
                let mut fast = vec![0f32; 5 * rows];
                qmatmul_with(kernel, &w, &x, &mut fast, &crate::cpu::Rayon(1));
                for (a, b) in spec.iter().zip(&fast) {
                    assert!((a - b).abs() <= 1e-5 * (1.0 + a.abs()), "{kernel:?} {}: {a} vs {b}", w.source);
                }
            }
        }
    }
}
