// Launch plan of the CUDA kernel of org.dsmoe::GatedBlockSparseFFN: which path,
// tile sizes, grid shapes and the scratch layout, computed on the host from
// the sizes alone (no device access, no synchronisation: the number of active
// (token, block) pairs is known on the device only, so every size here is a
// bound). Plain C++: compiled into the op library and into the host tests.
#pragma once

#include <cstdint>
#include <string>

namespace dsmoe::cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Element size in bytes.
int DTypeSize(DType t);

// Tile sizes of the kernels (the .cu files use the same constants).
// Decode path: at most this many tokens per call (one register accumulator per token).
inline constexpr int64_t kDecodeMaxTokens = 8;
inline constexpr int kDecodeGateUpRows = 8;     // rows of a block per gate/up GEMV CTA (one warp each)
inline constexpr int kDecodeThreads = 256;      // 8 warps
// Grouped GEMM path, tensor cores (float16 / bfloat16 with d % 8 == 0).
inline constexpr int kTcTileM = 128;            // (token, block) pairs per tile
inline constexpr int kTcGateUpTileN = 64;       // rows of B per tile (gate and up: 2 x 64 outputs)
inline constexpr int kTcDownTileN = 128;        // columns of d per tile
inline constexpr int kTcTileK = 32;
inline constexpr int kTcThreads = 256;          // 8 warps, 4 (M) x 2 (N)
// Grouped GEMM path, CUDA cores (float32, and any type when d % 8 != 0).
inline constexpr int kSimtTileM = 64;
inline constexpr int kSimtTileN = 64;
inline constexpr int kSimtTileK = 16;
inline constexpr int kSimtThreads = 256;        // 16 x 16 threads, 4 x 4 outputs each
inline constexpr int kRouterThreads = 256;
inline constexpr int64_t kMaxRouterBlocks = 12288;  // the router's logits in 48 KiB of shared memory
inline constexpr int kSortThreads = 256;
inline constexpr int kScratchAlign = 256;
// CUTLASS grouped-GEMM path (grouped_gemm_sm90.cu): bytes of per-group GEMM arguments
// (problem size, 3 pointers, 3 strides; the .cu checks that they fit), permuted rows per
// CTA of the permute / activation kernels (one warp each), columns per CTA of the combine.
inline constexpr int64_t kGroupGemmArgBytes = 128;
inline constexpr int kGroupedRowsPerCta = 8;
inline constexpr int kCombineThreads = 256;

struct Dim3 {
  int64_t x = 1, y = 1, z = 1;
};

// Byte offsets into one scratch allocation; -1 = not used by the path.
struct ScratchLayout {
  int64_t coef = -1;        // float [N, n]: g_i * c, 0 when inactive
  int64_t active = -1;      // bool [N, n]: the active flags when the node has no `active` output
  int64_t acc = -1;         // float [N, d]: Y accumulator (float16/bfloat16 only; float32 accumulates in Y)
  int64_t h_decode = -1;    // float [N, n, B]: decode path, h of active pairs (scaled by g_i * c)
  int64_t pair_token = -1;  // int32 [n, N]: GEMM path, tokens of block i (ascending) at [i * N, i * N + count_i)
  int64_t block_count = -1; // int32 [n]
  int64_t tile_start = -1;  // int32 [n + 1]: first M tile of block i; tile_start[n] = tiles in use
  int64_t h = -1;           // T [max_m_tiles * tile_m, h_ld]: GEMM path, h of M tile x at rows x * tile_m + r
  // CUTLASS path (grouped_map.h): pair_token, block_count and tile_start (= row_start) as above, and
  int64_t pair_row = -1;    // int32 [N, n]: permuted row of an active (token, block) pair
  int64_t xp = -1;          // T [N * n, d]: permuted input rows, then the down GEMM's output rows
  int64_t gu = -1;          // T [N * n, 2B]: gate | up products, h in the gate half
  int64_t gemm_args = -1;   // 3n groups x kGroupGemmArgBytes: the GEMMs' per-group arguments
  int64_t gemm_workspace = -1;  // 2 x CudaDevice::gemm_workspace: CUTLASS's workspace of each GEMM
  int64_t bytes = 0;        // total
};

