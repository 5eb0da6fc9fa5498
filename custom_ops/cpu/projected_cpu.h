// CPU kernel of org.dsmoe::ProjectedSparseFFN (float32): what a LLaMA-style decoder layer
// does between two attention nodes, in one node (docs/op-spec.md "ProjectedSparseFFN").
#pragma once

#include "common/ffn_op.h"
#include "common/projected_params.h"
#include "cpu/kernels.h"

namespace dsmoe::cpu {

class ProjectedCpuKernel {
 public:
  using Variant = NoVariant;
  static OpSignature Signature(NoVariant);

  ProjectedCpuKernel(NoVariant, const Ort::ConstKernelInfo& info);
  // Constant weights (initializers) onto huge pages (cpu/hugepages.h).
  void Prepare(const Ort::ConstKernelInfo& info) const;
  void Compute(Ort::KernelContext& ctx) const;

 private:
  struct Call;
  void ComputeInOnePass(Ort::KernelContext& ctx, const Call& call) const;
  void ComputeInSteps(Ort::KernelContext& ctx, const Call& call) const;
  // out [rows, p] = a [rows, k] . weight [p, k]^T (w: weight's data).
  void Project(Ort::KernelContext& ctx, const float* a, int64_t rows, int64_t k, const Ort::ConstValue& weight,
               const float* w, int64_t p, float* out) const;
  // The same through ONNX Runtime's own Gemm.
  void Gemm(Ort::KernelContext& ctx, const float* a, int64_t rows, int64_t k, const Ort::ConstValue& weight,
            int64_t p, float* out) const;

  ProjectedAttributes attrs_;
  const KernelSet& kernels_;
  mutable Ort::Op gemm_{nullptr};  // ORT's Gemm (transB = 1), for the projections of longer calls
};

void RegisterProjectedOps(Ort::CustomOpDomain& domain);

}  // namespace dsmoe::cpu
