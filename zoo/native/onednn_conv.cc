// oneDNN convolutions as XLA:CPU FFI custom calls (zoo/onednn.py loads and registers them).
//
// Handlers, float32, NHWC activations and HWIO kernels as XLA lays them out (row-major):
//   fcnzoo_onednn_conv_fwd          (x, w)  -> y
//   fcnzoo_onednn_conv_bwd_data     (dy, w) -> dx
//   fcnzoo_onednn_conv_bwd_weights  (x, dy) -> dw
//   fcnzoo_onednn_conv_fwd_post     (x, w, b[, r]) -> act(conv(x, w) + b [+ r])   (inference)
//   fcnzoo_onednn_max_pool          (x) -> y     (attributes window, strides, pad_lo, pad_hi)
// and fcnzoo_materialize (x) -> x, a fusion barrier (below).
// Attributes: strides, pad_lo, pad_hi (2 each), groups, layout (and activation, for _post). The
// third tensor's shape is the result's. The _post handler runs the bias, the residual sum and one
// activation in the convolution's own output pass (oneDNN's post-ops); its result is r's buffer
// (aliased by the caller), which oneDNN's sum post-op reads and overwrites. layout 0: activations
// stay NHWC (oneDNN's nxc kernels), the kernel goes to the primitive's own blocked format; layout 1:
// every tensor in the primitive's chosen format, reordered from and to NHWC/HWIO at the boundaries
// (measured no faster here; scripts/bench_onednn.py --layout 1). Primitives are built once per shape and kept (a mutex-guarded cache); scratchpads
// and reorder buffers are per thread. oneDNN here is its OpenMP build: each primitive runs on
// every core, so calls run one at a time (FCNZOO_ONEDNN_SERIAL=0 lets XLA overlap them).
#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <optional>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = dnnl::memory::format_tag;
using dims = dnnl::memory::dims;

