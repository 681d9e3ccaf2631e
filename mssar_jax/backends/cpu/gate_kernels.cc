// The recalibration gate fused with the BatchNorm before it, on 2x2 cells, as XLA FFI
// handlers (see gate_kernels.py and backends/cpu/folded.py for the maths). float32, NHWC,
// C a multiple of 16 (one 16-lane vector per 16 channels). Each handler splits the batch
// into one chunk per thread of XLA's intra-op pool when the input has >= 2^15 elements; the
// calling thread and pool tasks take chunks in turn (the caller runs whatever nobody has
// started). Sums over the batch are kept per chunk in double and added at the end.
//
//   MssarPoolStats    x (N,H,W,C) -> m = CellMean_2x2(x), mean_c(x), var_c(x) (biased)
//   MssarExcite       h (M,K), W (K,C), c (C) -> s = sigmoid(relu(h) W + c)
//   MssarGateBackward g, x, a, b, h, W, s, gs -> dh, dW, dc, da, db where, per 2x2 cell,
//                     Q1 = CellSum(g), Q2 = CellSum(g x), dp = (a Q2 + b Q1 + gs) s (1 - s),
//                     dh = [h > 0] dp W^T, dW = sum relu(h)^T dp, dc = sum dp,
//                     da = sum s Q2, db = sum s Q1.
//   MssarSqueeze      m (M,C), a, b, W (C,K), c (K) -> z = (m a + b) W + c
//   MssarSqueezeBackward m, a, b, W, dz -> dm = (dz W^T) a, dW = sum (m a + b)^T dz,
//                     dc = sum dz, da = sum m (dz W^T), db = sum dz W^T
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kLanes = 16;
typedef float vf __attribute__((vector_size(4 * kLanes), aligned(4)));  // unaligned loads ok
typedef int32_t vi __attribute__((vector_size(4 * kLanes)));
constexpr int64_t kSplitElements = int64_t{1} << 15;

inline vf Splat(float v) { return vf{} + v; }

inline float HorizontalSum(vf v) {  // halving: 8, 4, 2, 1 lanes
  typedef float v8 __attribute__((vector_size(32)));
  typedef float v4 __attribute__((vector_size(16)));
  const v8 s8 = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const v4 s4 = __builtin_shufflevector(s8, s8, 0, 1, 2, 3) +
                __builtin_shufflevector(s8, s8, 4, 5, 6, 7);
  return (s4[0] + s4[1]) + (s4[2] + s4[3]);
}

// exp(t) for t <= 0: t = n ln2 + r with n = round(t / ln2), |r| <= ln2 / 2, and Cephes'
// degree-6 polynomial for exp(r) (relative error ~1e-7); t is clipped at -87 (exp = 1.6e-38).
inline vf ExpNonPositive(vf t) {
  t = t < Splat(-87.0f) ? Splat(-87.0f) : t;
  // Conversion truncates toward zero, so for t / ln2 - 1/2 <= 0 it rounds t / ln2.
  const vf n = __builtin_convertvector(
      __builtin_convertvector(t * 1.44269504088896341f - 0.5f, vi), vf);
  const vf r = t - n * 0.693359375f + n * 2.12194440e-4f;  // ln2 in two parts
  vf p = Splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const vi bits = (__builtin_convertvector(n, vi) + 127) << 23;  // 2^n, n >= -126
  vf scale;
  __builtin_memcpy(&scale, &bits, sizeof(vf));
  return p * scale;
}

// 1 / (1 + exp(-p)), from e = exp(-|p|) so nothing overflows.
inline vf Sigmoid(vf p) {
  const vf e = ExpNonPositive(p < 0.0f ? p : -p);
  const vf inv = 1.0f / (1.0f + e);
  return p >= 0.0f ? inv : e * inv;
}

int64_t Chunks(const ffi::ThreadPool& pool, int64_t rows, int64_t elements) {
  if (elements < kSplitElements) return 1;
  return std::max<int64_t>(1, std::min<int64_t>(rows, pool.num_threads()));
}

