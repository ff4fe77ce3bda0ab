//! Guest-filesystem exclusion benchmark (`cargo bench --bench guestfs`): a
//! guest disk with a swap partition, a swap file, deleted data and about 40%
//! free space, backed up with and without the swap and free-space stages.
//! The disk is built by the same code as the end-to-end tests.

#[path = "../../tests/e2e/common.rs"]
#[allow(dead_code)]
mod common;

#[path = "../../tests/e2e/guestfs.rs"]
#[allow(dead_code)]
mod guestfs;

fn main() {
    guestfs::bench();
}
