"""A static blob origin for tests, demos and benchmarks: nginx from the distribution, checking signed URLs.

`location_block` is the server configuration a production origin needs too
(docs/internals.md quotes it): nginx's `secure_link` checks the per-device
token `tether.controller.blob_urls` signs (403 forged or altered, 410
expired) and serves the controller's blob directory as it is. `NginxOrigin`
runs it on a free loopback port with a private prefix (no root needed).
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import socket
import subprocess
import time

NGINX_CANDIDATES = ("nginx", "/usr/sbin/nginx")
# In nginx's default ("combined") access log line: `"GET /blobs/... HTTP/1.1" 206 1048576 "referer" ...`
_STATUS_AND_BYTES = re.compile(r'" (\d{3}) (\d+) "')
_DEVICE = re.compile(r"[?&]device=([^&\s\"]+)")


def nginx_binary() -> str | None:
    """The nginx executable, or None when it is not installed (`apt-get install nginx-light`)."""
    for name in NGINX_CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


def location_block(*, path: str, root: pathlib.Path, secret: str) -> str:
    """The nginx `location` serving `root` under `path` to holders of a valid, unexpired signed URL."""
    path = "/" + path.strip("/") + "/"
    return f"""
    location {path} {{
      secure_link $arg_md5,$arg_expires;
      secure_link_md5 "$secure_link_expires$uri$arg_device {secret}";
      if ($secure_link = "") {{ return 403; }}
      if ($secure_link = "0") {{ return 410; }}
      alias {root}/;
      add_header Cache-Control "public, max-age=31536000, immutable";
    }}"""


class NginxOrigin:
    """nginx serving `root` under `http://127.0.0.1:<port><path>`; `start()`, then `stop()`."""

    def __init__(
        self,
        *,
        root: pathlib.Path,
        secret: str,
        workdir: pathlib.Path,
        path: str = "/blobs/",
        worker_connections: int = 1024,
    ) -> None:
        binary = nginx_binary()
        if binary is None:
            raise FileNotFoundError("nginx is not installed (apt-get install nginx-light)")
        self.binary = binary
        self.root = pathlib.Path(root).resolve()
        self.secret = secret
        self.workdir = pathlib.Path(workdir)
        self.path = "/" + path.strip("/") + "/"
        self.worker_connections = max(64, worker_connections)
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.path}"

    def config(self) -> str:
        prefix = self.workdir
        user = "user root;\n" if os.geteuid() == 0 else ""  # workers must read a private test directory
        temps = "\n".join(
            f"  {kind}_temp_path {prefix}/tmp/{kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        return f"""{user}daemon off;
worker_processes 1;
worker_rlimit_nofile {self.worker_connections * 2};
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections {self.worker_connections}; }}
http {{
  access_log {prefix}/access.log;
{temps}
  sendfile on;
  server {{
    listen 127.0.0.1:{self.port};
{location_block(path=self.path, root=self.root, secret=self.secret)}
  }}
}}
"""

    def start(self, *, timeout_s: float = 10.0) -> NginxOrigin:
        for _ in range(5):  # a free port may be taken between choosing and binding it: choose again
            self.port = _free_port()
            (self.workdir / "tmp").mkdir(parents=True, exist_ok=True)
            conf = self.workdir / "nginx.conf"
            conf.write_text(self.config())
            self._proc = subprocess.Popen(
                [self.binary, "-p", str(self.workdir), "-c", str(conf), "-e", str(self.workdir / "error.log")],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline and self._proc.poll() is None:
                try:
                    with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                        return self
                except OSError:
                    time.sleep(0.02)
            self.stop()
        log = (self.workdir / "error.log").read_text() if (self.workdir / "error.log").exists() else ""
        raise RuntimeError(f"nginx did not start: {log[-2000:]}")

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def access_log(self) -> str:
        path = self.workdir / "access.log"
        return path.read_text() if path.exists() else ""

    def devices(self) -> set[str]:
        """The device ids of the signed URLs requested so far (each URL names its device)."""
        return set(_DEVICE.findall(self.access_log()))

    def served(self) -> tuple[int, int]:
        """(requests, body bytes sent) so far, from the access log (nginx writes each request as it ends)."""
        requests = sent = 0
        for match in _STATUS_AND_BYTES.finditer(self.access_log()):
            requests += 1
            sent += int(match.group(2))
        return requests, sent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
