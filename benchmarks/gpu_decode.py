"""Decode on a GPU: retrokv's CUDA kernels vs torch SDPA vs the HBM bound; wave index, wave buffer, host-memory KV.

    python benchmarks/gpu_decode.py [--sizes 32768 131072 524288] [--batches 1 8] [--budget-s 330]
    NUMBA_ENABLE_CUDASIM=1 python benchmarks/gpu_decode.py --sim     # tiny sizes, simulator: checks the code paths only

Llama-3-8B shapes (Hkv 8, G 4, d 128); a batch is flattened into the head axis (one index per sequence
and KV head, as RetroInfer). Sections, all measured side by side in one run on one GPU:

1. full decode attention: retrokv's split-K kernel vs ``torch.nn.functional.scaled_dot_product_attention``
   (GQA) vs the HBM bound (K + V bytes / device-to-device copy bandwidth measured in the same run);
2. wave ``attend`` (1.8% retrieval, 23.2% estimation clusters, 4 + 64 steady tokens) vs full attention on the
   same float32 KV; bytes read per step; the index build time;
3. the build of a 128K index vs the dense prefill of one Llama-3-8B layer at 128K (SDPA causal + the layer's
   projection and MLP GEMMs with random fp16 weights);
4. the wave buffer at 5% cache over 256 decode steps whose query drifts slowly (locality): hit ratio and
   host-to-device bytes per step;
5. a long context whose KV lives in (pinned) host memory: the device holds only the meta index, the block
   cache and the steady zone.

Without CuPy and a GPU it measures nothing and says so in benchmarks/results/gpu_decode.md.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
import traceback

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from machine import describe  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "gpu_decode.md")
COMMAND = "bash benchmarks/gpu_check.sh   # runs: python benchmarks/gpu_decode.py"
HKV, G, D = 8, 4, 128
STEADY = 4 + 64


def have_gpu():
    try:
        import cupy

        return bool(cupy.cuda.is_available())
    except Exception:
        return False


def not_measured(path):
    text = ("GPU decode benchmark: not measured: no GPU was available.\n\n"
            f"Command (on a machine with CuPy and an NVIDIA GPU):\n\n    {COMMAND}\n")
    print(text)
    if os.path.exists(path) and "not measured" not in open(path).read():
        print(f"(kept the measured results in {path})")
        return
    with open(path, "w") as f:
        f.write(text)


class Bench:
    def __init__(self, sim, budget_s):
        self.sim, self.t0, self.budget = sim, time.perf_counter(), budget_s
        self.m = np if sim else __import__("cupy")
        self.lines = []
        self.normal = (lambda shape, rng=np.random.default_rng(0): rng.standard_normal(shape, dtype=np.float32)) \
            if sim else (lambda shape: self.m.random.standard_normal(shape, dtype=np.float32))

    def left(self):
        return self.budget - (time.perf_counter() - self.t0)

    def sync(self):
        if not self.sim:
            self.m.cuda.Device().synchronize()

    def best(self, fn, repeats=5):
        fn()
        self.sync()
        out = math.inf
        for _ in range(1 if self.sim else repeats):
            t = time.perf_counter()
            fn()
            self.sync()
            out = min(out, time.perf_counter() - t)
        return out

    def rand(self, shape, dtype=np.float32, offset=0.0):
        """Random normal data made one head at a time (no float32 copy of a float16 tensor)."""
        x = self.m.empty(shape, dtype)
        for i in range(shape[0]):
            x[i] = (self.normal(shape[1:]) + offset).astype(dtype)
        return x

    def free(self):
        if not self.sim:
            self.m.get_default_memory_pool().free_all_blocks()

    def say(self, line=""):
        print(line, flush=True)
        self.lines.append(line)

    def save(self, path):
        """Write what was measured so far: a run cut short by its time limit still leaves its tables."""
        with open(path, "w") as f:
            f.write("\n".join(self.lines) + "\n")


def guarded(b, name, run):
    """Run one section; a failure is written into the results (with its traceback in the log) and the next
    section still runs: one device session must bring back every table it can."""
    try:
        return run()
    except Exception as err:                                  # noqa: BLE001 -- reported, not swallowed
        traceback.print_exc()
        b.say(f"**{name}: FAILED** with `{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}`\n")
        return None


def rel_err(got, want):
    """``||got - want|| / ||want||`` in float64 on the host."""
    got, want = (np.asarray(x.get() if hasattr(x, "get") else x, np.float64) for x in (got, want))
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def copy_bandwidth(b):
    """Bytes per second of a device-to-device copy (read + write): the HBM bound's denominator."""
    x = b.m.ones(2**28 if not b.sim else 2**10, np.float32)
    y = b.m.empty_like(x)
    t = b.best(lambda: y.__setitem__(Ellipsis, x), 10)
    return 2 * x.nbytes / t


