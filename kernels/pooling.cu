// Pooling and L2 normalization for padding-free encoder batches.
//
// Compiled at warm-up with NVRTC (no nvcc needed, no CUDA headers included) and launched on
// candle's CUDA stream. The Rust twin in src/encoder/pooling.rs is the specification; the GPU
// tests compare the two on random inputs.
//
// Layout: `hidden` holds every input's token states back to back, [total_tokens, dim];
// input i owns rows cu_seqlens[i] .. cu_seqlens[i+1]. `out` is [inputs, dim], float32.
// One block per input; threads stride over the dimensions, then reduce the squared norm.
//
// mode: 0 = CLS (first token), 1 = mean over the input's tokens, 2 = last token.

#define BLOCK 256

__device__ __forceinline__ float load_f32(const float* p) { return *p; }

__device__ __forceinline__ float load_f16(const unsigned short* p) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(*p));
    return f;
}

// Block-wide sum; every thread gets the result.
__device__ float block_sum(float v) {
    __shared__ float partial[BLOCK / 32];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    float total = 0.0f;
    for (int w = 0; w < (int)(blockDim.x >> 5); ++w) total += partial[w];
    __syncthreads();
    return total;
}

template <typename T, float (*LOAD)(const T*)>
__device__ void pool_normalize(const T* hidden, const unsigned int* cu_seqlens, float* out,
                               int dim, int mode, int normalize) {
    const int seq = blockIdx.x;
    const unsigned int start = cu_seqlens[seq];
    const unsigned int end = cu_seqlens[seq + 1];
    float* row = out + (size_t)seq * dim;
    float sq = 0.0f;
    for (int d = threadIdx.x; d < dim; d += blockDim.x) {
        float v = 0.0f;
        if (end > start) {
            if (mode == 0) {
                v = LOAD(hidden + (size_t)start * dim + d);
            } else if (mode == 2) {
                v = LOAD(hidden + (size_t)(end - 1) * dim + d);
            } else {
                for (unsigned int t = start; t < end; ++t) v += LOAD(hidden + (size_t)t * dim + d);
                v *= 1.0f / (float)(end - start);
            }
        }
        row[d] = v;
        sq += v * v;
    }
    if (!normalize) return;
    const float norm = sqrtf(block_sum(sq));
    const float inv = 1.0f / fmaxf(norm, 1e-12f);
    for (int d = threadIdx.x; d < dim; d += blockDim.x) row[d] *= inv;
}

extern "C" __global__ void pool_normalize_f32(const float* hidden, const unsigned int* cu_seqlens, float* out,
                                              int dim, int mode, int normalize) {
    pool_normalize<float, load_f32>(hidden, cu_seqlens, out, dim, mode, normalize);
}

extern "C" __global__ void pool_normalize_f16(const unsigned short* hidden, const unsigned int* cu_seqlens,
                                              float* out, int dim, int mode, int normalize) {
    pool_normalize<unsigned short, load_f16>(hidden, cu_seqlens, out, dim, mode, normalize);
}

// In-place L2 normalization of `rows` vectors of length `dim` (one block per row).
extern "C" __global__ void l2_normalize_f32(float* x, int dim) {
    float* row = x + (size_t)blockIdx.x * dim;
    float sq = 0.0f;
    for (int d = threadIdx.x; d < dim; d += blockDim.x) sq += row[d] * row[d];
    const float inv = 1.0f / fmaxf(sqrtf(block_sum(sq)), 1e-12f);
    for (int d = threadIdx.x; d < dim; d += blockDim.x) row[d] *= inv;
}