namespace {

enum Kind : int64_t { kFwd = 0, kBwdData = 1, kBwdWeights = 2 };

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// Shapes of one convolution: x (N, H, W, C), w (KH, KW, I, O), y (N, OH, OW, O).
// post (forward only): bit 0 a bias, bit 1 a residual sum, bits 2-3 the activation (kActivations).
struct Shape {
  int64_t n, h, w, c, kh, kw, i, o, oh, ow, sh, sw, plh, plw, phh, phw, groups, layout, post;
};
static_assert(sizeof(Shape) == 19 * sizeof(int64_t), "fcnzoo_onednn_prepare copies Shape as 19 int64s");

constexpr int64_t kBias = 1, kSum = 2;
// post >> 2: none, relu, swish (x * sigmoid(x)), sigmoid.
constexpr std::array<dnnl::algorithm, 4> kActivations{
    dnnl::algorithm::undef, dnnl::algorithm::eltwise_relu, dnnl::algorithm::eltwise_swish,
    dnnl::algorithm::eltwise_logistic};

memory::desc Nhwc(int64_t n, int64_t c, int64_t h, int64_t w) {
  return memory::desc({n, c, h, w}, memory::data_type::f32, dims{h * w * c, 1, w * c, c});
}

// HWIO as oneDNN's (O, I, KH, KW), or (G, O/G, I, KH, KW) for grouped convolutions.
memory::desc Hwio(const Shape& s) {
  int64_t kw_stride = s.i * s.o, kh_stride = s.kw * s.i * s.o;
  if (s.groups == 1)
    return memory::desc({s.o, s.i, s.kh, s.kw}, memory::data_type::f32, dims{1, s.o, kh_stride, kw_stride});
  int64_t og = s.o / s.groups;
  return memory::desc({s.groups, og, s.i, s.kh, s.kw}, memory::data_type::f32,
                      dims{og, 1, s.o, kh_stride, kw_stride});
}

memory::desc Any(const memory::desc& plain) { return memory::desc(plain.get_dims(), memory::data_type::f32, tag::any); }

// One tensor of a call: how XLA holds it, how the primitive wants it, and the reorder between.
struct Slot {
  memory::desc user, prim;
  int arg = 0;
  bool reorder = false;
  dnnl::reorder to_prim_or_back;  // user -> prim for inputs, prim -> user for the output
};

struct Entry {
  dnnl::primitive primitive;
  memory::desc scratchpad;
  std::array<Slot, 3> slots;  // two inputs, then the output
  memory::desc bias;          // forward with post & kBias: (O), plain
  std::string impl;           // oneDNN's name for the implementation it chose
};

void SetSlot(Slot& slot, const memory::desc& user, const memory::desc& prim, int arg, bool is_output) {
  slot.user = user;
  slot.prim = prim;
  slot.arg = arg;
  slot.reorder = prim != user;
  if (slot.reorder) {
    auto& e = Engine();
    slot.to_prim_or_back = is_output ? dnnl::reorder(dnnl::reorder::primitive_desc(e, prim, e, user))
                                     : dnnl::reorder(dnnl::reorder::primitive_desc(e, user, e, prim));
  }
}

std::unique_ptr<Entry> Build(Kind kind, const Shape& s) {
  auto& e = Engine();
  memory::desc x = Nhwc(s.n, s.c, s.h, s.w), y = Nhwc(s.n, s.o, s.oh, s.ow), w = Hwio(s);
  memory::desc xa = s.layout == 1 ? Any(x) : x, ya = s.layout == 1 ? Any(y) : y, wa = Any(w);
  dims strides{s.sh, s.sw}, lo{s.plh, s.plw}, hi{s.phh, s.phw};
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  auto entry = std::make_unique<Entry>();
  auto algo = dnnl::algorithm::convolution_direct;
  if (kind == kFwd) {
    // Post-ops only in inference (zoo.fuse); without them, the forward pass of a training step.
    auto prop = s.post != 0 ? dnnl::prop_kind::forward_inference : dnnl::prop_kind::forward_training;
    if ((s.post & kSum) && s.layout != 0) throw std::invalid_argument("a residual sum needs layout 0");
    int64_t activation = s.post >> 2;
    if (activation >= static_cast<int64_t>(kActivations.size())) throw std::invalid_argument("unknown activation");
    dnnl::post_ops ops;
    if (s.post & kSum) ops.append_sum(1.f);
    // swish's alpha is the sigmoid's slope: x * sigmoid(1 * x).
    if (activation != 0) ops.append_eltwise(kActivations[activation], activation == 2 ? 1.f : 0.f, 0.f);
    attr.set_post_ops(ops);
    entry->bias = memory::desc({s.o}, memory::data_type::f32, tag::a);
    memory::desc ba = (s.post & kBias) ? entry->bias : memory::desc();  // an empty desc: no bias
    dnnl::convolution_forward::primitive_desc pd(e, prop, algo, xa, wa, ba, ya, strides, lo, hi, attr);
    SetSlot(entry->slots[0], x, pd.src_desc(), DNNL_ARG_SRC, false);
    SetSlot(entry->slots[1], w, pd.weights_desc(), DNNL_ARG_WEIGHTS, false);
    SetSlot(entry->slots[2], y, pd.dst_desc(), DNNL_ARG_DST, true);
    entry->scratchpad = pd.scratchpad_desc();
    entry->impl = pd.impl_info_str();
    entry->primitive = dnnl::convolution_forward(pd);
    return entry;
  }
  dnnl::convolution_forward::primitive_desc hint(e, dnnl::prop_kind::forward_training, algo, xa, wa, ya,
                                                 strides, lo, hi);
  if (kind == kBwdData) {
    dnnl::convolution_backward_data::primitive_desc pd(e, algo, xa, wa, ya, strides, lo, hi, hint, attr);
    SetSlot(entry->slots[0], y, pd.diff_dst_desc(), DNNL_ARG_DIFF_DST, false);
    SetSlot(entry->slots[1], w, pd.weights_desc(), DNNL_ARG_WEIGHTS, false);
    SetSlot(entry->slots[2], x, pd.diff_src_desc(), DNNL_ARG_DIFF_SRC, true);
    entry->scratchpad = pd.scratchpad_desc();
    entry->impl = pd.impl_info_str();
    entry->primitive = dnnl::convolution_backward_data(pd);
  } else {
    dnnl::convolution_backward_weights::primitive_desc pd(e, algo, xa, wa, ya, strides, lo, hi, hint, attr);
    SetSlot(entry->slots[0], x, pd.src_desc(), DNNL_ARG_SRC, false);
    SetSlot(entry->slots[1], y, pd.diff_dst_desc(), DNNL_ARG_DIFF_DST, false);
    SetSlot(entry->slots[2], w, pd.diff_weights_desc(), DNNL_ARG_DIFF_WEIGHTS, true);
    entry->scratchpad = pd.scratchpad_desc();
    entry->impl = pd.impl_info_str();
    entry->primitive = dnnl::convolution_backward_weights(pd);
  }
  return entry;
}

// The primitive entry of `key`, built by `build()` on first use and kept: one mutex-guarded cache
// per entry type (built under the lock: once per shape).
template <typename T, typename Key, typename Builder>
const T& Cached(const Key& key, Builder build) {
  static std::mutex mutex;
  static std::map<Key, std::unique_ptr<T>> cache;
  std::lock_guard<std::mutex> lock(mutex);
  auto found = cache.find(key);
  if (found == cache.end()) found = cache.emplace(key, build()).first;
  return *found->second;
}

const Entry& Lookup(Kind kind, const Shape& s) {
  std::array<int64_t, 20> key{kind, s.n, s.h, s.w, s.c, s.kh, s.kw, s.i, s.o, s.oh, s.ow, s.sh, s.sw, s.plh,
                              s.plw, s.phh, s.phw, s.groups, s.layout, s.post};
  return Cached<Entry>(key, [&] { return Build(kind, s); });
}

// A per-thread buffer that grows to the largest size asked of it (64-byte aligned), kept between
// calls (fresh memory costs page faults) unless it is large (an FCN's fc6 kernel is 400 MB).
struct Buffer {
  static constexpr size_t kKeep = size_t{64} << 20;
  void* data = nullptr;
  size_t size = 0;
  void* Get(size_t want) {
    if (want > size) {
      Release();
      size = (want + 4095) & ~size_t{4095};
      data = std::aligned_alloc(64, size);
      if (data == nullptr) throw std::bad_alloc();
    }
    return data;
  }
  void Release() {
    std::free(data);
    data = nullptr;
    size = 0;
  }
  void Trim() {
    if (size > kKeep) Release();
  }
  ~Buffer() { Release(); }
};

// bias: (O) for post & kBias. residual: what the sum post-op adds, already in out when the caller
// aliased it (else copied there first).
// XLA may run two custom calls at once on its own threads; each oneDNN primitive already uses
// every core (OpenMP), so one at a time: two would oversubscribe the cores.
std::unique_lock<std::mutex> OneAtATime() {
  static const bool serial = [] {
    const char* v = std::getenv("FCNZOO_ONEDNN_SERIAL");
    return v == nullptr || std::string(v) != "0";
  }();
  static std::mutex running;
  std::unique_lock<std::mutex> lock(running, std::defer_lock);
  if (serial) lock.lock();
  return lock;
}

ffi::Error Run(Kind kind, void* in0, void* in1, void* out, const Shape& s, void* bias = nullptr,
               const void* residual = nullptr) {
  const Entry* entry;
  try {
    entry = &Lookup(kind, s);
  } catch (const std::exception& err) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("oneDNN primitive: ") + err.what());
  }
  std::unique_lock<std::mutex> one_at_a_time = OneAtATime();
  thread_local std::array<Buffer, 4> buffers;
  thread_local dnnl::stream stream(Engine());
  void* data[3] = {in0, in1, out};
  std::unordered_map<int, memory> args;
  try {
    for (int k = 0; k < 3; ++k) {
      const Slot& slot = entry->slots[k];
      memory user(slot.user, Engine(), data[k]);
      if (!slot.reorder) {
        args.emplace(slot.arg, user);
        continue;
      }
      memory prim(slot.prim, Engine(), buffers[k].Get(slot.prim.get_size()));
      if (k < 2) slot.to_prim_or_back.execute(stream, user, prim);
      args.emplace(slot.arg, prim);
    }
    if (s.post & kBias) args.emplace(DNNL_ARG_BIAS, memory(entry->bias, Engine(), bias));
    if ((s.post & kSum) && residual != out)
      std::memcpy(out, residual, s.n * s.oh * s.ow * s.o * sizeof(float));
    if (entry->scratchpad.get_size() > 0)
      args.emplace(DNNL_ARG_SCRATCHPAD,
                   memory(entry->scratchpad, Engine(), buffers[3].Get(entry->scratchpad.get_size())));
    entry->primitive.execute(stream, args);
    const Slot& result = entry->slots[2];
    if (result.reorder) {
      memory user(result.user, Engine(), out);
      result.to_prim_or_back.execute(stream, args.at(result.arg), user);
    }
    stream.wait();
  } catch (const std::exception& err) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("oneDNN execute: ") + err.what());
  }
  for (Buffer& buffer : buffers) buffer.Trim();
  return ffi::Error::Success();
}