def wave_step(ops, q, meta, sk, sv, sids, r, e, scale, gather=None):
    """One tripartite step: the reference driver with the kernel module ``ops``: ``(out, lse)``."""
    from retrokv.reference import wave_index as ref

    return ref.tripartite_attention(q, meta, sk, sv, sids, r, e, scale, gather=gather, ops=ops)[:2]


def budgets(c):
    r = max(int(round(c * 0.018)), 1)
    return r, min(int(round(c * 0.232)), c - r)


def wave_vs_reference(b, q, meta, sk, sv, sids, r, e, scale):
    """The CUDA step against the NumPy reference driver on a host copy of the same index (also checks the
    index: every token in exactly one cluster, offsets consistent with sizes)."""
    from retrokv.fast.cuda import _xp
    from retrokv.fast.cuda import wave_index as wi
    from retrokv.reference import wave_index as ref

    host = ref.MetaIndex(*(_xp.asnumpy(x) for x in meta))
    assert (host.sizes.sum(1) == host.keys.shape[1]).all(), "cluster sizes do not partition the tokens"
    assert (np.diff(host.offsets, axis=1) == host.sizes).all(), "offsets disagree with sizes"
    got = wave_step(wi, q, meta, sk, sv, sids, r, e, scale)[0]
    want = ref.tripartite_attention(_xp.asnumpy(q), host, _xp.asnumpy(sk), _xp.asnumpy(sv), _xp.asnumpy(sids),
                                    r, e, scale)[0]
    return rel_err(got, want)


def sdpa_ms(b, q, k, v, bs, n):
    """Seconds of one torch SDPA decode step (GQA) over the same arrays, shared through DLPack."""
    import torch
    import torch.nn.functional as F

    as_t = (lambda x: torch.from_dlpack(x)) if not b.sim else (lambda x: torch.from_numpy(np.ascontiguousarray(x)))
    qt = as_t(q).view(bs, HKV * G, 1, D)
    kt, vt = as_t(k).view(bs, HKV, n, D), as_t(v).view(bs, HKV, n, D)
    return b.best(lambda: F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True))


def section_full(b, sizes, batches, bw):
    import torch
    import torch.nn.functional as F

    from retrokv.fast.cuda import attention as cu

    b.say("### 1. Full decode attention (one step)\n")
    b.say("| N | batch | KV dtype | retrokv CUDA ms | per-row kernel ms | torch SDPA ms | HBM bound ms | retrokv / bound "
          "| SDPA / bound | rel. error vs fp32 SDPA |")
    b.say("|---|---|---|---|---|---|---|---|---|---|")
    for n in sizes:
        for bs in batches:
            if b.left() < 0:
                b.say(f"| {n} | {bs} | | not run: time budget spent | | | | |")
                continue

            def row():
                dtype = np.float16
                k, v = b.rand((bs * HKV, n, D), dtype), b.rand((bs * HKV, n, D), dtype)
                q = b.rand((bs * HKV * G, D))
                try:
                    ours = b.best(lambda: cu.partial_attention(q, k, v))
                except Exception as err:                     # the kernels' float16 reads failed to compile: say so
                    b.say(f"| {n} | {bs} | float16 | failed: {type(err).__name__} | | | | |")
                    k, v, dtype = k.astype(np.float32), v.astype(np.float32), np.float32
                    ours = b.best(lambda: cu.partial_attention(q, k, v))
                # the same step through the per-row kernel (one block per query head and chunk), side by side
                limits = b.m.full(q.shape[0], n, np.int64)
                per_row = b.best(lambda: cu.merge_chunks(*cu.attention_partials(q, k, v, 1, G, limits, 1 / math.sqrt(D))))
                tdt = torch.float16 if dtype == np.float16 else torch.float32
                as_t = (lambda x: torch.from_dlpack(x)) if not b.sim else (lambda x: torch.from_numpy(np.ascontiguousarray(x)))
                qt = as_t(q).view(bs, HKV * G, 1, D).to(tdt)
                kt, vt = as_t(k).view(bs, HKV, n, D), as_t(v).view(bs, HKV, n, D)
                sdpa = b.best(lambda: F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True))
                bound = (k.nbytes + v.nbytes) / bw
                err = "not checked (size)"
                if n * bs <= 2**20:                  # float32 q (ours reads q in float32; SDPA's fp16 run rounds it)
                    want = F.scaled_dot_product_attention(as_t(q).view(bs, HKV * G, 1, D), kt.float(), vt.float(), enable_gqa=True)
                    got = cu.partial_attention(q, k, v)[0]
                    err = f"{rel_err(got, want.reshape(bs * HKV * G, D).cpu().numpy()):.1e}"
                    del want, got
                b.say(f"| {n} | {bs} | {np.dtype(dtype).name} | {ours * 1e3:.3f} | {per_row * 1e3:.3f} | {sdpa * 1e3:.3f} | "
                      f"{bound * 1e3:.3f} | {ours / bound:.2f} | {sdpa / bound:.2f} | {err} |")
            guarded(b, f"N={n} batch={bs}", row)
            b.free()
    b.say()


