//! The HTTP and Redis gateways, driven by real clients: curl, redis-cli, redis-benchmark and the
//! Python `redis` package (the README's test command installs them).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ringkv_tests::{eventually, TestCluster};
use ringkv_wire::{ClientRequest, Role};

/// Runs a command; its exit code and stdout (stderr appended, for failure messages).
fn run(cmd: &mut Command) -> anyhow::Result<(i32, String)> {
    let out = cmd.output().map_err(|e| anyhow::anyhow!("cannot run {cmd:?}: {e} (the README's test command installs it)"))?;
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.stderr.is_empty() {
        text.push_str(&String::from_utf8_lossy(&out.stderr));
    }
    Ok((out.status.code().unwrap_or(-1), text))
}

/// `curl ARGS URL`: the status code and the body.
fn curl(args: &[&str], url: &str) -> anyhow::Result<(u16, String)> {
    let (rc, out) = run(Command::new("curl").args(["-s", "-S", "--max-time", "20", "-w", "\n%{http_code}"]).args(args).arg(url))?;
    anyhow::ensure!(rc == 0, "curl {args:?} {url} failed ({rc}): {out}");
    let (body, code) = out.rsplit_once('\n').unwrap_or(("", &out));
    Ok((code.trim().parse()?, body.to_string()))
}

fn bearer(token: &str) -> String {
    format!("Authorization: Bearer {token}")
}

fn token(dir: &Path, file: &str) -> anyhow::Result<String> {
    Ok(std::fs::read_to_string(dir.join(file))?.trim().to_string())
}

fn json(body: &str) -> anyhow::Result<serde_json::Value> {
    serde_json::from_str(body).map_err(|e| anyhow::anyhow!("not JSON ({e}): {body}"))
}

/// The error code of a JSON error answer.
fn code_of(body: &str) -> String {
    json(body).ok().and_then(|v| v["error"]["code"].as_str().map(str::to_string)).unwrap_or_default()
}

/// The Python interpreter with the `redis` package (the README's test command makes the
/// virtualenv).
fn python() -> PathBuf {
    match std::env::var_os("RINGKV_PYTHON") {
        Some(p) => p.into(),
        None => PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/ringkv-py-venv/bin/python"),
    }
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("python/redis_client.py")
}

