"""The model folder format: layouts, shards, validation, transformers compatibility."""
from __future__ import annotations

import json

import pytest
import torch
import transformers
from transformers import LlamaForCausalLM

from dsmoe_export.checkpoint import INDEX_NAME, load_state_dict
from dsmoe_export.config import load_config
from dsmoe_export.errors import CheckpointError
from dsmoe_export.synthetic import TinySpec, make_model_folder, random_tensors


def _load(folder):
    cfg = load_config(folder)
    return load_state_dict(folder, cfg, with_routers=True)


@pytest.mark.parametrize("layout", [dict(split=True), dict(max_shard_bytes=20_000), dict(split=True, max_shard_bytes=9_000)])
def test_layouts_load_to_the_same_tensors(tmp_path, layout, seed):
    spec = TinySpec(dsmoe={"num_experts": 4})
    merged = _load(make_model_folder(tmp_path / "merged", spec, seed=seed))
    other_dir = make_model_folder(tmp_path / "other", spec, seed=seed, **layout)
    if "max_shard_bytes" in layout:
        assert (other_dir / INDEX_NAME).exists() and len(list(other_dir.glob("*.safetensors"))) > 1
    if layout.get("split"):
        names = json.loads((other_dir / INDEX_NAME).read_text())["weight_map"] if (other_dir / INDEX_NAME).exists() \
            else None
        assert names is None or "model.layers.0.mlp.experts.3.down_proj.weight" in names
    other = _load(other_dir)
    assert merged.keys() == other.keys()
    for k in merged:
        assert torch.equal(merged[k], other[k]), k


def test_split_expert_shapes_are_checked(tmp_path):
    folder = make_model_folder(tmp_path / "m", TinySpec(dsmoe={"num_experts": 4}), split=True)
    from safetensors.torch import load_file, save_file
    t = load_file(str(folder / "model.safetensors"))
    t["model.layers.1.mlp.experts.2.down_proj.weight"] = t["model.layers.1.mlp.experts.2.down_proj.weight"].T.contiguous()
    save_file(t, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"experts\.2\.down_proj\.weight: expected shape \[64, 48\], got \[48, 64\]"):
        _load(folder)


def test_index_naming_a_missing_shard(tmp_path):
    folder = make_model_folder(tmp_path / "m", TinySpec(), max_shard_bytes=20_000)
    next(folder.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match=INDEX_NAME.replace(".", r"\.") + r".*weight_map\..*missing"):
        _load(folder)


def test_folder_loads_in_transformers_as_plain_llama(tmp_path, seed):
    folder = make_model_folder(tmp_path / "m", TinySpec(), seed=seed)
    transformers.logging.set_verbosity_error()
    model = LlamaForCausalLM.from_pretrained(str(folder))
    sd = model.state_dict()
    tensors = random_tensors(TinySpec(), seed=seed)
    for name, t in tensors.items():
        if ".router." not in name:
            assert torch.equal(sd[name], t), name


def test_config_defaults_and_derivations(tmp_path):
    folder = make_model_folder(tmp_path / "m", TinySpec(hidden_act="gelu_pytorch_tanh", dsmoe={"num_experts": 8}))
    cfg = load_config(folder)
    assert cfg.head_dim == 16 and cfg.num_key_value_heads == 2 and cfg.block_size == 24
    d = cfg.dsmoe
    assert (d.threshold, d.rescale, d.weighting, d.router_bias, d.activation) == (0.5, True, "score", False, "gelu_tanh")


@pytest.mark.parametrize("changes, fragment", [
    (dict(num_key_value_heads=3), "num_key_value_heads"),
    (dict(hidden_size=63, head_dim=None), "head_dim"),
    (dict(hidden_act="relu"), "hidden_act"),
    (dict(model_type="gpt2"), "model_type"),
    (dict(mlp_bias=True), "mlp_bias"),
    (dict(dsmoe={"num_experts": 8, "weighting": "soft"}), "dsmoe.weighting"),
    (dict(dsmoe={"num_experts": 8, "rescale": "yes"}), "dsmoe.rescale: expected bool"),
    (dict(dsmoe=[8]), "dsmoe: expected an object"),
    (dict(vocab_size=-1), "vocab_size: expected >= 1"),
])
def test_config_errors_name_the_field(tmp_path, changes, fragment):
    folder = make_model_folder(tmp_path / "m", TinySpec())
    cfg = json.loads((folder / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as e:
        load_config(folder)
    assert str(e.value).startswith(str(folder / "config.json"))
    assert fragment in str(e.value)
