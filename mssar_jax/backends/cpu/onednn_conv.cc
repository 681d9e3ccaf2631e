// oneDNN convolutions for XLA:CPU, as XLA FFI handlers (see onednn_conv.py).
//
// Three handlers, all float32, activations NHWC, kernels HWIO (flax's layouts), stride and
// explicit padding as attributes, no dilation, one feature group:
//   MssarOnednnConvForward      y[n,p,q,o]  = sum_{i,kh,kw} x[n, p*sh+kh-pt, q*sw+kw-pl, i] w[kh,kw,i,o]
//   MssarOnednnConvBackwardData dx = d/dx of <dy, y>  (the transposed convolution of dy with w)
//   MssarOnednnConvBackwardWeights dw = d/dw of <dy, y> (correlation of x with dy over n, p, q)
// Each oneDNN primitive is created once per shape and kept; oneDNN chooses its own blocked
// kernel layout ("any") and the kernel is reordered from / to HWIO around the call.
// Threads: every oneDNN call runs on one thread (OpenMP teams of one). A convolution of 5e7
// flops or more is split by batch into as many chunks as XLA's intra-op pool has threads;
// the calling thread and tasks scheduled on that pool take the chunks in turn (the caller
// runs whatever nobody has started), and the weight gradient adds the chunks' parts. An
// OpenMP team beside XLA's own threads waited for cores busy with XLA's concurrent work.
#include <array>
#include <atomic>
#include <exception>
#include <string>
#include <thread>
#include <cstdint>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <vector>

#include <omp.h>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = dnnl::memory::format_tag;

