"""Resolve what ``--model`` names into a ModelSpec, and stream its weights.

A model is the embedded default (``None``), a Hugging Face-format directory, or, with
``load_format="dummy"``, a named shape (kvgrid.models.shapes) or a directory whose
config.json is used with random weights. The fingerprint names weights and config
exactly: it goes into every KV block key, so two models never share cached KV.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kvgrid.models.config import ModelConfig, ModelError
from kvgrid.models.default import ensure_default_model, kvgrid_home
from kvgrid.models.shapes import SHAPES, shape_dict, shape_names

if TYPE_CHECKING:
    import torch

    from kvgrid.models.tokenizer import Tokenizer

LOAD_FORMATS = ("auto", "dummy")
# LlamaForCausalLM.init_dummy's scheme: 1 was N(0, 0.02) everywhere, 2 is scale-preserving
DUMMY_INIT_VERSION = 2
_INDEX = "model.safetensors.index.json"
_FP_PERSON = b"kvgrid-model-v1"
_HASH_CACHE = "file_hashes.json"
_CHUNK = 16 * 1024 * 1024


@dataclass(frozen=True)
class ModelSpec:
    name: str  # served model name (dir basename, or shape name for dummy)
    config: ModelConfig
    path: Path | None  # None for a dummy shape; a dummy from a directory keeps its path
    fingerprint: str  # hex string identifying weights+config (goes into KVScope)
    load_format: str  # "auto" | "dummy"


def resolve_model(model: str | None, load_format: str = "auto", seed: int = 0) -> ModelSpec:
    if load_format not in LOAD_FORMATS:
        raise ModelError(f"unknown load format {load_format!r}; choose one of {LOAD_FORMATS}")
    if load_format == "dummy":
        return _resolve_dummy(model, seed)
    path = ensure_default_model() if model is None else Path(model).expanduser()
    if not path.exists():
        hint = ""
        if str(model).lower() in SHAPES:
            hint = f"; {model!r} is a dummy shape name: add --load-format dummy"
        raise ModelError(f"model path {str(model)!r} does not exist{hint}")
    if not path.is_dir():
        raise ModelError(f"model path {str(path)!r} is not a directory")
    path = path.resolve()
    weight_files(path)  # names any missing file before anything is read
    if not (path / "tokenizer.json").is_file():
        raise ModelError(f"model directory {str(path)!r} has no tokenizer.json")
    config = ModelConfig.from_dir(path)
    return ModelSpec(path.name, config, path, model_fingerprint(path), "auto")


def _resolve_dummy(model: str | None, seed: int) -> ModelSpec:
    path: Path | None = None
    if model is None:
        path = ensure_default_model()
    elif model.lower() in SHAPES:
        name, cfg = model.lower(), shape_dict(model)
    elif Path(model).expanduser().is_dir():
        path = Path(model).expanduser().resolve()
    else:
        raise ModelError(
            f"dummy model {model!r} is neither a known shape ({', '.join(shape_names())}) "
            "nor a directory with a config.json"
        )
    if path is not None:
        name = path.name
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise ModelError(f"no config.json in model directory {str(path)!r}")
        try:
            cfg = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as e:
            raise ModelError(f"{cfg_file} is not valid JSON: {e}") from None
    config = ModelConfig.from_hf_dict(cfg)
    # the init scheme's version too: a new scheme makes new weights, so new KV block keys
    blob = json.dumps(
        ["dummy", cfg, seed, DUMMY_INIT_VERSION], sort_keys=True, separators=(",", ":")
    )
    fingerprint = hashlib.sha256(_FP_PERSON + blob.encode()).hexdigest()
    return ModelSpec(name, config, path, fingerprint, "dummy")


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a model directory, checked to exist."""
    if not (path / "config.json").is_file():
        raise ModelError(f"model directory {str(path)!r} has no config.json")
    index = path / _INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ModelError(f"{index} is not a valid safetensors index: {e!r}") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (path / f).is_file()]
        if missing:
            raise ModelError(f"{index.name} names missing weight files: {', '.join(missing)}")
        return [path / f for f in files]
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    found = sorted(path.glob("*.safetensors"))
    if len(found) == 1:
        return found
    if found:
        raise ModelError(f"{str(path)!r} has several .safetensors files but no {_INDEX}")
    raise ModelError(
        f"model directory {str(path)!r} has no model.safetensors (or sharded *.safetensors "
        f"with {_INDEX}); .bin/.pt checkpoints are not supported"
    )


def iter_weights(spec: ModelSpec) -> Iterator[tuple[str, torch.Tensor]]:
    """HF-named tensors on the CPU, in the dtype they are stored in, one file at a time."""
    if spec.load_format == "dummy" or spec.path is None:
        raise ModelError(f"{spec.name!r} is loaded with random weights; it has no weight files")
    from safetensors import safe_open

    for f in weight_files(spec.path):
        with safe_open(str(f), framework="pt", device="cpu") as st:
            for name in st.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                yield name, st.get_tensor(name)


def load_tokenizer(spec: ModelSpec) -> Tokenizer | None:
    """The model's tokenizer; None for a dummy shape (prompts are then token ids)."""
    if spec.path is None or not (spec.path / "tokenizer.json").is_file():
        return None
    from kvgrid.models.tokenizer import Tokenizer

    return Tokenizer.from_dir(spec.path)


def model_fingerprint(path: Path) -> str:
    """SHA-256 over config.json and the full content of every weight file.

    File digests are cached by (absolute path, size, mtime_ns), so re-serving a model does
    not re-read its weights.
    """
    path = Path(path).resolve()
    h = hashlib.sha256(_FP_PERSON)
    cfg = (path / "config.json").read_bytes()
    h.update(len(cfg).to_bytes(8, "little") + cfg)
    for f in weight_files(path):
        name = f.name.encode()
        h.update(len(name).to_bytes(8, "little") + name + bytes.fromhex(file_sha256(f)))
    return h.hexdigest()


def _hash_cache_path() -> Path:
    return kvgrid_home() / _HASH_CACHE


def _read_hash_cache() -> dict[str, str]:
    try:
        data = json.loads(_hash_cache_path().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def file_sha256(f: Path) -> str:
    st = f.stat()
    key = f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    cached = _read_hash_cache().get(key)
    if isinstance(cached, str) and len(cached) == 64:
        return cached
    h = hashlib.sha256()
    with open(f, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    digest = h.hexdigest()
    _store_hash(key, digest)
    return digest


def _store_hash(key: str, digest: str) -> None:
    # The cache is only an optimisation: failing to write it must not fail a model load.
    try:
        cache_file = _hash_cache_path()
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        cache = _read_hash_cache()  # re-read: another process may have added entries
        cache[key] = digest
        if len(cache) > 4096:  # entries of files long gone; keep the newest
            cache = dict(list(cache.items())[-2048:])
        fd, tmp = tempfile.mkstemp(prefix=".hashes-", dir=cache_file.parent)
        with os.fdopen(fd, "w") as out:
            json.dump(cache, out, indent=0)
        os.replace(tmp, cache_file)
    except OSError:
        pass
