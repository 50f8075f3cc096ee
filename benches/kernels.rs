//! Micro-benchmarks of our CPU kernels, in isolation: the quantized matmul at the shapes
//! SmolLM2 runs (decode with 1 and 8 rows, prefill with 64), and the f32 dense layer at
//! MiniLM's shapes. Prints multiply-adds per second.
//!
//!     cargo bench --bench kernels

use std::time::Instant;

use edgenode::cpu::gemm::{Epilogue, PackedLinear};
use edgenode::cpu::matmul::linear;
use edgenode::cpu::quant::{qmatmul, QActs, QMatrix};
use edgenode::cpu::random_f32 as random;

fn time(mut f: impl FnMut(), reps: usize) -> f64 {
    f();
    let t = Instant::now();
    for _ in 0..reps {
        f();
    }
    t.elapsed().as_secs_f64() / reps as f64
}

fn main() {
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let team = edgenode::cpu::team::Team::new(threads, "bench").unwrap();
    println!("cpu isa {:?}, kernel {:?}, {threads} threads", edgenode::cpu::Isa::detect(), edgenode::cpu::quant::Kernel::detect());
    for (name, rows, cols) in [("gate_up 3072x576", 3072, 576), ("down 576x1536", 576, 1536), ("vocab 49152x576", 49152, 576)] {
        let w = QMatrix::q8_0_from_f32(&random(rows * cols, 1), rows, cols);
        let w4 = {
            // Q4_1 through the Q8_0 path would not be Q4_1; build real nibbles instead.
            let raw: Vec<u8> = random(rows * cols, 2)
                .chunks_exact(32)
                .flat_map(|b| {
                    let mut blk = vec![0u8; 20];
                    blk[0..2].copy_from_slice(&half::f16::from_f32(0.01).to_bits().to_le_bytes());
                    blk[2..4].copy_from_slice(&half::f16::from_f32(-0.08).to_bits().to_le_bytes());
                    for j in 0..16 {
                        blk[4 + j] = ((b[j].abs() * 15.0) as u8) | (((b[j + 16].abs() * 15.0) as u8) << 4);
                    }
                    blk
                })
                .collect();
            QMatrix::from_q4_1(&raw, rows, cols)
        };
        for batch in [1usize, 8, 64] {
            let mut x = QActs::default();
            x.quantize(&random(batch * cols, 3), batch, cols);
            let mut out = vec![0f32; batch * rows];
            for (fmt, m) in [("Q4_1", &w4), ("Q8_0", &w)] {
                let reps = (2_000_000_000 / (rows * cols * batch)).clamp(3, 2000);
                let s = time(|| qmatmul(m, &x, &mut out, &team), reps);
                let gmacs = (rows * cols * batch) as f64 / s / 1e9;
                println!("qmatmul {fmt} {name} rows={batch:<3} {:>8.1} us  {gmacs:>6.1} GMAC/s", s * 1e6);
            }
        }
    }
    for (name, m, k, n) in
        [("qkv", 400, 384, 1152), ("up", 400, 384, 1536), ("down", 400, 1536, 384), ("qkv single", 12, 384, 1152), ("down single", 12, 1536, 384)]
    {
        let x = random(m * k, 4);
        let w = random(n * k, 5);
        let b = random(n, 6);
        let mut out = vec![0f32; m * n];
        let reps = (4_000_000_000 / (m * n * k)).clamp(3, 2000);
        let s = time(|| linear(&x, &w, &b, &mut out, m, k, n, threads), reps);
        println!("gemm crate  {name} {m}x{k}x{n} {:>8.1} us  {:>6.1} GFLOP/s", s * 1e6, 2.0 * (m * n * k) as f64 / s / 1e9);
        let packed = PackedLinear::new(&w, &b, n, k);
        let s = time(|| packed.forward(&x, m, &mut out, Epilogue::None, &edgenode::cpu::Rayon(threads)), reps);
        println!("packed      {name} {m}x{k}x{n} {:>8.1} us  {:>6.1} GFLOP/s", s * 1e6, 2.0 * (m * n * k) as f64 / s / 1e9);
    }
}
