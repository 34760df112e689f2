//! A connection process's exit code: what each one means. The child picks
//! its code from how its echo ended ([`for_end`]); the dispatcher reads the
//! code back from `waitpid` ([`describe`], [`is_normal`]). Both sides use
//! this one table.

use crate::echo::End;

/// The child panicked (the message is on stderr).
pub const PANIC: i32 = 4;

/// The exit code of a child whose connection ended so.
pub fn for_end(end: End) -> i32 {
    match end {
        End::Closed => 0,
        End::Error(_) => 1,
        End::Reset => 2,
        End::IdleTimeout => 3,
        End::Silent => 5,
    }
}

/// What a child's exit code says about how its connection ended.
pub fn describe(code: i32) -> &'static str {
    match code {
        0 => "closed by client",
        1 => "socket error",
        2 => "reset by client",
        3 => "idle timeout",
        PANIC => "panicked",
        5 => "sent nothing (first-byte timeout)",
        _ => "unexpected exit",
    }
}

/// Is this an ordinary end (logged at info), rather than trouble (warning)?
pub fn is_normal(code: i32) -> bool {
    matches!(code, 0 | 2 | 3 | 5)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_end_has_its_own_code_and_meaning() {
        for end in [
            End::Closed,
            End::Error(5),
            End::Reset,
            End::IdleTimeout,
            End::Silent,
        ] {
            let code = for_end(end);
            assert_eq!(describe(code), end.describe());
            assert_eq!(is_normal(code), end.is_normal());
        }
        assert_eq!(describe(PANIC), "panicked");
    }
}
