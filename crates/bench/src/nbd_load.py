"""nbd_load: the bench's writers into a volume's NBD export (libnbd's Python bindings).

  paced URI SIZE RATE SECONDS CHUNK [PIDFILE]
                                       CHUNK-byte writes, in order, at RATE bytes/s; with
                                       PIDFILE, an application a hook can stop: its pid is
                                       written there once connected, SIGTERM ends it after
                                       the write in progress (disconnected, result printed),
                                       and the file is removed last
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


def paced(uri, size, rate, seconds, chunk, pidfile=None):
    h = connect(uri)
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
        h.pwrite(pool[at:at + chunk], (n * chunk) % span)
        lat.append(time.monotonic() - t)
        last_end = time.time()
        n += 1
    took = time.monotonic() - start
    h.shutdown()
    # Closes the socket now, so the export has no client left once the pid file is gone.
    del h
    return {
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
    mode, uri = sys.argv[1], sys.argv[2]
    pidfile = None
    if mode == "paced" and len(sys.argv) > 7:
        pidfile = sys.argv.pop(7)
    rest = [float(x) for x in sys.argv[3:]]
    if mode == "paced":
        out = paced(uri, int(rest[0]), rest[1], rest[2], int(rest[3]), pidfile)
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
