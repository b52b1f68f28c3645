// Fused CUDA kernels for the row-wise and elementwise parts of a training step (src/nn/gpu.rs
// launches them; build.rs compiles this file to PTX with nvcc under the `cuda` feature).
//
// Each kernel replaces a chain of 5-40 candle ops (one launch, one allocation and one pass over
// memory each) by one pass. Every kernel exists for f32 and bf16 storage (suffix _f32 / _bf16);
// arithmetic and reductions are f32 whatever the storage. Per-row statistics (rstd, lse) are f32.
// Pointers arrive as 64-bit device addresses, sizes as 32-bit ints (rows, columns) or 64-bit
// element counts.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

typedef __nv_bfloat16 bf16;

__device__ __forceinline__ float ld(float x) { return x; }
__device__ __forceinline__ float ld(bf16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T st(float x);
template <> __device__ __forceinline__ float st<float>(float x) { return x; }
template <> __device__ __forceinline__ bf16 st<bf16>(float x) { return __float2bfloat16(x); }

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum over the block (blockDim.x a multiple of 32); every thread gets the result.
__device__ float block_sum(float v) {
  __shared__ float sh[32];
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // the previous call's readers are done with sh
  if (lane == 0) sh[wid] = v;
  __syncthreads();
  if (wid == 0) {
    float w = lane < nw ? sh[lane] : 0.f;
    w = warp_sum(w);
    if (lane == 0) sh[0] = w;
  }
  __syncthreads();
  return sh[0];
}

// ---------------------------------------------------------------------------------------------
// LayerNorm (center = 1, with beta) and RMSNorm (center = 0, beta = 0) over rows of c; one block
// per row. Writes y, xhat = (x - mean) * rstd, and rstd[row].
template <typename T>
__device__ void norm_fwd(const T* x, const T* gamma, const T* beta, T* y, T* xhat, float* rstd,
                         int c, float eps, int center) {
  const size_t row = blockIdx.x;
  x += row * c; y += row * c; xhat += row * c;
  float mean = 0.f;
  if (center) {
    float s = 0.f;
    for (int i = threadIdx.x; i < c; i += blockDim.x) s += ld(x[i]);
    mean = block_sum(s) / c;
  }
  float s2 = 0.f;
  for (int i = threadIdx.x; i < c; i += blockDim.x) {
    const float d = ld(x[i]) - mean;
    s2 += d * d;
  }
  const float rs = 1.f / sqrtf(block_sum(s2) / c + eps);
  if (threadIdx.x == 0) rstd[row] = rs;
  for (int i = threadIdx.x; i < c; i += blockDim.x) {
    const float h = (ld(x[i]) - mean) * rs;
    xhat[i] = st<T>(h);
    y[i] = st<T>(h * ld(gamma[i]) + (beta ? ld(beta[i]) : 0.f));
  }
}

// dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dy * gamma (no mean(g) term for RMSNorm).
template <typename T>
__device__ void norm_bwd(const T* dy, const T* xhat, const float* rstd, const T* gamma, T* dx,
                         int c, int center) {
  const size_t row = blockIdx.x;
  dy += row * c; xhat += row * c; dx += row * c;
  float sg = 0.f, sgx = 0.f;
  for (int i = threadIdx.x; i < c; i += blockDim.x) {
    const float g = ld(dy[i]) * ld(gamma[i]);
    sg += g;
    sgx += g * ld(xhat[i]);
  }
  sg = block_sum(sg);
  sgx = block_sum(sgx);
  const float mg = center ? sg / c : 0.f, mgx = sgx / c, rs = rstd[row];
  for (int i = threadIdx.x; i < c; i += blockDim.x) {
    dx[i] = st<T>(rs * (ld(dy[i]) * ld(gamma[i]) - mg - ld(xhat[i]) * mgx));
  }
}

// ---------------------------------------------------------------------------------------------
// Elementwise backward formulas and SwiGLU.
#define GRID_STRIDE(i, n) \
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (size_t)gridDim.x * blockDim.x)

// GELU (erf): dy * (Phi(x) + x phi(x)).
template <typename T>
__device__ void gelu_erf_bwd(const T* x, const T* dy, T* dx, size_t n) {
  GRID_STRIDE(i, n) {
    const float v = ld(x[i]);
    const float cdf = 0.5f * (1.f + erff(v * 0.70710678118654752f));
    const float pdf = expf(-0.5f * v * v) * 0.39894228040143268f;
    dx[i] = st<T>(ld(dy[i]) * (cdf + v * pdf));
  }
}

