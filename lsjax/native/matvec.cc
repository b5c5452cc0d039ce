// Decode-time matrix-vector products for XLA:CPU, as XLA FFI custom calls (see lsjax/native/__init__.py).
//
// Why: a batch-1 decode step is a chain of matvecs, each needing the last one's output. XLA:CPU runs
// each of them on one core at ~18 GB/s; two cores reading disjoint row blocks reach the machine's
// read ceiling (~28 GB/s on the 2-core VM of docs/perf.md). The routed LoRA term is computed in the
// same call, so the chosen experts' A and B cost their bytes and nothing else (one call per
// projection instead of ~5 small XLA ops each paying its own start-up).
//
//   lsjax_matmul:        y[T, N] = x[T, K] @ W[K, N]
//   lsjax_matmul_t:      y[T, N] = x[T, K] @ Wt[N, K]^T            (the tied vocabulary head)
//   lsjax_routed_matmul: y[T, N] = x @ W + sum_j gates[t, j] * (x[t] @ A[ids[t, j]]) @ B[ids[t, j]]
//   lsjax_matmul_group, lsjax_routed_matmul_group: up to four of those over the same x (and route), one call
//
// Work is split in two phases over a small pool of spinning threads: rows of W (K) split across
// threads into partial sums, then columns (N) split to reduce the partials and add the B term.
// Plain loops, written for the compiler's vectoriser (built with -O3 -march=native).
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// y[t, n0:n1] = sum_{k in [k0, k1)} x[t, k] * W[k, n0:n1] for t < T: row-major W with N columns,
// x rows ldx apart, y rows ldy apart. W streams once, four rows at a time, however many tokens.
void rows_axpy(const float* __restrict x, int64_t ldx, int64_t T, const float* __restrict W, int64_t N,
               int64_t k0, int64_t k1, int64_t n0, int64_t n1, float* __restrict y, int64_t ldy) {
  for (int64_t t = 0; t < T; ++t)
    for (int64_t n = n0; n < n1; ++n) y[t * ldy + n] = 0.f;
  int64_t k = k0;
  for (; k + 4 <= k1; k += 4) {  // one load and store of y per four FMAs
    const float* __restrict w0 = W + k * N;
    const float* __restrict w1 = w0 + N;
    const float* __restrict w2 = w1 + N;
    const float* __restrict w3 = w2 + N;
    int64_t t = 0;
    for (; t + 4 <= T; t += 4) {  // four tokens share each load of W (batch 8: 1-2% faster decode)
      const float* x0 = x + t * ldx + k;
      const float* x1 = x0 + ldx;
      const float* x2 = x1 + ldx;
      const float* x3 = x2 + ldx;
      float* __restrict y0 = y + t * ldy;
      float* __restrict y1 = y0 + ldy;
      float* __restrict y2 = y1 + ldy;
      float* __restrict y3 = y2 + ldy;
      for (int64_t n = n0; n < n1; ++n) {
        const float v0 = w0[n], v1 = w1[n], v2 = w2[n], v3 = w3[n];
        y0[n] += x0[0] * v0 + x0[1] * v1 + x0[2] * v2 + x0[3] * v3;
        y1[n] += x1[0] * v0 + x1[1] * v1 + x1[2] * v2 + x1[3] * v3;
        y2[n] += x2[0] * v0 + x2[1] * v1 + x2[2] * v2 + x2[3] * v3;
        y3[n] += x3[0] * v0 + x3[1] * v1 + x3[2] * v2 + x3[3] * v3;
      }
    }
    for (; t < T; ++t) {
      const float* xt = x + t * ldx + k;
      const float a0 = xt[0], a1 = xt[1], a2 = xt[2], a3 = xt[3];
      float* __restrict yt = y + t * ldy;
      for (int64_t n = n0; n < n1; ++n) yt[n] += a0 * w0[n] + a1 * w1[n] + a2 * w2[n] + a3 * w3[n];
    }
  }
  for (; k < k1; ++k) {
    const float* __restrict w = W + k * N;
    for (int64_t t = 0; t < T; ++t) {
      const float a = x[t * ldx + k];
      float* __restrict yt = y + t * ldy;
      for (int64_t n = n0; n < n1; ++n) yt[n] += a * w[n];
    }
  }
}

