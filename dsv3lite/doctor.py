"""``python -m dsv3lite doctor``: is this machine ready for the course? One line per check.

Each check prints OK, WARN or FAIL, what it found, and for a problem the command that fixes it;
the exit status is 1 when any check fails. Meant for the first five minutes of a workshop
(``make doctor``), and for the learner whose notebook does not start.

It only needs the standard library to start: when torch itself is broken, ``python -m
dsv3lite`` cannot even load the package, but ``python dsv3lite/doctor.py`` still runs and says
what is missing. Everything it inspects goes through the small probe functions at the top,
which the tests replace to walk every failure path.
"""

from __future__ import annotations

import importlib
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

OK, WARN, FAIL = "OK", "WARN", "FAIL"
GiB = 1024**3
ROOT = Path(__file__).resolve().parent.parent  # the checkout this file belongs to
MIN_PYTHON = (3, 10)
TORCH_PIN = "torch==2.13.0"
TRITON_PIN = "triton==3.7.1"  # what torch 2.13 pins; its interpreter takes numpy 2.4
MEMORY_RECOMMENDED, MEMORY_MINIMUM = 4 * GiB, 1 * GiB
DISK_RECOMMENDED, DISK_MINIMUM = 3 * GiB, 1 * GiB


@dataclass
class Result:
    """One check's verdict: ``fix`` says what to run when the status is not OK."""

    name: str
    status: str
    detail: str
    fix: str = ""

    def line(self) -> str:
        text = f"{self.status:<5} {self.name:<9} {self.detail}"
        return f"{text} → {self.fix}" if self.fix else text


# ------------------------------------------------------------------------------ probes
def _version_info() -> tuple[int, ...]:
    return tuple(sys.version_info[:3])


def _import(name: str):
    return importlib.import_module(name)


def _platform() -> tuple[str, str]:
    return platform.system(), platform.machine()


INTERPRETER_PROBE = """
import os
os.environ["TRITON_INTERPRET"] = "1"
import torch
import triton
import triton.language as tl


@triton.jit
def add_n_times(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], tl.float32)
    for _ in range(n):  # a runtime loop: where numpy >= 2.4 breaks triton 3.6's interpreter
        acc += tl.load(x_ptr + offs)
    tl.store(x_ptr + offs, acc)


x = torch.ones(16)
add_n_times[(1,)](x, 3, BLOCK=16)
assert torch.equal(x, torch.full((16,), 3.0)), x.tolist()
print("interpreter ok")
"""


def _interpreter_probe(timeout_s: float = 300.0) -> tuple[bool, str]:
    """Run a tiny kernel with TRITON_INTERPRET=1 in a fresh interpreter (the variable must be
    set before a kernel is defined, so not in this process). Returns (worked, last error line).
    Triton reads a kernel's source from its file, hence a temporary file rather than ``-c``."""
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "triton_interpreter_probe.py"
        script.write_text(INTERPRETER_PROBE)
        try:
            proc = subprocess.run(
                [sys.executable, str(script)],
                capture_output=True,
                text=True,
                timeout=timeout_s,
                env={**os.environ, "TRITON_INTERPRET": "1"},
            )
        except subprocess.TimeoutExpired:
            return False, f"a tiny kernel took more than {timeout_s:.0f} s"
    if proc.returncode == 0 and "interpreter ok" in proc.stdout:
        return True, ""
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    return False, lines[-1] if lines else f"exit status {proc.returncode}"


def _kernelspecs() -> dict[str, list[str]]:
    """Jupyter kernels this environment's Jupyter sees (``jupyter kernelspec list``): name →
    the command it starts."""
    from jupyter_client.kernelspec import KernelSpecManager

    manager = KernelSpecManager()
    return {name: manager.get_kernel_spec(name).argv for name in manager.find_kernel_specs()}


def _memory() -> tuple[int, int] | None:
    """(available, total) bytes of RAM, or None when this platform does not say."""
    try:
        import psutil

        vm = psutil.virtual_memory()
        return vm.available, vm.total
    except ImportError:
        pass
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        kib = {k: int(v.split()[0]) * 1024 for k, v in fields.items()}
        return kib["MemAvailable"], kib["MemTotal"]
    except (OSError, KeyError, ValueError):
        return None


