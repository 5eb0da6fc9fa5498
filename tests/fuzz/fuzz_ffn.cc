// Coverage-guided fuzz target of org.dsmoe::GatedBlockSparseFFN's CPU kernel: attribute
// parsing, shape checks and compute, driven through the op's real OrtCustomOp function
// table (CreateKernelV2 / KernelComputeV2 / KernelDestroy) on a fake ONNX Runtime C API
// (fake_ort.h), so that every error must come back as an OrtStatus.
//
// Each input is decoded into one of two cases:
//   shapes:  arbitrary (huge, zero, mismatched) int64 shapes straight into CheckShapes,
//            which must accept them only when every size product fits int64;
//   kernel:  small tensors (sometimes with mismatched shapes, bad attributes, NaN/inf,
//            an unknown DSMOE_CPU_ISA, down_weight in either layout with NaN in the
//            column tiles' padding) through kernel creation and Compute, twice, with
//            ParallelFor items in a different order: the results must be bitwise equal,
//            fully written, and (finite inputs) match a float64 reference.
// Any violation aborts (a crash for the fuzzer); ASan/UBSan report memory errors and UB.
//
// Built by tests/fuzz/CMakeLists.txt: with clang, a libFuzzer target; otherwise (or with
// -DDSMOE_FUZZ_ENGINE=standalone) a driver that replays files or runs random inputs.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "common/ffn_op.h"
#include "cpu/ffn_cpu.h"
#include "fake_ort.h"

