//! `cargo xtask vm`: build the patched guest kernel (cached), an initramfs with
//! kml-agent and fio, boot it under QEMU (KVM when a probe boot works, TCG
//! otherwise) with a throttled, depth-1 virtio disk, and run either
//!
//! - `--smoke`: the constructed case: a random reader against a deep random writer,
//!   once stock and once with `kml-agent hook --policy reads`; passes when the hook
//!   attached, the kernel served requests early (`kml_boosts`), and the block
//!   tracepoints show reads dispatched ahead of queued writes that stock
//!   mq-deadline dispatched first; the same through fmod_ret; then through the
//!   model (`run --act model-reads`) with a hand-set model that flags every request
//!   (boosts, order changed) and one that flags none (no boost); or
//! - the comparison (default): each job file of `workloads/vm/` (but `smoke.fio`)
//!   in rounds: stock, and each `--policy` through `kml-agent hook --policy <policy>`
//!   (fixed policies) or `kml-agent run --model <model> --act <policy>` (`model`,
//!   `model-reads`: the learned verdicts act), once per round, same seeds, the order
//!   rotating from round to round; `kml-agent record` witnesses every run (each
//!   request's own deadline, per class). The report goes to `target/vm/report.md`
//!   (changes from stock with the spread between rounds, deadline misses per class,
//!   the learned verdict against the fixed rule) and the last line sums it up for the
//!   learned verdict (else the last policy).
//!
//! The guest prints `KML-VM-RESULT: PASS|FAIL <reason>` and powers off; the exit
//! status follows that line (and, for the smoke test, the host's checks of the
//! dispatch order). A guest that hangs is killed at the timeout and reported.
//! Exit status 77 means the kernel cannot be built on this machine (its Debian
//! packages cannot be installed): a skip, said so on stderr.

mod full;
mod initramfs;
mod kernel;
mod qemu;
mod report;
mod smoke;

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use clap::Args;

use crate::build::build_all;
use crate::setup::ensure_packages;
use crate::util::workspace_root;
use full::full_report;
use qemu::{Accel, Boot};
use report::RunStats;
use smoke::smoke_report;

/// Debian packages the VM needs: the kernel source and its build tools, pahole
/// (BTF), busybox (static) for the guest, QEMU, fio.
pub const VM_PACKAGES: &[&str] = &[
    kernel::SOURCE_PACKAGE,
    "dwarves",
    "busybox-static",
    "bc",
    "flex",
    "bison",
    "libelf-dev",
    "libssl-dev",
    "make",
    "gcc",
    "patch",
    "xz-utils",
    "gzip",
    "binutils",
    "qemu-system-x86",
    "fio",
];

/// Exit status when the guest kernel cannot be built here (its Debian packages
/// cannot be installed): tests report a skip, with the reason, instead of a failure.
pub const SKIP_STATUS: u8 = 77;

/// Size of the guest's virtio disk image.
const DISK_BYTES: u64 = 1 << 30;

/// The verdict hook's policy, as kml-agent names it (`hook --policy`, `run --act`).
pub use kml_ebpf_common::abi::hook::Policy;

