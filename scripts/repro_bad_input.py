"""Bad CUDA inputs must raise a RuntimeError with a clear message (run by tests/test_op_coupling.py in a
child process, so that a crash fails that test instead of ending the test run)."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # an in-place build works too
import nice_ext  # noqa: E402,F401
from nice_ext.masks import coupling_maps, odd_even_mask  # noqa: E402

mask = odd_even_mask(10)
shift_col, gather_index = (t.cuda() for t in coupling_maps(mask, ~mask))
x, shift = torch.randn(4, 10, device="cuda"), torch.randn(4, 5, device="cuda")
for name, call in (
        ("scale_prior", lambda: torch.ops.nice_ext.scale_prior(x, torch.randn(9, device="cuda"), "logistic", True)),
        ("coupling_update", lambda: torch.ops.nice_ext.coupling_update(x, shift[:3], shift_col, gather_index, False)),
        ("mixed devices", lambda: torch.ops.nice_ext.coupling_update(x, shift.cpu(), shift_col, gather_index, False))):
    try:
        call()
        print(f"{name}: no error raised")
    except RuntimeError as error:
        print(f"{name} raised OK: {str(error)[:100]}")
