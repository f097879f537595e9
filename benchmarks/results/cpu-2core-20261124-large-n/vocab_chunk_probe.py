# Probe, not product code: cross-entropy with a trainable head folded over the vocabulary
# (two passes, four head GEMMs, an (N, 8192) buffer) against eager, to see whether
# vocabulary chunking could meet the 10 % memory line at small N without losing time.
# Usage: python vocab_chunk_probe.py N [VOCAB_BLOCK]; see NOTES.md for its output.
import torch, time, sys
torch.set_num_threads(2)
N, H, V = int(sys.argv[1]), 3584, 151936
Vc = int(sys.argv[2]) if len(sys.argv) > 2 else 8192
g = torch.Generator().manual_seed(0)
h = torch.randn(N, H, generator=g) * 0.5
W = torch.randn(V, H, generator=g) * 0.02
y = torch.randint(0, V, (N,), generator=g)

def eager():
    hh = h.detach().requires_grad_(); ww = W.detach().requires_grad_()
    loss = torch.nn.functional.cross_entropy(hh @ ww.T, y)
    loss.backward()
    return loss.detach(), hh.grad, ww.grad

def vchunk():
    # pass 1: lse by online logsumexp over vocab blocks
    m = torch.full((N,), float("-inf")); s = torch.zeros(N)
    tgt = torch.empty(N)
    buf = torch.empty(N, Vc)
    for v0 in range(0, V, Vc):
        v1 = min(V, v0 + Vc); b = buf[:, : v1 - v0]
        torch.mm(h, W[v0:v1].T, out=b)
        bm = b.amax(1); mn = torch.maximum(m, bm)
        s = s * torch.exp(m - mn) + torch.exp(b - mn[:, None]).sum(1); m = mn
        sel = (y >= v0) & (y < v1)
        tgt[sel] = b[sel, y[sel] - v0]
    lse = m + s.log()
    loss = (lse - tgt).mean()
    gscale = 1.0 / N
    gh = torch.zeros(N, H); gW = torch.empty(V, H)
    for v0 in range(0, V, Vc):
        v1 = min(V, v0 + Vc); b = buf[:, : v1 - v0]
        torch.mm(h, W[v0:v1].T, out=b)
        b.sub_(lse[:, None]).exp_()
        sel = (y >= v0) & (y < v1)
        b[sel, y[sel] - v0] -= 1.0
        b.mul_(gscale)
        torch.mm(b.T, h, out=gW[v0:v1])
        gh.addmm_(b, W[v0:v1])
    return loss, gh, gW

if __name__ == "__main__":
    le, ghe, gWe = eager(); lv, ghv, gWv = vchunk()
    print("check", (le - lv).abs().item(), (ghe - ghv).abs().max().item(), (gWe - gWv).abs().max().item(), gWe.abs().max().item())
    del ghe, gWe, ghv, gWv
    for rep in range(3):
        for name, f in (("eager", eager), ("vchunk", vchunk)):
            t = time.perf_counter(); r = f(); dt = time.perf_counter() - t; del r
            print(name, rep, f"{dt:.2f}s", flush=True)