#[derive(Debug, Args)]
pub struct VmArgs {
    /// Only the smoke test: boot, attach the hook, check that verdicts change the
    /// dispatch order of a constructed case, power off.
    #[arg(long)]
    pub smoke: bool,
    /// QEMU accelerator: auto tries KVM with a quick probe boot, else TCG.
    #[arg(long, value_enum, default_value_t = Accel::Auto)]
    pub accel: Accel,
    /// The hook's policies compared with stock, comma-separated (fixed policies
    /// through `kml-agent hook`; the model policies through `kml-agent run --model
    /// MODEL --act POLICY`), e.g. `reads-under-writes,model-reads`: the learned
    /// verdict and the fixed rule on the same rounds.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "reads-under-writes"
    )]
    pub policy: Vec<Policy>,
    /// The model of the model policies: a file name in `models/` without `.json`,
    /// or `none` with `--online` (the agent learns its first model while it runs).
    #[arg(long, default_value = "logistic")]
    pub model: String,
    /// The model policies learn online (`run --retrain-every 10s
    /// --min-train-records 2000`: at 100 IOPS the default 20,000 records take
    /// 200 s) instead of keeping the model they start from; the hook holds 1 in
    /// 16 flagged requests out to learn from. Give it `--runtime 120` or more.
    #[arg(long)]
    pub online: bool,
    /// With --online: the hook leaves one in N of the requests a model policy
    /// would serve early alone, to learn from (`run --hold-out`; default 16).
    #[arg(long, value_name = "N", requires = "online")]
    pub hold_out: Option<u32>,
    /// fio run time per run, in seconds (each workload runs once per arm and round).
    #[arg(long, default_value_t = 30)]
    pub runtime: u32,
    /// Rounds per workload: stock and each policy once, the order rotating from
    /// round to round (the report combines them and gives each round's changes).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=20))]
    pub repeat: u32,
    /// fio's random seed for every job (the job files read `$KML_SEED`): record
    /// training traces with one seed, compare with another.
    #[arg(long, default_value_t = 1234)]
    pub seed: u32,
    /// QEMU drive throttling of the virtio disk (throttling.iops-total).
    #[arg(long, default_value_t = 100)]
    pub iops: u32,
    /// Set mq-deadline's kml_boost_max (cap of boosts per direction per read_expire
    /// window) in the guest; default: the kernel's (16).
    #[arg(long)]
    pub boost_max: Option<u32>,
    /// Set mq-deadline's read_expire (ms) in the guest, for every run (stock too):
    /// the reads' deadline, which is what kml's models predict a miss of, and the
    /// window of the boost cap; default: the kernel's (500 ms).
    #[arg(long)]
    pub read_expire: Option<u32>,
    /// Only these workloads (job file names without .fio; comma-separated or repeated).
    #[arg(long, value_delimiter = ',')]
    pub workload: Vec<String>,
    /// Kill the guest after this many seconds (default: from the plan).
    #[arg(long)]
    pub timeout: Option<u64>,
    /// Build the kernel and the initramfs, do not boot.
    #[arg(long)]
    pub build_only: bool,
    /// Do not boot: render the report again from what the last run left in
    /// target/vm/out-smoke or out-full (say, after the guest was stopped midway:
    /// incomplete stock/hook pairs are left out and listed).
    #[arg(long, conflicts_with = "build_only")]
    pub report_only: bool,
    /// Do not echo the guest console (it is always logged to target/vm/).
    #[arg(long)]
    pub quiet: bool,
}

fn nproc() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

/// The job files of the comparison (all but smoke.fio), filtered.
fn comparison_workloads(dir: &Path, only: &[String]) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for e in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let p = e?.path();
        if p.extension().is_some_and(|x| x == "fio") {
            let name = p.file_stem().unwrap().to_string_lossy().into_owned();
            if name != "smoke" && (only.is_empty() || only.contains(&name)) {
                names.push(name);
            }
        }
    }
    names.sort();
    for o in only {
        anyhow::ensure!(
            names.contains(o),
            "no workload {o} in {} (have: {})",
            dir.display(),
            names.join(", ")
        );
    }
    anyhow::ensure!(!names.is_empty(), "no workloads in {}", dir.display());
    Ok(names)
}

/// An exclusive lock on `dir/.lock`, held while the returned file lives: two
/// `cargo xtask vm` runs would share the disk image, the initramfs and the share
/// directory (or the kernel tree), and spoil each other.
pub fn lock_dir(dir: &Path, what: &str) -> Result<fs::File> {
    fs::create_dir_all(dir)?;
    let path = dir.join(".lock");
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(fs::TryLockError::WouldBlock) => anyhow::bail!(
            "another `cargo xtask vm` is using {what} ({} is locked): wait for it to finish",
            path.display()
        ),
        Err(fs::TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("locking {}", path.display()))
        }
    }
}

fn create_disk(path: &Path) -> Result<()> {
    if path.exists() {
        fs::remove_file(path)?;
    }
    // Allocated, not sparse: the first run must not pay for block allocation
    // on the host that the second one does not.
    let ok = Command::new("fallocate")
        .arg("-l")
        .arg(DISK_BYTES.to_string())
        .arg(path)
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        fs::File::create(path)?.set_len(DISK_BYTES)?;
    }
    Ok(())
}

