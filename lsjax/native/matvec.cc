// Decode-time matrix-vector products for XLA:CPU, as XLA FFI custom calls (see lsjax/native/__init__.py).
//
// Why: a batch-1 decode step is a chain of matvecs, each needing the last one's output. XLA:CPU runs
// each of them on one core at ~18 GB/s; two cores reading disjoint row blocks reach the machine's
// read ceiling (~28 GB/s on the 2-core VM of docs/perf.md). The routed LoRA term is computed in the
// same call, so the chosen experts' A and B cost their bytes and nothing else (one call per
// projection group instead of ~5 small XLA ops each paying its own start-up).
//
//   lsjax_matmul:        y[T, N] = x[T, K] @ W[K, N]
//   lsjax_matmul_t:      y[T, N] = x[T, K] @ Wt[N, K]^T            (the tied vocabulary head)
//   lsjax_routed_group:  y[T, N] = x @ W plus each row's routed LoRA experts for every member of a
//                        projection group (q|k|v or gate|up side by side in W, or one projection):
//       y[t, w_s : w_s + n_s] += sum_j g[t, r, j] * (x[t] @ A[l, e][:, s*R : (s+1)*R]) @ B[l, e][:, b_s : b_s + n_s]
//       with e = ids[t, r, j], r = s (a route per member) or 0 (one route for every member), l = `layer`,
//       (w_s, b_s, n_s) = member s of the `members` attribute.
//   lsjax_routed_add:    the same with y0 = x @ W given (computed elsewhere: XLA's GEMM, for many rows)
//   lsjax_quantized_matmul: y = x @ W (or x @ Wt^T) for a quantized W (lsjax.quant), dequantized in
//                        registers: a group's integers summed against x, then scaled once
//
// Work is split in two phases over a small pool of spinning threads: rows of W (K) split across
// threads into partial sums, then columns (N) split to reduce the partials and add the B term. An
// expert chosen by several rows is read once for all of them. Plain loops, written for the
// compiler's vectoriser; the hot phases are compiled for several x86 levels and picked at load time.
// The quantized kernels widen integers with explicit vector instructions (see `Portable`), and read
// ahead of themselves with prefetches: bound by arithmetic, they would otherwise stall on each line.
#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#if defined(__linux__)
#include <sched.h>
#endif

#include "xla/ffi/api/ffi.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

namespace ffi = xla::ffi;

// The hot phases are built for AVX-512, AVX2 and baseline x86-64 and chosen at load time (an ifunc),
// so one portable build runs at the speed of a -march=native one. LSJAX_SINGLE_TARGET (the build
// with an explicit -march) compiles them once for that target.
#if defined(__x86_64__) && defined(__linux__) && !defined(LSJAX_SINGLE_TARGET) && defined(__has_attribute)
#if __has_attribute(target_clones)
#define LSJAX_HOT __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#endif
#endif
#ifndef LSJAX_HOT
#define LSJAX_HOT
#endif
// Inlined into each clone of its caller, so it is compiled for that clone's target.
#define LSJAX_INLINE __attribute__((always_inline)) inline

namespace {

// bfloat16's bits: the upper half of a float32, so widening is a shift (experts may be stored so,
// halving the bytes a routed term reads; the products still sum in float32).
typedef uint16_t Bf16;
LSJAX_INLINE float Widen(float v) { return v; }
LSJAX_INLINE float Widen(Bf16 v) { return __builtin_bit_cast(float, uint32_t(v) << 16); }

// ys[t][0:n] += sum_{k in [k0, k1)} xs[t][k] * W[k, 0:n] for t < T (W's rows ldw apart, rows of
// ys distinct; W float32 or bfloat16). W streams once, four rows at a time, however many rows of x.
template <typename E>
LSJAX_INLINE void AddProducts(const float* const* xs, int64_t T, const E* __restrict W, int64_t ldw,
                              int64_t k0, int64_t k1, int64_t n, float* const* ys) {
  int64_t k = k0;
  for (; k + 4 <= k1; k += 4) {  // one load and store of y per four FMAs
    const E* __restrict w0 = W + k * ldw;
    const E* __restrict w1 = w0 + ldw;
    const E* __restrict w2 = w1 + ldw;
    const E* __restrict w3 = w2 + ldw;
    int64_t t = 0;
    for (; t + 4 <= T; t += 4) {  // four rows share each load of W
      const float *x0 = xs[t] + k, *x1 = xs[t + 1] + k, *x2 = xs[t + 2] + k, *x3 = xs[t + 3] + k;
      const float a00 = x0[0], a01 = x0[1], a02 = x0[2], a03 = x0[3];
      const float a10 = x1[0], a11 = x1[1], a12 = x1[2], a13 = x1[3];
      const float a20 = x2[0], a21 = x2[1], a22 = x2[2], a23 = x2[3];
      const float a30 = x3[0], a31 = x3[1], a32 = x3[2], a33 = x3[3];
      float* __restrict y0 = ys[t];
      float* __restrict y1 = ys[t + 1];
      float* __restrict y2 = ys[t + 2];
      float* __restrict y3 = ys[t + 3];
      for (int64_t i = 0; i < n; ++i) {
        const float v0 = Widen(w0[i]), v1 = Widen(w1[i]), v2 = Widen(w2[i]), v3 = Widen(w3[i]);
        y0[i] += a00 * v0 + a01 * v1 + a02 * v2 + a03 * v3;
        y1[i] += a10 * v0 + a11 * v1 + a12 * v2 + a13 * v3;
        y2[i] += a20 * v0 + a21 * v1 + a22 * v2 + a23 * v3;
        y3[i] += a30 * v0 + a31 * v1 + a32 * v2 + a33 * v3;
      }
    }
    for (; t < T; ++t) {
      const float* xt = xs[t] + k;
      const float a0 = xt[0], a1 = xt[1], a2 = xt[2], a3 = xt[3];
      float* __restrict yt = ys[t];
      for (int64_t i = 0; i < n; ++i)
        yt[i] += a0 * Widen(w0[i]) + a1 * Widen(w1[i]) + a2 * Widen(w2[i]) + a3 * Widen(w3[i]);
    }
  }
  for (; k < k1; ++k) {
    const E* __restrict w = W + k * ldw;
    for (int64_t t = 0; t < T; ++t) {
      const float a = xs[t][k];
      float* __restrict yt = ys[t];
      for (int64_t i = 0; i < n; ++i) yt[i] += a * Widen(w[i]);
    }
  }
}

// y[t, n] = dot(Wt[n, :], x[t, :]) for n in [n0, n1) and TB rows: each row of Wt is read once for
// all of them (the tied vocabulary head, whose [V, D] embedding XLA would transpose every step)
template <int TB>
LSJAX_INLINE void RowsDot(const float* __restrict x, int64_t ldx, const float* __restrict Wt, int64_t K,
                          int64_t n0, int64_t n1, float* __restrict y, int64_t ldy) {
  typedef float Lanes __attribute__((vector_size(64), aligned(4), may_alias));  // 16 floats, unaligned
  typedef float Lanes8 __attribute__((vector_size(32)));
  typedef float Lanes4 __attribute__((vector_size(16)));
  constexpr int kLanes = 16;
  for (int64_t n = n0; n < n1; ++n) {
    const float* __restrict w = Wt + n * K;
    Lanes acc[TB];
    for (int t = 0; t < TB; ++t) acc[t] = Lanes{};
    int64_t k = 0;
    for (; k + kLanes <= K; k += kLanes) {
      const Lanes wk = *reinterpret_cast<const Lanes*>(w + k);
      for (int t = 0; t < TB; ++t) acc[t] += wk * *reinterpret_cast<const Lanes*>(x + t * ldx + k);
    }
    for (int t = 0; t < TB; ++t) {  // the lanes folded in halves, in registers
      const Lanes8 h8 = __builtin_shufflevector(acc[t], acc[t], 0, 1, 2, 3, 4, 5, 6, 7) +
                        __builtin_shufflevector(acc[t], acc[t], 8, 9, 10, 11, 12, 13, 14, 15);
      const Lanes4 h4 = __builtin_shufflevector(h8, h8, 0, 1, 2, 3) + __builtin_shufflevector(h8, h8, 4, 5, 6, 7);
      float s = (h4[0] + h4[2]) + (h4[1] + h4[3]);
      for (int64_t r = k; r < K; ++r) s += w[r] * x[t * ldx + r];
      y[t * ldy + n] = s;
    }
  }
}

// A fixed pool that runs `parts` pieces of one task, the caller doing piece 0. Workers spin a
// while between tasks (a decode step issues one every ~100 us), then sleep on a futex. Spinning
// yields the core now and then, so an oversubscribed machine still makes progress.
class Pool {
 public:
  using Task = void (*)(void* ctx, int part);