namespace {

enum Kind : int64_t { kForward = 0, kBackwardData = 1, kBackwardWeights = 2 };

// Convolutions with fewer flops run as one chunk on the calling thread.
constexpr double kSplitFlops = 5e7;

// kind, N (of the chunk), H, W, C, O, KH, KW, OH, OW, sh, sw, pt, pb, pl, pr
using Key = std::array<int64_t, 16>;

struct KeyHash {
  size_t operator()(const Key& k) const {
    size_t h = 1469598103934665603ull;
    for (int64_t v : k) h = (h ^ static_cast<size_t>(v)) * 1099511628211ull;
    return h;
  }
};

struct Plan {
  dnnl::primitive conv;
  memory::desc user_weights;    // HWIO
  memory::desc conv_weights;    // the layout oneDNN chose
  bool needs_reorder = false;
  dnnl::primitive weights_reorder;  // HWIO -> conv_weights (fwd, bwd-data) or back (bwd-w)
  memory::desc src, dst, scratchpad;
};

dnnl::engine& Engine() {
  static dnnl::engine* engine = new dnnl::engine(dnnl::engine::kind::cpu, 0);
  return *engine;
}

std::mutex plans_mutex;
std::unordered_map<Key, std::unique_ptr<Plan>, KeyHash>* plans =
    new std::unordered_map<Key, std::unique_ptr<Plan>, KeyHash>();

std::unique_ptr<Plan> MakePlan(const Key& k) {
  const int64_t N = k[1], H = k[2], W = k[3], C = k[4], O = k[5], KH = k[6], KW = k[7],
                OH = k[8], OW = k[9];
  const memory::dims strides = {k[10], k[11]};
  const memory::dims pad_l = {k[12], k[14]}, pad_r = {k[13], k[15]};
  const auto f32 = memory::data_type::f32;
  memory::desc x_md({N, C, H, W}, f32, tag::nhwc);
  memory::desc y_md({N, O, OH, OW}, f32, tag::nhwc);
  memory::desc w_any({O, C, KH, KW}, f32, tag::any);
  auto plan = std::make_unique<Plan>();
  plan->user_weights = memory::desc({O, C, KH, KW}, f32, tag::hwio);
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  auto algo = dnnl::algorithm::convolution_direct;
  dnnl::convolution_forward::primitive_desc fwd(
      Engine(), dnnl::prop_kind::forward_training, algo, x_md, w_any, y_md, strides, pad_l,
      pad_r, attr);
  if (k[0] == kForward) {
    plan->conv = dnnl::convolution_forward(fwd);
    plan->conv_weights = fwd.weights_desc();
    plan->scratchpad = fwd.scratchpad_desc();
  } else if (k[0] == kBackwardData) {
    dnnl::convolution_backward_data::primitive_desc bwd(
        Engine(), algo, x_md, w_any, y_md, strides, pad_l, pad_r, fwd, attr);
    plan->conv = dnnl::convolution_backward_data(bwd);
    plan->conv_weights = bwd.weights_desc();
    plan->scratchpad = bwd.scratchpad_desc();
  } else {
    dnnl::convolution_backward_weights::primitive_desc bwd(
        Engine(), algo, x_md, w_any, y_md, strides, pad_l, pad_r, fwd, attr);
    plan->conv = dnnl::convolution_backward_weights(bwd);
    plan->conv_weights = bwd.diff_weights_desc();
    plan->scratchpad = bwd.scratchpad_desc();
  }
  plan->needs_reorder = plan->conv_weights != plan->user_weights;
  if (plan->needs_reorder) {
    if (k[0] == kBackwardWeights) {
      plan->weights_reorder = dnnl::reorder(
          dnnl::reorder::primitive_desc(Engine(), plan->conv_weights, Engine(), plan->user_weights));
    } else {
      plan->weights_reorder = dnnl::reorder(
          dnnl::reorder::primitive_desc(Engine(), plan->user_weights, Engine(), plan->conv_weights));
    }
  }
  plan->src = x_md;
  plan->dst = y_md;
  return plan;
}

const Plan& GetPlan(const Key& k) {
  std::lock_guard<std::mutex> lock(plans_mutex);
  auto it = plans->find(k);
  if (it == plans->end()) it = plans->emplace(k, MakePlan(k)).first;
  return *it->second;
}

// Per-thread scratch: the reordered kernel and the primitive's scratchpad.
struct Scratch {
  std::vector<char> weights, pad;
  static void* Get(std::vector<char>& v, size_t bytes) {
    if (v.size() < bytes) v.resize(bytes);
    return v.data();
  }
};

// One convolution on samples [n0, n0 + nb) of the batch, on the calling thread's stream.
// fwd: a = x, b = w, out = y;  bwd-data: a = dy, b = w, out = dx;  bwd-w: a = x, b = dy,
// out = dw (HWIO) of these samples alone.
void RunChunk(Kind kind, Key k, int64_t n0, int64_t nb, const float* a, const float* b,
              float* out) {
  const int64_t in_size = k[2] * k[3] * k[4], out_size = k[8] * k[9] * k[5];
  k[1] = nb;
  const Plan& plan = GetPlan(k);
  thread_local Scratch scratch;
  thread_local dnnl::stream stream(Engine());
  dnnl::engine& eng = Engine();
  memory pad(plan.scratchpad, eng, Scratch::Get(scratch.pad, plan.scratchpad.get_size()));
  if (kind == kBackwardWeights) {
    memory x(plan.src, eng, const_cast<float*>(a) + n0 * in_size);
    memory dy(plan.dst, eng, const_cast<float*>(b) + n0 * out_size);
    memory user_dw(plan.user_weights, eng, out);
    memory dw = plan.needs_reorder
        ? memory(plan.conv_weights, eng,
                 Scratch::Get(scratch.weights, plan.conv_weights.get_size()))
        : user_dw;
    plan.conv.execute(stream, {{DNNL_ARG_SRC, x}, {DNNL_ARG_DIFF_DST, dy},
                               {DNNL_ARG_DIFF_WEIGHTS, dw}, {DNNL_ARG_SCRATCHPAD, pad}});
    if (plan.needs_reorder) {
      plan.weights_reorder.execute(stream, {{DNNL_ARG_FROM, dw}, {DNNL_ARG_TO, user_dw}});
    }
  } else {
    memory user_w(plan.user_weights, eng, const_cast<float*>(b));
    memory w = user_w;
    if (plan.needs_reorder) {
      w = memory(plan.conv_weights, eng,
                 Scratch::Get(scratch.weights, plan.conv_weights.get_size()));
      plan.weights_reorder.execute(stream, {{DNNL_ARG_FROM, user_w}, {DNNL_ARG_TO, w}});
    }
    if (kind == kForward) {
      memory x(plan.src, eng, const_cast<float*>(a) + n0 * in_size);
      memory y(plan.dst, eng, out + n0 * out_size);
      plan.conv.execute(stream, {{DNNL_ARG_SRC, x}, {DNNL_ARG_WEIGHTS, w},
                                 {DNNL_ARG_DST, y}, {DNNL_ARG_SCRATCHPAD, pad}});
    } else {
      memory dy(plan.dst, eng, const_cast<float*>(a) + n0 * out_size);
      memory dx(plan.src, eng, out + n0 * in_size);
      plan.conv.execute(stream, {{DNNL_ARG_DIFF_DST, dy}, {DNNL_ARG_WEIGHTS, w},
                                 {DNNL_ARG_DIFF_SRC, dx}, {DNNL_ARG_SCRATCHPAD, pad}});
    }
  }
  stream.wait();
}

// How many calls were split into more than one chunk (read by the tests).

// A convolution split into batch chunks that the calling thread and XLA's intra-op threads
// take in turn (the caller takes whatever no one else has started), each chunk on one thread.
struct Split {
  Kind kind;
  Key key;
  const float* a;
  const float* b;
  float* out;
  int64_t batch, chunks, weights_size;
  std::vector<float> partial;  // bwd-w: dw of chunks 1.. (chunk 0 writes out)
  std::atomic<int64_t> next{0}, done{0};
  std::atomic<bool> failed{false};
  std::string error;
  std::mutex error_mutex;

