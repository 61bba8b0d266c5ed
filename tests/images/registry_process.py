"""Run Debian's ``docker-registry`` on loopback (for the tests and the pull benchmark)."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import requests

REGISTRY_BINARY = "/usr/bin/docker-registry"
START_TIMEOUT = 30


class RegistryStartError(Exception):
    """docker-registry did not come up."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Registry:
    host: str                  # 127.0.0.1:PORT
    storage: Path
    process: subprocess.Popen

    def ref(self, name: str) -> str:
        return f"{self.host}/{name}"


def start_registry(directory: Path, storage: Path, auth: dict | None = None) -> Registry:
    port = free_port()
    directory.mkdir(parents=True, exist_ok=True)
    config = {"version": 0.1,
              "log": {"level": "error", "accesslog": {"disabled": True}},
              "storage": {"filesystem": {"rootdirectory": str(storage)},
                          "delete": {"enabled": True}},
              "http": {"addr": f"127.0.0.1:{port}", "secret": "sm-tests"}}
    if auth:
        config["auth"] = auth
    config_file = directory / "config.yml"          # YAML is a superset of JSON
    config_file.write_text(json.dumps(config))
    with open(directory / "registry.log", "wb") as log:
        process = subprocess.Popen([REGISTRY_BINARY, "serve", str(config_file)], stdout=log,
                                   stderr=subprocess.STDOUT)
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            requests.get(f"http://127.0.0.1:{port}/v2/", timeout=2)
            break
        except requests.ConnectionError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RegistryStartError("docker-registry did not start: " + (
                    directory / "registry.log").read_text()[-2000:])
            time.sleep(0.1)
    return Registry(f"127.0.0.1:{port}", storage, process)


def stop_registry(registry: Registry) -> None:
    registry.process.terminate()
    try:
        registry.process.wait(10)
    except subprocess.TimeoutExpired:
        registry.process.kill()


def skopeo_push(layout: Path, tag: str, destination: str, *extra: str) -> None:
    result = subprocess.run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false", *extra,
                             f"oci:{layout}:{tag}", f"docker://{destination}"],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"skopeo copy to {destination} failed: {result.stderr}")
