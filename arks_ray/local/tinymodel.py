"""A tiny, deterministic Qwen2-architecture model, generated offline.

No model hub is reachable from CI or the demo machine, yet the serving path (Ray Serve + vLLM CPU)
needs a real Hugging Face model directory. ``ensure_tiny_model`` builds one from nothing: a byte-level
BPE tokenizer (vocab 2048) trained on a small English corpus embedded below, and seeded random Qwen2
weights (2 layers, hidden 128, head_dim 64, tied embeddings; 1.2 MB of bfloat16). It talks gibberish,
but vLLM CPU and ``transformers`` load it, chat-template it and stream from it like any Qwen2
checkpoint, and the same seed always gives byte-identical ``model.safetensors`` and ``tokenizer.json``.

Callers: the local demo, the end-to-end tests and their fixtures, and people at a shell through
``python -m arks_ray.local.tinymodel [--cache-dir DIR] [--seed N]``, which prints the model directory.

Nothing happens at import time; torch, safetensors and tokenizers are imported inside the functions
that need them, so importing this module is cheap.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from arks_ray.models.disk import exclusive_lock, fsync_dir

if TYPE_CHECKING:
    import torch
    from tokenizers import Tokenizer

__all__ = ["DEFAULT_CACHE_DIR", "TINY_MODEL_NAME", "ensure_tiny_model", "main"]

TINY_MODEL_NAME = "arks-tiny-qwen2"

# Bump when anything below changes what gets written: it is part of the directory name, so an old
# cache entry is never mistaken for the new recipe.
_RECIPE_VERSION = 1

_CACHE_ENV = "ARKS_RAY_CACHE"


def _default_cache_dir() -> Path:
    """``${ARKS_RAY_CACHE:-~/.cache/arks-ray}/models``, read from the environment now."""
    root = os.environ.get(_CACHE_ENV) or "~/.cache/arks-ray"
    return Path(root).expanduser() / "models"


# The value at import time. ``ensure_tiny_model(None)`` re-reads the environment at call time, so a
# test or launcher that sets ARKS_RAY_CACHE after import still gets what it asked for.
DEFAULT_CACHE_DIR: Path = _default_cache_dir()

# --- the model -------------------------------------------------------------------------------------

_VOCAB_SIZE = 2048
_HIDDEN_SIZE = 128
_NUM_HEADS = 2  # head_dim 64: vLLM's CPU attention takes 32, 64, 80, ... (16 is rejected)
_NUM_KV_HEADS = 2
_INTERMEDIATE_SIZE = 256
_NUM_LAYERS = 2
_MAX_POSITIONS = 2048
_ROPE_THETA = 10000.0
_RMS_NORM_EPS = 1e-6
_INIT_STD = 0.02
# vLLM CPU computes in bfloat16 by default (it downcasts float32 checkpoints anyway), and bfloat16
# halves the file. transformers runs bfloat16 on CPU too.
_DTYPE = "bfloat16"

_ENDOFTEXT = "<|endoftext|>"
_IM_START = "<|im_start|>"
_IM_END = "<|im_end|>"
# Trained first, so they get ids 0, 1, 2.
_SPECIAL_TOKENS = (_ENDOFTEXT, _IM_START, _IM_END)
# Qwen2's pre-tokenizer split (transformers/models/qwen2/tokenization_qwen2.py): letters-words,
# single digits, punctuation runs, newlines, whitespace.
_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"""
    r"""|\s+(?!\S)|\s+"""
)

# Qwen2.5-style ChatML, without tools and without the default system prompt (short prompts matter on
# a 2-core box). ``content`` may be None for assistant turns that only carried tool calls.
_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + (message['content'] or '') + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)

_REQUIRED_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)

