"""The build must never silently fall back to CPU-only where the CUDA kernels can be compiled, and a
source distribution must hold everything the build reads."""
import functools
import os
import re
import shutil
import subprocess
import sys
import tarfile

import pytest
import torch

import nice_ext
from conftest import needed_shared_libraries, run_python


def test_cuda_kernels_are_compiled_whenever_they_can_be():
    if os.environ.get("NICE_EXT_CPU_ONLY", "0") not in ("", "0"):
        pytest.skip("a CPU-only build was asked for")
    can_build = torch.version.cuda is not None and (shutil.which("nvcc") is not None or bool(os.environ.get("CUDA_HOME")))
    if not can_build:
        pytest.skip("torch is not a CUDA build or no CUDA toolkit is installed")
    assert nice_ext.cuda_kernels_built(), "a CUDA torch and nvcc are present, but the CUDA kernels were not compiled"


NICE_EXT_OPS = ("coupling_update", "coupling_update_backward", "affine_coupling_update",
                "affine_coupling_update_backward", "scale_prior", "scale_prior_backward", "scale_inverse")
# The backward ops' composite twins, for higher-order gradients: reference code, no backend kernels.
COMPOSITE_OPS = tuple(f"{op}_composite" for op in NICE_EXT_OPS if op.endswith("_backward"))


def test_every_op_has_a_kernel_per_backend():
    registered = sorted(n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("nice_ext::"))
    assert registered == sorted(NICE_EXT_OPS + COMPOSITE_OPS), \
        "an op was added or removed: update NICE_EXT_OPS and its tests"
    for op in NICE_EXT_OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"nice_ext::{op}", "CPU")
        if nice_ext.cuda_kernels_built():
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"nice_ext::{op}", "CUDA")
    for op in COMPOSITE_OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"nice_ext::{op}", "CompositeImplicitAutograd")


def test_every_op_has_its_autograd_kernel_in_cpp():
    """Autograd is registered in C++ next to each op's entry points (csrc/<op>.cpp), not from Python, whose
    autograd.Function costs tens of microseconds per call that needs a gradient. The backward ops have one
    too: it runs the fused kernel, or the composite twin for a higher-order gradient."""
    for op in NICE_EXT_OPS:
        dump = torch._C._dispatch_dump(f"nice_ext::{op}")
        (autograd_line,) = [line for line in dump.splitlines() if line.startswith("Autograd")]
        registered_at = autograd_line.split("registered at ", 1)[1].split(" ::")[0]
        assert os.path.basename(os.path.dirname(registered_at)) == "csrc" and ".cpp:" in registered_at, autograd_line


def test_every_forward_op_has_a_public_wrapper():
    for op in NICE_EXT_OPS:
        if not op.endswith("_backward"):
            assert op in nice_ext.__all__ and callable(getattr(nice_ext, op)), f"nice_ext.{op} is not exported"


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_source_distribution_holds_every_kernel_source_and_header(tmp_path):
    """`pip install nice_ext-0.1.0.tar.gz` compiles from the sdist alone. Made on a CPU-only build, which
    configures no .cu sources, it must still carry them, and every header the kernels include."""
    env = dict(os.environ, NICE_EXT_CPU_ONLY="1")
    made = subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path), "sdist", "-d",
                           str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr[-2000:]
    (archive,) = tmp_path.glob("nice_ext-*.tar.gz")
    with tarfile.open(archive) as sdist:
        packed = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    kernel_files = {os.path.relpath(os.path.join(folder, name), ROOT)
                    for folder, _, names in os.walk(os.path.join(ROOT, "csrc")) for name in names}
    assert any(name.endswith(".cu") for name in kernel_files) and any(name.endswith(".h") for name in kernel_files)
    needed = kernel_files | {"setup.py", "requirements.txt", "README.md"}
    assert not needed - packed, f"missing from the sdist: {sorted(needed - packed)}"


