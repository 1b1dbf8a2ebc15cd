// The CPU kernels of the centered soft-target cross-entropies, forward and gradient in one pass.
//
// Built at first use by dino_fast/ops/native/build.py (g++, C++17, no torch headers: plain
// pointers through ctypes) and called by dino_fast/ops/soft_ce/native.py (the DINO loss over all
// teacher/student crop pairs) and dino_fast/ops/patch_ce/native.py (iBOT's row-aligned pairs).
//
// Per row of K logits, with the row's target distribution Q (a teacher softmax or a sum of them)
// and x = S_row:
//   pass 1  m = max(x), d = <Q, x>                      (reads x and Q)
//   pass 2  e_k = exp(x_k / tau_s - m / tau_s), Z = sum e  (reads x, writes e to a thread buffer)
//   pass 3  G_k = g (|Q| e_k / Z - Q_k)                  (reads e and Q, writes G once)
// lse = m / tau_s + log Z and the row's loss |Q| lse - d / tau_s. The thread buffers of a row
// (x converted to fp32 when needed, e, the teacher rows of the image) stay in the core's L2, so
// the student logits are read from memory once and the gradient written once. One exp per
// element; the exp is a vectorised Cephes polynomial (relative error ~2 ulp), 0 below -87.
// Every worker thread runs with flush-to-zero and denormals-are-zero (set and restored around the
// work in its own MXCSR): probabilities below 1e-38 of a row's mass count as 0. The threads are
// the OpenMP pool torch uses (see run_parallel).
//
// Vectors are GCC vector extensions of 16 floats (one AVX-512 register, two AVX2 registers, or
// four SSE registers, whatever -march gives).
#include <math.h>
#include <omp.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <xmmintrin.h>
#include <pmmintrin.h>

#include <vector>