Shape MakeShape(ffi::Span<const int64_t> x, ffi::Span<const int64_t> w, ffi::Span<const int64_t> y,
                ffi::Span<const int64_t> strides, ffi::Span<const int64_t> lo, ffi::Span<const int64_t> hi,
                int64_t groups, int64_t layout, int64_t post = 0) {
  return Shape{x[0], x[1], x[2], x[3], w[0], w[1], w[2], w[3], y[1], y[2], strides[0], strides[1],
               lo[0], lo[1], hi[0], hi[1], groups, layout, post};
}

using F32 = ffi::Buffer<ffi::F32, 4>;
using F32Vector = ffi::Buffer<ffi::F32, 1>;
using Ints = ffi::Span<const int64_t>;

ffi::Error ConvFwd(F32 x, F32 w, ffi::ResultBuffer<ffi::F32, 4> y, Ints strides, Ints lo, Ints hi,
                   int64_t groups, int64_t layout) {
  Shape s = MakeShape(x.dimensions(), w.dimensions(), y->dimensions(), strides, lo, hi, groups, layout);
  return Run(kFwd, x.untyped_data(), w.untyped_data(), y->untyped_data(), s);
}

// post's kBias and kSum bits come from the operands: b always (zeros where the layer had none),
// r when given.
ffi::Error ConvFwdPost(F32 x, F32 w, F32Vector b, std::optional<F32> r,
                       ffi::ResultBuffer<ffi::F32, 4> y, Ints strides, Ints lo, Ints hi, int64_t groups,
                       int64_t layout, int64_t activation) {
  int64_t post = kBias | (r.has_value() ? kSum : 0) | (activation << 2);
  Shape s = MakeShape(x.dimensions(), w.dimensions(), y->dimensions(), strides, lo, hi, groups, layout, post);
  return Run(kFwd, x.untyped_data(), w.untyped_data(), y->untyped_data(), s, b.untyped_data(),
             r.has_value() ? r->untyped_data() : nullptr);
}