def test_a_build_without_torch_says_what_to_do(tmp_path):
    """pip's default isolated build environment has no torch: the build says how to install, no traceback."""
    hidden = tmp_path / "torch"
    hidden.mkdir()
    (hidden / "__init__.py").write_text("raise ImportError(\"No module named 'torch'\")\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path), NICE_EXT_CPU_ONLY="1")
    done = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode != 0
    assert "pip install --no-build-isolation -e ." in done.stderr and "Traceback" not in done.stderr, done.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ELF shared objects")
def test_the_extension_loads_the_shared_cxx_runtime():
    """nice_ext._C must share the process's libstdc++, not carry a copy: with a copy linked in (by a compiler
    that links libstdc++.a), every TORCH_CHECK that formats a number crashed the process instead of raising."""
    needed = needed_shared_libraries(nice_ext._C.__file__)
    if needed is None:
        pytest.skip("readelf (binutils) is not installed")
    assert "libstdc++.so.6" in needed, f"nice_ext._C does not load libstdc++.so.6, only {needed}"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="GCC-style drivers on Linux")
def test_a_compiler_without_a_shared_cxx_runtime_is_given_this_processs(tmp_path):
    """A driver that finds no shared libstdc++ (it answers -print-file-name with the bare name) is told to
    link against the libstdc++.so.6 that torch loaded; one that finds it (the compiler here) is left alone."""
    driver = tmp_path / "static-runtime-g++"
    driver.write_text('#!/bin/sh\nfor a in "$@"; do case $a in -print-file-name=*) echo "${a#*=}"; exit 0;; '
                      'esac; done\nexec c++ "$@" -static-libstdc++\n')
    driver.chmod(0o755)
    said = {}
    for name, cxx in (("static", str(driver)), ("here", os.environ.get("CXX", "c++"))):
        env = dict(os.environ, CXX=cxx, NICE_EXT_CPU_ONLY="1")
        done = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        said[name] = done.stdout
    assert "finds no shared libstdc++; linking against /" in said["static"] and "libstdc++.so" in said["static"]
    if shutil.which(os.environ.get("CXX", "c++").split()[0]):
        assert "finds no shared libstdc++" not in said["here"]


def test_kernel_sources_changed_after_the_build_are_named(tmp_path):
    from nice_ext.build_support import kernel_sources_newer_than

    library = tmp_path / "nice_ext" / "_C.so"
    (tmp_path / "nice_ext").mkdir()
    library.write_bytes(b"")
    built = os.path.getmtime(library)
    (tmp_path / "csrc" / "cuda").mkdir(parents=True)
    for name in ("ops.cpp", "cuda/kernel.cu", "cuda/kernel.cuh", "NOTES.txt"):
        (tmp_path / "csrc" / name).write_text("")
        os.utime(tmp_path / "csrc" / name, (built - 100, built - 100))
    assert kernel_sources_newer_than(str(library), str(tmp_path / "csrc")) == []
    for name in ("cuda/kernel.cuh", "NOTES.txt"):  # an edit, a git pull; not a kernel source
        os.utime(tmp_path / "csrc" / name, (built + 10, built + 10))
    assert kernel_sources_newer_than(str(library), str(tmp_path / "csrc")) == [os.path.join("csrc", "cuda", "kernel.cuh")]
    assert kernel_sources_newer_than(str(library), str(tmp_path / "elsewhere")) == []  # an installed package