// What the plan needs to know of the device (forward.h DescribeDevice fills it).
struct CudaDevice {
  int ordinal = 0;
  int arch = 0;                // compute capability x 10 (90 = sm_90); 0 = unknown
  int sm_count = 0;
  bool cutlass = false;        // the library was built with the CUTLASS GEMMs and they are allowed
  bool force_sm80 = false;     // take the CUTLASS 2.x (sm_80) kernels on any arch >= 80 (tests)
  int64_t gemm_workspace = 0;  // bytes of workspace one sm_90a grouped GEMM needs on it
};

// Which grouped GEMMs the GEMM path may take: the CUTLASS ones for the device (kAuto), none
// (kOff: the WMMA kernels), or CUTLASS 2.x's sm_80 kernels on any arch >= 80 (kSm80, tests).
enum class CutlassChoice : int { kOff = 0, kAuto = 1, kSm80 = 2 };

// DSMOE_CUDA_CUTLASS's value: unset or "" = kAuto, "0" = kOff, "sm80" = kSm80; anything else
// is refused (false, with the message in error) rather than read as the default.
bool ParseCutlassChoice(const char* value, CutlassChoice& choice, std::string& error);

struct FfnCudaShape {
  int64_t tokens = 0, hidden = 0, blocks = 0, block_size = 0;
  DType dtype = DType::kFloat32;
  bool aligned = true;  // every input pointer 16-byte aligned (ORT's allocations are)
  bool down_tiled = false;  // down_weight in [n, ceil(d / 64), B, 64] (op attribute down_tile)
  CudaDevice device{};
};

struct FfnCudaPlan {
  bool decode = false;        // tokens <= kDecodeMaxTokens: gather-GEMV path
  bool tensor_cores = false;  // GEMM path with WMMA (float16 / bfloat16 with vec_loads)
  bool cutlass = false;       // GEMM path with CUTLASS's grouped GEMMs (UsesCutlass)
  int cutlass_arch = 0;       // their kernels: 90 (3.x, sm_90a) or 80 (2.x, sm_80 and up)
  bool vec_loads = false;     // 16-byte loads along d (aligned and d * elem_size % 16 == 0)
  int elem_size = 4;
  // GEMM path
  int64_t tile_m = 0, gate_up_tile_n = 0, down_tile_n = 0;
  int64_t max_m_tiles = 0;    // bound on sum_i ceil(count_i / tile_m) over any routing
  int64_t h_ld = 0;           // row stride of h (B rounded up to 8 elements)
  // decode path
  int64_t decode_down_rows = 0;  // rows of a block per down GEMV CTA
  int64_t decode_cols = 0;       // columns of d per down GEMV CTA (32 lanes x 16 bytes)
  Dim3 router, sort, gate_up, down, decode_gate_up, decode_down, finalize;
  Dim3 permute, activate, combine;  // CUTLASS path
  ScratchLayout scratch;
};

// The plan for one call, or an error message (sizes the kernels cannot index
// with their 32-bit counters). tokens == 0 gives an empty plan (nothing to launch).
bool MakePlan(const FfnCudaShape& shape, FfnCudaPlan& plan, std::string& error);

// Which CUTLASS grouped GEMMs a GEMM-path call takes, or 0: 90 on Hopper (sm_90 exactly:
// the kernels use sm_90a features), 80 on Ampere / Ada (sm_80 to sm_89; any arch >= 80 with
// force_sm80); with them built in, float16 / bfloat16, 16-byte aligned rows of d and B
// elements (TMA, cp.async), down in the rows layout.
int UsesCutlass(const FfnCudaShape& shape);

// Bound on the number of M tiles of the grouped GEMM: max over counts c_i in
// [0, tokens] with sum c_i <= tokens * blocks of sum_i ceil(c_i / tile_m).
int64_t MaxMTiles(int64_t tokens, int64_t blocks, int64_t tile_m);

}  // namespace dsmoe::cuda
