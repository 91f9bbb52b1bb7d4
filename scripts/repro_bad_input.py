import torch, nice_ext
from nice_ext.masks import coupling_maps, odd_even_mask
m = odd_even_mask(10); sc, gi = (t.cuda() for t in coupling_maps(m, ~m))
x = torch.randn(4, 10, device="cuda"); s = torch.randn(4, 5, device="cuda")
try:
    torch.ops.nice_ext.scale_prior(x, torch.randn(9, device="cuda"), "logistic", True)
except RuntimeError as e: print("scale_prior raised OK:", str(e)[:80])
try:
    torch.ops.nice_ext.coupling_update(x, s[:3], sc, gi, False)
except RuntimeError as e: print("coupling raised OK:", str(e)[:80])