fn port(addr: &str) -> String {
    addr.rsplit_once(':').map(|(_, p)| p.to_string()).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_gateway_serves_every_route_and_error_to_curl() -> anyhow::Result<()> {
    let tc = TestCluster::start_with(3, 4, "[limits]\nkey_bytes_max = 64\nvalue_bytes_max = 4096").await?;
    let client = tc.client().await?;
    let dir = tc.path();
    let (app, admin) = (token(&dir, "app.token")?, token(&dir, "admin.token")?);
    let reader = client.create_token("reader", Role::Read).await?;
    tc.cluster.wait_maps_current(Duration::from_secs(30)).await?;
    // Any node serves any key: node 2's gateway for everything.
    let http = tc.cluster.entry(2)?.http_addr.clone().expect("http gateway");
    let shard_json = {
        let bin = ringkv_tests::ringkv_binary().with_file_name("ringctl");
        let (rc, out) = run(Command::new(bin).arg("--cluster").arg(dir.join("cluster.json")).args(["-o", "json", "shard", "show", "1"]))?;
        anyhow::ensure!(rc == 0, "ringctl: {out}");
        json(&out)?
    };
    let (a, rd, adm) = (bearer(&app), bearer(&reader), bearer(&admin));
    let base = format!("http://{http}");
    let h = |t: &str| vec!["-H".to_string(), t.to_string()];
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let kv = |k: &str| format!("{base}/v1/kv/{k}");
        let with = |auth: &str, extra: &[&str]| -> Vec<String> { h(auth).into_iter().chain(extra.iter().map(|s| s.to_string())).collect() };
        let c = |args: Vec<String>, url: &str| -> anyhow::Result<(u16, String)> {
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            curl(&refs, url)
        };
        // Put, get raw and as JSON, binary keys and values.
        assert_eq!(c(with(&a, &["-X", "PUT", "--data-binary", "world"]), &kv("hello"))?.0, 204);
        assert_eq!(c(with(&a, &[]), &kv("hello"))?, (200, "world".into()));
        let (code, body) = c(with(&a, &["-H", "Accept: application/json"]), &kv("hello"))?;
        assert_eq!((code, json(&body)?), (200, serde_json::json!({"key": "hello", "value": "world"})));
        assert_eq!(c(with(&a, &["-X", "PUT", "--data-binary", "@-"]), &kv("bin%FF%00key"))?.0, 204, "an empty body is a value too");
        let bin_value = std::env::temp_dir().join(format!("ringkv-gw-{}", std::process::id()));
        std::fs::write(&bin_value, [0u8, 0xff, 0x10])?;
        let at = format!("@{}", bin_value.display());
        assert_eq!(c(with(&a, &["-X", "PUT", "--data-binary", &at]), &kv("bin%FF%00key"))?.0, 204);
        let (code, body) = c(with(&a, &["-H", "Accept: application/json"]), &kv("bin%FF%00key"))?;
        assert_eq!((code, json(&body)?), (200, serde_json::json!({"key_b64": "Ymlu/wBrZXk=", "value_b64": "AP8Q"})));
        let _ = std::fs::remove_file(&bin_value);
        // Stale reads from this node's replica.
        assert_eq!(c(with(&a, &[]), &format!("{}?stale=true", kv("hello")))?.0, 200);
        // Absent: 404 with a JSON error.
        let (code, body) = c(with(&a, &[]), &kv("missing"))?;
        assert_eq!((code, code_of(&body).as_str()), (404, "not_found"));
        // Create-only.
        let (code, body) = c(with(&a, &["-X", "PUT", "-H", "If-None-Match: *", "--data-binary", "x"]), &kv("hello"))?;
        assert_eq!((code, code_of(&body).as_str()), (412, "precondition_failed"));
        assert_eq!(c(with(&a, &["-X", "PUT", "-H", "If-None-Match: *", "--data-binary", "x"]), &kv("fresh"))?.0, 204);
        // Compare-and-swap: a mismatch answers 412 with the current value.
        let cas = |body: &str| with(&a, &["-X", "POST", "-d", body]);
        let (code, body) = c(cas(r#"{"expect": "nope", "value": "v2"}"#), &format!("{}?cas", kv("hello")))?;
        let v = json(&body)?;
        assert_eq!((code, &v["swapped"], &v["current"]), (412, &serde_json::json!(false), &serde_json::json!("world")));
        let (code, body) = c(cas(r#"{"expect": "world", "value": "v2"}"#), &format!("{}?cas", kv("hello")))?;
        assert_eq!((code, json(&body)?), (200, serde_json::json!({"swapped": true})));
        let (code, body) = c(cas(r#"{"expect_absent": true, "value": "v"}"#), &format!("{}?cas", kv("hello")))?;
        assert_eq!((code, json(&body)?["current"].clone()), (412, serde_json::json!("v2")));
        let (code, body) = c(cas(r#"{"value": "v"}"#), &format!("{}?cas", kv("hello")))?;
        assert_eq!((code, code_of(&body).as_str()), (400, "bad_request"), "neither expect nor expect_absent");
        let (code, body) = c(cas("{not json"), &format!("{}?cas", kv("hello")))?;
        assert_eq!((code, code_of(&body).as_str()), (400, "bad_request"));
        // Atomic increments; a value that is no integer is refused.
        assert_eq!(json(&c(with(&a, &["-X", "POST"]), &format!("{}?incr=5", kv("ctr")))?.1)?["value"], 5);
        assert_eq!(json(&c(with(&a, &["-X", "POST"]), &format!("{}?incr=-7", kv("ctr")))?.1)?["value"], -2);
        let (code, body) = c(with(&a, &["-X", "POST"]), &format!("{}?incr=1", kv("hello")))?;
        assert_eq!((code, code_of(&body).as_str()), (400, "invalid"));
        // Batches, across shards.
        let pairs = r#"{"pairs": [{"key": "b1", "value": "1"}, {"key": "b2", "value_b64": "/w=="}, {"key": "b3", "value": "3"}]}"#;
        assert_eq!(c(with(&a, &["-X", "POST", "-d", pairs]), &format!("{base}/v1/batch/put"))?.0, 204);
        let (code, body) = c(with(&a, &["-X", "POST", "-d", r#"{"keys": ["b1", "b2", "b3", "none"]}"#]), &format!("{base}/v1/batch/get"))?;
        assert_eq!(code, 200);
        assert_eq!(
            json(&body)?["values"],
            serde_json::json!([{"key": "b1", "value": "1"}, {"key": "b2", "value_b64": "/w=="}, {"key": "b3", "value": "3"}, {"key": "none", "value": null}])
        );
        // Delete says whether the key was there.
        assert_eq!(json(&c(with(&a, &["-X", "DELETE"]), &kv("b1"))?.1)?, serde_json::json!({"deleted": true}));
        assert_eq!(json(&c(with(&a, &["-X", "DELETE"]), &kv("b1"))?.1)?, serde_json::json!({"deleted": false}));
        // Size limits as on the native protocol.
        let big = "v".repeat(5000);
        let (code, body) = c(with(&a, &["-X", "PUT", "--data-binary", &big]), &kv("big"))?;
        assert_eq!((code, code_of(&body).as_str()), (413, "too_large"), "{body}");
        let (code, body) = c(with(&a, &["-X", "PUT", "--data-binary", "v"]), &kv(&"k".repeat(65)))?;
        assert_eq!((code, code_of(&body).as_str()), (413, "too_large"), "{body}");
        let huge = "v".repeat(64 * 1024 + 3 * 4096);
        let (code, body) = c(with(&a, &["-X", "PUT", "--data-binary", &huge]), &kv("big"))?;
        assert_eq!((code, code_of(&body).as_str()), (413, "too_large"), "over the body limit: {body}");
        // Authentication and roles.
        let (code, body) = c(vec![], &kv("hello"))?;
        assert_eq!((code, code_of(&body).as_str()), (401, "unauthorized"));
        let (code, body) = c(with("Authorization: Bearer rkv_not_a_token", &[]), &kv("hello"))?;
        assert_eq!((code, code_of(&body).as_str()), (401, "unauthorized"));
        assert_eq!(c(with(&rd, &[]), &kv("hello"))?, (200, "v2".into()), "a read token reads");
        let (code, body) = c(with(&rd, &["-X", "PUT", "--data-binary", "x"]), &kv("hello"))?;
        assert_eq!((code, code_of(&body).as_str()), (403, "forbidden"), "{body}");
        // Status, nodes and shards: the JSON of `ringctl -o json`.
        let (code, body) = c(with(&rd, &[]), &format!("{base}/v1/status"))?;
        let st = json(&body)?;
        assert_eq!((code, st["nodes"].as_array().map(Vec::len), st["shards"].as_array().map(Vec::len)), (200, Some(3), Some(4)));
        let (code, body) = c(with(&rd, &[]), &format!("{base}/v1/nodes"))?;
        assert_eq!((code, json(&body)?.as_array().map(Vec::len)), (200, Some(3)));
        let (code, body) = c(with(&rd, &[]), &format!("{base}/v1/shards/1"))?;
        let shard = json(&body)?;
        assert_eq!(code, 200);
        for field in ["id", "range", "epoch"] {
            assert_eq!(shard[field], shard_json[field], "{field}: {body}");
        }
        assert_eq!(shard["replicas"].as_array().map(Vec::len), Some(3));
        let (code, body) = c(with(&rd, &[]), &format!("{base}/v1/shards/99"))?;
        assert_eq!((code, code_of(&body).as_str()), (404, "not_found"));
        assert_eq!(c(with(&rd, &[]), &format!("{base}/v1/shards/x"))?.0, 400);
        assert_eq!(c(with(&rd, &[]), &format!("{base}/v2/nothing"))?.0, 404);
        // Operations endpoints on the same listener, without a token.
        assert_eq!(c(vec![], &format!("{base}/livez"))?.0, 200);
        assert_eq!(c(vec![], &format!("{base}/readyz"))?.0, 200);
        let (code, metrics) = c(vec![], &format!("{base}/metrics"))?;
        assert!(code == 200 && metrics.contains("ringkv_http_requests_total{code=\"412\"}"), "{metrics}");
        // The admin token is an admin.
        assert_eq!(c(with(&adm, &["-X", "PUT", "--data-binary", "a"]), &kv("by-admin"))?.0, 204);
        Ok(())
    })
    .await??;
    // A revoked token stops working, also for the node that did not revoke it.
    client.placement(&ClientRequest::RevokeToken { name: "reader".into() }).await?;
    let url = format!("http://{http}/v1/kv/hello");
    let rd = bearer(&reader);
    eventually(Duration::from_secs(10), "the revoked token is refused", || {
        let (url, rd) = (url.clone(), rd.clone());
        async move {
            let (code, _) = tokio::task::spawn_blocking(move || curl(&["-H", &rd], &url)).await??;
            anyhow::ensure!(code == 401, "still {code}");
            Ok(())
        }
    })
    .await?;
    // ringctl: tokens (printed once, listed by name and role, revoked) and atomic increments.
    let file = dir.join("cluster.json");
    let http2 = http.clone();
    let names = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<String>> {
        let ctl = |args: &[&str]| {
            run(Command::new(ringkv_tests::ringkv_binary().with_file_name("ringctl")).arg("--cluster").arg(&file).args(args))
        };
        let (rc, out) = ctl(&["-o", "json", "token", "create", "--name", "cli-made", "--role", "write"])?;
        anyhow::ensure!(rc == 0, "token create: {out}");
        let made = json(&out)?["token"].as_str().unwrap_or_default().to_string();
        anyhow::ensure!(made.starts_with("rkv_"), "{out}");
        let (rc, out) = ctl(&["token", "create", "--name", "cli-made", "--role", "read"])?;
        anyhow::ensure!(rc == 7 && out.contains("exists"), "a second token of that name: {rc} {out}");
        let (rc, out) = ctl(&["token", "create", "--name", "bad name", "--role", "read"])?;
        anyhow::ensure!(rc != 0 && out.contains("name"), "a bad name: {rc} {out}");
        let (rc, out) = ctl(&["incr", "cli-counter", "--by", "-3"])?;
        anyhow::ensure!((rc, out.trim()) == (0, "-3"), "incr: {rc} {out}");
        let (rc, out) = ctl(&["incr", "cli-counter"])?;
        anyhow::ensure!((rc, out.trim()) == (0, "-2"), "incr: {rc} {out}");
        // The new token works on the gateway once the node's map has it.
        let url = format!("http://{http2}/v1/kv/cli-counter");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let (code, body) = curl(&["-H", &bearer(&made)], &url)?;
            if (code, body.as_str()) == (200, "-2") {
                break;
            }
            anyhow::ensure!(std::time::Instant::now() < deadline, "the new token: {code} {body}");
            std::thread::sleep(Duration::from_millis(200));
        }
        let (rc, out) = ctl(&["token", "revoke", "cli-made"])?;
        anyhow::ensure!(rc == 0, "revoke: {out}");
        let (rc, out) = ctl(&["token", "revoke", "cli-made"])?;
        anyhow::ensure!(rc == 7, "revoking twice: {rc} {out}");
        let (rc, out) = ctl(&["-o", "json", "token", "list"])?;
        anyhow::ensure!(rc == 0 && !out.contains("rkv_"), "a list shows no token: {out}");
        Ok(json(&out)?
            .as_array()
            .map(|a| a.iter().map(|t| format!("{}:{}", t["name"].as_str().unwrap_or(""), t["role"].as_str().unwrap_or(""))).collect())
            .unwrap_or_default())
    })
    .await??;
    assert_eq!(names, vec!["dev-app:write", "dev-admin:admin"], "the dev tokens remain, the revoked ones are gone");
    tc.stop().await;
    Ok(())
}

/// `redis-cli -e` against node `port`: exit code and output.
fn redis_cli(port: &str, auth: Option<&str>, tls: &[String], cmd: &[&str]) -> anyhow::Result<(i32, String)> {
    let mut c = Command::new("redis-cli");
    c.args(["-e", "-h", "127.0.0.1", "-p", port]).args(tls);
    if let Some(t) = auth {
        c.args(["-a", t, "--no-auth-warning"]);
    }
    let (rc, out) = run(c.args(cmd))?;
    Ok((rc, out.trim_end().to_string()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_gateway_serves_redis_cli_redis_benchmark_and_python() -> anyhow::Result<()> {
    let tc = TestCluster::start(3, 8).await?;
    let client = tc.client().await?;
    let dir = tc.path();
    let app = token(&dir, "app.token")?;
    let reader = client.create_token("reader", Role::Read).await?;
    tc.cluster.wait_maps_current(Duration::from_secs(30)).await?;
    let p = port(tc.cluster.entry(3)?.resp_addr.as_deref().expect("resp gateway"));
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let cli = |cmd: &[&str]| redis_cli(&p, Some(&app), &[], cmd);
        let ok = |cmd: &[&str], want: &str| -> anyhow::Result<()> {
            let (rc, out) = cli(cmd)?;
            anyhow::ensure!(rc == 0 && out == want, "{cmd:?}: exit {rc}, {out:?}, wanted {want:?}");
            Ok(())
        };
        let err = |auth: Option<&str>, cmd: &[&str], want: &str| -> anyhow::Result<()> {
            let (rc, out) = redis_cli(&p, auth, &[], cmd)?;
            anyhow::ensure!(rc == 1 && out.contains(want), "{cmd:?}: exit {rc}, {out:?}, wanted an error with {want:?}");
            Ok(())
        };
        ok(&["PING"], "PONG")?;
        ok(&["ECHO", "hi there"], "hi there")?;
        ok(&["SELECT", "0"], "OK")?;
        err(Some(&app), &["SELECT", "1"], "ERR DB index is out of range")?;
        ok(&["SET", "k", "v1"], "OK")?;
        ok(&["GET", "k"], "v1")?;
        ok(&["SET", "k", "v2", "NX"], "")?;
        ok(&["SET", "k", "v2", "XX", "GET"], "v1")?;
        ok(&["SET", "absent", "v", "XX"], "")?;
        ok(&["SETNX", "k", "x"], "0")?;
        ok(&["SETNX", "k2", "x"], "1")?;
        ok(&["GETSET", "k2", "y"], "x")?;
        ok(&["APPEND", "k2", "zz"], "3")?;
        ok(&["STRLEN", "k2"], "3")?;
        ok(&["STRLEN", "none"], "0")?;
        ok(&["MSET", "m1", "a", "m2", "b"], "OK")?;
        ok(&["MGET", "m1", "m2", "none"], "a\nb")?;
        ok(&["EXISTS", "m1", "m2", "none"], "2")?;
        ok(&["DEL", "m1", "none"], "1")?;
        ok(&["INCR", "n"], "1")?;
        ok(&["INCRBY", "n", "41"], "42")?;
        ok(&["DECR", "n"], "41")?;
        ok(&["DECRBY", "n", "50"], "-9")?;
        ok(&["CLIENT", "SETNAME", "me"], "OK")?;
        ok(&["CONFIG", "GET", "appendonly"], "appendonly\nno")?;
        ok(&["COMMAND", "DOCS"], "")?;
        let (rc, info) = cli(&["INFO"])?;
        anyhow::ensure!(rc == 0 && info.contains("redis_version:") && info.contains("ringkv_shards:8"), "{info}");
        err(Some(&app), &["INCR", "k"], "ERR value is not an integer or out of range")?;
        err(Some(&app), &["INCRBY", "n", "x"], "ERR value is not an integer")?;
        ok(&["SET", "max", &i64::MAX.to_string()], "OK")?;
        err(Some(&app), &["INCR", "max"], "overflow")?;
        err(Some(&app), &["SET", "k", "v", "EX", "10"], "do not expire")?;
        err(Some(&app), &["FLUSHALL"], "ERR unknown command 'FLUSHALL'")?;
        err(Some(&app), &["GET"], "ERR wrong number of arguments for 'get' command")?;
        // Authentication and roles.
        err(None, &["GET", "k"], "NOAUTH")?;
        let (rc, out) = redis_cli(&p, None, &[], &["PING"])?;
        anyhow::ensure!(rc == 0 && out == "PONG", "PING before AUTH: {out}");
        err(Some("rkv_wrong"), &["GET", "k"], "NOAUTH")?;
        let (rc, out) = redis_cli(&p, Some(&reader), &[], &["GET", "k"])?;
        anyhow::ensure!(rc == 0 && out == "v2", "a read token reads: {out}");
        err(Some(&reader), &["SET", "k", "x"], "NOPERM")?;
        err(Some(&reader), &["INCR", "n"], "NOPERM")?;
        // Inline commands (as telnet and redis-benchmark send them), pipelined with others.
        let (rc, out) = run(Command::new("sh").arg("-c").arg(format!(
            "printf 'AUTH {app}\\r\\nPING\\r\\nSET inline \"a b\"\\r\\nGET inline\\r\\nQUIT\\r\\n' | redis-cli -p {p} --no-raw 2>&1 || true"
        )))?;
        let _ = rc;
        anyhow::ensure!(out.contains("PONG") && out.contains("\"a b\""), "inline: {out}");
        // redis-benchmark: every test it runs gets answers.
        let bench = |tests: &str, random: bool| {
            let mut c = Command::new("redis-benchmark");
            c.args(["-h", "127.0.0.1", "-p", &p, "-a", &app, "-t", tests, "-n", "4000", "-c", "8", "-P", "16", "--csv"]);
            if random {
                c.args(["-r", "10000"]);
            }
            run(&mut c)
        };
        let (rc, mut csv) = bench("ping,set,get,mset", true)?;
        anyhow::ensure!(rc == 0, "redis-benchmark: {csv}");
        // INCR on one key, so its final value counts the increments.
        let (rc, incr) = bench("incr", false)?;
        anyhow::ensure!(rc == 0, "redis-benchmark: {incr}");
        csv.push_str(&incr);
        let rows: Vec<(String, f64)> = csv
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split(',').map(|s| s.trim_matches('"')).collect();
                Some((f.first()?.to_string(), f.get(1)?.parse().ok()?))
            })
            .collect();
        for t in ["PING_INLINE", "PING_MBULK", "SET", "GET", "INCR", "MSET (10 keys)"] {
            let rps = rows.iter().find(|(n, _)| n == t).map(|(_, r)| *r);
            anyhow::ensure!(rps.is_some_and(|r| r > 0.0), "{t}: {rps:?} in {csv}");
        }
        // The counter redis-benchmark incremented 4,000 times from 8 connections, pipelined.
        ok(&["GET", "counter:__rand_int__"], "4000")?;
        // A request larger than a node takes in one request is refused, and the connection closed.
        {
            use std::io::{Read, Write};
            let mut sock = std::net::TcpStream::connect(format!("127.0.0.1:{p}"))?;
            sock.set_read_timeout(Some(Duration::from_secs(10)))?;
            sock.write_all(&ringkv_wire::resp::encode_request(&[b"AUTH", app.as_bytes()]))?;
            let big = vec![b'v'; 1_000_000];
            let req = ringkv_wire::resp::encode_request(&[b"MSET", b"b1", &big, b"b2", &big, b"b3", &big]);
            let _ = sock.write_all(&req);
            let mut answer = Vec::new();
            let _ = sock.read_to_end(&mut answer);
            let answer = String::from_utf8_lossy(&answer);
            anyhow::ensure!(answer.starts_with("+OK\r\n-ERR Protocol error: a request over"), "{answer}");
        }
        // The Python client, RESP3 and RESP2, pipelines, errors.
        let (rc, out) = run(Command::new(python()).arg(script()).args(["basics", &p, &app]))?;
        anyhow::ensure!(rc == 0 && out.trim() == "ok", "python redis: {out}");
        Ok(())
    })
    .await??;
    tc.stop().await;
    Ok(())
}

/// INCR is one Raft command applied exactly once through the gateway's session: increments
/// from many connections while the counter's shard leader is killed end at exactly the number
/// answered OK, give or take those answered with an error (unknown).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_increments_through_the_gateway_survive_a_leader_kill_exactly() -> anyhow::Result<()> {
    let mut tc = TestCluster::start(3, 2).await?;
    let client = tc.client().await?;
    let app = token(&tc.path(), "app.token")?;
    let key = "counter";
    let shard = client.map().shard_for_hash(ringkv_wire::key_hash(key.as_bytes())).map(|s| s.id).expect("shard");
    let mut leader = 0;
    for n in 1..=3 {
        if tc.leaders_on(&client, n).await?.contains(&shard) {
            leader = n;
        }
    }
    anyhow::ensure!(leader != 0, "shard {shard} has a leader");
    // The clients talk to the gateways of the two nodes that stay up.
    let mut ports = Vec::new();
    for n in (1..=3).filter(|n| *n != leader) {
        ports.push(port(tc.cluster.entry(n)?.resp_addr.as_deref().unwrap_or_default()));
    }
    let job = {
        let ports = ports.join(",");
        tokio::task::spawn_blocking(move || run(Command::new(python()).arg(script()).args(["incr", &ports, &app, key, "16", "8"])))
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    tc.cluster.kill(leader).await?;
    // The kill hit the shard's leader under load: another node takes over while increments flow.
    let others: Vec<u64> = (1..=3).filter(|n| *n != leader).collect();
    eventually(Duration::from_secs(10), "another node leads the counter's shard", || async {
        for n in &others {
            if tc.leaders_on(&client, *n).await.is_ok_and(|l| l.contains(&shard)) {
                return Ok(());
            }
        }
        anyhow::bail!("no leader yet")
    })
    .await?;
    tc.cluster.restart(leader)?;
    let (rc, out) = job.await??;
    anyhow::ensure!(rc == 0, "python: {out}");
    let v = json(out.lines().last().unwrap_or_default())?;
    let (ok, unknown, last) = (v["ok"].as_i64().unwrap_or(-1), v["unknown"].as_i64().unwrap_or(-1), v["final"].as_i64().unwrap_or(-1));
    println!("increments: {ok} ok, {unknown} unknown, counter {last}");
    anyhow::ensure!(ok > 100, "too few increments to mean anything: {out}");
    // Every OK applied once; an unknown one applied at most once.
    anyhow::ensure!(last >= ok && last <= ok + unknown, "counter {last} with {ok} ok and {unknown} unknown");
    let native = client.get(key.as_bytes()).await?.map(|v| String::from_utf8_lossy(&v).into_owned());
    anyhow::ensure!(native == Some(last.to_string()), "the native client reads {native:?}");
    // Without a quorum the gateways answer, after their deadline, with a retryable error.
    let survivor = tc.cluster.entry(others[0])?.clone();
    for n in (1..=3).filter(|n| *n != others[0]) {
        tc.cluster.kill(n).await?;
    }
    // A leader may serve reads from its lease until it runs out (the election timeout, 1 s with
    // the test timers; no other leader can exist before then): ask after it.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let app = token(&tc.path(), "app.token")?;
    let (url, p) = (
        format!("http://{}/v1/kv/{key}", survivor.http_addr.clone().unwrap_or_default()),
        port(survivor.resp_addr.as_deref().unwrap_or_default()),
    );
    let (http, resp) = tokio::task::spawn_blocking(move || -> anyhow::Result<((u16, String), (i32, String))> {
        Ok((curl(&["-H", &bearer(&app)], &url)?, redis_cli(&p, Some(&app), &[], &["GET", key])?))
    })
    .await??;
    let v = json(&http.1)?;
    anyhow::ensure!(matches!(http.0, 503 | 504) && v["error"]["retryable"] == true, "HTTP without a quorum: {http:?}");
    anyhow::ensure!(resp.0 == 1 && resp.1.starts_with("TRYAGAIN"), "Redis without a quorum: {resp:?}");
    for n in (1..=3).filter(|n| *n != others[0]) {
        tc.cluster.restart(n)?;
    }
    tc.cluster.wait_ready(Duration::from_secs(60)).await?;
    tc.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateways_over_tls_take_tokens_and_client_certificates() -> anyhow::Result<()> {
    let tc = TestCluster::start_with(3, 2, "[gateway]\ntls = true").await?;
    let client = tc.client().await?;
    let dir = tc.path();
    let certs = dir.join("certs");
    let app = token(&dir, "app.token")?;
    let reader_cert = ringkv_transport::certs::issue_client(&certs, &certs, "reader", Role::Read)?;
    let e = tc.cluster.entry(1)?.clone();
    let (http, p) = (e.http_addr.clone().expect("http"), port(e.resp_addr.as_deref().expect("resp")));
    let ca = certs.join("ca.pem").display().to_string();
    let (admin_cert, admin_key) =
        (tc.cluster.file.certs.client_cert.display().to_string(), tc.cluster.file.certs.client_key.display().to_string());
    let (rc_cert, rc_key) = (reader_cert.cert.display().to_string(), reader_cert.key.display().to_string());
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let url = format!("https://{http}/v1/kv/tls-key");
        // A token over HTTPS, the server checked against the cluster CA.
        assert_eq!(curl(&["--cacert", &ca, "-H", &bearer(&app), "-X", "PUT", "--data-binary", "v"], &url)?.0, 204);
        // A client certificate needs no token; its role counts.
        assert_eq!(curl(&["--cacert", &ca, "--cert", &admin_cert, "--key", &admin_key], &url)?, (200, "v".into()));
        let (code, body) = curl(&["--cacert", &ca, "--cert", &rc_cert, "--key", &rc_key, "-X", "PUT", "--data-binary", "w"], &url)?;
        assert_eq!((code, code_of(&body).as_str()), (403, "forbidden"));
        assert_eq!(curl(&["--cacert", &ca], &url)?.0, 401, "neither token nor certificate");
        // Plain HTTP to the TLS port gets no answer.
        let (rc, _) = run(Command::new("curl").args(["-s", "--max-time", "5", &format!("http://{http}/livez")]))?;
        assert_ne!(rc, 0, "plain HTTP on the TLS port");
        // redis-cli over TLS: with a token, and with a client certificate alone.
        let tls = |cert: Option<(&str, &str)>| -> Vec<String> {
            let mut v = vec!["--tls".to_string(), "--cacert".into(), ca.clone()];
            if let Some((c, k)) = cert {
                v.extend(["--cert".to_string(), c.to_string(), "--key".into(), k.to_string()]);
            }
            v
        };
        let (rc, out) = redis_cli(&p, Some(&app), &tls(None), &["GET", "tls-key"])?;
        assert_eq!((rc, out.as_str()), (0, "v"));
        let (rc, out) = redis_cli(&p, None, &tls(Some((&admin_cert, &admin_key))), &["INCR", "tls-n"])?;
        assert_eq!((rc, out.as_str()), (0, "1"));
        let (rc, out) = redis_cli(&p, None, &tls(Some((&rc_cert, &rc_key))), &["SET", "tls-n", "x"])?;
        assert!(rc == 1 && out.contains("NOPERM"), "{out}");
        let (rc, out) = redis_cli(&p, None, &tls(None), &["GET", "tls-key"])?;
        assert!(rc == 1 && out.contains("NOAUTH"), "{out}");
        Ok(())
    })
    .await??;
    drop(client);
    tc.stop().await;
    Ok(())
}
