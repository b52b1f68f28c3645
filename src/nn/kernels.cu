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

// Elementwise and row kernels read and write 16 bytes at a time (8 bf16 or 4 f32: `Pack<T>::W`)
// where every pointer is 16-byte aligned and the length a multiple of W, a condition uniform over
// the launch; elsewhere one element at a time. Each element gets the same formula either way, so
// elementwise results do not depend on the path (a row kernel's sums add in another order).
template <typename T> struct Pack { static constexpr int W = 16 / sizeof(T); };

__device__ __forceinline__ bool al16(const void* p) { return ((uintptr_t)p & 15) == 0; }

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

// block_sum in f64.
__device__ double block_sum_d(double v) {
  __shared__ double sh[32];
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  __syncthreads();  // the previous call's readers are done with sh
  if (lane == 0) sh[wid] = v;
  __syncthreads();
  if (wid == 0) {
    double w = lane < nw ? sh[lane] : 0.0;
    for (int o = 16; o > 0; o >>= 1) w += __shfl_xor_sync(0xffffffffu, w, o);
    if (lane == 0) sh[0] = w;
  }
  __syncthreads();
  return sh[0];
}

// Max over the block, as block_sum.
__device__ float block_max(float v) {
  __shared__ float sh[32];
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) sh[wid] = v;
  __syncthreads();
  if (wid == 0) {
    float w = lane < nw ? sh[lane] : -INFINITY;
    w = warp_max(w);
    if (lane == 0) sh[0] = w;
  }
  __syncthreads();
  return sh[0];
}

// ---------------------------------------------------------------------------------------------
// V elements at p: one 16-byte access when V is the pack width, else V single ones. Row kernels
// take V as a template parameter (the loops then unroll and the values stay in registers) and pick
// the pack width where every row pointer is aligned and the row length a multiple of it.
template <int V, typename T> __device__ __forceinline__ void getv(const T* p, float* f) {
  if constexpr (V == Pack<T>::W) {
    const uint4 v = *reinterpret_cast<const uint4*>(p);
    const T* e = reinterpret_cast<const T*>(&v);
#pragma unroll
    for (int j = 0; j < V; j++) f[j] = ld(e[j]);
  } else {
#pragma unroll
    for (int j = 0; j < V; j++) f[j] = ld(p[j]);
  }
}

template <int V, typename T> __device__ __forceinline__ void putv(T* p, const float* f) {
  if constexpr (V == Pack<T>::W) {
    uint4 v;
    T* e = reinterpret_cast<T*>(&v);
#pragma unroll
    for (int j = 0; j < V; j++) e[j] = st<T>(f[j]);
    *reinterpret_cast<uint4*>(p) = v;
  } else {
#pragma unroll
    for (int j = 0; j < V; j++) p[j] = st<T>(f[j]);
  }
}

// Calls kernel<W>(...) where `vec`, else kernel<1>(...).
#define BY_WIDTH(T, vec, kernel, ...)                         \
  do {                                                        \
    if (vec) kernel<Pack<T>::W, T>(__VA_ARGS__);              \
    else kernel<1, T>(__VA_ARGS__);                           \
  } while (0)

// Cross-entropy of each row of logits z [n, v] against its target, one block per row (the LM
// head's chunks, `nn/loss.rs`): loss[row] = lse - z[target] in f32 and, when d is not null,
// d = (softmax - onehot) * g in the logits' dtype. Three passes over a row (its max, the sum of
// exp(z - max), the gradient) that stays in L2: the composition ran about ten kernels over f32
// copies of the logits.
template <int V, typename T>
__device__ void cross_entropy_v(const T* z, const uint32_t* targets, float* loss, T* d, int v,
                                float g) {
  float x[V];
  float mx = -INFINITY;
  for (int i = threadIdx.x * V; i < v; i += V * blockDim.x) {
    getv<V>(z + i, x);
#pragma unroll
    for (int j = 0; j < V; j++) mx = fmaxf(mx, x[j]);
  }
  mx = block_max(mx);
  float s = 0.f;
  for (int i = threadIdx.x * V; i < v; i += V * blockDim.x) {
    getv<V>(z + i, x);
#pragma unroll
    for (int j = 0; j < V; j++) s += expf(x[j] - mx);
  }
  s = block_sum(s);
  const int t = (int)targets[blockIdx.x];
  if (threadIdx.x == 0) loss[blockIdx.x] = mx + logf(s) - ld(z[t]);
  if (!d) return;
  const float k = g / s;
  for (int i = threadIdx.x * V; i < v; i += V * blockDim.x) {
    getv<V>(z + i, x);
#pragma unroll
    for (int j = 0; j < V; j++) x[j] = expf(x[j] - mx) * k - (i + j == t ? g : 0.f);
    putv<V>(d + i, x);
  }
}

template <typename T>
__device__ void cross_entropy(const T* z, const uint32_t* targets, float* loss, T* d, int v,
                              float g) {
  const size_t row = blockIdx.x;
  z += row * v;
  if (d) d += row * v;
  const bool vec = v % Pack<T>::W == 0 && al16(z) && (!d || al16(d));
  BY_WIDTH(T, vec, cross_entropy_v, z, targets, loss, d, v, g);
}

// ---------------------------------------------------------------------------------------------
// LayerNorm (center = 1, with beta) and RMSNorm (center = 0, beta = 0) over rows of c; one block
// per row. Writes y, xhat = (x - mean) * rstd (unless xhat is null), and rstd[row].
template <int V, typename T>
__device__ void norm_fwd_v(const T* x, const T* gamma, const T* beta, T* y, T* xhat, float* rstd,
                           int c, float eps, int center) {
  float v[V], w[V], b[V], o[V];
  float mean = 0.f;
  if (center) {
    float s = 0.f;
    for (int i = threadIdx.x * V; i < c; i += V * blockDim.x) {
      getv<V>(x + i, v);
#pragma unroll
      for (int j = 0; j < V; j++) s += v[j];
    }
    mean = block_sum(s) / c;
  }
  float s2 = 0.f;
  for (int i = threadIdx.x * V; i < c; i += V * blockDim.x) {
    getv<V>(x + i, v);
#pragma unroll
    for (int j = 0; j < V; j++) {
      const float d = v[j] - mean;
      s2 += d * d;
    }
  }
  const float rs = 1.f / sqrtf(block_sum(s2) / c + eps);
  if (threadIdx.x == 0) rstd[blockIdx.x] = rs;
  for (int i = threadIdx.x * V; i < c; i += V * blockDim.x) {
    getv<V>(x + i, v);
    getv<V>(gamma + i, w);
    if (beta) getv<V>(beta + i, b);
#pragma unroll
    for (int j = 0; j < V; j++) {
      v[j] = (v[j] - mean) * rs;
      o[j] = v[j] * w[j] + (beta ? b[j] : 0.f);
    }
    if (xhat) putv<V>(xhat + i, v);
    putv<V>(y + i, o);
  }
}

template <typename T>
__device__ void norm_fwd(const T* x, const T* gamma, const T* beta, T* y, T* xhat, float* rstd,
                         int c, float eps, int center) {
  const size_t row = blockIdx.x;
  x += row * c; y += row * c;
  if (xhat) xhat += row * c;
  const bool vec = c % Pack<T>::W == 0 && al16(x) && al16(y) && al16(gamma) &&
                   (!beta || al16(beta)) && (!xhat || al16(xhat));
  BY_WIDTH(T, vec, norm_fwd_v, x, gamma, beta, y, xhat, rstd, c, eps, center);
}

// dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dy * gamma (no mean(g) term for RMSNorm).
// `rows` is xhat, or with `from_output` the RMSNorm's output y = xhat * gamma (xhat = y / gamma).
// With `res` (a residual branch's gradient, else null) dx is res + that, rounded once.
template <int V, typename T>
__device__ void norm_bwd_v(const T* dy, const T* rows, const float* rstd, const T* gamma,
                           const T* res, T* dx, int c, int center, int from_output) {
  float d[V], h[V], w[V], e[V];
  auto load = [&](int i) {
    getv<V>(dy + i, d);
    getv<V>(rows + i, h);
    getv<V>(gamma + i, w);
  };
  float sg = 0.f, sgx = 0.f;
  for (int i = threadIdx.x * V; i < c; i += V * blockDim.x) {
    load(i);
#pragma unroll
    for (int j = 0; j < V; j++) {
      const float g = d[j] * w[j];
      sg += g;
      sgx += from_output ? d[j] * h[j] : g * h[j];
    }
  }
  sg = block_sum(sg);
  sgx = block_sum(sgx);
  const float mg = center ? sg / c : 0.f, mgx = sgx / c, rs = rstd[blockIdx.x];
  for (int i = threadIdx.x * V; i < c; i += V * blockDim.x) {
    load(i);
    if (res) getv<V>(res + i, e);
#pragma unroll
    for (int j = 0; j < V; j++) {
      const float xh = from_output ? h[j] / w[j] : h[j];
      d[j] = rs * (d[j] * w[j] - mg - xh * mgx);
      if (res) d[j] += e[j];
    }
    putv<V>(dx + i, d);
  }
}

template <typename T>
__device__ void norm_bwd(const T* dy, const T* rows, const float* rstd, const T* gamma,
                         const T* res, T* dx, int c, int center, int from_output) {
  const size_t row = blockIdx.x;
  dy += row * c; rows += row * c; dx += row * c;
  if (res) res += row * c;
  const bool vec = c % Pack<T>::W == 0 && al16(dy) && al16(rows) && al16(gamma) && al16(dx) &&
                   (!res || al16(res));
  BY_WIDTH(T, vec, norm_bwd_v, dy, rows, rstd, gamma, res, dx, c, center, from_output);
}

// ---------------------------------------------------------------------------------------------
// Elementwise backward formulas and SwiGLU.
#define GRID_STRIDE(i, n) \
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (size_t)gridDim.x * blockDim.x)

// f(k, x, y) for every element k of NI inputs and NO outputs of n elements (x[a]: input a's value
// at k; f writes y[b], output b's), W elements a thread at a time through 16-byte loads where every
// pointer is aligned and n a multiple of W. An output may be an input (in place): a thread reads
// its elements before writing them.
template <typename T, int NI, int NO, typename F>
__device__ __forceinline__ void map(size_t n, const T* const (&in)[NI], T* const (&out)[NO], F f) {
  constexpr int W = Pack<T>::W;
  bool vec = n % W == 0;
#pragma unroll
  for (int a = 0; a < NI; a++) vec = vec && al16(in[a]);
#pragma unroll
  for (int b = 0; b < NO; b++) vec = vec && al16(out[b]);
  float x[NI], y[NO];
  if (vec) {
    GRID_STRIDE(i, n / W) {
      float xv[NI][W], yv[NO][W];
#pragma unroll
      for (int a = 0; a < NI; a++) getv<W>(in[a] + W * i, xv[a]);
#pragma unroll
      for (int j = 0; j < W; j++) {
#pragma unroll
        for (int a = 0; a < NI; a++) x[a] = xv[a][j];
        f(W * i + j, x, y);
#pragma unroll
        for (int b = 0; b < NO; b++) yv[b][j] = y[b];
      }
#pragma unroll
      for (int b = 0; b < NO; b++) putv<W>(out[b] + W * i, yv[b]);
    }
    return;
  }
  GRID_STRIDE(k, n) {
#pragma unroll
    for (int a = 0; a < NI; a++) x[a] = ld(in[a][k]);
    f(k, x, y);
#pragma unroll
    for (int b = 0; b < NO; b++) out[b][k] = st<T>(y[b]);
  }
}

// GELU (erf): dy * (Phi(x) + x phi(x)).
template <typename T>
__device__ void gelu_erf_bwd(const T* x, const T* dy, T* dx, size_t n) {
  map<T, 2, 1>(n, {x, dy}, {dx}, [](size_t, const float* in, float* out) {
    const float v = in[0];
    const float cdf = 0.5f * (1.f + erff(v * 0.70710678118654752f));
    const float pdf = expf(-0.5f * v * v) * 0.39894228040143268f;
    out[0] = in[1] * (cdf + v * pdf);
  });
}

// GELU forward, both forms: x * Phi(x) (erf) or 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
template <typename T>
__device__ void gelu_fwd(const T* x, T* y, size_t n, int tanh_form) {
  map<T, 1, 1>(n, {x}, {y}, [tanh_form](size_t, const float* in, float* out) {
    const float v = in[0];
    if (tanh_form) {
      out[0] = 0.5f * v * (1.f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v)));
    } else {
      out[0] = 0.5f * v * (1.f + erff(v * 0.70710678118654752f));
    }
  });
}

// y = x + b broadcast over rows of c (a linear layer's bias): one pass, no strided indexing.
template <typename T>
__device__ void bias_add(const T* x, const T* b, T* y, size_t n, int c) {
  map<T, 1, 1>(n, {x}, {y}, [b, c](size_t k, const float* in, float* out) {
    out[0] = in[0] + ld(b[k % c]);
  });
}

