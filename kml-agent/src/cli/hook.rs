//! `kml-agent hook`: attach the verdict program to the patched mq-deadline's hook
//! (`dd_kml_verdict`, kprobe + bpf_override_return) with a simple policy, until a
//! duration passes or a signal comes; then print what the program and the kernel
//! counted.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::{
    act::{
        fmod_ret::FmodRet,
        hook::{counters_json, counters_line, kernel_boosts, BoostSnapshot, Hook, Policy},
    },
    devices::BlockDevice,
    kernel::btf::Btf,
};

/// How the verdict reaches the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Via {
    /// kml's kprobe program with bpf_override_return (all policies, counters).
    Kprobe,
    /// A minimal fmod_ret program (policies off and reads; no program counters).
    FmodRet,
}

#[derive(clap::Args, Debug)]
pub struct HookArgs {
    /// Which requests get a positive verdict (served early by mq-deadline).
    #[arg(long, value_enum)]
    pub policy: Policy,
    /// Only requests of this disk get verdicts (default: every patched mq-deadline disk).
    #[arg(long, short)]
    pub device: Option<String>,
    /// Detach after this long (default: until Ctrl-C or SIGTERM).
    #[arg(long, value_parser = super::parse_duration)]
    pub duration: Option<Duration>,
    /// Attach as a kprobe with bpf_override_return (kml's program) or as fmod_ret.
    #[arg(long, value_enum, default_value_t = Via::Kprobe)]
    pub via: Via,
    /// Machine-readable output for tools: a JSON object on stdout when the program
    /// is attached (`"event": "ready"`) and one when it is detached (`"end"`: the
    /// program's counters, the kernel's boosts per disk). Messages stay on stderr.
    #[arg(long)]
    pub json: bool,
}

impl HookArgs {
    pub fn execute(self) -> anyhow::Result<()> {
        crate::runtime::block_on(self.run())
    }

    async fn run(self) -> anyhow::Result<()> {
        crate::kernel::caps::require_privileges()?;
        let device = self.device.as_deref().map(BlockDevice::find).transpose()?;
        // The disks whose kernel counters are reported.
        let disks: Vec<BlockDevice> = match &device {
            Some(d) => vec![d.clone()],
            None => crate::devices::list()
                .into_iter()
                .filter(|d| kernel_boosts(d).is_some())
                .collect(),
        };
        if let Some(d) = &device {
            if kernel_boosts(d).is_none() {
                anyhow::bail!(
                    "{} does not run kml's patched mq-deadline (no queue/iosched/kml_boosts; scheduler {}): \
                     echo mq-deadline > {}/queue/scheduler",
                    d.name,
                    d.scheduler.as_deref().unwrap_or("none"),
                    d.sys_path().display()
                );
            }
        }
        let before = BoostSnapshot::take(&disks);
        let (hook, fmod_ret) = match self.via {
            Via::Kprobe => (Some(Hook::attach(self.policy, device.as_ref())?), None),
            Via::FmodRet => {
                if device.is_some() {
                    anyhow::bail!("--via fmod-ret has no device filter: leave out --device");
                }
                let btf = Btf::from_sys_fs()?;
                (None, Some(FmodRet::attach(&btf, self.policy)?))
            }
        };
        let target = device
            .as_ref()
            .map_or_else(|| "every mq-deadline disk".to_owned(), |d| d.name.clone());
        let how = match self.via {
            Via::Kprobe => "kprobe + bpf_override_return",
            Via::FmodRet => "fmod_ret",
        };
        // Before the ready line: a signal right after it must find the handlers.
        let signal = crate::runtime::shutdown_signal();
        tokio::pin!(signal);
        tracing::info!(
            "hook attached to dd_kml_verdict ({how}, policy {}, {target})",
            self.policy
        );
        if self.json {
            // What scripts wait for before they start I/O (a closed stdout
            // changes nothing the hook does: it runs its time and detaches).
            let _ = super::run::print_event(
                "ready",
                &json!({"policy": self.policy.name(), "via": how, "target": target}),
            );
        }

        let started = Instant::now();
        let stop_after = tokio::time::sleep(self.duration.unwrap_or(Duration::MAX / 4));
        tokio::pin!(stop_after);
        tokio::select! {
            () = &mut stop_after => {}
            sig = &mut signal => { tracing::info!("{}, detaching", sig?); }
        }
        let counters = hook.as_ref().map(Hook::counters).transpose()?;
        drop(hook);
        drop(fmod_ret);
        let secs = started.elapsed().as_secs_f64();
        let boosts = before.changes_since();
        if self.json {
            let _ = super::run::print_event(
                "end",
                &json!({
                    "seconds": secs,
                    "hook": {
                        "policy": self.policy.name(),
                        "counters": counters.as_ref().map(counters_json),
                        "boosts": boosts,
                    },
                }),
            );
            return Ok(());
        }
        match counters {
            Some(c) => println!(
                "kml-agent: hook detached after {secs:.1}s: {}",
                counters_line(&c)
            ),
            None => println!(
                "kml-agent: hook detached after {secs:.1}s (fmod_ret: no program counters)"
            ),
        }
        for b in &boosts {
            println!("kml-agent: {}", b.line());
        }
        Ok(())
    }
}
