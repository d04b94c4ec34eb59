//! The keys of a `replica` task (a replicated volume cut over to its peer) and the keys it
//! does not take; the keys only it takes, refused elsewhere.

use super::*;

/// Keys a `replica` task never reads: the sync's options and the command task's.
const NOT_FOR_REPLICA: &[&str] = &[
    "command",
    "spool",
    "destination_command",
    "verify",
    "paths_from",
    "bwlimit",
    "connections",
    "checksum",
    "whole_file",
    "xattrs",
    "compress",
    "fsync",
    "token_file",
    "server_fingerprint",
    "rsh",
];

impl Plan {
    /// A `replica` task's keys, or, for any other task, that it uses none of them.
    pub(super) fn validate_replica(&self, i: usize, t: &TaskSpec) -> Result<(), PlanError> {
        if t.kind != Kind::Replica {
            for (key, set) in [
                ("destination_config", t.destination_config.is_some()),
                ("source_ssh", t.source_ssh.is_some()),
                ("destination_ssh", t.destination_ssh.is_some()),
                ("ssh_command", t.ssh_command.is_some()),
            ] {
                if set {
                    return Err(self.task_key(
                        i,
                        key,
                        format!(
                            "only applies to kind = \"replica\"; remove it from this {} task",
                            t.kind.as_str()
                        ),
                    ));
                }
            }
            if t.verify_mode == Some(VerifyMode::Blocks) {
                return Err(self.task_key(
                    i,
                    "verify_mode",
                    format!("\"blocks\" only applies to kind = \"replica\"; for a {} task use \"transferred\", \"full\" or \"none\"", t.kind.as_str()),
                ));
            }
            return Ok(());
        }
        let spec = serde_json::to_value(t).unwrap_or_default();
        for key in NOT_FOR_REPLICA {
            let set = match spec.get(*key) {
                None | Some(serde_json::Value::Null) | Some(serde_json::Value::Bool(false)) => {
                    false
                }
                Some(_) => true,
            };
            if set {
                return Err(self.task_key(
                    i,
                    key,
                    "does not apply to a replica task (the volume's link moves the data); remove it"
                        .into(),
                ));
            }
        }
        let name = t.source.as_deref().and_then(|s| s.strip_prefix("volume:"));
        if name.is_none_or(|n| n.is_empty() || n.contains('/')) {
            return Err(self.task_key(
                i,
                "source",
                "a replica task's source is the volume on its current primary: source = \"volume:NAME\""
                    .into(),
            ));
        }
        let d = t.destination.trim();
        if d.is_empty() || d.contains(['/', ':', ' ']) {
            return Err(self.task_key(
                i,
                "destination",
                format!("{:?}: a replica task's destination is the name of the peer that takes over, as in the source volume's [[volume.peer]] name", t.destination),
            ));
        }
        if t.verify_mode == Some(VerifyMode::Transferred) {
            return Err(self.task_key(
                i,
                "verify_mode",
                "\"transferred\" does not apply to a replica task; use \"blocks\" (the blocks written since presync began), \"full\" or \"none\"".into(),
            ));
        }
        for (key, v) in [
            ("destination_config", &t.destination_config),
            ("source_ssh", &t.source_ssh),
            ("destination_ssh", &t.destination_ssh),
            ("ssh_command", &t.ssh_command),
        ] {
            if v.as_deref().is_some_and(|v| v.trim().is_empty()) {
                return Err(self.task_key(i, key, "is empty: remove it or give it a value".into()));
            }
        }
        if t.ssh_command.is_some() && t.source_ssh.is_none() && t.destination_ssh.is_none() {
            return Err(self.task_key(
                i,
                "ssh_command",
                "applies only with source_ssh or destination_ssh; remove it".into(),
            ));
        }
        if t.remote_cutover.is_some() && t.source_ssh.is_none() && t.destination_ssh.is_none() {
            return Err(self.task_key(
                i,
                "remote_cutover",
                "applies only with source_ssh or destination_ssh; remove it".into(),
            ));
        }
        Ok(())
    }
}