// body(chunk, row0, row1) for `chunks` contiguous ranges of [0, rows), on the calling thread
// and pool tasks; returns when all are done. body must not throw.
template <typename F>
void ParallelFor(ffi::ThreadPool& pool, int64_t chunks, int64_t rows, const F& body) {
  struct State {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto state = std::make_shared<State>();
  auto work = [state, chunks, rows, &body] {
    for (int64_t i; (i = state->next.fetch_add(1)) < chunks;) {
      body(i, rows * i / chunks, rows * (i + 1) / chunks);
      state->done.fetch_add(1, std::memory_order_release);
    }
  };
  // A task that starts after every chunk is taken returns without touching body.
  for (int64_t i = 1; i < chunks; ++i) {
    auto task = work;
    pool.Schedule(std::move(task));
  }
  work();
  while (state->done.load(std::memory_order_acquire) < chunks) std::this_thread::yield();
}

// f(std::integral_constant<int64_t, V>) for V = C / 16 in 1..16; false if C is not such.
template <typename F>
bool DispatchVectors(int64_t channels, F&& f) {
  if (channels % kLanes != 0) return false;
  switch (channels / kLanes) {
#define MSSAR_CASE(v) \
  case v:             \
    f(std::integral_constant<int64_t, v>()); \
    return true;
    MSSAR_CASE(1) MSSAR_CASE(2) MSSAR_CASE(3) MSSAR_CASE(4) MSSAR_CASE(5) MSSAR_CASE(6)
    MSSAR_CASE(7) MSSAR_CASE(8) MSSAR_CASE(9) MSSAR_CASE(10) MSSAR_CASE(11) MSSAR_CASE(12)
    MSSAR_CASE(13) MSSAR_CASE(14) MSSAR_CASE(15) MSSAR_CASE(16)
#undef MSSAR_CASE
  }
  return false;
}

ffi::Error Unsupported(const char* what, int64_t channels) {
  return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                    std::string(what) + ": channels must be a multiple of 16 up to 256, got " +
                        std::to_string(channels));
}

// Adds `chunks` rows of `width` doubles and writes them as floats.
void SumChunks(const std::vector<double>& partial, int64_t chunks, int64_t width, float* out) {
  for (int64_t j = 0; j < width; ++j) {
    double t = 0.0;
    for (int64_t c = 0; c < chunks; ++c) t += partial[c * width + j];
    out[j] = static_cast<float>(t);
  }
}

template <int64_t V>
void AddLanes(const vf (&v)[V], double* out) {
  for (int64_t i = 0; i < V; ++i)
    for (int j = 0; j < kLanes; ++j) out[i * kLanes + j] += v[i][j];
}