// Rotary position embedding (Hugging Face's rotate_half pairing: i with i + half) of the
// [batch, heads, seq, 2*half] rows of x, read and written through element strides (batch, head,
// row; head_dim contiguous), so that splitting the heads out of a projection's output (or merging
// them back) is part of the same pass: y[i] = x[i] cos - x[i+half] sin, y[i+half] = x[i+half] cos +
// x[i] sin at position start + row; sign = -1 rotates by the negated angle (the gradient). cos and
// sin are f32 [positions, half]. One thread per pair, or per W pairs where 16-byte loads apply.
template <int V, typename T>
__device__ void rope_v(const T* x, const float* cos_t, const float* sin_t, T* y, int B, int H, int S,
                       int half, long long xsb, long long xsh, long long xsr, long long ysb,
                       long long ysh, long long ysr, int start, float sign) {
  const int groups = half / V;
  const size_t n = (size_t)B * H * S * groups;
  GRID_STRIDE(i, n) {
    const int c = (int)(i % groups) * V;
    size_t r = i / groups;
    const int s = r % S;
    r /= S;
    const int h = r % H, b = r / H;
    const T* xr = x + b * xsb + h * xsh + s * xsr;
    T* yr = y + b * ysb + h * ysh + s * ysr;
    float x1[V], x2[V];
    getv<V>(xr + c, x1);
    getv<V>(xr + c + half, x2);
#pragma unroll
    for (int j = 0; j < V; j++) {
      const size_t at = (size_t)(start + s) * half + c + j;
      const float co = cos_t[at], si = sign * sin_t[at], a = x1[j], b2 = x2[j];
      x1[j] = a * co - b2 * si;
      x2[j] = b2 * co + a * si;
    }
    putv<V>(yr + c, x1);
    putv<V>(yr + c + half, x2);
  }
}

template <typename T>
__device__ void rope(const T* x, const float* cos_t, const float* sin_t, T* y, int B, int H, int S,
                     int half, long long xsb, long long xsh, long long xsr, long long ysb,
                     long long ysh, long long ysr, int start, float sign) {
  constexpr int W = Pack<T>::W;
  const bool vec = half % W == 0 && xsb % W == 0 && xsh % W == 0 && xsr % W == 0 &&
                   ysb % W == 0 && ysh % W == 0 && ysr % W == 0 && al16(x) && al16(y);
  BY_WIDTH(T, vec, rope_v, x, cos_t, sin_t, y, B, H, S, half, xsb, xsh, xsr, ysb, ysh, ysr, start,
           sign);
}

// y = a + b, same shape.
template <typename T>
__device__ void add(const T* a, const T* b, T* y, size_t n) {
  map<T, 2, 1>(n, {a, b}, {y}, [](size_t, const float* in, float* out) { out[0] = in[0] + in[1]; });
}

// Inverted dropout with the host's masks (src/nn/cpu.rs dropout_fwd): element i belongs to chunk
// i / 4096, whose SplitMix64 stream starts at seeds[chunk]; its value is that stream's
// (i % 4096 + 1)-th output, which SplitMix64 reaches in closed form (state + k * gamma). Kept when
// the top 32 bits fall below `threshold`: the same masks as the host draws, on any device.
// Backward is the same kernel on the output gradient (the mask is redrawn, never stored).
template <typename T>
__device__ void dropout_fwd(const T* x, const uint64_t* seeds, T* y, size_t n, uint32_t threshold,
                            float scale) {
  map<T, 1, 1>(n, {x}, {y}, [=](size_t i, const float* in, float* out) {
    uint64_t z = seeds[i >> 12] + (uint64_t)((i & 4095) + 1) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    const bool kept = (uint32_t)((z ^ (z >> 31)) >> 32) < threshold;
    out[0] = kept ? in[0] * scale : 0.0f;
  });
}

// GELU (tanh approximation): dy * (0.5 (1 + t) + 0.5 x (1 - t^2) u'), t = tanh(u).
template <typename T>
__device__ void gelu_tanh_bwd(const T* x, const T* dy, T* dx, size_t n) {
  map<T, 2, 1>(n, {x, dy}, {dx}, [](size_t, const float* in, float* out) {
    const float c = 0.7978845608028654f, a = 0.044715f;
    const float v = in[0];
    const float t = tanhf(c * (v + a * v * v * v));
    const float du = c * (1.f + 3.f * a * v * v);
    out[0] = in[1] * (0.5f * (1.f + t) + 0.5f * v * (1.f - t * t) * du);
  });
}

template <typename T>
__device__ void swiglu_fwd(const T* g, const T* u, T* y, size_t n) {
  map<T, 2, 1>(n, {g, u}, {y}, [](size_t, const float* in, float* out) {
    out[0] = in[0] / (1.f + expf(-in[0])) * in[1];
  });
}

// dgate = dy * up * s (1 + g (1 - s)), dup = dy * g s, s = sigmoid(g).
template <typename T>
__device__ void swiglu_bwd(const T* g, const T* u, const T* dy, T* dg, T* du, size_t n) {
  map<T, 3, 2>(n, {g, u, dy}, {dg, du}, [](size_t, const float* in, float* out) {
    const float gv = in[0], d = in[2];
    const float s = 1.f / (1.f + expf(-gv));
    out[0] = d * in[1] * s * (1.f + gv * (1.f - s));
    out[1] = d * gv * s;
  });
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
// One parameter of st_adamw_many (the host writes it as ten 8-byte words, gpu::adamw_many): its
// tensors, its length and its own bias corrections; `low`, when not null, takes the new weight
// rounded to bf16 (an adapter's copy beside a bf16 base).
struct AdamSeg {
  const float* p;
  const float* g;
  const float* m;
  const float* v;
  float* p2;
  float* m2;
  float* v2;
  bf16* low;
  unsigned long long n;
  float bc1, bc2;
};
static_assert(sizeof(AdamSeg) == 80, "gpu::adamw_many writes ten 8-byte words a parameter");

// AdamW, out of place (f32 parameters and moments), every parameter of an optimizer step in one
// launch: block row y updates parameter y, with g its gradient times `gscale` (the clipping
// factor): m' = b1 m + (1 - b1) g, v' = b2 v + (1 - b2) g^2,
// p' = p (1 - lr wd) - lr (m' / bc1) / (sqrt(v' / bc2) + eps).
extern "C" __global__ void st_adamw_many(const AdamSeg* segs, float lr, float b1, float b2,
                                         float eps, float wd, float gscale) {
  const AdamSeg s = segs[blockIdx.y];
  GRID_STRIDE(i, s.n) {
    const float g = s.g[i] * gscale;
    const float mi = b1 * s.m[i] + (1.f - b1) * g;
    const float vi = b2 * s.v[i] + (1.f - b2) * g * g;
    s.m2[i] = mi;
    s.v2[i] = vi;
    const float p = s.p[i] * (1.f - lr * wd) - lr * ((mi / s.bc1) / (sqrtf(vi / s.bc2) + eps));
    s.p2[i] = p;
    if (s.low) s.low[i] = st<bf16>(p);
  }
}

// Each tensor's sum of squares in f64, one block a tensor (gradient clipping's norm): the same
// fixed order every call, so the sums repeat bit for bit. The host writes a tensor as two 8-byte
// words (address, length).
struct SqSeg {
  const float* x;
  unsigned long long n;
};
static_assert(sizeof(SqSeg) == 16, "gpu::sum_squares_many writes two 8-byte words a tensor");

extern "C" __global__ void st_sum_squares_many(const SqSeg* segs, double* out) {
  const SqSeg s = segs[blockIdx.x];
  double acc = 0.0;
  for (size_t i = threadIdx.x; i < s.n; i += blockDim.x) {
    const double v = s.x[i];
    acc += v * v;
  }
  acc = block_sum_d(acc);
  if (threadIdx.x == 0) out[blockIdx.x] = acc;
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
  extern "C" __global__ void st_norm_bwd_##S(const T* dy, const T* rows, const float* rstd,       \
                                             const T* gamma, const T* res, T* dx, int c,          \
                                             int center, int from_output) {                       \
    norm_bwd<T>(dy, rows, rstd, gamma, res, dx, c, center, from_output);                          \
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
  extern "C" __global__ void st_rope_##S(const T* x, const float* c, const float* s, T* y, int B, \
                                         int H, int rows, int half, long long xsb, long long xsh, \
                                         long long xsr, long long ysb, long long ysh,            \
                                         long long ysr, int start, float sign) {                 \
    rope<T>(x, c, s, y, B, H, rows, half, xsb, xsh, xsr, ysb, ysh, ysr, start, sign);            \
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
                                                size_t n, uint32_t threshold, float scale) {       \
    dropout_fwd<T>(x, seeds, y, n, threshold, scale);                                             \
  }                                                                                               \
  extern "C" __global__ void st_cross_entropy_##S(const T* z, const uint32_t* targets,           \
                                                  float* loss, T* d, int v, float g) {            \
    cross_entropy<T>(z, targets, loss, d, v, g);                                                  \
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

// ---------------------------------------------------------------------------------------------
// A LoRA adapter's thin products (`gpu::gemm`, `gpu::add_product`): one operand has R <= 8
// columns, so each product is bound by one pass over a wide `[n, d]` activation. cuBLAS ran each
// as a split-K product plus a reduction, about 13 us a call at n = 1,024, d = 4,096 (twice what
// reading the 8 MB takes). Storage bf16 or f32, sums in f32. Callers check that d is a multiple
// of the pack width and that every pointer is 16-byte aligned.

// N consecutive elements at p, in the widest accesses (up to 16 bytes) that N * sizeof(T) allows.
template <int N, typename T> __device__ __forceinline__ void getn(const T* p, float* f) {
  constexpr int bytes = N * (int)sizeof(T);
  constexpr int step = bytes % 16 == 0 ? 16 : bytes % 8 == 0 ? 8 : bytes % 4 == 0 ? 4 : 2;
  constexpr int per = step / (int)sizeof(T);
#pragma unroll
  for (int i = 0; i < N; i += per) {
    if constexpr (step == 16) {
      const uint4 v = *reinterpret_cast<const uint4*>(p + i);
      const T* e = reinterpret_cast<const T*>(&v);
#pragma unroll
      for (int j = 0; j < per; j++) f[i + j] = ld(e[j]);
    } else if constexpr (step == 8) {
      const uint2 v = *reinterpret_cast<const uint2*>(p + i);
      const T* e = reinterpret_cast<const T*>(&v);
#pragma unroll
      for (int j = 0; j < per; j++) f[i + j] = ld(e[j]);
    } else {
      f[i] = ld(p[i]);
      if constexpr (per == 2) f[i + 1] = ld(p[i + 1]);
    }
  }
}

// out[i, k] = alpha * sum_j x[i, j] w(k, j), k < R: x [n, d]; w [R, d] (W_T false: A in x A^T)
// or [d, R] (W_T true: B in dy B); out [n, R]. A block of 256 threads takes ROWS rows, each thread
// a pack of columns every 256 packs; the threads' partial sums meet in shared memory.
template <int R, typename T, bool W_T>
__device__ void thin_rows(const T* x, const T* w, T* out, int n, int d, float alpha) {
  constexpr int V = Pack<T>::W, ROWS = R <= 4 ? 8 : 4;
  __shared__ float sh[8][ROWS * R];
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
  for (int r0 = blockIdx.x * ROWS; r0 < n; r0 += gridDim.x * ROWS) {
    float acc[ROWS][R];
#pragma unroll
    for (int q = 0; q < ROWS; q++)
#pragma unroll
      for (int k = 0; k < R; k++) acc[q][k] = 0.f;
#pragma unroll 2
    for (int j = threadIdx.x * V; j < d; j += blockDim.x * V) {
      float xv[ROWS][V];
#pragma unroll
      for (int q = 0; q < ROWS; q++) {
        if (r0 + q < n) getv<V>(x + (size_t)(r0 + q) * d + j, xv[q]);
        else
#pragma unroll
          for (int e = 0; e < V; e++) xv[q][e] = 0.f;
      }
      if constexpr (W_T) {
#pragma unroll
        for (int e = 0; e < V; e++) {
          float wv[R];
          getn<R>(w + (size_t)(j + e) * R, wv);
#pragma unroll
          for (int q = 0; q < ROWS; q++)
#pragma unroll
            for (int k = 0; k < R; k++) acc[q][k] += xv[q][e] * wv[k];
        }
      } else {
#pragma unroll
        for (int k = 0; k < R; k++) {
          float wv[V];
          getv<V>(w + (size_t)k * d + j, wv);
#pragma unroll
          for (int q = 0; q < ROWS; q++)
#pragma unroll
            for (int e = 0; e < V; e++) acc[q][k] += xv[q][e] * wv[e];
        }
      }
    }
#pragma unroll
    for (int q = 0; q < ROWS; q++)
#pragma unroll
      for (int k = 0; k < R; k++) {
        const float s = warp_sum(acc[q][k]);
        if (lane == 0) sh[wid][q * R + k] = s;
      }
    __syncthreads();
    for (int t = threadIdx.x; t < ROWS * R; t += blockDim.x) {
      float s = 0.f;
      for (int v = 0; v < (int)(blockDim.x >> 5); v++) s += sh[v][t];
      const int q = t / R;
      if (r0 + q < n) out[(size_t)(r0 + q) * R + t % R] = st<T>(alpha * s);
    }
    __syncthreads();  // sh is reused by the next rows
  }
}

// out[j * oj + k * ok] += sum_i x[i, j] v[i, k], k < R, into f32 `out` that the caller zeroed:
// x [n, d], v [n, R]. dB = dy^T U is [d, R] (oj = R, ok = 1), dA = dxa^T x is [R, d] (oj = 1,
// ok = d). A block is 32 x 8 threads: 32 threads side by side over 32 * C columns, 8 slices of the
// block's rows; the slices meet in shared memory and the blocks of other rows meet in `out`
// through 16-byte atomics (d a multiple of 4), so the sum's order (and its last bits) vary from
// run to run.
template <int R, typename T>
__device__ void thin_cols(const T* x, const T* v, float* out, int n, int d, int rows_per_block,
                          long long oj, long long ok) {
  constexpr int C = Pack<T>::W * R <= 32 ? Pack<T>::W : 32 / R;
  __shared__ float sh[8][C * R][33];
  const int j0 = blockIdx.x * 32 * C, j = j0 + threadIdx.x * C;
  const int i0 = blockIdx.y * rows_per_block, i1 = min(n, i0 + rows_per_block);
  float acc[C][R];
#pragma unroll
  for (int c = 0; c < C; c++)
#pragma unroll
    for (int k = 0; k < R; k++) acc[c][k] = 0.f;
  if (j < d) {
#pragma unroll 4
    for (int i = i0 + threadIdx.y; i < i1; i += 8) {
      float xv[C], vv[R];
      getn<C>(x + (size_t)i * d + j, xv);
      getn<R>(v + (size_t)i * R, vv);
#pragma unroll
      for (int c = 0; c < C; c++)
#pragma unroll
        for (int k = 0; k < R; k++) acc[c][k] += xv[c] * vv[k];
    }
  }
#pragma unroll
  for (int c = 0; c < C; c++)
#pragma unroll
    for (int k = 0; k < R; k++) sh[threadIdx.y][c * R + k][threadIdx.x] = acc[c][k];
  __syncthreads();
  // The block's 32 * C * R sums, four at a time: four neighbours in `out` (the block's columns
  // are contiguous in dB's layout, each k's columns in dA's).
  const bool by_col = ok == 1;  // dB: f = (column - j0) * R + k
  for (int g = threadIdx.y * 32 + threadIdx.x; g < 8 * C * R; g += 256) {
    float4 s4;
    float* s = reinterpret_cast<float*>(&s4);
    long long at = 0;
#pragma unroll
    for (int e = 0; e < 4; e++) {
      const int f = 4 * g + e;
      const int col = by_col ? f / R : f % (32 * C), k = by_col ? f % R : f / (32 * C);
      float t = 0.f;
#pragma unroll
      for (int y = 0; y < 8; y++) t += sh[y][(col % C) * R + k][col / C];
      s[e] = t;
      if (e == 0) at = (long long)(j0 + col) * oj + k * ok;
    }
    const int col0 = by_col ? (4 * g) / R : (4 * g) % (32 * C);
    if (j0 + col0 < d) atomicAdd(reinterpret_cast<float4*>(out + at), s4);
  }
}

// y[i, j] += sum_k u[i, k] w(j, k), k < R, in place (the sum in f32, rounded once): u [n, R];
// w [d, R] (W_T true: B in U B^T) or [R, d] (W_T false: A in dxa A). A thread keeps the weights of
// its pack of columns in registers and walks a slice of rows.
template <int R, typename T, bool W_T>
__device__ void thin_update(T* y, const T* u, const T* w, int n, int d, int rows_per_block) {
  constexpr int V = Pack<T>::W;
  const int j = (blockIdx.x * blockDim.x + threadIdx.x) * V;
  if (j >= d) return;
  float wv[V][R];
  if constexpr (W_T) {
    getn<V * R>(w + (size_t)j * R, &wv[0][0]);
  } else {
#pragma unroll
    for (int k = 0; k < R; k++) {
      float t[V];
      getv<V>(w + (size_t)k * d + j, t);
#pragma unroll
      for (int e = 0; e < V; e++) wv[e][k] = t[e];
    }
  }
  const int i0 = blockIdx.y * rows_per_block, i1 = min(n, i0 + rows_per_block);
#pragma unroll 4
  for (int i = i0; i < i1; i++) {
    float yv[V], uv[R];
    getv<V>(y + (size_t)i * d + j, yv);
    getn<R>(u + (size_t)i * R, uv);
#pragma unroll
    for (int e = 0; e < V; e++)
#pragma unroll
      for (int k = 0; k < R; k++) yv[e] += uv[k] * wv[e][k];
    putv<V>(y + (size_t)i * d + j, yv);
  }
}

#define THIN(R, T, S)                                                                             \
  extern "C" __global__ void __launch_bounds__(256)                                              \
      st_thin_rows_a_r##R##_##S(const T* x, const T* w, T* out, int n, int d, float alpha) {      \
    thin_rows<R, T, false>(x, w, out, n, d, alpha);                                               \
  }                                                                                               \
  extern "C" __global__ void __launch_bounds__(256)                                              \
      st_thin_rows_b_r##R##_##S(const T* x, const T* w, T* out, int n, int d, float alpha) {      \
    thin_rows<R, T, true>(x, w, out, n, d, alpha);                                                \
  }                                                                                               \
  extern "C" __global__ void __launch_bounds__(256)                                              \
      st_thin_cols_r##R##_##S(const T* x, const T* v, float* out, int n, int d, int rows,        \
                              long long oj, long long ok) {                                       \
    thin_cols<R, T>(x, v, out, n, d, rows, oj, ok);                                               \
  }                                                                                               \
  extern "C" __global__ void st_thin_update_a_r##R##_##S(T* y, const T* u, const T* w, int n,     \
                                                         int d, int rows) {                       \
    thin_update<R, T, false>(y, u, w, n, d, rows);                                                \
  }                                                                                               \
  extern "C" __global__ void st_thin_update_b_r##R##_##S(T* y, const T* u, const T* w, int n,     \
                                                         int d, int rows) {                       \
    thin_update<R, T, true>(y, u, w, n, d, rows);                                                 \
  }
