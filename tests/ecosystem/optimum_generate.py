"""Run in an environment with optimum-onnx (see scripts/setup-ecosystem.sh):
greedy generation with optimum's ORTModelForCausalLM and the DSMoE op library.

    python optimum_generate.py FOLDER FILE_NAME LIBRARY '{"input_ids": [[...]], "attention_mask": [[...]]}' N

prints the generated ids (prompt + new) as JSON. This is the snippet of docs/runtime.md.
"""
import json
import sys

import onnxruntime as ort
import torch
from optimum.onnxruntime import ORTModelForCausalLM

folder, file_name, library, prompt, n = sys.argv[1:6]
prompt = json.loads(prompt)

opts = ort.SessionOptions()
opts.register_custom_ops_library(library)
model = ORTModelForCausalLM.from_pretrained(folder, file_name=file_name, session_options=opts,
                                            provider="CPUExecutionProvider")
out = model.generate(input_ids=torch.tensor(prompt["input_ids"]),
                     attention_mask=torch.tensor(prompt["attention_mask"]),
                     max_new_tokens=int(n), do_sample=False, pad_token_id=0, eos_token_id=None)
print(json.dumps({"ids": out.tolist(), "providers": model.model.get_providers()}))
