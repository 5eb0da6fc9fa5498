// Coverage-guided fuzz target of the CPU kernels of org.dsmoe::GatedBlockSparseFFN and its
// quantized variants (Int4, Int8, F16): attribute parsing, shape checks and compute, driven
// through the op tables the library registers (RegisterOps / RegisterQuantOps on a fake ONNX
// Runtime C API, fake_ort.h: CreateKernelV2 / KernelComputeV2 / KernelDestroy), so that every
// error must come back as an OrtStatus.
//
// Each input is decoded into one of three cases:
//   shapes:  arbitrary (huge, zero, mismatched) int64 shapes straight into CheckShapes,
//            which must accept them only when every size product fits int64;
//   quant shapes: the same for CheckQuantShapes;
//   kernel:  one of the four ops with small tensors (sometimes with mismatched shapes, bad
//            attributes, NaN/inf, an unknown DSMOE_CPU_ISA; the float32 op's gate/up in rows
//            or slabs and down_weight in rows or tiles, with NaN in the padding the spec says
//            is ignored) through kernel creation and Compute, twice, with ParallelFor items
//            in a different order: the results must be bitwise equal, fully written, and
//            (finite inputs) match a float64 reference on the dequantized weights.
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
#include "common/ffn_quant_params.h"
#include "cpu/ffn_cpu.h"
#include "cpu/ffn_cpu_quant.h"
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

// What the inputs reached (printed at exit when DSMOE_FUZZ_STATS is set).
struct Stats {
  long shapes_ok = 0, shapes_refused = 0, create_refused = 0, compute_refused = 0, computed = 0, decode = 0,
       prefill = 0, empty = 0, checked_against_reference = 0, non_finite = 0, slabs = 0, by_format[4] = {};
  ~Stats() {
    if (std::getenv("DSMOE_FUZZ_STATS")) {
      std::fprintf(stderr,
                   "fuzz_ffn stats: shapes accepted %ld refused %ld | kernel creation refused %ld | compute "
                   "refused %ld, ran %ld (float32 %ld of which slabs %ld, int4 %ld, int8 %ld, f16 %ld; empty %ld, "
                   "decode %ld, prefill %ld; non-finite inputs %ld; checked against float64 %ld)\n",
                   shapes_ok, shapes_refused, create_refused, compute_refused, computed, by_format[0], slabs,
                   by_format[1], by_format[2], by_format[3], empty, decode, prefill, non_finite,
                   checked_against_reference);
    }
  }
} stats;