  void Work() {
    const int threads = omp_get_max_threads();
    omp_set_num_threads(1);
    for (int64_t i; (i = next.fetch_add(1)) < chunks;) {
      const int64_t n0 = batch * i / chunks, n1 = batch * (i + 1) / chunks;
      try {
        float* dst = out;
        if (kind == kBackwardWeights && i > 0) dst = partial.data() + (i - 1) * weights_size;
        RunChunk(kind, key, n0, n1 - n0, a, b, dst);
      } catch (const std::exception& e) {  // oneDNN's errors, allocation failures
        std::lock_guard<std::mutex> lock(error_mutex);
        failed = true;
        error = e.what();
      }
      done.fetch_add(1, std::memory_order_release);
    }
    omp_set_num_threads(threads);
  }
};

ffi::Error Run(Kind kind, ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a,
               ffi::Buffer<ffi::F32> b, ffi::ResultBuffer<ffi::F32> out, int64_t sh,
               int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  // fwd: a = x, b = w, out = y;  bwd-data: a = dy, b = w, out = dx;  bwd-w: a = x, b = dy, out = dw.
  Key k;
  if (kind == kForward) {
    auto x = a.dimensions(), w = b.dimensions(), y = out->dimensions();
    k = {kind, x[0], x[1], x[2], x[3], w[3], w[0], w[1], y[1], y[2], sh, sw, pt, pb, pl, pr};
  } else if (kind == kBackwardData) {
    auto dy = a.dimensions(), w = b.dimensions(), dx = out->dimensions();
    k = {kind, dx[0], dx[1], dx[2], dx[3], w[3], w[0], w[1], dy[1], dy[2], sh, sw, pt, pb, pl, pr};
  } else {
    auto x = a.dimensions(), dy = b.dimensions(), dw = out->dimensions();
    k = {kind, x[0], x[1], x[2], x[3], dw[3], dw[0], dw[1], dy[1], dy[2], sh, sw, pt, pb, pl, pr};
  }
  const double flops = 2.0 * k[1] * k[8] * k[9] * k[4] * k[5] * k[6] * k[7];
  auto s = std::make_shared<Split>();
  s->kind = kind;
  s->key = k;
  s->a = a.typed_data();
  s->b = b.typed_data();
  s->out = out->typed_data();
  s->batch = k[1];
  s->chunks = flops < kSplitFlops ? 1 : std::max<int64_t>(1, std::min(k[1], pool.num_threads()));
  s->weights_size = k[4] * k[5] * k[6] * k[7];
  if (kind == kBackwardWeights && s->chunks > 1) {
    s->partial.assign((s->chunks - 1) * s->weights_size, 0.0f);
  }
  for (int64_t i = 1; i < s->chunks; ++i) pool.Schedule([s] { s->Work(); });
  s->Work();
  while (s->done.load(std::memory_order_acquire) < s->chunks) std::this_thread::yield();
  if (s->failed) {
    return ffi::Error(ffi::ErrorCode::kInternal, "oneDNN convolution: " + s->error);
  }
  if (kind == kBackwardWeights) {  // the chunks' weight gradients add up
    for (int64_t c = 1; c < s->chunks; ++c) {
      const float* p = s->partial.data() + (c - 1) * s->weights_size;
      for (int64_t j = 0; j < s->weights_size; ++j) s->out[j] += p[j];
    }
  }
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                   ffi::ResultBuffer<ffi::F32> y, int64_t sh, int64_t sw, int64_t pt,
                   int64_t pb, int64_t pl, int64_t pr) {
  return Run(kForward, pool, x, w, y, sh, sw, pt, pb, pl, pr);
}
ffi::Error BackwardData(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> w,
                        ffi::ResultBuffer<ffi::F32> dx, int64_t sh, int64_t sw, int64_t pt,
                        int64_t pb, int64_t pl, int64_t pr) {
  return Run(kBackwardData, pool, dy, w, dx, sh, sw, pt, pb, pl, pr);
}
ffi::Error BackwardWeights(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                           ffi::ResultBuffer<ffi::F32> dw, int64_t sh, int64_t sw, int64_t pt,
                           int64_t pb, int64_t pl, int64_t pr) {
  return Run(kBackwardWeights, pool, x, dy, dw, sh, sw, pt, pb, pl, pr);
}

}  // namespace

#define MSSAR_CONV_BINDING                                                            \
  ffi::Ffi::Bind()                                                                    \
      .Ctx<ffi::ThreadPool>()                                                         \
      .Arg<ffi::Buffer<ffi::F32>>()                                                   \
      .Arg<ffi::Buffer<ffi::F32>>()                                                   \
      .Ret<ffi::Buffer<ffi::F32>>()                                                   \
      .Attr<int64_t>("stride_h")                                                      \
      .Attr<int64_t>("stride_w")                                                      \
      .Attr<int64_t>("pad_top")                                                       \
      .Attr<int64_t>("pad_bottom")                                                    \
      .Attr<int64_t>("pad_left")                                                      \
      .Attr<int64_t>("pad_right")

XLA_FFI_DEFINE_HANDLER_SYMBOL(MssarOnednnConvForward, Forward, MSSAR_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(MssarOnednnConvBackwardData, BackwardData, MSSAR_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(MssarOnednnConvBackwardWeights, BackwardWeights, MSSAR_CONV_BINDING);

