//! Application-aware guest processing (seed step 7): the guest agent client
//! and the channel that guest-hook plugins use through their WIT imports.

pub mod agent;
pub mod channel;
pub mod guard;

pub use agent::{Agent, AgentError, ExecOutput};
pub use channel::{ExecRecord, GuestChannel, GuestPolicy};