def test_kernel_sources_are_compared_with_the_build_by_content(tmp_path):
    """With the digests a build recorded, a source touched but unchanged (a checkout of another branch and
    back, a stash) does not count; an edit, a new source and a removed one do."""
    from nice_ext.build_support import (kernel_sources_changed, parse_source_digests, source_digests,
                                        source_digests_header)

    library = tmp_path / "nice_ext" / "_C.so"
    (tmp_path / "nice_ext").mkdir()
    library.write_bytes(b"")
    built = os.path.getmtime(library)
    csrc = tmp_path / "csrc"
    (csrc / "cpu").mkdir(parents=True)
    for name in ("ops.cpp", "cpu/kernel.cpp", "cpu/gone.h"):
        (csrc / name).write_text(f"// {name}\n")
        os.utime(csrc / name, (built - 100, built - 100))
    header = source_digests_header(str(csrc))
    # what ops.cpp's C string holds once compiled: the header's escaped newlines as newlines
    built_from = parse_source_digests(re.search(r'"(.*)"', header).group(1).replace("\\n", "\n"))
    assert built_from == source_digests(str(csrc)) and sorted(built_from) == \
        ["csrc/cpu/gone.h", "csrc/cpu/kernel.cpp", "csrc/ops.cpp"]
    changed = functools.partial(kernel_sources_changed, str(library), str(csrc))
    assert changed(built_from) == []
    os.utime(csrc / "ops.cpp", (built + 10, built + 10))  # touched, not changed
    assert changed(built_from) == [] and changed({}) == ["csrc/ops.cpp"]  # ({}: a build without digests)
    (csrc / "cpu" / "kernel.cpp").write_text("// an edit\n")
    os.utime(csrc / "cpu" / "kernel.cpp", (built + 10, built + 10))
    (csrc / "cpu" / "gone.h").unlink()
    (csrc / "cpu" / "new.cu").write_text("")
    os.utime(csrc / "cpu" / "new.cu", (built + 10, built + 10))
    assert changed(built_from) == ["csrc/cpu/kernel.cpp", "csrc/cpu/new.cu", "csrc/cpu/gone.h (removed)"]
    assert kernel_sources_changed(str(library), str(tmp_path / "elsewhere"), built_from) == []


def test_the_extension_records_the_sources_it_was_built_from():
    """setup.py compiles the digests of csrc into the extension: built from this checkout, they are its
    sources' (CI builds it anew; a build left over from other sources is what the import warns of)."""
    from nice_ext.build_support import parse_source_digests, source_digests

    assert parse_source_digests(nice_ext._C.source_digests()) == source_digests(os.path.join(ROOT, "csrc"))
    assert nice_ext.ops.stale_kernel_sources() == []


def test_a_checkout_whose_kernels_are_missing_or_do_not_load_says_what_to_do(tmp_path):
    """Python's own words were "cannot import name '_C' from partially initialized module 'nice_ext' (most
    likely due to a circular import)" for a checkout not yet built."""
    package = os.path.dirname(nice_ext.__file__)
    shutil.copytree(package, tmp_path / "nice_ext", ignore=shutil.ignore_patterns("_C*.so", "__pycache__"))
    # the import must find this copy alone, not the extension of an editable install
    code = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, '__module__', '')"
            ".startswith('__editable__') and not type(f).__module__.startswith('__editable__')]; import nice_ext")

    def import_error():
        done = run_python(code, cwd=tmp_path, pythonpath=str(tmp_path))
        assert done.returncode == 1
        return done.stderr.strip().splitlines()[-1]

    assert import_error() == (f"ImportError: nice_ext's compiled kernels (nice_ext._C) are not built in "
                              f"{tmp_path / 'nice_ext'}: build them with pip install --no-build-isolation -e . "
                              f"in the checkout")
    (tmp_path / "nice_ext" / os.path.basename(nice_ext._C.__file__)).write_bytes(b"not a library")
    said = import_error()
    assert f"do not load here (torch {torch.__version__}" in said and "file too short" in said
    assert said.endswith("rebuild with pip install --no-build-isolation -e . in the checkout")