# A small English corpus for the BPE trainer. Written for this module; what matters is that it is
# varied enough to yield ~1800 merges, so common words are single tokens and prompts stay short.
_CORPUS = """\
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
Every morning the baker opens the small shop on the corner of the street, and the smell of fresh bread
drifts down the road toward the river. Children walk to school in pairs, talking about games, homework,
and the dog that barked at them yesterday. The teacher writes the date on the board and asks who has
finished reading the chapter about the history of the city.

Once upon a time there was a little village at the edge of a great forest. The people who lived there
were farmers and weavers, and in the evenings they would gather around the fire to tell stories. The
oldest woman in the village knew the most stories of all. She told them about the king who lost his
crown in the lake, about the clever girl who tricked the giant, and about the river that ran backwards
for one whole night every hundred years.

Science is the patient work of asking questions and testing answers against the world. A good
experiment changes one thing at a time and measures what happens. Water boils at one hundred degrees
Celsius at sea level, but at lower temperatures on a high mountain, because the air pressure is lower.
Light travels faster than sound, which is why we see the lightning before we hear the thunder. The Earth
turns once a day and travels around the Sun once a year, while the Moon goes around the Earth about once
a month.

Computers follow instructions written by people. A program is a list of steps: read the input, compute
something useful, and write the output. Servers answer requests from clients over the network, and a
good server answers quickly, handles errors gracefully, and never loses data. When many users send
requests at the same time, the system must schedule the work fairly, limit the rate of each user, and
scale out by adding more machines. Logs, metrics, and traces help engineers understand what the system
is doing and why it is slow.

Language models read text as a sequence of tokens and predict the next token, one at a time. A model is
trained on a large amount of text, and then it can answer questions, write summaries, translate between
languages, and help people write code. Serving a model means loading its weights into memory, receiving
prompts, running the model on batches of requests, and streaming the generated tokens back to the user.
The cache of keys and values grows with the length of the conversation, so memory is often the limit.

Hello! How are you today? I am fine, thank you. What would you like to talk about? Can you help me with
my question? Of course, I would be happy to help. Please tell me more about the problem. Thank you very
much for your help. You are welcome. Have a nice day! Good morning, good afternoon, and good night. Yes,
no, maybe, please, sorry, and thanks are some of the most useful words in any language.

The weather today is sunny with a few clouds in the afternoon. Tomorrow it will rain in the morning and
clear up by the evening. In winter the days are short and cold; in summer they are long and warm. Spring
brings flowers and birds, and autumn brings red and yellow leaves that fall from the trees. Some people
like the snow, and some people prefer the beach, the sea, and the hot sand under their feet.

Cooking is a kind of chemistry that you can eat. To make a simple soup, cut an onion, two carrots, and a
potato into small pieces. Warm some oil in a pot, add the onion, and cook it slowly until it is soft.
Then add the other vegetables, cover them with water, add salt and pepper, and let everything simmer for
half an hour. Serve the soup hot with a piece of bread and a little cheese.

Numbers are everywhere: one, two, three, four, five, six, seven, eight, nine, ten, eleven, twelve,
twenty, thirty, forty, fifty, sixty, seventy, eighty, ninety, a hundred, a thousand, a million. The year
has twelve months: January, February, March, April, May, June, July, August, September, October,
November, and December. The week has seven days: Monday, Tuesday, Wednesday, Thursday, Friday, Saturday,
and Sunday. 1 2 3 4 5 6 7 8 9 10 100 1000 2024 3.14 42 0.5 99% $10 #1 @home 12:30 2+2=4

Music, painting, and poetry are ways of saying what plain words cannot. A song can make us dance or cry;
a picture can show a whole city in a single frame; a poem can hold a feeling in a few short lines. The
artist works with color, shape, rhythm, and silence. Museums keep old paintings safe so that people can
visit them, and libraries keep books so that anyone can read them for free.

The ship left the harbor at dawn, and the sailors raised the sails as the wind grew stronger. The
captain studied the map and the stars, and after many days at sea they saw the coast of a new land.
There were tall mountains, green valleys, and a river that flowed into a wide bay. They built a small
house near the water, planted a garden, and wrote letters home about everything they had found.

Health depends on sleep, food, movement, and friendship. Walking every day, eating fruit and vegetables,
drinking enough water, and resting well keep the body strong. Doctors and nurses work in hospitals and
clinics to care for people who are sick or hurt. Washing your hands is one of the simplest ways to stop
the spread of disease.

Animals live almost everywhere on the planet. Elephants remember the paths to water across the dry
plains; whales sing to each other across whole oceans; bees dance to show their sisters where the
flowers are. Cats sleep most of the day, horses can sleep standing up, and owls hunt quietly at night.
Penguins cannot fly, but they swim beautifully, and some birds migrate thousands of kilometers every
spring and autumn, finding their way by the sun, the stars, and the magnetic field of the Earth.

Geography describes the shape of the land and the places where people live. There are seven continents
and five oceans. The highest mountain is Everest, the longest river is the Nile or the Amazon depending
on how you measure, and the largest desert is the cold desert of Antarctica. Cities grew up beside
rivers and harbors because trade needed water, and roads, bridges, railways, and airports later
connected them into one busy network across borders and languages.

Sport brings people together. Football, basketball, tennis, cricket, swimming, cycling, and running are
played and watched by millions. A team wins by practicing hard, trusting each other, and learning from
every defeat. The referee keeps the rules fair, the coach plans the strategy, and the crowd cheers for
its favorite players. After the final whistle, both teams shake hands and thank the supporters.

An economy is the way a society produces, shares, and uses goods and services. Markets set prices when
buyers and sellers meet; banks keep savings and lend money for houses and businesses; governments
collect taxes to pay for schools, hospitals, roads, and public safety. When prices rise quickly it is
called inflation, and when the economy shrinks for a while it is called a recession. Careful budgets,
honest accounting, and long-term investment help families and companies survive difficult years.

Technology changes quickly. Phones became cameras, maps, wallets, and televisions in the space of a
decade. Engineers design chips with billions of transistors, write software that runs in data centers
around the world, and build networks that carry messages in milliseconds. Security matters: passwords
should be long and unique, updates should be installed promptly, and sensitive data should be
encrypted both in storage and in transit. Open source projects let anyone read, improve, and share the
code, and reviews, tests, and continuous integration keep the quality high.

Kubernetes schedules containers onto nodes, restarts them when they fail, and exposes them through
services and ingress controllers. A deployment describes the desired number of replicas, and the
controller works continuously to make reality match the specification. Configuration lives in
manifests, secrets hold credentials, and resource requests and limits tell the scheduler how much
memory and processor time each pod needs. Operators extend the cluster with custom resources, and
autoscalers add or remove replicas as the load changes during the day.

History is the story of how we got here. Ancient empires built roads, temples, and libraries; scholars
copied manuscripts by hand; inventors created the printing press, the steam engine, the telegraph, and
the electric light. Revolutions, wars, discoveries, and treaties shaped the borders of modern nations.
Studying history teaches us to ask who wrote each record, what they wanted, and what they might have
left out, so that we can understand the present more clearly and make wiser choices for the future.

My grandmother kept a garden behind her house. She grew tomatoes, beans, lettuce, strawberries, and
tall sunflowers that leaned toward the light. Every summer we picked the ripe fruit, shelled peas on
the porch, and listened to the radio while the evening grew cool. She said that patience was the most
important tool a gardener could own, more important than any spade, rake, or watering can.

def add(a, b):
    return a + b

for item in items:
    if item is not None:
        print(item)

class Request:
    def __init__(self, prompt, max_tokens=16, temperature=0.7):
        self.prompt = prompt
        self.max_tokens = max_tokens
        self.temperature = temperature

{"model": "tiny", "messages": [{"role": "user", "content": "Hello"}], "stream": true}
GET /v1/models HTTP/1.1 POST /v1/chat/completions 200 OK 404 Not Found 429 Too Many Requests
"""


