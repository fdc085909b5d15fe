"""Network helpers that fail fast: a reachability probe and a download that gives up on a stalled
server."""
from __future__ import annotations

import hashlib
import os
import socket
import time
import urllib.parse
import urllib.request
from pathlib import Path


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """The hex digest of a file's bytes, read in 1 MB blocks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class DownloadError(Exception):
    """A download failed or was too slow; the caller decides what to tell the user."""


def host_reachable(url: str, timeout: float = 4.0) -> bool:
    """True when the URL's host resolves and accepts a TCP connection within `timeout` seconds.

    Libraries retry a dead network for a minute (huggingface_hub: 5 retries with backoff); this
    probe lets the scripts fail in seconds. Behind an HTTP(S) proxy it cannot tell, so it says yes.
    """
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "file":
        return True
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy",
                                       "ALL_PROXY")):
        return True
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def download_url(url: str, dest: Path, min_bytes_per_s: float = 200e3, grace_s: float = 45.0,
                 read_timeout_s: float = 30.0) -> Path:
    """Stream `url` into `dest` (atomically). Abort if, after `grace_s`, the average rate is below
    `min_bytes_per_s` or the server sends nothing for `read_timeout_s` seconds."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    start = time.monotonic()
    done = 0
    try:
        with urllib.request.urlopen(url, timeout=read_timeout_s) as response, open(tmp, "wb") as f:
            total = int(response.headers.get("Content-Length") or 0)
            while chunk := response.read(1 << 20):
                f.write(chunk)
                done += len(chunk)
                elapsed = time.monotonic() - start
                if elapsed > grace_s and done / elapsed < min_bytes_per_s and done < total:
                    raise DownloadError(f"{url} is too slow ({done / elapsed / 1e3:.0f} kB/s)")
    except (OSError, ValueError) as e:
        tmp.unlink(missing_ok=True)
        raise DownloadError(f"{url}: {e}") from e
    except DownloadError:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, dest)
    return dest
