//! Shell completions and man pages come from the clap definitions: every shell's script and
//! every page is there, and they know the `sync` command and its options.

use crate::util::*;

fn cutover(args: &[&str]) -> Out {
    let mut c = cutover_cmd();
    c.args(args);
    Running::start(c).wait()
}

#[test]
fn completions_for_every_shell_know_sync() {
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let out = cutover(&["completions", shell]);
        out.ok();
        assert!(out.stdout.contains("sync"), "{shell}\n{out}");
        assert!(out.stdout.contains("--delete"), "{shell}\n{out}");
    }
    let out = cutover(&["completions", "tcsh"]);
    out.expect_code(2);
}

#[test]
fn man_pages_for_cutover_and_each_command() {
    let out = cutover(&["man"]);
    out.ok();
    assert!(out.stdout.starts_with(".ie"), "roff\n{out}");
    assert!(out.stdout.contains(".TH cutover 1"), "{out}");
    assert!(out.stdout.contains("sync"), "{out}");
    let out = cutover(&["man", "sync"]);
    out.ok();
    assert!(out.stdout.contains(".TH cutover-sync 1"), "{out}");
    assert!(out.stdout.contains("[user@]host:PATH"), "{out}");
    assert!(out.stdout.contains("archive"), "{out}");
    for command in ["serve", "plan", "identity"] {
        let out = cutover(&["man", command]);
        out.ok();
        assert!(out.stdout.contains(&format!("cutover-{command}")), "{out}");
    }
    let out = cutover(&["man", "nope"]);
    assert_one_line_error(&out, &["nope", "sync"]);
}
