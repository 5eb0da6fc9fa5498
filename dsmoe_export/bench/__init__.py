"""The benchmark tool: ``python -m dsmoe_export.bench [op|e2e|all] ...`` (README, "Benchmarks").

Modules, one job each:

- :mod:`.graphs`   single-node ONNX graphs: the sparse op, the dense FFN as MatMuls,
  ONNX Runtime's ``com.microsoft.MoE`` computing the same function; sessions;
- :mod:`.routing`  inputs with an exact number k of active blocks per token (random
  subsets), or a random ("natural") router; routing statistics;
- :mod:`.probes`   the machine's ceilings: memory bandwidth and GEMM throughput in ORT;
- :mod:`.timing`   interleaved rounds with a cache flush, min / median;
- :mod:`.metrics`  bytes touched, useful FLOPs, roofline bound of a row;
- :mod:`.op`       the op-level sweep;  :mod:`.e2e` the end-to-end sweep;
- :mod:`.report`   JSON, markdown, PNG;  :mod:`.cli` the command line.
"""