  explicit Pool(int threads) : threads_(std::max(1, threads)) {
    for (int i = 1; i < threads_; ++i) std::thread([this, i] { Work(i); }).detach();
  }
  int threads() const { return threads_; }

  // Runs task(ctx, p) for p < parts (parts <= threads()); returns when all are done.
  void Run(Task task, void* ctx, int parts) {
    std::unique_lock<std::mutex> lock(busy_, std::defer_lock);
    if (parts == 1 || !lock.try_lock()) {  // small, or another call is running (XLA ran two at once): here
      for (int p = 0; p < parts; ++p) task(ctx, p);
      return;
    }
    task_ = task;
    ctx_ = ctx;
    parts_ = parts;
    pending_.store(threads_ - 1, std::memory_order_relaxed);
    generation_.fetch_add(1, std::memory_order_release);
    generation_.notify_all();
    task(ctx, 0);
    for (int spin = 1; pending_.load(std::memory_order_acquire) != 0; ++spin) Relax(spin);
  }

 private:
  static void Relax(int spin) {
    if (spin % 64 == 0) {
      std::this_thread::yield();
      return;
    }
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
  }

  void Work(int part) {
    uint32_t seen = 0;  // the constructor's value, not a fresh load: a task may already be posted
    for (;;) {
      uint32_t now = seen;
      for (int spin = 1; spin < (1 << 16) && now == seen; ++spin) {
        Relax(spin);
        now = generation_.load(std::memory_order_acquire);
      }
      if (now == seen) {
        generation_.wait(seen, std::memory_order_acquire);
        continue;
      }
      seen = now;
      if (part < parts_) task_(ctx_, part);
      pending_.fetch_sub(1, std::memory_order_acq_rel);
    }
  }

  const int threads_;
  std::mutex busy_;
  Task task_ = nullptr;
  void* ctx_ = nullptr;
  int parts_ = 1;
  std::atomic<uint32_t> generation_{0};
  std::atomic<int> pending_{0};
};

// The CPUs this process may run on (taskset, a container's cpuset), not all the machine's: more
// spinning threads than CPUs would take turns on them. LSJAX_NATIVE_THREADS >= 1 overrides.
int PoolThreads() {
  if (const char* env = std::getenv("LSJAX_NATIVE_THREADS")) {
    const int n = std::atoi(env);
    if (n >= 1) return n;
  }
#if defined(__linux__) && defined(CPU_ALLOC)
  for (int cpus = 1024; cpus <= (1 << 16); cpus *= 2) {  // a larger mask when the kernel's is larger
    cpu_set_t* set = CPU_ALLOC(cpus);
    if (set == nullptr) break;
    const size_t size = CPU_ALLOC_SIZE(cpus);
    const bool ok = sched_getaffinity(0, size, set) == 0;
    const int count = ok ? CPU_COUNT_S(size, set) : 0;
    CPU_FREE(set);
    if (ok) return std::max(1, count);
    if (errno != EINVAL) break;
  }
#endif
  return std::max(1u, std::thread::hardware_concurrency());
}

Pool& SharedPool() {
  static Pool* pool = new Pool(PoolThreads());  // never destroyed: its threads outlive static teardown
  return *pool;
}

// [begin, end) of piece `part` of `parts` over [0, size), boundaries on multiples of `align`
void Piece(int64_t size, int part, int parts, int64_t align, int64_t* begin, int64_t* end) {
  auto edge = [&](int p) { return p == parts ? size : std::min(size, (size * p / parts) / align * align); };
  *begin = edge(part);
  *end = edge(part + 1);
}

struct Member {
  int64_t w_off, b_off, width;  // member s's routed term: B columns [b_off, b_off + width) -> y columns [w_off, ...)
};

// One (route, expert) pair of a call and the rows that chose it: uses[first, first + count).
struct Group {
  int64_t route, expert, first, count;
};

struct Use {
  int64_t row;
  float gate;  // summed over the row's picks of this expert on this route
};

// One call: y = x @ W (or y = y0, x @ W given), plus the routed term when `groups` is not empty.
// Pointer tables are built by the calling thread so that the pool's workers only compute.
struct Problem {
  const float* x = nullptr;   // [T, K]
  const float* w = nullptr;   // [K, N], or null with y0
  const float* y0 = nullptr;  // [T, N]: x @ W computed elsewhere (lsjax_routed_add), or null
  bool pooled = false;        // y0 given by this library's own product: the term may use the pool at any size
  float* y = nullptr;         // [T, N]
  int64_t T = 0, K = 0, N = 0;
  int parts = 1;
  std::vector<const float*> x_rows;  // [T]: x's rows
  std::vector<float*> partial_rows;  // [parts, T]: each piece's partial sums of y