#define THIN_RANKS(T, S) THIN(1, T, S) THIN(2, T, S) THIN(4, T, S) THIN(8, T, S)
THIN_RANKS(float, f32)
THIN_RANKS(bf16, bf16)

// ---------------------------------------------------------------------------------------------
// SAFE's CKA in the Gram form (`nn/cka.rs`): of X = Y + U B^T over n token rows, what CKA's norms
// need, in three kernels around safetune's own product (st_gram_tf32), for up to CKA_GRAM_BATCH
// adapters a call (the candle composition took ~40 launches per adapter and batch). The product
// runs on TF32 tensor cores over f32 inputs; every sum of its output and every other term is
// formed in f64, in a fixed order.

// Rows `rows` (the first n when null) of x [*, c], centred, in TE: xc [n, c]; the column means
// and (colsq not null) each column's sum of squares before centring, in f64. Block `block` of
// CKA_CENTER_WARPS warps takes 32 columns; the warps split the rows and add their partial sums in
// a fixed order. A whole block of warps per 32 columns: at width 4096 there are only 128 such
// blocks, so fewer warps would leave the loads' latency exposed.
#define CKA_CENTER_WARPS 32
template <typename T, typename Tb, typename TE>
__device__ void cka_center(const T* x, const uint32_t* rows, int n, int c, TE* xc, double* mean,
                           double* colsq, const Tb* b, int r, int block) {
  __shared__ double s_sum[CKA_CENTER_WARPS][32], s_sq[CKA_CENTER_WARPS][32];
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, col = block * 32 + lane;
  double s = 0.0, q = 0.0;
  if (col < c)
    for (int i = w; i < n; i += CKA_CENTER_WARPS) {
      const size_t r = rows ? rows[i] : i;
      const double v = (double)ld(x[r * c + col]);
      s += v;
      q += v * v;
    }
  s_sum[w][lane] = s;
  s_sq[w][lane] = q;
  __syncthreads();
  if (w == 0) {
    double ts = 0.0, tq = 0.0;
    for (int k = 0; k < CKA_CENTER_WARPS; k++) {
      ts += s_sum[k][lane];
      tq += s_sq[k][lane];
    }
    s_sum[0][lane] = ts / n;
    if (col < c) {
      mean[col] = ts / n;
      if (colsq) colsq[col] = tq;
    }
  }
  __syncthreads();
  const double m = s_sum[0][lane];
  if (col < c)
    for (int i = w; i < n; i += CKA_CENTER_WARPS) {
      const size_t r = rows ? rows[i] : i;
      xc[(size_t)i * c + col] = (TE)((double)ld(x[r * c + col]) - m);
    }
  // B^T (b [c, r]) as rows n .. n + r of xc, for the Gram form's one product E E^T.
  if (b && col < c)
    for (int j = w; j < r; j += CKA_CENTER_WARPS) xc[(size_t)(n + j) * c + col] = (TE)ld(b[(size_t)col * r + j]);
}

// The Gram form's inputs in one launch: the first ceil(d / 32) blocks centre y's token rows into
// e [n + r, d] (f32, with their column means and sums of squares in f64) and write B^T (b [d, r])
// below them; the blocks after centre u's rows into uc [n, r] (f64) with their means.
template <typename T, typename Tb>
__device__ void cka_gram_center(const T* y, const T* u, const uint32_t* rows, int n, int d, int r,
                                const Tb* b, float* e, double* ymean, double* colsq, double* uc,
                                double* umean) {
  const int yblocks = (d + 31) / 32;
  if ((int)blockIdx.x < yblocks)
    cka_center<T, Tb, float>(y, rows, n, d, e, ymean, colsq, b, r, blockIdx.x);
  else
    cka_center<T, Tb, double>(u, rows, n, r, uc, umean, nullptr, (const Tb*)nullptr, 0,
                              blockIdx.x - yblocks);
}

// Up to CKA_GRAM_BATCH adapters' Gram terms over the same token rows in one set of launches
// (`gpu::CKA_GRAM_BATCH`), sharing the launches' fixed cost (at SAFE's 7B shape a pair takes
// about 1.86x one adapter's time). blockIdx.y (.z in the product) picks the adapter; each
// adapter's buffers follow one another, and each adapter's arithmetic is the same as alone.
#define CKA_GRAM_BATCH 2
struct CkaGramInputs {
  const void* y[CKA_GRAM_BATCH];
  const void* u[CKA_GRAM_BATCH];
  const void* b[CKA_GRAM_BATCH];
};
#define CKA_GRAM_CENTER(YS, T, BS, TB)                                                            \
  extern "C" __global__ void st_cka_gram_center_##YS##_##BS(                                     \
      CkaGramInputs in, const uint32_t* rows, int n, int d, int r, float* e, double* ymean,      \
      double* colsq, double* uc, double* umean) {                                                \
    const size_t a = blockIdx.y;                                                                  \
    cka_gram_center<T, TB>((const T*)in.y[a], (const T*)in.u[a], rows, n, d, r,                  \
                           (const TB*)in.b[a], e + a * (n + r) * d, ymean + a * d,               \
                           colsq + a * d, uc + a * n * r, umean + a * r);                        \
  }
CKA_GRAM_CENTER(f32, float, f32, float)
CKA_GRAM_CENTER(f32, float, bf16, bf16)
CKA_GRAM_CENTER(bf16, bf16, f32, float)
CKA_GRAM_CENTER(bf16, bf16, bf16, bf16)

// The token rows `rows` (all n when null) of y [N, d] and u [N, r] side by side in f64,
// e = [Y U] ([n, d + r]), and the column sums of each chunk of CKA_CHUNK rows (partial
// [chunks, d + r]; `st_cka_col_sums` adds them in order): the moment form's one input. Blocks of
// 32 columns by one chunk of rows, 8 warps over the chunk's rows.
#define CKA_CHUNK 128
template <typename T>
__device__ void cka_gather(const T* y, const T* u, const uint32_t* rows, int n, int d, int r,
                           double* e, double* partial) {
  __shared__ double s_sum[8][32];
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, col = blockIdx.x * 32 + lane;
  const int c = d + r, first = blockIdx.y * CKA_CHUNK, last = min(n, first + CKA_CHUNK);
  double s = 0.0;
  if (col < c)
    for (int i = first + w; i < last; i += 8) {
      const size_t row = rows ? rows[i] : i;
      const double v = col < d ? (double)ld(y[row * d + col]) : (double)ld(u[row * r + col - d]);
      e[(size_t)i * c + col] = v;
      s += v;
    }
  s_sum[w][lane] = s;
  __syncthreads();
  if (w == 0 && col < c) {
    double t = 0.0;
    for (int k = 0; k < 8; k++) t += s_sum[k][lane];
    partial[(size_t)blockIdx.y * c + col] = t;
  }
}

extern "C" __global__ void st_cka_gather_f32(const float* y, const float* u, const uint32_t* rows,
                                             int n, int d, int r, double* e, double* partial) {
  cka_gather<float>(y, u, rows, n, d, r, e, partial);
}
extern "C" __global__ void st_cka_gather_bf16(const bf16* y, const bf16* u, const uint32_t* rows,
                                              int n, int d, int r, double* e, double* partial) {
  cka_gather<bf16>(y, u, rows, n, d, r, e, partial);
}

// sums[j] = the chunks' partial sums of column j, added in chunk order.
extern "C" __global__ void st_cka_col_sums(const double* partial, int chunks, int c,
                                           double* sums) {
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= c) return;
  double t = 0.0;
  for (int k = 0; k < chunks; k++) t += partial[(size_t)k * c + j];
  sums[j] = t;
}