def ensure_tiny_model(cache_dir: Path | None = None, *, seed: int = 0) -> Path:
    """Return the directory of the tiny Qwen2 model for ``seed``, generating it if it is absent.

    The directory is ``<cache_dir>/arks-tiny-qwen2-v<recipe>-seed<seed>``; ``cache_dir`` defaults to
    ``${ARKS_RAY_CACHE:-~/.cache/arks-ray}/models``. Generation (~0.1 s, after ~1.5 s of importing
    torch) runs in a temporary sibling directory that is renamed into place, so the target either does
    not exist or is complete; an exclusive ``flock`` on ``<cache_dir>/.arks-tiny-qwen2.lock`` makes
    concurrent callers (several processes or threads) build it once and all get the same path.
    """
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    root = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
    target = root / f"{TINY_MODEL_NAME}-v{_RECIPE_VERSION}-seed{seed}"
    if _is_complete(target):
        return target

    root.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(root / f".{TINY_MODEL_NAME}.lock"):
        if _is_complete(target):  # another caller built it while we waited
            return target
        # Builders hold this lock, so any temp dir still here was left by one that was killed.
        for orphan in root.glob(f".{TINY_MODEL_NAME}-*.tmp-*"):
            shutil.rmtree(orphan, ignore_errors=True)
        if target.exists():
            # Only reachable if someone edited the directory by hand: move it aside, then rebuild.
            stale = Path(tempfile.mkdtemp(dir=root, prefix=f".{target.name}.stale-"))
            os.replace(target, stale / target.name)
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{target.name}.tmp-"))
        try:
            _write_model(tmp, seed=seed)
            # mkdtemp makes 0700 and safetensors writes 0600; the cache is meant to be shared.
            for child in tmp.iterdir():
                child.chmod(0o644)
            tmp.chmod(0o755)
            fsync_dir(tmp)
            os.replace(tmp, target)
            fsync_dir(root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def _is_complete(path: Path) -> bool:
    return all((path / name).is_file() for name in _REQUIRED_FILES)


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    _write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode())


