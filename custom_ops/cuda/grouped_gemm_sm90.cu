// The two grouped GEMMs of the CUTLASS prefill path on Hopper (sm_90a), CUTLASS 3.x
// warp-specialized TMA kernels with the problem sizes on the device only (the number of
// rows of each block is never copied to the host: no synchronisation, capturable):
//   gate/up: 2n groups, gu[rows of block i, gate | up half] = xp[rows] . W_i^T
//            (W_i = gate_weight[i] or up_weight[i], [B, d] row-major: K-major B operand)
//   down:    n groups,  xp[rows of block i] = h[rows] . down_weight[i]
//            ([B, d] row-major: N-major B operand), h read from gu's gate half
// Cooperative schedule, 128 x 128 x 64 tiles, no cluster, float accumulation, D = acc
// (no C operand). The per-group arguments come from grouped_gemm_args.cuh's kernel.
#include "cuda/grouped_gemm_args.cuh"

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/group_array_problem_shape.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"

#if !defined(CUTLASS_ARCH_MMA_MODIFIABLE_TMA_SM90_SUPPORTED)
#error "the CUTLASS grouped GEMMs need nvcc 12.3 or newer (CUTLASS_ARCH_MMA_MODIFIABLE_TMA_SM90_SUPPORTED)"
#endif

namespace dsmoe::cuda {
namespace {

using ProblemShape = cutlass::gemm::GroupProblemShape<cute::Shape<int, int, int>>;
using Problem = ProblemShape::UnderlyingProblemShape;

using grouped::ArgCarver;
using grouped::CutlassElement;

// One grouped GEMM: A row-major [m, k], D row-major [m, n], B in LayoutB.
template <typename T, typename LayoutB>
struct GroupedGemm {
  using E = typename CutlassElement<T>::type;
  using LayoutA = cutlass::layout::RowMajor;
  using LayoutD = cutlass::layout::RowMajor;
  static constexpr int kAlign = 8;  // elements per 16 bytes
  using TileShape = cute::Shape<cute::_128, cute::_128, cute::_64>;
  using ClusterShape = cute::Shape<cute::_1, cute::_1, cute::_1>;
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float,
      void, LayoutD*, kAlign, E, LayoutD*, kAlign,
      cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative,
      cutlass::epilogue::fusion::LinearCombination<E, float, void, float>>::CollectiveOp;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
      E, LayoutA*, kAlign, E, LayoutB*, kAlign, float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, Mainloop, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  using StrideA = typename Kernel::InternalStrideA;
  using StrideB = typename Kernel::InternalStrideB;
  using StrideD = typename Kernel::InternalStrideD;

  // This GEMM's per-group arguments in the scratch (kGroupGemmArgBytes per group).
  struct Args {
    Problem* problems;
    const E** a;
    const E** b;
    E** d;
    StrideA* stride_a;
    StrideB* stride_b;
    StrideD* stride_d;
  };
  static_assert(sizeof(Problem) <= 16 && sizeof(StrideA) <= 16 && sizeof(StrideB) <= 16 && sizeof(StrideD) <= 16,
                "per-group arguments larger than kGroupGemmArgBytes allows");
  static_assert(16 + 3 * 8 + 3 * 16 <= kGroupGemmArgBytes, "kGroupGemmArgBytes too small");

  __host__ __device__ static Args Carve(void* region, int groups) {
    ArgCarver take(region, groups);
    Args r;
    r.problems = take.Take<Problem>(16);
    r.a = take.Take<const E*>(8);
    r.b = take.Take<const E*>(8);
    r.d = take.Take<E*>(8);
    r.stride_a = take.Take<StrideA>(16);
    r.stride_b = take.Take<StrideB>(16);
    r.stride_d = take.Take<StrideD>(16);
    return r;
  }

  // Group g's arguments from its GroupGemm (strides from the leading dimensions).
  __device__ static void Write(const Args& args, int g, const GroupGemm& s, const T* a, const T* b, T* d) {
    args.problems[g] = Problem(s.m, s.n, s.k);
    args.a[g] = reinterpret_cast<const E*>(a + s.a);
    args.b[g] = reinterpret_cast<const E*>(b + s.b);
    args.d[g] = reinterpret_cast<E*>(d + s.d);
    StrideA sa{};
    cute::get<0>(sa) = s.lda;  // row-major A: (m, k) -> m * lda + k
    args.stride_a[g] = sa;
    StrideB sb{};
    if constexpr (cute::is_same_v<LayoutB, cutlass::layout::ColumnMajor>) {
      cute::get<0>(sb) = s.ldb;  // K-major: (n, k) -> n * ldb + k
    } else {
      cute::get<1>(sb) = s.ldb;  // N-major: (n, k) -> k * ldb + n
    }
    args.stride_b[g] = sb;
    StrideD sd{};
    cute::get<0>(sd) = s.ldd;
    args.stride_d[g] = sd;
  }

