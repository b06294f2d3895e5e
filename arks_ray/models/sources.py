"""ArksModel sources as lists of files to fetch: huggingface, modelscope, s3 and http.

Called by ``arks_ray.models.job`` (the cluster Job) and ``arks_ray.models.local`` (the CLI), through
``resolver``. Credentials come in as a mapping with the Secret's key names (``HF_TOKEN``,
``MODELSCOPE_API_TOKEN``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``): the
Job gets them as environment variables from the Secret, ``arks-ray`` from the Secret in the same file.

What each source verifies:

- huggingface: every file's size; SHA-256 for LFS files (the hub's listing gives it).
- modelscope: size and SHA-256 from its file listing.
- s3: size; MD5 from the ETag of single-part uploads; SHA-256 when the object carries an
  ``x-amz-checksum-sha256`` (asked for with ``x-amz-checksum-mode: ENABLED``). Files are fetched
  through presigned GET URLs, so the same resumable fetcher serves every source.
- http: Content-Length, and SHA-256 where the spec gives one.
"""

from __future__ import annotations

import base64
import datetime
import urllib.parse
from collections.abc import Callable, Mapping
from typing import Any

from arks_ray.api.model import HttpSource, HuggingFaceSource, ModelScopeSource, ModelSource, S3Source
from arks_ray.models.files import DownloadError, RemoteFile, archive_kind, safe_relpath, selected
from arks_ray.models.transport import Transport, get_json

HF_DEFAULT_ENDPOINT = "https://huggingface.co"
MODELSCOPE_DEFAULT_ENDPOINT = "https://modelscope.cn"
PRESIGN_TTL = datetime.timedelta(hours=6)

Resolver = Callable[[], list[RemoteFile]]


