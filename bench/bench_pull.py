"""Pull of a 100 MB image from a loopback registry: sm's client against ``skopeo copy``.

One run starts Debian's ``docker-registry`` on 127.0.0.1, pushes an image (a small gzip base
layer and an uncompressed layer holding a 100 MB pseudo-random file) with skopeo, then alternates
cold pulls into empty destinations: ``sm`` (``vmm.images.registry.pull`` in a fresh Python process,
as ``sm pull`` runs: verified, into a fresh store) and ``skopeo copy docker://... oci:DIR``.
Each is timed from spawning the process to its exit; MB/s is the image's blob bytes over that.

Usage:
    python bench/bench_pull.py [--runs 5]
Prints a Markdown table; no assertions.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.images.oci_layout import LAYER_GZIP, LAYER_TAR, Entry, Layout, pseudo_random
from tests.images.registry_process import skopeo_push, start_registry, stop_registry

FILE_SIZE = 100 * 1000 * 1000
SM_PULL = ("import sys; from pathlib import Path; from vmm.images.registry import pull; "
           "from vmm.images.store import Store; "
           "pull(sys.argv[1], Store(Path(sys.argv[2])), progress=False)")


def build_image(layout_dir: Path) -> int:
    """Write the image into an OCI layout; returns its blob bytes (config + layers)."""
    layout = Layout(layout_dir)
    image = layout.image([([Entry("etc/", "dir"), Entry("etc/hostname", data=b"bench\n")],
                           LAYER_GZIP),
                          ([Entry("data/", "dir"), Entry("data/random.bin",
                                                         data=pseudo_random(FILE_SIZE, 1))],
                           LAYER_TAR)])
    layout.tag("big", image)
    return len(image.manifest) + sum(size for _, _, size in image.layers) + len(
        (layout.blobs / image.config_digest.removeprefix("sha256:")).read_bytes())


def timed(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-pull-"))
    registry = start_registry(work / "registry", work / "storage")
    try:
        size = build_image(work / "layout")
        ref = registry.ref("bench/big:v1")
        skopeo_push(work / "layout", "big", ref, "--preserve-digests")
        commands = {
            "sm pull (vmm.images.registry)": lambda dest: [
                sys.executable, "-c", SM_PULL, ref, str(dest)],
            "skopeo copy docker:// → oci:": lambda dest: [
                "skopeo", "copy", "--quiet", "--src-tls-verify=false", f"docker://{ref}",
                f"oci:{dest}:v1"],
        }
        times: dict[str, list[float]] = {name: [] for name in commands}
        for run in range(args.runs):
            for name, command in commands.items():
                destination = work / f"dest-{run}"
                times[name].append(timed(command(destination)))
                shutil.rmtree(destination)
    finally:
        stop_registry(registry)
        shutil.rmtree(work, ignore_errors=True)
    print(f"Pull of a {size / 1e6:.1f} MB image from docker-registry on 127.0.0.1, "
          f"{args.runs} cold runs each, alternating\n")
    print("| client | median s | best s | MB/s (median) |")
    print("|---|---|---|---|")
    for name, samples in times.items():
        median = statistics.median(samples)
        print(f"| {name} | {median:.3f} | {min(samples):.3f} | {size / 1e6 / median:.0f} |")


if __name__ == "__main__":
    main()
