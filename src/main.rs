//! The `kmsfs` command. Errors end here as one message and an exit code:
//! 0 ok, 1 failure, 2 usage, 75 temporary failure (retry may help).

mod cli;

fn main() {
    std::process::exit(cli::run());
}