  // the routed term
  const void* a = nullptr;  // this layer's A [E, K, S*R], float32 or (bf16) bfloat16
  const void* b = nullptr;  // this layer's B [E, R, Nb], of A's type
  bool bf16 = false;
  int64_t R = 0, SR = 0, Nb = 0, routes = 1;
  int64_t xa_width = 0;  // columns of x @ A kept per use: S*R (one route: all members) or R (a route per member)
  std::vector<Member> members;
  std::vector<Group> groups;
  std::vector<Use> uses;
  std::vector<const float*> use_x;  // [uses]: x's row of each use
  std::vector<float*> xa_rows;      // [parts, uses]: each piece's partial x @ A
  std::vector<float*> coef_rows;    // [parts, uses]: gate * x @ A of one member, per column piece
  std::vector<float*> out_rows;     // [parts, uses]: where each use's B term lands, per column piece
  std::vector<float> partial_y, partial_xa, coef;
  std::vector<std::pair<int64_t, int64_t>> picks;  // (expert, pick index) of one route, sorted
};

// xa[u] += x[use u][k0:k1] @ A[expert of u][k0:k1, its columns] for every use. One route for all
// members: the expert's [K, S*R] rows as one contiguous stream; a route per member: member s's R
// columns of them.
template <typename E>
LSJAX_INLINE void AddShrinks(const Problem& p, const E* A, int64_t k0, int64_t k1, float* const* xa) {
  for (const Group& g : p.groups) {
    const E* a = A + g.expert * p.K * p.SR + (p.routes == 1 ? 0 : g.route * p.R);
    AddProducts(p.use_x.data() + g.first, g.count, a, p.SR, k0, k1, p.xa_width, xa + g.first);
  }
}

// The B term of member m's output columns [lo, hi): coef[u] (gate * x A of the member's rank block,
// one per use) @ B[expert][:, those columns] into out[u].
template <typename E>
LSJAX_INLINE void AddExpands(const Problem& p, const E* B, const Member& m, int64_t route, int64_t lo, int64_t hi,
                             float* const* coef, float* const* out) {
  for (const Group& g : p.groups) {
    if (g.route != route) continue;
    const E* b = B + g.expert * p.R * p.Nb + m.b_off + (lo - m.w_off);
    AddProducts(coef + g.first, g.count, b, p.Nb, 0, p.R, hi - lo, out + g.first);
  }
}

LSJAX_HOT void RowsPhase(void* ctx, int part) {  // each piece: its block of W's rows (and of A's) for every row
  auto& p = *static_cast<Problem*>(ctx);
  int64_t k0, k1;
  Piece(p.K, part, p.parts, 4, &k0, &k1);
  if (p.w != nullptr) {
    float* const* partial = p.partial_rows.data() + part * p.T;
    for (int64_t t = 0; t < p.T; ++t) std::fill(partial[t], partial[t] + p.N, 0.f);
    AddProducts(p.x_rows.data(), p.T, p.w, p.N, k0, k1, p.N, partial);
  }
  if (p.groups.empty()) return;
  const int64_t uses = int64_t(p.uses.size());
  float* const* xa = p.xa_rows.data() + part * uses;
  for (int64_t u = 0; u < uses; ++u) std::fill(xa[u], xa[u] + p.xa_width, 0.f);
  if (p.bf16)
    AddShrinks(p, static_cast<const Bf16*>(p.a), k0, k1, xa);
  else
    AddShrinks(p, static_cast<const float*>(p.a), k0, k1, xa);
}

LSJAX_HOT void ColumnsPhase(void* ctx, int part) {  // each piece: its columns; sum the partials, add x A B
  auto& p = *static_cast<Problem*>(ctx);
  int64_t n0, n1;
  Piece(p.N, part, p.parts, 16, &n0, &n1);
  for (int64_t t = 0; t < p.T; ++t) {
    float* __restrict y = p.y + t * p.N;
    if (p.w == nullptr) {  // y0 given: y is y0's own buffer when the caller aliased them
      const float* given = p.y0 + t * p.N;
      if (given != y)
        for (int64_t n = n0; n < n1; ++n) y[n] = given[n];
      continue;
    }
    const float* src = p.partial_rows[t];
    for (int64_t n = n0; n < n1; ++n) y[n] = src[n];
    for (int q = 1; q < p.parts; ++q) {
      src = p.partial_rows[q * p.T + t];
      for (int64_t n = n0; n < n1; ++n) y[n] += src[n];
    }
  }
  if (p.groups.empty()) return;
  const int64_t uses = int64_t(p.uses.size());
  float* const* coef = p.coef_rows.data() + part * uses;
  float** out = p.out_rows.data() + part * uses;
  for (size_t s = 0; s < p.members.size(); ++s) {
    const Member& m = p.members[s];
    const int64_t lo = std::max(n0, m.w_off), hi = std::min(n1, m.w_off + m.width);
    if (lo >= hi) continue;
    const int64_t route = p.routes == 1 ? 0 : int64_t(s);
    const int64_t column = p.routes == 1 ? int64_t(s) * p.R : 0;  // member s's rank block in x @ A
    for (const Group& g : p.groups) {
      if (g.route != route) continue;
      for (int64_t u = g.first; u < g.first + g.count; ++u) {
        for (int64_t r = 0; r < p.R; ++r) {
          float sum = 0.f;
          for (int q = 0; q < p.parts; ++q) sum += p.xa_rows[q * uses + u][column + r];
          coef[u][r] = p.uses[u].gate * sum;
        }
        out[u] = p.y + p.uses[u].row * p.N + lo;
      }
    }
    if (p.bf16)
      AddExpands(p, static_cast<const Bf16*>(p.b), m, route, lo, hi, coef, out);
    else
      AddExpands(p, static_cast<const float*>(p.b), m, route, lo, hi, coef, out);
  }
}

struct Transposed {
  const float* x;   // [T, K]
  const float* wt;  // [N, K]
  float* y;         // [T, N]
  int64_t T, K, N;
  int parts;
};

LSJAX_HOT void TransposedPhase(void* ctx, int part) {  // each piece: its rows of Wt, i.e. its outputs
  auto& p = *static_cast<Transposed*>(ctx);
  int64_t n0, n1;
  Piece(p.N, part, p.parts, 1, &n0, &n1);
  const int64_t K = p.K, N = p.N;
  int64_t t = 0;
  for (; t + 8 <= p.T; t += 8) RowsDot<8>(p.x + t * K, K, p.wt, K, n0, n1, p.y + t * N, N);
  for (; t + 4 <= p.T; t += 4) RowsDot<4>(p.x + t * K, K, p.wt, K, n0, n1, p.y + t * N, N);
  for (; t + 2 <= p.T; t += 2) RowsDot<2>(p.x + t * K, K, p.wt, K, n0, n1, p.y + t * N, N);
  for (; t < p.T; ++t) RowsDot<1>(p.x + t * K, K, p.wt, K, n0, n1, p.y + t * N, N);
}

// A quantized weight (lsjax.quant), dequantized in registers: W[k, n] = scale[k / g, n] * q[k, n] +
// offset[k / g, n], q int8 [K, N] or two 4-bit values per byte (row 2i low nibble, 2i + 1 high) of
// packed [K/2, N]; `transposed`: the weight is Wt [N, K] grouped along K (a tied embedding) and y = x @ Wt^T.
struct Quantized {
  const float* x;        // [T, K]
  const uint8_t* q;      // int8 [K, N] / packed [K/2, N]; transposed: [N, K] / [N, K/2]
  const float* scale;    // [K/g, N]; transposed: [N, K/g]
  const float* offset;   // like scale, or null
  float* y;              // [T, N]
  int64_t T, K, N, group;
  int bits, parts;
  std::vector<float> x_sums;   // transposed: [T, K/g], each group's sum of x (the offset's coefficient)
  std::vector<float> x_split;  // transposed 4-bit: [T, 2, K/2], each row's even then odd values of x
  std::vector<float> partial;  // [parts, T, N]: each piece's partial y (parts > 1)
};

// The integer weights are widened with explicit vector instructions: gcc's vectoriser widens int8
// through int16 with shuffles that bound the loop. A policy gives W float lanes and the few operations
// the kernels need; the kernels are templates over it, flattened into one function per instruction
// set (the policies' intrinsics inline only there) and picked when the library loads.
struct Portable {  // gcc vectors; any target
  typedef float V __attribute__((vector_size(16)));
  static constexpr int W = 4;
  static inline V Zero() { return V{}; }
  static inline V Set(float a) { return V{a, a, a, a}; }
  static inline V Load(const float* p) { V v; __builtin_memcpy(&v, p, sizeof v); return v; }
  static inline void Store(float* p, V v) { __builtin_memcpy(p, &v, sizeof v); }
  static inline V Fma(V a, V b, V c) { return a * b + c; }
  static inline V Int8(const int8_t* p) { return V{float(p[0]), float(p[1]), float(p[2]), float(p[3])}; }
  static inline void Nibbles(const uint8_t* p, V* lo, V* hi) {
    *lo = V{float(p[0] & 15), float(p[1] & 15), float(p[2] & 15), float(p[3] & 15)};
    *hi = V{float(p[0] >> 4), float(p[1] >> 4), float(p[2] >> 4), float(p[3] >> 4)};
  }
  static inline float Sum(V v) { return (v[0] + v[2]) + (v[1] + v[3]); }
};

#if defined(__x86_64__) && defined(__GNUC__)
#define LSJAX_X86_KERNELS 1
#define LSJAX_AVX2 __attribute__((target("avx2,fma")))
#define LSJAX_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))

struct Avx2 {
  using V = __m256;
  static constexpr int W = 8;
  LSJAX_AVX2 static inline V Zero() { return _mm256_setzero_ps(); }
  LSJAX_AVX2 static inline V Set(float a) { return _mm256_set1_ps(a); }
  LSJAX_AVX2 static inline V Load(const float* p) { return _mm256_loadu_ps(p); }
  LSJAX_AVX2 static inline void Store(float* p, V v) { _mm256_storeu_ps(p, v); }
  LSJAX_AVX2 static inline V Fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  LSJAX_AVX2 static inline V Int8(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
  LSJAX_AVX2 static inline void Nibbles(const uint8_t* p, V* lo, V* hi) {
    const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    *lo = _mm256_cvtepi32_ps(_mm256_and_si256(b, _mm256_set1_epi32(15)));
    *hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4));
  }
  LSJAX_AVX2 static inline float Sum(V v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
  }
};

