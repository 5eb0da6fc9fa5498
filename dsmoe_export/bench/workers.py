"""Generation runners in processes of their own, driven over a pipe (one JSON line each way).

Both runners of the generation benchmark run this way, so that neither shares its process with
the benchmark (its other sessions, torch, the exports' memory): onnxruntime-genai's generator in
the genai environment (genai_worker.py) and DSMoESession in this interpreter (runtime_worker.py).
Each worker keeps its models loaded for the whole run and times the generation itself.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


class PipeWorker:
    """A worker script run by `python`: one command per line on stdin, one JSON reply per line."""

    what = "worker"

    def __init__(self, python: str, script: str):
        self.proc = subprocess.Popen([python, str(Path(__file__).with_name(script))], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)

    def call(self, command: dict, where: str) -> dict:
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.what} died: {self.proc.stderr.read()[-2000:]}")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"{self.what} on {where}: {reply['error']}")
        return reply

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class GenaiWorker(PipeWorker):
    """onnxruntime-genai's generator in the side interpreter `python`."""

    what = "onnxruntime-genai worker"

    def __init__(self, python: str):
        super().__init__(python, "genai_worker.py")

    def generate(self, folder: Path, prompt: list[int], new_tokens: int) -> dict:
        """{"prefill_ms", "decode_ms", "new"}: greedy generation of `new_tokens` after `prompt`."""
        return self.call({"folder": str(folder), "prompt": prompt, "new": new_tokens}, str(folder))


class RuntimeWorker(PipeWorker):
    """DSMoESession (dsmoe_runtime) in a process of its own, with this interpreter."""

    what = "DSMoESession worker"

    def __init__(self, python: str | None = None):
        super().__init__(python or sys.executable, "runtime_worker.py")

    def generate(self, path: Path, prompt: list[int], new_tokens: int, *, threads: int, library: str | None,
                 dense: bool) -> dict:
        """{"prefill_ms", "decode_ms", "new"}: DSMoESession.stream over `path` (ONNX Runtime's
        default spinning, `threads` intra-op threads; `library` None for a model without the op)."""
        return self.call({"path": str(path), "prompt": prompt, "new": new_tokens, "threads": threads,
                          "library": library, "dense": dense}, str(path))
