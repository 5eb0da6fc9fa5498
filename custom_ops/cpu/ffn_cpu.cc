// CPU kernel of org.dsmoe::GatedBlockSparseFFN: only active (token, block)
// pairs are computed (docs/op-spec.md).
//
// Cost per active pair (d = hidden, B = block size): 6*B*d FLOPs (gate, up,
// down: 2*B*d each); routing adds 2*n*d FLOPs per token. Weight bytes: 12*B*d
// per active block, read once per token in the decode regime and once per
// call in the prefill regime (unless one block alone overflows a chunk).
//
//   decode  (few tokens a block: UsesDecodePath): memory-bound. Tasks are (block, slab of
//           kDecodeRows rows): each streams its slab of gate, up and down
//           (3 * kDecodeRows * d contiguous floats) once for the block's tokens,
//           computes h for those rows and a partial output h . V_slab per token.
//           A second pass sums the partials per token in a fixed order.
//   prefill (more tokens): compute-bound, in one pass of the pool (cpu/prefill.h).
//           A counting sort of the active pairs by block, cut into chunks of
//           whole blocks (bounded scratch); per chunk: per (block, row tile) the fused gate/up
//           GEMM of all the block's tokens (gate/up in rows: X packed into the block's panels;
//           in k-major slabs, op-spec gate_up_tile: X's rows read in place), per output column
//           tile the down GEMMs added into Y. The weights are read in place
//           (V's [B, 64] column tiles too in the tiled layout, down_tile = 64;
//           the rows layout copies each tile first: about 3 % of a 256-token
//           call at d = 2048, 8 % at d = 4096, 512 tokens).
// Every output element is produced by one task in a fixed order, so results
// do not depend on the number of threads.
#include "cpu/ffn_cpu.h"

#include <algorithm>
#include <cstring>
#include <utility>
#include <vector>

#include "common/ffn_op.h"
#include "cpu/decode.h"
#include "cpu/hugepages.h"
#include "cpu/parallel.h"
#include "cpu/plan.h"
#include "cpu/prefill.h"

static_assert(sizeof(bool) == 1, "the active output (ONNX bool) is copied from a bool array");

