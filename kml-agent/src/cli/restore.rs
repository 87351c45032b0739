//! `kml-agent restore`: the originals a killed `run --tune` saved, written back.
//! (`run --tune` does the same for its devices when it starts.)

#[derive(clap::Args, Debug)]
pub struct RestoreArgs {
    /// Only this device (default: every device with a saved state).
    #[arg(long, short)]
    pub device: Option<String>,
}

impl RestoreArgs {
    pub fn execute(self) -> anyhow::Result<()> {
        crate::kernel::caps::require_privileges()?;
        let done = crate::act::tune::restore_all(self.device.as_deref())?;
        if done.is_empty() {
            println!(
                "kml-agent: nothing to restore (no state in {})",
                crate::act::tune::state::state_dir().display()
            );
        }
        for line in done {
            println!("kml-agent: {line}");
        }
        Ok(())
    }
}