  static typename Gemm::Arguments Arguments(const Args& args, int groups, int device, int sm_count) {
    cutlass::KernelHardwareInfo hw;
    hw.device_id = device;
    hw.sm_count = sm_count;
    typename Gemm::Arguments arguments{
        cutlass::gemm::GemmUniversalMode::kGrouped,
        {groups, args.problems, nullptr},  // problem sizes on the device only
        {args.a, args.stride_a, args.b, args.stride_b},
        {{}, nullptr, args.stride_d, args.d, args.stride_d},
        hw};
    arguments.epilogue.thread.alpha = 1.0f;
    arguments.epilogue.thread.beta = 0.0f;
    return arguments;
  }

  static cudaError_t Run(const Args& args, int groups, const Params<T>& p, void* workspace, cudaStream_t stream) {
    const typename Gemm::Arguments arguments = Arguments(args, groups, p.device, p.sm_count);
    if (static_cast<int64_t>(Gemm::get_workspace_size(arguments)) > p.gemm_workspace_bytes) {
      return cudaErrorInvalidValue;
    }
    Gemm gemm;
    if (gemm.can_implement(arguments) != cutlass::Status::kSuccess) return cudaErrorInvalidValue;
    if (gemm.initialize(arguments, workspace, stream) != cutlass::Status::kSuccess) return cudaErrorInvalidConfiguration;
    return grouped::LaunchStatus(gemm.run(stream) == cutlass::Status::kSuccess);
  }
};

template <typename T>
using GateUpGemm = GroupedGemm<T, cutlass::layout::ColumnMajor>;
template <typename T>
using DownGemm = GroupedGemm<T, cutlass::layout::RowMajor>;

}  // namespace

template <typename T>
cudaError_t LaunchCutlassSm90GateUp(const Params<T>& p, const FfnCudaPlan&, cudaStream_t stream) {
  return grouped::LaunchGateUp<T, GateUpGemm, DownGemm>(p, stream);
}
template <typename T>
cudaError_t LaunchCutlassSm90Down(const Params<T>& p, const FfnCudaPlan&, cudaStream_t stream) {
  return grouped::LaunchDown<T, DownGemm>(p, stream);
}

int64_t CutlassGemmWorkspaceBytes(int blocks, int sm_count, int device) {
  // Only the counts and the hardware matter to get_workspace_size: null pointers here.
  const auto gu = GateUpGemm<__half>::Arguments(GateUpGemm<__half>::Carve(nullptr, 2 * blocks), 2 * blocks,
                                                device, sm_count);
  const auto dn = DownGemm<__half>::Arguments(DownGemm<__half>::Carve(nullptr, blocks), blocks, device, sm_count);
  const auto gb = GateUpGemm<__nv_bfloat16>::Arguments(GateUpGemm<__nv_bfloat16>::Carve(nullptr, 2 * blocks),
                                                       2 * blocks, device, sm_count);
  const auto db = DownGemm<__nv_bfloat16>::Arguments(DownGemm<__nv_bfloat16>::Carve(nullptr, blocks), blocks,
                                                     device, sm_count);
  size_t bytes = 1;  // > 0: the plan reads 0 as "no CUTLASS on this device"
  bytes = std::max(bytes, GateUpGemm<__half>::Gemm::get_workspace_size(gu));
  bytes = std::max(bytes, DownGemm<__half>::Gemm::get_workspace_size(dn));
  bytes = std::max(bytes, GateUpGemm<__nv_bfloat16>::Gemm::get_workspace_size(gb));
  bytes = std::max(bytes, DownGemm<__nv_bfloat16>::Gemm::get_workspace_size(db));
  return static_cast<int64_t>(bytes);
}

template cudaError_t LaunchCutlassSm90GateUp<__half>(const Params<__half>&, const FfnCudaPlan&, cudaStream_t);
template cudaError_t LaunchCutlassSm90GateUp<__nv_bfloat16>(const Params<__nv_bfloat16>&, const FfnCudaPlan&, cudaStream_t);
template cudaError_t LaunchCutlassSm90Down<__half>(const Params<__half>&, const FfnCudaPlan&, cudaStream_t);
template cudaError_t LaunchCutlassSm90Down<__nv_bfloat16>(const Params<__nv_bfloat16>&, const FfnCudaPlan&, cudaStream_t);

}  // namespace dsmoe::cuda
