//! Embeds the eBPF object built by `cargo xtask build` (path in `KML_EBPF_OBJECT`,
//! else the workspace's default output). Without one the agent still builds (host
//! unit tests, clippy) and says at run time how to get the object.
use std::{env, path::PathBuf};

fn main() {
    println!("cargo:rustc-check-cfg=cfg(kml_ebpf_embedded)");
    println!("cargo:rerun-if-env-changed=KML_EBPF_OBJECT");
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let default = manifest.join("../target/ebpf/bpfel-unknown-none/release/kml");
    let object = env::var_os("KML_EBPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or(default);
    println!("cargo:rerun-if-changed={}", object.display());
    if object.is_file() {
        let object = object.canonicalize().expect("object path resolves");
        println!("cargo:rustc-env=KML_EBPF_OBJECT_PATH={}", object.display());
        println!("cargo:rustc-cfg=kml_ebpf_embedded");
    } else {
        println!(
            "cargo:warning=eBPF object {} not found: this kml-agent cannot load probes (build with `cargo xtask build`)",
            object.display()
        );
    }
}
