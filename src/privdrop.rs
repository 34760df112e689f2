//! Dropping privileges: `--user` and `--group`, applied after the listeners
//! are bound (so port 7 can be bound as root) and before the first accept,
//! so the dispatcher and every child run unprivileged.
//!
//! Order matters: supplementary groups first, then the gid, then the uid
//! (after setuid the process could no longer change its groups). A drop
//! that does not stick is an error, not a warning.

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
    setgroups(&[]).map_err(|e| fail("setgroups", e))?;
    setgid(id.gid).map_err(|e| fail("setgid", e))?;
    setuid(id.uid).map_err(|e| fail("setuid", e))?;
    if id.uid.as_raw() != 0 && setuid(Uid::from_raw(0)).is_ok() {
        return Err(Error::new(
            EXIT_NOPERM,
            format!("dropping privileges to {} did not stick", id.name),
        ));
    }
    Ok(())
}
