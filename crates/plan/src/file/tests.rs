//! The plan file's parsing and validation, as a user meets them.

use super::*;

fn parse(text: &str) -> Result<Plan, PlanError> {
    Plan::parse(Path::new("dir/move.toml"), text.to_string())
}

const TWO: &str = r#"
parallel = 2
[[task]]
name = "a"
kind = "tree"
source = "src/a/"
destination = "/dst/a/"

[[task]]
name = "b"
kind = "tree"
source = "src/b/"
destination = "/dst/b/"
depends_on = ["a"]
"#;

#[test]
fn loads_and_defaults() {
    let p = parse(TWO).unwrap();
    assert_eq!(p.name, "move");
    assert_eq!(p.parallel, 2);
    assert_eq!(p.state_dir, Path::new("dir/move.state"));
    assert_eq!(p.base_dir, Path::new("dir"));
    assert_eq!(p.tasks[1].depends_on, vec!["a".to_string()]);
    assert_eq!(p.tasks[0].connections, None);
}

#[test]
fn unknown_key_names_line_and_key() {
    let text = TWO.replace(
        "depends_on = [\"a\"]",
        "depends_on = [\"a\"]\nbwlimt = \"1M\"",
    );
    let e = parse(&text).unwrap_err().to_string();
    assert_eq!(
        e,
        "dir/move.toml:15: unknown key \"bwlimt\" in task \"b\"; did you mean \"bwlimit\"?"
    );
    let e = parse(&format!("paralel = 3\n{TWO}"))
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        "dir/move.toml:1: unknown key \"paralel\" at the top level; did you mean \"parallel\"?"
    );
    // The first task: the nearest header before the key is its own.
    let e = parse(&TWO.replace("destination = \"/dst/a/\"", "destinaton = \"/dst/a/\""))
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        "dir/move.toml:7: unknown key \"destinaton\" in task \"a\"; did you mean \"destination\"?"
    );
    // Case and '-' for '_' are typos too; the inline verify table is named.
    let e = parse(&TWO.replace("depends_on", "Hard-Links = true\ndepends_on"))
        .unwrap_err()
        .to_string();
    assert!(e.ends_with("did you mean \"hard_links\"?"), "{e}");
    let e = parse(&TWO.replace(
        "depends_on",
        "verify = { source = \"a\", destnation = \"b\" }\ndepends_on",
    ))
    .unwrap_err()
    .to_string();
    assert!(
        e.ends_with(
            "unknown key \"destnation\" in task \"b\" verify; did you mean \"destination\"?"
        ),
        "{e}"
    );
    // A header the plan does not know is a key of the top level, even after a task.
    let e = parse(&format!("{TWO}[[tasks]]\nname = \"c\"\n"))
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        "dir/move.toml:15: unknown key \"tasks\" at the top level; did you mean \"task\"?"
    );
    // Nothing near: the keys that are known there, instead of a guess.
    let e = parse(&TWO.replace("depends_on", "colour = 1\ndepends_on"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("unknown key \"colour\" in task \"b\"; the keys here are name, kind, source,"),
        "{e}"
    );
}

#[test]
fn bad_values_name_line_and_key() {
    let e = parse(&TWO.replace(
        "kind = \"tree\"\nsource = \"src/b/\"",
        "kind = \"tape\"\nsource = \"src/b/\"",
    ))
    .unwrap_err()
    .to_string();
    assert!(
        e.starts_with("dir/move.toml:11:") && e.contains("tape"),
        "{e}"
    );
    let e = parse(&TWO.replace("parallel = 2", "parallel = 0"))
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("dir/move.toml:2: parallel = 0"), "{e}");
    let e = parse(&TWO.replace("depends_on = [\"a\"]", "connections = 0"))
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("dir/move.toml:14:") && e.contains("connections"),
        "{e}"
    );
    let e = parse(&format!("target_downtime = \"soon\"\n{TWO}"))
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("dir/move.toml:1: target_downtime"), "{e}");
}

#[test]
fn duplicate_names_and_unknown_dependencies() {
    let e = parse(&TWO.replace("name = \"b\"", "name = \"a\""))
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("dir/move.toml:10: task \"a\": name: the name is already used by task number 1 (line 4)"),
        "{e}"
    );
    let e = parse(&TWO.replace("depends_on = [\"a\"]", "depends_on = [\"a\", \"zz\"]"))
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("dir/move.toml:14: task \"b\": depends_on names \"zz\""),
        "{e}"
    );
}

#[test]
fn cycles_are_reported_with_their_path() {
    let text = format!(
        "{TWO}\n[[task]]\nname = \"c\"\nkind = \"tree\"\nsource = \"s\"\ndestination = \"d\"\ndepends_on = [\"b\"]\n"
    )
    .replacen("destination = \"/dst/a/\"", "destination = \"/dst/a/\"\ndepends_on = [\"c\"]", 1);
    let e = parse(&text).unwrap_err().to_string();
    assert!(
        e.contains("depends_on has a cycle: a -> c -> b -> a"),
        "{e}"
    );
    assert!(e.starts_with("dir/move.toml:8:"), "{e}");
}