def _free_disk(path: Path) -> int:
    return shutil.disk_usage(path).free


def _load() -> tuple[float, int]:
    """(1-minute load average, CPU cores); load is 0.0 where the platform has none."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = 0.0
    return load, os.cpu_count() or 1


def _loopback() -> None:
    """Open a TCP server on 127.0.0.1 and connect to it, as gloo's rendezvous does."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        with socket.create_connection(server.getsockname(), timeout=5):
            pass


# ------------------------------------------------------------------------------ helpers
def _python() -> str:
    """This interpreter, as the user would type it in fix commands."""
    exe = Path(sys.executable)
    try:
        return str(exe.relative_to(Path.cwd()))
    except ValueError:
        return str(exe)


def _pip(spec: str) -> str:
    return f"{_python()} -m pip install {spec}"


def _version(text: str) -> tuple[int, ...]:
    """'2.13.0+cpu' → (2, 13, 0); '2.4.0rc1' → (2, 4, 0)."""
    match = re.match(r"\d+(\.\d+)*", text)
    return tuple(int(part) for part in match.group(0).split(".")) if match else ()


def _try_import(name: str):
    """(module, None) or (None, 'ErrorType: message')."""
    try:
        return _import(name), None
    except Exception as err:  # noqa: BLE001 - a broken install raises anything
        return None, f"{type(err).__name__}: {err}"


# ------------------------------------------------------------------------------ checks
def check_python() -> Result:
    version = _version_info()
    shown = ".".join(map(str, version))
    if version < MIN_PYTHON:
        return Result(
            "python",
            FAIL,
            f"{shown} is too old (3.10 or newer needed)",
            "install Python 3.11, then rebuild the environment: make clean demo PYTHON=python3.11",
        )
    return Result("python", OK, f"{shown} ({_python()})")


def check_torch() -> Result:
    torch, error = _try_import("torch")
    if torch is None:
        return Result(
            "torch",
            FAIL,
            f"cannot import torch ({error})",
            f"make demo (builds .venv with {TORCH_PIN}, the CPU build); in your own environment "
            f"{_pip(TORCH_PIN)} --index-url https://download.pytorch.org/whl/cpu",
        )
    version = torch.__version__
    if _version(version) < (2, 8):
        return Result("torch", FAIL, f"{version} is older than 2.8", _pip(TORCH_PIN))
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        return Result("torch", OK, f"{version}, CUDA {torch.version.cuda}, GPU: {name}")
    if torch.version.cuda:
        return Result(
            "torch",
            OK,
            f"{version} (a CUDA build; no GPU visible, so everything runs on the CPU — the CPU "
            "build is a tenth of the download)",
        )
    return Result("torch", OK, f"{version} (CPU build; the course runs on the CPU)")


def _numpy_breaks_triton(numpy_version: str, triton_version: str | None) -> bool:
    """The interpreter of triton 3.6 and older fails at a range() loop with numpy >= 2.4."""
    return (
        triton_version is not None
        and _version(triton_version)[:2] <= (3, 6)
        and _version(numpy_version) >= (2, 4)
    )


def check_numpy() -> Result:
    numpy, error = _try_import("numpy")
    if numpy is None:
        return Result("numpy", FAIL, f"cannot import numpy ({error})", _pip("'numpy<2.4'"))
    triton, _ = _try_import("triton")
    triton_version = getattr(triton, "__version__", None)
    if _numpy_breaks_triton(numpy.__version__, triton_version):
        return Result(
            "numpy",
            FAIL,
            f"{numpy.__version__} breaks triton {triton_version}'s CPU interpreter (TypeError: "
            "only 0-dimensional arrays can be converted to Python scalars)",
            _pip("'numpy<2.4'"),
        )
    return Result("numpy", OK, numpy.__version__)