def section_wave(b, sizes, batches):
    from retrokv.fast.cuda import attention as cu
    from retrokv.fast.cuda import _xp
    from retrokv.fast.cuda import wave_index as wi
    from retrokv.reference.clustering import plan_clusters

    b.say("### 2. Wave attend vs full attention (float32 KV, one step)\n")
    b.say("| N | batch | clusters/head | build s | full ms | torch SDPA ms | wave ms | full / wave | SDPA / wave "
          "| full MB read | wave MB read | rel. error vs NumPy reference |")
    b.say("|---|---|---|---|---|---|---|---|---|---|---|---|")
    builds = {}
    for n in sizes:
        for bs in batches:
            if b.left() < 0 or (n * bs > 2**20 and not b.sim):      # a 512K x 8 build alone outruns the budget
                b.say(f"| {n} | {bs} | | not run: time budget | | | | | |")
                continue

            def row():
                h = bs * HKV
                k, v, q = b.rand((h, n, D), offset=0.5), b.rand((h, n, D)), b.rand((h * G, D))
                c, seg = plan_clusters(n - STEADY)
                r, e = budgets(c)
                t = time.perf_counter()
                meta = wi.build_meta_index(k[:, STEADY:], v[:, STEADY:], b.m.arange(STEADY, n), c, seg, 10)
                b.sync()
                build = time.perf_counter() - t
                builds[(n, bs)] = build
                sk, sv, sids = k[:, :STEADY], v[:, :STEADY], b.m.arange(STEADY)
                scale = 1 / math.sqrt(D)
                full = b.best(lambda: cu.partial_attention(q, k, v))
                sdpa = sdpa_ms(b, q, k, v, bs, n)
                wave = b.best(lambda: wave_step(wi, q, meta, sk, sv, sids, r, e, scale))
                sizes_h = _xp.asnumpy(meta.sizes)
                ret, _ = wi.select_zones(wi.rank_clusters(q, meta.centroids, meta.sizes, scale)[1], r, e)
                retrieved = int(np.take_along_axis(sizes_h, _xp.asnumpy(ret), axis=1).sum())
                # meta index (centroids, value sums, sizes) + retrieved rows read twice (gather, attention) + steady
                wave_bytes = h * c * (2 * D * 4 + 8) + 2 * (retrieved + h * STEADY) * 2 * D * 4
                err = "not checked (size)"
                if bs == 1 and n <= 2**17:
                    err = f"{wave_vs_reference(b, q, meta, sk, sv, sids, r, e, scale):.1e}"
                b.say(f"| {n} | {bs} | {c} | {build:.2f} | {full * 1e3:.3f} | {sdpa * 1e3:.3f} | {wave * 1e3:.3f} | "
                      f"{full / wave:.1f} | {sdpa / wave:.1f} | "
                      f"{(k.nbytes + v.nbytes) / 1e6:.0f} | {wave_bytes / 1e6:.1f} | {err} |")
            guarded(b, f"N={n} batch={bs}", row)
            b.free()
    b.say()
    return builds


