//! What the running kernel offers, probed at run time, never assumed.

pub mod attach;
pub mod btf;
pub mod caps;
pub mod clock;
pub mod layout;
pub mod mounts;
pub mod tracefs;
