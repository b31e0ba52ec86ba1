"""The Python `redis` package (5 or newer) against ringkv's Redis gateway.

usage: redis_client.py basics PORT TOKEN
       redis_client.py incr PORT[,PORT...] TOKEN KEY THREADS SECONDS

`basics` runs RESP3 and RESP2 clients through the commands, pipelines and errors and exits 0.
`incr` increments KEY from THREADS connections (spread over the ports) for SECONDS and prints
one JSON line: {"ok": increments answered OK, "unknown": increments answered with an error
(they may or may not have applied), "final": the counter read at the end}.
"""

import json
import sys
import threading
import time

import redis


def basics(port, token):
    for proto in (3, 2):
        r = redis.Redis(host="127.0.0.1", port=port, password=token, protocol=proto)
        assert r.ping() is True
        p = f"py{proto}:"
        assert r.set(p + "a", "1") is True
        assert r.get(p + "a") == b"1"
        assert r.set(p + "a", "2", nx=True) is None, "NX on an existing key sets nothing"
        assert r.set(p + "new", "x", nx=True) is True
        assert r.set(p + "a", "3", xx=True) is True
        assert r.set(p + "nope", "3", xx=True) is None
        assert r.set(p + "a", "4", get=True) == b"3"
        assert r.getset(p + "a", "5") == b"4"
        assert r.setnx(p + "a", "6") is False
        assert r.incr(p + "n") == 1 and r.incrby(p + "n", 10) == 11 and r.decr(p + "n") == 10 and r.decrby(p + "n", 20) == -10
        assert r.append(p + "s", "ab") == 2 and r.append(p + "s", "cd") == 4 and r.strlen(p + "s") == 4
        assert r.get(p + "s") == b"abcd"
        assert r.mset({p + "m1": "x", p + "m2": "y"}) is True
        assert r.mget([p + "m1", p + "m2", p + "none"]) == [b"x", b"y", None]
        assert r.exists(p + "m1", p + "m2", p + "none") == 2
        assert r.delete(p + "m1", p + "none") == 1
        assert r.echo("hi") == b"hi"
        # Binary keys and values pass through untouched.
        assert r.set(b"\xff\x00k", b"\x00\xfe") is True and r.get(b"\xff\x00k") == b"\x00\xfe"
        # A pipeline: sets and gets of the same keys, sent at once, answered in order, and each
        # get sees the set sent before it on this connection.
        pipe = r.pipeline(transaction=False)
        for i in range(100):
            pipe.set(f"{p}p{i}", i)
            pipe.get(f"{p}p{i}")
            pipe.incr(p + "pc")
        out = pipe.execute()
        assert out[1::3] == [str(i).encode() for i in range(100)], out[1:10]
        assert out[2::3] == list(range(1, 101)), out[2:10]
        for bad, what in ((lambda: r.incr(p + "s"), "not an integer"), (lambda: r.set(p + "a", 1, ex=5), "expire")):
            try:
                bad()
                raise AssertionError(f"{what}: no error")
            except redis.exceptions.ResponseError as e:
                assert what in str(e), e
        if proto == 3:
            assert r.connection_pool.get_connection().protocol in (3, "3")
    try:
        redis.Redis(host="127.0.0.1", port=port, password="rkv_wrong").ping()
        raise AssertionError("a wrong token was accepted")
    except redis.exceptions.AuthenticationError:
        pass
    try:
        redis.Redis(host="127.0.0.1", port=port, protocol=2).get("x")
        raise AssertionError("a command without authentication was served")
    except redis.exceptions.AuthenticationError:
        pass
    print("ok")


def incr(ports, token, key, threads, seconds):
    ok = 0
    unknown = 0
    lock = threading.Lock()
    stop = time.time() + seconds

    def run(port):
        nonlocal ok, unknown
        r = redis.Redis(host="127.0.0.1", port=port, password=token, socket_timeout=15, protocol=3)
        while time.time() < stop:
            try:
                r.incr(key)
                with lock:
                    ok += 1
            except (redis.exceptions.RedisError, OSError):
                with lock:
                    unknown += 1
                time.sleep(0.05)

    ts = [threading.Thread(target=run, args=(ports[i % len(ports)],)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    final = int(redis.Redis(host="127.0.0.1", port=ports[0], password=token, socket_timeout=15).get(key) or 0)
    print(json.dumps({"ok": ok, "unknown": unknown, "final": final}))


if __name__ == "__main__":
    if sys.argv[1] == "basics":
        basics(int(sys.argv[2]), sys.argv[3])
    else:
        incr([int(p) for p in sys.argv[2].split(",")], sys.argv[3], sys.argv[4], int(sys.argv[5]), float(sys.argv[6]))