// M = E E^T on TF32 tensor cores (mma.sync m16n8k8, f32 accumulation) for E [m, k] f32
// row-major, both triangles. Block (tile pair p, split s) forms the 64 x 64 tile (ti, tj),
// ti <= tj, over columns [s kc, (s + 1) kc) of E into parts[s], mirrored to (tj, ti) off the
// diagonal: the upper triangle's tiles times the splits fill the GPU where the one product at
// SAFE's shape (520 x 4096) has a few dozen tiles. 128 threads, four warps of 32 x 32; the next
// columns' tiles are copied straight to shared memory (cp.async, two stages) while the current
// ones multiply: 58 us a call of the CKA terms at that shape (H100), 65 when they went through
// registers. Needs k and the chunk width kc multiples of 4 (16-byte copies;
// `gpu::cka_gram_fused` sends other widths to the composition). Loaded with the module, unlike
// cuBLAS's product, whose first use in a process cost 55-82 ms (BENCHMARKS.md).
#define GT_TILE 64
#define GT_K 32
#define GT_LD (GT_K + 4)  // rows 36 floats apart: fragment reads hit 32 distinct banks
__device__ __forceinline__ uint32_t to_tf32(float x) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
  return r;
}
__device__ __forceinline__ void mma_tf32(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
// Thread `tid`'s four 16-byte copies of a 64 x 32 tile of E (rows r0.., columns col0..k1) into
// s; rows and columns outside are zero-filled.
__device__ __forceinline__ void gt_load_async(float (*s)[GT_LD], const float* e, int m, int k,
                                              int r0, int col0, int k1, int tid) {
  for (int q = 0; q < 4; q++) {
    const int idx = tid + q * 128, row = idx / 8, col = (idx % 8) * 4;
    const bool in = r0 + row < m && col0 + col < k1;
    const float* src = in ? e + (size_t)(r0 + row) * k + col0 + col : e;
    const unsigned dst = (unsigned)__cvta_generic_to_shared(&s[row][col]);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
                 "r"(in ? 16 : 0));
  }
}
extern "C" __global__ void __launch_bounds__(128) st_gram_tf32(const float* e, int m, int k,
                                                                     int kc, float* parts) {
  __shared__ __align__(16) float sa[2][GT_TILE][GT_LD];
  __shared__ __align__(16) float sb[2][GT_TILE][GT_LD];
  // blockIdx.z: which of a batch's E (each [m, k]) and its parts ([gridDim.y, m, m]).
  e += (size_t)blockIdx.z * m * k;
  parts += (size_t)blockIdx.z * gridDim.y * m * m;
  const int tiles = (m + GT_TILE - 1) / GT_TILE;
  int p = blockIdx.x, ti = 0;
  while (p >= tiles - ti) { p -= tiles - ti; ti++; }
  const int tj = ti + p, ra = ti * GT_TILE, rb = tj * GT_TILE;
  const int k0 = blockIdx.y * kc, k1 = min(k, k0 + kc);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
  const int wr = (warp >> 1) * 32, wc = (warp & 1) * 32;
  float acc[2][4][4] = {};
  gt_load_async(sa[0], e, m, k, ra, k0, k1, tid);
  gt_load_async(sb[0], e, m, k, rb, k0, k1, tid);
  asm volatile("cp.async.commit_group;\n" ::);
  int stage = 0;
  for (int kk = k0; kk < k1; kk += GT_K, stage ^= 1) {
    if (kk + GT_K < k1) {
      gt_load_async(sa[stage ^ 1], e, m, k, ra, kk + GT_K, k1, tid);
      gt_load_async(sb[stage ^ 1], e, m, k, rb, kk + GT_K, k1, tid);
    }
    asm volatile("cp.async.commit_group;\n" ::);
    asm volatile("cp.async.wait_group 1;\n" ::);
    __syncthreads();
    for (int k8 = 0; k8 < GT_K; k8 += 8) {
      uint32_t a[2][4], b[4][2];
      for (int i = 0; i < 2; i++) {
        const int r = wr + 16 * i + g;
        a[i][0] = to_tf32(sa[stage][r][k8 + t]);
        a[i][1] = to_tf32(sa[stage][r + 8][k8 + t]);
        a[i][2] = to_tf32(sa[stage][r][k8 + t + 4]);
        a[i][3] = to_tf32(sa[stage][r + 8][k8 + t + 4]);
      }
      for (int j = 0; j < 4; j++) {
        const int c = wc + 8 * j + g;
        b[j][0] = to_tf32(sb[stage][c][k8 + t]);
        b[j][1] = to_tf32(sb[stage][c][k8 + t + 4]);
      }
      for (int i = 0; i < 2; i++)
        for (int j = 0; j < 4; j++) mma_tf32(acc[i][j], a[i], b[j][0], b[j][1]);
    }
    __syncthreads();
  }
  float* out = parts + (size_t)blockIdx.y * m * m;
  for (int i = 0; i < 2; i++)
    for (int j = 0; j < 4; j++)
      for (int h = 0; h < 4; h++) {
        const int row = ra + wr + 16 * i + g + 8 * (h >> 1), col = rb + wc + 8 * j + 2 * t + (h & 1);
        if (row < m && col < m) {
          out[(size_t)row * m + col] = acc[i][j][h];
          if (ti != tj) out[(size_t)col * m + row] = acc[i][j][h];
        }
      }
}

// M = E E^T for E = [Yc; B^T] ([n + r, d], f32; all of M, both triangles): L = Yc Yc^T is
// M[:n, :n], (Yc B)^T is M[n:, :n] and G = B^T B is M[n:, n:]. st_gram_tf32 leaves it as
// `slices` partial products over chunks of the width ([slices, n + r, n + r]); its readers add
// them as they read, in slice order.
__device__ __forceinline__ float gram_at(const float* M, int slices, int m, size_t idx) {
  float v = M[idx];
  for (int s = 1; s < slices; s++) v += M[(size_t)s * m * m + idx];
  return v;
}

// One block per row i of L: p_i = (Yc B)_i + (Uc G)_i / 2, written with Uc's row as
// z_i = [p_i, uc_i] (z [n, 2r]), and partial[i] = (sum_j L_ij^2, sum_j L_ij (uc_j . p_i)), whose
// sums are ||L||^2 and <L Uc, P>. r <= 256.
extern "C" __global__ void st_cka_gram_rows(const float* M, int slices, const double* uc, int n,
                                            int r, double* z, double* partial) {
  __shared__ double pi[256];
  const int ld = n + r, i = blockIdx.x;
  const size_t adapter = blockIdx.y;  // of a batch
  M += adapter * slices * ld * ld;
  uc += adapter * n * r;
  z += adapter * n * 2 * r;
  partial += adapter * 2 * n;
  for (int j = threadIdx.x; j < r; j += blockDim.x) {
    double a = 0.0;
    for (int k = 0; k < r; k++)
      a += uc[(size_t)i * r + k] * ((double)gram_at(M, slices, ld, (size_t)(n + k) * ld + n + j) * 0.5);
    const double v = (double)gram_at(M, slices, ld, (size_t)(n + j) * ld + i) + a;
    pi[j] = v;
    z[(size_t)i * 2 * r + j] = v;
    z[(size_t)i * 2 * r + r + j] = uc[(size_t)i * r + j];
  }
  __syncthreads();
  double l2 = 0.0, lup = 0.0;
  for (int j = threadIdx.x; j < n; j += blockDim.x) {
    const double lij = gram_at(M, slices, ld, (size_t)i * ld + j);
    double up = 0.0;
    for (int k = 0; k < r; k++) up += uc[(size_t)j * r + k] * pi[k];
    l2 += lij * lij;
    lup += lij * up;
  }
  l2 = block_sum_d(l2);
  lup = block_sum_d(lup);
  if (threadIdx.x == 0) {
    partial[2 * i] = l2;
    partial[2 * i + 1] = lup;
  }
}

// The Gram form's terms: out = [||L||^2, <L Uc, P>, ||Y||^2, Z^T Z (2r x 2r), G (r x r),
// mean(U) (r), mean(Y) B (r)] from the rows' partials, Y's column sums of squares, z [n, 2r], M
// (for G) and B^T (e's last r rows, f32), in f64. Block 0 adds the partials and copies; block
// 1 + j forms (mean(Y) B)_j and block 1 + r + e entry e of Z^T Z, so the dot products run side by
// side. blockIdx.y: the adapter of a batch.
extern "C" __global__ void st_cka_gram_finish(const double* partial, int n, const double* colsq,
                                              int d, const double* z, const float* M, int slices,
                                              const double* umean, const double* ymean,
                                              const float* e, int r, double* out) {
  const size_t a = blockIdx.y, ld = n + r;
  partial += a * 2 * n;
  colsq += a * d;
  z += a * n * 2 * r;
  M += a * slices * ld * ld;
  umean += a * r;
  ymean += a * d;
  const float* bt = e + a * ld * d + (size_t)n * d;
  out += a * (3 + 5 * r * r + 2 * r);
  if ((int)blockIdx.x > r) {
    const int e = blockIdx.x - 1 - r, w = 2 * r, a = e / w, c = e % w;
    double v = 0.0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) v += z[(size_t)i * w + a] * z[(size_t)i * w + c];
    v = block_sum_d(v);
    if (threadIdx.x == 0) out[3 + e] = v;
    return;
  }
  double* o = out + 3 + 5 * r * r + r;
  if (blockIdx.x > 0) {
    const int j = blockIdx.x - 1;
    double v = 0.0;
    for (int k = threadIdx.x; k < d; k += blockDim.x) v += ymean[k] * (double)bt[(size_t)j * d + k];
    v = block_sum_d(v);
    if (threadIdx.x == 0) o[j] = v;
    return;
  }
  double l2 = 0.0, lup = 0.0, yy = 0.0;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    l2 += partial[2 * i];
    lup += partial[2 * i + 1];
  }
  for (int k = threadIdx.x; k < d; k += blockDim.x) yy += colsq[k];
  l2 = block_sum_d(l2);
  lup = block_sum_d(lup);
  yy = block_sum_d(yy);
  if (threadIdx.x == 0) {
    out[0] = l2;
    out[1] = lup;
    out[2] = yy;
  }
  o = out + 3 + 4 * r * r;
  for (int e = threadIdx.x; e < r * r; e += blockDim.x)
    o[e] = gram_at(M, slices, n + r, (size_t)(n + e / r) * (n + r) + n + e % r);
  o += r * r;
  for (int j = threadIdx.x; j < r; j += blockDim.x) o[j] = umean[j];
}

// CKA's five norms from one batch's low-rank moments (X = Y + U B^T; `nn::cka::LowRankMoments`,
// whose composition this replaces): yty [d, d], ytu [d, r], utu [r, r], b [d, r], sum_y [d],
// sum_u [r], all f64. With C = ytu b^T, Y^T X = yty + C, X^T X = yty + C + C^T + b utu b^T and
// sum_x = sum_y + b sum_u; the norms are ||X^T X - sx sx^T / n||^2, ||X^T X||^2,
// ||Y^T Y - sy sy^T / n||^2, ||Y^T Y||^2 and ||Y^T X - sy sx^T / n||^2. One block per row i
// (blockDim 256, r <= 256) writes its row's five partial sums to partial[5 i ..]; the finish
// kernel adds them over the rows in order, so the result does not depend on scheduling.
// The three moments as separate row-major matrices: yty [d, d], ytu [d, r], utu [r, r].
struct MomentsApart {
  const double *yty, *ytu, *utu;
  int d, r;
  __device__ double yy(int i, int j) const { return yty[(size_t)i * d + j]; }
  __device__ double yu(int i, int k) const { return ytu[(size_t)i * r + k]; }
  __device__ double uu(int k, int l) const { return utu[(size_t)k * r + l]; }
};

// The three moments in one symmetric M = E^T E for E = [Y U] ([n, d + r]), of which cuBLAS's
// syrk filled M[i][j] for i >= j (row-major): Y^T Y is M[:d, :d], (Y^T U)^T is M[d:, :d] and
// U^T U is M[d:, d:].
__device__ __forceinline__ double sym_at(const double* M, int ld, int i, int j) {
  return i >= j ? M[(size_t)i * ld + j] : M[(size_t)j * ld + i];
}
struct MomentsPacked {
  const double* m;
  int d, r;
  __device__ double yy(int i, int j) const { return sym_at(m, d + r, i, j); }
  __device__ double yu(int i, int k) const { return m[(size_t)(d + k) * (d + r) + i]; }
  __device__ double uu(int k, int l) const { return sym_at(m, d + r, d + k, d + l); }
};

template <typename M>
__device__ void cka_moment_rows(M mo, const double* b, const double* sum_y, const double* sum_u,
                                int d, int r, double n, double* partial) {
  const int i = blockIdx.x;
  __shared__ double bi[256], wi[256], ytui[256], sxi_sh;
  // b_i, w_i = b_i utu (row i of b utu) and ytu_i, once per block.
  for (int k = threadIdx.x; k < r; k += blockDim.x) {
    bi[k] = b[(size_t)i * r + k];
    ytui[k] = mo.yu(i, k);
  }
  __syncthreads();
  for (int l = threadIdx.x; l < r; l += blockDim.x) {
    double v = 0.0;
    for (int k = 0; k < r; k++) v += bi[k] * mo.uu(k, l);
    wi[l] = v;
  }
  if (threadIdx.x == 0) {
    double v = sum_y[i];
    for (int k = 0; k < r; k++) v += bi[k] * sum_u[k];
    sxi_sh = v;
  }
  __syncthreads();
  const double sxi = sxi_sh, syi = sum_y[i];
  double t[5] = {0.0, 0.0, 0.0, 0.0, 0.0};
  for (int j = threadIdx.x; j < d; j += blockDim.x) {
    const double* bj = b + (size_t)j * r;
    double cij = 0.0, cji = 0.0, bub = 0.0, sxj = sum_y[j];
    for (int k = 0; k < r; k++) {
      cij += ytui[k] * bj[k];
      cji += mo.yu(j, k) * bi[k];
      bub += wi[k] * bj[k];
      sxj += bj[k] * sum_u[k];
    }
    const double yy = mo.yy(i, j), syj = sum_y[j];
    const double yx = yy + cij, xx = yx + cji + bub;
    const double xxc = xx - sxi * sxj / n, yyc = yy - syi * syj / n, yxc = yx - syi * sxj / n;
    t[0] += xxc * xxc;
    t[1] += xx * xx;
    t[2] += yyc * yyc;
    t[3] += yy * yy;
    t[4] += yxc * yxc;
  }
  for (int e = 0; e < 5; e++) {
    const double v = block_sum_d(t[e]);
    if (threadIdx.x == 0) partial[(size_t)i * 5 + e] = v;
  }
}

