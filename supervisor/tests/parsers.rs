//! Fuzz-style property tests of the supervisor's two parsers of untrusted text: control-socket
//! request lines ([`Request::parse`]) and cluster configs ([`ClusterConfig::from_str`]).
//!
//! Each parser gets 100,000 generated inputs in CI (random bytes, JSON/TOML of the right shape
//! with wrong types, numbers where names belong, unknown fields, huge values and lines); set
//! `UNDERSTUDY_FUZZ_CASES` for a longer run (e.g. `UNDERSTUDY_FUZZ_CASES=5000000 cargo test
//! -p understudy-supervisor --release --test parsers`). The properties: no panic, no hang
//! (each input is parsed once, synchronously), an accepted input is exactly a well-formed one,
//! and a refusal names the field at fault. The generator is the workspace's seeded xorshift
//! (`understudy_test_support::Rng`), so a failure prints a case that reproduces, and the seed
//! (`UNDERSTUDY_TEST_SEED` runs another sequence).
//!
//! Below them, the regression tests of the bugs of issue 10 that live in these parsers.

use understudy_supervisor::config::{ClusterConfig, ConfigError, HEARTBEAT_MS_MAX, LATENCY_US_MAX};
use understudy_supervisor::proto::{
    Op, PromoteRequest, ReloadRequest, Request, RequestError, UpgradeRequest, ACCEPT_FOR_MS_MAX,
    OP_NAMES, REQUEST_BYTES_MAX,
};
use understudy_test_support::Rng;

