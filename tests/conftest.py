"""Shared fixtures. Keep each one small and documented; group them by part."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

# ---- isolation --------------------------------------------------------------------------

_STORE_DIR = tempfile.TemporaryDirectory(prefix="kvgrid-test-store-")


def pytest_configure(config: pytest.Config) -> None:
    # Context stores that commands open by default (G3, the local master key) live in a
    # throwaway folder, never in the user's cache: tests neither read nor leave state there.
    # Worker processes the tests start inherit it.
    os.environ["KVGRID_STORE_DIR"] = _STORE_DIR.name


# ---- models ---------------------------------------------------------------------------

# Files of the default model's tokenizer that tiny test models reuse.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

# Tiny random models, one per supported architecture (plus variants the decoder treats
# differently). Keys are the `arch` argument of `tiny_hf_model` / `tiny_model_dir`.
TINY_ARCHS = ("llama", "llama-tied", "llama-rope-scaled", "mistral", "qwen2", "qwen3")


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The embedded default model, converted once into the user's kvgrid cache (as a user
    gets it), so the conversion is paid once across test runs."""
    from kvgrid.models.default import ensure_default_model

    return ensure_default_model(progress=False)


def _tiny_config(arch: str, vocab_size: int):
    import transformers

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        tie_word_embeddings=False,
    )
    if arch == "llama":
        return transformers.LlamaConfig(**common, rope_theta=10000.0)
    if arch == "llama-tied":
        return transformers.LlamaConfig(**dict(common, tie_word_embeddings=True))
    if arch == "llama-rope-scaled":
        rope = {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
        return transformers.LlamaConfig(**common, rope_parameters=rope)
    if arch == "mistral":
        return transformers.MistralConfig(**common, sliding_window=None, rope_theta=1e6)
    if arch == "qwen2":
        return transformers.Qwen2Config(**common, use_sliding_window=False, rope_theta=1e6)
    if arch == "qwen3":
        return transformers.Qwen3Config(
            **common, use_sliding_window=False, attention_bias=False, rope_theta=1e6
        )
    raise ValueError(f"unknown tiny arch {arch!r}; choose one of {TINY_ARCHS}")


def _randomise(model, seed: int) -> None:
    """Weights that make every tensor matter: norms away from 1, biases away from 0, and
    logits of order 1 (so greedy choices are not near-ties decided by rounding)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.ndim == 1:  # RMSNorm weights and biases
                base = 0.0 if name.endswith("bias") else 1.0
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)


def tiny_hf_model(
    tmp_path_factory: pytest.TempPathFactory,
    arch: str,
    seed: int = 0,
    tokenizer_dir: Path | None = None,
) -> Path:
    """Build a tiny random HF model directory (float32 safetensors + the tokenizer files of
    `tokenizer_dir`, by default the default model's) for `arch` in TINY_ARCHS; its path."""
    import torch
    import transformers

    from kvgrid.models.default import ensure_default_model

    tok_dir = tokenizer_dir or ensure_default_model(progress=False)
    config = _tiny_config(arch, vocab_size=49152)
    config.architectures = [type(config).__name__.replace("Config", "ForCausalLM")]
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomise(model, seed)
    if config.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    out = tmp_path_factory.mktemp(f"tiny-{arch}")
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        shutil.copy(tok_dir / name, out / name)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path):
    """Factory: ``tiny_model_dir(arch) -> Path``, each arch built once per session."""
    built: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in built:
            built[arch] = tiny_hf_model(tmp_path_factory, arch, tokenizer_dir=default_model_dir)
        return built[arch]

    return get


# ---- engine ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def default_llm(default_model_dir):
    """One engine on the embedded default model, shared by the tests that only read from it."""
    from kvgrid import LLM

    return LLM(str(default_model_dir))


# ---- store ----------------------------------------------------------------------------

REDIS_SERVER = "/usr/bin/redis-server"
_redis_install_tried = False


def _redis_binary() -> str | None:
    """The redis-server binary; installs Debian's package once if it is missing."""
    import subprocess

    global _redis_install_tried
    if shutil.which(REDIS_SERVER) or shutil.which("redis-server"):
        return shutil.which(REDIS_SERVER) or shutil.which("redis-server")
    if not _redis_install_tried:
        _redis_install_tried = True
        subprocess.run(["apt-get", "install", "-y", "redis-server"], capture_output=True)
    return shutil.which(REDIS_SERVER) or shutil.which("redis-server")


def _start_redis(workdir: Path, *extra: str):
    """A real redis-server on 127.0.0.1 at a free port, no persistence: (process, url).
    ``extra``: more server arguments (``--requirepass``, ...)."""
    import socket
    import warnings

    from kvgrid.chaos.redis_server import start_redis

    if _redis_binary() is None:
        msg = "redis-server is not installed and `apt-get install -y redis-server` failed"
        warnings.warn(f"SKIPPING Redis tests: {msg}", stacklevel=2)
        pytest.skip(f"SKIPPED LOUDLY: {msg}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return start_redis(port, workdir, extra=extra), f"redis://127.0.0.1:{port}/0"


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory):
    """URL of a real Redis server for the whole session (tests use distinct key prefixes)."""
    proc, url = _start_redis(tmp_path_factory.mktemp("redis"))
    yield url
    proc.kill()
    proc.wait()


@pytest.fixture
def redis_factory(tmp_path: Path):
    """Start private Redis servers a test may kill: ``proc, url = redis_factory()``
    (arguments: more server arguments)."""
    procs = []

    def start(*extra: str):
        proc, url = _start_redis(tmp_path / f"redis{len(procs)}", *extra)
        procs.append(proc)
        return proc, url

    yield start
    for p in procs:
        p.kill()
        p.wait()


@pytest.fixture
def tmpfs(tmp_path: Path):
    """Mount small real filesystems a test can fill or make read-only:
    ``path = tmpfs(size_bytes)`` (see kvgrid.chaos.disk for filling and remounting).
    Needs root (CI runs as root); skips loudly where mounting is not permitted."""
    import warnings

    from kvgrid.chaos import disk

    mounts: list[Path] = []

    def mount(size: int) -> Path:
        p = tmp_path / f"fs{len(mounts)}"
        try:
            disk.mount_tmpfs(p, size)
        except disk.MountError as e:
            warnings.warn(f"SKIPPING: {e}", stacklevel=2)
            pytest.skip(f"SKIPPED LOUDLY: {e}")
        mounts.append(p)
        return p

    yield mount
    for p in reversed(mounts):
        disk.unmount(p)


# ---- server ---------------------------------------------------------------------------

API_KEY = "sk-agent-tests"


@pytest.fixture(scope="session")
def api_server(default_model_dir, tmp_path_factory):
    """One `kvgrid serve` (one worker, the default model) shared by the API tests:
    ``(url, headers)`` of a tenant with an API key."""
    import json

    from tests.support.live_server import serve

    env = {
        "KVGRID_API_KEYS": json.dumps({"keys": {API_KEY: "agents"}}),
        "KVGRID_SERVER_SECRET": "test-secret",
        "KVGRID_LOG": "WARNING",
    }
    args = ["--model", str(default_model_dir), "--max-model-len", "2048"]
    args += ["--kv-cache-memory-gb", "0.5", "--threads", "2"]
    log = tmp_path_factory.mktemp("api-serve") / "serve.log"
    with serve(args, log, env) as url:
        yield url, {"Authorization": f"Bearer {API_KEY}"}
