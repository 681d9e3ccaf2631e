// oneDNN convolutions for XLA:CPU, as XLA FFI handlers (see onednn_conv.py).
//
// Three handlers, all float32, activations NHWC, kernels HWIO (flax's layouts), stride and
// explicit padding as attributes, no dilation, one feature group:
//   MssarOnednnConvForward      y[n,p,q,o]  = sum_{i,kh,kw} x[n, p*sh+kh-pt, q*sw+kw-pl, i] w[kh,kw,i,o]
//   MssarOnednnConvBackwardData dx = d/dx of <dy, y>  (the transposed convolution of dy with w)
//   MssarOnednnConvBackwardWeights dw = d/dw of <dy, y> (correlation of x with dy over n, p, q)
// Each oneDNN primitive is created once per shape and kept; oneDNN chooses its own blocked
// kernel layout ("any") and the kernel is reordered from / to HWIO around the call.
#include <array>
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

constexpr double kSingleThreadFlops = 5e7;

// kind, N, H, W, C, O, KH, KW, OH, OW, sh, sw, pt, pb, pl, pr, single-threaded
using Key = std::array<int64_t, 17>;

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

ffi::Error Run(Kind kind, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
               ffi::ResultBuffer<ffi::F32> out, int64_t sh, int64_t sw, int64_t pt, int64_t pb,
               int64_t pl, int64_t pr) {
  // fwd: a = x, b = w, out = y;  bwd-data: a = dy, b = w, out = dx;  bwd-w: a = x, b = dy, out = dw.
  Key k;
  if (kind == kForward) {
    auto x = a.dimensions(), w = b.dimensions(), y = out->dimensions();
    k = {kind, x[0], x[1], x[2], x[3], w[3], w[0], w[1], y[1], y[2], sh, sw, pt, pb, pl, pr, 0};
  } else if (kind == kBackwardData) {
    auto dy = a.dimensions(), w = b.dimensions(), dx = out->dimensions();
    k = {kind, dx[0], dx[1], dx[2], dx[3], w[3], w[0], w[1], dy[1], dy[2], sh, sw, pt, pb, pl, pr, 0};
  } else {
    auto x = a.dimensions(), dy = b.dimensions(), dw = out->dimensions();
    k = {kind, x[0], x[1], x[2], x[3], dw[3], dw[0], dw[1], dy[1], dy[2], sh, sw, pt, pb, pl, pr, 0};
  }
  // Small convolutions run on the calling thread alone: XLA runs other thunks beside them,
  // and an OpenMP team would wait for a core that is busy.
  const double flops = 2.0 * k[1] * k[8] * k[9] * k[4] * k[5] * k[6] * k[7];
  const bool single = flops < kSingleThreadFlops;
  const int threads = omp_get_max_threads();
  if (single) omp_set_num_threads(1);
  struct Restore {
    bool on; int n;
    ~Restore() { if (on) omp_set_num_threads(n); }
  } restore{single, threads};
  k[16] = single;  // a plan is made for the thread count it runs with
  try {
    const Plan& plan = GetPlan(k);
    thread_local Scratch scratch;
    thread_local dnnl::stream stream(Engine());
    dnnl::engine& eng = Engine();
    memory pad(plan.scratchpad, eng, Scratch::Get(scratch.pad, plan.scratchpad.get_size()));
    if (kind == kBackwardWeights) {
      memory x(plan.src, eng, a.typed_data());
      memory dy(plan.dst, eng, b.typed_data());
      memory user_dw(plan.user_weights, eng, out->typed_data());
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
      memory user_w(plan.user_weights, eng, b.typed_data());
      memory w = user_w;
      if (plan.needs_reorder) {
        w = memory(plan.conv_weights, eng,
                   Scratch::Get(scratch.weights, plan.conv_weights.get_size()));
        plan.weights_reorder.execute(stream, {{DNNL_ARG_FROM, user_w}, {DNNL_ARG_TO, w}});
      }
      if (kind == kForward) {
        memory x(plan.src, eng, a.typed_data());
        memory y(plan.dst, eng, out->typed_data());
        plan.conv.execute(stream, {{DNNL_ARG_SRC, x}, {DNNL_ARG_WEIGHTS, w},
                                   {DNNL_ARG_DST, y}, {DNNL_ARG_SCRATCHPAD, pad}});
      } else {
        memory dy(plan.dst, eng, a.typed_data());
        memory dx(plan.src, eng, out->typed_data());
        plan.conv.execute(stream, {{DNNL_ARG_DIFF_DST, dy}, {DNNL_ARG_WEIGHTS, w},
                                   {DNNL_ARG_DIFF_SRC, dx}, {DNNL_ARG_SCRATCHPAD, pad}});
      }
    }
    stream.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("oneDNN convolution: ") + e.what());
  }
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                   ffi::ResultBuffer<ffi::F32> y, int64_t sh, int64_t sw, int64_t pt,
                   int64_t pb, int64_t pl, int64_t pr) {
  return Run(kForward, x, w, y, sh, sw, pt, pb, pl, pr);
}
ffi::Error BackwardData(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> w,
                        ffi::ResultBuffer<ffi::F32> dx, int64_t sh, int64_t sw, int64_t pt,
                        int64_t pb, int64_t pl, int64_t pr) {
  return Run(kBackwardData, dy, w, dx, sh, sw, pt, pb, pl, pr);
}
ffi::Error BackwardWeights(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                           ffi::ResultBuffer<ffi::F32> dw, int64_t sh, int64_t sw, int64_t pt,
                           int64_t pb, int64_t pl, int64_t pr) {
  return Run(kBackwardWeights, x, dy, dw, sh, sw, pt, pb, pl, pr);
}

}  // namespace

#define MSSAR_CONV_BINDING                                                            \
  ffi::Ffi::Bind()                                                                    \
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
