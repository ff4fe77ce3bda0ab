//! Host bindings generated from `wit/pipeline.wit`, one module per world.

pub mod exclusion {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "arca:pipeline/exclusion",
        with: { "arca:pipeline/disk.disk-reader": crate::plugin::exclude::DiskReaderHandle },
        imports: { default: trappable },
    });
}

pub mod change_detection {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "arca:pipeline/change-detection",
    });
}

pub mod compression {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "arca:pipeline/compression",
    });
}

pub mod guest_hook {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "arca:pipeline/guest-hook",
        imports: { default: trappable },
    });
}
