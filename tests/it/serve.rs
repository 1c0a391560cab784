//! `kvsharer serve` as a client sees it: the `kvsharer` binary on the default model,
//! driven over plain HTTP (a raw socket, so malformed requests can be sent as they
//! are) and by the official `openai` Python client (installed into a virtual
//! environment by this test).
//!
//! Oracle for answers: `kvsharer run` with the same prompt, template and greedy
//! sampling. The server decodes its slots in batched passes; greedy text must still
//! equal the single-conversation run word for word.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::support;

const QUESTION: &str = "What is the capital of France?";

struct Server {
    child: Child,
    addr: String,
    log: Arc<Mutex<String>>,
}

impl Server {
    /// Starts `kvsharer serve` on the default model on a free port with `extra`
    /// flags and waits until it listens.
    fn start(extra: &[&str]) -> Server {
        let model = support::default_model_path();
        let mut args = vec!["-c", "512"];
        args.extend_from_slice(extra);
        Server::start_on(&model, &args).unwrap_or_else(|log| panic!("{log}"))
    }

    /// `start` on `model` (no `-c` given); `Err` with what serve printed when it
    /// exits before listening.
    fn start_on(model: &Path, extra: &[&str]) -> Result<Server, String> {
        let mut child = Command::new(env!("CARGO_BIN_EXE_kvsharer"))
            .args(["serve", "-m"])
            .arg(model)
            .args(["--port", "0", "-t", "2"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kvsharer serve starts");
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let log = Arc::new(Mutex::new(String::new()));
        let mut addr = None;
        for line in lines.by_ref() {
            let line = line.unwrap();
            log.lock().unwrap().push_str(&format!("{line}\n"));
            if let Some(rest) = line.strip_prefix("listening on http://") {
                addr = Some(rest.split("/v1").next().unwrap().to_string());
                break;
            }
        }
        let Some(addr) = addr else {
            let status = child.wait().unwrap();
            return Err(format!(
                "serve exited ({status}) before listening:\n{}",
                log.lock().unwrap()
            ));
        };
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                sink.lock().unwrap().push_str(&format!("{line}\n"));
            }
        });
        Ok(Server { child, addr, log })
    }

    fn get(&self, path: &str) -> (u16, String) {
        request(&self.addr, "GET", path, &[], b"")
    }

    fn post(&self, path: &str, body: &str) -> (u16, String) {
        request(&self.addr, "POST", path, &[], body.as_bytes())
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn head(method: &str, path: &str, headers: &[(&str, &str)], len: usize) -> String {
    let mut h = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nContent-Length: {len}\r\nConnection: close\r\n"
    );
    for (k, v) in headers {
        h.push_str(&format!("{k}: {v}\r\n"));
    }
    h.push_str("\r\n");
    h
}

/// One request on a fresh connection; the status and the raw body (chunked
/// transfer framing left in: the checks look for text inside it).
fn request(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    s.write_all(head(method, path, headers, body.len()).as_bytes())
        .unwrap();
    // The server may answer (413) and close before taking the whole body.
    let _ = s.write_all(body);
    read_response(s)
}

fn read_response(mut s: TcpStream) -> (u16, String) {
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (status, body)
}