ffi::Error ConvBwdData(F32 dy, F32 w, ffi::ResultBuffer<ffi::F32, 4> dx, Ints strides, Ints lo, Ints hi,
                       int64_t groups, int64_t layout) {
  Shape s = MakeShape(dx->dimensions(), w.dimensions(), dy.dimensions(), strides, lo, hi, groups, layout);
  return Run(kBwdData, dy.untyped_data(), w.untyped_data(), dx->untyped_data(), s);
}

ffi::Error ConvBwdWeights(F32 x, F32 dy, ffi::ResultBuffer<ffi::F32, 4> dw, Ints strides, Ints lo, Ints hi,
                          int64_t groups, int64_t layout) {
  Shape s = MakeShape(x.dimensions(), dw->dimensions(), dy.dimensions(), strides, lo, hi, groups, layout);
  return Run(kBwdWeights, x.untyped_data(), dy.untyped_data(), dw->untyped_data(), s);
}

// Max pooling, NHWC in and out (forward only: zoo.cpu_conv's gradient needs just x and y).
// shape: n, h, w, c, oh, ow, kh, kw, sh, sw, plh, plw, phh, phw.
using PoolShape = std::array<int64_t, 14>;

struct PoolEntry {
  dnnl::pooling_forward primitive;
  std::string impl;
};

const PoolEntry& LookupPool(const PoolShape& s) {
  return Cached<PoolEntry>(s, [&] {
    auto& e = Engine();
    dnnl::pooling_forward::primitive_desc pd(e, dnnl::prop_kind::forward_inference, dnnl::algorithm::pooling_max,
                                             Nhwc(s[0], s[3], s[1], s[2]), Nhwc(s[0], s[3], s[4], s[5]),
                                             dims{s[8], s[9]}, dims{s[6], s[7]}, dims{0, 0}, dims{s[10], s[11]},
                                             dims{s[12], s[13]});
    auto entry = std::make_unique<PoolEntry>();
    entry->impl = pd.impl_info_str();
    entry->primitive = dnnl::pooling_forward(pd);
    return entry;
  });
}

ffi::Error MaxPool(F32 x, ffi::ResultBuffer<ffi::F32, 4> y, Ints window, Ints strides, Ints lo, Ints hi) {
  auto xd = x.dimensions(), yd = y->dimensions();
  PoolShape s{xd[0], xd[1], xd[2], xd[3], yd[1], yd[2], window[0], window[1], strides[0], strides[1],
              lo[0], lo[1], hi[0], hi[1]};
  try {
    const PoolEntry& entry = LookupPool(s);
    std::unique_lock<std::mutex> one_at_a_time = OneAtATime();
    thread_local dnnl::stream stream(Engine());
    auto& e = Engine();
    entry.primitive.execute(stream, {{DNNL_ARG_SRC, memory(Nhwc(s[0], s[3], s[1], s[2]), e, x.untyped_data())},
                                     {DNNL_ARG_DST, memory(Nhwc(s[0], s[3], s[4], s[5]), e, y->untyped_data())}});
    stream.wait();
  } catch (const std::exception& err) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("oneDNN max pooling: ") + err.what());
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(fcnzoo_onednn_max_pool, MaxPool,
                              ffi::Ffi::Bind()
                                  .Arg<F32>()
                                  .Ret<F32>()
                                  .Attr<Ints>("window")
                                  .Attr<Ints>("strides")
                                  .Attr<Ints>("pad_lo")
                                  .Attr<Ints>("pad_hi"));