ffi::Error PoolStats(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x_buf,
                     ffi::ResultBuffer<ffi::F32> means_buf, ffi::ResultBuffer<ffi::F32> mean_buf,
                     ffi::ResultBuffer<ffi::F32> var_buf) {
  const auto d = x_buf.dimensions();
  const int64_t N = d[0], H = d[1], W = d[2], C = d[3], GH = H / 2, GW = W / 2;
  const float* x = x_buf.typed_data();
  float* means = means_buf->typed_data();
  const int64_t chunks = Chunks(pool, N, x_buf.element_count());
  std::vector<double> partial(chunks * 2 * C, 0.0);  // per chunk: sum x, sum x^2
  const bool ok = DispatchVectors(C, [&](auto vecs) {
    constexpr int64_t V = decltype(vecs)::value;
    ParallelFor(pool, chunks, N, [&](int64_t chunk, int64_t n0, int64_t n1) {
      double* sums = partial.data() + chunk * 2 * C;
      for (int64_t n = n0; n < n1; ++n) {
        vf s1[V] = {}, s2[V] = {};
        for (int64_t gy = 0; gy < GH; ++gy) {
          for (int64_t gx = 0; gx < GW; ++gx) {
            vf cell[V] = {};
            for (int64_t dy = 0; dy < 2; ++dy) {
              for (int64_t dx = 0; dx < 2; ++dx) {
                const vf* px = reinterpret_cast<const vf*>(
                    x + ((n * H + 2 * gy + dy) * W + 2 * gx + dx) * C);
                for (int64_t v = 0; v < V; ++v) {
                  const vf t = px[v];
                  cell[v] += t;
                  s2[v] += t * t;
                }
              }
            }
            vf* out = reinterpret_cast<vf*>(means + ((n * GH + gy) * GW + gx) * C);
            for (int64_t v = 0; v < V; ++v) {
              s1[v] += cell[v];
              out[v] = cell[v] * 0.25f;
            }
          }
        }
        AddLanes(s1, sums);
        AddLanes(s2, sums + C);
      }
    });
  });
  if (!ok) return Unsupported("pool_stats", C);
  const double count = static_cast<double>(N) * H * W;
  for (int64_t c = 0; c < C; ++c) {
    double t1 = 0.0, t2 = 0.0;
    for (int64_t k = 0; k < chunks; ++k) {
      t1 += partial[k * 2 * C + c];
      t2 += partial[k * 2 * C + C + c];
    }
    const double mu = t1 / count;
    mean_buf->typed_data()[c] = static_cast<float>(mu);
    var_buf->typed_data()[c] = static_cast<float>(std::max(t2 / count - mu * mu, 0.0));
  }
  return ffi::Error::Success();
}

ffi::Error Excite(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> h_buf, ffi::Buffer<ffi::F32> w_buf,
                  ffi::Buffer<ffi::F32> bias_buf, ffi::ResultBuffer<ffi::F32> score_buf) {
  const int64_t K = w_buf.dimensions()[0], C = w_buf.dimensions()[1];
  const int64_t M = h_buf.element_count() / K;
  const float *h = h_buf.typed_data(), *w = w_buf.typed_data(), *bias = bias_buf.typed_data();
  float* score = score_buf->typed_data();
  const int64_t chunks = Chunks(pool, M, M * C);
  const bool ok = DispatchVectors(C, [&](auto vecs) {
    constexpr int64_t V = decltype(vecs)::value;
    ParallelFor(pool, chunks, M, [&](int64_t, int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) {
        vf p[V];
        for (int64_t v = 0; v < V; ++v) p[v] = reinterpret_cast<const vf*>(bias)[v];
        for (int64_t k = 0; k < K; ++k) {
          const float relu = std::max(h[m * K + k], 0.0f);
          const vf* wk = reinterpret_cast<const vf*>(w + k * C);
          for (int64_t v = 0; v < V; ++v) p[v] += relu * wk[v];
        }
        vf* out = reinterpret_cast<vf*>(score + m * C);
        for (int64_t v = 0; v < V; ++v) out[v] = Sigmoid(p[v]);
      }
    });
  });
  if (!ok) return Unsupported("excite", C);
  return ffi::Error::Success();
}