def _bearer(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def huggingface_files(src: HuggingFaceSource, repo: str, creds: Mapping[str, str]) -> list[RemoteFile]:
    """The repo's files at the revision, through ``huggingface_hub``'s own listing (its endpoint honoured)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    endpoint = (src.endpoint or creds.get("HF_ENDPOINT") or HF_DEFAULT_ENDPOINT).rstrip("/")
    token = creds.get("HF_TOKEN") or None
    revision = src.revision or "main"
    api = HfApi(endpoint=endpoint, token=token or False)
    try:
        entries = list(api.list_repo_tree(repo, revision=revision, recursive=True))
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        raise DownloadError(f"hub listing of {repo}@{revision} failed: HTTP {status}") from None
    out = []
    for e in entries:
        size = getattr(e, "size", None)
        if size is None or not selected(e.path, src.allow_patterns, src.ignore_patterns):
            continue  # a folder, or filtered out
        lfs = getattr(e, "lfs", None)
        url = f"{endpoint}/{repo}/resolve/{urllib.parse.quote(revision, safe='')}/{urllib.parse.quote(e.path)}"
        out.append(RemoteFile(safe_relpath(e.path), url, int(size), lfs.sha256 if lfs else None,
                              headers=_bearer(token)))
    return out


def modelscope_files(src: ModelScopeSource, model_id: str, creds: Mapping[str, str],
                     transport: Transport) -> list[RemoteFile]:
    """Files from ModelScope's repo API (the listing its own client uses: path, size, SHA-256)."""
    endpoint = (src.endpoint or creds.get("MODELSCOPE_DOMAIN") or MODELSCOPE_DEFAULT_ENDPOINT).rstrip("/")
    revision = src.revision or "master"
    headers = _bearer(creds.get("MODELSCOPE_API_TOKEN"))
    base = f"{endpoint}/api/v1/models/{urllib.parse.quote(model_id)}/repo"
    query = urllib.parse.urlencode({"Revision": revision, "Recursive": "true"})
    data = get_json(transport, f"{base}/files?{query}", headers)
    listing = (data.get("Data") or {}).get("Files") if isinstance(data, dict) else None
    if not isinstance(listing, list):
        raise DownloadError(f"ModelScope listing of {model_id}@{revision} has no Data.Files")
    out = []
    for entry in listing:
        path = str(entry.get("Path") or entry.get("Name") or "")
        if entry.get("Type") == "tree" or not path or not selected(path, src.allow_patterns, src.ignore_patterns):
            continue
        url = f"{base}?" + urllib.parse.urlencode({"Revision": revision, "FilePath": path})
        sha = entry.get("Sha256") or None
        out.append(RemoteFile(safe_relpath(path), url, int(entry["Size"]) if "Size" in entry else None,
                              sha.lower() if sha else None, headers=headers))
    return out


def _s3_client(src: S3Source, creds: Mapping[str, str]) -> Any:
    from minio import Minio
    from minio.credentials.providers import StaticProvider

    endpoint = src.endpoint or (f"https://s3.{src.region}.amazonaws.com" if src.region else "https://s3.amazonaws.com")
    parts = urllib.parse.urlsplit(endpoint)
    key, secret = creds.get("AWS_ACCESS_KEY_ID"), creds.get("AWS_SECRET_ACCESS_KEY")
    provider = StaticProvider(key, secret, creds.get("AWS_SESSION_TOKEN")) if key and secret else None
    return Minio(parts.netloc, secure=parts.scheme == "https", region=src.region or "us-east-1",
                 credentials=provider)


def _b64_to_hex(value: str | None) -> str | None:
    if not value:
        return None
    try:
        return base64.b64decode(value).hex()
    except ValueError:
        return None


def s3_files(src: S3Source, creds: Mapping[str, str]) -> list[RemoteFile]:
    """Every object under the prefix (``allow``/``ignore`` on the key relative to it), as presigned GETs."""
    from minio.error import MinioException

    client = _s3_client(src, creds)
    prefix = src.prefix + "/" if src.prefix else ""
    out = []
    try:
        for obj in client.list_objects(src.bucket, prefix=prefix, recursive=True):
            rel = obj.object_name[len(prefix):]
            if obj.is_dir or not rel or rel.endswith("/") or not selected(rel, src.allow_patterns,
                                                                            src.ignore_patterns):
                continue
            etag = (obj.etag or "").strip('"')
            md5 = etag.lower() if len(etag) == 32 and "-" not in etag else None
            stat = client.stat_object(src.bucket, obj.object_name,
                                      extra_headers={"x-amz-checksum-mode": "ENABLED"})
            sha = _b64_to_hex((stat.metadata or {}).get("x-amz-checksum-sha256"))
            url = client.presigned_get_object(src.bucket, obj.object_name, expires=PRESIGN_TTL)
            out.append(RemoteFile(safe_relpath(rel), url, int(obj.size), sha, md5))
    except MinioException as exc:
        code = getattr(exc, "code", type(exc).__name__)
        raise DownloadError(f"listing {src.uri} failed: {code}") from None
    except OSError as exc:
        raise DownloadError(f"cannot reach the S3 endpoint for {src.uri}: {exc}") from None
    return out


def http_files(src: HttpSource) -> list[RemoteFile]:
    """The listed URLs (sizes come with each response); an archive URL is unpacked after download."""
    out = []
    entries = [(u, None, None) for u in src.urls] + [(f.url, f.path, f.sha256) for f in src.files]
    for url, path, sha in entries:
        name = path or urllib.parse.unquote(urllib.parse.urlsplit(url).path.rstrip("/").rpartition("/")[2])
        if not name:
            raise DownloadError(f"cannot tell a file name from {url}; use files[].path")
        out.append(RemoteFile(safe_relpath(name), url, None, sha.lower() if sha else None,
                              archive=archive_kind(name)))
    return out


def resolver(source: ModelSource, model_id: str, creds: Mapping[str, str], transport: Transport) -> Resolver:
    """A function listing the source's files (called by the downloader only when work is needed)."""
    if source.huggingface is not None:
        hf = source.huggingface
        return lambda: huggingface_files(hf, model_id, creds)
    if source.modelscope is not None:
        ms = source.modelscope
        return lambda: modelscope_files(ms, model_id, creds, transport)
    if source.s3 is not None:
        s3 = source.s3
        return lambda: s3_files(s3, creds)
    if source.http is not None:
        web = source.http
        return lambda: http_files(web)
    raise DownloadError(f"source {source.kind or 'empty'} has nothing to download")


CREDENTIAL_KEYS: dict[str, tuple[str, ...]] = {
    "huggingface": ("HF_TOKEN",),
    "modelscope": ("MODELSCOPE_API_TOKEN",),
    "s3": ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"),
}


def secret_name(source: ModelSource) -> str | None:
    """The Secret a source reads its credentials from."""
    ref = None
    if source.huggingface is not None:
        ref = source.huggingface.token_secret_ref
    elif source.modelscope is not None:
        ref = source.modelscope.token_secret_ref
    elif source.s3 is not None:
        ref = source.s3.credentials_secret_ref
    return ref.name if ref is not None else None
