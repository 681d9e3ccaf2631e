"""A Google Cloud Storage server on loopback for the gs:// tests (``gcp-storage-emulator``, the
JSON API over HTTP), and the environment that sends the project's storage libraries to it.

    with running(bucket) as url:
      env = storage_environment(url)   # for a subprocess: epath (gcsfs), orbax (tensorstore)

Run as a script (``python tests/gcs_emulator.py PORT BUCKET``) it serves until SIGTERM. Three
things real GCS does that the emulator (the test double) lacks are added here: the
``moveTo`` call gcsfs renames with; the ``x-goog-generation`` header of a download; and the
``ifGenerationMatch`` precondition of an upload (412 when another write got there first).
tensorstore's OCDBT databases, which orbax writes checkpoints as, read the first and rely on
the second when several arrays update one manifest.
"""

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request


def storage_environment(url: str) -> dict:
  """os.environ plus what points epath (through gcsfs) and tensorstore at ``url``."""
  return dict(
      os.environ,
      STORAGE_EMULATOR_HOST=url,            # gcsfs / google-cloud-storage
      TENSORSTORE_GCS_HTTP_URL=url,         # orbax's array data (tensorstore)
      GOOGLE_AUTH_TOKEN_FOR_TESTING="test", # tensorstore: no credential lookup
      EPATH_USE_TF="false",                 # epath's gs:// backend: fsspec/gcsfs, not tf.io.gfile
      GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false",  # no gRPC bucket-type probe
      FSSPEC_GCS_TOKEN="anon", NO_GCE_CHECK="true",
      NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def running(bucket: str):
  """Starts the emulator with ``bucket`` in memory; yields its URL; stops it."""
  port = _free_port()
  url = f"http://127.0.0.1:{port}"
  with tempfile.TemporaryDirectory() as tmp:
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), str(port), bucket],
                            cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
      deadline = time.monotonic() + 60
      while True:
        try:
          with opener.open(f"{url}/storage/v1/b/{bucket}", timeout=1) as r:
            if r.status == 200:
              break
        except OSError:
          pass
        if proc.poll() is not None or time.monotonic() > deadline:
          raise RuntimeError("the GCS emulator did not start")
        time.sleep(0.05)
      yield url
    finally:
      proc.terminate()
      try:
        proc.wait(timeout=10)
      except subprocess.TimeoutExpired:
        proc.kill()


def _serve(port: int, bucket: str) -> None:
  import logging  # pylint: disable=import-outside-toplevel
  logging.disable(logging.CRITICAL)
  from gcp_storage_emulator import server  # pylint: disable=import-outside-toplevel
  from gcp_storage_emulator.exceptions import NotFound  # pylint: disable=import-outside-toplevel
  from gcp_storage_emulator.handlers import objects  # pylint: disable=import-outside-toplevel

  def move(request, response, storage, *_, **__):
    p = request.params
    try:
      obj = objects._copy(request.base_url, storage, p["bucket_name"], p["object_id"],  # pylint: disable=protected-access
                          p["bucket_name"], p["dest_object_id"])
      objects._delete(storage, p["bucket_name"], p["object_id"])  # pylint: disable=protected-access
      response.json(obj)
    except NotFound:
      response.status = server.HTTPStatus.NOT_FOUND

  def generation_of(storage, bucket, name) -> str:
    try:
      return str(storage.get_file_obj(bucket, name)["generation"])
    except NotFound:
      return "0"

  def with_generation(handler):
    def read(request, response, storage, *args, **kwargs):
      p = request.params
      generation = generation_of(storage, p["bucket_name"], p["object_id"])
      if generation != "0":
        response["x-goog-generation"] = generation
        response["x-goog-metageneration"] = "1"
      return handler(request, response, storage, *args, **kwargs)
    return read

  def insert(request, response, storage, *args, **kwargs):
    match, name = request.query.get("ifGenerationMatch"), request.query.get("name")
    if match and name and generation_of(storage, request.params["bucket_name"],
                                        name[0]) != match[0]:
      response.status = server.HTTPStatus.PRECONDITION_FAILED
      return None
    return objects.insert(request, response, storage, *args, **kwargs)

  replaced = {objects.download: with_generation(objects.download),
              objects.get: with_generation(objects.get), objects.insert: insert}
  handlers = [(pattern, {method: replaced.get(fn, fn) for method, fn in methods.items()})
              for pattern, methods in server.HANDLERS]
  server.HANDLERS = tuple([(r"^/storage/v1/b/(?P<bucket_name>[-.\w]+)/o/(?P<object_id>.*[^/]+)"
                            r"/moveTo/o/(?P<dest_object_id>.*[^/]+)$", {"POST": move})]
                          + handlers)
  server.create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket).run()


if __name__ == "__main__":
  _serve(int(sys.argv[1]), sys.argv[2])
