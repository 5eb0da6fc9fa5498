"""Run where onnxruntime-genai imports (see scripts/setup-ecosystem.sh): greedy generation
with og.Model over a folder whose genai_config.json names the DSMoE op library.

    python genai_generate.py FOLDER '[[ids of row 0], [ids of row 1], ...]' N

prints the new ids per row as JSON (rows of equal length: no padding).
"""
import json
import sys

import numpy as np
import onnxruntime_genai as og

folder, prompts, n = sys.argv[1], np.array(json.loads(sys.argv[2]), dtype=np.int32), int(sys.argv[3])
model = og.Model(folder)
params = og.GeneratorParams(model)
params.set_search_options(max_length=prompts.shape[1] + n, do_sample=False, batch_size=prompts.shape[0])
generator = og.Generator(model, params)
generator.append_tokens(prompts)
new = []
while not generator.is_done():
    generator.generate_next_token()
    new.append(generator.get_next_tokens().tolist())
print(json.dumps({"new": np.array(new).T.tolist(), "version": og.__version__}))