struct Avx512 {
  using V = __m512;
  static constexpr int W = 16;
  LSJAX_AVX512 static inline V Zero() { return _mm512_setzero_ps(); }
  LSJAX_AVX512 static inline V Set(float a) { return _mm512_set1_ps(a); }
  LSJAX_AVX512 static inline V Load(const float* p) { return _mm512_loadu_ps(p); }
  LSJAX_AVX512 static inline void Store(float* p, V v) { _mm512_storeu_ps(p, v); }
  LSJAX_AVX512 static inline V Fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  LSJAX_AVX512 static inline V Int8(const int8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  LSJAX_AVX512 static inline void Nibbles(const uint8_t* p, V* lo, V* hi) {
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    *lo = _mm512_cvtepi32_ps(_mm512_and_si512(b, _mm512_set1_epi32(15)));
    *hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4));
  }
  LSJAX_AVX512 static inline float Sum(V v) { return _mm512_reduce_add_ps(v); }
};
#endif

// sums[t][0:N] += sum_{k in [k0, k1)} xs[t][k] * q[k, 0:N] for TB rows of x, the integers as floats:
// each weight is widened once for all TB rows; the sums are loaded and stored once per RB rows of q
// (8-bit) or RB packed rows (4-bit: 2 RB values of k; k0 even), U vectors of columns at a time (U
// independent sums in flight; with AVX-512 and U = 4, one cache line of each row). Each row of the
// next pass is prefetched as this one reads it.
template <class S, int TB, int RB, int U>
inline void AddIntegers(const Quantized& p, const float* const* xs, int64_t k0, int64_t k1, float* const* sums) {
  using V = typename S::V;
  constexpr int W = S::W;
  const int64_t N = p.N, step = p.bits == 8 ? RB : 2 * RB;
  int64_t k = k0;
  for (; k + step <= k1; k += step) {
    V a[TB][2 * RB];
    for (int t = 0; t < TB; ++t)
      for (int r = 0; r < step; ++r) a[t][r] = S::Set(xs[t][k + r]);
    int64_t n = 0;
    if (p.bits == 8) {
      const int8_t* q = reinterpret_cast<const int8_t*>(p.q) + k * N;
      for (; n + U * W <= N; n += U * W) {
        V s[TB][U];
        for (int t = 0; t < TB; ++t)
          for (int u = 0; u < U; ++u) s[t][u] = S::Load(sums[t] + n + u * W);
        for (int r = 0; r < RB; ++r) {
          __builtin_prefetch(q + (r + RB) * N + n, 0, 3);
          for (int u = 0; u < U; ++u) {
            const V w = S::Int8(q + r * N + n + u * W);
            for (int t = 0; t < TB; ++t) s[t][u] = S::Fma(a[t][r], w, s[t][u]);
          }
        }
        for (int t = 0; t < TB; ++t)
          for (int u = 0; u < U; ++u) S::Store(sums[t] + n + u * W, s[t][u]);
      }
      for (; n < N; ++n)
        for (int t = 0; t < TB; ++t)
          for (int r = 0; r < RB; ++r) sums[t][n] += xs[t][k + r] * float(q[r * N + n]);
    } else {
      const uint8_t* q = p.q + (k / 2) * N;
      for (; n + U * W <= N; n += U * W) {
        V s[TB][U];
        for (int t = 0; t < TB; ++t)
          for (int u = 0; u < U; ++u) s[t][u] = S::Load(sums[t] + n + u * W);
        for (int r = 0; r < RB; ++r) {
          __builtin_prefetch(q + (r + RB) * N + n, 0, 3);
          for (int u = 0; u < U; ++u) {
            V lo, hi;
            S::Nibbles(q + r * N + n + u * W, &lo, &hi);
            for (int t = 0; t < TB; ++t) s[t][u] = S::Fma(a[t][2 * r + 1], hi, S::Fma(a[t][2 * r], lo, s[t][u]));
          }
        }
        for (int t = 0; t < TB; ++t)
          for (int u = 0; u < U; ++u) S::Store(sums[t] + n + u * W, s[t][u]);
      }
      for (; n < N; ++n)
        for (int t = 0; t < TB; ++t)
          for (int r = 0; r < RB; ++r)
            sums[t][n] += xs[t][k + 2 * r] * float(q[r * N + n] & 15) + xs[t][k + 2 * r + 1] * float(q[r * N + n] >> 4);
    }
  }
  if constexpr (RB > 1)
    if (k < k1) AddIntegers<S, TB, 1, U>(p, xs, k, k1, sums);  // fewer rows than a pass
}

