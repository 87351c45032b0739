//! kml's eBPF object (embedded at build time, or `KML_EBPF_OBJECT`), the values
//! handed to it at load (its globals) and typed access to its maps and programs by
//! their shared names (`kml_ebpf_common::abi::names`).

use std::borrow::Cow;

use anyhow::Context as _;
use aya::{
    maps::{Map, MapError},
    programs::{Program, ProgramError},
    Ebpf, EbpfLoader,
};
use kml_ebpf_common::{abi::names::global, KernelLayout, RawTpLayout};

use crate::{
    devices::BlockDevice,
    kernel::{
        btf::Btf,
        layout::{self, SchedLayout},
    },
};

/// The eBPF object: `KML_EBPF_OBJECT` at run time if set (development), else the
/// one embedded at build time.
pub fn ebpf_object() -> anyhow::Result<Cow<'static, [u8]>> {
    if let Some(path) = std::env::var_os("KML_EBPF_OBJECT") {
        let bytes = std::fs::read(&path).with_context(|| {
            format!(
                "reading eBPF object {} (KML_EBPF_OBJECT)",
                path.to_string_lossy()
            )
        })?;
        return Ok(Cow::Owned(bytes));
    }
    embedded_object()
}

#[cfg(kml_ebpf_embedded)]
fn embedded_object() -> anyhow::Result<Cow<'static, [u8]>> {
    static OBJECT: &[u8] = aya::include_bytes_aligned!(env!("KML_EBPF_OBJECT_PATH"));
    Ok(Cow::Borrowed(OBJECT))
}

#[cfg(not(kml_ebpf_embedded))]
fn embedded_object() -> anyhow::Result<Cow<'static, [u8]>> {
    anyhow::bail!(
        "this kml-agent was built without its eBPF object: build it with `cargo xtask build`"
    )
}

/// An [`EbpfLoader`] that keeps no kernel BTF. aya parses all of
/// /sys/kernel/btf/vmlinux in `EbpfLoader::new` (tens of MB of heap) for CO-RE
/// relocations only, and kml's programs have none (rustc emits none; the test
/// `object_has_no_core_relocations` checks the built object): dropped here, that
/// parse is not held through the load, on top of the object's.
pub fn loader<'a>() -> EbpfLoader<'a> {
    let mut loader = EbpfLoader::new();
    loader.btf(None);
    loader
}

/// Program `name` of the object, as its type `T`.
pub fn program<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut Program, Error = ProgramError>,
{
    let p = ebpf
        .program_mut(name)
        .with_context(|| format!("program {name} missing from the eBPF object"))?;
    p.try_into()
        .with_context(|| format!("program {name} has an unexpected type"))
}

/// Map `name` of the object, as its type `M` (read only).
pub fn map<'a, M>(ebpf: &'a Ebpf, name: &str) -> anyhow::Result<M>
where
    M: TryFrom<&'a Map, Error = MapError>,
{
    let m = ebpf
        .map(name)
        .with_context(|| format!("map {name} missing from the eBPF object"))?;
    M::try_from(m).with_context(|| format!("map {name} has an unexpected type"))
}

/// Map `name` of the object, as its type `M` (writable).
pub fn map_mut<'a, M>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<M>
where
    M: TryFrom<&'a mut Map, Error = MapError>,
{
    let m = ebpf
        .map_mut(name)
        .with_context(|| format!("map {name} missing from the eBPF object"))?;
    M::try_from(m).with_context(|| format!("map {name} has an unexpected type"))
}

/// What the hook program needs at load: the raw layout shared with the observers
/// (`KML_LAYOUT`, mode 0 so that no observer program acts if one were attached),
/// the scheduler layout and the device filter. Pass them to an [`EbpfLoader`] with
/// [`HookGlobals::apply`], so a loader that also sets up observers can host the hook.
#[derive(Clone, Debug)]
pub struct HookGlobals {
    pub layout: KernelLayout,
    pub sched: SchedLayout,
    /// `kernel_dev()` of the only disk that gets verdicts; 0 for every disk.
    pub dev: u32,
}

impl HookGlobals {
    pub fn from_btf(btf: &Btf, device: Option<&BlockDevice>) -> anyhow::Result<HookGlobals> {
        Ok(Self::new(
            layout::raw_tp_layout(btf)?,
            layout::sched_layout(btf)?,
            device,
        ))
    }

    /// From layouts read from BTF already (`KernelReport`).
    pub fn new(raw: RawTpLayout, sched: SchedLayout, device: Option<&BlockDevice>) -> HookGlobals {
        let mut kl = KernelLayout::zeroed();
        kl.raw = raw;
        HookGlobals {
            layout: kl,
            sched,
            dev: device.map_or(0, BlockDevice::dev),
        }
    }