def _write_model(out: Path, *, seed: int) -> None:
    """Write every file of the model into ``out`` (an empty directory)."""
    tokenizer = _train_tokenizer()
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    ids = {tok: tokenizer.token_to_id(tok) for tok in _SPECIAL_TOKENS}
    eos_id, pad_id = ids[_IM_END], ids[_ENDOFTEXT]

    _write_bytes(out / "tokenizer.json", tokenizer.to_str(pretty=True).encode())
    _write_json(
        out / "tokenizer_config.json",
        {
            "add_bos_token": False,
            "add_prefix_space": False,
            "added_tokens_decoder": {
                str(ids[tok]): {
                    "content": tok,
                    "lstrip": False,
                    "normalized": False,
                    "rstrip": False,
                    "single_word": False,
                    "special": True,
                }
                for tok in _SPECIAL_TOKENS
            },
            "additional_special_tokens": [_IM_START, _IM_END],
            "bos_token": None,
            "chat_template": _CHAT_TEMPLATE,
            "clean_up_tokenization_spaces": False,
            "eos_token": _IM_END,
            "errors": "replace",
            "model_max_length": _MAX_POSITIONS,
            "pad_token": _ENDOFTEXT,
            "split_special_tokens": False,
            # transformers 5 picks Qwen2Tokenizer for model_type qwen2 whatever this says, and it keeps
            # only vocab/merges from tokenizer.json; hence the Qwen2 pipeline in _train_tokenizer.
            "tokenizer_class": "Qwen2Tokenizer",
            "unk_token": None,
        },
    )
    _write_json(
        out / "special_tokens_map.json",
        {
            "additional_special_tokens": [_IM_START, _IM_END],
            "eos_token": _IM_END,
            "pad_token": _ENDOFTEXT,
        },
    )
    _write_json(
        out / "config.json",
        {
            "architectures": ["Qwen2ForCausalLM"],
            "attention_dropout": 0.0,
            "bos_token_id": pad_id,
            "dtype": _DTYPE,
            "eos_token_id": eos_id,
            "hidden_act": "silu",
            "hidden_size": _HIDDEN_SIZE,
            "initializer_range": _INIT_STD,
            "intermediate_size": _INTERMEDIATE_SIZE,
            "layer_types": ["full_attention"] * _NUM_LAYERS,
            "max_position_embeddings": _MAX_POSITIONS,
            "max_window_layers": _NUM_LAYERS,
            "model_type": "qwen2",
            "num_attention_heads": _NUM_HEADS,
            "num_hidden_layers": _NUM_LAYERS,
            "num_key_value_heads": _NUM_KV_HEADS,
            "pad_token_id": pad_id,
            "rms_norm_eps": _RMS_NORM_EPS,
            "rope_parameters": {"rope_theta": _ROPE_THETA, "rope_type": "default"},
            "sliding_window": None,
            "tie_word_embeddings": True,
            "use_cache": True,
            "use_sliding_window": False,
            "vocab_size": vocab_size,
        },
    )
    _write_json(
        out / "generation_config.json",
        {
            "bos_token_id": pad_id,
            "eos_token_id": [eos_id, pad_id],
            "pad_token_id": pad_id,
        },
    )

    from safetensors.torch import save_file

    weights = _random_weights(vocab_size, seed=seed)
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    # save_file does not fsync; reopen to do it, so the rename cannot land before the data.
    fd = os.open(out / "model.safetensors", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _train_tokenizer() -> Tokenizer:
    """Train the byte-level BPE tokenizer on ``_CORPUS`` (deterministic: same corpus, same merges).

    The pipeline is exactly the one transformers 5's ``Qwen2Tokenizer`` rebuilds around the
    vocab/merges it reads from ``tokenizer.json`` (NFC, Qwen's split regex, byte-level BPE), so the
    ``tokenizers`` library, ``transformers`` and vLLM all produce the same ids.
    """
    import tokenizers as tk

    tokenizer = tk.Tokenizer(tk.models.BPE())
    tokenizer.normalizer = tk.normalizers.NFC()
    tokenizer.pre_tokenizer = tk.pre_tokenizers.Sequence(
        [
            tk.pre_tokenizers.Split(tk.Regex(_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = tk.decoders.ByteLevel()
    post = tk.processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tokenizer.post_processor = post
    trainer = tk.trainers.BpeTrainer(
        vocab_size=_VOCAB_SIZE,
        min_frequency=1,
        show_progress=False,
        special_tokens=list(_SPECIAL_TOKENS),
        # All 256 byte symbols, so any text (any Unicode, control bytes) encodes without <unk>.
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(_corpus_lines(), trainer=trainer)
    return tokenizer


def _corpus_lines() -> list[str]:
    return _CORPUS.splitlines(keepends=True)


def _random_weights(vocab_size: int, *, seed: int) -> dict[str, torch.Tensor]:
    """Qwen2ForCausalLM weights (tied embeddings, so no lm_head) from a seeded CPU generator."""
    import torch

    gen = torch.Generator(device="cpu").manual_seed(seed)
    dtype = getattr(torch, _DTYPE)
    head_dim = _HIDDEN_SIZE // _NUM_HEADS
    kv_dim = _NUM_KV_HEADS * head_dim

    def normal(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, dtype=torch.float32) * _INIT_STD).to(dtype)

    def ones(*shape: int) -> torch.Tensor:
        return torch.ones(*shape, dtype=dtype)

    weights: dict[str, torch.Tensor] = {"model.embed_tokens.weight": normal(vocab_size, _HIDDEN_SIZE)}
    for i in range(_NUM_LAYERS):
        p = f"model.layers.{i}"
        weights |= {
            f"{p}.input_layernorm.weight": ones(_HIDDEN_SIZE),
            f"{p}.self_attn.q_proj.weight": normal(_HIDDEN_SIZE, _HIDDEN_SIZE),
            f"{p}.self_attn.q_proj.bias": normal(_HIDDEN_SIZE),
            f"{p}.self_attn.k_proj.weight": normal(kv_dim, _HIDDEN_SIZE),
            f"{p}.self_attn.k_proj.bias": normal(kv_dim),
            f"{p}.self_attn.v_proj.weight": normal(kv_dim, _HIDDEN_SIZE),
            f"{p}.self_attn.v_proj.bias": normal(kv_dim),
            f"{p}.self_attn.o_proj.weight": normal(_HIDDEN_SIZE, _HIDDEN_SIZE),
            f"{p}.post_attention_layernorm.weight": ones(_HIDDEN_SIZE),
            f"{p}.mlp.gate_proj.weight": normal(_INTERMEDIATE_SIZE, _HIDDEN_SIZE),
            f"{p}.mlp.up_proj.weight": normal(_INTERMEDIATE_SIZE, _HIDDEN_SIZE),
            f"{p}.mlp.down_proj.weight": normal(_HIDDEN_SIZE, _INTERMEDIATE_SIZE),
        }
    weights["model.norm.weight"] = ones(_HIDDEN_SIZE)
    return weights


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m arks_ray.local.tinymodel [--cache-dir DIR] [--seed N]``: print the model directory."""
    parser = argparse.ArgumentParser(
        prog="python -m arks_ray.local.tinymodel",
        description="Generate (once) the tiny offline Qwen2 test model and print its directory.",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="where models are cached (default: ${ARKS_RAY_CACHE:-~/.cache/arks-ray}/models)",
    )
    parser.add_argument("--seed", type=int, default=0, help="weight seed (default: 0)")
    args = parser.parse_args(argv)
    print(ensure_tiny_model(args.cache_dir, seed=args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
