"""A small in-process registry for failures a real one does not produce on demand.

It serves ``/v2/``, manifests and blobs (with HTTP Range) from dictionaries, and can: cut a blob's
body short (``drops[digest] = n``: the next n responses stop halfway), serve a blob with other
content than its digest, and demand a bearer token (``token``), counting token requests.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import re
import threading
import urllib.parse

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


class FakeRegistry:
    def __init__(self, token: str | None = None):
        self.manifests: dict[tuple[str, str], tuple[str, bytes]] = {}   # (repo, ref) → type, body
        self.blobs: dict[str, bytes] = {}
        self.drops: dict[str, int] = {}
        self.token = token
        self.token_requests: list[dict] = []
        self.blob_requests: list[dict] = []    # {"digest", "range"} per blob GET
        registry = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                registry.handle(self)

            def log_message(self, *args):
                pass

        self._http = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.host = f"127.0.0.1:{self._http.server_address[1]}"
        threading.Thread(target=self._http.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._http.shutdown()
        self._http.server_close()

    # ---- content ------------------------------------------------------------------------

    def add_blob(self, data: bytes) -> dict:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        self.blobs[digest] = data
        return {"digest": digest, "size": len(data)}

    def add_image(self, repo: str, tag: str, layers: list[bytes],
                  config: dict | None = None) -> tuple[str, dict]:
        """An image with gzip-typed layers (the bytes are not checked); returns (digest, manifest)."""
        config_bytes = json.dumps(config or {"architecture": "amd64", "os": "linux",
                                             "rootfs": {"type": "layers", "diff_ids": []}}).encode()
        manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                    "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                               **self.add_blob(config_bytes)},
                    "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                                **self.add_blob(layer)} for layer in layers]}
        body = json.dumps(manifest).encode()
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        self.manifests[(repo, tag)] = self.manifests[(repo, digest)] = (OCI_MANIFEST, body)
        return digest, manifest

    # ---- serving ------------------------------------------------------------------------

    def _authorized(self, request) -> bool:
        if self.token is None:
            return True
        if request.headers.get("Authorization") == f"Bearer {self.token}":
            return True
        realm = f"http://{self.host}/token"
        request.send_response(401)
        request.send_header("WWW-Authenticate",
                            f'Bearer realm="{realm}",service="fake",scope="repository:x:pull"')
        request.send_header("Content-Length", "0")
        request.end_headers()
        return False

    def handle(self, request) -> None:
        url = urllib.parse.urlsplit(request.path)
        if url.path == "/token":
            self.token_requests.append(urllib.parse.parse_qs(url.query))
            return self._send(request, 200, json.dumps({"token": self.token}).encode(),
                              "application/json")
        if url.path == "/v2/":
            return self._send(request, 200, b"{}", "application/json")
        if not self._authorized(request):
            return
        match = re.fullmatch(r"/v2/(.+)/(manifests|blobs)/([^/]+)", url.path)
        if not match:
            return self._send(request, 404, b"{}", "application/json")
        repo, kind, ref = match.groups()
        if kind == "manifests":
            if (repo, ref) not in self.manifests:
                body = json.dumps({"errors": [{"code": "MANIFEST_UNKNOWN",
                                               "message": "manifest unknown"}]}).encode()
                return self._send(request, 404, body, "application/json")
            media_type, body = self.manifests[(repo, ref)]
            return self._send(request, 200, body, media_type)
        self.blob_requests.append({"digest": ref, "range": request.headers.get("Range")})
        if ref not in self.blobs:
            return self._send(request, 404, b"{}", "application/json")
        self._send_blob(request, ref)

    def _send_blob(self, request, digest: str) -> None:
        data = self.blobs[digest]
        start = 0
        wanted = request.headers.get("Range")
        if wanted:
            start = int(re.fullmatch(r"bytes=(\d+)-", wanted).group(1))
        body = data[start:]
        request.send_response(206 if wanted else 200)
        if wanted:
            request.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        request.send_header("Content-Length", str(len(body)))
        request.send_header("Content-Type", "application/octet-stream")
        request.end_headers()
        if self.drops.get(digest, 0) > 0:
            self.drops[digest] -= 1
            request.wfile.write(body[:len(body) // 2])
            request.wfile.flush()
            request.close_connection = True
            return
        request.wfile.write(body)

    @staticmethod
    def _send(request, status: int, body: bytes, content_type: str) -> None:
        request.send_response(status)
        request.send_header("Content-Type", content_type)
        request.send_header("Content-Length", str(len(body)))
        if status == 200 and body[:1] == b"{":
            request.send_header("Docker-Content-Digest",
                                "sha256:" + hashlib.sha256(body).hexdigest())
        request.end_headers()
        request.wfile.write(body)