extern "C" __global__ void st_cka_moment_rows(const double* yty, const double* ytu,
                                              const double* utu, const double* b,
                                              const double* sum_y, const double* sum_u, int d,
                                              int r, double n, double* partial) {
  cka_moment_rows(MomentsApart{yty, ytu, utu, d, r}, b, sum_y, sum_u, d, r, n, partial);
}

extern "C" __global__ void st_cka_moment_rows_packed(const double* m, const double* b,
                                                     const double* sums, int d, int r, double n,
                                                     double* partial) {
  cka_moment_rows(MomentsPacked{m, d, r}, b, sums, sums + d, d, r, n, partial);
}

extern "C" __global__ void st_cka_moment_finish(const double* partial, int d, double* out) {
  for (int e = 0; e < 5; e++) {
    double v = 0.0;
    for (int i = threadIdx.x; i < d; i += blockDim.x) v += partial[(size_t)i * 5 + e];
    v = block_sum_d(v);
    if (threadIdx.x == 0) out[e] = v;
  }
}

// ---------------------------------------------------------------------------------------------
// Fused (flash) attention, bf16 storage, f32 accumulation, tensor cores through `mma.sync`
// m16n8k16 (inline PTX); on Hopper at head_dim 128 through warpgroup MMAs (flash_fwd_wg and
// flash_bwd_wg, below). FlashAttention-2: the forward runs an online softmax over key blocks and
// writes the output and the per-row log-sum-exp (natural log, f32), nothing of size T x T; the
// backward recomputes the probabilities from the log-sum-exp per (key block, query block) tile,
// accumulates dK and dV of one key block in registers over every query block and every query head
// of its kv group (grouped-query attention sums over the group without atomics), and adds dQ into
// an f32 buffer with atomics.
//
// Tensors are addressed as [batch, heads, rows, head_dim] through (batch, head, row) strides in
// elements, head_dim contiguous: q, k, v, o, do in the layers' [batch*seq, heads*head_dim] layout or
// in [batch, heads, seq, head_dim] (after rope) alike. Scores are scale * q.k + mask[b, key] (the
// additive key mask, f32, may be null); causal masks keys above the diagonal (as -inf: every row
// keeps its diagonal); keys and queries past `T` are out of range.
//
// mma.sync m16n8k16 fragments (lane = 4 * g + t): A (16 x 16, row-major) a0 = A[g][2t..2t+1],
// a1 = A[g+8][2t..], a2 = A[g][2t+8..], a3 = A[g+8][2t+8..]; B (16 x 8, k x n) b0 = B[2t..2t+1][g],
// b1 = B[2t+8..2t+9][g]; C (16 x 8) c0,c1 = C[g][2t..2t+1], c2,c3 = C[g+8][2t..2t+1]. So
// fragments come from shared memory through ldmatrix (a B operand from a tile stored n-major,
// [n][k] with k contiguous, or transposed from a [k][n] tile), and two adjacent C tiles of a
// product are the A fragment of the next product.

// The parameters of the flash kernels (R: `__restrict__` on the device functions, nothing on the
// kernels that pass them on) and the argument lists that pass them on: one place for the
// signatures of flash_fwd, flash_fwd_wg, flash_bwd, flash_bwd_wg and their kernels.
#define FLASH_FWD_PARAMS(R)                                                                      \
  const bf16* R q, const bf16* R k, const bf16* R v, const float* R mask, bf16* R o,             \
      float* R lse, int T, int H, int KVH, long long qsb, long long qsh, long long qsr,          \
      long long ksb, long long ksh, long long ksr, long long vsb, long long vsh, long long vsr,  \
      long long osb, long long osh, long long osr, float scale, int causal
#define FLASH_FWD_ARGS                                                                           \
  q, k, v, mask, o, lse, T, H, KVH, qsb, qsh, qsr, ksb, ksh, ksr, vsb, vsh, vsr, osb, osh, osr,  \
      scale, causal
#define FLASH_BWD_PARAMS(R)                                                                      \
  const bf16* R q, const bf16* R k, const bf16* R v, const float* R mask, const bf16* R dout,    \
      const float* R lse, const float* R dvec, float* R dq_acc, bf16* R dk, bf16* R dv, int T,   \
      int H, int KVH, long long qsb, long long qsh, long long qsr, long long ksb, long long ksh,  \
      long long ksr, long long vsb, long long vsh, long long vsr, long long dsb, long long dsh,  \
      long long dsr, long long dksb, long long dksh, long long dksr, long long dvsb,             \
      long long dvsh, long long dvsr, float scale, int causal
#define FLASH_BWD_ARGS                                                                           \
  q, k, v, mask, dout, lse, dvec, dq_acc, dk, dv, T, H, KVH, qsb, qsh, qsr, ksb, ksh, ksr, vsb,  \
      vsh, vsr, dsb, dsh, dsr, dksb, dksh, dksr, dvsb, dvsh, dvsr, scale, causal

#define FL_LOG2E 1.4426950408889634f
#define FL_LN2 0.6931471805599453f

__device__ __forceinline__ void mma_bf16(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// The A fragment (16 x 16, bf16) of a next product from two adjacent f32 C tiles (16 x 8 each:
// columns 0-7 in c0, 8-15 in c1) of this one, without a trip through shared memory.
__device__ __forceinline__ void pack_a(uint32_t* a, const float* c0, const float* c1) {
  a[0] = pack_bf16(c0[0], c0[1]);
  a[1] = pack_bf16(c0[2], c0[3]);
  a[2] = pack_bf16(c1[0], c1[1]);
  a[3] = pack_bf16(c1[2], c1[3]);
}

// Rows row0 .. row0+R of a [rows, D] matrix (row stride rs, zeros past T) into shared memory
// (row-major, row stride SS) with asynchronous 16-byte copies (cp.async; the caller commits and
// waits).
template <int D, int R>
__device__ __forceinline__ void fl_load_async(bf16* s, int SS, const bf16* g, long long rs,
                                              int row0, int T) {
  constexpr int V = D / 8;  // 16-byte vectors per row
  for (int i = threadIdx.x; i < R * V; i += blockDim.x) {
    const int r = i / V, c = (i % V) * 8;
    const bool in = row0 + r < T;
    const bf16* src = in ? g + (long long)(row0 + r) * rs + c : g;
    const unsigned dst = (unsigned)__cvta_generic_to_shared(s + r * SS + c);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
                 "r"(in ? 16 : 0));
  }
}

// Keys k0 .. k0+N of a key mask row (f32; zeros past T) into shared memory, 4-byte cp.async
// copies (a row of T floats need not start 16-byte aligned); nothing when there is no mask.
template <int N>
__device__ __forceinline__ void fl_load_mask(float* s, const float* mk, int k0, int T) {
  if (!mk) return;
  for (int i = threadIdx.x; i < N; i += blockDim.x) {
    const bool in = k0 + i < T;
    const unsigned dst = (unsigned)__cvta_generic_to_shared(s + i);
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst),
                 "l"(in ? mk + k0 + i : mk), "r"(in ? 4 : 0));
  }
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// B fragments of two adjacent n-tiles (columns n0 .. n0+16) at k-step rows k0 .. k0+16 of a
// row-major [k][n] tile (row stride SS) in shared memory: ldmatrix.x4.trans, matrices (k0, n0),
// (k0+8, n0), (k0, n0+8), (k0+8, n0+8); b[0..1] is n-tile n0's fragment, b[2..3] n0+8's.
__device__ __forceinline__ void ldsm_b_trans(uint32_t* b, const bf16* tile, int SS, int k0,
                                             int n0) {
  const int l = threadIdx.x & 31, mi = l >> 3;
  const bf16* p = tile + (k0 + (mi & 1) * 8 + (l & 7)) * SS + n0 + (mi >> 1) * 8;
  const unsigned a = (unsigned)__cvta_generic_to_shared(p);
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(b[0]), "=r"(b[1]), "=r"(b[2]), "=r"(b[3])
               : "r"(a));
}

// Four 8 x 8 b16 matrices from shared memory, this lane giving the row address `p` (ldmatrix.x4).
__device__ __forceinline__ void ldsm_x4(uint32_t* r, const bf16* p) {
  const unsigned addr = (unsigned)__cvta_generic_to_shared(p);
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// A fragment (16 x 16) at rows r0 .. r0+16, columns k0 .. k0+16 of a row-major tile (row stride
// SS) in shared memory: one ldmatrix.x4, matrices (r0, k0), (r0+8, k0), (r0, k0+8), (r0+8, k0+8)
// in the order a0..a3 of mma.sync. Rows must start 16-byte aligned (SS a multiple of 8).
__device__ __forceinline__ void ldsm_a(uint32_t* a, const bf16* tile, int SS, int r0, int k0) {
  const int l = threadIdx.x & 31;
  ldsm_x4(a, tile + (r0 + (l & 15)) * SS + k0 + (l >> 4) * 8);
}

// B fragments of two adjacent n-tiles (n0 .. n0+16) at k-step k0 .. k0+16 of an n-major
// [n][k] tile (row stride SS): one ldmatrix.x4; b[0..1] is n-tile n0's fragment, b[2..3] n0+8's.
__device__ __forceinline__ void ldsm_b(uint32_t* b, const bf16* tile, int SS, int k0, int n0) {
  const int l = threadIdx.x & 31;
  ldsm_x4(b, tile + (n0 + (l & 7) + (l >> 4) * 8) * SS + k0 + ((l >> 3) & 1) * 8);
}

// One block of 4 warps per (head, query rows, batch); at head_dim 64 each warp owns two 16-row
// m-tiles (128 rows a block), so every K and V fragment read from shared memory feeds two
// products. Key/value tiles are double-buffered (the next one is copied while this one is used);
// the grid runs the heads fastest, so causal blocks run heaviest (last query rows) first over all
// heads, and the light ones fill the tail. At head_dim 128 a warp owns one m-tile and
// key blocks are 32 wide: two m-tiles' output accumulators and 64-wide score tiles spilled to
// local memory (ncu: 255 registers, 3.0 M spill requests per T=4096 call, 8 warps an SM); one
// m-tile and 32-wide blocks take 127 registers, so four blocks share an SM.
template <int D, int MT, int BC>
__device__ void flash_fwd(FLASH_FWD_PARAMS(__restrict__)) {
  constexpr int BR = 64 * MT, SD = D + 8;
  extern __shared__ __align__(16) unsigned char fl_smem[];
  bf16* sQ = reinterpret_cast<bf16*>(fl_smem);  // [BR][SD]
  bf16* sK = sQ + BR * SD;                       // 2 x [BC][SD]
  bf16* sV = sK + 2 * BC * SD;                   // 2 x [BC][SD]
  float* sM = reinterpret_cast<float*>(sV + 2 * BC * SD);  // 2 x [BC] key mask * log2(e)
  const int h = blockIdx.x, qb = gridDim.y - 1 - blockIdx.y, b = blockIdx.z;
  const int kvh = h / (H / KVH);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;
  q += b * qsb + h * qsh;
  k += b * ksb + kvh * ksh;
  v += b * vsb + kvh * vsh;
  o += b * osb + h * osh;
  const float* mk = mask ? mask + (long long)b * T : nullptr;
  const int q0 = qb * BR;
  const int nkb_all = (T + BC - 1) / BC;
  const int nkb = causal ? min(nkb_all, (q0 + BR - 1) / BC + 1) : nkb_all;
  fl_load_async<D, BR>(sQ, SD, q, qsr, q0, T);
  fl_load_async<D, BC>(sK, SD, k, ksr, 0, T);
  fl_load_async<D, BC>(sV, SD, v, vsr, 0, T);
  fl_load_mask<BC>(sM, mk, 0, T);
  cp_async_commit();
  const int r0 = warp * 16 * MT;
  float acc[MT][D / 8][4];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int n = 0; n < D / 8; ++n) acc[i][n][0] = acc[i][n][1] = acc[i][n][2] = acc[i][n][3] = 0.f;
  float m[MT][2], l[MT][2];
  int qi[MT][2];
#pragma unroll
  for (int i = 0; i < MT; ++i) {
    m[i][0] = m[i][1] = -INFINITY;
    l[i][0] = l[i][1] = 0.f;
    qi[i][0] = q0 + r0 + 16 * i + g;
    qi[i][1] = qi[i][0] + 8;
  }
  const float sl2 = scale * FL_LOG2E;
  for (int kb = 0; kb < nkb; ++kb) {
    const int k0 = kb * BC;
    if (kb + 1 < nkb) {
      const int nb = (kb + 1) & 1;
      fl_load_async<D, BC>(sK + nb * BC * SD, SD, k, ksr, k0 + BC, T);
      fl_load_async<D, BC>(sV + nb * BC * SD, SD, v, vsr, k0 + BC, T);
      fl_load_mask<BC>(sM + nb * BC, mk, k0 + BC, T);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const bf16* cK = sK + (kb & 1) * BC * SD;
    const bf16* cV = sV + (kb & 1) * BC * SD;
    const float* cM = sM + (kb & 1) * BC;
    float s[MT][BC / 8][4];
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
      for (int nt = 0; nt < BC / 8; ++nt) s[i][nt][0] = s[i][nt][1] = s[i][nt][2] = s[i][nt][3] = 0.f;
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
      uint32_t qa[MT][4];
#pragma unroll
      for (int i = 0; i < MT; ++i) ldsm_a(qa[i], sQ, SD, r0 + 16 * i, ks * 16);
#pragma unroll
      for (int nt = 0; nt < BC / 8; nt += 2) {
        uint32_t bk[4];
        ldsm_b(bk, cK, SD, ks * 16, nt * 8);
#pragma unroll
        for (int i = 0; i < MT; ++i) {
          mma_bf16(s[i][nt], qa[i], bk[0], bk[1]);
          mma_bf16(s[i][nt + 1], qa[i], bk[2], bk[3]);
        }
      }
    }
    // Interior blocks (every key in range and, causal, at or before every query row of the
    // block) skip the per-element bound and diagonal tests.
    const bool interior = k0 + BC <= T && (!causal || k0 + BC - 1 <= q0);
    float mu[MT][2];
#pragma unroll
    for (int i = 0; i < MT; ++i) {
      float mx[2] = {m[i][0], m[i][1]};
#pragma unroll
      for (int nt = 0; nt < BC / 8; ++nt) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int kj = k0 + nt * 8 + 2 * t4 + c;
          const float madd = mk ? cM[nt * 8 + 2 * t4 + c] * FL_LOG2E : 0.f;
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            float x;
            if (!interior && (kj >= T || (causal && kj > qi[i][r])))
              x = -INFINITY;
            else
              x = s[i][nt][2 * r + c] * sl2 + madd;
            s[i][nt][2 * r + c] = x;
            mx[r] = fmaxf(mx[r], x);
          }
        }
      }
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
        mu[i][r] = mx[r] == -INFINITY ? 0.f : mx[r];
        const float alpha = exp2f(m[i][r] - mu[i][r]);
        m[i][r] = mx[r];
        l[i][r] *= alpha;
