//! stage2: PID 1 of the imaging initrd. Not implemented yet; the crate exists so the workspace
//! layout is in place. It exits with an error rather than pretending to image anything.

fn main() -> std::process::ExitCode {
    eprintln!("stage2: not implemented yet");
    std::process::ExitCode::FAILURE
}
