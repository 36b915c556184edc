"""A local GCS emulator on 127.0.0.1 (gcp-storage-emulator, in memory, in this process)
and the environment that points every client at it: gcsfs (etils.epath's gs://),
google-cloud-storage (Orbax, tensorboardX), tensorstore (Orbax's arrays) and
array_record's own GCS client. No credentials are needed.

Three gaps of the emulator are filled here: ``objects.moveTo`` (gcsfs renames with it),
the ``startOffset`` / ``endOffset`` of object listings (tensorstore deletes ranges with
them; ignored, a range delete would remove its neighbours) and the ``x-goog-generation``
header of downloads (tensorstore reads an object's generation from it).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from http import HTTPStatus

from gcp_storage_emulator import server as _server
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects as _objects


def _list(request, response, storage, *args, **kwargs):
  del args, kwargs
  query = lambda name: request.query.get(name)[0] if request.query.get(name) else None
  try:
    files, prefixes = storage.get_file_list(request.params["bucket_name"], query("prefix"),
                                            query("delimiter"), query("matchGlob"))
  except NotFound:
    response.status = HTTPStatus.NOT_FOUND
    return
  low, high = query("startOffset"), query("endOffset")
  keep = lambda name: (low is None or name >= low) and (high is None or name < high)
  response.json({"kind": "storage#objects", "items": [f for f in files if keep(f["name"])],
                 "prefixes": [p for p in prefixes if keep(p)]})


def _move(request, response, storage, *args, **kwargs):
  del args, kwargs
  p = request.params
  try:
    moved = _objects._copy(request.base_url, storage, p["bucket_name"], p["object_id"],  # pylint: disable=protected-access
                           p["bucket_name"], p["dest_object_id"])
    _objects._delete(storage, p["bucket_name"], p["object_id"])  # pylint: disable=protected-access
    response.json(moved)
  except NotFound:
    response.status = HTTPStatus.NOT_FOUND


def _download(request, response, storage, *args, **kwargs):
  try:
    obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
  except NotFound:
    obj = None
  if obj:
    response["x-goog-generation"] = str(obj["generation"])
    response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
  return _ORIGINAL_DOWNLOAD(request, response, storage, *args, **kwargs)


_ORIGINAL_DOWNLOAD = _objects.download


def _patch_handlers() -> None:
  if getattr(_server, "_tokenflex_patched", False):
    return
  for _, methods in _server.HANDLERS:
    if methods.get(_server.GET) is _objects.ls:
      methods[_server.GET] = _list
    if methods.get(_server.GET) is _ORIGINAL_DOWNLOAD:
      methods[_server.GET] = _download
  _objects.download = _download  # objects.get (alt=media) calls it by name
  _server.HANDLERS = ((r"^/storage/v1/b/(?P<bucket_name>[-.\w]+)/o/(?P<object_id>.*[^/]+)"
                       r"/moveTo/o/(?P<dest_object_id>.*[^/]+)$", {_server.POST: _move}),
                      *_server.HANDLERS)
  _server._tokenflex_patched = True  # pylint: disable=protected-access


def client_env(url: str) -> dict[str, str]:
  """The variables that point every GCS client of a process at the emulator at ``url``
  (set them before the process imports fsspec or gcsfs)."""
  return {
      "STORAGE_EMULATOR_HOST": url,            # gcsfs, google-cloud-storage
      "TENSORSTORE_GCS_HTTP_URL": url,         # tensorstore's gcs kvstore
      "CLOUD_STORAGE_EMULATOR_ENDPOINT": url,  # array_record's GCS client
      "GOOGLE_AUTH_TOKEN_FOR_TESTING": "none",  # tensorstore: no credential lookup
      "GOOGLE_CLOUD_PROJECT": "tokenflex-test",
      "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
      "FSSPEC_GCS": json.dumps({"token": "anon", "use_listings_cache": False}),
  }


class Emulator:
  """``with Emulator("bucket") as url:`` a running emulator holding an empty bucket."""

  def __init__(self, bucket: str):
    self.bucket = bucket  # at least 3 characters (tensorstore refuses shorter names)
    self._server = None

  def __enter__(self) -> str:
    _patch_handlers()
    for name in ("gcp_storage_emulator", "api.object", "api.bucket", "api.storage"):
      logging.getLogger(name).setLevel(logging.CRITICAL)
    self._server = _server.create_server("127.0.0.1", 0, in_memory=True,
                                         default_bucket=self.bucket)
    self._server._api.daemon = True  # pylint: disable=protected-access
    self._server.start()
    httpd = self._server._api._httpd  # pylint: disable=protected-access
    httpd.handle_error = lambda *_: None  # clients hanging up are not errors here
    return f"http://127.0.0.1:{httpd.server_address[1]}"

  def __exit__(self, *exc) -> None:
    self._server.stop()


@contextlib.contextmanager
def env_here(url: str) -> Iterator[None]:
  """`client_env` for this process too, for the ``with`` block only (fsspec's config,
  read at its import, patched likewise): other tests' processes never see it."""
  import fsspec.config  # pylint: disable=import-outside-toplevel
  saved_env, saved_conf = dict(os.environ), dict(fsspec.config.conf.get("gcs", {}))
  os.environ.update(client_env(url))
  fsspec.config.conf.setdefault("gcs", {}).update(token="anon", use_listings_cache=False)
  try:
    yield
  finally:
    os.environ.clear()
    os.environ.update(saved_env)
    fsspec.config.conf["gcs"] = saved_conf
