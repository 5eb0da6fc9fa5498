// Launchers of the CUDA kernels of org.dsmoe::GatedBlockSparseFFN, one file per
// stage (docs/cuda.md has the pipeline). Each enqueues on `stream` and returns
// cudaGetLastError(); T is float, __half or __nv_bfloat16.
#pragma once

#include "cuda/common.cuh"

namespace dsmoe::cuda {

// router.cu: per token, logits, sigmoid, threshold, k, coef = g_i * n/k, the active
// flags; zeroes the token's row of the float accumulator.
template <typename T>
cudaError_t LaunchRouter(const Params<T>& p, const FfnCudaPlan& plan, cudaStream_t stream);

// sort_align.cu: counting sort of the active (token, block) pairs by block (tokens
// ascending within a block), then the M-tile offsets of the grouped GEMMs.
template <typename T>
cudaError_t LaunchSortAlign(const Params<T>& p, const FfnCudaPlan& plan, cudaStream_t stream);

// gate_up_gemm.cu: grouped GEMM of the gathered token rows with the gate and up rows of
// their block, epilogue h = act(gate) * up, written as T to the h scratch.
template <typename T>
cudaError_t LaunchGateUp(const Params<T>& p, const FfnCudaPlan& plan, cudaStream_t stream);

// down_gemm.cu: grouped GEMM h @ down_weight[i], epilogue coef * result added
// (float atomics) into the token rows of the accumulator.
template <typename T>
cudaError_t LaunchDown(const Params<T>& p, const FfnCudaPlan& plan, cudaStream_t stream);

// decode_gemv.cu: small-token path, gather-GEMV over the active blocks' rows (gate/up
// with the activation, then down into the accumulator).
template <typename T>
cudaError_t LaunchDecode(const Params<T>& p, const FfnCudaPlan& plan, cudaStream_t stream);

// grouped_stages.cu (CUTLASS path): the active pairs' input rows gathered into block
// order (and pair_row); h = act(gate) * up in place in gu; Y = sum over the token's active
// blocks, in block order, of coef * the down GEMM's row (no atomics: deterministic).
template <typename T>
cudaError_t LaunchPermute(const Params<T>& p, const FfnCudaPlan& plan, cudaStream_t stream);
template <typename T>
cudaError_t LaunchActivate(const Params<T>& p, const FfnCudaPlan& plan, cudaStream_t stream);
template <typename T>
cudaError_t LaunchCombine(const Params<T>& p, const FfnCudaPlan& plan, cudaStream_t stream);

// grouped_gemm_sm90.cu / grouped_gemm_sm80.cu (CUTLASS path, float16 / bfloat16): the
// per-group arguments of both GEMMs written on the device from row_start, then
// gu = xp . [gate_i | up_i]^T (2n groups); ...Down: xp = h . down_i (n groups).
// Built only with DSMOE_WITH_CUTLASS.
template <typename T>
cudaError_t LaunchCutlassSm90GateUp(const Params<T>& p, const FfnCudaPlan& plan, cudaStream_t stream);
template <typename T>
cudaError_t LaunchCutlassSm90Down(const Params<T>& p, const FfnCudaPlan& plan, cudaStream_t stream);
template <typename T>
cudaError_t LaunchCutlassSm80GateUp(const Params<T>& p, const FfnCudaPlan& plan, cudaStream_t stream);
template <typename T>
cudaError_t LaunchCutlassSm80Down(const Params<T>& p, const FfnCudaPlan& plan, cudaStream_t stream);
// Workspace bytes of the larger of the two sm_90a GEMMs on a device with sm_count SMs.
int64_t CutlassGemmWorkspaceBytes(int blocks, int sm_count, int device);

// forward.cu: the float accumulator cast to T into Y (float16 / bfloat16 only).
template <typename T>
cudaError_t LaunchFinalize(const Params<T>& p, const FfnCudaPlan& plan, cudaStream_t stream);

inline dim3 Grid(const Dim3& g) {
  return dim3(static_cast<unsigned>(g.x), static_cast<unsigned>(g.y), static_cast<unsigned>(g.z));
}

#define DSMOE_INSTANTIATE_LAUNCHER(name)                                                              \
  template cudaError_t name<float>(const Params<float>&, const FfnCudaPlan&, cudaStream_t);           \
  template cudaError_t name<__half>(const Params<__half>&, const FfnCudaPlan&, cudaStream_t);         \
  template cudaError_t name<__nv_bfloat16>(const Params<__nv_bfloat16>&, const FfnCudaPlan&, cudaStream_t);

}  // namespace dsmoe::cuda
