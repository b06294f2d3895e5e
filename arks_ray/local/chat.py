"""A minimal streaming chat client for ``arks-ray chat`` (and ``make demo``).

Reads the gateway's SSE stream and yields the text deltas; errors come back as ``ChatError`` with the
gateway's OpenAI-style message.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx2


class ChatError(Exception):
    """The gateway refused the request, or the connection failed."""


def stream_chat(base_url: str, token: str, model: str, prompt: str, max_tokens: int = 64) -> Iterator[str]:
    body = {"model": model, "stream": True, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": prompt}]}
    headers = {"Authorization": f"Bearer {token}"}
    try:
        with httpx2.stream("POST", f"{base_url.rstrip('/')}/v1/chat/completions", json=body, headers=headers,
                           timeout=httpx2.Timeout(300.0, connect=5.0)) as resp:
            if resp.status_code != 200:
                resp.read()
                try:
                    message = resp.json()["error"]["message"]
                except (ValueError, KeyError, TypeError):
                    message = resp.text
                raise ChatError(f"HTTP {resp.status_code}: {message}")
            for line in resp.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise ChatError(chunk["error"].get("message", "stream error"))
                for choice in chunk.get("choices") or []:
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        yield text
    except httpx2.HTTPError as exc:
        raise ChatError(f"cannot reach {base_url}: {exc}") from None
