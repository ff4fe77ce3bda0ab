//! arca: backups of virtual-machine disks through sandboxed WASM stages into
//! a content-addressed repository. See ARCHITECTURE.md for the map.

pub mod agent;
pub mod config;
pub mod extent;
pub mod guest;
pub mod pipeline;
pub mod plugin;
pub mod repository;
pub mod restore;
pub mod session;
pub mod source;
pub mod unbuffered;
pub mod verify;
pub mod writeback;