// Rows of q split into pieces (whole groups each where there are enough): each piece adds its rows'
// products to its own partial y, a group's integer sums scaled once (one multiply per group and
// column, not per weight). Each piece reads one contiguous block of q.
template <class S>
inline void QuantizedRows(Quantized& p, int part) {
  const int64_t T = p.T, K = p.K, N = p.N;
  int64_t k0, k1;
  if (K / p.group >= p.parts) {
    Piece(K / p.group, part, p.parts, 1, &k0, &k1);
    k0 *= p.group, k1 *= p.group;
  } else {
    Piece(K, part, p.parts, p.bits == 4 ? 2 : 1, &k0, &k1);
  }
  float* out = p.parts == 1 ? p.y : p.partial.data() + part * T * N;
  std::fill(out, out + T * N, 0.f);
  thread_local std::vector<float> scratch;
  scratch.resize(size_t(T * N));
  for (int64_t a = k0; a < k1;) {  // segments of [k0, k1) within one group
    const int64_t g = a / p.group, b = std::min(k1, (g + 1) * p.group);
    std::fill(scratch.begin(), scratch.end(), 0.f);
    const float* xs[4];
    float* sums[4];
    int64_t t = 0;
    for (; t + 4 <= T; t += 4) {
      for (int i = 0; i < 4; ++i) xs[i] = p.x + (t + i) * K, sums[i] = scratch.data() + (t + i) * N;
      AddIntegers<S, 4, 2, 1>(p, xs, a, b, sums);
    }
    for (; t < T; ++t) {
      xs[0] = p.x + t * K, sums[0] = scratch.data() + t * N;
      AddIntegers<S, 1, 8, 4>(p, xs, a, b, sums);
    }
    const float* scale = p.scale + g * N;
    const float* offset = p.offset == nullptr ? nullptr : p.offset + g * N;
    for (t = 0; t < T; ++t) {
      float* y = out + t * N;
      const float* s = scratch.data() + t * N;
      float x_sum = 0.f;  // the segment's sum of x: the offset's coefficient
      if (offset != nullptr)
        for (int64_t k = a; k < b; ++k) x_sum += p.x[t * K + k];
      int64_t n = 0;
      for (; n + S::W <= N; n += S::W) {
        auto v = S::Fma(S::Load(scale + n), S::Load(s + n), S::Load(y + n));
        if (offset != nullptr) v = S::Fma(S::Load(offset + n), S::Set(x_sum), v);
        S::Store(y + n, v);
      }
      for (; n < N; ++n) y[n] += scale[n] * s[n] + (offset == nullptr ? 0.f : offset[n] * x_sum);
    }
    a = b;
  }
}

// y[t, n] for n in [n0, n1) and TB rows from t0: each group's dot product in vector lanes, scaled once
// into running lanes; one horizontal sum per output. 4-bit: x split into its even and odd values,
// which a byte's low and high nibbles multiply.
template <class S, int TB>
inline void QuantizedDots(const Quantized& p, int64_t t0, int64_t n0, int64_t n1) {
  using V = typename S::V;
  constexpr int W = S::W;
  const int64_t K = p.K, G = K / p.group, half = K / 2, bytes = p.bits == 4 ? half : K;
  const int64_t group_bytes = p.bits == 4 ? p.group / 2 : p.group;
  const float* x[TB];
  for (int t = 0; t < TB; ++t) x[t] = (p.bits == 4 ? p.x_split.data() : p.x) + (t0 + t) * K;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = p.q + n * bytes;
    for (int64_t j = 0; j < bytes; j += 64) __builtin_prefetch(row + 4096 + j, 0, 3);  // rows ahead: never wait
    const float* scale = p.scale + n * G;
    V total[TB];
    float rest[TB];
    for (int t = 0; t < TB; ++t) total[t] = S::Zero(), rest[t] = 0.f;
    for (int64_t g = 0; g < G; ++g) {
      V lanes[TB];
      float tail[TB];
      for (int t = 0; t < TB; ++t) lanes[t] = S::Zero(), tail[t] = 0.f;
      const int64_t j1 = (g + 1) * group_bytes;
      int64_t j = g * group_bytes;
      if (p.bits == 8) {
        const int8_t* w = reinterpret_cast<const int8_t*>(row);
        for (; j + W <= j1; j += W) {
          const V v = S::Int8(w + j);
          for (int t = 0; t < TB; ++t) lanes[t] = S::Fma(S::Load(x[t] + j), v, lanes[t]);
        }
        for (; j < j1; ++j)
          for (int t = 0; t < TB; ++t) tail[t] += x[t][j] * float(w[j]);
      } else {
        for (; j + W <= j1; j += W) {
          V lo, hi;
          S::Nibbles(row + j, &lo, &hi);
          for (int t = 0; t < TB; ++t)
            lanes[t] = S::Fma(S::Load(x[t] + half + j), hi, S::Fma(S::Load(x[t] + j), lo, lanes[t]));
        }
        for (; j < j1; ++j)
          for (int t = 0; t < TB; ++t) tail[t] += x[t][j] * float(row[j] & 15) + x[t][half + j] * float(row[j] >> 4);
      }
      const float s = scale[g], o = p.offset == nullptr ? 0.f : p.offset[n * G + g];
      for (int t = 0; t < TB; ++t) {
        total[t] = S::Fma(S::Set(s), lanes[t], total[t]);
        rest[t] += s * tail[t] + o * p.x_sums[(t0 + t) * G + g];
      }
    }
    for (int t = 0; t < TB; ++t) p.y[(t0 + t) * p.N + n] = S::Sum(total[t]) + rest[t];
  }
}

template <class S>
inline void QuantizedTransposed(Quantized& p, int part) {  // each piece: its rows of Wt, i.e. its outputs
  int64_t n0, n1;
  Piece(p.N, part, p.parts, 1, &n0, &n1);
  int64_t t = 0;
  for (; t + 4 <= p.T; t += 4) QuantizedDots<S, 4>(p, t, n0, n1);
  for (; t < p.T; ++t) QuantizedDots<S, 1>(p, t, n0, n1);
}

