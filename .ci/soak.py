#!/usr/bin/env python3
"""Soak run: `mana demo` for a long time (with churn: --chaos), sampling every process's resources.

Outside CI (it runs for as long as asked). Every --interval seconds, for each child of the demo (bootstrap,
coordinator, node-<i>, found by its data directory on its command line, so a restarted child is followed),
it records resident memory (VmRSS), open files (/proc/<pid>/fd), the DHT provider records from its
status.json (its own announcements and other peers' records it holds), its store's blob bytes, the blobs it
pins (kept alive for rounds in progress: a count that only grows is a disk leak) and the
disk use of its data directory. Samples go to <out>/soak.jsonl; at the end a table gives start, middle and
end per process and says whether each figure stayed flat (end at most --flat times the middle, or within
a small absolute slack).

    .ci/soak.py --minutes 30 --nodes 4 --chaos all --exe target/release/mana --out soak-out

Exit status: the demo's, or 3 if a figure grew past --flat.
"""

import argparse
import json
import os
import subprocess
import sys
import time


def du(path):
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def processes(out):
    """name -> pid of the running children whose command line names a data directory under `out`."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        args = [a.decode(errors="replace") for a in args]
        if "--data-dir" not in args or len(args) < 2 or args[1] not in ("bootstrap", "coordinator", "node"):
            continue
        data_dir = args[args.index("--data-dir") + 1]
        if os.path.abspath(data_dir).startswith(os.path.abspath(out) + os.sep):
            found[os.path.basename(data_dir)] = int(entry)
    return found


def rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def open_files(pid):
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def status(data_dir):
    try:
        with open(os.path.join(data_dir, "status.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def sample(out, started):
    rows = {}
    for name, pid in sorted(processes(out).items()):
        data_dir = os.path.join(out, name)
        st = status(data_dir)
        rows[name] = {
            "pid": pid,
            "rss_kib": rss_kib(pid),
            "open_files": open_files(pid),
            "dht_provided": st.get("dht_provided"),
            "dht_provider_records": st.get("dht_provider_records"),
            "store_bytes": st.get("store_bytes"),
            "pinned_blobs": st.get("pinned_blobs"),
            "disk_bytes": du(data_dir),
        }
    return {"t_s": round(time.time() - started, 1), "processes": rows}


# Growth allowed from the middle to the end, as a factor, above an absolute slack per figure (small counts
# and a fresh allocator page move by themselves).
SLACK = {"rss_kib": 32 * 1024, "open_files": 16, "dht_provided": 64, "dht_provider_records": 256,
         "store_bytes": 4 << 20, "pinned_blobs": 32, "disk_bytes": 8 << 20}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--exe", default="target/release/mana")
    ap.add_argument("--out", default="soak-out")
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--chaos", choices=["all", "coordinator", "none"], default="all")
    ap.add_argument("--interval", type=float, default=30.0)
    ap.add_argument("--flat", type=float, default=1.5)
    args = ap.parse_args()

    cmd = [args.exe, "demo", "--nodes", str(args.nodes), "--minutes", str(args.minutes),
           "--sample-tokens", "16", "--out", args.out]
    if args.chaos != "none":
        cmd += ["--chaos", args.chaos]
    started = time.time()
    demo = subprocess.Popen(cmd)
    samples = []
    try:
        while demo.poll() is None:
            time.sleep(args.interval)
            if demo.poll() is not None:
                break
            s = sample(args.out, started)
            if s["processes"]:
                samples.append(s)
                print(f"soak: t={s['t_s']:.0f}s " + ", ".join(
                    f"{n} {(p['rss_kib'] or 0) // 1024} MiB rss/{p['open_files']} fd/{p['disk_bytes'] >> 20} MiB disk"
                    for n, p in s["processes"].items()), file=sys.stderr)
    finally:
        if demo.poll() is None:
            demo.terminate()
        code = demo.wait()
    with open(os.path.join(args.out, "soak.jsonl"), "w") as f:
        for s in samples:
            f.write(json.dumps(s) + "\n")
    if len(samples) < 3:
        print("soak: too few samples for a verdict", file=sys.stderr)
        return code
    picks = {"start": samples[0], "middle": samples[len(samples) // 2], "end": samples[-1]}
    grew = []
    print(f"{'process':<12} {'figure':<22} {'start':>12} {'middle':>12} {'end':>12}  flat")
    names = sorted(set().union(*(s["processes"].keys() for s in picks.values())))
    for name in names:
        for figure in SLACK:
            vals = [picks[k]["processes"].get(name, {}).get(figure) for k in ("start", "middle", "end")]
            mid, end = vals[1], vals[2]
            flat = mid is None or end is None or end <= max(mid * args.flat, mid + SLACK[figure])
            if not flat:
                grew.append(f"{name} {figure}")
            shown = ["-" if v is None else str(v) for v in vals]
            print(f"{name:<12} {figure:<22} {shown[0]:>12} {shown[1]:>12} {shown[2]:>12}  {'yes' if flat else 'NO'}")
    print(f"samples: {len(samples)} over {samples[-1]['t_s']:.0f} s; demo exit {code}")
    if grew:
        print("grew: " + ", ".join(grew))
        return code or 3
    return code


if __name__ == "__main__":
    sys.exit(main())