def section_prefill(b, n, build):
    import torch
    import torch.nn.functional as F

    b.say(f"### 3. Index build vs dense prefill of one Llama-3-8B layer at N = {n}\n")
    if build is None:
        b.say("not run: no index of this size was built in section 2\n")
        return
    dev = "cuda" if not b.sim else "cpu"
    dt = torch.float16 if not b.sim else torch.float32
    hid, inter = (4096, 14336) if not b.sim else (64, 128)
    x = torch.randn(n, hid, device=dev, dtype=dt)
    w = {name: torch.randn(a, c, device=dev, dtype=dt) * 0.01 for name, a, c in
         (("qkv", hid, hid + 2 * HKV * D), ("o", hid, hid), ("up", hid, 2 * inter), ("down", inter, hid))}
    q = torch.randn(1, HKV * G, n, D, device=dev, dtype=dt)
    kv = torch.randn(1, HKV, n, D, device=dev, dtype=dt)

    def layer():
        for i in range(0, n, 16384):                       # rows in slices: bounded activation memory
            xs = x[i:i + 16384]
            xs @ w["qkv"]
            xs @ w["o"]
            u = xs @ w["up"]
            (u[:, :inter] * u[:, inter:]) @ w["down"]
        F.scaled_dot_product_attention(q, kv, kv, is_causal=True, enable_gqa=True)
        if dev == "cuda":
            torch.cuda.synchronize()

    t = b.best(layer, 3)
    b.say("| dense layer prefill s (fp16 GEMMs + causal SDPA) | index build s (8 KV heads, float32) | build / prefill |")
    b.say("|---|---|---|")
    b.say(f"| {t:.3f} | {build:.3f} | {build / t:.2f} |\n")


def section_buffer(b, n, steps):
    from retrokv.fast.cuda import wave_buffer as wb
    from retrokv.fast.cuda import _xp
    from retrokv.fast.cuda import wave_index as wi
    from retrokv.reference.clustering import plan_clusters

    b.say(f"### 4. Wave buffer: 5% cache, {steps} steps with locality, N = {n}, batch 1\n")
    k, v = b.rand((HKV, n, D), offset=0.5), b.rand((HKV, n, D))
    c, seg = plan_clusters(n - STEADY)
    r, e = budgets(c)
    meta = wi.build_meta_index(k[:, STEADY:], v[:, STEADY:], b.m.arange(STEADY, n), c, seg, 10)
    state = wb.sync_state(wb.empty_state(HKV, D, D, 8), meta, 0.05)
    sk, sv, sids = k[:, :STEADY], v[:, :STEADY], b.m.arange(STEADY)
    scale = 1 / math.sqrt(D)
    q = b.rand((HKV * G, D))
    sizes = _xp.asnumpy(meta.sizes)
    hits = total = h2d = 0
    t = time.perf_counter()
    for _ in range(steps):
        q = 0.95 * q + 0.3 * b.rand((HKV * G, D))          # a slowly drifting query: consecutive steps overlap
        _, rank = wi.rank_clusters(q, meta.centroids, meta.sizes, scale)
        ret, _ = wi.select_zones(rank, r, e)
        _, res = wb.gather_step(state, sk, sv, sids, ret)
        ids = _xp.asnumpy(ret)
        hits += int(res.hit.sum())
        total += res.hit.size
        h2d += int(np.take_along_axis(sizes, ids, axis=1)[~res.hit].sum()) * (2 * D * 4 + 8)
    b.sync()
    per = (time.perf_counter() - t) / steps
    b.say("| clusters/head | retrieved/head | cache blocks/head | hit ratio | H2D KB/step | rank+zones+buffer ms/step |")
    b.say("|---|---|---|---|---|---|")
    b.say(f"| {c} | {r} | {state.device.keys.shape[1]} | {hits / max(total, 1):.3f} | {h2d / steps / 1e3:.1f} | "
          f"{per * 1e3:.2f} |\n")
    del k, v, meta, state
    b.free()


