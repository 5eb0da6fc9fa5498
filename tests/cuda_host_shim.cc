// C entry points over the host-side logic of the CUDA kernel (custom_ops/cuda/plan.cc,
// tile_map.h, grouped_map.h) for tests/test_cuda_host.py, which compiles this file with the host C++
// compiler: no CUDA needed.
#include <cstdint>
#include <cstring>
#include <string>

#include "cuda/grouped_map.h"
#include "cuda/plan.h"
#include "cuda/tile_map.h"

using namespace dsmoe::cuda;

extern "C" {

// Plan fields, in this order (tests/test_cuda_host.py names them). device: arch, sm_count,
// cutlass, gemm_workspace, force_sm80 (what DescribeDevice reports on a GPU).
int shim_plan(int64_t tokens, int64_t hidden, int64_t blocks, int64_t block_size, int dtype, int aligned,
              int down_tiled, const int64_t* device, int64_t* out, char* error, int error_len) {
  FfnCudaPlan p;
  std::string e;
  FfnCudaShape shape{tokens, hidden, blocks, block_size, static_cast<DType>(dtype), aligned != 0};
  shape.down_tiled = down_tiled != 0;
  shape.device.arch = static_cast<int>(device[0]);
  shape.device.sm_count = static_cast<int>(device[1]);
  shape.device.cutlass = device[2] != 0;
  shape.device.gemm_workspace = device[3];
  shape.device.force_sm80 = device[4] != 0;
  if (!MakePlan(shape, p, e)) {
    std::strncpy(error, e.c_str(), error_len - 1);
    error[error_len - 1] = '\0';
    return 1;
  }
  const ScratchLayout& s = p.scratch;
  const int64_t v[] = {p.decode, p.tensor_cores, p.vec_loads, p.elem_size, p.tile_m, p.gate_up_tile_n,
                       p.down_tile_n, p.max_m_tiles, p.h_ld, p.decode_down_rows, p.decode_cols,
                       p.router.x, p.sort.x, p.gate_up.x, p.gate_up.y, p.down.x, p.down.y,
                       p.decode_gate_up.x, p.decode_down.x, p.finalize.x,
                       s.coef, s.active, s.acc, s.h_decode, s.pair_token, s.block_count, s.tile_start, s.h, s.bytes,
                       p.cutlass_arch, p.permute.x, p.activate.x, p.combine.x, p.combine.y,
                       s.pair_row, s.xp, s.gu, s.gemm_args, s.gemm_workspace};
  std::memcpy(out, v, sizeof(v));
  return 0;
}

int shim_plan_field_count() { return 39; }

void shim_align_tiles(const int* count, int n, int tile_m, int* tile_start) { AlignTiles(count, n, tile_m, tile_start); }

int shim_find_tile(const int* tile_start, int n, int tile, int tile_m, int* block, int* first) {
  return FindTile(tile_start, n, tile, tile_m, *block, *first) ? 1 : 0;
}

// GateUpGroup (which = 0) or DownGroup (which = 1): m, n, k, a, b, d, lda, ldb, ldd, up.
void shim_group_gemm(int which, const int* row_start, int group, int d, int B, int64_t* out) {
  const GroupGemm g = which == 0 ? GateUpGroup(row_start, group, d, B) : DownGroup(row_start, group, d, B);
  const int64_t v[] = {g.m, g.n, g.k, g.a, g.b, g.d, g.lda, g.ldb, g.ldd, g.up};
  std::memcpy(out, v, sizeof(v));
}

int shim_permuted_row(const int* row_start, const int* pair_token, int n, int N, int r, int* block, int* token) {
  return PermutedRow(row_start, pair_token, n, N, r, *block, *token) ? 1 : 0;
}

int64_t shim_max_m_tiles(int64_t tokens, int64_t blocks, int64_t tile_m) { return MaxMTiles(tokens, blocks, tile_m); }

// ParseCutlassChoice: 1 and the choice (0 off, 1 auto, 2 sm80), or 0 and the message.
int shim_parse_cutlass_choice(const char* value, int* choice, char* error, int error_len) {
  CutlassChoice c = CutlassChoice::kAuto;
  std::string e;
  const bool ok = ParseCutlassChoice(value, c, e);
  *choice = static_cast<int>(c);
  std::strncpy(error, e.c_str(), error_len - 1);
  error[error_len - 1] = '\0';
  return ok ? 1 : 0;
}
}