impl VmArgs {
    pub fn execute(self) -> Result<ExitCode> {
        let started = Instant::now();
        let root = workspace_root();
        let mode = if self.smoke { "smoke" } else { "full" };
        let vm_dir = root.join("target/vm");
        let _vm_lock = lock_dir(&vm_dir, "target/vm")?;
        if self.report_only {
            let ctx = RunContext::load(&vm_dir.join(format!("out-{mode}")))?;
            eprintln!(
                "xtask: vm: rendering the report again from {}",
                ctx.share.display()
            );
            return if self.smoke {
                smoke_report(&ctx, &vm_dir.join("smoke.md"))
            } else {
                full_report(&ctx, &vm_dir.join("report.md"))
            };
        }
        let Some((kernel, initrd)) = build_guest(&root, &vm_dir)? else {
            return Ok(ExitCode::from(SKIP_STATUS));
        };
        let workloads_dir = root.join(initramfs::WORKLOADS_DIR);
        if self.build_only {
            return Ok(ExitCode::SUCCESS);
        }

        let probe = Boot {
            accel: Accel::Kvm,
            kernel: kernel.bzimage.clone(),
            initrd: initrd.clone(),
            append: "kml.mode=probe".into(),
            disk: None,
            share: None,
            timeout: Duration::from_secs(20),
            console_log: vm_dir.join("console-kvm-probe.log"),
            echo: false,
        };
        let (accel, why) = qemu::choose_accel(self.accel, &probe)?;
        eprintln!("xtask: vm: accelerator {why}");

        let workloads = if self.smoke {
            Vec::new()
        } else {
            comparison_workloads(&workloads_dir, &self.workload)?
        };
        let share = vm_dir.join(format!("out-{mode}"));
        if share.exists() {
            fs::remove_dir_all(&share)?;
        }
        fs::create_dir_all(&share)?;
        let disk = vm_dir.join("disk.img");
        create_disk(&disk)?;

        let append = self.kernel_command_line(&root, mode, &workloads)?;
        let timeout = self.boot_timeout(workloads.len());
        let boot = Boot {
            accel,
            kernel: kernel.bzimage.clone(),
            initrd,
            append,
            disk: Some((disk.clone(), self.iops)),
            share: Some(share.clone()),
            timeout,
            console_log: vm_dir.join(format!("console-{mode}.log")),
            echo: !self.quiet,
        };
        eprintln!(
            "xtask: vm: booting ({accel}, {} run, timeout {} s; console log {})",
            mode,
            timeout.as_secs(),
            boot.console_log.display()
        );
        let mut ctx = self.run_context(&kernel, why, workloads, &share);
        ctx.save()?;
        let outcome = qemu::boot(&boot)?;
        let _ = fs::remove_file(&disk);
        eprintln!("xtask: vm: {}", outcome.describe());
        ctx.boot_secs = outcome.boot_secs;
        ctx.guest_secs = outcome.elapsed.as_secs_f64();
        ctx.total_secs = started.elapsed().as_secs_f64();
        ctx.save()?;
        if !outcome.passed() {
            eprintln!("xtask: vm: FAILED: {}", outcome.describe());
            return Ok(ExitCode::FAILURE);
        }
        if self.smoke {
            smoke_report(&ctx, &vm_dir.join("smoke.md"))
        } else {
            full_report(&ctx, &vm_dir.join("report.md"))
        }
    }

