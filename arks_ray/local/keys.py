"""The local installation's token key: kept in the cache directory, created on first use.

Called by the CLI (``arks-ray up``, ``render``, ``validate``) and the local runner. ``$ARKS_TOKEN_KEY``
(and ``$ARKS_TOKEN_KEY_NEXT``), when set, win over the file: that is how ``arks-ray render`` produces the
digests of a cluster whose key the user holds. The file is created ``0600``; the key never goes into a
Serve config, only into the environment of the ``ray start`` that hosts the gateway.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from pathlib import Path

from arks_ray.api.digests import TokenKeys

_CACHE_ENV = "ARKS_RAY_CACHE"
KEY_FILE = "token-key"


def key_path(environ: Mapping[str, str] | None = None) -> Path:
    """``${ARKS_RAY_CACHE:-~/.cache/arks-ray}/token-key``."""
    env = os.environ if environ is None else environ
    return Path(env.get(_CACHE_ENV) or "~/.cache/arks-ray").expanduser() / KEY_FILE


def local_token_keys(environ: Mapping[str, str] | None = None) -> TokenKeys:
    """The environment's keys if set, else the kept key (made now, 64 hex characters, if there is none)."""
    env = os.environ if environ is None else environ
    given = TokenKeys.from_environ(env)
    if given is not None:
        return given
    path = key_path(env)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        # O_EXCL: two first runs at once keep whichever key was written first, never a mix.
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32) + "\n")
    return TokenKeys.from_text(path.read_text())