#[test]
fn fingerprint_ignores_formatting_not_content() {
    let a = parse(TWO).unwrap().fingerprint;
    let b = parse(&format!("# a comment\n{}", TWO.replace(" = ", "=")))
        .unwrap()
        .fingerprint;
    assert_eq!(a, b);
    let c = parse(&TWO.replace("src/b/", "src/B/")).unwrap().fingerprint;
    assert_ne!(a, c);
}

#[test]
fn hooks_have_defaults_and_checked_timeouts() {
    let p = parse(&format!(
        "{TWO}\n[[pre_final]]\ncommand = \"systemctl stop app\"\n[[post_final]]\nname = \"start\"\ncommand = \"true\"\ntimeout = \"10s\"\nerr_is_fatal = false\n"
    ))
    .unwrap();
    assert_eq!(p.pre_final[0].name, "systemctl stop app");
    assert_eq!(p.pre_final[0].timeout, DEFAULT_HOOK_TIMEOUT);
    assert!(p.pre_final[0].err_is_fatal);
    assert_eq!(p.post_final[0].timeout, Duration::from_secs(10));
    assert!(!p.post_final[0].err_is_fatal);
    let e = parse(&format!(
        "{TWO}\n[[pre_final]]\ncommand = \"x\"\ntimeout = \"forever\"\n"
    ))
    .unwrap_err()
    .to_string();
    assert!(
        e.starts_with("dir/move.toml:18: [[pre_final]] timeout"),
        "{e}"
    );
    let e = parse(&format!(
        "{TWO}\n[[pre_final]]\ncommand = \"x\"\nerr_is_fatl = true\n"
    ))
    .unwrap_err()
    .to_string();
    assert_eq!(
        e,
        "dir/move.toml:18: unknown key \"err_is_fatl\" in [[pre_final]] number 1; did you mean \"err_is_fatal\"?"
    );
}

#[test]
fn verify_mode_defaults_to_transferred_and_the_plan_can_set_it() {
    let p = parse(TWO).unwrap();
    assert_eq!(p.verify_mode(&p.tasks[0]), VerifyMode::Transferred);
    let p = parse(&format!("verify_mode = \"full\"\n{TWO}").replace(
        "depends_on = [\"a\"]",
        "depends_on = [\"a\"]\nverify_mode = \"none\"",
    ))
    .unwrap();
    assert_eq!(p.verify_mode(&p.tasks[0]), VerifyMode::Full);
    assert_eq!(p.verify_mode(&p.tasks[1]), VerifyMode::None);
    // Keys a plan does not use leave its fingerprint as it was before they existed.
    // (The fingerprint hashes this canonical JSON.)
    let hooked = format!("{TWO}\n[[on_success]]\ncommand = \"true\"\n");
    let file: PlanFile = toml::from_str(&hooked).unwrap();
    let canonical = serde_json::to_string(&file).unwrap();
    for key in ["verify_mode", "webhook", "rsh", "remote_cutover"] {
        assert!(!canonical.contains(key), "{key} in {canonical}");
    }
    assert!(
        canonical.contains("\"on_success\":[{\"name\":null,\"command\":\"true\",\"timeout\""),
        "{canonical}"
    );
    let w = parse(&format!(
        "{TWO}\n[[on_success]]\nwebhook = \"https://hooks.example/T0/x\"\n"
    ))
    .unwrap();
    assert_eq!(w.on_success[0].name, "webhook to https://hooks.example");
    assert_eq!(
        w.on_success[0].run,
        HookRun::Webhook("https://hooks.example/T0/x".into())
    );
}

#[test]
fn command_tasks_and_bad_names_are_explained() {
    let cmd = TWO.replace(
        "kind = \"tree\"\nsource = \"src/b/\"",
        "kind = \"command\"\ncommand = \"pg_dump app\"",
    );
    let p = parse(&cmd).unwrap();
    assert_eq!(p.tasks[1].command.as_deref(), Some("pg_dump app"));
    assert_eq!(
        p.spool_path(&p.tasks[1]),
        Path::new("dir/move.state/spool/b")
    );
    let e = parse(&TWO.replace(
        "kind = \"tree\"\nsource = \"src/b/\"",
        "kind = \"command\"\nsource = \"src/b/\"",
    ))
    .unwrap_err()
    .to_string();
    assert!(e.contains("command: is missing"), "{e}");
    let e = parse(&cmd.replace(
        "destination = \"/dst/b/\"",
        "destination = \"/dst/b/\"\nexcludes = [\"x\"]",
    ))
    .unwrap_err()
    .to_string();
    assert!(
        e.starts_with("dir/move.toml:14: task \"b\": excludes: does not apply to a command task"),
        "{e}"
    );
    let e = parse(&TWO.replace(
        "source = \"src/a/\"",
        "source = \"src/a/\"\ndestination_command = \"x\"",
    ))
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("destination_command: only applies to kind = \"command\""),
        "{e}"
    );
    let e = parse(&TWO.replace("name = \"b\"", "name = \"../b\""))
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a valid name"), "{e}");
}