// info into impl (impl_size bytes, NUL-terminated, cut to fit); returns status.
static int WriteInfo(const std::string& info, int status, char* impl, int64_t impl_size) {
  if (impl_size > 0) {
    size_t n = std::min<size_t>(info.size(), impl_size - 1);
    std::copy(info.begin(), info.begin() + n, impl);
    impl[n] = '\0';
  }
  return status;
}

// The implementation oneDNN picks for a max pooling of shape (PoolShape's 14 fields), built and
// cached ahead of its first run; as fcnzoo_onednn_prepare.
extern "C" int fcnzoo_onednn_prepare_pool(const int64_t* shape, char* impl, int64_t impl_size) {
  PoolShape s;
  std::copy(shape, shape + 14, s.begin());
  std::string info;
  int status = 0;
  try {
    info = LookupPool(s).impl;
  } catch (const std::exception& err) {
    info = err.what();
    status = 1;
  }
  return WriteInfo(info, status, impl, impl_size);
}

#define FCNZOO_CONV_BINDING                                                        \
  ffi::Ffi::Bind()                                                                          \
      .Arg<F32>()                                                                           \
      .Arg<F32>()                                                                           \
      .Ret<ffi::Buffer<ffi::F32, 4>>()                                                      \
      .Attr<Ints>("strides")                                                                \
      .Attr<Ints>("pad_lo")                                                                 \
      .Attr<Ints>("pad_hi")                                                                 \
      .Attr<int64_t>("groups")                                                              \
      .Attr<int64_t>("layout")

XLA_FFI_DEFINE_HANDLER_SYMBOL(fcnzoo_onednn_conv_fwd, ConvFwd, FCNZOO_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(fcnzoo_onednn_conv_fwd_post, ConvFwdPost,
                              ffi::Ffi::Bind()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32Vector>()
                                  .OptionalArg<F32>()
                                  .Ret<F32>()
                                  .Attr<Ints>("strides")
                                  .Attr<Ints>("pad_lo")
                                  .Attr<Ints>("pad_hi")
                                  .Attr<int64_t>("groups")
                                  .Attr<int64_t>("layout")
                                  .Attr<int64_t>("activation"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(fcnzoo_onednn_conv_bwd_data, ConvBwdData, FCNZOO_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(fcnzoo_onednn_conv_bwd_weights, ConvBwdWeights, FCNZOO_CONV_BINDING);

// The identity, its result aliased to its operand (zoo.onednn.materialize): XLA must write the
// operand to memory, so the elementwise work and pooling that produce it are not fused into its
// consumer (XLA:CPU fused a VGG's last pooling into its classifier's matrix products, 30x slower).
// Nothing to do when XLA gives both the same buffer; a copy where it does not.
ffi::Error Materialize(ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> y) {
  if (x.untyped_data() != y->untyped_data()) std::memcpy(y->untyped_data(), x.untyped_data(), x.size_bytes());
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(fcnzoo_materialize, Materialize,
                              ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>());

// Builds (and caches) the primitive for one convolution ahead of its first run, so that a shape
// oneDNN does not take is known at trace time. shape: the 19 fields of Shape, in order. Writes
// the implementation's name (e.g. "brg:avx2", "jit:avx2", "gemm:jit") into impl; returns 0 on
// success, 1 if oneDNN refuses the shape (its message in impl).
extern "C" int fcnzoo_onednn_prepare(int64_t kind, const int64_t* shape, char* impl, int64_t impl_size) {
  Shape s;
  std::copy(shape, shape + 19, &s.n);
  std::string info;
  int status = 0;
  try {
    info = Lookup(static_cast<Kind>(kind), s).impl;
  } catch (const std::exception& err) {
    info = err.what();
    status = 1;
  }
  return WriteInfo(info, status, impl, impl_size);
}

// The oneDNN version this library runs with, as major * 10000 + minor * 100 + patch.
extern "C" int fcnzoo_onednn_version() {
  const dnnl_version_t* v = dnnl_version();
  return v->major * 10000 + v->minor * 100 + v->patch;
}