#pragma unroll
        for (int n = 0; n < D / 8; ++n) {
          acc[i][n][2 * r] *= alpha;
          acc[i][n][2 * r + 1] *= alpha;
        }
      }
#pragma unroll
      for (int nt = 0; nt < BC / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float p = exp2f(s[i][nt][e] - mu[i][e >> 1]);
          s[i][nt][e] = p;
          l[i][e >> 1] += p;
        }
      }
    }
#pragma unroll
    for (int ks = 0; ks < BC / 16; ++ks) {
      uint32_t a[MT][4];
#pragma unroll
      for (int i = 0; i < MT; ++i) pack_a(a[i], s[i][2 * ks], s[i][2 * ks + 1]);
#pragma unroll
      for (int n = 0; n < D / 8; n += 2) {
        uint32_t bv[4];
        ldsm_b_trans(bv, cV, SD, ks * 16, n * 8);
#pragma unroll
        for (int i = 0; i < MT; ++i) {
          mma_bf16(acc[i][n], a[i], bv[0], bv[1]);
          mma_bf16(acc[i][n + 1], a[i], bv[2], bv[3]);
        }
      }
    }
    __syncthreads();  // every warp is done with this buffer before it is refilled
  }
#pragma unroll
  for (int i = 0; i < MT; ++i) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float li = l[i][r];
      li += __shfl_xor_sync(0xffffffffu, li, 1);
      li += __shfl_xor_sync(0xffffffffu, li, 2);
      if (qi[i][r] >= T) continue;
      const float inv = li > 0.f ? 1.f / li : 0.f;
      bf16* orow = o + (long long)qi[i][r] * osr;
#pragma unroll
      for (int n = 0; n < D / 8; ++n)
        *reinterpret_cast<uint32_t*>(orow + n * 8 + 2 * t4) =
            pack_bf16(acc[i][n][2 * r] * inv, acc[i][n][2 * r + 1] * inv);
      if (t4 == 0) {
        const float mu = m[i][r] == -INFINITY ? 0.f : m[i][r];
        lse[((long long)b * H + h) * T + qi[i][r]] = mu * FL_LN2 + logf(li);
      }
    }
  }
}

// Hopper (sm_90a, CUDA_COMPUTE_CAP=90) forward at head_dim 128: flash_fwd's contract, with the two
// products of a key block as warpgroup MMAs (`wgmma.mma_async`). A block of three warpgroups
// (384 threads) takes 192 query rows, 64 a warpgroup and 16 a warp; the accumulators come in
// mma.sync's C layout, so the softmax is flash_fwd's and P stays in registers as the A operand
// of P V. q, k and v tiles sit in shared memory in wgmma's no-swizzle canonical layout: 8 x 8
// core matrices of 128 contiguous bytes, core (r/8, c/8) of a [rows][128] tile at
// (r/8 * 16 + c/8) * 128 bytes; the scores read q and k k-major, P V reads v as an n-major
// (transposed) B. Body kb issues the scores of key block kb and P V of block kb - 1, then runs
// block kb's softmax while P V is on the tensor cores (FlashAttention-3's intra-warpgroup
// overlap; no producer warps: measured slower here with cp.async). Key blocks of 64.
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// d (m64n64, f32) = (scale_d ? d : 0) + A B, A and B from shared memory (descriptors).
__device__ __forceinline__ void wgmma_ss_n64(float* d, uint64_t da, uint64_t db, int scale_d) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "l"(da), "l"(db), "r"(scale_d));}

// d (m64n128, f32) += A B, A (m64k16, bf16) from registers in mma.sync's A layout, B from
// shared memory stored n-major ([k][n], n contiguous: transposed).
__device__ __forceinline__ void wgmma_rs_n128_tb(float* d, const uint32_t* a, uint64_t db) {
  asm volatile(
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, 1, 1, 1, 1;\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db));}

__device__ __forceinline__ uint64_t wg_desc(const void* s, uint32_t lbo, uint32_t sbo) {
  const uint32_t a = (uint32_t)__cvta_generic_to_shared(s);
  return (uint64_t)((a & 0x3FFFF) >> 4) | ((uint64_t)(lbo >> 4) << 16) |
         ((uint64_t)(sbo >> 4) << 32);
}
__device__ __forceinline__ void wg_fence() {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wg_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void wg_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

// Rows row0 .. row0+R of a [rows, 128] matrix (row stride rs, zeros past T) into the core-matrix
// layout with cp.async: consecutive threads take consecutive rows of one core matrix, so a warp
// writes 512 contiguous bytes and reads 64 contiguous bytes of each of 8 rows.
template <int R>
__device__ __forceinline__ void wg_load_async(bf16* s, const bf16* g, long long rs, int row0,
                                              int T) {
  constexpr int C = 16;  // core matrices (16-byte vectors) per row
  for (int i = threadIdx.x; i < R * C; i += blockDim.x) {
    const int r8 = i & 7, c = (i >> 3) % C, rb = (i >> 3) / C;
    const int r = rb * 8 + r8;
    const bool in = row0 + r < T;
    const bf16* src = in ? g + (long long)(row0 + r) * rs + c * 8 : g;
    const unsigned dst = (unsigned)__cvta_generic_to_shared(s + (rb * C + c) * 64 + r8 * 8);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
                 "r"(in ? 16 : 0));
  }
}

template <bool MASKED>
__device__ void flash_fwd_wg(FLASH_FWD_PARAMS(__restrict__)) {
  constexpr int D = 128, BC = 64, BR = 192, CB = D / 8 * 128;  // CB: bytes between row blocks
  extern __shared__ __align__(16) unsigned char fl_smem[];
  bf16* sQ = reinterpret_cast<bf16*>(fl_smem);             // BR x D
  bf16* sK = sQ + BR * D;                                   // 2 x BC x D
  bf16* sV = sK + 2 * BC * D;                               // 2 x BC x D
  float* sM = reinterpret_cast<float*>(sV + 2 * BC * D);   // 2 x BC
  const int h = blockIdx.x, qb = gridDim.y - 1 - blockIdx.y, b = blockIdx.z;
  const int kvh = h / (H / KVH);
  const int wg = threadIdx.x >> 7, warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31;
  const int g = lane >> 2, t4 = lane & 3;
  q += b * qsb + h * qsh;
  k += b * ksb + kvh * ksh;
  v += b * vsb + kvh * vsh;
  o += b * osb + h * osh;
  const float* mk = MASKED ? mask + (long long)b * T : nullptr;
  const int q0 = qb * BR;
  const int nkb_all = (T + BC - 1) / BC;
  const int nkb = causal ? min(nkb_all, (q0 + BR - 1) / BC + 1) : nkb_all;
  wg_load_async<BR>(sQ, q, qsr, q0, T);
  wg_load_async<BC>(sK, k, ksr, 0, T);
  fl_load_mask<BC>(sM, mk, 0, T);
  cp_async_commit();
  float acc[D / 2];
#pragma unroll
  for (int i = 0; i < D / 2; ++i) acc[i] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  const int r0 = wg * 64 + warp * 16;
  const int qi[2] = {q0 + r0 + g, q0 + r0 + g + 8};
  const float sl2 = scale * FL_LOG2E;
  const uint64_t dq = wg_desc(sQ + wg * 64 * D, 128, CB);
  uint32_t pa[BC / 16][4];  // P of the previous key block: the A operand of its P V
  for (int kb = 0; kb < nkb; ++kb) {
    const int k0 = kb * BC;
    cp_async_wait<0>();
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");  // copies -> wgmma's reads
    __syncthreads();  // k of block kb and v of kb - 1 are in; the buffers refilled below are free
    if (kb + 1 < nkb) {
      wg_load_async<BC>(sK + ((kb + 1) & 1) * BC * D, k, ksr, k0 + BC, T);
      fl_load_mask<BC>(sM + ((kb + 1) & 1) * BC, mk, k0 + BC, T);
    }
    wg_load_async<BC>(sV + (kb & 1) * BC * D, v, vsr, k0, T);
    cp_async_commit();
    const float* cM = sM + (kb & 1) * BC;
    float s[BC / 2];
    const uint64_t dk = wg_desc(sK + (kb & 1) * BC * D, 128, CB);
    wg_fence();
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) wgmma_ss_n64(s, dq + ks * 16, dk + ks * 16, ks > 0);
    wg_commit();
    if (kb > 0) {
      const bf16* pV = sV + ((kb - 1) & 1) * BC * D;
#pragma unroll
      for (int ks = 0; ks < BC / 16; ++ks)
        wgmma_rs_n128_tb(acc, pa[ks], wg_desc(pV + ks * 16 * D, CB, 128));
      wg_commit();
      wg_wait<1>();  // the scores are in; P V may still run
    } else {
      wg_wait<0>();
    }
    // Scores in log2 units with the mask and bounds (interior blocks skip the tests); each
    // row's max and sum by trees (short dependency chains).
    const bool interior = k0 + BC <= T && (!causal || k0 + BC - 1 <= q0);
#pragma unroll
    for (int nt = 0; nt < BC / 8; ++nt) {
      float2 madd = make_float2(0.f, 0.f);
      if (MASKED) madd = *reinterpret_cast<const float2*>(cM + nt * 8 + 2 * t4);
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int kj = k0 + nt * 8 + 2 * t4 + c;
        const float ma = c ? madd.y : madd.x;
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          float& x = s[4 * nt + 2 * r + c];
          x = MASKED ? fmaf(ma, FL_LOG2E, x * sl2) : x * sl2;
          if (!interior && (kj >= T || (causal && kj > qi[r]))) x = -INFINITY;
        }
      }
    }
    float mu[2], alpha[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float t[BC / 8];
#pragma unroll
      for (int nt = 0; nt < BC / 8; ++nt) t[nt] = fmaxf(s[4 * nt + 2 * r], s[4 * nt + 2 * r + 1]);
#pragma unroll
      for (int w = BC / 16; w > 0; w >>= 1)
#pragma unroll
        for (int i = 0; i < w; ++i) t[i] = fmaxf(t[i], t[i + w]);
      float mx = fmaxf(m[r], t[0]);
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      mu[r] = mx == -INFINITY ? 0.f : mx;
      alpha[r] = exp2f(m[r] - mu[r]);
      m[r] = mx;
    }
#pragma unroll
    for (int i = 0; i < BC / 2; ++i) s[i] = exp2f(s[i] - mu[(i >> 1) & 1]);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float t[BC / 8];
#pragma unroll
      for (int nt = 0; nt < BC / 8; ++nt) t[nt] = s[4 * nt + 2 * r] + s[4 * nt + 2 * r + 1];
#pragma unroll
      for (int w = BC / 16; w > 0; w >>= 1)
#pragma unroll
        for (int i = 0; i < w; ++i) t[i] += t[i + w];
      l[r] = l[r] * alpha[r] + t[0];
    }
    wg_wait<0>();  // P V of block kb - 1 is in acc and done with pa
    if (alpha[0] != 1.f || alpha[1] != 1.f) {
#pragma unroll
      for (int n = 0; n < D / 8; ++n) {
        acc[4 * n] *= alpha[0];
        acc[4 * n + 1] *= alpha[0];
        acc[4 * n + 2] *= alpha[1];
        acc[4 * n + 3] *= alpha[1];
      }
    }
