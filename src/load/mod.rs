//! forkd-load: the load generator behind the `forkd-load` binary.