// An error of op `op`: ORT_INVALID_ARGUMENT, its message prefixed with the op's name.
void CheckErrorStatus(OrtStatus* status, const char* where, const char* op) {
  const fake_ort::Status* s = fake_ort::FromOrt(status);
  CHECK(s->code == ORT_INVALID_ARGUMENT, std::string(where) + ": code " + std::to_string(s->code) + ": " + s->message);
  CHECK(s->message.rfind(std::string(op) + ": ", 0) == 0,
        std::string(where) + ": message without the op's name " + op + ": " + s->message);
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

// X [..., d] of rank 0-4 (rank 0: an error), its leading dims from HugeDim.
Shape HugeX(Reader& r, int64_t d) {
  Shape x;
  const int rank = static_cast<int>(r.Range(0, 5));
  for (int i = 0; i + 1 < rank; ++i) x.push_back(HugeDim(r));
  if (rank > 0) x.push_back(d);
  return x;
}

// Now and then, one mismatch: a dim dropped, added or changed in one of `shapes`.
void MaybeMismatch(Reader& r, const std::vector<Shape*>& shapes) {
  if (!r.Chance(30)) return;
  Shape& s = *shapes[r.Byte() % shapes.size()];
  if (r.Chance(30) && !s.empty()) s.pop_back();
  else if (r.Chance(20)) s.push_back(HugeDim(r));
  else if (!s.empty()) s[r.Byte() % s.size()] = HugeDim(r);
}

void ShapesCase(Reader& r) {
  dsmoe::FfnAttributes attrs;
  int64_t n = HugeDim(r), B = HugeDim(r), d = HugeDim(r);
  attrs.num_experts = r.Chance(90) ? n : HugeDim(r);
  attrs.down_tile = r.Chance(50) ? 0 : dsmoe::kDownTileWidth;
  attrs.gate_up_tile = r.Chance(50) ? 0 : dsmoe::kGateUpSlabRows;
  const auto down_shape = [&](int64_t n_, int64_t B_, int64_t d_) {
    return attrs.down_tile == 0 ? Shape{n_, B_, d_} : Shape{n_, d_ / 64 + (d_ % 64 != 0), B_, 64};  // no d + 63: d may be near 2^63
  };
  const auto gate_shape = [&](int64_t n_, int64_t B_, int64_t d_) {
    return attrs.gate_up_tile == 0 ? Shape{n_, B_, d_} : Shape{n_, B_ / 32 + (B_ % 32 != 0), d_, 32};
  };
  Shape gate = gate_shape(n, B, d), up = gate, down = down_shape(n, B, d), router{n, d}, bias{n};
  Shape x = HugeX(r, d);
  MaybeMismatch(r, {&x, &router, &gate, &up, &down, &bias});
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
  CHECK(gate == gate_shape(dims.num_blocks, dims.block_size, dims.hidden) && up == gate &&
            down == down_shape(dims.num_blocks, dims.block_size, dims.hidden) && dims.down_tile == attrs.down_tile &&
            dims.gate_up_tile == attrs.gate_up_tile,
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
  CHECK(MulFits(dims.num_blocks, dims.block_size / 32 + (dims.block_size % 32 != 0), p) && MulFits(p, 32, p) &&
            MulFits(p, dims.hidden, p), "n * ceil(B / 32) * 32 * d");
  CHECK(dims.y_shape == x, "Y shape");
  CHECK(dims.active_shape.size() == x.size() && dims.active_shape.back() == dims.num_blocks, "active shape");
}

// The quantized ops' checks (CheckQuantShapes) on the same kind of shapes.
void QuantShapesCase(Reader& r) {
  const dsmoe::QuantKind kind = static_cast<dsmoe::QuantKind>(r.Byte() % 3);
  dsmoe::QuantAttributes attrs;
  int64_t n = HugeDim(r), B = HugeDim(r), d = HugeDim(r);
  if (kind == dsmoe::QuantKind::kInt4 && r.Chance(80)) d &= ~int64_t{31};
  attrs.base.num_experts = r.Chance(90) ? n : HugeDim(r);
  attrs.group_size = kind == dsmoe::QuantKind::kF16 ? 0 : int64_t{32} << r.Range(0, 4);
  const int64_t G = std::max<int64_t>(attrs.group_size, 1);
  const int64_t rb = kind == dsmoe::QuantKind::kInt4 ? d / 2 : d;  // float16 weights: [n, B, d] elements
  Shape w{n, B, rb}, gate = w, up = w, down = w, gs{n, B, d / G + (d % G != 0)}, us = gs,
      ds{n, B / G + (B % G != 0), d}, router{n, d}, bias{n}, x = HugeX(r, d);
  MaybeMismatch(r, {&x, &router, &gate, &gs, &up, &us, &down, &ds, &bias});
  const bool with_bias = r.Chance(50);
  dsmoe::QuantDims q;
  try {
    q = dsmoe::CheckQuantShapes(kind, attrs, x, router, gate, &gs, up, &us, down, &ds, with_bias ? &bias : nullptr);
  } catch (const dsmoe::InvalidArgument& e) {
    CHECK(*e.what() != '\0', "empty InvalidArgument");
    ++stats.shapes_refused;
    return;
  }
  ++stats.shapes_ok;
  const dsmoe::FfnDims& dims = q.base;
  const int64_t nn = dims.num_blocks, BB = dims.block_size, dd = dims.hidden;
  CHECK(nn == attrs.base.num_experts && nn >= 1 && BB >= 1 && dd >= 1, "n, B, d");
  CHECK(!x.empty() && x.back() == dd && router == Shape({nn, dd}), dsmoe::ShapeToString(x) + dsmoe::ShapeToString(router));
  CHECK(kind != dsmoe::QuantKind::kInt4 || dd % 32 == 0, "int4 with d % 32 != 0");
  const int64_t row_bytes = kind == dsmoe::QuantKind::kInt4 ? dd / 2 : kind == dsmoe::QuantKind::kInt8 ? dd : 2 * dd;
  CHECK(q.row_bytes == row_bytes, "row_bytes");
  const Shape want_w = kind == dsmoe::QuantKind::kF16 ? Shape{nn, BB, dd} : Shape{nn, BB, row_bytes};
  CHECK(gate == want_w && up == want_w && down == want_w, dsmoe::ShapeToString(gate) + dsmoe::ShapeToString(down));
  if (kind != dsmoe::QuantKind::kF16) {
    CHECK(q.row_groups == dd / G + (dd % G != 0) && q.block_groups == BB / G + (BB % G != 0), "groups");
    CHECK(gs == Shape({nn, BB, q.row_groups}) && us == gs && ds == Shape({nn, q.block_groups, dd}),
          dsmoe::ShapeToString(gs) + dsmoe::ShapeToString(ds));
  }
  CHECK(!with_bias || bias == Shape({nn}), dsmoe::ShapeToString(bias));
  int64_t tokens = 1, p;
  for (size_t i = 0; i + 1 < x.size(); ++i) CHECK(MulFits(tokens, x[i], tokens), "N overflows");
  CHECK(tokens == dims.num_tokens, "N");
  CHECK(MulFits(tokens, dd, p), "N * d");
  CHECK(MulFits(tokens, nn, p) && MulFits(p, BB, p), "N * n * B");
  CHECK(MulFits(nn, BB, p) && MulFits(p, dd, p), "n * B * d");
  CHECK(dims.y_shape == x, "Y shape");
}

// ------------------------------------------------------------------ kernel case

// The op variants, by their registered names; the weights' storage differs, the rest is shared.
enum class Format { kF32, kInt4, kInt8, kF16 };
constexpr const char* kOpNames[] = {"GatedBlockSparseFFN", "GatedBlockSparseFFNInt4", "GatedBlockSparseFFNInt8",
                                    "GatedBlockSparseFFNF16"};
bool Integer(Format f) { return f == Format::kInt4 || f == Format::kInt8; }

// The CPU op tables exactly as the library registers them (RegisterOps / RegisterQuantOps on
// the fake API's domain), so that the tables fuzzed are the ones ONNX Runtime gets.
const OrtCustomOp& OpTable(Format f) {
  static const std::vector<const OrtCustomOp*> ops = [] {
    static Ort::CustomOpDomain domain{dsmoe::kDomain};  // lives as long as the tables are used
    dsmoe::cpu::RegisterOps(domain);
    dsmoe::cpu::RegisterQuantOps(domain);
    return fake_ort::DomainOps(domain);
  }();
  const char* name = kOpNames[static_cast<int>(f)];
  for (const OrtCustomOp* op : ops) {
    if (std::strcmp(op->GetName(op), name) == 0 && std::strcmp(op->GetExecutionProviderType(op), "CPUExecutionProvider") == 0) {
      return *op;
    }
  }
  Fail(std::string("op not registered: ") + name);
}

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

// IEEE float16 bits of Value(): the finite values are multiples of 1/32 in [-4, 4) (exact in
// float16); the specials NaN, +-inf, +-65504 (largest), the smallest subnormal.
uint16_t HalfValue(Reader& r, bool specials, bool& finite) {
  const uint8_t b = r.Byte();
  if (specials && b >= 250) {
    finite = false;  // the largest values overflow float32 sums no more than 3e38 does: flagged alike
    const uint16_t s[] = {0x7e00, 0x7c00, 0xfc00, 0x7bff, 0xfbff, 0x0001};
    return s[b - 250];
  }
  const int v = static_cast<int8_t>(b);  // value v / 32
  if (v == 0) return 0;
  // |v| / 32 = m * 2^(e - 25) with m in [1024, 2048): float16's 1.f * 2^(e - 15), e the biased exponent.
  const unsigned sign = v < 0 ? 0x8000u : 0u;
  unsigned m = static_cast<unsigned>(v < 0 ? -v : v), e = 25 - 5;
  while (m < 0x400) m <<= 1, --e;
  return static_cast<uint16_t>(sign | (e << 10) | (m & 0x3ff));
}

double HalfToDouble(uint16_t h) {
  const int e = (h >> 10) & 0x1f, m = h & 0x3ff;
  const double sign = (h & 0x8000) ? -1.0 : 1.0;
  if (e == 0x1f) return m ? std::numeric_limits<double>::quiet_NaN() : sign * std::numeric_limits<double>::infinity();
  return sign * (e == 0 ? std::ldexp(m, -24) : std::ldexp(1024 + m, e - 25));
}

void Fill(Reader& r, fake_ort::Tensor& t, bool specials, bool& finite, float scale) {
  t.Allocate();
  if (t.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8) {  // quantized levels: any byte is valid
    for (size_t i = 0; i < t.bytes(); ++i) t.data[i] = r.Byte();
    return;
  }
  if (t.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16) {
    uint16_t* v = reinterpret_cast<uint16_t*>(t.data.get());
    for (int64_t i = 0; i < t.elements(); ++i) v[i] = HalfValue(r, specials, finite);
    return;
  }
  float* v = reinterpret_cast<float*>(t.data.get());
  for (int64_t i = 0; i < t.elements(); ++i) v[i] = Value(r, specials, finite) * scale;
}

const char* kIsas[] = {nullptr, "baseline", "avx2", "avx512", "", "sse9"};

// The node's tensors in input order (op-spec): float32 / F16 X, router, gate, up, down, bias;
// Int4 / Int8 X, router, gate, gate_scales, up, up_scales, down, down_scales, bias.
struct Inputs {
  std::vector<fake_ort::Tensor> t;
  bool finite = true;
  int64_t gate, up, down, gate_scales = -1, up_scales = -1, down_scales = -1, bias;  // indices into t
  explicit Inputs(Format f) : t(Integer(f) ? 9 : 6) {
    gate = 2;
    if (Integer(f)) gate_scales = 3, up = 4, up_scales = 5, down = 6, down_scales = 7, bias = 8;
    else up = 3, down = 4, bias = 5;
  }
  fake_ort::Tensor& x() { return t[0]; }
  const float* F(int64_t i) const { return reinterpret_cast<const float*>(t[i].data.get()); }
};

// What the tensors' layouts are, by the attributes the kernel was created with.
struct Layout {
  Format format;
  int64_t down_tile = 0, gate_up_tile = 0, group = 0;
};

// Every input's shape for n, B, d under `lay` (the spec's shapes).
std::vector<Shape> ExpectedShapes(const Layout& lay, const Shape& lead, int64_t n, int64_t B, int64_t d) {
  Shape x = lead;
  x.push_back(d);
  if (Integer(lay.format)) {
    const int64_t rb = lay.format == Format::kInt4 ? d / 2 : d, G = lay.group;
    const Shape w{n, B, rb}, s{n, B, d / G + (d % G != 0)};
    return {x, {n, d}, w, s, w, s, w, {n, B / G + (B % G != 0), d}, {n}};
  }
  const Shape gate = lay.gate_up_tile == 0 ? Shape{n, B, d} : Shape{n, dsmoe::GateUpSlabCount(B), d, dsmoe::kGateUpSlabRows};
  const Shape down = lay.down_tile == 0 ? Shape{n, B, d} : Shape{n, dsmoe::DownTileCount(d), B, dsmoe::kDownTileWidth};
  return {x, {n, d}, gate, gate, down, {n}};
}

// An oracle of the shape rules, written apart from CheckShapes: n and d from router_weight, B
// from down_weight when gate/up are in slabs (which round it up), else from gate_weight; then
// every shape must be the spec's for those sizes. True and the sizes when the node is valid.
bool ConsistentShapes(const Layout& lay, const Inputs& in, bool bias_present, int64_t num_experts, int64_t& n,
                      int64_t& B, int64_t& d) {
  const Shape& router = in.t[1].shape;
  const Shape& b_from = lay.format == Format::kF32 && lay.gate_up_tile != 0 ? in.t[in.down].shape : in.t[in.gate].shape;
  const size_t b_dim = lay.format == Format::kF32 && lay.gate_up_tile != 0 && lay.down_tile != 0 ? 2 : 1;
  if (router.size() != 2 || b_from.size() <= b_dim || in.t[0].shape.empty()) return false;
  n = router[0], d = router[1], B = b_from[b_dim];
  if (n < 1 || d < 1 || B < 1 || n != num_experts || (lay.format == Format::kInt4 && d % 32 != 0)) return false;
  const Shape lead(in.t[0].shape.begin(), in.t[0].shape.end() - 1);
  const std::vector<Shape> want = ExpectedShapes(lay, lead, n, B, d);
  for (size_t i = 0; i < want.size(); ++i) {
    if (static_cast<int64_t>(i) == in.bias && !bias_present) continue;
    if (in.t[i].shape != want[i]) return false;
  }
  return true;
}

// The layer in float64 as [n, B, d] matrices G_i, U_i, V_i (dequantized, untiled), and for
// the error bound the magnitudes the kernel's sums carry: |W|, or |scale| (q + z) for the
// integer formats, whose kernels apply the zero point through sums of X per group.
struct Dense {
  std::vector<double> g, u, v, gm, um, vm;
};

Dense Dequantize(const Layout& lay, const Inputs& in, int64_t n, int64_t B, int64_t d) {
  Dense w;
  const size_t size = static_cast<size_t>(n * B * d);
  for (auto* m : {&w.g, &w.u, &w.v, &w.gm, &w.um, &w.vm}) m->resize(size);
  dsmoe::FfnDims dims;
  dims.num_blocks = n, dims.block_size = B, dims.hidden = d, dims.down_tile = lay.down_tile;
  const int64_t z = lay.format == Format::kInt4 ? 8 : 128, G = lay.group, rb = lay.format == Format::kInt4 ? d / 2 : d;
  auto level = [&](const fake_ort::Tensor& t, int64_t row, int64_t c) -> int64_t {  // q of row `row`, column c
    const uint8_t* q = t.data.get() + row * rb;
    if (lay.format == Format::kInt8) return q[c];
    const uint8_t byte = q[(c / 32) * 16 + c % 16];  // op-spec "int4 packing"
    return c % 32 < 16 ? byte & 0xf : byte >> 4;
  };
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < B; ++j) {
      for (int64_t c = 0; c < d; ++c) {
        const size_t o = static_cast<size_t>((i * B + j) * d + c);
        for (int which = 0; which < 3; ++which) {
          double& val = which == 0 ? w.g[o] : which == 1 ? w.u[o] : w.v[o];
          double& mag = which == 0 ? w.gm[o] : which == 1 ? w.um[o] : w.vm[o];
          const fake_ort::Tensor& t = in.t[which == 0 ? in.gate : which == 1 ? in.up : in.down];
          if (Integer(lay.format)) {
            const float s = which < 2 ? in.F(which == 0 ? in.gate_scales : in.up_scales)[(i * B + j) * (d / G + (d % G != 0)) + c / G]
                                      : in.F(in.down_scales)[(i * (B / G + (B % G != 0)) + j / G) * d + c];
            const int64_t q = level(t, i * B + j, c);
            val = static_cast<double>(s) * static_cast<double>(q - z);
            mag = std::fabs(static_cast<double>(s)) * static_cast<double>(q + z);
          } else if (lay.format == Format::kF16) {
            val = HalfToDouble(reinterpret_cast<const uint16_t*>(t.data.get())[o]);
            mag = std::fabs(val);
          } else {
            const float* f = reinterpret_cast<const float*>(t.data.get());
            int64_t at = static_cast<int64_t>(o);
            if (which == 2) at = dsmoe::DownOffset(dims, i, j, c);
            else if (lay.gate_up_tile != 0) {
              at = ((i * dsmoe::GateUpSlabCount(B) + j / dsmoe::kGateUpSlabRows) * d + c) * dsmoe::kGateUpSlabRows +
                   j % dsmoe::kGateUpSlabRows;  // op-spec: gate_weight[i, s, k, r] = G_i[32 s + r, k]
            }
            val = f[at];
            mag = std::fabs(val);
          }
        }
      }
    }
  }
  return w;
}

