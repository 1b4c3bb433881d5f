//! The test engine executables exist and refuse a launch without a cluster directory.
//!
//! Besides checking that, this test is what makes `cargo test --workspace` build
//! `understudy-testapp-v1`/`-v2` (a package's binaries are built for its integration tests):
//! the root package's end-to-end tests find them in `target/<profile>/`.

use std::process::Command;

#[test]
fn test_engines_refuse_a_launch_without_a_directory() {
    for (version, exe) in [
        (1, env!("CARGO_BIN_EXE_understudy-testapp-v1")),
        (2, env!("CARGO_BIN_EXE_understudy-testapp-v2")),
    ] {
        let out = Command::new(exe)
            .env_remove("UNDERSTUDY_DIR")
            .env_remove("UNDERSTUDY_SLOT")
            .output()
            .unwrap_or_else(|e| panic!("cannot run {exe}: {e}"));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{exe}: {stderr}");
        assert!(
            stderr.contains(&format!(
                "testapp-v{version}: --dir: expected the cluster directory"
            )),
            "{exe}: {stderr}"
        );
    }
}
