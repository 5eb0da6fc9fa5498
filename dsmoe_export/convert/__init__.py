"""The dense -> DSMoE converter: ``python -m dsmoe_export.convert DENSE OUT_DIR ...`` (docs/conversion.md).

Modules, one job each:

- :mod:`.source`    the dense folder or GGUF file -> LLaMA-format config and tensors; the model;
- :mod:`.text`      text -> token windows, the forward pass, perplexity, the FFN inputs on a text;
- :mod:`.regroup`   block contributions, co-activation regrouping of FFN neurons;
- :mod:`.routers`   random and fitted routers, bias shifts to a target, per-layer allocation;
- :mod:`.training`  router (and expert) training with the straight-through estimator;
- :mod:`.pipeline`  the conversion step by step, and the dense baseline;
- :mod:`.report`    calibration.md/.json/.png;  :mod:`.cli` the command line.

Everything runs on the CPU in float32 with the project's PyTorch reference (`modeling.DSMoEForCausalLM`);
randomness comes from explicit seeded generators, so a run is reproducible for a given seed and thread count.
"""
from .cli import build_parser, main
from .pipeline import ConvertOptions, convert, dense_baseline
from .report import report_markdown, write_report
from .routers import random_routers
from .source import SUPPORTED_TYPES, DenseModel, build_model, load_dense, map_config

__all__ = ["ConvertOptions", "DenseModel", "SUPPORTED_TYPES", "build_model", "build_parser", "convert",
           "dense_baseline", "load_dense", "main", "map_config", "random_routers", "report_markdown", "write_report"]