ffi::Error GateBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> g_buf,
                        ffi::Buffer<ffi::F32> x_buf, ffi::Buffer<ffi::F32> a_buf,
                        ffi::Buffer<ffi::F32> b_buf, ffi::Buffer<ffi::F32> h_buf,
                        ffi::Buffer<ffi::F32> w_buf, ffi::Buffer<ffi::F32> score_buf,
                        ffi::Buffer<ffi::F32> g_score_buf, ffi::ResultBuffer<ffi::F32> dh_buf,
                        ffi::ResultBuffer<ffi::F32> dw_buf, ffi::ResultBuffer<ffi::F32> dc_buf,
                        ffi::ResultBuffer<ffi::F32> da_buf, ffi::ResultBuffer<ffi::F32> db_buf) {
  const auto d = x_buf.dimensions();
  const int64_t N = d[0], H = d[1], W = d[2], C = d[3], GH = H / 2, GW = W / 2;
  const int64_t K = w_buf.dimensions()[0];
  const float *g = g_buf.typed_data(), *x = x_buf.typed_data(), *h = h_buf.typed_data(),
              *w = w_buf.typed_data(), *score = score_buf.typed_data(),
              *g_score = g_score_buf.typed_data();
  float* dh = dh_buf->typed_data();
  const int64_t width = K * C + 3 * C;  // per chunk: dW, dc, da, db
  const int64_t chunks = Chunks(pool, N, x_buf.element_count());
  std::vector<double> partial(chunks * width, 0.0);
  const bool ok = DispatchVectors(C, [&](auto vecs) {
    constexpr int64_t V = decltype(vecs)::value;
    const vf* a = reinterpret_cast<const vf*>(a_buf.typed_data());
    const vf* b = reinterpret_cast<const vf*>(b_buf.typed_data());
    ParallelFor(pool, chunks, N, [&](int64_t chunk, int64_t n0, int64_t n1) {
      double* sums = partial.data() + chunk * width;
      std::vector<vf> dw(K * V);
      for (int64_t n = n0; n < n1; ++n) {
        std::fill(dw.begin(), dw.end(), Splat(0.0f));
        vf dc[V] = {}, da[V] = {}, db[V] = {};
        for (int64_t gy = 0; gy < GH; ++gy) {
          for (int64_t gx = 0; gx < GW; ++gx) {
            vf q1[V] = {}, q2[V] = {};
            for (int64_t dy = 0; dy < 2; ++dy) {
              for (int64_t dx = 0; dx < 2; ++dx) {
                const int64_t at = ((n * H + 2 * gy + dy) * W + 2 * gx + dx) * C;
                const vf* gp = reinterpret_cast<const vf*>(g + at);
                const vf* xp = reinterpret_cast<const vf*>(x + at);
                for (int64_t v = 0; v < V; ++v) {
                  const vf t = gp[v];
                  q1[v] += t;
                  q2[v] += t * xp[v];
                }
              }
            }
            const int64_t cell = (n * GH + gy) * GW + gx;
            const vf* s = reinterpret_cast<const vf*>(score + cell * C);
            const vf* gs = reinterpret_cast<const vf*>(g_score + cell * C);
            vf dp[V];
            for (int64_t v = 0; v < V; ++v) {
              const vf sv = s[v];
              dp[v] = (a[v] * q2[v] + b[v] * q1[v] + gs[v]) * (sv * (1.0f - sv));
              dc[v] += dp[v];
              da[v] += sv * q2[v];
              db[v] += sv * q1[v];
            }
            for (int64_t k = 0; k < K; ++k) {
              const float hk = h[cell * K + k], relu = std::max(hk, 0.0f);
              const vf* wk = reinterpret_cast<const vf*>(w + k * C);
              vf* dwk = dw.data() + k * V;
              vf dot = {};
              for (int64_t v = 0; v < V; ++v) {
                dot += dp[v] * wk[v];
                dwk[v] += relu * dp[v];
              }
              const float total = HorizontalSum(dot);
              dh[cell * K + k] = hk > 0.0f ? total : 0.0f;
            }
          }
        }
        for (int64_t i = 0; i < K * V; ++i)
          for (int j = 0; j < kLanes; ++j) sums[i * kLanes + j] += dw[i][j];
        AddLanes(dc, sums + K * C);
        AddLanes(da, sums + K * C + C);
        AddLanes(db, sums + K * C + 2 * C);
      }
    });
  });
  if (!ok) return Unsupported("gate_backward", C);
  std::vector<float> total(width);
  SumChunks(partial, chunks, width, total.data());
  std::copy(total.begin(), total.begin() + K * C, dw_buf->typed_data());
  std::copy(total.begin() + K * C, total.begin() + K * C + C, dc_buf->typed_data());
  std::copy(total.begin() + K * C + C, total.begin() + K * C + 2 * C, da_buf->typed_data());
  std::copy(total.begin() + K * C + 2 * C, total.end(), db_buf->typed_data());
  return ffi::Error::Success();
}

