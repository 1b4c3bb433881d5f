//! The demo — the main job a newcomer runs first — in its shortened form: it must finish with
//! nothing lost, nothing duplicated, the books equal to the reference model, and no files left.

use std::process::Command;

/// `understudy demo --quick --json` exits 0 and reports 0 lost, 0 duplicated, model equal,
/// both engines on v2 with the iceberg feature, and leaves no cluster files behind.
#[test]
fn quick_demo_loses_and_duplicates_nothing() {
    let child = Command::new(env!("CARGO_BIN_EXE_understudy"))
        .args(["demo", "--quick", "--json"])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run the demo");
    let pid = child.id();
    let out = child.wait_with_output().expect("demo output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "demo failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    let report: serde_json::Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("the demo's --json output is not JSON ({e}):\n{stdout}"));
    assert_eq!(report["lost"], 0, "{report:#}");
    assert_eq!(report["duplicated"], 0, "{report:#}");
    assert_eq!(report["model_check"], "equal", "{report:#}");
    assert_eq!(report["ok"], true, "{report:#}");
    assert!(
        report["acknowledged"].as_u64().unwrap() > 1000,
        "{report:#}"
    );
    assert!(
        report["icebergs_refused_before"].as_u64().unwrap() > 0,
        "{report:#}"
    );
    assert!(
        report["icebergs_accepted_after"].as_u64().unwrap() > 0,
        "{report:#}"
    );
    let engines = report["engines"].as_array().unwrap();
    assert_eq!(engines.len(), 2, "{report:#}");
    for e in engines {
        assert_eq!(e["version"], 2, "{report:#}");
        assert_eq!(e["features"][0], "iceberg", "{report:#}");
    }
    // Cleaned up: this demo's cluster directory and its temporary directory are gone.
    let cluster = understudy_supervisor::config::default_shm_dir().join(format!("demo-{pid}"));
    assert!(
        !cluster.exists(),
        "the demo left {} behind",
        cluster.display()
    );
    let tmp = std::env::temp_dir().join(format!("understudy-demo-{pid}"));
    assert!(!tmp.exists(), "the demo left {} behind", tmp.display());
}

/// Ctrl-C in the middle of the demo stops it with a failure code and still removes every
/// shared file and process it started.
#[test]
fn interrupted_demo_cleans_up() {
    let child = Command::new(env!("CARGO_BIN_EXE_understudy"))
        .args(["demo", "--quick"])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run the demo");
    let pid = child.id();
    let cluster = understudy_supervisor::config::default_shm_dir().join(format!("demo-{pid}"));
    let t = std::time::Instant::now();
    while !cluster.join("control").exists() {
        assert!(
            t.elapsed() < std::time::Duration::from_secs(20),
            "the demo never started its cluster"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    std::thread::sleep(std::time::Duration::from_millis(700));
    // SAFETY: kill(2) of our own child process.
    unsafe { libc::kill(pid as i32, libc::SIGINT) };
    let out = child.wait_with_output().expect("demo exits");
    assert!(
        !out.status.success(),
        "an interrupted demo must not report success"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("interrupted"), "{stderr}");
    assert!(
        !cluster.exists(),
        "the interrupted demo left {} behind",
        cluster.display()
    );
    let tmp = std::env::temp_dir().join(format!("understudy-demo-{pid}"));
    assert!(
        !tmp.exists(),
        "the interrupted demo left {} behind",
        tmp.display()
    );
}
