"""Where the CPU goes while a Batcher serves on cuda (Linux): per thread CPU share and
context switches, from /proc/self/task, over 1.5 s of 8 closed-loop client threads; and
the offline cycle of one batch of 8 timed in the main thread and in a fresh thread (3
loops of 2000 each). It answers: do the spinning clients, torch's OpenMP workers or
preemption take the dispatcher's CPU? Run it under OMP_NUM_THREADS=1 too to compare.

    python3 benchmarks/batcher_threads.py story_transformer,small_mlp
"""
import os, sys, threading, time
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE); sys.path.insert(0, os.path.dirname(HERE))
import torch
import serving
from agxguard.batcher import Batcher

def tasks():
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            st = open(f"/proc/self/task/{tid}/stat").read()
            name = open(f"/proc/self/task/{tid}/comm").read().strip()
            f = st[st.rindex(")") + 2:].split()
            cpu = (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
            sw = {}
            for line in open(f"/proc/self/task/{tid}/status"):
                if "ctxt_switches" in line:
                    k, v = line.split(":"); sw[k.strip()] = int(v)
            out[int(tid)] = (name, cpu, sw.get("voluntary_ctxt_switches", 0), sw.get("nonvoluntary_ctxt_switches", 0))
        except OSError:
            pass
    return out

def delta(a, b, secs):
    rows = []
    for tid, (name, cpu, v, nv) in b.items():
        n0, c0, v0, nv0 = a.get(tid, (name, 0, 0, 0))
        rows.append((name, tid, (cpu - c0) / secs, v - v0, nv - nv0))
    return rows

def offline_cycle_fn(work):
    dev = work.device
    xs = work.inputs[:8]
    sizes = [x.shape[0] for x in xs]
    shape = (sum(sizes),) + tuple(xs[0].shape[1:])
    def cyc():
        h = torch.empty(shape, pin_memory=True)
        torch.cat(xs, 0, out=h)
        o = work.fn(h.to(dev, non_blocking=True))
        b = o.to("cpu", non_blocking=True)
        e = torch.cuda.Event(); e.record(); e.synchronize()
        b.split(sizes, 0)
    return cyc

def loop_us(f, n=2000):
    for _ in range(50): f()
    t = time.perf_counter()
    for _ in range(n): f()
    return (time.perf_counter() - t) / n * 1e6

def in_thread(f, n=2000):
    r = []
    th = threading.Thread(target=lambda: r.append(loop_us(f, n))); th.start(); th.join()
    return r[0]

print("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS"), "torch threads", torch.get_num_threads(), "cpus", os.cpu_count(), len(os.sched_getaffinity(0)))
print(torch.__config__.parallel_info())
for wname in sys.argv[1].split(","):
    work = serving.Work(wname, "cuda")
    cyc = offline_cycle_fn(work)
    vals = {"main": [], "thread": []}
    for _ in range(3):
        vals["main"].append(loop_us(cyc)); vals["thread"].append(in_thread(cyc))
    print(wname, "offline cycle us main", [round(v, 1) for v in vals["main"]], "new thread", [round(v, 1) for v in vals["thread"]])
    for spin in (2000.0,):
        b = work.batcher(8, spin_us=spin)
        stop = threading.Event(); counts = [0] * 8
        def client(i):
            xs = work.inputs; j = i
            while not stop.is_set():
                b(xs[j % len(xs)]); counts[i] += 1; j += 8
        ths = [threading.Thread(target=client, args=(i,), name=f"client{i}") for i in range(8)]
        for t in ths: t.start()
        time.sleep(0.7)
        a = tasks(); c0 = sum(counts); t0 = time.perf_counter()
        time.sleep(1.5)
        secs = time.perf_counter() - t0; c1 = sum(counts); bb = tasks()
        pyn = {t.native_id: t.name for t in threading.enumerate()}
        stop.set()
        for t in ths: t.join()
        disp = b._thread
        print(f"{wname} batcher spin {spin}: {(c1-c0)/secs:.0f} req/s; threads {len(bb)}")
        pyn[b._thread.native_id] = "DISPATCHER"
        for name, tid, cpu, v, nv in sorted(delta(a, bb, secs), key=lambda r: -r[2]):
            name = pyn.get(tid, name)
            if cpu > 0.005 or nv > 10:
                print(f"   {name:28s} {tid:8d} cpu {cpu:5.2f}  vol {v:7d}  invol {nv:6d}")
        b.close()
