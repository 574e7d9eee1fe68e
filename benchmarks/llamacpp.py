"""llama.cpp through llama-cpp-python (the optional `bench` extra) as the outside anchor.

The GGUF converter is the one shipped inside the llama-cpp-python sdist: it is fetched into runs/
(git-ignored, never committed) and run with our zoo tokenizer declared as the "gpt-2" pre-tokenizer
(llama.cpp does not know its hash). q4_0 comes from llama.cpp's own quantizer (llama_model_quantize).
"""
from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT

VERSION = "0.3.36"
SRC = ROOT / "runs" / "llamacpp-src"
TREE = SRC / f"llama_cpp_python-{VERSION}" / "vendor" / "llama.cpp"

DRIVER = """
import sys
sys.path[:0] = [{tree!r}, {tree!r} + "/gguf-py"]
import conversion.base as base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
import convert_hf_to_gguf as conv
sys.argv = ["convert", {src!r}, "--outfile", {out!r}, "--outtype", {outtype!r}]
conv.main()
"""


def available() -> bool:
    try:
        import llama_cpp  # noqa: F401
        return True
    except ImportError:
        return False


def ensure_converter() -> None:
    if (TREE / "convert_hf_to_gguf.py").exists():
        return
    SRC.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={VERSION}", "--no-deps",
                    "--no-binary", ":all:", "-d", str(SRC), "-q"], check=True)
    subprocess.run(["tar", "xzf", f"llama_cpp_python-{VERSION}.tar.gz", "--wildcards",
                    f"llama_cpp_python-{VERSION}/vendor/llama.cpp/convert_hf_to_gguf.py",
                    f"llama_cpp_python-{VERSION}/vendor/llama.cpp/gguf-py/*",
                    f"llama_cpp_python-{VERSION}/vendor/llama.cpp/conversion/*"], cwd=SRC, check=True)


def to_gguf(hf_dir: Path, out: Path, outtype: str) -> Path:
    """outtype: f32 | q8_0 (converter) | q4_0 (llama.cpp's quantizer from the f32 file)."""
    if out.exists():
        return out
    if outtype == "q4_0":
        import llama_cpp
        f32 = to_gguf(hf_dir, out.with_name(out.stem + "-f32.gguf"), "f32")
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
        params.nthread = 2
        rc = llama_cpp.llama_model_quantize(str(f32).encode(), str(out).encode(), params)
        if rc != 0:
            raise RuntimeError(f"llama_model_quantize failed ({rc})")
        return out
    ensure_converter()
    code = DRIVER.format(tree=str(TREE), src=str(hf_dir), out=str(out), outtype=outtype)
    subprocess.run([sys.executable, "-c", code], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return out


def decode_tok_s(gguf: Path, prompt: list[int], new_tokens: int, threads: int = 2, reps: int = 2) -> float:
    """Greedy decode tokens/s at batch 1, prompt processing excluded."""
    import llama_cpp
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=len(prompt) + new_tokens + 8, n_threads=threads,
                          n_threads_batch=threads, verbose=False)
    runs = []
    for _ in range(reps + 1):                          # the first run warms up
        llm.reset()
        gen = llm.generate(prompt, temp=0.0, top_k=1, reset=True)
        next(gen)                                      # prompt processed, first token out
        t = time.perf_counter()
        for i, _tok in enumerate(gen, 1):
            if i >= new_tokens - 1:
                break
        runs.append((new_tokens - 1) / (time.perf_counter() - t))
    return statistics.median(runs[1:])