def test_importing_a_checkout_whose_kernels_are_older_than_its_sources_warns(tmp_path):
    """A checkout changed after `pip install -e .` (an edit, a git pull) runs the kernels built before."""
    package = os.path.dirname(nice_ext.__file__)
    shutil.copytree(package, tmp_path / "nice_ext", ignore=shutil.ignore_patterns("_C*.so", "__pycache__"))
    os.symlink(nice_ext._C.__file__, tmp_path / "nice_ext" / os.path.basename(nice_ext._C.__file__))
    shutil.copytree(os.path.join(ROOT, "csrc"), tmp_path / "csrc")  # the sources it was built from
    source = tmp_path / "csrc" / "ops.cpp"
    original = source.read_bytes()
    source.write_text("")
    built = os.path.getmtime(nice_ext._C.__file__)

    def import_stderr():
        done = run_python("import nice_ext", cwd=tmp_path, pythonpath=str(tmp_path))
        assert done.returncode == 0, done.stderr
        return done.stderr

    os.utime(source, (built - 100, built - 100))
    assert "changed after the compiled kernels" not in import_stderr()
    os.utime(source, (built + 10, built + 10))
    said = import_stderr()
    assert "csrc/ops.cpp changed after the compiled kernels" in said
    source.write_bytes(original)  # the source it was built from, touched
    os.utime(source, (built + 10, built + 10))
    assert "changed after the compiled kernels" not in import_stderr()
    assert "rebuild with pip install --no-build-isolation -e ." in said


def test_the_installation_report_checks_the_kernels_on_every_device():
    """``python -m nice_ext`` says what was built and checks the fused ops against the reference here."""
    done = subprocess.run([sys.executable, "-m", "nice_ext"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"CUDA kernels built: {'yes' if nice_ext.cuda_kernels_built() else 'no'}" in done.stdout
    assert "kernel check on cpu: ok" in done.stdout
    if torch.cuda.is_available():
        assert "kernel check on cuda:0: ok" in done.stdout
    helped = subprocess.run([sys.executable, "-m", "nice_ext", "--help"], capture_output=True, text=True, timeout=300)
    assert helped.returncode == 0 and "kernel check" not in helped.stdout  # the usage, not the report
    assert all(f"python -m nice_ext.{tool} " in helped.stdout for tool in ("train", "evaluate", "sample", "inpaint"))
    refused = subprocess.run([sys.executable, "-m", "nice_ext", "--gpu"], capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "unrecognized arguments: --gpu" in refused.stderr


def test_the_installation_report_checks_second_derivatives():
    """A composite twin that computed wrong gradients (or a build whose backward ops had no autograd kernel, as
    before the twins: it was off by 16 and 856 here) fails the check. In a process of its own: torch keeps
    an overridden kernel for the tracing of later tests even after the override is removed."""
    script = (
        "import torch, warnings, nice_ext\n"
        "from nice_ext import __main__ as report\n"
        "def wrong(*args):\n"
        "    return tuple(1.01 * t for t in nice_ext.reference.scale_prior_backward(*args))\n"
        "override = torch.library.Library('nice_ext', 'IMPL')\n"
        "with warnings.catch_warnings():\n"
        "    warnings.simplefilter('ignore')  # overriding a previously registered kernel\n"
        "    override.impl('scale_prior_backward_composite', wrong, 'CompositeImplicitAutograd')\n"
        "print('\\n'.join(report.check(torch.device('cpu'))))\n")
    done = run_python(script)
    assert done.returncode == 0, done.stderr
    problems = done.stdout.splitlines()
    assert len(problems) == 2 and all("the second derivative differs from the reference" in p for p in problems), \
        problems
    from nice_ext import __main__ as report

    assert report.check(torch.device("cpu")) == []


def test_the_installation_report_names_a_kernel_that_disagrees(monkeypatch):
    from nice_ext import __main__ as report

    assert report.check(torch.device("cpu")) == []
    scale_inverse = nice_ext.ops.scale_inverse
    monkeypatch.setattr(nice_ext.ops, "scale_inverse", lambda z, log_scale: scale_inverse(z, log_scale) * 1.001)
    problems = report.check(torch.device("cpu"))
    assert len(problems) == 2 and all("inverse differs from the reference" in p for p in problems), problems

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel image is available for execution on the device\nand more")

    monkeypatch.setattr(nice_ext.ops, "affine_coupling_update_indexed", broken)
    problems = report.check(torch.device("cpu"))
    assert problems[1] == "affine coupling, gaussian prior, checkerboard masks: RuntimeError: no kernel image " \
                          "is available for execution on the device", problems
    assert report.main([]) == 1  # (no arguments: not pytest's)
