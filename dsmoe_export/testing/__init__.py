"""What the tests, the benchmark and the GPU scripts share to check the op: the float64 numpy
reference written from docs/op-spec.md (``reference``), random inputs with unambiguous routing
and the tolerance (``cases``), the ctypes wrapper of the CUDA kernels' test library
(``cuda_harness``) and the GPU scripts' one-line-per-check report (``checks``). ``reference`` imports nothing from dsmoe_export, so that the kernels, the
ONNX function body and the PyTorch model are all checked against an independent reading of
the spec."""
