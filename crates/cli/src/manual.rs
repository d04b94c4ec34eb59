//! `cutover completions SHELL` and `cutover man [COMMAND]`: shell completion scripts and man
//! pages generated from the same clap definitions that parse the command line, printed to
//! stdout for the user to install where their shell and `man` look.

use crate::exit;
use crate::print::errln;
use std::io::Write;

/// Print the completion script for `shell`.
pub fn completions(mut cmd: clap::Command, shell: clap_complete::Shell) -> u8 {
    let name = cmd.get_name().to_string();
    let mut buf = Vec::new();
    clap_complete::generate(shell, &mut cmd, name, &mut buf);
    print(&buf, "completions")
}

/// Print the man page of cutover(1), or of one command as cutover-COMMAND(1).
pub fn man(mut cmd: clap::Command, command: Option<&str>) -> u8 {
    cmd.build();
    let page = match command {
        None => cmd,
        Some(name) => match cmd.find_subcommand(name) {
            // Built, a subcommand's display name is `cutover-NAME`: the page's title.
            Some(sub) => sub.clone().version(env!("CARGO_PKG_VERSION")),
            None => {
                let known: Vec<&str> = cmd
                    .get_subcommands()
                    .map(|s| s.get_name())
                    .filter(|n| *n != "help")
                    .collect();
                errln!(
                    "cutover man: no command {name:?}; there are {}",
                    known.join(", ")
                );
                return exit::USAGE;
            }
        },
    };
    let mut buf = Vec::new();
    if let Err(e) = clap_mangen::Man::new(page).render(&mut buf) {
        errln!("cutover man: {e}");
        return exit::FATAL;
    }
    print(&buf, "man")
}

fn print(bytes: &[u8], what: &str) -> u8 {
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|_| out.flush()) {
        Ok(()) => exit::OK,
        // A closed pipe (`| head`) is the reader's choice, not a failure.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => exit::OK,
        Err(e) => {
            errln!("cutover {what}: cannot write: {e}");
            exit::FATAL
        }
    }
}