LSJAX_HOT void QuantizedColumnsPhase(void* ctx, int part) {  // each piece: its columns, the partials summed
  auto& p = *static_cast<Quantized*>(ctx);
  int64_t n0, n1;
  Piece(p.N, part, p.parts, 16, &n0, &n1);
  const int64_t TN = p.T * p.N;
  for (int64_t t = 0; t < p.T; ++t) {
    float* __restrict y = p.y + t * p.N;
    const float* __restrict first = p.partial.data() + t * p.N;
    for (int64_t n = n0; n < n1; ++n) y[n] = first[n];
    for (int q = 1; q < p.parts; ++q) {
      const float* __restrict src = p.partial.data() + q * TN + t * p.N;
      for (int64_t n = n0; n < n1; ++n) y[n] += src[n];
    }
  }
}

// One function per instruction set and phase (`flatten` inlines the kernels and their policy there).
using Phase = void (*)(void* ctx, int part);
#define LSJAX_PHASES(S, ATTRIBUTES)                                                                             \
  ATTRIBUTES __attribute__((flatten)) void Rows##S(void* ctx, int part) {                                      \
    QuantizedRows<S>(*static_cast<Quantized*>(ctx), part);                                                      \
  }                                                                                                             \
  ATTRIBUTES __attribute__((flatten)) void Transposed##S(void* ctx, int part) {                                \
    QuantizedTransposed<S>(*static_cast<Quantized*>(ctx), part);                                                \
  }
LSJAX_PHASES(Portable, )
#ifdef LSJAX_X86_KERNELS
LSJAX_PHASES(Avx2, LSJAX_AVX2)
LSJAX_PHASES(Avx512, LSJAX_AVX512)
#endif

struct QuantizedPhases {
  const char* simd;
  Phase rows, transposed;
};