    /// Sets the hook's globals on `loader`. `with_kml_layout` false leaves
    /// `KML_LAYOUT` to a caller that sets it itself (it must fill `raw`).
    pub fn apply<'a>(&'a self, loader: &mut EbpfLoader<'a>, with_kml_layout: bool) {
        if with_kml_layout {
            loader.override_global(global::LAYOUT, &self.layout, true);
        }
        loader
            .override_global(global::HOOK_DEV, &self.dev, true)
            .override_global(global::HOOK_Q_ELEVATOR, &self.sched.q_elevator, true)
            .override_global(global::HOOK_EQ_DATA, &self.sched.eq_data, true)
            .override_global(global::HOOK_DD_PER_PRIO, &self.sched.dd_per_prio, true)
            .override_global(global::HOOK_PER_PRIO_SIZE, &self.sched.per_prio_size, true)
            .override_global(
                global::HOOK_PER_PRIO_COUNT,
                &self.sched.per_prio_count,
                true,
            )
            .override_global(global::HOOK_WRITE_FIFO, &self.sched.write_fifo, true)
            .override_global(global::HOOK_DD_LAST_DIR, &self.sched.last_dir, true)
            .override_global(global::HOOK_DD_WRITE, &self.sched.dd_write, true);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use kml_ebpf_common::abi::names;

    /// The names the agent uses (the shared crate's `abi::names`) are exactly the
    /// maps and programs the built object defines: a renamed map or program on
    /// either side fails here, not at load time on some kernel.
    #[test]
    fn abi_names_match_the_object() {
        let object = match super::ebpf_object() {
            Ok(o) => o,
            Err(e) => {
                // Only a build without `cargo xtask build` lacks it; `cargo xtask
                // test` always has it.
                return kml_testkit::skip(format_args!("no eBPF object ({e:#})"));
            }
        };
        let obj = aya_obj::Object::parse(&object).expect("the eBPF object parses");
        let maps: BTreeSet<&str> = obj
            .maps
            .keys()
            .map(String::as_str)
            // Global data (.rodata, .bss, .data) and aya's own maps are not kml's.
            .filter(|m| !m.starts_with('.'))
            .collect();
        let programs: BTreeSet<&str> = obj.programs.keys().map(String::as_str).collect();
        assert_eq!(maps, names::all_maps().collect::<BTreeSet<_>>(), "maps");
        assert_eq!(
            programs,
            names::all_programs().collect::<BTreeSet<_>>(),
            "programs"
        );
    }

    /// [`super::loader`] gives aya no kernel BTF: right only while the object has
    /// no CO-RE relocations (a C program with `preserve_access_index` would add some).
    #[test]
    fn object_has_no_core_relocations() {
        let object = match super::ebpf_object() {
            Ok(o) => o,
            Err(e) => return kml_testkit::skip(format_args!("no eBPF object ({e:#})")),
        };
        let obj = aya_obj::Object::parse(&object).expect("the eBPF object parses");
        assert!(
            !obj.has_btf_relocations(),
            "the eBPF object has CO-RE relocations: object::loader must give aya the kernel's BTF"
        );
    }

    /// No program calls the memory builtins bpf-linker exports (compiler_builtins'
    /// `memset` and kin: one load or store per byte in a loop). LLVM calls them when
    /// it may not expand an intrinsic into loads and stores, as bpf-linker's default
    /// `--bpf-expand-memcpy-in-order` made it do for every memset: the zeroings
    /// of the request window and of the record's zero fields cost about 115 ns
    /// per insert (docs/benchmarking.md).
    #[test]
    fn programs_call_no_memory_builtins() {
        use object::{Object as _, ObjectSection as _, ObjectSymbol as _, RelocationTarget};

        let bytes = match super::ebpf_object() {
            Ok(o) => o,
            Err(e) => return kml_testkit::skip(format_args!("no eBPF object ({e:#})")),
        };
        let elf = object::File::parse(&*bytes).expect("the eBPF object is an ELF file");
        let mut calls = Vec::new();
        let mut relocations = 0;
        for section in elf.sections() {
            for (offset, reloc) in section.relocations() {
                relocations += 1;
                let RelocationTarget::Symbol(index) = reloc.target() else {
                    continue;
                };
                let Ok(name) = elf.symbol_by_index(index).and_then(|s| s.name()) else {
                    continue;
                };
                if ["memset", "memcpy", "memmove", "memcmp", "bcmp"].contains(&name) {
                    calls.push(format!(
                        "{}+{offset:#x} → {name}",
                        section.name().unwrap_or("?")
                    ));
                }
            }
        }
        // Map and subprogram references are relocations too: an object read wrong
        // would have none.
        assert!(relocations > 0, "no relocation read from the eBPF object");
        assert!(
            calls.is_empty(),
            "programs call memory builtins (build with -Clink-arg=--disable-expand-memcpy-in-order, \
             and zero no large stack buffer): {calls:?}"
        );
    }
}
