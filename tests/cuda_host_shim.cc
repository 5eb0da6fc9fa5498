// C entry points over the host-side logic of the CUDA kernel (custom_ops/cuda/plan.cc,
// tile_map.h) for tests/test_cuda_host.py, which compiles this file with the host C++
// compiler: no CUDA needed.
#include <cstdint>
#include <cstring>
#include <string>

#include "cuda/plan.h"
#include "cuda/tile_map.h"

using namespace dsmoe::cuda;

extern "C" {

// Plan fields, in this order (tests/test_cuda_host.py names them).
int shim_plan(int64_t tokens, int64_t hidden, int64_t blocks, int64_t block_size, int dtype, int aligned,
              int64_t* out, char* error, int error_len) {
  FfnCudaPlan p;
  std::string e;
  if (!MakePlan({tokens, hidden, blocks, block_size, static_cast<DType>(dtype), aligned != 0}, p, e)) {
    std::strncpy(error, e.c_str(), error_len - 1);
    error[error_len - 1] = '\0';
    return 1;
  }
  const ScratchLayout& s = p.scratch;
  const int64_t v[] = {p.decode, p.tensor_cores, p.vec_loads, p.elem_size, p.tile_m, p.gate_up_tile_n,
                       p.down_tile_n, p.max_m_tiles, p.h_ld, p.decode_down_rows, p.decode_cols,
                       p.router.x, p.sort.x, p.gate_up.x, p.gate_up.y, p.down.x, p.down.y,
                       p.decode_gate_up.x, p.decode_down.x, p.finalize.x,
                       s.coef, s.active, s.acc, s.h_decode, s.pair_token, s.block_count, s.tile_start, s.h, s.bytes};
  std::memcpy(out, v, sizeof(v));
  return 0;
}

int shim_plan_field_count() { return 29; }

void shim_align_tiles(const int* count, int n, int tile_m, int* tile_start) { AlignTiles(count, n, tile_m, tile_start); }

int shim_find_tile(const int* tile_start, int n, int tile, int tile_m, int* block, int* first) {
  return FindTile(tile_start, n, tile, tile_m, *block, *first) ? 1 : 0;
}

int64_t shim_max_m_tiles(int64_t tokens, int64_t blocks, int64_t tile_m) { return MaxMTiles(tokens, blocks, tile_m); }
}