fn json_body(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

/// `kvsharer run`'s greedy output for `args`.
fn run_greedy(args: &[&str]) -> String {
    let model = support::default_model_path();
    let o = Command::new(env!("CARGO_BIN_EXE_kvsharer"))
        .args(["run", "-m"])
        .arg(&model)
        .args(["--temp", "0", "-c", "512", "-t", "2"])
        .args(args)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap().trim().to_string()
}

#[test]
fn serve_answers_like_run_and_refuses_bad_requests() {
    let server = Server::start(&["-P", "2"]);
    assert!(
        server.log().contains("2 slots x 512 tokens"),
        "{}",
        server.log()
    );

    // Greedy answers equal `kvsharer run`'s, chat (template) and plain completion.
    let (status, body) = server.post(
        "/v1/chat/completions",
        &serde_json::json!({"messages": [{"role": "user", "content": QUESTION}],
            "temperature": 0, "max_tokens": 24})
        .to_string(),
    );
    assert_eq!(status, 200, "{body}");
    let v = json_body(&body);
    let reply = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(
        reply.trim(),
        run_greedy(&["--chat", "-p", QUESTION, "-n", "24"])
    );
    assert_eq!(v["usage"]["completion_tokens"], 24);
    assert_eq!(v["choices"][0]["finish_reason"], "length");

    let (status, body) = server.post(
        "/v1/completions",
        r#"{"prompt": "The quick brown fox", "temperature": 0, "max_tokens": 20}"#,
    );
    assert_eq!(status, 200, "{body}");
    let text = json_body(&body)["choices"][0]["text"]
        .as_str()
        .unwrap()
        .to_string();
    let run = run_greedy(&[
        "-p",
        "The quick brown fox",
        "-n",
        "20",
        "--no-display-prompt",
    ]);
    assert_eq!(text.trim(), run);

    // Streaming: events, then [DONE].
    let (status, body) = server.post(
        "/v1/chat/completions",
        &serde_json::json!({"messages": [{"role": "user", "content": QUESTION}],
            "temperature": 0, "max_tokens": 8, "stream": true})
        .to_string(),
    );
    assert_eq!(status, 200);
    assert!(
        body.contains("chat.completion.chunk") && body.contains("data: [DONE]"),
        "{body}"
    );
    // The same conversation again reused the slot's cached prompt (all but the
    // last token, whose logits start the answer).
    let cached = |m: &str| {
        m.lines()
            .find_map(|l| l.strip_prefix("kvsharer_prompt_tokens_cached_total "))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let prompt_tokens = v["usage"]["prompt_tokens"].as_f64().unwrap();
    let (_, metrics) = server.get("/metrics");
    assert!(cached(&metrics) >= prompt_tokens - 1.0, "{metrics}");

    let (status, body) = server.get("/v1/models");
    assert_eq!(status, 200);
    assert_eq!(
        json_body(&body)["data"][0]["id"],
        "SmolLM2-135M-Instruct.Q4_1"
    );
    let (status, body) = server.get("/metrics");
    assert_eq!(status, 200);
    for m in [
        "kvsharer_requests_total",
        "kvsharer_generated_tokens_total",
        "kvsharer_kv_cache_bytes",
        "kvsharer_requests_active",
    ] {
        assert!(body.contains(m), "/metrics lacks {m}");
    }

    // Bad requests: a 4xx with an OpenAI error body, and the server keeps serving.
    let long_prompt = "word ".repeat(2000);
    let cases: Vec<(&str, String, u16)> = vec![
        ("malformed JSON", "{\"messages\": [".into(), 400),
        ("wrong field type", r#"{"messages": 5}"#.into(), 400),
        (
            "wrong sampling type",
            r#"{"messages": [{"role":"user","content":"hi"}], "temperature": "hot"}"#.into(),
            400,
        ),
        (
            "unknown model",
            r#"{"model": "gpt-9", "messages": [{"role":"user","content":"hi"}]}"#.into(),
            404,
        ),
        ("empty messages", r#"{"messages": []}"#.into(), 400),
        (
            "negative max_tokens",
            r#"{"messages": [{"role":"user","content":"hi"}], "max_tokens": -1}"#.into(),
            400,
        ),
        (
            "prompt longer than the context",
            serde_json::json!({"messages": [{"role": "user", "content": long_prompt}]}).to_string(),
            400,
        ),
    ];
    for (what, body, want) in &cases {
        let (status, resp) = server.post("/v1/chat/completions", body);
        assert_eq!(status, *want, "{what}: {resp}");
        let e = json_body(&resp);
        assert!(
            e["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{what}: {resp}"
        );
        assert!(e["error"]["type"].is_string(), "{what}: {resp}");
    }
    let big = vec![b' '; 64 << 20];
    let (status, resp) = request(&server.addr, "POST", "/v1/completions", &[], &big);
    assert_eq!(status, 413, "64 MiB body: {resp}");
    assert!(json_body(&resp)["error"]["message"].is_string(), "{resp}");
    let (status, _) = server.get("/no/such/path");
    assert_eq!(status, 404);
    let (status, _) = server.get("/v1/chat/completions");
    assert_eq!(status, 405);
    let (status, body) = server.get("/health");
    assert_eq!(status, 200, "{body}");
    assert_eq!(json_body(&body)["status"], "ok");
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn serve_frees_slots_queues_checks_keys_and_stops_cleanly() {
    let server = Server::start(&["-P", "1", "--queue", "1", "--api-key", "sesame"]);
    let key = [("Authorization", "Bearer sesame")];
    let chat = r#"{"messages": [{"role":"user","content":"hi"}], "max_tokens": 2}"#;
    let (status, body) = request(
        &server.addr,
        "POST",
        "/v1/chat/completions",
        &[],
        chat.as_bytes(),
    );
    assert_eq!(status, 401, "{body}");
    assert_eq!(json_body(&body)["error"]["code"], "invalid_api_key");
    let wrong = [("Authorization", "Bearer nope")];
    assert_eq!(
        request(&server.addr, "GET", "/v1/models", &wrong, b"").0,
        401
    );
    let (status, body) = request(
        &server.addr,
        "POST",
        "/v1/chat/completions",
        &key,
        chat.as_bytes(),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(server.get("/health").0, 200, "health needs no key");

    // A client that disconnects frees its slot at once.
    let busy = |s: &Server| {
        json_body(&s.get("/health").1)["slots_busy"]
            .as_u64()
            .unwrap()
    };
    drop(open_stream_with_key(&server.addr, 4000));
    wait_for("the slot to be freed", || busy(&server) == 0);
    let (_, metrics) = server.get("/metrics");
    assert!(
        metrics.contains("kvsharer_requests_cancelled_total 1"),
        "{metrics}"
    );

    // One slot busy, one request queued: the next gets 503 with Retry-After.
    let first = open_stream_with_key(&server.addr, 4000);
    let addr = server.addr.clone();
    let queued = std::thread::spawn(move || {
        request(
            &addr,
            "POST",
            "/v1/completions",
            &[("Authorization", "Bearer sesame")],
            br#"{"prompt": "x", "max_tokens": 1}"#,
        )
    });
    wait_for("a queued request", || {
        json_body(&server.get("/health").1)["queued"].as_u64() == Some(1)
    });
    let mut s = TcpStream::connect(&server.addr).unwrap();
    let body = br#"{"prompt": "y", "max_tokens": 1}"#;
    s.write_all(head("POST", "/v1/completions", &key, body.len()).as_bytes())
        .unwrap();
    s.write_all(body).unwrap();
    let mut raw = String::new();
    let _ = s.read_to_string(&mut raw);
    assert!(raw.starts_with("HTTP/1.1 503"), "{raw}");
    assert!(raw.to_ascii_lowercase().contains("retry-after: 1"), "{raw}");
    drop(first);
    assert_eq!(queued.join().unwrap().0, 200);

    // SIGTERM mid-stream: the stream ends (an error event or its end) and serve exits 0.
    let mut stream = open_stream_with_key(&server.addr, 4000);
    let mut server = server;
    let pid = server.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let mut rest = String::new();
    let _ = stream.read_to_string(&mut rest);
    assert!(
        rest.contains("shutting down") || rest.contains("[DONE]"),
        "{rest}"
    );
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = server.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "serve did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        status.success(),
        "serve exited with {status}:\n{}",
        server.log()
    );
    assert!(server.log().contains("stopped"), "{}", server.log());
}

/// A streamed answer (with the key), read until its first event.
fn open_stream_with_key(addr: &str, max_tokens: usize) -> TcpStream {
    let body = serde_json::json!({"prompt": "Once upon a time", "max_tokens": max_tokens,
        "stream": true, "temperature": 0.8, "seed": 1})
    .to_string();
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let key = [("Authorization", "Bearer sesame")];
    s.write_all(head("POST", "/v1/completions", &key, body.len()).as_bytes())
        .unwrap();
    s.write_all(body.as_bytes()).unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 512];
    while !String::from_utf8_lossy(&seen).contains("data: {") {
        let n = s.read(&mut buf).unwrap();
        assert!(
            n > 0,
            "stream closed early: {}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
    s
}

#[test]
fn the_openai_python_client_drives_the_server() {
    let python = support::python_with(&["openai>=1.40,<4"]);
    let server = Server::start(&["-P", "4"]);
    let expected = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        expected.path(),
        run_greedy(&["--chat", "-p", QUESTION, "-n", "24"]),
    )
    .unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/serve/openai_client.py");
    let o = Command::new(python)
        .arg(script)
        .arg(format!("http://{}/v1", server.addr))
        .arg("SmolLM2-135M-Instruct.Q4_1")
        .arg(expected.path())
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out}\n{}\nserver log:\n{}",
        String::from_utf8_lossy(&o.stderr),
        server.log()
    );
    assert!(out.contains("all checks passed"), "{out}");
}

/// `serve --backend wgpu -P 2` (lavapipe in CI): two requests at once, each slot a
/// sequence of one wgpu run state stepped together, answer what `run --backend wgpu`
/// answers alone (greedy, on a tiny random model with a byte-level vocabulary, so
/// it runs in seconds on a software adapter). Skipped, saying why, without an
/// adapter.
#[cfg(feature = "wgpu")]
#[test]
fn serve_on_wgpu_steps_two_slots_like_single_runs() {
    let test = "serve::serve_on_wgpu_steps_two_slots_like_single_runs";
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.gguf");
    support::write_tiny_model(&support::TinySpec::default(), &model);
    let m = model.to_str().unwrap();
    let flags = ["--backend", "wgpu", "-c", "256"];
    let mut args = vec!["-P", "2"];
    args.extend(flags);
    let server = match Server::start_on(&model, &args) {
        Ok(s) => s,
        Err(log) if log.contains("no GPU adapter found through wgpu") => {
            support::skip(test, support::NO_WGPU_ADAPTER);
            return;
        }
        Err(log) => panic!("{log}"),
    };
    assert!(
        server.log().contains("2 slots x 256 tokens"),
        "{}",
        server.log()
    );
    let prompts = ["The quick brown fox", "Once upon a time, far away"];
    let answers: Vec<String> = std::thread::scope(|scope| {
        let asks: Vec<_> = prompts
            .iter()
            .map(|p| {
                let server = &server;
                scope.spawn(move || {
                    let body = serde_json::json!({"prompt": p, "temperature": 0,
                        "max_tokens": 24})
                    .to_string();
                    let (status, body) = server.post("/v1/completions", &body);
                    assert_eq!(status, 200, "{body}");
                    let v = json_body(&body);
                    assert_eq!(v["usage"]["completion_tokens"], 24, "{body}");
                    v["choices"][0]["text"].as_str().unwrap().to_string()
                })
            })
            .collect();
        asks.into_iter().map(|a| a.join().unwrap()).collect()
    });
    for (p, answer) in prompts.iter().zip(&answers) {
        let o = Command::new(env!("CARGO_BIN_EXE_kvsharer"))
            .args([
                "run",
                "-m",
                m,
                "--temp",
                "0",
                "-n",
                "24",
                "--no-display-prompt",
                "-p",
                p,
            ])
            .args(flags)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(
            answer.trim(),
            String::from_utf8_lossy(&o.stdout).trim(),
            "{p}"
        );
    }
    assert_ne!(answers[0], answers[1]);
}
