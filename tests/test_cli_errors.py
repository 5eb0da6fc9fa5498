"""Bad input: exit status 1, one line naming file, field and expectation, no traceback,
and an existing output file left byte-for-byte untouched."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from safetensors.numpy import load_file, save_file

from dsmoe_export.cli import main
from dsmoe_export.synthetic import TinySpec, make_model_folder

OLD = b"previous export, must survive"


def _edit_config(folder: Path, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (folder / "config.json").write_text(json.dumps(cfg))


def _edit_tensors(folder: Path, fn):
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    fn(tensors)
    save_file(tensors, str(path))


def _truncate(folder: Path):
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


BAD = {
    "missing folder": (lambda f: f.rename(f.with_name("gone")), ["model", "not a directory"]),
    "invalid json": (lambda f: (f / "config.json").write_text("{ not json"), ["config.json", "invalid JSON", "line 1"]),
    "no dsmoe block": (lambda f: _edit_config(f, dsmoe=None),
                       ["config.json", "dsmoe", "num_experts", "python -m dsmoe_export.convert", "--dense"]),
    "n < 1": (lambda f: _edit_config(f, dsmoe={"num_experts": 0}), ["config.json", "dsmoe.num_experts", ">= 1"]),
    "n not an int": (lambda f: _edit_config(f, dsmoe={"num_experts": "8"}), ["dsmoe.num_experts", "expected int"]),
    "indivisible": (lambda f: _edit_config(f, dsmoe={"num_experts": 7}),
                    ["config.json", "dsmoe.num_experts", "192", "not divisible"]),
    "threshold out of range": (lambda f: _edit_config(f, dsmoe={"num_experts": 8, "threshold": 1.5}),
                               ["dsmoe.threshold", "[0, 1]"]),
    "missing router": (lambda f: _edit_tensors(f, lambda t: t.pop("model.layers.1.mlp.router.weight")),
                       ["model.layers.1.mlp.router.weight", "missing", "[8, 64]"]),
    "ill-shaped router": (lambda f: _edit_tensors(f, lambda t: t.update({
        "model.layers.0.mlp.router.weight": t["model.layers.0.mlp.router.weight"][:4]})),
        ["model.safetensors", "model.layers.0.mlp.router.weight", "expected shape [8, 64]", "[4, 64]"]),
    "integer router": (lambda f: _edit_tensors(f, lambda t: t.update({
        "model.layers.0.mlp.router.weight": t["model.layers.0.mlp.router.weight"].astype("int32")})),
        ["model.layers.0.mlp.router.weight", "floating-point"]),
    "truncated safetensors": (_truncate, ["model.safetensors", "not a readable safetensors"]),
    "pickle only": (lambda f: (f / "model.safetensors").rename(f / "pytorch_model.bin"),
                    ["model", "pytorch_model.bin", "never loaded"]),
    "unsupported rope": (lambda f: _edit_config(f, rope_scaling={"rope_type": "yarn", "factor": 2.0}),
                         ["config.json", "rope_scaling.rope_type", "yarn"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_model_folder_is_refused(tmp_path, capsys, case):
    folder = make_model_folder(tmp_path / "model", TinySpec())
    out = tmp_path / "out.onnx"
    out.write_bytes(OLD)
    mutate, expected = BAD[case]
    mutate(folder)
    assert main([str(folder), str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    line = err[0]
    assert line.startswith("dsmoe-export: error: ")
    for fragment in expected:
        assert fragment in line, (fragment, line)
    assert "Traceback" not in line
    assert out.read_bytes() == OLD
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out.onnx", "gone" if case == "missing folder" else "model"])


@pytest.mark.parametrize("case", ["missing parent", "parent is a file", "is a directory", "read-only folder"])
def test_unwritable_output_is_refused(tmp_path, capsys, case):
    folder = make_model_folder(tmp_path / "model", TinySpec(num_hidden_layers=1))
    if case == "missing parent":
        out = tmp_path / "nope" / "m.onnx"
    elif case == "parent is a file":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "m.onnx"
    elif case == "is a directory":
        out = tmp_path / "dir.onnx"
        out.mkdir()
    else:
        if os.geteuid() == 0:
            pytest.skip("root ignores directory permissions")
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        out = ro / "m.onnx"
    assert main([str(folder), str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(out) in err[0], err


def test_a_gguf_file_is_pointed_to_the_converter(tmp_path, capsys):
    gguf = tmp_path / "model.Q4_1.gguf"
    gguf.write_bytes(b"GGUF")
    assert main([str(gguf), str(tmp_path / "m.onnx")]) == 1
    err = capsys.readouterr().err.strip()
    assert str(gguf) in err and "not a directory" in err and "python -m dsmoe_export.convert FILE.gguf" in err
    assert not (tmp_path / "m.onnx").exists()


def test_debug_flag_shows_traceback(tmp_path):
    with pytest.raises(Exception, match="not a directory"):
        main([str(tmp_path / "missing"), str(tmp_path / "m.onnx"), "--debug"])


def test_failed_validation_leaves_nothing(tmp_path, capsys, monkeypatch):
    """A failing post-export check removes the staged file and keeps the old one."""
    from dsmoe_export import exporter
    from dsmoe_export.validate import ValidationReport

    folder = make_model_folder(tmp_path / "model", TinySpec(num_hidden_layers=1))
    out = tmp_path / "m.onnx"
    out.write_bytes(OLD)
    monkeypatch.setattr(exporter, "validate_export",
                        lambda model, path: ValidationReport(1.0, 0.5, "prefill logits", 3))
    assert main([str(folder), str(out), "--dense"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "validation failed" in err[-1] and "0.5" in err[-1]
    assert out.read_bytes() == OLD
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "model"]


def test_bad_down_layout_is_refused(tmp_path, capsys):
    """An unknown down_weight layout: the CLI's choices, and the API's ExportError naming the
    output file, before anything is loaded or written."""
    from dsmoe_export.errors import ExportError
    from dsmoe_export.exporter import export

    out = tmp_path / "model.onnx"
    with pytest.raises(SystemExit):
        main([str(tmp_path), str(out), "--down-layout", "columns"])
    assert "--down-layout" in capsys.readouterr().err
    with pytest.raises(ExportError, match=r"model\.onnx.*down_layout must be one of auto, rows, tiled, got 'columns'"):
        export(tmp_path / "no-such-folder", out, down_layout="columns")
    assert list(tmp_path.iterdir()) == []


def test_bad_gate_up_layout_is_refused(tmp_path, capsys):
    """An unknown gate/up layout, and slabs for a float16 graph (the CUDA EP's kernel reads rows):
    the CLI's choices, and the API's ExportError naming the output file, before anything is
    loaded or written."""
    from dsmoe_export.errors import ExportError
    from dsmoe_export.exporter import export

    out = tmp_path / "model.onnx"
    with pytest.raises(SystemExit):
        main([str(tmp_path), str(out), "--gate-up-layout", "columns"])
    assert "--gate-up-layout" in capsys.readouterr().err
    with pytest.raises(ExportError, match=r"model\.onnx.*gate_up_layout must be one of auto, rows, slabs, got 'cols'"):
        export(tmp_path / "no-such-folder", out, gate_up_layout="cols")
    with pytest.raises(ExportError, match=r"model\.onnx.*--gate-up-layout slabs is for float32 graphs.*float16"):
        export(tmp_path / "no-such-folder", out, gate_up_layout="slabs", dtype="float16")
    assert list(tmp_path.iterdir()) == []
