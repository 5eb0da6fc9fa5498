// The two grouped GEMMs of the CUTLASS prefill path on Ampere / Ada (sm_80 to sm_89), CUTLASS
// 2.x's GemmGrouped with the problem sizes on the device only (GroupScheduleMode::kDeviceOnly:
// each CTA walks the groups' tile counts itself; no host synchronisation, no workspace). Same
// groups, layouts and argument kernel as grouped_gemm_sm90.cu (grouped_map.h, grouped_gemm_args.cuh):
//   gate/up: 2n groups, gu[rows of block i, gate | up half] = xp[rows] . W_i^T (B: ColumnMajor)
//   down:    n groups,  xp[rows of block i] = h[rows] . down_weight[i]         (B: RowMajor)
// 128 x 128 x 32 CTA tiles, 64 x 64 x 32 warps, mma.sync 16 x 8 x 16, 4 stages of cp.async,
// float accumulation, D = acc (beta = 0: C is never read). Built as sm_80 SASS plus compute_80
// PTX, so the same kernels also run (JIT-compiled) on newer GPUs when forced (CutlassChoice::kSm80).
#include "cuda/grouped_gemm_args.cuh"

#include "cutlass/cutlass.h"
#include "cutlass/epilogue/thread/linear_combination.h"
#include "cutlass/gemm/device/gemm_grouped.h"
#include "cutlass/gemm/kernel/default_gemm_grouped.h"

namespace dsmoe::cuda {
namespace {

using grouped::ArgCarver;
using grouped::CutlassElement;

template <typename T, typename LayoutB>
struct GroupedGemm {
  using E = typename CutlassElement<T>::type;
  using LayoutA = cutlass::layout::RowMajor;
  using LayoutD = cutlass::layout::RowMajor;
  static constexpr int kAlign = 8;  // elements per 16 bytes
  using Kernel = typename cutlass::gemm::kernel::DefaultGemmGrouped<
      E, LayoutA, cutlass::ComplexTransform::kNone, kAlign,
      E, LayoutB, cutlass::ComplexTransform::kNone, kAlign,
      E, LayoutD, float, cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80,
      cutlass::gemm::GemmShape<128, 128, 32>, cutlass::gemm::GemmShape<64, 64, 32>,
      cutlass::gemm::GemmShape<16, 8, 16>,
      cutlass::epilogue::thread::LinearCombination<E, kAlign, float, float>,
      cutlass::gemm::threadblock::GemmBatchedIdentityThreadblockSwizzle, 4,
      cutlass::gemm::kernel::GroupScheduleMode::kDeviceOnly>::GemmKernel;
  using Gemm = cutlass::gemm::device::GemmGrouped<Kernel>;
  using Index = int64_t;  // LayoutX::Stride::LongIndex

  // This GEMM's per-group arguments in the scratch (kGroupGemmArgBytes per group).
  struct Args {
    cutlass::gemm::GemmCoord* problems;
    E** a;
    E** b;
    E** d;
    Index* lda;
    Index* ldb;
    Index* ldd;
  };
  static_assert(sizeof(cutlass::gemm::GemmCoord) <= 16 && 16 + 3 * 8 + 3 * 8 <= kGroupGemmArgBytes,
                "per-group arguments larger than kGroupGemmArgBytes allows");

  __host__ __device__ static Args Carve(void* region, int groups) {
    ArgCarver take(region, groups);
    Args r;
    r.problems = take.Take<cutlass::gemm::GemmCoord>(sizeof(cutlass::gemm::GemmCoord));
    r.a = take.Take<E*>(8);
    r.b = take.Take<E*>(8);
    r.d = take.Take<E*>(8);
    r.lda = take.Take<Index>(8);
    r.ldb = take.Take<Index>(8);
    r.ldd = take.Take<Index>(8);
    return r;
  }

  __device__ static void Write(const Args& args, int g, const GroupGemm& s, const T* a, const T* b, T* d) {
    args.problems[g] = cutlass::gemm::GemmCoord(s.m, s.n, s.k);
    args.a[g] = reinterpret_cast<E*>(const_cast<T*>(a + s.a));
    args.b[g] = reinterpret_cast<E*>(const_cast<T*>(b + s.b));
    args.d[g] = reinterpret_cast<E*>(d + s.d);
    args.lda[g] = s.lda;  // RowMajor A: row stride
    args.ldb[g] = s.ldb;  // ColumnMajor B [k, n] (= [n, k] row-major) or RowMajor B: the stride of grouped_map.h
    args.ldd[g] = s.ldd;
  }

  // No workspace: the device-only schedule keeps its state in the CTAs.
  static cudaError_t Run(const Args& args, int groups, const Params<T>& p, void*, cudaStream_t stream) {
    const int ctas = Gemm::sufficient(nullptr, 0, p.sm_count);  // one full wave; CTAs loop over tiles
    if (ctas <= 0) return cudaErrorInvalidConfiguration;
    typename Gemm::EpilogueOutputOp::Params epilogue(1.0f, 0.0f);
    // C = D with beta = 0: the epilogue never reads it.
    typename Gemm::Arguments arguments(args.problems, groups, ctas, epilogue, args.a, args.b, args.d, args.d,
                                       args.lda, args.ldb, args.ldd, args.ldd, nullptr);
    Gemm gemm;
    if (gemm.initialize(arguments, nullptr, stream) != cutlass::Status::kSuccess) return cudaErrorInvalidConfiguration;
    return grouped::LaunchStatus(gemm.run(stream) == cutlass::Status::kSuccess);
  }
};

template <typename T>
using GateUpGemm = GroupedGemm<T, cutlass::layout::ColumnMajor>;
template <typename T>
using DownGemm = GroupedGemm<T, cutlass::layout::RowMajor>;

}  // namespace

template <typename T>
cudaError_t LaunchCutlassSm80GateUp(const Params<T>& p, const FfnCudaPlan&, cudaStream_t stream) {
  return grouped::LaunchGateUp<T, GateUpGemm, DownGemm>(p, stream);
}
template <typename T>
cudaError_t LaunchCutlassSm80Down(const Params<T>& p, const FfnCudaPlan&, cudaStream_t stream) {
  return grouped::LaunchDown<T, DownGemm>(p, stream);
}

template cudaError_t LaunchCutlassSm80GateUp<__half>(const Params<__half>&, const FfnCudaPlan&, cudaStream_t);
template cudaError_t LaunchCutlassSm80GateUp<__nv_bfloat16>(const Params<__nv_bfloat16>&, const FfnCudaPlan&, cudaStream_t);
template cudaError_t LaunchCutlassSm80Down<__half>(const Params<__half>&, const FfnCudaPlan&, cudaStream_t);
template cudaError_t LaunchCutlassSm80Down<__nv_bfloat16>(const Params<__nv_bfloat16>&, const FfnCudaPlan&, cudaStream_t);

}  // namespace dsmoe::cuda
