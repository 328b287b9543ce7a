"""Run a real NVIDIA Triton Inference Server on a repository written by `edge-mmm export --format triton-server`.

The server is the `tritonserver` binary that the `nvidia-pytriton` wheel ships (Triton 2.51, Python backend only,
CPU). It is run directly, the way pytriton itself runs it:
- `nvidia-pytriton` lives in its own Python environment (default: `<this venv>/triton`, or the `EDGE_MMM_TRITON_ENV`
  variable), with `onnxruntime` and `tokenizers` for our Python-backend models. Its own environment because
  the Python-backend stub reads numpy arrays through numpy 1.x's ABI (pytriton pins numpy<2; with numpy 2 every
  output tensor fails with "output tensor shape does not match size"), while edge-mmm's venv has numpy 2.
- The stub embeds that environment's interpreter: the wheel has one stub per Python version
  (`python_backend_stubs/X.Y`); it is copied into a private backend directory next to `libtriton_python.so`, and
  the environment's `bin/` goes first on PATH (the embedded interpreter finds its `sys.prefix`, hence the venv's
  site-packages, from `python3` on PATH). `LD_LIBRARY_PATH` gets the wheel's `nvidia_pytriton.libs` and the
  interpreter's own `libpython3.X.so` directory.
- HTTP and gRPC bind 127.0.0.1 on free ports by default; metrics are off. The server is stopped by its PID
  (SIGTERM: Triton unloads every model and exits 0).
A repository the server refuses (a config that disagrees with its model, a missing model file) makes `start()`
raise `ModelFileError` with the server's own message for each model that failed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Union

from edge_mmm.errors import EdgeMMMError, InputError, ModelFileError

ENV_VAR = "EDGE_MMM_TRITON_ENV"
INSTALL_HINT = ("python3 -m venv {env} && {env}/bin/pip install nvidia-pytriton==0.7.0 onnxruntime tokenizers")
_PROBE = r"""
import importlib.util, json, sys, sysconfig
spec = importlib.util.find_spec("pytriton")
try:
    import numpy
    np_version = numpy.__version__
except ImportError:
    np_version = None
mods = {m: importlib.util.find_spec(m) is not None for m in ("onnxruntime", "tokenizers")}
print(json.dumps({"version": "%d.%d" % sys.version_info[:2], "pytriton": spec and list(spec.submodule_search_locations)[0],
                  "libdir": sysconfig.get_config_var("LIBDIR"), "ldlibrary": sysconfig.get_config_var("LDLIBRARY"),
                  "numpy": np_version, "modules": mods}))
