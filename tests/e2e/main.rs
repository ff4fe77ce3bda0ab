//! End-to-end tests: the real `arca` binary against real files, real
//! processes and real plugins.

mod common;

mod agent;
mod backup_restore;
mod config_errors;
mod crash;
mod damage;
mod formats;
mod guest;
mod guestfs;
mod hostile;
mod netns;
mod proxies;
mod qemu;
mod retention;
mod snapshot;
mod space;
