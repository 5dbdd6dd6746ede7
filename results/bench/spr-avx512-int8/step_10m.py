import torch, time, platform, subprocess
from l2l_optim import SimpleOptimizer
from l2l_optim.functional import simple_update, RunningRms
from l2l_optim.state import decoded_hiddens
from l2l_optim.rounding import rounding_keys
torch.set_num_threads(2)
n = 10_000_000
def med(fn, k=11):
    for _ in range(2): fn()
    ts = []
    for _ in range(k):
        t = time.perf_counter(); fn(); ts.append(time.perf_counter() - t)
    ts.sort(); return ts[len(ts)//2]
res = {}
for name, dt in (("adam-fused", None), ("fp32", torch.float32), ("bf16", torch.bfloat16), ("int8", torch.int8)):
    w = torch.nn.Parameter(torch.randn(n) * 0.1); w.grad = torch.randn(n) * 1e-3
    opt = torch.optim.Adam([w], fused=True) if dt is None else SimpleOptimizer([w], state_dtype=dt)
    res[name] = med(opt.step)
    if dt == torch.int8:
        st = opt.state[w]
        def old():
            keys = rounding_keys([st["step"]], None, 10)
            with decoded_hiddens([st["h"]], [st["h_scale"]], keys) as work:
                simple_update([w], [w.grad], work, [1.0], opt.net, impl="cpu", rms=RunningRms([st["v"]], [st["c"]]))
        res["int8 (codec as torch ops around the kernel)"] = med(old, 5)
for k, v in res.items():
    print(f"{k:48s} {v*1e3:7.1f} ms {v/n*1e9:6.2f} ns/coord  {v/res['adam-fused']:.2f}x fused Adam")