def check_triton() -> Result:
    triton, error = _try_import("triton")
    if triton is None:
        system, machine = _platform()
        if (system, machine) == ("Linux", "x86_64"):
            return Result("triton", FAIL, f"cannot import triton ({error})", _pip(TRITON_PIN))
        return Result(
            "triton",
            WARN,
            f"not installed: Triton has wheels for Linux only, not for {system} {machine}; "
            "the package and every notebook run here on the kernels' torch references, and "
            "notebooks 05 and 09 show those in place of the Triton programs",
            "to step the Triton programs themselves, use Linux, WSL2 on Windows, Binder or Colab",
        )
    version = triton.__version__
    torch, _ = _try_import("torch")
    if torch is not None and torch.cuda.is_available():
        return Result("triton", OK, f"{version}, compiling for the GPU")
    worked, message = _interpreter_probe()
    if worked:
        return Result("triton", OK, f"{version}; its interpreter runs kernels on the CPU")
    numpy, _ = _try_import("numpy")
    if numpy is not None and _numpy_breaks_triton(numpy.__version__, version):
        fix = _pip("'numpy<2.4'")
    elif "took more than" in message:
        fix = "the machine is very busy: close other programs and run make doctor again"
    else:
        fix = f"{_pip(TRITON_PIN)} --force-reinstall --no-deps"
    return Result(
        "triton", FAIL, f"{version}, but a tiny kernel fails under the interpreter: {message}", fix
    )


def check_package() -> Result:
    package, error = _try_import("dsv3lite")
    if package is None:
        return Result(
            "dsv3lite",
            FAIL,
            f"cannot import the package ({error})",
            f"from the checkout: make demo, or {_pip('-e .')}",
        )
    exercises, error = _try_import("dsv3lite.exercises")
    if exercises is None:
        return Result(
            "dsv3lite",
            FAIL,
            f"the package imports, its exercises do not ({error})",
            f"reinstall from the checkout: {_pip('-e .')}",
        )
    where = Path(package.__file__).resolve().parent.parent
    if (ROOT / "pyproject.toml").exists() and where != ROOT:
        return Result(
            "dsv3lite",
            WARN,
            f"{package.__version__} imports from {where}, not from this checkout ({ROOT})",
            f"install this checkout instead: {_pip('-e .')}",
        )
    return Result("dsv3lite", OK, f"{package.__version__} from {where}")


def check_jupyter() -> Result:
    _, error = _try_import("ipykernel")
    if error:
        return Result(
            "jupyter",
            FAIL,
            f"cannot import ipykernel ({error}): notebooks have no Python kernel here",
            f"make lab (installs the dev extras), or {_pip('ipykernel jupyterlab')}",
        )
    try:
        specs = _kernelspecs()
    except Exception as err:  # noqa: BLE001 - a broken jupyter_client raises anything
        return Result(
            "jupyter",
            FAIL,
            f"cannot list the Jupyter kernels ({type(err).__name__}: {err})",
            f"{_pip('--force-reinstall jupyter_client ipykernel')}",
        )
    register = f"{_python()} -m ipykernel install --user --name dsv3lite --display-name dsv3lite"
    if "python3" not in specs:
        return Result(
            "jupyter",
            FAIL,
            f"no 'python3' kernel (found: {sorted(specs) or 'none'})",
            f"{_python()} -m ipykernel install --user",
        )
    command = specs["python3"][0]
    if os.path.isabs(command) and Path(command).resolve() != Path(sys.executable).resolve():
        return Result(
            "jupyter",
            WARN,
            f"the 'python3' kernel runs {command}, not this Python ({sys.executable}): "
            "notebooks opened with it will not find dsv3lite",
            f"{register}, then pick the kernel 'dsv3lite' (or start Jupyter with make lab)",
        )
    _, error = _try_import("jupyterlab")
    if error:
        return Result(
            "jupyter",
            WARN,
            "a 'python3' kernel, but no JupyterLab in this environment",
            f"make lab, or {_pip('jupyterlab')}",
        )
    return Result("jupyter", OK, "JupyterLab and a 'python3' kernel running this Python")


def check_widgets() -> Result:
    widgets, error = _try_import("ipywidgets")
    if widgets is None:
        return Result(
            "widgets",
            FAIL,
            f"cannot import ipywidgets ({error}): the notebooks' explore sections need it",
            f"make lab, or {_pip('ipywidgets')}",
        )
    _, error = _try_import("jupyterlab_widgets")
    if error:
        return Result(
            "widgets",
            WARN,
            f"ipywidgets {widgets.__version__}, but no jupyterlab_widgets: JupyterLab will "
            "show sliders as text",
            _pip("jupyterlab_widgets"),
        )
    return Result("widgets", OK, f"ipywidgets {widgets.__version__}")