// GELU forward, both forms: x * Phi(x) (erf) or 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
template <typename T>
__device__ void gelu_fwd(const T* x, T* y, size_t n, int tanh_form) {
  GRID_STRIDE(i, n) {
    const float v = ld(x[i]);
    float g;
    if (tanh_form) {
      g = 0.5f * v * (1.f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v)));
    } else {
      g = 0.5f * v * (1.f + erff(v * 0.70710678118654752f));
    }
    y[i] = st<T>(g);
  }
}

// y = x + b broadcast over rows of c (a linear layer's bias): one pass, no strided indexing.
template <typename T>
__device__ void bias_add(const T* x, const T* b, T* y, size_t n, int c) {
  GRID_STRIDE(i, n) y[i] = st<T>(ld(x[i]) + ld(b[i % c]));
}

// y = a + b, same shape.
template <typename T>
__device__ void add(const T* a, const T* b, T* y, size_t n) {
  GRID_STRIDE(i, n) y[i] = st<T>(ld(a[i]) + ld(b[i]));
}

// Inverted dropout with the host's masks (src/nn/cpu.rs dropout_fwd): element i belongs to chunk
// i / 4096, whose SplitMix64 stream starts at seeds[chunk]; its value is that stream's
// (i % 4096 + 1)-th output, which SplitMix64 reaches in closed form (state + k * gamma). Kept when
// the top 32 bits fall below `threshold`: the same masks as the host draws, on any device.
template <typename T>
__device__ void dropout_fwd(const T* x, const uint64_t* seeds, T* y, uint8_t* keep, size_t n,
                            uint32_t threshold, float scale) {
  GRID_STRIDE(i, n) {
    uint64_t z = seeds[i >> 12] + (uint64_t)((i & 4095) + 1) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    const bool kept = (uint32_t)((z ^ (z >> 31)) >> 32) < threshold;
    keep[i] = kept;
    y[i] = st<T>(kept ? ld(x[i]) * scale : 0.0f);
  }
}

// GELU (tanh approximation): dy * (0.5 (1 + t) + 0.5 x (1 - t^2) u'), t = tanh(u).
template <typename T>
__device__ void gelu_tanh_bwd(const T* x, const T* dy, T* dx, size_t n) {
  const float c = 0.7978845608028654f, a = 0.044715f;
  GRID_STRIDE(i, n) {
    const float v = ld(x[i]);
    const float t = tanhf(c * (v + a * v * v * v));
    const float du = c * (1.f + 3.f * a * v * v);
    dx[i] = st<T>(ld(dy[i]) * (0.5f * (1.f + t) + 0.5f * v * (1.f - t * t) * du));
  }
}

template <typename T>
__device__ void swiglu_fwd(const T* g, const T* u, T* y, size_t n) {
  GRID_STRIDE(i, n) {
    const float gv = ld(g[i]);
    y[i] = st<T>(gv / (1.f + expf(-gv)) * ld(u[i]));
  }
}

// dgate = dy * up * s (1 + g (1 - s)), dup = dy * g s, s = sigmoid(g).
template <typename T>
__device__ void swiglu_bwd(const T* g, const T* u, const T* dy, T* dg, T* du, size_t n) {
  GRID_STRIDE(i, n) {
    const float gv = ld(g[i]), d = ld(dy[i]);
    const float s = 1.f / (1.f + expf(-gv));
    dg[i] = st<T>(d * ld(u[i]) * s * (1.f + gv * (1.f - s)));
    du[i] = st<T>(d * gv * s);
  }
}

// ---------------------------------------------------------------------------------------------
// Attention softmax over raw scores s [b, h, t, t2] (unscaled q k^T), one warp per row:
// z = s * scale + mask[b, j] (mask [b, 1, 1, t2], f32, additive), keys after the query's position
// excluded when causal (queries are the last t of t2 positions); p = softmax(z), lse = logsumexp(z).
__device__ __forceinline__ int visible(int row, int t, int t2, int causal) {
  const int i = row % t;
  return causal ? min(i + t2 - t + 1, t2) : t2;
}

