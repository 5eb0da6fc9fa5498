#include "cuda/plan.h"

#include <algorithm>
#include <limits>

namespace dsmoe::cuda {
namespace {

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t RoundUp(int64_t a, int64_t b) { return CeilDiv(a, b) * b; }

// Appends `bytes` to the layout, aligned; returns the offset.
int64_t Take(ScratchLayout& s, int64_t bytes) {
  const int64_t offset = RoundUp(s.bytes, kScratchAlign);
  s.bytes = offset + bytes;
  return offset;
}

// Grid limits: x < 2^31, y and z <= 65535.
bool CheckGrids(const FfnCudaPlan& p, std::string& error) {
  for (const Dim3* g : {&p.router, &p.sort, &p.gate_up, &p.down, &p.decode_gate_up, &p.decode_down, &p.finalize}) {
    if (g->x > std::numeric_limits<int32_t>::max() || g->y > 65535 || g->z > 65535) {
      error = "sizes too large for the CUDA kernel's grids (B or d above 65535 tiles of 64, or too many tiles)";
      return false;
    }
  }
  return true;
}

}  // namespace

int DTypeSize(DType t) { return t == DType::kFloat32 ? 4 : 2; }

int64_t MaxMTiles(int64_t tokens, int64_t blocks, int64_t tile_m) {
  // Every count is at most `tokens` (a token uses a block once), so the bound is
  // reached when every token uses every block.
  return blocks * CeilDiv(tokens, tile_m);
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
  if (shape.dtype != DType::kFloat32) s.acc = Take(s, N * d * 4);
  plan.router = {N, 1, 1};
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
