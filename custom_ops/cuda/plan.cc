#include "cuda/plan.h"

#include <algorithm>
#include <limits>

#include "common/int_math.h"

namespace dsmoe::cuda {
namespace {

// Appends `bytes` to the layout, aligned; returns the offset.
int64_t Take(ScratchLayout& s, int64_t bytes) {
  const int64_t offset = RoundUp(s.bytes, kScratchAlign);
  s.bytes = offset + bytes;
  return offset;
}

// Grid limits: x < 2^31, y and z <= 65535.
bool CheckGrids(const FfnCudaPlan& p, std::string& error) {
  for (const Dim3* g : {&p.router, &p.sort, &p.gate_up, &p.down, &p.decode_gate_up, &p.decode_down, &p.finalize,
                        &p.permute, &p.activate, &p.combine}) {
    if (g->x > std::numeric_limits<int32_t>::max() || g->y > 65535 || g->z > 65535) {
      error = "sizes too large for the CUDA kernel's grids (B or d above 65535 tiles of 64, or too many tiles)";
      return false;
    }
  }
  return true;
}

// The CUTLASS path's stages (forward.cu): router, sort, align (tile_m = 1: row_start),
// permute, gate/up GEMM, activation, down GEMM, combine into Y (no float accumulator).
bool PlanCutlass(const FfnCudaShape& shape, FfnCudaPlan& plan, std::string& error) {
  const int64_t N = shape.tokens, d = shape.hidden, n = shape.blocks, B = shape.block_size;
  const int64_t pairs = N * n;  // every token in every block: the bound on permuted rows
  if (pairs > std::numeric_limits<int32_t>::max()) {
    error = "too many (token, block) pairs for the grouped GEMMs' 32-bit row indices";
    return false;
  }
  // d, B < 2^30 and pairs < 2^31: this product fits in int64_t; the scratch must too.
  if (pairs * (d + 2 * B) > (int64_t{1} << 50)) {
    error = "the grouped GEMMs' scratch would exceed 2^51 bytes";
    return false;
  }
  plan.cutlass = true;
  plan.tensor_cores = true;
  plan.tile_m = 1;
  ScratchLayout& s = plan.scratch;
  s.pair_token = Take(s, n * N * 4);
  s.block_count = Take(s, n * 4);
  s.tile_start = Take(s, (n + 1) * 4);
  s.pair_row = Take(s, N * n * 4);
  s.xp = Take(s, pairs * d * plan.elem_size);
  s.gu = Take(s, pairs * 2 * B * plan.elem_size);
  s.gemm_args = Take(s, 3 * n * kGroupGemmArgBytes);
  // sm_90a: CUTLASS's workspace per GEMM; the 2.x kernels schedule on the device, without one.
  s.gemm_workspace = Take(s, plan.cutlass_arch == 90 ? 2 * RoundUp(shape.device.gemm_workspace, kScratchAlign) : 0);
  plan.sort = {n, 1, 1};
  plan.finalize = {0, 1, 1};
  plan.permute = {CeilDiv(pairs, kGroupedRowsPerCta), 1, 1};
  plan.activate = plan.permute;
  plan.combine = {N, CeilDiv(d, kCombineThreads * 8), 1};
  return CheckGrids(plan, error);
}

}  // namespace

int DTypeSize(DType t) { return t == DType::kFloat32 ? 4 : 2; }

int64_t MaxMTiles(int64_t tokens, int64_t blocks, int64_t tile_m) {
  // Every count is at most `tokens` (a token uses a block once), so the bound is
  // reached when every token uses every block.
  return blocks * CeilDiv(tokens, tile_m);
}

bool ParseCutlassChoice(const char* value, CutlassChoice& choice, std::string& error) {
  const std::string v = value == nullptr ? "" : value;
  if (v.empty()) {
    choice = CutlassChoice::kAuto;
  } else if (v == "0") {
    choice = CutlassChoice::kOff;
  } else if (v == "sm80") {
    choice = CutlassChoice::kSm80;
  } else {
    error = "DSMOE_CUDA_CUTLASS='" + v + "': expected 0 (the WMMA kernels), sm80 (CUTLASS 2.x's kernels) or unset";
    return false;
  }
  return true;
}

int UsesCutlass(const FfnCudaShape& s) {
  const CudaDevice& dev = s.device;
  const bool eligible = dev.cutlass && dev.sm_count > 0 && s.dtype != DType::kFloat32 && s.aligned &&
                        s.hidden % 8 == 0 && s.block_size % 8 == 0 && !s.down_tiled && s.tokens > kDecodeMaxTokens;
  if (!eligible || dev.arch < 80) return 0;
  if (dev.force_sm80 || dev.arch < 90) return 80;
  return dev.arch == 90 && dev.gemm_workspace > 0 ? 90 : 0;
}

bool MakePlan(const FfnCudaShape& shape, FfnCudaPlan& plan, std::string& error) {
  plan = FfnCudaPlan{};
  const int64_t N = shape.tokens, d = shape.hidden, n = shape.blocks, B = shape.block_size;
  if (N < 0 || d < 1 || n < 1 || B < 1) {
    error = "invalid sizes";
    return false;
  }
  constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();
  // Token indices and per-block counts are int32 on the device; grid x is < 2^31.
  if (N > kInt32Max / 2 || n > kInt32Max / 2 || B > kInt32Max / 2 || d > kInt32Max / 2) {
    error = "the CUDA kernel needs tokens, n, B and d below 2^30 each";
    return false;
  }
  if (n > kMaxRouterBlocks) {
    error = "the CUDA kernel supports n <= " + std::to_string(kMaxRouterBlocks) + " blocks, got " + std::to_string(n);
    return false;
  }
  plan.elem_size = DTypeSize(shape.dtype);
  plan.vec_loads = shape.aligned && (d * plan.elem_size) % 16 == 0;
  if (N == 0) return true;

  ScratchLayout& s = plan.scratch;
  s.coef = Take(s, N * n * 4);
  s.active = Take(s, N * n);
  plan.router = {N, 1, 1};
  if (const int arch = UsesCutlass(shape); arch != 0) {
    plan.cutlass_arch = arch;
    return PlanCutlass(shape, plan, error);
  }
  if (shape.dtype != DType::kFloat32) s.acc = Take(s, N * d * 4);
  plan.finalize = {shape.dtype == DType::kFloat32 ? 0 : std::min<int64_t>(CeilDiv(N * d, 256), 65536), 1, 1};

  plan.decode = N <= kDecodeMaxTokens;
  if (plan.decode) {
    s.h_decode = Take(s, N * n * B * 4);
    plan.decode_gate_up = {CeilDiv(B, kDecodeGateUpRows) * n, 1, 1};
    // Fewer rows per CTA for 1-2 tokens (more CTAs streaming a few active blocks),
    // more for up to 8 tokens (fewer float atomics into the accumulator).
    plan.decode_down_rows = N <= 2 ? 64 : 128;
    plan.decode_cols = 32 * (16 / plan.elem_size);
    plan.decode_down = {CeilDiv(d, plan.decode_cols) * CeilDiv(B, plan.decode_down_rows) * n, 1, 1};
    return CheckGrids(plan, error);
  }

  plan.tensor_cores = shape.dtype != DType::kFloat32 && plan.vec_loads;
  plan.tile_m = plan.tensor_cores ? kTcTileM : kSimtTileM;
  plan.gate_up_tile_n = plan.tensor_cores ? kTcGateUpTileN : kSimtTileN;
  plan.down_tile_n = plan.tensor_cores ? kTcDownTileN : kSimtTileN;
  plan.max_m_tiles = MaxMTiles(N, n, plan.tile_m);
  if (plan.max_m_tiles > kInt32Max) {
    error = "too many (token, block) tiles for one launch";
    return false;
  }
  plan.h_ld = RoundUp(B, 8);
  s.pair_token = Take(s, n * N * 4);
  s.block_count = Take(s, n * 4);
  s.tile_start = Take(s, (n + 1) * 4);
  s.h = Take(s, plan.max_m_tiles * plan.tile_m * plan.h_ld * plan.elem_size);
  plan.sort = {n, 1, 1};
  plan.gate_up = {plan.max_m_tiles, CeilDiv(B, plan.gate_up_tile_n), 1};
  plan.down = {plan.max_m_tiles, CeilDiv(d, plan.down_tile_n), 1};
  return CheckGrids(plan, error);
}

}  // namespace dsmoe::cuda