ffi::Error Squeeze(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> m_buf, ffi::Buffer<ffi::F32> a_buf,
                   ffi::Buffer<ffi::F32> b_buf, ffi::Buffer<ffi::F32> w_buf,
                   ffi::Buffer<ffi::F32> bias_buf, ffi::ResultBuffer<ffi::F32> z_buf) {
  const int64_t C = w_buf.dimensions()[0], K = w_buf.dimensions()[1];
  const int64_t M = m_buf.element_count() / C;
  const float *m = m_buf.typed_data(), *w = w_buf.typed_data(), *bias = bias_buf.typed_data();
  float* z = z_buf->typed_data();
  std::vector<float> wt(K * C);  // W^T: one row of C weights per output
  for (int64_t c = 0; c < C; ++c)
    for (int64_t k = 0; k < K; ++k) wt[k * C + c] = w[c * K + k];
  const int64_t chunks = Chunks(pool, M, M * C);
  const bool ok = DispatchVectors(C, [&](auto vecs) {
    constexpr int64_t V = decltype(vecs)::value;
    const vf* a = reinterpret_cast<const vf*>(a_buf.typed_data());
    const vf* b = reinterpret_cast<const vf*>(b_buf.typed_data());
    ParallelFor(pool, chunks, M, [&](int64_t, int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const vf* mr = reinterpret_cast<const vf*>(m + r * C);
        vf y[V];
        for (int64_t v = 0; v < V; ++v) y[v] = mr[v] * a[v] + b[v];
        for (int64_t k = 0; k < K; ++k) {
          const vf* wk = reinterpret_cast<const vf*>(wt.data() + k * C);
          vf dot = y[0] * wk[0];
          for (int64_t v = 1; v < V; ++v) dot += y[v] * wk[v];
          z[r * K + k] = HorizontalSum(dot) + bias[k];
        }
      }
    });
  });
  if (!ok) return Unsupported("squeeze", C);
  return ffi::Error::Success();
}

