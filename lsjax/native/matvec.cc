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
    for (int64_t t = 0; t < T; ++t) {
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

// y[n] = dot(Wt[n, :], x) for n in [n0, n1)
void rows_dot(const float* __restrict x, const float* __restrict Wt, int64_t K, int64_t n0, int64_t n1,
              float* __restrict y) {
  constexpr int kLanes = 16;
  for (int64_t n = n0; n < n1; ++n) {
    const float* __restrict w = Wt + n * K;
    float lanes[kLanes] = {};
    int64_t k = 0;
    for (; k + kLanes <= K; k += kLanes)
      for (int j = 0; j < kLanes; ++j) lanes[j] += w[k + j] * x[k + j];
    float s = 0.f;
    for (; k < K; ++k) s += w[k] * x[k];
    for (int j = 0; j < kLanes; ++j) s += lanes[j];
    y[n] = s;
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

struct Product {
  const float* x;      // [T, K]
  const float* w;      // [K, N] or, transposed, [N, K]
  const float* a;      // [E, K, R] or null
  const float* b;      // [E, R, N]
  const int32_t* ids;  // [T, J]
  const float* gates;  // [T, J]
  int64_t T, K, N, R, J;
  int parts;
  float* partial_y;   // [parts, T, N]
  float* partial_xa;  // [parts, T, J, R]
  float* y;           // [T, N]
};

void RowsPhase(void* ctx, int part) {  // each thread: its block of W's rows (and of A's) for every token
  auto& p = *static_cast<Product*>(ctx);
  int64_t k0, k1;
  Piece(p.K, part, p.parts, 4, &k0, &k1);
  rows_axpy(p.x, p.K, p.T, p.w, p.N, k0, k1, 0, p.N, p.partial_y + part * p.T * p.N, p.N);
  for (int64_t t = 0; p.a && t < p.T; ++t) {
    for (int64_t j = 0; j < p.J; ++j) {
      const float* a = p.a + int64_t(p.ids[t * p.J + j]) * p.K * p.R;
      rows_axpy(p.x + t * p.K, p.K, 1, a, p.R, k0, k1, 0, p.R, p.partial_xa + ((part * p.T + t) * p.J + j) * p.R, p.R);
    }
  }
}

void ColumnsPhase(void* ctx, int part) {  // each thread: its columns; sum the partials, add x A B
  auto& p = *static_cast<Product*>(ctx);
  int64_t n0, n1;
  Piece(p.N, part, p.parts, 16, &n0, &n1);
  thread_local std::vector<float> coef, term;
  coef.resize(p.R);
  term.resize(p.N);
  for (int64_t t = 0; t < p.T; ++t) {
    float* y = p.y + t * p.N;
    for (int64_t n = n0; n < n1; ++n) y[n] = 0.f;
    for (int q = 0; q < p.parts; ++q) {
      const float* src = p.partial_y + (q * p.T + t) * p.N;
      for (int64_t n = n0; n < n1; ++n) y[n] += src[n];
    }
    for (int64_t j = 0; p.a && j < p.J; ++j) {
      for (int64_t r = 0; r < p.R; ++r) {
        float s = 0.f;
        for (int q = 0; q < p.parts; ++q) s += p.partial_xa[((q * p.T + t) * p.J + j) * p.R + r];
        coef[r] = p.gates[t * p.J + j] * s;
      }
      const float* b = p.b + int64_t(p.ids[t * p.J + j]) * p.R * p.N;
      rows_axpy(coef.data(), p.R, 1, b, p.N, 0, p.R, n0, n1, term.data(), p.N);
      for (int64_t n = n0; n < n1; ++n) y[n] += term[n];
    }
  }
}

void TransposedPhase(void* ctx, int part) {  // each thread: its rows of Wt, i.e. its outputs
  auto& p = *static_cast<Product*>(ctx);
  int64_t n0, n1;
  Piece(p.N, part, p.parts, 1, &n0, &n1);
  for (int64_t t = 0; t < p.T; ++t) rows_dot(p.x + t * p.K, p.w, p.K, n0, n1, p.y + t * p.N);
}

// Below this many weight bytes a product runs on the calling thread: waking another costs more.
constexpr int64_t kParallelBytes = 256 << 10;

int Parts(const Product& p) {
  return p.K * p.N * int64_t(sizeof(float)) < kParallelBytes ? 1 : SharedPool().threads();
}

void Multiply(Product& p) {
  Pool& pool = SharedPool();
  p.parts = Parts(p);
  thread_local std::vector<float> partial_y, partial_xa;
  partial_y.resize(size_t(p.parts) * p.T * p.N);
  partial_xa.resize(size_t(p.parts) * p.T * std::max<int64_t>(p.J, 1) * std::max<int64_t>(p.R, 1));
  p.partial_y = partial_y.data();
  p.partial_xa = partial_xa.data();
  pool.Run(RowsPhase, &p, p.parts);
  pool.Run(ColumnsPhase, &p, p.parts);
}

ffi::Error Invalid(const std::string& message) { return ffi::Error(ffi::ErrorCode::kInvalidArgument, message); }

ffi::Error MatmulImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[0]) return Invalid("lsjax_matmul: expected x [T, K] and W [K, N]");
  Product p{x.typed_data(), w.typed_data(), nullptr, nullptr, nullptr, nullptr, xd[0], xd[1], wd[1], 0, 0};
  p.y = y->typed_data();
  Multiply(p);
  return ffi::Error::Success();
}

ffi::Error MatmulTImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> wt, ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), wd = wt.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[1]) return Invalid("lsjax_matmul_t: expected x [T, K] and Wt [N, K]");
  Product p{x.typed_data(), wt.typed_data(), nullptr, nullptr, nullptr, nullptr, xd[0], xd[1], wd[0], 0, 0};
  p.y = y->typed_data();
  p.parts = Parts(p);
  SharedPool().Run(TransposedPhase, &p, p.parts);
  return ffi::Error::Success();
}

ffi::Error RoutedMatmulImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> a,
                            ffi::Buffer<ffi::F32> b, ffi::Buffer<ffi::S32> ids, ffi::Buffer<ffi::F32> gates,
                            ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), wd = w.dimensions(), ad = a.dimensions(), bd = b.dimensions(), id = ids.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || ad.size() != 3 || bd.size() != 3 || id.size() != 2 ||
      xd[1] != wd[0] || ad[1] != xd[1] || bd[0] != ad[0] || bd[1] != ad[2] || bd[2] != wd[1] || id[0] != xd[0] ||
      gates.dimensions().size() != 2 || gates.dimensions()[0] != id[0] || gates.dimensions()[1] != id[1])
    return Invalid("lsjax_routed_matmul: expected x [T, K], W [K, N], A [E, K, R], B [E, R, N], ids and gates [T, J]");
  const int32_t* chosen = ids.typed_data();
  for (int64_t i = 0; i < id[0] * id[1]; ++i)
    if (chosen[i] < 0 || chosen[i] >= ad[0]) return Invalid("lsjax_routed_matmul: expert id out of range");
  Product p{x.typed_data(), w.typed_data(), a.typed_data(), b.typed_data(), chosen, gates.typed_data(),
            xd[0], xd[1], wd[1], ad[2], id[1]};
  p.y = y->typed_data();
  Multiply(p);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LsjaxMatmul, MatmulImpl,
                              ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(LsjaxMatmulT, MatmulTImpl,
                              ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(LsjaxRoutedMatmul, RoutedMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