def section_host_kv(b, n, bs):
    from retrokv.fast.cuda import _xp
    from retrokv.fast.cuda import wave_buffer as wb
    from retrokv.fast.cuda import wave_index as wi
    from retrokv.reference.clustering import plan_clusters

    b.say(f"### 5. KV in host memory: N = {n}, batch {bs}, served by the wave index + buffer\n")
    h = bs * HKV
    c, seg = plan_clusters(n - STEADY)
    r, e = budgets(c)
    heads, steady = [], []
    t = time.perf_counter()
    for i in range(h):                                   # prefill offload: one head's KV on the device at a time
        k, v = b.rand((1, n, D), offset=0.5), b.rand((1, n, D))
        mh = wi.build_meta_index(k[:, STEADY:], v[:, STEADY:], b.m.arange(STEADY, n), c, seg, 10)
        heads.append(mh._replace(keys=_xp.asnumpy(mh.keys), values=_xp.asnumpy(mh.values), ids=_xp.asnumpy(mh.ids)))
        steady.append((k[:, :STEADY].copy(), v[:, :STEADY].copy()))    # copies: a view would keep the whole KV on the device
        del k, v
        b.free()
    build = time.perf_counter() - t
    meta = wi.MetaIndex(*[(np if f >= 4 else b.m).concatenate([getattr(x, name) for x in heads])
                          for f, name in enumerate(wi.MetaIndex._fields)])
    sk = b.m.concatenate([s[0] for s in steady])
    sv = b.m.concatenate([s[1] for s in steady])
    sids = b.m.arange(STEADY)
    state = wb.sync_state(wb.empty_state(h, D, D, 8), meta, 0.05)
    meta = meta._replace(keys=None, values=None, ids=None)      # the host tier holds the KV now
    scale = 1 / math.sqrt(D)
    q = b.rand((h * G, D))
    def one_step():
        return wave_step(wi, q, meta, sk, sv, sids, r, e, scale,
                         gather=lambda ret: wb.gather_step(state, sk, sv, sids, ret)[0])

    t = time.perf_counter()
    one_step()                                           # cold: every retrieved cluster misses the cache
    b.sync()
    cold = time.perf_counter() - t
    step = b.best(one_step, 3)                           # the same query again: its clusters are cached now
    kv_bytes = 2 * h * n * D * 4
    dev_bytes = b.m.get_default_memory_pool().used_bytes() if not b.sim else 0
    free, total = b.m.cuda.Device().mem_info if not b.sim else (0, 0)
    b.say("| KV (float32) GB | device memory GB | device bytes in use GB | build s | first step ms (all misses) "
          "| repeated step ms (cached) |")
    b.say("|---|---|---|---|---|---|")
    b.say(f"| {kv_bytes / 1e9:.1f} | {total / 1e9:.1f} | {dev_bytes / 1e9:.2f} | {build:.1f} | {cold * 1e3:.2f} "
          f"| {step * 1e3:.2f} |\n")
    if kv_bytes < total:
        b.say(f"This KV ({kv_bytes / 1e9:.1f} GB) would fit on this device; host memory here is too small to hold "
              "a KV larger than the device's, so the run shows the mechanism (KV only in host memory), not a "
              "context beyond device memory.\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[32768, 131072, 524288])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--buffer-steps", type=int, default=256)
    ap.add_argument("--host-tokens", type=int, default=1 << 20)
    ap.add_argument("--budget-s", type=float, default=330.0, help="sections past this many seconds are skipped")
    ap.add_argument("--sim", action="store_true", help="tiny sizes under NUMBA_ENABLE_CUDASIM=1: code paths only")
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args()
    if args.sim:
        args.sizes, args.batches, args.buffer_steps, args.host_tokens = [300], [1], 3, 400
        args.out = os.path.join(HERE, "out", "gpu_decode_sim.md")
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
    elif not have_gpu():
        return not_measured(args.out)
    b = Bench(args.sim, args.budget_s)
    b.say("GPU decode benchmark, Llama-3-8B shapes (Hkv 8, G 4, d 128), batch flattened into heads.\n")
    if not args.sim:
        import cupy

        props = cupy.cuda.runtime.getDeviceProperties(0)
        b.say(f"GPU: {props['name'].decode()}, {props['totalGlobalMem'] / 2**30:.0f} GiB; CuPy {cupy.__version__}; "
              f"host: {describe()}\n")
    else:
        b.say("SIMULATOR RUN (NUMBA_ENABLE_CUDASIM=1, tiny sizes): exercises the code paths, measures nothing.\n")
    bw = copy_bandwidth(b)
    b.say(f"Command: `{COMMAND}`. Device-to-device copy bandwidth measured in this run: {bw / 1e9:.0f} GB/s. "
          "Times are the best of 5 runs after a warm-up, host clock around a device synchronise.\n")
    guarded(b, "full decode attention", lambda: section_full(b, args.sizes, args.batches, bw))
    b.save(args.out)
    builds = guarded(b, "wave attend", lambda: section_wave(
        b, [n for n in args.sizes if n <= 2**17] or args.sizes[:1], args.batches)) or {}
    b.save(args.out)
    n_pre = 131072 if not args.sim else args.sizes[0]
    guarded(b, "index build vs prefill", lambda: section_prefill(b, n_pre, builds.get((n_pre, 1))))
    b.save(args.out)
    for name, run in (("wave buffer", lambda: section_buffer(b, n_pre, args.buffer_steps)),
                      ("host-memory KV", lambda: section_host_kv(b, args.host_tokens, 1))):
        if b.left() > 0:
            guarded(b, name, run)
        else:
            b.say(f"{name}: not run: time budget ({args.budget_s:.0f} s) spent\n")
        b.save(args.out)
    b.say(f"Total time {time.perf_counter() - b.t0:.0f} s.")
    b.save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
