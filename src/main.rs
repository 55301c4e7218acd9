fn main() -> std::process::ExitCode {
    poolpipe::cli::main()
}
