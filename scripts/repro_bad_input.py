"""Bad inputs to the ops must raise a RuntimeError with a clear message, with CUDA tensors too.

On one CUDA machine (H100, torch 2.11) these calls crashed with SIGSEGV instead of raising, CPU tensors
too: its compiler linked libstdc++ statically into the extension, whose private stream code then crashed
formatting a number into the message (setup.py now links the shared libstdc++). Each case below runs in
its own child process, so one run tells which kinds of error crash:

  cpu-coupling                 our check, CPU tensors (the baseline)
  cuda-entry-cpu-tensors       our CUDA kernel's entry point, reached by redispatch with CPU tensors: its
                               checks throw before any CUDA call (runs wherever the CUDA kernels are built)
  aten-cuda-mm                 an ATen error with CUDA tensors (is any C++ error with CUDA tensors fatal?)
  cuda-coupling                our check, CUDA tensors, through the Python autograd kernel
  cuda-coupling-below-autograd the same, called below autograd (is the Python autograd kernel involved?)
  cuda-scale-prior, cuda-scale-inverse, cuda-affine-coupling, cuda-mixed-devices: the other ops and a
                               device mismatch
  cuda-coupling-bad-map, cuda-affine-coupling-bad-map: index maps with bad values, through the Python
                               wrappers (the CUDA kernels would assert on the device)

usage: python scripts/repro_bad_input.py [--case NAME]   (exit 0 when every case raised as it should;
tests/test_op_coupling.py runs it)
"""
import argparse
import concurrent.futures
import os
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # an in-place build works too
import nice_ext  # noqa: E402
from nice_ext.masks import coupling_maps, odd_even_mask  # noqa: E402


def coupling_args(device):
    mask = odd_even_mask(10)
    shift_col, gather_index = (t.to(device) for t in coupling_maps(mask, ~mask))
    x, shift = torch.randn(4, 10, device=device), torch.randn(4, 5, device=device)
    return x, shift, shift_col, gather_index


def cpu_coupling():
    x, shift, shift_col, gather_index = coupling_args("cpu")
    torch.ops.nice_ext.coupling_update(x, shift[:3], shift_col, gather_index, False)


def cuda_entry_cpu_tensors():
    x, shift, shift_col, gather_index = coupling_args("cpu")
    cuda_key = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    torch.ops.nice_ext.coupling_update.default.redispatch(cuda_key, x, shift[:3], shift_col, gather_index, False)


def aten_cuda_mm():
    a = torch.randn(3, 4, device="cuda")
    torch.mm(a, a)


def cuda_coupling():
    x, shift, shift_col, gather_index = coupling_args("cuda")
    torch.ops.nice_ext.coupling_update(x, shift[:3], shift_col, gather_index, False)


def cuda_coupling_below_autograd():
    x, shift, shift_col, gather_index = coupling_args("cuda")
    with torch._C._AutoDispatchBelowAutograd():
        torch.ops.nice_ext.coupling_update(x, shift[:3], shift_col, gather_index, False)


def cuda_scale_prior():
    torch.ops.nice_ext.scale_prior(torch.randn(4, 10, device="cuda"), torch.randn(9, device="cuda"), "logistic", True)


def cuda_scale_inverse():
    torch.ops.nice_ext.scale_inverse(torch.randn(4, 10, device="cuda"), torch.randn(9, device="cuda"))


def cuda_affine_coupling():
    x, shift, shift_col, gather_index = coupling_args("cuda")
    torch.ops.nice_ext.affine_coupling_update(x, shift[:3], shift, shift_col, gather_index, "tanh", False)


def cuda_mixed_devices():
    x, shift, shift_col, gather_index = coupling_args("cuda")
    torch.ops.nice_ext.coupling_update(x, shift.cpu(), shift_col, gather_index, False)


def bad_map_args():
    x, shift, shift_col, gather_index = coupling_args("cuda")
    shift_col[1] = shift_col[3]  # two features onto one shift column
    return x, shift, shift_col, gather_index


def cuda_coupling_bad_map():
    nice_ext.ops.coupling_update_indexed(*bad_map_args())
    torch.cuda.synchronize()  # where a device assert would surface


def cuda_affine_coupling_bad_map():
    x, shift, shift_col, gather_index = bad_map_args()
    nice_ext.ops.affine_coupling_update_indexed(x, shift, shift, shift_col, gather_index)
    torch.cuda.synchronize()


# name: (call, what it needs: nothing, the CUDA kernels built, or a GPU)
CASES = {"cpu-coupling": (cpu_coupling, None), "cuda-entry-cpu-tensors": (cuda_entry_cpu_tensors, "kernels"),
         "aten-cuda-mm": (aten_cuda_mm, "gpu"), "cuda-coupling": (cuda_coupling, "gpu"),
         "cuda-coupling-below-autograd": (cuda_coupling_below_autograd, "gpu"),
         "cuda-scale-prior": (cuda_scale_prior, "gpu"), "cuda-scale-inverse": (cuda_scale_inverse, "gpu"),
         "cuda-affine-coupling": (cuda_affine_coupling, "gpu"),
         "cuda-mixed-devices": (cuda_mixed_devices, "gpu"),
         "cuda-coupling-bad-map": (cuda_coupling_bad_map, "gpu"),
         "cuda-affine-coupling-bad-map": (cuda_affine_coupling_bad_map, "gpu")}


def run_case(name):
    try:
        CASES[name][0]()
    except RuntimeError as error:
        print(f"{name}: raised OK: {str(error).splitlines()[0][:120]}")
        return 0
    print(f"{name}: no error raised")
    return 1


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=sorted(CASES))
    args = parser.parse_args()
    if args.case:
        return run_case(args.case)
    available = {None: True, "kernels": nice_ext.cuda_kernels_built(), "gpu": torch.cuda.is_available()}
    runnable = [name for name, (_, needs) in CASES.items() if available[needs]]
    # The children run side by side: each spends seconds importing torch and starting CUDA, and one after
    # another they were still going a minute after they started on a GPU machine whose cores were busy
    # with the test suite.
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(runnable))) as pool:
        results = dict(zip(runnable, pool.map(run_child, runnable)))
    failures = 0
    for name, (_, needs) in CASES.items():
        if name not in results:
            print(f"{name}: skipped (needs {'the CUDA kernels built' if needs == 'kernels' else 'a CUDA GPU'})")
            continue
        result = results[name]
        if result.returncode < 0 or result.returncode > 1:
            print(f"{name}: crashed (exit status {result.returncode}); its stderr ends with:\n"
                  + "\n".join(result.stderr.strip().splitlines()[-8:]))
        else:
            print(result.stdout.strip())
        failures += result.returncode != 0
    return 1 if failures else 0


def run_child(name):
    return subprocess.run([sys.executable, "-X", "faulthandler", os.path.abspath(__file__), "--case", name],
                          capture_output=True, text=True, timeout=300)


if __name__ == "__main__":
    sys.exit(main())