ffi::Error SqueezeBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> m_buf,
                           ffi::Buffer<ffi::F32> a_buf, ffi::Buffer<ffi::F32> b_buf,
                           ffi::Buffer<ffi::F32> w_buf, ffi::Buffer<ffi::F32> dz_buf,
                           ffi::ResultBuffer<ffi::F32> dm_buf, ffi::ResultBuffer<ffi::F32> dw_buf,
                           ffi::ResultBuffer<ffi::F32> dc_buf, ffi::ResultBuffer<ffi::F32> da_buf,
                           ffi::ResultBuffer<ffi::F32> db_buf) {
  const int64_t C = w_buf.dimensions()[0], K = w_buf.dimensions()[1];
  const int64_t M = m_buf.element_count() / C;
  const float *m = m_buf.typed_data(), *w = w_buf.typed_data(), *dz = dz_buf.typed_data();
  float* dm = dm_buf->typed_data();
  std::vector<float> wt(K * C);
  for (int64_t c = 0; c < C; ++c)
    for (int64_t k = 0; k < K; ++k) wt[k * C + c] = w[c * K + k];
  const int64_t width = K * C + K + 2 * C;  // per chunk: dW^T, dc, da, db
  const int64_t chunks = Chunks(pool, M, M * C);
  std::vector<double> partial(chunks * width, 0.0);
  const bool ok = DispatchVectors(C, [&](auto vecs) {
    constexpr int64_t V = decltype(vecs)::value;
    const vf* a = reinterpret_cast<const vf*>(a_buf.typed_data());
    const vf* b = reinterpret_cast<const vf*>(b_buf.typed_data());
    ParallelFor(pool, chunks, M, [&](int64_t chunk, int64_t r0, int64_t r1) {
      double* sums = partial.data() + chunk * width;
      std::vector<vf> dwt(K * V, Splat(0.0f));
      std::vector<float> dc(K, 0.0f);
      vf da[V] = {}, db[V] = {};
      constexpr int64_t kFlush = 4096;  // rows per float partial sum before adding to double
      for (int64_t r = r0; r < r1; ++r) {
        const vf* mr = reinterpret_cast<const vf*>(m + r * C);
        vf dy[V] = {};
        for (int64_t k = 0; k < K; ++k) {
          const float g = dz[r * K + k];
          const vf* wk = reinterpret_cast<const vf*>(wt.data() + k * C);
          vf* dwk = dwt.data() + k * V;
          for (int64_t v = 0; v < V; ++v) {
            dy[v] += g * wk[v];
            dwk[v] += g * (mr[v] * a[v] + b[v]);
          }
          dc[k] += g;
        }
        vf* out = reinterpret_cast<vf*>(dm + r * C);
        for (int64_t v = 0; v < V; ++v) {
          out[v] = dy[v] * a[v];
          da[v] += mr[v] * dy[v];
          db[v] += dy[v];
        }
        if ((r - r0) % kFlush == kFlush - 1 || r == r1 - 1) {
          for (int64_t i = 0; i < K * V; ++i)
            for (int j = 0; j < kLanes; ++j) sums[i * kLanes + j] += dwt[i][j];
          for (int64_t k = 0; k < K; ++k) sums[K * C + k] += dc[k];
          AddLanes(da, sums + K * C + K);
          AddLanes(db, sums + K * C + K + C);
          std::fill(dwt.begin(), dwt.end(), Splat(0.0f));
          std::fill(dc.begin(), dc.end(), 0.0f);
          for (int64_t v = 0; v < V; ++v) da[v] = db[v] = Splat(0.0f);
        }
      }
    });
  });
  if (!ok) return Unsupported("squeeze_backward", C);
  std::vector<float> total(width);
  SumChunks(partial, chunks, width, total.data());
  float* dw = dw_buf->typed_data();
  for (int64_t k = 0; k < K; ++k)
    for (int64_t c = 0; c < C; ++c) dw[c * K + k] = total[k * C + c];
  std::copy(total.begin() + K * C, total.begin() + K * C + K, dc_buf->typed_data());
  std::copy(total.begin() + K * C + K, total.begin() + K * C + K + C, da_buf->typed_data());
  std::copy(total.begin() + K * C + K + C, total.end(), db_buf->typed_data());
  return ffi::Error::Success();
}

}  // namespace

using F32 = ffi::Buffer<ffi::F32>;
using F32Out = ffi::ResultBuffer<ffi::F32>;

XLA_FFI_DEFINE_HANDLER_SYMBOL(MssarPoolStats, PoolStats,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32>()
                                  .Ret<F32>()
                                  .Ret<F32>()
                                  .Ret<F32>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(MssarExcite, Excite,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Ret<F32>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(MssarGateBackward, GateBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32>()  // g
                                  .Arg<F32>()  // x
                                  .Arg<F32>()  // a
                                  .Arg<F32>()  // b
                                  .Arg<F32>()  // h
                                  .Arg<F32>()  // W
                                  .Arg<F32>()  // score
                                  .Arg<F32>()  // g_score
                                  .Ret<F32>()  // dh
                                  .Ret<F32>()  // dW
                                  .Ret<F32>()  // dc
                                  .Ret<F32>()  // da
                                  .Ret<F32>());  // db
XLA_FFI_DEFINE_HANDLER_SYMBOL(MssarSqueeze, Squeeze,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32>()  // m
                                  .Arg<F32>()  // a
                                  .Arg<F32>()  // b
                                  .Arg<F32>()  // W
                                  .Arg<F32>()  // c
                                  .Ret<F32>());  // z
XLA_FFI_DEFINE_HANDLER_SYMBOL(MssarSqueezeBackward, SqueezeBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32>()  // m
                                  .Arg<F32>()  // a
                                  .Arg<F32>()  // b
                                  .Arg<F32>()  // W
                                  .Arg<F32>()  // dz
                                  .Ret<F32>()  // dm
                                  .Ret<F32>()  // dW
                                  .Ret<F32>()  // dc
                                  .Ret<F32>()  // da
                                  .Ret<F32>());  // db
