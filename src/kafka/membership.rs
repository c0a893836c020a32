//! Static group membership: the group instance id a process claims on its host (`KAFKA_GROUP_INSTANCE_ID=auto`),
//! and the host name ids are made from. Knows nothing of the consumer.

/// A claimed static-membership slot of this host: the lowest `n` whose lock file
/// (`<temp dir>/event-processor-<group>.slot-<n>.lock`) no running process of the group holds. The lock is the
/// operating system's (released when the process ends, however it ends), so a process restarted after a crash
/// gets the slot, and the member id, it had, while processes running side by side get their own.
pub(crate) struct InstanceSlot {
    id: String,
    _lock: std::fs::File,
}

/// Slots tried on one host before giving up on static membership.
const MAX_SLOTS: usize = 256;

impl InstanceSlot {
    pub(crate) fn claim(group: &str) -> std::io::Result<InstanceSlot> {
        let safe: String = group
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let dir = std::env::temp_dir();
        for n in 0..MAX_SLOTS {
            let path = dir.join(format!("event-processor-{safe}.slot-{n}.lock"));
            let file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)?;
            match file.try_lock() {
                Ok(()) => {
                    return Ok(InstanceSlot {
                        id: format!("event-processor-{}-{n}", hostname()),
                        _lock: file,
                    });
                }
                Err(std::fs::TryLockError::WouldBlock) => continue,
                Err(std::fs::TryLockError::Error(e)) => return Err(e),
            }
        }
        Err(std::io::Error::other(format!(
            "all {MAX_SLOTS} slots of {} are taken",
            dir.display()
        )))
    }

    pub(crate) fn id(&self) -> &str {
        &self.id
    }
}

pub fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn processes_side_by_side_get_their_own_slot_and_a_restart_gets_the_freed_one() {
        let group = format!("slot-test-{}", std::process::id());
        let a = InstanceSlot::claim(&group).unwrap();
        let b = InstanceSlot::claim(&group).unwrap();
        assert_ne!(a.id(), b.id());
        assert!(
            a.id().ends_with("-0") && b.id().ends_with("-1"),
            "{} {}",
            a.id(),
            b.id()
        );
        let first = a.id().to_string();
        drop(a);
        let again = InstanceSlot::claim(&group).unwrap();
        assert_eq!(again.id(), first, "the slot of the process that ended");
    }
}
