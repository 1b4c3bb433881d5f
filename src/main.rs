//! The `understudy` command line.

fn main() {
    eprintln!("understudy: no commands yet");
    std::process::exit(2);
}