template <typename T>
__device__ void softmax_fwd(const T* s, const float* mask, T* p, float* lse, int rows, int h, int t,
                            int t2, float scale, int causal) {
  const int row = (int)(((size_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5);
  const int lane = threadIdx.x & 31;
  if (row >= rows) return;
  const T* sr = s + (size_t)row * t2;
  T* pr = p + (size_t)row * t2;
  const float* m = mask + (size_t)(row / (h * t)) * t2;
  const int n = visible(row, t, t2, causal);
  float mx = -INFINITY;
  for (int j = lane; j < n; j += 32) mx = fmaxf(mx, ld(sr[j]) * scale + m[j]);
  mx = warp_max(mx);
  float sum = 0.f;
  for (int j = lane; j < n; j += 32) sum += expf(ld(sr[j]) * scale + m[j] - mx);
  sum = warp_sum(sum);
  const float inv = 1.f / sum;
  for (int j = lane; j < t2; j += 32) {
    pr[j] = st<T>(j < n ? expf(ld(sr[j]) * scale + m[j] - mx) * inv : 0.f);
  }
  if (lane == 0) lse[row] = mx + logf(sum);
}

// p = exp(s * scale + mask - lse) from the saved per-row log-sum-exp.
template <typename T>
__device__ void softmax_recompute(const T* s, const float* mask, const float* lse, T* p, int rows,
                                  int h, int t, int t2, float scale, int causal) {
  const int row = (int)(((size_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5);
  const int lane = threadIdx.x & 31;
  if (row >= rows) return;
  const T* sr = s + (size_t)row * t2;
  T* pr = p + (size_t)row * t2;
  const float* m = mask + (size_t)(row / (h * t)) * t2;
  const int n = visible(row, t, t2, causal);
  const float l = lse[row];
  for (int j = lane; j < t2; j += 32) {
    pr[j] = st<T>(j < n ? expf(ld(sr[j]) * scale + m[j] - l) : 0.f);
  }
}

// ds = scale * p * (dp - sum(dp * p)) per row.
template <typename T>
__device__ void softmax_bwd(const T* p, const T* dp, T* ds, int rows, int t2, float scale) {
  const int row = (int)(((size_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5);
  const int lane = threadIdx.x & 31;
  if (row >= rows) return;
  const T* pr = p + (size_t)row * t2;
  const T* dr = dp + (size_t)row * t2;
  T* out = ds + (size_t)row * t2;
  float dot = 0.f;
  for (int j = lane; j < t2; j += 32) dot += ld(pr[j]) * ld(dr[j]);
  dot = warp_sum(dot);
  for (int j = lane; j < t2; j += 32) out[j] = st<T>(scale * ld(pr[j]) * (ld(dr[j]) - dot));
}

// ---------------------------------------------------------------------------------------------
// AdamW, out of place (f32 parameters and moments): m' = b1 m + (1 - b1) g, v' = b2 v + (1 - b2)
// g^2, p' = p (1 - lr wd) - lr (m' / bc1) / (sqrt(v' / bc2) + eps).
extern "C" __global__ void st_adamw_f32(const float* p, const float* g, const float* m,
                                        const float* v, float* p2, float* m2, float* v2, size_t n,
                                        float lr, float b1, float b2, float eps, float wd,
                                        float bc1, float bc2) {
  GRID_STRIDE(i, n) {
    const float gi = g[i];
    const float mi = b1 * m[i] + (1.f - b1) * gi;
    const float vi = b2 * v[i] + (1.f - b2) * gi * gi;
    m2[i] = mi;
    v2[i] = vi;
    p2[i] = p[i] * (1.f - lr * wd) - lr * ((mi / bc1) / (sqrtf(vi / bc2) + eps));
  }
}

// ---------------------------------------------------------------------------------------------
// GGUF blocks of 32 weights straight to f32 / bf16 storage, one pass (a quantized frozen base is
// dequantized for every matmul). fmt 0 = Q4_0 (18 bytes: f16 d, 16 bytes of nibbles; w = (q - 8)
// d), 1 = Q4_1 (20 bytes: f16 d, f16 m, nibbles; w = q d + m), 2 = Q8_0 (34 bytes: f16 d, 32
// int8; w = q d). In ggml's layout weight j < 16 of a block is the low nibble of byte j and
// weight j + 16 its high nibble.
template <typename T>
__device__ void dequant(const uint8_t* q, T* y, size_t n, int fmt) {
  GRID_STRIDE(i, n) {
    const size_t b = i >> 5;
    const int j = (int)(i & 31);
    float w;
    if (fmt == 2) {
      const uint8_t* blk = q + b * 34;
      w = __half2float(*reinterpret_cast<const __half*>(blk)) * (float)(int8_t)blk[2 + j];
    } else {
      const int size = fmt == 0 ? 18 : 20;
      const uint8_t* blk = q + b * size;
      const uint8_t* qs = blk + size - 16;
      const int nib = j < 16 ? (qs[j] & 0x0F) : (qs[j - 16] >> 4);
      const float d = __half2float(*reinterpret_cast<const __half*>(blk));
      w = fmt == 0 ? (nib - 8) * d
                   : nib * d + __half2float(*reinterpret_cast<const __half*>(blk + 2));
    }
    y[i] = st<T>(w);
  }
}

// ---------------------------------------------------------------------------------------------
#define INSTANTIATE(T, S)                                                                         \
  extern "C" __global__ void st_norm_fwd_##S(const T* x, const T* gamma, const T* beta, T* y,     \
                                             T* xhat, float* rstd, int c, float eps, int center) { \
    norm_fwd<T>(x, gamma, beta, y, xhat, rstd, c, eps, center);                                   \
  }                                                                                               \
  extern "C" __global__ void st_norm_bwd_##S(const T* dy, const T* xhat, const float* rstd,       \
                                             const T* gamma, T* dx, int c, int center) {          \
    norm_bwd<T>(dy, xhat, rstd, gamma, dx, c, center);                                            \
  }                                                                                               \
  extern "C" __global__ void st_gelu_erf_bwd_##S(const T* x, const T* dy, T* dx, size_t n) {      \
    gelu_erf_bwd<T>(x, dy, dx, n);                                                                \
  }                                                                                               \
  extern "C" __global__ void st_gelu_tanh_bwd_##S(const T* x, const T* dy, T* dx, size_t n) {     \
    gelu_tanh_bwd<T>(x, dy, dx, n);                                                               \
  }                                                                                               \
  extern "C" __global__ void st_gelu_fwd_##S(const T* x, T* y, size_t n, int tanh_form) {        \
    gelu_fwd<T>(x, y, n, tanh_form);                                                              \
  }                                                                                               \
  extern "C" __global__ void st_bias_add_##S(const T* x, const T* b, T* y, size_t n, int c) {     \
    bias_add<T>(x, b, y, n, c);                                                                   \
  }                                                                                               \
  extern "C" __global__ void st_add_##S(const T* a, const T* b, T* y, size_t n) {                 \
    add<T>(a, b, y, n);                                                                           \
  }                                                                                               \
  extern "C" __global__ void st_swiglu_fwd_##S(const T* g, const T* u, T* y, size_t n) {          \
    swiglu_fwd<T>(g, u, y, n);                                                                    \
  }                                                                                               \
  extern "C" __global__ void st_swiglu_bwd_##S(const T* g, const T* u, const T* dy, T* dg, T* du, \
                                               size_t n) {                                        \
    swiglu_bwd<T>(g, u, dy, dg, du, n);                                                           \
  }                                                                                               \
  extern "C" __global__ void st_softmax_fwd_##S(const T* s, const float* mask, T* p, float* lse,  \
                                                int rows, int h, int t, int t2, float scale,      \
                                                int causal) {                                     \
    softmax_fwd<T>(s, mask, p, lse, rows, h, t, t2, scale, causal);                               \
  }                                                                                               \
  extern "C" __global__ void st_softmax_recompute_##S(const T* s, const float* mask,              \
                                                      const float* lse, T* p, int rows, int h,    \
                                                      int t, int t2, float scale, int causal) {   \
    softmax_recompute<T>(s, mask, lse, p, rows, h, t, t2, scale, causal);                         \
  }                                                                                               \
  extern "C" __global__ void st_dropout_fwd_##S(const T* x, const uint64_t* seeds, T* y,           \
                                                uint8_t* keep, size_t n, uint32_t threshold,       \
                                                float scale) {                                     \
    dropout_fwd<T>(x, seeds, y, keep, n, threshold, scale);                                       \
  }                                                                                               \
  extern "C" __global__ void st_dequant_##S(const uint8_t* q, T* y, size_t n, int fmt) {          \
    dequant<T>(q, y, n, fmt);                                                                     \
  }                                                                                               \
  extern "C" __global__ void st_softmax_bwd_##S(const T* p, const T* dp, T* ds, int rows, int t2, \
                                                float scale) {                                    \
    softmax_bwd<T>(p, dp, ds, rows, t2, scale);                                                   \
  }

INSTANTIATE(float, f32)
INSTANTIATE(bf16, bf16)