    /// The guest's kernel command line: what the guest script runs (`kml.*`).
    fn kernel_command_line(&self, root: &Path, mode: &str, workloads: &[String]) -> Result<String> {
        let mut append = format!(
            "virtio_blk.queue_depth=1 kml.mode={mode} kml.policy={} kml.runtime={} kml.repeat={} kml.seed={}",
            self.policy_list(),
            self.runtime,
            self.repeat,
            self.seed
        );
        if let Some(b) = self.boost_max {
            let _ = write!(append, " kml.boost_max={b}");
        }
        if self.online {
            append.push_str(" kml.online=1");
        }
        if let Some(n) = self.hold_out {
            let _ = write!(append, " kml.hold_out={n}");
        }
        if let Some(ms) = self.read_expire {
            let _ = write!(append, " kml.read_expire={ms}");
        }
        if self.policy.iter().any(|p| p.uses_model()) {
            let file = root
                .join(initramfs::MODELS_DIR)
                .join(format!("{}.json", self.model));
            // `none`: the agent learns its first model from what it observes.
            anyhow::ensure!(
                file.is_file() || (self.model == "none" && self.online),
                "--model {}: no {} (the guest has the files of models/; `none` needs --online)",
                self.model,
                file.display()
            );
            let _ = write!(append, " kml.model={}", self.model);
        }
        if !self.workload.is_empty() {
            let _ = write!(append, " kml.workloads={}", workloads.join(","));
        }
        Ok(append)
    }

    /// `--policy` as the guest reads it.
    fn policy_list(&self) -> String {
        self.policy
            .iter()
            .map(|p| p.name())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// `--timeout`, else long enough for the runs asked for.
    fn boot_timeout(&self, workloads: usize) -> Duration {
        let default_timeout = if self.smoke {
            420
        } else {
            // One run per arm, workload and round (+ ramp, fio and agent start-up), boot
            // and slack.
            let arms = 1 + self.policy.len() as u64;
            180 + workloads as u64
                * arms
                * u64::from(self.repeat)
                * (u64::from(self.runtime) + 2 + 45)
        };
        Duration::from_secs(self.timeout.unwrap_or(default_timeout))
    }

    /// What this run is, for its report (and `--report-only`).
    fn run_context(
        &self,
        kernel: &kernel::Kernel,
        accel_note: String,
        workloads: Vec<String>,
        share: &Path,
    ) -> RunContext {
        RunContext {
            kernel_line: format!(
                "Linux {} (Debian linux-source-6.12 {}) + kernel/0001-mq-deadline-kml-hook.patch, key {}",
                kernel.version, kernel.package_version, kernel.key
            ),
            build_secs: kernel.build_secs,
            accel_note,
            iops: self.iops,
            runtime: self.runtime,
            repeat: self.repeat,
            policies: self.policy.iter().map(|p| p.name().to_owned()).collect(),
            model: self
                .policy
                .iter()
                .any(|p| p.uses_model())
                .then(|| {
                    let online = match (self.online, self.hold_out) {
                        (false, _) => String::new(),
                        (true, None) => ", online".to_owned(),
                        (true, Some(n)) => format!(", online, hold-out 1 in {n}"),
                    };
                    format!("{}{online}", self.model)
                }),
            seed: self.seed,
            workloads,
            share: share.to_owned(),
            boot_secs: None,
            guest_secs: 0.0,
            total_secs: 0.0,
        }
    }
}

/// The patched guest kernel (built once, cached) and an initramfs with the release
/// agent, the workloads and the models; `None` when this machine cannot build the
/// kernel (its Debian packages cannot be installed: a skip, not a failure).
fn build_guest(root: &Path, vm_dir: &Path) -> Result<Option<(kernel::Kernel, PathBuf)>> {
    eprintln!("xtask: vm: checking the Debian packages the VM needs");
    if let Err(e) = ensure_packages(VM_PACKAGES) {
        // Not a failure of kml: this machine cannot build the guest kernel.
        eprintln!("xtask: vm: SKIP: the guest kernel cannot be built on this machine: {e:#}");
        return Ok(None);
    }
    let kernel = {
        let cache = kernel::cache_dir()?;
        let _cache_lock = lock_dir(&cache, "the kernel cache")?;
        kernel::ensure(root, nproc())?
    };
    let agent = build_all(true)?;
    let t = Instant::now();
    let (initrd, _) = initramfs::build(&initramfs::Inputs {
        gen_init_cpio: &kernel.gen_init_cpio(),
        agent: &agent,
        workloads: &root.join(initramfs::WORKLOADS_DIR),
        models: &root.join(initramfs::MODELS_DIR),
        work: &vm_dir.join("initramfs"),
        out: &vm_dir.join("initramfs.cpio.gz"),
        compress: true,
    })?;
    let initramfs_secs = t.elapsed().as_secs_f64();
    eprintln!(
        "xtask: vm: kernel Linux {} (Debian {}), {}; initramfs built in {initramfs_secs:.1} s",
        kernel.version,
        kernel.package_version,
        kernel.bzimage.display()
    );
    Ok(Some((kernel, initrd)))
}

/// What a run was, kept in the share as `host.txt` (so `--report-only` can
/// render the report again).
#[derive(Debug, Clone, PartialEq)]
struct RunContext {
    kernel_line: String,
    build_secs: Option<f64>,
    accel_note: String,
    iops: u32,
    runtime: u32,
    repeat: u32,
    /// The policies compared with stock, by name.
    policies: Vec<String>,
    /// The model of the model policies (`NAME` or `NAME, online`).
    model: Option<String>,
    seed: u32,
    workloads: Vec<String>,
    share: PathBuf,
    boot_secs: Option<f64>,
    guest_secs: f64,
    total_secs: f64,
}

const HOST_FILE: &str = "host.txt";

impl RunContext {
    fn to_text(&self) -> String {
        let opt = |v: Option<f64>| v.map_or(String::new(), |x| format!("{x:.1}"));
        format!(
            "kernel={}\nbuild_secs={}\naccel={}\niops={}\nruntime={}\nrepeat={}\npolicies={}\nmodel={}\n\
             seed={}\nworkloads={}\nboot_secs={}\nguest_secs={:.1}\ntotal_secs={:.1}\n",
            self.kernel_line,
            opt(self.build_secs),
            self.accel_note,
            self.iops,
            self.runtime,
            self.repeat,
            self.policies.join(","),
            self.model.as_deref().unwrap_or(""),
            self.seed,
            self.workloads.join(","),
            opt(self.boot_secs),
            self.guest_secs,
            self.total_secs
        )
    }