def check_memory() -> Result:
    memory = _memory()
    free_up = (
        "close other programs (browser tabs first), and shut down the kernels of finished "
        "notebooks (JupyterLab: Kernel → Shut Down Kernel)"
    )
    if memory is None:
        return Result(
            "memory", WARN, "cannot tell how much is free (4 GiB recommended)", "check by hand"
        )
    available, total = memory
    detail = f"{available / GiB:.1f} GiB available of {total / GiB:.1f} GiB"
    if available < MEMORY_MINIMUM:
        return Result("memory", FAIL, f"{detail}: notebooks will be killed", free_up)
    if available < MEMORY_RECOMMENDED:
        return Result("memory", WARN, f"{detail} (4 GiB recommended)", free_up)
    return Result("memory", OK, detail)


def check_disk() -> Result:
    free = _free_disk(ROOT)
    detail = f"{free / GiB:.1f} GiB free on the checkout's disk"
    fix = (
        "free some space: the environment takes ~2 GiB and a wheelhouse ~1 GiB "
        "(make clean removes .venv; runs/ holds training checkpoints)"
    )
    if free < DISK_MINIMUM:
        return Result("disk", FAIL, detail, fix)
    if free < DISK_RECOMMENDED:
        return Result("disk", WARN, f"{detail} (3 GiB recommended)", fix)
    return Result("disk", OK, detail)


def check_cpu() -> Result:
    load, cores = _load()
    detail = f"{cores} cores, load {load:.1f}"
    if load > cores:
        return Result(
            "cpu",
            WARN,
            f"{detail}: other processes keep the CPU busy, so notebooks run slower than the "
            "timings in notebooks/FACILITATOR.md",
            "close them (top shows which), or run one notebook at a time",
        )
    return Result("cpu", OK, detail)


def check_loopback() -> Result:
    try:
        _loopback()
    except OSError as err:
        return Result(
            "network",
            FAIL,
            f"cannot connect to 127.0.0.1 ({err}): the multi-process sections (notebooks "
            "06, 07) rendezvous there",
            "allow local TCP connections (a firewall or VPN client may block them)",
        )
    return Result("network", OK, "127.0.0.1 accepts TCP connections (gloo's rendezvous)")


CHECKS: tuple[Callable[[], Result], ...] = (
    check_python,
    check_torch,
    check_numpy,
    check_triton,
    check_package,
    check_jupyter,
    check_widgets,
    check_memory,
    check_disk,
    check_cpu,
    check_loopback,
)


def run_checks() -> list[Result]:
    """Every check, in order; a check that crashes is reported as a FAIL of its own."""
    results = []
    for check in CHECKS:
        try:
            results.append(check())
        except Exception as err:  # noqa: BLE001 - the doctor must finish its round
            name = check.__name__.removeprefix("check_")
            results.append(
                Result(name, FAIL, f"the check itself crashed: {type(err).__name__}: {err}")
            )
    return results


def main() -> int:
    """Print one line per check and a summary; 1 when something failed, else 0."""
    print(f"dsv3lite doctor — {platform.system()} {platform.machine()}, checkout {ROOT}")
    results = run_checks()
    for result in results:
        print(result.line(), flush=True)
    fails = sum(r.status == FAIL for r in results)
    warns = sum(r.status == WARN for r in results)
    if fails:
        print(f"{fails} problem(s) to fix first (FAIL), {warns} warning(s).")
        venv = ROOT / ".venv" / "bin" / "python"
        if sys.prefix == sys.base_prefix and venv.exists():
            print(f"This is {_python()}, outside the course's environment: try make doctor.")
    elif warns:
        print(f"Ready, with {warns} warning(s).")
    else:
        print("Ready for the course.")
    return 1 if fails else 0


if __name__ == "__main__":
    # Run as a file (python dsv3lite/doctor.py), this folder is first on sys.path and its
    # modules would shadow top-level ones (config, model, train): look from elsewhere.
    if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
        sys.path.pop(0)
    sys.exit(main())