#pragma unroll
    for (int ks = 0; ks < BC / 16; ++ks) pack_a(pa[ks], s + 8 * ks, s + 8 * ks + 4);
  }
  cp_async_wait<0>();
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
  __syncthreads();
  const bf16* pV = sV + ((nkb - 1) & 1) * BC * D;
  wg_fence();
#pragma unroll
  for (int ks = 0; ks < BC / 16; ++ks)
    wgmma_rs_n128_tb(acc, pa[ks], wg_desc(pV + ks * 16 * D, CB, 128));
  wg_commit();
  wg_wait<0>();
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float li = l[r];
    li += __shfl_xor_sync(0xffffffffu, li, 1);
    li += __shfl_xor_sync(0xffffffffu, li, 2);
    if (qi[r] >= T) continue;
    const float inv = li > 0.f ? 1.f / li : 0.f;
    bf16* orow = o + (long long)qi[r] * osr;
#pragma unroll
    for (int n = 0; n < D / 8; ++n)
      *reinterpret_cast<uint32_t*>(orow + n * 8 + 2 * t4) =
          pack_bf16(acc[4 * n + 2 * r] * inv, acc[4 * n + 2 * r + 1] * inv);
    if (t4 == 0) {
      const float mu = m[r] == -INFINITY ? 0.f : m[r];
      lse[((long long)b * H + h) * T + qi[r]] = mu * FL_LN2 + logf(li);
    }
  }
}

// d (m64n64, f32) = (scale_d ? d : 0) + A B, A (m-major: [k][m], m contiguous) and B (n-major)
// from shared memory, both transposed.
__device__ __forceinline__ void wgmma_ss_n64_tt(float* d, uint64_t da, uint64_t db, int scale_d) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "l"(da), "l"(db), "r"(scale_d));
}

// Hopper backward at head_dim 128: flash_bwd's contract with warpgroup MMAs. A block of two
// warpgroups owns 128 keys (64 each) of one kv head and loops over query blocks of 64 rows of
// every query head of its group. Per block each warpgroup forms S^T = K Q^T and dP^T = V dO^T
// (64 keys x 64 queries, both operands k-major in shared memory), turns them into P^T and
// dS^T = P^T (dP^T - D) in registers, accumulates dV += P^T dO and dK += dS^T Q with P^T and dS^T
// as register A operands (dO and Q read transposed), and writes dS^T to shared memory, from
// which dQ = dS K (64 queries x its half of the columns, dS read m-major) is added into the f32
// buffer with vector atomics. Tiles in wgmma's no-swizzle core-matrix layout (see flash_fwd_wg).
// The loop is flash_bwd's (two block-wide barriers a query block, nothing overlapped across
// them); adding dQ by bulk reductions (`cp.reduce.async.bulk`) from a staging tile measured
// slower than the atomics.
__device__ void flash_bwd_wg(FLASH_BWD_PARAMS(__restrict__)) {
  constexpr int D = 128, BR = 64, BC = 128, CB = D / 8 * 128;  // CB: bytes between row blocks
  constexpr int SB = BR / 8 * 128;  // bytes between key blocks of dS^T ([BC][BR] tile)
  extern __shared__ __align__(16) unsigned char fl_smem[];
  float* sL = reinterpret_cast<float*>(fl_smem);    // 2 x [BR] lse * log2(e)
  float* sDd = sL + 2 * BR;                          // 2 x [BR]
  bf16* sK = reinterpret_cast<bf16*>(sDd + 2 * BR);  // [BC][D]
  bf16* sV = sK + BC * D;                            // [BC][D]
  bf16* sQ = sV + BC * D;                            // 2 x [BR][D]
  bf16* sdO = sQ + 2 * BR * D;                       // 2 x [BR][D]
  bf16* sdS = sdO + 2 * BR * D;                      // [BC][BR]: dS^T
  const int kvh = blockIdx.x, kb = blockIdx.y, b = blockIdx.z;
  const int G = H / KVH;
  const int wg = threadIdx.x >> 7, warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31;
  const int g = lane >> 2, t4 = lane & 3;
  const int k0 = kb * BC;
  k += b * ksb + kvh * ksh;
  v += b * vsb + kvh * vsh;
  const int nqb = (T + BR - 1) / BR;
  const int qb0 = causal ? k0 / BR : 0;
  const int nq = nqb - qb0, total = G * nq;
  auto issue = [&](int it, int bf) {
    const int hq = kvh * G + it / nq, q0 = (qb0 + it % nq) * BR;
    wg_load_async<BR>(sQ + bf * BR * D, q + b * qsb + hq * qsh, qsr, q0, T);
    wg_load_async<BR>(sdO + bf * BR * D, dout + b * dsb + hq * dsh, dsr, q0, T);
    if (threadIdx.x < BR) {
      const int i = q0 + threadIdx.x;
      const long long row = ((long long)b * H + hq) * T + i;
      sL[bf * BR + threadIdx.x] = i < T ? lse[row] * FL_LOG2E : 0.f;
      sDd[bf * BR + threadIdx.x] = i < T ? dvec[row] : 0.f;
    }
  };
  wg_load_async<BC>(sK, k, ksr, k0, T);
  wg_load_async<BC>(sV, v, vsr, k0, T);
  if (total > 0) issue(0, 0);
  cp_async_commit();
  // This thread's keys (rows of S^T): kr[r] within the block, and their mask * log2(e).
  const int kr[2] = {wg * 64 + warp * 16 + g, wg * 64 + warp * 16 + g + 8};
  float mk[2];
#pragma unroll
  for (int r = 0; r < 2; ++r)
    mk[r] = k0 + kr[r] < T && mask ? mask[(long long)b * T + k0 + kr[r]] * FL_LOG2E : 0.f;
  float dka[D / 2], dva[D / 2];
#pragma unroll
  for (int i = 0; i < D / 2; ++i) dka[i] = dva[i] = 0.f;
  const float sl2 = scale * FL_LOG2E;
  const uint64_t dK_ = wg_desc(sK + wg * 64 * D, 128, CB), dV_ = wg_desc(sV + wg * 64 * D, 128, CB);
  for (int it = 0; it < total; ++it) {
    const int hq = kvh * G + it / nq, q0 = (qb0 + it % nq) * BR, bf = it & 1;
    cp_async_wait<0>();
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    __syncthreads();  // this block's tiles are in; the last iteration is done with sdS and bf^1
    if (it + 1 < total) {
      issue(it + 1, bf ^ 1);
      cp_async_commit();
    }
    const bf16* cQ = sQ + bf * BR * D;
    const bf16* cdO = sdO + bf * BR * D;
    const float* cL = sL + bf * BR;
    const float* cD = sDd + bf * BR;
    float s[BR / 2], dp[BR / 2];
    const uint64_t dq_ = wg_desc(cQ, 128, CB), ddo = wg_desc(cdO, 128, CB);
    wg_fence();
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) wgmma_ss_n64(s, dK_ + ks * 16, dq_ + ks * 16, ks > 0);
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) wgmma_ss_n64(dp, dV_ + ks * 16, ddo + ks * 16, ks > 0);
    wg_commit();
    wg_wait<0>();
    // P^T and dS^T (unscaled: scale goes on dQ and dK); interior tiles skip the tests.
    const bool interior = q0 + BR <= T && k0 + BC <= T && (!causal || k0 + BC - 1 <= q0);
    uint32_t pa[BR / 16][4], sa[BR / 16][4];
#pragma unroll
    for (int j = 0; j < BR / 8; ++j) {
      const int ql = j * 8 + 2 * t4;
      const float2 lq = *reinterpret_cast<const float2*>(cL + ql);
      const float2 dq = *reinterpret_cast<const float2*>(cD + ql);
#pragma unroll
      for (int r = 0; r < 2; ++r)
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int e = 4 * j + 2 * r + c, qi = q0 + ql + c, key = k0 + kr[r];
          float p = 0.f;
          if (interior || (qi < T && key < T && !(causal && key > qi)))
            p = exp2f(s[e] * sl2 + mk[r] - (c ? lq.y : lq.x));
          s[e] = p;
          dp[e] = p * (dp[e] - (c ? dq.y : dq.x));
        }
    }
#pragma unroll
    for (int ks = 0; ks < BR / 16; ++ks) {
      pack_a(pa[ks], s + 8 * ks, s + 8 * ks + 4);
      pack_a(sa[ks], dp + 8 * ks, dp + 8 * ks + 4);
    }
    // dS^T into shared memory for dQ: rows kr, columns 8j + 2t4.
#pragma unroll
    for (int j = 0; j < BR / 8; ++j)
#pragma unroll
      for (int r = 0; r < 2; ++r)
        *reinterpret_cast<uint32_t*>(reinterpret_cast<unsigned char*>(sdS) +
                                     (kr[r] >> 3) * SB + j * 128 + (kr[r] & 7) * 16 + t4 * 4) =
            pack_bf16(dp[4 * j + 2 * r], dp[4 * j + 2 * r + 1]);
    wg_fence();
#pragma unroll
    for (int ks = 0; ks < BR / 16; ++ks)
      wgmma_rs_n128_tb(dva, pa[ks], wg_desc(cdO + ks * 16 * D, CB, 128));
#pragma unroll
    for (int ks = 0; ks < BR / 16; ++ks)
      wgmma_rs_n128_tb(dka, sa[ks], wg_desc(cQ + ks * 16 * D, CB, 128));
    wg_commit();
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    __syncthreads();  // dS^T of both warpgroups is in
    // dQ = dS K: this warpgroup's 64 columns, k = the BC keys.
    float dqa[32];
    const uint64_t dsd = wg_desc(sdS, SB, 128);
    const uint64_t dkd = wg_desc(sK + wg * 8 * 64, CB, 128);  // columns wg*64..: 8 core matrices on
#pragma unroll
    for (int ks = 0; ks < BC / 16; ++ks)
      wgmma_ss_n64_tt(dqa, dsd + ks * (2 * SB / 16), dkd + ks * (2 * CB / 16), ks > 0);
    wg_commit();
    wg_wait<0>();
    float* dqh = dq_acc + ((long long)b * H + hq) * T * D;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int qi = q0 + warp * 16 + g + 8 * r;
      if (qi >= T) continue;
      float* dqr = dqh + (long long)qi * D + wg * 64;
#pragma unroll
      for (int j = 0; j < 8; ++j)
        atomicAdd(reinterpret_cast<float2*>(dqr + j * 8 + 2 * t4),
                  make_float2(dqa[4 * j + 2 * r] * scale, dqa[4 * j + 2 * r + 1] * scale));
    }
  }
  cp_async_wait<0>();
  dk += b * dksb + kvh * dksh;
  dv += b * dvsb + kvh * dvsh;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int key = k0 + kr[r];
    if (key >= T) continue;
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      const int col = n * 8 + 2 * t4;
      *reinterpret_cast<uint32_t*>(dk + (long long)key * dksr + col) =
          pack_bf16(dka[4 * n + 2 * r] * scale, dka[4 * n + 2 * r + 1] * scale);
      *reinterpret_cast<uint32_t*>(dv + (long long)key * dvsr + col) =
          pack_bf16(dva[4 * n + 2 * r], dva[4 * n + 2 * r + 1]);
    }
  }
}
#endif

// Declared in every compilation pass, its body only where the Hopper instructions exist.
extern "C" __global__ void __launch_bounds__(384, 1)
    st_flash_fwd_wg_d128_bf16(FLASH_FWD_PARAMS()) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  if (mask)
    flash_fwd_wg<true>(FLASH_FWD_ARGS);
  else
    flash_fwd_wg<false>(FLASH_FWD_ARGS);
#endif
}

extern "C" __global__ void __launch_bounds__(256, 1)
    st_flash_bwd_wg_d128_bf16(FLASH_BWD_PARAMS()) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  flash_bwd_wg(FLASH_BWD_ARGS);
#endif
}

// dvec[b, h, i] = sum_d do[b, h, i, d] * o[b, h, i, d]: one warp per row, 8 rows per block.
__device__ void flash_bwd_pre(const bf16* __restrict__ o, const bf16* __restrict__ dout,
                              float* __restrict__ dvec, int B, int T, int H, int D, long long osb,
                              long long osh, long long osr, long long dsb, long long dsh,
                              long long dsr) {
  const long long row = (long long)blockIdx.x * 8 + (threadIdx.x >> 5);
  if (row >= (long long)B * H * T) return;
  const int lane = threadIdx.x & 31;
  const int i = row % T;
  const long long bh = row / T;
  const int h = bh % H, b = bh / H;
  const bf16* orow = o + b * osb + h * osh + i * osr;
  const bf16* drow = dout + b * dsb + h * dsh + i * dsr;
  float s = 0.f;
  for (int c = lane; c < D; c += 32) s += ld(orow[c]) * ld(drow[c]);
  s = warp_sum(s);
  if (lane == 0) dvec[row] = s;
}

// dq[b, h, i, :] (bf16, strided) from the f32 accumulator [b, h, T, D].
__device__ void flash_dq_store(const float* __restrict__ acc, bf16* __restrict__ dq, int B, int T,
                               int H, int D, long long sb, long long sh, long long sr) {
  const long long n = (long long)B * H * T * D;
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
       i += (long long)gridDim.x * blockDim.x) {
    const int c = i % D;
    const long long r = i / D;
    const int t = r % T;
    const long long bh = r / T;
    const int h = bh % H, b = bh / H;
    dq[b * sb + h * sh + t * sr + c] = __float2bfloat16(acc[i]);
  }
}