namespace {

constexpr int W = 16;
typedef float v16 __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
typedef uint32_t v16u __attribute__((vector_size(64)));
typedef uint16_t v16s __attribute__((vector_size(32)));
typedef _Float16 v16h __attribute__((vector_size(32)));

enum DType { F32 = 0, BF16 = 1, F16 = 2 };
constexpr float PAD = -1e30f;  // padding of a row's last partial vector: never a max, exp -> 0

inline v16 splat(float x) { return v16{} + x; }

inline v16 loadu(const float* p) {
  v16 v;
  memcpy(&v, p, sizeof(v));
  return v;
}

inline void storeu(float* p, v16 v) { memcpy(p, &v, sizeof(v)); }

inline float hsum(v16 v) {
  float s = 0.f;
  for (int i = 0; i < W; ++i) s += v[i];
  return s;
}

inline float hmax(v16 v) {
  float m = v[0];
  for (int i = 1; i < W; ++i) m = v[i] > m ? v[i] : m;
  return m;
}

// exp(x) for x <= ~88; 0 for x < -87 (no subnormal results); NaN stays NaN.
inline v16 vexp(v16 x) {
  const v16i under = x < -87.0f;
  x = under ? splat(-87.0f) : x;
  const v16 t = x * 1.44269504088896341f;
  const v16 n = (t + 12582912.0f) - 12582912.0f;  // round to nearest (|t| < 2^22)
  v16 r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  v16 p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const v16i e = (__builtin_convertvector(n, v16i) + 127) << 23;
  const v16 y = p * (v16)e;  // a cast between vector types of one size reinterprets the bits (no aliasing)
  return under ? splat(0.0f) : y;
}

// Convert n elements of a row of dtype `dt` to fp32 in `dst` (n rounded up to W, padded).
void to_f32(const void* src, int dt, int64_t n, int64_t np, float* dst) {
  int64_t k = 0;
  if (dt == BF16) {
    const uint16_t* s = static_cast<const uint16_t*>(src);
    for (; k + W <= n; k += W) {
      v16s u;
      memcpy(&u, s + k, sizeof(u));
      const v16u b = __builtin_convertvector(u, v16u) << 16;
      storeu(dst + k, (v16)b);
    }
    for (; k < n; ++k) {
      const uint32_t b = static_cast<uint32_t>(s[k]) << 16;
      memcpy(dst + k, &b, 4);
    }
  } else if (dt == F16) {
    const _Float16* s = static_cast<const _Float16*>(src);
    for (; k + W <= n; k += W) {
      v16h h;
      memcpy(&h, s + k, sizeof(h));
      storeu(dst + k, __builtin_convertvector(h, v16));
    }
    for (; k < n; ++k) dst[k] = static_cast<float>(s[k]);
  } else {
    memcpy(dst, src, n * sizeof(float));
    k = n;
  }
  for (; k < np; ++k) dst[k] = PAD;
}

// Round a vector to bf16 (nearest even; NaN stays a quiet NaN).
inline v16s to_bf16(v16 v) {
  const v16u b = (v16u)v;
  v16u r = (b + 0x7FFFu + ((b >> 16) & 1u)) >> 16;
  const v16i nan = v != v;
  r = nan ? v16u{} + 0x7FC0u : r;
  return __builtin_convertvector(r, v16s);
}

// Store vector `v` as elements [k, k + cnt) of a row of dtype `dt` (cnt <= W).
inline void store_row(void* dst, int dt, int64_t k, v16 v, int cnt) {
  if (dt == F32) {
    float* d = static_cast<float*>(dst) + k;
    if (cnt == W) storeu(d, v); else memcpy(d, &v, cnt * sizeof(float));
  } else if (dt == BF16) {
    const v16s s = to_bf16(v);
    uint16_t* d = static_cast<uint16_t*>(dst) + k;
    if (cnt == W) memcpy(d, &s, sizeof(s)); else memcpy(d, &s, cnt * 2);
  } else {
    const v16h h = __builtin_convertvector(v, v16h);
    _Float16* d = static_cast<_Float16*>(dst) + k;
    if (cnt == W) memcpy(d, &h, sizeof(h)); else memcpy(d, &h, cnt * 2);
  }
}

inline int64_t elem_size(int dt) { return dt == F32 ? 4 : 2; }

// A row of dtype dt as fp32: the row itself when it already is one and K is a multiple of W,
// else converted into buf (padded with PAD up to Kp).
inline const float* f32_row(const void* row, int dt, int64_t K, int64_t Kp, float* buf) {
  if (dt == F32 && K == Kp) return static_cast<const float*>(row);
  to_f32(row, dt, K, Kp, buf);
  return buf;
}

// Elements [k, k + cnt) of a row of dtype dt as a vector (cnt <= W; the rest PAD).
inline v16 load16(const void* row, int dt, int64_t k, int cnt) {
  if (cnt == W) {
    if (dt == F32) return loadu(static_cast<const float*>(row) + k);
    if (dt == BF16) {
      v16s u;
      memcpy(&u, static_cast<const uint16_t*>(row) + k, sizeof(u));
      const v16u b = __builtin_convertvector(u, v16u) << 16;
      return (v16)b;
    }
    v16h h;
    memcpy(&h, static_cast<const _Float16*>(row) + k, sizeof(h));
    return __builtin_convertvector(h, v16);
  }
  float buf[W];
  to_f32(static_cast<const char*>(row) + k * elem_size(dt), dt, cnt, W, buf);
  return loadu(buf);
}

// Teacher row t (fp32, padded) -> q = softmax((t - c) * inv_t) into q (Kp, zero padded), and
// t added into colsum when colsum is not null.
void teacher_softmax(const float* t, const float* c, float inv_t, int64_t K, int64_t Kp, float* q,
                     float* colsum) {
  v16 mx = splat(-INFINITY);
  for (int64_t k = 0; k < Kp; k += W) {
    const v16 tv = loadu(t + k);
    const v16 u = (tv - loadu(c + k)) * inv_t;
    storeu(q + k, u);
    mx = u > mx ? u : mx;
    if (colsum) storeu(colsum + k, loadu(colsum + k) + tv);
  }
  const float m = hmax(mx);
  v16 z = {};
  for (int64_t k = 0; k < Kp; k += W) {
    const v16 e = vexp(loadu(q + k) - m);
    storeu(q + k, e);
    z += e;
  }
  const float inv_z = 1.0f / hsum(z);
  for (int64_t k = 0; k < Kp; k += W) storeu(q + k, loadu(q + k) * inv_z);
  for (int64_t k = K; k < Kp; ++k) q[k] = 0.f;  // padding: no target mass
}

// One student row x (fp32, padded with PAD) against the target Q (Kp, zero padded) of mass nq:
// writes G = g (nq softmax(x / tau_s) - Q) into grad (dtype gdt, K elements), returns lse of
// x / tau_s through *lse and <Q, x / tau_s> through *dot. e: a Kp fp32 scratch buffer.
void student_row(const float* x, const float* Q, float nq, float inv_s, float g, int64_t K, int64_t Kp,
                 float* e, void* grad, int gdt, float* lse, double* dot) {
  v16 mx = splat(-INFINITY), d = {};
  for (int64_t k = 0; k < Kp; k += W) {
    const v16 xv = loadu(x + k);
    mx = xv > mx ? xv : mx;
    d += xv * loadu(Q + k);
  }
  const float m = hmax(mx) * inv_s;
  v16 z = {};
  for (int64_t k = 0; k < Kp; k += W) {
    const v16 ev = vexp(loadu(x + k) * inv_s - m);
    storeu(e + k, ev);
    z += ev;
  }
  const float Z = hsum(z);
  *lse = m + logf(Z);
  *dot = hsum(d) * inv_s;  // rounded like m: a one-hot row (K = 1, p = q) gives lse - dot = log Z = 0
  const float a = g * nq / Z;
  int64_t k = 0;
  for (; k + W <= K; k += W) store_row(grad, gdt, k, loadu(e + k) * a - loadu(Q + k) * g, W);
  if (k < K) store_row(grad, gdt, k, loadu(e + k) * a - loadu(Q + k) * g, static_cast<int>(K - k));
}

struct ThreadBuffers {
  std::vector<float> data;
  float* get(size_t n) {
    if (data.size() < n) data.assign(n, 0.f);
    return data.data();
  }
};

// cached scratch per worker index and the padded center (calls are serialised by g_lock): no
// allocation per call (fresh pages cost a page fault each, about as much as the loss itself)
pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;
std::vector<ThreadBuffers> g_buffers;
ThreadBuffers g_center;

// Holds g_lock for the whole of one call of an entry point that uses the shared scratch.
struct CallLock {
  CallLock() { pthread_mutex_lock(&g_lock); }
  ~CallLock() { pthread_mutex_unlock(&g_lock); }
  CallLock(const CallLock&) = delete;
  CallLock& operator=(const CallLock&) = delete;
};

// The thread count for n work items: at least 1, at most 256 (the partial sums' arrays) and n.
int clamp_threads(int nthreads, int64_t n) {
  if (nthreads > 256) nthreads = 256;
  if (nthreads > n) nthreads = static_cast<int>(n);
  return nthreads < 1 ? 1 : nthreads;
}

// Scratch of `per` floats for each of nthreads workers (g_buffers, kept between calls). With
// csum_at >= 0 the Kp floats at that offset, a worker's private column sum, are zeroed for
// every worker, also those the pool does not start. False on allocation failure.
bool worker_buffers(int nthreads, size_t per, int64_t csum_at, int64_t Kp) {
  try {
    if (static_cast<int>(g_buffers.size()) < nthreads) g_buffers.resize(nthreads);
    for (int i = 0; i < nthreads; ++i) g_buffers[i].get(per);
  } catch (...) {
    return false;
  }
  if (csum_at >= 0)
    for (int i = 0; i < nthreads; ++i) memset(g_buffers[i].data.data() + csum_at, 0, Kp * sizeof(float));
  return true;
}

// colsum[k] = the sum over the nthreads workers of their private column sums (offset csum_at).
void reduce_colsum(float* colsum, int64_t K, int nthreads, int64_t csum_at) {
  for (int64_t k = 0; k < K; ++k) {
    float s = 0.f;
    for (int i = 0; i < nthreads; ++i) s += g_buffers[i].data[static_cast<size_t>(csum_at + k)];
    colsum[k] = s;
  }
}

// A padded copy of c (Kp floats, zeros past K) in g_center; nullptr on allocation failure.
const float* padded_copy(const float* c, int64_t K, int64_t Kp) {
  float* p;
  try {
    p = g_center.get(static_cast<size_t>(Kp));
  } catch (...) {
    return nullptr;
  }
  memcpy(p, c, K * sizeof(float));
  for (int64_t k = K; k < Kp; ++k) p[k] = 0.f;
  return p;
}

struct Range {
  int64_t begin, end;
};

// Run fn(thread index, range of [0, n)) on nthreads threads of the process's OpenMP pool. The
// library links libgomp.so.1, the soname torch's own libgomp has, so once torch is loaded both
// share one pool: the threads that just ran a torch op take this work instead of spinning beside
// it. Each thread works with flush-to-zero / denormals-are-zero and restores its MXCSR after.
template <class F>
void run_parallel(int nthreads, int64_t n, F&& fn) {
  if (nthreads < 1) nthreads = 1;
  if (nthreads > n) nthreads = static_cast<int>(n > 0 ? n : 1);
#pragma omp parallel num_threads(nthreads)
  {
    const int i = omp_get_thread_num(), nt = omp_get_num_threads();
    const unsigned csr = _mm_getcsr();
    _mm_setcsr(csr | 0x8040u);  // FTZ (bit 15) and DAZ (bit 6)
    fn(i, Range{n * i / nt, n * (i + 1) / nt});
    _mm_setcsr(csr);
  }
}

}  // namespace

