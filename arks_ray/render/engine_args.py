"""Parse ``runtimeCommonArgs`` (engine command-line flags) into engine keyword arguments.

Called by the serve-config renderer. Arks space-joined these strings into a ``bash -c`` line, so
``["--max-model-len 8192"]`` and ``["--max-model-len", "8192"]`` mean the same; we split them the same
way (shell words) but never run a shell, and refuse what only a shell could give meaning to.

vLLM's keyword arguments are its flag names. SGLang's are ``ServerArgs`` field names, which some of its
CLI aliases do not match (``--tensor-parallel-size`` is ``tp_size``), so ``sglang_server_args`` resolves
them; the values are passed to ``sglang.Engine(**kwargs)`` by Ray's ``SGLangServer``.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Mapping
from typing import Any

# Flags the spec already owns: setting them twice would be ambiguous.
OWNED_FLAGS: dict[str, str] = {
    "model": "spec.model (ArksModel)",
    "served_model_name": "spec.servedModelName",
    "tensor_parallel_size": "spec.tensorParallelSize",
    "tp": "spec.tensorParallelSize",
    "tp_size": "spec.tensorParallelSize",
    "pipeline_parallel_size": "spec.pipelineParallelSize",
    "pp_size": "spec.pipelineParallelSize",
    "host": "the gateway (engines are not exposed directly)",
    "port": "the gateway (engines are not exposed directly)",
    "model_path": "spec.model (ArksModel)",
}
_SHELL = re.compile(r"[;&|`<>]|\$\(|\$\{")
_FLAG = re.compile(r"^--?([A-Za-z][A-Za-z0-9_.-]*)$")


class ArgsError(ValueError):
    """An argument that cannot be turned into an engine keyword argument."""


def _value(text: str) -> Any:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    # A Jinja template (e.g. an inline --chat-template) starts with a brace too, but is not JSON.
    if text.startswith(("{", "[")) and not text.startswith(("{{", "{%", "{#")):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ArgsError(f"value {text!r} looks like JSON but does not parse: {exc.msg}") from None
    return text


def parse_engine_args(args: list[str], owned: Mapping[str, str] = OWNED_FLAGS) -> dict[str, Any]:
    """``['--dtype=half', '--max-model-len 32768', '--enforce-eager']`` -> keyword arguments.

    ``--flag`` alone is True and ``--no-flag`` False; a repeated flag collects a list. ``owned`` maps
    the flags refused here to the spec field that sets them.
    """
    line = " ".join(args)
    if _SHELL.search(line):
        raise ArgsError(f"shell syntax is not supported in engine arguments: {line!r}")
    try:
        words = shlex.split(line)
    except ValueError as exc:
        raise ArgsError(f"cannot split {line!r}: {exc}") from None
    out: dict[str, Any] = {}
    i = 0
    while i < len(words):
        word = words[i]
        name, eq, inline = word.partition("=")
        match = _FLAG.match(name)
        if not match:
            raise ArgsError(f"expected a --flag, got {word!r}")
        key = match.group(1).replace("-", "_").replace(".", "_")
        if eq:
            value: Any = _value(inline)
            i += 1
        elif i + 1 < len(words) and not _FLAG.match(words[i + 1].partition("=")[0]):
            value = _value(words[i + 1])
            i += 2
        elif key.startswith("no_"):
            key, value = key[3:], False
            i += 1
        else:
            value = True
            i += 1
        if key in owned:
            raise ArgsError(f"--{key.replace('_', '-')} is set by {owned[key]}, not runtimeCommonArgs")
        if key in out:
            prev = out[key]
            out[key] = [*prev, value] if isinstance(prev, list) else [prev, value]
        else:
            out[key] = value
    return out


# SGLang CLI spellings whose ServerArgs field has another name (its argparse aliases and the prefixes
# argparse accepts, as in ``--tp 2``); the fields are from SGLang's server_args.py.
SGLANG_ALIASES: dict[str, str] = {
    "tensor_parallel_size": "tp_size",
    "tp": "tp_size",
    "pipeline_parallel_size": "pp_size",
    "pp": "pp_size",
    "data_parallel_size": "dp_size",
    "dp": "dp_size",
    "expert_parallel_size": "ep_size",
    "ep": "ep_size",
    "decode_context_parallel_size": "dcp_size",
    "model": "model_path",
}
SGLANG_OWNED: dict[str, str] = {
    **OWNED_FLAGS,
    "pp": "spec.pipelineParallelSize",
    "nnodes": "spec.size (pods per group)",
    "node_rank": "the replica's Ray placement group",
    "dist_init_addr": "the replica's Ray placement group",
}


def sglang_server_args(args: list[str]) -> dict[str, Any]:
    """runtimeCommonArgs as SGLang ``ServerArgs`` fields: ``--dp 2`` -> ``{"dp_size": 2}``.

    Refuses what the spec sets (model, TP, PP, nodes) and two spellings of one field."""
    out: dict[str, Any] = {}
    spelled: dict[str, str] = {}
    for key, value in parse_engine_args(args, owned=SGLANG_OWNED).items():
        field = SGLANG_ALIASES.get(key, key)
        if field in out:
            raise ArgsError(f"--{spelled[field].replace('_', '-')} and --{key.replace('_', '-')} both set "
                            f"SGLang's {field}")
        out[field], spelled[field] = value, key
    return out


KV_CONNECTOR_DEFAULT: dict[str, Any] = {"kv_connector": "NixlConnector", "kv_role": "kv_both"}


def kv_transfer_config(given: Any, where: str) -> dict[str, Any]:
    """vLLM's ``kv_transfer_config`` for one side of a PD app: the given one, else NIXL (``kv_both``).

    Ray's PD builder needs one on both sides and reads ``kv_connector`` to pick its connector backend
    (NixlConnector, LMCacheConnectorV1, MultiConnector, MoRIIOConnector; others get Ray's default)."""
    if given is None:
        return dict(KV_CONNECTOR_DEFAULT)
    if not isinstance(given, dict):
        raise ArgsError(f"{where}: --kv-transfer-config must be a JSON object, got {given!r}")
    connector = given.get("kv_connector")
    if not isinstance(connector, str) or not connector:
        raise ArgsError(f"{where}: --kv-transfer-config needs a \"kv_connector\" name, e.g. "
                        "NixlConnector or LMCacheConnectorV1")
    return {"kv_role": "kv_both", **given}