// A fragment (16 x 16) at rows r0 .. r0+16, columns k0 .. k0+16 of A = T^T, where the tile T is
// stored [k][m] row-major (row stride SS): ldmatrix.x4.trans, matrices (k0, r0), (k0, r0+8),
// (k0+8, r0), (k0+8, r0+8) of T in the order a0..a3.
__device__ __forceinline__ void ldsm_a_trans(uint32_t* a, const bf16* tile, int SS, int r0,
                                             int k0) {
  const int l = threadIdx.x & 31, mi = l >> 3;
  const bf16* p = tile + (k0 + (mi >> 1) * 8 + (l & 7)) * SS + r0 + (mi & 1) * 8;
  const unsigned addr = (unsigned)__cvta_generic_to_shared(p);
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(a[0]), "=r"(a[1]), "=r"(a[2]), "=r"(a[3])
               : "r"(addr));
}

// One block of 8 warps per (kv head, 128 keys, batch), looping over query blocks of 64 rows of
// every query head of the kv group (grouped-query attention sums over the group without
// atomics); the query-side tiles (q, do, lse, D) are double-buffered, and causal blocks skip the
// query blocks wholly before their keys, so the first key blocks are the heaviest: the grid runs
// the kv heads fastest, so those run first over all heads and the light ones fill the tail. Each of the five products of a (key block, query block)
// tile spreads over the 8 warps as a 2-d grid of 32-row tiles, so a fragment read from shared
// memory feeds two or four tensor-core products (the layout of FlashAttention-2's backward):
//   S = Q K^T and dP = dO V^T (64 x 128): warps 2 (queries) x 4 (keys);
//   P and dS = P (dP - D) go to shared memory as bf16 [query][key];
//   dV += P^T dO and dK += dS^T Q (128 x D): warps 4 (keys) x 2 (columns), in registers over the
//   whole loop;
//   dQ = dS K (64 x D): warps 2 (queries) x 4 (columns), added into the f32 buffer with atomics.
template <int D>
__device__ void flash_bwd(FLASH_BWD_PARAMS(__restrict__)) {
  constexpr int BR = 64, BC = 128, SD = D + 8, SP = BC + 8;
  constexpr int NKV = D / 16, NQ = D / 32;  // 8-column tiles a warp owns in dK/dV, in dQ
  extern __shared__ __align__(16) unsigned char fl_smem[];
  float* sL = reinterpret_cast<float*>(fl_smem);  // 2 x [BR] lse * log2(e)
  float* sDd = sL + 2 * BR;                        // 2 x [BR]
  bf16* sK = reinterpret_cast<bf16*>(sDd + 2 * BR);  // [BC][SD]
  bf16* sV = sK + BC * SD;                           // [BC][SD]
  bf16* sQ = sV + BC * SD;                           // 2 x [BR][SD]
  bf16* sdO = sQ + 2 * BR * SD;                      // 2 x [BR][SD]
  bf16* sP = sdO + 2 * BR * SD;                      // [BR][SP]
  bf16* sdS = sP + BR * SP;                          // [BR][SP]
  const int kvh = blockIdx.x, kb = blockIdx.y, b = blockIdx.z;
  const int G = H / KVH;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;
  const int k0 = kb * BC;
  k += b * ksb + kvh * ksh;
  v += b * vsb + kvh * vsh;
  const int nqb = (T + BR - 1) / BR;
  const int qb0 = causal ? k0 / BR : 0;
  const int nq = nqb - qb0, total = G * nq;
  // Copies query block `it` (head kvh*G + it / nq, rows (qb0 + it % nq) * BR ..) into buffer bf.
  auto issue = [&](int it, int bf) {
    const int hq = kvh * G + it / nq, q0 = (qb0 + it % nq) * BR;
    fl_load_async<D, BR>(sQ + bf * BR * SD, SD, q + b * qsb + hq * qsh, qsr, q0, T);
    fl_load_async<D, BR>(sdO + bf * BR * SD, SD, dout + b * dsb + hq * dsh, dsr, q0, T);
    if (threadIdx.x < BR) {
      const int i = q0 + threadIdx.x;
      const long long row = ((long long)b * H + hq) * T + i;
      sL[bf * BR + threadIdx.x] = i < T ? lse[row] * FL_LOG2E : 0.f;
      sDd[bf * BR + threadIdx.x] = i < T ? dvec[row] : 0.f;
    }
  };
  fl_load_async<D, BC>(sK, SD, k, ksr, k0, T);
  fl_load_async<D, BC>(sV, SD, v, vsr, k0, T);
  if (total > 0) issue(0, 0);
  cp_async_commit();
  // This warp's tiles: S/dP rows sm*32.., keys sn*32..; dK/dV keys kn*32.., columns kd*D/2..;
  // dQ rows sm*32.., columns qd*D/4...
  const int sm = warp & 1, sn = warp >> 1, kn = warp & 3, kd = warp >> 2, qd = warp >> 1;
  // The key mask (times log2(e)) of the keys of this thread's S elements.
  float mk[4][2];
#pragma unroll
  for (int nt = 0; nt < 4; ++nt)
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      const int key = k0 + sn * 32 + nt * 8 + 2 * t4 + c;
      mk[nt][c] = key < T && mask ? mask[(long long)b * T + key] * FL_LOG2E : 0.f;
    }
  float dka[2][NKV][4], dva[2][NKV][4];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int n = 0; n < NKV; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) dka[i][n][e] = dva[i][n][e] = 0.f;
  const float sl2 = scale * FL_LOG2E;
  for (int it = 0; it < total; ++it) {
    const int hq = kvh * G + it / nq, q0 = (qb0 + it % nq) * BR, bf = it & 1;
    // This block's tiles have landed, and every warp is done with the last iteration (so with
    // the other buffer, and with sP and sdS): the next block's copy overlaps this one's work.
    cp_async_wait<0>();
    __syncthreads();
    if (it + 1 < total) {
      issue(it + 1, bf ^ 1);
      cp_async_commit();
    }
    const bf16* cQ = sQ + bf * BR * SD;
    const bf16* cdO = sdO + bf * BR * SD;
    const float* cL = sL + bf * BR;
    const float* cD = sDd + bf * BR;
    // S = Q K^T and dP = dO V^T: 32 queries x 32 keys a warp.
    float s[2][4][4], dp[2][4][4];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int nt = 0; nt < 4; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[i][nt][e] = dp[i][nt][e] = 0.f;
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
      uint32_t qa[2][4], da[2][4];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        ldsm_a(qa[i], cQ, SD, sm * 32 + 16 * i, ks * 16);
        ldsm_a(da[i], cdO, SD, sm * 32 + 16 * i, ks * 16);
      }
#pragma unroll
      for (int nt = 0; nt < 4; nt += 2) {
        uint32_t bk[4], bv[4];
        ldsm_b(bk, sK, SD, ks * 16, sn * 32 + nt * 8);
        ldsm_b(bv, sV, SD, ks * 16, sn * 32 + nt * 8);
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          mma_bf16(s[i][nt], qa[i], bk[0], bk[1]);
          mma_bf16(s[i][nt + 1], qa[i], bk[2], bk[3]);
          mma_bf16(dp[i][nt], da[i], bv[0], bv[1]);
          mma_bf16(dp[i][nt + 1], da[i], bv[2], bv[3]);
        }
      }
    }
    // P from the log-sum-exp and dS = P (dP - D) (unscaled: scale goes on dQ and dK), as bf16
    // [query][key] in shared memory. Interior tiles (every query and key in range, causal: every
    // key at or before every query) skip the per-element tests.
    const bool interior = q0 + BR <= T && k0 + BC <= T && (!causal || k0 + BC - 1 <= q0);
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int ql = sm * 32 + 16 * i + g + 8 * r, qi = q0 + ql;
        const float lq = cL[ql], dq = cD[ql];
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) {
          const int kl = sn * 32 + nt * 8 + 2 * t4;
          float p[2], ds[2];
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            const int key = k0 + kl + c;
            p[c] = 0.f;
            if (interior || (qi < T && key < T && !(causal && key > qi)))
              p[c] = exp2f(s[i][nt][2 * r + c] * sl2 + mk[nt][c] - lq);
            ds[c] = p[c] * (dp[i][nt][2 * r + c] - dq);
          }
          *reinterpret_cast<uint32_t*>(sP + ql * SP + kl) = pack_bf16(p[0], p[1]);
          *reinterpret_cast<uint32_t*>(sdS + ql * SP + kl) = pack_bf16(ds[0], ds[1]);
        }
      }
    __syncthreads();
    // dV += P^T dO and dK += dS^T Q: 32 keys x D/2 columns a warp, k = the BR queries.
#pragma unroll
    for (int ks = 0; ks < BR / 16; ++ks) {
      uint32_t pa[2][4], sa[2][4];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        ldsm_a_trans(pa[i], sP, SP, kn * 32 + 16 * i, ks * 16);
        ldsm_a_trans(sa[i], sdS, SP, kn * 32 + 16 * i, ks * 16);
      }
#pragma unroll
      for (int n = 0; n < NKV; n += 2) {
        uint32_t bd[4], bq[4];
        ldsm_b_trans(bd, cdO, SD, ks * 16, kd * (D / 2) + n * 8);
        ldsm_b_trans(bq, cQ, SD, ks * 16, kd * (D / 2) + n * 8);
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          mma_bf16(dva[i][n], pa[i], bd[0], bd[1]);
          mma_bf16(dva[i][n + 1], pa[i], bd[2], bd[3]);
          mma_bf16(dka[i][n], sa[i], bq[0], bq[1]);
          mma_bf16(dka[i][n + 1], sa[i], bq[2], bq[3]);
        }
      }
    }
    // dQ = dS K: 32 queries x D/4 columns a warp, k = the BC keys.
    float dqa[2][NQ][4];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < NQ; ++j) dqa[i][j][0] = dqa[i][j][1] = dqa[i][j][2] = dqa[i][j][3] = 0.f;
#pragma unroll
    for (int ks = 0; ks < BC / 16; ++ks) {
      uint32_t a[2][4];
#pragma unroll
      for (int i = 0; i < 2; ++i) ldsm_a(a[i], sdS, SP, sm * 32 + 16 * i, ks * 16);
#pragma unroll
      for (int j = 0; j < NQ; j += 2) {
        uint32_t bk[4];
        ldsm_b_trans(bk, sK, SD, ks * 16, qd * (D / 4) + j * 8);
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          mma_bf16(dqa[i][j], a[i], bk[0], bk[1]);
          mma_bf16(dqa[i][j + 1], a[i], bk[2], bk[3]);
        }
      }
    }
    float* dqh = dq_acc + ((long long)b * H + hq) * T * D;
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int qi = q0 + sm * 32 + 16 * i + g + 8 * r;
        if (qi >= T) continue;
        float* dqr = dqh + (long long)qi * D;
#pragma unroll
        for (int j = 0; j < NQ; ++j) {
          const int col = qd * (D / 4) + j * 8 + 2 * t4;
          // One 8-byte reduction per pair (sm_90's vector atomics).
          atomicAdd(reinterpret_cast<float2*>(dqr + col),
                    make_float2(dqa[i][j][2 * r] * scale, dqa[i][j][2 * r + 1] * scale));
        }
      }
  }
  cp_async_wait<0>();
  dk += b * dksb + kvh * dksh;
  dv += b * dvsb + kvh * dvsh;
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int key = k0 + kn * 32 + 16 * i + g + 8 * r;
      if (key >= T) continue;
#pragma unroll
      for (int n = 0; n < NKV; ++n) {
        const int col = kd * (D / 2) + n * 8 + 2 * t4;
        *reinterpret_cast<uint32_t*>(dk + (long long)key * dksr + col) =
            pack_bf16(dka[i][n][2 * r] * scale, dka[i][n][2 * r + 1] * scale);
        *reinterpret_cast<uint32_t*>(dv + (long long)key * dvsr + col) =
            pack_bf16(dva[i][n][2 * r], dva[i][n][2 * r + 1]);
      }
    }
}

#define FLASH_FWD(DIM, MT, BC)                                                                  \
  extern "C" __global__ void __launch_bounds__(128)                                             \
      st_flash_fwd_d##DIM##_m##MT##c##BC##_bf16(FLASH_FWD_PARAMS()) {                           \
    flash_fwd<DIM, MT, BC>(FLASH_FWD_ARGS);                                                     \
  }
FLASH_FWD(64, 2, 64)
FLASH_FWD(128, 1, 32)

#define FLASH_INSTANTIATE(DIM)                                                                  \
  extern "C" __global__ void __launch_bounds__(256)                                             \
      st_flash_bwd_d##DIM##_bf16(FLASH_BWD_PARAMS()) {                                          \
    flash_bwd<DIM>(FLASH_BWD_ARGS);                                                             \
  }

FLASH_INSTANTIATE(64)
FLASH_INSTANTIATE(128)

extern "C" __global__ void st_flash_bwd_pre_bf16(const bf16* o, const bf16* dout, float* dvec,
                                                 int B, int T, int H, int D, long long osb,
                                                 long long osh, long long osr, long long dsb,
                                                 long long dsh, long long dsr) {
  flash_bwd_pre(o, dout, dvec, B, T, H, D, osb, osh, osr, dsb, dsh, dsr);
}

extern "C" __global__ void st_flash_dq_store_bf16(const float* acc, bf16* dq, int B, int T, int H,
                                                  int D, long long sb, long long sh,
                                                  long long sr) {
  flash_dq_store(acc, dq, B, T, H, D, sb, sh, sr);
}
