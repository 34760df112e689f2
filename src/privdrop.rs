//! Dropping privileges: `--user` and `--group`, applied after the listeners
//! are bound (so port 7 can be bound as root) and before the first accept,
//! so the dispatcher and every child run unprivileged.
//!
//! Order matters: the capability bounding set first (emptying it needs
//! CAP_SETPCAP, which root loses at setuid), then supplementary groups, the
//! gid, the uid (after setuid the process could no longer change its
//! groups), and last `PR_SET_NO_NEW_PRIVS`: no execve by forkd or a
//! compromised child can gain privilege again, through a setuid program or
//! file capabilities. A drop that does not stick is an error, not a warning.

use nix::sys::prctl::set_no_new_privs;
use nix::unistd::{Gid, Group, Uid, User, setgid, setgroups, setuid};

use crate::error::{EXIT_NOPERM, EXIT_NOUSER, Error};

/// The identity to switch to, resolved at start so a typo fails early.
#[derive(Debug, Clone)]
pub struct Identity {
    pub name: String,
    pub uid: Uid,
    pub gid: Gid,
}

/// Look the user (and optional group) up in the system databases.
pub fn resolve(user: &str, group: Option<&str>) -> Result<Identity, Error> {
    let found = User::from_name(user)
        .map_err(|e| Error::os(format!("cannot look up user {user}"), e))?
        .ok_or_else(|| Error::new(EXIT_NOUSER, format!("no such user: {user}")))?;
    let gid = match group {
        None => found.gid,
        Some(g) => {
            Group::from_name(g)
                .map_err(|e| Error::os(format!("cannot look up group {g}"), e))?
                .ok_or_else(|| Error::new(EXIT_NOUSER, format!("no such group: {g}")))?
                .gid
        }
    };
    Ok(Identity {
        name: user.to_string(),
        uid: found.uid,
        gid,
    })
}

/// Become `id`: no supplementary groups, then the gid, then the uid.
pub fn drop_to(id: &Identity) -> Result<(), Error> {
    let fail = |step: &str, e: nix::Error| {
        let mut err = Error::os(format!("cannot drop privileges to {} ({step})", id.name), e);
        err.code = EXIT_NOPERM;
        err
    };
    clear_bounding_set().map_err(|e| fail("clearing the capability bounding set", e))?;
    setgroups(&[]).map_err(|e| fail("setgroups", e))?;
    setgid(id.gid).map_err(|e| fail("setgid", e))?;
    setuid(id.uid).map_err(|e| fail("setuid", e))?;
    if id.uid.as_raw() != 0 && setuid(Uid::from_raw(0)).is_ok() {
        return Err(Error::new(
            EXIT_NOPERM,
            format!("dropping privileges to {} did not stick", id.name),
        ));
    }
    // setuid away from root empties the permitted, effective and ambient
    // sets, but not the inheritable one.
    if id.uid.as_raw() != 0 {
        drop_capabilities()?;
    }
    set_no_new_privs().map_err(|e| fail("PR_SET_NO_NEW_PRIVS", e))
}

/// Empty the capability bounding set, so that no execve can give the
/// process a capability again (a file capability, a setuid-root program).
/// Each capability up to the kernel's last is dropped unless already out;
/// dropping needs CAP_SETPCAP (EPERM without it).
fn clear_bounding_set() -> nix::Result<()> {
    for cap in 0..=last_capability() {
        // SAFETY: prctl(PR_CAPBSET_READ/DROP, cap) takes no pointers.
        let present = unsafe { libc::prctl(libc::PR_CAPBSET_READ, cap, 0, 0, 0) };
        if present < 0 {
            // EINVAL: past the kernel's last capability.
            break;
        }
        // SAFETY: as above.
        if present == 1 && unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } != 0 {
            return Err(nix::errno::Errno::last());
        }
    }
    Ok(())
}

/// The kernel's highest capability number (/proc/sys/kernel/cap_last_cap);
/// 63 when unreadable, where [`clear_bounding_set`] stops at the first EINVAL.
fn last_capability() -> libc::c_ulong {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(63)
}

/// Give up every capability the process holds (permitted, effective,
/// inheritable, ambient), once the listeners are bound: an unprivileged
/// forkd started with CAP_NET_BIND_SERVICE (as `forkd-standalone.service`
/// does) needs it for `bind` and for nothing after, and children would
/// otherwise inherit it. Root keeps its identity unless `--user` is given,
/// which drops everything anyway.
///
/// A process that holds no capability has nothing to drop, and makes no
/// call that changes capabilities: `forkd.service` forbids `capset` (it is
/// in `@privileged`), and its forkd holds none. `capget` is allowed there.
pub fn drop_capabilities() -> Result<(), Error> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    let fail = |what: &str| {
        Error::new(
            EXIT_NOPERM,
            format!(
                "cannot drop capabilities ({what}): {}",
                crate::error::describe(&std::io::Error::last_os_error())
            ),
        )
    };
    let mut header = Header {
        version: VERSION_3,
        pid: 0,
    };
    let mut held = [Data::default(); 2];
    // SAFETY: capget(2) reads a version-3 header and writes two data
    // structs, all on this stack frame for the duration of the call.
    let r = unsafe { libc::syscall(libc::SYS_capget, &raw mut header, held.as_mut_ptr()) };
    let none = |d: &Data| d.effective == 0 && d.permitted == 0 && d.inheritable == 0;
    // The ambient set is a subset of the permitted one: empty too.
    if r == 0 && held.iter().all(none) {
        return Ok(());
    }
    // SAFETY: prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL) takes no pointers.
    let r = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
    if r != 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL) {
        return Err(fail("ambient"));
    }
    header.version = VERSION_3;
    let data = [Data::default(); 2];
    // SAFETY: capset(2) reads a version-3 header and two data structs, which
    // live on this stack frame for the duration of the call.
    let r = unsafe { libc::syscall(libc::SYS_capset, &raw mut header, data.as_ptr()) };
    if r != 0 {
        return Err(fail("capset"));
    }
    Ok(())
}