// The widest instruction set this CPU runs, or at most the one LSJAX_NATIVE_SIMD names (avx512,
// avx2 or portable: the tests check each against the same references).
const QuantizedPhases& PickQuantizedPhases() {
  static const QuantizedPhases phases = [] {
    const char* env = std::getenv("LSJAX_NATIVE_SIMD");
    const std::string cap = env == nullptr ? "avx512" : env;
#ifdef LSJAX_X86_KERNELS
    __builtin_cpu_init();
    if (cap == "avx512" && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
      return QuantizedPhases{"avx512", RowsAvx512, TransposedAvx512};
    if ((cap == "avx512" || cap == "avx2") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
      return QuantizedPhases{"avx2", RowsAvx2, TransposedAvx2};
#endif
    return QuantizedPhases{"portable", RowsPortable, TransposedPortable};
  }();
  return phases;
}

// Below this many bytes read a product runs on the calling thread: waking another costs more.
constexpr int64_t kParallelBytes = 256 << 10;

// Below this many bytes the routed term alone runs on the calling thread (Multiply says why).
constexpr int64_t kTermParallelBytes = 1 << 20;

int Parts(int64_t bytes) { return bytes < kParallelBytes ? 1 : SharedPool().threads(); }

// Groups the picks ids/gates [T, routes, J] by (route, expert), merging a row's repeated picks of
// one expert (a group's output rows must be distinct: the kernels write them as restrict pointers).
void Route(Problem& p, const int32_t* ids, const float* gates, int64_t J) {
  p.groups.clear();
  p.uses.clear();
  for (int64_t route = 0; route < p.routes; ++route) {
    p.picks.clear();
    for (int64_t t = 0; t < p.T; ++t)
      for (int64_t j = 0; j < J; ++j) {
        const int64_t i = (t * p.routes + route) * J + j;
        p.picks.emplace_back(ids[i], i);
      }
    std::sort(p.picks.begin(), p.picks.end());  // by expert, then row
    for (const auto& [expert, i] : p.picks) {
      const int64_t row = i / (p.routes * J);
      if (p.groups.empty() || p.groups.back().route != route || p.groups.back().expert != expert)
        p.groups.push_back({route, expert, int64_t(p.uses.size()), 0});
      Group& g = p.groups.back();
      if (g.count > 0 && p.uses.back().row == row) {
        p.uses.back().gate += gates[i];
        continue;
      }
      p.uses.push_back({row, gates[i]});
      ++g.count;
    }
  }
}

// Fills the pointer tables and scratch of `p` (its shapes and route set) and runs both phases.
void Multiply(Problem& p) {
  int64_t bytes = (p.w != nullptr ? p.K * p.N : p.T * p.N) * int64_t(sizeof(float));
  const int64_t expert_size = p.bf16 ? int64_t(sizeof(Bf16)) : int64_t(sizeof(float));
  bytes += int64_t(p.groups.size()) * (p.K * p.xa_width + p.R * p.N) * expert_size;  // B's: an upper bound
  // The routed term alone (x @ W made by XLA: the hybrid backend) of a few experts runs on the
  // calling thread: waking the pool costs more than it saves there, and its spinning workers would
  // take the cores on which XLA's own threads run the next products (docs/perf.md). Beside this
  // library's own product (`pooled`: a quantized weight's) no XLA threads wait, and it splits.
  p.parts = p.w == nullptr && !p.pooled && bytes < kTermParallelBytes ? 1 : Parts(bytes);
  const int64_t uses = int64_t(p.uses.size());
  p.x_rows.resize(p.T);
  for (int64_t t = 0; t < p.T; ++t) p.x_rows[t] = p.x + t * p.K;
  if (p.w != nullptr) {  // (with y0 given there are no partial sums of x @ W)
    p.partial_y.resize(size_t(p.parts * p.T * p.N));
    p.partial_rows.resize(size_t(p.parts * p.T));
    for (int64_t i = 0; i < p.parts * p.T; ++i) p.partial_rows[i] = p.partial_y.data() + i * p.N;
  }
  if (uses > 0) {
    p.use_x.resize(uses);
    for (int64_t u = 0; u < uses; ++u) p.use_x[u] = p.x + p.uses[u].row * p.K;
    p.partial_xa.resize(size_t(p.parts * uses * p.xa_width));
    p.coef.resize(size_t(p.parts * uses * p.R));
    p.xa_rows.resize(size_t(p.parts * uses));
    p.coef_rows.resize(size_t(p.parts * uses));
    p.out_rows.resize(size_t(p.parts * uses));
    for (int64_t i = 0; i < p.parts * uses; ++i) {
      p.xa_rows[i] = p.partial_xa.data() + i * p.xa_width;
      p.coef_rows[i] = p.coef.data() + i * p.R;
    }
  }
  Pool& pool = SharedPool();
  pool.Run(RowsPhase, &p, p.parts);
  pool.Run(ColumnsPhase, &p, p.parts);
}

// A Problem per calling thread, kept so that its tables are not reallocated on every call.
Problem& Scratch() {
  thread_local Problem problem;
  return problem;
}

ffi::Error Invalid(const std::string& message) { return ffi::Error(ffi::ErrorCode::kInvalidArgument, message); }

bool IsF32(const ffi::AnyBuffer& buffer, size_t rank) {
  return buffer.element_type() == ffi::DataType::F32 && buffer.dimensions().size() == rank;
}

// Checks x [T, K], W [K, N] and y [T, N]; sets them in `p`.
ffi::Error Plain(Problem& p, ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> y, const std::string& name) {
  if (!IsF32(x, 2)) return Invalid(name + ": expected float32 x [T, K]");
  if (!IsF32(w, 2) || w.dimensions()[0] != x.dimensions()[1])
    return Invalid(name + ": expected float32 W [K, N] with K = x's columns");
  p.T = x.dimensions()[0];
  p.K = x.dimensions()[1];
  p.N = w.dimensions()[1];
  if (!IsF32(*y, 2) || y->dimensions()[0] != p.T || y->dimensions()[1] != p.N)
    return Invalid(name + ": result is not float32 [T, N]");
  p.x = static_cast<const float*>(x.untyped_data());
  p.w = static_cast<const float*>(w.untyped_data());
  p.y0 = nullptr;
  p.y = static_cast<float*>(y->untyped_data());
  p.groups.clear();
  p.uses.clear();
  return ffi::Error::Success();
}

ffi::Error MatmulImpl(ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> y) {
  Problem& p = Scratch();
  ffi::Error error = Plain(p, x, w, y, "lsjax_matmul");
  if (error.failure()) return error;
  Multiply(p);
  return ffi::Error::Success();
}

ffi::Error MatmulTImpl(ffi::AnyBuffer x, ffi::AnyBuffer wt, ffi::Result<ffi::AnyBuffer> y) {
  if (!IsF32(x, 2) || !IsF32(wt, 2) || x.dimensions()[1] != wt.dimensions()[1])
    return Invalid("lsjax_matmul_t: expected float32 x [T, K] and Wt [N, K]");
  Transposed p{static_cast<const float*>(x.untyped_data()), static_cast<const float*>(wt.untyped_data()),
               static_cast<float*>(y->untyped_data()), x.dimensions()[0], x.dimensions()[1], wt.dimensions()[0], 1};
  if (!IsF32(*y, 2) || y->dimensions()[0] != p.T || y->dimensions()[1] != p.N)
    return Invalid("lsjax_matmul_t: result is not float32 [T, N]");
  p.parts = Parts(p.K * p.N * int64_t(sizeof(float)));
  SharedPool().Run(TransposedPhase, &p, p.parts);
  return ffi::Error::Success();
}

// The routed term's inputs checked and set in `p` (x, W or y0 and y already set), then the call.
ffi::Error Routed(Problem& p, ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::AnyBuffer ids, ffi::AnyBuffer gates,
                  int64_t layer, ffi::Span<const int64_t> members, const std::string& name) {
  const int64_t S = int64_t(members.size()) / 3;
  if (members.size() == 0 || members.size() % 3 != 0)
    return Invalid(name + ": members must be 1 or more (w_off, b_off, width) triples");
  auto ad = a.dimensions(), bd = b.dimensions();
  const auto type = a.element_type();
  if ((type != ffi::DataType::F32 && type != ffi::DataType::BF16) || ad.size() != 4 || ad[2] != p.K ||
      ad[3] % S != 0 || ad[3] == 0)
    return Invalid(name + ": expected float32 or bfloat16 A [L, E, K, S*R] with K = x's columns and S = " +
                   std::to_string(S) + " members");
  p.SR = ad[3];
  p.R = p.SR / S;
  if (b.element_type() != type || bd.size() != 4 || bd[0] != ad[0] || bd[1] != ad[1] || bd[2] != p.R)
    return Invalid(name + ": expected B [L, E, R, Nb] of A's type with A's L, E and rank R");
  p.Nb = bd[3];
  const int64_t L = ad[0], E = ad[1];
  if (layer < 0 || layer >= L)
    return Invalid(name + ": layer " + std::to_string(layer) + " not in [0, " + std::to_string(L) + ")");
  p.members.clear();
  for (int64_t s = 0; s < S; ++s) {
    const Member m{members[3 * s], members[3 * s + 1], members[3 * s + 2]};
    if (m.w_off < 0 || m.b_off < 0 || m.width < 0 || m.w_off + m.width > p.N || m.b_off + m.width > p.Nb)
      return Invalid(name + ": member " + std::to_string(s) + " (w_off, b_off, width) lies outside W's N or B's Nb");
    p.members.push_back(m);
  }

  auto id = ids.dimensions(), gd = gates.dimensions();
  if (ids.element_type() != ffi::DataType::S32 || id.size() != 3 || id[0] != p.T || (id[1] != 1 && id[1] != S))
    return Invalid(name + ": expected int32 ids [T, S_r, J] with S_r = 1 or the number of members");
  if (!IsF32(gates, 3) || gd[0] != id[0] || gd[1] != id[1] || gd[2] != id[2])
    return Invalid(name + ": expected float32 gates of ids' shape [T, S_r, J]");
  const auto* chosen = static_cast<const int32_t*>(ids.untyped_data());
  for (int64_t i = 0; i < id[0] * id[1] * id[2]; ++i)
    if (chosen[i] < 0 || chosen[i] >= E)  // XLA's gather would clamp it; here it would read out of bounds
      return Invalid(name + ": expert id out of range: " + std::to_string(chosen[i]) + " not in [0, " +
                     std::to_string(E) + ")");

  p.routes = id[1];
  p.xa_width = p.routes == 1 ? p.SR : p.R;
  p.bf16 = type == ffi::DataType::BF16;
  const int64_t size = p.bf16 ? int64_t(sizeof(Bf16)) : int64_t(sizeof(float));
  p.a = static_cast<const char*>(a.untyped_data()) + layer * E * p.K * p.SR * size;
  p.b = static_cast<const char*>(b.untyped_data()) + layer * E * p.R * p.Nb * size;
  Route(p, chosen, static_cast<const float*>(gates.untyped_data()), id[2]);
  Multiply(p);
  return ffi::Error::Success();
}

ffi::Error RoutedGroupImpl(ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::AnyBuffer ids,
                           ffi::AnyBuffer gates, ffi::Result<ffi::AnyBuffer> y, int64_t layer,
                           ffi::Span<const int64_t> members) {
  Problem& p = Scratch();
  ffi::Error error = Plain(p, x, w, y, "lsjax_routed_group");
  if (error.failure()) return error;
  return Routed(p, a, b, ids, gates, layer, members, "lsjax_routed_group");
}

// y = y0 + the routed term, y0 = x @ W computed elsewhere (XLA's GEMM wins the plain product for
// many rows; a quantized weight's own product; this reads each chosen expert once for all the rows
// that chose it).
ffi::Error RoutedAddImpl(ffi::AnyBuffer x, ffi::AnyBuffer y0, ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::AnyBuffer ids,
                         ffi::AnyBuffer gates, ffi::Result<ffi::AnyBuffer> y, int64_t layer,
                         ffi::Span<const int64_t> members, bool pooled) {
  const std::string name = "lsjax_routed_add";
  if (!IsF32(x, 2) || !IsF32(y0, 2) || y0.dimensions()[0] != x.dimensions()[0])
    return Invalid(name + ": expected float32 x [T, K] and y0 [T, N]");
  if (!IsF32(*y, 2) || y->dimensions()[0] != y0.dimensions()[0] || y->dimensions()[1] != y0.dimensions()[1])
    return Invalid(name + ": result is not float32 [T, N]");
  Problem& p = Scratch();
  p.T = x.dimensions()[0];
  p.K = x.dimensions()[1];
  p.N = y0.dimensions()[1];
  p.x = static_cast<const float*>(x.untyped_data());
  p.w = nullptr;
  p.pooled = pooled;
  p.y0 = static_cast<const float*>(y0.untyped_data());
  p.y = static_cast<float*>(y->untyped_data());
  return Routed(p, a, b, ids, gates, layer, members, name);
}

// x [T, K] f32; q int8 [K, N] or uint8 [K/2, N] (transposed: [N, K] / [N, K/2]); scale [K/g, N]
// (transposed [N, K/g]) f32; offset like scale, or [0] for none; attributes group, bits, transposed.
ffi::Error QuantizedMatmulImpl(ffi::AnyBuffer x, ffi::AnyBuffer q, ffi::AnyBuffer scale, ffi::AnyBuffer offset,
                               ffi::Result<ffi::AnyBuffer> y, int64_t group, int64_t bits, bool transposed) {
  const std::string name = "lsjax_quantized_matmul";
  if (!IsF32(x, 2)) return Invalid(name + ": expected float32 x [T, K]");
  const int64_t T = x.dimensions()[0], K = x.dimensions()[1];
  if (bits != 8 && bits != 4) return Invalid(name + ": bits must be 8 or 4");
  if (group < 1 || K % group != 0 || (bits == 4 && group % 2 != 0))
    return Invalid(name + ": group " + std::to_string(group) + " must divide K = " + std::to_string(K) +
                   " (and be even for 4 bits)");
  const auto want = bits == 8 ? ffi::DataType::S8 : ffi::DataType::U8;
  const auto qd = q.dimensions();
  const int64_t packed_k = bits == 4 ? K / 2 : K, G = K / group;
  if (q.element_type() != want || qd.size() != 2 || qd[transposed ? 1 : 0] != packed_k)
    return Invalid(name + ": q does not match x's K = " + std::to_string(K) + " at " + std::to_string(bits) + " bits");
  const int64_t N = qd[transposed ? 0 : 1];
  const auto sd = scale.dimensions();
  if (!IsF32(scale, 2) || sd[0] != (transposed ? N : G) || sd[1] != (transposed ? G : N))
    return Invalid(name + ": scale is not float32 with one value per group and column");
  const bool has_offset = offset.element_count() != 0;
  if (has_offset && (!IsF32(offset, 2) || offset.dimensions()[0] != sd[0] || offset.dimensions()[1] != sd[1]))
    return Invalid(name + ": offset is not float32 of scale's shape");
  if (!IsF32(*y, 2) || y->dimensions()[0] != T || y->dimensions()[1] != N)
    return Invalid(name + ": result is not float32 [T, N]");
  thread_local Quantized p;
  p.x = static_cast<const float*>(x.untyped_data());
  p.q = static_cast<const uint8_t*>(q.untyped_data());
  p.scale = static_cast<const float*>(scale.untyped_data());
  p.offset = has_offset ? static_cast<const float*>(offset.untyped_data()) : nullptr;
  p.y = static_cast<float*>(y->untyped_data());
  p.T = T, p.K = K, p.N = N, p.group = group, p.bits = int(bits);
  const int64_t read = packed_k * N + (has_offset ? 2 : 1) * G * N * int64_t(sizeof(float));
  p.parts = Parts(read);
  Pool& pool = SharedPool();
  if (transposed) {
    p.x_sums.assign(size_t(T * G), 0.f);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t k = 0; k < K; ++k) p.x_sums[t * G + k / group] += p.x[t * K + k];
    if (bits == 4) {
      p.x_split.resize(size_t(T * K));
      for (int64_t t = 0; t < T; ++t)
        for (int64_t j = 0; j < K / 2; ++j) {
          p.x_split[t * K + j] = p.x[t * K + 2 * j];
          p.x_split[t * K + K / 2 + j] = p.x[t * K + 2 * j + 1];
        }
    }
    pool.Run(PickQuantizedPhases().transposed, &p, p.parts);
    return ffi::Error::Success();
  }
  if (p.parts > 1) p.partial.resize(size_t(p.parts * T * N));
  pool.Run(PickQuantizedPhases().rows, &p, p.parts);
  if (p.parts > 1) pool.Run(QuantizedColumnsPhase, &p, p.parts);
  return ffi::Error::Success();
}

}  // namespace