    fn from_text(text: &str, share: &Path) -> Result<RunContext> {
        let map: std::collections::HashMap<&str, &str> =
            text.lines().filter_map(|l| l.split_once('=')).collect();
        let get = |k: &str| {
            map.get(k)
                .copied()
                .with_context(|| format!("{HOST_FILE}: no `{k}`"))
        };
        let num = |k: &str| -> Result<u32> {
            get(k)?
                .parse()
                .with_context(|| format!("{HOST_FILE}: `{k}`"))
        };
        let float = |k: &str| get(k).ok().and_then(|v| v.parse::<f64>().ok());
        Ok(RunContext {
            kernel_line: get("kernel")?.to_owned(),
            build_secs: float("build_secs"),
            accel_note: get("accel")?.to_owned(),
            iops: num("iops")?,
            runtime: num("runtime")?,
            repeat: num("repeat")?,
            policies: get("policies")?
                .split(',')
                .filter(|p| !p.is_empty())
                .map(String::from)
                .collect(),
            model: get("model")
                .ok()
                .filter(|m| !m.is_empty())
                .map(String::from),
            seed: num("seed")?,
            workloads: get("workloads")?
                .split(',')
                .filter(|w| !w.is_empty())
                .map(String::from)
                .collect(),
            share: share.to_path_buf(),
            boot_secs: float("boot_secs"),
            guest_secs: float("guest_secs").unwrap_or(0.0),
            total_secs: float("total_secs").unwrap_or(0.0),
        })
    }

    fn save(&self) -> Result<()> {
        fs::write(self.share.join(HOST_FILE), self.to_text())
            .with_context(|| format!("writing {}", self.share.join(HOST_FILE).display()))
    }

    fn load(share: &Path) -> Result<RunContext> {
        let text = fs::read_to_string(share.join(HOST_FILE)).with_context(|| {
            format!(
                "reading {} (no earlier run?)",
                share.join(HOST_FILE).display()
            )
        })?;
        RunContext::from_text(&text, share)
    }

    fn read(&self, name: &str) -> Result<String> {
        let p = self.share.join(name);
        fs::read_to_string(&p)
            .with_context(|| format!("reading {} (written by the guest)", p.display()))
    }

    fn fio(&self, name: &str) -> Result<RunStats> {
        report::parse_fio(&self.read(&format!("{name}.json"))?)
            .with_context(|| format!("{name}.json"))
    }

