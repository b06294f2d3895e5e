"""Model weights: where they come from, how they are fetched, verified and cached.

One downloader serves the cluster's download Job (``python -m arks_ray.models``) and the local CLI
(``arks-ray model pull`` and ``arks-ray up``):

- ``files``: pure. What one file to fetch is (``RemoteFile``), path safety, allow/ignore patterns, the
  completion marker.
- ``progress``: pure tracking (bytes, files, rate, ETA with an injected clock) and its text forms.
- ``sources``: turns an ArksModel source (huggingface, modelscope, s3, http) into ``RemoteFile`` lists.
- ``transport``: the HTTP port (``Transport``) and its urllib adapter.
- ``fetch``: one file, resumed with HTTP Range, verified (size, SHA-256, MD5), retried with backoff.
- ``downloader``: a whole model: a lock, a staging directory, parallel fetches, the marker written last,
  then one rename into place, so a half-finished download is never taken for a model.
- ``local``: the cache directory and credentials for ``arks-ray`` on a workstation.
- ``node_cache``: the node-local tier's copy step (``python -m arks_ray.models.node_cache``): a complete
  model copied from the shared claim onto the node's disk, once per node.
"""
