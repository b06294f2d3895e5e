"""The tiny model's relatives, generated offline: an embedding model and LoRA adapters for it.

No hub is reachable, so embeddings and LoRA are tested on models made here, like the tiny chat model
(``arks_ray.local.tinymodel``):

- ``ensure_tiny_embedding_model``: the tiny Qwen2's weights as a ``Qwen2Model`` checkpoint, which
  vLLM serves as a pooling model (``runner: pooling``,
  ``convert: embed``): one vector of ``EMBEDDING_DIM`` floats per input;
- ``ensure_tiny_lora``: a PEFT LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``)
  on the chat model's attention projections, with seeded non-zero weights, so that a greedy answer with
  the adapter differs from the base model's: a test can tell whether the adapter was applied.

Callers: the local runner (``ensure_local_models``), the end-to-end tests and the LoRA benchmark. Same
seed, same bytes; directories are built in a temporary sibling and renamed into place, under a lock.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from arks_ray.local import tinymodel
from arks_ray.models.disk import exclusive_lock

EMBED_MODEL_NAME = "arks-tiny-qwen2-embed"
LORA_NAME = "arks-tiny-qwen2-lora"
EMBEDDING_DIM = 128  # the tiny model's hidden size
LORA_RANK = 8
LORA_TARGETS = ("q_proj", "v_proj")
_RECIPE_VERSION = 1
_LORA_STD = 0.3  # large against the base's 0.02: the adapter must change greedy outputs


def _build_once(target: Path, lock_name: str, write: Callable[[Path], None]) -> Path:
    """``target``, written by ``write`` into a temporary sibling and renamed, once across processes."""
    if (target / ".complete").is_file():
        return target
    root = target.parent
    root.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(root / lock_name):
        if (target / ".complete").is_file():
            return target
        shutil.rmtree(target, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{target.name}.tmp-"))
        try:
            write(tmp)
            (tmp / ".complete").write_text("")
            for child in tmp.iterdir():
                child.chmod(0o644)
            tmp.chmod(0o755)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def _root(cache_dir: Path | None) -> Path:
    return Path(cache_dir) if cache_dir is not None else tinymodel._default_cache_dir()


def ensure_tiny_embedding_model(cache_dir: Path | None = None, *, seed: int = 0) -> Path:
    """The directory of the tiny embedding model for ``seed``, generated if absent."""
    root = _root(cache_dir)
    base = tinymodel.ensure_tiny_model(root, seed=seed)
    target = root / f"{EMBED_MODEL_NAME}-v{_RECIPE_VERSION}-seed{seed}"

    def write(out: Path) -> None:
        # vLLM serves Qwen2Model as Qwen2ForCausalLM converted to an embedding model (its weights keep
        # the "model." prefix); tied embeddings mean there is no head to leave out.
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "model.safetensors"):
            shutil.copyfile(base / name, out / name)
        config = json.loads((base / "config.json").read_text())
        config["architectures"] = ["Qwen2Model"]
        (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    return _build_once(target, f".{EMBED_MODEL_NAME}.lock", write)


def ensure_tiny_lora(cache_dir: Path | None = None, *, seed: int = 1, base_seed: int = 0) -> Path:
    """The directory of a LoRA adapter (rank ``LORA_RANK`` on q/v projections) for the tiny chat model."""
    root = _root(cache_dir)
    base = tinymodel.ensure_tiny_model(root, seed=base_seed)
    target = root / f"{LORA_NAME}-v{_RECIPE_VERSION}-base{base_seed}-seed{seed}"

    def write(out: Path) -> None:
        import torch
        from safetensors.torch import save_file

        config = json.loads((base / "config.json").read_text())
        hidden = int(config["hidden_size"])
        head_dim = hidden // int(config["num_attention_heads"])
        outputs = {"q_proj": hidden, "v_proj": int(config["num_key_value_heads"]) * head_dim}
        gen = torch.Generator(device="cpu").manual_seed(seed)
        weights = {}
        for layer in range(int(config["num_hidden_layers"])):
            for proj in LORA_TARGETS:
                prefix = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
                a = torch.randn(LORA_RANK, hidden, generator=gen) * _LORA_STD
                b = torch.randn(outputs[proj], LORA_RANK, generator=gen) * _LORA_STD
                weights[f"{prefix}.lora_A.weight"] = a.to(torch.bfloat16)
                weights[f"{prefix}.lora_B.weight"] = b.to(torch.bfloat16)
        save_file(weights, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
        adapter_config = {
            "base_model_name_or_path": str(base), "bias": "none", "fan_in_fan_out": False,
            "inference_mode": True, "lora_alpha": 2 * LORA_RANK, "lora_dropout": 0.0,
            "modules_to_save": None, "peft_type": "LORA", "r": LORA_RANK,
            "target_modules": list(LORA_TARGETS), "task_type": "CAUSAL_LM", "use_dora": False,
            "use_rslora": False,
        }
        (out / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")

    return _build_once(target, f".{LORA_NAME}.lock", write)