#define DFN_EXPORT __attribute__((visibility("default")))

extern "C" {

DFN_EXPORT int dfn_abi_version() { return 2; }

// The DINO loss over all pairs (teacher crop i, student crop v != i), per image b:
//   q_ib = softmax((T_ib - c) / tau_t), Q_vb = sum_{i != v} q_ib, |Q_v| = NT - [v < NT]
//   loss = sum_v coef_v sum_b (|Q_v| lse_vb - <Q_vb, S_vb / tau_s>)
//   G_vb = gscale_v (|Q_v| softmax(S_vb / tau_s) - Q_vb)
// S: ncrops*B rows (crop-major) of K, row stride s_stride elements, dtype s_dt; T: NT*B rows,
// t_stride, t_dt; c: K fp32; coef, gscale: ncrops each; out: loss (1 double), lse (ncrops*B fp32),
// colsum (K fp32, the column sum of T), G: ncrops*B rows of K, g_stride, dtype g_dt (may alias S
// when strides and dtypes agree: a row is read fully before it is written). Returns 0, or -1 on
// allocation failure.
DFN_EXPORT int dfn_soft_ce_fwd(const void* S, int64_t s_stride, int s_dt, const void* T, int64_t t_stride, int t_dt,
                    const float* c, int64_t B, int64_t K, int ncrops, int NT, float inv_s, float inv_t,
                    const double* coef, const float* gscale, void* G, int64_t g_stride, int g_dt,
                    double* loss, float* lse, float* colsum, int nthreads) {
  CallLock lock;
  const int64_t Kp = (K + W - 1) / W * W;
  nthreads = clamp_threads(nthreads, B);
  // per thread: NT teacher rows, the sum of all, the sum of others, e, x and t conversion
  // buffers, a private column sum
  const int64_t csum_at = Kp * (NT + 5);
  if (!worker_buffers(nthreads, static_cast<size_t>(csum_at + Kp), csum_at, Kp)) return -1;
  const float* cpad = padded_copy(c, K, Kp);
  if (cpad == nullptr) return -1;
  double partial[256] = {0.0};
  const int64_t se = elem_size(s_dt), te = elem_size(t_dt), ge = elem_size(g_dt);
  run_parallel(nthreads, B, [&](int ti, Range r) {
    float* base = g_buffers[ti].data.data();
    float* q = base;                           // NT x Kp
    float* qall = base + Kp * NT;              // sum of all teacher rows
    float* qoth = qall + Kp;                   // sum of the others (NT > 2)
    float* e = qoth + Kp;
    float* xbuf = e + Kp;
    float* tbuf = xbuf + Kp;
    float* csum = tbuf + Kp;  // zeroed before the parallel region
    double acc = 0.0;
    for (int64_t b = r.begin; b < r.end; ++b) {
      for (int i = 0; i < NT; ++i) {
        const char* trow = static_cast<const char*>(T) + ((i * B + b) * t_stride) * te;
        const float* t = f32_row(trow, t_dt, K, Kp, tbuf);
        teacher_softmax(t, cpad, inv_t, K, Kp, q + i * Kp, csum);
      }
      if (ncrops > NT) {
        for (int64_t k = 0; k < Kp; k += W) {
          v16 s = loadu(q + k);
          for (int i = 1; i < NT; ++i) s += loadu(q + i * Kp + k);
          storeu(qall + k, s);
        }
      }
      for (int v = 0; v < ncrops; ++v) {
        const int64_t row = v * B + b;
        const char* srow = static_cast<const char*>(S) + (row * s_stride) * se;
        char* grow = static_cast<char*>(G) + (row * g_stride) * ge;
        const float* Q;
        float nq;
        if (v < NT) {
          nq = static_cast<float>(NT - 1);
          if (NT == 1) {
            Q = qoth;
            memset(qoth, 0, Kp * sizeof(float));
          } else if (NT == 2) {
            Q = q + (1 - v) * Kp;
          } else {  // the exact sum of the others, not "all - q_v"
            for (int64_t k = 0; k < Kp; k += W) {
              v16 s = {};
              for (int i = 0; i < NT; ++i)
                if (i != v) s += loadu(q + i * Kp + k);
              storeu(qoth + k, s);
            }
            Q = qoth;
          }
        } else {
          nq = static_cast<float>(NT);
          Q = qall;
        }
        const float* x = f32_row(srow, s_dt, K, Kp, xbuf);
        float l;
        double d;
        student_row(x, Q, nq, inv_s, gscale[v], K, Kp, e, grow, g_dt, &l, &d);
        lse[row] = l;
        acc += coef[v] * (static_cast<double>(nq) * l - d);
      }
    }
    partial[ti] = acc;
  });
  double total = 0.0;
  for (int i = 0; i < nthreads; ++i) total += partial[i];
  *loss = total;
  reduce_colsum(colsum, K, nthreads, csum_at);
  return 0;
}

// Row-aligned pairs (iBOT): per row r, q_r = softmax((T_r - c) / tau_t),
//   loss = sum_r w_r (lse_r - <q_r, S_r / tau_s>),  G_r = w_r inv_s (softmax(S_r / tau_s) - q_r).
// Same layouts as dfn_soft_ce_fwd; colsum may be null (not computed).
DFN_EXPORT int dfn_patch_ce_fwd(const void* S, int64_t s_stride, int s_dt, const void* T, int64_t t_stride, int t_dt,
                     const float* c, const float* w, int64_t rows, int64_t K, float inv_s, float inv_t,
                     void* G, int64_t g_stride, int g_dt, double* loss, float* lse, float* colsum,
                     int nthreads) {
  CallLock lock;
  const int64_t Kp = (K + W - 1) / W * W;
  nthreads = clamp_threads(nthreads, rows);
  const int64_t csum_at = Kp * 4;  // per thread: q, e, x, t, then the private column sum
  if (!worker_buffers(nthreads, static_cast<size_t>(csum_at + Kp), csum_at, Kp)) return -1;
  const float* cpad = padded_copy(c, K, Kp);
  if (cpad == nullptr) return -1;
  double partial[256] = {0.0};
  const int64_t se = elem_size(s_dt), te = elem_size(t_dt), ge = elem_size(g_dt);
  run_parallel(nthreads, rows, [&](int ti, Range r) {
    float* q = g_buffers[ti].data.data();
    float* e = q + Kp;
    float* xbuf = e + Kp;
    float* tbuf = xbuf + Kp;
    float* csum = tbuf + Kp;  // zeroed before the parallel region
    double acc = 0.0;
    for (int64_t i = r.begin; i < r.end; ++i) {
      const float* t = f32_row(static_cast<const char*>(T) + i * t_stride * te, t_dt, K, Kp, tbuf);
      teacher_softmax(t, cpad, inv_t, K, Kp, q, colsum ? csum : nullptr);
      const float* x = f32_row(static_cast<const char*>(S) + i * s_stride * se, s_dt, K, Kp, xbuf);
      float l;
      double d;
      student_row(x, q, 1.0f, inv_s, w[i] * inv_s, K, Kp, e, static_cast<char*>(G) + i * g_stride * ge, g_dt,
                  &l, &d);
      lse[i] = l;
      acc += static_cast<double>(w[i]) * (static_cast<double>(l) - d);
    }
    partial[ti] = acc;
  });
  double total = 0.0;
  for (int i = 0; i < nthreads; ++i) total += partial[i];
  *loss = total;
  if (colsum) reduce_colsum(colsum, K, nthreads, csum_at);
  return 0;
}

// ------------------------------------------------------------------ Sinkhorn-Knopp (log domain)
// The iterates of log Q = X - u_k - v_r with X = T * inv_t are never stored: each pass reads T
// (rows R x K, row stride t_stride, dtype t_dt) and the two offset vectors. Per iteration the
// caller runs the two column passes (all-reducing the max, then the sums, across ranks between
// them) and sets u = m + log s + log K, then the row pass sets v; the last pass writes
// X - u - v + log N. Columns are split over the threads in blocks of 1024 (accumulators in L1),
// rows in ranges.

// m_k = max_r (X_rk - v_r)
DFN_EXPORT int dfn_sk_col_max(const void* T, int64_t t_stride, int t_dt, int64_t R, int64_t K, float inv_t,
                              const float* v, float* m, int nthreads) {
  const int64_t te = elem_size(t_dt);
  const int64_t nblk = (K + 1023) / 1024;
  run_parallel(nthreads, nblk, [&](int, Range rg) {
    for (int64_t blk = rg.begin; blk < rg.end; ++blk) {
      const int64_t k0 = blk * 1024, k1 = k0 + 1024 < K ? k0 + 1024 : K;
      v16 acc[64];
      for (int j = 0; j < 64; ++j) acc[j] = splat(-INFINITY);
      for (int64_t r = 0; r < R; ++r) {
        const char* row = static_cast<const char*>(T) + r * t_stride * te;
        const float vr = v[r];
        int j = 0;
        for (int64_t k = k0; k < k1; k += W, ++j) {
          const int cnt = k + W <= k1 ? W : static_cast<int>(k1 - k);
          const v16 x = load16(row, t_dt, k, cnt) * inv_t - vr;
          acc[j] = x > acc[j] ? x : acc[j];
        }
      }
      int j = 0;
      for (int64_t k = k0; k < k1; k += W, ++j) {
        const int cnt = k + W <= k1 ? W : static_cast<int>(k1 - k);
        memcpy(m + k, &acc[j], cnt * sizeof(float));
      }
    }
  });
  return 0;
}

// s_k = sum_r exp(X_rk - v_r - m_k)
DFN_EXPORT int dfn_sk_col_sumexp(const void* T, int64_t t_stride, int t_dt, int64_t R, int64_t K, float inv_t,
                                 const float* v, const float* m, float* sums, int nthreads) {
  const int64_t te = elem_size(t_dt);
  const int64_t nblk = (K + 1023) / 1024;
  run_parallel(nthreads, nblk, [&](int, Range rg) {
    for (int64_t blk = rg.begin; blk < rg.end; ++blk) {
      const int64_t k0 = blk * 1024, k1 = k0 + 1024 < K ? k0 + 1024 : K;
      v16 acc[64], mv[64];
      int j = 0;
      for (int64_t k = k0; k < k1; k += W, ++j) {
        const int cnt = k + W <= k1 ? W : static_cast<int>(k1 - k);
        float buf[W];
        for (int i = 0; i < W; ++i) buf[i] = i < cnt ? m[k + i] : 0.f;
        mv[j] = loadu(buf);
        acc[j] = v16{};
      }
      for (int64_t r = 0; r < R; ++r) {
        const char* row = static_cast<const char*>(T) + r * t_stride * te;
        const float vr = v[r];
        j = 0;
        for (int64_t k = k0; k < k1; k += W, ++j) {
          const int cnt = k + W <= k1 ? W : static_cast<int>(k1 - k);
          // (x inv_t - m_k) first: one fused multiply-subtract of the two large terms (a
          // prototype far below the others has x inv_t and m_k both near -1e3), then - v_r
          acc[j] += vexp((load16(row, t_dt, k, cnt) * inv_t - mv[j]) - vr);
        }
      }
      j = 0;
      for (int64_t k = k0; k < k1; k += W, ++j) {
        const int cnt = k + W <= k1 ? W : static_cast<int>(k1 - k);
        memcpy(sums + k, &acc[j], cnt * sizeof(float));
      }
    }
  });
  return 0;
}

// v_r = logsumexp_k (X_rk - u_k) + log_n;  with out != null instead out_rk = X_rk - u_k - v_r + log_n
// (fp32 rows of stride o_stride) for the v given.
DFN_EXPORT int dfn_sk_rows(const void* T, int64_t t_stride, int t_dt, int64_t R, int64_t K, float inv_t,
                           const float* u, float* v, float log_n, float* out, int64_t o_stride, int nthreads) {
  CallLock lock;
  const int64_t Kp = (K + W - 1) / W * W;
  nthreads = clamp_threads(nthreads, R);
  if (!worker_buffers(nthreads, static_cast<size_t>(Kp), -1, Kp)) return -1;  // a row's conversion buffer
  const float* upad = padded_copy(u, K, Kp);
  if (upad == nullptr) return -1;
  const int64_t te = elem_size(t_dt);
  run_parallel(nthreads, R, [&](int ti, Range rg) {
    float* buf = g_buffers[ti].data.data();
    for (int64_t r = rg.begin; r < rg.end; ++r) {
      const float* x = f32_row(static_cast<const char*>(T) + r * t_stride * te, t_dt, K, Kp, buf);
      if (out == nullptr) {
        v16 mx = splat(-INFINITY);
        for (int64_t k = 0; k < Kp; k += W) {
          const v16 y = loadu(x + k) * inv_t - loadu(upad + k);
          mx = y > mx ? y : mx;
        }
        const float mr = hmax(mx);
        v16 z = {};
        for (int64_t k = 0; k < Kp; k += W) z += vexp(loadu(x + k) * inv_t - loadu(upad + k) - mr);
        v[r] = mr + logf(hsum(z)) + log_n;
      } else {
        const float off = log_n - v[r];
        float* o = out + r * o_stride;
        int64_t k = 0;
        for (; k + W <= K; k += W) storeu(o + k, loadu(x + k) * inv_t - loadu(upad + k) + off);
        if (k < K) {
          const v16 y = loadu(x + k) * inv_t - loadu(upad + k) + off;
          memcpy(o + k, &y, (K - k) * sizeof(float));
        }
      }
    }
  });
  return 0;
}

}  // extern "C"