namespace dsmoe::cpu {
namespace {

using Weights = FloatFfnWeights;

// dst[j * width + c] = src[j * ld + c]: the rows are a page apart (ld = d), which
// the hardware prefetchers do not follow, so the rows ahead are prefetched here.
void CopyTile(const float* src, int64_t ld, int64_t rows, int64_t width, float* dst) {
  constexpr int64_t kAhead = 8;
  for (int64_t j = 0; j < rows; ++j) {
    if (j + kAhead < rows) {
      for (int64_t c = 0; c < width; c += 16) __builtin_prefetch(src + (j + kAhead) * ld + c);
    }
    if (width == kPrefillColsPerTask) {
      std::memcpy(dst + j * width, src + j * ld, sizeof(float) * kPrefillColsPerTask);  // inlined: fixed size
    } else if (width == kPrefillColsPerTask / 2) {
      std::memcpy(dst + j * width, src + j * ld, sizeof(float) * (kPrefillColsPerTask / 2));
    } else {
      std::copy(src + j * ld, src + j * ld + width, dst + j * width);
    }
  }
}

// routed: the call's routing, or null to route in the prefill's pass (and write `active`).
void ComputePrefill(const Ort::KernelContext& ctx, const KernelSet& ks, const FfnAttributes& attrs,
                    const FfnDims& dims, const float* x, const Weights& w, const Routing* routed, bool* active,
                    float* y) {
  const int64_t d = dims.hidden, B = dims.block_size;
  auto gate_up_rows = [&](int64_t i, int64_t r0, int64_t) {  // rows of d, or slabs (r0 a multiple of 32)
    const int64_t offset = GateUpOffset(dims, i, r0);
    return std::pair{w.gate + offset, w.up + offset};
  };
  // V_i[:, c0:c0 + width]: in place in the tiled layout; in the rows layout copied
  // to a contiguous tile (read in place, every row would start a new page: stride d).
  static_assert(kPrefillColsPerTask == kDownTileWidth, "a column task reads one tile of the tiled layout");
  auto down_tile = [&](int64_t i, int64_t c0, int64_t width, float* tile) -> std::pair<const float*, int64_t> {
    if (dims.down_tile != 0) return {w.down + DownOffset(dims, i, 0, c0), dims.down_tile};
    CopyTile(w.down + i * B * d + c0, d, B, width, tile);
    return {tile, width};
  };
  // The same weights as they lie in memory, for the prefetch of the next task's (cpu/prefetch.h):
  // at rows shorter than a page (PrefillShortRows; cpu-kernel-notes #27: d = 576, 128 tokens
  // 0.79-0.81 -> 0.70-0.73 of dense; at d = 1024-2048, rows with pages of their own, 0-5 % slower),
  // and always for gate/up in slabs, one contiguous range a task (#41: 128 tokens 10-20 % faster
  // at d = 1024-4096).
  struct Prefetch {
    const Weights& w;
    const FfnDims& dims;
    bool on = PrefillShortRows(dims.hidden) || dims.gate_up_tile != 0;
    std::pair<PrefetchStream, PrefetchStream> gate_up(int64_t i, int64_t r0, int64_t rows) const {
      if (!on) return {};
      const int64_t offset = GateUpOffset(dims, i, r0);
      // a task of the slab layout is one whole slab (the last one's padding rows too)
      const int64_t stored = dims.gate_up_tile != 0 ? kSlabRows : rows;
      const int64_t bytes = stored * dims.hidden * static_cast<int64_t>(sizeof(float));
      return {PrefetchStream::Range(w.gate + offset, bytes), PrefetchStream::Range(w.up + offset, bytes)};
    }
    PrefetchStream down(int64_t i, int64_t c0, int64_t width) const {
      if (!on) return {};
      const int64_t B = dims.block_size, d = dims.hidden;
      constexpr int64_t kF = sizeof(float);
      if (dims.down_tile != 0) return PrefetchStream::Range(w.down + DownOffset(dims, i, 0, c0), B * dims.down_tile * kF);
      return PrefetchStream::Rows(w.down + i * B * d + c0, B, width * kF, d * kF);
    }
  } prefetch{w, dims};
  RunPrefill(ctx, ks, attrs, dims, x, x, w.router, w.bias, routed, active, y, gate_up_rows, down_tile, prefetch);
}

}  // namespace

// Per task (cpu/decode.h), slabs of kDecodeRows rows: a slab's gate, up and down rows are
// read once for up to kMaxDotTokens tokens (down rows longer than a page: once per token,
// from L2).
// Down in column tiles: h of all the group's rows first, then the group's rows of
// every tile at once (accumulate_tiles), once for up to kMaxDotTokens tokens. Against
// the rows layout's per-slab reads: 1-4 % slower at T = 1 (d = 2048 and 4096), equal
// at T = 4; tile after tile (one stream at a time) was 5-6 % slower, a second pass
// over whole tiles after all of the block's gate/up 4-6 %.
static_assert(kDecodeRows == kSlabRows, "a decode slab is one slab of the gate/up slab layout");

void FloatDecodeTask::operator()(const DecodeTask& t) const {
  const int64_t n = dims.num_blocks, d = dims.hidden, B = dims.block_size;
  const bool tiled = dims.down_tile != 0;
  const int64_t i = t.block, first_pair = t.first_pair, last_pair = t.last_pair;
  const int64_t* pair_token = t.pair_token;
  const int64_t g0 = t.slab_begin * kDecodeRows, g_rows = std::min(B, t.slab_end * kDecodeRows) - g0;
  float* hg = tiled ? ThreadBuffer(ThreadSlot::kDownTile, (last_pair - first_pair) * g_rows) : nullptr;
  float g[kMaxDotTokens * kDecodeRows], u[kMaxDotTokens * kDecodeRows], h[kMaxDotTokens * kDecodeRows];
  for (int64_t s = t.slab_begin; s < t.slab_end; ++s) {
    const int64_t r0 = s * kDecodeRows, rows = std::min(kDecodeRows, B - r0);
    const int64_t offset = (i * B + r0) * d;  // of the down rows
    const int64_t gu_offset = GateUpOffset(dims, i, r0);
    for (int64_t p0 = first_pair; p0 < last_pair; p0 += kMaxDotTokens) {
      const int count = static_cast<int>(std::min<int64_t>(kMaxDotTokens, last_pair - p0));
      const float* xs[kMaxDotTokens];
      for (int c = 0; c < count; ++c) xs[c] = x + pair_token[p0 + c] * d;
      if (dims.gate_up_tile != 0) {
        ks.slab_dots(w.gate + gu_offset, w.up + gu_offset, rows, d, xs, count, g, u, kDecodeRows);
      } else {
        ks.dot_rows(w.gate + gu_offset, d, rows, xs, count, d, g, kDecodeRows);
        ks.dot_rows(w.up + gu_offset, d, rows, xs, count, d, u, kDecodeRows);
      }
      const float* hs[kMaxDotTokens];
      float* outs[kMaxDotTokens];
      for (int c = 0; c < count; ++c) {
        const int64_t p = p0 + c;
        float* hp = tiled ? hg + (p - first_pair) * g_rows + (r0 - g0) : h + c * kDecodeRows;
        ks.gated_activation(attrs.activation, g + c * kDecodeRows, u + c * kDecodeRows,
                            routing.coef[pair_token[p] * n + i], rows, hp);
        hs[c] = hp;
        outs[c] = t.out(p);
      }
      if (!tiled) ks.accumulate_rows(hs, count, w.down + offset, rows, d, d, outs);
    }
  }
  if (!tiled) return;
  for (int64_t p0 = first_pair; p0 < last_pair; p0 += kMaxDotTokens) {
    const int count = static_cast<int>(std::min<int64_t>(kMaxDotTokens, last_pair - p0));
    const float* hs[kMaxDotTokens];
    float* outs[kMaxDotTokens];
    for (int c = 0; c < count; ++c) {
      hs[c] = hg + (p0 + c - first_pair) * g_rows;
      outs[c] = t.out(p0 + c);
    }
    ks.accumulate_tiles(hs, count, w.down + DownOffset(dims, i, g0, 0), g_rows, B * dims.down_tile, d, outs);
  }
}

void ComputeFloatFfn(const Ort::KernelContext& ctx, const KernelSet& ks, const FfnAttributes& attrs,
                     const FfnDims& dims, const float* x, const FloatFfnWeights& w, float* y, bool* active) {
  if (dims.num_tokens == 0) return;
  if (!MayUseDecodePath(dims)) return ComputePrefill(ctx, ks, attrs, dims, x, w, nullptr, active, y);
  const Routing routing = Route(ctx, ks, attrs, dims, x, w.router, w.bias);
  WriteActive(routing, dims, active);
  if (UsesDecodePath(dims, routing, kFloatDecodeBounds)) {
    DecodeSlabs(ctx, dims, routing, kDecodeRows, dims.hidden * static_cast<int64_t>(sizeof(float)),
                FloatDecodeTask{ks, attrs, dims, x, w, routing}, y);
  } else {
    ComputePrefill(ctx, ks, attrs, dims, x, w, &routing, active, y);
  }
}

void FfnCpuKernel::Prepare(const Ort::ConstKernelInfo& info) const {
  AdviseConstantInputs(info, {kGateWeight, kUpWeight, kDownWeight});
}

void FfnCpuKernel::Compute(Ort::KernelContext& ctx) const {
  const FfnInputs in = GetInputs(ctx, attrs_);
  const Outputs out = GetOutputs(ctx, in.dims);
  const FloatFfnWeights w{in.router_weight.GetTensorData<float>(),
                          in.router_bias ? in.router_bias.GetTensorData<float>() : nullptr,
                          in.gate_weight.GetTensorData<float>(), in.up_weight.GetTensorData<float>(),
                          in.down_weight.GetTensorData<float>()};
  ComputeFloatFfn(ctx, kernels_, attrs_, in.dims, in.dims.num_tokens ? in.x.GetTensorData<float>() : nullptr, w,
                  out.y, out.active);
}

void RegisterOps(Ort::CustomOpDomain& domain) {
  static const FfnOp<FfnCpuKernel> op;
  domain.Add(&op);
}

}  // namespace dsmoe::cpu