// The pool's thread count (lsjax.native.threads()).
extern "C" __attribute__((visibility("default"))) int LsjaxNativeThreads() { return SharedPool().threads(); }

// The instruction set of the quantized kernels (lsjax.native.simd()).
extern "C" __attribute__((visibility("default"))) const char* LsjaxNativeSimd() { return PickQuantizedPhases().simd; }

XLA_FFI_DEFINE_HANDLER_SYMBOL(LsjaxMatmul, MatmulImpl,
                              ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(LsjaxMatmulT, MatmulTImpl,
                              ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(LsjaxQuantizedMatmul, QuantizedMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("group")
                                  .Attr<int64_t>("bits")
                                  .Attr<bool>("transposed"));

// Both routed targets take the same arguments; lsjax_routed_add's second is y0 = x @ W [T, N].
static auto RoutedBinding() {
  return ffi::Ffi::Bind()
      .Arg<ffi::AnyBuffer>()  // x [T, K]
      .Arg<ffi::AnyBuffer>()  // W [K, N] (lsjax_routed_group) or y0 [T, N] (lsjax_routed_add)
      .Arg<ffi::AnyBuffer>()  // A [L, E, K, S*R]
      .Arg<ffi::AnyBuffer>()  // B [L, E, R, Nb]
      .Arg<ffi::AnyBuffer>()  // ids [T, S_r, J] int32
      .Arg<ffi::AnyBuffer>()  // gates [T, S_r, J]
      .Ret<ffi::AnyBuffer>()  // y [T, N]
      .Attr<int64_t>("layer")
      .Attr<ffi::Span<const int64_t>>("members");
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(LsjaxRoutedGroup, RoutedGroupImpl, RoutedBinding());

// lsjax_routed_add's `pooled`: y0 came from this library's own product (a quantized weight's), so no XLA
// threads run beside the term and it may split over the pool at any size.
XLA_FFI_DEFINE_HANDLER_SYMBOL(LsjaxRoutedAdd, RoutedAddImpl, RoutedBinding().Attr<bool>("pooled"));
