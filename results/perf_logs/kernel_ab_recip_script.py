import importlib.util, sys, torch
sys.path[:0] = [".", "experiments"]
import bench_kernels as bk
import freeact.kernels.act_quant as new
spec = importlib.util.spec_from_file_location("freeact.kernels.act_quant_old", ".stage/old/act_quant_old.py")
old = importlib.util.module_from_spec(spec); sys.modules[spec.name] = old; spec.loader.exec_module(old)
from freeact.transforms.affine import random_orthogonal
dev = "cuda"
print(torch.cuda.get_device_name(), torch.__version__, flush=True)
for d_l, d_r in [(64, 64), (56, 64)]:
    for T in (2048, 8192, 32768):
        d = d_l * d_r
        P_l = random_orthogonal(d_l).float().to(dev); P_r = random_orthogonal(d_r).float().to(dev)
        s = torch.rand(d, device=dev) + 0.5; m = (torch.rand(2, d, device=dev) > 0.05).float()
        ty = torch.randint(0, 2, (T,), device=dev)
        xs = bk.Rotating(lambda: torch.randn(T, d, device=dev).bfloat16(), T * d * 2)
        ops = {"div_rn": old.KronActQuant(P_l, P_r, in_scale=s, masks=m), "recip": new.KronActQuant(P_l, P_r, in_scale=s, masks=m)}
        x = xs.items[0]
        a, b = (op(x, ty, bits=4, clip=0.9, backend="triton").float() for op in ops.values())
        ref = new.act_quant_eager(x, P_l, P_r, m, ty, bits=4, clip=0.9, in_scale=s).float()
        step = (ref.abs().amax(-1, keepdim=True) / 7).clamp_min(1e-8)
        res = {k: [] for k in ops}
        for rnd in range(3):  # alternate
            for k, op in ops.items():
                res[k].append(bk.graph_ms([lambda x=x, op=op: op(x, ty, bits=4, clip=0.9, backend="triton") for x in xs.items]))
        med = {k: sorted(v)[1] for k, v in res.items()}
        bw = {k: 2 * T * d * 2 / (v * 1e-3) / 1e12 for k, v in med.items()}
        print(f"d={d} T={T}: div_rn {med['div_rn']*1e3:.1f} us {bw['div_rn']:.2f} TB/s | recip {med['recip']*1e3:.1f} us "
              f"{bw['recip']:.2f} TB/s | ratio {med['div_rn']/med['recip']:.2f}x | vs eager: differ div_rn "
              f"{float(((a-ref).abs()/step > 1e-3).float().mean()):.2e} recip {float(((b-ref).abs()/step > 1e-3).float().mean()):.2e}", flush=True)