namespace {

using dsmoe::Shape;

[[noreturn]] void Fail(const std::string& what) {
  std::fprintf(stderr, "fuzz_ffn: %s\n", what.c_str());
  std::fflush(stderr);
  std::abort();
}
#define CHECK(cond, what) \
  do {                    \
    if (!(cond)) Fail(std::string("check failed: " #cond ": ") + (what)); \
  } while (0)

// Bytes of the fuzz input, then a PRNG seeded from them once they run out.
class Reader {
 public:
  Reader(const uint8_t* data, size_t size) : p_(data), n_(size) {
    for (size_t i = 0; i < size; ++i) state_ = (state_ ^ data[i]) * 0x100000001b3ULL;
  }
  uint8_t Byte() {
    if (n_ > 0) {
      --n_;
      return *p_++;
    }
    state_ ^= state_ << 13;
    state_ ^= state_ >> 7;
    state_ ^= state_ << 17;
    return static_cast<uint8_t>(state_ >> 24);
  }
  uint64_t U64() {
    uint64_t v = 0;
    for (int i = 0; i < 8; ++i) v = v << 8 | Byte();
    return v;
  }
  int64_t Range(int64_t lo, int64_t hi) {  // [lo, hi]
    const uint64_t span = static_cast<uint64_t>(hi - lo) + 1;
    const uint64_t v = span <= 256 ? Byte() : (static_cast<uint64_t>(Byte()) << 8 | Byte());
    return lo + static_cast<int64_t>(v % span);
  }
  bool Chance(int percent) { return Byte() % 100 < percent; }

 private:
  const uint8_t* p_;
  size_t n_;
  uint64_t state_ = 0xcbf29ce484222325ULL;
};

constexpr const char* kPrefix = "GatedBlockSparseFFN: ";

// What the inputs reached (printed at exit when DSMOE_FUZZ_STATS is set).
struct Stats {
  long shapes_ok = 0, shapes_refused = 0, create_refused = 0, compute_refused = 0, computed = 0, decode = 0,
       prefill = 0, empty = 0, checked_against_reference = 0, non_finite = 0;
  ~Stats() {
    if (std::getenv("DSMOE_FUZZ_STATS")) {
      std::fprintf(stderr,
                   "fuzz_ffn stats: shapes accepted %ld refused %ld | kernel creation refused %ld | compute "
                   "refused %ld, ran %ld (empty %ld, decode %ld, prefill %ld; non-finite inputs %ld; checked "
                   "against float64 %ld)\n",
                   shapes_ok, shapes_refused, create_refused, compute_refused, computed, empty, decode, prefill,
                   non_finite, checked_against_reference);
    }
  }
} stats;

void CheckErrorStatus(OrtStatus* status, const char* where) {
  const fake_ort::Status* s = fake_ort::FromOrt(status);
  CHECK(s->code == ORT_INVALID_ARGUMENT, std::string(where) + ": code " + std::to_string(s->code) + ": " + s->message);
  CHECK(s->message.rfind(kPrefix, 0) == 0, std::string(where) + ": message without the op's name: " + s->message);
  fake_ort::Api().ReleaseStatus(status);
}

bool MulFits(int64_t a, int64_t b, int64_t& out) { return !__builtin_mul_overflow(a, b, &out); }

// ------------------------------------------------------------------ shapes case

int64_t HugeDim(Reader& r) {
  switch (r.Byte() % 10) {
    case 0: return 0;
    case 1: return 1;
    case 2: return r.Range(2, 9);
    case 3: return int64_t{1} << r.Range(20, 62);
    case 4: return std::numeric_limits<int64_t>::max();
    case 5: return std::numeric_limits<int32_t>::max();
    case 6: return (int64_t{1} << 32) + r.Range(-2, 2);
    case 7: return static_cast<int64_t>(r.U64() >> 1);  // any non-negative int64
    default: return r.Range(1, 1000);
  }
}

void ShapesCase(Reader& r) {
  dsmoe::FfnAttributes attrs;
  int64_t n = HugeDim(r), B = HugeDim(r), d = HugeDim(r);
  attrs.num_experts = r.Chance(90) ? n : HugeDim(r);
  attrs.down_tile = r.Chance(50) ? 0 : dsmoe::kDownTileWidth;
  const auto down_shape = [&](int64_t n_, int64_t B_, int64_t d_) {
    return attrs.down_tile == 0 ? Shape{n_, B_, d_} : Shape{n_, d_ / 64 + (d_ % 64 != 0), B_, 64};  // no d + 63: d may be near 2^63
  };
  Shape gate{n, B, d}, up = gate, down = down_shape(n, B, d), router{n, d}, bias{n};
  Shape x;
  const int rank = static_cast<int>(r.Range(0, 5));
  for (int i = 0; i + 1 < rank; ++i) x.push_back(HugeDim(r));
  if (rank > 0) x.push_back(d);
  // Now and then, one mismatch.
  Shape* shapes[] = {&x, &router, &gate, &up, &down, &bias};
  if (r.Chance(30)) {
    Shape& s = *shapes[r.Byte() % 6];
    if (r.Chance(30) && !s.empty()) s.pop_back();
    else if (r.Chance(20)) s.push_back(HugeDim(r));
    else if (!s.empty()) s[r.Byte() % s.size()] = HugeDim(r);
  }
  const bool with_bias = r.Chance(50);
  dsmoe::FfnDims dims;
  try {
    dims = dsmoe::CheckShapes(attrs, x, router, gate, up, down, with_bias ? &bias : nullptr);
  } catch (const dsmoe::InvalidArgument& e) {
    // The shared checks throw InvalidArgument; the op adapter prefixes the op's name (CheckStatus
    // checks that on the op-table path). Here: a message, and no other exception type.
    CHECK(*e.what() != '\0', "empty InvalidArgument");
    ++stats.shapes_refused;
    return;
  }
  ++stats.shapes_ok;
  // Accepted: the spec's rules hold and every size product the kernels form fits int64.
  CHECK(!x.empty() && x.back() == dims.hidden, dsmoe::ShapeToString(x));
  CHECK(gate == Shape({dims.num_blocks, dims.block_size, dims.hidden}) && up == gate &&
            down == down_shape(dims.num_blocks, dims.block_size, dims.hidden) && dims.down_tile == attrs.down_tile,
        dsmoe::ShapeToString(gate) + " " + dsmoe::ShapeToString(down));
  CHECK(router == Shape({dims.num_blocks, dims.hidden}), dsmoe::ShapeToString(router));
  CHECK(dims.num_blocks == attrs.num_experts && dims.num_blocks >= 1 && dims.block_size >= 1 && dims.hidden >= 1,
        "n, B, d");
  CHECK(!with_bias || bias == Shape({dims.num_blocks}), dsmoe::ShapeToString(bias));
  int64_t tokens = 1, p;
  for (size_t i = 0; i + 1 < x.size(); ++i) CHECK(MulFits(tokens, x[i], tokens), "N overflows");
  CHECK(tokens == dims.num_tokens, "N");
  CHECK(MulFits(tokens, dims.hidden, p), "N * d");
  CHECK(MulFits(tokens, dims.num_blocks, p) && MulFits(p, dims.block_size, p), "N * n * B");
  CHECK(MulFits(dims.num_blocks, dims.block_size, p) && MulFits(p, dims.hidden, p), "n * B * d");
  CHECK(MulFits(dims.num_blocks, dims.block_size, p) && MulFits(p, dims.hidden / 64 + (dims.hidden % 64 != 0), p) &&
            MulFits(p, 64, p), "n * B * ceil(d / 64) * 64");
  CHECK(dims.y_shape == x, "Y shape");
  CHECK(dims.active_shape.size() == x.size() && dims.active_shape.back() == dims.num_blocks, "active shape");
}

// ------------------------------------------------------------------ kernel case

float Value(Reader& r, bool specials, bool& finite) {
  const uint8_t b = r.Byte();
  if (specials && b >= 250) {
    finite = false;
    switch (b) {
      case 250: return std::numeric_limits<float>::quiet_NaN();  // 0x7fc00000: never the poison pattern
      case 251: return std::numeric_limits<float>::infinity();
      case 252: return -std::numeric_limits<float>::infinity();
      case 253: return 3e38f;
      case 254: return -3e38f;
      default: return std::numeric_limits<float>::denorm_min();
    }
  }
  return static_cast<float>(static_cast<int8_t>(b)) / 32.0f;  // [-4, 4)
}

struct Inputs {
  fake_ort::Tensor x, router, gate, up, down, bias;
  bool finite = true;
};

void Fill(Reader& r, fake_ort::Tensor& t, bool specials, bool& finite, float scale) {
  t.Allocate();
  float* v = reinterpret_cast<float*>(t.data.get());
  for (int64_t i = 0; i < t.elements(); ++i) v[i] = Value(r, specials, finite) * scale;
}

const char* kIsas[] = {nullptr, "baseline", "avx2", "avx512", "", "sse9"};

// A float64 reference of Y given the kernel's `active` (routing decisions at the threshold may
// legitimately differ in float32), checking `active` itself where the score is clearly off tau;
// tolerance from the sum of the absolute values of every term.
void CheckReference(const dsmoe::FfnAttributes& a, const Inputs& in, int64_t N, int64_t n, int64_t B, int64_t d,
                    const float* y, const uint8_t* active) {
  dsmoe::FfnDims dims;
  dims.num_blocks = n, dims.block_size = B, dims.hidden = d, dims.down_tile = a.down_tile;
  const float* x = reinterpret_cast<const float*>(in.x.data.get());
  const float* rw = reinterpret_cast<const float*>(in.router.data.get());
  const float* bias = in.bias.data ? reinterpret_cast<const float*>(in.bias.data.get()) : nullptr;
  const float* gw = reinterpret_cast<const float*>(in.gate.data.get());
  const float* uw = reinterpret_cast<const float*>(in.up.data.get());
  const float* dw = reinterpret_cast<const float*>(in.down.data.get());
  std::vector<double> yref(d), bound(d), s(n);
  for (int64_t t = 0; t < N; ++t) {
    const float* xt = x + t * d;
    int64_t k = 0;
    for (int64_t i = 0; i < n; ++i) {
      double logit = bias ? bias[i] : 0.0, labs = bias ? std::fabs(bias[i]) : 0.0;
      for (int64_t c = 0; c < d; ++c) {
        logit += static_cast<double>(rw[i * d + c]) * xt[c];
        labs += std::fabs(static_cast<double>(rw[i * d + c]) * xt[c]);
      }
      s[i] = 1.0 / (1.0 + std::exp(-logit));
      // The spec's score is float32 (it saturates to exactly 0 and 1); the kernel's float32
      // logit is off by at most ~d * eps * sum |terms|: decide only where that cannot matter.
      const double err = 1e-6 + 4.0 * static_cast<double>(d + 1) * 6e-8 * labs;
      auto score32 = [](double l) { return 1.0f / (1.0f + std::exp(-static_cast<float>(l))); };
      const bool lo = score32(logit - err) > a.threshold, hi = score32(logit + err) > a.threshold;
      if (lo == hi) {
        CHECK(static_cast<bool>(active[t * n + i]) == lo,
              "active[" + std::to_string(t) + ", " + std::to_string(i) + "] against the float32 score of the "
              "float64 logit " + std::to_string(logit));
      }
      k += active[t * n + i];
    }
    const double c = a.rescale && k > 0 ? static_cast<double>(n) / static_cast<double>(k) : 1.0;
    std::fill(yref.begin(), yref.end(), 0.0);
    std::fill(bound.begin(), bound.end(), 0.0);
    for (int64_t i = 0; i < n; ++i) {
      if (!active[t * n + i]) continue;
      const double coef = c * (a.weighting == dsmoe::Weighting::kScore ? s[i] : 1.0);
      for (int64_t j = 0; j < B; ++j) {
        const float* gr = gw + (i * B + j) * d;
        const float* ur = uw + (i * B + j) * d;
        double g = 0, u = 0, gabs = 0, uabs = 0;
        for (int64_t cc = 0; cc < d; ++cc) {
          g += static_cast<double>(gr[cc]) * xt[cc];
          u += static_cast<double>(ur[cc]) * xt[cc];
          gabs += std::fabs(static_cast<double>(gr[cc]) * xt[cc]);
          uabs += std::fabs(static_cast<double>(ur[cc]) * xt[cc]);
        }
        double act;
        switch (a.activation) {
          case dsmoe::Activation::kSilu: act = g / (1.0 + std::exp(-g)); break;
          case dsmoe::Activation::kGelu: act = 0.5 * g * (1.0 + std::erf(g / std::sqrt(2.0))); break;
          default: act = 0.5 * g * (1.0 + std::tanh(0.7978845608028654 * (g + 0.044715 * g * g * g))); break;
        }
        const double h = coef * act * u;
        const double habs = coef * (std::fabs(g) + gabs + 1.0) * (std::fabs(u) + uabs + 1.0);
        for (int64_t cc = 0; cc < d; ++cc) {
          const double v = dw[dsmoe::DownOffset(dims, i, j, cc)];
          yref[cc] += h * v;
          bound[cc] += habs * std::fabs(v);
        }
      }
    }
    for (int64_t cc = 0; cc < d; ++cc) {
      const double got = y[t * d + cc];
      if (k == 0) CHECK(got == 0.0, "k = 0 token not exactly 0");
      CHECK(std::fabs(got - yref[cc]) <= 1e-4 * bound[cc] + 1e-6,
            "Y[" + std::to_string(t) + ", " + std::to_string(cc) + "] = " + std::to_string(got) + ", float64 " +
                std::to_string(yref[cc]) + " (bound " + std::to_string(bound[cc]) + ")");
    }
  }
}

void KernelCase(Reader& r) {
  // Kernel variant.
  const char* isa = kIsas[r.Byte() % 6];
  if (isa) setenv("DSMOE_CPU_ISA", isa, 1);
  else unsetenv("DSMOE_CPU_ISA");

  // Sizes: small, with the kernel's tile edges reachable; now and then enough active pairs
  // for several prefill chunks (> 2048).
  const bool many = r.Chance(3);
  const int64_t n = many ? r.Range(8, 24) : r.Range(1, r.Chance(80) ? 9 : 70);
  const int64_t B = many ? r.Range(1, 4) : r.Range(1, r.Chance(80) ? 40 : 70);
  const int64_t d = many ? r.Range(1, 8) : r.Range(1, r.Chance(80) ? 40 : 140);
  Shape lead;
  const int rank = static_cast<int>(r.Range(0, 3));
  int64_t N = 1;
  for (int i = 0; i < rank; ++i) {
    int64_t dim = many && i == 0 ? r.Range(130, 300) : r.Range(0, r.Chance(70) ? 7 : 40);
    if (N * dim > 400) dim = 1;
    lead.push_back(dim);
    N *= dim;
  }

  // Attributes: usually valid.
  fake_ort::KernelInfo info;
  bool attrs_valid = true;
  auto bad = [&](int percent) {
    const bool b = r.Chance(percent);
    attrs_valid &= !b;
    return b;
  };
  if (!bad(3)) {
    info.attributes.emplace_back("num_experts", n);
  } else {
    switch (r.Byte() % 4) {
      case 0: break;  // absent
      case 1: info.attributes.emplace_back("num_experts", static_cast<int64_t>(r.U64())); attrs_valid = false; break;
      case 2: info.attributes.emplace_back("num_experts", static_cast<float>(n)); break;
      default: info.attributes.emplace_back("num_experts", int64_t{0}); break;
    }
  }
  float threshold = 0.5f;
  switch (r.Byte() % 8) {
    case 0: break;  // default 0.5
    case 1: threshold = 0.0f; info.attributes.emplace_back("threshold", threshold); break;
    case 2: threshold = 1.0f; info.attributes.emplace_back("threshold", threshold); break;
    default: threshold = static_cast<float>(r.Byte()) / 255.0f; info.attributes.emplace_back("threshold", threshold);
  }
  if (bad(3)) {
    const float bad_values[] = {-0.01f, 1.01f, std::numeric_limits<float>::quiet_NaN(),
                                std::numeric_limits<float>::infinity(), -1e30f};
    info.attributes.emplace_back("threshold", bad_values[r.Byte() % 5]);  // appended: first match wins
    std::rotate(info.attributes.rbegin(), info.attributes.rbegin() + 1, info.attributes.rend());
  }
  if (r.Chance(60)) info.attributes.emplace_back("rescale", static_cast<int64_t>(r.Byte() % 2));
  if (bad(2)) info.attributes.insert(info.attributes.begin(), {"rescale", static_cast<int64_t>(r.Byte()) - 128});
  const char* weightings[] = {"score", "binary"};
  const char* activations[] = {"silu", "gelu", "gelu_tanh"};
  if (r.Chance(60)) info.attributes.emplace_back("weighting", std::string(weightings[r.Byte() % 2]));
  if (r.Chance(70)) info.attributes.emplace_back("activation", std::string(activations[r.Byte() % 3]));
  if (bad(3)) {
    const char* name = r.Chance(50) ? "weighting" : "activation";
    std::string junk;
    for (int64_t i = r.Range(0, 12); i > 0; --i) junk.push_back(static_cast<char>(r.Byte()));
    if (junk == "score" || junk == "binary" || junk == "silu" || junk == "gelu" || junk == "gelu_tanh") junk += "x";
    if (r.Chance(20)) info.attributes.insert(info.attributes.begin(), {name, int64_t{1}});
    else info.attributes.insert(info.attributes.begin(), {name, junk});
  }

  int64_t down_tile = 0;  // the layout the tensors below use
  if (r.Chance(50)) {
    down_tile = dsmoe::kDownTileWidth;
    info.attributes.emplace_back("down_tile", down_tile);
  } else if (r.Chance(10)) {
    info.attributes.emplace_back("down_tile", int64_t{0});
  }
  if (r.Chance(2)) {  // a bad value first (the first of a name is the one ORT's lookup returns)
    if (r.Chance(50)) {
      const int64_t v = static_cast<int64_t>(r.Byte()) - 64;
      info.attributes.insert(info.attributes.begin(), {"down_tile", v});
      if (v == 0 || v == dsmoe::kDownTileWidth) down_tile = v;  // valid after all: the layout
      else attrs_valid = false;
    } else {
      info.attributes.insert(info.attributes.begin(), {"down_tile", 64.0f});
      attrs_valid = false;
    }
  }

  static const dsmoe::FfnOp<dsmoe::cpu::FfnCpuKernel> op;
  const OrtCustomOp& table = op;
  void* kernel = nullptr;
  if (OrtStatus* st = table.CreateKernelV2(&table, &fake_ort::Api(), fake_ort::AsOrt(&info), &kernel)) {
    const bool isa_ok = isa == nullptr || *isa == '\0' ||
                        (std::strcmp(isa, "sse9") != 0 &&
                         (std::strcmp(isa, "baseline") == 0 ||
                          (std::strcmp(isa, "avx2") == 0 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) ||
                          (std::strcmp(isa, "avx512") == 0 && __builtin_cpu_supports("avx512f") &&
                           __builtin_cpu_supports("fma"))));
    CHECK(!attrs_valid || !isa_ok, std::string("valid attributes refused: ") + fake_ort::FromOrt(st)->message);
    CHECK(kernel == nullptr, "kernel created along with an error");
    CheckErrorStatus(st, "CreateKernelV2");
    ++stats.create_refused;
    return;
  }
  CHECK(kernel != nullptr, "no kernel and no error");
  // num_experts != n passes creation (the weights are only seen at run time).
  const fake_ort::Attribute* ne = nullptr;
  for (auto& [k, v] : info.attributes) if (k == "num_experts") { ne = &v; break; }
  bool shapes_valid = ne && std::get<int64_t>(*ne) == n;

  // Tensors, now and then with one wrong shape.
  Inputs in;
  in.x.shape = lead;
  in.x.shape.push_back(d);
  in.router.shape = {n, d};
  in.gate.shape = {n, B, d};
  in.up.shape = in.gate.shape;
  const Shape down_shape = down_tile == 0 ? in.gate.shape : Shape{n, (d + 63) / 64, B, 64};
  in.down.shape = down_shape;
  const int bias_mode = r.Byte() % 4;  // 0: absent slot, 1: null optional input, 2-3: present
  in.bias.shape = {n};
  if (r.Chance(8)) {
    shapes_valid = false;
    fake_ort::Tensor* ts[] = {&in.x, &in.router, &in.gate, &in.up, &in.down, &in.bias};
    fake_ort::Tensor& t = *ts[r.Byte() % (bias_mode >= 2 ? 6 : 5)];
    const size_t which = r.Byte() % (t.shape.size() + 2);
    if (which == t.shape.size()) t.shape.push_back(r.Range(1, 3));
    else if (which == t.shape.size() + 1) { if (!t.shape.empty()) t.shape.pop_back(); }
    else t.shape[which] = std::max<int64_t>(0, t.shape[which] + r.Range(-2, 2));
    if (&t == &in.x && in.x.elements() > 4000) in.x.shape = {1, d};  // keep the data small
    // Some mutations keep the shape right (+0, a leading dim of X changed, ...).
    const bool rank_ok = in.x.shape.size() >= 1 && in.router.shape.size() == 2 && in.gate.shape.size() == 3 &&
                         in.bias.shape.size() == 1;
    if (rank_ok && in.x.shape.back() == d && in.router.shape == Shape({n, d}) && in.gate.shape == Shape({n, B, d}) &&
        in.up.shape == in.gate.shape && in.down.shape == down_shape && in.bias.shape == Shape({n})) {
      shapes_valid = ne && std::get<int64_t>(*ne) == n;
    }
  }
  const bool specials = r.Chance(25);
  const float scale = r.Chance(50) ? 1.0f : 0.25f;
  Fill(r, in.x, specials, in.finite, 1.0f);
  Fill(r, in.router, specials, in.finite, scale);
  Fill(r, in.gate, specials, in.finite, scale);
  Fill(r, in.up, specials, in.finite, scale);
  Fill(r, in.down, specials, in.finite, scale);
  if (down_tile != 0 && in.down.shape == down_shape && d % 64 != 0) {  // the spec: the tiles' padding is ignored
    float* v = reinterpret_cast<float*>(in.down.data.get());
    const int64_t last = (d + 63) / 64 - 1;
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < B; ++j)
        for (int64_t c = d - last * 64; c < 64; ++c) v[((i * (last + 1) + last) * B + j) * 64 + c] = std::nanf("");
  }
  if (bias_mode >= 2) Fill(r, in.bias, specials, in.finite, 1.0f);

  const size_t outputs = r.Chance(70) ? 2 : 1;
  const bool active_present = outputs == 2 && r.Chance(80);
  std::vector<std::vector<unsigned char>> results;
  const fake_ort::Order orders[] = {fake_ort::Order::kForward, fake_ort::Order::kReverse, fake_ort::Order::kOddsFirst};
  const fake_ort::Order second = orders[1 + r.Byte() % 2];
  for (fake_ort::Order order : {fake_ort::Order::kForward, second}) {
    fake_ort::KernelContext ctx;
    ctx.inputs = {&in.x, &in.router, &in.gate, &in.up, &in.down};
    if (bias_mode == 1) ctx.inputs.push_back(nullptr);
    if (bias_mode >= 2) ctx.inputs.push_back(&in.bias);
    ctx.output_present = {true};
    if (outputs == 2) ctx.output_present.push_back(active_present);
    ctx.order = order;
    OrtStatus* st = table.KernelComputeV2(kernel, fake_ort::AsOrt(&ctx));
    if (st != nullptr) {
      CHECK(!shapes_valid, std::string("valid shapes refused: ") + fake_ort::FromOrt(st)->message);
      CheckErrorStatus(st, "KernelComputeV2");
      ++stats.compute_refused;
      break;
    }
    CHECK(shapes_valid, "invalid shapes accepted");
    CHECK(!ctx.outputs.empty() && ctx.outputs[0], "Y never requested");
    const fake_ort::Tensor& y = *ctx.outputs[0];
    CHECK(y.shape == in.x.shape, "Y shape " + dsmoe::ShapeToString(y.shape));
    const uint32_t kPoison = 0xFFFFFFFFu;
    for (int64_t e = 0; e < y.elements(); ++e) {
      uint32_t bits;
      std::memcpy(&bits, y.data.get() + 4 * e, 4);
      CHECK(bits != kPoison, "Y element " + std::to_string(e) + " never written");
    }
    std::vector<unsigned char> result(y.data.get(), y.data.get() + y.bytes());
    const uint8_t* active = nullptr;
    if (active_present) {
      CHECK(ctx.outputs.size() == 2 && ctx.outputs[1], "active never requested");
      const fake_ort::Tensor& act = *ctx.outputs[1];
      Shape want(in.x.shape.begin(), in.x.shape.end() - 1);
      want.push_back(n);
      CHECK(act.shape == want, "active shape " + dsmoe::ShapeToString(act.shape));
      active = act.data.get();
      for (size_t e = 0; e < act.bytes(); ++e) CHECK(active[e] <= 1, "active element not written");
      result.insert(result.end(), active, active + act.bytes());
    }
    if (order == fake_ort::Order::kForward && in.finite && active != nullptr) {
      dsmoe::FfnAttributes parsed;
      parsed.threshold = threshold;
      parsed.down_tile = down_tile;
      for (auto& [k, v] : info.attributes) {  // the first of a name is the one ORT's lookup returns
        if (k == "rescale" && std::holds_alternative<int64_t>(v)) { parsed.rescale = std::get<int64_t>(v) == 1; break; }
      }
      for (auto& [k, v] : info.attributes) {
        if (k == "weighting") { parsed.weighting = std::get<std::string>(v) == "binary" ? dsmoe::Weighting::kBinary : dsmoe::Weighting::kScore; break; }
      }
      for (auto& [k, v] : info.attributes) {
        if (k == "activation") {
          const std::string& s = std::get<std::string>(v);
          parsed.activation = s == "gelu" ? dsmoe::Activation::kGelu
                              : s == "gelu_tanh" ? dsmoe::Activation::kGeluTanh : dsmoe::Activation::kSilu;
          break;
        }
      }
      const int64_t tokens = in.x.elements() / d;
      CheckReference(parsed, in, tokens, n, B, d, reinterpret_cast<const float*>(y.data.get()), active);
      ++stats.checked_against_reference;
    }
    if (order == fake_ort::Order::kForward) {
      const int64_t tokens = in.x.elements() / d;
      ++stats.computed;
      ++(tokens == 0 ? stats.empty : tokens <= 6 ? stats.decode : stats.prefill);
      stats.non_finite += !in.finite;
    }
    results.push_back(std::move(result));
  }
  if (results.size() == 2) CHECK(results[0] == results[1], "results depend on the ParallelFor order");
  table.KernelDestroy(kernel);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const bool init = [] {
    Ort::InitApi(&fake_ort::Api());
    return true;
  }();
  (void)init;
  Reader r(data, size);
  if (r.Byte() % 4 == 0) {
    ShapesCase(r);
  } else {
    KernelCase(r);
  }
  return 0;
}

#if !defined(DSMOE_LIBFUZZER)
// Standalone driver (no libFuzzer): `fuzz_ffn FILE...` replays inputs; `fuzz_ffn -runs=N
// [-seed=S] [-max_len=L]` runs N random inputs.
#include <fstream>
#include <iterator>
#include <random>

int main(int argc, char** argv) {
  long runs = -1, seed = 1, max_len = 512;
  std::vector<std::string> files;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a.rfind("-runs=", 0) == 0) runs = std::stol(a.substr(6));
    else if (a.rfind("-seed=", 0) == 0) seed = std::stol(a.substr(6));
    else if (a.rfind("-max_len=", 0) == 0) max_len = std::stol(a.substr(9));
    else if (a[0] != '-') files.push_back(a);
  }
  for (const std::string& f : files) {
    std::ifstream in(f, std::ios::binary);
    std::vector<uint8_t> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    LLVMFuzzerTestOneInput(bytes.data(), bytes.size());
  }
  if (runs < 0) runs = files.empty() ? 10000 : 0;
  std::mt19937_64 rng(static_cast<uint64_t>(seed));
  for (long i = 0; i < runs; ++i) {
    std::vector<uint8_t> bytes(rng() % static_cast<uint64_t>(max_len + 1));
    for (auto& b : bytes) b = static_cast<uint8_t>(rng());
    LLVMFuzzerTestOneInput(bytes.data(), bytes.size());
  }
  std::printf("fuzz_ffn: %zu files, %ld random inputs: no failure\n", files.size(), runs);
  return 0;
}
#endif
