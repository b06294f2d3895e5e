"""``parse_engine_args``: Arks' runtimeCommonArgs (shell-joined flags) into engine keyword arguments."""

from __future__ import annotations

import shlex
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from arks_ray.render.engine_args import OWNED_FLAGS, ArgsError, parse_engine_args


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([], {}),
        (["--dtype=half", "--max-model-len 32768", "--enforce-eager"],
         {"dtype": "half", "max_model_len": 32768, "enforce_eager": True}),
        # One item per word, one item per flag, or all in one item: Arks space-joined them all the same.
        (["--max-model-len", "32768", "--dtype", "half"], {"max_model_len": 32768, "dtype": "half"}),
        (["--max-model-len 32768 --dtype half"], {"max_model_len": 32768, "dtype": "half"}),
        (["--gpu-memory-utilization=0.85"], {"gpu_memory_utilization": 0.85}),
        (["--mem-fraction-static", "0.7"], {"mem_fraction_static": 0.7}),
        (["--no-enable-prefix-caching"], {"enable_prefix_caching": False}),
        (["--trust-remote-code", "--disable-log-requests"], {"trust_remote_code": True, "disable_log_requests": True}),
        (["--enable-chunked-prefill false"], {"enable_chunked_prefill": False}),
        (["--enable-chunked-prefill TRUE"], {"enable_chunked_prefill": True}),
        (["--seed -1"], {"seed": -1}),
        (["--temperature=-0.5"], {"temperature": -0.5}),
        (["--swap-space 1e1"], {"swap_space": 10.0}),
        (["-q", "awq"], {"q": "awq"}),
        (["--lora-modules a=/loras/a", "--lora-modules", "b=/loras/b"], {"lora_modules": ["a=/loras/a", "b=/loras/b"]}),
        (["--x 1 --x 2 --x 3"], {"x": [1, 2, 3]}),
        (["""--kv-transfer-config '{"kv_connector":"NixlConnector","kv_role":"kv_both"}'"""],
         {"kv_transfer_config": {"kv_connector": "NixlConnector", "kv_role": "kv_both"}}),
        (["--cuda-graph-sizes [1,2,4]"], {"cuda_graph_sizes": [1, 2, 4]}),
        (["--chat-template '{{ messages }} and more'"], {"chat_template": "{{ messages }} and more"}),
        (["--download-dir=/mnt/cache"], {"download_dir": "/mnt/cache"}),
        (["--revision=abc=def"], {"revision": "abc=def"}),
        (["--tokenizer-mode="], {"tokenizer_mode": ""}),
        (["--tokenizer-mode ''"], {"tokenizer_mode": ""}),
        (["--hf-overrides.rope_scaling 2"], {"hf_overrides_rope_scaling": 2}),
        (["--env", "$HOME"], {"env": "$HOME"}),  # no shell: a lone $ is just a character
    ],
)
def test_parse(args: list[str], expected: dict[str, Any]) -> None:
    assert parse_engine_args(args) == expected


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--x 1; reboot"], "shell syntax"),
        (["--x 1 && reboot"], "shell syntax"),
        (["--x 1 | tee"], "shell syntax"),
        (["--x", "`id`"], "shell syntax"),
        (["--x", "$(id)"], "shell syntax"),
        (["--x", "${HOME}"], "shell syntax"),
        (["--x", "<in"], "shell syntax"),
        (["--x", "a > b"], "shell syntax"),
        (["--chat-template 'open"], "cannot split"),
        (["model"], "expected a --flag"),
        (["--dtype", "half", "float16"], "expected a --flag"),
        (["---"], "expected a --flag"),
        (["--9lives"], "expected a --flag"),
        (["--json {oops}"], "looks like JSON"),
        (["--json", "[1,"], "looks like JSON"),
    ],
)
def test_refused(args: list[str], message: str) -> None:
    with pytest.raises(ArgsError, match=message):
        parse_engine_args(args)


@pytest.mark.parametrize("flag", sorted(OWNED_FLAGS))
def test_flags_owned_by_the_spec_are_refused(flag: str) -> None:
    dashed = "--" + flag.replace("_", "-")
    with pytest.raises(ArgsError, match=r"is set by spec\.|the gateway"):
        parse_engine_args([f"{dashed} 1"])
    with pytest.raises(ArgsError):
        parse_engine_args([f"--{flag}=1"])


def test_owned_flags_can_be_narrowed() -> None:
    assert parse_engine_args(["--tp 2"], owned={}) == {"tp": 2}
    with pytest.raises(ArgsError, match=r"spec\.x"):
        parse_engine_args(["--dtype half"], owned={"dtype": "spec.x"})


# --- property: rendering --key value pairs and parsing them gives the values back -------------------------

_WORD = st.from_regex(r"\A[a-z][a-z0-9]{0,8}(-[a-z0-9]{1,6}){0,3}\Z")
KEYS = _WORD.filter(lambda k: not k.startswith("no") and k.replace("-", "_") not in OWNED_FLAGS)
# Text values: no shell metacharacters (always refused), not starting with a dash (a flag) or a JSON bracket,
# and not a spelling of a number or a boolean (those are parsed as such, by design).
_NOT_TEXT = {"true", "false", "nan", "inf", "infinity"}
TEXT = st.text(alphabet=st.sampled_from("abcXYZ019 ._/:,=+@%-'\""), min_size=1, max_size=20).filter(
    lambda s: s[0].isalpha() and s.strip().lower() not in _NOT_TEXT)
VALUES = st.one_of(
    st.integers(min_value=-(10**12), max_value=10**12),
    st.floats(allow_nan=False, allow_infinity=False).filter(lambda f: not f.is_integer()),
    st.booleans(),
    TEXT,
)


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return shlex.quote(repr(value) if isinstance(value, float) else str(value))


@st.composite
def rendered_args(draw: st.DrawFn) -> tuple[dict[str, Any], list[str]]:
    kwargs = draw(st.dictionaries(KEYS, VALUES, max_size=6))
    args: list[str] = []
    for key, value in kwargs.items():
        style = draw(st.sampled_from(["one item", "two items", "equals", "bare"]))
        if isinstance(value, bool) and style == "bare":
            args.append(f"--{key}" if value else f"--no-{key}")
        elif style == "two items":
            args += [f"--{key}", _show(value)]
        elif style == "equals":
            args.append(f"--{key}={_show(value)}")
        else:
            args.append(f"--{key} {_show(value)}")
    return {k.replace("-", "_"): v for k, v in kwargs.items()}, args


@settings(max_examples=100, deadline=None)
@given(rendered_args())
def test_rendered_key_value_pairs_round_trip(case: tuple[dict[str, Any], list[str]]) -> None:
    expected, args = case
    parsed = parse_engine_args(args)
    assert parsed == expected
    assert [type(v) for v in parsed.values()] == [type(v) for v in expected.values()]
    # Splitting differently does not change the meaning (Arks joined the list with spaces).
    assert parse_engine_args([" ".join(args)]) == expected