"""


class TritonServerError(EdgeMMMError):
    """The server did not start, did not get ready in time, or did not stop cleanly."""


@dataclass(frozen=True)
class TritonInstall:
    """Where the pieces of a pytriton-shipped Triton are, for one Python environment."""

    env: Path  # the environment whose interpreter runs the Python-backend stub
    server: Path  # tritonserver
    backends: Path  # backends/ of the wheel (python/libtriton_python.so + triton_python_backend_utils.py)
    stub: Path  # the stub built for the environment's Python version
    libs: List[Path]  # LD_LIBRARY_PATH entries


def default_env() -> Path:
    return Path(os.environ.get(ENV_VAR) or Path(sys.prefix) / "triton")


def find_triton(env: Union[str, Path, None] = None) -> TritonInstall:
    """The Triton server of the nvidia-pytriton wheel installed in `env`; ModelFileError (with the command
    that installs it) when it is missing or unusable."""
    env = Path(env) if env is not None else default_env()
    hint = INSTALL_HINT.format(env=env)
    python = env / "bin" / "python"
    if not python.exists():
        raise ModelFileError(f"no Triton environment at {env} (set {ENV_VAR} to another); create it with: {hint}")
    try:
        probe = json.loads(subprocess.run([str(python), "-c", _PROBE], capture_output=True, text=True, check=True,
                                          timeout=60).stdout)
    except (subprocess.SubprocessError, ValueError, OSError) as exc:
        raise ModelFileError(f"cannot inspect the Python of the Triton environment {env}: {exc}") from exc
    if not probe["pytriton"]:
        raise ModelFileError(f"nvidia-pytriton is not installed in {env}; install it with: {hint}")
    missing = [m for m, ok in probe["modules"].items() if not ok]
    if missing or probe["numpy"] is None:
        raise ModelFileError(f"the Triton environment {env} lacks {', '.join(missing or ['numpy'])} (our Python-"
                             f"backend models import them); install it with: {hint}")
    if int(probe["numpy"].split(".")[0]) >= 2:
        raise ModelFileError(f"the Triton environment {env} has numpy {probe['numpy']}: the Python-backend stub of "
                             f"nvidia-pytriton 0.7 needs numpy < 2 (pip install 'numpy<2' there)")
    root = Path(probe["pytriton"]) / "tritonserver"
    stub = root / "python_backend_stubs" / probe["version"] / "triton_python_backend_stub"
    server = root / "bin" / "tritonserver"
    for f in (server, stub, root / "backends" / "python" / "libtriton_python.so"):
        if not f.is_file():
            raise ModelFileError(f"{f} is missing: nvidia-pytriton in {env} is incomplete or has no stub for "
                                 f"Python {probe['version']}")
    libs = [Path(probe["pytriton"]).parent / "nvidia_pytriton.libs"]
    if probe["libdir"] and probe["ldlibrary"] and (Path(probe["libdir"]) / probe["ldlibrary"]).exists():
        libs.append(Path(probe["libdir"]))  # this interpreter's libpython, not another 3.X on the system
    return TritonInstall(env, server, root / "backends", stub, libs)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


_ROW = re.compile(r"^\|\s*(\S+)\s*\|\s*(\S+)\s*\|\s*(.*?)\s*\|\s*$")


def model_errors(log: str) -> Dict[str, str]:
    """{model: status} of every model that is not READY in the server's model table (the lines
    `| name | version | UNAVAILABLE: ... |`), and of `failed to load 'name'` log lines."""
    errors: Dict[str, str] = {}
    in_table = False
    for line in log.splitlines():
        m = _ROW.match(line.strip())
        if m and m.group(1) == "Model" and m.group(2) == "Version":
            in_table = True
        elif m and in_table and m.group(3) != "READY":
            errors[m.group(1)] = m.group(3)
        elif not m and in_table and not line.strip().startswith("+"):
            in_table = False
    for m in re.finditer(r"failed to load '([^']+)' version \d+: (.*)", log):
        errors.setdefault(m.group(1), m.group(2).strip().rstrip('"'))
    return errors


class TritonServer:
    """A tritonserver process on `repository`: `start()` (waits for readiness), `stop()` (by PID), context
    manager. `http_url` / `grpc_url` say where it listens; `log()` is everything it printed."""

    def __init__(self, repository: Union[str, Path], install: Optional[TritonInstall] = None,
                 host: str = "127.0.0.1", http_port: int = 0, grpc_port: int = 0, verbose: int = 0):
        self.repository = Path(repository).resolve()
        if not (self.repository.is_dir() and any(p.is_dir() for p in self.repository.iterdir())):
            raise InputError(f"{self.repository} is not a Triton model repository (no model folders)")
        self.install = install or find_triton()
        self.host, self.verbose = host, verbose
        self.http_port, self.grpc_port = http_port or free_port(host), grpc_port or free_port(host)
        self.process: Optional[subprocess.Popen] = None
        self._work: Optional[Path] = None
        self._log_path: Optional[Path] = None
        self._saved_log = ""

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def pid(self) -> Optional[int]:
        return self.process.pid if self.process else None

    def log(self) -> str:
        if self._log_path is None or not self._log_path.exists():
            return self._saved_log
        return self._log_path.read_text(errors="replace")

    def _backend_dir(self) -> Path:
        """A private copy of the wheel's backends/ with the stub for our Python beside libtriton_python.so."""
        dst = self._work / "backends"
        shutil.copytree(self.install.backends, dst)
        shutil.copy2(self.install.stub, dst / "python" / "triton_python_backend_stub")
        return dst

    def command(self, backends: Path) -> List[str]:
        return [str(self.install.server), f"--model-repository={self.repository}",
                f"--backend-directory={backends}", f"--http-address={self.host}", f"--http-port={self.http_port}",
                f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}", "--allow-metrics=false",
                "--exit-on-error=true", "--strict-readiness=true", f"--log-verbose={self.verbose}"]

    def env(self) -> Dict[str, str]:
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = os.pathsep.join([str(p) for p in self.install.libs]
                                                 + ([env["LD_LIBRARY_PATH"]] if env.get("LD_LIBRARY_PATH") else []))
        env["PATH"] = os.pathsep.join([str(self.install.env / "bin"), env.get("PATH", "")])
        env.pop("PYTHONHOME", None)
        return env

    def start(self, timeout: float = 120.0) -> "TritonServer":
        if self.process is not None:
            raise TritonServerError("this server is already started")
        self._work = Path(tempfile.mkdtemp(prefix="edge-mmm-triton-"))
        self._log_path = self._work / "tritonserver.log"
        backends = self._backend_dir()
        with open(self._log_path, "wb") as log:
            self.process = subprocess.Popen(self.command(backends), env=self.env(), stdout=log,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self._work,
                                            start_new_session=True)
        try:
            self._wait_ready(timeout)
        except BaseException:
            self._kill()
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        url = f"http://{self.http_url}/v2/health/ready"
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                self._refused(code)
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        errors = model_errors(self.log())
        raise TritonServerError(f"tritonserver on {self.repository} was not ready after {timeout:.0f} s"
                                + (": " + "; ".join(f"{k}: {v}" for k, v in errors.items()) if errors else "")
                                + "; last log lines: " + " | ".join(self.log().strip().splitlines()[-3:]))

    def _refused(self, code: int) -> None:
        log = self.log()
        errors = model_errors(log)
        if errors:
            detail = "; ".join(f"model '{k}': {v}" for k, v in sorted(errors.items()))
            raise ModelFileError(f"Triton refused the model repository {self.repository}: {detail}")
        tail = "\n".join(log.strip().splitlines()[-5:])
        raise TritonServerError(f"tritonserver exited with code {code} before it was ready: {tail}")

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM to the server's PID, wait for it to exit; its exit code (0 = clean shutdown)."""
        if self.process is None:
            return 0
        proc, self.process = self.process, None
        try:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    raise TritonServerError(f"tritonserver (pid {proc.pid}) did not stop within {timeout:.0f} s; "
                                            f"killed")
            return proc.returncode
        finally:
            self._cleanup()

    def _kill(self) -> None:
        proc, self.process = self.process, None
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        self._cleanup()

    def _cleanup(self) -> None:
        if self._work is not None:
            self._saved_log = self.log()
            shutil.rmtree(self._work, ignore_errors=True)
            self._work = None

    def __enter__(self) -> "TritonServer":
        return self.start() if self.process is None else self

    def __exit__(self, *exc) -> None:
        self.stop()
