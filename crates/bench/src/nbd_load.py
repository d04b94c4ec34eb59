"""nbd_load: the bench's writers into a volume's NBD export (libnbd's Python bindings).

  paced URI SIZE RATE SECONDS CHUNK [until-gone] [PIDFILE]
                                       CHUNK-byte writes, in order, at RATE bytes/s (with
                                       until-gone: stop quietly when the daemon goes away;
                                       with PIDFILE, an application a hook can stop: its pid
                                       is written there once connected, SIGTERM ends it after
                                       the write in progress (disconnected, result printed),
                                       and the file is removed last)
  spread URI SIZE TOTAL CHUNK SEED     TOTAL bytes in CHUNK-byte writes at distinct
                                       CHUNK-aligned offsets in random order, at full speed
  fua URI COUNT BS                     COUNT writes of BS bytes with FUA, one at a time
  scattered URI SIZE THREADS SECONDS   4-64 KiB writes at random offsets, one connection
                                       per thread, until SECONDS or the daemon goes away

Each prints one JSON line of what it did. Data are random bytes, never repeated in a row.
"""

import json
import os
import random
import signal
import sys
import threading
import time

import nbd


def connect(uri):
    h = nbd.NBD()
    h.connect_uri(uri)
    return h


def pct(xs, q):
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def paced(uri, size, rate, seconds, chunk, until_gone=False, pidfile=None):
    h = connect(uri)
    error = None
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(time.time()))
    if pidfile:
        with open(pidfile + ".tmp", "w") as f:
            f.write(f"{os.getpid()}\n")
        os.rename(pidfile + ".tmp", pidfile)
    pool = os.urandom(32 << 20)
    span = size - size % chunk
    lat = []
    behind = 0.0
    n = 0
    last_end = time.time()
    start = time.monotonic()
    while True:
        now = time.monotonic()
        if now - start >= seconds or stop:
            break
        due = start + n * chunk / rate
        if due > now:
            time.sleep(due - now)
            if stop:
                break
        else:
            behind = max(behind, now - due)
        at = (n * 4096 * 97) % (len(pool) - chunk)
        t = time.monotonic()
        try:
            h.pwrite(pool[at:at + chunk], (n * chunk) % span)
        except Exception as e:  # the daemon went away under the writer
            if not until_gone:
                raise
            error = str(e)[:200]
            break
        lat.append(time.monotonic() - t)
        last_end = time.time()
        n += 1
    took = time.monotonic() - start
    if error is None:
        h.shutdown()
    # Closes the socket now, so the export has no client left once the pid file is gone.
    del h
    out = {
        "mode": "paced",
        "stopped_by_sigterm": bool(stop),
        "last_write_end_epoch": round(last_end, 3),
        "writes": n,
        "bytes": n * chunk,
        "seconds": round(took, 3),
        "rate": n * chunk / took,
        "asked_rate": rate,
        "max_behind_s": round(behind, 3),
        "latency_p50_ms": round(pct(lat, 0.5) * 1e3, 3),
        "latency_max_ms": round(max(lat) * 1e3, 3),
    }
    if until_gone:
        out["error"] = error
    return out


def spread(uri, size, total, chunk, seed):
    h = connect(uri)
    pool = os.urandom(32 << 20)
    slots = size // chunk
    # Distinct slots: every byte written is a byte the peers must get, none twice.
    order = random.Random(seed).sample(range(slots), min(total // chunk, slots))
    start = time.monotonic()
    for i, slot in enumerate(order):
        at = (i * 4096 * 97) % (len(pool) - chunk)
        h.pwrite(pool[at:at + chunk], slot * chunk)
    took = time.monotonic() - start
    h.shutdown()
    return {"mode": "spread", "writes": len(order), "bytes": len(order) * chunk,
            "seconds": round(took, 3), "rate": len(order) * chunk / max(took, 1e-9)}


def fua(uri, count, bs):
    h = connect(uri)
    if not h.can_fua():
        raise SystemExit("the export does not offer FUA")
    lat = []
    for i in range(count):
        buf = os.urandom(bs)
        t = time.monotonic()
        h.pwrite(buf, i * bs, nbd.CMD_FLAG_FUA)
        lat.append((time.monotonic() - t) * 1e3)
    h.shutdown()
    return {"mode": "fua", "writes": count, "bytes": count * bs,
            "latencies_ms": [round(x, 3) for x in lat]}


def scattered(uri, size, threads, seconds):
    pool = os.urandom(4 << 20)
    stop = time.monotonic() + seconds
    done = [0] * threads
    nbytes = [0] * threads
    errors = []

    def work(k):
        rng = random.Random(1000 + k)
        try:
            h = connect(uri)
            while time.monotonic() < stop:
                n = rng.randint(1, 16) * 4096
                off = rng.randrange((size - n) // 4096 + 1) * 4096
                at = rng.randrange(len(pool) - n)
                h.pwrite(pool[at:at + n], off)
                done[k] += 1
                nbytes[k] += n
        except Exception as e:  # the daemon went away under the writer
            errors.append(str(e)[:200])

    start = time.monotonic()
    ts = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return {"mode": "scattered", "writes": sum(done), "bytes": sum(nbytes),
            "seconds": round(time.monotonic() - start, 3), "threads": threads,
            "errors": sorted(set(errors))[:5]}


def main():
    mode, uri, words = sys.argv[1], sys.argv[2], sys.argv[3:]
    until_gone = "until-gone" in words
    words = [w for w in words if w != "until-gone"]
    pidfile = None
    if mode == "paced" and len(words) > 4:
        pidfile = words.pop(4)
    rest = [float(x) for x in words]
    if mode == "paced":
        out = paced(uri, int(rest[0]), rest[1], rest[2], int(rest[3]), until_gone, pidfile)
    elif mode == "spread":
        out = spread(uri, int(rest[0]), int(rest[1]), int(rest[2]), int(rest[3]))
    elif mode == "fua":
        out = fua(uri, int(rest[0]), int(rest[1]))
    elif mode == "scattered":
        out = scattered(uri, int(rest[0]), int(rest[1]), rest[2])
    else:
        raise SystemExit(f"unknown mode {mode}")
    print(json.dumps(out), flush=True)
    if pidfile:
        os.remove(pidfile)


if __name__ == "__main__":
    main()
