// CPU kernels of org.dsmoe::ProjectedSparseFFN (float32) and ProjectedSparseFFNInt4: what a
// LLaMA-style decoder layer does between two attention nodes, in one node (docs/op-spec.md).
#pragma once

#include "common/ffn_op.h"
#include "common/projected_params.h"
#include "cpu/kernels.h"
#include "cpu/kernels_quant.h"

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
  ProjectedAttributes attrs_;
  const KernelSet& kernels_;
  mutable Ort::Op gemm_{nullptr};  // ORT's Gemm (transB = 1), for the projections of longer calls
};

class ProjectedInt4CpuKernel {
 public:
  using Variant = NoVariant;
  static OpSignature Signature(NoVariant);

  ProjectedInt4CpuKernel(NoVariant, const Ort::ConstKernelInfo& info);
  void Prepare(const Ort::ConstKernelInfo& info) const;
  void Compute(Ort::KernelContext& ctx) const;

 private:
  ProjectedInt4Attributes attrs_;
  const KernelSet& kernels_;
  const QuantKernelSet& quant_;
};

void RegisterProjectedOps(Ort::CustomOpDomain& domain);

}  // namespace dsmoe::cpu