// X rounded to int8 per group of G columns as op-spec's accuracy_level 4 writes it (float32):
// s = max |x| / 127, q = clip(round_half_even(x / s), -127, 127), 0 where s = 0, x_hat = q * s.
std::vector<float> RoundedToInt8(const float* x, int64_t N, int64_t d, int64_t G) {
  std::vector<float> out(static_cast<size_t>(N * d));
  for (int64_t t = 0; t < N; ++t) {
    for (int64_t c0 = 0; c0 < d; c0 += G) {
      const int64_t c1 = std::min(d, c0 + G);
      float amax = 0.0f;
      for (int64_t c = c0; c < c1; ++c) amax = std::max(amax, std::fabs(x[t * d + c]));
      const float s = amax / 127.0f;
      for (int64_t c = c0; c < c1; ++c) {
        const float q = s == 0.0f ? 0.0f : std::min(127.0f, std::max(-127.0f, std::nearbyint(x[t * d + c] / s)));
        out[static_cast<size_t>(t * d + c)] = q * s;
      }
    }
  }
  return out;
}

// A float64 reference of Y given the kernel's `active` (routing decisions at the threshold may
// legitimately differ in float32), checking `active` itself where the score is clearly off tau;
// tolerance from the sum of the magnitudes of every term.
// x: gate/up's input, the op's or at accuracy_level 4 RoundedToInt8's; route_x: the router's,
// always the op's input.
void CheckReference(const dsmoe::FfnAttributes& a, const Inputs& in, const float* x, const float* route_x,
                    const Dense& w, int64_t N, int64_t n, int64_t B, int64_t d, const float* y,
                    const uint8_t* active) {
  const float* rw = in.F(1);
  const float* bias = in.t[in.bias].data ? in.F(in.bias) : nullptr;
  std::vector<double> yref(d), bound(d), s(n);
  for (int64_t t = 0; t < N; ++t) {
    const float* xt = x + t * d;
    const float* rt = route_x + t * d;
    int64_t k = 0;
    for (int64_t i = 0; i < n; ++i) {
      double logit = bias ? bias[i] : 0.0, labs = bias ? std::fabs(bias[i]) : 0.0;
      for (int64_t c = 0; c < d; ++c) {
        logit += static_cast<double>(rw[i * d + c]) * rt[c];
        labs += std::fabs(static_cast<double>(rw[i * d + c]) * rt[c]);
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
        const size_t row = static_cast<size_t>((i * B + j) * d);
        double g = 0, u = 0, gabs = 0, uabs = 0;
        for (int64_t cc = 0; cc < d; ++cc) {
          g += w.g[row + cc] * xt[cc];
          u += w.u[row + cc] * xt[cc];
          gabs += w.gm[row + cc] * std::fabs(xt[cc]);
          uabs += w.um[row + cc] * std::fabs(xt[cc]);
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
          yref[cc] += h * w.v[row + cc];
          bound[cc] += habs * w.vm[row + cc];
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

// Whether DSMOE_CPU_ISA = `isa` names a set this CPU runs (kernels_select.cc's rule, written
// again: the AVX2 sets are built with F16C).
bool IsaRuns(const char* isa) {
  if (isa == nullptr || *isa == '\0' || std::strcmp(isa, "baseline") == 0) return true;
  if (std::strcmp(isa, "avx2") == 0) {
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  }
  if (std::strcmp(isa, "avx512") == 0) return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma");
  return false;  // unknown names
}

void KernelCase(Reader& r) {
  const Format format = static_cast<Format>(r.Byte() % 4);
  Layout lay{format};
  // Kernel variant.
  const char* isa = kIsas[r.Byte() % 6];
  if (isa) setenv("DSMOE_CPU_ISA", isa, 1);
  else unsetenv("DSMOE_CPU_ISA");

  // Sizes: small, with the kernel's tile edges reachable; now and then enough active pairs
  // for several prefill chunks (> 2048). int4 needs d % 32 == 0 (other d: an error).
  const bool many = r.Chance(3);
  int64_t n = many ? r.Range(8, 24) : r.Range(1, r.Chance(80) ? 9 : 70);
  int64_t B = many ? r.Range(1, 4) : r.Range(1, r.Chance(80) ? 40 : 70);
  int64_t d = many ? r.Range(1, 8) : r.Range(1, r.Chance(80) ? 40 : 140);
  if (format == Format::kInt4 && r.Chance(95)) d = 32 * (many ? 1 : r.Range(1, 4));
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

  // Layout attributes: the float32 op's tiled down and slab gate/up (the quantized ops take
  // neither: an error at creation); then the first of a name is the one ORT's lookup returns.
  const bool quant = format != Format::kF32;
  if (r.Chance(quant ? 3 : 50)) {
    lay.down_tile = dsmoe::kDownTileWidth;
    info.attributes.emplace_back("down_tile", lay.down_tile);
  } else if (r.Chance(10)) {
    info.attributes.emplace_back("down_tile", int64_t{0});
  }
  if (r.Chance(quant ? 3 : 50)) {
    lay.gate_up_tile = dsmoe::kGateUpSlabRows;
    info.attributes.emplace_back("gate_up_tile", lay.gate_up_tile);
  } else if (r.Chance(10)) {
    info.attributes.emplace_back("gate_up_tile", int64_t{0});
  }
  if (quant && (lay.down_tile != 0 || lay.gate_up_tile != 0)) attrs_valid = false;
  if (r.Chance(2)) {  // a bad value first
    const char* name = r.Chance(50) ? "down_tile" : "gate_up_tile";
    const int64_t ok = name[0] == 'd' ? dsmoe::kDownTileWidth : dsmoe::kGateUpSlabRows;
    int64_t& field = name[0] == 'd' ? lay.down_tile : lay.gate_up_tile;
    if (r.Chance(50)) {
      const int64_t v = static_cast<int64_t>(r.Byte()) - 64;
      info.attributes.insert(info.attributes.begin(), {name, v});
      if (v == 0 || v == ok) field = v;  // valid after all: the layout
      if ((v != 0 && v != ok) || (quant && v != 0)) attrs_valid = false;
    } else {
      info.attributes.insert(info.attributes.begin(), {name, static_cast<float>(ok)});
      attrs_valid = false;
    }
  }
  if (Integer(format)) {
    lay.group = int64_t{32} << r.Range(0, 3);
    if (!bad(3)) {
      info.attributes.emplace_back("group_size", lay.group);
    } else {
      switch (r.Byte() % 4) {
        case 0: break;  // absent
        case 1: info.attributes.emplace_back("group_size", static_cast<float>(lay.group)); break;
        case 2: info.attributes.emplace_back("group_size", int64_t{16}); break;
        default: info.attributes.emplace_back("group_size", lay.group * 3); break;  // not a power of two
      }
    }
  } else if (r.Chance(5)) {
    info.attributes.emplace_back("group_size", int64_t{7});  // not the float ops': ignored
  }
  if (Integer(format) && r.Chance(50)) {  // accuracy_level 4: X rounded to int8 (the int4 x int8 GEMV)
    if (!bad(3)) {
      info.attributes.emplace_back("accuracy_level", r.Chance(70) ? int64_t{4} : r.Range(0, 3));
    } else {
      switch (r.Byte() % 3) {
        case 0: info.attributes.emplace_back("accuracy_level", int64_t{5}); break;
        case 1: info.attributes.emplace_back("accuracy_level", int64_t{-1}); break;
        default: info.attributes.emplace_back("accuracy_level", 4.0f); break;  // not an int
      }
    }
  }

  const OrtCustomOp& table = OpTable(format);
  void* kernel = nullptr;
  if (OrtStatus* st = table.CreateKernelV2(&table, &fake_ort::Api(), fake_ort::AsOrt(&info), &kernel)) {
    CHECK(!attrs_valid || !IsaRuns(isa), std::string("valid attributes refused: ") + fake_ort::FromOrt(st)->message);
    CHECK(kernel == nullptr, "kernel created along with an error");
    CheckErrorStatus(st, "CreateKernelV2", kOpNames[static_cast<int>(format)]);
    ++stats.create_refused;
    return;
  }
  CHECK(kernel != nullptr, "no kernel and no error");
  // num_experts != n passes creation (the weights are only seen at run time).
  const fake_ort::Attribute* ne = nullptr;
  for (auto& [k, v] : info.attributes) if (k == "num_experts") { ne = &v; break; }
  const int64_t num_experts = ne ? std::get<int64_t>(*ne) : -1;

  // Tensors, now and then with one wrong shape.
  Inputs in(format);
  const std::vector<Shape> want = ExpectedShapes(lay, lead, n, B, d);
  for (size_t i = 0; i < want.size(); ++i) {
    in.t[i].shape = want[i];
    if (static_cast<int64_t>(i) == in.gate || static_cast<int64_t>(i) == in.up || static_cast<int64_t>(i) == in.down) {
      in.t[i].type = Integer(format) ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8
                     : format == Format::kF16 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    }
  }
  const int bias_mode = r.Byte() % 4;  // 0: absent slot, 1: null optional input, 2-3: present
  const bool bias_present = bias_mode >= 2;
  if (r.Chance(8)) {
    fake_ort::Tensor& t = in.t[r.Byte() % (in.t.size() - (bias_present ? 0 : 1))];
    const size_t which = r.Byte() % (t.shape.size() + 2);
    if (which == t.shape.size()) t.shape.push_back(r.Range(1, 3));
    else if (which == t.shape.size() + 1) { if (!t.shape.empty()) t.shape.pop_back(); }
    else t.shape[which] = std::max<int64_t>(0, t.shape[which] + r.Range(-2, 2));
    if (&t == &in.x() && in.x().elements() > 4000) in.x().shape = {1, d};  // keep the data small
  }
  // Some mutations keep the node valid (+0, a leading dim of X, B within the last slab); the
  // oracle gives the sizes the kernel must then use.
  const bool shapes_valid = ConsistentShapes(lay, in, bias_present, num_experts, n, B, d);
  const bool specials = r.Chance(25);
  const float scale = r.Chance(50) ? 1.0f : 0.25f;
  for (size_t i = 0; i < in.t.size(); ++i) {
    if (static_cast<int64_t>(i) == in.bias && !bias_present) continue;
    const bool is_scales = static_cast<int64_t>(i) == in.gate_scales || static_cast<int64_t>(i) == in.up_scales ||
                           static_cast<int64_t>(i) == in.down_scales;
    Fill(r, in.t[i], specials, in.finite, i == 0 || static_cast<int64_t>(i) == in.bias ? 1.0f : is_scales ? scale / 16 : scale);
  }
  // The spec: the padding of the down tiles' last columns and of the last slab's rows is
  // ignored; NaN there must not reach Y.
  if (shapes_valid && lay.down_tile != 0 && d % 64 != 0) {
    float* v = reinterpret_cast<float*>(in.t[in.down].data.get());
    const int64_t last = dsmoe::DownTileCount(d) - 1;
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < B; ++j)
        for (int64_t c = d - last * 64; c < 64; ++c) v[((i * (last + 1) + last) * B + j) * 64 + c] = std::nanf("");
  }
  if (shapes_valid && lay.gate_up_tile != 0 && B % dsmoe::kGateUpSlabRows != 0) {
    const int64_t slabs = dsmoe::GateUpSlabCount(B), h = dsmoe::kGateUpSlabRows;
    for (const int64_t w : {in.gate, in.up}) {
      float* v = reinterpret_cast<float*>(in.t[w].data.get());
      for (int64_t i = 0; i < n; ++i)
        for (int64_t c = 0; c < d; ++c)
          for (int64_t row = B % h; row < h; ++row) v[((i * slabs + slabs - 1) * d + c) * h + row] = std::nanf("");
    }
  }

  const size_t outputs = r.Chance(70) ? 2 : 1;
  const bool active_present = outputs == 2 && r.Chance(80);
  std::vector<std::vector<unsigned char>> results;
  const fake_ort::Order orders[] = {fake_ort::Order::kForward, fake_ort::Order::kReverse, fake_ort::Order::kOddsFirst};
  const fake_ort::Order second = orders[1 + r.Byte() % 2];
  for (fake_ort::Order order : {fake_ort::Order::kForward, second}) {
    fake_ort::KernelContext ctx;
    for (size_t i = 0; i < in.t.size(); ++i) {
      if (static_cast<int64_t>(i) != in.bias) ctx.inputs.push_back(&in.t[i]);
    }
    if (bias_mode == 1) ctx.inputs.push_back(nullptr);
    if (bias_present) ctx.inputs.push_back(&in.t[in.bias]);
    ctx.output_present = {true};
    if (outputs == 2) ctx.output_present.push_back(active_present);
    ctx.order = order;
    OrtStatus* st = table.KernelComputeV2(kernel, fake_ort::AsOrt(&ctx));
    if (st != nullptr) {
      CHECK(!shapes_valid, std::string("valid shapes refused: ") + fake_ort::FromOrt(st)->message + " (n " +
                               std::to_string(n) + ", B " + std::to_string(B) + ", d " + std::to_string(d) +
                               ", group " + std::to_string(lay.group) + ")");
      CheckErrorStatus(st, "KernelComputeV2", kOpNames[static_cast<int>(format)]);
      ++stats.compute_refused;
      break;
    }
    CHECK(shapes_valid, "invalid shapes accepted");
    CHECK(!ctx.outputs.empty() && ctx.outputs[0], "Y never requested");
    const fake_ort::Tensor& y = *ctx.outputs[0];
    CHECK(y.shape == in.x().shape, "Y shape " + dsmoe::ShapeToString(y.shape));
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
      Shape want_active(in.x().shape.begin(), in.x().shape.end() - 1);
      want_active.push_back(n);
      CHECK(act.shape == want_active, "active shape " + dsmoe::ShapeToString(act.shape));
      active = act.data.get();
      for (size_t e = 0; e < act.bytes(); ++e) CHECK(active[e] <= 1, "active element not written");
      result.insert(result.end(), active, active + act.bytes());
    }
    const int64_t tokens = in.x().elements() / d;
    if (order == fake_ort::Order::kForward && in.finite && active != nullptr) {
      dsmoe::FfnAttributes parsed;
      parsed.threshold = threshold;
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
      bool int8_x = false;
      for (auto& [k, v] : info.attributes) {
        if (k == "accuracy_level") { int8_x = std::holds_alternative<int64_t>(v) && std::get<int64_t>(v) == 4; break; }
      }
      const std::vector<float> x_hat = int8_x ? RoundedToInt8(in.F(0), tokens, d, lay.group) : std::vector<float>{};
      CheckReference(parsed, in, int8_x ? x_hat.data() : in.F(0), in.F(0), Dequantize(lay, in, n, B, d), tokens, n,
                     B, d, reinterpret_cast<const float*>(y.data.get()), active);
      ++stats.checked_against_reference;
    }
    if (order == fake_ort::Order::kForward) {
      ++stats.computed;
      ++stats.by_format[static_cast<int>(format)];
      stats.slabs += lay.gate_up_tile != 0;
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
    // The harness's float16 values are the float32 ones (its reference decodes them independently).
    for (int b = 0; b < 250; ++b) {
      const uint8_t byte = static_cast<uint8_t>(b);
      bool finite = true;
      Reader half(&byte, 1), single(&byte, 1);
      const double h = HalfToDouble(HalfValue(half, true, finite)), f = Value(single, true, finite);
      CHECK(h == f && finite, "float16 value of byte " + std::to_string(b) + ": " + std::to_string(h) + " != " +
                                  std::to_string(f));
    }
    return true;
  }();
  (void)init;
  Reader r(data, size);
  switch (r.Byte() % 8) {
    case 0: ShapesCase(r); break;
    case 1: QuantShapesCase(r); break;
    default: KernelCase(r);
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