// y[t, n] = dot(Wt[n, :], x[t, :]) for n in [n0, n1) and TB tokens: each row of Wt is read once for
// all of them (the tied vocabulary head, whose [V, D] embedding XLA would transpose every step)
template <int TB>
void rows_dot(const float* __restrict x, int64_t ldx, const float* __restrict Wt, int64_t K, int64_t n0,
              int64_t n1, float* __restrict y, int64_t ldy) {
  typedef float Lanes __attribute__((vector_size(64), aligned(4), may_alias));  // 16 floats, unaligned
  constexpr int kLanes = 16;
  for (int64_t n = n0; n < n1; ++n) {
    const float* __restrict w = Wt + n * K;
    Lanes acc[TB] = {};
    int64_t k = 0;
    for (; k + kLanes <= K; k += kLanes) {
      const Lanes wk = *reinterpret_cast<const Lanes*>(w + k);
      for (int t = 0; t < TB; ++t) acc[t] += wk * *reinterpret_cast<const Lanes*>(x + t * ldx + k);
    }
    for (int t = 0; t < TB; ++t) {
      float s = 0.f;
      for (int64_t r = k; r < K; ++r) s += w[r] * x[t * ldx + r];
      for (int j = 0; j < kLanes; ++j) s += acc[t][j];
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

int PoolThreads() {
  if (const char* env = std::getenv("LSJAX_NATIVE_THREADS")) return std::max(1, std::atoi(env));
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

// One call: S products of the same rows x (q, k and v, or gate and up), each optionally with its own
// routed LoRA term over the same chosen experts. Grouping them saves a pool round trip and an XLA
// dispatch per extra product; each W (and A, B) is still read as its own contiguous stream.
constexpr int kMaxSegments = 4;

struct Product {
  const float* x = nullptr;  // [T, K]
  int S = 1;
  const float* w[kMaxSegments] = {};  // [K, N_s] or, transposed (S = 1), [N, K]
  const float* a[kMaxSegments] = {};  // [E, K, R] each, or all null (no routed term)
  const float* b[kMaxSegments] = {};  // [E, R, N_s]
  float* y[kMaxSegments] = {};        // [T, N_s]
  int64_t n[kMaxSegments] = {};
  int64_t offset[kMaxSegments] = {};  // segment s's columns in the partial sums
  const int32_t* ids = nullptr;       // [T, J]
  const float* gates = nullptr;       // [T, J]
  int64_t T = 0, K = 0, total_n = 0, R = 0, J = 0;
  int parts = 1;
  float* partial_y = nullptr;   // [parts, T, total_n]
  float* partial_xa = nullptr;  // [parts, S, T, J, R]

  bool routed() const { return a[0] != nullptr; }
  float* xa(int part, int s, int64_t t, int64_t j) const { return partial_xa + (((part * S + s) * T + t) * J + j) * R; }
};

void RowsPhase(void* ctx, int part) {  // each thread: its block of every W's rows (and of A's) for every token
  auto& p = *static_cast<Product*>(ctx);
  int64_t k0, k1;
  Piece(p.K, part, p.parts, 4, &k0, &k1);
  float* partial = p.partial_y + part * p.T * p.total_n;
  for (int s = 0; s < p.S; ++s) rows_axpy(p.x, p.K, p.T, p.w[s], p.n[s], k0, k1, 0, p.n[s], partial + p.offset[s], p.total_n);
  for (int s = 0; p.routed() && s < p.S; ++s)
    for (int64_t t = 0; t < p.T; ++t)
      for (int64_t j = 0; j < p.J; ++j) {
        const float* a = p.a[s] + int64_t(p.ids[t * p.J + j]) * p.K * p.R;
        rows_axpy(p.x + t * p.K, p.K, 1, a, p.R, k0, k1, 0, p.R, p.xa(part, s, t, j), p.R);
      }
}

void ColumnsPhase(void* ctx, int part) {  // each thread: its columns of every product; sum the partials, add x A B
  auto& p = *static_cast<Product*>(ctx);
  thread_local std::vector<float> coef, term;
  coef.resize(p.R);
  for (int s = 0; s < p.S; ++s) {
    int64_t n0, n1;
    Piece(p.n[s], part, p.parts, 16, &n0, &n1);
    term.resize(p.n[s]);
    for (int64_t t = 0; t < p.T; ++t) {
      float* y = p.y[s] + t * p.n[s];
      for (int64_t n = n0; n < n1; ++n) y[n] = 0.f;
      for (int q = 0; q < p.parts; ++q) {
        const float* src = p.partial_y + (q * p.T + t) * p.total_n + p.offset[s];
        for (int64_t n = n0; n < n1; ++n) y[n] += src[n];
      }
      for (int64_t j = 0; p.routed() && j < p.J; ++j) {
        for (int64_t r = 0; r < p.R; ++r) {
          float sum = 0.f;
          for (int q = 0; q < p.parts; ++q) sum += p.xa(q, s, t, j)[r];
          coef[r] = p.gates[t * p.J + j] * sum;
        }
        const float* b = p.b[s] + int64_t(p.ids[t * p.J + j]) * p.R * p.n[s];
        rows_axpy(coef.data(), p.R, 1, b, p.n[s], 0, p.R, n0, n1, term.data(), p.n[s]);
        for (int64_t n = n0; n < n1; ++n) y[n] += term[n];
      }
    }
  }
}

void TransposedPhase(void* ctx, int part) {  // each thread: its rows of Wt, i.e. its outputs
  auto& p = *static_cast<Product*>(ctx);
  int64_t n0, n1;
  Piece(p.n[0], part, p.parts, 1, &n0, &n1);
  const int64_t K = p.K, N = p.n[0];
  int64_t t = 0;
  for (; t + 8 <= p.T; t += 8) rows_dot<8>(p.x + t * K, K, p.w[0], K, n0, n1, p.y[0] + t * N, N);
  for (; t + 4 <= p.T; t += 4) rows_dot<4>(p.x + t * K, K, p.w[0], K, n0, n1, p.y[0] + t * N, N);
  for (; t + 2 <= p.T; t += 2) rows_dot<2>(p.x + t * K, K, p.w[0], K, n0, n1, p.y[0] + t * N, N);
  for (; t < p.T; ++t) rows_dot<1>(p.x + t * K, K, p.w[0], K, n0, n1, p.y[0] + t * N, N);
}

// Below this many weight bytes a product runs on the calling thread: waking another costs more.
constexpr int64_t kParallelBytes = 256 << 10;

int Parts(const Product& p) {
  return p.K * p.total_n * int64_t(sizeof(float)) < kParallelBytes ? 1 : SharedPool().threads();
}

void Multiply(Product& p) {
  Pool& pool = SharedPool();
  p.total_n = 0;
  for (int s = 0; s < p.S; ++s) {
    p.offset[s] = p.total_n;
    p.total_n += p.n[s];
  }
  p.parts = Parts(p);
  thread_local std::vector<float> partial_y, partial_xa;
  partial_y.resize(size_t(p.parts) * p.T * p.total_n);
  partial_xa.resize(size_t(p.parts) * p.S * p.T * std::max<int64_t>(p.J, 1) * std::max<int64_t>(p.R, 1));
  p.partial_y = partial_y.data();
  p.partial_xa = partial_xa.data();
  pool.Run(RowsPhase, &p, p.parts);
  pool.Run(ColumnsPhase, &p, p.parts);
}

ffi::Error Invalid(const std::string& message) { return ffi::Error(ffi::ErrorCode::kInvalidArgument, message); }

// Checks W [K, N] (N > 0) against x and, when routed, A [E, K, R] and B [E, R, N]; fills segment s.
ffi::Error AddSegment(Product& p, int s, ffi::AnyBuffer w, const ffi::AnyBuffer* a, const ffi::AnyBuffer* b,
                      ffi::Result<ffi::AnyBuffer> y, const char* name) {
  auto wd = w.dimensions();
  if (w.element_type() != ffi::DataType::F32 || wd.size() != 2 || wd[0] != p.K)
    return Invalid(std::string(name) + ": expected float32 W [K, N] with K = x's columns");
  if (y->element_type() != ffi::DataType::F32 || y->dimensions().size() != 2 || y->dimensions()[0] != p.T ||
      y->dimensions()[1] != wd[1])
    return Invalid(std::string(name) + ": result shape does not match [T, N]");
  p.w[s] = static_cast<const float*>(w.untyped_data());
  p.n[s] = wd[1];
  p.y[s] = static_cast<float*>(y->untyped_data());
  if (a == nullptr) return ffi::Error::Success();
  auto ad = a->dimensions(), bd = b->dimensions();
  if (a->element_type() != ffi::DataType::F32 || b->element_type() != ffi::DataType::F32 || ad.size() != 3 ||
      bd.size() != 3 || ad[1] != p.K || bd[0] != ad[0] || bd[1] != ad[2] || bd[2] != wd[1] || ad[2] != p.R)
    return Invalid(std::string(name) + ": expected float32 A [E, K, R] and B [E, R, N] of one rank R");
  for (int64_t i = 0; i < p.T * p.J; ++i)
    if (p.ids[i] < 0 || p.ids[i] >= ad[0]) return Invalid(std::string(name) + ": expert id out of range");
  p.a[s] = static_cast<const float*>(a->untyped_data());
  p.b[s] = static_cast<const float*>(b->untyped_data());
  return ffi::Error::Success();
}

ffi::Error Rows(Product& p, ffi::Buffer<ffi::F32> x, const char* name) {
  if (x.dimensions().size() != 2) return Invalid(std::string(name) + ": expected x [T, K]");
  p.x = x.typed_data();
  p.T = x.dimensions()[0];
  p.K = x.dimensions()[1];
  return ffi::Error::Success();
}

ffi::Error Route(Product& p, ffi::Buffer<ffi::S32> ids, ffi::Buffer<ffi::F32> gates, int64_t rank, const char* name) {
  auto id = ids.dimensions(), gd = gates.dimensions();
  if (id.size() != 2 || id[0] != p.T || gd.size() != 2 || gd[0] != id[0] || gd[1] != id[1])
    return Invalid(std::string(name) + ": expected ids and gates [T, J]");
  p.ids = ids.typed_data();
  p.gates = gates.typed_data();
  p.J = id[1];
  p.R = rank;
  return ffi::Error::Success();
}

#define LSJAX_RETURN_IF_ERROR(expr)         \
  do {                                      \
    ffi::Error error = (expr);              \
    if (error.failure()) return error;      \
  } while (0)

ffi::Error MatmulImpl(ffi::Buffer<ffi::F32> x, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> y) {
  Product p;
  LSJAX_RETURN_IF_ERROR(Rows(p, x, "lsjax_matmul"));
  LSJAX_RETURN_IF_ERROR(AddSegment(p, 0, w, nullptr, nullptr, y, "lsjax_matmul"));
  Multiply(p);
  return ffi::Error::Success();
}

ffi::Error MatmulTImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> wt, ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), wd = wt.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[1]) return Invalid("lsjax_matmul_t: expected x [T, K] and Wt [N, K]");
  Product p;
  p.x = x.typed_data();
  p.w[0] = wt.typed_data();
  p.y[0] = y->typed_data();
  p.T = xd[0];
  p.K = xd[1];
  p.n[0] = p.total_n = wd[0];
  p.parts = Parts(p);
  SharedPool().Run(TransposedPhase, &p, p.parts);
  return ffi::Error::Success();
}

ffi::Error RoutedMatmulImpl(ffi::Buffer<ffi::F32> x, ffi::AnyBuffer w, ffi::AnyBuffer a, ffi::AnyBuffer b,
                            ffi::Buffer<ffi::S32> ids, ffi::Buffer<ffi::F32> gates, ffi::Result<ffi::AnyBuffer> y) {
  Product p;
  LSJAX_RETURN_IF_ERROR(Rows(p, x, "lsjax_routed_matmul"));
  LSJAX_RETURN_IF_ERROR(Route(p, ids, gates, a.dimensions().size() == 3 ? a.dimensions()[2] : -1, "lsjax_routed_matmul"));
  LSJAX_RETURN_IF_ERROR(AddSegment(p, 0, w, &a, &b, y, "lsjax_routed_matmul"));
  Multiply(p);
  return ffi::Error::Success();
}

// x, then W_1..W_S -> y_1..y_S
ffi::Error MatmulGroupImpl(ffi::Buffer<ffi::F32> x, ffi::RemainingArgs ws, ffi::RemainingRets ys) {
  const char* name = "lsjax_matmul_group";
  Product p;
  LSJAX_RETURN_IF_ERROR(Rows(p, x, name));
  if (ws.size() < 1 || ws.size() > size_t(kMaxSegments) || ys.size() != ws.size())
    return Invalid("lsjax_matmul_group: expected 1 to 4 weights and as many results");
  p.S = int(ws.size());
  for (int s = 0; s < p.S; ++s) {
    auto w = ws.get<ffi::AnyBuffer>(s);
    auto y = ys.get<ffi::AnyBuffer>(s);
    if (!w.has_value() || !y.has_value()) return Invalid("lsjax_matmul_group: cannot read an operand");
    LSJAX_RETURN_IF_ERROR(AddSegment(p, s, *w, nullptr, nullptr, *y, name));
  }
  Multiply(p);
  return ffi::Error::Success();
}

// x, ids, gates, then W_1..W_S, A_1..A_S, B_1..B_S -> y_1..y_S (every product with the same chosen experts)
ffi::Error RoutedGroupImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S32> ids, ffi::Buffer<ffi::F32> gates,
                           ffi::RemainingArgs rest, ffi::RemainingRets ys) {
  const char* name = "lsjax_routed_matmul_group";
  Product p;
  LSJAX_RETURN_IF_ERROR(Rows(p, x, name));
  const size_t S = ys.size();
  if (S < 1 || S > size_t(kMaxSegments) || rest.size() != 3 * S)
    return Invalid("lsjax_routed_matmul_group: expected 1 to 4 products: S weights, S A's, S B's and S results");
  p.S = int(S);
  auto a0 = rest.get<ffi::AnyBuffer>(S);
  if (!a0.has_value() || a0->dimensions().size() != 3) return Invalid("lsjax_routed_matmul_group: expected A [E, K, R]");
  LSJAX_RETURN_IF_ERROR(Route(p, ids, gates, a0->dimensions()[2], name));
  for (size_t s = 0; s < S; ++s) {
    auto w = rest.get<ffi::AnyBuffer>(s), a = rest.get<ffi::AnyBuffer>(S + s), b = rest.get<ffi::AnyBuffer>(2 * S + s);
    auto y = ys.get<ffi::AnyBuffer>(s);
    if (!w.has_value() || !a.has_value() || !b.has_value() || !y.has_value())
      return Invalid("lsjax_routed_matmul_group: cannot read an operand");
    LSJAX_RETURN_IF_ERROR(AddSegment(p, int(s), *w, &*a, &*b, *y, name));
  }
  Multiply(p);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LsjaxMatmul, MatmulImpl,
                              ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(LsjaxMatmulT, MatmulTImpl,
                              ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(LsjaxRoutedMatmul, RoutedMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(LsjaxMatmulGroup, MatmulGroupImpl,
                              ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F32>>().RemainingArgs().RemainingRets());

XLA_FFI_DEFINE_HANDLER_SYMBOL(LsjaxRoutedMatmulGroup, RoutedGroupImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .RemainingArgs()
                                  .RemainingRets());