    fn header(&self, title: &str) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "# {title}\n");
        let _ = writeln!(s, "- kernel: {}", self.kernel_line);
        let _ = writeln!(s, "- accelerator: {}", self.accel_note);
        let _ = writeln!(
            s,
            "- disk: virtio-blk, raw image, QEMU throttling.iops-total={}, virtio_blk.queue_depth=1, mq-deadline, nr_requests 64",
            self.iops
        );
        let _ = writeln!(
            s,
            "- timings: guest {:.0} s (boot to /init {}), whole command {:.0} s{}",
            self.guest_secs,
            self.boot_secs.map_or("?".into(), |b| format!("{b:.1} s")),
            self.total_secs,
            self.build_secs
                .map_or(String::new(), |b| format!(" (kernel build {b:.0} s)"))
        );
        if let Ok(settings) = self.read("settings.txt") {
            let _ = writeln!(s, "\nGuest settings:\n\n```\n{}\n```\n", settings.trim());
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_run_is_refused() {
        let dir = std::env::temp_dir().join(format!("kml-vm-lock-test-{}", std::process::id()));
        let first = lock_dir(&dir, "the test dir").unwrap();
        let err = lock_dir(&dir, "the test dir").unwrap_err().to_string();
        assert!(
            err.contains("another `cargo xtask vm` is using the test dir"),
            "{err}"
        );
        drop(first);
        drop(lock_dir(&dir, "the test dir").unwrap());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn run_context_round_trip() {
        let ctx = RunContext {
            kernel_line:
                "Linux 6.12.117 (Debian linux-source-6.12 6.12.117-1~deb12u1) + patch, key 0123"
                    .into(),
            build_secs: None,
            accel_note: "TCG: no /dev/kvm".into(),
            iops: 100,
            runtime: 30,
            repeat: 2,
            policies: vec!["reads-under-writes".into(), "model-reads".into()],
            model: Some("vm-position, online".into()),
            seed: 7,
            workloads: vec!["a".into(), "b".into()],
            share: PathBuf::from("/s"),
            boot_secs: Some(4.5),
            guest_secs: 600.0,
            total_secs: 640.5,
        };
        assert_eq!(
            RunContext::from_text(&ctx.to_text(), Path::new("/s")).unwrap(),
            ctx
        );
        assert!(RunContext::from_text("kernel=x\n", Path::new("/s")).is_err());
        let fixed = RunContext {
            policies: vec!["reads".into()],
            model: None,
            ..ctx
        };
        assert_eq!(
            RunContext::from_text(&fixed.to_text(), Path::new("/s")).unwrap(),
            fixed
        );
    }

    #[test]
    fn cli_options() {
        use clap::Parser;
        #[derive(Parser)]
        struct C {
            #[command(flatten)]
            vm: VmArgs,
        }
        let c = C::try_parse_from([
            "vm",
            "--smoke",
            "--accel",
            "tcg",
            "--workload",
            "a,b",
            "--repeat",
            "2",
        ])
        .unwrap();
        assert!(c.vm.smoke);
        assert_eq!(c.vm.accel, Accel::Tcg);
        assert_eq!(c.vm.workload, ["a", "b"]);
        assert_eq!(
            (c.vm.repeat, c.vm.runtime, c.vm.iops, c.vm.seed),
            (2, 30, 100, 1234)
        );
        assert_eq!(c.vm.policy, [Policy::ReadsUnderWrites]);
        assert!(C::try_parse_from(["vm", "--repeat", "0"]).is_err());
        let c = C::try_parse_from([
            "vm",
            "--policy",
            "reads-under-writes,model-reads",
            "--model",
            "vm-logistic",
            "--seed",
            "7",
        ])
        .unwrap();
        assert_eq!(c.vm.policy, [Policy::ReadsUnderWrites, Policy::ModelReads]);
        assert_eq!(c.vm.policy_list(), "reads-under-writes,model-reads");
        assert!(Policy::ModelReads.uses_model() && !Policy::Reads.uses_model());
        assert_eq!((c.vm.model.as_str(), c.vm.seed), ("vm-logistic", 7));
        assert!(C::try_parse_from(["vm", "--build-only", "--report-only"]).is_err());
    }
}