fn cases() -> u64 {
    std::env::var("UNDERSTUDY_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000)
}

/// A JSON value of a random type, sometimes extreme.
fn json_value(rng: &mut Rng, depth: u32) -> serde_json::Value {
    use serde_json::json;
    match rng.below(if depth > 2 { 9 } else { 11 }) {
        0 => json!(null),
        1 => json!(rng.chance(50)),
        2 => json!(rng.below(10)),
        3 => json!(rng.next_u64()),
        4 => json!(-(rng.below(1 << 40) as i64)),
        5 => json!(rng.next_u64() as f64 / 7.0),
        6 => json!(*rng.pick(&OP_NAMES)),
        7 => json!(*rng.pick(&[
            "",
            "/bin/true",
            "x\u{0}y",
            "Status",
            "DOWN",
            "é",
            "upgrade "
        ])),
        8 => {
            let n = rng.below(40) as usize;
            json!((0..n)
                .map(|_| (b'a' + rng.below(26) as u8) as char)
                .collect::<String>())
        }
        9 => serde_json::Value::Array(
            (0..rng.below(4))
                .map(|_| json_value(rng, depth + 1))
                .collect(),
        ),
        _ => {
            let mut map = serde_json::Map::new();
            for _ in 0..rng.below(4) {
                map.insert(field_name(rng), json_value(rng, depth + 1));
            }
            serde_json::Value::Object(map)
        }
    }
}

const REQUEST_FIELDS: [&str; 15] = [
    "v",
    "op",
    "slot",
    "accept_loss",
    "config_toml",
    "binary",
    "accept_for_ms",
    "accept_cmd",
    "keep_standby",
    "no_enable",
    "max_error_rate",
    "count_refusals",
    "max_latency_us_p99",
    "type",
    "extra",
];

fn field_name(rng: &mut Rng) -> String {
    if rng.chance(85) {
        rng.pick(&REQUEST_FIELDS).to_string()
    } else {
        format!("f{}", rng.below(1000))
    }
}

/// One request line: mostly request-shaped JSON, some raw bytes, some huge.
fn request_bytes(rng: &mut Rng) -> Vec<u8> {
    match rng.below(20) {
        0 => (0..rng.below(64)).map(|_| rng.next_u64() as u8).collect(),
        1 => {
            // Valid JSON text, broken UTF-8 inside.
            let mut b = br#"{"v":1,"op":"st"#.to_vec();
            b.push(0x80 | rng.below(64) as u8);
            b.extend_from_slice(br#"tus"}"#);
            b
        }
        2 => {
            // A line longer than the limit.
            let mut b = br#"{"v":1,"op":"status","x":""#.to_vec();
            b.resize(REQUEST_BYTES_MAX + 1 + rng.below(100) as usize, b'a');
            b
        }
        3 => {
            let text = serde_json::to_string(&json_value(rng, 0)).unwrap();
            let cut = rng.below(text.len() as u64 + 1) as usize;
            text.as_bytes()[..cut].to_vec()
        }
        _ => {
            let mut map = serde_json::Map::new();
            if rng.chance(90) {
                map.insert(
                    "v".into(),
                    if rng.chance(80) {
                        serde_json::json!(1)
                    } else {
                        json_value(rng, 1)
                    },
                );
            }
            if rng.chance(95) {
                let op = match rng.below(10) {
                    0 => serde_json::json!(rng.below(8)),
                    1 => json_value(rng, 1),
                    _ => serde_json::json!(*rng.pick(&OP_NAMES)),
                };
                map.insert("op".into(), op);
            }
            for _ in 0..rng.below(4) {
                let name = field_name(rng);
                let value = match name.as_str() {
                    "binary" if rng.chance(60) => serde_json::json!("/opt/engine-v2"),
                    "accept_for_ms" if rng.chance(50) => serde_json::json!(rng.below(1 << 40)),
                    // Fractions exactly representable in few digits (a JSON round trip is exact),
                    // around the bounds.
                    "max_error_rate" if rng.chance(50) => {
                        serde_json::json!(rng.below(1100) as f64 / 1024.0)
                    }
                    "max_latency_us_p99" if rng.chance(50) => {
                        serde_json::json!(LATENCY_US_MAX - 2 + rng.below(4))
                    }
                    "config_toml" if rng.chance(50) => serde_json::json!("cluster = \"x\""),
                    "slot" if rng.chance(70) => serde_json::json!(*rng.pick(&["a", "b", "c", "d"])),
                    "accept_loss" if rng.chance(60) => serde_json::json!(rng.chance(50)),
                    "keep_standby" | "no_enable" | "count_refusals" if rng.chance(60) => {
                        serde_json::json!(rng.chance(50))
                    }
                    _ => json_value(rng, 1),
                };
                map.insert(name, value);
            }
            let mut text = serde_json::to_string(&serde_json::Value::Object(map)).unwrap();
            if rng.chance(10) {
                text.push_str("  ");
            }
            text.into_bytes()
        }
    }
}

/// The request a well-formed line stands for, by the protocol's rules written out plainly; the
/// parser must agree with it on every input.
fn expected_request(bytes: &[u8]) -> Option<Request> {
    if bytes.len() > REQUEST_BYTES_MAX {
        return None;
    }
    let text = std::str::from_utf8(bytes).ok()?;
    let value: serde_json::Value = serde_json::from_str(text.trim()).ok()?;
    let map = value.as_object()?;
    if map.get("v")?.as_u64()? != 1 {
        return None;
    }
    let op = map.get("op")?.as_str()?;
    let allowed: &[&str] = match op {
        "upgrade" => &[
            "v",
            "op",
            "binary",
            "accept_for_ms",
            "accept_cmd",
            "keep_standby",
            "no_enable",
            "max_error_rate",
            "count_refusals",
            "max_latency_us_p99",
            "config_toml",
        ],
        "reload" => &["v", "op", "config_toml"],
        "promote" => &["v", "op", "slot", "accept_loss"],
        _ => &["v", "op"],
    };
    if map.keys().any(|k| !allowed.contains(&k.as_str())) {
        return None;
    }
    let op = match op {
        "status" => Op::Status,
        "switchover" => Op::Switchover,
        "rollback" => Op::Rollback,
        "enable-features" => Op::EnableFeatures,
        "down" => Op::Down,
        "resume-restarts" => Op::ResumeRestarts,
        "reload" => Op::Reload(ReloadRequest {
            config_toml: map.get("config_toml")?.as_str()?.to_string(),
        }),
        "promote" => {
            let slot = map.get("slot")?.as_str()?;
            if !matches!(slot, "a" | "b" | "c") {
                return None;
            }
            let accept_loss = match map.get("accept_loss") {
                None => false,
                Some(v) => v.as_bool()?,
            };
            Op::Promote(PromoteRequest {
                slot: slot.to_string(),
                accept_loss,
            })
        }
        "upgrade" => {
            let binary = map.get("binary")?.as_str()?;
            if binary.is_empty() || binary.contains('\0') {
                return None;
            }
            let accept_for_ms = match map.get("accept_for_ms") {
                None | Some(serde_json::Value::Null) => None,
                Some(v) => Some(v.as_u64().filter(|&ms| ms <= ACCEPT_FOR_MS_MAX)?),
            };
            let accept_cmd = match map.get("accept_cmd") {
                None | Some(serde_json::Value::Null) => None,
                Some(v) => {
                    let cmd = v.as_str()?;
                    if cmd.trim().is_empty() || cmd.contains('\0') {
                        return None;
                    }
                    Some(cmd.to_string())
                }
            };
            let flag = |name: &str| match map.get(name) {
                None => Some(false),
                Some(v) => v.as_bool(),
            };
            // Absent or null: the config's bound; else within the config's own bounds.
            let optional = |name: &str| match map.get(name) {
                None | Some(serde_json::Value::Null) => None,
                Some(v) => Some(v),
            };
            let max_error_rate = match optional("max_error_rate") {
                None => None,
                Some(v) => Some(v.as_f64().filter(|r| (0.0..=1.0).contains(r))?),
            };
            let max_latency_us_p99 = match optional("max_latency_us_p99") {
                None => None,
                Some(v) => Some(v.as_u64().filter(|&us| us <= LATENCY_US_MAX)?),
            };
            let count_refusals = match optional("count_refusals") {
                None => None,
                Some(v) => Some(v.as_bool()?),
            };
            let config_toml = match optional("config_toml") {
                None => None,
                Some(v) => Some(v.as_str()?.to_string()),
            };
            Op::Upgrade(UpgradeRequest {
                binary: binary.into(),
                accept_for_ms,
                accept_cmd,
                keep_standby: flag("keep_standby")?,
                no_enable: flag("no_enable")?,
                max_error_rate,
                count_refusals,
                max_latency_us_p99,
                config_toml,
            })
        }
        _ => return None,
    };
    Some(Request::new(op))
}

#[test]
fn request_lines_of_every_shape_parse_exactly_as_the_rules_say_and_refusals_name_the_field() {
    // Proves, over 100,000 generated lines, that the request parser never panics, accepts
    // exactly the well-formed requests (an independent statement of the rules agrees on every
    // input), round-trips what it accepts, and names the field at fault when it refuses.
    let mut rng = Rng::seeded("requests", 0x5eed_0001);
    let mut accepted = 0u64;
    for case in 0..cases() {
        let bytes = request_bytes(&mut rng);
        let parsed = Request::parse(&bytes);
        let expected = expected_request(&bytes);
        match (&parsed, &expected) {
            (Ok(got), Some(want)) => {
                assert_eq!(
                    got,
                    want,
                    "case {case}: {:?}",
                    String::from_utf8_lossy(&bytes)
                );
                let line = serde_json::to_string(got).unwrap();
                assert_eq!(
                    &Request::parse(line.as_bytes()).unwrap(),
                    got,
                    "round trip {line}"
                );
                accepted += 1;
            }
            (Err(e), None) => {
                let message = e.to_string();
                assert!(message.starts_with("bad request: "), "{message}");
                match e {
                    RequestError::UnknownField { field, .. } => {
                        let shown: String = field.chars().take(60).collect();
                        assert!(
                            message.contains(&format!("{shown:?}")[..shown.len().min(10)]),
                            "{message}"
                        );
                    }
                    RequestError::Field { field, .. } => {
                        assert!(message.contains(&format!("`{field}`")), "{message}")
                    }
                    RequestError::Missing { field } => {
                        assert!(message.contains(&format!("`{field}`")), "{message}")
                    }
                    RequestError::UnknownOp { .. } | RequestError::Version { .. } => {
                        assert!(message.contains("field `"), "{message}")
                    }
                    _ => {}
                }
            }
            _ => panic!(
                "case {case}: parser says {parsed:?}, the rules say {expected:?}, for {:?}",
                String::from_utf8_lossy(&bytes)
            ),
        }
    }
    // The generator must reach the accepting side often enough to prove something.
    assert!(
        accepted * 20 > cases(),
        "only {accepted} accepted of {}",
        cases()
    );
}

/// Config keys with the kind of value each takes.
const CONFIG_KEYS: [(&str, &str); 19] = [
    ("timeouts", "heartbeat_ms"),
    ("timeouts", "start_ms"),
    ("timeouts", "hot_ms"),
    ("timeouts", "switchover_ms"),
    ("timeouts", "shutdown_ms"),
    ("restart", "backoff_initial_ms"),
    ("restart", "backoff_max_ms"),
    ("restart", "crash_loop_window_ms"),
    ("restart", "crash_loop_max"),
    ("backpressure", "wait_max_us"),
    ("backpressure", "policy"),
    ("acceptance", "accept_for_ms"),
    ("acceptance", "max_error_rate"),
    ("acceptance", "max_latency_us_p99"),
    ("acceptance", "accept_cmd"),
    ("ring", "capacity_bytes"),
    ("slots.a", "cpu"),
    ("slots.b", "cpu"),
    ("engine", "args"),
];

fn toml_value(rng: &mut Rng) -> String {
    match rng.below(14) {
        0 => rng.below(100).to_string(),
        1 => rng.below(100_000).to_string(),
        2 => (rng.next_u64() >> 1).to_string(),
        3 => format!("-{}", rng.below(1000)),
        4 => "18446744073709551615".into(),
        5 => "1844674407371".into(),
        6 => format!("{}.{}", rng.below(3), rng.below(1000)),
        7 => (*rng.pick(&["nan", "inf", "-inf", "1e400"])).into(),
        8 => (*rng.pick(&["true", "false"])).into(),
        9 => format!(
            "{:?}",
            *rng.pick(&["wait", "untether", "", "x\u{1}", "/bin/true"])
        ),
        10 => "[1, 2]".into(),
        11 => "{ a = 1 }".into(),
        12 => (1u64 << rng.below(40)).to_string(),
        _ => rng.below(5000).to_string(),
    }
}

fn config_text(rng: &mut Rng) -> String {
    if rng.chance(3) {
        return (0..rng.below(200))
            .map(|_| (rng.below(95) as u8 + 32) as char)
            .collect();
    }
    let mut tables: std::collections::BTreeMap<&str, Vec<String>> = Default::default();
    let mut top = String::new();
    if rng.chance(95) {
        top.push_str("cluster = \"fz\"\n");
    }
    if rng.chance(30) {
        let dir = *rng.pick(&["/dev/shm/understudy", "relative", "/a/../b", "/dev/shm/x"]);
        top.push_str(&format!("shm_dir = {dir:?}\n"));
    }
    if rng.chance(95) {
        tables
            .entry("engine")
            .or_default()
            .push("binary = \"/bin/true\"".into());
    }
    for _ in 0..rng.below(5) {
        let (table, key) = *rng.pick(&CONFIG_KEYS);
        let key = if rng.chance(5) { "unknown_key" } else { key };
        tables
            .entry(table)
            .or_default()
            .push(format!("{key} = {}", toml_value(rng)));
    }
    let mut text = top;
    for (table, lines) in tables {
        let mut seen = std::collections::BTreeSet::new();
        text.push_str(&format!("[{table}]\n"));
        for line in lines {
            // A key twice is a TOML error too, but keep most cases to one value per key.
            let key = line.split(' ').next().unwrap_or("").to_string();
            if seen.insert(key) || rng.chance(5) {
                text.push_str(&line);
                text.push('\n');
            }
        }
    }
    if rng.chance(5) {
        let cut = rng.below(text.len() as u64 + 1) as usize;
        let mut cut = cut;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
    }
    text
}

#[test]
fn configs_of_every_shape_are_accepted_only_with_values_whose_derived_values_fit() {
    // Proves, over 100,000 generated configs (wrong types, huge and negative numbers, unknown
    // keys, truncated text), that parsing never panics, every refusal of a value names its
    // field, and every accepted config's derived values (hung thresholds in ns, deadlines from
    // now) fit without overflow.
    let mut rng = Rng::seeded("configs", 0x5eed_0002);
    let mut accepted = 0u64;
    let now = std::time::Instant::now();
    for case in 0..cases() {
        let text = config_text(&mut rng);
        match ClusterConfig::from_str(&text, "fuzz.toml") {
            Ok(c) => {
                accepted += 1;
                let t = &c.timeouts;
                assert!(t.heartbeat_ms <= HEARTBEAT_MS_MAX, "case {case}: {text}");
                assert!(
                    t.heartbeat_ms
                        .checked_mul(40)
                        .and_then(|v| v.checked_mul(1_000_000))
                        .is_some(),
                    "case {case}: {text}"
                );
                for d in [
                    t.heartbeat(),
                    t.start(),
                    t.hot(),
                    t.switchover(),
                    t.shutdown(),
                ] {
                    assert!(now.checked_add(d).is_some(), "case {case}: {text}");
                }
                let a = &c.acceptance;
                assert!(now
                    .checked_add(std::time::Duration::from_millis(a.accept_for_ms))
                    .is_some());
                assert!(
                    (0.0..=1.0).contains(&a.max_error_rate),
                    "case {case}: {text}"
                );
            }
            Err(ConfigError::Invalid { problems, .. }) => {
                assert!(!problems.is_empty(), "case {case}");
                for p in &problems {
                    assert!(
                        !p.field.is_empty() && !p.expected.is_empty(),
                        "case {case}: {p}"
                    );
                    assert!(p.to_string().contains(&format!("`{}`", p.field)), "{p}");
                }
            }
            Err(ConfigError::Parse { message, .. }) => {
                assert!(!message.trim().is_empty(), "case {case}: {text}");
            }
            Err(other) => panic!("case {case}: unexpected error kind {other:?} for {text}"),
        }
    }
    assert!(
        accepted * 50 > cases(),
        "only {accepted} accepted of {}",
        cases()
    );
}

#[test]
fn a_wrongly_typed_config_value_is_refused_naming_its_key() {
    // Proves a value of the wrong type is reported with its key, for every key the config has.
    for (table, key) in CONFIG_KEYS {
        let value = if key == "policy" || key == "accept_cmd" {
            "12"
        } else {
            "\"text\""
        };
        let value = if key == "args" { "7" } else { value };
        let text = format!(
            "cluster = \"t\"\n[engine]\nbinary = \"/bin/true\"\n[{table}]\n{key} = {value}\n"
        );
        let text = text.replace(
            "[engine]\nbinary = \"/bin/true\"\n[engine]\n",
            "[engine]\nbinary = \"/bin/true\"\n",
        );
        let e = ClusterConfig::from_str(&text, "typed.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains(key), "{key}: {e}");
    }
}

// --- Regression tests of issue 10 (each failed before its fix) ---

#[test]
fn a_numeric_op_is_refused_not_taken_as_a_variant_index() {
    // `{"v":1,"op":5}` used to run `down`, `{"v":1,"op":1}` a switchover.
    for n in 0..8 {
        let line = format!(r#"{{"v":1,"op":{n}}}"#);
        let e = Request::parse(line.as_bytes()).unwrap_err();
        assert!(
            matches!(e, RequestError::Field { ref field, .. } if field == "op"),
            "{line}: {e:?}"
        );
        assert!(e.to_string().contains(&format!("found {n}")), "{e}");
        assert!(serde_json::from_str::<Request>(&line).is_err(), "{line}");
    }
}

#[test]
fn an_unknown_field_is_refused_naming_it() {
    // `{"v":1,"op":"down","binary":"x"}` used to run `down`, ignoring `binary`.
    let e = Request::parse(br#"{"v":1,"op":"down","binary":"x"}"#).unwrap_err();
    assert_eq!(
        e,
        RequestError::UnknownField {
            op: "down",
            field: "binary".into()
        }
    );
    assert!(e.to_string().contains("\"binary\""), "{e}");
    let e = Request::parse(br#"{"v":1,"op":"upgrade","binary":"/x","bogus":1}"#).unwrap_err();
    assert!(
        e.to_string().contains("\"bogus\"") && e.to_string().contains("`binary`"),
        "{e}"
    );
    let e = Request::parse(br#"{"v":1,"op":"reboot"}"#).unwrap_err();
    assert!(matches!(e, RequestError::UnknownOp { .. }), "{e:?}");
    assert!(
        e.to_string().contains("reboot") && e.to_string().contains("status"),
        "{e}"
    );
}

#[test]
fn bytes_that_are_not_utf8_get_a_typed_error() {
    // A request that was not UTF-8 got no reply at all (the server's read_line failed).
    let e = Request::parse(b"{\"v\":1,\"op\":\"st\xffatus\"}").unwrap_err();
    assert_eq!(e, RequestError::NotUtf8 { offset: 15 });
    assert!(e.to_string().contains("not UTF-8 at offset 15"), "{e}");
}

#[test]
fn a_heartbeat_whose_hung_threshold_would_wrap_is_refused() {
    // `heartbeat_ms = 1844674407371` passed validation; ×10×10⁶ wrapped to ~0.45 ms and
    // healthy engines were fenced in a loop.
    let text = "cluster = \"t\"\n[engine]\nbinary = \"/bin/true\"\n[timeouts]\nheartbeat_ms = 1844674407371\nswitchover_ms = 9000000000000\n";
    let e = ClusterConfig::from_str(text, "hb.toml").unwrap_err();
    let ConfigError::Invalid { problems, .. } = &e else {
        panic!("{e}")
    };
    let hb = problems
        .iter()
        .find(|p| p.field == "timeouts.heartbeat_ms")
        .unwrap_or_else(|| panic!("{e}"));
    assert_eq!(hb.found, "1844674407371");
    assert!(hb.expected.contains(&HEARTBEAT_MS_MAX.to_string()), "{hb}");
    assert!(
        problems.iter().any(|p| p.field == "timeouts.switchover_ms"),
        "{e}"
    );
}

#[test]
fn a_cpu_beyond_the_cpu_set_is_refused_by_validation_and_one_absent_here_by_the_host_check() {
    // `[slots.a] cpu = 64` used to fail at spawn with "Invalid argument" (exit 1).
    let text = "cluster = \"t\"\n[engine]\nbinary = \"/bin/true\"\n[slots.a]\ncpu = 5000\n";
    let e = ClusterConfig::from_str(text, "cpu.toml")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("slots.a.cpu") && e.contains("5000") && e.contains("1023"),
        "{e}"
    );
    let text = "cluster = \"t\"\n[engine]\nbinary = \"/bin/true\"\n[slots.b]\ncpu = 1000\n";
    let config = ClusterConfig::from_str(text, "cpu.toml").unwrap();
    let e = config.check_host().unwrap_err().to_string();
    assert!(e.contains("slots.b.cpu") && e.contains("1000"), "{e}");
}

#[test]
fn engine_tuning_variables_out_of_bounds_are_refused_naming_them() {
    // Proves `[engine] env` cannot hand an engine a tuning value whose arithmetic overflows
    // (a hung threshold of u64::MAX ms, say), while sane values pass.
    let config = |env: &str| {
        ClusterConfig::from_str(
            &format!("cluster = \"t\"\n[engine]\nbinary = \"/bin/true\"\n[engine.env]\n{env}\n"),
            "env.toml",
        )
    };
    for env in [
        "UNDERSTUDY_HUNG_MS = \"18446744073709551615\"",
        "UNDERSTUDY_HUNG_MS = \"0\"",
        "UNDERSTUDY_BACKPRESSURE_US = \"-1\"",
        "UNDERSTUDY_CATCHUP_CHUNK = \"0\"",
        "UNDERSTUDY_IDLE = \"4,99999999999\"",
        "UNDERSTUDY_IDLE = \"fast\"",
    ] {
        let key = env.split(' ').next().unwrap();
        let e = config(env).unwrap_err().to_string();
        assert!(e.contains(&format!("engine.env.{key}")), "{env}: {e}");
    }
    for env in [
        "UNDERSTUDY_HUNG_MS = \"900\"",
        "UNDERSTUDY_BACKPRESSURE_US = \"0\"",
        "UNDERSTUDY_IDLE = \"spin\"",
        "UNDERSTUDY_IDLE = \"100,50\"",
        "APP_SETTING = \"anything\"",
    ] {
        config(env).unwrap_or_else(|e| panic!("{env}: {e}"));
    }
}
